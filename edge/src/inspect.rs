//! The report printed by `tiervec-edge inspect FILE`.

use std::fmt::Write;

use tiervec_shared::snapshot::{self, Snapshot, SnapshotHeader, StableBytes};

/// Describes a snapshot: its header (when it decodes), whether the whole file validates, and
/// for a valid file its counts and per-layer graph statistics. Returns the report and whether
/// the file validated.
pub fn report<B: StableBytes>(bytes: B) -> (String, bool) {
    let mut out = String::new();
    let _ = writeln!(out, "file bytes:      {}", bytes.len());
    match SnapshotHeader::decode(&bytes) {
        Ok(h) => write_header(&mut out, &h),
        Err(e) => {
            let _ = writeln!(out, "header:          unreadable: {e}");
            let _ = writeln!(out, "validates:       no");
            return (out, false);
        }
    }
    let snapshot = match Snapshot::open(bytes) {
        Ok(s) => s,
        Err(e) => {
            let _ = writeln!(out, "validates:       no: {e}");
            return (out, false);
        }
    };
    let view = snapshot.view();
    let _ = writeln!(out, "collection name: {}", view.collection_name());
    let _ = writeln!(out, "manifest:        version {}", view.manifest_version());
    let _ = writeln!(out, "anchors:         {}", view.anchor_count());
    let _ = writeln!(
        out,
        "payloads:        {}",
        if snapshot.header().has_payloads {
            "text"
        } else {
            "none"
        }
    );
    let stats = view.layer_stats();
    let _ = writeln!(out, "graph layers:    {}", stats.len());
    for (l, s) in stats.iter().enumerate() {
        let _ = writeln!(
            out,
            "  layer {l}: {} nodes, {} edges, mean degree {:.2}, max degree {}",
            s.nodes, s.edges, s.mean_degree, s.max_degree
        );
    }
    let _ = writeln!(
        out,
        "validates:       yes (format v{})",
        snapshot::FORMAT_VERSION
    );
    (out, true)
}

fn write_header(out: &mut String, h: &SnapshotHeader) {
    let _ = writeln!(out, "format version:  {}", h.version);
    let _ = writeln!(out, "collection id:   {}", h.spec.collection);
    let _ = writeln!(out, "dimension:       {}", h.spec.dim);
    let _ = writeln!(out, "metric:          {}", h.spec.metric);
    let _ = writeln!(out, "vectors:         {}", h.count);
    let _ = writeln!(
        out,
        "hnsw params:     m={} ef_construction={} seed={:#x}",
        h.spec.params.m, h.spec.params.ef_construction, h.spec.params.seed
    );
    let _ = writeln!(
        out,
        "body:            {} bytes at offset {}, xxh3 {:016x}",
        h.body_len, h.body_offset, h.body_checksum
    );
}
