//! Pin bookkeeping: the images the policy file pins (`pin:`), resolved through the store's
//! tag index and manifests into the set of digests the store never evicts
//! (`Store::set_pinned`), and what `/status` shows of each image.
//!
//! Recomputed when the policy changes ([`Pins::refresh`], from `AppState::set_policy`) and
//! whenever the store's blobs or tags change ([`follow`]); cheap, because only the pinned
//! images' manifests are read. Pinning fetches nothing: an image not in the store is shown
//! as not held, and its content is kept from the moment it arrives (a pull, `kagami warm`,
//! an import).

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};

use kagami_config::oci::{MAX_MANIFEST_SIZE, ManifestView};
use kagami_config::{Digest, Policy, Reference};
use kagami_store::Store;

use crate::report::PinnedImage;

/// The pinned set and its status, kept up to date.
pub(crate) struct Pins {
    store: Store,
    policy: Arc<RwLock<Arc<Policy>>>,
    status: Mutex<Vec<PinnedImage>>,
    /// One refresh at a time: the last one to finish is the newest computation.
    running: tokio::sync::Mutex<()>,
}

/// What one image holds: the digests it names (whether stored or not) and its status.
pub(crate) struct ImageContent {
    pub top: Option<Digest>,
    /// Every digest the image names, as far as its stored manifests tell: the manifest, an
    /// index's child manifests, and their configs and layers.
    pub digests: Vec<Digest>,
    pub status: PinnedImage,
}

impl Pins {
    pub(crate) fn new(store: Store, policy: Arc<RwLock<Arc<Policy>>>) -> Arc<Pins> {
        Arc::new(Pins {
            store,
            policy,
            status: Mutex::new(Vec::new()),
            running: tokio::sync::Mutex::new(()),
        })
    }

    /// Recomputes the pinned set from the current policy and the store, and hands it to
    /// the store.
    pub(crate) async fn refresh(&self) {
        let _one = self.running.lock().await;
        let policy = self
            .policy
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mut set = HashSet::new();
        let mut status = Vec::with_capacity(policy.pin.len());
        for r in &policy.pin {
            let c = image_content(&self.store, r).await;
            set.extend(c.digests);
            status.push(c.status);
        }
        self.store.set_pinned(set);
        *self.status.lock().unwrap_or_else(PoisonError::into_inner) = status;
    }

    /// Each pinned image as last computed.
    pub(crate) fn status(&self) -> Vec<PinnedImage> {
        self.status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The policy's pin entry whose image is `top` (a manifest digest), if any.
    pub(crate) fn pinned_by(&self, top: &Digest) -> Option<String> {
        let top = top.to_string();
        self.status()
            .into_iter()
            .find(|p| p.digest.as_deref() == Some(top.as_str()))
            .map(|p| p.image)
    }
}

/// Follows the store's changes and refreshes the pinned set after each (changes during a
/// refresh are coalesced into the next). Ends when the pins or the store go away.
pub(crate) async fn follow(pins: Weak<Pins>, mut changes: tokio::sync::watch::Receiver<u64>) {
    loop {
        match pins.upgrade() {
            Some(p) => p.refresh().await,
            None => return,
        }
        if changes.changed().await.is_err() {
            return;
        }
    }
}

/// Resolves `r` in the store (its digest, else its tag in the tag index) and reads its
/// manifests: what the image names, and how much of it is held.
pub(crate) async fn image_content(store: &Store, r: &Reference) -> ImageContent {
    let top = match &r.digest {
        Some(d) => Some(d.clone()),
        None => r.tag.as_deref().and_then(|t| {
            store
                .get_tag(&r.registry, &r.repository, t)
                .map(|e| e.digest)
        }),
    };
    let mut status = PinnedImage {
        image: r.to_string(),
        digest: top.as_ref().map(|d| d.to_string()),
        held: "not held".into(),
        held_bytes: 0,
        blobs_held: 0,
        blobs_missing: 0,
    };
    let Some(top) = top else {
        return ImageContent {
            top: None,
            digests: Vec::new(),
            status,
        };
    };
    let mut digests = vec![top.clone()];
    // Child manifests of an index that this node never fetched (other platforms) are
    // named but do not count as missing; at least one platform must be held.
    let mut skipped: HashSet<Digest> = HashSet::new();
    let mut children = 0usize;
    if let Some(view) = read_view(store, &top).await {
        for d in view.blobs().chain(view.artifact_blobs.iter()) {
            digests.push(d.digest.clone());
        }
        for child in &view.manifests {
            children += 1;
            digests.push(child.digest.clone());
            match read_view(store, &child.digest).await {
                Some(cv) => digests.extend(cv.all().map(|d| d.digest.clone())),
                None => {
                    skipped.insert(child.digest.clone());
                }
            }
        }
    }
    let mut seen = HashSet::new();
    digests.retain(|d| seen.insert(d.clone()));
    for d in &digests {
        match store.blob_size(d) {
            Some(size) => {
                status.blobs_held += 1;
                status.held_bytes += size;
            }
            None if skipped.contains(d) => {}
            None => status.blobs_missing += 1,
        }
    }
    status.held = if store.blob_size(&top).is_none() {
        "not held"
    } else if status.blobs_missing == 0 && (children == 0 || skipped.len() < children) {
        "held"
    } else {
        "partly held"
    }
    .into();
    ImageContent {
        top: Some(top),
        digests,
        status,
    }
}

/// A stored manifest, parsed leniently; `None` when it is not stored or unreadable.
async fn read_view(store: &Store, d: &Digest) -> Option<ManifestView> {
    let bytes = store.read_small(d, MAX_MANIFEST_SIZE).await.ok()??;
    ManifestView::parse(&bytes).ok()
}
