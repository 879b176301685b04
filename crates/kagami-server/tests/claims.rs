//! One upstream fetch per cluster decided by a claim (docs/p2p.md, "One upstream fetch
//! per cluster"): several real nodes (each a server with its peer API on 127.0.0.1) on
//! one in-memory network, one counting upstream shared by all of them. The in-memory
//! router can hide the `inflight:` announcements from every lookup, as if they were all
//! still on their way: only the claim then keeps the nodes from all fetching. A node
//! "dies" by its peer API refusing requests and cutting the transfers it serves.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use crate::common::*;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use kagami_config::{Digest, Plan};
use kagami_p2p::{MemoryNetwork, MemoryRouter};
use kagami_server::{
    BlobBody, FetchedManifest, NodeInfo, Peers, ServerOptions, Upstream, UpstreamError,
};

/// One upstream shared by every node, counting requests ([`Fake::blob_calls`]).
struct Shared(Arc<Fake>);

impl Upstream for Shared {
    fn manifest<'a>(
        &'a self,
        plan: &'a Plan,
        reference: &'a str,
    ) -> BoxFuture<'a, Result<FetchedManifest, UpstreamError>> {
        self.0.manifest(plan, reference)
    }

    fn blob<'a>(
        &'a self,
        plan: &'a Plan,
        digest: &'a Digest,
        offset: u64,
        from: usize,
    ) -> BoxFuture<'a, Result<BlobBody, UpstreamError>> {
        self.0.blob(plan, digest, offset, from)
    }
}

/// A node's peer API switch: once `dead`, it refuses requests and cuts what it is sending.
#[derive(Clone, Default)]
struct Life {
    dead: Arc<AtomicBool>,
    /// Milliseconds this node's peer API waits before answering a blob request.
    blob_delay_ms: Arc<AtomicUsize>,
    /// Blob requests this node's peer API received.
    blob_hits: Arc<AtomicUsize>,
}

async fn life_layer(
    State(life): State<Life>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    if life.dead.load(Ordering::SeqCst) {
        return axum::http::StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    if req.uri().path().contains("/blobs/") {
        life.blob_hits.fetch_add(1, Ordering::SeqCst);
        let delay = life.blob_delay_ms.load(Ordering::SeqCst) as u64;
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let (parts, body) = next.run(req).await.into_parts();
    let dead = life.dead.clone();
    let body = body.into_data_stream().map(move |c| {
        if dead.load(Ordering::SeqCst) {
            Err(std::io::Error::other("node died"))
        } else {
            c.map_err(std::io::Error::other)
        }
    });
    Response::from_parts(parts, Body::from_stream(body))
}

struct Node {
    id: String,
    server: Server<Shared>,
    life: Life,
    peer_addr: SocketAddr,
}

/// `n` nodes `n0`.. on `net`, each with its peer API served, sharing `upstream`.
async fn cluster(n: usize, upstream: &Arc<Fake>, net: &Arc<MemoryNetwork>) -> Vec<Node> {
    let mut nodes = Vec::new();
    for i in 0..n {
        let id = format!("n{i}");
        let server = serve(
            Shared(upstream.clone()),
            ONE_MIRROR,
            None,
            ServerOptions::default(),
        )
        .await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer_addr = listener.local_addr().unwrap();
        let router = MemoryRouter::join(net, id.clone(), peer_addr);
        let peers = Peers::new(Arc::new(router), None, false);
        peers.set_own_http_addr(peer_addr);
        let info = NodeInfo {
            peer_id: id.clone(),
            addrs: vec![],
        };
        server.state.set_peers(Arc::new(peers), info.clone());
        tokio::spawn(kagami_server::peers::advertise_store(server.state.clone()));
        let life = Life::default();
        let app = kagami_server::peer_router(server.state.clone(), info).layer(
            axum::middleware::from_fn_with_state(life.clone(), life_layer),
        );
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        nodes.push(Node {
            id,
            server,
            life,
            peer_addr,
        });
    }
    nodes
}

/// A slow upstream with one blob of `len` bytes (64 KiB chunks, `delay` apart).
fn upstream(len: usize, seed: u64, delay: Duration) -> (Arc<Fake>, Vec<u8>) {
    let data = random(len, seed);
    let mut fake = Fake::new(vec![BlobMode::Good]).with_blob(&data);
    fake.chunk_delay = delay;
    (Arc::new(fake), data)
}

/// Every node in `nodes` GETs blob `d` at once; each gets `data`, verified.
async fn pull_all(nodes: &[&Node], d: &Digest, data: &[u8]) {
    let path = blob_path(d);
    let pulls = nodes
        .iter()
        .map(|n| request(n.server.addr, "GET", &path, &[]));
    for (n, (status, _, body, complete)) in nodes
        .iter()
        .zip(futures_util::future::join_all(pulls).await)
    {
        assert_eq!(status, 200, "node {}", n.id);
        assert!(complete && body == data, "node {} got other bytes", n.id);
    }
    for n in nodes {
        eventually(
            Duration::from_secs(10),
            "the blob stored on every node",
            async || n.server.state.store().blob_size(d).is_some(),
        )
        .await;
    }
}

fn upstream_calls(fake: &Fake) -> Vec<(usize, u64)> {
    fake.blob_calls.lock().unwrap().clone()
}

/// The coordinator order of `d` over the nodes' ids.
fn order(nodes: &[Node], d: &Digest) -> Vec<String> {
    let ids: Vec<&str> = nodes.iter().map(|n| n.id.as_str()).collect();
    kagami_server::peers::coordinator_order(&d.to_string(), &ids)
}

fn by_id<'a>(nodes: &'a [Node], id: &str) -> &'a Node {
    nodes.iter().find(|n| n.id == id).unwrap()
}

