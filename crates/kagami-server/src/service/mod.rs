//! The services: what kagami does for a request, with no HTTP in it.
pub mod blobs;
pub mod error;
pub mod import;
pub(crate) mod manifests;
