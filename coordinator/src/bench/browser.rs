//! A headless Chromium driven through the Chrome DevTools Protocol, for the dashboard's test
//! and benchmark: the browser is a real `chromium` process, spoken to over the pipes
//! `--remote-debugging-pipe` opens (fd 3 in, fd 4 out, one JSON message per NUL-terminated
//! record), so no port is opened and no websocket library is needed.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// How long one protocol command may take.
const COMMAND_LIMIT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum BrowserError {
    #[error(
        "no Chromium found (looked for {0}): install Debian's `chromium` package \
         (apt-get install -y chromium) or set TESSERA_CHROMIUM"
    )]
    Missing(String),
    #[error("starting Chromium: {0}")]
    Start(std::io::Error),
    #[error("Chromium: {0}")]
    Protocol(String),
}

/// The Chromium binary: `TESSERA_CHROMIUM`, else the first of the usual names on PATH.
pub fn find_chromium() -> Result<PathBuf, BrowserError> {
    if let Some(p) = std::env::var_os("TESSERA_CHROMIUM") {
        return Ok(PathBuf::from(p));
    }
    let names = ["chromium", "chromium-browser", "google-chrome", "chrome"];
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        for name in names {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    Err(BrowserError::Missing(names.join(", ")))
}

/// A pipe as (read end, write end), both close-on-exec.
fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both are open descriptors owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A headless Chromium with one page open.
pub struct Browser {
    child: Child,
    to: std::fs::File,
    from: Receiver<Value>,
    next_id: u64,
    session: String,
    _profile: tessera_harness::Scratch,
}

impl Browser {
    /// Starts Chromium (window `width`×`height`) and opens a blank page.
    pub fn start(width: u32, height: u32) -> Result<Self, BrowserError> {
        let bin = find_chromium()?;
        let profile = tessera_harness::Scratch::new("chromium-profile")
            .map_err(|e| BrowserError::Protocol(e.to_string()))?;
        let (cmd_read, cmd_write) = pipe().map_err(BrowserError::Start)?;
        let (out_read, out_write) = pipe().map_err(BrowserError::Start)?;
        let child = spawn(&bin, &profile.0, width, height, &cmd_read, &out_write)?;
        drop((cmd_read, out_write));
        let (tx, from) = mpsc::channel();
        let reader = BufReader::new(std::fs::File::from(out_read));
        std::thread::spawn(move || read_messages(reader, tx));
        let mut b = Browser {
            child,
            to: std::fs::File::from(cmd_write),
            from,
            next_id: 0,
            session: String::new(),
            _profile: profile,
        };
        let target = b.call("Target.createTarget", json!({"url": "about:blank"}))?;
        let id = target["targetId"].as_str().unwrap_or_default().to_string();
        let attached = b.call(
            "Target.attachToTarget",
            json!({"targetId": id, "flatten": true}),
        )?;
        b.session = attached["sessionId"]
            .as_str()
            .ok_or_else(|| BrowserError::Protocol(format!("no session: {attached}")))?
            .to_string();
        b.call("Page.enable", json!({}))?;
        b.call("Runtime.enable", json!({}))?;
        Ok(b)
    }

    /// Sends a command (to the page once attached) and waits for its answer.
    pub fn call(&mut self, method: &str, params: Value) -> Result<Value, BrowserError> {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if !self.session.is_empty() {
            msg["sessionId"] = json!(self.session);
        }
        let mut bytes = msg.to_string().into_bytes();
        bytes.push(0);
        self.to
            .write_all(&bytes)
            .map_err(|e| BrowserError::Protocol(format!("{method}: {e}")))?;
        let deadline = Instant::now() + COMMAND_LIMIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let reply = match self.from.recv_timeout(left) {
                Ok(v) => v,
                Err(RecvTimeoutError::Timeout) => {
                    return Err(BrowserError::Protocol(format!("{method}: no answer")))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(BrowserError::Protocol(format!("{method}: Chromium exited")))
                }
            };
            if reply["id"].as_u64() != Some(id) {
                continue;
            }
            if let Some(e) = reply.get("error") {
                return Err(BrowserError::Protocol(format!("{method}: {e}")));
            }
            return Ok(reply["result"].clone());
        }
    }

    pub fn navigate(&mut self, url: &str) -> Result<(), BrowserError> {
        self.call("Page.navigate", json!({"url": url})).map(drop)
    }

    /// The value of a JavaScript expression in the page (promises awaited).
    pub fn eval(&mut self, expression: &str) -> Result<Value, BrowserError> {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
        )?;
        if let Some(e) = r.get("exceptionDetails") {
            return Err(BrowserError::Protocol(format!("{expression}: {e}")));
        }
        Ok(r["result"]["value"].clone())
    }

    /// Evaluates `expression` every 100 ms until it is truthy; its last value, or an error
    /// naming `what` after `limit`.
    pub fn wait_for(
        &mut self,
        what: &str,
        expression: &str,
        limit: Duration,
    ) -> Result<Value, BrowserError> {
        let deadline = Instant::now() + limit;
        loop {
            let v = self.eval(expression).unwrap_or(Value::Null);
            let truthy = !matches!(&v, Value::Null | Value::Bool(false))
                && v.as_str() != Some("")
                && v.as_f64() != Some(0.0);
            if truthy {
                return Ok(v);
            }
            if Instant::now() > deadline {
                return Err(BrowserError::Protocol(format!(
                    "waited {limit:?} for {what} ({expression} was {v})"
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Types text into the focused element, as a keyboard would.
    pub fn type_text(&mut self, text: &str) -> Result<(), BrowserError> {
        self.call("Input.insertText", json!({"text": text}))
            .map(drop)
    }

    /// A PNG of the page as it shows now.
    pub fn screenshot(&mut self) -> Result<Vec<u8>, BrowserError> {
        use base64::Engine as _;
        let r = self.call("Page.captureScreenshot", json!({"format": "png"}))?;
        let data = r["data"].as_str().unwrap_or_default();
        base64::engine::general_purpose::STANDARD
            .decode(data)
            .map_err(|e| BrowserError::Protocol(format!("screenshot: {e}")))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(
    bin: &Path,
    profile: &Path,
    width: u32,
    height: u32,
    cmd_read: &OwnedFd,
    out_write: &OwnedFd,
) -> Result<Child, BrowserError> {
    use std::os::fd::AsRawFd;
    let (r, w) = (cmd_read.as_raw_fd(), out_write.as_raw_fd());
    let mut cmd = Command::new(bin);
    cmd.args([
        "--headless=new",
        "--remote-debugging-pipe",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-gpu",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--mute-audio",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .arg(format!("--window-size={width},{height}"))
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    // Chromium's sandbox needs user namespaces, which a root user in a container lacks.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        cmd.arg("--no-sandbox");
    }
    // SAFETY: only async-signal-safe calls (fcntl, dup2) between fork and exec. The ends are
    // first copied above 10, so that moving them to 3 and 4 cannot overwrite each other.
    unsafe {
        cmd.pre_exec(move || {
            let hr = libc::fcntl(r, libc::F_DUPFD, 10);
            let hw = libc::fcntl(w, libc::F_DUPFD, 10);
            if hr < 0 || hw < 0 || libc::dup2(hr, 3) < 0 || libc::dup2(hw, 4) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.arg("about:blank");
    cmd.spawn().map_err(BrowserError::Start)
}

/// Splits Chromium's output into JSON messages until it closes the pipe.
fn read_messages(mut reader: BufReader<std::fs::File>, tx: mpsc::Sender<Value>) {
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(0, &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                if buf.last() == Some(&0) {
                    buf.pop();
                }
                if let Ok(v) = serde_json::from_slice(&buf) {
                    if tx.send(v).is_err() {
                        return;
                    }
                }
            }
        }
    }
}
