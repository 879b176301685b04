//! An in-test registry on loopback (axum): it serves an OCI image layout directory, and
//! can misbehave on purpose (corrupted blobs, redirects of blob downloads to another
//! server) or require auth (Basic, or Bearer tokens from a token server that accepts
//! exactly one expected scope). Every request is recorded for the test to inspect.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};

/// How a fake behaves.
#[derive(Debug, Clone, Default)]
pub struct FakeOptions {
    /// Require `Authorization: Bearer tok:<scope>`; 401 names this realm (a URL).
    pub bearer_realm: Option<String>,
    /// Require HTTP Basic with these credentials.
    pub basic: Option<(String, String)>,
    /// Flip a byte of every blob served.
    pub corrupt_blobs: bool,
    /// Answer blob GETs with a 307 to `<base>/v2/<name>/blobs/<digest>`.
    pub redirect_blobs_to: Option<String>,
    /// Act as a token server at `/token`: issue a token only when the request carries
    /// exactly one scope and it is this one.
    pub token_scope: Option<String>,
    /// Credentials the token server requires (Basic on GET, form fields on POST), or
    /// a refresh token (`grant_type=refresh_token`).
    pub token_basic: Option<(String, String)>,
    pub token_refresh: Option<String>,
    /// Answer the first this many registry requests with 503.
    pub fail_first: usize,
    /// Send only the first half of each blob (with the full Content-Length), then drop
    /// the connection.
    pub truncate_blobs: bool,
}

/// One request as the fake saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub query: String,
    pub authorization: Option<String>,
    pub range: Option<String>,
    /// Status answered.
    pub status: u16,
    /// For token requests: the scopes asked for and the grant type (POST).
    pub scopes: Vec<String>,
    pub grant: Option<String>,
}

struct State {
    layout: PathBuf,
    opts: FakeOptions,
    seen: Mutex<Vec<Seen>>,
}

impl crate::support::TestImage {
    /// A fake on 127.0.0.1 serving this image's layout.
    pub fn fake(&self, opts: FakeOptions) -> Fake {
        Fake::start("127.0.0.1", &self.layout, opts)
    }
}

/// A running fake; stopped when dropped.
pub struct Fake {
    pub addr: SocketAddr,
    state: Arc<State>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Fake {
    /// Starts a fake on `ip` (e.g. `127.0.0.1`, `127.0.0.2`), serving `layout`.
    pub fn start(ip: &str, layout: &Path, opts: FakeOptions) -> Fake {
        let listener = std::net::TcpListener::bind(format!("{ip}:0")).unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            layout: layout.to_path_buf(),
            opts,
            seen: Mutex::new(Vec::new()),
        });
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let st = state.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let app = axum::Router::new().fallback(
                    move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                        let st = st.clone();
                        async move { handle(&st, method, uri, headers, body) }
                    },
                );
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = rx.await;
                    })
                    .await;
            });
        });
        Fake {
            addr,
            state,
            stop: Some(tx),
        }
    }

    /// `http://<addr>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

