//! Queries of a collection whose shards are spread over cluster nodes: which nodes a query
//! asks ([`crate::storage::plan_fan_out`]), the requests and answers between nodes, the exact
//! merge of their top-k, and the answers that name the shards no live node could answer.
//!
//! A node answers for the shards it holds caught up and filters its hits to them, so a shard
//! it is still catching up with never contributes stale points; the asking node merges by
//! distance, keeps each id once, and asks another replica for the shards an answer did not
//! cover (one more round, within a second deadline). Requests and answers are JSON (f32s
//! round-trip exactly).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use crate::collection::{Collection, Engine, Hit, Point, SearchParams};
use crate::storage::{ClusterError, DurableLog, LogName, Peers, plan_fan_out, shard_of};
use tiervec_shared::query::MAX_K;

/// A request of one node to another.
#[derive(Debug, Serialize, Deserialize)]
pub enum PeerRequest {
    /// The top `k` of the asked shards (the answering node may add others it holds).
    Search {
        collection: [u8; 16],
        vector: Vec<f32>,
        k: usize,
        ef: usize,
        exact: bool,
        max_distance: Option<f32>,
        /// (shard, position) to have applied before answering.
        after: Vec<(u32, u64)>,
        shards: Vec<u32>,
        /// How long the answering node may wait for `after`.
        wait_ms: u64,
        /// Whether hits carry their payloads.
        payloads: bool,
    },
    /// Points by id (their vectors only when `vectors`; LSNs and payloads always).
    Points {
        collection: [u8; 16],
        ids: Vec<u64>,
        vectors: bool,
    },
}

/// A hit as it travels between nodes.
#[derive(Debug, Serialize, Deserialize)]
pub struct PeerHit {
    pub id: u64,
    pub distance: f32,
    pub lsn: u64,
    pub payload: Option<String>,
}

/// A point as it travels between nodes: vector (empty when not asked for), LSN, payload.
pub type PeerPoint = (Vec<f32>, u64, Option<String>);

/// The answer to a [`PeerRequest`].
#[derive(Debug, Serialize, Deserialize)]
pub enum PeerAnswer {
    /// Hits from the shards in `ready` (those the answering node holds caught up).
    Hits {
        hits: Vec<PeerHit>,
        ready: Vec<u32>,
        exact: bool,
    },
    /// Per id asked, in order, the point (vector, LSN, payload) if it exists; answered only
    /// for the ids of the shards in `ready` (those held caught up here).
    Points {
        ready: Vec<u32>,
        points: Vec<Option<PeerPoint>>,
    },
    /// The request could not be answered here (an unknown collection, a shard not caught up).
    Refused(String),
}

/// A search answer from the whole cluster.
#[derive(Debug)]
pub struct Answer {
    pub hits: Vec<Hit>,
    pub engine: Engine,
    /// Shards no live node answered: the hits are the nearest of the other shards only.
    pub missing_shards: Vec<u32>,
}

/// Why a fan-out failed as a whole.
#[derive(Debug, thiserror::Error)]
pub enum FanOutError {
    #[error(
        "shard {shard} of the collection has not applied its writes through position {position} within {waited:?}; retry, or ask the node that acknowledged the write"
    )]
    NotCaughtUp {
        shard: u32,
        position: u64,
        waited: Duration,
    },
    #[error(
        "no live node holds shard {shard} of the collection (point {id}); retry once its replicas are back"
    )]
    ShardUnavailable { shard: u32, id: u64 },
    #[error(transparent)]
    Query(#[from] tiervec_shared::query::QueryError),
}

/// Spreads queries over the replicas that cover equally many shards.
static SPREAD: AtomicU64 = AtomicU64::new(0);

