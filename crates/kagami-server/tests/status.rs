//! `/status` and `/status.json` over real HTTP on 127.0.0.1, with a fake upstream.

use std::time::Duration;

use crate::common::*;
use kagami_server::ServerOptions;
use kagami_server::status::Report;

async fn status_json(addr: std::net::SocketAddr) -> Report {
    let (status, h, body, _) = request(addr, "GET", "/status.json", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(h["content-type"], "application/json");
    serde_json::from_slice(&body).unwrap_or_else(|e| {
        panic!(
            "/status.json does not parse: {e}\n{}",
            String::from_utf8_lossy(&body)
        )
    })
}

/// Waits until the recent pulls list has `n` entries (they are recorded when the body
/// has been sent, just after the client has it).
async fn with_pulls(addr: std::net::SocketAddr, n: usize) -> Report {
    eventually(
        Duration::from_secs(10),
        format!("{n} recent pulls"),
        async || {
            let r = status_json(addr).await;
            if r.recent_pulls.len() >= n {
                return Ok(r);
            }
            Err(format!("{} recent pulls", r.recent_pulls.len()))
        },
    )
    .await
}

#[tokio::test]
async fn status_json_counts_a_miss_then_a_hit_by_source() {
    let data = random(512 * 1024 + 3, 7);
    let d = digest_of(&data);
    let s = start(
        Fake::new(vec![BlobMode::Good]).with_blob(&data),
        ServerOptions::default(),
    )
    .await;
    let url = format!("/v2/team/app/blobs/{d}?ns=registry.example.test");
    let (status, _, body, complete) = request(s.addr, "GET", &url, &[]).await;
    assert!(status == 200 && complete && body == data);
    eventually(
        Duration::from_secs(10),
        "the blob to be stored",
        async || s.state.store().blob_size(&d).is_some(),
    )
    .await;
    let (status, _, body, _) = request(s.addr, "GET", &url, &[]).await;
    assert!(status == 200 && body == data);

    let r = with_pulls(s.addr, 2).await;
    assert_eq!((r.cache.blob.hits, r.cache.blob.misses), (1, 1));
    assert_eq!(r.cache.hit_ratio, Some(0.5));
    let n = data.len() as u64;
    assert_eq!(r.bytes_served.upstream, n);
    assert_eq!(r.bytes_served.local, n);
    assert_eq!(r.bytes_served.peer, 0);
    // The series saw the same bytes, in the last buckets.
    assert_eq!(r.series.interval_seconds, 10);
    assert_eq!(r.series.samples.len(), 180);
    let (local, upstream) = r
        .series
        .samples
        .iter()
        .fold((0, 0), |(l, u), x| (l + x.local, u + x.upstream));
    assert_eq!((local, upstream), (n, n));
    // Newest first: the warm request from the store, then the cold one from upstream.
    assert_eq!(r.recent_pulls.len(), 2, "{:?}", r.recent_pulls);
    let (warm, cold) = (&r.recent_pulls[0], &r.recent_pulls[1]);
    assert_eq!((warm.source.as_str(), warm.bytes), ("local", n));
    assert_eq!((cold.source.as_str(), cold.bytes), ("upstream", n));
    for p in [warm, cold] {
        assert_eq!(p.kind, "blob");
        assert_eq!(p.registry, "registry.example.test");
        assert_eq!(p.repository, "team/app");
        assert_eq!(p.digest.as_deref(), Some(d.to_string().as_str()));
        assert_eq!(
            (p.status, p.complete, p.method.as_str()),
            (200, true, "GET")
        );
    }
    // The fake's attempt answered once; the store holds the blob.
    let fake0 = r.endpoints.iter().find(|e| e.endpoint == "fake0").unwrap();
    assert_eq!((fake0.fetches, fake0.failures), (1, 0));
    assert!(fake0.healthy());
    assert_eq!(
        (r.store.blobs, r.store.bytes, r.store.max_bytes),
        (1, n, None)
    );
    assert!(!r.peers.enabled && r.members.is_empty() && r.node.peer_id.is_none());
    assert_eq!(r.node.address.as_deref(), Some("kagami"));

    // A manifest nobody has: a failure on the plan's first endpoint, with the message.
    let (status, _, _, _) = request(
        s.addr,
        "GET",
        "/v2/team/app/manifests/9.9?ns=registry.example.test",
        &[],
    )
    .await;
    assert_eq!(status, 404);
    let r = with_pulls(s.addr, 3).await;
    let ep = r
        .endpoints
        .iter()
        .find(|e| e.endpoint == "http://127.0.0.1:9/v2")
        .unwrap_or_else(|| panic!("{:?}", r.endpoints));
    assert_eq!((ep.fetches, ep.failures), (0, 1));
    assert_eq!(ep.last_error.as_deref(), Some("not found"));
    assert!(!ep.healthy());
    let m = &r.recent_pulls[0];
    assert_eq!(
        (
            m.kind.as_str(),
            m.reference.as_str(),
            m.status,
            m.source.as_str()
        ),
        ("manifest", "9.9", 404, "none")
    );
    assert_eq!(r.cache.manifest.misses, 1);
}

#[tokio::test]
async fn status_page_is_html_with_every_section() {
    let data = random(64 * 1024, 9);
    let d = digest_of(&data);
    let s = start(
        Fake::new(vec![BlobMode::Good]).with_blob(&data),
        ServerOptions::default(),
    )
    .await;
    request(
        s.addr,
        "GET",
        &format!("/v2/team/app/blobs/{d}?ns=registry.example.test"),
        &[],
    )
    .await;
    with_pulls(s.addr, 1).await;
    let (status, h, body, _) = request(s.addr, "GET", "/status", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(h["content-type"], "text/html; charset=utf-8");
    assert!(h["content-security-policy"].contains("default-src 'none'"));
    let page = String::from_utf8(body).unwrap();
    for heading in [
        "<h2>Node</h2>",
        "<h2>Store</h2>",
        "<h2>Hit ratio</h2>",
        "<h2>Bytes served</h2>",
        "<h2>Bytes served by source",
        "<h2>Members",
        "<h2>Upstream endpoints</h2>",
        "<h2>Recent pulls",
    ] {
        assert!(page.contains(heading), "{heading} missing:\n{page}");
    }
    assert!(page.contains("<svg"), "inline charts");
    assert!(page.contains("registry.example.test/team/app"));
    assert!(page.contains(&d.to_string()[..19]), "short digest");
    // No external assets and no script.
    for banned in ["<script", "src=\"http", "href=\"http", "@import", "url("] {
        assert!(!page.contains(banned), "{banned} in the page");
    }
}

/// The one string on the page a client controls directly is the Host it asked for.
#[tokio::test]
async fn a_hostile_host_header_is_escaped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = start(Fake::new(vec![BlobMode::Good]), ServerOptions::default()).await;
    let mut c = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    c.write_all(
        b"GET /status HTTP/1.1\r\nHost: <script>alert(1)</script>\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf);
    if text.starts_with("HTTP/1.1 200") {
        assert!(!text.contains("<script>"), "{text}");
        assert!(
            text.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
            "{text}"
        );
    } else {
        // hyper may refuse such a Host outright; then nothing reached the page.
        assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    }
}
