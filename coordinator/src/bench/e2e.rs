//! `tessera bench e2e`: the wall time of one whole render with the tiny model (default 4K),
//! embedded (`tessera render`, one process, no Redis) and through a loopback cluster (a real
//! `redis-server`, a coordinator and N worker processes), and whether the two images have the
//! same pixels — they must, whatever the number of workers.
//!
//! The embedded time is the whole `tessera render` process, model loading included; the
//! cluster's is from `submit` to the end of `watch`, with the workers already up and their
//! model loaded (a cluster is started once and serves many jobs). The tiny model loads in
//! well under a second, so the difference is small either way.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use super::cluster;
use super::memory::{job_flags, model_name, png_size, stage_chain, stages_for};
use super::{io, tiny_model_at, BenchError, Machine, Report, Result, Scratch, Table};

#[derive(Debug, Clone)]
pub struct E2eOptions {
    /// Output side in pixels.
    pub size: u32,
    /// Worker processes of the cluster run.
    pub workers: usize,
    /// High-resolution steps of each stage after the first.
    pub steps: usize,
    /// The tiny model's training size in pixels (see `bench memory --training-size`).
    pub training: u32,
}

#[derive(Debug, Clone)]
pub struct E2eRun {
    pub embedded_seconds: f64,
    pub cluster_seconds: f64,
    pub same_pixels: bool,
}

/// The decoded pixels of a PNG, for comparing two renders (their metadata may differ).
fn pixels(path: &Path) -> Result<Vec<u8>> {
    let file = std::fs::File::open(path).map_err(io(format!("opening {}", path.display())))?;
    let mut reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .map_err(|e| BenchError::Setup(format!("{}: {e}", path.display())))?;
    let mut buf = vec![0; reader.output_buffer_size().unwrap_or(0)];
    let info = reader
        .next_frame(&mut buf)
        .map_err(|e| BenchError::Setup(format!("{}: {e}", path.display())))?;
    buf.truncate(info.buffer_size());
    Ok(buf)
}

fn check_size(png: &Path, size: u32) -> Result<()> {
    let (w, h) = png_size(png)?;
    if (w, h) != (size, size) {
        return Err(BenchError::Setup(format!(
            "{} is {w}x{h}, expected {size}x{size}",
            png.display()
        )));
    }
    Ok(())
}

fn embedded(dir: &Path, model: &Path, flags: &[String]) -> Result<(f64, std::path::PathBuf)> {
    let png = dir.join("embedded.png");
    let log = dir.join("embedded.log");
    let file = std::fs::File::create(&log).map_err(io(format!("creating {}", log.display())))?;
    let err = file.try_clone().map_err(io("log file"))?;
    let exe = std::env::current_exe().map_err(io("finding the tessera binary"))?;
    let start = Instant::now();
    let status = Command::new(exe)
        .arg("render")
        .args(["--model", &model.display().to_string()])
        .args(flags)
        .args(["-o", &png.display().to_string()])
        .env("NO_COLOR", "1")
        .stdout(file)
        .stderr(err)
        .status()
        .map_err(io("running tessera render"))?;
    let seconds = start.elapsed().as_secs_f64();
    if !status.success() {
        return Err(BenchError::Setup(format!(
            "tessera render failed ({status}); see {}",
            log.display()
        )));
    }
    Ok((seconds, png))
}

fn clustered(
    dir: &Path,
    model: &Path,
    flags: &[String],
    workers: usize,
) -> Result<(f64, std::path::PathBuf)> {
    let out = dir.join("out");
    std::fs::create_dir_all(&out).map_err(io(format!("creating {}", out.display())))?;
    let mut cluster = cluster::start(dir, &["--output-dir".into(), out.display().to_string()])?;
    cluster::add_workers(&mut cluster, model, workers, None)?;
    let mut args = vec!["--model".to_string(), model_name(model)];
    args.extend(flags.iter().cloned());
    let start = Instant::now();
    let job = cluster::submit(&cluster, &args)?;
    cluster::watch(&cluster, &job)?;
    let seconds = start.elapsed().as_secs_f64();
    if cluster
        .coordinator_log()
        .contains(&format!("job {job} failed"))
    {
        return Err(BenchError::Setup(format!(
            "job {job} failed; see {}",
            cluster.coordinator_log_path().unwrap_or(dir).display()
        )));
    }
    let png = out.join(&job).join("0.png");
    let kept = dir.join("cluster.png");
    std::fs::rename(&png, &kept).map_err(io(format!("moving {}", png.display())))?;
    Ok((seconds, kept))
}

pub fn run(opts: &E2eOptions, command: String) -> Result<(E2eRun, Report)> {
    let machine = Machine::probe();
    let scratch = Scratch::new("e2e")?;
    let model = tiny_model_at(&scratch.0, opts.training)?;
    let stages = stages_for(opts.size, opts.training);
    // Everything but the model: the embedded run names a directory, the cluster a model name.
    let flags: Vec<String> = job_flags("", opts.size, &stages, opts.steps)
        .into_iter()
        .skip(2)
        .collect();
    eprintln!(
        "{0}x{0}: stages {stages:?}; embedded, then {1} workers",
        opts.size, opts.workers
    );
    let dir = scratch.0.join("runs");
    std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
    let (embedded_seconds, a) = embedded(&dir, &model, &flags)?;
    eprintln!("embedded: {embedded_seconds:.0} s");
    let (cluster_seconds, b) = clustered(&dir, &model, &flags, opts.workers)?;
    eprintln!("cluster: {cluster_seconds:.0} s");
    check_size(&a, opts.size)?;
    check_size(&b, opts.size)?;
    let same_pixels = pixels(&a)? == pixels(&b)?;
    let run = E2eRun {
        embedded_seconds,
        cluster_seconds,
        same_pixels,
    };

    let mut table = Table::new(&[
        "output",
        "stages",
        "embedded",
        &format!("cluster, {} workers", opts.workers),
        "cluster / embedded",
        "same pixels",
    ]);
    table.row(vec![
        format!("{0}x{0}", opts.size),
        stage_chain(&stages),
        format!("{embedded_seconds:.1} s"),
        format!("{cluster_seconds:.1} s"),
        format!("{:.2}", cluster_seconds / embedded_seconds),
        if same_pixels { "yes" } else { "NO" }.into(),
    ]);
    let report = Report {
        title: "bench e2e: one tiny-model render, embedded and through a loopback cluster".into(),
        command,
        machine,
        tables: vec![table],
        notes: vec![
            format!(
                "the tiny SDXL-architecture model (random weights) made for a training size of \
                 {0}²; stages after the first run {1} high-resolution step(s) (method hybrid)",
                opts.training, opts.steps
            ),
            "embedded: the whole `tessera render` process (model load included); cluster: \
             `submit` to the end of `watch` on a real redis-server, coordinator and worker \
             processes on loopback, the workers already up"
                .into(),
            "both runs share this machine's cores: on one host the cluster can only add its \
             own costs (Redis, gRPC, encoding); it pays off with one GPU per worker"
                .into(),
        ],
    };
    if !same_pixels {
        return Err(BenchError::Setup(format!(
            "the embedded and cluster renders have different pixels; the report:\n{}",
            report.text()
        )));
    }
    Ok((run, report))
}
