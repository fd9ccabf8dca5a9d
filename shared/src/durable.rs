//! Durable file operations, shared by the edge and the cloud: atomic replacement and directory
//! syncs. This is the one module of `tiervec-shared` that performs IO; it exists only with the
//! `fs` feature, which the WASM guest does not enable.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Makes temp names unique between threads of one process (the pid separates processes).
static TEMP_SEQUENCE: AtomicU64 = AtomicU64::new(0);

/// Makes the directory entry changes in `dir` (creations, renames, removals) durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The directory `path` is in (`.` for a bare name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// A path beside `path` for writing its next version, unique in this process and across
/// processes (pid and a per-process sequence), so concurrent writers never share one; `label`
/// says what it is for (`tmp`, `incoming`).
pub fn temp_beside(path: &Path, label: &str) -> io::Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    Ok(parent_dir(path).join(format!(
        ".{}.{label}-{}-{}",
        name.to_string_lossy(),
        std::process::id(),
        TEMP_SEQUENCE.fetch_add(1, Ordering::Relaxed)
    )))
}

/// Makes a written file durable (fsync), and read-only if asked.
pub fn seal(path: &Path, read_only: bool) -> io::Result<()> {
    let file = File::open(path)?;
    file.sync_all()?;
    if read_only {
        let mut perms = file.metadata()?.permissions();
        perms.set_readonly(true);
        fs::set_permissions(path, perms)?;
    }
    Ok(())
}

/// Renames a sealed file over `to` (in the same directory) and fsyncs the directory, so that
/// the rename itself is durable.
pub fn replace(from: &Path, to: &Path) -> io::Result<()> {
    fs::rename(from, to)?;
    sync_dir(parent_dir(to))
}

/// Writes `bytes` to `path` so that a crash leaves either the old file or the complete new one:
/// a temp file beside it ([`temp_beside`]: concurrent writers of one path never share one; the
/// last rename wins), [`seal`]ed (fsync, read-only if asked), then [`replace`]d over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8], read_only: bool) -> io::Result<()> {
    let tmp = temp_beside(path, "tmp")?;
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        file.write_all(bytes)?;
        drop(file);
        seal(&tmp, read_only)?;
        replace(&tmp, path)
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
