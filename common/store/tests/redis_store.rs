//! The Redis store against a real redis-server per test (see `tessera_harness`):
//! the trait's semantics as the in-memory store has them, plus what only Redis has (TTLs,
//! passwords, outages).

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use tessera_harness::{RedisServer, RedisServerOptions};
use tessera_store::{
    get_json, get_tensor, put_json, put_tensor, RedisOptions, RedisStore, Store, StoreError,
    WriteBatch,
};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// A multi-thread runtime for tests that drive the sync trait from std threads.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn options(retry_for: Duration) -> RedisOptions {
    RedisOptions {
        retry_for,
        ..RedisOptions::default()
    }
}

#[test]
fn round_trips_through_the_sync_trait_from_std_threads() -> TestResult {
    let server = RedisServer::start();
    let rt = runtime();
    let store = rt.block_on(RedisStore::connect(&server.url(), RedisOptions::default()))?;
    let store: Arc<dyn Store> = Arc::new(store);

    let writers: Vec<_> = (0..4)
        .map(|i| {
            let store = store.clone();
            thread::spawn(move || store.put(&format!("job:a:{i}"), &[i as u8; 3]))
        })
        .collect();
    for w in writers {
        w.join().expect("writer thread")?;
    }
    assert_eq!(store.get("job:a:2")?, Some(vec![2u8; 3]));
    assert_eq!(store.get("job:a:nope")?, None);
    assert!(store.exists("job:a:0")?);
    assert!(!store.exists("job:a:nope")?);
    assert_eq!(
        store.keys("job:a:")?,
        vec!["job:a:0", "job:a:1", "job:a:2", "job:a:3"]
    );
    store.delete("job:a:0")?;
    assert!(!store.exists("job:a:0")?);
    store.put("empty", b"")?;
    assert_eq!(store.get("empty")?, Some(Vec::new()));
    assert_eq!(server.dbsize(), 4);

    let t = Tensor::new(&[[1f32, -2.5], [3.0, 4.25]], &Device::Cpu)?;
    put_tensor(store.as_ref(), "t", &t)?;
    let back = get_tensor(store.as_ref(), "t", &Device::Cpu)?;
    assert_eq!(back.to_vec2::<f32>()?, t.to_vec2::<f32>()?);
    assert!(matches!(
        get_tensor(store.as_ref(), "absent", &Device::Cpu),
        Err(StoreError::Missing(k)) if k == "absent"
    ));

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct State {
        stage: usize,
        step: usize,
    }
    put_json(store.as_ref(), "state", &State { stage: 1, step: 7 })?;
    assert_eq!(
        get_json::<State>(store.as_ref(), "state")?,
        State { stage: 1, step: 7 }
    );
    Ok(())
}

#[test]
fn delete_prefix_removes_exactly_the_prefix() -> TestResult {
    let server = RedisServer::start();
    let rt = runtime();
    let store = rt.block_on(RedisStore::connect(&server.url(), RedisOptions::default()))?;
    for key in ["job:a:x", "job:a:y", "job:a1:x", "job:a", "job:b:x"] {
        store.put(key, b"1")?;
    }
    // Glob characters in a prefix are literal: `job:*:` must not match `job:a:`.
    for key in ["job:*:x", "job:?:x", "job:[a]:x", r"job:\:x"] {
        store.put(key, b"1")?;
    }
    assert_eq!(store.delete_prefix("job:*:")?, 1);
    assert_eq!(store.delete_prefix("job:?:")?, 1);
    assert_eq!(store.delete_prefix("job:[a]:")?, 1);
    assert_eq!(store.delete_prefix(r"job:\:")?, 1);
    assert_eq!(store.delete_prefix("job:a:")?, 2);
    assert_eq!(store.delete_prefix("job:a:")?, 0);
    assert_eq!(store.keys("job:")?, vec!["job:a", "job:a1:x", "job:b:x"]);
    Ok(())
}

