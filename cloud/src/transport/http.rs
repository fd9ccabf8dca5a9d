//! The HTTP/JSON API (axum), versioned under `/v1`, with its OpenAPI document generated from
//! these types (utoipa). Errors are JSON `{code, message}` with the matching status.
//!
//! Authentication: when API keys are configured, every `/v1` route needs one, in
//! `Authorization: Bearer <key>` or `api-key: <key>`. Missing key → 401; unknown key → 403;
//! a read-only key on a write route → 403. Keys are compared in constant time and never logged.
//! `/healthz`, `/readyz`, `/metrics` and `/v1/openapi.json` are open.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::extract::{
    DefaultBodyLimit, FromRequest, FromRequestParts, MatchedPath, Path, Request, State,
};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use metrics_exporter_prometheus::PrometheusHandle;
use ring::hmac;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use subtle::ConstantTimeEq;
use thiserror::Error;
use tiervec_shared::Metric;
use tiervec_shared::hnsw::HnswParams;
use tiervec_shared::query::QueryError;
use tracing::{Instrument, info_span};
use utoipa::{OpenApi, ToSchema};

use crate::collection::gpu::EngineKind;
use crate::collection::{Collection, Engine, SearchParams};
use crate::fanout::FanOutError;
use crate::hot::HotIds;
use crate::push::{ServiceCorpus, restore};
use crate::service::{Service, ServiceError};
use crate::storage::{Appended, ClusterError, MAX_SHARDS, WalError};
use crate::text::{TextError, Texts};
use crate::transport::ScanSlots;
pub use crate::transport::spec::{
    DEFAULT_SNAPSHOT_VECTORS, MAX_BATCH_SEARCHES, MAX_HOT_IDS, MAX_SNAPSHOT_BYTES,
    MAX_SNAPSHOT_VECTORS,
};

/// An API key and what it may do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKey {
    pub key: String,
    pub role: Role,
}

/// What a key may do: read-only keys search and read; read-write keys also write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    ReadOnly,
    ReadWrite,
}

/// Shared state of the handlers. The service appears once recovery has finished; until then
/// `/readyz` and the `/v1` routes answer 503.
#[derive(Clone)]
pub struct AppState {
    pub service: Arc<OnceLock<Arc<Service>>>,
    pub keys: Arc<KeyTable>,
    pub metrics: PrometheusHandle,
    pub max_body_bytes: usize,
    pub hot: Arc<HotIds>,
    /// How many API requests run at once, and for how long.
    pub gate: Arc<RequestGate>,
    /// Large exact scans at once, shared with the QUIC endpoint.
    pub scans: ScanSlots,
    /// Points per upsert or delete (`max_batch`), stated in the API document.
    pub max_batch: usize,
    /// The embedding model of texts sent in place of vectors.
    pub texts: Arc<Texts>,
}

/// Admission of API requests (`/v1/collections…`): a fixed number served at once, each under a
/// deadline. Probes, metrics and the OpenAPI document bypass it, so they answer under load.
pub struct RequestGate {
    permits: Arc<tokio::sync::Semaphore>,
    limit: usize,
    deadline: Duration,
}

impl RequestGate {
    pub fn new(max_concurrent: usize, deadline: Duration) -> RequestGate {
        let limit = max_concurrent.clamp(1, tokio::sync::Semaphore::MAX_PERMITS);
        RequestGate {
            permits: Arc::new(tokio::sync::Semaphore::new(limit)),
            limit,
            deadline,
        }
    }
}

/// A JSON error with its status.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

/// The body of every error response.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// Stable machine-readable code, e.g. `collection_not_found`.
    pub code: String,
    /// What went wrong and what to do, for a person.
    pub message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            code: self.code.to_owned(),
            message: self.message,
        };
        (self.status, axum::Json(body)).into_response()
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> ApiError {
        use ServiceError as E;
        let (status, code) = match &e {
            E::CollectionNotFound(_) => (StatusCode::NOT_FOUND, "collection_not_found"),
            E::PointNotFound { .. } => (StatusCode::NOT_FOUND, "point_not_found"),
            E::CollectionExists(_) => (StatusCode::CONFLICT, "collection_exists"),
            E::TooManyCollections { .. } => (StatusCode::CONFLICT, "too_many_collections"),
            // A valid request this deployment cannot serve (one node).
            E::ShardsNeedCluster { .. } => {
                (StatusCode::UNPROCESSABLE_ENTITY, "shards_need_a_cluster")
            }
            // The one bound the API document cannot state: it is the collection's.
            E::Query(QueryError::DimensionMismatch { .. })
            | E::BadPoint {
                source: QueryError::DimensionMismatch { .. },
                ..
            } => (StatusCode::UNPROCESSABLE_ENTITY, "dimension_mismatch"),
            E::Query(_) | E::BadPoint { .. } | E::Invalid(_) => {
                (StatusCode::BAD_REQUEST, "invalid_request")
            }
            // One write's log entry over the record limit: the request, not the storage.
            E::Wal(WalError::TooLarge(_)) | E::PayloadTooLarge { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
            }
            E::Cluster(ClusterError::TooLarge { .. }) => {
                (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
            }
            E::Cluster(ClusterError::Conflict(_)) => (StatusCode::CONFLICT, "write_conflict"),
            // The cluster's log could not be reached in time: retry (possibly at another node).
            E::Cluster(ClusterError::Unavailable(_) | ClusterError::Connect(_)) => {
                (StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable")
            }
            // Durable on the shards named, not on the others: retrying the whole write is safe.
            E::Cluster(ClusterError::PartlyDurable { .. }) => {
                (StatusCode::SERVICE_UNAVAILABLE, "partly_durable")
            }
            E::FanOut(FanOutError::NotCaughtUp { .. }) => {
                (StatusCode::SERVICE_UNAVAILABLE, "not_caught_up")
            }
            E::FanOut(FanOutError::ShardUnavailable { .. }) => {
                (StatusCode::SERVICE_UNAVAILABLE, "shard_unavailable")
            }
            E::FanOut(FanOutError::Query(_)) => (StatusCode::BAD_REQUEST, "invalid_request"),
            E::Wal(_)
            | E::Checkpoint(_)
            | E::DataDir { .. }
            | E::Cluster(ClusterError::Config(_) | ClusterError::Unsupported(_)) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "storage_error")
            }
        };
        ApiError::new(status, code, e.to_string())
    }
}

