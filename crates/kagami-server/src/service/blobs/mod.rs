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
use kagami_store::{Begin, BlobHandle, Inflight, MemoryPermit, Store};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::origin::{Origin, Source};
use crate::path::OciPath;
use crate::peers::{ClaimGuard, Cluster, ContentKey};
use crate::service::error::ApiError;
use crate::service::reply::{BlobReply, Span};
use crate::service::{Deps, RequestContext};
use crate::telemetry::Telemetry;
use crate::upstream::{BlobBody, Upstream};

mod budget;
mod fetch;
mod pieces;
mod serve;
mod sink;
mod sources;

use budget::*;
use fetch::*;
use serve::*;
use sink::*;
use sources::*;

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
    /// What the pieces of every fetch hold ahead of their frontiers (`pieces`).
    pieces_ahead: pieces::Ahead,
}

impl Blobs {
    pub(crate) fn new(deps: &Deps, limits: FetchLimits) -> Arc<Blobs> {
        // One budget for the memory of every fetch: the store's, which their chunks take
        // from until they leave its windows.
        deps.store.set_memory_limit(Some(limits.fetch_memory));
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
            pieces_ahead: pieces::Ahead::default(),
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

/// The most memory one fetch holds when the memory budget has room: the store's window
/// (the last 4 MiB on disk plus the batch being written), the queue to the writer and the
/// room of the next read. All of it is taken from the memory budget
/// (`FetchLimits::fetch_memory`).
pub const FETCH_MEMORY_MAX: u64 = kagami_store::WINDOW as u64
    + ((QUEUE + 1) * WRITE_BATCH) as u64
    + WRITE_BATCH as u64
    + READ_AHEAD;

/// Room in the memory budget a fetch takes before each read from its source (the largest
/// chunk one read of an upstream connection returns): a fetch reading holds at least this
/// much of the budget.
pub const FETCH_READ_AHEAD: u64 = READ_AHEAD;

/// Bounds on blob fetches (flags of `kagami serve`; see docs/security.md, "Resource
/// bounds").
#[derive(Debug, Clone)]
pub struct FetchLimits {
    /// The most blob fetches (and uncached pass-throughs) at once.
    pub max_fetches: usize,
    /// The memory fetches in flight may hold together: every chunk received takes its bytes
    /// from this one budget (the store's, see `kagami_store::StoreOptions::memory`) until
    /// it leaves the store's window; a fetch short of it waits (reading nothing more from
    /// its source) and its followers read from disk.
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
            max_fetches: 16,
            fetch_memory: 12 * 1024 * 1024,
            queue_wait: Duration::from_secs(5),
            max_blob_size: 16 * 1024 * 1024 * 1024,
            min_rate: 16 * 1024,
            rate_window: Duration::from_secs(30),
            abandon_grace: Duration::from_secs(5),
            revalidation_timeout: Duration::from_secs(25),
        }
    }
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
    let Ok(v) = kagami_config::oci::ManifestView::parse(manifest) else {
        return;
    };
    let found: Vec<(Digest, u64)> = v
        .all()
        .filter_map(|d| Some((d.digest.clone(), d.size?)))
        .collect();
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
