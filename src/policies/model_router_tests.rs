use std::path::PathBuf;
use std::sync::Arc;

use super::*;
use crate::pipeline::{claim_owned_headers, DirectionPipeline, Outcome};
use crate::services::Services;
use crate::vars::{Headers, RequestInfo};

fn model_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".tools/embed-model");
    dir.join("model.safetensors").is_file().then_some(dir)
}

fn services() -> Services {
    Services {
        embedders: Arc::new(crate::embed::Embedders::new(model_dir())),
        ..Services::default()
    }
}

fn try_build(name: &str, yaml: &str) -> Result<Arc<dyn Policy>, SpecError> {
    let ctx = BuildContext {
        name: name.into(),
        config_dir: None,
        services: services(),
    };
    build(&ctx, serde_norway::from_str(yaml).expect("YAML"))
}

fn policy(yaml: &str) -> Arc<dyn Policy> {
    try_build("mr", yaml).unwrap_or_else(|e| panic!("{e}"))
}

fn err(yaml: &str) -> String {
    try_build("mr", yaml).expect_err("refused").to_string()
}

/// An LLM exchange as the tracker leaves it: the body, its parse in `ex.state.llm`, the
/// prompt's tokens.
fn exchange(path: &str, headers: &[(&str, &str)], body: &str, tokens: u64) -> Exchange {
    let mut h = Headers::new();
    h.push(":method".into(), "POST".into());
    h.push(":path".into(), path.into());
    for (k, v) in headers {
        h.push((*k).into(), (*v).into());
    }
    let mut ex = Exchange {
        request: RequestInfo::from_headers(h),
        ..Default::default()
    };
    ex.request_body = Some(body.as_bytes().to_vec());
    let endpoint = crate::llm::detect("POST", path, |_| None).expect("an LLM path");
    ex.state.llm = Some(Arc::new(
        crate::llm::parse_request(&endpoint, body.as_bytes()).expect("parses"),
    ));
    ex.state.llm_prompt_tokens = Some(tokens);
    ex
}

fn chat(model: &str, user: &str) -> String {
    serde_json::json!({
        "model": model,
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": user}
        ],
        "temperature": 0.25,
        "stream": false
    })
    .to_string()
}

async fn run(p: &Arc<dyn Policy>, ex: &mut Exchange) -> Outcome {
    p.run(ex, Direction::Request).outcome().await
}

fn var(ex: &Exchange, name: &str) -> Option<String> {
    ex.var(&format!("modelrouter.mr.{name}"))
        .map(|v| v.as_text().into_owned())
}

fn body_model(ex: &Exchange) -> String {
    let v: serde_json::Value =
        serde_json::from_slice(ex.request_body.as_deref().expect("a body")).expect("JSON");
    v["model"].as_str().unwrap_or_default().to_owned()
}

fn set_headers(ex: &mut Exchange, dir: Direction) -> Vec<(String, String)> {
    ex.take_mutations(dir)
        .set
        .into_iter()
        .map(|(n, v, _)| (n, v))
        .collect()
}

const RULES: &str = r#"
rules:
- name: code
  when: {keywords: [stack trace, "Traceback"]}
  route: {model: coder-large}
- name: long
  when: {promptTokens: {min: 1000}}
  route: {model: long-context, header: long-pool}
- name: legacy
  when: {models: [gpt-3.5-turbo, "text-davinci-*"]}
  route: {model: gpt-4o-mini}
- name: gold
  when: {headers: {x-tier: gold}, condition: "request.headers['x-team'] == 'core'"}
  route: {header: gold-pool}
default: {model: small}
responseHeader: x-tollgate-route
"#;

