//! Reading an Apigee bundle: a directory (`apiproxy/`, `sharedflowbundle/`, or a folder
//! holding one of them) or a zip of one, into memory. Bounded: a bundle is configuration,
//! so files past [`MAX_FILE_BYTES`] or bundles past [`MAX_BUNDLE_BYTES`] / [`MAX_FILES`]
//! are refused rather than read.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use super::ImportError;

const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;
const MAX_BUNDLE_BYTES: u64 = 64 * 1024 * 1024;
const MAX_FILES: usize = 10_000;

/// Which kind of bundle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// `apiproxy/`: an API proxy.
    Apiproxy,
    /// `sharedflowbundle/`: a shared flow.
    Sharedflowbundle,
}

impl Kind {
    pub fn root(self) -> &'static str {
        match self {
            Kind::Apiproxy => "apiproxy",
            Kind::Sharedflowbundle => "sharedflowbundle",
        }
    }
}

/// A bundle's files, keyed by their path below the bundle root (`policies/VA.xml`).
#[derive(Debug)]
pub struct Bundle {
    pub kind: Kind,
    pub files: BTreeMap<String, Vec<u8>>,
}

impl Bundle {
    /// Reads `path`: a zip file, or a directory that is (or holds) the bundle root.
    pub fn read(path: &Path) -> Result<Self, ImportError> {
        let meta = std::fs::metadata(path).map_err(|e| ImportError::Read {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let all = if meta.is_dir() {
            read_tree(path)?
        } else {
            read_zip(path)?
        };
        Self::from_files(path, all)
    }

    /// Picks the bundle root among `all` (paths relative to what was given).
    fn from_files(path: &Path, all: BTreeMap<String, Vec<u8>>) -> Result<Self, ImportError> {
        for kind in [Kind::Apiproxy, Kind::Sharedflowbundle] {
            // `apiproxy/…` at the top, or one folder down (`my-proxy/apiproxy/…`, as a
            // repository's archive holds it).
            let found = all.keys().find_map(|k| {
                let mut parts = k.split('/');
                let first = parts.next()?;
                if first == kind.root() {
                    return Some(format!("{first}/"));
                }
                (parts.next()? == kind.root()).then(|| format!("{first}/{}/", kind.root()))
            });
            if let Some(prefix) = found {
                let files = all
                    .iter()
                    .filter_map(|(k, v)| k.strip_prefix(&prefix).map(|r| (r.to_owned(), v.clone())))
                    .collect();
                return Ok(Self { kind, files });
            }
        }
        // The root itself was given (`.../apiproxy`).
        let last = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        for kind in [Kind::Apiproxy, Kind::Sharedflowbundle] {
            if last == kind.root() {
                return Ok(Self { kind, files: all });
            }
        }
        Err(ImportError::NotABundle(path.to_owned()))
    }

    pub fn text(&self, rel: &str) -> Option<Result<&str, ImportError>> {
        self.files.get(rel).map(|b| {
            std::str::from_utf8(b).map_err(|_| ImportError::Parse {
                file: self.show(rel),
                message: "not UTF-8 text".to_owned(),
            })
        })
    }

    /// `apiproxy/<rel>`, as reports name files.
    pub fn show(&self, rel: &str) -> String {
        format!("{}/{rel}", self.kind.root())
    }

    /// Files directly in `dir/` (not below), sorted.
    pub fn list(&self, dir: &str) -> Vec<&str> {
        let prefix = format!("{dir}/");
        self.files
            .keys()
            .filter_map(|k| k.strip_prefix(&prefix).filter(|r| !r.contains('/')))
            .collect()
    }
}

fn too_big(path: impl Into<PathBuf>, what: &str) -> ImportError {
    ImportError::Read {
        path: path.into(),
        message: what.to_owned(),
    }
}

fn read_tree(root: &Path) -> Result<BTreeMap<String, Vec<u8>>, ImportError> {
    let mut out = BTreeMap::new();
    let mut total = 0u64;
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|e| ImportError::Read {
            path: dir.clone(),
            message: e.to_string(),
        })?;
        for entry in entries.flatten() {
            let p = entry.path();
            let name = entry.file_name();
            if name.to_string_lossy().starts_with('.') {
                continue;
            }
            let Ok(meta) = std::fs::metadata(&p) else {
                continue;
            };
            if meta.is_dir() {
                // Not through a symlink: a link to a parent would loop forever.
                if entry.file_type().is_ok_and(|t| !t.is_symlink()) {
                    stack.push(p);
                }
                continue;
            }
            if meta.len() > MAX_FILE_BYTES {
                return Err(too_big(p, "file larger than 16 MiB"));
            }
            total += meta.len();
            if total > MAX_BUNDLE_BYTES || out.len() >= MAX_FILES {
                return Err(too_big(root, "bundle larger than 64 MiB or 10,000 files"));
            }
            let rel = p
                .strip_prefix(root)
                .map(|r| r.to_string_lossy().replace('\\', "/"))
                .unwrap_or_default();
            let bytes = std::fs::read(&p).map_err(|e| ImportError::Read {
                path: p.clone(),
                message: e.to_string(),
            })?;
            out.insert(rel, bytes);
        }
    }
    Ok(out)
}

