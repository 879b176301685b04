//! Cluster warming (docs/warm.md): a list of images the cluster fetches ahead of need.
//!
//! The list has two parts: the policy's (cluster-wide, given by `kagami serve` through
//! [`Warmer::set_list`], with `copies`) and the runtime one (added on this node through the
//! admin route `POST /kagami/warm`, [`Warmer::add`]; in memory only). For a policy image,
//! each node decides alone whether it is one of its holders: with `copies = K` and P2P on,
//! the `K` nodes ranked highest by rendezvous hashing of (node id, image) among the
//! cluster's members and itself ([`chosen`]); otherwise every node. A runtime image is
//! always warmed on the node that was asked.
//!
//! A chosen node pulls the image through its own services, the path a pull by containerd
//! takes (`Manifests::get`, then `Blobs::get` for each blob: store, else other nodes, else
//! the endpoints, verified and stored, and advertised to the cluster by the store's
//! events), so the cluster fetches each blob from upstream once and the other holders
//! stream it from a peer. Of an index, only the manifest of this node's platform and its
//! blobs are warmed (what this node's containerd would pull). Nothing held is fetched
//! again: a pass first checks the store without any network request.
//!
//! A pass runs every [`PASS_EVERY`], when the members change, and at once when the list
//! changes; passes never overlap, and blobs are fetched one at a time (a warm takes one
//! slot of the fetch budget the clients share).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures_util::StreamExt;
use kagami_config::oci::{ManifestView, Platform, is_index};
use kagami_config::{Config, Digest, PlanOptions, Reference};
use kagami_store::Store;
use sha2::{Digest as _, Sha256};
use tokio::sync::Notify;

use crate::origin::Source;
use crate::path::{ManifestRef, OciPath, Target};
use crate::peers::{Cluster, ContentKey};
use crate::report::{WarmImage, WarmReport};
use crate::service::blobs::Blobs;
use crate::service::error::ApiError;
use crate::service::manifests::Manifests;
use crate::service::reply::BlobReply;
use crate::service::{Deps, RequestContext};
use crate::telemetry::Telemetry;
use crate::telemetry::metrics::{SourceLabels, StateLabels};

/// How often the whole list is checked (and warmed where needed) without any change.
pub const PASS_EVERY: Duration = Duration::from_secs(30);
/// How often the members are compared with the last pass's (a change starts a pass).
const MEMBERS_POLL: Duration = Duration::from_secs(1);
/// How often the copies seen in the cluster are looked up again between passes.
pub const COPIES_EVERY: Duration = Duration::from_secs(10);
/// Lookups of copies in flight at once.
const COPIES_LOOKUPS: usize = 8;
/// A tag held locally is resolved again through the service (a pull's revalidation) at
/// most this often; in between, a held tag costs no network request.
pub const RESOLVE_EVERY: Duration = Duration::from_secs(600);
/// The most images a list may hold (policy and runtime each).
pub const MAX_IMAGES: usize = 1000;
/// Holders seen are looked up among this many providers at most.
const MAX_PROVIDERS: usize = 64;

/// The states of a listed image, as `/status.json` and `kagami_warm_images{state}` name them.
pub const STATES: [&str; 5] = ["queued", "fetching", "held", "failed", "not_chosen"];

/// Who listed an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ListedBy {
    Policy,
    Runtime,
}

impl ListedBy {
    fn as_str(self) -> &'static str {
        match self {
            ListedBy::Policy => "policy",
            ListedBy::Runtime => "runtime",
        }
    }
}

/// What the warmer knows of one image between passes.
struct Entry {
    reference: Reference,
    listed_by: ListedBy,
    /// In the runtime list (too, for an image of both lists): warmed on this node whatever
    /// the ranking says.
    runtime: bool,
    status: WarmImage,
    /// When the image was last resolved through the service (tags: see [`RESOLVE_EVERY`]).
    resolved_at: Option<Instant>,
    /// Go through the service at the next pass even when held (`POST /kagami/warm`).
    force: bool,
    /// Failed pulls in a row, and when the next may start ([`retry_after`]): a failing
    /// image is not asked for upstream at every pass.
    failures: u32,
    retry_at: Option<Instant>,
}

