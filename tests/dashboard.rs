//! The dashboard in a real browser: Redis, a coordinator with `--http` and `--token`, two
//! workers on the tiny SDXL model, and a headless Chromium (Debian's `chromium`, which
//! tests/run.sh installs) driven through the DevTools protocol. It logs in, sees both workers
//! and a running job's progress advance, cancels that job from the page, and opens a finished
//! image in the Deep Zoom viewer; without the token only the login page is served.
//! Screenshots go to `$TESSERA_DASHBOARD_SHOTS` when set (docs/ holds the committed ones).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{scratch, tessera_bin, tiny_model, CASCADE};
use tessera_coordinator::bench::browser::Browser;
use tessera_harness::{ClusterOptions, LocalCluster};

const TOKEN: &str = "dashboard-test-token";

/// A plain HTTP/1.1 request; the status and the body.
fn http(port: u16, method: &str, path: &str, headers: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the dashboard");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{headers}\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, out)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

/// Without the token: the login page at `/`, 401 everywhere else.
fn only_the_login_page_without_the_token(port: u16) {
    let (status, body) = http(port, "GET", "/", "", "");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("id=\"login\"") && !body.contains("id=\"jobs\""),
        "{body}"
    );
    for path in [
        "/app.js",
        "/viewer.js",
        "/api/jobs",
        "/api/workers",
        "/api/events",
    ] {
        let (status, body) = http(port, "GET", path, "", "");
        assert_eq!(status, 401, "{path}: {body}");
    }
    let (status, _) = http(
        port,
        "GET",
        "/api/jobs",
        "Authorization: Bearer wrong\r\n",
        "",
    );
    assert_eq!(status, 401);
    let (status, _) = http(port, "POST", "/login", "", "{\"token\":\"wrong\"}");
    assert_eq!(status, 401);
    // The login form posted by a browser without the page's script: the token in the body,
    // never in an address; the right one is sent on to the dashboard with the cookie.
    let form = "Content-Type: application/x-www-form-urlencoded\r\n";
    let (status, _) = http(port, "POST", "/login", form, "token=wrong");
    assert_eq!(status, 401);
    let (status, answer) = http(port, "POST", "/login", form, &format!("token={TOKEN}"));
    assert_eq!(status, 303, "{answer}");
    let answer = answer.to_ascii_lowercase();
    assert!(
        answer.contains("\r\nlocation: /\r\n") && answer.contains("set-cookie: tessera_dashboard="),
        "{answer}"
    );
    let cancel = "/api/jobs/abc/cancel";
    let (status, _) = http(port, "POST", cancel, "X-Tessera-Dashboard: 1\r\n", "{}");
    assert_eq!(status, 401);
    // With the token but without the page's header, a change is refused (another site's form).
    let bearer = format!("Authorization: Bearer {TOKEN}\r\n");
    let (status, _) = http(port, "POST", cancel, &bearer, "{}");
    assert_eq!(status, 403);
    let (status, body) = http(port, "GET", "/api/jobs?per_page=5", &bearer, "");
    assert_eq!(status, 200, "{body}");
}

