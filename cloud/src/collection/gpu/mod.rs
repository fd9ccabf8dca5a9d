//! Exact search on a GPU (cargo feature `gpu`), with the CPU's SIMD scan always behind it.
//!
//! With the feature, [`ExactEngine::probe`] opens the CUDA driver, cuBLAS and NVRTC at run time
//! (cudarc's dynamic loading: nothing CUDA is needed to build), compiles the top-k kernel
//! (`gpu/topk.cu`) and runs a self-test. Anything that fails — no driver, no device, out of
//! memory, a kernel that does not compile or launch — leaves a CPU engine with the reason,
//! logged once and shown by `GET /v1/collections/{name}` and the `tiervec_exact_engine` gauge.
//!
//! On the device, a collection's rows are copied once and kept up to date lazily (appends and a
//! live mask for tombstones; a rebuild past `compact_dead_fraction`); a batch of queries is one
//! GEMM against the rows, and a kernel selects each query's top-k from the scores. Copies that
//! do not fit the memory budget are streamed through in chunks whose top-k's are merged on the
//! host ([`plan`], [`merge`]). Everything that is not a CUDA call — planning, merging, the engine
//! choice and the per-request routing — is a plain function tested without a GPU.
//!
//! Distances agree with [`tiervec_shared::Metric::distance`] within the tolerance documented in
//! `docs/gpu.md` (a different summation order in FP32; FP16 rows are coarser).

mod common;
mod config;
pub mod merge;
pub mod plan;

#[cfg(feature = "gpu")]
mod device;

use std::sync::Arc;

use parking_lot::Mutex;
use tiervec_shared::hnsw::Neighbour;

pub use common::{GpuError, HostRows};
pub use config::{GpuConfig, Precision};

/// Which engine serves a collection's exact scans.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineKind {
    Gpu,
    Cpu,
}

impl EngineKind {
    /// The label used in `/metrics` and descriptions.
    pub const fn name(self) -> &'static str {
        match self {
            EngineKind::Gpu => "gpu",
            EngineKind::Cpu => "cpu",
        }
    }
}

/// The engine in effect and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineStatus {
    pub kind: EngineKind,
    /// On the GPU: the device and precision; on the CPU: why not the GPU.
    pub reason: String,
}

impl std::fmt::Display for EngineStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind.name(), self.reason)
    }
}

/// The engine choice, from the probe's outcome: the device's description, or why there is none.
/// Only this decides, so the fallback rule is tested without a GPU.
pub fn choose(outcome: Result<String, &GpuError>) -> EngineStatus {
    match outcome {
        Ok(device) => EngineStatus {
            kind: EngineKind::Gpu,
            reason: device,
        },
        Err(e) => EngineStatus {
            kind: EngineKind::Cpu,
            reason: e.to_string(),
        },
    }
}

/// Whether one exact request (`batch` queries of top-`k` over `live_rows` points) goes to the
/// device; `Err` names why the CPU takes it.
pub fn route(
    config: &GpuConfig,
    k: usize,
    live_rows: usize,
    batch: usize,
) -> Result<(), &'static str> {
    if k > plan::MAX_GPU_K {
        Err("k above the device top-k limit")
    } else if live_rows < config.min_rows {
        Err("fewer live points than gpu.min_rows")
    } else if batch < config.min_batch {
        Err("fewer queries than gpu.min_batch")
    } else {
        Ok(())
    }
}

/// The process's exact-search engine: the device (when usable) and the configuration.
pub struct ExactEngine {
    status: EngineStatus,
    config: GpuConfig,
    #[cfg(feature = "gpu")]
    device: Option<Arc<device::Device>>,
}

