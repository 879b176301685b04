//! The server with a real content store and fake upstreams (fault injection), driven over
//! real HTTP on 127.0.0.1.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::common::*;
use kagami_server::ServerOptions;

const REPO: &str = "/v2/team/app";
/// The longest wait for what a test awaits (a bound, not a speed claim).
const WAIT: Duration = Duration::from_secs(20);

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
    eventually(WAIT, "the blob to be stored", async || {
        s.state.store().blob_size(&d).is_some()
    })
    .await;
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
            400,
            "DIGEST_INVALID",
        ),
        (
            "/v2/team/app/signatures/x?ns=registry.example.test",
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
        r#"kagami_refused_requests_total{registry="-",reason="invalid_digest"} 2"#,
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

// ---------------------------------------------------------------------------------------
// Resource bounds (docs/security.md, "Resource bounds"): a scripted upstream whose bodies
// trickle, never end or go wrong per registry, and which counts the bodies it has open —
// each one an upstream socket for the real client.

mod bounds {
    use std::collections::HashMap;
    use std::io;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use bytes::Bytes;
    use futures_util::future::BoxFuture;
    use futures_util::{FutureExt, StreamExt};
    use kagami_config::{Digest, Plan};
    use kagami_server::{
        BlobBody, BlobHead, FetchLimits, FetchedManifest, ServerOptions, Upstream, UpstreamError,
    };

    use crate::common::{Server, digest_of, request, serve};

    /// How a registry's bodies behave.
    #[derive(Clone, Copy)]
    pub enum Mode {
        Good,
        /// One byte every `every`; wrong bytes when `wrong`. The size is announced.
        Trickle {
            every: Duration,
            wrong: bool,
        },
        /// `chunk` bytes every `every`, for ever; no size announced.
        Endless {
            chunk: usize,
            every: Duration,
        },
        /// The blob in `chunk`-byte pieces every `every`; its size announced or not.
        Paced {
            chunk: usize,
            every: Duration,
            announce: bool,
        },
    }

    /// Counts what is open; remembers the most at once.
    #[derive(Default)]
    pub struct Gauge {
        pub now: AtomicUsize,
        pub max: AtomicUsize,
    }

    pub struct Open(Arc<Gauge>);

    impl Open {
        fn new(g: &Arc<Gauge>) -> Open {
            let n = g.now.fetch_add(1, Ordering::SeqCst) + 1;
            g.max.fetch_max(n, Ordering::SeqCst);
            Open(g.clone())
        }
    }

    impl Drop for Open {
        fn drop(&mut self) {
            self.0.now.fetch_sub(1, Ordering::SeqCst);
        }
    }

    pub struct Scripted {
        pub modes: HashMap<String, Mode>,
        pub blobs: HashMap<Digest, Bytes>,
        pub manifests: HashMap<String, FetchedManifest>,
        /// Manifest HEADs and GETs hang for ever.
        pub hang_manifests: bool,
        /// Blob bodies open.
        pub bodies: Arc<Gauge>,
        /// Manifest requests in progress.
        pub manifest_requests: Arc<Gauge>,
        pub blob_gets: AtomicUsize,
        pub blob_heads: AtomicUsize,
    }

    impl Scripted {
        pub fn new(modes: &[(&str, Mode)]) -> Scripted {
            Scripted {
                modes: modes.iter().map(|(r, m)| (r.to_string(), *m)).collect(),
                blobs: HashMap::new(),
                manifests: HashMap::new(),
                hang_manifests: false,
                bodies: Default::default(),
                manifest_requests: Default::default(),
                blob_gets: AtomicUsize::new(0),
                blob_heads: AtomicUsize::new(0),
            }
        }

        pub fn blob(mut self, data: &[u8]) -> Self {
            self.blobs
                .insert(digest_of(data), Bytes::copy_from_slice(data));
            self
        }

        fn missing(&self, what: &str) -> UpstreamError {
            UpstreamError {
                message: format!("{what}: not found"),
                not_found: true,
            }
        }

        async fn manifest_call(&self, reference: &str) -> Result<FetchedManifest, UpstreamError> {
            let _open = Open::new(&self.manifest_requests);
            if self.hang_manifests {
                std::future::pending::<()>().await;
            }
            self.manifests
                .get(reference)
                .cloned()
                .ok_or_else(|| self.missing(reference))
        }
    }

    fn paced(
        data: Bytes,
        chunk: usize,
        every: Duration,
        open: Open,
    ) -> futures_util::stream::BoxStream<'static, io::Result<Bytes>> {
        futures_util::stream::unfold((data, open), move |(mut data, open)| async move {
            if data.is_empty() {
                return None;
            }
            tokio::time::sleep(every).await;
            let piece = data.split_to(chunk.min(data.len()));
            Some((Ok(piece), (data, open)))
        })
        .boxed()
    }

    impl Upstream for Scripted {
        fn manifest<'a>(
            &'a self,
            _plan: &'a Plan,
            reference: &'a str,
        ) -> BoxFuture<'a, Result<FetchedManifest, UpstreamError>> {
            self.manifest_call(reference).boxed()
        }

        fn head_blob<'a>(
            &'a self,
            _plan: &'a Plan,
            digest: &'a Digest,
        ) -> BoxFuture<'a, Result<BlobHead, UpstreamError>> {
            async move {
                self.blob_heads.fetch_add(1, Ordering::SeqCst);
                let data = self.blobs.get(digest).ok_or_else(|| self.missing("blob"))?;
                Ok(BlobHead {
                    size: Some(data.len() as u64),
                    source: "scripted".into(),
                })
            }
            .boxed()
        }

        fn blob<'a>(
            &'a self,
            plan: &'a Plan,
            digest: &'a Digest,
            offset: u64,
            from: usize,
        ) -> BoxFuture<'a, Result<BlobBody, UpstreamError>> {
            async move {
                // One attempt per registry.
                if from > 0 {
                    return Err(self.missing("no further attempt"));
                }
                self.blob_gets.fetch_add(1, Ordering::SeqCst);
                let mode = self.modes[&plan.image.registry];
                let data = match mode {
                    Mode::Endless { .. } => Bytes::new(),
                    _ => self
                        .blobs
                        .get(digest)
                        .cloned()
                        .ok_or_else(|| self.missing("blob"))?
                        .slice(offset as usize..),
                };
                let open = Open::new(&self.bodies);
                let full = Some(offset + data.len() as u64);
                let (stream, size) = match mode {
                    Mode::Good => (paced(data, 64 * 1024, Duration::ZERO, open), full),
                    Mode::Trickle { every, wrong } => {
                        let data = if wrong {
                            Bytes::from(vec![0x55; data.len()])
                        } else {
                            data
                        };
                        (paced(data, 1, every, open), full)
                    }
                    Mode::Paced {
                        chunk,
                        every,
                        announce,
                    } => (paced(data, chunk, every, open), full.filter(|_| announce)),
                    Mode::Endless { chunk, every } => {
                        let s = futures_util::stream::unfold(open, move |open| async move {
                            tokio::time::sleep(every).await;
                            Some((Ok(Bytes::from(vec![7u8; chunk])), open))
                        })
                        .boxed();
                        (s, None)
                    }
                };
                Ok(BlobBody {
                    stream,
                    size,
                    source: format!("scripted:{}", plan.image.registry),
                    attempt: 0,
                })
            }
            .boxed()
        }
    }

    impl Server<Scripted> {
        pub fn tmp_files(&self) -> usize {
            std::fs::read_dir(self.dir.path().join("store/tmp"))
                .unwrap()
                .count()
        }

        pub async fn metric(&self, name: &str) -> f64 {
            let text =
                String::from_utf8(request(self.addr, "GET", "/metrics", &[]).await.2).unwrap();
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
                .unwrap_or_else(|| panic!("no {name} in\n{text}"))
        }
    }

    pub fn blob_url(registry: &str, d: &Digest) -> String {
        format!("/v2/team/app/blobs/{d}?ns={registry}")
    }

    pub async fn start(
        fake: Scripted,
        limits: FetchLimits,
        tag_ttl: Duration,
        max_store: Option<u64>,
    ) -> Server<Scripted> {
        let mut yaml = String::from("mirrors:\n");
        for r in fake.modes.keys() {
            yaml.push_str(&format!("  {r}:\n    endpoint: [\"http://127.0.0.1:9\"]\n"));
        }
        let options = ServerOptions {
            tag_ttl,
            disable_default_endpoint: true,
            limits,
            ..Default::default()
        };
        serve(fake, &yaml, max_store, options).await
    }

    /// Sends a GET and goes away after reading `n` bytes of the answer (or 5 s).
    pub async fn get_and_leave(addr: std::net::SocketAddr, path: &str, n: usize) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: kagami\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut got = 0;
        let mut buf = vec![0u8; 64 * 1024];
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while got < n {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(k) => got += k,
                }
            }
        })
        .await;
    }
}

