//! The edge node's query path: search the local cache (snapshot + pushed overlay); if the
//! answer is not confident (`tiervec_shared::confidence`: k-th distance and nearest anchor),
//! ask the cloud over the QUIC link within a deadline; if the
//! cloud cannot answer in time or the link is down, return the local answer marked `Degraded`
//! — never an error for the application.
//!
//! The link is kept by a background task. When a connection is lost, the next connection is
//! made as soon as a query needs the cloud (that query rides in the first flight, 0-RTT when a
//! ticket is at hand) or after the first backoff interval, whichever comes first; after a
//! failed attempt the task waits the whole backoff (doubling up to a cap) so that an outage
//! does not turn every query into a connection attempt. Every wait is jittered (drawn from the
//! upper half of its interval, `tiervec_shared::backoff`), so edges that lost the cloud together
//! (a cloud restart) do not reconnect in lockstep.
//!
//! An edge cut off from the cloud for longer than its lease marks local answers `stale`: the
//! cloud may have deleted or changed what it holds and could not say so. The mark goes once a
//! connection is up again (its handshake resyncs the cache).
//!
//! Shadow queries: every `shadow_every`-th local answer is also asked of the cloud in the
//! background (flagged, so it never counts toward hotness); the overlap of the two top-k is a
//! sample of local recall, exported as a live estimate, and, when a recall target is set, fed
//! to a `ThresholdTuner` that adjusts the confidence thresholds.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use parking_lot::Mutex;
use tiervec_shared::backoff::Backoff;
use tiervec_shared::confidence::{ConfidenceRule, ThresholdTuner};
use tiervec_shared::local::LocalHit;
use tiervec_shared::protocol::frame::{Answer, ErrorCode, Query, WireCollection};
use tiervec_shared::protocol::session::QueryFailure;
use tokio::sync::{mpsc, oneshot};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::cache::EdgeCache;
use crate::index::EdgeError;
use crate::link::{CloudLink, Connector, LinkConfig, LinkError, PushTarget};
use crate::searcher::{LocalDecision, LocalSearcher};
use crate::wasm_engine::WasmEngine;

/// Where an answer came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Local,
    Cloud,
    /// Local, because the cloud could not answer in time or was unreachable.
    Degraded,
}

impl Source {
    pub const fn name(self) -> &'static str {
        match self {
            Source::Local => "local",
            Source::Cloud => "cloud",
            Source::Degraded => "degraded",
        }
    }
}

/// Knobs of the query path.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Collection the snapshot caches (the name the cloud knows).
    pub collection: String,
    /// When a local answer is confident (see `docs/distances.md`).
    pub rule: ConfidenceRule,
    /// Cut off from the cloud longer than this, local answers are marked stale.
    pub lease: Duration,
    /// How long to wait for the cloud.
    pub deadline: Duration,
    /// `ef` asked of the cloud.
    pub cloud_ef: u32,
    /// Reconnection backoff: first wait and cap.
    pub backoff: (Duration, Duration),
    /// Every this many-th local answer is also asked of the cloud (0: never).
    pub shadow_every: u64,
    /// When set, the thresholds are tuned from shadow queries toward this local recall.
    pub target_recall: Option<f64>,
    /// Ask the cloud for certificates with its anchors (cosine and L2 collections).
    pub certify: bool,
}

/// The rule in force and what shadow queries have learnt, shared with their background tasks.
struct Learned {
    rule: Mutex<ConfidenceRule>,
    tuner: Mutex<Option<ThresholdTuner>>,
    /// Exponentially weighted mean of shadow recall samples.
    recall: Mutex<Option<f64>>,
    local_answers: std::sync::atomic::AtomicU64,
}

impl Learned {
    fn record(&self, sample: f64) {
        metrics::counter!("tiervec_edge_shadow_queries_total").increment(1);
        let estimate = {
            let mut recall = self.recall.lock();
            let next = recall.map_or(sample, |r| 0.95 * r + 0.05 * sample);
            *recall = Some(next);
            next
        };
        metrics::gauge!("tiervec_edge_shadow_recall").set(estimate);
        let mut tuner = self.tuner.lock();
        if let Some(tuner) = tuner.as_mut() {
            let mut rule = self.rule.lock();
            if tuner.record(sample, &mut rule) {
                debug!(?rule, "confidence thresholds tuned from shadow queries");
                for (name, value) in [
                    ("kth_distance", rule.max_kth_distance),
                    ("anchor_distance", rule.max_anchor_distance),
                ] {
                    if let Some(v) = value {
                        metrics::gauge!("tiervec_edge_threshold", "rule" => name).set(f64::from(v));
                    }
                }
            }
        }
    }
}

