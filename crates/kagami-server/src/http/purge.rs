//! `POST /kagami/purge`, the admin route of the purge service (`crate::service::purge`).

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::app::AppState;
use crate::http::reply;
use crate::service::error::ApiError;
use crate::service::purge::{PurgeError, PurgeRequest};

/// The admin route that removes an image from this node (it needs the admin token, see
/// [`crate::admin`]).
pub const PURGE_PATH: &str = "/kagami/purge";

/// `POST /kagami/purge`: `{"image": "registry/repository:tag"}` with
/// `Authorization: Bearer <admin token>` → the [`crate::purge::PurgeReport`] as JSON, or an
/// error in the OCI envelope: 400 `PURGE_INVALID` (not an image reference), 401
/// `UNAUTHORIZED`, 403 `DENIED` (admin off), 404 `NAME_UNKNOWN` (not in the store), 409
/// `PINNED` (the policy pins it) or `IN_USE` (a blob of it is being read or written), 500
/// `UNKNOWN`. A refused purge changes nothing.
pub async fn route(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let req: PurgeRequest = match crate::http::admin_request(
        &state,
        &headers,
        &body,
        "PURGE_INVALID",
        "{\"image\": \"registry/repository:tag\"}",
    ) {
        Ok(r) => r,
        Err(refused) => return refused.into_response(),
    };
    // Run to the end even if the client goes away.
    let st = state.clone();
    let r = tokio::spawn(async move { st.purge(&req.image).await }).await;
    match r {
        Ok(Ok(report)) => reply::json(serde_json::to_vec(&report).expect("a report serialises")),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "purge refused");
            let (status, code) = match &e {
                PurgeError::Invalid(_) => (StatusCode::BAD_REQUEST, "PURGE_INVALID"),
                PurgeError::NotFound(_) => (StatusCode::NOT_FOUND, "NAME_UNKNOWN"),
                PurgeError::Pinned { .. } => (StatusCode::CONFLICT, "PINNED"),
                PurgeError::InUse { .. } => (StatusCode::CONFLICT, "IN_USE"),
                PurgeError::Store { .. } => {
                    return ApiError::internal(e.to_string()).into_response();
                }
            };
            ApiError::new(status, code, e.to_string()).into_response()
        }
        Err(e) => ApiError::internal(format!("the purge task failed: {e}")).into_response(),
    }
}
