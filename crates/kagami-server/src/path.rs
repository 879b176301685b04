//! Parsing OCI distribution pull requests, once, by hand (rather than one route per shape).
//!
//! `/v2/<name>/manifests/<reference>`, `/v2/<name>/blobs/<digest>`, `/v2/<name>/tags/list`,
//! `/v2/<name>/referrers/<digest>`.
//! The query string is percent-decoded here and nowhere else ([`Query`]). The registry
//! comes from `?ns=<registry>` (containerd) or, when absent, from the first path component
//! when it looks like a registry name (`/v2/docker.io/library/alpine/...`, and
//! `/v2/127.0.0.1_5000/app/...` for a registry with a port: containers/image clients cannot
//! put a colon in a path component), else it is the default registry (Docker Hub: what
//! dockerd's `registry-mirrors` sends). docs/compatibility.md has every form.

use kagami_config::endpoint::{DOCKER_HUB, DOCKER_HUB_HOST, validate_host};
use kagami_config::reference::{validate_repository, validate_tag};
use kagami_config::{Digest, Reference};

use crate::service::error::ApiError;

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Manifest(ManifestRef),
    Blob(Digest),
    TagsList,
    /// The referrers of a manifest (OCI distribution spec 1.1), by the manifest's digest.
    Referrers(Digest),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManifestRef {
    Tag(String),
    Digest(Digest),
}

impl ManifestRef {
    pub fn as_str(&self) -> String {
        match self {
            ManifestRef::Tag(t) => t.clone(),
            ManifestRef::Digest(d) => d.to_string(),
        }
    }
}

/// A parsed pull request path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciPath {
    /// The registry the image belongs to (`docker.io`, `quay.io`, ...).
    pub registry: String,
    /// The repository inside that registry.
    pub repository: String,
    pub target: Target,
    /// The name as the client wrote it in the path (`alpine`, `docker.io/library/alpine`,
    /// `127.0.0.1_5000/app`): what `tags/list` answers as `name` and links back to.
    pub client_name: String,
    /// Whether the registry came from `?ns=` (links then carry it too).
    pub from_ns: bool,
}

impl OciPath {
    /// The image reference this request is about (for planning).
    pub fn reference(&self) -> Reference {
        let (tag, digest) = match &self.target {
            Target::Manifest(ManifestRef::Tag(t)) => (Some(t.clone()), None),
            Target::Manifest(ManifestRef::Digest(d)) | Target::Blob(d) | Target::Referrers(d) => {
                (None, Some(d.clone()))
            }
            Target::TagsList => (Some("latest".to_string()), None),
        };
        Reference {
            registry: self.registry.clone(),
            repository: self.repository.clone(),
            tag,
            digest,
        }
    }
}

const MAX_PATH: usize = 1024;

/// A request's query string, percent-decoded (RFC 3986, and `+` as a space, as Go's
/// `url.Values` writes it) once, strictly: a `%` not followed by two hex digits, or a value
/// that is not UTF-8 after decoding, is an error naming the parameter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    pairs: Vec<(String, String)>,
}

impl Query {
    pub fn parse(raw: Option<&str>) -> Result<Query, ApiError> {
        let mut pairs = Vec::new();
        for kv in raw.unwrap_or("").split('&').filter(|kv| !kv.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let key = decode(k).map_err(|e| query_error(k, &e))?;
            let value = decode(v).map_err(|e| query_error(&key, &e))?;
            pairs.push((key, value));
        }
        Ok(Query { pairs })
    }

    /// The first value of parameter `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// `ns`: the registry containerd is pulling from.
    pub fn ns(&self) -> Option<&str> {
        self.get("ns")
    }
}

fn query_error(key: &str, why: &str) -> ApiError {
    let m = format!("query parameter {key:?}: {why}");
    if key == "ns" {
        ApiError::name_invalid(m)
    } else {
        ApiError::bad_request(m)
    }
}

/// Strict percent-decoding of one query component.
fn decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = |j: usize| b.get(j).and_then(|c| (*c as char).to_digit(16));
                let (Some(hi), Some(lo)) = (hex(i + 1), hex(i + 2)) else {
                    return Err(format!(
                        "malformed percent-encoding at byte {i} (a % must be followed by two hex digits)"
                    ));
                };
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| "not UTF-8 once percent-decoded".to_string())
}

