//! Flow variables: the per-exchange state that conditions, templates and policies read and
//! write. Names are Apigee-style dotted paths (`request.header.x-api-key`, `client_id`,
//! `ratelimit.<policy>.remaining`). One resolver answers every name, for templates, CEL
//! conditions and scripts alike ([`Exchange::resolve`]): built-in names ([`Builtin`]) are
//! computed from the request and response, the names policies publish are generated from the
//! typed per-exchange state ([`state::State`]) when asked for, and explicit variables
//! (AssignMessage `assignVariables`, scripts) live in a flat map.

pub mod state;

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::direction::Direction;

/// A flow variable's value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
}

impl Value {
    pub fn as_text(&self) -> Cow<'_, str> {
        match self {
            Value::Str(s) => Cow::Borrowed(s),
            Value::Int(i) => Cow::Owned(i.to_string()),
            Value::Float(f) => Cow::Owned(f.to_string()),
            Value::Bool(b) => Cow::Borrowed(if *b { "true" } else { "false" }),
        }
    }
}

impl Value {
    pub fn as_ref(&self) -> ValueRef<'_> {
        match self {
            Value::Str(s) => ValueRef::Str(s),
            Value::Int(i) => ValueRef::Int(*i),
            Value::Float(f) => ValueRef::Float(*f),
            Value::Bool(b) => ValueRef::Bool(*b),
        }
    }
}

/// A borrowed flow variable value: what [`Exchange::var`] returns, so reading a variable
/// generated from the typed state copies nothing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ValueRef<'a> {
    Str(&'a str),
    Int(i64),
    Float(f64),
    Bool(bool),
}

impl<'a> ValueRef<'a> {
    pub fn as_text(self) -> Cow<'a, str> {
        match self {
            ValueRef::Str(s) => Cow::Borrowed(s),
            ValueRef::Int(i) => Cow::Owned(i.to_string()),
            ValueRef::Float(f) => Cow::Owned(f.to_string()),
            ValueRef::Bool(b) => Cow::Borrowed(if b { "true" } else { "false" }),
        }
    }

    pub fn to_value(self) -> Value {
        match self {
            ValueRef::Str(s) => Value::Str(s.to_owned()),
            ValueRef::Int(i) => Value::Int(i),
            ValueRef::Float(f) => Value::Float(f),
            ValueRef::Bool(b) => Value::Bool(b),
        }
    }
}

/// A resolved flow variable: text borrowed from the exchange where it holds it, numbers and
/// booleans as themselves (`response.status` is a number in CEL, `200` in a template).
#[derive(Debug, Clone, PartialEq)]
pub enum Resolved<'a> {
    Text(Cow<'a, str>),
    Int(i64),
    Float(f64),
    Bool(bool),
}

impl<'a> Resolved<'a> {
    pub fn into_text(self) -> Cow<'a, str> {
        match self {
            Resolved::Text(s) => s,
            Resolved::Int(i) => Cow::Owned(i.to_string()),
            Resolved::Float(f) => Cow::Owned(f.to_string()),
            Resolved::Bool(b) => Cow::Borrowed(if b { "true" } else { "false" }),
        }
    }
}

impl<'a> From<ValueRef<'a>> for Resolved<'a> {
    fn from(v: ValueRef<'a>) -> Self {
        match v {
            ValueRef::Str(s) => Resolved::Text(Cow::Borrowed(s)),
            ValueRef::Int(i) => Resolved::Int(i),
            ValueRef::Float(f) => Resolved::Float(f),
            ValueRef::Bool(b) => Resolved::Bool(b),
        }
    }
}

