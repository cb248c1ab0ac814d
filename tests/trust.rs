//! Trust and faults across processes (issue 18): each check performs the attack or the fault
//! against a real loopback cluster (`redis-server`, a `tessera coordinator`, `tessera worker`
//! processes) and shows it refused, or survived with nothing lost.
//!
//! - [`security_holds_on_one_cluster`]: one cluster with a client token, a worker token and an
//!   allowed output root part of which is a full disk; the checks run in turn on it (fake
//!   workers, stray callers, `--output-dir` links and a full disk, capacity and queue limits, a
//!   second model under a served name, an idle coordinator's log).
//! - [`faults_end_jobs_with_a_message`]: benchmark-double workers; a task longer than its lease,
//!   and Redis restarted without its data.
//! - [`coordinators_hand_over_cleanly`]: a coordinator with a standby, paused and resumed; then
//!   stopped with SIGTERM while a `watch` is open.
//! - [`tls_settings_never_speak_plaintext`]: no cluster; `--tls-ca` with an `http://` URL.
//! - [`a_tls_coordinator_refuses_a_plaintext_worker_address`]: the same on the
//!   coordinator→worker hop.
//!
//! The tests run one at a time, like tests/cluster.rs.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{read_png, scratch, serial, tessera, tessera_bin, tessera_ok, tiny_model, CASCADE};
use serde_json::Value;
use tessera_harness::{ClusterOptions, LocalCluster, Process};

const CLIENT_TOKEN: &str = "client-secret-0123456789";
const WORKER_TOKEN: &str = "worker-secret-9876543210";

/// The small job of the security checks.
const SMALL: &[&str] = &["--prompt", "a quiet harbour", "--steps", "2", "--seed", "5"];

/// Pixels of `tessera render` of the tiny SDXL model with `flags`.
fn embedded(flags: &[&str]) -> Vec<u8> {
    let dir = scratch("trust-reference");
    let out = dir.path("ref.png");
    let model = tiny_model("sdxl-tiny");
    let mut args = vec!["render", "--model", model.to_str().unwrap()];
    args.extend_from_slice(flags);
    args.extend_from_slice(&["-o", out.to_str().unwrap()]);
    tessera_ok(&args);
    read_png(&out).2
}

fn start(dir: &Path, workers: &[&[&str]], opts: ClusterOptions) -> LocalCluster {
    let mut c =
        LocalCluster::start(Path::new(tessera_bin()), dir, opts).unwrap_or_else(|e| panic!("{e}"));
    for extra in workers {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        c.add_worker(&tiny_model("sdxl-tiny"), &extra)
            .unwrap_or_else(|e| panic!("{e}"));
    }
    c.wait_workers(workers.len())
        .unwrap_or_else(|e| panic!("{e}"));
    c
}

/// A client command against the coordinator at `url`; its output whatever its status.
fn client(c: &LocalCluster, url: &str, args: &[&str]) -> std::process::Output {
    c.client_within(url, args, Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()))
}

