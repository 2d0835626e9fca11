//! The embedded store: one `redb` database file under the data directory, for a single
//! replica (the default).
//!
//! Layout: the file `<dir>/tollgate.redb` holds two tables, `products` and `apps`, both keyed
//! by object name (`&str`) with the object's JSON (`serde_json`) as the value. Every write is
//! one write transaction, committed with `Durability::Immediate` (an fsync) before the call
//! returns `Ok`, so an acknowledged write survives `kill -9` and power loss. `Write::Create`
//! and `Write::Update` are checked inside that same transaction. redb calls block, so they run
//! on tokio's blocking pool.
//!
//! The change feed carries this process's own writes (one replica owns the file: redb locks
//! it, and a second process opening it gets [`StoreError::Unavailable`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::broadcast;

use super::codec::{self, Stored};
use super::{kvm_name, Change, Contents, Store, StoreError, Write, KVM_KIND};
use crate::consumer::{ApiProduct, App};
use crate::kvm::KvmEntry;
use std::collections::BTreeMap;

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

/// redb's page cache. Reads are rare (the index is built once from a snapshot, then only
/// changed objects are read), so the cache only needs the B-tree's upper pages for writes;
/// redb's default (1 GiB) would keep the whole store in memory twice over. 8 MiB keeps
/// key creations on a 100k-app store as fast as with 32 MiB (benches/consumers-scale.sh).
const CACHE_BYTES: usize = 8 * 1024 * 1024;

type Table = TableDefinition<'static, &'static str, &'static [u8]>;

/// A write transaction whose commit returns only once the data is on disk (redb's
/// default, stated: an acknowledged API write must survive `kill -9`).
fn durable_write(db: &Database, path: &Path) -> Result<redb::WriteTransaction, StoreError> {
    let mut txn = db.begin_write().map_err(|e| fail(path, "begin write", e))?;
    txn.set_durability(Durability::Immediate)
        .map_err(|e| fail(path, "set durability", e))?;
    Ok(txn)
}

