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

/// The evaluation dataset's folder: `TIERVEC_DATA`, else `../shared/data` beside the workspace.
pub fn data_dir() -> PathBuf {
    std::env::var_os("TIERVEC_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("../shared/data"))
}

/// The embedding model's folder: `TIERVEC_MODEL`, else `../shared/models/all-MiniLM-L6-v2`
/// beside the workspace (the model that made the dataset's vectors).
pub fn model_dir() -> PathBuf {
    std::env::var_os("TIERVEC_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("../shared/models/all-MiniLM-L6-v2"))
}
