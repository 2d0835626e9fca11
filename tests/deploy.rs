//! The deployment files stay valid: every Envoy bootstrap under `deploy/envoy/` passes the
//! real Envoy's `--mode validate`, every Kubernetes manifest parses, and the tollgate
//! configuration carried in ConfigMaps compiles.

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
