//! Developer accounts and sessions, kept in the store every replica shares (so a sign-up,
//! an approval or a sign-in made through one replica holds on all), plus the sign-in
//! throttle (per replica, in memory).
//!
//! Records live in two reserved tables of the store's key-value space,
//! [`DEVELOPERS`] and [`SESSIONS`]: their names hold a `:`, which no key-value map name may
//! (`kvm::check_map_name`), so neither the KeyValueMapOperations policy nor `/v1/kvms` can
//! reach them. Passwords are stored as Argon2id PHC strings; sessions are stored under the
//! SHA-256 of their token (the cookie holds the token), so a store dump yields no live
//! session.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::store::{Cond, Put, Store, StoreError, Table};

/// Developer records, keyed by lower-case email.
pub const DEVELOPERS: &str = "portal:developers";
/// Sessions, keyed by the hex SHA-256 of the session token.
pub const SESSIONS: &str = "portal:sessions";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DeveloperStatus {
    /// Signed up; waits for approval through the management API.
    #[default]
    Pending,
    Active,
    /// Approved once, then blocked: cannot sign in; existing sessions stop working.
    Suspended,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Developer {
    /// Lower-case; also the apps' `developerEmail`.
    pub email: String,
    pub name: String,
    /// Argon2id PHC string; `None` for accounts that only sign in through OpenID Connect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_hash: Option<String>,
    #[serde(default)]
    pub status: DeveloperStatus,
    /// Private products this developer may see and subscribe to (granted through the
    /// management API).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub products: Vec<String>,
    #[serde(default)]
    pub created_at: i64,
    /// Raised by one on every update (optimistic concurrency, as products and apps).
    #[serde(default)]
    pub revision: u64,
}

/// A signed-in browser.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Session {
    pub email: String,
    /// The synchronizer token every form of this session must carry.
    pub csrf: String,
    pub expires_at: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("an account with this email already exists")]
    Exists,
    #[error("no such developer")]
    NotFound,
    #[error("the developer record was changed meanwhile; try again")]
    Conflict,
    #[error("stored portal record is unreadable: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Crypto(String),
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// `N` random bytes from the OS.
pub fn random<const N: usize>() -> Result<[u8; N], AccountError> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| AccountError::Crypto(format!("no randomness: {e}")))?;
    Ok(b)
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// A fresh random token (256 bits, hex).
pub fn token() -> Result<String, AccountError> {
    Ok(hex(&random::<32>()?))
}

fn token_key(token: &str) -> String {
    hex(&Sha256::digest(token.as_bytes()))
}

/// Argon2id with the crate's defaults (19 MiB, 2 passes: OWASP's minimum).
pub fn hash_password(password: &str) -> Result<String, AccountError> {
    let salt = SaltString::encode_b64(&random::<16>()?)
        .map_err(|e| AccountError::Crypto(e.to_string()))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| AccountError::Crypto(e.to_string()))
}

pub fn verify_password(hash: &str, password: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|h| {
        Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

/// A hash to verify against when the account does not exist, so an unknown email costs
/// the same time as a wrong password (no account enumeration by timing).
pub fn dummy_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| hash_password("not a password").unwrap_or_default())
}

/// The developer and session records in the store.
#[derive(Debug, Clone)]
pub struct Accounts {
    store: Store,
}

impl Accounts {
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    pub async fn developer(&self, email: &str) -> Result<Option<Developer>, AccountError> {
        let key = email.to_ascii_lowercase();
        match self
            .store
            .backend()
            .get(Table::Kvm(DEVELOPERS), &key)
            .await?
        {
            Some(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| AccountError::Corrupt(e.to_string())),
            None => Ok(None),
        }
    }

