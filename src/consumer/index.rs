//! The in-memory index the data path reads: key hash → app and key, and products with their
//! operations compiled. Built from file objects and store objects together; replaced
//! atomically when either changes, so verification never touches disk or network.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use subtle::ConstantTimeEq;

use crate::openapi::variable_end;

use super::{
    digest_of_hash, key_digest, ApiKey, ApiProduct, App, AppStatus, KeyDigest, KeyStatus, Operation,
};

/// Hashes a SHA-256 digest by its first eight bytes: the digest is already uniform, so
/// SipHash over it again would only cost time on every request.
#[derive(Default)]
struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // `[u8; 32]` hashes as its length then its bytes; keep the first 8 digest bytes.
        if bytes.len() >= 8 {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[..8]);
            self.0 = u64::from_le_bytes(b);
        }
    }
}

type DigestMap<V> = HashMap<KeyDigest, V, BuildHasherDefault<DigestHasher>>;

/// One segment of a path template: literal text and `{variables}` (each matching a
/// non-empty run inside one segment), `*` (one whole segment) or `**` (the rest).
#[derive(Debug, Clone, PartialEq)]
enum Seg {
    Pieces(Vec<Piece>),
    Any,
    Rest,
}

#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Lit(String),
    Var,
}

fn compile_segment(s: &str) -> Result<Seg, String> {
    match s {
        "*" => return Ok(Seg::Any),
        "**" => return Ok(Seg::Rest),
        _ => {}
    }
    let mut pieces = Vec::new();
    let mut rest = s;
    while !rest.is_empty() {
        match rest.find('{') {
            Some(0) => {
                let close = rest
                    .find('}')
                    .ok_or_else(|| format!("unclosed `{{` in `{s}`"))?;
                if matches!(pieces.last(), Some(Piece::Var)) {
                    return Err(format!("two variables in a row in `{s}`"));
                }
                pieces.push(Piece::Var);
                rest = &rest[close + 1..];
            }
            Some(i) => {
                pieces.push(Piece::Lit(rest[..i].to_owned()));
                rest = &rest[i..];
            }
            None => {
                pieces.push(Piece::Lit(rest.to_owned()));
                rest = "";
            }
        }
    }
    Ok(Seg::Pieces(pieces))
}

/// Matches one path segment in linear time: variables never follow each other, so a
/// literal after a variable is taken at its leftmost occurrence past the variable's first
/// character (leaving the most room for the rest), and a literal ending the segment must
/// be its suffix. No backtracking, whatever the template.
fn match_pieces(pieces: &[Piece], mut s: &str) -> bool {
    let mut i = 0;
    while let Some(piece) = pieces.get(i) {
        match (piece, pieces.get(i + 1)) {
            (Piece::Lit(l), _) => match s.strip_prefix(l.as_str()) {
                Some(r) => s = r,
                None => return false,
            },
            (Piece::Var, None) => return !s.is_empty(),
            (Piece::Var, Some(Piece::Lit(l))) => {
                let Some(at) = variable_end(s, l, i + 2 == pieces.len()) else {
                    return false;
                };
                s = &s[at + l.len()..];
                i += 1;
            }
            (Piece::Var, Some(Piece::Var)) => return false,
        }
        i += 1;
    }
    s.is_empty()
}

/// True when `path` could mean another path to the upstream than the one matched here: a
/// `.` or `..` segment (also percent-encoded, or followed by `;params` as Tomcat reads
/// `..;`), an encoded slash (`%2F`) or any backslash (raw or `%5C`, a separator to some
/// servers).
///
/// Such paths are refused rather than normalised: normalising here would authorise the
/// normalised path while the upstream receives (and may interpret differently) the raw one,
/// and any disagreement between the two readings is exactly the hole. Envoy's
/// `normalize_path` and `path_with_escaped_slashes_action` make these paths never arrive.
/// Empty segments (`//`) are let through: no literal, `*` or `{var}` matches an empty
/// segment, so one can only fall under a trailing `**`, which allows whatever follows anyway.
pub fn ambiguous_path(path: &str) -> bool {
    // One byte scan, no allocation: this runs on every verified request. Most paths have
    // no dot, `%` or backslash and are done after the first loop.
    let b = path.as_bytes();
    if !b.iter().any(|c| matches!(c, b'.' | b'%' | b'\\')) {
        return false;
    }
    let mut seg_start = 0;
    // Where the segment's `;` parameters begin (`..;x` is still `..`).
    let mut params: Option<usize> = None;
    for (i, &c) in b.iter().enumerate() {
        match c {
            b'\\' => return true,
            b'%' if i + 2 < b.len()
                && matches!((b[i + 1], b[i + 2] | 0x20), (b'2', b'f') | (b'5', b'c')) =>
            {
                return true
            }
            b'/' => {
                if is_dot_segment(&b[seg_start..params.unwrap_or(i)]) {
                    return true;
                }
                seg_start = i + 1;
                params = None;
            }
            b';' if params.is_none() => params = Some(i),
            _ => {}
        }
    }
    is_dot_segment(&b[seg_start..params.unwrap_or(b.len())])
}

