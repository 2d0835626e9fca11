//! Shared services policies use at run time: the consumer index, rate-limit counters,
//! response caches, key-value maps, the outgoing HTTP client, the JWKS cache and the Google
//! token cache. Built once per process and handed to every configuration load, so they
//! outlive reloads (counts, cached entries, pooled connections, fetched keys and minted
//! tokens survive a configuration change).

use std::sync::Arc;

use crate::consumer::service::Consumers;
use crate::google::GoogleTokens;
use crate::http_client::HttpClient;
use crate::jwks::Jwks;
use crate::ratelimit::Counters;
use crate::store::Store;

#[derive(Debug, Clone)]
pub struct Services {
    pub consumers: Arc<Consumers>,
    /// Quota and spike arrest counters (memory or Redis).
    pub counters: Counters,
    /// Response caches by policy, kept across reloads.
    pub caches: Arc<crate::cache::Caches>,
    /// File-defined key-value maps of the running configuration (entries written through
    /// the API live in the consumers' store).
    pub kvms: Arc<crate::kvm::Kvms>,
    /// Pooled HTTP/1.1 + HTTP/2 client for callouts, JWKS and token endpoints.
    pub http: HttpClient,
    /// Remote key sets by URL (`VerifyJwt`).
    pub jwks: Arc<Jwks>,
    /// Google access and ID tokens by source and scope/audience (`AssignMessage`).
    pub google: Arc<GoogleTokens>,
    /// Where `ServiceCallout` may call (`--callout-allow`); empty allows everything.
    pub egress: Arc<crate::policies::service_callout::Egress>,
    /// Embedders by spec, each built once (SemanticCache, ModelRouter).
    pub embedders: Arc<crate::embed::Embedders>,
    /// Semantic caches by name, kept across reloads.
    pub semantic: Arc<crate::policies::semantic_cache::SemanticStores>,
    /// Accounts, ledgers, subscriptions and charges (on the consumers' store backend).
    pub monetization: Arc<crate::monetization::Monetization>,
    /// The rate plans of the configuration being compiled (set per load).
    pub rate_plans: Arc<crate::monetization::Plans>,
}

impl Services {
    /// Services around `consumers`, the rest fresh.
    pub fn with_consumers(consumers: Arc<Consumers>) -> Self {
        let monetization =
            crate::monetization::Monetization::new(consumers.store().backend().clone());
        Self {
            consumers,
            counters: Counters::default(),
            caches: Arc::default(),
            kvms: Arc::default(),
            http: HttpClient::new(),
            jwks: Arc::default(),
            google: Arc::default(),
            egress: Arc::default(),
            embedders: Arc::new(crate::embed::Embedders::from_env()),
            semantic: Arc::default(),
            monetization,
            rate_plans: Arc::default(),
        }
    }
}

impl Default for Services {
    /// In-memory services: for `validate`, tests and benchmarks.
    fn default() -> Self {
        Self::with_consumers(Consumers::new(Store::memory()))
    }
}
