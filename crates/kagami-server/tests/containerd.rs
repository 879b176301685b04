//! Sharing the images of a real containerd (feature `containerd`): what is advertised and
//! served to peers, what is not (other registries, content containerd lacks), and what is
//! withdrawn when an image goes away. containerd runs on a temporary root with its own
//! socket and is stopped by PID.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use kagami_config::{Config, Digest};
use kagami_p2p::{MemoryNetwork, MemoryRouter, Router};
use kagami_server::{AppState, NodeInfo, Peers, ServerOptions};
use kagami_store::{Store, StoreOptions};
use kagami_testkit::{Containerd, eventually};

const SHARED: &str = "ksd.test.com/ksd/app:1.0";
const UNSHARED: &str = "other.test.com/team/secret:2.0";
const INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// How long a change takes at most to be advertised, withdrawn or reported.
const WAIT: Duration = Duration::from_secs(10);

/// Builds OCI archives by hand: blobs by digest, then `index.json`.
#[derive(Default)]
struct Archive {
    blobs: Vec<(Digest, Vec<u8>)>,
    refs: Vec<serde_json::Value>,
}

impl Archive {
    fn blob(&mut self, bytes: Vec<u8>) -> serde_json::Value {
        let d = digest_of(&bytes);
        let desc = serde_json::json!({"digest": d.to_string(), "size": bytes.len()});
        self.blobs.push((d, bytes));
        desc
    }

    /// A one-layer image for `arch`; returns (manifest descriptor, manifest, layer).
    fn image(&mut self, arch: &str, seed: u64, keep: bool) -> (serde_json::Value, Digest, Vec<u8>) {
        let layer = random(300_000, seed);
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": arch, "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [digest_of(&layer).to_string()]}
        }))
        .unwrap();
        let mut c = self.blob(config);
        c["mediaType"] = "application/vnd.oci.image.config.v1+json".into();
        let mut l = self.blob(layer.clone());
        l["mediaType"] = "application/vnd.oci.image.layer.v1.tar".into();
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": MANIFEST, "config": c, "layers": [l]
        }))
        .unwrap();
        let mut m = self.blob(manifest);
        m["mediaType"] = MANIFEST.into();
        m["platform"] = serde_json::json!({"os": "linux", "architecture": arch});
        if !keep {
            // Left out of the archive, as `ctr images export` leaves out other platforms.
            self.blobs.truncate(self.blobs.len() - 3);
        }
        let d = m["digest"].as_str().unwrap().parse().unwrap();
        (m, d, layer)
    }

    fn name(&mut self, mut desc: serde_json::Value, name: &str) {
        desc["annotations"] = serde_json::json!({"io.containerd.image.name": name});
        self.refs.push(desc);
    }

    fn write(&self, path: &Path) {
        let index = serde_json::json!({"schemaVersion": 2, "manifests": self.refs});
        kagami_testkit::write_oci_archive(
            path,
            &serde_json::to_vec(&index).unwrap(),
            self.blobs.iter().map(|(d, b)| (d.hex(), &b[..])),
        );
    }
}

