//! Blob GET/HEAD: from the store, else from one shared upstream fetch per (digest,
//! registry), streamed to every waiting client while it is written to the store.
//!
//! What fetches may hold is bounded (see [`FetchLimits`]): how many run at once and the
//! memory they reserve, how slow a source may be, how large a blob may grow, and how long
//! a fetch nobody follows any more keeps going.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{Stream, StreamExt};
use http::StatusCode;
use kagami_config::{Digest, Plan};
use kagami_store::{Begin, BlobHandle, Inflight, Store};
use tokio::io::{AsyncRead, AsyncSeekExt, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_util::io::ReaderStream;

use crate::origin::{Origin, Source};
use crate::path::OciPath;
use crate::peers::{Cluster, ContentKey};
use crate::service::error::ApiError;
use crate::service::reply::{BlobReply, Span};
use crate::service::{Deps, RequestContext};
use crate::telemetry::Telemetry;
use crate::upstream::{BlobBody, Upstream};

/// Blob GET/HEAD and the fetches behind them. It holds what it uses; the fetches in
/// flight, the fetch budget, the blob sizes manifests gave and the store-full back-off are
/// its own.
pub(crate) struct Blobs {
    store: Store,
    upstream: Arc<dyn Upstream>,
    telemetry: Arc<Telemetry>,
    limits: FetchLimits,
    cluster: Cluster,
    /// Blob fetches in flight, shared by every request for the same digest.
    fetches: Mutex<HashMap<FetchKey, Arc<Fetch>>>,
    /// What fetches may hold at once (count and memory).
    budget: Budget,
    /// Blob sizes named by the manifests served, by (registry, digest).
    descriptor_sizes: Mutex<HashMap<(String, Digest), u64>>,
    /// Set while the store refuses writes (disk full): cold blobs pass through uncached.
    store_full_until: Mutex<Option<Instant>>,
}

impl Blobs {
    pub(crate) fn new(deps: &Deps, limits: FetchLimits) -> Arc<Blobs> {
        Arc::new(Blobs {
            store: deps.store.clone(),
            upstream: deps.upstream.clone(),
            telemetry: deps.telemetry.clone(),
            budget: Budget::new(&limits),
            limits,
            cluster: deps.cluster.clone(),
            fetches: Mutex::new(HashMap::new()),
            descriptor_sizes: Mutex::new(HashMap::new()),
            store_full_until: Mutex::new(None),
        })
    }

    /// A client's blob GET or HEAD: from the store, else from a fetch (joined or started).
    pub(crate) async fn get(
        self: &Arc<Self>,
        ctx: &RequestContext,
        digest: &Digest,
    ) -> Result<BlobReply, ApiError> {
        get(self, ctx, digest).await
    }

    /// Remembers the sizes of the blobs a manifest of `registry` names (see
    /// [`note_descriptors`]).
    pub(crate) fn note_descriptors(&self, registry: &str, manifest: &[u8]) {
        note_descriptors(self, registry, manifest)
    }

    /// What this node holds of `digest` for another node: its store, else its fetch in
    /// progress (see [`serve_in_flight`]); `None` when neither has it.
    pub(crate) async fn serve_stored(
        &self,
        digest: &Digest,
        range_header: Option<&str>,
        head: bool,
    ) -> Result<Option<BlobReply>, ApiError> {
        let handle = self
            .store
            .open_blob(digest)
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?;
        match handle {
            Some(h) => serve_local(h, digest, range_header, head).await.map(Some),
            None => Ok(None),
        }
    }

    /// A blob this node is fetching right now, for another node.
    pub(crate) async fn serve_in_flight(
        &self,
        digest: &Digest,
        range_header: Option<&str>,
        head: bool,
    ) -> Option<BlobReply> {
        serve_in_flight(self, digest, range_header, head).await
    }
}

/// Reads of a stored blob for one response, while few are being sent: large reads are
/// fastest for one client (about 2 GB/s warm against 1.5 with 64 KiB).
const CHUNK: usize = 256 * 1024;
/// Reads once more than [`BUSY_RESPONSES`] stored blobs are being sent. Every response
/// holds about two reads (the stream's buffer and the file's own), so this is what bounds
/// the memory of many clients at once: 1,000 connections held 334 MiB with 256 KiB reads
/// for everyone (docs/BENCHMARKS.md).
const BUSY_CHUNK: usize = 64 * 1024;
const BUSY_RESPONSES: usize = 32;
/// Responses from stored blobs being sent, process-wide.
static LOCAL_RESPONSES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
/// Small upstream chunks are gathered into batches of this size before the store.
const WRITE_BATCH: usize = 256 * 1024;
/// Chunks queued between reception and the store writer.
const QUEUE: usize = 16;
/// How long cold blobs bypass the store after a write failed (disk full).
const FULL_BACKOFF: Duration = Duration::from_secs(30);
/// The most memory one fetch holds: the store's window (the last 4 MiB on disk plus the
/// batch being written) and the queue to the writer.
pub const FETCH_MEMORY_MAX: u64 =
    kagami_store::WINDOW as u64 + ((QUEUE + 1) * WRITE_BATCH) as u64 + WRITE_BATCH as u64;
/// A fetch nobody follows any more is finished anyway when the blob is at most this large
/// (cheap to finish, likely asked again) ...
const SMALL_BLOB: u64 = 16 * 1024 * 1024;
/// ... or when at least this share of it has arrived (a percentage).
const FINISH_PERCENT: u64 = 50;

/// Bounds on blob fetches (flags of `kagami serve`; see docs/security.md, "Resource
/// bounds").
#[derive(Debug, Clone)]
pub struct FetchLimits {
    /// The most blob fetches (and uncached pass-throughs) at once.
    pub max_fetches: usize,
    /// The memory fetches in flight may reserve together: each reserves what it can hold,
    /// [`FETCH_MEMORY_MAX`] or the blob's size when it is known and smaller.
    pub fetch_memory: u64,
    /// How long a cold request waits for room in the budget before a `503` with
    /// `Retry-After`.
    pub queue_wait: Duration,
    /// The largest blob fetched when no manifest served by this node gave its size.
    pub max_blob_size: u64,
    /// A source body slower than this many bytes per second, averaged over
    /// `rate_window`, is cut and the fetch continues from the next source.
    pub min_rate: u64,
    pub rate_window: Duration,
    /// How long a fetch nobody follows keeps going before the cancel rule applies.
    pub abandon_grace: Duration,
    /// The longest a tag revalidation (HEAD and GET upstream) may take.
    pub revalidation_timeout: Duration,
}

impl Default for FetchLimits {
    fn default() -> Self {
        FetchLimits {
            max_fetches: 32,
            fetch_memory: 64 * 1024 * 1024,
            queue_wait: Duration::from_secs(5),
            max_blob_size: 16 * 1024 * 1024 * 1024,
            min_rate: 16 * 1024,
            rate_window: Duration::from_secs(30),
            abandon_grace: Duration::from_secs(5),
            revalidation_timeout: Duration::from_secs(25),
        }
    }
}

/// The fetch budget: a count and memory (in KiB), each a fair (FIFO) semaphore.
pub struct Budget {
    count: Arc<Semaphore>,
    kib: Arc<Semaphore>,
    total_kib: u32,
}

/// Room taken in the [`Budget`] by one fetch or pass-through, given back on drop.
pub struct Permit {
    _count: OwnedSemaphorePermit,
    _kib: OwnedSemaphorePermit,
    bytes: u64,
    gauge: prometheus_client::metrics::gauge::Gauge,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.gauge.dec_by(self.bytes as i64);
    }
}