/// The local search's k-th distance and nearest-anchor distance.
type Signals = (Option<f32>, Option<f32>);

/// What the query path settled on: hits, their source, the local signals, and whether the
/// (local) hits are certified.
type Settled = (Vec<LocalHit>, Source, Signals, bool);

/// A query waiting for the next connection, to ride in its first flight.
struct Pending {
    query: Query,
    reply: oneshot::Sender<Result<Answer, QueryFailure>>,
}

/// An answer of the node.
#[derive(Clone, Debug)]
pub struct NodeAnswer {
    /// Nearest first; payloads (JSON texts) on local hits, and on the cloud's when asked.
    pub hits: Vec<LocalHit>,
    pub source: Source,
    /// A local answer given while the lease is over (cut off from the cloud too long).
    pub stale: bool,
    /// The confidence signals of the local search: its k-th distance (if it found k hits)
    /// and the distance to the nearest anchor (if the cache holds any).
    pub kth_distance: Option<f32>,
    pub anchor_distance: Option<f32>,
    /// A certificate proves this local answer is the corpus's exact top-k.
    pub certified: bool,
}

/// The link and the task that keeps it.
struct Uplink {
    connector: Arc<Connector>,
    current: Arc<ArcSwapOption<CloudLink>>,
    /// Since when the link has been down (`None` while it is up).
    down_since: Arc<Mutex<Option<Instant>>>,
    /// Capacity one: at most one query waits for a connection; others answer degraded.
    pending: mpsc::Sender<Pending>,
    keeper: tokio::task::JoinHandle<()>,
}

impl Drop for Uplink {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

/// An edge: its cache, what searches it, and its (possibly absent) link to the cloud.
pub struct EdgeNode {
    cache: Arc<EdgeCache>,
    /// The cache itself, or guests holding it (`serve --engine wasm`).
    searcher: Arc<dyn LocalSearcher>,
    config: NodeConfig,
    uplink: Option<Uplink>,
    learned: Arc<Learned>,
}

impl EdgeNode {
    /// Starts the node; with a link configuration, connects in the background (letting the
    /// cloud push into the cache) and keeps reconnecting whenever the connection is lost. Must
    /// run inside a tokio runtime.
    pub fn start(
        cache: Arc<EdgeCache>,
        config: NodeConfig,
        link: Option<LinkConfig>,
    ) -> Result<EdgeNode, LinkError> {
        metrics::gauge!("tiervec_edge_link_up").set(0.0);
        let uplink = match link {
            Some(link_config) => {
                let target = PushTarget {
                    cache: cache.clone(),
                    collection: config.collection.clone(),
                    certify: config.certify,
                };
                let connector = Arc::new(Connector::with_push(link_config, target)?);
                let current = Arc::new(ArcSwapOption::empty());
                let down_since = Arc::new(Mutex::new(Some(Instant::now())));
                let (pending, waiting) = mpsc::channel(1);
                let keeper = tokio::spawn(keep_connected(
                    connector.clone(),
                    current.clone(),
                    down_since.clone(),
                    waiting,
                    config.backoff,
                ));
                Some(Uplink {
                    connector,
                    current,
                    down_since,
                    pending,
                    keeper,
                })
            }
            None => None,
        };
        let learned = Arc::new(Learned {
            rule: Mutex::new(config.rule),
            tuner: Mutex::new(config.target_recall.map(ThresholdTuner::new)),
            recall: Mutex::new(None),
            local_answers: std::sync::atomic::AtomicU64::new(0),
        });
        Ok(EdgeNode {
            searcher: cache.clone(),
            cache,
            config,
            uplink,
            learned,
        })
    }

    /// Answers local searches with `engine`'s guests, kept in step with the cache from now on.
    pub fn with_wasm(mut self, engine: Arc<WasmEngine>) -> EdgeNode {
        self.searcher = engine.serve(&self.cache);
        self
    }

