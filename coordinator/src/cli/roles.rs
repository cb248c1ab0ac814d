//! `tessera coordinator` and `tessera worker`: the two server roles of a cluster.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::cluster::{self, CoordinatorConfig};
use crate::dashboard::DashboardConfig;

/// TLS settings shared by both server roles.
#[derive(Debug, Args)]
pub struct ServerTls {
    /// Serve TLS with this certificate (PEM); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// CA certificate (PEM) that signed the peers' certificates (the workers' for the
    /// coordinator, the coordinator's for a worker). With it, the peers' URLs must be https://.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
}

/// How a server role reaches Redis.
#[derive(Debug, Args)]
pub struct RedisArgs {
    /// Redis holding jobs and tensors: redis://[USER:PASSWORD@]host:port[/db], or rediss:// for
    /// TLS; a Redis Cluster by its seed nodes,
    /// redis-cluster://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...] (rediss-cluster:// for TLS).
    /// See SECURITY.md for ACL users.
    #[arg(long, env = "TESSERA_REDIS", default_value = "redis://127.0.0.1:6379")]
    pub redis: String,
    /// CA certificate (PEM) that signed Redis' certificate, for a rediss:// or
    /// rediss-cluster:// URL to servers with a private CA.
    #[arg(long, env = "TESSERA_REDIS_CA")]
    pub redis_ca: Option<PathBuf>,
}

/// How a long-running role writes its logs (to stderr).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Lines for a person (coloured at a terminal).
    #[default]
    Text,
    /// One JSON object per line (tracing's JSON layer), for a log stack.
    Json,
}

/// Logging and metrics flags of both server roles.
#[derive(Debug, Args)]
pub struct Observability {
    /// Log lines as text, or one JSON object per line for a log stack.
    #[arg(long, value_enum, env = "TESSERA_LOG_FORMAT", default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics (off unless given). With the
    /// coordinator's --token set, a scrape must send it as a bearer token.
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics: Option<SocketAddr>,
}

/// The workers' credential, shared by the coordinator and its workers.
#[derive(Debug, Args)]
pub struct WorkerToken {
    /// The workers' credential: a worker joins the coordinator with it (the coordinator
    /// requires it on its Membership service). Never the clients' --token.
    #[arg(long, env = "TESSERA_WORKER_TOKEN", hide_env_values = true)]
    pub worker_token: Option<String>,
}

#[derive(Debug, Args)]
pub struct CoordinatorArgs {
    /// Address to serve the client API (and the workers' Membership service) on.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub redis: RedisArgs,
    /// The clients' credential: required on every call of the client API (clients pass it
    /// with --token too). Needs --worker-token, a different one, for the workers.
    #[arg(long, env = "TESSERA_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    #[command(flatten)]
    pub worker_token: WorkerToken,
    #[command(flatten)]
    pub tls: ServerTls,
    /// Seconds finished jobs (records and images) are kept for `fetch` before they expire.
    #[arg(long, default_value_t = 7 * 24 * 3600)]
    pub job_ttl: u64,
    /// Jobs running at once; their tasks share the workers by priority.
    #[arg(long, default_value_t = 4)]
    pub max_jobs: usize,
    /// Jobs that may wait in the queue; a submission beyond is refused.
    #[arg(long, default_value_t = 10_000)]
    pub max_queued: u64,
    /// Seconds one call to a worker may take before it counts as a failed attempt and its
    /// tasks go to another worker (after a few attempts the job fails).
    #[arg(long, default_value_t = 600)]
    pub lease: u64,
    /// Where finished images are kept (DIR/JOB/N.png) until they expire with their job; `fetch`
    /// streams them from there. Default: tessera-output in the system's temporary directory.
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    /// Let clients have copies of their images written under DIR (`submit --output-dir`);
    /// repeatable. Without it, clients' --output-dir is refused.
    #[arg(long, value_name = "DIR")]
    pub allow_output_dir: Vec<PathBuf>,
    /// An http(s) URL (a chat webhook) to POST a JSON message to whenever any job finishes,
    /// fails or is cancelled (besides each job's own `submit --notify`).
    #[arg(
        long,
        value_name = "URL",
        env = "TESSERA_NOTIFY",
        hide_env_values = true
    )]
    pub notify: Option<String>,
    /// Attempts per notification before it is given up (the waits between them double from
    /// half a second).
    #[arg(long, default_value_t = crate::notify::DEFAULT_ATTEMPTS)]
    pub notify_attempts: u32,
    #[command(flatten)]
    pub observe: Observability,
    /// Serve the web dashboard on HOST:PORT (off unless given): jobs, workers, previews, the
    /// gallery and the operator's actions, behind --token and over TLS with --tls-cert.
    #[arg(long, value_name = "HOST:PORT")]
    pub http: Option<SocketAddr>,
}

/// The allowed output roots, canonical: each must be an existing directory.
fn allowed_roots(dirs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    dirs.iter()
        .map(|d| {
            let canonical = d
                .canonicalize()
                .with_context(|| format!("--allow-output-dir {}: cannot use it", d.display()))?;
            if !canonical.is_dir() {
                bail!("--allow-output-dir {}: not a directory", d.display());
            }
            Ok(canonical)
        })
        .collect()
}

/// The coordinator's own output directory, made private (0700) when it is created here.
fn create_private_dir(dir: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating --output-dir {}", dir.display()))
}

