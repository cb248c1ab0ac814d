//! The render farm seen from outside, across processes: a real `redis-server`, a coordinator
//! with `--token`, `--metrics`, a coordinator-wide `--notify` to a port where nothing listens
//! and `--log-format json`, and a worker process with `--metrics` and JSON logs, on the tiny
//! SDXL model. The test scrapes both `/metrics` endpoints over HTTP, parses them with a strict
//! text-format parser and checks the values move as a job runs; it receives the job's
//! notification on a listener of its own (which fails the first attempt), sees the down one
//! given up without costing the job, and reads every log line as JSON.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{scratch, serial, tessera_bin, tiny_model};
use tessera_harness::{ClusterOptions, LocalCluster};

const TOKEN: &str = "metrics-test-token";
const JOB: &[&str] = &[
    "submit",
    "--model",
    "tiny",
    "--prompt",
    "a harbour",
    "--size",
    "128x128",
    "--steps",
    "12",
    "--seed",
    "5",
];

/// A strict reader of the Prometheus / OpenMetrics text format: every line is a `# HELP`,
/// `# TYPE`, `# UNIT` comment, `# EOF` (last), or a sample `name{labels} value`; a sample's
/// family must have been typed. Returns each sample (`name{sorted labels}`) and its value.
mod prom {
    use std::collections::BTreeMap;

    fn valid_name(n: &str) -> bool {
        let mut c = n.chars();
        c.next()
            .is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
            && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':')
    }

    fn labels(text: &str) -> Result<Vec<(String, String)>, String> {
        let mut out = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let (name, after) = rest.split_once("=\"").ok_or(format!("label in {text:?}"))?;
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c)) => value.push(c),
                        None => return Err(format!("escape in {text:?}")),
                    },
                    Some((i, '"')) => break i,
                    Some((_, c)) => value.push(c),
                    None => return Err(format!("unterminated value in {text:?}")),
                }
            };
            if !valid_name(name) {
                return Err(format!("label name {name:?}"));
            }
            out.push((name.to_string(), value));
            rest = after[end + 1..].trim_start_matches(',');
        }
        out.sort();
        Ok(out)
    }

    fn family_of<'a>(name: &'a str, typed: &BTreeMap<String, String>) -> Option<&'a str> {
        if typed.contains_key(name) {
            return Some(name);
        }
        ["_total", "_bucket", "_sum", "_count", "_created"]
            .iter()
            .filter_map(|s| name.strip_suffix(s))
            .find(|f| typed.contains_key(*f))
    }

    pub fn parse(text: &str) -> Result<BTreeMap<String, f64>, String> {
        let mut typed = BTreeMap::new();
        let mut samples = BTreeMap::new();
        let mut ended = false;
        for line in text.lines() {
            if ended {
                return Err(format!("{line:?} after # EOF"));
            }
            if line == "# EOF" {
                ended = true;
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').ok_or(format!("{line:?}"))?;
                let kinds = [
                    "counter",
                    "gauge",
                    "histogram",
                    "summary",
                    "unknown",
                    "info",
                ];
                if !valid_name(name) || !kinds.contains(&kind) {
                    return Err(format!("bad TYPE line {line:?}"));
                }
                typed.insert(name.to_string(), kind.to_string());
            } else if line.starts_with("# HELP ") || line.starts_with("# UNIT ") {
            } else {
                let (series, value) = sample(line)?;
                let name = series.split('{').next().unwrap_or_default();
                if family_of(name, &typed).is_none() {
                    return Err(format!("sample {name} of no TYPE"));
                }
                samples.insert(series, value);
            }
        }
        if !ended {
            return Err("no # EOF".into());
        }
        Ok(samples)
    }

    fn sample(line: &str) -> Result<(String, f64), String> {
        let (series, value) = match line.find('{') {
            Some(open) => {
                let close = line.rfind('}').ok_or(format!("{line:?}"))?;
                let ls = labels(&line[open + 1..close])?;
                let shown: Vec<String> = ls.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
                let series = format!("{}{{{}}}", &line[..open], shown.join(","));
                (series, line[close + 1..].trim())
            }
            None => {
                let (n, v) = line.split_once(' ').ok_or(format!("{line:?}"))?;
                (n.to_string(), v.trim())
            }
        };
        let name = series.split('{').next().unwrap_or_default();
        if !valid_name(name) {
            return Err(format!("metric name {name:?}"));
        }
        let number = value.split_whitespace().next().unwrap_or_default();
        let v = match number {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            n => n
                .parse()
                .map_err(|e| format!("value {n:?} in {line:?}: {e}"))?,
        };
        Ok((series, v))
    }
}