fn client_ok(c: &LocalCluster, url: &str, args: &[&str]) -> String {
    let out = client(c, url, args);
    assert!(
        out.status.success(),
        "tessera {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        c.logs()
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn submit(c: &LocalCluster, url: &str, extra: &[&str]) -> String {
    let mut args = vec!["submit"];
    args.extend_from_slice(extra);
    client_ok(c, url, &args)
}

/// `submit --model tiny --prompt x EXTRA…`, whatever its status (a submission to be refused).
fn try_submit(c: &LocalCluster, url: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["submit", "--model", "tiny", "--prompt", "x"];
    args.extend_from_slice(extra);
    client(c, url, &args)
}

fn status(c: &LocalCluster, url: &str, id: &str) -> Value {
    serde_json::from_str(&client_ok(c, url, &["status", id, "--json"])).unwrap()
}

/// Polls the job at `url` until `pred` holds, for at most `limit`.
fn wait_job(
    c: &LocalCluster,
    url: &str,
    id: &str,
    limit: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let s = status(c, url, id);
        if pred(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} did not get there within {limit:?}: {s}\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn ended(s: &Value) -> bool {
    !matches!(s["state"].as_str(), Some("queued" | "running"))
}

fn pixels(c: &LocalCluster, url: &str, id: &str, dir: &Path) -> (Vec<u8>, Vec<(String, String)>) {
    let out = dir.join(format!("{id}.png"));
    client_ok(c, url, &["fetch", id, "-o", out.to_str().unwrap()]);
    let (_, _, px, text) = read_png(&out);
    (px, text)
}

/// Waits up to a minute for `ok` over the cluster's logs.
fn wait_logs(c: &mut LocalCluster, what: &str, ok: impl Fn(&LocalCluster) -> bool) {
    c.wait_for(what, Duration::from_secs(60), ok)
        .unwrap_or_else(|e| panic!("{e}"));
}

/// The worker's address and model fingerprint, from its start line.
fn worker_line(log: &str) -> (String, String) {
    let line = log
        .lines()
        .find(|l| l.contains(" serving model "))
        .unwrap_or_else(|| panic!("no start line in the worker's log:\n{log}"));
    let fingerprint = line
        .split(['(', ')'])
        .find(|p| p.starts_with("sha256:"))
        .expect("a fingerprint")
        .to_string();
    let address = line
        .split_whitespace()
        .find(|w| w.starts_with("http"))
        .expect("an address")
        .to_string();
    (address, fingerprint)
}

/// A worker that never computes anything: it joins with the worker token (an insider), answers
/// every task "done" at once without writing a byte, and records the credential of every call
/// it gets.
mod liar {
    use super::*;
    use tessera_proto::v1::membership_client::MembershipClient;
    use tessera_proto::v1::worker_server::{Worker, WorkerServer};
    use tessera_proto::v1::{
        DescribeRequest, HeartbeatRequest, JoinRequest, ModelDescription, RunTasksRequest,
        RunTasksResponse, TaskResult, WorkerDescription,
    };
    use tonic::{Request, Response, Status};

    #[derive(Clone)]
    pub struct Liar {
        pub desc: WorkerDescription,
        pub call_token: String,
        /// The `authorization` header of every call, in order.
        pub seen: Arc<Mutex<Vec<String>>>,
        pub task_calls: Arc<AtomicUsize>,
    }

    impl Liar {
        fn note<T>(&self, req: &Request<T>) {
            let auth = req
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            self.seen.lock().unwrap().push(auth);
        }

        /// Serves on a free loopback port, claiming to serve "tiny" with `fingerprint`.
        pub async fn start(id: &str, fingerprint: &str) -> Liar {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let address = format!("http://{}", listener.local_addr().unwrap());
            let arch = tessera_worker::model::arch::arch_info(&tiny_model("sdxl-tiny"), 4).unwrap();
            let liar = Liar {
                desc: WorkerDescription {
                    worker_id: id.into(),
                    address,
                    models: vec![ModelDescription {
                        name: "tiny".into(),
                        arch_json: serde_json::to_string(&arch).unwrap(),
                        scheduler_json: serde_json::to_string(&arch.scheduler).unwrap(),
                        latent_channels: arch.latent_channels as u32,
                        dtype: "f32".into(),
                        fingerprint: fingerprint.into(),
                    }],
                    tasks_per_call: 1,
                    ..Default::default()
                },
                call_token: format!("{:064x}", 0x1234_5678_u128),
                seen: Arc::default(),
                task_calls: Arc::default(),
            };
            let server = WorkerServer::new(liar.clone());
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(server)
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
            );
            liar
        }

        /// Joins the coordinator at `url` with `token` and keeps the membership alive (until
        /// the returned task is aborted).
        pub async fn join(
            &self,
            url: &str,
            token: &str,
        ) -> Result<tokio::task::JoinHandle<()>, Status> {
            let bearer: tonic::metadata::MetadataValue<_> =
                format!("Bearer {token}").parse().unwrap();
            let channel = tonic::transport::Endpoint::from_shared(url.to_string())
                .unwrap()
                .connect()
                .await
                .unwrap();
            let mut client =
                MembershipClient::with_interceptor(channel, move |mut r: Request<()>| {
                    r.metadata_mut().insert("authorization", bearer.clone());
                    Ok(r)
                });
            let joined = client
                .join(JoinRequest {
                    worker: Some(self.desc.clone()),
                    call_token: self.call_token.clone(),
                })
                .await?
                .into_inner();
            let beat = HeartbeatRequest {
                worker_id: self.desc.worker_id.clone(),
                session: joined.session,
            };
            Ok(tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    let _ = client.heartbeat(beat.clone()).await;
                }
            }))
        }
    }

    #[tonic::async_trait]
    impl Worker for Liar {
        async fn describe(
            &self,
            req: Request<DescribeRequest>,
        ) -> Result<Response<WorkerDescription>, Status> {
            self.note(&req);
            Ok(Response::new(self.desc.clone()))
        }

        async fn run_tasks(
            &self,
            req: Request<RunTasksRequest>,
        ) -> Result<Response<RunTasksResponse>, Status> {
            self.note(&req);
            self.task_calls.fetch_add(1, Ordering::Relaxed);
            let results = req
                .into_inner()
                .tasks
                .iter()
                .map(|t| {
                    let task: Value = serde_json::from_str(&t.task_json).unwrap();
                    TaskResult {
                        job: task["job"].as_str().unwrap_or("").into(),
                        id: task["id"].as_str().unwrap_or("").into(),
                        ok: true,
                        ..Default::default()
                    }
                })
                .collect();
            Ok(Response::new(RunTasksResponse { results }))
        }
    }
}

