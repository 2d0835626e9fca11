//! The embedded backend: one `redb` database file under the data directory, for a single
//! replica (the default).
//!
//! Layout: the file `<dir>/tollgate.redb` holds the tables `products` and `apps` (keyed by
//! object name, the object's JSON as the value), `kvms` (key `<map>\0<key>`, `KvmEntry`
//! JSON) and `counters` (quota counter checkpoints, keyed by the counter's 128-bit key).
//! Every write is one write transaction, committed with `Durability::Immediate` (an fsync)
//! before the call returns `Ok`, so an acknowledged write survives `kill -9` and power loss.
//! Write conditions are checked inside that same transaction. redb calls block, so they run
//! on tokio's blocking pool.
//!
//! The change feed carries this process's own writes (one replica owns the file: redb locks
//! it, and a second process opening it gets [`StoreError::Unavailable`]). Counters decided
//! through [`Backend::count`] and cache entries live in memory, as in the memory backend.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::broadcast;

use super::backend::{Backend, Cond, InProcess, Keep, OwnedTable, Put, Table, TallyAdd, Visit};
use super::memory::judge;
use super::{Change, StoreError};
use crate::counters::{Adjust, Ask, Decision};

/// The database file's name inside the data directory.
pub const DB_FILE: &str = "tollgate.redb";
/// Products by name; values are `ApiProduct` JSON.
pub const PRODUCTS: TableDefinition<'static, &'static str, &'static [u8]> =
    TableDefinition::new("products");
/// Apps by name; values are `App` JSON.
pub const APPS: TableDefinition<'static, &'static str, &'static [u8]> =
    TableDefinition::new("apps");
/// Key-value map entries: key `<map>\0<key>` (neither contains NUL), value `KvmEntry` JSON.
pub const KVMS: TableDefinition<'static, &'static str, &'static [u8]> =
    TableDefinition::new("kvms");
/// Counter checkpoints: key → the encoded window (see `crate::counters::table`).
pub const COUNTERS: TableDefinition<'static, u128, &'static [u8]> =
    TableDefinition::new("counters");

/// Usage tallies: key `<bucket>\0<field>` (neither contains NUL), value the total.
pub const TALLIES: TableDefinition<'static, &'static str, i64> = TableDefinition::new("tallies");
/// When each tally bucket expires: bucket → Unix milliseconds.
pub const TALLY_EXPIRY: TableDefinition<'static, &'static str, i64> =
    TableDefinition::new("tally_expiry");

/// redb's page cache. Reads are rare (the index is built once from a snapshot, then only
/// changed objects are read), so the cache only needs the B-tree's upper pages for writes;
/// redb's default (1 GiB) would keep the whole store in memory twice over. 8 MiB keeps
/// key creations on a 100k-app store as fast as with 32 MiB (benches/consumers-scale.sh).
const CACHE_BYTES: usize = 8 * 1024 * 1024;

type Def = TableDefinition<'static, &'static str, &'static [u8]>;

/// Where a table's records live: the redb table and the key prefix (`<map>\0` for a map).
fn place(table: Table<'_>) -> (Def, String) {
    match table {
        Table::Products => (PRODUCTS, String::new()),
        Table::Apps => (APPS, String::new()),
        Table::Kvm(map) => (KVMS, format!("{map}\0")),
    }
}

/// A write transaction whose commit returns only once the data is on disk (redb's
/// default, stated: an acknowledged API write must survive `kill -9`).
fn durable_write(db: &Database, path: &Path) -> Result<redb::WriteTransaction, StoreError> {
    let mut txn = db.begin_write().map_err(|e| fail(path, "begin write", e))?;
    txn.set_durability(Durability::Immediate)
        .map_err(|e| fail(path, "set durability", e))?;
    Ok(txn)
}

pub struct EmbeddedBackend {
    db: Arc<Database>,
    path: PathBuf,
    local: InProcess,
    changes: broadcast::Sender<Change>,
}

