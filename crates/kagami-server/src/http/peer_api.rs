//! The API other nodes fetch from: only what this node holds (no recursion, no upstream),
//! and only for members when a pre-shared key is set. What this node holds is its store,
//! the blobs it is fetching right now and, with the `containerd` feature, the shared images
//! of its containerd (`crate::containerd`).

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::app::AppState;
use crate::http::reply;
use crate::path::{self, ManifestRef, Target};
use crate::peers::PEER_TOKEN_HEADER;
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
                    None => {
                        containerd_tag(state, &p.registry, &p.repository, t).ok_or_else(not_here)?
                    }
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
