//! `tessera bench scale`: high-resolution steps per second of an 8K SDXL-geometry stage on
//! 1, 2, 4, … simulated workers (benchmark doubles taking a fixed time per evaluation), real
//! Redis, a real coordinator process and real worker processes on loopback; efficiency against
//! the ideal `capacity / views per step`, and a mixed set where some workers are slower.
//!
//! With `--link-gbit` each link speed is a run of this same command inside a network namespace
//! whose loopback is rate-limited (`netns.rs`); the child writes its runs as JSON for the parent's
//! table.
//!
//! Only the high-resolution steps are timed: from the end of the stage's first step to the end
//! of its last (as the coordinator logs them), so startup, prompt encoding, the stage's entry
//! and the decode are excluded.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::idle::{self, WorkerTime};
use super::{cluster, netns};
use super::{sdxl_geometry_model, BenchError, Machine, Report, Result, Scratch, Table};

#[derive(Debug, Clone)]
pub struct ScaleOptions {
    /// Worker counts to measure, all at `eval_ms`.
    pub workers: Vec<usize>,
    /// Milliseconds per training-size evaluation with CFG of the simulated workers.
    pub eval_ms: f64,
    /// Also run the mixed set: `mixed_fast` workers at `eval_ms` and `mixed_slow` at
    /// `slow_factor × eval_ms`.
    pub mixed: Option<MixedSet>,
    /// Image side in pixels (one high-resolution stage of this size).
    pub size: u32,
    /// Steps of the stage to run (at least 2); `None` picks enough for ~6 s of timed steps.
    pub steps: Option<usize>,
    /// Views per task (`--view-batch` of the job); `None`: for each worker count, the batch
    /// `tessera plan --workers N` recommends.
    pub view_batch: Option<usize>,
    /// Cores the coordinator may use, one run each (`None`: all of them).
    pub coordinator_cores: Vec<Option<usize>>,
    /// Links to measure each configuration on (`None`: unlimited), each in its own network
    /// namespace; empty runs on the host's loopback.
    pub links: Vec<Option<f64>>,
    /// Stores to run each configuration on: 0 for one Redis, n for a Redis Cluster of n
    /// shards.
    pub stores: Vec<usize>,
    /// Each link of `links` is each Redis node's own, not the whole loopback's.
    pub link_per_node: bool,
    /// Inside a `link_per_node` namespace: the speed every Redis node of each run gets.
    pub node_link: Option<f64>,
    /// Runs of every configuration (at least 1), in rounds: each round runs every
    /// configuration once, so a slow spell of the machine falls on all of them alike.
    pub repeat: usize,
    pub markdown: Option<PathBuf>,
}

/// Shards of the Redis Cluster `--store cluster` runs on.
pub const CLUSTER_SHARDS: usize = 3;

/// How a run's store is named: `redis`, or `cluster` with its shards.
pub fn store_label(shards: usize) -> String {
    match shards {
        0 => "one Redis".into(),
        n => format!("{n}-shard cluster"),
    }
}

#[derive(Debug, Clone, Copy)]
pub struct MixedSet {
    pub fast: usize,
    pub slow: usize,
    pub slow_factor: f64,
}

