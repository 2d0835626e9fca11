//! Issue 12 point 7: no panic and no super-linear path from input. Each test pins one
//! defect found by the fuzz targets or the audit; each failed (panicked, overflowed its
//! stack or timed out) before its fix.

use std::sync::mpsc;
use std::time::Duration;

use tollgate::config::{compile, SourceFile};
use tollgate::consumer::index::PathTemplate;
use tollgate::expr::Condition;
use tollgate::openapi::match_path_template;
use tollgate::vars::{Headers, RequestInfo};

/// Runs `f` on a thread with a worker-sized stack (tokio's 2 MiB) and fails if it does not
/// finish within `limit`: a stalled or exponential path fails the test instead of hanging it.
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || {
            let _ = tx.send(f());
        })
        .expect("a thread");
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("did not finish within {limit:?} (or panicked)"))
}

fn request(host: &str, path: &str) -> RequestInfo {
    let mut h = Headers::new();
    h.push(":method".into(), "GET".into());
    h.push(":path".into(), path.into());
    h.push(":authority".into(), host.into());
    RequestInfo::from_headers(h)
}

/// A wildcard host compared by slicing the client's host at a byte offset panicked when a
/// multi-byte character straddled the cut.
#[test]
fn wildcard_host_with_multibyte_character_does_not_panic() {
    let files = [SourceFile {
        name: "f.yaml".into(),
        text: "apiVersion: tollgate.dev/v1alpha1\nkind: Flow\nmetadata: {name: wild}\nspec:\n  match: {hosts: [\"*.example.com\"]}\n  request: []\n".into(),
    }];
    let snap = compile(&files, None).expect("compiles");
    // 13 bytes: the cut 11 bytes from the end falls inside `é`.
    assert!(snap
        .select(None, &request("aéxxxxxxxxxx", "/"))
        .expect("no flow is named")
        .is_none());
    assert!(snap
        .select(None, &request("é.example.com", "/"))
        .expect("no flow is named")
        .is_some());
    assert!(snap
        .select(None, &request("A.EXAMPLE.COM:8443", "/"))
        .expect("no flow is named")
        .is_some());
    assert!(snap
        .select(None, &request("éxample.com", "/"))
        .expect("no flow is named")
        .is_none());
    assert!(snap
        .select(None, &request(".example.com", "/"))
        .expect("no flow is named")
        .is_none());
}

/// Product operation templates backtracked over every split of a segment: `k` variables
/// took O(n^k) steps on an n-byte segment.
#[test]
fn product_path_template_matches_in_linear_time() {
    let t = PathTemplate::compile("/v1/{a}x{b}x{c}x{d}x{e}x{f}x{g}x{h}y").expect("compiles");
    let ok = PathTemplate::compile("/v1/{a}x{b}x{c}x{d}y").expect("compiles");
    let path = format!("/v1/{}", "x".repeat(4000));
    let (hit, miss) = within(Duration::from_secs(5), move || {
        (ok.matches("/v1/1x2x3x4y"), t.matches(&path))
    });
    assert!(hit);
    assert!(!miss);
}

/// The OpenAPI path matcher backtracked the same way, and skipped overlapping literal
/// occurrences (`/f/{p}aa` did not match `/f/xaaa`).
#[test]
fn openapi_path_template_matches_in_linear_time_and_finds_overlaps() {
    let path = format!("/v1/{}", "x".repeat(4000));
    let miss = within(Duration::from_secs(5), move || {
        match_path_template("/v1/{a}x{b}x{c}x{d}x{e}x{f}x{g}x{h}y", &path)
    });
    assert!(miss.is_none());
    assert_eq!(
        match_path_template("/f/{p}aa", "/f/xaaa"),
        Some(vec![("p".to_owned(), "xa".to_owned())])
    );
    assert_eq!(
        match_path_template("/f/{a}.{b}.json", "/f/x.y.z.json"),
        Some(vec![
            ("a".to_owned(), "x".to_owned()),
            ("b".to_owned(), "y.z".to_owned())
        ])
    );
    assert_eq!(
        match_path_template("/é/{x}é", "/é/ééé"),
        Some(vec![("x".to_owned(), "éé".to_owned())])
    );
    assert!(match_path_template("/f/{p}.json", "/f/.json").is_none());
}

/// A condition nested a dozen brackets deep overflowed the stack of the thread compiling
/// it (the CEL parser recurses deeply per level): the configuration load aborted the
/// process. Deep conditions are refused with an error; ordinary ones still compile.
#[test]
fn deeply_nested_conditions_are_refused_not_a_stack_overflow() {
    let results = within(Duration::from_secs(30), || {
        let deep = [
            format!("{}1{} == 1", "(".repeat(200), ")".repeat(200)),
            format!("{}1{} == 1", "[".repeat(64), "]".repeat(64)),
            format!("a{}", ".b".repeat(2000)),
            format!("{}1 == 1", "1 + ".repeat(1000)),
            "request.headers.exists(k%,x".repeat(40),
        ];
        let shallow = [
            format!("{}1{} == 1", "(".repeat(12), ")".repeat(12)),
            "request.headers.exists(k, request.query.exists(q, q == k))".to_owned(),
        ];
        (
            deep.iter()
                .map(|s| Condition::compile(s).is_err())
                .collect::<Vec<_>>(),
            shallow
                .iter()
                .map(|s| Condition::compile(s).is_ok())
                .collect::<Vec<_>>(),
        )
    });
    assert_eq!(results.0, vec![true; 5], "deep conditions refused");
    assert_eq!(results.1, vec![true; 2], "ordinary conditions compile");
}