#[test]
fn delete_prefix_handles_more_keys_than_one_batch() -> TestResult {
    let server = RedisServer::start();
    let rt = runtime();
    let store = rt.block_on(RedisStore::connect(&server.url(), RedisOptions::default()))?;
    let items: Vec<(String, Vec<u8>)> = (0..25_000)
        .map(|i| (format!("big:{i:05}"), vec![1]))
        .collect();
    store.put_many(&items)?;
    store.put("bigger", b"stays")?;
    assert_eq!(store.keys("big:")?.len(), 25_000);
    assert_eq!(store.delete_prefix("big:")?, 25_000);
    assert_eq!(server.dbsize(), 1);
    Ok(())
}

#[test]
fn guarded_writes_and_batches() -> TestResult {
    let server = RedisServer::start();
    let rt = runtime();
    let store = rt.block_on(RedisStore::connect(&server.url(), RedisOptions::default()))?;
    let (input, output) = ("job:j:s0:t1:task0:in", "job:j:s0:t1:task0:out");

    assert!(!store.put_guarded(input, output, b"early")?);
    assert!(!store.exists(output)?);
    store.put(input, b"in")?;
    assert!(store.put_guarded(input, output, b"result")?);
    assert_eq!(store.get(output)?, Some(b"result".to_vec()));
    // The coordinator merges the step and deletes it; a late result must not come back.
    store.delete_prefix("job:j:s0:t1:")?;
    assert!(!store.put_guarded(input, output, b"late")?);
    assert_eq!(server.dbsize(), 0);

    let items = vec![
        ("m:a".to_string(), b"1".to_vec()),
        ("m:b".to_string(), vec![0u8, 255, 10]),
    ];
    store.put_many(&items)?;
    let got = store.get_many(&["m:b".into(), "m:none".into(), "m:a".into()])?;
    assert_eq!(
        got,
        vec![Some(vec![0u8, 255, 10]), None, Some(b"1".to_vec())]
    );
    assert_eq!(store.get_many(&[])?, Vec::<Option<Vec<u8>>>::new());
    store.put_many(&[])?;
    Ok(())
}

#[test]
fn fenced_writes_land_only_while_the_fence_holds_the_token() -> TestResult {
    let server = RedisServer::start();
    let rt = runtime();
    let plain = rt.block_on(RedisStore::connect(&server.url(), RedisOptions::default()))?;
    plain.put("lock", b"me#1")?;
    let me = plain.fenced("lock", "me#1", Duration::from_secs(5));
    let items = vec![
        ("j:a".to_string(), b"1".to_vec()),
        ("j:b".into(), b"2".to_vec()),
    ];
    me.put_many(&items)?;
    me.put("j:in", b"in")?;
    assert!(me.put_guarded("j:in", "j:out", b"out")?);
    assert!(!me.put_guarded("j:gone", "j:late", b"x")?);
    let mut batch = WriteBatch::new();
    batch
        .zadd("q", "job1", -4398046511104000.0)
        .sadd("s", "job1")
        .set_px("j:ttl", b"t", Duration::from_secs(60));
    rt.block_on(me.write_batch("batch", &batch))?;
    assert_eq!(
        plain.keys("j:")?,
        vec!["j:a", "j:b", "j:in", "j:out", "j:ttl"]
    );
    assert_eq!(
        rt.block_on(me.expire_prefix("j:", Duration::from_secs(60)))?,
        5
    );
    assert!(!me.fence_lost());

    // Another holder takes the lock: every write of the old one is refused, none lands.
    plain.put("lock", b"other#2")?;
    let refused = |r: Result<(), StoreError>| matches!(r, Err(StoreError::Fenced(_)));
    assert!(refused(me.put("j:a", b"stale")));
    assert!(refused(me.put_many(&items)));
    assert!(refused(me.delete("j:b")));
    assert!(refused(me.delete_prefix("j:").map(drop)));
    assert!(refused(me.put_guarded("j:in", "j:out", b"x").map(drop)));
    assert!(refused(
        rt.block_on(me.write_batch("batch", &batch)).map(drop)
    ));
    assert!(me.fence_lost());
    assert_eq!(plain.get("j:a")?, Some(b"1".to_vec()));
    assert_eq!(plain.keys("j:")?.len(), 5);
    // Clones share the fence; an unfenced store is not affected.
    assert!(me.clone().fence_lost());
    plain.delete_prefix("j:")?;
    assert!(plain.keys("j:")?.is_empty());
    // A lock that expired with nobody taking it is taken again by the next write.
    plain.delete("lock")?;
    let again = plain.fenced("lock", "me#1", Duration::from_secs(5));
    again.put("k", b"v")?;
    assert_eq!(plain.get("lock")?, Some(b"me#1".to_vec()));
    assert_eq!(plain.get("k")?, Some(b"v".to_vec()));
    assert!(!again.fence_lost());
    // Redis lost its scripts (as a restart loses them): the next fenced write loads the
    // script again and lands, every byte of a binary value as it was.
    rt.block_on(plain.with_retry("SCRIPT FLUSH", |mut c| async move {
        redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async::<()>(&mut c)
            .await
    }))?;
    let bytes: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    again.put("bin", &bytes)?;
    assert_eq!(plain.get("bin")?, Some(bytes));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttls_expire() -> TestResult {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url(), RedisOptions::default()).await?;
    store
        .put_ex("hb:w1", b"alive", Duration::from_millis(150))
        .await?;
    assert!(store.exists_async("hb:w1").await?);
    store.put_async("job:done:a", b"1").await?;
    store.put_async("job:done:b", b"2").await?;
    store.put_async("job:done2:a", b"3").await?;
    store.put_async("lone", b"4").await?;
    assert!(store.expire("lone", Duration::from_millis(150)).await?);
    assert!(!store.expire("absent", Duration::from_secs(1)).await?);
    assert_eq!(
        store
            .expire_prefix("job:done:", Duration::from_millis(150))
            .await?,
        2
    );

    let deadline = Instant::now() + Duration::from_secs(3);
    while store.dbsize().await? > 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(store.keys_async("").await?, vec!["job:done2:a"]);
    Ok(())
}

