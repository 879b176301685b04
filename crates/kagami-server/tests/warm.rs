//! Cluster warming (docs/warm.md) with a real docker-registry upstream: three nodes, each
//! a whole server (`AppState` with the real upstream client, its peer API, advertising
//! its store) on an in-memory P2P network, given the same warm list with `copies = 2`.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use kagami_config::{Config, Reference};
use kagami_p2p::{BoxFuture, Member, MemoryNetwork, MemoryRouter, Peer, Router};
use kagami_server::client_upstream::ClientUpstream;
use kagami_server::warm::WarmReport;
use kagami_server::{AppState, NodeInfo, Peers, ServerOptions, peer_router, router};
use kagami_store::{Store, StoreOptions};
use kagami_testkit::{Registry, eventually, random};

use crate::common::{digest_of, http_client};

/// A router that can be cut off the network (a node that died): afterwards it knows
/// nobody and nobody sees it.
struct Killable(Mutex<Option<MemoryRouter>>);

impl Killable {
    fn kill(&self) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take();
    }
    fn with<T: Default>(&self, f: impl FnOnce(&MemoryRouter) -> T) -> T {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map_or_else(T::default, f)
    }
}

impl Router for Killable {
    fn ready(&self) -> BoxFuture<'_, bool> {
        Box::pin(async { true })
    }
    fn lookup(&self, key: &str, limit: usize) -> BoxFuture<'_, Vec<Peer>> {
        // The memory router answers at once: its future is ready on first poll.
        let found = self.with(|r| {
            futures_util::FutureExt::now_or_never(r.lookup(key, limit)).unwrap_or_default()
        });
        Box::pin(async move { found })
    }
    fn advertise(&self, keys: Vec<String>) -> BoxFuture<'_, ()> {
        self.with(|r| futures_util::FutureExt::now_or_never(r.advertise(keys)));
        Box::pin(async {})
    }
    fn withdraw(&self, keys: Vec<String>) -> BoxFuture<'_, ()> {
        self.with(|r| futures_util::FutureExt::now_or_never(r.withdraw(keys)));
        Box::pin(async {})
    }
    fn members(&self) -> Vec<Member> {
        self.with(|r| r.members())
    }
}

struct Node {
    id: String,
    state: AppState,
    router: Arc<Killable>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Node {
    fn kill(&self) {
        self.router.kill();
        for t in &self.tasks {
            t.abort();
        }
    }

    fn warm(&self) -> WarmReport {
        self.state.warmer().report().unwrap_or_default()
    }
}

async fn serve(app: axum::Router) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, task)
}

async fn node(id: &str, net: &Arc<MemoryNetwork>, yaml: &str) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("store"), StoreOptions::default())
        .await
        .unwrap();
    let config = Config::parse(yaml, std::path::Path::new("test.yaml"))
        .unwrap()
        .0;
    let options = ServerOptions {
        disable_default_endpoint: true,
        ..Default::default()
    };
    let state = AppState::new(
        config,
        store,
        Arc::new(ClientUpstream::for_mirror()),
        options,
    );
    let info = NodeInfo {
        peer_id: id.into(),
        addrs: vec![],
    };
    let (peer_api, t1) = serve(peer_router(state.clone(), info.clone())).await;
    let (_api, t2) = serve(router(state.clone())).await;
    let r = Arc::new(Killable(Mutex::new(Some(MemoryRouter::join(
        net, id, peer_api,
    )))));
    let peers = Arc::new(Peers::new(r.clone(), None, false));
    peers.set_own_http_addr(peer_api);
    state.set_peers(peers, info);
    let t3 = tokio::spawn(kagami_server::peers::advertise_store(state.clone()));
    Node {
        id: id.into(),
        state,
        router: r,
        tasks: vec![t1, t2, t3],
        _dir: dir,
    }
}

/// Pushes an image (a config and `layers` random layers) to `registry` as `repo:tag`
/// through the registry's HTTP API; returns the digests of its blobs.
pub async fn push_image(registry: &Registry, repo: &str, tag: &str, layers: usize) -> Vec<String> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = http_client();
    let base = format!("http://{}", registry.addr());
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#
            .to_vec();
    let mut blobs = vec![config.clone()];
    for i in 0..layers {
        blobs.push(random(200 * 1024 + i * 1000, 40 + i as u64));
    }
    let mut digests = Vec::new();
    for data in &blobs {
        let d = digest_of(data).to_string();
        let r = http
            .post(format!("{base}/v2/{repo}/blobs/uploads/"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "upload start");
        let loc = r.headers()["location"].to_str().unwrap().to_string();
        let loc = if loc.starts_with("http") {
            loc
        } else {
            format!("{base}{loc}")
        };
        let sep = if loc.contains('?') { '&' } else { '?' };
        let r = http
            .put(format!("{loc}{sep}digest={d}"))
            .header("content-type", "application/octet-stream")
            .body(data.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "upload of {d}");
        digests.push(d);
    }
    let desc = |data: &Vec<u8>, media: &str| serde_json::json!({"mediaType": media, "digest": digest_of(data).to_string(), "size": data.len()});
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": desc(&blobs[0], "application/vnd.oci.image.config.v1+json"),
        "layers": blobs[1..].iter().map(|b| desc(b, "application/vnd.oci.image.layer.v1.tar+gzip")).collect::<Vec<_>>(),
    });
    let r = http
        .put(format!("{base}/v2/{repo}/manifests/{tag}"))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(serde_json::to_vec(&manifest).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "manifest push");
    digests
}

