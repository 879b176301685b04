//! What a client of the mirror can make kagami reach, and what it learns: the real
//! upstream client (`ClientUpstream::for_mirror`) against an in-test registry on
//! 127.0.0.1 (a fake, for the misbehaviour), served by `listener::serve` as `kagami serve`
//! does. And the listener's limits: half-sent request heads, the connection cap.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::common::{digest_of, eventually, request};
use axum::body::Body;
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use kagami_config::Config;
use kagami_server::client_upstream::ClientUpstream;
use kagami_server::listener::{ListenOptions, serve};
use kagami_server::{AppState, ServerOptions, router};
use kagami_store::{Store, StoreOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CONFIG_JSON: &str = "{}";

fn manifest() -> String {
    format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[]}}"#,
        digest_of(CONFIG_JSON.as_bytes()),
        CONFIG_JSON.len()
    )
}

/// A registry on 127.0.0.1 that counts requests. `/v2/team/app/manifests/1` is a
/// manifest; `/v2/signed/...` redirects to a dead port with a secret in the query;
/// `/v2/file/...` redirects to a file: URL; `/v2/chatty/...` answers 500 with a body.
struct Upstream {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
}

async fn upstream(dead: u16) -> Upstream {
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let app = axum::Router::new().fallback(move |uri: Uri| {
        let h = h.clone();
        async move {
            h.fetch_add(1, Ordering::SeqCst);
            let path = uri.path();
            if path.starts_with("/v2/signed/") {
                return Response::builder()
                    .status(StatusCode::TEMPORARY_REDIRECT)
                    .header(
                        header::LOCATION,
                        format!("http://127.0.0.1:{dead}/bucket/m?X-Amz-Signature=SECRETSIG"),
                    )
                    .body(Body::empty())
                    .unwrap();
            }
            if path.starts_with("/v2/file/") {
                return Response::builder()
                    .status(StatusCode::TEMPORARY_REDIRECT)
                    .header(header::LOCATION, "file:///etc/passwd")
                    .body(Body::empty())
                    .unwrap();
            }
            if path.starts_with("/v2/chatty/") {
                return (StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL-UPSTREAM-TEXT")
                    .into_response();
            }
            let m = manifest();
            let by_digest = format!("/v2/team/app/manifests/{}", digest_of(m.as_bytes()));
            if path == "/v2/team/app/manifests/1" || path == by_digest {
                let r = Response::builder()
                    .header(
                        header::CONTENT_TYPE,
                        "application/vnd.oci.image.manifest.v1+json",
                    )
                    .header("Docker-Content-Digest", digest_of(m.as_bytes()).to_string())
                    .header(header::CONTENT_LENGTH, m.len());
                return r.body(Body::from(m)).unwrap();
            }
            StatusCode::NOT_FOUND.into_response()
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Upstream { addr, hits }
}

/// A port nothing listens on.
fn dead_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

struct Mirror {
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

/// kagami with the real upstream client, `config`, and the listener's limits.
async fn mirror_with(config: Config, opts: ListenOptions) -> Mirror {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("store"), StoreOptions::default())
        .await
        .unwrap();
    let state = AppState::new(
        config,
        store,
        Arc::new(ClientUpstream::for_mirror()),
        ServerOptions::default(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, router(state), opts, std::future::pending()));
    Mirror { addr, _dir: dir }
}

async fn mirror(yaml: &str) -> Mirror {
    let config = Config::parse(yaml, std::path::Path::new("test.yaml"))
        .unwrap()
        .0;
    mirror_with(config, ListenOptions::default()).await
}

fn text(body: &[u8]) -> String {
    String::from_utf8_lossy(body).into_owned()
}

/// Through `"*"` a client names the registry: kagami must not connect to a loopback IP
/// literal, nor to a name that resolves to loopback (`localhost`, checked at connect
/// time), and must not tell the client what it found there.
#[tokio::test(flavor = "multi_thread")]
async fn star_does_not_reach_loopback_or_ip_literals() {
    let up = upstream(dead_port()).await;
    let m = mirror("mirrors:\n  \"*\":\n").await;
    let port = up.addr.port();
    for registry in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("127.1.2.3:{port}"),
    ] {
        let path = format!("/v2/team/app/manifests/1?ns={registry}");
        let (status, h, body, _) = request(m.addr, "GET", &path, &[]).await;
        assert_eq!(status, 404, "{registry}: {}", text(&body));
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let msg = v["errors"][0]["message"].as_str().unwrap();
        assert!(msg.contains("refused"), "{registry}: {msg}");
        assert!(!msg.contains("os error"), "{msg}");
        // The request id in the body is the one in the header.
        assert_eq!(
            v["errors"][0]["detail"]["request_id"].as_str(),
            Some(h["x-request-id"].as_str()),
            "{v}"
        );
        // The same through the path form: /v2/<registry>/<repo>/...
        let path = format!("/v2/{registry}/team/app/manifests/1");
        let (status, _, body, _) = request(m.addr, "GET", &path, &[]).await;
        assert_eq!(status, 404, "{registry}: {}", text(&body));
    }
    assert_eq!(
        up.hits.load(Ordering::SeqCst),
        0,
        "kagami reached the loopback registry"
    );
}

/// A mirrors entry that names the loopback registry is the operator's choice: allowed.
#[tokio::test(flavor = "multi_thread")]
async fn a_named_loopback_registry_is_reached() {
    let up = upstream(dead_port()).await;
    let reg = up.addr.to_string();
    let m = mirror(&format!("mirrors:\n  \"*\":\n  \"{reg}\":\n")).await;
    let (status, _, body, _) = request(
        m.addr,
        "GET",
        &format!("/v2/team/app/manifests/1?ns={reg}"),
        &[],
    )
    .await;
    assert_eq!(status, 200, "{}", text(&body));
    assert_eq!(body, manifest().as_bytes());
    assert!(up.hits.load(Ordering::SeqCst) > 0);
    // So is a loopback endpoint listed under "*": the file names it.
    let m = mirror(&format!(
        "mirrors:\n  \"*\":\n    endpoint: [\"http://{reg}\"]\n"
    ))
    .await;
    let (status, _, body, _) = request(
        m.addr,
        "GET",
        "/v2/team/app/manifests/1?ns=registry.example.test",
        &[],
    )
    .await;
    assert_eq!(status, 200, "{}", text(&body));
}

/// The embedded default names public registries; a loopback one is not served at all.
#[tokio::test(flavor = "multi_thread")]
async fn embedded_default_serves_no_client_chosen_registry() {
    let up = upstream(dead_port()).await;
    let m = mirror_with(Config::embedded_default(), ListenOptions::default()).await;
    let (status, _, body, _) = request(
        m.addr,
        "GET",
        &format!("/v2/team/app/manifests/1?ns={}", up.addr),
        &[],
    )
    .await;
    assert_eq!(status, 404, "{}", text(&body));
    assert!(text(&body).contains("NAME_UNKNOWN"), "{}", text(&body));
    assert_eq!(up.hits.load(Ordering::SeqCst), 0);
}

/// Error bodies carry no upstream text: not the connection error (a port scanner), not
/// a redirect URL (it may be pre-signed), not what the registry answered; a request id
/// instead.
#[tokio::test(flavor = "multi_thread")]
async fn error_bodies_carry_no_upstream_text() {
    let dead = dead_port();
    let up = upstream(dead).await;
    let m = mirror(&format!(
        "mirrors:\n  registry.example.test:\n    endpoint: [\"http://{}\"]\n  dead.example.test:\n    endpoint: [\"http://127.0.0.1:{dead}\"]\n",
        up.addr
    ))
    .await;
    for (path, must_not) in [
        ("/v2/team/app/manifests/1?ns=dead.example.test", "os error"),
        ("/v2/team/app/manifests/1?ns=dead.example.test", "refused"),
        (
            "/v2/signed/app/manifests/1?ns=registry.example.test",
            "SECRETSIG",
        ),
        (
            "/v2/signed/app/manifests/1?ns=registry.example.test",
            "bucket",
        ),
        (
            "/v2/chatty/app/manifests/1?ns=registry.example.test",
            "INTERNAL-UPSTREAM-TEXT",
        ),
    ] {
        let (status, h, body, _) = request(m.addr, "GET", path, &[]).await;
        assert_eq!(status, 404, "{path}");
        let body = text(&body);
        assert!(!body.contains(must_not), "{path}: {must_not:?} in {body}");
        let id = &h["x-request-id"];
        assert!(
            body.contains(id.as_str()),
            "{path}: request id {id} not in {body}"
        );
    }
}

/// Redirects go to http(s) only.
#[tokio::test(flavor = "multi_thread")]
async fn redirect_to_a_file_url_is_refused() {
    let up = upstream(dead_port()).await;
    let m = mirror(&format!(
        "mirrors:\n  registry.example.test:\n    endpoint: [\"http://{}\"]\n",
        up.addr
    ))
    .await;
    let (status, _, body, _) = request(
        m.addr,
        "GET",
        "/v2/file/app/manifests/1?ns=registry.example.test",
        &[],
    )
    .await;
    assert_eq!(status, 404);
    let body = text(&body);
    assert!(body.contains("refused"), "{body}");
    assert!(!body.contains("passwd"), "{body}");
}

/// Opens a connection and sends half a request head.
async fn half_open(addr: SocketAddr) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: kagami\r\nX-Slow: ")
        .await
        .unwrap();
    s
}

/// True when the server closed the connection (EOF or reset) before `deadline`.
async fn closed_by(s: &mut tokio::net::TcpStream, deadline: Instant) -> bool {
    let mut buf = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // A 408 or similar before the close is fine.
            Ok(Ok(_)) => continue,
        }
    }
}

