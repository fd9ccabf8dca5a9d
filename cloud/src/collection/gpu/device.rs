//! The CUDA side of exact search (feature `gpu`): the device (context, stream, cuBLAS handle,
//! the kernels of `topk.cu` compiled by NVRTC) and each collection's copy on it.
//!
//! One search, for each row chunk of the plan and each query chunk in it: upload the queries
//! (and `‖q‖²`), one GEMM `scores = rowsᵀ·queries` (column-major `rows × queries`, i.e. each
//! query's scores contiguous), one top-k launch over the score tile, the candidates back to the
//! host, merged there. All work goes through one stream and one cuBLAS handle, serialised by a
//! lock: a GPU runs one such pipeline at a time anyway.

use std::ffi::c_void;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::sys::{CUdevice_attribute, cudaError_enum};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, CudaView, DevicePtr, DevicePtrMut,
    DriverError, LaunchConfig, PushKernelArg,
};
use parking_lot::Mutex;
use tiervec_shared::hnsw::Neighbour;
use tiervec_shared::{Metric, kernels};

use super::common::{GpuError, HostRows};
use super::config::{GpuConfig, Precision};
use super::merge;
use super::plan::{self, Plan, SyncAction};

/// The kernels, compiled at start by NVRTC for the device's architecture.
const KERNELS: &str = include_str!("topk.cu");
/// Threads per top-k block: `THREADS` in `topk.cu` (the kernels' `__launch_bounds__`).
const TOPK_THREADS: u32 = 256;
/// Threads per block and most blocks of the grid-stride f32 → f16 conversion.
const CONVERT_THREADS: u32 = 256;
const CONVERT_MAX_BLOCKS: u32 = 4_096;

fn driver(e: DriverError) -> GpuError {
    if e.0 == cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY {
        GpuError::OutOfMemory(e.to_string())
    } else {
        GpuError::Driver(e.to_string())
    }
}

fn blas(e: cudarc::cublas::result::CublasError) -> GpuError {
    GpuError::Blas(e.to_string())
}

/// The metric's code in `topk.cu`.
fn metric_code(metric: Metric) -> i32 {
    match metric {
        Metric::Cosine => 0,
        Metric::L2 => 1,
        Metric::Dot => 2,
    }
}

/// What the device is, from its attributes.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub name: String,
    pub total_bytes: u64,
    pub multiprocessors: usize,
    pub compute_capability: (i32, i32),
    pub clock_khz: Option<i32>,
    /// Peak memory bandwidth: memory clock × bus width × 2 (double data rate), GB/s.
    pub memory_gbps: Option<f64>,
}

impl DeviceInfo {
    /// Peak FP32 TFLOP/s: SMs × FP32 lanes per SM (by architecture) × 2 × clock.
    fn fp32_tflops(&self) -> Option<f64> {
        let lanes = match self.compute_capability {
            (7, _) | (8, 0) => 64.0,
            (8, _) | (9, 0) | (10, _) | (12, _) => 128.0,
            _ => return None,
        };
        Some(self.multiprocessors as f64 * lanes * 2.0 * self.clock_khz? as f64 * 1e3 / 1e12)
    }

    /// Peak dense FP16 tensor-core TFLOP/s with FP32 accumulation, for the architectures whose
    /// per-SM rate is known here (A100: 1,024 FMA/clock/SM; H100/H200: 2,048).
    fn fp16_tflops(&self) -> Option<f64> {
        let fma = match self.compute_capability {
            (8, 0) => 1_024.0,
            (9, 0) => 2_048.0,
            _ => return None,
        };
        Some(self.multiprocessors as f64 * fma * 2.0 * self.clock_khz? as f64 * 1e3 / 1e12)
    }
}

/// The process's device.
pub struct Device {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// cuBLAS on `stream`.
    blas: CudaBlas,
    topk_32: CudaFunction,
    topk_128: CudaFunction,
    to_f16: CudaFunction,
    info: DeviceInfo,
    precision: Precision,
    /// Bytes all collections' resident copies and a search's buffers may take.
    budget: u64,
    /// Bytes held by resident copies now (each copy gives its share back when dropped).
    reserved: Arc<AtomicU64>,
    /// One pipeline at a time on the stream and the cuBLAS handle.
    lock: Mutex<()>,
}

