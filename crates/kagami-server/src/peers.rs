//! Content from other nodes (docs/p2p.md): who has a key is asked of the P2P
//! [`Router`]; the bytes come over HTTP from the peer's peer API, which serves only what
//! that node holds (no recursion). Everything from a peer is verified by digest: blobs by
//! the store as they are written, manifests here. A peer that sends wrong bytes is dropped
//! (not asked again for a while).

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use kagami_config::Digest;
use kagami_config::oci::Hasher;
use kagami_config::reference::Algorithm;
use kagami_p2p::{Peer, Router};
use sha2::{Digest as _, Sha256};

use crate::origin::Origin;
use crate::telemetry::{PeerCounts, Telemetry};
use crate::upstream::{BlobBody, FetchedManifest};

/// How long a peer that sent wrong bytes is left out.
const BAN: Duration = Duration::from_secs(600);
/// A second provider is asked when the first has not answered within this time.
const HEDGE_AFTER: Duration = Duration::from_millis(250);

/// The header carrying the peer token.
pub const PEER_TOKEN_HEADER: &str = "x-kagami-peer-token";

/// How long a node's peer API waits for a tag it is resolving before it answers `503` with
/// `Retry-After` (ask again): below the peer client's read timeout (5 s).
pub const TAG_WAIT: Duration = Duration::from_secs(3);

/// The token every member sends to other members: derived from the pre-shared key, so a
/// machine without the key can neither join the DHT nor download from a node.
pub fn peer_token(psk: &[u8; 32]) -> String {
    let mut h = Sha256::new();
    h.update(b"kagami peer token v1\0");
    h.update(psk);
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

mod claims;
mod key;
pub use claims::{ClaimAnswer, ClaimPeer, ClaimRequest, Release, StoredAnswer, coordinator_order};
pub(crate) use claims::{ClaimGuard, Claimed, Full, MAX_ASKERS};
pub use key::{BadKey, ContentKey};

/// (registry, repository, tag).
pub(crate) type TagKey = (String, String, String);

/// What this node tells a node that bootstraps from its HTTP address.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct NodeInfo {
    pub peer_id: String,
    pub addrs: Vec<String>,
}

/// This node's place among the others, once P2P is on (set at start, after the services
/// are built): what a service holds instead of the whole state.
#[derive(Clone, Default)]
pub(crate) struct Cluster {
    pub(crate) peers: std::sync::Arc<std::sync::OnceLock<std::sync::Arc<Peers>>>,
    pub(crate) node: std::sync::Arc<std::sync::OnceLock<NodeInfo>>,
}

/// What the p2p layer reads of this node: its store, its configuration (reloads
/// included) and its place among the others.
#[derive(Clone)]
pub(crate) struct Node {
    pub(crate) store: kagami_store::Store,
    pub(crate) config: std::sync::Arc<std::sync::RwLock<std::sync::Arc<kagami_config::Config>>>,
    pub(crate) cluster: Cluster,
}

