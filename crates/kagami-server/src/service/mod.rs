//! The services: what kagami does for a request, with no HTTP in it (no axum). Each is
//! a struct holding the `Arc`s it uses, never the whole state; the HTTP layer
//! (`crate::http`) parses a request once into a [`RequestContext`], calls a service and
//! turns its typed reply (`reply`) or error (`error::ApiError`) into a response.

use std::sync::Arc;

use std::sync::OnceLock;

use kagami_config::{Config, Plan, PlanOptions};
use kagami_store::Store;

use crate::path::OciPath;
use crate::peers::Cluster;
use crate::telemetry::Telemetry;
use crate::upstream::Upstream;

pub mod blobs;
pub mod error;
pub(crate) mod import;
pub(crate) mod manifests;
pub(crate) mod pins;
pub(crate) mod purge;
pub(crate) mod referrers;
pub(crate) mod reply;
pub(crate) mod tags;
pub(crate) mod warm;

/// One request, parsed once: what it names and where that can come from.
pub(crate) struct RequestContext {
    pub path: OciPath,
    /// The `Range` header, as sent.
    pub range: Option<String>,
    pub head: bool,
    /// The configuration the request started with.
    config: Arc<Config>,
    options: PlanOptions,
    plan: OnceLock<Arc<Plan>>,
}

impl RequestContext {
    pub(crate) fn new(
        path: OciPath,
        config: Arc<Config>,
        options: PlanOptions,
        range: Option<String>,
        head: bool,
    ) -> RequestContext {
        RequestContext {
            path,
            range,
            head,
            config,
            options,
            plan: OnceLock::new(),
        }
    }

    /// The plan of the request's registry: computed once, when first needed (a store hit
    /// needs none).
    pub(crate) fn plan(&self) -> &Arc<Plan> {
        self.plan.get_or_init(|| {
            Arc::new(kagami_config::plan(
                &self.path.reference(),
                &self.config,
                self.options,
            ))
        })
    }
}

/// What services are built from (each keeps the parts it uses).
pub(crate) struct Deps {
    pub store: Store,
    pub upstream: Arc<dyn Upstream>,
    pub telemetry: Arc<Telemetry>,
    pub cluster: Cluster,
}
