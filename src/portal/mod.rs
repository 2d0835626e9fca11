//! The developer portal (`--portal-addr`, off by default): server-rendered pages, no
//! external assets, no JavaScript, served by the admin port's HTTP stack
//! ([`crate::admin::serve_http`]).
//!
//! - Catalog: the products whose `access` attribute is `public` (Apigee's product attribute),
//!   and `private` ones granted to the signed-in developer (`PUT /v1/developers/{email}/products`
//!   on the management API). Products without the attribute, or `internal`, are not shown.
//!   A product's `openapiSpec` attribute names its OpenAPI description (a file under
//!   `--portal-spec-dir`), rendered as an API reference ([`reference`]).
//! - Accounts ([`accounts`]): sign-up (approval through `POST /v1/developers/{email}/approve`
//!   unless `--portal-auto-approve`), Argon2id passwords, sessions in the store behind an
//!   `HttpOnly; SameSite=Strict; Secure` cookie, a CSRF token on every form, sign-in failures
//!   throttled per account and per client address.
//! - Apps: the developer's own apps are ordinary apps (`developerEmail` = the account) in the
//!   same store as the management API's, so a key made here verifies at once on every
//!   replica. Keys are shown once; rotate makes a new key and revokes the old one.
//!   Subscribing to a product with `approvalType: manual` puts the app's keys in `pending`
//!   until approved through `POST /v1/apps/{app}/keys/{id}/approve` (the management API's
//!   key approval: this model approves keys, not key-product pairs).
//! - Ownership: every app page and action loads the app from the store and answers 404
//!   unless its `developerEmail` is the session's (the same answer as a missing app).
//!
//! Money pages (rate plans, balances, statements) plug in at [`MoneyPages`].

pub mod accounts;
pub mod html;
pub mod manage;
pub mod oidc;
pub mod reference;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use parking_lot::Mutex;

use crate::consumer::service::Consumers;
use crate::consumer::{hash_key, ApiKey, ApiProduct, App, ApprovalType, KeyStatus, Origin};
use crate::store::{StoreError, Write};
use accounts::{
    dummy_hash, hash_password, hex, now_ms, random, verify_password, AccountError, Accounts,
    Developer, DeveloperStatus, Session, Throttle, ThrottleLimits,
};
use html::{esc, page, url_seg};

/// The session cookie.
pub const SESSION_COOKIE: &str = "tg_portal";
/// The signed-out forms' CSRF cookie (double submit: the form field must equal it).
pub const CSRF_COOKIE: &str = "tg_portal_csrf";
/// Bodies of portal forms are small.
const FORM_LIMIT: usize = 16 * 1024;
const MIN_PASSWORD: usize = 12;

/// How the portal behaves.
#[derive(Debug, Clone)]
pub struct PortalOptions {
    /// New accounts are active at once (otherwise they wait for approval).
    pub auto_approve: bool,
    /// Where products' `openapiSpec` attributes are resolved (and confined to).
    pub spec_dir: Option<PathBuf>,
    /// `Secure` on cookies. Browsers keep `Secure` cookies from `http://localhost` (a
    /// secure context), so this stays on for local trials; turn it off only for plain HTTP
    /// on another host name (never in production).
    pub secure_cookies: bool,
    pub session_ttl: Duration,
    pub throttle: ThrottleLimits,
    /// Sign-in through an OpenID Connect provider, beside passwords.
    pub oidc: Option<oidc::OidcOptions>,
}

impl Default for PortalOptions {
    fn default() -> Self {
        Self {
            auto_approve: false,
            spec_dir: None,
            secure_cookies: true,
            session_ttl: Duration::from_secs(8 * 3600),
            throttle: ThrottleLimits::default(),
            oidc: None,
        }
    }
}

/// Where the money side (rate plans, balances, statements) plugs its pages in: each returns
/// an HTML fragment built from escaped parts, or `None` to show nothing. The lead wires an
/// implementation from `crate::monetization` after merging; until then [`NoMoney`].
pub trait MoneyPages: Send + Sync + 'static {
    /// Prices of a product (rate plans), shown in the catalog row and on the product page.
    fn product_prices(&self, product: &ApiProduct) -> Option<String>;
    /// On an app page: plan subscription forms, spend chart, statement downloads. `csrf` is
    /// the session's token for any form the fragment holds.
    fn app_money(&self, developer: &str, app: &App, csrf: &str) -> Option<String>;
}

/// No money side: prices come from the products' own attributes only.
pub struct NoMoney;

impl MoneyPages for NoMoney {
    fn product_prices(&self, _: &ApiProduct) -> Option<String> {
        None
    }
    fn app_money(&self, _: &str, _: &App, _: &str) -> Option<String> {
        None
    }
}

/// The portal's state.
pub struct Portal {
    consumers: Arc<Consumers>,
    accounts: Accounts,
    ledger: Option<Arc<crate::usage::Ledger>>,
    opts: PortalOptions,
    throttle: Throttle,
    money: Arc<dyn MoneyPages>,
    /// Rendered API references by spec path, with the file's modification time.
    references: Mutex<HashMap<PathBuf, (SystemTime, Arc<String>)>>,
    /// Orders this process's app writes (the store's revisions order replicas').
    write: tokio::sync::Mutex<()>,
    oidc: Option<oidc::Oidc>,
}

impl Portal {
    pub fn new(
        consumers: Arc<Consumers>,
        ledger: Option<Arc<crate::usage::Ledger>>,
        opts: PortalOptions,
    ) -> Arc<Self> {
        Self::with_money(consumers, ledger, opts, Arc::new(NoMoney))
    }

    pub fn with_money(
        consumers: Arc<Consumers>,
        ledger: Option<Arc<crate::usage::Ledger>>,
        opts: PortalOptions,
        money: Arc<dyn MoneyPages>,
    ) -> Arc<Self> {
        Arc::new(Self {
            accounts: Accounts::new(consumers.store().clone()),
            oidc: opts.oidc.clone().map(oidc::Oidc::new),
            consumers,
            ledger,
            throttle: Throttle::new(opts.throttle),
            opts,
            money,
            references: Mutex::default(),
            write: tokio::sync::Mutex::new(()),
        })
    }

