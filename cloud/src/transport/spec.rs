//! The bounds the HTTP API enforces, written into its OpenAPI document, each from the constant
//! or setting that enforces it, so that a client generated from the document (or a fuzzer such
//! as schemathesis) knows what is refused before it asks. What the document cannot state — a
//! vector's length must equal its collection's dimension, and an answer's size depends on the
//! stored payloads — is refused with 422, kept apart from the 400 of a request the document
//! already rules out.

use serde_json::{Value, json};
use tiervec_shared::hnsw::{M_RANGE, MAX_EF_CONSTRUCTION};
use tiervec_shared::query::{MAX_COMPONENT, MAX_EF, MAX_K};
use tiervec_shared::snapshot::MAX_DIM;

use crate::storage::MAX_SHARDS;

/// Most searches in one batch request.
pub const MAX_BATCH_SEARCHES: usize = 1_024;

/// Most ids `GET …/hot` returns.
pub const MAX_HOT_IDS: usize = 10_000;

/// Most vectors `GET …/snapshot` puts in an edge's first snapshot (its graph is built while
/// the request waits, within `http.request_timeout_ms`), and how many when none is asked.
pub const MAX_SNAPSHOT_VECTORS: usize = 50_000;
pub const DEFAULT_SNAPSHOT_VECTORS: usize = 10_000;
/// What those vectors may weigh in the cache's byte model (`push::vector_bytes`: components and
/// payload): past it the file stops short, so that a request cannot make the cloud build a file
/// of many large payloads or dimensions.
pub const MAX_SNAPSHOT_BYTES: u64 = 256 << 20;

/// The pattern of a collection name (`service::check_name`).
pub const NAME_PATTERN: &str = "^[A-Za-z0-9_-]{1,64}$";

/// A vector as the API takes it: 1..=`MAX_DIM` finite components of at most `MAX_COMPONENT`.
fn vector() -> Value {
    json!({
        "type": "array",
        "minItems": 1,
        "maxItems": MAX_DIM,
        "items": {"type": "number", "minimum": -f64::from(MAX_COMPONENT), "maximum": f64::from(MAX_COMPONENT)},
        "description": "As many components as the collection's dimension (a vector of another \
                        length is refused with 422 `dimension_mismatch`)."
    })
}

/// A point id: any unsigned 64-bit integer.
fn id() -> Value {
    json!({"type": "integer", "minimum": 0, "maximum": u64::MAX})
}

/// Any JSON value (a point's payload), absent or null when the point has none.
fn payload() -> Value {
    json!({"description": "Any JSON value, stored and returned as given; null when the point has none."})
}

fn set(spec: &mut Value, pointer: &str, value: Value) {
    match spec.pointer_mut(pointer) {
        Some(slot) => *slot = value,
        None => panic!("the API document has no {pointer}"),
    }
}

fn bound(spec: &mut Value, pointer: &str, bounds: Value) {
    let Some(Value::Object(schema)) = spec.pointer_mut(pointer) else {
        panic!("the API document has no schema at {pointer}")
    };
    schema.extend(bounds.as_object().expect("bounds are an object").clone());
}

fn unrequire(spec: &mut Value, schema: &str, field: &str) {
    if let Some(Value::Array(required)) =
        spec.pointer_mut(&format!("/components/schemas/{schema}/required"))
    {
        required.retain(|f| f != field);
    }
}

