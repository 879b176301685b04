//! What kagami knows about OCI content, in one place: the media types, the `Accept` list
//! of manifest requests, the manifest size cap, the one manifest/index parser
//! ([`ManifestView`]) and the one incremental hasher ([`Hasher`]). Pure: no I/O.
//!
//! Manifests are kept as the exact bytes received (their digest is the digest of those
//! bytes); [`ManifestView`] is only a view of them.

use serde::{Deserialize, Deserializer, Serialize};
use sha2::Digest as _;

use crate::reference::{Algorithm, Digest};

pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar";
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";

/// The Accept header of manifest requests: every manifest type kagami handles.
pub const MANIFEST_ACCEPT: &str = "application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json";

/// Manifests larger than this are refused, fetched or served (ARCHITECTURE.md,
/// kagami-client).
pub const MAX_MANIFEST_SIZE: u64 = 4 * 1024 * 1024;

/// True for an index or manifest list media type.
pub fn is_index(media_type: &str) -> bool {
    media_type == OCI_INDEX || media_type == DOCKER_MANIFEST_LIST
}

/// A running hash for one digest algorithm: content is hashed while it streams and
/// compared with the digest it was asked by at the end.
#[derive(Clone)]
pub enum Hasher {
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl Hasher {
    pub fn new(algorithm: Algorithm) -> Hasher {
        match algorithm {
            Algorithm::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            Algorithm::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }

    pub fn algorithm(&self) -> Algorithm {
        match self {
            Hasher::Sha256(_) => Algorithm::Sha256,
            Hasher::Sha512(_) => Algorithm::Sha512,
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    /// The digest of everything hashed so far.
    pub fn finish(self) -> Digest {
        let algorithm = self.algorithm();
        let hash = match self {
            Hasher::Sha256(h) => h.finalize().to_vec(),
            Hasher::Sha512(h) => h.finalize().to_vec(),
        };
        let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
        format!("{}:{hex}", algorithm.name())
            .parse()
            .expect("a hash is a valid digest")
    }

    /// The digest of `data` with `algorithm`.
    pub fn digest(algorithm: Algorithm, data: &[u8]) -> Digest {
        let mut h = Hasher::new(algorithm);
        h.update(data);
        h.finish()
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A descriptor as a manifest or index names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: Digest,
    /// Required by the specification; [`ManifestView::checked`] refuses a descriptor
    /// without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// Parses `os/arch[/variant]`.
    pub fn parse(s: &str) -> Option<Platform> {
        let mut it = s.split('/');
        let os = it.next().filter(|x| !x.is_empty())?;
        let architecture = it.next().filter(|x| !x.is_empty())?;
        let variant = it.next().filter(|x| !x.is_empty()).map(str::to_string);
        if it.next().is_some() {
            return None;
        }
        Some(Platform {
            os: os.into(),
            architecture: architecture.into(),
            variant,
        })
    }

    /// The platform this program runs on, in OCI names.
    pub fn host() -> Platform {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            "loongarch64" => "loong64",
            other => other,
        };
        Platform {
            os: std::env::consts::OS.into(),
            architecture: architecture.into(),
            variant: None,
        }
    }

    /// True when an index entry's platform satisfies this one (a variant asked for must
    /// match; no variant asked for matches any).
    pub fn matches(&self, other: &Platform) -> bool {
        self.os == other.os
            && self.architecture == other.architecture
            && (self.variant.is_none() || self.variant == other.variant)
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// An image manifest or an index (or an artifact manifest's `blobs`), viewed loosely:
/// [`ManifestView::parse`] needs JSON only, and keeps the descriptors it can read,
/// noting the others in `rejected`; [`ManifestView::checked`] is the strict reading a
/// puller needs.
#[derive(Debug, Clone, Default)]
pub struct ManifestView {
    pub schema_version: Option<u64>,
    pub media_type: Option<String>,
    pub config: Option<Descriptor>,
    pub layers: Vec<Descriptor>,
    pub manifests: Vec<Descriptor>,
    /// An artifact manifest's `blobs`.
    pub artifact_blobs: Vec<Descriptor>,
    /// Descriptors that could not be read, with why (`layers[1]: ...`).
    pub rejected: Vec<String>,
}

/// The JSON as read, before its fields' types are checked.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Raw {
    schema_version: Option<serde_json::Value>,
    media_type: Option<serde_json::Value>,
    config: Option<serde_json::Value>,
    layers: Option<serde_json::Value>,
    manifests: Option<serde_json::Value>,
    blobs: Option<serde_json::Value>,
}

/// `v` read as a `T`; `None` when absent or null, and noted in `rejected` when of the
/// wrong shape.
fn typed<T: serde::de::DeserializeOwned>(
    rejected: &mut Vec<String>,
    at: String,
    v: Option<serde_json::Value>,
) -> Option<T> {
    match serde_json::from_value(v.filter(|v| !v.is_null())?) {
        Ok(t) => Some(t),
        Err(e) => {
            rejected.push(format!("{at}: {e}"));
            None
        }
    }
}

impl ManifestView {
    /// Reads any JSON object; `Err` only when `bytes` is not one. A field of the wrong
    /// type reads as absent, and is noted in `rejected` like an unreadable descriptor.
    pub fn parse(bytes: &[u8]) -> Result<ManifestView, String> {
        let raw: Raw = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        let mut rejected = Vec::new();
        let schema_version = typed(&mut rejected, "schemaVersion".into(), raw.schema_version);
        let media_type = typed(&mut rejected, "mediaType".into(), raw.media_type);
        let config = typed(&mut rejected, "config".into(), raw.config);
        let list = |rejected: &mut Vec<String>, name: &str, l: Option<serde_json::Value>| {
            let items: Vec<serde_json::Value> =
                typed(rejected, name.to_string(), l).unwrap_or_default();
            items
                .into_iter()
                .enumerate()
                .filter_map(|(i, d)| typed(rejected, format!("{name}[{i}]"), Some(d)))
                .collect::<Vec<Descriptor>>()
        };
        let layers = list(&mut rejected, "layers", raw.layers);
        let manifests = list(&mut rejected, "manifests", raw.manifests);
        let artifact_blobs = list(&mut rejected, "blobs", raw.blobs);
        Ok(ManifestView {
            schema_version,
            media_type,
            config,
            layers,
            manifests,
            artifact_blobs,
            rejected,
        })
    }

    /// The strict reading: schema version 2, and every descriptor readable and sized.
    pub fn checked(bytes: &[u8]) -> Result<ManifestView, String> {
        let v = ManifestView::parse(bytes)?;
        if v.schema_version != Some(2) {
            return Err(format!(
                "schemaVersion {:?} is not supported (only 2)",
                v.schema_version
            ));
        }
        if let Some(why) = v.rejected.first() {
            return Err(why.clone());
        }
        if let Some(d) = v.all().find(|d| d.size.is_none()) {
            return Err(format!("descriptor {} has no size", d.digest));
        }
        Ok(v)
    }

    /// The media type: the one declared in the body, else guessed from its shape.
    pub fn guess_media_type(&self) -> &str {
        match &self.media_type {
            Some(m) => m,
            None if !self.manifests.is_empty() => OCI_INDEX,
            None => OCI_MANIFEST,
        }
    }

    /// Config and layers: every blob an image manifest refers to.
    pub fn blobs(&self) -> impl Iterator<Item = &Descriptor> {
        self.config.iter().chain(self.layers.iter())
    }

    /// Every descriptor read: config, layers, manifests and an artifact's blobs.
    pub fn all(&self) -> impl Iterator<Item = &Descriptor> {
        self.blobs()
            .chain(self.manifests.iter())
            .chain(self.artifact_blobs.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    #[test]
    fn platforms() {
        let p = Platform::parse("linux/arm64/v8").unwrap();
        assert_eq!(p.to_string(), "linux/arm64/v8");
        assert!(Platform::parse("linux").is_none());
        assert!(Platform::parse("linux/amd64/x/y").is_none());
        let want = Platform::parse("linux/arm64").unwrap();
        assert!(want.matches(&p));
        assert!(!p.matches(&Platform::parse("linux/arm64/v9").unwrap()));
        assert!(!want.matches(&Platform::parse("linux/amd64").unwrap()));
    }

    #[test]
    fn view() {
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"c","digest":"{A}","size":2}},"layers":[{{"mediaType":"l","digest":"{B}","size":3}}]}}"#
        );
        let v = ManifestView::checked(m.as_bytes()).unwrap();
        assert_eq!(v.blobs().count(), 2);
        assert!(!is_index(v.guess_media_type()));
        assert!(ManifestView::checked(br#"{"schemaVersion":1}"#).is_err());
        assert!(ManifestView::parse(b"\x1f\x8b not json").is_err());
    }

    #[test]
    fn loose_and_strict_readings() {
        // No size on the config, a bad digest among the layers, a layers list of the
        // wrong type elsewhere: the loose reading keeps what it can.
        let m = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"{A}"}},"layers":[{{"digest":"{B}","size":1}},{{"digest":"not a digest"}}]}}"#
        );
        let v = ManifestView::parse(m.as_bytes()).unwrap();
        let got: Vec<String> = v.blobs().map(|d| d.digest.to_string()).collect();
        assert_eq!(got, [A, B]);
        assert_eq!(v.rejected.len(), 1);
        assert!(v.rejected[0].starts_with("layers[1]: "), "{:?}", v.rejected);
        let why = ManifestView::checked(m.as_bytes()).unwrap_err();
        assert!(why.starts_with("layers[1]"), "{why}");