/// One HTTP/1.1 GET; the status code and body.
fn http_get(addr: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("{addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    (code, body)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        body = &rest[n + 2..];
    }
    out
}

fn scrape(addr: &str, token: Option<&str>) -> BTreeMap<String, f64> {
    let (code, body) = http_get(addr, "/metrics", token);
    assert_eq!(code, 200, "{body}");
    prom::parse(&body).unwrap_or_else(|e| panic!("{e}\n{body}"))
}

fn value(samples: &BTreeMap<String, f64>, series: &str) -> f64 {
    samples.get(series).copied().unwrap_or(0.0)
}

/// The sum of every series of `name` (all label sets).
fn total(samples: &BTreeMap<String, f64>, name: &str) -> f64 {
    samples
        .iter()
        .filter(|(k, _)| k.as_str() == name || k.starts_with(&format!("{name}{{")))
        .map(|(_, v)| v)
        .sum()
}

/// The `HOST:PORT` a role printed for its metrics in `log`.
fn metrics_addr(log: &str) -> Option<String> {
    let at = log.find("metrics on http://")? + "metrics on http://".len();
    let rest = &log[at..];
    Some(rest[..rest.find("/metrics")?].to_string())
}

/// A webhook receiver: answers 503 to the first POST and 200 to the others, keeping bodies.
struct Hook {
    addr: String,
    bodies: Arc<Mutex<Vec<String>>>,
    attempts: Arc<Mutex<u32>>,
}

impl Hook {
    fn start() -> Hook {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (bodies, attempts) = (Arc::new(Mutex::new(Vec::new())), Arc::new(Mutex::new(0)));
        let (b, a) = (bodies.clone(), attempts.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let body = read_request(&conn);
                let mut n = a.lock().unwrap();
                *n += 1;
                let status = if *n == 1 {
                    "503 Service Unavailable"
                } else {
                    "200 OK"
                };
                if *n > 1 {
                    b.lock().unwrap().push(body);
                }
                let mut conn = conn;
                let _ = write!(conn, "HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
            }
        });
        Hook {
            addr,
            bodies,
            attempts,
        }
    }

    fn bodies(&self) -> Vec<serde_json::Value> {
        let bodies = self.bodies.lock().unwrap();
        bodies
            .iter()
            .map(|b| serde_json::from_str(b).unwrap())
            .collect()
    }
}

/// A request's body (by its Content-Length).
fn read_request(conn: &TcpStream) -> String {
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(conn);
    let mut length = 0;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; length];
    let _ = reader.read_exact(&mut body);
    String::from_utf8_lossy(&body).into_owned()
}

