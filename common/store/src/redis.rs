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
//!
//! A coordinator writes through a *fenced* clone ([`RedisStore::fenced`]): every write runs in
//! one Lua script that first checks that the coordinator lock still holds this coordinator's
//! token, so a coordinator paused past its lock's expiry cannot write beside its successor.
//!
//! The same store runs on a Redis Cluster (`redis-cluster://` URLs, `redis_cluster.rs`). There
//! a script or a transaction may only touch one slot, so batches are split by hash tag (the
//! layout in `keys.rs` puts whatever must change together under one tag), the fence of a
//! bucket's keys is that bucket's copy of the lock's token ([`RedisStore::arm_fence`]), and
//! prefix scans walk every master.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{AsyncConnectionConfig, Client, RedisError, RedisResult, Script};
use tokio::runtime::{Handle, RuntimeFlavor};

use super::redis_cluster::{self, ClusterUrl, Connection};
use super::{keys, Result, Store, StoreError};

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
const TRANSIENT_CODES: [&str; 5] = ["LOADING", "BUSY", "TRYAGAIN", "MASTERDOWN", "CLUSTERDOWN"];

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

/// Runs a batch of commands only while KEYS[1] holds ARGV[1] (the fence), all in one atomic
/// step. A fence key that is absent (expired, or lost with Redis' data) is taken again with
/// the token and a time to live of ARGV[2] ms (none when 0: a bucket's fence copy): nobody
/// else held it, so nobody else wrote.
/// ARGV[3] is the number of commands; each is described by its name, its number of keys and
/// its number of other arguments, followed by those arguments, its keys taken in order from
/// KEYS[2..]. `SETIFEXISTS guard key value` is [`PUT_GUARDED`] inside the batch. Returns the
/// sum of the commands' integer replies (keys unlinked, expiries set).
static FENCED_BATCH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "local holder = redis.call('GET', KEYS[1]) \
         if not holder and ARGV[2] == '0' then \
           redis.call('SET', KEYS[1], ARGV[1]) \
         elseif not holder then \
           redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) \
         elseif holder ~= ARGV[1] then \
           return redis.error_reply('FENCED ' .. KEYS[1] .. ' is held by ' .. holder) \
         end \
         local total, k, a = 0, 2, 4 \
         for _ = 1, tonumber(ARGV[3]) do \
           local name, nk, na = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]) \
           a = a + 3 \
           local call = {name} \
           for _ = 1, nk do call[#call + 1] = KEYS[k]; k = k + 1 end \
           for _ = 1, na do call[#call + 1] = ARGV[a]; a = a + 1 end \
           if name == 'SETIFEXISTS' then \
             if redis.call('EXISTS', call[2]) == 1 then \
               redis.call('SET', call[3], call[4]); total = total + 1 \
             end \
           else \
             local r = redis.call(unpack(call)) \
             if type(r) == 'number' then total = total + r end \
           end \
         end \
         return total",
    )
});

/// Writes the fence token ARGV[1] (`HOLDER#GENERATION`) to a bucket's fence copy KEYS[1]
/// unless a newer generation is there already (a later holder armed it first): returns 1 when
/// it wrote, 0 when this token is stale.
static ARM_FENCE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "local function gen(v) return tonumber(string.match(v, '#(%d+)$')) or 0 end \
         local v = redis.call('GET', KEYS[1]) \
         if v and gen(v) > gen(ARGV[1]) then return 0 end \
         redis.call('SET', KEYS[1], ARGV[1]) \
         return 1",
    )
});

/// Keys per command inside a fenced batch: Lua's `unpack` has a limit of a few thousand
/// values.
const FENCED_CHUNK: usize = 1000;

/// Writes that go to Redis together and atomically: a MULTI/EXEC transaction, or on a fenced
/// store one script that checks the fence first. Values are borrowed: a tensor is copied once,
/// into the command that carries it, not first into the batch.
#[derive(Debug, Clone, Default)]
pub struct WriteBatch<'a> {
    cmds: Vec<BatchCmd<'a>>,
}

