//! Manifest GET/HEAD and the tag policy: digests never expire; a tag is revalidated
//! upstream (HEAD, then GET when it moved) after the TTL, revalidations of one tag are
//! coalesced, and when every upstream attempt fails the cached digest is served
//! (stale-if-error). A tag no node has resolved is resolved by one node for the cluster
//! ([`resolve_for_cluster`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use kagami_config::oci::{ManifestView, OCI_MANIFEST};
use kagami_config::{Digest, Plan, Policy};
use kagami_store::{Store, TagEntry};
use tokio::io::AsyncReadExt;

use crate::origin::{Origin, Source};
use crate::path::{ManifestRef, OciPath};
use crate::peers::{ClaimGuard, Claimed, ContentKey, NotFromPeer, TagKey};
use crate::service::blobs::Blobs;
use crate::service::error::ApiError;
use crate::service::reply::ManifestReply;
use crate::service::{Deps, RequestContext};
use crate::telemetry::Telemetry;
use crate::upstream::{FetchedManifest, Upstream};

/// A tag revalidation in flight, awaited by every request for that tag.
type SharedRevalidation = Shared<BoxFuture<'static, Revalidation>>;

/// Manifest GET/HEAD and tag revalidation. The revalidations in flight are its own.
pub(crate) struct Manifests {
    store: Store,
    upstream: Arc<dyn Upstream>,
    telemetry: Arc<Telemetry>,
    cluster: crate::peers::Cluster,
    /// Told the blob sizes of every manifest served.
    blobs: Arc<Blobs>,
    /// How long a resolved tag is served without asking upstream again (`--tag-ttl`), when
    /// no `tagTTL` rule of the policy matches.
    tag_ttl: Duration,
    /// The policy file, for its per-repository `tagTTL` rules (reloads apply).
    policy: Arc<RwLock<Arc<Policy>>>,
    /// The longest a tag revalidation may take.
    revalidation_timeout: Duration,
    /// Tag revalidations in flight, by (registry, repository, tag).
    revalidations: Mutex<HashMap<TagKey, SharedRevalidation>>,
}

impl Manifests {
    pub(crate) fn new(
        deps: &Deps,
        blobs: Arc<Blobs>,
        tag_ttl: Duration,
        policy: Arc<RwLock<Arc<Policy>>>,
        revalidation_timeout: Duration,
    ) -> Arc<Manifests> {
        Arc::new(Manifests {
            store: deps.store.clone(),
            upstream: deps.upstream.clone(),
            telemetry: deps.telemetry.clone(),
            cluster: deps.cluster.clone(),
            blobs,
            tag_ttl,
            policy,
            revalidation_timeout,
            revalidations: Mutex::new(HashMap::new()),
        })
    }

    /// The tag TTL of a repository: the policy's first matching `tagTTL` rule, else
    /// `--tag-ttl`.
    pub(crate) fn tag_ttl(&self, registry: &str, repository: &str) -> Duration {
        self.policy
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .tag_ttl_for(registry, repository)
            .unwrap_or(self.tag_ttl)
    }

    /// A client's manifest GET or HEAD (see [`get`]).
    pub(crate) async fn get(
        self: &Arc<Self>,
        ctx: &RequestContext,
        r: &ManifestRef,
    ) -> Result<ManifestReply, ApiError> {
        get(self, ctx, r).await
    }

    /// Whether this node holds `tag` in its store or is resolving it right now (a claim
    /// coordinator's check of the tag's holder).
    pub(crate) fn holds_or_resolves(&self, registry: &str, repository: &str, tag: &str) -> bool {
        self.store.get_tag(registry, repository, tag).is_some()
            || self
                .revalidations
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .contains_key(&(registry.into(), repository.into(), tag.into()))
    }

    /// For the peer API: the digest `tag` resolved to when this node is resolving it right
    /// now, once it has; `Ok(None)` when it is not resolving it (or its resolution failed
    /// or ended elsewhere than in its store: a tag learnt from a peer is not served), and
    /// `Err(())` when it is still resolving after `wait`.
    pub(crate) async fn resolving(
        &self,
        registry: &str,
        repository: &str,
        tag: &str,
        wait: Duration,
    ) -> Result<Option<Digest>, ()> {
        let key = (
            registry.to_string(),
            repository.to_string(),
            tag.to_string(),
        );
        let Some(pending) = self
            .revalidations
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
            .cloned()
        else {
            return Ok(None);
        };
        match tokio::time::timeout(wait, pending).await {
            Err(_) => Err(()),
            Ok(Revalidation::Current(..)) => Ok(self
                .store
                .get_tag(registry, repository, tag)
                .map(|e| e.digest)),
            Ok(Revalidation::Failed { .. }) => Ok(None),
        }
    }

