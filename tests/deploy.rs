//! The deployment files stay valid, checked on what users apply, not on the files alone:
//! every kustomize overlay under `deploy/` renders with `kubectl kustomize`; the rendered core
//! objects validate against the Kubernetes schemas (`kubernetes-validate`, offline, strict);
//! the custom resources (GKE extensions and health checks, Envoy Gateway's policy, Gateway
//! API's ReferenceGrant) use only fields their published schemas have; the ConfigMap the
//! Deployment mounts passes `tollgate validate` and defines every flow an extension names;
//! references between objects resolve; the pods are hardened as the image expects; only
//! the gateway reaches the ext_proc port; Redis asks for a password that tollgate gets from
//! a Secret; every Envoy bootstrap passes the real Envoy's `--mode validate`.
//!
//! The image: the Dockerfile passes hadolint and the rules below (distroless `cc` runtime
//! whose libraries cover what the binary links, non-root user, a data volume owned by it,
//! no HEALTHCHECK), and the build stage's own cargo command, read from the Dockerfile, builds
//! tollgate from a context holding only what `.dockerignore` admits, unoptimised (see
//! `the_image_build_command_builds_from_the_docker_context`); that binary serves the image's
//! command with the image's environment.
//!
//! Tools come from scripts/setup.sh: `.tools/venv` (kubernetes-validate, hadolint, and
//! kubectl when the machine has none with kustomize v5).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::LazyLock;

use serde::Deserialize;
use serde_norway::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tollgate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
}

fn output(cmd: &mut Command) -> std::process::Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn venv_tool(name: &str) -> PathBuf {
    let p = root().join(".tools/venv/bin").join(name);
    assert!(
        p.is_file(),
        "{} not found: run scripts/setup.sh",
        p.display()
    );
    p
}

/// The virtualenv's kubectl when setup.sh installed one, else the machine's.
fn kubectl() -> PathBuf {
    let p = root().join(".tools/venv/bin/kubectl");
    if p.is_file() {
        p
    } else {
        PathBuf::from("kubectl")
    }
}

fn seq(v: &Value) -> Vec<Value> {
    v.as_sequence().cloned().unwrap_or_default()
}

fn strs(v: &Value) -> Vec<String> {
    seq(v)
        .iter()
        .filter_map(|a| a.as_str().map(str::to_owned))
        .collect()
}

fn text(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

fn containers(workload: &Value) -> Vec<Value> {
    seq(&workload["spec"]["template"]["spec"]["containers"])
}

fn yaml_docs(text: &str, what: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{what}: invalid YAML: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

// ───────────────────────────── rendering ─────────────────────────────

/// Every kustomization a user can apply (`kubectl apply -k deploy/NAME`).
const OVERLAYS: [&str; 5] = ["base", "gke", "envoy-gateway", "redis", "envoy"];

/// API groups (apiVersion) whose kinds `kubernetes-validate` knows.
const CORE_API_VERSIONS: [&str; 5] = [
    "v1",
    "apps/v1",
    "policy/v1",
    "autoscaling/v2",
    "networking.k8s.io/v1",
];

/// Kubernetes releases the core objects must validate against: the oldest still supported
/// by GKE when this was written, and the newest kubernetes-validate knows.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.33.0", "1.37.0"];

/// A self-signed certificate and its key, for generated TLS Secrets.
fn self_signed() -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["tollgate".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    (cert.pem(), key.serialize_pem())
}

/// The files a kustomization's secretGenerator reads (`key=path` or `path`), relative to it.
fn secret_files(kustomization: &Value) -> Vec<String> {
    seq(&kustomization["secretGenerator"])
        .iter()
        .flat_map(|g| strs(&g["files"]))
        .map(|f| f.split_once('=').map_or(f.clone(), |(_, p)| p.to_owned()))
        .collect()
}

fn kustomizations() -> Vec<(PathBuf, Value)> {
    files_under(&root().join("deploy"))
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n == "kustomization.yaml"))
        .map(|p| {
            let v = yaml_docs(
                &std::fs::read_to_string(&p).unwrap(),
                &p.display().to_string(),
            )
            .remove(0);
            (p, v)
        })
        .collect()
}

/// Each overlay rendered by `kubectl kustomize`, from a copy of deploy/ whose git-ignored
/// secret files hold test values (a developer's real ones are never read).
static RENDERED: LazyLock<BTreeMap<&'static str, Vec<Value>>> = LazyLock::new(|| {
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("deploy");
    let src = root().join("deploy");
    for f in files_under(&src) {
        let rel = f.strip_prefix(&src).unwrap();
        if rel.components().any(|c| c.as_os_str() == "secrets") {
            continue;
        }
        let to = copy.join(rel);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&f, &to).unwrap();
    }
    let (cert, key) = self_signed();
    for (k, v) in kustomizations() {
        let dir = copy.join(k.parent().unwrap().strip_prefix(&src).unwrap());
        for f in secret_files(&v) {
            let path = dir.join(&f);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            let value = match f.rsplit('.').next() {
                Some("crt") => cert.clone(),
                Some("key") => key.clone(),
                _ => format!("test-value-of-{f}"),
            };
            std::fs::write(path, value).unwrap();
        }
    }
    OVERLAYS
        .iter()
        .map(|o| {
            let out = Command::new(kubectl())
                .arg("kustomize")
                .arg(copy.join(o))
                .output()
                .unwrap_or_else(|e| panic!("kubectl ({e}): run scripts/setup.sh"));
            assert!(
                out.status.success(),
                "kubectl kustomize deploy/{o} failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let docs = yaml_docs(&String::from_utf8(out.stdout).unwrap(), o);
            (*o, docs)
        })
        .collect()
});

fn rendered(overlay: &str) -> &'static [Value] {
    &RENDERED[overlay]
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    docs.iter()
        .find(|v| v["kind"] == kind && v["metadata"]["name"] == name)
}

fn tollgate_deployment(overlay: &str) -> &'static Value {
    find(rendered(overlay), "Deployment", "tollgate")
        .unwrap_or_else(|| panic!("deploy/{overlay}: no tollgate Deployment"))
}

fn tollgate_container(overlay: &str) -> Value {
    containers(tollgate_deployment(overlay))
        .into_iter()
        .find(|c| c["name"] == "tollgate")
        .unwrap_or_else(|| panic!("deploy/{overlay}: no tollgate container"))
}

/// The value following `flag` in a container's args.
fn arg_value(args: &[String], flag: &str) -> Option<String> {
    args.windows(2).find(|w| w[0] == flag).map(|w| w[1].clone())
}

#[test]
fn every_overlay_renders_around_one_tollgate_deployment() {
    for o in OVERLAYS {
        let docs = rendered(o);
        for kind in [
            "Deployment",
            "Service",
            "NetworkPolicy",
            "PodDisruptionBudget",
            "HorizontalPodAutoscaler",
            "ServiceAccount",
        ] {
            assert!(
                find(docs, kind, "tollgate").is_some(),
                "deploy/{o}: no {kind} tollgate"
            );
        }
        for v in docs {
            assert!(v["apiVersion"].as_str().is_some(), "deploy/{o}: {v:?}");
            assert!(
                v["metadata"]["name"].as_str().is_some(),
                "deploy/{o}: {v:?}"
            );
        }
    }
    // The overlays add what they are for.
    let kinds = |o: &str| -> BTreeSet<String> {
        rendered(o)
            .iter()
            .map(|v| text(&v["kind"]).to_owned())
            .collect()
    };
    for k in [
        "GCPTrafficExtension",
        "GCPRoutingExtension",
        "HealthCheckPolicy",
    ] {
        assert!(kinds("gke").contains(k), "deploy/gke has no {k}");
    }
    assert!(kinds("envoy-gateway").contains("EnvoyExtensionPolicy"));
    assert!(kinds("redis").contains("StatefulSet"));
    assert!(find(rendered("envoy"), "Deployment", "envoy").is_some());
}