#[test]
fn passwords_are_checked_and_auth_errors_are_not_retried() -> TestResult {
    let server = RedisServer::start_with(RedisServerOptions {
        password: Some("s3cret".into()),
        ..RedisServerOptions::default()
    });
    let rt = runtime();
    let store = rt.block_on(RedisStore::connect(&server.url(), RedisOptions::default()))?;
    store.put("k", b"v")?;
    assert_eq!(store.get("k")?, Some(b"v".to_vec()));

    let port = server.port();
    let cases = [
        (format!("redis://127.0.0.1:{port}/0"), "NOAUTH"),
        (
            format!("redis://:wrong-pass@127.0.0.1:{port}/0"),
            "password",
        ),
    ];
    for (url, expected) in cases {
        let start = Instant::now();
        // retry_for is long: the error must come from not retrying, not from giving up.
        let err = rt
            .block_on(RedisStore::connect(&url, RedisOptions::default()))
            .expect_err("connecting with a bad password must fail");
        let message = err.to_string();
        assert!(start.elapsed() < Duration::from_secs(3), "{message}");
        assert!(message.contains(expected), "{message}");
        assert!(message.contains("check the password"), "{message}");
        assert!(
            !message.contains("wrong-pass"),
            "password leaked: {message}"
        );
    }
    Ok(())
}

#[test]
fn an_absent_server_fails_after_retry_for_naming_the_url() {
    // A port nothing listens on: start a server, note its port, stop it.
    let port = RedisServer::start().port();
    let rt = runtime();
    let url = format!("redis://:hidden@127.0.0.1:{port}/0");
    let start = Instant::now();
    let err = rt
        .block_on(RedisStore::connect(
            &url,
            options(Duration::from_millis(300)),
        ))
        .expect_err("nothing listens there");
    let message = err.to_string();
    assert!(matches!(err, StoreError::Unavailable(_)), "{message}");
    assert!(start.elapsed() < Duration::from_secs(3), "{message}");
    assert!(
        message.contains(&format!("redis://:***@127.0.0.1:{port}/0")),
        "{message}"
    );
    assert!(message.contains("redis-server is running"), "{message}");
}