impl Budget {
    pub fn new(limits: &FetchLimits) -> Budget {
        let total_kib = (limits.fetch_memory / 1024).clamp(1, u32::MAX as u64) as u32;
        Budget {
            count: Arc::new(Semaphore::new(limits.max_fetches.max(1))),
            kib: Arc::new(Semaphore::new(total_kib as usize)),
            total_kib,
        }
    }

    /// Waits up to `wait` for room for one fetch holding up to `bytes` of memory.
    async fn acquire(&self, telemetry: &Telemetry, bytes: u64, wait: Duration) -> Option<Permit> {
        let kib = bytes.div_ceil(1024).clamp(1, self.total_kib as u64) as u32;
        let take = async {
            let count = self.count.clone().acquire_owned().await.ok()?;
            let kib = self.kib.clone().acquire_many_owned(kib).await.ok()?;
            Some((count, kib))
        };
        let (count, kib_permit) = tokio::time::timeout(wait, take).await.ok()??;
        let gauge = telemetry.metrics.fetch_memory.clone();
        let bytes = kib as u64 * 1024;
        gauge.inc_by(bytes as i64);
        Some(Permit {
            _count: count,
            _kib: kib_permit,
            bytes,
            gauge,
        })
    }
}

/// Fetches are shared by requests for the same digest through the same registry: a
/// registry's fetch never serves (or stalls) a request made through another one.
pub type FetchKey = (Digest, String);

