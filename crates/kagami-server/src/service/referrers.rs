//! `GET /v2/<name>/referrers/<digest>` (OCI distribution spec 1.1): the signatures, SBOMs
//! and other artifacts whose `subject` is a manifest, as an image index.
//!
//! The list is kept the way registries without the referrers API keep it: an image index
//! stored as content, under the tag-schema tag `<alg>-<hex>` of the subject in the tag
//! index (`kagami_client::referrers_tag`). So one record serves both kinds of clients (the
//! referrers API here, and a manifest GET of that tag), follows the tag rules (the tag TTL,
//! stale-if-error) and reaches other nodes as any resolved tag does (advertised as a tag
//! key, served by the peer API's manifest-by-tag route). The answer comes, in order:
//!
//! 1. from the store when its record is younger than the tag TTL (or the plan has no
//!    endpoint to ask), or from a list learnt from a peer within the TTL;
//! 2. when this node has no record, from another node (the plan's order, as for tags); such
//!    an answer is unverifiable, so, like a tag learnt from a peer, it is kept in memory
//!    for the TTL only, never written to the tag index;
//! 3. from the endpoints ([`Upstream::referrers`]: the referrers API, or the tag-schema
//!    index of a registry without it); an empty list is answered but not recorded;
//! 4. when every endpoint failed, the stored record, however old (stale-if-error).
//!
//! Nothing found anywhere and no endpoint failing: an empty list (the spec's answer for a
//! manifest with no referrers). `?artifactType=` filters here (never upstream: one record
//! per subject), and the answer then says so in `OCI-Filters-Applied`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use kagami_client::{check_index, index_of, referrers_tag};
use kagami_config::oci::{MAX_MANIFEST_SIZE, OCI_INDEX};
use kagami_config::{Attempt, Digest, Plan};
use kagami_store::{Store, TagEntry};

use crate::origin::Source;
use crate::path::OciPath;
use crate::peers::{Cluster, ContentKey};
use crate::service::error::ApiError;
use crate::service::manifests::Manifests;
use crate::service::reply::ReferrersReply;
use crate::service::{Deps, RequestContext};
use crate::telemetry::Telemetry;
use crate::upstream::Upstream;

/// A referrers lookup in flight, awaited by every request for that list.
type SharedFetch = Shared<BoxFuture<'static, Result<(Bytes, Source), ApiError>>>;

/// Referrers lists. The lookups in flight are its own.
pub(crate) struct Referrers {
    store: Store,
    upstream: Arc<dyn Upstream>,
    telemetry: Arc<Telemetry>,
    cluster: Cluster,
    /// Reads stored indexes.
    manifests: Arc<Manifests>,
    tag_ttl: Duration,
    /// The longest a lookup may take (the tag revalidation timeout).
    timeout: Duration,
    /// Lookups in flight, by (registry, repository, subject).
    in_flight: Mutex<HashMap<(String, String, Digest), SharedFetch>>,
}

impl Referrers {
    pub(crate) fn new(
        deps: &Deps,
        manifests: Arc<Manifests>,
        tag_ttl: Duration,
        timeout: Duration,
    ) -> Arc<Referrers> {
        Arc::new(Referrers {
            store: deps.store.clone(),
            upstream: deps.upstream.clone(),
            telemetry: deps.telemetry.clone(),
            cluster: deps.cluster.clone(),
            manifests,
            tag_ttl,
            timeout,
            in_flight: Mutex::new(HashMap::new()),
        })
    }