fn policy_config(spec: &str) -> Result<(), String> {
    let files = [SourceFile {
        name: "p.yaml".into(),
        text: format!("apiVersion: tollgate.dev/v1alpha1\nkind: Policy\nmetadata: {{name: p}}\nspec:\n{spec}\n"),
    }];
    compile(&files, None).map(|_| ()).map_err(|e| e.to_string())
}

/// Durations from the configuration that overflowed later: a KeyValueMap `expirySeconds`
/// past 1000 years panicked in the cache builder at load; a ResponseCache `ttlSeconds`
/// near `u64::MAX` panicked in `Instant + ttl` when the first response was stored.
#[test]
fn huge_configured_durations_are_refused_at_load() {
    let kvm = policy_config(
        "  type: KeyValueMap\n  map: m\n  expirySeconds: 18446744073709551615\n  get: [{key: [a]}]",
    );
    assert!(
        kvm.as_ref().is_err_and(|e| e.contains("expirySeconds")),
        "{kvm:?}"
    );
    assert!(policy_config(
        "  type: KeyValueMap\n  map: m\n  expirySeconds: 30\n  get: [{key: [a]}]"
    )
    .is_ok());
    let cache = policy_config("  type: ResponseCache\n  ttlSeconds: 18446744073709551615");
    assert!(
        cache.as_ref().is_err_and(|e| e.contains("ttlSeconds")),
        "{cache:?}"
    );
    assert!(policy_config("  type: ResponseCache\n  ttlSeconds: 60").is_ok());
}

/// Template compilation re-scanned the rest of the text from every `{` for a `}`:
/// quadratic in a configured string full of braces.
#[test]
fn template_compiles_in_linear_time() {
    use tollgate::expr::Template;
    use tollgate::vars::Exchange;
    let big = format!("{}{}", "{".repeat(1_000_000), "}x".repeat(1_000_000));
    let (n, open_only) = within(Duration::from_secs(5), move || {
        let t = Template::compile(&big).expect("compiles");
        let open = Template::compile(&"{a".repeat(1_000_000)).expect("compiles");
        let ex = Exchange::default();
        (t.render(&ex).len(), open.render(&ex).len())
    });
    assert_eq!(n, 3_000_000);
    assert_eq!(open_only, 2_000_000);
    let mut ex = Exchange::default();
    ex.set_var("a", "A");
    let render = |s: &str| Template::compile(s).expect("compiles").render(&ex);
    assert_eq!(render("{{a}}"), "{A}");
    assert_eq!(render("x{ {a} {b c}{a}y}"), "x{ A {b c}Ay}");
    assert_eq!(render("{\"k\": {a}}"), "{\"k\": A}");
    assert_eq!(render("}{a{a}"), "}{aA");
}

/// `%+1` decoded as the byte 0x01 (`from_str_radix` takes a sign): a query name or value
/// read differently from what the upstream reads.
#[test]
fn percent_decoding_takes_two_hex_digits_only() {
    use tollgate::vars::percent_decode;
    assert_eq!(percent_decode("a%+1b"), "a% 1b");
    assert_eq!(percent_decode("%41%4a%+f%"), "AJ% f%");
    assert_eq!(percent_decode("%c3%a9%e"), "é%e");
}

/// A configured host whose first character is multi-byte was sliced at byte 1 (`h[1..]`)
/// while checking for a misplaced `*`: loading the configuration panicked.
#[test]
fn configured_host_with_multibyte_first_character_is_checked_not_a_panic() {
    let flow = |host: &str| {
        let files = [SourceFile {
            name: "f.yaml".into(),
            text: format!("apiVersion: tollgate.dev/v1alpha1\nkind: Flow\nmetadata: {{name: f}}\nspec:\n  match: {{hosts: [\"{host}\"]}}\n  request: []\n"),
        }];
        compile(&files, None).map(|_| ()).map_err(|e| e.to_string())
    };
    // Hosts are compared as Envoy's virtual hosts compare them, in ASCII: a name with other
    // characters is refused at load (write its punycode form), never a panic.
    assert!(
        flow("ébc.example.org").is_err_and(|e| e.contains("hosts[0]") && e.contains("punycode"))
    );
    assert!(flow("*.exämple.org").is_err_and(|e| e.contains("hosts[0]")));
    assert!(flow("é*.example.org").is_err_and(|e| e.contains("hosts[0]")));
    assert!(flow("xn--bc-dma.example.org").is_ok());
    assert!(flow("a.*.org").is_err());
}
