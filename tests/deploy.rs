//! The deployment files stay valid: every Envoy bootstrap under `deploy/envoy/` passes the
//! real Envoy's `--mode validate`, every Kubernetes manifest parses, and the tollgate
//! configuration carried in ConfigMaps compiles; the manifests keep the ext_proc port to the
//! gateway, Redis behind a password from a Secret, and name only flags tollgate has; and the
//! Redis URL forms they rely on (a password, `rediss://`) work against a real Redis.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use tollgate::config::{compile, SourceFile};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(yaml_files(&p));
        } else if p.extension().is_some_and(|x| x == "yaml") {
            out.push(p);
        }
    }
    out.sort();
    out
}

fn envoy() -> PathBuf {
    std::env::var_os("ENVOY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".tools/envoy/envoy"))
}

#[test]
fn envoy_bootstraps_validate() {
    let envoy = envoy();
    assert!(
        envoy.is_file(),
        "Envoy not found at {}: run scripts/setup.sh",
        envoy.display()
    );
    let files = yaml_files(&root().join("deploy/envoy"));
    assert!(!files.is_empty());
    for f in files {
        let out = Command::new(&envoy)
            .args(["--mode", "validate", "-l", "error", "-c"])
            .arg(&f)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{} does not validate:\n{}{}",
            f.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn kubernetes_manifests_parse_and_carry_valid_configuration() {
    let mut configmaps = 0;
    for f in yaml_files(&root().join("deploy")) {
        if f.starts_with(root().join("deploy/envoy")) {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        for doc in serde_norway::Deserializer::from_str(&text) {
            let v = serde_norway::Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: invalid YAML: {e}", f.display()));
            let kind = v["kind"].as_str().unwrap_or_default().to_owned();
            assert!(!kind.is_empty(), "{}: a document without kind", f.display());
            assert!(
                v["apiVersion"].as_str().is_some(),
                "{}: {kind} without apiVersion",
                f.display()
            );
            if kind == "ConfigMap" && v["metadata"]["name"] == "tollgate-config" {
                let files: Vec<SourceFile> = v["data"]
                    .as_mapping()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| SourceFile {
                        name: format!("{}:{}", f.display(), k.as_str().unwrap()),
                        text: v.as_str().unwrap().to_owned(),
                    })
                    .collect();
                compile(&files, None).unwrap_or_else(|e| panic!("{e}"));
                configmaps += 1;
            }
        }
    }
    assert!(configmaps >= 1, "no tollgate ConfigMap found under deploy/");
}

/// Every document of every Kubernetes manifest under deploy/ (not the Envoy bootstraps).
fn manifests() -> Vec<(PathBuf, serde_norway::Value)> {
    let mut out = Vec::new();
    for f in yaml_files(&root().join("deploy")) {
        if f.starts_with(root().join("deploy/envoy")) {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        for doc in serde_norway::Deserializer::from_str(&text) {
            out.push((f.clone(), serde_norway::Value::deserialize(doc).unwrap()));
        }
    }
    out
}

fn seq(v: &serde_norway::Value) -> Vec<serde_norway::Value> {
    v.as_sequence().cloned().unwrap_or_default()
}

fn containers(workload: &serde_norway::Value) -> Vec<serde_norway::Value> {
    seq(&workload["spec"]["template"]["spec"]["containers"])
}

fn ports(rule: &serde_norway::Value) -> Vec<u64> {
    seq(&rule["ports"])
        .iter()
        .filter_map(|p| p["port"].as_u64())
        .collect()
}

#[test]
fn only_the_gateway_reaches_the_ext_proc_port() {
    let docs = manifests();
    let policy = docs
        .iter()
        .map(|(_, v)| v)
        .find(|v| {
            v["kind"] == "NetworkPolicy"
                && v["spec"]["podSelector"]["matchLabels"]["app"] == "tollgate"
        })
        .expect("a NetworkPolicy for tollgate's pods");
    assert!(seq(&policy["spec"]["policyTypes"]).contains(&"Ingress".into()));
    let rules = seq(&policy["spec"]["ingress"]);
    assert!(!rules.is_empty());
    for rule in &rules {
        // A rule without `from` or without `ports` would open everything it covers.
        let from = seq(&rule["from"]);
        assert!(
            !from.is_empty(),
            "an ingress rule open to every source: {rule:?}"
        );
        assert!(
            !ports(rule).is_empty(),
            "an ingress rule open on every port: {rule:?}"
        );
        for peer in &from {
            assert!(
                peer["ipBlock"].is_null(),
                "address blocks are not the gateway: {peer:?}"
            );
            // An empty namespaceSelector alone means every pod of the cluster.
            let only_ns = peer["podSelector"].is_null()
                && peer["namespaceSelector"]["matchLabels"]
                    .as_mapping()
                    .is_none_or(|m| m.is_empty());
            assert!(!only_ns, "a peer matching every pod: {peer:?}");
        }
    }
    let grpc: Vec<_> = rules.iter().filter(|r| ports(r).contains(&9002)).collect();
    assert_eq!(grpc.len(), 1, "one rule admits the ext_proc port");
    assert_eq!(
        ports(grpc[0]),
        [9002],
        "the gateway's rule admits nothing else"
    );
    for peer in seq(&grpc[0]["from"]) {
        assert!(
            peer["podSelector"]["matchLabels"]
                .as_mapping()
                .is_some_and(|m| !m.is_empty()),
            "the ext_proc port admits the gateway's pods only: {peer:?}"
        );
    }
}

#[test]
fn redis_asks_for_a_password_and_tollgate_gets_its_url_from_a_secret() {
    let docs = manifests();
    let redis = docs
        .iter()
        .map(|(_, v)| v)
        .find(|v| v["kind"] == "StatefulSet" && v["metadata"]["name"] == "redis")
        .expect("the Redis StatefulSet");
    let c = &containers(redis)[0];
    let args: Vec<String> = seq(&c["args"])
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect();
    let i = args
        .iter()
        .position(|a| a == "--requirepass")
        .expect("redis-server --requirepass");
    let var = args[i + 1]
        .strip_prefix("$(")
        .and_then(|v| v.strip_suffix(')'))
        .expect("the password comes from an environment variable");
    let env = seq(&c["env"]);
    let from = env
        .iter()
        .find(|e| e["name"] == var)
        .expect("the password variable is set");
    assert_eq!(from["valueFrom"]["secretKeyRef"]["name"], "tollgate-redis");
    assert!(
        docs.iter().any(|(_, v)| v["kind"] == "NetworkPolicy"
            && v["spec"]["podSelector"]["matchLabels"]["app"] == "redis"),
        "Redis is reachable from tollgate only"
    );

    let mut redis_users = 0;
    for (f, v) in &docs {
        if v["kind"] != "Deployment" {
            continue;
        }
        for c in containers(v) {
            let args: Vec<String> = seq(&c["args"])
                .iter()
                .filter_map(|a| a.as_str().map(str::to_owned))
                .collect();
            assert!(
                !args.iter().any(|a| a.contains("redis://")
                    || a.contains("rediss://")
                    || *a == "--redis-url"),
                "{}: a Redis URL in the arguments (it carries the password): {args:?}",
                f.display()
            );
            if args
                .windows(2)
                .any(|w| w[0] == "--store" && w[1] == "redis")
            {
                redis_users += 1;
                let url = seq(&c["env"])
                    .into_iter()
                    .find(|e| e["name"] == "TOLLGATE_REDIS_URL")
                    .unwrap_or_else(|| {
                        panic!("{}: --store redis without TOLLGATE_REDIS_URL", f.display())
                    });
                assert_eq!(
                    url["valueFrom"]["secretKeyRef"]["name"],
                    "tollgate-redis",
                    "{}",
                    f.display()
                );
            }
        }
    }
    assert!(redis_users >= 1);
}

#[test]
fn manifests_name_only_flags_tollgate_has() {
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut checked = 0;
    for (f, v) in manifests() {
        if v["kind"] != "Deployment" {
            continue;
        }
        for c in containers(&v) {
            let args = seq(&c["args"]);
            if args.first().and_then(|a| a.as_str()) != Some("serve") {
                continue;
            }
            for a in args.iter().filter_map(|a| a.as_str()) {
                if a.starts_with("--") {
                    assert!(
                        help.contains(&format!("{a} ")) || help.contains(&format!("{a}\n")),
                        "{}: tollgate serve has no {a}",
                        f.display()
                    );
                    checked += 1;
                }
            }
            // Probes go to a port the container declares.
            let declared: Vec<String> = seq(&c["ports"])
                .iter()
                .filter_map(|p| p["name"].as_str().map(str::to_owned))
                .collect();
            for probe in ["readinessProbe", "livenessProbe"] {
                if let Some(port) = c[probe]["httpGet"]["port"].as_str() {
                    assert!(
                        declared.iter().any(|d| d == port),
                        "{}: {probe} on {port}",
                        f.display()
                    );
                }
            }
        }
    }
    assert!(checked > 5);
}

// ───────── the Redis URL forms the manifests rely on, against a real Redis ─────────

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port()
}

/// A child process killed on drop.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `redis-server` speaking TLS only, with a password; returns it and the CA (PEM) of its
/// certificate.
fn tls_redis(dir: &Path, port: u16, password: &str) -> (Killed, String) {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
        .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    std::fs::write(dir.join("redis.crt"), cert.pem()).unwrap();
    std::fs::write(dir.join("redis.key"), key.serialize_pem()).unwrap();
    std::fs::write(dir.join("ca.crt"), ca.pem()).unwrap();
    let child = Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .arg("--tls-cert-file")
        .arg(dir.join("redis.crt"))
        .arg("--tls-key-file")
        .arg(dir.join("redis.key"))
        .arg("--tls-ca-cert-file")
        .arg(dir.join("ca.crt"))
        .args(["--tls-auth-clients", "no", "--requirepass", password])
        .args(["--save", "", "--appendonly", "no", "--loglevel", "warning"])
        .arg("--dir")
        .arg(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("redis-server (scripts/setup.sh installs it)");
    let child = Killed(child);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "redis-server did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    (child, ca.pem())
}

/// `tollgate serve --store redis` with `url` in TOLLGATE_REDIS_URL, trusting `ca_file`;
/// the admin port once ready, or the exit status and stderr when it stopped.
fn serve_with_redis(dir: &Path, url: &str, ca_file: &Path) -> Result<(Killed, u16), String> {
    let config = dir.join("config");
    let _ = std::fs::create_dir(&config);
    std::fs::write(
        config.join("c.yaml"),
        "apiVersion: tollgate.dev/v1alpha1\nkind: Flow\nmetadata: {name: all}\nspec: {default: true}\n",
    )
    .unwrap();
    let admin = free_port();
    let mut child = Killed(
        Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["serve", "--config"])
            .arg(&config)
            .args(["--grpc-addr", &format!("127.0.0.1:{}", free_port())])
            .args(["--admin-addr", &format!("127.0.0.1:{admin}")])
            .args(["--store", "redis", "--admin-insecure"])
            .env("TOLLGATE_REDIS_URL", url)
            .env("SSL_CERT_FILE", ca_file)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            let _ = child.0.stderr.take().unwrap().read_to_string(&mut err);
            return Err(format!("{status}: {err}"));
        }
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", admin)) {
            use std::io::{Read, Write};
            let _ = s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let mut r = String::new();
            let _ = s.read_to_string(&mut r);
            if r.starts_with("HTTP/1.1 200") {
                return Ok((child, admin));
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "tollgate did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn a_tls_redis_with_a_password_is_reached_through_a_rediss_url() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let (_redis, _) = tls_redis(dir.path(), port, "s3cret-redis-pass");
    let ca = dir.path().join("ca.crt");
    let (_t, admin) = serve_with_redis(
        dir.path(),
        &format!("rediss://:s3cret-redis-pass@127.0.0.1:{port}/0"),
        &ca,
    )
    .unwrap_or_else(|e| panic!("tollgate could not use the rediss:// URL: {e}"));
    // A write through the management API lands in that Redis.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", admin)).unwrap();
    use std::io::{Read, Write};
    let body = r#"{"name":"p1","operations":[{"path":"/v1/**"}]}"#;
    write!(
        s,
        "POST /v1/products HTTP/1.1\r\nHost: x\r\nConnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut r = String::new();
    let _ = s.read_to_string(&mut r);
    assert!(r.starts_with("HTTP/1.1 201"), "{r}");

    // A wrong password, or plain text to the TLS port, stops the start with an error.
    let err = serve_with_redis(
        dir.path(),
        &format!("rediss://:wrong@127.0.0.1:{port}/0"),
        &ca,
    )
    .err()
    .expect("a wrong password is refused");
    assert!(
        err.contains("Redis") || err.contains("redis") || err.contains("store"),
        "{err}"
    );
    assert!(
        serve_with_redis(
            dir.path(),
            &format!("redis://:s3cret-redis-pass@127.0.0.1:{port}/0"),
            &ca
        )
        .is_err(),
        "plain text to a TLS Redis must not work"
    );
}
