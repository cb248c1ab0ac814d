//! What the JSON API answers: a job and a worker as the page shows them, computed from the
//! job records, the runner's live snapshots and the worker pool.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Serialize;
use tessera_core::describe;

use crate::cluster::jobs::{now_ms, JobRecord, JobState, ProgressRecord};
use crate::cluster::pool::WorkerSnapshot;

/// How long a lost worker stays listed.
const LOST_KEPT: Duration = Duration::from_secs(3600);

/// One job, a row of the list or the head of its detail.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct JobView {
    pub id: String,
    pub state: String,
    pub priority: i32,
    pub model: String,
    pub prompt: String,
    pub width: u32,
    pub height: u32,
    pub method: String,
    pub seed: u64,
    pub count: u32,
    pub images_done: u32,
    /// Image, stage, step, views done and total, phase: as the record has them.
    #[serde(flatten)]
    pub progress: ProgressRecord,
    /// Seconds left, when known.
    pub eta_s: Option<f64>,
    /// Seconds since it started (to its end, once finished).
    pub elapsed_s: Option<f64>,
    /// Model evaluations per second since it started.
    pub evals_per_s: Option<f64>,
    /// The plan's first line, as `tessera plan` prints it.
    pub summary: String,
    /// Who submitted it, as the client said.
    pub submitted_by: String,
    pub error: Option<String>,
    pub warnings: Vec<String>,
    pub created_ms: i64,
    pub started_ms: i64,
    pub finished_ms: i64,
}

impl JobView {
    pub fn new(r: &JobRecord, eta: f64) -> Self {
        let p = &r.progress;
        let elapsed_ms = match (r.started_ms, r.finished_ms) {
            (0, _) => None,
            (s, 0) => Some(now_ms() - s),
            (s, f) => Some(f - s),
        };
        let elapsed_s = elapsed_ms.map(|ms| ms.max(0) as f64 / 1000.0);
        let evals_per_s = elapsed_s
            .filter(|s| *s > 0.5 && p.views_done > 0)
            .map(|s| p.views_done as f64 / s);
        let plan_text = describe::plan_text(&r.plan);
        Self {
            id: r.id.clone(),
            state: r.state.to_string(),
            priority: r.priority,
            model: r.model.clone(),
            prompt: r.spec.prompt.clone(),
            width: r.spec.width,
            height: r.spec.height,
            method: r.plan.method.to_string(),
            seed: r.spec.seed,
            count: r.count,
            images_done: r.images_done,
            progress: p.clone(),
            eta_s: (eta >= 0.0 && r.state == JobState::Running).then_some(eta),
            elapsed_s,
            evals_per_s,
            summary: plan_text.lines().next().unwrap_or_default().to_string(),
            submitted_by: r.submitted_by.clone(),
            error: r.error.clone(),
            warnings: r.warnings.clone(),
            created_ms: r.created_ms,
            started_ms: r.started_ms,
            finished_ms: r.finished_ms,
        }
    }
}

/// One worker as the page shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct WorkerView {
    pub name: String,
    pub address: String,
    pub models: Vec<String>,
    pub device: String,
    pub device_memory_bytes: u64,
    pub version: String,
    /// busy, idle or lost.
    pub state: &'static str,
    /// Seconds per task by kind (the pool's moving averages); `denoise` is one evaluation
    /// of a batch of views.
    pub pace: BTreeMap<String, f64>,
    pub tasks_done: u64,
    pub copies_won: u64,
    pub copies_lost: u64,
    /// Seconds since its last heartbeat.
    pub heartbeat_s_ago: f64,
}

impl WorkerView {
    fn live(w: &WorkerSnapshot, heartbeat: Option<Instant>) -> Self {
        let d = &w.desc;
        Self {
            name: d.worker_id.clone(),
            address: d.address.clone(),
            models: d
                .models
                .iter()
                .map(|m| format!("{} ({})", m.name, short(&m.fingerprint)))
                .collect(),
            device: d.device.clone(),
            device_memory_bytes: d.device_memory_bytes,
            version: d.version.clone(),
            state: if w.calls_out > 0 { "busy" } else { "idle" },
            pace: w.seconds.iter().map(|(k, s)| (k.to_string(), *s)).collect(),
            tasks_done: w.counts.tasks_done,
            copies_won: w.counts.copies_won,
            copies_lost: w.counts.copies_lost,
            heartbeat_s_ago: heartbeat.map_or(0.0, |t| t.elapsed().as_secs_f64()),
        }
    }
}

fn short(fingerprint: &str) -> &str {
    fingerprint.get(..12).unwrap_or(fingerprint)
}

/// The workers seen since the dashboard started: live ones as the pool has them, lost ones
/// as they were last seen, for [`LOST_KEPT`].
#[derive(Default)]
pub struct SeenWorkers {
    workers: BTreeMap<String, (WorkerView, Instant)>,
}

impl SeenWorkers {
    /// The list after an update from the pool and the heartbeats.
    pub fn update(
        &mut self,
        live: &[WorkerSnapshot],
        heartbeats: &[(String, Instant)],
    ) -> Vec<WorkerView> {
        let now = Instant::now();
        for w in self.workers.values_mut() {
            w.0.state = "lost";
        }
        for w in live {
            let beat = heartbeats
                .iter()
                .find(|(id, _)| *id == w.desc.worker_id)
                .map(|(_, t)| *t);
            let view = WorkerView::live(w, beat);
            self.workers
                .insert(view.name.clone(), (view, beat.unwrap_or(now)));
        }
        self.workers
            .retain(|_, (v, seen)| v.state != "lost" || seen.elapsed() < LOST_KEPT);
        self.workers
            .values()
            .map(|(v, seen)| {
                let mut v = v.clone();
                v.heartbeat_s_ago = seen.elapsed().as_secs_f64();
                v
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::pool::WorkerCounts;
    use tessera_proto::v1::WorkerDescription;

    fn snapshot(name: &str, calls_out: usize) -> WorkerSnapshot {
        WorkerSnapshot {
            desc: WorkerDescription {
                worker_id: name.into(),
                device: "cpu".into(),
                ..Default::default()
            },
            calls_out,
            seconds: vec![("denoise", 0.5)],
            counts: WorkerCounts {
                tasks_done: 3,
                ..Default::default()
            },
        }
    }

    #[test]
    fn a_worker_that_leaves_the_pool_is_listed_as_lost() {
        let mut seen = SeenWorkers::default();
        let now = Instant::now();
        let beats = [("a".to_string(), now), ("b".to_string(), now)];
        let both = seen.update(&[snapshot("a", 1), snapshot("b", 0)], &beats);
        let states: Vec<_> = both.iter().map(|w| (w.name.as_str(), w.state)).collect();
        assert_eq!(states, [("a", "busy"), ("b", "idle")]);
        assert_eq!(both[0].pace.get("denoise"), Some(&0.5));
        let after = seen.update(&[snapshot("a", 0)], &beats[..1]);
        let states: Vec<_> = after.iter().map(|w| (w.name.as_str(), w.state)).collect();
        assert_eq!(states, [("a", "idle"), ("b", "lost")]);
        assert_eq!(after[1].tasks_done, 3);
    }
}
