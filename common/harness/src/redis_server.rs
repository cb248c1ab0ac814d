//! A real `redis-server` per test or benchmark, so store and cluster tests exercise the real
//! protocol, AUTH, TTLs and restarts instead of a fake.
//!
//! Everything here is synchronous, so plain `#[test]`s can use it, and panics with a
//! message saying what to fix, as test setup should.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// How long a starting server may take to answer PING (it may be loading an AOF).
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Fresh ports tried when another process grabs the one we picked before the server binds it.
const PORT_ATTEMPTS: usize = 5;

/// The deployment recipes' ACL users: role, user name, password (a test's).
const ROLE_USERS: [(&str, &str, &str); 2] = [
    (
        "coordinator",
        "tessera-coordinator",
        "coordinator-test-password",
    ),
    ("worker", "tessera-worker", "worker-test-password"),
];

/// What each recipe user may do, as `deploy/` and SECURITY.md set it.
fn role_rules(user: &str) -> &'static [&'static str] {
    if user == "tessera-worker" {
        &["~tessera:job:*", "&*", "+@all", "-@dangerous"]
    } else {
        &["~tessera:*", "&*", "+@all"]
    }
}

/// How to run the server.
#[derive(Debug, Clone, Default)]
pub struct RedisServerOptions {
    /// Append-only file on: data written before a kill is back after [`RedisServer::restart`].
    pub aof: bool,
    /// `requirepass`: clients must authenticate.
    pub password: Option<String>,
    /// An ACL user (name, password) with every permission; the default user is turned off,
    /// so clients must log in as this one (`redis://NAME:PASSWORD@…`).
    pub user: Option<(String, String)>,
    /// Also the two ACL users of the deployment recipes (SECURITY.md): `tessera-coordinator`
    /// (every `tessera:` key) and `tessera-worker` (job keys only, no dangerous commands). A
    /// cluster connects its coordinator and workers as these ([`RedisServer::url_as`]).
    pub role_users: bool,
    /// Clients connect over TLS (`rediss://`), with a certificate for 127.0.0.1 signed by a CA
    /// made for this server ([`RedisServer::ca`]). Needs the `openssl` command.
    pub tls: bool,
    /// A node of a Redis Cluster (`cluster-enabled yes`, its node file in its directory, so a
    /// restarted node rejoins); [`crate::RedisCluster`] starts these and assigns the slots.
    /// With `tls`, the cluster bus is TLS too (`tls-cluster yes`).
    pub cluster_node: bool,
    /// With `tls`: the directory whose `ca.pem`, `server.pem` and `server.key` the server uses
    /// instead of making its own. The nodes of a TLS Redis Cluster authenticate each other on
    /// the cluster bus, so they must share one CA.
    pub certs_from: Option<PathBuf>,
}

/// A `redis-server` child process on a free loopback port with its own directory; killed and
/// its directory removed on drop.
#[derive(Debug)]
pub struct RedisServer {
    /// The port clients use (TLS when `opts.tls`).
    port: u16,
    /// With TLS, a plain port on which the harness itself talks to the server; else `port`.
    admin_port: u16,
    /// A cluster node's bus port, picked free (the default, port + 10000, may be taken or
    /// beyond 65535); kept across restarts.
    bus_port: u16,
    dir: PathBuf,
    opts: RedisServerOptions,
    child: Option<Child>,
}

impl RedisServer {
    /// A server without persistence or password.
    pub fn start() -> RedisServer {
        Self::start_with(RedisServerOptions::default())
    }

    pub fn start_with(opts: RedisServerOptions) -> RedisServer {
        check_installed();
        let dir = fresh_dir();
        match (&opts.certs_from, opts.tls) {
            (_, false) => {}
            (None, true) => make_certificates(&dir),
            (Some(from), true) => {
                for name in ["ca.pem", "server.pem", "server.key"] {
                    fs::copy(from.join(name), dir.join(name))
                        .unwrap_or_else(|e| panic!("copying {name} from {}: {e}", from.display()));
                }
            }
        }
        let mut server = RedisServer {
            port: 0,
            admin_port: 0,
            bus_port: 0,
            dir,
            opts,
            child: None,
        };
        let mut last_error = String::new();
        for _ in 0..PORT_ATTEMPTS {
            server.port = free_port();
            server.admin_port = server.port;
            while server.opts.tls && server.admin_port == server.port {
                server.admin_port = free_port();
            }
            server.bus_port = free_port();
            match server.launch() {
                Ok(()) => return server,
                // Most likely the port was taken between our probe and the server's bind.
                Err(e) => last_error = e,
            }
        }
        panic!("redis-server did not start after {PORT_ATTEMPTS} attempts: {last_error}");
    }

