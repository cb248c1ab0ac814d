//! `tessera bench dashboard`: the dashboard under a farm's load — N jobs in the store (queued
//! by `tessera batch`, some running, most waiting) and M simulated workers (benchmark
//! doubles) — measured in a real headless Chromium: the time until the first page of jobs is
//! on screen and until the first live update (workers, running jobs) is drawn, from the start
//! of navigation, with the bytes of the page, its files, one page of the job list and one
//! event.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use tessera_harness::{ClusterOptions, LocalCluster};

use super::browser::Browser;
use super::{io, sdxl_geometry_model, BenchError, Machine, Report, Result, Scratch, Table};

const TOKEN: &str = "bench-dashboard-token";

#[derive(Debug, Clone)]
pub struct DashboardOptions {
    pub jobs: usize,
    pub workers: usize,
    /// The simulated workers' ms per evaluation (slow enough that most jobs stay queued).
    pub eval_ms: f64,
    /// Page loads timed (after one warm-up).
    pub loads: usize,
}

/// One timed page load, ms from the start of navigation.
#[derive(Debug, Clone, Copy)]
pub struct PageLoad {
    pub dom_ms: f64,
    pub jobs_ms: f64,
    pub live_ms: f64,
}

fn setup(msg: impl std::fmt::Display) -> BenchError {
    BenchError::Setup(msg.to_string())
}

