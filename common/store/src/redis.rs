//! The cluster's store: Redis behind the same [`Store`] trait as the in-memory store, so the
//! coordinator's engine and the workers' tasks run unchanged on either.
//!
//! Redis going away for a while (a restart, a failover, a dropped connection) must stall a
//! render, not fail it: every command goes through [`RedisStore::with_retry`], which retries
//! transient failures for [`RedisOptions::retry_for`] and fails at once on errors that retrying
//! cannot fix (a wrong password, a wrong type). With AOF on, a restarted Redis comes back with
//! the job state and the render carries on.
//!
//! Two kinds of callers share one connection: async code (gRPC handlers, the job queue) calls
//! the async inherent methods; the engine and the model code run on plain threads and call the
//! synchronous [`Store`] trait, which blocks on the runtime the store was connected on.

use std::collections::BTreeSet;
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncConnectionConfig, Client, RedisError, RedisResult, Script};
use tokio::runtime::{Handle, RuntimeFlavor};

use super::{Result, Store, StoreError};

const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Keys per SCAN call: large, so a prefix scan over a big keyspace takes few round trips.
const SCAN_COUNT: usize = 10_000;
/// Keys per UNLINK / PEXPIRE batch, bounding one command's size.
const KEY_BATCH: usize = 10_000;
/// A prefix delete repeats its scan until it finds nothing (see `delete_prefix`), at most this
/// often, so a writer that keeps adding unguarded keys cannot hold it forever.
const DELETE_PASSES: usize = 4;

/// Server error codes that mean "not now" rather than "never".
const TRANSIENT_CODES: [&str; 4] = ["LOADING", "BUSY", "TRYAGAIN", "MASTERDOWN"];

/// Writes KEYS[2] only while KEYS[1] exists: the check and the write must be one step, or a
/// step deletion could fall between them.
static PUT_GUARDED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "if redis.call('EXISTS', KEYS[1]) == 1 then \
             redis.call('SET', KEYS[2], ARGV[1]) \
             return 1 \
         end \
         return 0",
    )
});

/// How to reach Redis and how long to ride out an outage.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// How long a command (and the first connection) keeps retrying transient failures before
    /// failing with [`StoreError::Unavailable`]. Long enough for a Redis restart.
    pub retry_for: Duration,
    /// How long one command waits for its reply before the attempt counts as a (transient)
    /// timeout. Generous: values can be megabytes of tensor.
    pub response_timeout: Duration,
    /// How long one connection attempt may take.
    pub connect_timeout: Duration,
    /// PEM file of the CA that signed the server's certificate, for `rediss://` URLs to a server
    /// with a private CA; `None` uses the system's trusted roots.
    pub ca: Option<PathBuf>,
    /// How the user gives the URL (e.g. "--redis URL or the TESSERA_REDIS variable"), named in
    /// connection messages so that a wrong address is changed at once.
    pub url_from: Option<String>,
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            retry_for: Duration::from_secs(120),
            response_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            ca: None,
            url_from: None,
        }
    }
}

/// A Redis-backed [`Store`]. Cloning is cheap and clones share one multiplexed connection,
/// which reconnects by itself after a drop.
///
/// The synchronous [`Store`] methods block on the runtime `connect` ran on, so connect on a
/// multi-thread runtime. They are meant for std threads and `spawn_blocking` (the engine, the
/// model code); called on a multi-thread runtime's worker they use `block_in_place`, on a
/// current-thread runtime they return an error rather than deadlock. Async code calls the
/// inherent `*_async` twins of the trait methods and the Redis-only methods (`put_ex`,
/// `expire`, `expire_prefix`, `dbsize`, `with_retry`). The twins have their own names so that
/// a sync caller holding a `RedisStore` cannot call an async method by mistake and drop the
/// future unawaited.
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    shared: Arc<Shared>,
}