    pub fn accounts(&self) -> &Accounts {
        &self.accounts
    }
}

/// What a portal request can fail with; every one is an HTML page.
#[derive(Debug, thiserror::Error)]
pub enum PortalError {
    #[error("not found")]
    NotFound,
    #[error("the form expired or did not come from this site; reload the page and try again")]
    Csrf,
    #[error("sign in first")]
    SignIn,
    #[error("too many sign-in attempts; wait a few minutes")]
    Throttled,
    #[error("{0}")]
    Invalid(String),
    #[error("the store is unavailable; try again")]
    Unavailable(String),
}

impl From<AccountError> for PortalError {
    fn from(e: AccountError) -> Self {
        match e {
            AccountError::NotFound => PortalError::NotFound,
            AccountError::Exists => PortalError::Invalid(e.to_string()),
            e => PortalError::Unavailable(e.to_string()),
        }
    }
}

impl From<StoreError> for PortalError {
    fn from(e: StoreError) -> Self {
        PortalError::Unavailable(e.to_string())
    }
}

impl IntoResponse for PortalError {
    fn into_response(self) -> Response {
        let status = match &self {
            PortalError::NotFound => StatusCode::NOT_FOUND,
            PortalError::Csrf => StatusCode::FORBIDDEN,
            PortalError::SignIn => return see_other("/signin"),
            PortalError::Throttled => StatusCode::TOO_MANY_REQUESTS,
            PortalError::Invalid(_) => StatusCode::BAD_REQUEST,
            PortalError::Unavailable(m) => {
                tracing::warn!(error = %m, "portal: store unavailable");
                StatusCode::SERVICE_UNAVAILABLE
            }
        };
        let msg = match &self {
            PortalError::Unavailable(_) => "the store is unavailable; try again".to_owned(),
            e => e.to_string(),
        };
        html_response(
            status,
            page(
                "Error",
                None,
                &format!("<p class=\"error\">{}</p>", esc(&msg)),
            ),
        )
    }
}

type PortalResult = Result<Response, PortalError>;

fn secure_headers(h: &mut HeaderMap) {
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
}

fn html_response(status: StatusCode, body: String) -> Response {
    let mut r = (status, body).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    secure_headers(h);
    r
}

fn see_other(to: &str) -> Response {
    let mut r = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    secure_headers(r.headers_mut());
    r
}

fn cookie(name: &str, headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.to_owned())
}

/// A form body's fields (first value of each name).
fn form(body: &[u8]) -> HashMap<String, String> {
    let mut m = HashMap::new();
    for (k, v) in form_urlencoded::parse(body) {
        m.entry(k.into_owned()).or_insert_with(|| v.into_owned());
    }
    m
}

fn ct_eq(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

fn csrf_field(token: &str) -> String {
    format!(
        "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
        esc(token)
    )
}

/// The signed-in developer of a request.
struct Viewer {
    token: String,
    session: Session,
    developer: Developer,
}

impl Portal {
    fn cookie_attrs(&self) -> &'static str {
        if self.opts.secure_cookies {
            "Path=/; HttpOnly; SameSite=Strict; Secure"
        } else {
            "Path=/; HttpOnly; SameSite=Strict"
        }
    }

    async fn viewer(&self, headers: &HeaderMap) -> Result<Option<Viewer>, PortalError> {
        let Some(token) = cookie(SESSION_COOKIE, headers) else {
            return Ok(None);
        };
        let Some(session) = self.accounts.session(&token).await? else {
            return Ok(None);
        };
        let Some(developer) = self.accounts.developer(&session.email).await? else {
            return Ok(None);
        };
        if developer.status != DeveloperStatus::Active {
            return Ok(None);
        }
        Ok(Some(Viewer {
            token,
            session,
            developer,
        }))
    }

    /// The viewer of a state-changing request: signed in, and the form's CSRF token is the
    /// session's.
    async fn acting(
        &self,
        headers: &HeaderMap,
        fields: &HashMap<String, String>,
    ) -> Result<Viewer, PortalError> {
        let v = self.viewer(headers).await?.ok_or(PortalError::SignIn)?;
        match fields.get("csrf") {
            Some(t) if ct_eq(t, &v.session.csrf) => Ok(v),
            _ => Err(PortalError::Csrf),
        }
    }

    fn page_for(&self, title: &str, v: Option<&Viewer>, body: &str) -> Response {
        html_response(
            StatusCode::OK,
            page(
                title,
                v.map(|v| (v.developer.email.as_str(), v.session.csrf.as_str())),
                body,
            ),
        )
    }
}

/// Who may see a product in the portal: `access: public` to everyone, `private` to the
/// developers granted it; anything else (absent, `internal`) to nobody.
pub fn visible(p: &ApiProduct, dev: Option<&Developer>) -> bool {
    match p
        .attributes
        .get("access")
        .map(|a| a.trim().to_ascii_lowercase())
        .as_deref()
    {
        Some("public") => true,
        Some("private") => dev.is_some_and(|d| d.products.contains(&p.name)),
        _ => false,
    }
}

fn quota_text(q: &crate::consumer::QuotaSettings, what: &str) -> String {
    if q.interval == 1 {
        format!("{} {what} per {}", q.limit, q.time_unit.as_str())
    } else {
        format!(
            "{} {what} per {} {}s",
            q.limit,
            q.interval,
            q.time_unit.as_str()
        )
    }
}

fn limits_text(p: &ApiProduct) -> String {
    let mut v = Vec::new();
    if let Some(q) = &p.quota {
        v.push(quota_text(q, "calls"));
    }
    if let Some(q) = &p.llm_token_quota {
        v.push(quota_text(q, "tokens"));
    }
    v.join("; ")
}

