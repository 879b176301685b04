//! Sharing between nodes, with an in-memory router and in-test peers that misbehave:
//! a peer cut mid-transfer, a peer sending wrong bytes, providers that are gone.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::common::*;
use axum::body::Body;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::response::Response;
use bytes::Bytes;
use futures_util::StreamExt;
use kagami_p2p::{MemoryNetwork, MemoryRouter, Router};
use kagami_server::{NodeInfo, Peers, ServerOptions};

#[derive(Clone, Copy)]
enum PeerMode {
    Good,
    Corrupt,
    CutAfter(usize),
}

/// A fake peer API serving one blob; returns its address and a counter of its blob
/// transfers (GETs; a `HEAD` for the size, which a node may send before fetching a blob
/// in pieces, is not one).
async fn fake_peer(data: Bytes, mode: PeerMode) -> (SocketAddr, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let app = axum::Router::new().fallback(move |req: Request| {
        let (data, h) = (data.clone(), h.clone());
        async move {
            if req.method() == "GET" {
                h.fetch_add(1, Ordering::SeqCst);
            }
            let offset = req
                .headers()
                .get("range")
                .and_then(|v| v.to_str().ok())
                .and_then(|r| r.strip_prefix("bytes="))
                .and_then(|r| r.trim_end_matches('-').parse::<usize>().ok())
                .unwrap_or(0);
            let rest = data.slice(offset..);
            let status = if offset > 0 {
                StatusCode::PARTIAL_CONTENT
            } else {
                StatusCode::OK
            };
            let len = rest.len();
            let body = match mode {
                PeerMode::Good => Body::from(rest),
                PeerMode::Corrupt => Body::from(vec![0xAAu8; len]),
                PeerMode::CutAfter(n) => {
                    let head = rest.slice(..n.min(len));
                    Body::from_stream(
                        futures_util::stream::once(async move { Ok::<_, std::io::Error>(head) })
                            .chain(futures_util::stream::once(async {
                                tokio::time::sleep(Duration::from_millis(50)).await;
                                Err(std::io::Error::other("peer died"))
                            })),
                    )
                }
            };
            Response::builder()
                .status(status)
                .header("content-length", len)
                .body(body)
                .unwrap()
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, hits)
}

/// The node under test, on the in-memory network, plus providers advertising `key`.
async fn node_with_providers(fake: Fake, providers: &[(SocketAddr, &str)], key: &str) -> Server {
    let s = start(fake, ServerOptions::default()).await;
    let net = MemoryNetwork::new();
    for (addr, id) in providers {
        let r = MemoryRouter::join(&net, *id, *addr);
        r.advertise(vec![key.to_string()]).await;
        std::mem::forget(r); // stays a member for the whole test
    }
    join_as_me(&s.state, &net);
    s
}

#[tokio::test]
async fn a_peer_dying_mid_transfer_is_replaced_at_the_same_offset() {
    let data = random(1024 * 1024, 11);
    let d = digest_of(&data);
    let bytes = Bytes::from(data.clone());
    // Both die part-way (providers come in random order): the second continues where the
    // first stopped, and upstream where the second stopped, 300 + 700 KiB in either order.
    let (p1, hits1) = fake_peer(bytes.clone(), PeerMode::CutAfter(300 * 1024)).await;
    let (p2, hits2) = fake_peer(bytes.clone(), PeerMode::CutAfter(700 * 1024)).await;
    let s = node_with_providers(
        Fake::new(vec![BlobMode::Good]).with_blob(&data),
        &[(p1, "p1"), (p2, "p2")],
        &d.to_string(),
    )
    .await;
    let (status, _, body, complete) = request(s.addr, "GET", &blob_path(&d), &[]).await;
    assert_eq!(status, 200);
    assert!(complete);
    assert_eq!(body, data);
    assert_eq!(hits1.load(Ordering::SeqCst), 1);
    assert_eq!(hits2.load(Ordering::SeqCst), 1);
    assert_eq!(
        *s.fake.blob_calls.lock().unwrap(),
        vec![(0, 1000 * 1024)],
        "upstream continues at the offset where the second peer stopped"
    );
    let metrics = String::from_utf8(request(s.addr, "GET", "/metrics", &[]).await.2).unwrap();
    assert!(
        metrics.contains("kagami_served_bytes_total{source=\"peer\"}"),
        "{metrics}"
    );
    // The P2P metrics moved, with the numbers /p2p/status has.
    for line in [
        "kagami_peer_lookups_total 1\n".to_string(),
        "kagami_peer_lookup_hits_total 1\n".to_string(),
        format!(
            "kagami_peer_received_bytes_total{{peer=\"p1\"}} {}\n",
            300 * 1024
        ),
        format!(
            "kagami_peer_received_bytes_total{{peer=\"p2\"}} {}\n",
            700 * 1024
        ),
    ] {
        assert!(metrics.contains(&line), "{line} not in\n{metrics}");
    }
}

#[tokio::test]
async fn a_peer_sending_wrong_bytes_is_never_passed_on_complete_and_is_dropped() {
    let data = random(512 * 1024, 12);
    let d = digest_of(&data);
    let (bad, bad_hits) = fake_peer(Bytes::from(data.clone()), PeerMode::Corrupt).await;
    let s = node_with_providers(
        Fake::new(vec![BlobMode::Good]).with_blob(&data),
        &[(bad, "bad")],
        &d.to_string(),
    )
    .await;
    let url = blob_path(&d);
    let (_, _, body, complete) = request(s.addr, "GET", &url, &[]).await;
    assert!(
        !complete || body != data,
        "wrong bytes must not arrive complete"
    );
    assert!(body.len() < data.len() || body != data);
    // Wait for the failed fetch to finish, then the next request avoids the banned peer.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = bad_hits.load(Ordering::SeqCst);
    let (status, _, body, complete) = request(s.addr, "GET", &url, &[]).await;
    assert_eq!(status, 200);
    assert!(complete);
    assert_eq!(body, data);
    assert_eq!(
        bad_hits.load(Ordering::SeqCst),
        before,
        "the bad peer was asked again"
    );
    assert_eq!(
        s.fake.blob_calls.lock().unwrap().len(),
        1,
        "served from upstream instead"
    );
}

#[tokio::test]
async fn gone_providers_fall_through_to_upstream_fast() {
    let data = random(64 * 1024, 13);
    let d = digest_of(&data);
    // A provider whose address refuses connections.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let s = node_with_providers(
        Fake::new(vec![BlobMode::Good]).with_blob(&data),
        &[(dead, "gone")],
        &d.to_string(),
    )
    .await;
    let (status, _, body, _) = request(s.addr, "GET", &blob_path(&d), &[]).await;
    assert_eq!(status, 200);
    assert_eq!(body, data);
    // And with no provider at all.
    let other = random(1000, 14);
    let d2 = digest_of(&other);
    let s2 = node_with_providers(
        Fake::new(vec![BlobMode::Good]).with_blob(&other),
        &[],
        &d2.to_string(),
    )
    .await;
    let (status, _, body, _) = request(s2.addr, "GET", &blob_path(&d2), &[]).await;
    assert_eq!(status, 200);
    assert_eq!(body, other);
}

#[tokio::test]
async fn the_peer_api_serves_only_what_the_node_holds_and_only_to_members() {
    let data = random(10_000, 15);
    let d = digest_of(&data);
    let s = start(
        Fake::new(vec![BlobMode::Good]).with_blob(&data),
        ServerOptions::default(),
    )
    .await;
    let net = MemoryNetwork::new();
    let router: Arc<dyn Router> = Arc::new(MemoryRouter::join(
        &net,
        "me",
        "127.0.0.1:9".parse().unwrap(),
    ));
    let psk = [7u8; 32];
    s.state.set_peers(
        Arc::new(Peers::new(router, Some(&psk), false)),
        NodeInfo {
            peer_id: "me".into(),
            addrs: vec![],
        },
    );
    let info = NodeInfo {
        peer_id: "me".into(),
        addrs: vec!["/ip4/127.0.0.1/tcp/1".into()],
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let peer_addr = listener.local_addr().unwrap();
    let app = kagami_server::peer_router(s.state.clone(), info);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let token = kagami_server::peers::peer_token(&psk);
    let url = blob_path(&d);
    assert_eq!(
        request(peer_addr, "GET", &url, &[]).await.0,
        401,
        "no token"
    );
    assert_eq!(
        request(peer_addr, "GET", &url, &[("x-kagami-peer-token", "wrong")])
            .await
            .0,
        401
    );
    // Not held: 404, and no upstream request (no recursion).
    let (status, _, _, _) =
        request(peer_addr, "GET", &url, &[("x-kagami-peer-token", &token)]).await;
    assert_eq!(status, 404);
    assert!(s.fake.blob_calls.lock().unwrap().is_empty());
    // Once the node holds it (pulled through its own API), peers get it, with Range.
    assert_eq!(request(s.addr, "GET", &url, &[]).await.0, 200);
    eventually(
        Duration::from_secs(5),
        "the blob to be stored",
        async || s.state.store().blob_size(&d).is_some(),
    )
    .await;
    let (status, _, body, _) = request(
        peer_addr,
        "GET",
        &url,
        &[("x-kagami-peer-token", &token), ("Range", "bytes=100-")],
    )
    .await;
    assert_eq!(status, 206);
    assert_eq!(body, &data[100..]);
    let (status, _, body, _) = request(
        peer_addr,
        "GET",
        "/p2p/info",
        &[("x-kagami-peer-token", &token)],
    )
    .await;
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body).contains("/ip4/127.0.0.1/tcp/1"));
}