/// Searches collection `c` on this node and the nodes holding its other shards, and merges.
/// `after` names (shard, position) pairs to have applied first, waiting up to `catch_up`;
/// each node asked has `shard_timeout` to answer; other nodes' hits carry their payloads only
/// `with_payload`.
#[allow(clippy::too_many_arguments)]
pub fn search(
    log: &dyn DurableLog,
    peers: &dyn Peers,
    c: &Collection,
    query: &[f32],
    params: &SearchParams,
    after: &[(u32, u64)],
    catch_up: Duration,
    shard_timeout: Duration,
    with_payload: bool,
) -> Result<Answer, FanOutError> {
    let id = c.info.id.0;
    let shards = peers.shards(id);
    let local = peers.ready_here(id);
    let started = Instant::now();
    let spread = SPREAD.fetch_add(1, Ordering::Relaxed);
    let mut plan = plan_fan_out(shards, &local, &peers.candidates(id), &[], spread);
    let request = |asked: &[u32]| {
        serde_json::to_vec(&PeerRequest::Search {
            collection: id,
            vector: query.to_vec(),
            k: params.k,
            ef: params.ef,
            exact: params.exact,
            max_distance: params.max_distance,
            after: after
                .iter()
                .filter(|(s, _)| asked.contains(s))
                .copied()
                .collect(),
            shards: asked.to_vec(),
            wait_ms: catch_up.as_millis() as u64,
            payloads: with_payload,
        })
        .expect("a request serialises")
    };
    // The other nodes work while this one searches its own shards.
    let waits = if after.is_empty() {
        Duration::ZERO
    } else {
        catch_up
    };
    let mut deadline = started + waits + shard_timeout;
    let mut pending: Vec<(String, Vec<u32>, _)> = plan
        .remote
        .drain(..)
        .map(|(node, asked)| {
            let rx = peers.ask(&node, request(&asked), deadline);
            (node, asked, rx)
        })
        .collect();
    let mut hits: Vec<Hit> = Vec::new();
    let mut all_exact = true;
    let mut covered: Vec<u32> = Vec::new();
    if !plan.local.is_empty() {
        wait_local(log, id, &plan.local, after, catch_up)?;
        let (local_hits, engine) = search_ready(c, query, params, shards, &local)?;
        all_exact &= engine == Engine::Exact;
        hits.extend(local_hits);
        covered.extend(&plan.local);
    }
    let mut failed: Vec<String> = Vec::new();
    for round in 0..2 {
        for (node, asked, rx) in pending.drain(..) {
            let left = deadline.saturating_duration_since(Instant::now());
            let answer = rx
                .recv_timeout(left)
                .map_err(|_| {
                    ClusterError::Unavailable(format!("node `{node}` did not answer in time"))
                })
                .and_then(|r| r)
                .and_then(|body| {
                    serde_json::from_slice::<PeerAnswer>(&body)
                        .map_err(|e| ClusterError::Unavailable(format!("node `{node}`: {e}")))
                });
            match answer {
                Ok(PeerAnswer::Hits {
                    hits: theirs,
                    ready,
                    exact,
                }) => {
                    all_exact &= exact;
                    hits.extend(theirs.into_iter().filter_map(|h| {
                        ready.contains(&shard_of(h.id, shards)).then(|| Hit {
                            id: h.id,
                            distance: h.distance,
                            lsn: h.lsn,
                            payload: h.payload.map(Arc::from),
                        })
                    }));
                    covered.extend(ready.iter().filter(|s| asked.contains(s)));
                    if asked.iter().any(|s| !ready.contains(s)) {
                        failed.push(node);
                    }
                }
                Ok(other) => {
                    debug!(node, ?other, "a node refused a search");
                    failed.push(node);
                }
                Err(e) => {
                    debug!(node, error = %e, "a node did not answer a search");
                    failed.push(node);
                }
            }
        }
        let uncovered: Vec<u32> = (0..shards).filter(|s| !covered.contains(s)).collect();
        if uncovered.is_empty() || round == 1 {
            break;
        }
        // Once more, for what is left, at other replicas.
        let retry = plan_fan_out(shards, &covered, &peers.candidates(id), &failed, spread);
        // The second round's own deadline, which its answers are awaited against.
        deadline = Instant::now() + shard_timeout;
        pending = retry
            .remote
            .into_iter()
            .map(|(node, asked)| {
                let rx = peers.ask(&node, request(&asked), deadline);
                (node, asked, rx)
            })
            .collect();
        if pending.is_empty() {
            break;
        }
    }
    let missing_shards: Vec<u32> = (0..shards).filter(|s| !covered.contains(s)).collect();
    if !missing_shards.is_empty() {
        warn!(collection = %c.info.name, ?missing_shards, "partial answer: no live replica answered these shards");
        metrics::counter!("tiervec_cluster_partial_answers_total", "collection" => c.info.name.clone())
            .increment(1);
    }
    metrics::histogram!("tiervec_cluster_fan_out_seconds").record(started.elapsed().as_secs_f64());
    Ok(Answer {
        hits: merge(hits, params.k),
        engine: if all_exact {
            Engine::Exact
        } else {
            Engine::Graph
        },
        missing_shards,
    })
}

