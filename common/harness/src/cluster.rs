//! A whole cluster on loopback: a real `redis-server` on a free port, a `tessera coordinator`
//! process (and optionally a standby) and `tessera worker` processes, driven through the real
//! binary. The cross-process tests use it to kill, pause, resume and restart every part;
//! `tessera bench` uses it to measure. Everything it started is killed when it is dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use crate::redis_cluster::{Redis, RedisCluster};
use crate::redis_server::{free_port, make_certificates, RedisServer, RedisServerOptions};

/// What went wrong setting up or driving the cluster; the message says where to look.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HarnessError(pub String);

impl std::fmt::Display for HarnessError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for HarnessError {}

pub type Result<T> = std::result::Result<T, HarnessError>;

fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> HarnessError {
    move |e| HarnessError(format!("{what}: {e}"))
}

/// A `tessera` child process whose output goes to a log file; killed (SIGKILL) when dropped.
pub struct Process {
    child: Child,
    pub name: String,
    log: PathBuf,
}

impl Process {
    /// Starts `bin args…` with `TESSERA_LOG=info`, stdout and stderr into `log`.
    pub fn spawn(bin: &Path, name: &str, args: &[String], log: PathBuf) -> Result<Process> {
        Self::spawn_in(bin, None, name, args, log)
    }