/// Percent-encodes a query value (for links kagami writes).
pub fn encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// Parses a request URI (`/v2/...` and its query) with [`parse`].
pub fn parse_uri(
    uri: &http::Uri,
    default_registry: Option<&str>,
) -> Result<(OciPath, Query), ApiError> {
    let rest = uri
        .path()
        .strip_prefix("/v2/")
        .ok_or_else(|| ApiError::not_found("not an OCI distribution path"))?;
    let query = Query::parse(uri.query())?;
    let path = parse(rest, query.ns(), default_registry)?;
    Ok((path, query))
}

/// Parses the path after `/v2/` with the registry from `ns`, if given, else from the
/// path, else `default_registry` (None: such requests are refused).
pub fn parse(
    rest: &str,
    ns: Option<&str>,
    default_registry: Option<&str>,
) -> Result<OciPath, ApiError> {
    if rest.len() > MAX_PATH {
        return Err(ApiError::name_invalid("path too long"));
    }
    let (name, target) = split_target(rest)?;
    let (registry, repository) = match ns {
        Some(ns) => {
            validate_host(ns)
                .map_err(|e| ApiError::name_invalid(format!("invalid ns {ns:?}: {e}")))?;
            (normalise_registry(ns), name.to_string())
        }
        None => match name
            .split_once('/')
            .and_then(|(f, r)| Some((path_registry(f)?, r)))
        {
            Some((registry, rest)) => {
                validate_host(&registry).map_err(|e| {
                    ApiError::name_invalid(format!("invalid registry {registry:?}: {e}"))
                })?;
                (normalise_registry(&registry), rest.to_string())
            }
            None => match default_registry {
                Some(d) => (normalise_registry(d), name.to_string()),
                None => {
                    return Err(ApiError::name_unknown(format!(
                        "no registry in {name:?}: use ?ns=<registry> or /v2/<registry>/<repository>/..."
                    )));
                }
            },
        },
    };
    let repository = if registry == DOCKER_HUB && !repository.contains('/') {
        format!("library/{repository}")
    } else {
        repository
    };
    validate_repository(&repository).map_err(ApiError::name_invalid)?;
    Ok(OciPath {
        registry,
        repository,
        target,
        client_name: name.to_string(),
        from_ns: ns.is_some(),
    })
}

/// The registry named by the first path component, if it names one: a host with a dot, a
/// colon or `localhost`, optionally followed by `_<port>` (`127.0.0.1_5000`,
/// `registry.local_5000`, `localhost_5000`), the form for clients that cannot write a
/// colon inside a repository path.
fn path_registry(first: &str) -> Option<String> {
    if let Some((host, port)) = first.rsplit_once('_')
        && !port.is_empty()
        && port.len() <= 5
        && port.bytes().all(|c| c.is_ascii_digit())
        && (host.contains('.') || host == "localhost")
    {
        return Some(format!("{host}:{port}"));
    }
    (first.contains('.') || first.contains(':') || first == "localhost").then(|| first.to_string())
}

fn normalise_registry(r: &str) -> String {
    if r == DOCKER_HUB_HOST || r == "index.docker.io" {
        DOCKER_HUB.to_string()
    } else {
        r.to_string()
    }
}

