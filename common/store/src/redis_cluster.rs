//! What a Redis Cluster store needs beyond one Redis: its URL (`redis-cluster://` with seed
//! nodes), the connection that is either kind, and the walks over every master that a prefix
//! scan needs. The key layout that keeps multi-key operations in one slot is `keys.rs`'s.

use std::collections::BTreeSet;

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, RedisResult, Value};

/// The scheme of a Redis Cluster URL, and its TLS twin.
pub const CLUSTER_SCHEME: &str = "redis-cluster://";
pub const CLUSTER_TLS_SCHEME: &str = "rediss-cluster://";

/// A connection to one Redis (reconnecting by itself) or to a Redis Cluster (following
/// MOVED and ASK, reconnecting to each node by itself). Commands and pipelines run on either;
/// on a cluster, a pipeline must stay in one slot ([`crate::WriteBatch`] splits its batches).
#[derive(Clone)]
pub enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// Whether `url` names a Redis Cluster.
pub fn is_cluster_url(url: &str) -> bool {
    let lower = url.get(..CLUSTER_TLS_SCHEME.len()).unwrap_or(url);
    lower.to_ascii_lowercase().starts_with(CLUSTER_SCHEME)
        || lower.eq_ignore_ascii_case(CLUSTER_TLS_SCHEME)
}

/// A parsed `redis-cluster://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...]`: one `redis://` (or
/// `rediss://`) URL per seed node, each with the credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterUrl {
    pub tls: bool,
    pub nodes: Vec<String>,
}

impl ClusterUrl {
    pub fn parse(url: &str) -> Result<ClusterUrl, String> {
        let (tls, rest) = if let Some(rest) = strip_scheme(url, CLUSTER_TLS_SCHEME) {
            (true, rest)
        } else if let Some(rest) = strip_scheme(url, CLUSTER_SCHEME) {
            (false, rest)
        } else {
            return Err(format!(
                "a Redis Cluster URL starts with {CLUSTER_SCHEME} or {CLUSTER_TLS_SCHEME}"
            ));
        };
        let (auth, hosts) = match rest.rsplit_once('@') {
            Some((auth, hosts)) => (Some(auth), hosts),
            None => (None, rest),
        };
        let hosts = hosts.trim_end_matches('/');
        if hosts.contains('/') {
            return Err(
                "a Redis Cluster has one database: leave the /DB off the URL (HOST:PORT,...)"
                    .into(),
            );
        }
        let scheme = if tls { "rediss" } else { "redis" };
        let nodes = hosts
            .split(',')
            .map(|node| {
                let (host, port) = node.rsplit_once(':').ok_or_else(|| {
                    format!("{node:?} is not HOST:PORT (each seed node needs its port)")
                })?;
                if host.is_empty() || port.parse::<u16>().is_err() {
                    return Err(format!("{node:?} is not HOST:PORT"));
                }
                Ok(match auth {
                    Some(auth) => format!("{scheme}://{auth}@{node}"),
                    None => format!("{scheme}://{node}"),
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(ClusterUrl { tls, nodes })
    }

    /// A client for these seed nodes; `ca` is the PEM of a private CA for TLS.
    pub fn builder(&self, ca: Option<Vec<u8>>) -> ClusterClientBuilder {
        let mut builder = ClusterClientBuilder::new(self.nodes.clone());
        if let Some(pem) = ca {
            builder = builder.certs(redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem),
            });
        }
        builder
    }
}

fn strip_scheme<'a>(url: &'a str, scheme: &str) -> Option<&'a str> {
    let head = url.get(..scheme.len())?;
    head.eq_ignore_ascii_case(scheme)
        .then(|| &url[scheme.len()..])
}

/// The address (host, port) of every master serving slots now (`CLUSTER SLOTS`).
pub async fn masters(conn: &mut ClusterConnection) -> RedisResult<Vec<(String, u16)>> {
    let slots: Value = conn
        .route_command(
            redis::cmd("CLUSTER").arg("SLOTS").clone(),
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
        )
        .await?;
    let mut found = BTreeSet::new();
    let Value::Array(ranges) = slots else {
        return Err(unexpected("CLUSTER SLOTS"));
    };
    for range in ranges {
        // [start, end, [host, port, id, ...], replicas...]
        let Value::Array(fields) = range else {
            return Err(unexpected("CLUSTER SLOTS"));
        };
        let Some(Value::Array(master)) = fields.get(2) else {
            return Err(unexpected("CLUSTER SLOTS"));
        };
        let host: String = redis::from_redis_value_ref(&master[0])?;
        let port: u16 = redis::from_redis_value_ref(&master[1])?;
        found.insert((host, port));
    }
    Ok(found.into_iter().collect())
}

/// One SCAN step on the master at `addr`.
pub async fn scan_master(
    conn: &mut ClusterConnection,
    addr: &(String, u16),
    cursor: u64,
    pattern: &str,
    count: usize,
) -> RedisResult<(u64, Vec<String>)> {
    let mut cmd = redis::cmd("SCAN");
    cmd.arg(cursor)
        .arg("MATCH")
        .arg(pattern)
        .arg("COUNT")
        .arg(count);
    let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
        host: addr.0.clone(),
        port: addr.1,
    });
    let reply = conn.route_command(cmd, route).await?;
    Ok(redis::from_redis_value(reply)?)
}

fn unexpected(what: &str) -> RedisError {
    RedisError::from((
        ErrorKind::UnexpectedReturnType,
        "unexpected reply",
        what.into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_urls_name_every_seed_with_the_credentials() {
        let u = ClusterUrl::parse("redis-cluster://u:p%40w@a:7000,b.example:7001").unwrap();
        assert!(!u.tls);
        assert_eq!(
            u.nodes,
            ["redis://u:p%40w@a:7000", "redis://u:p%40w@b.example:7001"]
        );
        let u = ClusterUrl::parse("REDISS-CLUSTER://h:1/").unwrap();
        assert!(u.tls);
        assert_eq!(u.nodes, ["rediss://h:1"]);
        assert!(is_cluster_url("redis-cluster://h:1"));
        assert!(is_cluster_url("rediss-cluster://h:1"));
        assert!(!is_cluster_url("redis://h:1"));
        assert!(!is_cluster_url("rediss://h:1"));
        for bad in [
            "redis-cluster://h",
            "redis-cluster://h:port",
            "redis-cluster://:1",
            "redis-cluster://h:1/0",
            "redis://h:1",
        ] {
            assert!(ClusterUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
