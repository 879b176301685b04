//! The HTTP layer: the only part of the server that knows axum.
pub(crate) mod log;
pub mod peer_api;
