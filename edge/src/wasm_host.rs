//! The WASM edge worker's host: the edge kernel (`tiervec-wasm`, a `wasm32-wasip1` guest built
//! from `tiervec-shared`) run by wasmtime, as a CDN edge worker runs tenant code.
//!
//! * **Engine**: Cranelift at `OptLevel::Speed`, epoch interruption on, SIMD and relaxed SIMD
//!   (the guest's `i8` kernel) stated explicitly, nothing else beyond wasmtime's defaults
//!   (wasmtime is built without default features: no component model of its own, no built-in
//!   cache, no profiling).
//! * **Module cache** ([`load_module`]): the guest is compiled once and its compiled form
//!   (`Module::serialize`) kept in a directory tiervec creates itself (mode 0700, owned by this
//!   user, refused otherwise). `Module::deserialize` trusts its input (it is machine code), so
//!   each compiled file has a checksum file beside it — xxh3-64 of the compiled bytes, their
//!   length, and the engine fingerprint (`Engine::precompile_compatibility_hash`); the bytes are
//!   read into memory, checked, and only then deserialised (no window between check and use).
//!   A mismatch is logged and the module recompiled and rewritten (atomically: temp, fsync,
//!   rename, fsync of the directory).
//! * **Instances** ([`WasmHost`]): a pool of long-lived instances, one per concurrent request.
//!   Each holds its own copy of the snapshot in its linear memory, written once when the
//!   instance is made (or the snapshot replaced), never per request; deltas reach each instance
//!   once, in order, from the host's journal before its next request. See "Memory strategy".
//! * **Limits**: a deadline per call by epoch interruption (a ticker thread increments the
//!   engine's epoch every `tick`; cheaper than fuel, which instruments every basic block — the
//!   epoch check is one load and compare at function entries and loop headers); a cap on linear
//!   memory (a `ResourceLimiter` that also records a refused growth, so a guest that runs out is
//!   reported as [`WasmError::MemoryCap`]); WASI preview 1 with no capability: no preopened
//!   directory, no environment, no arguments, no sockets, stdin closed, stdout discarded,
//!   stderr captured in a small buffer (a guest panic's message).
//!
//! # Memory strategy
//! Three ways to put a snapshot in guest memory, and why this host copies it once per instance:
//! * *A data segment in the module* would let wasmtime's copy-on-write memory image map it
//!   into every instance for free — but a snapshot changes at every compaction, and each change
//!   would mean a new module to compile (seconds) and cache.
//! * *Copy-on-write mapping of the snapshot file through custom host memory*
//!   (`Config::with_host_memory`) — the pooling allocator ignores that hook, so it excludes the
//!   pooling allocator, and it ties guest memory to the file's layout.
//! * *One copy per instance* (chosen): instances live as long as the edge, so the copy (a
//!   `memcpy` plus the guest's validation, milliseconds for 10,000 vectors) happens once per
//!   instance and snapshot, never per request; the pooling allocator's fast instantiation buys
//!   nothing here, so the default on-demand allocator is used. The cost is memory: each
//!   instance holds the snapshot (reported by `tiervec-testbed bench wasm` as
//!   `memory_per_instance_bytes`), and the pool is bounded by `max_instances`.

#[path = "../../wasm/src/wire.rs"]
pub mod wire;

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use thiserror::Error;
use tiervec_shared::confidence::ConfidenceRule;
use tiervec_shared::durable::write_atomic;
use tiervec_shared::push::Delta;
use tracing::{debug, debug_span, info, warn};
use wasmtime::{
    Config, Engine, Instance, InstancePre, Linker, Memory, Module, OptLevel, ResourceLimiter,
    Store, Trap, TypedFunc,
};
use wasmtime_wasi::WasiCtxBuilder;
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::{MemoryOutputPipe, SinkOutputStream};
use xxhash_rust::xxh3::xxh3_64;

use crate::wasm_prefetch::{self, GuestMemory};
use wire::status;

/// Bytes of guest stderr kept (a panic message and its location).
const STDERR_CAPACITY: usize = 4096;
/// Alignment of the snapshot buffer in guest memory (`tiervec_shared::snapshot::BODY_ALIGN`;
/// the header is 128 bytes, so the body is aligned too).
const SNAPSHOT_ALIGN: u32 = 16;
/// Alignment of request buffers (the query's `f32`s).
const REQUEST_ALIGN: u32 = 8;
/// Version of the checksum file's format.
const CACHE_FORMAT: &str = "tiervec-module-cache 1";

