//! The in-memory store of embedded renders and unit tests.

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::{Result, Store};

/// A `BTreeMap` behind a mutex: prefix scans come out sorted, as Redis' SCAN results are
/// sorted by the callers that need an order.
#[derive(Debug, Default)]
pub struct MemoryStore {
    map: Mutex<BTreeMap<String, Vec<u8>>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Total bytes held (values only), for memory reports.
    pub fn bytes(&self) -> usize {
        self.lock().values().map(Vec::len).sum()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Vec<u8>>> {
        // A panic while holding the lock cannot leave a half-written entry (inserts are
        // single operations), so a poisoned map is still consistent.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Store for MemoryStore {
    fn put(&self, key: &str, value: &[u8]) -> Result<()> {
        self.lock().insert(key.to_string(), value.to_vec());
        Ok(())
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.lock().get(key).cloned())
    }

    fn delete(&self, key: &str) -> Result<()> {
        self.lock().remove(key);
        Ok(())
    }

    fn delete_prefix(&self, prefix: &str) -> Result<usize> {
        let mut map = self.lock();
        let doomed: Vec<String> = map
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, _)| k.clone())
            .collect();
        for k in &doomed {
            map.remove(k);
        }
        Ok(doomed.len())
    }

    fn keys(&self, prefix: &str) -> Result<Vec<String>> {
        Ok(self
            .lock()
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, _)| k.clone())
            .collect())
    }

    fn exists(&self, key: &str) -> Result<bool> {
        Ok(self.lock().contains_key(key))
    }

    fn put_guarded(&self, guard: &str, key: &str, value: &[u8]) -> Result<bool> {
        let mut map = self.lock();
        if !map.contains_key(guard) {
            return Ok(false);
        }
        map.insert(key.to_string(), value.to_vec());
        Ok(true)
    }

    fn put_many(&self, items: &[(String, Vec<u8>)]) -> Result<()> {
        let mut map = self.lock();
        for (key, value) in items {
            map.insert(key.clone(), value.clone());
        }
        Ok(())
    }

    fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>> {
        let map = self.lock();
        Ok(keys.iter().map(|k| map.get(k).cloned()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{get_tensor, get_tensors, put_tensor, StoreError};
    use candle_core::{Device, Tensor};

    #[test]
    fn put_get_delete_and_prefixes() -> Result<()> {
        let s = MemoryStore::new();
        s.put("job:a:x", b"1")?;
        s.put("job:a:y", b"2")?;
        s.put("job:b:x", b"3")?;
        assert_eq!(s.get("job:a:y")?, Some(b"2".to_vec()));
        assert_eq!(s.keys("job:a:")?, vec!["job:a:x", "job:a:y"]);
        assert_eq!(s.delete_prefix("job:a:")?, 2);
        assert_eq!(s.keys("job:")?, vec!["job:b:x"]);
        s.delete("job:b:x")?;
        assert_eq!(s.get("job:b:x")?, None);
        Ok(())
    }

    #[test]
    fn guarded_writes_need_the_guard() -> Result<()> {
        let s = MemoryStore::new();
        assert!(!s.put_guarded("in", "out", b"late")?);
        assert!(!s.exists("out")?);
        s.put("in", b"x")?;
        assert!(s.put_guarded("in", "out", b"1")?);
        assert_eq!(s.get("out")?, Some(b"1".to_vec()));
        Ok(())
    }

    #[test]
    fn many_at_once() -> Result<()> {
        let s = MemoryStore::new();
        s.put_many(&[("a".into(), b"1".to_vec()), ("b".into(), b"2".to_vec())])?;
        let got = s.get_many(&["b".into(), "nope".into(), "a".into()])?;
        assert_eq!(got, vec![Some(b"2".to_vec()), None, Some(b"1".to_vec())]);
        Ok(())
    }

    #[test]
    fn tensors_round_trip_and_missing_keys_are_named() {
        let s = MemoryStore::new();
        let t = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap();
        put_tensor(&s, "k", &t).unwrap();
        let back = get_tensor(&s, "k", &Device::Cpu).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), t.to_vec2::<f32>().unwrap());
        match get_tensor(&s, "absent", &Device::Cpu) {
            Err(StoreError::Missing(k)) => assert_eq!(k, "absent"),
            other => panic!("expected Missing, got {other:?}"),
        }
        let u = Tensor::new(&[5f32], &Device::Cpu).unwrap();
        put_tensor(&s, "u", &u).unwrap();
        let both = get_tensors(&s, &["u".into(), "k".into()], &Device::Cpu).unwrap();
        assert_eq!(both[0].to_vec1::<f32>().unwrap(), vec![5.0]);
        assert_eq!(both[1].dims(), &[2, 2]);
        match get_tensors(&s, &["k".into(), "gone".into()], &Device::Cpu) {
            Err(StoreError::Missing(k)) => assert_eq!(k, "gone"),
            other => panic!("expected Missing, got {other:?}"),
        }
    }
}
