//! Every metric docs/operations.md documents moves, and `/status.json` and `/p2p/status`
//! show the same numbers `/metrics` does (one source: `kagami_server::telemetry`).
//!
//! Three nodes, each a whole `router(AppState)` on 127.0.0.1 with a real store: node A
//! pulls an image from a scripted upstream; node B, whose upstream has nothing, pulls the
//! same image from A over A's peer API (found through an in-memory router), then again
//! from its own store; node C has tight limits and an upstream that fails in scripted ways
//! (a tag that hangs, a registry down, a blob that trickles, never ends, hangs or is
//! missing), so that every metric that only moves on a fault moves too. The list of
//! metrics comes from the documentation's table, so a newly documented metric is covered
//! without touching this test.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use kagami_config::{Config, Digest, Plan};
use kagami_p2p::{MemoryNetwork, MemoryRouter, Router};
use kagami_server::{
    AppState, BlobBody, FetchLimits, FetchedManifest, NodeInfo, Peers, ServerOptions, Upstream,
    UpstreamError, peer_router, router,
};
use kagami_store::{Store, StoreOptions};

const REGISTRY: &str = "registry.example.test";
const MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

use crate::common::{digest_of, http_client};
use kagami_testkit::random;

// ---------------------------------------------------------------------------------------
// A scripted upstream.

/// How the upstream sends one blob.
#[derive(Clone, Copy)]
enum Mode {
    /// All of it, size announced.
    Good,
    /// 64 KiB, then nothing, never ending; size not announced.
    Hang,
    /// One byte every 100 ms, size announced.
    Trickle,
    /// All of it, size not announced.
    Unannounced,
}

#[derive(Default)]
struct Script {
    blobs: HashMap<Digest, (Bytes, Mode)>,
    manifests: HashMap<String, FetchedManifest>,
    /// Tags whose requests never answer.
    hang_tags: BTreeSet<String>,
    /// Every manifest request fails (not as a not-found).
    down: AtomicBool,
}

impl Script {
    fn blob(mut self, data: &[u8], send: Mode) -> Self {
        self.blobs
            .insert(digest_of(data), (Bytes::copy_from_slice(data), send));
        self
    }

    fn manifest(mut self, tag: &str, body: &str) -> Self {
        let m = FetchedManifest {
            bytes: Bytes::copy_from_slice(body.as_bytes()),
            media_type: MEDIA_TYPE.into(),
            digest: digest_of(body.as_bytes()),
            source: "scripted".into(),
        };
        self.manifests.insert(m.digest.to_string(), m.clone());
        self.manifests.insert(tag.into(), m);
        self
    }

    async fn find(&self, reference: &str) -> Result<FetchedManifest, UpstreamError> {
        if self.hang_tags.contains(reference) {
            futures_util::future::pending::<()>().await;
        }
        if self.down.load(Ordering::SeqCst) {
            return Err(UpstreamError {
                message: "registry down".into(),
                not_found: false,
            });
        }
        self.manifests
            .get(reference)
            .cloned()
            .ok_or_else(|| UpstreamError {
                message: "not found".into(),
                not_found: true,
            })
    }
}

fn pieces(data: Bytes, size: usize) -> Vec<io::Result<Bytes>> {
    (0..data.len())
        .step_by(size)
        .map(|i| Ok(data.slice(i..(i + size).min(data.len()))))
        .collect()
}

