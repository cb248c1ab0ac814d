//! The client commands: `submit`, `status`, `watch`, `cancel`, `list`, `fetch`, `batch`.
//! They talk gRPC to a coordinator; a refusal prints the server's message as it is.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser};
use indicatif::{ProgressBar, ProgressStyle};
use tessera_proto::auth::AttachToken;
use tessera_proto::net::{self, ClientNet};
use tessera_proto::v1::coordinator_client::CoordinatorClient;
use tessera_proto::v1::{
    self, FetchResultRequest, JobInfo, JobRef, JobState, ListJobsRequest, SubmitJobRequest,
};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use super::job::{JobArgs, MissingPrompt};
use super::output::check_writable;
use super::roles::runtime;
use tessera_core::spec::LoraRef;
use tessera_worker::model::lora::{self, LoraSpec};

type Client = CoordinatorClient<InterceptedService<Channel, AttachToken>>;

/// How to reach the coordinator.
#[derive(Debug, Clone, Args)]
pub struct Conn {
    /// The coordinator's address.
    #[arg(
        long,
        env = "TESSERA_COORDINATOR",
        default_value = "http://127.0.0.1:7070"
    )]
    pub coordinator: String,
    /// Bearer token, when the coordinator requires one.
    #[arg(long, env = "TESSERA_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate (PEM) of the coordinator's TLS certificate; turns TLS on.
    #[arg(long, env = "TESSERA_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
}

impl Conn {
    /// Connects at once, so that a coordinator that cannot be reached is reported first, with
    /// the address tried and how to point at another.
    async fn client(&self) -> Result<Client> {
        let netcfg = ClientNet {
            ca: self.tls_ca.clone(),
            connect_timeout: Some(Duration::from_secs(5)),
            // The coordinator answers within 30 s even when its Redis is away; a client never
            // waits on a hung one for ever.
            call_timeout: Some(Duration::from_secs(60)),
            ca_flag: "--tls-ca",
        };
        let channel = net::endpoint(&self.coordinator, &netcfg)?
            .connect()
            .await
            .map_err(|e| self.unreachable(&e))?;
        Ok(
            CoordinatorClient::with_interceptor(channel, AttachToken::new(self.token.as_deref())?)
                .max_decoding_message_size(256 << 20)
                .max_encoding_message_size(256 << 20),
        )
    }

    fn unreachable(&self, e: &(dyn std::error::Error + 'static)) -> anyhow::Error {
        let url = net::normalize_url(&self.coordinator, self.tls_ca.is_some());
        anyhow!(
            "cannot reach the coordinator at {url} ({}): start `tessera coordinator` there, or \
             point at another with --coordinator URL or the TESSERA_COORDINATOR variable",
            causes(e)
        )
    }
}

/// An error and its sources on one line, each message once ("transport error: tcp connect
/// error: Connection refused (os error 111)").
fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(e);
    while let Some(err) = next {
        let text = err.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = err.source();
    }
    parts.join(": ")
}

/// A gRPC refusal as a person reads it: the server's message, not a debug dump.
pub fn status_error(s: tonic::Status) -> anyhow::Error {
    use tonic::Code;
    let what = match s.code() {
        Code::InvalidArgument => "invalid request",
        Code::NotFound => "not found",
        Code::Unauthenticated => "not allowed",
        Code::FailedPrecondition => "not possible now",
        Code::Unavailable => "coordinator unavailable",
        Code::ResourceExhausted => "refused",
        Code::PermissionDenied => "not allowed",
        Code::DeadlineExceeded => "timed out",
        _ => "failed",
    };
    let message = if s.code() == Code::Unavailable && s.message().contains("transport") {
        "cannot connect: is `tessera coordinator` running at that address?".to_string()
    } else {
        s.message().to_string()
    };
    anyhow!("{what}: {message}")
}