#[derive(Default)]
struct List {
    policy: Vec<Reference>,
    copies: Option<u32>,
    runtime: Vec<Reference>,
    entries: BTreeMap<String, Entry>,
    last_pass_at: Option<u64>,
    nodes: usize,
}

/// The node's warm list and its progress (see the module's documentation).
pub struct Warmer {
    store: Store,
    telemetry: Arc<Telemetry>,
    cluster: Cluster,
    manifests: Arc<Manifests>,
    blobs: Arc<Blobs>,
    config: Arc<RwLock<Arc<Config>>>,
    plan_options: PlanOptions,
    list: Mutex<List>,
    wake: Arc<Notify>,
    started: AtomicBool,
    /// The platform whose manifest is warmed from an index.
    platform: Platform,
}

impl Warmer {
    pub(crate) fn new(
        deps: &Deps,
        manifests: Arc<Manifests>,
        blobs: Arc<Blobs>,
        config: Arc<RwLock<Arc<Config>>>,
        plan_options: PlanOptions,
    ) -> Arc<Warmer> {
        Arc::new(Warmer {
            store: deps.store.clone(),
            telemetry: deps.telemetry.clone(),
            cluster: deps.cluster.clone(),
            manifests,
            blobs,
            config,
            plan_options,
            list: Mutex::new(List::default()),
            wake: Arc::new(Notify::new()),
            started: AtomicBool::new(false),
            platform: Platform::host(),
        })
    }

    fn list(&self) -> std::sync::MutexGuard<'_, List> {
        self.list.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Replaces the policy's list (at start and on every reload): `copies` copies of each
    /// image in the cluster, `None` for every node. Images no longer listed are forgotten
    /// (their content stays in the store, like any other). Starts the warming task on the
    /// first call with a runtime at hand; must be called from within a tokio runtime.
    pub fn set_list(self: &Arc<Self>, images: Vec<Reference>, copies: Option<u32>) {
        {
            let mut l = self.list();
            l.policy = dedup(images);
            l.policy.truncate(MAX_IMAGES);
            l.copies = copies.map(|c| c.max(1));
            sync_entries(&mut l);
        }
        self.publish_gauges();
        self.start();
        self.wake.notify_one();
    }

    /// Adds images to this node's runtime list and warms them now (through the service
    /// even when held, so a tag is resolved again). In memory only: the runtime list is
    /// lost at restart (the content fetched stays). Too many images is an error.
    pub fn add(self: &Arc<Self>, images: Vec<Reference>) -> Result<(), String> {
        {
            let mut l = self.list();
            let mut runtime = l.runtime.clone();
            runtime.extend(images.iter().cloned());
            let runtime = dedup(runtime);
            if runtime.len() > MAX_IMAGES {
                return Err(format!(
                    "the runtime warm list would hold {} images; at most {MAX_IMAGES}",
                    runtime.len()
                ));
            }
            l.runtime = runtime;
            sync_entries(&mut l);
            for r in &images {
                if let Some(e) = l.entries.get_mut(&r.to_string()) {
                    e.force = true;
                    if e.status.state != "fetching" {
                        e.status.state = "queued".into();
                        e.status.updated_at = now_secs();
                    }
                }
            }
        }
        self.publish_gauges();
        self.start();
        self.wake.notify_one();
        Ok(())
    }

    /// The list and its progress; `None` when the list is empty.
    pub fn report(&self) -> Option<WarmReport> {
        let l = self.list();
        if l.entries.is_empty() {
            return None;
        }
        Some(WarmReport {
            copies: l.copies,
            nodes: l.nodes,
            last_pass_at: l.last_pass_at,
            images: l.entries.values().map(|e| e.status.clone()).collect(),
        })
    }

    /// Starts the warming task once. It holds the warmer weakly and ends with it.
    fn start(self: &Arc<Self>) {
        if self.started.swap(true, Ordering::SeqCst) {
            return;
        }
        let weak = Arc::downgrade(self);
        let wake = self.wake.clone();
        tokio::spawn(run(weak, wake));
    }

    fn publish_gauges(&self) {
        let mut counts: HashMap<&str, i64> = STATES.iter().map(|s| (*s, 0)).collect();
        for e in self.list().entries.values() {
            if let Some(c) = counts.get_mut(e.status.state.as_str()) {
                *c += 1;
            }
        }
        for state in STATES {
            self.telemetry
                .metrics
                .warm_images
                .get_or_create(&StateLabels { state })
                .set(counts[state]);
        }
    }