#[test]
fn secrets_come_from_git_ignored_files_only() {
    let ignore = std::fs::read_to_string(root().join(".gitignore")).unwrap();
    assert!(
        ignore.lines().any(|l| l.trim() == "/deploy/*/secrets/"),
        ".gitignore must keep deploy/*/secrets/ out of git"
    );
    let mut generated = 0;
    for (k, v) in kustomizations() {
        let depth = k
            .strip_prefix(root().join("deploy"))
            .unwrap()
            .components()
            .count();
        for f in secret_files(&v) {
            assert!(
                depth == 2 && f.starts_with("secrets/") && !f[8..].contains('/'),
                "{}: secret file {f} is outside the git-ignored deploy/*/secrets/",
                k.display()
            );
            generated += 1;
        }
        assert!(
            v["secretGenerator"].as_sequence().is_none_or(|g| g
                .iter()
                .all(|g| g["literals"].is_null() && g["envs"].is_null())),
            "{}: secret values written in the kustomization",
            k.display()
        );
    }
    assert!(generated >= 4);
    // No Secret carries data written in a manifest: every rendered one is generated (its
    // name carries the content hash).
    for o in OVERLAYS {
        for v in rendered(o).iter().filter(|v| v["kind"] == "Secret") {
            let name = text(&v["metadata"]["name"]);
            assert!(
                name.rsplit_once('-').is_some_and(|(_, h)| h.len() == 10),
                "deploy/{o}: Secret {name} is not generated from files"
            );
        }
    }
}

#[test]
fn core_objects_validate_against_the_kubernetes_schemas() {
    let validate = venv_tool("kubernetes-validate");
    let dir = tempfile::tempdir().unwrap();
    let passes = |file: &Path, k: &str| -> (bool, String) {
        let out = Command::new(&validate)
            .args(["--strict", "--quiet", "-k", k])
            .arg(file)
            .output()
            .unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success() && !said.contains("ERROR"), said)
    };
    // The validator refuses what it should (a field no Deployment has), so a pass means
    // something.
    let bad = dir.path().join("bad.json");
    let mut d = serde_json::to_value(tollgate_deployment("base")).unwrap();
    d["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFS"] = true.into();
    std::fs::write(&bad, d.to_string()).unwrap();
    for k in KUBERNETES_VERSIONS {
        let (ok, said) = passes(&bad, k);
        assert!(!ok && said.contains("readOnlyRootFS"), "{k}: {said}");
    }
    for o in OVERLAYS {
        let core: Vec<&Value> = rendered(o)
            .iter()
            .filter(|v| CORE_API_VERSIONS.contains(&text(&v["apiVersion"])))
            .collect();
        assert!(core.len() >= 8, "deploy/{o}: {} core objects", core.len());
        // Whatever is not core must be a custom resource whose schema this file checks.
        for v in rendered(o) {
            let kind = text(&v["kind"]);
            assert!(
                CORE_API_VERSIONS.contains(&text(&v["apiVersion"]))
                    || crd_schema(text(&v["apiVersion"]), kind).is_some(),
                "deploy/{o}: {kind} ({}) is checked by no schema",
                text(&v["apiVersion"])
            );
        }
        let file = dir.path().join(format!("{o}.yaml"));
        // As JSON: the validator reads YAML 1.1, where a re-serialised `yes` is a boolean.
        let body: Vec<String> = core
            .iter()
            .map(|v| serde_json::to_string(v).unwrap())
            .collect();
        std::fs::write(&file, body.join("\n---\n")).unwrap();
        for k in KUBERNETES_VERSIONS {
            let (ok, said) = passes(&file, k);
            assert!(ok, "deploy/{o} against Kubernetes {k}:\n{said}");
        }
    }
}

