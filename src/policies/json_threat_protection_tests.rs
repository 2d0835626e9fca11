use super::*;
use crate::pipeline::Outcome;
use crate::vars::{Headers, RequestInfo, ResponseInfo};

fn limits(f: impl FnOnce(&mut Limits)) -> Limits {
    let mut l = Limits::default();
    f(&mut l);
    l
}

fn reason(text: &str, l: &Limits) -> Option<String> {
    check(text.as_bytes(), l).err().map(|v| v.reason)
}

#[test]
fn accepts_json_and_refuses_what_is_not() {
    let l = Limits::default();
    for ok in [
        "{}",
        "[]",
        "0",
        "-1.5e+10",
        r#""a\u00e9\n""#,
        "true",
        " null ",
        r#"{"a":[1,{"b":null},"x"],"c":{"d":[[],{}]}}"#,
    ] {
        assert_eq!(reason(ok, &l), None, "{ok}");
        // Agrees with serde_json.
        assert!(
            serde_json::from_str::<serde_json::Value>(ok).is_ok(),
            "{ok}"
        );
    }
    for bad in [
        "",
        "{",
        "[1,]",
        "{\"a\":1,}",
        "{a:1}",
        "01",
        "1.",
        "-",
        "tru",
        "[1 2]",
        "{\"a\" 1}",
        "\"\\x\"",
        "\"\\u12\"",
        "\"a\nb\"",
        "{} {}",
        "[}",
        "{]",
        "\"open",
    ] {
        assert!(reason(bad, &l).is_some(), "{bad:?} accepted");
        assert!(
            serde_json::from_str::<serde_json::Value>(bad).is_err(),
            "{bad:?}"
        );
    }
    assert!(check(b"\"\xff\"", &l).is_err());
}

