//! What an HTTP client can make the cloud spend: descriptors (connections), the time a
//! connection may sit without sending a request, and how many API requests run at once; and
//! what the cloud says when its disk refuses a write. A real `tiervec-cloud serve` child process
//! on loopback, under the descriptor soft limit a service gets by default (1,024), not this
//! machine's larger one, or under a file size limit.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tiervec_test_support::process::ChildGuard;
use tiervec_test_support::vectors::vector;

/// The soft descriptor limit of a service started by a stock init system.
const SERVICE_NOFILE: u64 = 1_024;

/// Resource limits a cloud process starts under.
#[derive(Clone, Copy)]
struct Limits {
    /// Soft `RLIMIT_NOFILE`.
    nofile: u64,
    /// Soft `RLIMIT_FSIZE` (bytes a file may grow to), with `SIGXFSZ` ignored so that a write
    /// past it fails with `EFBIG` as a full disk fails with `ENOSPC`; `None`: unlimited.
    file_size: Option<u64>,
}

const SERVICE_LIMITS: Limits = Limits {
    nofile: SERVICE_NOFILE,
    file_size: None,
};

/// Starts the cloud under `limits` with the `--set` overrides; returns once its HTTP address
/// is known.
fn spawn(dir: &Path, limits: Limits, overrides: &[&str]) -> (ChildGuard, String) {
    let addr_file = dir.join("addr");
    // A restart in the same folder must not read its predecessor's address.
    let _ = std::fs::remove_file(&addr_file);
    let log = std::fs::File::create(dir.join("server.log")).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_tiervec-cloud"));
    command
        .arg("serve")
        .arg("--set")
        .arg(format!("data_dir={:?}", dir.join("data").to_str().unwrap()))
        .arg("--set")
        .arg("http_addr=\"127.0.0.1:0\"")
        .arg("--addr-file")
        .arg(&addr_file)
        .stdout(Stdio::null())
        .stderr(log);
    for o in overrides {
        command.arg("--set").arg(o);
    }
    // SAFETY: between fork and exec only getrlimit, setrlimit and signal run, which are
    // async-signal-safe. An ignored signal stays ignored across exec.
    unsafe {
        command.pre_exec(move || {
            let mut wanted = vec![(libc::RLIMIT_NOFILE, limits.nofile)];
            if let Some(bytes) = limits.file_size {
                wanted.push((libc::RLIMIT_FSIZE, bytes));
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            }
            for (resource, soft) in wanted {
                let mut limit = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                if libc::getrlimit(resource, &mut limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                limit.rlim_cur = soft.min(limit.rlim_max);
                if libc::setrlimit(resource, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = ChildGuard::new(command.spawn().unwrap());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(a) = std::fs::read_to_string(&addr_file) {
            return (child, a);
        }
        assert!(Instant::now() < deadline, "the cloud did not start");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A new client: its requests open a connection of their own.
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

async fn wait_ready(http: &reqwest::Client, addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(r) = http.get(format!("http://{addr}/readyz")).send().await
            && r.status().is_success()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the cloud never became ready");
}

fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// 1,100 idle TCP connections (no request, no key) against a cloud whose descriptor soft limit
/// is 1,024: it keeps answering new clients, keeps taking durable writes, and its `/readyz`
/// says so truthfully; it never holds more descriptors than it may.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_past_the_descriptor_limit_do_not_stop_the_cloud() {
    let dir = tempfile::tempdir().unwrap();
    let (server, addr) = spawn(dir.path(), SERVICE_LIMITS, &[]);
    let http = client();
    wait_ready(&http, &addr).await;

    let idle: Vec<TcpStream> = (0..1_100)
        .map(|_| TcpStream::connect(&addr).expect("connect"))
        .collect();
    // Let the cloud accept what it will.
    std::thread::sleep(Duration::from_millis(500));
    let descriptors = open_descriptors(server.id());
    assert!(
        descriptors < SERVICE_NOFILE as usize,
        "{descriptors} descriptors open"
    );

    let started = Instant::now();
    let r = client()
        .post(format!("http://{addr}/v1/collections"))
        .json(&json!({"name": "docs", "dim": 8, "metric": "l2"}))
        .send()
        .await
        .expect("a new client gets an answer");
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let points: Vec<Value> = (0..100)
        .map(|i| json!({"id": i, "vector": vector(i, 8)}))
        .collect();
    let r = client()
        .put(format!("http://{addr}/v1/collections/docs/points"))
        .json(&json!({ "points": points }))
        .send()
        .await
        .expect("a durable write gets an answer");
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let r = client()
        .post(format!("http://{addr}/v1/collections/docs/search"))
        .json(&json!({"vector": vector(7, 8), "k": 1}))
        .send()
        .await
        .unwrap();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["hits"][0]["id"], 7, "{body}");
    let r = client()
        .get(format!("http://{addr}/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["log_writable"], true, "{body}");
    eprintln!(
        "4 requests from new clients behind 1,100 idle connections: {:?}",
        started.elapsed()
    );
    drop(idle);
}

/// Limit + 1 for each HTTP limit, with small limits set: one connection past the cap closes
/// the longest-idle one; a connection that sends nothing is closed after the header timeout;
/// one request past the concurrency limit answers 503 `overloaded` at once; a request past its
/// deadline answers 503 `deadline_exceeded`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_http_limit_holds_at_limit_plus_one() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, addr) = spawn(
        dir.path(),
        SERVICE_LIMITS,
        &[
            "http.max_connections=4",
            "http.header_timeout_ms=1000",
            "http.max_concurrent_requests=1",
            "http.request_timeout_ms=1500",
        ],
    );
    let http = client();
    wait_ready(&http, &addr).await;
    drop(http);
    std::thread::sleep(Duration::from_millis(100));

    // The connection cap: four idle connections fill it; a fifth client is served and the
    // longest-idle connection is closed to make room.
    let mut idle: Vec<TcpStream> = (0..4)
        .map(|_| {
            let s = TcpStream::connect(&addr).unwrap();
            std::thread::sleep(Duration::from_millis(20));
            s
        })
        .collect();
    let r = client()
        .get(format!("http://{addr}/v1/collections"))
        .send()
        .await
        .expect("served past the cap");
    assert_eq!(r.status(), 200);
    idle[0]
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut byte = [0u8; 1];
    assert_eq!(
        idle[0].read(&mut byte).ok(),
        Some(0),
        "the longest-idle connection was closed"
    );
    drop(idle);

    // The header timeout: a connection that sends nothing is closed, and one that sends half
    // a request head too.
    for partial in [&b""[..], b"GET /v1/collections HTTP/1.1\r\nHost: x\r\n"] {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.write_all(partial).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let started = Instant::now();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(800) && waited < Duration::from_secs(4),
            "closed after {waited:?} ({partial:?})"
        );
    }

    // The request limit: a write whose body never finishes holds the one permit; the next
    // request is refused at once; the held one answers when its deadline passes.
    let r = client()
        .post(format!("http://{addr}/v1/collections"))
        .json(&json!({"name": "docs", "dim": 8, "metric": "l2"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let mut held = TcpStream::connect(&addr).unwrap();
    held.write_all(
        b"PUT /v1/collections/docs/points HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"points\": [",
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    let r = client()
        .get(format!("http://{addr}/v1/collections"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], "overloaded", "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "refused at once"
    );
    let r = client()
        .get(format!("http://{addr}/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "probes bypass the request limit");

    held.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut answer = vec![0u8; 4096];
    let n = held.read(&mut answer).unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("deadline_exceeded"), "{answer}");
    let r = client()
        .get(format!("http://{addr}/v1/collections"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the permit came back");
}

/// A write the disk refuses (here a file size limit: `EFBIG`, as a full disk gives `ENOSPC`)
/// is answered `storage_error` and stops the log: later writes are refused at once, never
/// acknowledged, `/readyz` turns 503 saying the log is not writable and why, and searches go on.
/// Restarted without the limit, the cloud holds every write it acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_the_disk_refuses_stops_the_log_and_readyz_says_so() {
    const DIM: usize = 8;
    let dir = tempfile::tempdir().unwrap();
    let limited = Limits {
        file_size: Some(2 << 20),
        ..SERVICE_LIMITS
    };
    let (server, addr) = spawn(dir.path(), limited, &[]);
    let http = client();
    wait_ready(&http, &addr).await;
    let r = http
        .post(format!("http://{addr}/v1/collections"))
        .json(&json!({"name": "docs", "dim": DIM, "metric": "l2"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let upsert = |first: u64| {
        let points: Vec<Value> = (first..first + 500)
            .map(|i| json!({"id": i, "vector": vector(i, DIM)}))
            .collect();
        http.put(format!("http://{addr}/v1/collections/docs/points"))
            .json(&json!({ "points": points }))
            .send()
    };
    let mut acknowledged = 0;
    let refusal = loop {
        let r = upsert(acknowledged).await.unwrap();
        if r.status() != 200 {
            break (r.status().as_u16(), r.json::<Value>().await.unwrap());
        }
        acknowledged += 500;
        assert!(acknowledged < 1_000_000, "the file size limit never bit");
    };
    assert_eq!(refusal.0, 500, "{refusal:?}");
    assert_eq!(refusal.1["code"], "storage_error", "{refusal:?}");
    let r = http
        .get(format!("http://{addr}/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let readiness: Value = r.json().await.unwrap();
    assert_eq!(
        (
            &readiness["ready"],
            &readiness["recovered"],
            &readiness["log_writable"]
        ),
        (&json!(false), &json!(true), &json!(false)),
        "{readiness}"
    );
    assert!(readiness["log_error"].is_string(), "{readiness}");
    // Stopped, not wedged: the next write is refused at once.
    let started = Instant::now();
    let r = upsert(acknowledged).await.unwrap();
    assert_eq!(r.status(), 500);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refused at once"
    );
    let r = http
        .post(format!("http://{addr}/v1/collections/docs/search"))
        .json(&json!({"vector": vector(3, DIM), "k": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "reads go on");
    drop(server);

    let (_server, addr) = spawn(dir.path(), SERVICE_LIMITS, &[]);
    wait_ready(&http, &addr).await;
    let r = http
        .get(format!("http://{addr}/v1/collections/docs"))
        .send()
        .await
        .unwrap();
    let description: Value = r.json().await.unwrap();
    assert!(
        description["points"].as_u64().unwrap() >= acknowledged,
        "{acknowledged} acknowledged, {description}"
    );
    for id in [0, acknowledged / 2, acknowledged - 1] {
        let r = http
            .get(format!("http://{addr}/v1/collections/docs/points/{id}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "acknowledged point {id}");
    }
}

/// A checkpoint the disk refuses (here a directory where its file goes) is retried after a
/// growing wait, 1 s doubling to 60 s, not at every maintenance pass (20 ms) copying every
/// vector each time: a few failures in 4 s, each counted and shown in `/readyz`'s
/// `checkpoint_error`, writes still taken; once the disk takes it, the next one succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_the_disk_refuses_is_retried_after_a_growing_wait() {
    const DIM: usize = 8;
    let dir = tempfile::tempdir().unwrap();
    // Writes 1 (the collection) to 3 each make the log pass its checkpoint threshold.
    let blockers: Vec<_> = (1..=3)
        .map(|lsn| dir.path().join(format!("data/checkpoint-{lsn:020}.tvck")))
        .collect();
    let (_server, addr) = spawn(dir.path(), SERVICE_LIMITS, &["checkpoint_wal_bytes=1"]);
    let http = client();
    wait_ready(&http, &addr).await;
    // After recovery, which would take them for checkpoints.
    for b in &blockers {
        std::fs::create_dir_all(b.join("in-the-way")).unwrap();
    }
    let r = http
        .post(format!("http://{addr}/v1/collections"))
        .json(&json!({"name": "docs", "dim": DIM, "metric": "l2"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    for first in [0, 100] {
        let points: Vec<Value> = (first..first + 100)
            .map(|i| json!({"id": i, "vector": vector(i, DIM)}))
            .collect();
        let r = http
            .put(format!("http://{addr}/v1/collections/docs/points"))
            .json(&json!({ "points": points }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "writes go on while checkpoints fail");
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    let failures = checkpoint_failures(&http, &addr).await;
    assert!(
        (1..=5).contains(&failures),
        "{failures} failed checkpoints in 4 s"
    );
    let r = http
        .get(format!("http://{addr}/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        200,
        "a failing checkpoint leaves the node ready"
    );
    let readiness: Value = r.json().await.unwrap();
    assert!(readiness["checkpoint_error"].is_string(), "{readiness}");

    for b in &blockers {
        std::fs::remove_dir_all(b).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(70);
    loop {
        let readiness: Value = http
            .get(format!("http://{addr}/readyz"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if readiness["checkpoint_error"].is_null() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no checkpoint after the disk took them again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        std::fs::read_dir(dir.path().join("data"))
            .unwrap()
            .any(|e| e.unwrap().file_name().to_string_lossy().ends_with(".tvck")),
        "a checkpoint file"
    );
}

/// `tiervec_checkpoint_failures_total` from the cloud's `/metrics`.
async fn checkpoint_failures(http: &reqwest::Client, addr: &str) -> u64 {
    let text = http
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("tiervec_checkpoint_failures_total "))
        .map_or(0, |n| n.trim().parse().unwrap())
}