#[test]
fn a_put_during_an_outage_completes_once_redis_is_back() -> TestResult {
    let mut server = RedisServer::start_with(RedisServerOptions {
        aof: true,
        ..RedisServerOptions::default()
    });
    let rt = runtime();
    let store = rt.block_on(RedisStore::connect(
        &server.url(),
        options(Duration::from_secs(20)),
    ))?;
    let items: Vec<(String, Vec<u8>)> = (0..100)
        .map(|i| (format!("job:a:{i:03}"), vec![i as u8; 64]))
        .collect();
    store.put_many(&items)?;

    server.kill();
    let writer = {
        let store = store.clone();
        thread::spawn(move || {
            let start = Instant::now();
            store
                .put("job:a:late", b"made it")
                .map(|()| start.elapsed())
        })
    };
    thread::sleep(Duration::from_secs(1));
    server.restart();
    let waited = writer.join().expect("writer thread")?;
    assert!(waited >= Duration::from_millis(900), "{waited:?}");

    let keys: Vec<String> = items.iter().map(|(k, _)| k.clone()).collect();
    let back = store.get_many(&keys)?;
    assert!(back
        .iter()
        .zip(&items)
        .all(|(got, (_, want))| got.as_ref() == Some(want)));
    assert_eq!(store.get("job:a:late")?, Some(b"made it".to_vec()));
    assert_eq!(server.dbsize(), 101);
    Ok(())
}

#[test]
fn an_outage_longer_than_retry_for_fails_the_command() -> TestResult {
    let mut server = RedisServer::start();
    let rt = runtime();
    let store = rt.block_on(RedisStore::connect(
        &server.url(),
        options(Duration::from_millis(400)),
    ))?;
    store.put("k", b"v")?;
    server.kill();
    let start = Instant::now();
    let err = store.get("k").expect_err("Redis is gone");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
    assert!(start.elapsed() < Duration::from_secs(3), "{err}");
    assert!(err.to_string().contains("GET k"), "{err}");
    Ok(())
}

#[test]
fn server_errors_are_not_retried() -> TestResult {
    let server = RedisServer::start();
    let rt = runtime();
    let store = rt.block_on(RedisStore::connect(&server.url(), RedisOptions::default()))?;
    rt.block_on(store.with_retry("LPUSH list", |mut c| async move {
        redis::cmd("LPUSH")
            .arg("list")
            .arg("x")
            .query_async::<usize>(&mut c)
            .await
    }))?;
    let start = Instant::now();
    let err = store.get("list").expect_err("GET of a list");
    assert!(start.elapsed() < Duration::from_secs(1));
    match err {
        StoreError::Rejected { what, message } => {
            assert_eq!(what, "GET list");
            assert!(message.contains("WRONGTYPE"), "{message}");
        }
        other => panic!("expected Rejected, got {other:?}"),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sync_trait_works_inside_a_multi_thread_runtime() -> TestResult {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url(), RedisOptions::default()).await?;
    // On a runtime worker: block_in_place.
    store.put("k", b"from a worker")?;
    assert_eq!(store.get_async("k").await?, Some(b"from a worker".to_vec()));
    // On the blocking pool, as the engine runs.
    let s = store.clone();
    let got = tokio::task::spawn_blocking(move || s.get("k")).await??;
    assert_eq!(got, Some(b"from a worker".to_vec()));
    Ok(())
}

#[tokio::test]
async fn the_sync_trait_refuses_a_current_thread_runtime() -> TestResult {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url(), RedisOptions::default()).await?;
    let err = store.put("k", b"v").expect_err("would deadlock");
    assert!(err.to_string().contains("current-thread"), "{err}");
    store.put_async("k", b"v").await?;
    Ok(())
}