/// The built-in names, computed from the request and response: one table for templates,
/// conditions and scripts. Apigee's names and the short ones are synonyms
/// (`request.verb`/`request.method`, `request.queryparam.x`/`request.query.x`,
/// `response.status.code`/`response.status`/`response.code`, `request.headers.x`/
/// `request.header.x`, `client.address`/`client.ip`).
///
/// - `request.host` is the `:authority` (or `Host`) as the client sent it, port included:
///   Envoy's `request.host` attribute, and what Apigee gives as `request.header.host`.
/// - A query parameter sent more than once is its first value, as Apigee's
///   `request.queryparam.x`; a header, its first value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Builtin<'n> {
    Method,
    Path,
    Uri,
    Host,
    Scheme,
    QueryString,
    RequestContent,
    /// Case-insensitive name.
    RequestHeader(&'n str),
    /// Percent-decoded name.
    QueryParam(&'n str),
    Status,
    ResponseContent,
    ResponseHeader(&'n str),
    FlowName,
    ClientIp,
    /// `request.header.<h>.values` (`[a, b]`), `.values.count`, `.values.string`: every
    /// value of the header, each line split at commas as Apigee does.
    RequestHeaderValues(&'n str, HeaderValues),
    /// `request.formparam.<name>`: a field of an `application/x-www-form-urlencoded`
    /// request body (first value, decoded); unset without a held body.
    FormParam(&'n str),
    /// `request.formstring`: the form body as sent.
    FormString,
    /// `proxy.basepath`: the flow's `basePath` (`/` without one).
    ProxyBasePath,
    /// `proxy.pathsuffix`: the request path after the base path; unset when the path is
    /// not under it.
    ProxyPathSuffix,
    /// `messageid`: an id unique to the exchange (a random UUID, made on first use).
    MessageId,
    /// Apigee's `message.*`, the message being processed: the response once there is one
    /// (in a fault rule, the error response), else the request. `message.content`,
    /// `message.header.<h>`, `message.status.code`, `message.verb`, `message.path`,
    /// `message.uri`.
    Message(MessageField<'n>),
    /// `system.timestamp`: now, in milliseconds since the epoch.
    SystemTimestamp,
    /// The fault a flow's fault rules handle (see `pipeline::faults`): `fault.name`,
    /// `fault.code`, `fault.reason`, `fault.policy`, `fault.category`, `error.message`,
    /// `error.status.code`, `error.reason.phrase`, `error.content`, `error.header.<h>`,
    /// `is.error`; unset outside fault handling.
    Fault(FaultField<'n>),
}

/// A `message.*` name (see [`Builtin::Message`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageField<'n> {
    Content,
    Header(&'n str),
    Status,
    Verb,
    Path,
    Uri,
}

/// Which view of a header's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderValues {
    List,
    Count,
    Joined,
}

/// A fault-handling name (see [`Builtin::Fault`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultField<'n> {
    Name,
    Code,
    Reason,
    Policy,
    Category,
    Status,
    Phrase,
    Content,
    Header(&'n str),
    IsError,
}

impl<'n> Builtin<'n> {
    pub fn parse(name: &'n str) -> Option<Self> {
        if let Some(rest) = name.strip_prefix("request.") {
            return Some(match rest {
                "method" | "verb" => Builtin::Method,
                "path" => Builtin::Path,
                "uri" => Builtin::Uri,
                "host" => Builtin::Host,
                "scheme" => Builtin::Scheme,
                "querystring" => Builtin::QueryString,
                "content" => Builtin::RequestContent,
                _ => {
                    if let Some(h) = rest
                        .strip_prefix("header.")
                        .or_else(|| rest.strip_prefix("headers."))
                    {
                        for (suffix, view) in [
                            (".values", HeaderValues::List),
                            (".values.count", HeaderValues::Count),
                            (".values.string", HeaderValues::Joined),
                        ] {
                            if let Some(n) = h.strip_suffix(suffix) {
                                return Some(Builtin::RequestHeaderValues(n, view));
                            }
                        }
                        return Some(Builtin::RequestHeader(h));
                    }
                    if let Some(f) = rest.strip_prefix("formparam.") {
                        return Some(Builtin::FormParam(f));
                    }
                    if rest == "formstring" {
                        return Some(Builtin::FormString);
                    }
                    let q = rest
                        .strip_prefix("query.")
                        .or_else(|| rest.strip_prefix("queryparam."))?;
                    Builtin::QueryParam(q)
                }
            });
        }
        if let Some(rest) = name.strip_prefix("response.") {
            return Some(match rest {
                "status" | "status.code" | "code" => Builtin::Status,
                "content" => Builtin::ResponseContent,
                _ => Builtin::ResponseHeader(
                    rest.strip_prefix("header.")
                        .or_else(|| rest.strip_prefix("headers."))?,
                ),
            });
        }
        if let Some(rest) = name.strip_prefix("message.") {
            return Some(Builtin::Message(match rest {
                "content" => MessageField::Content,
                "status.code" | "status" => MessageField::Status,
                "verb" => MessageField::Verb,
                "path" => MessageField::Path,
                "uri" => MessageField::Uri,
                _ => MessageField::Header(
                    rest.strip_prefix("header.")
                        .or_else(|| rest.strip_prefix("headers."))?,
                ),
            }));
        }
        if let Some(rest) = name.strip_prefix("fault.") {
            return Some(Builtin::Fault(match rest {
                "name" => FaultField::Name,
                "code" => FaultField::Code,
                "reason" => FaultField::Reason,
                "policy" => FaultField::Policy,
                "category" => FaultField::Category,
                _ => return None,
            }));
        }
        if let Some(rest) = name.strip_prefix("error.") {
            return Some(Builtin::Fault(match rest {
                "message" => FaultField::Reason,
                "status.code" | "status" => FaultField::Status,
                "reason.phrase" => FaultField::Phrase,
                "content" => FaultField::Content,
                _ => FaultField::Header(rest.strip_prefix("header.")?),
            }));
        }
        match name {
            "flow.name" => Some(Builtin::FlowName),
            "client.ip" | "client.address" => Some(Builtin::ClientIp),
            "proxy.basepath" => Some(Builtin::ProxyBasePath),
            "proxy.pathsuffix" => Some(Builtin::ProxyPathSuffix),
            "messageid" => Some(Builtin::MessageId),
            "system.timestamp" => Some(Builtin::SystemTimestamp),
            "is.error" => Some(Builtin::Fault(FaultField::IsError)),
            _ => None,
        }
    }
}

/// Index of `dir`'s body in per-direction arrays.
fn body_index(dir: Direction) -> usize {
    match dir {
        Direction::Request => 0,
        Direction::Response => 1,
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.as_text())
    }
}

/// A JSON value as a flow variable: scalars as themselves (`null` as empty text), arrays
/// and objects as their JSON text.
impl From<&serde_json::Value> for Value {
    fn from(v: &serde_json::Value) -> Self {
        match v {
            serde_json::Value::String(s) => Value::Str(s.clone()),
            serde_json::Value::Bool(b) => Value::Bool(*b),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => Value::Int(i),
                None => Value::Float(n.as_f64().unwrap_or_default()),
            },
            serde_json::Value::Null => Value::Str(String::new()),
            other => Value::Str(other.to_string()),
        }
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::Str(s.to_owned())
    }
}
impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::Str(s)
    }
}
impl From<i64> for Value {
    fn from(i: i64) -> Self {
        Value::Int(i)
    }
}
impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Bool(b)
    }
}

/// HTTP headers as Envoy sent them: lower-case names (HTTP/2 style, pseudo-headers included),
/// values decoded lossily from `raw_value` for reading. The original bytes are never needed:
/// tollgate only ever sends mutations, not the full header map.
#[derive(Debug, Clone, Default)]
pub struct Headers {
    entries: Vec<(String, String)>,
}

impl Headers {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_capacity(n: usize) -> Self {
        Self {
            entries: Vec::with_capacity(n),
        }
    }

    /// Appends a header; `name` must already be lower case.
    pub fn push(&mut self, name: String, value: String) {
        self.entries.push((name, value));
    }

    /// First value of `name` (case-insensitive).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Replaces every value of `name` with one value.
    pub fn set(&mut self, name: &str, value: String) {
        let name = lower_case(name);
        // Reuse the name of a value being replaced rather than allocate a new one.
        let mut reused = None;
        self.entries.retain_mut(|(n, _)| {
            if !n.eq_ignore_ascii_case(&name) {
                return true;
            }
            if reused.is_none() && *n == *name {
                reused = Some(std::mem::take(n));
            }
            false
        });
        let name = reused.unwrap_or_else(|| name.into_owned());
        self.entries.push((name, value));
    }

    pub fn append(&mut self, name: &str, value: String) {
        self.entries.push((lower_case(name).into_owned(), value));
    }

    pub fn remove(&mut self, name: &str) {
        self.entries.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// `name` in lower case, borrowed when it already is (header names from Envoy and from
/// policy specs are).
pub fn lower_case(name: &str) -> Cow<'_, str> {
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(name.to_ascii_lowercase())
    } else {
        Cow::Borrowed(name)
    }
}

/// The request as seen on the request-headers message.
#[derive(Debug, Clone, Default)]
pub struct RequestInfo {
    pub method: String,
    /// `:path` as sent: path plus query string.
    pub uri: String,
    pub host: String,
    pub scheme: String,
    pub headers: Headers,
}