pub fn run_coordinator(args: CoordinatorArgs) -> Result<()> {
    if args.lease == 0 || args.job_ttl == 0 {
        bail!("--lease and --job-ttl must be at least 1 second");
    }
    if !(1..=20).contains(&args.notify_attempts) {
        bail!("--notify-attempts must be 1 to 20");
    }
    let notifier = crate::notify::Notifier {
        everyone: args
            .notify
            .as_deref()
            .map(crate::notify::check_url)
            .transpose()?,
        attempts: args.notify_attempts,
    };
    let cfg = CoordinatorConfig {
        listen: args.listen,
        redis_url: args.redis.redis,
        redis_ca: args.redis.redis_ca,
        token: args.token,
        worker_token: args.worker_token.worker_token,
        tls_cert: args.tls.tls_cert,
        tls_key: args.tls.tls_key,
        worker_ca: args.tls.tls_ca,
        job_ttl: Duration::from_secs(args.job_ttl),
        max_jobs: args.max_jobs,
        max_queued: args.max_queued,
        lease: Duration::from_secs(args.lease),
        output_dir: args
            .output_dir
            .unwrap_or_else(|| std::env::temp_dir().join("tessera-output")),
        allowed_output_dirs: allowed_roots(&args.allow_output_dir)?,
        notifier,
        metrics: args.observe.metrics,
        http: args.http.map(|listen| DashboardConfig {
            listen,
            parse_submit: super::client::dashboard_submit,
        }),
    };
    create_private_dir(&cfg.output_dir)?;
    runtime()?.block_on(async move {
        cluster::serve(cfg, shutdown_signal())
            .await
            .context("coordinator")
    })
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// The coordinator to join; several, comma-separated, for a coordinator with standbys
    /// (the worker joins whichever leads, and follows a takeover).
    #[arg(
        long,
        env = "TESSERA_COORDINATOR",
        default_value = "http://127.0.0.1:7070",
        value_delimiter = ','
    )]
    pub coordinator: Vec<String>,
    #[command(flatten)]
    pub redis: RedisArgs,
    #[command(flatten)]
    pub worker_token: WorkerToken,
    /// Not taken by workers: the clients' token stays with clients and the coordinator.
    #[arg(long, hide = true)]
    pub token: Option<String>,
    /// Model: a diffusers directory or a single-file SDXL or SD 2.x checkpoint.
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub model_flags: super::model_flags::ModelFlags,
    /// Name clients submit with (`tessera submit --model NAME`) [default: the directory's
    /// name, or the checkpoint file's without its extension].
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
    pub tls: ServerTls,
    /// Tasks (each a batch of views) per call from the coordinator.
    #[arg(long, default_value_t = 1)]
    pub tasks_per_call: u32,
    /// The directory a job's LoRAs (`submit --lora`) are read from, by plain file name, each
    /// checked against the hash the job records; symlinks are not followed. A job naming a
    /// LoRA that is not here, or whose hash differs, fails at once naming the file.
    #[arg(long, value_name = "DIR")]
    pub lora_dir: Option<PathBuf>,
    /// BENCHMARK DOUBLE, for `tessera bench`: load no weights and answer every task after MS
    /// milliseconds per training-size model evaluation with CFG (scaled by view area and
    /// batch), writing outputs of the real shapes with meaningless content. Never use it to
    /// render. --model still gives the geometry (configs only).
    #[arg(long, value_name = "MS")]
    pub simulate_eval_ms: Option<f64>,
    #[command(flatten)]
    pub observe: Observability,
}

fn default_model_name(model: &std::path::Path) -> Option<String> {
    let path = model.canonicalize().unwrap_or_else(|_| model.to_path_buf());
    let name = if path.is_file() {
        path.file_stem()
    } else {
        path.file_name()
    };
    name.map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty())
}

pub fn run_worker(args: WorkerArgs) -> Result<()> {
    if args.token.is_some() {
        bail!(
            "workers do not take --token (the clients' credential): give them --worker-token, \
             the coordinator's --worker-token"
        );
    }
    if let Some(ms) = args.simulate_eval_ms {
        if !(ms.is_finite() && ms >= 0.0) {
            bail!("--simulate-eval-ms must be a non-negative number of milliseconds, not {ms}");
        }
    }
    let model_name = match args.model_name {
        Some(n) if !n.trim().is_empty() => n,
        Some(_) => bail!("--model-name is empty: give a name or leave it out"),
        // A directory's name, or a checkpoint file's without `.safetensors`.
        None => default_model_name(&args.model).with_context(|| {
            format!(
                "--model {}: cannot name the model after this path; pass --model-name",
                args.model.display()
            )
        })?,
    };
    let cfg = tessera_worker::service::WorkerConfig {
        prediction_type: args.model_flags.prediction(),
        model_dir: args.model,
        model_name,
        device: args.device,
        listen: args.listen,
        advertise: args.advertise,
        coordinators: args.coordinator,
        redis_url: args.redis.redis,
        redis_ca: args.redis.redis_ca,
        worker_token: args.worker_token.worker_token,
        tls_cert: args.tls.tls_cert,
        tls_key: args.tls.tls_key,
        tls_ca: args.tls.tls_ca,
        tasks_per_call: args.tasks_per_call,
        simulate_eval_ms: args.simulate_eval_ms,
        metrics: args.observe.metrics,
        lora_dir: args.lora_dir,
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
