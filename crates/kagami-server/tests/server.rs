//! The server with a real content store and fake upstreams (fault injection), driven over
//! real HTTP on 127.0.0.1.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use kagami_server::ServerOptions;

const REPO: &str = "/v2/team/app";

#[tokio::test]
async fn cold_blob_is_streamed_stored_and_then_served_locally() {
    let data = random(3 * 1024 * 1024 + 17, 1);
    let d = digest_of(&data);
    let s = start(
        Fake::new(vec![BlobMode::Good]).with_blob(&data),
        ServerOptions::default(),
    )
    .await;
    let url = blob_path(&d);
    let (status, h, body, complete) = request(s.addr, "GET", &url, &[]).await;
    assert_eq!(status, 200);
    assert!(complete);
    assert_eq!(body, data);
    assert_eq!(h["docker-content-digest"], d.to_string());
    assert_eq!(h["content-length"], data.len().to_string());
    assert!(!h.contains_key("content-encoding"));
    // Wait for the store to have it, then the second request makes no upstream call.
    for _ in 0..100 {
        if s.state.store().blob_size(&d).is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let calls = s.fake.blob_calls.lock().unwrap().len();
    let (status, _, body, _) = request(s.addr, "GET", &url, &[("Range", "bytes=10-19")]).await;
    assert_eq!(status, 206);
    assert_eq!(body, &data[10..20]);
    let (status, h, body, _) = request(s.addr, "HEAD", &url, &[]).await;
    assert_eq!((status, body.len()), (200, 0));
    assert_eq!(h["content-length"], data.len().to_string());
    assert_eq!(s.fake.blob_calls.lock().unwrap().len(), calls);
    let (status, h, _, _) = request(s.addr, "GET", &url, &[("Range", "bytes=999999999-")]).await;
    assert_eq!(status, 416);
    assert_eq!(h["content-range"], format!("bytes */{}", data.len()));
    let metrics = request(s.addr, "GET", "/metrics", &[]).await.2;
    let metrics = String::from_utf8(metrics).unwrap();
    assert!(
        metrics.contains("kagami_cache_requests_total{kind=\"blob\",result=\"hit\"} 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("kagami_served_bytes_total{source=\"upstream\"}"),
        "{metrics}"
    );
}

#[tokio::test]
async fn concurrent_cold_requests_share_one_upstream_fetch() {
    let data = random(8 * 1024 * 1024, 2);
    let d = digest_of(&data);
    let mut fake = Fake::new(vec![BlobMode::Good]).with_blob(&data);
    fake.chunk_delay = Duration::from_millis(2);
    let s = start(fake, ServerOptions::default()).await;
    let url = blob_path(&d);
    let mut tasks = Vec::new();
    for i in 0..20 {
        let url = url.clone();
        let addr = s.addr;
        tasks.push(tokio::spawn(async move {
            if i % 5 == 4 {
                request(addr, "GET", &url, &[("Range", "bytes=1000-")]).await
            } else {
                request(addr, "GET", &url, &[]).await
            }
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let (status, _, body, complete) = t.await.unwrap();
        assert!(complete);
        if i % 5 == 4 {
            assert_eq!(status, 206);
            assert_eq!(body, &data[1000..]);
        } else {
            assert_eq!(status, 200);
            assert_eq!(body, data);
        }
    }
    assert_eq!(
        *s.fake.blob_calls.lock().unwrap(),
        vec![(0, 0)],
        "exactly one upstream fetch"
    );
}

#[tokio::test]
async fn upstream_failing_mid_blob_continues_from_the_next_attempt_at_the_offset() {
    let data = random(2 * 1024 * 1024, 3);
    let d = digest_of(&data);
    let s = start(
        Fake::new(vec![BlobMode::FailAfter(700 * 1024), BlobMode::Good]).with_blob(&data),
        ServerOptions::default(),
    )
    .await;
    let (status, _, body, complete) = request(s.addr, "GET", &blob_path(&d), &[]).await;
    assert_eq!(status, 200);
    assert!(complete);
    assert_eq!(body, data);
    let calls = s.fake.blob_calls.lock().unwrap().clone();
    assert_eq!(calls[0], (0, 0));
    assert_eq!(
        calls[1],
        (1, 700 * 1024),
        "resumed on attempt 1 at the offset reached"
    );
}

#[tokio::test]
async fn wrong_bytes_never_reach_a_client_complete_and_are_not_stored() {
    let data = random(1024 * 1024, 4);
    let d = digest_of(&data);
    let s = start(
        Fake::new(vec![BlobMode::Corrupt]).with_blob(&data),
        ServerOptions::default(),
    )
    .await;
    let (_, _, body, complete) = request(s.addr, "GET", &blob_path(&d), &[]).await;
    assert!(!complete, "the connection must be cut");
    assert!(body.len() < data.len());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(s.state.store().blob_size(&d), None);
}

#[tokio::test]
async fn missing_blob_is_a_fast_oci_404() {
    let s = start(Fake::new(vec![BlobMode::Missing]), ServerOptions::default()).await;
    let d = digest_of(b"nothing");
    let (status, h, body, _) = request(s.addr, "GET", &blob_path(&d), &[]).await;
    assert_eq!(status, 404);
    assert_eq!(h["content-type"], "application/json");
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["errors"][0]["code"], "BLOB_UNKNOWN");
}

#[tokio::test]
async fn manifests_by_tag_and_digest_with_ttl_and_stale_if_error() {
    let fake = Fake::new(vec![BlobMode::Good]);
    let body = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","layers":[]}"#;
    let d = fake.set_manifest("1", body);
    let s = start(
        fake,
        ServerOptions {
            tag_ttl: Duration::ZERO,
            ..Default::default()
        },
    )
    .await;
    let by_tag = format!("{REPO}/manifests/1?ns=registry.example.test");
    let (status, h, got, _) = request(s.addr, "GET", &by_tag, &[]).await;
    assert_eq!(status, 200);
    assert_eq!(got, body.as_bytes());
    assert_eq!(
        h["content-type"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(h["docker-content-digest"], d.to_string());
    // By digest: from the store, no upstream call.
    let calls = s.fake.manifest_calls.load(Ordering::SeqCst);
    let (status, h, _, _) = request(
        s.addr,
        "HEAD",
        &format!("{REPO}/manifests/{d}?ns=registry.example.test"),
        &[],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(h["content-length"], body.len().to_string());
    assert_eq!(s.fake.manifest_calls.load(Ordering::SeqCst), calls);
    // TTL 0: every tag request revalidates; concurrent revalidations are coalesced.
    let heads = s.fake.head_calls.load(Ordering::SeqCst);
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let (addr, u) = (s.addr, by_tag.clone());
        tasks.push(tokio::spawn(async move {
            request(addr, "GET", &u, &[]).await.0
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    let revalidations = s.fake.head_calls.load(Ordering::SeqCst) - heads;
    assert!(
        (1..10).contains(&revalidations),
        "10 concurrent requests made {revalidations} HEADs"
    );
    // Upstream down: the cached digest is served.
    s.fake.down.store(true, Ordering::SeqCst);
    let (status, _, got, _) = request(s.addr, "GET", &by_tag, &[]).await;
    assert_eq!(status, 200);
    assert_eq!(got, body.as_bytes());
    // A tag that was never resolved is a 404 while upstream is down.
    let (status, _, _, _) = request(
        s.addr,
        "GET",
        &format!("{REPO}/manifests/2?ns=registry.example.test"),
        &[],
    )
    .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn bad_input_gets_oci_errors() {
    let s = start(Fake::new(vec![]), ServerOptions::default()).await;
    for (path, status, code) in [
        (
            "/v2/../../etc/passwd/manifests/1?ns=registry.example.test",
            400,
            "NAME_INVALID",
        ),
        (
            "/v2/team/%2e%2e/manifests/1?ns=registry.example.test",
            400,
            "NAME_INVALID",
        ),
        (
            "/v2/team/app/blobs/sha256:abc?ns=registry.example.test",
            400,
            "DIGEST_INVALID",
        ),
        (
            "/v2/team/app/manifests/-x?ns=registry.example.test",
            404,
            "MANIFEST_UNKNOWN",
        ),
        (
            "/v2/team/app/manifests/1?ns=registry.example.test%3",
            400,
            "NAME_INVALID",
        ),
        ("/v2/team/app/manifests/1?ns=a%2Fb", 400, "NAME_INVALID"),
        (
            "/v2/team/app/tags/list?ns=registry.example.test&n=x",
            400,
            "UNSUPPORTED",
        ),
        (
            "/v2/team/app/manifests/1?ns=not/a/host",
            400,
            "NAME_INVALID",
        ),
        ("/v2/team/app/manifests/1", 404, "NAME_UNKNOWN"),
        ("/v2/team/app/manifests/1?ns=quay.io", 404, "NAME_UNKNOWN"),
        (
            "/v2/team/app/blobs/uploads/?ns=registry.example.test",
            405,
            "UNSUPPORTED",
        ),
        (
            "/v2/team/app/referrers/x?ns=registry.example.test",
            404,
            "NOT_FOUND",
        ),
    ] {
        let (got, h, body, _) = request(s.addr, "GET", path, &[]).await;
        assert_eq!(got, status, "{path}");
        assert_eq!(h["content-type"], "application/json", "{path}");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["errors"][0]["code"], code, "{path}");
    }
    let (got, _, body, _) = request(
        s.addr,
        "PUT",
        "/v2/team/app/manifests/1?ns=registry.example.test",
        &[],
    )
    .await;
    assert_eq!(got, 405);
    assert!(String::from_utf8_lossy(&body).contains("UNSUPPORTED"));
    // Each refusal is counted by registry and reason and listed first in /status.json; the
    // genuine not-found answers (invalid tag, unknown path) are not refusals.
    let (_, _, body, _) = request(s.addr, "GET", "/metrics", &[]).await;
    let metrics = String::from_utf8_lossy(&body);
    for line in [
        r#"kagami_refused_requests_total{registry="-",reason="invalid_name"} 5"#,
        r#"kagami_refused_requests_total{registry="-",reason="invalid_digest"} 1"#,
        r#"kagami_refused_requests_total{registry="quay.io",reason="registry_not_served"} 1"#,
        r#"kagami_refused_requests_total{registry="docker.io",reason="registry_not_served"} 1"#,
        r#"kagami_refused_requests_total{registry="-",reason="unsupported"} 2"#,
        r#"kagami_refused_requests_total{registry="registry.example.test",reason="invalid_query"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} not in\n{metrics}");
    }
    let (_, _, body, _) = request(s.addr, "GET", "/status.json", &[]).await;
    let report: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let refused = report["refused"].as_array().unwrap();
    let names = refused
        .iter()
        .map(|r| {
            format!(
                "{} {}",
                r["registry"].as_str().unwrap(),
                r["reason"].as_str().unwrap()
            )
        })
        .collect::<Vec<_>>();
    assert_eq!(names.len(), 6, "{names:?}");
    assert!(!names.iter().any(|n| n.contains("MANIFEST")), "{names:?}");
    // A huge header is refused by the HTTP layer, not by a crash.
    let big = "x".repeat(200 * 1024);
    let (got, _, _, _) = request(s.addr, "GET", "/v2/", &[("X-Big", &big)]).await;
    assert!(got == 431 || got == 400, "huge header answered {got}");
    let (got, h, _, _) = request(s.addr, "GET", "/v2/", &[]).await;
    assert_eq!(got, 200);
    assert_eq!(h["docker-distribution-api-version"], "registry/2.0");
}

#[tokio::test]
async fn oversized_manifest_is_refused() {
    let fake = Fake::new(vec![]);
    let big = format!(
        "{{\"schemaVersion\":2,\"pad\":\"{}\"}}",
        "x".repeat(4 * 1024 * 1024 + 1)
    );
    fake.set_manifest("big", &big);
    let s = start(fake, ServerOptions::default()).await;
    let (status, _, body, _) = request(
        s.addr,
        "GET",
        &format!("{REPO}/manifests/big?ns=registry.example.test"),
        &[],
    )
    .await;
    assert_eq!(status, 404);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["errors"][0]["code"], "MANIFEST_UNKNOWN");
    assert!(
        v["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("store"),
        "{v}"
    );
}

#[tokio::test]
async fn a_tag_with_no_endpoint_to_ask_stays_current() {
    let fake = Fake::new(vec![]);
    let body = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","layers":[]}"#;
    fake.set_manifest("1", body);
    let s = start(
        fake,
        ServerOptions {
            tag_ttl: Duration::ZERO,
            disable_default_endpoint: true,
            ..Default::default()
        },
    )
    .await;
    let url = format!("{REPO}/manifests/1?ns=registry.example.test");
    assert_eq!(request(s.addr, "GET", &url, &[]).await.0, 200);
    let calls =
        s.fake.manifest_calls.load(Ordering::SeqCst) + s.fake.head_calls.load(Ordering::SeqCst);
    // The registry becomes peers-only (no endpoints, default endpoint disabled).
    let peers_only = kagami_config::Config::parse(
        "mirrors:\n  registry.example.test:\n",
        std::path::Path::new("test.yaml"),
    )
    .unwrap()
    .0;
    s.state.set_config(peers_only);
    let (status, _, got, _) = request(s.addr, "GET", &url, &[]).await;
    assert_eq!(status, 200);
    assert_eq!(got, body.as_bytes());
    assert_eq!(
        s.fake.manifest_calls.load(Ordering::SeqCst) + s.fake.head_calls.load(Ordering::SeqCst),
        calls,
        "nothing to revalidate against, so nothing was asked"
    );
    let metrics = String::from_utf8(request(s.addr, "GET", "/metrics", &[]).await.2).unwrap();
    assert!(
        metrics.contains("kagami_stale_tags_served_total 0"),
        "{metrics}"
    );
}
