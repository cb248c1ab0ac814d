//! `tessera bench memory`: peak resident memory of the coordinator and of the workers for a
//! whole job at 8K, 32K or any size, run end to end through a cluster on loopback (a real
//! `redis-server`, a `tessera coordinator` process, `tessera worker` processes): cascade,
//! stage transitions, high-resolution steps, the tiled decode and the streamed PNG (plus the
//! Deep Zoom pyramid and viewer above 16384 px). The output files are checked (PNG size from
//! its header; the pyramid and viewer present) before the figures are reported.
//!
//! Workers are either the tiny SDXL-architecture model with SDXL's geometry (real model code,
//! slow on a CPU) or benchmark doubles (`--simulate-eval-ms`), which compute nothing but move
//! tensors of the real sizes, so the coordinator's memory is what a real job makes it.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::cluster;
use super::{
    io, memory_of, mib, tiny_model_at, BenchError, Machine, Report, Result, Scratch, Table,
};

#[derive(Debug, Clone)]
pub struct MemoryOptions {
    /// Output sides in pixels, one job each.
    pub sizes: Vec<u32>,
    pub workers: usize,
    /// `None`: the tiny model; `Some(ms)`: benchmark doubles at `ms` per evaluation.
    pub simulate_ms: Option<f64>,
    /// High-resolution steps of each stage after the first.
    pub steps: usize,
    /// Keep the rendered files here (else they are removed with the scratch directory).
    pub keep: Option<PathBuf>,
    /// The model's training size in pixels (1024: SDXL's geometry); tiles, views and the
    /// first stage follow it.
    pub training: u32,
}

#[derive(Debug, Clone)]
pub struct MemoryRun {
    pub size: u32,
    pub stages: Vec<u32>,
    pub seconds: f64,
    pub coordinator_peak: u64,
    pub worker_peak: u64,
    pub png_bytes: u64,
    pub dzi_tiles: Option<usize>,
}

/// The cascade measured for a size: the training size, then the output for sizes up to 8192;
/// above, an intermediate stage at an eighth of the output first, so the transition into the
/// last stage reads a picture of at most 4096² (the upscaled picture itself is never held).
pub fn stages_for(size: u32, training: u32) -> Vec<u32> {
    if size <= training {
        vec![size]
    } else if size <= 8192 {
        vec![training, size]
    } else {
        vec![training, (size / 8).max(training) / 64 * 64, size]
    }
}

