//! What a service answers: typed replies that the HTTP layer turns into responses in one
//! place (`crate::http::reply`). Bodies are streams, never a blob whole in memory.

use std::io;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use kagami_config::Digest;

use crate::origin::Source;
use crate::range::{self, RangeRequest};

/// A blob body as it streams (from the store, a fetch in flight, an endpoint, a peer or
/// containerd's content store).
pub type ByteStream = BoxStream<'static, io::Result<Bytes>>;

/// Which bytes of a blob a reply carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Span {
    /// The whole blob; its size when known.
    Full(Option<u64>),
    /// `len` bytes from `start` of a blob of `size` bytes (a `206`).
    Partial { start: u64, len: u64, size: u64 },
}

impl Span {
    /// The span a `Range` header asks of a blob of `size` bytes; `None` when it cannot be
    /// satisfied.
    pub fn of(range_header: Option<&str>, size: u64) -> Option<Span> {
        match range::parse(range_header, size) {
            RangeRequest::Full => Some(Span::Full(Some(size))),
            RangeRequest::Partial(r) => Some(Span::Partial {
                start: r.start,
                len: r.len(),
                size,
            }),
            RangeRequest::Unsatisfiable => None,
        }
    }

    /// Where the bytes start and how many there are (`None`: to the end, size unknown).
    pub fn window(self) -> (u64, Option<u64>) {
        match self {
            Span::Full(size) => (0, size),
            Span::Partial { start, len, .. } => (start, Some(len)),
        }
    }
}

/// A blob answer.
pub enum BlobReply {
    Bytes {
        digest: Digest,
        span: Span,
        /// `None` for a HEAD.
        body: Option<ByteStream>,
        source: Source,
    },
    /// The `Range` asked lies past the end of a blob of this size (a `416`).
    Unsatisfiable { size: u64 },
}

impl BlobReply {
    pub fn source(&self) -> Source {
        match self {
            BlobReply::Bytes { source, .. } => *source,
            BlobReply::Unsatisfiable { .. } => Source::None,
        }
    }
}

/// A manifest answer (manifests, at most 4 MiB, are held whole).
pub struct ManifestReply {
    pub digest: Digest,
    pub media_type: String,
    pub len: u64,
    /// `None` for a HEAD.
    pub body: Option<Bytes>,
    pub source: Source,
}

/// A page of a repository's tag list.
pub struct TagsReply {
    pub tags: Vec<String>,
    /// The page that follows: (`n` as the client gave it, the last tag of this page).
    pub next: Option<(Option<u32>, String)>,
    pub source: Source,
}

/// A referrers list (an OCI image index), whole: at most 4 MiB.
#[derive(Debug, Clone)]
pub struct ReferrersReply {
    /// The index; `None` for a HEAD.
    pub body: Option<Bytes>,
    pub len: u64,
    /// Whether the `artifactType` filter was applied.
    pub filtered: bool,
    pub source: Source,
}