struct Shared {
    handle: Handle,
    /// The URL with its password masked, for messages.
    url: String,
    retry_for: Duration,
    /// When the current outage began, so that concurrent callers log it once.
    outage: Mutex<Option<Instant>>,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("url", &self.shared.url)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects to `url` (`redis://[user:password@]host:port/db`, or `rediss://` for TLS) and
    /// checks that the server answers a PING. A server that is not up yet (or still loading its
    /// data) is waited for up to `opts.retry_for`; a refused password fails at once.
    pub async fn connect(url: &str, opts: RedisOptions) -> Result<RedisStore> {
        let shown = mask_password(url);
        let client = open_client(url, &opts).map_err(|e| {
            StoreError::Unavailable(format!("cannot use the Redis URL {shown}: {e}"))
        })?;
        wait_until_up(&client, &shown, &opts).await?;

        // The manager's own reconnect retries last a few seconds: a reconnect that gives up is
        // started again by the next command, and `with_retry` owns the overall deadline.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(opts.connect_timeout))
            .set_response_timeout(Some(opts.response_timeout))
            .set_min_delay(BACKOFF_MIN)
            .set_max_delay(Duration::from_secs(1))
            .set_number_of_retries(6);
        let conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(|e| {
                StoreError::Unavailable(format!("cannot connect to Redis at {shown}: {e}"))
            })?;
        Ok(RedisStore {
            conn,
            shared: Arc::new(Shared {
                handle: Handle::current(),
                url: shown,
                retry_for: opts.retry_for,
                outage: Mutex::new(None),
            }),
        })
    }

    /// The URL this store connected to, password masked.
    pub fn url(&self) -> &str {
        &self.shared.url
    }

    /// Runs `f` on the shared connection, retrying transient failures (connection refused,
    /// reset or dropped, timeouts, and the server answers `LOADING`, `BUSY`, `TRYAGAIN`,
    /// `MASTERDOWN`) with exponential backoff from 50 ms to 2 s until
    /// [`RedisOptions::retry_for`] has passed, then fails with [`StoreError::Unavailable`].
    /// Other errors return at once as [`StoreError::Rejected`] with Redis' message.
    ///
    /// `what` names the operation in logs and errors (e.g. `"ZADD queue"`). The first failure
    /// of an outage logs one warning, the first success after it one info line, however many
    /// callers are retrying.
    ///
    /// `f` may run several times, so it must be safe to repeat: a command whose reply was lost
    /// may already have run. This is the primitive for commands the [`Store`] trait does not
    /// have (sorted-set queues, membership keys):
    ///
    /// ```no_run
    /// # use tessera_store::{RedisStore, Result};
    /// # async fn f(store: &RedisStore) -> Result<()> {
    /// let queued: usize = store
    ///     .with_retry("ZCARD queue", |mut c| async move {
    ///         redis::cmd("ZCARD").arg("queue").query_async(&mut c).await
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn with_retry<T, F, Fut>(&self, what: &str, mut f: F) -> Result<T>
    where
        F: FnMut(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let start = Instant::now();
        let mut delay = BACKOFF_MIN;
        loop {
            // An attempt can wait on the manager's reconnect (itself retrying), so it is cut off
            // at the deadline; a cut-off attempt reads as a timeout.
            let remaining = self.shared.retry_for.saturating_sub(start.elapsed());
            let attempt = tokio::time::timeout(remaining.max(BACKOFF_MIN), f(self.conn.clone()))
                .await
                .unwrap_or_else(|_| Err(std::io::Error::from(std::io::ErrorKind::TimedOut).into()));
            match attempt {
                Ok(v) => {
                    self.outage_ends();
                    return Ok(v);
                }
                Err(e) if is_transient(&e) => {
                    self.outage_begins(what, &e);
                    let elapsed = start.elapsed();
                    if elapsed >= self.shared.retry_for {
                        return Err(StoreError::Unavailable(format!(
                            "{what}: Redis at {} unreachable for {:.1} s ({e}); check that \
                             redis-server is running and reachable from this machine",
                            self.shared.url,
                            elapsed.as_secs_f64()
                        )));
                    }
                    tokio::time::sleep(delay.min(self.shared.retry_for - elapsed)).await;
                    delay = (delay * 2).min(BACKOFF_MAX);
                }
                Err(e) => {
                    return Err(StoreError::Rejected {
                        what: what.to_string(),
                        message: e.to_string(),
                    })
                }
            }
        }
    }

