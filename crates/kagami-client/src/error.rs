//! The client's error type: one variant per way a request to one endpoint fails, and
//! [`Error::AllFailed`] that names every attempt of a plan and why it failed.

use std::fmt;

use kagami_config::Digest;
use serde::Deserialize;

/// A failure talking to a registry.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Connection refused, DNS, TLS handshake, timeout, reset: anything below HTTP.
    #[error("{url}: {}", chain(source))]
    Network {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// The registry answered with an unexpected status. `body` keeps its own error;
    /// `retry_after` its `Retry-After` (read on a 429 and a 503 only).
    #[error("{url}: HTTP {status}{}{}", body.as_ref().map(|b| format!(": {b}")).unwrap_or_default(), retry_after.map(|d| format!(" (Retry-After: {} s)", d.as_secs())).unwrap_or_default())]
    Status {
        url: String,
        status: u16,
        body: Option<RegistryError>,
        retry_after: Option<std::time::Duration>,
    },
    /// The content does not hash to the digest it was asked for.
    #[error("{url}: digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        url: String,
        expected: Digest,
        actual: Digest,
    },
    /// The content has a different size than its descriptor says.
    #[error("{url}: size mismatch: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        url: String,
        expected: u64,
        actual: u64,
    },
    #[error("{url}: manifest is larger than {limit} bytes; refused")]
    ManifestTooBig { url: String, limit: u64 },
    #[error("{url}: invalid manifest: {why}")]
    InvalidManifest { url: String, why: String },
    /// Authentication could not be completed (bad challenge, token endpoint failure,
    /// no credentials for a Basic challenge).
    #[error("{url}: authentication failed: {why}")]
    Auth { url: String, why: String },
    #[error("{url}: too many redirects")]
    Redirects { url: String },
    /// kagami refused to send the request: a redirect to a scheme other than http(s) or
    /// from https to http, or a host chosen by the image name that is not public.
    #[error("{url}: refused: {why}")]
    Refused { url: String, why: String },
    #[error("TLS setup for {host}: {why}")]
    TlsSetup { host: String, why: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The walk did not try this endpoint: it is backing off after a rate limit, or its
    /// circuit is open ([`crate::health`]).
    #[error("{endpoint}: skipped: {skip}")]
    Skipped {
        endpoint: String,
        skip: crate::health::Skip,
    },
    /// Every attempt of a plan failed; each one is listed with its reason.
    #[error("{}", all_failed(what, attempts))]
    AllFailed {
        what: String,
        attempts: Vec<AttemptError>,
    },
}

/// Why one attempt of a plan failed.
#[derive(Debug)]
pub struct AttemptError {
    /// The endpoint's base URL (`https://h/v2`).
    pub endpoint: String,
    pub error: Error,
}

impl Error {
    /// The HTTP status, when the registry answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// A short reason in kagami's own words: nothing the upstream wrote (error bodies,
    /// redirect targets) and nothing that tells a refused connection from a timeout. What
    /// the mirror's clients and its status page are told, and what [`crate::Health`] keeps.
    pub fn reason(&self) -> String {
        match self {
            Error::Status {
                status: s @ (429 | 503),
                retry_after: Some(d),
                ..
            } => format!("HTTP {s} (Retry-After: {} s)", d.as_secs()),
            Error::Status { status, .. } => format!("HTTP {status}"),
            Error::Network { source, .. } if crate::guard::is_refused_address(source) => {
                "refused: not a public address".into()
            }
            Error::Network { .. } | Error::Io { .. } => "no answer".into(),
            Error::DigestMismatch { .. } => "digest mismatch".into(),
            Error::SizeMismatch { .. } => "size mismatch".into(),
            Error::ManifestTooBig { .. } => "manifest too big".into(),
            Error::InvalidManifest { .. } => "invalid manifest".into(),
            Error::Auth { .. } => "authentication failed".into(),
            Error::Redirects { .. } => "too many redirects".into(),
            Error::Refused { .. } => "refused (address or redirect not allowed)".into(),
            Error::TlsSetup { .. } => "TLS setup failed".into(),
            Error::Skipped { skip, .. } => format!("skipped: {skip}"),
            Error::AllFailed { .. } => "failed".into(),
        }
    }

    /// True when every attempt of an [`Error::AllFailed`] was skipped (none was
    /// contacted: each is backing off or its circuit is open).
    pub fn all_skipped(&self) -> bool {
        match self {
            Error::AllFailed { attempts, .. } => {
                !attempts.is_empty()
                    && attempts
                        .iter()
                        .all(|a| matches!(a.error, Error::Skipped { .. }))
            }
            _ => false,
        }
    }

