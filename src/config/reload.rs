//! The running configuration and its hot reload. Reload is all-or-nothing: the new
//! snapshot replaces the old one atomically (`ArcSwap`), streams keep the snapshot they
//! started with, and a configuration that fails to compile leaves the running one in place.
//!
//! Changes are noticed by a file-system watch on the directory (which sees a Kubernetes
//! ConfigMap's `..data` symlink swap, since that happens inside the directory) and by a
//! periodic content fingerprint, which catches whatever a watch misses; `SIGHUP` forces a
//! reload. The fingerprint covers the files policies refer to (scripts, OpenAPI documents,
//! key files, wherever they are), so editing one reloads at the next periodic check.

use parking_lot::Mutex;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use notify::Watcher;

use super::{
    compile_with_options, fingerprint_with, read_dir, ConfigErrors, LoadOptions, Snapshot,
    SourceFile,
};
use crate::policies::recording_reads;
use crate::services::Services;
use crate::telemetry::METRICS;

/// Where the configuration comes from.
#[derive(Debug, Clone)]
pub enum ConfigSource {
    Dir(PathBuf),
    /// Built into the binary: never reloads.
    Embedded(Vec<SourceFile>),
}

#[derive(Debug)]
pub struct ConfigManager {
    source: ConfigSource,
    services: Services,
    options: LoadOptions,
    current: ArcSwap<Snapshot>,
    generation: AtomicU64,
    /// Fingerprint of the last configuration that failed, with the files it referred to,
    /// so it is reported once.
    last_failed: Mutex<Option<(String, Vec<PathBuf>)>>,
}

fn log_warnings(snap: &Snapshot) {
    for w in &snap.warnings {
        tracing::warn!(location = %w.location, "configuration: {}", w.message);
    }
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn record_success(generation: u64) {
    METRICS
        .config_reloads_total
        .with_label_values(&["success"])
        .inc();
    METRICS.config_synchronized.set(1);
    METRICS.config_last_reload_success.set(now_secs());
    METRICS
        .config_generation
        .set(i64::try_from(generation).unwrap_or(i64::MAX));
}

/// What a reload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadOutcome {
    Unchanged,
    Reloaded,
}

impl ConfigManager {
    /// Loads the first configuration with in-memory services; it must be valid.
    pub fn load(source: ConfigSource) -> Result<Arc<Self>, ConfigErrors> {
        Self::load_with(source, Services::default())
    }

    /// Loads the first configuration; it must be valid. Policies get `services`, and the
    /// file-defined products and apps go to `services.consumers` at every load.
    pub fn load_with(source: ConfigSource, services: Services) -> Result<Arc<Self>, ConfigErrors> {
        Self::load_with_options(source, services, LoadOptions::default())
    }

    /// [`ConfigManager::load_with`], every load judged against `options` (the serving
    /// process's limits).
    pub fn load_with_options(
        source: ConfigSource,
        services: Services,
        options: LoadOptions,
    ) -> Result<Arc<Self>, ConfigErrors> {
        let files = Self::read(&source)?;
        let dir = match &source {
            ConfigSource::Dir(d) => Some(d.as_path()),
            ConfigSource::Embedded(_) => None,
        };
        METRICS.config_last_reload_attempt.set(now_secs());
        let snap = compile_with_options(&files, dir, &services, &options)?;
        log_warnings(&snap);
        services
            .consumers
            .set_file_objects(snap.products.clone(), snap.apps.clone());
        services.kvms.set_files(snap.kvms.clone());
        record_success(1);
        tracing::info!(
            flows = snap.by_name.len(),
            policies = snap.policies.len(),
            "configuration loaded"
        );
        Ok(Arc::new(Self {
            source,
            services,
            options,
            current: ArcSwap::from_pointee(snap),
            generation: AtomicU64::new(1),
            last_failed: Mutex::new(None),
        }))
    }

    fn read(source: &ConfigSource) -> Result<Vec<SourceFile>, ConfigErrors> {
        match source {
            ConfigSource::Dir(d) => read_dir(d),
            ConfigSource::Embedded(f) => Ok(f.clone()),
        }
    }

    /// The running configuration.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    pub fn services(&self) -> &Services {
        &self.services
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    pub fn dir(&self) -> Option<&Path> {
        match &self.source {
            ConfigSource::Dir(d) => Some(d),
            ConfigSource::Embedded(_) => None,
        }
    }