impl From<TextError> for ApiError {
    fn from(e: TextError) -> ApiError {
        let (status, code) = match &e {
            // Valid requests this deployment or collection cannot serve, like
            // `shards_need_a_cluster`.
            TextError::NoModel | TextError::CollectionHasNoModel { .. } => {
                (StatusCode::UNPROCESSABLE_ENTITY, "no_model")
            }
            TextError::UnknownModel { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "unknown_model"),
            // The collection's vectors live in another model's space.
            TextError::ModelMismatch { .. } => (StatusCode::CONFLICT, "model_mismatch"),
            TextError::Input(_) => (StatusCode::BAD_REQUEST, "invalid_text"),
            TextError::Failed(_) | TextError::Load(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "embedding_failed")
            }
        };
        ApiError::new(status, code, e.to_string())
    }
}

/// `Json<T>` whose rejections are API errors: 413 for a body over the limit, 400 otherwise.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

/// `Path<T>` whose rejections are API errors (400 `invalid_request`, JSON like every other).
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(v)| ApiPath(v))
            .map_err(|r| ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", r.body_text()))
    }
}

/// `Query<T>` whose rejections are API errors (400 `invalid_request`).
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(v)| ApiQuery(v))
            .map_err(|r| ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", r.body_text()))
    }
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "request body exceeds the server's max_body_bytes; send smaller batches",
        );
    }
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_json",
        rejection.body_text(),
    )
}

fn service(state: &AppState) -> Result<Arc<Service>, ApiError> {
    state.service.get().cloned().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "the server is still recovering; retry shortly",
        )
    })
}

/// Runs blocking service work (WAL commits, big searches) off the async workers.
async fn blocking<T: Send + 'static, E: Into<ApiError> + Send + 'static>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
        .map_err(Into::into)
}

// ---- request and response types ----

/// A vector's components read as the JSON numbers they are (f64) and checked against the bound
/// the API document states before they are narrowed to f32, so that a number just past the
/// bound is refused rather than rounded onto it.
mod components {
    use serde::Deserializer;
    use serde::de::{Error, SeqAccess, Visitor};

    /// The largest magnitude a component may have: `query::MAX_COMPONENT`, exactly.
    pub const MAX: f64 = tiervec_shared::query::MAX_COMPONENT as f64;

    pub fn option_vector<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<f32>>, D::Error> {
        vector(d).map(Some)
    }

    pub fn vector<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f32>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Vec<f32>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                write!(f, "an array of numbers of magnitude at most {MAX:e}")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<f32>, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 16));
                while let Some(x) = seq.next_element::<f64>()? {
                    if x.abs() > MAX {
                        return Err(A::Error::custom(format!(
                            "component {} is {x}: magnitudes above {MAX:e} overflow distances; \
                             scale the vectors down",
                            out.len()
                        )));
                    }
                    out.push(x as f32);
                }
                Ok(out)
            }
        }
        d.deserialize_seq(V)
    }
}

/// Integer fields as JSON Schema reads them: `3` and `3.0` are the same integer (serde takes only
/// the first), so a client that writes whole numbers as floats is not refused. Fractions,
/// negatives and numbers past `u64` are still refused, naming the value.
mod whole {
    use serde::de::{Deserializer, Error, Visitor};
    use serde::{Deserialize, de};

    pub struct Whole(pub u64);

    impl<'de> Deserialize<'de> for Whole {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Whole, D::Error> {
            struct V;
            impl Visitor<'_> for V {
                type Value = Whole;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a non-negative integer")
                }
                fn visit_u64<E: Error>(self, v: u64) -> Result<Whole, E> {
                    Ok(Whole(v))
                }
                fn visit_i64<E: Error>(self, v: i64) -> Result<Whole, E> {
                    u64::try_from(v)
                        .map(Whole)
                        .map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
                }
                fn visit_f64<E: Error>(self, v: f64) -> Result<Whole, E> {
                    // 2^64 is the first float past u64::MAX.
                    if v.fract() == 0.0 && (0.0..18_446_744_073_709_551_616.0).contains(&v) {
                        Ok(Whole(v as u64))
                    } else {
                        Err(E::invalid_value(de::Unexpected::Float(v), &self))
                    }
                }
                fn visit_str<E: Error>(self, v: &str) -> Result<Whole, E> {
                    match (v.parse::<u64>(), v.parse::<f64>()) {
                        (Ok(n), _) => Ok(Whole(n)),
                        (_, Ok(f)) => self.visit_f64(f),
                        _ => Err(E::invalid_value(de::Unexpected::Str(v), &self)),
                    }
                }
            }
            d.deserialize_any(V)
        }
    }

    fn fit<E: Error>(n: u64) -> Result<usize, E> {
        usize::try_from(n).map_err(|_| E::custom(format!("{n} is too large")))
    }

    pub fn u64<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        Whole::deserialize(d).map(|w| w.0)
    }

    pub fn usize<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
        fit(Whole::deserialize(d)?.0)
    }

    fn fit_u32<E: Error>(n: u64) -> Result<u32, E> {
        u32::try_from(n).map_err(|_| E::custom(format!("{n} is too large")))
    }

    pub fn u32<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        fit_u32(Whole::deserialize(d)?.0)
    }

    pub fn option_u32<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
        Option::<Whole>::deserialize(d)?
            .map(|w| fit_u32(w.0))
            .transpose()
    }

    pub fn option_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        Ok(Option::<Whole>::deserialize(d)?.map(|w| w.0))
    }

    pub fn option<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
        Option::<Whole>::deserialize(d)?
            .map(|w| fit(w.0))
            .transpose()
    }

    pub fn vec<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u64>, D::Error> {
        Ok(Vec::<Whole>::deserialize(d)?
            .into_iter()
            .map(|w| w.0)
            .collect())
    }
}

