//! Pulling through a plan: manifests (HEAD then GET, at most 4 MiB, verified) and blobs
//! (streamed, verified while they stream, resumable with `Range`), each trying the
//! plan's endpoint attempts in order (ARCHITECTURE.md, kagami-client).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::{Stream, StreamExt as _};
use kagami_config::oci::{Hasher, MANIFEST_ACCEPT, MAX_MANIFEST_SIZE, ManifestView};
use kagami_config::{Digest, EndpointAttempt, Plan};
use reqwest::header::{ACCEPT, CONTENT_LENGTH, CONTENT_TYPE, HeaderMap, HeaderValue, RANGE};
use reqwest::{Method, StatusCode};
use tokio::io::AsyncSeekExt as _;

use crate::client::{Client, read_limited, status_error};
use crate::error::Error;
use crate::walk::Walk;

/// A manifest or index, exactly as received, with where it came from.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub bytes: Bytes,
    pub media_type: String,
    /// sha256 (or the algorithm of the digest it was asked by).
    pub digest: Digest,
    /// The endpoint that served it (base URL).
    pub endpoint: String,
}

impl Manifest {
    /// The manifest read strictly ([`ManifestView::checked`]).
    pub fn view(&self) -> Result<ManifestView, Error> {
        ManifestView::checked(&self.bytes).map_err(|why| Error::InvalidManifest {
            url: self.endpoint.clone(),
            why,
        })
    }
}

fn pull_scopes(a: &EndpointAttempt) -> Vec<String> {
    vec![a.token_scope()]
}

impl Client {
    /// Fetches a manifest by tag or digest, trying every endpoint of the plan in order.
    pub async fn manifest(&self, plan: &Plan, reference: &str) -> Result<Manifest, Error> {
        let what = || format!("manifest {}:{reference}", plan.image.name());
        Walk::new(plan, 0, self.health())
            .run(what, |_, a| self.manifest_from(a, reference))
            .await
    }