/// One upstream fetch of a blob, shared by every request for it through one registry.
pub struct Fetch {
    state: watch::Sender<FetchState>,
    /// The repository of the request that started it (whose plan it walks).
    repository: String,
    /// Requests (and other nodes) streaming from it or waiting for it.
    followers: watch::Sender<usize>,
}

/// Counts one follower of a fetch while it lives.
pub(crate) struct Follower(Arc<Fetch>);

impl Follower {
    fn new(fetch: &Arc<Fetch>) -> Follower {
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
enum FetchState {
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
struct Streaming {
    inflight: Arc<Inflight>,
    /// The blob's size, when known.
    size: Option<u64>,
    source: Source,
}

async fn get(
    svc: &Arc<Blobs>,
    ctx: &RequestContext,
    digest: &Digest,
) -> Result<BlobReply, ApiError> {
    let (path, head, range_header) = (&ctx.path, ctx.head, ctx.range.as_deref());
    if let Some(handle) = svc
        .store
        .open_blob(digest)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
    {
        svc.telemetry.cache("blob", "hit");
        return serve_local(handle, digest, range_header, head).await;
    }
    svc.telemetry.cache("blob", "miss");
    if head && let Some(r) = head_cold(svc, ctx, digest).await {
        return r;
    }
    let store_full = svc
        .store_full_until
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .is_some_and(|t| Instant::now() < t);
    if store_full {
        return pass_through(svc, ctx, digest).await;
    }
    let mut fell_back = false;
    loop {
        let (fetch, follower) = match join_or_start(svc, ctx, digest).await {
            Ok(f) => f,
            Err(busy) => return Err(busy),
        };
        let mut rx = fetch.state.subscribe();
        let current = rx
            .wait_for(|s| !matches!(s, FetchState::Connecting | FetchState::ConnectingUpstream))
            .await
            .map(|s| s.clone())
            .unwrap_or(FetchState::Failed("fetch ended unexpectedly".into()));
        return match current {
            FetchState::Streaming(s) => {
                Ok(serve_inflight(&s, digest, range_header, head, follower))
            }
            FetchState::PassThrough => {
                drop(follower);
                pass_through(svc, ctx, digest).await
            }
            // A fetch started for another repository of the registry walked that
            // repository's plan: this request tries its own once.
            FetchState::Failed(_) if !fell_back && fetch.repository != path.repository => {
                fell_back = true;
                continue;
            }
            // A blob a manifest names exists: failing to get it is a refusal.
            FetchState::Failed(why) => Err(ApiError::blob_unknown(why).refused("upstream_failed")),
            FetchState::Connecting | FetchState::ConnectingUpstream => {
                unreachable!("waited for a later state")
            }
        };
    }
}

/// A HEAD of a blob not in the store: answered from a fetch in flight when it knows the
/// size, else from the endpoints' HEAD, downloading nothing. `None` when the plan has no
/// endpoint (a registry served only by other nodes), or none has the blob and other nodes
/// might: the caller goes through a fetch.
async fn head_cold(
    svc: &Blobs,
    ctx: &RequestContext,
    digest: &Digest,
) -> Option<Result<BlobReply, ApiError>> {
    let (path, plan) = (&ctx.path, &**ctx.plan());
    let key = (digest.clone(), path.registry.clone());
    let in_flight = svc
        .fetches
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(&key)
        .cloned();
    if let Some(f) = in_flight
        && let FetchState::Streaming(Streaming {
            size: Some(size),
            source,
            ..
        }) = &*f.state.borrow()
    {
        return Some(Ok(BlobReply::Bytes {
            digest: digest.clone(),
            span: Span::Full(Some(*size)),
            body: None,
            source: *source,
        }));
    }
    kagami_client::endpoint_attempts(plan).next()?;
    Some(match svc.upstream.head_blob(plan, digest).await {
        Ok(h) => {
            svc.telemetry.endpoint_ok(&h.source);
            Ok(BlobReply::Bytes {
                digest: digest.clone(),
                span: Span::Full(h.size),
                body: None,
                source: Source::Upstream,
            })
        }
        // Other nodes may have it when the endpoints do not: the caller tries them.
        Err(_)
            if svc.cluster.peers().is_some()
                && plan
                    .attempts
                    .iter()
                    .any(|a| matches!(a, kagami_config::Attempt::Peers)) =>
        {
            return None;
        }
        Err(e) => Err(ApiError::blob_unknown(e.message)),
    })
}

/// The size of `digest` named by a manifest this node served for `registry`, if any.
fn descriptor_size(svc: &Blobs, registry: &str, digest: &Digest) -> Option<u64> {
    svc.descriptor_sizes
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(&(registry.to_string(), digest.clone()))
        .copied()
}

/// Most descriptor sizes remembered; the map is emptied when it would grow past this.
const MAX_DESCRIPTORS: usize = 100_000;

/// Remembers the sizes of the blobs a manifest (or index) of `registry` names, so that a
/// fetch of one of them knows where it must end. Kept per registry: a manifest from one
/// registry cannot set the size another registry's fetch expects.
fn note_descriptors(svc: &Blobs, registry: &str, manifest: &[u8]) {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(manifest) else {
        return;
    };
    let mut found = Vec::new();
    let mut note = |d: &serde_json::Value| {
        if let (Some(digest), Some(size)) = (
            d.get("digest")
                .and_then(|x| x.as_str())
                .and_then(|x| x.parse::<Digest>().ok()),
            d.get("size").and_then(|x| x.as_u64()),
        ) {
            found.push((digest, size));
        }
    };
    if let Some(c) = v.get("config") {
        note(c);
    }
    for list in ["layers", "manifests", "blobs"] {
        for d in v.get(list).and_then(|l| l.as_array()).into_iter().flatten() {
            note(d);
        }
    }
    if found.is_empty() {
        return;
    }
    let mut map = svc
        .descriptor_sizes
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if map.len() + found.len() > MAX_DESCRIPTORS {
        map.clear();
    }
    for (d, size) in found {
        map.insert((registry.to_string(), d), size);
    }
}

/// The answer when the fetch budget stays full: containerd moves on to its next host (the
/// registry itself, unless the default endpoint is disabled) and kagami stays within its
/// memory.
fn busy(limits: &FetchLimits) -> ApiError {
    let mut e = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "TOOMANYREQUESTS",
        format!(
            "kagami is already fetching as many blobs as it may ({} at once, {} MiB of memory: --max-fetches, --fetch-memory); retry later",
            limits.max_fetches,
            limits.fetch_memory / (1024 * 1024)
        ),
    )
    .refused("busy");
    e.retry_after = Some(5);
    e
}

/// The fetch in flight for `key` that a request may join (not one that already failed).
fn joinable(
    fetches: &std::collections::HashMap<FetchKey, Arc<Fetch>>,
    key: &FetchKey,
) -> Option<Arc<Fetch>> {
    fetches
        .get(key)
        .filter(|f| !matches!(*f.state.borrow(), FetchState::Failed(_)))
        .cloned()
}

/// Joins the fetch of `digest` through this registry, or starts one when the budget has
/// room (waiting up to `queue_wait`); `Err` is the `503` to answer when it stays full.
async fn join_or_start(
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
    let memory = expected.map_or(FETCH_MEMORY_MAX, |s| s.min(FETCH_MEMORY_MAX));
    let Some(permit) = svc
        .budget
        .acquire(&svc.telemetry, memory, limits.queue_wait)
        .await
    else {
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
        run_fetch(&svc, &plan, &path, &digest, expected, &f).await;
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
fn worth_finishing(written: u64, size: Option<u64>) -> bool {
    size.is_some_and(|s| s <= SMALL_BLOB || written * 100 >= s * FINISH_PERCENT)
}

/// Resolves when the fetch should stop because nobody wants it: no follower for
/// `grace`, and not worth finishing (see [`worth_finishing`]).
async fn abandoned(fetch: &Fetch, progress: &Inflight, size: Option<u64>, grace: Duration) {
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
struct RateGuard {
    inner: BoxStream<'static, io::Result<Bytes>>,
    min_bytes: u64,
    window: Duration,
    deadline: Pin<Box<tokio::time::Sleep>>,
    got: u64,
    done: bool,
    slow: prometheus_client::metrics::counter::Counter,
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

fn rate_guarded(svc: &Blobs, mut body: BlobBody) -> BlobBody {
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

/// The leader: fetches the blob from upstream into the store, resuming from the next
/// attempt at the same offset when an upstream fails mid-blob.
async fn run_fetch(
    svc: &Blobs,
    plan: &Plan,
    path: &OciPath,
    digest: &Digest,
    expected: Option<u64>,
    fetch: &Fetch,
) {
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
            return;
        }
        Err(e) => {
            tracing::warn!(%digest, error = %e, "content store refused a new blob; passing through uncached");
            mark_store_full(svc);
            fetch.state.send_replace(FetchState::PassThrough);
            return;
        }
    };
    let sources = Sources::new(svc, plan, path, digest).await;
    if sources.providers.is_empty() {
        fetch.state.send_replace(FetchState::ConnectingUpstream);
    }
    let mut body = match sources.open(0, Attempt::Provider(0)).await {
        Ok(b) => b,
        Err(e) => {
            svc.telemetry.upstream_failed(plan, &e.message);
            fetch.state.send_replace(FetchState::Failed(e.message));
            return;
        }
    };
    // Where the blob must end: the size its manifest gave, else the cap.
    let cap = expected.unwrap_or(limits.max_blob_size);
    if let Some(s) = body.body.size
        && s > cap
    {
        let why = too_large(svc, digest, &body.body.source, s, expected);
        fetch.state.send_replace(FetchState::Failed(why));
        return;
    }
    let size = expected.or(body.body.size);
    let mut contributors = vec![body.origin.clone()];
    let follow = writer.follow();
    let mut sink = StoreSink::new(writer);
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
                        })
                    }
                    None => sources.open(offset, body.at).await,
                }
            }
            Pump::Abandoned => {
                tracing::info!(%digest, written = follow.written(), size, "no client follows this fetch any more and it is not worth finishing; cancelled");
                svc.telemetry.metrics.fetches_cancelled.inc();
                return; // dropping the writer aborts and deletes the temp file
            }
            Pump::TooLarge(n) => {
                too_large(svc, digest, &body.body.source, n, expected);
                return;
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
                let (_, e) = sink.finish().await;
                let e = e.map_or_else(|| "the store writer stopped".to_string(), |e| e.to_string());
                tracing::warn!(%digest, error = %e, "content store write failed; cold blobs pass through uncached for a while");
                mark_store_full(svc);
                return;
            }
        };
        match next {
            Ok(b) => {
                body = b;
                contributors.push(body.origin.clone());
            }
            Err(e) => {
                let offset = sink.received;
                tracing::warn!(%digest, offset, error = %e.message, "no source can continue the blob");
                svc.telemetry.upstream_failed(plan, &e.message);
                return; // dropping the writer aborts: followers get an error
            }
        }
    }
    drop(abandon);
    let writer = match sink.finish().await {
        (w, None) => w,
        (_, Some(e)) => {
            tracing::warn!(%digest, error = %e, "content store write failed; cold blobs pass through uncached for a while");
            mark_store_full(svc);
            return;
        }
    };
    match writer.commit().await {
        Ok(n) => tracing::debug!(%digest, bytes = n, "blob stored"),
        Err(e) => {
            tracing::warn!(%digest, error = %e, "blob not stored");
            if matches!(e, kagami_store::StoreError::DigestMismatch { .. })
                && let Some(peers) = svc.cluster.peers()
            {
                for id in contributors.iter().filter_map(Origin::peer) {
                    peers.ban(id);
                }
            }
        }
    }
}