#[tokio::test]
async fn keywords_rewrite_the_model_in_the_body_and_keep_every_other_field() {
    let p = policy(RULES);
    assert!(p.needs_body(Direction::Request) && p.replaces_body(Direction::Request));
    assert!(p.hooks().llm);
    let body = chat("gpt-4o", "Here is my STACK TRACE, what failed?");
    let mut ex = exchange("/v1/chat/completions", &[], &body, 20);
    assert!(run(&p, &mut ex).await.is_continue());
    assert!(ex.request_body_replaced);
    // Only the model's bytes changed.
    assert_eq!(
        String::from_utf8(ex.request_body.clone().unwrap()).unwrap(),
        body.replace("\"gpt-4o\"", "\"coder-large\"")
    );
    assert_eq!(
        ex.state.llm.as_ref().unwrap().model.as_deref(),
        Some("coder-large")
    );
    assert_eq!(var(&ex, "rule").as_deref(), Some("code"));
    assert_eq!(var(&ex, "model").as_deref(), Some("coder-large"));
    assert_eq!(var(&ex, "original_model").as_deref(), Some("gpt-4o"));
    assert_eq!(var(&ex, "similarity"), None);
    assert_eq!(
        set_headers(&mut ex, Direction::Response),
        vec![("x-tollgate-route".to_owned(), "code".to_owned())]
    );
    // The keyword in the system prompt only: the last user turn is what counts by default.
    let body = serde_json::json!({"model": "gpt-4o", "messages": [
        {"role": "system", "content": "Answer with a Traceback when unsure."},
        {"role": "user", "content": "hello"}]})
    .to_string();
    let mut ex = exchange("/v1/chat/completions", &[], &body, 20);
    run(&p, &mut ex).await;
    assert_eq!(var(&ex, "rule").as_deref(), Some("default"));
    assert_eq!(body_model(&ex), "small");
}

/// Without a token rule the flow runs no LLM tracker: the step reads the body's shared
/// parse itself and leaves no LLM view behind (a tracker placed later parses the routed body).
#[tokio::test]
async fn routes_without_the_llm_tracker() {
    let p = policy("{rules: [{name: code, when: {keywords: [traceback], models: ['gpt-*']}, route: {model: coder}}]}");
    assert!(!p.hooks().llm && p.needs_body(Direction::Request));
    assert!(
        policy(RULES).hooks().llm,
        "a promptTokens rule needs the count"
    );
    let mut ex = exchange(
        "/v1/chat/completions",
        &[],
        &chat("gpt-4o", "a Traceback"),
        0,
    );
    ex.state.llm = None;
    ex.state.llm_prompt_tokens = None;
    run(&p, &mut ex).await;
    assert_eq!(body_model(&ex), "coder");
    assert!(ex.state.llm.is_none());
    assert_eq!(var(&ex, "original_model").as_deref(), Some("gpt-4o"));
    // A body naming its model twice names none to the rules, and any rewrite replaces
    // both copies.
    let p = policy(
        "{rules: [{name: m, when: {models: ['gpt-4o']}, route: {model: x}}], default: {model: d}}",
    );
    let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"model":"gpt-4o"}"#;
    let mut ex = exchange("/v1/chat/completions", &[], body, 0);
    ex.state.llm = None;
    run(&p, &mut ex).await;
    assert_eq!(var(&ex, "rule").as_deref(), Some("default"));
    assert_eq!(
        String::from_utf8(ex.request_body.clone().unwrap()).unwrap(),
        r#"{"model":"d","messages":[{"role":"user","content":"hi"}],"model":"d"}"#
    );
}

#[tokio::test]
async fn keywords_in_the_whole_prompt_when_configured() {
    let p = policy(
        r#"
keywordsIn: prompt
rules:
- name: code
  when: {keywords: [traceback]}
  route: {model: coder}
- name: user-only
  when: {keywords: [sunny], keywordsIn: lastUser}
  route: {model: weather}
"#,
    );
    let body = serde_json::json!({"model": "m", "messages": [
        {"role": "system", "content": "Quote the TRACEBACK."},
        {"role": "user", "content": "hello"}]})
    .to_string();
    let mut ex = exchange("/v1/chat/completions", &[], &body, 5);
    run(&p, &mut ex).await;
    assert_eq!(body_model(&ex), "coder");
    // A rule's own scope: "sunny" only in an earlier turn does not count.
    let body = serde_json::json!({"model": "m", "messages": [
        {"role": "user", "content": "is it sunny?"},
        {"role": "assistant", "content": "yes"},
        {"role": "user", "content": "thanks"}]})
    .to_string();
    let mut ex = exchange("/v1/chat/completions", &[], &body, 5);
    run(&p, &mut ex).await;
    assert_eq!(var(&ex, "rule"), None, "no rule, no default");
    assert_eq!(body_model(&ex), "m");
    assert!(!ex.request_body_replaced);
    assert_eq!(var(&ex, "model").as_deref(), Some("m"));
}

