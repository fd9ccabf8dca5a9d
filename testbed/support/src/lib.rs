//! Test support shared by the workspace's test crates (a dev-dependency only; std, nothing
//! else, so it also builds for the `wasm32-wasip1` guest's tests):
//!
//! - [`vectors`] — deterministic hash-seeded test vectors, components in `[-0.5, 0.5)`, with
//!   families for tests that need distinct versions of the same id;
//! - [`process`] — [`ChildGuard`](process::ChildGuard), a child process killed (SIGKILL) and
//!   reaped when dropped, so a failed assertion leaves no server behind;
//! - [`net`] — loopback ports free right now;
//! - [`nats`] — a JetStream cluster of real `nats-server` processes;
//! - [`guest`] — the WASM guest built for the tests that run it;
//! - [`paths`] — the workspace root.

pub mod guest;
pub mod nats;
pub mod net;
pub mod paths;
pub mod process;
pub mod vectors;
