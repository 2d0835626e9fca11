//! Optional sign-in through an OpenID Connect provider: the authorization-code flow.
//!
//! `GET /oidc/start` sends the browser to the issuer's authorization endpoint (from its
//! discovery document) with a fresh `state` and `nonce`, both kept in a short-lived
//! `HttpOnly` cookie (`SameSite=Lax`: the provider's redirect back is a cross-site
//! navigation, which a `Strict` cookie would not survive). `GET /oidc/callback` checks the
//! `state`, exchanges the code at the token endpoint (client secret in the body), and
//! verifies the ID token against the issuer's JWKS ([`crate::jwks::KeySet`]): signature,
//! `iss`, `aud`, `exp`, `nonce`. The account is the token's `email` (which must not be
//! marked unverified); a first sign-in creates it, pending approval unless
//! `--portal-auto-approve`, like a sign-up.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use jsonwebtoken::{decode, decode_header, Validation};
use parking_lot::Mutex;
use serde::Deserialize;

use crate::http_client::HttpClient;
use crate::jwks::{KeySet, Lookup};

/// The provider and this portal's client registration.
#[derive(Debug, Clone)]
pub struct OidcOptions {
    /// `https://issuer.example.com` (discovery at `/.well-known/openid-configuration`).
    pub issuer: String,
    pub client_id: String,
    pub client_secret: String,
    /// Where the provider sends the browser back: `<portal URL>/oidc/callback`.
    pub redirect_url: String,
}

#[derive(Debug, Clone, Deserialize)]
struct Discovery {
    issuer: String,
    authorization_endpoint: String,
    token_endpoint: String,
    jwks_uri: String,
}

/// What a verified ID token says about the user.
#[derive(Debug, Clone)]
pub struct Identity {
    pub email: String,
    pub name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    #[error("the identity provider is unreachable or answered badly: {0}")]
    Provider(String),
    #[error("the sign-in answer is invalid: {0}")]
    Invalid(String),
}

const TIMEOUT: Duration = Duration::from_secs(10);
const MAX_BODY: usize = 512 * 1024;

pub struct Oidc {
    opts: OidcOptions,
    http: HttpClient,
    discovery: Mutex<Option<Discovery>>,
}

fn enc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

impl Oidc {
    pub fn new(opts: OidcOptions) -> Self {
        Self {
            opts,
            http: HttpClient::new(),
            discovery: Mutex::new(None),
        }
    }

    async fn get(&self, url: &str) -> Result<Bytes, OidcError> {
        let req = hyper::Request::get(url)
            .header(hyper::header::ACCEPT, "application/json")
            .body(Full::new(Bytes::new()))
            .map_err(|e| OidcError::Provider(e.to_string()))?;
        let r = self
            .http
            .send(req, false, TIMEOUT, MAX_BODY)
            .await
            .map_err(|e| OidcError::Provider(e.to_string()))?;
        if r.status != 200 {
            return Err(OidcError::Provider(format!("{url} answered {}", r.status)));
        }
        Ok(r.body)
    }

    async fn discovery(&self) -> Result<Discovery, OidcError> {
        if let Some(d) = self.discovery.lock().clone() {
            return Ok(d);
        }
        let url = format!(
            "{}/.well-known/openid-configuration",
            self.opts.issuer.trim_end_matches('/')
        );
        let d: Discovery = serde_json::from_slice(&self.get(&url).await?)
            .map_err(|e| OidcError::Provider(format!("discovery document: {e}")))?;
        if d.issuer.trim_end_matches('/') != self.opts.issuer.trim_end_matches('/') {
            return Err(OidcError::Provider(
                "the discovery document names another issuer".into(),
            ));
        }
        *self.discovery.lock() = Some(d.clone());
        Ok(d)
    }

    /// The authorization URL to send the browser to.
    pub async fn authorize_url(&self, state: &str, nonce: &str) -> Result<String, OidcError> {
        let d = self.discovery().await?;
        let sep = if d.authorization_endpoint.contains('?') {
            '&'
        } else {
            '?'
        };
        Ok(format!(
            "{}{sep}response_type=code&scope=openid%20email%20profile&client_id={}&redirect_uri={}&state={}&nonce={}",
            d.authorization_endpoint,
            enc(&self.opts.client_id),
            enc(&self.opts.redirect_url),
            enc(state),
            enc(nonce)
        ))
    }

    /// Exchanges `code` and verifies the ID token (signature, issuer, audience, expiry,
    /// `nonce`).
    pub async fn complete(&self, code: &str, nonce: &str) -> Result<Identity, OidcError> {
        let d = self.discovery().await?;
        let form = format!(
            "grant_type=authorization_code&code={}&redirect_uri={}&client_id={}&client_secret={}",
            enc(code),
            enc(&self.opts.redirect_url),
            enc(&self.opts.client_id),
            enc(&self.opts.client_secret)
        );
        let req = hyper::Request::post(&d.token_endpoint)
            .header(
                hyper::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .header(hyper::header::ACCEPT, "application/json")
            .body(Full::new(Bytes::from(form)))
            .map_err(|e| OidcError::Provider(e.to_string()))?;
        let r = self
            .http
            .send(req, false, TIMEOUT, MAX_BODY)
            .await
            .map_err(|e| OidcError::Provider(e.to_string()))?;
        if r.status != 200 {
            return Err(OidcError::Invalid(format!(
                "the token endpoint answered {}",
                r.status
            )));
        }
        #[derive(Deserialize)]
        struct Tokens {
            id_token: String,
        }
        let t: Tokens = serde_json::from_slice(&r.body)
            .map_err(|e| OidcError::Invalid(format!("token answer: {e}")))?;
        let keys = KeySet::parse(&self.get(&d.jwks_uri).await?)
            .map_err(|e| OidcError::Provider(format!("JWKS: {e}")))?;
        let header = decode_header(&t.id_token).map_err(|e| OidcError::Invalid(e.to_string()))?;
        let key = match keys.find(header.kid.as_deref(), header.alg) {
            Lookup::Found(k) => k,
            _ => return Err(OidcError::Invalid("no key for the ID token".into())),
        };
        let mut v = Validation::new(header.alg);
        v.set_issuer(&[&d.issuer]);
        v.set_audience(&[&self.opts.client_id]);
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        v.leeway = 30;
        #[derive(Deserialize)]
        struct Claims {
            #[serde(default)]
            email: Option<String>,
            #[serde(default)]
            email_verified: Option<bool>,
            #[serde(default)]
            name: Option<String>,
            #[serde(default)]
            nonce: Option<String>,
        }
        let c = decode::<Claims>(&t.id_token, &key.key, &v)
            .map_err(|e| OidcError::Invalid(e.to_string()))?
            .claims;
        let nonce_ok = c.nonce.as_deref().is_some_and(|n| super::ct_eq(n, nonce));
        if !nonce_ok {
            return Err(OidcError::Invalid("the nonce does not match".into()));
        }
        if c.email_verified == Some(false) {
            return Err(OidcError::Invalid("the email is not verified".into()));
        }
        let email = c
            .email
            .map(|e| e.trim().to_ascii_lowercase())
            .filter(|e| super::valid_email(e))
            .ok_or_else(|| OidcError::Invalid("the ID token carries no valid email".into()))?;
        let name = c
            .name
            .filter(|n| !n.is_empty() && n.chars().count() <= 100)
            .unwrap_or_else(|| email.clone());
        Ok(Identity { email, name })
    }
}
