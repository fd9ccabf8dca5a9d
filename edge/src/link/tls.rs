//! The link's configuration: where the cloud is, which certificates the edge presents, and the
//! rustls client configuration built from them (ring, TLS 1.3 only, the deployment CA as the
//! only root, early data enabled); and [`LinkError`], why a link could not be made.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use thiserror::Error;
use tiervec_shared::protocol::frame::ALPN;

#[derive(Debug, Error)]
pub enum LinkError {
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("cannot reach the cloud: {0}")]
    Connect(String),
    #[error("handshake with the cloud failed: {0}")]
    Handshake(String),
}

fn tls(e: impl std::fmt::Display) -> LinkError {
    LinkError::Tls(e.to_string())
}

/// Where the cloud is and which certificates the edge presents.
#[derive(Clone, Debug)]
pub struct LinkConfig {
    pub cloud_addr: SocketAddr,
    /// Further nodes of a cloud cluster: after a lost link or a failed attempt the connector
    /// tries the next address in turn (`cloud_addr` first).
    pub other_cloud_addrs: Vec<SocketAddr>,
    /// Name the cloud's certificate must carry.
    pub server_name: String,
    pub ca_cert: PathBuf,
    /// The edge's client certificate and key; `None` connects without one (and is refused).
    pub identity: Option<(PathBuf, PathBuf)>,
    pub edge_name: String,
    /// A connection with no packet for this long is dead (also bounds a connection attempt).
    pub idle_timeout: Duration,
    /// Keep-alive interval, so that an idle but healthy link is not closed.
    pub keep_alive: Duration,
}

impl LinkConfig {
    /// A configuration with the default timers.
    pub fn new(
        cloud_addr: SocketAddr,
        server_name: &str,
        ca_cert: PathBuf,
        identity: Option<(PathBuf, PathBuf)>,
        edge_name: &str,
    ) -> LinkConfig {
        LinkConfig {
            cloud_addr,
            other_cloud_addrs: Vec::new(),
            server_name: server_name.to_owned(),
            ca_cert,
            identity,
            edge_name: edge_name.to_owned(),
            idle_timeout: Duration::from_secs(3),
            keep_alive: Duration::from_secs(1),
        }
    }
}

/// The QUIC client configuration: the deployment CA as the only root, the edge's certificate,
/// early data enabled, and the link's timers.
pub fn client_config(cfg: &LinkConfig) -> Result<quinn::ClientConfig, LinkError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(&cfg.ca_cert).map_err(tls)? {
        roots.add(ca.map_err(tls)?).map_err(tls)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .with_root_certificates(roots);
    let mut crypto = match &cfg.identity {
        Some((cert, key)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                .map_err(tls)?
                .collect::<Result<_, _>>()
                .map_err(tls)?;
            builder
                .with_client_auth_cert(chain, PrivateKeyDer::from_pem_file(key).map_err(tls)?)
                .map_err(tls)?
        }
        None => builder.with_no_client_auth(),
    };
    crypto.alpn_protocols = vec![ALPN.to_vec()];
    crypto.enable_early_data = true;
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(crypto).map_err(tls)?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(cfg.idle_timeout.try_into().map_err(tls)?))
        .keep_alive_interval(Some(cfg.keep_alive));
    config.transport_config(Arc::new(transport));
    Ok(config)
}