#[tokio::test]
async fn a_blob_claimed_by_one_node_is_fetched_once_even_when_announcements_arrive_late() {
    let (fake, data) = upstream(2 * 1024 * 1024, 41, Duration::from_millis(10));
    let d = digest_of(&data);
    let net = MemoryNetwork::new();
    // No node sees another's `inflight:` announcement: without the claim every node
    // would find nobody fetching and go to upstream itself.
    net.hide_keys("inflight:");
    let nodes = cluster(5, &fake, &net).await;
    let all: Vec<&Node> = nodes.iter().collect();
    pull_all(&all, &d, &data).await;
    let calls = upstream_calls(&fake);
    assert_eq!(calls, vec![(0, 0)], "upstream blob GETs: {calls:?}");
}

/// A node whose router lists the claim holder without an HTTP address (a libp2p router
/// that has not proven it yet, and dials it again 2 s after a failure) waits for the address rather
/// than letting the announcements decide, which here means fetching from upstream itself:
/// in 40 runs of 50 nodes on a shaped network that happened once, and the image crossed
/// the slow link twice.
#[tokio::test]
async fn a_node_that_has_not_proven_the_holders_address_yet_waits_for_it() {
    let (fake, data) = upstream(2 * 1024 * 1024, 43, Duration::from_millis(20));
    let d = digest_of(&data);
    let net = MemoryNetwork::new();
    net.hide_keys("inflight:");
    let nodes = cluster(3, &fake, &net).await;
    // The coordinator is a member both know; the other two hold the claim and come late.
    let order = order(&nodes, &d);
    let (holder, late) = (by_id(&nodes, &order[1]), by_id(&nodes, &order[2]));
    net.unprove(&late.id, &holder.id);
    let (addr, path) = (holder.server.addr, blob_path(&d));
    let first = tokio::spawn(async move { request(addr, "GET", &path, &[]).await });
    eventually(
        Duration::from_secs(10),
        "the holder fetching from upstream",
        async || !upstream_calls(&fake).is_empty(),
    )
    .await;
    let (net2, viewer, member) = (net.clone(), late.id.clone(), holder.id.clone());
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        net2.prove(&viewer, &member);
    });
    pull_all(&[late], &d, &data).await;
    let (status, _, body, _) = first.await.unwrap();
    assert!(status == 200 && body == data);
    let calls = upstream_calls(&fake);
    assert_eq!(calls, vec![(0, 0)], "upstream blob GETs: {calls:?}");
    assert!(
        holder.life.blob_hits.load(Ordering::SeqCst) >= 1,
        "the late node streamed from the holder"
    );
}

