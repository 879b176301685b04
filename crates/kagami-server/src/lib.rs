//! kagami's OCI distribution pull API (work in progress).

pub mod error;
pub mod path;
