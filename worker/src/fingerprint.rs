//! A model's fingerprint: SHA-256 over the names, sizes and contents of the files a model is
//! loaded from (configurations, tokenizer files, weights), so that two workers serving one
//! name can be told apart when they load different models (SECURITY.md: workers serving one
//! model name must carry the same fingerprint).
//!
//! Hashing the weights of a large model takes seconds, so the result is cached beside the model
//! (`.tessera-fingerprint.json` in its directory, `FILE.tessera-fingerprint.json` beside a
//! single file) together with each file's size and modification time; a file that changed
//! makes the cache stale. Where the model's directory is read-only the fingerprint is computed
//! at every start.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use ring::digest::{Context, SHA256};
use serde::{Deserialize, Serialize};

use crate::random_models::full_size;

/// File extensions a model is loaded from; anything else in the directory (a README, sample
/// pictures) does not change the model.
const MODEL_FILES: [&str; 4] = ["json", "txt", "safetensors", "model"];
const CACHE_NAME: &str = ".tessera-fingerprint.json";
/// Changes when the way the fingerprint is computed changes.
const VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
#[error("fingerprinting {path}: {message}")]
pub struct FingerprintError {
    path: PathBuf,
    message: String,
}

fn error(path: &Path, e: impl std::fmt::Display) -> FingerprintError {
    FingerprintError {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// A file as the cache remembers it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Stamp {
    path: String,
    size: u64,
    modified_ns: u128,
}

#[derive(Debug, Serialize, Deserialize)]
struct Cache {
    version: u32,
    files: Vec<Stamp>,
    fingerprint: String,
}

/// The fingerprint of the model at `model` (a diffusers directory, a single checkpoint file,
/// or `synthetic:NAME`), `sha256:HEX`, from the cache when it is current.
pub fn fingerprint(model: &Path) -> Result<String, FingerprintError> {
    if let Some(name) = full_size::synthetic_name(model) {
        // Configs only; the weights are drawn from a fixed seed, so the name says the rest.
        let dir = full_size::config_dir(name).map_err(|e| error(model, e))?;
        let files = stamps(&dir)?;
        return hash(&dir, &files, name.as_bytes());
    }
    let (root, cache) = if model.is_dir() {
        (model.to_path_buf(), model.join(CACHE_NAME))
    } else {
        let mut name = model.as_os_str().to_os_string();
        name.push(".tessera-fingerprint.json");
        (model.to_path_buf(), PathBuf::from(name))
    };
    let files = stamps(&root)?;
    if let Some(cached) = read_cache(&cache, &files) {
        return Ok(cached);
    }
    let fingerprint = hash(&root, &files, b"")?;
    write_cache(&cache, files, &fingerprint);
    Ok(fingerprint)
}

/// The model's files under `root` (or `root` itself when it is a file), sorted by path.
fn stamps(root: &Path) -> Result<Vec<Stamp>, FingerprintError> {
    let mut found = Vec::new();
    if root.is_file() {
        found.push(stamp(root, root)?);
        return Ok(found);
    }
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(|e| error(&dir, e))? {
            let path = entry.map_err(|e| error(&dir, e))?.path();
            let hidden = path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'));
            if hidden {
                continue;
            }
            // Model directories are often links into a download cache: follow them, as the
            // loader does.
            if path.is_dir() {
                stack.push(path);
            } else if path
                .extension()
                .is_some_and(|x| MODEL_FILES.iter().any(|m| x == *m))
            {
                found.push(stamp(root, &path)?);
            }
        }
    }
    found.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(found)
}

fn stamp(root: &Path, path: &Path) -> Result<Stamp, FingerprintError> {
    let meta = std::fs::metadata(path).map_err(|e| error(path, e))?;
    let modified_ns = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let rel = path.strip_prefix(root).unwrap_or(path);
    let name = if rel.as_os_str().is_empty() {
        path.file_name().unwrap_or_default()
    } else {
        rel.as_os_str()
    };
    Ok(Stamp {
        path: name.to_string_lossy().into_owned(),
        size: meta.len(),
        modified_ns,
    })
}

/// SHA-256 over `salt` and, for each file in order, its path, its size and its contents' own
/// SHA-256.
fn hash(root: &Path, files: &[Stamp], salt: &[u8]) -> Result<String, FingerprintError> {
    let mut all = Context::new(&SHA256);
    all.update(salt);
    for f in files {
        let path = if root.is_file() {
            root.to_path_buf()
        } else {
            root.join(&f.path)
        };
        let mut one = Context::new(&SHA256);
        let mut file = std::fs::File::open(&path).map_err(|e| error(&path, e))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buf).map_err(|e| error(&path, e))?;
            if n == 0 {
                break;
            }
            one.update(&buf[..n]);
        }
        all.update(f.path.as_bytes());
        all.update(&[0]);
        all.update(&f.size.to_le_bytes());
        all.update(one.finish().as_ref());
    }
    Ok(format!("sha256:{}", hex(all.finish().as_ref())))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn read_cache(path: &Path, files: &[Stamp]) -> Option<String> {
    let cache: Cache = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    (cache.version == VERSION && cache.files == files).then_some(cache.fingerprint)
}

/// Writes the cache beside the model; a read-only model directory just goes without.
fn write_cache(path: &Path, files: Vec<Stamp>, fingerprint: &str) {
    let cache = Cache {
        version: VERSION,
        files,
        fingerprint: fingerprint.to_string(),
    };
    let Ok(bytes) = serde_json::to_vec_pretty(&cache) else {
        return;
    };
    let mut tmp = path.as_os_str().to_os_string();
    tmp.push(format!(".{}.partial", std::process::id()));
    let written = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        tracing::debug!(
            "not caching the model's fingerprint at {}: {e}",
            path.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tessera-fp-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("unet")).unwrap();
        dir
    }

    #[test]
    fn fingerprints_follow_contents_and_are_cached() {
        let a = scratch("a");
        std::fs::write(a.join("model_index.json"), b"{}").unwrap();
        std::fs::write(a.join("unet/config.json"), b"{\"x\": 1}").unwrap();
        std::fs::write(a.join("unet/w.safetensors"), vec![7u8; 3000]).unwrap();
        std::fs::write(a.join("README.md"), b"notes").unwrap();
        let first = fingerprint(&a).unwrap();
        assert!(
            first.starts_with("sha256:") && first.len() == 7 + 64,
            "{first}"
        );
        assert!(a.join(CACHE_NAME).is_file());
        assert_eq!(fingerprint(&a).unwrap(), first);
        // Notes do not change the model; a copy elsewhere has the same fingerprint.
        std::fs::write(a.join("README.md"), b"other notes").unwrap();
        assert_eq!(fingerprint(&a).unwrap(), first);
        let b = scratch("b");
        for f in ["model_index.json", "unet/config.json", "unet/w.safetensors"] {
            std::fs::copy(a.join(f), b.join(f)).unwrap();
        }
        assert_eq!(fingerprint(&b).unwrap(), first);
        // One weight changed (same size): another fingerprint, the stale cache notwithstanding.
        let mut w = vec![7u8; 3000];
        w[1234] = 8;
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(b.join("unet/w.safetensors"), w).unwrap();
        assert_ne!(fingerprint(&b).unwrap(), first);
        // A single file has its own.
        let single = fingerprint(&a.join("unet/w.safetensors")).unwrap();
        assert_ne!(single, first);
        let _ = std::fs::remove_dir_all(&a);
        let _ = std::fs::remove_dir_all(&b);
    }
}