/// Why the WASM host could not answer.
#[derive(Debug, Error)]
pub enum WasmError {
    #[error(
        "guest module {path} cannot be read: {source}; build it with `cargo build --profile guest --target wasm32-wasip1 -p tiervec-wasm`"
    )]
    ModuleMissing {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("guest module {path} is not a tiervec guest wasmtime can run: {message}")]
    ModuleInvalid { path: PathBuf, message: String },
    #[error(
        "module cache directory {dir} is not safe to load machine code from: {why}; point the cache at a directory only tiervec writes"
    )]
    CacheUnsafe { dir: PathBuf, why: String },
    #[error("module cache {path}: {source}")]
    CacheIo {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("guest refused the call ({}, code {code}): {message}", status::name(*code))]
    Guest { code: i32, message: String },
    #[error("guest ran past its deadline of {deadline:?} and was stopped")]
    DeadlineExceeded { deadline: Duration },
    #[error("guest reached its memory cap of {limit} bytes (it asked for {wanted})")]
    MemoryCap { limit: usize, wanted: usize },
    #[error("guest trapped: {message}")]
    Trap { message: String },
    #[error("wasmtime: {0}")]
    Runtime(String),
}

impl WasmError {
    /// The guest's status code, for a refusal.
    pub fn guest_code(&self) -> Option<i32> {
        match self {
            WasmError::Guest { code, .. } => Some(*code),
            _ => None,
        }
    }
}

fn runtime(e: wasmtime::Error) -> WasmError {
    WasmError::Runtime(format!("{e:#}"))
}

/// How the host runs its guest.
#[derive(Clone, Debug)]
pub struct WasmConfig {
    /// The guest module (`tiervec_wasm.wasm`).
    pub module: PathBuf,
    /// Where compiled modules are cached; created with mode 0700 if missing.
    pub cache_dir: PathBuf,
    /// Most instances alive at once (each serves one request at a time and holds a snapshot).
    pub max_instances: usize,
    /// Longest a search may run in the guest.
    pub deadline: Duration,
    /// Longest loading a snapshot or applying deltas may run in the guest.
    pub maintenance_deadline: Duration,
    /// Epoch period: deadlines are whole ticks, so they are met within one tick.
    pub tick: Duration,
    /// Cap on each instance's linear memory, in bytes.
    pub memory_limit: usize,
    /// Ask Linux to back guest memory with transparent huge pages ([`advise_huge_pages`]).
    pub huge_pages: bool,
}

impl WasmConfig {
    /// Defaults: one instance per core, a 50 ms search deadline on a 1 ms tick, 10 s for
    /// maintenance, 1 GiB of linear memory per instance, in huge pages where Linux allows.
    pub fn new(module: PathBuf, cache_dir: PathBuf) -> WasmConfig {
        WasmConfig {
            module,
            cache_dir,
            max_instances: std::thread::available_parallelism().map_or(1, |n| n.get()),
            deadline: Duration::from_millis(50),
            maintenance_deadline: Duration::from_secs(10),
            tick: Duration::from_millis(1),
            memory_limit: 1 << 30,
            huge_pages: true,
        }
    }
}

/// Where a module came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModuleSource {
    /// Compiled from the `.wasm` now (and written to the cache).
    Compiled,
    /// Deserialised from the on-disk cache, its checksum verified.
    Cached,
}

