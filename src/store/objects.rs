//! The typed façade for objects: API products, apps and key-value map entries, encoded as
//! JSON (see `codec`) into a [`Backend`]'s tables, with the write rules of [`Write`] and
//! the change feed announced after each product or app write.

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::broadcast;

use super::backend::{Backend, Cond, Put, Table};
use super::codec::{self, Stored};
use super::memory::MemoryBackend;
use super::{kvm_name, Change, Contents, StoreError, Write, KVM_KIND};
use crate::consumer::{ApiProduct, App};
use crate::kvm::KvmEntry;

/// Products, apps and key-value entries in a backend. Cheap to clone (one `Arc`).
#[derive(Debug, Clone)]
pub struct Store {
    backend: Arc<dyn Backend>,
}

impl Store {
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        Self { backend }
    }

    /// A fresh in-memory store.
    pub fn memory() -> Self {
        Self::new(Arc::new(MemoryBackend::new()))
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// Backend name for logs and metrics (`memory`, `embedded`, `redis`).
    pub fn kind(&self) -> &'static str {
        self.backend.kind()
    }

    /// Everything the store holds, for building the index. An object that does not decode
    /// is logged and left out (see `codec::decode_all`).
    pub async fn snapshot(&self) -> Result<Contents, StoreError> {
        let found = Arc::new(Mutex::new(Contents::default()));
        let into = found.clone();
        let visit = Box::new(move |table: usize, name: &str, bytes: &[u8]| {
            let mut c = into.lock();
            if table == 0 {
                c.products.extend(codec::decode_or_skip(name, bytes));
            } else {
                c.apps.extend(codec::decode_or_skip(name, bytes));
            }
        });
        self.backend
            .scan(&[Table::Products, Table::Apps], visit)
            .await?;
        let contents = std::mem::take(&mut *found.lock());
        Ok(contents)
    }

    pub async fn get_product(&self, name: &str) -> Result<Option<ApiProduct>, StoreError> {
        self.get(name).await
    }

    pub async fn put_product(&self, product: &ApiProduct, mode: Write) -> Result<(), StoreError> {
        self.put(product, mode).await?;
        self.backend
            .announce(Change::Product(product.name.clone()))
            .await;
        Ok(())
    }

    pub async fn delete_product(&self, name: &str) -> Result<(), StoreError> {
        self.delete::<ApiProduct>(name).await?;
        self.backend
            .announce(Change::Product(name.to_owned()))
            .await;
        Ok(())
    }

    pub async fn get_app(&self, name: &str) -> Result<Option<App>, StoreError> {
        self.get(name).await
    }

    pub async fn put_app(&self, app: &App, mode: Write) -> Result<(), StoreError> {
        self.put(app, mode).await?;
        self.backend.announce(Change::App(app.name.clone())).await;
        Ok(())
    }

    pub async fn delete_app(&self, name: &str) -> Result<(), StoreError> {
        self.delete::<App>(name).await?;
        self.backend.announce(Change::App(name.to_owned())).await;
        Ok(())
    }

    /// Changes made through this and (for shared backends) every other replica.
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.backend.subscribe()
    }

    /// One key-value map entry.
    pub async fn get_kvm_entry(
        &self,
        map: &str,
        key: &str,
    ) -> Result<Option<KvmEntry>, StoreError> {
        self.backend
            .get(Table::Kvm(map), key)
            .await?
            .map(|b| codec::decode_entry(map, key, &b))
            .transpose()
    }

    /// Writes an entry; `mode` `None` writes whether or not it exists. Entries carry no
    /// revision: `Write::Update` only needs the entry to exist.
    pub async fn put_kvm_entry(
        &self,
        map: &str,
        key: &str,
        entry: &KvmEntry,
        mode: Option<Write>,
    ) -> Result<(), StoreError> {
        let json = codec::encode_entry(map, key, entry)?;
        let cond = match mode {
            None => Cond::Any,
            Some(Write::Create) => Cond::Absent,
            Some(Write::Update) => Cond::Present,
        };
        let name = || kvm_name(map, key);
        match self.backend.put(Table::Kvm(map), key, json, cond).await? {
            Put::Written => Ok(()),
            Put::Exists => Err(StoreError::AlreadyExists {
                kind: KVM_KIND,
                name: name(),
            }),
            Put::Missing | Put::Stale => Err(StoreError::NotFound {
                kind: KVM_KIND,
                name: name(),
            }),
        }
    }

    pub async fn delete_kvm_entry(&self, map: &str, key: &str) -> Result<(), StoreError> {
        if self.backend.delete(Table::Kvm(map), key).await? {
            Ok(())
        } else {
            Err(StoreError::NotFound {
                kind: KVM_KIND,
                name: kvm_name(map, key),
            })
        }
    }

    /// Every entry of a map, by key (an entry that does not decode is logged and skipped).
    pub async fn list_kvm_entries(
        &self,
        map: &str,
    ) -> Result<BTreeMap<String, KvmEntry>, StoreError> {
        let found = Arc::new(Mutex::new(BTreeMap::new()));
        let into = found.clone();
        let owned_map = map.to_owned();
        let visit = Box::new(move |_: usize, key: &str, bytes: &[u8]| {
            match codec::decode_entry(&owned_map, key, bytes) {
                Ok(e) => {
                    into.lock().insert(key.to_owned(), e);
                }
                Err(e) => tracing::warn!(error = %e, "skipping an unreadable kvm entry"),
            }
        });
        self.backend.scan(&[Table::Kvm(map)], visit).await?;
        let entries = std::mem::take(&mut *found.lock());
        Ok(entries)
    }

    async fn get<T: Stored>(&self, name: &str) -> Result<Option<T>, StoreError> {
        self.backend
            .get(T::TABLE, name)
            .await?
            .map(|b| codec::decode(name, &b))
            .transpose()
    }

    /// A product or app write. An update must carry the stored revision (the one it was
    /// read at); the stored copy then gets `revision + 1`.
    async fn put<T: Stored>(&self, value: &T, mode: Write) -> Result<(), StoreError> {
        let (json, cond) = match mode {
            Write::Create => (codec::encode(value)?, Cond::Absent),
            Write::Update => (
                codec::encode_update(value)?,
                Cond::Revision(value.revision()),
            ),
        };
        let name = || value.name().to_owned();
        match self.backend.put(T::TABLE, value.name(), json, cond).await? {
            Put::Written => Ok(()),
            Put::Exists => Err(StoreError::AlreadyExists {
                kind: T::KIND,
                name: name(),
            }),
            Put::Missing => Err(StoreError::NotFound {
                kind: T::KIND,
                name: name(),
            }),
            Put::Stale => Err(codec::conflict(value)),
        }
    }

    async fn delete<T: Stored>(&self, name: &str) -> Result<(), StoreError> {
        if self.backend.delete(T::TABLE, name).await? {
            Ok(())
        } else {
            Err(StoreError::NotFound {
                kind: T::KIND,
                name: name.to_owned(),
            })
        }
    }
}