fn models(p: &ApiProduct) -> Vec<&str> {
    let mut m: Vec<&str> = p
        .operations
        .iter()
        .flat_map(|o| o.models.iter().map(String::as_str))
        .collect();
    m.sort_unstable();
    m.dedup();
    m
}

/// Prices a product states today in its attributes (`price…`, e.g. `price.inputTokens`),
/// beside whatever the money side shows.
fn prices_html(portal: &Portal, p: &ApiProduct) -> String {
    let mut s = String::new();
    for (k, v) in p.attributes.range("price".to_owned()..) {
        if !k.starts_with("price") {
            break;
        }
        let _ = write!(s, "<div><code>{}</code>: {}</div>", esc(k), esc(v));
    }
    if let Some(m) = portal.money.product_prices(p) {
        s.push_str(&m);
    }
    s
}

/// The catalog page for `dev` (or signed out).
pub fn render_catalog(portal: &Portal, dev: Option<&Developer>) -> String {
    let products = portal.consumers.products();
    let mut body = String::with_capacity(256 + products.len() * 400);
    body.push_str("<h1>API products</h1><table class=\"catalog\"><tr><th>Product</th><th>Description</th><th>Operations</th><th>Models</th><th>Limits</th><th>Prices</th></tr>");
    let mut shown = 0;
    for p in products.iter().filter(|p| visible(p, dev)) {
        shown += 1;
        let _ = write!(
            body,
            "<tr><td><a href=\"/products/{}\">{}</a>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&url_seg(&p.name)),
            esc(&p.name),
            if p.approval_type == ApprovalType::Manual {
                " <span class=\"tag\">approval</span>"
            } else {
                ""
            },
            esc(&p.description),
            p.operations.len(),
            esc(&models(p).join(", ")),
            esc(&limits_text(p)),
            prices_html(portal, p)
        );
    }
    body.push_str("</table>");
    if shown == 0 {
        body.push_str("<p>No products are published yet.</p>");
    }
    body
}

async fn catalog(State(portal): State<Arc<Portal>>, headers: HeaderMap) -> PortalResult {
    let v = portal.viewer(&headers).await?;
    let body = render_catalog(&portal, v.as_ref().map(|v| &v.developer));
    Ok(portal.page_for("Catalog", v.as_ref(), &body))
}

impl Portal {
    /// The rendered API reference of a product, from its `openapiSpec` attribute (confined
    /// to the spec directory), cached until the file changes.
    fn reference(&self, p: &ApiProduct) -> Option<Result<Arc<String>, String>> {
        let rel = p.attributes.get("openapiSpec")?;
        let Some(dir) = &self.opts.spec_dir else {
            return Some(Err("no spec directory is configured".into()));
        };
        let resolved = (|| {
            let dir = dir.canonicalize().map_err(|e| e.to_string())?;
            let path = dir.join(rel).canonicalize().map_err(|e| e.to_string())?;
            if !path.starts_with(&dir) {
                return Err("the spec is outside the spec directory".to_owned());
            }
            Ok(path)
        })();
        let path = match resolved {
            Ok(p) => p,
            Err(e) => return Some(Err(e)),
        };
        let mtime = std::fs::metadata(&path)
            .and_then(|m| m.modified())
            .unwrap_or(SystemTime::UNIX_EPOCH);
        if let Some((t, html)) = self.references.lock().get(&path) {
            if *t == mtime {
                return Some(Ok(html.clone()));
            }
        }
        let doc = match crate::openapi::read_document(&path) {
            Ok(d) => d,
            Err(e) => return Some(Err(e.to_string())),
        };
        let html = Arc::new(reference::render(&doc));
        self.references.lock().insert(path, (mtime, html.clone()));
        Some(Ok(html))
    }
}

