//! Durable storage for objects written through the management API: API products and apps
//! (with their hashed keys). One trait, several backends: `memory` (tests, and `--store
//! memory`), `embedded` (a transactional on-disk store, the single-replica default) and
//! `redis` (several replicas). The data path never reads a store: it reads the in-memory
//! [`crate::consumer::index::ConsumerIndex`], rebuilt from [`Store::snapshot`] and kept fresh
//! by [`Store::subscribe`].

mod codec;
pub mod embedded;
pub mod memory;
pub mod redis_store;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::broadcast;

use crate::consumer::{ApiProduct, App};
use crate::kvm::KvmEntry;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend cannot be reached or failed: the API answers 503.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A create found the name taken, or an update found it missing / changed: 409 / 404.
    #[error("{kind} `{name}` already exists")]
    AlreadyExists { kind: &'static str, name: String },
    #[error("{kind} `{name}` not found")]
    NotFound { kind: &'static str, name: String },
    /// An update's revision is not the stored one: another write (maybe through another
    /// replica) came in between. Read again and retry.
    #[error("{kind} `{name}` was changed by another write meanwhile")]
    Conflict { kind: &'static str, name: String },
    /// Stored data that does not decode (corruption, a newer format).
    #[error("stored {kind} `{name}` is unreadable: {message}")]
    Corrupt {
        kind: &'static str,
        name: String,
        message: String,
    },
}

/// How a write treats an existing object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Write {
    /// Fails with `AlreadyExists` if present.
    Create,
    /// Fails with `NotFound` if absent. For products and apps, also fails with `Conflict`
    /// unless the stored revision is the written object's `revision` (the one it was read
    /// at); the stored copy then gets `revision + 1`. Key-value entries carry no revision.
    Update,
}

/// A change made through any replica. Receivers re-read what changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Product(String),
    App(String),
    /// Changes may have been missed (a reconnect, a lagging receiver): re-read everything.
    Resync,
}

/// Everything a store holds, for building the index.
#[derive(Debug, Clone, Default)]
pub struct Contents {
    pub products: Vec<ApiProduct>,
    pub apps: Vec<App>,
}

/// A store of products and apps. Writes are durable when they return `Ok`.
#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// Backend name for logs and metrics (`memory`, `embedded`, `redis`).
    fn kind(&self) -> &'static str;

    async fn snapshot(&self) -> Result<Contents, StoreError>;

    async fn get_product(&self, name: &str) -> Result<Option<ApiProduct>, StoreError>;
    async fn put_product(&self, product: &ApiProduct, mode: Write) -> Result<(), StoreError>;
    async fn delete_product(&self, name: &str) -> Result<(), StoreError>;

    async fn get_app(&self, name: &str) -> Result<Option<App>, StoreError>;
    async fn put_app(&self, app: &App, mode: Write) -> Result<(), StoreError>;
    async fn delete_app(&self, name: &str) -> Result<(), StoreError>;

    /// Changes made through this and (for shared backends) every other replica.
    fn subscribe(&self) -> broadcast::Receiver<Change>;

    /// One key-value map entry.
    async fn get_kvm_entry(&self, map: &str, key: &str) -> Result<Option<KvmEntry>, StoreError>;
    /// Writes an entry; `mode` `None` writes whether or not it exists.
    async fn put_kvm_entry(
        &self,
        map: &str,
        key: &str,
        entry: &KvmEntry,
        mode: Option<Write>,
    ) -> Result<(), StoreError>;
    async fn delete_kvm_entry(&self, map: &str, key: &str) -> Result<(), StoreError>;
    /// Every entry of a map, by key.
    async fn list_kvm_entries(&self, map: &str) -> Result<BTreeMap<String, KvmEntry>, StoreError>;
}

/// What a key-value entry is called in messages: `map/key`.
pub(crate) fn kvm_name(map: &str, key: &str) -> String {
    format!("{map}/{key}")
}

pub(crate) const KVM_KIND: &str = "kvm entry";

/// Which store to open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreSpec {
    /// Nothing survives a restart.
    Memory,
    /// A `redb` database file (`tollgate.redb`) in this directory, created if missing.
    Embedded(PathBuf),
    /// `redis://host:port[/db]` or `redis+cluster://host1:port1,host2:port2` (see
    /// [`redis_store`]).
    Redis(String),
}

/// Opens the store `spec` names. Fails with `Unavailable` when the embedded file cannot be
/// opened (another process holds it) or Redis cannot be reached.
pub async fn open(spec: &StoreSpec) -> Result<Arc<dyn Store>, StoreError> {
    Ok(match spec {
        StoreSpec::Memory => Arc::new(memory::MemoryStore::new()),
        StoreSpec::Embedded(dir) => {
            let dir = dir.clone();
            // Opening reads (and after a crash repairs) the file: keep it off the async workers.
            let store = tokio::task::spawn_blocking(move || embedded::EmbeddedStore::open(&dir))
                .await
                .map_err(|e| {
                    StoreError::Unavailable(format!("opening the embedded store: {e}"))
                })??;
            Arc::new(store)
        }
        StoreSpec::Redis(url) => Arc::new(redis_store::RedisStore::connect(url).await?),
    })
}
