//! One coalesced fetch per (digest, registry): joined or started (within the budget), run
//! on its own task into the store, resumed from the next source when one fails mid-blob,
//! cut when too slow or too large, cancelled when nobody follows it and it is not worth
//! finishing.

use super::*;

/// How long cold blobs bypass the store after a write failed (disk full).
pub(super) const FULL_BACKOFF: Duration = Duration::from_secs(30);

/// A fetch nobody follows any more is finished anyway when the blob is at most this large
/// (cheap to finish, likely asked again) ...
pub(super) const SMALL_BLOB: u64 = 16 * 1024 * 1024;

/// ... or when at least this share of it has arrived (a percentage).
pub(super) const FINISH_PERCENT: u64 = 50;

/// Fetches are shared by requests for the same digest through the same registry: a
/// registry's fetch never serves (or stalls) a request made through another one.
pub type FetchKey = (Digest, String);

/// One upstream fetch of a blob, shared by every request for it through one registry.
pub struct Fetch {
    pub(super) state: watch::Sender<FetchState>,
    /// The repository of the request that started it (whose plan it walks).
    pub(super) repository: String,
    /// Requests (and other nodes) streaming from it or waiting for it.
    pub(super) followers: watch::Sender<usize>,
}

/// Counts one follower of a fetch while it lives.
pub(crate) struct Follower(Arc<Fetch>);

impl Follower {
    pub(super) fn new(fetch: &Arc<Fetch>) -> Follower {
        fetch.followers.send_modify(|n| *n += 1);
        Follower(fetch.clone())
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.0.followers.send_modify(|n| *n = n.saturating_sub(1));
    }
}

#[derive(Clone)]
pub(super) enum FetchState {
    /// Looking for a source (other nodes first).
    Connecting,
    /// No other node has it: connecting to the endpoints (this node is the one fetching it
    /// for the cluster).
    ConnectingUpstream,
    Streaming(Streaming),
    /// The store cannot take the blob: each request streams from upstream itself.
    PassThrough,
    Failed(String),
}

/// A fetch writing into the store, which followers stream from.
#[derive(Clone)]
pub(super) struct Streaming {
    pub(super) inflight: Arc<Inflight>,
    /// The blob's size, when known.
    pub(super) size: Option<u64>,
    pub(super) source: Source,
}

/// The fetch in flight for `key` that a request may join (not one that already failed,
/// nor one whose store write failed).
pub(super) fn joinable(
    fetches: &std::collections::HashMap<FetchKey, Arc<Fetch>>,
    key: &FetchKey,
) -> Option<Arc<Fetch>> {
    fetches
        .get(key)
        .filter(|f| match &*f.state.borrow() {
            FetchState::Failed(_) => false,
            // The store ended the write before the fetch noticed (a full store).
            FetchState::Streaming(s) => !s.inflight.failed(),
            _ => true,
        })
        .cloned()
}

