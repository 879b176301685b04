//! Manifest GET/HEAD and the tag policy: digests never expire; a tag is revalidated
//! upstream (HEAD, then GET when it moved) after the TTL, revalidations of one tag are
//! coalesced, and when every upstream attempt fails the cached digest is served
//! (stale-if-error).

use std::sync::{Arc, PoisonError};
use std::time::SystemTime;

use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use futures_util::FutureExt;
use kagami_config::{Config, Digest, Plan, plan};
use kagami_store::TagEntry;
use tokio::io::AsyncReadExt;

use crate::app::AppState;
use crate::origin::{Origin, Source};
use crate::service::error::ApiError;
use crate::path::{ManifestRef, OciPath, Query};
use crate::upstream::FetchedManifest;

/// The largest manifest kagami stores or serves.
pub const MAX_MANIFEST: u64 = 4 * 1024 * 1024;

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

type Handled = Result<(Response, Source), ApiError>;

/// A manifest GET or HEAD. The sizes of the blobs a manifest served by GET names are
/// remembered for this registry, so that fetching them stops where they must end
/// (`crate::service::blobs::note_descriptors`).
pub(crate) async fn get(
    state: &AppState,
    config: &Arc<Config>,
    path: &OciPath,
    r: &ManifestRef,
    head: bool,
) -> Handled {
    let (resp, source) = get_inner(state, config, path, r, head).await?;
    if head || resp.status() != axum::http::StatusCode::OK {
        return Ok((resp, source));
    }
    // The body is the manifest already in memory (at most 4 MiB).
    let (parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_MANIFEST as usize)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    crate::service::blobs::note_descriptors(state, &path.registry, &bytes);
    Ok((Response::from_parts(parts, Body::from(bytes)), source))
}