    /// A stored manifest, or None when it is not in the store (see [`serve_stored`]).
    pub(crate) async fn serve_stored(
        &self,
        digest: &Digest,
        head: bool,
    ) -> Result<Option<ManifestReply>, ApiError> {
        serve_stored(self, digest, head).await
    }
}

/// The largest manifest kagami stores or serves.
pub use kagami_config::oci::MAX_MANIFEST_SIZE as MAX_MANIFEST;

/// The outcome of one (shared) revalidation of a tag.
#[derive(Clone)]
pub enum Revalidation {
    /// The tag's current entry, and where the manifest came from.
    Current(TagEntry, Source),
    Failed {
        message: String,
        not_found: bool,
    },
}

type Handled = Result<ManifestReply, ApiError>;

/// A manifest GET or HEAD. The sizes of the blobs a manifest served by GET names are
/// remembered for this registry, so that fetching them stops where they must end
/// (`Blobs::note_descriptors`).
async fn get(svc: &Arc<Manifests>, ctx: &RequestContext, r: &ManifestRef) -> Handled {
    let reply = get_inner(svc, ctx, r).await?;
    if let Some(bytes) = &reply.body {
        svc.blobs.note_descriptors(&ctx.path.registry, bytes);
    }
    Ok(reply)
}

async fn get_inner(svc: &Arc<Manifests>, ctx: &RequestContext, r: &ManifestRef) -> Handled {
    let (path, head) = (&ctx.path, ctx.head);
    match r {
        ManifestRef::Digest(d) => {
            if let Some(reply) = serve_stored(svc, d, head).await? {
                svc.telemetry.cache("manifest", "hit");
                return Ok(reply);
            }
            svc.telemetry.cache("manifest", "miss");
            let plan = &**ctx.plan();
            let (m, source) = match from_peers(svc, plan, path, &d.to_string()).await {
                Some((m, origin)) => (m, origin.source()),
                None => (
                    svc.upstream
                        .manifest(plan, &d.to_string())
                        .await
                        .inspect(|m| svc.telemetry.endpoint_ok(&m.source))
                        .inspect_err(|e| svc.telemetry.plan_failed(plan, &e.message))
                        .map_err(|e| ApiError::manifest_unknown(e.message).upstream(e.not_found))?,
                    Source::Upstream,
                ),
            };
            if &m.digest != d {
                return Err(ApiError::manifest_unknown(format!(
                    "upstream answered {} for {d}",
                    m.digest
                )));
            }
            store_manifest(svc, &m).await;
            Ok(manifest_reply(
                m.bytes,
                &m.media_type,
                &m.digest,
                head,
                source,
            ))
        }
        ManifestRef::Tag(tag) => {
            let cached = svc.store.get_tag(&path.registry, &path.repository, tag);
            let ttl = svc.tag_ttl(&path.registry, &path.repository);
            // A tag learnt from a peer counts only for the TTL (`peers::LearntTags`).
            if cached.is_none()
                && let Some(e) = svc
                    .cluster
                    .peers()
                    .and_then(|p| p.learnt_tag(&path.registry, &path.repository, tag, ttl))
                && let Some(reply) = serve_stored(svc, &e.digest, head).await?
            {
                svc.telemetry.cache("manifest", "hit");
                return Ok(reply);
            }
            if let Some(e) = &cached {
                let age = SystemTime::now()
                    .duration_since(e.fetched_at)
                    .unwrap_or_default();
                // With no endpoint to ask (a peers-only registry on an air-gapped node, or
                // an imported image), there is nothing to revalidate against: the cached
                // tag stays current instead of being served "stale" on every pull.
                let current = age < ttl
                    || !ctx
                        .plan()
                        .attempts
                        .iter()
                        .any(|a| matches!(a, kagami_config::Attempt::Endpoint(_)));
                if current && let Some(reply) = serve_stored(svc, &e.digest, head).await? {
                    svc.telemetry.cache("manifest", "hit");
                    return Ok(reply);
                }
            }
            svc.telemetry.cache("manifest", "miss");
            match revalidate(svc, ctx, tag, cached.clone()).await {
                Revalidation::Current(entry, source) => {
                    match serve_stored(svc, &entry.digest, head).await? {
                        Some(reply) => Ok(ManifestReply { source, ..reply }),
                        None => Err(ApiError::manifest_unknown(format!(
                            "{} resolved to {} but it is not stored",
                            tag, entry.digest
                        ))),
                    }
                }
                Revalidation::Failed { message, not_found } => {
                    if let Some(e) = cached
                        && let Some(reply) = serve_stored(svc, &e.digest, head).await?
                    {
                        svc.telemetry.metrics.stale_served.inc();
                        tracing::warn!(
                            registry = %path.registry, repository = %path.repository, tag, digest = %e.digest,
                            error = %message, "every upstream failed; serving the cached digest (stale-if-error)"
                        );
                        return Ok(reply);
                    }
                    Err(ApiError::manifest_unknown(message).upstream(not_found))
                }
            }
        }
    }
}

