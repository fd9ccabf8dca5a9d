//! The edge's local HTTP/JSON endpoint for its applications: the cloud's
//! `POST /v1/collections/{name}/search` request and response shapes, plus `source` (`local`,
//! `cloud` or `degraded`), `stale` (a local answer while the edge's lease is over) and
//! `certified` (a local answer a certificate proves to be the corpus's exact top-k).

use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tracing::Instrument;

use metrics_exporter_prometheus::{BuildError, PrometheusHandle};

use crate::index::EdgeError;
use crate::node::EdgeNode;

/// `POST /v1/collections/{name}/search`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchRequest {
    /// The query vector; or send `text` (an edge started with `model_dir`).
    #[serde(default)]
    pub vector: Option<Vec<f32>>,
    /// The query as text, embedded here (`query::MAX_TEXT_CHARS` characters at most).
    #[serde(default)]
    pub text: Option<String>,
    pub k: usize,
    pub ef: Option<usize>,
    #[serde(default)]
    pub with_payload: bool,
    /// Answer from the cache whatever its confidence, never asking the cloud.
    #[serde(default)]
    pub local_only: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SearchHit {
    pub id: u64,
    pub distance: f32,
    pub lsn: u64,
    /// The point's payload (any JSON value), with `with_payload`, wherever the hit was
    /// answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<Box<RawValue>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SearchResponse {
    pub hits: Vec<SearchHit>,
    pub took_us: u64,
    /// `local`, `cloud` or `degraded`.
    pub source: String,
    /// Answered locally while cut off from the cloud for longer than the lease.
    pub stale: bool,
    pub certified: bool,
    /// The local search's k-th distance and distance to the nearest anchor (the signals of
    /// the confidence rule), when it had them.
    pub kth_distance: Option<f32>,
    pub anchor_distance: Option<f32>,
    /// Microseconds spent embedding the query's `text` (absent for a vector query).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embed_us: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
}

struct ApiError(StatusCode, &'static str, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.0,
            Json(ErrorBody {
                code: self.1.into(),
                message: self.2,
            }),
        )
            .into_response()
    }
}

/// Shared state: the node, its default `ef`, the metrics to render at `/metrics`, and the
/// embedding model of texts sent in place of vectors (feature `embed`).
#[derive(Clone)]
pub struct EdgeState {
    pub node: Arc<EdgeNode>,
    pub default_ef: usize,
    pub collection: String,
    pub metrics: PrometheusHandle,
    #[cfg(feature = "embed")]
    embedder: Option<Arc<tiervec_embed::Embedder>>,
}

impl EdgeState {
    /// The state of an edge that takes vectors only.
    pub fn new(
        node: Arc<EdgeNode>,
        default_ef: usize,
        collection: String,
        metrics: PrometheusHandle,
    ) -> EdgeState {
        EdgeState {
            node,
            default_ef,
            collection,
            metrics,
            #[cfg(feature = "embed")]
            embedder: None,
        }
    }

    /// Takes texts too, embedded by `embedder`.
    #[cfg(feature = "embed")]
    pub fn with_embedder(self, embedder: Arc<tiervec_embed::Embedder>) -> EdgeState {
        EdgeState {
            embedder: Some(embedder),
            ..self
        }
    }
}

/// The vector of `req`: its `vector`, or its `text` embedded on a blocking thread (with the
/// time that took).
async fn query_vector(
    state: &EdgeState,
    req: &mut SearchRequest,
) -> Result<(Vec<f32>, Option<u64>), ApiError> {
    match (req.vector.take(), req.text.take()) {
        (Some(vector), None) => Ok((vector, None)),
        (None, Some(text)) => embed(state, text).await.map(|(v, us)| (v, Some(us))),
        _ => Err(ApiError(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "a search carries `vector` or `text`: send one".into(),
        )),
    }
}

#[cfg(feature = "embed")]
async fn embed(state: &EdgeState, text: String) -> Result<(Vec<f32>, u64), ApiError> {
    let embedder = state.embedder.clone().ok_or_else(no_model)?;
    // A text embedded by another model than the collection's would be answered, wrongly.
    if let Some(recorded) = state.node.cloud_collection().and_then(|c| c.model_checksum)
        && recorded != embedder.identity().checksum
    {
        return Err(ApiError(
            StatusCode::CONFLICT,
            "model_mismatch",
            format!(
                "this edge embeds with {}, but collection `{}` was made with another model \
                 (checksum {recorded:016x}): set model_dir to the collection's model",
                embedder.identity(),
                state.collection
            ),
        ));
    }
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        embedder
            .embed(&text)
            .map(|v| (v, started.elapsed().as_micros() as u64))
            .map_err(|e| {
                if e.is_input() {
                    ApiError(StatusCode::BAD_REQUEST, "invalid_text", e.to_string())
                } else {
                    ApiError(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "embedding_failed",
                        e.to_string(),
                    )
                }
            })
    })
    .await
    .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
}

#[cfg(not(feature = "embed"))]
async fn embed(_: &EdgeState, _: String) -> Result<(Vec<f32>, u64), ApiError> {
    Err(no_model())
}

