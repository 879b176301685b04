//! The server with a real content store and fake upstreams (fault injection), driven over
//! real HTTP on 127.0.0.1.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use kagami_config::{Config, Digest, Plan};
use kagami_server::{
    AppState, BlobBody, FetchedManifest, ManifestHead, ServerOptions, Upstream, UpstreamError,
    router,
};
use kagami_store::{Store, StoreOptions};
use sha2::{Digest as _, Sha256};

fn digest_of(data: &[u8]) -> Digest {
    Digest::sha256_from_bytes(&Sha256::digest(data))
}

/// How one fake attempt behaves for blobs.
#[derive(Clone)]
enum BlobMode {
    /// Serves the blob from the requested offset.
    Good,
    /// Sends `n` bytes from the requested offset, then fails.
    FailAfter(usize),
    /// Serves the right length of wrong bytes.
    Corrupt,
    /// Answers not found.
    Missing,
}

struct Fake {
    blobs: HashMap<Digest, Bytes>,
    manifests: Mutex<HashMap<String, FetchedManifest>>,
    attempts: Vec<BlobMode>,
    /// (attempt, offset) of every blob request.
    blob_calls: Mutex<Vec<(usize, u64)>>,
    manifest_calls: AtomicUsize,
    head_calls: AtomicUsize,
    down: std::sync::atomic::AtomicBool,
    chunk_delay: Duration,
}

impl Fake {
    fn new(attempts: Vec<BlobMode>) -> Fake {
        Fake {
            blobs: HashMap::new(),
            manifests: Mutex::new(HashMap::new()),
            attempts,
            blob_calls: Mutex::new(Vec::new()),
            manifest_calls: AtomicUsize::new(0),
            head_calls: AtomicUsize::new(0),
            down: false.into(),
            chunk_delay: Duration::ZERO,
        }
    }

    fn with_blob(mut self, data: &[u8]) -> Self {
        self.blobs
            .insert(digest_of(data), Bytes::copy_from_slice(data));
        self
    }

    fn set_manifest(&self, tag: &str, body: &str) -> Digest {
        let d = digest_of(body.as_bytes());
        let m = FetchedManifest {
            bytes: Bytes::copy_from_slice(body.as_bytes()),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            digest: d.clone(),
            source: "fake".into(),
        };
        let mut map = self.manifests.lock().unwrap();
        map.insert(tag.into(), m.clone());
        map.insert(d.to_string(), m);
        d
    }

    fn err(&self, message: &str, not_found: bool) -> UpstreamError {
        UpstreamError {
            message: message.into(),
            not_found,
        }
    }
}

fn chunks(
    data: Bytes,
    delay: Duration,
) -> futures_util::stream::BoxStream<'static, io::Result<Bytes>> {
    let pieces: Vec<Bytes> = (0..data.len())
        .step_by(64 * 1024)
        .map(|i| data.slice(i..(i + 64 * 1024).min(data.len())))
        .collect();
    futures_util::stream::iter(pieces)
        .then(move |c| async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            Ok(c)
        })
        .boxed()
}

impl Upstream for Fake {
    fn manifest<'a>(
        &'a self,
        _plan: &'a Plan,
        reference: &'a str,
    ) -> BoxFuture<'a, Result<FetchedManifest, UpstreamError>> {
        async move {
            self.manifest_calls.fetch_add(1, Ordering::SeqCst);
            if self.down.load(Ordering::SeqCst) {
                return Err(self.err("upstream down", false));
            }
            self.manifests
                .lock()
                .unwrap()
                .get(reference)
                .cloned()
                .ok_or_else(|| self.err("not found", true))
        }
        .boxed()
    }

    fn head_manifest<'a>(
        &'a self,
        _plan: &'a Plan,
        tag: &'a str,
    ) -> BoxFuture<'a, Result<ManifestHead, UpstreamError>> {
        async move {
            self.head_calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            if self.down.load(Ordering::SeqCst) {
                return Err(self.err("upstream down", false));
            }
            let m = self
                .manifests
                .lock()
                .unwrap()
                .get(tag)
                .cloned()
                .ok_or_else(|| self.err("not found", true))?;
            Ok(ManifestHead {
                digest: m.digest,
                media_type: m.media_type,
                source: "fake".into(),
            })
        }
        .boxed()
    }

    fn blob<'a>(
        &'a self,
        _plan: &'a Plan,
        digest: &'a Digest,
        offset: u64,
        from: usize,
    ) -> BoxFuture<'a, Result<BlobBody, UpstreamError>> {
        async move {
            for (i, mode) in self.attempts.iter().enumerate().skip(from) {
                self.blob_calls.lock().unwrap().push((i, offset));
                let Some(data) = self.blobs.get(digest).cloned() else {
                    continue;
                };
                let size = Some(data.len() as u64);
                let rest = data.slice(offset as usize..);
                let stream = match mode {
                    BlobMode::Missing => continue,
                    BlobMode::Good => chunks(rest, self.chunk_delay),
                    BlobMode::Corrupt => {
                        chunks(Bytes::from(vec![0x55u8; rest.len()]), self.chunk_delay)
                    }
                    BlobMode::FailAfter(n) => {
                        let head = rest.slice(..(*n).min(rest.len()));
                        chunks(head, self.chunk_delay)
                            .chain(futures_util::stream::once(async {
                                Err(io::Error::other("connection reset"))
                            }))
                            .boxed()
                    }
                };
                return Ok(BlobBody {
                    stream,
                    size,
                    source: format!("fake{i}"),
                    attempt: i,
                });
            }
            Err(self.err("every attempt failed", true))
        }
        .boxed()
    }
}

