//! The coordinator lock, and this coordinator's place: standby, leading or stopping.
//!
//! One coordinator runs jobs at a time: the one holding `tessera:coordinator:lock{tessera}`. Each
//! acquisition writes a new value, `HOLDER#GENERATION`, and every write the holder makes goes
//! through a store fenced by that value ([`RedisStore::fenced`]): a coordinator paused past
//! the lock's expiry, whose successor has taken the lock, has every write refused, and stops
//! its job threads as soon as it notices. A coordinator waiting for the lock is a standby: it
//! serves health checks as NOT_SERVING and refuses clients and workers with UNAVAILABLE.
//!
//! The lock's refresh also watches the store's epoch key (written once, never deleted): when
//! it is gone, Redis restarted without its data, and the jobs running here were lost with it.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tessera_store::{keys, RedisStore, StoreError};
use tokio::sync::watch;
use tonic::Status;

use super::runner::Runner;

/// The lock's lifetime; refreshed every [`REFRESH`] by its holder.
pub const LOCK_TTL: Duration = Duration::from_secs(5);
const REFRESH: Duration = Duration::from_secs(1);
/// How often the holder checks whether a fenced write was refused (between refreshes).
const FENCE_CHECK: Duration = Duration::from_millis(100);

/// Takes the lock when it is free: a new generation, the value `HOLDER#GENERATION`, and the
/// store's epoch key if there is none yet. Returns the value, or nil when the lock is held.
const ACQUIRE: &str = "if redis.call('EXISTS', KEYS[1]) == 1 then return false end \
     local v = ARGV[1] .. '#' .. redis.call('INCR', KEYS[2]) \
     redis.call('SET', KEYS[1], v, 'PX', ARGV[2]) \
     redis.call('SET', KEYS[3], v, 'NX') \
     return v";

/// Refreshes the lock for its holder ARGV[1] (taking it again if it expired and nobody else
/// took it: then nobody else wrote). `taken:OTHER` when another holds it; `lost-data` when the
/// epoch key is gone (and written anew); else `ok`.
const REFRESH_SCRIPT: &str = "local v = redis.call('GET', KEYS[1]) \
     if v and v ~= ARGV[1] then return 'taken:' .. v end \
     redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) \
     if redis.call('EXISTS', KEYS[2]) == 0 then \
       redis.call('SET', KEYS[2], ARGV[1]) \
       return 'lost-data' \
     end \
     return 'ok'";

const RELEASE: &str =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0";

fn ttl_ms() -> u64 {
    LOCK_TTL.as_millis() as u64
}

/// Waits until this coordinator holds the lock; returns its token (the fence).
pub async fn acquire(store: &RedisStore, holder: &str) -> Result<String, StoreError> {
    let script = redis::Script::new(ACQUIRE);
    let mut told = false;
    loop {
        let got: Option<String> = store
            .with_retry("coordinator lock", |mut c| {
                let mut call = script.key(keys::COORDINATOR_LOCK);
                call.key(keys::COORDINATOR_GENERATION)
                    .key(keys::STORE_EPOCH)
                    .arg(holder)
                    .arg(ttl_ms());
                async move { call.invoke_async(&mut c).await }
            })
            .await?;
        if let Some(token) = got {
            return Ok(token);
        }
        if !told {
            tessera_worker::status!(
                "standing by: another coordinator holds the lock in Redis; this one takes over \
                 within {} s of it stopping (health: NOT_SERVING until then)",
                LOCK_TTL.as_secs()
            );
            told = true;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Why this coordinator stopped holding the lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockLost {
    /// Another coordinator holds it now.
    TakenBy(String),
    /// One of this coordinator's writes was refused by the fence.
    Fenced,
}

impl std::fmt::Display for LockLost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TakenBy(other) => write!(f, "another coordinator ({other}) holds the lock"),
            Self::Fenced => f.write_str("the store refused a write: the lock is no longer ours"),
        }
    }
}

/// Keeps the lock until it is lost: refreshed every second, and checked every tenth of one for
/// a refused write of `fenced` (the store this coordinator writes through). `store_lost` is
/// called when Redis turns out to have lost its data.
pub async fn hold(fenced: &RedisStore, token: &str, store_lost: impl Fn()) -> LockLost {
    let script = redis::Script::new(REFRESH_SCRIPT);
    let mut since_refresh = Duration::ZERO;
    loop {
        tokio::time::sleep(FENCE_CHECK).await;
        if fenced.fence_lost() {
            return LockLost::Fenced;
        }
        since_refresh += FENCE_CHECK;
        if since_refresh < REFRESH {
            continue;
        }
        since_refresh = Duration::ZERO;
        let answer: Result<String, StoreError> = fenced
            .with_retry("coordinator lock", |mut c| {
                let mut call = script.key(keys::COORDINATOR_LOCK);
                call.key(keys::STORE_EPOCH).arg(token).arg(ttl_ms());
                async move { call.invoke_async(&mut c).await }
            })
            .await;
        match answer.as_deref() {
            Ok("ok") => {}
            Ok("lost-data") => store_lost(),
            Ok(other) => {
                let holder = other.strip_prefix("taken:").unwrap_or(other);
                return LockLost::TakenBy(holder.to_string());
            }
            Err(e) => tracing::warn!("refreshing the coordinator lock: {e}"),
        }
    }
}

/// Gives the lock up on a clean shutdown, so a successor need not wait for it to expire.
pub async fn release(store: &RedisStore, token: &str) {
    let script = redis::Script::new(RELEASE);
    let released: Result<i64, _> = store
        .with_retry("coordinator lock", |mut c| {
            let mut call = script.key(keys::COORDINATOR_LOCK);
            call.arg(token);
            async move { call.invoke_async(&mut c).await }
        })
        .await;
    if let Err(e) = released {
        tracing::warn!("releasing the coordinator lock: {e}");
    }
}

/// This coordinator's place: a standby until it holds the lock, then leading (with its
/// runner), then stopping. The services ask it before they do anything.
pub struct Leadership {
    runner: OnceLock<Arc<Runner>>,
    stopping: watch::Sender<bool>,
}

impl Leadership {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            runner: OnceLock::new(),
            stopping: watch::channel(false).0,
        })
    }

    /// This coordinator holds the lock and runs jobs with `runner`.
    pub fn lead(&self, runner: Arc<Runner>) {
        let _ = self.runner.set(runner);
    }

    /// This coordinator is stopping: the services refuse new work and end their streams.
    pub fn stop(&self) {
        self.stopping.send_replace(true);
    }

    pub fn is_stopping(&self) -> bool {
        *self.stopping.borrow()
    }

    /// Resolves once [`Leadership::stop`] was called.
    pub async fn stopped(&self) {
        let mut rx = self.stopping.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// The runner, when this coordinator leads and is not stopping; else UNAVAILABLE saying
    /// why, which clients retry.
    pub fn runner(&self) -> Result<&Arc<Runner>, Status> {
        if self.is_stopping() {
            return Err(Status::unavailable(
                "this coordinator is shutting down; its jobs resume on the next one",
            ));
        }
        self.runner.get().ok_or_else(|| {
            Status::unavailable(
                "this coordinator is a standby: another coordinator holds the lock in Redis \
                 (it takes over when that one stops)",
            )
        })
    }
}
