//! Device memory arithmetic and how a search is split into GEMM tiles and top-k blocks: plain
//! functions, tested without a GPU.
//!
//! A search multiplies a chunk of at most `query_chunk` queries with a chunk of at most
//! `row_chunk` rows (one GEMM), then runs the top-k kernel on the score tile; the host merges
//! the k candidates of every (row chunk, segment) per query. When the collection's copy fits the
//! budget it stays on the device (`resident`); otherwise each search streams the rows through a
//! `row_chunk`-row buffer.

use std::ops::Range;

use super::config::Precision;

/// Most queries in one GEMM: a larger batch is split, so the score tile stays bounded.
pub const MAX_QUERY_CHUNK: usize = 1_024;
/// Fewest rows per row chunk: a budget that cannot hold this many is too small to be worth it.
pub const MIN_ROW_CHUNK: usize = 4_096;
/// Most top-k blocks per (query, row chunk): the `grid.y` of the kernel launch.
pub const MAX_SEGMENTS: usize = 64;
/// Fewest rows one top-k block scans: below this its k-round merge costs more than the scan.
pub const MIN_SEGMENT_ROWS: usize = 2_048;
/// Largest k the device selects (the bigger kernel's per-thread list); larger k go to the CPU.
pub const MAX_GPU_K: usize = 128;
/// k up to this uses the kernel with 32-entry per-thread lists (less local memory, faster).
pub const SMALL_K: usize = 32;
/// Rows uploaded per step when an FP16 copy is built (through an FP32 staging buffer).
pub const STAGING_ROWS: usize = 65_536;

/// Rows allocated when a device copy of `live` rows is (re)built: a quarter (at least 1,024)
/// spare, so a stream of appends does not rebuild the copy at every write.
pub fn capacity_for(live: usize) -> usize {
    live + (live / 4).max(1_024)
}

/// Bytes of a resident copy of `rows` rows: the elements, `‖x‖²` (f32) and the live mask (u8).
pub fn resident_bytes(rows: usize, dim: usize, precision: Precision) -> u64 {
    rows as u64 * (dim as u64 * precision.bytes() as u64 + 5)
}

/// Bytes of the per-search buffers: queries (f32, plus their FP16 copy), `‖q‖²`, the score tile,
/// the top-k output, and when `streamed` the row-chunk buffers (f32 rows, their FP16 copy,
/// norms, mask). Linear in `row_chunk`.
pub fn scratch_bytes(
    query_chunk: usize,
    row_chunk: usize,
    dim: usize,
    k: usize,
    precision: Precision,
    streamed: bool,
) -> u64 {
    let (q, r, d, k) = (query_chunk as u64, row_chunk as u64, dim as u64, k as u64);
    let half = precision == Precision::F16;
    let queries = q * d * 4 + if half { q * d * 2 } else { 0 } + q * 4;
    let scores = q * r * 4;
    let out = q * MAX_SEGMENTS as u64 * k * 8;
    let rows = if streamed {
        r * (d * 4 + if half { d * 2 } else { 0 } + 5)
    } else {
        0
    };
    queries + scores + out + rows
}

/// Bytes of the FP32 staging buffer a resident FP16 copy of `rows` rows is built through.
pub fn staging_bytes(rows: usize, dim: usize, precision: Precision, streamed: bool) -> u64 {
    if streamed || precision == Precision::F32 {
        0
    } else {
        rows.min(STAGING_ROWS) as u64 * dim as u64 * 4
    }
}

/// How one search runs on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The collection's rows stay on the device between searches (else streamed per search).
    pub resident: bool,
    /// Rows allocated for the resident copy (0 when streamed).
    pub capacity: usize,
    /// Rows per GEMM and per streamed upload.
    pub row_chunk: usize,
    /// Queries per GEMM.
    pub query_chunk: usize,
}

/// Why no plan fits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "device memory budget of {budget} bytes is below the {needed} bytes one streamed chunk needs"
)]
pub struct BudgetTooSmall {
    pub budget: u64,
    pub needed: u64,
}

