//! The coordinator's Prometheus metrics: one registry for the process ([`coordinator`]),
//! counted where the work happens — the runner (jobs, steps, evaluations, step timings), the
//! store calls of the engine ([`MeteredStore`]), the worker pool (task queue, leases, copies,
//! each worker's tasks, evaluations and busy seconds) and the notifications — and served at
//! `GET /metrics` by [`router`] (on `--metrics`, and on the dashboard's `--http`).
//!
//! Every update is an atomic add or set on a metric that already exists, so counting costs
//! nothing next to a step; per-worker series are dropped when their worker leaves.

mod store;

pub use store::MeteredStore;

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tessera_worker::metrics::{encode, seconds_buckets};

pub use tessera_worker::metrics::CONTENT_TYPE;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabel {
    pub worker: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    /// `read`, `write` or `delete`.
    pub op: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

type FloatCounter = Counter<f64, AtomicU64>;

/// Everything the coordinator counts. Fields are cheap handles (atomics behind an `Arc`).
pub struct CoordinatorMetrics {
    registry: Registry,
    /// Jobs queued and running now (`state` = `queued`, `running`).
    pub jobs: Family<StateLabel, Gauge>,
    /// Jobs that ended, by `state` (`succeeded`, `failed`, `cancelled`).
    pub jobs_finished: Family<StateLabel, Counter>,
    pub jobs_submitted: Counter,
    /// Tasks waiting in the pool's queue, and out on workers.
    pub tasks_queued: Gauge,
    pub tasks_running: Gauge,
    pub workers: Gauge,
    pub steps: Counter,
    pub evaluations: Counter,
    pub step_seconds: Histogram,
    pub critical_path_seconds: Histogram,
    pub store_seconds: Family<OpLabel, Histogram>,
    pub store_read_bytes: Counter,
    pub store_written_bytes: Counter,
    pub tasks_completed: Counter,
    pub task_attempts_failed: Counter,
    pub leases_expired: Counter,
    pub copies_issued: Counter,
    pub worker_tasks: Family<WorkerLabel, Counter>,
    pub worker_evaluations: Family<WorkerLabel, Counter>,
    pub worker_busy_seconds: Family<WorkerLabel, FloatCounter>,
    pub notifications: Family<OutcomeLabel, Counter>,
}

/// The process's metrics, made on first use.
pub fn coordinator() -> &'static CoordinatorMetrics {
    static METRICS: OnceLock<CoordinatorMetrics> = OnceLock::new();
    METRICS.get_or_init(CoordinatorMetrics::new)
}

fn histograms() -> Histogram {
    seconds_buckets()
}

impl CoordinatorMetrics {
    fn new() -> Self {
        let mut r = Registry::default();
        let m = Self {
            jobs: Family::default(),
            jobs_finished: Family::default(),
            jobs_submitted: Counter::default(),
            tasks_queued: Gauge::default(),
            tasks_running: Gauge::default(),
            workers: Gauge::default(),
            steps: Counter::default(),
            evaluations: Counter::default(),
            step_seconds: seconds_buckets(),
            critical_path_seconds: seconds_buckets(),
            store_seconds: Family::new_with_constructor(histograms),
            store_read_bytes: Counter::default(),
            store_written_bytes: Counter::default(),
            tasks_completed: Counter::default(),
            task_attempts_failed: Counter::default(),
            leases_expired: Counter::default(),
            copies_issued: Counter::default(),
            worker_tasks: Family::default(),
            worker_evaluations: Family::default(),
            worker_busy_seconds: Family::default(),
            notifications: Family::default(),
            registry: Registry::default(),
        };
        m.register_jobs(&mut r);
        m.register_work(&mut r);
        m.register_pool(&mut r);
        m.zero_known_labels();
        Self { registry: r, ..m }
    }

    /// Every label value known up front gets its series at zero, so a query or an alert sees
    /// 0 rather than nothing before the first event (Prometheus' advice for labelled metrics).
    fn zero_known_labels(&self) {
        self.set_jobs(0, 0);
        for state in ["succeeded", "failed", "cancelled"] {
            let label = StateLabel {
                state: state.into(),
            };
            let _ = self.jobs_finished.get_or_create(&label);
        }
        for outcome in ["delivered", "failed"] {
            let label = OutcomeLabel {
                outcome: outcome.into(),
            };
            let _ = self.notifications.get_or_create(&label);
        }
        for op in ["read", "write", "delete"] {
            let _ = self.store_seconds.get_or_create(&OpLabel { op: op.into() });
        }
    }

