//! The engine's store, timed: every call's seconds by kind and the bytes read and written.

use std::time::Instant;

use tessera_store::{Result, Store};

use super::coordinator;

/// A [`Store`] that counts the calls made through it into the process's metrics.
pub struct MeteredStore<'a> {
    pub inner: &'a dyn Store,
}

impl MeteredStore<'_> {
    fn timed<T>(&self, op: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let started = Instant::now();
        let out = f();
        let label = super::OpLabel { op: op.into() };
        coordinator()
            .store_seconds
            .get_or_create(&label)
            .observe(started.elapsed().as_secs_f64());
        out
    }

    fn wrote(&self, bytes: usize) {
        coordinator().store_written_bytes.inc_by(bytes as u64);
    }

    fn read(&self, bytes: usize) {
        coordinator().store_read_bytes.inc_by(bytes as u64);
    }
}

impl Store for MeteredStore<'_> {
    fn put(&self, key: &str, value: &[u8]) -> Result<()> {
        self.timed("write", || self.inner.put(key, value))?;
        self.wrote(value.len());
        Ok(())
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let value = self.timed("read", || self.inner.get(key))?;
        self.read(value.as_ref().map_or(0, Vec::len));
        Ok(value)
    }

    fn delete(&self, key: &str) -> Result<()> {
        self.timed("delete", || self.inner.delete(key))
    }

    fn delete_prefix(&self, prefix: &str) -> Result<usize> {
        self.timed("delete", || self.inner.delete_prefix(prefix))
    }

    fn keys(&self, prefix: &str) -> Result<Vec<String>> {
        self.timed("read", || self.inner.keys(prefix))
    }

    fn exists(&self, key: &str) -> Result<bool> {
        self.timed("read", || self.inner.exists(key))
    }

    fn put_guarded(&self, guard: &str, key: &str, value: &[u8]) -> Result<bool> {
        let wrote = self.timed("write", || self.inner.put_guarded(guard, key, value))?;
        if wrote {
            self.wrote(value.len());
        }
        Ok(wrote)
    }

    fn put_many(&self, items: &[(String, Vec<u8>)]) -> Result<()> {
        self.timed("write", || self.inner.put_many(items))?;
        self.wrote(items.iter().map(|(_, v)| v.len()).sum());
        Ok(())
    }

    fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>> {
        let values = self.timed("read", || self.inner.get_many(keys))?;
        self.read(values.iter().flatten().map(Vec::len).sum());
        Ok(values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_store::MemoryStore;

    #[test]
    fn reads_and_writes_are_counted_in_bytes() {
        let memory = MemoryStore::default();
        let store = MeteredStore { inner: &memory };
        let m = coordinator();
        let (read, written) = (m.store_read_bytes.get(), m.store_written_bytes.get());
        store.put("a", &[0; 100]).unwrap();
        store.put_many(&[("b".into(), vec![1; 20])]).unwrap();
        assert_eq!(store.get("a").unwrap().map(|v| v.len()), Some(100));
        assert!(m.store_written_bytes.get() >= written + 120);
        assert!(m.store_read_bytes.get() >= read + 100);
        assert!(m.encode().contains(r#"op="write""#));
    }
}
