//! Handing tasks to workers. The engine gives a step's tasks to a [`Dispatch`] and reads the
//! results from the store once it returns; the embedded render runs them on in-process worker
//! threads ([`LocalWorkers`]), the cluster over gRPC — the engine cannot tell the difference.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tessera_common::store::Store;
use tessera_common::task::Task;
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
/// `done` is called once per finished task, from any thread, in completion order.
pub trait Dispatch: Sync {
    fn run(&self, tasks: &[Task], done: &(dyn Fn(&Task) + Sync)) -> Result<(), DispatchError>;
    /// Workers available (for progress and plans).
    fn workers(&self) -> usize;
}

/// In-process workers: one thread per model handle. On a CPU the handles share one loaded
/// model; with several GPUs there is one model per device.
pub struct LocalWorkers {
    models: Vec<Arc<DiffusionModel>>,
    store: Arc<dyn Store>,
}

impl LocalWorkers {
    pub fn new(models: Vec<Arc<DiffusionModel>>, store: Arc<dyn Store>) -> Self {
        assert!(!models.is_empty(), "at least one worker");
        Self { models, store }
    }
}

impl Dispatch for LocalWorkers {
    fn run(&self, tasks: &[Task], done: &(dyn Fn(&Task) + Sync)) -> Result<(), DispatchError> {
        let next = AtomicUsize::new(0);
        let failed = AtomicBool::new(false);
        let first_error: Mutex<Option<TaskError>> = Mutex::new(None);
        let threads = self.models.len().min(tasks.len());
        std::thread::scope(|scope| {
            for model in self.models.iter().take(threads) {
                let (next, failed, first_error) = (&next, &failed, &first_error);
                let store = self.store.as_ref();
                scope.spawn(move || loop {
                    if failed.load(Ordering::Relaxed) {
                        return;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(task) = tasks.get(i) else { return };
                    match tasks::execute(model, store, task) {
                        Ok(()) => done(task),
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
}