/// The queued job's priority changed from the page; a submission from the form refused with
/// the message `tessera submit` gives for the same flags.
fn change_priority_and_submit(b: &mut Browser, cluster: &LocalCluster, waiting: &str) {
    let input = format!("document.querySelector('#jobs input.priority[data-job=\"{waiting}\"]')");
    b.wait_for(
        "the priority field",
        &format!("!!{input}"),
        Duration::from_secs(20),
    )
    .unwrap();
    b.eval(&format!(
        "{input}.value = '7'; {input}.dispatchEvent(new Event('change'))"
    ))
    .unwrap();
    let started = Instant::now();
    loop {
        let out = cluster.client_ok(&["status", waiting, "--json"]).unwrap();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        if v["priority"] == 7 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "priority not set: {out}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let cli = cluster
        .client(&["submit", "--model", "tiny", "--prompt", "x", "--steps", "0"])
        .unwrap();
    let cli = String::from_utf8_lossy(&cli.stderr).to_string();
    b.eval(
        "(() => { const f = document.getElementById('submit'); f.model.value = 'tiny'; \
         f.prompt.value = 'x'; f.steps.value = '0'; f.requestSubmit(); })()",
    )
    .unwrap();
    let shown = b
        .wait_for(
            "the form's refusal",
            "document.getElementById('submit-result').className.includes('error') && \
             document.getElementById('submit-result').textContent",
            Duration::from_secs(20),
        )
        .unwrap();
    let shown = shown.as_str().unwrap_or_default();
    assert!(
        shown.contains("--steps") && cli.contains(shown),
        "page: {shown:?}, cli: {cli:?}"
    );
}

/// Waits for the element `selector` (a JavaScript expression) and clicks it `times` times.
fn click(b: &mut Browser, what: &str, selector: &str, times: usize) {
    b.wait_for(what, &format!("!!{selector}"), Duration::from_secs(20))
        .unwrap();
    for _ in 0..times {
        b.eval(&format!("{selector}.click()")).unwrap();
    }
}

/// Requeue is for failed jobs and priority for queued ones: a finished job gets 409 and why.
fn actions_refused_where_they_do_not_apply(port: u16, finished: &str) {
    let headers = format!("Authorization: Bearer {TOKEN}\r\nX-Tessera-Dashboard: 1\r\n");
    let path = format!("/api/jobs/{finished}/requeue");
    let (status, body) = http(port, "POST", &path, &headers, "{}");
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("only a failed job can be requeued"), "{body}");
    let path = format!("/api/jobs/{finished}/priority");
    let (status, body) = http(port, "POST", &path, &headers, "{\"priority\": 3}");
    assert_eq!(status, 409, "{body}");
    assert!(
        body.contains("only a queued job's priority can change"),
        "{body}"
    );
    let (status, body) = http(port, "POST", &path, &headers, "{\"priority\": 5000}");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("--priority 5000 is out of range"), "{body}");
}

