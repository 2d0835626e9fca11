//! tollgate: an Envoy External Processing (ext_proc) policy decision point for API and LLM
//! traffic. See `docs/architecture.md` for how the parts fit.
#![forbid(unsafe_code)]
// `Fault` (a rejection: status, code, message, headers) is returned once per rejected
// exchange, on the cold path; boxing it would cost every policy an allocation for nothing.
#![allow(clippy::result_large_err)]

pub mod admin;
pub mod app;
pub mod cache;
pub mod config;
pub mod consumer;
pub mod counters;
pub mod direction;
pub mod embed;
pub mod expr;
pub mod fault;
#[doc(hidden)]
pub mod fuzz_entry;
pub mod google;
pub mod guard;
pub mod http_client;
pub mod import;
pub mod jwks;
pub mod kvm;
pub mod llm;
pub mod monetization;
pub mod openapi;
pub mod pipeline;
pub mod policies;
pub mod ratelimit;
pub mod refresh;
pub mod server;
pub mod services;
pub mod store;
pub mod telemetry;
pub mod usage;
pub mod vars;
pub mod vindex;

/// The `apiVersion` every configuration document carries.
pub const API_VERSION: &str = "tollgate.dev/v1alpha1";
