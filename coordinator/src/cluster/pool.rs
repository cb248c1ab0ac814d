//! The worker pool: every live worker, one task queue for all running jobs, and the loops that
//! keep each worker fed. Engine threads stream a step's tasks into
//! [`JobDispatch::run_streamed`] (each queued as soon as its input is written) and block until
//! every task has a result in the store.
//!
//! - Order: the queue is sorted by (job priority, job submission, task order), so a
//!   higher-priority job goes first and jobs of equal priority interleave only where the
//!   earlier one leaves workers idle.
//! - Calls: each worker has two calls out at most (the second computes while the first's
//!   results travel); a worker with one call out leaves a queued task to a worker with none
//!   that is waiting for work ([`yields_to_idle`]), so a step's first tasks reach every worker
//!   before any gets a second.
//! - Members: the workers that joined through the Membership service
//!   ([`super::membership`]), each called with the call token it gave at its join — never a
//!   client's credential.
//! - Leases and attempts: a call that fails at the transport level, outlives its lease, or
//!   belongs to a worker whose membership ended puts its unfinished tasks back in the queue;
//!   each such loss counts as an attempt of the task, as does a task the worker reports failed
//!   (retryable) or reports done without its outputs in the store. Each retry waits longer
//!   (from half a second, doubling); after [`MAX_ATTEMPTS`] the job fails with a message that
//!   names the task, the workers and what happened on each.
//! - A worker that reports a task done without its outputs in the store is lying or broken:
//!   its membership is dropped at once (until it joins again), and its tasks go to others.
//! - Copies: a worker with nothing queued for its model takes a copy of a task running
//!   elsewhere when it would likely finish it first — once a step's tasks are all queued, so a
//!   slow worker holding the last of them does not set the step's pace — or when the task's
//!   call is overdue (a stalled worker). Estimates come from each worker's [`Pace`]. The first
//!   result wins; tasks are pure functions of their inputs, so both copies write the same bytes.
//! - A result for a task that is already done (a duplicate, or a call that returned after its
//!   lease) is ignored.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tessera_core::task::Task;
use tessera_proto::auth::AttachToken;
use tessera_proto::net::{self, ClientNet};
use tessera_proto::v1::worker_client::WorkerClient;
use tessera_proto::v1::{RunTasksRequest, TaskRef, TaskResult, WorkerDescription};
use tessera_store::{keys, RedisStore};
use tokio::sync::{watch, Notify};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use super::pace::{self, Pace};
use crate::dispatch::{Dispatch, DispatchError};
use crate::metrics;
use crate::sync::lock;

/// How many attempts a task gets (each lost lease, lost worker, failed call or retryable
/// failure is one) before its job fails.
pub const MAX_ATTEMPTS: u32 = 5;
/// The wait before a task's second attempt; it doubles with each further one, up to
/// [`RETRY_WAIT_MAX`].
const RETRY_WAIT: Duration = Duration::from_millis(500);
const RETRY_WAIT_MAX: Duration = Duration::from_secs(8);
/// Calls a worker may have outstanding: the second is sent while the first computes, so the
/// worker never waits for a round trip.
const CALLS_PER_WORKER: usize = 2;

type Client = WorkerClient<InterceptedService<Channel, AttachToken>>;

#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// Longest a single RunTasks call may take before its tasks go to someone else.
    pub lease: Duration,
    pub net: ClientNet,
}

/// A worker that joined: what it serves, its membership and the token to call it with.
#[derive(Debug, Clone)]
pub struct Member {
    pub desc: WorkerDescription,
    pub session: String,
    pub call_token: String,
}

/// A model as a job asks for it: the served name, and the fingerprint the job was admitted
/// with (empty for jobs recorded before fingerprints: any worker of the name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelId {
    pub name: String,
    pub fingerprint: String,
}

impl ModelId {
    fn served_by(&self, desc: &WorkerDescription) -> bool {
        desc.models.iter().any(|m| {
            m.name == self.name
                && (self.fingerprint.is_empty() || m.fingerprint == self.fingerprint)
        })
    }
}

/// Position in the queue: lower runs first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct QueueKey {
    priority: Reverse<i32>,
    job_seq: u64,
    seq: u64,
}

struct Slot {
    key: QueueKey,
    task: Task,
    task_json: String,
    model: ModelId,
    /// What the task does, for pace estimates ([`kind_of`]).
    kind: &'static str,
    batch: Arc<Batch>,
    st: Mutex<SlotState>,
}

#[derive(Default)]
struct SlotState {
    done: bool,
    attempts: u32,
    /// What happened to each failed attempt: the worker and why.
    failures: Vec<String>,
    /// Not to be handed out before this (a retry's wait).
    not_before: Option<Instant>,
    /// Workers computing it now, with the id of the call that carries it.
    running_on: Vec<(String, u64)>,
}

/// The wait before attempt `attempts + 1`.
fn retry_wait(attempts: u32) -> Duration {
    let doublings = attempts.saturating_sub(1).min(16);
    (RETRY_WAIT * 2u32.pow(doublings)).min(RETRY_WAIT_MAX)
}

enum BatchEvent {
    Done(Box<Task>),
    Failed(String),
    /// The engine's stream of tasks ended after this many.
    AllQueued(usize),
}

