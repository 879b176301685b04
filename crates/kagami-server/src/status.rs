//! The status view over HTTP: `/status` (the HTML page of [`crate::ui`]) and `/status.json`
//! (the same [`Report`], for `kagami status` and tests). The numbers come from
//! [`crate::telemetry`]; this module only gathers what the report needs from the app state
//! (store usage, P2P members) and answers.
//!
//! The report model and its formatting helpers are re-exported here, so that
//! `kagami_server::status::Report` and friends keep resolving.

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::Response;

use crate::app::AppState;
use crate::telemetry::ReportInputs;

pub use crate::report::format::*;
pub use crate::report::*;
pub use crate::telemetry::Recorder;

/// Builds the report. `address` is the Host the page was asked for.
pub fn report(state: &AppState, address: Option<&str>) -> Report {
    let inner = &state.inner;
    let usage = inner.store.usage();
    let node_info = inner.node_info.get();
    let mut report = inner.telemetry.report(ReportInputs {
        address,
        store: StoreInfo {
            bytes: usage.bytes,
            blobs: usage.blobs,
            evictions: usage.evictions,
            writing: usage.in_flight,
            max_bytes: inner.store.max_size(),
        },
        peers_enabled: state.peers().is_some(),
        members: state
            .peers()
            .map(|p| p.router.members())
            .unwrap_or_default(),
        peer_id: node_info.map(|n| n.peer_id.clone()),
        p2p_addrs: node_info.map(|n| n.addrs.clone()).unwrap_or_default(),
        endpoint_health: state.endpoint_health(),
        #[cfg(feature = "containerd")]
        containerd: state.containerd().map(|c| c.info()),
        #[cfg(not(feature = "containerd"))]
        containerd: None,
        warm: state.services().warm.report(),
    });
    report.pinned = state.pinned();
    report
}

fn host(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| !h.is_empty())
}

fn respond(body: String, content_type: &'static str) -> Response {
    let mut r = Response::new(Body::from(body));
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// `GET /status`: the HTML page.
pub async fn html(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let report = report(&state, host(&headers));
    let mut r = respond(crate::ui::render_html(&report), "text/html; charset=utf-8");
    r.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'; img-src data:"),
    );
    r
}

/// `GET /status.json`: the same data as JSON.
pub async fn json(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let report = report(&state, host(&headers));
    respond(
        serde_json::to_string_pretty(&report).expect("serialisable"),
        "application/json",
    )
}
