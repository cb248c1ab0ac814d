//! The store: everything a job needs to resume lives under one key prefix (DESIGN.md, "Store").
//! The cluster keeps it in Redis; the embedded `tessera render` keeps it in memory behind the
//! same trait, so both drive one engine.
//!
//! Values are bytes; tensors go through [`crate::codec`]. Keys are built by [`keys`] only, so
//! the layout is written down in one place.

pub mod keys;
mod memory;

pub use memory::MemoryStore;

use candle_core::{Device, Tensor};

use crate::codec;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("{key}: {message}")]
    Codec { key: String, message: String },
    #[error("{0} is missing from the store")]
    Missing(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Byte-valued key store. Implementations must be safe to share between threads: in-process
/// workers read inputs and write outputs concurrently with the coordinator.
pub trait Store: Send + Sync {
    fn put(&self, key: &str, value: &[u8]) -> Result<()>;
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>>;
    fn delete(&self, key: &str) -> Result<()>;
    /// Deletes every key starting with `prefix`; returns how many went.
    fn delete_prefix(&self, prefix: &str) -> Result<usize>;
    /// Keys starting with `prefix`, sorted.
    fn keys(&self, prefix: &str) -> Result<Vec<String>>;
}

pub fn put_tensor(store: &dyn Store, key: &str, t: &Tensor) -> Result<()> {
    let bytes = codec::encode(t).map_err(|e| StoreError::Codec {
        key: key.to_string(),
        message: e.to_string(),
    })?;
    store.put(key, &bytes)
}

/// The tensor at `key`, or [`StoreError::Missing`].
pub fn get_tensor(store: &dyn Store, key: &str, device: &Device) -> Result<Tensor> {
    let bytes = store
        .get(key)?
        .ok_or_else(|| StoreError::Missing(key.to_string()))?;
    codec::decode(&bytes, device).map_err(|e| StoreError::Codec {
        key: key.to_string(),
        message: e.to_string(),
    })
}

pub fn put_json<T: serde::Serialize>(store: &dyn Store, key: &str, value: &T) -> Result<()> {
    let bytes = serde_json::to_vec(value).map_err(|e| StoreError::Codec {
        key: key.to_string(),
        message: e.to_string(),
    })?;
    store.put(key, &bytes)
}

pub fn get_json<T: serde::de::DeserializeOwned>(store: &dyn Store, key: &str) -> Result<T> {
    let bytes = store
        .get(key)?
        .ok_or_else(|| StoreError::Missing(key.to_string()))?;
    serde_json::from_slice(&bytes).map_err(|e| StoreError::Codec {
        key: key.to_string(),
        message: e.to_string(),
    })
}
