//! Where bytes came from: typed here, written as text only for logs, metrics and the
//! status page (an endpoint's base URL, or `peer:<id>`).

use std::fmt;

/// What the request log and metrics say about where a response's bytes came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Local,
    Peer,
    Upstream,
    None,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Local => "local",
            Source::Peer => "peer",
            Source::Upstream => "upstream",
            Source::None => "none",
        }
    }
}

/// The remote a body or a manifest came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A registry endpoint, as the upstream names it.
    Endpoint(String),
    /// Another kagami node, by its P2P id.
    Peer(String),
}

impl Origin {
    /// The label of the request log and metrics.
    pub fn source(&self) -> Source {
        match self {
            Origin::Endpoint(_) => Source::Upstream,
            Origin::Peer(_) => Source::Peer,
        }
    }

    /// The node's id, when it came from one.
    pub fn peer(&self) -> Option<&str> {
        match self {
            Origin::Peer(id) => Some(id),
            Origin::Endpoint(_) => None,
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Endpoint(e) => f.write_str(e),
            Origin::Peer(id) => write!(f, "peer:{id}"),
        }
    }
}