/// Waits until this node applied the `after` positions of the `shards` it answers itself.
fn wait_local(
    log: &dyn DurableLog,
    id: [u8; 16],
    shards: &[u32],
    after: &[(u32, u64)],
    within: Duration,
) -> Result<(), FanOutError> {
    for &(shard, position) in after.iter().filter(|(s, _)| shards.contains(s)) {
        if !log.wait_applied(LogName::Shard(id, shard), position, within) {
            return Err(FanOutError::NotCaughtUp {
                shard,
                position,
                waited: within,
            });
        }
    }
    Ok(())
}

/// The nearest `params.k` points of `c` in the shards this node holds caught up (`ready`, of
/// `shards`). The collection may also hold points of shards it is still catching up with (stale;
/// another replica answers for them) or releasing; those would crowd its top-k and, filtered
/// out after it, leave fewer and farther hits than the ready shards have — an answer, an
/// anchor's members or a certificate short of true neighbours. So the search asks for more
/// until `k` of its hits are of ready shards, or it returned all it could.
fn search_ready(
    c: &Collection,
    query: &[f32],
    params: &SearchParams,
    shards: u32,
    ready: &[u32],
) -> Result<(Vec<Hit>, Engine), tiervec_shared::query::QueryError> {
    let mut asked = *params;
    loop {
        let (hits, engine) = c.search(query, &asked)?;
        let returned = hits.len();
        let mut kept: Vec<Hit> = hits
            .into_iter()
            .filter(|h| ready.contains(&shard_of(h.id, shards)))
            .collect();
        if kept.len() >= params.k || returned < asked.k || asked.k >= MAX_K {
            kept.truncate(params.k);
            return Ok((kept, engine));
        }
        asked.k = (asked.k * 2).min(MAX_K);
        asked.ef = asked.ef.max(asked.k);
    }
}

/// The `k` nearest of several answers, each id once, nearest first (ties by id).
pub fn merge(mut hits: Vec<Hit>, k: usize) -> Vec<Hit> {
    hits.sort_by(|a, b| a.distance.total_cmp(&b.distance).then(a.id.cmp(&b.id)));
    let mut seen = std::collections::HashSet::with_capacity(hits.len());
    hits.retain(|h| seen.insert(h.id));
    hits.truncate(k);
    hits
}

/// The most ids one request between nodes names: with vectors an answer stays well under
/// NATS's default 1 MB payload (a 384-d vector is ~4.6 KB of JSON); LSNs alone are small.
const POINTS_PER_REQUEST_WITH_VECTORS: usize = 128;
const POINTS_PER_REQUEST: usize = 8_192;

