//! The cluster across processes: a real `redis-server` on a free loopback port, a `tessera
//! coordinator` and `tessera worker` processes, driven through the CLI (and, for malformed
//! requests, a raw gRPC client). Every finished image is compared pixel for pixel with
//! `tessera render` of the same flags.
//!
//! The tests run one at a time: each starts its own cluster, and two clusters on two cores
//! would only slow each other down.

mod common;

use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{
    read_png, scratch, serial, tessera, tessera_bin, tessera_ok, tiny_model, Scratch,
    CASCADE as JOB,
};
use tessera_harness::{ClusterOptions, LocalCluster, RedisServerOptions};

/// Pixels of `tessera render` with [`JOB`]'s flags, rendered once per test process.
fn reference() -> &'static Vec<u8> {
    static PIXELS: OnceLock<Vec<u8>> = OnceLock::new();
    PIXELS.get_or_init(|| {
        let dir = scratch("cluster-reference");
        let out = dir.path("ref.png");
        let model = tiny_model("sdxl-tiny");
        let mut args = vec!["render", "--model", model.to_str().unwrap()];
        args.extend_from_slice(JOB);
        args.extend_from_slice(&["-o", out.to_str().unwrap()]);
        tessera_ok(&args);
        read_png(&out).2
    })
}

/// A loopback cluster serving the tiny SDXL model as "tiny", with the test's conveniences:
/// every call panics with the cluster's logs when it fails.
struct Cluster {
    dir: Scratch,
    inner: LocalCluster,
}

impl Cluster {
    fn start(
        name: &str,
        workers: usize,
        redis: RedisServerOptions,
        token: Option<&str>,
    ) -> Cluster {
        Self::start_with(
            name,
            workers,
            ClusterOptions {
                redis,
                token: token.map(str::to_string),
                ..Default::default()
            },
        )
    }

    fn start_with(name: &str, workers: usize, mut opts: ClusterOptions) -> Cluster {
        let dir = scratch(name);
        let images = dir.path("images");
        opts.coordinator_flags.extend([
            "--job-ttl".to_string(),
            "3".into(),
            "--output-dir".into(),
            images.display().to_string(),
        ]);
        let inner = LocalCluster::start(Path::new(tessera_bin()), &dir.0, opts)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut c = Cluster { dir, inner };
        for _ in 0..workers {
            c.add_worker();
        }
        c.inner
            .wait_workers(workers)
            .unwrap_or_else(|e| panic!("{e}"));
        c
    }

    fn url(&self) -> String {
        self.inner.url()
    }

    fn add_worker(&mut self) {
        let model = tiny_model("sdxl-tiny");
        let name = ["--model-name".to_string(), "tiny".to_string()];
        self.inner
            .add_worker(&model, &name)
            .unwrap_or_else(|e| panic!("{e}"));
    }

