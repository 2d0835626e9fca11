//! CEL conditions. In CEL the request is a map: `request.method`, `request.path`,
//! `request.host`, `request.headers["x-api-key"]` (names lower case), `request.query["model"]`;
//! `response.status`, `response.headers[...]`; policy variables by their dotted names
//! (`client_id`, `ratelimit.quota1.available`). A condition whose evaluation fails (for
//! example a missing header) is false, as in Apigee.
//!
//! Names resolve through the one lookup templates and Apigee conditions use
//! ([`Exchange::resolve`] and its table of built-in names, [`Builtin`]): a name means the
//! same in all (`request.host` with its port, a repeated query parameter's first value,
//! Apigee's synonyms such as `request.verb`). CEL adds only what a template cannot render:
//! the header and query maps, and a dotted prefix of variables as a nested map
//! (`ratelimit.q`).

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, LazyLock, OnceLock};

use cel::common::ast::{operators, EntryExpr, Expr, IdedExpr};
use cel::common::traits::{Container, Indexer, Sizer, Zeroer};
use cel::common::types::{
    CelBool, CelDouble, CelInt, CelNull, CelString, CelUInt, Kind, Type, MAP_TYPE,
};
use cel::common::value::{CowVal, Val};
use cel::context::VariableResolver;
use cel::objects::{Key, Map};
use cel::{Context, Env, ExecutionError, Program};

use super::ExprError;
use crate::vars::{
    percent_decode, query_pairs_raw, Builtin, Exchange, Headers, Resolved, ValueRef,
};

static ENV: LazyLock<Arc<Env>> = LazyLock::new(|| Arc::new(Env::stdlib()));

/// A compiled CEL condition.
pub struct Condition {
    source: String,
    program: Program,
    /// The header and query maps are only indexed, tested for keys or sized: they are
    /// answered by views of the exchange rather than built (see [`maps_only_indexed`]).
    lazy_maps: bool,
}

impl std::fmt::Debug for Condition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Condition").field(&self.source).finish()
    }
}