/// `POST /v1/collections`
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateCollection {
    /// 1–64 characters of `A-Z a-z 0-9 _ -`.
    pub name: String,
    #[serde(deserialize_with = "whole::usize")]
    pub dim: usize,
    /// `cosine` (1 − dot of normalised vectors), `l2` (squared) or `dot` (−dot).
    #[schema(value_type = String, example = "cosine")]
    pub metric: Metric,
    /// HNSW out-degree (default 16).
    #[serde(default, deserialize_with = "whole::option")]
    pub m: Option<usize>,
    /// HNSW build beam width (default 200).
    #[serde(default, deserialize_with = "whole::option")]
    pub ef_construction: Option<usize>,
    /// Shards the collection's points are spread over (1–64, default 1; more than 1 only on
    /// a cluster). Fixed at creation.
    #[serde(default, deserialize_with = "whole::option_u32")]
    pub shards: Option<u32>,
    /// The embedding model this cloud runs (`model_dir`), by its folder's name (e.g.
    /// `all-MiniLM-L6-v2`): the collection is made for its texts — searches may send `text`
    /// in place of `vector` — and `dim` must be the model's.
    #[serde(default)]
    pub model: Option<String>,
}

/// The embedding model a collection records.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ModelDescription {
    pub name: String,
    pub dim: u32,
    /// xxh3-64 of the model's weights and tokenizer, in hex.
    pub checksum: String,
}

/// A collection's description.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CollectionDescription {
    pub name: String,
    /// Identity of this incarnation (a UUID): a dropped and recreated collection gets a new one.
    pub id: String,
    pub dim: usize,
    #[schema(value_type = String)]
    pub metric: Metric,
    pub m: usize,
    pub ef_construction: usize,
    /// Shards its points are spread over (1 off a cluster).
    pub shards: u32,
    /// The shards the node answering holds caught up (`[0]` off a cluster).
    pub shards_held: Vec<u32>,
    /// Live points held on the node answering (on a cluster, those of the shards it holds).
    pub points: usize,
    /// Points in the searchable graph generation (the rest are searched exactly).
    pub indexed_points: usize,
    /// Which engine serves exact search: `cpu_simd` or `gpu`.
    pub exact_engine: String,
    /// Why: the device and precision on the GPU; on the CPU why not the GPU (e.g. `built
    /// without the gpu feature`, `no CUDA driver (libcuda.so not found)`).
    pub exact_engine_reason: String,
    /// The embedding model the collection was made with (texts may be sent in place of
    /// vectors); absent for a collection of vectors only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelDescription>,
}

/// `GET /v1/collections`
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CollectionList {
    pub collections: Vec<CollectionDescription>,
}

/// One point to upsert.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PointIn {
    #[serde(deserialize_with = "whole::u64")]
    pub id: u64,
    #[serde(deserialize_with = "components::vector")]
    pub vector: Vec<f32>,
    /// Any JSON value, stored and returned as given.
    #[schema(value_type = Object)]
    pub payload: Option<Box<RawValue>>,
}

/// `PUT /v1/collections/{name}/points`
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpsertPoints {
    pub points: Vec<PointIn>,
}

/// `POST /v1/collections/{name}/points/delete`
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeletePoints {
    #[serde(deserialize_with = "whole::vec")]
    pub ids: Vec<u64>,
}

/// An acknowledged write: durable before this response was sent (fsync'ed into the WAL; on a
/// cluster, held by a quorum of JetStream servers — see docs/cluster.md).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WriteAck {
    /// Sequence number of the write in the WAL; on a cluster, its position in its shard's
    /// stream (the highest of them for a write spanning shards: see `shards`).
    pub lsn: u64,
    /// On a cluster, each shard the write touched with its position there (what a search's
    /// `after_shards` names); empty off a cluster.
    #[serde(default)]
    pub shards: Vec<ShardPosition>,
}

/// A position in one shard's log.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ShardPosition {
    #[serde(deserialize_with = "whole::u32")]
    pub shard: u32,
    #[serde(deserialize_with = "whole::u64")]
    pub lsn: u64,
}

impl WriteAck {
    fn of(appended: Appended) -> WriteAck {
        WriteAck {
            lsn: appended.position,
            shards: appended
                .shards
                .into_iter()
                .map(|(shard, lsn)| ShardPosition { shard, lsn })
                .collect(),
        }
    }
}

/// `GET /v1/collections/{name}/hot` parameters.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct HotQuery {
    /// An edge id (its certificate's Common Name); none: across all edges.
    pub edge: Option<String>,
    /// How many ids (default 20, at most [`MAX_HOT_IDS`]).
    #[serde(default, deserialize_with = "whole::option")]
    pub n: Option<usize>,
}

/// `GET /v1/collections/{name}/snapshot` parameters.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SnapshotQuery {
    /// How many vectors at most (default [`DEFAULT_SNAPSHOT_VECTORS`], at most
    /// [`MAX_SNAPSHOT_VECTORS`]).
    #[serde(default, deserialize_with = "whole::option")]
    pub max_vectors: Option<usize>,
}

/// One hot id: its decayed count (an upper bound) and the error bound within it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HotId {
    pub id: u64,
    pub count: f64,
    pub error: f64,
}

/// What edges ask the cloud for most, lately (confirmed, non-shadow QUIC queries only).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HotResponse {
    pub collection: String,
    pub edge: Option<String>,
    /// Total decayed weight of the table (answered ids counted once each).
    pub total: f64,
    pub ids: Vec<HotId>,
}

/// A stored point.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PointOut {
    pub id: u64,
    pub vector: Vec<f32>,
    pub lsn: u64,
    #[schema(value_type = Object)]
    pub payload: Option<Box<RawValue>>,
}

/// `POST /v1/collections/{name}/search`
#[derive(Debug, Serialize, Deserialize, ToSchema, Clone)]
#[serde(deny_unknown_fields)]
pub struct SearchRequest {
    /// The query vector; or send `text`.
    #[serde(default, deserialize_with = "components::option_vector")]
    pub vector: Option<Vec<f32>>,
    /// The query as text, embedded by the collection's model (`query::MAX_TEXT_CHARS`
    /// bytes at most); or send `vector`.
    #[serde(default)]
    pub text: Option<String>,
    /// Results wanted, 1..=1024.
    #[serde(deserialize_with = "whole::usize")]
    pub k: usize,
    /// Beam width (default from the server config); raised to `k` if smaller.
    #[serde(default, deserialize_with = "whole::option")]
    pub ef: Option<usize>,
    /// Exact brute-force search instead of the graph.
    #[serde(default)]
    pub exact: bool,
    /// Drop hits farther than this (see docs/distances.md).
    pub max_distance: Option<f32>,
    /// Return payloads with the hits.
    #[serde(default)]
    pub with_payload: bool,
    /// Answer only once this node has applied the collection's writes through this LSN (a
    /// write's `lsn`): on a cluster a write acknowledged by another node reaches this one a
    /// little later. Waits up to `MAX_CATCH_UP_WAIT` (2 s), then 503 `not_caught_up`.
    #[serde(default, deserialize_with = "whole::option_u64")]
    pub after_lsn: Option<u64>,
    /// The same for a collection of several shards: a write's `shards`, at most 64.
    #[serde(default)]
    pub after_shards: Vec<ShardPosition>,
}