/// `.` or `..`, each dot raw or as `%2e` / `%2E`.
fn is_dot_segment(mut seg: &[u8]) -> bool {
    let mut dots = 0;
    while !seg.is_empty() {
        seg = match seg {
            [b'.', rest @ ..] => rest,
            [b'%', b'2', e, rest @ ..] if *e | 0x20 == b'e' => rest,
            _ => return false,
        };
        dots += 1;
        if dots > 2 {
            return false;
        }
    }
    dots > 0
}

/// A compiled path template.
#[derive(Debug, Clone)]
pub struct PathTemplate {
    segs: Vec<Seg>,
}

impl PathTemplate {
    pub fn compile(t: &str) -> Result<Self, String> {
        let body = t
            .strip_prefix('/')
            .ok_or_else(|| format!("path template `{t}` must start with `/`"))?;
        let segs = body
            .split('/')
            .map(compile_segment)
            .collect::<Result<Vec<_>, _>>()?;
        if segs.iter().rev().skip(1).any(|s| *s == Seg::Rest) {
            return Err(format!("`**` may only end the path template `{t}`"));
        }
        Ok(Self { segs })
    }

    pub fn matches(&self, path: &str) -> bool {
        let Some(body) = path.strip_prefix('/') else {
            return false;
        };
        let mut parts = body.split('/');
        for seg in &self.segs {
            match seg {
                Seg::Rest => return true,
                Seg::Any => {
                    if parts.next().is_none_or(str::is_empty) {
                        return false;
                    }
                }
                Seg::Pieces(p) => match parts.next() {
                    Some(s) if match_pieces(p, s) => {}
                    _ => return false,
                },
            }
        }
        parts.next().is_none()
    }
}

#[derive(Debug)]
pub struct CompiledOperation {
    path: PathTemplate,
    methods: Vec<String>,
    models: Vec<String>,
}

/// A product with its operations compiled.
#[derive(Debug)]
pub struct Product {
    pub spec: ApiProduct,
    ops: Vec<CompiledOperation>,
}