impl Node {
    pub(crate) fn config(&self) -> std::sync::Arc<kagami_config::Config> {
        self.config
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Cluster {
    pub(crate) fn peers(&self) -> Option<&std::sync::Arc<Peers>> {
        self.peers.get()
    }

    /// This node's P2P id, when P2P is on.
    pub(crate) fn me(&self) -> Option<&str> {
        self.node.get().map(|n| n.peer_id.as_str())
    }
}

/// The key a node advertises while it fetches a blob nobody held (see `service::blobs`, `sources::cluster_fetcher`).
pub fn inflight_key(digest: &Digest) -> String {
    ContentKey::Inflight(digest.clone()).to_string()
}

/// The key under which a resolved tag is advertised.
pub fn tag_key(registry: &str, repository: &str, tag: &str) -> String {
    ContentKey::tag(registry, repository, tag).to_string()
}

pub struct Peers {
    pub router: std::sync::Arc<dyn Router>,
    http: reqwest::Client,
    token: Option<String>,
    banned: Mutex<HashMap<String, Instant>>,
    /// Resolve `latest` through peers too (K3s: K3S_P2P_ENABLE_LATEST).
    pub resolve_latest: bool,
    /// Where lookups, their latency and hits, and bytes received are counted (the
    /// server's, set by `AppState::set_peers`); nothing is counted before.
    telemetry: OnceLock<Arc<Telemetry>>,
    /// This node's own peer HTTP address: a provider there is this node under an earlier
    /// identity (a record that outlived a restart with a new data directory), never asked.
    own_http_addr: std::sync::OnceLock<std::net::SocketAddr>,
    /// Tags resolved through peers: kept here, not in the store (see [`LearntTags`]).
    learnt: LearntTags,
    /// The claims this node coordinates (see `claims`).
    claims: claims::Claims,
    /// Blobs this node is getting as a follower in a claim's tree, whose announcement
    /// waits once stored (see [`advertise_store`]), with when they were
    /// registered.
    deferred: Mutex<HashMap<Digest, (String, Instant)>>,
}

/// How long the announcement of a blob this node got as a follower in a claim's tree waits
/// once the blob is stored: at least [`DEFER_MIN`], plus a random part of up to [`DEFER_SPREAD`]. Meanwhile
/// the blob's coordinator still points later askers at the claim's holder and askers
/// (`claims::DONE_KEEP`), so nobody fetches it again; and the announcements, a DHT query
/// and its stores each, happen after a cluster-wide pull rather than during it: with every
/// node announcing the config blob at the start of a pull and the layer at its end, they
/// competed for CPU with the transfers (docs/p2p.md, "Announcements").
const DEFER_MIN: Duration = Duration::from_secs(2);
const DEFER_SPREAD: Duration = Duration::from_secs(4);
const _: () = assert!(
    DEFER_MIN.as_millis() + DEFER_SPREAD.as_millis() + 10_000 < claims::DONE_KEEP.as_millis(),
    "a deferred announcement must be out well before the coordinator forgets the holder"
);

/// `peers` in a random order: nodes asking the same list would otherwise all start with
/// its first entry.
pub(crate) fn shuffled(mut peers: Vec<Peer>) -> Vec<Peer> {
    let order = std::collections::hash_map::RandomState::new();
    peers.sort_by_cached_key(|p| std::hash::BuildHasher::hash_one(&order, &p.id));
    peers
}

/// Registrations older than this are dropped (a fetch that failed never stores its blob).
const DEFERRED_KEEP: Duration = Duration::from_secs(600);

/// The most tags learnt from peers kept at once; beyond it the oldest go first.
const MAX_LEARNT_TAGS: usize = 10_000;

/// Tags this node resolved through peers. A peer's answer for a tag is not verifiable (any
/// holder of the key can answer any digest), so it is worth less than an endpoint's: it is
/// kept in memory only for the tag TTL, then asked again; it is never written to the
/// store's tag index, so it is never served stale when every source fails, never
/// advertised as this node's own and never served to other nodes. The manifest it names is
/// content like any other (verified by digest, stored, shared).
#[derive(Default)]
struct LearntTags(Mutex<HashMap<TagKey, kagami_store::TagEntry>>);

impl LearntTags {
    fn insert(&self, key: TagKey, entry: kagami_store::TagEntry, ttl: Duration) {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= MAX_LEARNT_TAGS {
            let now = std::time::SystemTime::now();
            map.retain(|_, e| now.duration_since(e.fetched_at).unwrap_or_default() < ttl);
            while map.len() >= MAX_LEARNT_TAGS {
                let oldest = map
                    .iter()
                    .min_by_key(|(_, e)| e.fetched_at)
                    .map(|(k, _)| k.clone());
                match oldest {
                    Some(k) => map.remove(&k),
                    None => break,
                };
            }
        }
        map.insert(key, entry);
    }

    fn get(&self, key: &TagKey, ttl: Duration) -> Option<kagami_store::TagEntry> {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = map.get(key)?;
        let age = std::time::SystemTime::now()
            .duration_since(entry.fetched_at)
            .unwrap_or_default();
        if age < ttl {
            return Some(entry.clone());
        }
        map.remove(key);
        None
    }
}

/// Why a peer did not answer a manifest ([`Peers::manifest_from`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotFromPeer {
    /// It is resolving the tag right now (it holds the tag's claim): ask again.
    Resolving,
    /// It does not have it, did not answer, or sent something else.
    Missing,
}

/// The body of `resp` when it is at most `max` bytes, read as it streams (a chunked answer
/// has no length to check first); `None` when larger or cut.
async fn read_bounded(resp: reqwest::Response, max: u64) -> Option<Vec<u8>> {
    if resp.content_length().is_some_and(|l| l > max) {
        return None;
    }
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.ok()?;
        if (body.len() + chunk.len()) as u64 > max {
            return None;
        }
        body.extend_from_slice(&chunk);
    }
    Some(body)
}

