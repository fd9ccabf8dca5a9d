//! Crash test: `tiervec-cloud serve` as a real child process, concurrent writers, `kill -9` at
//! random moments, restart, and check that every acknowledged write is there, that no
//! unacknowledged batch is half-applied, and that no id is duplicated. 20 rounds, ≤ 5,000 ids.
//! And a torn last write whose body holds record-shaped bytes is cut at recovery.

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

/// Record-shaped bytes, as a client would forge them inside a vector: one record framed as
/// log format version 1 frames it (no salt), one as version 2 does with a guessed salt of 0,
/// each holding `body`. `None` when some 4-byte word is not a small finite `f32` (the API
/// would refuse it).
fn forged_records(body: &[f32]) -> Option<Vec<f32>> {
    use xxhash_rust::xxh3::xxh3_64_with_seed;
    let body: Vec<u8> = body.iter().flat_map(|x| x.to_le_bytes()).collect();
    let mut words = Vec::new();
    for flags in [None, Some(3u32)] {
        let mut r = Vec::new();
        r.extend_from_slice(&(body.len() as u32).to_le_bytes());
        if let Some(f) = flags {
            r.extend_from_slice(&f.to_le_bytes());
        }
        r.extend_from_slice(&999_999u64.to_le_bytes());
        r.extend_from_slice(&xxh3_64_with_seed(&body, 0).to_le_bytes());
        let head_sum = xxh3_64_with_seed(&r, 0) as u32;
        r.extend_from_slice(&head_sum.to_le_bytes());
        r.extend_from_slice(&body);
        words.extend(
            r.chunks(4)
                .map(|w| f32::from_le_bytes(w.try_into().unwrap())),
        );
    }
    words
        .iter()
        .all(|x| x.is_finite() && x.abs() < 1e6)
        .then_some(words)
}

/// Finding 7: a crash tears the body of the last write, and that body holds bytes a client
/// chose to look like whole records. Recovery must take them for what they are — part of a
/// torn tail — and start with every earlier write, not call the log corrupt and refuse to
/// start (which the version-1 framing, unsalted and without flush marks, did).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_write_holding_record_shaped_bytes_is_cut_at_recovery() {
    const FORGED_DIM: usize = 32;
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let (mut child, base) = spawn(dir.path());
    wait_ready(&http, &base).await;
    let r = http
        .post(format!("{base}/v1/collections"))
        .json(&json!({"name": "c", "dim": FORGED_DIM, "metric": "l2"}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    for id in 0..10u64 {
        let v: Vec<f32> = (0..FORGED_DIM)
            .map(|i| (id * 7 + i as u64) as f32)
            .collect();
        let r = http
            .put(format!("{base}/v1/collections/c/points"))
            .json(&json!({"points": [{"id": id, "vector": v}]}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }
    let forged = (0u32..)
        .find_map(|s| forged_records(&[1.0 + s as f32 / 1024.0, 0.5, 0.25, 2.0]))
        .unwrap();
    let mut vector = forged.clone();
    vector.resize(FORGED_DIM, 1.0);
    let r = http
        .put(format!("{base}/v1/collections/c/points"))
        .json(&json!({"points": [{"id": 100, "vector": vector}]}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    child.kill().unwrap();

    // The crash: the last record's body lost its final bytes (the archive's root, after the
    // vector data), so the forged records lie whole inside a torn record.
    let data = dir.path().join("data");
    let segment = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .max()
        .unwrap();
    let bytes = std::fs::read(&segment).unwrap();
    let forged_bytes: Vec<u8> = forged.iter().flat_map(|x| x.to_le_bytes()).collect();
    let at = bytes
        .windows(forged_bytes.len())
        .position(|w| w == forged_bytes)
        .expect("the forged records are in the log as sent");
    let cut = bytes.len() - 8;
    assert!(at + forged_bytes.len() <= cut);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&segment)
        .unwrap()
        .set_len(cut as u64)
        .unwrap();

    let (mut child, base) = spawn(dir.path());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.child_mut().try_wait().unwrap() {
            panic!(
                "the server refused to start on a torn tail ({status}): {}",
                std::fs::read_to_string(dir.path().join("server.log")).unwrap()
            );
        }
        if let Ok(r) = http.get(format!("{base}/readyz")).send().await
            && r.status().is_success()
        {
            break;
        }
        assert!(Instant::now() < deadline, "server not ready");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for id in 0..10u64 {
        let r = http
            .get(format!("{base}/v1/collections/c/points/{id}"))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "acknowledged id {id} lost");
    }
    let r = http
        .get(format!("{base}/v1/collections/c/points/100"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        reqwest::StatusCode::NOT_FOUND,
        "the torn write is gone"
    );
}