#[derive(Debug, Clone)]
struct BatchCmd<'a> {
    name: &'static str,
    keys: Vec<String>,
    args: Vec<Cow<'a, [u8]>>,
}

impl<'a> WriteBatch<'a> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.cmds.is_empty()
    }

    fn push(
        &mut self,
        name: &'static str,
        keys: Vec<String>,
        args: Vec<Cow<'a, [u8]>>,
    ) -> &mut Self {
        self.cmds.push(BatchCmd { name, keys, args });
        self
    }

    pub fn set(&mut self, key: &str, value: &'a [u8]) -> &mut Self {
        self.push("SET", vec![key.into()], vec![value.into()])
    }

    /// SET with a time to live.
    pub fn set_px(&mut self, key: &str, value: &'a [u8], ttl: Duration) -> &mut Self {
        let args = vec![
            value.into(),
            owned(b"PX"),
            millis(ttl).to_string().into_bytes().into(),
        ];
        self.push("SET", vec![key.into()], args)
    }

    /// Unlinks `keys` (in commands of at most [`FENCED_CHUNK`] keys).
    pub fn unlink(&mut self, keys: &[String]) -> &mut Self {
        for chunk in keys.chunks(FENCED_CHUNK) {
            self.push("UNLINK", chunk.to_vec(), Vec::new());
        }
        self
    }

    pub fn pexpire(&mut self, key: &str, ttl: Duration) -> &mut Self {
        let ms = millis(ttl).to_string().into_bytes();
        self.push("PEXPIRE", vec![key.into()], vec![ms.into()])
    }

    pub fn zadd(&mut self, key: &str, member: &str, score: f64) -> &mut Self {
        let args = vec![
            score.to_string().into_bytes().into(),
            owned(member.as_bytes()),
        ];
        self.push("ZADD", vec![key.into()], args)
    }

    pub fn zrem(&mut self, key: &str, member: &str) -> &mut Self {
        self.push("ZREM", vec![key.into()], vec![owned(member.as_bytes())])
    }

    pub fn sadd(&mut self, key: &str, member: &str) -> &mut Self {
        self.push("SADD", vec![key.into()], vec![owned(member.as_bytes())])
    }

    pub fn srem(&mut self, key: &str, member: &str) -> &mut Self {
        self.push("SREM", vec![key.into()], vec![owned(member.as_bytes())])
    }

    fn set_if_exists(&mut self, guard: &str, key: &str, value: &'a [u8]) -> &mut Self {
        let keys = vec![guard.to_string(), key.to_string()];
        self.push("SETIFEXISTS", keys, vec![value.into()])
    }

    /// The batch as one MULTI/EXEC pipeline (no `SETIFEXISTS`: that is fenced-only).
    fn pipeline(&self) -> redis::Pipeline {
        let mut pipe = redis::pipe();
        pipe.atomic();
        for c in &self.cmds {
            let cmd = pipe.cmd(c.name);
            cmd.arg(&c.keys);
            for a in &c.args {
                cmd.arg(&a[..]);
            }
        }
        pipe
    }

    /// The batch split by hash tag, for a Redis Cluster: each part touches one slot (a
    /// multi-key UNLINK is split key by key into its tags' parts). Tags in order.
    fn by_tag(&self) -> BTreeMap<String, WriteBatch<'a>> {
        let mut parts: BTreeMap<String, WriteBatch<'a>> = BTreeMap::new();
        for c in &self.cmds {
            if c.name == "UNLINK" {
                let mut keys_by_tag: BTreeMap<&str, Vec<String>> = BTreeMap::new();
                for k in &c.keys {
                    keys_by_tag
                        .entry(keys::hash_tag(k))
                        .or_default()
                        .push(k.clone());
                }
                for (tag, ks) in keys_by_tag {
                    parts.entry(tag.to_string()).or_default().unlink(&ks);
                }
                continue;
            }
            let tag = c.keys.first().map_or("", |k| keys::hash_tag(k));
            parts
                .entry(tag.to_string())
                .or_default()
                .cmds
                .push(c.clone());
        }
        parts
    }

    /// The batch as one `EVALSHA` of [`FENCED_BATCH`] checking `fence_key` (the lock itself,
    /// with its time to live, or a bucket's fence copy, with none): built here rather than as
    /// a `ScriptInvocation`, which would copy every value twice more (into its arguments, then
    /// into the command) and again on each retry. Run it with [`run_fenced`].
    fn fenced(&self, fence: &Fence, fence_key: &str) -> redis::Cmd {
        let ttl = if fence_key == fence.key {
            millis(fence.ttl)
        } else {
            0
        };
        let keys = 1 + self.cmds.iter().map(|c| c.keys.len()).sum::<usize>();
        let args: usize = self.cmds.iter().map(|c| 3 + c.args.len()).sum();
        let bytes: usize = self
            .cmds
            .iter()
            .flat_map(|c| {
                c.args
                    .iter()
                    .map(|a| a.len())
                    .chain(c.keys.iter().map(String::len))
            })
            .sum();
        let mut cmd = redis::Cmd::with_capacity(6 + keys + args, bytes + 64 * (keys + args));
        cmd.arg("EVALSHA")
            .arg(FENCED_BATCH.get_hash())
            .arg(keys)
            .arg(fence_key);
        for k in self.cmds.iter().flat_map(|c| &c.keys) {
            cmd.arg(k);
        }
        cmd.arg(&fence.token).arg(ttl).arg(self.cmds.len());
        for c in &self.cmds {
            cmd.arg(c.name).arg(c.keys.len()).arg(c.args.len());
            for a in &c.args {
                cmd.arg(&a[..]);
            }
        }
        cmd
    }
}