impl Peers {
    pub fn new(
        router: std::sync::Arc<dyn Router>,
        psk: Option<&[u8; 32]>,
        resolve_latest: bool,
    ) -> Peers {
        // reqwest is built without a default TLS provider; peers speak plain http, but the
        // builder insists on one.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(500))
            .read_timeout(Duration::from_secs(5))
            .no_proxy()
            .build()
            .expect("an http-only client builds");
        Peers {
            router,
            http,
            token: psk.map(peer_token),
            banned: Mutex::new(HashMap::new()),
            resolve_latest,
            telemetry: OnceLock::new(),
            own_http_addr: std::sync::OnceLock::new(),
            learnt: LearntTags::default(),
            claims: claims::Claims::default(),
            deferred: Mutex::new(HashMap::new()),
        }
    }

    /// Marks `digest` as being got by this node (`me`) as a claim's follower: once stored, it
    /// tells the claim's coordinator so, and its announcement waits (see [`DEFER_MIN`]).
    pub(crate) fn defer_announcement(&self, me: &str, digest: &Digest) {
        let now = Instant::now();
        let mut map = self.deferred.lock().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= 1024 {
            map.retain(|_, (_, at)| now.duration_since(*at) < DEFERRED_KEEP);
        }
        map.insert(digest.clone(), (me.to_string(), now));
    }

    /// This node's id when `digest`'s announcement waits, forgetting the registration.
    fn take_deferred(&self, digest: &Digest) -> Option<String> {
        self.deferred
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(digest)
            .map(|(me, _)| me)
    }

    /// Counts into `telemetry` from now on (once; later calls are ignored).
    pub(crate) fn attach(&self, telemetry: Arc<Telemetry>) {
        let _ = self.telemetry.set(telemetry);
    }

    /// Lookups, hits and bytes received so far, as the metrics have them.
    pub fn counts(&self) -> PeerCounts {
        self.telemetry
            .get()
            .map(|t| t.peer_counts())
            .unwrap_or_default()
    }

    /// Bytes received from each other node, by peer id.
    pub fn received_bytes(&self) -> std::collections::BTreeMap<String, u64> {
        self.counts().received
    }

    /// Tells which peer HTTP address is this node's own (see [`Peers::providers`]).
    pub fn set_own_http_addr(&self, addr: std::net::SocketAddr) {
        let _ = self.own_http_addr.set(addr);
    }

    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// Providers of `key`, minus banned ones and minus this node itself under an earlier
    /// identity (asking oneself would wait on one's own fetch).
    pub async fn providers(&self, key: &str) -> Vec<Peer> {
        let started = Instant::now();
        let found = self.router.lookup(key, 5).await;
        let took = started.elapsed();
        let now = Instant::now();
        let mut banned = self.banned.lock().unwrap_or_else(PoisonError::into_inner);
        banned.retain(|_, until| *until > now);
        let own = self.own_http_addr.get();
        // In random order: the DHT returns providers in the same order to everyone, and
        // nodes pulling the same blob would all ask the first one.
        let found = shuffled(
            found
                .into_iter()
                .filter(|p| !banned.contains_key(&p.id) && Some(&p.http_addr) != own)
                .collect(),
        );
        if let Some(t) = self.telemetry.get() {
            t.peer_lookup(took, !found.is_empty());
        }
        found
    }