/// A blob went past where it must end: logged, counted, reported on the status page.
fn too_large(
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

fn too_large_why(
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

/// How long a node waits, after announcing it is about to fetch a blob nobody holds, for
/// the announcements of other nodes about to do the same.
const SETTLE: Duration = Duration::from_millis(150);

/// One upstream fetch per cluster: when no node holds a blob, every node about to fetch it
/// announces `inflight:<digest>`, waits briefly, and looks the key up; the node with the
/// lowest id fetches from upstream and the others stream from it while it downloads (its
/// peer API serves blobs in flight). Returns the nodes to stream from, empty when this
/// node is the fetcher. Announcements that raced past each other degrade to two fetches,
/// never to a failure; a stale announcement is a provider that answers 404, then skipped.
async fn cluster_fetcher(
    svc: &Blobs,
    peers: &crate::peers::Peers,
    digest: &Digest,
) -> Vec<kagami_p2p::Peer> {
    let Some(me) = svc.cluster.me().map(str::to_string) else {
        return Vec::new();
    };
    let key = ContentKey::Inflight(digest.clone()).to_string();
    peers.router.advertise(vec![key.clone()]).await;
    tokio::time::sleep(SETTLE).await;
    let earlier: Vec<kagami_p2p::Peer> = peers
        .providers(&key)
        .await
        .into_iter()
        .filter(|p| p.id < me)
        .collect();
    let earlier = spread_followers(&me, digest, earlier);
    if let Some(first) = earlier.first() {
        tracing::debug!(%digest, from = %first.id, "another node is fetching this blob; streaming from it");
    }
    earlier
}

/// The order in which a follower tries the nodes that announced a blob before it: by a
/// hash of (its own id, theirs, the digest) rather than lowest id first, so that followers
/// spread over every earlier node (each streaming from the fetching node or from another
/// follower, verifying as it goes) instead of all streaming from the one fetching node.
/// Every earlier node has a lower id, so the chains end at the fetching node and never
/// loop.
fn spread_followers(
    me: &str,
    digest: &Digest,
    mut earlier: Vec<kagami_p2p::Peer>,
) -> Vec<kagami_p2p::Peer> {
    use std::hash::{Hash, Hasher};
    earlier.sort_by_cached_key(|p| {
        // SipHash with fixed keys: the same order on every run and every node.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (me, &p.id, digest.to_string()).hash(&mut h);
        h.finish()
    });
    earlier
}

/// For the node fetching a blob for the cluster: looks at the announcements again after
/// 0.3, 1 and 3 s and returns a node with a lower id that announced the same blob (its
/// announcement had not arrived in time), to continue from it; otherwise never returns.
async fn lower_fetcher(
    svc: &Blobs,
    peers: &crate::peers::Peers,
    digest: &Digest,
) -> kagami_p2p::Peer {
    if let Some(me) = svc.cluster.me() {
        let key = ContentKey::Inflight(digest.clone()).to_string();
        for wait in [300, 700, 2000] {
            tokio::time::sleep(Duration::from_millis(wait)).await;
            let lowest = peers
                .providers(&key)
                .await
                .into_iter()
                .filter(|p| p.id.as_str() < me)
                .min_by(|a, b| a.id.cmp(&b.id));
            if let Some(p) = lowest {
                return p;
            }
        }
    }
    std::future::pending().await
}

/// Which source of [`Sources`] a body came from, so that a resume continues after the one
/// that failed: the providers (other nodes) first, then the plan's endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attempt {
    /// The i-th provider among the other nodes.
    Provider(usize),
    /// The plan's endpoint attempt of this index (`BlobBody::attempt` of the upstream).
    Endpoint(usize),
}

impl Attempt {
    fn next(self) -> Attempt {
        match self {
            Attempt::Provider(i) => Attempt::Provider(i + 1),
            Attempt::Endpoint(i) => Attempt::Endpoint(i + 1),
        }
    }
}

/// A body opened by [`Sources::open`]: where it came from and which attempt it was.
struct Opened {
    body: BlobBody,
    origin: Origin,
    at: Attempt,
}

/// Where a blob can come from, in the plan's order: providers among the other nodes
/// (when the registry is shared and P2P is on), then the endpoints.
struct Sources<'a> {
    svc: &'a Blobs,
    plan: &'a kagami_config::Plan,
    path: &'a OciPath,
    digest: &'a Digest,
    providers: Vec<kagami_p2p::Peer>,
    /// This node fetches the blob from an endpoint for the cluster (no other node had it
    /// or had announced it).
    cluster_leader: bool,
}

