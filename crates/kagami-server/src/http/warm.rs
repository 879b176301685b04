//! `POST /kagami/warm` (admin) and `GET /kagami/warm`: the routes of cluster warming
//! (`crate::service::warm`, docs/warm.md).

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use kagami_config::Reference;
use serde::{Deserialize, Serialize};

use crate::app::AppState;
use crate::http::reply;
use crate::service::error::ApiError;

/// The route: `POST` adds images to this node's runtime list (admin token), `GET` answers
/// the progress.
pub const WARM_PATH: &str = "/kagami/warm";

/// The body of `POST /kagami/warm`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WarmRequest {
    /// Image references (`registry/repository[:tag][@digest]`, normalised as containerd
    /// does).
    pub images: Vec<String>,
}

/// The answer of `POST /kagami/warm`: the references as normalised (what `GET` lists).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WarmAccepted {
    pub images: Vec<String>,
}

/// `POST /kagami/warm`: `{"images": ["r.example/app:1", ...]}` with `Authorization: Bearer
/// <admin token>` → 202 with [`WarmAccepted`]; the images are warmed on this node in the
/// background (progress: `GET /kagami/warm`, `/status.json`). Errors in the OCI envelope:
/// 400 `WARM_INVALID` (not JSON, no image, a malformed reference — nothing is added then),
/// 401, 403.
pub async fn route(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let req: WarmRequest = match crate::http::admin_request(
        &state,
        &headers,
        &body,
        "WARM_INVALID",
        "{\"images\": [\"registry/repository:tag\", ...]}",
    ) {
        Ok(r) => r,
        Err(refused) => return refused.into_response(),
    };
    if req.images.is_empty() {
        return invalid("no image given".into());
    }
    let mut refs = Vec::with_capacity(req.images.len());
    for (i, image) in req.images.iter().enumerate() {
        match Reference::parse(image) {
            Ok(r) => refs.push(r),
            Err(e) => return invalid(format!("images[{i}]: {e}")),
        }
    }
    let accepted = WarmAccepted {
        images: refs.iter().map(|r| r.to_string()).collect(),
    };
    if let Err(e) = state.warmer().add(refs) {
        return invalid(e);
    }
    tracing::info!(images = ?accepted.images, "warming requested");
    let mut r = reply::json(serde_json::to_vec(&accepted).expect("serialisable"));
    *r.status_mut() = StatusCode::ACCEPTED;
    r
}

/// `GET /kagami/warm`: the warm list and its progress ([`crate::report::WarmReport`]), the
/// `warm` field of `/status.json` (an empty report when the list is empty).
pub async fn progress(State(state): State<AppState>) -> Response {
    let report = state.warmer().report().unwrap_or_default();
    reply::json(serde_json::to_vec(&report).expect("serialisable"))
}

fn invalid(message: String) -> Response {
    ApiError::new(StatusCode::BAD_REQUEST, "WARM_INVALID", message).into_response()
}