async fn product_page(
    State(portal): State<Arc<Portal>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> PortalResult {
    let v = portal.viewer(&headers).await?;
    let dev = v.as_ref().map(|v| &v.developer);
    let p = portal
        .consumers
        .products()
        .into_iter()
        .find(|p| p.name == name && visible(p, dev))
        .ok_or(PortalError::NotFound)?;
    let mut body = String::new();
    let _ = write!(
        body,
        "<h1>{}</h1><p class=\"description\">{}</p>",
        esc(&p.name),
        esc(&p.description)
    );
    if p.approval_type == ApprovalType::Manual {
        body.push_str("<p class=\"pending\">Subscriptions to this product wait for approval.</p>");
    }
    body.push_str("<div class=\"card\"><h2>Operations</h2><table><tr><th>Methods</th><th>Path</th><th>Models</th><th>Limits</th></tr>");
    for o in &p.operations {
        let mut lim = Vec::new();
        if let Some(q) = &o.quota {
            lim.push(quota_text(q, "calls"));
        }
        if let Some(q) = &o.llm_token_quota {
            lim.push(quota_text(q, "tokens"));
        }
        let _ = write!(
            body,
            "<tr><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td></tr>",
            esc(&if o.methods.is_empty() {
                "any".to_owned()
            } else {
                o.methods.join(", ")
            }),
            esc(&o.path),
            esc(&o.models.join(", ")),
            esc(&lim.join("; "))
        );
    }
    let _ = write!(
        body,
        "</table><p>Product limits: {}</p><div>Prices: {}</div></div>",
        esc(&match limits_text(&p) {
            s if s.is_empty() => "none".to_owned(),
            s => s,
        }),
        match prices_html(&portal, &p) {
            s if s.is_empty() => "none stated".to_owned(),
            s => s,
        }
    );
    if let Some(v) = &v {
        let apps = portal.consumers.apps_of(&v.developer.email);
        let apps: Vec<_> = apps
            .iter()
            .filter(|a| a.origin == Origin::Api && !a.products.contains(&p.name))
            .collect();
        if !apps.is_empty() {
            let _ = write!(
                body,
                "<form class=\"card\" method=\"post\" action=\"\" id=\"subscribe\">{}<input type=\"hidden\" name=\"product\" value=\"{}\"><label>Subscribe app <select name=\"app\">",
                csrf_field(&v.session.csrf),
                esc(&p.name)
            );
            for a in apps {
                let _ = write!(
                    body,
                    "<option value=\"{}\">{}</option>",
                    esc(&a.name),
                    esc(display_name(a))
                );
            }
            body.push_str("</select></label><button type=\"submit\" formaction=\"/subscribe\">Subscribe</button></form>");
        }
    }
    match portal.reference(&p) {
        Some(Ok(html)) => body.push_str(&html),
        Some(Err(e)) => {
            tracing::warn!(product = %p.name, error = %e, "portal: API reference unavailable");
            body.push_str("<p class=\"error\">The API reference is unavailable.</p>");
        }
        None => {}
    }
    Ok(portal.page_for(&p.name, v.as_ref(), &body))
}

// --- accounts ----------------------------------------------------------------------------

impl Portal {
    /// A signed-out form page: a fresh CSRF cookie, and its value in the form.
    fn anonymous_form(&self, title: &str, action: &str, fields: &str, note: &str) -> PortalResult {
        let t = accounts::token()?;
        let body = format!(
            "<h1>{}</h1>{note}<form class=\"card\" method=\"post\" action=\"{}\">{}{fields}<button type=\"submit\">{}</button></form>",
            esc(title),
            esc(action),
            csrf_field(&t),
            esc(title)
        );
        let mut r = html_response(StatusCode::OK, page(title, None, &body));
        let c = format!("{CSRF_COOKIE}={t}; {}; Max-Age=3600", self.cookie_attrs());
        if let Ok(v) = HeaderValue::from_str(&c) {
            r.headers_mut().append(header::SET_COOKIE, v);
        }
        Ok(r)
    }

    fn check_anonymous_csrf(
        headers: &HeaderMap,
        fields: &HashMap<String, String>,
    ) -> Result<(), PortalError> {
        match (cookie(CSRF_COOKIE, headers), fields.get("csrf")) {
            (Some(c), Some(f)) if c.len() == 64 && ct_eq(&c, f) => Ok(()),
            _ => Err(PortalError::Csrf),
        }
    }
}

const SIGNUP_FIELDS: &str = "<label>Name <input name=\"name\" required maxlength=\"100\"></label>\
<label>Email <input name=\"email\" type=\"email\" required maxlength=\"254\"></label>\
<label>Password (12 characters or more) <input name=\"password\" type=\"password\" required minlength=\"12\" maxlength=\"1024\"></label>";

const SIGNIN_FIELDS: &str = "<label>Email <input name=\"email\" type=\"email\" required></label>\
<label>Password <input name=\"password\" type=\"password\" required></label>";

async fn signup_form(State(portal): State<Arc<Portal>>) -> PortalResult {
    portal.anonymous_form("Sign up", "/signup", SIGNUP_FIELDS, "")
}

fn valid_email(e: &str) -> bool {
    let Some((local, domain)) = e.split_once('@') else {
        return false;
    };
    e.len() <= 254
        && !local.is_empty()
        && local.len() <= 64
        && local
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b"\"(),:;<>@[\\]".contains(&b))
        && domain.contains('.')
        && domain
            .split('.')
            .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
}

async fn signup(
    State(portal): State<Arc<Portal>>,
    headers: HeaderMap,
    body: Bytes,
) -> PortalResult {
    let f = form(&body);
    Portal::check_anonymous_csrf(&headers, &f)?;
    let get = |k: &str| f.get(k).map(|s| s.trim().to_owned()).unwrap_or_default();
    let (name, email, password) = (
        get("name"),
        get("email").to_ascii_lowercase(),
        f.get("password").cloned().unwrap_or_default(),
    );
    if !valid_email(&email) {
        return Err(PortalError::Invalid("enter a valid email address".into()));
    }
    if name.is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
        return Err(PortalError::Invalid(
            "enter a name of up to 100 characters".into(),
        ));
    }
    if password.chars().count() < MIN_PASSWORD || password.len() > 1024 {
        return Err(PortalError::Invalid(format!(
            "the password must have {MIN_PASSWORD} to 1024 characters"
        )));
    }
    let hash = tokio::task::spawn_blocking(move || hash_password(&password))
        .await
        .map_err(|e| PortalError::Unavailable(e.to_string()))??;
    let status = if portal.opts.auto_approve {
        DeveloperStatus::Active
    } else {
        DeveloperStatus::Pending
    };
    portal
        .accounts
        .create(&Developer {
            email: email.clone(),
            name,
            password_hash: Some(hash),
            status,
            products: vec![],
            created_at: now_ms(),
            revision: 0,
        })
        .await?;
    tracing::info!(developer = %email, ?status, "portal: developer signed up");
    let note = if status == DeveloperStatus::Active {
        "Your account is ready: sign in."
    } else {
        "Your account waits for approval by the API team; sign in once it is approved."
    };
    Ok(html_response(
        StatusCode::OK,
        page(
            "Signed up",
            None,
            &format!(
                "<p class=\"flash\" id=\"signed-up\">{}</p><p><a href=\"/signin\">Sign in</a></p>",
                esc(note)
            ),
        ),
    ))
}

async fn signin_form(State(portal): State<Arc<Portal>>) -> PortalResult {
    let note = if portal.oidc.is_some() {
        "<p><a href=\"/oidc/start\" id=\"oidc\">Sign in with your company account</a></p>"
    } else {
        ""
    };
    portal.anonymous_form("Sign in", "/signin", SIGNIN_FIELDS, note)
}

/// The OpenID Connect flow's cookie: `state.nonce`, for ten minutes.
pub const OIDC_COOKIE: &str = "tg_portal_oidc";