    pub fn ban(&self, peer_id: &str) {
        tracing::warn!(
            peer = peer_id,
            "peer sent wrong bytes; not asking it again for 10 minutes"
        );
        self.banned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(peer_id.to_string(), Instant::now() + BAN);
    }

    fn request(&self, peer: &Peer, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut r = self
            .http
            .request(method, format!("http://{}{path}", peer.http_addr));
        if let Some(t) = &self.token {
            r = r.header(PEER_TOKEN_HEADER, t);
        }
        r
    }

    /// GET a blob from one peer from `offset`; the body counts bytes per peer.
    async fn blob_from(
        &self,
        peer: &Peer,
        path: &str,
        offset: u64,
    ) -> Option<(reqwest::Response, u64)> {
        let mut req = self.request(peer, reqwest::Method::GET, path);
        if offset > 0 {
            req = req.header(reqwest::header::RANGE, format!("bytes={offset}-"));
        }
        let resp = req.send().await.ok()?;
        let start = match resp.status() {
            reqwest::StatusCode::OK => 0,
            reqwest::StatusCode::PARTIAL_CONTENT if offset > 0 => offset,
            _ => return None,
        };
        Some((resp, start))
    }

    /// The peer API path of a blob of `registry/repository`.
    pub(crate) fn blob_path(registry: &str, repository: &str, digest: &Digest) -> String {
        format!(
            "/v2/{repository}/blobs/{digest}?ns={}",
            crate::path::encode(registry)
        )
    }

    /// The size of a blob one peer holds (a HEAD of its peer API), when it answers.
    pub(crate) async fn blob_size(&self, peer: &Peer, path: &str) -> Option<u64> {
        let resp = self
            .request(peer, reqwest::Method::HEAD, path)
            .send()
            .await
            .ok()?;
        if resp.status() != reqwest::StatusCode::OK {
            return None;
        }
        resp.headers()
            .get(reqwest::header::CONTENT_LENGTH)?
            .to_str()
            .ok()?
            .parse()
            .ok()
    }

    /// Bytes `start..=end` of a blob from one peer (`Range: bytes=start-end`): the body
    /// when it answers `206` for exactly that range, else an error naming what it did.
    /// The body counts the bytes received from that peer.
    pub(crate) async fn blob_range(
        &self,
        peer: &Peer,
        path: &str,
        start: u64,
        end: u64,
    ) -> Result<futures_util::stream::BoxStream<'static, io::Result<Bytes>>, String> {
        let resp = self
            .request(peer, reqwest::Method::GET, path)
            .header(reqwest::header::RANGE, format!("bytes={start}-{end}"))
            .send()
            .await
            .map_err(|e| format!("peer {}: {e}", peer.id))?;
        if resp.status() != reqwest::StatusCode::PARTIAL_CONTENT {
            return Err(format!(
                "peer {} answered {} to the range {start}-{end}",
                peer.id,
                resp.status()
            ));
        }
        let range = resp
            .headers()
            .get(reqwest::header::CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if !range.starts_with(&format!("bytes {start}-{end}/")) {
            return Err(format!(
                "peer {} answered the range {range:?} for {start}-{end}",
                peer.id
            ));
        }
        let counter = self.received_counter(&peer.id);
        Ok(resp
            .bytes_stream()
            .map_err(io::Error::other)
            .inspect_ok(move |c| counter(c.len() as u64))
            .boxed())
    }