impl Product {
    pub fn compile(spec: ApiProduct) -> Result<Self, String> {
        let ops = spec
            .operations
            .iter()
            .enumerate()
            .map(|(i, o)| {
                Ok(CompiledOperation {
                    path: PathTemplate::compile(&o.path)
                        .map_err(|e| format!("operations[{i}].path: {e}"))?,
                    methods: o.methods.iter().map(|m| m.to_ascii_uppercase()).collect(),
                    models: o.models.clone(),
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        // One group, one count: its operations must agree on the limits they share.
        for (i, o) in spec.operations.iter().enumerate() {
            if o.group.is_empty() {
                continue;
            }
            if o.group.len() > 128 || o.group.chars().any(char::is_control) {
                return Err(format!(
                    "operations[{i}].group: at most 128 characters, no control characters"
                ));
            }
            if let Some(first) = spec.operations[..i].iter().find(|p| p.group == o.group) {
                if first.quota != o.quota || first.llm_token_quota != o.llm_token_quota {
                    return Err(format!(
                        "operations[{i}].group: the operations of group `{}` share one count and must carry the same quota and llmTokenQuota",
                        o.group
                    ));
                }
            }
        }
        Ok(Self { spec, ops })
    }

    /// True when an operation allows `method path` (and `model`, when the operation lists
    /// models). A product without operations allows nothing.
    pub fn allows(&self, method: &str, path: &str, model: Option<&str>) -> bool {
        self.operation_for(method, path, model).is_some()
    }

    /// The index of the first operation that allows the request.
    pub fn operation_for(&self, method: &str, path: &str, model: Option<&str>) -> Option<usize> {
        self.ops.iter().position(|o| {
            (o.methods.is_empty() || o.methods.iter().any(|m| m == method))
                && o.path.matches(path)
                && (o.models.is_empty() || model.is_some_and(|m| o.models.iter().any(|x| x == m)))
        })
    }

    /// True when an operation would allow `method path` if only the request named one of
    /// its models.
    fn wants_model(&self, method: &str, path: &str) -> bool {
        self.ops.iter().any(|o| {
            !o.models.is_empty()
                && (o.methods.is_empty() || o.methods.iter().any(|m| m == method))
                && o.path.matches(path)
        })
    }
}

/// Why a key was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    UnknownKey,
    KeyRevoked,
    KeyPending,
    KeyExpired,
    AppRevoked,
    NoProductForOperation,
    /// No product allows the operation without a model, one would with a listed model, and
    /// the request's model is unknown (not read from the body, no `model` template value).
    ModelUnknown,
}

/// A verified key: its app, the key record, and the product that allows the operation.
#[derive(Debug, Clone)]
pub struct Verified {
    pub app: Arc<App>,
    key_index: usize,
    pub product: Arc<Product>,
    /// The index in `product.spec.operations` of the operation the request matched.
    pub operation: usize,
}

impl Verified {
    pub fn key(&self) -> &ApiKey {
        &self.app.keys[self.key_index]
    }

    /// The operation the request matched.
    pub fn operation(&self) -> Option<&Operation> {
        self.product.spec.operations.get(self.operation)
    }
}

#[derive(Debug, Default)]
pub struct ConsumerIndex {
    by_hash: DigestMap<(Arc<App>, usize)>,
    products: HashMap<String, Arc<Product>>,
}

impl ConsumerIndex {
    /// Builds the index. Later apps win over earlier ones with the same key hash (callers
    /// pass file objects first, so the API cannot shadow a file key silently: the store
    /// refuses names taken by files).
    pub fn build(products: Vec<Arc<Product>>, apps: Vec<Arc<App>>) -> Self {
        let mut by_hash = DigestMap::with_capacity_and_hasher(apps.len(), Default::default());
        for app in apps {
            for (i, k) in app.keys.iter().enumerate() {
                // Stored hashes are checked on write; a malformed one can never match.
                if let Some(d) = digest_of_hash(&k.hash) {
                    by_hash.insert(d, (app.clone(), i));
                }
            }
        }
        let products = products
            .into_iter()
            .map(|p| (p.spec.name.clone(), p))
            .collect();
        Self { by_hash, products }
    }

    pub fn product(&self, name: &str) -> Option<&Arc<Product>> {
        self.products.get(name)
    }

    pub fn app_count(&self) -> usize {
        self.by_hash.len()
    }

    /// The chain key → app → products → operation, at time `now_ms`.
    pub fn verify(
        &self,
        key: &str,
        method: &str,
        path: &str,
        model: Option<&str>,
        now_ms: i64,
    ) -> Result<Verified, Refusal> {
        self.verify_at(key, method, path, model, || now_ms)
    }

    /// [`Self::verify`], reading the clock (`now_ms`) only for a key that expires.
    pub fn verify_at(
        &self,
        key: &str,
        method: &str,
        path: &str,
        model: Option<&str>,
        now_ms: impl FnOnce() -> i64,
    ) -> Result<Verified, Refusal> {
        let digest = key_digest(key);
        let (stored, (app, i)) = self
            .by_hash
            .get_key_value(&digest)
            .ok_or(Refusal::UnknownKey)?;
        // The map lookup already matched; compare again in constant time so no timing
        // difference depends on how much of a digest matched.
        if !bool::from(stored.ct_eq(&digest)) {
            return Err(Refusal::UnknownKey);
        }
        let k = &app.keys[*i];
        match k.status {
            KeyStatus::Approved => {}
            KeyStatus::Revoked => return Err(Refusal::KeyRevoked),
            KeyStatus::Pending => return Err(Refusal::KeyPending),
        }
        if k.expires_at.is_some_and(|e| e <= now_ms()) {
            return Err(Refusal::KeyExpired);
        }
        if app.status == AppStatus::Revoked {
            return Err(Refusal::AppRevoked);
        }
        if ambiguous_path(path) {
            return Err(Refusal::NoProductForOperation);
        }
        let mut products = app.products.iter().filter_map(|p| self.products.get(p));
        let Some((product, operation)) = products
            .clone()
            .find_map(|p| Some((p, p.operation_for(method, path, model)?)))
        else {
            return Err(
                if model.is_none() && products.any(|p| p.wants_model(method, path)) {
                    Refusal::ModelUnknown
                } else {
                    Refusal::NoProductForOperation
                },
            );
        };
        Ok(Verified {
            app: app.clone(),
            key_index: *i,
            product: product.clone(),
            operation,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consumer::{hash_key, Operation, Origin};

    #[test]
    fn templates() {
        let t = |p: &str, path: &str| PathTemplate::compile(p).unwrap().matches(path);
        assert!(t("/v1/models/{model}:predict", "/v1/models/gemini:predict"));
        assert!(!t("/v1/models/{model}:predict", "/v1/models/:predict"));
        assert!(!t("/v1/models/{model}:predict", "/v1/models/a/b:predict"));
        assert!(t("/v1/chat/completions", "/v1/chat/completions"));
        assert!(!t("/v1/chat/completions", "/v1/chat/completions/x"));
        assert!(t("/v1/*/items", "/v1/x/items"));
        assert!(!t("/v1/*/items", "/v1//items"));
        assert!(t("/v1/**", "/v1/a/b/c"));
        assert!(t("/v1/{a}-{b}", "/v1/x-y"));
        assert!(PathTemplate::compile("v1").is_err());
        assert!(PathTemplate::compile("/a/**/b").is_err());
        assert!(PathTemplate::compile("/{a").is_err());
        assert!(PathTemplate::compile("/{a}{b}").is_err());
    }

    fn product(name: &str, path: &str, methods: &[&str], models: &[&str]) -> Arc<Product> {
        Arc::new(
            Product::compile(ApiProduct {
                name: name.into(),
                description: String::new(),
                operations: vec![Operation {
                    path: path.into(),
                    methods: methods.iter().map(|s| s.to_string()).collect(),
                    models: models.iter().map(|s| s.to_string()).collect(),
                    ..Default::default()
                }],
                quota: None,
                llm_token_quota: None,
                approval_type: Default::default(),
                attributes: Default::default(),
                origin: Origin::File,
                revision: 0,
            })
            .unwrap(),
        )
    }

    fn app(name: &str, status: AppStatus, products: &[&str], keys: Vec<ApiKey>) -> Arc<App> {
        Arc::new(App {
            name: name.into(),
            developer_email: format!("{name}@example.com"),
            status,
            products: products.iter().map(|s| s.to_string()).collect(),
            keys,
            attributes: Default::default(),
            origin: Origin::File,
            revision: 0,
        })
    }

    fn key(id: &str, secret: &str, status: KeyStatus, expires_at: Option<i64>) -> ApiKey {
        ApiKey {
            id: id.into(),
            hash: hash_key(secret),
            status,
            expires_at,
            created_at: 0,
        }
    }

    #[test]
    fn the_chain_and_every_refusal() {
        let idx = ConsumerIndex::build(
            vec![
                product("chat", "/v1/chat/completions", &["POST"], &["gpt-4o"]),
                product("models", "/v1/models/**", &["GET"], &[]),
            ],
            vec![
                app(
                    "a1",
                    AppStatus::Approved,
                    &["chat", "models"],
                    vec![
                        key("k1", "good", KeyStatus::Approved, None),
                        key("k2", "revoked", KeyStatus::Revoked, None),
                        key("k3", "pending", KeyStatus::Pending, None),
                        key("k4", "old", KeyStatus::Approved, Some(1_000)),
                    ],
                ),
                app(
                    "a2",
                    AppStatus::Revoked,
                    &["chat"],
                    vec![key("k5", "gone", KeyStatus::Approved, None)],
                ),
            ],
        );
        let v = |k: &str, m: &str, p: &str, model: Option<&str>| idx.verify(k, m, p, model, 2_000);
        let ok = v("good", "POST", "/v1/chat/completions", Some("gpt-4o")).unwrap();
        assert_eq!(
            (
                ok.app.name.as_str(),
                ok.product.spec.name.as_str(),
                ok.key().id.as_str()
            ),
            ("a1", "chat", "k1")
        );
        assert_eq!(
            v("good", "GET", "/v1/models/x", None)
                .unwrap()
                .product
                .spec
                .name,
            "models"
        );
        assert_eq!(
            v("nope", "GET", "/v1/models/x", None).unwrap_err(),
            Refusal::UnknownKey
        );
        assert_eq!(
            v("revoked", "GET", "/v1/models/x", None).unwrap_err(),
            Refusal::KeyRevoked
        );
        assert_eq!(
            v("pending", "GET", "/v1/models/x", None).unwrap_err(),
            Refusal::KeyPending
        );
        assert_eq!(
            v("old", "GET", "/v1/models/x", None).unwrap_err(),
            Refusal::KeyExpired
        );
        assert_eq!(
            v("gone", "POST", "/v1/chat/completions", Some("gpt-4o")).unwrap_err(),
            Refusal::AppRevoked
        );
        assert_eq!(
            v("good", "POST", "/v1/chat/completions", Some("other-model")).unwrap_err(),
            Refusal::NoProductForOperation
        );
        assert_eq!(
            v("good", "DELETE", "/v1/models/x", None).unwrap_err(),
            Refusal::NoProductForOperation
        );
        // A model-restricted operation with no model known: its own refusal, so the policy
        // can say why instead of looking like a wrong key.
        assert_eq!(
            v("good", "POST", "/v1/chat/completions", None).unwrap_err(),
            Refusal::ModelUnknown
        );
        // Paths the upstream may read as another path never match, whatever the product.
        for path in [
            "/v1/models/../admin/x",
            "/v1/models/./x",
            "/v1/models/%2e%2E/admin",
            "/v1/models/x/..",
            "/v1/models/..;/admin",
            "/v1/models/a%2Fb",
            "/v1/models/a%2fb",
            "/v1/models/a\\..\\b",
            "/v1/models/a%5cb",
        ] {
            assert_eq!(
                v("good", "GET", path, None).unwrap_err(),
                Refusal::NoProductForOperation,
                "{path}"
            );
        }
        // Dots inside a segment and empty segments under `**` are fine.
        assert!(v("good", "GET", "/v1/models/gemini-1.5..pro", None).is_ok());
        assert!(v("good", "GET", "/v1/models/.well", None).is_ok());
        assert!(v("good", "GET", "/v1/models//x", None).is_ok());
    }

    #[test]
    fn ambiguous_paths() {
        assert!(ambiguous_path("/a/../b"));
        assert!(ambiguous_path("/.."));
        assert!(ambiguous_path("/a/%2E/b"));
        assert!(ambiguous_path("/a%2F..%2Fb"));
        assert!(ambiguous_path("/a\\b"));
        assert!(ambiguous_path("/a/.%2e/b"));
        assert!(ambiguous_path("/a/%2e"));
        assert!(!ambiguous_path("/a/.../b"));
        assert!(!ambiguous_path("/a/%2e%2e%2e/b"));
        assert!(!ambiguous_path("/a/%2/b"));
        assert!(!ambiguous_path("/a/b.c/..d/e.."));
        assert!(!ambiguous_path("/a//b"));
        assert!(!ambiguous_path("/v1/models/{model}:predict"));
        assert!(ambiguous_path("/a/..;x/b"));
        assert!(!ambiguous_path("/a/b;../c"));
        assert!(ambiguous_path("/a/%5Cb"));
        assert!(!ambiguous_path("/a/b%2"));
    }

    /// The one-pass scan agrees with the plain reading (split on `/`, drop `;` parameters,
    /// look for dot segments; any backslash or encoded separator) on every path over an
    /// alphabet of the bytes that matter, up to six bytes long.
    #[test]
    fn ambiguous_path_agrees_with_the_plain_reading() {
        fn plain(path: &str) -> bool {
            let lower = path.to_ascii_lowercase();
            path.contains('\\')
                || lower.contains("%2f")
                || lower.contains("%5c")
                || path
                    .split('/')
                    .any(|seg| is_dot_segment(seg.split(';').next().unwrap_or(seg).as_bytes()))
        }
        let alphabet = ['/', '.', '%', '2', 'e', 'F', ';', 'a', '\\'];
        let mut paths = vec![String::new()];
        for _ in 0..6 {
            let next: Vec<String> = paths
                .iter()
                .flat_map(|p| alphabet.iter().map(move |c| format!("{p}{c}")))
                .collect();
            for p in &next {
                assert_eq!(ambiguous_path(p), plain(p), "{p:?}");
            }
            paths = next;
        }
    }
}
