//! Handing tasks to workers. The engine gives a step's tasks to a [`Dispatch`], streamed as
//! their inputs are written, and reads each result from the store as it is reported; the
//! embedded render runs them on in-process worker threads ([`LocalWorkers`]), the cluster
//! over gRPC — the engine cannot tell the difference.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::DType;
use tessera_core::task::Task;
use tessera_store::Store;
use tessera_worker::model::diffusion::DiffusionModel;
use tessera_worker::tasks::{self, TaskError};

#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error(transparent)]
    Task(#[from] TaskError),
    #[error("worker failed: {0}")]
    Worker(String),
    /// The job was cancelled while its tasks were out.
    #[error("the job was cancelled")]
    Cancelled,
}

/// Runs tasks to completion: when `run` returns Ok, every task's outputs are in the store.
/// `done` is called once per finished task, from any thread, in completion order. Calls may
/// overlap (a stage's steps do, at their edge): each runs its own stream of tasks on the
/// same workers.
pub trait Dispatch: Sync {
    /// Runs the tasks, handing each out as soon as `tasks` yields it (it may block), so writing
    /// the later inputs overlaps the workers' computation of the earlier ones. Returns once
    /// the iterator has ended and every task it yielded is done.
    fn run_streamed(
        &self,
        tasks: &mut (dyn Iterator<Item = Task> + Send),
        done: &(dyn Fn(&Task) + Sync),
    ) -> Result<(), DispatchError>;
    /// [`Dispatch::run_streamed`] over tasks known up front.
    fn run(&self, tasks: &[Task], done: &(dyn Fn(&Task) + Sync)) -> Result<(), DispatchError> {
        self.run_streamed(&mut tasks.iter().cloned(), done)
    }
    /// Workers available (for progress and plans).
    fn workers(&self) -> usize;
    /// The dtype to write views in: the one every worker computes in, which each casts its
    /// views to first thing — so sending it is exact, and half the bytes where that is f16.
    /// F32 where the workers differ or do not say.
    fn view_dtype(&self) -> DType {
        DType::F32
    }
}

/// In-process workers: one thread per model handle. On a CPU the handles share one loaded
/// model; with several GPUs there is one model per device.
pub struct LocalWorkers {
    models: Vec<Arc<DiffusionModel>>,
    /// Each in-process worker's stage CA-map, as a worker process keeps its own.
    cache: Vec<tasks::ReadCache>,
    /// Each in-process worker's device turn: one task at a time on it, whichever call (and
    /// so step) the task is from.
    turns: Vec<Mutex<()>>,
    store: Arc<dyn Store>,
}

impl LocalWorkers {
    pub fn new(models: Vec<Arc<DiffusionModel>>, store: Arc<dyn Store>) -> Self {
        assert!(!models.is_empty(), "at least one worker");
        let cache = models.iter().map(|_| tasks::ReadCache::default()).collect();
        let turns = models.iter().map(|_| Mutex::new(())).collect();
        Self {
            models,
            cache,
            turns,
            store,
        }
    }
}

impl Dispatch for LocalWorkers {
    fn run_streamed(
        &self,
        tasks: &mut (dyn Iterator<Item = Task> + Send),
        done: &(dyn Fn(&Task) + Sync),
    ) -> Result<(), DispatchError> {
        let feed = Mutex::new(tasks);
        let failed = AtomicBool::new(false);
        let first_error: Mutex<Option<TaskError>> = Mutex::new(None);
        std::thread::scope(|scope| {
            let workers = self.models.iter().zip(&self.cache).zip(&self.turns);
            for ((model, cache), turn) in workers {
                let (feed, failed, first_error) = (&feed, &failed, &first_error);
                let store = self.store.as_ref();
                scope.spawn(move || loop {
                    if failed.load(Ordering::Relaxed) {
                        return;
                    }
                    // Waits here until the engine has written the next task's input.
                    let next = feed.lock().unwrap_or_else(|p| p.into_inner()).next();
                    let Some(task) = next else { return };
                    match tasks::execute(tasks::Backend::Model(model), store, cache, &task, turn) {
                        Ok(_) => done(&task),
                        Err(e) => {
                            failed.store(true, Ordering::Relaxed);
                            first_error
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .get_or_insert(e);
                            return;
                        }
                    }
                });
            }
        });
        match first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    fn workers(&self) -> usize {
        self.models.len()
    }

    fn view_dtype(&self) -> DType {
        let first = self.models[0].dtype;
        if self.models.iter().all(|m| m.dtype == first) {
            first
        } else {
            DType::F32
        }
    }
}