    fn outage_begins(&self, what: &str, e: &RedisError) {
        let mut outage = self.shared.outage.lock().unwrap_or_else(|p| p.into_inner());
        if outage.is_none() {
            *outage = Some(Instant::now());
            tracing::warn!(
                url = %self.shared.url,
                "Redis unavailable ({what}: {e}); retrying for up to {} s",
                self.shared.retry_for.as_secs()
            );
        }
    }

    fn outage_ends(&self) {
        let mut outage = self.shared.outage.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(since) = outage.take() {
            tracing::info!(
                url = %self.shared.url,
                "Redis available again after {:.1} s",
                since.elapsed().as_secs_f64()
            );
        }
    }

    /// Runs one command through [`with_retry`](Self::with_retry).
    async fn run<T: redis::FromRedisValue>(&self, what: &str, cmd: &redis::Cmd) -> Result<T> {
        self.with_retry(what, |mut c| async move { cmd.query_async(&mut c).await })
            .await
    }

    pub async fn put_async(&self, key: &str, value: &[u8]) -> Result<()> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(key).arg(value);
        self.run(&format!("SET {key}"), &cmd).await
    }

    /// Writes `key` with a time to live (heartbeats, finished jobs).
    pub async fn put_ex(&self, key: &str, value: &[u8], ttl: Duration) -> Result<()> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(key).arg(value).arg("PX").arg(millis(ttl));
        self.run(&format!("SET {key} PX"), &cmd).await
    }

    pub async fn get_async(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(key);
        self.run(&format!("GET {key}"), &cmd).await
    }

    pub async fn delete_async(&self, key: &str) -> Result<()> {
        let mut cmd = redis::cmd("UNLINK");
        cmd.arg(key);
        self.run::<usize>(&format!("UNLINK {key}"), &cmd).await?;
        Ok(())
    }

    pub async fn exists_async(&self, key: &str) -> Result<bool> {
        let mut cmd = redis::cmd("EXISTS");
        cmd.arg(key);
        Ok(self.run::<usize>(&format!("EXISTS {key}"), &cmd).await? > 0)
    }

    /// Sets a time to live on `key`; returns whether the key existed.
    pub async fn expire(&self, key: &str, ttl: Duration) -> Result<bool> {
        let mut cmd = redis::cmd("PEXPIRE");
        cmd.arg(key).arg(millis(ttl));
        Ok(self.run::<usize>(&format!("PEXPIRE {key}"), &cmd).await? > 0)
    }

    /// See [`Store::put_guarded`]: one Lua script, so atomic in Redis.
    pub async fn put_guarded_async(&self, guard: &str, key: &str, value: &[u8]) -> Result<bool> {
        let mut call = PUT_GUARDED.key(guard);
        call.key(key).arg(value);
        let call = &call;
        let wrote: usize = self
            .with_retry(&format!("guarded SET {key}"), |mut c| async move {
                call.invoke_async(&mut c).await
            })
            .await?;
        Ok(wrote == 1)
    }

    /// Writes all items with one MSET: atomic and one round trip.
    pub async fn put_many_async(&self, items: &[(String, Vec<u8>)]) -> Result<()> {
        if items.is_empty() {
            return Ok(());
        }
        let mut cmd = redis::cmd("MSET");
        for (key, value) in items {
            cmd.arg(key).arg(value);
        }
        self.run(&format!("MSET of {} keys", items.len()), &cmd)
            .await
    }

    /// Reads all keys with one MGET; `None` where a key is missing.
    pub async fn get_many_async(&self, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = redis::cmd("MGET");
        cmd.arg(keys);
        self.run(&format!("MGET of {} keys", keys.len()), &cmd)
            .await
    }

    /// Keys starting with `prefix`, sorted. Uses SCAN, so it does not block the server the
    /// way KEYS would, at the price of walking the whole keyspace.
    pub async fn keys_async(&self, prefix: &str) -> Result<Vec<String>> {
        let pattern = format!("{}*", escape_glob(prefix));
        let what = format!("SCAN {pattern}");
        let mut found = BTreeSet::new();
        let mut cursor = 0u64;
        loop {
            let mut cmd = redis::cmd("SCAN");
            cmd.arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(SCAN_COUNT);
            let (next, batch): (u64, Vec<String>) = self.run(&what, &cmd).await?;
            found.extend(batch.into_iter().filter(|k| k.starts_with(prefix)));
            if next == 0 {
                return Ok(found.into_iter().collect());
            }
            cursor = next;
        }
    }

    /// Deletes every key starting with `prefix`; returns how many went.
    ///
    /// The keys found by one scan go in one MULTI/EXEC (one UNLINK per 10 000 keys), so a
    /// guarded write lands either before the deletion and is removed with its guard, or after
    /// it and is refused. A guarded write can also land between the scan and the deletion,
    /// under a key the scan did not see; so the scan is repeated until it finds nothing (the
    /// second one normally finds nothing: its guards are gone by then).
    pub async fn delete_prefix_async(&self, prefix: &str) -> Result<usize> {
        let mut removed = 0;
        for _ in 0..DELETE_PASSES {
            let keys = self.keys_async(prefix).await?;
            if keys.is_empty() {
                break;
            }
            let mut pipe = redis::pipe();
            pipe.atomic();
            for batch in keys.chunks(KEY_BATCH) {
                pipe.cmd("UNLINK").arg(batch);
            }
            let pipe = &pipe;
            let counts: Vec<usize> = self
                .with_retry(&format!("UNLINK {prefix}*"), |mut c| async move {
                    pipe.query_async(&mut c).await
                })
                .await?;
            removed += counts.iter().sum::<usize>();
        }
        Ok(removed)
    }

    /// Sets a time to live on every key under `prefix` (a finished job); returns how many keys
    /// got one. Keys written under the prefix afterwards do not.
    pub async fn expire_prefix(&self, prefix: &str, ttl: Duration) -> Result<usize> {
        let keys = self.keys_async(prefix).await?;
        let mut set = 0;
        for batch in keys.chunks(KEY_BATCH) {
            let mut pipe = redis::pipe();
            for key in batch {
                pipe.cmd("PEXPIRE").arg(key).arg(millis(ttl));
            }
            let pipe = &pipe;
            let counts: Vec<usize> = self
                .with_retry(&format!("PEXPIRE {prefix}*"), |mut c| async move {
                    pipe.query_async(&mut c).await
                })
                .await?;
            set += counts.iter().sum::<usize>();
        }
        Ok(set)
    }

    /// Number of keys in the database.
    pub async fn dbsize(&self) -> Result<usize> {
        self.run("DBSIZE", &redis::cmd("DBSIZE")).await
    }

    /// Runs `fut` to completion for a synchronous caller (see the type's docs).
    fn block_on<T>(&self, fut: impl Future<Output = Result<T>>) -> Result<T> {
        match Handle::try_current() {
            Err(_) => self.shared.handle.block_on(fut),
            Ok(current) => match current.runtime_flavor() {
                RuntimeFlavor::MultiThread => {
                    tokio::task::block_in_place(|| self.shared.handle.block_on(fut))
                }
                _ => Err(StoreError::Unavailable(
                    "the synchronous Store methods of RedisStore cannot run on a \
                     current-thread tokio runtime; call them from a std thread or \
                     spawn_blocking, or use the async methods"
                        .to_string(),
                )),
            },
        }
    }
}