async fn oidc_start(State(portal): State<Arc<Portal>>) -> PortalResult {
    let o = portal.oidc.as_ref().ok_or(PortalError::NotFound)?;
    let (state, nonce) = (accounts::token()?, accounts::token()?);
    let url = o.authorize_url(&state, &nonce).await.map_err(|e| {
        tracing::warn!(error = %e, "portal: OpenID Connect start failed");
        PortalError::Unavailable(e.to_string())
    })?;
    let mut r = see_other(&url);
    let secure = if portal.opts.secure_cookies {
        "; Secure"
    } else {
        ""
    };
    let c = format!(
        "{OIDC_COOKIE}={state}.{nonce}; Path=/oidc; HttpOnly; SameSite=Lax; Max-Age=600{secure}"
    );
    if let Ok(v) = HeaderValue::from_str(&c) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
    Ok(r)
}

async fn oidc_callback(
    State(portal): State<Arc<Portal>>,
    axum::extract::RawQuery(q): axum::extract::RawQuery,
    headers: HeaderMap,
) -> PortalResult {
    let o = portal.oidc.as_ref().ok_or(PortalError::NotFound)?;
    let f = form(q.unwrap_or_default().as_bytes());
    let cookie = cookie(OIDC_COOKIE, &headers).unwrap_or_default();
    let (state, nonce) = cookie.split_once('.').ok_or(PortalError::Csrf)?;
    match f.get("state") {
        Some(s) if state.len() == 64 && ct_eq(s, state) => {}
        _ => return Err(PortalError::Csrf),
    }
    let code = f
        .get("code")
        .ok_or_else(|| PortalError::Invalid("the identity provider sent no code".into()))?;
    let id = o.complete(code, nonce).await.map_err(|e| {
        tracing::warn!(error = %e, "portal: OpenID Connect sign-in refused");
        match e {
            oidc::OidcError::Provider(m) => PortalError::Unavailable(m),
            oidc::OidcError::Invalid(_) => {
                PortalError::Invalid("the sign-in could not be verified".into())
            }
        }
    })?;
    let dev = match portal.accounts.developer(&id.email).await? {
        Some(d) => d,
        None => {
            let d = Developer {
                email: id.email.clone(),
                name: id.name.clone(),
                password_hash: None,
                status: if portal.opts.auto_approve {
                    DeveloperStatus::Active
                } else {
                    DeveloperStatus::Pending
                },
                products: vec![],
                created_at: now_ms(),
                revision: 0,
            };
            portal.accounts.create(&d).await?;
            tracing::info!(developer = %d.email, "portal: developer signed up through OpenID Connect");
            d
        }
    };
    match dev.status {
        DeveloperStatus::Active => {}
        DeveloperStatus::Pending => {
            return Err(PortalError::Invalid(
                "your account waits for approval".into(),
            ))
        }
        DeveloperStatus::Suspended => {
            return Err(PortalError::Invalid("your account is suspended".into()))
        }
    }
    let ttl = i64::try_from(portal.opts.session_ttl.as_millis()).unwrap_or(i64::MAX);
    let (token, _) = portal.accounts.start_session(&dev.email, ttl).await?;
    // A page, not a redirect: the browser arrived from the provider (a cross-site
    // navigation), and the `Strict` session cookie is only sent on the next, same-site one.
    let mut r = html_response(
        StatusCode::OK,
        page(
            "Signed in",
            None,
            "<meta http-equiv=\"refresh\" content=\"0;url=/apps\"><p class=\"flash\">Signed in. <a href=\"/apps\" id=\"continue\">Continue to your apps</a></p>",
        ),
    );
    for c in [
        format!(
            "{SESSION_COOKIE}={token}; {}; Max-Age={}",
            portal.cookie_attrs(),
            portal.opts.session_ttl.as_secs()
        ),
        format!("{OIDC_COOKIE}=; Path=/oidc; HttpOnly; SameSite=Lax; Max-Age=0"),
    ] {
        if let Ok(v) = HeaderValue::from_str(&c) {
            r.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    tracing::info!(developer = %dev.email, "portal: signed in through OpenID Connect");
    Ok(r)
}

fn client_address(info: Option<&ConnectInfo<SocketAddr>>) -> String {
    info.map_or_else(|| "unknown".to_owned(), |c| c.0.ip().to_string())
}

async fn signin(
    State(portal): State<Arc<Portal>>,
    info: Option<axum::Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    body: Bytes,
) -> PortalResult {
    let f = form(&body);
    Portal::check_anonymous_csrf(&headers, &f)?;
    let email = f
        .get("email")
        .map(|s| s.trim().to_ascii_lowercase())
        .unwrap_or_default();
    let password = f.get("password").cloned().unwrap_or_default();
    let address = client_address(info.as_ref().map(|e| &e.0));
    let now = now_ms();
    if !portal.throttle.allowed(&email, &address, now) {
        tracing::warn!(developer = %email, %address, "portal: sign-in throttled");
        return Err(PortalError::Throttled);
    }
    let dev = portal.accounts.developer(&email).await?;
    let hash = dev
        .as_ref()
        .and_then(|d| d.password_hash.clone())
        .unwrap_or_else(|| dummy_hash().to_owned());
    let ok = tokio::task::spawn_blocking(move || verify_password(&hash, &password))
        .await
        .unwrap_or(false);
    let dev = match dev {
        Some(d) if ok && d.password_hash.is_some() => d,
        _ => {
            portal.throttle.failed(&email, &address, now);
            return Err(PortalError::Invalid("wrong email or password".into()));
        }
    };
    portal.throttle.succeeded(&email);
    match dev.status {
        DeveloperStatus::Active => {}
        DeveloperStatus::Pending => {
            return Err(PortalError::Invalid(
                "your account waits for approval".into(),
            ))
        }
        DeveloperStatus::Suspended => {
            return Err(PortalError::Invalid("your account is suspended".into()))
        }
    }
    let ttl = i64::try_from(portal.opts.session_ttl.as_millis()).unwrap_or(i64::MAX);
    let (token, _) = portal.accounts.start_session(&dev.email, ttl).await?;
    let mut r = see_other("/apps");
    let c = format!(
        "{SESSION_COOKIE}={token}; {}; Max-Age={}",
        portal.cookie_attrs(),
        portal.opts.session_ttl.as_secs()
    );
    if let Ok(v) = HeaderValue::from_str(&c) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
    tracing::info!(developer = %dev.email, "portal: signed in");
    Ok(r)
}

async fn signout(
    State(portal): State<Arc<Portal>>,
    headers: HeaderMap,
    body: Bytes,
) -> PortalResult {
    let v = portal.acting(&headers, &form(&body)).await?;
    portal.accounts.end_session(&v.token).await?;
    let mut r = see_other("/");
    let c = format!("{SESSION_COOKIE}=; {}; Max-Age=0", portal.cookie_attrs());
    if let Ok(v) = HeaderValue::from_str(&c) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
    Ok(r)
}

// --- apps --------------------------------------------------------------------------------

fn display_name(a: &App) -> &str {
    a.attributes
        .get("displayName")
        .map(String::as_str)
        .unwrap_or(&a.name)
}

fn status_class(s: KeyStatus) -> &'static str {
    match s {
        KeyStatus::Approved => "approved",
        KeyStatus::Revoked => "revoked",
        KeyStatus::Pending => "pending",
    }
}

async fn apps_page(State(portal): State<Arc<Portal>>, headers: HeaderMap) -> PortalResult {
    let v = portal.viewer(&headers).await?.ok_or(PortalError::SignIn)?;
    let apps = portal.consumers.apps_of(&v.developer.email);
    let mut body = String::from(
        "<h1>My apps</h1><table class=\"apps\"><tr><th>App</th><th>Products</th><th>Keys</th></tr>",
    );
    for a in &apps {
        let _ = write!(
            body,
            "<tr><td><a href=\"/apps/{}\">{}</a></td><td>{}</td><td>{}</td></tr>",
            esc(&url_seg(&a.name)),
            esc(display_name(a)),
            esc(&a.products.join(", ")),
            a.keys.len()
        );
    }
    let _ = write!(
        body,
        "</table><form class=\"card\" method=\"post\" action=\"/apps\">{}<label>New app name <input name=\"name\" required maxlength=\"60\"></label><button type=\"submit\" id=\"create-app\">Create app</button></form>",
        csrf_field(&v.session.csrf)
    );
    Ok(portal.page_for("My apps", Some(&v), &body))
}

fn slug(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') && !out.is_empty() {
            out.push('-');
        }
        if out.len() >= 40 {
            break;
        }
    }
    let out = out.trim_end_matches('-').to_owned();
    if out.is_empty() {
        "app".into()
    } else {
        out
    }
}

