//! An in-memory store: for tests and for `--store memory` (nothing survives a restart).

use std::collections::BTreeMap;
use std::sync::Mutex;

use async_trait::async_trait;
use tokio::sync::broadcast;

use super::codec::{self, Stored};
use super::{kvm_name, Change, Contents, Store, StoreError, Write, KVM_KIND};
use crate::consumer::{ApiProduct, App};
use crate::kvm::KvmEntry;

#[derive(Debug)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
    changes: broadcast::Sender<Change>,
}

#[derive(Debug, Default)]
struct Inner {
    products: BTreeMap<String, ApiProduct>,
    apps: BTreeMap<String, App>,
    kvms: BTreeMap<String, BTreeMap<String, KvmEntry>>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self {
            inner: Mutex::default(),
            changes: broadcast::channel(1024).0,
        }
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Inner>, StoreError> {
        self.inner
            .lock()
            .map_err(|_| StoreError::Unavailable("memory store lock poisoned".into()))
    }
}

fn put<T: Clone>(
    map: &mut BTreeMap<String, T>,
    kind: &'static str,
    name: &str,
    value: &T,
    mode: Write,
) -> Result<(), StoreError> {
    match (mode, map.contains_key(name)) {
        (Write::Create, true) => Err(StoreError::AlreadyExists {
            kind,
            name: name.to_owned(),
        }),
        (Write::Update, false) => Err(StoreError::NotFound {
            kind,
            name: name.to_owned(),
        }),
        _ => {
            map.insert(name.to_owned(), value.clone());
            Ok(())
        }
    }
}

/// A product or app write: as [`put`], and an update must carry the stored revision (the
/// lock makes the check and the write one step).
fn put_object<T: Stored + Clone>(
    map: &mut BTreeMap<String, T>,
    value: &T,
    mode: Write,
) -> Result<(), StoreError> {
    if mode == Write::Update {
        match map.get(value.name()) {
            Some(stored) if stored.revision() != value.revision() => {
                return Err(codec::conflict(value))
            }
            Some(_) => {
                map.insert(
                    value.name().to_owned(),
                    value.with_revision(value.revision().saturating_add(1)),
                );
                return Ok(());
            }
            None => {}
        }
    }
    put(map, T::KIND, value.name(), value, mode)
}

fn delete<T>(
    map: &mut BTreeMap<String, T>,
    kind: &'static str,
    name: &str,
) -> Result<(), StoreError> {
    map.remove(name)
        .map(|_| ())
        .ok_or_else(|| StoreError::NotFound {
            kind,
            name: name.to_owned(),
        })
}

#[async_trait]
impl Store for MemoryStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn snapshot(&self) -> Result<Contents, StoreError> {
        let g = self.lock()?;
        Ok(Contents {
            products: g.products.values().cloned().collect(),
            apps: g.apps.values().cloned().collect(),
        })
    }

    async fn get_product(&self, name: &str) -> Result<Option<ApiProduct>, StoreError> {
        Ok(self.lock()?.products.get(name).cloned())
    }

    async fn put_product(&self, product: &ApiProduct, mode: Write) -> Result<(), StoreError> {
        put_object(&mut self.lock()?.products, product, mode)?;
        let _ = self.changes.send(Change::Product(product.name.clone()));
        Ok(())
    }

    async fn delete_product(&self, name: &str) -> Result<(), StoreError> {
        delete(&mut self.lock()?.products, "product", name)?;
        let _ = self.changes.send(Change::Product(name.to_owned()));
        Ok(())
    }

    async fn get_app(&self, name: &str) -> Result<Option<App>, StoreError> {
        Ok(self.lock()?.apps.get(name).cloned())
    }

    async fn put_app(&self, app: &App, mode: Write) -> Result<(), StoreError> {
        put_object(&mut self.lock()?.apps, app, mode)?;
        let _ = self.changes.send(Change::App(app.name.clone()));
        Ok(())
    }

    async fn delete_app(&self, name: &str) -> Result<(), StoreError> {
        delete(&mut self.lock()?.apps, "app", name)?;
        let _ = self.changes.send(Change::App(name.to_owned()));
        Ok(())
    }

    fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    async fn get_kvm_entry(&self, map: &str, key: &str) -> Result<Option<KvmEntry>, StoreError> {
        Ok(self.lock()?.kvms.get(map).and_then(|m| m.get(key)).cloned())
    }

    async fn put_kvm_entry(
        &self,
        map: &str,
        key: &str,
        entry: &KvmEntry,
        mode: Option<Write>,
    ) -> Result<(), StoreError> {
        let mut g = self.lock()?;
        let m = g.kvms.entry(map.to_owned()).or_default();
        match mode {
            Some(mode) => put(m, KVM_KIND, key, entry, mode).map_err(|e| match e {
                StoreError::AlreadyExists { kind, .. } => StoreError::AlreadyExists {
                    kind,
                    name: kvm_name(map, key),
                },
                StoreError::NotFound { kind, .. } => StoreError::NotFound {
                    kind,
                    name: kvm_name(map, key),
                },
                e => e,
            }),
            None => {
                m.insert(key.to_owned(), entry.clone());
                Ok(())
            }
        }
    }

    async fn delete_kvm_entry(&self, map: &str, key: &str) -> Result<(), StoreError> {
        let mut g = self.lock()?;
        g.kvms
            .get_mut(map)
            .and_then(|m| m.remove(key))
            .map(|_| ())
            .ok_or_else(|| StoreError::NotFound {
                kind: KVM_KIND,
                name: kvm_name(map, key),
            })
    }

    async fn list_kvm_entries(&self, map: &str) -> Result<BTreeMap<String, KvmEntry>, StoreError> {
        Ok(self.lock()?.kvms.get(map).cloned().unwrap_or_default())
    }
}