async fn get_inner(
    state: &AppState,
    config: &Arc<Config>,
    path: &OciPath,
    r: &ManifestRef,
    head: bool,
) -> Handled {
    match r {
        ManifestRef::Digest(d) => {
            if let Some(resp) = serve_stored(state, d, head).await? {
                state.telemetry().cache("manifest", "hit");
                return Ok((resp, Source::Local));
            }
            state.telemetry().cache("manifest", "miss");
            let plan = plan(&path.reference(), config, state.plan_options());
            let (m, source) = match from_peers(state, &plan, path, &d.to_string()).await {
                Some((m, origin)) => (m, origin.source()),
                None => (
                    state
                        .inner
                        .upstream
                        .manifest(&plan, &d.to_string())
                        .await
                        .inspect(|m| state.telemetry().endpoint_ok(&m.source))
                        .inspect_err(|e| state.telemetry().plan_failed(&plan, &e.message))
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
            store_manifest(state, &m).await;
            Ok((
                manifest_response(&m.bytes, &m.media_type, &m.digest, head),
                source,
            ))
        }
        ManifestRef::Tag(tag) => {
            let store = &state.inner.store;
            let cached = store.get_tag(&path.registry, &path.repository, tag);
            // A tag learnt from a peer counts only for the TTL (`peers::LearntTags`).
            if cached.is_none()
                && let Some(e) = state.peers().and_then(|p| {
                    p.learnt_tag(
                        &path.registry,
                        &path.repository,
                        tag,
                        state.inner.options.tag_ttl,
                    )
                })
                && let Some(resp) = serve_stored(state, &e.digest, head).await?
            {
                state.telemetry().cache("manifest", "hit");
                return Ok((resp, Source::Local));
            }
            if let Some(e) = &cached {
                let age = SystemTime::now()
                    .duration_since(e.fetched_at)
                    .unwrap_or_default();
                // With no endpoint to ask (a peers-only registry on an air-gapped node, or
                // an imported image), there is nothing to revalidate against: the cached
                // tag stays current instead of being served "stale" on every pull.
                let current = age < state.inner.options.tag_ttl
                    || !plan(&path.reference(), config, state.plan_options())
                        .attempts
                        .iter()
                        .any(|a| matches!(a, kagami_config::Attempt::Endpoint(_)));
                if current && let Some(resp) = serve_stored(state, &e.digest, head).await? {
                    state.telemetry().cache("manifest", "hit");
                    return Ok((resp, Source::Local));
                }
            }
            state.telemetry().cache("manifest", "miss");
            match revalidate(state, config, path, tag, cached.clone()).await {
                Revalidation::Current(entry, source) => {
                    match serve_stored(state, &entry.digest, head).await? {
                        Some(resp) => Ok((resp, source)),
                        None => Err(ApiError::manifest_unknown(format!(
                            "{} resolved to {} but it is not stored",
                            tag, entry.digest
                        ))),
                    }
                }
                Revalidation::Failed { message, not_found } => {
                    if let Some(e) = cached
                        && let Some(resp) = serve_stored(state, &e.digest, head).await?
                    {
                        state.telemetry().metrics.stale_served.inc();
                        tracing::warn!(
                            registry = %path.registry, repository = %path.repository, tag, digest = %e.digest,
                            error = %message, "every upstream failed; serving the cached digest (stale-if-error)"
                        );
                        return Ok((resp, Source::Local));
                    }
                    Err(ApiError::manifest_unknown(message).upstream(not_found))
                }
            }
        }
    }
}

/// One revalidation per tag at a time; concurrent requests share its outcome.
async fn revalidate(
    state: &AppState,
    config: &Arc<Config>,
    path: &OciPath,
    tag: &str,
    cached: Option<TagEntry>,
) -> Revalidation {
    let key = (
        path.registry.clone(),
        path.repository.clone(),
        tag.to_string(),
    );
    let shared = {
        let mut map = state
            .inner
            .revalidations
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(f) = map.get(&key) {
            f.clone()
        } else {
            let (st, cfg, p, t) = (state.clone(), config.clone(), path.clone(), tag.to_string());
            let k = key.clone();
            // A task of its own with a deadline: it ends (and leaves the map, releasing its
            // upstream connections) even when every client waiting for it has gone.
            let limit = state.inner.options.limits.revalidation_timeout;
            // Logged under the id of the request that started it (the one its client sees).
            let id = crate::request_id::current();
            let task = tokio::spawn(crate::request_id::within(id, async move {
                let plan = plan(&p.reference(), &cfg, st.plan_options());
                let out = tokio::time::timeout(limit, resolve_tag(&st, &plan, &p, &t, cached))
                    .await
                    .unwrap_or_else(|_| {
                        st.telemetry().metrics.revalidation_timeouts.inc();
                        tracing::warn!(registry = %p.registry, repository = %p.repository, tag = %t, "tag revalidation timed out");
                        Revalidation::Failed {
                            message: format!(
                                "revalidation of {}/{}:{t} took longer than {limit:?}",
                                p.registry, p.repository
                            ),
                            not_found: false,
                        }
                    });
                st.inner
                    .revalidations
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
    state: &AppState,
    plan: &Plan,
    path: &OciPath,
    tag: &str,
    cached: Option<TagEntry>,
) -> Revalidation {
    let inner = &state.inner;
    let now = SystemTime::now();
    if let Some(old) = &cached
        && let Ok(head) = inner.upstream.head_manifest(plan, tag).await
        && head.digest == old.digest
        && inner.store.blob_size(&old.digest).is_some()
    {
        let entry = TagEntry {
            fetched_at: now,
            ..old.clone()
        };
        if let Err(e) = inner
            .store
            .put_tag(&path.registry, &path.repository, tag, entry.clone())
        {
            tracing::warn!(error = %e, "cannot record tag revalidation");
        }
        advertise_tag(state, plan, path, tag).await;
        return Revalidation::Current(entry, Source::Local);
    }
    // A tag this node has never resolved is asked of the other nodes first (the plan's
    // order); a cached one is revalidated against the endpoints.
    let from_endpoints = |m: FetchedManifest| {
        let origin = Origin::Endpoint(m.source.clone());
        (m, origin)
    };
    let fetched = match cached {
        None => match from_peers(state, plan, path, tag).await {
            Some(m) => Ok(m),
            None => inner.upstream.manifest(plan, tag).await.map(from_endpoints),
        },
        Some(_) => inner.upstream.manifest(plan, tag).await.map(from_endpoints),
    };
    match &fetched {
        Ok((m, _)) => state.telemetry().endpoint_ok(&m.source),
        Err(e) => state.telemetry().plan_failed(plan, &e.message),
    }
    match fetched {
        Ok((m, origin)) => {
            if !store_manifest(state, &m).await {
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
                && let Some(peers) = state.peers()
            {
                // Not stored, not advertised: see `peers::LearntTags`.
                let ttl = inner.options.tag_ttl;
                peers.learn_tag(&path.registry, &path.repository, tag, entry.clone(), ttl);
                return Revalidation::Current(entry, Source::Peer);
            }
            if let Err(e) =
                inner
                    .store
                    .put_tag(&path.registry, &path.repository, tag, entry.clone())
            {
                tracing::warn!(error = %e, "cannot record tag");
            }
            advertise_tag(state, plan, path, tag).await;
            Revalidation::Current(entry, origin.source())
        }
        Err(e) => Revalidation::Failed {
            message: e.message,
            not_found: e.not_found,
        },
    }
}

/// A manifest from another node, when the registry is shared and P2P is on.
async fn from_peers(
    state: &AppState,
    plan: &Plan,
    path: &OciPath,
    reference: &str,
) -> Option<(FetchedManifest, Origin)> {
    let peers = state.peers()?;
    if !plan
        .attempts
        .iter()
        .any(|a| matches!(a, kagami_config::Attempt::Peers))
    {
        return None;
    }
    peers
        .manifest(&path.registry, &path.repository, reference)
        .await
}

/// Tells the other nodes this one has resolved `tag` (shared registries only).
async fn advertise_tag(state: &AppState, plan: &Plan, path: &OciPath, tag: &str) {
    if let Some(peers) = state.peers()
        && plan
            .attempts
            .iter()
            .any(|a| matches!(a, kagami_config::Attempt::Peers))
    {
        peers
            .router
            .advertise(vec![crate::peers::tag_key(
                &path.registry,
                &path.repository,
                tag,
            )])
            .await;
    }
}

/// Stores a verified manifest as a blob with its media type. True when it is stored.
async fn store_manifest(state: &AppState, m: &FetchedManifest) -> bool {
    let store = &state.inner.store;
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

/// Serves a stored manifest, or None when it is not in the store.
pub(crate) async fn serve_stored(
    state: &AppState,
    digest: &Digest,
    head: bool,
) -> Result<Option<Response>, ApiError> {
    let store = &state.inner.store;
    // A HEAD needs no file I/O when the store knows the size and the media type.
    if head
        && let (Some(size), Some(media_type)) = (store.blob_size(digest), store.media_type(digest))
        && size <= MAX_MANIFEST
    {
        return Ok(Some(manifest_headers(
            size,
            &media_type,
            digest,
            Body::empty(),
        )));
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
        .or_else(|| media_type_of(&bytes))
        .unwrap_or_else(|| "application/vnd.oci.image.manifest.v1+json".into());
    Ok(Some(manifest_response(&bytes, &media_type, digest, head)))
}

/// The `mediaType` field of a manifest, if it has one.
fn media_type_of(bytes: &[u8]) -> Option<String> {
    serde_json::from_slice::<serde_json::Value>(bytes)
        .ok()?
        .get("mediaType")?
        .as_str()
        .map(str::to_string)
}

fn manifest_response(bytes: &[u8], media_type: &str, digest: &Digest, head: bool) -> Response {
    let body = if head {
        Body::empty()
    } else {
        Body::from(bytes.to_vec())
    };
    manifest_headers(bytes.len() as u64, media_type, digest, body)
}

pub(crate) fn manifest_headers(
    len: u64,
    media_type: &str,
    digest: &Digest,
    body: Body,
) -> Response {
    let mut r = Response::new(body);
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(media_type)
            .unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(
        "Docker-Content-Digest",
        HeaderValue::from_str(&digest.to_string()).expect("ascii"),
    );
    r
}

/// The most tags one answer lists when the client does not say (`n`).
const TAGS_PAGE_MAX: usize = 10_000;

/// `tags/list`: the upstream's list, page by page as the client asks (`n`, `last`), when an
/// endpoint answers; else the tags this mirror has resolved (an upstream outage, or a
/// registry served only by peers), with a log line.
pub(crate) async fn tags_list(
    state: &AppState,
    config: &Config,
    path: &OciPath,
    query: &Query,
) -> Handled {
    let n = match query.get("n") {
        None => None,
        Some(v) => Some(
            v.parse::<u32>()
                .map_err(|_| ApiError::bad_request(format!("n={v:?} is not a number of tags")))?,
        ),
    };
    let last = query.get("last").filter(|l| !l.is_empty());
    let plan = plan(&path.reference(), config, state.plan_options());
    // Whether nothing was found rather than an endpoint failing (nothing to ask is that too).
    let mut not_found = true;
    let why_local = if kagami_client::endpoint_attempts(&plan).next().is_some() {
        match state.inner.upstream.tags(&plan, n, last).await {
            Ok(page) => {
                // The list is in lexical order (the distribution spec asks for it, and
                // docker-registry 2.8 does not sort); registries that ignore `n` and
                // `last` (2.8 does) are paginated here.
                let (mut tags, mut next) = (page.tags, page.next);
                tags.sort();
                if let Some(last) = last {
                    tags.retain(|t| t.as_str() > last);
                }
                if let Some(n) = n
                    && tags.len() > n as usize
                {
                    tags.truncate(n as usize);
                    next = tags.last().map(|t| (Some(n), t.clone()));
                }
                return Ok((tags_response(path, tags, next), Source::Upstream));
            }
            Err(e) => {
                not_found = e.not_found;
                e.message
            }
        }
    } else {
        "no endpoint to ask".to_string()
    };
    let mut tags = state
        .inner
        .store
        .list_tags(&path.registry, &path.repository);
    if let Some(peers) = state.peers() {
        let ttl = state.inner.options.tag_ttl;
        tags.extend(peers.learnt_tags(&path.registry, &path.repository, ttl));
        tags.sort();
        tags.dedup();
    }
    if tags.is_empty() {
        let e = ApiError::name_unknown(format!(
            "{}/{}: no tags known to this mirror ({why_local})",
            path.registry, path.repository
        ));
        return Err(e.upstream(not_found));
    }
    tracing::info!(registry = %path.registry, repository = %path.repository, reason = %why_local, "tag list answered from the tags this mirror has resolved");
    tags.sort();
    if let Some(last) = last {
        tags.retain(|t| t.as_str() > last);
    }
    let limit = n.map_or(TAGS_PAGE_MAX, |n| n as usize);
    let next = (limit > 0 && tags.len() > limit).then(|| (n, tags[limit - 1].clone()));
    tags.truncate(limit);
    Ok((tags_response(path, tags, next), Source::Local))
}

/// A tag list answer, named as the client asked (whatever the upstream repository was
/// rewritten to), with a `Link` to the next page when there is one.
fn tags_response(
    path: &OciPath,
    tags: Vec<String>,
    next: Option<(Option<u32>, String)>,
) -> Response {
    let body = serde_json::json!({"name": path.client_name, "tags": tags}).to_string();
    let mut r = Response::new(Body::from(body));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some((n, last)) = next {
        let n = n.map(|n| format!("n={n}&")).unwrap_or_default();
        let ns = if path.from_ns {
            format!("&ns={}", crate::path::encode(&path.registry))
        } else {
            String::new()
        };
        let link = format!(
            "</v2/{}/tags/list?{n}last={}{ns}>; rel=\"next\"",
            path.client_name,
            crate::path::encode(&last),
        );
        if let Ok(v) = HeaderValue::from_str(&link) {
            r.headers_mut().insert(header::LINK, v);
        }
    }
    r
}