fn handle(st: &State, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut seen = Seen {
        method: method.to_string(),
        path: uri.path().to_string(),
        query: uri.query().unwrap_or("").to_string(),
        authorization: authorization.clone(),
        range: headers
            .get(header::RANGE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        status: 0,
        scopes: Vec::new(),
        grant: None,
    };
    let failing = {
        let seen = st.seen.lock().unwrap();
        seen.len() < st.opts.fail_first
    };
    let resp = if failing {
        oci_error(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE")
    } else if uri.path() == "/token" {
        token(
            st,
            &method,
            &uri,
            authorization.as_deref(),
            &body,
            &mut seen,
        )
    } else {
        registry(st, &method, uri.path(), authorization.as_deref(), &headers)
    };
    seen.status = resp.status().as_u16();
    st.seen.lock().unwrap().push(seen);
    resp
}

fn oci_error(status: StatusCode, code: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        format!(r#"{{"errors":[{{"code":"{code}","message":"fake registry says {code}"}}]}}"#),
    )
        .into_response()
}

fn basic_value(user: &str, pass: &str) -> String {
    use base64_engine::encode;
    format!("Basic {}", encode(format!("{user}:{pass}").as_bytes()))
}

fn registry(
    st: &State,
    method: &Method,
    path: &str,
    auth: Option<&str>,
    headers: &HeaderMap,
) -> Response {
    let Some(rest) = path.strip_prefix("/v2/") else {
        return oci_error(StatusCode::NOT_FOUND, "NOT_FOUND");
    };
    // The repository name: everything before the last /manifests/ or /blobs/.
    let (name, kind, reference) = if let Some(i) = rest.rfind("/manifests/") {
        (&rest[..i], "manifests", &rest[i + 11..])
    } else if let Some(i) = rest.rfind("/blobs/") {
        (&rest[..i], "blobs", &rest[i + 7..])
    } else {
        ("", "base", "")
    };
    if let Some(realm) = &st.opts.bearer_realm {
        let scope = format!("repository:{name}:pull");
        if auth != Some(format!("Bearer tok:{scope}").as_str()) {
            let challenge =
                format!(r#"Bearer realm="{realm}",service="fake-registry",scope="{scope}""#);
            let mut r = oci_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, challenge.parse().unwrap());
            return r;
        }
    }
    if let Some((u, p)) = &st.opts.basic
        && auth != Some(basic_value(u, p).as_str())
    {
        let mut r = oci_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            r#"Basic realm="fake-registry""#.parse().unwrap(),
        );
        return r;
    }
    if kind == "base" {
        return (StatusCode::OK, "{}").into_response();
    }
    if *method != Method::GET && *method != Method::HEAD {
        return oci_error(StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED");
    }
    match kind {
        "manifests" => {
            let digest = if reference.contains(':') {
                reference.to_string()
            } else {
                match tag_digest(&st.layout, reference) {
                    Some(d) => d,
                    None => return oci_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN"),
                }
            };
            let Some(bytes) = read_blob(&st.layout, &digest) else {
                return oci_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");
            };
            let media_type = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v["mediaType"].as_str().map(str::to_string))
                .unwrap_or_else(|| "application/vnd.oci.image.manifest.v1+json".into());
            Response::builder()
                .header(header::CONTENT_TYPE, media_type)
                .header("Docker-Content-Digest", digest)
                .header(header::CONTENT_LENGTH, bytes.len())
                .body(Body::from(bytes))
                .unwrap()
        }
        _ => {
            if let Some(base) = &st.opts.redirect_blobs_to {
                return Response::builder()
                    .status(StatusCode::TEMPORARY_REDIRECT)
                    .header(
                        header::LOCATION,
                        format!("{base}/v2/{name}/blobs/{reference}"),
                    )
                    .body(Body::empty())
                    .unwrap();
            }
            let Some(mut bytes) = read_blob(&st.layout, reference) else {
                return oci_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN");
            };
            if st.opts.corrupt_blobs && !bytes.is_empty() {
                let i = bytes.len() / 2;
                bytes[i] ^= 0xff;
            }
            if st.opts.truncate_blobs && bytes.len() > 1 {
                let full = bytes.len();
                bytes.truncate(full / 2);
                let half = Bytes::from(bytes);
                // The first half, a pause (so that it reaches the client), then an error
                // that makes the server drop the connection.
                let body = futures_util::stream::unfold(0u8, move |step| {
                    let half = half.clone();
                    async move {
                        match step {
                            0 => Some((Ok::<Bytes, std::io::Error>(half), 1)),
                            1 => {
                                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                                Some((Err(std::io::Error::other("dropped on purpose")), 2))
                            }
                            _ => None,
                        }
                    }
                });
                return Response::builder()
                    .header(header::CONTENT_TYPE, "application/octet-stream")
                    .header(header::CONTENT_LENGTH, full)
                    .body(Body::from_stream(body))
                    .unwrap();
            }
            // Range: bytes=N- (the only form kagami sends).
            let range = headers
                .get(header::RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("bytes="))
                .and_then(|v| v.strip_suffix('-'))
                .and_then(|v| v.parse::<usize>().ok())
                .filter(|&n| n < bytes.len());
            if let Some(n) = range {
                let total = bytes.len();
                let part = bytes.split_off(n);
                return Response::builder()
                    .status(StatusCode::PARTIAL_CONTENT)
                    .header(header::CONTENT_TYPE, "application/octet-stream")
                    .header(
                        header::CONTENT_RANGE,
                        format!("bytes {n}-{}/{total}", total - 1),
                    )
                    .header(header::CONTENT_LENGTH, part.len())
                    .body(Body::from(part))
                    .unwrap();
            }
            Response::builder()
                .header(header::CONTENT_TYPE, "application/octet-stream")
                .header("Docker-Content-Digest", reference)
                .header(header::CONTENT_LENGTH, bytes.len())
                .body(Body::from(bytes))
                .unwrap()
        }
    }
}

fn token(
    st: &State,
    method: &Method,
    uri: &Uri,
    auth: Option<&str>,
    body: &[u8],
    seen: &mut Seen,
) -> Response {
    let pairs: Vec<(String, String)> = if *method == Method::POST {
        parse_form(body)
    } else {
        parse_form(uri.query().unwrap_or("").as_bytes())
    };
    let get = |k: &str| pairs.iter().find(|(pk, _)| pk == k).map(|(_, v)| v.clone());
    // GET: every `scope` parameter; POST: one space-separated `scope` field.
    seen.scopes = pairs
        .iter()
        .filter(|(k, _)| k == "scope")
        .flat_map(|(_, v)| v.split(' ').map(str::to_string).collect::<Vec<_>>())
        .filter(|s| !s.is_empty())
        .collect();
    seen.grant = get("grant_type");
    let Some(expected) = &st.opts.token_scope else {
        return oci_error(StatusCode::NOT_FOUND, "NOT_FOUND");
    };
    if seen.scopes.len() != 1 || &seen.scopes[0] != expected {
        // What Artifactory does with a scope it does not know.
        return oci_error(StatusCode::FORBIDDEN, "DENIED");
    }
    let authorized = match (&st.opts.token_basic, &st.opts.token_refresh) {
        (Some((u, p)), _) => {
            let form_ok = seen.grant.as_deref() == Some("password")
                && get("username").as_deref() == Some(u)
                && get("password").as_deref() == Some(p);
            form_ok || auth == Some(basic_value(u, p).as_str())
        }
        (None, Some(rt)) => {
            seen.grant.as_deref() == Some("refresh_token")
                && get("refresh_token").as_deref() == Some(rt)
        }
        (None, None) => true,
    };
    if !authorized {
        return oci_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
    }
    let body = serde_json::json!({
        "token": format!("tok:{expected}"),
        "access_token": format!("tok:{expected}"),
        "expires_in": 300,
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn parse_form(b: &[u8]) -> Vec<(String, String)> {
    String::from_utf8_lossy(b)
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let h = u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap_or(b'?');
                out.push(h);
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The manifest digest index.json names for `tag`.
fn tag_digest(layout: &Path, tag: &str) -> Option<String> {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).ok()?).ok()?;
    index["manifests"]
        .as_array()?
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"].as_str() == Some(tag))
        .and_then(|m| m["digest"].as_str().map(str::to_string))
}

fn read_blob(layout: &Path, digest: &str) -> Option<Vec<u8>> {
    let (alg, hex) = digest.split_once(':')?;
    if !hex.chars().all(|c| c.is_ascii_hexdigit()) || alg.contains('/') {
        return None;
    }
    std::fs::read(layout.join("blobs").join(alg).join(hex)).ok()
}

/// Tiny base64 (standard alphabet, padded) so the tests need no extra crate.
mod base64_engine {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    pub fn encode(input: &[u8]) -> String {
        let mut out = String::new();
        for chunk in input.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    #[test]
    fn known() {
        assert_eq!(encode(b"alice:secret"), "YWxpY2U6c2VjcmV0");
        assert_eq!(encode(b"a"), "YQ==");
        assert_eq!(encode(b"ab"), "YWI=");
    }
}