impl Condition {
    /// Compiles `source`. The CEL parser recurses deeply for every bracket (about 170 KiB
    /// of stack a level unoptimised) and evaluation once per level of the expression, on
    /// the stream's worker thread: so the source is bounded in length and nesting, the
    /// parse runs on a thread of its own with a large stack, and a deeper expression is
    /// refused instead of overflowing a stack later.
    pub fn compile(source: &str) -> Result<Self, ExprError> {
        let refuse = |message: String| ExprError::Parse {
            source_text: source.to_owned(),
            message,
        };
        if source.len() > MAX_CONDITION_BYTES {
            return Err(refuse(format!("longer than {MAX_CONDITION_BYTES} bytes")));
        }
        if bracket_depth(source) > MAX_BRACKET_DEPTH {
            return Err(refuse(format!(
                "brackets nested deeper than {MAX_BRACKET_DEPTH}"
            )));
        }
        let parse = || -> Result<(Program, bool), String> {
            let program = ENV
                .compile(source)
                .map_err(|e| e.to_string().trim().to_owned())?;
            if !depth_within(program.expression(), MAX_EXPR_DEPTH) {
                return Err(format!("nested deeper than {MAX_EXPR_DEPTH} levels"));
            }
            let lazy_maps = maps_only_indexed(program.expression(), false);
            Ok((program, lazy_maps))
        };
        let parsed = std::thread::scope(|s| {
            std::thread::Builder::new()
                .name("cel-parse".to_owned())
                .stack_size(PARSER_STACK)
                .spawn_scoped(s, parse)
                .map_err(|e| format!("cannot start the parser thread: {e}"))?
                .join()
                .map_err(|_| "the CEL parser failed".to_owned())?
        });
        let (program, lazy_maps) = parsed.map_err(refuse)?;
        Ok(Self {
            source: source.to_owned(),
            program,
            lazy_maps,
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Evaluates to a boolean; an error or a non-boolean result is `false` (logged).
    pub fn eval(&self, ex: &Exchange) -> bool {
        let resolver = ExchangeResolver::new(ex, self.lazy_maps);
        let mut ctx = Context::with_env(ENV.clone());
        ctx.set_variable_resolver(&resolver);
        match self.program.execute(&ctx) {
            Ok(cel::Value::Bool(b)) => b,
            Ok(other) => {
                tracing::debug!(condition = %self.source, result = ?other, "condition is not a boolean; treated as false");
                false
            }
            Err(e) => {
                tracing::debug!(condition = %self.source, error = %e, "condition failed to evaluate; treated as false");
                false
            }
        }
    }
}

/// Longest condition source accepted.
const MAX_CONDITION_BYTES: usize = 4096;
/// Deepest nesting of `(`, `[` and `{` accepted (outside string literals).
const MAX_BRACKET_DEPTH: usize = 24;
/// Deepest compiled expression accepted (a select chain, an operator chain, a macro).
const MAX_EXPR_DEPTH: usize = 64;
/// Stack of the parser's thread: reserved, and touched only as deep as a parse goes.
const PARSER_STACK: usize = 64 << 20;

/// How deep `(`, `[` and `{` nest in `src`, skipping quoted strings.
fn bracket_depth(src: &str) -> usize {
    let (mut depth, mut max) = (0usize, 0usize);
    let mut quote: Option<u8> = None;
    let mut escaped = false;
    for &b in src.as_bytes() {
        match quote {
            Some(q) => {
                if escaped {
                    escaped = false;
                } else if b == b'\\' {
                    escaped = true;
                } else if b == q {
                    quote = None;
                }
            }
            None => match b {
                b'\'' | b'"' => quote = Some(b),
                b'(' | b'[' | b'{' => {
                    depth += 1;
                    max = max.max(depth);
                }
                b')' | b']' | b'}' => depth = depth.saturating_sub(1),
                _ => {}
            },
        }
    }
    max
}

/// True when no path from `e` down its tree is longer than `max` (walked without
/// recursion: the tree has not been checked yet).
fn depth_within<'a>(e: &'a IdedExpr, max: usize) -> bool {
    let mut stack = vec![(e, 1usize)];
    while let Some((e, d)) = stack.pop() {
        if d > max {
            return false;
        }
        let mut push = |c: &'a IdedExpr| stack.push((c, d + 1));
        match &e.expr {
            Expr::Call(c) => {
                if let Some(t) = c.target.as_deref() {
                    push(t);
                }
                c.args.iter().for_each(&mut push);
            }
            Expr::Comprehension(c) => {
                [
                    &c.iter_range,
                    &c.accu_init,
                    &c.loop_cond,
                    &c.loop_step,
                    &c.result,
                ]
                .into_iter()
                .for_each(&mut push);
            }
            Expr::List(l) => l.elements.iter().for_each(&mut push),
            Expr::Map(m) => m.entries.iter().flat_map(entry_exprs).for_each(&mut push),
            Expr::Struct(s) => s.entries.iter().flat_map(entry_exprs).for_each(&mut push),
            Expr::Select(s) => push(&s.operand),
            Expr::Ident(_) | Expr::Literal(_) | Expr::Unspecified => {}
        }
    }
    true
}

/// A map-valued name a [`MapView`] can stand for: `request.headers` (or `.header`),
/// `request.query`, `response.headers` (or `.header`).
fn is_view_name(e: &Expr) -> bool {
    let Expr::Select(s) = e else {
        return false;
    };
    let Expr::Ident(root) = &s.operand.expr else {
        return false;
    };
    !s.test
        && matches!(
            (root.as_str(), s.field.as_str()),
            ("request", "headers" | "header" | "query") | ("response", "headers" | "header")
        )
}

/// True when every map named by [`is_view_name`] in `e` is only indexed (`m[k]`, `m.k`,
/// `has(m.k)`, `m[?k]`, `m.?k`), tested for a key (`k in m`) or sized (`size(m)`,
/// `m.size()`): what a [`MapView`] answers exactly as the full map would. Anything else
/// (a comparison, a comprehension, a function argument, the result) gets the full map.
/// `allowed` says whether `e` itself stands in such a position.
fn maps_only_indexed(e: &IdedExpr, allowed: bool) -> bool {
    if is_view_name(&e.expr) {
        return allowed;
    }
    fn none<'e>(mut es: impl Iterator<Item = &'e IdedExpr>) -> bool {
        es.all(|e| maps_only_indexed(e, false))
    }
    match &e.expr {
        Expr::Select(s) => maps_only_indexed(&s.operand, true),
        Expr::Call(c) => {
            let name = c.func_name.as_str();
            let arg_allowed = |i: usize| match name {
                operators::INDEX | operators::OPT_INDEX | operators::OPT_SELECT => i == 0,
                operators::IN => i == 1,
                "size" => c.target.is_none() && c.args.len() == 1,
                _ => false,
            };
            c.target
                .as_deref()
                .is_none_or(|t| maps_only_indexed(t, name == "size" && c.args.is_empty()))
                && c.args
                    .iter()
                    .enumerate()
                    .all(|(i, a)| maps_only_indexed(a, arg_allowed(i)))
        }
        Expr::Comprehension(c) => none(
            [
                &c.iter_range,
                &c.accu_init,
                &c.loop_cond,
                &c.loop_step,
                &c.result,
            ]
            .into_iter(),
        ),
        Expr::List(l) => none(l.elements.iter()),
        Expr::Map(m) => none(m.entries.iter().flat_map(entry_exprs)),
        Expr::Struct(s) => none(s.entries.iter().flat_map(entry_exprs)),
        Expr::Ident(_) | Expr::Literal(_) | Expr::Unspecified => true,
    }
}

fn entry_exprs(e: &cel::common::ast::IdedEntryExpr) -> Vec<&IdedExpr> {
    match &e.expr {
        EntryExpr::MapEntry(m) => vec![&m.key, &m.value],
        EntryExpr::StructField(f) => vec![&f.value],
    }
}

/// A read-only view of the headers or the query parameters of the exchange that behaves
/// as the CEL map [`headers_map`] / [`ExchangeResolver::query_map`] would build, without
/// building it: indexing looks the one key up. Keys are compared exactly, as map keys
/// are; a repeated header's or query parameter's first value wins (as in the map, and as
/// `request.header.x` / `request.query.x` resolve).
#[derive(Debug, Clone, Copy)]
enum MapView<'a> {
    Headers(&'a Headers),
    /// The raw query string.
    Query(&'a str),
}

impl<'a> MapView<'a> {
    fn get(&self, key: &str) -> Option<Cow<'a, str>> {
        match *self {
            MapView::Headers(h) => h
                .iter()
                .find(|(n, _)| *n == key)
                .map(|(_, v)| Cow::Borrowed(v)),
            MapView::Query(qs) => query_pairs_raw(qs)
                .find(|(k, _)| percent_decode(k) == key)
                .map(|(_, v)| percent_decode(v)),
        }
    }

    fn contains(&self, key: &str) -> bool {
        match *self {
            MapView::Headers(h) => h.iter().any(|(n, _)| n == key),
            MapView::Query(qs) => query_pairs_raw(qs).any(|(k, _)| percent_decode(k) == key),
        }
    }

    /// The entries of the full map, one per distinct key.
    fn entries(&self) -> Vec<(Cow<'a, str>, Cow<'a, str>)> {
        let mut out: Vec<(Cow<'a, str>, Cow<'a, str>)> = Vec::new();
        match *self {
            MapView::Headers(h) => {
                for (n, v) in h.iter() {
                    if !out.iter().any(|(k, _)| k == n) {
                        out.push((Cow::Borrowed(n), Cow::Borrowed(v)));
                    }
                }
            }
            MapView::Query(qs) => {
                for (k, v) in query_pairs_raw(qs) {
                    let k = percent_decode(k);
                    if !out.iter().any(|(ok, _)| *ok == k) {
                        out.push((k, percent_decode(v)));
                    }
                }
            }
        }
        out
    }

    fn is_empty(&self) -> bool {
        match *self {
            MapView::Headers(h) => h.is_empty(),
            MapView::Query(qs) => query_pairs_raw(qs).next().is_none(),
        }
    }
}

fn string_key(key: &dyn Val) -> Option<&str> {
    key.downcast_ref::<CelString>().map(CelString::inner)
}

/// A key a map can be looked up with (as `cel`'s own map does): a string, or a number or a
/// bool, which a map of string keys never has.
fn is_lookup_key(key: &dyn Val) -> bool {
    string_key(key).is_some()
        || key.downcast_ref::<CelInt>().is_some()
        || key.downcast_ref::<CelUInt>().is_some()
        || key.downcast_ref::<CelBool>().is_some()
        || key.downcast_ref::<CelDouble>().is_some()
}

/// The error for a key the map does not have, worded as `cel`'s own map words it.
fn no_such_key(key: &dyn Val) -> ExecutionError {
    let key = if let Some(s) = string_key(key) {
        s.to_owned()
    } else if let Some(i) = key.downcast_ref::<CelInt>() {
        i.inner().to_string()
    } else if let Some(u) = key.downcast_ref::<CelUInt>() {
        u.inner().to_string()
    } else if let Some(d) = key.downcast_ref::<CelDouble>() {
        d.inner().to_string()
    } else if let Some(b) = key.downcast_ref::<CelBool>() {
        b.inner().to_string()
    } else {
        String::new()
    };
    ExecutionError::NoSuchKey(Arc::new(key))
}

impl Val for MapView<'_> {
    fn get_type(&self) -> &Type {
        <Self as Val>::cel_type()
    }

