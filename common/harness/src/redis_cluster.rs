//! A real Redis Cluster on loopback: `redis-server` nodes with `cluster-enabled yes` and AOF,
//! their slots assigned by `redis-cli --cluster create`, each shard killable and restartable
//! (a restarted shard keeps its data and rejoins). And [`Redis`], the store a
//! [`crate::LocalCluster`] runs on: one Redis or a cluster.

use std::thread;
use std::time::{Duration, Instant};

use crate::redis_server::{RedisServer, RedisServerOptions};

/// How long the cluster may take to serve every slot (after creation or a shard's restart).
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A Redis Cluster of masters without replicas, one [`RedisServer`] per shard.
#[derive(Debug)]
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// `shards` masters with AOF (and `opts`' passwords or ACL users), slots spread evenly;
    /// returns once every node says `cluster_state:ok`. With `opts.tls` clients and the
    /// cluster bus speak TLS, every node with a certificate of the first node's CA.
    pub fn start(shards: usize, opts: RedisServerOptions) -> RedisCluster {
        assert!(shards >= 1, "a Redis Cluster needs a shard");
        let node_opts = RedisServerOptions {
            aof: true,
            cluster_node: true,
            ..opts
        };
        let mut nodes = vec![RedisServer::start_with(node_opts.clone())];
        let others = RedisServerOptions {
            certs_from: node_opts.tls.then(|| nodes[0].dir().to_path_buf()),
            ..node_opts
        };
        nodes.extend((1..shards).map(|_| RedisServer::start_with(others.clone())));
        let mut create = nodes[0].cli();
        create.arg("--cluster").arg("create");
        // The harness's own plain ports (with TLS the clients' ports speak only TLS).
        create.args(
            nodes
                .iter()
                .map(|n| format!("127.0.0.1:{}", n.admin_port())),
        );
        create.args(["--cluster-replicas", "0", "--cluster-yes"]);
        let out = create
            .output()
            .unwrap_or_else(|e| panic!("running redis-cli --cluster create: {e}"));
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = RedisCluster { nodes };
        cluster.wait_ready();
        cluster
    }

    /// `redis-cluster://[USER:PASSWORD@]127.0.0.1:P1,127.0.0.1:P2,...` (`rediss-cluster://`
    /// over TLS).
    pub fn url(&self) -> String {
        self.url_as("")
    }

    /// [`RedisCluster::url`] logged in as a role's ACL user (see [`RedisServer::url_as`]).
    pub fn url_as(&self, role: &str) -> String {
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        let scheme = if self.nodes[0].ca().is_some() {
            "rediss-cluster"
        } else {
            "redis-cluster"
        };
        format!(
            "{scheme}://{}{}",
            self.nodes[0].userinfo_as(role),
            nodes.join(",")
        )
    }

    /// Kills shard `i` with SIGKILL (the others soon answer CLUSTERDOWN).
    pub fn kill_shard(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Starts shard `i` again on its port and directory (its AOF and node file) and waits
    /// until the cluster serves every slot again.
    pub fn restart_shard(&mut self, i: usize) {
        self.nodes[i].restart();
        self.wait_ready();
    }

    /// Waits until every node reports `cluster_state:ok`.
    pub fn wait_ready(&self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        let ok = |n: &RedisServer| {
            n.cli()
                .args(["CLUSTER", "INFO"])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("cluster_state:ok"))
        };
        while !self.nodes.iter().all(ok) {
            assert!(
                Instant::now() < deadline,
                "the Redis Cluster did not reach cluster_state:ok within {READY_TIMEOUT:?}"
            );
            thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The store a [`crate::LocalCluster`] runs on.
#[derive(Debug)]
pub enum Redis {
    One(RedisServer),
    Cluster(RedisCluster),
}

impl Redis {
    fn nodes(&self) -> &[RedisServer] {
        match self {
            Self::One(s) => std::slice::from_ref(s),
            Self::Cluster(c) => &c.nodes,
        }
    }

    /// The URL for `--redis`.
    pub fn url(&self) -> String {
        match self {
            Self::One(s) => s.url(),
            Self::Cluster(c) => c.url(),
        }
    }

    /// The URL for a cluster role (`coordinator`, `worker`).
    pub fn url_as(&self, role: &str) -> String {
        match self {
            Self::One(s) => s.url_as(role),
            Self::Cluster(c) => c.url_as(role),
        }
    }

    pub fn ca(&self) -> Option<std::path::PathBuf> {
        self.nodes()[0].ca()
    }

    /// The Redis Cluster, when it is one.
    pub fn cluster_mut(&mut self) -> Option<&mut RedisCluster> {
        match self {
            Self::One(_) => None,
            Self::Cluster(c) => Some(c),
        }
    }

    /// Kills every node (SIGKILL).
    pub fn kill(&mut self) {
        match self {
            Self::One(s) => s.kill(),
            Self::Cluster(c) => c.nodes.iter_mut().for_each(RedisServer::kill),
        }
    }

    /// Restarts every node (and waits until a cluster serves every slot).
    pub fn restart(&mut self) {
        match self {
            Self::One(s) => s.restart(),
            Self::Cluster(c) => {
                c.nodes.iter_mut().for_each(RedisServer::restart);
                c.wait_ready();
            }
        }
    }

    /// Deletes the keys matching `pattern` on every node (each where it lies); how many.
    pub fn delete_matching(&self, pattern: &str) -> usize {
        self.nodes()
            .iter()
            .map(|n| n.delete_matching(pattern))
            .sum()
    }

    /// Every node's port.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes().iter().map(RedisServer::port).collect()
    }

    /// Keys on all nodes.
    pub fn dbsize(&self) -> usize {
        self.nodes().iter().map(RedisServer::dbsize).sum()
    }

    /// Keys matching `pattern` on all nodes.
    pub fn scan(&self, pattern: &str) -> Vec<String> {
        self.nodes().iter().flat_map(|n| n.scan(pattern)).collect()
    }

    /// Each node's bytes in and out ([`RedisServer::net_bytes`]).
    pub fn net_bytes(&self) -> Vec<Option<u64>> {
        self.nodes().iter().map(RedisServer::net_bytes).collect()
    }

    /// Each node's CPU seconds ([`RedisServer::cpu_seconds`]).
    pub fn cpu_seconds(&self) -> Vec<Option<f64>> {
        self.nodes().iter().map(RedisServer::cpu_seconds).collect()
    }

    /// Each node's key count.
    pub fn shard_keys(&self) -> Vec<usize> {
        self.nodes().iter().map(RedisServer::dbsize).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_three_shard_cluster_forms_and_survives_a_shard_restart() {
        let mut cluster = RedisCluster::start(3, RedisServerOptions::default());
        let url = cluster.url();
        assert!(url.starts_with("redis-cluster://127.0.0.1:"), "{url}");
        assert_eq!(url.matches(',').count(), 2, "{url}");
        // Keys of different slots land on different shards.
        for i in 0..30 {
            let key = format!("k{i}");
            let out = cluster.nodes[0]
                .cli()
                .args(["-c", "SET", &key, "v"])
                .output()
                .unwrap();
            assert!(out.status.success());
        }
        let per: Vec<usize> = cluster.nodes.iter().map(RedisServer::dbsize).collect();
        assert_eq!(per.iter().sum::<usize>(), 30, "{per:?}");
        assert!(per.iter().all(|&n| n > 0), "{per:?}");
        cluster.kill_shard(1);
        cluster.restart_shard(1);
        assert_eq!(
            cluster.nodes[1].dbsize(),
            per[1],
            "the AOF kept shard 1's keys"
        );
    }
}
