//! Blob bodies for a reply: a stored blob (with `Range`), a fetch in flight, and a
//! pass-through from upstream when the store cannot take the blob.

use super::*;

/// Reads of a stored blob for one response, while few are being sent: large reads are
/// fastest for one client (about 2 GB/s warm against 1.5 with 64 KiB).
pub(super) const CHUNK: usize = 256 * 1024;

/// Reads once more than [`BUSY_RESPONSES`] stored blobs are being sent. A response reads
/// nothing ahead and keeps no buffer between reads (`BlobHandle::into_stream`), so it holds
/// the chunk hyper is sending and at most the one being read (hyper takes the next chunk
/// only once less than `http::listener::WRITE_BUFFER` is queued): this is what bounds the
/// memory of many slow clients at once (docs/BENCHMARKS.md).
pub(super) const BUSY_CHUNK: usize = 64 * 1024;

pub(super) const BUSY_RESPONSES: usize = 8;

/// Responses from stored blobs being sent, process-wide.
pub(super) static LOCAL_RESPONSES: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(0);

/// Streams straight from upstream to this client, storing nothing. Counted in the fetch
/// budget (one socket, little memory), cut below the minimum rate and at the blob's size
/// or the cap, like a fetch.
pub(super) async fn pass_through(
    svc: &Blobs,
    ctx: &RequestContext,
    digest: &Digest,
) -> Result<BlobReply, ApiError> {
    let (path, plan) = (&ctx.path, &**ctx.plan());
    let limits = &svc.limits;
    let Some(permit) = svc.budget.acquire(limits.queue_wait).await else {
        svc.telemetry.metrics.fetches_refused.inc();
        return Err(busy(limits));
    };
    let body = svc
        .upstream
        .blob(plan, digest, 0, 0)
        .await
        .inspect_err(|e| svc.telemetry.plan_failed(plan, &e.message))
        .map_err(|e| ApiError::blob_unknown(e.message).refused("upstream_failed"))?;
    svc.telemetry.upstream_answered(&body.source);
    let expected = descriptor_size(svc, &path.registry, digest);
    let cap = expected.unwrap_or(limits.max_blob_size);
    if let Some(n) = body.size
        && n > cap
    {
        return Err(ApiError::blob_unknown(too_large(
            svc,
            digest,
            &body.source,
            n,
            expected,
        )));
    }
    let span = Span::Full(expected.or(body.size));
    let stream = if ctx.head {
        None
    } else {
        let body = rate_guarded(svc, body);
        let (telemetry, max_blob_size) = (svc.telemetry.clone(), svc.limits.max_blob_size);
        let (digest, source) = (digest.clone(), body.source.clone());
        // (bytes sent, cut): the stream ends after the error that cuts it.
        let stream = body.stream.scan((0u64, false), move |(sent, over), c| {
            let _permit = &permit;
            let item = if *over {
                None
            } else {
                if let Ok(c) = &c {
                    *sent += c.len() as u64;
                    if *sent > cap {
                        *over = true;
                        let why = too_large_why(
                            &telemetry,
                            max_blob_size,
                            &digest,
                            &source,
                            *sent,
                            expected,
                        );
                        return std::future::ready(Some(Err(io::Error::other(why))));
                    }
                }
                Some(c)
            };
            std::future::ready(item)
        });
        Some(stream.boxed())
    };
    Ok(BlobReply::Bytes {
        digest: digest.clone(),
        span,
        body: stream,
        source: Source::Upstream,
    })
}

/// A reply for another node from this node's fetch of `digest` in progress (one
/// upstream fetch per cluster; a chain of nodes each streaming from the one before works
/// too, every hop verifying): waits up to 5 s while it connects to an endpoint, but only
/// 1 s for a fetch still looking for a source among the nodes, so that two nodes holding
/// stale records of each other never wait long on each other.
pub(super) async fn serve_in_flight(
    svc: &Blobs,
    digest: &Digest,
    range_header: Option<&str>,
    head: bool,
) -> Option<BlobReply> {
    // Any registry's fetch of the digest: the other node verifies what it receives.
    let fetch = svc
        .fetches
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .filter(|((d, _), _)| d == digest)
        .map(|(_, f)| f.clone())
        .max_by_key(|f| matches!(*f.state.borrow(), FetchState::Streaming(_)))?;
    let follower = Follower::new(&fetch);
    let mut rx = fetch.state.subscribe();
    tokio::time::timeout(
        Duration::from_secs(1),
        rx.wait_for(|s| !matches!(s, FetchState::Connecting)),
    )
    .await
    .ok()?
    .ok()?;
    let current = tokio::time::timeout(
        Duration::from_secs(4),
        rx.wait_for(|s| !matches!(s, FetchState::ConnectingUpstream)),
    )
    .await
    .ok()?
    .ok()?
    .clone();
    match current {
        FetchState::Streaming(s) => Some(serve_inflight(&s, digest, range_header, head, follower)),
        _ => None,
    }
}

/// A stored blob, with `Range`.
pub(super) async fn serve_local(
    handle: BlobHandle,
    digest: &Digest,
    range_header: Option<&str>,
    head: bool,
) -> Result<BlobReply, ApiError> {
    let size = handle.size;
    let Some(span) = Span::of(range_header, size) else {
        return Ok(BlobReply::Unsatisfiable { size });
    };
    let body = if head {
        None
    } else {
        let (start, len) = span.window();
        use std::sync::atomic::Ordering::Relaxed;
        let busy = LOCAL_RESPONSES.fetch_add(1, Relaxed) >= BUSY_RESPONSES;
        let chunk = if busy { BUSY_CHUNK } else { CHUNK };
        let sending = Sending;
        let stream = handle
            .into_stream(start, len.unwrap_or(size - start), chunk)
            .map(move |c| {
                let _sending = &sending;
                c
            });
        Some(stream.boxed())
    };
    Ok(BlobReply::Bytes {
        digest: digest.clone(),
        span,
        body,
        source: Source::Local,
    })
}

/// Counts a response from a stored blob in `LOCAL_RESPONSES` while its body is being sent.
pub(super) struct Sending;

impl Drop for Sending {
    fn drop(&mut self) {
        LOCAL_RESPONSES.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A reply streaming a fetch in flight; `follower` counts this client as one of the
/// fetch's followers for as long as its body is being sent.
pub(super) fn serve_inflight(
    fetch: &Streaming,
    digest: &Digest,
    range_header: Option<&str>,
    head: bool,
    follower: Follower,
) -> BlobReply {
    let span = match fetch.size {
        None => Span::Full(None),
        Some(size) => match Span::of(range_header, size) {
            Some(span) => span,
            None => return BlobReply::Unsatisfiable { size },
        },
    };
    let body = (!head).then(|| {
        let (start, len) = match span {
            Span::Partial { start, len, .. } => (start, Some(len)),
            Span::Full(_) => (0, None),
        };
        fetch
            .inflight
            .stream(start, len)
            .map(move |c| {
                let _follower = &follower;
                c
            })
            .boxed()
    });
    BlobReply::Bytes {
        digest: digest.clone(),
        span,
        body,
        source: fetch.source,
    }
}