impl ExactEngine {
    /// Opens the device `config` names; a CPU engine (with the reason) when it cannot be used.
    pub fn probe(config: &GpuConfig) -> ExactEngine {
        let _span = tracing::info_span!("exact_engine_probe", device = config.device).entered();
        #[cfg(feature = "gpu")]
        {
            let opened = if config.enabled {
                device::Device::open(config).map(Arc::new)
            } else {
                Err(GpuError::Disabled)
            };
            let status = choose(opened.as_ref().map(|d| d.describe()));
            ExactEngine {
                status,
                config: config.clone(),
                device: opened.ok(),
            }
        }
        #[cfg(not(feature = "gpu"))]
        ExactEngine::cpu(config, &GpuError::NotBuilt)
    }

    /// A CPU engine for `why`.
    pub fn cpu(config: &GpuConfig, why: &GpuError) -> ExactEngine {
        ExactEngine {
            status: choose(Err(why)),
            config: config.clone(),
            #[cfg(feature = "gpu")]
            device: None,
        }
    }

    /// [`ExactEngine::probe`], with the outcome logged: what a server does once at start.
    pub fn start(config: &GpuConfig) -> Arc<ExactEngine> {
        let engine = Arc::new(ExactEngine::probe(config));
        let status = engine.status();
        match status.kind {
            EngineKind::Gpu => tracing::info!(engine = %status, "exact search on the GPU"),
            // Built without the feature or switched off: the CPU is what was asked for.
            EngineKind::Cpu if !cfg!(feature = "gpu") || !config.enabled => {
                tracing::info!(engine = %status, "exact search on the CPU")
            }
            EngineKind::Cpu => {
                tracing::warn!(engine = %status, "GPU unusable, exact search falls back to the CPU")
            }
        }
        engine
    }

    /// Sets the `tiervec_exact_engine` gauge for this engine (after the metrics recorder is
    /// installed: a gauge set before it would be lost).
    pub fn publish_gauge(&self) {
        let status = self.status();
        metrics::gauge!("tiervec_exact_engine", "engine" => status.kind.name(), "reason" => status.reason.clone())
            .set(1.0);
    }

    pub fn status(&self) -> &EngineStatus {
        &self.status
    }

    pub fn config(&self) -> &GpuConfig {
        &self.config
    }

    /// Peak figures of the device, for the benchmark's roofline: (memory GB/s, FP32 TFLOP/s,
    /// FP16 tensor TFLOP/s), each when known.
    pub fn device_peaks(&self) -> Option<(Option<f64>, Option<f64>, Option<f64>)> {
        #[cfg(feature = "gpu")]
        return self.device.as_ref().map(|d| d.peaks());
        #[cfg(not(feature = "gpu"))]
        None
    }
}

/// One collection's side of the engine: its device copy, and whether the device failed it.
pub struct ExactScan {
    engine: Arc<ExactEngine>,
    /// Why this collection's device path failed at run time (it is then served by the CPU until
    /// restart; the device copy is freed).
    failed: Mutex<Option<String>>,
    #[cfg(feature = "gpu")]
    corpus: Mutex<Option<device::DeviceCorpus>>,
}

impl ExactScan {
    pub fn new(engine: Arc<ExactEngine>) -> ExactScan {
        ExactScan {
            engine,
            failed: Mutex::new(None),
            #[cfg(feature = "gpu")]
            corpus: Mutex::new(None),
        }
    }

    /// The engine serving this collection's exact scans, and why.
    pub fn status(&self) -> EngineStatus {
        match &*self.failed.lock() {
            Some(why) => EngineStatus {
                kind: EngineKind::Cpu,
                reason: format!("the GPU failed for this collection: {why}"),
            },
            None => self.engine.status().clone(),
        }
    }

