//! The edge's QUIC link to the cloud (quinn + rustls with ring, TLS 1.3, ALPN `tiervec/1`,
//! mutual TLS with the edge's certificate). The protocol logic is the sans-IO
//! `tiervec_shared::protocol::session::ClientSession`; this module moves its frames over one
//! bidirectional stream per exchange and enforces deadlines.
//!
//! A [`Connector`] outlives connections: it keeps one endpoint and one rustls client
//! configuration, whose in-memory session store holds the tickets the cloud issued. A
//! reconnection that finds a ticket resumes the TLS session and sends its first flight — the
//! Hello, and a query waiting for the link pipelined behind it — as 0-RTT data, so the first
//! answer arrives one round trip after the first packet instead of three. Tickets are single
//! use (the cloud keeps them in a stateful cache and takes each out when it is used) and live
//! in memory only: a restart of the edge or of the cloud costs the next connection a full
//! handshake. When the cloud rejects the early data (it lost the ticket), quinn reports the
//! first flight's stream as rejected and the flight is sent again once the handshake is done.
//!
//! Its parts, from the bottom: `tls` (the configuration: where the cloud is, the certificates,
//! the rustls client configuration), `stream` (one exchange of frames on one stream, UDP byte
//! accounting), `push` (what the cloud pushes: the streams it opens, delta or streamed
//! snapshot applied before the acknowledgement, and the resync of the cache when a connection
//! starts), `connect` (the [`Connector`] and the [`CloudLink`] it makes, which asks queries).

mod connect;
mod push;
mod stream;
mod tls;

pub use connect::{CloudLink, Connected, Connector, Handshake, UNRESPONSIVE_AFTER};
pub use push::PushTarget;
pub use tls::{LinkConfig, LinkError, client_config};
