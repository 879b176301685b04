//! Upstream rate limits and circuits (docs/serve.md, "Rate limits and unhealthy
//! endpoints"), through the real upstream client (`ClientUpstream`) with one endpoint
//! health for the whole server, on a clock the test moves (no test waits for a back-off):
//! a fake registry answering `429` with `Retry-After` (fault injection), and a real
//! docker-registry stopped by PID and started again on the same port, reached through a
//! proxy that counts connections.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, StatusCode, Uri, header};
use axum::response::Response;
use kagami_client::health::ManualClock;
use kagami_client::{Health, HealthPolicy};
use kagami_server::ServerOptions;
use kagami_server::client_upstream::ClientUpstream;

use crate::common::{Server, digest_of, eventually, request, serve};

const CONFIG_JSON: &str = r#"{"architecture":"amd64","os":"linux"}"#;

fn manifest(tag: &str) -> String {
    format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[],"annotations":{{"tag":"{tag}"}}}}"#,
        digest_of(CONFIG_JSON.as_bytes()),
        CONFIG_JSON.len()
    )
}

/// A registry serving the manifests of tags `1` and `2` of `team/app`, counting requests;
/// while `limited`, it answers everything `429` with `Retry-After: 3600`.
struct Fake {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    limited: Arc<AtomicBool>,
}