fn split_target(rest: &str) -> Result<(&str, Target), ApiError> {
    if rest.contains("/blobs/uploads") {
        return Err(ApiError::unsupported(
            "kagami is a pull-only mirror: push to the registry itself",
        ));
    }
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return Ok((name, Target::TagsList));
    }
    // Before manifests: a tag or a digest has no '/', so `<name>/referrers/<digest>` with
    // no '/' after it is never a manifest or blob path.
    if let Some((name, digest)) = rest.rsplit_once("/referrers/")
        && !digest.contains('/')
    {
        let d = digest
            .parse()
            .map_err(|e: kagami_config::ReferenceError| ApiError::digest_invalid(e.to_string()))?;
        return Ok((name, Target::Referrers(d)));
    }
    if let Some((name, reference)) = rest.rsplit_once("/manifests/") {
        let r =
            if reference.contains(':') {
                ManifestRef::Digest(reference.parse().map_err(
                    |e: kagami_config::ReferenceError| ApiError::digest_invalid(e.to_string()),
                )?)
            } else {
                // The distribution spec allows only 404 for a tag that cannot exist;
                // nothing is asked upstream for it.
                validate_tag(reference).map_err(|e| {
                    ApiError::manifest_unknown(format!("invalid tag {reference:?}: {e}"))
                })?;
                ManifestRef::Tag(reference.to_string())
            };
        return Ok((name, Target::Manifest(r)));
    }
    if let Some((name, digest)) = rest.rsplit_once("/blobs/") {
        let d = digest
            .parse()
            .map_err(|e: kagami_config::ReferenceError| ApiError::digest_invalid(e.to_string()))?;
        return Ok((name, Target::Blob(d)));
    }
    Err(ApiError::not_found("not an OCI distribution pull path"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn ns_form() {
        let p = parse("library/alpine/manifests/3.20", Some("docker.io"), None).unwrap();
        assert_eq!(p.registry, "docker.io");
        assert_eq!(p.repository, "library/alpine");
        assert_eq!(p.target, Target::Manifest(ManifestRef::Tag("3.20".into())));
        let p = parse(&format!("a/b/blobs/{D}"), Some("quay.io"), None).unwrap();
        assert_eq!(p.target, Target::Blob(D.parse().unwrap()));
        let p = parse("alpine/tags/list", Some("registry-1.docker.io"), None).unwrap();
        assert_eq!(
            (p.registry.as_str(), p.repository.as_str()),
            ("docker.io", "library/alpine")
        );
    }

    #[test]
    fn prefix_form() {
        let p = parse("docker.io/library/alpine/manifests/3.20", None, None).unwrap();
        assert_eq!(
            (p.registry.as_str(), p.repository.as_str()),
            ("docker.io", "library/alpine")
        );
        let p = parse(&format!("127.0.0.1:5000/x/manifests/{D}"), None, None).unwrap();
        assert_eq!(p.registry, "127.0.0.1:5000");
        assert_eq!(
            p.target,
            Target::Manifest(ManifestRef::Digest(D.parse().unwrap()))
        );
        let p = parse("docker.io/alpine/manifests/1", None, None).unwrap();
        assert_eq!(p.repository, "library/alpine");
    }

    #[test]
    fn repository_named_manifests() {
        let p = parse("docker.io/a/manifests/manifests/1", None, None).unwrap();
        assert_eq!(p.repository, "a/manifests");
    }

    #[test]
    fn referrers_paths() {
        let p = parse(&format!("team/app/referrers/{D}"), Some("quay.io"), None).unwrap();
        assert_eq!(p.repository, "team/app");
        assert_eq!(p.target, Target::Referrers(D.parse().unwrap()));
        assert_eq!(p.reference().digest, Some(D.parse().unwrap()));
        // A repository named `referrers`, and a tag after it, are manifest paths.
        let p = parse("docker.io/a/referrers/manifests/1", None, None).unwrap();
        assert_eq!(p.repository, "a/referrers");
        assert_eq!(p.target, Target::Manifest(ManifestRef::Tag("1".into())));
        assert_eq!(
            parse("docker.io/a/referrers/sha256:xyz", None, None)
                .unwrap_err()
                .code,
            "DIGEST_INVALID"
        );
    }

    #[test]
    fn rejections() {
        assert_eq!(
            parse("library/alpine/manifests/1", None, None)
                .unwrap_err()
                .code,
            "NAME_UNKNOWN"
        );
        for (bad, code) in [
            ("docker.io/../etc/passwd/blobs/sha256:00", "DIGEST_INVALID"),
            ("docker.io/../etc/manifests/1", "NAME_INVALID"),
            ("docker.io/a/./b/manifests/1", "NAME_INVALID"),
            ("docker.io/A/manifests/1", "NAME_INVALID"),
            ("docker.io/a/manifests/-bad", "MANIFEST_UNKNOWN"),
            ("docker.io/a/blobs/sha256:xyz", "DIGEST_INVALID"),
            ("docker.io/a/blobs/md5:00", "DIGEST_INVALID"),
            ("docker.io/a/uploads/x", "NOT_FOUND"),
            ("docker.io/a/blobs/uploads/", "UNSUPPORTED"),
        ] {
            assert_eq!(parse(bad, None, None).unwrap_err().code, code, "{bad}");
        }
        assert_eq!(
            parse("a/manifests/1", Some("bad/ns"), None)
                .unwrap_err()
                .code,
            "NAME_INVALID"
        );
        assert_eq!(
            parse(&"a/".repeat(600), None, None).unwrap_err().code,
            "NAME_INVALID"
        );
    }

    #[test]
    fn query_is_percent_decoded_once() {
        // What containerd sends for a registry with a port.
        let q = Query::parse(Some("ns=127.0.0.1%3A5000")).unwrap();
        assert_eq!(q.ns(), Some("127.0.0.1:5000"));
        let p = parse("app/manifests/1", q.ns(), None).unwrap();
        assert_eq!(
            (p.registry.as_str(), p.repository.as_str()),
            ("127.0.0.1:5000", "app")
        );
        let q = Query::parse(Some("n=2&last=v%2B1&ns=%5B%3A%3A1%5D%3A5000")).unwrap();
        assert_eq!(
            (q.get("n"), q.get("last"), q.ns()),
            (Some("2"), Some("v+1"), Some("[::1]:5000"))
        );
        assert_eq!(
            Query::parse(Some("a+b=c+d")).unwrap().get("a b"),
            Some("c d")
        );
        assert_eq!(Query::parse(None).unwrap(), Query::default());
        assert_eq!(Query::parse(Some("&&ns=x&")).unwrap().ns(), Some("x"));
    }

    #[test]
    fn malformed_queries_name_the_parameter() {
        for (raw, code, needle) in [
            (
                "ns=127.0.0.1%3",
                "NAME_INVALID",
                "\"ns\": malformed percent-encoding at byte 9",
            ),
            ("ns=%zz", "NAME_INVALID", "\"ns\""),
            ("ns=%FF", "NAME_INVALID", "not UTF-8"),
            ("last=%", "UNSUPPORTED", "\"last\""),
        ] {
            let e = Query::parse(Some(raw)).unwrap_err();
            assert_eq!(e.code, code, "{raw}");
            assert!(e.message.contains(needle), "{raw}: {}", e.message);
        }
        // Decodes to something that is not a registry name.
        let q = Query::parse(Some("ns=a%2Fb")).unwrap();
        let e = parse("x/manifests/1", q.ns(), None).unwrap_err();
        assert_eq!(e.code, "NAME_INVALID");
        assert!(e.message.contains("invalid ns \"a/b\""), "{}", e.message);
    }

    #[test]
    fn port_in_the_path_form() {
        for (first, registry) in [
            ("127.0.0.1_5000", "127.0.0.1:5000"),
            ("registry.local_5000", "registry.local:5000"),
            ("localhost_5000", "localhost:5000"),
        ] {
            let p = parse(&format!("{first}/team/app/manifests/1"), None, None).unwrap();
            assert_eq!(
                (p.registry.as_str(), p.repository.as_str()),
                (registry, "team/app")
            );
            assert_eq!(p.client_name, format!("{first}/team/app"));
            // What `kagami registries-conf` writes is what this parser reads.
            assert_eq!(
                kagami_config::registries_conf::path_form(registry).as_deref(),
                Some(first)
            );
        }
        // Not a registry: no dot before the port.
        assert_eq!(
            parse("team_1/app/manifests/1", None, None)
                .unwrap_err()
                .code,
            "NAME_UNKNOWN"
        );
        assert_eq!(
            parse("a.b_99999/app/manifests/1", None, None)
                .unwrap_err()
                .code,
            "NAME_INVALID"
        );
    }

    #[test]
    fn default_registry_for_bare_names() {
        // dockerd's registry-mirrors: no ns, no registry in the path.
        let p = parse("library/alpine/manifests/latest", None, Some("docker.io")).unwrap();
        assert_eq!(
            (p.registry.as_str(), p.repository.as_str()),
            ("docker.io", "library/alpine")
        );
        let p = parse("alpine/tags/list", None, Some("docker.io")).unwrap();
        assert_eq!(
            (p.repository.as_str(), p.client_name.as_str()),
            ("library/alpine", "alpine")
        );
        assert!(!p.from_ns);
        // A registry in the path still wins.
        let p = parse("quay.io/a/b/manifests/1", None, Some("docker.io")).unwrap();
        assert_eq!(p.registry, "quay.io");
    }

    proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,200}", ns in prop::option::of("\\PC{0,20}")) {
            let _ = parse(&s, ns.as_deref(), None);
        }

        #[test]
        fn accepted_paths_have_valid_names(s in "[a-z0-9./:_-]{1,40}/(manifests/[a-z0-9.]{1,8}|tags/list)") {
            if let Ok(p) = parse(&s, None, None) {
                prop_assert!(validate_repository(&p.repository).is_ok());
                prop_assert!(!p.repository.split('/').any(|c| c == ".." || c == "."));
            }
        }
    }
}
