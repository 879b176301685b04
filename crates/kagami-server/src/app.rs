//! The router, the shared state and request dispatch.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::future::{BoxFuture, Shared};
use kagami_config::{Config, Digest, PlanOptions};
use kagami_store::Store;

use crate::service::blobs::Fetch;
use crate::service::error::ApiError;
use crate::service::manifests::Revalidation;
use crate::path::{self, Target};
use crate::telemetry::Telemetry;
use crate::telemetry::metrics::RequestLabels;
use crate::upstream::Upstream;

/// (registry, repository, tag).
pub(crate) type TagKey = (String, String, String);
/// A tag revalidation in flight, awaited by every request for that tag.
pub(crate) type SharedRevalidation = Shared<BoxFuture<'static, Revalidation>>;

/// Settings of a running server.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// How long a resolved tag is served without asking upstream again.
    pub tag_ttl: Duration,
    pub disable_default_endpoint: bool,
    /// The registry of requests that name none (no `ns`, no registry in the path), as
    /// dockerd's `registry-mirrors` sends them; `None` refuses them.
    pub default_registry: Option<String>,
    /// Bounds on blob fetches and revalidations (`crate::service::blobs::FetchLimits`).
    pub limits: crate::service::blobs::FetchLimits,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            tag_ttl: Duration::from_secs(300),
            disable_default_endpoint: false,
            default_registry: Some(kagami_config::endpoint::DOCKER_HUB.to_string()),
            limits: Default::default(),
        }
    }
}

/// Everything a request handler needs. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub config: RwLock<Arc<Config>>,
    pub store: Store,
    pub upstream: Arc<dyn Upstream>,
    pub options: ServerOptions,
    /// Metrics, the status recorder and the refusal log: every count goes through it.
    pub telemetry: Arc<Telemetry>,
    /// Blob fetches in flight, shared by every request for the same digest.
    pub fetches: Mutex<HashMap<crate::service::blobs::FetchKey, Arc<Fetch>>>,
    /// What fetches may hold at once (count and memory).
    pub fetch_budget: crate::service::blobs::Budget,
    /// Blob sizes named by the manifests served, by (registry, digest).
    pub descriptor_sizes: Mutex<HashMap<(String, Digest), u64>>,
    /// Tag revalidations in flight, by (registry, repository, tag).
    pub revalidations: Mutex<HashMap<TagKey, SharedRevalidation>>,
    /// Set while the store refuses writes (disk full): cold blobs pass through uncached.
    pub store_full_until: Mutex<Option<Instant>>,
    pub ready: AtomicBool,
    /// Other nodes, when P2P is on.
    pub peers: std::sync::OnceLock<Arc<crate::peers::Peers>>,
    /// This node's P2P identity and addresses, when P2P is on.
    pub node_info: std::sync::OnceLock<crate::http::peer_api::NodeInfo>,
    /// The node's containerd as a source of content for peers, when sharing it is on.
    #[cfg(feature = "containerd")]
    pub containerd: std::sync::OnceLock<Arc<crate::containerd::ContainerdContent>>,
    /// The admin routes' credential, when they are on (see `crate::admin`).
    pub admin: std::sync::OnceLock<crate::admin::Admin>,
}

impl AppState {
    pub fn new(
        config: Config,
        store: Store,
        upstream: Arc<dyn Upstream>,
        options: ServerOptions,
    ) -> AppState {
        let fetch_budget = crate::service::blobs::Budget::new(&options.limits);
        AppState {
            inner: Arc::new(Inner {
                config: RwLock::new(Arc::new(config)),
                store,
                upstream,
                options,
                telemetry: Arc::new(Telemetry::new()),
                fetches: Mutex::new(HashMap::new()),
                fetch_budget,
                descriptor_sizes: Mutex::new(HashMap::new()),
                revalidations: Mutex::new(HashMap::new()),
                store_full_until: Mutex::new(None),
                ready: AtomicBool::new(true),
                peers: std::sync::OnceLock::new(),
                node_info: std::sync::OnceLock::new(),
                #[cfg(feature = "containerd")]
                containerd: std::sync::OnceLock::new(),
                admin: std::sync::OnceLock::new(),
            }),
        }
    }

    /// Replaces the configuration (reload); requests in progress keep the one they started with.
    pub fn set_config(&self, config: Config) {
        *self.inner.config.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(config);
    }