impl<'a> Sources<'a> {
    async fn new(
        svc: &'a Blobs,
        plan: &'a kagami_config::Plan,
        path: &'a OciPath,
        digest: &'a Digest,
    ) -> Sources<'a> {
        let wants_peers = plan
            .attempts
            .iter()
            .any(|a| matches!(a, kagami_config::Attempt::Peers));
        let mut cluster_leader = false;
        let providers = match svc.cluster.peers() {
            Some(p) if wants_peers => {
                let holders = p.providers(&digest.to_string()).await;
                if holders.is_empty() {
                    let earlier = cluster_fetcher(svc, p, digest).await;
                    cluster_leader = earlier.is_empty() && svc.cluster.me().is_some();
                    earlier
                } else {
                    holders
                }
            }
            _ => Vec::new(),
        };
        Sources {
            svc,
            plan,
            path,
            digest,
            providers,
            cluster_leader,
        }
    }

    /// The first source from `from` on that answers, at `offset`.
    async fn open(
        &self,
        offset: u64,
        from: Attempt,
    ) -> Result<Opened, crate::upstream::UpstreamError> {
        if let Attempt::Provider(i) = from
            && i < self.providers.len()
            && let Some(peers) = self.svc.cluster.peers()
            && let Some((b, origin)) = peers
                .blob(
                    &self.providers,
                    i,
                    &self.path.registry,
                    &self.path.repository,
                    self.digest,
                    offset,
                )
                .await
        {
            let at = Attempt::Provider(b.attempt);
            return Ok(Opened {
                body: rate_guarded(self.svc, b),
                origin,
                at,
            });
        }
        let endpoint = match from {
            Attempt::Endpoint(i) => i,
            Attempt::Provider(_) => 0,
        };
        let b = self
            .svc
            .upstream
            .blob(self.plan, self.digest, offset, endpoint)
            .await?;
        Ok(Opened {
            at: Attempt::Endpoint(b.attempt),
            origin: Origin::Endpoint(b.source.clone()),
            body: rate_guarded(self.svc, b),
        })
    }
}

