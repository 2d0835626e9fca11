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