impl RequestInfo {
    pub fn from_headers(headers: Headers) -> Self {
        let method = headers.get(":method").unwrap_or_default().to_owned();
        let uri = headers.get(":path").unwrap_or_default().to_owned();
        let host = headers
            .get(":authority")
            .or_else(|| headers.get("host"))
            .unwrap_or_default()
            .to_owned();
        let scheme = headers.get(":scheme").unwrap_or_default().to_owned();
        Self {
            method,
            uri,
            host,
            scheme,
            headers,
        }
    }

    /// Path without the query string.
    pub fn path(&self) -> &str {
        self.uri.split_once('?').map_or(&self.uri, |(p, _)| p)
    }

    pub fn query_string(&self) -> &str {
        self.uri.split_once('?').map_or("", |(_, q)| q)
    }

    /// First value of query parameter `name`, percent-decoded.
    pub fn query(&self, name: &str) -> Option<String> {
        query_pairs_raw(self.query_string())
            .find(|(k, _)| percent_decode(k) == name)
            .map(|(_, v)| percent_decode(v).into_owned())
    }

    /// Host without a port.
    pub fn hostname(&self) -> &str {
        strip_port(&self.host)
    }
}

/// The part of `path` after `base` (Apigee's `proxy.pathsuffix`): `None` when `path` is
/// not `base` or under it at a segment boundary. A base of `/` leaves the whole path.
pub fn path_suffix<'p>(path: &'p str, base: &str) -> Option<&'p str> {
    let base = base.strip_suffix('/').unwrap_or(base);
    let rest = path.strip_prefix(base)?;
    (rest.is_empty() || rest.starts_with('/')).then_some(rest)
}

/// Strips `:port` from a host, leaving IPv6 literals intact.
pub fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host
            .split_once(']')
            .map_or(host, |(h, _)| &host[..h.len() + 1]);
    }
    host.rsplit_once(':')
        .filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
        .map_or(host, |(h, _)| h)
}

/// Decoded `key=value` pairs of a query string (`+` is a space, `%XX` decoded lossily).
pub fn query_pairs(qs: &str) -> impl Iterator<Item = (String, String)> + '_ {
    query_pairs_raw(qs).map(|(k, v)| {
        (
            percent_decode(k).into_owned(),
            percent_decode(v).into_owned(),
        )
    })
}

/// The `key=value` pairs of a query string, not decoded yet.
pub fn query_pairs_raw(qs: &str) -> impl Iterator<Item = (&str, &str)> + '_ {
    qs.split('&')
        .filter(|s| !s.is_empty())
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
}

/// Decodes one query string component; borrowed when there is nothing to decode.
pub fn percent_decode(s: &str) -> Cow<'_, str> {
    let bytes = s.as_bytes();
    if !bytes.iter().any(|b| *b == b'%' || *b == b'+') {
        return Cow::Borrowed(s);
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                // Two hex digits exactly: `from_str_radix` alone also takes a sign (`%+1`).
                let hex = bytes
                    .get(i + 1..i + 3)
                    .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

/// Percent-encodes everything but RFC 3986 unreserved characters (query values, form
/// fields, URL parts built from variables).
pub fn percent_encode(s: &str) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// The response as seen on the response-headers message.
#[derive(Debug, Clone, Default)]
pub struct ResponseInfo {
    pub status: u16,
    pub headers: Headers,
}

/// Per-exchange state: one per ext_proc stream.
#[derive(Debug, Default)]
pub struct Exchange {
    pub flow: String,
    pub request: RequestInfo,
    pub response: Option<ResponseInfo>,
    /// Request body (only when the flow asked for it), possibly truncated. Write it only
    /// through [`Exchange::set_body`], [`Exchange::replace_body`] or [`Exchange::take_body`]:
    /// they drop the cached JSON parse ([`Exchange::body_json`]).
    pub request_body: Option<Vec<u8>>,
    pub response_body: Option<Vec<u8>>,
    /// Attributes Envoy sent (`source.address`, `response.code`, ...).
    pub attributes: HashMap<String, String>,
    /// Variables set explicitly (AssignMessage `assignVariables`, scripts, `<step>.failed`);
    /// they win over the names generated from `state`.
    pub vars: HashMap<String, Value>,
    /// What policies established, typed (the verified app, quota decisions, parsed bodies,
    /// ...): the source of the variables they publish.
    pub state: state::State,
    /// Header changes the policies asked for, per direction, not yet sent to Envoy.
    pub request_mutations: HeaderMutations,
    pub response_mutations: HeaderMutations,
    /// Set by [`Exchange::replace_body`]: the body to forward differs from the one received.
    pub request_body_replaced: bool,
    pub response_body_replaced: bool,
    /// Set by a response step that wants a copy of the response body as it passes (a
    /// cache populating itself): the most bytes to keep; 0 keeps nothing. The body is not
    /// held back; the steps that declared [`crate::pipeline::Hooks::response_copy`] get it in
    /// [`crate::pipeline::Policy::response_end`] at its end.
    pub response_capture: usize,
    /// The client's values of the request headers the flow's steps set for the upstream,
    /// taken out of `request.headers` before the first step (see
    /// [`crate::pipeline::claim_owned_headers`]).
    pub client_owned: Headers,
    /// The request headers ended the request: no body follows (set by the stream; false,
    /// "a body may follow", until it knows).
    pub request_without_body: bool,
    /// The exchange's trace span when trace export is on and the exchange is sampled.
    pub trace: crate::telemetry::trace::ExchangeTrace,
    /// The flow's `basePath` (`proxy.basepath`), set with the flow.
    pub base_path: Option<std::sync::Arc<str>>,
    /// `messageid`, made on first use.
    pub message_id: std::sync::OnceLock<String>,
    /// The fault the flow's fault rules handle, once they run (`fault.*`, `error.*`).
    pub error: Option<Box<crate::pipeline::faults::ErrorInfo>>,
}

/// Header changes to send to Envoy for one direction. Envoy applies removals before
/// settings; the helpers keep the two lists consistent so the last policy to act wins.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HeaderMutations {
    /// (name, value, append)
    pub set: Vec<(String, String, bool)>,
    pub remove: Vec<String>,
}

impl HeaderMutations {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.remove.is_empty()
    }
}

impl Exchange {
    fn parts(&mut self, dir: Direction) -> (Option<&mut Headers>, &mut HeaderMutations) {
        match dir {
            Direction::Request => (Some(&mut self.request.headers), &mut self.request_mutations),
            Direction::Response => (
                self.response.as_mut().map(|r| &mut r.headers),
                &mut self.response_mutations,
            ),
        }
    }

    /// Sets `name` (overwriting) for `dir`; later steps see the new value.
    pub fn set_header(&mut self, dir: Direction, name: &str, value: String) {
        let name = lower_case(name);
        let (view, m) = self.parts(dir);
        if let Some(h) = view {
            h.set(&name, value.clone());
        }
        m.remove.retain(|n| *n != *name);
        m.set.retain(|(n, _, _)| *n != *name);
        m.set.push((name.into_owned(), value, false));
    }

