//! Shared services policies use at run time (the consumer index, rate-limit counters;
//! key-value maps later). Built once per process and handed to every configuration load,
//! so they outlive reloads.

use std::sync::Arc;

use crate::consumer::service::Consumers;
use crate::ratelimit::Counters;
use crate::store::memory::MemoryStore;

#[derive(Debug, Clone)]
pub struct Services {
    pub consumers: Arc<Consumers>,
    /// Quota and spike arrest counters (memory or Redis).
    pub counters: Counters,
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
            counters: Counters::default(),
            caches: Arc::default(),
            kvms: Arc::default(),
        }
    }
}