async fn create_app(
    State(portal): State<Arc<Portal>>,
    headers: HeaderMap,
    body: Bytes,
) -> PortalResult {
    let f = form(&body);
    let v = portal.acting(&headers, &f).await?;
    let display = f.get("name").map(|s| s.trim()).unwrap_or_default();
    if display.is_empty() || display.chars().count() > 60 || display.chars().any(char::is_control) {
        return Err(PortalError::Invalid(
            "enter an app name of up to 60 characters".into(),
        ));
    }
    // App names are global; a random suffix keeps developers from colliding (or probing
    // each other's names).
    let name = format!("{}-{}", slug(display), hex(&random::<4>()?));
    let app = App {
        name: name.clone(),
        developer_email: v.developer.email.clone(),
        status: Default::default(),
        products: vec![],
        keys: vec![],
        attributes: [("displayName".to_owned(), display.to_owned())].into(),
        origin: Origin::Api,
        revision: 0,
    };
    match portal.consumers.store().put_app(&app, Write::Create).await {
        Ok(()) => {}
        Err(StoreError::AlreadyExists { .. }) => {
            return Err(PortalError::Invalid("try again".into()))
        }
        Err(e) => return Err(e.into()),
    }
    tracing::info!(developer = %v.developer.email, app = %name, "portal: app created");
    Ok(see_other(&format!("/apps/{}", url_seg(&name))))
}

impl Portal {
    /// The app `name` if the viewer owns it; 404 otherwise (same as a missing app).
    async fn owned_app(&self, v: &Viewer, name: &str) -> Result<App, PortalError> {
        let (_, file_apps) = self.consumers.file_objects();
        let app = match file_apps.into_iter().find(|a| a.name == name) {
            Some(mut a) => {
                a.origin = Origin::File;
                Some(a)
            }
            None => self.consumers.store().get_app(name).await?,
        };
        match app {
            Some(a) if a.developer_email.eq_ignore_ascii_case(&v.developer.email) => Ok(a),
            _ => Err(PortalError::NotFound),
        }
    }

    /// Read-modify-write of an owned store app, retried on a concurrent write.
    async fn update_app<R>(
        &self,
        v: &Viewer,
        name: &str,
        mut change: impl FnMut(&mut App) -> Result<R, PortalError>,
    ) -> Result<R, PortalError> {
        let _w = self.write.lock().await;
        for _ in 0..5 {
            let mut app = self.owned_app(v, name).await?;
            if app.origin == Origin::File {
                return Err(PortalError::Invalid(
                    "this app is defined in a configuration file and cannot be changed here".into(),
                ));
            }
            let r = change(&mut app)?;
            match self.consumers.store().put_app(&app, Write::Update).await {
                Ok(()) => return Ok(r),
                Err(StoreError::Conflict { .. }) => continue,
                Err(StoreError::NotFound { .. }) => return Err(PortalError::NotFound),
                Err(e) => return Err(e.into()),
            }
        }
        Err(PortalError::Unavailable(
            "too many concurrent writes".into(),
        ))
    }