    fn register_jobs(&self, r: &mut Registry) {
        r.register(
            "tessera_jobs",
            "Jobs queued and running now, by state",
            self.jobs.clone(),
        );
        r.register(
            "tessera_jobs_finished",
            "Jobs that ended, by state (succeeded, failed, cancelled)",
            self.jobs_finished.clone(),
        );
        r.register(
            "tessera_jobs_submitted",
            "Jobs admitted into the queue",
            self.jobs_submitted.clone(),
        );
        r.register(
            "tessera_notifications",
            "Job notifications sent, by outcome (delivered, failed)",
            self.notifications.clone(),
        );
    }

    fn register_work(&self, r: &mut Registry) {
        r.register(
            "tessera_steps",
            "Denoising steps completed",
            self.steps.clone(),
        );
        r.register(
            "tessera_evaluations",
            "Model evaluations completed (views, twice with guidance)",
            self.evaluations.clone(),
        );
        r.register(
            "tessera_step_duration_seconds",
            "Wall-clock seconds of each denoising step",
            self.step_seconds.clone(),
        );
        r.register(
            "tessera_step_critical_path_seconds",
            "Seconds of each step during which no task of it was out (coordinator's critical path)",
            self.critical_path_seconds.clone(),
        );
        r.register(
            "tessera_store_operation_duration_seconds",
            "Seconds of the engine's store calls, by op (read, write, delete)",
            self.store_seconds.clone(),
        );
        r.register(
            "tessera_store_read_bytes",
            "Bytes the engine read from the store",
            self.store_read_bytes.clone(),
        );
        r.register(
            "tessera_store_written_bytes",
            "Bytes the engine wrote to the store",
            self.store_written_bytes.clone(),
        );
    }

    fn register_pool(&self, r: &mut Registry) {
        let gauges = [
            (
                "tessera_tasks_queued",
                "Tasks waiting for a worker",
                &self.tasks_queued,
            ),
            (
                "tessera_tasks_running",
                "Tasks out on workers",
                &self.tasks_running,
            ),
            ("tessera_workers", "Workers joined", &self.workers),
        ];
        for (name, help, g) in gauges {
            r.register(name, help, g.clone());
        }
        let counters = [
            (
                "tessera_tasks_completed",
                "Tasks whose results are in",
                &self.tasks_completed,
            ),
            (
                "tessera_task_attempts_failed",
                "Task attempts lost (failed call, lost worker, expired lease, failed task)",
                &self.task_attempts_failed,
            ),
            (
                "tessera_task_leases_expired",
                "Tasks whose call outlived its lease",
                &self.leases_expired,
            ),
            (
                "tessera_task_copies",
                "Copies of slow tasks issued to idle workers",
                &self.copies_issued,
            ),
        ];
        for (name, help, c) in counters {
            r.register(name, help, c.clone());
        }
        r.register(
            "tessera_pool_worker_tasks",
            "Tasks each worker completed",
            self.worker_tasks.clone(),
        );
        r.register(
            "tessera_pool_worker_evaluations",
            "Model evaluations each worker completed; its rate is the worker's evaluations per second",
            self.worker_evaluations.clone(),
        );
        r.register(
            "tessera_pool_worker_busy_seconds",
            "Seconds each worker reported computing; its rate is the worker's busy fraction",
            self.worker_busy_seconds.clone(),
        );
    }

    /// The exposition text.
    pub fn encode(&self) -> String {
        encode(&self.registry)
    }

    /// Sets the jobs gauges: queued (the queue's depth) and running.
    pub fn set_jobs(&self, queued: usize, running: usize) {
        let set = |state: &str, n: usize| {
            let label = StateLabel {
                state: state.into(),
            };
            self.jobs
                .get_or_create(&label)
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        };
        set("queued", queued);
        set("running", running);
    }

