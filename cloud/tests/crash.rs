//! Crash test: `tiervec-cloud serve` as a real child process, concurrent writers, `kill -9` at
//! random moments, restart, and check that every acknowledged write is there, that no
//! unacknowledged batch is half-applied, and that no id is duplicated. 20 rounds, ≤ 5,000 ids.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Value, json};
use tiervec_test_support::process::ChildGuard;
use tiervec_test_support::vectors::family_vector;

const DIM: usize = 16;
const MAX_IDS: u64 = 5_000;
const BATCH: u64 = 10;
const ROUNDS: usize = 20;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// The vector written for `id` at `version`: the shared hash-seeded family `version`, shifted
/// so every component is positive (in `[0.5, 1.5)`), never a zero vector.
fn vector(id: u64, version: u64) -> Vec<f32> {
    family_vector(version, id, DIM)
        .into_iter()
        .map(|x| x + 1.0)
        .collect()
}

/// Starts the server; the guard kills it however the test ends, so a failed assertion leaves
/// no process behind.
fn spawn(dir: &Path) -> (ChildGuard, String) {
    let addr_file = dir.join("addr");
    let _ = std::fs::remove_file(&addr_file);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("server.log"))
        .unwrap();
    let child = ChildGuard::new(
        Command::new(env!("CARGO_BIN_EXE_tiervec-cloud"))
            .arg("serve")
            .arg("--set")
            .arg(format!("data_dir={:?}", dir.join("data").to_str().unwrap()))
            .arg("--set")
            .arg("http_addr=\"127.0.0.1:0\"")
            .arg("--addr-file")
            .arg(&addr_file)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(a) = std::fs::read_to_string(&addr_file) {
            return (child, format!("http://{a}"));
        }
        assert!(Instant::now() < deadline, "server did not start");
        std::thread::sleep(Duration::from_millis(5));
    }
}

async fn wait_ready(http: &reqwest::Client, base: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(r) = http.get(format!("{base}/readyz")).send().await
            && r.status().is_success()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("server not ready");
}

/// A batch sent to the server: the same version for every id in it.
#[derive(Clone, Debug)]
struct Batch {
    ids: Vec<u64>,
    version: u64,
}

#[derive(Default)]
struct Ledger {
    /// Latest acknowledged write per id: `(lsn, version)`. Concurrent batches reach the WAL in
    /// any order, so the LSN, not the version, says which write is the newest.
    acked: HashMap<u64, (u64, u64)>,
    /// Batches sent whose answer never came.
    in_flight: Vec<Batch>,
    next_id: u64,
    next_version: u64,
}

/// The stored `(lsn, version)` of `id`, checking that its vector is the one written with it.
async fn read_version(http: &reqwest::Client, base: &str, id: u64) -> Option<(u64, u64)> {
    let r = http
        .get(format!("{base}/v1/collections/c/points/{id}"))
        .send()
        .await
        .unwrap();
    if r.status() == reqwest::StatusCode::NOT_FOUND {
        return None;
    }
    let v: Value = r.json().await.unwrap();
    let version = v["payload"]["v"].as_u64().unwrap();
    let got: Vec<f32> = serde_json::from_value(v["vector"].clone()).unwrap();
    let mut want = vector(id, version);
    tiervec_shared::Metric::Cosine.prepare(&mut want);
    let err = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(
        err < 1e-6,
        "id {id}: stored vector is not the one written with version {version}"
    );
    Some((v["lsn"].as_u64().unwrap(), version))
}

