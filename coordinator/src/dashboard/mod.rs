//! The dashboard (`tessera coordinator --http HOST:PORT`): a web page served by the coordinator
//! itself, with everything it loads embedded in the binary (no CDN). It shows the queue, the
//! jobs with live progress and previews (server-sent events), the workers, a gallery of
//! finished images with a Deep Zoom viewer, and lets an operator cancel, reprioritise, requeue
//! and submit jobs.
//!
//! It reads and changes the cluster through the same code as the gRPC service: calls go to
//! [`CoordinatorService`] (so a submission meets exactly `tessera submit`'s admission), and the
//! job records, the runner and the worker pool of `cluster/`. With `--token` every request but
//! the login page needs the token (a cookie the login sets, or `Authorization: Bearer`); with
//! `--tls-cert`/`--tls-key` it is served over TLS.
//!
//! - `server.rs`: the listener (plain or TLS), the router and the response headers;
//! - `auth.rs`: the login, the token check on every call;
//! - `api.rs`: the JSON API (jobs, workers, actions); `views.rs`: what it answers;
//! - `events.rs`: the server-sent event stream;
//! - `files.rs`: previews, finished images and their Deep Zoom tiles;
//! - `assets/`: the page (HTML, CSS, JS), written for this dashboard.

mod api;
mod assets;
mod auth;
mod events;
mod files;
mod server;
mod tls;
mod views;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tessera_proto::v1::SubmitJobRequest;

use crate::cluster::lock::Leadership;
use crate::cluster::membership::Members;
use crate::cluster::service::CoordinatorService;

pub use server::{start, Dashboard};

/// Parses the submit form's flags (those of `tessera submit`, less the connection and the
/// files) into the request `tessera submit` would send; the message on error says what to
/// change. It comes from the command line (`cli/`), which alone knows the flags.
pub type ParseSubmit = fn(&[String]) -> Result<SubmitJobRequest, String>;

#[derive(Debug, Clone)]
pub struct DashboardConfig {
    pub listen: SocketAddr,
    pub parse_submit: ParseSubmit,
}

/// What every handler reads: the coordinator's state and the dashboard's settings.
pub(crate) struct Dash {
    pub service: CoordinatorService,
    pub leader: Arc<Leadership>,
    pub members: Members,
    /// The clients' token (`--token`); `None`: the dashboard is open, like the gRPC API.
    pub token: Option<String>,
    pub max_queued: u64,
    pub parse_submit: ParseSubmit,
    /// Served over TLS: the login cookie is marked Secure.
    pub tls: bool,
    /// Workers seen, kept a while after they are lost.
    pub seen: Mutex<views::SeenWorkers>,
    /// Bumped by every operator action, so event streams send the list again at once.
    pub changed: tokio::sync::watch::Sender<u64>,
}

impl Dash {
    pub fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }
}