fn state_of(n: &Node, image: &str) -> String {
    n.warm()
        .images
        .iter()
        .find(|i| i.image == image)
        .map_or("absent".into(), |i| i.state.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_copies_kept_among_three_nodes_and_a_dead_holder_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry"));
    let blobs = push_image(&registry, "team/app", "1", 2).await;
    let yaml = format!(
        "mirrors:\n  registry.example.test:\n    endpoint: [\"http://{}\"]\n",
        registry.addr()
    );
    let net = MemoryNetwork::new();
    let mut nodes = Vec::new();
    for id in ["n1", "n2", "n3"] {
        nodes.push(node(id, &net, &yaml).await);
    }
    let image = Reference::parse("registry.example.test/team/app:1").unwrap();
    let name = image.to_string();
    let ids: BTreeSet<String> = nodes.iter().map(|n| n.id.clone()).collect();
    let chosen = kagami_server::warm::chosen(&ids, &name, 2);
    for n in &nodes {
        n.state.warmer().set_list(vec![image.clone()], Some(2));
    }

    let summary = |nodes: &[&Node]| -> String {
        nodes
            .iter()
            .map(|n| format!("{}: {:?}", n.id, n.warm()))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let all: Vec<&Node> = nodes.iter().collect();
    eventually(
        Duration::from_secs(60),
        "the two chosen nodes to hold the image",
        async || {
            let held: BTreeSet<String> = all
                .iter()
                .filter(|n| state_of(n, &name) == "held")
                .map(|n| n.id.clone())
                .collect();
            let others_idle = all
                .iter()
                .filter(|n| !chosen.contains(&n.id))
                .all(|n| state_of(n, &name) == "not_chosen");
            if held == chosen.iter().cloned().collect() && others_idle {
                Ok(())
            } else {
                Err(summary(&all))
            }
        },
    )
    .await;
    // Exactly the chosen nodes hold the blobs; upstream sent each blob once.
    for n in &nodes {
        for d in &blobs {
            let held = n.state.store().blob_size(&d.parse().unwrap()).is_some();
            assert_eq!(held, chosen.contains(&n.id), "{} holds {d}: {held}", n.id);
        }
    }
    for d in &blobs {
        assert_eq!(
            registry.count_gets(&format!("/blobs/{d}")),
            1,
            "upstream GETs of {d}\n{:#?}",
            registry.access_log()
        );
    }
    // Each node sees the two copies (the providers of the manifest, and itself).
    eventually(
        Duration::from_secs(30),
        "every node to see 2 copies",
        async || {
            if all.iter().all(|n| n.warm().images[0].copies_seen == 2) {
                Ok(())
            } else {
                Err(summary(&all))
            }
        },
    )
    .await;

    // A holder dies: the third node takes its place, from the surviving holder.
    let dead = nodes.iter().position(|n| n.id == chosen[0]).unwrap();
    nodes[dead].kill();
    let third = nodes.iter().find(|n| !chosen.contains(&n.id)).unwrap();
    let survivor = nodes.iter().find(|n| n.id == chosen[1]).unwrap();
    let alive = [third, survivor];
    eventually(
        Duration::from_secs(60),
        "the third node to take over",
        async || {
            if state_of(third, &name) == "held" && state_of(survivor, &name) == "held" {
                Ok(())
            } else {
                Err(summary(&alive))
            }
        },
    )
    .await;
    for d in &blobs {
        assert!(third.state.store().blob_size(&d.parse().unwrap()).is_some());
        assert_eq!(
            registry.count_gets(&format!("/blobs/{d}")),
            1,
            "the new holder streamed {d} from the survivor"
        );
    }
    let r = third.warm();
    assert_eq!(r.nodes, 2);
    let mut now_chosen = r.images[0].chosen.clone();
    now_chosen.sort();
    let mut want = vec![third.id.clone(), survivor.id.clone()];
    want.sort();
    assert_eq!(now_chosen, want);
}

#[tokio::test]
async fn an_image_upstream_lacks_fails_in_the_status_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry"));
    let yaml = format!(
        "mirrors:\n  registry.example.test:\n    endpoint: [\"http://{}\"]\n",
        registry.addr()
    );
    let net = MemoryNetwork::new();
    let n = node("n1", &net, &yaml).await;
    let image = Reference::parse("registry.example.test/team/missing:1").unwrap();
    n.state.warmer().add(vec![image.clone()]).unwrap();
    let name = image.to_string();
    eventually(
        Duration::from_secs(30),
        "the image to fail",
        async || match n.warm().images.first() {
            Some(i) if i.state == "failed" => Ok(i.clone()),
            other => Err(format!("{other:?}")),
        },
    )
    .await;
    let r = n.warm();
    let i = &r.images[0];
    assert_eq!(i.image, name);
    let why = i.error.as_deref().unwrap();
    assert!(
        why.contains("not found at") && why.contains(&registry.addr()),
        "{why}"
    );
    assert_eq!(n.state.store().usage().blobs, 0);
    assert!(n.state.store().all_tags().is_empty());
    // `/status.json` says the same.
    let report = kagami_server::status::report(&n.state, None);
    assert_eq!(report.warm.unwrap().images[0].state, "failed");

    // A failed image waits for its retry time: a later pass (here started by a change of
    // the policy list) does not ask upstream for it again.
    assert!(why.contains("next try in 30 s"), "{why}");
    let asked = || {
        registry
            .access_log()
            .iter()
            .filter(|l| l.contains("/team/missing/"))
            .count()
    };
    let before = asked();
    assert!(before > 0, "{:#?}", registry.access_log());
    let pass_before = r.last_pass_at.unwrap();
    // Passes are stamped in whole seconds: start the next one in a later second.
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    eventually(Duration::from_secs(5), "the next second", async || {
        (now() > pass_before).then_some(()).ok_or(now())
    })
    .await;
    n.state.warmer().set_list(Vec::new(), None);
    eventually(Duration::from_secs(15), "another pass", async || {
        match n.warm().last_pass_at {
            Some(t) if t > pass_before => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(asked(), before, "{:#?}", registry.access_log());
    assert_eq!(n.warm().images[0].state, "failed");
    // Asked for again (`kagami warm`), it is tried at once, and waits twice as long after.
    n.state.warmer().add(vec![image.clone()]).unwrap();
    let why = eventually(
        Duration::from_secs(30),
        "the second failure",
        async || match n.warm().images.first().and_then(|i| i.error.clone()) {
            Some(e) if e.contains("2 times in a row") => Ok(e),
            other => Err(format!("{other:?}")),
        },
    )
    .await;
    assert!(why.contains("next try in 60 s"), "{why}");
    assert!(asked() > before, "{:#?}", registry.access_log());
}

#[tokio::test]
async fn the_admin_route_checks_the_token_and_every_reference() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let net = MemoryNetwork::new();
    let n = node(
        "n1",
        &net,
        "mirrors:\n  registry.example.test:\n    endpoint: [\"http://127.0.0.1:9\"]\n",
    )
    .await;
    let (addr, _task) = serve(router(n.state.clone())).await;
    let url = format!("http://{addr}/kagami/warm");
    let http = http_client();
    let post = |token: Option<&str>, body: &str| {
        let mut r = http.post(&url).body(body.to_string());
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send()
    };
    let good = r#"{"images":["registry.example.test/team/app:1"]}"#;
    // Admin off: refused.
    assert_eq!(post(Some("x"), good).await.unwrap().status(), 403);
    kagami_server::admin::enable(
        &n.state,
        kagami_server::admin::Admin::new("secret".into(), n._dir.path()),
    );
    assert_eq!(post(None, good).await.unwrap().status(), 401);
    assert_eq!(post(Some("wrong"), good).await.unwrap().status(), 401);
    for bad in [
        "not json",
        r#"{"images":[]}"#,
        r#"{"images":["registry.example.test/team/app:1","registry.example.test/Bad/Name:1"]}"#,
    ] {
        let r = post(Some("secret"), bad).await.unwrap();
        assert_eq!(r.status(), 400, "{bad}");
        let body: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
        assert_eq!(body["errors"][0]["code"], "WARM_INVALID", "{body}");
    }
    assert!(n.state.warmer().report().is_none(), "nothing was added");
    let r = post(Some("secret"), good).await.unwrap();
    assert_eq!(r.status(), 202);
    let listed: WarmReport =
        serde_json::from_slice(&http.get(&url).send().await.unwrap().bytes().await.unwrap())
            .unwrap();
    assert_eq!(listed.images.len(), 1);
    assert_eq!(listed.images[0].image, "registry.example.test/team/app:1");
    assert_eq!(listed.images[0].listed_by, "runtime");
}
