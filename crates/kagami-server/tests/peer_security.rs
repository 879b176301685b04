//! What a node accepts from other members (docs/security.md, "P2P"): peer manifests bounded
//! however they are sent, sha512 manifests verified with their own algorithm, and tags
//! learnt from a peer worth only the tag TTL. The peers are fakes in the test (a member
//! that misbehaves), found through the in-memory router.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use crate::common::*;
use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use bytes::Bytes;
use kagami_config::Digest;
use kagami_p2p::{MemoryNetwork, MemoryRouter, Router};
use kagami_server::{NodeInfo, ServerOptions};
use sha2::Digest as _;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// A fake member answering every manifest request with `body`, sent chunked (no
/// Content-Length) in 64 KiB pieces, while `up`; counts the requests.
async fn chunked_peer(body: Bytes, up: Arc<AtomicBool>) -> (SocketAddr, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let app = axum::Router::new().fallback(move |_req: Request| {
        let (body, h, up) = (body.clone(), h.clone(), up.clone());
        async move {
            h.fetch_add(1, Ordering::SeqCst);
            if !up.load(Ordering::SeqCst) {
                return Response::builder().status(404).body(Body::empty()).unwrap();
            }
            let pieces: Vec<Result<Bytes, std::io::Error>> = body
                .chunks(64 * 1024)
                .map(|c| Ok(Bytes::copy_from_slice(c)))
                .collect();
            Response::builder()
                .header("content-type", OCI_MANIFEST)
                .body(Body::from_stream(futures_util::stream::iter(pieces)))
                .unwrap()
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, hits)
}

/// The node under test ("me") and one member "peer" at `peer` advertising `keys`.
async fn node(options: ServerOptions, peer: SocketAddr, keys: &[String]) -> (Server, MemoryRouter) {
    let s = start(Fake::new(vec![]), options).await;
    let net = MemoryNetwork::new();
    let other = MemoryRouter::join(&net, "peer", peer);
    other.advertise(keys.to_vec()).await;
    join_as_me(&s.state, &net);
    (s, other)
}

fn manifest_of(len: usize) -> Vec<u8> {
    let mut m = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": format!("sha256:{}", "0".repeat(64)), "size": 2},
        "layers": [],
    }))
    .unwrap();
    m.pop(); // the closing brace, put back after the padding
    m.extend(b",\"annotations\":{\"pad\":\"");
    m.resize(len.saturating_sub(3).max(m.len()), b'x');
    m.extend(b"\"}}");
    m
}

fn manifest_url(reference: &str) -> String {
    format!("/v2/team/app/manifests/{reference}?ns=registry.example.test")
}

/// Finding 2a: a peer manifest sent chunked (no length announced) is read only up to 4 MiB:
/// over it, it is refused even when its digest matches; under it, it is served.
#[tokio::test]
async fn chunked_peer_manifests_are_bounded_to_4_mib() {
    let up = Arc::new(AtomicBool::new(true));
    let big = manifest_of(5 * 1024 * 1024);
    let big_digest = digest_of(&big);
    let (peer, hits) = chunked_peer(Bytes::from(big.clone()), up.clone()).await;
    let (s, _other) = node(ServerOptions::default(), peer, &[big_digest.to_string()]).await;
    let (status, _, body, _) =
        request(s.addr, "GET", &manifest_url(&big_digest.to_string()), &[]).await;
    assert_eq!(hits.load(Ordering::SeqCst), 1, "the peer was asked");
    assert_eq!(
        status,
        404,
        "{}",
        String::from_utf8_lossy(&body[..body.len().min(300)])
    );
    assert!(s.state.store().blob_size(&big_digest).is_none());

    let small = manifest_of(100 * 1024);
    let small_digest = digest_of(&small);
    let (peer, _) = chunked_peer(Bytes::from(small.clone()), up).await;
    let (s, _other) = node(ServerOptions::default(), peer, &[small_digest.to_string()]).await;
    let (status, _, body, _) =
        request(s.addr, "GET", &manifest_url(&small_digest.to_string()), &[]).await;
    assert_eq!(status, 200);
    assert_eq!(body, small);
}