fn save(name: &str, png: &[u8]) {
    if let Some(dir) = std::env::var_os("TESSERA_DASHBOARD_SHOTS") {
        let path = Path::new(&dir).join(name);
        std::fs::write(&path, png).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}

fn submit(cluster: &LocalCluster, args: &[&str]) -> String {
    let mut all = vec!["submit", "--model", "tiny"];
    all.extend_from_slice(args);
    cluster.client_ok(&all).unwrap_or_else(|e| panic!("{e}"))
}

fn state_of(cluster: &LocalCluster, id: &str) -> String {
    let out = cluster
        .client_ok(&["status", id, "--json"])
        .unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    v["state"].as_str().unwrap_or_default().to_string()
}

#[test]
fn the_dashboard_works_in_a_real_browser() {
    let dir = scratch("dashboard");
    let port = free_port();
    let opts = ClusterOptions {
        token: Some(TOKEN.into()),
        coordinator_flags: vec![
            "--http".into(),
            format!("127.0.0.1:{port}"),
            "--output-dir".into(),
            dir.path("images").display().to_string(),
            // One job at a time, so that a later job waits in the queue.
            "--max-jobs".into(),
            "1".into(),
        ],
        ..Default::default()
    };
    let mut cluster = LocalCluster::start(Path::new(tessera_bin()), &dir.0, opts)
        .unwrap_or_else(|e| panic!("{e}"));
    let model = tiny_model("sdxl-tiny");
    for _ in 0..2 {
        let name = ["--model-name".to_string(), "tiny".to_string()];
        cluster.add_worker(&model, &name).unwrap();
    }
    cluster.wait_workers(2).unwrap_or_else(|e| panic!("{e}"));
    only_the_login_page_without_the_token(port);

    // A small finished image with a Deep Zoom pyramid, for the gallery and the viewer.
    let small = submit(
        &cluster,
        &[
            "--prompt",
            "a small harbour",
            "--size",
            "256x256",
            "--method",
            "single",
            "--steps",
            "2",
            "--seed",
            "3",
            "--dzi",
            "always",
        ],
    );
    let started = Instant::now();
    while state_of(&cluster, &small) != "succeeded" {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    actions_refused_where_they_do_not_apply(port, &small);
    // A long job to watch and then cancel.
    let flags: Vec<&str> = CASCADE
        .iter()
        .map(|f| if *f == "2,3,4" { "20,20,20" } else { f })
        .collect();
    let long = submit(&cluster, &flags);

    // A job that waits behind it, to move up the queue from the page.
    let waiting = submit(
        &cluster,
        &[
            "--prompt",
            "a quiet bay",
            "--size",
            "256x256",
            "--method",
            "single",
            "--steps",
            "2",
            "--seed",
            "4",
            "--by",
            "night shift",
        ],
    );

    let mut b = Browser::start(1280, 1400).unwrap_or_else(|e| panic!("{e}"));
    let url = format!("http://127.0.0.1:{port}/");
    b.navigate(&url).unwrap();
    // The form and its (deferred) script: a click before the script has attached its handler
    // would submit the form natively and land on the login page again.
    b.wait_for(
        "the login form",
        "!!document.getElementById('token') && document.readyState === 'complete'",
        Duration::from_secs(20),
    )
    .unwrap();
    b.eval("document.getElementById('token').focus()").unwrap();
    b.type_text(TOKEN).unwrap();
    b.eval("document.querySelector('#login button').click()")
        .unwrap();
    let workers = "document.querySelectorAll('#workers tr[data-worker]').length === 2";
    b.wait_for("both workers", workers, Duration::from_secs(20))
        .unwrap();
    // Who submitted the waiting job, as its client said (`--by`).
    let by = format!(
        "(document.querySelector('#jobs tr[data-job=\"{waiting}\"]') || {{}}).textContent \
         ?.includes('by night shift') === true"
    );
    b.wait_for(
        "who submitted the waiting job",
        &by,
        Duration::from_secs(20),
    )
    .unwrap();

    // The running job's progress advances on the page (pushed by the event stream).
    let views = format!(
        "(() => {{ const e = document.querySelector('[data-running=\"{long}\"] .views'); \
         const m = e && e.textContent.match(/views (\\d+)\\//); return m ? Number(m[1]) : 0 }})()"
    );
    let first = b
        .wait_for(
            "the long job's first views",
            &views,
            Duration::from_secs(60),
        )
        .unwrap()
        .as_f64()
        .unwrap_or(0.0);
    let advanced = format!("{views} > {first}");
    b.wait_for(
        "its progress to advance",
        &advanced,
        Duration::from_secs(60),
    )
    .unwrap();
    b.wait_for(
        "its preview",
        &format!("document.querySelector('[data-running=\"{long}\"] img').naturalWidth > 0"),
        Duration::from_secs(30),
    )
    .unwrap();
    save("dashboard.png", &b.screenshot().unwrap());
    change_priority_and_submit(&mut b, &cluster, &waiting);

    // Cancel it from the page (the button asks once more) and see its state change.
    let button = format!("document.querySelector('#jobs button.cancel[data-job=\"{long}\"]')");
    click(&mut b, "its cancel button", &button, 2);
    let cancelled = format!(
        "document.querySelector('#jobs tr[data-job=\"{long}\"] td.state')?.textContent === 'cancelled'"
    );
    b.wait_for(
        "the job to show cancelled",
        &cancelled,
        Duration::from_secs(60),
    )
    .unwrap();
    assert_eq!(state_of(&cluster, &long), "cancelled");

    // Open the finished image in the viewer: its tiles load, with its parameters beside.
    let thumb = format!("document.querySelector('a.thumb[data-job=\"{small}\"]')");
    click(&mut b, "the gallery thumbnail", &thumb, 1);
    let tiles = "Number(document.getElementById('viewer-canvas').dataset.tilesLoaded || 0) >= 1";
    b.wait_for("the viewer's tiles", tiles, Duration::from_secs(20))
        .unwrap();
    let params = b
        .eval("document.getElementById('viewer-params').textContent")
        .unwrap();
    assert!(
        params
            .as_str()
            .unwrap_or_default()
            .contains("a small harbour"),
        "{params}"
    );
    let level = b
        .eval("document.getElementById('viewer-canvas').dataset.level")
        .unwrap();
    assert!(level.as_str().is_some_and(|l| !l.is_empty()), "{level}");
    b.eval("document.getElementById('zoom-in').click()")
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    save("dashboard-viewer.png", &b.screenshot().unwrap());
}
