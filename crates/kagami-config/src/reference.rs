//! Image references, parsed and normalised the way docker and containerd do it:
//! `alpine` is `docker.io/library/alpine:latest`.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use crate::endpoint::{DOCKER_HUB, validate_host};

/// A content digest: `sha256:<64 hex>` or `sha512:<128 hex>`, lower-case hex.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: Algorithm,
    hex: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    Sha256,
    Sha512,
}

impl Digest {
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }
    pub fn hex(&self) -> &str {
        &self.hex
    }
    /// Builds a sha256 digest from a finished hash.
    pub fn sha256_from_bytes(hash: &[u8]) -> Digest {
        Digest {
            algorithm: Algorithm::Sha256,
            hex: hash.iter().map(|b| format!("{b:02x}")).collect(),
        }
    }
}

impl Algorithm {
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.name(), self.hex)
    }
}

impl Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl FromStr for Digest {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ReferenceError::Digest(s.to_string());
        let (alg, hex) = s.split_once(':').ok_or_else(bad)?;
        let (algorithm, len) = match alg {
            "sha256" => (Algorithm::Sha256, 64),
            "sha512" => (Algorithm::Sha512, 128),
            _ => return Err(bad()),
        };
        if hex.len() != len || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(bad());
        }
        Ok(Digest {
            algorithm,
            hex: hex.to_string(),
        })
    }
}

/// A normalised image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// The registry name (`docker.io`, `quay.io`, `127.0.0.1:5000`).
    pub registry: String,
    /// The repository path inside the registry (`library/alpine`).
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    #[error("image reference is empty")]
    Empty,
    #[error("invalid image reference {reference:?}: {why}")]
    Invalid { reference: String, why: String },
    #[error(
        "invalid digest {0:?}: expected sha256:<64 lower-case hex> or sha512:<128 lower-case hex>"
    )]
    Digest(String),
}

const MAX_NAME: usize = 255;

impl Reference {
    /// The reference sent in a manifest URL: the digest when there is one, else the tag.
    pub fn reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".into(),
        }
    }

    /// `registry/repository`.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// Parses and normalises a reference.
    pub fn parse(s: &str) -> Result<Reference, ReferenceError> {
        let invalid = |why: &str| ReferenceError::Invalid {
            reference: s.to_string(),
            why: why.to_string(),
        };
        if s.is_empty() {
            return Err(ReferenceError::Empty);
        }
        if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(invalid("contains whitespace"));
        }
        if s.contains("://") {
            return Err(invalid(
                "an image reference has no scheme (write host/repo:tag)",
            ));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((rest, d)) => (rest, Some(d.parse::<Digest>()?)),
            None => (s, None),
        };
        // A tag is after the last ':' that comes after the last '/'.
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let i = last_slash + i;
                (&rest[..i], Some(&rest[i + 1..]))
            }
            None => (rest, None),
        };
        if let Some(tag) = tag {
            validate_tag(tag).map_err(|w| invalid(&w))?;
        }
        if name.is_empty() {
            return Err(invalid("no repository name"));
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, remainder))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                validate_host(first).map_err(|e| invalid(&format!("registry {first:?}: {e}")))?;
                let reg = if first == "index.docker.io" || first == "registry-1.docker.io" {
                    DOCKER_HUB
                } else {
                    first
                };
                (reg.to_string(), remainder.to_string())
            }
            _ => (DOCKER_HUB.to_string(), name.to_string()),
        };
        if registry.chars().any(|c| c.is_ascii_uppercase()) {
            // Docker rejects upper-case registry names in references too.
            return Err(invalid("registry names must be lower-case"));
        }
        let repository = if registry == DOCKER_HUB && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        validate_repository(&repository).map_err(|w| invalid(&w))?;
        if registry.len() + 1 + repository.len() > MAX_NAME {
            return Err(invalid("name longer than 255 characters"));
        }
        let tag = match (&tag, &digest) {
            (None, None) => Some("latest".to_string()),
            (t, _) => t.map(str::to_string),
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }
}