    /// The ids of the other members and this node's own, when P2P is on.
    fn nodes(&self) -> Option<(String, BTreeSet<String>)> {
        let peers = self.cluster.peers()?;
        let me = self.cluster.me()?.to_string();
        let mut ids: BTreeSet<String> = peers.router.members().into_iter().map(|m| m.id).collect();
        ids.insert(me.clone());
        Some((me, ids))
    }

    fn update(&self, key: &str, f: impl FnOnce(&mut Entry)) {
        let mut l = self.list();
        if let Some(e) = l.entries.get_mut(key) {
            let before = e.status.state.clone();
            f(e);
            if e.status.state != before {
                e.status.updated_at = now_secs();
            }
        }
    }

    /// One pass over the list.
    async fn pass(&self) {
        let (work, copies) = {
            let l = self.list();
            let work: Vec<(String, Reference, ListedBy, bool, bool, Option<Instant>)> = l
                .entries
                .iter()
                // A failed image waits for its retry time, unless asked for again.
                .filter(|(_, e)| e.force || e.retry_at.is_none_or(|t| Instant::now() >= t))
                .map(|(k, e)| {
                    (
                        k.clone(),
                        e.reference.clone(),
                        e.listed_by,
                        e.runtime,
                        e.force,
                        e.resolved_at,
                    )
                })
                .collect();
            (work, l.copies)
        };
        let nodes = self.nodes();
        self.list().nodes = nodes.as_ref().map_or(1, |(_, ids)| ids.len());
        // Before the node has joined the P2P network it knows no member and would rank
        // itself first for every image: limited copies wait for the join.
        let joined = match self.cluster.peers() {
            Some(p) => p.router.ready().await,
            None => true,
        };
        for (key, reference, listed_by, runtime, force, resolved_at) in work {
            let holders = match (&nodes, copies) {
                (Some((_, ids)), Some(k)) if listed_by == ListedBy::Policy => {
                    Some(chosen(ids, &reference.to_string(), k as usize))
                }
                _ => None,
            };
            let here = runtime
                || match (&holders, &nodes) {
                    (Some(h), Some((me, _))) => h.contains(me),
                    _ => true,
                };
            if !runtime && holders.is_some() && !joined {
                self.update(&key, |e| {
                    e.status.state = "queued".into();
                    e.status.error = Some("waiting to join the P2P network".into());
                });
                continue;
            }
            self.update(&key, |e| {
                e.status.chosen = holders.clone().unwrap_or_default();
            });
            if here {
                let resolve = force
                    || resolved_at.is_none_or(|t| t.elapsed() >= RESOLVE_EVERY)
                        && reference.digest.is_none();
                self.warm(&key, &reference, resolve).await;
            } else {
                self.update(&key, |e| {
                    e.status.state = "not_chosen".into();
                    e.status.error = None;
                    e.force = false;
                });
            }
            let seen = self.copies_seen(&key, &reference).await;
            self.update(&key, |e| e.status.copies_seen = seen);
            self.publish_gauges();
        }
        self.list().last_pass_at = Some(now_secs());
    }

    /// Looks up the copies seen of every image again (no fetch).
    async fn refresh_copies(&self) {
        if self.cluster.peers().is_none() {
            return;
        }
        let work: Vec<(String, Reference)> = self
            .list()
            .entries
            .iter()
            .map(|(k, e)| (k.clone(), e.reference.clone()))
            .collect();
        futures_util::stream::iter(work)
            .for_each_concurrent(COPIES_LOOKUPS, |(key, reference)| async move {
                let seen = self.copies_seen(&key, &reference).await;
                self.update(&key, |e| e.status.copies_seen = seen);
            })
            .await;
    }

