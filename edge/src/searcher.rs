//! [`LocalSearcher`]: what answers the node's local searches — the native cache
//! (`cache::EdgeCache`) or guests (`wasm_engine::WasmEngine::serve`) — and the answer it gives.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use tiervec_shared::confidence::ConfidenceRule;
use tiervec_shared::local::LocalHit;

use crate::index::EdgeError;

/// Answers an edge's local searches and decides, with the node's rule, whether an answer may
/// be served locally. Implemented by the native cache and by the WASM engine's guests, which
/// hold the same cache and so answer alike.
pub trait LocalSearcher: Send + Sync {
    /// The local answer to `query` and whether `rule` says to serve it. A searcher that
    /// cannot answer (a guest past its deadline) gives an empty answer that is not confident,
    /// so the cloud is asked; a bad request is an error.
    fn local_answer(
        &self,
        query: &[f32],
        k: usize,
        ef: usize,
        rule: ConfidenceRule,
    ) -> Result<LocalDecision, EdgeError>;
}

/// A local answer: the merged top-k (or a certified exact top-k) and the nearest anchor.
#[derive(Clone, Debug, Default)]
pub struct LocalAnswer {
    pub hits: Vec<LocalHit>,
    /// Distance to the nearest anchor, if any is held.
    pub nearest_anchor: Option<f32>,
    /// A certificate proves `hits` are the corpus's exact top-k (as of the last applied delta).
    pub certified: bool,
    /// The nearest anchor, if it came from the overlay and no local answer has used it yet.
    pub anchor_first_use: Option<AnchorFirstUse>,
}

/// A local answer with the confidence rule's decision.
#[derive(Clone, Debug, Default)]
pub struct LocalDecision {
    pub answer: LocalAnswer,
    /// The rule says answer locally.
    pub confident: bool,
}

/// A pushed anchor that has not yet served a local answer.
#[derive(Clone, Debug)]
pub struct AnchorFirstUse {
    applied: Instant,
    used: Arc<AtomicBool>,
}

impl AnchorFirstUse {
    /// An anchor whose delta was applied at `applied`.
    pub(crate) fn new(applied: Instant) -> AnchorFirstUse {
        AnchorFirstUse {
            applied,
            used: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Whether a local answer has used the anchor already.
    pub(crate) fn is_used(&self) -> bool {
        self.used.load(Ordering::Relaxed)
    }

    /// Records the time from the anchor's delta being applied to this, its first local answer
    /// (once per anchor, however many answers race here).
    pub fn record(&self) {
        if !self.used.swap(true, Ordering::Relaxed) {
            metrics::histogram!("tiervec_edge_anchor_first_use_seconds")
                .record(self.applied.elapsed().as_secs_f64());
        }
    }
}
