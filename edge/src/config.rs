//! `tiervec-edge serve` configuration: a plain struct with defaults, read from a TOML file,
//! environment variables and `--set` flags in layers ([`EdgeConfig::load`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use tiervec_shared::confidence::ConfidenceRule;
use tiervec_shared::layered::LayerError;

use crate::cache::CacheConfig;
use crate::link::LinkConfig;
use crate::node::NodeConfig;

/// How to reach the cloud.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudLinkConfig {
    /// The cloud's QUIC address.
    pub addr: SocketAddr,
    /// The QUIC addresses of the cloud cluster's other nodes, tried in turn after `addr` when
    /// a link is lost or an attempt fails (`docs/cluster.md`).
    #[serde(default)]
    pub other_addrs: Vec<SocketAddr>,
    /// A link with no packet for this long is dead and the edge fails over (keep-alives go
    /// every third of it); also bounds a connection attempt.
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// Name in the cloud's certificate.
    pub server_name: String,
    pub ca_cert: PathBuf,
    /// This edge's certificate and key (its id is the certificate's Common Name).
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn default_idle_timeout_ms() -> u64 {
    3_000
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EdgeConfig {
    pub name: String,
    /// The cache snapshot (memory-mapped); it need not exist (a cold cache the cloud fills).
    /// The delta log lives beside it (`.deltas`).
    pub snapshot: PathBuf,
    /// Bytes (in the shared byte model) the cloud may fill the cache with.
    pub budget_bytes: u64,
    /// Fold the pushed overlay into a new snapshot once it holds this many vectors,
    pub compact_after: usize,
    /// or once this many deltas arrived since the snapshot,
    pub compact_after_deltas: usize,
    /// or once the delta log holds this many bytes.
    pub compact_after_log_bytes: u64,
    /// The collection it caches, by the cloud's name.
    pub collection: String,
    /// Local HTTP endpoint for applications.
    pub http_addr: SocketAddr,
    /// When a local answer is confident: thresholds on the k-th local distance and on the
    /// distance to the nearest anchor (either suffices).
    pub confidence: ConfidenceRule,
    /// Cut off from the cloud longer than this, local answers are marked stale.
    pub lease_ms: u64,
    /// Every this many-th local answer is also asked of the cloud in the background, to
    /// estimate local recall (0: never).
    pub shadow_every: u64,
    /// When set, the thresholds are tuned from shadow queries toward this local recall.
    pub target_recall: Option<f64>,
    /// Ask the cloud for certificates with the anchors it pushes (cosine and L2 collections):
    /// a query inside a certificate is answered locally with the corpus's exact top-k, marked
    /// `certified`. Costs the cloud one exact search per pushed anchor.
    pub certify: bool,
    /// How long to wait for the cloud before answering degraded.
    pub deadline_ms: u64,
    pub default_ef: usize,
    pub cloud_ef: u32,
    /// Tokio worker threads (`None`: one per core; 1: everything on one thread).
    pub worker_threads: Option<usize>,
    /// The cloud link; none answers locally only (every unconfident answer degraded).
    pub cloud: Option<CloudLinkConfig>,
    /// The embedding model's folder (feature `embed`): searches may send `text`, embedded
    /// here, and the vector goes to the cloud on a fallback. It must be the model the cloud's
    /// collection records.
    pub model_dir: Option<PathBuf>,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        EdgeConfig {
            name: "edge".into(),
            snapshot: PathBuf::from("cache.tvs"),
            budget_bytes: 16 << 20,
            compact_after: 2_048,
            compact_after_deltas: 4_096,
            compact_after_log_bytes: 16 << 20,
            collection: "default".into(),
            http_addr: "127.0.0.1:6390".parse().expect("valid address"),
            confidence: ConfidenceRule::kth(0.35),
            lease_ms: 30_000,
            shadow_every: 50,
            target_recall: None,
            certify: false,
            deadline_ms: 50,
            default_ef: 64,
            cloud_ef: 128,
            worker_threads: None,
            cloud: None,
            model_dir: None,
        }
    }
}

/// Environment variables that override fields start with this.
pub const ENV_PREFIX: &str = "TIERVEC_EDGE_";

impl EdgeConfig {
    /// Reads `file` (TOML, if given), then the `TIERVEC_EDGE_<FIELD>` environment variables
    /// (`__` between nested keys: `TIERVEC_EDGE_CLOUD__ADDR`), then the `field=value`
    /// overrides of `--set` (TOML values, `table.field` for nested keys): each layer wins over
    /// the one before (`tiervec_shared::layered`).
    pub fn load(file: Option<&Path>, overrides: &[String]) -> Result<EdgeConfig, LayerError> {
        tiervec_shared::layered::load(file, ENV_PREFIX, overrides)
    }

