//! The composition root: a `tiervec-cloud serve` process put together from its parts — the
//! metrics recorder, the exact-search engine, the service, the HTTP API, and (when configured)
//! the QUIC endpoint with its push hub. Nothing below this module reads [`CloudConfig`].

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use thiserror::Error;

use crate::collection::gpu::ExactEngine;
use crate::config::CloudConfig;
use crate::hot::HotIds;
use crate::push::PushHub;
use crate::service::{Service, ServiceError};
use crate::text::{TextError, Texts};
use crate::transport::certs::CertDir;
use crate::transport::http::{AppState, KeyError, KeyTable, RequestGate, router};
use crate::transport::quic::{self, AccessList, QuicError};
use crate::transport::{ScanSlots, listener};

/// Why the server stopped or could not start.
#[derive(Debug, Error)]
pub enum ServerError {
    #[error("HTTP listener: {0}")]
    Io(#[from] std::io::Error),
    #[error("QUIC endpoint: {0}")]
    Quic(#[from] QuicError),
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error("server task: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("configuration: {0}")]
    Keys(#[from] KeyError),
    #[error("the server stopped before binding its address")]
    NotBound,
    #[error(transparent)]
    Text(#[from] TextError),
    #[error("development certificates: {0}")]
    DevCerts(#[from] crate::certs::CertError),
}

/// The process-wide Prometheus recorder (installed once; later calls share it).
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
                .set_buckets(&[
                    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                    0.25, 1.0,
                ])
                .expect("static buckets are valid")
                .build_recorder();
            let handle = recorder.handle();
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

impl Service {
    /// Opens the service as `tiervec-cloud serve` does: the exact-search engine of
    /// `config.gpu` probed first (its outcome logged and published as the
    /// `tiervec_exact_engine` gauge), then [`Service::start`] over the service's part of the
    /// configuration.
    pub fn open(config: CloudConfig) -> Result<Service, ServiceError> {
        let engine = ExactEngine::start(&config.gpu);
        engine.publish_gauge();
        Service::start(config.service(), engine)
    }
}

/// The HTTP API's shared state under `config`'s limits; its handlers answer 503 until
/// `service` is set.
pub fn api_state(
    config: &CloudConfig,
    keys: Arc<KeyTable>,
    service: Arc<OnceLock<Arc<Service>>>,
    texts: Arc<Texts>,
) -> AppState {
    AppState {
        service,
        keys,
        texts,
        metrics: prometheus(),
        max_body_bytes: config.max_body_bytes,
        hot: Arc::new(HotIds::new(config.hot.clone())),
        scans: ScanSlots::new(
            config
                .max_concurrent_scans
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        ),
        max_batch: config.max_batch,
        gate: Arc::new(RequestGate::new(
            config.http.max_concurrent_requests,
            Duration::from_millis(config.http.request_timeout_ms),
        )),
    }
}

/// `dev_certs`: what `tiervec-cloud certs --server-name localhost --edge …` makes, for every
/// edge of the access list, where it is missing (an existing CA and certificates are kept).
fn make_dev_certs<'a>(
    certs: &CertDir,
    edges: impl Iterator<Item = &'a String>,
) -> Result<(), crate::certs::CertError> {
    if certs.ensure_ca()? {
        tracing::warn!(
            dir = %certs.dir.display(),
            "dev_certs: made a CA whose key sits beside the certificates; for development only"
        );
    }
    if !certs.server_cert().exists() {
        certs.issue_server(&["localhost".to_owned()])?;
    }
    for edge in edges.filter(|e| e.as_str() != "*") {
        if !certs.edge_cert(edge).exists() {
            certs.issue_edge(edge)?;
            tracing::info!(edge = %edge, cert = %certs.edge_cert(edge).display(), "dev_certs: issued");
        }
    }
    Ok(())
}

/// Binds `config.http_addr`, starts recovery in the background and serves until `shutdown`
/// resolves. `on_bound` receives the bound address (port 0 picks one) before recovery starts.
pub async fn serve(
    config: CloudConfig,
    on_bound: impl FnOnce(SocketAddr),
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let keys = Arc::new(KeyTable::new(&config.api_keys)?);
    // A model folder that holds no model stops the server before it listens.
    let model_dir = config.model_dir.clone();
    let texts = tokio::task::spawn_blocking(move || Texts::open(model_dir.as_deref())).await??;
    let listener = tokio::net::TcpListener::bind(config.http_addr).await?;
    let addr = listener.local_addr()?;
    on_bound(addr);
    if config.api_keys.is_empty() {
        tracing::warn!("no API keys configured: the API is open to anyone who can reach {addr}");
    }
    let cell: Arc<OnceLock<Arc<Service>>> = Arc::new(OnceLock::new());
    let state = api_state(&config, keys, cell.clone(), Arc::new(texts));
    let scans = state.scans.clone();
    let hot = state.hot.clone();
    let push_config = config.push.clone();
    // The QUIC endpoint binds now (so a bad certificate fails fast) and serves once recovered.
    let quic = match config.quic_addr {
        Some(quic_addr) => {
            let certs = CertDir {
                dir: config.certs_dir.clone(),
                deployment: String::new(),
            };
            if config.dev_certs {
                make_dev_certs(&certs, config.edges.keys())?;
            }
            let endpoint = quic::bind(quic_addr, &certs, &config.quic)?;
            tracing::info!(addr = %endpoint.local_addr()?, "QUIC endpoint for edges (mutual TLS)");
            Some((
                endpoint,
                AccessList(config.edges.clone()),
                config.quic.clone(),
            ))
        }
        None => None,
    };
    let limits = config.http.clone();
    let recovery = tokio::task::spawn_blocking(move || Service::open(config));
    let server =
        tokio::spawn(
            async move { listener::serve(listener, router(state), &limits, shutdown).await },
        );
    let service = Arc::new(recovery.await??);
    tracing::info!(%addr, "serving");
    if let Some((endpoint, acl, quic_limits)) = quic {
        let push = PushHub::start(push_config, service.clone(), hot);
        tokio::spawn(quic::serve(
            endpoint,
            service.clone(),
            Arc::new(acl),
            push,
            scans,
            quic_limits,
        ));
    }
    let _ = cell.set(service);
    server.await??;
    Ok(())
}

/// A server running on the current tokio runtime, for embedding (tests, demos); it stops when
/// this is dropped.
pub struct Running {
    pub addr: SocketAddr,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// Starts [`serve`] on the current runtime and returns once the socket is bound (recovery may
/// still be running: poll `/readyz`).
pub async fn spawn(config: CloudConfig) -> Result<Running, ServerError> {
    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(
        config,
        move |addr| {
            let _ = addr_tx.send(addr);
        },
        async move {
            let _ = stopped.await;
        },
    ));
    match addr_rx.await {
        Ok(addr) => Ok(Running { addr, _stop: stop }),
        Err(_) => Err(server.await?.err().unwrap_or(ServerError::NotBound)),
    }
}
