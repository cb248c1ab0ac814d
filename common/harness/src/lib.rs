//! Real local processes for the cross-process tests and `tessera bench`: a scratch
//! `redis-server` (with AOF, a password or TLS) that can be killed and restarted, TLS
//! certificates, and a whole loopback cluster (Redis, a coordinator, workers) driven through
//! the real binary. Nothing here is linked into a worker or the maths.
mod cleanup;
mod cluster;
mod redis_cluster;
mod redis_server;

pub use cleanup::remove_at_exit;
pub use cluster::{output_within, ClusterOptions, HarnessError, LocalCluster, Process, Scratch};
pub use redis_cluster::{Redis, RedisCluster};
pub use redis_server::{make_certificates, RedisServer, RedisServerOptions};
