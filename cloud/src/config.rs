//! `tiervec-cloud serve` configuration: a plain struct with defaults, read from TOML, and every
//! field overridable by an environment variable `TIERVEC_CLOUD_<FIELD>` (`__` between nested
//! keys: `TIERVEC_CLOUD_HTTP__MAX_CONNECTIONS`) and by a flag `--set <field>=<value>` (values in
//! TOML syntax, `table.field` for a field of a table; flags win over env, env over the file),
//! layered by figment (`tiervec_shared::layered`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::collection::gpu::GpuConfig;
use crate::hot::HotConfig;
use crate::push::PushConfig;
use crate::service::ServiceConfig;
use crate::storage::ClusterConfig;
use crate::transport::http::ApiKey;
use crate::transport::listener::HttpLimits;
use crate::transport::quic::QuicLimits;

/// Why a configuration could not be read; the message names the file, variable or flag.
#[derive(Debug, Error)]
#[error("{0}")]
pub struct ConfigError(String);

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CloudConfig {
    /// Where the WAL and checkpoints live (one server per directory, enforced by a lock).
    pub data_dir: PathBuf,
    /// HTTP/JSON API address.
    pub http_addr: SocketAddr,
    /// API keys; when empty, the API is open (a warning is logged at start).
    pub api_keys: Vec<ApiKey>,
    /// Largest request body; larger requests get 413.
    pub max_body_bytes: usize,
    /// Most points in one upsert or delete request.
    pub max_batch: usize,
    /// Most collections held at once; a create beyond it is refused (409
    /// `too_many_collections`).
    pub max_collections: usize,
    /// Beam width when a search request names none.
    pub default_ef: usize,
    /// Rebuild a collection's graph in the background once this fraction of its slots are
    /// tombstones (deleted or replaced points).
    pub tombstone_rebuild_fraction: f64,
    /// Take a checkpoint (and drop covered WAL segments) once the WAL exceeds this many bytes.
    pub checkpoint_wal_bytes: u64,
    /// Most bytes of points in one checkpoint chunk; a checkpoint of any size is written in
    /// chunks this large (rkyv's archives stop at 2 GiB).
    pub checkpoint_chunk_bytes: usize,
    /// Tokio worker threads (default: one per core).
    pub worker_threads: Option<usize>,
    /// Large exact scans (over 2,048 rows) running at once, HTTP and QUIC together (default:
    /// one per core); more wait for a slot.
    pub max_concurrent_scans: Option<usize>,
    /// Log as JSON lines instead of text.
    pub json_logs: bool,
    /// QUIC endpoint for edges (mutual TLS); none serves HTTP only.
    pub quic_addr: Option<SocketAddr>,
    /// Certificates made by `tiervec-cloud certs` (CA, server certificate and key).
    pub certs_dir: PathBuf,
    /// Development only: make what `tiervec-cloud certs` makes in `certs_dir` where it is
    /// missing — a CA (its key beside it), a server certificate for `localhost`, and one
    /// certificate per edge named in `edges` — so that a first run needs no certificate step.
    pub dev_certs: bool,
    /// Which collections each edge (by certificate Common Name) may query; `"*"` grants all.
    pub edges: std::collections::HashMap<String, Vec<String>>,
    /// Hotness tables over what edges ask the cloud (`hot.rs`).
    pub hot: HotConfig,
    /// Pushing into edge caches (`push/`).
    pub push: PushConfig,
    /// Exact search on a GPU (feature `gpu`; `collection/gpu/`).
    pub gpu: GpuConfig,
    /// Connections and concurrent requests of the HTTP API (`transport/listener.rs`).
    pub http: HttpLimits,
    /// Connections, streams and windows of the QUIC endpoint (`transport/quic.rs`).
    pub quic: QuicLimits,
    /// Run as a node of a cluster whose logs are NATS JetStream streams
    /// (`storage/jetstream.rs`, `docs/cluster.md`); without it the embedded WAL holds them.
    pub cluster: Option<ClusterConfig>,
    /// The embedding model's folder (a sentence-transformers BERT model: `config.json`,
    /// `model.safetensors`, `tokenizer.json`), for texts in place of vectors (`text.rs`);
    /// none: requests carry vectors only.
    pub model_dir: Option<PathBuf>,
}

