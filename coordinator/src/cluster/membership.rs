//! Who is in the cluster: workers join through the `Membership` service with the worker
//! credential (never by writing a key anyone could write), and stay members while they send a
//! heartbeat every second; a membership four seconds silent ends, and its tasks go to others.
//!
//! A join is checked before the worker gets any task: the address it claims must be the one its
//! connection comes from (or a name resolving to it), its scheme must match the coordinator's
//! TLS settings for workers, each model it serves must carry the fingerprint the workers
//! already serving that name carry, and the coordinator calls it back at that address with the
//! call token it chose — so a worker is called only where it really listens, and only by this
//! coordinator. Memberships live in this process only: a restarted coordinator is joined again
//! within a heartbeat, and a Redis restart does not touch them.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tessera_proto::auth::AttachToken;
use tessera_proto::net::{self, ClientNet};
use tessera_proto::v1::membership_server::Membership;
use tessera_proto::v1::worker_client::WorkerClient;
use tessera_proto::v1::{
    DescribeRequest, HeartbeatRequest, HeartbeatResponse, JoinRequest, JoinResponse,
    WorkerDescription,
};
use tonic::{Request, Response, Status};

use super::lock::Leadership;
use super::pool::{Member, Pool};
use crate::sync::lock;

/// How often a worker sends its heartbeat, and how long a silent membership lasts.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
pub const EXPIRE_AFTER: Duration = Duration::from_secs(4);
/// How long the call back to a joining worker may take.
const CALL_BACK_TIMEOUT: Duration = Duration::from_secs(10);

struct Joined {
    member: Member,
    last_seen: Instant,
}

/// The live memberships, mirrored into the pool on every change.
#[derive(Clone)]
pub struct Members {
    joined: Arc<Mutex<BTreeMap<String, Joined>>>,
    pool: Pool,
}

impl Members {
    pub fn new(pool: Pool) -> Self {
        Self {
            joined: Arc::default(),
            pool,
        }
    }

    fn publish(&self, joined: &BTreeMap<String, Joined>) {
        let live = joined.values().map(|j| j.member.clone()).collect();
        self.pool.update_members(live);
    }

    fn fingerprint_conflict(&self, desc: &WorkerDescription) -> Option<String> {
        conflict_in(&lock(&self.joined), desc)
    }

    /// Adds (or renews, under a new session) a membership, checking fingerprints under the
    /// same lock so two joins cannot both pass.
    fn insert(&self, member: Member) -> Result<(), Status> {
        let mut joined = lock(&self.joined);
        if let Some(conflict) = conflict_in(&joined, &member.desc) {
            return Err(refuse_model(&member.desc.worker_id, conflict));
        }
        let id = member.desc.worker_id.clone();
        joined.insert(
            id,
            Joined {
                member,
                last_seen: Instant::now(),
            },
        );
        self.publish(&joined);
        Ok(())
    }

    fn beat(&self, worker: &str, session: &str) -> bool {
        let mut joined = lock(&self.joined);
        match joined.get_mut(worker) {
            Some(j) if j.member.session == session => {
                j.last_seen = Instant::now();
                true
            }
            _ => false,
        }
    }

    fn leave(&self, worker: &str, session: &str) -> bool {
        let mut joined = lock(&self.joined);
        if joined
            .get(worker)
            .is_none_or(|j| j.member.session != session)
        {
            return false;
        }
        joined.remove(worker);
        self.publish(&joined);
        true
    }

    /// When each member's last heartbeat (or its join) came in.
    pub fn last_seen(&self) -> Vec<(String, Instant)> {
        lock(&self.joined)
            .iter()
            .map(|(id, j)| (id.clone(), j.last_seen))
            .collect()
    }

    /// Ends memberships whose heartbeats stopped, forever.
    pub async fn expire(self) {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let mut joined = lock(&self.joined);
            let before = joined.len();
            joined.retain(|_, j| j.last_seen.elapsed() <= EXPIRE_AFTER);
            if joined.len() != before {
                self.publish(&joined);
            }
        }
    }
}

