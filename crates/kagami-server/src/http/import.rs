//! `POST /kagami/import`, the admin route of the import service
//! (`crate::service::import`).

use std::path::PathBuf;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::app::AppState;
use crate::http::reply;
use crate::service::error::ApiError;
use crate::service::import::{ImportError, ImportRequest};

/// The admin route that imports a file on the server's machine (it needs the admin token,
/// see [`crate::admin`]).
pub const IMPORT_PATH: &str = "/kagami/import";

/// `POST /kagami/import`: `{"path": "/abs/file.tar", "name": null}` with
/// `Authorization: Bearer <admin token>` → the [`ImportReport`] as JSON, or an error in the
/// OCI envelope (`{"errors":[{"code","message","detail"}]}`): 400 `IMPORT_INVALID` (bad
/// input), 401 `UNAUTHORIZED` (no or wrong token), 403 `DENIED` (admin off, or a path inside
/// kagami's data directory) or 500 `UNKNOWN`.
pub async fn route(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let req: ImportRequest = match crate::http::admin_request(
        &state,
        &headers,
        &body,
        "IMPORT_INVALID",
        "{\"path\": \"/abs/file.tar\", \"name\": null}",
    ) {
        Ok(r) => r,
        Err(refused) => return refused.into_response(),
    };
    let path = PathBuf::from(&req.path);
    if !path.is_absolute() {
        return invalid(format!("{}: the path must be absolute", req.path));
    }
    // Run to the end even if the client goes away: an import is not left half-way.
    let st = state.clone();
    let r = tokio::spawn(async move {
        st.services()
            .import
            .import(&path, req.name.as_deref())
            .await
    })
    .await;
    match r {
        Ok(Ok(report)) => reply::json(serde_json::to_vec(&report).expect("a report serialises")),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "import failed");
            if matches!(e, ImportError::Denied { .. }) {
                ApiError::new(StatusCode::FORBIDDEN, "DENIED", e.to_string()).into_response()
            } else if e.is_bad_input() {
                invalid(e.to_string())
            } else {
                ApiError::internal(e.to_string()).into_response()
            }
        }
        Err(e) => ApiError::internal(format!("the import task failed: {e}")).into_response(),
    }
}

fn invalid(message: String) -> Response {
    ApiError::new(StatusCode::BAD_REQUEST, "IMPORT_INVALID", message).into_response()
}