fn no_model() -> ApiError {
    ApiError(
        StatusCode::BAD_REQUEST,
        "no_model",
        "this edge runs no embedding model: start it with `model_dir`, or send vectors".into(),
    )
}

/// Installs the process-wide Prometheus recorder, with histogram buckets from 25 µs (a local
/// answer) to 1 s (a fallback stuck behind a dead link), and for the push path's delays
/// (milliseconds to seconds) finer ones, so that their percentiles can be read off.
pub fn install_prometheus() -> Result<PrometheusHandle, BuildError> {
    let push_delays = [
        0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2,
        0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0,
    ];
    let mut builder = metrics_exporter_prometheus::PrometheusBuilder::new().set_buckets(&[
        0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 1.0,
    ])?;
    for name in [
        "tiervec_edge_push_delay_seconds",
        "tiervec_edge_anchor_first_use_seconds",
        "tiervec_edge_invalidation_seconds",
        "tiervec_edge_compaction_seconds",
    ] {
        builder = builder.set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(name.into()),
            &push_delays,
        )?;
    }
    builder.install_recorder()
}

async fn search(
    State(state): State<EdgeState>,
    Path(name): Path<String>,
    body: Result<Json<SearchRequest>, JsonRejection>,
) -> Result<Json<SearchResponse>, ApiError> {
    let Json(mut req) =
        body.map_err(|e| ApiError(StatusCode::BAD_REQUEST, "invalid_json", e.body_text()))?;
    if name != state.collection {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            "collection_not_found",
            format!("this edge caches `{}`, not `{name}`", state.collection),
        ));
    }
    let started = Instant::now();
    let span = tracing::info_span!("edge_http_search", collection = %name, k = req.k);
    let (vector, embed_us) = query_vector(&state, &mut req)
        .instrument(span.clone())
        .await?;
    let ef = req.ef.unwrap_or(state.default_ef);
    let answer = if req.local_only {
        span.in_scope(|| state.node.search_local(&vector, req.k, ef))
    } else {
        state
            .node
            .search_with(&vector, req.k, ef, req.with_payload)
            .instrument(span)
            .await
    };
    let answer = answer.map_err(|e| match e {
        EdgeError::Query(q) => ApiError(StatusCode::BAD_REQUEST, "invalid_request", q.to_string()),
        EdgeError::GuestQuery(message) => {
            ApiError(StatusCode::BAD_REQUEST, "invalid_request", message)
        }
        EdgeError::AnswerTooLarge(message) => ApiError(
            StatusCode::UNPROCESSABLE_ENTITY,
            "answer_too_large",
            format!("{message}: ask for fewer hits (k) or without payloads"),
        ),
        other => ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            other.to_string(),
        ),
    })?;
    Ok(Json(SearchResponse {
        hits: answer
            .hits
            .into_iter()
            .map(|h| SearchHit {
                id: h.id,
                distance: h.distance,
                lsn: h.lsn,
                payload: h
                    .payload
                    .filter(|_| req.with_payload)
                    .and_then(json_payload),
            })
            .collect(),
        took_us: started.elapsed().as_micros() as u64,
        source: answer.source.name().into(),
        stale: answer.stale,
        certified: answer.certified,
        kth_distance: answer.kth_distance,
        anchor_distance: answer.anchor_distance,
        embed_us,
    }))
}

/// A hit's payload as the JSON value it is (snapshots of format 2 and the cloud's pushes and
/// answers hold JSON texts); a payload that is not JSON (a snapshot some other writer made)
/// is answered as a JSON string rather than dropped.
fn json_payload(payload: String) -> Option<Box<RawValue>> {
    if serde_json::from_str::<&RawValue>(&payload).is_ok() {
        RawValue::from_string(payload).ok()
    } else {
        serde_json::value::to_raw_value(&payload).ok()
    }
}

/// `GET /readyz`: the edge is served only once its cache is open, so it is ready whenever it
/// answers; the link's state is a field, not a condition — an edge cut off from the cloud still
/// answers (degraded where it is not confident), so it stays in rotation.
#[derive(Debug, Serialize, Deserialize)]
pub struct Readiness {
    pub ready: bool,
    pub link_up: bool,
    pub collection: String,
    pub cached_vectors: usize,
    pub cached_anchors: usize,
    pub cache_version: u64,
    pub takes_text: bool,
}

async fn readyz(State(state): State<EdgeState>) -> Json<Readiness> {
    let cache = state.node.cache();
    let (vectors, anchors, _) = cache.usage();
    Json(Readiness {
        ready: true,
        link_up: state.node.connected(),
        collection: state.collection.clone(),
        cached_vectors: vectors,
        cached_anchors: anchors,
        cache_version: cache.version(),
        #[cfg(feature = "embed")]
        takes_text: state.embedder.is_some(),
        #[cfg(not(feature = "embed"))]
        takes_text: false,
    })
}

/// The router of the edge's local endpoint.
pub fn router(state: EdgeState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route(
            "/metrics",
            get(|State(state): State<EdgeState>| async move { state.metrics.render() }),
        )
        .route("/v1/collections/{name}/search", post(search))
        .with_state(state)
}