/// `GET path` with the token; the status line's code and the body's bytes (up to the first
/// server-sent event for a stream).
fn get(port: u16, path: &str) -> Result<(u16, Vec<u8>, f64)> {
    let started = Instant::now();
    let mut s =
        TcpStream::connect(("127.0.0.1", port)).map_err(io("connecting to the dashboard"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(io("setting a timeout"))?;
    let req =
        format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n");
    s.write_all(req.as_bytes())
        .map_err(io("sending a request"))?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        let n = s.read(&mut buf).map_err(io(format!("reading {path}")))?;
        raw.extend_from_slice(&buf[..n]);
        let event_done = path.contains("events")
            && raw.windows(11).any(|w| w == b"event: tick")
            && raw.ends_with(b"\n\n");
        if n == 0 || event_done {
            break;
        }
    }
    let ms = started.elapsed().as_secs_f64() * 1e3;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(raw.len(), |i| i + 4);
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((code, raw[split..].to_vec(), ms))
}

/// A loopback cluster with the dashboard on `port`, `workers` doubles and `jobs` queued jobs.
fn farm(dir: &Path, opts: &DashboardOptions, port: u16) -> Result<LocalCluster> {
    let bin = std::env::current_exe().map_err(io("finding the tessera binary"))?;
    let cluster_opts = ClusterOptions {
        token: Some(TOKEN.into()),
        coordinator_flags: vec!["--http".into(), format!("127.0.0.1:{port}")],
        ..Default::default()
    };
    let mut cluster = LocalCluster::start(&bin, dir, cluster_opts)?;
    let model = sdxl_geometry_model(dir)?;
    eprintln!("starting {} simulated workers", opts.workers);
    super::cluster::add_workers(&mut cluster, &model, opts.workers, Some(opts.eval_ms))?;
    let prompts: String = (0..opts.jobs)
        .map(|i| format!("bench job {i}: a harbour at dawn, oil painting\n"))
        .collect();
    let file = dir.join("prompts.txt");
    std::fs::write(&file, prompts).map_err(io(format!("writing {}", file.display())))?;
    eprintln!("queueing {} jobs", opts.jobs);
    let file = file.display().to_string();
    let args = [
        "batch",
        &file,
        "--model",
        "sdxl-geometry",
        "--method",
        "single",
        "--steps",
        "4",
    ];
    cluster.client_ok(&args)?;
    Ok(cluster)
}

/// Logs the browser in (the login form, as a person would).
fn log_in(b: &mut Browser, url: &str) -> Result<()> {
    let err = |e: super::browser::BrowserError| setup(e);
    b.navigate(url).map_err(err)?;
    b.wait_for(
        "the login form",
        "!!document.getElementById('token')",
        Duration::from_secs(30),
    )
    .map_err(err)?;
    b.eval("document.getElementById('token').focus()")
        .map_err(err)?;
    b.type_text(TOKEN).map_err(err)?;
    b.eval("document.querySelector('#login button').click()")
        .map_err(err)?;
    b.wait_for(
        "the dashboard",
        "!!document.getElementById('jobs')",
        Duration::from_secs(30),
    )
    .map_err(err)?;
    Ok(())
}

/// One load of the dashboard, timed by the page's own performance marks.
fn load(b: &mut Browser, url: &str, workers: usize) -> Result<PageLoad> {
    let err = |e: super::browser::BrowserError| setup(e);
    b.navigate(url).map_err(err)?;
    let ready = format!(
        "performance.getEntriesByName('tessera-jobs').length > 0 && \
         performance.getEntriesByName('tessera-live').length > 0 && \
         document.querySelectorAll('#workers tr[data-worker]').length >= {workers}"
    );
    b.wait_for("the first render", &ready, Duration::from_secs(60))
        .map_err(err)?;
    let v = b
        .eval(
            "(() => { const m = (n) => performance.getEntriesByName(n)[0].startTime; \
             const nav = performance.getEntriesByType('navigation')[0]; \
             return [nav.domContentLoadedEventEnd, m('tessera-jobs'), m('tessera-live')]; })()",
        )
        .map_err(err)?;
    let at = |i: usize| v[i].as_f64().unwrap_or(f64::NAN);
    Ok(PageLoad {
        dom_ms: at(0),
        jobs_ms: at(1),
        live_ms: at(2),
    })
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs.get(xs.len() / 2).copied().unwrap_or(f64::NAN)
}

pub fn run(opts: &DashboardOptions, command: String) -> Result<(Vec<PageLoad>, Report)> {
    let machine = Machine::probe();
    let scratch = Scratch::new("bench-dashboard")?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(io("finding a free port"))?;
    let cluster = farm(&scratch.0, opts, port)?;
    let url = format!("http://127.0.0.1:{port}/");
    let mut b = Browser::start(1280, 1000).map_err(setup)?;
    log_in(&mut b, &url)?;
    load(&mut b, &url, opts.workers)?;
    let loads = (0..opts.loads)
        .map(|_| load(&mut b, &url, opts.workers))
        .collect::<Result<Vec<_>>>()?;
    let sizes = payloads(port)?;
    drop(cluster);
    Ok((
        loads.clone(),
        report(opts, &loads, &sizes, machine, command),
    ))
}

/// Bytes and answer time of what the page loads, fetched as the page does.
fn payloads(port: u16) -> Result<Vec<(String, usize, f64)>> {
    let paths = [
        ("page (/)", "/"),
        ("app.js + viewer.js + style.css", ""),
        (
            "jobs, one page of 50",
            "/api/jobs?view=all&page=0&per_page=50",
        ),
        (
            "jobs, last page of 50",
            "/api/jobs?view=all&page=19&per_page=50",
        ),
        (
            "gallery page (scans every record)",
            "/api/jobs?view=finished&page=0&per_page=24",
        ),
        ("workers", "/api/workers"),
        ("one live event (tick)", "/api/events"),
    ];
    let mut out = Vec::new();
    for (name, path) in paths {
        let (bytes, ms) = if path.is_empty() {
            let mut total = (0, 0.0);
            for p in ["/app.js", "/viewer.js", "/style.css"] {
                let (_, body, ms) = get(port, p)?;
                total = (total.0 + body.len(), total.1 + ms);
            }
            total
        } else {
            let (code, body, ms) = get(port, path)?;
            if code != 200 {
                return Err(setup(format!(
                    "{path}: HTTP {code}: {}",
                    String::from_utf8_lossy(&body)
                )));
            }
            (body.len(), ms)
        };
        out.push((name.to_string(), bytes, ms));
    }
    Ok(out)
}

fn report(
    opts: &DashboardOptions,
    loads: &[PageLoad],
    sizes: &[(String, usize, f64)],
    machine: Machine,
    command: String,
) -> Report {
    let mut times = Table::new(&["measure (median of loads)", "ms from navigation start"]);
    let pick = |f: fn(&PageLoad) -> f64| median(loads.iter().map(f).collect());
    times.row(vec![
        "DOM ready".into(),
        format!("{:.0}", pick(|l| l.dom_ms)),
    ]);
    times.row(vec![
        "first page of jobs drawn".into(),
        format!("{:.0}", pick(|l| l.jobs_ms)),
    ]);
    times.row(vec![
        "first live update drawn (workers, running jobs)".into(),
        format!("{:.0}", pick(|l| l.live_ms)),
    ]);
    let mut bytes = Table::new(&["payload", "bytes", "answer ms"]);
    for (name, n, ms) in sizes {
        bytes.row(vec![name.clone(), n.to_string(), format!("{ms:.0}")]);
    }
    Report {
        title: format!(
            "bench dashboard: {} jobs, {} simulated workers, headless Chromium",
            opts.jobs, opts.workers
        ),
        command,
        machine,
        tables: vec![times, bytes],
        notes: vec![
            format!(
                "{} timed page loads after one warm-up, each until the first page of jobs and \
                 the first server-sent event are drawn (the page's performance marks)",
                loads.len()
            ),
            format!(
                "workers are benchmark doubles (`tessera worker --simulate-eval-ms {}`), jobs \
                 queued by `tessera batch` (single, 4 steps, 1024²); up to 4 run at once, the \
                 rest wait",
                opts.eval_ms
            ),
            "sizes are uncompressed bodies (the dashboard sends no compression)".into(),
        ],
    }
}
