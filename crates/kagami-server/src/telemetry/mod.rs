//! Telemetry: the one place that counts. Metrics (`/metrics`), the status recorder
//! (`/status`, `/status.json`, `kagami status`) and the refusal log are fed here and only
//! here; services (and [`crate::peers::Peers`]) call [`Telemetry`]'s methods and never keep
//! a counter of their own. `/metrics`, `/status`, `/status.json` and `/p2p/status` all read
//! these numbers, so they cannot disagree.
//!
//! Layering: telemetry imports no service and knows nothing of HTTP routing. It may be
//! handed plain values (a plan, an endpoint, a byte count) and answers reports
//! ([`crate::report::Report`]).

pub mod metrics;
pub mod recorder;
pub mod refusals;
mod report;

use std::collections::BTreeMap;
use std::time::Duration;

use kagami_config::Plan;

pub(crate) use recorder::Finished;
pub use recorder::Recorder;
pub use report::ReportInputs;

use metrics::{CacheLabels, EndpointStateLabels, Metrics, PeerLabels};
use refusals::Refusals;

/// Metrics, the status recorder and the refusal log of one server.
pub struct Telemetry {
    pub metrics: Metrics,
    pub recorder: Recorder,
    pub refusals: Refusals,
}

/// The P2P numbers `/status`, `/p2p/status` and `/metrics` show, read from the metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerCounts {
    pub lookups: u64,
    pub lookup_hits: u64,
    /// Bytes received by peer id; past [`metrics::MAX_PEER_LABELS`] distinct peers, later
    /// ones are added up under [`metrics::LabelBudget::OTHER`].
    pub received: BTreeMap<String, u64>,
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
            recorder: Recorder::new(),
            refusals: Refusals::default(),
        }
    }

    /// A request kagami refused (see [`refusals`]).
    pub fn refused(&self, r: refusals::Refused<'_>, method: &http::Method, uri: &http::Uri) {
        self.refusals.record(&self.metrics, r, method, uri);
    }

    /// `n` bytes of a response body from `source` were just sent (the chart's series).
    pub(crate) fn bytes_sent(&self, source: crate::origin::Source, n: u64) {
        self.recorder.add_bytes(source, n);
    }

    /// A manifest or blob request ended (the recent pulls).
    pub(crate) fn record_request(&self, r: Finished<'_>) {
        self.recorder.record_request(r);
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
        self.recorder.endpoint_ok(source);
        let m = &self.metrics;
        m.upstream_fetches.get_or_create(&m.endpoint(source)).inc();
    }

    /// A source answered a fetch (shown on the status page; no metric).
    pub fn endpoint_ok(&self, source: &str) {
        self.recorder.endpoint_ok(source);
    }

    /// A fetch through `source` failed.
    pub fn endpoint_failed(&self, source: &str, why: &str) {
        self.recorder.endpoint_failed(source, why);
    }

    /// Every attempt of a plan failed for a manifest or a pass-through: the failure is
    /// shown against the first endpoint of the plan, with the message naming them all.
    pub fn plan_failed(&self, plan: &Plan, why: &str) {
        if let Some(first) = first_endpoint(plan) {
            self.recorder.endpoint_failed(&first, why);
        }
    }

    /// A lookup among the other nodes that took `took` and found a provider or not.
    pub fn peer_lookup(&self, took: Duration, found: bool) {
        let m = &self.metrics;
        m.peer_lookups.inc();
        m.peer_lookup_seconds.observe(took.as_secs_f64());
        if found {
            m.peer_lookup_hits.inc();
        }
    }

    /// What counts the bytes received from `peer` (called per chunk, so the label is
    /// looked up once).
    pub fn peer_received(&self, peer: &str) -> impl Fn(u64) + Send + Sync + 'static + use<> {
        let m = &self.metrics;
        let counter = m
            .peer_received
            .get_or_create(&PeerLabels {
                peer: m.peer_labels.label(peer),
            })
            .clone();
        move |n| {
            counter.inc_by(n);
        }
    }

    /// The P2P counters.
    pub fn peer_counts(&self) -> PeerCounts {
        let m = &self.metrics;
        let mut received = BTreeMap::new();
        for peer in m.peer_labels.labels() {
            let n = m
                .peer_received
                .get(&PeerLabels { peer: peer.clone() })
                .map_or(0, |c| c.get());
            if n > 0 {
                received.insert(peer, n);
            }
        }
        PeerCounts {
            lookups: m.peer_lookups.get(),
            lookup_hits: m.peer_lookup_hits.get(),
            received,
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

impl kagami_client::HealthEvents for Telemetry {
    fn rate_limited(&self, endpoint: &str, _backoff: Duration) {
        let m = &self.metrics;
        m.upstream_rate_limited
            .get_or_create(&m.endpoint(endpoint))
            .inc();
    }

    fn circuit_opened(&self, endpoint: &str, _cool_down: Duration) {
        let m = &self.metrics;
        m.upstream_circuit_opens
            .get_or_create(&m.endpoint(endpoint))
            .inc();
    }
}

impl Telemetry {
    /// Sets `kagami_upstream_endpoint_state` from the upstream's health (at each scrape):
    /// for each endpoint, 1 for its state and 0 for the others (past the label budget,
    /// `other` counts the endpoints in each state).
    pub fn endpoint_states(&self, health: &[kagami_client::EndpointStatus]) {
        use kagami_client::health::State;
        let m = &self.metrics;
        let mut values: BTreeMap<(String, &'static str), i64> = BTreeMap::new();
        for e in health {
            let endpoint = m.endpoint(&e.endpoint).endpoint;
            for s in State::ALL {
                *values.entry((endpoint.clone(), s.as_str())).or_default() +=
                    i64::from(e.state == s);
            }
        }
        m.upstream_endpoint_state.clear();
        for ((endpoint, state), v) in values {
            m.upstream_endpoint_state
                .get_or_create(&EndpointStateLabels { endpoint, state })
                .set(v);
        }
    }
}

/// `text` cut to at most `max` bytes (on a character boundary) with `…` added when cut:
/// messages kept for the status page are bounded.
pub(crate) fn shorten(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut cut = max;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}…", &text[..cut])
}

/// The base URL of the plan's first endpoint attempt: what failures are counted against.
pub(crate) fn first_endpoint(plan: &Plan) -> Option<String> {
    plan.attempts.iter().find_map(|a| match a {
        kagami_config::Attempt::Endpoint(e) => Some(e.endpoint.base()),
        kagami_config::Attempt::Peers => None,
    })
}
