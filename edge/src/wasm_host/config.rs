//! [`WasmConfig`]: how the host runs its guest, with written-down defaults.

use std::path::PathBuf;
use std::time::Duration;

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
    /// Ask Linux to back guest memory with transparent huge pages (`limits::advise_huge_pages`).
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
