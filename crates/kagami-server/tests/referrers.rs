//! The referrers API of an upstream that has one (OCI distribution spec 1.1), through the
//! real upstream client: passed through (every page, merged), filtered by artifact type
//! here, cached under the tag-schema tag with the tag TTL, and served stale when every
//! endpoint fails. The upstream is a fake in the test: the Debian docker-registry has no
//! referrers API (its tag-schema fallback is tested with the real registry in the `kagami`
//! crate's `referrers` tests), and failing on demand is fault injection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use crate::common::{digest_of, eventually, request};
use axum::body::Body;
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use kagami_config::Config;
use kagami_p2p::{MemoryNetwork, MemoryRouter, Router};
use kagami_server::client_upstream::ClientUpstream;
use kagami_server::{AppState, NodeInfo, Peers, ServerOptions, peer_router, router};
use kagami_store::{Store, StoreOptions};

const INDEX: &str = "application/vnd.oci.image.index.v1+json";
const SIG: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
const SBOM: &str = "application/spdx+json";

fn subject() -> String {
    digest_of(b"the image").to_string()
}

fn descriptor(n: &str, artifact_type: &str) -> serde_json::Value {
    serde_json::json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": digest_of(n.as_bytes()).to_string(),
        "size": 100,
        "artifactType": artifact_type,
        "annotations": {"n": n},
    })
}

fn index(manifests: Vec<serde_json::Value>) -> String {
    serde_json::json!({"schemaVersion": 2, "mediaType": INDEX, "manifests": manifests}).to_string()
}

/// A registry with the referrers API that counts requests: two referrers of [`subject`] on
/// the first page and one on the second (a `Link`), none of anything else; 503 to
/// everything while `down`.
struct Upstream {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    down: Arc<AtomicBool>,
    /// While set, a first page waits for a permit of `gate`.
    gated: Arc<AtomicBool>,
    gate: Arc<tokio::sync::Semaphore>,
}

