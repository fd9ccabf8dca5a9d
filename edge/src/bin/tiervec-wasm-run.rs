//! `tiervec-wasm-run MODULE [ARGS…]`: runs a `wasm32-wasip1` command module (a test harness)
//! on the workspace's own wasmtime, with the host's stdio, arguments and environment and no
//! filesystem or network. It is the `CARGO_TARGET_WASM32_WASIP1_RUNNER` of `.ci/run`, so that
//! `cargo test --target wasm32-wasip1 -p tiervec-wasm` runs the guest's tests without
//! `cargo install wasmtime-cli`. Exits with the module's exit status.

use std::process::ExitCode;

use tiervec_edge::wasm_prefetch::{self, GuestMemory};
use wasmtime::error::Context as _;
use wasmtime::{Config, Engine, Linker, Memory, Module, Store, bail, format_err};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::{I32Exit, WasiCtxBuilder};

fn main() -> wasmtime::Result<ExitCode> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(module_path) = args.first() else {
        bail!("usage: tiervec-wasm-run MODULE [ARGS...]");
    };
    // No epoch interruption here: a test harness runs to completion.
    let engine = Engine::new(&Config::new())?;
    let module = Module::from_file(&engine, module_path)
        .with_context(|| format!("cannot load {module_path}"))?;
    let mut linker: Linker<Harness> = Linker::new(&engine);
    wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |h: &mut Harness| &mut h.wasi)?;
    // The guest's kernels import the host's prefetch hints; the harness offers the same ones.
    wasm_prefetch::add_to_linker(&mut linker)?;
    let wasi = WasiCtxBuilder::new()
        .inherit_stdio()
        .inherit_env()
        .args(&args)
        .build_p1();
    let mut store = Store::new(&engine, Harness { wasi, memory: None });
    let instance = linker.instantiate(&mut store, &module)?;
    store.data_mut().memory = instance.get_memory(&mut store, "memory");
    let start = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
    match start.call(&mut store, ()) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => match e.downcast_ref::<I32Exit>() {
            Some(I32Exit(0)) => Ok(ExitCode::SUCCESS),
            Some(I32Exit(code)) => Ok(ExitCode::from(u8::try_from(*code).unwrap_or(1))),
            None => Err(format_err!("{module_path} trapped: {e:?}")),
        },
    }
}

/// The harness's store data: WASI and, for the prefetch imports, the module's memory.
struct Harness {
    wasi: WasiP1Ctx,
    memory: Option<Memory>,
}

impl GuestMemory for Harness {
    fn guest_memory(&self) -> Option<Memory> {
        self.memory
    }
}