enum Pump {
    /// Another node with a lower id is fetching the same blob from upstream.
    Yield(kagami_p2p::Peer),
    Done,
    UpstreamFailed,
    StoreFailed,
    /// Nobody follows the fetch and it is not worth finishing.
    Abandoned,
    /// The body went past where the blob must end (this many bytes).
    TooLarge(u64),
}

/// The store side of a fetch, on its own task: network reception and file writes overlap
/// (a bounded queue of chunks between them), so a fetch runs at the slower of the two
/// rather than at the sum of both. The writer takes whatever is queued in one go.
struct StoreSink {
    tx: Option<tokio::sync::mpsc::Sender<bytes::Bytes>>,
    /// Bytes handed to the store so far: the offset a resume continues from.
    received: u64,
    task: tokio::task::JoinHandle<(kagami_store::BlobWriter, Option<kagami_store::StoreError>)>,
}

impl StoreSink {
    fn new(mut writer: kagami_store::BlobWriter) -> StoreSink {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(QUEUE);
        let task = tokio::spawn(async move {
            let mut chunks = Vec::with_capacity(QUEUE);
            while rx.recv_many(&mut chunks, QUEUE).await > 0 {
                if let Err(e) = writer.write_chunks(std::mem::take(&mut chunks)).await {
                    return (writer, Some(e));
                }
            }
            (writer, None)
        });
        StoreSink {
            tx: Some(tx),
            received: 0,
            task,
        }
    }