    /// The top-`k` slots of each query (`queries`: rows of `host.dim`, prepared for the metric)
    /// from the device; `None` when the CPU must answer (routed there, or the device failed: the
    /// failure is logged once and the collection stays on the CPU).
    pub fn search(
        &self,
        host: &HostRows,
        queries: &[f32],
        k: usize,
    ) -> Option<Vec<Vec<Neighbour>>> {
        #[cfg(feature = "gpu")]
        {
            let device = self.engine.device.as_ref()?;
            let batch = queries.len() / host.dim.max(1);
            if self.failed.lock().is_some()
                || route(&self.engine.config, k, host.live_count, batch).is_err()
            {
                return None;
            }
            let mut corpus = self.corpus.lock();
            match device.search(&mut corpus, host, queries, k, &self.engine.config) {
                Ok(found) => {
                    metrics::counter!("tiervec_exact_queries_total", "engine" => "gpu")
                        .increment(batch as u64);
                    Some(found)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "GPU exact search failed; this collection is searched on the CPU from now on");
                    metrics::counter!("tiervec_exact_engine_failures_total").increment(1);
                    // Frees the device copy.
                    *corpus = None;
                    *self.failed.lock() = Some(e.to_string());
                    None
                }
            }
        }
        #[cfg(not(feature = "gpu"))]
        {
            // Nothing but the CPU without the feature.
            let _ = (host, queries, k);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_fallback_engine_choice_names_the_reason() {
        let gpu = choose(Ok("NVIDIA H100, FP32".into()));
        assert_eq!(gpu.kind, EngineKind::Gpu);
        assert_eq!(gpu.to_string(), "gpu: NVIDIA H100, FP32");
        for (error, text) in [
            (GpuError::NotBuilt, "cpu: built without the gpu feature"),
            (
                GpuError::NoDriver,
                "cpu: no CUDA driver (libcuda.so not found)",
            ),
            (
                GpuError::NoDevice {
                    ordinal: 1,
                    count: 1,
                },
                "cpu: no CUDA device 1 (1 found)",
            ),
            (
                GpuError::OutOfMemory("allocating 1 GiB".into()),
                "cpu: out of device memory: allocating 1 GiB",
            ),
            (
                GpuError::Compile("syntax error".into()),
                "cpu: top-k kernel failed to compile: syntax error",
            ),
        ] {
            let status = choose(Err(&error));
            assert_eq!(status.kind, EngineKind::Cpu);
            assert_eq!(status.to_string(), text);
        }
    }

    #[test]
    fn gpu_fallback_routes_large_k_small_collections_and_small_batches_to_the_cpu() {
        let config = GpuConfig {
            min_rows: 1_000,
            min_batch: 4,
            ..GpuConfig::default()
        };
        assert_eq!(route(&config, 10, 50_000, 64), Ok(()));
        assert_eq!(route(&config, plan::MAX_GPU_K, 50_000, 64), Ok(()));
        assert!(route(&config, plan::MAX_GPU_K + 1, 50_000, 64).is_err());
        assert!(route(&config, 10, 999, 64).is_err());
        assert!(route(&config, 10, 50_000, 3).is_err());
    }

    #[cfg(not(feature = "gpu"))]
    #[test]
    fn gpu_fallback_without_the_feature_is_a_cpu_engine_that_never_answers() {
        let engine = Arc::new(ExactEngine::probe(&GpuConfig::default()));
        assert_eq!(
            engine.status().to_string(),
            "cpu: built without the gpu feature"
        );
        assert!(engine.device_peaks().is_none());
        let scan = ExactScan::new(engine);
        let vectors = vec![1.0f32; 8 * 20_000];
        let live = vec![true; 20_000];
        let host = HostRows {
            vectors: &vectors,
            live: &live,
            live_count: 20_000,
            tombstone_epoch: 0,
            dim: 8,
            metric: tiervec_shared::Metric::Dot,
        };
        assert!(scan.search(&host, &[1.0; 8], 10).is_none());
    }

    #[test]
    fn gpu_fallback_when_disabled_in_configuration() {
        let config = GpuConfig {
            enabled: false,
            ..GpuConfig::default()
        };
        let engine = ExactEngine::probe(&config);
        assert_eq!(engine.status().kind, EngineKind::Cpu);
        // Without the feature the build is the first reason; with it, the configuration.
        let expected = if cfg!(feature = "gpu") {
            "disabled in configuration (gpu.enabled = false)"
        } else {
            "built without the gpu feature"
        };
        assert_eq!(engine.status().reason, expected);
    }
}