    /// The local answer and whether the rule in force says to serve it.
    fn local(&self, query: &[f32], k: usize, ef: usize) -> Result<LocalDecision, EdgeError> {
        self.searcher.local_answer(query, k, ef, self.rule())
    }

    /// Whether the link to the cloud is up.
    pub fn connected(&self) -> bool {
        self.uplink
            .as_ref()
            .and_then(|u| u.current.load_full())
            .is_some_and(|l| !l.is_closed())
    }

    pub fn cache(&self) -> &Arc<EdgeCache> {
        &self.cache
    }

    /// The confidence rule in force (tuned when a recall target is set).
    pub fn rule(&self) -> ConfidenceRule {
        *self.learned.rule.lock()
    }

    /// The live estimate of local recall from shadow queries, once there is one.
    pub fn shadow_recall(&self) -> Option<f64> {
        *self.learned.recall.lock()
    }

    /// Asks the cloud the same question in the background and records how much of the local
    /// top-k it confirms.
    fn shadow(&self, query: &[f32], k: usize, local: &[LocalHit]) {
        let Some(link) = self
            .uplink
            .as_ref()
            .and_then(|u| u.current.load_full())
            .filter(|l| !l.is_closed())
        else {
            return;
        };
        let Some(collection) = link.collection(&self.config.collection) else {
            return;
        };
        let mut q = self.wire_query(collection, query, k, false, &tracing::Span::current());
        q.shadow = true;
        let local: Vec<u64> = local.iter().map(|h| h.id).collect();
        let (learned, deadline) = (self.learned.clone(), self.config.deadline);
        tokio::spawn(
            async move {
                if let Ok(answer) = link.query(q, deadline).await {
                    let confirmed = answer.hits.iter().filter(|h| local.contains(&h.id)).count();
                    learned.record(confirmed as f64 / answer.hits.len().max(1) as f64);
                }
            }
            .instrument(info_span!("edge_shadow_query")),
        );
    }

    /// The collection as the cloud last announced it (its identity, dimension and embedding
    /// model), if a link ever connected.
    pub fn cloud_collection(&self) -> Option<WireCollection> {
        self.uplink
            .as_ref()?
            .connector
            .known_collection(&self.config.collection)
    }

    /// Whether the lease is over: the link has been down longer than the lease (an edge with
    /// no link configured has no lease to lose).
    pub fn stale(&self) -> bool {
        self.uplink.as_ref().is_some_and(|u| {
            u.down_since
                .lock()
                .is_some_and(|since| since.elapsed() > self.config.lease)
        })
    }

    /// Whether the link to the cloud is up now: only then can certificates be trusted, since
    /// the cloud shrinks them over this connection as the corpus changes.
    fn link_up(&self) -> bool {
        self.uplink
            .as_ref()
            .is_some_and(|u| u.down_since.lock().is_none())
    }

    /// Answers a search: certified or confident local answers locally, else the cloud's, else
    /// local marked degraded. Hits from the cloud come without payloads (see
    /// [`search_with`](Self::search_with)).
    pub async fn search(
        &self,
        query: &[f32],
        k: usize,
        ef: usize,
    ) -> Result<NodeAnswer, EdgeError> {
        self.search_with(query, k, ef, false).await
    }

    /// [`search`](Self::search), asking the cloud for its hits' payloads too when
    /// `with_payload` (local hits always carry theirs): every hit then has the payload its
    /// point holds, wherever it was answered.
    pub async fn search_with(
        &self,
        query: &[f32],
        k: usize,
        ef: usize,
        with_payload: bool,
    ) -> Result<NodeAnswer, EdgeError> {
        let started = Instant::now();
        let span = info_span!("edge_query", k, ef, source = tracing::field::Empty);
        let (hits, source, signals, certified) = self
            .answer(query, k, ef, with_payload, &span)
            .instrument(span.clone())
            .await?;
        span.record("source", source.name());
        if certified {
            metrics::counter!("tiervec_edge_certified_answers_total").increment(1);
        }
        metrics::counter!("tiervec_edge_queries_total", "source" => source.name()).increment(1);
        metrics::histogram!("tiervec_edge_query_seconds", "source" => source.name())
            .record(started.elapsed().as_secs_f64());
        let stale = source != Source::Cloud && self.stale();
        if stale {
            metrics::counter!("tiervec_edge_stale_answers_total").increment(1);
        }
        Ok(NodeAnswer {
            hits,
            source,
            stale,
            kth_distance: signals.0,
            anchor_distance: signals.1,
            certified,
        })
    }

