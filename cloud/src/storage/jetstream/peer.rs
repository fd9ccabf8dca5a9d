//! Direct QUIC between cloud nodes, for the fan-out's requests: one hop each way instead of
//! a NATS request's three (client → server → route → server → node), with mutual TLS — each
//! node presents its certificate (Common Name `tiervec node <name>`, signed by the cluster's
//! CA) and accepts only peers that present one. A node announces the address in its
//! heartbeat; a node without it, or a request that fails here, goes over NATS.
//!
//! On the wire: one bidirectional stream per request; the request's bytes, finished; the
//! answer's status byte (0 answer, 1 error text) and bytes, finished.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tracing::{debug, warn};

use crate::storage::contract::ClusterError;

/// The ALPN of the QUIC between nodes (edges use another: a node never takes an edge's
/// connection for a peer's, nor the reverse).
pub const ALPN: &[u8] = b"tiervec-peer/1";
/// A node certificate's Common Name is this and the node's name.
pub const NODE_NAME_PREFIX: &str = "tiervec node ";
/// The DNS name every node certificate carries and every node connects to.
pub const NODE_SERVER_NAME: &str = "tiervec-node";
/// The most bytes of one request between nodes (a search's vector and parameters, a batch of
/// ids) and of one answer (128 points with vectors and payloads).
pub const MAX_REQUEST_BYTES: usize = 1 << 20;
pub const MAX_ANSWER_BYTES: usize = 16 << 20;
/// A connection between nodes idle this long is closed (the next request connects again).
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// What answers a request (runs on a blocking thread); `None` while the node is starting.
pub type Handler = Arc<dyn Fn(&[u8]) -> Option<Vec<u8>> + Send + Sync>;

/// This node's QUIC endpoint for other nodes: it serves their requests and sends its own,
/// keeping one connection per peer.
pub struct PeerEndpoint {
    endpoint: quinn::Endpoint,
    connections: Mutex<HashMap<SocketAddr, quinn::Connection>>,
}

/// A cluster's certificates for the QUIC between nodes: the layout of `tiervec-cloud certs`.
fn files(dir: &Path, node: &str) -> (PathBuf, PathBuf, PathBuf) {
    (
        dir.join("ca.pem"),
        dir.join("nodes").join(format!("{node}.pem")),
        dir.join("nodes").join(format!("{node}.key")),
    )
}

fn tls(e: impl std::fmt::Display) -> ClusterError {
    ClusterError::Config(format!("QUIC between nodes: {e}"))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl PeerEndpoint {
    /// Binds `addr` with node `node`'s certificate from `certs_dir` (`ca.pem`,
    /// `nodes/<node>.pem`, `nodes/<node>.key`). Runs inside a tokio runtime.
    pub fn bind(addr: SocketAddr, certs_dir: &Path, node: &str) -> Result<Self, ClusterError> {
        let (ca, cert, key) = files(certs_dir, node);
        let read = |path: &Path| {
            CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| tls(format!("{}: {e}", path.display())))
        };
        let mut roots = rustls::RootCertStore::empty();
        for c in read(&ca)? {
            roots.add(c).map_err(tls)?;
        }
        let roots = Arc::new(roots);
        let chain = read(&cert)?;
        let key = PrivateKeyDer::from_pem_file(&key)
            .map_err(|e| tls(format!("{}: {e}", key.display())))?;

        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                .build()
                .map_err(tls)?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(tls)?;
        server.alpn_protocols = vec![ALPN.to_vec()];
        let mut client = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(tls)?;
        client.alpn_protocols = vec![ALPN.to_vec()];

        let mut transport = quinn::TransportConfig::default();
        transport.max_idle_timeout(Some(IDLE_TIMEOUT.try_into().map_err(tls)?));
        transport.keep_alive_interval(Some(IDLE_TIMEOUT / 3));
        let transport = Arc::new(transport);
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(
            quinn::crypto::rustls::QuicServerConfig::try_from(server).map_err(tls)?,
        ));
        server.transport_config(transport.clone());
        let mut client = quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(client).map_err(tls)?,
        ));
        client.transport_config(transport);
        let mut endpoint = quinn::Endpoint::server(server, addr)
            .map_err(|e| ClusterError::Config(format!("binding {addr} for other nodes: {e}")))?;
        endpoint.set_default_client_config(client);
        Ok(PeerEndpoint {
            endpoint,
            connections: Mutex::new(HashMap::new()),
        })
    }

    /// The address other nodes reach this one at.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.endpoint.local_addr().ok()
    }

    /// Serves other nodes' requests with `handler`, until the endpoint closes.
    pub fn serve(&self, handler: Handler) {
        let endpoint = self.endpoint.clone();
        tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                let handler = handler.clone();
                tokio::spawn(async move {
                    match incoming.await {
                        Ok(conn) => serve_connection(conn, handler).await,
                        Err(e) => debug!(error = %e, "a peer's handshake failed"),
                    }
                });
            }
        });
    }

    /// Sends `body` to the node at `addr`; its answer, by `deadline`.
    pub async fn ask(
        &self,
        addr: SocketAddr,
        body: &[u8],
        deadline: Instant,
    ) -> Result<Vec<u8>, ClusterError> {
        let unavailable = |e: String| ClusterError::Unavailable(format!("node at {addr}: {e}"));
        let asked = async {
            let conn = self.connection(addr).await.map_err(unavailable)?;
            let (mut send, mut recv) = match conn.open_bi().await {
                Ok(stream) => stream,
                Err(e) => {
                    self.connections.lock().remove(&addr);
                    return Err(unavailable(e.to_string()));
                }
            };
            send.write_all(body)
                .await
                .map_err(|e| unavailable(e.to_string()))?;
            send.finish().map_err(|e| unavailable(e.to_string()))?;
            let answer = recv
                .read_to_end(MAX_ANSWER_BYTES + 1)
                .await
                .map_err(|e| unavailable(e.to_string()))?;
            match answer.split_first() {
                Some((0, body)) => Ok(body.to_vec()),
                Some((_, why)) => Err(unavailable(String::from_utf8_lossy(why).into_owned())),
                None => Err(unavailable("an empty answer".into())),
            }
        };
        tokio::time::timeout_at(deadline.into(), asked)
            .await
            .unwrap_or_else(|_| Err(unavailable("no answer in time".into())))
    }

    /// The connection to `addr`, made if there is none (or the last one closed).
    async fn connection(&self, addr: SocketAddr) -> Result<quinn::Connection, String> {
        if let Some(c) = self.connections.lock().get(&addr)
            && c.close_reason().is_none()
        {
            return Ok(c.clone());
        }
        let conn = self
            .endpoint
            .connect(addr, NODE_SERVER_NAME)
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        self.connections.lock().insert(addr, conn.clone());
        Ok(conn)
    }
}