/// A model of `desc` already served under its name, by another worker, with another
/// fingerprint, as a message that says what to do.
fn conflict_in(joined: &BTreeMap<String, Joined>, desc: &WorkerDescription) -> Option<String> {
    for m in &desc.models {
        let others = joined
            .values()
            .map(|j| &j.member.desc)
            .filter(|o| o.worker_id != desc.worker_id);
        for o in others {
            let Some(om) = o
                .models
                .iter()
                .find(|om| om.name == m.name && om.fingerprint != m.fingerprint)
            else {
                continue;
            };
            return Some(format!(
                "model {:?} is served by worker {} with fingerprint {}, but this worker's copy \
                 has fingerprint {}: workers serving one name must load the same model; give \
                 this one its own --model-name or the same files",
                m.name, o.worker_id, om.fingerprint, m.fingerprint
            ));
        }
    }
    None
}

/// A refused second fingerprint, logged on the coordinator too (the operator looks here).
fn refuse_model(worker: &str, message: String) -> Status {
    tracing::warn!(worker, "refused a worker: {message}");
    tessera_worker::status!("refused worker {worker}: {message}");
    Status::failed_precondition(message)
}

/// The `Membership` service, behind the worker token.
pub struct MembershipService {
    pub members: Members,
    pub leader: Arc<Leadership>,
    /// How the coordinator calls workers (their CA, when they serve TLS).
    pub worker_net: ClientNet,
}