/// Writes the enforced bounds and the answers every route may give into `spec`
/// (`max_batch`: the configured points per upsert or delete).
pub fn state_bounds(spec: &mut Value, max_batch: usize) {
    let s = "/components/schemas";
    bound(
        spec,
        &format!("{s}/CreateCollection/properties/name"),
        json!({"pattern": NAME_PATTERN, "minLength": 1, "maxLength": 64}),
    );
    bound(
        spec,
        &format!("{s}/CreateCollection/properties/dim"),
        json!({"minimum": 1, "maximum": MAX_DIM}),
    );
    bound(
        spec,
        &format!("{s}/CreateCollection/properties/m"),
        json!({"minimum": M_RANGE.start(), "maximum": M_RANGE.end()}),
    );
    bound(
        spec,
        &format!("{s}/CreateCollection/properties/ef_construction"),
        json!({"minimum": 1, "maximum": MAX_EF_CONSTRUCTION}),
    );
    set(
        spec,
        &format!("{s}/CreateCollection/properties/metric"),
        json!({"type": "string", "enum": ["cosine", "l2", "dot"]}),
    );
    set(spec, &format!("{s}/PointIn/properties/id"), id());
    set(spec, &format!("{s}/PointIn/properties/vector"), vector());
    set(spec, &format!("{s}/PointIn/properties/payload"), payload());
    unrequire(spec, "PointIn", "payload");
    set(spec, &format!("{s}/PointOut/properties/payload"), payload());
    unrequire(spec, "PointOut", "payload");
    set(
        spec,
        &format!("{s}/SearchHit/properties/payload"),
        payload(),
    );
    bound(
        spec,
        &format!("{s}/UpsertPoints/properties/points"),
        json!({"maxItems": max_batch}),
    );
    bound(
        spec,
        &format!("{s}/DeletePoints/properties/ids"),
        json!({"maxItems": max_batch, "items": id()}),
    );
    set(
        spec,
        &format!("{s}/SearchRequest/properties/vector"),
        vector(),
    );
    // A text has something to embed (not only whitespace) and is at most the limit's bytes;
    // a search carries exactly one of `vector` and `text`.
    set(
        spec,
        &format!("{s}/SearchRequest/properties/text"),
        json!({
            "type": "string",
            "minLength": 1,
            "maxLength": tiervec_shared::query::MAX_TEXT_CHARS,
            "pattern": "\\S",
            "description": "The query as text, embedded by the collection's model (cut at 256 tokens)"
        }),
    );
    bound(
        spec,
        &format!("{s}/SearchRequest"),
        json!({"oneOf": [{"required": ["vector"]}, {"required": ["text"]}]}),
    );
    bound(
        spec,
        &format!("{s}/SearchRequest/properties/k"),
        json!({"minimum": 1, "maximum": MAX_K}),
    );
    bound(
        spec,
        &format!("{s}/SearchRequest/properties/ef"),
        json!({"minimum": 0, "maximum": MAX_EF}),
    );
    // An LSN, like an id, is any unsigned 64-bit integer (utoipa would say int64).
    set(
        spec,
        &format!("{s}/SearchRequest/properties/after_lsn"),
        json!({"type": ["integer", "null"], "minimum": 0, "maximum": u64::MAX,
               "description": "Answer once this node applied the collection's writes through this LSN (waits up to 2 s, else 503 `not_caught_up`)."}),
    );
    bound(
        spec,
        &format!("{s}/SearchRequest/properties/after_shards"),
        json!({"maxItems": MAX_SHARDS}),
    );
    bound(
        spec,
        &format!("{s}/ShardPosition/properties/shard"),
        json!({"minimum": 0, "maximum": MAX_SHARDS - 1}),
    );
    set(
        spec,
        &format!("{s}/ShardPosition/properties/lsn"),
        json!({"type": "integer", "minimum": 0, "maximum": u64::MAX}),
    );
    bound(
        spec,
        &format!("{s}/CreateCollection/properties/shards"),
        json!({"minimum": 1, "maximum": MAX_SHARDS}),
    );
    bound(
        spec,
        &format!("{s}/SearchRequest/properties/max_distance"),
        json!({"minimum": -f32::MAX, "maximum": f32::MAX}),
    );
    bound(
        spec,
        &format!("{s}/BatchSearchRequest/properties/searches"),
        json!({"maxItems": MAX_BATCH_SEARCHES}),
    );

    let paths = spec
        .pointer_mut("/paths")
        .and_then(Value::as_object_mut)
        .expect("the API document has paths");
    for (path, item) in paths.iter_mut() {
        let Some(item) = item.as_object_mut() else {
            continue;
        };
        for (_, operation) in item.iter_mut() {
            let Some(operation) = operation.as_object_mut() else {
                continue;
            };
            for parameter in operation
                .get_mut("parameters")
                .and_then(Value::as_array_mut)
                .into_iter()
                .flatten()
            {
                let schema = match parameter.get("name").and_then(Value::as_str) {
                    Some("name") => {
                        json!({"type": "string", "minLength": 1, "maxLength": 64})
                    }
                    Some("id") => id(),
                    Some("n") => json!({"type": "integer", "minimum": 0, "maximum": MAX_HOT_IDS}),
                    Some("max_vectors") => {
                        json!({"type": "integer", "minimum": 1, "maximum": MAX_SNAPSHOT_VECTORS})
                    }
                    _ => continue,
                };
                parameter["schema"] = schema;
            }
            if !path.starts_with("/v1/") {
                continue;
            }
            let has_body = operation.contains_key("requestBody");
            let takes_vectors = path.ends_with("/points") || path.contains("/search");
            let responses = operation
                .entry("responses")
                .or_insert_with(|| json!({}))
                .as_object_mut()
                .expect("responses are an object");
            let error = |description: &str| {
                json!({
                    "description": description,
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
                })
            };
            let mut answers = vec![
                (
                    "400",
                    "`invalid_json` (a path, query or body that does not parse), `invalid_request` (a value out of its bounds, or a search with both or neither of `vector` and `text`), `invalid_text` (a text of whitespace only, or over 4,096 characters)",
                ),
                (
                    "401",
                    "`unauthorized`: API keys are configured and none (or an unknown one) was presented",
                ),
                ("403", "`forbidden`: the key's role may not do this"),
                (
                    "503",
                    "`not_ready` (recovering), `overloaded` (at `http.max_concurrent_requests`), `deadline_exceeded` (past `http.request_timeout_ms`)",
                ),
            ];
            if has_body {
                answers.push(("413", "`payload_too_large`: the body is over `max_body_bytes`, a payload over 1 MiB, or one write's log entry over 64 MiB"));
            }
            if path.contains("/search") {
                answers.push(("409", "`model_mismatch`: the collection was made with another embedding model than this cloud runs"));
            }
            if takes_vectors {
                answers.push(("422", "`dimension_mismatch` (a vector's length is not the collection's dimension), `answer_too_large` (the hits asked for, with their payloads, exceed the 16 MiB an answer may carry), `no_model` (a text for a collection, or a cloud, without an embedding model)"));
            }
            for (status, description) in answers {
                responses
                    .entry(status)
                    .or_insert_with(|| error(description));
            }
        }
    }
}
