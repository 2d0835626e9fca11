//! The admin page (`/ui` on the admin port) in a real headless Chromium: the DOM after the
//! page's scripts ran lists the configuration's flows (with their steps), products and apps;
//! a screenshot renders the styled page; without a token the page says how to get in. Also
//! `GET /v1/flows`, which the page reads.

use std::path::Path;
use std::process::{Command, Stdio};

mod support;

use support::{free_port, http_blocking, serve_command, ServeProcess};

const CONFIG: &str = r#"
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: verify-key}
spec: {type: VerifyApiKey}
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: per-app}
spec: {type: Quota, allow: 100, interval: 1, timeUnit: minute, identifier: "{client_id}"}
---
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: tag}
spec: {type: AssignMessage, set: {headers: {x-served-by: tollgate}}}
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: orders-api}
spec:
  match: {pathPrefixes: [/orders]}
  request:
    - {policy: verify-key}
    - {policy: per-app, condition: "request.method == 'POST'"}
  response:
    - {policy: tag}
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: fallback}
spec: {default: true}
---
apiVersion: tollgate.dev/v1alpha1
kind: ApiProduct
metadata: {name: gold-orders}
spec:
  operations: [{path: "/orders/**", methods: [GET, POST]}]
  quota: {limit: 1000, interval: 1, timeUnit: hour}
---
apiVersion: tollgate.dev/v1alpha1
kind: App
metadata: {name: shop-frontend}
spec:
  developerEmail: dev@shop.example
  products: [gold-orders]
  keys: [{id: ui, hash: "sha256:e71c5f904b749497bc9174d6ad02e59d14d5e1a193c3623c8ecaf839c8450b8b"}]
"#;

fn start(extra: &[&str]) -> ServeProcess {
    let dir = tempfile::tempdir().unwrap();
    let (grpc, admin) = (free_port(), free_port());
    let mut c = serve_command(dir.path(), CONFIG, grpc, admin);
    c.args(extra).stdout(Stdio::null()).stderr(Stdio::null());
    ServeProcess::ready(&mut c, dir, grpc, admin)
}

fn chromium() -> String {
    let found = Command::new("chromium")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "chromium is missing: scripts/setup.sh installs Debian's chromium package"
    );
    "chromium".to_owned()
}

/// Chromium headless on `url` with `args` (the page's fetches finish within the virtual
/// time budget before the DOM is dumped or the screenshot taken).
fn headless(url: &str, args: &[&str], profile: &Path) -> String {
    let out = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            "--virtual-time-budget=10000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .output()
        .expect("run chromium");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn flows_api_describes_the_running_configuration() {
    let p = start(&["--admin-insecure"]);
    let (status, body) = http_blocking(p.admin, "GET", "/v1/flows", None, None);
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["generation"], 1);
    let flows = v["flows"].as_array().unwrap();
    let names: Vec<&str> = flows.iter().map(|f| f["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["fallback", "orders-api"]);
    let orders = &flows[1];
    assert_eq!(orders["match"]["pathPrefixes"][0], "/orders");
    assert_eq!(orders["request"][0]["policy"], "verify-key");
    assert_eq!(orders["request"][0]["type"], "VerifyApiKey");
    assert_eq!(
        orders["request"][1]["condition"],
        "request.method == 'POST'"
    );
    assert_eq!(orders["response"][0]["type"], "AssignMessage");
    assert_eq!(flows[0]["default"], true);
    // Guarded like the rest of the management API.
    let q = start(&[]);
    let (status, _) = http_blocking(q.admin, "GET", "/v1/flows", None, None);
    assert_eq!(status, 404, "closed API");
}

/// One exchange of the app through the gRPC port, so the usage report has a point.
fn charge_the_app(grpc: u16) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = support::ext_proc::connect(format!("127.0.0.1:{grpc}")).await;
        let answer = support::ext_proc::ask_once(
            &client,
            support::ext_proc::request_headers(
                &[
                    (":method", "GET"),
                    (":path", "/orders/1"),
                    ("x-api-key", "key-for-the-ui-test-0123456789"),
                ],
                true,
            ),
        )
        .await;
        assert_eq!(support::ext_proc::status_of(answer), 200);
    });
}

