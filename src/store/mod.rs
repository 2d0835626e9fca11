//! Storage: one narrow [`Backend`] trait (records with conditional writes, a change feed,
//! quota counters with checkpoints, expiring cache entries, all as bytes), three backends,
//! and typed façades over it:
//!
//! - [`Store`]: API products, apps (with their hashed keys) and key-value entries;
//! - [`crate::ratelimit::Counters`]: quota counters (Redis through [`Backend::count`],
//!   in-memory counters checkpointed through [`Backend::save_counters`]);
//! - [`crate::cache::SharedTier`]: the ResponseCache's shared entries.
//!
//! Backends: `memory` (tests, and `--store memory`), `embedded` (a transactional on-disk
//! file, the single-replica default) and `redis` (several replicas; Redis Cluster too). All
//! are opened by [`open`]. The data path never reads a store: it reads the in-memory
//! [`crate::consumer::index::ConsumerIndex`], rebuilt from [`Store::snapshot`] and kept
//! fresh by [`Store::subscribe`].

pub mod backend;
mod codec;
pub mod embedded;
pub mod memory;
mod metered;
mod objects;
pub mod redis_store;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use backend::{Backend, Cond, Put, Table, TallyAdd};
pub use objects::Store;

use crate::consumer::{ApiProduct, App};

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

/// How [`open`] connects to a shared backend.
#[derive(Debug, Clone, Copy)]
pub struct OpenOptions {
    /// Follow the change feed (objects need it; a cache tier or counters do not).
    pub change_feed: bool,
    /// Longest wait for one connection attempt and one command; `None` for the defaults
    /// (see [`redis_store`]).
    pub timeout: Option<Duration>,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self {
            change_feed: true,
            timeout: None,
        }
    }
}

/// Opens the backend `spec` names: the one place every backend is opened. Fails with
/// `Unavailable` when the embedded file cannot be opened (another process holds it) or
/// Redis cannot be reached.
pub async fn open(spec: &StoreSpec) -> Result<Arc<dyn Backend>, StoreError> {
    open_with(spec, OpenOptions::default()).await
}

/// [`open`] with options.
pub async fn open_with(
    spec: &StoreSpec,
    opts: OpenOptions,
) -> Result<Arc<dyn Backend>, StoreError> {
    let backend: Arc<dyn Backend> = match spec {
        StoreSpec::Memory => Arc::new(memory::MemoryBackend::new()),
        StoreSpec::Embedded(dir) => {
            let dir = dir.clone();
            // Opening reads (and after a crash repairs) the file: keep it off the async workers.
            let store = tokio::task::spawn_blocking(move || embedded::EmbeddedBackend::open(&dir))
                .await
                .map_err(|e| {
                    StoreError::Unavailable(format!("opening the embedded store: {e}"))
                })??;
            Arc::new(store)
        }
        StoreSpec::Redis(url) => {
            Arc::new(redis_store::RedisBackend::connect_with(url, opts).await?)
        }
    };
    Ok(metered::Metered::wrap(backend))
}
