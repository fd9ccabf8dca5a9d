//! Durable file operations, shared by the edge and the cloud: atomic replacement and directory
//! syncs. This is the one module of `tiervec-shared` that performs IO; it exists only with the
//! `fs` feature, which the WASM guest does not enable.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Makes temp names unique between threads of one process (the pid separates processes).
static TEMP_SEQUENCE: AtomicU64 = AtomicU64::new(0);

/// Makes the directory entry changes in `dir` (creations, renames, removals) durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes `bytes` to `path` so that a crash leaves either the old file or the complete new one:
/// a temp file in the same directory (named by pid and a per-process sequence, so concurrent
/// writers of one path never share it; the last rename wins), fsync, (read-only permissions if asked), rename over
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
        ".{}.tmp-{}-{}",
        name.to_string_lossy(),
        std::process::id(),
        TEMP_SEQUENCE.fetch_add(1, Ordering::Relaxed)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_writers_of_one_path_all_succeed_and_one_whole_version_remains() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("module.bin");
        std::thread::scope(|scope| {
            for writer in 0..8u8 {
                let path = &path;
                scope.spawn(move || {
                    for _ in 0..20 {
                        write_atomic(path, &[writer; 4096], true).expect("write succeeds");
                    }
                });
            }
        });
        let bytes = fs::read(&path).expect("file exists");
        assert_eq!(bytes.len(), 4096);
        assert!(
            bytes.iter().all(|&b| b == bytes[0]),
            "a torn mixture of writers"
        );
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .expect("lists")
            .map(|e| e.expect("entry").file_name())
            .filter(|n| n != "module.bin")
            .collect();
        assert!(
            leftovers.is_empty(),
            "temp files left behind: {leftovers:?}"
        );
    }
}
