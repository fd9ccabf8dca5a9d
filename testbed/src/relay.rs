//! A UDP relay that injects network faults between an edge process and the cloud process: each
//! client (an edge's QUIC endpoint) gets a socket of its own toward the upstream (the cloud's
//! QUIC address), and every datagram, either way, is dropped, delayed or cut off as the current
//! [`Faults`] say. Delays drawn per datagram reorder them; a partition drops everything.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

/// What happens to each datagram.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Faults {
    /// Every datagram waits this long,
    pub delay: Duration,
    /// plus a uniform draw in `[0, jitter]` of its own (so later ones may overtake it).
    pub jitter: Duration,
    /// The fraction of datagrams dropped (0..1).
    pub loss: f64,
    /// Drop everything.
    pub partitioned: bool,
}

/// Datagrams the relay has passed on and dropped, both directions together.
#[derive(Debug, Default)]
struct Counts {
    forwarded: AtomicU64,
    dropped: AtomicU64,
}

/// A running relay; dropping it stops it.
pub struct Relay {
    addr: SocketAddr,
    faults: Arc<Mutex<Faults>>,
    counts: Arc<Counts>,
    task: JoinHandle<()>,
}

impl Relay {
    /// Listens on a free loopback port and relays to `upstream`. Must run inside a tokio
    /// runtime.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Relay> {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let addr = front.local_addr()?;
        let faults = Arc::new(Mutex::new(Faults::default()));
        let counts = Arc::new(Counts::default());
        let task = tokio::spawn(relay_front(front, upstream, faults.clone(), counts.clone()));
        Ok(Relay {
            addr,
            faults,
            counts,
            task,
        })
    }

    /// Where clients send: the address to give an edge in place of the cloud's.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Applies `faults` to every datagram from now on.
    pub fn set(&self, faults: Faults) {
        *self.faults.lock().expect("never held across a panic") = faults;
    }

    /// `(forwarded, dropped)` datagrams so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.counts.forwarded.load(Ordering::Relaxed),
            self.counts.dropped.load(Ordering::Relaxed),
        )
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Sends `datagram` on `socket` (to `to`, or to its connected peer) after the faults' delay,
/// unless they drop it.
fn pass(
    socket: &Arc<UdpSocket>,
    to: Option<SocketAddr>,
    datagram: Vec<u8>,
    faults: &Mutex<Faults>,
    counts: &Arc<Counts>,
) {
    let f = *faults.lock().expect("never held across a panic");
    let mut rng = rand::rng();
    if f.partitioned || (f.loss > 0.0 && rng.random_bool(f.loss.min(1.0))) {
        counts.dropped.fetch_add(1, Ordering::Relaxed);
        return;
    }
    counts.forwarded.fetch_add(1, Ordering::Relaxed);
    let wait = f.delay + f.jitter.mul_f64(rng.random::<f64>());
    let (socket, counts) = (socket.clone(), counts.clone());
    let send = async move {
        let sent = match to {
            Some(to) => socket.send_to(&datagram, to).await,
            None => socket.send(&datagram).await,
        };
        if sent.is_err() {
            counts.dropped.fetch_add(1, Ordering::Relaxed);
        }
    };
    if wait.is_zero() {
        tokio::spawn(send);
    } else {
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            send.await;
        });
    }
}

/// A task that ends with its owner (the front loop's map, when the relay stops).
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn relay_front(
    front: Arc<UdpSocket>,
    upstream: SocketAddr,
    faults: Arc<Mutex<Faults>>,
    counts: Arc<Counts>,
) {
    let mut toward_upstream: HashMap<SocketAddr, (Arc<UdpSocket>, AbortOnDrop)> = HashMap::new();
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok((n, client)) = front.recv_from(&mut buf).await else {
            continue;
        };
        let (socket, _) = match toward_upstream.entry(client) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                let Ok(socket) = UdpSocket::bind("127.0.0.1:0").await else {
                    continue;
                };
                if socket.connect(upstream).await.is_err() {
                    continue;
                }
                let socket = Arc::new(socket);
                let back = tokio::spawn(relay_back(
                    socket.clone(),
                    front.clone(),
                    client,
                    faults.clone(),
                    counts.clone(),
                ));
                e.insert((socket, AbortOnDrop(back)))
            }
        };
        pass(socket, None, buf[..n].to_vec(), &faults, &counts);
    }
}

async fn relay_back(
    socket: Arc<UdpSocket>,
    front: Arc<UdpSocket>,
    client: SocketAddr,
    faults: Arc<Mutex<Faults>>,
    counts: Arc<Counts>,
) {
    let mut buf = vec![0u8; 65_536];
    loop {
        // A connected UDP socket reports the upstream's ICMP port-unreachable (the cloud
        // killed) as an error on the next receive; the relay keeps going, as a network would.
        let Ok(n) = socket.recv(&mut buf).await else {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        };
        pass(&front, Some(client), buf[..n].to_vec(), &faults, &counts);
    }
}