/// A provider record at this node's own peer address (left by an earlier identity of this
/// node, e.g. a restart with a new data directory) is never asked: asking oneself would
/// wait on one's own fetch.
#[tokio::test]
async fn a_record_of_this_node_under_an_old_identity_is_skipped() {
    let data = random(64 * 1024, 21);
    let d = digest_of(&data);
    let (own, hits) = fake_peer(Bytes::from(data.clone()), PeerMode::Good).await;
    let s = start(
        Fake::new(vec![BlobMode::Good]).with_blob(&data),
        ServerOptions::default(),
    )
    .await;
    let net = MemoryNetwork::new();
    let old = MemoryRouter::join(&net, "old-me", own);
    old.advertise(vec![d.to_string()]).await;
    let me: Arc<dyn Router> = Arc::new(MemoryRouter::join(&net, "me", own));
    let peers = Arc::new(Peers::new(me, None, false));
    peers.set_own_http_addr(own);
    s.state.set_peers(
        peers.clone(),
        NodeInfo {
            peer_id: "me".into(),
            addrs: vec![],
        },
    );
    assert!(peers.providers(&d.to_string()).await.is_empty());
    let (status, _, body, _) = request(s.addr, "GET", &blob_path(&d), &[]).await;
    assert_eq!(status, 200);
    assert_eq!(body, data);
    assert_eq!(hits.load(Ordering::SeqCst), 0, "this node asked itself");
    drop(old);
}