/// How long a search with `after_lsn` waits for this node to apply the writes it names.
pub const MAX_CATCH_UP_WAIT: Duration = Duration::from_secs(2);

/// One search hit.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SearchHit {
    pub id: u64,
    pub distance: f32,
    /// LSN of the write that last changed this point.
    pub lsn: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Object)]
    pub payload: Option<Box<RawValue>>,
}

/// The answer to one search.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SearchResponse {
    pub hits: Vec<SearchHit>,
    /// Server-side time of this search in microseconds.
    pub took_us: u64,
    /// `graph` or `exact`.
    pub engine: String,
    /// On a cluster, shards no live node answered: the hits are the nearest among the other
    /// shards only. Empty for a complete answer.
    pub missing_shards: Vec<u32>,
    /// Microseconds spent embedding the query's `text` (absent for a vector query; for a
    /// batch, the time of the whole batch's texts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embed_us: Option<u64>,
}

/// `POST /v1/collections/{name}/search/batch`
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchSearchRequest {
    pub searches: Vec<SearchRequest>,
}

/// Answers in request order.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BatchSearchResponse {
    pub results: Vec<SearchResponse>,
    pub took_us: u64,
}

/// The most one search answer, or a batch's answers together, may carry: hits counted at
/// [`HIT_JSON_BYTES`] each plus their payloads' JSON text. Past it the request is refused (400)
/// rather than a response of up to a gigabyte built in memory (1,024 hits of 1 MiB payloads).
pub const MAX_ANSWER_BYTES: usize = 16 << 20;

/// What one hit costs in an answer, payload aside (id, distance, LSN and their JSON keys).
pub const HIT_JSON_BYTES: usize = 96;

fn describe(svc: &Service, c: &Collection) -> CollectionDescription {
    let engine = c.exact_engine();
    CollectionDescription {
        name: c.info.name.clone(),
        id: uuid::Uuid::from_bytes(c.info.id.0).to_string(),
        dim: c.info.dim,
        metric: c.info.metric,
        m: c.info.params.m,
        ef_construction: c.info.params.ef_construction,
        shards: svc.shards(c.info.id.0),
        shards_held: svc.shards_held(c.info.id.0),
        points: c.len(),
        indexed_points: c.indexed_points(),
        exact_engine: match engine.kind {
            EngineKind::Gpu => "gpu",
            EngineKind::Cpu => "cpu_simd",
        }
        .into(),
        exact_engine_reason: engine.reason,
        model: svc.catalog().model(c.info.id.0).map(|m| ModelDescription {
            name: m.name,
            dim: m.dim,
            checksum: format!("{:016x}", m.checksum),
        }),
    }
}

fn raw(payload: Option<Arc<str>>) -> Option<Box<RawValue>> {
    payload.and_then(|p| RawValue::from_string(p.to_string()).ok())
}

// ---- handlers ----

#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "The process is up")))]
async fn healthz() -> &'static str {
    "ok"
}

/// What `/readyz` reports (docs/cloud.md, "Readiness"): ready means recovered and the log
/// takes writes; whether each collection's graph covers its points is a field, not a
/// condition (without it searches are exact scans, slower but correct).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Readiness {
    pub ready: bool,
    /// The checkpoint and the log were replayed.
    pub recovered: bool,
    /// The log takes writes (false after a failed write, until a restart).
    pub log_writable: bool,
    /// Why the log stopped taking writes.
    pub log_error: Option<String>,
    /// Why the last maintenance pass (indexing, rebuilds, checkpoints) panicked, while no pass
    /// has completed since; the node is not ready then.
    pub maintenance_error: Option<String>,
    /// Why the last checkpoint failed, while none has succeeded since (the node stays ready:
    /// writes are durable in the log, which grows until a checkpoint succeeds).
    pub checkpoint_error: Option<String>,
    pub collections: Vec<CollectionReadiness>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CollectionReadiness {
    pub name: String,
    /// Live points.
    pub points: usize,
    /// Points (live or replaced since) written after the searchable graph generation was
    /// exported: every search scans them exactly.
    pub unindexed: usize,
    /// `unindexed` is 0: the graph generation covers every point.
    pub graph_complete: bool,
}

#[utoipa::path(get, path = "/readyz", responses((status = 200, body = Readiness, description = "Recovered, the log takes writes and maintenance runs"), (status = 503, body = Readiness, description = "Recovering, the log stopped taking writes, or maintenance is failing")))]
async fn readyz(State(state): State<AppState>) -> (StatusCode, axum::Json<Readiness>) {
    let readiness = match state.service.get() {
        None => Readiness {
            ready: false,
            recovered: false,
            log_writable: false,
            log_error: None,
            maintenance_error: None,
            checkpoint_error: None,
            collections: Vec::new(),
        },
        Some(svc) => {
            let log_error = svc.log_failure();
            let maintenance_error = svc.maintenance().failure();
            Readiness {
                ready: log_error.is_none() && maintenance_error.is_none(),
                recovered: true,
                log_writable: log_error.is_none(),
                log_error,
                maintenance_error,
                checkpoint_error: svc.maintenance().checkpoint_failure(),
                collections: svc
                    .catalog()
                    .all()
                    .iter()
                    .map(|c| CollectionReadiness {
                        name: c.info.name.clone(),
                        points: c.len(),
                        unindexed: c.slots().saturating_sub(c.generation_len()),
                        graph_complete: c.generation_len() >= c.slots(),
                    })
                    .collect(),
            }
        }
    };
    let status = if readiness.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(readiness))
}

