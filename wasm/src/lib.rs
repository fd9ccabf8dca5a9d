//! # tiervec-wasm
//!
//! The edge kernel as a `wasm32-wasip1` guest for CDN edge workers: snapshot validation,
//! search, overlay merge, certificates and the confidence rule, compiled from
//! `tiervec-shared` (not copied: the guest answers with `tiervec_shared::local::LocalCache`,
//! the code the native edge answers with), behind the small C ABI below, hosted by wasmtime in
//! `tiervec_edge::wasm_host`. Built with `simd128` (`.cargo/config.toml`), so the portable
//! kernels of `tiervec_shared::kernels` vectorise. The ABI is documented in `docs/wasm.md`; the
//! byte layouts of requests and responses in [`guest_abi`].
//!
//! ## ABI (version [`guest_abi::ABI_VERSION`])
//! * `tv_abi_version() -> u32`.
//! * `tv_alloc(len, align) -> ptr` / `tv_dealloc(ptr, len, align)`: guest memory for the host
//!   to write into; `align` is honoured (rkyv's bytecheck checks absolute alignment, so the
//!   snapshot must sit on a 16-byte boundary). A null pointer means out of memory.
//! * `tv_load_snapshot(ptr, len) -> status`: takes ownership of a buffer from
//!   `tv_alloc(len, 16)` holding a whole snapshot file, validates it (`Snapshot::open`: header,
//!   checksums, rkyv bytecheck, graph indices) and makes it the cache, with an empty overlay.
//!   On error the buffer is freed and the previous cache stays.
//! * `tv_apply_delta(ptr, len, accept_certificates) -> status`: a pushed `Delta` in its rkyv
//!   bytes (`Delta::to_bytes`), checked and applied to the overlay; the buffer stays the host's.
//! * `tv_set_certificates(ptr, len) -> status`: the certificates in force ([`guest_abi`]: anchor
//!   ids and radii; every other anchor uncertified) — how the host drops them when the native
//!   edge starts a connection and hands them over after a compaction.
//! * `tv_configure(has_kth, max_kth, has_anchor, max_anchor) -> status`: the confidence rule.
//! * `tv_search(ptr, len) -> status`: a search request ([`guest_abi`]); the response goes to the
//!   result buffer.
//! * `tv_result_ptr() -> ptr`, `tv_result_len() -> len`: the last export's result — the
//!   response on success, a UTF-8 message on error. Valid until the next export call.
//!
//! Every fallible export returns a [`guest_abi::status`] code; bad input is a code and a message,
//! never a trap. The guest does not panic on any input (every index is validated first); a
//! panic would still be a trap the host reports with the guest's stderr (its panic message).
//!
//! The guest is single-threaded and keeps its whole state in one [`Guest`] value; the host
//! keeps one instance per concurrent request.

use std::alloc::Layout;
use std::cell::RefCell;
use std::ops::Deref;

use tiervec_shared::confidence::{ConfidenceRule, Decision};
use tiervec_shared::local::{LocalCache, LocalScratch};
use tiervec_shared::push::Delta;
use tiervec_shared::snapshot::{BODY_ALIGN, Snapshot, StableBytes};

use tiervec_shared::guest_abi::{self, status};

/// A snapshot buffer the guest owns: allocated by `tv_alloc(len, BODY_ALIGN)`, written by the
/// host before `tv_load_snapshot`, freed when the snapshot is replaced.
pub struct GuestBytes {
    ptr: *mut u8,
    len: usize,
}

impl GuestBytes {
    fn layout(len: usize) -> Option<Layout> {
        Layout::from_size_align(len.max(1), BODY_ALIGN).ok()
    }
}

