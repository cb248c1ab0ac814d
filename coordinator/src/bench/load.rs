//! `tessera bench load`: the wall time and peak memory of loading a whole model (UNet, VAE,
//! text encoders, tokenizers, scheduler) on the CPU until it is ready to denoise — a diffusers
//! directory against a single-file checkpoint, say. Each load runs in a fresh child process
//! (this binary again, `bench load --child`), so one load's peak never hides another's.
//!
//! Memory: the child samples its own `/proc/self/status` every 10 ms and reports the sample
//! where the resident set was largest, split into anonymous memory (the weights built) and
//! file-backed pages (the memory-mapped safetensors, clean page cache the kernel can drop),
//! besides `VmHWM`, and the same split once loading is done.
//!
//! Page cache: warm runs follow a load of the same files; cold runs first evict the model's
//! files from the page cache with `posix_fadvise(DONTNEED)` (no root needed, and no one
//! else's cache is dropped).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};
use tessera_worker::model::diffusion::DiffusionModel;
use tessera_worker::model::loader::ModelDir;
use tessera_worker::model::lora::{LoraSet, LoraSpec};
use tessera_worker::model::single_file::is_single_file;

use super::{io, mib, BenchError, Machine, Report, Result, Table};

#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub models: Vec<PathBuf>,
    /// Loads per model and cache state; the median is reported.
    pub repeats: usize,
    /// The type the weights are loaded in.
    pub dtype: DType,
    /// Also measure with the model's files evicted from the page cache.
    pub cold: bool,
    /// `FILE[:WEIGHT]` LoRAs: also measure (warm) loads with them merged.
    pub loras: Vec<String>,
}

/// What one child measured.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct LoadRun {
    pub seconds: f64,
    /// `VmHWM`: the peak resident set.
    pub hwm: u64,
    /// The sample with the largest resident set: anonymous and file-backed parts.
    pub peak_anon: u64,
    pub peak_file: u64,
    /// Once the model is ready.
    pub after_anon: u64,
    pub after_file: u64,
}

/// One model's runs.
#[derive(Debug, Clone)]
pub struct ModelLoads {
    pub model: PathBuf,
    pub bytes: u64,
    pub warm: Vec<LoadRun>,
    pub cold: Vec<LoadRun>,
    /// Warm, with the LoRAs merged as the weights load.
    pub lora: Vec<LoadRun>,
}

const CHILD_TAG: &str = "TESSERA_LOAD ";

/// The child's side: load `model` (with `loras` merged), print the figures as one tagged
/// JSON line.
pub fn child(model: &Path, dtype: DType, loras: &[String]) -> Result<()> {
    let sampler = Sampler::start();
    let start = Instant::now();
    let failed = |e: String| BenchError::Setup(format!("loading {}: {e}", model.display()));
    let specs = loras
        .iter()
        .map(|l| LoraSpec::parse(l))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(failed)?;
    let mut dir = ModelDir::open(model).map_err(|e| failed(e.to_string()))?;
    if !specs.is_empty() {
        dir = dir.with_loras(Arc::new(LoraSet::load(&specs).map_err(failed)?));
    }
    let loaded =
        DiffusionModel::load_from(dir, &Device::Cpu, dtype).map_err(|e| failed(e.to_string()))?;
    let seconds = start.elapsed().as_secs_f64();
    let (peak, hwm) = sampler.stop();
    let after = Status::read().unwrap_or_default();
    let run = LoadRun {
        seconds,
        hwm,
        peak_anon: peak.anon,
        peak_file: peak.file,
        after_anon: after.anon,
        after_file: after.file,
    };
    let json = serde_json::to_string(&run).map_err(|e| BenchError::Setup(e.to_string()))?;
    println!("{CHILD_TAG}{json}");
    drop(loaded);
    Ok(())
}

/// The resident set, from `/proc/self/status`.
#[derive(Debug, Clone, Copy, Default)]
struct Status {
    anon: u64,
    file: u64,
    hwm: u64,
}

impl Status {
    fn read() -> Option<Self> {
        let text = std::fs::read_to_string("/proc/self/status").ok()?;
        let field = |name: &str| -> Option<u64> {
            let v = text.lines().find_map(|l| l.strip_prefix(name))?;
            Some(v.split_whitespace().next()?.parse::<u64>().ok()? * 1024)
        };
        Some(Self {
            anon: field("RssAnon:")?,
            file: field("RssFile:")?,
            hwm: field("VmHWM:")?,
        })
    }
}

/// Samples the resident set in a thread, keeping the largest.
struct Sampler {
    stop: Arc<AtomicBool>,
    peak: Arc<Mutex<Status>>,
    thread: std::thread::JoinHandle<()>,
}

