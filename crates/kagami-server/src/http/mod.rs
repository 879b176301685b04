//! The HTTP layer: the only part of the server that knows axum. The router and its
//! middleware; [`dispatch`] parses a request once into a
//! [`RequestContext`](crate::service::RequestContext) (path, plan, range, HEAD), calls a
//! service and turns its typed reply or error into a response in one place ([`reply`]);
//! the request log ([`log`]), the peer API ([`peer_api`]) and the admin routes
//! ([`import`], [`warm`]). Handlers get the [`AppState`] (the composition root); services never do.

use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::app::AppState;
use crate::origin::Source;
use crate::path::{self, Target};
use crate::service::RequestContext;
use crate::service::error::ApiError;
use crate::service::reply::BlobReply;
use crate::telemetry::metrics::RequestLabels;

pub(crate) mod import;
pub mod listener;
pub(crate) mod log;
pub mod peer_api;
pub(crate) mod purge;
pub(crate) mod reply;
pub mod request_id;
pub(crate) mod warm;

/// The whole HTTP application: the OCI pull API plus health and metrics.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/p2p/status", get(p2p_status))
        .route("/status", get(crate::status::html))
        .route("/status.json", get(crate::status::json))
        .route(import::IMPORT_PATH, axum::routing::post(import::route))
        .route(warm::WARM_PATH, get(warm::progress).post(warm::route))
        .route(purge::PURGE_PATH, axum::routing::post(purge::route))
        .fallback(dispatch)
        .layer(axum::middleware::from_fn(limit_headers))
        .with_state(state)
}

/// Total size of request headers kagami accepts; clients send a few hundred bytes.
const MAX_HEADER_BYTES: usize = 16 * 1024;

async fn limit_headers(req: Request, next: axum::middleware::Next) -> Response {
    let size: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum::<usize>()
        + req.uri().to_string().len();
    if size > MAX_HEADER_BYTES {
        let mut r = ApiError::name_invalid(format!(
            "request headers of {size} bytes exceed the limit of {MAX_HEADER_BYTES}"
        ))
        .into_response();
        *r.status_mut() = StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE;
        return r;
    }
    next.run(req).await
}

/// The liveness probe: `ok`, unless containerd's content is shared and containerd has been
/// unreachable past its health timeout (a stale socket mount: a restart fixes it).
#[cfg_attr(not(feature = "containerd"), allow(unused_variables))]
async fn healthz(State(state): State<AppState>) -> Response {
    #[cfg(feature = "containerd")]
    if let Some(why) = state.containerd().and_then(|c| c.unhealthy()) {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response();
    }
    "ok\n".into_response()
}

async fn readyz(State(state): State<AppState>) -> Response {
    if state.inner.ready.load(Ordering::SeqCst) {
        "ready\n".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response()
    }
}

async fn p2p_status(State(state): State<AppState>) -> Response {
    let usage = state.store().usage();
    let mut v = match state.peers() {
        Some(p) => p.status(),
        None => serde_json::json!({"enabled": false}),
    };
    v["enabled"] = serde_json::Value::Bool(state.peers().is_some());
    v["node"] = state
        .inner
        .node_info
        .get()
        .map_or(serde_json::Value::Null, |n| serde_json::json!(n));
    v["store"] = serde_json::json!({"blobs": usage.blobs, "bytes": usage.bytes});
    #[cfg(feature = "containerd")]
    if let Some(c) = state.containerd() {
        v["containerd"] = c.status();
    }
    let mut r = Response::new(Body::from(v.to_string()));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

async fn metrics(State(state): State<AppState>) -> Response {
    let mut resp = state.metrics_text().into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    resp
}

async fn dispatch(State(state): State<AppState>, req: Request) -> Response {
    let start = Instant::now();
    let method = req.method().clone();
    let uri = req.uri().clone();
    let mut parsed = None;
    let (route, result) = route(&state, req, &mut parsed).await;
    let (mut resp, source) = match result {
        Ok(r) => r,
        Err(e) => {
            let refused = e.refusal.map(|r| (r, e.status.as_u16(), e.message.clone()));
            let mut resp = e.into_response();
            if let Some((reason, status, message)) = refused {
                let r = crate::telemetry::refusals::Refused {
                    registry: parsed.as_ref().map(|p: &path::OciPath| p.registry.as_str()),
                    reason,
                    status,
                    message: &message,
                };
                state.telemetry().refused(r, &method, &uri);
                resp.headers_mut().insert(
                    crate::telemetry::refusals::HEADER,
                    HeaderValue::from_static(reason),
                );
            }
            (resp, Source::None)
        }
    };
    let status = resp.status().as_u16();
    let method_label = match method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        _ => "other",
    };
    state
        .telemetry()
        .metrics
        .requests
        .get_or_create(&RequestLabels {
            route,
            method: method_label,
            status,
        })
        .inc();
    resp.headers_mut().insert(
        "Docker-Distribution-API-Version",
        HeaderValue::from_static("registry/2.0"),
    );
    // The body may still be streaming: the log line is written when it ends.
    log::wrap(
        resp,
        log::RequestLog {
            method: method_label,
            uri: uri.to_string(),
            status,
            source,
            start,
            path: parsed,
            telemetry: state.inner.telemetry.clone(),
        },
    )
}