impl Store for RedisStore {
    fn put(&self, key: &str, value: &[u8]) -> Result<()> {
        self.block_on(self.put_async(key, value))
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.block_on(self.get_async(key))
    }

    fn delete(&self, key: &str) -> Result<()> {
        self.block_on(self.delete_async(key))
    }

    fn delete_prefix(&self, prefix: &str) -> Result<usize> {
        self.block_on(self.delete_prefix_async(prefix))
    }

    fn keys(&self, prefix: &str) -> Result<Vec<String>> {
        self.block_on(self.keys_async(prefix))
    }

    fn exists(&self, key: &str) -> Result<bool> {
        self.block_on(self.exists_async(key))
    }

    fn put_guarded(&self, guard: &str, key: &str, value: &[u8]) -> Result<bool> {
        self.block_on(self.put_guarded_async(guard, key, value))
    }

    fn put_many(&self, items: &[(String, Vec<u8>)]) -> Result<()> {
        self.block_on(self.put_many_async(items))
    }

    fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>> {
        self.block_on(self.get_many_async(keys))
    }
}

fn open_client(url: &str, opts: &RedisOptions) -> RedisResult<Client> {
    let tls = url
        .get(..9)
        .is_some_and(|s| s.eq_ignore_ascii_case("rediss://"));
    if tls {
        // redis' rustls is built without a crypto provider of its own; ring is the one the
        // workspace already uses for gRPC. Err means a provider is installed already: fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    match &opts.ca {
        None => Client::open(url),
        Some(_) if !tls => Err(RedisError::from((
            redis::ErrorKind::InvalidClientConfig,
            "a CA certificate was given but the URL is not rediss://",
        ))),
        Some(ca) => {
            let pem = std::fs::read(ca).map_err(|e| {
                RedisError::from((
                    redis::ErrorKind::InvalidClientConfig,
                    "cannot read the CA certificate",
                    format!("{}: {e}", ca.display()),
                ))
            })?;
            Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem),
                },
            )
        }
    }
}

