//! The `[cluster]` section of a cloud node's configuration, checked before anything connects.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::storage::contract::ClusterError;

/// Where the cluster's NATS servers are and how this cloud uses them (`[cluster]` in
/// `tiervec-cloud serve`'s configuration; without it the cloud runs on its embedded WAL).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// This node's name, unique in the cluster and kept across restarts (a returning node
    /// takes its shards back): e.g. the host name, or a StatefulSet pod's name.
    pub node: String,
    /// NATS server URLs (`nats://host:port`) of the JetStream cluster; the client fails over
    /// between them.
    pub nats: Vec<String>,
    /// Prefix of every stream and subject of this cloud (1–32 of `[A-Za-z0-9_-]`), so that
    /// several clouds may share one NATS cluster.
    pub prefix: String,
    /// Replicas of each stream (JetStream's R, 1–5); 0 chooses three when at least three
    /// servers are listed, else one.
    pub replicas: usize,
    /// How long an append waits for JetStream's acknowledgement and the local apply, retries
    /// included, before it answers "unavailable".
    pub append_timeout_ms: u64,
    /// How long start-up waits to apply every stream up to the position it had at start.
    pub recovery_timeout_secs: u64,
    /// Cloud nodes holding each shard (1–5; fewer while fewer nodes are alive).
    pub replication: usize,
    /// How often a node announces itself (its heartbeat in the `P_NODES` bucket).
    pub heartbeat_ms: u64,
    /// A node silent this long is dead: its shards are placed on others.
    pub node_timeout_ms: u64,
    /// How long a query waits for another node's answer for its shards before asking another
    /// replica (or answering without them, naming them).
    pub shard_timeout_ms: u64,
    /// NATS user and password, when the servers require them.
    pub user: Option<String>,
    pub password: Option<String>,
    /// TLS to the NATS servers (required when set): the PEM file of the CA that signed
    /// their certificates.
    pub tls_ca: Option<PathBuf>,
    /// This node's client certificate and key (PEM), for servers that verify clients
    /// (`tls { verify: true }`): node ↔ NATS authenticated both ways. Both or neither.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Direct QUIC between nodes for the fan-out (mutual TLS): the UDP address this node takes
    /// other nodes' requests on. Its bound address is announced in the heartbeat, so it must
    /// be one they reach (not `0.0.0.0`). Unset: requests between nodes go over NATS.
    pub peer_addr: Option<SocketAddr>,
    /// The cluster's certificates for it, as `tiervec-cloud certs --node NAME` lays them out:
    /// `ca.pem`, `nodes/<node>.pem`, `nodes/<node>.key`.
    pub peer_certs: Option<PathBuf>,
    /// A shard's first placed node writes a snapshot of it to the `P_SNAPSHOTS` object store
    /// every this many entries of its stream, and trims the stream below the previous one; a
    /// replica behind the trimmed part catches up from the snapshot. 0: no snapshots, and
    /// streams keep every entry.
    pub snapshot_entries: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            nats: Vec::new(),
            prefix: "TIERVEC".into(),
            replicas: 0,
            append_timeout_ms: 5_000,
            recovery_timeout_secs: 600,
            node: String::new(),
            replication: 2,
            heartbeat_ms: 1_000,
            node_timeout_ms: 4_000,
            shard_timeout_ms: 1_000,
            user: None,
            password: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            peer_addr: None,
            peer_certs: None,
            snapshot_entries: 100_000,
        }
    }
}

impl ClusterConfig {
    /// The replicas each stream gets.
    pub fn stream_replicas(&self) -> usize {
        match self.replicas {
            0 if self.nats.len() >= 3 => 3,
            0 => 1,
            r => r,
        }
    }
}

impl ClusterConfig {
    /// Refuses what cannot work, naming the field.
    pub fn check(&self) -> Result<(), ClusterError> {
        check_prefix(&self.prefix)?;
        if self.nats.is_empty() {
            return Err(ClusterError::Config(
                "no NATS server listed (`cluster.nats`)".into(),
            ));
        }
        if self.node.is_empty() || self.node.len() > 128 {
            return Err(ClusterError::Config(
                "`cluster.node` must name this node (1 to 128 bytes, unique in the cluster, kept across restarts)".into(),
            ));
        }
        if !(1..=5).contains(&self.replication) {
            return Err(ClusterError::Config(format!(
                "`cluster.replication` = {} is outside 1..=5",
                self.replication
            )));
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(ClusterError::Config(
                "`cluster.tls_cert` and `cluster.tls_key` go together".into(),
            ));
        }
        if self.tls_cert.is_some() && self.tls_ca.is_none() {
            return Err(ClusterError::Config(
                "a client certificate (`cluster.tls_cert`) needs `cluster.tls_ca`, the CA of the NATS servers".into(),
            ));
        }
        for path in [&self.tls_ca, &self.tls_cert, &self.tls_key]
            .into_iter()
            .flatten()
        {
            if !path.is_file() {
                return Err(ClusterError::Config(format!(
                    "TLS file {} (cluster.tls_*) does not exist",
                    path.display()
                )));
            }
        }
        if self.peer_addr.is_some() != self.peer_certs.is_some() {
            return Err(ClusterError::Config(
                "`cluster.peer_addr` and `cluster.peer_certs` go together".into(),
            ));
        }
        if self.heartbeat_ms == 0 || self.node_timeout_ms < 2 * self.heartbeat_ms {
            return Err(ClusterError::Config(format!(
                "`cluster.node_timeout_ms` ({}) must be at least twice `cluster.heartbeat_ms` ({}), which must not be 0",
                self.node_timeout_ms, self.heartbeat_ms
            )));
        }
        Ok(())
    }
}

fn check_prefix(prefix: &str) -> Result<(), ClusterError> {
    let ok = (1..=32).contains(&prefix.len())
        && prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ClusterError::Config(format!(
            "prefix `{prefix}` must be 1 to 32 characters of A-Z, a-z, 0-9, _ and -"
        )))
    }
}