#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text format")))]
async fn metrics_text(State(state): State<AppState>) -> String {
    state.metrics.render()
}

/// The API document with the bounds the API enforces (`transport::spec`).
async fn openapi(State(state): State<AppState>) -> axum::Json<serde_json::Value> {
    let mut spec = serde_json::to_value(ApiDoc::openapi()).expect("the API document is plain data");
    super::spec::state_bounds(&mut spec, state.max_batch);
    axum::Json(spec)
}

#[utoipa::path(post, path = "/v1/collections", request_body = CreateCollection,
    responses((status = 201, body = CollectionDescription), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn create_collection(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<CreateCollection>,
) -> Result<(StatusCode, axum::Json<CollectionDescription>), ApiError> {
    let svc = service(&state)?;
    let defaults = HnswParams::default();
    let params = HnswParams {
        m: req.m.unwrap_or(defaults.m),
        ef_construction: req.ef_construction.unwrap_or(defaults.ef_construction),
        seed: defaults.seed,
    };
    // The model is checked before anything is created.
    let model = req
        .model
        .as_deref()
        .map(|asked| state.texts.model_named(asked))
        .transpose()?;
    if let Some(m) = &model
        && m.dim as usize != req.dim
    {
        return Err(ApiError::from(ServiceError::Invalid(format!(
            "model {m} makes {}-d vectors; the collection is asked to hold {}-d ones",
            m.dim, req.dim
        ))));
    }
    let s = svc.clone();
    let info = blocking(move || {
        let info = s.create_sharded_collection(
            &req.name,
            req.dim,
            req.metric,
            params,
            req.shards.unwrap_or(1),
        )?;
        // Logged after the create: a crash between the two leaves a collection of vectors
        // only, and the create unacknowledged (drop it and create it again).
        if let Some(m) = &model {
            s.set_model(&info.name, m)?;
        }
        Ok::<_, ServiceError>(info)
    })
    .await?;
    let c = svc
        .catalog()
        .get(&info.name)
        .ok_or_else(|| ServiceError::CollectionNotFound(info.name.clone()))?;
    Ok((StatusCode::CREATED, axum::Json(describe(&svc, &c))))
}

#[utoipa::path(get, path = "/v1/collections", responses((status = 200, body = CollectionList)))]
async fn list_collections(
    State(state): State<AppState>,
) -> Result<axum::Json<CollectionList>, ApiError> {
    let svc = service(&state)?;
    Ok(axum::Json(CollectionList {
        collections: svc
            .catalog()
            .all()
            .iter()
            .map(|c| describe(&svc, c))
            .collect(),
    }))
}

#[utoipa::path(get, path = "/v1/collections/{name}", params(("name" = String, Path)),
    responses((status = 200, body = CollectionDescription), (status = 404, body = ErrorBody)))]
async fn get_collection(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<axum::Json<CollectionDescription>, ApiError> {
    let svc = service(&state)?;
    let c = svc
        .catalog()
        .get(&name)
        .ok_or(ServiceError::CollectionNotFound(name))?;
    Ok(axum::Json(describe(&svc, &c)))
}

#[utoipa::path(delete, path = "/v1/collections/{name}", params(("name" = String, Path)),
    responses((status = 200, body = WriteAck), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn drop_collection(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<axum::Json<WriteAck>, ApiError> {
    let svc = service(&state)?;
    let lsn = blocking(move || svc.drop_collection(&name)).await?;
    Ok(axum::Json(WriteAck {
        lsn,
        shards: Vec::new(),
    }))
}

#[utoipa::path(put, path = "/v1/collections/{name}/points", params(("name" = String, Path)), request_body = UpsertPoints,
    responses((status = 200, body = WriteAck), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 413, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn upsert_points(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiJson(req): ApiJson<UpsertPoints>,
) -> Result<axum::Json<WriteAck>, ApiError> {
    let svc = service(&state)?;
    let points = req
        .points
        .into_iter()
        .map(|p| (p.id, p.vector, p.payload.map(|r| r.get().to_owned())))
        .collect();
    let appended = blocking(move || svc.upsert(&name, points)).await?;
    Ok(axum::Json(WriteAck::of(appended)))
}

#[utoipa::path(post, path = "/v1/collections/{name}/points/delete", params(("name" = String, Path)), request_body = DeletePoints,
    responses((status = 200, body = WriteAck), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn delete_points(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiJson(req): ApiJson<DeletePoints>,
) -> Result<axum::Json<WriteAck>, ApiError> {
    let svc = service(&state)?;
    let appended = blocking(move || svc.delete(&name, req.ids)).await?;
    Ok(axum::Json(WriteAck::of(appended)))
}

#[utoipa::path(get, path = "/v1/collections/{name}/points/{id}", params(("name" = String, Path), ("id" = u64, Path)),
    responses((status = 200, body = PointOut), (status = 404, body = ErrorBody)))]
async fn get_point(
    State(state): State<AppState>,
    ApiPath((name, id)): ApiPath<(String, u64)>,
) -> Result<axum::Json<PointOut>, ApiError> {
    let svc = service(&state)?;
    let p = svc.get(&name, id)?;
    Ok(axum::Json(PointOut {
        id: p.id,
        vector: p.vector,
        lsn: p.lsn,
        payload: raw(p.payload),
    }))
}

#[utoipa::path(get, path = "/v1/collections/{name}/hot", params(("name" = String, Path), HotQuery),
    responses((status = 200, body = HotResponse), (status = 404, body = ErrorBody)))]
async fn hot_ids(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiQuery(q): ApiQuery<HotQuery>,
) -> Result<axum::Json<HotResponse>, ApiError> {
    let svc = service(&state)?;
    if let Some(n) = q.n.filter(|n| *n > MAX_HOT_IDS) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("n = {n} is above the maximum of {MAX_HOT_IDS}"),
        ));
    }
    let collection = svc.collection(&name)?;
    let (total, top) = state
        .hot
        .top(collection.info.id.0, q.edge.as_deref(), q.n.unwrap_or(20));
    Ok(axum::Json(HotResponse {
        collection: name,
        edge: q.edge,
        total,
        ids: top
            .into_iter()
            .map(|e| HotId {
                id: e.id,
                count: e.count,
                error: e.error,
            })
            .collect(),
    }))
}