fn owned(bytes: &[u8]) -> Cow<'static, [u8]> {
    Cow::Owned(bytes.to_vec())
}

/// Runs a [`WriteBatch::fenced`] command, loading [`FENCED_BATCH`] first where this Redis does
/// not know it yet (a fresh or restarted server), as `ScriptInvocation` does.
async fn run_fenced(cmd: &redis::Cmd, c: &mut Connection) -> RedisResult<i64> {
    match cmd.query_async(c).await {
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            FENCED_BATCH.load_async(c).await?;
            cmd.query_async(c).await
        }
        other => other,
    }
}

/// A fenced store's fence: the key that must hold `token` for a write to land (or be absent:
/// then it is taken again for `ttl`).
#[derive(Debug)]
struct Fence {
    key: String,
    token: String,
    ttl: Duration,
    /// Set when a write was refused.
    lost: AtomicBool,
}

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
    conn: Connection,
    shared: Arc<Shared>,
    fence: Option<Arc<Fence>>,
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
            .field("fenced", &self.fence.is_some())
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects to `url` (`redis://[user:password@]host:port/db`, or `rediss://` for TLS; or
    /// a Redis Cluster's seed nodes, `redis-cluster://[user:password@]host:port[,host:port…]`
    /// or `rediss-cluster://`) and checks that the server answers a PING. A server that is not
    /// up yet (or still loading its data) is waited for up to `opts.retry_for`; a refused
    /// password fails at once.
    pub async fn connect(url: &str, opts: RedisOptions) -> Result<RedisStore> {
        let shown = mask_password(url);
        let conn = if redis_cluster::is_cluster_url(url) {
            Connection::Cluster(connect_cluster(url, &shown, &opts).await?)
        } else {
            Connection::Single(connect_single(url, &shown, &opts).await?)
        };
        Ok(RedisStore {
            conn,
            shared: Arc::new(Shared {
                handle: Handle::current(),
                url: shown,
                retry_for: opts.retry_for,
                outage: Mutex::new(None),
            }),
            fence: None,
        })
    }

    /// Whether this store is a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.conn, Connection::Cluster(_))
    }
}