/// One revalidation per tag at a time; concurrent requests share its outcome.
async fn revalidate(
    svc: &Arc<Manifests>,
    ctx: &RequestContext,
    tag: &str,
    cached: Option<TagEntry>,
) -> Revalidation {
    let path = &ctx.path;
    let key = (
        path.registry.clone(),
        path.repository.clone(),
        tag.to_string(),
    );
    let shared = {
        let mut map = svc
            .revalidations
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(f) = map.get(&key) {
            f.clone()
        } else {
            let (st, plan, p, t) = (
                svc.clone(),
                ctx.plan().clone(),
                path.clone(),
                tag.to_string(),
            );
            let k = key.clone();
            // A task of its own with a deadline: it ends (and leaves the map, releasing its
            // upstream connections) even when every client waiting for it has gone.
            let limit = svc.revalidation_timeout;
            // Logged under the id of the request that started it (the one its client sees).
            let id = crate::request_id::current();
            let task = tokio::spawn(crate::request_id::within(id, async move {
                let out = tokio::time::timeout(limit, resolve_tag(&st, &plan, &p, &t, cached))
                    .await
                    .unwrap_or_else(|_| {
                        st.telemetry.metrics.revalidation_timeouts.inc();
                        tracing::warn!(registry = %p.registry, repository = %p.repository, tag = %t, "tag revalidation timed out");
                        Revalidation::Failed {
                            message: format!(
                                "revalidation of {}/{}:{t} took longer than {limit:?}",
                                p.registry, p.repository
                            ),
                            not_found: false,
                        }
                    });
                st.revalidations
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&k);
                out
            }));
            let fut = async move {
                task.await.unwrap_or_else(|e| Revalidation::Failed {
                    message: format!("tag revalidation failed: {e}"),
                    not_found: false,
                })
            }
            .boxed()
            .shared();
            map.insert(key, fut.clone());
            fut
        }
    };
    shared.await
}

