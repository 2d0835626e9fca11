//! OasValidation against the public OpenAI API description, in its OpenAPI 3.1 and 3.0
//! forms (read from `../shared/data/`, never copied into the repository): real
//! chat-completion bodies pass, broken ones fail with pointers.

#![allow(clippy::result_large_err)] // Fault is the policies' own error type, as in the library.

use std::path::PathBuf;
use std::sync::Arc;

use tollgate::fault::Fault;
use tollgate::pipeline::{Direction, Hook, Policy};
use tollgate::policies::{builder, BuildContext};
use tollgate::vars::{Exchange, Headers, RequestInfo};

/// `$TOLLGATE_SHARED_DATA/<name>`, else `../shared/data/<name>` beside the checkout (a git
/// worktree elsewhere points the variable at it).
fn spec_path(name: &str) -> PathBuf {
    std::env::var_os("TOLLGATE_SHARED_DATA")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data"))
        .join(name)
}

fn policy(file: &str) -> Arc<dyn Policy> {
    let spec = format!("spec: {}\n", spec_path(file).display());
    let build = builder("OasValidation").expect("registered");
    build(
        &BuildContext::default(),
        serde_norway::from_str(&spec).unwrap(),
    )
    .unwrap_or_else(|e| panic!("{file} does not load: {e}"))
}

fn post(path: &str, body: &str) -> Exchange {
    let mut h = Headers::new();
    h.push(":method".into(), "POST".into());
    h.push(":path".into(), path.into());
    h.push("content-type".into(), "application/json".into());
    Exchange {
        request: RequestInfo::from_headers(h),
        request_body: Some(body.as_bytes().to_vec()),
        ..Default::default()
    }
}

fn check(p: &Arc<dyn Policy>, mut ex: Exchange) -> Result<(), Fault> {
    match p.run(&mut ex, Direction::Request) {
        Hook::Ready(o) => o
            .into_result()
            .map(|a| assert!(a.is_none(), "unexpected answer")),
        Hook::Pending(_) => panic!("never pending"),
    }
}

const CHAT: &str = r#"{
  "model": "gpt-4o-mini",
  "messages": [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hello in French."}
  ],
  "temperature": 0.2,
  "max_tokens": 50,
  "stream": false
}"#;

const CHAT_TOOLS: &str = r#"{
  "model": "gpt-4o",
  "messages": [
    {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
    {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
      "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18C, clear"}
  ],
  "tools": [{"type": "function", "function": {"name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
  "stream": true,
  "stream_options": {"include_usage": true}
}"#;

fn pointers(f: &Fault) -> Vec<String> {
    f.violations
        .as_ref()
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .map(|x| x["pointer"].as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn chat_bodies(file: &str) {
    // The description is public data beside the checkout, not part of it: a clone without
    // it skips, saying what is missing, instead of failing.
    let path = spec_path(file);
    if !path.is_file() {
        eprintln!(
            "SKIPPED: {} is missing (the public OpenAI description; see ../shared/data/README.md, \
             or set TOLLGATE_SHARED_DATA to the directory holding it)",
            path.display()
        );
        return;
    }
    let p = policy(file);
    // The server URL is https://api.openai.com/v1: /v1 is the base path.
    check(&p, post("/v1/chat/completions", CHAT)).unwrap();
    check(&p, post("/v1/chat/completions", CHAT_TOOLS)).unwrap();
    check(&p, post("/chat/completions", CHAT)).unwrap();

    let missing = check(&p, post("/v1/chat/completions", r#"{"model": "gpt-4o"}"#)).unwrap_err();
    assert_eq!(missing.status, 400);
    assert_eq!(missing.code, "policies.oasvalidation.Failed");
    assert!(missing.message.contains("messages"), "{}", missing.message);

    let bad_role = CHAT.replace("\"system\"", "\"wizard\"");
    let f = check(&p, post("/v1/chat/completions", &bad_role)).unwrap_err();
    assert!(
        pointers(&f)
            .iter()
            .any(|p| p.starts_with("/body/messages/0")),
        "{f:?}"
    );
    let bad_temp = CHAT.replace("0.2", "\"hot\"");
    let f = check(&p, post("/v1/chat/completions", &bad_temp)).unwrap_err();
    assert!(
        pointers(&f).contains(&"/body/temperature".to_owned()),
        "{f:?}"
    );

    let f = check(&p, post("/v1/chat/completionz", CHAT)).unwrap_err();
    assert_eq!(pointers(&f), ["/path"]);
}

#[test]
fn openai_31_chat_completions() {
    chat_bodies("openai-openapi-3.1.yaml");
}

#[test]
fn openai_30_chat_completions() {
    chat_bodies("openai-openapi-3.0.yaml");
}

/// tollgate's own management API description loads too, and describes the KVM routes.
#[test]
fn management_api_description_loads_and_covers_kvms() {
    let spec = format!(
        "spec: {}\n",
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("docs/management-api.yaml")
            .display()
    );
    let build = builder("OasValidation").expect("registered");
    let p = build(
        &BuildContext::default(),
        serde_norway::from_str(&spec).unwrap(),
    )
    .unwrap_or_else(|e| panic!("docs/management-api.yaml does not load: {e}"));
    check(
        &p,
        post("/v1/kvms/creds/entries", r#"{"key": "k", "value": "v"}"#),
    )
    .unwrap();
    let f = check(&p, post("/v1/kvms/creds/entries", r#"{"key": "k"}"#)).unwrap_err();
    assert!(f.message.contains("value"), "{}", f.message);
}
