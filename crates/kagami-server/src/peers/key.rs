//! The keys of the P2P routing table, typed: built and read here only, written to the
//! [`kagami_p2p::Router`] as strings (`Display`) and read back with `FromStr`.

use std::fmt;
use std::str::FromStr;

use kagami_config::Digest;

/// What a node advertises and looks up.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ContentKey {
    /// A blob or manifest the node holds: `<digest>`.
    Digest(Digest),
    /// A tag the node has resolved: `tag:<registry>/<repository>:<tag>`.
    Tag {
        registry: String,
        repository: String,
        tag: String,
    },
    /// A blob the node is fetching for the cluster right now: `inflight:<digest>`
    /// (see `service::blobs`' cluster fetch).
    Inflight(Digest),
}

const TAG: &str = "tag:";
const INFLIGHT: &str = "inflight:";

impl ContentKey {
    pub fn tag(registry: &str, repository: &str, tag: &str) -> ContentKey {
        ContentKey::Tag {
            registry: registry.to_string(),
            repository: repository.to_string(),
            tag: tag.to_string(),
        }
    }
}

impl fmt::Display for ContentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ContentKey::Digest(d) => write!(f, "{d}"),
            ContentKey::Tag {
                registry,
                repository,
                tag,
            } => write!(f, "{TAG}{registry}/{repository}:{tag}"),
            ContentKey::Inflight(d) => write!(f, "{INFLIGHT}{d}"),
        }
    }
}

/// A string that is none of the key forms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not a P2P key (a digest, tag:<registry>/<repository>:<tag> or inflight:<digest>)"
)]
pub struct BadKey(pub String);

impl FromStr for ContentKey {
    type Err = BadKey;

    fn from_str(s: &str) -> Result<ContentKey, BadKey> {
        let bad = || BadKey(s.to_string());
        if let Some(rest) = s.strip_prefix(TAG) {
            // A registry has no '/', a repository no ':'.
            let (registry, path) = rest.split_once('/').ok_or_else(bad)?;
            let (repository, tag) = path.rsplit_once(':').ok_or_else(bad)?;
            if registry.is_empty() || repository.is_empty() || tag.is_empty() {
                return Err(bad());
            }
            return Ok(ContentKey::tag(registry, repository, tag));
        }
        if let Some(rest) = s.strip_prefix(INFLIGHT) {
            return rest.parse().map(ContentKey::Inflight).map_err(|_| bad());
        }
        s.parse().map(ContentKey::Digest).map_err(|_| bad())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    #[test]
    fn keys_round_trip() {
        let d: Digest = A.parse().unwrap();
        for k in [
            ContentKey::Digest(d.clone()),
            ContentKey::Inflight(d),
            ContentKey::tag("localhost:5000", "team/app", "1.0"),
        ] {
            assert_eq!(k.to_string().parse::<ContentKey>().unwrap(), k);
        }
        assert_eq!(
            ContentKey::tag("r.example", "team/app", "1.0").to_string(),
            "tag:r.example/team/app:1.0"
        );
        assert_eq!(
            format!("inflight:{A}")
                .parse::<ContentKey>()
                .unwrap()
                .to_string(),
            format!("inflight:{A}")
        );
        for bad in ["tag:noslash", "tag:r/repo", "inflight:x", "x", "tag:r/:t"] {
            assert!(bad.parse::<ContentKey>().is_err(), "{bad}");
        }
    }
}