    /// True for failures worth retrying on the same endpoint: a 5xx (without
    /// `Retry-After`, which asks for a later try), or network trouble that came quickly
    /// (refused, reset, DNS). A timeout is not: the endpoint has had its time already, and
    /// a second wait would double what the caller (containerd, through `serve`) waits
    /// before it can move on.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Status {
                status,
                retry_after,
                ..
            } => *status >= 500 && retry_after.is_none(),
            Error::Network { source, .. } => !source.is_timeout(),
            _ => false,
        }
    }

    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}

fn all_failed(what: &str, attempts: &[AttemptError]) -> String {
    use fmt::Write as _;
    if attempts.is_empty() {
        return format!("{what}: no endpoint to try (every endpoint is disabled)");
    }
    let mut s = format!("{what}: all {} attempt(s) failed:", attempts.len());
    for (i, a) in attempts.iter().enumerate() {
        let _ = write!(s, "\n  {}. {}: {}", i + 1, a.endpoint, a.error);
    }
    s
}

/// The full cause chain of an error on one line (reqwest hides the interesting part,
/// "connection refused" or the TLS alert, in its sources).
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// The error body a registry returned: the OCI `{"errors":[...]}` envelope when it is
/// one, else the start of the raw text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryError {
    Oci(Vec<OciError>),
    Text(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct OciError {
    #[serde(default)]
    pub code: String,
    #[serde(default)]
    pub message: String,
}

#[derive(Deserialize)]
struct Envelope {
    errors: Vec<OciError>,
}

/// How much of a non-OCI error body is kept.
const MAX_TEXT: usize = 512;

impl RegistryError {
    /// Parses an error body; `None` when it is empty.
    pub fn parse(body: &[u8]) -> Option<RegistryError> {
        if let Ok(env) = serde_json::from_slice::<Envelope>(body)
            && !env.errors.is_empty()
        {
            return Some(RegistryError::Oci(env.errors));
        }
        let text = String::from_utf8_lossy(body);
        let text = text.trim();
        if text.is_empty() {
            return None;
        }
        let mut end = text.len().min(MAX_TEXT);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        Some(RegistryError::Text(text[..end].to_string()))
    }

    /// The first OCI error code, e.g. `MANIFEST_UNKNOWN`.
    pub fn code(&self) -> Option<&str> {
        match self {
            RegistryError::Oci(v) => v.first().map(|e| e.code.as_str()),
            RegistryError::Text(_) => None,
        }
    }
}

impl fmt::Display for RegistryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegistryError::Oci(errors) => {
                let parts: Vec<String> = errors
                    .iter()
                    .map(|e| {
                        if e.message.is_empty() {
                            e.code.clone()
                        } else {
                            format!("{} ({})", e.code, e.message)
                        }
                    })
                    .collect();
                f.write_str(&parts.join("; "))
            }
            RegistryError::Text(t) => write!(f, "{t:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A timeout is not retried (the endpoint had its time); a refusal is.
    #[tokio::test]
    async fn a_timeout_is_not_transient_a_refused_connection_is() {
        // Accepts connections (the kernel's backlog) and never answers.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v2/", silent.local_addr().unwrap());
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_millis(200))
            .build()
            .unwrap();
        let network = |source| Error::Network {
            url: url.clone(),
            source,
        };
        let timed_out = http.get(&url).send().await.unwrap_err();
        assert!(timed_out.is_timeout(), "{timed_out}");
        assert!(!network(timed_out).is_transient());
        drop(silent);
        let refused = http.get(&url).send().await.unwrap_err();
        assert!(!refused.is_timeout(), "{refused}");
        assert!(network(refused).is_transient());
    }

    #[test]
    fn oci_body() {
        let b =
            br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":{}}]}"#;
        let e = RegistryError::parse(b).unwrap();
        assert_eq!(e.code(), Some("MANIFEST_UNKNOWN"));
        assert_eq!(e.to_string(), "MANIFEST_UNKNOWN (manifest unknown)");
        assert_eq!(RegistryError::parse(b"  "), None);
        assert_eq!(
            RegistryError::parse(b"404 page not found\n"),
            Some(RegistryError::Text("404 page not found".into()))
        );
    }

    #[test]
    fn all_failed_names_every_attempt() {
        let e = Error::AllFailed {
            what: "manifest x".into(),
            attempts: vec![
                AttemptError {
                    endpoint: "http://a/v2".into(),
                    error: Error::Status {
                        url: "http://a/v2/r/manifests/1".into(),
                        status: 404,
                        body: None,
                        retry_after: None,
                    },
                },
                AttemptError {
                    endpoint: "http://b/v2".into(),
                    error: Error::ManifestTooBig {
                        url: "http://b/v2/r/manifests/1".into(),
                        limit: 4,
                    },
                },
            ],
        };
        let s = e.to_string();
        assert!(s.contains("all 2 attempt(s) failed"), "{s}");
        assert!(
            s.contains("1. http://a/v2: http://a/v2/r/manifests/1: HTTP 404"),
            "{s}"
        );
        assert!(s.contains("2. http://b/v2"), "{s}");
    }
}
