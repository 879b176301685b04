//! Typed replies and errors into responses, in one place: `Docker-Content-Digest`,
//! `Content-Length`, `Content-Type`, `Accept-Ranges`, `Content-Range` and the `206`/`416`
//! statuses are written here for every source of a blob (the store, a fetch in flight, a
//! pass-through, another node, containerd's content store) and every manifest.

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::path::OciPath;
use crate::service::error::ApiError;
use crate::service::reply::{BlobReply, ManifestReply, ReferrersReply, Span, TagsReply};

/// The OCI error envelope, with the request id when the request has one.
impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let detail = match crate::request_id::current() {
            Some(id) => serde_json::json!({ "request_id": id }),
            None => serde_json::Value::Null,
        };
        let body = serde_json::json!({
            "errors": [{"code": self.code, "message": self.message, "detail": detail}]
        });
        let mut resp = (self.status, body.to_string()).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(s) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}

/// A blob reply as a response.
pub(crate) fn blob(reply: BlobReply) -> Response {
    let (digest, span, body) = match reply {
        BlobReply::Unsatisfiable { size } => {
            let mut r = ApiError::range_not_satisfiable(size).into_response();
            r.headers_mut().insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes */{size}")).expect("ascii"),
            );
            return r;
        }
        BlobReply::Bytes {
            digest, span, body, ..
        } => (digest, span, body),
    };
    let mut r = Response::new(body.map_or_else(Body::empty, Body::from_stream));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(
        "Docker-Content-Digest",
        HeaderValue::from_str(&digest.to_string()).expect("digest is ascii"),
    );
    match span {
        Span::Full(len) => {
            if let Some(len) = len {
                h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
            }
        }
        Span::Partial { start, len, size } => {
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
            h.insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes {start}-{}/{size}", start + len - 1))
                    .expect("ascii"),
            );
            *r.status_mut() = StatusCode::PARTIAL_CONTENT;
        }
    }
    r
}

/// A manifest reply as a response.
pub(crate) fn manifest(reply: ManifestReply) -> Response {
    let mut r = Response::new(reply.body.map_or_else(Body::empty, Body::from));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(&reply.media_type)
            .unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(reply.len));
    h.insert(
        "Docker-Content-Digest",
        HeaderValue::from_str(&reply.digest.to_string()).expect("ascii"),
    );
    r
}

/// A referrers list: an OCI image index, saying when it was filtered by artifact type.
pub(crate) fn referrers(reply: ReferrersReply) -> Response {
    let mut r = Response::new(reply.body.map_or_else(Body::empty, Body::from));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(kagami_config::oci::OCI_INDEX),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(reply.len));
    if reply.filtered {
        h.insert(
            "OCI-Filters-Applied",
            HeaderValue::from_static("artifactType"),
        );
    }
    r
}

/// A tag list page, named as the client asked (whatever the upstream repository was
/// rewritten to), with a `Link` to the next page when there is one.
pub(crate) fn tags(path: &OciPath, reply: TagsReply) -> Response {
    let body = serde_json::json!({"name": path.client_name, "tags": reply.tags}).to_string();
    let mut r = json(body);
    if let Some((n, last)) = reply.next {
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

/// A JSON body.
pub(crate) fn json(body: impl Into<Body>) -> Response {
    let mut r = Response::new(body.into());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}