#[tokio::test]
async fn only_the_claim_holder_announces_a_blob_in_flight_and_the_others_announce_it_later() {
    // Announcements are DHT queries. A claim's followers find their sources through the
    // coordinator, and announce the blob a few seconds after storing it (the holder at
    // once): meanwhile the coordinator names the nodes that stored it to later askers, so
    // none of them goes upstream.
    // Large enough to be fetched in pieces (4 MiB and more).
    let (fake, data) = upstream(6 * 1024 * 1024, 47, Duration::from_millis(5));
    let d = digest_of(&data);
    let net = MemoryNetwork::new();
    let nodes = cluster(5, &fake, &net).await;
    let first: Vec<&Node> = nodes[..4].iter().collect();
    pull_all(&first, &d, &data).await;
    let unique = |mut ids: Vec<String>| {
        ids.sort();
        ids.dedup();
        ids
    };
    let announced = unique(net.announcers(&d.to_string()));
    assert!(
        announced.len() < 4,
        "every node announced the blob as soon as it stored it: {announced:?}"
    );
    let inflight = net.announcers(&kagami_server::peers::inflight_key(&d));
    assert_eq!(inflight.len(), 1, "inflight announcements by {inflight:?}");
    // The coordinator names the nodes that stored it (GET changes nothing); for a blob it
    // knows nothing of, 404.
    let coordinator = by_id(&nodes, &order(&nodes, &d)[0]);
    let stored_ids = async || {
        let Some(stored) = stored_at(coordinator, &d.to_string()).await else {
            return Vec::new();
        };
        unique(
            stored["stored"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["id"].as_str().unwrap().to_string())
                .collect(),
        )
    };
    // Each node tells the coordinator once it stored the blob (a request of its own,
    // which may land just after its client has the last byte).
    eventually(
        Duration::from_secs(5),
        "the coordinator knowing the four nodes that stored the blob",
        async || stored_ids().await == ["n0", "n1", "n2", "n3"],
    )
    .await;
    let unknown = digest_of(b"nobody has this");
    assert!(stored_at(coordinator, &unknown.to_string()).await.is_none());
    // A node arriving before the announcements: the coordinator names the nodes that
    // stored the blob, and it fetches from them as from providers (in pieces, from
    // several at once).
    pull_all(&[&nodes[4]], &d, &data).await;
    assert_eq!(upstream_calls(&fake), vec![(0, 0)]);
    assert_fetched_from_several(&nodes[4]);
    eventually(
        Duration::from_secs(15),
        "every node announcing the blob",
        async || unique(net.announcers(&d.to_string())).len() == 5,
    )
    .await;
}

#[tokio::test]
async fn a_node_that_finds_one_provider_also_fetches_from_the_others_that_stored_it() {
    // Right after a cluster-wide pull only some announcements are out (they wait 2-6 s).
    // A node whose lookup finds a single provider asks the blob's coordinator which nodes
    // stored it, and fetches in pieces from several instead of all from that one.
    let (fake, data) = upstream(6 * 1024 * 1024, 48, Duration::from_millis(2));
    let d = digest_of(&data);
    let net = MemoryNetwork::new();
    let nodes = cluster(6, &fake, &net).await;
    let first: Vec<&Node> = nodes[..4].iter().collect();
    pull_all(&first, &d, &data).await;
    // Lookups of the blob find n0 alone, once its announcement is out.
    net.show_only(d.to_string(), "n0");
    eventually(
        Duration::from_secs(15),
        "n0 announcing the blob",
        async || net.announcers(&d.to_string()).iter().any(|id| id == "n0"),
    )
    .await;
    pull_all(&[&nodes[5]], &d, &data).await;
    assert_eq!(upstream_calls(&fake), vec![(0, 0)]);
    assert_fetched_from_several(&nodes[5]);
}