#[utoipa::path(get, path = "/v1/collections/{name}/snapshot", params(("name" = String, Path), SnapshotQuery),
    responses((status = 200, description = "An edge snapshot file (docs/snapshot-format.md) carrying the collection's identity: the points edges asked for most first, then the others in the order they were written, up to `max_vectors`", content_type = "application/octet-stream"),
        (status = 404, body = ErrorBody)))]
async fn edge_snapshot(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiQuery(q): ApiQuery<SnapshotQuery>,
) -> Result<Response, ApiError> {
    let svc = service(&state)?;
    let max = q.max_vectors.unwrap_or(DEFAULT_SNAPSHOT_VECTORS);
    if !(1..=MAX_SNAPSHOT_VECTORS).contains(&max) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("max_vectors = {max} is outside 1..={MAX_SNAPSHOT_VECTORS}"),
        ));
    }
    let collection = svc.collection(&name)?;
    let (_, hot) = state
        .hot
        .top(collection.info.id.0, None, max.min(MAX_HOT_IDS));
    // Building the graph is a scan's worth of work: it takes one of their slots.
    let slot = state.scans.slot_for(usize::MAX).await;
    let bytes = blocking(move || {
        let _slot = slot;
        // A hot id deleted since would take a place and then be left out of the file.
        let mut ids: Vec<u64> = hot
            .iter()
            .map(|e| e.id)
            .filter(|id| collection.deleted_at(*id).is_none())
            .collect();
        let mut seen: std::collections::HashSet<u64> = ids.iter().copied().collect();
        ids.extend(
            collection
                .live_ids(max + ids.len())
                .into_iter()
                .filter(|id| seen.insert(*id)),
        );
        ids.truncate(max);
        let corpus = ServiceCorpus {
            service: svc,
            collection,
        };
        restore::seed(&corpus, &ids, MAX_SNAPSHOT_BYTES).map_err(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
        })
    })
    .await?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
        bytes.into_vec(),
    )
        .into_response())
}

fn run_search(
    svc: &Service,
    name: &str,
    req: &SearchRequest,
    answer_budget: &mut usize,
) -> Result<SearchResponse, ApiError> {
    let started = Instant::now();
    let params = SearchParams {
        k: req.k,
        ef: req.ef.unwrap_or(svc.config.default_ef),
        exact: req.exact,
        max_distance: req.max_distance,
    };
    if let Some(p) = req.after_shards.iter().find(|p| p.shard >= MAX_SHARDS) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!(
                "shard {} in `after_shards`: a collection has at most {MAX_SHARDS} shards",
                p.shard
            ),
        ));
    }
    let after: Vec<(u32, u64)> = req
        .after_lsn
        .map(|lsn| (0, lsn))
        .into_iter()
        .chain(req.after_shards.iter().map(|p| (p.shard, p.lsn)))
        .collect();
    let answer = svc.search_after(
        name,
        query_vector(req)?,
        &params,
        &after,
        MAX_CATCH_UP_WAIT,
        req.with_payload,
    )?;
    let (hits, engine) = (answer.hits, answer.engine);
    let payload_bytes: usize = if req.with_payload {
        hits.iter()
            .filter_map(|h| h.payload.as_ref().map(|p| p.len()))
            .sum()
    } else {
        0
    };
    let cost = hits.len() * HIT_JSON_BYTES + payload_bytes;
    if cost > *answer_budget {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "answer_too_large",
            format!(
                "the answer would carry {cost} bytes ({} hits, {payload_bytes} bytes of \
                 payloads), over the {MAX_ANSWER_BYTES} bytes one answer may carry: ask for \
                 fewer hits (k) or without payloads",
                hits.len()
            ),
        ));
    }
    *answer_budget -= cost;
    Ok(SearchResponse {
        hits: hits
            .into_iter()
            .map(|h| SearchHit {
                id: h.id,
                distance: h.distance,
                lsn: h.lsn,
                payload: if req.with_payload {
                    raw(h.payload)
                } else {
                    None
                },
            })
            .collect(),
        took_us: started.elapsed().as_micros() as u64,
        engine: match engine {
            Engine::Graph => "graph".into(),
            Engine::Exact => "exact".into(),
        },
        missing_shards: answer.missing_shards,
        embed_us: None,
    })
}

/// The vector of a search whose texts [`embed_texts`] has embedded.
fn query_vector(req: &SearchRequest) -> Result<&[f32], ApiError> {
    req.vector.as_deref().ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "a search carries `vector` or `text`".to_owned(),
        )
    })
}

/// Embeds the `text` of each search into its `vector` with the collection's model, on a
/// blocking thread; returns the time spent, or none when no search had a text.
async fn embed_texts(
    state: &AppState,
    svc: &Arc<Service>,
    name: &str,
    searches: &mut [SearchRequest],
) -> Result<Option<Duration>, ApiError> {
    if let Some((i, _)) = searches
        .iter()
        .enumerate()
        .find(|(_, s)| s.vector.is_some() == s.text.is_some())
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("search {i} carries both or neither of `vector` and `text`: send one"),
        ));
    }
    let texts: Vec<String> = searches.iter_mut().filter_map(|s| s.text.take()).collect();
    if texts.is_empty() {
        return Ok(None);
    }
    let c = svc.collection(name)?;
    let recorded = svc.catalog().model(c.info.id.0);
    let model = state.texts.clone();
    let name = name.to_owned();
    let (vectors, took) = blocking(move || {
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        model
            .embed(&name, recorded.as_ref(), &refs)
            .map_err(ApiError::from)
    })
    .await?;
    let mut vectors = vectors.into_iter();
    for s in searches.iter_mut().filter(|s| s.vector.is_none()) {
        s.vector = vectors.next();
    }
    Ok(Some(took))
}