    fn cel_type() -> &'static Type {
        &MAP_TYPE
    }

    fn as_container(&self) -> Option<&dyn Container> {
        Some(self)
    }

    fn as_indexer<'b, 'v>(&'b self) -> Option<&'b (dyn Indexer + 'v)>
    where
        Self: 'v,
    {
        Some(self)
    }

    fn as_sizer(&self) -> Option<&dyn Sizer> {
        Some(self)
    }

    fn as_zeroer(&self) -> Option<&dyn Zeroer> {
        Some(self)
    }

    /// Equal to a map with the same entries, as a built map would be. (Conditions that
    /// compare these maps get built maps; this is for completeness.)
    fn equals(&self, other: &dyn Val) -> bool {
        if other.get_type().kind() != Kind::Map {
            return false;
        }
        let (Some(sizer), Some(indexer)) = (other.as_sizer(), other.as_indexer()) else {
            return false;
        };
        let entries = self.entries();
        i64::try_from(entries.len()).is_ok_and(|n| *sizer.size().inner() == n)
            && entries.iter().all(|(k, v)| {
                indexer
                    .get(&CelString::from(k.as_ref()))
                    .is_ok_and(|ov| CelString::from(v.as_ref()).equals(ov.as_ref()))
            })
    }

    fn clone_as_boxed<'v>(&self) -> Box<dyn Val + 'v>
    where
        Self: 'v,
    {
        Box::new(*self)
    }
}

impl Indexer for MapView<'_> {
    fn get<'b, 'v>(&'b self, key: &dyn Val) -> Result<CowVal<'b, 'v>, ExecutionError>
    where
        Self: 'v,
    {
        match string_key(key).and_then(|k| MapView::get(self, k)) {
            Some(v) => Ok(CowVal::owned(CelString::from(v))),
            None if is_lookup_key(key) => Err(no_such_key(key)),
            None => Err(ExecutionError::UnexpectedType {
                got: key.get_type().name().to_owned(),
                want: "map key".to_owned(),
            }),
        }
    }

    fn steal<'v>(self: Box<Self>, key: &dyn Val) -> Result<Box<dyn Val + 'v>, ExecutionError>
    where
        Self: 'v,
    {
        Indexer::get(self.as_ref(), key).map(CowVal::into_owned)
    }
}

impl Container for MapView<'_> {
    fn contains(&self, key: &dyn Val) -> Result<bool, ExecutionError> {
        if string_key(key).is_some_and(|k| MapView::contains(self, k)) {
            Ok(true)
        } else if is_lookup_key(key) {
            Ok(false)
        } else {
            Err(ExecutionError::UnsupportedKeyType(
                cel::Value::try_from(key).unwrap_or(cel::Value::Null),
            ))
        }
    }
}

