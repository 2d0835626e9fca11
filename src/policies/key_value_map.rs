//! `KeyValueMap`: gets, puts and deletes entries of a named key-value map (Apigee's
//! KeyValueMapOperations).
//!
//! ```yaml
//! spec:
//!   type: KeyValueMap
//!   map: creds
//!   scope: global                 # global | flow (keys are prefixed with `<flow>__`)
//!   expirySeconds: 30             # reads are cached this long (0: no cache)
//!   get:
//!   - key: ["{request.header.x-tenant}", token]   # composite: parts joined with `__`
//!     variable: upstream.token                    # default kvm.<map>.<key>
//!   put:
//!   - key: [last-model]
//!     value: "{request.header.x-model}"
//!     override: true              # (default) false: write only when the key is absent
//!   delete:
//!   - key: [stale]
//! ```
//!
//! Entries come from `KeyValueMap` documents (read from memory) and from the management API
//! (read from the store, then cached). A file entry wins over a store entry of the same key
//! and can be neither overwritten by a put nor removed by a delete (409 `FileDefined`). A
//! value over `maxValueBytes` (at most 64 KiB) is refused with 400 `InvalidValue`, a new
//! key in a map holding `maxEntries` with 507 `MapFull`, and a store call slower than
//! `storeTimeoutMs` fails with 503. A key with a part that renders empty, too long or with
//! control characters is refused (get: the variable stays unset; put and delete: a 400
//! `InvalidKey` fault). A template reading `{request.content}` runs the step on the body.
//! Secret entries become variables like any other (templates need them) and are never logged.
//!
//! Apigee differences: Apigee's `<Put override="false">` is its default, tollgate's
//! `override` defaults to `true` (as it always did); with `override: false` an existing
//! entry (a file entry included) is left as it is, without an error, as in Apigee, and the
//! write is conditional in the store (no race between two replicas). Apigee caches reads for
//! 300 s (`ExpiryTimeInSecs`) where tollgate's `expirySeconds` defaults to 30, so that a change
//! made through another replica shows sooner; `tollgate import` writes Apigee's value out.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::{parse_spec, BuildContext, SpecError};
use crate::expr::Template;
use crate::fault::Fault;
use crate::kvm::{check_key, check_value, KvmEntry};
use crate::pipeline::{Direction, Hook, Outcome, Policy};
use crate::store::StoreError;
use crate::vars::Exchange;

pub const TYPE: &str = "KeyValueMap";