/// Joins the fetch of `digest` through this registry, or starts one when the budget has
/// room (waiting up to `queue_wait`); `Err` is the `503` to answer when it stays full.
pub(super) async fn join_or_start(
    svc: &Arc<Blobs>,
    ctx: &RequestContext,
    digest: &Digest,
) -> Result<(Arc<Fetch>, Follower), ApiError> {
    let path = &ctx.path;
    let key: FetchKey = (digest.clone(), path.registry.clone());
    if let Some(f) = joinable(
        &svc.fetches.lock().unwrap_or_else(PoisonError::into_inner),
        &key,
    ) {
        let follower = Follower::new(&f);
        return Ok((f, follower));
    }
    let limits = &svc.limits;
    let expected = descriptor_size(svc, &path.registry, digest);
    let Some(permit) = svc.budget.acquire(limits.queue_wait).await else {
        svc.telemetry.metrics.fetches_refused.inc();
        tracing::warn!(%digest, registry = %path.registry, "fetch budget full; answering 503");
        return Err(busy(limits));
    };
    let mut fetches = svc.fetches.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(f) = joinable(&fetches, &key) {
        let follower = Follower::new(&f);
        return Ok((f, follower));
    }
    let fetch = Arc::new(Fetch {
        state: watch::channel(FetchState::Connecting).0,
        repository: path.repository.clone(),
        followers: watch::channel(0).0,
    });
    // Counted before the task starts, so that it never sees a fetch nobody wants.
    let follower = Follower::new(&fetch);
    fetches.insert(key.clone(), fetch.clone());
    let (svc, plan, path, digest, f) = (
        svc.clone(),
        ctx.plan().clone(),
        path.clone(),
        digest.clone(),
        fetch.clone(),
    );
    // Logged under the id of the request that started the fetch.
    let id = crate::request_id::current();
    tokio::spawn(crate::request_id::within(id, async move {
        let _permit = permit;
        svc.telemetry.metrics.inflight.inc();
        let want = Wanted {
            plan: &plan,
            path: &path,
            digest: &digest,
            expected,
        };
        run_fetch(&svc, want, &f).await;
        if let Some(p) = svc.cluster.peers() {
            p.router
                .withdraw(vec![crate::peers::inflight_key(&digest)])
                .await;
        }
        svc.telemetry.metrics.inflight.dec();
        let mut fetches = svc.fetches.lock().unwrap_or_else(PoisonError::into_inner);
        if fetches.get(&key).is_some_and(|x| Arc::ptr_eq(x, &f)) {
            fetches.remove(&key);
        }
    }));
    Ok((fetch, follower))
}

/// Whether a fetch nobody follows is finished anyway: a small blob, or one at least
/// half there. A blob of unknown size is not.
pub(super) fn worth_finishing(written: u64, size: Option<u64>) -> bool {
    size.is_some_and(|s| s <= SMALL_BLOB || written * 100 >= s * FINISH_PERCENT)
}

/// Resolves when the fetch should stop because nobody wants it: no follower for
/// `grace`, and not worth finishing (see [`worth_finishing`]).
pub(super) async fn abandoned(
    fetch: &Fetch,
    progress: &Inflight,
    size: Option<u64>,
    grace: Duration,
) {
    let mut rx = fetch.followers.subscribe();
    loop {
        // The sender lives in `fetch`, which outlives this future.
        let _ = rx.wait_for(|n| *n == 0).await;
        tokio::time::sleep(grace).await;
        if *rx.borrow_and_update() == 0 {
            if worth_finishing(progress.written(), size) {
                return std::future::pending().await;
            }
            return;
        }
    }
}

/// Cuts a source body that delivers less than `min_rate` bytes per second over a window
/// (including one that sends nothing at all): the fetch continues from the next source.
pub(super) struct RateGuard {
    pub(super) inner: BoxStream<'static, io::Result<Bytes>>,
    pub(super) min_bytes: u64,
    pub(super) window: Duration,
    pub(super) deadline: Pin<Box<tokio::time::Sleep>>,
    pub(super) got: u64,
    pub(super) done: bool,
    pub(super) slow: prometheus_client::metrics::counter::Counter,
}

impl Stream for RateGuard {
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        while self.deadline.as_mut().poll(cx).is_ready() {
            if self.got < self.min_bytes {
                self.done = true;
                self.slow.inc();
                let msg = format!(
                    "source too slow: {} bytes in {:?}, below the minimum of {} bytes in that time",
                    self.got, self.window, self.min_bytes
                );
                return Poll::Ready(Some(Err(io::Error::new(io::ErrorKind::TimedOut, msg))));
            }
            self.got = 0;
            let next = tokio::time::Instant::now() + self.window;
            self.deadline.as_mut().reset(next);
        }
        let r = self.inner.as_mut().poll_next(cx);
        match &r {
            Poll::Ready(Some(Ok(c))) => self.got += c.len() as u64,
            Poll::Ready(_) => self.done = true,
            Poll::Pending => {}
        }
        r
    }
}

