//! Serving an axum application on a TCP listener with limits (axum's own `serve` has no
//! timer: a client that sends half a request head holds its connection, and its file
//! descriptor, for ever):
//!
//! - **header timeout**: a request head must arrive complete within
//!   [`ListenOptions::header_timeout`] of the moment the connection is ready for it: after
//!   it opened, and after each response (so it is also the keep-alive idle timeout).
//!   Otherwise the connection is closed.
//! - **connection cap**: at most [`ListenOptions::max_connections`] connections at once;
//!   one over the cap is accepted and closed at once (a warning is logged at most every
//!   10 s with how many were closed), so that kagami never runs out of file descriptors
//!   for its store and its upstreams.
//! - **write buffer**: a response holds at most [`WRITE_BUFFER`] bytes queued in hyper
//!   besides the chunk being sent (hyper's default is ~400 KiB per connection, which with
//!   many slow clients is most of kagami's memory); the kernel's socket buffer does the
//!   rest. It also bounds a request head.
//! - every request gets a request id ([`crate::request_id::layer`]).
//!
//! HTTP/1.1 only, as containerd and kagami's peers speak to a plain-http mirror.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Limits of a listener.
#[derive(Debug, Clone)]
pub struct ListenOptions {
    /// Time allowed for a request head, counted from when the connection is ready for
    /// one (also the idle time allowed between requests).
    pub header_timeout: Duration,
    /// Connections served at once; more are closed as they arrive.
    pub max_connections: usize,
}

/// What hyper may queue for one connection before it stops taking more of a response body
/// (and the largest request head).
pub const WRITE_BUFFER: usize = 64 * 1024;

/// The default header timeout.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

impl Default for ListenOptions {
    fn default() -> Self {
        ListenOptions {
            header_timeout: HEADER_TIMEOUT,
            max_connections: default_max_connections(),
        }
    }
}

/// Half of the process's soft open-file limit (the rest is for the store, peers and
/// upstream connections), between 64 and 1024; 1024 when the limit cannot be read. 1,024
/// connections of mixed load measured ~150 KiB each (docs/BENCHMARKS.md), which with the
/// fetch budget fits the DaemonSet's 256 Mi.
pub fn default_max_connections() -> usize {
    match open_file_limit() {
        Some(n) => (n / 2).clamp(64, 1024) as usize,
        None => 1024,
    }
}

/// The soft `RLIMIT_NOFILE`, from /proc/self/limits (Linux).
fn open_file_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line["Max open files".len()..].split_whitespace().next()?;
    soft.parse().ok() // "unlimited" gives None
}

/// Serves `app` on `listener` until `shutdown` completes, then stops accepting and waits
/// for the requests in progress (idle connections are closed at once).
pub async fn serve<F>(
    listener: TcpListener,
    app: Router,
    opts: ListenOptions,
    shutdown: F,
) -> std::io::Result<()>
where
    F: Future<Output = ()> + Send,
{
    let app = app.layer(axum::middleware::from_fn(crate::request_id::layer));
    let slots = Arc::new(Semaphore::new(opts.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    let addr = listener.local_addr()?;
    let mut refused: u64 = 0;
    let mut last_warning: Option<Instant> = None;
    let mut last_accept_error: Option<Instant> = None;
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = &mut shutdown => break,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors, most likely: wait a little rather than spin.
                if last_accept_error.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                    tracing::warn!(listen = %addr, error = %e, "cannot accept connections");
                    last_accept_error = Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(tcp);
            refused += 1;
            if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                tracing::warn!(
                    listen = %addr,
                    max_connections = opts.max_connections,
                    closed = refused,
                    "connection limit reached: closing new connections"
                );
                last_warning = Some(Instant::now());
                refused = 0;
            }
            continue;
        };
        // No Nagle: a blob in flight is sent as it arrives, and a short segment must not
        // wait for the client's delayed ACK.
        let _ = tcp.set_nodelay(true);
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(opts.header_timeout)
            .max_buf_size(WRITE_BUFFER)
            .keep_alive(true);
        let conn =
            builder.serve_connection(TokioIo::new(tcp), TowerToHyperService::new(app.clone()));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection closed");
            }
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn open_file_limit_is_read() {
        // Linux always has the line; the test machine's limit is a number.
        let n = super::open_file_limit().expect("Max open files in /proc/self/limits");
        assert!(n > 0);
        let d = super::default_max_connections();
        assert!((64..=1024).contains(&d), "{d}");
    }
}
