//! schemathesis (PyPI, `pip install schemathesis==4.32.5`) against a real `tiervec-cloud serve`
//! and its own `/v1/openapi.json`, every check on, positive and negative data: no server error,
//! no status code, content type or body outside the document, every schema-valid request
//! accepted (or refused with a documented 422, `schemathesis/schemathesis.toml` says why), every
//! schema-violating one refused. Two passes: collection names as generated (with the stateful
//! phase, which creates collections and follows the API's links), then every name pinned to an
//! existing collection (`schemathesis/pinned.toml` and the hook in `schemathesis/pin_docs.py`).
//! Each pass runs `TIERVEC_SCHEMATHESIS_SECONDS` (default 30; docs/reliability.md has a longer
//! run).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use tiervec_test_support::process::{ChildGuard, read_addr_file, wait_http_ready};

fn schemathesis(config: &Path, hooks: Option<&Path>, url: &str, seconds: u64, extra: &[&str]) {
    let mut command = Command::new("schemathesis");
    if let Some(hooks) = hooks {
        command.env("SCHEMATHESIS_HOOKS", hooks);
    }
    let output = command
        .arg("--config-file")
        .arg(config)
        .args(["run", url, "--checks", "all", "--mode", "all", "--workers", "1"])
        .arg("--max-time")
        .arg(seconds.to_string())
        .args(extra)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .expect(
            "schemathesis is not installed: `pip install schemathesis==4.32.5` (README, prerequisites)",
        );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let tail: String = stdout
        .lines()
        .rev()
        .take(400)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        output.status.success(),
        "schemathesis {} found failures:\n{tail}\n{}",
        config.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    println!("{tail}");
}

#[test]
fn the_api_conforms_to_its_document_under_schemathesis() {
    let seconds: u64 = std::env::var("TIERVEC_SCHEMATHESIS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let dir = tempfile::tempdir().unwrap();
    let addr_file = dir.path().join("addr");
    let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
    let _cloud = ChildGuard::new(
        Command::new(env!("CARGO_BIN_EXE_tiervec-cloud"))
            .arg("serve")
            .arg("--set")
            .arg(format!(
                "data_dir={:?}",
                dir.path().join("data").to_str().unwrap()
            ))
            .args(["--set", "http_addr=\"127.0.0.1:0\"", "--addr-file"])
            .arg(&addr_file)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let addr = read_addr_file(&addr_file, Duration::from_secs(30));
    wait_http_ready(&addr, Duration::from_secs(60));
    let created = Command::new("curl")
        .args([
            "-sf",
            "-XPOST",
            "-H",
            "content-type: application/json",
            "-d",
        ])
        .arg(r#"{"name": "docs", "dim": 2, "metric": "cosine"}"#)
        .arg(format!("http://{addr}/v1/collections"))
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(created.success(), "creating `docs` failed");

    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/schemathesis");
    let url = format!("http://{addr}/v1/openapi.json");
    schemathesis(&here.join("schemathesis.toml"), None, &url, seconds, &[]);
    schemathesis(
        &here.join("pinned.toml"),
        Some(&here.join("pin_docs.py")),
        &url,
        seconds,
        &["--phases", "coverage,fuzzing", "--exclude-method", "DELETE"],
    );
}