#[derive(Debug, Args)]
pub struct SubmitArgs {
    #[command(flatten)]
    pub conn: Conn,
    #[command(flatten)]
    pub opts: QueueOpts,
    #[command(flatten)]
    pub job: JobArgs,
    /// Initial noise of the first stage: a safetensors file with one tensor.
    #[arg(long)]
    pub latents: Option<PathBuf>,
}

/// What to run the job on and how it queues.
#[derive(Debug, Clone, Args)]
pub struct QueueOpts {
    /// A model name the workers serve (`tessera worker --model-name`).
    #[arg(long)]
    pub model: String,
    /// Images to render, with seeds seed, seed+1, ...
    #[arg(long, default_value_t = 1)]
    pub count: i64,
    /// Higher runs first (-1000 to 1000); equal priorities run in submission order.
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    pub priority: i32,
    /// Directory on the coordinator's machine to write the PNGs to as they finish.
    #[arg(long)]
    pub output_dir: Option<String>,
    /// An http(s) URL (a chat webhook) the coordinator POSTs a JSON message to when the job
    /// finishes, fails or is cancelled; kept with the job, so a restarted coordinator still
    /// tells it. A failed notification never fails the job.
    #[arg(long, value_name = "URL")]
    pub notify: Option<String>,
    /// A LoRA to merge into the model at WEIGHT (default 1), repeatable. Only its file name,
    /// weight and sha256 travel: every worker reads the file from its own --lora-dir and
    /// checks the hash, and a worker without it fails the job naming the file.
    #[arg(long, value_name = "FILE[:WEIGHT]", value_parser = LoraSpec::parse)]
    pub lora: Vec<LoraSpec>,
    /// Who submits, as the dashboard shows it (default: $USER). A label for people, not a
    /// credential.
    #[arg(long, value_name = "NAME", env = "TESSERA_SUBMITTER")]
    pub by: Option<String>,
}

/// `--by`, or the user running the client.
fn submitter(opts: &QueueOpts) -> String {
    opts.by
        .clone()
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_default()
}

/// `--lora` as the job names them: each file is read here only to hash it.
fn lora_refs(opts: &QueueOpts) -> Result<Vec<LoraRef>> {
    opts.lora
        .iter()
        .map(|l| {
            let name = l
                .path
                .file_name()
                .and_then(|n| n.to_str())
                .with_context(|| {
                    format!("--lora {}: name a .safetensors file", l.path.display())
                })?;
            let sha256 = lora::hash_file(&l.path)
                .with_context(|| format!("--lora {}: cannot read it", l.path.display()))?;
            Ok(LoraRef {
                name: name.to_string(),
                weight: l.weight,
                sha256,
            })
        })
        .collect()
}

fn read_file(flag: &str, path: Option<&Path>) -> Result<Vec<u8>> {
    match path {
        None => Ok(Vec::new()),
        Some(p) => {
            std::fs::read(p).with_context(|| format!("{flag} {}: cannot read it", p.display()))
        }
    }
}

/// The job as the coordinator takes it: the request, the model it runs on and the bytes of the
/// files it names. A missing prompt travels empty and the coordinator refuses it.
fn request(
    opts: &QueueOpts,
    job: &JobArgs,
    latents: Option<&Path>,
    loras: &[LoraRef],
) -> Result<SubmitJobRequest> {
    let mut request = job.to_request(MissingPrompt::Use(""))?;
    request.loras = loras.to_vec();
    let spec = v1::JobSpec {
        model: opts.model.clone(),
        latents: read_file("--latents", latents)?,
        init_image: read_file("--init-image", job.init_image.as_deref())?,
        mask: read_file("--mask", job.mask.as_deref())?,
        ..v1::JobSpec::from(&request)
    };
    let notify = match opts.notify.as_deref() {
        Some(url) => crate::notify::check_url(url)?.to_string(),
        None => String::new(),
    };
    Ok(SubmitJobRequest {
        spec: Some(spec),
        count: opts.count,
        priority: opts.priority,
        output_dir: opts.output_dir.clone().unwrap_or_default(),
        notify,
        submitted_by: submitter(opts),
    })
}