/// One configuration's outcome.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScaleRun {
    pub label: String,
    /// The link it ran over ("host loopback", "unlimited", "2 Gbit/s").
    pub link: String,
    /// The cores the coordinator ran on ("all cores", "2 cores").
    pub coordinator_cores: String,
    pub workers: usize,
    /// Evaluations per second the workers could do together.
    pub capacity: f64,
    pub views_per_step: usize,
    pub timed_steps: usize,
    pub steps_per_second: f64,
    pub coordinator_ms: f64,
    /// Mean critical path per timed step (`StepTimings::critical`).
    pub critical_ms: f64,
    /// Bytes through Redis (in + out) per timed step; `None` when Redis did not say.
    pub bytes_per_step: Option<f64>,
    /// The coordinator process's CPU milliseconds per step (all threads; unlike the wall
    /// clock figures, barely moved by other processes on the machine).
    pub coordinator_cpu_ms: Option<f64>,
    /// Redis' CPU milliseconds per step (it runs commands on one thread); on a cluster, the
    /// busiest shard's.
    pub redis_cpu_ms: Option<f64>,
    /// The store ("one Redis", "3-shard cluster").
    #[serde(default)]
    pub store: String,
    /// The busiest shard's part of the bytes (1 for one Redis).
    #[serde(default)]
    pub busiest_share: Option<f64>,
    /// Views per task.
    #[serde(default)]
    pub view_batch: usize,
    /// All the worker processes' CPU milliseconds per step, together.
    #[serde(default)]
    pub workers_cpu_ms: Option<f64>,
    /// The share of the machine's cores in use over the same steps (every process).
    #[serde(default)]
    pub machine_busy: Option<f64>,
    /// How busy `tessera plan --workers N` estimates the batch keeps the workers (its rounds
    /// of tasks and their edges); `None` for the mixed set (the plan models equal workers).
    #[serde(default)]
    pub plan_estimate: Option<f64>,
    /// A worker's step: device turns and waits (from the benchmark doubles' logs).
    #[serde(default)]
    pub worker_time: Option<WorkerTime>,
}

impl ScaleRun {
    pub fn ideal_steps_per_second(&self) -> f64 {
        self.capacity / self.views_per_step as f64
    }

    pub fn ideal_step_ms(&self) -> f64 {
        1000.0 / self.ideal_steps_per_second()
    }

    pub fn efficiency(&self) -> f64 {
        self.steps_per_second / self.ideal_steps_per_second()
    }
}

