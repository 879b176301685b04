//! Shared by the server's test modules: a fake upstream with switches for misbehaviour, a
//! server on a real store bound to 127.0.0.1, and a raw HTTP client that notices cut
//! connections.

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
pub use kagami_testkit::{eventually, random};
use sha2::{Digest as _, Sha256};

/// An HTTP client for the servers under test: no proxy from the environment, 30 s at most
/// per request.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// The API path of blob `d` in the test repository of `registry.example.test`.
pub fn blob_path(d: &Digest) -> String {
    format!("/v2/team/app/blobs/{d}?ns=registry.example.test")
}

pub fn digest_of(data: &[u8]) -> Digest {
    Digest::sha256_from_bytes(&Sha256::digest(data))
}

/// How one fake attempt behaves for blobs.
#[derive(Clone)]
pub enum BlobMode {
    /// Serves the blob from the requested offset.
    Good,
    /// Sends `n` bytes from the requested offset, then fails.
    FailAfter(usize),
    /// Serves the right length of wrong bytes.
    Corrupt,
    /// Answers not found.
    Missing,
}

pub struct Fake {
    pub blobs: HashMap<Digest, Bytes>,
    pub manifests: Mutex<HashMap<String, FetchedManifest>>,
    pub attempts: Vec<BlobMode>,
    /// (attempt, offset) of every blob request.
    pub blob_calls: Mutex<Vec<(usize, u64)>>,
    pub manifest_calls: AtomicUsize,
    pub head_calls: AtomicUsize,
    pub down: std::sync::atomic::AtomicBool,
    pub chunk_delay: Duration,
    /// How long a manifest GET takes to answer.
    pub manifest_delay: Duration,
    /// How long a blob GET takes to answer (before its first byte).
    pub blob_open_delay: Duration,
}

impl Fake {
    pub fn new(attempts: Vec<BlobMode>) -> Fake {
        Fake {
            blobs: HashMap::new(),
            manifests: Mutex::new(HashMap::new()),
            attempts,
            blob_calls: Mutex::new(Vec::new()),
            manifest_calls: AtomicUsize::new(0),
            head_calls: AtomicUsize::new(0),
            down: false.into(),
            chunk_delay: Duration::ZERO,
            manifest_delay: Duration::ZERO,
            blob_open_delay: Duration::ZERO,
        }
    }

    pub fn with_blob(mut self, data: &[u8]) -> Self {
        self.blobs
            .insert(digest_of(data), Bytes::copy_from_slice(data));
        self
    }

    pub fn set_manifest(&self, tag: &str, body: &str) -> Digest {
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

pub fn chunks(
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
            tokio::time::sleep(self.manifest_delay).await;
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
                tokio::time::sleep(self.blob_open_delay).await;
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

/// A server on a real store (under `dir`), bound to 127.0.0.1, with a fake upstream.
pub struct Server<U = Fake> {
    pub addr: SocketAddr,
    pub state: AppState,
    pub dir: tempfile::TempDir,
    pub fake: Arc<U>,
}

/// The configuration of [`start`]: one mirror, `registry.example.test`.
pub const ONE_MIRROR: &str =
    "mirrors:\n  registry.example.test:\n    endpoint: [\"http://127.0.0.1:9\"]\n";

/// A server of [`ONE_MIRROR`] on an unbounded store, with `fake` as its upstream.
pub async fn start(fake: Fake, options: ServerOptions) -> Server {
    serve(fake, ONE_MIRROR, None, options).await
}

/// A server configured by `yaml` on a store of at most `max_store` bytes, with `fake` as its
/// upstream.
pub async fn serve<U: Upstream>(
    fake: U,
    yaml: &str,
    max_store: Option<u64>,
    options: ServerOptions,
) -> Server<U> {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(
        dir.path().join("store"),
        StoreOptions {
            max_size: max_store,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let config = Config::parse(yaml, std::path::Path::new("test.yaml"))
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
        dir,
        fake,
    }
}

/// A raw HTTP/1.1 request; returns (status, headers, body, complete) where `complete` is
/// false when the connection was cut before the announced length.
pub async fn request(
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

pub fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(nl) = b.windows(2).position(|w| w == b"\r\n") {
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

/// Makes `state` the member "me" of the in-memory P2P network `net` (no key), at a dead
/// address: other members fetch nothing from it.
pub fn join_as_me(state: &AppState, net: &Arc<kagami_p2p::MemoryNetwork>) {
    let me = kagami_p2p::MemoryRouter::join(net, "me", "127.0.0.1:9".parse().unwrap());
    let router: Arc<dyn kagami_p2p::Router> = Arc::new(me);
    state.set_peers(
        Arc::new(kagami_server::Peers::new(router, None, false)),
        kagami_server::NodeInfo {
            peer_id: "me".into(),
            addrs: vec![],
        },
    );
}
