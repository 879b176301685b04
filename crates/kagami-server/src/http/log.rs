//! One structured log line per request, written when its body has been sent (or the
//! client went away), with the source of the bytes, the byte count and the duration.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use futures_util::Stream;

use std::sync::Arc;

use crate::app::Source;
use crate::path::OciPath;
use crate::telemetry::Telemetry;
use crate::telemetry::metrics::SourceLabels;

pub struct RequestLog {
    pub method: &'static str,
    pub uri: String,
    pub status: u16,
    pub source: Source,
    pub start: Instant,
    /// The request as the dispatcher parsed it (`None` when it did not parse).
    pub path: Option<OciPath>,
    pub telemetry: Arc<Telemetry>,
}

struct Counting<S> {
    inner: S,
    bytes: u64,
    failed: bool,
    log: RequestLog,
    /// The response's `Docker-Content-Digest`, for the status page's recent pulls.
    digest: Option<String>,
    /// The request id ([`crate::request_id`]), when the request has one.
    request_id: Option<String>,
}

impl<S> Stream for Counting<S>
where
    S: Stream<Item = Result<Bytes, axum::Error>> + Unpin,
{
    type Item = Result<Bytes, axum::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let poll = Pin::new(&mut self.inner).poll_next(cx);
        match &poll {
            Poll::Ready(Some(Ok(b))) => {
                let n = b.len() as u64;
                self.bytes += n;
                self.log.telemetry.bytes_sent(self.log.source, n);
            }
            Poll::Ready(Some(Err(_))) => self.failed = true,
            _ => {}
        }
        poll
    }
}

impl<S> Drop for Counting<S> {
    fn drop(&mut self) {
        let l = &self.log;
        if l.source != Source::None && self.bytes > 0 {
            l.telemetry
                .metrics
                .bytes_served
                .get_or_create(&SourceLabels {
                    source: l.source.as_str(),
                })
                .inc_by(self.bytes);
        }
        tracing::info!(
            target: "kagami::request",
            method = l.method,
            uri = %l.uri,
            status = l.status,
            source = l.source.as_str(),
            bytes = self.bytes,
            duration_ms = l.start.elapsed().as_secs_f64() * 1000.0,
            complete = !self.failed,
            request_id = self.request_id.as_deref(),
            "request"
        );
        let Some(path) = &l.path else { return };
        l.telemetry.record_request(crate::telemetry::Finished {
            method: l.method,
            path,
            status: l.status,
            source: l.source,
            bytes: self.bytes,
            duration_ms: l.start.elapsed().as_secs_f64() * 1000.0,
            complete: !self.failed,
            digest: self.digest.take(),
        });
    }
}

pub fn wrap(resp: Response, log: RequestLog) -> Response {
    let (mut parts, body) = resp.into_parts();
    // The counting stream has no size of its own: keep the Content-Length a sized body had.
    if let Some(n) = axum::body::HttpBody::size_hint(&body).exact()
        && !parts
            .headers
            .contains_key(axum::http::header::CONTENT_LENGTH)
    {
        parts
            .headers
            .insert(axum::http::header::CONTENT_LENGTH, n.into());
    }
    let digest = parts
        .headers
        .get("Docker-Content-Digest")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let stream = Counting {
        inner: body.into_data_stream(),
        bytes: 0,
        failed: false,
        log,
        digest,
        request_id: crate::request_id::current(),
    };
    Response::from_parts(parts, Body::from_stream(stream))
}