#[utoipa::path(post, path = "/v1/collections/{name}/search", params(("name" = String, Path)), request_body = SearchRequest,
    responses((status = 200, body = SearchResponse), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn search(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiJson(mut req): ApiJson<SearchRequest>,
) -> Result<axum::Json<SearchResponse>, ApiError> {
    let svc = service(&state)?;
    let embedded = embed_texts(&state, &svc, &name, std::slice::from_mut(&mut req)).await?;
    let embed_us = embedded.map(|d| d.as_micros() as u64);
    let answer = |mut r: SearchResponse| {
        r.embed_us = embed_us;
        axum::Json(r)
    };
    if req.after_shards.len() > MAX_SHARDS as usize {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!(
                "{} shard positions in `after_shards`; a collection has at most {MAX_SHARDS} shards",
                req.after_shards.len()
            ),
        ));
    }
    // A search that waits for writes, or asks other nodes, never holds an async worker.
    if req.after_lsn.is_some() || !req.after_shards.is_empty() || svc.fans_out(&name) {
        return Ok(answer(
            blocking(move || run_search(&svc, &name, &req, &mut { MAX_ANSWER_BYTES })).await?,
        ));
    }
    // A graph search takes tens of microseconds: cheaper inline than a hop to the blocking
    // pool. A large exact scan (asked for, or no graph yet, or a long unindexed tail) waits for
    // a scan slot and runs there.
    let rows = svc.scanned_rows(&name, req.exact)?;
    match state.scans.slot_for(rows).await {
        None => Ok(answer(run_search(&svc, &name, &req, &mut {
            MAX_ANSWER_BYTES
        })?)),
        Some(slot) => Ok(answer(
            blocking(move || {
                let _slot = slot;
                run_search(&svc, &name, &req, &mut { MAX_ANSWER_BYTES })
            })
            .await?,
        )),
    }
}

#[utoipa::path(post, path = "/v1/collections/{name}/search/batch", params(("name" = String, Path)), request_body = BatchSearchRequest,
    responses((status = 200, body = BatchSearchResponse), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn search_batch(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiJson(mut req): ApiJson<BatchSearchRequest>,
) -> Result<axum::Json<BatchSearchResponse>, ApiError> {
    let svc = service(&state)?;
    svc.collection(&name)?;
    if req.searches.len() > MAX_BATCH_SEARCHES {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!(
                "{} searches in one batch; the maximum is {MAX_BATCH_SEARCHES}",
                req.searches.len()
            ),
        ));
    }
    let hits_asked: usize = req.searches.iter().map(|s| s.k).sum();
    if hits_asked.saturating_mul(HIT_JSON_BYTES) > MAX_ANSWER_BYTES {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "answer_too_large",
            format!(
                "{hits_asked} hits asked for in one batch; the answers together may carry at \
                 most {MAX_ANSWER_BYTES} bytes, about {} hits: split the batch or ask for \
                 fewer hits (k)",
                MAX_ANSWER_BYTES / HIT_JSON_BYTES
            ),
        ));
    }
    let started = Instant::now();
    let embedded = embed_texts(&state, &svc, &name, &mut req.searches).await?;
    // The batch holds one scan slot however it is answered (its exact scans spread over the
    // cores).
    let slot = state.scans.slot_for(usize::MAX).await;
    let results = blocking(move || {
        let _slot = slot;
        let mut answer_budget = MAX_ANSWER_BYTES;
        req.searches
            .iter()
            .enumerate()
            .map(|(i, s)| {
                run_search(&svc, &name, s, &mut answer_budget)
                    .map(|mut r| {
                        r.embed_us = embedded.map(|d| d.as_micros() as u64);
                        r
                    })
                    .map_err(|e| ApiError {
                        message: format!("search {i}: {}", e.message),
                        ..e
                    })
            })
            .collect::<Result<Vec<_>, _>>()
    })
    .await?;
    Ok(axum::Json(BatchSearchResponse {
        results,
        took_us: started.elapsed().as_micros() as u64,
    }))
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "tiervec cloud API",
        description = "Collections, durable writes and k-NN search. Distances: docs/distances.md."
    ),
    paths(
        healthz,
        readyz,
        metrics_text,
        create_collection,
        list_collections,
        get_collection,
        drop_collection,
        upsert_points,
        delete_points,
        get_point,
        hot_ids,
        edge_snapshot,
        search,
        search_batch
    ),
    components(schemas(
        ErrorBody,
        Readiness,
        CollectionReadiness,
        CreateCollection,
        CollectionDescription,
        CollectionList,
        PointIn,
        UpsertPoints,
        DeletePoints,
        WriteAck,
        ShardPosition,
        PointOut,
        HotId,
        HotResponse,
        SearchRequest,
        SearchHit,
        SearchResponse,
        BatchSearchRequest,
        BatchSearchResponse
    ))
)]
pub struct ApiDoc;

// ---- middleware ----

/// Which role a route needs; `None` for the open routes.
fn required_role(method: &Method, path: &str) -> Option<Role> {
    if !path.starts_with("/v1/") || path == "/v1/openapi.json" {
        return None;
    }
    let write = match *method {
        Method::PUT | Method::DELETE => true,
        Method::POST => path == "/v1/collections" || path.ends_with("/points/delete"),
        _ => false,
    };
    Some(if write {
        Role::ReadWrite
    } else {
        Role::ReadOnly
    })
}

fn presented_key(headers: &HeaderMap) -> Option<&[u8]> {
    if let Some(v) = headers.get("authorization") {
        return v.as_bytes().strip_prefix(b"Bearer ");
    }
    headers.get("api-key").map(|v| v.as_bytes())
}

/// A configured API key that cannot be used.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum KeyError {
    #[error(
        "API key {index} is empty; an empty key would match a request that sends an empty header"
    )]
    Empty { index: usize },
}

/// The configured API keys, held as HMAC-SHA256 tags under a key drawn at start-up: a presented
/// key is tagged once and compared with every configured tag in constant time. Tags have one
/// length whatever the key's, so the comparison leaks neither the keys nor their lengths, and
/// no one who does not know the process's HMAC key can choose bytes whose tag matches.
pub struct KeyTable {
    mac: hmac::Key,
    tags: Vec<([u8; 32], Role)>,
}

impl KeyTable {
    /// Refuses an empty key.
    pub fn new(keys: &[ApiKey]) -> Result<KeyTable, KeyError> {
        let rng = ring::rand::SystemRandom::new();
        let mac = hmac::Key::generate(hmac::HMAC_SHA256, &rng)
            .expect("the operating system's random source is available");
        let mut tags = Vec::with_capacity(keys.len());
        for (index, k) in keys.iter().enumerate() {
            if k.key.is_empty() {
                return Err(KeyError::Empty { index });
            }
            tags.push((tag(&mac, k.key.as_bytes()), k.role));
        }
        Ok(KeyTable { mac, tags })
    }