pub(super) fn job_flags(model: &str, size: u32, stages: &[u32], steps: usize) -> Vec<String> {
    let stage_list: Vec<String> = stages.iter().map(|s| format!("{s}x{s}")).collect();
    let mut stage_steps = vec!["2".to_string()];
    stage_steps.extend(std::iter::repeat_n(steps.to_string(), stages.len() - 1));
    let mut flags: Vec<String> = [
        "--model",
        model,
        "--prompt",
        "a lighthouse on a cliff at dusk",
        "--size",
        &format!("{size}x{size}"),
        "--stages",
        &stage_list.join(","),
        "--seed",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if stages.len() > 1 {
        flags.extend([
            "--method".into(),
            "hybrid".into(),
            "--stage-steps".into(),
            stage_steps.join(","),
        ]);
    } else {
        flags.extend(["--steps".into(), "2".into()]);
    }
    flags
}

/// A cascade as a table cell: `1024 → 4096 → 32768`.
pub(super) fn stage_chain(stages: &[u32]) -> String {
    let sides: Vec<String> = stages.iter().map(|s| s.to_string()).collect();
    sides.join(" → ")
}

/// The name a cluster serves a model directory under (its last component).
pub(super) fn model_name(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Width and height from a PNG's IHDR chunk.
pub(super) fn png_size(path: &Path) -> Result<(u32, u32)> {
    use std::io::Read;
    let mut head = [0u8; 24];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .map_err(io(format!("reading {}", path.display())))?;
    if &head[..8] != b"\x89PNG\r\n\x1a\n" || &head[12..16] != b"IHDR" {
        return Err(BenchError::Setup(format!(
            "{} is not a PNG",
            path.display()
        )));
    }
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    Ok((be(&head[16..20]), be(&head[20..24])))
}

fn count_files(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| {
            let p = e.path();
            if p.is_dir() {
                count_files(&p)
            } else {
                1
            }
        })
        .sum()
}

fn run_one(scratch: &Path, model: &Path, size: u32, opts: &MemoryOptions) -> Result<MemoryRun> {
    let dir = scratch.join(format!("{size}"));
    let out = dir.join("out");
    std::fs::create_dir_all(&out).map_err(io(format!("creating {}", out.display())))?;
    let stages = stages_for(size, opts.training);
    eprintln!(
        "{size}x{size}: stages {stages:?}, {} {} workers",
        opts.workers,
        if opts.simulate_ms.is_some() {
            "simulated"
        } else {
            "tiny-model"
        }
    );
    let mut cluster = cluster::start(&dir, &["--output-dir".into(), out.display().to_string()])?;
    cluster::add_workers(&mut cluster, model, opts.workers, opts.simulate_ms)?;
    let start = Instant::now();
    let job = cluster::submit(
        &cluster,
        &job_flags(&model_name(model), size, &stages, opts.steps),
    )?;
    cluster::watch(&cluster, &job)?;
    let seconds = start.elapsed().as_secs_f64();
    // VmHWM is the process's peak; read it while the processes still run.
    let coordinator_peak = cluster
        .coordinator_pid()
        .and_then(memory_of)
        .map_or(0, |m| m.0);
    let worker_peak = cluster
        .workers
        .iter()
        .filter_map(|w| memory_of(w.pid()).map(|m| m.0))
        .max()
        .unwrap_or(0);
    let log = cluster.coordinator_log();
    if log.contains(&format!("job {job} failed")) {
        return Err(BenchError::Setup(format!(
            "job {job} failed; see {}",
            cluster.coordinator_log_path().unwrap_or(&dir).display()
        )));
    }
    let png = out.join(&job).join("0.png");
    let (w, h) = png_size(&png)?;
    if (w, h) != (size, size) {
        return Err(BenchError::Setup(format!(
            "{} is {w}x{h}, expected {size}x{size}",
            png.display()
        )));
    }
    let png_bytes = std::fs::metadata(&png).map_or(0, |m| m.len());
    let dzi_tiles = if size > crate::assemble::dzi::AUTO_THRESHOLD {
        let (dzi, viewer) = (
            out.join(&job).join("0.dzi"),
            out.join(&job).join("0_viewer.html"),
        );
        if !dzi.is_file() || !viewer.is_file() {
            return Err(BenchError::Setup(format!(
                "{size}x{size}: the Deep Zoom pyramid or viewer is missing in {}",
                out.join(&job).display()
            )));
        }
        Some(count_files(&out.join(&job).join("0_files")))
    } else {
        None
    };
    if let Some(keep) = &opts.keep {
        let to = keep.join(format!("{size}"));
        let _ = std::fs::remove_dir_all(&to);
        std::fs::create_dir_all(keep).map_err(io(format!("creating {}", keep.display())))?;
        std::fs::rename(out.join(&job), &to)
            .map_err(io(format!("moving the output to {}", to.display())))?;
    }
    drop(cluster);
    Ok(MemoryRun {
        size,
        stages,
        seconds,
        coordinator_peak,
        worker_peak,
        png_bytes,
        dzi_tiles,
    })
}

pub fn run(opts: &MemoryOptions, command: String) -> Result<(Vec<MemoryRun>, Report)> {
    let machine = Machine::probe();
    let scratch = Scratch::new("memory")?;
    let model = tiny_model_at(&scratch.0, opts.training)?;
    let mut runs = Vec::new();
    for &size in &opts.sizes {
        runs.push(run_one(&scratch.0, &model, size, opts)?);
    }
    let mut table = Table::new(&[
        "output",
        "stages",
        "workers",
        "wall",
        "coordinator peak RSS",
        "worker peak RSS (largest)",
        "PNG",
        "Deep Zoom tiles",
    ]);
    let kind = match opts.simulate_ms {
        Some(ms) => format!("{} doubles at {ms} ms/eval", opts.workers),
        None => format!("{} tiny-model", opts.workers),
    };
    for r in &runs {
        table.row(vec![
            format!("{0}x{0}", r.size),
            stage_chain(&r.stages),
            kind.clone(),
            format!("{:.0} s", r.seconds),
            mib(r.coordinator_peak),
            mib(r.worker_peak),
            format!("{:.1} MiB", r.png_bytes as f64 / (1024.0 * 1024.0)),
            r.dzi_tiles.map_or("—".into(), |n| n.to_string()),
        ]);
    }
    let report = Report {
        title: "bench memory: peak RSS of a whole job through a loopback cluster".into(),
        command,
        machine,
        tables: vec![table],
        notes: vec![
            "peak RSS = VmHWM of each process after the job (the coordinator ran only this job)"
                .into(),
            if opts.training == 1024 {
                format!(
                    "the model is the tiny SDXL-architecture model with SDXL's geometry \
                     (training 1024², tiles and views of SDXL's sizes); stages after the first \
                     run {} high-resolution step(s) (method hybrid)",
                    opts.steps
                )
            } else {
                format!(
                    "the model is the tiny SDXL-architecture model made for a training size of \
                     {0}² (tiles and views {0} px, a latent of {1}²); stages after the first run \
                     {2} high-resolution step(s) (method hybrid)",
                    opts.training,
                    opts.training / 8,
                    opts.steps
                )
            },
            "the job runs end to end: stage transitions (decode, upscale a tile at a time, \
             encode on the workers), the steps, the tiled decode streamed into the PNG (and \
             the Deep Zoom pyramid with its viewer above 16384 px); the PNG's size is checked"
                .into(),
            "benchmark doubles, where used, load no weights and compute nothing; they return \
             tensors of the real sizes, so the coordinator holds and moves what a real job \
             makes it"
                .into(),
        ],
    };
    Ok((runs, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_keep_the_transition_picture_small() {
        assert_eq!(stages_for(1024, 1024), vec![1024]);
        assert_eq!(stages_for(8192, 1024), vec![1024, 8192]);
        assert_eq!(stages_for(8192, 256), vec![256, 8192]);
        assert_eq!(stages_for(32768, 1024), vec![1024, 4096, 32768]);
        let flags = job_flags("m", 32768, &stages_for(32768, 1024), 2);
        let at = flags.iter().position(|f| f == "--stage-steps").unwrap();
        assert_eq!(flags[at + 1], "2,2,2");
    }
}
