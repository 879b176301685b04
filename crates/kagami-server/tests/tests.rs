//! kagami-server's integration tests: one binary, one module per area (run one area with
//! `cargo test -p kagami-server --features containerd --test tests -- peers::`). The server
//! runs on a real store bound to 127.0.0.1; upstreams and misbehaving peers are fakes in
//! the test (`common`), containerd is the real one.

mod common;

mod claims;
#[cfg(feature = "containerd")]
mod containerd;
mod import;
mod peer_security;
mod peers;
mod pieces;
mod proxy;
mod purge;
mod referrers;
mod server;
mod status;
mod telemetry;
mod upstream_health;
mod warm;
