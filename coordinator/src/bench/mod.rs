//! `tessera bench`: measurements of Tessera's own costs, each printing a table and a markdown
//! block ready for BENCHMARKS.md (the command, the machine, the figures, ratios from the same
//! run). Scenarios that need a cluster start real processes on loopback: a `redis-server`, a
//! `tessera coordinator` and `tessera worker`s, the workers usually as benchmark doubles
//! (`--simulate-eval-ms`, see `tessera_worker::simulate`).

pub mod browser;
pub mod cluster;
pub mod dashboard;
pub mod e2e;
pub mod idle;
pub mod kernels;
pub mod load;
pub mod memory;
pub mod netns;
pub mod scale;
pub mod step;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Setup(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    #[error(transparent)]
    Cluster(#[from] tessera_harness::HarnessError),
}

pub type Result<T> = std::result::Result<T, BenchError>;

pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
    let what = what.into();
    move |source| BenchError::Io { what, source }
}

/// SDXL's training latent side: 1024 pixels / 8.
pub const SDXL_LATENT: usize = 128;

/// The machine a figure was measured on.
#[derive(Debug, Clone)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub ram_gib: f64,
    /// 1-minute load average when the run began (the box may be shared).
    pub load: f64,
}

impl Machine {
    pub fn probe() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown CPU".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let ram_kib: f64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        let load = std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
            .unwrap_or(f64::NAN);
        Self {
            cpu,
            cores: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            ram_gib: ram_kib / (1024.0 * 1024.0),
            load,
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "{}, {} cores, {:.0} GiB RAM (load average {:.1} at start)",
            self.cpu, self.cores, self.ram_gib, self.load
        )
    }
}

/// A table of figures: printed aligned, and as markdown.
#[derive(Debug, Clone, Default)]
pub struct Table {
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Self {
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn text(&self) -> String {
        let widths: Vec<usize> = (0..self.header.len())
            .map(|i| {
                self.rows
                    .iter()
                    .map(|r| r.get(i).map_or(0, |c| c.chars().count()))
                    .chain([self.header[i].chars().count()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |cells: &[String]| {
            cells
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:>w$}"))
                .collect::<Vec<_>>()
                .join("  ")
        };
        let mut out = line(&self.header);
        for r in &self.rows {
            out.push('\n');
            out.push_str(&line(r));
        }
        out
    }

    pub fn markdown(&self) -> String {
        let mut out = format!("| {} |\n", self.header.join(" | "));
        let _ = writeln!(out, "|{}", "---|".repeat(self.header.len()));
        for r in &self.rows {
            let _ = writeln!(out, "| {} |", r.join(" | "));
        }
        out
    }
}

/// What a scenario measured: a title, the command that reproduces it, tables and notes.
#[derive(Debug, Clone)]
pub struct Report {
    pub title: String,
    pub command: String,
    pub machine: Machine,
    pub tables: Vec<Table>,
    pub notes: Vec<String>,
}

impl Report {
    pub fn text(&self) -> String {
        let mut out = format!("{}\nmachine: {}\n", self.title, self.machine.describe());
        for t in &self.tables {
            out.push('\n');
            out.push_str(&t.text());
            out.push('\n');
        }
        for n in &self.notes {
            let _ = writeln!(out, "- {n}");
        }
        out
    }

    pub fn markdown(&self) -> String {
        let mut out = format!(
            "### {}\n\nCommand: `{}`  \nMachine: {}  \nVersion: tessera {}\n\n",
            self.title,
            self.command,
            self.machine.describe(),
            env!("CARGO_PKG_VERSION")
        );
        for t in &self.tables {
            out.push_str(&t.markdown());
            out.push('\n');
        }
        for n in &self.notes {
            let _ = writeln!(out, "- {n}");
        }
        out
    }

    /// Prints the table and the markdown block; appends the block to `file` when given.
    pub fn emit(&self, file: Option<&Path>) -> Result<()> {
        println!("{}", self.text());
        println!("--- markdown (for BENCHMARKS.md) ---\n{}", self.markdown());
        if let Some(path) = file {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(io(format!("opening {}", path.display())))?;
            writeln!(f, "\n{}", self.markdown())
                .map_err(io(format!("writing {}", path.display())))?;
            eprintln!("appended to {}", path.display());
        }
        Ok(())
    }
}

/// The command line that started this process, for the report.
pub fn invocation() -> String {
    let args: Vec<String> = std::env::args().skip(1).collect();
    format!("tessera {}", args.join(" "))
}

/// A tiny random SDXL-architecture model with SDXL's geometry: the synthesized weights (which do
/// not depend on the sample size) with configs saying training size 1024² (latent 128²), so
/// plans, tiles and views have their real SDXL sizes. Written once into `dir`.
pub fn sdxl_geometry_model(dir: &Path) -> Result<PathBuf> {
    tiny_model_at(dir, SDXL_LATENT as u32 * 8)
}

/// The tiny SDXL-architecture model with its configs set for a training size of `training`
/// pixels (its UNet's and VAE's `sample_size`), under `dir`: `sdxl-geometry` for 1024,
/// `tiny-N` otherwise.
pub fn tiny_model_at(dir: &Path, training: u32) -> Result<PathBuf> {
    let name = if training == SDXL_LATENT as u32 * 8 {
        "sdxl-geometry".to_string()
    } else {
        format!("tiny-{training}")
    };
    let model = dir.join(name);
    if model.join("model_index.json").is_file() {
        return Ok(model);
    }
    let _ = std::fs::remove_dir_all(&model);
    tessera_worker::random_models::tiny::synthesize(
        tessera_worker::random_models::tiny::TinyArch::SdxlTiny,
        &model,
        1,
    )
    .map_err(|e| BenchError::Setup(format!("synthesizing the model: {e}")))?;
    for (component, size) in [("unet", training / 8), ("vae", training)] {
        let path = model.join(component).join("config.json");
        let text =
            std::fs::read_to_string(&path).map_err(io(format!("reading {}", path.display())))?;
        let mut cfg: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| BenchError::Setup(format!("{}: {e}", path.display())))?;
        cfg["sample_size"] = serde_json::json!(size);
        let text = serde_json::to_string_pretty(&cfg)
            .map_err(|e| BenchError::Setup(format!("{}: {e}", path.display())))?;
        std::fs::write(&path, text).map_err(io(format!("writing {}", path.display())))?;
    }
    Ok(model)
}

/// A scratch directory for a run, removed when dropped.
pub use tessera_harness::Scratch;

/// CPU seconds (user + system, all threads) process `pid` has used, from `/proc/PID/stat`.
pub fn cpu_seconds_of(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): state is the first, utime the
    // 12th and stime the 13th.
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (per_second > 0).then(|| ticks / per_second as f64)
}

/// Peak resident memory (VmHWM) and current (VmRSS) of a process, in bytes.
pub fn memory_of(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .map(|kib| kib * 1024)
    };
    Some((field("VmHWM:")?, field("VmRSS:")?))
}

pub fn mib(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / (1024.0 * 1024.0))
}