/// The dashboard's submit form: `tessera submit`'s flags (less the connection and files),
/// parsed by the same parser into the same request. Files (`--init-image`, `--mask`) would be
/// read on the coordinator's machine, so they are refused: they travel with `tessera submit`.
pub fn dashboard_submit(args: &[String]) -> std::result::Result<SubmitJobRequest, String> {
    #[derive(Debug, Parser)]
    #[command(name = "submit", no_binary_name = true, disable_help_flag = true)]
    struct Form {
        #[command(flatten)]
        opts: QueueOpts,
        #[command(flatten)]
        job: JobArgs,
    }
    let mut form = Form::try_parse_from(args).map_err(|e| e.render().to_string())?;
    // Not the coordinator's own $USER: a page's submission says where it came from.
    form.opts.by.get_or_insert_with(|| "dashboard".to_string());
    if form.job.init_image.is_some() || form.job.mask.is_some() || !form.opts.lora.is_empty() {
        return Err(
            "--init-image, --mask and --lora name files on your own machine: submit such jobs \
                    with `tessera submit`"
                .into(),
        );
    }
    request(&form.opts, &form.job, None, &[]).map_err(|e| format!("{e:#}"))
}

pub fn submit(args: SubmitArgs) -> Result<()> {
    let loras = lora_refs(&args.opts)?;
    let req = request(&args.opts, &args.job, args.latents.as_deref(), &loras)?;
    runtime()?.block_on(async move {
        let mut client = args.conn.client().await?;
        let id = client
            .submit_job(req)
            .await
            .map_err(status_error)?
            .into_inner()
            .job_id;
        println!("{id}");
        Ok(())
    })
}

#[derive(Debug, Args)]
pub struct BatchArgs {
    /// A text file with one prompt per line (empty lines and lines starting with # are
    /// skipped); each line becomes a job with the flags given here.
    pub file: PathBuf,
    #[command(flatten)]
    pub conn: Conn,
    #[command(flatten)]
    pub opts: QueueOpts,
    #[command(flatten)]
    pub job: JobArgs,
}

pub fn batch(args: BatchArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let prompts: Vec<(usize, String)> = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim().to_string()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
        .collect();
    if prompts.is_empty() {
        bail!(
            "{} holds no prompts: write one prompt per line",
            args.file.display()
        );
    }
    if args.job.prompt.is_some() {
        bail!("batch takes its prompts from the file: drop --prompt");
    }
    let loras = lora_refs(&args.opts)?;
    runtime()?.block_on(async move {
        let mut client = args.conn.client().await?;
        let mut failed = 0;
        for (line, prompt) in &prompts {
            let mut job = args.job.clone();
            job.prompt = Some(prompt.clone());
            let req = request(&args.opts, &job, None, &loras)?;
            match client.submit_job(req).await {
                Ok(r) => println!("{}", r.into_inner().job_id),
                Err(s) => {
                    failed += 1;
                    eprintln!("{}:{line}: {}", args.file.display(), status_error(s));
                }
            }
        }
        if failed > 0 {
            bail!("{failed} of {} prompts were not queued", prompts.len());
        }
        Ok(())
    })
}

#[derive(Debug, Args)]
pub struct JobArg {
    /// The job id `tessera submit` printed.
    pub job: String,
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub target: JobArg,
    /// Print the job as JSON.
    #[arg(long)]
    pub json: bool,
}

fn state_name(info: &JobInfo) -> &'static str {
    match JobState::try_from(info.state).unwrap_or(JobState::Unspecified) {
        JobState::Queued => "queued",
        JobState::Running => "running",
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
        JobState::Unspecified => "unknown",
    }
}

