//! The composition root: [`AppState`] builds the services once (`crate::service`) and
//! holds them with what the routes and `kagami serve` need (configuration, store,
//! telemetry, the node's P2P identity, containerd, the admin credential). HTTP handlers
//! get an `AppState`; a service never does.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, PoisonError, RwLock};
use std::time::Duration;

use kagami_config::{Config, PlanOptions, Policy};
use kagami_store::Store;

use crate::peers::Cluster;
use crate::service::Deps;
use crate::service::blobs::Blobs;
use crate::service::import::Importer;
use crate::service::manifests::Manifests;
use crate::service::pins::Pins;
use crate::service::purge::Purger;
use crate::service::referrers::Referrers;
use crate::service::tags::Tags;
use crate::service::warm::Warmer;
use crate::telemetry::Telemetry;
use crate::upstream::Upstream;

pub use crate::http::router;
pub use crate::origin::Source;

/// Settings of a running server.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// How long a resolved tag is served without asking upstream again.
    pub tag_ttl: Duration,
    pub disable_default_endpoint: bool,
    /// The registry of requests that name none (no `ns`, no registry in the path), as
    /// dockerd's `registry-mirrors` sends them; `None` refuses them.
    pub default_registry: Option<String>,
    /// Bounds on blob fetches and revalidations (`crate::FetchLimits`).
    pub limits: crate::service::blobs::FetchLimits,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            tag_ttl: Duration::from_secs(300),
            disable_default_endpoint: false,
            default_registry: Some(kagami_config::endpoint::DOCKER_HUB.to_string()),
            limits: Default::default(),
        }
    }
}

/// Everything a request handler needs. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub config: Arc<RwLock<Arc<Config>>>,
    /// The policy file (`kagami_config::policy`); empty when there is none.
    pub policy: Arc<RwLock<Arc<Policy>>>,
    pub store: Store,
    pub options: ServerOptions,
    /// Metrics, the status recorder and the refusal log: every count goes through it.
    pub telemetry: Arc<Telemetry>,
    pub ready: AtomicBool,
    /// Other nodes, when P2P is on (shared with the services through [`Cluster`]).
    pub peers: Arc<OnceLock<Arc<crate::peers::Peers>>>,
    /// This node's P2P identity and addresses, when P2P is on.
    pub node_info: Arc<OnceLock<crate::peers::NodeInfo>>,
    /// The node's containerd as a source of content for peers, when sharing it is on.
    #[cfg(feature = "containerd")]
    pub containerd: OnceLock<Arc<crate::containerd::ContainerdContent>>,
    /// The admin routes' credential, when they are on (see `crate::admin`).
    pub admin: Arc<OnceLock<crate::admin::Admin>>,
    pub services: Services,
    /// The upstream's endpoint health (rate limits, circuits), when it keeps one.
    pub health: Option<kagami_client::Health>,
}

/// The services, built once per server.
pub(crate) struct Services {
    pub blobs: Arc<Blobs>,
    pub manifests: Arc<Manifests>,
    pub tags: Tags,
    pub referrers: Arc<Referrers>,
    pub import: Importer,
    pub warm: Arc<Warmer>,
    pub pins: Arc<Pins>,
    pub purge: Purger,
}

