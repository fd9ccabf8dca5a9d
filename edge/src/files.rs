//! Snapshot files on disk: memory-mapped or copied in, and replaced atomically.
//!
//! # The mmap hazard
//! A memory map reads the file lazily. If another process truncates a mapped file, touching a
//! page past the new end raises `SIGBUS` and kills the process; if it rewrites the file in
//! place, validated bytes change under the search. tiervec avoids both by never modifying a
//! snapshot once written: [`write_snapshot_atomic`] writes a new file under a temporary name,
//! fsyncs it, makes it read-only and renames it over the old one. A rename swaps the directory
//! entry, not the inode, so a reader still mapping the old file keeps reading the old, intact
//! inode until it unmaps it. What tiervec cannot prevent is a *foreign* process writing into
//! its data directory; where that is possible, open snapshots with [`SnapshotBytes::read`],
//! which copies the file into anonymous memory (immune to later changes, at the cost of RAM).

use std::fs::File;
use std::io::{self, Read};
use std::ops::Deref;
use std::path::Path;

use memmap2::{Advice, Mmap};
use tiervec_shared::snapshot::{AlignedBytes, BODY_ALIGN, StableBytes};

/// The bytes of a snapshot file: mapped read-only, or read into an aligned heap buffer.
pub enum SnapshotBytes {
    Mapped(Mmap),
    Owned(AlignedBytes),
}

impl SnapshotBytes {
    /// Maps `path` read-only. The mapping is only as stable as the file: see the module docs.
    pub fn map(path: &Path) -> io::Result<SnapshotBytes> {
        let file = File::open(path)?;
        // SAFETY: tiervec never writes to or truncates a snapshot file after it is renamed into
        // place (module docs, "The mmap hazard"); the `StableBytes` contract rests on that.
        let map = unsafe { Mmap::map(&file)? };
        // The search will touch every page soon after; ask for them now rather than fault by fault.
        let _ = map.advise(Advice::WillNeed);
        Ok(SnapshotBytes::Mapped(map))
    }

    /// Reads `path` into anonymous memory, aligned for the body.
    pub fn read(path: &Path) -> io::Result<SnapshotBytes> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len() as usize;
        let mut buf = AlignedBytes::with_capacity(len);
        let mut chunk = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut chunk)?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Ok(SnapshotBytes::Owned(buf))
    }
}

impl Deref for SnapshotBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            SnapshotBytes::Mapped(m) => m,
            SnapshotBytes::Owned(v) => v,
        }
    }
}

const _: () = assert!(
    BODY_ALIGN <= 16,
    "mmap pages and rkyv's AlignedVec give 16-byte alignment"
);

// SAFETY: a mapping's address and length are fixed until it is dropped, and its contents do not
// change because tiervec never rewrites a snapshot file in place (module docs); owned buffers
// change only through `&mut`, which is never handed out.
unsafe impl StableBytes for SnapshotBytes {}

/// Writes a snapshot so that a crash leaves either the old file or the complete new one, and
/// makes it read-only: a temp file in the same directory, fsync, rename, fsync of the directory
/// (`tiervec_shared::durable::write_atomic`).
pub fn write_snapshot_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    tiervec_shared::durable::write_atomic(path, bytes, true)
}