    /// False when the store side has stopped (a write failed).
    async fn send(&mut self, chunk: bytes::Bytes) -> bool {
        let n = chunk.len() as u64;
        match &self.tx {
            Some(tx) if tx.send(chunk).await.is_ok() => {
                self.received += n;
                true
            }
            _ => false,
        }
    }

    /// Waits for every queued chunk to be written; returns the writer and the write error,
    /// if one stopped it.
    async fn finish(mut self) -> (kagami_store::BlobWriter, Option<kagami_store::StoreError>) {
        drop(self.tx.take());
        self.task
            .await
            .expect("the store writer task does not panic")
    }
}

/// Hands a body to the store sink. Large network chunks go as they are (no copy); small
/// ones (TLS records are 16 KiB) are gathered into batches of up to `WRITE_BATCH` bytes.
async fn pump(sink: &mut StoreSink, body: &mut BlobBody, cap: u64) -> Pump {
    let mut batch = bytes::BytesMut::new();
    loop {
        let next = body.stream.next().await;
        if let Some(Ok(c)) = &next {
            let total = sink.received + batch.len() as u64 + c.len() as u64;
            if total > cap {
                return Pump::TooLarge(total);
            }
        }
        let (end, failed) = match next {
            Some(Ok(c)) if c.len() >= WRITE_BATCH / 4 && batch.is_empty() => {
                if !sink.send(c).await {
                    return Pump::StoreFailed;
                }
                continue;
            }
            Some(Ok(c)) => {
                batch.extend_from_slice(&c);
                (false, false)
            }
            Some(Err(_)) => (true, true),
            None => (true, false),
        };
        if (end || batch.len() >= WRITE_BATCH) && !batch.is_empty() {
            let full = batch.split().freeze();
            if !sink.send(full).await {
                return Pump::StoreFailed;
            }
        }
        if end {
            return if failed {
                Pump::UpstreamFailed
            } else {
                Pump::Done
            };
        }
    }
}