/// Finding 2f: a manifest asked by a sha512 digest is verified with sha512 (it always
/// failed, as sha256, and the peer was banned).
#[tokio::test]
async fn sha512_manifests_from_peers_are_verified_with_sha512() {
    let m = manifest_of(2048);
    let hex: String = sha2::Sha512::digest(&m)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let d: Digest = format!("sha512:{hex}").parse().unwrap();
    let (peer, hits) = chunked_peer(Bytes::from(m.clone()), Arc::new(AtomicBool::new(true))).await;
    let (s, _other) = node(ServerOptions::default(), peer, &[d.to_string()]).await;
    let (status, h, body, _) = request(s.addr, "GET", &manifest_url(&d.to_string()), &[]).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(body, m);
    assert_eq!(h["docker-content-digest"], d.to_string());
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    assert_eq!(s.fake.manifest_calls.load(Ordering::SeqCst), 0);

    // A peer sending other bytes for a sha512 digest is still refused.
    let wrong: Digest = format!("sha512:{}", "ab".repeat(64)).parse().unwrap();
    let (peer, _) = chunked_peer(Bytes::from(m), Arc::new(AtomicBool::new(true))).await;
    let (s, _other) = node(ServerOptions::default(), peer, &[wrong.to_string()]).await;
    let (status, _, _, _) = request(s.addr, "GET", &manifest_url(&wrong.to_string()), &[]).await;
    assert_eq!(status, 404);
}

/// Finding 2b: a tag answered by a peer is served for the tag TTL only: not written to the
/// tag index, not advertised as this node's, not served to other nodes, and not served
/// stale once the TTL is over and no source answers.
#[tokio::test]
async fn a_tag_learnt_from_a_peer_lasts_the_ttl_and_is_not_passed_on() {
    let m = manifest_of(1024);
    let d = digest_of(&m);
    let up = Arc::new(AtomicBool::new(true));
    let (peer, hits) = chunked_peer(Bytes::from(m.clone()), up.clone()).await;
    let key = "tag:registry.example.test/team/app:1.0".to_string();
    let ttl = Duration::from_secs(2);
    let (s, other) = node(
        ServerOptions {
            tag_ttl: ttl,
            ..ServerOptions::default()
        },
        peer,
        std::slice::from_ref(&key),
    )
    .await;

    let (status, h, body, _) = request(s.addr, "GET", &manifest_url("1.0"), &[]).await;
    assert_eq!(status, 200);
    assert_eq!(body, m);
    assert_eq!(h["docker-content-digest"], d.to_string());
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    // Within the TTL: served without asking again, and listed.
    let (status, _, _, _) = request(s.addr, "GET", &manifest_url("1.0"), &[]).await;
    assert_eq!(status, 200);
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    let (status, _, body, _) = request(
        s.addr,
        "GET",
        "/v2/team/app/tags/list?ns=registry.example.test",
        &[],
    )
    .await;
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body).contains("1.0"));

    // Not in the tag index, not advertised by this node (the manifest itself, verified
    // content, is).
    assert!(
        s.state
            .store()
            .get_tag("registry.example.test", "team/app", "1.0")
            .is_none()
    );
    assert!(kagami_server::peers::stored_tag_keys(&s.state).is_empty());
    let providers = other.lookup(&key, 10).await;
    assert!(providers.is_empty(), "{providers:?}");

    // Not served to other members by tag (the peer API answers only this node's own tags).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let peer_api = listener.local_addr().unwrap();
    let app = kagami_server::peer_router(
        s.state.clone(),
        NodeInfo {
            peer_id: "me".into(),
            addrs: vec![],
        },
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    assert_eq!(
        request(peer_api, "GET", &manifest_url("1.0"), &[]).await.0,
        404
    );
    assert_eq!(
        request(peer_api, "GET", &manifest_url(&d.to_string()), &[])
            .await
            .0,
        200
    );

    // Past the TTL, with the peer gone and the upstream down: not served stale.
    up.store(false, Ordering::SeqCst);
    s.fake.down.store(true, Ordering::SeqCst);
    tokio::time::sleep(ttl + Duration::from_millis(200)).await;
    let (status, _, _, _) = request(s.addr, "GET", &manifest_url("1.0"), &[]).await;
    assert_eq!(status, 404);
    assert_eq!(hits.load(Ordering::SeqCst), 2, "the peer was asked again");
    // And when a source answers again, the tag is asked anew.
    up.store(true, Ordering::SeqCst);
    let (status, _, body, _) = request(s.addr, "GET", &manifest_url("1.0"), &[]).await;
    assert_eq!(status, 200);
    assert_eq!(body, m);
    assert_eq!(hits.load(Ordering::SeqCst), 3);
}
