//! The edge node's query path: search the local snapshot; if the answer is not confident
//! (`tiervec_shared::confidence`), ask the cloud over the QUIC link within a deadline; if the
//! cloud cannot answer in time or the link is down, return the local answer marked `Degraded`
//! — never an error for the application. The link reconnects in the background with backoff.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use tiervec_shared::confidence::{Decision, decide};
use tiervec_shared::protocol::frame::Query;
use tracing::{debug, info_span, warn};

use crate::index::{EdgeError, EdgeIndex};
use crate::link::{CloudLink, LinkConfig};

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

/// One hit of an edge answer (payload text only for hits from the local snapshot).
#[derive(Clone, Debug, PartialEq)]
pub struct NodeHit {
    pub id: u64,
    pub distance: f32,
    pub lsn: u64,
    pub payload: Option<String>,
}

/// Knobs of the query path.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Collection the snapshot caches (the name the cloud knows).
    pub collection: String,
    /// Threshold on the k-th local distance (see `docs/distances.md`).
    pub max_distance: f32,
    /// How long to wait for the cloud.
    pub deadline: Duration,
    /// `ef` asked of the cloud.
    pub cloud_ef: u32,
    /// Reconnection backoff: first wait and cap.
    pub backoff: (Duration, Duration),
}

/// An edge: its snapshot, and its (possibly absent) link to the cloud.
pub struct EdgeNode {
    index: EdgeIndex,
    config: NodeConfig,
    link: Arc<ArcSwapOption<CloudLink>>,
}

impl EdgeNode {
    /// Starts the node; with a link configuration, connects in the background and keeps
    /// reconnecting with exponential backoff whenever the connection is lost.
    pub fn start(index: EdgeIndex, config: NodeConfig, link: Option<LinkConfig>) -> EdgeNode {
        let slot: Arc<ArcSwapOption<CloudLink>> = Arc::new(ArcSwapOption::empty());
        if let Some(link_config) = link {
            tokio::spawn(keep_connected(link_config, slot.clone(), config.backoff));
        }
        EdgeNode {
            index,
            config,
            link: slot,
        }
    }

    /// Whether the link to the cloud is up.
    pub fn connected(&self) -> bool {
        self.link.load().as_ref().is_some_and(|l| !l.is_closed())
    }

    pub fn index(&self) -> &EdgeIndex {
        &self.index
    }

    /// Answers a search: local when confident, else the cloud's, else local marked degraded.
    pub async fn search(
        &self,
        query: &[f32],
        k: usize,
        ef: usize,
    ) -> Result<(Vec<NodeHit>, Source), EdgeError> {
        let span = info_span!("edge_query", k, ef);
        let _entered = span.enter();
        let local: Vec<NodeHit> = self
            .index
            .search(query, k, ef)?
            .into_iter()
            .map(|h| NodeHit {
                id: h.id,
                distance: h.distance,
                lsn: h.lsn,
                payload: h.payload.map(str::to_owned),
            })
            .collect();
        let distances: Vec<f32> = local.iter().map(|h| h.distance).collect();
        if decide(&distances, k, self.config.max_distance) == Decision::Local {
            return Ok((local, Source::Local));
        }
        let Some(link) = self.link.load_full() else {
            return Ok((local, Source::Degraded));
        };
        let Some(collection) = link
            .collections()
            .iter()
            .find(|c| c.name == self.config.collection)
        else {
            return Ok((local, Source::Degraded));
        };
        let q = Query {
            query_id: 0,
            collection: collection.name.clone(),
            collection_id: collection.id,
            vector: query.to_vec(),
            k: k as u32,
            ef: self.config.cloud_ef.max(k as u32),
            span_id: span.id().map_or(0, |id| id.into_u64()),
            shadow: false,
        };
        match link.query(q, self.config.deadline).await {
            Ok(answer) => Ok((
                answer
                    .hits
                    .iter()
                    .map(|h| NodeHit {
                        id: h.id,
                        distance: h.distance,
                        lsn: h.lsn,
                        payload: None,
                    })
                    .collect(),
                Source::Cloud,
            )),
            Err(reason) => {
                debug!(
                    ?reason,
                    "cloud did not answer; answering locally (degraded)"
                );
                Ok((local, Source::Degraded))
            }
        }
    }
}

/// Connects, and reconnects after every loss, waiting `backoff.0` doubling up to `backoff.1`.
async fn keep_connected(
    config: LinkConfig,
    slot: Arc<ArcSwapOption<CloudLink>>,
    backoff: (Duration, Duration),
) {
    let mut wait = backoff.0;
    loop {
        match CloudLink::connect(&config).await {
            Ok(link) => {
                let link = Arc::new(link);
                slot.store(Some(link.clone()));
                wait = backoff.0;
                link.closed().await;
                slot.store(None);
                warn!("link to the cloud lost; reconnecting");
            }
            Err(e) => debug!(error = %e, "cannot connect to the cloud yet"),
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(backoff.1);
    }
}