/// Announcements that crossed: this node ("me-z") found no other fetcher and went to
/// upstream; then the announcement of a node with a lower id ("a") arrives. This node
/// continues from that node at its current offset instead of fetching the whole blob too.
#[tokio::test]
async fn a_second_fetcher_yields_to_the_node_with_the_lower_id() {
    let data = random(2 * 1024 * 1024, 31);
    let d = digest_of(&data);
    let (a_addr, a_hits) = fake_peer(Bytes::from(data.clone()), PeerMode::Good).await;
    let mut fake = Fake::new(vec![BlobMode::Good]).with_blob(&data);
    fake.chunk_delay = Duration::from_millis(60); // ~2 s for the whole blob
    let s = start(fake, ServerOptions::default()).await;
    let net = MemoryNetwork::new();
    let me: Arc<dyn Router> = Arc::new(MemoryRouter::join(
        &net,
        "me-z",
        "127.0.0.1:9".parse().unwrap(),
    ));
    s.state.set_peers(
        Arc::new(Peers::new(me, None, false)),
        NodeInfo {
            peer_id: "me-z".into(),
            addrs: vec![],
        },
    );
    let key = kagami_server::peers::inflight_key(&d);
    let late = {
        let net = net.clone();
        tokio::spawn(async move {
            // Well after this node's own settle-and-look (150 ms), before its re-checks
            // (0.3 and 1 s after it started streaming) and the end of the transfer.
            tokio::time::sleep(Duration::from_millis(400)).await;
            let a = MemoryRouter::join(&net, "a", a_addr);
            a.advertise(vec![key]).await;
            a
        })
    };
    let (status, _, body, _) = request(s.addr, "GET", &blob_path(&d), &[]).await;
    assert_eq!(status, 200);
    assert_eq!(body, data);
    assert_eq!(
        a_hits.load(Ordering::SeqCst),
        1,
        "never continued from node a"
    );
    let calls = s.fake.blob_calls.lock().unwrap().clone();
    assert_eq!(calls, vec![(0, 0)], "upstream asked again: {calls:?}");
    drop(late.await.unwrap());
}