impl Deref for GuestBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` came from `tv_alloc(len, BODY_ALIGN)` (checked by `tv_load_snapshot`)
        // and is owned by this value until drop.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for GuestBytes {
    fn drop(&mut self) {
        if let Some(layout) = Self::layout(self.len) {
            // SAFETY: allocated with this layout by `tv_alloc`, freed once, here.
            unsafe { std::alloc::dealloc(self.ptr, layout) };
        }
    }
}

// SAFETY: once handed to `tv_load_snapshot` the buffer belongs to the guest; the host never
// writes into it again (the ABI contract, `docs/wasm.md`) and the guest only frees it on drop,
// so its address, length and contents are fixed for the life of the value.
unsafe impl StableBytes for GuestBytes {}

/// The guest's whole state.
#[derive(Default)]
pub struct Guest {
    snapshot: Option<Snapshot<GuestBytes>>,
    cache: LocalCache,
    rule: ConfidenceRule,
    scratch: LocalScratch,
    query: Vec<f32>,
    /// The last export's result: a response, or an error message.
    result: Vec<u8>,
}

/// A failed export: its status code and message.
struct Failure(i32, String);

impl Guest {
    /// Validates `bytes` as a snapshot and makes it the cache (empty overlay).
    fn load_snapshot(&mut self, bytes: GuestBytes) -> Result<(), Failure> {
        let snapshot =
            Snapshot::open(bytes).map_err(|e| Failure(status::SNAPSHOT_REFUSED, e.to_string()))?;
        self.cache = LocalCache::over_snapshot(&snapshot.view());
        self.snapshot = Some(snapshot);
        Ok(())
    }

    fn apply_delta(&mut self, bytes: &[u8], accept_certificates: bool) -> Result<(), Failure> {
        let delta = Delta::from_bytes(bytes)
            .map_err(|e| Failure(status::DELTA_MALFORMED, e.to_string()))?;
        self.cache
            .apply(&delta, accept_certificates)
            .map_err(|e| Failure(status::DELTA_REFUSED, e.to_string()))?;
        Ok(())
    }

    fn set_certificates(&mut self, bytes: &[u8]) -> Result<(), Failure> {
        let certificates = guest_abi::decode_certificates(bytes)
            .map_err(|e| Failure(status::MALFORMED_REQUEST, e.to_string()))?;
        self.cache.set_certificates(&certificates);
        Ok(())
    }

    fn search(&mut self, request: &[u8]) -> Result<(), Failure> {
        let (k, ef) = guest_abi::decode_request(request, &mut self.query)
            .map_err(|e| Failure(status::MALFORMED_REQUEST, e.to_string()))?;
        let (k, ef) = (k as usize, ef as usize);
        let view = self.snapshot.as_ref().map(Snapshot::view);
        let answer = self
            .cache
            .search(view.as_ref(), &self.query, k, ef, &mut self.scratch)
            .map_err(|e| Failure(status::INVALID_QUERY, e.to_string()))?;
        let distances: Vec<f32> = answer.hits.iter().map(|h| h.distance).collect();
        // The rule's decision alone: a certified answer is served only while the host's link
        // to the cloud is up, which only the host knows.
        let local = self
            .rule
            .decide(&distances, k, answer.nearest_anchor.map(|(_, d)| d))
            == Decision::Local;
        guest_abi::encode_response(
            answer
                .hits
                .iter()
                .map(|h| (h.id, h.distance, h.lsn, h.payload.as_deref())),
            answer.nearest_anchor,
            answer.certified,
            local,
            &mut self.result,
        )
        .map_err(|e| Failure(status::MALFORMED_REQUEST, e.to_string()))
    }

    /// Runs an export: its result (or error message) into the result buffer, its status out.
    fn finish(&mut self, outcome: Result<(), Failure>, keep_result: bool) -> i32 {
        match outcome {
            Ok(()) => {
                if !keep_result {
                    self.result.clear();
                }
                status::OK
            }
            Err(Failure(code, message)) => {
                self.result.clear();
                self.result.extend_from_slice(message.as_bytes());
                code
            }
        }
    }
}

thread_local! {
    static GUEST: RefCell<Guest> = RefCell::new(Guest::default());
}

/// Runs `f` on the guest state; a re-entrant call (impossible from a correct host) is `BUSY`.
fn with_guest(f: impl FnOnce(&mut Guest) -> i32) -> i32 {
    GUEST.with(|g| match g.try_borrow_mut() {
        Ok(mut guest) => f(&mut guest),
        Err(_) => status::BUSY,
    })
}

/// Whether `[ptr, ptr + len)` lies in linear memory (on wasm32; natively the caller — a test —
/// is trusted), and the pointer is not null.
fn in_memory(ptr: *const u8, len: usize) -> bool {
    if ptr.is_null() {
        return false;
    }
    #[cfg(target_arch = "wasm32")]
    {
        let memory = core::arch::wasm32::memory_size(0).saturating_mul(65_536);
        (ptr as usize)
            .checked_add(len)
            .is_some_and(|end| end <= memory)
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        let _ = len;
        true
    }
}

/// Borrows an input buffer, or fails the export with `BAD_ARGUMENT`.
///
/// # Safety
/// The host must have written `len` bytes at `ptr` (from `tv_alloc`) and not touch them until
/// the export returns.
unsafe fn input<'a>(ptr: *const u8, len: usize) -> Result<&'a [u8], Failure> {
    if !in_memory(ptr, len) {
        return Err(Failure(
            status::BAD_ARGUMENT,
            format!("buffer {ptr:p}+{len} is null or outside linear memory"),
        ));
    }
    // SAFETY: in bounds (checked above) and written by the host, per this function's contract.
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

/// The ABI version of this guest ([`guest_abi::ABI_VERSION`]).
#[unsafe(no_mangle)]
pub extern "C" fn tv_abi_version() -> u32 {
    guest_abi::ABI_VERSION
}

/// Allocates `len` bytes aligned to `align` (a power of two) for the host to write into; null
/// when the guest is out of memory or `align` is not a power of two.
#[unsafe(no_mangle)]
pub extern "C" fn tv_alloc(len: usize, align: usize) -> *mut u8 {
    match Layout::from_size_align(len.max(1), align) {
        // SAFETY: the layout has a non-zero size.
        Ok(layout) => unsafe { std::alloc::alloc(layout) },
        Err(_) => std::ptr::null_mut(),
    }
}

/// Frees a buffer from [`tv_alloc`] with the same `len` and `align`.
///
/// # Safety
/// `ptr` must come from `tv_alloc(len, align)` and not be freed yet (nor handed to
/// `tv_load_snapshot`, which takes ownership).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tv_dealloc(ptr: *mut u8, len: usize, align: usize) {
    if let (false, Ok(layout)) = (ptr.is_null(), Layout::from_size_align(len.max(1), align)) {
        // SAFETY: per this function's contract.
        unsafe { std::alloc::dealloc(ptr, layout) };
    }
}

/// Takes a snapshot file from a buffer of `tv_alloc(len, 16)`, validates it and makes it the
/// cache. The buffer belongs to the guest afterwards, whatever the outcome.
///
/// # Safety
/// `ptr` must come from `tv_alloc(len, 16)`, hold the file's `len` bytes, and never be
/// touched by the host again.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tv_load_snapshot(ptr: *mut u8, len: usize) -> i32 {
    with_guest(|guest| {
        let outcome = if !in_memory(ptr, len) {
            Err(Failure(
                status::BAD_ARGUMENT,
                format!("snapshot buffer {ptr:p}+{len} is null or outside linear memory"),
            ))
        } else if !(ptr as usize).is_multiple_of(BODY_ALIGN) {
            // Not ours to free with the snapshot layout: leave it to the host.
            Err(Failure(
                status::BAD_ARGUMENT,
                format!("snapshot buffer {ptr:p} is not {BODY_ALIGN}-byte aligned"),
            ))
        } else {
            guest.load_snapshot(GuestBytes { ptr, len })
        };
        guest.finish(outcome, false)
    })
}

/// Applies a pushed delta (its `Delta::to_bytes` form); with `accept_certificates` 0 its
/// certificates are dropped, as the native edge does for a delta of a superseded connection.
///
/// # Safety
/// `ptr` must hold `len` bytes written by the host (from `tv_alloc`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tv_apply_delta(
    ptr: *const u8,
    len: usize,
    accept_certificates: u32,
) -> i32 {
    with_guest(|guest| {
        // SAFETY: per this function's contract.
        let outcome = unsafe { input(ptr, len) }
            .and_then(|bytes| guest.apply_delta(bytes, accept_certificates != 0));
        guest.finish(outcome, false)
    })
}

/// Makes the listed certificates (layout in [`guest_abi`]) the ones in force; every anchor not
/// listed is uncertified. A malformed list changes nothing.
///
/// # Safety
/// `ptr` must hold `len` bytes written by the host (from `tv_alloc`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tv_set_certificates(ptr: *const u8, len: usize) -> i32 {
    with_guest(|guest| {
        // SAFETY: per this function's contract.
        let outcome = unsafe { input(ptr, len) }.and_then(|bytes| guest.set_certificates(bytes));
        guest.finish(outcome, false)
    })
}

/// Sets the confidence rule: a threshold on the k-th distance and one on the distance to the
/// nearest anchor, each present when its flag is non-zero.
#[unsafe(no_mangle)]
pub extern "C" fn tv_configure(
    has_kth: u32,
    max_kth: f32,
    has_anchor: u32,
    max_anchor: f32,
) -> i32 {
    with_guest(|guest| {
        guest.rule = ConfidenceRule {
            max_kth_distance: (has_kth != 0).then_some(max_kth),
            max_anchor_distance: (has_anchor != 0).then_some(max_anchor),
        };
        guest.finish(Ok(()), false)
    })
}

/// Answers a search request (layout in [`guest_abi`]); the response is the result buffer.
///
/// # Safety
/// `ptr` must hold `len` bytes written by the host (from `tv_alloc`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tv_search(ptr: *const u8, len: usize) -> i32 {
    with_guest(|guest| {
        // SAFETY: per this function's contract.
        let outcome = unsafe { input(ptr, len) }.and_then(|request| guest.search(request));
        guest.finish(outcome, true)
    })
}

/// Address of the last export's result (see [`tv_result_len`]).
#[unsafe(no_mangle)]
pub extern "C" fn tv_result_ptr() -> *const u8 {
    GUEST.with(|g| {
        g.try_borrow()
            .map_or(std::ptr::null(), |g| g.result.as_ptr())
    })
}

/// Length of the last export's result.
#[unsafe(no_mangle)]
pub extern "C" fn tv_result_len() -> usize {
    GUEST.with(|g| g.try_borrow().map_or(0, |g| g.result.len()))
}

/// Test builds only (feature `test-exports`): spins for `iterations` rounds of arithmetic the
/// optimiser cannot remove, so the host's deadline tests have a guest that runs too long.
#[cfg(feature = "test-exports")]
#[unsafe(no_mangle)]
pub extern "C" fn tv_test_spin(iterations: u64) -> u64 {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for i in 0..iterations {
        x = std::hint::black_box(x.rotate_left(5) ^ i).wrapping_mul(0x2545_f491_4f6c_dd1d);
    }
    x
}

#[cfg(test)]
mod tests;
