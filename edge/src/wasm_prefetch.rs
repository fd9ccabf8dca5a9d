//! The `tiervec` imports a guest calls in place of the prefetch instruction wasm lacks (guest
//! ABI v3, docs/wasm.md "Prefetch").
//!
//! The native search hides memory latency by prefetching the rows of a node's unvisited
//! neighbours, the next node's neighbour list and the next row to re-rank. wasm has no
//! prefetch, and a load standing in for one blocks the guest until its line arrives. So the
//! host offers two hints: `prefetch(start, bytes)` and `prefetch_rows(base, len, stride, ids,
//! count)` (one call for all the fresh neighbours of a node). Both only issue prefetch
//! instructions, which never fault, and only for addresses inside the calling instance's own
//! linear memory (everything is clamped to it), so a guest learns nothing and reaches nothing
//! through them; malformed arguments make them do less, never fail.

use tiervec_shared::kernels::{MAX_PREFETCH_LINES, prefetch_all};
use wasmtime::{Caller, Linker, Memory};

/// Most rows one `prefetch_rows` call prefetches (a node's neighbour list is at most 64 long).
const MAX_ROWS: usize = 64;

/// A store's data that knows its instance's linear memory (set once it is instantiated).
pub trait GuestMemory {
    fn guest_memory(&self) -> Option<Memory>;
}

/// Defines `tiervec.prefetch` and `tiervec.prefetch_rows` in `linker`.
pub fn add_to_linker<T: GuestMemory + 'static>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "tiervec",
        "prefetch",
        |caller: Caller<'_, T>, start: u32, bytes: u32| {
            if let Some(memory) = caller.data().guest_memory() {
                prefetch_region(memory.data(&caller), start as usize, bytes as usize);
            }
        },
    )?;
    linker.func_wrap(
        "tiervec",
        "prefetch_rows",
        |caller: Caller<'_, T>, base: u32, len: u32, stride: u32, ids: u32, count: u32| {
            if let Some(memory) = caller.data().guest_memory() {
                let data = memory.data(&caller);
                prefetch_rows(
                    data,
                    base as usize,
                    len as usize,
                    stride as usize,
                    ids,
                    count,
                );
            }
        },
    )?;
    Ok(())
}

/// Prefetches the lines of `memory[start..start + bytes]`, as far as it lies inside `memory`.
fn prefetch_region(memory: &[u8], start: usize, bytes: usize) {
    let end = start.saturating_add(bytes).min(memory.len());
    if let Some(region) = memory.get(start..end) {
        prefetch_all(region);
    }
}

/// Prefetches rows `ids` (little-endian `u32`s at `ids`, `count` of them, at most
/// [`MAX_ROWS`]) of the `len` bytes at `base`, rows `stride` bytes long.
fn prefetch_rows(memory: &[u8], base: usize, len: usize, stride: usize, ids: u32, count: u32) {
    let count = (count as usize).min(MAX_ROWS);
    let ids_start = ids as usize;
    let Some(id_bytes) = memory.get(ids_start..ids_start.saturating_add(4 * count)) else {
        return;
    };
    let row_bytes = stride.min(MAX_PREFETCH_LINES * 64);
    for id in id_bytes.chunks_exact(4) {
        let id = u32::from_le_bytes([id[0], id[1], id[2], id[3]]) as usize;
        let Some(offset) = id.checked_mul(stride) else {
            continue;
        };
        if offset.saturating_add(stride) <= len {
            prefetch_region(memory, base.saturating_add(offset), row_bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_outside_the_memory_are_ignored_not_faults() {
        let memory = vec![7u8; 4096];
        prefetch_region(&memory, 4000, 1 << 20);
        prefetch_region(&memory, usize::MAX - 3, 64);
        let mut ids = Vec::new();
        for id in [0u32, 3, u32::MAX, 1 << 30] {
            ids.extend_from_slice(&id.to_le_bytes());
        }
        let mut with_ids = memory.clone();
        with_ids[..ids.len()].copy_from_slice(&ids);
        prefetch_rows(&with_ids, 64, 1024, 384, 0, 4);
        prefetch_rows(&with_ids, 64, 1024, 384, 4090, 64);
        prefetch_rows(&with_ids, usize::MAX, usize::MAX, usize::MAX, 0, u32::MAX);
    }
}
