//! The seam between the server and whatever fetches from registries. The real
//! implementation adapts `kagami-client`; tests use fakes for fault injection.

use std::io;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use kagami_config::{Digest, Plan};

/// A manifest fetched and verified against its digest.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    pub bytes: Bytes,
    pub media_type: String,
    pub digest: Digest,
    /// The endpoint it came from (for logs and metrics).
    pub source: String,
}

/// What a manifest HEAD by tag says.
#[derive(Debug, Clone)]
pub struct ManifestHead {
    pub digest: Digest,
    pub media_type: String,
    pub source: String,
}

/// A blob body from one attempt, starting at the requested offset. Not verified here:
/// the content store hashes the whole blob across attempts.
pub struct BlobBody {
    pub stream: BoxStream<'static, io::Result<Bytes>>,
    /// Total size of the blob (not of the remaining body), when the upstream said.
    pub size: Option<u64>,
    pub source: String,
    /// Index of the plan attempt that answered, so a resume can start after it.
    pub attempt: usize,
}

/// What a blob HEAD says.
#[derive(Debug, Clone)]
pub struct BlobHead {
    /// The blob's size, when the endpoint said.
    pub size: Option<u64>,
    pub source: String,
}

/// A referrers list (an OCI image index, checked to be one), from the first endpoint that
/// had one: its referrers API, or on a registry without it the tag-schema index.
#[derive(Debug, Clone)]
pub struct FetchedReferrers {
    pub bytes: Bytes,
    /// sha256 of `bytes`.
    pub digest: Digest,
    pub source: String,
    /// True when it came from the referrers tag schema rather than the referrers API.
    pub tag_schema: bool,
}

/// Why every attempt failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct UpstreamError {
    pub message: String,
    /// True when every attempt said "not found" (as opposed to errors).
    pub not_found: bool,
}

pub trait Upstream: Send + Sync + 'static {
    /// GET a manifest by tag or digest through the plan, verified.
    fn manifest<'a>(
        &'a self,
        plan: &'a Plan,
        reference: &'a str,
    ) -> BoxFuture<'a, Result<FetchedManifest, UpstreamError>>;

    /// HEAD a manifest by tag through the plan (tag revalidation). Upstreams that have no
    /// cheaper way keep this default: the manifest itself, its body dropped.
    fn head_manifest<'a>(
        &'a self,
        plan: &'a Plan,
        tag: &'a str,
    ) -> BoxFuture<'a, Result<ManifestHead, UpstreamError>> {
        Box::pin(async move {
            let m = self.manifest(plan, tag).await?;
            Ok(ManifestHead {
                digest: m.digest,
                media_type: m.media_type,
                source: m.source,
            })
        })
    }

    /// One page of the repository's tag list (`n` tags at most, after `last`), from the
    /// first endpoint that answers. Upstreams that cannot list tags keep this default.
    fn tags<'a>(
        &'a self,
        _plan: &'a Plan,
        _n: Option<u32>,
        _last: Option<&'a str>,
    ) -> BoxFuture<'a, Result<kagami_client::TagPage, UpstreamError>> {
        Box::pin(async {
            Err(UpstreamError {
                message: "this upstream does not list tags".into(),
                not_found: true,
            })
        })
    }

    /// HEAD a blob through the plan (a client's HEAD of a blob not in the store). The
    /// default opens a GET and drops it at once, reading only its headers; the real
    /// upstream sends a HEAD.
    fn head_blob<'a>(
        &'a self,
        plan: &'a Plan,
        digest: &'a Digest,
    ) -> BoxFuture<'a, Result<BlobHead, UpstreamError>> {
        Box::pin(async move {
            let b = self.blob(plan, digest, 0, 0).await?;
            Ok(BlobHead {
                size: b.size,
                source: b.source,
            })
        })
    }

    /// The referrers of `subject` through the plan (`kagami_client::Client::referrers`).
    /// `not_found` when no endpoint has any. Upstreams that cannot list referrers keep
    /// this default: none.
    fn referrers<'a>(
        &'a self,
        _plan: &'a Plan,
        _subject: &'a Digest,
    ) -> BoxFuture<'a, Result<FetchedReferrers, UpstreamError>> {
        Box::pin(async {
            Err(UpstreamError {
                message: "this upstream does not list referrers".into(),
                not_found: true,
            })
        })
    }

    /// The endpoint health its walks follow (rate limits, circuits), for `/status` and
    /// `/metrics`; `None` for upstreams that keep none.
    fn health(&self) -> Option<kagami_client::Health> {
        None
    }

    /// GET a blob from `offset`, trying the plan's attempts from index `from_attempt` on.
    fn blob<'a>(
        &'a self,
        plan: &'a Plan,
        digest: &'a Digest,
        offset: u64,
        from_attempt: usize,
    ) -> BoxFuture<'a, Result<BlobBody, UpstreamError>>;
}
