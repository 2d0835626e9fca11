//! `JavaScript` policies through the public builder: the Apigee API, faults, limits
//! (time, memory, stack), escapes via `eval`/`Function`, and isolation between requests.
// Faults are returned by value, as the library does (see its lib.rs).
#![allow(clippy::result_large_err)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use tollgate::fault::Fault;
use tollgate::pipeline::{Direction, Hook, Policy};
use tollgate::policies::{builder, BuildContext, SpecError};
use tollgate::vars::{Exchange, Headers, RequestInfo, ResponseInfo};

mod support;

fn build(yaml: &str) -> Result<Arc<dyn Policy>, SpecError> {
    builder("JavaScript").unwrap()(
        &BuildContext {
            name: "js".into(),
            ..Default::default()
        },
        serde_norway::from_str(yaml).unwrap(),
    )
}

fn script(source: &str) -> Arc<dyn Policy> {
    let yaml =
        serde_json::json!({"source": source, "timeLimitMs": 100, "memoryLimitBytes": 4_194_304});
    build(&yaml.to_string()).unwrap_or_else(|e| panic!("{e}"))
}

fn exchange() -> Exchange {
    let mut h = Headers::new();
    h.push(":method".into(), "POST".into());
    h.push(":path".into(), "/v1/chat?model=gpt&x=1".into());
    h.push(":authority".into(), "api.test".into());
    h.push("x-tier".into(), "gold".into());
    let mut ex = Exchange {
        flow: "f".into(),
        request: RequestInfo::from_headers(h),
        request_body: Some(br#"{"model":"gpt-4","messages":[]}"#.to_vec()),
        ..Default::default()
    };
    ex.set_var("client_id", "app-1");
    ex.set_var("count", 41);
    ex
}

fn run(p: &Arc<dyn Policy>, ex: &mut Exchange) -> Result<(), Fault> {
    match p.run(ex, Direction::Request) {
        Hook::Ready(o) => o
            .into_result()
            .map(|a| assert!(a.is_none(), "unexpected answer")),
        Hook::Pending(_) => panic!("scripts answer at once"),
    }
}

fn set_headers(ex: &mut Exchange) -> Vec<(String, String)> {
    ex.take_mutations(Direction::Request)
        .set
        .into_iter()
        .map(|(n, v, _)| (n, v))
        .collect()
}

#[test]
fn apigee_api_reads_and_writes_the_exchange() {
    let p = script(
        r#"
        var tier = request.headers['x-tier'];
        context.setVariable('tier.seen', tier);
        context.setVariable('count.next', context.getVariable('count') + 1);
        context.setVariable('flag', true);
        context.removeVariable('client_id');
        request.setHeader('x-from-js', request.method + ' ' + request.path + ' ' + request.queryParams.model);
        context.setVariable('request.header.x-via-var', 'yes');
        request.removeHeader('x-tier');
        var body = request.json();
        body.model = 'gpt-4o-mini';
        request.setJson(body);
        print('tier', tier, {n: 1});
        if (context.getVariable('nope') !== null) throw new Error('unset variables are null');
        if (context.getVariable('request.header.x-tier') !== null) throw new Error('removed');
        "#,
    );
    assert!(p.needs_body(Direction::Request));
    let mut ex = exchange();
    run(&p, &mut ex).unwrap();
    assert_eq!(ex.lookup("tier.seen").as_deref(), Some("gold"));
    assert_eq!(ex.lookup("count.next").as_deref(), Some("42"));
    assert_eq!(ex.lookup("flag").as_deref(), Some("true"));
    assert_eq!(ex.lookup("client_id"), None);
    let set = set_headers(&mut ex);
    assert!(
        set.contains(&("x-from-js".into(), "POST /v1/chat gpt".into())),
        "{set:?}"
    );
    assert!(set.contains(&("x-via-var".into(), "yes".into())));
    assert_eq!(
        ex.request_body.as_deref(),
        Some(&br#"{"model":"gpt-4o-mini","messages":[]}"#[..])
    );
    assert!(ex.request_body_replaced);
}

#[test]
fn response_phase_sees_status_and_headers() {
    let p = script("response.setHeader('x-status', String(response.status)); response.setHeader('x-up', response.getHeader('server'));");
    let mut ex = exchange();
    let mut h = Headers::new();
    h.push("server".into(), "upstream".into());
    ex.response = Some(ResponseInfo {
        status: 201,
        headers: h,
    });
    match p.run(&mut ex, Direction::Response) {
        Hook::Ready(o) => o
            .into_result()
            .map(|a| assert!(a.is_none(), "unexpected answer"))
            .unwrap(),
        Hook::Pending(_) => panic!(),
    }
    let set = ex.take_mutations(Direction::Response).set;
    assert!(set.contains(&("x-status".into(), "201".into(), false)));
    assert!(set.contains(&("x-up".into(), "upstream".into(), false)));
}

#[test]
fn throwing_fails_the_step() {
    let f = run(&script("throw new Error('bad input');"), &mut exchange()).unwrap_err();
    assert_eq!(
        (f.status, f.code.as_str()),
        (500, "steps.javascript.ScriptExecutionFailed")
    );
    assert!(f.message.contains("Error: bad input"), "{}", f.message);
    let f = run(&script("throw 'plain';"), &mut exchange()).unwrap_err();
    assert!(f.message.contains("plain"));
    // A fault the script builds.
    let f = run(
        &script("throw {status: 403, code: 'custom.Banned', message: 'tier banned'};"),
        &mut exchange(),
    )
    .unwrap_err();
    assert_eq!(
        (f.status, f.code.as_str(), f.message.as_str()),
        (403, "custom.Banned", "tier banned")
    );
    // Garbage return values are ignored.
    for src in [
        "return {a: function(){}};",
        "return new Proxy({}, {});",
        "return Promise.resolve(1);",
        "return undefined;",
    ] {
        run(&script(src), &mut exchange()).unwrap_or_else(|f| panic!("{src}: {f:?}"));
    }
    // Bad uses of the API are script errors, not crashes.
    for src in [
        "request.setHeader('host', 'x');",
        "request.setHeader('x-a', 'a\\r\\nb');",
        "context.setVariable('request.path', '/x');",
        "context.setVariable('o', {a: 1});",
        "response.setHeader('x', 'y');",
    ] {
        let f = run(&script(src), &mut exchange()).unwrap_err();
        assert_eq!(f.code, "steps.javascript.ScriptExecutionFailed", "{src}");
    }
}

#[test]
fn limits_stop_runaway_scripts_and_name_the_limit() {
    let start = Instant::now();
    let f = run(&script("while (true) {}"), &mut exchange()).unwrap_err();
    assert!(f.message.contains("time limit of 100 ms"), "{}", f.message);
    assert!(start.elapsed() < Duration::from_secs(5));
    // Even a script that catches everything is stopped.
    let f = run(
        &script("for (;;) { try { while (true) {} } catch (e) {} }"),
        &mut exchange(),
    )
    .unwrap_err();
    assert!(f.message.contains("time limit"), "{}", f.message);
    let f = run(
        &script("var a = []; while (true) a.push(new Array(100000).fill(1));"),
        &mut exchange(),
    )
    .unwrap_err();
    assert!(
        f.message.contains("memory limit of 4194304 bytes"),
        "{}",
        f.message
    );
    // Growing one array (its storage reallocated until the limit) names the limit too,
    // not "failed: Null" (the engine could not allocate the error it meant to throw).
    for source in [
        "var a = []; for (;;) a.push(1);",
        "var a = []; for (var i = 0; ; i++) a[i] = {i: i};",
        "var a = [1]; for (;;) a = a.concat(a);",
        "try { var a = []; for (;;) a.push(1); } catch (e) { throw e; }",
    ] {
        // A generous time limit: growing to the memory limit must be what stops it.
        let yaml = serde_json::json!({"source": source, "timeLimitMs": 1000, "memoryLimitBytes": 4_194_304});
        let p = build(&yaml.to_string()).unwrap_or_else(|e| panic!("{e}"));
        let f = run(&p, &mut exchange()).unwrap_err();
        assert!(
            f.message.contains("memory limit of 4194304 bytes"),
            "{source}: {}",
            f.message
        );
    }
    let f = run(
        &script("var s = 'x'; while (true) s = s + s;"),
        &mut exchange(),
    )
    .unwrap_err();
    assert!(f.message.contains("memory limit"), "{}", f.message);
    let f = run(
        &script("function r(n) { return r(n + 1) + 1; } r(0);"),
        &mut exchange(),
    )
    .unwrap_err();
    assert!(f.message.contains("stack limit"), "{}", f.message);
    // The worker is healthy afterwards.
    run(&script("request.setHeader('x-ok', '1');"), &mut exchange()).unwrap();
}

#[test]
fn string_evaluation_is_disabled() {
    for src in [
        "eval('1');",
        "Function('return 1')();",
        "new Function('return globalThis')();",
        "(function(){}).constructor('return 1')();",
        "(async function(){}).constructor('return 1');",
        "(function*(){}).constructor('yield 1');",
        "Reflect.construct(Function, ['return 1']);",
    ] {
        let f = run(&script(src), &mut exchange()).unwrap_err();
        assert_eq!(f.code, "steps.javascript.ScriptExecutionFailed", "{src}");
    }
    // A source that closes the wrapper function early to run code outside it is refused
    // at load.
    let e = build(r#"{source: "}); globalThis.x = 1; (function(){"}"#).unwrap_err();
    assert!(
        e.message.contains("function body") || e.message.contains("SyntaxError"),
        "{e}"
    );
    let e = build(r#"{source: "}, 1, function(){"}"#).unwrap_err();
    assert!(
        e.message.contains("function body") || e.message.contains("SyntaxError"),
        "{e}"
    );
    let e = build("{source: 'if ('}").unwrap_err();
    assert!(e.message.contains("SyntaxError"), "{e}");
}

#[test]
fn runs_do_not_share_state() {
    // Standard objects are frozen: writes to them fail (strict mode), so a later run on
    // the same thread cannot see them.
    for src in [
        "globalThis.leak = 'secret';",
        "Object.prototype.leak = 'secret';",
        "Array.prototype.push = function() {};",
        "JSON.parse = null;",
        "context.leak = 1;",
        "request.setHeader = null;",
    ] {
        let f = run(&script(src), &mut exchange()).unwrap_err();
        assert_eq!(f.code, "steps.javascript.ScriptExecutionFailed", "{src}");
    }
    let check = script(
        "if (typeof leak !== 'undefined' || ({}).leak !== undefined) throw new Error('leaked'); \
         var a = []; a.push(1); if (a.length !== 1) throw new Error('push broken');",
    );
    run(&check, &mut exchange()).unwrap();
    // A script's own variables start fresh on every run.
    let counter =
        script("var n = (typeof n === 'number' ? n : 0) + 1; context.setVariable('n', n);");
    for _ in 0..3 {
        let mut ex = exchange();
        run(&counter, &mut ex).unwrap();
        assert_eq!(ex.lookup("n").as_deref(), Some("1"));
    }
}

#[test]
fn specs_are_checked() {
    assert!(build("{}").unwrap_err().message.contains("source or file"));
    assert_eq!(
        build("{source: 'x', timeLimitMs: 0}").unwrap_err().field,
        "timeLimitMs"
    );
    assert_eq!(
        build("{source: 'x', memoryLimitBytes: 10}")
            .unwrap_err()
            .field,
        "memoryLimitBytes"
    );
    assert!(build("{file: x.js}")
        .unwrap_err()
        .message
        .contains("configuration directory"));
    let headers_only = script("request.setHeader('x-a', request.getHeader('content-type'));");
    assert!(!headers_only.needs_body(Direction::Request));
    assert!(script("var c = request.content;").needs_body(Direction::Request));
}

#[test]
fn runs_on_many_threads() {
    let p = script("request.setHeader('x-n', String(context.getVariable('count')));");
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let p = p.clone();
            std::thread::spawn(move || {
                for _ in 0..50 {
                    let mut ex = exchange();
                    run(&p, &mut ex).unwrap();
                    assert!(set_headers(&mut ex).contains(&("x-n".into(), "41".into())));
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

/// A syntax error names the script file (relative to the configuration directory) and the
/// line within the script.
#[test]
fn syntax_errors_name_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("scripts")).unwrap();
    std::fs::write(
        dir.path().join("scripts/bad.js"),
        "var a = 1;\nvar b = 2;\nif (a {\n  b = 3;\n}\n",
    )
    .unwrap();
    let ctx = BuildContext {
        name: "js".into(),
        config_dir: Some(dir.path().to_path_buf()),
        ..Default::default()
    };
    let spec: serde_norway::Value = serde_norway::from_str("{file: scripts/bad.js}").unwrap();
    let e = builder("JavaScript").unwrap()(&ctx, spec).unwrap_err();
    assert_eq!(e.field, "file");
    let want = format!(
        "{}: line 3: SyntaxError",
        dir.path().join("scripts/bad.js").display()
    );
    assert!(e.message.starts_with(&want), "{}", e.message);

    // Inline source: the line within `source`.
    let e = build("{source: \"var a;\\nvar b = ;\\n\"}").unwrap_err();
    assert_eq!(e.field, "source");
    assert!(
        e.message.starts_with("line 2: SyntaxError"),
        "{}",
        e.message
    );
}

// ───────────────────────────── Apigee mode ─────────────────────────────

fn apigee(source: &str, extra: serde_json::Value) -> Arc<dyn Policy> {
    let mut spec = serde_json::json!({"source": source, "mode": "apigee", "timeLimitMs": 100});
    if let (Some(o), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        o.extend(e.clone());
    }
    build(&spec.to_string()).unwrap_or_else(|e| panic!("{e}"))
}

fn with_response(mut ex: Exchange, status: u16, body: &str) -> Exchange {
    let mut h = Headers::new();
    h.push(":status".into(), status.to_string());
    h.push("content-type".into(), "application/json".into());
    ex.response = Some(ResponseInfo { status, headers: h });
    ex.response_body = Some(body.as_bytes().to_vec());
    ex
}

fn run_response(p: &Arc<dyn Policy>, ex: &mut Exchange) -> Result<(), Fault> {
    match p.run(ex, Direction::Response) {
        Hook::Ready(o) => o.into_result().map(|_| ()),
        Hook::Pending(_) => panic!("scripts answer at once"),
    }
}

/// A script in the style of the samples' response rewrites: parse the target's JSON,
/// reshape it, write it back through `response.content`, change the status.
#[test]
fn apigee_script_rewrites_the_response() {
    let p = apigee(
        r#"
        var body = JSON.parse(response.content);
        var out = { items: body.data, count: body.data.length, served_by: properties.servedBy };
        response.content = JSON.stringify(out);
        if (out.count === 0) { response.status.code = 404; }
        context.setVariable('response.header.x-item-count', out.count);
        "#,
        serde_json::json!({"properties": {"servedBy": "edge-7"}}),
    );
    assert!(p.needs_body(Direction::Response));
    assert!(p.replaces_body(Direction::Response));
    let mut ex = with_response(exchange(), 200, r#"{"data":[1,2,3]}"#);
    run_response(&p, &mut ex).unwrap();
    let body: serde_json::Value =
        serde_json::from_slice(ex.response_body.as_ref().unwrap()).unwrap();
    assert_eq!(
        body,
        serde_json::json!({"items": [1, 2, 3], "count": 3, "served_by": "edge-7"})
    );
    assert!(ex.response_body_replaced);
    assert_eq!(ex.response.as_ref().unwrap().status, 200);
    let m = ex.take_mutations(Direction::Response);
    assert!(m
        .set
        .iter()
        .any(|(n, v, _)| n == "x-item-count" && v == "3"));

    let mut ex = with_response(exchange(), 200, r#"{"data":[]}"#);
    run_response(&p, &mut ex).unwrap();
    assert_eq!(ex.response.as_ref().unwrap().status, 404);
    let m = ex.take_mutations(Direction::Response);
    assert!(
        m.set.iter().any(|(n, v, _)| n == ":status" && v == "404"),
        "{m:?}"
    );
}

/// `context.setVariable` on message variables changes the message, as in Apigee.
#[test]
fn apigee_set_variable_writes_the_message() {
    let p = apigee(
        r#"
        context.setVariable('request.header.x-client', 'app-' + context.getVariable('client_id'));
        var payload = JSON.parse(context.getVariable('request.content'));
        payload.model = 'small';
        context.setVariable('request.content', JSON.stringify(payload));
        "#,
        serde_json::json!({}),
    );
    assert!(p.needs_body(Direction::Request) && p.replaces_body(Direction::Request));
    let mut ex = exchange();
    run(&p, &mut ex).unwrap();
    assert_eq!(
        ex.request_body.as_deref(),
        Some(&br#"{"model":"small","messages":[]}"#[..])
    );
    let set = set_headers(&mut ex);
    assert!(set.contains(&("x-client".into(), "app-app-1".into())));
    // Variables that are not writable refuse loudly (Envoy would drop a `:method` change).
    for name in ["request.path", "request.verb"] {
        let p = apigee(
            &format!("context.setVariable('{name}', 'X');"),
            serde_json::json!({}),
        );
        let f = run(&p, &mut exchange()).unwrap_err();
        assert!(f.message.contains("read-only"), "{}", f.message);
    }
    let p = apigee(
        "context.setVariable('response.status.code', 99);",
        serde_json::json!({}),
    );
    assert!(run_response(&p, &mut with_response(exchange(), 200, "{}")).is_err());
}

/// `properties` and Apigee's `crypto` (hex and base64 digests, fed in parts).
#[test]
fn apigee_properties_and_crypto() {
    use sha2::Digest;
    let p = apigee(
        r#"
        var h = crypto.getSHA256();
        h.update(properties.salt);
        h.update(request.headers['x-tier']);
        context.setVariable('sig.sha256', h.digest());
        context.setVariable('sig.md5', crypto.getMD5().update('abc').digest64());
        context.setVariable('sig.sha1', crypto.getSHA1().update('abc').digest());
        context.setVariable('sig.sha512', crypto.getSHA512().update('').digest().substring(0, 16));
        context.setVariable('props.n', properties.limit + 1);
        "#,
        serde_json::json!({"properties": {"salt": "pepper", "limit": 41}}),
    );
    let mut ex = exchange();
    run(&p, &mut ex).unwrap();
    let want = hex(&sha2::Sha256::digest(b"peppergold"));
    assert_eq!(ex.lookup("sig.sha256").as_deref(), Some(want.as_str()));
    assert_eq!(
        ex.lookup("sig.md5").as_deref(),
        Some("kAFQmDzST7DWlj99KOF/cg==")
    );
    assert_eq!(
        ex.lookup("sig.sha1").as_deref(),
        Some("a9993e364706816aba3e25717850c26c9cd0d89d")
    );
    assert_eq!(ex.lookup("sig.sha512").as_deref(), Some("cf83e1357eefb8bd"));
    // Properties are strings, as in Apigee: "41" + 1.
    assert_eq!(ex.lookup("props.n").as_deref(), Some("411"));
    // Properties cannot be changed by a script.
    let p = apigee(
        "'use strict'; properties.salt = 'x';",
        serde_json::json!({"properties": {"salt": "pepper"}}),
    );
    assert!(run(&p, &mut exchange()).is_err());
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

const HTTP_SCRIPT: &str = r#"
var base = properties.base;
var first = httpClient.get(base + '/echo?q=1');
var posted = httpClient.send(new Request(base + '/echo', 'POST',
    {'content-type': 'application/json', 'x-from': 'js'}, JSON.stringify({a: 1})));
first.waitForComplete();
if (!first.isSuccess()) throw new Error('get failed: ' + first.getError());
var r = first.getResponse();
context.setVariable('up.status', r.status.code);
context.setVariable('up.equal', r.status == 200);
context.setVariable('up.uri', JSON.parse(r.content).uri);
context.setVariable('up.header', r.headers['x-upstream']);
posted.waitForComplete();
var echoed = JSON.parse(posted.getResponse().content);
context.setVariable('up.post', echoed.method + ' ' + echoed.body + ' ' + echoed.headers['x-from']);
httpClient.get(base + '/echo?cb=1', function (resp, err) {
  context.setVariable('up.callback', resp ? resp.status.code : err);
});
"#;

fn http_policy(upstream: &support::Upstream, extra: serde_json::Value) -> Arc<dyn Policy> {
    let mut e = serde_json::json!({"properties": {"base": format!("http://{}", upstream.addr)}});
    if let (Some(o), Some(x)) = (e.as_object_mut(), extra.as_object()) {
        o.extend(x.clone());
    }
    apigee(HTTP_SCRIPT, e)
}

fn check_http(ex: &Exchange) {
    assert_eq!(ex.lookup("up.status").as_deref(), Some("200"));
    assert_eq!(ex.lookup("up.equal").as_deref(), Some("true"));
    assert_eq!(ex.lookup("up.uri").as_deref(), Some("/echo?q=1"));
    assert_eq!(ex.lookup("up.header").as_deref(), Some("e2e"));
    assert_eq!(ex.lookup("up.post").as_deref(), Some(r#"POST {"a":1} js"#));
    assert_eq!(ex.lookup("up.callback").as_deref(), Some("200"));
}

/// `httpClient` against a local server: get, send with a Request, the callback form.
#[test]
fn apigee_http_client_calls_a_local_server() {
    let upstream = support::Upstream::start();
    let p = http_policy(&upstream, serde_json::json!({}));
    let mut ex = exchange();
    run(&p, &mut ex).unwrap();
    check_http(&ex);
    assert_eq!(upstream.seen_with_prefix("/echo").len(), 3);
    // Polling isComplete (no wait) until the answer is in, as some samples do.
    let p = apigee(
        "var x = httpClient.get(properties.base + '/echo?poll=1'); var n = 0;\
         while (!x.isComplete()) { n++; }\
         context.setVariable('polled', x.getResponse().status.code);",
        serde_json::json!({"properties": {"base": format!("http://{}", upstream.addr)},
            "timeLimitMs": 1000}),
    );
    let mut ex = exchange();
    run(&p, &mut ex).unwrap();
    assert_eq!(ex.lookup("polled").as_deref(), Some("200"));
}

/// On a tokio worker the wait hands the worker's other tasks to another thread: with one
/// worker, a server that is itself a task of that runtime still answers the script's
/// request (were the worker blocked, nothing would accept the connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn apigee_http_client_does_not_block_the_runtime() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 4096];
        let _ = sock.read(&mut buf).await;
        let _ = sock
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\nconnection: close\r\n\r\nin-task")
            .await;
    });
    let p = apigee(
        "var x = httpClient.get(properties.base + '/'); x.waitForComplete();\
         context.setVariable('got', x.isSuccess() ? x.getResponse().content : x.getError());",
        serde_json::json!({"properties": {"base": format!("http://{addr}")},
            "httpClient": {"timeoutMs": 5000}}),
    );
    let ex = tokio::spawn(async move {
        let mut ex = exchange();
        run(&p, &mut ex).unwrap();
        ex
    })
    .await
    .unwrap();
    assert_eq!(ex.lookup("got").as_deref(), Some("in-task"));
    // The time limit (100 ms) does not count the wait for a slow answer.
    let upstream = support::Upstream::start();
    let slow = apigee(
        "var x = httpClient.get(properties.base + '/slow?ms=400'); x.waitForComplete();\
         context.setVariable('done', x.isSuccess());",
        serde_json::json!({"properties": {"base": format!("http://{}", upstream.addr)}}),
    );
    let ex = tokio::spawn(async move {
        let mut ex = exchange();
        run(&slow, &mut ex).unwrap();
        ex
    })
    .await
    .unwrap();
    assert_eq!(ex.lookup("done").as_deref(), Some("true"));
}

/// The operator's allow-list applies; the per-request timeout and the request count are
/// bounded.
#[test]
fn apigee_http_client_limits() {
    let upstream = support::Upstream::start();
    let base = format!("http://{}", upstream.addr);
    let mut ctx = BuildContext {
        name: "js".into(),
        ..Default::default()
    };
    ctx.services.egress =
        Arc::new(tollgate::policies::service_callout::Egress::new(&["allowed.test"]).unwrap());
    let p = builder("JavaScript").unwrap()(
        &ctx,
        serde_norway::from_str(
            &serde_json::json!({"mode": "apigee", "source": HTTP_SCRIPT,
                "properties": {"base": base}})
            .to_string(),
        )
        .unwrap(),
    )
    .unwrap();
    let f = run(&p, &mut exchange()).unwrap_err();
    assert!(
        f.message.contains("not allowed") || f.message.contains("allow"),
        "{}",
        f.message
    );
    assert!(upstream.seen_with_prefix("/echo").is_empty());

    let p = apigee(
        "var x = httpClient.get(properties.base + '/slow?ms=3000'); \
         context.setVariable('err', x.isError() ? x.getError() : 'none');",
        serde_json::json!({"properties": {"base": base}, "httpClient": {"timeoutMs": 100}}),
    );
    let mut ex = exchange();
    run(&p, &mut ex).unwrap();
    assert!(
        ex.lookup("err").unwrap().contains("timed out"),
        "{:?}",
        ex.lookup("err")
    );
    let p = apigee(
        "for (var i = 0; i < 3; i++) httpClient.get(properties.base + '/echo');",
        serde_json::json!({"properties": {"base": base}, "httpClient": {"maxRequests": 2}}),
    );
    let f = run(&p, &mut exchange()).unwrap_err();
    assert!(f.message.contains("at most 2 requests"), "{}", f.message);
}

/// Sloppy mode: an undeclared assignment makes a global, as Rhino does; strict mode refuses
/// it. Globals never outlive their run, even when a script tries to pin them.
#[test]
fn apigee_mode_is_sloppy_and_runs_stay_apart() {
    let src =
        "total = 0; for (i = 1; i <= 4; i++) { total += i; } context.setVariable('total', total);";
    let sloppy = apigee(src, serde_json::json!({}));
    let mut ex = exchange();
    run(&sloppy, &mut ex).unwrap();
    assert_eq!(ex.lookup("total").as_deref(), Some("10"));
    let strict = script(src);
    let f = run(&strict, &mut exchange()).unwrap_err();
    assert!(f.message.contains("ReferenceError"), "{}", f.message);

    let peek = apigee(
        "context.setVariable('seen', typeof total + ' ' + typeof pinned);",
        serde_json::json!({}),
    );
    let mut ex = exchange();
    run(&peek, &mut ex).unwrap();
    assert_eq!(ex.lookup("seen").as_deref(), Some("undefined undefined"));
    // A global that cannot be deleted, or a locked global object: the engine is replaced.
    for pin in [
        "Object.defineProperty(globalThis, 'pinned', {value: 1, configurable: false}); total = 1;",
        "total = 1; Object.preventExtensions(globalThis);",
    ] {
        run(&apigee(pin, serde_json::json!({})), &mut exchange()).unwrap();
        let mut ex = exchange();
        run(&peek, &mut ex).unwrap();
        assert_eq!(
            ex.lookup("seen").as_deref(),
            Some("undefined undefined"),
            "{pin}"
        );
        run(&sloppy, &mut exchange()).unwrap();
    }
    // Built-ins stay as they were.
    let tamper = apigee(
        "Array.prototype.push = null; JSON = null;",
        serde_json::json!({}),
    );
    let _ = run(&tamper, &mut exchange());
    let check = apigee(
        "var a = []; a.push(1); context.setVariable('ok', JSON.stringify(a));",
        serde_json::json!({}),
    );
    let mut ex = exchange();
    run(&check, &mut ex).unwrap();
    assert_eq!(ex.lookup("ok").as_deref(), Some("[1]"));
    // print is bounded per run.
    let chatty = apigee(
        "for (var i = 0; i < 10000; i++) print('line', i, 'x'.repeat(100));",
        serde_json::json!({"timeLimitMs": 1000}),
    );
    run(&chatty, &mut exchange()).unwrap();
}

/// Scripts written before `crypto`, `properties`, `httpClient` and `Request` existed may
/// declare those names themselves.
#[test]
fn scripts_may_declare_the_new_names() {
    let p = script(
        "const crypto = 'mine'; let properties = 1; class Request {}; \
         context.setVariable('own', crypto + properties);",
    );
    let mut ex = exchange();
    run(&p, &mut ex).unwrap();
    assert_eq!(ex.lookup("own").as_deref(), Some("mine1"));
}

#[test]
fn apigee_specs_are_checked() {
    for (extra, field) in [
        (
            serde_json::json!({"properties": {"a": [1]}}),
            "properties.a",
        ),
        (
            serde_json::json!({"httpClient": {"timeoutMs": 0}}),
            "httpClient.timeoutMs",
        ),
        (
            serde_json::json!({"httpClient": {"maxRequests": 99}}),
            "httpClient.maxRequests",
        ),
        (serde_json::json!({"mode": "rhino"}), "mode"),
    ] {
        let mut spec = serde_json::json!({"source": "1;", "mode": "apigee"});
        if let (Some(o), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        let e = build(&spec.to_string()).unwrap_err();
        assert_eq!(e.field, field, "{extra}");
    }
}