    pub async fn developers(&self) -> Result<Vec<Developer>, AccountError> {
        let found = std::sync::Arc::new(Mutex::new(Vec::new()));
        let into = found.clone();
        self.store
            .backend()
            .scan(
                &[Table::Kvm(DEVELOPERS)],
                Box::new(move |_, key, bytes| match serde_json::from_slice(bytes) {
                    Ok(d) => into.lock().push(d),
                    Err(e) => {
                        tracing::warn!(key, error = %e, "unreadable developer record skipped")
                    }
                }),
            )
            .await?;
        let mut v = std::mem::take(&mut *found.lock());
        v.sort_by(|a: &Developer, b| a.email.cmp(&b.email));
        Ok(v)
    }

    pub async fn create(&self, dev: &Developer) -> Result<(), AccountError> {
        let bytes = serde_json::to_vec(dev).map_err(|e| AccountError::Corrupt(e.to_string()))?;
        match self
            .store
            .backend()
            .put(Table::Kvm(DEVELOPERS), &dev.email, bytes, Cond::Absent)
            .await?
        {
            Put::Written => Ok(()),
            _ => Err(AccountError::Exists),
        }
    }

    /// Read-modify-write of one developer, retried when another replica wrote meanwhile.
    pub async fn update<F>(&self, email: &str, mut change: F) -> Result<Developer, AccountError>
    where
        F: FnMut(&mut Developer),
    {
        for _ in 0..5 {
            let Some(mut dev) = self.developer(email).await? else {
                return Err(AccountError::NotFound);
            };
            let read_at = dev.revision;
            change(&mut dev);
            dev.revision = read_at.saturating_add(1);
            let bytes =
                serde_json::to_vec(&dev).map_err(|e| AccountError::Corrupt(e.to_string()))?;
            match self
                .store
                .backend()
                .put(
                    Table::Kvm(DEVELOPERS),
                    &dev.email,
                    bytes,
                    Cond::Revision(read_at),
                )
                .await?
            {
                Put::Written => return Ok(dev),
                Put::Missing => return Err(AccountError::NotFound),
                _ => continue,
            }
        }
        Err(AccountError::Conflict)
    }

    /// Starts a session; returns its token (for the cookie) and the session.
    pub async fn start_session(
        &self,
        email: &str,
        ttl_ms: i64,
    ) -> Result<(String, Session), AccountError> {
        let t = token()?;
        let s = Session {
            email: email.to_owned(),
            csrf: token()?,
            expires_at: now_ms().saturating_add(ttl_ms),
        };
        let bytes = serde_json::to_vec(&s).map_err(|e| AccountError::Corrupt(e.to_string()))?;
        self.store
            .backend()
            .put(Table::Kvm(SESSIONS), &token_key(&t), bytes, Cond::Absent)
            .await?;
        Ok((t, s))
    }

    /// The live session of a token; an expired one is deleted.
    pub async fn session(&self, token: &str) -> Result<Option<Session>, AccountError> {
        if token.len() != 64 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(None);
        }
        let key = token_key(token);
        let Some(b) = self.store.backend().get(Table::Kvm(SESSIONS), &key).await? else {
            return Ok(None);
        };
        let s: Session =
            serde_json::from_slice(&b).map_err(|e| AccountError::Corrupt(e.to_string()))?;
        if s.expires_at <= now_ms() {
            let _ = self
                .store
                .backend()
                .delete(Table::Kvm(SESSIONS), &key)
                .await;
            return Ok(None);
        }
        Ok(Some(s))
    }

    pub async fn end_session(&self, token: &str) -> Result<(), AccountError> {
        self.store
            .backend()
            .delete(Table::Kvm(SESSIONS), &token_key(token))
            .await?;
        Ok(())
    }
}

/// Sign-in failures allowed per window, per account and per client address.
#[derive(Debug, Clone, Copy)]
pub struct ThrottleLimits {
    pub per_account: u32,
    pub per_address: u32,
    pub window_ms: i64,
}

impl Default for ThrottleLimits {
    fn default() -> Self {
        Self {
            per_account: 5,
            per_address: 20,
            window_ms: 15 * 60_000,
        }
    }
}