#[tokio::test]
async fn prompt_tokens_models_headers_and_conditions() {
    let p = policy(RULES);
    // Length: the routing header goes with the model.
    let mut ex = exchange("/v1/chat/completions", &[], &chat("gpt-4o", "hi"), 1000);
    run(&p, &mut ex).await;
    assert_eq!(body_model(&ex), "long-context");
    let set = set_headers(&mut ex, Direction::Request);
    assert!(
        set.contains(&("x-tollgate-route".into(), "long-pool".into())),
        "{set:?}"
    );
    let mut ex = exchange("/v1/chat/completions", &[], &chat("gpt-4o", "hi"), 999);
    run(&p, &mut ex).await;
    assert_eq!(var(&ex, "rule").as_deref(), Some("default"));

    // Requested model: exact and glob; unknown models fall to the default.
    for (m, rule) in [
        ("gpt-3.5-turbo", "legacy"),
        ("text-davinci-003", "legacy"),
        ("text-davinci", "default"),
        ("gpt-3.5-turbo-16k", "default"),
    ] {
        let mut ex = exchange("/v1/chat/completions", &[], &chat(m, "hi"), 3);
        run(&p, &mut ex).await;
        assert_eq!(var(&ex, "rule").as_deref(), Some(rule), "{m}");
    }

    // Header and CEL condition, both needed; a header-only action keeps the model.
    let gold = [("x-tier", "gold"), ("x-team", "core")];
    let mut ex = exchange("/v1/chat/completions", &gold, &chat("gpt-4o", "hi"), 3);
    run(&p, &mut ex).await;
    assert_eq!(var(&ex, "rule").as_deref(), Some("gold"));
    assert_eq!(body_model(&ex), "gpt-4o");
    assert!(!ex.request_body_replaced);
    assert_eq!(var(&ex, "model").as_deref(), Some("gpt-4o"));
    let set = set_headers(&mut ex, Direction::Request);
    assert_eq!(set, vec![("x-tollgate-route".into(), "gold-pool".into())]);
    let mut ex = exchange(
        "/v1/chat/completions",
        &[("x-tier", "gold"), ("x-team", "other")],
        &chat("gpt-4o", "hi"),
        3,
    );
    run(&p, &mut ex).await;
    assert_eq!(var(&ex, "rule").as_deref(), Some("default"));

    // `*`: present with any value.
    let p = policy("{rules: [{name: dbg, when: {headers: {x-debug: '*'}}, route: {model: d}}]}");
    let mut ex = exchange(
        "/v1/chat/completions",
        &[("x-debug", "")],
        &chat("m", "hi"),
        3,
    );
    run(&p, &mut ex).await;
    assert_eq!(body_model(&ex), "d");
}

