//! The real [`Upstream`]: kagami-client walking the plan's endpoint attempts, with the
//! client's one walk ([`kagami_client::Walk`]) and so its fallback and retry rule.

use std::io;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt, TryStreamExt};
use kagami_client::{AttemptError, Client, ClientOptions, Error, OpenedBlob};
use kagami_config::{Digest, Plan};

use crate::upstream::{BlobBody, BlobHead, FetchedManifest, ManifestHead, Upstream, UpstreamError};

pub struct ClientUpstream {
    client: Client,
}

impl ClientUpstream {
    pub fn new() -> Self {
        Self::with_options(ClientOptions::default())
    }

    pub fn with_options(options: ClientOptions) -> Self {
        Self {
            client: Client::new(options),
        }
    }

    /// The mirror's upstream: timeouts shorter than containerd's own patience (30 s per
    /// hanging host), so that kagami answers, even with a 404, before containerd gives up.
    ///
    /// Its clients choose the image names, so a registry without a `mirrors` entry of its
    /// own (reached through `"*"`) is reached on public addresses only.
    pub fn for_mirror() -> Self {
        Self::with_options(ClientOptions {
            connect_timeout: std::time::Duration::from_secs(2),
            read_timeout: std::time::Duration::from_secs(10),
            public_only_for_name_chosen: true,
            ..Default::default()
        })
    }
}

impl Default for ClientUpstream {
    fn default() -> Self {
        Self::new()
    }
}

/// The error when every attempt failed. The full story (connection errors, redirect
/// URLs, what each registry answered) goes to the log under a request id; the message,
/// which reaches clients, names each endpoint with a short reason of kagami's own words
/// (an HTTP status, "no answer", "digest mismatch", ...) and that id.
fn all_failed(e: Error) -> UpstreamError {
    let (what, errors) = match e {
        Error::AllFailed { what, attempts } => (what, attempts),
        // The walk ends early only on a local failure, which these reads do not have.
        other => {
            return UpstreamError {
                message: client_reason(&other),
                not_found: false,
            };
        }
    };
    if errors.is_empty() {
        return UpstreamError {
            message: format!("{what}: no endpoint to try"),
            not_found: true,
        };
    }
    let id = crate::request_id::current_or_new();
    let detail: Vec<String> = errors
        .iter()
        .map(|a| format!("{}: {}", a.endpoint, a.error))
        .collect();
    let not_found = errors.iter().all(|a| a.error.status() == Some(404));
    if not_found {
        tracing::info!(request_id = %id, "{what}: every attempt failed: {}", detail.join("; "));
    } else {
        tracing::warn!(request_id = %id, "{what}: every attempt failed: {}", detail.join("; "));
    }
    let short: Vec<String> = errors
        .iter()
        .map(|AttemptError { endpoint, error }| format!("{endpoint}: {}", client_reason(error)))
        .collect();
    UpstreamError {
        message: format!(
            "{what}: every attempt failed: {} (details in kagami's log, request id {id})",
            short.join("; ")
        ),
        not_found,
    }
}

/// What a client may learn about a failed attempt: nothing the upstream wrote (error
/// bodies, redirect targets) and nothing that tells a refused connection from a timeout.
pub fn client_reason(e: &Error) -> String {
    match e {
        Error::Status { status, .. } => format!("HTTP {status}"),
        Error::Network { source, .. } if kagami_client::guard::is_refused_address(source) => {
            "refused: not a public address".into()
        }
        Error::Network { .. } | Error::Io { .. } => "no answer".into(),
        Error::DigestMismatch { .. } => "digest mismatch".into(),
        Error::SizeMismatch { .. } => "size mismatch".into(),
        Error::ManifestTooBig { .. } => "manifest too big".into(),
        Error::InvalidManifest { .. } => "invalid manifest".into(),
        Error::Auth { .. } => "authentication failed".into(),
        Error::Redirects { .. } => "too many redirects".into(),
        Error::Refused { .. } => "refused (address or redirect not allowed)".into(),
        Error::TlsSetup { .. } => "TLS setup failed".into(),
        Error::AllFailed { .. } => "failed".into(),
    }
}

impl Upstream for ClientUpstream {
    fn manifest<'a>(
        &'a self,
        plan: &'a Plan,
        reference: &'a str,
    ) -> BoxFuture<'a, Result<FetchedManifest, UpstreamError>> {
        async move {
            let m = self
                .client
                .manifest(plan, reference)
                .await
                .map_err(all_failed)?;
            Ok(FetchedManifest {
                digest: m.digest,
                bytes: m.bytes,
                media_type: m.media_type,
                source: m.endpoint,
            })
        }
        .boxed()
    }

    fn tags<'a>(
        &'a self,
        plan: &'a Plan,
        n: Option<u32>,
        last: Option<&'a str>,
    ) -> BoxFuture<'a, Result<kagami_client::TagPage, UpstreamError>> {
        async move { self.client.tags(plan, n, last).await.map_err(all_failed) }.boxed()
    }

    fn head_manifest<'a>(
        &'a self,
        plan: &'a Plan,
        tag: &'a str,
    ) -> BoxFuture<'a, Result<ManifestHead, UpstreamError>> {
        async move {
            let h = self
                .client
                .head_manifest(plan, tag)
                .await
                .map_err(all_failed)?;
            Ok(ManifestHead {
                digest: h.digest,
                media_type: h.media_type,
                source: h.endpoint,
            })
        }
        .boxed()
    }

    fn head_blob<'a>(
        &'a self,
        plan: &'a Plan,
        digest: &'a Digest,
    ) -> BoxFuture<'a, Result<BlobHead, UpstreamError>> {
        async move {
            let (size, source) = self
                .client
                .head_blob(plan, digest)
                .await
                .map_err(all_failed)?;
            Ok(BlobHead { size, source })
        }
        .boxed()
    }

    fn blob<'a>(
        &'a self,
        plan: &'a Plan,
        digest: &'a Digest,
        offset: u64,
        from_attempt: usize,
    ) -> BoxFuture<'a, Result<BlobBody, UpstreamError>> {
        async move {
            let OpenedBlob { stream: s, attempt } = self
                .client
                .open_blob_in(plan, from_attempt, digest, None, offset, None)
                .await
                .map_err(all_failed)?;
            let size = s.content_length.map(|l| s.start + l);
            let skip = offset - s.start.min(offset);
            let source = s.endpoint.clone();
            // The verification of the whole blob is the store's job: the client does not
            // hash it a second time.
            let stream = s.unverified().map_err(io::Error::other);
            let stream = skip_bytes(stream, skip).boxed();
            Ok(BlobBody {
                stream,
                size,
                source,
                attempt,
            })
        }
        .boxed()
    }
}

/// Drops the first `n` bytes of a stream (an upstream that ignored `Range`).
pub(crate) fn skip_bytes(
    s: impl futures_util::Stream<Item = io::Result<Bytes>> + Send + 'static,
    n: u64,
) -> impl futures_util::Stream<Item = io::Result<Bytes>> + Send + 'static {
    let mut left = n;
    s.filter_map(move |chunk| {
        let out = match chunk {
            Ok(mut c) if left > 0 => {
                let take = left.min(c.len() as u64) as usize;
                left -= take as u64;
                let rest = c.split_off(take);
                (!rest.is_empty()).then_some(Ok(rest))
            }
            other => Some(other),
        };
        std::future::ready(out)
    })
}