        let m = format!(r#"{{"schemaVersion":2,"config":{{"digest":"{A}"}},"layers":5}}"#);
        let v = ManifestView::parse(m.as_bytes()).unwrap();
        assert!(v.layers.is_empty());
        assert_eq!(v.blobs().count(), 1);
        let why = ManifestView::checked(m.as_bytes()).unwrap_err();
        assert!(why.starts_with("layers: "), "{why}");
        let m = format!(r#"{{"schemaVersion":2,"config":{{"digest":"{A}"}}}}"#);
        let why = ManifestView::checked(m.as_bytes()).unwrap_err();
        assert_eq!(why, format!("descriptor {A} has no size"));

        let i = format!(
            r#"{{"manifests":[{{"digest":"{A}","size":9,"platform":{{"os":"linux","architecture":"amd64"}}}}]}}"#
        );
        let v = ManifestView::parse(i.as_bytes()).unwrap();
        assert_eq!(v.guess_media_type(), OCI_INDEX);
        assert_eq!(v.all().count(), 1);
    }

    #[test]
    fn hashes() {
        assert_eq!(
            Hasher::digest(Algorithm::Sha256, b"").to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let d: Digest = "sha512:cf83e1357eefb8bdf1542850d66d8007d620e4050b5715dc83f4a921d36ce9ce47d0d13c5d85f2b0ff8318d2877eec2f63b931bd47417a81a538327af927da3e"
            .parse()
            .unwrap();
        assert_eq!(Hasher::digest(d.algorithm(), b""), d);
        let mut h = Hasher::new(Algorithm::Sha256);
        h.update(b"a");
        h.update(b"b");
        assert_eq!(h.finish(), Hasher::digest(Algorithm::Sha256, b"ab"));
    }
}