pub(super) fn rate_guarded(svc: &Blobs, mut body: BlobBody) -> BlobBody {
    let limits = &svc.limits;
    if limits.min_rate == 0 || limits.rate_window.is_zero() {
        return body;
    }
    let inner = std::mem::replace(&mut body.stream, futures_util::stream::empty().boxed());
    body.stream = RateGuard {
        inner,
        min_bytes: (limits.min_rate as f64 * limits.rate_window.as_secs_f64()) as u64,
        window: limits.rate_window,
        deadline: Box::pin(tokio::time::sleep(limits.rate_window)),
        got: 0,
        done: false,
        slow: svc.telemetry.metrics.slow_sources.clone(),
    }
    .boxed();
    body
}

/// How a pass of [`run_fetch`] ended.
enum Pass {
    /// Stored, or failed for good.
    Ended,
    /// The blob came in pieces from several nodes and did not match its digest.
    PiecesMismatch,
}

/// The leader: fetches the blob from upstream into the store, resuming from the next
/// attempt at the same offset when an upstream fails mid-blob. A blob fetched in pieces
/// from several nodes that does not match its digest is fetched once more, one source at
/// a time, where a mismatch names the node that sent it (docs/p2p.md, "Pieces").
pub(super) async fn run_fetch(svc: &Blobs, want: Wanted<'_>, fetch: &Fetch) {
    if let Pass::PiecesMismatch = fetch_pass(svc, want, fetch, true).await {
        tracing::warn!(digest = %want.digest, "the blob fetched in pieces from several nodes did not match its digest; fetching it again one source at a time");
        // Requests that come meanwhile wait for the new write.
        fetch.state.send_replace(FetchState::Connecting);
        fetch_pass(svc, want, fetch, false).await;
    }
}

/// What a fetch is after: one blob, through the plan of the request that started it.
#[derive(Clone, Copy)]
pub(super) struct Wanted<'a> {
    pub(super) plan: &'a Plan,
    pub(super) path: &'a OciPath,
    pub(super) digest: &'a Digest,
    /// Its size from a manifest this node served, if any.
    pub(super) expected: Option<u64>,
}

