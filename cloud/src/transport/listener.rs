//! The HTTP accept loop: every connection a client can open costs a file descriptor, so their
//! number is capped (below the process's descriptor soft limit, whatever the configuration says,
//! so the write-ahead log, checkpoints and the QUIC socket always find one), a connection must
//! send each request's headers within a deadline (slow or idle clients are closed), and at the
//! cap a new connection evicts the longest-idle one rather than wait behind it. axum's own
//! `serve` has none of these.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore, watch};
use tower::ServiceExt;

/// Descriptors kept back from HTTP connections: the log's segment, checkpoint and restore
/// files, the QUIC socket, the blocking pool's files and the runtime's own.
pub const FD_RESERVE: usize = 256;

/// The most connections any configuration gets (far above what descriptors allow anyway).
pub const MAX_CONNECTIONS: usize = 1 << 20;

/// What the HTTP listener lets clients spend (`[http]` in the configuration).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpLimits {
    /// Most open connections. The listener lowers it to the descriptor soft limit less
    /// [`FD_RESERVE`] where that is smaller (and logs both), and to [`MAX_CONNECTIONS`].
    pub max_connections: usize,
    /// A connection must send a request's headers within this long of being accepted or of its
    /// last response, so it is also the keep-alive idle timeout.
    pub header_timeout_ms: u64,
    /// Most API requests (`/v1/collections…`) served at once; one more answers 503
    /// `overloaded` at once instead of queueing.
    pub max_concurrent_requests: usize,
    /// An API request not answered within this long answers 503 `deadline_exceeded` (a write
    /// may still land: upserts and deletes are idempotent, retry them).
    pub request_timeout_ms: u64,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_connections: 4_096,
            header_timeout_ms: 10_000,
            max_concurrent_requests: 256,
            request_timeout_ms: 30_000,
        }
    }
}

impl HttpLimits {
    /// The connection cap for a process whose descriptor soft limit is `nofile` (None when
    /// unlimited or unknown).
    pub fn connection_cap(&self, nofile: Option<u64>) -> usize {
        let by_fds = nofile.map_or(usize::MAX, |n| {
            usize::try_from(n)
                .unwrap_or(usize::MAX)
                .saturating_sub(FD_RESERVE)
        });
        self.max_connections.min(by_fds).clamp(1, MAX_CONNECTIONS)
    }
}

/// The process's soft limit on open descriptors, if it has a finite one.
pub fn descriptor_soft_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` through a valid pointer.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0;
    (ok && limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
}

/// One open connection as the accept loop sees it.
struct Tracked {
    /// Requests being served on it.
    in_flight: AtomicU32,
    /// Milliseconds since the listener started at which it last went idle (accepted, or a
    /// response finished).
    idle_since_ms: AtomicU64,
    evict: Notify,
}

/// The open connections, to choose one to evict.
struct Connections {
    started: Instant,
    open: Mutex<HashMap<u64, Arc<Tracked>>>,
}

impl Connections {
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Asks the connection idle the longest to close; false when every one is busy.
    fn evict_longest_idle(&self) -> bool {
        let open = self.open.lock();
        let idlest = open
            .values()
            .filter(|c| c.in_flight.load(Ordering::Acquire) == 0)
            .min_by_key(|c| c.idle_since_ms.load(Ordering::Relaxed));
        match idlest {
            Some(c) => {
                c.evict.notify_one();
                true
            }
            None => false,
        }
    }
}

/// Serves `router` on `listener` under `limits` until `shutdown` resolves, then lets open
/// requests finish and returns once every connection is closed.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: &HttpLimits,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let nofile = descriptor_soft_limit();
    let cap = limits.connection_cap(nofile);
    tracing::info!(
        cap,
        max_connections = limits.max_connections,
        descriptor_soft_limit = nofile,
        header_timeout_ms = limits.header_timeout_ms,
        "HTTP connections capped"
    );
    let permits = Arc::new(Semaphore::new(cap));
    let connections = Arc::new(Connections {
        started: Instant::now(),
        open: Mutex::new(HashMap::new()),
    });
    let (stop, stopped) = watch::channel(false);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(limits.header_timeout_ms));
    let http = Arc::new(http);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut next_id = 0u64;
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE and friends: the cap should prevent them; wait rather than spin.
                    tracing::warn!(error = %e, "accepting an HTTP connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let permit = match permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                if connections.evict_longest_idle() {
                    tracing::debug!(%peer, "at the connection cap: closing the longest-idle");
                } else {
                    tracing::warn!(%peer, cap, "at the connection cap with every connection busy");
                }
                tokio::select! {
                    () = &mut shutdown => break,
                    permit = permits.clone().acquire_owned() => permit.expect("never closed"),
                }
            }
        };
        let _ = stream.set_nodelay(true);
        next_id += 1;
        let id = next_id;
        let tracked = Arc::new(Tracked {
            in_flight: AtomicU32::new(0),
            idle_since_ms: AtomicU64::new(connections.now_ms()),
            evict: Notify::new(),
        });
        connections.open.lock().insert(id, tracked.clone());
        let service = {
            let (router, connections, tracked) =
                (router.clone(), connections.clone(), tracked.clone());
            hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
                let (router, connections, tracked) =
                    (router.clone(), connections.clone(), tracked.clone());
                async move {
                    tracked.in_flight.fetch_add(1, Ordering::AcqRel);
                    let response = router.oneshot(request).await;
                    tracked
                        .idle_since_ms
                        .store(connections.now_ms(), Ordering::Relaxed);
                    tracked.in_flight.fetch_sub(1, Ordering::AcqRel);
                    Ok::<_, Infallible>(response.unwrap_or_else(|never| match never {}))
                }
            })
        };
        let (http, connections, mut stopped) = (http.clone(), connections.clone(), stopped.clone());
        tokio::spawn(async move {
            let mut conn = std::pin::pin!(http.serve_connection(TokioIo::new(stream), service));
            let mut closing = false;
            let outcome = loop {
                tokio::select! {
                    outcome = conn.as_mut() => break outcome,
                    () = tracked.evict.notified(), if !closing => {
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                    _ = stopped.changed(), if !closing => {
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            };
            if let Err(e) = outcome {
                tracing::debug!(%peer, error = %e, "HTTP connection ended");
            }
            connections.open.lock().remove(&id);
            drop(permit);
        });
    }
    drop(listener);
    let _ = stop.send(true);
    // Every connection holds a permit until it closes.
    let _all = permits.acquire_many(cap as u32).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_leaves_descriptors_for_the_log() {
        let limits = HttpLimits::default();
        assert_eq!(limits.connection_cap(None), 4_096);
        assert_eq!(limits.connection_cap(Some(1_024)), 1_024 - FD_RESERVE);
        assert_eq!(limits.connection_cap(Some(20_000)), 4_096);
        assert_eq!(limits.connection_cap(Some(10)), 1, "never zero");
        assert_eq!(limits.connection_cap(Some(u64::MAX)), 4_096);
        let unbounded = HttpLimits {
            max_connections: usize::MAX,
            ..HttpLimits::default()
        };
        assert_eq!(unbounded.connection_cap(None), MAX_CONNECTIONS);
    }
}