    /// Fetches a manifest from one endpoint: HEAD to resolve a tag to a digest, then
    /// GET, refusing more than 4 MiB and checking the digest.
    pub async fn manifest_from(
        &self,
        a: &EndpointAttempt,
        reference: &str,
    ) -> Result<Manifest, Error> {
        let scopes = pull_scopes(a);
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT, HeaderValue::from_static(MANIFEST_ACCEPT));
        let by_digest: Option<Digest> = reference.parse().ok();
        let mut expected = by_digest.clone();
        if by_digest.is_none() {
            let url = a.url("manifests", reference);
            let resp = self
                .send(a, &scopes, Method::HEAD, &url, headers.clone(), None)
                .await?;
            let status = resp.status();
            if status == StatusCode::NOT_FOUND
                || status == StatusCode::UNAUTHORIZED
                || status == StatusCode::FORBIDDEN
                || status == StatusCode::TOO_MANY_REQUESTS
                || status.is_server_error()
            {
                return Err(status_error(&url, resp).await);
            }
            // Other HEAD failures (405 and the like): try GET by tag.
            if status.is_success() {
                expected = resp
                    .headers()
                    .get("docker-content-digest")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok());
            }
        }
        let get_ref = expected
            .as_ref()
            .map_or_else(|| reference.to_string(), Digest::to_string);
        let url = a.url("manifests", &get_ref);
        let resp = self
            .send(a, &scopes, Method::GET, &url, headers, None)
            .await?;
        if !resp.status().is_success() {
            return Err(status_error(&url, resp).await);
        }
        if resp.content_length().is_some_and(|l| l > MAX_MANIFEST_SIZE) {
            return Err(Error::ManifestTooBig {
                url,
                limit: MAX_MANIFEST_SIZE,
            });
        }
        let header_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.split(';').next().unwrap_or(s).trim().to_string());
        let Some(body) = read_limited(&url, resp, MAX_MANIFEST_SIZE).await? else {
            return Err(Error::ManifestTooBig {
                url,
                limit: MAX_MANIFEST_SIZE,
            });
        };
        let digest = match &expected {
            Some(d) => {
                let actual = Hasher::digest(d.algorithm(), &body);
                if actual != *d {
                    return Err(Error::DigestMismatch {
                        url,
                        expected: d.clone(),
                        actual,
                    });
                }
                actual
            }
            None => Hasher::digest(kagami_config::reference::Algorithm::Sha256, &body),
        };
        let view = ManifestView::checked(&body).map_err(|why| Error::InvalidManifest {
            url: url.clone(),
            why,
        })?;
        // The body's own media type wins over a generic Content-Type.
        let media_type = match (&view.media_type, header_type) {
            (Some(m), _) => m.clone(),
            (None, Some(h)) if h.starts_with("application/vnd.") => h,
            (None, _) => view.guess_media_type().to_string(),
        };
        Ok(Manifest {
            bytes: Bytes::from(body),
            media_type,
            digest,
            endpoint: a.endpoint.base(),
        })
    }

    /// Opens a blob on one endpoint, from `offset` on (a `Range` request). The stream
    /// checks the digest at its end when it covers the whole blob: give it the hash of
    /// the first `offset` bytes as `prefix` when resuming.
    pub async fn open_blob(
        &self,
        a: &EndpointAttempt,
        digest: &Digest,
        size: Option<u64>,
        offset: u64,
        prefix: Option<Hasher>,
    ) -> Result<BlobStream, Error> {
        let url = a.url("blobs", &digest.to_string());
        let mut headers = HeaderMap::new();
        if offset > 0
            && let Ok(v) = HeaderValue::from_str(&format!("bytes={offset}-"))
        {
            headers.insert(RANGE, v);
        }
        let resp = self
            .send(a, &pull_scopes(a), Method::GET, &url, headers, None)
            .await?;
        let status = resp.status();
        if !status.is_success() {
            return Err(status_error(&url, resp).await);
        }
        let start = if offset > 0 && status == StatusCode::PARTIAL_CONTENT {
            offset
        } else {
            0
        };
        let hasher = match (start, prefix) {
            (0, _) => Some(Hasher::new(digest.algorithm())),
            (_, p) => p,
        };
        let length = resp
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if let (Some(size), Some(len)) = (size, length)
            && start + len != size
        {
            return Err(Error::SizeMismatch {
                url,
                expected: size,
                actual: start + len,
            });
        }
        Ok(BlobStream {
            url,
            endpoint: a.endpoint.base(),
            start,
            position: start,
            content_length: length,
            size,
            digest: digest.clone(),
            hasher,
            inner: Box::pin(resp.bytes_stream()),
            done: false,
        })
    }

    /// Opens a blob from `offset` on ([`Client::open_blob`]) through the plan, trying its
    /// endpoint attempts from the one numbered `from` on ([`Walk`]).
    pub async fn open_blob_in(
        &self,
        plan: &Plan,
        from: usize,
        digest: &Digest,
        size: Option<u64>,
        offset: u64,
        prefix: Option<Hasher>,
    ) -> Result<OpenedBlob, Error> {
        let what = || format!("blob {digest}");
        let open = |attempt, a| {
            let prefix = prefix.clone();
            async move {
                let stream = self.open_blob(a, digest, size, offset, prefix).await?;
                Ok(OpenedBlob { stream, attempt })
            }
        };
        Walk::new(plan, from, self.health()).run(what, open).await
    }

    /// Downloads a blob into `file` (truncated first), trying every endpoint of the plan:
    /// a broken connection resumes on the next endpoint with `Range`; wrong content
    /// starts over on the next one. `progress` gets the bytes written so far. Returns
    /// the endpoint that completed it.
    pub async fn fetch_blob(
        &self,
        plan: &Plan,
        digest: &Digest,
        size: Option<u64>,
        file: &mut tokio::fs::File,
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<String, Error> {
        let io = |e| Error::io(format!("writing {digest}"), e);
        file.set_len(0).await.map_err(io)?;
        file.seek(std::io::SeekFrom::Start(0)).await.map_err(io)?;
        let mut state = Resume {
            written: 0,
            hasher: Hasher::new(digest.algorithm()),
        };
        let mut walk = Walk::new(plan, 0, self.health());
        while let Some((_, a)) = walk.next_try() {
            let error = match self
                .blob_once(a, digest, size, file, &mut state, progress)
                .await
            {
                Ok(()) => {
                    walk.succeeded();
                    return Ok(a.endpoint.base());
                }
                Err(e) => e,
            };
            if let Error::DigestMismatch { .. } | Error::SizeMismatch { .. } = error {
                // Wrong content: the next try starts over.
                state.reset(file).await.map_err(io)?;
                progress(0);
            }
            walk.failed(error)?;
        }
        Err(walk.all_failed(format!("blob {digest} of {}", plan.image.name())))
    }

    /// One try of one endpoint. The network side only receives; hashing and writing
    /// happen on a blocking thread fed through a bounded channel, so that both cores
    /// work on a large blob.
    async fn blob_once(
        &self,
        a: &EndpointAttempt,
        digest: &Digest,
        size: Option<u64>,
        file: &mut tokio::fs::File,
        state: &mut Resume,
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<(), Error> {
        let io = |e| Error::io(format!("writing {digest}"), e);
        let mut stream = self.open_blob(a, digest, size, state.written, None).await?;
        // Hashed on the writer thread instead (the stream still checks the size).
        stream.hasher = None;
        if stream.start != state.written {
            // The endpoint ignored the Range request: start over.
            state.reset(file).await.map_err(io)?;
        }
        let out = file.try_clone().await.map_err(io)?.into_std().await;
        let mut hasher = state.hasher.clone();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(8);
        let writer = tokio::task::spawn_blocking(move || {
            use std::io::Write as _;
            let mut w = out;
            let mut n = 0u64;
            while let Some(c) = rx.blocking_recv() {
                if let Err(e) = w.write_all(&c) {
                    return (hasher, n, Err(e));
                }
                hasher.update(&c);
                n += c.len() as u64;
            }
            let r = w.flush();
            (hasher, n, r)
        });
        // Network chunks are small (tens of KiB); batching them into 1 MiB buffers keeps
        // the hand-offs to the writer thread (and its wake-ups) few.
        const BATCH: usize = 1 << 20;
        let mut batch = bytes::BytesMut::with_capacity(BATCH);
        let mut result = Ok(());
        while let Some(item) = stream.next().await {
            match item {
                Ok(c) => {
                    batch.extend_from_slice(&c);
                    if batch.len() >= BATCH {
                        progress(stream.position);
                        let full =
                            std::mem::replace(&mut batch, bytes::BytesMut::with_capacity(BATCH));
                        if tx.send(full.freeze()).await.is_err() {
                            // The writer failed; its error is reported below.
                            break;
                        }
                    }
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        // What arrived before an error is kept too, so that a resume starts after it.
        if !batch.is_empty() {
            let _ = tx.send(batch.freeze()).await;
        }
        progress(stream.position);
        drop(tx);
        let (hasher, n, written) = writer
            .await
            .map_err(|e| io(std::io::Error::other(e.to_string())))?;
        // What was written intact stays, so that a broken connection resumes after it.
        state.written += n;
        state.hasher = hasher;
        written.map_err(io)?;
        result?;
        let actual = state.hasher.clone().finish();
        if actual != *digest {
            return Err(Error::DigestMismatch {
                url: stream.url.clone(),
                expected: digest.clone(),
                actual,
            });
        }
        Ok(())
    }
}

struct Resume {
    written: u64,
    hasher: Hasher,
}

impl Resume {
    async fn reset(&mut self, file: &mut tokio::fs::File) -> std::io::Result<()> {
        self.written = 0;
        self.hasher = Hasher::new(self.hasher.algorithm());
        file.set_len(0).await?;
        file.seek(std::io::SeekFrom::Start(0)).await?;
        Ok(())
    }
}

/// A blob opened through a plan.
pub struct OpenedBlob {
    pub stream: BlobStream,
    /// The number of the endpoint attempt that answered, so that a resume can start
    /// after it.
    pub attempt: usize,
}

/// A blob's bytes as they arrive, hashed on the way; the last item is an error if the
/// digest or size does not match.
pub struct BlobStream {
    pub url: String,
    /// The endpoint serving it (base URL).
    pub endpoint: String,
    /// The offset the bytes start at (0 when the server ignored a Range request).
    pub start: u64,
    /// The offset after the bytes yielded so far.
    pub position: u64,
    /// The number of bytes this response carries (its Content-Length), when known:
    /// the blob's total size is `start + content_length`.
    pub content_length: Option<u64>,
    size: Option<u64>,
    digest: Digest,
    /// `None` when resuming without the hash of the skipped prefix: not verified.
    hasher: Option<Hasher>,
    inner: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    done: bool,
}

impl BlobStream {
    /// The hash of everything up to [`BlobStream::position`], to resume elsewhere.
    pub fn hasher_state(&self) -> Option<Hasher> {
        self.hasher.clone()
    }

    /// The same stream without the digest check at its end, for a caller that hashes the
    /// bytes itself (the mirror's content store does): no byte is hashed twice.
    pub fn unverified(mut self) -> BlobStream {
        self.hasher = None;
        self
    }

    /// True when the stream checks the digest at its end.
    pub fn verified(&self) -> bool {
        self.hasher.is_some()
    }

    fn finish(&mut self) -> Result<(), Error> {
        if let Some(size) = self.size
            && self.position != size
        {
            return Err(Error::SizeMismatch {
                url: self.url.clone(),
                expected: size,
                actual: self.position,
            });
        }
        if let Some(h) = self.hasher.take() {
            let actual = h.finish();
            if actual != self.digest {
                return Err(Error::DigestMismatch {
                    url: self.url.clone(),
                    expected: self.digest.clone(),
                    actual,
                });
            }
        }
        Ok(())
    }
}

impl Stream for BlobStream {
    type Item = Result<Bytes, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.inner.as_mut().poll_next(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(chunk))) => {
                let this = &mut *self;
                this.position += chunk.len() as u64;
                if let Some(size) = this.size
                    && this.position > size
                {
                    this.done = true;
                    return Poll::Ready(Some(Err(Error::SizeMismatch {
                        url: this.url.clone(),
                        expected: size,
                        actual: this.position,
                    })));
                }
                if let Some(h) = &mut this.hasher {
                    h.update(&chunk);
                }
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(Some(Err(source))) => {
                self.done = true;
                Poll::Ready(Some(Err(Error::Network {
                    url: self.url.clone(),
                    source,
                })))
            }
            Poll::Ready(None) => {
                self.done = true;
                match self.finish() {
                    Ok(()) => Poll::Ready(None),
                    Err(e) => Poll::Ready(Some(Err(e))),
                }
            }
        }
    }
}

/// What a manifest HEAD says: enough to revalidate a cached tag without a GET.
#[derive(Debug, Clone)]
pub struct ManifestHead {
    pub digest: Digest,
    pub media_type: String,
    /// The endpoint that answered (base URL).
    pub endpoint: String,
}

impl Client {
    /// HEAD of a manifest by tag or digest, trying every endpoint of the plan in order.
    pub async fn head_manifest(&self, plan: &Plan, reference: &str) -> Result<ManifestHead, Error> {
        let what = || format!("manifest HEAD {}:{reference}", plan.image.name());
        Walk::new(plan, 0, self.health())
            .run(what, |_, a| self.head_manifest_from(a, reference))
            .await
    }

    /// HEAD of a blob through the plan: its size when the endpoint that answered says,
    /// and that endpoint (base URL).
    pub async fn head_blob<'p>(
        &self,
        plan: &'p Plan,
        digest: &Digest,
    ) -> Result<(Option<u64>, String), Error> {
        let what = || format!("blob HEAD {digest}");
        let head = |_, a: &'p EndpointAttempt| async move {
            Ok((self.head_blob_from(a, digest).await?, a.endpoint.base()))
        };
        Walk::new(plan, 0, self.health()).run(what, head).await
    }

    /// HEAD of a blob on one endpoint: its size when the endpoint says (`Content-Length`).
    /// Nothing is downloaded.
    pub async fn head_blob_from(
        &self,
        a: &EndpointAttempt,
        digest: &Digest,
    ) -> Result<Option<u64>, Error> {
        let url = a.url("blobs", &digest.to_string());
        let resp = self
            .send(
                a,
                &pull_scopes(a),
                Method::HEAD,
                &url,
                HeaderMap::new(),
                None,
            )
            .await?;
        if !resp.status().is_success() {
            return Err(status_error(&url, resp).await);
        }
        Ok(resp
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok()))
    }

    /// HEAD of a manifest on one endpoint; an answer without `Docker-Content-Digest` is an
    /// error (the caller then GETs).
    pub async fn head_manifest_from(
        &self,
        a: &EndpointAttempt,
        reference: &str,
    ) -> Result<ManifestHead, Error> {
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT, HeaderValue::from_static(MANIFEST_ACCEPT));
        let url = a.url("manifests", reference);
        let resp = self
            .send(a, &pull_scopes(a), Method::HEAD, &url, headers, None)
            .await?;
        if !resp.status().is_success() {
            return Err(status_error(&url, resp).await);
        }
        let h = resp.headers();
        let digest = h
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<Digest>().ok())
            .ok_or_else(|| Error::InvalidManifest {
                url: url.clone(),
                why: "HEAD answer has no valid Docker-Content-Digest".into(),
            })?;
        let media_type = h
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.split(';').next().unwrap_or(s).trim().to_string())
            .unwrap_or_default();
        Ok(ManifestHead {
            digest,
            media_type,
            endpoint: a.endpoint.base(),
        })
    }
}