/// A loaded module and how it was obtained.
pub struct LoadedModule {
    pub module: Module,
    pub source: ModuleSource,
    /// Time to read, check and compile or deserialise.
    pub took: Duration,
}

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
fn advise_huge_pages(memory: &Memory, store: &impl wasmtime::AsContext, limit: usize) {
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
pub const PERF_MAP_ENV: &str = "TIERVEC_WASM_PERF_MAP";

/// The engine every guest runs on.
pub fn engine() -> Result<Engine, WasmError> {
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

/// The engine's fingerprint: compiled code is only valid for the same wasmtime version and
/// settings (the same hash `Module::deserialize` checks).
fn fingerprint(engine: &Engine) -> u64 {
    let mut h = DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut h);
    h.finish()
}

/// Creates `dir` (mode 0700) if missing and checks it is a real directory owned by this user
/// that no one else can write into.
fn private_dir(dir: &Path) -> Result<(), WasmError> {
    let unsafe_dir = |why: String| WasmError::CacheUnsafe {
        dir: dir.to_owned(),
        why,
    };
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| WasmError::CacheIo {
                path: dir.to_owned(),
                source,
            })?;
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|source| WasmError::CacheIo {
        path: dir.to_owned(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(unsafe_dir("not a directory (or a symbolic link)".into()));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(unsafe_dir(format!("owned by uid {}, not {me}", meta.uid())));
    }
    if meta.permissions().mode() & 0o022 != 0 {
        return Err(unsafe_dir(format!(
            "writable by group or others (mode {:o})",
            meta.permissions().mode() & 0o777
        )));
    }
    Ok(())
}

/// The checksum file's text for compiled bytes.
fn checksum_text(compiled: &[u8], fingerprint: u64) -> String {
    format!(
        "{CACHE_FORMAT}\nengine {fingerprint:016x}\nlen {}\nxxh3 {:016x}\n",
        compiled.len(),
        xxh3_64(compiled)
    )
}

/// Reads the cached compiled module at `path` if its checksum file vouches for it; `None`
/// (logged) when it is missing, damaged or tampered with.
fn read_cached(path: &Path, sum: &Path, fingerprint: u64) -> Option<Vec<u8>> {
    let expected = std::fs::read_to_string(sum).ok()?;
    let compiled = std::fs::read(path).ok()?;
    if checksum_text(&compiled, fingerprint) != expected {
        warn!(file = %path.display(), "cached module fails its checksum; recompiling");
        return None;
    }
    Some(compiled)
}

/// Loads the guest: from the module cache when a checked compiled copy is there, else compiled
/// from `wasm_path` and written to the cache.
pub fn load_module(
    engine: &Engine,
    wasm_path: &Path,
    cache_dir: &Path,
) -> Result<LoadedModule, WasmError> {
    let _span = debug_span!("wasm_module_load", module = %wasm_path.display()).entered();
    let started = Instant::now();
    let wasm = std::fs::read(wasm_path).map_err(|source| WasmError::ModuleMissing {
        path: wasm_path.to_owned(),
        source,
    })?;
    private_dir(cache_dir)?;
    let fp = fingerprint(engine);
    let key = format!("{:016x}-{fp:016x}", xxh3_64(&wasm));
    let compiled_path = cache_dir.join(format!("{key}.cwasm"));
    let sum_path = cache_dir.join(format!("{key}.sum"));
    if let Some(compiled) = read_cached(&compiled_path, &sum_path, fp) {
        // SAFETY: these bytes are, checksum for checksum, what `Module::serialize` wrote into a
        // directory only this user can write (checked by `private_dir`), for this engine's
        // fingerprint; they were read into memory before the check, so they cannot change
        // between check and use.
        match unsafe { Module::deserialize(engine, &compiled) } {
            Ok(module) => {
                let took = started.elapsed();
                debug!(?took, "guest module deserialised from the cache");
                return Ok(LoadedModule {
                    module,
                    source: ModuleSource::Cached,
                    took,
                });
            }
            Err(e) => warn!(error = %format!("{e:#}"), "cached module refused; recompiling"),
        }
    }
    let module = Module::new(engine, &wasm).map_err(|e| WasmError::ModuleInvalid {
        path: wasm_path.to_owned(),
        message: format!("{e:#}"),
    })?;
    let compiled = module.serialize().map_err(runtime)?;
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |source| WasmError::CacheIo { path, source }
    };
    write_atomic(&compiled_path, &compiled, true).map_err(io_err(&compiled_path))?;
    write_atomic(&sum_path, checksum_text(&compiled, fp).as_bytes(), true)
        .map_err(io_err(&sum_path))?;
    let took = started.elapsed();
    info!(?took, cache = %compiled_path.display(), "guest module compiled and cached");
    Ok(LoadedModule {
        module,
        source: ModuleSource::Compiled,
        took,
    })
}