#[tokio::test]
async fn nodes_slow_to_answer_do_not_send_their_followers_to_the_holder() {
    // Nine nodes pull at once; every node but the holder answers peers 400 ms late (a
    // loaded node whose own source answers late). The followers of the first four askers
    // wait for them rather than also asking the holder after 250 ms (hedging, which is for
    // nodes holding a blob whole): the holder sends the blob at most FANOUT (4) times.
    let (fake, data) = upstream(2 * 1024 * 1024, 46, Duration::from_millis(20));
    let d = digest_of(&data);
    let net = MemoryNetwork::new();
    net.hide_keys("inflight:");
    let nodes = cluster(9, &fake, &net).await;
    let path = blob_path(&d);
    let first = {
        let (addr, path) = (nodes[0].server.addr, path.clone());
        tokio::spawn(async move { request(addr, "GET", &path, &[]).await })
    };
    eventually(
        Duration::from_secs(10),
        "the first node fetching from upstream",
        async || !upstream_calls(&fake).is_empty(),
    )
    .await;
    for n in &nodes[1..] {
        n.life.blob_delay_ms.store(400, Ordering::SeqCst);
    }
    let others: Vec<&Node> = nodes[1..].iter().collect();
    pull_all(&others, &d, &data).await;
    let (status, _, body, _) = first.await.unwrap();
    assert_eq!((status, body.len()), (200, data.len()));
    assert_eq!(upstream_calls(&fake), vec![(0, 0)]);
    let sent = nodes[0].life.blob_hits.load(Ordering::SeqCst);
    assert!(sent <= 4, "the holder answered {sent} blob requests");
}

#[tokio::test]
async fn when_the_claim_holder_dies_mid_fetch_another_node_takes_the_claim() {
    let (fake, data) = upstream(4 * 1024 * 1024, 42, Duration::from_millis(40));
    let d = digest_of(&data);
    let net = MemoryNetwork::new();
    net.hide_keys("inflight:");
    let nodes = cluster(4, &fake, &net).await;
    let order = order(&nodes, &d);
    // The holder is not the coordinator, which stays up to check it and grant anew.
    let holder = by_id(&nodes, &order[1]);
    let path = blob_path(&d);
    let first = {
        let (addr, path) = (holder.server.addr, path.clone());
        tokio::spawn(async move { request(addr, "GET", &path, &[]).await })
    };
    eventually(
        Duration::from_secs(10),
        "the holder fetching from upstream",
        async || !upstream_calls(&fake).is_empty(),
    )
    .await;
    let others: Vec<&Node> = nodes.iter().filter(|n| n.id != holder.id).collect();
    let pulls = futures_util::future::join_all(
        others
            .iter()
            .map(|n| request(n.server.addr, "GET", &path, &[])),
    );
    let kill = async {
        eventually(
            Duration::from_secs(10),
            "a node streaming from the holder",
            async || holder.life.blob_hits.load(Ordering::SeqCst) > 0,
        )
        .await;
        holder.life.dead.store(true, Ordering::SeqCst);
    };
    let (results, ()) = tokio::join!(pulls, kill);
    for (n, (status, _, body, complete)) in others.iter().zip(results) {
        assert_eq!(status, 200, "node {}", n.id);
        assert!(complete && body == data, "node {} got other bytes", n.id);
    }
    // The dead node's own client still gets its blob (only its peer API died).
    let (status, _, body, _) = first.await.unwrap();
    assert_eq!((status, body == data), (200, true));
    let calls = upstream_calls(&fake);
    assert!(
        calls.len() <= 2 && calls[0] == (0, 0),
        "the holder's fetch and at most one continuation expected: {calls:?}"
    );
    // The coordinator moved the claim: the dead node still renews it (only its peer API
    // died), so it would otherwise hold it still.
    let answer = ask_claim(by_id(&nodes, &order[0]), &d).await;
    assert_ne!(answer["holder"]["id"], holder.id.as_str(), "{answer}");
}

/// `node` received bytes from at least two other nodes (in pieces, from several at once).
fn assert_fetched_from_several(node: &Node) {
    let from = node.server.state.peers().unwrap().received_bytes();
    assert!(
        from.len() >= 2,
        "{} fetched from one node only: {from:?}",
        node.id
    );
}