#[tonic::async_trait]
impl Membership for MembershipService {
    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        self.leader.runner()?;
        let peer = req.remote_addr();
        let JoinRequest { worker, call_token } = req.into_inner();
        let desc = worker.ok_or_else(|| Status::invalid_argument("the join has no worker"))?;
        check_description(&desc, &call_token)?;
        net::check_scheme(&desc.address, &self.worker_net)
            .map_err(|e| Status::failed_precondition(format!("worker address: {e}")))?;
        check_address(&desc.address, peer).await?;
        if let Some(conflict) = self.members.fingerprint_conflict(&desc) {
            return Err(refuse_model(&desc.worker_id, conflict));
        }
        call_back(&desc, &call_token, &self.worker_net).await?;
        let session = format!("{:032x}", rand::random::<u128>());
        self.members.insert(Member {
            desc,
            session: session.clone(),
            call_token,
        })?;
        Ok(Response::new(JoinResponse {
            session,
            heartbeat_ms: HEARTBEAT_EVERY.as_millis() as u32,
            expire_ms: EXPIRE_AFTER.as_millis() as u32,
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        self.leader.runner()?;
        let r = req.into_inner();
        if self.members.beat(&r.worker_id, &r.session) {
            Ok(Response::new(HeartbeatResponse {}))
        } else {
            Err(Status::not_found("no such membership here: join again"))
        }
    }

    async fn leave(
        &self,
        req: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let r = req.into_inner();
        if self.members.leave(&r.worker_id, &r.session) {
            Ok(Response::new(HeartbeatResponse {}))
        } else {
            Err(Status::not_found("no such membership here"))
        }
    }
}

/// The description's names and numbers are sane, and the call token is long enough to guess
/// at no better than chance.
fn check_description(desc: &WorkerDescription, call_token: &str) -> Result<(), Status> {
    let id_ok = (1..=128).contains(&desc.worker_id.len())
        && desc
            .worker_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._:-".contains(c));
    if !id_ok {
        return Err(Status::invalid_argument(format!(
            "worker id {:?}: use 1 to 128 letters, digits, '.', '_', ':' or '-'",
            desc.worker_id
        )));
    }
    if desc.models.is_empty() || desc.models.iter().any(|m| m.name.trim().is_empty()) {
        return Err(Status::invalid_argument(
            "a worker must serve a named model",
        ));
    }
    for m in &desc.models {
        let arch = serde_json::from_str::<tessera_core::plan::ArchInfo>(&m.arch_json);
        let sched = serde_json::from_str::<tessera_core::sched::SchedulerConfig>(&m.scheduler_json);
        if let Some(e) = arch
            .err()
            .map(|e| e.to_string())
            .or(sched.err().map(|e| e.to_string()))
        {
            return Err(Status::invalid_argument(format!(
                "model {:?}: its description does not parse ({e})",
                m.name
            )));
        }
    }
    if call_token.len() < 32 || call_token.len() > 256 {
        return Err(Status::invalid_argument(
            "the call token must be 32 to 256 characters",
        ));
    }
    Ok(())
}

/// The host of a worker URL and its port.
fn host_port(address: &str) -> Result<(String, u16), Status> {
    let bad = |why: &str| {
        Status::invalid_argument(format!(
            "worker address {address:?} {why}: write it like http://10.0.0.5:7071"
        ))
    };
    let uri: tonic::transport::Uri = address.parse().map_err(|_| bad("is not a URL"))?;
    let host = uri.host().ok_or_else(|| bad("has no host"))?;
    let port = uri.port_u16().ok_or_else(|| bad("has no port"))?;
    Ok((host.trim_matches(['[', ']']).to_string(), port))
}

fn same_ip(a: IpAddr, b: IpAddr) -> bool {
    a.to_canonical() == b.to_canonical()
}

/// The claimed address must be where the join came from: the worker's own machine.
async fn check_address(address: &str, peer: Option<SocketAddr>) -> Result<(), Status> {
    let (host, port) = host_port(address)?;
    let peer = peer
        .ok_or_else(|| Status::internal("cannot tell where the join came from"))?
        .ip();
    let resolved: Vec<IpAddr> = match host.parse::<IpAddr>() {
        Ok(ip) => vec![ip],
        Err(_) => tokio::net::lookup_host((host.as_str(), port))
            .await
            .map(|found| found.map(|a| a.ip()).collect())
            .unwrap_or_default(),
    };
    if resolved.iter().any(|ip| same_ip(*ip, peer)) {
        return Ok(());
    }
    Err(Status::permission_denied(format!(
        "this worker claims the address {address}, but its connection comes from {peer}: a \
         worker must advertise an address of its own machine (set --advertise, or --listen on \
         an address the coordinator can reach)"
    )))
}

/// Calls the worker's Describe at its address with its call token: the process listening
/// there must be the one that joined.
async fn call_back(
    desc: &WorkerDescription,
    call_token: &str,
    worker_net: &ClientNet,
) -> Result<(), Status> {
    let unreachable = |why: String| {
        Status::failed_precondition(format!(
            "the coordinator cannot call this worker back at {}: {why}; check that the address \
             is reachable from the coordinator and that both sides' TLS settings agree",
            desc.address
        ))
    };
    let channel =
        net::channel(&desc.address, worker_net).map_err(|e| unreachable(e.to_string()))?;
    let token = AttachToken::new(Some(call_token))
        .map_err(|_| Status::invalid_argument("the call token must be printable ASCII"))?;
    let mut client = WorkerClient::with_interceptor(channel, token);
    let answer = tokio::time::timeout(CALL_BACK_TIMEOUT, client.describe(DescribeRequest {}))
        .await
        .map_err(|_| unreachable(format!("no answer within {CALL_BACK_TIMEOUT:?}")))?
        .map_err(|s| unreachable(s.message().to_string()))?
        .into_inner();
    if answer.worker_id != desc.worker_id {
        return Err(Status::permission_denied(format!(
            "the worker listening at {} is {:?}, not {:?}",
            desc.address, answer.worker_id, desc.worker_id
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_claimed_address_must_be_the_connections_own() {
        let peer: SocketAddr = "127.0.0.1:50000".parse().unwrap();
        assert!(check_address("http://127.0.0.1:7071", Some(peer))
            .await
            .is_ok());
        assert!(check_address("http://localhost:7071", Some(peer))
            .await
            .is_ok());
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:50000".parse().unwrap();
        assert!(check_address("http://127.0.0.1:7071", Some(mapped))
            .await
            .is_ok());
        let e = check_address("http://10.9.9.9:7071", Some(peer))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("--advertise"), "{}", e.message());
        let e = check_address("not a url", Some(peer)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn descriptions_are_checked() {
        let mut d = WorkerDescription {
            worker_id: "host-1".into(),
            address: "http://127.0.0.1:1".into(),
            models: vec![tessera_proto::v1::ModelDescription {
                name: "m".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let token = "x".repeat(32);
        assert!(check_description(&d, &token).is_err(), "no architecture");
        let arch = tessera_core::plan::ArchInfo::preset("sdxl").unwrap();
        d.models[0].arch_json = serde_json::to_string(&arch).unwrap();
        d.models[0].scheduler_json = serde_json::to_string(&arch.scheduler).unwrap();
        assert!(check_description(&d, &token).is_ok());
        assert!(check_description(&d, "short").is_err());
        d.worker_id = "a b".into();
        assert!(check_description(&d, &token).is_err());
    }
}