/// Caps linear memory and remembers the growth it refused.
struct Limiter {
    max_memory: usize,
    refused: Option<usize>,
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

/// What each store holds besides the instance.
struct GuestState {
    wasi: WasiP1Ctx,
    limiter: Limiter,
    stderr: MemoryOutputPipe,
    /// The instance's linear memory, for the prefetch imports (set once instantiated).
    memory: Option<Memory>,
}

impl GuestMemory for GuestState {
    fn guest_memory(&self) -> Option<Memory> {
        self.memory
    }
}

/// The guest's exports.
struct Exports {
    memory: Memory,
    alloc: TypedFunc<(u32, u32), u32>,
    load_snapshot: TypedFunc<(u32, u32), i32>,
    apply_delta: TypedFunc<(u32, u32, u32), i32>,
    set_certificates: TypedFunc<(u32, u32), i32>,
    configure: TypedFunc<(u32, f32, u32, f32), i32>,
    search: TypedFunc<(u32, u32), i32>,
    result_ptr: TypedFunc<(), u32>,
    result_len: TypedFunc<(), u32>,
}

/// One instance and how far it has followed the journal.
struct GuestInstance {
    store: Store<GuestState>,
    instance: Instance,
    exports: Exports,
    /// The journal generation (snapshot) it holds.
    generation: u64,
    /// Deltas of that generation it has applied.
    applied: usize,
    /// The rule generation it was configured with.
    rule_generation: u64,
    /// A reusable request buffer in guest memory: address and capacity.
    request: (u32, u32),
}

/// What every instance must hold: the snapshot, the changes since, and the rule.
#[derive(Default)]
struct Journal {
    /// Bumped when the snapshot is replaced (instances of an older one are remade).
    generation: u64,
    snapshot: Option<Arc<[u8]>>,
    /// Changes since the snapshot, in order.
    entries: Vec<JournalEntry>,
    rule: ConfidenceRule,
    rule_generation: u64,
}

/// One change to the cache after its snapshot, replayed into every instance.
#[derive(Clone)]
enum JournalEntry {
    /// A delta's bytes (`Delta::to_bytes`) and whether its certificates are taken.
    Delta {
        bytes: Arc<[u8]>,
        accept_certificates: bool,
    },
    /// The certificates in force from here on (`wire::encode_certificates`).
    Certificates(Arc<[u8]>),
}

/// A guest's answer to a search.
pub type GuestAnswer = wire::SearchResponse;

/// Increments the engine's epoch every tick until dropped.
struct Ticker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Ticker {
    fn start(engine: Engine, tick: Duration) -> io::Result<Ticker> {
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

/// Instances not in use, and how many exist.
struct Pool {
    idle: Vec<GuestInstance>,
    live: usize,
}

/// The WASM host: engine, module, journal and the pool of instances.
pub struct WasmHost {
    config: WasmConfig,
    engine: Engine,
    pre: InstancePre<GuestState>,
    module_source: ModuleSource,
    module_took: Duration,
    journal: Mutex<Journal>,
    /// Serialises writers (snapshot loads and deltas) so deltas are journalled in order.
    writer: Mutex<()>,
    pool: Mutex<Pool>,
    returned: Condvar,
    _ticker: Ticker,
}

/// Whole epoch ticks covering `d`, plus one: the epoch may advance right after the deadline
/// is set, so `d` is guaranteed and overshot by at most one tick.
fn ticks(d: Duration, tick: Duration) -> u64 {
    (d.as_nanos().div_ceil(tick.as_nanos().max(1)) as u64).saturating_add(1)
}

impl WasmHost {
    /// Loads the module (from the cache when possible) and starts the epoch ticker; instances
    /// are made on demand, holding the snapshot given by [`WasmHost::load_snapshot`] (none:
    /// an empty cache that deltas fill).
    pub fn start(config: WasmConfig) -> Result<WasmHost, WasmError> {
        let engine = engine()?;
        let loaded = load_module(&engine, &config.module, &config.cache_dir)?;
        let mut linker: Linker<GuestState> = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |s: &mut GuestState| &mut s.wasi)
            .map_err(runtime)?;
        wasm_prefetch::add_to_linker(&mut linker).map_err(runtime)?;
        let pre = linker
            .instantiate_pre(&loaded.module)
            .map_err(|e| WasmError::ModuleInvalid {
                path: config.module.clone(),
                message: format!("{e:#}"),
            })?;
        let ticker = Ticker::start(engine.clone(), config.tick).map_err(|e| {
            WasmError::Runtime(format!("cannot start the epoch ticker thread: {e}"))
        })?;
        let host = WasmHost {
            engine,
            pre,
            module_source: loaded.source,
            module_took: loaded.took,
            journal: Mutex::new(Journal::default()),
            writer: Mutex::new(()),
            pool: Mutex::new(Pool {
                idle: Vec::new(),
                live: 0,
            }),
            returned: Condvar::new(),
            _ticker: ticker,
            config,
        };
        // One instance now: the module's imports and ABI version are checked at start.
        let first = host.instantiate()?;
        host.put_back(first);
        Ok(host)
    }

    /// Whether the module came from the cache or was compiled, and how long that took.
    pub fn module_source(&self) -> (ModuleSource, Duration) {
        (self.module_source, self.module_took)
    }

    pub fn config(&self) -> &WasmConfig {
        &self.config
    }

    /// The engine (for measurements and tests).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Replaces the cache with a snapshot file's bytes: validated by the guest (a refusal is
    /// [`WasmError::Guest`] with [`status::SNAPSHOT_REFUSED`] and changes nothing), then every
    /// instance holds it before its next request, with no deltas.
    pub fn load_snapshot(&self, bytes: &[u8]) -> Result<(), WasmError> {
        let _span = debug_span!("wasm_load_snapshot", bytes = bytes.len()).entered();
        let _writer = self.writer.lock();
        let mut probe = self.new_instance()?;
        let outcome = self.guest_load_snapshot(&mut probe, bytes);
        if let Err(e) = outcome {
            self.discard(probe);
            return Err(e);
        }
        let mut journal = self.journal.lock();
        journal.generation += 1;
        journal.snapshot = Some(Arc::from(bytes));
        journal.entries.clear();
        probe.generation = journal.generation;
        probe.applied = 0;
        probe.rule_generation = u64::MAX;
        drop(journal);
        self.put_back(probe);
        Ok(())
    }

    /// Empties the cache every instance holds: no snapshot, no deltas (a reset cache).
    pub fn clear(&self) {
        let _writer = self.writer.lock();
        let mut journal = self.journal.lock();
        journal.generation += 1;
        journal.snapshot = None;
        journal.entries.clear();
    }

    /// Applies a pushed delta (checked by the guest against its manifest; a refusal changes
    /// nothing); every instance applies it before its next request. With
    /// `accept_certificates` false its certificates are not taken (a superseded connection's).
    pub fn apply_delta(&self, delta: &Delta, accept_certificates: bool) -> Result<(), WasmError> {
        let _span = debug_span!("wasm_apply_delta", version = delta.version).entered();
        self.record(JournalEntry::Delta {
            bytes: Arc::from(delta.to_bytes()),
            accept_certificates,
        })
    }

    /// Makes `certificates` (anchor id, radius) the ones in force in every instance; every
    /// other anchor is uncertified (`&[]` drops them all).
    pub fn set_certificates(&self, certificates: &[(u64, f32)]) -> Result<(), WasmError> {
        let _span = debug_span!("wasm_set_certificates", count = certificates.len()).entered();
        let mut bytes = Vec::new();
        wire::encode_certificates(certificates, &mut bytes);
        self.record(JournalEntry::Certificates(Arc::from(bytes)))
    }

    /// Applies `entry` in one instance (brought up to date first) and, if the guest takes it,
    /// journals it for the others; a refusal changes nothing.
    fn record(&self, entry: JournalEntry) -> Result<(), WasmError> {
        let _writer = self.writer.lock();
        let mut instance = self.checkout()?;
        let outcome = self
            .sync(&mut instance)
            .and_then(|()| self.guest_entry(&mut instance, &entry));
        match outcome {
            Ok(()) => {
                let mut journal = self.journal.lock();
                journal.entries.push(entry);
                instance.applied = journal.entries.len();
                drop(journal);
                self.put_back(instance);
                Ok(())
            }
            Err(e @ WasmError::Guest { .. }) => {
                self.put_back(instance);
                Err(e)
            }
            Err(e) => {
                self.discard(instance);
                Err(e)
            }
        }
    }

    /// Sets the confidence rule every instance decides with.
    pub fn configure(&self, rule: ConfidenceRule) {
        let mut journal = self.journal.lock();
        journal.rule = rule;
        journal.rule_generation += 1;
    }

    /// Searches in a guest within the deadline. A guest past it is stopped and discarded
    /// ([`WasmError::DeadlineExceeded`]); a new instance replaces it on demand.
    pub fn search(&self, query: &[f32], k: usize, ef: usize) -> Result<GuestAnswer, WasmError> {
        self.search_within(query, k, ef, self.config.deadline)
    }

    /// [`WasmHost::search`] with its own deadline.
    pub fn search_within(
        &self,
        query: &[f32],
        k: usize,
        ef: usize,
        deadline: Duration,
    ) -> Result<GuestAnswer, WasmError> {
        let _span = debug_span!("wasm_search", k, ef).entered();
        let mut instance = self.checkout()?;
        let outcome = self
            .sync(&mut instance)
            .and_then(|()| self.guest_search(&mut instance, query, k, ef, deadline));
        match outcome {
            Ok(answer) => {
                self.put_back(instance);
                Ok(answer)
            }
            Err(e @ WasmError::Guest { .. }) => {
                self.put_back(instance);
                Err(e)
            }
            Err(e) => {
                warn!(error = %e, "guest instance discarded");
                self.discard(instance);
                Err(e)
            }
        }
    }

    /// Bytes of linear memory of an idle instance after it has followed the journal (the
    /// snapshot copy, the overlay and the guest's buffers): the memory one instance costs.
    pub fn memory_per_instance(&self) -> Result<usize, WasmError> {
        let mut instance = self.checkout()?;
        let outcome = self.sync(&mut instance);
        let bytes = instance.exports.memory.data_size(&instance.store);
        match outcome {
            Ok(()) => {
                self.put_back(instance);
                Ok(bytes)
            }
            Err(e) => {
                self.discard(instance);
                Err(e)
            }
        }
    }

    /// Makes a new instance, empty (test and measurement hook: the cost of instantiation).
    pub fn instantiate_empty(&self) -> Result<Duration, WasmError> {
        let started = Instant::now();
        let instance = self.new_instance()?;
        let took = started.elapsed();
        drop(instance);
        Ok(took)
    }

    /// Test hook: calls the guest's `tv_test_spin` export (only guests built with the
    /// `test-exports` feature have it) for `iterations` rounds within `deadline`, the way a
    /// search is called, so a guest that runs too long can be shown stopped.
    pub fn spin_within(&self, iterations: u64, deadline: Duration) -> Result<u64, WasmError> {
        let mut instance = self.checkout()?;
        let outcome = (|| {
            let GuestInstance {
                store, instance, ..
            } = &mut instance;
            let spin: TypedFunc<u64, u64> = instance
                .get_typed_func(&mut *store, "tv_test_spin")
                .map_err(|e| WasmError::ModuleInvalid {
                    path: self.config.module.clone(),
                    message: format!("{e:#} (build the guest with `--features test-exports`)"),
                })?;
            store.set_epoch_deadline(ticks(deadline, self.config.tick));
            spin.call(&mut *store, iterations)
                .map_err(|e| self.classify(store, e, deadline))
        })();
        match outcome {
            Ok(v) => {
                self.put_back(instance);
                Ok(v)
            }
            Err(e) => {
                self.discard(instance);
                Err(e)
            }
        }
    }

    /// An idle instance, or a new one while fewer than `max_instances` exist; otherwise waits.
    fn checkout(&self) -> Result<GuestInstance, WasmError> {
        let mut pool = self.pool.lock();
        loop {
            if let Some(instance) = pool.idle.pop() {
                return Ok(instance);
            }
            if pool.live < self.config.max_instances.max(1) {
                pool.live += 1;
                drop(pool);
                return self.new_instance().inspect_err(|_| {
                    self.pool.lock().live -= 1;
                    self.returned.notify_one();
                });
            }
            self.returned.wait(&mut pool);
        }
    }

    /// A new instance counted in the pool (for [`WasmHost::start`]).
    fn instantiate(&self) -> Result<GuestInstance, WasmError> {
        self.pool.lock().live += 1;
        self.new_instance()
            .inspect_err(|_| self.pool.lock().live -= 1)
    }

    fn put_back(&self, instance: GuestInstance) {
        self.pool.lock().idle.push(instance);
        self.returned.notify_one();
    }

    /// Drops an instance that trapped or is out of date; another is made on demand.
    fn discard(&self, instance: GuestInstance) {
        drop(instance);
        let mut pool = self.pool.lock();
        pool.live = pool.live.saturating_sub(1);
        drop(pool);
        self.returned.notify_one();
    }

    /// Instantiates the module in a fresh store with the limits and an empty WASI context.
    fn new_instance(&self) -> Result<GuestInstance, WasmError> {
        let _span = debug_span!("wasm_instantiate").entered();
        let stderr = MemoryOutputPipe::new(STDERR_CAPACITY);
        let wasi = WasiCtxBuilder::new()
            .stdout(SinkOutputStream)
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build_p1();
        let mut store = Store::new(
            &self.engine,
            GuestState {
                wasi,
                limiter: Limiter {
                    max_memory: self.config.memory_limit,
                    refused: None,
                },
                stderr,
                memory: None,
            },
        );
        store.limiter(|s| &mut s.limiter);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(ticks(self.config.maintenance_deadline, self.config.tick));
        let instance = self
            .pre
            .instantiate(&mut store)
            .map_err(|e| self.classify(&mut store, e, self.config.maintenance_deadline))?;
        let version: TypedFunc<(), u32> = instance
            .get_typed_func(&mut store, "tv_abi_version")
            .map_err(|e| WasmError::ModuleInvalid {
                path: self.config.module.clone(),
                message: format!("{e:#}"),
            })?;
        let abi = version
            .call(&mut store, ())
            .map_err(|e| self.classify(&mut store, e, self.config.maintenance_deadline))?;
        if abi != wire::ABI_VERSION {
            return Err(WasmError::ModuleInvalid {
                path: self.config.module.clone(),
                message: format!(
                    "guest ABI version {abi}, this host speaks {}",
                    wire::ABI_VERSION
                ),
            });
        }
        // After the version check: a guest of another ABI may lack this one's exports.
        let exports = exports(&instance, &mut store).map_err(|e| WasmError::ModuleInvalid {
            path: self.config.module.clone(),
            message: format!("{e:#}"),
        })?;
        store.data_mut().memory = Some(exports.memory);
        if self.config.huge_pages {
            advise_huge_pages(&exports.memory, &store, self.config.memory_limit);
        }
        Ok(GuestInstance {
            store,
            instance,
            exports,
            generation: 0,
            applied: 0,
            rule_generation: u64::MAX,
            request: (0, 0),
        })
    }

    /// Brings an instance up to the journal: the current snapshot (a new instance if it holds
    /// an older one), the changes it has not applied, the rule.
    fn sync(&self, instance: &mut GuestInstance) -> Result<(), WasmError> {
        let (generation, snapshot, pending, rule) = {
            let journal = self.journal.lock();
            let remake = instance.generation != journal.generation;
            let from = if remake { 0 } else { instance.applied };
            (
                journal.generation,
                remake.then(|| journal.snapshot.clone()),
                journal.entries[from.min(journal.entries.len())..].to_vec(),
                (instance.rule_generation != journal.rule_generation)
                    .then_some((journal.rule, journal.rule_generation)),
            )
        };
        if let Some(snapshot) = snapshot {
            let _span = debug_span!("wasm_resync", generation).entered();
            let mut fresh = self.new_instance()?;
            if let Some(bytes) = snapshot {
                self.guest_load_snapshot(&mut fresh, &bytes)?;
            }
            fresh.generation = generation;
            *instance = fresh;
        }
        for entry in &pending {
            self.guest_entry(instance, entry)?;
            instance.applied += 1;
        }
        if let Some((rule, rule_generation)) = rule {
            self.guest_configure(instance, rule)?;
            instance.rule_generation = rule_generation;
        }
        Ok(())
    }

    /// Turns a wasmtime error from a guest call into a typed error.
    fn classify(
        &self,
        store: &mut Store<GuestState>,
        e: wasmtime::Error,
        deadline: Duration,
    ) -> WasmError {
        if let Some(wanted) = store.data_mut().limiter.refused.take() {
            return WasmError::MemoryCap {
                limit: self.config.memory_limit,
                wanted,
            };
        }
        if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
            return WasmError::DeadlineExceeded { deadline };
        }
        let stderr = store.data().stderr.contents();
        let stderr = String::from_utf8_lossy(&stderr);
        WasmError::Trap {
            message: if stderr.trim().is_empty() {
                format!("{e:#}")
            } else {
                format!("{e:#}; guest stderr: {}", stderr.trim())
            },
        }
    }