impl Sampler {
    fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(Mutex::new(Status::default()));
        let (s, p) = (stop.clone(), peak.clone());
        let thread = std::thread::spawn(move || loop {
            if let (Some(now), Ok(mut peak)) = (Status::read(), p.lock()) {
                if now.anon + now.file > peak.anon + peak.file {
                    *peak = now;
                }
            }
            if s.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        });
        Self { stop, peak, thread }
    }

    /// The largest sample, and `VmHWM`.
    fn stop(self) -> (Status, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        let peak = self.peak.lock().map(|p| *p).unwrap_or_default();
        let hwm = Status::read().map_or(peak.hwm, |s| s.hwm);
        (peak, hwm)
    }
}

/// The safetensors files a model loads from.
fn weight_files(model: &Path) -> Vec<PathBuf> {
    if is_single_file(model) {
        return vec![model.to_path_buf()];
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(model).into_iter().flatten().flatten() {
        let dir = entry.path();
        for f in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let p = f.path();
            if p.extension().is_some_and(|x| x == "safetensors") {
                files.push(p);
            }
        }
    }
    files.sort();
    files
}

/// Drops `files`' pages from the page cache.
fn evict(files: &[PathBuf]) -> Result<()> {
    use std::os::fd::AsRawFd;
    for path in files {
        let f = std::fs::File::open(path).map_err(io(format!("opening {}", path.display())))?;
        // SAFETY: advice on an open descriptor; no memory is touched.
        let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        if rc != 0 {
            return Err(BenchError::Setup(format!(
                "posix_fadvise on {}: error {rc}",
                path.display()
            )));
        }
    }
    Ok(())
}

