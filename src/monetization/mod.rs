//! Monetization: rate plans, subscriptions, prepaid and postpaid balances with a ledger,
//! the `MonetizationLimitsCheck` policy and statements (issue 19, items 2-4).
//!
//! The policy is `crate::policies::monetization_limits_check`.
//!
//! - **Plans** are `RatePlan` documents ([`plan`]), compiled with the configuration; the
//!   newest live configuration's plans are the ones listed ([`Monetization::plans`]).
//! - **Accounts** (per developer: currency, prepaid or postpaid with a credit limit),
//!   **ledger entries** (top-ups, adjustments, setup and recurring fees) and
//!   **subscriptions** are records in the store backend (tables `mint:accounts`,
//!   `mint:ledger:<developer>`, `mint:subscriptions`: names the key-value map API cannot
//!   reach), so every replica on one Redis shares them.
//! - **Usage charges** are counted twice, from the same actual amount: on the developer's
//!   spend counter (one fixed window that never ends, in the rate-limit counters, with the
//!   reservation machinery of `crate::ratelimit::reserve`, so concurrent calls cannot
//!   spend past the balance), and in the store's usage tallies (per developer, month, app,
//!   product and plan; what statements read).
//! - The **balance** is `Σ ledger entries − spend counter`; the spend counter holds settled
//!   charges plus reservations still open, so at rest `Σ entries − Σ tallied charges` is the
//!   same number to the micro ([`Monetization::ledger`] reports both).
//!
//! All money is integer micros ([`money`]).

pub mod money;
pub mod plan;

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

use crate::ratelimit::window::{self, Unit};
use crate::ratelimit::{Ask, Counters, Key, Mode, Pending, Window};
use crate::store::{Backend, Cond, Put, StoreError, Table, TallyAdd};
pub use plan::{Per, RatePlan};

const ACCOUNTS: &str = "mint:accounts";
const SUBSCRIPTIONS: &str = "mint:subscriptions";
/// The spend counter's window: from the epoch to the year 9999.
pub const SPEND_WINDOW: Window = Window::Fixed {
    start: 0,
    end: 253_402_300_799_000,
};
/// Charge tallies are kept ten years.
const TALLY_TTL: Duration = Duration::from_secs(10 * 366 * 86_400);
/// How long a replica decides on cached accounts and subscriptions before reading them
/// again from the store (so another replica's top-ups and subscriptions count within it).
pub const FRESH: Duration = Duration::from_secs(1);
/// The most months one ledger reads back.
const MAX_MONTHS: i64 = 120;

fn ledger_table(developer: &str) -> String {
    format!("mint:ledger:{developer}")
}

#[derive(Debug, thiserror::Error)]
pub enum MintError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("counters: {0}")]
    Counters(String),
}

/// A developer's billing mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Billing {
    Prepaid,
    Postpaid,
}

/// A developer's account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Account {
    pub developer: String,
    pub currency: String,
    pub billing: Billing,
    /// Postpaid: how far below zero the balance may go.
    #[serde(with = "money::serde_amount", default)]
    pub credit_limit: i64,
    pub created_at: i64,
}

/// What a ledger entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum EntryKind {
    TopUp,
    Adjustment,
    SetupFee,
    RecurringFee,
    /// A month's usage charges for one app, product and plan (read from the tallies).
    Usage,
}

/// One change to a balance (credits positive, charges negative).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    pub id: String,
    pub kind: EntryKind,
    #[serde(with = "money::serde_amount")]
    pub amount: i64,
    pub at: i64,
    #[serde(default)]
    pub reference: String,
}

/// An app's (or a developer's) subscription to a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Subscription {
    pub id: String,
    pub app: String,
    pub developer: String,
    pub plan: String,
    pub product: String,
    pub start_ms: i64,
    #[serde(default)]
    pub end_ms: Option<i64>,
}

impl Subscription {
    pub fn is_active(&self, now: i64) -> bool {
        now >= self.start_ms && self.end_ms.is_none_or(|e| now < e)
    }
}