/// Points `ids` of `c`, in order (`None`: no such point), each from this node when it holds
/// the id's shard, else from a node that does: every node asked at once, in batches, and the
/// shards a node did not answer for asked once more at other replicas. Vectors travel only
/// when `vectors` (otherwise they are empty: LSNs for reconciling a cache, say).
pub fn get_many(
    peers: &dyn Peers,
    c: &Collection,
    ids: &[u64],
    vectors: bool,
    shard_timeout: Duration,
) -> Result<Vec<Option<Point>>, FanOutError> {
    let collection = c.info.id.0;
    let shards = peers.shards(collection);
    let local = peers.ready_here(collection);
    let strip = |mut p: Point| {
        if !vectors {
            p.vector = Vec::new();
        }
        p
    };
    let mut found: Vec<Option<Option<Point>>> = vec![None; ids.len()];
    // Per shard not held here, the indexes of its ids.
    let mut wanted: std::collections::BTreeMap<u32, Vec<usize>> = Default::default();
    for (i, &id) in ids.iter().enumerate() {
        let shard = shard_of(id, shards);
        if local.contains(&shard) {
            found[i] = Some(c.get(id).map(strip));
        } else {
            wanted.entry(shard).or_default().push(i);
        }
    }
    let batch = if vectors {
        POINTS_PER_REQUEST_WITH_VECTORS
    } else {
        POINTS_PER_REQUEST
    };
    let spread = SPREAD.fetch_add(1, Ordering::Relaxed);
    let mut failed: Vec<String> = Vec::new();
    for _round in 0..2 {
        if wanted.is_empty() {
            break;
        }
        let settled: Vec<u32> = (0..shards).filter(|s| !wanted.contains_key(s)).collect();
        let plan = plan_fan_out(
            shards,
            &settled,
            &peers.candidates(collection),
            &failed,
            spread,
        );
        let deadline = Instant::now() + shard_timeout;
        let mut asked = Vec::new();
        for (node, node_shards) in plan.remote {
            let indexes: Vec<usize> = node_shards
                .iter()
                .flat_map(|s| wanted.get(s).into_iter().flatten().copied())
                .collect();
            for chunk in indexes.chunks(batch) {
                let body = serde_json::to_vec(&PeerRequest::Points {
                    collection,
                    ids: chunk.iter().map(|&i| ids[i]).collect(),
                    vectors,
                })
                .expect("a request serialises");
                let rx = peers.ask(&node, body, deadline);
                asked.push((node.clone(), chunk.to_vec(), rx));
            }
        }
        for (node, chunk, rx) in asked {
            let left = deadline.saturating_duration_since(Instant::now());
            let answer = rx
                .recv_timeout(left)
                .ok()
                .and_then(Result::ok)
                .and_then(|b| serde_json::from_slice::<PeerAnswer>(&b).ok());
            match answer {
                Some(PeerAnswer::Points { ready, points }) if points.len() == chunk.len() => {
                    for (&i, point) in chunk.iter().zip(points) {
                        if ready.contains(&shard_of(ids[i], shards)) {
                            found[i] = Some(point.map(|(vector, lsn, payload)| Point {
                                id: ids[i],
                                vector,
                                lsn,
                                payload: payload.map(Arc::from),
                            }));
                        }
                    }
                }
                other => {
                    debug!(node, ?other, "a node did not answer a get");
                    failed.push(node);
                }
            }
        }
        wanted.retain(|_, indexes| {
            indexes.retain(|&i| found[i].is_none());
            !indexes.is_empty()
        });
    }
    if let Some((&shard, indexes)) = wanted.iter().next() {
        return Err(FanOutError::ShardUnavailable {
            shard,
            id: ids[indexes[0]],
        });
    }
    Ok(found.into_iter().map(Option::flatten).collect())
}

/// Gets point `id` of `c` from this node or a node holding its shard.
pub fn get(
    peers: &dyn Peers,
    c: &Collection,
    id: u64,
    shard_timeout: Duration,
) -> Result<Option<Point>, FanOutError> {
    Ok(get_many(peers, c, &[id], true, shard_timeout)?
        .pop()
        .flatten())
}

