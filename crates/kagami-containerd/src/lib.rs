//! A small client of containerd's gRPC API, for what kagami needs to share the images a
//! node's containerd holds: the images of one namespace, the content store (presence, size,
//! streamed reads) and a signal when images or content change.
//!
//! Every request carries the namespace in the `containerd-namespace` gRPC metadata header.
//! Blobs are streamed as containerd sends them (chunks of at most 1 MiB): nothing here
//! holds a whole blob in memory except [`Containerd::read_small`], which is bounded by its
//! caller. Unary calls time out after [`CALL_TIMEOUT`]; a streamed read fails when
//! containerd sends nothing for [`IDLE_TIMEOUT`].
//!
//! Invariant: read-only — this crate never writes to containerd (no leases, no labels, no
//! deletes).

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::events_client::EventsClient;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::version_client::VersionClient;
use containerd_client::services::v1::{
    InfoRequest, ListContentRequest, ListImagesRequest, ReadContentRequest, SubscribeRequest,
};
use containerd_client::tonic::metadata::{AsciiMetadataValue, MetadataValue};
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::{Code, Request, Status};
use futures_util::StreamExt;
use futures_util::stream::BoxStream;

/// The namespace the kubelet's CRI plugin uses, hence where a Kubernetes node's images are.
pub const DEFAULT_NAMESPACE: &str = "k8s.io";
/// containerd's usual socket.
pub const DEFAULT_SOCKET: &str = "/run/containerd/containerd.sock";
/// Longest wait for a unary call (and for a connection).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest silence in the middle of a streamed read before it fails.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// The metadata header that names the namespace of a request.
const NAMESPACE_HEADER: &str = "containerd-namespace";

/// Errors of this crate; every one names the socket.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("containerd socket {socket} does not exist (is containerd running there?)")]
    NoSocket { socket: PathBuf },
    #[error("cannot connect to containerd at {socket}: {reason}")]
    Connect { socket: PathBuf, reason: String },
    #[error(
        "invalid containerd namespace {0:?}: letters and digits, separated by single '.', '_' or '-', at most 76 characters"
    )]
    Namespace(String),
    #[error("{digest} is not in the content store of containerd at {socket}")]
    NotFound { socket: PathBuf, digest: String },
    #[error("{digest} in containerd at {socket} is {size} bytes, more than the {max} allowed")]
    TooLarge {
        socket: PathBuf,
        digest: String,
        size: u64,
        max: u64,
    },
    #[error("containerd at {socket}: {call} failed: {code:?}: {message}")]
    Call {
        socket: PathBuf,
        call: &'static str,
        code: Code,
        message: String,
    },
}

impl Error {
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::NotFound { .. })
    }
}

/// What an image name points to (containerd's `Descriptor`, annotations left out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
}

/// One image of the namespace: its name as containerd stores it (a full reference such as
/// `docker.io/library/nginx:1.27`, or anything a tool chose) and its target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub name: String,
    pub target: Descriptor,
}

/// Something changed in the namespace's images or content (an event topic such as
/// `/images/create` or `/content/delete`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changed {
    pub topic: String,
}

/// A connection to containerd, scoped to one namespace. Cheap to clone; the underlying
/// channel reconnects by itself when containerd restarts.
#[derive(Clone)]
pub struct Containerd {
    channel: Channel,
    socket: PathBuf,
    namespace: String,
    namespace_header: AsciiMetadataValue,
}

impl std::fmt::Debug for Containerd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Containerd")
            .field("socket", &self.socket)
            .field("namespace", &self.namespace)
            .finish()
    }
}

/// containerd's namespace rule: labels of letters and digits joined by single `.`, `_` or
/// `-`, at most 76 characters.
pub fn valid_namespace(ns: &str) -> bool {
    let sep = |c: char| matches!(c, '.' | '_' | '-');
    !ns.is_empty()
        && ns.len() <= 76
        && ns.chars().all(|c| c.is_ascii_alphanumeric() || sep(c))
        && ns.split(sep).all(|label| !label.is_empty())
}