/// A balance as the API shows it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Balance {
    pub developer: String,
    pub currency: String,
    pub billing: Billing,
    #[serde(with = "money::serde_amount")]
    pub credit_limit: i64,
    /// Σ ledger entries (top-ups, adjustments, fees).
    #[serde(with = "money::serde_amount")]
    pub credited: i64,
    /// Usage charged on the spend counter, open reservations included.
    #[serde(with = "money::serde_amount")]
    pub spent: i64,
    /// `credited − spent`.
    #[serde(with = "money::serde_amount")]
    pub balance: i64,
    /// What calls may still spend: `balance + creditLimit`.
    #[serde(with = "money::serde_amount")]
    pub available: i64,
}

/// One statement line: a month's usage of one app, product and plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Line {
    pub app: String,
    pub product: String,
    pub plan: String,
    pub calls: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    #[serde(with = "money::serde_amount")]
    pub amount: i64,
}

/// A developer's statement for one calendar month (UTC).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Statement {
    pub developer: String,
    pub currency: String,
    /// `YYYY-MM`.
    pub period: String,
    pub period_start: i64,
    pub period_end: i64,
    pub lines: Vec<Line>,
    /// Ledger entries made in the period (top-ups, adjustments, fees).
    pub entries: Vec<Entry>,
    #[serde(with = "money::serde_amount")]
    pub usage_total: i64,
    #[serde(with = "money::serde_amount")]
    pub entries_total: i64,
}

impl Statement {
    /// The lines as CSV, then the ledger entries, then the totals.
    pub fn to_csv(&self) -> String {
        let mut out = String::from(
            "period,developer,currency,app,product,plan,calls,inputTokens,outputTokens,amount\n",
        );
        for l in &self.lines {
            out.push_str(&format!(
                "{},{},{},{},{},{},{},{},{},{}\n",
                self.period,
                csv(&self.developer),
                self.currency,
                l.app,
                l.product,
                l.plan,
                l.calls,
                l.input_tokens,
                l.output_tokens,
                money::format(-l.amount)
            ));
        }
        for e in &self.entries {
            out.push_str(&format!(
                "{},{},{},,,{},,,,{}\n",
                self.period,
                csv(&self.developer),
                self.currency,
                csv(&format!("{:?}:{}", e.kind, e.reference)),
                money::format(e.amount)
            ));
        }
        out.push_str(&format!(
            "{},{},{},,,usageTotal,,,,{}\n",
            self.period,
            csv(&self.developer),
            self.currency,
            money::format(-self.usage_total)
        ));
        out
    }
}

/// Quotes a CSV field that needs it; a leading formula character is neutralised.
fn csv(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@']) {
        format!("'{s}")
    } else {
        s.to_owned()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

/// The plans of one configuration.
#[derive(Debug, Default)]
pub struct Plans(pub Vec<Arc<RatePlan>>);

impl Plans {
    pub fn get(&self, name: &str) -> Option<&Arc<RatePlan>> {
        self.0.iter().find(|p| p.name == name)
    }
}

/// A charge waiting to be flushed into the tallies.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    calls: i64,
    input: i64,
    output: i64,
    micros: i64,
}

type PendingKey = (String, i64, String);

/// Subscriptions by app.
type SubsByApp = HashMap<String, Vec<Arc<Subscription>>>;

/// The process's monetization service (in [`crate::services::Services`]).
pub struct Monetization {
    backend: Arc<dyn Backend>,
    plans: Mutex<Vec<Weak<Plans>>>,
    /// Cached accounts and their credited sums, by developer, with when they were read.
    accounts: RwLock<HashMap<String, (Account, i64, Instant)>>,
    /// Subscriptions by app, with when they were read (this replica's writes update them;
    /// another replica's are read again after [`FRESH`]).
    subs: RwLock<Option<(Instant, SubsByApp)>>,
    pending: Mutex<HashMap<PendingKey, Tally>>,
    flushing: tokio::sync::Mutex<()>,
    /// Serialises this replica's ledger writes per process (ids stay unique regardless).
    write: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Monetization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monetization").finish_non_exhaustive()
    }
}

/// The spend counter of a developer in a currency.
pub fn spend_key(developer: &str, currency: &str) -> Key {
    Key::new(&[b"mint.spend", developer.as_bytes(), currency.as_bytes()])
}

