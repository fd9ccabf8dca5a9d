//! The on-disk cache of the compiled guest: compiled once, kept in a private directory
//! (mode 0700, owned by this user) with a checksum file beside each compiled module, checked
//! before the bytes are deserialised (see the `wasm_host` module docs).

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use tiervec_shared::durable::write_atomic;
use tracing::{debug, debug_span, info, warn};
use wasmtime::{Engine, Module};
use xxhash_rust::xxh3::xxh3_64;

use super::error::{WasmError, runtime};

/// Version of the checksum file's format.
const CACHE_FORMAT: &str = "tiervec-module-cache 1";

/// Where a module came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModuleSource {
    /// Compiled from the `.wasm` now (and written to the cache).
    Compiled,
    /// Deserialised from the on-disk cache, its checksum verified.
    Cached,
}

/// A loaded module and how it was obtained.
pub(super) struct LoadedModule {
    pub(super) module: Module,
    pub(super) source: ModuleSource,
    /// Time to read, check and compile or deserialise.
    pub(super) took: Duration,
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
pub(super) fn load_module(
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