#[test]
fn each_limit() {
    let arr = limits(|l| l.array_elements = 3);
    assert_eq!(reason("[1,2,3]", &arr), None);
    assert_eq!(
        reason("[1,2,[4],3]", &arr).as_deref(),
        Some("Exceeded array element count, max 3 allowed, found 4")
    );
    assert_eq!(reason("[[1,2,3],[1,2,3],[1,2,3]]", &arr), None);

    let depth = limits(|l| l.depth = 2);
    assert_eq!(reason(r#"{"a":[1]}"#, &depth), None);
    assert_eq!(
        reason(r#"{"a":[{}]}"#, &depth).as_deref(),
        Some("Exceeded container depth, max 2 allowed, found 3")
    );

    let entries = limits(|l| l.object_entries = 2);
    assert_eq!(reason(r#"{"a":1,"b":{"c":1,"d":2}}"#, &entries), None);
    assert_eq!(
        reason(r#"{"a":1,"b":2,"c":3}"#, &entries).as_deref(),
        Some("Exceeded object entry count, max 2 allowed, found 3")
    );

    let names = limits(|l| l.name_length = 3);
    assert_eq!(
        reason(r#"{"abc":1,"\u00e9\u00e9\u00e9":2,"ééé":3}"#, &names),
        None
    );
    assert_eq!(
        reason(r#"{"abcd":1}"#, &names).as_deref(),
        Some("Exceeded object entry name length, max 3 allowed, found 4")
    );

    let strings = limits(|l| l.string_length = 4);
    assert_eq!(
        reason(r#"["ab\"c", "日本語!", {"long-name-ok": "x"}]"#, &strings),
        None
    );
    assert_eq!(
        reason(r#"["12345"]"#, &strings).as_deref(),
        Some("Exceeded string value length, max 4 allowed, found 5")
    );
    // Member names are not string values.
    assert_eq!(reason(r#"{"longer-than-four": 1}"#, &strings), None);
}

#[test]
fn deep_and_huge_input_is_safe() {
    // A million levels: no recursion, a clear refusal (or acceptance without a limit).
    let deep = "[".repeat(1_000_000) + &"]".repeat(1_000_000);
    assert_eq!(check(deep.as_bytes(), &Limits::default()), Ok(()));
    let v = check(deep.as_bytes(), &limits(|l| l.depth = 100)).unwrap_err();
    assert_eq!(v.at, 100);
    let unclosed = "{\"a\":".repeat(500_000);
    assert!(check(unclosed.as_bytes(), &Limits::default()).is_err());
    // A large flat array.
    let big = format!("[{}1]", "1,".repeat(2_000_000));
    assert!(check(big.as_bytes(), &limits(|l| l.array_elements = 1_000))
        .unwrap_err()
        .reason
        .contains("found 1001"));
}

fn build_y(y: &str) -> Result<Arc<dyn Policy>, SpecError> {
    let ctx = BuildContext {
        name: "jtp".into(),
        ..Default::default()
    };
    build(&ctx, serde_norway::from_str(y).unwrap())
}

fn request(ct: Option<&str>, body: &str) -> Exchange {
    let mut h = Headers::new();
    h.push(":method".into(), "POST".into());
    h.push(":path".into(), "/".into());
    if let Some(ct) = ct {
        h.push("content-type".into(), ct.into());
    }
    let mut ex = Exchange {
        request: RequestInfo::from_headers(h),
        ..Default::default()
    };
    ex.set_body(Direction::Request, Some(body.as_bytes().to_vec()));
    ex
}

fn run(
    p: &Arc<dyn Policy>,
    ex: &mut Exchange,
    dir: Direction,
) -> Result<(), (u16, String, String)> {
    match p.run(ex, dir) {
        Hook::Ready(Outcome::Continue) => Ok(()),
        Hook::Ready(Outcome::Reject(f)) => Err((f.status, f.code, f.message)),
        _ => panic!("unexpected outcome"),
    }
}

#[test]
fn policy_faults_as_apigee() {
    let p = build_y("{arrayElementCount: 2, stringValueLength: -1}").unwrap();
    assert!(p.needs_body(Direction::Request) && p.needs_body(Direction::Response));
    let mut ex = request(Some("application/json"), "{\"a\":\n[1,2,3]}");
    assert_eq!(
        run(&p, &mut ex, Direction::Request).unwrap_err(),
        (
            500,
            "steps.jsonthreatprotection.ExecutionFailed".into(),
            "JSONThreatProtection[jtp]: Execution failed. reason: JSONThreatProtection[jtp]: \
             Exceeded array element count, max 2 allowed, found 3 at line 2"
                .into()
        )
    );
    // Not JSON by its type: not checked; no type: checked; +json: checked.
    assert_eq!(
        run(
            &p,
            &mut request(Some("text/plain"), "[1,2,3]"),
            Direction::Request
        ),
        Ok(())
    );
    assert!(run(&p, &mut request(None, "[1,2,3]"), Direction::Request).is_err());
    assert!(run(
        &p,
        &mut request(
            Some("application/merge-patch+json; charset=utf-8"),
            "[1,2,3]"
        ),
        Direction::Request
    )
    .is_err());
    // Malformed JSON is refused; an empty body passes.
    assert_eq!(
        run(
            &p,
            &mut request(Some("application/json"), "{"),
            Direction::Request
        )
        .unwrap_err()
        .1,
        "steps.jsonthreatprotection.ExecutionFailed"
    );
    assert_eq!(
        run(
            &p,
            &mut request(Some("application/json"), "  "),
            Direction::Request
        ),
        Ok(())
    );

    // The response, by the step's direction.
    let mut ex = request(None, "{}");
    let mut h = Headers::new();
    h.push("content-type".into(), "application/json".into());
    ex.response = Some(ResponseInfo {
        status: 200,
        headers: h,
    });
    ex.set_body(Direction::Response, Some(b"[1,2,3]".to_vec()));
    assert!(run(&p, &mut ex, Direction::Response).is_err());

    // A response source on the request path.
    let p = build_y("{source: response, containerDepth: 3}").unwrap();
    assert!(!p.needs_body(Direction::Request) && p.needs_body(Direction::Response));
    let mut ex = request(None, "{}");
    assert_eq!(
        run(&p, &mut ex, Direction::Request).unwrap_err().1,
        "steps.jsonthreatprotection.SourceUnavailable"
    );
}

#[test]
fn refused_at_load() {
    assert_eq!(build_y("{}").unwrap_err().field, "");
    assert_eq!(build_y("{containerDepth: -1}").unwrap_err().field, "");
    assert_eq!(
        build_y("{source: message, containerDepth: 1}")
            .unwrap_err()
            .field,
        "source"
    );
    assert_eq!(build_y("{depth: 1}").unwrap_err().field, "depth");
}
