//! The one error of the services and of every route: an OCI error code, a status and a
//! message (never upstream error text). The HTTP layer renders it, in one place
//! (`crate::http::reply`), as the OCI error envelope
//! `{"errors":[{"code":"...","message":"...","detail":{"request_id":"..."}}]}`.

use http::StatusCode;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Why kagami refused the request, when it did: containerd takes any error as "try the
    /// next host" and pulls around the mirror, so each refusal is counted and shown
    /// (`kagami_refused_requests_total`, `/status`). `None` for a genuine "not found" (the
    /// registry itself would say the same).
    pub refusal: Option<&'static str>,
    /// Seconds for a `Retry-After` header.
    pub retry_after: Option<u32>,
}

impl ApiError {
    /// An error with any status and OCI code (the refusal reason follows from the code).
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        let refusal = match code {
            "MANIFEST_UNKNOWN" | "BLOB_UNKNOWN" | "NOT_FOUND" | "NAME_UNKNOWN" => None,
            "NAME_INVALID" => Some("invalid_name"),
            "DIGEST_INVALID" => Some("invalid_digest"),
            "UNSUPPORTED" => Some("unsupported"),
            "SIZE_INVALID" => Some("too_large"),
            _ => Some("internal"),
        };
        Self {
            status,
            code,
            message: message.into(),
            refusal,
            retry_after: None,
        }
    }
    /// Marks this error as a refusal for `reason` (see [`ApiError::refusal`]).
    pub fn refused(mut self, reason: &'static str) -> Self {
        self.refusal = Some(reason);
        self
    }
    /// An error from walking the plan: a refusal unless every attempt said "not found".
    pub fn upstream(self, not_found: bool) -> Self {
        if not_found {
            self
        } else {
            self.refused("upstream_failed")
        }
    }
    pub fn name_invalid(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "NAME_INVALID", m)
    }
    /// A malformed query parameter other than `ns`.
    pub fn bad_request(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "UNSUPPORTED", m).refused("invalid_query")
    }
    pub fn name_unknown(m: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "NAME_UNKNOWN", m)
    }
    pub fn digest_invalid(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "DIGEST_INVALID", m)
    }
    pub fn manifest_unknown(m: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN", m)
    }
    pub fn manifest_too_big(m: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "SIZE_INVALID", m)
    }
    pub fn blob_unknown(m: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "BLOB_UNKNOWN", m)
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "NOT_FOUND", m)
    }
    pub fn unsupported(m: impl Into<String>) -> Self {
        Self::new(StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED", m)
    }
    pub fn range_not_satisfiable(size: u64) -> Self {
        Self::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            "BLOB_UNKNOWN",
            format!("range not satisfiable for a blob of {size} bytes"),
        )
        .refused("range")
    }
    pub fn unavailable(m: impl Into<String>) -> Self {
        // 404 rather than 5xx: containerd moves on to its next host fastest on a 404.
        Self::new(StatusCode::NOT_FOUND, "NOT_FOUND", m).refused("unavailable")
    }
    pub fn internal(m: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", m)
    }
}