fn job_json(info: &JobInfo) -> serde_json::Value {
    let p = info.progress.clone().unwrap_or_default();
    serde_json::json!({
        "id": info.job_id,
        "state": state_name(info),
        "model": info.model,
        "prompt": info.prompt,
        "size": [info.width, info.height],
        "method": info.method,
        "seed": info.seed,
        "count": info.count,
        "priority": info.priority,
        "progress": {
            "phase": p.phase, "image": p.image, "images_done": p.images_done,
            "stage": p.stage, "stages": p.stages, "step": p.step, "steps": p.steps,
            "views_done": p.views_done, "views_total": p.views_total,
            "eta_seconds": (p.eta_seconds >= 0.0).then_some(p.eta_seconds),
        },
        "error": (!info.error.is_empty()).then_some(&info.error),
        "resumed_from": info.resumed_from.as_ref().map(|r| serde_json::json!({
            "image": r.image, "stage": r.stage, "step": r.step
        })),
        "created_unix_ms": info.created_unix_ms,
        "started_unix_ms": info.started_unix_ms,
        "finished_unix_ms": info.finished_unix_ms,
        "output_dir": (!info.output_dir.is_empty()).then_some(&info.output_dir),
        "warnings": info.warnings,
        "model_fingerprint": (!info.model_fingerprint.is_empty()).then_some(&info.model_fingerprint),
    })
}

fn describe(info: &JobInfo) -> String {
    let p = info.progress.clone().unwrap_or_default();
    let mut s = format!(
        "{}  {}  {}x{} {} seed {}  model {}",
        info.job_id,
        state_name(info),
        info.width,
        info.height,
        info.method,
        info.seed,
        info.model
    );
    if JobState::try_from(info.state) == Ok(JobState::Running) {
        s.push_str(&format!(
            "\n  {}: image {}/{} stage {}/{} step {}/{} · {}/{} views",
            p.phase,
            p.image + 1,
            info.count,
            p.stage + 1,
            p.stages.max(1),
            p.step,
            p.steps,
            p.views_done,
            p.views_total
        ));
        if p.eta_seconds >= 0.0 {
            s.push_str(&format!(" · eta {:.0}s", p.eta_seconds));
        }
    }
    if let Some(r) = &info.resumed_from {
        s.push_str(&format!(
            "\n  resumed after a coordinator restart at image {} stage {} step {}",
            r.image + 1,
            r.stage + 1,
            r.step
        ));
    }
    if !info.error.is_empty() {
        s.push_str(&format!("\n  error: {}", info.error));
    }
    for w in &info.warnings {
        s.push_str(&format!("\n  warning: {w}"));
    }
    s.push_str(&format!("\n  prompt: {}", info.prompt));
    s
}

pub fn status(args: StatusArgs) -> Result<()> {
    runtime()?.block_on(async move {
        let mut client = args.target.conn.client().await?;
        let info = client
            .get_job(JobRef {
                job_id: args.target.job.clone(),
            })
            .await
            .map_err(status_error)?
            .into_inner();
        if args.json {
            println!("{}", serde_json::to_string_pretty(&job_json(&info))?);
        } else {
            println!("{}", describe(&info));
        }
        Ok(())
    })
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub conn: Conn,
    /// Print the jobs as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn list(args: ListArgs) -> Result<()> {
    runtime()?.block_on(async move {
        let mut client = args.conn.client().await?;
        let jobs = client
            .list_jobs(ListJobsRequest {})
            .await
            .map_err(status_error)?
            .into_inner()
            .jobs;
        if args.json {
            let all: Vec<_> = jobs.iter().map(job_json).collect();
            println!("{}", serde_json::to_string_pretty(&all)?);
        } else if jobs.is_empty() {
            println!("no jobs");
        } else {
            for j in &jobs {
                let p = j.progress.clone().unwrap_or_default();
                println!(
                    "{}  {:<9}  {}x{}  {:<9}  {:>3}%  {}",
                    j.job_id,
                    state_name(j),
                    j.width,
                    j.height,
                    j.method,
                    (p.views_done * 100).checked_div(p.views_total).unwrap_or(0),
                    j.prompt.chars().take(50).collect::<String>()
                );
            }
        }
        Ok(())
    })
}