impl Upstream for Script {
    fn manifest<'a>(
        &'a self,
        _plan: &'a Plan,
        reference: &'a str,
    ) -> BoxFuture<'a, Result<FetchedManifest, UpstreamError>> {
        self.find(reference).boxed()
    }

    fn blob<'a>(
        &'a self,
        _plan: &'a Plan,
        digest: &'a Digest,
        offset: u64,
        from: usize,
    ) -> BoxFuture<'a, Result<BlobBody, UpstreamError>> {
        async move {
            let Some((data, send)) = self.blobs.get(digest).cloned().filter(|_| from == 0) else {
                return Err(UpstreamError {
                    message: "no such blob".into(),
                    not_found: true,
                });
            };
            let rest = data.slice(offset as usize..);
            let len = rest.len() as u64;
            let (stream, size) = match send {
                Mode::Good => (
                    futures_util::stream::iter(pieces(rest, 64 * 1024)).boxed(),
                    Some(len),
                ),
                Mode::Unannounced => (
                    futures_util::stream::iter(pieces(rest, 64 * 1024)).boxed(),
                    None,
                ),
                Mode::Hang => (
                    futures_util::stream::iter(pieces(rest.slice(..64 * 1024), 64 * 1024))
                        .chain(futures_util::stream::pending())
                        .boxed(),
                    None,
                ),
                Mode::Trickle => (
                    futures_util::stream::iter(pieces(rest, 1))
                        .then(|c| async move {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            c
                        })
                        .boxed(),
                    Some(len),
                ),
            };
            Ok(BlobBody {
                stream,
                size,
                source: "http://127.0.0.1:9".into(),
                attempt: 0,
            })
        }
        .boxed()
    }
}

// ---------------------------------------------------------------------------------------
// Nodes and HTTP.

struct Node {
    addr: SocketAddr,
    state: AppState,
    upstream: Arc<Script>,
    _dir: tempfile::TempDir,
}

async fn node(script: Script, options: ServerOptions, max_size: Option<u64>) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(
        dir.path().join("store"),
        StoreOptions {
            max_size,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let config = Config::parse(
        &format!("mirrors:\n  {REGISTRY}:\n    endpoint: [\"http://127.0.0.1:9\"]\n"),
        std::path::Path::new("test.yaml"),
    )
    .unwrap()
    .0;
    let upstream = Arc::new(script);
    let state = AppState::new(config, store, upstream.clone(), options);
    let addr = serve(router(state.clone())).await;
    Node {
        addr,
        state,
        upstream,
        _dir: dir,
    }
}

/// A node whose upstream is the real client (`ClientUpstream`, its endpoint health opening
/// a circuit at the first failure) through two mirrors on 127.0.0.1: the first answers
/// every request `429` with `Retry-After`, the second `503` (fault injection).
async fn health_node() -> Node {
    let answer = |status: u16| {
        axum::Router::new().fallback(move || async move {
            let mut r = axum::http::Response::new(axum::body::Body::from("{}"));
            *r.status_mut() = axum::http::StatusCode::from_u16(status).unwrap();
            if status == 429 {
                r.headers_mut()
                    .insert("retry-after", axum::http::HeaderValue::from_static("60"));
            }
            r
        })
    };
    let (limited, failing) = (serve(answer(429)).await, serve(answer(503)).await);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("store"), StoreOptions::default())
        .await
        .unwrap();
    let config = Config::parse(
        &format!(
            "mirrors:\n  {REGISTRY}:\n    endpoint: [\"http://{limited}\", \"http://{failing}\"]\n"
        ),
        std::path::Path::new("test.yaml"),
    )
    .unwrap()
    .0;
    let health = kagami_client::Health::new(kagami_client::HealthPolicy {
        failures_to_open: 1,
        ..Default::default()
    });
    let upstream = kagami_server::client_upstream::ClientUpstream::for_mirror_with(health);
    let options = ServerOptions {
        disable_default_endpoint: true,
        ..Default::default()
    };
    let state = AppState::new(config, store, Arc::new(upstream), options);
    let addr = serve(router(state.clone())).await;
    Node {
        addr,
        state,
        upstream: Arc::new(Script::default()),
        _dir: dir,
    }
}