use bounds::{Mode, Scripted};

/// A fetch takes the room of its next read before reading: while its source is silent,
/// the budget already counts the chunk the upstream connection may hand it (up to
/// FETCH_READ_AHEAD), so the chunk a fetch holds while waiting for room is never outside
/// the budget. The room is given back when the fetch ends.
#[tokio::test]
async fn a_fetch_holds_the_room_of_its_next_read_before_reading() {
    let blob = random(4 * 1024, 7);
    let fake = Scripted::new(&[(
        "trickle.example.test",
        Mode::Trickle {
            every: Duration::from_millis(50),
            wrong: false,
        },
    )])
    .blob(&blob);
    // At least 8 read-aheads: the whole room of one is taken.
    let budget = 8 * kagami_server::FETCH_READ_AHEAD;
    // 20 bytes/s: cut after 3 s for being too slow (the only source), which ends the fetch.
    let limits = kagami_server::FetchLimits {
        fetch_memory: budget,
        min_rate: 1000,
        rate_window: Duration::from_secs(3),
        ..Default::default()
    };
    let s = bounds::start(fake, limits, Duration::from_secs(300), None).await;
    let (addr, url) = (
        s.addr,
        bounds::blob_url("trickle.example.test", &digest_of(&blob)),
    );
    let client = tokio::spawn(async move { request(addr, "GET", &url, &[]).await });
    let ahead = kagami_server::FETCH_READ_AHEAD as f64;
    eventually(
        WAIT,
        "the fetch to hold the room of its next read",
        async || {
            let held = s.metric("kagami_fetch_memory_bytes").await;
            if held >= ahead && held <= budget as f64 {
                Ok(())
            } else {
                Err(format!("{held} bytes held (read ahead {ahead})"))
            }
        },
    )
    .await;
    let (status, ..) = client.await.unwrap();
    assert_eq!(status, 200, "the answer started before the source was cut");
    // The source is cut for being too slow: the fetch ends and gives its room back.
    eventually(WAIT, "the room to be given back", async || {
        match s.metric("kagami_fetch_memory_bytes").await {
            0.0 => Ok(()),
            n => Err(format!("{n} bytes still held")),
        }
    })
    .await;
}