    /// The cache's answer whatever its confidence (never asks the cloud): for applications that
    /// prefer speed, and for measuring the cache itself.
    pub fn search_local(
        &self,
        query: &[f32],
        k: usize,
        ef: usize,
    ) -> Result<NodeAnswer, EdgeError> {
        let _span = info_span!("edge_query_local", k, ef).entered();
        let answer = self.local(query, k, ef)?.answer;
        let kth_distance = (answer.hits.len() >= k).then(|| answer.hits[k - 1].distance);
        Ok(NodeAnswer {
            stale: self.stale(),
            kth_distance,
            anchor_distance: answer.nearest_anchor,
            certified: answer.certified && self.link_up(),
            hits: answer.hits,
            source: Source::Local,
        })
    }

    async fn answer(
        &self,
        query: &[f32],
        k: usize,
        ef: usize,
        with_payload: bool,
        span: &tracing::Span,
    ) -> Result<Settled, EdgeError> {
        let LocalDecision { answer, confident } = self.local(query, k, ef)?;
        let certified = answer.certified && self.link_up();
        let local = answer.hits;
        let distances: Vec<f32> = local.iter().map(|h| h.distance).collect();
        let signals = (
            (distances.len() >= k).then(|| distances[k - 1]),
            answer.nearest_anchor,
        );
        if certified || confident {
            if let Some(first_use) = answer.anchor_first_use {
                first_use.record();
            }
            let n = self.learned.local_answers.fetch_add(1, Ordering::Relaxed);
            if self.config.shadow_every > 0 && n.is_multiple_of(self.config.shadow_every) {
                self.shadow(query, k, &local);
            }
            return Ok((local, Source::Local, signals, certified));
        }
        let Some(uplink) = &self.uplink else {
            return Ok((local, Source::Degraded, signals, false));
        };
        let asked = Instant::now();
        let outcome = self.ask_cloud(uplink, query, k, with_payload, span).await;
        metrics::histogram!("tiervec_edge_fallback_seconds").record(asked.elapsed().as_secs_f64());
        match outcome {
            Ok(answer) => {
                let mut payloads = answer.payloads.into_iter();
                Ok((
                    answer
                        .hits
                        .iter()
                        .map(|h| LocalHit {
                            id: h.id,
                            distance: h.distance,
                            lsn: h.lsn,
                            payload: payloads.next().flatten(),
                        })
                        .collect(),
                    Source::Cloud,
                    signals,
                    false,
                ))
            }
            // Answering locally would hide the request's own mistake (payloads too large for
            // an answer), which the cloud would refuse again.
            Err(QueryFailure::Refused {
                code: ErrorCode::AnswerTooLarge,
                message,
            }) => Err(EdgeError::AnswerTooLarge(message)),
            Err(reason) => {
                let label = match &reason {
                    QueryFailure::Timeout => "timeout",
                    QueryFailure::NotReady => "not_connected",
                    QueryFailure::Disconnected => "disconnected",
                    QueryFailure::Refused { code, .. } => code.label(),
                };
                metrics::counter!("tiervec_edge_fallback_failures_total", "reason" => label)
                    .increment(1);
                debug!(
                    ?reason,
                    "cloud did not answer; answering locally (degraded)"
                );
                Ok((local, Source::Degraded, signals, false))
            }
        }
    }

    fn wire_query(
        &self,
        collection: &WireCollection,
        query: &[f32],
        k: usize,
        with_payload: bool,
        span: &tracing::Span,
    ) -> Query {
        Query {
            query_id: 0,
            collection: collection.name.clone(),
            collection_id: collection.id,
            vector: query.to_vec(),
            k: k as u32,
            ef: self.config.cloud_ef.max(k as u32),
            span_id: span.id().map_or(0, |id| id.into_u64()),
            shadow: false,
            with_payload,
        }
    }