/// One pass of [`run_fetch`]: a write from the first byte; `pieces` when the blob may come
/// in pieces from several nodes.
async fn fetch_pass(svc: &Blobs, want: Wanted<'_>, fetch: &Fetch, pieces: bool) -> Pass {
    let Wanted {
        plan,
        path,
        digest,
        expected,
    } = want;
    let limits = &svc.limits;
    // Its own write, never another registry's write of the same digest.
    let writer = match svc.store.begin_separate(digest, expected) {
        Ok(Begin::Writer(w)) => w,
        Ok(Begin::Joined(inflight)) => {
            let size = inflight.expected_size();
            fetch.state.send_replace(FetchState::Streaming(Streaming {
                inflight: Arc::new(inflight),
                size,
                source: Source::Local,
            }));
            return Pass::Ended;
        }
        Err(e) => {
            tracing::warn!(%digest, error = %e, "content store refused a new blob; passing through uncached");
            mark_store_full(svc);
            fetch.state.send_replace(FetchState::PassThrough);
            return Pass::Ended;
        }
    };
    let sources = Sources::new(svc, want, pieces, &fetch.state).await;
    let mut body = match sources.open(0, Attempt::Provider(0)).await {
        Ok(b) => b,
        Err(e) => {
            svc.telemetry.upstream_failed(plan, &e.message);
            fetch.state.send_replace(FetchState::Failed(e.message));
            return Pass::Ended;
        }
    };
    // Where the blob must end: the size its manifest gave, else the cap.
    let cap = expected.unwrap_or(limits.max_blob_size);
    if let Some(s) = body.body.size
        && s > cap
    {
        let why = too_large(svc, digest, &body.body.source, s, expected);
        fetch.state.send_replace(FetchState::Failed(why));
        return Pass::Ended;
    }
    let size = expected.or(body.body.size);
    let mut contributors = vec![body.origin.clone()];
    let mut pieced = body.pieces;
    let follow = writer.follow();
    let mut sink = StoreSink::new(writer, svc.store.clone());
    fetch.state.send_replace(FetchState::Streaming(Streaming {
        inflight: Arc::new(follow.clone()),
        size,
        source: body.origin.source(),
    }));
    let mut abandon = Box::pin(abandoned(fetch, &follow, size, limits.abandon_grace));
    // Announcements that crossed each other leave two nodes fetching the same blob from
    // upstream; the one with the higher id finds out and continues from the other.
    let mut rival = match svc.cluster.peers() {
        Some(p) if sources.cluster_leader => Some(Box::pin(lower_fetcher(svc, p, digest))),
        _ => None,
    };
    // The current body is a rival node's, standing in for the attempt it replaced.
    let mut retry_same = false;
    loop {
        svc.telemetry.upstream_answered(&body.body.source);
        let rival_found = async {
            match rival.as_mut() {
                Some(r) => r.as_mut().await,
                None => std::future::pending().await,
            }
        };
        let outcome = tokio::select! {
            o = pump(&mut sink, &mut body.body, cap) => o,
            peer = rival_found => Pump::Yield(peer),
            () = &mut abandon => Pump::Abandoned,
        };
        let next = match outcome {
            Pump::Yield(peer) => {
                rival = None;
                // The pump was stopped between chunks: continue at what the store has.
                let offset = sink.received;
                let from_peer = match svc.cluster.peers() {
                    Some(p) => {
                        p.blob(
                            std::slice::from_ref(&peer),
                            0,
                            &path.registry,
                            &path.repository,
                            digest,
                            offset,
                            false,
                        )
                        .await
                    }
                    None => None,
                };
                match from_peer {
                    Some((b, origin)) => {
                        tracing::info!(%digest, offset, node = %peer.id, "another node is fetching this blob from upstream too; continuing from it");
                        // Should that node fail, the endpoint this one used is next.
                        retry_same = true;
                        Ok(Opened {
                            body: rate_guarded(svc, b),
                            origin,
                            at: body.at,
                            pieces: false,
                        })
                    }
                    None => sources.open(offset, body.at).await,
                }
            }
            // The store ended the write (a failed write ends every follower, who then
            // leave): a store failure, not a cancel. While this fetch holds the writer,
            // only the store can have failed it.
            Pump::Abandoned if follow.failed() => {
                let (writer, e) = sink.finish().await;
                let e = e.map_or_else(
                    || "the store ended the write".to_string(),
                    |e| e.to_string(),
                );
                store_failed(svc, fetch, digest, writer, e);
                return Pass::Ended;
            }
            Pump::Abandoned => {
                tracing::info!(%digest, written = follow.written(), size, "no client follows this fetch any more and it is not worth finishing; cancelled");
                svc.telemetry.metrics.fetches_cancelled.inc();
                ended(fetch, "cancelled: no client followed it");
                return Pass::Ended; // dropping the writer aborts and deletes the temp file
            }
            Pump::TooLarge(n) => {
                let why = too_large(svc, digest, &body.body.source, n, expected);
                ended(fetch, &why);
                return Pass::Ended;
            }
            Pump::Done if size.is_none_or(|s| sink.received == s) => break,
            Pump::Done | Pump::UpstreamFailed => {
                let offset = sink.received;
                tracing::warn!(%digest, offset, source = %body.body.source, "source failed mid-blob; continuing from the next one");
                svc.telemetry.endpoint_failed(
                    &body.body.source,
                    &format!("{digest}: body cut at byte {offset}"),
                );
                let from = if std::mem::take(&mut retry_same) {
                    body.at
                } else {
                    body.at.next()
                };
                sources.open(offset, from).await
            }
            Pump::StoreFailed => {
                let (writer, e) = sink.finish().await;
                let e = e.map_or_else(|| "the store writer stopped".to_string(), |e| e.to_string());
                store_failed(svc, fetch, digest, writer, e);
                return Pass::Ended;
            }
        };
        match next {
            Ok(b) => {
                body = b;
                tracing::debug!(%digest, offset = sink.received, source = %body.body.source, "continuing the blob from another source");
                pieced |= body.pieces;
                contributors.push(body.origin.clone());
            }
            Err(e) => {
                let offset = sink.received;
                tracing::warn!(%digest, offset, error = %e.message, "no source can continue the blob");
                svc.telemetry.upstream_failed(plan, &e.message);
                ended(fetch, &e.message);
                return Pass::Ended; // dropping the writer aborts: followers get an error
            }
        }
    }
    drop(abandon);
    let writer = match sink.finish().await {
        (w, None) => w,
        (w, Some(e)) => {
            store_failed(svc, fetch, digest, w, e);
            return Pass::Ended;
        }
    };
    match writer.commit().await {
        Ok(n) => tracing::debug!(%digest, bytes = n, "blob stored"),
        Err(e) => {
            tracing::warn!(%digest, error = %e, "blob not stored");
            let mismatch = matches!(e, kagami_store::StoreError::DigestMismatch { .. });
            // Pieces from several nodes: which one lied is not known, and nobody is
            // banned for it; the caller fetches again one source at a time.
            if mismatch && pieced {
                return Pass::PiecesMismatch;
            }
            if mismatch && let Some(peers) = svc.cluster.peers() {
                for id in contributors.iter().filter_map(Origin::peer) {
                    peers.ban(id);
                }
            }
        }
    }
    Pass::Ended
}