async fn serve(app: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// Joins `node` to `net` as `id`, with its peer API on a port of its own.
async fn join(node: &Node, net: &Arc<MemoryNetwork>, id: &str) -> Arc<dyn Router> {
    let info = NodeInfo {
        peer_id: id.into(),
        addrs: vec![],
    };
    let peer_api = serve(peer_router(node.state.clone(), info.clone())).await;
    let r: Arc<dyn Router> = Arc::new(MemoryRouter::join(net, id, peer_api));
    node.state
        .set_peers(Arc::new(Peers::new(r.clone(), None, false)), info);
    r
}

fn url(node: &Node, path: &str) -> String {
    format!("http://{}{path}", node.addr)
}

fn blob_path(d: &Digest) -> String {
    format!("/v2/team/app/blobs/{d}?ns={REGISTRY}")
}

fn manifest_path(reference: &str) -> String {
    format!("/v2/team/app/manifests/{reference}?ns={REGISTRY}")
}

/// GET `path`: status and body; a body cut by the server is what arrived of it.
async fn get(node: &Node, path: &str) -> (u16, Vec<u8>) {
    let resp = http_client().get(url(node, path)).send().await.unwrap();
    let status = resp.status().as_u16();
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(Ok(c)) = stream.next().await {
        body.extend_from_slice(&c);
    }
    (status, body)
}

async fn json(node: &Node, path: &str) -> serde_json::Value {
    let (status, body) = get(node, path).await;
    assert_eq!(status, 200, "{path}");
    serde_json::from_slice(&body).unwrap()
}

/// Waits (at most 10 s) for `f`.
async fn eventually(mut f: impl AsyncFnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------
// The metrics: as documented, and as exposed.

/// (name, type) of every metric in docs/operations.md's table.
fn documented() -> Vec<(String, String)> {
    let doc = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/operations.md"),
    )
    .unwrap();
    let section = doc
        .split("\n## Metrics\n")
        .nth(1)
        .expect("a Metrics section in docs/operations.md");
    let section = section.split("\n## ").next().unwrap();
    let rows: Vec<(String, String)> = section
        .lines()
        .filter_map(|l| {
            let mut cells = l.strip_prefix("| `kagami_")?.split('|');
            let name = format!("kagami_{}", cells.next()?.trim().trim_end_matches('`'));
            Some((name, cells.next()?.trim().to_string()))
        })
        .collect();
    assert!(rows.len() >= 20, "only {} metrics documented", rows.len());
    rows
}

/// One scrape: every sample by series name (`kagami_x_total`, `kagami_y_count`, ...),
/// each with its labels, and every family's type from the `# TYPE` lines.
struct Scrape {
    samples: BTreeMap<String, Vec<(String, f64)>>,
    types: BTreeMap<String, String>,
}

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let mut samples: BTreeMap<String, Vec<(String, f64)>> = BTreeMap::new();
        let mut types = BTreeMap::new();
        for l in text.lines() {
            if let Some(t) = l.strip_prefix("# TYPE ") {
                let (name, ty) = t.split_once(' ').unwrap();
                types.insert(name.to_string(), ty.to_string());
                continue;
            }
            if l.starts_with('#') || l.is_empty() {
                continue;
            }
            let (series, value) = l.rsplit_once(' ').unwrap();
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            samples
                .entry(name.to_string())
                .or_default()
                .push((labels.to_string(), value.parse().unwrap()));
        }
        Scrape { samples, types }
    }

    /// The series a documented metric is read from: itself, or a histogram's `_count`.
    fn series(name: &str, ty: &str) -> String {
        match ty {
            "histogram" => format!("{name}_count"),
            _ => name.to_string(),
        }
    }

    fn value(&self, series: &str, labels: &str) -> f64 {
        self.samples
            .get(series)
            .and_then(|v| v.iter().find(|(l, _)| l == labels))
            .map_or(0.0, |(_, v)| *v)
    }

    fn sum(&self, series: &str) -> f64 {
        self.samples
            .get(series)
            .map_or(0.0, |v| v.iter().map(|(_, v)| v).sum())
    }

    /// Whether any sample of `series` is not zero.
    fn moved(&self, series: &str) -> bool {
        self.samples
            .get(series)
            .is_some_and(|v| v.iter().any(|(_, v)| *v != 0.0))
    }
}

async fn scrape(node: &Node) -> Scrape {
    let (status, body) = get(node, "/metrics").await;
    assert_eq!(status, 200);
    Scrape::parse(&String::from_utf8(body).unwrap())
}

async fn metric(node: &Node, series: &str) -> f64 {
    scrape(node).await.sum(series)
}