impl Device {
    /// Opens device `config.device`: libraries present, context, cuBLAS, kernels compiled and
    /// loaded, memory budget, and a self-test against the CPU.
    pub fn open(config: &GpuConfig) -> Result<Device, GpuError> {
        // SAFETY: each call only tries to dlopen the library and drops the handle; no CUDA
        // function is called.
        unsafe {
            if !cudarc::driver::sys::is_culib_present() {
                return Err(GpuError::NoDriver);
            }
            if !cudarc::cublas::sys::is_culib_present() {
                return Err(GpuError::NoCublas);
            }
            if !cudarc::nvrtc::sys::is_culib_present() {
                return Err(GpuError::NoNvrtc);
            }
        }
        // cudarc resolves each symbol on first use and panics when the library lacks it (a
        // driver older than the CUDA 13 bindings); that must leave the CPU engine, not crash the
        // server. The self-test below calls every function a search uses.
        std::panic::catch_unwind(|| Device::open_checked(config)).unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "panic in the CUDA bindings".into());
            Err(GpuError::Incompatible(what))
        })
    }

    fn open_checked(config: &GpuConfig) -> Result<Device, GpuError> {
        let count = CudaContext::device_count().map_err(driver)?;
        if config.device >= count.max(0) as usize {
            return Err(GpuError::NoDevice {
                ordinal: config.device,
                count: count.max(0) as usize,
            });
        }
        let ctx = CudaContext::new(config.device).map_err(driver)?;
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone()).map_err(blas)?;
        let ptx = cudarc::nvrtc::compile_ptx_with_opts(
            KERNELS,
            cudarc::nvrtc::CompileOptions {
                name: Some("tiervec_topk.cu".into()),
                ..Default::default()
            },
        )
        .map_err(|e| GpuError::Compile(e.to_string()))?;
        let module = ctx.load_module(ptx).map_err(driver)?;
        let function = |name: &str| module.load_function(name).map_err(driver);
        let attribute = |a: CUdevice_attribute| ctx.attribute(a).ok();
        let memory_khz = attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE);
        let bus_bits = attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH);
        let (free, total) = ctx.mem_get_info().map_err(driver)?;
        let info = DeviceInfo {
            name: ctx.name().map_err(driver)?,
            total_bytes: total as u64,
            multiprocessors: attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
                .unwrap_or(1)
                .max(1) as usize,
            compute_capability: ctx.compute_capability().map_err(driver)?,
            clock_khz: attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_CLOCK_RATE),
            memory_gbps: memory_khz
                .zip(bus_bits)
                .map(|(khz, bits)| 2.0 * khz as f64 * 1e3 * bits as f64 / 8.0 / 1e9),
        };
        let budget = config
            .memory_budget_bytes
            .unwrap_or(free as u64 / 10 * 7)
            .min(free as u64);
        let device = Device {
            topk_32: function("topk_select_32")?,
            topk_128: function("topk_select_128")?,
            to_f16: function("f32_to_f16")?,
            ctx,
            stream,
            blas,
            info,
            precision: config.precision,
            budget,
            reserved: Arc::new(AtomicU64::new(0)),
            lock: Mutex::new(()),
        };
        device.self_test()?;
        Ok(device)
    }

    /// The description shown as the engine's reason.
    pub fn describe(&self) -> String {
        format!(
            "{} (sm_{}{}, {:.1} GiB), {}, budget {:.1} GiB",
            self.info.name,
            self.info.compute_capability.0,
            self.info.compute_capability.1,
            self.info.total_bytes as f64 / (1u64 << 30) as f64,
            self.precision.name(),
            self.budget as f64 / (1u64 << 30) as f64,
        )
    }

    /// (memory GB/s, FP32 TFLOP/s, FP16 tensor TFLOP/s), each when known.
    pub fn peaks(&self) -> (Option<f64>, Option<f64>, Option<f64>) {
        (
            self.info.memory_gbps,
            self.info.fp32_tflops(),
            self.info.fp16_tflops(),
        )
    }

    /// Searches 300 rows (one tombstoned) with every metric and both kernels, and compares with
    /// the CPU: a kernel that does not launch, or answers wrong, is found before serving.
    fn self_test(self: &Device) -> Result<(), GpuError> {
        const DIM: usize = 16;
        const ROWS: usize = 300;
        let mut vectors: Vec<f32> = (0..ROWS * DIM)
            .map(|i| ((i * 7919 % 997) as f32 / 997.0) - 0.5)
            .collect();
        vectors
            .chunks_exact_mut(DIM)
            .for_each(tiervec_shared::metric::normalise);
        let mut live = vec![true; ROWS];
        live[3] = false;
        let queries: Vec<f32> = vectors[DIM * 10..DIM * 12].to_vec();
        for metric in [Metric::Cosine, Metric::L2, Metric::Dot] {
            let host = HostRows {
                vectors: &vectors,
                live: &live,
                live_count: ROWS - 1,
                tombstone_epoch: 0,
                dim: DIM,
                metric,
            };
            for k in [5, 40] {
                let mut corpus = None;
                let found = self.search_with(&mut corpus, &host, &queries, k, 0.25)?;
                for (q, got) in queries.chunks_exact(DIM).zip(&found) {
                    let want = cpu_top(&host, q, k);
                    let tolerance = match self.precision {
                        Precision::F32 => 1e-4,
                        Precision::F16 => 1e-2,
                    };
                    let agree = got.len() == want.len()
                        && got
                            .iter()
                            .zip(&want)
                            .all(|(g, w)| (g.distance - w.distance).abs() <= tolerance);
                    if !agree {
                        return Err(GpuError::SelfTest(format!(
                            "{metric} k={k}: device {:?} vs cpu {:?}",
                            &got[..got.len().min(3)],
                            &want[..want.len().min(3)]
                        )));
                    }
                }
                // The copy's memory goes back before the next case.
                drop(corpus);
            }
        }
        Ok(())
    }

    /// The top-`k` slots of each query, through `corpus` (created or brought up to date here).
    pub fn search(
        &self,
        corpus: &mut Option<DeviceCorpus>,
        host: &HostRows,
        queries: &[f32],
        k: usize,
        config: &GpuConfig,
    ) -> Result<Vec<Vec<Neighbour>>, GpuError> {
        let _span = tracing::debug_span!(
            "gpu_exact",
            queries = queries.len() / host.dim.max(1),
            k,
            rows = host.live_count
        )
        .entered();
        self.search_with(corpus, host, queries, k, config.compact_dead_fraction)
    }

    fn search_with(
        &self,
        corpus: &mut Option<DeviceCorpus>,
        host: &HostRows,
        queries: &[f32],
        k: usize,
        compact_dead_fraction: f64,
    ) -> Result<Vec<Vec<Neighbour>>, GpuError> {
        let _guard = self.lock.lock();
        // cuBLAS and the launches use the context current on the calling thread.
        self.ctx.bind_to_thread().map_err(driver)?;
        let dim = host.dim;
        let batch = queries.len() / dim;
        let corpus = match corpus {
            Some(c) if c.dim == dim && c.metric == host.metric => c,
            slot => slot.insert(DeviceCorpus {
                dim,
                metric: host.metric,
                norms: Vec::new(),
                synced: 0,
                epoch: u64::MAX,
                resident: None,
            }),
        };
        corpus.extend_norms(host);
        let own = corpus.resident.as_ref().map_or(0, |r| r.reserved);
        let others = self.reserved.load(Ordering::Acquire).saturating_sub(own);
        let plan = plan::plan(
            self.budget.saturating_sub(others),
            host.live_count,
            dim,
            batch,
            k,
            self.precision,
        )?;
        let q_norms: Vec<f32> = queries
            .chunks_exact(dim)
            .map(|q| kernels::dot(q, q))
            .collect();
        let mut found: Vec<Vec<Neighbour>> = vec![Vec::new(); batch];
        if plan.resident {
            self.sync_resident(corpus, host, &plan, compact_dead_fraction)?;
            let r = corpus.resident.as_ref().expect("synced just now");
            for rows in plan::chunks(r.slot_of_row.len(), plan.row_chunk) {
                let tile = Tile {
                    rows: r.rows.view(rows.clone(), dim),
                    norms: r.norms.slice(rows.clone()),
                    live: r.live.slice(rows.clone()),
                    len: rows.len(),
                };
                self.search_tile(
                    &tile,
                    host.metric,
                    queries,
                    &q_norms,
                    k,
                    &plan,
                    &mut found,
                    |row| r.slot_of_row[rows.start + row],
                )?;
            }
        } else {
            // Over the budget: free a resident copy, stream the slots through.
            corpus.resident = None;
            for slots in plan::chunks(host.slots(), plan.row_chunk) {
                let upload = self.upload_chunk(host, &corpus.norms, slots.clone())?;
                let tile = Tile {
                    rows: upload.rows.view(0..slots.len(), dim),
                    norms: upload.norms.slice(..),
                    live: upload.live.slice(..),
                    len: slots.len(),
                };
                self.search_tile(
                    &tile,
                    host.metric,
                    queries,
                    &q_norms,
                    k,
                    &plan,
                    &mut found,
                    |row| (slots.start + row) as u32,
                )?;
            }
        }
        Ok(found.into_iter().map(|c| merge::merge(c, k)).collect())
    }

    /// Brings the resident copy up to date: append new live slots and refresh the mask, or
    /// rebuild from the live slots when full or when tombstones pass the fraction.
    fn sync_resident(
        &self,
        corpus: &mut DeviceCorpus,
        host: &HostRows,
        plan: &Plan,
        compact_dead_fraction: f64,
    ) -> Result<(), GpuError> {
        let dim = host.dim;
        let fresh: Vec<u32> = (corpus.synced..host.slots())
            .filter(|&s| host.live[s])
            .map(|s| s as u32)
            .collect();
        let action = match corpus.resident.as_mut() {
            None => SyncAction::RebuildGrown,
            Some(r) => {
                if corpus.epoch != host.tombstone_epoch {
                    r.dead = r
                        .slot_of_row
                        .iter()
                        .filter(|&&s| !host.live[s as usize])
                        .count();
                }
                plan::sync_action(
                    r.slot_of_row.len(),
                    r.dead,
                    r.capacity,
                    fresh.len(),
                    compact_dead_fraction,
                )
            }
        };
        match action {
            SyncAction::Append => {
                let r = corpus.resident.as_mut().expect("matched Some above");
                let at = r.slot_of_row.len();
                self.upload_rows(host, &corpus.norms, &fresh, r, at)?;
                r.slot_of_row.extend_from_slice(&fresh);
                if corpus.epoch != host.tombstone_epoch {
                    let mask: Vec<u8> = r
                        .slot_of_row
                        .iter()
                        .map(|&s| u8::from(host.live[s as usize]))
                        .collect();
                    self.stream
                        .memcpy_htod(&mask, &mut r.live.slice_mut(..mask.len()))
                        .map_err(driver)?;
                }
            }
            SyncAction::RebuildGrown | SyncAction::RebuildCompact => {
                tracing::debug!(
                    ?action,
                    live = host.live_count,
                    "rebuilding the device copy"
                );
                // The old copy's memory goes back before the new one is allocated.
                corpus.resident = None;
                let capacity = plan.capacity.max(host.live_count);
                let reserved = plan::resident_bytes(capacity, dim, self.precision);
                // SAFETY: `alloc` leaves memory unset; rows [0, live) are written by
                // `upload_rows` below, and kernels read only rows below `slot_of_row.len()`.
                let rows = unsafe {
                    match self.precision {
                        Precision::F32 => self.stream.alloc(capacity * dim).map(DeviceRows::F32),
                        Precision::F16 => self.stream.alloc(capacity * dim).map(DeviceRows::F16),
                    }
                };
                let mut r = Resident {
                    capacity,
                    slot_of_row: Vec::with_capacity(capacity),
                    dead: 0,
                    rows: rows.map_err(driver)?,
                    norms: self.stream.alloc_zeros(capacity).map_err(driver)?,
                    live: self.stream.alloc_zeros(capacity).map_err(driver)?,
                    reserved,
                    device_reserved: self.reserved.clone(),
                };
                self.reserved.fetch_add(reserved, Ordering::AcqRel);
                let live: Vec<u32> = (0..host.slots())
                    .filter(|&s| host.live[s])
                    .map(|s| s as u32)
                    .collect();
                self.upload_rows(host, &corpus.norms, &live, &mut r, 0)?;
                r.slot_of_row = live;
                corpus.resident = Some(r);
            }
        }
        corpus.synced = host.slots();
        corpus.epoch = host.tombstone_epoch;
        Ok(())
    }

    /// Copies the rows of `slots` (with their norms, marked live) into rows `at..` of `r`, in
    /// steps of `STAGING_ROWS` (an FP16 copy goes through an FP32 staging buffer).
    fn upload_rows(
        &self,
        host: &HostRows,
        norms: &[f32],
        slots: &[u32],
        r: &mut Resident,
        at: usize,
    ) -> Result<(), GpuError> {
        let dim = host.dim;
        let mut staging: Option<CudaSlice<f32>> = None;
        for (i, part) in slots.chunks(plan::STAGING_ROWS).enumerate() {
            let row0 = at + i * plan::STAGING_ROWS;
            let rows = row0..row0 + part.len();
            let mut gathered = Vec::with_capacity(part.len() * dim);
            for &s in part {
                let s = s as usize;
                gathered.extend_from_slice(&host.vectors[s * dim..(s + 1) * dim]);
            }
            match &mut r.rows {
                DeviceRows::F32(d) => self
                    .stream
                    .memcpy_htod(
                        &gathered,
                        &mut d.slice_mut(rows.start * dim..rows.end * dim),
                    )
                    .map_err(driver)?,
                DeviceRows::F16(d) => {
                    let buf = match &mut staging {
                        Some(b) => b,
                        None => staging.insert(
                            // SAFETY: every element read below is written by the copy first.
                            unsafe { self.stream.alloc(plan::STAGING_ROWS.min(slots.len()) * dim) }
                                .map_err(driver)?,
                        ),
                    };
                    self.stream
                        .memcpy_htod(&gathered, &mut buf.slice_mut(..gathered.len()))
                        .map_err(driver)?;
                    self.convert(&buf.slice(..gathered.len()), d, rows.start * dim)?;
                }
            }
            let part_norms: Vec<f32> = part.iter().map(|&s| norms[s as usize]).collect();
            self.stream
                .memcpy_htod(&part_norms, &mut r.norms.slice_mut(rows.clone()))
                .map_err(driver)?;
            self.stream
                .memcpy_htod(&vec![1u8; part.len()], &mut r.live.slice_mut(rows))
                .map_err(driver)?;
        }
        Ok(())
    }

    /// Uploads slots `slots` (all of them; dead ones masked) for one streamed row chunk.
    fn upload_chunk(
        &self,
        host: &HostRows,
        norms: &[f32],
        slots: Range<usize>,
    ) -> Result<Chunk, GpuError> {
        let dim = host.dim;
        let f32_rows = self
            .stream
            .clone_htod(&host.vectors[slots.start * dim..slots.end * dim])
            .map_err(driver)?;
        let rows = match self.precision {
            Precision::F32 => DeviceRows::F32(f32_rows),
            Precision::F16 => {
                // SAFETY: the conversion writes every element before anything reads it.
                let mut half =
                    unsafe { self.stream.alloc::<u16>(slots.len() * dim) }.map_err(driver)?;
                self.convert(&f32_rows.slice(..), &mut half, 0)?;
                DeviceRows::F16(half)
            }
        };
        let mask: Vec<u8> = host.live[slots.clone()]
            .iter()
            .map(|&l| u8::from(l))
            .collect();
        Ok(Chunk {
            rows,
            norms: self.stream.clone_htod(&norms[slots]).map_err(driver)?,
            live: self.stream.clone_htod(&mask).map_err(driver)?,
        })
    }

    /// `dst[at..at + src.len()] = f16(src)` on the device.
    fn convert(
        &self,
        src: &CudaView<f32>,
        dst: &mut CudaSlice<u16>,
        at: usize,
    ) -> Result<(), GpuError> {
        let n = src.len();
        let mut out = dst.slice_mut(at..at + n);
        let n64 = n as i64;
        let blocks = (n.div_ceil(CONVERT_THREADS as usize) as u32).clamp(1, CONVERT_MAX_BLOCKS);
        let mut launch = self.stream.launch_builder(&self.to_f16);
        launch.arg(src).arg(&mut out).arg(&n64);
        // SAFETY: `f32_to_f16(const float*, unsigned short*, long long)` takes exactly these
        // three arguments; `src` and `out` both hold `n` elements and the grid-stride loop stops
        // at `n`.
        unsafe {
            launch.launch(LaunchConfig {
                grid_dim: (blocks, 1, 1),
                block_dim: (CONVERT_THREADS, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .map_err(driver)?;
        Ok(())
    }

    /// One row chunk against every query chunk: GEMM, top-k, candidates into `found`.
    #[allow(clippy::too_many_arguments)]
    fn search_tile(
        &self,
        tile: &Tile,
        metric: Metric,
        queries: &[f32],
        q_norms: &[f32],
        k: usize,
        plan: &Plan,
        found: &mut [Vec<Neighbour>],
        slot_of: impl Fn(usize) -> u32,
    ) -> Result<(), GpuError> {
        let dim = tile.rows.dim();
        let batch = q_norms.len();
        let segments = plan::segments(
            plan.query_chunk.min(batch),
            tile.len,
            self.info.multiprocessors,
        );
        let out_len = plan.query_chunk.min(batch) * segments * k;
        let mut scores: CudaSlice<f32> =
            // SAFETY: the GEMM writes every score of the tile (beta = 0) before the kernel reads it.
            unsafe { self.stream.alloc(plan.query_chunk.min(batch) * tile.len) }.map_err(driver)?;
        // SAFETY: the kernel writes all `k` entries of every (query, segment) it is launched for,
        // and only that prefix is read back.
        let mut out_dist: CudaSlice<f32> = unsafe { self.stream.alloc(out_len) }.map_err(driver)?;
        let mut out_row: CudaSlice<i32> = unsafe { self.stream.alloc(out_len) }.map_err(driver)?;
        for qs in plan::chunks(batch, plan.query_chunk) {
            let n = qs.len();
            let q32 = self
                .stream
                .clone_htod(&queries[qs.start * dim..qs.end * dim])
                .map_err(driver)?;
            let qn = self
                .stream
                .clone_htod(&q_norms[qs.clone()])
                .map_err(driver)?;
            let mut tile_scores = scores.slice_mut(..n * tile.len);
            match &tile.rows {
                RowsView::F32(rows, _) => {
                    let cfg = GemmConfig {
                        transa: cublasOperation_t::CUBLAS_OP_T,
                        transb: cublasOperation_t::CUBLAS_OP_N,
                        m: tile.len as i32,
                        n: n as i32,
                        k: dim as i32,
                        alpha: 1.0f32,
                        lda: dim as i32,
                        ldb: dim as i32,
                        beta: 0.0f32,
                        ldc: tile.len as i32,
                    };
                    // SAFETY: A is the tile's rows, `tile.len × dim` row-major = column-major
                    // `dim × tile.len` (lda = dim), transposed to `tile.len × dim`; B is `n`
                    // queries, column-major `dim × n` (ldb = dim); C is `tile.len × n` (ldc =
                    // tile.len) in `tile_scores`, which holds exactly `n × tile.len` floats.
                    unsafe { self.blas.gemm(cfg, rows, &q32, &mut tile_scores) }.map_err(blas)?;
                }
                RowsView::F16(rows, _) => {
                    // SAFETY: the conversion writes all `n × dim` halves before the GEMM reads.
                    let mut q16 = unsafe { self.stream.alloc::<u16>(n * dim) }.map_err(driver)?;
                    self.convert(&q32.slice(..), &mut q16, 0)?;
                    self.gemm_f16(rows, &q16, &mut tile_scores, tile.len, n, dim)?;
                }
            }
            let ld = tile.len as i64;
            let rows_i = tile.len as i32;
            let seg_len = tile.len.div_ceil(segments) as i32;
            let metric = metric_code(metric);
            let k_i = k as i32;
            let function = if k <= plan::SMALL_K {
                &self.topk_32
            } else {
                &self.topk_128
            };
            let tile_scores = tile_scores.as_view();
            let mut launch = self.stream.launch_builder(function);
            launch
                .arg(&tile_scores)
                .arg(&ld)
                .arg(&rows_i)
                .arg(&seg_len)
                .arg(&tile.norms)
                .arg(&qn)
                .arg(&tile.live)
                .arg(&metric)
                .arg(&k_i)
                .arg(&mut out_dist)
                .arg(&mut out_row);
            // SAFETY: the arguments match `topk_select_{32,128}`'s parameters in type and
            // order. Grid (n, segments) × TOPK_THREADS threads, no dynamic shared memory:
            // block (q, s) reads scores[q * ld + r] for r < rows (the tile holds n × ld), norms
            // and live for r < rows (the tile's views hold `tile.len`), qn[q] for q < n, and
            // writes out[(q * segments + s) * k .. + k], inside `out_len` = query_chunk ×
            // segments × k since n ≤ query_chunk; k ≤ the kernel's KMAX (chosen above, and
            // `route` keeps k ≤ MAX_GPU_K).
            unsafe {
                launch.launch(LaunchConfig {
                    grid_dim: (n as u32, segments as u32, 1),
                    block_dim: (TOPK_THREADS, 1, 1),
                    shared_mem_bytes: 0,
                })
            }
            .map_err(driver)?;
            let used = n * segments * k;
            let dist = self
                .stream
                .clone_dtoh(&out_dist.slice(..used))
                .map_err(driver)?;
            let row = self
                .stream
                .clone_dtoh(&out_row.slice(..used))
                .map_err(driver)?;
            for (i, into) in found[qs].iter_mut().enumerate() {
                merge::collect(&dist, &row, i, segments, k, &slot_of, into);
                // Many row chunks: keep each query's candidate list short.
                if into.len() >= 8 * k {
                    *into = merge::merge(std::mem::take(into), k);
                }
            }
        }
        Ok(())
    }

    /// `scores = rowsᵀ·queries` with FP16 inputs and FP32 output and accumulation (GemmEx;
    /// cudarc's typed `Gemm<f16>` would write FP16 scores).
    fn gemm_f16(
        &self,
        rows: &CudaView<u16>,
        queries: &CudaSlice<u16>,
        scores: &mut cudarc::driver::CudaViewMut<f32>,
        m: usize,
        n: usize,
        dim: usize,
    ) -> Result<(), GpuError> {
        let alpha = 1.0f32;
        let beta = 0.0f32;
        let (a, _a) = rows.device_ptr(&self.stream);
        let (b, _b) = queries.device_ptr(&self.stream);
        let (c, _c) = scores.device_ptr_mut(&self.stream);
        // SAFETY: same shapes as the FP32 GEMM in `search_tile` (A `m × dim` rows, lda = dim,
        // transposed; B `dim × n`, ldb = dim; C `m × n`, ldc = m, which `scores` holds); the
        // element types named match the buffers (u16 holding IEEE halves, f32 scores); alpha
        // and beta are host f32 values, as the default pointer mode and COMPUTE_32F expect;
        // the guards `_a`, `_b`, `_c` keep the buffers' stream ordering until the call returns.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                m as i32,
                n as i32,
                dim as i32,
                (&alpha as *const f32).cast::<c_void>(),
                a as usize as *const c_void,
                cudaDataType::CUDA_R_16F,
                dim as i32,
                b as usize as *const c_void,
                cudaDataType::CUDA_R_16F,
                dim as i32,
                (&beta as *const f32).cast::<c_void>(),
                c as usize as *mut c_void,
                cudaDataType::CUDA_R_32F,
                m as i32,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(blas)
    }
}

/// The CPU's exact top-k over live slots (the self-test's reference).
fn cpu_top(host: &HostRows, q: &[f32], k: usize) -> Vec<Neighbour> {
    let all = host
        .vectors
        .chunks_exact(host.dim)
        .enumerate()
        .filter(|(s, _)| host.live[*s])
        .map(|(s, row)| Neighbour {
            id: s as u32,
            distance: host.metric.distance(q, row),
        })
        .collect();
    merge::merge(all, k)
}

/// Device rows, FP32 or FP16 (IEEE halves in `u16`: no `half` crate needed).
enum DeviceRows {
    F32(CudaSlice<f32>),
    F16(CudaSlice<u16>),
}

impl DeviceRows {
    fn view(&self, rows: Range<usize>, dim: usize) -> RowsView<'_> {
        let elems = rows.start * dim..rows.end * dim;
        match self {
            DeviceRows::F32(d) => RowsView::F32(d.slice(elems), dim),
            DeviceRows::F16(d) => RowsView::F16(d.slice(elems), dim),
        }
    }
}

enum RowsView<'a> {
    F32(CudaView<'a, f32>, usize),
    F16(CudaView<'a, u16>, usize),
}

impl RowsView<'_> {
    fn dim(&self) -> usize {
        match self {
            RowsView::F32(_, d) | RowsView::F16(_, d) => *d,
        }
    }
}

/// One row chunk as the GEMM and the kernel see it.
struct Tile<'a> {
    rows: RowsView<'a>,
    norms: CudaView<'a, f32>,
    live: CudaView<'a, u8>,
    len: usize,
}

/// A streamed row chunk's buffers.
struct Chunk {
    rows: DeviceRows,
    norms: CudaSlice<f32>,
    live: CudaSlice<u8>,
}

/// A collection's state on the device.
pub struct DeviceCorpus {
    dim: usize,
    metric: Metric,
    /// `‖x‖²` of every host slot seen so far (the l2 formula; streamed chunks upload slices).
    norms: Vec<f32>,
    /// Host slots below this are reflected in the copy.
    synced: usize,
    /// The host's tombstone epoch the live mask was built from.
    epoch: u64,
    /// The copy kept on the device, when it fits the budget.
    resident: Option<Resident>,
}

impl DeviceCorpus {
    fn extend_norms(&mut self, host: &HostRows) {
        let dim = host.dim;
        let from = self.norms.len();
        self.norms.extend(
            host.vectors[from * dim..host.slots() * dim]
                .chunks_exact(dim)
                .map(|x| kernels::dot(x, x)),
        );
    }
}

/// A resident copy: rows in order of `slot_of_row` (ascending slots, so ties break by slot as
/// on the CPU), with spare capacity for appends.
struct Resident {
    capacity: usize,
    slot_of_row: Vec<u32>,
    /// Rows whose slot is tombstoned (masked out; dropped at the next rebuild).
    dead: usize,
    rows: DeviceRows,
    norms: CudaSlice<f32>,
    live: CudaSlice<u8>,
    /// Bytes counted against the device budget while this copy exists.
    reserved: u64,
    device_reserved: Arc<AtomicU64>,
}

impl Drop for Resident {
    fn drop(&mut self) {
        self.device_reserved
            .fetch_sub(self.reserved, Ordering::AcqRel);
    }
}
