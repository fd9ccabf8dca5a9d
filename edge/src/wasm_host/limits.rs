//! The engine and what bounds a guest: the engine's settings (epoch interruption, a fixed 4 GiB
//! memory reservation, SIMD), the ticker thread that advances the epoch, deadlines in whole
//! ticks, the cap on linear memory, and the huge-page hint for guest memory.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing::debug;
use wasmtime::{Config, Engine, Memory, OptLevel, ResourceLimiter};

use super::error::{WasmError, runtime};

/// Address space reserved for each instance's linear memory: all a 32-bit memory can address,
/// so it never moves and loads need no bounds checks (guard pages catch the rest), and
/// [`advise_huge_pages`] stays inside it.
const MEMORY_RESERVATION: u64 = 1 << 32;

/// Asks Linux to back an instance's linear memory with transparent huge pages
/// (`MADV_HUGEPAGE`: where the THP mode is `madvise`, a common default, anonymous memory gets
/// 4 KiB pages unless asked). The guest's copy of the snapshot is ~20 MB that the search reads
/// at random, so with 4 KiB pages most rows cost a TLB miss; `tiervec-testbed bench wasm`
/// measured the guest ~6 % faster with the hint (docs/wasm.md). A hint: refused, it is logged
/// and the memory works as before.
pub(super) fn advise_huge_pages(memory: &Memory, store: &impl wasmtime::AsContext, limit: usize) {
    #[cfg(target_os = "linux")]
    {
        let len = limit.min(MEMORY_RESERVATION as usize);
        let base = memory.data_ptr(store);
        // SAFETY: MADV_HUGEPAGE changes neither contents nor protection, only how the kernel
        // backs the pages; [base, base + len) lies inside this memory's reservation
        // (MEMORY_RESERVATION ≥ len, page-aligned by mmap), which wasmtime holds for the
        // instance's lifetime and never moves (`memory_may_move(false)`).
        let rc = unsafe { libc::madvise(base.cast(), len, libc::MADV_HUGEPAGE) };
        if rc != 0 {
            debug!(
                "madvise(MADV_HUGEPAGE) on guest memory refused: {}",
                io::Error::last_os_error()
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (memory, store, limit);
}

/// Set (to anything) to have the engine write `/tmp/perf-<pid>.map`, so that `perf report`
/// names the guest's compiled functions.
const PERF_MAP_ENV: &str = "TIERVEC_WASM_PERF_MAP";

/// The engine every guest runs on.
pub(super) fn engine() -> Result<Engine, WasmError> {
    let mut config = Config::new();
    // A 4 GiB reservation with guard pages (loads need no bounds checks) and a memory that
    // never moves are wasmtime's defaults on 64-bit hosts, stated because `advise_huge_pages`
    // relies on them. SIMD and relaxed SIMD are on by default too, but the guest needs both
    // (its `i8` kernel uses `i16x8.relaxed_dot_i8x16_i7x16`, exact for its operand ranges under
    // any lowering), so say so rather than inherit it.
    config
        .memory_reservation(MEMORY_RESERVATION)
        .memory_may_move(false)
        .epoch_interruption(true)
        .wasm_simd(true)
        .wasm_relaxed_simd(true)
        .cranelift_opt_level(OptLevel::Speed);
    if std::env::var_os(PERF_MAP_ENV).is_some() {
        config.profiler(wasmtime::ProfilingStrategy::PerfMap);
    }
    Engine::new(&config).map_err(runtime)
}

/// Caps linear memory and remembers the growth it refused.
pub(super) struct Limiter {
    max_memory: usize,
    refused: Option<usize>,
}

impl Limiter {
    pub(super) fn new(max_memory: usize) -> Limiter {
        Limiter {
            max_memory,
            refused: None,
        }
    }

    /// The growth refused since the last call, if any.
    pub(super) fn take_refused(&mut self) -> Option<usize> {
        self.refused.take()
    }
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_memory {
            self.refused = Some(desired);
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

/// Increments the engine's epoch every tick until dropped.
pub(super) struct Ticker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Ticker {
    pub(super) fn start(engine: Engine, tick: Duration) -> io::Result<Ticker> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(tick);
                    engine.increment_epoch();
                }
            })?;
        Ok(Ticker {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Whole epoch ticks covering `d`, plus one: the epoch may advance right after the deadline
/// is set, so `d` is guaranteed and overshot by at most one tick.
pub(super) fn ticks(d: Duration, tick: Duration) -> u64 {
    (d.as_nanos().div_ceil(tick.as_nanos().max(1)) as u64).saturating_add(1)
}