impl FromStr for Reference {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Reference::parse(s)
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// A tag: `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
pub fn validate_tag(tag: &str) -> Result<(), String> {
    let mut chars = tag.chars();
    let ok = match chars.next() {
        Some(c) if c.is_ascii_alphanumeric() || c == '_' => {
            tag.len() <= 128
                && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        }
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "tag {tag:?} must match [A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}}"
        ))
    }
}

/// A repository path: `/`-separated components of `[a-z0-9]+` joined by `.`, `_`, `__` or
/// runs of `-`.
pub fn validate_repository(repo: &str) -> Result<(), String> {
    if repo.is_empty() {
        return Err("repository name is empty".into());
    }
    for comp in repo.split('/') {
        if comp.is_empty() {
            return Err(format!("repository {repo:?} has an empty path component"));
        }
        if comp.chars().any(|c| c.is_ascii_uppercase()) {
            return Err(format!("repository {repo:?} must be lower-case"));
        }
        if !valid_component(comp) {
            return Err(format!(
                "path component {comp:?} must be lower-case letters and digits, separated by '.', '_', '__' or '-'"
            ));
        }
    }
    Ok(())
}

fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: '.', '_', '__', or one or more '-'.
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = matches!(sep, "." | "_" | "__") || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn norm(s: &str) -> String {
        Reference::parse(s).unwrap().to_string()
    }

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn normalisation() {
        assert_eq!(norm("alpine"), "docker.io/library/alpine:latest");
        assert_eq!(
            norm("rancher/busybox:1.35"),
            "docker.io/rancher/busybox:1.35"
        );
        assert_eq!(
            norm("index.docker.io/alpine"),
            "docker.io/library/alpine:latest"
        );
        assert_eq!(
            norm("quay.io/coreos/etcd:v3.5.0"),
            "quay.io/coreos/etcd:v3.5.0"
        );
        assert_eq!(norm("localhost/a"), "localhost/a:latest");
        assert_eq!(norm("127.0.0.1:5000/a/b:t"), "127.0.0.1:5000/a/b:t");
        assert_eq!(norm("localhost:5000/a"), "localhost:5000/a:latest");
        assert_eq!(
            norm(&format!("alpine@{D}")),
            format!("docker.io/library/alpine@{D}")
        );
        assert_eq!(
            norm(&format!("alpine:3.20@{D}")),
            format!("docker.io/library/alpine:3.20@{D}")
        );
        let r = Reference::parse(&format!("alpine:3.20@{D}")).unwrap();
        assert_eq!(r.reference(), D);
        assert_eq!(Reference::parse("a").unwrap().reference(), "latest");
        assert_eq!(
            norm("a__b/c-----d.e_f"),
            "docker.io/a__b/c-----d.e_f:latest"
        );
    }

    #[test]
    fn rejections() {
        for bad in [
            "",
            "Alpine",
            "docker.io/Library/alpine",
            "a//b",
            "a/",
            "a:",
            "a:-x",
            "a@sha256:abc",
            "a@md5:0123",
            "https://docker.io/alpine",
            "a b",
            "a/.b",
            "a/b_",
            "a___b",
            "host:port/x",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn error_message_names_input() {
        let e = Reference::parse("docker.io/Library/alpine").unwrap_err();
        assert!(e.to_string().contains("Library"), "{e}");
        let e = Reference::parse("a@sha256:abc").unwrap_err();
        assert!(e.to_string().contains("sha256:abc"), "{e}");
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in "\\PC{0,80}") {
            let _ = Reference::parse(&s);
        }

        #[test]
        fn normalised_form_is_a_fixed_point(
            reg in prop::option::of("[a-z]{1,8}\\.[a-z]{2,3}(:[1-9][0-9]{0,3})?"),
            comps in prop::collection::vec("[a-z0-9]{1,5}([._-][a-z0-9]{1,5})?", 1..4),
            tag in prop::option::of("[A-Za-z0-9_][A-Za-z0-9_.-]{0,10}"),
        ) {
            let mut s = String::new();
            if let Some(r) = &reg { s.push_str(r); s.push('/'); }
            s.push_str(&comps.join("/"));
            if let Some(t) = &tag { s.push(':'); s.push_str(t); }
            let once = Reference::parse(&s).unwrap();
            let twice = Reference::parse(&once.to_string()).unwrap();
            prop_assert_eq!(once, twice);
        }
    }
}
