//! Loopback ports free right now, for a server that must be told its address before it starts
//! (a child process's config, a QUIC endpoint that keeps its port across a restart). Another
//! process may take the port before it is bound again; on loopback in a test that is rare.

use std::net::{SocketAddr, TcpListener, UdpSocket};

/// A TCP port free on 127.0.0.1.
pub fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free TCP port on loopback")
        .port()
}

/// A UDP address free on 127.0.0.1.
pub fn free_udp_addr() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free UDP port on loopback")
}
