//! `Consumers`: the live view of products and apps. File objects come from the running
//! configuration; API objects from the [`Store`]. The data path reads [`Consumers::index`]
//! (an `ArcSwap`, no locks, no I/O); a background task follows the store's change feed and
//! rebuilds the index, coalescing bursts of changes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use tokio::sync::broadcast::error::RecvError;

use super::index::{ConsumerIndex, Product};
use super::{ApiProduct, App};
use crate::store::{Change, Store, StoreError};

/// How long changes are gathered before one index rebuild.
const COALESCE: Duration = Duration::from_millis(50);

#[derive(Debug, Default)]
struct Objects {
    file_products: Vec<ApiProduct>,
    // Apps are shared with the index (`Arc`), so a rebuild copies pointers, not apps.
    file_apps: Vec<Arc<App>>,
    store_products: BTreeMap<String, ApiProduct>,
    store_apps: BTreeMap<String, Arc<App>>,
    /// Store objects hidden by a file object of the same name (`product:<name>`,
    /// `app:<name>`), remembered so each is warned about once, not on every rebuild.
    shadowed: std::collections::BTreeSet<String>,
}

#[derive(Debug)]
pub struct Consumers {
    store: Store,
    objects: Mutex<Objects>,
    index: ArcSwap<ConsumerIndex>,
}

