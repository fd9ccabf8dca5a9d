//! The raw calls of the guest ABI (the bytes are `tiervec_shared::guest_abi`'s): a guest
//! instantiated in a store of its own with its limits and a WASI context with no capability,
//! its ABI version checked, then one method per export, each turning wasmtime's errors into
//! [`WasmError`]s. The pool decides which instance calls what, and when.

use std::sync::Arc;
use std::time::Duration;

use tiervec_shared::confidence::ConfidenceRule;
use tiervec_shared::guest_abi::{self, SearchResponse, status};
use tiervec_shared::snapshot::BODY_ALIGN;
use tracing::debug_span;
use wasmtime::{Engine, Instance, InstancePre, Linker, Memory, Module, Store, Trap, TypedFunc};
use wasmtime_wasi::WasiCtxBuilder;
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::{MemoryOutputPipe, SinkOutputStream};

use super::config::WasmConfig;
use super::error::{WasmError, runtime};
use super::limits::{Limiter, advise_huge_pages, ticks};
use crate::wasm_prefetch::{self, GuestMemory};

/// Bytes of guest stderr kept (a panic message and its location).
const STDERR_CAPACITY: usize = 4096;
/// Alignment of the snapshot buffer in guest memory: the snapshot body's (the header is 128
/// bytes, so the body is aligned too).
const SNAPSHOT_ALIGN: u32 = BODY_ALIGN as u32;
/// Alignment of request buffers (the query's `f32`s).
const REQUEST_ALIGN: u32 = 8;