/// The plan for `batch` queries of top-`k` over `rows` rows within `budget` bytes: resident when
/// the copy (with growth room) and a score tile of at least `MIN_ROW_CHUNK` rows fit, halving
/// the query chunk before giving residency up; else streamed, likewise.
pub fn plan(
    budget: u64,
    rows: usize,
    dim: usize,
    batch: usize,
    k: usize,
    precision: Precision,
) -> Result<Plan, BudgetTooSmall> {
    let rows = rows.max(1);
    let capacity = capacity_for(rows);
    let resident = resident_bytes(capacity, dim, precision);
    if let Some(left) = budget.checked_sub(resident)
        && let Some((query_chunk, row_chunk)) = fit(left, rows, dim, batch, k, precision, false)
    {
        return Ok(Plan {
            resident: true,
            capacity,
            row_chunk,
            query_chunk,
        });
    }
    match fit(budget, rows, dim, batch, k, precision, true) {
        Some((query_chunk, row_chunk)) => Ok(Plan {
            resident: false,
            capacity: 0,
            row_chunk,
            query_chunk,
        }),
        None => Err(BudgetTooSmall {
            budget,
            needed: scratch_bytes(1, rows.min(MIN_ROW_CHUNK), dim, k, precision, true),
        }),
    }
}

/// The largest (query chunk, row chunk) whose scratch fits `left` bytes, with at least
/// `min(rows, MIN_ROW_CHUNK)` rows; the query chunk is halved until one fits.
fn fit(
    left: u64,
    rows: usize,
    dim: usize,
    batch: usize,
    k: usize,
    precision: Precision,
    streamed: bool,
) -> Option<(usize, usize)> {
    let floor = rows.min(MIN_ROW_CHUNK);
    let mut query_chunk = batch.clamp(1, MAX_QUERY_CHUNK);
    loop {
        let fixed = scratch_bytes(query_chunk, 0, dim, k, precision, streamed)
            + staging_bytes(rows, dim, precision, streamed);
        let per_row = scratch_bytes(query_chunk, 1, dim, k, precision, streamed)
            - scratch_bytes(query_chunk, 0, dim, k, precision, streamed);
        if let Some(room) = left.checked_sub(fixed) {
            let row_chunk = (room / per_row.max(1)).min(rows as u64) as usize;
            if row_chunk >= floor {
                return Some((query_chunk, row_chunk));
            }
        }
        if query_chunk == 1 {
            return None;
        }
        query_chunk /= 2;
    }
}

/// Top-k blocks per (query, row chunk): enough blocks for about two per multiprocessor across
/// the query chunk, each scanning at least `MIN_SEGMENT_ROWS` rows, at most `MAX_SEGMENTS`.
pub fn segments(query_chunk: usize, rows: usize, multiprocessors: usize) -> usize {
    let want = (2 * multiprocessors.max(1)).div_ceil(query_chunk.max(1));
    want.min(rows.div_ceil(MIN_SEGMENT_ROWS))
        .clamp(1, MAX_SEGMENTS)
}

/// `0..total` in consecutive ranges of at most `size` (the last may be shorter).
pub fn chunks(total: usize, size: usize) -> impl Iterator<Item = Range<usize>> {
    let size = size.max(1);
    (0..total.div_ceil(size)).map(move |i| i * size..((i + 1) * size).min(total))
}

/// What bringing a device copy up to date takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncAction {
    /// Append the new live rows (and refresh the mask if it changed).
    Append,
    /// Rebuild from the live rows: the appends do not fit the allocation.
    RebuildGrown,
    /// Rebuild from the live rows: tombstones passed the configured fraction.
    RebuildCompact,
}

