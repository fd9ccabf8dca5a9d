//! Where the workspace is, for tests that read its files or build one of its crates.

use std::path::{Path, PathBuf};

/// The workspace root (the folder of the top-level `Cargo.toml`): two folders above this
/// crate's `testbed/support/`, as compiled in.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .and_then(Path::parent)
        .expect("testbed/support/ is two folders below the workspace root")
        .to_owned()
}