/// A local port where nothing listens.
fn down_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_until(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < limit, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn start_cluster(dir: &Path, down: u16) -> LocalCluster {
    let flags = [
        "--metrics",
        "127.0.0.1:0",
        "--notify",
        &format!("http://127.0.0.1:{down}/hook"),
        "--notify-attempts",
        "3",
        "--log-format",
        "json",
        "--output-dir",
        &dir.join("images").display().to_string(),
    ];
    let opts = ClusterOptions {
        token: Some(TOKEN.into()),
        coordinator_flags: flags.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let mut cluster =
        LocalCluster::start(Path::new(tessera_bin()), dir, opts).unwrap_or_else(|e| panic!("{e}"));
    let worker_flags: Vec<String> = ["--model-name", "tiny", "--metrics", "127.0.0.1:0"]
        .iter()
        .chain(&["--log-format", "json"])
        .map(|s| s.to_string())
        .collect();
    cluster
        .add_worker(&tiny_model("sdxl-tiny"), &worker_flags)
        .unwrap_or_else(|e| panic!("{e}"));
    cluster.wait_workers(1).unwrap_or_else(|e| panic!("{e}"));
    cluster
}

#[test]
fn metrics_move_as_a_job_runs_notifications_arrive_and_logs_are_json() {
    let _one = serial();
    let dir = scratch("observability");
    let hook = Hook::start();
    let mut cluster = start_cluster(&dir.0, down_port());
    let coordinator = metrics_addr(&cluster.coordinator_log()).expect("coordinator metrics");
    let worker = metrics_addr(&cluster.workers[0].log()).expect("worker metrics");

    // Without the token, /metrics is refused; with it, it parses.
    let (code, body) = http_get(&coordinator, "/metrics", None);
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("Bearer"), "{body}");
    assert_eq!(http_get(&coordinator, "/metrics", Some("wrong")).0, 401);
    let before = scrape(&coordinator, Some(TOKEN));
    assert_eq!(value(&before, "tessera_workers"), 1.0);

    // A notify URL that is not http(s) is refused up front, naming the flag.
    let bad = cluster.client(&[
        "submit",
        "--model",
        "tiny",
        "--prompt",
        "x",
        "--notify",
        "ftp://h/x",
    ]);
    let bad = bad.unwrap_or_else(|e| panic!("{e}"));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success() && stderr.contains("only http:// and https://"),
        "{stderr}"
    );

    let notify = format!("http://{}/hook", hook.addr);
    let mut args = JOB.to_vec();
    args.extend(["--notify", &notify]);
    let id = cluster.client_ok(&args).unwrap_or_else(|e| panic!("{e}"));
    let seen = watch_steps(&cluster, &coordinator, &id);
    assert!(seen.len() >= 3, "steps_total seen only as {seen:?}");

    let after = scrape(&coordinator, Some(TOKEN));
    check_coordinator_moved(&before, &after);
    check_worker_metrics(&scrape(&worker, None));
    for (role, addr, token) in [
        ("coordinator", &coordinator, Some(TOKEN)),
        ("worker", &worker, None),
    ] {
        let body = http_get(addr, "/metrics", token).1;
        eprintln!(
            "{role} /metrics: {} bytes, {} lines",
            body.len(),
            body.lines().count()
        );
    }

    // The job's own hook: retried after its 503, then delivered once, with the job's end.
    wait_until("the notification", Duration::from_secs(20), || {
        !hook.bodies().is_empty()
    });
    let message = &hook.bodies()[0];
    assert_eq!(message["job_id"], id.as_str());
    assert_eq!(message["state"], "succeeded");
    assert!(
        message["elapsed_seconds"].as_f64().is_some_and(|s| s > 0.0),
        "{message}"
    );
    assert!(
        message["summary"]
            .as_str()
            .is_some_and(|s| s.contains("128x128")),
        "{message}"
    );
    assert!(*hook.attempts.lock().unwrap() >= 2);

    // The coordinator-wide hook is down: three attempts, given up, the job unharmed.
    wait_until(
        "the down hook to be given up",
        Duration::from_secs(20),
        || {
            cluster
                .coordinator_log()
                .contains("not delivered after 3 attempts")
        },
    );
    let done = scrape(&coordinator, Some(TOKEN));
    assert!(value(&done, r#"tessera_notifications_total{outcome="failed"}"#) >= 1.0);
    assert!(value(&done, r#"tessera_notifications_total{outcome="delivered"}"#) >= 1.0);

    // Cancelling a queued-or-running job tells the hook too.
    let slow_job = [
        "submit", "--model", "tiny", "--prompt", "slow", "--size", "128x128", "--steps", "400",
        "--notify", &notify,
    ];
    let slow = cluster.client_ok(&slow_job);
    let slow = slow.unwrap_or_else(|e| panic!("{e}"));
    cluster
        .client_ok(&["cancel", &slow])
        .unwrap_or_else(|e| panic!("{e}"));
    wait_until("the cancel notification", Duration::from_secs(20), || {
        hook.bodies()
            .iter()
            .any(|m| m["job_id"] == slow.as_str() && m["state"] == "cancelled")
    });

    // The URL lives in the job's record: a coordinator restarted mid-job still tells it.
    let resumed_job = [
        "submit", "--model", "tiny", "--prompt", "resumed", "--size", "128x128", "--steps", "80",
        "--notify", &notify,
    ];
    let resumed = cluster
        .client_ok(&resumed_job)
        .unwrap_or_else(|e| panic!("{e}"));
    // Killed once a few steps are checkpointed, so the next coordinator resumes it.
    wait_until("the job's third step", Duration::from_secs(30), || {
        let status = cluster
            .client_ok(&["status", &resumed, "--json"])
            .unwrap_or_default();
        let json: serde_json::Value = serde_json::from_str(&status).unwrap_or_default();
        assert_ne!(
            json["state"], "succeeded",
            "the job ended before the restart"
        );
        json["progress"]["step"].as_u64().is_some_and(|s| s >= 3)
    });
    cluster.kill_coordinator();
    cluster
        .start_coordinator()
        .unwrap_or_else(|e| panic!("{e}"));
    wait_until(
        "the resumed job's notification",
        Duration::from_secs(60),
        || {
            hook.bodies()
                .iter()
                .any(|m| m["job_id"] == resumed.as_str() && m["state"] == "succeeded")
        },
    );
    let status = cluster.client_ok(&["status", &resumed, "--json"]);
    let status: serde_json::Value = serde_json::from_str(&status.unwrap_or_default()).unwrap();
    assert!(status["resumed_from"].is_object(), "not resumed: {status}");

    check_json_logs("coordinator", &cluster.coordinator_log(), "succeeded");
    check_json_logs("worker", &cluster.workers[0].log(), "serving model");
}

/// Scrapes while job `id` runs; the distinct values of `tessera_steps_total` seen.
fn watch_steps(cluster: &LocalCluster, addr: &str, id: &str) -> Vec<f64> {
    let mut seen: Vec<f64> = Vec::new();
    let start = Instant::now();
    loop {
        let steps = value(&scrape(addr, Some(TOKEN)), "tessera_steps_total");
        if seen.last() != Some(&steps) {
            seen.push(steps);
        }
        let status = cluster
            .client_ok(&["status", id, "--json"])
            .unwrap_or_else(|e| panic!("{e}"));
        let json: serde_json::Value = serde_json::from_str(&status).unwrap();
        match json["state"].as_str() {
            Some("succeeded") => return seen,
            Some("failed" | "cancelled") => panic!("{status}\n{}", cluster.logs()),
            _ => {}
        }
        assert!(
            start.elapsed() < Duration::from_secs(40),
            "{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn check_coordinator_moved(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) {
    let grew = |name: &str| {
        assert!(
            total(after, name) > total(before, name),
            "{name}: {} then {}",
            total(before, name),
            total(after, name)
        )
    };
    for name in [
        "tessera_steps_total",
        "tessera_evaluations_total",
        "tessera_jobs_submitted_total",
        "tessera_step_duration_seconds_count",
        "tessera_step_critical_path_seconds_count",
        "tessera_store_operation_duration_seconds_count",
        "tessera_store_written_bytes_total",
        "tessera_store_read_bytes_total",
        "tessera_tasks_completed_total",
        "tessera_pool_worker_evaluations_total",
        "tessera_pool_worker_busy_seconds_total",
    ] {
        grew(name);
    }
    let succeeded = r#"tessera_jobs_finished_total{state="succeeded"}"#;
    assert_eq!(value(after, succeeded), 1.0);
    // The job's 12 steps, and a step's seconds within the histogram's sum.
    assert!(value(after, "tessera_steps_total") >= 12.0);
    assert!(value(after, "tessera_step_duration_seconds_sum") > 0.0);
}

fn check_worker_metrics(w: &BTreeMap<String, f64>) {
    assert!(
        value(w, "tessera_worker_evaluations_total") >= 12.0,
        "{w:?}"
    );
    assert!(value(w, "tessera_worker_busy_seconds_total") > 0.0, "{w:?}");
    let denoised = r#"tessera_worker_tasks_total{kind="denoise",outcome="ok"}"#;
    assert!(value(w, denoised) >= 1.0, "{w:?}");
    assert!(value(w, "tessera_worker_task_duration_seconds_count") >= 1.0);
    // A CPU worker reports no GPU memory rather than a made-up zero.
    assert!(!w.keys().any(|k| k.contains("gpu_memory")), "{w:?}");
}

/// Every line of a role's log is one JSON object, and the status lines are among them.
fn check_json_logs(role: &str, log: &str, status: &str) {
    let mut messages = Vec::new();
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("{role} logged a line that is not JSON ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
        messages.push(v["fields"]["message"].as_str().unwrap_or("").to_string());
    }
    assert!(
        messages.iter().any(|m| m.contains(status)),
        "{role}: no {status:?} in {messages:?}"
    );
}
