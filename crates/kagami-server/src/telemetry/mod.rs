//! Telemetry: the one place that counts. Metrics (`/metrics`), the status recorder
//! (`/status`, `/status.json`, `kagami status`) and the refusal log are fed here and only
//! here; services call [`Telemetry`]'s methods and never touch a counter of their own.
//!
//! Layering: telemetry imports no service and knows nothing of HTTP routing. It may be
//! handed plain values (a plan, an endpoint, a byte count) and answers reports.

pub mod metrics;
pub mod refusals;

use kagami_config::Plan;

use crate::status::Status;
use metrics::{CacheLabels, Metrics};
use refusals::Refusals;

/// Metrics, the status recorder and the refusal log of one server.
pub struct Telemetry {
    pub metrics: Metrics,
    pub status: Status,
    pub refusals: Refusals,
}

impl Default for Telemetry {
    fn default() -> Self {
        Self::new()
    }
}

impl Telemetry {
    pub fn new() -> Telemetry {
        Telemetry {
            metrics: Metrics::new(),
            status: Status::new(),
            refusals: Refusals::default(),
        }
    }

    /// A request kagami refused (see [`refusals`]).
    pub fn refused(
        &self,
        r: refusals::Refused<'_>,
        method: &axum::http::Method,
        uri: &axum::http::Uri,
    ) {
        self.refusals.record(&self.metrics, r, method, uri);
    }

    /// A store lookup: `kind` is blob or manifest, `result` hit or miss.
    pub fn cache(&self, kind: &'static str, result: &'static str) {
        self.metrics
            .cache
            .get_or_create(&CacheLabels { kind, result })
            .inc();
    }

    /// An upstream endpoint (or a peer) answered a blob fetch.
    pub fn upstream_answered(&self, source: &str) {
        self.status.endpoint_ok(source);
        let m = &self.metrics;
        m.upstream_fetches.get_or_create(&m.endpoint(source)).inc();
    }

    /// A source answered a fetch (shown on the status page; no metric).
    pub fn endpoint_ok(&self, source: &str) {
        self.status.endpoint_ok(source);
    }

    /// A fetch through `source` failed.
    pub fn endpoint_failed(&self, source: &str, why: &str) {
        self.status.endpoint_failed(source, why);
    }

    /// Every attempt of a plan failed for a manifest or a pass-through: the failure is
    /// shown against the first endpoint of the plan, with the message naming them all.
    pub fn plan_failed(&self, plan: &Plan, why: &str) {
        if let Some(first) = first_endpoint(plan) {
            self.status.endpoint_failed(&first, why);
        }
    }

    /// Every source of a blob fetch failed: counted in `upstream_failures` against the
    /// plan's first endpoint, and shown on the status page.
    pub fn upstream_failed(&self, plan: &Plan, why: &str) {
        let first = first_endpoint(plan).unwrap_or_else(|| "none".into());
        let m = &self.metrics;
        m.upstream_failures.get_or_create(&m.endpoint(&first)).inc();
        self.plan_failed(plan, why);
    }
}

/// The base URL of the plan's first endpoint attempt: what failures are counted against.
pub(crate) fn first_endpoint(plan: &Plan) -> Option<String> {
    plan.attempts.iter().find_map(|a| match a {
        kagami_config::Attempt::Endpoint(e) => Some(e.endpoint.base()),
        kagami_config::Attempt::Peers => None,
    })
}
