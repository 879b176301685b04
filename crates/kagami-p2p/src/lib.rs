//! Peer routing between kagami nodes: which nodes hold a content key, and at which HTTP address
//! they serve it to their peers.
//!
//! Keys are strings such as `sha256:<hex>` (a blob or manifest digest) or
//! `tag:<registry>/<repository>:<tag>` (a resolved tag). A node [`Router::advertise`]s the keys
//! it holds and [`Router::lookup`]s the nodes that hold a key. Content itself moves over HTTP
//! between nodes and is verified by the receiver; this crate only answers "who has it".
//!
//! Two implementations: [`MemoryRouter`] (nodes sharing one [`MemoryNetwork`] in one process,
//! deterministic, for tests of the server) and [`Libp2pRouter`] (a private Kademlia DHT over
//! libp2p, for real clusters). Both pass one conformance suite (`tests/conformance.rs`).
//!
//! Invariants:
//! - **No content, no HTTP.** The crate never sees a blob; it names peers. Whatever it returns
//!   may be stale (a provider record outlives a withdraw or a dead node by up to its TTL): the
//!   caller fetches from the peer and verifies the digest, so a wrong answer costs a request,
//!   never a wrong byte.
//! - A lookup never returns this node, never more than `limit` peers, and always ends: by the
//!   configured lookup timeout (150 ms by default) with whatever it resolved by then.
//! - Only nodes holding the network's pre-shared key (when one is configured) can connect,
//!   and so appear as members or providers.
//! - A node's peer id is its identity file: the same file gives the same id across restarts.

use std::net::SocketAddr;
use std::path::PathBuf;

pub use futures_util::future::BoxFuture;

mod capped_store;
mod keys;
mod libp2p_router;
mod memory;

pub use keys::{identity_peer_id, load_psk};
pub use libp2p_router::{DEFAULT_MAX_PROVIDER_RECORDS_PER_PEER, Libp2pRouter, P2pConfig};
pub use memory::{MemoryNetwork, MemoryRouter};

/// A node that holds content: its stable id and the HTTP address where it serves peers.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Peer {
    pub id: String,
    pub http_addr: SocketAddr,
}

/// A node this router currently knows about, for status pages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// The node's stable id (a libp2p peer id for [`Libp2pRouter`]).
    pub id: String,
    /// Where it serves peers over HTTP, when known.
    pub http_addr: Option<SocketAddr>,
    /// Its transport addresses (libp2p multiaddrs), empty for [`MemoryRouter`].
    pub addrs: Vec<String>,
}

/// Finds the nodes that hold a key. Every method is cheap to call concurrently.
pub trait Router: Send + Sync + 'static {
    /// Whether the router has joined the network (always true for a single node configured
    /// without bootstrap peers); resolves at once. `/readyz` does not ask it: a node must
    /// be ready (and so in the headless Service) for the others to join through it.
    fn ready(&self) -> BoxFuture<'_, bool>;
    /// Up to `limit` peers (never this node) that advertised `key`. Bounded by the router's
    /// lookup timeout: when nobody has the key the answer is an empty list, never a hang.
    fn lookup(&self, key: &str, limit: usize) -> BoxFuture<'_, Vec<Peer>>;
    /// Announces that this node holds `keys`, until they are withdrawn.
    fn advertise(&self, keys: Vec<String>) -> BoxFuture<'_, ()>;
    /// Stops announcing `keys`.
    fn withdraw(&self, keys: Vec<String>) -> BoxFuture<'_, ()>;
    /// Other nodes currently known, never this node.
    fn members(&self) -> Vec<Member>;
}

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum P2pError {
    #[error("cannot read identity file {path}: {source}")]
    IdentityRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write identity file {path}: {source}")]
    IdentityWrite {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("identity file {path} is not a libp2p private key (protobuf encoding): {reason}")]
    IdentityDecode { path: PathBuf, reason: String },
    #[error("cannot read pre-shared key file {path}: {source}")]
    PskRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("pre-shared key file {path} is invalid: {reason}")]
    PskInvalid { path: PathBuf, reason: String },
    #[error("cannot listen for peers on {addr}: {reason}")]
    Listen { addr: SocketAddr, reason: String },
    #[error("bad bootstrap entry {entry:?}: {reason}")]
    Bootstrap { entry: String, reason: String },
    #[error("cannot set up the libp2p transport: {0}")]
    Transport(String),
}