    /// Nodes holding the image as far as the P2P network says: the providers of its
    /// manifest digest (not knowing it, the digest a node that resolved the tag answers;
    /// with none, the providers of its tag), plus this node when it holds it.
    async fn copies_seen(&self, key: &str, reference: &Reference) -> u64 {
        let (held, digest) = {
            let l = self.list();
            match l.entries.get(key) {
                Some(e) => (
                    e.status.state == "held",
                    e.status
                        .digest
                        .as_deref()
                        .and_then(|d| d.parse::<Digest>().ok()),
                ),
                None => return 0,
            }
        };
        // A node no longer chosen keeps (and advertises) what it fetched before.
        let held = held
            || digest
                .as_ref()
                .is_some_and(|d| self.store.blob_size(d).is_some());
        let me = u64::from(held);
        let Some(peers) = self.cluster.peers() else {
            return me;
        };
        let tag = reference.tag.as_deref().unwrap_or("latest");
        let digest = match digest.or_else(|| reference.digest.clone()) {
            Some(d) => Some(d),
            // Not knowing the digest, it is asked of a node that resolved the tag: only one
            // node of those pulling a cold tag at once resolves it (docs/p2p.md), so the
            // tag's providers are not the nodes holding the image.
            None => peers
                .manifest(&reference.registry, &reference.repository, tag)
                .await
                .map(|(m, _)| m.digest),
        };
        let key = match digest {
            Some(d) => ContentKey::Digest(d).to_string(),
            None => ContentKey::tag(&reference.registry, &reference.repository, tag).to_string(),
        };
        me + peers.router.lookup(&key, MAX_PROVIDERS).await.len() as u64
    }

    /// Makes this node hold `reference`: a check of the store first (no network), then,
    /// when something is missing or `resolve` says so, a pull through the services.
    async fn warm(&self, key: &str, reference: &Reference, resolve: bool) {
        if !resolve && let Some(held) = self.held_locally(key, reference).await {
            self.update(key, |e| {
                e.status.state = "held".into();
                e.status.error = None;
                set_counts(&mut e.status, &held);
            });
            return;
        }
        self.update(key, |e| {
            e.status.state = "fetching".into();
        });
        let result = self.pull(key, reference).await;
        self.update(key, |e| {
            e.force = false;
            match result {
                Ok(()) => {
                    e.status.state = "held".into();
                    e.status.error = None;
                    e.resolved_at = Some(Instant::now());
                    e.failures = 0;
                    e.retry_at = None;
                }
                Err(why) => {
                    e.failures = e.failures.saturating_add(1);
                    let wait = retry_after(e.failures);
                    e.retry_at = Some(Instant::now() + wait);
                    e.status.state = "failed".into();
                    e.status.error = Some(format!(
                        "{why} (failed {} time{} in a row; next try in {} s, or at once with `kagami warm`)",
                        e.failures,
                        if e.failures == 1 { "" } else { "s" },
                        wait.as_secs()
                    ));
                }
            }
        });
    }

    /// The image's content when this node holds all of it (checked in the store, with no
    /// network request), else `None`.
    async fn held_locally(&self, key: &str, reference: &Reference) -> Option<Held> {
        let digest = match &reference.digest {
            Some(d) => d.clone(),
            None => {
                let known = self
                    .list()
                    .entries
                    .get(key)
                    .and_then(|e| e.status.digest.as_deref()?.parse::<Digest>().ok());
                let tag = reference.tag.as_deref().unwrap_or("latest");
                match known {
                    Some(d) => d,
                    None => {
                        self.store
                            .get_tag(&reference.registry, &reference.repository, tag)?
                            .digest
                    }
                }
            }
        };
        let root = self.manifests.serve_stored(&digest, false).await.ok()??;
        let root_body = root.body?;
        let (platform_digest, image) = if is_index(&root.media_type)
            || ManifestView::parse(&root_body)
                .is_ok_and(|v| !v.manifests.is_empty() && v.config.is_none())
        {
            let child = self.pick(&root_body).ok()?;
            let m = self.manifests.serve_stored(&child, false).await.ok()??;
            (Some(child), m.body?)
        } else {
            (None, root_body)
        };
        let view = ManifestView::checked(&image).ok()?;
        let mut held = Held {
            digest,
            platform_digest,
            blobs_total: 0,
            blobs_held: 0,
            bytes_total: 0,
            bytes_held: 0,
        };
        for d in view.blobs() {
            held.blobs_total += 1;
            held.bytes_total += d.size.unwrap_or(0);
            self.store.blob_size(&d.digest)?;
            held.blobs_held += 1;
            held.bytes_held += d.size.unwrap_or(0);
        }
        Some(held)
    }