impl Default for CloudConfig {
    fn default() -> Self {
        CloudConfig {
            data_dir: PathBuf::from("tiervec-data"),
            http_addr: "127.0.0.1:6380".parse().expect("valid address"),
            api_keys: Vec::new(),
            max_body_bytes: 64 << 20,
            max_batch: 10_000,
            max_collections: 1_000,
            default_ef: 64,
            tombstone_rebuild_fraction: 0.25,
            checkpoint_wal_bytes: 256 << 20,
            checkpoint_chunk_bytes: crate::storage::checkpoint::CHUNK_BYTES,
            worker_threads: None,
            max_concurrent_scans: None,
            json_logs: false,
            quic_addr: None,
            certs_dir: PathBuf::from("certs"),
            dev_certs: false,
            edges: std::collections::HashMap::new(),
            hot: HotConfig::default(),
            push: PushConfig::default(),
            gpu: GpuConfig::default(),
            http: HttpLimits::default(),
            quic: QuicLimits::default(),
            cluster: None,
            model_dir: None,
        }
    }
}

/// Environment variables that override fields start with this.
pub const ENV_PREFIX: &str = "TIERVEC_CLOUD_";

impl CloudConfig {
    /// The service's part.
    pub fn service(&self) -> ServiceConfig {
        ServiceConfig {
            data_dir: self.data_dir.clone(),
            max_batch: self.max_batch,
            default_ef: self.default_ef,
            tombstone_rebuild_fraction: self.tombstone_rebuild_fraction,
            checkpoint_wal_bytes: self.checkpoint_wal_bytes,
            checkpoint_chunk_bytes: self.checkpoint_chunk_bytes,
            cluster: self.cluster.clone(),
            max_collections: self.max_collections,
        }
    }

    /// Reads `file` (if given), then the `TIERVEC_CLOUD_*` environment variables, then the
    /// `field=value` overrides (`tiervec_shared::layered`).
    pub fn load(file: Option<&Path>, overrides: &[String]) -> Result<CloudConfig, ConfigError> {
        tiervec_shared::layered::load(file, ENV_PREFIX, overrides)
            .map_err(|e| ConfigError(e.to_string()))
    }
}

