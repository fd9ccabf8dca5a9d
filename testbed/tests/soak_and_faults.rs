//! The short versions of `bench soak` and `bench faults` as CI runs them: the testbed binary of
//! this build starts a real cloud and a real edge process (the `tiervec-cloud` and
//! `tiervec-edge` binaries beside it, built by `cargo test --workspace`), kills them, injects
//! faults, and fails on any lost write, phantom, duplicate, inconsistent edge or edge error.

use std::process::Command;

fn bench(name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_tiervec-testbed"))
        .args(["bench", name, "--quick", "--work-dir"])
        .arg(dir.path().join("work"))
        .arg("--json")
        .arg(dir.path().join("report.json"))
        // Not under cargo: use the binaries this test run built instead of building them.
        .env_remove("CARGO")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "bench {name} failed:\n{stderr}");
    eprintln!("{stderr}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("report.json")).unwrap()).unwrap();
    assert_eq!(report["bench"], name);
}

#[test]
fn a_short_crash_soak_loses_nothing_and_leaves_the_edge_consistent() {
    bench("soak");
}

#[test]
fn the_edge_answers_through_network_faults_and_reconnects() {
    bench("faults");
}
