//! When the workers of `tessera bench scale` waited: each benchmark double logs its device
//! turns (`simulated device turn start_ms=… end_ms=…`), the coordinator its step ends; within
//! each timed step, a worker's time is its device turns, the wait before its first turn (the
//! step's head: nothing handed out to it yet), the wait after its last (the step's tail: the
//! step's last round running elsewhere, then the merge, guidance and step), and the gaps
//! between turns (calls, store reads and writes not hidden behind the device).

use serde::{Deserialize, Serialize};

/// A worker's milliseconds per step, averaged over the workers and the timed steps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerTime {
    /// Holding the device.
    pub busy_ms: f64,
    /// Waiting before the step's first turn.
    pub head_ms: f64,
    /// Waiting between turns.
    pub between_ms: f64,
    /// Waiting after the step's last turn.
    pub tail_ms: f64,
}

/// The device turns one worker logged, `(start, end)` in ms since the epoch, in log order.
pub fn parse_turns(log: &str) -> Vec<(f64, f64)> {
    log.lines()
        .filter(|l| l.contains("simulated device turn"))
        .filter_map(|l| {
            let get = |name: &str| -> Option<f64> {
                l.split_whitespace()
                    .find_map(|t| t.strip_prefix(name)?.strip_prefix('='))
                    .and_then(|v| v.parse().ok())
            };
            Some((get("start_ms")?, get("end_ms")?))
        })
        .collect()
}

/// Each worker's time within the steps that end at `step_ends` (ms since the epoch, in order;
/// step k spans `step_ends[k-1]..step_ends[k]`), from the workers' device turns; `None`
/// without a whole step or a worker.
pub fn per_step(step_ends: &[f64], workers: &[Vec<(f64, f64)>]) -> Option<WorkerTime> {
    if step_ends.len() < 2 || workers.is_empty() {
        return None;
    }
    let mut sum = WorkerTime::default();
    for window in step_ends.windows(2) {
        let (from, to) = (window[0], window[1]);
        for turns in workers {
            let t = in_window(turns, from, to);
            sum.busy_ms += t.busy_ms;
            sum.head_ms += t.head_ms;
            sum.between_ms += t.between_ms;
            sum.tail_ms += t.tail_ms;
        }
    }
    let n = ((step_ends.len() - 1) * workers.len()) as f64;
    Some(WorkerTime {
        busy_ms: sum.busy_ms / n,
        head_ms: sum.head_ms / n,
        between_ms: sum.between_ms / n,
        tail_ms: sum.tail_ms / n,
    })
}

/// One worker's time in `from..to`: its turns clipped to the window; a window without turns
/// is all head.
fn in_window(turns: &[(f64, f64)], from: f64, to: f64) -> WorkerTime {
    let clipped: Vec<(f64, f64)> = turns
        .iter()
        .map(|&(a, b)| (a.max(from), b.min(to)))
        .filter(|(a, b)| b > a)
        .collect();
    let (Some(first), Some(last)) = (
        clipped.iter().map(|t| t.0).reduce(f64::min),
        clipped.iter().map(|t| t.1).reduce(f64::max),
    ) else {
        return WorkerTime {
            head_ms: to - from,
            ..WorkerTime::default()
        };
    };
    let busy: f64 = clipped.iter().map(|(a, b)| b - a).sum();
    WorkerTime {
        busy_ms: busy,
        head_ms: first - from,
        between_ms: (last - first - busy).max(0.0),
        tail_ms: to - last,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turns_are_read_from_the_workers_log_lines() {
        let log = "2026-12-05T00:00:00Z  INFO tessera_worker::simulate: simulated device turn \
                   start_ms=1000.5 end_ms=1100.25\nother line start_ms=1 end_ms=2\n\
                   x INFO simulated device turn start_ms=1200 end_ms=1300\n";
        assert_eq!(parse_turns(log), vec![(1000.5, 1100.25), (1200.0, 1300.0)]);
    }

    /// Two steps of 500 ms and two workers: one computes from 100 to 200 and 250 to 450 in
    /// the first step and nothing in the second; the other from 0 to 500, then 600 to 1000.
    /// A turn over a step's end counts in both steps.
    #[test]
    fn a_workers_step_is_its_turns_and_the_waits_before_between_and_after_them() {
        let ends = [0.0, 500.0, 1000.0];
        let a = vec![(100.0, 200.0), (250.0, 450.0)];
        let b = vec![(0.0, 500.0), (600.0, 1000.0)];
        let t = per_step(&ends, &[a.clone(), b]).expect("two steps");
        // Step 1: a busy 300, head 100, between 50, tail 50; b busy 500.
        // Step 2: a all head (500); b busy 400, head 100.
        let n = 4.0;
        assert_eq!(t.busy_ms, (300.0 + 500.0 + 400.0) / n);
        assert_eq!(t.head_ms, (100.0 + 500.0 + 100.0) / n);
        assert_eq!(t.between_ms, 50.0 / n);
        assert_eq!(t.tail_ms, 50.0 / n);
        let whole = t.busy_ms + t.head_ms + t.between_ms + t.tail_ms;
        assert_eq!(whole, 500.0);
        let straddling = vec![(400.0, 700.0)];
        let s = per_step(&ends, &[straddling]).expect("two steps");
        assert_eq!((s.busy_ms, s.head_ms, s.tail_ms), (150.0, 200.0, 150.0));
        assert!(per_step(&[0.0], &[a]).is_none());
    }
}