#[tokio::test]
async fn tags_in_the_store_are_advertised_at_start_for_shared_registries_only() {
    let s = start(Fake::new(vec![BlobMode::Good]), ServerOptions::default()).await;
    let d = digest_of(b"a manifest");
    let entry = kagami_store::TagEntry {
        digest: d.clone(),
        media_type: "application/vnd.oci.image.manifest.v1+json".into(),
        fetched_at: std::time::SystemTime::now(),
    };
    // Resolved before a restart: in the tag index, never advertised by this process.
    let store = s.state.store();
    store
        .put_tag("registry.example.test", "team/app", "1.0", entry.clone())
        .unwrap();
    store
        .put_tag("unshared.example.test", "team/app", "1.0", entry)
        .unwrap();
    let net = MemoryNetwork::new();
    let router: Arc<dyn Router> = Arc::new(MemoryRouter::join(
        &net,
        "me",
        "127.0.0.1:9".parse().unwrap(),
    ));
    let other = MemoryRouter::join(&net, "other", "127.0.0.1:9".parse().unwrap());
    s.state.set_peers(
        Arc::new(Peers::new(router, None, false)),
        NodeInfo {
            peer_id: "me".into(),
            addrs: vec![],
        },
    );
    assert_eq!(
        kagami_server::peers::stored_tag_keys(&s.state),
        vec!["tag:registry.example.test/team/app:1.0".to_string()]
    );
    let task = tokio::spawn(kagami_server::peers::advertise_store(s.state.clone()));
    let shared = kagami_server::peers::tag_key("registry.example.test", "team/app", "1.0");
    eventually(
        Duration::from_secs(5),
        "the stored tag to be advertised",
        async || !other.lookup(&shared, 5).await.is_empty(),
    )
    .await;
    let unshared = kagami_server::peers::tag_key("unshared.example.test", "team/app", "1.0");
    assert!(other.lookup(&unshared, 5).await.is_empty());
    kagami_server::peers::withdraw_all(&s.state).await;
    assert!(other.lookup(&shared, 5).await.is_empty());
    task.abort();
}

/// Providers come back in random order, so that nodes pulling the same blob spread over
/// its holders instead of all asking the first one the DHT lists.
#[tokio::test]
async fn providers_are_spread_over() {
    let net = MemoryNetwork::new();
    for id in ["p1", "p2", "p3"] {
        let r = MemoryRouter::join(&net, id, "127.0.0.1:9".parse().unwrap());
        r.advertise(vec!["k".to_string()]).await;
        std::mem::forget(r);
    }
    let me: Arc<dyn Router> = Arc::new(MemoryRouter::join(
        &net,
        "me",
        "127.0.0.1:9".parse().unwrap(),
    ));
    let peers = Peers::new(me, None, false);
    let mut first = std::collections::HashSet::new();
    for _ in 0..40 {
        let found = peers.providers("k").await;
        assert_eq!(found.len(), 3);
        first.insert(found[0].id.clone());
    }
    // 40 draws of 3: all three come first at least once but with probability ~1e-7.
    assert_eq!(first.len(), 3, "always asked first: {first:?}");
}
