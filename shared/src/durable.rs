//! Durable file operations, shared by the edge and the cloud: atomic replacement and directory
//! syncs. This is the one module of `tiervec-shared` that performs IO; it exists only with the
//! `fs` feature, which the WASM guest does not enable.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

/// Makes the directory entry changes in `dir` (creations, renames, removals) durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes `bytes` to `path` so that a crash leaves either the old file or the complete new one:
/// a temp file in the same directory, fsync, (read-only permissions if asked), rename over
/// `path`, then fsync of the directory so the rename itself is durable.
pub fn write_atomic(path: &Path, bytes: &[u8], read_only: bool) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        if read_only {
            let mut perms = file.metadata()?.permissions();
            perms.set_readonly(true);
            fs::set_permissions(&tmp, perms)?;
        }
        fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}