#[tokio::test]
async fn forty_trickling_blobs_stay_within_the_fetch_budget_and_release_their_sockets() {
    let blobs: Vec<Vec<u8>> = (0..40).map(|i| random(64 * 1024, 100 + i)).collect();
    let mut fake = Scripted::new(&[(
        "trickle.example.test",
        Mode::Trickle {
            every: Duration::from_millis(100),
            wrong: false,
        },
    )]);
    for b in &blobs {
        fake = fake.blob(b);
    }
    // Three fetches at once, and what one fetch may hold at most in memory for all of
    // them; a cold request waits 300 ms for room.
    let budget = kagami_server::FETCH_MEMORY_MAX;
    let limits = kagami_server::FetchLimits {
        max_fetches: 3,
        fetch_memory: budget,
        queue_wait: Duration::from_millis(300),
        min_rate: 1000,
        rate_window: Duration::from_secs(1),
        abandon_grace: Duration::from_millis(200),
        ..Default::default()
    };
    let s = bounds::start(fake, limits, Duration::from_secs(300), None).await;
    let mut tasks = Vec::new();
    for b in &blobs {
        let (addr, url) = (
            s.addr,
            bounds::blob_url("trickle.example.test", &digest_of(b)),
        );
        tasks.push(tokio::spawn(async move {
            request(addr, "GET", &url, &[]).await
        }));
    }
    // While they run: never more than the budget's fetches, nor memory.
    let mut most_memory = 0.0f64;
    let deadline = std::time::Instant::now() + Duration::from_millis(800);
    while std::time::Instant::now() < deadline {
        most_memory = most_memory.max(s.metric("kagami_fetch_memory_bytes").await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut refused = 0;
    for t in tasks {
        let (status, h, _, complete) = t.await.unwrap();
        match status {
            503 => {
                refused += 1;
                assert_eq!(h["retry-after"], "5");
            }
            // Admitted, then cut for being too slow (the only source).
            200 => assert!(!complete),
            other => panic!("status {other}"),
        }
    }
    let most = s.fake.bodies.max.load(Ordering::SeqCst);
    assert!(most <= 3, "{most} upstream bodies open at once");
    assert!(
        most_memory > 0.0 && most_memory <= budget as f64,
        "{most_memory}"
    );
    assert!(refused >= 30, "{refused} refused");
    assert_eq!(
        s.metric("kagami_fetches_refused_total").await,
        refused as f64
    );
    // Every upstream socket is released, and the memory given back.
    eventually(
        WAIT,
        "every upstream socket to be released",
        async || match s.fake.bodies.now.load(Ordering::SeqCst) {
            0 => Ok(()),
            n => Err(format!("{n} upstream bodies still open")),
        },
    )
    .await;
    assert!(s.metric("kagami_slow_sources_total").await >= 1.0);
    assert_eq!(s.metric("kagami_fetch_memory_bytes").await, 0.0);
    assert_eq!(s.metric("kagami_inflight_fetches").await, 0.0);
    eventually(WAIT, "the store's temporary files to be gone", async || {
        s.tmp_files() == 0
    })
    .await;
}

#[tokio::test]
async fn a_registry_trickling_wrong_bytes_does_not_hold_up_another_registry() {
    let data = random(512 * 1024, 7);
    let d = digest_of(&data);
    let fake = Scripted::new(&[
        (
            "bad.example.test",
            Mode::Trickle {
                every: Duration::from_millis(50),
                wrong: true,
            },
        ),
        ("good.example.test", Mode::Good),
    ])
    .blob(&data);
    let s = bounds::start(
        fake,
        kagami_server::FetchLimits::default(),
        Duration::from_secs(300),
        None,
    )
    .await;
    let (addr, bad) = (s.addr, bounds::blob_url("bad.example.test", &d));
    let slow = tokio::spawn(async move { request(addr, "GET", &bad, &[]).await });
    eventually(WAIT, "one upstream body to be open", async || {
        s.fake.bodies.now.load(Ordering::SeqCst) == 1
    })
    .await;
    // The good registry's client gets the blob, well before the bad one's would end
    // (26 s at that pace); the deadline is generous, not a speed claim.
    let good = bounds::blob_url("good.example.test", &d);
    let (status, _, body, complete) =
        tokio::time::timeout(Duration::from_secs(20), request(s.addr, "GET", &good, &[]))
            .await
            .expect("the good registry's client is not held up by the bad one");
    assert_eq!(status, 200);
    assert!(complete);
    assert_eq!(body, data);
    eventually(WAIT, "the blob to be stored", async || {
        s.state.store().blob_size(&d).is_some()
    })
    .await;
    slow.abort();
}

/// A server whose registry `endless.example.test` sends 64 KiB every millisecond for ever,
/// with `--max-blob-size` and the store's limit as given.
async fn endless_server(max_blob_size: u64, max_store: Option<u64>) -> Server<bounds::Scripted> {
    let endless = Mode::Endless {
        chunk: 64 * 1024,
        every: Duration::from_millis(1),
    };
    let limits = kagami_server::FetchLimits {
        max_blob_size,
        ..Default::default()
    };
    bounds::start(
        Scripted::new(&[("endless.example.test", endless)]),
        limits,
        Duration::from_secs(300),
        max_store,
    )
    .await
}

#[tokio::test]
async fn an_endless_blob_is_cut_at_the_cap_and_leaves_nothing() {
    let d = digest_of(b"never ends");
    let s = endless_server(2 * 1024 * 1024, None).await;
    let url = bounds::blob_url("endless.example.test", &d);
    // Chunked (no size announced): cut before its end, at most the cap.
    let (status, _, body, _) = request(s.addr, "GET", &url, &[]).await;
    assert_eq!(status, 200);
    assert!(body.len() <= 2 * 1024 * 1024, "{}", body.len());
    eventually(WAIT, "every upstream body to be closed", async || {
        s.fake.bodies.now.load(Ordering::SeqCst) == 0
    })
    .await;
    eventually(WAIT, "the store's temporary files to be gone", async || {
        s.tmp_files() == 0
    })
    .await;
    assert_eq!(s.state.store().usage().blobs, 0);
    assert_eq!(s.state.store().usage().tmp_bytes, 0);
    assert_eq!(s.metric("kagami_blobs_too_large_total").await, 1.0);
}

#[tokio::test]
async fn an_endless_blob_is_cut_at_the_store_limit_then_passed_through_capped() {
    let d = digest_of(b"never ends either");
    let s = endless_server(4 * 1024 * 1024, Some(1024 * 1024)).await;
    let url = bounds::blob_url("endless.example.test", &d);
    // The store's limit counts tmp/: the write stops at 1 MiB.
    let (status, _, body, _) = request(s.addr, "GET", &url, &[]).await;
    assert_eq!(status, 200);
    assert!(body.len() <= 1024 * 1024, "{}", body.len());
    eventually(WAIT, "the store's temporary files to be gone", async || {
        s.tmp_files() == 0
    })
    .await;
    eventually(WAIT, "the fetch to end", async || {
        s.metric("kagami_inflight_fetches").await == 0.0
    })
    .await;
    // The store is now "full" for a while: the next request is passed through, and cut at
    // --max-blob-size.
    let (status, _, body, _) = request(s.addr, "GET", &url, &[]).await;
    assert_eq!(status, 200);
    assert!(body.len() <= 4 * 1024 * 1024, "{}", body.len());
    assert!(body.len() > 1024 * 1024, "passed through: {}", body.len());
    eventually(WAIT, "every upstream body to be closed", async || {
        s.fake.bodies.now.load(Ordering::SeqCst) == 0
    })
    .await;
    assert_eq!(s.tmp_files(), 0);
    let u = s.state.store().usage();
    assert_eq!((u.blobs, u.bytes, u.tmp_bytes), (0, 0, 0));
}

#[tokio::test]
async fn a_blob_named_by_a_manifest_stops_at_its_descriptor_size() {
    let layer = random(300_000, 11);
    let d = digest_of(&layer);
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{d}","size":1000}},"layers":[]}}"#
    );
    let md = digest_of(manifest.as_bytes());
    // The registry sends the blob unannounced, longer than its manifest says.
    let mut fake = Scripted::new(&[(
        "liar.example.test",
        Mode::Paced {
            chunk: 64 * 1024,
            every: Duration::ZERO,
            announce: false,
        },
    )])
    .blob(&layer);
    let m = manifest_for_test(&manifest, &md);
    fake.manifests.insert("1".into(), m.clone());
    fake.manifests.insert(md.to_string(), m);
    let s = bounds::start(
        fake,
        kagami_server::FetchLimits::default(),
        Duration::from_secs(300),
        None,
    )
    .await;
    let (status, _, _, _) = request(
        s.addr,
        "GET",
        "/v2/team/app/manifests/1?ns=liar.example.test",
        &[],
    )
    .await;
    assert_eq!(status, 200);
    let (status, h, body, complete) = request(
        s.addr,
        "GET",
        &bounds::blob_url("liar.example.test", &d),
        &[],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(h["content-length"], "1000", "the size the manifest gives");
    assert!(!complete && body.len() <= 1000);
    assert_eq!(s.metric("kagami_blobs_too_large_total").await, 1.0);
    eventually(WAIT, "the store's temporary files to be gone", async || {
        s.tmp_files() == 0
    })
    .await;
    assert_eq!(s.state.store().blob_size(&d), None);
}

fn manifest_for_test(body: &str, d: &kagami_config::Digest) -> kagami_server::FetchedManifest {
    kagami_server::FetchedManifest {
        bytes: bytes::Bytes::copy_from_slice(body.as_bytes()),
        media_type: "application/vnd.oci.image.manifest.v1+json".into(),
        digest: d.clone(),
        source: "scripted".into(),
    }
}

#[tokio::test]
async fn a_fetch_nobody_follows_is_cancelled_unless_worth_finishing() {
    // Large and of unknown size: cancelled once its client has gone (finishing it would
    // take 26 s at this pace, longer than the test's deadlines).
    let big = random(32 * 1024 * 1024, 21);
    let dbig = digest_of(&big);
    // Small: finished and stored although its client went away.
    let small = random(200 * 1024, 22);
    let dsmall = digest_of(&small);
    let fake = Scripted::new(&[
        (
            "big.example.test",
            Mode::Paced {
                chunk: 64 * 1024,
                every: Duration::from_millis(50),
                announce: false,
            },
        ),
        (
            "small.example.test",
            Mode::Paced {
                chunk: 16 * 1024,
                every: Duration::from_millis(20),
                announce: true,
            },
        ),
    ])
    .blob(&big)
    .blob(&small);
    let limits = kagami_server::FetchLimits {
        abandon_grace: Duration::from_millis(200),
        ..Default::default()
    };
    let s = bounds::start(fake, limits, Duration::from_secs(300), None).await;
    bounds::get_and_leave(
        s.addr,
        &bounds::blob_url("big.example.test", &dbig),
        200_000,
    )
    .await;
    bounds::get_and_leave(
        s.addr,
        &bounds::blob_url("small.example.test", &dsmall),
        20_000,
    )
    .await;
    eventually(
        WAIT,
        "the small blob to be finished and stored",
        async || s.state.store().blob_size(&dsmall) == Some(small.len() as u64),
    )
    .await;
    eventually(WAIT, "the big blob's fetch to end", async || {
        s.fake.bodies.now.load(Ordering::SeqCst) == 0
    })
    .await;
    assert_eq!(s.state.store().blob_size(&dbig), None);
    eventually(WAIT, "the store's temporary files to be gone", async || {
        s.tmp_files() == 0
    })
    .await;
    assert_eq!(s.metric("kagami_fetches_cancelled_total").await, 1.0);
}

#[tokio::test]
async fn an_abandoned_tag_revalidation_ends_and_releases_its_connection() {
    let mut fake = Scripted::new(&[("hang.example.test", Mode::Good)]);
    fake.hang_manifests = true;
    let limits = kagami_server::FetchLimits {
        revalidation_timeout: Duration::from_millis(500),
        ..Default::default()
    };
    let s = bounds::start(fake, limits, Duration::ZERO, None).await;
    let url = "/v2/team/app/manifests/1?ns=hang.example.test";
    // The client gives up before the upstream answers.
    let (addr, u) = (s.addr, url.to_string());
    let client = tokio::spawn(async move { request(addr, "GET", &u, &[]).await });
    eventually(WAIT, "the upstream manifest request to start", async || {
        s.fake.manifest_requests.now.load(Ordering::SeqCst) == 1
    })
    .await;
    client.abort();
    eventually(
        WAIT,
        "the revalidation nobody waits for to release its upstream request",
        async || s.fake.manifest_requests.now.load(Ordering::SeqCst) == 0,
    )
    .await;
    assert_eq!(s.metric("kagami_revalidation_timeouts_total").await, 1.0);
    // The next request starts a new revalidation (the old one left the map), which times
    // out for this client with a 404.
    let (status, _, _, _) = request(s.addr, "GET", url, &[]).await;
    assert_eq!(status, 404);
    assert_eq!(s.metric("kagami_revalidation_timeouts_total").await, 2.0);
}

#[tokio::test]
async fn a_head_of_a_cold_blob_downloads_nothing() {
    let data = random(100_000, 31);
    let d = digest_of(&data);
    let s = bounds::start(
        Scripted::new(&[("head.example.test", Mode::Good)]).blob(&data),
        kagami_server::FetchLimits::default(),
        Duration::from_secs(300),
        None,
    )
    .await;
    let url = bounds::blob_url("head.example.test", &d);
    let (status, h, body, _) = request(s.addr, "HEAD", &url, &[]).await;
    assert_eq!((status, body.len()), (200, 0));
    assert_eq!(h["content-length"], "100000");
    assert_eq!(h["docker-content-digest"], d.to_string());
    assert_eq!(s.fake.blob_heads.load(Ordering::SeqCst), 1);
    assert_eq!(
        s.fake.blob_gets.load(Ordering::SeqCst),
        0,
        "no GET upstream"
    );
    assert_eq!(s.state.store().usage().in_flight, 0);
    let missing = bounds::blob_url("head.example.test", &digest_of(b"absent"));
    assert_eq!(request(s.addr, "HEAD", &missing, &[]).await.0, 404);
}
