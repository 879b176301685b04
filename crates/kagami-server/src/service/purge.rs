//! Purge (`kagami purge`, `POST /kagami/purge`): removes one image from this node's store
//! and withdraws it from the cluster.
//!
//! What goes: the tag (for a tag reference; for a digest reference, the tags of the same
//! repository that point at it), the image's manifests (an index's child manifests too), and
//! every blob of the image that no other image still tagged in the store, and no image the
//! policy pins, uses. Tags of other repositories pointing at the same manifest keep it.
//! Refused, changing nothing, when the image is pinned by the policy, when one of its blobs
//! is being read or written, or when the store does not hold it.

use std::collections::HashSet;
use std::sync::Arc;

use kagami_config::oci::{MAX_MANIFEST_SIZE, ManifestView};
use kagami_config::{Digest, Reference};
use kagami_store::{Store, StoreError};
use serde::{Deserialize, Serialize};

use crate::peers::{Cluster, ContentKey};
use crate::service::pins::{Pins, image_content};

/// The request body of `POST /kagami/purge`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PurgeRequest {
    /// An image reference (`registry/repository:tag` or `...@sha256:...`); Docker Hub short
    /// names are normalised (`alpine` is `docker.io/library/alpine:latest`).
    pub image: String,
}

/// What a purge removed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PurgeReport {
    /// The reference as normalised.
    pub image: String,
    /// The manifest it resolved to.
    pub digest: String,
    /// Tags removed, as `registry/repository:tag`.
    pub tags: Vec<String>,
    /// Blobs removed (manifests included), with their sizes.
    pub removed: Vec<RemovedBlob>,
    /// Their total size.
    pub bytes: u64,
    /// Blobs of the image kept because another image still tagged in the store, or one the
    /// policy pins, uses them.
    pub kept: Vec<String>,
    /// Whether the removal was withdrawn from other nodes (P2P on).
    pub withdrawn: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RemovedBlob {
    pub digest: String,
    pub bytes: u64,
}

/// Why a purge was refused.
#[derive(Debug, thiserror::Error)]
pub enum PurgeError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0} is not in this node's store")]
    NotFound(String),
    #[error("{image} is pinned by the policy file (pin entry {entry}); remove it from pin first")]
    Pinned { image: String, entry: String },
    #[error("{image} cannot be purged now, nothing was removed: {source}")]
    InUse {
        image: String,
        #[source]
        source: StoreError,
    },
    #[error("purging {image}: {source}")]
    Store {
        image: String,
        #[source]
        source: StoreError,
    },
}

/// The purge service.
pub(crate) struct Purger {
    store: Store,
    cluster: Cluster,
    pins: Arc<Pins>,
    /// One purge at a time (each reads the whole tag index).
    one: tokio::sync::Mutex<()>,
}

impl Purger {
    pub(crate) fn new(store: Store, cluster: Cluster, pins: Arc<Pins>) -> Purger {
        Purger {
            store,
            cluster,
            pins,
            one: tokio::sync::Mutex::new(()),
        }
    }

