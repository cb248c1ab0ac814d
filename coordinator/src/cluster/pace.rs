//! Each worker's pace: how long its tasks take (a moving average per kind of task, from the
//! seconds the worker reports) and the calls it has outstanding, which it computes one at a
//! time in the order they were sent. From these the pool estimates when a running task will
//! finish where it is, and whether an idle worker would finish a copy of it sooner.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Weight of the newest report in a worker's moving average.
const NEWEST: f64 = 0.3;
/// A call counts as overdue once it has run this many times its expected length (and at least
/// `OVERDUE_FLOOR` beyond it): its worker is stalled or far slower than its record.
const OVERDUE_FACTOR: f64 = 2.0;
const OVERDUE_FLOOR: Duration = Duration::from_millis(250);

/// Seconds per task by kind, for workers with no record of their own (the pool's mean).
pub type Typical = HashMap<&'static str, f64>;

#[derive(Debug)]
struct Call {
    id: u64,
    kinds: Vec<&'static str>,
}

/// Where a call stands on its worker.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CallEstimate {
    /// When its results are expected back.
    pub end: Instant,
    /// It, or a call it waits behind, has run far past its expected length.
    pub overdue: bool,
}

#[derive(Debug)]
pub struct Pace {
    seconds: HashMap<&'static str, f64>,
    calls: VecDeque<Call>,
    /// When the front call began computing: when it was sent, or when the call before it
    /// returned.
    front_since: Instant,
}

impl Pace {
    pub fn new(now: Instant) -> Self {
        Self {
            seconds: HashMap::new(),
            calls: VecDeque::new(),
            front_since: now,
        }
    }

    /// Seconds one task of `kind` took (as the worker measured it).
    pub fn note(&mut self, kind: &'static str, seconds: f64) {
        if !seconds.is_finite() || seconds < 0.0 {
            return;
        }
        let avg = self.seconds.entry(kind).or_insert(seconds);
        *avg = (1.0 - NEWEST) * *avg + NEWEST * seconds;
    }

