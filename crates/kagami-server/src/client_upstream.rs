//! The real [`Upstream`]: kagami-client walking the plan's endpoint attempts, with the
//! client's one walk ([`kagami_client::Walk`]) and so its fallback and retry rule.

use std::io;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt, TryStreamExt};
use kagami_client::{AttemptError, Client, ClientOptions, Error, Health, OpenedBlob};
use kagami_config::{Digest, Plan};

use crate::upstream::{
    BlobBody, BlobHead, FetchedManifest, FetchedReferrers, ManifestHead, Upstream, UpstreamError,
};

pub struct ClientUpstream {
    client: Client,
}

impl ClientUpstream {
    pub fn new() -> Self {
        Self::with_options(ClientOptions::default())
    }

    pub fn with_options(options: ClientOptions) -> Self {
        Self::with_health(options, Health::default())
    }

    /// An upstream whose walks skip endpoints as `health` says: one [`Health`] for every
    /// request of the process, so that a rate limit or an open circuit seen by one request
    /// spares the endpoint for all of them.
    pub fn with_health(options: ClientOptions, health: Health) -> Self {
        Self {
            client: Client::with_health(options, health),
        }
    }

    /// The mirror's upstream: timeouts shorter than containerd's own patience (30 s per
    /// hanging host), so that kagami answers, even with a 404, before containerd gives up.
    ///
    /// Its clients choose the image names, so a registry without a `mirrors` entry of its
    /// own (reached through `"*"`) is reached on public addresses only.
    pub fn for_mirror() -> Self {
        Self::for_mirror_with(Health::default())
    }

    /// [`ClientUpstream::for_mirror`] with the endpoint health given.
    pub fn for_mirror_with(health: Health) -> Self {
        Self::with_health(Self::mirror_options(), health)
    }

    /// The client options of [`ClientUpstream::for_mirror`].
    pub fn mirror_options() -> ClientOptions {
        ClientOptions {
            connect_timeout: std::time::Duration::from_secs(2),
            read_timeout: std::time::Duration::from_secs(10),
            public_only_for_name_chosen: true,
            ..Default::default()
        }
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
    // Every endpoint left alone (rate limited, circuit open): said once, as it happened,
    // by the endpoint health; not again for every request.
    let skipped = errors
        .iter()
        .all(|a| matches!(a.error, Error::Skipped { .. }));
    if not_found || skipped {
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

/// What a client may learn about a failed attempt ([`Error::reason`]): nothing the
/// upstream wrote (error bodies, redirect targets) and nothing that tells a refused
/// connection from a timeout.
pub fn client_reason(e: &Error) -> String {
    e.reason()
}

impl Upstream for ClientUpstream {
    fn health(&self) -> Option<Health> {
        Some(self.client.health().clone())
    }

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

    fn referrers<'a>(
        &'a self,
        plan: &'a Plan,
        subject: &'a Digest,
    ) -> BoxFuture<'a, Result<FetchedReferrers, UpstreamError>> {
        async move {
            let r = self
                .client
                .referrers(plan, subject)
                .await
                .map_err(all_failed)?;
            Ok(FetchedReferrers {
                bytes: r.bytes,
                digest: r.digest,
                source: r.endpoint,
                tag_schema: r.via == kagami_client::ReferrersVia::TagSchema,
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::http::StatusCode;
    use kagami_config::{Attempt, Config, Reference};

    /// A registry that answers 503 to its first `fail` requests and then 200 with an
    /// empty tag list (fault injection: a real registry does not fail on demand).
    async fn flaky(fail: usize) -> (String, Arc<AtomicUsize>) {
        let seen = Arc::new(AtomicUsize::new(0));
        let count = seen.clone();
        let app = axum::Router::new().fallback(move || {
            let n = count.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < fail {
                    (StatusCode::SERVICE_UNAVAILABLE, "{}")
                } else {
                    (StatusCode::OK, r#"{"name":"team/app","tags":[]}"#)
                }
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (addr.to_string(), seen)
    }

    fn plan(hosts: &[&str]) -> Plan {
        let config = Config::embedded_default();
        Plan {
            image: Reference::parse("r.example/team/app:1").unwrap(),
            attempts: hosts
                .iter()
                .map(|h| Attempt::Endpoint(kagami_client::push_target(&config, h, "team/app")))
                .collect(),
        }
    }

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    /// `serve`'s path follows the client's rule: a 5xx of the last endpoint is retried
    /// once (for every operation, not only a manifest GET), one of an earlier endpoint is
    /// not.
    #[tokio::test]
    async fn the_last_endpoint_is_retried_once_on_a_5xx() {
        let up = ClientUpstream::new();
        let digest: Digest = D.parse().unwrap();
        let (last, seen) = flaky(1).await;
        let p = plan(&[&last]);
        up.head_blob(&p, &digest).await.unwrap();
        assert_eq!(seen.load(Ordering::SeqCst), 2);
        up.tags(&p, None, None).await.unwrap();
        assert_eq!(seen.load(Ordering::SeqCst), 3);

        let (first, first_seen) = flaky(usize::MAX).await;
        let (last, last_seen) = flaky(2).await;
        let p = plan(&[&first, &last]);
        let e = up.tags(&p, None, None).await.unwrap_err();
        assert_eq!(first_seen.load(Ordering::SeqCst), 1);
        assert_eq!(last_seen.load(Ordering::SeqCst), 2);
        assert!(!e.not_found);
        assert!(
            e.message.contains(&format!("{first}/v2: HTTP 503")),
            "{}",
            e.message
        );
        assert!(
            e.message.contains(&format!("{last}/v2: HTTP 503")),
            "{}",
            e.message
        );
        // The blob walk starts at the attempt asked, and says which one answered.
        let b = up.blob(&p, &digest, 0, 1).await.unwrap();
        assert_eq!((b.attempt, first_seen.load(Ordering::SeqCst)), (1, 1));
    }
}
