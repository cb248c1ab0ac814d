//! A server role's status lines ("coordinator serving on …", "job … succeeded", "worker …
//! joined"): written to stderr for a person, or, with `--log-format json`, logged as
//! `info` events of the target `tessera::status`, so that every line of stderr is JSON.

use std::sync::atomic::{AtomicBool, Ordering};

static JSON: AtomicBool = AtomicBool::new(false);

/// The tracing target of status lines (on at `info` in the JSON format's default filter).
pub const TARGET: &str = "tessera::status";

/// Status lines become log events from now on (`--log-format json`).
pub fn set_json(on: bool) {
    JSON.store(on, Ordering::Relaxed);
}

/// Writes one status line: see [`status!`](crate::status!).
pub fn say(line: std::fmt::Arguments<'_>) {
    if JSON.load(Ordering::Relaxed) {
        tracing::info!(target: "tessera::status", "{line}");
    } else {
        eprintln!("{line}");
    }
}

/// `status!("job {id} succeeded")`: a status line, as text or as a JSON log event.
#[macro_export]
macro_rules! status {
    ($($arg:tt)*) => {
        $crate::status::say(format_args!($($arg)*))
    };
}
