//! Locking shared state.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, taking over a lock poisoned by a panicking thread: every critical section in the
/// coordinator leaves its state consistent, and the panic itself is reported where it happened.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