impl Containerd {
    /// Connects to the socket and checks that containerd answers (its version).
    pub async fn connect(socket: &Path, namespace: &str) -> Result<Containerd, Error> {
        if !valid_namespace(namespace) {
            return Err(Error::Namespace(namespace.to_string()));
        }
        let namespace_header: AsciiMetadataValue = MetadataValue::try_from(namespace)
            .map_err(|_| Error::Namespace(namespace.to_string()))?;
        if !socket.exists() {
            return Err(Error::NoSocket {
                socket: socket.to_path_buf(),
            });
        }
        let connect_err = |reason: String| Error::Connect {
            socket: socket.to_path_buf(),
            reason,
        };
        let channel = tokio::time::timeout(CALL_TIMEOUT, containerd_client::connect(socket))
            .await
            .map_err(|_| connect_err(format!("no connection within {CALL_TIMEOUT:?}")))?
            .map_err(|e| connect_err(error_chain(&e)))?;
        let c = Containerd {
            channel,
            socket: socket.to_path_buf(),
            namespace: namespace.to_string(),
            namespace_header,
        };
        let version = VersionClient::new(c.channel.clone())
            .version(c.request(()))
            .await
            .map_err(|s| c.call_error("Version", s))?;
        tracing::debug!(socket = %socket.display(), version = %version.get_ref().version, "connected to containerd");
        Ok(c)
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// A request in this client's namespace, with the unary timeout.
    fn request<T>(&self, message: T) -> Request<T> {
        let mut r = self.stream_request(message);
        r.set_timeout(CALL_TIMEOUT);
        r
    }

    /// A request in this client's namespace, without a deadline (streams).
    fn stream_request<T>(&self, message: T) -> Request<T> {
        let mut r = Request::new(message);
        r.metadata_mut()
            .insert(NAMESPACE_HEADER, self.namespace_header.clone());
        r
    }

    fn call_error(&self, call: &'static str, s: Status) -> Error {
        Error::Call {
            socket: self.socket.clone(),
            call,
            code: s.code(),
            message: s.message().to_string(),
        }
    }

    fn not_found(&self, digest: &str) -> Error {
        Error::NotFound {
            socket: self.socket.clone(),
            digest: digest.to_string(),
        }
    }

    /// Every image of the namespace.
    pub async fn images(&self) -> Result<Vec<Image>, Error> {
        let resp = ImagesClient::new(self.channel.clone())
            .list(self.request(ListImagesRequest::default()))
            .await
            .map_err(|s| self.call_error("Images.List", s))?;
        Ok(resp
            .into_inner()
            .images
            .into_iter()
            .filter_map(|i| {
                let t = i.target?;
                Some(Image {
                    name: i.name,
                    target: Descriptor {
                        media_type: t.media_type,
                        digest: t.digest,
                        size: u64::try_from(t.size).ok()?,
                    },
                })
            })
            .collect())
    }

    /// The size of a blob in the namespace's content store, `None` when it is not there.
    pub async fn info(&self, digest: &str) -> Result<Option<u64>, Error> {
        let req = InfoRequest {
            digest: digest.to_string(),
        };
        match ContentClient::new(self.channel.clone())
            .info(self.request(req))
            .await
        {
            Ok(r) => Ok(r.into_inner().info.and_then(|i| u64::try_from(i.size).ok())),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(self.call_error("Content.Info", s)),
        }
    }

    /// Every blob of the namespace's content store with its size (one streamed call: how a
    /// whole scan learns what is present without asking blob by blob).
    pub async fn list_content(&self) -> Result<HashMap<String, u64>, Error> {
        let resp = ContentClient::new(self.channel.clone())
            .list(self.request(ListContentRequest::default()))
            .await
            .map_err(|s| self.call_error("Content.List", s))?;
        let mut stream = resp.into_inner();
        let mut all = HashMap::new();
        loop {
            let next = tokio::time::timeout(IDLE_TIMEOUT, stream.message())
                .await
                .map_err(|_| {
                    self.call_error(
                        "Content.List",
                        Status::deadline_exceeded("containerd stopped sending"),
                    )
                })?
                .map_err(|s| self.call_error("Content.List", s))?;
            let Some(batch) = next else {
                return Ok(all);
            };
            for info in batch.info {
                if let Ok(size) = u64::try_from(info.size) {
                    all.insert(info.digest, size);
                }
            }
        }
    }

    /// Streams `len` bytes of a blob from `offset` (to its end when `len` is `None`), as
    /// containerd sends them. A blob that is not there is [`Error::NotFound`] before any
    /// byte; a stream that ends early or stalls ends with an error item.
    pub async fn read(
        &self,
        digest: &str,
        offset: u64,
        len: Option<u64>,
    ) -> Result<BoxStream<'static, io::Result<Bytes>>, Error> {
        if len == Some(0) {
            // containerd reads the whole blob for size 0.
            return Ok(futures_util::stream::empty().boxed());
        }
        let to_i64 = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let req = ReadContentRequest {
            digest: digest.to_string(),
            offset: to_i64(offset),
            size: len.map_or(0, to_i64),
        };
        let mut req = self.stream_request(req);
        // The deadline covers the call's start only: the body below has its idle timeout.
        req.set_timeout(CALL_TIMEOUT);
        let resp = ContentClient::new(self.channel.clone())
            .read(req)
            .await
            .map_err(|s| match s.code() {
                Code::NotFound => self.not_found(digest),
                _ => self.call_error("Content.Read", s),
            })?;
        let what = format!("{digest} from containerd at {}", self.socket.display());
        let state = (resp.into_inner(), 0u64, false);
        Ok(
            futures_util::stream::unfold(state, move |(mut stream, mut got, done)| {
                let what = what.clone();
                async move {
                    if done {
                        return None;
                    }
                    let item = match tokio::time::timeout(IDLE_TIMEOUT, stream.message()).await {
                        Err(_) => Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("reading {what}: nothing for {IDLE_TIMEOUT:?}"),
                        )),
                        Ok(Err(s)) => Err(io::Error::other(format!("reading {what}: {s}"))),
                        Ok(Ok(Some(chunk))) => {
                            got += chunk.data.len() as u64;
                            Ok(Some(Bytes::from(chunk.data)))
                        }
                        Ok(Ok(None)) => match len {
                            Some(want) if got < want => Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                format!("reading {what}: ended after {got} of {want} bytes"),
                            )),
                            _ => Ok(None),
                        },
                    };
                    match item {
                        Ok(Some(b)) => Some((Ok(b), (stream, got, false))),
                        Ok(None) => None,
                        Err(e) => Some((Err(e), (stream, got, true))),
                    }
                }
            })
            .boxed(),
        )
    }

    /// A small blob (a manifest or an index) whole, `None` when it is not there; a blob
    /// larger than `max` is [`Error::TooLarge`] and is not read.
    pub async fn read_small(&self, digest: &str, max: u64) -> Result<Option<Bytes>, Error> {
        let Some(size) = self.info(digest).await? else {
            return Ok(None);
        };
        if size > max {
            return Err(Error::TooLarge {
                socket: self.socket.clone(),
                digest: digest.to_string(),
                size,
                max,
            });
        }
        let mut stream = match self.read(digest, 0, Some(size)).await {
            Ok(s) => s,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut buf = Vec::with_capacity(size as usize);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk
                .map_err(|e| self.call_error("Content.Read", Status::unavailable(e.to_string())))?;
            if (buf.len() + chunk.len()) as u64 > max {
                return Err(Error::TooLarge {
                    socket: self.socket.clone(),
                    digest: digest.to_string(),
                    size: (buf.len() + chunk.len()) as u64,
                    max,
                });
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(Some(Bytes::from(buf)))
    }

    /// Image and content events of this namespace, as "something changed" signals. The
    /// subscription runs in its own task; the stream ends (after an error item) when the
    /// connection is lost, and the task ends when the stream is dropped. Events that
    /// happen while the subscription is being set up may be missed: callers rescan now and
    /// then anyway.
    pub fn subscribe(&self) -> BoxStream<'static, Result<Changed, Error>> {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let filters = ["/images/", "/content/"]
            .iter()
            .map(|topic| format!("namespace==\"{}\",topic~=\"^{topic}\"", self.namespace))
            .collect();
        let req = self.stream_request(SubscribeRequest { filters });
        let this = self.clone();
        tokio::spawn(async move {
            let work = async {
                // containerd sends the response headers only with the first event, so this
                // call itself may wait as long as nothing happens.
                let resp = match EventsClient::new(this.channel.clone()).subscribe(req).await {
                    Ok(r) => r,
                    Err(s) => {
                        let _ = tx.send(Err(this.call_error("Events.Subscribe", s))).await;
                        return;
                    }
                };
                let mut stream = resp.into_inner();
                loop {
                    let item = match stream.message().await {
                        Ok(Some(env)) => Ok(Changed { topic: env.topic }),
                        Ok(None) => Err(this.call_error(
                            "Events.Subscribe",
                            Status::unavailable("containerd ended the event stream"),
                        )),
                        Err(s) => Err(this.call_error("Events.Subscribe", s)),
                    };
                    let end = item.is_err();
                    if tx.send(item).await.is_err() || end {
                        return;
                    }
                }
            };
            tokio::select! {
                _ = work => {}
                _ = tx.closed() => {}
            }
        });
        futures_util::stream::unfold(rx, |mut rx| async move {
            let item = rx.recv().await?;
            Some((item, rx))
        })
        .boxed()
    }
}