async fn fake(limited: bool) -> Fake {
    let hits = Arc::new(AtomicUsize::new(0));
    let limited = Arc::new(AtomicBool::new(limited));
    let (h, l) = (hits.clone(), limited.clone());
    let app = axum::Router::new().fallback(move |method: Method, uri: Uri| {
        let (h, l) = (h.clone(), l.clone());
        async move {
            h.fetch_add(1, Ordering::SeqCst);
            if l.load(Ordering::SeqCst) {
                return Response::builder()
                    .status(StatusCode::TOO_MANY_REQUESTS)
                    .header(header::RETRY_AFTER, "3600")
                    .body(Body::from(
                        r#"{"errors":[{"code":"TOOMANYREQUESTS","message":"pull rate limit"}]}"#,
                    ))
                    .unwrap();
            }
            for tag in ["1", "2"] {
                let m = manifest(tag);
                let d = digest_of(m.as_bytes());
                let path = uri.path();
                if path == format!("/v2/team/app/manifests/{tag}")
                    || path == format!("/v2/team/app/manifests/{d}")
                {
                    let r = Response::builder()
                        .header(
                            header::CONTENT_TYPE,
                            "application/vnd.oci.image.manifest.v1+json",
                        )
                        .header("Docker-Content-Digest", d.to_string())
                        .header(header::CONTENT_LENGTH, m.len());
                    let body = if method == Method::HEAD {
                        Body::empty()
                    } else {
                        Body::from(m)
                    };
                    return r.body(body).unwrap();
                }
            }
            Response::builder()
                .status(StatusCode::NOT_FOUND)
                .body(Body::empty())
                .unwrap()
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    Fake {
        addr,
        hits,
        limited,
    }
}

/// A server of `registry.example.test` through `endpoints` (no default endpoint), whose
/// endpoint health reads `clock`; tags are revalidated on every request.
async fn server(endpoints: &[String], clock: Arc<ManualClock>) -> (Server<ClientUpstream>, Health) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let health = Health::with_clock(
        HealthPolicy {
            failures_to_open: 3,
            ..Default::default()
        },
        clock,
    );
    let list: Vec<String> = endpoints
        .iter()
        .map(|e| format!("\"http://{e}\""))
        .collect();
    let yaml = format!(
        "mirrors:\n  registry.example.test:\n    endpoint: [{}]\n",
        list.join(", ")
    );
    let options = ServerOptions {
        tag_ttl: Duration::ZERO,
        disable_default_endpoint: true,
        ..Default::default()
    };
    let up = ClientUpstream::for_mirror_with(health.clone());
    (serve(up, &yaml, None, options).await, health)
}

fn tag_path(tag: &str) -> String {
    format!("/v2/team/app/manifests/{tag}?ns=registry.example.test")
}

async fn get(s: &Server<ClientUpstream>, path: &str) -> (u16, String) {
    let (status, _, body, _) = request(s.addr, "GET", path, &[]).await;
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The `/status.json` entry of `endpoint`.
async fn endpoint_status(s: &Server<ClientUpstream>, endpoint: &str) -> serde_json::Value {
    let (status, body) = get(s, "/status.json").await;
    assert_eq!(status, 200);
    let r: serde_json::Value = serde_json::from_str(&body).unwrap();
    r["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["endpoint"] == endpoint)
        .cloned()
        .unwrap_or_else(|| panic!("{endpoint} not on /status.json: {}", r["endpoints"]))
}

/// The value of the `/metrics` sample `series{labels}` (0 when absent).
async fn metric(s: &Server<ClientUpstream>, series: &str, labels: &str) -> f64 {
    let (_, text) = get(s, "/metrics").await;
    let line = format!("{series}{{{labels}}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&line))
        .map_or(0.0, |v| v.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_mirror_is_skipped_until_its_retry_after_then_used_again() {
    let clock = Arc::new(ManualClock::default());
    let (a, b) = (fake(true).await, fake(false).await);
    let (s, _) = server(&[a.addr.to_string(), b.addr.to_string()], clock.clone()).await;
    let ea = format!("http://{}/v2", a.addr);

    // The first mirror answers 429: the second one serves, and the first is left alone.
    let (status, body) = get(&s, &tag_path("1")).await;
    assert_eq!((status, body.as_str()), (200, manifest("1").as_str()));
    assert_eq!(
        a.hits.load(Ordering::SeqCst),
        1,
        "one request, answered 429"
    );
    let b_before = b.hits.load(Ordering::SeqCst);
    for _ in 0..3 {
        assert_eq!(get(&s, &tag_path("1")).await.0, 200);
        assert_eq!(get(&s, &tag_path("2")).await.0, 200);
    }
    assert_eq!(
        a.hits.load(Ordering::SeqCst),
        1,
        "no request during the back-off"
    );
    assert!(b.hits.load(Ordering::SeqCst) > b_before);

    // Its state, as /status.json, /metrics and the page show it.
    let e = endpoint_status(&s, &ea).await;
    assert_eq!(e["state"], "backing_off", "{e}");
    assert!(e["until"].as_u64().is_some(), "{e}");
    assert_eq!(e["rate_limited"], 1, "{e}");
    assert_eq!(e["last_failure"], "HTTP 429 (Retry-After: 3600 s)", "{e}");
    let labels = format!("endpoint=\"{ea}\"");
    assert_eq!(
        metric(&s, "kagami_upstream_rate_limited_total", &labels).await,
        1.0
    );
    assert_eq!(
        metric(
            &s,
            "kagami_upstream_endpoint_state",
            &format!("{labels},state=\"backing_off\"")
        )
        .await,
        1.0
    );
    let (_, page) = get(&s, "/status").await;
    assert!(page.contains("rate limited until"), "{page}");

    // The hour passes (and the limit with it): the first mirror is asked again, and serves.
    a.limited.store(false, Ordering::SeqCst);
    clock.advance(Duration::from_secs(3600));
    let b_before = b.hits.load(Ordering::SeqCst);
    assert_eq!(get(&s, &tag_path("1")).await.0, 200);
    assert!(a.hits.load(Ordering::SeqCst) > 1);
    assert_eq!(
        b.hits.load(Ordering::SeqCst),
        b_before,
        "the first one served"
    );
    assert_eq!(endpoint_status(&s, &ea).await["state"], "healthy");
    assert_eq!(
        metric(
            &s,
            "kagami_upstream_endpoint_state",
            &format!("{labels},state=\"healthy\"")
        )
        .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_tag_is_served_while_the_only_endpoint_backs_off() {
    let clock = Arc::new(ManualClock::default());
    let a = fake(false).await;
    let (s, _) = server(&[a.addr.to_string()], clock).await;
    assert_eq!(get(&s, &tag_path("1")).await.0, 200);

    a.limited.store(true, Ordering::SeqCst);
    let before = a.hits.load(Ordering::SeqCst);
    // The revalidation meets the 429: the cached tag is served.
    let (status, body) = get(&s, &tag_path("1")).await;
    assert_eq!((status, body.as_str()), (200, manifest("1").as_str()));
    assert_eq!(a.hits.load(Ordering::SeqCst), before + 1);
    // Then the endpoint is not asked at all: cached tags are served, others are not found,
    // with the reason.
    for _ in 0..3 {
        assert_eq!(get(&s, &tag_path("1")).await.0, 200);
    }
    let (status, body) = get(&s, &tag_path("2")).await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("skipped: rate limited until"), "{body}");
    assert_eq!(a.hits.load(Ordering::SeqCst), before + 1);
    let (_, text) = get(&s, "/metrics").await;
    assert!(
        text.lines()
            .any(|l| l == "kagami_stale_tags_served_total 4"),
        "{text}"
    );
}

/// A TCP proxy to `127.0.0.1:target` that counts the connections it accepts.
async fn counting_proxy(target: u16) -> (u16, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                if let Ok(mut up) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
                }
            });
        }
    });
    (port, count)
}

/// Pushes the manifests of tags `1` and `2` (and their config) to the registry at `addr`.
async fn push(addr: &str, dir: &std::path::Path) {
    let client = kagami_client::Client::default();
    let t =
        kagami_client::push_target(&kagami_config::Config::embedded_default(), addr, "team/app");
    let file = dir.join("config.json");
    std::fs::write(&file, CONFIG_JSON).unwrap();
    client
        .push_blob_file(
            &t,
            &digest_of(CONFIG_JSON.as_bytes()),
            &file,
            CONFIG_JSON.len() as u64,
        )
        .await
        .unwrap();
    for tag in ["1", "2"] {
        client
            .put_manifest(
                &t,
                tag,
                "application/vnd.oci.image.manifest.v1+json",
                manifest(tag).into(),
            )
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_registry_opens_the_circuit_and_its_restart_closes_it() {
    kagami_testkit::require(&["docker-registry"]);
    let dir = tempfile::tempdir().unwrap();
    let reg_dir = dir.path().join("registry");
    let mut registry = tokio::task::block_in_place(|| kagami_testkit::Registry::start(&reg_dir));
    push(&registry.addr(), dir.path()).await;
    let (port, connections) = counting_proxy(registry.port).await;
    let clock = Arc::new(ManualClock::default());
    let (s, health) = server(&[format!("127.0.0.1:{port}")], clock.clone()).await;
    let endpoint = format!("http://127.0.0.1:{port}/v2");
    assert_eq!(get(&s, &tag_path("1")).await.0, 200);

    // The registry stops: its failures open the circuit, and the cached tag is served.
    tokio::task::block_in_place(|| registry.daemon.stop());
    let (status, body) = get(&s, &tag_path("1")).await;
    assert_eq!((status, body.as_str()), (200, manifest("1").as_str()));
    let e = endpoint_status(&s, &endpoint).await;
    assert_eq!(e["state"], "open", "{e}");
    assert!(e["consecutive_failures"].as_u64().unwrap() >= 3, "{e}");
    assert_eq!(e["circuit_opens"], 1, "{e}");
    assert_eq!(e["last_failure"], "no answer", "{e}");
    let labels = format!("endpoint=\"{endpoint}\"");
    assert_eq!(
        metric(&s, "kagami_upstream_circuit_opens_total", &labels).await,
        1.0
    );
    assert_eq!(
        metric(
            &s,
            "kagami_upstream_endpoint_state",
            &format!("{labels},state=\"open\"")
        )
        .await,
        1.0
    );

    // While it is open the registry's port is not contacted: cached tags are served, an
    // uncached one is not found, saying why.
    let seen = connections.load(Ordering::SeqCst);
    for _ in 0..3 {
        assert_eq!(get(&s, &tag_path("1")).await.0, 200);
    }
    let (status, body) = get(&s, &tag_path("2")).await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("skipped: circuit open until"), "{body}");
    assert_eq!(connections.load(Ordering::SeqCst), seen);

    // The registry is back on the same port and the cool-down passes: the probe closes
    // the circuit and pulls work again.
    tokio::task::block_in_place(|| registry.restart());
    eventually(
        Duration::from_secs(30),
        "tag 2 through the restarted registry",
        async || {
            // Past any cool-down (a probe that met the registry still starting reopens it).
            clock.advance(health.policy().max_open_for);
            let (status, body) = get(&s, &tag_path("2")).await;
            if status == 200 {
                Ok(body)
            } else {
                Err(format!("{status}: {body}"))
            }
        },
    )
    .await;
    assert!(connections.load(Ordering::SeqCst) > seen);
    let e = endpoint_status(&s, &endpoint).await;
    assert_eq!(e["state"], "healthy", "{e}");
    assert_eq!(e["consecutive_failures"], 0, "{e}");
}
