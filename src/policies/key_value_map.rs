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
//!   delete:
//!   - key: [stale]
//! ```
//!
//! Entries come from `KeyValueMap` documents (read from memory) and from the management API
//! (read from the store, then cached). A file entry wins over a store entry of the same key
//! and can be neither overwritten by a put nor removed by a delete (409 `FileDefined`). A
//! value over 64 KiB is refused with 400 `InvalidValue`. A key that renders empty, too long
//! or with control characters is refused (get: the variable stays unset; put and delete: a
//! 400 `InvalidKey` fault).
//! Secret entries become variables like any other (templates need them) and are never logged.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::{parse_spec, BuildContext, SpecError};
use crate::expr::Template;
use crate::fault::Fault;
use crate::kvm::{check_key, check_value, KvmEntry};
use crate::pipeline::{Direction, Outcome, Policy};
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
}

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
}

const INVALID_KEY: &str = "steps.keyvaluemapoperations.InvalidKey";
/// A rendered value over [`crate::kvm::MAX_VALUE_BYTES`] (Apigee's name for a bad value).
const INVALID_VALUE: &str = "steps.keyvaluemapoperations.InvalidValue";
const UNAVAILABLE: &str = "steps.keyvaluemapoperations.StoreUnavailable";
const FILE_DEFINED: &str = "steps.keyvaluemapoperations.FileDefined";

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
        return Err(SpecError::new("", "KeyValueMap does nothing: give get, put or delete"));
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
            })
        })
        .collect::<Result<Vec<_>, SpecError>>()?;
    let delete = spec
        .delete
        .iter()
        .enumerate()
        .map(|(i, d)| compile_key(&format!("delete[{i}].key"), &d.key))
        .collect::<Result<Vec<_>, _>>()?;
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
    }))
}