/// An error with its sources, on one line (tonic's transport errors say little at the top).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces() {
        for ok in ["k8s.io", "default", "moby", "a-b_c.d", "A1"] {
            assert!(valid_namespace(ok), "{ok}");
        }
        for bad in [
            "",
            ".k8s",
            "k8s.",
            "a..b",
            "a/b",
            "a b",
            "ü",
            &"a".repeat(77),
        ] {
            assert!(!valid_namespace(bad), "{bad}");
        }
    }

    #[tokio::test]
    async fn a_missing_socket_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("containerd.sock");
        let e = Containerd::connect(&socket, "k8s.io").await.unwrap_err();
        assert!(matches!(e, Error::NoSocket { .. }), "{e}");
        assert!(e.to_string().contains(&socket.display().to_string()), "{e}");
        let e = Containerd::connect(&socket, "bad/ns").await.unwrap_err();
        assert!(matches!(e, Error::Namespace(_)), "{e}");
    }

    #[tokio::test]
    async fn a_socket_nobody_listens_on_is_a_connect_error() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("containerd.sock");
        // A socket file whose listener is gone: connections are refused.
        drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
        let e = Containerd::connect(&socket, "k8s.io").await.unwrap_err();
        assert!(matches!(e, Error::Connect { .. }), "{e}");
        assert!(e.to_string().contains(&socket.display().to_string()), "{e}");
    }
}