    /// A blob from the providers in `peers[from..]`, in order. With `hedge`, when the
    /// first has not answered within 250 ms the next one is asked too, and the first answer
    /// wins: for nodes holding the blob whole, any of which answers at once. Not for nodes
    /// streaming a blob in flight to each other (a claim's tree): a parent answers only once
    /// its own source has, which can take longer at every level, and a hedge to the next
    /// source (an ancestor) would pile the tree's transfers onto the nodes at its root.
    #[allow(clippy::too_many_arguments)]
    pub async fn blob(
        &self,
        peers: &[Peer],
        from: usize,
        registry: &str,
        repository: &str,
        digest: &Digest,
        offset: u64,
        hedge: bool,
    ) -> Option<(BlobBody, Origin)> {
        let path = Peers::blob_path(registry, repository, digest);
        let mut i = from;
        while i < peers.len() {
            let first = self.blob_from(&peers[i], &path, offset);
            let (resp, idx) = match peers.get(i + 1).filter(|_| hedge) {
                None => (first.await.map(|r| (r, i)), i),
                Some(second) => {
                    let hedge = async {
                        tokio::time::sleep(HEDGE_AFTER).await;
                        self.blob_from(second, &path, offset).await
                    };
                    tokio::pin!(first, hedge);
                    tokio::select! {
                        r = &mut first => match r {
                            Some(r) => (Some((r, i)), i),
                            None => (hedge.await.map(|r| (r, i + 1)), i + 1),
                        },
                        r = &mut hedge => match r {
                            Some(r) => (Some((r, i + 1)), i + 1),
                            None => (first.await.map(|r| (r, i)), i + 1),
                        },
                    }
                }
            };
            if let Some(((resp, start), winner)) = resp {
                let peer = peers[winner].clone();
                let size = resp.content_length().map(|l| start + l);
                let skip = offset - start.min(offset);
                let counter = self.received_counter(&peer.id);
                let stream = resp
                    .bytes_stream()
                    .map_err(io::Error::other)
                    .inspect_ok(move |c| counter(c.len() as u64));
                let stream = crate::client_upstream::skip_bytes(stream, skip).boxed();
                let origin = Origin::Peer(peer.id);
                let body = BlobBody {
                    stream,
                    size,
                    source: origin.to_string(),
                    attempt: winner,
                };
                return Some((body, origin));
            }
            i = idx + 1;
        }
        None
    }

    fn received_counter(&self, peer: &str) -> Box<dyn Fn(u64) + Send + Sync> {
        match self.telemetry.get() {
            Some(t) => Box::new(t.peer_received(peer)),
            None => Box::new(|_| {}),
        }
    }

    /// A manifest (by digest, or by tag through the tag key) from the first provider that
    /// has it; by digest it is verified here.
    pub async fn manifest(
        &self,
        registry: &str,
        repository: &str,
        reference: &str,
    ) -> Option<(FetchedManifest, Origin)> {
        let by_digest: Option<Digest> = reference.parse().ok();
        if by_digest.is_none() && reference == "latest" && !self.resolve_latest {
            return None;
        }
        let key = match &by_digest {
            Some(d) => d.to_string(),
            None => ContentKey::tag(registry, repository, reference).to_string(),
        };
        for peer in self.providers(&key).await {
            if let Ok(found) = self
                .manifest_from(&peer, registry, repository, reference)
                .await
            {
                return Some(found);
            }
        }
        None
    }

    /// A manifest (by digest, verified here, or by tag) from one peer.
    pub(crate) async fn manifest_from(
        &self,
        peer: &Peer,
        registry: &str,
        repository: &str,
        reference: &str,
    ) -> Result<(FetchedManifest, Origin), NotFromPeer> {
        let by_digest: Option<Digest> = reference.parse().ok();
        let path = format!(
            "/v2/{repository}/manifests/{reference}?ns={}",
            crate::path::encode(registry)
        );
        let resp = self
            .request(peer, reqwest::Method::GET, &path)
            .header(reqwest::header::ACCEPT, "*/*")
            .send()
            .await
            .map_err(|_| NotFromPeer::Missing)?;
        if resp.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE
            && resp.headers().contains_key(reqwest::header::RETRY_AFTER)
        {
            return Err(NotFromPeer::Resolving);
        }
        if !resp.status().is_success() {
            return Err(NotFromPeer::Missing);
        }
        let media_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or(kagami_config::oci::OCI_MANIFEST)
            .to_string();
        let Some(bytes) = read_bounded(resp, kagami_config::oci::MAX_MANIFEST_SIZE).await else {
            tracing::debug!(peer = %peer.id, reference, "peer manifest unreadable or over 4 MiB");
            return Err(NotFromPeer::Missing);
        };
        // By digest, with that digest's algorithm; by tag, the canonical sha256.
        let algorithm = by_digest
            .as_ref()
            .map_or(Algorithm::Sha256, Digest::algorithm);
        let actual = Hasher::digest(algorithm, &bytes);
        if let Some(d) = &by_digest
            && &actual != d
        {
            self.ban(&peer.id);
            return Err(NotFromPeer::Missing);
        }
        self.add_received(&peer.id, bytes.len() as u64);
        let origin = Origin::Peer(peer.id.clone());
        let manifest = FetchedManifest {
            bytes: Bytes::from(bytes),
            media_type,
            digest: actual,
            source: origin.to_string(),
        };
        Ok((manifest, origin))
    }

