//! The Redis Cluster recipe (`deploy/redis-cluster/`) on real servers: three `redis-server`s
//! started with the StatefulSet's own arguments (its hostnames and volume paths made local),
//! joined by the recipe's own `create-cluster.sh`, which must be harmless on a second run; the
//! ACL users the recipe gives each node must allow what each role does.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const COORDINATOR_PASSWORD: &str = "recipe-coordinator-password";
const WORKER_PASSWORD: &str = "recipe-worker-password";

fn recipe() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/redis-cluster")
}

/// The quoted items of the first `args: [ … ]` flow list in `yaml` (it may span lines).
fn flow_list(yaml: &str, key: &str) -> Vec<String> {
    let start = yaml
        .find(&format!("{key}: ["))
        .unwrap_or_else(|| panic!("no `{key}: [` list in the recipe"));
    let rest = &yaml[start..];
    let end = rest.find(']').expect("the list ends");
    rest[..end]
        .split('"')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

/// The StatefulSet's redis-server arguments for a local node on `port` keeping its files in `dir`.
fn node_args(port: u16, dir: &Path) -> Vec<String> {
    let yaml = std::fs::read_to_string(recipe().join("redis-cluster.yaml")).expect("recipe");
    let args = flow_list(&yaml, "args");
    assert_eq!(args.first().map(String::as_str), Some("redis-server"));
    let mut local: Vec<String> = args[1..]
        .iter()
        .map(|a| {
            a.replace("$(POD_NAME).tessera-redis-cluster", "localhost")
                .replace("$(REDIS_COORDINATOR_PASSWORD)", COORDINATOR_PASSWORD)
                .replace("$(REDIS_WORKER_PASSWORD)", WORKER_PASSWORD)
                .replace("/data/", &format!("{}/", dir.display()))
        })
        .collect();
    local.extend(["--port".into(), port.to_string()]);
    local.extend(["--dir".into(), dir.display().to_string()]);
    local
}

fn free_port() -> u16 {
    // A cluster node also binds port + 10000 (its bus): pick one whose bus port is free too.
    loop {
        let l = TcpListener::bind("127.0.0.1:0").expect("a free port");
        let port = l.local_addr().expect("address").port();
        if port < 55535 && TcpListener::bind(("127.0.0.1", port + 10000)).is_ok() {
            return port;
        }
    }
}

/// The three nodes, killed on drop.
struct Nodes {
    children: Vec<Child>,
    ports: Vec<u16>,
    dir: PathBuf,
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_nodes() -> Nodes {
    let dir = std::env::temp_dir().join(format!(
        "tessera-recipe-cluster-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let mut nodes = Nodes {
        children: Vec::new(),
        ports: Vec::new(),
        dir,
    };
    for i in 0..3 {
        let port = free_port();
        let node_dir = nodes.dir.join(format!("node{i}"));
        std::fs::create_dir_all(&node_dir).expect("node dir");
        let log = std::fs::File::create(node_dir.join("redis.log")).expect("log");
        let child = Command::new("redis-server")
            .args(node_args(port, &node_dir))
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("redis-server is installed (tests/run.sh installs it)");
        nodes.children.push(child);
        nodes.ports.push(port);
    }
    nodes
}

fn create_cluster(nodes: &Nodes) -> Output {
    let list: Vec<String> = nodes
        .ports
        .iter()
        .map(|p| format!("localhost:{p}"))
        .collect();
    Command::new("sh")
        .arg(recipe().join("create-cluster.sh"))
        .env("REDIS_CLUSTER_NODES", list.join(" "))
        .env("REDIS_COORDINATOR_PASSWORD", COORDINATOR_PASSWORD)
        .env("REDIS_CLUSTER_WAIT", "30")
        .stdin(Stdio::null())
        .output()
        .expect("sh runs")
}

/// `redis-cli -c` on `port` as `user`; stdout trimmed.
fn cli(port: u16, user: &str, password: &str, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["--no-auth-warning", "-c", "-p", &port.to_string()])
        .args(["--user", user, "--pass", password])
        .args(args)
        .output()
        .expect("redis-cli is installed with redis-server");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Tessera's own store, through the recipe's cluster URL (its nodes announce host names) as
/// each role's user: the workers' task outputs land on every master and read back.
fn store_round_trip(nodes: &Nodes) {
    use tessera_store::{keys, RedisOptions, RedisStore, Store};
    let seeds: Vec<String> = nodes
        .ports
        .iter()
        .map(|p| format!("localhost:{p}"))
        .collect();
    let url = |user: &str, password: &str| {
        format!("redis-cluster://{user}:{password}@{}", seeds.join(","))
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let connect = |url: String| {
        rt.block_on(RedisStore::connect(&url, RedisOptions::default()))
            .unwrap_or_else(|e| panic!("connecting to the recipe's cluster: {e}"))
    };
    let worker = connect(url("tessera-worker", WORKER_PASSWORD));
    let outputs: Vec<String> = (0..24)
        .map(|t| keys::task("recipe0", 1, 2, t, "out"))
        .collect();
    for key in &outputs {
        worker
            .put(key, key.as_bytes())
            .expect("a worker writes its output");
    }
    let coordinator = connect(url("tessera-coordinator", COORDINATOR_PASSWORD));
    let read = coordinator.get_many(&outputs).expect("read back");
    for (key, value) in outputs.iter().zip(read) {
        assert_eq!(value.as_deref(), Some(key.as_bytes()), "{key}");
    }
    for &port in &nodes.ports {
        let pattern = format!("{}*", keys::job_prefix("recipe0"));
        let held = cli(
            port,
            "tessera-coordinator",
            COORDINATOR_PASSWORD,
            &["keys", &pattern],
        );
        assert!(
            !held.is_empty(),
            "master {port} holds none of the job's keys"
        );
    }
    assert_eq!(
        coordinator.delete_prefix(&keys::job_prefix("recipe0")).ok(),
        Some(24)
    );
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn the_recipe_creates_a_healthy_cluster_once_with_each_roles_acl() {
    let nodes = start_nodes();
    let first = create_cluster(&nodes);
    assert!(
        first.status.success(),
        "create-cluster.sh failed:\n{}",
        text(&first)
    );
    assert!(text(&first).contains("cluster healthy"), "{}", text(&first));

    let deadline = Instant::now() + Duration::from_secs(20);
    for &port in &nodes.ports {
        let info = cli(
            port,
            "tessera-coordinator",
            COORDINATOR_PASSWORD,
            &["cluster", "info"],
        );
        assert!(info.contains("cluster_state:ok"), "node {port}: {info}");
        assert!(info.contains("cluster_slots_assigned:16384"), "{info}");
        assert!(info.contains("cluster_known_nodes:3"), "{info}");
        assert!(Instant::now() < deadline, "cluster checks took too long");
    }

    // A second run (a restarted compose project, a re-run Job) finds the cluster and keeps it.
    let again = create_cluster(&nodes);
    assert!(
        again.status.success(),
        "second run failed:\n{}",
        text(&again)
    );
    assert!(
        text(&again).contains("already form a cluster"),
        "{}",
        text(&again)
    );

    // The workers' user reaches job keys on whichever master holds them, and nothing else.
    let port = nodes.ports[0];
    let worker = |args: &[&str]| cli(port, "tessera-worker", WORKER_PASSWORD, args);
    for key in [
        "tessera:job:a:s1:t1:task0:out",
        "tessera:job:b:s1:t1:task9:out",
    ] {
        assert_eq!(worker(&["set", key, "x"]), "OK", "{key}");
        assert_eq!(worker(&["get", key]), "x", "{key}");
    }
    assert!(worker(&["set", "tessera:coordinator:lock", "x"]).contains("NOPERM"));
    assert!(worker(&["cluster", "slots"]).contains("localhost"));
    store_round_trip(&nodes);

    // The coordinator's user may write every tessera key.
    let coordinator = cli(
        port,
        "tessera-coordinator",
        COORDINATOR_PASSWORD,
        &["set", "tessera:queue:probe", "x"],
    );
    assert_eq!(coordinator, "OK");
}

#[test]
fn the_script_says_what_to_set_when_it_cannot_run() {
    let out = Command::new("sh")
        .arg(recipe().join("create-cluster.sh"))
        .env_remove("REDIS_CLUSTER_NODES")
        .env("REDIS_COORDINATOR_PASSWORD", COORDINATOR_PASSWORD)
        .output()
        .expect("sh runs");
    assert!(!out.status.success());
    assert!(text(&out).contains("REDIS_CLUSTER_NODES"), "{}", text(&out));

    let port = free_port();
    let out = Command::new("sh")
        .arg(recipe().join("create-cluster.sh"))
        .env("REDIS_CLUSTER_NODES", format!("localhost:{port}"))
        .env("REDIS_COORDINATOR_PASSWORD", COORDINATOR_PASSWORD)
        .env("REDIS_CLUSTER_WAIT", "2")
        .output()
        .expect("sh runs");
    assert!(!out.status.success());
    assert!(
        text(&out).contains(&format!("localhost:{port} did not answer PING")),
        "{}",
        text(&out)
    );
}
