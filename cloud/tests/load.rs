//! `tiervec-cloud load` (the real binary) with a user's own data against a real cloud on
//! loopback: JSON lines whose texts it embeds (ids and payload fields from the file), killed
//! mid-load and resumed where it stopped; `.npy` vectors; a collection of another model
//! refused.

#![cfg(feature = "embed")]

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use tiervec_cloud::config::CloudConfig;
use tiervec_test_support::paths::{data_dir, model_dir};
use tiervec_test_support::process::ChildGuard;

const RECORDS: usize = 600;

/// `tiervec-cloud load` run in `dir` (where its progress files go).
fn load_in(dir: &Path, addr: SocketAddr, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tiervec-cloud"));
    cmd.current_dir(dir)
        .arg("load")
        .args(["--url", &format!("http://{addr}")])
        .args(["--model", model_dir().to_str().unwrap()])
        .args(args)
        .env("RAYON_NUM_THREADS", "1");
    cmd
}

fn run(mut cmd: Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "load failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

async fn get(addr: SocketAddr, path: &str) -> (StatusCode, Value) {
    let r = reqwest::get(format!("http://{addr}{path}")).await.unwrap();
    (r.status(), r.json().await.unwrap_or(Value::Null))
}

/// The records a load's progress file says are durable (0 before it has one).
fn loaded(progress: &Path) -> usize {
    std::fs::read_to_string(progress)
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// The first `n` base texts as JSON lines with ids of their own and an extra field.
fn write_jsonl(path: &Path, n: usize) -> Vec<String> {
    let texts: Vec<String> = std::io::BufReader::new(
        std::fs::File::open(data_dir().join("base.jsonl")).expect("base.jsonl (set TIERVEC_DATA)"),
    )
    .lines()
    .take(n)
    .map(|l| {
        serde_json::from_str::<Value>(&l.unwrap()).unwrap()["text"]
            .as_str()
            .unwrap()
            .to_owned()
    })
    .collect();
    let lines: Vec<String> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| {
            json!({"id": 10_000 + i, "text": t, "source": format!("gloss-{i}")}).to_string()
        })
        .collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
    texts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn texts_are_loaded_resumed_after_a_kill_and_searched() {
    let dir = tempfile::tempdir().unwrap();
    let running = tiervec_cloud::server::spawn(CloudConfig {
        data_dir: dir.path().join("data"),
        http_addr: "127.0.0.1:0".parse().unwrap(),
        model_dir: Some(model_dir()),
        ..CloudConfig::default()
    })
    .await
    .unwrap();
    let addr = running.addr;
    while reqwest::get(format!("http://{addr}/readyz"))
        .await
        .map_or(true, |r| r.status() != StatusCode::OK)
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let input = dir.path().join("notes.jsonl");
    let texts = write_jsonl(&input, RECORDS);
    let progress = dir.path().join(".tiervec-load/notes.notes.jsonl.loaded");

    // Killed once some batches are durable.
    let mut first = load_in(
        dir.path(),
        addr,
        &[
            "--collection",
            "notes",
            "--jsonl",
            input.to_str().unwrap(),
            "--batch",
            "8",
        ],
    );
    let mut child = ChildGuard::new(
        first
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let started = Instant::now();
    loop {
        let done = loaded(&progress);
        if done >= 64 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the load made no progress"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.kill().unwrap();
    let killed_at = loaded(&progress);
    assert!(killed_at < RECORDS, "the load finished before the kill");
    let (_, d) = get(addr, "/v1/collections/notes").await;
    assert!(d["points"].as_u64().unwrap() >= killed_at as u64);
    assert_eq!(d["model"]["name"], "all-MiniLM-L6-v2");

    // The rerun goes on after what the progress file says is durable.
    let out = run(load_in(
        dir.path(),
        addr,
        &[
            "--collection",
            "notes",
            "--jsonl",
            input.to_str().unwrap(),
            "--batch",
            "64",
        ],
    ));
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        said.contains(&format!("resuming after {killed_at} records")),
        "{said}"
    );
    assert!(
        said.contains(&format!("loaded {} points", RECORDS - killed_at)),
        "{said}"
    );
    let (_, d) = get(addr, "/v1/collections/notes").await;
    assert_eq!(d["points"].as_u64(), Some(RECORDS as u64));

    // Ids and every field from the file; each text finds its own point.
    for i in [0, 63, 64, 65, 299, RECORDS - 1] {
        let (status, p) = get(
            addr,
            &format!("/v1/collections/notes/points/{}", 10_000 + i),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(p["payload"]["text"], texts[i].as_str());
        assert_eq!(p["payload"]["source"], format!("gloss-{i}"));
        let answer: Value = reqwest::Client::new()
            .post(format!("http://{addr}/v1/collections/notes/search"))
            .json(&json!({"text": texts[i], "k": 1}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            answer["hits"][0]["id"].as_u64(),
            Some(10_000 + i as u64),
            "{answer}"
        );
    }

    // A collection of vectors only is not loaded with texts embedded by a model.
    let created = reqwest::Client::new()
        .post(format!("http://{addr}/v1/collections"))
        .json(&json!({"name": "plain", "dim": 384, "metric": "cosine"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    let out = load_in(
        dir.path(),
        addr,
        &["--collection", "plain", "--jsonl", input.to_str().unwrap()],
    )
    .output()
    .unwrap();
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("records no model"), "{said}");

    // `.npy` vectors: ids 0.. without JSON lines.
    let npy = dir.path().join("v.npy");
    let mut bytes = Vec::new();
    {
        use npyz::WriterBuilder;
        let mut w = npyz::WriteOptions::<f32>::new()
            .default_dtype()
            .shape(&[5, 4])
            .writer(&mut bytes)
            .begin_nd()
            .unwrap();
        w.extend((0..20).map(|x| x as f32 + 1.0)).unwrap();
        w.finish().unwrap();
    }
    std::fs::write(&npy, bytes).unwrap();
    run(load_in(
        dir.path(),
        addr,
        &[
            "--collection",
            "small",
            "--vectors",
            npy.to_str().unwrap(),
            "--metric",
            "l2",
        ],
    ));
    let (_, p) = get(addr, "/v1/collections/small/points/4").await;
    assert_eq!(p["vector"], json!([17.0, 18.0, 19.0, 20.0]));
    drop(running);
}
