//! Registers every policy type under `src/policies/`: adding a policy type is one new file
//! there, defining `pub const TYPE: &str` and `pub fn build(..)`.
use std::{env, fs, path::PathBuf};

fn main() {
    let dir =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets it")).join("src/policies");
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut names: Vec<String> = fs::read_dir(&dir)
        .expect("src/policies exists")
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let stem = name.strip_suffix(".rs")?;
            (stem != "mod").then(|| stem.to_owned())
        })
        .collect();
    names.sort();
    let mut out = String::new();
    for n in &names {
        let path = dir.join(format!("{n}.rs"));
        out.push_str(&format!(
            "#[path = {:?}]\npub mod {n};\n",
            path.display().to_string()
        ));
    }
    out.push_str("/// Every implemented policy type and its builder.\npub static REGISTRY: &[(&str, BuildFn)] = &[\n");
    for n in &names {
        out.push_str(&format!("    ({n}::TYPE, {n}::build),\n"));
    }
    out.push_str("];\n");
    let dest =
        PathBuf::from(env::var("OUT_DIR").expect("cargo sets it")).join("policy_registry.rs");
    fs::write(dest, out).expect("OUT_DIR is writable");
}