struct Batch {
    tx: Mutex<mpsc::Sender<BatchEvent>>,
    abandoned: AtomicBool,
    /// The engine's stream has ended: nothing more of this batch will be queued, so an idle
    /// worker may as well copy its tail.
    all_queued: AtomicBool,
}

impl Batch {
    fn send(&self, ev: BatchEvent) {
        let _ = lock(&self.tx).send(ev);
    }
}

struct WorkerEntry {
    member: Member,
    alive: watch::Sender<bool>,
    pace: Pace,
    counts: WorkerCounts,
    /// Its feeders waiting for a task (found nothing to take and sleep until woken).
    waiting: usize,
    /// Its last call came back without results (failed, lost, past its lease): others do not
    /// leave tasks to it (see [`yields_to_idle`]) until a call succeeds.
    failing: bool,
}

/// What a worker has done since it joined, for the dashboard.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerCounts {
    /// Tasks whose result counted (the first copy in).
    pub tasks_done: u64,
    /// Copies of a task running elsewhere too that this worker finished first.
    pub copies_won: u64,
    /// Tasks this worker finished after another copy had already counted.
    pub copies_lost: u64,
}

/// One live worker as the dashboard shows it.
#[derive(Debug, Clone)]
pub struct WorkerSnapshot {
    pub desc: WorkerDescription,
    /// Calls it is computing or has queued.
    pub calls_out: usize,
    /// Its moving average seconds per task, by kind of task.
    pub seconds: Vec<(&'static str, f64)>,
    pub counts: WorkerCounts,
}

#[derive(Default)]
struct State {
    workers: BTreeMap<String, WorkerEntry>,
    /// Memberships (sessions) dropped for reporting work they did not do.
    evicted: std::collections::HashSet<String>,
    queue: BTreeMap<QueueKey, Arc<Slot>>,
    running: HashMap<QueueKey, Arc<Slot>>,
    next_seq: u64,
    next_call: u64,
}

struct Inner {
    state: Mutex<State>,
    /// Tasks were queued (or given back), or the workers changed: idle feeders look again.
    wake: Notify,
    /// A batch's stream has ended: idle feeders look for a task to copy (see [`speculate`]).
    tail: Notify,
    opts: PoolOptions,
    /// Where workers write their outputs, checked before a task counts as done.
    store: RedisStore,
    runtime: tokio::runtime::Handle,
}

#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

impl Pool {
    /// Must be created inside the tokio runtime the feeders will run on.
    pub fn new(opts: PoolOptions, store: RedisStore) -> Self {
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                wake: Notify::new(),
                tail: Notify::new(),
                opts,
                store,
                runtime: tokio::runtime::Handle::current(),
            }),
        }
    }

    /// Brings the pool in line with the live membership: new members get feeders, members
    /// that left (or joined again, with a new session) are dropped and their calls abandoned.
    pub fn update_members(&self, live: Vec<Member>) {
        let mut joined = Vec::new();
        {
            let mut st = lock(&self.inner.state);
            let gone: Vec<String> = st
                .workers
                .iter()
                .filter(|(id, w)| {
                    !live
                        .iter()
                        .any(|m| &m.desc.worker_id == *id && m.session == w.member.session)
                })
                .map(|(id, _)| id.clone())
                .collect();
            for id in gone {
                if let Some(w) = st.workers.remove(&id) {
                    metrics::coordinator().worker_left(&id);
                    let _ = w.alive.send(false);
                    tracing::warn!(worker = %id, "worker left (its membership ended)");
                    tessera_worker::status!("worker {id} left");
                }
            }
            for m in live {
                if st.evicted.contains(&m.session) {
                    continue;
                }
                if let Some(w) = st.workers.get_mut(&m.desc.worker_id) {
                    w.member = m;
                    continue;
                }
                let (tx, _) = watch::channel(true);
                st.workers.insert(
                    m.desc.worker_id.clone(),
                    WorkerEntry {
                        member: m.clone(),
                        alive: tx,
                        pace: Pace::new(Instant::now()),
                        counts: WorkerCounts::default(),
                        waiting: 0,
                        failing: false,
                    },
                );
                joined.push(m);
            }
            metrics::coordinator().workers.set(st.workers.len() as i64);
        }
        for m in joined {
            let d = &m.desc;
            tracing::info!(worker = %d.worker_id, address = %d.address, "worker joined");
            tessera_worker::status!("worker {} joined ({})", d.worker_id, d.address);
            self.start_feeders(m);
        }
        self.inner.wake.notify_waiters();
    }

    /// Live workers serving a model of this name.
    pub fn serving(&self, model: &str) -> Vec<WorkerDescription> {
        lock(&self.inner.state)
            .workers
            .values()
            .filter(|w| w.member.desc.models.iter().any(|m| m.name == model))
            .map(|w| w.member.desc.clone())
            .collect()
    }

    /// Live workers serving `model` with its fingerprint.
    fn serving_id(&self, model: &ModelId) -> Vec<WorkerDescription> {
        lock(&self.inner.state)
            .workers
            .values()
            .filter(|w| model.served_by(&w.member.desc))
            .map(|w| w.member.desc.clone())
            .collect()
    }

    pub fn members(&self) -> Vec<WorkerDescription> {
        lock(&self.inner.state)
            .workers
            .values()
            .map(|w| w.member.desc.clone())
            .collect()
    }

    /// Every live worker with its pace and counts.
    pub fn snapshots(&self) -> Vec<WorkerSnapshot> {
        lock(&self.inner.state)
            .workers
            .values()
            .map(|w| WorkerSnapshot {
                desc: w.member.desc.clone(),
                calls_out: w.pace.calls_out(),
                seconds: w.pace.record().collect(),
                counts: w.counts,
            })
            .collect()
    }

    fn start_feeders(&self, member: Member) {
        let desc = member.desc;
        let alive = match lock(&self.inner.state).workers.get(&desc.worker_id) {
            Some(w) => w.alive.subscribe(),
            None => return,
        };
        let made = net::channel(&desc.address, &self.inner.opts.net)
            .map_err(|e| e.to_string())
            .and_then(|c| {
                let token =
                    AttachToken::new(Some(&member.call_token)).map_err(|e| e.to_string())?;
                Ok((c, token))
            });
        let (channel, token) = match made {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(worker = %desc.worker_id, "cannot call the worker: {e}");
                return;
            }
        };
        let client =
            WorkerClient::with_interceptor(channel, token).max_decoding_message_size(64 << 20);
        for _ in 0..CALLS_PER_WORKER {
            let pool = self.clone();
            let (desc, client, alive) = (desc.clone(), client.clone(), alive.clone());
            self.inner
                .runtime
                .spawn(async move { pool.feed(desc, client, alive).await });
        }
    }

    /// One call slot of one worker: take tasks, call, settle the results, repeat.
    async fn feed(
        &self,
        desc: WorkerDescription,
        mut client: Client,
        mut alive: watch::Receiver<bool>,
    ) {
        let id = desc.worker_id.clone();
        let per_call = desc.tasks_per_call.max(1) as usize;
        let lease = self.inner.opts.lease;
        let mut backoff = Duration::from_millis(200);
        // Whether an empty queue sends this feeder looking for a copy. Not after a wake for a
        // queued task: every idle feeder wakes for each one, and all but the one that takes
        // it would run the copy estimate over every running task — thousands of times a step
        // at 32 workers. Copies are looked for after a call, on the clock and at a tail.
        let mut may_copy = true;
        // Whether this feeder counts among its worker's waiting ones (see [`yields_to_idle`]).
        let mut waiting = false;
        loop {
            if !*alive.borrow() {
                if waiting {
                    self.stop_waiting(&id);
                }
                return;
            }
            let (notified, tail) = (self.inner.wake.notified(), self.inner.tail.notified());
            tokio::pin!(notified, tail);
            notified.as_mut().enable();
            tail.as_mut().enable();
            let picked = self.pick(&id, &desc, (per_call, may_copy), &mut waiting);
            let Some((call_id, picked)) = picked else {
                may_copy = tokio::select! {
                    _ = &mut notified => false,
                    _ = &mut tail => true,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => true,
                    _ = alive.changed() => true,
                };
                continue;
            };
            may_copy = true;
            let request = RunTasksRequest {
                tasks: picked
                    .iter()
                    .map(|s| TaskRef {
                        model: s.model.name.clone(),
                        task_json: s.task_json.clone(),
                    })
                    .collect(),
            };
            let call = tokio::time::timeout(lease, client.run_tasks(request));
            let outcome = tokio::select! {
                r = call => Some(r),
                _ = wait_lost(&mut alive) => None,
            };
            let reports = match &outcome {
                Some(Ok(Ok(resp))) => resp.get_ref().results.as_slice(),
                _ => &[],
            };
            self.call_returned(&id, call_id, &picked, reports);
            match outcome {
                None => {
                    self.attempts_failed(&picked, &id, "the worker left while computing it");
                    return;
                }
                Some(Err(_elapsed)) => {
                    metrics::coordinator()
                        .leases_expired
                        .inc_by(picked.len() as u64);
                    tracing::warn!(worker = %id, lease = ?lease, "call outlived its lease; its tasks go to others");
                    let why = format!("its call outlived the lease of {} s", lease.as_secs_f64());
                    self.attempts_failed(&picked, &id, &why);
                }
                Some(Ok(Err(status))) => {
                    tracing::warn!(worker = %id, "call failed: {}", status.message());
                    let why = format!("the call failed: {}", status.message());
                    self.attempts_failed(&picked, &id, &why);
                    let lost = tokio::select! {
                        _ = tokio::time::sleep(backoff) => false,
                        _ = wait_lost(&mut alive) => true,
                    };
                    if lost {
                        return;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Some(Ok(Ok(resp))) => {
                    backoff = Duration::from_millis(200);
                    self.settle(&id, &picked, resp.into_inner().results).await;
                }
            }
        }
    }

    /// The answers of a call: a success counts once its outputs are in the store; a
    /// retryable failure (or a success without its outputs) is a failed attempt; any other
    /// failure fails the task's job.
    async fn settle(&self, worker: &str, picked: &[Arc<Slot>], results: Vec<TaskResult>) {
        let missing = self.missing_outputs(picked, &results).await;
        for ((slot, r), missing) in picked.iter().zip(&results).zip(missing) {
            if r.id != slot.task.id {
                let why = format!("it answered for task {:?} instead", r.id);
                self.attempt_failed(slot, worker, &why);
            } else if !r.ok && !r.retryable {
                self.fail(slot, worker, &r.error);
            } else if !r.ok {
                self.attempt_failed(slot, worker, &r.error);
            } else if let Some(key) = missing {
                let why =
                    format!("it reported the task done, but its output {key} is not in the store");
                self.evict(worker, &why);
                self.attempt_failed(slot, worker, &why);
            } else {
                let evaluations = u64::from(r.evaluations);
                metrics::coordinator().worker_task(worker, evaluations, r.seconds);
                self.complete(slot, worker);
            }
        }
        if results.len() < picked.len() {
            self.attempts_failed(
                &picked[results.len()..],
                worker,
                "its answer left the task out",
            );
        }
    }

    /// Drops `worker`'s membership: it said it did work it did not do. It is called no more
    /// (its calls are abandoned) until it joins again.
    fn evict(&self, worker: &str, why: &str) {
        let mut st = lock(&self.inner.state);
        let Some(w) = st.workers.remove(worker) else {
            return;
        };
        st.evicted.insert(w.member.session.clone());
        let _ = w.alive.send(false);
        metrics::coordinator().workers.set(st.workers.len() as i64);
        metrics::coordinator().worker_left(worker);
        drop(st);
        tracing::error!(worker, "worker removed from the cluster: {why}");
        tessera_worker::status!("worker {worker} removed: {why}");
        self.inner.wake.notify_waiters();
    }

    /// For each task reported done (and not done already), the first of its outputs missing
    /// from the store. When the store cannot be asked, none: the engine's own read of the
    /// outputs is the last word.
    async fn missing_outputs(
        &self,
        picked: &[Arc<Slot>],
        results: &[TaskResult],
    ) -> Vec<Option<String>> {
        let mut wanted = Vec::new();
        for (i, (slot, r)) in picked.iter().zip(results).enumerate() {
            // An abandoned batch's job has stopped and its keys may be gone already: its
            // results count for nothing, and against no worker.
            let abandoned = slot.batch.abandoned.load(Ordering::Relaxed);
            if r.ok && !abandoned && !lock(&slot.st).done {
                wanted.extend(keys::task_outputs(&slot.task).into_iter().map(|k| (i, k)));
            }
        }
        let mut missing = vec![None; picked.len()];
        let names: Vec<String> = wanted.iter().map(|(_, k)| k.clone()).collect();
        match self.inner.store.exists_many_async(&names).await {
            Ok(there) => {
                for ((i, key), there) in wanted.into_iter().zip(there) {
                    if !there && missing[i].is_none() {
                        missing[i] = Some(key);
                    }
                }
            }
            Err(e) => {
                tracing::warn!(worker = ?picked.first().map(|s| &s.task.id), "cannot check task outputs: {e}")
            }
        }
        missing
    }

    /// Settles call `call` of `worker` in its pace: the next call starts computing now, and
    /// each task that succeeded updates the worker's record.
    fn call_returned(
        &self,
        worker: &str,
        call: u64,
        picked: &[Arc<Slot>],
        reports: &[tessera_proto::v1::TaskResult],
    ) {
        let mut st = lock(&self.inner.state);
        if let Some(w) = st.workers.get_mut(worker) {
            w.failing = reports.is_empty() && !picked.is_empty();
            w.pace.end_call(call, Instant::now());
            for (slot, r) in picked.iter().zip(reports) {
                if r.ok {
                    w.pace.note(slot.kind, r.seconds);
                }
            }
        }
    }

    /// Up to `n` queued tasks this worker serves, in queue order, leaving out retries still
    /// waiting — none where a worker with nothing to do should take them first
    /// ([`yields_to_idle`]); with none and `may_copy`, a copy of a task running elsewhere (see
    /// [`speculate`]). Returns them with the call id they go out under. `waiting` is the
    /// feeder's mark among its worker's waiting feeders: cleared here, set again when it
    /// gets nothing.
    fn pick(
        &self,
        worker: &str,
        desc: &WorkerDescription,
        (n, may_copy): (usize, bool),
        waiting: &mut bool,
    ) -> Option<(u64, Vec<Arc<Slot>>)> {
        let mut guard = lock(&self.inner.state);
        let st = &mut *guard;
        let w = st.workers.get_mut(worker)?;
        if std::mem::take(waiting) {
            w.waiting = w.waiting.saturating_sub(1);
        }
        let picked = self.pick_locked(st, worker, desc, n, may_copy);
        if picked.is_none() {
            if let Some(w) = st.workers.get_mut(worker) {
                w.waiting += 1;
                *waiting = true;
            }
        }
        picked
    }

    /// A feeder that was waiting stops (its worker left).
    fn stop_waiting(&self, worker: &str) {
        if let Some(w) = lock(&self.inner.state).workers.get_mut(worker) {
            w.waiting = w.waiting.saturating_sub(1);
        }
    }

    /// [`Self::pick`] under the state's lock.
    fn pick_locked(
        &self,
        st: &mut State,
        worker: &str,
        desc: &WorkerDescription,
        n: usize,
        may_copy: bool,
    ) -> Option<(u64, Vec<Arc<Slot>>)> {
        let call = st.next_call;
        let now = Instant::now();
        let mut keys: Vec<QueueKey> = st
            .queue
            .iter()
            .filter(|(_, s)| s.model.served_by(desc) && s.ready(now))
            .take(n)
            .map(|(k, _)| *k)
            .collect();
        let first = keys.first().and_then(|k| st.queue.get(k));
        let yielded = first.is_some_and(|s| yields_to_idle(st, worker, &s.model));
        if yielded {
            keys.clear();
        }
        let mut picked = Vec::with_capacity(keys.len());
        for k in keys {
            if let Some(slot) = st.queue.remove(&k) {
                lock(&slot.st).running_on.push((worker.to_string(), call));
                st.running.insert(k, slot.clone());
                picked.push(slot);
            }
        }
        if picked.is_empty() {
            if !may_copy || yielded {
                return None;
            }
            let slot = speculate(st, worker, desc, now)?;
            tracing::info!(worker, task = %slot.task.id, "copying a task this worker should finish first");
            metrics::coordinator().copies_issued.inc();
            lock(&slot.st).running_on.push((worker.to_string(), call));
            picked.push(slot);
        }
        st.next_call += 1;
        publish_depth(st);
        let kinds = picked.iter().map(|s| s.kind).collect();
        if let Some(w) = st.workers.get_mut(worker) {
            w.pace.begin_call(call, kinds, now);
        }
        Some((call, picked))
    }

    fn complete(&self, slot: &Arc<Slot>, worker: &str) {
        let (first, rivals) = {
            let mut ss = lock(&slot.st);
            ss.running_on.retain(|(w, _)| w != worker);
            let first = !std::mem::replace(&mut ss.done, true);
            (first, !ss.running_on.is_empty())
        };
        let mut st = lock(&self.inner.state);
        st.running.remove(&slot.key);
        if let Some(w) = st.workers.get_mut(worker) {
            let c = &mut w.counts;
            c.tasks_done += u64::from(first);
            c.copies_won += u64::from(first && rivals);
            c.copies_lost += u64::from(!first);
        }
        publish_depth(&st);
        drop(st);
        if first {
            metrics::coordinator().tasks_completed.inc();
            slot.batch
                .send(BatchEvent::Done(Box::new(slot.task.clone())));
        }
    }

    /// Gives unfinished tasks back to the queue (unless another copy still runs).
    fn release(&self, slots: &[Arc<Slot>], worker: &str) {
        let mut st = lock(&self.inner.state);
        for slot in slots {
            let mut ss = lock(&slot.st);
            ss.running_on.retain(|(w, _)| w != worker);
            if ss.done || !ss.running_on.is_empty() || slot.batch.abandoned.load(Ordering::Relaxed)
            {
                continue;
            }
            st.running.remove(&slot.key);
            st.queue.insert(slot.key, slot.clone());
        }
        publish_depth(&st);
        drop(st);
        self.inner.wake.notify_waiters();
    }

    /// [`Pool::attempt_failed`] for each of `slots`.
    fn attempts_failed(&self, slots: &[Arc<Slot>], worker: &str, why: &str) {
        for slot in slots {
            self.attempt_failed(slot, worker, why);
        }
    }

    /// Counts a failed attempt of the task on `worker`: it goes back to the queue after its
    /// retry wait, or, its attempts spent, fails its job naming every attempt.
    fn attempt_failed(&self, slot: &Arc<Slot>, worker: &str, why: &str) {
        let attempts = {
            let mut ss = lock(&slot.st);
            ss.running_on.retain(|(w, _)| w != worker);
            if ss.done {
                // A straggler's copy that lost the race: the task's result is already in (and
                // its inputs may be gone), so its failure means nothing.
                tracing::debug!(worker, task = %slot.task.id, "a late copy failed: {why}");
                return;
            }
            ss.attempts += 1;
            metrics::coordinator().task_attempts_failed.inc();
            let attempt = ss.attempts;
            ss.failures
                .push(format!("attempt {attempt} on worker {worker}: {why}"));
            ss.not_before = Some(Instant::now() + retry_wait(ss.attempts));
            ss.attempts
        };
        if attempts >= MAX_ATTEMPTS {
            let failures = lock(&slot.st).failures.join("; ");
            slot.batch.send(BatchEvent::Failed(format!(
                "task {} of job {} did not finish in {attempts} attempts ({failures}); \
                 tasks get --lease {} s per call: raise it if they need longer, or check \
                 those workers",
                slot.task.id,
                slot.task.job,
                self.inner.opts.lease.as_secs_f64()
            )));
            return;
        }
        let wait = retry_wait(attempts);
        tracing::warn!(worker, task = %slot.task.id, attempt = attempts, "task attempt failed, retrying in {wait:?}: {why}");
        self.release(std::slice::from_ref(slot), worker);
    }

    fn fail(&self, slot: &Arc<Slot>, worker: &str, error: &str) {
        lock(&slot.st).running_on.retain(|(w, _)| w != worker);
        slot.batch.send(BatchEvent::Failed(format!(
            "task {} of job {} failed on worker {worker}: {error}",
            slot.task.id, slot.task.job
        )));
    }

    /// Removes what is left of an abandoned batch from the queue.
    fn forget(&self, batch: &Arc<Batch>) {
        batch.abandoned.store(true, Ordering::Relaxed);
        let mut st = lock(&self.inner.state);
        st.queue.retain(|_, s| !Arc::ptr_eq(&s.batch, batch));
        st.running.retain(|_, s| !Arc::ptr_eq(&s.batch, batch));
        publish_depth(&st);
    }
}

/// The task queue's depth and the tasks out, into the metrics.
fn publish_depth(st: &State) {
    let m = metrics::coordinator();
    m.tasks_queued.set(st.queue.len() as i64);
    m.tasks_running.set(st.running.len() as i64);
}

impl Slot {
    /// Whether it may be handed out at `now` (a retry waits a while first).
    fn ready(&self, now: Instant) -> bool {
        lock(&self.st).not_before.is_none_or(|t| t <= now)
    }
}

/// A running task of a model `desc` serves that `worker` should copy, if any: one whose call is overdue on
/// its worker, or — once its batch is all queued — one this worker would likely return
/// sooner than its worker will (by a tenth of this worker's own wait, so equals leave each
/// other alone). The latest expected among them goes first.
fn speculate(
    st: &State,
    worker: &str,
    desc: &WorkerDescription,
    now: Instant,
) -> Option<Arc<Slot>> {
    if st.running.is_empty() {
        return None;
    }
    let typical = pace::typical(st.workers.values().map(|w| &w.pace));
    let me = &st.workers.get(worker)?.pace;
    st.running
        .values()
        .filter(|s| s.model.served_by(desc))
        .filter_map(|s| {
            let (other, call) = {
                let ss = lock(&s.st);
                match ss.running_on.as_slice() {
                    [(other, call)] if !ss.done && other != worker => (other.clone(), *call),
                    _ => return None,
                }
            };
            let there = st.workers.get(&other)?.pace.estimate(call, now, &typical)?;
            let worth = there.overdue
                || (s.batch.all_queued.load(Ordering::Relaxed) && {
                    let mine = me.next_end(&[s.kind], now, &typical)?;
                    there.end > mine + (mine - now) / 10
                });
            worth.then(|| ((there.overdue, there.end), s.clone()))
        })
        .max_by_key(|(rank, _)| *rank)
        .map(|(_, s)| s)
}

/// Whether `worker`, with a call already out, should leave a queued task of `model` to a
/// worker that has none and a feeder waiting for one: at a step's start the tasks come out a
/// few milliseconds apart, and a worker's second call taking one of them leaves another
/// worker idle until later tasks are written — the whole step waits for that worker at its
/// end. Waiting feeders are woken for every queued task, so the idle worker takes it. Not to a
/// worker whose last call failed: a dead worker's feeders wait too until its membership ends,
/// and every task it takes costs an attempt.
fn yields_to_idle(st: &State, worker: &str, model: &ModelId) -> bool {
    let busy = st
        .workers
        .get(worker)
        .is_some_and(|w| w.pace.calls_out() > 0);
    busy && st.workers.iter().any(|(id, w)| {
        id != worker
            && !w.failing
            && w.waiting > 0
            && w.pace.calls_out() == 0
            && model.served_by(&w.member.desc)
    })
}

/// The kind of work a task is, as far as its duration goes.
fn kind_of(task: &Task) -> &'static str {
    task.kind.name()
}