#[cfg(test)]
// `figment::Jail::expect_with` takes closures returning figment's own (large) error type.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use crate::collection::gpu::Precision;
    use crate::transport::http::Role;

    /// Every test that loads a configuration runs in a figment `Jail`: it reads the process's
    /// environment, which a jail alone may change, one jail at a time.
    #[test]
    fn file_env_and_flags_layer_in_that_order() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "cloud.toml",
                "data_dir = \"/srv/a\"\ndefault_ef = 80\n[[api_keys]]\nkey = \"k1\"\nrole = \"read_only\"\n",
            )?;
            let path = Path::new("cloud.toml");
            jail.set_env("TIERVEC_CLOUD_DEFAULT_EF", "96");
            jail.set_env("TIERVEC_CLOUD_DATA_DIR", "/srv/b");
            jail.set_env("TIERVEC_CLOUD_HTTP__MAX_CONNECTIONS", "7");
            jail.set_env("UNRELATED", "x");
            let c = CloudConfig::load(Some(path), &["default_ef=128".into()]).unwrap();
            assert_eq!(c.default_ef, 128, "a flag wins over the environment");
            assert_eq!(
                c.data_dir,
                PathBuf::from("/srv/b"),
                "the environment over the file"
            );
            assert_eq!(
                c.http.max_connections, 7,
                "a nested key from the environment"
            );
            assert_eq!(c.api_keys[0].role, Role::ReadOnly);
            assert_eq!(c.max_batch, CloudConfig::default().max_batch);
            let e = CloudConfig::load(None, &["no_such_field=1".into()]).unwrap_err();
            assert!(e.to_string().contains("no_such_field"), "{e}");
            assert!(CloudConfig::load(None, &["default_ef=\"x\"".into()]).is_err());
            assert!(CloudConfig::load(Some(Path::new("missing.toml")), &[]).is_err());
            jail.set_env("TIERVEC_CLOUD_NO_SUCH_FIELD", "1");
            let e = CloudConfig::load(None, &[]).unwrap_err().to_string();
            assert!(e.contains("NO_SUCH_FIELD"), "{e}");
            Ok(())
        });
    }

    /// The node configurations under `docs/deploy/` are ones the cloud takes: the systemd
    /// example file, and the Kubernetes ConfigMap's with the password from the environment
    /// as the StatefulSet passes it.
    #[test]
    fn the_deployment_examples_are_valid_configurations() {
        figment::Jail::expect_with(|jail| {
            let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/deploy");
            let node =
                CloudConfig::load(Some(&deploy.join("systemd/cloud-node.toml")), &[]).unwrap();
            let cluster = node.cluster.expect("a cluster node");
            assert_eq!(cluster.nats.len(), 3);
            assert_eq!(cluster.stream_replicas(), 3);
            cluster.check().unwrap();

            let manifest = std::fs::read_to_string(deploy.join("kubernetes/cloud.yaml")).unwrap();
            let start = manifest.find("cloud.toml: |\n").unwrap() + "cloud.toml: |\n".len();
            let text: String = manifest[start..]
                .lines()
                .take_while(|l| l.is_empty() || l.starts_with("    "))
                .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
                .collect();
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("cloud.toml");
            std::fs::write(&path, text).unwrap();
            // A password of digits stays a string (a Kubernetes secret often is one).
            jail.set_env("TIERVEC_CLOUD_CLUSTER.PASSWORD", "123456");
            jail.set_env("TIERVEC_CLOUD_CLUSTER__NODE", "cloud-2");
            let pod = CloudConfig::load(Some(&path), &[]).unwrap();
            let cluster = pod.cluster.expect("a cluster node");
            cluster.check().unwrap();
            assert_eq!(cluster.node, "cloud-2");
            assert_eq!(cluster.password.as_deref(), Some("123456"));
            assert_eq!(cluster.user.as_deref(), Some("tiervec"));
            assert!(pod.quic_addr.is_some());
            Ok(())
        });
    }

    /// The example cloud of the README's "Your own texts" is one the cloud takes.
    #[test]
    fn the_example_cloud_is_a_valid_configuration() {
        figment::Jail::expect_with(|_| {
            let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples/cloud.toml");
            let c = CloudConfig::load(Some(&example), &[]).unwrap();
            assert!(c.dev_certs && c.model_dir.is_some() && c.quic_addr.is_some());
            assert_eq!(c.edges.len(), 2);
            Ok(())
        });
    }

    #[test]
    fn a_dotted_flag_sets_one_field_of_a_table() {
        figment::Jail::expect_with(|_| {
            let c = CloudConfig::load(
                None,
                &[
                    "http.max_connections=8".into(),
                    "http.header_timeout_ms=250".into(),
                ],
            )
            .unwrap();
            assert_eq!(
                c.http,
                HttpLimits {
                    max_connections: 8,
                    header_timeout_ms: 250,
                    ..HttpLimits::default()
                }
            );
            for bad in ["http..max_connections=1", "default_ef.x=1", "http.nope=1"] {
                assert!(CloudConfig::load(None, &[bad.into()]).is_err(), "{bad}");
            }
            // Values as TOML reads them: exponents, inline tables with quoted keys; a bare
            // word is a string.
            let c = CloudConfig::load(
                None,
                &[
                    "push={anchor_hot_count=1e12, hot_id_count=1e12}".into(),
                    r#"edges={"edge-1"=["*"]}"#.into(),
                    "certs_dir=2024".into(),
                ],
            )
            .unwrap();
            assert_eq!(c.push.anchor_hot_count, 1e12);
            assert_eq!(c.edges["edge-1"], vec!["*".to_owned()]);
            assert_eq!(
                c.certs_dir,
                PathBuf::from("2024"),
                "digits for a path field"
            );
            Ok(())
        });
    }

    #[test]
    fn gpu_section_defaults_and_overrides() {
        figment::Jail::expect_with(|_| {
            let c = CloudConfig::load(None, &[]).unwrap();
            assert_eq!(c.gpu, GpuConfig::default());
            let c = CloudConfig::load(
                None,
                &["gpu={precision=\"f16\", memory_budget_bytes=1073741824, device=1}".into()],
            )
            .unwrap();
            assert_eq!(c.gpu.precision, Precision::F16);
            assert_eq!(c.gpu.memory_budget_bytes, Some(1 << 30));
            assert_eq!(c.gpu.device, 1);
            assert_eq!(c.gpu.min_rows, GpuConfig::default().min_rows);
            assert!(CloudConfig::load(None, &["gpu={precision=\"f8\"}".into()]).is_err());
            Ok(())
        });
    }
}