async fn verify(http: &reqwest::Client, base: &str, ledger: &mut Ledger) {
    let mut ids: Vec<u64> = ledger.acked.keys().copied().collect();
    for b in &ledger.in_flight {
        ids.extend(&b.ids);
    }
    ids.sort_unstable();
    ids.dedup();
    let mut seen = HashMap::new();
    for chunk in ids.chunks(64) {
        let reads = chunk
            .iter()
            .map(|&id| async move { (id, read_version(http, base, id).await) });
        for (id, v) in futures_join(reads).await {
            seen.insert(id, v);
        }
    }
    for (&id, &(lsn, version)) in &ledger.acked {
        let (got_lsn, got) = seen[&id].unwrap_or_else(|| panic!("acknowledged id {id} is missing"));
        assert!(
            got_lsn >= lsn,
            "id {id}: acknowledged at LSN {lsn}, found older LSN {got_lsn}"
        );
        if got_lsn == lsn {
            assert_eq!(got, version, "id {id}: LSN {lsn} holds the wrong write");
        }
    }
    // An unacknowledged batch is all-or-nothing: if any id shows it, it was applied at one LSN,
    // and every other id of the batch shows it too or a newer write.
    for b in std::mem::take(&mut ledger.in_flight) {
        let showing: Vec<u64> = b
            .ids
            .iter()
            .filter_map(|id| seen[id].filter(|s| s.1 == b.version).map(|s| s.0))
            .collect();
        let Some(&applied_at) = showing.first() else {
            continue;
        };
        assert!(
            showing.iter().all(|&l| l == applied_at),
            "batch {b:?} applied at several LSNs"
        );
        for id in &b.ids {
            match seen[id] {
                Some((lsn, v)) if v == b.version || lsn > applied_at => {}
                other => panic!("batch {b:?} is half-applied: id {id} shows {other:?}"),
            }
            let e = ledger.acked.entry(*id).or_insert((applied_at, b.version));
            if applied_at > e.0 {
                *e = (applied_at, b.version);
            }
        }
    }
    // No duplicates: the live count is exactly the number of distinct ids present.
    let present = seen.values().filter(|v| v.is_some()).count();
    let desc: Value = http
        .get(format!("{base}/v1/collections/c"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        desc["points"].as_u64().unwrap() as usize,
        present,
        "duplicated or phantom points"
    );
}

async fn futures_join<F: std::future::Future>(fs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut set = Vec::new();
    for f in fs {
        set.push(f);
    }
    let mut out = Vec::with_capacity(set.len());
    for f in set {
        out.push(f.await);
    }
    out
}

async fn writer(http: reqwest::Client, base: String, ledger: Arc<Mutex<Ledger>>, mut rng: Rng) {
    loop {
        let batch = {
            let mut l = ledger.lock().unwrap();
            l.next_version += 1;
            let version = l.next_version;
            let ids: Vec<u64> = if l.next_id + BATCH <= MAX_IDS && !rng.next().is_multiple_of(3) {
                let start = l.next_id;
                l.next_id += BATCH;
                (start..start + BATCH).collect()
            } else if l.next_id > 0 {
                let mut ids: Vec<u64> = (0..BATCH).map(|_| rng.next() % l.next_id).collect();
                ids.sort_unstable();
                ids.dedup();
                ids
            } else {
                continue;
            };
            let b = Batch { ids, version };
            l.in_flight.push(b.clone());
            b
        };
        let points: Vec<Value> = batch
            .ids
            .iter()
            .map(|&id| json!({"id": id, "vector": vector(id, batch.version), "payload": {"v": batch.version}}))
            .collect();
        let sent = http
            .put(format!("{base}/v1/collections/c/points"))
            .json(&json!({"points": points}))
            .send()
            .await;
        let ack = match sent {
            Ok(r) if r.status().is_success() => r.json::<Value>().await.ok(),
            Ok(r) => panic!("write refused: {}", r.status()),
            Err(_) => None,
        };
        match ack.and_then(|a| a["lsn"].as_u64()) {
            Some(lsn) => {
                let mut l = ledger.lock().unwrap();
                l.in_flight.retain(|b| b.version != batch.version);
                for id in batch.ids {
                    let e = l.acked.entry(id).or_insert((lsn, batch.version));
                    if lsn > e.0 {
                        *e = (lsn, batch.version);
                    }
                }
            }
            // The server was killed: this batch stays in flight, to be judged after restart.
            None => return,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_never_loses_an_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let seed = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("crash test seed {seed}");
    let mut rng = Rng(seed);
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    for round in 0..ROUNDS {
        let (mut child, base) = spawn(dir.path());
        wait_ready(&http, &base).await;
        if round == 0 {
            let r = http
                .post(format!("{base}/v1/collections"))
                .json(&json!({"name": "c", "dim": DIM, "metric": "cosine"}))
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success());
        }
        {
            let mut l = std::mem::take(&mut *ledger.lock().unwrap());
            verify(&http, &base, &mut l).await;
            *ledger.lock().unwrap() = l;
        }
        let writers: Vec<_> = (0..4)
            .map(|w| {
                tokio::spawn(writer(
                    http.clone(),
                    base.clone(),
                    ledger.clone(),
                    Rng(rng.next() | (w + 1)),
                ))
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(30 + rng.next() % 300)).await;
        child.kill().unwrap();
        for w in writers {
            w.await.unwrap();
        }
    }
    let (child, base) = spawn(dir.path());
    wait_ready(&http, &base).await;
    let mut l = std::mem::take(&mut *ledger.lock().unwrap());
    verify(&http, &base, &mut l).await;
    assert!(
        l.acked.len() > 500,
        "only {} ids acknowledged over {ROUNDS} rounds",
        l.acked.len()
    );
    eprintln!(
        "{} ids acknowledged, all present after {ROUNDS} kill -9 rounds",
        l.acked.len()
    );
    drop(child);
}
