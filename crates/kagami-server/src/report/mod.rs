//! The status report: what `/status.json` answers, `/status` renders and `kagami status`
//! reads. Plain serde types with no behaviour beyond small derived values; nothing here
//! knows of HTTP, the services or how the numbers were counted (that is
//! `crate::telemetry`, which builds a [`Report`]).

pub mod format;

use serde::{Deserialize, Serialize};

/// Width of one bucket of the bytes-by-source series, in seconds.
pub const INTERVAL_SECS: u64 = 10;
/// Buckets kept: 30 minutes.
pub const BUCKETS: usize = 180;
/// Requests kept in the recent pulls list.
pub const RECENT: usize = 50;
/// The sources of served bytes, in the order of the series and the chart's stacking.
pub const SOURCES: [&str; 3] = ["local", "peer", "upstream"];

/// Everything the status view shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// When the report was made (Unix seconds).
    pub generated_at: u64,
    /// Requests kagami refused, most recent first: each one a pull that containerd made
    /// around the mirror (see `kagami_server::refusals`).
    #[serde(default)]
    pub refused: Vec<Refusal>,
    pub node: Node,
    pub peers: PeersSummary,
    pub members: Vec<MemberInfo>,
    pub store: StoreInfo,
    pub cache: CacheInfo,
    pub bytes_served: BytesBySource,
    pub series: Series,
    /// Newest first.
    pub recent_pulls: Vec<Pull>,
    pub endpoints: Vec<EndpointHealth>,
    pub inflight_fetches: i64,
    pub stale_tags_served: u64,
    /// The node's containerd content store, when its images are shared with other nodes
    /// (`--containerd-content`).
    #[serde(default)]
    pub containerd: Option<ContainerdInfo>,
    /// The images this node warms (fetches ahead of need), when it has a list.
    #[serde(default)]
    pub warm: Option<WarmReport>,
    /// The images the policy file pins on this node, in its order.
    #[serde(default)]
    pub pinned: Vec<PinnedImage>,
}

/// One image of the policy's `pin` list and how much of it the store holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PinnedImage {
    /// The reference as normalised (`docker.io/library/nginx:1.27`).
    pub image: String,
    /// The manifest it resolves to in the store, when known.
    pub digest: Option<String>,
    /// `held` (the manifest and everything it names; for a multi-platform image, every
    /// platform this node fetched, at least one), `partly held` or `not held`.
    pub held: String,
    /// Bytes of the image's blobs in the store.
    pub held_bytes: u64,
    pub blobs_held: u64,
    /// Blobs the stored manifests name that the store does not hold.
    pub blobs_missing: u64,
}

/// Cluster warming as this node sees it (`kagami_server::service::warm`): what `GET
/// /kagami/warm` answers, the `warm` field of `/status.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct WarmReport {
    /// Copies of each policy image the cluster keeps; `None`: every node holds every image.
    pub copies: Option<u32>,
    /// The nodes the holders are chosen among: the P2P members this node knows, plus itself.
    pub nodes: usize,
    /// When the last pass over the list ended (Unix seconds).
    pub last_pass_at: Option<u64>,
    pub images: Vec<WarmImage>,
}

/// One image of the warm list.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WarmImage {
    /// The reference as listed (normalised).
    pub image: String,
    /// `policy` (the cluster-wide list) or `runtime` (added on this node by `kagami warm`).
    pub listed_by: String,
    /// `queued`, `fetching`, `held`, `failed` or `not_chosen`.
    pub state: String,
    /// The digest the image resolved to (the index for a multi-platform image).
    pub digest: Option<String>,
    /// The platform manifest warmed, for an index.
    pub platform_digest: Option<String>,
    /// Blobs (config and layers) of the image, and how many this node holds.
    pub blobs_total: u64,
    pub blobs_held: u64,
    pub bytes_total: u64,
    pub bytes_held: u64,
    /// Why the last attempt failed (`failed`), kept until an attempt succeeds.
    pub error: Option<String>,
    /// The nodes chosen to hold it (rendezvous hashing), when copies are limited.
    pub chosen: Vec<String>,
    /// Nodes seen holding it: the providers of its manifest (or tag) among the other nodes,
    /// plus this node when it holds it.
    pub copies_seen: u64,
    /// When its state last changed (Unix seconds).
    pub updated_at: u64,
}

