//! Blob GET/HEAD: from the store, else from one shared upstream fetch per digest, streamed
//! to every waiting client while it is written to the store.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use futures_util::StreamExt;
use kagami_config::{Config, Digest, plan};
use kagami_store::{Begin, BlobHandle, Inflight};
use tokio::io::{AsyncRead, AsyncSeekExt, ReadBuf};
use tokio::sync::watch;
use tokio_util::io::ReaderStream;

use crate::app::{AppState, Source};
use crate::error::ApiError;
use crate::metrics::EndpointLabels;
use crate::path::OciPath;
use crate::range::{self, RangeRequest};
use crate::upstream::BlobBody;

const CHUNK: usize = 256 * 1024;
/// Small upstream chunks are gathered into batches of this size before the store.
const WRITE_BATCH: usize = 256 * 1024;
/// Chunks queued between reception and the store writer.
const QUEUE: usize = 16;
/// How long cold blobs bypass the store after a write failed (disk full).
const FULL_BACKOFF: Duration = Duration::from_secs(30);

/// One upstream fetch of a blob, shared by every request for it.
pub struct Fetch {
    state: watch::Sender<FetchState>,
}

#[derive(Clone)]
enum FetchState {
    /// Looking for a source (other nodes first).
    Connecting,
    /// No other node has it: connecting to the endpoints (this node is the one fetching it
    /// for the cluster).
    ConnectingUpstream,
    Streaming {
        inflight: Arc<Inflight>,
        size: Option<u64>,
        source: Source,
    },
    /// The store cannot take the blob: each request streams from upstream itself.
    PassThrough,
    Failed(String),
}

pub(crate) async fn get(
    state: &AppState,
    config: &Arc<Config>,
    path: &OciPath,
    digest: &Digest,
    range_header: Option<&str>,
    head: bool,
) -> Result<(Response, Source), ApiError> {
    let inner = &state.inner;
    if let Some(handle) = inner
        .store
        .open_blob(digest)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
    {
        state.count_cache("blob", "hit");
        return serve_local(handle, digest, range_header, head).await;
    }
    state.count_cache("blob", "miss");
    let store_full = inner
        .store_full_until
        .lock()
        .expect("lock")
        .is_some_and(|t| Instant::now() < t);
    let fetch = if store_full {
        None
    } else {
        Some(join_or_start(state, config, path, digest))
    };
    let mut rx = match &fetch {
        Some(f) => f.state.subscribe(),
        None => watch::channel(FetchState::PassThrough).1,
    };
    let current = rx
        .wait_for(|s| !matches!(s, FetchState::Connecting | FetchState::ConnectingUpstream))
        .await
        .map(|s| s.clone())
        .unwrap_or(FetchState::Failed("fetch ended unexpectedly".into()));
    match current {
        FetchState::Streaming {
            inflight,
            size,
            source,
        } => Ok((
            serve_inflight(&inflight, size, digest, range_header, head),
            source,
        )),
        FetchState::PassThrough => pass_through(state, config, path, digest, head).await,
        // A blob a manifest names exists: failing to get it is a refusal.
        FetchState::Failed(why) => Err(ApiError::blob_unknown(why).refused("upstream_failed")),
        FetchState::Connecting | FetchState::ConnectingUpstream => {
            unreachable!("waited for a later state")
        }
    }
}

fn join_or_start(
    state: &AppState,
    config: &Arc<Config>,
    path: &OciPath,
    digest: &Digest,
) -> Arc<Fetch> {
    let mut fetches = state.inner.fetches.lock().expect("fetches lock");
    if let Some(f) = fetches.get(digest) {
        return f.clone();
    }
    let fetch = Arc::new(Fetch {
        state: watch::channel(FetchState::Connecting).0,
    });
    fetches.insert(digest.clone(), fetch.clone());
    let (state, config, path, digest, f) = (
        state.clone(),
        config.clone(),
        path.clone(),
        digest.clone(),
        fetch.clone(),
    );
    tokio::spawn(async move {
        state.inner.metrics.inflight.inc();
        run_fetch(&state, &config, &path, &digest, &f).await;
        if let Some(p) = state.peers() {
            p.router
                .withdraw(vec![crate::peers::inflight_key(&digest)])
                .await;
        }
        state.inner.metrics.inflight.dec();
        state
            .inner
            .fetches
            .lock()
            .expect("fetches lock")
            .remove(&digest);
    });
    fetch
}