    /// The cloud's answer within the deadline: over the open link, or in the first flight of
    /// the next connection.
    async fn ask_cloud(
        &self,
        uplink: &Uplink,
        query: &[f32],
        k: usize,
        with_payload: bool,
        span: &tracing::Span,
    ) -> Result<Answer, QueryFailure> {
        let deadline = self.config.deadline;
        let not_allowed = || QueryFailure::Refused {
            code: ErrorCode::NotAllowed,
            message: format!(
                "the cloud does not offer collection `{}` to this edge",
                self.config.collection
            ),
        };
        if let Some(link) = uplink.current.load_full().filter(|l| !l.is_closed()) {
            let collection = link
                .collection(&self.config.collection)
                .ok_or_else(not_allowed)?;
            let q = self.wire_query(collection, query, k, with_payload, span);
            return link.query(q, deadline).await;
        }
        let collection = uplink
            .connector
            .known_collection(&self.config.collection)
            .ok_or(QueryFailure::NotReady)?;
        let (reply, answer) = oneshot::channel();
        let pending = Pending {
            query: self.wire_query(&collection, query, k, with_payload, span),
            reply,
        };
        uplink
            .pending
            .try_send(pending)
            .map_err(|_| QueryFailure::NotReady)?;
        match tokio::time::timeout(deadline, answer).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => Err(QueryFailure::Disconnected),
            Err(_) => Err(QueryFailure::Timeout),
        }
    }
}

/// The next query still waited for, if any (those whose caller gave up are dropped).
fn live(pending: Option<Pending>, waiting: &mut mpsc::Receiver<Pending>) -> Option<Pending> {
    let mut next = pending;
    loop {
        match next {
            Some(p) if !p.reply.is_closed() => return Some(p),
            _ => next = Some(waiting.try_recv().ok()?),
        }
    }
}

/// A uniform draw in [0, 1] for backoff jitter, independent between edges and between calls
/// (std's per-instance random hash keys; no RNG state to keep).
fn jitter() -> f64 {
    (crate::deltas::random_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// Connects, and reconnects after every loss (see the module docs for when).
async fn keep_connected(
    connector: Arc<Connector>,
    current: Arc<ArcSwapOption<CloudLink>>,
    down_since: Arc<Mutex<Option<Instant>>>,
    mut waiting: mpsc::Receiver<Pending>,
    backoff: (Duration, Duration),
) {
    let mut backoff = Backoff::new(backoff.0, backoff.1);
    let mut wait = Duration::ZERO;
    let mut failed = false;
    loop {
        let first = if failed {
            tokio::time::sleep(wait).await;
            live(None, &mut waiting)
        } else {
            tokio::select! {
                p = waiting.recv() => match p {
                    Some(p) => live(Some(p), &mut waiting),
                    None => return,
                },
                () = tokio::time::sleep(wait) => live(None, &mut waiting),
            }
        };
        let (query, reply) = match first {
            Some(p) => (Some(p.query), Some(p.reply)),
            None => (None, None),
        };
        match connector.connect(query).await {
            Ok(connected) => {
                info!(
                    handshake = connected.handshake.label(),
                    cloud = %connector.target(),
                    "connected to the cloud"
                );
                if let (Some(reply), Some(answer)) = (reply, connected.first_answer) {
                    let _ = reply.send(answer);
                }
                let link = Arc::new(connected.link);
                current.store(Some(link.clone()));
                *down_since.lock() = None;
                metrics::gauge!("tiervec_edge_link_up").set(1.0);
                failed = false;
                backoff.reset();
                wait = backoff.next_wait(jitter());
                let reason = link.closed().await;
                current.store(None);
                *down_since.lock() = Some(Instant::now());
                metrics::gauge!("tiervec_edge_link_up").set(0.0);
                warn!(%reason, cloud = %connector.target(), "link to the cloud lost; reconnecting");
                connector.fail_over();
            }
            Err(e) => {
                debug!(error = %e, cloud = %connector.target(), "cannot connect to the cloud yet");
                connector.fail_over();
                if let Some(reply) = reply {
                    let _ = reply.send(Err(QueryFailure::Disconnected));
                }
                wait = backoff.next_wait(jitter());
                failed = true;
            }
        }
    }
}