    /// `redis://[[user]:password@]127.0.0.1:PORT/0`, `rediss://` with TLS.
    pub fn url(&self) -> String {
        let scheme = if self.opts.tls { "rediss" } else { "redis" };
        match self.credentials() {
            Some((user, p)) => format!(
                "{scheme}://{}:{}@127.0.0.1:{}/0",
                url_encode(user),
                url_encode(p),
                self.port
            ),
            None => format!("{scheme}://127.0.0.1:{}/0", self.port),
        }
    }

    /// [`RedisServer::url`] for a cluster role (`coordinator` or `worker`): logged in as the
    /// role's ACL user when the server has them ([`RedisServerOptions::role_users`]).
    pub fn url_as(&self, role: &str) -> String {
        let Some((user, password)) = ROLE_USERS
            .iter()
            .find(|(r, _, _)| *r == role)
            .map(|(_, u, p)| (u, p))
        else {
            return self.url();
        };
        if !self.opts.role_users {
            return self.url();
        }
        let scheme = if self.opts.tls { "rediss" } else { "redis" };
        format!("{scheme}://{user}:{password}@127.0.0.1:{}/0", self.port)
    }

    /// The `USER:PASSWORD@` of role `role`'s ACL user when the server has them, else of the
    /// server's own login; empty without either.
    pub(crate) fn userinfo_as(&self, role: &str) -> String {
        let role_user = ROLE_USERS
            .iter()
            .find(|(r, _, _)| *r == role)
            .filter(|_| self.opts.role_users)
            .map(|(_, u, p)| (*u, *p));
        match role_user.or_else(|| self.credentials()) {
            Some((user, p)) => format!("{}:{}@", url_encode(user), url_encode(p)),
            None => String::new(),
        }
    }

    /// Who clients log in as: the ACL user, or the default user's password.
    pub(crate) fn credentials(&self) -> Option<(&str, &str)> {
        match (&self.opts.user, &self.opts.password) {
            (Some((user, p)), _) => Some((user, p)),
            (None, Some(p)) => Some(("", p)),
            (None, None) => None,
        }
    }