/// The leader: fetches the blob from upstream into the store, resuming from the next
/// attempt at the same offset when an upstream fails mid-blob.
async fn run_fetch(
    state: &AppState,
    config: &Config,
    path: &OciPath,
    digest: &Digest,
    fetch: &Fetch,
) {
    let inner = &state.inner;
    let plan = plan(&path.reference(), config, state.plan_options());
    let writer = match inner.store.begin(digest, None) {
        Ok(Begin::Writer(w)) => w,
        Ok(Begin::Joined(inflight)) => {
            let size = inflight.expected_size();
            fetch.state.send_replace(FetchState::Streaming {
                inflight: Arc::new(inflight),
                size,
                source: Source::Local,
            });
            return;
        }
        Err(e) => {
            tracing::warn!(%digest, error = %e, "content store refused a new blob; passing through uncached");
            mark_store_full(state);
            fetch.state.send_replace(FetchState::PassThrough);
            return;
        }
    };
    let sources = Sources::new(state, &plan, path, digest).await;
    if sources.providers.is_empty() {
        fetch.state.send_replace(FetchState::ConnectingUpstream);
    }
    let mut body = match sources.open(0, 0).await {
        Ok(b) => b,
        Err(e) => {
            upstream_failed(state, &plan, &e.message);
            fetch.state.send_replace(FetchState::Failed(e.message));
            return;
        }
    };
    let size = body.size;
    let mut contributors = vec![body.source.clone()];
    let follow = writer.follow();
    let mut sink = StoreSink::new(writer);
    fetch.state.send_replace(FetchState::Streaming {
        inflight: Arc::new(follow),
        size,
        source: if body.source.starts_with("peer:") {
            Source::Peer
        } else {
            Source::Upstream
        },
    });
    // Announcements that crossed each other leave two nodes fetching the same blob from
    // upstream; the one with the higher id finds out and continues from the other.
    let mut rival = match state.peers() {
        Some(p) if sources.cluster_leader => Some(Box::pin(lower_fetcher(state, p, digest))),
        _ => None,
    };
    // The current body is a rival node's, standing in for the attempt it replaced.
    let mut retry_same = false;
    loop {
        count_upstream(state, &body);
        let outcome = match rival.as_mut() {
            Some(r) => tokio::select! {
                o = pump(&mut sink, &mut body) => o,
                peer = r => Pump::Yield(peer),
            },
            None => pump(&mut sink, &mut body).await,
        };
        let next = match outcome {
            Pump::Yield(peer) => {
                rival = None;
                // The pump was stopped between chunks: continue at what the store has.
                let offset = sink.received;
                let from_peer = match state.peers() {
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
                    Some(mut b) => {
                        tracing::info!(%digest, offset, node = %peer.id, "another node is fetching this blob from upstream too; continuing from it");
                        // Should that node fail, the endpoint this one used is next.
                        b.attempt = body.attempt;
                        retry_same = true;
                        Ok(b)
                    }
                    None => sources.open(offset, body.attempt).await,
                }
            }
            Pump::Done if size.is_none_or(|s| sink.received == s) => break,
            Pump::Done | Pump::UpstreamFailed => {
                let offset = sink.received;
                tracing::warn!(%digest, offset, source = %body.source, "source failed mid-blob; continuing from the next one");
                state.inner.status.endpoint_failed(
                    &body.source,
                    &format!("{digest}: body cut at byte {offset}"),
                );
                let from = if std::mem::take(&mut retry_same) {
                    body.attempt
                } else {
                    body.attempt + 1
                };
                sources.open(offset, from).await
            }
            Pump::StoreFailed => {
                let (_, e) = sink.finish().await;
                let e = e.map_or_else(|| "the store writer stopped".to_string(), |e| e.to_string());
                tracing::warn!(%digest, error = %e, "content store write failed; cold blobs pass through uncached for a while");
                mark_store_full(state);
                return;
            }
        };
        match next {
            Ok(b) => {
                body = b;
                contributors.push(body.source.clone());
            }
            Err(e) => {
                let offset = sink.received;
                tracing::warn!(%digest, offset, error = %e.message, "no source can continue the blob");
                upstream_failed(state, &plan, &e.message);
                return; // dropping the writer aborts: followers get an error
            }
        }
    }
    let writer = match sink.finish().await {
        (w, None) => w,
        (_, Some(e)) => {
            tracing::warn!(%digest, error = %e, "content store write failed; cold blobs pass through uncached for a while");
            mark_store_full(state);
            return;
        }
    };
    match writer.commit().await {
        Ok(n) => tracing::debug!(%digest, bytes = n, "blob stored"),
        Err(e) => {
            tracing::warn!(%digest, error = %e, "blob not stored");
            if matches!(e, kagami_store::StoreError::DigestMismatch { .. })
                && let Some(peers) = state.peers()
            {
                for id in contributors.iter().filter_map(|s| s.strip_prefix("peer:")) {
                    peers.ban(id);
                }
            }
        }
    }
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
    state: &AppState,
    peers: &crate::peers::Peers,
    digest: &Digest,
) -> Vec<kagami_p2p::Peer> {
    let Some(me) = state.inner.node_info.get().map(|n| n.peer_id.clone()) else {
        return Vec::new();
    };
    let key = crate::peers::inflight_key(digest);
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
    state: &AppState,
    peers: &crate::peers::Peers,
    digest: &Digest,
) -> kagami_p2p::Peer {
    if let Some(me) = state.inner.node_info.get().map(|n| n.peer_id.clone()) {
        let key = crate::peers::inflight_key(digest);
        for wait in [300, 700, 2000] {
            tokio::time::sleep(Duration::from_millis(wait)).await;
            let lowest = peers
                .providers(&key)
                .await
                .into_iter()
                .filter(|p| p.id < me)
                .min_by(|a, b| a.id.cmp(&b.id));
            if let Some(p) = lowest {
                return p;
            }
        }
    }
    std::future::pending().await
}

