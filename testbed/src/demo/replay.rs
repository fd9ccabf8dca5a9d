//! The replay of a trace through the edges' HTTP endpoints, as applications would send it, and
//! what is known about each request afterwards.

use std::time::{Duration, Instant};

use indicatif::ProgressBar;

use super::calibration::LocalAnswer;
use crate::deployment::hits_of;
use crate::measure::{K, recall_at_10};
use crate::trace::{Request, Truth};

/// Everything known about one request after the replay.
pub struct Outcome {
    /// `local`, `cloud`, `degraded`, or `error` (the edge answered with an error status or not
    /// at all).
    pub source: &'static str,
    /// When the request was sent.
    pub at: Instant,
    pub latency: Duration,
    pub recall: f64,
    /// The edge's local answer alone, asked just before (the sweep's input), on sampled
    /// requests.
    pub probe: Option<LocalAnswer>,
    /// The nearest hit of a local answer (a vector the edge held).
    pub held: Option<u64>,
    /// The edge certified the answer as the exact top-k.
    pub certified: bool,
    /// The answer equals the exact top-10 (ids, ties by distance aside; distances within 1e-5).
    pub exact: bool,
}

/// Replays each edge's `requests` through its URL: per edge a closed loop of HTTP requests,
/// the edges concurrently; before every `probe_every`-th request the edge's local answer
/// alone (`local_only`, no side effect) is asked too. A request answered with an error is
/// recorded as one (source `error`) and the replay goes on.
pub async fn replay(
    edge_urls: &[String],
    requests: &[Vec<Request>],
    truth: &[Vec<Truth>],
    probe_every: usize,
    bar: &ProgressBar,
) -> anyhow::Result<Vec<Vec<Outcome>>> {
    let loops = edge_urls
        .iter()
        .zip(requests)
        .zip(truth)
        .map(|((url, reqs), truths)| {
            let http = reqwest::Client::new();
            let bar = bar.clone();
            async move {
                let post = |body: serde_json::Value| {
                    let http = http.clone();
                    async move {
                        let sent = Instant::now();
                        let response = http
                            .post(url.as_str())
                            .header("content-type", "application/json")
                            .body(serde_json::to_vec(&body)?)
                            .send()
                            .await?;
                        let status = response.status();
                        let bytes = response.bytes().await?;
                        let latency = sent.elapsed();
                        anyhow::ensure!(
                            status.is_success(),
                            "{url} answered {status}: {}",
                            String::from_utf8_lossy(&bytes)
                        );
                        let v: serde_json::Value = serde_json::from_slice(&bytes)?;
                        anyhow::Ok((v, latency))
                    }
                };
                let mut outcomes = Vec::with_capacity(reqs.len());
                for (i, (r, t)) in reqs.iter().zip(truths).enumerate() {
                    // What the cache alone would answer, just before (no side effect).
                    let probe = if i % probe_every == 0 {
                        let (p, _) = post(
                            serde_json::json!({"vector": r.vector, "k": K, "local_only": true}),
                        )
                        .await?;
                        let signal =
                            |name: &str| p[name].as_f64().map_or(f32::INFINITY, |d| d as f32);
                        Some(LocalAnswer {
                            kth_distance: signal("kth_distance"),
                            anchor_distance: signal("anchor_distance"),
                            recall: recall_at_10(&hits_of(&p)?, &t.ids, &t.distances),
                        })
                    } else {
                        None
                    };
                    let at = Instant::now();
                    let (v, latency) =
                        match post(serde_json::json!({"vector": r.vector, "k": K})).await {
                            Ok(answered) => answered,
                            Err(e) => {
                                tracing::warn!(url, error = %e, "a request got an error");
                                outcomes.push(Outcome {
                                    source: "error",
                                    at,
                                    latency: at.elapsed(),
                                    recall: 0.0,
                                    probe,
                                    held: None,
                                    certified: false,
                                    exact: false,
                                });
                                bar.inc(1);
                                continue;
                            }
                        };
                    let source = match v["source"].as_str() {
                        Some("local") => "local",
                        Some("cloud") => "cloud",
                        Some("degraded") => "degraded",
                        other => anyhow::bail!("unknown source {other:?}"),
                    };
                    let hits = hits_of(&v)?;
                    let recall = recall_at_10(&hits, &t.ids, &t.distances);
                    outcomes.push(Outcome {
                        source,
                        at,
                        latency,
                        recall,
                        certified: v["certified"].as_bool() == Some(true),
                        exact: recall >= 1.0
                            && hits.len() == t.distances.len()
                            && hits
                                .iter()
                                .zip(&t.distances)
                                .all(|(h, d)| (h.1 - d).abs() <= 1e-5),
                        probe,
                        held: (source == "local")
                            .then(|| hits.first().map(|h| h.0))
                            .flatten(),
                    });
                    bar.inc(1);
                }
                anyhow::Ok(outcomes)
            }
        });
    futures::future::try_join_all(loops).await
}