/// Waits until the server answers PING: through "connection refused" while it starts and
/// `LOADING` while it reads its AOF, but not through a refused password.
async fn wait_until_up(client: &Client, shown: &str, opts: &RedisOptions) -> Result<()> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(opts.connect_timeout))
        .set_response_timeout(Some(opts.response_timeout));
    let elsewhere = opts
        .url_from
        .as_deref()
        .map(|how| format!("; another Redis: {how}"))
        .unwrap_or_default();
    let start = Instant::now();
    let mut delay = BACKOFF_MIN;
    let mut waiting = false;
    loop {
        let attempt = async {
            let mut c = client
                .get_multiplexed_async_connection_with_config(&config)
                .await?;
            redis::cmd("PING").query_async::<String>(&mut c).await
        };
        match attempt.await {
            Ok(_) => {
                if waiting {
                    tracing::info!(url = shown, "Redis is up");
                }
                return Ok(());
            }
            Err(e) if is_transient(&e) => {
                let elapsed = start.elapsed();
                if elapsed >= opts.retry_for {
                    return Err(StoreError::Unavailable(format!(
                        "cannot reach Redis at {shown} after {:.1} s ({e}); check that \
                         redis-server is running there, that host and port are right and \
                         reachable from this machine{}{elsewhere}",
                        elapsed.as_secs_f64(),
                        if shown.starts_with("rediss") {
                            ", and that the server speaks TLS"
                        } else {
                            ""
                        }
                    )));
                }
                if !waiting {
                    waiting = true;
                    let another = opts
                        .url_from
                        .as_deref()
                        .map(|how| format!(" Another Redis: {how}."))
                        .unwrap_or_default();
                    tracing::warn!(
                        "waiting for Redis at {shown} ({e}), up to {} s. Is redis-server \
                         running there?{another}",
                        opts.retry_for.as_secs()
                    );
                }
                tokio::time::sleep(delay.min(opts.retry_for - elapsed)).await;
                delay = (delay * 2).min(BACKOFF_MAX);
            }
            Err(e) => {
                let hint = if is_auth_error(&e) {
                    "; check the password in the URL (redis://:PASSWORD@host:port/db, or \
                     redis://USER:PASSWORD@... with ACL users)"
                } else if is_tls_or_config_error(&e) && shown.starts_with("rediss") {
                    "; check that the server's certificate is signed by a trusted CA (or the \
                     one given as RedisOptions::ca) and names the host in the URL"
                } else {
                    ""
                };
                let how = opts
                    .url_from
                    .as_deref()
                    .map(|how| format!(" (the URL is given with {how})"))
                    .unwrap_or_default();
                return Err(StoreError::Unavailable(format!(
                    "cannot connect to Redis at {shown}: {e}{hint}{how}"
                )));
            }
        }
    }
}

