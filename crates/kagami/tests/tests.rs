//! kagami's integration tests: one binary (see ripgrep), one module per area.

mod support;

mod bundle;
mod check;
mod client;
mod clients;
mod containerd;
#[cfg(feature = "containerd")]
mod cri;
mod demo;
mod deploy;
mod explain;
mod fake_registry;
mod image;
mod import;
mod name_forms;
#[cfg(feature = "containerd")]
mod p2p_containerd;
mod policy;
mod pull;
mod referrers;
mod serve;
mod status;
mod sync;
mod warm;