#[test]
fn the_mounted_configuration_passes_tollgate_validate_and_defines_the_named_flows() {
    // The base's ConfigMap is its policy directory: every file there is listed.
    let base = kustomizations()
        .into_iter()
        .find(|(k, _)| k.ends_with("base/kustomization.yaml"))
        .unwrap()
        .1;
    let listed: BTreeSet<String> = seq(&base["configMapGenerator"])
        .iter()
        .filter(|g| g["name"] == "tollgate-config")
        .flat_map(|g| strs(&g["files"]))
        .collect();
    let on_disk: BTreeSet<String> = files_under(&root().join("deploy/base/policies"))
        .iter()
        .map(|p| {
            p.strip_prefix(root().join("deploy/base"))
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert_eq!(
        listed, on_disk,
        "deploy/base/policies/ and the generator's files differ"
    );

    for o in OVERLAYS {
        let docs = rendered(o);
        let d = tollgate_deployment(o);
        let c = tollgate_container(o);
        let args = strs(&c["args"]);
        let config_dir = arg_value(&args, "--config").expect("--config");
        let mount = seq(&c["volumeMounts"])
            .into_iter()
            .find(|m| m["mountPath"] == config_dir.as_str())
            .unwrap_or_else(|| panic!("deploy/{o}: nothing mounted at {config_dir}"));
        let volume = seq(&d["spec"]["template"]["spec"]["volumes"])
            .into_iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap();
        let cm_name = text(&volume["configMap"]["name"]);
        let cm = find(docs, "ConfigMap", cm_name)
            .unwrap_or_else(|| panic!("deploy/{o}: ConfigMap {cm_name} is not rendered"));

        let dir = tempfile::tempdir().unwrap();
        let mut flows = BTreeSet::new();
        for (k, v) in cm["data"].as_mapping().unwrap() {
            let (name, body) = (k.as_str().unwrap(), v.as_str().unwrap());
            std::fs::write(dir.path().join(name), body).unwrap();
            for doc in yaml_docs(body, name) {
                if doc["kind"] == "Flow" {
                    flows.insert(text(&doc["metadata"]["name"]).to_owned());
                }
            }
        }
        // The options of serve that change what validate accepts, as the Deployment sets them.
        let mut cmd = tollgate();
        cmd.arg("validate");
        for flag in ["--max-message-bytes", "--callout-allow"] {
            if let Some(v) = arg_value(&args, flag) {
                cmd.args([flag, &v]);
            }
        }
        let out = output(cmd.arg(dir.path()));
        assert!(
            out.status.success(),
            "deploy/{o}: tollgate validate refuses ConfigMap {cm_name}:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );

        // Every flow an extension names by metadata exists.
        for v in docs {
            for chain in seq(&v["spec"]["extensionChains"]) {
                for ext in seq(&chain["extensions"]) {
                    if let Some(flow) = ext["metadata"]["tollgate-flow"].as_str() {
                        assert!(
                            flows.contains(flow),
                            "deploy/{o}: {} names flow {flow}, which {cm_name} lacks ({flows:?})",
                            text(&v["kind"])
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn references_between_objects_resolve() {
    for o in OVERLAYS {
        let docs = rendered(o);
        let exists = |kind: &str, ns: &str, name: &str| {
            docs.iter().any(|v| {
                v["kind"] == kind
                    && v["metadata"]["name"] == name
                    && text(&v["metadata"]["namespace"]) == ns
            })
        };
        for w in docs
            .iter()
            .filter(|v| v["kind"] == "Deployment" || v["kind"] == "StatefulSet")
        {
            let ns = text(&w["metadata"]["namespace"]);
            let name = text(&w["metadata"]["name"]);
            assert!(!ns.is_empty(), "deploy/{o}: {name} has no namespace");
            let pod = &w["spec"]["template"]["spec"];
            if let Some(sa) = pod["serviceAccountName"].as_str() {
                assert!(exists("ServiceAccount", ns, sa), "deploy/{o}: {name}: {sa}");
            }
            for vol in seq(&pod["volumes"]) {
                if let Some(cm) = vol["configMap"]["name"].as_str() {
                    assert!(
                        exists("ConfigMap", ns, cm),
                        "deploy/{o}: {name}: ConfigMap {cm}"
                    );
                }
                if let Some(s) = vol["secret"]["secretName"].as_str() {
                    assert!(exists("Secret", ns, s), "deploy/{o}: {name}: Secret {s}");
                }
            }
            for c in containers(w) {
                assert!(
                    text(&c["image"]).contains(':'),
                    "deploy/{o}: {name}: image {} has no tag (images: transformer?)",
                    text(&c["image"])
                );
                for e in seq(&c["env"]) {
                    if let Some(s) = e["valueFrom"]["secretKeyRef"]["name"].as_str() {
                        let secret = docs
                            .iter()
                            .find(|v| v["kind"] == "Secret" && v["metadata"]["name"] == s)
                            .unwrap_or_else(|| panic!("deploy/{o}: {name}: Secret {s}"));
                        let key = text(&e["valueFrom"]["secretKeyRef"]["key"]);
                        assert!(
                            !secret["data"][key].is_null(),
                            "deploy/{o}: Secret {s} has no key {key}"
                        );
                    }
                }
                // Probes go to a port the container declares.
                let declared: Vec<String> = seq(&c["ports"])
                    .iter()
                    .filter_map(|p| p["name"].as_str().map(str::to_owned))
                    .collect();
                for probe in ["readinessProbe", "livenessProbe", "startupProbe"] {
                    for how in ["httpGet", "tcpSocket", "grpc"] {
                        if let Some(port) = c[probe][how]["port"].as_str() {
                            assert!(declared.iter().any(|d| d == port), "deploy/{o}: {probe}");
                        }
                    }
                }
            }
        }
        // Services, PDBs and autoscalers point at pods and workloads that exist.
        for v in docs {
            let ns = text(&v["metadata"]["namespace"]);
            match text(&v["kind"]) {
                "Service" => {
                    let sel = &v["spec"]["selector"];
                    assert!(
                        docs.iter()
                            .any(|w| w["spec"]["template"]["metadata"]["labels"]
                                .as_mapping()
                                .is_some_and(|l| sel
                                    .as_mapping()
                                    .unwrap()
                                    .iter()
                                    .all(|(k, v)| l.get(k) == Some(v)))),
                        "deploy/{o}: Service {} selects no pods",
                        text(&v["metadata"]["name"])
                    );
                }
                "PodDisruptionBudget" => assert_eq!(
                    v["spec"]["selector"]["matchLabels"]["app"], "tollgate",
                    "deploy/{o}"
                ),
                "HorizontalPodAutoscaler" => {
                    let t = &v["spec"]["scaleTargetRef"];
                    assert!(exists(text(&t["kind"]), ns, text(&t["name"])), "deploy/{o}");
                    assert!(
                        v["spec"]["minReplicas"].as_u64() >= Some(2),
                        "deploy/{o}: fewer than two replicas"
                    );
                }
                _ => {}
            }
        }
    }
}

// ───────────────────────────── the pods ─────────────────────────────

/// The numeric `USER uid[:gid]` of the Dockerfile's last stage.
fn image_user() -> (u64, Option<u64>) {
    let stages = dockerfile();
    let user = stages
        .last()
        .unwrap()
        .iter()
        .rev()
        .find(|i| i.cmd == "USER")
        .expect("the runtime stage sets USER")
        .args
        .clone();
    let (u, g) = user
        .split_once(':')
        .map_or((user.as_str(), None), |(u, g)| (u, Some(g)));
    (
        u.parse()
            .expect("USER is numeric (runAsNonRoot can check it)"),
        g.map(|g| g.parse().expect("USER's group is numeric")),
    )
}

#[test]
fn tollgate_pods_are_hardened_spread_and_probed_as_the_image_expects() {
    let (uid, gid) = image_user();
    for o in OVERLAYS {
        let d = tollgate_deployment(o);
        assert_eq!(d["spec"]["replicas"].as_u64(), Some(2), "deploy/{o}");
        let pod = &d["spec"]["template"]["spec"];
        let c = tollgate_container(o);
        let sc = |k: &str| -> Value {
            if !c["securityContext"][k].is_null() {
                c["securityContext"][k].clone()
            } else {
                pod["securityContext"][k].clone()
            }
        };
        assert_eq!(sc("runAsNonRoot"), Value::Bool(true), "deploy/{o}");
        assert_eq!(
            sc("runAsUser").as_u64(),
            Some(uid),
            "deploy/{o}: the image's user"
        );
        if let Some(g) = gid {
            assert_eq!(
                sc("runAsGroup").as_u64(),
                Some(g),
                "deploy/{o}: the image's group"
            );
        }
        assert_eq!(
            sc("readOnlyRootFilesystem"),
            Value::Bool(true),
            "deploy/{o}"
        );
        assert_eq!(
            sc("allowPrivilegeEscalation"),
            Value::Bool(false),
            "deploy/{o}"
        );
        assert_eq!(strs(&sc("capabilities")["drop"]), ["ALL"], "deploy/{o}");
        assert_eq!(
            pod["automountServiceAccountToken"],
            Value::Bool(false),
            "deploy/{o}"
        );
        // A read-only root and an embedded store need a writable data directory.
        let args = strs(&c["args"]);
        if arg_value(&args, "--store").as_deref() != Some("redis") {
            let data = arg_value(&args, "--data-dir").unwrap_or("/var/lib/tollgate".into());
            assert!(
                seq(&c["volumeMounts"])
                    .iter()
                    .any(|m| m["mountPath"] == data.as_str()),
                "deploy/{o}: an embedded store without a volume at {data}"
            );
        }
        for probe in ["readinessProbe", "livenessProbe"] {
            assert!(!c[probe]["httpGet"].is_null(), "deploy/{o}: no {probe}");
        }
        assert_eq!(
            c["readinessProbe"]["httpGet"]["path"], "/readyz",
            "deploy/{o}"
        );
        assert_eq!(
            c["livenessProbe"]["httpGet"]["path"], "/healthz",
            "deploy/{o}"
        );
        assert!(
            !c["resources"]["requests"]["cpu"].is_null(),
            "deploy/{o}: the HPA needs it"
        );
        assert!(!c["resources"]["limits"]["memory"].is_null(), "deploy/{o}");
        let keys: BTreeSet<String> = seq(&pod["topologySpreadConstraints"])
            .iter()
            .map(|t| text(&t["topologyKey"]).to_owned())
            .collect();
        assert!(
            keys.contains("kubernetes.io/hostname") && keys.contains("topology.kubernetes.io/zone"),
            "deploy/{o}: spread over nodes and zones: {keys:?}"
        );
        // Draining outlasts the shutdown tollgate is told to take.
        let secs = |flag: &str| -> u64 {
            let v = arg_value(&args, flag).unwrap_or_else(|| panic!("deploy/{o}: {flag}"));
            v.strip_suffix('s')
                .and_then(|s| s.parse().ok())
                .expect("whole seconds")
        };
        let pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
            .as_u64()
            .unwrap_or(0);
        assert!(
            pod["terminationGracePeriodSeconds"].as_u64().unwrap_or(30)
                > pre_stop + secs("--shutdown-grace") + secs("--drain-timeout"),
            "deploy/{o}: the pod is killed before open streams drain"
        );
        // HTTP/2 on the ext_proc port, said so to the gateway.
        let svc = find(rendered(o), "Service", "tollgate").unwrap();
        let grpc = seq(&svc["spec"]["ports"])
            .into_iter()
            .find(|p| p["targetPort"] == "grpc")
            .expect("a Service port for grpc");
        let tls = arg_value(&args, "--tls-cert").is_some();
        let want = match (o, tls) {
            ("gke", true) => "HTTP2",
            ("gke", false) => panic!("deploy/gke: GKE calls extensions over TLS"),
            (_, true) => "kubernetes.io/h2",
            (_, false) => "kubernetes.io/h2c",
        };
        assert_eq!(grpc["appProtocol"], want, "deploy/{o}");
        if tls {
            // The files tollgate reads are those of a mounted TLS Secret.
            for (flag, key) in [("--tls-cert", "tls.crt"), ("--tls-key", "tls.key")] {
                let path = arg_value(&args, flag).unwrap();
                let (dir, file) = path.rsplit_once('/').unwrap();
                assert_eq!(file, key, "deploy/{o}");
                let mount = seq(&c["volumeMounts"])
                    .into_iter()
                    .find(|m| m["mountPath"] == dir)
                    .unwrap_or_else(|| panic!("deploy/{o}: nothing mounted at {dir}"));
                let vol = seq(&pod["volumes"])
                    .into_iter()
                    .find(|v| v["name"] == mount["name"])
                    .unwrap();
                let secret = find(rendered(o), "Secret", text(&vol["secret"]["secretName"]))
                    .expect("the TLS Secret");
                assert_eq!(secret["type"], "kubernetes.io/tls", "deploy/{o}");
            }
        }
    }
}

fn ports(rule: &Value) -> Vec<u64> {
    seq(&rule["ports"])
        .iter()
        .filter_map(|p| p["port"].as_u64())
        .collect()
}

/// The load balancer ranges GKE's extension calls and health checks come from (Google's
/// front ends and health checkers), beside a proxy-only subnet, which is private.
/// https://cloud.google.com/load-balancing/docs/firewall-rules
const GOOGLE_LB_RANGES: [&str; 2] = ["35.191.0.0/16", "130.211.0.0/22"];

fn private_range(cidr: &str) -> bool {
    let Some((addr, len)) = cidr.split_once('/') else {
        return false;
    };
    let (Ok(addr), Ok(len)) = (addr.parse::<std::net::Ipv4Addr>(), len.parse::<u8>()) else {
        return false;
    };
    addr.is_private() && len >= 16
}

#[test]
fn only_the_gateway_reaches_the_ext_proc_port() {
    for o in OVERLAYS {
        let policy = rendered(o)
            .iter()
            .find(|v| {
                v["kind"] == "NetworkPolicy"
                    && v["spec"]["podSelector"]["matchLabels"]["app"] == "tollgate"
            })
            .unwrap_or_else(|| panic!("deploy/{o}: a NetworkPolicy for tollgate's pods"));
        assert!(seq(&policy["spec"]["policyTypes"]).contains(&"Ingress".into()));
        let rules = seq(&policy["spec"]["ingress"]);
        assert!(!rules.is_empty());
        for rule in &rules {
            // A rule without `from` or without `ports` would open everything it covers.
            let from = seq(&rule["from"]);
            assert!(
                !from.is_empty(),
                "deploy/{o}: a rule open to every source: {rule:?}"
            );
            assert!(
                !ports(rule).is_empty(),
                "deploy/{o}: a rule open on every port: {rule:?}"
            );
            for peer in &from {
                if let Some(cidr) = peer["ipBlock"]["cidr"].as_str() {
                    // Only GKE's load balancer is an address range rather than pods.
                    assert!(
                        o == "gke" && (GOOGLE_LB_RANGES.contains(&cidr) || private_range(cidr)),
                        "deploy/{o}: address block {cidr} is not the gateway"
                    );
                    continue;
                }
                // An empty namespaceSelector alone means every pod of the cluster.
                let only_ns = peer["podSelector"].is_null()
                    && peer["namespaceSelector"]["matchLabels"]
                        .as_mapping()
                        .is_none_or(|m| m.is_empty());
                assert!(!only_ns, "deploy/{o}: a peer matching every pod: {peer:?}");
            }
        }
        let grpc: Vec<_> = rules.iter().filter(|r| ports(r).contains(&9002)).collect();
        assert_eq!(
            grpc.len(),
            1,
            "deploy/{o}: one rule admits the ext_proc port"
        );
        assert_eq!(
            ports(grpc[0]),
            [9002],
            "deploy/{o}: the gateway's rule admits nothing else"
        );
        for peer in seq(&grpc[0]["from"]) {
            let pods = peer["podSelector"]["matchLabels"]
                .as_mapping()
                .is_some_and(|m| !m.is_empty());
            let lb = o == "gke" && !peer["ipBlock"].is_null();
            assert!(
                pods || lb,
                "deploy/{o}: the ext_proc port admits the gateway only: {peer:?}"
            );
        }
        // The overlay's gateway pods are the ones admitted.
        let admitted = |labels: &Value| {
            seq(&grpc[0]["from"]).iter().any(|p| {
                p["podSelector"]["matchLabels"]
                    .as_mapping()
                    .is_some_and(|m| m.iter().all(|(k, v)| labels.get(k) == Some(v)))
            })
        };
        if let Some(envoy) = find(rendered(o), "Deployment", "envoy") {
            assert!(
                admitted(&envoy["spec"]["template"]["metadata"]["labels"]),
                "deploy/{o}: its Envoy cannot reach tollgate"
            );
        }
    }
}

#[test]
fn redis_asks_for_a_password_and_tollgate_gets_its_url_from_a_secret() {
    let docs = rendered("redis");
    let redis = find(docs, "StatefulSet", "redis").expect("the Redis StatefulSet");
    let c = &containers(redis)[0];
    let args = strs(&c["args"]);
    let var = arg_value(&args, "--requirepass")
        .expect("redis-server --requirepass")
        .strip_prefix("$(")
        .and_then(|v| v.strip_suffix(')'))
        .expect("the password comes from an environment variable")
        .to_owned();
    let from = seq(&c["env"])
        .into_iter()
        .find(|e| e["name"] == var.as_str())
        .expect("the password variable is set");
    let secret = text(&from["valueFrom"]["secretKeyRef"]["name"]).to_owned();
    assert!(secret.starts_with("tollgate-redis-"), "{secret}");
    assert!(
        docs.iter().any(|v| v["kind"] == "NetworkPolicy"
            && v["spec"]["podSelector"]["matchLabels"]["app"] == "redis"),
        "Redis is reachable from tollgate only"
    );
    // The URL tollgate uses is in the same Secret.
    let url = seq(&tollgate_container("redis")["env"])
        .into_iter()
        .find(|e| e["name"] == "TOLLGATE_REDIS_URL")
        .expect("TOLLGATE_REDIS_URL");
    assert_eq!(url["valueFrom"]["secretKeyRef"]["name"], secret.as_str());

    for o in OVERLAYS {
        let mut redis_users = 0;
        for v in rendered(o).iter().filter(|v| v["kind"] == "Deployment") {
            for c in containers(v) {
                let args = strs(&c["args"]);
                assert!(
                    !args.iter().any(|a| a.contains("redis://")
                        || a.contains("rediss://")
                        || *a == "--redis-url"),
                    "deploy/{o}: a Redis URL in the arguments (it carries the password): {args:?}"
                );
                if arg_value(&args, "--store").as_deref() == Some("redis") {
                    redis_users += 1;
                    let url = seq(&c["env"])
                        .into_iter()
                        .find(|e| e["name"] == "TOLLGATE_REDIS_URL")
                        .unwrap_or_else(|| {
                            panic!("deploy/{o}: --store redis without TOLLGATE_REDIS_URL")
                        });
                    assert!(
                        text(&url["valueFrom"]["secretKeyRef"]["name"])
                            .starts_with("tollgate-redis-"),
                        "deploy/{o}: the URL comes from the tollgate-redis Secret"
                    );
                }
            }
        }
        assert_eq!(redis_users, 1, "deploy/{o}: the replicas share Redis");
    }
}

#[test]
fn manifests_name_only_flags_tollgate_has() {
    let out = output(tollgate().args(["serve", "--help"]));
    let help = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(help.contains("--tls-cert"), "{help}");
    for o in OVERLAYS {
        let mut checked = 0;
        for v in rendered(o).iter().filter(|v| v["kind"] == "Deployment") {
            for c in containers(v) {
                let args = strs(&c["args"]);
                if args.first().map(String::as_str) != Some("serve") {
                    continue;
                }
                for a in args.iter().filter(|a| a.starts_with("--")) {
                    assert!(
                        help.contains(&format!("{a} ")) || help.contains(&format!("{a}\n")),
                        "deploy/{o}: tollgate serve has no {a}"
                    );
                    checked += 1;
                }
            }
        }
        assert!(checked > 5, "deploy/{o}");
    }
}

#[test]
fn envoy_bootstraps_validate() {
    let envoy = std::env::var_os("ENVOY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".tools/envoy/envoy"));
    assert!(
        envoy.is_file(),
        "Envoy not found at {}: run scripts/setup.sh",
        envoy.display()
    );
    let bootstraps: Vec<PathBuf> = files_under(&root().join("deploy"))
        .into_iter()
        .filter(|f| {
            std::fs::read_to_string(f)
                .is_ok_and(|t| t.lines().any(|l| l.starts_with("static_resources:")))
        })
        .collect();
    assert!(bootstraps.len() >= 2, "{bootstraps:?}");
    // The envoy overlay serves one of them.
    let cm = rendered("envoy")
        .iter()
        .find(|v| v["kind"] == "ConfigMap" && text(&v["metadata"]["name"]).starts_with("envoy-"))
        .expect("the envoy overlay's bootstrap ConfigMap");
    let served = text(&cm["data"]["envoy.yaml"]);
    assert!(bootstraps
        .iter()
        .any(|f| std::fs::read_to_string(f).unwrap() == served));
    for f in bootstraps {
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

// ───────────────────────── custom resources ─────────────────────────
//
// No cluster and no CRD files here: the field trees below are written from the published
// API references (cited at each tree). They list every field of the published schema at the
// levels deploy/ uses; subtrees deploy/ does not use are left out, so using one fails here
// until its fields are added from the reference.

/// A field's published type.
enum F {
    Str,
    Int,
    Bool,
    /// Gateway API `Duration`: `^([0-9]{1,5}(h|m|s|ms)){1,4}$`.
    Dur,
    Enum(&'static [&'static str]),
    Obj(&'static [(&'static str, F)]),
    List(&'static F),
    /// String keys to values of one type.
    Map(&'static F),
}
use F::*;

const META: F = Obj(&[
    ("name", Str),
    ("namespace", Str),
    ("labels", Map(&Str)),
    ("annotations", Map(&Str)),
]);

/// Gateway API `LocalPolicyTargetReference`.
const LOCAL_TARGET_REF: F = Obj(&[("group", Str), ("kind", Str), ("name", Str)]);

const EVENTS: F = Enum(&[
    "RequestHeaders",
    "RequestBody",
    "ResponseHeaders",
    "ResponseBody",
    "RequestTrailers",
    "ResponseTrailers",
]);
const BODY_SEND_MODE: F = Enum(&["Streamed", "FullDuplexStreamed"]);

// GKE's Service Extensions, networking.gke.io/v1 (how-to and field list:
// https://cloud.google.com/kubernetes-engine/docs/how-to/configure-gke-service-extensions ;
// published schemas: https://github.com/GoogleCloudPlatform/gke-gateway-api , files
// config/crd/networking.gke.io_gcptrafficextensions.yaml and
// networking.gke.io_gcproutingextensions.yaml, types in apis/networking/v1/).
const GKE_TRAFFIC_BACKEND_REF: F = Obj(&[
    (
        "group",
        Enum(&["", "net.gke.io", "networking.gke.io", "apim.googleapis.com"]),
    ),
    (
        "kind",
        Enum(&[
            "Service",
            "ServiceImport",
            "GCPWasmPlugin",
            "ApigeeBackendService",
        ]),
    ),
    ("name", Str),
    ("port", Int),
]);
const GKE_ROUTING_BACKEND_REF: F = Obj(&[
    ("group", Enum(&[""])),
    ("kind", Enum(&["Service"])),
    ("name", Str),
    ("port", Int),
]);
const GCP_TRAFFIC_EXTENSION: F = Obj(&[
    ("targetRefs", List(&LOCAL_TARGET_REF)),
    (
        "extensionChains",
        List(&Obj(&[
            ("name", Str),
            (
                "matchCondition",
                Obj(&[(
                    "celExpressions",
                    List(&Obj(&[
                        ("celMatcher", Str),
                        ("backendRefs", List(&GKE_TRAFFIC_BACKEND_REF)),
                    ])),
                )]),
            ),
            (
                "extensions",
                List(&Obj(&[
                    ("name", Str),
                    ("backendRef", GKE_TRAFFIC_BACKEND_REF),
                    ("googleAPIServiceName", Str),
                    ("authority", Str),
                    ("supportedEvents", List(&EVENTS)),
                    ("timeout", Dur),
                    ("failOpen", Bool),
                    ("forwardHeaders", List(&Str)),
                    ("metadata", Map(&Str)),
                    ("requestBodySendMode", BODY_SEND_MODE),
                    ("responseBodySendMode", BODY_SEND_MODE),
                    ("observabilityMode", Bool),
                ])),
            ),
        ])),
    ),
]);
const GCP_ROUTING_EXTENSION: F = Obj(&[
    ("targetRefs", List(&LOCAL_TARGET_REF)),
    (
        "extensionChains",
        List(&Obj(&[
            ("name", Str),
            (
                "matchCondition",
                Obj(&[(
                    "celExpressions",
                    List(&Obj(&[
                        ("celMatcher", Str),
                        ("backendRefs", List(&GKE_ROUTING_BACKEND_REF)),
                    ])),
                )]),
            ),
            (
                "extensions",
                List(&Obj(&[
                    ("name", Str),
                    ("backendRef", GKE_ROUTING_BACKEND_REF),
                    ("googleAPIServiceName", Str),
                    ("authority", Str),
                    ("supportedEvents", List(&EVENTS)),
                    ("timeout", Dur),
                    ("failOpen", Bool),
                    ("forwardHeaders", List(&Str)),
                    ("metadata", Map(&Str)),
                    ("requestBodySendMode", BODY_SEND_MODE),
                    ("responseBodySendMode", BODY_SEND_MODE),
                ])),
            ),
        ])),
    ),
]);

// GKE's HealthCheckPolicy, networking.gke.io/v1
// (https://cloud.google.com/kubernetes-engine/docs/how-to/configure-gateway-resources ;
// schema: GoogleCloudPlatform/gke-gateway-api config/crd/networking.gke.io_healthcheckpolicies.yaml).
const PORT_SPEC: F = Enum(&["USE_FIXED_PORT", "USE_NAMED_PORT", "USE_SERVING_PORT"]);
const HTTP_HEALTH_CHECK: F = Obj(&[
    ("host", Str),
    ("port", Int),
    ("portName", Str),
    ("portSpecification", PORT_SPEC),
    ("proxyHeader", Enum(&["NONE", "PROXY_V1"])),
    ("requestPath", Str),
    ("response", Str),
]);
const HEALTH_CHECK_POLICY: F = Obj(&[
    (
        "default",
        Obj(&[
            ("checkIntervalSec", Int),
            ("timeoutSec", Int),
            ("healthyThreshold", Int),
            ("unhealthyThreshold", Int),
            ("logConfig", Obj(&[("enabled", Bool)])),
            (
                "config",
                Obj(&[
                    ("type", Enum(&["TCP", "HTTP", "HTTPS", "HTTP2", "GRPC"])),
                    ("httpHealthCheck", HTTP_HEALTH_CHECK),
                    ("httpsHealthCheck", HTTP_HEALTH_CHECK),
                    ("http2HealthCheck", HTTP_HEALTH_CHECK),
                    (
                        "grpcHealthCheck",
                        Obj(&[
                            ("grpcServiceName", Str),
                            ("port", Int),
                            ("portName", Str),
                            ("portSpecification", PORT_SPEC),
                        ]),
                    ),
                    (
                        "tcpHealthCheck",
                        Obj(&[
                            ("port", Int),
                            ("portName", Str),
                            ("portSpecification", PORT_SPEC),
                            ("proxyHeader", Enum(&["NONE", "PROXY_V1"])),
                            ("request", Str),
                            ("response", Str),
                        ]),
                    ),
                ]),
            ),
        ]),
    ),
    (
        "targetRef",
        Obj(&[
            ("group", Str),
            ("kind", Str),
            ("name", Str),
            ("namespace", Str),
        ]),
    ),
]);

// Envoy Gateway's EnvoyExtensionPolicy, gateway.envoyproxy.io/v1alpha1
// (https://gateway.envoyproxy.io/docs/api/extension_types/#envoyextensionpolicy ; types:
// https://github.com/envoyproxy/gateway api/v1alpha1/envoyextensionypolicy_types.go and
// ext_proc_types.go). Not listed (unused): targetSelectors, wasm, lua, dynamicModule,
// mergeType, backendSettings.
const EG_PROCESSING_OPTIONS: F = Obj(&[
    (
        "body",
        Enum(&[
            "Streamed",
            "Buffered",
            "BufferedPartial",
            "FullDuplexStreamed",
        ]),
    ),
    ("attributes", List(&Str)),
]);
const EG_BACKEND_REF: F = Obj(&[
    ("group", Str),
    ("kind", Str),
    ("name", Str),
    ("namespace", Str),
    ("port", Int),
    ("weight", Int),
    ("fallback", Bool),
]);
const ENVOY_EXTENSION_POLICY: F = Obj(&[
    (
        "targetRef",
        Obj(&[
            ("group", Str),
            ("kind", Str),
            ("name", Str),
            ("sectionName", Str),
        ]),
    ),
    (
        "targetRefs",
        List(&Obj(&[
            ("group", Str),
            ("kind", Str),
            ("name", Str),
            ("sectionName", Str),
        ])),
    ),
    (
        "extProc",
        List(&Obj(&[
            ("backendRefs", List(&EG_BACKEND_REF)),
            ("messageTimeout", Dur),
            ("failOpen", Bool),
            (
                "processingMode",
                Obj(&[
                    ("request", EG_PROCESSING_OPTIONS),
                    ("response", EG_PROCESSING_OPTIONS),
                    ("allowModeOverride", Bool),
                ]),
            ),
            ("shadowMode", Bool),
            (
                "metadata",
                Obj(&[
                    ("accessibleNamespaces", List(&Str)),
                    ("writableNamespaces", List(&Str)),
                ]),
            ),
            ("statusOnError", Int),
        ])),
    ),
]);

// Gateway API's ReferenceGrant, gateway.networking.k8s.io/v1beta1
// (https://gateway-api.sigs.k8s.io/reference/spec/#referencegrant).
const REFERENCE_GRANT: F = Obj(&[
    (
        "from",
        List(&Obj(&[("group", Str), ("kind", Str), ("namespace", Str)])),
    ),
    (
        "to",
        List(&Obj(&[("group", Str), ("kind", Str), ("name", Str)])),
    ),
]);

fn crd_schema(api_version: &str, kind: &str) -> Option<&'static F> {
    Some(match (api_version, kind) {
        ("networking.gke.io/v1", "GCPTrafficExtension") => &GCP_TRAFFIC_EXTENSION,
        ("networking.gke.io/v1", "GCPRoutingExtension") => &GCP_ROUTING_EXTENSION,
        ("networking.gke.io/v1", "HealthCheckPolicy") => &HEALTH_CHECK_POLICY,
        ("gateway.envoyproxy.io/v1alpha1", "EnvoyExtensionPolicy") => &ENVOY_EXTENSION_POLICY,
        ("gateway.networking.k8s.io/v1beta1", "ReferenceGrant") => &REFERENCE_GRANT,
        _ => return None,
    })
}

/// A Gateway API duration in milliseconds.
fn duration_ms(s: &str) -> Option<u64> {
    let (mut total, mut parts, mut rest) = (0u64, 0, s);
    while !rest.is_empty() {
        let digits = rest.chars().take_while(char::is_ascii_digit).count();
        if digits == 0 || digits > 5 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, ms) = if let Some(r) = rest.strip_prefix("ms") {
            (r, 1)
        } else if let Some(r) = rest.strip_prefix('s') {
            (r, 1_000)
        } else if let Some(r) = rest.strip_prefix('m') {
            (r, 60_000)
        } else if let Some(r) = rest.strip_prefix('h') {
            (r, 3_600_000)
        } else {
            return None;
        };
        rest = unit;
        total += n * ms;
        parts += 1;
    }
    (1..=4).contains(&parts).then_some(total)
}

fn check_fields(v: &Value, f: &F, at: &str, errors: &mut Vec<String>) {
    match f {
        Str if v.is_string() => {}
        Int if v.is_u64() || v.is_i64() => {}
        Bool if v.is_bool() => {}
        Dur if v.as_str().and_then(duration_ms).is_some() => {}
        Enum(allowed) if v.as_str().is_some_and(|s| allowed.contains(&s)) => {}
        List(item) if v.is_sequence() => {
            for (i, x) in seq(v).iter().enumerate() {
                check_fields(x, item, &format!("{at}[{i}]"), errors);
            }
        }
        Map(value) if v.is_mapping() => {
            for (k, x) in v.as_mapping().unwrap() {
                check_fields(x, value, &format!("{at}.{}", text(k)), errors);
            }
        }
        Obj(fields) if v.is_mapping() => {
            for (k, x) in v.as_mapping().unwrap() {
                let key = text(k);
                match fields.iter().find(|(name, _)| *name == key) {
                    Some((_, f)) => check_fields(x, f, &format!("{at}.{key}"), errors),
                    None => errors.push(format!("{at}.{key}: not in the published schema")),
                }
            }
        }
        _ => errors.push(format!("{at}: {v:?} is not of the published type")),
    }
}

/// The rules the published schemas state beyond field names (their CEL validations and
/// enums), for the values deploy/ sets.
fn check_rules(v: &Value, errors: &mut Vec<String>) {
    let kind = text(&v["kind"]);
    let gke = matches!(kind, "GCPTrafficExtension" | "GCPRoutingExtension");
    for (ci, chain) in seq(&v["spec"]["extensionChains"]).iter().enumerate() {
        let exts = seq(&chain["extensions"]);
        let max = if kind == "GCPTrafficExtension" { 3 } else { 1 };
        if exts.is_empty() || exts.len() > max {
            errors.push(format!("{kind} chain {ci}: 1 to {max} extensions"));
        }
        for ce in seq(&chain["matchCondition"]["celExpressions"]) {
            if text(&ce["celMatcher"]).len() > 512 {
                errors.push(format!("{kind} chain {ci}: celMatcher over 512 characters"));
            }
        }
        for e in exts {
            let name = format!("{kind} chain {ci} extension {}", text(&e["name"]));
            let events = strs(&e["supportedEvents"]);
            let has = |ev: &str| events.iter().any(|x| x == ev);
            if kind == "GCPTrafficExtension" && events.is_empty() {
                errors.push(format!("{name}: supportedEvents must be set"));
            }
            if let Some(t) = e["timeout"].as_str() {
                if !duration_ms(t).is_some_and(|ms| (10..=10_000).contains(&ms)) {
                    errors.push(format!("{name}: timeout must be 10 ms to 10 s"));
                }
            }
            if e["backendRef"]["kind"] == "Service" {
                if text(&e["authority"]).is_empty() {
                    errors.push(format!("{name}: authority must be set for a Service"));
                }
                if e["backendRef"]["port"].is_null() {
                    errors.push(format!("{name}: port must be set for a Service"));
                }
            }
            if e["backendRef"].is_null() == e["googleAPIServiceName"].is_null() {
                errors.push(format!(
                    "{name}: exactly one of backendRef, googleAPIServiceName"
                ));
            }
            for (mode, body, trailers) in [
                ("requestBodySendMode", "RequestBody", "RequestTrailers"),
                ("responseBodySendMode", "ResponseBody", "ResponseTrailers"),
            ] {
                match e[mode].as_str() {
                    Some("Streamed") if !has(body) => {
                        errors.push(format!("{name}: {mode} Streamed needs {body}"))
                    }
                    Some("FullDuplexStreamed") if !(has(body) && has(trailers)) => errors.push(
                        format!("{name}: {mode} FullDuplexStreamed needs {body}, {trailers}"),
                    ),
                    _ => {}
                }
            }
            if kind == "GCPRoutingExtension"
                && events.iter().any(|e| {
                    !["RequestHeaders", "RequestBody", "RequestTrailers"].contains(&e.as_str())
                })
            {
                errors.push(format!("{name}: a routing extension sees requests only"));
            }
            if let Some(m) = e["metadata"].as_mapping() {
                if m.len() > 16 {
                    errors.push(format!("{name}: more than 16 metadata keys"));
                }
            }
        }
    }
    if gke && seq(&v["spec"]["extensionChains"]).len() > 5 {
        errors.push(format!("{kind}: more than 5 chains"));
    }
    for p in seq(&v["spec"]["extProc"]) {
        if !p["backendRef"].is_null() {
            errors.push("extProc: backendRefs must be used, backendRef is not supported".into());
        }
        let full_duplex = ["request", "response"]
            .iter()
            .any(|d| p["processingMode"][d]["body"] == "FullDuplexStreamed");
        if full_duplex && p["failOpen"] == Value::Bool(true) {
            errors.push("extProc: FullDuplexStreamed needs failOpen false".into());
        }
    }
}

#[test]
fn custom_resources_use_only_published_fields() {
    let mut checked = BTreeSet::new();
    for o in OVERLAYS {
        let docs = rendered(o);
        for v in docs {
            let (api, kind) = (text(&v["apiVersion"]), text(&v["kind"]));
            let Some(schema) = crd_schema(api, kind) else {
                continue;
            };
            let mut errors = Vec::new();
            for (k, x) in v.as_mapping().unwrap() {
                match text(k) {
                    "apiVersion" | "kind" => {}
                    "metadata" => check_fields(x, &META, "metadata", &mut errors),
                    "spec" => check_fields(x, schema, "spec", &mut errors),
                    other => errors.push(format!("{other}: not in the published schema")),
                }
            }
            check_rules(v, &mut errors);
            assert!(
                errors.is_empty(),
                "deploy/{o}: {kind} {}:\n{}",
                text(&v["metadata"]["name"]),
                errors.join("\n")
            );

            // What they point at is there: the tollgate Service and its ports, in the
            // namespace the reference allows.
            let ns = text(&v["metadata"]["namespace"]);
            let mut refs: Vec<(Value, String)> = Vec::new();
            for chain in seq(&v["spec"]["extensionChains"]) {
                for e in seq(&chain["extensions"]) {
                    refs.push((e["backendRef"].clone(), ns.to_owned()));
                }
            }
            for p in seq(&v["spec"]["extProc"]) {
                for r in seq(&p["backendRefs"]) {
                    let rns = r["namespace"].as_str().unwrap_or(ns).to_owned();
                    if rns != ns {
                        let granted = docs.iter().any(|g| {
                            g["kind"] == "ReferenceGrant"
                                && g["metadata"]["namespace"] == rns.as_str()
                                && seq(&g["spec"]["from"])
                                    .iter()
                                    .any(|f| f["kind"] == kind && f["namespace"] == ns)
                                && seq(&g["spec"]["to"]).iter().any(|t| {
                                    t["kind"] == "Service"
                                        && (t["name"].is_null() || t["name"] == r["name"])
                                })
                        });
                        assert!(
                            granted,
                            "deploy/{o}: no ReferenceGrant lets {kind} reach {rns}"
                        );
                    }
                    refs.push((r, rns));
                }
            }
            if kind == "HealthCheckPolicy" {
                let t = &v["spec"]["targetRef"];
                let tns = t["namespace"].as_str().unwrap_or(ns);
                assert!(
                    docs.iter().any(|s| s["kind"] == "Service"
                        && s["metadata"]["name"] == t["name"]
                        && s["metadata"]["namespace"] == tns),
                    "deploy/{o}: HealthCheckPolicy targets no rendered Service"
                );
                let port = v["spec"]["default"]["config"]["httpHealthCheck"]["port"]
                    .as_u64()
                    .expect("an HTTP health check port");
                let path = text(&v["spec"]["default"]["config"]["httpHealthCheck"]["requestPath"]);
                assert_eq!(path, "/readyz", "deploy/{o}");
                let c = tollgate_container(o);
                assert!(
                    seq(&c["ports"])
                        .iter()
                        .any(|p| p["containerPort"].as_u64() == Some(port)),
                    "deploy/{o}: health checks go to port {port}, which tollgate does not serve"
                );
                let args = strs(&c["args"]);
                assert!(
                    arg_value(&args, "--metrics-addr")
                        .is_some_and(|a| a.ends_with(&format!(":{port}"))),
                    "deploy/{o}: /readyz is not on port {port}"
                );
                let np = find(docs, "NetworkPolicy", "tollgate").unwrap();
                assert!(
                    seq(&np["spec"]["ingress"])
                        .iter()
                        .any(|r| ports(r).contains(&port)
                            && GOOGLE_LB_RANGES.iter().all(|g| seq(&r["from"])
                                .iter()
                                .any(|p| p["ipBlock"]["cidr"] == *g))),
                    "deploy/{o}: the NetworkPolicy keeps the health checkers from port {port}"
                );
            }
            for (r, rns) in refs {
                let svc = docs
                    .iter()
                    .find(|s| {
                        s["kind"] == "Service"
                            && s["metadata"]["name"] == r["name"]
                            && s["metadata"]["namespace"] == rns.as_str()
                    })
                    .unwrap_or_else(|| {
                        panic!("deploy/{o}: {kind} calls a Service not rendered: {r:?}")
                    });
                assert!(
                    seq(&svc["spec"]["ports"])
                        .iter()
                        .any(|p| p["port"] == r["port"] && p["targetPort"] == "grpc"),
                    "deploy/{o}: {kind} calls port {:?}, not the Service's grpc port",
                    r["port"]
                );
            }
            checked.insert(kind.to_owned());
        }
    }
    assert_eq!(
        checked,
        BTreeSet::from(
            [
                "EnvoyExtensionPolicy",
                "GCPRoutingExtension",
                "GCPTrafficExtension",
                "HealthCheckPolicy",
                "ReferenceGrant",
            ]
            .map(str::to_owned)
        )
    );
}

#[test]
fn the_field_checker_refuses_what_the_schemas_refuse() {
    // The checker itself: an unknown field, a wrong enum value, a bad duration, a broken rule.
    let ext = |extra: &str| -> Value {
        yaml_docs(
            &format!(
                "apiVersion: networking.gke.io/v1\nkind: GCPTrafficExtension\nmetadata: {{name: t}}\n\
                 spec:\n  targetRefs: [{{group: gateway.networking.k8s.io, kind: Gateway, name: g}}]\n  \
                 extensionChains:\n  - name: c\n    extensions:\n    - name: e\n      authority: a\n      \
                 backendRef: {{group: '', kind: Service, name: s, port: 1}}\n{extra}"
            ),
            "fixture",
        )
        .remove(0)
    };
    let errors = |v: &Value| {
        let mut e = Vec::new();
        check_fields(&v["spec"], &GCP_TRAFFIC_EXTENSION, "spec", &mut e);
        check_rules(v, &mut e);
        e
    };
    assert!(errors(&ext(
        "      supportedEvents: [RequestHeaders]\n      timeout: 1s\n"
    ))
    .is_empty());
    for (bad, says) in [
        ("      supportedEvents: [RequestHeaders]\n      failClosed: true\n", "failClosed"),
        ("      supportedEvents: [RequestHead]\n", "supportedEvents"),
        ("      supportedEvents: [RequestHeaders]\n      timeout: 20s\n", "timeout"),
        ("      supportedEvents: [RequestHeaders]\n      timeout: 1.5s\n", "timeout"),
        ("      timeout: 1s\n", "supportedEvents must be set"),
        (
            "      supportedEvents: [RequestHeaders, RequestBody]\n      requestBodySendMode: FullDuplexStreamed\n",
            "RequestTrailers",
        ),
    ] {
        let e = errors(&ext(bad));
        assert!(e.iter().any(|e| e.contains(says)), "{bad}: {e:?}");
    }
}

// ───────────────────────────── the image ─────────────────────────────

/// One Dockerfile instruction: its keyword (upper case) and the rest, continuation lines
/// joined.
struct Instruction {
    cmd: String,
    args: String,
}

/// The Dockerfile's stages, each a list of instructions (the FROM first).
fn dockerfile() -> Vec<Vec<Instruction>> {
    let text = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let mut stages: Vec<Vec<Instruction>> = Vec::new();
    let mut pending = String::new();
    for line in text.lines() {
        let t = line.trim();
        if pending.is_empty() && (t.is_empty() || t.starts_with('#')) {
            continue;
        }
        if let Some(cont) = t.strip_suffix('\\') {
            pending.push_str(cont);
            pending.push(' ');
            continue;
        }
        pending.push_str(t);
        let (cmd, args) = pending
            .split_once(char::is_whitespace)
            .unwrap_or((&pending, ""));
        let i = Instruction {
            cmd: cmd.to_ascii_uppercase(),
            args: args.trim().to_owned(),
        };
        if i.cmd == "FROM" {
            stages.push(Vec::new());
        }
        stages.last_mut().expect("FROM first").push(i);
        pending.clear();
    }
    stages
}

/// A JSON-array (exec form) instruction's arguments.
fn exec_form(i: &Instruction) -> Vec<String> {
    serde_json::from_str(&i.args).unwrap_or_else(|_| panic!("{} is not in exec form", i.cmd))
}

/// The libraries distroless `cc` (Debian 12) has: glibc's, libgcc_s and libstdc++.
const DISTROLESS_CC_LIBS: [&str; 9] = [
    "ld-linux-x86-64.so.2",
    "libc.so.6",
    "libm.so.6",
    "libpthread.so.0",
    "libdl.so.2",
    "librt.so.1",
    "libresolv.so.2",
    "libgcc_s.so.1",
    "libstdc++.so.6",
];

#[test]
fn the_dockerfile_passes_hadolint_and_the_image_rules() {
    let out = Command::new(venv_tool("hadolint"))
        .args(["--no-color", "--failure-threshold", "info"])
        .arg(root().join("Dockerfile"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "hadolint:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let stages = dockerfile();
    let all = || stages.iter().flatten();
    // Probes cover health: a HEALTHCHECK would only duplicate them (and needs a shell
    // or a client in the image).
    assert!(!all().any(|i| i.cmd == "HEALTHCHECK"), "no HEALTHCHECK");
    // Another change removes build.rs: the build takes whatever .dockerignore admits.
    assert!(
        !all().any(|i| (i.cmd == "COPY" || i.cmd == "ADD") && i.args.contains("build.rs")),
        "the Dockerfile must not name build.rs"
    );
    let runtime = stages.last().unwrap();
    let from = &runtime[0].args;
    assert!(
        from.starts_with("gcr.io/distroless/cc-debian12"),
        "the runtime is distroless cc (glibc and libgcc_s for the binary): {from}"
    );
    // The build stage's Debian matches the runtime's, so glibc symbols resolve there.
    assert!(
        stages[0][0].args.contains("bookworm"),
        "{}",
        stages[0][0].args
    );

    // What the binary links is in the runtime image (the same link line in every profile).
    let readelf = Command::new("readelf")
        .args(["-d", env!("CARGO_BIN_EXE_tollgate")])
        .output()
        .expect("readelf (binutils)");
    let needed: Vec<String> = String::from_utf8_lossy(&readelf.stdout)
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| Some(l.split_once('[')?.1.trim_end_matches(']').to_owned()))
        .collect();
    assert!(needed.iter().any(|l| l == "libc.so.6"), "{needed:?}");
    for lib in &needed {
        assert!(
            DISTROLESS_CC_LIBS.contains(&lib.as_str()),
            "the binary needs {lib}, which distroless cc lacks"
        );
    }

    // Non-root, with its data directory a volume it owns, and tollgate as the entry point.
    let (uid, _) = image_user();
    assert!(uid != 0, "the image runs as root");
    let env = runtime
        .iter()
        .filter(|i| i.cmd == "ENV")
        .flat_map(|i| {
            i.args
                .split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect::<Vec<_>>();
    let data_dir = env
        .iter()
        .find_map(|e| e.strip_prefix("TOLLGATE_DATA_DIR="))
        .expect("ENV TOLLGATE_DATA_DIR");
    let volumes: Vec<String> = runtime
        .iter()
        .filter(|i| i.cmd == "VOLUME")
        .flat_map(exec_form)
        .collect();
    assert!(volumes.iter().any(|v| v == data_dir), "VOLUME {data_dir}");
    assert!(
        runtime.iter().any(|i| i.cmd == "COPY"
            && i.args.contains(&format!("--chown={uid}"))
            && i.args.ends_with(data_dir)),
        "{data_dir} is owned by the image's user"
    );
    let entry = exec_form(runtime.iter().find(|i| i.cmd == "ENTRYPOINT").unwrap());
    assert!(
        runtime
            .iter()
            .any(|i| i.cmd == "COPY" && i.args.ends_with(&format!(" {}", entry[0]))),
        "ENTRYPOINT {} is the copied binary",
        entry[0]
    );
}

/// The top-level entries `.dockerignore` admits: it must be an allowlist (`*`, then
/// `!name` lines), the only form this test reads.
fn docker_context_entries() -> Vec<String> {
    let text = std::fs::read_to_string(root().join(".dockerignore")).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(
        lines.first(),
        Some(&"*"),
        ".dockerignore starts by excluding everything"
    );
    lines[1..]
        .iter()
        .map(|l| {
            let name = l
                .strip_prefix('!')
                .unwrap_or_else(|| panic!("unsupported line {l}"));
            assert!(
                !name.contains(['/', '*', '?', '[']),
                "unsupported pattern {l}"
            );
            name.to_owned()
        })
        .collect()
}

fn copy_tree(from: &Path, to: &Path) {
    if from.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            copy_tree(&e.path(), &to.join(e.file_name()));
        }
    } else {
        std::fs::copy(from, to).unwrap();
    }
}

/// The build stage's `cargo build` runs here on a context holding only what
/// `.dockerignore` admits, so a file the build needs but the context lacks (or a command
/// that no longer works) fails here rather than in someone's `docker build`. The command
/// runs as written, but with the release profile's optimisation turned off through
/// CARGO_PROFILE_RELEASE_*: an optimised, LTO build of every dependency would add many
/// minutes to CI. Its dependencies build once per target directory (a few minutes in CI);
/// the release profile's own settings are built by `docker build` only. The binary then
/// serves the image's command and environment until ready.
#[test]
fn the_image_build_command_builds_from_the_docker_context() {
    let stages = dockerfile();
    let build = &stages[0];
    // The context reaches the build stage whole.
    let copies: Vec<&str> = build
        .iter()
        .filter(|i| i.cmd == "COPY")
        .map(|i| i.args.as_str())
        .collect();
    assert_eq!(
        copies,
        [". ."],
        "the build stage copies the context (.dockerignore decides)"
    );
    let run = build
        .iter()
        .filter(|i| i.cmd == "RUN")
        .find(|i| i.args.contains("cargo build"))
        .expect("a RUN with cargo build");
    let command: Vec<String> = run
        .args
        .split("&&")
        .map(str::trim)
        .find_map(|part| {
            let words: Vec<&str> = part
                .split_whitespace()
                .filter(|w| !w.starts_with("--mount="))
                .collect();
            (words.first() == Some(&"cargo")).then(|| words.iter().map(|w| w.to_string()).collect())
        })
        .expect("the cargo command");
    assert_eq!(command[1], "build");
    for flag in ["--release", "--locked"] {
        assert!(
            command.contains(&flag.to_owned()),
            "{command:?} lacks {flag}"
        );
    }
    assert_eq!(arg_value(&command, "--bin").as_deref(), Some("tollgate"));
    assert!(
        run.args.contains("target/release/tollgate"),
        "the release binary is kept"
    );

    let ctx = tempfile::tempdir().unwrap();
    let entries = docker_context_entries();
    for e in &entries {
        let from = root().join(e);
        if from.exists() {
            copy_tree(&from, &ctx.path().join(e));
        }
    }
    // What the runtime stage copies from the context is there too.
    for i in stages.last().unwrap().iter().filter(|i| i.cmd == "COPY") {
        if !i.args.starts_with("--from") {
            let src = i.args.split_whitespace().next().unwrap();
            assert!(
                ctx.path().join(src).exists(),
                "COPY {src}: not in the context"
            );
        }
    }

    // The command as written, in a target directory of its own (kept across runs, so only
    // the first run builds the dependencies), with the release profile's optimisation
    // (opt-level 3, thin LTO, debug line tables) turned off through cargo's environment.
    let target = root().join("target/docker-build");
    let mut cargo = Command::new(std::env::var_os("CARGO").unwrap_or("cargo".into()));
    // Not the variables cargo set for this test: build scripts that watch them (ring
    // watches CARGO_MANIFEST_DIR) would rebuild on every change of caller.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_BIN_EXE_")
            || [
                "CARGO_MANIFEST_DIR",
                "CARGO_MANIFEST_PATH",
                "CARGO_CRATE_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "CARGO_RUSTC_CURRENT_DIR",
            ]
            .contains(&k.as_ref())
        {
            cargo.env_remove(k.as_ref());
        }
    }
    let out = cargo
        .args(&command[1..])
        .current_dir(ctx.path())
        .env("CARGO_TARGET_DIR", &target)
        .env("CARGO_PROFILE_RELEASE_OPT_LEVEL", "0")
        .env("CARGO_PROFILE_RELEASE_LTO", "false")
        .env("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "256")
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{command:?} fails in the Docker context ({entries:?}):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The binary the image copies, where the RUN line takes it from.
    let built = target.join("release/tollgate");
    assert!(built.is_file(), "{} was not built", built.display());

    // The image's default command serves the configuration it copies: it is valid.
    let runtime = stages.last().unwrap();
    let cmd = exec_form(runtime.iter().find(|i| i.cmd == "CMD").unwrap());
    let config = arg_value(&cmd, "--config").expect("CMD serve --config DIR");
    let src = runtime
        .iter()
        .filter(|i| i.cmd == "COPY" && !i.args.starts_with("--from"))
        .find_map(|i| i.args.strip_suffix(&format!(" {config}")))
        .unwrap_or_else(|| panic!("nothing copied to {config}"));
    let out = output(
        Command::new(&built)
            .arg("validate")
            .arg(ctx.path().join(src)),
    );
    assert!(
        out.status.success(),
        "the image's configuration ({src}) does not validate:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // And the image's command, with the image's environment, gets ready, writing its store
    // where the volume is (here a temporary directory in its place).
    let data = tempfile::tempdir().unwrap();
    let env: Vec<(String, String)> = runtime
        .iter()
        .filter(|i| i.cmd == "ENV")
        .flat_map(|i| {
            i.args
                .split_whitespace()
                .map(|kv| kv.split_once('=').expect("ENV k=v"))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect::<Vec<_>>()
        })
        .collect();
    let (grpc, admin) = (free_port(), free_port());
    let args: Vec<PathBuf> = cmd
        .iter()
        .map(|a| {
            if *a == config {
                ctx.path().join(src)
            } else {
                PathBuf::from(a)
            }
        })
        .collect();
    let mut serve = Command::new(&built);
    serve
        .args(&args)
        .envs(env.iter().map(|(k, v)| {
            let v = if k == "TOLLGATE_DATA_DIR" {
                data.path().to_string_lossy().into_owned()
            } else {
                v.clone()
            };
            (k.clone(), v)
        }))
        .env("TOLLGATE_GRPC_ADDR", format!("127.0.0.1:{grpc}"))
        .env("TOLLGATE_ADMIN_ADDR", format!("127.0.0.1:{admin}"))
        .current_dir(data.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut child = Killed(serve.spawn().unwrap());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while !get(admin, "/readyz").is_some_and(|r| r.starts_with("HTTP/1.1 200")) {
        assert!(
            child.0.try_wait().unwrap().is_none(),
            "the image's command ({cmd:?}) stopped"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "the image's command never got ready"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        std::fs::read_dir(data.path()).unwrap().next().is_some(),
        "the embedded store is not in TOLLGATE_DATA_DIR"
    );
}

/// An HTTP/1.1 GET on a loopback port: the whole answer, or None when nothing listens.
fn get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut r = String::new();
    s.read_to_string(&mut r).ok()?;
    Some(r)
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
        tollgate()
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