/// Answers another node's request from what this node holds (never asking further).
pub fn answer(
    body: &[u8],
    log: &dyn DurableLog,
    peers: &dyn Peers,
    find: impl Fn([u8; 16]) -> Option<Arc<Collection>>,
) -> Vec<u8> {
    let answer = match serde_json::from_slice::<PeerRequest>(body) {
        Err(e) => PeerAnswer::Refused(format!("not a request: {e}")),
        Ok(PeerRequest::Search {
            collection,
            vector,
            k,
            ef,
            exact,
            max_distance,
            after,
            shards: _,
            wait_ms,
            payloads,
        }) => match find(collection) {
            None => PeerAnswer::Refused("no such collection here".into()),
            Some(c) => {
                let ready = peers.ready_here(collection);
                let params = SearchParams {
                    k,
                    ef,
                    exact,
                    max_distance,
                };
                let waited = wait_local(
                    log,
                    collection,
                    &ready,
                    &after,
                    Duration::from_millis(wait_ms.min(10_000)),
                );
                let shards = peers.shards(collection);
                let searched =
                    waited.and_then(|()| Ok(search_ready(&c, &vector, &params, shards, &ready)?));
                match searched {
                    Err(e) => PeerAnswer::Refused(e.to_string()),
                    Ok((hits, engine)) => PeerAnswer::Hits {
                        hits: hits
                            .into_iter()
                            .map(|h| PeerHit {
                                id: h.id,
                                distance: h.distance,
                                lsn: h.lsn,
                                payload: h.payload.filter(|_| payloads).map(|p| p.to_string()),
                            })
                            .collect(),
                        ready,
                        exact: engine == Engine::Exact,
                    },
                }
            }
        },
        Ok(PeerRequest::Points {
            collection,
            ids,
            vectors,
        }) => match find(collection) {
            None => PeerAnswer::Refused("no such collection here".into()),
            Some(_) if ids.len() > POINTS_PER_REQUEST => {
                PeerAnswer::Refused(format!("more than {POINTS_PER_REQUEST} ids"))
            }
            Some(c) => {
                let shards = peers.shards(collection);
                let ready = peers.ready_here(collection);
                let points = ids
                    .iter()
                    .map(|&id| {
                        ready
                            .contains(&shard_of(id, shards))
                            .then(|| c.get(id))
                            .flatten()
                            .map(|p| {
                                let vector = if vectors { p.vector } else { Vec::new() };
                                (vector, p.lsn, p.payload.map(|s| s.to_string()))
                            })
                    })
                    .collect();
                PeerAnswer::Points { ready, points }
            }
        },
    };
    serde_json::to_vec(&answer).expect("an answer serialises")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hit(id: u64, distance: f32) -> Hit {
        Hit {
            id,
            distance,
            lsn: 1,
            payload: None,
        }
    }

    /// Points of a shard still catching up lie nearest the query: the ready shards' own
    /// nearest are still found, exactly as a brute force over them finds them.
    #[test]
    fn a_search_of_ready_shards_is_not_crowded_out_by_the_others() {
        use tiervec_shared::hnsw::HnswParams;
        use tiervec_shared::{CollectionId, Metric};
        let engine = crate::collection::gpu::ExactEngine::start(&Default::default());
        let c = Collection::with_engine(
            crate::collection::CollectionInfo {
                name: "c".into(),
                id: CollectionId([1; 16]),
                dim: 2,
                metric: Metric::L2,
                params: HnswParams::default(),
            },
            engine,
        );
        let shards = 3;
        let ids: Vec<u64> = (0..600).collect();
        // Shard 2's points at distance ~1 of the origin, the others' farther.
        let vectors: Vec<f32> = ids
            .iter()
            .flat_map(|&id| {
                let r = if shard_of(id, shards) == 2 { 1.0 } else { 5.0 } + id as f32 * 1e-3;
                [r, 0.0]
            })
            .collect();
        c.apply_upsert(1, &ids, &vectors, &vec![None; ids.len()]);
        for exact in [true, false] {
            let params = SearchParams {
                k: 10,
                ef: 64,
                exact,
                max_distance: None,
            };
            let (hits, _) = search_ready(&c, &[0.0, 0.0], &params, shards, &[0, 1]).unwrap();
            let mut want: Vec<u64> = ids
                .iter()
                .copied()
                .filter(|&id| shard_of(id, shards) != 2)
                .collect();
            want.truncate(10);
            let got: Vec<u64> = hits.iter().map(|h| h.id).collect();
            assert_eq!(got, want, "exact: {exact}");
        }
    }

    #[test]
    fn answers_merge_into_the_nearest_k_each_id_once() {
        let merged = merge(
            vec![
                hit(3, 0.3),
                hit(1, 0.1),
                hit(2, 0.2),
                hit(1, 0.1),
                hit(4, 0.2),
            ],
            3,
        );
        let ids: Vec<u64> = merged.iter().map(|h| h.id).collect();
        assert_eq!(ids, vec![1, 2, 4]);
        assert!(merge(Vec::new(), 3).is_empty());
    }

    #[test]
    fn requests_and_answers_round_trip_their_floats_exactly() {
        let v = vec![0.1f32, f32::MIN_POSITIVE, -3.402_823_5e38, 1.0 / 3.0];
        let body = serde_json::to_vec(&PeerRequest::Search {
            collection: [1; 16],
            vector: v.clone(),
            k: 10,
            ef: 64,
            exact: false,
            max_distance: None,
            after: vec![(0, 5)],
            shards: vec![0],
            wait_ms: 100,
            payloads: false,
        })
        .unwrap();
        let PeerRequest::Search { vector, .. } = serde_json::from_slice(&body).unwrap() else {
            panic!()
        };
        assert_eq!(
            vector.iter().map(|f| f.to_bits()).collect::<Vec<_>>(),
            v.iter().map(|f| f.to_bits()).collect::<Vec<_>>()
        );
    }
}