/// Whether retrying `e` later can succeed: the connection failed or dropped, or the server
/// says it is temporarily unable to serve. A TLS handshake that fails (an untrusted or
/// misnamed certificate) is an I/O error too, but no retry fixes it.
fn is_transient(e: &RedisError) -> bool {
    if e.code().is_some_and(|c| TRANSIENT_CODES.contains(&c)) {
        return true;
    }
    let network =
        e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout();
    network && !is_tls_or_config_error(e)
}

/// Whether `e` wraps an I/O error of a kind that repeating cannot change.
fn is_tls_or_config_error(e: &RedisError) -> bool {
    use std::io::ErrorKind::{InvalidData, InvalidInput, PermissionDenied, Unsupported};
    // redis keeps the I/O error behind an `Arc<dyn Error>`; tokio-rustls reports handshake
    // failures as `InvalidData`.
    let Some(source) = std::error::Error::source(e) else {
        return false;
    };
    let io = source.downcast_ref::<std::io::Error>().or_else(|| {
        source
            .downcast_ref::<Arc<dyn std::error::Error + Send + Sync>>()?
            .downcast_ref::<std::io::Error>()
    });
    io.is_some_and(|io| {
        matches!(
            io.kind(),
            InvalidData | InvalidInput | PermissionDenied | Unsupported
        )
    })
}

fn is_auth_error(e: &RedisError) -> bool {
    e.kind() == redis::ErrorKind::AuthenticationFailed
        || e.code()
            .is_some_and(|c| matches!(c, "NOAUTH" | "WRONGPASS" | "NOPERM"))
}

/// PX/PEXPIRE take whole milliseconds and reject 0.
fn millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// `prefix` as a literal SCAN MATCH pattern: Redis globs treat `* ? [ ] \` specially.
fn escape_glob(prefix: &str) -> String {
    let mut out = String::with_capacity(prefix.len());
    for c in prefix.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// `url` with the password (if any) replaced by `***`, for logs and errors.
pub(crate) fn mask_password(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_string();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_string();
    };
    let Some(colon) = rest[..at].find(':') else {
        return url.to_string();
    };
    format!(
        "{}{}***{}",
        &url[..scheme_end],
        &rest[..=colon],
        &rest[at..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_masked() {
        assert_eq!(
            mask_password("redis://:s3cret@host:6379/0"),
            "redis://:***@host:6379/0"
        );
        assert_eq!(
            mask_password("rediss://user:p@ss@host:6380"),
            "rediss://user:***@host:6380"
        );
        assert_eq!(mask_password("redis://host:6379/0"), "redis://host:6379/0");
        assert_eq!(mask_password("redis://user@host/0"), "redis://user@host/0");
        assert_eq!(mask_password("not a url"), "not a url");
    }

    #[test]
    fn glob_characters_are_escaped() {
        assert_eq!(escape_glob("job:a:"), "job:a:");
        assert_eq!(escape_glob(r"a*b?c[d]e\f"), r"a\*b\?c\[d\]e\\f");
    }

    #[test]
    fn ttls_are_whole_positive_milliseconds() {
        assert_eq!(millis(Duration::from_micros(10)), 1);
        assert_eq!(millis(Duration::from_secs(2)), 2000);
    }
}