async fn resolve_tag(
    svc: &Manifests,
    plan: &Plan,
    path: &OciPath,
    tag: &str,
    cached: Option<TagEntry>,
) -> Revalidation {
    let now = SystemTime::now();
    if let Some(old) = &cached
        && let Ok(head) = svc.upstream.head_manifest(plan, tag).await
        && head.digest == old.digest
        && svc.store.blob_size(&old.digest).is_some()
    {
        let entry = TagEntry {
            fetched_at: now,
            ..old.clone()
        };
        if let Err(e) = svc
            .store
            .put_tag(&path.registry, &path.repository, tag, entry.clone())
        {
            tracing::warn!(error = %e, "cannot record tag revalidation");
        }
        advertise_tag(svc, plan, path, tag).await;
        return Revalidation::Current(entry, Source::Local);
    }
    // A tag this node has never resolved is asked of the other nodes first (the plan's
    // order); a cached one is revalidated against the endpoints.
    let from_endpoints = |m: FetchedManifest| {
        let origin = Origin::Endpoint(m.source.clone());
        (m, origin)
    };
    // A claim this node holds on the tag lives until the tag is stored (or not): it is
    // released as done or failed when dropped, at the end of this function.
    let (fetched, _claim) = match cached {
        None => match from_peers(svc, plan, path, tag).await {
            Some(m) => (Ok(m), None),
            None => match resolve_for_cluster(svc, plan, path, tag).await {
                ColdTag::Peer(m) => (Ok(m), None),
                ColdTag::Holder(guard) => (
                    svc.upstream.manifest(plan, tag).await.map(from_endpoints),
                    Some(guard),
                ),
                ColdTag::Alone => (
                    svc.upstream.manifest(plan, tag).await.map(from_endpoints),
                    None,
                ),
            },
        },
        Some(_) => (
            svc.upstream.manifest(plan, tag).await.map(from_endpoints),
            None,
        ),
    };
    match &fetched {
        Ok((m, _)) => svc.telemetry.endpoint_ok(&m.source),
        Err(e) => svc.telemetry.plan_failed(plan, &e.message),
    }
    match fetched {
        Ok((m, origin)) => {
            if !store_manifest(svc, &m).await {
                return Revalidation::Failed {
                    message: format!("cannot store manifest {}", m.digest),
                    not_found: false,
                };
            }
            let entry = TagEntry {
                digest: m.digest.clone(),
                media_type: m.media_type.clone(),
                fetched_at: now,
            };
            if origin.peer().is_some()
                && let Some(peers) = svc.cluster.peers()
            {
                // Not stored, not advertised: see `peers::LearntTags`.
                let ttl = svc.tag_ttl(&path.registry, &path.repository);
                peers.learn_tag(&path.registry, &path.repository, tag, entry.clone(), ttl);
                return Revalidation::Current(entry, Source::Peer);
            }
            if let Err(e) = svc
                .store
                .put_tag(&path.registry, &path.repository, tag, entry.clone())
            {
                tracing::warn!(error = %e, "cannot record tag");
            }
            advertise_tag(svc, plan, path, tag).await;
            Revalidation::Current(entry, origin.source())
        }
        Err(e) => Revalidation::Failed {
            message: e.message,
            not_found: e.not_found,
        },
    }
}

/// How a tag nobody has resolved is resolved for the cluster.
enum ColdTag {
    /// Another node resolved it for the cluster: its answer.
    Peer((FetchedManifest, Origin)),
    /// This node holds the tag's claim: it asks the endpoints, for every node.
    Holder(ClaimGuard),
    /// No claim (P2P off, the registry not shared, no coordinator answered, or the holder
    /// failed twice): this node asks the endpoints for itself.
    Alone,
}

/// How many times a node asks for a tag's claim (the second time naming the holder it
/// could not get the tag from) before it asks the endpoints for itself.
const TAG_CLAIM_ROUNDS: usize = 2;
/// How many times a node asks the holder of a tag's claim again while the holder is still
/// resolving it (each ask waits up to `peers::TAG_WAIT`).
const TAG_ASKS: usize = 8;

/// One resolution of a cold tag per cluster (docs/p2p.md, "One resolution of a cold tag
/// per cluster"): like a blob nobody
/// holds, the tag key is claimed from its coordinator; the first asker resolves it from
/// the endpoints while every other node asks that one, whose peer API answers once it has
/// (it waits on its own resolution, never starting one for a peer). The tag is then
/// learnt from a peer, as when a node that resolved it earlier answers.
async fn resolve_for_cluster(svc: &Manifests, plan: &Plan, path: &OciPath, tag: &str) -> ColdTag {
    let (Some(peers), Some(me)) = (svc.cluster.peers(), svc.cluster.me()) else {
        return ColdTag::Alone;
    };
    if !shares(plan) || (tag == "latest" && !peers.resolve_latest) {
        return ColdTag::Alone;
    }
    let key = ContentKey::tag(&path.registry, &path.repository, tag);
    let has = || svc.holds_or_resolves(&path.registry, &path.repository, tag);
    let mut failed: Option<String> = None;
    for _ in 0..TAG_CLAIM_ROUNDS {
        match peers.claim(me, &key, failed.as_deref(), None, &has).await {
            None => return ColdTag::Alone,
            Some(Claimed::Granted) => {
                let (store, p, t) = (svc.store.clone(), path.clone(), tag.to_string());
                let guard = ClaimGuard::start(peers, me, key, move || {
                    store.get_tag(&p.registry, &p.repository, &t).is_some()
                });
                tracing::debug!(registry = %path.registry, repository = %path.repository, tag, "tag claim granted; resolving it for the cluster");
                return ColdTag::Holder(guard);
            }
            Some(Claimed::Held { holder, .. }) => {
                for _ in 0..TAG_ASKS {
                    match peers
                        .manifest_from(&holder, &path.registry, &path.repository, tag)
                        .await
                    {
                        Ok(found) => return ColdTag::Peer(found),
                        Err(NotFromPeer::Resolving) => continue,
                        Err(NotFromPeer::Missing) => break,
                    }
                }
                tracing::debug!(registry = %path.registry, repository = %path.repository, tag, holder = %holder.id, "the holder of the tag's claim did not answer it");
                failed = Some(holder.id);
            }
        }
    }
    ColdTag::Alone
}