    /// With TLS, the PEM file of the CA that signed the server's certificate.
    pub fn ca(&self) -> Option<PathBuf> {
        self.opts.tls.then(|| self.dir.join("ca.pem"))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The plain port the harness itself uses (the clients' port without TLS).
    pub(crate) fn admin_port(&self) -> u16 {
        self.admin_port
    }

    /// The server's directory (its AOF and its log, `redis.log`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Number of keys in database 0.
    pub fn dbsize(&self) -> usize {
        let reply = self
            .command(&["DBSIZE"])
            .unwrap_or_else(|e| panic!("DBSIZE on redis-server :{}: {e}", self.port));
        reply
            .strip_prefix(':')
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("DBSIZE answered {reply:?}"))
    }

    /// `redis-cli` on the plain admin port, logged in (it comes with redis-server).
    pub(crate) fn cli(&self) -> Command {
        let mut cmd = Command::new("redis-cli");
        cmd.args(["-p", &self.admin_port.to_string()]);
        if let Some((user, p)) = self.credentials() {
            cmd.args(["--no-auth-warning", "-a", p]);
            if !user.is_empty() {
                cmd.args(["--user", user]);
            }
        }
        cmd
    }

    /// Bytes the server has read from and written to its clients since it started
    /// (`INFO stats`: `total_net_input_bytes + total_net_output_bytes`); `None` when it does
    /// not answer.
    pub fn net_bytes(&self) -> Option<u64> {
        let v = self.info(
            "stats",
            &["total_net_input_bytes", "total_net_output_bytes"],
        )?;
        Some((v[0] + v[1]) as u64)
    }

    /// CPU seconds the server has used since it started (`INFO cpu`: user + system).
    pub fn cpu_seconds(&self) -> Option<f64> {
        let v = self.info("cpu", &["used_cpu_user", "used_cpu_sys"])?;
        Some(v[0] + v[1])
    }

    /// Numeric fields of one `INFO` section, in the order asked; `None` when one is missing.
    fn info(&self, section: &str, names: &[&str]) -> Option<Vec<f64>> {
        let out = self.cli().args(["INFO", section]).output().ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        names
            .iter()
            .map(|name| {
                text.lines()
                    .find_map(|l| l.trim().strip_prefix(name)?.strip_prefix(':'))
                    .and_then(|v| v.parse().ok())
            })
            .collect()
    }

    /// Keys matching `pattern` (a Redis glob), through `redis-cli --scan`.
    pub fn scan(&self, pattern: &str) -> Vec<String> {
        let out = self
            .cli()
            .args(["--scan", "--pattern", pattern])
            .output()
            .unwrap_or_else(|e| panic!("running redis-cli --scan: {e}"));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// Deletes the keys matching `pattern` held by this server; how many there were. One
    /// `DEL` per key (keys of a Redis Cluster node lie in different slots, which one `DEL`
    /// refuses), all sent through one `redis-cli` reading them from its input.
    pub fn delete_matching(&self, pattern: &str) -> usize {
        let keys = self.scan(pattern);
        if keys.is_empty() {
            return 0;
        }
        let mut child = self
            .cli()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("running redis-cli: {e}"));
        let commands: String = keys.iter().map(|k| format!("DEL {k}\n")).collect();
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(commands.as_bytes())
            .unwrap_or_else(|e| panic!("writing to redis-cli: {e}"));
        let out = child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("running redis-cli: {e}"));
        let replies = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && replies.lines().all(|l| l.trim() == "1"),
            "redis-cli DEL of {} keys: {replies}",
            keys.len()
        );
        keys.len()
    }

    /// Kills the server with SIGKILL, like a crash of the process: what it acknowledged is
    /// in its AOF (written before the reply), what it had not is lost.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Errors mean it has exited already.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Shuts the server down cleanly (SHUTDOWN, which flushes the AOF).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // The connection drops as the server exits, so the reply is usually an error.
            let _ = self.command(&["SHUTDOWN"]);
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and directory (after [`kill`](Self::kill) or
    /// [`stop`](Self::stop); a running server is killed first) and waits until it answers
    /// PING, so with AOF on its data is back.
    pub fn restart(&mut self) {
        self.kill();
        if let Err(e) = self.launch() {
            panic!("restarting redis-server on port {}: {e}", self.port);
        }
    }

    fn launch(&mut self) -> Result<(), String> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("redis.log"))
            .map_err(|e| format!("creating the log in {}: {e}", self.dir.display()))?;
        let log_err = log
            .try_clone()
            .map_err(|e| format!("duplicating the log handle: {e}"))?;
        let mut cmd = Command::new("redis-server");
        cmd.arg("--port").arg(self.admin_port.to_string());
        if self.opts.tls {
            let file = |name: &str| self.dir.join(name);
            cmd.arg("--tls-port")
                .arg(self.port.to_string())
                .arg("--tls-cert-file")
                .arg(file("server.pem"))
                .arg("--tls-key-file")
                .arg(file("server.key"))
                .arg("--tls-ca-cert-file")
                .arg(file("ca.pem"))
                .args(["--tls-auth-clients", "no"]);
        }
        cmd.args(["--bind", "127.0.0.1", "--save", ""])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--appendonly", if self.opts.aof { "yes" } else { "no" }]);
        if self.opts.cluster_node {
            // A short node timeout: a killed shard is noticed (CLUSTERDOWN) within a second.
            cmd.args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
            ])
            .args(["--cluster-node-timeout", "1000"])
            .arg("--cluster-port")
            .arg(self.bus_port.to_string());
            if self.opts.tls {
                cmd.args(["--tls-cluster", "yes"]);
            }
        }
        if let Some(p) = &self.opts.password {
            cmd.args(["--requirepass", p]);
        }
        if let Some((user, p)) = &self.opts.user {
            cmd.args(["--user", user, "on", &format!(">{p}"), "~*", "&*", "+@all"])
                .args(["--user", "default", "off"]);
        }
        if self.opts.role_users {
            for (_, user, password) in ROLE_USERS {
                cmd.args(["--user", user, "on", &format!(">{password}")]);
                cmd.args(role_rules(user));
            }
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|e| format!("running redis-server: {e}"))?;
        self.child = Some(child);
        self.wait_for_ping()
    }

    fn wait_for_ping(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let child = self.child.as_mut().expect("launched");
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Err(format!(
                    "redis-server on port {} exited ({status}); its log ends with:\n{}",
                    self.port,
                    self.log_tail()
                ));
            }
            match self.command(&["PING"]) {
                Ok(reply) if reply == "+PONG" => return Ok(()),
                // "-LOADING ..." while it reads its AOF, or not listening yet.
                Ok(_) | Err(_) if Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(10))
                }
                other => {
                    self.kill();
                    return Err(format!(
                        "redis-server on port {} did not answer PING within {START_TIMEOUT:?} \
                         (last: {other:?}); its log ends with:\n{}",
                        self.port,
                        self.log_tail()
                    ));
                }
            }
        }
    }

    /// Sends one command on a fresh connection (authenticating first if there is a password)
    /// and returns its one-line reply (`+OK`, `:3`, `-ERR ...`).
    fn command(&self, args: &[&str]) -> std::io::Result<String> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.admin_port));
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut request = Vec::new();
        let mut replies = 1;
        match self.credentials() {
            Some(("", p)) => request.extend(resp(&["AUTH", p])),
            Some((user, p)) => request.extend(resp(&["AUTH", user, p])),
            None => replies -= 1,
        }
        replies += 1;
        request.extend(resp(args));
        stream.write_all(&request)?;
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        for _ in 0..replies {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(line.trim_end().to_string())
    }

    fn log_tail(&self) -> String {
        let mut text = String::new();
        let _ = fs::File::open(self.dir.join("redis.log"))
            .and_then(|mut f| f.read_to_string(&mut text));
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn check_installed() {
    let found = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        panic!(
            "redis-server is not installed: run `apt-get install -y redis-server` \
             (tests/run.sh does this)"
        );
    }
}