    pub(crate) async fn purge(&self, image: &str) -> Result<PurgeReport, PurgeError> {
        let r = Reference::parse(image).map_err(|e| PurgeError::Invalid(e.to_string()))?;
        let _one = self.one.lock().await;
        let name = r.to_string();
        let content = image_content(&self.store, &r).await;
        let Some(top) = content.top.clone() else {
            return Err(PurgeError::NotFound(name));
        };
        // The pinned set is refreshed first, so that a pin entry naming this image is seen
        // even if the store changed a moment ago.
        self.pins.refresh().await;
        if self.store.is_pinned(&top) {
            let entry = self.pins.pinned_by(&top).unwrap_or_else(|| top.to_string());
            return Err(PurgeError::Pinned { image: name, entry });
        }
        // The tags that go: the one named, or those of the repository pointing at the digest.
        let tags: Vec<(String, String, String)> = match (&r.digest, &r.tag) {
            (None, Some(t)) => vec![(r.registry.clone(), r.repository.clone(), t.clone())],
            _ => self
                .store
                .list_tags(&r.registry, &r.repository)
                .into_iter()
                .filter(|t| {
                    self.store
                        .get_tag(&r.registry, &r.repository, t)
                        .is_some_and(|e| e.digest == top)
                })
                .map(|t| (r.registry.clone(), r.repository.clone(), t))
                .collect(),
        };
        let held: Vec<&Digest> = content
            .digests
            .iter()
            .filter(|d| self.store.blob_size(d).is_some())
            .collect();
        if held.is_empty()
            && tags
                .iter()
                .all(|(g, p, t)| self.store.get_tag(g, p, t).is_none())
        {
            return Err(PurgeError::NotFound(name));
        }
        // What every other tagged image uses stays.
        let going: HashSet<&(String, String, String)> = tags.iter().collect();
        let mut keep: HashSet<Digest> = HashSet::new();
        for key in self.store.all_tags() {
            if going.contains(&key) {
                continue;
            }
            let (registry, repository, tag) = key;
            if let Some(e) = self.store.get_tag(&registry, &repository, &tag) {
                closure(&self.store, &e.digest, &mut keep).await;
            }
        }
        let (remove, kept): (Vec<&Digest>, Vec<&Digest>) = held
            .into_iter()
            .partition(|d| !keep.contains(*d) && !self.store.is_pinned(d));
        let remove: Vec<Digest> = remove.into_iter().cloned().collect();
        let store = self.store.clone();
        let t = tags.clone();
        let removed = tokio::task::spawn_blocking(move || store.remove(&t, &remove))
            .await
            .unwrap_or_else(|e| {
                Err(StoreError::Invalid {
                    what: "purge",
                    value: e.to_string(),
                    why: "the removal task failed",
                })
            })
            .map_err(|source| match source {
                StoreError::InUse { .. } => PurgeError::InUse {
                    image: name.clone(),
                    source,
                },
                source => PurgeError::Store {
                    image: name.clone(),
                    source,
                },
            })?;
        // Blobs are withdrawn by the store's Removed events (`peers::advertise_store`); the
        // tag keys here.
        let mut withdrawn = false;
        if let Some(peers) = self.cluster.peers() {
            let keys: Vec<String> = tags
                .iter()
                .map(|(g, p, t)| ContentKey::tag(g, p, t).to_string())
                .collect();
            if !keys.is_empty() {
                peers.router.withdraw(keys).await;
            }
            withdrawn = true;
        }
        tracing::info!(image = %name, blobs = removed.len(), bytes = removed.iter().map(|(_, b)| b).sum::<u64>(), "purged");
        Ok(PurgeReport {
            image: name,
            digest: top.to_string(),
            tags: tags
                .iter()
                .map(|(g, p, t)| format!("{g}/{p}:{t}"))
                .collect(),
            bytes: removed.iter().map(|(_, b)| b).sum(),
            removed: removed
                .into_iter()
                .map(|(d, bytes)| RemovedBlob {
                    digest: d.to_string(),
                    bytes,
                })
                .collect(),
            kept: kept.into_iter().map(|d| d.to_string()).collect(),
            withdrawn,
        })
    }
}

/// Adds `top` and everything its stored manifests name (an index's children and theirs).
async fn closure(store: &Store, top: &Digest, out: &mut HashSet<Digest>) {
    let mut todo = vec![top.clone()];
    while let Some(d) = todo.pop() {
        if !out.insert(d.clone()) {
            continue;
        }
        let Ok(Some(bytes)) = store.read_small(&d, MAX_MANIFEST_SIZE).await else {
            continue;
        };
        let Ok(view) = ManifestView::parse(&bytes) else {
            continue;
        };
        for desc in view.blobs().chain(view.artifact_blobs.iter()) {
            out.insert(desc.digest.clone());
        }
        todo.extend(view.manifests.iter().map(|m| m.digest.clone()));
    }
}