    /// Allocates `len` bytes aligned to `align` in the guest.
    fn guest_alloc(
        &self,
        instance: &mut GuestInstance,
        len: usize,
        align: u32,
    ) -> Result<u32, WasmError> {
        let len32 = u32::try_from(len).map_err(|_| WasmError::MemoryCap {
            limit: self.config.memory_limit,
            wanted: len,
        })?;
        let GuestInstance { store, exports, .. } = instance;
        let ptr = exports
            .alloc
            .call(&mut *store, (len32, align))
            .map_err(|e| self.classify(store, e, self.config.maintenance_deadline))?;
        if ptr == 0 {
            return Err(WasmError::MemoryCap {
                limit: self.config.memory_limit,
                wanted: store
                    .data_mut()
                    .limiter
                    .refused
                    .take()
                    .unwrap_or(exports.memory.data_size(&*store) + len),
            });
        }
        Ok(ptr)
    }

    /// The status of a call; on a refusal, the guest's message.
    fn guest_status(&self, instance: &mut GuestInstance, code: i32) -> Result<(), WasmError> {
        if code == status::OK {
            return Ok(());
        }
        let message = String::from_utf8_lossy(self.result(instance)?).into_owned();
        Err(WasmError::Guest { code, message })
    }

    /// The guest's result buffer, borrowed from its memory.
    fn result<'i>(&self, instance: &'i mut GuestInstance) -> Result<&'i [u8], WasmError> {
        let GuestInstance { store, exports, .. } = instance;
        let deadline = self.config.deadline;
        let ptr = exports
            .result_ptr
            .call(&mut *store, ())
            .map_err(|e| self.classify(store, e, deadline))?;
        let len = exports
            .result_len
            .call(&mut *store, ())
            .map_err(|e| self.classify(store, e, deadline))?;
        exports
            .memory
            .data(&*store)
            .get(ptr as usize..ptr as usize + len as usize)
            .ok_or_else(|| WasmError::Trap {
                message: format!("guest result {ptr:#x}+{len} lies outside its memory"),
            })
    }

    fn guest_load_snapshot(
        &self,
        instance: &mut GuestInstance,
        bytes: &[u8],
    ) -> Result<(), WasmError> {
        let deadline = self.config.maintenance_deadline;
        instance
            .store
            .set_epoch_deadline(ticks(deadline, self.config.tick));
        let ptr = self.guest_alloc(instance, bytes.len(), SNAPSHOT_ALIGN)?;
        let GuestInstance { store, exports, .. } = instance;
        exports
            .memory
            .write(&mut *store, ptr as usize, bytes)
            .map_err(|e| WasmError::Runtime(e.to_string()))?;
        // The guest owns the buffer from here, refused or not.
        let code = exports
            .load_snapshot
            .call(&mut *store, (ptr, bytes.len() as u32))
            .map_err(|e| self.classify(store, e, deadline))?;
        self.guest_status(instance, code)
    }

    /// Applies one journal entry in `instance`.
    fn guest_entry(
        &self,
        instance: &mut GuestInstance,
        entry: &JournalEntry,
    ) -> Result<(), WasmError> {
        let deadline = self.config.maintenance_deadline;
        instance
            .store
            .set_epoch_deadline(ticks(deadline, self.config.tick));
        let bytes = match entry {
            JournalEntry::Delta { bytes, .. } | JournalEntry::Certificates(bytes) => bytes,
        };
        let ptr = self.write_request(instance, bytes)?;
        let len = bytes.len() as u32;
        let GuestInstance { store, exports, .. } = instance;
        let code = match entry {
            JournalEntry::Delta {
                accept_certificates,
                ..
            } => exports
                .apply_delta
                .call(&mut *store, (ptr, len, u32::from(*accept_certificates))),
            JournalEntry::Certificates(_) => exports.set_certificates.call(&mut *store, (ptr, len)),
        }
        .map_err(|e| self.classify(store, e, deadline))?;
        self.guest_status(instance, code)
    }

    fn guest_configure(
        &self,
        instance: &mut GuestInstance,
        rule: ConfidenceRule,
    ) -> Result<(), WasmError> {
        let deadline = self.config.maintenance_deadline;
        let GuestInstance { store, exports, .. } = instance;
        store.set_epoch_deadline(ticks(deadline, self.config.tick));
        let code = exports
            .configure
            .call(
                &mut *store,
                (
                    u32::from(rule.max_kth_distance.is_some()),
                    rule.max_kth_distance.unwrap_or(0.0),
                    u32::from(rule.max_anchor_distance.is_some()),
                    rule.max_anchor_distance.unwrap_or(0.0),
                ),
            )
            .map_err(|e| self.classify(store, e, deadline))?;
        self.guest_status(instance, code)
    }

    /// Copies `bytes` into the instance's reusable request buffer (grown when too small).
    fn write_request(&self, instance: &mut GuestInstance, bytes: &[u8]) -> Result<u32, WasmError> {
        let (mut ptr, cap) = instance.request;
        // An empty input still needs a real address: the guest refuses null.
        if (cap as usize) < bytes.len().max(1) {
            let want = bytes.len().next_power_of_two().max(4096);
            let new = self.guest_alloc(instance, want, REQUEST_ALIGN)?;
            // The old buffer is simply left to the guest's allocator: freeing it would need
            // another call per growth, and growth happens a handful of times per instance.
            ptr = new;
            instance.request = (new, want as u32);
        }
        let GuestInstance { store, exports, .. } = instance;
        exports
            .memory
            .write(&mut *store, ptr as usize, bytes)
            .map_err(|e| WasmError::Runtime(e.to_string()))?;
        Ok(ptr)
    }

    fn guest_search(
        &self,
        instance: &mut GuestInstance,
        query: &[f32],
        k: usize,
        ef: usize,
        deadline: Duration,
    ) -> Result<GuestAnswer, WasmError> {
        let mut request = Vec::new();
        wire::encode_request(
            u32::try_from(k).unwrap_or(u32::MAX),
            u32::try_from(ef).unwrap_or(u32::MAX),
            query,
            &mut request,
        )
        .map_err(|e| WasmError::Runtime(e.to_string()))?;
        let ptr = self.write_request(instance, &request)?;
        let GuestInstance { store, exports, .. } = instance;
        store.set_epoch_deadline(ticks(deadline, self.config.tick));
        let code = exports
            .search
            .call(&mut *store, (ptr, request.len() as u32))
            .map_err(|e| self.classify(store, e, deadline))?;
        self.guest_status(instance, code)?;
        wire::decode_response(self.result(instance)?).map_err(|e| WasmError::Trap {
            message: format!("guest answered with a malformed response: {e}"),
        })
    }
}

fn exports(instance: &Instance, store: &mut Store<GuestState>) -> wasmtime::Result<Exports> {
    Ok(Exports {
        memory: instance
            .get_memory(&mut *store, "memory")
            .ok_or_else(|| wasmtime::format_err!("guest exports no memory"))?,
        alloc: instance.get_typed_func(&mut *store, "tv_alloc")?,
        load_snapshot: instance.get_typed_func(&mut *store, "tv_load_snapshot")?,
        apply_delta: instance.get_typed_func(&mut *store, "tv_apply_delta")?,
        set_certificates: instance.get_typed_func(&mut *store, "tv_set_certificates")?,
        configure: instance.get_typed_func(&mut *store, "tv_configure")?,
        search: instance.get_typed_func(&mut *store, "tv_search")?,
        result_ptr: instance.get_typed_func(&mut *store, "tv_result_ptr")?,
        result_len: instance.get_typed_func(&mut *store, "tv_result_len")?,
    })
}