    /// The manifest of this node's platform in an index.
    fn pick(&self, index: &[u8]) -> Result<Digest, String> {
        let view = ManifestView::checked(index).map_err(|e| format!("unreadable index: {e}"))?;
        view.manifests
            .iter()
            .find(|d| {
                d.platform
                    .as_ref()
                    .is_some_and(|p| self.platform.matches(p))
            })
            .map(|d| d.digest.clone())
            .ok_or_else(|| {
                let have: Vec<String> = view
                    .manifests
                    .iter()
                    .filter_map(|d| d.platform.as_ref().map(|p| p.to_string()))
                    .collect();
                format!(
                    "the index has no manifest for {} (it has: {})",
                    self.platform,
                    have.join(", ")
                )
            })
    }

    fn context(&self, reference: &Reference, target: Target) -> RequestContext {
        let config = self
            .config
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let path = OciPath {
            registry: reference.registry.clone(),
            repository: reference.repository.clone(),
            target,
            client_name: reference.repository.clone(),
            from_ns: true,
        };
        RequestContext::new(path, config, self.plan_options, None, false)
    }

    /// What a failed manifest request means for the status: a genuine not-found names the
    /// places asked; other errors keep the service's (short) message.
    fn why(&self, ctx: &RequestContext, what: &str, e: ApiError) -> String {
        if e.status == http::StatusCode::NOT_FOUND && e.refusal.is_none() {
            let places: Vec<String> = ctx
                .plan()
                .attempts
                .iter()
                .map(|a| match a {
                    kagami_config::Attempt::Peers => "other nodes".to_string(),
                    kagami_config::Attempt::Endpoint(e) => e.endpoint.base(),
                })
                .collect();
            let places = if places.is_empty() {
                "no source (the plan is empty)".to_string()
            } else {
                places.join(", ")
            };
            format!("{what} not found at {places}")
        } else {
            format!("{what}: {}", e.message)
        }
    }

    /// A manifest through the service (store, else other nodes, else the endpoints).
    async fn manifest(&self, reference: &Reference, r: ManifestRef) -> Result<Bytes, String> {
        let what = match &r {
            ManifestRef::Tag(_) => reference.to_string(),
            ManifestRef::Digest(d) => format!("{}@{d}", reference.name()),
        };
        let ctx = self.context(reference, Target::Manifest(r.clone()));
        let reply = self
            .manifests
            .get(&ctx, &r)
            .await
            .map_err(|e| self.why(&ctx, &what, e))?;
        let body = reply
            .body
            .ok_or_else(|| format!("{what}: the manifest came without a body"))?;
        self.update(&reference.to_string(), |e| {
            if matches!(r, ManifestRef::Tag(_)) || reference.digest.as_ref() == Some(&reply.digest)
            {
                e.status.digest = Some(reply.digest.to_string());
            }
        });
        Ok(body)
    }

    /// Pulls the image through the services, as a client would, blob by blob.
    async fn pull(&self, key: &str, reference: &Reference) -> Result<(), String> {
        let root_ref = match &reference.digest {
            Some(d) => ManifestRef::Digest(d.clone()),
            None => ManifestRef::Tag(reference.tag.clone().unwrap_or_else(|| "latest".into())),
        };
        let root = self.manifest(reference, root_ref).await?;
        let view = ManifestView::parse(&root).map_err(|e| format!("unreadable manifest: {e}"))?;
        let image = if !view.manifests.is_empty() && view.config.is_none() {
            let child = self.pick(&root)?;
            self.update(key, |e| e.status.platform_digest = Some(child.to_string()));
            self.manifest(reference, ManifestRef::Digest(child)).await?
        } else {
            self.update(key, |e| e.status.platform_digest = None);
            root
        };
        let view =
            ManifestView::checked(&image).map_err(|e| format!("unreadable manifest: {e}"))?;
        let blobs: Vec<(Digest, u64)> = view
            .blobs()
            .map(|d| (d.digest.clone(), d.size.unwrap_or(0)))
            .collect();
        self.update(key, |e| {
            e.status.blobs_total = blobs.len() as u64;
            e.status.bytes_total = blobs.iter().map(|(_, s)| s).sum();
            e.status.blobs_held = 0;
            e.status.bytes_held = 0;
        });
        for (digest, size) in blobs {
            if self.store.blob_size(&digest).is_none() {
                self.fetch_blob(key, reference, &digest).await?;
            } else {
                self.update(key, |e| e.status.bytes_held += size);
            }
            self.update(key, |e| e.status.blobs_held += 1);
        }
        Ok(())
    }

