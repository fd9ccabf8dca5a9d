//! `tiervec-edge serve` configuration: a plain struct with defaults, read from TOML.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::link::LinkConfig;
use crate::node::NodeConfig;

/// How to reach the cloud.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudLinkConfig {
    /// The cloud's QUIC address.
    pub addr: SocketAddr,
    /// Name in the cloud's certificate.
    pub server_name: String,
    pub ca_cert: PathBuf,
    /// This edge's certificate and key (its id is the certificate's Common Name).
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EdgeConfig {
    pub name: String,
    /// The cache snapshot (memory-mapped).
    pub snapshot: PathBuf,
    /// The collection it caches, by the cloud's name.
    pub collection: String,
    /// Local HTTP endpoint for applications.
    pub http_addr: SocketAddr,
    /// Threshold on the k-th local distance above which the cloud is asked.
    pub max_distance: f32,
    /// How long to wait for the cloud before answering degraded.
    pub deadline_ms: u64,
    pub default_ef: usize,
    pub cloud_ef: u32,
    /// Tokio worker threads (`None`: one per core; 1: everything on one thread).
    pub worker_threads: Option<usize>,
    /// The cloud link; none answers locally only (every unconfident answer degraded).
    pub cloud: Option<CloudLinkConfig>,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        EdgeConfig {
            name: "edge".into(),
            snapshot: PathBuf::from("cache.tvs"),
            collection: "default".into(),
            http_addr: "127.0.0.1:6390".parse().expect("valid address"),
            max_distance: 0.35,
            deadline_ms: 50,
            default_ef: 64,
            cloud_ef: 128,
            worker_threads: None,
            cloud: None,
        }
    }
}

impl EdgeConfig {
    pub fn node(&self) -> NodeConfig {
        NodeConfig {
            collection: self.collection.clone(),
            max_distance: self.max_distance,
            deadline: Duration::from_millis(self.deadline_ms),
            cloud_ef: self.cloud_ef,
            backoff: (Duration::from_millis(100), Duration::from_secs(5)),
        }
    }

    pub fn link(&self) -> Option<LinkConfig> {
        self.cloud.as_ref().map(|c| {
            LinkConfig::new(
                c.addr,
                &c.server_name,
                c.ca_cert.clone(),
                Some((c.cert.clone(), c.key.clone())),
                &self.name,
            )
        })
    }
}