/// Runs one load in a child process.
fn load_in_child(model: &Path, dtype: DType, loras: &[String]) -> Result<LoadRun> {
    let exe = std::env::current_exe().map_err(io("finding the tessera binary"))?;
    let dtype = dtype.as_str();
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["bench", "load", "--child", "--dtype", dtype, "--model"])
        .arg(model);
    for l in loras {
        cmd.args(["--lora", l]);
    }
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(io("starting a load"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().find_map(|l| l.strip_prefix(CHILD_TAG));
    match (out.status.success(), line) {
        (true, Some(json)) => serde_json::from_str(json)
            .map_err(|e| BenchError::Setup(format!("the load's report: {e}"))),
        _ => Err(BenchError::Setup(format!(
            "loading {} failed ({})",
            model.display(),
            out.status
        ))),
    }
}

/// Refuses a load whose weights alone would not fit in the memory available now (a
/// thrashing box measures nothing).
fn check_fits(model: &Path, dtype: DType) -> Result<()> {
    let info = tessera_worker::model::arch::arch_info(model, 0)
        .map_err(|e| BenchError::Setup(format!("{}: {e}", model.display())))?;
    let need = info.parameters * dtype.size_in_bytes() as u64;
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let available = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(u64::MAX, |kib| kib * 1024);
    if need + (1 << 30) > available {
        return Err(BenchError::Setup(format!(
            "{}: {} parameters in {dtype:?} need {} and {} is available: pass --dtype f16 or \
             free memory",
            model.display(),
            info.parameters,
            mib(need),
            mib(available)
        )));
    }
    Ok(())
}

/// Every model's loads: cold ones first (each after an eviction), then warm ones, then warm
/// ones with the LoRAs. The models take turns within each round, so a change in the shared
/// machine's load falls on all of them alike.
pub fn measure(opts: &LoadOptions) -> Result<Vec<ModelLoads>> {
    let mut out = Vec::new();
    for model in &opts.models {
        check_fits(model, opts.dtype)?;
        let bytes = weight_files(model)
            .iter()
            .filter_map(|f| std::fs::metadata(f).ok())
            .map(|m| m.len())
            .sum();
        out.push(ModelLoads {
            model: model.clone(),
            bytes,
            warm: Vec::new(),
            cold: Vec::new(),
            lora: Vec::new(),
        });
    }
    let n = opts.repeats;
    for i in 0..if opts.cold { n } else { 0 } {
        for m in &mut out {
            evict(&weight_files(&m.model))?;
            eprintln!("{}: cold load {}/{n}", m.model.display(), i + 1);
            m.cold.push(load_in_child(&m.model, opts.dtype, &[])?);
        }
    }
    for m in out.iter().filter(|_| !opts.cold) {
        eprintln!("{}: warming the page cache", m.model.display());
        load_in_child(&m.model, opts.dtype, &[])?;
    }
    for i in 0..n {
        for m in &mut out {
            eprintln!("{}: warm load {}/{n}", m.model.display(), i + 1);
            m.warm.push(load_in_child(&m.model, opts.dtype, &[])?);
        }
    }
    for i in 0..if opts.loras.is_empty() { 0 } else { n } {
        for m in &mut out {
            eprintln!("{}: warm load with LoRAs {}/{n}", m.model.display(), i + 1);
            m.lora
                .push(load_in_child(&m.model, opts.dtype, &opts.loras)?);
        }
    }
    Ok(out)
}

fn median(runs: &[LoadRun], f: impl Fn(&LoadRun) -> f64) -> f64 {
    let mut v: Vec<f64> = runs.iter().map(f).collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn gib(bytes: f64) -> String {
    format!("{:.2} GiB", bytes / (1u64 << 30) as f64)
}

/// The table: one row per model and cache state, medians of the runs.
pub fn table(loads: &[ModelLoads]) -> Table {
    let mut t = Table::new(&[
        "model",
        "layout",
        "files",
        "cache",
        "load s (median)",
        "min–max s",
        "peak RSS (VmHWM)",
        "at peak: anon + file",
        "ready: anon + file",
    ]);
    for m in loads {
        let layout = if is_single_file(&m.model) {
            "single file"
        } else {
            "diffusers dir"
        };
        for (cache, runs) in [
            ("cold", &m.cold),
            ("warm", &m.warm),
            ("warm, LoRAs merged", &m.lora),
        ] {
            if runs.is_empty() {
                continue;
            }
            let secs: Vec<f64> = runs.iter().map(|r| r.seconds).collect();
            let min = secs.iter().copied().fold(f64::INFINITY, f64::min);
            let max = secs.iter().copied().fold(0.0, f64::max);
            let split = |a: fn(&LoadRun) -> u64, b: fn(&LoadRun) -> u64| {
                format!(
                    "{} + {}",
                    gib(median(runs, |r| a(r) as f64)),
                    gib(median(runs, |r| b(r) as f64))
                )
            };
            t.row(vec![
                m.model.display().to_string(),
                layout.into(),
                gib(m.bytes as f64),
                cache.into(),
                format!("{:.1}", median(runs, |r| r.seconds)),
                format!("{min:.1}–{max:.1}"),
                gib(median(runs, |r| r.hwm as f64)),
                split(|r| r.peak_anon, |r| r.peak_file),
                split(|r| r.after_anon, |r| r.after_file),
            ]);
        }
    }
    t
}

/// Measures and reports, with the ratios of every model to the first.
pub fn run(opts: &LoadOptions, command: String) -> Result<(Vec<ModelLoads>, Report)> {
    let machine = Machine::probe();
    let loads = measure(opts)?;
    let mut notes = vec![format!(
        "Each load is a fresh `tessera` process: `DiffusionModel::load` on the CPU in {:?} \
         (UNet, VAE — f32 where its config forces an upcast —, text encoders, tokenizers, \
         scheduler), from the call to a model ready to denoise; median of {} runs. Memory is \
         sampled every 10 ms; \"file\" is the memory-mapped safetensors pages (clean page \
         cache, dropped by the kernel under pressure), \"anon\" the weights built.",
        opts.dtype, opts.repeats
    )];
    if let Some(base) = loads.first() {
        for m in &loads[1..] {
            for (cache, a, b) in [("warm", &m.warm, &base.warm), ("cold", &m.cold, &base.cold)] {
                if a.is_empty() || b.is_empty() {
                    continue;
                }
                notes.push(format!(
                    "{} against {} ({cache}): load time ×{:.2}, peak RSS ×{:.2}, resident \
                     once ready ×{:.2}",
                    m.model.display(),
                    base.model.display(),
                    median(a, |r| r.seconds) / median(b, |r| r.seconds),
                    median(a, |r| r.hwm as f64) / median(b, |r| r.hwm as f64),
                    median(a, |r| (r.after_anon + r.after_file) as f64)
                        / median(b, |r| (r.after_anon + r.after_file) as f64),
                ));
            }
        }
    }
    for m in &loads {
        if !m.lora.is_empty() && !m.warm.is_empty() {
            notes.push(format!(
                "{}: merging {} costs {:.1} s over the warm load (medians)",
                m.model.display(),
                opts.loras.join(", "),
                median(&m.lora, |r| r.seconds) - median(&m.warm, |r| r.seconds)
            ));
        }
    }
    if opts.cold {
        notes.push(
            "Cold: the model's files evicted from the page cache (posix_fadvise DONTNEED) \
             before each run."
                .into(),
        );
    }
    let report = Report {
        title: "Model load time and peak memory (CPU)".into(),
        command,
        machine,
        tables: vec![table(&loads)],
        notes,
    };
    Ok((loads, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_the_status_fields_are_read() {
        let run = |s| LoadRun {
            seconds: s,
            ..Default::default()
        };
        assert_eq!(median(&[run(3.0), run(1.0), run(2.0)], |r| r.seconds), 2.0);
        assert_eq!(median(&[run(4.0), run(1.0)], |r| r.seconds), 2.5);
        let s = Status::read().expect("/proc/self/status");
        assert!(s.anon > 0 && s.hwm >= s.anon);
    }
}