    /// One blob through `Blobs::get`, its body read to the end (the fetch behind it writes
    /// the store); the bytes count into the image's progress and the warm metric.
    async fn fetch_blob(
        &self,
        key: &str,
        reference: &Reference,
        digest: &Digest,
    ) -> Result<(), String> {
        let ctx = self.context(reference, Target::Blob(digest.clone()));
        let reply = self
            .blobs
            .get(&ctx, digest)
            .await
            .map_err(|e| format!("blob {digest}: {}", e.message))?;
        let (mut body, source) = match reply {
            BlobReply::Bytes {
                body: Some(body),
                source,
                ..
            } => (body, source),
            _ => return Err(format!("blob {digest}: no body")),
        };
        let counter = (source != Source::Local).then(|| {
            self.telemetry
                .metrics
                .warm_bytes
                .get_or_create(&SourceLabels {
                    source: source.as_str(),
                })
                .clone()
        });
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| format!("blob {digest}: {e}"))?;
            let n = chunk.len() as u64;
            if let Some(c) = &counter {
                c.inc_by(n);
            }
            self.update(key, |e| e.status.bytes_held += n);
        }
        drop(body);
        // The body ends once the store has the blob; a pass-through (store full) does not
        // keep it.
        let stored = async {
            for _ in 0..50 {
                if self.store.blob_size(digest).is_some() {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            false
        };
        if !stored.await {
            return Err(format!(
                "blob {digest}: read but not stored (is the store full?)"
            ));
        }
        Ok(())
    }
}

/// What [`Warmer::held_locally`] found.
struct Held {
    digest: Digest,
    platform_digest: Option<Digest>,
    blobs_total: u64,
    blobs_held: u64,
    bytes_total: u64,
    bytes_held: u64,
}

fn set_counts(s: &mut WarmImage, h: &Held) {
    s.digest = Some(h.digest.to_string());
    s.platform_digest = h.platform_digest.as_ref().map(|d| d.to_string());
    s.blobs_total = h.blobs_total;
    s.blobs_held = h.blobs_held;
    s.bytes_total = h.bytes_total;
    s.bytes_held = h.bytes_held;
}

/// The warming task: a pass at start, then every [`PASS_EVERY`], when the members change
/// and when woken (the list changed); between passes, the copies seen are looked up every
/// [`COPIES_EVERY`]. Ends when the warmer is dropped.
async fn run(weak: Weak<Warmer>, wake: Arc<Notify>) {
    let mut last_members: Option<BTreeSet<String>> = None;
    let mut last_pass: Option<Instant> = None;
    let mut last_copies = Instant::now();
    let mut woken = true;
    loop {
        {
            let Some(w) = weak.upgrade() else { return };
            let members = w.nodes().map(|(_, ids)| ids);
            let due = woken
                || last_pass.is_none_or(|t| t.elapsed() >= PASS_EVERY)
                || members != last_members;
            if due {
                last_members = members;
                w.pass().await;
                last_pass = Some(Instant::now());
                last_copies = Instant::now();
            } else if last_copies.elapsed() >= COPIES_EVERY {
                w.refresh_copies().await;
                last_copies = Instant::now();
            }
        }
        woken = tokio::time::timeout(MEMBERS_POLL, wake.notified())
            .await
            .is_ok();
    }
}

/// The `k` nodes of `ids` that hold `image`: the highest scores of rendezvous hashing
/// (sha256 of the node id and the image), ties broken by id. Every node computes the same
/// set from the same members.
pub fn chosen(ids: &BTreeSet<String>, image: &str, k: usize) -> Vec<String> {
    let mut ranked: Vec<(u64, &String)> = ids.iter().map(|id| (score(id, image), id)).collect();
    ranked.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    ranked
        .into_iter()
        .take(k)
        .map(|(_, id)| id.clone())
        .collect()
}

