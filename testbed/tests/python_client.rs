//! The Python client's tests (`clients/python/tests`, pytest) against a real cloud and a real
//! edge: the `tiervec-cloud` and `tiervec-edge` binaries of this build (beside the testbed's,
//! built by `cargo test --workspace`), the shipped model and the dataset's texts. Needs the
//! client installed: `pip install -e 'clients/python[test]'` (README, prerequisites).

use std::path::Path;
use std::process::Command;

use tiervec_test_support::paths::{data_dir, model_dir, workspace_root};

#[test]
fn the_python_client_and_retriever_pass_against_a_real_cloud_and_edge() {
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_tiervec-testbed"))
        .parent()
        .expect("the testbed binary's folder");
    for name in ["tiervec-cloud", "tiervec-edge"] {
        assert!(
            bin_dir.join(name).exists(),
            "{name} is not beside the testbed binary: run `cargo test --release --workspace`"
        );
    }
    let output = Command::new("python3")
        .args([
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "clients/python/tests",
        ])
        .current_dir(workspace_root())
        .env("TIERVEC_BIN_DIR", bin_dir)
        .env("TIERVEC_DATA", data_dir())
        .env("TIERVEC_MODEL", model_dir())
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "pytest failed (is the client installed? `pip install -e 'clients/python[test]'`):\n{stdout}\n{stderr}"
    );
    eprintln!("{stdout}");
}