    /// Remembers that `tag` resolved to `entry` through a peer (see [`LearntTags`]).
    pub(crate) fn learn_tag(
        &self,
        registry: &str,
        repository: &str,
        tag: &str,
        entry: kagami_store::TagEntry,
        ttl: Duration,
    ) {
        self.learnt
            .insert((registry.into(), repository.into(), tag.into()), entry, ttl);
    }

    /// A tag learnt from a peer less than `ttl` ago.
    pub(crate) fn learnt_tag(
        &self,
        registry: &str,
        repository: &str,
        tag: &str,
        ttl: Duration,
    ) -> Option<kagami_store::TagEntry> {
        self.learnt
            .get(&(registry.into(), repository.into(), tag.into()), ttl)
    }

    /// The tags of `registry/repository` learnt from peers less than `ttl` ago.
    pub(crate) fn learnt_tags(
        &self,
        registry: &str,
        repository: &str,
        ttl: Duration,
    ) -> Vec<String> {
        let now = std::time::SystemTime::now();
        self.learnt
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|((r, p, _), e)| {
                r == registry
                    && p == repository
                    && now.duration_since(e.fetched_at).unwrap_or_default() < ttl
            })
            .map(|((_, _, t), _)| t.clone())
            .collect()
    }

    fn add_received(&self, peer: &str, n: u64) {
        self.received_counter(peer)(n);
    }
}