impl Sizer for MapView<'_> {
    fn size(&self) -> CelInt {
        i64::try_from(self.entries().len())
            .unwrap_or(i64::MAX)
            .into()
    }
}

impl Zeroer for MapView<'_> {
    fn is_zero_value(&self) -> bool {
        self.is_empty()
    }
}

struct ExchangeResolver<'a> {
    ex: &'a Exchange,
    /// Answer the header and query maps with views (see [`Condition::lazy_maps`]).
    lazy_maps: bool,
    request_headers: MapView<'a>,
    /// Computed on first use, as are `path` and `host`.
    query: OnceLock<MapView<'a>>,
    response_headers: Option<MapView<'a>>,
    // The common strings, as values lent out without allocating. They borrow the exchange.
    method: CelString<'a>,
    path: OnceLock<CelString<'a>>,
    uri: CelString<'a>,
    host: OnceLock<CelString<'a>>,
    scheme: CelString<'a>,
    flow: CelString<'a>,
}

fn str_val(s: &str) -> cel::Value {
    cel::Value::String(Arc::new(s.to_owned()))
}

/// A built value (maps and the like) as a CEL value.
fn owned_val<'b>(v: cel::Value) -> Option<CowVal<'b, 'b>> {
    let boxed: Box<dyn Val> = v.try_into().ok()?;
    Some(CowVal::Owned(boxed))
}

fn headers_map(h: &Headers) -> cel::Value {
    let mut m: HashMap<Key, cel::Value> = HashMap::with_capacity(h.len());
    for (n, v) in h.iter() {
        // First value wins, as in `Headers::get`.
        m.entry(Key::String(Arc::new(n.to_owned())))
            .or_insert_with(|| str_val(v));
    }
    cel::Value::Map(Map { map: Arc::new(m) })
}

fn to_cel(v: ValueRef<'_>) -> cel::Value {
    match v {
        ValueRef::Str(s) => str_val(s),
        ValueRef::Int(i) => cel::Value::Int(i),
        ValueRef::Float(f) => cel::Value::Float(f),
        ValueRef::Bool(b) => cel::Value::Bool(b),
    }
}

/// `v` as a CEL value, strings borrowed where the exchange holds them.
fn resolved_val(v: Resolved<'_>) -> CowVal<'_, '_> {
    match v {
        Resolved::Text(s) => CowVal::owned(CelString::from(s)),
        Resolved::Int(i) => CowVal::owned(CelInt::from(i)),
        Resolved::Float(f) => CowVal::owned(CelDouble::from(f)),
        Resolved::Bool(b) => CowVal::owned(CelBool::from(b)),
    }
}

fn map_of(entries: Vec<(&str, cel::Value)>) -> cel::Value {
    let m: HashMap<Key, cel::Value> = entries
        .into_iter()
        .map(|(k, v)| (Key::String(Arc::new(k.to_owned())), v))
        .collect();
    cel::Value::Map(Map { map: Arc::new(m) })
}

/// Inserts `value` at the dotted `path` inside nested maps.
fn insert_nested(root: &mut HashMap<String, Nested>, path: &str, value: cel::Value) {
    match path.split_once('.') {
        None => {
            root.insert(path.to_owned(), Nested::Leaf(value));
        }
        Some((head, tail)) => {
            let entry = root
                .entry(head.to_owned())
                .or_insert_with(|| Nested::Branch(HashMap::new()));
            if let Nested::Leaf(_) = entry {
                // A scalar and a map under one name: the map wins for member access.
                *entry = Nested::Branch(HashMap::new());
            }
            if let Nested::Branch(m) = entry {
                insert_nested(m, tail, value);
            }
        }
    }
}

enum Nested {
    Leaf(cel::Value),
    Branch(HashMap<String, Nested>),
}

impl Nested {
    fn into_value(self) -> cel::Value {
        match self {
            Nested::Leaf(v) => v,
            Nested::Branch(m) => {
                let m: HashMap<Key, cel::Value> = m
                    .into_iter()
                    .map(|(k, v)| (Key::String(Arc::new(k)), v.into_value()))
                    .collect();
                cel::Value::Map(Map { map: Arc::new(m) })
            }
        }
    }
}

