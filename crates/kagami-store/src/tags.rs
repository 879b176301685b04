//! The tag index and manifest media types: small records kept in memory and persisted one
//! file each.

use std::fs;
use std::path::Path;
use std::time::SystemTime;

use kagami_config::Digest;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::StoreError;

/// What a tag pointed to when it was last fetched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagEntry {
    #[serde(with = "digest_serde")]
    pub digest: Digest,
    pub media_type: String,
    pub fetched_at: SystemTime,
}

/// One tag file on disk: the key is repeated inside so that the index can be rebuilt from the
/// files alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct TagFile {
    pub registry: String,
    pub repository: String,
    pub tag: String,
    pub entry: TagEntry,
}

mod digest_serde {
    use kagami_config::Digest;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Digest, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(d)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The file name of a tag: the sha256 of its length-prefixed key, so that any registry,
/// repository and tag string maps to one flat, safe name (no path traversal, no collisions
/// between `a/b` + `c` and `a` + `b/c`).
pub(crate) fn tag_file_name(registry: &str, repository: &str, tag: &str) -> String {
    let mut h = Sha256::new();
    for part in [registry, repository, tag] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    format!("{hex}.json")
}

pub(crate) fn check_key(registry: &str, repository: &str, tag: &str) -> Result<(), StoreError> {
    for (what, value) in [
        ("registry", registry),
        ("repository", repository),
        ("tag", tag),
    ] {
        if value.is_empty() {
            return Err(StoreError::Invalid {
                what,
                value: value.into(),
                why: "it is empty",
            });
        }
    }
    Ok(())
}

pub(crate) fn check_media_type(mt: &str) -> Result<(), StoreError> {
    let bad = |why| StoreError::Invalid {
        what: "media type",
        value: mt.into(),
        why,
    };
    if mt.is_empty() {
        return Err(bad("it is empty"));
    }
    if mt.len() > 255 {
        return Err(bad("it is longer than 255 bytes"));
    }
    if !mt.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad("it has characters other than printable ASCII"));
    }
    Ok(())
}

pub(crate) fn encode(file: &TagFile) -> Vec<u8> {
    // Serialising plain strings, a digest and a SystemTime after the epoch cannot fail.
    serde_json::to_vec(file).expect("a tag file always serialises")
}

/// Reads a tag file; `None` if it is unreadable, malformed, or not named after its key.
pub(crate) fn read_tag_file(path: &Path, name: &str) -> Option<TagFile> {
    let bytes = fs::read(path).ok()?;
    let t: TagFile = serde_json::from_slice(&bytes).ok()?;
    check_key(&t.registry, &t.repository, &t.tag).ok()?;
    (tag_file_name(&t.registry, &t.repository, &t.tag) == name).then_some(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn key_is_unambiguous() {
        assert_ne!(
            tag_file_name("r", "a/b", "c"),
            tag_file_name("r", "a", "b/c")
        );
        assert_ne!(tag_file_name("ra", "b", "c"), tag_file_name("r", "ab", "c"));
    }

    proptest! {
        #[test]
        fn tag_files_round_trip(
            registry in "\\PC{1,40}",
            repository in "\\PC{1,60}",
            tag in "\\PC{1,40}",
            secs in 0u64..4_000_000_000,
            nanos in 0u32..1_000_000_000,
        ) {
            let file = TagFile {
                registry: registry.clone(),
                repository: repository.clone(),
                tag: tag.clone(),
                entry: TagEntry {
                    digest: D.parse().unwrap(),
                    media_type: "application/vnd.oci.image.index.v1+json".into(),
                    fetched_at: SystemTime::UNIX_EPOCH + std::time::Duration::new(secs, nanos),
                },
            };
            let name = tag_file_name(&registry, &repository, &tag);
            prop_assert_eq!(name.len(), 64 + 5);
            prop_assert!(name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.'));
            let back: TagFile = serde_json::from_slice(&encode(&file)).unwrap();
            prop_assert_eq!(back, file);
        }

        #[test]
        fn media_type_check_never_panics(s in "\\PC{0,300}") {
            let _ = check_media_type(&s);
        }
    }
}