fn mark_store_full(svc: &Blobs) {
    *svc.store_full_until
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now() + FULL_BACKOFF);
}

/// Streams straight from upstream to this client, storing nothing. Counted in the fetch
/// budget (one socket, little memory), cut below the minimum rate and at the blob's size
/// or the cap, like a fetch.
async fn pass_through(
    svc: &Blobs,
    ctx: &RequestContext,
    digest: &Digest,
) -> Result<BlobReply, ApiError> {
    let (path, plan) = (&ctx.path, &**ctx.plan());
    let limits = &svc.limits;
    let Some(permit) = svc
        .budget
        .acquire(&svc.telemetry, CHUNK as u64, limits.queue_wait)
        .await
    else {
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
async fn serve_in_flight(
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
async fn serve_local(
    mut handle: BlobHandle,
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
        if start > 0 {
            handle
                .file
                .seek(io::SeekFrom::Start(start))
                .await
                .map_err(|e| ApiError::internal(e.to_string()))?;
        }
        use std::sync::atomic::Ordering::Relaxed;
        let busy = LOCAL_RESPONSES.fetch_add(1, Relaxed) >= BUSY_RESPONSES;
        let chunk = if busy { BUSY_CHUNK } else { CHUNK };
        let reader = tokio::io::AsyncReadExt::take(Pinned(handle), len.unwrap_or(size));
        Some(ReaderStream::with_capacity(reader, chunk).boxed())
    };
    Ok(BlobReply::Bytes {
        digest: digest.clone(),
        span,
        body,
        source: Source::Local,
    })
}

/// Keeps the store's pin on a blob for as long as its body is being sent (and counts it in
/// `LOCAL_RESPONSES`).
struct Pinned(BlobHandle);

impl Drop for Pinned {
    fn drop(&mut self) {
        LOCAL_RESPONSES.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl AsyncRead for Pinned {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0.file).poll_read(cx, buf)
    }
}

/// A reply streaming a fetch in flight; `follower` counts this client as one of the
/// fetch's followers for as long as its body is being sent.
fn serve_inflight(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn followers_spread_over_earlier_nodes() {
        let earlier: Vec<kagami_p2p::Peer> = ["a", "b", "c", "d"]
            .iter()
            .map(|id| kagami_p2p::Peer {
                id: id.to_string(),
                http_addr: "127.0.0.1:9".parse().unwrap(),
            })
            .collect();
        let mut first = std::collections::HashMap::new();
        for i in 0..200u32 {
            let digest =
                Digest::sha256_from_bytes(&<sha2::Sha256 as sha2::Digest>::digest(i.to_be_bytes()));
            let order = spread_followers("z", &digest, earlier.clone());
            assert_eq!(order.len(), 4, "every earlier node stays a fallback");
            assert_eq!(order, spread_followers("z", &digest, earlier.clone()));
            *first.entry(order[0].id.clone()).or_insert(0) += 1;
        }
        // 200 blobs over 4 nodes: each is tried first for some of them.
        for id in ["a", "b", "c", "d"] {
            assert!(first.get(id).copied().unwrap_or(0) >= 20, "{first:?}");
        }
    }
}