async fn wait_lost(alive: &mut watch::Receiver<bool>) {
    loop {
        if !*alive.borrow() {
            return;
        }
        if alive.changed().await.is_err() {
            return;
        }
    }
}

/// One job's door into the pool: its model, its place in the order, and its cancel switch.
pub struct JobDispatch<'a> {
    pub pool: Pool,
    pub model: ModelId,
    pub priority: i32,
    pub job_seq: u64,
    pub cancelled: Arc<AtomicBool>,
    /// Called with true while the job waits for a worker serving its model, false once served.
    pub waiting: &'a (dyn Fn(bool) + Sync),
}

impl JobDispatch<'_> {
    /// Puts one task of `batch` in the queue, unless the batch was abandoned meanwhile.
    fn enqueue(&self, batch: &Arc<Batch>, task: Task) -> Result<(), DispatchError> {
        let task_json = serde_json::to_string(&task)
            .map_err(|e| DispatchError::Worker(format!("cannot encode a task: {e}")))?;
        let mut st = lock(&self.pool.inner.state);
        // Checked under the state lock: `forget` marks the batch before it takes the lock, so
        // a task is never queued behind its removal.
        if batch.abandoned.load(Ordering::Relaxed) {
            return Ok(());
        }
        let key = QueueKey {
            priority: Reverse(self.priority),
            job_seq: self.job_seq,
            seq: st.next_seq,
        };
        st.next_seq += 1;
        let kind = kind_of(&task);
        st.queue.insert(
            key,
            Arc::new(Slot {
                key,
                task,
                kind,
                task_json,
                model: self.model.clone(),
                batch: batch.clone(),
                st: Mutex::new(SlotState::default()),
            }),
        );
        publish_depth(&st);
        drop(st);
        self.pool.inner.wake.notify_waiters();
        Ok(())
    }
}