fn job_flags(size: u32, steps: usize, view_batch: usize) -> Vec<String> {
    [
        "--prompt",
        "a lighthouse on a cliff at dusk",
        "--size",
        &format!("{size}x{size}"),
        "--stages",
        &format!("{size}x{size}"),
        "--method",
        "hybrid",
        "--stage-steps",
        &steps.to_string(),
        "--view-batch",
        &view_batch.to_string(),
        "--seed",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// `tessera plan --json` of the one-stage job (with `--workers N`, its "workers" object).
fn plan_json(
    model: &Path,
    size: u32,
    view_batch: usize,
    workers: Option<usize>,
) -> Result<serde_json::Value> {
    let exe = std::env::current_exe().map_err(super::io("finding the tessera binary"))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["plan", "--model", &model.display().to_string(), "--json"])
        .args(job_flags(size, 2, view_batch));
    if let Some(n) = workers {
        cmd.args(["--workers", &n.to_string()]);
    }
    let out = cmd.output().map_err(super::io("running tessera plan"))?;
    serde_json::from_slice(&out.stdout).map_err(|e| {
        BenchError::Setup(format!(
            "tessera plan --json: {e}: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    })
}

/// Views (local + global) per step of the one-stage job.
fn views_per_step(model: &Path, size: u32) -> Result<usize> {
    let plan = plan_json(model, size, 1, None)?;
    let stage = &plan["stages"][0];
    let n =
        stage["local_views"].as_u64().unwrap_or(0) + stage["global_views"].as_u64().unwrap_or(0);
    if n == 0 {
        return Err(BenchError::Setup(format!("the plan has no views: {plan}")));
    }
    Ok(n as usize)
}

/// The view batch a run of `workers` uses (the one asked for, or the one `tessera plan
/// --workers N` recommends) and how busy its rounds can keep them.
fn batch_for(opts: &ScaleOptions, model: &Path, workers: usize) -> Result<(usize, Option<f64>)> {
    let asked = opts.view_batch.unwrap_or(1);
    let plan = plan_json(model, opts.size, asked, Some(workers))?;
    let fit = &plan["workers"];
    let (batch, busy) = match opts.view_batch {
        Some(b) => (Some(b as u64), &fit["busy"]),
        None => (
            fit["recommended_view_batch"].as_u64(),
            &fit["recommended_busy"],
        ),
    };
    let batch = batch
        .ok_or_else(|| BenchError::Setup(format!("tessera plan recommends no batch: {plan}")))?;
    Ok((batch as usize, busy.as_f64()))
}

/// One configuration: its label, the workers' ms per evaluation, the cores the coordinator
/// may use (`None`: all).
struct Config {
    label: String,
    speeds: Vec<f64>,
    cores: Option<usize>,
    shards: usize,
    view_batch: usize,
    plan_estimate: Option<f64>,
}

/// Runs one configuration on a fresh cluster.
fn run_one(
    scratch: &Path,
    model: &Path,
    cfg: &Config,
    opts: &ScaleOptions,
    views: usize,
) -> Result<ScaleRun> {
    let capacity: f64 = cfg.speeds.iter().map(|ms| 1000.0 / ms).sum();
    let ideal_step = views as f64 / capacity;
    let steps = opts
        .steps
        .unwrap_or_else(|| ((6.0 / ideal_step).ceil() as usize + 1).clamp(2, 8))
        .max(2);
    let cores = cores_label(cfg.cores);
    let store = store_label(cfg.shards);
    let b = cfg.view_batch;
    let dir = scratch.join(format!("{}-{cores}-{store}", cfg.label).replace([' ', ','], "-"));
    std::fs::create_dir_all(&dir).map_err(super::io(format!("creating {}", dir.display())))?;
    eprintln!(
        "{}: coordinator on {cores}, {store}, view batch {b}, {steps} steps (ideal {ideal_step:.2} s each)",
        cfg.label
    );
    let mut cluster = cluster::start_on(&dir, &[], cfg.shards)?;
    if let Some(gbit) = opts.node_link {
        netns::limit_ports(gbit, &cluster.redis.ports())?;
    }
    if let (Some(n), Some(pid)) = (cfg.cores, cluster.coordinator_pid()) {
        pin(pid, n)?;
    }
    for &ms in &cfg.speeds {
        cluster::add_workers(&mut cluster, model, 1, Some(ms))?;
    }
    let mut args = vec!["--model".to_string(), "sdxl-geometry".to_string()];
    args.extend(job_flags(opts.size, steps, cfg.view_batch));
    let job = cluster::submit(&cluster, &args)?;
    let limit = Duration::from_secs_f64(120.0 + 4.0 * ideal_step * (steps + 2) as f64);
    let (lines, counted) = watch_steps(&mut cluster, &job, steps, limit)?;
    let step_ends: Vec<f64> = lines.iter().map(|l| l.at_ms).collect();
    let turns: Vec<_> = cluster
        .workers
        .iter()
        .map(|w| idle::parse_turns(&w.log()))
        .collect();
    let (first, last) = (&lines[0], &lines[lines.len() - 1]);
    let timed = lines.len() - 1;
    let seconds = (last.at_ms - first.at_ms) / 1e3;
    let mean =
        |f: fn(&cluster::StepLine) -> f64| lines[1..].iter().map(f).sum::<f64>() / timed as f64;
    Ok(ScaleRun {
        label: cfg.label.clone(),
        link: "host loopback".into(),
        coordinator_cores: cores,
        workers: cfg.speeds.len(),
        capacity,
        views_per_step: views,
        timed_steps: timed,
        steps_per_second: timed as f64 / seconds,
        coordinator_ms: mean(|l| l.coordinator_ms),
        critical_ms: mean(|l| l.critical_ms),
        bytes_per_step: counted.bytes,
        coordinator_cpu_ms: counted.coordinator_cpu_ms,
        workers_cpu_ms: counted.workers_cpu_ms,
        machine_busy: counted.machine_busy,
        redis_cpu_ms: counted.redis_cpu_ms,
        store,
        busiest_share: counted.busiest_share,
        view_batch: b,
        plan_estimate: cfg.plan_estimate,
        worker_time: idle::per_step(&step_ends, &turns),
    })
}

fn cores_label(cores: Option<usize>) -> String {
    match cores {
        Some(1) => "1 core".into(),
        Some(n) => format!("{n} cores"),
        None => "all cores".into(),
    }
}

/// Pins every thread of process `pid` (and the threads it starts later) to cores `0..n`.
fn pin(pid: u32, n: usize) -> Result<()> {
    let out = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", &format!("0-{}", n - 1), &pid.to_string()])
        .output()
        .map_err(super::io(
            "running taskset (util-linux) for --coordinator-cores",
        ))?;
    if !out.status.success() {
        return Err(BenchError::Setup(format!(
            "--coordinator-cores {n}: taskset refused: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// What is counted per step between two moments of the run.
#[derive(Debug, Clone, Copy, Default)]
struct PerStep {
    bytes: Option<f64>,
    coordinator_cpu_ms: Option<f64>,
    workers_cpu_ms: Option<f64>,
    machine_busy: Option<f64>,
    redis_cpu_ms: Option<f64>,
    busiest_share: Option<f64>,
}

/// The counters at one moment: each Redis shard's bytes and CPU, the coordinator's CPU,
/// steps done.
struct Sample {
    bytes: Vec<Option<u64>>,
    redis_cpu: Vec<Option<f64>>,
    coordinator_cpu: Option<f64>,
    /// Every worker process's CPU seconds, summed.
    workers_cpu: Option<f64>,
    /// The machine's (busy, all) CPU time in ticks, every core together.
    machine: Option<(f64, f64)>,
    steps: usize,
}

impl Sample {
    fn take(cluster: &tessera_harness::LocalCluster, steps: usize) -> Self {
        Self {
            bytes: cluster.redis.net_bytes(),
            redis_cpu: cluster.redis.cpu_seconds(),
            coordinator_cpu: cluster.coordinator_pid().and_then(super::cpu_seconds_of),
            workers_cpu: cluster
                .workers
                .iter()
                .map(|w| super::cpu_seconds_of(w.pid()))
                .sum(),
            machine: machine_ticks(),
            steps,
        }
    }

    fn per_step(&self, later: &Sample) -> PerStep {
        if later.steps <= self.steps {
            return PerStep::default();
        }
        let n = (later.steps - self.steps) as f64;
        let diff = |a: Option<f64>, b: Option<f64>| Some((b? - a?) / n);
        // Per shard, then summed (bytes) or the busiest (CPU: each shard has one thread).
        let shard_bytes: Option<Vec<f64>> = self
            .bytes
            .iter()
            .zip(&later.bytes)
            .map(|(a, b)| diff(a.map(|v| v as f64), b.map(|v| v as f64)))
            .collect();
        let shard_cpu: Option<Vec<f64>> = self
            .redis_cpu
            .iter()
            .zip(&later.redis_cpu)
            .map(|(a, b)| diff(*a, *b))
            .collect();
        let bytes = shard_bytes.as_ref().map(|v| v.iter().sum::<f64>());
        let busiest = shard_bytes.and_then(|v| v.into_iter().reduce(f64::max));
        PerStep {
            bytes,
            coordinator_cpu_ms: diff(self.coordinator_cpu, later.coordinator_cpu).map(|s| s * 1e3),
            workers_cpu_ms: diff(self.workers_cpu, later.workers_cpu).map(|s| s * 1e3),
            machine_busy: self.machine.zip(later.machine).and_then(|(a, b)| {
                let all = b.1 - a.1;
                (all > 0.0).then(|| (b.0 - a.0) / all)
            }),
            redis_cpu_ms: shard_cpu
                .and_then(|v| v.into_iter().reduce(f64::max))
                .map(|s| s * 1e3),
            busiest_share: busiest.zip(bytes).map(|(b, all)| b / all.max(1.0)),
        }
    }
}

/// The machine's CPU time from `/proc/stat`'s first line, in ticks: (busy, all), where idle
/// and I/O wait are not busy.
fn machine_ticks() -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let ticks: Vec<f64> = line
        .split_whitespace()
        .map(str::parse)
        .collect::<std::result::Result<_, _>>()
        .ok()?;
    // user nice system idle iowait irq softirq steal (guest time is inside user already).
    let all: f64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3)? + ticks.get(4).unwrap_or(&0.0);
    Some((all - idle, all))
}

/// Waits for `steps` steps of the job's stage; their lines and the counts per step from the
/// first step's end to the second-last's (so the decode after the last step is not in them).
fn watch_steps(
    cluster: &mut tessera_harness::LocalCluster,
    job: &str,
    steps: usize,
    limit: Duration,
) -> Result<(Vec<cluster::StepLine>, PerStep)> {
    let lines = cluster::wait_steps(cluster, job, 0, 1, limit)?;
    let start = Sample::take(cluster, lines.len());
    let end_step = if steps >= 3 { steps - 1 } else { steps };
    let lines = cluster::wait_steps(cluster, job, 0, end_step, limit)?;
    let counted = start.per_step(&Sample::take(cluster, lines.len()));
    let lines = cluster::wait_steps(cluster, job, 0, steps, limit)?;
    Ok((lines, counted))
}

/// Measures every configuration of `opts` on this process's network (no namespace).
pub fn measure(opts: &ScaleOptions) -> Result<Vec<ScaleRun>> {
    let scratch = Scratch::new("scale")?;
    let model = sdxl_geometry_model(&scratch.0)?;
    let views = views_per_step(&model, opts.size)?;
    let mut configs = Vec::new();
    let stores = if opts.stores.is_empty() {
        &[0][..]
    } else {
        &opts.stores[..]
    };
    for &n in &opts.workers {
        let (view_batch, plan_estimate) = batch_for(opts, &model, n)?;
        for &cores in &opts.coordinator_cores {
            for &shards in stores {
                configs.push(Config {
                    label: format!("{n} workers"),
                    speeds: vec![opts.eval_ms; n],
                    cores,
                    shards,
                    view_batch,
                    plan_estimate,
                });
            }
        }
    }
    if let Some(m) = opts.mixed {
        let (view_batch, _) = batch_for(opts, &model, m.fast + m.slow)?;
        let mut speeds = vec![opts.eval_ms; m.fast];
        speeds.extend(vec![opts.eval_ms * m.slow_factor; m.slow]);
        configs.push(Config {
            label: format!("mixed {}+{} at {}x", m.fast, m.slow, m.slow_factor),
            speeds,
            cores: None,
            shards: stores[0],
            view_batch,
            // The plan models equal workers.
            plan_estimate: None,
        });
    }
    let mut runs = Vec::new();
    for _ in 0..opts.repeat.max(1) {
        for cfg in &configs {
            runs.push(run_one(&scratch.0, &model, cfg, opts, views)?);
        }
    }
    Ok(runs)
}

/// The arguments that make a child process measure `opts` and write its runs to `file`.
pub(crate) fn child_args(opts: &ScaleOptions, file: &Path) -> Vec<String> {
    let list = |v: &[usize]| v.iter().map(usize::to_string).collect::<Vec<_>>().join(",");
    let (mixed, slow_factor) = match opts.mixed {
        Some(m) => (list(&[m.fast, m.slow]), m.slow_factor),
        None => ("none".into(), 1.0),
    };
    let mut args: Vec<String> = ["bench", "scale", "--workers", &list(&opts.workers)]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for (flag, value) in [
        ("--eval-ms", opts.eval_ms.to_string()),
        ("--mixed", mixed),
        ("--slow-factor", slow_factor.to_string()),
        ("--size", opts.size.to_string()),
        (
            "--view-batch",
            opts.view_batch.map_or("auto".into(), |b| b.to_string()),
        ),
        ("--coordinator-cores", cores_arg(&opts.coordinator_cores)),
        ("--store", stores_arg(&opts.stores)),
        ("--repeat", opts.repeat.max(1).to_string()),
        ("--runs-json", file.display().to_string()),
    ] {
        args.extend([flag.to_string(), value]);
    }
    if let Some(steps) = opts.steps {
        args.extend(["--steps".to_string(), steps.to_string()]);
    }
    if let Some(gbit) = opts.node_link {
        args.extend(["--node-link-gbit".to_string(), gbit.to_string()]);
    }
    args
}

fn stores_arg(stores: &[usize]) -> String {
    let names: Vec<&str> = stores
        .iter()
        .map(|&s| if s == 0 { "redis" } else { "cluster" })
        .collect();
    if names.is_empty() {
        "redis".into()
    } else {
        names.join(",")
    }
}

fn cores_arg(cores: &[Option<usize>]) -> String {
    cores
        .iter()
        .map(|c| c.map_or("all".into(), |n| n.to_string()))
        .collect::<Vec<_>>()
        .join(",")
}

/// Each link of `opts.links` in its own namespace, one child process each.
fn measure_links(opts: &ScaleOptions) -> Result<Vec<ScaleRun>> {
    netns::check_allowed()?;
    let scratch = Scratch::new("scale-links")?;
    let mut runs = Vec::new();
    for (i, &link) in opts.links.iter().enumerate() {
        let label = if opts.link_per_node {
            netns::label_per_node(link)
        } else {
            netns::label(link)
        };
        eprintln!("link {label}:");
        let file = scratch.path(&format!("runs-{i}.json"));
        if opts.link_per_node {
            // The namespace's loopback stays unlimited; the child shapes each node's port.
            let child = ScaleOptions {
                node_link: link,
                ..opts.clone()
            };
            netns::run_inside(None, &child_args(&child, &file))?;
        } else {
            netns::run_inside(link, &child_args(opts, &file))?;
        }
        let text = std::fs::read_to_string(&file)
            .map_err(super::io(format!("reading {}", file.display())))?;
        let mut got: Vec<ScaleRun> = serde_json::from_str(&text)
            .map_err(|e| BenchError::Setup(format!("{}: {e}", file.display())))?;
        for r in &mut got {
            r.link = label.clone();
        }
        runs.extend(got);
    }
    Ok(runs)
}

/// Writes `runs` as JSON to `file` (a child of [`measure_links`]).
pub fn write_runs(runs: &[ScaleRun], file: &Path) -> Result<()> {
    let text = serde_json::to_string(runs)
        .map_err(|e| BenchError::Setup(format!("encoding the runs: {e}")))?;
    std::fs::write(file, text).map_err(super::io(format!("writing {}", file.display())))
}

pub fn run(opts: &ScaleOptions, command: String) -> Result<(Vec<ScaleRun>, Report)> {
    let machine = Machine::probe();
    let runs = if opts.links.is_empty() {
        measure(opts)?
    } else {
        measure_links(opts)?
    };
    let views = runs.first().map_or(0, |r| r.views_per_step);
    let report = Report {
        title: format!(
            "bench scale: {}x{} SDXL-geometry stage, simulated workers at {} ms/evaluation",
            opts.size, opts.size, opts.eval_ms
        ),
        command,
        machine,
        tables: if opts.repeat > 1 {
            vec![table(&runs), spread(&runs)]
        } else {
            vec![table(&runs)]
        },
        notes: notes(views, opts.view_batch, opts.link_per_node, opts.repeat),
    };
    Ok((runs, report))
}

/// The columns that name a configuration, first in both tables.
const CONFIG_COLUMNS: [&str; 5] = ["link", "workers", "coordinator", "store", "view batch"];

/// A run's configuration, as [`CONFIG_COLUMNS`] name it.
fn config_cells(r: &ScaleRun) -> Vec<String> {
    vec![
        r.link.clone(),
        r.label.clone(),
        r.coordinator_cores.clone(),
        r.store.clone(),
        r.view_batch.to_string(),
    ]
}

fn table(runs: &[ScaleRun]) -> Table {
    let mut table = Table::new(
        &[
            CONFIG_COLUMNS.as_slice(),
            &[
                "capacity (evals/s)",
                "timed steps",
                "steps/s",
                "ideal steps/s",
                "efficiency",
                "plan's estimate",
                "ideal step ms",
                "coordinator work ms/step",
                "coordinator / ideal step",
                "critical path ms/step",
                "coordinator CPU ms/step",
                "Redis CPU ms/step (busiest shard)",
                "workers' CPU ms/step (all)",
                "machine busy",
                "MB through Redis/step (all shards)",
                "busiest shard's bytes",
                "a worker's step, ms: device, waiting before its first turn, between, after its last",
            ],
        ]
        .concat(),
    );
    for r in runs {
        let mut cells = config_cells(r);
        cells.extend([
            format!("{:.1}", r.capacity),
            r.timed_steps.to_string(),
            format!("{:.3}", r.steps_per_second),
            format!("{:.3}", r.ideal_steps_per_second()),
            format!("{:.1}%", 100.0 * r.efficiency()),
            r.plan_estimate
                .map_or("–".into(), |b| format!("{:.0}%", 100.0 * b)),
            format!("{:.0}", r.ideal_step_ms()),
            format!("{:.0}", r.coordinator_ms),
            format!("{:.2}", r.coordinator_ms / r.ideal_step_ms()),
            format!("{:.0}", r.critical_ms),
            r.coordinator_cpu_ms
                .map_or("?".into(), |ms| format!("{ms:.0}")),
            r.redis_cpu_ms.map_or("?".into(), |ms| format!("{ms:.0}")),
            r.workers_cpu_ms.map_or("?".into(), |ms| format!("{ms:.0}")),
            r.machine_busy
                .map_or("?".into(), |b| format!("{:.0}%", 100.0 * b)),
            r.bytes_per_step
                .map_or("?".into(), |b| format!("{:.1}", b / 1e6)),
            r.busiest_share
                .map_or("?".into(), |s| format!("{:.0}%", 100.0 * s)),
            r.worker_time.map_or("?".into(), |t| {
                format!(
                    "{:.0} / {:.0} / {:.0} / {:.0}",
                    t.busy_ms, t.head_ms, t.between_ms, t.tail_ms
                )
            }),
        ]);
        table.row(cells);
    }
    table
}

/// One row per configuration of repeated runs (in the order they first ran): how many runs,
/// the median efficiency, its range and every run's in order.
fn spread(runs: &[ScaleRun]) -> Table {
    let mut table = Table::new(
        &[
            CONFIG_COLUMNS.as_slice(),
            &[
                "runs",
                "median efficiency",
                "range",
                "each run",
                "plan's estimate",
            ],
        ]
        .concat(),
    );
    let mut groups: Vec<(Vec<String>, Vec<&ScaleRun>)> = Vec::new();
    for r in runs {
        let key = config_cells(r);
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, g)) => g.push(r),
            None => groups.push((key, vec![r])),
        }
    }
    let pct = |e: f64| format!("{:.1}%", 100.0 * e);
    for (mut cells, group) in groups {
        let each: Vec<f64> = group.iter().map(|r| r.efficiency()).collect();
        let (lo, hi) = each
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), &e| (lo.min(e), hi.max(e)));
        cells.extend([
            each.len().to_string(),
            pct(median(&each)),
            format!("{}–{}", pct(lo), pct(hi)),
            each.iter().map(|&e| pct(e)).collect::<Vec<_>>().join(", "),
            group[0]
                .plan_estimate
                .map_or("–".into(), |b| format!("{:.0}%", 100.0 * b)),
        ]);
        table.row(cells);
    }
    table
}

/// The middle value (the mean of the two middle ones for an even count); 0 for none.
fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn notes(views: usize, view_batch: Option<usize>, per_node: bool, repeat: usize) -> Vec<String> {
    let link = if per_node {
        "link: `--link-gbit` with `--link-per-node` runs the loopback cluster in a network \
         namespace where each Redis node's port has a link of its own of that speed (a tc HTB \
         class carrying the node's traffic in and out), as Redis nodes on their own hosts have; \
         the coordinator's and the workers' other traffic (gRPC) is not limited"
    } else {
        "link: `--link-gbit` runs the whole loopback cluster in a network namespace whose \
         loopback is limited with a tc token bucket; every packet crosses it once, so the \
         limit caps all the cluster's traffic together"
    };
    let mut notes = vec![
        format!(
            "{views} views per step ({}); an evaluation = one training-size view with CFG",
            match view_batch {
                Some(b) => format!("{b} per task"),
                None => "per task: the view batch column, the one `tessera plan --workers N` \
                         recommends for each worker count (`--view-batch auto`)"
                    .into(),
            }
        ),
        "workers are benchmark doubles (`tessera worker --simulate-eval-ms`): real processes, \
         real Redis and gRPC, no model compute"
            .into(),
        "timed: from the end of the stage's first step to the end of its last, as the \
         coordinator logs them (startup, prompt encoding, stage entry and decode excluded); \
         ideal = capacity / views per step"
            .into(),
        "plan's estimate: the efficiency `tessera plan --workers N` estimates for the batch: \
         the step's tasks on equal workers, each to the first one free, a tenth of an \
         evaluation per call and half an evaluation per view of a task at the step's edges"
            .into(),
        "coordinator work ms/step: the engine's own work per step (StepTimings, all but \
         waiting for workers, most of it overlapping the workers); critical path ms/step: \
         the part no worker of the job can overlap (StepTimings::critical: from the step's \
         start to its first task out, and from its last result in to its end); both \
         averaged over the timed steps"
            .into(),
        "coordinator / Redis CPU ms/step: CPU time the coordinator process (all its threads, \
         from /proc) and redis-server (INFO cpu) used per step over the same steps as the \
         bytes; CPU time is far less moved by other processes than the wall-clock columns, and \
         coordinator CPU / ideal step is the cores it needs at least; workers' CPU: every worker \
         process's together (a benchmark double's is its store reads and writes, gRPC and \
         making its outputs; its simulated evaluation sleeps)"
            .into(),
        "machine busy: the share of all the machine's cores in use over the same steps \
         (`/proc/stat`, every process and the kernel): near 100% the machine's CPU, not the \
         cluster's design, sets the pace"
            .into(),
        "MB through Redis/step: Redis' own count of bytes in and out (INFO stats) from the \
         first step's end to the second-last's, per step: each byte a party writes and another \
         reads crosses the store's link twice"
            .into(),
        format!(
            "store: one Redis, or a Redis Cluster of 3 masters {} (`--store cluster`); its \
             bytes are summed over the shards, its Redis CPU is the busiest shard's, and the \
             busiest shard's bytes are its part of the sum (a third is even)",
            if per_node {
                "each on its own link"
            } else {
                "on the same link"
            }
        ),
        link.into(),
        "a worker's step: each benchmark double logs its device turns, the coordinator its \
         steps' ends; per timed step and worker, the ms it held the device, waited before its \
         first turn (the step's head: nothing handed to it yet), waited between turns (calls \
         and store traffic the device did not hide), and waited after its last turn (the \
         step's tail: the last round running elsewhere, then the last merges, the step end and \
         the next step's first inputs), averaged over workers and steps; the four sum to the \
         step's wall time"
            .into(),
    ];
    if repeat > 1 {
        notes.push(format!(
            "runs: every configuration ran {repeat} times, in rounds (each round runs every \
             configuration once, in the order of the first table; with `--link-gbit`, within \
             each link), so a slow spell of the machine falls on all of them; the second \
             table gives each configuration's median efficiency, its range and each run's: \
             on a shared machine one run of a configuration can differ from the next by \
             several points"
        ));
    }
    notes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(store: &str, steps_per_second: f64) -> ScaleRun {
        ScaleRun {
            label: "16 workers".into(),
            link: "host loopback".into(),
            coordinator_cores: "all cores".into(),
            workers: 16,
            capacity: 20.0,
            views_per_step: 10,
            timed_steps: 7,
            steps_per_second,
            coordinator_ms: 0.0,
            critical_ms: 0.0,
            bytes_per_step: None,
            coordinator_cpu_ms: None,
            redis_cpu_ms: None,
            store: store.into(),
            busiest_share: None,
            view_batch: 2,
            workers_cpu_ms: None,
            machine_busy: None,
            plan_estimate: Some(0.86),
            worker_time: None,
        }
    }

    /// Repeated runs (as rounds interleave them) grouped per configuration, in the order
    /// they first ran, with the median, the range and each run in order.
    #[test]
    fn repeated_runs_are_summed_up_per_configuration() {
        // Ideal: 2 steps/s, so 1.8 steps/s is 90%.
        let runs = [
            run("one Redis", 1.8),
            run("3-shard cluster", 1.5),
            run("one Redis", 1.6),
            run("3-shard cluster", 1.7),
            run("one Redis", 1.9),
        ];
        let t = spread(&runs);
        assert_eq!(t.rows.len(), 2);
        let redis = &t.rows[0];
        assert_eq!(redis[3], "one Redis");
        assert_eq!(
            &redis[5..9],
            ["3", "90.0%", "80.0%–95.0%", "90.0%, 80.0%, 95.0%"]
        );
        assert_eq!(redis[9], "86%");
        let cluster = &t.rows[1];
        assert_eq!(&cluster[5..8], ["2", "80.0%", "75.0%–85.0%"]);
        assert_eq!(median(&[]), 0.0);
    }
}
