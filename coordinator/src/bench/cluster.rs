//! A whole cluster on loopback for the benchmarks: a real `redis-server` on a free port (the
//! same harness the tests use), a `tessera coordinator` process and `tessera worker`
//! processes. Everything is killed when the cluster is dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tessera_harness::RedisServer;

use super::{io, BenchError, Result};

/// A finished step as the coordinator logged it.
#[derive(Debug, Clone, PartialEq)]
pub struct StepLine {
    pub stage: usize,
    pub step: usize,
    pub steps: usize,
    /// Wall clock (ms since the epoch) when the step finished.
    pub at_ms: f64,
    /// The coordinator's own milliseconds of work in the step, overlapped or not.
    pub coordinator_ms: f64,
    /// The step's critical path (`StepTimings::critical`).
    pub critical_ms: f64,
    pub workers_ms: f64,
}

/// Parses the coordinator's `step finished` log lines of `job`.
pub fn parse_steps(log: &str, job: &str) -> Vec<StepLine> {
    let want = format!("job={job}");
    log.lines()
        .filter(|l| l.contains("step finished") && l.split_whitespace().any(|t| t == want))
        .filter_map(|l| {
            let get = |name: &str| -> Option<f64> {
                l.split_whitespace()
                    .find_map(|t| t.strip_prefix(name)?.strip_prefix('='))
                    .and_then(|v| v.parse().ok())
            };
            Some(StepLine {
                stage: get("stage")? as usize,
                step: get("step")? as usize,
                steps: get("steps")? as usize,
                at_ms: get("at_ms")?,
                coordinator_ms: get("coordinator_ms")?,
                critical_ms: get("critical_ms")?,
                workers_ms: get("workers_ms")?,
            })
        })
        .collect()
}

pub struct LocalCluster {
    pub dir: PathBuf,
    redis: RedisServer,
    pub url: String,
    coordinator: Child,
    coordinator_log: PathBuf,
    pub workers: Vec<Child>,
}

fn tessera_bin() -> Result<PathBuf> {
    std::env::current_exe().map_err(io("finding the tessera binary"))
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(io("finding a free port"))?;
    Ok(l.local_addr().map_err(io("finding a free port"))?.port())
}