/// `GET /p2p/claim/<key>` on `coordinator`'s peer API: `None` on a 404.
async fn stored_at(coordinator: &Node, key: &str) -> Option<serde_json::Value> {
    let url = format!("http://{}/p2p/claim/{key}", coordinator.peer_addr);
    let resp = http_client().get(url).send().await.unwrap();
    if resp.status() == 404 {
        return None;
    }
    assert_eq!(resp.status(), 200);
    Some(serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap())
}

/// Asks `coordinator`'s peer API for the claim on `d` as a node named "probe".
async fn ask_claim(coordinator: &Node, d: &Digest) -> serde_json::Value {
    let url = format!("http://{}/p2p/claim/{d}", coordinator.peer_addr);
    let body = serde_json::json!({"asker": {"id": "probe", "http_addr": "127.0.0.1:9"}});
    let resp = http_client()
        .post(url)
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap()
}

#[tokio::test]
async fn a_node_that_takes_a_claim_over_keeps_its_followers_waiting_while_upstream_answers() {
    // The registry takes 6.5 s to answer a blob GET. The holder dies (its peer API) before
    // sending a byte; the next asker takes the claim over and asks the registry too. A
    // third node then streams from that one: its peer API must wait while the registry
    // has not answered (the fetch is "connecting upstream": 4 s per request), not give up
    // after the 1 s it gives a fetch still choosing among nodes. Otherwise the third node's
    // four requests (1 s each, 0.25, 0.5 and 1 s apart) end before the registry answers,
    // and it goes to the registry too.
    let data = random(256 * 1024, 47);
    let mut fake = Fake::new(vec![BlobMode::Good]).with_blob(&data);
    fake.blob_open_delay = Duration::from_millis(6500);
    let fake = Arc::new(fake);
    let d = digest_of(&data);
    let net = MemoryNetwork::new();
    net.hide_keys("inflight:");
    let nodes = cluster(3, &fake, &net).await;
    let path = blob_path(&d);
    let get = |n: &Node| {
        let (addr, path) = (n.server.addr, path.clone());
        tokio::spawn(async move { request(addr, "GET", &path, &[]).await })
    };
    let calls = || upstream_calls(&fake).len();
    let holder = get(&nodes[0]);
    eventually(
        Duration::from_secs(10),
        "the holder asking upstream",
        async || calls() == 1,
    )
    .await;
    nodes[0].life.dead.store(true, Ordering::SeqCst);
    let taker = get(&nodes[1]);
    eventually(
        Duration::from_secs(10),
        "the second node asking upstream",
        async || calls() == 2,
    )
    .await;
    let third = get(&nodes[2]);
    for (name, pull) in [("holder", holder), ("taker", taker), ("third", third)] {
        let (status, _, body, complete) = pull.await.unwrap();
        assert_eq!(status, 200, "{name}");
        assert!(complete && body == data, "{name} got other bytes");
    }
    assert_eq!(
        upstream_calls(&fake),
        vec![(0, 0), (0, 0)],
        "the third node streamed from the second"
    );
    assert!(nodes[1].life.blob_hits.load(Ordering::SeqCst) >= 1);
}

#[tokio::test]
async fn a_coordinator_that_is_down_is_replaced_by_the_next_one() {
    let (fake, data) = upstream(2 * 1024 * 1024, 43, Duration::from_millis(10));
    let d = digest_of(&data);
    let net = MemoryNetwork::new();
    net.hide_keys("inflight:");
    let nodes = cluster(5, &fake, &net).await;
    let order = order(&nodes, &d);
    // Still a member for every router, but its peer API refuses everything.
    by_id(&nodes, &order[0])
        .life
        .dead
        .store(true, Ordering::SeqCst);
    let up: Vec<&Node> = nodes.iter().filter(|n| n.id != order[0]).collect();
    pull_all(&up, &d, &data).await;
    // The next node in the order coordinated (itself among the pullers, answering
    // itself without HTTP): one fetch still.
    let calls = upstream_calls(&fake);
    assert_eq!(calls, vec![(0, 0)], "upstream blob GETs: {calls:?}");
}