/// One Redis: waits until it answers, then a connection that reconnects by itself.
async fn connect_single(url: &str, shown: &str, opts: &RedisOptions) -> Result<ConnectionManager> {
    let client = open_client(url, opts)
        .map_err(|e| StoreError::Unavailable(format!("cannot use the Redis URL {shown}: {e}")))?;
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(opts.connect_timeout))
        .set_response_timeout(Some(opts.response_timeout));
    wait_until_up(shown, opts, || async {
        let mut c = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        redis::cmd("PING").query_async::<String>(&mut c).await
    })
    .await?;
    // The manager's own reconnect retries last a few seconds: a reconnect that gives up is
    // started again by the next command, and `with_retry` owns the overall deadline.
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(opts.connect_timeout))
        .set_response_timeout(Some(opts.response_timeout))
        .set_min_delay(BACKOFF_MIN)
        .set_max_delay(Duration::from_secs(1))
        .set_number_of_retries(6);
    ConnectionManager::new_with_config(client, config)
        .await
        .map_err(|e| StoreError::Unavailable(format!("cannot connect to Redis at {shown}: {e}")))
}

/// A Redis Cluster: waits until a seed node gives the slot map and every node answers, then
/// one connection that follows the cluster's map.
async fn connect_cluster(url: &str, shown: &str, opts: &RedisOptions) -> Result<ClusterConnection> {
    let parsed = ClusterUrl::parse(url)
        .map_err(|e| StoreError::Unavailable(format!("cannot use the Redis URL {shown}: {e}")))?;
    let ca = match &opts.ca {
        None => None,
        Some(_) if !parsed.tls => {
            return Err(StoreError::Unavailable(format!(
                "a CA certificate was given but the URL {shown} is not rediss-cluster://"
            )))
        }
        Some(ca) => Some(std::fs::read(ca).map_err(|e| {
            StoreError::Unavailable(format!(
                "cannot read the CA certificate {}: {e}",
                ca.display()
            ))
        })?),
    };
    if parsed.tls {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    // The client's own retries are short: `with_retry` owns the overall deadline.
    let client = parsed
        .builder(ca)
        .connection_timeout(opts.connect_timeout)
        .response_timeout(opts.response_timeout)
        .retries(2)
        .min_retry_wait(50)
        .max_retry_wait(1000)
        .build()
        .map_err(|e| StoreError::Unavailable(format!("cannot use the Redis URL {shown}: {e}")))?;
    let conn = std::sync::OnceLock::new();
    wait_until_up(shown, opts, || async {
        // Reads the slot map from a seed node and PINGs every node. (A shard that is down
        // later answers CLUSTERDOWN, which every command rides out.)
        let mut c = client.get_async_connection().await?;
        let pong = redis::cmd("PING").query_async::<String>(&mut c).await?;
        let _ = conn.set(c);
        Ok(pong)
    })
    .await?;
    Ok(conn.into_inner().expect("set when up"))
}

impl RedisStore {
    /// The URL this store connected to, password masked.
    pub fn url(&self) -> &str {
        &self.shared.url
    }

    /// A clone (on the same connection) whose every write lands only while `key` holds
    /// `token` — checked in the same atomic step as the write; an absent `key` (a lock that
    /// expired with nobody else taking it) is taken again with `token` for `ttl`. A write
    /// refused because another token holds `key` fails with [`StoreError::Fenced`], and
    /// [`RedisStore::fence_lost`] turns true for good. Reads are not fenced.
    pub fn fenced(&self, key: &str, token: &str, ttl: Duration) -> RedisStore {
        RedisStore {
            conn: self.conn.clone(),
            shared: self.shared.clone(),
            fence: Some(Arc::new(Fence {
                key: key.to_string(),
                token: token.to_string(),
                ttl,
                lost: AtomicBool::new(false),
            })),
        }
    }

    /// Whether a write of this fenced store (or of a clone of it) was refused by its fence.
    pub fn fence_lost(&self) -> bool {
        self.fence
            .as_ref()
            .is_some_and(|f| f.lost.load(Ordering::Relaxed))
    }

    /// A clone (on the same connection, with the same fence) that gives up on an outage after
    /// `retry_for`: for calls a person waits on, which should answer rather than hang.
    pub fn with_retry_for(&self, retry_for: Duration) -> RedisStore {
        RedisStore {
            conn: self.conn.clone(),
            shared: Arc::new(Shared {
                handle: self.shared.handle.clone(),
                url: self.shared.url.clone(),
                retry_for,
                outage: Mutex::new(None),
            }),
            fence: self.fence.clone(),
        }
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
        F: FnMut(Connection) -> Fut,
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
                Err(e) if is_transient(&e) || self.is_remapping(&e) => {
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
                Err(e) if e.code() == Some("FENCED") => {
                    if let Some(f) = &self.fence {
                        f.lost.store(true, Ordering::Relaxed);
                    }
                    return Err(StoreError::Fenced(format!(
                        "{what}: {}",
                        e.detail().unwrap_or("refused")
                    )));
                }
                Err(e) => {
                    let hint = if matches!(e.code(), Some("MOVED" | "ASK")) {
                        "; the server is a node of a Redis Cluster: give its nodes as \
                         redis-cluster://HOST:PORT,HOST:PORT,..."
                    } else {
                        ""
                    };
                    return Err(StoreError::Rejected {
                        what: what.to_string(),
                        message: format!("{e}{hint}"),
                    });
                }
            }
        }
    }

    /// Whether `e` is a cluster's slot map changing under a command (a shard coming back,
    /// a failover): the client follows MOVED and ASK itself, and one that still reaches us
    /// means its own few retries ran out while the map settled. On one Redis it is a
    /// configuration error (a cluster node given as redis://).
    fn is_remapping(&self, e: &RedisError) -> bool {
        self.is_cluster() && matches!(e.code(), Some("MOVED" | "ASK"))
    }

    /// Runs `batch` atomically: through the fence on a fenced store, else as one MULTI/EXEC.
    /// Returns the sum of the commands' integer replies.
    pub async fn write_batch(&self, what: &str, batch: &WriteBatch<'_>) -> Result<i64> {
        if batch.is_empty() {
            return Ok(0);
        }
        if !self.is_cluster() {
            let fence_key = self.fence.as_ref().map(|f| f.key.as_str());
            return self.write_slot(what, batch, fence_key).await;
        }
        // A cluster: one atomic part per hash tag, each fenced by its own slot's fence.
        let parts = batch.by_tag();
        let runs = parts.iter().map(|(tag, part)| {
            let fence_key = self.fence.as_ref().map(|f| {
                if keys::hash_tag(&f.key) == tag {
                    f.key.clone()
                } else {
                    keys::fence_copy(tag)
                }
            });
            async move { self.write_slot(what, part, fence_key.as_deref()).await }
        });
        Ok(futures::future::try_join_all(runs).await?.into_iter().sum())
    }

    /// Runs `batch` (all in one slot) as one call of [`FENCED_BATCH`] checking `fence_key`,
    /// or without a fence as one MULTI/EXEC.
    async fn write_slot(
        &self,
        what: &str,
        batch: &WriteBatch<'_>,
        fence_key: Option<&str>,
    ) -> Result<i64> {
        if let (Some(fence), Some(key)) = (&self.fence, fence_key) {
            let call = &batch.fenced(fence, key);
            return self
                .with_retry(what, |mut c| async move { run_fenced(call, &mut c).await })
                .await;
        }
        let pipe = &batch.pipeline();
        let replies: Vec<redis::Value> = self
            .with_retry(what, |mut c| async move { pipe.query_async(&mut c).await })
            .await?;
        Ok(replies
            .iter()
            .map(|v| match v {
                redis::Value::Int(n) => *n,
                _ => 0,
            })
            .sum())
    }

    /// On a Redis Cluster, writes this fenced store's token into every bucket's fence copy
    /// (`keys::fence_copies`), so that from now on a write of an earlier lock holder is refused
    /// on every shard, not only beside the lock. A new lock holder calls it before it writes
    /// anything else. A copy that holds a newer generation already means a later holder took
    /// over: the fence is lost ([`RedisStore::fence_lost`]). One Redis has nothing to arm.
    pub async fn arm_fence(&self) -> Result<()> {
        let Some(fence) = self.fence.as_ref().filter(|_| self.is_cluster()) else {
            return Ok(());
        };
        let copies = keys::fence_copies();
        let runs = copies.iter().map(|copy| {
            let mut call = ARM_FENCE.key(copy);
            call.arg(&fence.token);
            async move {
                let call = &call;
                self.with_retry("arming the fence", |mut c| async move {
                    call.invoke_async::<i64>(&mut c).await
                })
                .await
            }
        });
        let armed = futures::future::try_join_all(runs).await?;
        if armed.contains(&0) {
            fence.lost.store(true, Ordering::Relaxed);
            return Err(StoreError::Fenced(
                "a later coordinator armed the fence first".to_string(),
            ));
        }
        Ok(())
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
        if self.fence.is_some() {
            let what = format!("SET {key}");
            return self
                .write_batch(&what, WriteBatch::new().set(key, value))
                .await
                .map(drop);
        }
        let mut cmd = redis::cmd("SET");
        cmd.arg(key).arg(value);
        self.run(&format!("SET {key}"), &cmd).await
    }

    /// Writes `key` with a time to live (heartbeats, finished jobs).
    pub async fn put_ex(&self, key: &str, value: &[u8], ttl: Duration) -> Result<()> {
        if self.fence.is_some() {
            let batch = WriteBatch::new().set_px(key, value, ttl).clone();
            return self
                .write_batch(&format!("SET {key} PX"), &batch)
                .await
                .map(drop);
        }
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
        if self.fence.is_some() {
            let batch = WriteBatch::new().unlink(&[key.to_string()]).clone();
            return self
                .write_batch(&format!("UNLINK {key}"), &batch)
                .await
                .map(drop);
        }
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
        if self.fence.is_some() {
            let batch = WriteBatch::new().pexpire(key, ttl).clone();
            return Ok(self.write_batch(&format!("PEXPIRE {key}"), &batch).await? > 0);
        }
        let mut cmd = redis::cmd("PEXPIRE");
        cmd.arg(key).arg(millis(ttl));
        Ok(self.run::<usize>(&format!("PEXPIRE {key}"), &cmd).await? > 0)
    }

    /// See [`Store::put_guarded`]: one Lua script, so atomic in Redis.
    pub async fn put_guarded_async(&self, guard: &str, key: &str, value: &[u8]) -> Result<bool> {
        if self.fence.is_some() {
            let batch = WriteBatch::new().set_if_exists(guard, key, value).clone();
            return Ok(self
                .write_batch(&format!("guarded SET {key}"), &batch)
                .await?
                > 0);
        }
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
        if self.fence.is_some() {
            let mut batch = WriteBatch::new();
            for (key, value) in items {
                batch.set(key, value);
            }
            let what = format!("SET of {} keys", items.len());
            return self.write_batch(&what, &batch).await.map(drop);
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
        if let Connection::Cluster(conn) = &self.conn {
            // Every master in turn; the list is read again on a retry, after a failover.
            let masters = self
                .with_retry("CLUSTER SLOTS", |_| {
                    let mut c = conn.clone();
                    async move { redis_cluster::masters(&mut c).await }
                })
                .await?;
            for addr in &masters {
                self.scan_node(&what, &pattern, Some(addr), &mut found)
                    .await?;
            }
        } else {
            self.scan_node(&what, &pattern, None, &mut found).await?;
        }
        Ok(found
            .into_iter()
            .filter(|k| k.starts_with(prefix))
            .collect())
    }

    /// SCANs one server (one Redis, or the cluster's master at `addr`) for `pattern` into
    /// `found`.
    async fn scan_node(
        &self,
        what: &str,
        pattern: &str,
        addr: Option<&(String, u16)>,
        found: &mut BTreeSet<String>,
    ) -> Result<()> {
        let mut cursor = 0u64;
        loop {
            let (next, batch): (u64, Vec<String>) = self
                .with_retry(what, |c| async move {
                    match (c, addr) {
                        (Connection::Cluster(mut c), Some(addr)) => {
                            redis_cluster::scan_master(&mut c, addr, cursor, pattern, SCAN_COUNT)
                                .await
                        }
                        (mut c, _) => {
                            redis::cmd("SCAN")
                                .arg(cursor)
                                .arg("MATCH")
                                .arg(pattern)
                                .arg("COUNT")
                                .arg(SCAN_COUNT)
                                .query_async(&mut c)
                                .await
                        }
                    }
                })
                .await?;
            found.extend(batch);
            if next == 0 {
                return Ok(());
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
            let batch = WriteBatch::new().unlink(&keys).clone();
            removed += self
                .write_batch(&format!("UNLINK {prefix}*"), &batch)
                .await? as usize;
        }
        Ok(removed)
    }

    /// Sets a time to live on every key under `prefix` (a finished job); returns how many keys
    /// got one. Keys written under the prefix afterwards do not.
    pub async fn expire_prefix(&self, prefix: &str, ttl: Duration) -> Result<usize> {
        let keys = self.keys_async(prefix).await?;
        let mut set = 0;
        for batch in keys.chunks(KEY_BATCH) {
            let mut expiries = WriteBatch::new();
            for key in batch {
                expiries.pexpire(key, ttl);
            }
            set += self
                .write_batch(&format!("PEXPIRE {prefix}*"), &expiries)
                .await? as usize;
        }
        Ok(set)
    }

    /// Whether each of `keys` exists, in one round trip.
    pub async fn exists_many_async(&self, keys: &[String]) -> Result<Vec<bool>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let what = format!("EXISTS of {} keys", keys.len());
        if self.is_cluster() {
            // A pipeline must stay in one slot there: one command each, all at once.
            let runs = keys.iter().map(|key| self.exists_async(key));
            return futures::future::try_join_all(runs).await;
        }
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.exists(key);
        }
        let pipe = &pipe;
        self.with_retry(&what, |mut c| async move { pipe.query_async(&mut c).await })
            .await
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
async fn wait_until_up<F, Fut>(shown: &str, opts: &RedisOptions, attempt: F) -> Result<()>
where
    F: Fn() -> Fut,
    Fut: Future<Output = RedisResult<String>>,
{
    let elsewhere = opts
        .url_from
        .as_deref()
        .map(|how| format!("; another Redis: {how}"))
        .unwrap_or_default();
    let start = Instant::now();
    let mut delay = BACKOFF_MIN;
    let mut waiting = false;
    loop {
        match attempt().await {
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
                let hint = if e.to_string().contains("cluster support disabled") {
                    "; the server is not a Redis Cluster node: give it as redis://HOST:PORT"
                } else if is_auth_error(&e) {
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
    // A Redis Cluster client with no node reachable (every shard down at once) says so
    // without an I/O error; its connections come back with the nodes.
    if e.kind() == redis::ErrorKind::ClusterConnectionNotFound {
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
