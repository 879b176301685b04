//! Sharing the images of the node's containerd (cargo feature `containerd`): images that
//! containerd holds but kagami's store does not — typically imported from air-gap tarballs
//! with `ctr images import` or by K3s from its `agent/images` directory — are advertised to
//! the other nodes and served to them through the peer API, read live from containerd's
//! content store over its gRPC API (docs/p2p.md, "containerd's content store").
//!
//! What is shared is exactly the *scanned set*: for every image of the namespace whose
//! name's registry is shared (`plan::is_shared`), its target and, walking index →
//! manifests → config and layers, every descriptor that containerd's content store
//! actually holds, plus the image's tag. Nothing else of containerd's is ever served.
//! The set is rebuilt on containerd's image and content events (debounced), after a
//! configuration reload, and every [`RESCAN_EVERY`]; what is new is advertised, what
//! disappeared is withdrawn.
//!
//! Invariants: blobs stream from containerd in its chunks, never whole in memory
//! (manifests, at most 4 MiB, are read whole and verified before they are served); the
//! node's own clients are never served from here (the local containerd already has the
//! content); nothing is copied into kagami's store.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime};

use futures_util::{FutureExt, StreamExt};
use kagami_config::{Digest, Reference};
use kagami_containerd::Containerd;

use crate::app::AppState;
use crate::origin::Source;
use crate::peers::Node;
use crate::report::ContainerdInfo;
use crate::service::reply::{BlobReply, ManifestReply, Span};
use kagami_config::oci::{
    Hasher, MAX_MANIFEST_SIZE as MAX_MANIFEST, ManifestView, OCI_INDEX, OCI_MANIFEST,
};
use kagami_config::reference::Algorithm;

/// A full rescan this often, whatever the events say.
pub const RESCAN_EVERY: Duration = Duration::from_secs(60);
/// Events are gathered for this long before one rescan.
pub const DEBOUNCE: Duration = Duration::from_secs(1);
/// Longest wait between two attempts to reach containerd.
const MAX_RETRY: Duration = Duration::from_secs(30);
/// Deepest index nesting followed (index → index → manifest).
const MAX_DEPTH: usize = 3;

/// What one scan found: the content this node shares from containerd.
#[derive(Debug, Default, Clone)]
pub struct Scan {
    /// Every shared digest (manifests and indexes included) with its size in containerd.
    pub blobs: HashMap<Digest, u64>,
    /// The media type of every shared manifest and index.
    pub manifests: HashMap<Digest, String>,
    /// (registry, repository, tag) → the digest the image name points to.
    pub tags: HashMap<(String, String, String), Digest>,
    /// Images whose content is shared.
    pub images: usize,
}

impl Scan {
    /// The keys other nodes look up: every digest and every tag key.
    pub fn keys(&self) -> HashSet<String> {
        self.blobs
            .keys()
            .map(|d| d.to_string())
            .chain(
                self.tags
                    .keys()
                    .map(|(r, repo, t)| crate::peers::tag_key(r, repo, t)),
            )
            .collect()
    }
}

/// What a manifest or index names, remembered across scans (content is immutable).
#[derive(Debug, Clone)]
struct Parsed {
    /// The `mediaType` field, when the JSON has one.
    media_type: Option<String>,
    /// Child manifests (digest, media type) of an index.
    manifests: Vec<(Digest, String)>,
    /// Config and layers of a manifest.
    blobs: Vec<Digest>,
}

