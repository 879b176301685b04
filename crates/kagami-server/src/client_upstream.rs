//! The real [`Upstream`]: kagami-client walking the plan's endpoint attempts.

use std::io;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt, TryStreamExt};
use kagami_client::{Client, ClientOptions, Error, endpoint_attempts};
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
fn all_failed(what: &str, errors: &[(String, Error)]) -> UpstreamError {
    if errors.is_empty() {
        return UpstreamError {
            message: format!("{what}: no endpoint to try"),
            not_found: true,
        };
    }
    let id = crate::request_id::current_or_new();
    let detail: Vec<String> = errors.iter().map(|(ep, e)| format!("{ep}: {e}")).collect();
    let not_found = errors.iter().all(|(_, e)| e.status() == Some(404));
    if not_found {
        tracing::info!(request_id = %id, "{what}: every attempt failed: {}", detail.join("; "));
    } else {
        tracing::warn!(request_id = %id, "{what}: every attempt failed: {}", detail.join("; "));
    }
    let short: Vec<String> = errors
        .iter()
        .map(|(ep, e)| format!("{ep}: {}", client_reason(e)))
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

fn parse_digest(s: &str) -> Result<Digest, UpstreamError> {
    s.parse()
        .map_err(|e: kagami_config::ReferenceError| UpstreamError {
            message: e.to_string(),
            not_found: false,
        })
}

impl Upstream for ClientUpstream {
    fn manifest<'a>(
        &'a self,
        plan: &'a Plan,
        reference: &'a str,
    ) -> BoxFuture<'a, Result<FetchedManifest, UpstreamError>> {
        async move {
            let mut errors = Vec::new();
            let attempts: Vec<_> = endpoint_attempts(plan).collect();
            for (i, a) in attempts.iter().enumerate() {
                let mut r = self.client.manifest_from(a, reference).await;
                if i + 1 == attempts.len()
                    && r.as_ref()
                        .is_err_and(|e| e.status().is_some_and(|s| s >= 500))
                {
                    r = self.client.manifest_from(a, reference).await;
                }
                match r {
                    Ok(m) => {
                        return Ok(FetchedManifest {
                            digest: parse_digest(&m.digest)?,
                            bytes: m.bytes,
                            media_type: m.media_type,
                            source: m.endpoint,
                        });
                    }
                    Err(e) => errors.push((a.endpoint.base(), e)),
                }
            }
            Err(all_failed(
                &format!("manifest {}:{reference}", plan.image.name()),
                &errors,
            ))
        }
        .boxed()
    }

    fn tags<'a>(
        &'a self,
        plan: &'a Plan,
        n: Option<u32>,
        last: Option<&'a str>,
    ) -> BoxFuture<'a, Result<kagami_client::TagPage, UpstreamError>> {
        async move {
            let mut errors = Vec::new();
            for a in endpoint_attempts(plan) {
                match self.client.tags_from(a, n, last).await {
                    Ok(page) => return Ok(page),
                    Err(e) => errors.push((a.endpoint.base(), e)),
                }
            }
            Err(all_failed(
                &format!("tag list of {}", plan.image.name()),
                &errors,
            ))
        }
        .boxed()
    }

    fn head_manifest<'a>(
        &'a self,
        plan: &'a Plan,
        tag: &'a str,
    ) -> BoxFuture<'a, Result<ManifestHead, UpstreamError>> {
        async move {
            let mut errors = Vec::new();
            for a in endpoint_attempts(plan) {
                match self.client.head_manifest_from(a, tag).await {
                    Ok(h) => {
                        return Ok(ManifestHead {
                            digest: parse_digest(&h.digest)?,
                            media_type: h.media_type,
                            source: h.endpoint,
                        });
                    }
                    Err(e) => errors.push((a.endpoint.base(), e)),
                }
            }
            Err(all_failed(
                &format!("manifest HEAD {}:{tag}", plan.image.name()),
                &errors,
            ))
        }
        .boxed()
    }

    fn head_blob<'a>(
        &'a self,
        plan: &'a Plan,
        digest: &'a Digest,
    ) -> BoxFuture<'a, Result<BlobHead, UpstreamError>> {
        async move {
            let mut errors = Vec::new();
            for a in endpoint_attempts(plan) {
                match self.client.head_blob_from(a, digest).await {
                    Ok(size) => {
                        return Ok(BlobHead {
                            size,
                            source: a.endpoint.base(),
                        });
                    }
                    Err(e) => errors.push((a.endpoint.base(), e)),
                }
            }
            Err(all_failed(&format!("blob HEAD {digest}"), &errors))
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
            let attempts: Vec<_> = endpoint_attempts(plan).collect();
            let mut errors = Vec::new();
            for (i, a) in attempts.iter().enumerate().skip(from_attempt) {
                match self.client.open_blob(a, digest, None, offset, None).await {
                    Ok(s) => {
                        let size = s.content_length.map(|l| s.start + l);
                        let skip = offset - s.start.min(offset);
                        let source = s.endpoint.clone();
                        // The verification of the whole blob is the store's job: the
                        // client does not hash it a second time.
                        let stream = s.unverified().map_err(io::Error::other);
                        let stream = skip_bytes(stream, skip).boxed();
                        return Ok(BlobBody {
                            stream,
                            size,
                            source,
                            attempt: i,
                        });
                    }
                    Err(e) => {
                        tracing::info!(endpoint = %a.endpoint, error = %e, "blob attempt failed");
                        errors.push((a.endpoint.base(), e));
                    }
                }
            }
            Err(all_failed(&format!("blob {digest}"), &errors))
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