/// The period consumption counter of a subscription's app and plan.
pub fn period_key(app: &str, plan: &str) -> Key {
    Key::new(&[b"mint.period", app.as_bytes(), plan.as_bytes()])
}

fn month_of(ms: i64) -> (i64, i64) {
    window::aligned(ms, 1, Unit::Month)
}

fn month_label(start: i64) -> String {
    chrono::DateTime::from_timestamp_millis(start)
        .map(|t| t.format("%Y-%m").to_string())
        .unwrap_or_default()
}

/// Parses `YYYY-MM` into its month's bounds.
pub fn parse_month(s: &str) -> Option<(i64, i64)> {
    let d = chrono::NaiveDate::parse_from_str(&format!("{s}-01"), "%Y-%m-%d").ok()?;
    let ms = d.and_hms_opt(0, 0, 0)?.and_utc().timestamp_millis();
    Some(month_of(ms))
}

fn new_id(now: i64) -> String {
    let r = getrandom::u64().unwrap_or_else(|_| {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    });
    format!("{now:013}-{r:016x}")
}

fn bucket(developer: &str, month_start: i64) -> String {
    format!("mint:{developer}:{month_start}")
}

impl Monetization {
    pub fn new(backend: Arc<dyn Backend>) -> Arc<Self> {
        Arc::new(Self {
            backend,
            plans: Mutex::default(),
            accounts: RwLock::default(),
            subs: RwLock::default(),
            pending: Mutex::default(),
            flushing: tokio::sync::Mutex::new(()),
            write: tokio::sync::Mutex::new(()),
        })
    }

    // --- plans -----------------------------------------------------------------------------

    /// Makes `plans` (a configuration's) the listed ones while they live.
    pub fn publish_plans(&self, plans: &Arc<Plans>) {
        let mut l = self.plans.lock();
        l.retain(|w| w.strong_count() > 0);
        l.push(Arc::downgrade(plans));
    }

    /// The newest live configuration's plans.
    pub fn plans(&self) -> Arc<Plans> {
        let mut l = self.plans.lock();
        l.retain(|w| w.strong_count() > 0);
        l.iter().rev().find_map(Weak::upgrade).unwrap_or_default()
    }

    /// The plans of `product`.
    pub fn plans_for_product(&self, product: &str) -> Vec<Arc<RatePlan>> {
        self.plans()
            .0
            .iter()
            .filter(|p| p.product == product)
            .cloned()
            .collect()
    }

    // --- accounts and ledger ----------------------------------------------------------------