async fn upstream() -> Upstream {
    let hits = Arc::new(AtomicUsize::new(0));
    let down = Arc::new(AtomicBool::new(false));
    let gated = Arc::new(AtomicBool::new(false));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (h, d, g, s) = (hits.clone(), down.clone(), gated.clone(), gate.clone());
    let app = axum::Router::new().fallback(move |uri: Uri| {
        let (h, d, g, s) = (h.clone(), d.clone(), g.clone(), s.clone());
        async move {
            h.fetch_add(1, Ordering::SeqCst);
            if d.load(Ordering::SeqCst) {
                return StatusCode::SERVICE_UNAVAILABLE.into_response();
            }
            let ours = format!("/v2/team/app/referrers/{}", subject());
            let answer = |body: String| {
                Response::builder()
                    .header(header::CONTENT_TYPE, INDEX)
                    .body(Body::from(body))
                    .unwrap()
            };
            if uri.path() == ours {
                if uri.query().is_some_and(|q| q.contains("last=")) {
                    return answer(index(vec![descriptor("sig2", SIG)]));
                }
                if g.load(Ordering::SeqCst) {
                    s.acquire().await.unwrap().forget();
                }
                let mut r = answer(index(vec![
                    descriptor("sig1", SIG),
                    descriptor("sbom", SBOM),
                ]));
                r.headers_mut().insert(
                    header::LINK,
                    format!("<{ours}?n=2&last=x>; rel=\"next\"")
                        .parse()
                        .unwrap(),
                );
                return r;
            }
            if uri.path().starts_with("/v2/team/app/referrers/") {
                return answer(index(Vec::new()));
            }
            StatusCode::NOT_FOUND.into_response()
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Upstream {
        addr,
        hits,
        down,
        gated,
        gate,
    }
}

/// kagami mirroring `r.test` from `up`, with the real upstream client.
async fn mirror(up: &Upstream, tag_ttl: Duration) -> (SocketAddr, tempfile::TempDir) {
    let yaml = format!(
        "mirrors:\n  r.test:\n    endpoint: [\"http://{}\"]\n",
        up.addr
    );
    let (addr, _, dir) = mirror_of(&yaml, tag_ttl).await;
    (addr, dir)
}

/// kagami configured by `yaml` (no default endpoint), with the real upstream client.
async fn mirror_of(yaml: &str, tag_ttl: Duration) -> (SocketAddr, AppState, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("store"), StoreOptions::default())
        .await
        .unwrap();
    let config = Config::parse(yaml, std::path::Path::new("test.yaml"))
        .unwrap()
        .0;
    let options = ServerOptions {
        tag_ttl,
        disable_default_endpoint: true,
        ..Default::default()
    };
    let state = AppState::new(config, store, Arc::new(ClientUpstream::new()), options);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = router(state.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, state, dir)
}

/// Makes `state` the member `id` of `net`, its peer API served on a port of its own.
async fn join(state: &AppState, net: &Arc<MemoryNetwork>, id: &str) {
    let info = NodeInfo {
        peer_id: id.into(),
        addrs: vec![],
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let peer_addr = listener.local_addr().unwrap();
    let app = peer_router(state.clone(), info.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let router: Arc<dyn Router> = Arc::new(MemoryRouter::join(net, id, peer_addr));
    state.set_peers(Arc::new(Peers::new(router, None, false)), info);
}

fn artifact_types(body: &[u8]) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(body)));
    assert_eq!(v["mediaType"], INDEX);
    v["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["artifactType"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_referrers_api_is_passed_through_filtered_and_cached() {
    let up = upstream().await;
    let (m, _dir) = mirror(&up, Duration::from_secs(300)).await;
    let path = format!("/v2/team/app/referrers/{}?ns=r.test", subject());
    let (status, h, body, _) = request(m, "GET", &path, &[]).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(h.get("content-type").map(String::as_str), Some(INDEX));
    assert!(!h.contains_key("oci-filters-applied"));
    assert_eq!(
        artifact_types(&body),
        [SIG, SBOM, SIG],
        "both pages, in order"
    );
    assert_eq!(up.hits.load(Ordering::SeqCst), 2);

    // Filtered here, from the cached answer: nothing more asked upstream.
    let filtered =
        format!("{path}&artifactType=application%2Fvnd.dev.cosign.simplesigning.v1%2Bjson");
    let (status, h, fbody, _) = request(m, "GET", &filtered, &[]).await;
    assert_eq!(status, 200);
    assert_eq!(
        h.get("oci-filters-applied").map(String::as_str),
        Some("artifactType")
    );
    assert_eq!(artifact_types(&fbody), [SIG, SIG]);
    let (_, _, fbody, _) = request(m, "GET", &format!("{path}&artifactType=x"), &[]).await;
    assert!(artifact_types(&fbody).is_empty());
    let (status, h, head_body, _) = request(m, "HEAD", &path, &[]).await;
    assert_eq!(status, 200);
    assert!(head_body.is_empty());
    assert_eq!(h.get("content-length"), Some(&body.len().to_string()));
    assert_eq!(up.hits.load(Ordering::SeqCst), 2);

    // The record is the tag-schema tag: a client of a registry without the API reads the
    // same list as a manifest.
    let tag = format!("sha256-{}", subject().trim_start_matches("sha256:"));
    let (status, h, tagged, _) = request(
        m,
        "GET",
        &format!("/v2/team/app/manifests/{tag}?ns=r.test"),
        &[("Accept", INDEX)],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(h.get("content-type").map(String::as_str), Some(INDEX));
    assert_eq!(tagged, body);
    assert_eq!(up.hits.load(Ordering::SeqCst), 2);

    // A manifest nothing refers to: an empty list (the upstream's), 200.
    let other = digest_of(b"another image");
    let (status, _, body, _) = request(
        m,
        "GET",
        &format!("/v2/team/app/referrers/{other}?ns=r.test"),
        &[],
    )
    .await;
    assert_eq!(status, 200);
    assert!(artifact_types(&body).is_empty());
    // Not a digest: refused before anything is asked.
    let (status, _, _, _) =
        request(m, "GET", "/v2/team/app/referrers/sha256:xyz?ns=r.test", &[]).await;
    assert_eq!(status, 400);
}

#[tokio::test(flavor = "multi_thread")]
async fn cached_referrers_are_served_when_every_endpoint_fails() {
    let up = upstream().await;
    // Every answer is due for revalidation at once.
    let (m, _dir) = mirror(&up, Duration::ZERO).await;
    let path = format!("/v2/team/app/referrers/{}?ns=r.test", subject());
    let (status, _, body, _) = request(m, "GET", &path, &[]).await;
    assert_eq!(status, 200);
    assert_eq!(artifact_types(&body).len(), 3);
    let asked = up.hits.load(Ordering::SeqCst);
    // Revalidated: asked again while the upstream is up.
    let (_, _, again, _) = request(m, "GET", &path, &[]).await;
    assert_eq!(again, body);
    assert!(up.hits.load(Ordering::SeqCst) > asked);

    up.down.store(true, Ordering::SeqCst);
    let asked = up.hits.load(Ordering::SeqCst);
    let (status, _, stale, _) = request(m, "GET", &path, &[]).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&stale));
    assert_eq!(stale, body, "the cached answer, stale-if-error");
    assert!(
        up.hits.load(Ordering::SeqCst) > asked,
        "the upstream was asked first"
    );
    // Nothing cached and nobody answering: an error, not an empty list.
    let other = digest_of(b"another image");
    let (status, _, body, _) = request(
        m,
        "GET",
        &format!("/v2/team/app/referrers/{other}?ns=r.test"),
        &[],
    )
    .await;
    assert_eq!(status, 404, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("HTTP 503"));
}

/// A node that reaches no registry gets the list another node fetched, by its tag-schema
/// tag, and keeps it in memory only (a peer's list cannot be verified).
#[tokio::test(flavor = "multi_thread")]
async fn a_node_gets_the_list_another_fetched_and_does_not_record_it() {
    let up = upstream().await;
    let net = MemoryNetwork::new();
    let yaml = format!(
        "mirrors:\n  r.test:\n    endpoint: [\"http://{}\"]\n",
        up.addr
    );
    let (a, a_state, _da) = mirror_of(&yaml, Duration::from_secs(300)).await;
    join(&a_state, &net, "a").await;
    // Node b has no endpoint for r.test: peers only.
    let (b, b_state, _db) = mirror_of("mirrors:\n  r.test:\n", Duration::from_secs(300)).await;
    join(&b_state, &net, "b").await;
    let path = format!("/v2/team/app/referrers/{}?ns=r.test", subject());

    // Nobody has a list yet and b has no endpoint: an empty one.
    let (status, _, body, _) = request(b, "GET", &path, &[]).await;
    assert_eq!(status, 200);
    assert!(artifact_types(&body).is_empty());

    let (status, _, from_a, _) = request(a, "GET", &path, &[]).await;
    assert_eq!(status, 200);
    assert_eq!(artifact_types(&from_a).len(), 3);
    let asked = up.hits.load(Ordering::SeqCst);
    let (status, _, from_b, _) = request(b, "GET", &path, &[]).await;
    assert_eq!(status, 200);
    assert_eq!(from_b, from_a, "a's list, as a recorded it");
    let filtered = format!("{path}&artifactType=application%2Fspdx%2Bjson");
    let (_, h, body, _) = request(b, "GET", &filtered, &[]).await;
    assert_eq!(artifact_types(&body), [SBOM]);
    assert_eq!(
        h.get("oci-filters-applied").map(String::as_str),
        Some("artifactType")
    );
    assert_eq!(
        up.hits.load(Ordering::SeqCst),
        asked,
        "b never asked the registry"
    );
    let tag = format!("sha256-{}", subject().trim_start_matches("sha256:"));
    assert!(
        a_state
            .store()
            .get_tag("r.test", "team/app", &tag)
            .is_some()
    );
    assert!(
        b_state
            .store()
            .get_tag("r.test", "team/app", &tag)
            .is_none(),
        "a peer's list is not written to the tag index"
    );
}

/// Concurrent requests for one list share one lookup: the upstream is asked once (two
/// pages), and every client gets the list.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_requests_for_one_list_ask_upstream_once() {
    let up = upstream().await;
    up.gated.store(true, Ordering::SeqCst);
    let yaml = format!(
        "mirrors:\n  r.test:\n    endpoint: [\"http://{}\"]\n",
        up.addr
    );
    let (m, state, _dir) = mirror_of(&yaml, Duration::from_secs(300)).await;
    let path = format!("/v2/team/app/referrers/{}?ns=r.test", subject());
    let clients: Vec<_> = (0..10)
        .map(|_| {
            let p = path.clone();
            tokio::spawn(async move { request(m, "GET", &p, &[]).await })
        })
        .collect();
    // Every request has missed the store (and so joined the lookup) before the upstream
    // answers its first page.
    let missed = "kagami_cache_requests_total{kind=\"referrers\",result=\"miss\"} 10";
    eventually(Duration::from_secs(20), "ten misses", async || {
        state.metrics_text().contains(missed)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    up.gate.add_permits(1);
    for c in clients {
        let (status, _, body, _) = c.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(artifact_types(&body), [SIG, SBOM, SIG]);
    }
    assert_eq!(up.hits.load(Ordering::SeqCst), 2, "one lookup of two pages");
}
