//! The WASM guest (`tiervec-wasm` for `wasm32-wasip1`, with its `test-exports` feature), built
//! once per test binary for the tests that run it in wasmtime, into its own target directory so
//! the nested cargo never waits on the lock of the build running those tests.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::paths::workspace_root;

/// The guest module's path, building it on the first call.
pub fn test_guest() -> &'static Path {
    static GUEST: OnceLock<PathBuf> = OnceLock::new();
    GUEST.get_or_init(|| {
        let target = workspace_root().join("target").join("wasm-guest-test");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .current_dir(workspace_root())
            .args([
                "build",
                "--release",
                "--target",
                "wasm32-wasip1",
                "-p",
                "tiervec-wasm",
                "--features",
                "test-exports",
                "--target-dir",
            ])
            .arg(&target)
            .status()
            .expect("cargo runs");
        assert!(
            status.success(),
            "building the guest for wasm32-wasip1 failed (see cargo's output above); if the \
             target is missing, run `rustup toolchain install` in the repository root, which \
             installs the toolchain, target and components that rust-toolchain.toml lists"
        );
        target.join("wasm32-wasip1/release/tiervec_wasm.wasm")
    })
}
