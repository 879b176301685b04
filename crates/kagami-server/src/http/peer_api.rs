//! The API other nodes fetch from: only what this node holds (no recursion, no upstream),
//! and only for members when a pre-shared key is set. What this node holds is its store,
//! the blobs it is fetching right now and, with the `containerd` feature, the shared images
//! of its containerd (`crate::containerd`).

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::app::AppState;
use crate::http::reply;
use crate::path::{self, ManifestRef, Target};
use crate::peers::{ContentKey, PEER_TOKEN_HEADER, TAG_WAIT};
use crate::service::error::ApiError;
use crate::service::reply::{BlobReply, ManifestReply};

pub use crate::peers::NodeInfo;

/// The peer API. `info` is what `/p2p/info` answers.
pub fn peer_router(state: AppState, info: NodeInfo) -> Router {
    Router::new()
        .route(
            "/p2p/info",
            get(move || async move {
                reply::json(serde_json::to_string(&info).expect("serialisable"))
            }),
        )
        .route("/p2p/claim/{key}", post(claim).get(claim_stored))
        .route("/p2p/has/{key}", get(has))
        .fallback(serve)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token,
        ))
        .with_state(state)
}

async fn require_token(
    State(state): State<AppState>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(expected) = state.peers().and_then(|p| p.token())
        && !req
            .headers()
            .get(PEER_TOKEN_HEADER)
            .is_some_and(|v| crate::admin::ct_eq(v.as_bytes(), expected.as_bytes()))
    {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "not a member of this kagami network",
        )
        .into_response();
    }
    next.run(req).await
}

/// The largest claim request read.
const MAX_CLAIM_REQUEST: usize = 16 * 1024;

/// `POST /p2p/claim/<key>`: this node as the coordinator of the claim on a blob (the key
/// is its digest) or on a tag (`tag:<registry>/<repository>:<tag>`, percent-encoded; see
/// `peers::claims`). Answers who holds the claim (`204` for a release); `503` when this
/// node is not in a P2P network or its claim table is full.
async fn claim(
    State(state): State<AppState>,
    axum::extract::Path(key): axum::extract::Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let key = match claim_key_or_400(&key) {
        Ok(k) => k,
        Err(e) => return e.into_response(),
    };
    let req: crate::peers::ClaimRequest = match serde_json::from_slice(&body) {
        Ok(r) if body.len() <= MAX_CLAIM_REQUEST => r,
        _ => {
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                "CLAIM_INVALID",
                "the body is not a claim request (JSON, at most 16 KiB)",
            )
            .into_response();
        }
    };
    let node = state.node();
    let (Some(peers), Some(me)) = (node.cluster.peers(), node.cluster.me()) else {
        return unavailable("this node is not in a P2P network");
    };
    let (s, k) = (state.clone(), key.clone());
    let local_has = move || holds(&s, &k);
    match peers.coordinate(me, &key, &req, &local_has).await {
        Ok(Some(answer)) => reply::json(serde_json::to_string(&answer).expect("serialisable")),
        Ok(None) => StatusCode::NO_CONTENT.into_response(),
        Err(crate::peers::Full) => unavailable("this node coordinates too many claims"),
    }
}

/// `GET /p2p/claim/<key>`: the nodes that told this coordinator they stored what the key
/// names (a recent claim's holder and askers), as `{"stored": [...]}`; `404` when none.
/// Asking changes nothing (unlike `POST`, which may grant the claim).
async fn claim_stored(
    State(state): State<AppState>,
    axum::extract::Path(key): axum::extract::Path<String>,
) -> Response {
    let key = match claim_key_or_400(&key) {
        Ok(k) => k,
        Err(e) => return e.into_response(),
    };
    let node = state.node();
    let Some(peers) = node.cluster.peers() else {
        return unavailable("this node is not in a P2P network");
    };
    match peers.stored_here(&key) {
        Some(stored) => reply::json(
            serde_json::to_string(&crate::peers::StoredAnswer { stored }).expect("serialisable"),
        ),
        None => ApiError::new(
            StatusCode::NOT_FOUND,
            "CLAIM_UNKNOWN",
            "no node told this coordinator it stored this",
        )
        .into_response(),
    }
}

/// [`claim_key`], or the `400` that says what a claim key is.
fn claim_key_or_400(s: &str) -> Result<ContentKey, ApiError> {
    claim_key(s).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "KEY_INVALID",
            "not a digest or a tag key (tag:<registry>/<repository>:<tag>)",
        )
    })
}

/// A key that can be claimed: a digest, or a tag key.
fn claim_key(s: &str) -> Option<ContentKey> {
    match s.parse::<ContentKey>().ok()? {
        ContentKey::Inflight(_) => None,
        k => Some(k),
    }
}

