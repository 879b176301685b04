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

/// Deterministic pseudo-random bytes.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Pushes `data` to a real registry as a blob of `repo` (monolithic upload).
async fn push(http: &reqwest::Client, registry: &str, repo: &str, data: Vec<u8>) {
    let d = digest_of(&data);
    let r = http
        .post(format!("http://{registry}/v2/{repo}/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    let loc = if loc.starts_with("http") {
        loc
    } else {
        format!("http://{registry}{loc}")
    };
    let sep = if loc.contains('?') { '&' } else { '?' };
    let r = http
        .put(format!("{loc}{sep}digest={d}"))
        .header("content-type", "application/octet-stream")
        .body(data)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap_or_default());
}

/// A blob GET read slowly (16 KiB at a time, 1 ms apart); returns the status and whether
/// the body was complete and had the digest asked for.
async fn slow_get(addr: SocketAddr, path: String, digest: kagami_config::Digest) -> (u16, bool) {
    use sha2::Digest as _;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: kagami\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let mut hasher = sha2::Sha256::new();
    let mut body = 0usize;
    let mut in_body = false;
    loop {
        let n = s.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        if in_body {
            hasher.update(&buf[..n]);
            body += n;
        } else {
            head.extend_from_slice(&buf[..n]);
            if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                hasher.update(&head[i + 4..]);
                body += head.len() - i - 4;
                head.truncate(i);
                in_body = true;
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let head = String::from_utf8_lossy(&head).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let len: Option<usize> = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(str::to_string)
        })
        .and_then(|v| v.trim().parse().ok());
    let ok =
        Some(body) == len && kagami_config::Digest::sha256_from_bytes(&hasher.finalize()) == digest;
    (status, ok)
}

/// Many distinct cold blobs from a real docker-registry, each to slow clients at once:
/// what the fetches hold in memory (the store's accounting of `--fetch-memory`) never goes
/// over the budget, sampled while they run and by the store's exact peak, and every client
/// still gets every byte, verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_cold_blobs_to_slow_clients_stay_within_the_memory_budget() {
    let dir = tempfile::tempdir().unwrap();
    let registry = kagami_testkit::Registry::start(&dir.path().join("registry"));
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::new();
    let mut blobs = Vec::new();
    for i in 0..12u64 {
        let data = noise(2 * 1024 * 1024 + 4321, 500 + i);
        blobs.push(digest_of(&data));
        push(&http, &registry.addr(), "team/app", data).await;
    }
    let config = Config::parse(
        &format!(
            "mirrors:\n  registry.example.test:\n    endpoint: [\"http://{}\"]\n",
            registry.addr()
        ),
        std::path::Path::new("test.yaml"),
    )
    .unwrap()
    .0;
    let budget = 1024 * 1024;
    let store = Store::open(dir.path().join("store"), StoreOptions::default())
        .await
        .unwrap();
    let options = ServerOptions {
        disable_default_endpoint: true,
        limits: kagami_server::FetchLimits {
            max_fetches: 100,
            fetch_memory: budget,
            ..Default::default()
        },
        ..Default::default()
    };
    let state = AppState::new(
        config,
        store.clone(),
        Arc::new(ClientUpstream::for_mirror()),
        options,
    );
    assert_eq!(store.memory_limit(), Some(budget));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(
        listener,
        router(state.clone()),
        ListenOptions::default(),
        std::future::pending(),
    ));
    let mut clients = Vec::new();
    for d in &blobs {
        for _ in 0..2 {
            let path = format!("/v2/team/app/blobs/{d}?ns=registry.example.test");
            clients.push(tokio::spawn(slow_get(addr, path, d.clone())));
        }
    }
    let mut most = 0u64;
    while clients.iter().any(|c| !c.is_finished()) {
        let used = store.memory_used();
        assert!(
            used <= budget,
            "{used} bytes held, over the budget of {budget}"
        );
        most = most.max(used);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    for c in clients {
        let (status, ok) = tokio::time::timeout(Duration::from_secs(60), c)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(status, 200);
        assert!(ok, "a client got a short or wrong body");
    }
    let peak = store.memory_peak();
    assert!(peak <= budget, "peak {peak} over the budget {budget}");
    assert!(most > 0 && peak > 0, "the fetches held nothing in memory?");
    // Everything given back, and the gauge says so.
    eventually(
        Duration::from_secs(10),
        "the memory to be given back",
        async || match store.memory_used() {
            0 => Ok(()),
            n => Err(format!("{n} bytes still held")),
        },
    )
    .await;
    assert!(
        state
            .metrics_text()
            .contains("kagami_fetch_memory_bytes 0\n"),
        "gauge not at 0"
    );
    // One upstream GET per blob.
    for d in &blobs {
        assert_eq!(registry.count_gets(&d.to_string()), 1, "{d}");
    }
}