    /// Adds a value to `name` for `dir`, keeping existing ones.
    pub fn add_header(&mut self, dir: Direction, name: &str, value: String) {
        let name = lower_case(name);
        let (view, m) = self.parts(dir);
        if let Some(h) = view {
            h.append(&name, value.clone());
        }
        m.set.push((name.into_owned(), value, true));
    }

    pub fn remove_header(&mut self, dir: Direction, name: &str) {
        let name = lower_case(name);
        let (view, m) = self.parts(dir);
        if let Some(h) = view {
            h.remove(&name);
        }
        m.set.retain(|(n, _, _)| *n != *name);
        if !m.remove.iter().any(|n| *n == *name) {
            m.remove.push(name.into_owned());
        }
    }

    /// The values of request header `name` as the client sent them, for policies reading a
    /// credential: the client's values when the flow owns the header (they were taken out
    /// of the request before the first step), else the request's current values.
    pub fn client_header_values<'s: 'n, 'n>(
        &'s self,
        name: &'n str,
    ) -> impl Iterator<Item = &'s str> + 'n {
        let owned = self
            .client_owned
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case(name));
        let from = if owned {
            &self.client_owned
        } else {
            &self.request.headers
        };
        from.iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// Replaces the body of `dir` (body-phase steps only).
    pub fn replace_body(&mut self, dir: Direction, body: Vec<u8>) {
        self.set_body(dir, Some(body));
        match dir {
            Direction::Request => self.request_body_replaced = true,
            Direction::Response => self.response_body_replaced = true,
        }
    }

    /// Sets the body of `dir` as received (or none), dropping the cached parse.
    pub fn set_body(&mut self, dir: Direction, body: Option<Vec<u8>>) {
        self.state.json[body_index(dir)] = std::sync::OnceLock::new();
        match dir {
            Direction::Request => self.request_body = body,
            Direction::Response => self.response_body = body,
        }
    }

    /// Takes the body of `dir` out (to forward it), dropping the cached parse.
    pub fn take_body(&mut self, dir: Direction) -> Option<Vec<u8>> {
        self.state.json[body_index(dir)] = std::sync::OnceLock::new();
        match dir {
            Direction::Request => self.request_body.take(),
            Direction::Response => self.response_body.take(),
        }
    }

    /// The body of `dir` parsed as JSON, parsed on first use and shared by every later
    /// reader until the body is replaced; `None` without a body. A body written around
    /// [`Exchange::set_body`] (the parse no longer matches its bytes) is parsed afresh.
    pub fn body_json(&self, dir: Direction) -> Option<state::JsonRef<'_>> {
        let body = match dir {
            Direction::Request => self.request_body.as_deref()?,
            Direction::Response => self.response_body.as_deref()?,
        };
        let i = body_index(dir);
        if let Some(j) = self.state.cached_json(i, body) {
            return Some(Cow::Borrowed(j));
        }
        if self.state.json[i].get().is_none() {
            let _ = self.state.json[i].set(state::JsonBody::parse(body));
            if let Some(j) = self.state.cached_json(i, body) {
                return Some(Cow::Borrowed(j));
            }
        }
        Some(Cow::Owned(state::JsonBody::parse(body)))
    }

    /// Takes the pending mutations of `dir`.
    pub fn take_mutations(&mut self, dir: Direction) -> HeaderMutations {
        std::mem::take(self.parts(dir).1)
    }
}

impl Exchange {
    pub fn set_var(&mut self, name: impl Into<String>, value: impl Into<Value>) {
        self.vars.insert(name.into(), value.into());
    }