/// What each store holds besides the instance.
pub(super) struct GuestState {
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

/// Links `module` with what a guest may import: WASI preview 1 and the prefetch hints.
pub(super) fn prepare(
    engine: &Engine,
    module: &Module,
    config: &WasmConfig,
) -> Result<InstancePre<GuestState>, WasmError> {
    let mut linker: Linker<GuestState> = Linker::new(engine);
    wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |s: &mut GuestState| &mut s.wasi)
        .map_err(runtime)?;
    wasm_prefetch::add_to_linker(&mut linker).map_err(runtime)?;
    linker
        .instantiate_pre(module)
        .map_err(|e| WasmError::ModuleInvalid {
            path: config.module.clone(),
            message: format!("{e:#}"),
        })
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

/// One instance and how far it has followed the host's journal.
pub(super) struct GuestInstance {
    store: Store<GuestState>,
    instance: Instance,
    exports: Exports,
    config: Arc<WasmConfig>,
    /// The journal generation (snapshot) it holds.
    pub(super) generation: u64,
    /// Deltas of that generation it has applied.
    pub(super) applied: usize,
    /// The rule generation it was configured with.
    pub(super) rule_generation: u64,
    /// A reusable request buffer in guest memory: address and capacity.
    request: (u32, u32),
}

/// Turns a wasmtime error from a guest call into a typed error.
fn classify(
    store: &mut Store<GuestState>,
    config: &WasmConfig,
    e: wasmtime::Error,
    deadline: Duration,
) -> WasmError {
    if let Some(wanted) = store.data_mut().limiter.take_refused() {
        return WasmError::MemoryCap {
            limit: config.memory_limit,
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

impl GuestInstance {
    /// Instantiates the module in a fresh store with the limits and an empty WASI context.
    pub(super) fn new(
        engine: &Engine,
        pre: &InstancePre<GuestState>,
        config: &Arc<WasmConfig>,
    ) -> Result<GuestInstance, WasmError> {
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
            engine,
            GuestState {
                wasi,
                limiter: Limiter::new(config.memory_limit),
                stderr,
                memory: None,
            },
        );
        store.limiter(|s| &mut s.limiter);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(ticks(config.maintenance_deadline, config.tick));
        let instance = pre
            .instantiate(&mut store)
            .map_err(|e| classify(&mut store, config, e, config.maintenance_deadline))?;
        let version: TypedFunc<(), u32> = instance
            .get_typed_func(&mut store, "tv_abi_version")
            .map_err(|e| WasmError::ModuleInvalid {
                path: config.module.clone(),
                message: format!("{e:#}"),
            })?;
        let abi = version
            .call(&mut store, ())
            .map_err(|e| classify(&mut store, config, e, config.maintenance_deadline))?;
        if abi != guest_abi::ABI_VERSION {
            return Err(WasmError::ModuleInvalid {
                path: config.module.clone(),
                message: format!(
                    "guest ABI version {abi}, this host speaks {}",
                    guest_abi::ABI_VERSION
                ),
            });
        }
        // After the version check: a guest of another ABI may lack this one's exports.
        let exports = exports(&instance, &mut store).map_err(|e| WasmError::ModuleInvalid {
            path: config.module.clone(),
            message: format!("{e:#}"),
        })?;
        store.data_mut().memory = Some(exports.memory);
        if config.huge_pages {
            advise_huge_pages(&exports.memory, &store, config.memory_limit);
        }
        Ok(GuestInstance {
            store,
            instance,
            exports,
            config: config.clone(),
            generation: 0,
            applied: 0,
            rule_generation: u64::MAX,
            request: (0, 0),
        })
    }

    /// Bytes of linear memory the instance holds now.
    pub(super) fn memory_size(&self) -> usize {
        self.exports.memory.data_size(&self.store)
    }

    /// Allocates `len` bytes aligned to `align` in the guest.
    fn alloc(&mut self, len: usize, align: u32) -> Result<u32, WasmError> {
        let len32 = u32::try_from(len).map_err(|_| WasmError::MemoryCap {
            limit: self.config.memory_limit,
            wanted: len,
        })?;
        let GuestInstance {
            store,
            exports,
            config,
            ..
        } = self;
        let ptr = exports
            .alloc
            .call(&mut *store, (len32, align))
            .map_err(|e| classify(store, config, e, config.maintenance_deadline))?;
        if ptr == 0 {
            return Err(WasmError::MemoryCap {
                limit: config.memory_limit,
                wanted: store
                    .data_mut()
                    .limiter
                    .take_refused()
                    .unwrap_or(exports.memory.data_size(&*store) + len),
            });
        }
        Ok(ptr)
    }

    /// The status of a call; on a refusal, the guest's message.
    fn status(&mut self, code: i32) -> Result<(), WasmError> {
        if code == status::OK {
            return Ok(());
        }
        let message = String::from_utf8_lossy(self.result()?).into_owned();
        Err(WasmError::Guest { code, message })
    }

    /// The guest's result buffer, borrowed from its memory.
    fn result(&mut self) -> Result<&[u8], WasmError> {
        let GuestInstance {
            store,
            exports,
            config,
            ..
        } = self;
        let deadline = config.deadline;
        let ptr = exports
            .result_ptr
            .call(&mut *store, ())
            .map_err(|e| classify(store, config, e, deadline))?;
        let len = exports
            .result_len
            .call(&mut *store, ())
            .map_err(|e| classify(store, config, e, deadline))?;
        exports
            .memory
            .data(&*store)
            .get(ptr as usize..ptr as usize + len as usize)
            .ok_or_else(|| WasmError::Trap {
                message: format!("guest result {ptr:#x}+{len} lies outside its memory"),
            })
    }

    /// Hands the guest a whole snapshot file (`tv_load_snapshot`), which it validates.
    pub(super) fn load_snapshot(&mut self, bytes: &[u8]) -> Result<(), WasmError> {
        let deadline = self.config.maintenance_deadline;
        self.store
            .set_epoch_deadline(ticks(deadline, self.config.tick));
        let ptr = self.alloc(bytes.len(), SNAPSHOT_ALIGN)?;
        let GuestInstance {
            store,
            exports,
            config,
            ..
        } = self;
        exports
            .memory
            .write(&mut *store, ptr as usize, bytes)
            .map_err(|e| WasmError::Runtime(e.to_string()))?;
        // The guest owns the buffer from here, refused or not.
        let code = exports
            .load_snapshot
            .call(&mut *store, (ptr, bytes.len() as u32))
            .map_err(|e| classify(store, config, e, deadline))?;
        self.status(code)
    }

    /// Applies a delta's bytes (`tv_apply_delta`), taking its certificates if
    /// `accept_certificates`.
    pub(super) fn apply_delta(
        &mut self,
        bytes: &[u8],
        accept_certificates: bool,
    ) -> Result<(), WasmError> {
        let accept = u32::from(accept_certificates);
        self.maintenance_call(bytes, |exports, store, (ptr, len)| {
            exports.apply_delta.call(store, (ptr, len, accept))
        })
    }

    /// Makes the encoded certificates the ones in force (`tv_set_certificates`).
    pub(super) fn set_certificates(&mut self, bytes: &[u8]) -> Result<(), WasmError> {
        self.maintenance_call(bytes, |exports, store, args| {
            exports.set_certificates.call(store, args)
        })
    }

    /// Calls an export that takes `bytes` (copied into the request buffer) within the
    /// maintenance deadline.
    fn maintenance_call(
        &mut self,
        bytes: &[u8],
        call: impl FnOnce(&Exports, &mut Store<GuestState>, (u32, u32)) -> wasmtime::Result<i32>,
    ) -> Result<(), WasmError> {
        let deadline = self.config.maintenance_deadline;
        self.store
            .set_epoch_deadline(ticks(deadline, self.config.tick));
        let ptr = self.write_request(bytes)?;
        let GuestInstance {
            store,
            exports,
            config,
            ..
        } = self;
        let code = call(exports, store, (ptr, bytes.len() as u32))
            .map_err(|e| classify(store, config, e, deadline))?;
        self.status(code)
    }

    /// Sets the confidence rule the guest decides with (`tv_configure`).
    pub(super) fn configure(&mut self, rule: ConfidenceRule) -> Result<(), WasmError> {
        let GuestInstance {
            store,
            exports,
            config,
            ..
        } = self;
        let deadline = config.maintenance_deadline;
        store.set_epoch_deadline(ticks(deadline, config.tick));
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
            .map_err(|e| classify(store, config, e, deadline))?;
        self.status(code)
    }

    /// Copies `bytes` into the instance's reusable request buffer (grown when too small).
    fn write_request(&mut self, bytes: &[u8]) -> Result<u32, WasmError> {
        let (mut ptr, cap) = self.request;
        // An empty input still needs a real address: the guest refuses null.
        if (cap as usize) < bytes.len().max(1) {
            let want = bytes.len().next_power_of_two().max(4096);
            let new = self.alloc(want, REQUEST_ALIGN)?;
            // The old buffer is simply left to the guest's allocator: freeing it would need
            // another call per growth, and growth happens a handful of times per instance.
            ptr = new;
            self.request = (new, want as u32);
        }
        let GuestInstance { store, exports, .. } = self;
        exports
            .memory
            .write(&mut *store, ptr as usize, bytes)
            .map_err(|e| WasmError::Runtime(e.to_string()))?;
        Ok(ptr)
    }

    /// Searches (`tv_search`) within `deadline`.
    pub(super) fn search(
        &mut self,
        query: &[f32],
        k: usize,
        ef: usize,
        deadline: Duration,
    ) -> Result<SearchResponse, WasmError> {
        let mut request = Vec::new();
        guest_abi::encode_request(
            u32::try_from(k).unwrap_or(u32::MAX),
            u32::try_from(ef).unwrap_or(u32::MAX),
            query,
            &mut request,
        )
        .map_err(|e| WasmError::Runtime(e.to_string()))?;
        let ptr = self.write_request(&request)?;
        let GuestInstance {
            store,
            exports,
            config,
            ..
        } = self;
        store.set_epoch_deadline(ticks(deadline, config.tick));
        let code = exports
            .search
            .call(&mut *store, (ptr, request.len() as u32))
            .map_err(|e| classify(store, config, e, deadline))?;
        self.status(code)?;
        guest_abi::decode_response(self.result()?).map_err(|e| WasmError::Trap {
            message: format!("guest answered with a malformed response: {e}"),
        })
    }

    /// Calls `tv_test_spin` (only guests built with the `test-exports` feature have it) for
    /// `iterations` rounds within `deadline`.
    pub(super) fn spin(&mut self, iterations: u64, deadline: Duration) -> Result<u64, WasmError> {
        let GuestInstance {
            store,
            instance,
            config,
            ..
        } = self;
        let spin: TypedFunc<u64, u64> = instance
            .get_typed_func(&mut *store, "tv_test_spin")
            .map_err(|e| WasmError::ModuleInvalid {
                path: config.module.clone(),
                message: format!("{e:#} (build the guest with `--features test-exports`)"),
            })?;
        store.set_epoch_deadline(ticks(deadline, config.tick));
        spin.call(&mut *store, iterations)
            .map_err(|e| classify(store, config, e, deadline))
    }
}