#[test]
fn tls_works_with_the_servers_ca_and_fails_at_once_without_it() -> TestResult {
    let server = RedisServer::start_with(RedisServerOptions {
        tls: true,
        password: Some("pw".into()),
        ..RedisServerOptions::default()
    });
    assert!(server.url().starts_with("rediss://"));
    let rt = runtime();
    let trusted = RedisOptions {
        ca: server.ca(),
        ..RedisOptions::default()
    };
    let store = rt.block_on(RedisStore::connect(&server.url(), trusted))?;
    store.put("k", b"over tls")?;
    assert_eq!(store.get("k")?, Some(b"over tls".to_vec()));

    // The system's roots do not know the test CA: no retry helps that.
    let start = Instant::now();
    let err = rt
        .block_on(RedisStore::connect(&server.url(), RedisOptions::default()))
        .expect_err("untrusted certificate");
    let message = err.to_string();
    assert!(start.elapsed() < Duration::from_secs(3), "{message}");
    assert!(message.contains("certificate"), "{message}");

    let plain = format!("redis://127.0.0.1:{}/0", server.port());
    let err = rt
        .block_on(RedisStore::connect(
            &plain,
            RedisOptions {
                ca: server.ca(),
                ..RedisOptions::default()
            },
        ))
        .expect_err("a CA for a plain URL");
    assert!(err.to_string().contains("not rediss://"), "{err}");
    Ok(())
}

/// The store on a real 3-shard Redis Cluster (`tessera_harness::RedisCluster`): the same API
/// as on one Redis, with the job layout's keys spread over the shards, batches, scripts and
/// prefix deletes working across slots, the fence copied into every bucket, and a shard
/// restart ridden out. One cluster for all the checks: forming one takes a few seconds.
mod cluster {
    use super::*;
    use tessera_harness::RedisCluster;
    use tessera_store::keys;

    #[test]
    fn the_store_works_across_the_shards_of_a_redis_cluster() -> TestResult {
        let mut cluster = RedisCluster::start(3, RedisServerOptions::default());
        let rt = runtime();
        let store = rt.block_on(RedisStore::connect(
            &cluster.url(),
            options(Duration::from_secs(60)),
        ))?;
        assert!(store.is_cluster());

        // A step's task keys, written with one batch, land on every shard and read back in one
        // MGET across slots.
        let job = "abc:i0";
        let inputs: Vec<(String, Vec<u8>)> = (0..60)
            .map(|t| (keys::task(job, 1, 2, t, "in"), vec![t as u8; 100]))
            .collect();
        store.put_many(&inputs)?;
        let names: Vec<String> = inputs.iter().map(|(k, _)| k.clone()).collect();
        let got = store.get_many(&names)?;
        assert!(got
            .iter()
            .zip(&inputs)
            .all(|(g, (_, v))| g.as_ref() == Some(v)));
        let per_shard: Vec<usize> = cluster.nodes.iter().map(RedisServer::dbsize).collect();
        assert!(
            per_shard.iter().all(|&n| n > 5),
            "keys per shard {per_shard:?}"
        );

        // Guarded writes (guard and output share their task's slot), a scan over every master,
        // and a prefix delete that reaches every shard.
        let out = keys::task(job, 1, 2, 7, "out");
        assert!(store.put_guarded(&names[7], &out, b"late")?);
        assert!(!store.put_guarded(
            &keys::task(job, 1, 2, 99, "in"),
            &keys::task(job, 1, 2, 99, "out"),
            b"x"
        )?);
        let step = keys::step_prefix(job, 1, 2);
        assert_eq!(store.keys(&step)?.len(), 61);
        let exists =
            rt.block_on(store.exists_many_async(&[names[0].clone(), out.clone(), "nope".into()]))?;
        assert_eq!(exists, [true, true, false]);
        assert_eq!(store.delete_prefix(&step)?, 61);
        assert_eq!(
            cluster.nodes.iter().map(RedisServer::dbsize).sum::<usize>(),
            0
        );

        // One node of the cluster given as redis://: a key of another shard's slot says so.
        let plain = rt.block_on(RedisStore::connect(
            &cluster.nodes[0].url(),
            RedisOptions::default(),
        ))?;
        let elsewhere = names
            .iter()
            .find(|k| plain.get(k).is_err())
            .expect("some key lies on another shard");
        let err = plain.put(elsewhere, b"x").expect_err("MOVED");
        assert!(err.to_string().contains("redis-cluster://"), "{err}");

        fences_hold_on_every_shard(&rt, &store)?;
        a_restart_stalls_a_write_that_then_lands(&mut cluster, &rt, &store, &[2])?;
        // Every shard at once: the client finds no node at all for a while.
        a_restart_stalls_a_write_that_then_lands(&mut cluster, &rt, &store, &[0, 1, 2])?;
        Ok(())
    }