fn score(node: &str, image: &str) -> u64 {
    let mut h = Sha256::new();
    h.update(node.as_bytes());
    h.update([0]);
    h.update(image.as_bytes());
    let out = h.finalize();
    u64::from_be_bytes(out[..8].try_into().expect("8 bytes"))
}

fn dedup(images: Vec<Reference>) -> Vec<Reference> {
    let mut seen = BTreeSet::new();
    images
        .into_iter()
        .filter(|r| seen.insert(r.to_string()))
        .collect()
}

/// Brings the entries in line with the two lists: new images queued, dropped ones
/// forgotten, an image in both shown as the policy's (and warmed here, as a runtime one).
fn sync_entries(l: &mut List) {
    let runtime: BTreeSet<String> = l.runtime.iter().map(|r| r.to_string()).collect();
    let mut wanted: BTreeMap<String, (Reference, ListedBy)> = BTreeMap::new();
    for r in &l.runtime {
        wanted.insert(r.to_string(), (r.clone(), ListedBy::Runtime));
    }
    for r in &l.policy {
        wanted.insert(r.to_string(), (r.clone(), ListedBy::Policy));
    }
    l.entries.retain(|k, _| wanted.contains_key(k));
    for (k, (reference, listed_by)) in wanted {
        let in_runtime = runtime.contains(&k);
        let e = l.entries.entry(k.clone()).or_insert_with(|| Entry {
            reference: reference.clone(),
            listed_by,
            status: WarmImage {
                image: k,
                listed_by: listed_by.as_str().into(),
                state: "queued".into(),
                digest: None,
                platform_digest: None,
                blobs_total: 0,
                blobs_held: 0,
                bytes_total: 0,
                bytes_held: 0,
                error: None,
                chosen: Vec::new(),
                copies_seen: 0,
                updated_at: now_secs(),
            },
            resolved_at: None,
            force: false,
            failures: 0,
            retry_at: None,
            runtime: in_runtime,
        });
        e.runtime = in_runtime;
        e.listed_by = listed_by;
        e.status.listed_by = listed_by.as_str().into();
    }
}

/// How long a failed image waits before its next pull: a pass's interval after the first
/// failure, doubling with each failure in a row up to [`MAX_RETRY_AFTER`].
pub fn retry_after(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    PASS_EVERY
        .saturating_mul(1 << doublings)
        .min(MAX_RETRY_AFTER)
}

/// The longest a failed image waits for its next pull.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> BTreeSet<String> {
        (0..n).map(|i| format!("node-{i}")).collect()
    }

    #[test]
    fn a_failed_image_waits_longer_after_each_failure_up_to_the_cap() {
        assert_eq!(retry_after(1), PASS_EVERY);
        assert_eq!(retry_after(2), PASS_EVERY * 2);
        assert_eq!(retry_after(3), PASS_EVERY * 4);
        assert_eq!(retry_after(5), PASS_EVERY * 16);
        assert_eq!(retry_after(6), MAX_RETRY_AFTER);
        assert_eq!(retry_after(u32::MAX), MAX_RETRY_AFTER);
    }

    #[test]
    fn rendezvous_picks_k_and_moves_little_when_a_node_leaves() {
        let all = ids(5);
        let mut moved = 0;
        for i in 0..200 {
            let image = format!("r.test/app{i}:1");
            let c = chosen(&all, &image, 2);
            assert_eq!(c.len(), 2);
            assert_eq!(c, chosen(&all, &image, 2), "deterministic");
            // Removing a node that is not a holder changes nothing.
            let outsider = all.iter().find(|id| !c.contains(id)).unwrap();
            let mut fewer = all.clone();
            fewer.remove(outsider);
            assert_eq!(chosen(&fewer, &image, 2), c);
            // Removing a holder keeps the other and adds one.
            let mut fewer = all.clone();
            fewer.remove(&c[0]);
            let after = chosen(&fewer, &image, 2);
            assert!(after.contains(&c[1]));
            assert!(!after.contains(&c[0]));
            if c[0] == "node-0" {
                moved += 1;
            }
        }
        // The images spread over the nodes (node-0 is first holder of some, not all).
        assert!(moved > 10 && moved < 100, "{moved}");
        assert_eq!(chosen(&ids(1), "x", 3), vec!["node-0".to_string()]);
    }
}
