//! Shared services policies use at run time (the consumer index today; counters and
//! key-value maps later). Built once per process and handed to every configuration load,
//! so they outlive reloads.

use std::sync::Arc;

use crate::consumer::service::Consumers;
use crate::store::memory::MemoryStore;

#[derive(Debug, Clone)]
pub struct Services {
    pub consumers: Arc<Consumers>,
    /// Response caches by policy, kept across reloads.
    pub caches: Arc<crate::policies::response_cache::Caches>,
    /// File-defined key-value maps of the running configuration (entries written through
    /// the API live in the consumers' store).
    pub kvms: Arc<crate::kvm::Kvms>,
}

impl Default for Services {
    /// In-memory services: for `validate`, tests and benchmarks.
    fn default() -> Self {
        Self {
            consumers: Consumers::new(Arc::new(MemoryStore::new())),
            caches: Arc::default(),
            kvms: Arc::default(),
        }
    }
}