/// A blob went past where it must end: logged, counted, reported on the status page.
pub(super) fn too_large(
    svc: &Blobs,
    digest: &Digest,
    source: &str,
    bytes: u64,
    expected: Option<u64>,
) -> String {
    too_large_why(
        &svc.telemetry,
        svc.limits.max_blob_size,
        digest,
        source,
        bytes,
        expected,
    )
}

pub(super) fn too_large_why(
    telemetry: &Telemetry,
    max_blob_size: u64,
    digest: &Digest,
    source: &str,
    bytes: u64,
    expected: Option<u64>,
) -> String {
    let why = match expected {
        Some(e) => {
            format!("{digest} from {source}: {bytes} bytes, more than the {e} its manifest gives")
        }
        None => format!(
            "{digest} from {source}: {bytes} bytes, more than --max-blob-size ({max_blob_size} bytes) and no manifest served by this node gives its size"
        ),
    };
    tracing::warn!(%digest, source, bytes, "blob larger than allowed; fetch stopped");
    telemetry.metrics.blobs_too_large.inc();
    telemetry.endpoint_failed(source, &why);
    why
}

/// The store refused a write of the fetch: cold blobs pass through for a while.
fn store_failed(
    svc: &Blobs,
    fetch: &Fetch,
    digest: &Digest,
    writer: kagami_store::BlobWriter,
    e: impl std::fmt::Display,
) {
    let e = e.to_string();
    tracing::warn!(%digest, error = %e, "content store write failed; cold blobs pass through uncached for a while");
    // Before the writer goes (and its temp file with it): a request that comes after sees
    // a full store and an ended fetch, never this one half-dead.
    mark_store_full(svc);
    ended(fetch, &e);
    drop(writer);
}

/// A fetch that streamed and then stopped short: marked failed before its writer is dropped,
/// so that no request joins it any more (the requests already following it get the
/// writer's error); the next request starts a fetch of its own.
fn ended(fetch: &Fetch, why: &str) {
    fetch
        .state
        .send_replace(FetchState::Failed(format!("the fetch stopped: {why}")));
}

pub(super) fn mark_store_full(svc: &Blobs) {
    *svc.store_full_until
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now() + FULL_BACKOFF);
}