struct Node {
    state: AppState,
    peer_api: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

async fn node(net: &Arc<MemoryNetwork>, yaml: &str) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("store"), StoreOptions::default())
        .await
        .unwrap();
    let config = Config::parse(yaml, Path::new("test.yaml")).unwrap().0;
    let state = AppState::new(
        config,
        store,
        Arc::new(Fake::new(vec![BlobMode::Missing])),
        ServerOptions::default(),
    );
    let router: Arc<dyn Router> =
        Arc::new(MemoryRouter::join(net, "a", "127.0.0.1:9".parse().unwrap()));
    let info = NodeInfo {
        peer_id: "a".into(),
        addrs: vec![],
    };
    state.set_peers(Arc::new(Peers::new(router, None, false)), info.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let peer_api = listener.local_addr().unwrap();
    let app = kagami_server::peer_router(state.clone(), info);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Node {
        state,
        peer_api,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_images_of_shared_registries_are_advertised_served_and_withdrawn() {
    let dir = tempfile::tempdir().unwrap();
    let containerd = Containerd::start(&dir.path().join("containerd"));

    // A two-platform index of which containerd holds only amd64, and an image of a
    // registry that is not shared.
    let mut archive = Archive::default();
    let (amd64, amd64_manifest, amd64_layer) = archive.image("amd64", 1, true);
    let (arm64, arm64_manifest, arm64_layer) = archive.image("arm64", 4, false);
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": INDEX, "manifests": [amd64, arm64]
    }))
    .unwrap();
    let mut index_desc = archive.blob(index.clone());
    index_desc["mediaType"] = INDEX.into();
    let index_digest = digest_of(&index);
    archive.name(index_desc, SHARED);
    let (secret, _, secret_layer) = archive.image("amd64", 8, true);
    archive.name(secret, UNSHARED);
    let tar = dir.path().join("images.tar");
    archive.write(&tar);
    containerd.ctr_run(&[
        "-n",
        "k8s.io",
        "images",
        "import",
        "--no-unpack",
        "--platform",
        "linux/amd64",
        tar.to_str().unwrap(),
    ]);

    // containerd has both images, and of the index only the amd64 content.
    let client = kagami_containerd::Containerd::connect(&containerd.socket, "k8s.io")
        .await
        .unwrap();
    let names: Vec<String> = client
        .images()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.name)
        .collect();
    assert!(
        names.contains(&SHARED.to_string()) && names.contains(&UNSHARED.to_string()),
        "{names:?}"
    );
    let size = |d: Digest| {
        let client = &client;
        async move { client.info(&d.to_string()).await.unwrap() }
    };
    assert!(size(digest_of(&secret_layer)).await.is_some());
    assert!(size(digest_of(&amd64_layer)).await.is_some());
    assert!(size(digest_of(&arm64_layer)).await.is_none());

    let net = MemoryNetwork::new();
    let a = node(&net, "mirrors:\n  ksd.test.com:\n").await;
    let other = MemoryRouter::join(&net, "other", "127.0.0.1:9".parse().unwrap());
    let (content, _task) =
        kagami_server::containerd::start(&a.state, containerd.socket.clone(), "k8s.io".to_string());
    let advertised = |key: String| {
        let other = &other;
        async move { !other.lookup(&key, 5).await.is_empty() }
    };
    let tag_key = kagami_server::peers::tag_key("ksd.test.com", "ksd/app", "1.0");
    eventually(WAIT, "the tag is advertised", async || {
        advertised(tag_key.clone()).await
    })
    .await;
    for d in [&index_digest, &amd64_manifest, &digest_of(&amd64_layer)] {
        assert!(advertised(d.to_string()).await, "{d} not advertised");
    }
    for d in [
        &arm64_manifest,
        &digest_of(&arm64_layer),
        &digest_of(&secret_layer),
    ] {
        assert!(!advertised(d.to_string()).await, "{d} advertised");
    }
    assert!(
        !advertised(kagami_server::peers::tag_key(
            "other.test.com",
            "team/secret",
            "2.0"
        ))
        .await
    );

    // The peer API serves the scanned set: blobs with Range, manifests by tag and digest
    // with their media type.
    let get = |path: String, headers: Vec<(&'static str, String)>| {
        let addr = a.peer_api;
        async move {
            let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            request(addr, "GET", &path, &h).await
        }
    };
    let blob = |d: &Digest| format!("/v2/ksd/app/blobs/{d}?ns=ksd.test.com");
    let manifest = |r: &str| format!("/v2/ksd/app/manifests/{r}?ns=ksd.test.com");
    let layer = digest_of(&amd64_layer);
    let (status, h, body, complete) = get(blob(&layer), vec![]).await;
    assert_eq!(status, 200);
    assert!(complete && body == amd64_layer, "layer bytes differ");
    assert_eq!(h["docker-content-digest"], layer.to_string());
    assert_eq!(h["content-length"], amd64_layer.len().to_string());
    let (status, h, body, _) = get(blob(&layer), vec![("Range", "bytes=1000-1999".into())]).await;
    assert_eq!(status, 206);
    assert!(body == amd64_layer[1000..2000], "range bytes differ");
    assert_eq!(
        h["content-range"],
        format!("bytes 1000-1999/{}", amd64_layer.len())
    );
    let (status, h, body, _) = request(a.peer_api, "HEAD", &blob(&layer), &[]).await;
    assert_eq!((status, body.len()), (200, 0));
    assert_eq!(h["content-length"], amd64_layer.len().to_string());
    let (status, h, body, _) = get(manifest("1.0"), vec![]).await;
    assert_eq!(status, 200);
    assert_eq!(body, index);
    assert_eq!(h["content-type"], INDEX);
    assert_eq!(h["docker-content-digest"], index_digest.to_string());
    let (status, h, _, _) = get(manifest(&amd64_manifest.to_string()), vec![]).await;
    assert_eq!((status, h["content-type"].as_str()), (200, MANIFEST));
    for path in [
        manifest(&arm64_manifest.to_string()),
        blob(&digest_of(&secret_layer)),
        "/v2/team/secret/manifests/2.0?ns=other.test.com".to_string(),
        manifest("2.0"),
    ] {
        assert_eq!(get(path.clone(), vec![]).await.0, 404, "{path}");
    }
    // Served from containerd: nothing was copied into the store.
    assert_eq!(a.state.store().usage().blobs, 0);
    assert_eq!(content.status()["served_blobs"], 2);

    // A configuration reload changes what is shared.
    let config = |yaml: &str| Config::parse(yaml, Path::new("test.yaml")).unwrap().0;
    a.state.set_config(config("mirrors:\n  other.test.com:\n"));
    content.request_rescan();
    eventually(
        WAIT,
        "the newly shared registry's image is advertised",
        async || advertised(digest_of(&secret_layer).to_string()).await,
    )
    .await;
    assert!(!advertised(tag_key.clone()).await);
    assert!(!advertised(layer.to_string()).await);
    a.state.set_config(config("mirrors:\n  ksd.test.com:\n"));
    content.request_rescan();
    eventually(WAIT, "the tag is advertised again", async || {
        advertised(tag_key.clone()).await
    })
    .await;

    // Once kagami's store holds the layer too, losing the image in containerd withdraws
    // everything but that layer.
    assert!(
        a.state
            .store()
            .put_bytes(&layer, &amd64_layer)
            .await
            .unwrap()
    );
    containerd.ctr_run(&["-n", "k8s.io", "images", "rm", SHARED]);
    eventually(WAIT, "the tag is withdrawn", async || {
        !advertised(tag_key.clone()).await
    })
    .await;
    assert!(!advertised(index_digest.to_string()).await);
    assert!(!advertised(amd64_manifest.to_string()).await);
    assert!(
        advertised(layer.to_string()).await,
        "the store's layer was withdrawn"
    );
    assert_eq!(get(manifest("1.0"), vec![]).await.0, 404);

    // Shutdown withdraws everything.
    kagami_server::peers::withdraw_all(&a.state).await;
    assert!(!advertised(layer.to_string()).await);
}

