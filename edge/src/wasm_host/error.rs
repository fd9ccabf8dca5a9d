//! [`WasmError`]: why the host could not load, run or hear from its guest.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;
use tiervec_shared::guest_abi::status;

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

pub(super) fn runtime(e: wasmtime::Error) -> WasmError {
    WasmError::Runtime(format!("{e:#}"))
}