/// Whether the plan asks other nodes (a shared registry with P2P on).
fn shares(plan: &Plan) -> bool {
    plan.attempts
        .iter()
        .any(|a| matches!(a, kagami_config::Attempt::Peers))
}

/// A manifest from another node, when the registry is shared and P2P is on.
async fn from_peers(
    svc: &Manifests,
    plan: &Plan,
    path: &OciPath,
    reference: &str,
) -> Option<(FetchedManifest, Origin)> {
    let peers = svc.cluster.peers()?;
    if !shares(plan) {
        return None;
    }
    peers
        .manifest(&path.registry, &path.repository, reference)
        .await
}

/// Tells the other nodes this one has resolved `tag` (shared registries only).
async fn advertise_tag(svc: &Manifests, plan: &Plan, path: &OciPath, tag: &str) {
    if let Some(peers) = svc.cluster.peers()
        && shares(plan)
    {
        peers
            .router
            .advertise(vec![
                crate::peers::ContentKey::tag(&path.registry, &path.repository, tag).to_string(),
            ])
            .await;
    }
}

/// Stores a verified manifest as a blob with its media type. True when it is stored.
async fn store_manifest(svc: &Manifests, m: &FetchedManifest) -> bool {
    let store = &svc.store;
    if m.bytes.len() as u64 > MAX_MANIFEST {
        tracing::warn!(digest = %m.digest, bytes = m.bytes.len(), "manifest larger than 4 MiB refused");
        return false;
    }
    if let Err(e) = store.put_bytes(&m.digest, &m.bytes).await {
        tracing::warn!(digest = %m.digest, error = %e, "cannot store manifest");
        return false;
    }
    if let Err(e) = store.put_media_type(&m.digest, &m.media_type) {
        tracing::warn!(digest = %m.digest, error = %e, "cannot record manifest media type");
    }
    true
}

/// A stored manifest, or None when it is not in the store.
async fn serve_stored(
    svc: &Manifests,
    digest: &Digest,
    head: bool,
) -> Result<Option<ManifestReply>, ApiError> {
    let store = &svc.store;
    // A HEAD needs no file I/O when the store knows the size and the media type.
    if head
        && let (Some(size), Some(media_type)) = (store.blob_size(digest), store.media_type(digest))
        && size <= MAX_MANIFEST
    {
        return Ok(Some(ManifestReply {
            digest: digest.clone(),
            media_type,
            len: size,
            body: None,
            source: Source::Local,
        }));
    }
    let Some(mut handle) = store
        .open_blob(digest)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
    else {
        return Ok(None);
    };
    if handle.size > MAX_MANIFEST {
        return Err(ApiError::manifest_too_big(format!(
            "{digest} is larger than 4 MiB"
        )));
    }
    let mut bytes = Vec::with_capacity(handle.size as usize);
    handle
        .file
        .read_to_end(&mut bytes)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let media_type = store
        .media_type(digest)
        .or_else(|| ManifestView::parse(&bytes).ok()?.media_type)
        .unwrap_or_else(|| OCI_MANIFEST.into());
    Ok(Some(manifest_reply(
        Bytes::from(bytes),
        &media_type,
        digest,
        head,
        Source::Local,
    )))
}

fn manifest_reply(
    bytes: Bytes,
    media_type: &str,
    digest: &Digest,
    head: bool,
    source: Source,
) -> ManifestReply {
    ManifestReply {
        digest: digest.clone(),
        media_type: media_type.to_string(),
        len: bytes.len() as u64,
        body: (!head).then_some(bytes),
        source,
    }
}
