//! The WASM edge worker's host: the edge kernel (`tiervec-wasm`, a `wasm32-wasip1` guest built
//! from `tiervec-shared`) run by wasmtime, as a CDN edge worker runs tenant code.
//!
//! * **Engine** (`limits`): Cranelift at `OptLevel::Speed`, epoch interruption on, SIMD and relaxed SIMD
//!   (the guest's `i8` kernel) stated explicitly, nothing else beyond wasmtime's defaults
//!   (wasmtime is built without default features: no component model of its own, no built-in
//!   cache, no profiling).
//! * **Module cache** (`module_cache`): the guest is compiled once and its compiled form
//!   (`Module::serialize`) kept in a directory tiervec creates itself (mode 0700, owned by this
//!   user, refused otherwise). `Module::deserialize` trusts its input (it is machine code), so
//!   each compiled file has a checksum file beside it — xxh3-64 of the compiled bytes, their
//!   length, and the engine fingerprint (`Engine::precompile_compatibility_hash`); the bytes are
//!   read into memory, checked, and only then deserialised (no window between check and use).
//!   A mismatch is logged and the module recompiled and rewritten (atomically: temp, fsync,
//!   rename, fsync of the directory).
//! * **Instances** ([`WasmHost`], `pool`): a pool of long-lived instances, one per concurrent request.
//!   Each holds its own copy of the snapshot in its linear memory, written once when the
//!   instance is made (or the snapshot replaced), never per request; deltas reach each instance
//!   once, in order, from the host's journal before its next request. See "Memory strategy".
//! * **Limits** (`limits`): a deadline per call by epoch interruption (a ticker thread increments the
//!   engine's epoch every `tick`; cheaper than fuel, which instruments every basic block — the
//!   epoch check is one load and compare at function entries and loop headers); a cap on linear
//!   memory (a `ResourceLimiter` that also records a refused growth, so a guest that runs out is
//!   reported as [`WasmError::MemoryCap`]); WASI preview 1 with no capability: no preopened
//!   directory, no environment, no arguments, no sockets, stdin closed, stdout discarded,
//!   stderr captured in a small buffer (a guest panic's message).
//! * **Raw ABI calls** (`abi`): one method per guest export (`tiervec_shared::guest_abi`
//!   defines the bytes), each turning wasmtime's errors into [`WasmError`]s.
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

mod abi;
mod config;
mod error;
mod limits;
mod module_cache;
mod pool;

pub use config::WasmConfig;
pub use error::WasmError;
pub use module_cache::ModuleSource;
pub use pool::{GuestAnswer, WasmHost};
