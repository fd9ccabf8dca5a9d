//! What the engine choice and the device code both use: why the GPU does not serve, and a
//! collection's rows as the exact scan reads them.

use tiervec_shared::Metric;

use super::plan;

/// Why the GPU does not serve exact search.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("built without the gpu feature")]
    NotBuilt,
    #[error("disabled in configuration (gpu.enabled = false)")]
    Disabled,
    #[error("no CUDA driver (libcuda.so not found)")]
    NoDriver,
    #[error("no cuBLAS (libcublas.so not found)")]
    NoCublas,
    #[error("no NVRTC (libnvrtc.so not found)")]
    NoNvrtc,
    #[error("no CUDA device {ordinal} ({count} found)")]
    NoDevice { ordinal: usize, count: usize },
    #[error("CUDA driver error: {0}")]
    Driver(String),
    #[error("out of device memory: {0}")]
    OutOfMemory(String),
    #[error("cuBLAS error: {0}")]
    Blas(String),
    #[error("top-k kernel failed to compile: {0}")]
    Compile(String),
    #[error("device self-test failed: {0}")]
    SelfTest(String),
    #[error("CUDA libraries do not match the CUDA 13 bindings: {0}")]
    Incompatible(String),
    #[error(transparent)]
    Budget(#[from] plan::BudgetTooSmall),
}

/// A collection's rows as the exact scan sees them (all slots, dead ones included).
#[derive(Clone, Copy)]
pub struct HostRows<'a> {
    /// Slot-major rows, prepared for the metric.
    pub vectors: &'a [f32],
    pub live: &'a [bool],
    pub live_count: usize,
    /// Changes whenever a slot is tombstoned (the device's live mask is rebuilt then).
    pub tombstone_epoch: u64,
    pub dim: usize,
    pub metric: Metric,
}

impl HostRows<'_> {
    pub fn slots(&self) -> usize {
        self.live.len()
    }
}