pub fn cancel(args: JobArg) -> Result<()> {
    runtime()?.block_on(async move {
        let mut client = args.conn.client().await?;
        let info = client
            .cancel_job(JobRef {
                job_id: args.job.clone(),
            })
            .await
            .map_err(status_error)?
            .into_inner();
        eprintln!("job {} {}", info.job_id, state_name(&info));
        Ok(())
    })
}

/// Exit status of `watch` for a cancelled job (a failed job exits with 1).
pub const EXIT_CANCELLED: i32 = 3;

/// Follows a job with a progress bar until it ends; reconnects when the coordinator
/// restarts. Returns the process exit status: 0 succeeded, 1 failed, 3 cancelled.
pub fn watch(args: WatchArgs) -> Result<i32> {
    let WatchArgs {
        target: args,
        preview,
    } = args;
    if let Some(path) = &preview {
        check_writable(&[("--preview", path)])?;
    }
    runtime()?.block_on(async move {
        let mut client = args.conn.client().await?;
        // The (image, stage, step) whose preview was last written.
        let mut previewed: Option<(u32, u32, u32)> = None;
        let bar = ProgressBar::new(1).with_style(
            ProgressStyle::with_template(
                "{spinner} {msg} [{bar:30}] {pos}/{len} views · {elapsed_precise} · eta {prefix}",
            )
            .expect("static template")
            .progress_chars("=> "),
        );
        let mut backoff = Duration::from_millis(250);
        loop {
            let stream = client
                .watch_job(JobRef {
                    job_id: args.job.clone(),
                })
                .await;
            let mut stream = match stream {
                Ok(s) => s.into_inner(),
                Err(s) if s.code() == tonic::Code::Unavailable => {
                    bar.set_message("coordinator unavailable, retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
                Err(s) => return Err(status_error(s)),
            };
            loop {
                match stream.message().await {
                    Ok(Some(info)) => {
                        backoff = Duration::from_millis(250);
                        show_progress(&bar, &info);
                        let p = info.progress.clone().unwrap_or_default();
                        if let Some(path) = &preview {
                            let at = (p.image, p.stage, p.step);
                            if p.step > 0 && previewed != Some(at) {
                                // A missed preview is tried again at the next update.
                                if write_preview(&mut client, &info.job_id, path).await {
                                    previewed = Some(at);
                                }
                            }
                        }
                        if let Some((code, line)) = job_end(&info) {
                            bar.finish_and_clear();
                            eprintln!("{line}");
                            return Ok(code);
                        }
                    }
                    // The stream broke (coordinator restart): follow again.
                    Ok(None) => break,
                    Err(s) if s.code() == tonic::Code::NotFound => {
                        bar.finish_and_clear();
                        return Err(status_error(s));
                    }
                    Err(_) => break,
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    })
}

/// The job's progress on the bar: views done of all, the ETA, and where the job is.
fn show_progress(bar: &ProgressBar, info: &JobInfo) {
    let p = info.progress.clone().unwrap_or_default();
    bar.set_length(p.views_total.max(1));
    bar.set_position(p.views_done);
    bar.set_prefix(if p.eta_seconds >= 0.0 {
        format!("{:.0}s", p.eta_seconds)
    } else {
        "?".into()
    });
    bar.set_message(format!(
        "{} {} · image {}/{} · stage {}/{} step {}/{}",
        info.job_id,
        p.phase,
        (p.image + 1).min(info.count.max(1)),
        info.count.max(1),
        p.stage + 1,
        p.stages.max(1),
        p.step,
        p.steps
    ));
}

/// How the job ended, once it has: `watch`'s exit status (0 succeeded, 1 failed, 3
/// cancelled) and the line it prints.
fn job_end(info: &JobInfo) -> Option<(i32, String)> {
    let id = &info.job_id;
    match JobState::try_from(info.state).unwrap_or(JobState::Unspecified) {
        JobState::Succeeded => Some((0, format!("job {id} succeeded"))),
        JobState::Failed => Some((1, format!("job {id} failed: {}", info.error))),
        JobState::Cancelled => Some((EXIT_CANCELLED, format!("job {id} was cancelled"))),
        _ => None,
    }
}

/// Fetches the job's live preview and writes it to `path` (atomically); false when there is
/// none yet or it could not be written.
async fn write_preview(client: &mut Client, job: &str, path: &std::path::Path) -> bool {
    let png = match client
        .get_preview(JobRef {
            job_id: job.to_string(),
        })
        .await
    {
        Ok(r) => r.into_inner().png,
        Err(_) => return false,
    };
    if png.is_empty() {
        return false;
    }
    match crate::preview::write_atomically(path, &png) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!("cannot write --preview {}: {e}", path.display());
            false
        }
    }
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    #[command(flatten)]
    pub target: JobArg,
    /// Keep the job's live preview in this PNG, replaced after every step (a small picture of
    /// the latent's colours, not the decoded image).
    #[arg(long)]
    pub preview: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct FetchArgs {
    #[command(flatten)]
    pub target: JobArg,
    /// Where to write the PNG. For a job of several images, `-o out.png` writes out-0.png,
    /// out-1.png, ... unless --image picks one.
    #[arg(short = 'o', long = "output")]
    pub output: PathBuf,
    /// Which image of a --count job (0-based) [default: all of them].
    #[arg(long)]
    pub image: Option<u32>,
}

pub fn fetch(args: FetchArgs) -> Result<()> {
    check_writable(&[("-o", &args.output)])?;
    runtime()?.block_on(async move {
        let mut client = args.target.conn.client().await?;
        let info = client
            .get_job(JobRef {
                job_id: args.target.job.clone(),
            })
            .await
            .map_err(status_error)?
            .into_inner();
        let images: Vec<u32> = match args.image {
            Some(i) => vec![i],
            None => (0..info.count.max(1)).collect(),
        };
        for i in images {
            let path = if info.count > 1 && args.image.is_none() {
                numbered(&args.output, i)
            } else {
                args.output.clone()
            };
            let mut stream = client
                .fetch_result(FetchResultRequest {
                    job_id: args.target.job.clone(),
                    image: i,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            let mut bytes = Vec::new();
            while let Some(chunk) = stream.message().await.map_err(status_error)? {
                if bytes.is_empty() {
                    bytes.reserve(chunk.total_bytes as usize);
                }
                bytes.extend_from_slice(&chunk.data);
            }
            let tmp = crate::assemble::partial_path(&path);
            let mut f = std::fs::File::create(&tmp)
                .with_context(|| format!("cannot create {}", tmp.display()))?;
            f.write_all(&bytes)
                .with_context(|| format!("writing {}", tmp.display()))?;
            drop(f);
            std::fs::rename(&tmp, &path)
                .with_context(|| format!("cannot move {} into place", tmp.display()))?;
            eprintln!("wrote {} ({} bytes)", path.display(), bytes.len());
        }
        Ok(())
    })
}

/// `out.png` → `out-3.png`.
fn numbered(path: &Path, i: u32) -> PathBuf {
    let stem = path.file_stem().unwrap_or_default().to_string_lossy();
    let ext = path
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    path.with_file_name(format!("{stem}-{i}{ext}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbered_outputs() {
        assert_eq!(
            numbered(Path::new("/x/out.png"), 3),
            PathBuf::from("/x/out-3.png")
        );
        assert_eq!(numbered(Path::new("out"), 0), PathBuf::from("out-0"));
    }

    #[test]
    fn refusals_print_the_servers_message() {
        let e = status_error(tonic::Status::invalid_argument("steps 0 is out of range"));
        assert_eq!(e.to_string(), "invalid request: steps 0 is out of range");
    }
}