async fn healthz(addr: SocketAddr) -> u16 {
    request(addr, "GET", "/healthz", &[]).await.0
}

/// A half-sent request head is dropped after the header timeout; meanwhile, and with
/// many such connections open, /healthz answers.
#[tokio::test(flavor = "multi_thread")]
async fn half_sent_headers_are_dropped_and_healthz_keeps_answering() {
    let m = mirror_with(
        Config::default(),
        ListenOptions {
            header_timeout: Duration::from_millis(500),
            max_connections: 400,
        },
    )
    .await;
    let mut slow = Vec::new();
    for _ in 0..300 {
        slow.push(half_open(m.addr).await);
    }
    for _ in 0..5 {
        assert_eq!(healthz(m.addr).await, 200);
    }
    // 10 times the timeout: a bound on waiting, not a measurement.
    let deadline = Instant::now() + Duration::from_secs(5);
    for (i, s) in slow.iter_mut().enumerate() {
        assert!(closed_by(s, deadline).await, "connection {i} still open");
    }
    assert_eq!(healthz(m.addr).await, 200);
}

/// An idle keep-alive connection is closed after the same timeout.
#[tokio::test(flavor = "multi_thread")]
async fn idle_keep_alive_connection_is_closed() {
    let m = mirror_with(
        Config::default(),
        ListenOptions {
            header_timeout: Duration::from_millis(500),
            max_connections: 16,
        },
    )
    .await;
    let mut s = tokio::net::TcpStream::connect(m.addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: kagami\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert!(
        text(&buf[..n]).starts_with("HTTP/1.1 200"),
        "{}",
        text(&buf[..n])
    );
    assert!(closed_by(&mut s, Instant::now() + Duration::from_secs(5)).await);
}

/// Over the cap, new connections are closed at once (the header timeout here is far
/// longer than the wait); when held ones go away, /healthz answers again.
#[tokio::test(flavor = "multi_thread")]
async fn connections_over_the_cap_are_closed() {
    let m = mirror_with(
        Config::default(),
        ListenOptions {
            header_timeout: Duration::from_secs(60),
            max_connections: 20,
        },
    )
    .await;
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(half_open(m.addr).await);
    }
    let mut over = half_open(m.addr).await;
    assert!(
        closed_by(&mut over, Instant::now() + Duration::from_secs(5)).await,
        "a connection over the cap stayed open"
    );
    assert_ne!(healthz(m.addr).await, 200, "served over the cap");
    drop(held);
    eventually(
        Duration::from_secs(10),
        "/healthz to answer again",
        async || healthz(m.addr).await == 200,
    )
    .await;
}