    /// [`Process::spawn`], in a mount namespace of its own where `tmpfs` (a directory, and a
    /// size in bytes) is a small tmpfs: a disk that fills up. Runs `unshare` (as root, or
    /// with user namespaces).
    pub fn spawn_in(
        bin: &Path,
        tmpfs: Option<(&Path, u64)>,
        name: &str,
        args: &[String],
        log: PathBuf,
    ) -> Result<Process> {
        let file =
            std::fs::File::create(&log).map_err(io(format!("creating {}", log.display())))?;
        let err = file.try_clone().map_err(io("duplicating a log file"))?;
        let mut command = Command::new(bin);
        if let Some((dir, bytes)) = tmpfs {
            command = Command::new("unshare");
            // The script mounts at $0 and then becomes `bin args…` ("$@").
            command
                .arg(if is_root() { "-m" } else { "-Urm" })
                .args(["sh", "-c"])
                .arg(format!(
                    "mount -t tmpfs -o size={bytes} tmpfs \"$0\" && exec \"$@\""
                ))
                .arg(dir)
                .arg(bin);
        }
        let child = command
            .args(args)
            .env("TESSERA_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(file)
            .stderr(err)
            .stdin(Stdio::null())
            .spawn()
            .map_err(io(format!("starting {} {}", bin.display(), args.join(" "))))?;
        Ok(Process {
            child,
            name: name.to_string(),
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends signal `name` (`STOP`, `CONT`, `TERM`, …) to the process, through `kill`.
    pub fn signal(&self, name: &str) -> Result<()> {
        let status = Command::new("kill")
            .args(["-s", name, &self.pid().to_string()])
            .stderr(Stdio::null())
            .status()
            .map_err(io(format!("kill -s {name}")))?;
        if status.success() {
            Ok(())
        } else {
            Err(HarnessError(format!(
                "kill -s {name} {} failed",
                self.pid()
            )))
        }
    }

    /// Waits up to `limit` for the process to exit; its exit status, or None if it still runs.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if start.elapsed() > limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Everything the process has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // A stopped (paused) process is continued first, so that it dies at once.
        if self.alive() {
            let _ = self.signal("CONT");
        }
        self.kill();
    }
}

/// Whether this process runs as root (then `unshare -m` needs no user namespace).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        == Some("0")
}

/// How the cluster runs.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    pub redis: RedisServerOptions,
    /// 0: one Redis; n: a Redis Cluster of n shards (masters with AOF, `redis` giving their
    /// passwords or ACL users) that the coordinator and workers reach as `redis-cluster://`.
    pub redis_shards: usize,
    /// Every hop over TLS: certificates for 127.0.0.1 and their CA are made under the cluster's
    /// directory (`certs/`), and every role and client is given them.
    pub tls: bool,
    /// The clients' token: given to the coordinator and every client call.
    pub token: Option<String>,
    /// The workers' token, given to the coordinator and the workers; with a client token and
    /// none of these, `TOKEN-workers`.
    pub worker_token: Option<String>,
    /// More `tessera coordinator` flags.
    pub coordinator_flags: Vec<String>,
    /// A second coordinator on its own port, a standby until the first stops; workers are given
    /// both URLs.
    pub standby: bool,
    /// Runs the coordinator in a mount namespace where this directory is a tmpfs of this many
    /// bytes (a disk that fills up; see [`Process::spawn_in`]).
    pub coordinator_tmpfs: Option<(PathBuf, u64)>,
}

impl ClusterOptions {
    fn worker_token(&self) -> Option<String> {
        self.worker_token
            .clone()
            .or_else(|| self.token.as_ref().map(|t| format!("{t}-workers")))
    }
}

/// Redis, a coordinator and workers on loopback, in `dir` (logs, certificates).
pub struct LocalCluster {
    bin: PathBuf,
    dir: PathBuf,
    pub redis: Redis,
    port: u16,
    opts: ClusterOptions,
    certs: Option<PathBuf>,
    coordinator: Option<Process>,
    /// The standby coordinator and its port ([`ClusterOptions::standby`]).
    pub standby: Option<(Process, u16)>,
    pub workers: Vec<Process>,
    started: usize,
}

impl LocalCluster {
    /// Redis and a coordinator serving on a free port, no workers yet. `bin` is the `tessera`
    /// binary; `dir` must exist.
    pub fn start(bin: &Path, dir: &Path, opts: ClusterOptions) -> Result<Self> {
        let certs = opts.tls.then(|| dir.join("certs"));
        if let Some(c) = &certs {
            std::fs::create_dir_all(c).map_err(io(format!("creating {}", c.display())))?;
            make_certificates(c);
        }
        let mut cluster = LocalCluster {
            bin: bin.to_path_buf(),
            dir: dir.to_path_buf(),
            redis: match opts.redis_shards {
                0 => Redis::One(RedisServer::start_with(opts.redis.clone())),
                n => Redis::Cluster(RedisCluster::start(n, opts.redis.clone())),
            },
            port: free_port(),
            opts,
            certs,
            coordinator: None,
            standby: None,
            workers: Vec::new(),
            started: 0,
        };
        cluster.start_coordinator()?;
        if cluster.opts.standby {
            cluster.start_standby()?;
        }
        Ok(cluster)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A path inside the cluster's directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The coordinator's URL, `https://` when the cluster uses TLS.
    pub fn url(&self) -> String {
        self.url_at(self.port)
    }

    /// The standby coordinator's URL.
    pub fn standby_url(&self) -> Option<String> {
        self.standby.as_ref().map(|(_, port)| self.url_at(*port))
    }

    fn url_at(&self, port: u16) -> String {
        let scheme = if self.certs.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://127.0.0.1:{port}")
    }

    /// The flags that point a client at this cluster: coordinator, token, CA.
    pub fn client_flags(&self) -> Vec<String> {
        self.client_flags_for(&self.url())
    }

    fn client_flags_for(&self, url: &str) -> Vec<String> {
        let mut flags = vec!["--coordinator".to_string(), url.to_string()];
        flags.extend(self.token_flags());
        if let Some(c) = &self.certs {
            flags.extend(["--tls-ca".into(), c.join("ca.pem").display().to_string()]);
        }
        flags
    }

    /// The clients' token flags (empty without a token).
    pub fn token_flags(&self) -> Vec<String> {
        match &self.opts.token {
            Some(t) => vec!["--token".into(), t.clone()],
            None => Vec::new(),
        }
    }

    fn worker_token_flags(&self) -> Vec<String> {
        match self.opts.worker_token() {
            Some(t) => vec!["--worker-token".into(), t],
            None => Vec::new(),
        }
    }

    /// Flags of both server roles for Redis: the CA of a TLS Redis.
    fn redis_flags(&self) -> Vec<String> {
        match self.redis.ca() {
            Some(ca) => vec!["--redis-ca".into(), ca.display().to_string()],
            None => Vec::new(),
        }
    }

    /// A server role's TLS flags: its certificate and key, and the CA of its peers.
    fn server_tls(&self) -> Vec<String> {
        match &self.certs {
            None => Vec::new(),
            Some(c) => [
                ("--tls-cert", "server.pem"),
                ("--tls-key", "server.key"),
                ("--tls-ca", "ca.pem"),
            ]
            .iter()
            .flat_map(|(flag, file)| [flag.to_string(), c.join(file).display().to_string()])
            .collect(),
        }
    }

    fn coordinator_args(&self, port: u16) -> Vec<String> {
        let mut args = vec![
            "coordinator".to_string(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--redis".into(),
            self.redis.url_as("coordinator"),
        ];
        args.extend(self.redis_flags());
        args.extend(self.token_flags());
        args.extend(self.worker_token_flags());
        args.extend(self.server_tls());
        args.extend(self.opts.coordinator_flags.iter().cloned());
        args
    }

    /// Starts the coordinator (again, after [`LocalCluster::kill_coordinator`]: a new log
    /// file) and waits until it answers a client.
    pub fn start_coordinator(&mut self) -> Result<()> {
        self.started += 1;
        let args = self.coordinator_args(self.port);
        let log = self.dir.join(format!("coordinator-{}.log", self.started));
        let tmpfs = self.opts.coordinator_tmpfs.clone();
        if let Some((dir, _)) = &tmpfs {
            std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        }
        let tmpfs = tmpfs.as_ref().map(|(d, n)| (d.as_path(), *n));
        self.coordinator = Some(Process::spawn_in(
            &self.bin,
            tmpfs,
            "coordinator",
            &args,
            log,
        )?);
        self.wait_for("the coordinator to serve", Duration::from_secs(30), |c| {
            c.client(&["list"]).is_ok_and(|o| o.status.success())
        })
    }

    /// Starts the standby coordinator on a port of its own and waits until it stands by.
    fn start_standby(&mut self) -> Result<()> {
        let port = free_port();
        let args = self.coordinator_args(port);
        let log = self.dir.join("standby.log");
        self.standby = Some((Process::spawn(&self.bin, "standby", &args, log)?, port));
        self.wait_for("the standby to stand by", Duration::from_secs(30), |c| {
            c.standby_log().contains("standing by")
        })
    }

    /// The standby coordinator's log.
    pub fn standby_log(&self) -> String {
        self.standby
            .as_ref()
            .map(|(p, _)| p.log())
            .unwrap_or_default()
    }

    /// The running coordinator process (to pause, signal or wait for).
    pub fn coordinator_process(&mut self) -> Option<&mut Process> {
        self.coordinator.as_mut()
    }

    pub fn kill_coordinator(&mut self) {
        if let Some(c) = &mut self.coordinator {
            c.kill();
        }
    }

    pub fn coordinator_pid(&self) -> Option<u32> {
        self.coordinator.as_ref().map(Process::pid)
    }

    /// Where the running (or last) coordinator logs.
    pub fn coordinator_log_path(&self) -> Option<&Path> {
        self.coordinator.as_ref().map(Process::log_path)
    }

    /// The running (or last) coordinator's log.
    pub fn coordinator_log(&self) -> String {
        self.coordinator
            .as_ref()
            .map(Process::log)
            .unwrap_or_default()
    }

    /// Starts a worker serving `model` with more `tessera worker` flags (`--model-name`,
    /// `--simulate-eval-ms`, …); it joins in the background (see
    /// [`LocalCluster::wait_workers`]).
    pub fn add_worker(&mut self, model: &Path, extra: &[String]) -> Result<()> {
        let coordinators = match self.standby_url() {
            Some(standby) => format!("{},{standby}", self.url()),
            None => self.url(),
        };
        let mut args = vec![
            "worker".to_string(),
            "--coordinator".into(),
            coordinators,
            "--redis".into(),
            self.redis.url_as("worker"),
            "--model".into(),
            model.display().to_string(),
        ];
        args.extend(self.redis_flags());
        args.extend(self.worker_token_flags());
        args.extend(self.server_tls());
        args.extend(extra.iter().cloned());
        let n = self.workers.len() + 1;
        let log = self.dir.join(format!("worker-{n}.log"));
        let name = format!("worker-{n}");
        self.workers
            .push(Process::spawn(&self.bin, &name, &args, log)?);
        Ok(())
    }

    /// Waits until the running coordinator has seen `n` workers join.
    pub fn wait_workers(&mut self, n: usize) -> Result<()> {
        let limit = Duration::from_secs(60 + 2 * n as u64);
        self.wait_for(&format!("{n} workers to join"), limit, |c| {
            c.coordinator_log().matches(" joined (").count() >= n
        })?;
        for w in &mut self.workers {
            if !w.alive() {
                return Err(HarnessError(format!("{} exited:\n{}", w.name, w.log())));
            }
        }
        Ok(())
    }

    /// Polls `ok` every 50 ms for up to `limit`; fails early when the coordinator exits.
    pub fn wait_for(
        &mut self,
        what: &str,
        limit: Duration,
        ok: impl Fn(&Self) -> bool,
    ) -> Result<()> {
        let start = Instant::now();
        while !ok(self) {
            let coordinator = self.coordinator.as_mut();
            if coordinator.is_some_and(|c| !c.alive()) {
                return Err(HarnessError(format!(
                    "the coordinator exited while waiting for {what}:\n{}",
                    self.logs()
                )));
            }
            if start.elapsed() > limit {
                return Err(HarnessError(format!(
                    "gave up waiting for {what} after {limit:?}:\n{}",
                    self.logs()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Runs a `tessera` client command (`args[0]` is the subcommand) against this cluster,
    /// whatever its exit status.
    pub fn client(&self, args: &[&str]) -> Result<Output> {
        self.client_to(&self.url(), args)
    }

    /// [`LocalCluster::client`] against the coordinator at `url` (the standby's, say).
    pub fn client_to(&self, url: &str, args: &[&str]) -> Result<Output> {
        self.client_within(url, args, CLIENT_LIMIT)
    }

    /// [`LocalCluster::client_to`], killed (and an error) after `limit`: no wait of a test is
    /// unbounded.
    pub fn client_within(&self, url: &str, args: &[&str], limit: Duration) -> Result<Output> {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args)
            .args(self.client_flags_for(url))
            .env("NO_COLOR", "1");
        output_within(cmd, limit, &format!("tessera {}", args.join(" ")))
    }

    /// [`LocalCluster::client`], failing unless the command succeeds; its stdout, trimmed.
    pub fn client_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.client(args)?;
        if !out.status.success() {
            return Err(HarnessError(format!(
                "tessera {} failed: {}\n{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim(),
                self.logs()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Keys in Redis matching `pattern`.
    pub fn redis_keys(&self, pattern: &str) -> Vec<String> {
        self.redis.scan(pattern)
    }

    /// Every process's log, for a failing test's message.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        if let Some(c) = &self.coordinator {
            s.push_str(&format!("--- coordinator ---\n{}\n", c.log()));
        }
        if let Some((p, _)) = &self.standby {
            s.push_str(&format!("--- standby ---\n{}\n", p.log()));
        }
        for w in &self.workers {
            s.push_str(&format!("--- {} ---\n{}\n", w.name, w.log()));
        }
        s
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.workers.clear();
        self.coordinator = None;
        self.standby = None;
        self.redis.kill();
    }
}

/// The longest a client command of a test may take (a `watch` of a whole job included).
const CLIENT_LIMIT: Duration = Duration::from_secs(600);

/// Runs `cmd` to its end and returns its output; kills it and fails after `limit`.
pub fn output_within(mut cmd: Command, limit: Duration, what: &str) -> Result<Output> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io(format!("running {what}")))?;
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.map_err(io(format!("running {what}"))),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-s", "KILL", &pid.to_string()])
                .status();
            Err(HarnessError(format!("{what} did not end within {limit:?}")))
        }
    }
}

/// A fresh directory in the system's temporary directory, removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// `tessera-NAME-PID-N`, emptied if it exists.
    pub fn new(name: &str) -> Result<Scratch> {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("tessera-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
        Ok(Scratch(dir))
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