fn spawn(args: &[String], log: &Path) -> Result<Child> {
    let file = std::fs::File::create(log).map_err(io(format!("creating {}", log.display())))?;
    let err = file.try_clone().map_err(io("log file"))?;
    Command::new(tessera_bin()?)
        .args(args)
        .env("TESSERA_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(file)
        .stderr(err)
        .stdin(Stdio::null())
        .spawn()
        .map_err(io(format!("starting tessera {}", args.join(" "))))
}

impl LocalCluster {
    /// Redis and a coordinator, no workers yet.
    pub fn start(dir: &Path) -> Result<Self> {
        Self::start_with(dir, &[])
    }

    /// [`LocalCluster::start`] with more `tessera coordinator` flags.
    pub fn start_with(dir: &Path, coordinator_flags: &[String]) -> Result<Self> {
        let redis = RedisServer::start();
        let port = free_port()?;
        let url = format!("http://127.0.0.1:{port}");
        let coordinator_log = dir.join("coordinator.log");
        let mut args = vec![
            "coordinator".into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--redis".into(),
            redis.url(),
        ];
        args.extend_from_slice(coordinator_flags);
        let coordinator = spawn(&args, &coordinator_log)?;
        let cluster = Self {
            dir: dir.to_path_buf(),
            redis,
            url,
            coordinator,
            coordinator_log,
            workers: Vec::new(),
        };
        cluster.wait_for("the coordinator to serve", Duration::from_secs(30), |c| {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() && c.coordinator_alive()
        })?;
        Ok(cluster)
    }

    pub fn coordinator_pid(&self) -> u32 {
        self.coordinator.id()
    }

    fn coordinator_alive(&self) -> bool {
        // try_wait needs &mut; /proc tells whether it still runs.
        Path::new(&format!("/proc/{}", self.coordinator.id())).exists()
    }

    pub fn coordinator_log(&self) -> String {
        std::fs::read_to_string(&self.coordinator_log).unwrap_or_default()
    }

    /// Starts `n` workers serving `model`; `simulate_ms` makes them benchmark doubles.
    pub fn add_workers(&mut self, model: &Path, n: usize, simulate_ms: Option<f64>) -> Result<()> {
        for _ in 0..n {
            let i = self.workers.len();
            let mut args = vec![
                "worker".into(),
                "--coordinator".into(),
                self.url.clone(),
                "--redis".into(),
                self.redis.url(),
                "--model".into(),
                model.display().to_string(),
            ];
            if let Some(ms) = simulate_ms {
                args.extend(["--simulate-eval-ms".into(), ms.to_string()]);
            }
            let log = self.dir.join(format!("worker-{i}.log"));
            self.workers.push(spawn(&args, &log)?);
        }
        Ok(())
    }

    /// Waits until the coordinator has seen every started worker join.
    pub fn wait_workers(&self) -> Result<()> {
        let n = self.workers.len();
        self.wait_for(
            &format!("{n} workers to join"),
            Duration::from_secs(60 + 2 * n as u64),
            |c| c.coordinator_log().matches(" joined (").count() >= n,
        )
    }

    fn wait_for(&self, what: &str, limit: Duration, ok: impl Fn(&Self) -> bool) -> Result<()> {
        let start = Instant::now();
        while !ok(self) {
            if !self.coordinator_alive() {
                return Err(BenchError::Setup(format!(
                    "the coordinator exited while waiting for {what}; its log:\n{}",
                    self.coordinator_log()
                )));
            }
            if start.elapsed() > limit {
                return Err(BenchError::Setup(format!(
                    "gave up waiting for {what} after {limit:?}; see {}",
                    self.coordinator_log.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Runs a `tessera` client command against this cluster; its stdout.
    pub fn client(&self, command: &str, args: &[String]) -> Result<String> {
        let out = Command::new(tessera_bin()?)
            .arg(command)
            .args(["--coordinator", &self.url])
            .args(args)
            .env("NO_COLOR", "1")
            .output()
            .map_err(io(format!("running tessera {command}")))?;
        if !out.status.success() {
            return Err(BenchError::Setup(format!(
                "tessera {command} {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Submits a job; its id.
    pub fn submit(&self, args: &[String]) -> Result<String> {
        self.client("submit", args)
    }

    /// Waits until `job` has logged `count` steps of `stage`; their lines.
    pub fn wait_steps(
        &self,
        job: &str,
        stage: usize,
        count: usize,
        limit: Duration,
    ) -> Result<Vec<StepLine>> {
        let mut lines = Vec::new();
        self.wait_for(&format!("{count} steps of job {job}"), limit, |c| {
            let log = c.coordinator_log();
            if log.contains(&format!("job {job} failed")) {
                return true;
            }
            parse_steps(&log, job)
                .iter()
                .filter(|s| s.stage == stage)
                .count()
                >= count
        })?;
        let log = self.coordinator_log();
        lines.extend(
            parse_steps(&log, job)
                .into_iter()
                .filter(|s| s.stage == stage),
        );
        if lines.len() < count {
            return Err(BenchError::Setup(format!(
                "job {job} stopped after {} steps; see {}",
                lines.len(),
                self.coordinator_log.display()
            )));
        }
        Ok(lines)
    }

    /// Waits until `job` finished (the client's `watch` exits).
    pub fn watch(&self, job: &str) -> Result<()> {
        self.client("watch", &[job.to_string()]).map(|_| ())
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for w in &mut self.workers {
            let _ = w.kill();
            let _ = w.wait();
        }
        let _ = self.coordinator.kill();
        let _ = self.coordinator.wait();
        self.redis.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_lines_are_parsed_for_their_job_only() {
        let log = "2026-01-01T00:00:00Z  INFO tessera_coordinator::cluster::runner: step finished \
                   job=abc image=0 stage=1 step=2 steps=4 at_ms=1700000000123 \
                   coordinator_ms=12.5 critical_ms=4.5 workers_ms=3000.25\n\
                   x INFO r: step finished job=other image=0 stage=1 step=2 steps=4 at_ms=1 \
                   coordinator_ms=1 critical_ms=1 workers_ms=1\n";
        let steps = parse_steps(log, "abc");
        assert_eq!(
            steps,
            vec![StepLine {
                stage: 1,
                step: 2,
                steps: 4,
                at_ms: 1_700_000_000_123.0,
                coordinator_ms: 12.5,
                critical_ms: 4.5,
                workers_ms: 3000.25,
            }]
        );
    }
}