/// The prompt-rewriting attack of the issue: an EncodePrompt task for a running job, sent to a
/// worker directly with `token`. Returns the status code the worker answers with.
async fn rewrite_prompt(worker: &str, job: &str, token: Option<&str>) -> tonic::Code {
    use tessera_core::task::{Task, TaskKind};
    use tessera_proto::v1::worker_client::WorkerClient;
    use tessera_proto::v1::{RunTasksRequest, TaskRef};
    let task = Task {
        job: format!("{job}:i0"),
        id: "prompt".into(),
        kind: TaskKind::EncodePrompt {
            prompt: "something else entirely".into(),
            negative_prompt: None,
        },
    };
    let channel = tonic::transport::Endpoint::from_shared(worker.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let bearer: Option<tonic::metadata::MetadataValue<_>> =
        token.map(|t| format!("Bearer {t}").parse().unwrap());
    let mut client = WorkerClient::with_interceptor(channel, move |mut r: tonic::Request<()>| {
        if let Some(b) = &bearer {
            r.metadata_mut().insert("authorization", b.clone());
        }
        Ok(r)
    });
    let request = RunTasksRequest {
        tasks: vec![TaskRef {
            model: "tiny".into(),
            task_json: serde_json::to_string(&task).unwrap(),
        }],
    };
    match client.run_tasks(request).await {
        Ok(_) => tonic::Code::Ok,
        Err(s) => s.code(),
    }
}

/// Writes a worker description into Redis the way workers used to announce themselves.
fn plant_redis_worker(c: &LocalCluster, desc: &tessera_proto::v1::WorkerDescription) {
    use prost::Message;
    let client = redis::Client::open(c.redis.url()).unwrap();
    let mut conn = client.get_connection().unwrap();
    let key = format!("tessera:worker:{}", desc.worker_id);
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg(desc.encode_to_vec())
        .query(&mut conn)
        .unwrap();
}

#[test]
fn security_holds_on_one_cluster() {
    let _one = serial();
    let dir = scratch("trust-security");
    let root = dir.path("allowed");
    std::fs::create_dir_all(&root).unwrap();
    let root = root.canonicalize().unwrap();
    let outside = dir.path("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let full = root.join("full");
    let images = dir.path("images");
    let flags = [
        "--allow-output-dir",
        root.to_str().unwrap(),
        "--output-dir",
        images.to_str().unwrap(),
        "--max-jobs",
        "1",
        "--max-queued",
        "1",
    ];
    let opts = ClusterOptions {
        token: Some(CLIENT_TOKEN.into()),
        worker_token: Some(WORKER_TOKEN.into()),
        coordinator_flags: flags.iter().map(|s| s.to_string()).collect(),
        // A disk that fills up: 16 KiB, smaller than any PNG of these jobs.
        coordinator_tmpfs: Some((full.clone(), 16 << 10)),
        ..Default::default()
    };
    let mut c = start(&dir.0, &[&["--model-name", "tiny"]], opts);
    let url = c.url();
    let want = embedded(SMALL);
    let small = |extra: &[&str]| -> Vec<String> {
        let mut args = vec!["--model", "tiny"];
        args.extend_from_slice(SMALL);
        args.extend_from_slice(extra);
        args.iter().map(|s| s.to_string()).collect()
    };
    let run = |c: &LocalCluster, extra: &[&str]| -> (String, Value) {
        let args = small(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let id = submit(c, &url, &args);
        let s = wait_job(c, &url, &id, Duration::from_secs(300), ended);
        assert_eq!(s["state"], "succeeded", "{s}\n{}", c.logs());
        (id, s)
    };

    // An idle coordinator has nothing to warn about (it used to warn every 5 s).
    std::thread::sleep(Duration::from_secs(6));
    let idle = c.coordinator_log();
    assert!(
        !idle.contains(" WARN "),
        "an idle coordinator warned:\n{idle}"
    );

    let (worker, fingerprint) = worker_line(&c.workers[0].log());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    // 1. A worker written into Redis gets no call, no credential and no task.
    let fake = rt.block_on(liar::Liar::start("planted-1", &fingerprint));
    plant_redis_worker(&c, &fake.desc);
    let (id, _) = run(&c, &[]);
    assert_eq!(pixels(&c, &url, &id, &dir.0).0, want);
    assert!(
        fake.seen.lock().unwrap().is_empty(),
        "the planted worker was called"
    );

    // 2. Joining takes the worker token, and the worker's own address.
    let e = rt.block_on(fake.join(&url, CLIENT_TOKEN)).unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let mut elsewhere = fake.clone();
    elsewhere.desc.address = "http://10.20.30.40:7071".into();
    let e = rt.block_on(elsewhere.join(&url, WORKER_TOKEN)).unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("10.20.30.40"), "{}", e.message());

    // 3. An insider holding the worker token that reports tasks done without doing them is
    // removed at its first lie (the real worker is paused meanwhile, so the fake gets the
    // first task); the job is still right, and the fake never saw a client credential.
    let beating = rt.block_on(fake.join(&url, WORKER_TOKEN)).unwrap();
    wait_logs(&mut c, "the fake to join", |c| {
        c.coordinator_log().matches(" joined (").count() >= 2
    });
    c.workers[0].signal("STOP").unwrap();
    let args = small(&[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let id = submit(&c, &url, &args);
    wait_logs(&mut c, "the fake to be removed", |c| {
        c.coordinator_log().contains("worker planted-1 removed")
    });
    c.workers[0].signal("CONT").unwrap();
    let s = wait_job(&c, &url, &id, Duration::from_secs(300), ended);
    assert_eq!(s["state"], "succeeded", "{s}\n{}", c.logs());
    assert_eq!(pixels(&c, &url, &id, &dir.0).0, want);
    beating.abort();
    assert!(fake.task_calls.load(Ordering::Relaxed) >= 1);
    let own = format!("Bearer {}", fake.call_token);
    for seen in fake.seen.lock().unwrap().iter() {
        assert_eq!(seen, &own, "a worker was called with another credential");
    }

    // 4. Only the coordinator calls a worker: the client token, the worker token and no token
    // all fail to make a real worker rewrite a job's prompt.
    for token in [Some(CLIENT_TOKEN), Some(WORKER_TOKEN), None] {
        let code = rt.block_on(rewrite_prompt(&worker, &id, token));
        assert_eq!(code, tonic::Code::Unauthenticated, "with {token:?}");
    }

    // 5. --output-dir: judged from the path before admission (a refused job creates nothing),
    // only under the allowed root, and links are never followed.
    let deep = root.join("new/deep");
    let refused = try_submit(
        &c,
        &url,
        &["--steps", "0", "--output-dir", deep.to_str().unwrap()],
    );
    assert!(!refused.status.success());
    assert!(
        !root.join("new").exists(),
        "a refused job created directories"
    );
    let out = try_submit(&c, &url, &["--output-dir", outside.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("not under a directory"),
        "{err}"
    );
    std::os::unix::fs::symlink(&outside, root.join("linked")).unwrap();
    let through_link = root.join("linked/sub");
    let (id, s) = run(&c, &["--output-dir", through_link.to_str().unwrap()]);
    let warnings = s["warnings"].to_string();
    assert!(warnings.contains("symbolic link"), "{s}");
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "written through a link"
    );
    assert_eq!(pixels(&c, &url, &id, &dir.0).0, want);
    // The old fixed-name probe: a link planted there is left alone.
    let plain = root.join("plain");
    std::fs::create_dir_all(&plain).unwrap();
    let victim = outside.join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    std::os::unix::fs::symlink(&victim, plain.join(".tessera-write-test")).unwrap();
    let (id, s) = run(&c, &["--output-dir", plain.to_str().unwrap()]);
    assert_eq!(s["warnings"], serde_json::json!([]), "{s}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert_eq!(read_png(&plain.join(format!("{id}.png"))).2, want);

    // 6. A full disk under --output-dir: a warning naming the path and the OS error, and the
    // image still fetchable.
    let (id, s) = run(&c, &["--output-dir", full.to_str().unwrap()]);
    let warnings = s["warnings"].to_string();
    assert!(
        warnings.contains("No space left") && warnings.contains(full.to_str().unwrap()),
        "{s}"
    );
    let (px, text) = pixels(&c, &url, &id, &dir.0);
    assert_eq!(px, want);

    // 7. The job records its model's fingerprint, and the PNG carries it.
    assert_eq!(s["model_fingerprint"], fingerprint.as_str(), "{s}");
    assert!(
        text.iter().any(|(_, v)| v.contains(&fingerprint)),
        "{text:?}"
    );

    // 8. What no worker can hold is refused with the plan's estimate; the queue has a limit.
    let out = try_submit(&c, &url, &["--size", "65536x65536", "--method", "single"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("GiB") && err.contains("per worker"),
        "{err}"
    );
    let long = submit(
        &c,
        &url,
        &["--model", "tiny", "--prompt", "long", "--steps", "400"],
    );
    wait_job(&c, &url, &long, Duration::from_secs(60), |s| {
        s["state"] == "running"
    });
    let queued = submit(&c, &url, &["--model", "tiny", "--prompt", "next"]);
    let out = client(
        &c,
        &url,
        &["submit", "--model", "tiny", "--prompt", "one too many"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--max-queued 1"),
        "{err}"
    );
    client_ok(&c, &url, &["cancel", &queued]);
    client_ok(&c, &url, &["cancel", &long]);

    // 9. A second model under a served name is refused, with a line in the coordinator's log.
    let other = dir.path("other-model");
    tessera_ok(&[
        "model",
        "synth",
        "--arch",
        "sdxl-tiny",
        "--out",
        other.to_str().unwrap(),
        "--seed",
        "2",
    ]);
    let names = ["--model-name".to_string(), "tiny".to_string()];
    c.add_worker(&other, &names).unwrap();
    let second = c.workers.last_mut().unwrap();
    let exited = second.wait_exit(Duration::from_secs(120));
    assert!(exited.is_some_and(|s| !s.success()), "{}", second.log());
    assert!(second.log().contains("fingerprint"), "{}", second.log());
    let log = c.coordinator_log();
    assert!(
        log.contains("refused worker") && log.contains("fingerprint"),
        "{log}"
    );
}

#[test]
fn faults_end_jobs_with_a_message() {
    let _one = serial();
    let dir = scratch("trust-faults");
    let images = dir.path("images");
    let flags = ["--lease", "2", "--output-dir", images.to_str().unwrap()];
    let opts = ClusterOptions {
        coordinator_flags: flags.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    // Benchmark doubles: every evaluation of "slow" takes 6 s, three times the lease.
    let slow: &[&str] = &["--model-name", "slow", "--simulate-eval-ms", "6000"];
    let steady: &[&str] = &["--model-name", "steady", "--simulate-eval-ms", "100"];
    let mut c = start(&dir.0, &[slow, steady], opts);
    let url = c.url();

    // A task that outlives its lease: every lost lease is an attempt, the retries wait longer
    // each time, and the job fails naming the task, the worker and the lease.
    let began = Instant::now();
    let id = submit(
        &c,
        &url,
        &["--model", "slow", "--prompt", "p", "--steps", "2"],
    );
    let s = wait_job(&c, &url, &id, Duration::from_secs(240), ended);
    let error = s["error"].as_str().unwrap_or("");
    assert_eq!(s["state"], "failed", "{s}");
    assert!(error.contains("did not finish in 5 attempts"), "{error}");
    assert!(
        error.contains("--lease 2 s") && error.contains("outlived"),
        "{error}"
    );
    let (slow_worker, _) = worker_line(&c.workers[0].log());
    let port = slow_worker.rsplit(':').next().unwrap();
    assert!(
        error.contains(&format!("-{port}-")),
        "{error} names no worker of port {port}"
    );
    eprintln!("lease failure after {:.1} s", began.elapsed().as_secs_f64());

    // Redis away: a client's call answers within its deadline instead of hanging; Redis back
    // without its data: the running job fails saying so, and is still listed.
    let id = submit(
        &c,
        &url,
        &["--model", "steady", "--prompt", "p", "--steps", "300"],
    );
    wait_job(&c, &url, &id, Duration::from_secs(60), |s| {
        s["state"] == "running" && s["progress"]["views_done"].as_u64() > Some(0)
    });
    c.redis.kill();
    let asked = Instant::now();
    let out = client(&c, &url, &["list"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("Redis"), "{err}");
    assert!(
        asked.elapsed() < Duration::from_secs(45),
        "{:?}",
        asked.elapsed()
    );
    c.redis.restart();
    let s = wait_job(&c, &url, &id, Duration::from_secs(90), ended);
    assert_eq!(s["state"], "failed", "{s}");
    assert!(
        s["error"]
            .as_str()
            .unwrap_or("")
            .contains("the store lost this job"),
        "{s}"
    );
    assert!(client_ok(&c, &url, &["list"]).contains(&id));
}

/// Steps finished by a coordinator, as its log says.
fn steps_logged(log: &str, job: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("step finished") && l.contains(job))
        .count()
}

fn watcher(dir: &Path, url: &str, id: &str, name: &str) -> Process {
    let args: Vec<String> = ["watch", id, "--coordinator", url]
        .iter()
        .map(|s| s.to_string())
        .collect();
    Process::spawn(
        Path::new(tessera_bin()),
        name,
        &args,
        dir.join(format!("{name}.log")),
    )
    .unwrap()
}

#[test]
fn coordinators_hand_over_cleanly() {
    let _one = serial();
    let want = embedded(CASCADE);
    let dir = scratch("trust-lifecycle");
    let images = dir.path("images");
    let flags = ["--output-dir", images.to_str().unwrap()];
    let opts = ClusterOptions {
        coordinator_flags: flags.iter().map(|s| s.to_string()).collect(),
        standby: true,
        ..Default::default()
    };
    let mut c = start(&dir.0, &[&["--model-name", "tiny"]], opts);
    let (first, second) = (c.url(), c.standby_url().unwrap());
    let mut job = vec!["--model", "tiny"];
    job.extend_from_slice(CASCADE);

    // The standby answers health checks, as NOT_SERVING, and refuses clients.
    let out = client(&c, &second, &["list"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("standby"));
    assert_eq!(health(&second), Some(false));
    assert_eq!(health(&first), Some(true));

    // Paused mid-stage past its lock's expiry: the standby takes over and resumes the job.
    let id = submit(&c, &first, &job);
    wait_job(&c, &first, &id, Duration::from_secs(300), |s| {
        s["progress"]["stage"].as_u64() >= Some(1) && s["progress"]["step"].as_u64() >= Some(1)
    });
    let open = watcher(&dir.0, &first, &id, "watch-paused");
    c.coordinator_process().unwrap().signal("STOP").unwrap();
    wait_logs(&mut c, "the standby to take over", |c| {
        c.standby_log().contains("coordinator serving on")
    });
    wait_logs(&mut c, "the worker to join the standby", |c| {
        c.standby_log().contains(" joined (")
    });
    let resumed = wait_job(&c, &second, &id, Duration::from_secs(120), |s| {
        s["resumed_from"].is_object() || ended(s)
    });
    // Resumed: the old coordinator wakes up beside its successor, with a watch still open.
    let before = steps_logged(&c.coordinator_log(), &id);
    let woke = Instant::now();
    c.coordinator_process().unwrap().signal("CONT").unwrap();
    let exit = c
        .coordinator_process()
        .unwrap()
        .wait_exit(Duration::from_secs(30));
    assert!(exit.is_some_and(|s| !s.success()), "{}", c.logs());
    eprintln!(
        "the woken coordinator stopped after {:.1} s",
        woke.elapsed().as_secs_f64()
    );
    let log = c.coordinator_log();
    assert!(log.contains("lost the coordinator lock"), "{log}");
    assert!(
        !log.contains(&format!("job {id} ")),
        "the old coordinator ended the job:\n{log}"
    );
    assert!(steps_logged(&log, &id) <= before + 1, "{log}");
    drop(open);

    // The job finishes once, on the successor, with the embedded render's pixels.
    let s = wait_job(&c, &second, &id, Duration::from_secs(300), ended);
    assert_eq!(s["state"], "succeeded", "{s} (resumed: {resumed})");
    assert!(s["resumed_from"].is_object(), "{s}");
    assert_eq!(pixels(&c, &second, &id, &dir.0).0, want, "{}", c.logs());
    assert_eq!(
        c.standby_log()
            .matches(&format!("job {id} succeeded"))
            .count(),
        1
    );

    // SIGTERM with a watch open: stops within seconds, releases the lock; the next coordinator
    // takes over at once and finishes the job.
    let long = submit(
        &c,
        &second,
        &["--model", "tiny", "--prompt", "long", "--steps", "300"],
    );
    wait_job(&c, &second, &long, Duration::from_secs(60), |s| {
        s["progress"]["views_done"].as_u64() > Some(0)
    });
    let open = watcher(&dir.0, &second, &long, "watch-term");
    let (standby, _) = c.standby.as_mut().unwrap();
    let asked = Instant::now();
    standby.signal("TERM").unwrap();
    let exit = standby.wait_exit(Duration::from_secs(20));
    assert!(exit.is_some_and(|s| s.success()), "{}", c.logs());
    eprintln!("SIGTERM to exit: {:.1} s", asked.elapsed().as_secs_f64());
    assert!(
        c.standby_log().contains("coordinator stopped"),
        "{}",
        c.standby_log()
    );
    drop(open);
    c.start_coordinator().unwrap_or_else(|e| panic!("{e}"));
    let log = c.coordinator_log();
    assert!(
        !log.contains("standing by"),
        "the lock was not released:\n{log}"
    );
    let s = wait_job(&c, &first, &long, Duration::from_secs(300), ended);
    assert_eq!(s["state"], "succeeded", "{s}\n{}", c.logs());
    assert!(s["resumed_from"].is_object(), "{s}");
}

/// The health of the coordinator at `url`: Some(true) serving, Some(false) not serving.
fn health(url: &str) -> Option<bool> {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{health_check_response::ServingStatus, HealthCheckRequest};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(url.to_string())
            .ok()?
            .connect()
            .await
            .ok()?;
        let answer = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .ok()?
            .into_inner();
        Some(answer.status == ServingStatus::Serving as i32)
    })
}

#[test]
fn tls_settings_never_speak_plaintext() {
    let dir = scratch("trust-tls");
    let ca = dir.path("ca.pem");
    std::fs::write(&ca, b"not read before the URL is checked").unwrap();
    let out = tessera(&[
        "list",
        "--coordinator",
        "http://127.0.0.1:9",
        "--tls-ca",
        ca.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("plaintext") && err.contains("https://127.0.0.1:9"),
        "{err}"
    );
    let model = tiny_model("sdxl-tiny");
    let out = tessera(&[
        "worker",
        "--coordinator",
        "http://127.0.0.1:9",
        "--tls-ca",
        ca.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--redis",
        "redis://127.0.0.1:1",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("plaintext"), "{err}");
    // And a worker refuses the clients' credential outright.
    let out = tessera(&["worker", "--token", "t", "--model", model.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--worker-token"),
        "{err}"
    );
}

#[test]
fn a_tls_coordinator_refuses_a_plaintext_worker_address() {
    let _one = serial();
    let dir = scratch("trust-tls-hop");
    let opts = ClusterOptions {
        tls: true,
        ..Default::default()
    };
    let mut c = LocalCluster::start(Path::new(tessera_bin()), &dir.0, opts)
        .unwrap_or_else(|e| panic!("{e}"));
    // A worker that serves TLS but advertises http://: the coordinator would call it in
    // plaintext, so the join is refused and the worker stops saying why.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let extra = [
        "--listen".to_string(),
        format!("127.0.0.1:{port}"),
        "--advertise".into(),
        format!("http://127.0.0.1:{port}"),
    ];
    c.add_worker(&tiny_model("sdxl-tiny"), &extra)
        .unwrap_or_else(|e| panic!("{e}"));
    let worker = c.workers.last_mut().unwrap();
    let exited = worker.wait_exit(Duration::from_secs(60));
    assert!(exited.is_some_and(|s| !s.success()), "{}", worker.log());
    let log = worker.log();
    assert!(
        log.contains("refused this worker") && log.contains("plaintext"),
        "{log}"
    );
    assert!(!c.coordinator_log().contains(" joined ("), "{}", c.logs());
}