impl std::fmt::Debug for EmbeddedBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedBackend")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl EmbeddedBackend {
    /// Opens (creating when missing) `dir/tollgate.redb`, and creates its tables. This blocks
    /// on file I/O (and, after a crash, on redb's repair): call it before serving, or on the
    /// blocking pool as [`super::open`] does.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError::Unavailable(format!(
                "cannot create data directory {}: {e}",
                dir.display()
            ))
        })?;
        let path = dir.join(DB_FILE);
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            // Verify every page's checksum on open (tens of ms for 100k apps): a file damaged
            // outside redb fails to open with a message instead of panicking later.
            .set_check_integrity_on_open(true)
            .create(&path)
            .map_err(|e| open_error(&path, e))?;
        let store = Self {
            db: Arc::new(db),
            path,
            local: InProcess::default(),
            changes: broadcast::channel(1024).0,
        };
        // Create the tables up front, so readers never meet a missing table.
        let txn = store.db.begin_write().map_err(|e| store.fail("begin", e))?;
        for (name, def) in [("products", PRODUCTS), ("apps", APPS), ("kvms", KVMS)] {
            txn.open_table(def)
                .map_err(|e| store.fail(&format!("create table {name}"), e))?;
        }
        txn.open_table(COUNTERS)
            .map_err(|e| store.fail("create table counters", e))?;
        for (name, def) in [("tallies", TALLIES), ("tally_expiry", TALLY_EXPIRY)] {
            txn.open_table(def)
                .map_err(|e| store.fail(&format!("create table {name}"), e))?;
        }
        txn.commit().map_err(|e| store.fail("commit", e))?;
        Ok(store)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn fail(&self, what: &str, e: impl std::fmt::Display) -> StoreError {
        fail(&self.path, what, e)
    }

    /// Runs `f` on the blocking pool with the database.
    async fn blocking<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Database, &Path) -> Result<T, StoreError> + Send + 'static,
    {
        let db = self.db.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || f(&db, &path))
            .await
            .map_err(|e| StoreError::Unavailable(format!("embedded store task failed: {e}")))?
    }
}

/// Wall-clock Unix milliseconds: tally expiries are kept across restarts.
fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn fail(path: &Path, what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("embedded store {}: {what}: {e}", path.display()))
}

fn open_error(path: &Path, e: redb::DatabaseError) -> StoreError {
    match e {
        redb::DatabaseError::DatabaseAlreadyOpen | redb::DatabaseError::LockProtocolMismatch => {
            StoreError::Unavailable(format!(
                "embedded store {} is already open in another process (is another tollgate \
                 running with the same data directory?)",
                path.display()
            ))
        }
        e => StoreError::Unavailable(format!(
            "cannot open embedded store {}: {e}",
            path.display()
        )),
    }
}

/// Hands a whole table (or a map's range of it) to `visit`.
fn read_all(
    txn: &redb::ReadTransaction,
    path: &Path,
    table: Table<'_>,
    mut visit: impl FnMut(&str, &[u8]),
) -> Result<(), StoreError> {
    let (def, prefix) = place(table);
    let t = txn
        .open_table(def)
        .map_err(|e| fail(path, "open table", e))?;
    // Visited entry by entry: holding every entry's guard until the end would pin every
    // page of the table in memory at once (100k apps: ~70 MB more at startup's peak).
    let mut each = |row: Result<(redb::AccessGuard<&str>, redb::AccessGuard<&[u8]>), _>| {
        let (k, v) = row.map_err(|e| fail(path, "scan", e))?;
        visit(k.value().get(prefix.len()..).unwrap_or_default(), v.value());
        Ok::<_, StoreError>(())
    };
    if prefix.is_empty() {
        for row in t.iter().map_err(|e| fail(path, "scan", e))? {
            each(row)?;
        }
    } else {
        // `<map>\0` .. `<map>\x01`: exactly the map's keys.
        let hi = format!("{}\u{1}", &prefix[..prefix.len() - 1]);
        for row in t
            .range(prefix.as_str()..hi.as_str())
            .map_err(|e| fail(path, "scan", e))?
        {
            each(row)?;
        }
    }
    Ok(())
}

