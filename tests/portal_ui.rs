//! The developer portal in a real headless Chromium driven by selenium
//! (`tests/portal/browse.py`), against a real tollgate behind a real Envoy: a developer signs
//! up, waits for approval (given through the management API), signs in, creates an app,
//! subscribes it to a product, copies the key shown once, calls the API through Envoy with
//! it, and sees the call in the app's usage chart. Screenshots of the catalog, the API
//! reference and the usage chart are kept under `target/portal-ui/` (not committed).

use std::path::PathBuf;
use std::process::Command;

mod support;

use support::{free_port, repo_root, Envoy, EnvoyOptions, Tollgate, Upstream};

const CONFIG: &str = r#"
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {name: verify-key}
spec: {type: VerifyApiKey}
---
apiVersion: tollgate.dev/v1alpha1
kind: Flow
metadata: {name: api}
spec:
  default: true
  request: [{policy: verify-key}]
---
apiVersion: tollgate.dev/v1alpha1
kind: ApiProduct
metadata: {name: weather}
spec:
  description: "Forecasts for <b>any</b> city"
  operations: [{path: "/weather/**", methods: [GET]}]
  quota: {limit: 1000, interval: 1, timeUnit: hour}
  attributes: {access: public, openapiSpec: weather.yaml}
---
apiVersion: tollgate.dev/v1alpha1
kind: ApiProduct
metadata: {name: internal-admin}
spec:
  operations: [{path: "/admin/**"}]
  attributes: {access: internal}
"#;

const SPEC: &str = r##"
openapi: 3.0.3
info: {title: Weather API, version: "1.2", description: "Today's weather and forecasts."}
servers: [{url: "https://api.example.com"}]
paths:
  /weather/today:
    get:
      summary: Today's weather
      parameters:
        - {name: city, in: query, required: true, schema: {type: string}, example: Lisbon}
      responses:
        "200":
          description: The weather
          content:
            application/json:
              schema: {$ref: "#/components/schemas/Weather"}
              example: {city: "<script>window.__pwned = true</script>", celsius: 21}
components:
  schemas:
    Weather:
      type: object
      required: [city, celsius]
      properties:
        city: {type: string}
        celsius: {type: number}
"##;

fn python() -> PathBuf {
    let p = repo_root().join(".tools/venv/bin/python");
    assert!(
        p.is_file(),
        "{} is missing: run scripts/setup.sh (it installs selenium into the venv)",
        p.display()
    );
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_developer_signs_up_gets_a_key_calls_through_envoy_and_sees_usage() {
    assert!(
        std::path::Path::new("/usr/bin/chromedriver").is_file(),
        "chromedriver is missing: scripts/setup.sh installs Debian's chromium-driver"
    );
    let dir = tempfile::tempdir().unwrap();
    let (config, specs) = (dir.path().join("config"), dir.path().join("specs"));
    std::fs::create_dir_all(&config).unwrap();
    std::fs::create_dir_all(&specs).unwrap();
    std::fs::write(config.join("portal.yaml"), CONFIG).unwrap();
    std::fs::write(specs.join("weather.yaml"), SPEC).unwrap();

    let upstream = Upstream::start();
    let portal_port = free_port();
    let portal_addr = format!("127.0.0.1:{portal_port}");
    let tollgate = Tollgate::start(
        &config,
        dir.path(),
        &[
            "--admin-insecure",
            "--portal-addr",
            &portal_addr,
            "--portal-spec-dir",
            specs.to_str().unwrap(),
        ],
    )
    .await;
    let envoy = Envoy::start(
        dir.path(),
        &EnvoyOptions::default(),
        tollgate.grpc,
        upstream.addr,
    )
    .await;

    let out_dir = repo_root().join("target/portal-ui");
    std::fs::create_dir_all(&out_dir).unwrap();
    for f in ["catalog.png", "api-reference.png", "usage-chart.png"] {
        let _ = std::fs::remove_file(out_dir.join(f));
    }
    // `localhost`, not 127.0.0.1: the browser keeps the `Secure` session cookie on plain
    // HTTP because localhost is a secure context (what the README promises).
    let portal_url = format!("http://localhost:{portal_port}");
    let admin_url = format!("http://{}", tollgate.admin);
    let envoy_url = format!("http://{}", envoy.listen);
    let script = repo_root().join("tests/portal/browse.py");
    let out = tokio::task::spawn_blocking({
        let out_dir = out_dir.clone();
        move || {
            Command::new(python())
                .arg(script)
                .args([&portal_url, &admin_url, &envoy_url])
                .arg(&out_dir)
                .output()
                .expect("run the selenium driver")
        }
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "driver failed: {}\n{stdout}\ntollgate log: {}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(dir.path().join("tollgate.log")).unwrap_or_default()
    );
    let seen: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or_default()).expect("driver JSON");

    assert!(
        seen["signed_up"]
            .as_str()
            .unwrap()
            .contains("waits for approval"),
        "{seen}"
    );
    assert!(
        seen["pending_signin"]
            .as_str()
            .unwrap()
            .contains("waits for approval"),
        "{seen}"
    );
    assert_eq!(seen["approve_status"], 200, "{seen}");
    assert!(
        seen["after_signin"].as_str().unwrap().ends_with("/apps"),
        "{seen}"
    );
    let cookie = &seen["cookies"][0];
    assert_eq!(cookie["httpOnly"], true, "{seen}");
    assert_eq!(cookie["secure"], true, "{seen}");
    assert_eq!(cookie["sameSite"], "Strict", "{seen}");
    assert_eq!(seen["key_prefix"], "tg_", "{seen}");
    assert_eq!(
        seen["api_status"], 200,
        "the portal's key works through Envoy: {seen}"
    );
    assert_eq!(seen["api_body_has_path"], true);
    assert_eq!(seen["no_key_status"], 401, "{seen}");
    assert_eq!(
        seen["usage_requests"], 1,
        "the call shows in the chart: {seen}"
    );
    assert!(
        seen["usage_text"].as_str().unwrap().contains("24 hours: 1"),
        "{seen}"
    );
    assert_eq!(seen["key_shown_again"], false, "{seen}");
    assert_eq!(seen["catalog_has_weather"], true);
    assert_eq!(seen["reference_ops"], 1, "{seen}");
    assert_eq!(
        seen["scripts_run"], false,
        "an OpenAPI example never runs as script"
    );
    assert!(upstream.seen_with_prefix("/weather/today").len() == 1);

    for f in ["catalog.png", "api-reference.png", "usage-chart.png"] {
        let bytes = std::fs::read(out_dir.join(f)).unwrap_or_default();
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let reader = decoder.read_info().expect("a PNG screenshot");
        let info = reader.info();
        assert!(
            info.width >= 200 && info.height >= 100,
            "{f}: {}x{}",
            info.width,
            info.height
        );
    }
    drop(envoy);
}