/// The node's containerd as a source for other nodes: what `/p2p/status` shows under
/// `containerd`, and a card of the status page.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ContainerdInfo {
    pub socket: String,
    pub namespace: String,
    pub connected: bool,
    /// Images of shared registries found in the last scan.
    pub images: usize,
    pub blobs: usize,
    pub tags: usize,
    pub last_scan_seconds_ago: Option<f64>,
    pub last_error: Option<String>,
    /// What other nodes got from containerd's store.
    pub served_blobs: u64,
    pub served_manifests: u64,
    pub served_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Node {
    pub version: String,
    /// The address `kagami serve` listens on, when it said.
    pub listen: Option<String>,
    /// The address this page was asked for (the request's Host header).
    pub address: Option<String>,
    pub started_at: u64,
    pub uptime_seconds: u64,
    /// This node's P2P identity, when sharing between nodes is on.
    pub peer_id: Option<String>,
    pub p2p_addrs: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeersSummary {
    pub enabled: bool,
    pub lookups: u64,
    pub lookup_hits: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberInfo {
    pub id: String,
    pub http_addr: Option<String>,
    pub addrs: Vec<String>,
    pub received_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoreInfo {
    pub bytes: u64,
    pub blobs: u64,
    pub evictions: u64,
    /// Blob writes in progress.
    pub writing: u64,
    /// `--max-store-size`, when set.
    pub max_bytes: Option<u64>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct HitMiss {
    pub hits: u64,
    pub misses: u64,
}

impl HitMiss {
    /// Hits over lookups, `None` before the first lookup.
    pub fn ratio(&self) -> Option<f64> {
        let total = self.hits + self.misses;
        (total > 0).then(|| self.hits as f64 / total as f64)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CacheInfo {
    pub hits: u64,
    pub misses: u64,
    /// Hits over lookups (blobs and manifests), null before the first lookup.
    pub hit_ratio: Option<f64>,
    pub blob: HitMiss,
    pub manifest: HitMiss,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct BytesBySource {
    pub local: u64,
    pub peer: u64,
    pub upstream: u64,
}

impl BytesBySource {
    pub fn total(&self) -> u64 {
        self.local + self.peer + self.upstream
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Series {
    pub interval_seconds: u64,
    /// Oldest first, one per interval, the last one the current (partial) interval.
    pub samples: Vec<Sample>,
}

/// Bytes served during one interval starting at `at` (Unix seconds).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Sample {
    pub at: u64,
    pub local: u64,
    pub peer: u64,
    pub upstream: u64,
}

impl Sample {
    pub fn total(&self) -> u64 {
        self.local + self.peer + self.upstream
    }
}

/// One finished manifest or blob request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pull {
    /// When it ended (Unix milliseconds).
    pub at: u64,
    pub method: String,
    /// `manifest` or `blob`.
    pub kind: String,
    pub registry: String,
    pub repository: String,
    /// The tag or digest asked for.
    pub reference: String,
    /// The digest served, when known.
    pub digest: Option<String>,
    /// `local`, `peer`, `upstream` or `none`.
    pub source: String,
    pub bytes: u64,
    pub duration_ms: f64,
    pub status: u16,
    /// False when the client went away or the body was cut.
    pub complete: bool,
}

/// How one upstream endpoint has been doing.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EndpointHealth {
    pub endpoint: String,
    /// Fetches it answered (blob bodies and manifests).
    pub fetches: u64,
    /// Fetches that failed with it as the first endpoint of the plan, and cut transfers.
    pub failures: u64,
    /// Unix milliseconds.
    pub last_ok_at: Option<u64>,
    pub last_error: Option<String>,
    /// Unix milliseconds.
    pub last_error_at: Option<u64>,
    /// What the walks do with it: `healthy` (tried), `backing_off` (skipped after a rate
    /// limit), `open` (skipped after failures in a row), `half_open` (one probe let
    /// through). See docs/serve.md, "Rate limits and unhealthy endpoints".
    #[serde(default = "healthy")]
    pub state: String,
    /// Until when it is skipped (backing off or open), Unix milliseconds.
    #[serde(default)]
    pub until: Option<u64>,
    /// Tries that failed in a row (network errors, timeouts, 5xx).
    #[serde(default)]
    pub consecutive_failures: u32,
    /// The last failure or rate limit of the endpoint itself, in kagami's words.
    #[serde(default)]
    pub last_failure: Option<String>,
    /// Rate limits it answered (429, or 503 with `Retry-After`).
    #[serde(default)]
    pub rate_limited: u64,
    /// Times its circuit opened.
    #[serde(default)]
    pub circuit_opens: u64,
}

fn healthy() -> String {
    "healthy".into()
}

impl EndpointHealth {
    /// Healthy when the walks try it and it has not failed since it last answered.
    pub fn healthy(&self) -> bool {
        if !self.state.is_empty() && self.state != "healthy" {
            return false;
        }
        match (self.last_ok_at, self.last_error_at) {
            (_, None) => true,
            (Some(ok), Some(err)) => ok > err,
            (None, Some(_)) => false,
        }
    }
}

/// One (registry, reason) row of refused requests, first on `/status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Refusal {
    pub registry: String,
    pub reason: String,
    pub count: u64,
    /// Unix milliseconds of the last one.
    pub last_at: u64,
    pub last_status: u16,
    /// The last refused request (method and path with query).
    pub last_request: String,
    pub last_message: String,
}