#[tokio::test]
async fn an_unreachable_containerd_is_retried_and_reported() {
    let net = MemoryNetwork::new();
    let a = node(&net, "mirrors:\n  ksd.test.com:\n").await;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nowhere.sock");
    let (content, task) =
        kagami_server::containerd::start(&a.state, socket.clone(), "k8s.io".to_string());
    eventually(WAIT, "the error is reported", async || {
        content.status()["last_error"]
            .as_str()
            .is_some_and(|e| e.contains(&socket.display().to_string()))
    })
    .await;
    assert_eq!(content.status()["connected"], false);
    assert!(!task.is_finished(), "gave up instead of retrying");
    // Never reached: no reason to restart kagami (it serves without containerd).
    content.set_health_timeout(Duration::from_millis(1));
    assert_eq!(content.unhealthy(), None);
    // Peers get 404s meanwhile.
    let d = digest_of(b"anything");
    assert_eq!(
        request(
            a.peer_api,
            "GET",
            &format!("/v2/ksd/app/blobs/{d}?ns=ksd.test.com"),
            &[]
        )
        .await
        .0,
        404
    );
    task.abort();
}

/// `/healthz` fails once containerd, reached before, stays unreachable past the health
/// timeout (what makes the kubelet restart kagami when containerd's socket is mounted as a
/// file and containerd restarted), and answers `ok` again once containerd is back. A
/// containerd that was never reached does not fail it (kagami serves without it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_fails_while_a_containerd_reached_before_stays_unreachable() {
    let net = MemoryNetwork::new();
    let a = node(&net, "mirrors:\n  ksd.test.com:\n").await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = listener.local_addr().unwrap();
    let app = kagami_server::router(a.state.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let healthz = async || request(api, "GET", "/healthz", &[]).await;

    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("containerd");
    let containerd = Containerd::start(&root);
    let socket = containerd.socket.clone();
    let (content, _task) =
        kagami_server::containerd::start(&a.state, socket.clone(), "k8s.io".to_string());
    content.set_health_timeout(Duration::from_secs(1));
    eventually(WAIT, "kagami to reach containerd", async || {
        content.status()["connected"] == true
    })
    .await;
    assert_eq!(healthz().await.0, 200);
    // The status page and its JSON show the shared content store.
    let (status, _, body, _) = request(api, "GET", "/status.json", &[]).await;
    assert_eq!(status, 200);
    let report: kagami_server::status::Report = serde_json::from_slice(&body).unwrap();
    let c = report.containerd.expect("containerd in /status.json");
    assert!(c.connected);
    assert_eq!(
        (c.socket.as_str(), c.namespace.as_str()),
        (socket.to_str().unwrap(), "k8s.io")
    );
    let (_, _, page, _) = request(api, "GET", "/status", &[]).await;
    let page = String::from_utf8_lossy(&page);
    assert!(page.contains("containerd's content store"), "{page}");
    assert!(page.contains(&socket.display().to_string()), "{page}");

    drop(containerd);
    let (status, _, body, _) = eventually(WAIT, "/healthz to fail", async || {
        let r = healthz().await;
        (r.0 == 503).then_some(r)
    })
    .await;
    assert_eq!(status, 503);
    let body = String::from_utf8_lossy(&body);
    assert!(
        body.contains("unreachable") && body.contains(&socket.display().to_string()),
        "{body}"
    );

    // containerd back on the same socket: kagami reconnects and is healthy again.
    let _containerd = Containerd::start(&root);
    eventually(
        Duration::from_secs(45),
        "/healthz to answer ok again",
        async || healthz().await.0 == 200,
    )
    .await;
    assert_eq!(content.status()["connected"], true);
}