/// The node's containerd as a source of shared content. Created at start, filled by
/// [`run`] once containerd answers.
pub struct ContainerdContent {
    socket: PathBuf,
    namespace: String,
    client: OnceLock<Containerd>,
    scan: RwLock<Arc<Scan>>,
    /// Parsed manifests and indexes, by digest.
    parsed: Mutex<HashMap<Digest, Parsed>>,
    /// The keys advertised now; the lock also orders advertising against [`withdraw_all`].
    advertised: tokio::sync::Mutex<HashSet<String>>,
    closed: AtomicBool,
    connected: AtomicBool,
    /// Since when containerd, reached before, is unreachable (`None`: reachable, or never
    /// reached yet).
    lost_since: Mutex<Option<Instant>>,
    ever_connected: AtomicBool,
    /// How long containerd may stay unreachable, once reached, before `/healthz` fails
    /// (see [`ContainerdContent::set_health_timeout`]).
    health_timeout: OnceLock<Duration>,
    last_scan: Mutex<Option<SystemTime>>,
    last_error: Mutex<Option<String>>,
    served_blobs: AtomicU64,
    served_manifests: AtomicU64,
    served_bytes: Arc<AtomicU64>,
    /// Wakes [`run`] for a rescan (after a configuration reload).
    rescan_now: tokio::sync::Notify,
}

impl ContainerdContent {
    pub fn new(socket: PathBuf, namespace: String) -> ContainerdContent {
        ContainerdContent {
            socket,
            namespace,
            client: OnceLock::new(),
            scan: RwLock::new(Arc::new(Scan::default())),
            parsed: Mutex::new(HashMap::new()),
            advertised: tokio::sync::Mutex::new(HashSet::new()),
            closed: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            lost_since: Mutex::new(None),
            ever_connected: AtomicBool::new(false),
            health_timeout: OnceLock::new(),
            last_scan: Mutex::new(None),
            last_error: Mutex::new(None),
            served_blobs: AtomicU64::new(0),
            served_manifests: AtomicU64::new(0),
            served_bytes: Arc::new(AtomicU64::new(0)),
            rescan_now: tokio::sync::Notify::new(),
        }
    }

    /// Makes `/healthz` fail once containerd, reached before, has been unreachable for
    /// `timeout` (zero: never). A socket mounted into a container as a file keeps pointing
    /// at the old socket when containerd restarts; failing the liveness probe has the
    /// kubelet restart kagami, which mounts the new one (docs/deployment.md).
    pub fn set_health_timeout(&self, timeout: Duration) {
        let _ = self.health_timeout.set(timeout);
    }