    fn restart_coordinator(&mut self) {
        self.inner.kill_coordinator();
        self.inner
            .start_coordinator()
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Runs a client command against this cluster.
    fn client(&self, args: &[&str]) -> std::process::Output {
        self.inner
            .client(args)
            .unwrap_or_else(|e| panic!("{e}\n{}", self.logs()))
    }

    fn client_ok(&self, args: &[&str]) -> String {
        self.inner.client_ok(args).unwrap_or_else(|e| panic!("{e}"))
    }

    fn submit(&self, extra: &[&str]) -> String {
        let mut args = vec!["submit", "--model", "tiny"];
        args.extend_from_slice(extra);
        let id = self.client_ok(&args);
        assert!(
            !id.is_empty() && !id.contains(char::is_whitespace),
            "{id:?}"
        );
        id
    }

    fn status(&self, id: &str) -> serde_json::Value {
        serde_json::from_str(&self.client_ok(&["status", id, "--json"])).unwrap()
    }

    /// Polls the job until `pred` holds (or it ends, which fails the test).
    fn wait_for(
        &self,
        id: &str,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let s = self.status(id);
            if pred(&s) {
                return s;
            }
            assert!(
                s["state"] == "queued" || s["state"] == "running",
                "job ended before {what}: {s}"
            );
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {s}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the job's end through `tessera watch` and checks its exit status.
    fn watch(&self, id: &str) -> std::process::Output {
        self.client(&["watch", id])
    }

    /// [`Cluster::watch`], failing the test with the logs when the job did not succeed.
    fn watch_ok(&self, id: &str) {
        let out = self.watch(id);
        assert!(
            out.status.success(),
            "watch: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
    }

    fn fetch_pixels(&self, id: &str) -> Vec<u8> {
        let out = self.dir.path(&format!("{id}.png"));
        self.client_ok(&["fetch", id, "-o", out.to_str().unwrap()]);
        read_png(&out).2
    }

    fn logs(&self) -> String {
        self.inner.logs()
    }
}

/// Mid-stage: in a stage after the first, with at least one of its steps done.
/// Past the first step of a high-resolution stage, with a checkpoint inside it: a step's
/// checkpoint is written while the next step runs, and joined before the one after it starts,
/// so progress at step 2 means the checkpoint after step 1 is in the store.
fn mid_stage(s: &serde_json::Value) -> bool {
    s["state"] == "running"
        && s["progress"]["stage"].as_u64() >= Some(1)
        && s["progress"]["step"].as_u64() >= Some(2)
        && s["progress"]["phase"] == "denoising"
}

fn assert_same_image(cluster: &Cluster, id: &str) {
    let pixels = cluster.fetch_pixels(id);
    let want = reference();
    assert_eq!(pixels.len(), want.len(), "image size differs");
    let differing = pixels
        .iter()
        .zip(want.iter())
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(
        differing,
        0,
        "{differing} bytes differ from `tessera render`\n{}",
        cluster.logs()
    );
}

#[test]
fn a_cluster_job_matches_the_embedded_render() {
    let _one = serial();
    reference();
    let cluster = Cluster::start("cluster-basic", 2, RedisServerOptions::default(), None);
    let id = cluster.submit(JOB);
    let preview = cluster.dir.path("preview.png");
    let out = cluster.client(&["watch", &id, "--preview", preview.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "watch: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        cluster.logs()
    );
    // watch kept the job's live preview: the last stage's 64² latent (a 512-px picture) shown
    // 256 px a side.
    let (pw, ph, _, _) = read_png(&preview);
    assert_eq!((pw, ph), (256, 256), "{}", cluster.logs());
    let s = cluster.status(&id);
    assert_eq!(s["state"], "succeeded", "{s}");
    assert_eq!(s["method"], "hybrid");
    assert_eq!(
        s["progress"]["views_done"], s["progress"]["views_total"],
        "{s}"
    );
    assert_same_image(&cluster, &id);
    let listed = cluster.client_ok(&["list"]);
    assert!(listed.contains(&id), "{listed}");
}

/// The store a reliability test runs on: one Redis (`shards` 0) or a Redis Cluster of
/// `shards` masters; AOF on either way, so a restarted store keeps what it held.
fn store(shards: usize) -> ClusterOptions {
    ClusterOptions {
        redis_shards: shards,
        redis: RedisServerOptions {
            aof: true,
            ..Default::default()
        },
        ..Default::default()
    }
}

fn worker_killed_mid_stage(name: &str, shards: usize) {
    let _one = serial();
    reference();
    let mut cluster = Cluster::start_with(name, 2, store(shards));
    let id = cluster.submit(JOB);
    cluster.wait_for(&id, "the second stage", mid_stage);
    cluster.inner.workers[0].kill();
    // Another worker joins afterwards.
    cluster.add_worker();
    cluster.watch_ok(&id);
    assert_same_image(&cluster, &id);
    let log = cluster.inner.coordinator_log();
    assert!(
        log.contains("left"),
        "the coordinator never noticed the loss:\n{log}"
    );
}

#[test]
fn a_worker_killed_mid_stage_costs_nothing() {
    worker_killed_mid_stage("cluster-kill-worker", 0);
}

#[test]
fn a_worker_killed_mid_stage_costs_nothing_on_a_redis_cluster() {
    worker_killed_mid_stage("sharded-kill-worker", 3);
}

fn coordinator_restarted_mid_stage(name: &str, shards: usize) {
    let _one = serial();
    reference();
    let mut cluster = Cluster::start_with(name, 2, store(shards));
    let id = cluster.submit(JOB);
    let at = cluster.wait_for(&id, "the second stage", mid_stage);
    cluster.restart_coordinator();
    cluster.watch_ok(&id);
    let s = cluster.status(&id);
    let resumed = &s["resumed_from"];
    assert!(resumed.is_object(), "no resume recorded: {s}");
    assert!(
        resumed["step"].as_u64().unwrap() > 0,
        "resumed at step 0 (killed at {}): {s}",
        at["progress"]
    );
    assert!(resumed["stage"].as_u64().unwrap() >= 1, "{s}");
    assert_same_image(&cluster, &id);
}

#[test]
fn a_restarted_coordinator_resumes_from_its_checkpoint() {
    coordinator_restarted_mid_stage("cluster-kill-coord", 0);
}

#[test]
fn a_restarted_coordinator_resumes_from_its_checkpoint_on_a_redis_cluster() {
    coordinator_restarted_mid_stage("sharded-kill-coord", 3);
}

/// Every node of the store killed and restarted (a Redis Cluster's whole set of shards at
/// once: everything answers connection refused, then CLUSTERDOWN until every slot is served).
fn store_restarted_mid_job(name: &str, shards: usize) {
    let _one = serial();
    reference();
    let mut cluster = Cluster::start_with(name, 2, store(shards));
    let id = cluster.submit(JOB);
    cluster.wait_for(&id, "the second stage", mid_stage);
    cluster.inner.redis.kill();
    std::thread::sleep(Duration::from_secs(2));
    cluster.inner.redis.restart();
    cluster.watch_ok(&id);
    assert_same_image(&cluster, &id);
}

#[test]
fn cancel_removes_a_job_and_finished_jobs_expire() {
    let _one = serial();
    let cluster = Cluster::start("cluster-cancel", 2, RedisServerOptions::default(), None);
    let baseline = cluster.inner.redis.dbsize();

    let id = cluster.submit(JOB);
    cluster.wait_for(&id, "running", |s| {
        s["state"] == "running" && s["progress"]["views_done"].as_u64() > Some(0)
    });
    cluster.client_ok(&["cancel", &id]);
    let s = cluster.status(&id);
    assert_eq!(s["state"], "cancelled", "{s}");
    let left = cluster.inner.redis_keys(&format!("tessera:job:{id}:*"));
    assert_eq!(
        left,
        vec![format!("tessera:job:{id}:record{{tessera}}")],
        "cancel left data behind"
    );
    let out = cluster.watch(&id);
    assert_eq!(out.status.code(), Some(3), "watch of a cancelled job");

    // A small job runs to the end and is fetched; then everything expires (--job-ttl 3).
    // In 16-bit: the image is a file under the coordinator's --output-dir, never in Redis.
    let small = cluster.submit(&[
        "--prompt",
        "a small test",
        "--steps",
        "2",
        "--seed",
        "3",
        "--bit-depth",
        "16",
    ]);
    let out = cluster.watch(&small);
    assert!(out.status.success(), "{}", cluster.logs());
    let dir = &cluster.dir;
    let png = dir.path("small.png");
    cluster.client_ok(&["fetch", &small, "-o", png.to_str().unwrap()]);
    let (w, _, px, _) = read_png(&png);
    assert_eq!((w, px.len()), (128, 128 * 128 * 6));
    let stored = dir.path("images").join(&small).join("0.png");
    assert_eq!(
        std::fs::read(&stored).unwrap(),
        std::fs::read(&png).unwrap()
    );

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n = cluster.inner.redis.dbsize();
        if n == baseline {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{n} keys instead of {baseline}: {:?}",
            cluster.inner.redis_keys("*")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(cluster.client_ok(&["list"]).contains("no jobs"));
    // The expired job's image file goes with it (the coordinator sweeps every few seconds).
    let deadline = Instant::now() + Duration::from_secs(20);
    while stored.exists() {
        assert!(
            Instant::now() < deadline,
            "{} outlived its job",
            stored.display()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn redis_restarted_mid_job_costs_nothing() {
    store_restarted_mid_job("cluster-redis-restart", 0);
}

#[test]
fn a_whole_redis_cluster_restarted_mid_job_costs_nothing() {
    store_restarted_mid_job("sharded-redis-restart", 3);
}

/// A job whose checkpoint tensors are gone from the store while its state still names them
/// (a store that lost data without the coordinator noticing: an evicted key, a shard restarted
/// without its AOF) fails, saying which key is missing, instead of trying its image again
/// for ever.
#[test]
fn a_checkpoint_gone_from_the_store_fails_the_job_instead_of_retrying_for_ever() {
    let _one = serial();
    let mut cluster = Cluster::start(
        "cluster-lost-checkpoint",
        2,
        RedisServerOptions::default(),
        None,
    );
    let id = cluster.submit(JOB);
    cluster.wait_for(&id, "the second stage", mid_stage);
    cluster.inner.kill_coordinator();
    // The image's tensors (`…:i0:ckpt:s1:t2:latent…`), not its state (`…:ckpt:state…`).
    let pattern = format!("tessera:job:{id}:*ckpt:s[0-9]*");
    assert!(
        cluster.inner.redis.delete_matching(&pattern) > 0,
        "no checkpoint tensors"
    );
    cluster
        .inner
        .start_coordinator()
        .unwrap_or_else(|e| panic!("{e}"));
    let out = cluster
        .inner
        .client_within(&cluster.url(), &["watch", &id], Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    assert!(!out.status.success(), "{}", cluster.logs());
    let s = cluster.status(&id);
    assert_eq!(s["state"], "failed", "{s}");
    let error = s["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("is missing from the store") && error.contains(":ckpt:s"),
        "{s}"
    );
}

/// A 3-shard Redis Cluster as the store, its nodes carrying the recipes' ACL users: one job
/// rides out, at once, the restart of one shard, of the coordinator and the loss of a worker,
/// and gives the embedded render's pixels; every shard held a fair part of its keys and
/// carried part of its traffic.
#[test]
fn a_redis_cluster_store_survives_shard_coordinator_and_worker_restarts() {
    let _one = serial();
    reference();
    let opts = ClusterOptions {
        redis_shards: 3,
        redis: RedisServerOptions {
            role_users: true,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut cluster = Cluster::start_with("cluster-sharded", 2, opts);
    let id = cluster.submit(JOB);
    cluster.wait_for(&id, "the second stage", mid_stage);
    // The job's keys spread over the shards (256 buckets over the slots, a few hundred keys).
    let shards = cluster.inner.redis.shard_keys();
    let keys: usize = shards.iter().sum();
    assert!(
        shards.iter().all(|&n| n * 5 > keys),
        "keys per shard {shards:?}"
    );
    cluster.inner.workers[0].kill();
    cluster.inner.kill_coordinator();
    let redis = cluster.inner.redis.cluster_mut().expect("a Redis Cluster");
    redis.kill_shard(1);
    std::thread::sleep(Duration::from_secs(2));
    redis.restart_shard(1);
    // (A restarted shard counts its bytes afresh: they are counted from here.)
    let bytes_before = shard_bytes(&cluster);
    cluster
        .inner
        .start_coordinator()
        .unwrap_or_else(|e| panic!("{e}"));
    cluster.add_worker();
    cluster.watch_ok(&id);
    assert!(cluster.status(&id)["resumed_from"].is_object());
    assert_same_image(&cluster, &id);
    let moved: Vec<u64> = shard_bytes(&cluster)
        .iter()
        .zip(&bytes_before)
        .map(|(after, before)| after - before)
        .collect();
    let total: u64 = moved.iter().sum();
    eprintln!("bytes in and out per shard: {moved:?}, keys per shard mid-job: {shards:?}");
    // Every shard carried part of the traffic (how evenly, with the few tasks of this tiny
    // job, is chance; `bench scale --store cluster` measures it at 8K).
    assert!(
        moved.iter().all(|&b| b * 20 > total),
        "a shard carried under a twentieth of the traffic: {moved:?}"
    );
}

/// Bytes each shard of the cluster's store has moved in and out since it started.
fn shard_bytes(cluster: &Cluster) -> Vec<u64> {
    let bytes = cluster.inner.redis.net_bytes();
    bytes.into_iter().map(|b| b.expect("INFO stats")).collect()
}

/// Redis over TLS with the recipes' ACL users: the default user off, the coordinator and the
/// workers logged in as their own users.
fn tls_redis_with_role_users() -> RedisServerOptions {
    RedisServerOptions {
        tls: true,
        user: Some(("admin".into(), "admin-test-password".into())),
        role_users: true,
        ..Default::default()
    }
}

#[test]
fn every_hop_can_use_tls() {
    let _one = serial();
    // And Redis over TLS (`rediss://`, `--redis-ca`) with the recipes' ACL users: the default
    // user off, the coordinator and the workers logged in as their own users.
    let opts = ClusterOptions {
        tls: true,
        redis: tls_redis_with_role_users(),
        ..Default::default()
    };
    let cluster = Cluster::start_with("cluster-tls", 1, opts);
    let id = cluster.submit(&["--prompt", "over TLS", "--steps", "2", "--seed", "5"]);
    let out = cluster.watch(&id);
    assert!(out.status.success(), "{}", cluster.logs());
    assert_eq!(cluster.fetch_pixels(&id).len(), 128 * 128 * 3);
    // A client that does not speak TLS gets nowhere.
    let plain = format!("http://127.0.0.1:{}", cluster.inner.port());
    let out = tessera(&["list", "--coordinator", &plain]);
    assert!(!out.status.success());
}

/// A Redis Cluster over TLS (`rediss-cluster://`, `--redis-ca`; the shards' bus is TLS too),
/// each role logged in as its own ACL user on every shard: the same image as the embedded
/// render, its tensors spread over the shards.
#[test]
fn a_tls_redis_cluster_store_gives_the_same_image() {
    let _one = serial();
    reference();
    let opts = ClusterOptions {
        redis_shards: 3,
        redis: tls_redis_with_role_users(),
        ..Default::default()
    };
    let cluster = Cluster::start_with("cluster-tls-shards", 2, opts);
    assert!(
        cluster
            .inner
            .redis
            .url_as("worker")
            .starts_with("rediss-cluster://tessera-worker:"),
        "{}",
        cluster.inner.redis.url_as("worker")
    );
    let id = cluster.submit(JOB);
    let out = cluster.watch(&id);
    assert!(out.status.success(), "{}", cluster.logs());
    assert_same_image(&cluster, &id);
    let bytes = shard_bytes(&cluster);
    assert!(
        bytes.iter().all(|&b| b > 0),
        "a shard carried nothing: {bytes:?}"
    );
}

mod malformed {
    use super::*;
    use tessera_proto::v1::coordinator_client::CoordinatorClient;
    use tessera_proto::v1::{JobRef, JobSpec, ListJobsRequest, Size, SubmitJobRequest};
    use tonic::Code;

    fn good() -> JobSpec {
        JobSpec {
            model: "tiny".into(),
            prompt: "a valid prompt".into(),
            steps: Some(2),
            ..Default::default()
        }
    }

    fn size(w: i64, h: i64) -> Option<Size> {
        Some(Size {
            width: w,
            height: h,
        })
    }

    #[test]
    fn malformed_requests_get_clear_statuses_and_queue_nothing() {
        let _one = serial();
        let cluster = Cluster::start(
            "cluster-malformed",
            1,
            RedisServerOptions::default(),
            Some("s3cret"),
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let channel = tonic::transport::Endpoint::from_shared(cluster.url())
                .unwrap()
                .connect()
                .await
                .unwrap();
            let token: tonic::metadata::MetadataValue<_> = "Bearer s3cret".parse().unwrap();
            let mut client = CoordinatorClient::with_interceptor(
                channel.clone(),
                move |mut r: tonic::Request<()>| {
                    r.metadata_mut().insert("authorization", token.clone());
                    Ok(r)
                },
            );
            let long = "x".repeat(10_000);
            let with = |f: &dyn Fn(&mut JobSpec)| {
                let mut s = good();
                f(&mut s);
                s
            };
            type Case = (
                &'static str,
                JobSpec,
                i64,
                i32,
                &'static str,
                Code,
                &'static str,
            );
            let cases: Vec<Case> = vec![
                (
                    "zero size",
                    with(&|s| s.size = size(0, 0)),
                    1,
                    0,
                    "",
                    Code::InvalidArgument,
                    "positive",
                ),
                (
                    "zero width",
                    with(&|s| s.size = size(0, 512)),
                    1,
                    0,
                    "",
                    Code::InvalidArgument,
                    "width",
                ),
                (
                    "negative width",
                    with(&|s| s.size = size(-64, 128)),
                    1,
                    0,
                    "",
                    Code::InvalidArgument,
                    "width -64",
                ),
                (
                    "negative height",
                    with(&|s| s.size = size(128, -128)),
                    1,
                    0,
                    "",
                    Code::InvalidArgument,
                    "height -128",
                ),
                (
                    "unaligned size",
                    with(&|s| s.size = size(100, 128)),
                    1,
                    0,
                    "",
                    Code::InvalidArgument,
                    "multiple",
                ),
                (
                    "unaligned cascade",
                    with(&|s| s.size = size(520, 512)),
                    1,
                    0,
                    "",
                    Code::InvalidArgument,
                    "multiple",
                ),
                (
                    "huge size",
                    with(&|s| s.size = size(1_000_000, 1_000_000)),
                    1,
                    0,
                    "",
                    Code::InvalidArgument,
                    "65536",
                ),
                (
                    "absurd size",
                    with(&|s| s.size = size(1 << 40, 128)),
                    1,
                    0,
                    "",
                    Code::InvalidArgument,
                    "too large",
                ),
                (
                    "negative stage",
                    with(&|s| {
                        s.stages = vec![Size {
                            width: -128,
                            height: 128,
                        }]
                    }),
                    1,
                    0,
                    "",
                    Code::InvalidArgument,
                    "--stages",
                ),
                (
                    "zero steps",
                    with(&|s| s.steps = Some(0)),
                    1,
                    0,
                    "",
                    Code::InvalidArgument,
                    "--steps",
                ),
                (
                    "negative steps",
                    with(&|s| s.steps = Some(-5)),
                    1,
                    0,
                    "",
                    Code::InvalidArgument,
                    "--steps",
                ),
                (
                    "too many steps",
                    with(&|s| s.steps = Some(100_000)),
                    1,
                    0,
                    "",
                    Code::InvalidArgument,
                    "steps",
                ),
                (
                    "NaN guidance",
                    with(&|s| s.guidance = Some(f64::NAN)),
                    1,
                    0,
                    "",
                    Code::InvalidArgument,
                    "--guidance",
                ),
                (
                    "infinite guidance",
                    with(&|s| s.guidance = Some(f64::INFINITY)),
                    1,
                    0,
                    "",
                    Code::InvalidArgument,
                    "--guidance",
                ),
                (
                    "minus infinite guidance",
                    with(&|s| s.guidance = Some(f64::NEG_INFINITY)),
                    1,
                    0,
                    "",
                    Code::InvalidArgument,
                    "--guidance",
                ),
                (
                    "negative guidance",
                    with(&|s| s.guidance = Some(-2.0)),
                    1,
                    0,
                    "",
                    Code::InvalidArgument,
                    "guidance",
                ),
                (
                    "empty prompt",
                    with(&|s| s.prompt = String::new()),
                    1,
                    0,
                    "",
                    Code::InvalidArgument,
                    "prompt",
                ),
                (
                    "blank prompt",
                    with(&|s| s.prompt = "   ".into()),
                    1,
                    0,
                    "",
                    Code::InvalidArgument,
                    "prompt",
                ),
                (
                    "10,000-character prompt",
                    with(&|s| s.prompt = long.clone()),
                    1,
                    0,
                    "",
                    Code::InvalidArgument,
                    "shorten",
                ),
                (
                    "10,000-character negative prompt",
                    with(&|s| s.negative_prompt = Some(long.clone())),
                    1,
                    0,
                    "",
                    Code::InvalidArgument,
                    "shorten",
                ),
                (
                    "control characters",
                    with(&|s| s.prompt = "bell\u{7}".into()),
                    1,
                    0,
                    "",
                    Code::InvalidArgument,
                    "control",
                ),
                (
                    "unknown method",
                    with(&|s| s.method = Some("dreamy".into())),
                    1,
                    0,
                    "",
                    Code::InvalidArgument,
                    "--method",
                ),
                (
                    "unknown scheduler",
                    with(&|s| s.scheduler = Some("plms".into())),
                    1,
                    0,
                    "",
                    Code::InvalidArgument,
                    "--scheduler",
                ),
                (
                    "unknown tile weights",
                    with(&|s| s.tile_weights = Some("square".into())),
                    1,
                    0,
                    "",
                    Code::InvalidArgument,
                    "--tile-weights",
                ),
                (
                    "unknown resize",
                    with(&|s| s.resize = Some("lanczos".into())),
                    1,
                    0,
                    "",
                    Code::InvalidArgument,
                    "--resize",
                ),
                (
                    "NaN cosine scale",
                    with(&|s| s.cosine_scale = Some(f64::NAN)),
                    1,
                    0,
                    "",
                    Code::InvalidArgument,
                    "--cosine-scale",
                ),
                (
                    "three FA-CFG weights",
                    with(&|s| s.facfg = vec![1.0, 2.0, 3.0]),
                    1,
                    0,
                    "",
                    Code::InvalidArgument,
                    "--facfg",
                ),
                (
                    "background scale without a mask",
                    with(&|s| s.cosine_scale_bg = Some(0.5)),
                    1,
                    0,
                    "",
                    Code::InvalidArgument,
                    "--mask",
                ),
                (
                    "garbage latents",
                    with(&|s| s.latents = b"not safetensors".to_vec()),
                    1,
                    0,
                    "",
                    Code::InvalidArgument,
                    "--latents",
                ),
                (
                    "garbage init image",
                    with(&|s| s.init_image = b"not a png".to_vec()),
                    1,
                    0,
                    "",
                    Code::InvalidArgument,
                    "--init-image",
                ),
                (
                    "garbage mask",
                    with(&|s| s.mask = b"not a png".to_vec()),
                    1,
                    0,
                    "",
                    Code::InvalidArgument,
                    "--mask",
                ),
                (
                    "missing model",
                    with(&|s| s.model = String::new()),
                    1,
                    0,
                    "",
                    Code::InvalidArgument,
                    "--model",
                ),
                (
                    "unknown model",
                    with(&|s| s.model = "no-such-model".into()),
                    1,
                    0,
                    "",
                    Code::NotFound,
                    "tiny",
                ),
                (
                    "negative count",
                    good(),
                    -1,
                    0,
                    "",
                    Code::InvalidArgument,
                    "--count",
                ),
                (
                    "huge count",
                    good(),
                    1_000_000,
                    0,
                    "",
                    Code::InvalidArgument,
                    "--count",
                ),
                (
                    "priority out of range",
                    good(),
                    1,
                    5000,
                    "",
                    Code::InvalidArgument,
                    "--priority",
                ),
                (
                    "relative output dir",
                    good(),
                    1,
                    0,
                    "out/dir",
                    Code::InvalidArgument,
                    "absolute",
                ),
            ];
            assert!(cases.len() >= 30);
            for (name, spec, count, priority, dir, code, hint) in cases {
                let r = client
                    .submit_job(SubmitJobRequest {
                        spec: Some(spec),
                        count,
                        priority,
                        output_dir: dir.into(),
                        ..Default::default()
                    })
                    .await;
                let status = r.expect_err(name);
                assert_eq!(status.code(), code, "{name}: {}", status.message());
                assert!(
                    status.message().contains(hint),
                    "{name}: message {:?} lacks {hint:?}",
                    status.message()
                );
            }
            // No spec at all; bad and unknown job ids.
            let e = client
                .submit_job(SubmitJobRequest::default())
                .await
                .unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument);
            let e = client
                .get_job(JobRef {
                    job_id: "../etc".into(),
                })
                .await
                .unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
            let e = client
                .get_job(JobRef {
                    job_id: "0000deadbeef".into(),
                })
                .await
                .unwrap_err();
            assert_eq!(e.code(), Code::NotFound, "{}", e.message());

            // Tokens: none, and a wrong one.
            let mut anonymous = CoordinatorClient::new(channel.clone());
            let e = anonymous.list_jobs(ListJobsRequest {}).await.unwrap_err();
            assert_eq!(e.code(), Code::Unauthenticated);
            assert!(e.message().contains("--token"), "{}", e.message());
            let e = anonymous
                .submit_job(SubmitJobRequest {
                    spec: Some(good()),
                    ..Default::default()
                })
                .await
                .unwrap_err();
            assert_eq!(e.code(), Code::Unauthenticated);
            let wrong: tonic::metadata::MetadataValue<_> = "Bearer guess".parse().unwrap();
            let mut guesser =
                CoordinatorClient::with_interceptor(channel, move |mut r: tonic::Request<()>| {
                    r.metadata_mut().insert("authorization", wrong.clone());
                    Ok(r)
                });
            let e = guesser
                .submit_job(SubmitJobRequest {
                    spec: Some(good()),
                    ..Default::default()
                })
                .await
                .unwrap_err();
            assert_eq!(e.code(), Code::Unauthenticated);

            // Still up, and nothing was queued.
            let jobs = client
                .list_jobs(ListJobsRequest {})
                .await
                .unwrap()
                .into_inner()
                .jobs;
            assert!(jobs.is_empty(), "{jobs:?}");
        });
        assert!(cluster.inner.redis_keys("tessera:job:*").is_empty());
        assert!(cluster.inner.redis_keys("tessera:queue*").is_empty());
        // The CLI prints the server's message, not a debug dump.
        let out = cluster.client(&["submit", "--model", "tiny", "--prompt", "x", "--steps", "0"]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("invalid request: --steps 0"), "{err}");
        assert!(!err.contains("Status {"), "{err}");
        // And a client without the token is told what to do.
        let out = tessera(&["list", "--coordinator", &cluster.url()]);
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("--token"));
    }
}
