//! Parsing OCI distribution pull paths, once, by hand (rather than one route per shape).
//!
//! `/v2/<name>/manifests/<reference>`, `/v2/<name>/blobs/<digest>`, `/v2/<name>/tags/list`.
//! The registry comes from `?ns=<registry>` (containerd) or, when absent, from the first
//! path component when it looks like a registry name (`/v2/docker.io/library/alpine/...`),
//! so that skopeo, podman and curl can use kagami too.

use kagami_config::endpoint::{DOCKER_HUB, DOCKER_HUB_HOST, validate_host};
use kagami_config::reference::{validate_repository, validate_tag};
use kagami_config::{Digest, Reference};

use crate::error::ApiError;

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Manifest(ManifestRef),
    Blob(Digest),
    TagsList,
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
}

impl OciPath {
    /// The image reference this request is about (for planning).
    pub fn reference(&self) -> Reference {
        let (tag, digest) = match &self.target {
            Target::Manifest(ManifestRef::Tag(t)) => (Some(t.clone()), None),
            Target::Manifest(ManifestRef::Digest(d)) | Target::Blob(d) => (None, Some(d.clone())),
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

/// The `ns` query parameter (the registry containerd is pulling from), if there is one.
pub fn ns_param(query: Option<&str>) -> Option<&str> {
    query_param(query, "ns")
}

/// The raw value of the query parameter `name`, if present.
pub fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?.split('&').find_map(|kv| match kv.split_once('=') {
        Some((k, v)) if k == name => Some(v),
        _ => None,
    })
}

/// Parses the path after `/v2/` and the `ns` query parameter.
pub fn parse(rest: &str, ns: Option<&str>) -> Result<OciPath, ApiError> {
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
        None => match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                validate_host(first).map_err(|e| {
                    ApiError::name_invalid(format!("invalid registry {first:?}: {e}"))
                })?;
                (normalise_registry(first), rest.to_string())
            }
            _ => {
                return Err(ApiError::name_unknown(format!(
                    "no registry in {name:?}: use ?ns=<registry> or /v2/<registry>/<repository>/..."
                )));
            }
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
    })
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
    if let Some((name, reference)) = rest.rsplit_once("/manifests/") {
        let r =
            if reference.contains(':') {
                ManifestRef::Digest(reference.parse().map_err(
                    |e: kagami_config::ReferenceError| ApiError::digest_invalid(e.to_string()),
                )?)
            } else {
                validate_tag(reference).map_err(ApiError::manifest_invalid_tag)?;
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
        let p = parse("library/alpine/manifests/3.20", Some("docker.io")).unwrap();
        assert_eq!(p.registry, "docker.io");
        assert_eq!(p.repository, "library/alpine");
        assert_eq!(p.target, Target::Manifest(ManifestRef::Tag("3.20".into())));
        let p = parse(&format!("a/b/blobs/{D}"), Some("quay.io")).unwrap();
        assert_eq!(p.target, Target::Blob(D.parse().unwrap()));
        let p = parse("alpine/tags/list", Some("registry-1.docker.io")).unwrap();
        assert_eq!(
            (p.registry.as_str(), p.repository.as_str()),
            ("docker.io", "library/alpine")
        );
    }

    #[test]
    fn prefix_form() {
        let p = parse("docker.io/library/alpine/manifests/3.20", None).unwrap();
        assert_eq!(
            (p.registry.as_str(), p.repository.as_str()),
            ("docker.io", "library/alpine")
        );
        let p = parse(&format!("127.0.0.1:5000/x/manifests/{D}"), None).unwrap();
        assert_eq!(p.registry, "127.0.0.1:5000");
        assert_eq!(
            p.target,
            Target::Manifest(ManifestRef::Digest(D.parse().unwrap()))
        );
        let p = parse("docker.io/alpine/manifests/1", None).unwrap();
        assert_eq!(p.repository, "library/alpine");
    }

    #[test]
    fn repository_named_manifests() {
        let p = parse("docker.io/a/manifests/manifests/1", None).unwrap();
        assert_eq!(p.repository, "a/manifests");
    }

    #[test]
    fn rejections() {
        assert_eq!(
            parse("library/alpine/manifests/1", None).unwrap_err().code,
            "NAME_UNKNOWN"
        );
        for (bad, code) in [
            ("docker.io/../etc/passwd/blobs/sha256:00", "DIGEST_INVALID"),
            ("docker.io/../etc/manifests/1", "NAME_INVALID"),
            ("docker.io/a/./b/manifests/1", "NAME_INVALID"),
            ("docker.io/A/manifests/1", "NAME_INVALID"),
            ("docker.io/a/manifests/-bad", "MANIFEST_INVALID"),
            ("docker.io/a/blobs/sha256:xyz", "DIGEST_INVALID"),
            ("docker.io/a/blobs/md5:00", "DIGEST_INVALID"),
            ("docker.io/a/uploads/x", "NOT_FOUND"),
            ("docker.io/a/blobs/uploads/", "UNSUPPORTED"),
        ] {
            assert_eq!(parse(bad, None).unwrap_err().code, code, "{bad}");
        }
        assert_eq!(
            parse("a/manifests/1", Some("bad/ns")).unwrap_err().code,
            "NAME_INVALID"
        );
        assert_eq!(
            parse(&"a/".repeat(600), None).unwrap_err().code,
            "NAME_INVALID"
        );
    }

    proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,200}", ns in prop::option::of("\\PC{0,20}")) {
            let _ = parse(&s, ns.as_deref());
        }

        #[test]
        fn accepted_paths_have_valid_names(s in "[a-z0-9./:_-]{1,40}/(manifests/[a-z0-9.]{1,8}|tags/list)") {
            if let Ok(p) = parse(&s, None) {
                prop_assert!(validate_repository(&p.repository).is_ok());
                prop_assert!(!p.repository.split('/').any(|c| c == ".." || c == "."));
            }
        }
    }
}
