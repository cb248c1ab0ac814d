//! How evenly a plan's steps keep W workers busy for a given `--view-batch`, and the batch that
//! keeps them busiest (`tessera plan --workers N`, `tessera bench scale --view-batch auto`).
//!
//! A tiled step cannot end before its last task does, and the next step needs all of them:
//! with few tasks per worker the last round leaves most workers idle. At 8192² (289 views)
//! the default batch of 4 makes 73 tasks — on 32 workers three rounds of 4 views where 9.03
//! views per worker is the ideal, so at most 75% busy. Larger batches are not simply better
//! either: a step's first task waits for its views to be written and its last task's
//! predictions are read and merged before the step ends, so a task's size also lengthens the
//! step at its edges. The estimate models both (see [`CALL_COST`], [`EDGE_COST`]). The batch
//! is part of the job's spec (a GPU may round a batch of views differently from single
//! views), so it is recommended, never picked by the worker count behind the user's back.

use crate::plan::{Plan, StagePlan};

/// The largest batch [`recommend`] proposes: twice the default, so a worker's activations
/// stay within twice what the default needs (`tessera plan` prints the estimate).
pub const MAX_RECOMMENDED: usize = 8;

/// A call's own cost in evaluations beside its views (the round trips to the store, the
/// worker reading its views and writing its predictions).
pub const CALL_COST: f64 = 0.1;
/// What each view of a task adds to a step's length at its edges, in evaluations: the first
/// task's views written before it starts, the last one's predictions read and merged after it
/// ends. Both constants are fitted to `tessera bench scale` at 50 ms evaluations on a 2-core
/// box (BENCHMARKS.md, issue 22: batches 1 to 6 on 16 and 32 workers; the estimate picks the
/// batch measured best at 16 workers, 2 — 88–90% against 82% at the default 4 — and at 32
/// one within two points of the best).
pub const EDGE_COST: f64 = 0.5;

/// What a batch gives on W workers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fit {
    pub view_batch: usize,
    /// The share of the workers' time spent on views over the tiled stages' steps (1.0:
    /// every worker busy until the step's end).
    pub busy: f64,
}

/// `view_batch` on `workers` equal workers over `plan`'s tiled stages (those with more than
/// one view per step); `None` when the plan has none (one view per step: the batch cannot
/// matter, and a cluster speeds such a job up only by running other jobs beside it).
pub fn fit(plan: &Plan, view_batch: usize, workers: usize) -> Option<Fit> {
    let (mut ideal, mut taken) = (0.0, 0.0);
    for st in plan.stages.iter().filter(|st| views(st) > 1) {
        let steps = st.timesteps.len() as f64;
        ideal += steps * views(st) as f64 / workers.max(1) as f64;
        taken += steps * step_span(st, view_batch, workers);
    }
    (taken > 0.0).then(|| Fit {
        view_batch,
        busy: ideal / taken,
    })
}

/// Within this share of the busiest, a batch counts as just as good.
pub const TOLERANCE: f64 = 0.005;

/// Of the batches from 1 to [`MAX_RECOMMENDED`] (or the plan's own, if larger), the largest
/// (fewest calls) that keeps `workers` within [`TOLERANCE`] of the busiest.
pub fn recommend(plan: &Plan, workers: usize) -> Option<Fit> {
    let fits: Vec<Fit> = (1..=MAX_RECOMMENDED.max(plan.view_batch))
        .map(|b| fit(plan, b, workers))
        .collect::<Option<_>>()?;
    let busiest = fits.iter().map(|f| f.busy).fold(0.0, f64::max);
    fits.into_iter()
        .rev()
        .find(|f| f.busy >= busiest - TOLERANCE)
}

fn views(st: &StagePlan) -> usize {
    st.local_views + st.global_views
}

/// A step's length in evaluations: its tasks (batches of global views, then of local views,
/// as the engine hands them out) each going to the first worker free, as the pool does, and
/// the edges.
fn step_span(st: &StagePlan, view_batch: usize, workers: usize) -> f64 {
    let b = view_batch.max(1);
    let sizes = |n: usize| (0..n.div_ceil(b)).map(move |i| (n - i * b).min(b));
    let mut free = vec![0.0f64; workers.max(1)];
    for size in sizes(st.global_views).chain(sizes(st.local_views)) {
        let first = free
            .iter_mut()
            .min_by(|a, b| a.total_cmp(b))
            .expect("at least one worker");
        *first += size as f64 + CALL_COST;
    }
    free.into_iter().fold(0.0, f64::max) + EDGE_COST * b.min(views(st)) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::method::params::Method;
    use crate::plan::{plan, ArchInfo};
    use crate::spec::Size;

    /// SDXL with `method` at `size`²: at 8192² FreeScale's last stage has 225 local and 64
    /// global views, the one-stage hybrid job of `tessera bench scale` the same.
    fn plan_of(size: u32, method: Method, stages: Option<Vec<Size>>) -> Plan {
        let mut spec = crate::plan::tests::spec(size, Some(method));
        spec.method.stages = stages;
        plan(&spec, &ArchInfo::preset("sdxl").unwrap()).unwrap()
    }

    #[test]
    fn the_last_round_is_what_a_batch_costs() {
        let p = plan_of(
            8192,
            Method::Hybrid,
            Some(vec![Size {
                width: 8192,
                height: 8192,
            }]),
        );
        let last = p.stages.last().unwrap();
        assert_eq!((last.local_views, last.global_views), (225, 64));
        // 73 tasks of 4 on 32 workers: 3 rounds where 2.26 would do.
        let four = fit(&p, 4, 32).unwrap().busy;
        assert!((0.60..0.70).contains(&four), "{four}");
        // 58 tasks of 5: 2 rounds, though longer edges.
        let five = fit(&p, 5, 32).unwrap().busy;
        assert!(five > four + 0.05, "{five}");
        // What bench scale measured best at 16 and 32 workers.
        assert_eq!(recommend(&p, 16).unwrap().view_batch, 2);
        assert_eq!(recommend(&p, 32).unwrap().view_batch, 2);
        // One worker: every batch keeps it busy; the edges and calls are what differ, and
        // every step's views are counted once whatever the batch.
        for b in 1..=MAX_RECOMMENDED {
            assert!(fit(&p, b, 1).unwrap().busy > 0.9);
        }
    }

    #[test]
    fn every_tiled_stage_counts_by_its_steps() {
        let p = plan_of(8192, Method::Freescale, None);
        assert_eq!(p.stages.len(), 4);
        let f = recommend(&p, 16).unwrap();
        assert!((1..=MAX_RECOMMENDED).contains(&f.view_batch));
        assert!(f.busy >= fit(&p, p.view_batch, 16).unwrap().busy);
    }

    #[test]
    fn a_plan_of_whole_steps_has_no_fit() {
        let p = plan_of(1024, Method::Freescale, None);
        assert!(p.stages.iter().all(|st| st.is_whole()));
        assert_eq!(fit(&p, 4, 16), None);
        assert_eq!(recommend(&p, 16), None);
    }
}