    pub fn node(&self) -> NodeConfig {
        NodeConfig {
            collection: self.collection.clone(),
            rule: self.confidence,
            lease: Duration::from_millis(self.lease_ms),
            shadow_every: self.shadow_every,
            target_recall: self.target_recall,
            certify: self.certify,
            deadline: Duration::from_millis(self.deadline_ms),
            cloud_ef: self.cloud_ef,
            backoff: (Duration::from_millis(100), Duration::from_secs(5)),
        }
    }

    pub fn cache(&self) -> CacheConfig {
        CacheConfig {
            compact_after: self.compact_after,
            compact_after_deltas: self.compact_after_deltas,
            compact_after_log_bytes: self.compact_after_log_bytes,
            ..CacheConfig::beside(&self.snapshot, self.budget_bytes)
        }
    }

    pub fn link(&self) -> Option<LinkConfig> {
        self.cloud.as_ref().map(|c| {
            let idle_timeout = Duration::from_millis(c.idle_timeout_ms.max(30));
            LinkConfig {
                other_cloud_addrs: c.other_addrs.clone(),
                idle_timeout,
                keep_alive: idle_timeout / 3,
                ..LinkConfig::new(
                    c.addr,
                    &c.server_name,
                    c.ca_cert.clone(),
                    Some((c.cert.clone(), c.key.clone())),
                    &self.name,
                )
            }
        })
    }
}

#[cfg(test)]
// `figment::Jail::expect_with` takes closures returning figment's own (large) error type.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    /// The file, then `TIERVEC_EDGE_*` (nested with `__`), then `--set`, each winning over the
    /// one before; unknown fields are errors in every layer. (Every test that loads runs in a
    /// figment `Jail`: loading reads the process's environment, which a jail alone changes.)
    #[test]
    fn file_env_and_flags_layer_in_that_order() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "edge.toml",
                "name = \"edge-7\"\ncollection = \"notes\"\ndeadline_ms = 80\n\
                 [cloud]\naddr = \"127.0.0.1:6381\"\nserver_name = \"localhost\"\n\
                 ca_cert = \"ca.pem\"\ncert = \"e.pem\"\nkey = \"e.key\"\n",
            )?;
            jail.set_env("TIERVEC_EDGE_DEADLINE_MS", "90");
            jail.set_env("TIERVEC_EDGE_CLOUD__SERVER_NAME", "cloud.example");
            jail.set_env("TIERVEC_EDGE_COLLECTION", "from-env");
            let c = EdgeConfig::load(
                Some(Path::new("edge.toml")),
                &[
                    "collection=from-flag".into(),
                    "confidence.max_kth_distance=0.25".into(),
                ],
            )
            .unwrap();
            assert_eq!(c.name, "edge-7", "the file");
            assert_eq!(c.deadline_ms, 90, "the environment over the file");
            assert_eq!(c.collection, "from-flag", "a flag over the environment");
            let cloud = c.cloud.expect("the file's link");
            assert_eq!(cloud.server_name, "cloud.example", "a nested variable");
            assert_eq!(cloud.addr.port(), 6381);
            assert_eq!(c.confidence.max_kth_distance, Some(0.25), "a nested flag");
            assert_eq!(c.budget_bytes, EdgeConfig::default().budget_bytes);
            Ok(())
        });
        figment::Jail::expect_with(|jail| {
            jail.set_env("TIERVEC_EDGE_NO_SUCH", "1");
            let e = EdgeConfig::load(None, &[]).unwrap_err().to_string();
            assert!(e.contains("NO_SUCH"), "{e}");
            Ok(())
        });
        figment::Jail::expect_with(|_| {
            assert!(EdgeConfig::load(None, &["deadline_ms=soon".into()]).is_err());
            assert!(EdgeConfig::load(None, &["=1".into()]).is_err());
            assert!(EdgeConfig::load(Some(Path::new("/no/such/edge.toml")), &[]).is_err());
            Ok(())
        });
    }

    /// The example configurations of the README's "Your own texts" are ones the edge takes.
    #[test]
    fn the_example_edges_are_valid_configurations() {
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples");
        figment::Jail::expect_with(|_| {
            for (n, port) in [(1, 6390), (2, 6391)] {
                let file = examples.join(format!("edge-{n}.toml"));
                let c = EdgeConfig::load(Some(&file), &[]).unwrap();
                assert_eq!(c.name, format!("edge-{n}"));
                assert_eq!(c.http_addr.port(), port);
                assert!(c.cloud.is_some() && c.model_dir.is_some());
            }
            Ok(())
        });
    }
}