/// Waits for the fetches in flight on `node` to end.
async fn idle(node: &Node) {
    eventually(
        async || metric(node, "kagami_inflight_fetches").await == 0.0,
        "the fetch in flight to end",
    )
    .await
}

// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_metric_moves_and_status_reads_the_same_numbers() {
    // reqwest is built without a default TLS provider (see `Peers::new`).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let documented = documented();
    let mut scrapes: Vec<(&str, Scrape)> = Vec::new();

    // The image: a config and a layer, named by a manifest.
    let config_blob = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
    let layer = random(300 * 1024, 1);
    let (dc, dl) = (digest_of(&config_blob), digest_of(&layer));
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"{MEDIA_TYPE}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{dc}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{dl}","size":{}}}]}}"#,
        config_blob.len(),
        layer.len()
    );
    let dm = digest_of(manifest.as_bytes());

    // Node A pulls from upstream; node B's upstream has nothing.
    let a = node(
        Script::default()
            .manifest("1.0", &manifest)
            .blob(&config_blob, Mode::Good)
            .blob(&layer, Mode::Good),
        ServerOptions::default(),
        None,
    )
    .await;
    let b = node(Script::default(), ServerOptions::default(), None).await;
    // Before anything: every documented metric is exposed (the labelled ones once they
    // have a value), and none has moved.
    let fresh = scrape(&b).await;
    for (name, ty) in &documented {
        assert!(
            !fresh.moved(&Scrape::series(name, ty)),
            "{name} moved on a fresh node"
        );
    }
    let net = MemoryNetwork::new();
    let _ra = join(&a, &net, "a").await;
    let rb = join(&b, &net, "b").await;
    tokio::spawn(kagami_server::peers::advertise_store(a.state.clone()));

    let (status, body) = get(&a, &manifest_path("1.0")).await;
    assert_eq!((status, body.as_slice()), (200, manifest.as_bytes()));
    assert_eq!(get(&a, &blob_path(&dc)).await, (200, config_blob.clone()));
    assert_eq!(get(&a, &blob_path(&dl)).await, (200, layer.clone()));
    for d in [&dm, &dc, &dl] {
        eventually(
            async || !rb.lookup(&d.to_string(), 5).await.is_empty(),
            "node A to advertise what it pulled",
        )
        .await;
    }

    // Node B: the manifest and the layer from A, then the layer again from its store.
    let (status, body) = get(&b, &manifest_path(&dm.to_string())).await;
    assert_eq!((status, body.as_slice()), (200, manifest.as_bytes()));
    assert_eq!(get(&b, &blob_path(&dl)).await, (200, layer.clone()));
    eventually(
        async || b.state.store().blob_size(&dl).is_some(),
        "node B to store the layer",
    )
    .await;
    assert_eq!(get(&b, &blob_path(&dl)).await, (200, layer.clone()));

    // One source: /status.json and /p2p/status say what /metrics says, and that is what
    // happened.
    let mb = scrape(&b).await;
    let status = json(&b, "/status.json").await;
    let p2p = json(&b, "/p2p/status").await;
    let received = (manifest.len() + layer.len()) as f64;
    assert_eq!(
        mb.value("kagami_peer_received_bytes_total", r#"peer="a""#),
        received
    );
    assert_eq!(
        mb.sum("kagami_peer_lookups_total"),
        2.0,
        "manifest and layer"
    );
    assert_eq!(mb.sum("kagami_peer_lookup_hits_total"), 2.0);
    assert_eq!(mb.sum("kagami_peer_lookup_seconds_count"), 2.0);
    assert_eq!(
        mb.value("kagami_cache_requests_total", r#"kind="blob",result="hit""#),
        1.0
    );
    assert_eq!(
        mb.value("kagami_served_bytes_total", r#"source="local""#),
        layer.len() as f64
    );
    for (what, v) in [
        ("lookups", "kagami_peer_lookups_total"),
        ("lookup_hits", "kagami_peer_lookup_hits_total"),
    ] {
        assert_eq!(status["peers"][what].as_f64(), Some(mb.sum(v)), "{what}");
        assert_eq!(p2p[what].as_f64(), Some(mb.sum(v)), "{what}");
    }
    let member = status["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "a")
        .expect("node A among B's members")
        .clone();
    assert_eq!(member["received_bytes"].as_f64(), Some(received));
    assert_eq!(p2p["received_bytes_by_peer"]["a"].as_f64(), Some(received));
    let p2p_member = p2p["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "a")
        .unwrap()
        .clone();
    assert_eq!(p2p_member["received_bytes"].as_f64(), Some(received));
    assert_eq!(
        status["cache"]["blob"]["hits"].as_f64(),
        Some(mb.value("kagami_cache_requests_total", r#"kind="blob",result="hit""#))
    );
    for source in ["local", "peer", "upstream"] {
        assert_eq!(
            status["bytes_served"][source].as_f64(),
            Some(mb.value("kagami_served_bytes_total", &format!("source=\"{source}\""))),
            "{source}"
        );
    }
    assert_eq!(
        b.state.peers().unwrap().received_bytes().get("a").copied(),
        Some(received as u64)
    );
    scrapes.push(("A", scrape(&a).await));
    scrapes.push(("B", mb));

    // Node D warms the image (by digest): every blob from A, counted as warmed from a peer.
    let d = node(Script::default(), ServerOptions::default(), None).await;
    let _rd = join(&d, &net, "d").await;
    let image = kagami_config::Reference::parse(&format!("{REGISTRY}/team/app@{dm}")).unwrap();
    d.state.warmer().add(vec![image]).unwrap();
    eventually(
        async || {
            metric(&d, "kagami_warm_images").await > 0.0 && {
                let w = json(&d, "/kagami/warm").await;
                w["images"][0]["state"] == "held"
            }
        },
        "node D to warm the image",
    )
    .await;
    let md = scrape(&d).await;
    assert_eq!(md.value("kagami_warm_images", r#"state="held""#), 1.0);
    assert_eq!(
        md.value("kagami_warm_fetched_bytes_total", r#"source="peer""#),
        (config_blob.len() + layer.len()) as f64
    );
    assert_eq!(
        json(&d, "/status.json").await["warm"]["images"][0]["state"],
        "held"
    );
    scrapes.push(("D", md));

    // Node C: faults. One fetch at a time, short waits, small caps, a small store.
    let good1 = random(200 * 1024, 11);
    let good2 = random(200 * 1024, 12);
    let busy = random(10 * 1024, 13);
    let hang = random(1024 * 1024, 14);
    let trickle = random(64 * 1024, 15);
    let endless = random(1024 * 1024, 16);
    let mut script = Script::default()
        .manifest("stale", &manifest)
        .blob(&good1, Mode::Good)
        .blob(&good2, Mode::Good)
        .blob(&busy, Mode::Good)
        .blob(&hang, Mode::Hang)
        .blob(&trickle, Mode::Trickle)
        .blob(&endless, Mode::Unannounced);
    script.hang_tags.insert("hang".into());
    let limits = FetchLimits {
        max_fetches: 1,
        queue_wait: Duration::from_millis(200),
        max_blob_size: 256 * 1024,
        min_rate: 1000,
        rate_window: Duration::from_secs(1),
        abandon_grace: Duration::from_millis(200),
        revalidation_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let options = ServerOptions {
        tag_ttl: Duration::ZERO,
        limits,
        ..Default::default()
    };
    let c = node(script, options, Some(300 * 1024)).await;

    // A registry this mirror does not serve: refused.
    let unserved = "/v2/team/app/manifests/1?ns=unserved.example.test";
    assert_eq!(get(&c, unserved).await.0, 404);
    // A tag whose registry went down: served stale.
    assert_eq!(get(&c, &manifest_path("stale")).await.0, 200);
    c.upstream.down.store(true, Ordering::SeqCst);
    assert_eq!(get(&c, &manifest_path("stale")).await.0, 200);
    c.upstream.down.store(false, Ordering::SeqCst);
    // A tag whose registry never answers: the revalidation is given up.
    assert_eq!(get(&c, &manifest_path("hang")).await.0, 404);
    // A blob no source has: an upstream failure.
    let missing = digest_of(b"nobody has this");
    assert_eq!(get(&c, &blob_path(&missing)).await.0, 404);
    idle(&c).await; // one fetch at a time
    // A blob longer than --max-blob-size: cut there.
    let (_, body) = get(&c, &blob_path(&digest_of(&endless))).await;
    assert!(body.len() <= 256 * 1024, "{}", body.len());
    idle(&c).await; // one fetch at a time
    // A source slower than --min-fetch-rate: cut.
    let (_, body) = get(&c, &blob_path(&digest_of(&trickle))).await;
    assert!(body.len() < trickle.len());
    idle(&c).await; // one fetch at a time
    // Two blobs that do not fit the store together: the first is evicted.
    for blob in [&good1, &good2] {
        assert_eq!(get(&c, &blob_path(&digest_of(blob))).await.0, 200);
        eventually(
            async || c.state.store().blob_size(&digest_of(blob)).is_some(),
            "the blob to be stored",
        )
        .await;
    }
    eventually(
        async || metric(&c, "kagami_store_evictions_total").await > 0.0,
        "an eviction",
    )
    .await;
    idle(&c).await; // one fetch at a time
    // A fetch in flight holds the budget's one place: seen in the gauges, and the next
    // cold blob is refused (503); when its client leaves, it is cancelled.
    let resp = http_client()
        .get(url(&c, &blob_path(&digest_of(&hang))))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    assert!(stream.next().await.unwrap().is_ok());
    scrapes.push(("C during a fetch", scrape(&c).await));
    assert_eq!(get(&c, &blob_path(&digest_of(&busy))).await.0, 503);
    drop(stream);
    eventually(
        async || metric(&c, "kagami_fetches_cancelled_total").await > 0.0,
        "the fetch nobody follows to be cancelled",
    )
    .await;
    scrapes.push(("C", scrape(&c).await));

    // Node D: the real upstream client, its endpoint health on: a mirror rate limits
    // (429) and the next one fails (503), opening its circuit.
    let d = health_node().await;
    let (status, body) = get(&d, &manifest_path("1")).await;
    assert_eq!(status, 404, "{}", String::from_utf8_lossy(&body));
    let md = scrape(&d).await;
    assert_eq!(md.sum("kagami_upstream_rate_limited_total"), 1.0);
    assert_eq!(md.sum("kagami_upstream_circuit_opens_total"), 1.0);
    assert_eq!(
        md.sum("kagami_upstream_endpoint_state"),
        2.0,
        "one state each"
    );
    let status = json(&d, "/status.json").await;
    let states: BTreeSet<&str> = status["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["state"].as_str())
        .collect();
    assert_eq!(states, BTreeSet::from(["backing_off", "open"]), "{status}");
    scrapes.push(("D", md));

    // Every documented metric moved on some node, with the documented type; every metric
    // exposed is documented.
    let names: BTreeSet<&str> = documented.iter().map(|(n, _)| n.as_str()).collect();
    let mut still = Vec::new();
    for (name, ty) in &documented {
        let series = Scrape::series(name, ty);
        if !scrapes.iter().any(|(_, s)| s.moved(&series)) {
            still.push(name.as_str());
        }
    }
    assert!(
        still.is_empty(),
        "documented metrics that did not move: {still:?}"
    );
    for (_, s) in &scrapes {
        for (family, ty) in &s.types {
            let name = match ty.as_str() {
                "counter" => format!("{family}_total"),
                _ => family.clone(),
            };
            let doc_ty = documented.iter().find(|(n, _)| *n == name).map(|(_, t)| t);
            assert_eq!(
                doc_ty,
                Some(ty),
                "{name} ({ty}) is exposed but documented as {doc_ty:?} ({names:?})"
            );
        }
    }
    // Node C's status page shows its faults as the metrics count them.
    let mc = scrapes
        .iter()
        .find(|(n, _)| *n == "C")
        .unwrap()
        .1
        .sum("kagami_stale_tags_served_total");
    let status = json(&c, "/status.json").await;
    assert_eq!(status["stale_tags_served"].as_f64(), Some(mc));
    assert!(
        status["refused"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["reason"] == "registry_not_served"),
        "{status}"
    );
}