    /// A stale coordinator's writes are refused on every shard once its successor armed the
    /// fence, and the stale one cannot arm it back.
    fn fences_hold_on_every_shard(rt: &tokio::runtime::Runtime, store: &RedisStore) -> TestResult {
        let ttl = Duration::from_secs(30);
        let old = store.fenced(keys::COORDINATOR_LOCK, "old#1", ttl);
        rt.block_on(store.put_async(keys::COORDINATOR_LOCK, b"old#1"))?;
        rt.block_on(old.arm_fence())?;
        let bulk: Vec<String> = (0..20).map(|t| keys::task("j", 0, 1, t, "in")).collect();
        for key in &bulk {
            old.put(key, b"v")?;
        }
        let mut batch = WriteBatch::new();
        batch
            .set(&keys::job_record("j"), b"{}")
            .zadd(keys::JOB_QUEUE, "j", 1.0);
        rt.block_on(old.write_batch("submit", &batch))?;

        // The successor takes the lock and arms the fence.
        rt.block_on(store.put_async(keys::COORDINATOR_LOCK, b"new#2"))?;
        let new = store.fenced(keys::COORDINATOR_LOCK, "new#2", ttl);
        rt.block_on(new.arm_fence())?;
        for key in &bulk {
            assert!(
                matches!(old.put(key, b"stale"), Err(StoreError::Fenced(_))),
                "{key}"
            );
            new.put(key, b"fresh")?;
        }
        assert!(matches!(
            rt.block_on(old.write_batch("submit", &batch)),
            Err(StoreError::Fenced(_))
        ));
        assert!(matches!(
            old.delete_prefix(&keys::job_prefix("j")),
            Err(StoreError::Fenced(_))
        ));
        assert!(old.fence_lost());
        assert!(matches!(
            rt.block_on(old.arm_fence()),
            Err(StoreError::Fenced(_))
        ));
        new.put(&bulk[3], b"still ours")?;
        assert_eq!(store.get(&bulk[3])?, Some(b"still ours".to_vec()));
        assert!(new.delete_prefix(&keys::job_prefix("j"))? >= 21);
        Ok(())
    }

    /// Shards killed and restarted (AOF on) stall the writes to their slots, which then land.
    fn a_restart_stalls_a_write_that_then_lands(
        cluster: &mut RedisCluster,
        rt: &tokio::runtime::Runtime,
        store: &RedisStore,
        shards: &[usize],
    ) -> TestResult {
        let keys: Vec<String> = (0..30).map(|t| keys::task("r", 0, 1, t, "in")).collect();
        for k in &keys {
            store.put(k, b"before")?;
        }
        for &i in shards {
            cluster.kill_shard(i);
        }
        let writer = {
            let store = store.clone();
            let keys = keys.clone();
            rt.spawn(async move {
                for k in &keys {
                    store.put_async(k, b"after").await?;
                }
                Ok::<_, StoreError>(())
            })
        };
        std::thread::sleep(Duration::from_secs(2));
        for &i in shards {
            cluster.nodes[i].restart();
        }
        cluster.wait_ready();
        rt.block_on(writer)??;
        for k in &keys {
            assert_eq!(store.get(k)?, Some(b"after".to_vec()), "{k}");
        }
        Ok(())
    }

    #[test]
    fn a_cluster_url_to_one_redis_and_a_plain_url_to_a_cluster_say_what_to_change() {
        let one = RedisServer::start();
        let rt = runtime();
        let url = format!("redis-cluster://127.0.0.1:{}", one.port());
        let err = rt
            .block_on(RedisStore::connect(&url, options(Duration::from_secs(5))))
            .expect_err("one Redis is not a cluster");
        assert!(
            err.to_string().contains("not a Redis Cluster node"),
            "{err}"
        );
        let err = rt
            .block_on(RedisStore::connect(
                "redis-cluster://127.0.0.1",
                RedisOptions::default(),
            ))
            .expect_err("no port");
        assert!(err.to_string().contains("HOST:PORT"), "{err}");
    }
}