struct Server {
    addr: SocketAddr,
    state: AppState,
    _dir: tempfile::TempDir,
    fake: Arc<Fake>,
}

async fn start(fake: Fake, options: ServerOptions) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("store"), StoreOptions { max_size: None })
        .await
        .unwrap();
    let config = Config::parse(
        "mirrors:\n  registry.example.test:\n    endpoint: [\"http://127.0.0.1:9\"]\n",
        std::path::Path::new("test.yaml"),
    )
    .unwrap()
    .0;
    let fake = Arc::new(fake);
    let state = AppState::new(config, store, fake.clone(), options);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = router(state.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Server {
        addr,
        state,
        _dir: dir,
        fake,
    }
}

/// A raw HTTP/1.1 request; returns (status, headers, body, complete) where `complete` is
/// false when the connection was cut before the announced length.
async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, HashMap<String, String>, Vec<u8>, bool) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: kagami\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut buf))
        .await
        .expect("response within 60 s");
    let cut = read.is_err();
    // A connection cut before the headers were flushed is status 0, incomplete.
    let Some(split) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return (0, HashMap::new(), Vec::new(), false);
    };
    let head = String::from_utf8_lossy(&buf[..split]).to_string();
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let hdrs: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
        .collect();
    let mut body = buf[split + 4..].to_vec();
    if hdrs
        .get("transfer-encoding")
        .is_some_and(|t| t == "chunked")
    {
        body = dechunk(&body);
    }
    let complete = !cut
        && hdrs
            .get("content-length")
            .is_none_or(|l| method == "HEAD" || l.parse::<usize>().unwrap() == body.len());
    (status, hdrs, body, complete)
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(nl) = b.windows(2).position(|w| w == b"\r\n") else {
            break;
        };
        let Ok(n) = usize::from_str_radix(std::str::from_utf8(&b[..nl]).unwrap().trim(), 16) else {
            break;
        };
        if n == 0 || b.len() < nl + 2 + n {
            break;
        }
        out.extend_from_slice(&b[nl + 2..nl + 2 + n]);
        b = &b[nl + 4 + n..];
    }
    out
}

fn random(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

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
    let url = format!("{REPO}/blobs/{d}?ns=registry.example.test");
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
    let url = format!("{REPO}/blobs/{d}?ns=registry.example.test");
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
    let (status, _, body, complete) = request(
        s.addr,
        "GET",
        &format!("{REPO}/blobs/{d}?ns=registry.example.test"),
        &[],
    )
    .await;
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
    let (_, _, body, complete) = request(
        s.addr,
        "GET",
        &format!("{REPO}/blobs/{d}?ns=registry.example.test"),
        &[],
    )
    .await;
    assert!(!complete, "the connection must be cut");
    assert!(body.len() < data.len());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(s.state.store().blob_size(&d), None);
}

#[tokio::test]
async fn missing_blob_is_a_fast_oci_404() {
    let s = start(Fake::new(vec![BlobMode::Missing]), ServerOptions::default()).await;
    let d = digest_of(b"nothing");
    let (status, h, body, _) = request(
        s.addr,
        "GET",
        &format!("{REPO}/blobs/{d}?ns=registry.example.test"),
        &[],
    )
    .await;
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
            400,
            "MANIFEST_INVALID",
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