    /// Why kagami is not healthy on containerd's account, if it is not.
    pub fn unhealthy(&self) -> Option<String> {
        let timeout = *self.health_timeout.get()?;
        if timeout.is_zero() {
            return None;
        }
        let since = (*self
            .lost_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner))?;
        let lost = since.elapsed();
        (lost >= timeout).then(|| {
            format!(
                "containerd at {} has been unreachable for {} s (it was reached before): if containerd restarted and its socket is mounted as a file, that mount is stale and a restart of kagami mounts the new socket",
                self.socket.display(),
                lost.as_secs()
            )
        })
    }

    fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Relaxed);
        let mut lost = self
            .lost_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if connected {
            self.ever_connected.store(true, Ordering::Relaxed);
            *lost = None;
        } else if self.ever_connected.load(Ordering::Relaxed) && lost.is_none() {
            *lost = Some(Instant::now());
        }
    }

    /// Asks for a rescan soon (the configuration changed: which registries are shared may
    /// have too).
    pub fn request_rescan(&self) {
        self.rescan_now.notify_one();
    }

    /// The current scanned set.
    pub fn scan(&self) -> Arc<Scan> {
        self.scan
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether `d` is in the scanned set (so advertised on containerd's behalf).
    pub fn holds(&self, d: &Digest) -> bool {
        self.scan().blobs.contains_key(d)
    }

    /// Whether a tag is in the scanned set.
    pub fn holds_tag(&self, registry: &str, repository: &str, tag: &str) -> bool {
        self.tag(registry, repository, tag).is_some()
    }

    /// The digest a shared image name points to.
    pub fn tag(&self, registry: &str, repository: &str, tag: &str) -> Option<Digest> {
        self.scan()
            .tags
            .get(&(
                registry.to_string(),
                repository.to_string(),
                tag.to_string(),
            ))
            .cloned()
    }

    /// What `/p2p/status` shows under `containerd` and the status page's card.
    pub fn info(&self) -> ContainerdInfo {
        let scan = self.scan();
        let last_scan = *self
            .last_scan
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        ContainerdInfo {
            socket: self.socket.display().to_string(),
            namespace: self.namespace.clone(),
            connected: self.connected.load(Ordering::Relaxed),
            images: scan.images,
            blobs: scan.blobs.len(),
            tags: scan.tags.len(),
            last_scan_seconds_ago: last_scan
                .and_then(|t| t.elapsed().ok())
                .map(|d| d.as_secs_f64().round()),
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
            served_blobs: self.served_blobs.load(Ordering::Relaxed),
            served_manifests: self.served_manifests.load(Ordering::Relaxed),
            served_bytes: self.served_bytes.load(Ordering::Relaxed),
        }
    }

    /// [`ContainerdContent::info`] as JSON.
    pub fn status(&self) -> serde_json::Value {
        serde_json::to_value(self.info()).unwrap_or_default()
    }

    fn set_error(&self, e: Option<String>) {
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = e;
    }

    /// Rebuilds the scanned set from containerd and advertises the difference. Fails (and
    /// keeps the previous set) when containerd cannot be read.
    pub(crate) async fn rescan(&self, node: &Node) -> Result<Arc<Scan>, kagami_containerd::Error> {
        let Some(client) = self.client.get() else {
            return Ok(self.scan());
        };
        let started = Instant::now();
        let scan = Arc::new(self.build(node, client).await?);
        *self.scan.write().unwrap_or_else(PoisonError::into_inner) = scan.clone();
        *self
            .last_scan
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(SystemTime::now());
        self.set_error(None);
        self.advertise(node, &scan).await;
        tracing::debug!(
            images = scan.images,
            blobs = scan.blobs.len(),
            tags = scan.tags.len(),
            took_ms = started.elapsed().as_millis() as u64,
            "containerd content scanned"
        );
        Ok(scan)
    }

    async fn build(
        &self,
        node: &Node,
        client: &Containerd,
    ) -> Result<Scan, kagami_containerd::Error> {
        let config = node.config();
        let present: HashMap<Digest, u64> = client
            .list_content()
            .await?
            .into_iter()
            .filter_map(|(d, size)| Some((d.parse().ok()?, size)))
            .collect();
        let mut scan = Scan::default();
        let mut seen: HashSet<Digest> = HashSet::new();
        for image in client.images().await? {
            // The CRI plugin also names images by their config digest (`sha256:...`):
            // not a reference.
            if image.name.starts_with("sha256:") {
                continue;
            }
            let Ok(reference) = Reference::parse(&image.name) else {
                continue;
            };
            if !kagami_config::plan::is_shared(&config, &reference.registry) {
                continue;
            }
            let Ok(target) = image.target.digest.parse::<Digest>() else {
                continue;
            };
            if !present.contains_key(&target) {
                continue;
            }
            self.walk(
                client,
                &present,
                &mut scan,
                &mut seen,
                &target,
                &image.target.media_type,
                0,
            )
            .await;
            if let (Some(tag), None) = (&reference.tag, &reference.digest) {
                scan.tags.insert(
                    (reference.registry, reference.repository, tag.clone()),
                    target,
                );
            }
            scan.images += 1;
        }
        // Forget parsed manifests that no image names any more.
        self.parsed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|d, _| scan.manifests.contains_key(d));
        Ok(scan)
    }

    /// Adds a manifest or index (present in containerd) and what it names that containerd
    /// holds. A manifest that cannot be read or parsed is shared alone.
    #[allow(clippy::too_many_arguments)]
    fn walk<'a>(
        &'a self,
        client: &'a Containerd,
        present: &'a HashMap<Digest, u64>,
        scan: &'a mut Scan,
        seen: &'a mut HashSet<Digest>,
        digest: &'a Digest,
        descriptor_media_type: &'a str,
        depth: usize,
    ) -> futures_util::future::BoxFuture<'a, ()> {
        async move {
            let Some(&size) = present.get(digest) else {
                return;
            };
            if !seen.insert(digest.clone()) {
                return;
            }
            scan.blobs.insert(digest.clone(), size);
            let parsed = self.parsed(client, digest, size).await;
            let media_type = if !descriptor_media_type.is_empty() {
                descriptor_media_type.to_string()
            } else if let Some(mt) = parsed.as_ref().and_then(|p| p.media_type.clone()) {
                mt
            } else if parsed.as_ref().is_some_and(|p| !p.manifests.is_empty()) {
                OCI_INDEX.to_string()
            } else {
                OCI_MANIFEST.to_string()
            };
            scan.manifests.insert(digest.clone(), media_type);
            let Some(parsed) = parsed else {
                return;
            };
            for d in &parsed.blobs {
                if let Some(&size) = present.get(d) {
                    scan.blobs.insert(d.clone(), size);
                }
            }
            if depth < MAX_DEPTH {
                for (child, mt) in &parsed.manifests {
                    self.walk(client, present, scan, seen, child, mt, depth + 1)
                        .await;
                }
            }
        }
        .boxed()
    }

    /// A manifest or index parsed, from the cache or read from containerd.
    async fn parsed(&self, client: &Containerd, digest: &Digest, size: u64) -> Option<Parsed> {
        if let Some(p) = self
            .parsed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(digest)
        {
            return Some(p.clone());
        }
        if size > MAX_MANIFEST {
            return None;
        }
        let bytes = match client.read_small(&digest.to_string(), MAX_MANIFEST).await {
            Ok(Some(b)) => b,
            Ok(None) => return None,
            Err(e) => {
                tracing::debug!(%digest, error = %e, "cannot read a manifest from containerd");
                return None;
            }
        };
        let parsed = parse_manifest(&bytes);
        if let Some(p) = &parsed {
            self.parsed
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(digest.clone(), p.clone());
        }
        parsed
    }

    /// Advertises what is new in `scan` and withdraws what disappeared — except keys that
    /// kagami's own store still holds, which stay advertised on the store's behalf.
    async fn advertise(&self, node: &Node, scan: &Scan) {
        let Some(peers) = node.cluster.peers() else {
            return;
        };
        let mut advertised = self.advertised.lock().await;
        if self.closed.load(Ordering::SeqCst) {
            return;
        }
        let now = scan.keys();
        let added: Vec<String> = now.difference(&advertised).cloned().collect();
        let gone: Vec<String> = advertised
            .difference(&now)
            .filter(|k| !crate::peers::store_holds_key(&node.store, k))
            .cloned()
            .collect();
        if !added.is_empty() {
            tracing::info!(
                keys = added.len(),
                "advertising content of containerd's images"
            );
            peers.router.advertise(added).await;
        }
        if !gone.is_empty() {
            tracing::info!(
                keys = gone.len(),
                "withdrawing content gone from containerd"
            );
            peers.router.withdraw(gone).await;
        }
        *advertised = now;
    }

    /// Withdraws every key advertised on containerd's behalf (except what the store holds)
    /// and stops advertising (at shutdown).
    pub(crate) async fn withdraw_all(&self, node: &Node) {
        let mut advertised = self.advertised.lock().await;
        self.closed.store(true, Ordering::SeqCst);
        let keys: Vec<String> = advertised
            .drain()
            .filter(|k| !crate::peers::store_holds_key(&node.store, k))
            .collect();
        if let Some(peers) = node.cluster.peers()
            && !keys.is_empty()
        {
            peers.router.withdraw(keys).await;
        }
    }

    /// Serves a blob of the scanned set to a peer, with `Range`; `None` when it is not in
    /// the set or containerd no longer has it.
    pub(crate) async fn serve_blob(
        &self,
        digest: &Digest,
        range_header: Option<&str>,
        head: bool,
    ) -> Option<BlobReply> {
        let size = *self.scan().blobs.get(digest)?;
        let client = self.client.get()?;
        let Some(span) = Span::of(range_header, size) else {
            return Some(BlobReply::Unsatisfiable { size });
        };
        let (start, len) = span.window();
        let body = if head {
            None
        } else {
            let stream = match client.read(&digest.to_string(), start, len).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(%digest, error = %e, "containerd cannot serve a shared blob");
                    return None;
                }
            };
            self.served_blobs.fetch_add(1, Ordering::Relaxed);
            let counter = self.served_bytes.clone();
            Some(
                stream
                    .inspect(move |c| {
                        if let Ok(c) = c {
                            counter.fetch_add(c.len() as u64, Ordering::Relaxed);
                        }
                    })
                    .boxed(),
            )
        };
        Some(BlobReply::Bytes {
            digest: digest.clone(),
            span,
            body,
            source: Source::Local,
        })
    }

    /// Serves a manifest or index of the scanned set to a peer, with its media type;
    /// `None` when it is not in the set, containerd no longer has it, or its bytes do not
    /// match its digest.
    pub(crate) async fn serve_manifest(
        &self,
        digest: &Digest,
        head: bool,
    ) -> Option<ManifestReply> {
        let scan = self.scan();
        let media_type = scan.manifests.get(digest)?.clone();
        let size = *scan.blobs.get(digest)?;
        drop(scan);
        let body = if head {
            None
        } else {
            let client = self.client.get()?;
            let bytes = match client.read_small(&digest.to_string(), MAX_MANIFEST).await {
                Ok(Some(b)) => b,
                Ok(None) => return None,
                Err(e) => {
                    tracing::debug!(%digest, error = %e, "containerd cannot serve a shared manifest");
                    return None;
                }
            };
            if !matches_digest(digest, &bytes) {
                tracing::warn!(%digest, "containerd returned a manifest that does not match its digest; not served");
                return None;
            }
            self.served_manifests.fetch_add(1, Ordering::Relaxed);
            Some(bytes)
        };
        Some(ManifestReply {
            digest: digest.clone(),
            media_type,
            len: size,
            body,
            source: Source::Local,
        })
    }
}