#[tokio::test]
async fn app_attributes_through_the_condition() {
    let p = policy(
        r#"{rules: [{name: premium, when: {condition: "app.attributes.tier == 'premium'"}, route: {model: big}}]}"#,
    );
    let app = |tier: Option<&str>| {
        let mut v =
            crate::policies::llm_test_support::verified("an-app", "dev@example.com", "p", None);
        let mut a = crate::consumer::App::clone(&v.app);
        if let Some(t) = tier {
            a.attributes.insert("tier".into(), t.into());
        }
        v.app = Arc::new(a);
        v
    };
    // The verified app's tier is not premium: no match.
    let mut ex = exchange("/v1/chat/completions", &[], &chat("m", "hi"), 3);
    ex.state
        .add_app("verifyapikey.vk.".into(), app(Some("basic")));
    run(&p, &mut ex).await;
    assert_eq!(body_model(&ex), "m");
    let mut ex = exchange("/v1/chat/completions", &[], &chat("m", "hi"), 3);
    ex.state
        .add_app("verifyapikey.vk.".into(), app(Some("premium")));
    run(&p, &mut ex).await;
    assert_eq!(body_model(&ex), "big");
}

#[tokio::test]
async fn splits_by_weight_sticky_or_random() {
    let p = policy(
        r#"
rules:
- name: ab
  route:
    split: [{model: a, weight: 1}, {model: b, weight: 3}, {model: never, weight: 0}]
    stickyBy: "{request.header.x-user}"
"#,
    );
    let mut counts = std::collections::BTreeMap::new();
    for u in 0..400 {
        let user = format!("user-{u}");
        let pick = |user: &str| {
            let mut ex = exchange(
                "/v1/chat/completions",
                &[("x-user", user)],
                &chat("m", "hi"),
                3,
            );
            futures_util::FutureExt::now_or_never(run(&p, &mut ex)).expect("synchronous");
            body_model(&ex)
        };
        let first = pick(&user);
        assert_eq!(pick(&user), first, "sticky");
        *counts.entry(first).or_insert(0) += 1;
    }
    assert!(!counts.contains_key("never"), "{counts:?}");
    let (a, b) = (counts["a"], counts["b"]);
    // 1:3 over 400 keys: a far from both 0 and half.
    assert!((50..150).contains(&a) && a + b == 400, "{counts:?}");

    // No key: random, every branch reachable.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..200 {
        let mut ex = exchange("/v1/chat/completions", &[], &chat("m", "hi"), 3);
        run(&p, &mut ex).await;
        seen.insert(body_model(&ex));
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["a", "b"]);
}

#[tokio::test]
async fn header_rewrite_for_the_endpoint_picker_leaves_the_body() {
    let p = policy(
        "{rules: [{name: lora, when: {models: [llama-3-8b]}, route: {model: llama-3-8b-lora, rewrite: header}}]}",
    );
    assert!(!p.replaces_body(Direction::Request));
    let body = chat("llama-3-8b", "hi");
    let mut ex = exchange("/v1/chat/completions", &[], &body, 3);
    run(&p, &mut ex).await;
    assert!(!ex.request_body_replaced);
    assert_eq!(body_model(&ex), "llama-3-8b");
    let mut set = set_headers(&mut ex, Direction::Request);
    set.sort();
    assert_eq!(
        set,
        vec![
            (
                "x-gateway-model-name-rewrite".into(),
                "llama-3-8b-lora".into()
            ),
            (
                "x-llm-d-model-name-rewrite".into(),
                "llama-3-8b-lora".into()
            ),
        ]
    );
    assert_eq!(
        ex.state.llm.as_ref().unwrap().model.as_deref(),
        Some("llama-3-8b-lora")
    );
}

#[tokio::test]
async fn the_pickers_model_header_follows_a_body_rewrite() {
    let p = policy("{default: {model: routed}}");
    let mut ex = exchange(
        "/v1/chat/completions",
        &[("x-gateway-model-name", "gpt-4o")],
        &chat("gpt-4o", "hi"),
        3,
    );
    run(&p, &mut ex).await;
    assert_eq!(ex.request.headers.get(MODEL_NAME), Some("routed"));
    // Not set when no earlier step set it.
    let mut ex = exchange("/v1/chat/completions", &[], &chat("gpt-4o", "hi"), 3);
    run(&p, &mut ex).await;
    assert!(!set_headers(&mut ex, Direction::Request)
        .iter()
        .any(|(n, _)| n == MODEL_NAME));
}