/// Advertises every blob in the store and the tags of shared registries in its tag index
/// (tags resolved before a restart included), then follows the store: added blobs are
/// advertised, evicted ones withdrawn (unless containerd's content still holds them).
/// Runs until the store goes away.
pub async fn advertise_store(state: crate::AppState) {
    let Some(peers) = state.peers().cloned() else {
        return;
    };
    let all = |state: &crate::AppState| -> Vec<String> {
        state
            .store()
            .digests()
            .iter()
            .map(|d| d.to_string())
            .collect()
    };
    let mut events = state.store().subscribe();
    let keys = all(&state);
    let tags = stored_tag_keys(&state);
    tracing::info!(
        keys = keys.len(),
        tags = tags.len(),
        "advertising the content store to other nodes"
    );
    peers.router.advertise(keys).await;
    if !tags.is_empty() {
        peers.router.advertise(tags).await;
    }
    // Blobs got as a claim's follower, stored and not announced yet, and when they will be.
    let mut waiting: Vec<Digest> = Vec::new();
    let mut due: Option<tokio::time::Instant> = None;
    loop {
        let event = tokio::select! {
            event = events.recv() => event,
            () = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)),
                if due.is_some() =>
            {
                due = None;
                let keys = waiting.drain(..).map(|d| d.to_string()).collect();
                peers.router.advertise(keys).await;
                continue;
            }
        };
        match event {
            Ok(kagami_store::StoreEvent::Added(d)) => {
                if let Some(me) = peers.take_deferred(&d) {
                    // Until the announcement is out, the coordinator names this node to
                    // later askers as one that holds the blob.
                    let (p, key) = (peers.clone(), ContentKey::Digest(d.clone()));
                    tokio::spawn(async move {
                        p.claim(&me, &key, None, Some(claims::Release::Done), &|| true)
                            .await;
                    });
                    waiting.push(d);
                    due.get_or_insert_with(|| tokio::time::Instant::now() + defer_delay());
                } else {
                    peers.router.advertise(vec![d.to_string()]).await
                }
            }
            Ok(kagami_store::StoreEvent::Removed(d)) => {
                if let Some(i) = waiting.iter().position(|w| *w == d) {
                    waiting.swap_remove(i);
                } else if !containerd_holds(&state, &d) {
                    peers.router.withdraw(vec![d.to_string()]).await
                }
            }
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                waiting.clear();
                due = None;
                peers.router.advertise(all(&state)).await
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// [`DEFER_MIN`] plus a random part of [`DEFER_SPREAD`], so that the nodes of a cluster
/// that stored the same blob at the same moment do not announce it at the same moment.
fn defer_delay() -> Duration {
    let r = std::hash::BuildHasher::hash_one(
        &std::collections::hash_map::RandomState::new(),
        Instant::now(),
    );
    DEFER_MIN + DEFER_SPREAD.mul_f64((r % 1000) as f64 / 1000.0)
}

/// The tag keys of the store's tag index whose registry is shared (docs/p2p.md).
pub fn stored_tag_keys(state: &crate::AppState) -> Vec<String> {
    shared_tag_keys(&state.node())
}

fn shared_tag_keys(node: &Node) -> Vec<String> {
    let config = node.config();
    node.store
        .all_tags()
        .into_iter()
        .filter(|(registry, _, _)| kagami_config::plan::is_shared(&config, registry))
        .map(|(registry, repository, tag)| {
            ContentKey::tag(&registry, &repository, &tag).to_string()
        })
        .collect()
}

/// Whether kagami's own store holds what `key` names (a digest, or a tag key): such a key
/// stays advertised when another source of this node (containerd) loses it.
#[cfg(feature = "containerd")]
pub(crate) fn store_holds_key(store: &kagami_store::Store, key: &str) -> bool {
    match key.parse::<ContentKey>() {
        Ok(ContentKey::Tag {
            registry,
            repository,
            tag,
        }) => store.get_tag(&registry, &repository, &tag).is_some(),
        Ok(ContentKey::Digest(d)) => store.blob_size(&d).is_some(),
        Ok(ContentKey::Inflight(_)) | Err(_) => false,
    }
}

/// Whether containerd's shared content holds `d` (always false without the feature).
fn containerd_holds(state: &crate::AppState, d: &Digest) -> bool {
    #[cfg(feature = "containerd")]
    {
        state.containerd().is_some_and(|c| c.holds(d))
    }
    #[cfg(not(feature = "containerd"))]
    {
        let _ = (state, d);
        false
    }
}

/// Withdraws everything this node advertised (at shutdown): the store's blobs and tags,
/// and containerd's shared content, which is not advertised again afterwards.
pub async fn withdraw_all(state: &crate::AppState) {
    let node = state.node();
    #[cfg(feature = "containerd")]
    if let Some(c) = state.containerd() {
        c.withdraw_all(&node).await;
    }
    if let Some(peers) = node.cluster.peers() {
        let mut keys: Vec<String> = node.store.digests().iter().map(|d| d.to_string()).collect();
        keys.extend(shared_tag_keys(&node));
        peers.router.withdraw(keys).await;
    }
}

impl Peers {
    /// What `/p2p/status` answers.
    pub fn status(&self) -> serde_json::Value {
        let counts = self.counts();
        let received = &counts.received;
        let members: Vec<serde_json::Value> = self
            .router
            .members()
            .into_iter()
            .map(|m| {
                serde_json::json!({
                    "id": m.id,
                    "http_addr": m.http_addr.map(|a| a.to_string()),
                    "addrs": m.addrs,
                    "received_bytes": received.get(&m.id).copied().unwrap_or(0),
                })
            })
            .collect();
        serde_json::json!({
            "members": members,
            "lookups": counts.lookups,
            "lookup_hits": counts.lookup_hits,
            "received_bytes_by_peer": received,
        })
    }
}