#[tokio::test]
async fn with_no_coordinator_answering_the_announcements_decide() {
    let (fake, data) = upstream(2 * 1024 * 1024, 44, Duration::from_millis(10));
    let d = digest_of(&data);
    let net = MemoryNetwork::new();
    let nodes = cluster(5, &fake, &net).await;
    let order = order(&nodes, &d);
    for id in &order[..2] {
        by_id(&nodes, id).life.dead.store(true, Ordering::SeqCst);
    }
    let up: Vec<&Node> = nodes
        .iter()
        .filter(|n| !order[..2].contains(&n.id))
        .collect();
    pull_all(&up, &d, &data).await;
    let calls = upstream_calls(&fake);
    assert!(
        !calls.is_empty() && calls.len() <= up.len(),
        "upstream blob GETs: {calls:?}"
    );
}

const TAGGED: &str =
    r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","layers":[]}"#;

/// An upstream answering `TAGGED` for tag `1` after `delay`.
fn tag_upstream(delay: Duration) -> (Arc<Fake>, Digest) {
    let mut fake = Fake::new(vec![BlobMode::Good]);
    fake.manifest_delay = delay;
    let d = fake.set_manifest("1", TAGGED);
    (Arc::new(fake), d)
}

fn manifest_calls(fake: &Fake) -> usize {
    fake.manifest_calls.load(Ordering::SeqCst)
}

/// Node `n` GETs tag `1`; it answers `TAGGED` under digest `d`.
async fn get_tag(n: &Node, d: &Digest) {
    let path = "/v2/team/app/manifests/1?ns=registry.example.test";
    let (status, h, body, _) = request(n.server.addr, "GET", path, &[]).await;
    assert_eq!(status, 200, "{}: {}", n.id, String::from_utf8_lossy(&body));
    assert_eq!(body, TAGGED.as_bytes(), "{}", n.id);
    assert_eq!(h["docker-content-digest"], d.to_string(), "{}", n.id);
}

#[tokio::test]
async fn a_cold_tag_is_resolved_once_for_the_whole_cluster() {
    // Every node resolves the tag at once; none has it, and nobody has advertised it yet.
    let (fake, d) = tag_upstream(Duration::from_millis(400));
    let net = MemoryNetwork::new();
    let nodes = cluster(5, &fake, &net).await;
    futures_util::future::join_all(nodes.iter().map(|n| get_tag(n, &d))).await;
    assert_eq!(manifest_calls(&fake), 1, "upstream manifest GETs");
}

#[tokio::test]
async fn when_the_node_resolving_a_tag_dies_the_next_asker_resolves_it() {
    let (fake, d) = tag_upstream(Duration::from_millis(600));
    let net = MemoryNetwork::new();
    let nodes = cluster(4, &fake, &net).await;
    // n0 asks first and holds the tag's claim; its peer API dies while it resolves.
    let first = get_tag(&nodes[0], &d);
    let rest = async {
        eventually(Duration::from_secs(10), "n0 asking upstream", async || {
            manifest_calls(&fake) == 1
        })
        .await;
        nodes[0].life.dead.store(true, Ordering::SeqCst);
        futures_util::future::join_all(nodes[1..].iter().map(|n| get_tag(n, &d))).await;
    };
    tokio::join!(first, rest);
    // n0's own resolution, and one for the three others (not one each).
    assert_eq!(manifest_calls(&fake), 2, "upstream manifest GETs");
}

#[tokio::test]
async fn nodes_wait_for_a_tag_resolution_longer_than_one_peer_request() {
    // The holder's peer API answers "still resolving" after 3 s; the others ask again
    // instead of resolving the tag themselves.
    let (fake, d) = tag_upstream(Duration::from_millis(3500));
    let net = MemoryNetwork::new();
    let nodes = cluster(3, &fake, &net).await;
    futures_util::future::join_all(nodes.iter().map(|n| get_tag(n, &d))).await;
    assert_eq!(manifest_calls(&fake), 1, "upstream manifest GETs");
}
