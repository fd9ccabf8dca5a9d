//! `[gpu]` of the configuration: exact search on a CUDA device. It lives with the engine it
//! configures, so the collection layer needs nothing from the top-level configuration.

use serde::{Deserialize, Serialize};

/// The element type of the corpus copy on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// FP32 rows and FP32 GEMM: distances agree with the CPU to float rounding.
    F32,
    /// FP16 rows (half the memory and bandwidth), FP32 accumulation: distances agree with the
    /// CPU to about 1e-3 for unit vectors, so near-ties may order differently.
    F16,
}

impl Precision {
    /// Bytes of one stored element.
    pub const fn bytes(self) -> usize {
        match self {
            Precision::F32 => 4,
            Precision::F16 => 2,
        }
    }

    /// The name reported in descriptions and benchmarks.
    pub const fn name(self) -> &'static str {
        match self {
            Precision::F32 => "FP32",
            Precision::F16 => "FP16",
        }
    }
}

/// `[gpu]`: exact search on a CUDA device. Ignored (exact search stays on the CPU) when the
/// binary was built without the `gpu` feature.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GpuConfig {
    /// Use the GPU when one is usable; false keeps exact search on the CPU.
    pub enabled: bool,
    /// CUDA device ordinal.
    pub device: usize,
    /// Device memory the corpus copies and scratch buffers may take, across all collections;
    /// none = 70 % of the memory free at start (the rest is left to cuBLAS's workspace, the
    /// top-k kernel's local memory and other processes). A collection whose copy does not fit
    /// is streamed through the device in chunks.
    pub memory_budget_bytes: Option<u64>,
    /// Element type of the device copy.
    pub precision: Precision,
    /// Collections with fewer live points are scanned on the CPU: below this, a kernel launch
    /// and the copies cost more than the scan.
    pub min_rows: usize,
    /// Exact requests with fewer queries than this are scanned on the CPU.
    pub min_batch: usize,
    /// Rebuild a collection's device copy from its live points once this fraction of the
    /// copy's rows are tombstones.
    pub compact_dead_fraction: f64,
}

impl Default for GpuConfig {
    fn default() -> Self {
        GpuConfig {
            enabled: true,
            device: 0,
            memory_budget_bytes: None,
            precision: Precision::F32,
            min_rows: 16_384,
            min_batch: 1,
            compact_dead_fraction: 0.25,
        }
    }
}