#[test]
fn the_admin_page_renders_flows_products_and_apps_in_chromium() {
    let p = start(&["--admin-insecure"]);
    charge_the_app(p.grpc);
    let url = format!("http://127.0.0.1:{}/ui", p.admin);
    let profile = tempfile::tempdir().unwrap();

    // No external assets: nothing is loaded from elsewhere (the SVG namespace is a name).
    let (status, html) = http_blocking(p.admin, "GET", "/ui", None, None);
    assert_eq!(status, 200);
    for external in [
        "src=\"http",
        "href=\"http",
        "url(http",
        "@import",
        "fetch(\"http",
    ] {
        assert!(
            !html.contains(external),
            "external reference in the page: {external}"
        );
    }

    let dom = headless(&url, &["--dump-dom"], profile.path());
    for want in [
        r#"<tr data-name="orders-api">"#,
        r#"<tr data-name="fallback">"#,
        r#"<tr data-name="gold-orders">"#,
        r#"<tr data-name="shop-frontend">"#,
        "configuration generation 1",
        "dev@shop.example",
        "1000 per hour",
        "VerifyApiKey",
        "paths /orders",
        // The usage report, charted: the app's requests per hour.
        r#"aria-label="shop-frontend: requests per hour""#,
    ] {
        assert!(
            dom.contains(want),
            "the rendered page lacks {want:?}:\n{dom}"
        );
    }
    assert!(
        !dom.contains(r#"class="error""#),
        "the page shows an error:\n{dom}"
    );

    // A screenshot of the rendered page: the right size, and the page's own colours (the
    // accent of the header's button, the status tag's green) drawn, not a blank frame.
    let shot = profile.path().join("page.png");
    headless(
        &url,
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1280,900",
        ],
        profile.path(),
    );
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&shot).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!((info.width, info.height), (1280, 900));
    let channels = info.color_type.samples();
    let pixels: Vec<&[u8]> = buf[..info.buffer_size()].chunks(channels).collect();
    let near = |p: &[u8], c: [u8; 3]| (0..3).all(|i| p[i].abs_diff(c[i]) <= 8);
    let accent = pixels
        .iter()
        .filter(|p| near(p, [0x2f, 0x6f, 0xdd]))
        .count();
    let ok_green = pixels
        .iter()
        .filter(|p| near(p, [0x1f, 0x88, 0x3d]))
        .count();
    let background = pixels
        .iter()
        .filter(|p| near(p, [0xf6, 0xf8, 0xfa]))
        .count();
    assert!(
        accent > 200,
        "the header's button is not drawn ({accent} accent pixels)"
    );
    assert!(
        ok_green > 10,
        "the app's approved tag is not drawn ({ok_green} pixels)"
    );
    assert!(background > 10_000, "the page background is not drawn");
    let mut distinct: Vec<[u8; 3]> = pixels.iter().map(|p| [p[0], p[1], p[2]]).collect();
    distinct.sort_unstable();
    distinct.dedup();
    assert!(
        distinct.len() > 50,
        "a nearly blank frame: {} colours",
        distinct.len()
    );
}

#[test]
fn without_a_token_the_page_says_how_to_get_in() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "ui-test-token-0123456789abcdef").unwrap();
    let token = dir.path().join("token");
    let p = start(&["--admin-token-file", token.to_str().unwrap()]);
    let profile = tempfile::tempdir().unwrap();
    let dom = headless(
        &format!("http://127.0.0.1:{}/ui", p.admin),
        &["--dump-dom"],
        profile.path(),
    );
    assert!(
        dom.contains("The management API needs a token"),
        "no token prompt:\n{dom}"
    );
    assert!(!dom.contains(r#"<tr data-name="shop-frontend">"#));
}
