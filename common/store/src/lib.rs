//! The store: everything a job needs to resume lives under one key prefix (the layout: `keys.rs`).
//! The cluster keeps it in Redis; the embedded `tessera render` keeps it in memory behind the
//! same trait, so both drive one engine.
//!
//! Values are bytes; tensors go through [`tessera_core::codec`]. Keys are built by [`keys`] only, so
//! the layout is written down in one place.

pub mod keys;
mod memory;
mod redis;
mod redis_cluster;

pub use self::redis::{RedisOptions, RedisStore, WriteBatch};
pub use memory::MemoryStore;
pub use redis_cluster::{is_cluster_url, Connection as RedisConnection};

use candle_core::{Device, Tensor};

use tessera_core::codec;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached (for Redis: after retrying for `RedisOptions::retry_for`).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store answered with an error that retrying cannot fix (wrong type, bad password,
    /// script error).
    #[error("Redis rejected {what}: {message}")]
    Rejected { what: String, message: String },
    #[error("{key}: {message}")]
    Codec { key: String, message: String },
    #[error("{0} is missing from the store")]
    Missing(String),
    /// A fenced write refused: the store's fence key no longer holds this writer's token (a
    /// coordinator that lost its lock to another; see [`RedisStore::fenced`]).
    #[error("write refused by the store's fence: {0}")]
    Fenced(String),
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
    fn exists(&self, key: &str) -> Result<bool>;

    /// Writes `key` only if `guard` exists, as one atomic step; returns whether it wrote.
    ///
    /// A worker's result can arrive after the coordinator merged the step and deleted its
    /// prefix. Guarding the write with the task's input key (deleted with the step) keeps such a
    /// late result from re-creating keys nobody will ever delete.
    fn put_guarded(&self, guard: &str, key: &str, value: &[u8]) -> Result<bool>;

    /// Writes all items at once: a reader sees none or all of them where the store allows
    /// (Redis and memory do).
    fn put_many(&self, items: &[(String, Vec<u8>)]) -> Result<()> {
        for (key, value) in items {
            self.put(key, value)?;
        }
        Ok(())
    }

    /// The values of `keys`, in order, `None` where a key is missing.
    fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>> {
        keys.iter().map(|k| self.get(k)).collect()
    }
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
    decode_tensor(key, store.get(key)?, device)
}

/// The tensors at `keys` in one round trip ([`Store::get_many`]), in order; a missing one is
/// [`StoreError::Missing`].
pub fn get_tensors(store: &dyn Store, keys: &[String], device: &Device) -> Result<Vec<Tensor>> {
    let values = store.get_many(keys)?;
    keys.iter()
        .zip(values)
        .map(|(key, value)| decode_tensor(key, value, device))
        .collect()
}

/// The floating-point tensors at `keys` in one round trip, each as its dims and f32 values,
/// decoded straight from the stored bytes ([`codec::decode_f32`]: the values
/// [`get_tensors`] then `to_dtype(F32)` give, without the tensors in between).
pub fn get_f32s(store: &dyn Store, keys: &[String]) -> Result<Vec<(Vec<usize>, Vec<f32>)>> {
    let values = store.get_many(keys)?;
    keys.iter()
        .zip(values)
        .map(|(key, value)| {
            let bytes = value.ok_or_else(|| StoreError::Missing(key.to_string()))?;
            codec::decode_f32(&bytes).map_err(|e| StoreError::Codec {
                key: key.to_string(),
                message: e.to_string(),
            })
        })
        .collect()
}

/// A stored value read from `key` as a tensor.
fn decode_tensor(key: &str, value: Option<Vec<u8>>, device: &Device) -> Result<Tensor> {
    let bytes = value.ok_or_else(|| StoreError::Missing(key.to_string()))?;
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
