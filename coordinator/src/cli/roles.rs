//! `tessera coordinator` and `tessera worker`: the two server roles of a cluster.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::cluster::{self, CoordinatorConfig};

/// Token and TLS settings shared by both server roles.
#[derive(Debug, Args)]
pub struct ServerSecurity {
    /// Bearer token: required on every call to this server and sent on every call it makes
    /// (the whole cluster shares one; clients pass it with --token too).
    #[arg(long, env = "TESSERA_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Serve TLS with this certificate (PEM); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// CA certificate (PEM) that signed the peers' certificates (the workers' for the
    /// coordinator, the coordinator's for a worker).
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct CoordinatorArgs {
    /// Address to serve the client API on.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// Redis holding jobs, tensors and membership: redis://[user:pass@]host:port[/db], or
    /// rediss:// for TLS.
    #[arg(long, env = "TESSERA_REDIS", default_value = "redis://127.0.0.1:6379")]
    pub redis: String,
    #[command(flatten)]
    pub security: ServerSecurity,
    /// Seconds finished jobs (records and images) are kept for `fetch` before they expire.
    #[arg(long, default_value_t = 7 * 24 * 3600)]
    pub job_ttl: u64,
    /// Jobs running at once; their tasks share the workers by priority.
    #[arg(long, default_value_t = 4)]
    pub max_jobs: usize,
    /// Seconds one call to a worker may take before its tasks are given to another worker.
    #[arg(long, default_value_t = 600)]
    pub lease: u64,
    /// Where finished images are kept (DIR/JOB/N.png) until they expire with their job; `fetch`
    /// streams them from there. Default: tessera-output in the system's temporary directory.
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
}

pub fn run_coordinator(args: CoordinatorArgs) -> Result<()> {
    if args.lease == 0 || args.job_ttl == 0 {
        bail!("--lease and --job-ttl must be at least 1 second");
    }
    let cfg = CoordinatorConfig {
        listen: args.listen,
        redis_url: args.redis,
        token: args.security.token,
        tls_cert: args.security.tls_cert,
        tls_key: args.security.tls_key,
        worker_ca: args.security.tls_ca,
        job_ttl: Duration::from_secs(args.job_ttl),
        max_jobs: args.max_jobs,
        lease: Duration::from_secs(args.lease),
        output_dir: args
            .output_dir
            .unwrap_or_else(|| std::env::temp_dir().join("tessera-output")),
    };
    std::fs::create_dir_all(&cfg.output_dir)
        .with_context(|| format!("creating --output-dir {}", cfg.output_dir.display()))?;
    runtime()?.block_on(async move {
        cluster::serve(cfg, shutdown_signal())
            .await
            .context("coordinator")
    })
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// The coordinator's address (for the address this worker advertises, and a reachability
    /// check in the log).
    #[arg(
        long,
        env = "TESSERA_COORDINATOR",
        default_value = "http://127.0.0.1:7070"
    )]
    pub coordinator: String,
    /// The cluster's Redis (see `tessera coordinator --redis`).
    #[arg(long, env = "TESSERA_REDIS", default_value = "redis://127.0.0.1:6379")]
    pub redis: String,
    /// Model directory in the diffusers layout.
    #[arg(long)]
    pub model: PathBuf,
    /// Name clients submit with (`tessera submit --model NAME`) [default: the directory's name].
    #[arg(long)]
    pub model_name: Option<String>,
    /// Address to serve the Worker API on; port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// URL the coordinator should call this worker at [default: from --listen; when listening
    /// on 0.0.0.0, the local address that routes to the coordinator].
    #[arg(long)]
    pub advertise: Option<String>,
    /// Where to compute: cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[command(flatten)]
    pub security: ServerSecurity,
    /// Tasks (each a batch of views) per call from the coordinator.
    #[arg(long, default_value_t = 1)]
    pub tasks_per_call: u32,
    /// BENCHMARK DOUBLE, for `tessera bench`: load no weights and answer every task after MS
    /// milliseconds per training-size model evaluation with CFG (scaled by view area and
    /// batch), writing outputs of the real shapes with meaningless content. Never use it to
    /// render. --model still gives the geometry (configs only).
    #[arg(long, value_name = "MS")]
    pub simulate_eval_ms: Option<f64>,
}

pub fn run_worker(args: WorkerArgs) -> Result<()> {
    if let Some(ms) = args.simulate_eval_ms {
        if !(ms.is_finite() && ms >= 0.0) {
            bail!("--simulate-eval-ms must be a non-negative number of milliseconds, not {ms}");
        }
    }
    let model_name = match args.model_name {
        Some(n) if !n.trim().is_empty() => n,
        Some(_) => bail!("--model-name is empty: give a name or leave it out"),
        None => args
            .model
            .canonicalize()
            .unwrap_or_else(|_| args.model.clone())
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .filter(|n| !n.is_empty())
            .with_context(|| {
                format!(
                    "--model {}: cannot name the model after this path; pass --model-name",
                    args.model.display()
                )
            })?,
    };
    let cfg = tessera_worker::service::WorkerConfig {
        model_dir: args.model,
        model_name,
        device: args.device,
        listen: args.listen,
        advertise: args.advertise,
        coordinator: args.coordinator,
        redis_url: args.redis,
        token: args.security.token,
        tls_cert: args.security.tls_cert,
        tls_key: args.security.tls_key,
        tls_ca: args.security.tls_ca,
        tasks_per_call: args.tasks_per_call,
        simulate_eval_ms: args.simulate_eval_ms,
    };
    runtime()?.block_on(async move {
        tessera_worker::service::serve(cfg, shutdown_signal())
            .await
            .context("worker")
    })
}

pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