impl<'a> ExchangeResolver<'a> {
    fn new(ex: &'a Exchange, lazy_maps: bool) -> Self {
        let r = &ex.request;
        Self {
            ex,
            lazy_maps,
            request_headers: MapView::Headers(&r.headers),
            query: OnceLock::new(),
            response_headers: ex.response.as_ref().map(|r| MapView::Headers(&r.headers)),
            method: CelString::from(r.method.as_str()),
            path: OnceLock::new(),
            uri: CelString::from(r.uri.as_str()),
            host: OnceLock::new(),
            scheme: CelString::from(r.scheme.as_str()),
            flow: CelString::from(ex.flow.as_str()),
        }
    }

    fn request_map(&self) -> cel::Value {
        let r = &self.ex.request;
        let headers = headers_map(&r.headers);
        map_of(vec![
            ("method", str_val(&r.method)),
            ("path", str_val(r.path())),
            ("uri", str_val(&r.uri)),
            ("host", str_val(&r.host)),
            ("scheme", str_val(&r.scheme)),
            ("headers", headers.clone()),
            ("header", headers),
            ("query", self.query_map()),
        ])
    }

    fn query_map(&self) -> cel::Value {
        let mut query: HashMap<Key, cel::Value> = HashMap::new();
        for (k, v) in crate::vars::query_pairs(self.ex.request.query_string()) {
            // First value wins, as in `request.query.x`.
            query
                .entry(Key::String(Arc::new(k)))
                .or_insert_with(|| cel::Value::String(Arc::new(v)));
        }
        cel::Value::Map(Map {
            map: Arc::new(query),
        })
    }

    /// A header or query map: the view, or the built map when the condition needs one.
    fn map_val<'b>(
        &'b self,
        view: &'b MapView<'a>,
        build: impl FnOnce() -> cel::Value,
    ) -> Option<CowVal<'b, 'b>> {
        if self.lazy_maps {
            Some(CowVal::Borrowed(view))
        } else {
            owned_val(build())
        }
    }

    /// Resolves `name`. CEL asks for the longest dotted name first (`request.method`
    /// before `request`), so common lookups are answered directly, without building maps;
    /// strings borrow from the exchange. Every name a template can use resolves through
    /// [`Exchange::resolve`]; only the map-valued names are CEL's own.
    fn value_of<'b>(&'b self, name: &str) -> Option<CowVal<'b, 'b>> {
        let ex = self.ex;
        let r = &ex.request;
        match name {
            "request.headers" | "request.header" => {
                return self.map_val(&self.request_headers, || headers_map(&r.headers))
            }
            "request.query" => {
                let view = self.query.get_or_init(|| MapView::Query(r.query_string()));
                return self.map_val(view, || self.query_map());
            }
            "request" => return owned_val(self.request_map()),
            "response.headers" | "response.header" => {
                let (resp, view) = ex.response.as_ref().zip(self.response_headers.as_ref())?;
                return self.map_val(view, || headers_map(&resp.headers));
            }
            "response" => {
                let r = ex.response.as_ref()?;
                let headers = headers_map(&r.headers);
                return owned_val(map_of(vec![
                    ("status", cel::Value::Int(i64::from(r.status))),
                    ("code", cel::Value::Int(i64::from(r.status))),
                    ("headers", headers.clone()),
                    ("header", headers),
                ]));
            }
            "flow" => return owned_val(map_of(vec![("name", str_val(&ex.flow))])),
            "client" => {
                return owned_val(map_of(vec![(
                    "ip",
                    ex.client_ip().map_or(cel::Value::Null, str_val),
                )]))
            }
            _ => {}
        }
        let builtin = Builtin::parse(name);
        // The common strings, lent without allocating: the values `resolve` gives.
        match builtin {
            Some(Builtin::Method) => return Some(CowVal::Borrowed(&self.method)),
            Some(Builtin::Path) => {
                return Some(CowVal::Borrowed(
                    self.path.get_or_init(|| CelString::from(r.path())),
                ))
            }
            Some(Builtin::Uri) => return Some(CowVal::Borrowed(&self.uri)),
            Some(Builtin::Host) => {
                return Some(CowVal::Borrowed(
                    self.host.get_or_init(|| CelString::from(r.host.as_str())),
                ))
            }
            Some(Builtin::Scheme) => return Some(CowVal::Borrowed(&self.scheme)),
            Some(Builtin::FlowName) => return Some(CowVal::Borrowed(&self.flow)),
            _ => {}
        }
        if let Some(v) = ex.resolve_with(name, builtin) {
            return Some(resolved_val(v));
        }
        if builtin == Some(Builtin::ClientIp) {
            // An unknown client is null (`client.ip == null`), not an error.
            return Some(CowVal::owned(CelNull));
        }
        if name.starts_with("request.") || name.starts_with("response.") {
            // Let CEL select the field from the parent map (e.g. `request.query['page']`).
            return None;
        }
        // A prefix of dotted variables becomes a nested map: `ratelimit.q.used` is
        // reachable as `ratelimit.q.used` in CEL, and `ratelimit.q` is a map.
        let prefix_len = name.len() + 1;
        let mut root: HashMap<String, Nested> = HashMap::new();
        let under = |k: &str| {
            k.len() > prefix_len && k.starts_with(name) && k.as_bytes()[name.len()] == b'.'
        };
        ex.for_each_var(&mut |k, v| {
            if under(k) {
                insert_nested(&mut root, &k[prefix_len..], to_cel(v));
            }
        });
        for (k, v) in &ex.attributes {
            if under(k) {
                insert_nested(&mut root, &k[prefix_len..], str_val(v));
            }
        }
        if root.is_empty() {
            return None;
        }
        owned_val(Nested::Branch(root).into_value())
    }
}