/// Whether a copy of `rows` rows (`dead` of them tombstones, `capacity` allocated) takes
/// `appended` new live rows in place, or is rebuilt.
pub fn sync_action(
    rows: usize,
    dead: usize,
    capacity: usize,
    appended: usize,
    compact_dead_fraction: f64,
) -> SyncAction {
    if rows + appended > capacity {
        SyncAction::RebuildGrown
    } else if rows > 0 && dead as f64 / rows as f64 > compact_dead_fraction {
        SyncAction::RebuildCompact
    } else {
        SyncAction::Append
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn a_corpus_that_fits_stays_resident_with_room_to_grow() {
        let p = plan(4 * GIB, 1_000_000, 384, 1_024, 10, Precision::F32).unwrap();
        assert!(p.resident);
        assert_eq!(p.capacity, 1_250_000);
        assert_eq!(p.query_chunk, 1_024);
        let used = resident_bytes(p.capacity, 384, Precision::F32)
            + scratch_bytes(p.query_chunk, p.row_chunk, 384, 10, Precision::F32, false);
        assert!(used <= 4 * GIB, "{used} bytes planned");
        // 1,024 × 1,000,000 scores (4 GB) do not fit beside the 1.9 GB copy: rows are chunked.
        assert!(p.row_chunk < 1_000_000 && p.row_chunk >= MIN_ROW_CHUNK);
    }

    #[test]
    fn a_corpus_over_the_budget_is_streamed_in_chunks() {
        let p = plan(GIB, 1_000_000, 384, 64, 10, Precision::F32).unwrap();
        assert!(!p.resident);
        assert_eq!(p.capacity, 0);
        let used = scratch_bytes(p.query_chunk, p.row_chunk, 384, 10, Precision::F32, true);
        assert!(used <= GIB);
        assert!(p.row_chunk >= MIN_ROW_CHUNK && p.row_chunk < 1_000_000);
        // FP16 halves the copy: the same corpus is resident in a budget FP32 streams in.
        let f32_plan = plan(GIB + GIB / 4, 1_000_000, 384, 1, 10, Precision::F32).unwrap();
        let f16_plan = plan(GIB + GIB / 4, 1_000_000, 384, 1, 10, Precision::F16).unwrap();
        assert!(!f32_plan.resident && f16_plan.resident);
    }

    #[test]
    fn a_tiny_budget_is_an_error_and_query_chunks_shrink_before() {
        let e = plan(1 << 20, 1_000_000, 384, 1, 10, Precision::F32).unwrap_err();
        assert!(e.needed > e.budget);
        // Room for the copy and one row chunk of 4,096 scores per query, but not for 1,024 queries.
        let budget = resident_bytes(capacity_for(100_000), 384, Precision::F32)
            + scratch_bytes(64, MIN_ROW_CHUNK, 384, 10, Precision::F32, false);
        let p = plan(budget, 100_000, 384, 1_024, 10, Precision::F32).unwrap();
        assert!(p.resident);
        assert!(p.query_chunk <= 64, "{p:?}");
    }

    #[test]
    fn segments_fill_the_device_for_small_batches_only() {
        assert_eq!(segments(1, 1_000_000, 132), MAX_SEGMENTS);
        assert_eq!(segments(1, 50_000, 132), 25);
        assert_eq!(segments(1_024, 1_000_000, 132), 1);
        assert_eq!(segments(64, 1_000_000, 132), 5);
        assert_eq!(segments(1, 10, 132), 1);
    }

    #[test]
    fn chunks_cover_the_range_once() {
        let c: Vec<_> = chunks(10, 4).collect();
        assert_eq!(c, vec![0..4, 4..8, 8..10]);
        assert_eq!(chunks(0, 4).count(), 0);
        assert_eq!(chunks(4, 4).collect::<Vec<_>>(), vec![0..4]);
    }

    #[test]
    fn the_copy_is_rebuilt_when_full_or_when_tombstones_pass_the_fraction() {
        assert_eq!(sync_action(1_000, 0, 2_024, 500, 0.25), SyncAction::Append);
        assert_eq!(
            sync_action(1_000, 0, 1_200, 500, 0.25),
            SyncAction::RebuildGrown
        );
        assert_eq!(sync_action(1_000, 250, 2_024, 0, 0.25), SyncAction::Append);
        assert_eq!(
            sync_action(1_000, 251, 2_024, 0, 0.25),
            SyncAction::RebuildCompact
        );
        assert_eq!(sync_action(0, 0, 1_024, 0, 0.25), SyncAction::Append);
    }
}