/// Where a blob can come from, in the plan's order: providers among the other nodes
/// (when the registry is shared and P2P is on), then the endpoints. `BlobBody::attempt`
/// numbers them in that order, so a resume continues after the source that failed.
struct Sources<'a> {
    state: &'a AppState,
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
        state: &'a AppState,
        plan: &'a kagami_config::Plan,
        path: &'a OciPath,
        digest: &'a Digest,
    ) -> Sources<'a> {
        let wants_peers = plan
            .attempts
            .iter()
            .any(|a| matches!(a, kagami_config::Attempt::Peers));
        let mut cluster_leader = false;
        let providers = match state.peers() {
            Some(p) if wants_peers => {
                let holders = p.providers(&digest.to_string()).await;
                if holders.is_empty() {
                    let earlier = cluster_fetcher(state, p, digest).await;
                    cluster_leader = earlier.is_empty() && state.inner.node_info.get().is_some();
                    earlier
                } else {
                    holders
                }
            }
            _ => Vec::new(),
        };
        Sources {
            state,
            plan,
            path,
            digest,
            providers,
            cluster_leader,
        }
    }

    async fn open(
        &self,
        offset: u64,
        from: usize,
    ) -> Result<BlobBody, crate::upstream::UpstreamError> {
        let n = self.providers.len();
        if from < n
            && let Some(peers) = self.state.peers()
            && let Some(b) = peers
                .blob(
                    &self.providers,
                    from,
                    &self.path.registry,
                    &self.path.repository,
                    self.digest,
                    offset,
                )
                .await
        {
            return Ok(b);
        }
        let mut b = self
            .state
            .inner
            .upstream
            .blob(self.plan, self.digest, offset, from.saturating_sub(n))
            .await?;
        b.attempt += n;
        Ok(b)
    }
}