    /// A job ended in `state` (`succeeded`, `failed`, `cancelled`).
    pub fn job_finished(&self, state: &str) {
        let label = StateLabel {
            state: state.into(),
        };
        self.jobs_finished.get_or_create(&label).inc();
    }

    /// A task `worker` completed: its model evaluations and device seconds.
    pub fn worker_task(&self, worker: &str, evaluations: u64, seconds: f64) {
        let label = WorkerLabel {
            worker: worker.into(),
        };
        self.worker_tasks.get_or_create(&label).inc();
        self.worker_evaluations
            .get_or_create(&label)
            .inc_by(evaluations);
        if seconds.is_finite() && seconds > 0.0 {
            self.worker_busy_seconds
                .get_or_create(&label)
                .inc_by(seconds);
        }
    }

    /// `worker` left: its series go (Prometheus reads a series that stops as ended).
    pub fn worker_left(&self, worker: &str) {
        let label = WorkerLabel {
            worker: worker.into(),
        };
        self.worker_tasks.remove(&label);
        self.worker_evaluations.remove(&label);
        self.worker_busy_seconds.remove(&label);
    }

    pub fn notification(&self, outcome: &str) {
        let label = OutcomeLabel {
            outcome: outcome.into(),
        };
        self.notifications.get_or_create(&label).inc();
    }
}

/// `GET /metrics` over this process's metrics, behind `token` (the coordinator's client
/// `--token`) when one is set. The dashboard's listener merges this router into its own.
pub fn router(token: Option<&str>) -> axum::Router {
    let exposition: tessera_worker::metrics::Exposition = Arc::new(|| coordinator().encode());
    tessera_worker::metrics::router(exposition, token)
}

/// The names of every metric family the coordinator and a worker export, as they appear in
/// the exposition (counters with `_total`, histograms with `_bucket`, `_sum`, `_count`): what
/// a dashboard or an alert may refer to.
pub fn exported_names() -> std::collections::BTreeSet<String> {
    // Fresh registries with one series in every family (an empty family is not shown).
    let worker = tessera_worker::metrics::WorkerMetrics::new(&candle_core::Device::Cpu);
    worker.task("denoise", "ok", 1.0, 1);
    let coordinator = CoordinatorMetrics::new();
    coordinator.worker_task("w", 1, 1.0);
    let mut names = std::collections::BTreeSet::new();
    for text in [coordinator.encode(), worker.encode()] {
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut words = rest.split_whitespace();
                if let (Some(name), Some(kind)) = (words.next(), words.next()) {
                    names.extend(series_names(name, kind));
                }
            }
        }
    }
    // The GPU gauge exists only on a CUDA worker; a dashboard may still show it.
    names.insert("tessera_worker_gpu_memory_used_bytes".into());
    names
}

/// The sample names a family of `kind` shows.
fn series_names(name: &str, kind: &str) -> Vec<String> {
    match kind {
        "counter" => vec![format!("{name}_total")],
        "histogram" => ["_bucket", "_sum", "_count", "_created"]
            .iter()
            .map(|s| format!("{name}{s}"))
            .collect(),
        _ => vec![name.to_string()],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_is_exported_under_its_conventional_name() {
        let names = exported_names();
        for name in [
            "tessera_jobs",
            "tessera_jobs_finished_total",
            "tessera_steps_total",
            "tessera_evaluations_total",
            "tessera_step_duration_seconds_bucket",
            "tessera_step_critical_path_seconds_sum",
            "tessera_store_operation_duration_seconds_count",
            "tessera_store_read_bytes_total",
            "tessera_store_written_bytes_total",
            "tessera_task_leases_expired_total",
            "tessera_task_copies_total",
            "tessera_pool_worker_evaluations_total",
            "tessera_pool_worker_busy_seconds_total",
            "tessera_worker_evaluations_total",
            "tessera_worker_busy_seconds_total",
        ] {
            assert!(names.contains(name), "{name} missing from {names:?}");
        }
    }

    #[test]
    fn a_worker_that_leaves_takes_its_series_with_it() {
        let m = CoordinatorMetrics::new();
        m.worker_task("w-left", 16, 0.5);
        assert!(m.encode().contains(r#"worker="w-left""#));
        m.worker_left("w-left");
        assert!(!m.encode().contains(r#"worker="w-left""#));
    }
}