fn default_expiry() -> u64 {
    30
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Spec {
    map: String,
    #[serde(default)]
    scope: Scope,
    #[serde(default = "default_expiry")]
    expiry_seconds: u64,
    #[serde(default)]
    get: Vec<GetSpec>,
    #[serde(default)]
    put: Vec<PutSpec>,
    #[serde(default)]
    delete: Vec<KeySpec>,
    /// Most entries a put may grow the map to.
    #[serde(default = "default_max_entries")]
    max_entries: usize,
    /// Largest value a put may write (at most [`crate::kvm::MAX_VALUE_BYTES`]).
    #[serde(default = "default_max_value")]
    max_value_bytes: usize,
    /// Longest wait for one store call.
    #[serde(default = "default_store_timeout")]
    store_timeout_ms: u64,
}

fn default_max_entries() -> usize {
    10_000
}
fn default_max_value() -> usize {
    crate::kvm::MAX_VALUE_BYTES
}
fn default_store_timeout() -> u64 {
    500
}

/// How long a counted map size is trusted before the store is asked again.
const COUNT_TTL: Duration = Duration::from_secs(5);

#[derive(Debug, Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
enum Scope {
    #[default]
    Global,
    Flow,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GetSpec {
    key: Vec<String>,
    #[serde(default)]
    variable: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PutSpec {
    key: Vec<String>,
    value: String,
    #[serde(default)]
    secret: bool,
    /// Overwrite an existing entry (default true); false writes only an absent key.
    #[serde(default, rename = "override")]
    overwrite: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeySpec {
    key: Vec<String>,
}

#[derive(Debug)]
struct Get {
    key: Vec<Template>,
    /// `None`: `kvm.<map>.<key>`.
    variable: Option<String>,
}

#[derive(Debug)]
struct Put {
    key: Vec<Template>,
    value: Template,
    secret: bool,
    overwrite: bool,
}

type ReadCache = moka::sync::Cache<String, Option<Arc<KvmEntry>>>;

#[derive(Debug)]
struct KeyValueMap {
    map: String,
    scope: Scope,
    services: crate::services::Services,
    cache: Option<ReadCache>,
    get: Vec<Get>,
    put: Vec<Put>,
    delete: Vec<Vec<Template>>,
    max_entries: usize,
    max_value: usize,
    store_timeout: Duration,
    /// Some template reads the message body (`{request.content}`, `{response.content}`).
    reads_body: bool,
    /// The map's entry count as last listed, and when (puts count up from it).
    count: parking_lot::Mutex<Option<(std::time::Instant, usize)>>,
}

const INVALID_KEY: &str = "steps.keyvaluemapoperations.InvalidKey";
/// A rendered value over [`crate::kvm::MAX_VALUE_BYTES`] (Apigee's name for a bad value).
const INVALID_VALUE: &str = "steps.keyvaluemapoperations.InvalidValue";
const UNAVAILABLE: &str = "steps.keyvaluemapoperations.StoreUnavailable";
const FILE_DEFINED: &str = "steps.keyvaluemapoperations.FileDefined";
/// A put of a new key into a map holding `maxEntries` entries.
const MAP_FULL: &str = "steps.keyvaluemapoperations.MapFull";

fn compile_key(field: &str, parts: &[String]) -> Result<Vec<Template>, SpecError> {
    if parts.is_empty() {
        return Err(SpecError::new(field, "a key needs at least one part"));
    }
    parts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            Template::compile(p).map_err(|e| SpecError::new(format!("{field}[{i}]"), e.to_string()))
        })
        .collect()
}

pub fn build(ctx: &BuildContext, spec: serde_norway::Value) -> Result<Arc<dyn Policy>, SpecError> {
    let spec: Spec = parse_spec(spec)?;
    crate::kvm::check_map_name(&spec.map).map_err(|m| SpecError::new("map", m))?;
    if spec.get.is_empty() && spec.put.is_empty() && spec.delete.is_empty() {
        return Err(SpecError::new(
            "",
            "KeyValueMap does nothing: give get, put or delete",
        ));
    }
    let get = spec
        .get
        .iter()
        .enumerate()
        .map(|(i, g)| {
            if let Some(v) = &g.variable {
                if v.is_empty() || v.starts_with("request.") || v.starts_with("response.") {
                    return Err(SpecError::new(
                        format!("get[{i}].variable"),
                        "must be non-empty and outside request.* / response.*",
                    ));
                }
            }
            Ok(Get {
                key: compile_key(&format!("get[{i}].key"), &g.key)?,
                variable: g.variable.clone(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let put = spec
        .put
        .iter()
        .enumerate()
        .map(|(i, p)| {
            Ok(Put {
                key: compile_key(&format!("put[{i}].key"), &p.key)?,
                value: Template::compile(&p.value)
                    .map_err(|e| SpecError::new(format!("put[{i}].value"), e.to_string()))?,
                secret: p.secret,
                overwrite: p.overwrite.unwrap_or(true),
            })
        })
        .collect::<Result<Vec<_>, SpecError>>()?;
    let delete = spec
        .delete
        .iter()
        .enumerate()
        .map(|(i, d)| compile_key(&format!("delete[{i}].key"), &d.key))
        .collect::<Result<Vec<_>, _>>()?;
    if spec.max_entries == 0 {
        return Err(SpecError::new("maxEntries", "must be greater than 0"));
    }
    if spec.max_value_bytes == 0 || spec.max_value_bytes > crate::kvm::MAX_VALUE_BYTES {
        return Err(SpecError::new(
            "maxValueBytes",
            format!("between 1 and {}", crate::kvm::MAX_VALUE_BYTES),
        ));
    }
    if !(1..=60_000).contains(&spec.store_timeout_ms) {
        return Err(SpecError::new("storeTimeoutMs", "between 1 and 60000"));
    }
    let reads_body = get
        .iter()
        .flat_map(|g| g.key.iter())
        .chain(
            put.iter()
                .flat_map(|p| p.key.iter().chain(std::iter::once(&p.value))),
        )
        .chain(delete.iter().flatten())
        .flat_map(Template::variables)
        .any(|v| v == "request.content" || v == "response.content");
    // moka panics on a time-to-live over 1000 years: bound it at load (one year).
    if spec.expiry_seconds > 365 * 24 * 3600 {
        return Err(SpecError::new(
            "expirySeconds",
            "must be at most 31536000 (one year)",
        ));
    }
    let cache = (spec.expiry_seconds > 0).then(|| {
        moka::sync::Cache::builder()
            .max_capacity(10_000)
            .time_to_live(Duration::from_secs(spec.expiry_seconds))
            .build()
    });
    Ok(Arc::new(KeyValueMap {
        map: spec.map,
        scope: spec.scope,
        services: ctx.services.clone(),
        cache,
        get,
        put,
        delete,
        max_entries: spec.max_entries,
        max_value: spec.max_value_bytes,
        store_timeout: Duration::from_millis(spec.store_timeout_ms),
        reads_body,
        count: parking_lot::Mutex::new(None),
    }))
}

fn store_fault(e: StoreError) -> Fault {
    tracing::warn!(error = %e, "key-value map store error");
    Fault::new(503, UNAVAILABLE, "The key-value map store is unavailable")
}

/// A store call bounded by the policy's `storeTimeoutMs`: a slow store fails the step
/// (503) instead of holding the request.
async fn bounded<T>(
    limit: Duration,
    call: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, Fault> {
    match tokio::time::timeout(limit, call).await {
        Ok(r) => r.map_err(store_fault),
        Err(_) => {
            tracing::warn!(
                timeout_ms = limit.as_millis(),
                "key-value map store call timed out"
            );
            Err(Fault::new(
                503,
                UNAVAILABLE,
                "The key-value map store is unavailable",
            ))
        }
    }
}

impl KeyValueMap {
    /// The full key for `parts`, or why not.
    fn key(&self, parts: &[Template], ex: &Exchange) -> Result<String, String> {
        let mut key = match self.scope {
            Scope::Global => String::new(),
            Scope::Flow => format!("{}__", ex.flow),
        };
        for (i, p) in parts.iter().enumerate() {
            if i > 0 {
                key.push_str("__");
            }
            let part = p.render(ex);
            // `[{tenant}, token]` without a tenant would be `__token`, one entry every
            // tenant-less request shares: a missing part is no key.
            if part.is_empty() {
                return Err(format!("key part {} is empty", i + 1));
            }
            key.push_str(&part);
        }
        check_key(&key).map(|()| key)
    }

    /// The running configuration's entry (file maps change with reloads, as data).
    fn file_entry(&self, key: &str) -> Option<KvmEntry> {
        self.services.kvms.file_entry(&self.map, key)
    }

    /// Refuses a put that would grow the map past `maxEntries`. The count is listed from
    /// the store at most every [`COUNT_TTL`] and counted up by this policy's puts in
    /// between (an overwrite counts too, until the next listing corrects it); only at the
    /// limit is the key itself looked up, since overwriting an entry is always allowed.
    async fn make_room(&self, store: &crate::store::Store, key: &str) -> Result<(), Fault> {
        let cached = self
            .count
            .lock()
            .filter(|(at, _)| at.elapsed() < COUNT_TTL)
            .map(|(_, n)| n);
        let n = match cached {
            Some(n) => n,
            None => {
                let n = bounded(self.store_timeout, store.list_kvm_entries(&self.map))
                    .await?
                    .len();
                *self.count.lock() = Some((std::time::Instant::now(), n));
                n
            }
        };
        if n >= self.max_entries
            && bounded(self.store_timeout, store.get_kvm_entry(&self.map, key))
                .await?
                .is_none()
        {
            return Err(Fault::new(
                507,
                MAP_FULL,
                format!(
                    "map {} holds its {} entries: no new key can be put",
                    self.map, self.max_entries
                ),
            ));
        }
        if let Some((_, n)) = self.count.lock().as_mut() {
            *n = n.saturating_add(1);
        }
        Ok(())
    }

    fn cache_key(&self, key: &str) -> String {
        format!("{}\0{key}", self.map)
    }

    fn variable(&self, g: &Get, key: &str) -> String {
        g.variable
            .clone()
            .unwrap_or_else(|| format!("kvm.{}.{key}", self.map))
    }

    async fn run_async(
        &self,
        ex: &mut Exchange,
        pending: Vec<(usize, String)>,
    ) -> Result<(), Fault> {
        let store = self.services.consumers.store().clone();
        for (i, key) in pending {
            let entry = bounded(self.store_timeout, store.get_kvm_entry(&self.map, &key))
                .await?
                .map(Arc::new);
            if let Some(c) = &self.cache {
                c.insert(self.cache_key(&key), entry.clone());
            }
            if let Some(e) = entry {
                ex.set_var(self.variable(&self.get[i], &key), e.value.clone());
            }
        }
        for p in &self.put {
            let key = self
                .key(&p.key, ex)
                .map_err(|m| Fault::new(400, INVALID_KEY, format!("put: {m}")))?;
            if self.file_entry(&key).is_some() {
                if !p.overwrite {
                    // The key exists (in the configuration): nothing to write, as Apigee.
                    continue;
                }
                return Err(Fault::new(
                    409,
                    FILE_DEFINED,
                    format!(
                        "`{key}` is defined in the configuration of map {}",
                        self.map
                    ),
                ));
            }
            let value = p.value.render(ex);
            check_value(&value)
                .map_err(|m| Fault::new(400, INVALID_VALUE, format!("put `{key}`: {m}")))?;
            if value.len() > self.max_value {
                return Err(Fault::new(
                    400,
                    INVALID_VALUE,
                    format!(
                        "put `{key}`: a value must be at most {} bytes",
                        self.max_value
                    ),
                ));
            }
            self.make_room(&store, &key).await?;
            let entry = KvmEntry {
                value,
                secret: p.secret,
            };
            if !p.overwrite {
                // Written only if absent, atomically in the store; an existing entry is
                // left alone without an error, as Apigee's `override="false"`.
                let put = tokio::time::timeout(
                    self.store_timeout,
                    store.put_kvm_entry(&self.map, &key, &entry, Some(crate::store::Write::Create)),
                )
                .await;
                match put {
                    Ok(Ok(())) => {}
                    Ok(Err(StoreError::AlreadyExists { .. })) => {
                        // Uncount the entry make_room counted: the map did not grow.
                        if let Some((_, n)) = self.count.lock().as_mut() {
                            *n = n.saturating_sub(1);
                        }
                        continue;
                    }
                    Ok(Err(e)) => return Err(store_fault(e)),
                    Err(_) => {
                        tracing::warn!("key-value map store call timed out");
                        return Err(Fault::new(
                            503,
                            UNAVAILABLE,
                            "The key-value map store is unavailable",
                        ));
                    }
                }
            } else {
                bounded(
                    self.store_timeout,
                    store.put_kvm_entry(&self.map, &key, &entry, None),
                )
                .await?;
            }
            if let Some(c) = &self.cache {
                c.insert(self.cache_key(&key), Some(Arc::new(entry)));
            }
        }
        for d in &self.delete {
            let key = self
                .key(d, ex)
                .map_err(|m| Fault::new(400, INVALID_KEY, format!("delete: {m}")))?;
            // As for put: a configuration entry is changed in its file, not by a flow.
            if self.file_entry(&key).is_some() {
                return Err(Fault::new(
                    409,
                    FILE_DEFINED,
                    format!(
                        "`{key}` is defined in the configuration of map {}",
                        self.map
                    ),
                ));
            }
            match tokio::time::timeout(self.store_timeout, store.delete_kvm_entry(&self.map, &key))
                .await
            {
                Ok(Ok(()) | Err(StoreError::NotFound { .. })) => {}
                Ok(Err(e)) => return Err(store_fault(e)),
                Err(_) => {
                    tracing::warn!("key-value map store call timed out");
                    return Err(Fault::new(
                        503,
                        UNAVAILABLE,
                        "The key-value map store is unavailable",
                    ));
                }
            }
            if let Some((_, n)) = self.count.lock().as_mut() {
                *n = n.saturating_sub(1);
            }
            if let Some(c) = &self.cache {
                c.invalidate(&self.cache_key(&key));
            }
        }
        Ok(())
    }
}

impl Policy for KeyValueMap {
    fn type_name(&self) -> &'static str {
        TYPE
    }

    /// A key or value reading `{request.content}` runs the step on the body, so it works
    /// without an earlier step asking for the body.
    fn needs_body(&self, _dir: Direction) -> bool {
        self.reads_body
    }

    fn run<'a>(&'a self, ex: &'a mut Exchange, _dir: Direction) -> Hook<'a> {
        // Gets answered from the files or the read cache need no store round trip.
        let mut pending = Vec::new();
        for (i, g) in self.get.iter().enumerate() {
            let key = match self.key(&g.key, ex) {
                Ok(k) => k,
                Err(m) => {
                    tracing::debug!(map = %self.map, reason = %m, "kvm get with an invalid key; variable not set");
                    continue;
                }
            };
            if let Some(e) = self.file_entry(&key) {
                ex.set_var(self.variable(g, &key), e.value);
                continue;
            }
            match self
                .cache
                .as_ref()
                .and_then(|c| c.get(&self.cache_key(&key)))
            {
                Some(Some(e)) => ex.set_var(self.variable(g, &key), e.value.clone()),
                Some(None) => {}
                None => pending.push((i, key)),
            }
        }
        if pending.is_empty() && self.put.is_empty() && self.delete.is_empty() {
            return Hook::Ready(Outcome::Continue);
        }
        Hook::wait(self.run_async(ex, pending))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kvm::FileMaps;
    use crate::store::Write;
    use crate::vars::{Headers, RequestInfo};

    fn ctx(files: FileMaps) -> BuildContext {
        let c = BuildContext {
            name: "kvm".into(),
            ..Default::default()
        };
        c.services.kvms.set_files(Arc::new(files));
        c
    }

    async fn run(p: &Arc<dyn Policy>, ex: &mut Exchange) -> Result<(), Fault> {
        match p.run(ex, Direction::Request) {
            Hook::Ready(o) => o
                .into_result()
                .map(|a| assert!(a.is_none(), "unexpected answer")),
            Hook::Pending(f) => f
                .await
                .into_result()
                .map(|a| assert!(a.is_none(), "unexpected answer")),
        }
    }

    fn ex(tenant: &str) -> Exchange {
        let mut h = Headers::new();
        h.push("x-tenant".into(), tenant.into());
        Exchange {
            flow: "f".into(),
            request: RequestInfo::from_headers(h),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn get_put_delete_with_files_store_and_cache() {
        let mut files = FileMaps::new();
        files.entry("creds".into()).or_default().insert(
            "acme__token".into(),
            KvmEntry {
                value: "s3cret".into(),
                secret: true,
            },
        );
        let c = ctx(files);
        let store = c.services.consumers.store().clone();
        store
            .put_kvm_entry(
                "creds",
                "globex__token",
                &KvmEntry {
                    value: "g".into(),
                    secret: false,
                },
                Some(Write::Create),
            )
            .await
            .unwrap();
        let get = build(
            &c,
            serde_norway::from_str("map: creds\nget: [{key: ['{request.header.x-tenant}', token]}, {key: [region], variable: my.region}]").unwrap(),
        )
        .unwrap();
        let mut e = ex("acme");
        run(&get, &mut e).await.unwrap();
        assert_eq!(e.lookup("kvm.creds.acme__token").as_deref(), Some("s3cret"));
        assert_eq!(
            e.lookup("my.region"),
            None,
            "missing keys leave the variable unset"
        );
        let mut e = ex("globex");
        run(&get, &mut e).await.unwrap();
        assert_eq!(e.lookup("kvm.creds.globex__token").as_deref(), Some("g"));
        // Cached: a store change is seen only after the expiry.
        store
            .delete_kvm_entry("creds", "globex__token")
            .await
            .unwrap();
        let mut e = ex("globex");
        run(&get, &mut e).await.unwrap();
        assert_eq!(e.lookup("kvm.creds.globex__token").as_deref(), Some("g"));
        // Odd characters in the rendered key: refused, variable unset.
        let mut e = ex("a\nb");
        run(&get, &mut e).await.unwrap();
        assert!(e.vars.is_empty());

        let put = build(&c, serde_norway::from_str("map: creds\nscope: flow\nexpirySeconds: 0\nput: [{key: ['{request.header.x-tenant}'], value: 'v-{request.header.x-tenant}'}]").unwrap()).unwrap();
        let mut e = ex("ünï code/?");
        run(&put, &mut e).await.unwrap();
        assert_eq!(
            store
                .get_kvm_entry("creds", "f__ünï code/?")
                .await
                .unwrap()
                .unwrap()
                .value,
            "v-ünï code/?"
        );
        let mut long = ex(&"x".repeat(600));
        assert_eq!(run(&put, &mut long).await.unwrap_err().code, INVALID_KEY);

        let overwrite_file = build(
            &c,
            serde_norway::from_str("map: creds\nput: [{key: [acme, token], value: x}]").unwrap(),
        )
        .unwrap();
        assert_eq!(
            run(&overwrite_file, &mut ex("a")).await.unwrap_err().status,
            409
        );

        let del = build(
            &c,
            serde_norway::from_str(
                "map: creds\nscope: flow\ndelete: [{key: ['{request.header.x-tenant}']}]",
            )
            .unwrap(),
        )
        .unwrap();
        run(&del, &mut ex("ünï code/?")).await.unwrap();
        assert!(store
            .get_kvm_entry("creds", "f__ünï code/?")
            .await
            .unwrap()
            .is_none());
        run(&del, &mut ex("never-there")).await.unwrap();
    }

    #[tokio::test]
    async fn put_without_override_writes_only_absent_keys() {
        let mut files = FileMaps::new();
        files.entry("m".into()).or_default().insert(
            "fixed".into(),
            KvmEntry {
                value: "file".into(),
                secret: false,
            },
        );
        let c = ctx(files);
        let store = c.services.consumers.store().clone();
        let put = build(
            &c,
            serde_norway::from_str(
                "map: m\nput: [{key: ['{request.header.x-tenant}'], value: 'v-{request.header.x-count}', override: false}]",
            )
            .unwrap(),
        )
        .unwrap();
        let mut first = ex("k");
        first.request.headers.push("x-count".into(), "1".into());
        run(&put, &mut first).await.unwrap();
        let mut second = ex("k");
        second.request.headers.push("x-count".into(), "2".into());
        run(&put, &mut second).await.unwrap();
        assert_eq!(
            store.get_kvm_entry("m", "k").await.unwrap().unwrap().value,
            "v-1",
            "the first write stays"
        );
        // A file entry exists too: left alone, no 409.
        run(&put, &mut ex("fixed")).await.unwrap();
        assert!(store.get_kvm_entry("m", "fixed").await.unwrap().is_none());
        // The default overwrites.
        let over = build(
            &c,
            serde_norway::from_str("map: m\nput: [{key: [k], value: new}]").unwrap(),
        )
        .unwrap();
        run(&over, &mut ex("x")).await.unwrap();
        assert_eq!(
            store.get_kvm_entry("m", "k").await.unwrap().unwrap().value,
            "new"
        );
    }

    #[tokio::test]
    async fn too_large_values_and_file_entries_are_refused() {
        let mut files = FileMaps::new();
        files.entry("creds".into()).or_default().insert(
            "fixed".into(),
            KvmEntry {
                value: "f".into(),
                secret: false,
            },
        );
        let c = ctx(files);
        let store = c.services.consumers.store().clone();
        let put = build(
            &c,
            serde_norway::from_str(
                "map: creds\nput: [{key: [big], value: '{request.header.x-tenant}'}]",
            )
            .unwrap(),
        )
        .unwrap();
        let f = run(&put, &mut ex(&"v".repeat(crate::kvm::MAX_VALUE_BYTES + 1)))
            .await
            .unwrap_err();
        assert_eq!((f.status, f.code.as_str()), (400, INVALID_VALUE));
        assert!(f.message.contains("at most 65536 bytes"), "{}", f.message);
        assert!(store.get_kvm_entry("creds", "big").await.unwrap().is_none());
        run(&put, &mut ex(&"v".repeat(crate::kvm::MAX_VALUE_BYTES)))
            .await
            .unwrap();

        // Delete answers like put: the file entry stays and the flow learns why.
        let del = build(
            &c,
            serde_norway::from_str("map: creds\ndelete: [{key: [fixed]}]").unwrap(),
        )
        .unwrap();
        let f = run(&del, &mut ex("a")).await.unwrap_err();
        assert_eq!((f.status, f.code.as_str()), (409, FILE_DEFINED));
        assert!(c.services.kvms.file_entry("creds", "fixed").is_some());
    }

    #[tokio::test]
    async fn cached_reads_expire() {
        let c = ctx(FileMaps::new());
        let store = c.services.consumers.store().clone();
        let entry = KvmEntry {
            value: "one".into(),
            secret: false,
        };
        store.put_kvm_entry("m", "k", &entry, None).await.unwrap();
        let get = build(
            &c,
            serde_norway::from_str("map: m\nexpirySeconds: 1\nget: [{key: [k]}]").unwrap(),
        )
        .unwrap();
        let mut e = ex("a");
        run(&get, &mut e).await.unwrap();
        assert_eq!(e.lookup("kvm.m.k").as_deref(), Some("one"));
        store.delete_kvm_entry("m", "k").await.unwrap();
        let mut e = ex("a");
        run(&get, &mut e).await.unwrap();
        assert_eq!(
            e.lookup("kvm.m.k").as_deref(),
            Some("one"),
            "served from the read cache"
        );
        // Past the expiry the store is asked again and the entry is gone.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let mut e = ex("a");
        run(&get, &mut e).await.unwrap();
        assert_eq!(e.lookup("kvm.m.k"), None);
    }

    #[tokio::test]
    async fn entries_survive_an_embedded_store_reopen() {
        use crate::consumer::service::Consumers;
        use crate::store::embedded::EmbeddedBackend as EmbeddedStore;
        let dir = tempfile::tempdir().unwrap();
        let ctx_on = |store: EmbeddedStore| BuildContext {
            name: "kvm".into(),
            services: crate::services::Services::with_consumers(Consumers::new(
                crate::store::Store::new(Arc::new(store)),
            )),
            ..Default::default()
        };
        {
            let c = ctx_on(EmbeddedStore::open(dir.path()).unwrap());
            let put = build(
                &c,
                serde_norway::from_str(
                    "map: m\nput: [{key: [k], value: '{request.header.x-tenant}', secret: true}]",
                )
                .unwrap(),
            )
            .unwrap();
            run(&put, &mut ex("kept")).await.unwrap();
        }
        let c = ctx_on(EmbeddedStore::open(dir.path()).unwrap());
        let get = build(
            &c,
            serde_norway::from_str("map: m\nget: [{key: [k]}]").unwrap(),
        )
        .unwrap();
        let mut e = ex("a");
        run(&get, &mut e).await.unwrap();
        assert_eq!(e.lookup("kvm.m.k").as_deref(), Some("kept"));
        let stored = c
            .services
            .consumers
            .store()
            .get_kvm_entry("m", "k")
            .await
            .unwrap()
            .unwrap();
        assert!(stored.secret);
    }

    /// `[{tenant}, token]` without a tenant is no key: a put or delete is refused, a get
    /// leaves its variable unset, and nothing lands on a shared `__token` (nor `f__`).
    #[tokio::test]
    async fn a_composite_key_with_a_missing_part_is_refused() {
        let mut files = FileMaps::new();
        files.entry("creds".into()).or_default().insert(
            "__token".into(),
            KvmEntry {
                value: "shared".into(),
                secret: true,
            },
        );
        let c = ctx(files);
        let store = c.services.consumers.store().clone();
        let spec = "map: creds\nput: [{key: ['{request.header.x-tenant}', token], value: v}]";
        let put = build(&c, serde_norway::from_str(spec).unwrap()).unwrap();
        let f = run(&put, &mut ex("")).await.unwrap_err();
        assert_eq!((f.status, f.code.as_str()), (400, INVALID_KEY));
        assert!(f.message.contains("key part 1 is empty"), "{}", f.message);
        let flow = build(
            &c,
            serde_norway::from_str(
                "map: creds\nscope: flow\nput: [{key: ['{request.header.x-tenant}'], value: v}]",
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(run(&flow, &mut ex("")).await.unwrap_err().code, INVALID_KEY);
        assert!(store.list_kvm_entries("creds").await.unwrap().is_empty());
        let del = build(
            &c,
            serde_norway::from_str(
                "map: creds\ndelete: [{key: ['{request.header.x-tenant}', token]}]",
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(run(&del, &mut ex("")).await.unwrap_err().code, INVALID_KEY);
        let get = build(
            &c,
            serde_norway::from_str(
                "map: creds\nget: [{key: ['{request.header.x-tenant}', token], variable: t}]",
            )
            .unwrap(),
        )
        .unwrap();
        let mut e = ex("");
        run(&get, &mut e).await.unwrap();
        assert_eq!(e.lookup("t"), None, "the shared entry is not read");
    }

    #[tokio::test]
    async fn a_value_reading_the_body_runs_on_the_body() {
        let c = ctx(FileMaps::new());
        let put = build(
            &c,
            serde_norway::from_str("map: m\nput: [{key: [last], value: '{request.content}'}]")
                .unwrap(),
        )
        .unwrap();
        assert!(put.needs_body(Direction::Request));
        let mut e = ex("a");
        e.request_body = Some(b"prompt".to_vec());
        run(&put, &mut e).await.unwrap();
        let store = c.services.consumers.store().clone();
        assert_eq!(
            store
                .get_kvm_entry("m", "last")
                .await
                .unwrap()
                .unwrap()
                .value,
            "prompt"
        );
        let headers = build(
            &c,
            serde_norway::from_str("map: m\nput: [{key: [k], value: '{request.header.x-tenant}'}]")
                .unwrap(),
        )
        .unwrap();
        assert!(!headers.needs_body(Direction::Request));
    }

    #[tokio::test]
    async fn puts_are_bounded_per_map() {
        let c = ctx(FileMaps::new());
        let store = c.services.consumers.store().clone();
        let put = build(
            &c,
            serde_norway::from_str("map: m\nmaxEntries: 3\nmaxValueBytes: 8\nput: [{key: ['{request.header.x-tenant}'], value: v}]").unwrap(),
        )
        .unwrap();
        for t in ["a", "b", "c"] {
            run(&put, &mut ex(t)).await.unwrap();
        }
        let f = run(&put, &mut ex("d")).await.unwrap_err();
        assert_eq!((f.status, f.code.as_str()), (507, MAP_FULL));
        assert_eq!(store.list_kvm_entries("m").await.unwrap().len(), 3);
        // Overwriting an entry of a full map is fine.
        run(&put, &mut ex("b")).await.unwrap();
        // Entries written elsewhere (another replica, the API) count once listed.
        let other = build(
            &c,
            serde_norway::from_str("map: m\nmaxEntries: 3\nput: [{key: [e], value: v}]").unwrap(),
        )
        .unwrap();
        store.delete_kvm_entry("m", "a").await.unwrap();
        run(&other, &mut ex("x")).await.unwrap();
        assert_eq!(
            run(&other, &mut ex("x")).await.map_err(|f| f.code),
            Ok(()),
            "an overwrite"
        );
        let big = build(
            &c,
            serde_norway::from_str(
                "map: m\nmaxValueBytes: 8\nput: [{key: [k], value: '{request.header.x-tenant}'}]",
            )
            .unwrap(),
        )
        .unwrap();
        let f = run(&big, &mut ex("123456789")).await.unwrap_err();
        assert_eq!((f.status, f.code.as_str()), (400, INVALID_VALUE));
        assert!(f.message.contains("at most 8 bytes"), "{}", f.message);
        run(&big, &mut ex("12345678")).await.unwrap();
    }

    /// A backend that answers key-value calls after `delay`.
    #[derive(Debug)]
    struct Slow {
        inner: crate::store::memory::MemoryBackend,
        delay: Duration,
    }

    impl Slow {
        async fn wait(&self, table: crate::store::Table<'_>) {
            if matches!(table, crate::store::Table::Kvm(_)) {
                tokio::time::sleep(self.delay).await;
            }
        }
    }

    #[async_trait::async_trait]
    impl crate::store::Backend for Slow {
        fn kind(&self) -> &'static str {
            "slow"
        }
        async fn get(
            &self,
            t: crate::store::Table<'_>,
            k: &str,
        ) -> Result<Option<Vec<u8>>, StoreError> {
            self.wait(t).await;
            self.inner.get(t, k).await
        }
        async fn scan(
            &self,
            ts: &[crate::store::Table<'_>],
            v: crate::store::backend::Visit,
        ) -> Result<(), StoreError> {
            for t in ts {
                self.wait(*t).await;
            }
            self.inner.scan(ts, v).await
        }
        async fn put(
            &self,
            t: crate::store::Table<'_>,
            k: &str,
            v: Vec<u8>,
            c: crate::store::Cond,
        ) -> Result<crate::store::Put, StoreError> {
            self.wait(t).await;
            self.inner.put(t, k, v, c).await
        }
        async fn delete(&self, t: crate::store::Table<'_>, k: &str) -> Result<bool, StoreError> {
            self.wait(t).await;
            self.inner.delete(t, k).await
        }
        fn subscribe(&self) -> tokio::sync::broadcast::Receiver<crate::store::Change> {
            self.inner.subscribe()
        }
        async fn announce(&self, c: crate::store::Change) {
            self.inner.announce(c).await
        }
        async fn count(
            &self,
            a: &[crate::ratelimit::Ask],
        ) -> Result<Vec<Option<crate::ratelimit::Decision>>, StoreError> {
            self.inner.count(a).await
        }
        async fn load_counters(&self) -> Result<Vec<(u128, Vec<u8>)>, StoreError> {
            self.inner.load_counters().await
        }
        async fn save_counters(
            &self,
            r: Vec<(u128, Vec<u8>)>,
            k: crate::store::backend::Keep,
        ) -> Result<(), StoreError> {
            self.inner.save_counters(r, k).await
        }
        async fn cache_get(&self, k: &str) -> Result<Option<Vec<u8>>, StoreError> {
            self.inner.cache_get(k).await
        }
        async fn cache_put(&self, k: &str, v: Vec<u8>, ttl: Duration) -> Result<(), StoreError> {
            self.inner.cache_put(k, v, ttl).await
        }

        async fn tally_add(
            &self,
            adds: &[crate::store::TallyAdd],
            ttl: Duration,
        ) -> Result<(), StoreError> {
            self.inner.tally_add(adds, ttl).await
        }

        async fn tally_read(&self, b: &[String]) -> Result<Vec<Vec<(String, i64)>>, StoreError> {
            self.inner.tally_read(b).await
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_store_times_out() {
        use crate::consumer::service::Consumers;
        let slow = Slow {
            inner: crate::store::memory::MemoryBackend::new(),
            delay: Duration::from_secs(30),
        };
        let c = BuildContext {
            name: "kvm".into(),
            services: crate::services::Services::with_consumers(Consumers::new(
                crate::store::Store::new(Arc::new(slow)),
            )),
            ..Default::default()
        };
        for spec in [
            "map: m\nstoreTimeoutMs: 200\nput: [{key: [k], value: v}]",
            "map: m\nstoreTimeoutMs: 200\nget: [{key: [k]}]",
            "map: m\nstoreTimeoutMs: 200\ndelete: [{key: [k]}]",
        ] {
            let p = build(&c, serde_norway::from_str(spec).unwrap()).unwrap();
            let start = tokio::time::Instant::now();
            let f = run(&p, &mut ex("a")).await.unwrap_err();
            assert_eq!((f.status, f.code.as_str()), (503, UNAVAILABLE), "{spec}");
            assert!(
                start.elapsed() < Duration::from_secs(1),
                "{spec}: {:?}",
                start.elapsed()
            );
        }
    }

    #[test]
    fn bad_specs() {
        let c = ctx(FileMaps::new());
        for (y, field) in [
            ("map: 'bad/name'\nget: [{key: [a]}]", "map"),
            ("map: m", ""),
            ("map: m\nget: [{key: []}]", "get[0].key"),
            (
                "map: m\nget: [{key: [a], variable: request.x}]",
                "get[0].variable",
            ),
            ("map: m\nmaxEntries: 0\nget: [{key: [a]}]", "maxEntries"),
            (
                "map: m\nmaxValueBytes: 70000\nget: [{key: [a]}]",
                "maxValueBytes",
            ),
            (
                "map: m\nstoreTimeoutMs: 0\nget: [{key: [a]}]",
                "storeTimeoutMs",
            ),
        ] {
            let e = build(&c, serde_norway::from_str(y).unwrap()).unwrap_err();
            assert_eq!(e.field, field, "{y}: {e}");
        }
    }
}