impl AppState {
    pub fn new(
        config: Config,
        store: Store,
        upstream: Arc<dyn Upstream>,
        options: ServerOptions,
    ) -> AppState {
        let config = Arc::new(RwLock::new(Arc::new(config)));
        let policy = Arc::new(RwLock::new(Arc::new(Policy::default())));
        let telemetry = Arc::new(Telemetry::new());
        let health = upstream.health();
        if let Some(h) = &health {
            h.observe(telemetry.clone());
        }
        let cluster = Cluster::default();
        let admin = Arc::new(OnceLock::new());
        let deps = Deps {
            store: store.clone(),
            upstream,
            telemetry: telemetry.clone(),
            cluster: cluster.clone(),
        };
        let blobs = Blobs::new(&deps, options.limits.clone());
        let manifests = Manifests::new(
            &deps,
            blobs.clone(),
            options.tag_ttl,
            policy.clone(),
            options.limits.revalidation_timeout,
        );
        let tags = Tags::new(&deps, options.tag_ttl);
        let referrers = Referrers::new(
            &deps,
            manifests.clone(),
            options.tag_ttl,
            options.limits.revalidation_timeout,
        );
        let import = Importer::new(&deps, config.clone(), admin.clone());
        let warm = Warmer::new(
            &deps,
            manifests.clone(),
            blobs.clone(),
            config.clone(),
            PlanOptions {
                disable_default_endpoint: options.disable_default_endpoint,
            },
        );
        let pins = Pins::new(store.clone(), policy.clone());
        // Follows the store's changes while the pins live (a task only inside a runtime:
        // a state built outside one refreshes on `set_policy` only).
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(crate::service::pins::follow(
                Arc::downgrade(&pins),
                store.changes(),
            ));
        }
        let purge = Purger::new(store.clone(), cluster.clone(), pins.clone());
        AppState {
            inner: Arc::new(Inner {
                config,
                policy,
                store,
                options,
                telemetry,
                ready: AtomicBool::new(true),
                peers: cluster.peers,
                node_info: cluster.node,
                #[cfg(feature = "containerd")]
                containerd: OnceLock::new(),
                admin,
                services: Services {
                    blobs,
                    manifests,
                    tags,
                    referrers,
                    import,
                    warm,
                    pins,
                    purge,
                },
                health,
            }),
        }
    }

    /// Replaces the configuration (reload); requests in progress keep the one they started with.
    pub fn set_config(&self, config: Config) {
        *self
            .inner
            .config
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(config);
    }

    pub fn config(&self) -> Arc<Config> {
        self.inner
            .config
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the policy file (at start and on reload) and recomputes the pinned set
    /// before returning.
    pub async fn set_policy(&self, policy: Policy) {
        *self
            .inner
            .policy
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(policy);
        self.inner.services.pins.refresh().await;
    }

    pub fn policy(&self) -> Arc<Policy> {
        self.inner
            .policy
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Each image the policy pins and how much of it the store holds.
    pub fn pinned(&self) -> Vec<crate::report::PinnedImage> {
        self.inner.services.pins.status()
    }

    /// Removes an image from this node (see `crate::purge`).
    pub async fn purge(
        &self,
        image: &str,
    ) -> Result<crate::purge::PurgeReport, crate::purge::PurgeError> {
        self.inner.services.purge.purge(image).await
    }

    /// Turns on sharing between nodes (once, at start).
    pub fn set_peers(&self, peers: Arc<crate::peers::Peers>, node: crate::peers::NodeInfo) {
        peers.attach(self.inner.telemetry.clone());
        let _ = self.inner.peers.set(peers);
        let _ = self.inner.node_info.set(node);
    }

    /// The node's warm list (docs/warm.md): `kagami serve` gives it the policy's list with
    /// [`Warmer::set_list`]; `POST /kagami/warm` adds to it.
    pub fn warmer(&self) -> &Arc<Warmer> {
        &self.inner.services.warm
    }

    pub fn peers(&self) -> Option<&Arc<crate::peers::Peers>> {
        self.inner.peers.get()
    }

    /// Shares the images of the node's containerd with other nodes (once, at start; see
    /// [`crate::containerd::start`]).
    #[cfg(feature = "containerd")]
    pub fn set_containerd(&self, content: Arc<crate::containerd::ContainerdContent>) {
        let _ = self.inner.containerd.set(content);
    }

    #[cfg(feature = "containerd")]
    pub fn containerd(&self) -> Option<&Arc<crate::containerd::ContainerdContent>> {
        self.inner.containerd.get()
    }

    /// What `/status` remembers; `status().set_listen(..)` names the listen address.
    pub fn status(&self) -> &crate::telemetry::Recorder {
        &self.inner.telemetry.recorder
    }

    pub(crate) fn telemetry(&self) -> &Telemetry {
        &self.inner.telemetry
    }

    pub(crate) fn services(&self) -> &Services {
        &self.inner.services
    }

    /// The p2p layer's view of this node (see [`crate::peers::Node`]).
    pub(crate) fn node(&self) -> crate::peers::Node {
        crate::peers::Node {
            store: self.inner.store.clone(),
            config: self.inner.config.clone(),
            cluster: Cluster {
                peers: self.inner.peers.clone(),
                node: self.inner.node_info.clone(),
            },
        }
    }

    pub fn set_ready(&self, ready: bool) {
        self.inner.ready.store(ready, Ordering::SeqCst);
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub fn metrics_text(&self) -> String {
        let m = &self.inner.telemetry.metrics;
        let usage = self.inner.store.usage();
        m.store_bytes.set(usage.bytes as i64);
        m.store_blobs.set(usage.blobs as i64);
        m.fetch_memory
            .set(self.inner.store.memory_used().min(i64::MAX as u64) as i64);
        m.evictions
            .inner()
            .store(usage.evictions, Ordering::Relaxed);
        self.inner
            .telemetry
            .endpoint_states(&self.endpoint_health());
        m.encode()
    }

    /// Every endpoint the upstream's health tracks (rate limited or failed at some point).
    pub fn endpoint_health(&self) -> Vec<kagami_client::EndpointStatus> {
        self.inner
            .health
            .as_ref()
            .map(kagami_client::Health::snapshot)
            .unwrap_or_default()
    }

    pub(crate) fn plan_options(&self) -> PlanOptions {
        PlanOptions {
            disable_default_endpoint: self.inner.options.disable_default_endpoint,
        }
    }
}
