//! How edges and applications reach the cloud: the QUIC endpoint for edges ([`quic`], mutual
//! TLS with the deployment's certificates, [`certs`]) and the HTTP/JSON API ([`http`]). Both
//! only move bytes and call the layers below: the service, the collections and the push hub.

pub mod certs;
pub mod http;
pub mod quic;