    fn needs_approval(&self, app: &App) -> bool {
        let index = self.consumers.index();
        app.products.iter().any(|p| {
            index
                .product(p)
                .is_some_and(|p| p.spec.approval_type == ApprovalType::Manual)
        })
    }

    fn usage_chart(&self, rep: &crate::usage::Report) -> String {
        let points = rep
            .series
            .first()
            .map(|s| s.points.as_slice())
            .unwrap_or(&[]);
        let labels = points
            .iter()
            .map(|p| p.start.get(11..16).unwrap_or(&p.start).to_owned())
            .collect();
        let values: Vec<i64> = points.iter().map(|p| p.requests).collect();
        let total: i64 = values.iter().sum();
        let tokens: i64 = points.iter().map(|p| p.total_tokens).sum();
        format!(
            "<p id=\"usage-total\">Requests in the last 24 hours: <strong>{total}</strong>; tokens: {tokens}</p>{}",
            html::bar_chart(&html::Bars {
                title: "Requests per hour (UTC)",
                labels,
                values,
            })
        )
    }
}

/// The app page's HTML (what `GET /apps/{name}` shows, without the frame).
pub fn render_app(
    portal: &Portal,
    dev: &Developer,
    csrf: &str,
    app: &App,
    usage: Option<&crate::usage::Report>,
    new_key: Option<&str>,
) -> String {
    let mut body = String::with_capacity(8192);
    let name = esc(&url_seg(&app.name)).to_string();
    let _ = write!(
        body,
        "<h1>{}</h1><p>App id <code id=\"app-id\">{}</code></p>",
        esc(display_name(app)),
        esc(&app.name)
    );
    if let Some(k) = new_key {
        let _ = write!(
            body,
            "<div class=\"flash\"><p>Your new key — copy it now, it is not shown again:</p><p><code id=\"new-key\">{}</code></p></div>",
            esc(k)
        );
    }
    let csrf_f = csrf_field(csrf);
    body.push_str("<div class=\"card\"><h2>Products</h2><ul>");
    for p in &app.products {
        let _ = write!(
            body,
            "<li><a href=\"/products/{}\">{}</a></li>",
            esc(&url_seg(p)),
            esc(p)
        );
    }
    body.push_str("</ul>");
    if app.origin == Origin::Api {
        let candidates: Vec<ApiProduct> = portal
            .consumers
            .products()
            .into_iter()
            .filter(|p| visible(p, Some(dev)) && !app.products.contains(&p.name))
            .collect();
        if !candidates.is_empty() {
            let _ = write!(
                body,
                "<form method=\"post\" action=\"/apps/{name}/subscribe\">{csrf_f}<select name=\"product\" id=\"product-select\">"
            );
            for p in &candidates {
                let _ = write!(
                    body,
                    "<option value=\"{}\">{}{}</option>",
                    esc(&p.name),
                    esc(&p.name),
                    if p.approval_type == ApprovalType::Manual {
                        " (needs approval)"
                    } else {
                        ""
                    }
                );
            }
            body.push_str(
                "</select> <button type=\"submit\" id=\"subscribe\">Subscribe</button></form>",
            );
        }
    }
    body.push_str("</div><div class=\"card\"><h2>Keys</h2><table class=\"keys\"><tr><th>Key id</th><th>Status</th><th>Created</th><th></th></tr>");
    for k in &app.keys {
        let expired = k.expires_at.is_some_and(|e| e <= now_ms());
        let _ = write!(
            body,
            "<tr><td><code>{}</code></td><td class=\"{}\">{}{}</td><td>{}</td><td>",
            esc(&k.id),
            status_class(k.status),
            match k.status {
                KeyStatus::Approved => "approved",
                KeyStatus::Revoked => "revoked",
                KeyStatus::Pending => "pending approval",
            },
            if expired { " (expired)" } else { "" },
            esc(&crate::telemetry::analytics::rfc3339_ms(
                std::time::UNIX_EPOCH
                    + Duration::from_millis(u64::try_from(k.created_at).unwrap_or(0))
            ))
        );
        if app.origin == Origin::Api && k.status != KeyStatus::Revoked {
            let id = esc(&url_seg(&k.id)).to_string();
            let _ = write!(
                body,
                "<form method=\"post\" action=\"/apps/{name}/keys/{id}/rotate\" style=\"display:inline\">{csrf_f}<button type=\"submit\">Rotate</button></form> \
<form method=\"post\" action=\"/apps/{name}/keys/{id}/revoke\" style=\"display:inline\">{csrf_f}<button type=\"submit\">Revoke</button></form>"
            );
        }
        body.push_str("</td></tr>");
    }
    body.push_str("</table>");
    if app.origin == Origin::Api {
        let _ = write!(
            body,
            "<form method=\"post\" action=\"/apps/{name}/keys\">{csrf_f}<button type=\"submit\" id=\"new-key-button\">New key</button></form>"
        );
    }
    body.push_str("</div><div class=\"card\" id=\"usage\"><h2>Usage</h2>");
    match usage {
        Some(r) => body.push_str(&portal.usage_chart(r)),
        None => body.push_str("<p>Usage is not recorded on this server.</p>"),
    }
    body.push_str("</div>");
    // MONEY SLOT: plan subscription, spend chart and statement downloads (f19-money).
    body.push_str("<div class=\"card\" id=\"money\">");
    match portal.money.app_money(&dev.email, app, csrf) {
        Some(m) => body.push_str(&m),
        None => body.push_str(
            "<h2>Plans and spend</h2><p class=\"slot\">Rate plans, spend and statements are not enabled on this server.</p>",
        ),
    }
    body.push_str("</div>");
    body
}

