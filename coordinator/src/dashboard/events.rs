//! `GET /api/events`: the page's live feed, as server-sent events. Every half second (and at
//! once after an operator's action) the stream looks at the running jobs, the workers and the
//! queue, and sends a `tick` event when anything changed: the running jobs' progress (the page
//! fetches a job's preview again when its step moved), the workers, the counts, and a list
//! version that tells the page to fetch its page of the job list again.

use std::collections::hash_map::DefaultHasher;
use std::convert::Infallible;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use serde::Serialize;
use tokio::sync::mpsc;

use super::api::{counts, ApiError, Counts};
use super::views::{JobView, WorkerView};
use super::Dash;

const TICK: Duration = Duration::from_millis(500);

#[derive(Serialize, PartialEq)]
struct Tick {
    counts: Counts,
    running: Vec<JobView>,
    workers: Vec<WorkerView>,
    /// Changes when the set of jobs, their states or their order may have changed.
    list_version: u64,
}

pub async fn stream(
    State(dash): State<Arc<Dash>>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(feed(dash, tx));
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx)).keep_alive(KeepAlive::default())
}

/// Sends ticks until the page goes away or the coordinator stops.
async fn feed(dash: Arc<Dash>, tx: mpsc::Sender<Result<Event, Infallible>>) {
    let mut changed = dash.changed.subscribe();
    let mut last = String::new();
    loop {
        let actions = *changed.borrow_and_update();
        match tick(&dash, actions).await {
            Ok(t) => {
                let data = serde_json::to_string(&t).unwrap_or_default();
                if data != last {
                    let event = Event::default().event("tick").data(data.clone());
                    if tx.send(Ok(event)).await.is_err() {
                        return;
                    }
                    last = data;
                }
            }
            Err(e) => tracing::debug!("dashboard events: {e:?}"),
        }
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            r = changed.changed() => if r.is_err() { return },
            _ = dash.leader.stopped() => return,
            _ = tx.closed() => return,
        }
    }
}

async fn tick(dash: &Dash, actions: u64) -> Result<Tick, ApiError> {
    let runner = dash.runner()?;
    let counts = counts(&runner).await?;
    let jobs = Dash::jobs(&runner);
    let mut ids = jobs.running().await?;
    ids.sort();
    let records = jobs.load_many(&ids).await?;
    let running = Dash::view_all(&runner, &records);
    let mut h = DefaultHasher::new();
    (counts.jobs, counts.queued, actions).hash(&mut h);
    for j in &running {
        (&j.id, &j.state, j.images_done).hash(&mut h);
    }
    Ok(Tick {
        counts,
        running,
        workers: dash.worker_views(),
        list_version: h.finish(),
    })
}