    /// No keys configured: the API is open.
    pub fn is_empty(&self) -> bool {
        self.tags.is_empty()
    }

    /// The role of `presented`; every configured tag is compared, whichever matches.
    fn role_of(&self, presented: &[u8]) -> Option<Role> {
        let presented = tag(&self.mac, presented);
        let mut found = None;
        for (configured, role) in &self.tags {
            if bool::from(configured.ct_eq(&presented)) {
                found = Some(*role);
            }
        }
        found
    }
}

fn tag(mac: &hmac::Key, bytes: &[u8]) -> [u8; 32] {
    hmac::sign(mac, bytes)
        .as_ref()
        .try_into()
        .expect("HMAC-SHA256 tags are 32 bytes")
}

async fn authenticate(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if state.keys.is_empty() {
        return next.run(req).await;
    }
    let Some(needed) = required_role(req.method(), req.uri().path()) else {
        return next.run(req).await;
    };
    let Some(presented) = presented_key(req.headers()) else {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing_api_key",
            "send an API key in `Authorization: Bearer <key>` or `api-key`",
        )
        .into_response();
    };
    match state.keys.role_of(presented) {
        None => ApiError::new(
            StatusCode::FORBIDDEN,
            "invalid_api_key",
            "the API key is not valid",
        )
        .into_response(),
        Some(Role::ReadOnly) if needed == Role::ReadWrite => ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this API key is read-only; writes need a read-write key",
        )
        .into_response(),
        Some(_) => next.run(req).await,
    }
}

/// A span and the request metrics (count and latency per route, method and status).
async fn observe(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = req.method().clone();
    let span = info_span!("http", method = %method, route = %route);
    let started = Instant::now();
    let response = next.run(req).instrument(span).await;
    let status = response.status().as_u16().to_string();
    let labels = [
        ("route", route),
        ("method", method.to_string()),
        ("status", status),
    ];
    metrics::counter!("tiervec_http_requests_total", &labels).increment(1);
    metrics::histogram!("tiervec_http_request_duration_seconds", &labels)
        .record(started.elapsed().as_secs_f64());
    response
}

/// Admits an API request under the [`RequestGate`]: 503 `overloaded` at once when the limit
/// is reached (queueing would only move the wait into the client's timeout), 503
/// `deadline_exceeded` when the answer takes longer than the deadline.
async fn admit(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if !req.uri().path().starts_with("/v1/collections") {
        return next.run(req).await;
    }
    let gate = &state.gate;
    let Ok(_permit) = gate.permits.clone().try_acquire_owned() else {
        metrics::counter!("tiervec_http_overloaded_total").increment(1);
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            format!(
                "{} API requests are being served, the most this server takes at once \
                 (http.max_concurrent_requests); retry shortly",
                gate.limit
            ),
        )
        .into_response();
    };
    match tokio::time::timeout(gate.deadline, next.run(req)).await {
        Ok(response) => response,
        Err(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "deadline_exceeded",
            format!(
                "no answer within {} ms (http.request_timeout_ms); a write may still land \
                 (upserts and deletes are idempotent: retry them), a search can ask for less",
                gate.deadline.as_millis()
            ),
        )
        .into_response(),
    }
}

/// A path no route takes (an empty point id included) answers the API's error body too.
async fn unknown_route(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "route_not_found",
        format!(
            "no route takes {method} {}; /v1/openapi.json lists them",
            uri.path()
        ),
    )
}

/// A route asked with a method it does not take.
async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!(
            "{} does not take {method}; /v1/openapi.json lists what it takes",
            uri.path()
        ),
    )
}

/// The whole router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/v1/openapi.json", get(openapi))
        .route(
            "/v1/collections",
            post(create_collection).get(list_collections),
        )
        .route(
            "/v1/collections/{name}",
            get(get_collection).delete(drop_collection),
        )
        .route("/v1/collections/{name}/points", put(upsert_points))
        .route("/v1/collections/{name}/points/delete", post(delete_points))
        .route("/v1/collections/{name}/points/{id}", get(get_point))
        .route("/v1/collections/{name}/hot", get(hot_ids))
        .route("/v1/collections/{name}/snapshot", get(edge_snapshot))
        .route("/v1/collections/{name}/search", post(search))
        .route("/v1/collections/{name}/search/batch", post(search_batch))
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), admit))
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .route_layer(middleware::from_fn(observe))
        .layer(DefaultBodyLimit::max(state.max_body_bytes))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(key: &str, role: Role) -> ApiKey {
        ApiKey {
            key: key.into(),
            role,
        }
    }

    #[test]
    fn an_empty_configured_key_is_refused() {
        let keys = [key("rw-key", Role::ReadWrite), key("", Role::ReadOnly)];
        assert_eq!(
            KeyTable::new(&keys).err(),
            Some(KeyError::Empty { index: 1 })
        );
    }

    #[test]
    fn only_the_exact_key_matches_whatever_its_length() {
        let table =
            KeyTable::new(&[key("rw-key", Role::ReadWrite), key("ro", Role::ReadOnly)]).unwrap();
        assert_eq!(table.role_of(b"rw-key"), Some(Role::ReadWrite));
        assert_eq!(table.role_of(b"ro"), Some(Role::ReadOnly));
        for wrong in [&b""[..], b"r", b"rw-ke", b"rw-key ", b"rw-keyrw-key", b"RO"] {
            assert_eq!(table.role_of(wrong), None, "{wrong:?}");
        }
        assert!(KeyTable::new(&[]).unwrap().is_empty());
    }

    #[test]
    fn a_write_over_the_log_record_limit_is_413_not_a_storage_error() {
        let too_large = ServiceError::Wal(WalError::TooLarge(
            tiervec_shared::log::LogError::RecordTooLarge {
                len: tiervec_shared::log::MAX_RECORD + 1,
            },
        ));
        let e = ApiError::from(too_large);
        assert_eq!(
            (e.status, e.code),
            (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
        );
    }
}