fn store_fault(e: StoreError) -> Fault {
    tracing::warn!(error = %e, "key-value map store error");
    Fault::new(503, UNAVAILABLE, "The key-value map store is unavailable")
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
            key.push_str(&p.render(ex));
        }
        check_key(&key).map(|()| key)
    }

    /// The running configuration's entry (file maps change with reloads, as data).
    fn file_entry(&self, key: &str) -> Option<KvmEntry> {
        self.services.kvms.file_entry(&self.map, key)
    }

    fn cache_key(&self, key: &str) -> String {
        format!("{}\0{key}", self.map)
    }

    fn variable(&self, g: &Get, key: &str) -> String {
        g.variable
            .clone()
            .unwrap_or_else(|| format!("kvm.{}.{key}", self.map))
    }

    async fn run_async(&self, ex: &mut Exchange, pending: Vec<(usize, String)>) -> Result<(), Fault> {
        let store = self.services.consumers.store().clone();
        for (i, key) in pending {
            let entry = store
                .get_kvm_entry(&self.map, &key)
                .await
                .map_err(store_fault)?
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
                return Err(Fault::new(
                    409,
                    FILE_DEFINED,
                    format!("`{key}` is defined in the configuration of map {}", self.map),
                ));
            }
            let value = p.value.render(ex);
            check_value(&value)
                .map_err(|m| Fault::new(400, INVALID_VALUE, format!("put `{key}`: {m}")))?;
            let entry = KvmEntry {
                value,
                secret: p.secret,
            };
            store
                .put_kvm_entry(&self.map, &key, &entry, None)
                .await
                .map_err(store_fault)?;
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
                    format!("`{key}` is defined in the configuration of map {}", self.map),
                ));
            }
            match store.delete_kvm_entry(&self.map, &key).await {
                Ok(()) | Err(StoreError::NotFound { .. }) => {}
                Err(e) => return Err(store_fault(e)),
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

    fn run<'a>(&'a self, ex: &'a mut Exchange, _dir: Direction) -> Outcome<'a> {
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
            match self.cache.as_ref().and_then(|c| c.get(&self.cache_key(&key))) {
                Some(Some(e)) => ex.set_var(self.variable(g, &key), e.value.clone()),
                Some(None) => {}
                None => pending.push((i, key)),
            }
        }
        if pending.is_empty() && self.put.is_empty() && self.delete.is_empty() {
            return Outcome::Ready(Ok(()));
        }
        Outcome::Pending(Box::pin(self.run_async(ex, pending)))
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
            Outcome::Ready(r) => r,
            Outcome::Pending(f) => f.await,
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
            .put_kvm_entry("creds", "globex__token", &KvmEntry { value: "g".into(), secret: false }, Some(Write::Create))
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
        assert_eq!(e.lookup("my.region"), None, "missing keys leave the variable unset");
        let mut e = ex("globex");
        run(&get, &mut e).await.unwrap();
        assert_eq!(e.lookup("kvm.creds.globex__token").as_deref(), Some("g"));
        // Cached: a store change is seen only after the expiry.
        store.delete_kvm_entry("creds", "globex__token").await.unwrap();
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
            store.get_kvm_entry("creds", "f__ünï code/?").await.unwrap().unwrap().value,
            "v-ünï code/?"
        );
        let mut e = ex("");
        let mut long = ex(&"x".repeat(600));
        assert!(run(&put, &mut e).await.is_ok(), "flow prefix keeps it non-empty");
        assert_eq!(run(&put, &mut long).await.unwrap_err().code, INVALID_KEY);

        let overwrite_file = build(&c, serde_norway::from_str("map: creds\nput: [{key: [acme, token], value: x}]").unwrap()).unwrap();
        assert_eq!(run(&overwrite_file, &mut ex("a")).await.unwrap_err().status, 409);

        let del = build(&c, serde_norway::from_str("map: creds\nscope: flow\ndelete: [{key: ['{request.header.x-tenant}']}]").unwrap()).unwrap();
        run(&del, &mut ex("ünï code/?")).await.unwrap();
        assert!(store.get_kvm_entry("creds", "f__ünï code/?").await.unwrap().is_none());
        run(&del, &mut ex("never-there")).await.unwrap();
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
        let put = build(&c, serde_norway::from_str("map: creds\nput: [{key: [big], value: '{request.header.x-tenant}'}]").unwrap()).unwrap();
        let f = run(&put, &mut ex(&"v".repeat(crate::kvm::MAX_VALUE_BYTES + 1))).await.unwrap_err();
        assert_eq!((f.status, f.code.as_str()), (400, INVALID_VALUE));
        assert!(f.message.contains("at most 65536 bytes"), "{}", f.message);
        assert!(store.get_kvm_entry("creds", "big").await.unwrap().is_none());
        run(&put, &mut ex(&"v".repeat(crate::kvm::MAX_VALUE_BYTES))).await.unwrap();

        // Delete answers like put: the file entry stays and the flow learns why.
        let del = build(&c, serde_norway::from_str("map: creds\ndelete: [{key: [fixed]}]").unwrap()).unwrap();
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
        let get = build(&c, serde_norway::from_str("map: m\nexpirySeconds: 1\nget: [{key: [k]}]").unwrap()).unwrap();
        let mut e = ex("a");
        run(&get, &mut e).await.unwrap();
        assert_eq!(e.lookup("kvm.m.k").as_deref(), Some("one"));
        store.delete_kvm_entry("m", "k").await.unwrap();
        let mut e = ex("a");
        run(&get, &mut e).await.unwrap();
        assert_eq!(e.lookup("kvm.m.k").as_deref(), Some("one"), "served from the read cache");
        // Past the expiry the store is asked again and the entry is gone.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let mut e = ex("a");
        run(&get, &mut e).await.unwrap();
        assert_eq!(e.lookup("kvm.m.k"), None);
    }

    #[tokio::test]
    async fn entries_survive_an_embedded_store_reopen() {
        use crate::consumer::service::Consumers;
        use crate::store::embedded::EmbeddedStore;
        let dir = tempfile::tempdir().unwrap();
        let ctx_on = |store: EmbeddedStore| BuildContext {
            name: "kvm".into(),
            services: crate::services::Services::with_consumers(Consumers::new(Arc::new(store))),
            ..Default::default()
        };
        {
            let c = ctx_on(EmbeddedStore::open(dir.path()).unwrap());
            let put = build(&c, serde_norway::from_str("map: m\nput: [{key: [k], value: '{request.header.x-tenant}', secret: true}]").unwrap()).unwrap();
            run(&put, &mut ex("kept")).await.unwrap();
        }
        let c = ctx_on(EmbeddedStore::open(dir.path()).unwrap());
        let get = build(&c, serde_norway::from_str("map: m\nget: [{key: [k]}]").unwrap()).unwrap();
        let mut e = ex("a");
        run(&get, &mut e).await.unwrap();
        assert_eq!(e.lookup("kvm.m.k").as_deref(), Some("kept"));
        let stored = c.services.consumers.store().get_kvm_entry("m", "k").await.unwrap().unwrap();
        assert!(stored.secret);
    }

    #[test]
    fn bad_specs() {
        let c = ctx(FileMaps::new());
        for (y, field) in [
            ("map: 'bad/name'\nget: [{key: [a]}]", "map"),
            ("map: m", ""),
            ("map: m\nget: [{key: []}]", "get[0].key"),
            ("map: m\nget: [{key: [a], variable: request.x}]", "get[0].variable"),
        ] {
            let e = build(&c, serde_norway::from_str(y).unwrap()).unwrap_err();
            assert_eq!(e.field, field, "{y}: {e}");
        }
    }
}
