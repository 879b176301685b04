//! kagami's OCI distribution pull API: the pull-through mirror containerd talks to.
//!
//! [`router`] builds the whole HTTP application on an [`AppState`] (configuration, content
//! store, upstream). Requests are answered from the store, else from one shared upstream
//! fetch per digest that is streamed to every waiting client while it is written to the
//! store.
//!
//! Invariants: no blob is ever held whole in memory (manifests, at most 4 MiB, are); a
//! request the mirror cannot serve gets a fast OCI error (404 so that containerd moves on),
//! never a hang; what is stored has been verified against its digest by the store.

pub mod admin;
pub mod app;
pub mod client_upstream;
#[cfg(feature = "containerd")]
pub mod containerd;
mod http;
mod origin;
mod service;
pub use origin::Origin;
pub use service::error;

/// `kagami import`: air-gap archives into the store (`service::import`), and its admin
/// route.
pub mod import {
    pub use crate::http::import::IMPORT_PATH;
    pub use crate::service::import::{ImportError, ImportReport, ImportRequest, ImportedImage};

    /// Imports the OCI layout directory, OCI archive or `docker save` tarball at `path`
    /// into the store of `state`. `name` names the image when the archive gives none (or
    /// adds a name when the archive holds one image); see docs/import.md.
    pub async fn import_path(
        state: &crate::AppState,
        path: &std::path::Path,
        name: Option<&str>,
    ) -> Result<ImportReport, ImportError> {
        state.services().import.import(path, name).await
    }
}
/// Cluster warming (docs/warm.md): the [`Warmer`](warm::Warmer) of a server
/// (`AppState::warmer`) and its admin route.
pub mod warm {
    pub use crate::http::warm::{WARM_PATH, WarmAccepted, WarmRequest};
    pub use crate::report::{WarmImage, WarmReport};
    pub use crate::service::warm::{
        MAX_IMAGES, MAX_RETRY_AFTER, PASS_EVERY, RESOLVE_EVERY, STATES, Warmer, chosen, retry_after,
    };
}

/// `kagami purge`: removing an image from a node (`service::purge`), and its admin route.
pub mod purge {
    pub use crate::http::purge::PURGE_PATH;
    pub use crate::service::purge::{PurgeError, PurgeReport, PurgeRequest, RemovedBlob};
}
pub mod telemetry;
pub use telemetry::{metrics, refusals};
pub mod path;
pub mod peers;
pub mod range;
pub mod report;
pub mod status;
mod ui;
pub mod upstream;

pub use app::{AppState, ServerOptions, Source};
pub use http::router;
pub use http::{listener, peer_api, request_id};
pub use peer_api::{NodeInfo, peer_router};
pub use peers::Peers;
pub use service::blobs::{FETCH_MEMORY_MAX, FETCH_READ_AHEAD, FetchLimits};
pub use upstream::{
    BlobBody, BlobHead, FetchedManifest, FetchedReferrers, ManifestHead, Upstream, UpstreamError,
};
