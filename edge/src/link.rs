//! The edge's QUIC link to the cloud (quinn + rustls with ring, TLS 1.3, ALPN `tiervec/1`,
//! mutual TLS with the edge's certificate). The protocol logic is the sans-IO
//! [`ClientSession`]; this module moves its frames over one bidirectional stream per exchange
//! and enforces deadlines.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use thiserror::Error;
use tiervec_shared::protocol::frame::{
    ALPN, Answer, DEFAULT_MAX_FRAME, Frame, FrameDecoder, PREFIX_LEN, Query, WireCollection,
};
use tiervec_shared::protocol::session::{ClientAction, ClientEvent, ClientSession, QueryFailure};

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
    /// Name the cloud's certificate must carry.
    pub server_name: String,
    pub ca_cert: PathBuf,
    /// The edge's client certificate and key; `None` connects without one (and is refused).
    pub identity: Option<(PathBuf, PathBuf)>,
    pub edge_name: String,
}

fn client_config(cfg: &LinkConfig) -> Result<quinn::ClientConfig, LinkError> {
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
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(crypto).map_err(tls)?;
    Ok(quinn::ClientConfig::new(Arc::new(quic)))
}

/// A connected, handshaken link.
pub struct CloudLink {
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    session: Mutex<ClientSession>,
    started: Instant,
    next_query: AtomicU64,
    collections: Vec<WireCollection>,
}

/// Sends `frame` on a new stream and returns the frames of the answer.
async fn exchange(conn: &quinn::Connection, frame: &Frame) -> Result<Vec<Frame>, String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let mut bytes = Vec::new();
    frame.encode(&mut bytes);
    send.write_all(&bytes).await.map_err(|e| e.to_string())?;
    send.finish().map_err(|e| e.to_string())?;
    let answer = recv
        .read_to_end(DEFAULT_MAX_FRAME + PREFIX_LEN)
        .await
        .map_err(|e| e.to_string())?;
    let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME);
    decoder.push(&answer).map_err(|e| e.to_string())?;
    let mut frames = Vec::new();
    while let Some(f) = decoder.next_frame().map_err(|e| e.to_string())? {
        frames.push(f);
    }
    Ok(frames)
}

impl CloudLink {
    /// Connects, presents the edge's certificate, and completes the protocol handshake.
    pub async fn connect(cfg: &LinkConfig) -> Result<CloudLink, LinkError> {
        let bind: SocketAddr = if cfg.cloud_addr.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        }
        .parse()
        .expect("valid wildcard address");
        let mut endpoint =
            quinn::Endpoint::client(bind).map_err(|e| LinkError::Connect(e.to_string()))?;
        endpoint.set_default_client_config(client_config(cfg)?);
        let conn = endpoint
            .connect(cfg.cloud_addr, &cfg.server_name)
            .map_err(|e| LinkError::Connect(e.to_string()))?
            .await
            .map_err(|e| LinkError::Handshake(e.to_string()))?;
        let started = Instant::now();
        let mut session = ClientSession::new(&cfg.edge_name, 0);
        let mut collections = None;
        let now = |s: &Instant| s.elapsed().as_micros() as u64;
        for action in session.handle(ClientEvent::Connected, now(&started)) {
            if let ClientAction::Send(hello) = action {
                let frames = exchange(&conn, &hello)
                    .await
                    .map_err(LinkError::Handshake)?;
                for f in frames {
                    for a in session.handle(ClientEvent::Received(f), now(&started)) {
                        match a {
                            ClientAction::Ready { collections: c, .. } => collections = Some(c),
                            ClientAction::Close { message, .. } => {
                                return Err(LinkError::Handshake(message));
                            }
                            _ => {}
                        }
                    }
                }
            }
        }
        let collections =
            collections.ok_or_else(|| LinkError::Handshake("no HelloAck from the cloud".into()))?;
        Ok(CloudLink {
            _endpoint: endpoint,
            conn,
            session: Mutex::new(session),
            started,
            next_query: AtomicU64::new(1),
            collections,
        })
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.conn.close_reason().is_some()
    }

    /// Resolves when the connection ends.
    pub async fn closed(&self) {
        self.conn.closed().await;
    }

    /// The collections this edge may query, as the cloud announced them.
    pub fn collections(&self) -> &[WireCollection] {
        &self.collections
    }

    fn now(&self) -> u64 {
        self.started.elapsed().as_micros() as u64
    }

    /// Asks the cloud; fails with `Timeout` when no answer arrives within `deadline`.
    pub async fn query(
        &self,
        mut query: Query,
        deadline: Duration,
    ) -> Result<Answer, QueryFailure> {
        query.query_id = self.next_query.fetch_add(1, Ordering::Relaxed);
        let id = query.query_id;
        let deadline_us = self.now() + deadline.as_micros() as u64;
        let mut frame = None;
        for a in self
            .session
            .lock()
            .handle(ClientEvent::Ask { query, deadline_us }, self.now())
        {
            match a {
                ClientAction::Send(f) => frame = Some(f),
                ClientAction::Failed { reason, .. } => return Err(reason),
                _ => {}
            }
        }
        let frame = frame.ok_or(QueryFailure::NotReady)?;
        let frames = match tokio::time::timeout(deadline, exchange(&self.conn, &frame)).await {
            Ok(Ok(frames)) => frames,
            Ok(Err(_)) => {
                let actions = self
                    .session
                    .lock()
                    .handle(ClientEvent::Disconnected, self.now());
                drop(actions);
                return Err(QueryFailure::Disconnected);
            }
            Err(_) => {
                self.session.lock().handle_timeout(deadline_us);
                return Err(QueryFailure::Timeout);
            }
        };
        for f in frames {
            for a in self
                .session
                .lock()
                .handle(ClientEvent::Received(f), self.now())
            {
                match a {
                    ClientAction::Answered(answer) if answer.query_id == id => return Ok(answer),
                    ClientAction::Failed { query_id, reason } if query_id == id => {
                        return Err(reason);
                    }
                    _ => {}
                }
            }
        }
        Err(QueryFailure::Disconnected)
    }
}