type Handled = Result<(Response, Source), ApiError>;

/// A blob reply as a response, with where its bytes came from.
fn blob_answer(r: Result<BlobReply, ApiError>) -> Handled {
    r.map(|r| {
        let source = r.source();
        (reply::blob(r), source)
    })
}

/// Handles one request; `seen` is set to the request's parsed path once that is known.
async fn route(
    state: &AppState,
    req: Request,
    seen: &mut Option<path::OciPath>,
) -> (&'static str, Handled) {
    let path = req.uri().path().to_string();
    let is_head = req.method() == Method::HEAD;
    if req.method() != Method::GET && !is_head {
        return (
            "other",
            Err(ApiError::unsupported("kagami is a pull-only mirror")),
        );
    }
    if path == "/v2" || path == "/v2/" {
        return ("base", Ok((reply::json("{}"), Source::None)));
    }
    if !path.starts_with("/v2/") {
        return ("other", Err(ApiError::not_found("not found")));
    }
    let default = state.inner.options.default_registry.as_deref();
    let (parsed, query) = match path::parse_uri(req.uri(), default) {
        Ok(p) => p,
        Err(e) => return ("invalid", Err(e)),
    };
    *seen = Some(parsed.clone());
    let config = state.config();
    if config.mirror_for(&parsed.registry).is_none() {
        return (
            "unserved",
            Err(ApiError::name_unknown(format!(
                "registry {} is not served by this mirror (no mirrors entry and no \"*\")",
                parsed.registry
            ))
            .refused("registry_not_served")),
        );
    }
    if req
        .headers()
        .contains_key(crate::telemetry::refusals::PROBE_HEADER)
    {
        return ("probe", Ok((probe_answer(&parsed), Source::None)));
    }
    let range = req
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let ctx = RequestContext::new(parsed, config, state.plan_options(), range, is_head);
    let services = state.services();
    match &ctx.path.target {
        Target::Blob(d) => ("blob", blob_answer(services.blobs.get(&ctx, d).await)),
        Target::Manifest(r) => (
            "manifest",
            services.manifests.get(&ctx, r).await.map(|r| {
                let source = r.source;
                (reply::manifest(r), source)
            }),
        ),
        Target::TagsList => (
            "tags",
            services.tags.list(&ctx, &query).await.map(|r| {
                let source = r.source;
                (reply::tags(&ctx.path, r), source)
            }),
        ),
        Target::Referrers(d) => (
            "referrers",
            services
                .referrers
                .list(&ctx, d, query.get("artifactType"))
                .await
                .map(|r| {
                    let source = r.source;
                    (reply::referrers(r), source)
                }),
        ),
    }
}

/// The answer to a probe that kagami would serve.
fn probe_answer(path: &path::OciPath) -> Response {
    let body = serde_json::json!({"registry": path.registry, "repository": path.repository});
    let mut r = reply::json(body.to_string());
    r.headers_mut().insert(
        crate::telemetry::refusals::PROBE_HEADER,
        HeaderValue::from_static("accepted"),
    );
    r
}

/// The start of every admin route: the admin token checked (401 without it, 403 when the
/// admin routes are off), then the JSON body read as a `T` — else 400 with `code`, showing
/// the `expected` shape.
pub(crate) fn admin_request<T: serde::de::DeserializeOwned>(
    state: &AppState,
    headers: &axum::http::HeaderMap,
    body: &[u8],
    code: &'static str,
    expected: &str,
) -> Result<T, ApiError> {
    if let Err(e) = crate::admin::check(state, headers) {
        tracing::warn!(error = %e.message, "admin request refused");
        return Err(e);
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            code,
            format!("expected {expected}: {e}"),
        )
    })
}