/// Whether this node holds what `key` names or is getting it right now: a blob stored or
/// being fetched, a tag stored or being resolved.
fn holds(state: &AppState, key: &ContentKey) -> bool {
    let services = state.services();
    match key {
        ContentKey::Digest(d) => services.blobs.holds_or_fetches(d),
        ContentKey::Tag {
            registry,
            repository,
            tag,
        } => services
            .manifests
            .holds_or_resolves(registry, repository, tag),
        ContentKey::Inflight(_) => false,
    }
}

/// `503` with `Retry-After: 0`: this node is resolving the tag; ask again (see
/// `peers::TAG_WAIT`).
fn still_resolving() -> ApiError {
    ApiError {
        retry_after: Some(0),
        ..ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "UNAVAILABLE",
            "this node is resolving the tag right now; ask again",
        )
    }
}

fn unavailable(why: &str) -> Response {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", why).into_response()
}

/// `GET /p2p/has/<key>`: `200` when this node holds the blob or tag the key names or is
/// getting it (a coordinator's check of a claim holder), else `404`.
async fn has(
    State(state): State<AppState>,
    axum::extract::Path(key): axum::extract::Path<String>,
) -> Response {
    match claim_key(&key) {
        Some(k) if holds(&state, &k) => StatusCode::OK.into_response(),
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn serve(State(state): State<AppState>, req: Request) -> Response {
    let range = req
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    match handle(&state, req.method().clone(), req.uri().clone(), range).await {
        Ok(Held::Blob(r)) => reply::blob(r),
        Ok(Held::Manifest(r)) => reply::manifest(r),
        Err(e) => e.into_response(),
    }
}

/// What this node holds, as a service replied.
enum Held {
    Blob(BlobReply),
    Manifest(ManifestReply),
}

async fn handle(
    state: &AppState,
    method: Method,
    uri: axum::http::Uri,
    range: Option<String>,
) -> Result<Held, ApiError> {
    let head = method == Method::HEAD;
    if method != Method::GET && !head {
        return Err(ApiError::unsupported("the peer API is read-only"));
    }
    // Peers always name the registry (ns), so no default registry applies.
    let (p, _) = path::parse_uri(&uri, None)?;
    let range = range.as_deref();
    let not_here = || ApiError::not_found("not held by this node");
    let services = state.services();
    match &p.target {
        Target::Blob(d) => {
            if let Some(r) = services.blobs.serve_stored(d, range, head).await? {
                return Ok(Held::Blob(r));
            }
            #[cfg(feature = "containerd")]
            if let Some(c) = state.containerd()
                && let Some(r) = c.serve_blob(d, range, head).await
            {
                return Ok(Held::Blob(r));
            }
            // A blob this node is fetching right now is served as it arrives (one
            // upstream fetch per cluster), with the same last-byte guarantee.
            services
                .blobs
                .serve_in_flight(d, range, head)
                .await
                .map(Held::Blob)
                .ok_or_else(not_here)
        }
        Target::Manifest(r) => {
            let digest = match r {
                ManifestRef::Digest(d) => d.clone(),
                ManifestRef::Tag(t) => match state.store().get_tag(&p.registry, &p.repository, t) {
                    Some(entry) => entry.digest,
                    // A tag this node is resolving right now (it holds the tag's claim) is
                    // answered once resolved; it never starts a resolution for a peer.
                    None => match services
                        .manifests
                        .resolving(&p.registry, &p.repository, t, TAG_WAIT)
                        .await
                    {
                        Ok(Some(d)) => d,
                        Err(()) => return Err(still_resolving()),
                        Ok(None) => containerd_tag(state, &p.registry, &p.repository, t)
                            .ok_or_else(not_here)?,
                    },
                },
            };
            if let Some(r) = services.manifests.serve_stored(&digest, head).await? {
                return Ok(Held::Manifest(r));
            }
            #[cfg(feature = "containerd")]
            if let Some(c) = state.containerd()
                && let Some(r) = c.serve_manifest(&digest, head).await
            {
                return Ok(Held::Manifest(r));
            }
            Err(not_here())
        }
        // Nodes resolve tags with manifest requests; no node asks a peer for a tag list.
        // Referrers travel as their tag-schema tag (`service::referrers`).
        Target::TagsList | Target::Referrers(_) => Err(ApiError::not_found(
            "the peer API serves blobs and manifests, not tag lists or referrers",
        )),
    }
}

/// The digest an image name of the node's containerd points to, for a shared registry
/// (never without the `containerd` feature).
fn containerd_tag(
    state: &AppState,
    registry: &str,
    repository: &str,
    tag: &str,
) -> Option<kagami_config::Digest> {
    #[cfg(feature = "containerd")]
    {
        state.containerd()?.tag(registry, repository, tag)
    }
    #[cfg(not(feature = "containerd"))]
    {
        let _ = (state, registry, repository, tag);
        None
    }
}