async fn app_page_with(
    portal: &Portal,
    v: &Viewer,
    name: &str,
    new_key: Option<&str>,
) -> PortalResult {
    let app = portal.owned_app(v, name).await?;
    let usage = match &portal.ledger {
        Some(l) => {
            let now = now_ms();
            let q = crate::usage::Query {
                by: crate::usage::Dim::App,
                granularity: crate::usage::Granularity::Hour,
                from_ms: now - 23 * 3_600_000,
                to_ms: now,
                name: Some(app.name.clone()),
            };
            match l.report(&q).await {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!(error = %e, "portal: usage report failed");
                    None
                }
            }
        }
        None => None,
    };
    let body = render_app(
        portal,
        &v.developer,
        &v.session.csrf,
        &app,
        usage.as_ref(),
        new_key,
    );
    Ok(portal.page_for(display_name(&app), Some(v), &body))
}

async fn app_page(
    State(portal): State<Arc<Portal>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> PortalResult {
    let v = portal.viewer(&headers).await?.ok_or(PortalError::SignIn)?;
    app_page_with(&portal, &v, &name, None).await
}

fn new_key(status: KeyStatus) -> Result<(ApiKey, String), PortalError> {
    let key = format!("tg_{}", URL_SAFE_NO_PAD.encode(random::<32>()?));
    Ok((
        ApiKey {
            id: format!("key_{}", hex(&random::<8>()?)),
            hash: hash_key(&key),
            status,
            expires_at: None,
            created_at: now_ms(),
        },
        key,
    ))
}

async fn create_key(
    State(portal): State<Arc<Portal>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> PortalResult {
    let v = portal.acting(&headers, &form(&body)).await?;
    let p = &portal;
    let key = portal
        .update_app(&v, &name, |app| {
            let status = if p.needs_approval(app) {
                KeyStatus::Pending
            } else {
                KeyStatus::Approved
            };
            let (k, clear) = new_key(status)?;
            app.keys.push(k);
            Ok(clear)
        })
        .await?;
    tracing::info!(developer = %v.developer.email, app = %name, "portal: key created");
    app_page_with(&portal, &v, &name, Some(&key)).await
}

async fn key_action(
    State(portal): State<Arc<Portal>>,
    Path((name, id, action)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> PortalResult {
    let v = portal.acting(&headers, &form(&body)).await?;
    let rotate = match action.as_str() {
        "rotate" => true,
        "revoke" => false,
        _ => return Err(PortalError::NotFound),
    };
    let p = &portal;
    let clear = portal
        .update_app(&v, &name, |app| {
            let needs = p.needs_approval(app);
            let k = app
                .keys
                .iter_mut()
                .find(|k| k.id == id)
                .ok_or(PortalError::NotFound)?;
            let was = k.status;
            k.status = KeyStatus::Revoked;
            if !rotate {
                return Ok(None);
            }
            // The new key keeps a pending key pending; an approved one stays approved
            // unless a product now needs approval.
            let status = if was == KeyStatus::Pending || needs {
                KeyStatus::Pending
            } else {
                KeyStatus::Approved
            };
            let (k, clear) = new_key(status)?;
            app.keys.push(k);
            Ok(Some(clear))
        })
        .await?;
    tracing::info!(developer = %v.developer.email, app = %name, key_id = %id, %action, "portal: key changed");
    match clear {
        Some(k) => app_page_with(&portal, &v, &name, Some(&k)).await,
        None => Ok(see_other(&format!("/apps/{}", url_seg(&name)))),
    }
}

async fn subscribe_to(portal: &Portal, v: &Viewer, name: &str, product: &str) -> PortalResult {
    let p = portal
        .consumers
        .products()
        .into_iter()
        .find(|p| p.name == product && visible(p, Some(&v.developer)))
        .ok_or(PortalError::NotFound)?;
    let manual = p.approval_type == ApprovalType::Manual;
    portal
        .update_app(v, name, |app| {
            if !app.products.contains(&p.name) {
                app.products.push(p.name.clone());
            }
            if manual {
                for k in &mut app.keys {
                    if k.status == KeyStatus::Approved {
                        k.status = KeyStatus::Pending;
                    }
                }
            }
            Ok(())
        })
        .await?;
    tracing::info!(developer = %v.developer.email, app = %name, product = %p.name, manual, "portal: app subscribed");
    Ok(see_other(&format!("/apps/{}", url_seg(name))))
}

async fn subscribe(
    State(portal): State<Arc<Portal>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> PortalResult {
    let f = form(&body);
    let v = portal.acting(&headers, &f).await?;
    let product = f.get("product").cloned().unwrap_or_default();
    subscribe_to(&portal, &v, &name, &product).await
}

/// The product page's subscribe form (app chosen in the form).
async fn subscribe_from_product(
    State(portal): State<Arc<Portal>>,
    headers: HeaderMap,
    body: Bytes,
) -> PortalResult {
    let f = form(&body);
    let v = portal.acting(&headers, &f).await?;
    let (app, product) = (
        f.get("app").cloned().unwrap_or_default(),
        f.get("product").cloned().unwrap_or_default(),
    );
    subscribe_to(&portal, &v, &app, &product).await
}

async fn not_found() -> PortalError {
    PortalError::NotFound
}

/// The portal's routes.
pub fn router(portal: Arc<Portal>) -> Router {
    Router::new()
        .route("/", get(catalog))
        .route("/products/{name}", get(product_page))
        .route("/signup", get(signup_form).post(signup))
        .route("/signin", get(signin_form).post(signin))
        .route("/signout", post(signout))
        .route("/oidc/start", get(oidc_start))
        .route("/oidc/callback", get(oidc_callback))
        .route("/apps", get(apps_page).post(create_app))
        .route("/apps/{name}", get(app_page))
        .route("/apps/{name}/keys", post(create_key))
        .route("/apps/{name}/keys/{id}/{action}", post(key_action))
        .route("/apps/{name}/subscribe", post(subscribe))
        .route("/subscribe", post(subscribe_from_product))
        .route("/healthz", get(|| async { "ok\n" }))
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(FORM_LIMIT))
        .with_state(portal)
}

#[cfg(test)]
mod tests;