impl VariableResolver for ExchangeResolver<'_> {
    fn resolve<'b>(&'b self, variable: &str) -> Option<CowVal<'b, 'b>> {
        self.value_of(variable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::expr::Template;
    use crate::vars::{Headers, RequestInfo};

    fn ex() -> Exchange {
        let mut h = Headers::new();
        h.push(":method".into(), "GET".into());
        h.push(":path".into(), "/v1/models?page=2".into());
        h.push(":authority".into(), "api.local".into());
        h.push("x-tier".into(), "gold".into());
        let mut ex = Exchange {
            flow: "demo".into(),
            request: RequestInfo::from_headers(h),
            ..Default::default()
        };
        ex.set_var("client_id", "c-1");
        ex.set_var("ratelimit.q1.available", 7);
        ex
    }

    #[test]
    fn conditions_over_request_and_vars() {
        let ex = ex();
        let t = |s: &str| Condition::compile(s).unwrap().eval(&ex);
        assert!(t("request.method == 'GET'"));
        assert!(t("request.path.startsWith('/v1/')"));
        assert!(t("request.headers['x-tier'] == 'gold'"));
        assert!(t("request.query['page'] == '2'"));
        assert!(t("client_id == 'c-1'"));
        assert!(t("ratelimit.q1.available > 5"));
        assert!(t("flow.name == 'demo'"));
        assert!(!t("request.header.x_missing == 'a'"));
        assert!(t("request.query.page == '2'"));
        assert!(t("request.uri == '/v1/models?page=2'"));
        assert!(!t("has(request.headers.host)"));
        assert!(t("ratelimit.q1 == {'available': 7}"));
        assert!(!t("request.headers['x-missing'] == 'a'"));
        assert!(!t("'x-missing' in request.headers"));
        assert!(!t("unknown_var == 1"));
        assert!(!t("1 + 1"));
    }

    /// Headers with a repeated name, a name not in lower case, and a query string with a
    /// repeated, an encoded and a valueless parameter.
    fn tricky() -> Exchange {
        let mut h = Headers::new();
        h.push(":method".into(), "POST".into());
        h.push(":path".into(), "/v1?page=2&page=3&a%20b=c+d&flag&=e".into());
        h.push(":authority".into(), "api.local".into());
        h.push("x-tier".into(), "gold".into());
        h.push("x-tier".into(), "silver".into());
        h.push("X-Up".into(), "1".into());
        h.push("content-type".into(), "application/json".into());
        let mut ex = Exchange {
            request: RequestInfo::from_headers(h),
            ..Default::default()
        };
        let mut rh = Headers::new();
        rh.push(":status".into(), "200".into());
        rh.push("content-type".into(), "text/plain".into());
        ex.response = Some(crate::vars::ResponseInfo {
            status: 200,
            headers: rh,
        });
        ex
    }

    /// Evaluates `src` with the maps as views (`lazy`) or built.
    fn eval_with(ex: &Exchange, src: &str, lazy: bool) -> Result<cel::Value, ExecutionError> {
        let program = ENV.compile(src).unwrap();
        let resolver = ExchangeResolver::new(ex, lazy);
        let mut ctx = Context::with_env(ENV.clone());
        ctx.set_variable_resolver(&resolver);
        program.execute(&ctx)
    }

    #[test]
    fn map_views_answer_as_the_built_maps() {
        let ex = tricky();
        let empty = Exchange::default();
        for src in [
            "request.headers['x-tier']",
            "request.header['content-type'] == 'application/json'",
            "request.headers['X-Up']",
            "request.headers['x-up']",
            "request.headers['missing']",
            "request.headers[1]",
            "request.headers[1.5]",
            "request.headers[true]",
            "request.headers[[1]]",
            "request.headers.x_missing == 'a'",
            "request.headers['x-missing'] == 'a' || true",
            "has(request.headers.host)",
            "has(request.headers.x_tier)",
            "has(request.query.page)",
            "has(request.query.flag)",
            "'x-tier' in request.headers",
            "'X-TIER' in request.headers",
            "'missing' in request.headers",
            "1 in request.headers",
            "[1] in request.headers",
            "!('missing' in request.headers)",
            "size(request.headers)",
            "request.headers.size()",
            "size(request.query)",
            "size(response.headers)",
            "request.query['page']",
            "request.query.page",
            "request.query['a b']",
            "request.query['a%20b']",
            "request.query['flag']",
            "request.query['']",
            "request.query['nope']",
            "'flag' in request.query",
            "request.headers[?'x-tier'].orValue('none')",
            "request.headers[?'missing'].orValue('none')",
            "request.headers.?x_missing.orValue('none')",
            "response.headers['content-type']",
            "response.header['x-tier']",
            "request.headers['x-tier'].startsWith('g')",
            "size(request.headers['x-tier'])",
        ] {
            assert!(
                maps_only_indexed(ENV.compile(src).unwrap().expression(), false),
                "`{src}` should use views"
            );
            for ex in [&ex, &empty] {
                assert_eq!(eval_with(ex, src, false), eval_with(ex, src, true), "{src}");
            }
        }
    }

    #[test]
    fn conditions_needing_whole_maps_get_built_maps() {
        let ex = tricky();
        let t = |s: &str| Condition::compile(s).unwrap();
        for (src, expected) in [
            // `page=2&page=3`: the first value, as `request.query.page` and Apigee's
            // `request.queryparam.page` give it (the map used to keep the last, `3`).
            (
                "request.query == {'page': '2', 'a b': 'c d', 'flag': '', '': 'e'}",
                true,
            ),
            (
                "{'page': '2', 'a b': 'c d', 'flag': '', '': 'e'} == request.query",
                true,
            ),
            ("request.headers == {}", false),
            ("request.headers != {}", true),
            ("request.headers.exists(k, k == 'x-tier')", true),
            ("request.headers.all(k, k != 'x-nope')", true),
            (
                "request.headers.filter(k, k.startsWith('x-')).size() == 1",
                true,
            ),
            ("[request.headers][0]['x-tier'] == 'gold'", true),
            ("dyn(request.headers)['x-tier'] == 'gold'", true),
            ("{'h': request.headers}.h['x-tier'] == 'gold'", true),
            ("type(request.headers) == map", true),
            ("request.headers in [request.headers]", true),
            (
                "response.headers == {':status': '200', 'content-type': 'text/plain'}",
                true,
            ),
            ("request.headers", false),
        ] {
            let c = t(src);
            assert!(!c.lazy_maps, "`{src}` needs built maps");
            assert_eq!(c.eval(&ex), expected, "{src}");
        }
        assert!(t("request.headers['a'] == 'b' && size(request.query) > 0").lazy_maps);
        assert!(t("request.method == 'GET'").lazy_maps);
    }

    /// A view used where only a built map would do fails or compares cleanly: no panic.
    #[test]
    fn views_out_of_place_fail_cleanly() {
        let ex = tricky();
        let lazy = |src: &str| eval_with(&ex, src, true);
        assert_eq!(
            lazy("request.headers == {':method': 'POST', ':path': '/v1?page=2&page=3&a%20b=c+d&flag&=e', ':authority': 'api.local', 'x-tier': 'gold', 'X-Up': '1', 'content-type': 'application/json'}"),
            Ok(cel::Value::Bool(true))
        );
        assert_eq!(lazy("request.headers == {}"), Ok(cel::Value::Bool(false)));
        assert_eq!(
            lazy("request.headers == request.header"),
            Ok(cel::Value::Bool(true))
        );
        assert_eq!(lazy("request.headers == 1"), Ok(cel::Value::Bool(false)));
        assert!(lazy("{} == request.headers").is_ok());
        assert!(lazy("request.headers").is_err());
        assert!(lazy("request.headers.exists(k, k == 'x-tier')").is_err());
        assert_eq!(
            lazy("type(request.headers) == map"),
            Ok(cel::Value::Bool(true))
        );
        assert_eq!(
            lazy("[request.headers][0]['x-tier']"),
            Ok(cel::Value::String(Arc::new("gold".into())))
        );
        assert!(lazy("optional.ofNonZeroValue(request.headers).hasValue()").is_ok());
    }

    /// Every name a template can use means the same in a condition: both go through
    /// `Exchange::resolve`. Where they disagreed before this test was written (templates
    /// through `Exchange::lookup`, CEL through its own table):
    ///
    /// | name | template | CEL |
    /// |---|---|---|
    /// | `request.host` | `api.example.com:8443` | `api.example.com` (port stripped) |
    /// | `request.query.page` / `request.query['page']` (sent twice) | first, `2` | last, `3` |
    /// | `request.query` as a whole map | - | last value per key |
    /// | `request.verb`, `request.queryparam.x`, `request.querystring` | yes | unknown |
    /// | `request.content`, `response.content`, `response.status.code` | yes | unknown |
    /// | `client.address` | yes | unknown |
    /// | Envoy attributes under `request.`/`response.` (`request.id`) | yes | unknown |
    /// | `request.header.x` when a variable of that name was also set | the header | the variable |
    ///
    /// Now: Apigee's first query value (`request.queryparam.x`), the host as sent with its
    /// port (Envoy's `request.host`, Apigee's `request.header.host`), every name in both.
    #[test]
    fn templates_and_conditions_agree_on_every_name() {
        let mut h = Headers::new();
        h.push(":method".into(), "POST".into());
        h.push(":path".into(), "/v1/chat?page=2&page=3&a%20b=c+d".into());
        h.push(":authority".into(), "api.example.com:8443".into());
        h.push(":scheme".into(), "https".into());
        h.push("accept".into(), "text/plain".into());
        h.push("accept".into(), "application/json".into());
        let mut ex = Exchange {
            flow: "chat".into(),
            request: RequestInfo::from_headers(h),
            request_body: Some(b"{\"model\":\"m\"}".to_vec()),
            response_body: Some(b"done".to_vec()),
            ..Default::default()
        };
        let mut rh = Headers::new();
        rh.push("content-type".into(), "text/plain".into());
        ex.response = Some(crate::vars::ResponseInfo {
            status: 201,
            headers: rh,
        });
        ex.attributes
            .insert("source.address".into(), "10.0.0.9:4242".into());
        ex.attributes.insert("request.id".into(), "r-1".into());
        ex.set_var("request.header.accept", "shadowed");
        ex.set_var("tier", "gold");
        ex.state.add_quota(crate::vars::state::QuotaResult {
            prefix: "ratelimit.q.".into(),
            allowed: 10,
            used: 3,
            available: 7,
            exceed: 0,
            expiry: 60_000,
            identifier: "app-1".into(),
        });
        let cel_text = |src: &str, lazy: bool| match eval_with(&ex, src, lazy) {
            Ok(cel::Value::String(s)) => Some(s.to_string()),
            Ok(cel::Value::Int(i)) => Some(i.to_string()),
            Ok(other) => panic!("{src}: {other:?}"),
            Err(_) => None,
        };
        for (name, cel_src, expected) in [
            ("request.method", "request.method", "POST"),
            ("request.verb", "request.verb", "POST"),
            ("request.path", "request.path", "/v1/chat"),
            (
                "request.uri",
                "request.uri",
                "/v1/chat?page=2&page=3&a%20b=c+d",
            ),
            ("request.host", "request.host", "api.example.com:8443"),
            ("request.host", "request['host']", "api.example.com:8443"),
            ("request.scheme", "request.scheme", "https"),
            (
                "request.querystring",
                "request.querystring",
                "page=2&page=3&a%20b=c+d",
            ),
            ("request.query.page", "request.query.page", "2"),
            ("request.query.page", "request.query['page']", "2"),
            ("request.queryparam.page", "request.queryparam.page", "2"),
            ("request.query.page", "request['query']['page']", "2"),
            ("request.content", "request.content", "{\"model\":\"m\"}"),
            (
                "request.header.accept",
                "request.header.accept",
                "text/plain",
            ),
            (
                "request.headers.accept",
                "request.headers['accept']",
                "text/plain",
            ),
            ("response.status", "response.status", "201"),
            ("response.status.code", "response.status.code", "201"),
            ("response.code", "response.code", "201"),
            ("response.content", "response.content", "done"),
            (
                "response.header.content-type",
                "response.headers['content-type']",
                "text/plain",
            ),
            ("flow.name", "flow.name", "chat"),
            ("client.ip", "client.ip", "10.0.0.9"),
            ("client.address", "client.address", "10.0.0.9"),
            ("request.id", "request.id", "r-1"),
            ("tier", "tier", "gold"),
            ("ratelimit.q.used.count", "ratelimit.q.used.count", "3"),
            ("ratelimit.q.remaining", "ratelimit.q['remaining']", "7"),
        ] {
            let rendered = Template::compile(&format!("{{{name}}}"))
                .unwrap()
                .render(&ex);
            assert_eq!(rendered, expected, "template {{{name}}}");
            for lazy in [true, false] {
                assert_eq!(
                    cel_text(cel_src, lazy).as_deref(),
                    Some(expected),
                    "CEL {cel_src}"
                );
            }
        }
        // The whole query map holds first values too.
        assert!(
            Condition::compile("request.query == {'page': '2', 'a b': 'c d'}")
                .unwrap()
                .eval(&ex)
        );
        // Names neither knows are missing in both.
        for name in [
            "request.header.missing",
            "response.header.missing",
            "nothing",
        ] {
            assert_eq!(
                Template::compile(&format!("{{{name}}}"))
                    .unwrap()
                    .render(&ex),
                ""
            );
            assert_eq!(ex.resolve(name), None, "{name}");
        }
    }

    #[test]
    fn bad_condition_is_a_load_error() {
        let err = Condition::compile("request.method ==").unwrap_err();
        assert!(err.to_string().contains("request.method =="));
    }

    #[test]
    fn templates() {
        let ex = ex();
        let r = |s: &str| Template::compile(s).unwrap().render(&ex);
        assert_eq!(r("plain"), "plain");
        assert_eq!(r("{request.method} {request.path}"), "GET /v1/models");
        assert_eq!(r("id={client_id};"), "id=c-1;");
        assert_eq!(r(r#"{"a":1,"b":"{flow.name}"}"#), r#"{"a":1,"b":"demo"}"#);
        assert_eq!(r("{missing}x"), "x");
        assert_eq!(r("{ not a var }"), "{ not a var }");
        assert_eq!(r("{"), "{");
        assert!(Template::compile("abc").unwrap().is_static());
    }
}