impl Consumers {
    pub fn new(store: Store) -> Arc<Self> {
        Arc::new(Self {
            store,
            objects: Mutex::default(),
            index: ArcSwap::from_pointee(ConsumerIndex::default()),
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The index the data path reads.
    pub fn index(&self) -> Arc<ConsumerIndex> {
        self.index.load_full()
    }

    /// The index for one short read on the data path: no reference count is touched (an
    /// `Arc` clone per request is an atomic write to one cache line from every core).
    pub fn index_guard(&self) -> arc_swap::Guard<Arc<ConsumerIndex>> {
        self.index.load()
    }

    /// True when a configuration file defines this product (the API may not change it).
    pub fn is_file_product(&self, name: &str) -> bool {
        self.objects
            .lock()
            .file_products
            .iter()
            .any(|p| p.name == name)
    }

    pub fn is_file_app(&self, name: &str) -> bool {
        self.objects.lock().file_apps.iter().any(|a| a.name == name)
    }

    /// File objects, for listing them beside store objects.
    pub fn file_objects(&self) -> (Vec<ApiProduct>, Vec<App>) {
        let o = self.objects.lock();
        let apps = o.file_apps.iter().map(|a| App::clone(a)).collect();
        (o.file_products.clone(), apps)
    }

    /// Every product (a file object wins over a store object of the same name), by name.
    pub fn products(&self) -> Vec<ApiProduct> {
        let o = self.objects.lock();
        let mut out: BTreeMap<&str, &ApiProduct> = o
            .store_products
            .values()
            .map(|p| (p.name.as_str(), p))
            .collect();
        for p in &o.file_products {
            out.insert(&p.name, p);
        }
        out.into_values().cloned().collect()
    }

    /// The apps of one developer (email compared without case), file apps included, by name.
    pub fn apps_of(&self, email: &str) -> Vec<Arc<App>> {
        let o = self.objects.lock();
        let mut out: BTreeMap<&str, &Arc<App>> = o
            .store_apps
            .values()
            .filter(|a| a.developer_email.eq_ignore_ascii_case(email))
            .map(|a| (a.name.as_str(), a))
            .collect();
        for a in &o.file_apps {
            if a.developer_email.eq_ignore_ascii_case(email) {
                out.insert(&a.name, a);
            }
        }
        out.into_values().cloned().collect()
    }

    /// Replaces the file objects (after a configuration load) and rebuilds the index.
    pub fn set_file_objects(&self, products: Vec<ApiProduct>, apps: Vec<App>) {
        {
            let mut o = self.objects.lock();
            o.file_products = products;
            o.file_apps = apps.into_iter().map(Arc::new).collect();
        }
        self.rebuild();
    }

    /// Reads everything from the store and rebuilds the index.
    pub async fn resync(&self) -> Result<(), StoreError> {
        let contents = self.store.snapshot().await?;
        {
            let mut o = self.objects.lock();
            o.store_products = contents
                .products
                .into_iter()
                .map(|p| (p.name.clone(), p))
                .collect();
            o.store_apps = contents
                .apps
                .into_iter()
                .map(|a| (a.name.clone(), Arc::new(a)))
                .collect();
        }
        self.rebuild();
        Ok(())
    }

    async fn apply(&self, change: &Change) -> Result<(), StoreError> {
        match change {
            Change::Resync => return self.resync().await,
            Change::Product(name) => {
                let p = self.store.get_product(name).await?;
                let mut o = self.objects.lock();
                match p {
                    Some(p) => o.store_products.insert(name.clone(), p),
                    None => o.store_products.remove(name),
                };
            }
            Change::App(name) => {
                let a = self.store.get_app(name).await?;
                let mut o = self.objects.lock();
                match a {
                    Some(a) => o.store_apps.insert(name.clone(), Arc::new(a)),
                    None => o.store_apps.remove(name),
                };
            }
        }
        Ok(())
    }

    /// Rebuilds the index. A file object wins over a store object of the same name (one made
    /// through the API before the file defined it): the API shows and protects the file
    /// version, so the data path must enforce that one too. The store object is left out
    /// of the index, with a warning, until the file drops it or the store object is deleted.
    fn rebuild(&self) {
        let mut o = self.objects.lock();
        let file_products: std::collections::BTreeSet<&str> =
            o.file_products.iter().map(|p| p.name.as_str()).collect();
        let file_apps: std::collections::BTreeSet<&str> =
            o.file_apps.iter().map(|a| a.name.as_str()).collect();
        let shadowed: std::collections::BTreeSet<String> = o
            .store_products
            .keys()
            .filter(|n| file_products.contains(n.as_str()))
            .map(|n| format!("product:{n}"))
            .chain(
                o.store_apps
                    .keys()
                    .filter(|n| file_apps.contains(n.as_str()))
                    .map(|n| format!("app:{n}")),
            )
            .collect();
        for s in shadowed.difference(&o.shadowed) {
            let (kind, name) = s.split_once(':').unwrap_or(("object", s));
            tracing::warn!(
                kind,
                name,
                "a configuration file defines this {kind}, and the store holds an older one of the same name made through the API: the file's wins; delete the store object (DELETE /v1/{kind}s/{name} on the management API removes only the store's) or rename one"
            );
        }
        let mut products = Vec::new();
        let store_products = o
            .store_products
            .values()
            .filter(|p| !file_products.contains(p.name.as_str()));
        for p in o.file_products.iter().chain(store_products) {
            match Product::compile(p.clone()) {
                Ok(p) => products.push(Arc::new(p)),
                // Store objects are validated when written; a bad one is skipped, not fatal.
                Err(e) => tracing::warn!(product = %p.name, error = %e, "product skipped"),
            }
        }
        // Store apps first, file apps last: a file key wins if both claim one hash.
        let apps = o
            .store_apps
            .values()
            .filter(|a| !file_apps.contains(a.name.as_str()))
            .chain(o.file_apps.iter())
            .cloned()
            .collect();
        o.shadowed = shadowed;
        drop(o);
        self.index
            .store(Arc::new(ConsumerIndex::build(products, apps)));
    }

    /// Starts following the store's change feed (subscribed before this returns, so no
    /// change made afterwards is missed): each burst of changes is applied, then the index
    /// is rebuilt once. A store that is down leaves the last index serving; the follower
    /// retries with back-off.
    pub fn spawn_follower(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let rx = self.store.subscribe();
        tokio::spawn(self.clone().follow(rx))
    }

    async fn follow(self: Arc<Self>, mut rx: tokio::sync::broadcast::Receiver<Change>) {
        let mut backoff = Duration::from_millis(200);
        loop {
            let first = match rx.recv().await {
                Ok(c) => c,
                Err(RecvError::Lagged(_)) => Change::Resync,
                Err(RecvError::Closed) => return,
            };
            let mut batch = vec![first];
            let deadline = tokio::time::sleep(COALESCE);
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    () = &mut deadline => break,
                    r = rx.recv() => match r {
                        Ok(c) => batch.push(c),
                        Err(RecvError::Lagged(_)) => batch.push(Change::Resync),
                        Err(RecvError::Closed) => break,
                    }
                }
            }
            let result = if batch.contains(&Change::Resync) {
                self.resync().await
            } else {
                batch.sort_by_key(|c| format!("{c:?}"));
                batch.dedup();
                let mut r = Ok(());
                for c in &batch {
                    if let Err(e) = self.apply(c).await {
                        r = Err(e);
                        break;
                    }
                }
                if r.is_ok() {
                    self.rebuild();
                }
                r
            };
            match result {
                Ok(()) => backoff = Duration::from_millis(200),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot refresh consumers from the store; serving the last known index");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    // Whatever was missed is picked up by a full re-read.
                    while let Err(e) = self.resync().await {
                        tracing::debug!(error = %e, "store still unavailable");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consumer::{hash_key, ApiKey, KeyStatus, Operation, Origin};
    use crate::store::Write;

    fn product(name: &str) -> ApiProduct {
        ApiProduct {
            name: name.into(),
            description: String::new(),
            operations: vec![Operation {
                path: "/**".into(),
                methods: vec![],
                models: vec![],
                ..Default::default()
            }],
            quota: None,
            llm_token_quota: None,
            approval_type: Default::default(),
            attributes: Default::default(),
            origin: Origin::Api,
            revision: 0,
        }
    }

    fn app(name: &str, key: &str, status: KeyStatus) -> App {
        App {
            name: name.into(),
            developer_email: "d@example.com".into(),
            status: Default::default(),
            products: vec!["p".into()],
            keys: vec![ApiKey {
                id: format!("key_{name}"),
                hash: hash_key(key),
                status,
                expires_at: None,
                created_at: 0,
            }],
            attributes: Default::default(),
            origin: Origin::Api,
            revision: 0,
        }
    }

    #[tokio::test]
    async fn store_changes_reach_the_index() {
        let store = Store::memory();
        let c = Consumers::new(store.clone());
        c.resync().await.unwrap();
        c.spawn_follower();
        store
            .put_product(&product("p"), Write::Create)
            .await
            .unwrap();
        store
            .put_app(&app("a", "secret", KeyStatus::Approved), Write::Create)
            .await
            .unwrap();
        let ok = |c: &Consumers| c.index().verify("secret", "GET", "/x", None, 0).is_ok();
        for _ in 0..100 {
            if ok(&c) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(ok(&c));
        store
            .put_app(&app("a", "secret", KeyStatus::Revoked), Write::Update)
            .await
            .unwrap();
        for _ in 0..100 {
            if !ok(&c) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!ok(&c), "revocation reached the index");
    }

    /// A store object made through the API before a file defined the same name: the API
    /// shows and protects the file version, so the data path enforces that one too.
    #[tokio::test]
    async fn file_objects_shadow_store_objects_of_the_same_name() {
        let store = Store::memory();
        let mut store_product = product("p");
        store_product.operations[0].path = "/store-only".into();
        store
            .put_product(&store_product, Write::Create)
            .await
            .unwrap();
        store
            .put_app(&app("a", "store-key", KeyStatus::Approved), Write::Create)
            .await
            .unwrap();
        let c = Consumers::new(store.clone());
        c.resync().await.unwrap();
        let verify = |key: &str, path: &str| c.index().verify(key, "GET", path, None, 0);
        assert!(verify("store-key", "/store-only").is_ok());

        let mut file_product = product("p");
        file_product.operations[0].path = "/file-only".into();
        file_product.origin = Origin::File;
        let mut file_app = app("a", "file-key", KeyStatus::Approved);
        file_app.origin = Origin::File;
        c.set_file_objects(vec![file_product], vec![file_app]);
        let idx = c.index();
        assert!(idx.verify("file-key", "GET", "/file-only", None, 0).is_ok());
        assert_eq!(
            idx.verify("file-key", "GET", "/store-only", None, 0)
                .unwrap_err(),
            crate::consumer::index::Refusal::NoProductForOperation
        );
        assert_eq!(
            idx.verify("store-key", "GET", "/file-only", None, 0)
                .unwrap_err(),
            crate::consumer::index::Refusal::UnknownKey
        );
        assert_eq!(idx.product("p").unwrap().spec.origin, Origin::File);
        // Rebuilding again (a store change) keeps the file version.
        c.resync().await.unwrap();
        assert!(verify("store-key", "/file-only").is_err());
        assert!(verify("file-key", "/file-only").is_ok());
        // Once the file drops them, the store objects serve again.
        c.set_file_objects(vec![], vec![]);
        assert!(verify("store-key", "/store-only").is_ok());
    }

    #[test]
    fn file_objects_are_known() {
        let c = Consumers::new(Store::memory());
        c.set_file_objects(vec![product("p")], vec![app("f", "k", KeyStatus::Approved)]);
        assert!(c.is_file_app("f") && c.is_file_product("p") && !c.is_file_app("x"));
        assert!(c.index().verify("k", "GET", "/a", None, 0).is_ok());
    }
}