fn read_zip(path: &Path) -> Result<BTreeMap<String, Vec<u8>>, ImportError> {
    let bad = |m: String| ImportError::Read {
        path: path.to_owned(),
        message: m,
    };
    let file = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    let mut zip =
        zip::ZipArchive::new(file).map_err(|e| bad(format!("not a readable zip: {e}")))?;
    if zip.len() > MAX_FILES {
        return Err(bad("more than 10,000 entries".to_owned()));
    }
    let mut out = BTreeMap::new();
    let mut total = 0u64;
    for i in 0..zip.len() {
        let mut entry = zip
            .by_index(i)
            .map_err(|e| bad(format!("entry {i}: {e}")))?;
        if entry.is_dir() {
            continue;
        }
        // `enclosed_name` refuses absolute paths and `..` (zip-slip).
        let Some(name) = entry.enclosed_name() else {
            let shown = entry.name().map(|n| n.into_owned()).unwrap_or_default();
            return Err(bad(format!("entry `{shown}` escapes the archive")));
        };
        let rel = name.to_string_lossy().replace('\\', "/");
        // Read at most the limit plus one byte: a lying header cannot make us read more.
        let mut bytes = Vec::new();
        (&mut entry)
            .take(MAX_FILE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| bad(format!("{rel}: {e}")))?;
        if bytes.len() as u64 > MAX_FILE_BYTES {
            return Err(bad(format!("{rel}: larger than 16 MiB")));
        }
        total += bytes.len() as u64;
        if total > MAX_BUNDLE_BYTES {
            return Err(bad("bundle larger than 64 MiB".to_owned()));
        }
        out.insert(rel, bytes);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn zip_of(path: &Path, entries: &[(&str, &str)]) {
        let f = std::fs::File::create(path).expect("create");
        let mut z = zip::ZipWriter::new(f);
        for (name, text) in entries {
            z.start_file(*name, zip::write::SimpleFileOptions::default())
                .expect("entry");
            z.write_all(text.as_bytes()).expect("write");
        }
        z.finish().expect("finish");
    }

    #[test]
    fn a_zip_entry_escaping_the_archive_is_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let p = dir.path().join("evil.zip");
        zip_of(
            &p,
            &[("apiproxy/p.xml", "<APIProxy/>"), ("../../escape.xml", "x")],
        );
        let e = Bundle::read(&p).expect_err("refused");
        assert!(e.to_string().contains("escapes the archive"), "{e}");
    }

    #[test]
    fn the_root_is_found_at_the_top_one_folder_down_or_given_itself() {
        let dir = tempfile::tempdir().expect("dir");
        let p = dir.path().join("nested.zip");
        zip_of(
            &p,
            &[
                ("my-proxy/apiproxy/p.xml", "<APIProxy/>"),
                ("my-proxy/apiproxy/policies/a.xml", "<Quota/>"),
                ("my-proxy/README.md", "x"),
            ],
        );
        let b = Bundle::read(&p).expect("bundle");
        assert_eq!(b.kind, Kind::Apiproxy);
        assert_eq!(
            b.files.keys().cloned().collect::<Vec<_>>(),
            ["p.xml", "policies/a.xml"]
        );
        let root = dir.path().join("x/sharedflowbundle");
        std::fs::create_dir_all(root.join("policies")).expect("mkdir");
        std::fs::write(root.join("policies/a.xml"), "<Quota/>").expect("write");
        // A symlink back to a parent is not followed (it would never end).
        std::os::unix::fs::symlink(dir.path(), root.join("loop")).expect("symlink");
        let b = Bundle::read(&root).expect("the root itself");
        assert_eq!(b.kind, Kind::Sharedflowbundle);
        assert!(b.files.contains_key("policies/a.xml"));
        assert!(Bundle::read(dir.path().join("x/sharedflowbundle/policies").as_path()).is_err());
    }
}
