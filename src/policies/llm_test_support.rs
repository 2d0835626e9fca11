//! What the LLM policies' unit tests share: an LLM request, usage, a verified app.

use std::sync::Arc;

use crate::consumer::index::{ConsumerIndex, Product, Verified};
use crate::consumer::{
    hash_key, ApiKey, ApiProduct, App, KeyStatus, Operation, Origin, QuotaSettings,
};
use crate::llm::{Api, FinalUsage, LlmRequest, UsageSource};
use crate::vars::Exchange;

pub fn request(model: &str, max_output: Option<u64>) -> Arc<LlmRequest> {
    Arc::new(LlmRequest {
        api: Api::OpenAiChat,
        model: Some(model.into()),
        prompt: String::new(),
        tools: String::new(),
        prompt_token_ids: 0,
        messages: 1,
        media_parts: 0,
        stream: true,
        stream_shape: None,
        include_usage: true,
        max_output_tokens: max_output,
        n: None,
        previous_response_id: None,
    })
}

pub fn usage(input: u64, cached: u64, output: u64) -> FinalUsage {
    FinalUsage {
        input_tokens: input,
        output_tokens: output,
        cached_input_tokens: cached,
        cache_creation_input_tokens: 0,
        reasoning_tokens: 0,
        input_source: UsageSource::Reported,
        output_source: UsageSource::Reported,
    }
}

/// An LLM exchange: `prompt` tokens counted, asking for at most `max_output`.
pub fn llm_exchange(model: &str, prompt: u64, max_output: Option<u64>) -> Exchange {
    let mut ex = Exchange::default();
    ex.state.llm = Some(request(model, max_output));
    ex.state.llm_prompt_tokens = Some(prompt);
    ex
}

/// An hourly limit.
pub fn hourly(limit: u64) -> QuotaSettings {
    QuotaSettings {
        limit,
        interval: 1,
        time_unit: crate::consumer::TimeUnit::Hour,
    }
}

/// App `app` of developer `dev` on product `product` (with an llmTokenQuota), verified.
pub fn verified(app: &str, dev: &str, product: &str, llm_quota: Option<u64>) -> Verified {
    let all = vec![Operation {
        path: "/**".into(),
        ..Default::default()
    }];
    verified_on(app, dev, product, llm_quota, all, "/v1/chat/completions")
}

/// [`verified`] with the product's `operations`, for a request to `path`.
pub fn verified_on(
    app: &str,
    dev: &str,
    product: &str,
    llm_quota: Option<u64>,
    operations: Vec<Operation>,
    path: &str,
) -> Verified {
    let p = Arc::new(
        Product::compile(ApiProduct {
            name: product.into(),
            description: String::new(),
            operations,
            quota: None,
            llm_token_quota: llm_quota.map(hourly),
            approval_type: Default::default(),
            attributes: Default::default(),
            origin: Origin::File,
            revision: 0,
        })
        .expect("product"),
    );
    let a = Arc::new(App {
        name: app.into(),
        developer_email: dev.into(),
        status: Default::default(),
        products: vec![product.into()],
        keys: vec![ApiKey {
            id: "k1".into(),
            hash: hash_key(&format!("secret-{app}")),
            status: KeyStatus::Approved,
            expires_at: None,
            created_at: 0,
        }],
        attributes: Default::default(),
        origin: Origin::File,
        revision: 0,
    });
    ConsumerIndex::build(vec![p], vec![a])
        .verify(&format!("secret-{app}"), "POST", path, None, 1)
        .expect("verified")
}