/// Counts failed sign-ins in fixed windows. Per replica: behind several replicas the
/// effective limit is the sum (documented); memory is bounded by sweeping old windows.
#[derive(Debug, Default)]
pub struct Throttle {
    limits: ThrottleLimits,
    seen: Mutex<HashMap<String, (i64, u32)>>,
}

const MAX_THROTTLE_ENTRIES: usize = 100_000;

impl Throttle {
    pub fn new(limits: ThrottleLimits) -> Self {
        Self {
            limits,
            seen: Mutex::default(),
        }
    }

    fn count(&self, key: &str, now: i64) -> u32 {
        let seen = self.seen.lock();
        match seen.get(key) {
            Some((start, n)) if now - start < self.limits.window_ms => *n,
            _ => 0,
        }
    }

    /// Whether a sign-in for `account` from `address` may be tried now.
    pub fn allowed(&self, account: &str, address: &str, now: i64) -> bool {
        self.count(&format!("a:{account}"), now) < self.limits.per_account
            && self.count(&format!("i:{address}"), now) < self.limits.per_address
    }

    pub fn failed(&self, account: &str, address: &str, now: i64) {
        let mut seen = self.seen.lock();
        if seen.len() >= MAX_THROTTLE_ENTRIES {
            let w = self.limits.window_ms;
            seen.retain(|_, (start, _)| now - *start < w);
        }
        for key in [format!("a:{account}"), format!("i:{address}")] {
            let e = seen.entry(key).or_insert((now, 0));
            if now - e.0 >= self.limits.window_ms {
                *e = (now, 0);
            }
            e.1 = e.1.saturating_add(1);
        }
    }

    /// A successful sign-in clears the account's failures (not the address's).
    pub fn succeeded(&self, account: &str) {
        self.seen.lock().remove(&format!("a:{account}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_hash_and_verify() {
        let h = hash_password("correct horse").unwrap();
        assert!(h.starts_with("$argon2id$"), "{h}");
        assert!(verify_password(&h, "correct horse"));
        assert!(!verify_password(&h, "wrong"));
        assert!(!verify_password("garbage", "correct horse"));
        assert_ne!(h, hash_password("correct horse").unwrap(), "salted");
    }

    #[test]
    fn throttle_counts_per_account_and_address() {
        let t = Throttle::new(ThrottleLimits {
            per_account: 2,
            per_address: 3,
            window_ms: 1000,
        });
        assert!(t.allowed("a", "ip", 0));
        t.failed("a", "ip", 0);
        t.failed("a", "ip", 1);
        assert!(!t.allowed("a", "ip2", 2), "account limit");
        assert!(t.allowed("b", "ip", 2));
        t.failed("b", "ip", 2);
        assert!(!t.allowed("c", "ip", 3), "address limit");
        assert!(t.allowed("a", "ip2", 1001), "window over");
        t.succeeded("b");
    }

    #[tokio::test]
    async fn developers_and_sessions_round_trip() {
        let a = Accounts::new(Store::memory());
        let d = Developer {
            email: "d@example.com".into(),
            name: "D".into(),
            password_hash: None,
            status: DeveloperStatus::Pending,
            products: vec![],
            created_at: 1,
            revision: 0,
        };
        a.create(&d).await.unwrap();
        assert!(matches!(a.create(&d).await, Err(AccountError::Exists)));
        let up = a
            .update("D@example.com", |d| d.status = DeveloperStatus::Active)
            .await
            .unwrap();
        assert_eq!(up.revision, 1);
        assert_eq!(
            a.developer("d@example.com").await.unwrap().unwrap().status,
            DeveloperStatus::Active
        );
        let (t, s) = a.start_session("d@example.com", 60_000).await.unwrap();
        assert_eq!(a.session(&t).await.unwrap(), Some(s));
        assert_eq!(a.session("zz").await.unwrap(), None);
        a.end_session(&t).await.unwrap();
        assert_eq!(a.session(&t).await.unwrap(), None);
        let (t, _) = a.start_session("d@example.com", -1).await.unwrap();
        assert_eq!(a.session(&t).await.unwrap(), None, "expired");
    }
}