    /// Reloads if the files changed (or always, with `force`). On error the running
    /// configuration stays and the error is returned, logged and counted.
    pub fn reload(&self, force: bool) -> Result<ReloadOutcome, ConfigErrors> {
        let ConfigSource::Dir(dir) = &self.source else {
            return Ok(ReloadOutcome::Unchanged);
        };
        let result = read_dir(dir).and_then(|files| {
            // Files a policy refers to (scripts, specs, keys) count as much as the YAML.
            let current = self.current.load();
            if !force && fingerprint_with(&files, &current.referenced) == current.fingerprint {
                // The files are the running configuration again (a broken edit undone):
                // nothing to load, but the refusal no longer stands.
                self.back_to_running();
                return Ok(None);
            }
            if !force
                && self
                    .last_failed
                    .lock()
                    .as_ref()
                    .is_some_and(|(fp, refs)| fingerprint_with(&files, refs) == *fp)
            {
                return Ok(None);
            }
            METRICS.config_last_reload_attempt.set(now_secs());
            let (result, refs) = recording_reads(|| {
                compile_with_options(&files, Some(dir), &self.services, &self.options)
            });
            result.map(Some).inspect_err(|_| {
                *self.last_failed.lock() = Some((fingerprint_with(&files, &refs), refs));
            })
        });
        match result {
            Ok(None) => {
                if force {
                    tracing::info!("configuration unchanged");
                }
                Ok(ReloadOutcome::Unchanged)
            }
            Ok(Some(snap)) => {
                log_warnings(&snap);
                let flows = snap.by_name.len();
                self.services
                    .consumers
                    .set_file_objects(snap.products.clone(), snap.apps.clone());
                self.services.kvms.set_files(snap.kvms.clone());
                self.current.store(Arc::new(snap));
                let g = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
                *self.last_failed.lock() = None;
                record_success(g);
                tracing::info!(generation = g, flows, "configuration reloaded");
                Ok(ReloadOutcome::Reloaded)
            }
            Err(e) => {
                METRICS
                    .config_reloads_total
                    .with_label_values(&["failure"])
                    .inc();
                METRICS.config_synchronized.set(0);
                tracing::error!(errors = %e, "configuration refused; the running configuration stays");
                Err(e)
            }
        }
    }

    /// Clears a standing refusal once the files match the running configuration again.
    fn back_to_running(&self) {
        let was_failed = self.last_failed.lock().take().is_some();
        if was_failed {
            METRICS.config_synchronized.set(1);
            tracing::info!(
                generation = self.generation(),
                "configuration files are back to the running configuration"
            );
        }
    }

    /// Watches the directory until `shutdown` fires: file events (debounced) and a poll
    /// every `interval` both lead to [`ConfigManager::reload`].
    pub async fn watch(
        self: Arc<Self>,
        interval: Duration,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let Some(dir) = self.dir().map(Path::to_path_buf) else {
            return;
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            // tollgate's own reads of the files are access events: reacting to them would
            // re-read the configuration in a loop.
            if res.is_ok_and(|e| !matches!(e.kind, notify::EventKind::Access(_))) {
                let _ = tx.send(());
            }
        })
        .and_then(|mut w| {
            w.watch(&dir, notify::RecursiveMode::NonRecursive)
                .map(|()| w)
        });
        let _watcher = match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, dir = %dir.display(), "cannot watch the configuration directory; polling only");
                None
            }
        };
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => {}
                Some(()) = rx.recv() => {
                    // Let a burst of events (an editor's save, a symlink swap) settle.
                    tokio::time::sleep(Duration::from_millis(150)).await;
                    while rx.try_recv().is_ok() {}
                }
            }
            let me = self.clone();
            // Reading and compiling touch the disk: keep them off the async workers.
            let _ = tokio::task::spawn_blocking(move || me.reload(false)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::{Direction, Hook, Outcome};
    use crate::vars::Exchange;

    const CONFIG: &str = "apiVersion: tollgate.dev/v1alpha1\nkind: Policy\nmetadata: {name: tag}\nspec: {type: JavaScript, file: scripts/tag.js}\n";

    fn tag(m: &ConfigManager) -> Option<String> {
        let snap = m.snapshot();
        let mut ex = Exchange::default();
        let Hook::Ready(Outcome::Continue) = snap.policies["tag"].run(&mut ex, Direction::Request)
        else {
            panic!("scripts answer at once");
        };
        let set = ex.take_mutations(Direction::Request).set;
        set.into_iter()
            .find(|(n, _, _)| n == "x-tag")
            .map(|(_, v, _)| v)
    }

    /// Editing a file a policy refers to (here a script in a subdirectory, which the
    /// directory watch does not see) reloads, through the periodic fingerprint check.
    #[test]
    fn edits_to_referenced_files_reload() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        std::fs::create_dir(dir.join("scripts")).unwrap();
        std::fs::write(dir.join("config.yaml"), CONFIG).unwrap();
        let script = dir.join("scripts/tag.js");
        std::fs::write(&script, "request.setHeader('x-tag', 'one');").unwrap();
        let m = ConfigManager::load(ConfigSource::Dir(dir.to_path_buf())).unwrap();
        assert_eq!(tag(&m).as_deref(), Some("one"));
        assert!(matches!(m.reload(false), Ok(ReloadOutcome::Unchanged)));

        std::fs::write(&script, "request.setHeader('x-tag', 'two');").unwrap();
        assert!(matches!(m.reload(false), Ok(ReloadOutcome::Reloaded)));
        assert_eq!(tag(&m).as_deref(), Some("two"));
        assert!(matches!(m.reload(false), Ok(ReloadOutcome::Unchanged)));

        // A broken edit is refused once, not recompiled at every check; fixing it reloads.
        std::fs::write(&script, "request.setHeader('x-tag', ").unwrap();
        assert!(m.reload(false).is_err());
        assert!(matches!(m.reload(false), Ok(ReloadOutcome::Unchanged)));
        assert_eq!(tag(&m).as_deref(), Some("two"));
        std::fs::write(&script, "request.setHeader('x-tag', 'three');").unwrap();
        assert!(matches!(m.reload(false), Ok(ReloadOutcome::Reloaded)));
        assert_eq!(tag(&m).as_deref(), Some("three"));
    }
}
