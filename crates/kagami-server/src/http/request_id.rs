//! Request ids: every request gets one (the `X-Request-Id` response header, the
//! `detail.request_id` of OCI error bodies, and the log lines that explain a failure).
//! Upstream error text (connection errors, redirect URLs that may be pre-signed, what a
//! registry answered) is logged with the id and never put in a body a client reads: the
//! client gets the id to ask the operator with.
//!
//! [`layer`] is the axum middleware that assigns the id; [`current`] reads it inside the
//! request's task.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;

/// The response header that carries the id.
pub const HEADER: &str = "x-request-id";

tokio::task_local! {
    static REQUEST_ID: String;
}

/// A new id: 8 hex digits fixed for the process (so ids of two runs do not collide in one
/// log), then a counter.
pub fn new_id() -> String {
    static PREFIX: OnceLock<u32> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let prefix = *PREFIX.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        // RandomState is seeded randomly per process; mixed with the pid and the time.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        h.finish() as u32
    });
    format!("{prefix:08x}-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// The id of the request being handled by this task, if any.
pub fn current() -> Option<String> {
    REQUEST_ID.try_with(Clone::clone).ok()
}

/// The id of the request being handled, or a new one for work outside any request (a
/// shared fetch running in its own task); either way the one to log and to show.
pub fn current_or_new() -> String {
    current().unwrap_or_else(new_id)
}

/// Runs `f` under the request id `id` (the one of the request that started it, for work it
/// spawns), or under none.
pub async fn within<F: std::future::Future>(id: Option<String>, f: F) -> F::Output {
    match id {
        Some(id) => REQUEST_ID.scope(id, f).await,
        None => f.await,
    }
}

/// Middleware: gives the request an id, visible to [`current`] while it is handled, and
/// returns it in the `X-Request-Id` header.
pub async fn layer(req: Request, next: Next) -> Response {
    let id = new_id();
    let mut resp = REQUEST_ID.scope(id.clone(), next.run(req)).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(HEADER, v);
    }
    resp
}
