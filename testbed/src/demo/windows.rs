//! The windows the demo measures after the replay: how long an edge keeps returning a vector
//! deleted in the cloud (staleness), and how long an edge that lost its cache files takes to
//! be restored whole by the cloud.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::replay::Outcome;
use crate::dataset::Dataset;
use crate::deployment::{self, Edge, EdgeSpec, hits_of};
use crate::measure::prom::Exposition;
use crate::measure::{K, Latencies};

/// What restoring a lost cache took (`restore_window`).
#[derive(Debug, Clone, Serialize)]
pub struct RestoreFigures {
    /// Vectors the edge held when it was killed.
    pub held_before: usize,
    /// Vectors in the snapshot the cloud streamed (the held ones the cloud had not deleted
    /// since, within the budget).
    pub restored_vectors: usize,
    pub snapshot_bytes: u64,
    /// From the restart of the edge process to the snapshot installed.
    pub seconds: f64,
}

/// Kills `edge` (SIGKILL), notes what its cache held, removes its snapshot and delta log as if
/// the disk had been lost, and starts it again: the cloud, which logged what the edge held,
/// restores the cache whole by a streamed snapshot. Waits (≤ 120 s) for the edge to report the
/// install, then reads the file.
pub async fn restore_window(
    http: &reqwest::Client,
    cloud: &deployment::Cloud,
    edge: &mut Edge,
    spec: &EdgeSpec<'_>,
) -> anyhow::Result<RestoreFigures> {
    use tiervec_edge::cache::{CacheConfig, EdgeCache};
    edge.process.kill();
    let files = CacheConfig::beside(spec.snapshot, spec.budget_bytes);
    let held_before = EdgeCache::open(files.clone())?.0.usage().0;
    for path in [&files.snapshot, &files.deltas] {
        if path.exists() {
            std::fs::remove_file(path)?;
        }
    }
    let restarted = Instant::now();
    *edge = deployment::start_edge(cloud, spec)?;
    edge.wait_linked(http).await?;
    loop {
        edge.process.check_alive()?;
        let metrics = Exposition::parse(&edge.metrics(http).await?);
        if metrics.counter("tiervec_edge_snapshots_installed_total") >= 1.0 {
            break;
        }
        anyhow::ensure!(
            restarted.elapsed() < Duration::from_secs(120),
            "edge-0 was not restored within 120 s of its restart"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seconds = restarted.elapsed().as_secs_f64();
    let index = tiervec_edge::EdgeIndex::open(spec.snapshot)?;
    Ok(RestoreFigures {
        held_before,
        restored_vectors: index.view().len(),
        snapshot_bytes: std::fs::metadata(spec.snapshot)?.len(),
        seconds,
    })
}

/// Deletes, one at a time, vectors the edges answered with locally, and polls each edge's
/// local answer (`local_only`) with the deleted vector itself until it is gone: the time from
/// the cloud acknowledging the delete to the edge no longer returning it, one sample per delete
/// of a vector the edge still held.
pub async fn staleness_window(
    http: &reqwest::Client,
    cloud_base: &str,
    edges: &[Edge],
    ds: &Dataset,
    outcomes: &[Vec<Outcome>],
    deletes: usize,
) -> anyhow::Result<Latencies> {
    let mut victims: Vec<(usize, u64)> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    // Round-robin over the edges, most recent local answers first.
    let mut cursors: Vec<_> = outcomes.iter().map(|o| o.iter().rev()).collect();
    while victims.len() < deletes {
        let mut progressed = false;
        for (e, cursor) in cursors.iter_mut().enumerate() {
            if let Some(id) = cursor
                .by_ref()
                .find_map(|o| o.held.filter(|id| seen.insert(*id)))
            {
                victims.push((e, id));
                progressed = true;
            }
        }
        if !progressed {
            break;
        }
    }
    victims.truncate(deletes);
    let local_ids = |v: serde_json::Value| -> anyhow::Result<Vec<u64>> {
        Ok(hits_of(&v)?.into_iter().map(|(id, _)| id).collect())
    };
    let mut windows = Latencies::new();
    for (e, id) in victims {
        let url = edges[e].search_url();
        let mut vector = ds.base.row(id as usize).to_vec();
        tiervec_shared::metric::normalise(&mut vector);
        let probe = serde_json::json!({"vector": vector, "k": K, "local_only": true});
        let ask = || async {
            let v: serde_json::Value = http.post(&url).json(&probe).send().await?.json().await?;
            local_ids(v)
        };
        if !ask().await?.contains(&id) {
            continue; // evicted since: nothing to invalidate
        }
        // A cluster node may answer 503 while JetStream elects leaders: asked again.
        let asked = Instant::now();
        loop {
            let r = http
                .post(format!(
                    "{cloud_base}/v1/collections/{}/points/delete",
                    deployment::COLLECTION
                ))
                .json(&serde_json::json!({"ids": [id]}))
                .send()
                .await?;
            if r.status() != reqwest::StatusCode::SERVICE_UNAVAILABLE
                || asked.elapsed() > Duration::from_secs(30)
            {
                r.error_for_status()?;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let acknowledged = Instant::now();
        loop {
            if !ask().await?.contains(&id) {
                windows.record(acknowledged.elapsed());
                break;
            }
            anyhow::ensure!(
                acknowledged.elapsed() < Duration::from_secs(10),
                "edge-{e} still returns deleted vector {id} 10 s after the delete"
            );
        }
    }
    Ok(windows)
}