enum Pump {
    /// Another node with a lower id is fetching the same blob from upstream.
    Yield(kagami_p2p::Peer),
    Done,
    UpstreamFailed,
    StoreFailed,
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
async fn pump(sink: &mut StoreSink, body: &mut BlobBody) -> Pump {
    let mut batch = bytes::BytesMut::new();
    loop {
        let next = body.stream.next().await;
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

fn count_upstream(state: &AppState, body: &BlobBody) {
    state.inner.status.endpoint_ok(&body.source);
    state
        .inner
        .metrics
        .upstream_fetches
        .get_or_create(&EndpointLabels {
            endpoint: body.source.clone(),
        })
        .inc();
}

/// Every source of a blob failed: counted in the metrics and on the status page.
fn upstream_failed(state: &AppState, plan: &kagami_config::Plan, why: &str) {
    let first = crate::status::first_endpoint(plan).unwrap_or_else(|| "none".into());
    state
        .inner
        .metrics
        .upstream_failures
        .get_or_create(&EndpointLabels { endpoint: first })
        .inc();
    crate::status::plan_failed(state, plan, why);
}

fn mark_store_full(state: &AppState) {
    *state.inner.store_full_until.lock().expect("lock") = Some(Instant::now() + FULL_BACKOFF);
}

/// Streams straight from upstream to this client, storing nothing.
async fn pass_through(
    state: &AppState,
    config: &Config,
    path: &OciPath,
    digest: &Digest,
    head: bool,
) -> Result<(Response, Source), ApiError> {
    let plan = plan(&path.reference(), config, state.plan_options());
    let body = state
        .inner
        .upstream
        .blob(&plan, digest, 0, 0)
        .await
        .inspect_err(|e| crate::status::plan_failed(state, &plan, &e.message))
        .map_err(|e| ApiError::blob_unknown(e.message).refused("upstream_failed"))?;
    count_upstream(state, &body);
    let mut b = blob_response(StatusCode::OK, digest, body.size);
    if !head {
        *b.body_mut() = Body::from_stream(body.stream);
    }
    Ok((b, Source::Upstream))
}

/// A response for another node from this node's fetch of `digest` in progress (one
/// upstream fetch per cluster; a chain of nodes each streaming from the one before works
/// too, every hop verifying): waits up to 5 s while it connects to an endpoint, but only
/// 1 s for a fetch still looking for a source among the nodes, so that two nodes holding
/// stale records of each other never wait long on each other.
pub(crate) async fn serve_in_flight(
    state: &AppState,
    digest: &Digest,
    range_header: Option<&str>,
    head: bool,
) -> Option<Response> {
    let fetch = state
        .inner
        .fetches
        .lock()
        .expect("fetches lock")
        .get(digest)
        .cloned()?;
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
        FetchState::Streaming { inflight, size, .. } => {
            Some(serve_inflight(&inflight, size, digest, range_header, head))
        }
        _ => None,
    }
}

pub(crate) fn blob_response(status: StatusCode, digest: &Digest, len: Option<u64>) -> Response {
    let mut r = Response::new(Body::empty());
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(
        "Docker-Content-Digest",
        HeaderValue::from_str(&digest.to_string()).expect("digest is ascii"),
    );
    if let Some(len) = len {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    r
}

pub(crate) fn content_range(r: &mut Response, start: u64, end: u64, size: u64) {
    r.headers_mut().insert(
        header::CONTENT_RANGE,
        HeaderValue::from_str(&format!("bytes {start}-{end}/{size}")).expect("ascii"),
    );
}

pub(crate) fn unsatisfiable(size: u64) -> Response {
    let mut r = axum::response::IntoResponse::into_response(ApiError::range_not_satisfiable(size));
    r.headers_mut().insert(
        header::CONTENT_RANGE,
        HeaderValue::from_str(&format!("bytes */{size}")).expect("ascii"),
    );
    r
}

pub(crate) async fn serve_local(
    mut handle: BlobHandle,
    digest: &Digest,
    range_header: Option<&str>,
    head: bool,
) -> Result<(Response, Source), ApiError> {
    let size = handle.size;
    let (status, start, len) = match range::parse(range_header, size) {
        RangeRequest::Full => (StatusCode::OK, 0, size),
        RangeRequest::Partial(r) => (StatusCode::PARTIAL_CONTENT, r.start, r.len()),
        RangeRequest::Unsatisfiable => return Ok((unsatisfiable(size), Source::None)),
    };
    let mut resp = blob_response(status, digest, Some(len));
    if status == StatusCode::PARTIAL_CONTENT {
        content_range(&mut resp, start, start + len - 1, size);
    }
    if !head {
        if start > 0 {
            handle
                .file
                .seek(io::SeekFrom::Start(start))
                .await
                .map_err(|e| ApiError::internal(e.to_string()))?;
        }
        let reader = tokio::io::AsyncReadExt::take(Pinned(handle), len);
        *resp.body_mut() = Body::from_stream(ReaderStream::with_capacity(reader, CHUNK));
    }
    Ok((resp, Source::Local))
}

/// Keeps the store's pin on a blob for as long as its body is being sent.
struct Pinned(BlobHandle);

impl AsyncRead for Pinned {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0.file).poll_read(cx, buf)
    }
}

fn serve_inflight(
    inflight: &Inflight,
    size: Option<u64>,
    digest: &Digest,
    range_header: Option<&str>,
    head: bool,
) -> Response {
    let (status, start, len) = match size {
        None => (StatusCode::OK, 0, None),
        Some(size) => match range::parse(range_header, size) {
            RangeRequest::Full => (StatusCode::OK, 0, Some(size)),
            RangeRequest::Partial(r) => (StatusCode::PARTIAL_CONTENT, r.start, Some(r.len())),
            RangeRequest::Unsatisfiable => return unsatisfiable(size),
        },
    };
    let mut resp = blob_response(status, digest, len);
    if let (StatusCode::PARTIAL_CONTENT, Some(len), Some(size)) = (status, len, size) {
        content_range(&mut resp, start, start + len - 1, size);
    }
    if !head {
        let stream = inflight.stream(
            start,
            if status == StatusCode::PARTIAL_CONTENT {
                len
            } else {
                None
            },
        );
        *resp.body_mut() = Body::from_stream(stream);
    }
    resp
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
