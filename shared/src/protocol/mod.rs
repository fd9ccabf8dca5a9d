//! The edge–cloud protocol, sans IO (documented in `docs/protocol.md`; version in
//! [`frame::PROTOCOL_VERSION`]): [`frame`] encodes and validates frames and splits byte streams
//! into them; [`session`] holds the edge's and the cloud's connection state machines, driven by
//! events and the time; [`transfer`] checks a streamed snapshot file as its chunks arrive;
//! [`cache`] holds what both sides decide alike about an edge's cache (whether it resyncs, and a
//! push's acknowledgement). The QUIC drivers in `tiervec-edge` and `tiervec-cloud` only move
//! bytes, files and timers.

pub mod cache;
pub mod frame;
pub mod session;
pub mod transfer;