    pub fn record(&self) -> impl Iterator<Item = (&'static str, f64)> + '_ {
        self.seconds.iter().map(|(k, s)| (*k, *s))
    }

    /// Calls sent and not yet returned: 0 means the worker is idle.
    pub fn calls_out(&self) -> usize {
        self.calls.len()
    }

    /// Seconds a task of `kind` should take here: the worker's own record, else the typical.
    fn task_seconds(&self, kind: &str, typical: &Typical) -> Option<f64> {
        self.seconds
            .get(kind)
            .or_else(|| typical.get(kind))
            .copied()
    }

    fn call_seconds(&self, kinds: &[&'static str], typical: &Typical) -> Option<f64> {
        kinds.iter().map(|k| self.task_seconds(k, typical)).sum()
    }

    pub fn begin_call(&mut self, id: u64, kinds: Vec<&'static str>, now: Instant) {
        if self.calls.is_empty() {
            self.front_since = now;
        }
        self.calls.push_back(Call { id, kinds });
    }

    /// The call returned (or was given up on); the next one starts computing now.
    pub fn end_call(&mut self, id: u64, now: Instant) {
        let Some(i) = self.calls.iter().position(|c| c.id == id) else {
            return;
        };
        self.calls.remove(i);
        if i == 0 {
            self.front_since = now;
        }
    }

    /// Walks the outstanding calls in order, then a call of `extra` sent now, yielding each
    /// one's estimate; `None` where some kind has no estimate anywhere.
    fn walk(
        &self,
        extra: Option<&[&'static str]>,
        now: Instant,
        typical: &Typical,
    ) -> Option<Vec<(Option<u64>, CallEstimate)>> {
        let mut out = Vec::with_capacity(self.calls.len() + 1);
        let mut begins = self.front_since;
        let mut overdue = false;
        let queued = self.calls.iter().map(|c| (Some(c.id), c.kinds.as_slice()));
        for (i, (id, kinds)) in queued.chain(extra.map(|k| (None, k))).enumerate() {
            let length = Duration::from_secs_f64(self.call_seconds(kinds, typical)?);
            let mut end = begins + length;
            if i == 0 && id.is_some() {
                let late = OVERDUE_FLOOR.max(length.mul_f64(OVERDUE_FACTOR - 1.0));
                overdue = now > end + late;
            }
            // A call past its expected end may return any moment; those behind it wait for it.
            end = end.max(now);
            out.push((id, CallEstimate { end, overdue }));
            begins = end;
        }
        Some(out)
    }

    /// When call `id` is expected back.
    pub fn estimate(&self, id: u64, now: Instant, typical: &Typical) -> Option<CallEstimate> {
        self.walk(None, now, typical)?
            .into_iter()
            .find(|(c, _)| *c == Some(id))
            .map(|(_, e)| e)
    }

    /// When a call of `kinds` sent now would be back, behind what the worker already has.
    pub fn next_end(
        &self,
        kinds: &[&'static str],
        now: Instant,
        typical: &Typical,
    ) -> Option<Instant> {
        self.walk(Some(kinds), now, typical)?
            .last()
            .map(|(_, e)| e.end)
    }
}

/// The mean record per kind over `paces`: the estimate for a worker that has none yet.
pub fn typical<'a>(paces: impl Iterator<Item = &'a Pace>) -> Typical {
    let mut sums: HashMap<&'static str, (f64, usize)> = HashMap::new();
    for pace in paces {
        for (kind, s) in pace.record() {
            let e = sums.entry(kind).or_default();
            e.0 += s;
            e.1 += 1;
        }
    }
    sums.into_iter()
        .map(|(k, (s, n))| (k, s / n as f64))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    fn close(a: Instant, b: Instant) -> bool {
        let d = if a > b { a - b } else { b - a };
        d < Duration::from_millis(1)
    }

    #[test]
    fn calls_queue_behind_each_other() {
        let t0 = Instant::now();
        let mut slow = Pace::new(t0);
        slow.note("denoise", 1.6);
        slow.begin_call(1, vec!["denoise"], t0);
        slow.begin_call(2, vec!["denoise"], t0);
        let none = Typical::new();
        let e1 = slow.estimate(1, t0, &none).unwrap();
        let e2 = slow.estimate(2, t0, &none).unwrap();
        assert!(close(e1.end, t0 + secs(1.6)) && !e1.overdue);
        assert!(close(e2.end, t0 + secs(3.2)) && !e2.overdue);

        // The first returns early: the second starts then.
        let t1 = t0 + secs(1.0);
        slow.end_call(1, t1);
        assert!(close(
            slow.estimate(2, t1, &none).unwrap().end,
            t1 + secs(1.6)
        ));
        assert!(close(
            slow.next_end(&["denoise", "denoise"], t1, &none).unwrap(),
            t1 + secs(1.6 + 3.2)
        ));
        assert_eq!(slow.estimate(1, t1, &none), None);
    }

    #[test]
    fn a_call_past_its_time_ends_any_moment_then_counts_as_overdue() {
        let t0 = Instant::now();
        let mut w = Pace::new(t0);
        w.note("denoise", 0.4);
        w.begin_call(7, vec!["denoise"], t0);
        w.begin_call(8, vec!["denoise"], t0);
        let none = Typical::new();
        // Late, but not yet overdue: it may return now; the one behind follows.
        let t = t0 + secs(0.6);
        let e = w.estimate(7, t, &none).unwrap();
        assert!(close(e.end, t) && !e.overdue);
        assert!(close(w.estimate(8, t, &none).unwrap().end, t + secs(0.4)));
        // Past twice its length: overdue, and so is the call waiting behind it.
        let t = t0 + secs(0.81);
        assert!(w.estimate(7, t, &none).unwrap().overdue);
        assert!(w.estimate(8, t, &none).unwrap().overdue);
    }

    #[test]
    fn a_new_worker_borrows_the_typical_pace_and_unknown_kinds_give_no_estimate() {
        let t0 = Instant::now();
        let mut a = Pace::new(t0);
        a.note("denoise", 0.2);
        a.note("denoise", 0.6); // moving average: 0.7·0.2 + 0.3·0.6
        let mut b = Pace::new(t0);
        b.note("denoise", 0.5);
        let typical = typical([&a, &b].into_iter());
        assert!((typical["denoise"] - (0.32 + 0.5) / 2.0).abs() < 1e-12);

        let mut fresh = Pace::new(t0);
        assert!(close(
            fresh.next_end(&["denoise"], t0, &typical).unwrap(),
            t0 + secs(0.41)
        ));
        fresh.begin_call(1, vec!["decode"], t0);
        assert_eq!(fresh.estimate(1, t0, &typical), None);
        assert_eq!(fresh.next_end(&["denoise"], t0, &typical), None);
    }
}