    pub fn config(&self) -> Arc<Config> {
        self.inner.config.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Turns on sharing between nodes (once, at start).
    pub fn set_peers(&self, peers: Arc<crate::peers::Peers>, node: crate::http::peer_api::NodeInfo) {
        let _ = peers
            .lookup_seconds
            .set(self.inner.telemetry.metrics.peer_lookup_seconds.clone());
        let _ = self.inner.peers.set(peers);
        let _ = self.inner.node_info.set(node);
    }

    pub fn peers(&self) -> Option<&Arc<crate::peers::Peers>> {
        self.inner.peers.get()
    }

    /// Shares the images of the node's containerd with other nodes (once, at start; see
    /// [`crate::containerd::start`]).
    #[cfg(feature = "containerd")]
    pub fn set_containerd(&self, content: Arc<crate::containerd::ContainerdContent>) {
        let _ = self.inner.containerd.set(content);
    }

    #[cfg(feature = "containerd")]
    pub fn containerd(&self) -> Option<&Arc<crate::containerd::ContainerdContent>> {
        self.inner.containerd.get()
    }

    /// What `/status` remembers; `status().set_listen(..)` names the listen address.
    pub fn status(&self) -> &crate::status::Status {
        &self.inner.telemetry.status
    }

    pub(crate) fn telemetry(&self) -> &Telemetry {
        &self.inner.telemetry
    }

    pub fn set_ready(&self, ready: bool) {
        self.inner.ready.store(ready, Ordering::SeqCst);
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub fn metrics_text(&self) -> String {
        let m = &self.inner.telemetry.metrics;
        let usage = self.inner.store.usage();
        m.store_bytes.set(usage.bytes as i64);
        m.store_blobs.set(usage.blobs as i64);
        m.evictions
            .inner()
            .store(usage.evictions, Ordering::Relaxed);
        // The P2P counters live in `Peers` (what /p2p/status and /status read); the
        // metrics show the same numbers.
        if let Some(p) = self.peers() {
            m.peer_lookups
                .inner()
                .store(p.lookups.load(Ordering::Relaxed), Ordering::Relaxed);
            m.peer_lookup_hits
                .inner()
                .store(p.lookup_hits.load(Ordering::Relaxed), Ordering::Relaxed);
            let received = p.received.lock().unwrap_or_else(|e| e.into_inner()).clone();
            // Peers past the label budget are added up under `other`.
            let mut by_label: HashMap<String, u64> = HashMap::new();
            for (peer, bytes) in received {
                *by_label.entry(m.peer_labels.label(&peer)).or_default() += bytes;
            }
            for (peer, bytes) in by_label {
                m.peer_received
                    .get_or_create(&crate::telemetry::metrics::PeerLabels { peer })
                    .inner()
                    .store(bytes, Ordering::Relaxed);
            }
        }
        m.encode()
    }

    pub(crate) fn plan_options(&self) -> PlanOptions {
        PlanOptions {
            disable_default_endpoint: self.inner.options.disable_default_endpoint,
        }
    }
}

/// The whole HTTP application: the OCI pull API plus health and metrics.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/p2p/status", get(p2p_status))
        .route("/status", get(crate::status::html))
        .route("/status.json", get(crate::status::json))
        .route(
            crate::service::import::IMPORT_PATH,
            axum::routing::post(crate::service::import::route),
        )
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

pub use crate::origin::Source;

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
    crate::http::log::wrap(
        resp,
        crate::http::log::RequestLog {
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
        let mut r = Response::new(Body::from("{}"));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        return ("base", Ok((r, Source::None)));
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
    match &parsed.target {
        Target::Blob(d) => {
            let d = d.clone();
            (
                "blob",
                crate::service::blobs::get(state, &config, &parsed, &d, range.as_deref(), is_head).await,
            )
        }
        Target::Manifest(r) => {
            let r = r.clone();
            (
                "manifest",
                crate::service::manifests::get(state, &config, &parsed, &r, is_head).await,
            )
        }
        Target::TagsList => (
            "tags",
            crate::service::manifests::tags_list(state, &config, &parsed, &query).await,
        ),
    }
}

/// The answer to a probe that kagami would serve.
fn probe_answer(path: &path::OciPath) -> Response {
    let body = serde_json::json!({"registry": path.registry, "repository": path.repository});
    let mut r = Response::new(Body::from(body.to_string()));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut().insert(
        crate::telemetry::refusals::PROBE_HEADER,
        HeaderValue::from_static("accepted"),
    );
    r
}
