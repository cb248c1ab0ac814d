//! Prometheus metrics: the worker's own (`tessera worker --metrics HOST:PORT`) and the small
//! HTTP listener both server roles serve `GET /metrics` from (the coordinator mounts its
//! registry on the same [`router`]).
//!
//! Names follow Prometheus' conventions: a `tessera_` prefix, counters ending in `_total`,
//! durations in `_seconds`, sizes in `_bytes`. A busy fraction or a rate is what
//! `rate(…_total[1m])` makes of a counter, so every process only counts.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use candle_core::Device;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tessera_proto::auth::RequireToken;

/// The exposition's media type: prometheus-client writes OpenMetrics text, which Prometheus
/// asks for first.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Seconds buckets from 5 ms to ~5.5 min: a tiny model's step on a CPU to a 4K step on a GPU.
pub fn seconds_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 17))
}

/// A task's kind and how it ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TaskLabels {
    pub kind: String,
    /// `ok`, `failed` or `refused`.
    pub outcome: String,
}

/// What one worker process counts.
pub struct WorkerMetrics {
    registry: Registry,
    tasks: Family<TaskLabels, Counter>,
    evaluations: Counter,
    busy_seconds: Counter<f64, AtomicU64>,
    task_seconds: Histogram,
    gpu_memory: Option<(Device, Gauge)>,
}

impl WorkerMetrics {
    /// The worker's registry. The GPU memory gauge is there only when `device` reports its
    /// memory (CUDA); on the CPU nothing stands in for it.
    pub fn new(device: &Device) -> Self {
        let mut registry = Registry::default();
        let tasks = Family::<TaskLabels, Counter>::default();
        let evaluations = Counter::default();
        let busy_seconds = Counter::<f64, AtomicU64>::default();
        let task_seconds = seconds_buckets();
        registry.register(
            "tessera_worker_tasks",
            "Tasks answered, by kind and outcome",
            tasks.clone(),
        );
        registry.register(
            "tessera_worker_evaluations",
            "Model evaluations run (views, twice with guidance)",
            evaluations.clone(),
        );
        registry.register(
            "tessera_worker_busy_seconds",
            "Seconds the device computed tasks; its rate is the busy fraction",
            busy_seconds.clone(),
        );
        registry.register(
            "tessera_worker_task_duration_seconds",
            "Seconds each task held the device",
            task_seconds.clone(),
        );
        let gpu_memory = crate::gpu::host::used_memory(device).map(|_| {
            let g = Gauge::default();
            registry.register(
                "tessera_worker_gpu_memory_used_bytes",
                "Bytes the device's memory pool has handed out",
                g.clone(),
            );
            (device.clone(), g)
        });
        Self {
            registry,
            tasks,
            evaluations,
            busy_seconds,
            task_seconds,
            gpu_memory,
        }
    }

    /// One task answered: its kind (`denoise`, `decode`, …), outcome, device seconds and
    /// model evaluations.
    pub fn task(&self, kind: &str, outcome: &str, seconds: f64, evaluations: u64) {
        let labels = TaskLabels {
            kind: kind.into(),
            outcome: outcome.into(),
        };
        self.tasks.get_or_create(&labels).inc();
        if seconds.is_finite() && seconds > 0.0 {
            self.busy_seconds.inc_by(seconds);
            self.task_seconds.observe(seconds);
        }
        self.evaluations.inc_by(evaluations);
    }

    /// The exposition, with the GPU memory read now.
    pub fn encode(&self) -> String {
        if let Some((device, gauge)) = &self.gpu_memory {
            if let Some(bytes) = crate::gpu::host::used_memory(device) {
                gauge.set(i64::try_from(bytes).unwrap_or(i64::MAX));
            }
        }
        encode(&self.registry)
    }
}

/// A registry in the text exposition format.
pub fn encode(registry: &Registry) -> String {
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, registry) {
        tracing::warn!("cannot encode the metrics: {e}");
    }
    text
}

/// Makes the exposition text at each scrape.
pub type Exposition = Arc<dyn Fn() -> String + Send + Sync>;

#[derive(Clone)]
struct Scrape {
    exposition: Exposition,
    token: RequireToken,
}

/// `GET /metrics` serving `exposition`; with a token, only to `Authorization: Bearer TOKEN`
/// (Prometheus' `authorization` setting in a scrape config).
pub fn router(exposition: Exposition, token: Option<&str>) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .with_state(Scrape {
            exposition,
            token: RequireToken::new(token),
        })
}

async fn scrape(State(s): State<Scrape>, headers: HeaderMap) -> Response {
    let given = headers.get(header::AUTHORIZATION).map(|v| v.as_bytes());
    if !s.token.accepts(given) {
        let body = "this endpoint needs the coordinator's token: send Authorization: Bearer \
                    TOKEN (Prometheus: authorization.credentials in the scrape config)\n";
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            body,
        )
            .into_response();
    }
    let text = (s.exposition)();
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response()
}

#[derive(Debug, thiserror::Error)]
#[error("{flag} {addr}: cannot listen there: {message}")]
pub struct ListenError {
    pub flag: &'static str,
    pub addr: SocketAddr,
    pub message: String,
}

/// Binds `addr` for `flag` (`--metrics`, `--http`), so a taken port is an error at start.
pub async fn bind(
    flag: &'static str,
    addr: SocketAddr,
) -> Result<tokio::net::TcpListener, ListenError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| ListenError {
            flag,
            addr,
            message: e.to_string(),
        })
}

/// Serves `router` on `listener` until the process ends; a failure is logged, never fatal
/// (metrics are not worth stopping the work for).
pub fn spawn_serve(listener: tokio::net::TcpListener, router: Router) {
    let addr = listener.local_addr().ok();
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!(?addr, "the metrics listener stopped: {e}");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cpu_worker_counts_tasks_and_reports_no_gpu_memory() {
        let m = WorkerMetrics::new(&Device::Cpu);
        m.task("denoise", "ok", 0.25, 8);
        m.task("decode", "failed", 0.0, 0);
        let text = m.encode();
        assert!(
            text.contains("tessera_worker_evaluations_total 8"),
            "{text}"
        );
        assert!(
            text.contains("tessera_worker_busy_seconds_total 0.25"),
            "{text}"
        );
        assert!(
            text.contains(r#"tessera_worker_tasks_total{kind="decode",outcome="failed"} 1"#),
            "{text}"
        );
        assert!(text.contains("tessera_worker_task_duration_seconds_count 1"));
        assert!(!text.contains("gpu_memory"), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }
}
