//! The WASM engine of `tiervec-edge serve --engine wasm`: the node's local searches are
//! answered by guests (`wasm_host::WasmHost`) that hold the same cache as the native one —
//! the snapshot file's bytes and every delta, handed over as the `EdgeCache` changes
//! ([`CacheFollower`]) — and decide confidence with the node's rule, in the guest. The node
//! keeps the link, the pushes, the delta log and compaction; only searching moves into WASM:
//! [`WasmEngine::serve`] is the node's [`LocalSearcher`].
//!
//! Certificates follow the native cache's (taken with a delta of the current connection,
//! dropped when a connection starts, handed over whole after a compaction), so a guest
//! certifies exactly when the native cache would; the node serves a certified answer only
//! while its link is up, as for native searches.
//!
//! When a guest cannot answer — past its deadline, out of memory, trapped, or out of step
//! with the cache after a refused snapshot or delta — the search counts as not confident and
//! the node asks the cloud (or answers degraded), as for any unconfident local answer.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;
use tiervec_shared::confidence::ConfidenceRule;
use tiervec_shared::guest_abi::status;
use tiervec_shared::push::Delta;
use tracing::{error, info, warn};

use crate::cache::{CacheFollower, EdgeCache};
use crate::index::EdgeError;
use crate::searcher::{LocalAnswer, LocalDecision, LocalSearcher};
use crate::wasm_host::{WasmConfig, WasmError, WasmHost};

/// Guests answering a node's local searches.
pub struct WasmEngine {
    host: WasmHost,
    /// Whether the guests hold exactly the cache (false after a refused snapshot or delta,
    /// until the cache is handed over whole again).
    in_step: AtomicBool,
    /// The rule last given to the guests.
    rule: Mutex<Option<ConfidenceRule>>,
}

impl WasmEngine {
    /// Starts the host (the module from its on-disk cache when possible).
    pub fn start(config: WasmConfig) -> Result<Arc<WasmEngine>, WasmError> {
        let host = WasmHost::start(config)?;
        let (source, took) = host.module_source();
        info!(?source, seconds = took.as_secs_f64(), "wasm engine ready");
        Ok(Arc::new(WasmEngine {
            host,
            in_step: AtomicBool::new(false),
            rule: Mutex::new(None),
        }))
    }

    /// The follower that keeps the guests' cache in step with `EdgeCache::follow`.
    pub fn follower(self: &Arc<Self>) -> Box<dyn CacheFollower> {
        Box::new(GuestFollower(self.clone()))
    }

    /// The node's local searcher for `cache`: the guests, kept in step with `cache` from now
    /// on, with `cache` checking the requests they could not answer.
    pub fn serve(self: &Arc<Self>, cache: &Arc<EdgeCache>) -> Arc<dyn LocalSearcher> {
        cache.follow(self.follower());
        Arc::new(GuestSearcher {
            engine: self.clone(),
            cache: cache.clone(),
        })
    }

    /// Searches in a guest, deciding confidence with `rule` there.
    pub fn search(
        &self,
        query: &[f32],
        k: usize,
        ef: usize,
        rule: ConfidenceRule,
    ) -> Result<LocalDecision, WasmError> {
        if !self.in_step.load(Ordering::Acquire) {
            return Err(WasmError::Runtime(
                "the guests are out of step with the cache (a refused snapshot or delta)".into(),
            ));
        }
        {
            let mut configured = self.rule.lock();
            if *configured != Some(rule) {
                self.host.configure(rule);
                *configured = Some(rule);
            }
        }
        let answer = self.host.search(query, k, ef)?;
        Ok(LocalDecision {
            confident: answer.local,
            answer: LocalAnswer {
                hits: answer.hits,
                nearest_anchor: answer.nearest_anchor.map(|(_, d)| d),
                certified: answer.certified,
                anchor_first_use: None,
            },
        })
    }

    fn out_of_step(&self, what: &str, e: &WasmError) {
        self.in_step.store(false, Ordering::Release);
        metrics::counter!("tiervec_edge_wasm_out_of_step_total").increment(1);
        error!(error = %e, what, "the guests refused the cache; local searches go to the cloud until the next compaction or reset hands the cache over again");
    }
}

/// The guests as a node's local searcher, with the cache they follow.
struct GuestSearcher {
    engine: Arc<WasmEngine>,
    cache: Arc<EdgeCache>,
}

impl LocalSearcher for GuestSearcher {
    /// A guest that cannot answer counts as not confident, so the cloud is asked.
    fn local_answer(
        &self,
        query: &[f32],
        k: usize,
        ef: usize,
        rule: ConfidenceRule,
    ) -> Result<LocalDecision, EdgeError> {
        match self.engine.search(query, k, ef, rule) {
            Ok(decided) => Ok(decided),
            Err(e) if e.guest_code() == Some(status::INVALID_QUERY) => {
                Err(EdgeError::GuestQuery(e.to_string()))
            }
            Err(e) => {
                // Bad input is the caller's error, not a guest failure.
                self.cache.validate(query, k, ef)?;
                let reason = match &e {
                    WasmError::DeadlineExceeded { .. } => "deadline",
                    WasmError::MemoryCap { .. } => "memory_cap",
                    WasmError::Trap { .. } => "trap",
                    _ => "other",
                };
                metrics::counter!("tiervec_edge_wasm_failures_total", "reason" => reason)
                    .increment(1);
                warn!(error = %e, "the guest could not answer; asking the cloud");
                Ok(LocalDecision::default())
            }
        }
    }
}

/// Hands every change of the `EdgeCache` to the guests.
struct GuestFollower(Arc<WasmEngine>);

impl CacheFollower for GuestFollower {
    fn replaced(&self, snapshot: Option<&[u8]>, deltas: &[Delta], certificates: &[(u64, f32)]) {
        let host = &self.0.host;
        let loaded = match snapshot {
            Some(bytes) => host.load_snapshot(bytes),
            None => {
                host.clear();
                Ok(())
            }
        };
        let outcome = loaded
            .and_then(|()| {
                deltas
                    .iter()
                    .try_for_each(|delta| host.apply_delta(delta, false))
            })
            .and_then(|()| host.set_certificates(certificates));
        match outcome {
            Ok(()) => self.0.in_step.store(true, Ordering::Release),
            Err(e) => self.0.out_of_step("snapshot", &e),
        }
    }

    fn applied(&self, delta: &Delta, accept_certificates: bool) {
        if self.0.in_step.load(Ordering::Acquire)
            && let Err(e) = self.0.host.apply_delta(delta, accept_certificates)
        {
            self.0.out_of_step("delta", &e);
        }
    }

    fn certificates_dropped(&self) {
        if self.0.in_step.load(Ordering::Acquire)
            && let Err(e) = self.0.host.set_certificates(&[])
        {
            self.0.out_of_step("certificates", &e);
        }
    }
}