pub struct EmbeddedStore {
    db: Arc<Database>,
    path: PathBuf,
    changes: broadcast::Sender<Change>,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl EmbeddedStore {
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
            changes: broadcast::channel(1024).0,
        };
        // Create both tables up front, so readers never meet a missing table.
        let txn = store.db.begin_write().map_err(|e| store.fail("begin", e))?;
        txn.open_table(PRODUCTS)
            .map_err(|e| store.fail("create table products", e))?;
        txn.open_table(APPS)
            .map_err(|e| store.fail("create table apps", e))?;
        txn.open_table(KVMS)
            .map_err(|e| store.fail("create table kvms", e))?;
        txn.commit().map_err(|e| store.fail("commit", e))?;
        Ok(store)
    }

    /// The database, shared with the counter checkpoints (`crate::ratelimit`), which keep
    /// their own table in the same file (redb allows one opener per file).
    pub fn database(&self) -> Arc<Database> {
        self.db.clone()
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

    async fn get<T: Stored>(&self, table: Table, name: &str) -> Result<Option<T>, StoreError> {
        let name = name.to_owned();
        self.blocking(move |db, path| {
            let txn = db.begin_read().map_err(|e| fail(path, "begin read", e))?;
            let t = txn
                .open_table(table)
                .map_err(|e| fail(path, "open table", e))?;
            let value = t
                .get(name.as_str())
                .map_err(|e| fail(path, &format!("read {} `{name}`", T::KIND), e))?;
            value.map(|v| codec::decode(&name, v.value())).transpose()
        })
        .await
    }

    async fn put<T: Stored>(&self, table: Table, value: &T, mode: Write) -> Result<(), StoreError> {
        let json = match mode {
            Write::Create => codec::encode(value)?,
            Write::Update => codec::encode_update(value)?,
        };
        let expected = value.revision();
        let conflict = codec::conflict(value);
        let owned = value.name().to_owned();
        let kind = T::KIND;
        self.blocking(move |db, path| {
            let name = owned.as_str();
            let txn = durable_write(db, path)?;
            {
                let mut t = txn
                    .open_table(table)
                    .map_err(|e| fail(path, "open table", e))?;
                // The revision is checked inside the write transaction, which redb
                // serializes with every other writer.
                let (exists, stale) = match t
                    .get(name)
                    .map_err(|e| fail(path, &format!("read {kind} `{name}`"), e))?
                {
                    Some(v) if mode == Write::Update => {
                        (true, codec::stored_revision(v.value()) != expected)
                    }
                    found => (found.is_some(), false),
                };
                if stale {
                    return Err(conflict);
                }
                match (mode, exists) {
                    // Returning drops, and so aborts, the transaction.
                    (Write::Create, true) => {
                        return Err(StoreError::AlreadyExists {
                            kind,
                            name: name.to_owned(),
                        })
                    }
                    (Write::Update, false) => {
                        return Err(StoreError::NotFound {
                            kind,
                            name: name.to_owned(),
                        })
                    }
                    _ => {}
                }
                t.insert(name, json.as_slice())
                    .map_err(|e| fail(path, &format!("write {kind} `{name}`"), e))?;
            }
            txn.commit()
                .map_err(|e| fail(path, &format!("commit {kind} `{name}`"), e))
        })
        .await
    }

    async fn delete(&self, table: Table, kind: &'static str, name: &str) -> Result<(), StoreError> {
        let owned = name.to_owned();
        self.blocking(move |db, path| {
            let name = owned.as_str();
            let txn = durable_write(db, path)?;
            {
                let mut t = txn
                    .open_table(table)
                    .map_err(|e| fail(path, "open table", e))?;
                let removed = t
                    .remove(name)
                    .map_err(|e| fail(path, &format!("delete {kind} `{name}`"), e))?
                    .is_some();
                if !removed {
                    return Err(StoreError::NotFound {
                        kind,
                        name: name.to_owned(),
                    });
                }
            }
            txn.commit()
                .map_err(|e| fail(path, &format!("commit delete of {kind} `{name}`"), e))
        })
        .await
    }
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

/// Reads a whole table (undecodable entries are logged and skipped, see [`codec::decode_all`]).
fn read_all<T: Stored>(
    txn: &redb::ReadTransaction,
    path: &Path,
    table: Table,
) -> Result<Vec<T>, StoreError> {
    let t = txn
        .open_table(table)
        .map_err(|e| fail(path, "open table", e))?;
    // Decoded entry by entry: holding every entry's guard until the end would pin every
    // page of the table in memory at once (100k apps: ~70 MB more at startup's peak).
    let mut out = Vec::new();
    for entry in t.iter().map_err(|e| fail(path, "scan", e))? {
        let (k, v) = entry.map_err(|e| fail(path, "scan", e))?;
        out.extend(codec::decode_all([(k.value(), v.value())]));
    }
    Ok(out)
}

#[async_trait]
impl Store for EmbeddedStore {
    fn kind(&self) -> &'static str {
        "embedded"
    }

    async fn snapshot(&self) -> Result<Contents, StoreError> {
        self.blocking(|db, path| {
            // One read transaction: products and apps from the same commit.
            let txn = db.begin_read().map_err(|e| fail(path, "begin read", e))?;
            Ok(Contents {
                products: read_all(&txn, path, PRODUCTS)?,
                apps: read_all(&txn, path, APPS)?,
            })
        })
        .await
    }

    async fn get_product(&self, name: &str) -> Result<Option<ApiProduct>, StoreError> {
        self.get(PRODUCTS, name).await
    }

    async fn put_product(&self, product: &ApiProduct, mode: Write) -> Result<(), StoreError> {
        self.put(PRODUCTS, product, mode).await?;
        let _ = self.changes.send(Change::Product(product.name.clone()));
        Ok(())
    }

    async fn delete_product(&self, name: &str) -> Result<(), StoreError> {
        self.delete(PRODUCTS, "product", name).await?;
        let _ = self.changes.send(Change::Product(name.to_owned()));
        Ok(())
    }

    async fn get_app(&self, name: &str) -> Result<Option<App>, StoreError> {
        self.get(APPS, name).await
    }

    async fn put_app(&self, app: &App, mode: Write) -> Result<(), StoreError> {
        self.put(APPS, app, mode).await?;
        let _ = self.changes.send(Change::App(app.name.clone()));
        Ok(())
    }

    async fn delete_app(&self, name: &str) -> Result<(), StoreError> {
        self.delete(APPS, "app", name).await?;
        let _ = self.changes.send(Change::App(name.to_owned()));
        Ok(())
    }

    fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    async fn get_kvm_entry(&self, map: &str, key: &str) -> Result<Option<KvmEntry>, StoreError> {
        let (map, key) = (map.to_owned(), key.to_owned());
        self.blocking(move |db, path| {
            let txn = db.begin_read().map_err(|e| fail(path, "begin read", e))?;
            let t = txn
                .open_table(KVMS)
                .map_err(|e| fail(path, "open table", e))?;
            let id = format!("{map}\0{key}");
            let v = t
                .get(id.as_str())
                .map_err(|e| fail(path, "read kvm entry", e))?;
            v.map(|v| decode_entry(&map, &key, v.value())).transpose()
        })
        .await
    }

    async fn put_kvm_entry(
        &self,
        map: &str,
        key: &str,
        entry: &KvmEntry,
        mode: Option<Write>,
    ) -> Result<(), StoreError> {
        let json = encode_entry(map, key, entry)?;
        let (map, key) = (map.to_owned(), key.to_owned());
        self.blocking(move |db, path| {
            let id = format!("{map}\0{key}");
            let txn = durable_write(db, path)?;
            {
                let mut t = txn
                    .open_table(KVMS)
                    .map_err(|e| fail(path, "open table", e))?;
                let exists = t
                    .get(id.as_str())
                    .map_err(|e| fail(path, "read kvm entry", e))?
                    .is_some();
                match (mode, exists) {
                    (Some(Write::Create), true) => {
                        return Err(StoreError::AlreadyExists {
                            kind: KVM_KIND,
                            name: kvm_name(&map, &key),
                        })
                    }
                    (Some(Write::Update), false) => {
                        return Err(StoreError::NotFound {
                            kind: KVM_KIND,
                            name: kvm_name(&map, &key),
                        })
                    }
                    _ => {}
                }
                t.insert(id.as_str(), json.as_slice())
                    .map_err(|e| fail(path, "write kvm entry", e))?;
            }
            txn.commit().map_err(|e| fail(path, "commit kvm entry", e))
        })
        .await
    }

    async fn delete_kvm_entry(&self, map: &str, key: &str) -> Result<(), StoreError> {
        let (map, key) = (map.to_owned(), key.to_owned());
        self.blocking(move |db, path| {
            let id = format!("{map}\0{key}");
            let txn = durable_write(db, path)?;
            {
                let mut t = txn
                    .open_table(KVMS)
                    .map_err(|e| fail(path, "open table", e))?;
                let removed = t
                    .remove(id.as_str())
                    .map_err(|e| fail(path, "delete kvm entry", e))?
                    .is_some();
                if !removed {
                    return Err(StoreError::NotFound {
                        kind: KVM_KIND,
                        name: kvm_name(&map, &key),
                    });
                }
            }
            txn.commit().map_err(|e| fail(path, "commit kvm delete", e))
        })
        .await
    }

    async fn list_kvm_entries(&self, map: &str) -> Result<BTreeMap<String, KvmEntry>, StoreError> {
        let map = map.to_owned();
        self.blocking(move |db, path| {
            let txn = db.begin_read().map_err(|e| fail(path, "begin read", e))?;
            let t = txn
                .open_table(KVMS)
                .map_err(|e| fail(path, "open table", e))?;
            let (lo, hi) = (format!("{map}\0"), format!("{map}\u{1}"));
            let mut out = BTreeMap::new();
            for row in t
                .range(lo.as_str()..hi.as_str())
                .map_err(|e| fail(path, "scan kvm entries", e))?
            {
                let (k, v) = row.map_err(|e| fail(path, "scan kvm entries", e))?;
                let key = k.value().split_once('\0').map_or("", |(_, k)| k).to_owned();
                match decode_entry(&map, &key, v.value()) {
                    Ok(e) => {
                        out.insert(key, e);
                    }
                    Err(e) => tracing::warn!(error = %e, "skipping an unreadable kvm entry"),
                }
            }
            Ok(out)
        })
        .await
    }
}

pub(super) fn encode_entry(map: &str, key: &str, e: &KvmEntry) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(e).map_err(|err| {
        StoreError::Unavailable(format!(
            "cannot encode kvm entry `{}`: {err}",
            kvm_name(map, key)
        ))
    })
}

pub(super) fn decode_entry(map: &str, key: &str, bytes: &[u8]) -> Result<KvmEntry, StoreError> {
    serde_json::from_slice(bytes).map_err(|err| StoreError::Corrupt {
        kind: KVM_KIND,
        name: kvm_name(map, key),
        message: err.to_string(),
    })
}