#[tokio::test]
async fn path_models_are_rewritten_in_the_path() {
    let p = policy("{default: {model: gemini-2.5-pro}}");
    let path = "/v1beta/models/gemini-2.0-flash:generateContent";
    let mut ex = exchange(path, &[], r#"{"contents":[{"parts":[{"text":"hi"}]}]}"#, 3);
    run(&p, &mut ex).await;
    assert!(!ex.request_body_replaced);
    let set = set_headers(&mut ex, Direction::Request);
    assert_eq!(
        set,
        vec![(
            ":path".into(),
            "/v1beta/models/gemini-2.5-pro:generateContent".into()
        )]
    );
    assert_eq!(
        rewrite_path_model(
            "/openai/deployments/gpt4/chat/completions?api-version=1",
            "gpt4",
            "mini"
        )
        .as_deref(),
        Some("/openai/deployments/mini/chat/completions?api-version=1")
    );
}

#[test]
fn body_splice_finds_the_top_level_model_only() {
    let set = |b: &str| {
        set_top_level_string(b.as_bytes(), "model", "new\"one")
            .map(|v| String::from_utf8(v).unwrap())
    };
    assert_eq!(
        set(r#" { "a" : {"model":"inner"}, "model" : "old" , "b":[1,"x\"}"]} "#).as_deref(),
        Some(r#" { "a" : {"model":"inner"}, "model" : "new\"one" , "b":[1,"x\"}"]} "#)
    );
    // An escaped key is the same key to the parser; a duplicate is rewritten too, so the
    // upstream reads the routed model whichever copy it keeps.
    assert_eq!(
        set(r#"{"\u006dodel":"old","model":7}"#).as_deref(),
        Some(r#"{"\u006dodel":"new\"one","model":"new\"one"}"#)
    );
    assert_eq!(set(r#"{"models":"x"}"#), None);
    assert_eq!(set(r#"["model"]"#), None);
    assert_eq!(set(r#"{"model":"#), None);
    assert_eq!(set(""), None);
}

#[test]
fn globs() {
    let g = |p: &str, s: &str| Glob::compile(p).unwrap().matches(s);
    assert!(g("gpt-4o", "gpt-4o"));
    assert!(!g("gpt-4o", "gpt-4o-mini"));
    assert!(g("gpt-4o*", "gpt-4o-mini"));
    assert!(g("*", ""));
    assert!(g("*-mini", "gpt-4o-mini"));
    assert!(g("a*b*c", "a-b-b-c"));
    assert!(!g("a*b*c", "a-c-b"));
    assert!(!g("ab*ba", "aba"));
    for bad in ["", "gpt?", "gpt[4]", "a**b", "two words"] {
        assert!(Glob::compile(bad).is_err(), "{bad}");
    }
}

#[test]
fn spec_errors_name_the_field() {
    let e = err("{rules: [], default: {model: m}, nope: 1}");
    assert!(e.contains("nope"), "{e}");
    let e = err("{rules: []}");
    assert!(e.contains("rules") && e.contains("no rules"), "{e}");
    let e = err("{rules: [{name: a, when: {models: ['gpt?']}, route: {model: m}}]}");
    assert!(e.contains("rules[0].when.models[0]"), "{e}");
    let e =
        err("{rules: [{name: a, route: {split: [{model: x, weight: 0}, {model: y, weight: 0}]}}]}");
    assert!(
        e.contains("rules[0].route.split") && e.contains("add up to 0"),
        "{e}"
    );
    let e = err("{rules: [{name: a, route: {model: x}}, {name: a, route: {model: y}}]}");
    assert!(e.contains("rules[1].name") && e.contains("twice"), "{e}");
    let e = err("{rules: [{name: a, when: {modles: [x]}, route: {model: x}}]}");
    assert!(e.contains("modles"), "{e}");
    let e = err("{rules: [{name: a, route: {}}]}");
    assert!(e.contains("neither"), "{e}");
    let e = err("{rules: [{name: a, route: {model: x, split: [{model: y, weight: 1}]}}]}");
    assert!(e.contains("not both"), "{e}");
    let e = err("{rules: [{name: default, route: {model: x}}]}");
    assert!(e.contains("reserved"), "{e}");
    let e = err("{rules: [{name: 'a b', route: {model: x}}]}");
    assert!(e.contains("rule name"), "{e}");
    let e = err("{rules: [{name: a, when: {keywords: ['  ']}, route: {model: x}}]}");
    assert!(e.contains("keywords[0]"), "{e}");
    let e = err("{rules: [{name: a, when: {similarTo: {examples: [x]}}, route: {model: x}}]}");
    assert!(e.contains("embedder"), "{e}");
    let e = err("{rules: [{name: a, when: {promptTokens: {min: 5, max: 4}}, route: {model: x}}]}");
    assert!(e.contains("promptTokens"), "{e}");
    let e = err("{rules: [{name: a, when: {condition: 'request.('}, route: {model: x}}]}");
    assert!(e.contains("condition"), "{e}");
    let e = err("{default: {model: 'two words'}}");
    assert!(e.contains("default.model"), "{e}");
    let e = err("{default: {model: x}, routeHeader: x-envoy-route}");
    assert!(e.contains("routeHeader"), "{e}");
    let e = err("{default: {model: x}, fallbacks: [{model: x, then: [y]}]}");
    assert!(e.contains("stage: attempt"), "{e}");
    let e = err("{stage: attempt}");
    assert!(e.contains("fallbacks"), "{e}");
    let e = err("{stage: attempt, fallbacks: [{model: x, then: []}]}");
    assert!(e.contains("fallbacks[0].then"), "{e}");
    let e = err("{default: {model: x, stickyBy: '{app.name}'}}");
    assert!(e.contains("stickyBy"), "{e}");
}

/// The routing header (and the picker's rewrite headers) are owned: the flow removes a
/// client's values before any step, so a client cannot pick a backend by sending it, even
/// when no rule sets it.
#[tokio::test]
async fn a_client_sent_routing_header_never_survives() {
    let p = policy("{rules: [{name: a, when: {models: [nothing]}, route: {header: big}}]}");
    let owned = p.owned_request_headers();
    for h in [
        "x-tollgate-route",
        "x-llm-d-model-name-rewrite",
        "x-gateway-model-name-rewrite",
    ] {
        assert!(owned.iter().any(|o| o == h), "{h}: {owned:?}");
    }
    let pipeline = DirectionPipeline {
        owned: owned.clone(),
        ..Default::default()
    };
    let mut ex = exchange(
        "/v1/chat/completions",
        &[
            ("x-tollgate-route", "big"),
            ("X-LLM-D-Model-Name-Rewrite", "x"),
        ],
        &chat("m", "hi"),
        3,
    );
    claim_owned_headers(&pipeline, &mut ex);
    run(&p, &mut ex).await;
    assert_eq!(ex.request.headers.get("x-tollgate-route"), None);
    let m = ex.take_mutations(Direction::Request);
    assert!(m.remove.iter().any(|r| r == "x-tollgate-route"), "{m:?}");
    assert!(m.set.is_empty(), "{m:?}");
    // A configured name is owned instead.
    let p = policy("{default: {header: x}, routeHeader: X-Pool}");
    assert!(p.owned_request_headers().iter().any(|h| h == "x-pool"));
}

#[tokio::test]
async fn not_an_llm_request_passes_untouched() {
    let p = policy(RULES);
    let mut ex = Exchange::default();
    assert!(run(&p, &mut ex).await.is_continue());
    assert!(ex.take_mutations(Direction::Request).is_empty());
    assert!(ex.vars.is_empty());
    // And the response direction does nothing.
    let mut ex = exchange("/v1/chat/completions", &[], &chat("m", "hi"), 3);
    assert!(p
        .run(&mut ex, Direction::Response)
        .outcome()
        .await
        .is_continue());
    assert!(ex.vars.is_empty());
}

#[tokio::test]
async fn fallback_order_by_attempt() {
    let p = policy(
        r#"
stage: attempt
fallbacks:
- {model: gpt-4o, then: [gpt-4o-mini, llama-70b]}
- {model: "claude-*", then: [claude-haiku]}
"#,
    );
    assert!(p.owned_request_headers().is_empty());
    assert!(p.replaces_body(Direction::Request));
    assert!(p.needs_body(Direction::Request) && !p.hooks().llm);
    let at = |n: Option<&str>, model: &str| {
        let headers: Vec<(&str, &str)> = n
            .map(|n| ("x-envoy-attempt-count", n))
            .into_iter()
            .collect();
        let mut ex = exchange("/v1/chat/completions", &headers, &chat(model, "hi"), 3);
        // No tracker in this stage: the policy reads the body itself.
        ex.state.llm = None;
        assert!(futures_util::FutureExt::now_or_never(run(&p, &mut ex))
            .expect("synchronous")
            .is_continue());
        (body_model(&ex), var(&ex, "rule"))
    };
    assert_eq!(at(None, "gpt-4o").0, "gpt-4o");
    assert_eq!(at(Some("1"), "gpt-4o").0, "gpt-4o");
    assert_eq!(
        at(Some("2"), "gpt-4o"),
        ("gpt-4o-mini".into(), Some("fallback".into()))
    );
    assert_eq!(at(Some("3"), "gpt-4o").0, "llama-70b");
    assert_eq!(at(Some("9"), "gpt-4o").0, "llama-70b");
    assert_eq!(at(Some("2"), "claude-sonnet").0, "claude-haiku");
    assert_eq!(at(Some("2"), "other").0, "other");
    assert_eq!(at(Some("junk"), "gpt-4o").0, "gpt-4o");
}

#[tokio::test]
async fn similarity_routes_a_paraphrase_of_an_example() {
    if model_dir().is_none() {
        eprintln!("skipped: no built-in model at .tools/embed-model (scripts/setup.sh)");
        return;
    }
    let p = policy(
        r#"
embedder: {kind: static}
rules:
- name: refunds
  when:
    similarTo:
      examples: ["How do I get a refund for my order?", "I want my money back for this purchase"]
      threshold: 0.7
  route: {model: support-model}
default: {model: general}
"#,
    );
    let mut ex2 = exchange(
        "/v1/chat/completions",
        &[],
        &chat("gpt-4o", "how can I get a refund for my order"),
        9,
    );
    run(&p, &mut ex2).await;
    assert_eq!(var(&ex2, "rule").as_deref(), Some("refunds"));
    assert_eq!(body_model(&ex2), "support-model");
    let s: f64 = var(&ex2, "similarity").unwrap().parse().unwrap();
    assert!((0.7..=1.0001).contains(&s), "{s}");
    // The embedding is left for the semantic cache (same text, same embedder).
    assert!(ex2.state.prompt_embedding.is_some());

    let mut ex = exchange(
        "/v1/chat/completions",
        &[],
        &chat("gpt-4o", "Write a haiku about autumn leaves"),
        9,
    );
    run(&p, &mut ex).await;
    assert_eq!(var(&ex, "rule").as_deref(), Some("default"));
    assert_eq!(var(&ex, "similarity"), None);
}

#[tokio::test]
async fn an_unavailable_embedder_makes_similarity_rules_not_match() {
    let yaml = |on: &str| {
        format!(
            r#"
embedder: {{kind: openai, baseUrl: "http://127.0.0.1:1", model: e, timeoutMs: 200}}
onEmbedderError: {on}
rules:
- name: sim
  when: {{similarTo: {{examples: [refund please]}}}}
  route: {{model: support}}
- name: after
  when: {{keywords: [hello]}}
  route: {{model: greeter}}
"#
        )
    };
    let p = policy(&yaml("noMatch"));
    let failures = || EMBED_FAILURES.with_label_values(&["mr"]).get();
    let before = failures();
    let mut ex = exchange(
        "/v1/chat/completions",
        &[],
        &chat("m", "hello, refund please"),
        3,
    );
    assert!(run(&p, &mut ex).await.is_continue());
    // The next rule decided.
    assert_eq!(body_model(&ex), "greeter");
    assert!(failures() > before);

    let p = policy(&yaml("reject"));
    let mut ex = exchange("/v1/chat/completions", &[], &chat("m", "refund please"), 3);
    match run(&p, &mut ex).await {
        Outcome::Reject(f) => {
            assert_eq!(f.status, 503);
            assert_eq!(f.code, EMBEDDER_UNAVAILABLE);
            assert!(!f.message.contains("refund"));
        }
        o => panic!("{o:?}"),
    }
}

#[tokio::test]
async fn decisions_are_counted_by_rule_and_configured_model() {
    let p = try_build(
        "counted",
        "{rules: [{name: code, when: {keywords: [bug]}, route: {model: coder}}]}",
    )
    .unwrap();
    let c = |rule: &str, model: &str| DECISIONS.with_label_values(&["counted", rule, model]).get();
    let mut ex = exchange(
        "/v1/chat/completions",
        &[],
        &chat("whatever-client-sent", "a bug"),
        3,
    );
    run(&p, &mut ex).await;
    let mut ex = exchange(
        "/v1/chat/completions",
        &[],
        &chat("whatever-client-sent", "fine"),
        3,
    );
    run(&p, &mut ex).await;
    assert_eq!(c("code", "coder"), 1);
    assert_eq!(c("none", "unchanged"), 1);
    // The requested model never became a label.
    let text = crate::telemetry::METRICS.render();
    assert!(!text.contains("whatever-client-sent"));
}

/// The folded, prefiltered scan marks exactly the rules a naive case-insensitive search
/// finds, overlapping and nested keywords and non-ASCII text included.
#[test]
fn keyword_scan_agrees_with_a_naive_search() {
    let words: Vec<Vec<String>> = vec![
        vec!["stack trace".into(), "Traceback".into()],
        vec!["trace".into()],
        vec!["ÉCOLE".into(), "naïve".into()],
        vec!["a".into(), "ab".into(), "abc".into()],
        vec!["Segfault".into()],
    ];
    let rules: Vec<(usize, &[String])> = words
        .iter()
        .enumerate()
        .map(|(i, w)| (i, w.as_slice()))
        .collect();
    let kw = super::Keywords::build(&rules).unwrap().unwrap();
    let texts = [
        "",
        "nothing here",
        "Got a TRACEBACK in the STACK TRACE",
        "retrace",
        "l'ÉCOLE est naïve",
        "l'école est NAÏVE",
        "xAbCx",
        "SEGFAULT at 0x0",
        "bb",
        "Ünïcödé only",
    ];
    for t in texts {
        let mut hit = vec![false; words.len()];
        kw.scan(t, &mut hit);
        let lower = t.to_ascii_lowercase();
        let want: Vec<bool> = words
            .iter()
            .map(|ws| ws.iter().any(|w| lower.contains(&w.to_ascii_lowercase())))
            .collect();
        assert_eq!(hit, want, "text {t:?}");
    }
}

#[test]
fn the_body_splice_skips_escaped_quotes_and_refuses_truncated_bodies() {
    let body = br#"{"messages":[{"content":"say \"model\": \\"}],"model":"a","x":"\\\""}"#;
    let out = super::set_top_level_string(body, "model", "b").expect("spliced");
    assert_eq!(
        std::str::from_utf8(&out).unwrap(),
        r#"{"messages":[{"content":"say \"model\": \\"}],"model":"b","x":"\\\""}"#
    );
    for cut in [
        br#"{"model":"a","x":"abc\"#.as_slice(),
        br#"{"x":"ab"#,
        br#"{"x":"\"#,
    ] {
        assert_eq!(super::set_top_level_string(cut, "model", "b"), None);
    }
}