impl Dispatch for JobDispatch<'_> {
    /// A feeder thread queues each task as the engine yields it; this thread reports results
    /// as they come, watches for cancellation, and returns once the stream has ended and all
    /// of it is done.
    fn run_streamed(
        &self,
        tasks: &mut (dyn Iterator<Item = Task> + Send),
        done: &(dyn Fn(&Task) + Sync),
    ) -> Result<(), DispatchError> {
        let (tx, rx) = mpsc::channel();
        let batch = Arc::new(Batch {
            tx: Mutex::new(tx),
            abandoned: AtomicBool::new(false),
            all_queued: AtomicBool::new(false),
        });
        std::thread::scope(|scope| {
            let feeder_batch = batch.clone();
            scope.spawn(move || {
                let mut queued = 0;
                for task in tasks {
                    if feeder_batch.abandoned.load(Ordering::Relaxed) {
                        // Drain the stream so the engine's writer is not left blocked.
                        continue;
                    }
                    match self.enqueue(&feeder_batch, task) {
                        Ok(()) => queued += 1,
                        Err(e) => {
                            feeder_batch.send(BatchEvent::Failed(e.to_string()));
                            return;
                        }
                    }
                }
                feeder_batch.all_queued.store(true, Ordering::Relaxed);
                feeder_batch.send(BatchEvent::AllQueued(queued));
                self.pool.inner.tail.notify_waiters();
            });
            let mut total: Option<usize> = None;
            let mut finished = 0;
            let mut was_waiting = false;
            while total.is_none_or(|t| finished < t) {
                // Checked on every event, not only when none comes: with fast tasks results
                // arrive more often than the timeout, and a cancel (or a lost lock) must
                // still stop the job at once.
                if self.cancelled.load(Ordering::Relaxed) {
                    self.pool.forget(&batch);
                    return Err(DispatchError::Cancelled);
                }
                match rx.recv_timeout(Duration::from_millis(200)) {
                    Ok(BatchEvent::Done(task)) => {
                        done(&task);
                        finished += 1;
                    }
                    Ok(BatchEvent::AllQueued(n)) => total = Some(n),
                    Ok(BatchEvent::Failed(message)) => {
                        self.pool.forget(&batch);
                        return Err(DispatchError::Worker(message));
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        let none = self.pool.serving_id(&self.model).is_empty();
                        if none != was_waiting {
                            (self.waiting)(none);
                            was_waiting = none;
                        }
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        return Err(DispatchError::Worker("the pool shut down".into()));
                    }
                }
            }
            if was_waiting {
                (self.waiting)(false);
            }
            Ok(())
        })
    }

    fn workers(&self) -> usize {
        self.pool.serving_id(&self.model).len().max(1)
    }

    fn view_dtype(&self) -> candle_core::DType {
        let said: Vec<Option<candle_core::DType>> = self
            .pool
            .serving_id(&self.model)
            .iter()
            .flat_map(|w| w.models.iter().filter(|m| m.name == self.model.name))
            .map(|m| m.dtype.parse().ok())
            .collect();
        match said.first() {
            Some(&Some(d)) if said.iter().all(|s| *s == Some(d)) => d,
            _ => candle_core::DType::F32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_core::task::TaskKind;

    fn add_worker(st: &mut State, id: &str, seconds: f64, now: Instant) {
        let (alive, _) = watch::channel(true);
        let mut pace = Pace::new(now);
        pace.note("decode", seconds);
        let member = Member {
            desc: serving(&["m"]),
            session: String::new(),
            call_token: String::new(),
        };
        st.workers.insert(
            id.into(),
            WorkerEntry {
                member,
                alive,
                pace,
                counts: WorkerCounts::default(),
                waiting: 0,
                failing: false,
            },
        );
    }

    /// A worker's description serving `models` (fingerprint `fp`).
    fn serving(models: &[&str]) -> WorkerDescription {
        WorkerDescription {
            models: models
                .iter()
                .map(|m| tessera_proto::v1::ModelDescription {
                    name: m.to_string(),
                    fingerprint: "fp".into(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn running(st: &mut State, batch: &Arc<Batch>, seq: u64) -> Arc<Slot> {
        let key = QueueKey {
            priority: Reverse(0),
            job_seq: 0,
            seq,
        };
        let task = Task {
            job: "j".into(),
            id: format!("t{seq}"),
            kind: TaskKind::Decode {
                input: String::new(),
                output: String::new(),
            },
        };
        let slot = Arc::new(Slot {
            key,
            kind: kind_of(&task),
            task,
            task_json: String::new(),
            model: ModelId {
                name: "m".into(),
                fingerprint: "fp".into(),
            },
            batch: batch.clone(),
            st: Mutex::new(SlotState::default()),
        });
        st.running.insert(key, slot.clone());
        slot
    }

    fn send(st: &mut State, worker: &str, call: u64, slots: &[&Arc<Slot>], now: Instant) {
        for s in slots {
            lock(&s.st).running_on.push((worker.into(), call));
        }
        let kinds = slots.iter().map(|s| s.kind).collect();
        let w = st.workers.get_mut(worker).expect("a worker of the test");
        w.pace.begin_call(call, kinds, now);
    }

    /// A batch still being streamed, its events dropped.
    fn test_batch() -> Arc<Batch> {
        let (tx, _rx) = mpsc::channel();
        Arc::new(Batch {
            tx: Mutex::new(tx),
            abandoned: AtomicBool::new(false),
            all_queued: AtomicBool::new(false),
        })
    }

    fn id(slot: Option<Arc<Slot>>) -> Option<String> {
        slot.map(|s| s.task.id.clone())
    }

    #[test]
    fn an_idle_worker_copies_what_a_slow_worker_would_return_last_once_the_batch_is_queued() {
        let now = Instant::now();
        let mut st = State::default();
        add_worker(&mut st, "fast", 0.4, now);
        add_worker(&mut st, "twin", 0.4, now);
        add_worker(&mut st, "slow", 1.6, now);
        let batch = test_batch();
        let a = running(&mut st, &batch, 1);
        let b = running(&mut st, &batch, 2);
        let c = running(&mut st, &batch, 3);
        // The slow worker computes A, then B (back at +3.2 s); the fast one's twin C (+0.4 s).
        send(&mut st, "slow", 1, &[&a], now);
        send(&mut st, "slow", 2, &[&b], now);
        send(&mut st, "twin", 3, &[&c], now);
        let m = serving(&["m"]);

        // While the engine still streams the batch, only an overdue task is worth a copy.
        assert_eq!(id(speculate(&st, "fast", &m, now)), None);
        let late = now + Duration::from_secs_f64(3.3);
        assert!(speculate(&st, "fast", &m, late).is_some());

        batch.all_queued.store(true, Ordering::Relaxed);
        assert_eq!(id(speculate(&st, "fast", &m, now)), Some("t2".into()));
        assert_eq!(id(speculate(&st, "fast", &serving(&["other"]), now)), None);
        // With B copied (back from the fast worker at +0.4 s), its next call would be back at
        // +0.8 s: A (+1.6 s) is still worth it; C, with its equal twin, never is.
        send(&mut st, "fast", 4, &[&b], now);
        assert_eq!(id(speculate(&st, "fast", &m, now)), Some("t1".into()));
        send(&mut st, "fast", 5, &[&a], now);
        assert_eq!(id(speculate(&st, "fast", &m, now)), None);
        // A worker never copies its own task; tasks with two copies, or done, are left alone.
        assert_eq!(id(speculate(&st, "twin", &m, now)), None);
        lock(&c.st).running_on.clear();
        send(&mut st, "slow", 6, &[&c], now);
        assert_eq!(id(speculate(&st, "twin", &m, now)), Some("t3".into()));
        lock(&c.st).done = true;
        assert_eq!(id(speculate(&st, "twin", &m, now)), None);
    }

    /// A worker computing a call leaves a queued task to a worker with none and a feeder
    /// waiting; not to one without a waiting feeder (its feeders are gone or backing off),
    /// nor to one whose last call failed, nor to one serving other models, nor when it has no
    /// call out itself.
    #[test]
    fn a_busy_workers_second_call_yields_to_an_idle_waiting_worker() {
        let now = Instant::now();
        let mut st = State::default();
        add_worker(&mut st, "busy", 0.4, now);
        add_worker(&mut st, "idle", 0.4, now);
        let batch = test_batch();
        let a = running(&mut st, &batch, 1);
        let m = ModelId {
            name: "m".into(),
            fingerprint: "fp".into(),
        };
        // No one has a call out: nobody yields.
        st.workers.get_mut("idle").expect("idle").waiting = 1;
        assert!(!yields_to_idle(&st, "busy", &m));
        send(&mut st, "busy", 1, &[&a], now);
        assert!(yields_to_idle(&st, "busy", &m));
        assert!(!yields_to_idle(&st, "idle", &m));
        let other = ModelId {
            name: "other".into(),
            fingerprint: String::new(),
        };
        assert!(!yields_to_idle(&st, "busy", &other));
        st.workers.get_mut("idle").expect("idle").waiting = 0;
        assert!(!yields_to_idle(&st, "busy", &m));
        // Nor to one whose last call failed (a worker that died waits too, until its
        // membership ends).
        st.workers.get_mut("idle").expect("idle").waiting = 1;
        st.workers.get_mut("idle").expect("idle").failing = true;
        assert!(!yields_to_idle(&st, "busy", &m));
        st.workers.get_mut("idle").expect("idle").failing = false;
        // An idle worker that is computing a call is not idle.
        st.workers.get_mut("idle").expect("idle").waiting = 1;
        send(&mut st, "idle", 2, &[&a], now);
        assert!(!yields_to_idle(&st, "busy", &m));
    }

    #[test]
    fn models_match_by_name_and_fingerprint_and_retries_wait_longer_each_time() {
        let id = |fp: &str| ModelId {
            name: "m".into(),
            fingerprint: fp.into(),
        };
        assert!(id("fp").served_by(&serving(&["m"])));
        assert!(id("").served_by(&serving(&["x", "m"])));
        assert!(!id("other").served_by(&serving(&["m"])));
        assert!(!id("fp").served_by(&serving(&["x"])));
        let waits: Vec<Duration> = (1..=6).map(retry_wait).collect();
        assert_eq!(waits[0], RETRY_WAIT);
        assert!(waits.windows(2).all(|w| w[1] >= w[0]));
        assert_eq!(retry_wait(40), RETRY_WAIT_MAX);
    }
}