/// The peer's node name, from its verified certificate's Common Name (`None`: not a node's).
fn peer_node(conn: &quinn::Connection) -> Option<String> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(certs.first()?.as_ref()).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
    cn.strip_prefix(NODE_NAME_PREFIX).map(str::to_owned)
}

async fn serve_connection(conn: quinn::Connection, handler: Handler) {
    let Some(node) = peer_node(&conn) else {
        // Signed by the cluster's CA but not a node's (an edge's, say).
        warn!(remote = %conn.remote_address(), "refused a QUIC peer without a node certificate");
        conn.close(quinn::VarInt::from_u32(1), b"not a node certificate");
        return;
    };
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        let handler = handler.clone();
        let node = node.clone();
        tokio::spawn(async move {
            let answer = match recv.read_to_end(MAX_REQUEST_BYTES).await {
                Err(e) => {
                    debug!(node, error = %e, "a peer's request was not read");
                    [&[1u8][..], format!("request not read: {e}").as_bytes()].concat()
                }
                Ok(body) => match tokio::task::spawn_blocking(move || handler(&body)).await {
                    Ok(Some(answer)) if answer.len() <= MAX_ANSWER_BYTES => {
                        [&[0u8][..], &answer].concat()
                    }
                    Ok(Some(answer)) => [
                        &[1u8][..],
                        format!(
                            "an answer of {} bytes is over {MAX_ANSWER_BYTES}",
                            answer.len()
                        )
                        .as_bytes(),
                    ]
                    .concat(),
                    Ok(None) => [&[1u8][..], b"the node is still starting"].concat(),
                    Err(e) => [&[1u8][..], format!("the handler failed: {e}").as_bytes()].concat(),
                },
            };
            let _ = send.write_all(&answer).await;
            let _ = send.finish();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::CertDir;

    fn certs(dir: &Path) -> CertDir {
        let certs = CertDir {
            dir: dir.to_owned(),
            deployment: "peers".into(),
        };
        certs.ensure_ca().unwrap();
        certs.issue_node("a").unwrap();
        certs.issue_node("b").unwrap();
        certs.issue_edge("b").unwrap();
        certs
    }

    #[tokio::test]
    async fn nodes_answer_each_other_and_refuse_a_certificate_that_is_not_a_nodes() {
        let dir = tempfile::tempdir().unwrap();
        let certs = certs(dir.path());
        let local: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let a = PeerEndpoint::bind(local, &certs.dir, "a").unwrap();
        a.serve(Arc::new(|body: &[u8]| Some([b"a:", body].concat())));
        let b = PeerEndpoint::bind(local, &certs.dir, "b").unwrap();
        let at = a.local_addr().unwrap();
        let deadline = || Instant::now() + Duration::from_secs(5);
        assert_eq!(b.ask(at, b"ping", deadline()).await.unwrap(), b"a:ping");
        // Several at once on one connection.
        let bodies: Vec<[u8; 1]> = (0..8u8).map(|i| [i]).collect();
        let asked =
            futures::future::join_all(bodies.iter().map(|body| b.ask(at, body, deadline()))).await;
        for (i, answer) in asked.into_iter().enumerate() {
            assert_eq!(answer.unwrap(), [b'a', b':', i as u8]);
        }
        // An edge's certificate from the same CA (its id is `b`, like the node) is refused.
        let edge_dir = dir.path().join("as-edge");
        std::fs::create_dir_all(edge_dir.join("nodes")).unwrap();
        std::fs::copy(certs.ca_cert(), edge_dir.join("ca.pem")).unwrap();
        std::fs::copy(certs.edge_cert("b"), edge_dir.join("nodes/b.pem")).unwrap();
        std::fs::copy(certs.edge_key("b"), edge_dir.join("nodes/b.key")).unwrap();
        let edge = PeerEndpoint::bind(local, &edge_dir, "b").unwrap();
        let refused = edge.ask(at, b"ping", deadline()).await;
        assert!(
            matches!(refused, Err(ClusterError::Unavailable(_))),
            "{refused:?}"
        );
        // A request over the limit is refused by the answering node, which keeps serving.
        let big = vec![0u8; MAX_REQUEST_BYTES + 1];
        assert!(b.ask(at, &big, deadline()).await.is_err());
        assert_eq!(b.ask(at, b"again", deadline()).await.unwrap(), b"a:again");
    }
}
