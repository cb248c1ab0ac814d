//! Who is in the cluster: workers announce themselves with heartbeat keys in Redis; the
//! coordinator reads them twice a second, so a join or a loss shows within seconds. Also the
//! coordinator lock, which keeps a second coordinator from running the same jobs.

use std::time::Duration;

use prost::Message;
use tessera_proto::v1::WorkerDescription;
use tessera_store::{keys, RedisStore, StoreError};

use super::pool::Pool;

/// How often membership is read.
pub const POLL: Duration = Duration::from_millis(500);
/// The coordinator lock's lifetime; refreshed every second by its holder.
const LOCK_TTL_MS: u64 = 5000;

/// The live workers' descriptions.
pub async fn live_workers(store: &RedisStore) -> Result<Vec<WorkerDescription>, StoreError> {
    let names = store.keys_async(keys::WORKERS_PREFIX).await?;
    let values = store.get_many_async(&names).await?;
    let mut out = Vec::with_capacity(values.len());
    for (name, value) in names.iter().zip(values) {
        let Some(bytes) = value else { continue };
        match WorkerDescription::decode(bytes.as_slice()) {
            Ok(d) => out.push(d),
            Err(e) => tracing::warn!(key = %name, "unreadable worker description: {e}"),
        }
    }
    Ok(out)
}

/// Keeps the pool's membership current, forever. While Redis is away the last known
/// membership stands (the calls themselves tell whether workers are alive).
pub async fn follow(store: RedisStore, pool: Pool) {
    loop {
        match live_workers(&store).await {
            Ok(live) => pool.update_members(live),
            Err(e) => tracing::warn!("reading membership: {e}"),
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until this coordinator holds the lock.
pub async fn acquire_lock(store: &RedisStore, holder: &str) -> Result<(), StoreError> {
    let mut told = false;
    loop {
        let h = holder.to_string();
        let got: bool = store
            .with_retry("coordinator lock", |mut c| {
                let h = h.clone();
                async move {
                    let r: Option<String> = redis::cmd("SET")
                        .arg(keys::COORDINATOR_LOCK)
                        .arg(&h)
                        .arg("NX")
                        .arg("PX")
                        .arg(LOCK_TTL_MS)
                        .query_async(&mut c)
                        .await?;
                    Ok(r.is_some())
                }
            })
            .await?;
        if got {
            return Ok(());
        }
        if !told {
            eprintln!(
                "another coordinator holds the lock in Redis; waiting for it to stop (at most {} s after it dies)",
                LOCK_TTL_MS / 1000
            );
            told = true;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Runs a lock script on the lock key with the holder and the TTL as arguments.
async fn lock_script(
    store: &RedisStore,
    script: &redis::Script,
    holder: &str,
) -> Result<i64, StoreError> {
    store
        .with_retry("coordinator lock", |mut c| {
            let mut call = script.key(keys::COORDINATOR_LOCK);
            call.arg(holder).arg(LOCK_TTL_MS);
            async move { call.invoke_async(&mut c).await }
        })
        .await
}

/// Refreshes the lock every second; returns if another coordinator took it over.
pub async fn hold_lock(store: RedisStore, holder: String) {
    let script = redis::Script::new(
        "if redis.call('GET', KEYS[1]) == ARGV[1] then \
           return redis.call('PEXPIRE', KEYS[1], ARGV[2]) \
         elseif redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then \
           return 1 \
         else return 0 end",
    );
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        match lock_script(&store, &script, &holder).await {
            Ok(0) => {
                tracing::error!("another coordinator took the lock over; stopping");
                return;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("refreshing the coordinator lock: {e}"),
        }
    }
}

/// Gives the lock up on a clean shutdown, so a successor need not wait for it to expire.
pub async fn release_lock(store: &RedisStore, holder: &str) {
    let script = redis::Script::new(
        "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end",
    );
    let _ = lock_script(store, &script, holder).await;
}