/// A CA and a server certificate for 127.0.0.1 and localhost, signed by it, in `dir`:
/// `ca.pem`, `server.pem`, `server.key`. Also used by the cluster's TLS test.
pub fn make_certificates(dir: &Path) {
    // Client authentication too: the nodes of a TLS Redis Cluster present this certificate to
    // each other on the cluster bus, which verifies both ends.
    let ext = "basicConstraints=CA:FALSE\n\
               keyUsage=digitalSignature,keyEncipherment\n\
               extendedKeyUsage=serverAuth,clientAuth\n\
               subjectAltName=IP:127.0.0.1,DNS:localhost\n";
    fs::write(dir.join("server.ext"), ext).expect("writing server.ext");
    let key = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    let steps = [
        format!("req -x509 {key} -keyout ca.key -out ca.pem -days 2 -subj /CN=tessera-test-ca"),
        format!("req {key} -keyout server.key -out server.csr -subj /CN=localhost"),
        "x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem \
         -days 2 -extfile server.ext"
            .to_string(),
    ];
    for step in steps {
        match Command::new("openssl")
            .args(step.split_whitespace())
            .current_dir(dir)
            .output()
        {
            Ok(out) if out.status.success() => {}
            Ok(out) => panic!(
                "openssl {step} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => panic!(
                "running openssl to make test certificates: {e} \
                 (install it with `apt-get install -y openssl`)"
            ),
        }
    }
}

/// A port nothing listens on right now. Another process may take it before the server binds
/// it; `start_with` then tries another.
pub(crate) fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free loopback port: {e}"))
}

fn fresh_dir() -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let dir = std::env::temp_dir().join(format!(
        "tessera-redis-{}-{}-{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}

/// One command in RESP, so arguments may hold spaces or any bytes.
fn resp(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend(format!("${}\r\n{a}\r\n", a.len()).into_bytes());
    }
    out
}

/// Percent-encodes everything but unreserved characters, for a password inside a URL.
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_counts_and_cleans_up() {
        let server = RedisServer::start();
        assert_eq!(server.dbsize(), 0);
        assert!(server.url().starts_with("redis://127.0.0.1:"));
        let dir = server.dir().to_path_buf();
        assert!(dir.exists());
        drop(server);
        assert!(!dir.exists());
    }

    #[test]
    fn aof_data_survives_kill_and_restart() {
        let mut server = RedisServer::start_with(RedisServerOptions {
            aof: true,
            password: Some("p w%".into()),
            ..RedisServerOptions::default()
        });
        assert_eq!(server.command(&["SET", "k", "v"]).unwrap(), "+OK");
        server.kill();
        assert!(server.command(&["PING"]).is_err());
        server.restart();
        assert_eq!(server.dbsize(), 1);
        server.stop();
        server.restart();
        assert_eq!(server.dbsize(), 1);
        assert!(server.url().contains(":p%20w%25@"), "{}", server.url());
    }

    #[test]
    fn an_acl_user_is_the_only_way_in() {
        let server = RedisServer::start_with(RedisServerOptions {
            user: Some(("tessera".into(), "s3cret".into())),
            ..RedisServerOptions::default()
        });
        assert_eq!(server.command(&["SET", "k", "v"]).unwrap(), "+OK");
        assert_eq!(server.dbsize(), 1);
        assert!(
            server.url().starts_with("redis://tessera:s3cret@"),
            "{}",
            server.url()
        );
        assert_eq!(server.scan("*"), vec!["k".to_string()]);
        let before = server.net_bytes().expect("INFO stats answers");
        let value = "x".repeat(10_000);
        assert_eq!(server.command(&["SET", "big", &value]).unwrap(), "+OK");
        let after = server.net_bytes().expect("INFO stats answers");
        assert!(after >= before + 10_000, "{before} -> {after}");
        assert!(server.cpu_seconds().is_some_and(|s| s >= 0.0));
        let mut anonymous = TcpStream::connect(("127.0.0.1", server.port())).unwrap();
        anonymous.write_all(&resp(&["GET", "k"])).unwrap();
        let mut line = String::new();
        BufReader::new(anonymous).read_line(&mut line).unwrap();
        assert!(line.starts_with("-NOAUTH"), "{line}");
    }
}