    async fn read_account(&self, developer: &str) -> Result<Option<Account>, MintError> {
        let Some(bytes) = self.backend.get(Table::Kvm(ACCOUNTS), developer).await? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| MintError::Store(StoreError::Unavailable(format!("account: {e}"))))
    }

    /// The stored ledger entries of `developer`, oldest first.
    pub async fn entries(&self, developer: &str) -> Result<Vec<Entry>, MintError> {
        let out = Arc::new(Mutex::new(Vec::new()));
        let sink = out.clone();
        let table = ledger_table(developer);
        self.backend
            .scan(
                &[Table::Kvm(&table)],
                Box::new(move |_, _, bytes| {
                    if let Ok(e) = serde_json::from_slice::<Entry>(bytes) {
                        sink.lock().push(e);
                    }
                }),
            )
            .await?;
        let mut v = std::mem::take(&mut *out.lock());
        v.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(v)
    }

    /// Reads the account and its credited sum from the store into the cache.
    pub async fn refresh(&self, developer: &str) -> Result<Option<(Account, i64)>, MintError> {
        let Some(acc) = self.read_account(developer).await? else {
            self.accounts.write().remove(developer);
            return Ok(None);
        };
        let credited = self
            .entries(developer)
            .await?
            .iter()
            .fold(0i64, |s, e| s.saturating_add(e.amount));
        self.accounts.write().insert(
            developer.to_owned(),
            (acc.clone(), credited, Instant::now()),
        );
        Ok(Some((acc, credited)))
    }

    /// The cached account, read from the store when not cached or older than [`FRESH`].
    pub async fn account(&self, developer: &str) -> Result<Option<(Account, i64)>, MintError> {
        if let Some(a) = self.cached_account(developer) {
            return Ok(Some(a));
        }
        self.refresh(developer).await
    }

    /// The cached account without waiting (None: not cached, or older than [`FRESH`]).
    pub fn cached_account(&self, developer: &str) -> Option<(Account, i64)> {
        self.accounts
            .read()
            .get(developer)
            .filter(|a| a.2.elapsed() < FRESH)
            .map(|a| (a.0.clone(), a.1))
    }

    /// Creates or updates a developer's account. The currency cannot change once entries
    /// exist.
    pub async fn put_account(
        &self,
        developer: &str,
        currency: &str,
        billing: Billing,
        credit_limit: i64,
        now: i64,
    ) -> Result<Account, MintError> {
        let currency = currency.trim().to_ascii_uppercase();
        if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_alphabetic()) {
            return Err(MintError::Invalid(
                "currency: a three-letter code such as USD".into(),
            ));
        }
        if credit_limit < 0 || (billing == Billing::Prepaid && credit_limit != 0) {
            return Err(MintError::Invalid(
                "creditLimit: zero or more, and only for postpaid accounts".into(),
            ));
        }
        let _w = self.write.lock().await;
        let old = self.read_account(developer).await?;
        if let Some(o) = &old {
            if o.currency != currency && !self.entries(developer).await?.is_empty() {
                return Err(MintError::Conflict(
                    "the account has ledger entries in another currency".into(),
                ));
            }
        }
        let acc = Account {
            developer: developer.to_owned(),
            currency,
            billing,
            credit_limit,
            created_at: old.map_or(now, |o| o.created_at),
        };
        let bytes = serde_json::to_vec(&acc).map_err(|e| MintError::Invalid(e.to_string()))?;
        self.backend
            .put(Table::Kvm(ACCOUNTS), developer, bytes, Cond::Any)
            .await?;
        drop(_w);
        self.refresh(developer).await?;
        Ok(acc)
    }

    /// Adds an entry to a developer's ledger (a top-up is positive, a fee negative).
    pub async fn add_entry(
        &self,
        developer: &str,
        kind: EntryKind,
        amount: i64,
        reference: &str,
        now: i64,
    ) -> Result<Entry, MintError> {
        if self.account(developer).await?.is_none() {
            return Err(MintError::NotFound(format!(
                "developer `{developer}` has no account: PUT /v1/developers/{developer}/account first"
            )));
        }
        if amount.unsigned_abs() > money::MAX_MICROS.unsigned_abs() {
            return Err(MintError::Invalid("amount: too large".into()));
        }
        let table = ledger_table(developer);
        let _w = self.write.lock().await;
        let entry = loop {
            let e = Entry {
                id: new_id(now),
                kind,
                amount,
                at: now,
                reference: reference.to_owned(),
            };
            let bytes = serde_json::to_vec(&e).map_err(|x| MintError::Invalid(x.to_string()))?;
            match self
                .backend
                .put(Table::Kvm(&table), &e.id, bytes, Cond::Absent)
                .await?
            {
                Put::Written => break e,
                _ => continue,
            }
        };
        drop(_w);
        self.refresh(developer).await?;
        Ok(entry)
    }

    /// What the developer's spend counter holds (settled charges and open reservations).
    pub async fn spent(
        &self,
        counters: &Counters,
        developer: &str,
        currency: &str,
    ) -> Result<i64, MintError> {
        let key = spend_key(developer, currency);
        let ask = Ask {
            key,
            overflow: key,
            window: SPEND_WINDOW,
            allow: u64::MAX / 4,
            weight: 0,
            mode: Mode::CountOnly,
            now: counters.now(),
            fail_open: false,
        };
        let d = match counters.decide(ask) {
            Pending::Ready(r) => r,
            Pending::Wait(f) => f.await,
        }
        .map_err(|e| MintError::Counters(e.to_string()))?;
        Ok(i64::try_from(d.used).unwrap_or(i64::MAX))
    }

    /// A developer's balance.
    pub async fn balance(
        &self,
        counters: &Counters,
        developer: &str,
    ) -> Result<Balance, MintError> {
        let (acc, credited) = self.refresh(developer).await?.ok_or_else(|| {
            MintError::NotFound(format!("developer `{developer}` has no account"))
        })?;
        let spent = self.spent(counters, developer, &acc.currency).await?;
        let balance = credited.saturating_sub(spent);
        Ok(Balance {
            developer: developer.to_owned(),
            currency: acc.currency,
            billing: acc.billing,
            credit_limit: acc.credit_limit,
            credited,
            spent,
            balance,
            available: balance.saturating_add(acc.credit_limit),
        })
    }

    // --- subscriptions ------------------------------------------------------------------------

    async fn load_subs(&self) -> Result<(), MintError> {
        if self.subscriptions_loaded() {
            return Ok(());
        }
        self.reload_subscriptions().await
    }

    /// Reads every subscription from the store (another replica's writes included).
    pub async fn reload_subscriptions(&self) -> Result<(), MintError> {
        let out = Arc::new(Mutex::new(SubsByApp::new()));
        let sink = out.clone();
        self.backend
            .scan(
                &[Table::Kvm(SUBSCRIPTIONS)],
                Box::new(move |_, _, bytes| {
                    if let Ok(s) = serde_json::from_slice::<Subscription>(bytes) {
                        sink.lock()
                            .entry(s.app.clone())
                            .or_default()
                            .push(Arc::new(s));
                    }
                }),
            )
            .await?;
        let map = std::mem::take(&mut *out.lock());
        *self.subs.write() = Some((Instant::now(), map));
        Ok(())
    }

    /// The subscriptions of `app`.
    pub async fn subscriptions(&self, app: &str) -> Result<Vec<Subscription>, MintError> {
        self.load_subs().await?;
        Ok(self
            .subs
            .read()
            .as_ref()
            .and_then(|m| m.1.get(app))
            .map(|v| v.iter().map(|s| (**s).clone()).collect())
            .unwrap_or_default())
    }

    /// The active subscription of `app` to a plan of `product` at `now`, without waiting
    /// (None when none, or when subscriptions were never loaded: see [`Self::preload`]).
    pub fn active_subscription(
        &self,
        app: &str,
        product: &str,
        now: i64,
    ) -> Option<Arc<Subscription>> {
        let g = self.subs.read();
        g.as_ref()?
            .1
            .get(app)?
            .iter()
            .filter(|s| s.product == product && s.is_active(now))
            .max_by_key(|s| s.start_ms)
            .cloned()
    }

    /// Whether subscriptions are loaded and fresh (younger than [`FRESH`]).
    pub fn subscriptions_loaded(&self) -> bool {
        self.subs
            .read()
            .as_ref()
            .is_some_and(|(at, _)| at.elapsed() < FRESH)
    }

    /// Loads subscriptions if not done yet.
    pub async fn preload(&self) -> Result<(), MintError> {
        self.load_subs().await
    }

    /// Subscribes `app` (of `developer`) to `plan` from `start_ms` (default now): the setup
    /// fee and the first period's recurring fee go to the ledger at once.
    pub async fn subscribe(
        &self,
        app: &str,
        developer: &str,
        app_products: &[String],
        plan: &str,
        start_ms: Option<i64>,
        now: i64,
    ) -> Result<Subscription, MintError> {
        let plans = self.plans();
        let p = plans
            .get(plan)
            .cloned()
            .ok_or_else(|| MintError::NotFound(format!("no rate plan `{plan}`")))?;
        if !app_products.iter().any(|x| *x == p.product) {
            return Err(MintError::Invalid(format!(
                "app `{app}` is not granted product `{}` of plan `{plan}`",
                p.product
            )));
        }
        let start = start_ms.unwrap_or(now);
        if !p.is_open(start) {
            return Err(MintError::Invalid(format!(
                "plan `{plan}` is not open at the subscription's start"
            )));
        }
        let (acc, _) = self.account(developer).await?.ok_or_else(|| {
            MintError::NotFound(format!(
                "developer `{developer}` has no account: PUT /v1/developers/{developer}/account first"
            ))
        })?;
        if acc.currency != p.currency {
            return Err(MintError::Invalid(format!(
                "plan `{plan}` is priced in {}, the developer's account in {}",
                p.currency, acc.currency
            )));
        }
        self.load_subs().await?;
        if let Some(s) = self
            .subscriptions(app)
            .await?
            .into_iter()
            .find(|s| s.product == p.product && s.end_ms.is_none_or(|e| e > start))
        {
            return Err(MintError::Conflict(format!(
                "app `{app}` already has subscription `{}` to product `{}`",
                s.id, p.product
            )));
        }
        let sub = Subscription {
            id: new_id(now),
            app: app.to_owned(),
            developer: developer.to_owned(),
            plan: p.name.clone(),
            product: p.product.clone(),
            start_ms: start,
            end_ms: p.end_ms,
        };
        let bytes = serde_json::to_vec(&sub).map_err(|e| MintError::Invalid(e.to_string()))?;
        self.backend
            .put(Table::Kvm(SUBSCRIPTIONS), &sub.id, bytes, Cond::Absent)
            .await?;
        if let Some(m) = self.subs.write().as_mut() {
            m.1.entry(app.to_owned())
                .or_default()
                .push(Arc::new(sub.clone()));
        }
        if p.setup_fee > 0 {
            self.add_entry(developer, EntryKind::SetupFee, -p.setup_fee, &sub.id, now)
                .await?;
        }
        if p.recurring_fee > 0 {
            self.add_entry(
                developer,
                EntryKind::RecurringFee,
                -p.recurring_fee,
                &format!("{} first {}", sub.id, p.recurring_period),
                now,
            )
            .await?;
        }
        Ok(sub)
    }

    /// Ends a subscription at `now`.
    pub async fn cancel(&self, id: &str, now: i64) -> Result<Subscription, MintError> {
        let bytes = self
            .backend
            .get(Table::Kvm(SUBSCRIPTIONS), id)
            .await?
            .ok_or_else(|| MintError::NotFound(format!("no subscription `{id}`")))?;
        let mut s: Subscription = serde_json::from_slice(&bytes)
            .map_err(|e| MintError::Store(StoreError::Unavailable(e.to_string())))?;
        s.end_ms = Some(s.end_ms.map_or(now, |e| e.min(now)));
        let bytes = serde_json::to_vec(&s).map_err(|e| MintError::Invalid(e.to_string()))?;
        self.backend
            .put(Table::Kvm(SUBSCRIPTIONS), id, bytes, Cond::Present)
            .await?;
        self.reload_subscriptions().await?;
        Ok(s)
    }

    // --- charges, statements -----------------------------------------------------------------

    /// Records a settled charge for the statements (flushed to the tallies).
    pub fn record(&self, at_ms: i64, sub: &Subscription, input: u64, output: u64, micros: i64) {
        let (month, _) = month_of(at_ms);
        let line = format!("{}|{}|{}", sub.app, sub.product, sub.plan);
        let mut p = self.pending.lock();
        let t = p.entry((sub.developer.clone(), month, line)).or_default();
        t.calls += 1;
        t.input = t
            .input
            .saturating_add(i64::try_from(input).unwrap_or(i64::MAX));
        t.output = t
            .output
            .saturating_add(i64::try_from(output).unwrap_or(i64::MAX));
        t.micros = t.micros.saturating_add(micros);
    }

    /// Sends pending charges to the store's tallies; kept for the next flush on failure.
    pub async fn flush(&self) -> Result<(), MintError> {
        let _one = self.flushing.lock().await;
        let taken = std::mem::take(&mut *self.pending.lock());
        if taken.is_empty() {
            return Ok(());
        }
        let mut adds = Vec::new();
        for ((dev, month, line), t) in &taken {
            for (f, v) in [
                ("calls", t.calls),
                ("inputTokens", t.input),
                ("outputTokens", t.output),
                ("micros", t.micros),
            ] {
                adds.push(TallyAdd {
                    bucket: bucket(dev, *month),
                    field: format!("{line}|{f}"),
                    delta: v,
                });
            }
        }
        if let Err(e) = self.backend.tally_add(&adds, TALLY_TTL).await {
            let mut p = self.pending.lock();
            for (k, t) in taken {
                let s = p.entry(k).or_default();
                s.calls += t.calls;
                s.input += t.input;
                s.output += t.output;
                s.micros += t.micros;
            }
            return Err(e.into());
        }
        Ok(())
    }

    /// Flushes every `interval` while the service lives.
    pub fn spawn_flusher(self: &Arc<Self>, interval: Duration) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(m) = weak.upgrade() else { return };
                if let Err(e) = m.flush().await {
                    tracing::warn!(error = %e, "monetization charge flush failed; kept");
                }
            }
        });
    }

    async fn lines(&self, developer: &str, month: i64) -> Result<Vec<Line>, MintError> {
        let rows = self.backend.tally_read(&[bucket(developer, month)]).await?;
        let mut lines: std::collections::BTreeMap<(String, String, String), Line> =
            Default::default();
        for (field, v) in rows.into_iter().flatten() {
            let mut it = field.split('|');
            let (Some(app), Some(product), Some(plan), Some(metric)) =
                (it.next(), it.next(), it.next(), it.next())
            else {
                continue;
            };
            let l = lines
                .entry((app.into(), product.into(), plan.into()))
                .or_insert_with(|| Line {
                    app: app.into(),
                    product: product.into(),
                    plan: plan.into(),
                    calls: 0,
                    input_tokens: 0,
                    output_tokens: 0,
                    amount: 0,
                });
            match metric {
                "calls" => l.calls = v,
                "inputTokens" => l.input_tokens = v,
                "outputTokens" => l.output_tokens = v,
                "micros" => l.amount = v,
                _ => {}
            }
        }
        Ok(lines.into_values().collect())
    }

    /// The statement of `developer` for the month starting at `month_start`.
    pub async fn statement(
        &self,
        developer: &str,
        month_start: i64,
    ) -> Result<Statement, MintError> {
        self.flush().await?;
        let (acc, _) = self.refresh(developer).await?.ok_or_else(|| {
            MintError::NotFound(format!("developer `{developer}` has no account"))
        })?;
        let (start, end) = month_of(month_start);
        let lines = self.lines(developer, start).await?;
        let entries: Vec<Entry> = self
            .entries(developer)
            .await?
            .into_iter()
            .filter(|e| e.at >= start && e.at < end)
            .collect();
        Ok(Statement {
            developer: developer.to_owned(),
            currency: acc.currency,
            period: month_label(start),
            period_start: start,
            period_end: end,
            usage_total: lines.iter().map(|l| l.amount).sum(),
            entries_total: entries.iter().map(|e| e.amount).sum(),
            lines,
            entries,
        })
    }

    /// Every ledger entry (stored ones, and one usage entry per month, app, product and
    /// plan from the tallies), their sum, and the balance to compare it with.
    pub async fn ledger(
        &self,
        counters: &Counters,
        developer: &str,
    ) -> Result<serde_json::Value, MintError> {
        self.flush().await?;
        let bal = self.balance(counters, developer).await?;
        let acc = self.cached_account(developer).map(|a| a.0).ok_or_else(|| {
            MintError::NotFound(format!("developer `{developer}` has no account"))
        })?;
        let mut entries = self.entries(developer).await?;
        let (mut m, _) = month_of(acc.created_at);
        let (last, _) = month_of(counters.now());
        let mut n = 0;
        while m <= last && n < MAX_MONTHS {
            for l in self.lines(developer, m).await? {
                entries.push(Entry {
                    id: format!(
                        "usage-{}-{}-{}-{}",
                        month_label(m),
                        l.app,
                        l.product,
                        l.plan
                    ),
                    kind: EntryKind::Usage,
                    amount: -l.amount,
                    at: m,
                    reference: format!("{} calls", l.calls),
                });
            }
            m = month_of(window::aligned(m, 1, Unit::Month).1).0;
            n += 1;
        }
        let sum: i64 = entries.iter().map(|e| e.amount).sum();
        Ok(serde_json::json!({
            "developer": developer,
            "currency": bal.currency,
            "entries": entries,
            "sum": money::format(sum),
            "balance": money::format(bal.balance),
            // Charges reserved by calls still running (the spend counter is ahead of the
            // tallies by exactly this while they run, and by nothing at rest).
            "reserved": money::format(sum - bal.balance),
        }))
    }
}