/// True when `bytes` hash to `d` (sha256; other algorithms are left to the fetching node,
/// which verifies everything anyway).
fn matches_digest(d: &Digest, bytes: &[u8]) -> bool {
    d.algorithm() != Algorithm::Sha256 || Hasher::digest(Algorithm::Sha256, bytes) == *d
}

/// What a manifest or index JSON names; `None` when it is not JSON.
fn parse_manifest(bytes: &[u8]) -> Option<Parsed> {
    let v = ManifestView::parse(bytes).ok()?;
    Some(Parsed {
        manifests: v
            .manifests
            .iter()
            .map(|d| (d.digest.clone(), d.media_type.clone()))
            .collect(),
        blobs: v.blobs().map(|d| d.digest.clone()).collect(),
        media_type: v.media_type,
    })
}

/// Starts sharing containerd's content: sets it on `state` and spawns [`run`].
pub fn start(
    state: &AppState,
    socket: PathBuf,
    namespace: String,
) -> (Arc<ContainerdContent>, tokio::task::JoinHandle<()>) {
    let content = Arc::new(ContainerdContent::new(socket, namespace));
    state.set_containerd(content.clone());
    let task = tokio::spawn(run(state.node(), content.clone()));
    (content, task)
}

/// Connects to containerd (retrying in the background while it is unreachable), then
/// rescans on its events and every [`RESCAN_EVERY`] until [`ContainerdContent::withdraw_all`].
pub(crate) async fn run(node: Node, content: Arc<ContainerdContent>) {
    let mut retry = Duration::from_secs(1);
    let mut warned = false;
    while !content.closed.load(Ordering::SeqCst) {
        let client = match content.client.get() {
            Some(c) => c.clone(),
            None => match Containerd::connect(&content.socket, &content.namespace).await {
                Ok(c) => {
                    tracing::info!(socket = %content.socket.display(), namespace = %content.namespace, "connected to containerd: sharing its images of shared registries");
                    content.client.get_or_init(|| c).clone()
                }
                Err(e) => {
                    let e = e.to_string();
                    if !warned {
                        tracing::warn!(error = %e, "containerd is unreachable; retrying in the background");
                        warned = true;
                    }
                    content.set_error(Some(e));
                    tokio::time::sleep(retry).await;
                    retry = (retry * 2).min(MAX_RETRY);
                    continue;
                }
            },
        };
        // Connected before the scan publishes what it found: the status never shows
        // containerd's images with `connected: false`.
        content.set_connected(true);
        // Subscribe before scanning so that a change during the scan triggers another.
        let mut events = client.subscribe();
        match content.rescan(&node).await {
            Ok(_) => {
                retry = Duration::from_secs(1);
                warned = false;
            }
            Err(e) => {
                content.set_connected(false);
                if !warned {
                    tracing::warn!(error = %e, "cannot read containerd's images; retrying in the background");
                    warned = true;
                }
                content.set_error(Some(e.to_string()));
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(MAX_RETRY);
                continue;
            }
        }
        let mut tick =
            tokio::time::interval_at(tokio::time::Instant::now() + RESCAN_EVERY, RESCAN_EVERY);
        loop {
            if content.closed.load(Ordering::SeqCst) {
                return;
            }
            tokio::select! {
                ev = events.next() => match ev {
                    Some(Ok(_)) => {
                        tokio::time::sleep(DEBOUNCE).await;
                        // Whatever else arrived meanwhile is covered by this rescan.
                        while let Some(Some(Ok(_))) = events.next().now_or_never() {}
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "lost containerd's events; reconnecting");
                        break;
                    }
                    None => break,
                },
                _ = tick.tick() => {}
                _ = content.rescan_now.notified() => {}
            }
            if let Err(e) = content.rescan(&node).await {
                tracing::warn!(error = %e, "cannot rescan containerd's images; keeping what was found before");
                content.set_error(Some(e.to_string()));
            }
        }
        content.set_connected(false);
        tokio::time::sleep(retry).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
    const C: &str = "sha256:cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc";

    #[test]
    fn manifests_and_indexes_are_parsed() {
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{{"digest":"{A}"}},"layers":[{{"digest":"{B}"}},{{"digest":"not a digest"}}]}}"#
        );
        let p = parse_manifest(m.as_bytes()).unwrap();
        assert_eq!(
            p.media_type.as_deref(),
            Some("application/vnd.docker.distribution.manifest.v2+json")
        );
        assert_eq!(p.blobs, vec![A.parse().unwrap(), B.parse().unwrap()]);
        assert!(p.manifests.is_empty());

        let i = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{C}"}}]}}"#
        );
        let p = parse_manifest(i.as_bytes()).unwrap();
        assert_eq!(p.media_type, None);
        assert_eq!(
            p.manifests,
            vec![(C.parse().unwrap(), OCI_MANIFEST.to_string())]
        );
        assert!(parse_manifest(b"\x1f\x8b not json").is_none());
    }

    #[test]
    fn keys_are_digests_and_tag_keys() {
        let mut s = Scan::default();
        s.blobs.insert(A.parse().unwrap(), 3);
        s.tags.insert(
            ("r.example".into(), "team/app".into(), "1.0".into()),
            A.parse().unwrap(),
        );
        let keys = s.keys();
        assert_eq!(keys.len(), 2);
        assert!(keys.contains(A));
        assert!(keys.contains("tag:r.example/team/app:1.0"));
    }

    #[test]
    fn digests_are_checked() {
        let d = Hasher::digest(Algorithm::Sha256, b"x");
        assert!(matches_digest(&d, b"x"));
        assert!(!matches_digest(&d, b"y"));
    }
}
