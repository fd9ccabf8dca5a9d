//! The edge–cloud protocol, version 1, sans IO (documented in `docs/protocol.md`):
//! [`frame`] encodes and validates frames and splits byte streams into them; [`session`] holds
//! the edge's and the cloud's connection state machines, driven by events and the time. The
//! QUIC drivers in `tiervec-edge` and `tiervec-cloud` only move bytes and timers.

pub mod frame;
pub mod session;