    /// A variable set by a policy (not a built-in), by its full name: an explicit one, else
    /// one generated from the typed state.
    pub fn var(&self, name: &str) -> Option<ValueRef<'_>> {
        if let Some(v) = self.vars.get(name) {
            return Some(v.as_ref());
        }
        self.state.get(name)
    }

    /// Every variable set by policies, each name once, with the value [`Exchange::var`]
    /// would return.
    pub fn for_each_var(&self, f: &mut dyn FnMut(&str, ValueRef<'_>)) {
        for (k, v) in &self.vars {
            f(k, v.as_ref());
        }
        self.state.for_each(&mut |k, v| {
            if !self.vars.contains_key(k) {
                f(k, v);
            }
        });
    }

    /// The one lookup of a flow variable by its dotted name, for templates, conditions and
    /// scripts: a built-in ([`Builtin`]) first, then a variable set by a policy
    /// ([`Exchange::var`]), then an attribute Envoy sent.
    pub fn resolve(&self, name: &str) -> Option<Resolved<'_>> {
        self.resolve_with(name, Builtin::parse(name))
    }

    /// [`Exchange::resolve`] with `name` already classified.
    pub fn resolve_with(&self, name: &str, builtin: Option<Builtin<'_>>) -> Option<Resolved<'_>> {
        if let Some(v) = builtin.and_then(|b| self.builtin(b)) {
            return Some(v);
        }
        if let Some(v) = self.var(name) {
            return Some(v.into());
        }
        self.attributes
            .get(name)
            .map(|v| Resolved::Text(Cow::Borrowed(v.as_str())))
    }

    /// Looks a flow variable up by its dotted name, as text (see [`Exchange::resolve`]).
    pub fn lookup(&self, name: &str) -> Option<Cow<'_, str>> {
        self.resolve(name).map(Resolved::into_text)
    }

    /// The value of a built-in name; `None` when the exchange has none (a header not sent,
    /// no response yet), and the lookup goes on to variables and attributes.
    pub fn builtin(&self, b: Builtin<'_>) -> Option<Resolved<'_>> {
        let r = &self.request;
        fn text(s: &str) -> Option<Resolved<'_>> {
            Some(Resolved::Text(Cow::Borrowed(s)))
        }
        match b {
            Builtin::Method => text(&r.method),
            Builtin::Path => text(r.path()),
            Builtin::Uri => text(&r.uri),
            Builtin::Host => text(&r.host),
            Builtin::Scheme => text(&r.scheme),
            Builtin::QueryString => text(r.query_string()),
            Builtin::RequestContent => self
                .request_body
                .as_deref()
                .map(|b| Resolved::Text(String::from_utf8_lossy(b))),
            Builtin::RequestHeader(h) => r.headers.get(h).map(|v| Resolved::Text(Cow::Borrowed(v))),
            Builtin::QueryParam(q) => r.query(q).map(|v| Resolved::Text(Cow::Owned(v))),
            Builtin::Status => self
                .response
                .as_ref()
                .map(|resp| Resolved::Int(i64::from(resp.status))),
            Builtin::ResponseContent => self
                .response
                .as_ref()
                .and(self.response_body.as_deref())
                .map(|b| Resolved::Text(String::from_utf8_lossy(b))),
            Builtin::ResponseHeader(h) => self
                .response
                .as_ref()?
                .headers
                .get(h)
                .map(|v| Resolved::Text(Cow::Borrowed(v))),
            Builtin::FlowName => text(&self.flow),
            Builtin::ClientIp => self.client_ip().map(|v| Resolved::Text(Cow::Borrowed(v))),
            Builtin::RequestHeaderValues(h, view) => {
                let values = r
                    .headers
                    .iter()
                    .filter(|(n, _)| n.eq_ignore_ascii_case(h))
                    .map(|(_, v)| v);
                Some(match view {
                    HeaderValues::Joined => {
                        let all: Vec<&str> = values.collect();
                        if all.is_empty() {
                            return None;
                        }
                        Resolved::Text(Cow::Owned(all.join(", ")))
                    }
                    HeaderValues::Count => Resolved::Int(
                        i64::try_from(values.flat_map(|v| v.split(',')).count())
                            .unwrap_or(i64::MAX),
                    ),
                    HeaderValues::List => {
                        let split: Vec<&str> =
                            values.flat_map(|v| v.split(',')).map(str::trim).collect();
                        if split.is_empty() {
                            return None;
                        }
                        Resolved::Text(Cow::Owned(format!("[{}]", split.join(", "))))
                    }
                })
            }
            Builtin::FormParam(f) => {
                let body = self.form_body()?;
                query_pairs_raw(body)
                    .find(|(k, _)| percent_decode(k) == f)
                    .map(|(_, v)| Resolved::Text(percent_decode(v)))
            }
            Builtin::FormString => self.form_body().map(|b| Resolved::Text(Cow::Borrowed(b))),
            Builtin::ProxyBasePath => text(self.base_path.as_deref().unwrap_or("/")),
            Builtin::ProxyPathSuffix => text(path_suffix(
                r.path(),
                self.base_path.as_deref().unwrap_or("/"),
            )?),
            Builtin::MessageId => text(self.message_id.get_or_init(|| {
                crate::expr::new_uuid().unwrap_or_else(|| {
                    // No randomness: still unique within the process.
                    static N: AtomicUsize = AtomicUsize::new(0);
                    format!("tollgate-{}", N.fetch_add(1, Ordering::Relaxed))
                })
            })),
            Builtin::SystemTimestamp => Some(Resolved::Int(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
            )),
            Builtin::Fault(f) => self.fault_field(f),
            Builtin::Message(m) => {
                let on_response = self.response.is_some();
                self.builtin(match (m, on_response) {
                    (MessageField::Content, true) => Builtin::ResponseContent,
                    (MessageField::Content, false) => Builtin::RequestContent,
                    (MessageField::Header(h), true) => Builtin::ResponseHeader(h),
                    (MessageField::Header(h), false) => Builtin::RequestHeader(h),
                    (MessageField::Status, true) => Builtin::Status,
                    (MessageField::Verb | MessageField::Path | MessageField::Uri, true)
                    | (MessageField::Status, false) => return None,
                    (MessageField::Verb, false) => Builtin::Method,
                    (MessageField::Path, false) => Builtin::Path,
                    (MessageField::Uri, false) => Builtin::Uri,
                })
            }
        }
    }

    /// A fault-handling name (see [`Builtin::Fault`]); `None` outside fault handling.
    fn fault_field(&self, f: FaultField<'_>) -> Option<Resolved<'_>> {
        let e = self.error.as_deref()?;
        let text = |s: &'_ str| Some(Resolved::Text(Cow::Owned(s.to_owned())));
        match f {
            FaultField::Name => Some(Resolved::Text(Cow::Borrowed(e.name()))),
            FaultField::Code => Some(Resolved::Text(Cow::Borrowed(&e.code))),
            FaultField::Reason => Some(Resolved::Text(Cow::Borrowed(&e.message))),
            FaultField::Policy => Some(Resolved::Text(Cow::Borrowed(&e.policy))),
            FaultField::Category => text(e.category),
            FaultField::IsError => Some(Resolved::Bool(true)),
            FaultField::Status => self.builtin(Builtin::Status),
            FaultField::Phrase => {
                let status = self.response.as_ref()?.status;
                text(crate::fault::reason_phrase(status))
            }
            FaultField::Content => self.builtin(Builtin::ResponseContent),
            FaultField::Header(h) => self.builtin(Builtin::ResponseHeader(h)),
        }
    }

    /// The request body when it is a form (`application/x-www-form-urlencoded`).
    fn form_body(&self) -> Option<&str> {
        let ct = self.request.headers.get("content-type")?;
        let is_form = ct.split(';').next().is_some_and(|t| {
            t.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        });
        if !is_form {
            return None;
        }
        std::str::from_utf8(self.request_body.as_deref()?).ok()
    }

    /// The client address (see [`Exchange::client_address`]), with the process's trusted hops.
    pub fn client_ip(&self) -> Option<&str> {
        self.client_address(XFF_TRUSTED_HOPS.load(Ordering::Relaxed))
    }

    /// The client address: with `trusted_hops` 0 only Envoy's `source.address` attribute
    /// (without the port), which a client cannot forge. With N > 0 (N proxies the operator
    /// trusts each appended the address they saw to `X-Forwarded-For`, Envoy's
    /// `xff_num_trusted_hops` convention), the Nth address from the right end of
    /// `X-Forwarded-For`; the entries left of it are the client's to write and never used.
    /// When there are fewer entries, or that one is not an IP address, `source.address`.
    pub fn client_address(&self, trusted_hops: usize) -> Option<&str> {
        if trusted_hops > 0 {
            let entries: Vec<&str> = self
                .request
                .headers
                .iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case("x-forwarded-for"))
                .flat_map(|(_, v)| v.split(','))
                .map(str::trim)
                .collect();
            if let Some(e) = entries
                .len()
                .checked_sub(trusted_hops)
                .and_then(|i| entries.get(i))
            {
                if e.parse::<std::net::IpAddr>().is_ok() {
                    return Some(e);
                }
            }
        }
        // Without the port, and an IPv6 address without its brackets, as X-Forwarded-For
        // writes it: one client has one address whichever way it is learned.
        self.attributes.get("source.address").map(|a| {
            let host = strip_port(a);
            host.strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .unwrap_or(host)
        })
    }
}