    /// The referrers of `subject`, filtered by `artifact_type` when given.
    pub(crate) async fn list(
        self: &Arc<Self>,
        ctx: &RequestContext,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<ReferrersReply, ApiError> {
        let (bytes, source) = match self.current(ctx, subject).await? {
            Some(b) => (b, Source::Local),
            None => self.coalesced(ctx, subject).await?,
        };
        answer(bytes, artifact_type, ctx.head, source)
    }

    /// This node's list while it counts: its record younger than the TTL (or any record,
    /// with no endpoint to ask), else a list learnt from a peer within the TTL.
    async fn current(
        &self,
        ctx: &RequestContext,
        subject: &Digest,
    ) -> Result<Option<Bytes>, ApiError> {
        let path = &ctx.path;
        let tag = referrers_tag(subject);
        let cached = self.store.get_tag(&path.registry, &path.repository, &tag);
        if let Some(e) = &cached {
            let age = SystemTime::now()
                .duration_since(e.fetched_at)
                .unwrap_or_default();
            if (age < self.tag_ttl || !has_endpoints(ctx.plan()))
                && let Some(b) = self.stored(&e.digest).await?
            {
                self.telemetry.cache("referrers", "hit");
                return Ok(Some(b));
            }
        }
        if cached.is_none()
            && let Some(e) = self
                .cluster
                .peers()
                .and_then(|p| p.learnt_tag(&path.registry, &path.repository, &tag, self.tag_ttl))
            && let Some(b) = self.stored(&e.digest).await?
        {
            self.telemetry.cache("referrers", "hit");
            return Ok(Some(b));
        }
        self.telemetry.cache("referrers", "miss");
        Ok(None)
    }

    /// One [`Referrers::fetch`] per list at a time; concurrent requests share its outcome.
    /// It runs in a task of its own with a deadline, so it ends (and leaves the map) even
    /// when every client waiting for it has gone.
    async fn coalesced(
        self: &Arc<Self>,
        ctx: &RequestContext,
        subject: &Digest,
    ) -> Result<(Bytes, Source), ApiError> {
        let path = &ctx.path;
        let key = (
            path.registry.clone(),
            path.repository.clone(),
            subject.clone(),
        );
        let shared = {
            let mut map = self
                .in_flight
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(f) = map.get(&key) {
                f.clone()
            } else {
                let (svc, plan, p, d, k) = (
                    self.clone(),
                    ctx.plan().clone(),
                    path.clone(),
                    subject.clone(),
                    key.clone(),
                );
                let limit = self.timeout;
                let id = crate::request_id::current();
                let task = tokio::spawn(crate::request_id::within(id, async move {
                    let out = tokio::time::timeout(limit, svc.fetch(&plan, &p, &d))
                        .await
                        .unwrap_or_else(|_| {
                            Err(ApiError::manifest_unknown(format!(
                                "referrers of {d}: took longer than {limit:?}"
                            ))
                            .upstream(false))
                        });
                    svc.in_flight
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .remove(&k);
                    out
                }));
                let fut = async move {
                    task.await.unwrap_or_else(|e| {
                        Err(ApiError::internal(format!("referrers lookup failed: {e}")))
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

    /// The list when this node has none that counts: another node's, the endpoints', or
    /// this node's old record (stale-if-error).
    async fn fetch(
        &self,
        plan: &Plan,
        path: &OciPath,
        subject: &Digest,
    ) -> Result<(Bytes, Source), ApiError> {
        let tag = referrers_tag(subject);
        let cached = self.store.get_tag(&path.registry, &path.repository, &tag);
        if cached.is_none()
            && let Some(b) = self.ask_peers(plan, path, &tag).await
        {
            return Ok((b, Source::Peer));
        }
        let why = if has_endpoints(plan) {
            match self.upstream.referrers(plan, subject).await {
                Ok(r) => {
                    self.telemetry.endpoint_ok(&r.source);
                    let list = check_index(&r.bytes).map_err(|e| {
                        ApiError::manifest_unknown(format!(
                            "{} answered referrers that are not an index: {e}",
                            r.source
                        ))
                    })?;
                    if !list.is_empty() {
                        self.record(plan, path, &tag, &r.digest, &r.bytes).await;
                    }
                    tracing::debug!(registry = %path.registry, repository = %path.repository, %subject, referrers = list.len(), tag_schema = r.tag_schema, source = %r.source, "referrers fetched");
                    return Ok((r.bytes, Source::Upstream));
                }
                Err(e) if e.not_found => {
                    // No endpoint has any: the spec's answer is an empty list.
                    return Ok((Bytes::from(index_of(Vec::new())), Source::Upstream));
                }
                Err(e) => {
                    self.telemetry.plan_failed(plan, &e.message);
                    e.message
                }
            }
        } else {
            return Ok((Bytes::from(index_of(Vec::new())), Source::None));
        };
        if let Some(e) = cached
            && let Some(b) = self.stored(&e.digest).await?
        {
            self.telemetry.metrics.stale_served.inc();
            tracing::warn!(
                registry = %path.registry, repository = %path.repository, %subject, digest = %e.digest,
                error = %why, "every upstream failed; serving the cached referrers (stale-if-error)"
            );
            return Ok((b, Source::Local));
        }
        Err(ApiError::manifest_unknown(format!("referrers of {subject}: {why}")).upstream(false))
    }

    /// A stored index, or None when it is not in the store.
    async fn stored(&self, digest: &Digest) -> Result<Option<Bytes>, ApiError> {
        Ok(self
            .manifests
            .serve_stored(digest, false)
            .await?
            .and_then(|r| r.body))
    }

    /// The referrers list of another node, through the tag-schema tag it has recorded
    /// (shared registries only). Stored as content and learnt for the TTL.
    async fn ask_peers(&self, plan: &Plan, path: &OciPath, tag: &str) -> Option<Bytes> {
        let peers = self.cluster.peers()?;
        if !plan.attempts.iter().any(|a| matches!(a, Attempt::Peers)) {
            return None;
        }
        let (m, origin) = peers
            .manifest(&path.registry, &path.repository, tag)
            .await?;
        if let Err(e) = check_index(&m.bytes) {
            tracing::info!(%origin, tag, error = %e, "a peer's referrers list is not an index; ignored");
            return None;
        }
        if self.put(&m.digest, &m.bytes).await {
            let entry = TagEntry {
                digest: m.digest.clone(),
                media_type: OCI_INDEX.into(),
                fetched_at: SystemTime::now(),
            };
            peers.learn_tag(&path.registry, &path.repository, tag, entry, self.tag_ttl);
        }
        Some(m.bytes)
    }

    /// Stores an index; true when it is stored.
    async fn put(&self, digest: &Digest, bytes: &[u8]) -> bool {
        if bytes.len() as u64 > MAX_MANIFEST_SIZE {
            return false;
        }
        if let Err(e) = self.store.put_bytes(digest, bytes).await {
            tracing::warn!(%digest, error = %e, "cannot store a referrers list");
            return false;
        }
        if let Err(e) = self.store.put_media_type(digest, OCI_INDEX) {
            tracing::warn!(%digest, error = %e, "cannot record a referrers list's media type");
        }
        true
    }

    /// Stores an index from an endpoint and records it under the tag-schema tag, then
    /// tells the other nodes (shared registries only).
    async fn record(&self, plan: &Plan, path: &OciPath, tag: &str, digest: &Digest, bytes: &[u8]) {
        if !self.put(digest, bytes).await {
            return;
        }
        let entry = TagEntry {
            digest: digest.clone(),
            media_type: OCI_INDEX.into(),
            fetched_at: SystemTime::now(),
        };
        if let Err(e) = self
            .store
            .put_tag(&path.registry, &path.repository, tag, entry)
        {
            tracing::warn!(error = %e, tag, "cannot record a referrers list");
            return;
        }
        if let Some(peers) = self.cluster.peers()
            && plan.attempts.iter().any(|a| matches!(a, Attempt::Peers))
        {
            let key = ContentKey::tag(&path.registry, &path.repository, tag);
            peers.router.advertise(vec![key.to_string()]).await;
        }
    }
}

/// Whether the plan has an endpoint to ask.
fn has_endpoints(plan: &Plan) -> bool {
    plan.attempts
        .iter()
        .any(|a| matches!(a, Attempt::Endpoint(_)))
}

/// The answer: the index as stored when there is no filter, else an index of the
/// descriptors whose `artifactType` is the one asked.
fn answer(
    bytes: Bytes,
    artifact_type: Option<&str>,
    head: bool,
    source: Source,
) -> Result<ReferrersReply, ApiError> {
    let body = match artifact_type {
        None => bytes,
        Some(t) => {
            let list = check_index(&bytes).map_err(|e| {
                ApiError::internal(format!("a stored referrers list is not an index: {e}"))
            })?;
            let kept = list
                .into_iter()
                .filter(|d| d.get("artifactType").and_then(|v| v.as_str()) == Some(t))
                .collect();
            Bytes::from(index_of(kept))
        }
    };
    Ok(ReferrersReply {
        len: body.len() as u64,
        body: (!head).then_some(body),
        filtered: artifact_type.is_some(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn the_filter_keeps_one_artifact_type() {
        let d = |t: &str| serde_json::json!({"mediaType": "m", "digest": D, "size": 1, "artifactType": t});
        let idx = Bytes::from(index_of(vec![d("a/sig"), d("a/sbom"), d("a/sig")]));
        let r = answer(idx.clone(), Some("a/sig"), false, Source::Local).unwrap();
        assert!(r.filtered);
        assert_eq!(check_index(r.body.as_ref().unwrap()).unwrap().len(), 2);
        let r = answer(idx.clone(), None, false, Source::Local).unwrap();
        assert_eq!((r.filtered, r.body.as_ref()), (false, Some(&idx)));
        let r = answer(idx, Some("none"), true, Source::Local).unwrap();
        assert!(r.body.is_none());
        assert_eq!(r.len, index_of(Vec::new()).len() as u64);
    }
}
