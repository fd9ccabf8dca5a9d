//! The machine a run is on: the `machine` object of every bench's JSON.

use serde::Serialize;

/// The `machine` object of every bench's JSON.
#[derive(Debug, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub build_profile: &'static str,
    pub kernel: &'static str,
}

impl Machine {
    pub fn detect() -> Machine {
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split(':').nth(1))
                    .map(|m| m.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        Machine {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model,
            build_profile: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
            kernel: tiervec_shared::kernels::active(),
        }
    }
}
