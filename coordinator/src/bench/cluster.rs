//! The benchmarks' side of a loopback cluster (the harness the tests use,
//! [`tessera_harness::LocalCluster`]): starting it from this binary, and reading the steps the
//! coordinator logged.

use std::path::Path;
use std::time::Duration;

use tessera_harness::{ClusterOptions, LocalCluster};

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

/// A loopback cluster for a benchmark (see [`tessera_harness::LocalCluster`]): Redis and a
/// coordinator with `coordinator_flags`, started from this very binary, logging into `dir`.
pub fn start(dir: &Path, coordinator_flags: &[String]) -> Result<LocalCluster> {
    start_on(dir, coordinator_flags, 0)
}

/// [`start`] on a Redis Cluster of `shards` shards (0: one Redis).
pub fn start_on(dir: &Path, coordinator_flags: &[String], shards: usize) -> Result<LocalCluster> {
    let bin = std::env::current_exe().map_err(io("finding the tessera binary"))?;
    let opts = ClusterOptions {
        coordinator_flags: coordinator_flags.to_vec(),
        redis_shards: shards,
        ..Default::default()
    };
    Ok(LocalCluster::start(&bin, dir, opts)?)
}

/// Starts `n` workers serving `model`; `simulate_ms` makes them benchmark doubles.
pub fn add_workers(
    cluster: &mut LocalCluster,
    model: &Path,
    n: usize,
    simulate_ms: Option<f64>,
) -> Result<()> {
    let extra = match simulate_ms {
        Some(ms) => vec!["--simulate-eval-ms".to_string(), ms.to_string()],
        None => Vec::new(),
    };
    for _ in 0..n {
        cluster.add_worker(model, &extra)?;
    }
    Ok(cluster.wait_workers(cluster.workers.len())?)
}

/// Submits a job with `args`; its id.
pub fn submit(cluster: &LocalCluster, args: &[String]) -> Result<String> {
    let mut all = vec!["submit"];
    all.extend(args.iter().map(String::as_str));
    Ok(cluster.client_ok(&all)?)
}

/// Waits until `job` finished (the client's `watch` exits 0).
pub fn watch(cluster: &LocalCluster, job: &str) -> Result<()> {
    cluster.client_ok(&["watch", job]).map(|_| ())?;
    Ok(())
}

/// Waits until `job` has logged `count` steps of `stage`; their lines.
pub fn wait_steps(
    cluster: &mut LocalCluster,
    job: &str,
    stage: usize,
    count: usize,
    limit: Duration,
) -> Result<Vec<StepLine>> {
    let of_stage = |log: &str| -> Vec<StepLine> {
        parse_steps(log, job)
            .into_iter()
            .filter(|s| s.stage == stage)
            .collect()
    };
    cluster.wait_for(&format!("{count} steps of job {job}"), limit, |c| {
        let log = c.coordinator_log();
        log.contains(&format!("job {job} failed")) || of_stage(&log).len() >= count
    })?;
    let lines = of_stage(&cluster.coordinator_log());
    if lines.len() < count {
        return Err(BenchError::Setup(format!(
            "job {job} stopped after {} steps:\n{}",
            lines.len(),
            cluster.coordinator_log()
        )));
    }
    Ok(lines)
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