#[async_trait]
impl Backend for EmbeddedBackend {
    fn kind(&self) -> &'static str {
        "embedded"
    }

    async fn get(&self, table: Table<'_>, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let (def, prefix) = place(table);
        let id = format!("{prefix}{key}");
        self.blocking(move |db, path| {
            let txn = db.begin_read().map_err(|e| fail(path, "begin read", e))?;
            let t = txn
                .open_table(def)
                .map_err(|e| fail(path, "open table", e))?;
            let v = t
                .get(id.as_str())
                .map_err(|e| fail(path, &format!("read `{}`", id.replace('\0', "/")), e))?;
            Ok(v.map(|v| v.value().to_vec()))
        })
        .await
    }

    async fn scan(&self, tables: &[Table<'_>], mut visit: Visit) -> Result<(), StoreError> {
        let owned: Vec<OwnedTable> = tables.iter().map(Table::to_owned_table).collect();
        self.blocking(move |db, path| {
            // One read transaction: every table from the same commit.
            let txn = db.begin_read().map_err(|e| fail(path, "begin read", e))?;
            for (i, t) in owned.iter().enumerate() {
                read_all(&txn, path, t.as_table(), |k, v| visit(i, k, v))?;
            }
            Ok(())
        })
        .await
    }

    async fn put(
        &self,
        table: Table<'_>,
        key: &str,
        value: Vec<u8>,
        cond: Cond,
    ) -> Result<Put, StoreError> {
        let (def, prefix) = place(table);
        let id = format!("{prefix}{key}");
        self.blocking(move |db, path| {
            let name = id.replace('\0', "/");
            let txn = durable_write(db, path)?;
            let outcome = {
                let mut t = txn
                    .open_table(def)
                    .map_err(|e| fail(path, "open table", e))?;
                // The condition is checked inside the write transaction, which redb
                // serializes with every other writer.
                let stored = t
                    .get(id.as_str())
                    .map_err(|e| fail(path, &format!("read `{name}`"), e))?;
                let outcome = judge(stored.as_ref().map(|v| v.value()), cond);
                drop(stored);
                if outcome == Put::Written {
                    t.insert(id.as_str(), value.as_slice())
                        .map_err(|e| fail(path, &format!("write `{name}`"), e))?;
                }
                outcome
            };
            if outcome != Put::Written {
                // Dropping the transaction aborts it.
                return Ok(outcome);
            }
            txn.commit()
                .map_err(|e| fail(path, &format!("commit `{name}`"), e))?;
            Ok(outcome)
        })
        .await
    }

    async fn delete(&self, table: Table<'_>, key: &str) -> Result<bool, StoreError> {
        let (def, prefix) = place(table);
        let id = format!("{prefix}{key}");
        self.blocking(move |db, path| {
            let name = id.replace('\0', "/");
            let txn = durable_write(db, path)?;
            let removed = {
                let mut t = txn
                    .open_table(def)
                    .map_err(|e| fail(path, "open table", e))?;
                let removed = t
                    .remove(id.as_str())
                    .map_err(|e| fail(path, &format!("delete `{name}`"), e))?
                    .is_some();
                removed
            };
            if !removed {
                return Ok(false);
            }
            txn.commit()
                .map_err(|e| fail(path, &format!("commit delete of `{name}`"), e))?;
            Ok(true)
        })
        .await
    }

    fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    async fn announce(&self, change: Change) {
        let _ = self.changes.send(change);
    }

    async fn count(&self, asks: &[Ask]) -> Result<Vec<Option<Decision>>, StoreError> {
        Ok(self.local.count(asks))
    }

    async fn adjust(&self, adjusts: &[Adjust]) -> Result<Vec<Option<u64>>, StoreError> {
        Ok(self.local.adjust(adjusts))
    }

    async fn load_counters(&self) -> Result<Vec<(u128, Vec<u8>)>, StoreError> {
        self.blocking(|db, path| {
            let txn = db.begin_read().map_err(|e| fail(path, "begin read", e))?;
            let table = match txn.open_table(COUNTERS) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(e) => return Err(fail(path, "open table counters", e)),
            };
            let mut out = Vec::new();
            for row in table.iter().map_err(|e| fail(path, "scan counters", e))? {
                let (k, v) = row.map_err(|e| fail(path, "scan counters", e))?;
                out.push((k.value(), v.value().to_vec()));
            }
            Ok(out)
        })
        .await
    }

    async fn save_counters(
        &self,
        rows: Vec<(u128, Vec<u8>)>,
        keep: Keep,
    ) -> Result<(), StoreError> {
        self.blocking(move |db, path| {
            let txn = durable_write(db, path)?;
            {
                let mut t = txn
                    .open_table(COUNTERS)
                    .map_err(|e| fail(path, "open table counters", e))?;
                for (k, v) in &rows {
                    t.insert(*k, v.as_slice())
                        .map_err(|e| fail(path, "write counters", e))?;
                }
                t.retain(|_, v| keep(v))
                    .map_err(|e| fail(path, "prune counters", e))?;
            }
            txn.commit().map_err(|e| fail(path, "commit counters", e))
        })
        .await
    }

    async fn cache_get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.local.cache_get(key))
    }

    async fn cache_put(&self, key: &str, value: Vec<u8>, ttl: Duration) -> Result<(), StoreError> {
        self.local.cache_put(key, value, ttl);
        Ok(())
    }

    async fn tally_add(&self, adds: &[TallyAdd], ttl: Duration) -> Result<(), StoreError> {
        let adds = adds.to_vec();
        let now = wall_ms();
        let until = now.saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX));
        self.blocking(move |db, path| {
            let txn = durable_write(db, path)?;
            {
                let mut t = txn
                    .open_table(TALLIES)
                    .map_err(|e| fail(path, "open table tallies", e))?;
                let mut exp = txn
                    .open_table(TALLY_EXPIRY)
                    .map_err(|e| fail(path, "open table tally_expiry", e))?;
                // Expired buckets go first, so a long-running replica's file stays bounded.
                let mut expired = Vec::new();
                for row in exp.iter().map_err(|e| fail(path, "read tally_expiry", e))? {
                    let (b, at) = row.map_err(|e| fail(path, "read tally_expiry", e))?;
                    if at.value() <= now {
                        expired.push(b.value().to_owned());
                    }
                }
                for b in &expired {
                    exp.remove(b.as_str())
                        .map_err(|e| fail(path, "prune tally_expiry", e))?;
                    let (lo, hi) = (format!("{b}\0"), format!("{b}\u{1}"));
                    t.retain_in(lo.as_str()..hi.as_str(), |_, _| false)
                        .map_err(|e| fail(path, "prune tallies", e))?;
                }
                for a in &adds {
                    let key = format!("{}\0{}", a.bucket, a.field);
                    let old = t
                        .get(key.as_str())
                        .map_err(|e| fail(path, "read tallies", e))?
                        .map_or(0, |v| v.value());
                    t.insert(key.as_str(), old.saturating_add(a.delta))
                        .map_err(|e| fail(path, "write tallies", e))?;
                    exp.insert(a.bucket.as_str(), until)
                        .map_err(|e| fail(path, "write tally_expiry", e))?;
                }
            }
            txn.commit().map_err(|e| fail(path, "commit tallies", e))
        })
        .await
    }

    async fn tally_read(&self, buckets: &[String]) -> Result<Vec<Vec<(String, i64)>>, StoreError> {
        let buckets = buckets.to_vec();
        let now = wall_ms();
        self.blocking(move |db, path| {
            let txn = db.begin_read().map_err(|e| fail(path, "begin read", e))?;
            let t = txn
                .open_table(TALLIES)
                .map_err(|e| fail(path, "open table tallies", e))?;
            let exp = txn
                .open_table(TALLY_EXPIRY)
                .map_err(|e| fail(path, "open table tally_expiry", e))?;
            let mut out = Vec::with_capacity(buckets.len());
            for b in &buckets {
                let live = exp
                    .get(b.as_str())
                    .map_err(|e| fail(path, "read tally_expiry", e))?
                    .is_some_and(|at| at.value() > now);
                let mut fields = Vec::new();
                if live {
                    let (lo, hi) = (format!("{b}\0"), format!("{b}\u{1}"));
                    for row in t
                        .range(lo.as_str()..hi.as_str())
                        .map_err(|e| fail(path, "read tallies", e))?
                    {
                        let (k, v) = row.map_err(|e| fail(path, "read tallies", e))?;
                        if let Some((_, field)) = k.value().split_once('\0') {
                            fields.push((field.to_owned(), v.value()));
                        }
                    }
                }
                out.push(fields);
            }
            Ok(out)
        })
        .await
    }
}