/// How many proxies in front of Envoy append to `X-Forwarded-For` and are trusted
/// (`tollgate serve --xff-trusted-hops`); 0 never reads the header.
static XFF_TRUSTED_HOPS: AtomicUsize = AtomicUsize::new(0);

/// Sets the trusted `X-Forwarded-For` hops for the process (once, at start).
pub fn set_xff_trusted_hops(n: usize) {
    XFF_TRUSTED_HOPS.store(n, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exchange() -> Exchange {
        let mut h = Headers::new();
        h.push(":method".into(), "POST".into());
        h.push(":path".into(), "/v1/chat?model=gpt%204&x=1+2".into());
        h.push(":authority".into(), "api.example.com:8443".into());
        h.push("x-api-key".into(), "k1".into());
        Exchange {
            flow: "f".into(),
            request: RequestInfo::from_headers(h),
            ..Default::default()
        }
    }

    #[test]
    fn builtins_resolve() {
        let ex = exchange();
        assert_eq!(ex.lookup("request.method").as_deref(), Some("POST"));
        assert_eq!(ex.lookup("request.path").as_deref(), Some("/v1/chat"));
        assert_eq!(ex.lookup("request.query.model").as_deref(), Some("gpt 4"));
        assert_eq!(ex.lookup("request.query.x").as_deref(), Some("1 2"));
        assert_eq!(ex.lookup("request.header.X-API-KEY").as_deref(), Some("k1"));
        assert_eq!(ex.request.hostname(), "api.example.com");
        assert_eq!(ex.lookup("flow.name").as_deref(), Some("f"));
        assert_eq!(ex.lookup("request.header.missing"), None);
        assert_eq!(ex.lookup("nothing"), None);
    }

    #[test]
    fn policy_vars_and_attributes() {
        let mut ex = exchange();
        ex.set_var("client_id", "abc");
        ex.set_var("ratelimit.q.remaining", 4);
        ex.attributes
            .insert("source.address".into(), "10.1.2.3:5555".into());
        assert_eq!(ex.lookup("client_id").as_deref(), Some("abc"));
        assert_eq!(ex.lookup("ratelimit.q.remaining").as_deref(), Some("4"));
        assert_eq!(ex.lookup("client.ip").as_deref(), Some("10.1.2.3"));
    }

    #[test]
    fn client_address_trusts_only_configured_hops() {
        let mut ex = exchange();
        ex.request
            .headers
            .push("x-forwarded-for".into(), "6.6.6.6, 1.1.1.1".into());
        ex.request
            .headers
            .push("x-forwarded-for".into(), "2.2.2.2".into());
        // No attribute and no trusted hop: unknown, never the client's header.
        assert_eq!(ex.client_address(0), None);
        ex.attributes
            .insert("source.address".into(), "10.0.0.9:4242".into());
        assert_eq!(ex.client_address(0), Some("10.0.0.9"));
        // One trusted hop appended the last entry; two, the one before.
        assert_eq!(ex.client_address(1), Some("2.2.2.2"));
        assert_eq!(ex.client_address(2), Some("1.1.1.1"));
        assert_eq!(ex.client_address(3), Some("6.6.6.6"));
        // Fewer entries than trusted hops: the peer Envoy saw.
        assert_eq!(ex.client_address(4), Some("10.0.0.9"));
        ex.request
            .headers
            .set("x-forwarded-for", "not-an-ip".into());
        assert_eq!(ex.client_address(1), Some("10.0.0.9"));
        ex.request
            .headers
            .set("x-forwarded-for", "evil, 2001:db8::1".into());
        assert_eq!(ex.client_address(1), Some("2001:db8::1"));
        ex.attributes
            .insert("source.address".into(), "[2001:db8::7]:4242".into());
        assert_eq!(ex.client_address(0), Some("2001:db8::7"));
    }

    #[test]
    fn client_header_values_prefer_the_claimed_ones() {
        let mut ex = exchange();
        ex.request
            .headers
            .push("authorization".into(), "Bearer client".into());
        ex.client_owned
            .push("authorization".into(), "Bearer client".into());
        ex.request.headers.remove("authorization");
        ex.set_header(Direction::Request, "authorization", "Bearer google".into());
        assert_eq!(
            ex.client_header_values("Authorization").collect::<Vec<_>>(),
            ["Bearer client"]
        );
        assert_eq!(
            ex.lookup("request.header.authorization").as_deref(),
            Some("Bearer google")
        );
        assert_eq!(
            ex.client_header_values("x-api-key").collect::<Vec<_>>(),
            ["k1"]
        );
    }

    #[test]
    fn mutations_stay_consistent() {
        let mut ex = exchange();
        ex.set_header(Direction::Request, "X-A", "1".into());
        ex.add_header(Direction::Request, "x-b", "2".into());
        ex.remove_header(Direction::Request, "x-a");
        ex.set_header(Direction::Request, "x-api-key", "new".into());
        assert_eq!(
            ex.lookup("request.header.x-api-key").as_deref(),
            Some("new")
        );
        assert_eq!(ex.lookup("request.header.x-a"), None);
        let m = ex.take_mutations(Direction::Request);
        assert_eq!(
            m.set,
            vec![
                ("x-b".to_string(), "2".to_string(), true),
                ("x-api-key".to_string(), "new".to_string(), false)
            ]
        );
        assert_eq!(m.remove, vec!["x-a".to_string()]);
        assert!(ex.take_mutations(Direction::Request).is_empty());
        // No response yet: mutations are still recorded.
        ex.set_header(Direction::Response, "x-r", "1".into());
        assert_eq!(ex.take_mutations(Direction::Response).set.len(), 1);
    }

    #[test]
    fn header_view_set_append_remove() {
        let mut h = Headers::new();
        h.push("x-a".into(), "1".into());
        h.push("X-B".into(), "2".into());
        h.push("x-a".into(), "3".into());
        h.set("X-A", "4".into());
        assert_eq!(
            h.iter().collect::<Vec<_>>(),
            [("X-B", "2"), ("x-a", "4")],
            "every value replaced, the one left last"
        );
        h.set("x-b", "5".into());
        h.append("X-C", "6".into());
        assert_eq!(
            h.iter().collect::<Vec<_>>(),
            [("x-a", "4"), ("x-b", "5"), ("x-c", "6")]
        );
        h.remove("X-A");
        assert_eq!(h.get("x-a"), None);
        assert!(matches!(lower_case("x-a"), Cow::Borrowed("x-a")));
        assert_eq!(lower_case("X-a"), "x-a");
    }

    #[test]
    fn query_parameters() {
        let mut h = Headers::new();
        h.push(":path".into(), "/p?a=1&a=2&b%20c=d+e&f&=g".into());
        let r = RequestInfo::from_headers(h);
        assert_eq!(r.query("a").as_deref(), Some("1"));
        assert_eq!(r.query("b c").as_deref(), Some("d e"));
        assert_eq!(r.query("f").as_deref(), Some(""));
        assert_eq!(r.query("").as_deref(), Some("g"));
        assert_eq!(r.query("b%20c"), None);
        let pairs: Vec<_> = query_pairs(r.query_string()).collect();
        assert_eq!(pairs.len(), 5);
        assert_eq!(pairs[2], ("b c".to_string(), "d e".to_string()));
        assert!(matches!(percent_decode("plain"), Cow::Borrowed("plain")));
    }

    fn quota(prefix: &str, used: i64) -> state::QuotaResult {
        state::QuotaResult {
            prefix: prefix.into(),
            allowed: 10,
            used,
            available: 10 - used,
            exceed: 0,
            expiry: 1_000,
            identifier: "id".into(),
        }
    }

    /// Names are generated from the typed slots on lookup: nothing is in the variable map,
    /// a later decision of the same policy wins, explicit variables win over all, and a
    /// listing names each once with the value a lookup gives.
    #[test]
    fn typed_state_generates_the_variables() {
        let mut ex = exchange();
        ex.state.add_quota(quota("ratelimit.q.", 1));
        ex.state.add_quota(quota("ratelimit.other.", 5));
        ex.state.add_quota(quota("ratelimit.q.", 2));
        ex.state.add_token(
            "jwt.auth.".into(),
            std::sync::Arc::new(vec![("claim.sub".into(), Value::from("u1"))]),
        );
        ex.state.add_callout(state::CalloutResult {
            prefix: "servicecallout.c.".into(),
            status: Some(200),
            headers: Default::default(),
            body: Some("{}".into()),
            json: vec![("ok".into(), Value::Bool(true))],
            error: None,
        });
        assert!(ex.vars.is_empty());
        assert_eq!(ex.var("ratelimit.q.used.count"), Some(ValueRef::Int(2)));
        assert_eq!(ex.var("ratelimit.q.remaining"), Some(ValueRef::Int(8)));
        assert_eq!(ex.var("ratelimit.other.used"), Some(ValueRef::Int(5)));
        assert_eq!(ex.state.quota("ratelimit.q.").map(|q| q.used), Some(2));
        assert_eq!(ex.lookup("jwt.auth.claim.sub").as_deref(), Some("u1"));
        // Apigee's decoded form and registered-claim names read the same claim.
        assert_eq!(
            ex.lookup("jwt.auth.decoded.claim.sub").as_deref(),
            Some("u1")
        );
        assert_eq!(ex.lookup("jwt.auth.claim.subject").as_deref(), Some("u1"));
        assert_eq!(ex.lookup("jwt.auth.claim.issuer"), None);
        assert_eq!(ex.lookup("servicecallout.c.status").as_deref(), Some("200"));
        assert_eq!(
            ex.var("servicecallout.c.json.ok"),
            Some(ValueRef::Bool(true))
        );
        assert_eq!(ex.var("ratelimit.q.nope"), None);
        assert_eq!(ex.var("ratelimit.q"), None);
        assert_eq!(ex.var("client_id"), None, "no app verified");
        ex.set_var("ratelimit.q.used", "explicit");
        assert_eq!(ex.lookup("ratelimit.q.used").as_deref(), Some("explicit"));
        let mut listed: Vec<(String, Value)> = Vec::new();
        ex.for_each_var(&mut |k, v| listed.push((k.to_owned(), v.to_value())));
        let mut names: Vec<&str> = listed.iter().map(|(k, _)| k.as_str()).collect();
        names.sort_unstable();
        let n = names.len();
        names.dedup();
        assert_eq!(names.len(), n, "each name once: {names:?}");
        for (k, v) in &listed {
            assert_eq!(ex.var(k).map(ValueRef::to_value).as_ref(), Some(v), "{k}");
        }
        assert!(listed.contains(&("ratelimit.q.used.count".into(), Value::Int(2))));
        assert!(listed.contains(&("ratelimit.q.used".into(), Value::from("explicit"))));
    }

    /// One parse per body, shared until the body changes; errors read as serde_json's.
    #[test]
    fn bodies_are_parsed_once_and_reparsed_after_a_change() {
        let mut ex = exchange();
        assert!(
            ex.body_json(Direction::Request).is_none(),
            "no body, nothing cached"
        );
        ex.set_body(
            Direction::Request,
            Some(br#"{"a":1,"a":2,"b":[true]}"#.to_vec()),
        );
        let first = ex.body_json(Direction::Request).unwrap();
        assert!(matches!(first, Cow::Borrowed(_)));
        assert_eq!(
            first.value.as_ref().unwrap()["a"],
            2,
            "the last duplicate, as serde_json"
        );
        assert_eq!(first.duplicate_keys, ["a"]);
        let again = ex.body_json(Direction::Request).unwrap();
        assert!(std::ptr::eq(&*first, &*again), "the same parse");
        ex.replace_body(Direction::Request, br#"{"c":3}"#.to_vec());
        let j = ex.body_json(Direction::Request).unwrap();
        assert_eq!(j.value.as_ref().unwrap()["c"], 3);
        assert!(j.duplicate_keys.is_empty());
        // A body written around set_body is noticed and parsed afresh.
        ex.request_body = Some(br#"{"d":4}"#.to_vec());
        assert_eq!(
            ex.body_json(Direction::Request)
                .unwrap()
                .value
                .as_ref()
                .unwrap()["d"],
            4
        );
        assert_eq!(
            ex.take_body(Direction::Request).as_deref(),
            Some(&br#"{"d":4}"#[..])
        );
        assert!(ex.body_json(Direction::Request).is_none());
        // Each direction has its own.
        ex.set_body(Direction::Response, Some(b"[1, 2".to_vec()));
        let bad = ex.body_json(Direction::Response).unwrap();
        let want = serde_json::from_slice::<serde_json::Value>(b"[1, 2").unwrap_err();
        assert_eq!(bad.value.as_ref().unwrap_err(), &want.to_string());
        for text in [
            "{} x",
            "\"s\"",
            "1e400",
            "-0",
            "null",
            "[{\"a\":{\"a\":1,\"a\":2}}]",
        ] {
            let ours = state::JsonBody::parse(text.as_bytes());
            let theirs = serde_json::from_slice::<serde_json::Value>(text.as_bytes());
            assert_eq!(ours.value, theirs.map_err(|e| e.to_string()), "{text}");
            assert!(
                ours.duplicate_keys.is_empty(),
                "only top-level keys are noted: {text}"
            );
        }
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert!(
            state::JsonBody::parse(deep.as_bytes()).value.is_err(),
            "serde_json's depth limit"
        );
    }

    /// The LLM slot can be filled from the shared parse with the same result as parsing
    /// the bytes.
    #[test]
    fn llm_request_from_the_shared_parse() {
        let mut ex = exchange();
        let body = br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;
        ex.set_body(Direction::Request, Some(body.to_vec()));
        let endpoint = crate::llm::detect("POST", "/v1/chat/completions", |_| None).unwrap();
        let parsed = ex.body_json(Direction::Request).unwrap();
        let from_shared =
            crate::llm::request::parse_request_json(&endpoint, parsed.value.as_ref().unwrap())
                .unwrap();
        assert_eq!(
            from_shared,
            crate::llm::parse_request(&endpoint, body).unwrap()
        );
        ex.state.llm = Some(std::sync::Arc::new(from_shared));
        assert_eq!(
            ex.state.llm.as_ref().and_then(|r| r.model.as_deref()),
            Some("gpt-4o")
        );
    }

    /// The names Apigee users reference: base path and suffix, message id, time, form
    /// fields, every value of a header, and the fault names only while a fault is handled.
    #[test]
    fn apigee_names() {
        let mut ex = exchange();
        assert_eq!(ex.lookup("proxy.basepath").as_deref(), Some("/"));
        assert_eq!(ex.lookup("proxy.pathsuffix").as_deref(), Some("/v1/chat"));
        ex.base_path = Some("/v1".into());
        assert_eq!(ex.lookup("proxy.basepath").as_deref(), Some("/v1"));
        assert_eq!(ex.lookup("proxy.pathsuffix").as_deref(), Some("/chat"));
        ex.base_path = Some("/v1/chat/".into());
        assert_eq!(ex.lookup("proxy.pathsuffix").as_deref(), Some(""));
        ex.base_path = Some("/v".into());
        assert_eq!(
            ex.lookup("proxy.pathsuffix"),
            None,
            "not under /v at a segment"
        );

        let id = ex.lookup("messageid").unwrap().into_owned();
        assert_eq!(id.len(), 36, "{id}");
        assert_eq!(
            ex.lookup("messageid").as_deref(),
            Some(id.as_str()),
            "stable"
        );
        assert_ne!(exchange().lookup("messageid").as_deref(), Some(id.as_str()));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        let Some(Resolved::Int(ts)) = ex.resolve("system.timestamp") else {
            panic!("a number")
        };
        assert!((ts - now).abs() < 60_000, "{ts} {now}");

        assert_eq!(ex.lookup("request.formparam.a"), None, "no body");
        ex.request_body = Some(b"a=1&b=x+y%21&a=2".to_vec());
        assert_eq!(ex.lookup("request.formparam.a"), None, "not a form");
        ex.request.headers.push(
            "content-type".into(),
            "application/x-www-form-urlencoded; charset=utf-8".into(),
        );
        assert_eq!(ex.lookup("request.formparam.a").as_deref(), Some("1"));
        assert_eq!(ex.lookup("request.formparam.b").as_deref(), Some("x y!"));
        assert_eq!(ex.lookup("request.formparam.c"), None);
        assert_eq!(
            ex.lookup("request.formstring").as_deref(),
            Some("a=1&b=x+y%21&a=2")
        );

        ex.request.headers.push("accept".into(), "a/b, c/d".into());
        ex.request.headers.push("accept".into(), "e/f".into());
        assert_eq!(
            ex.lookup("request.header.accept").as_deref(),
            Some("a/b, c/d")
        );
        assert_eq!(
            ex.lookup("request.header.Accept.values").as_deref(),
            Some("[a/b, c/d, e/f]")
        );
        assert_eq!(
            ex.resolve("request.header.accept.values.count"),
            Some(Resolved::Int(3))
        );
        assert_eq!(
            ex.lookup("request.header.accept.values.string").as_deref(),
            Some("a/b, c/d, e/f")
        );
        assert_eq!(ex.lookup("request.header.none.values"), None);
        assert_eq!(
            ex.resolve("request.header.none.values.count"),
            Some(Resolved::Int(0))
        );

        // `message.*` is the request until there is a response.
        assert_eq!(ex.lookup("message.verb").as_deref(), Some("POST"));
        assert_eq!(
            ex.lookup("message.header.accept").as_deref(),
            Some("a/b, c/d")
        );
        assert_eq!(
            ex.lookup("message.content").as_deref(),
            Some("a=1&b=x+y%21&a=2")
        );
        assert_eq!(ex.lookup("message.status.code"), None);

        for name in [
            "fault.name",
            "error.status.code",
            "is.error",
            "error.message",
        ] {
            assert_eq!(ex.lookup(name), None, "{name} outside fault handling");
        }
        ex.error = Some(Box::new(crate::pipeline::faults::ErrorInfo {
            code: "oauth.v2.InvalidApiKey".into(),
            message: "Invalid ApiKey".into(),
            policy: "vk".into(),
            category: "Step",
        }));
        let mut h = Headers::new();
        h.push(":status".into(), "401".into());
        h.push("x-e".into(), "1".into());
        ex.response = Some(ResponseInfo {
            status: 401,
            headers: h,
        });
        ex.set_body(Direction::Response, Some(b"{}".to_vec()));
        for (name, want) in [
            ("fault.name", "InvalidApiKey"),
            ("fault.code", "oauth.v2.InvalidApiKey"),
            ("fault.reason", "Invalid ApiKey"),
            ("error.message", "Invalid ApiKey"),
            ("fault.policy", "vk"),
            ("fault.category", "Step"),
            ("error.status.code", "401"),
            ("error.reason.phrase", "Unauthorized"),
            ("error.content", "{}"),
            ("error.header.x-e", "1"),
            ("is.error", "true"),
        ] {
            assert_eq!(ex.lookup(name).as_deref(), Some(want), "{name}");
        }
        assert_eq!(ex.lookup("fault.other"), None);
        assert_eq!(ex.lookup("message.status.code").as_deref(), Some("401"));
        assert_eq!(ex.lookup("message.header.x-e").as_deref(), Some("1"));
        assert_eq!(ex.lookup("message.content").as_deref(), Some("{}"));
        assert_eq!(ex.lookup("message.verb"), None);
    }

    #[test]
    fn percent_decoding_is_lossless_on_garbage() {
        assert_eq!(percent_decode("%"), "%");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(percent_decode("a%2Fb"), "a/b");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("host"), "host");
    }
}
