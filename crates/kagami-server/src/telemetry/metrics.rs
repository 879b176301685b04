//! Prometheus metrics, kept in the app state (no globals) and served on `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: &'static str,
    pub method: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    pub kind: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    pub peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointStateLabels {
    pub endpoint: String,
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    pub registry: String,
    pub reason: &'static str,
}

/// Label values that come from clients (registry names, endpoints of plans made for
/// client-chosen registries) could grow the metrics without bound: the first `max`
/// distinct values keep their own label, later ones are counted as `other`.
pub struct LabelBudget {
    max: usize,
    seen: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl LabelBudget {
    pub const OTHER: &'static str = "other";

    pub fn new(max: usize) -> LabelBudget {
        LabelBudget {
            max,
            seen: Default::default(),
        }
    }

    /// The labels given so far, [`Self::OTHER`] included once the budget ran out.
    pub fn labels(&self) -> Vec<String> {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<String> = seen.iter().cloned().collect();
        if seen.len() >= self.max {
            v.push(Self::OTHER.to_string());
        }
        v
    }

    /// The label to use for `value`.
    pub fn label(&self, value: &str) -> String {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.contains(value) {
            value.to_string()
        } else if seen.len() < self.max {
            seen.insert(value.to_string());
            value.to_string()
        } else {
            Self::OTHER.to_string()
        }
    }
}

/// Distinct peers given their own label in `peer_received_bytes`.
pub const MAX_PEER_LABELS: usize = 256;
/// Distinct endpoints given their own label in the upstream metrics.
pub const MAX_ENDPOINT_LABELS: usize = 64;

pub struct Metrics {
    pub registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub bytes_served: Family<SourceLabels, Counter>,
    pub cache: Family<CacheLabels, Counter>,
    pub upstream_fetches: Family<EndpointLabels, Counter>,
    pub upstream_failures: Family<EndpointLabels, Counter>,
    pub inflight: Gauge,
    pub store_bytes: Gauge,
    pub store_blobs: Gauge,
    pub evictions: Counter,
    pub stale_served: Counter,
    pub peer_lookups: Counter,
    pub peer_lookup_hits: Counter,
    pub peer_received: Family<PeerLabels, Counter>,
    pub peer_lookup_seconds: Histogram,
    pub refused: Family<RefusalLabels, Counter>,
    /// Bounds the `endpoint` label of the upstream metrics.
    pub endpoint_labels: LabelBudget,
    /// Bounds the `peer` label of `peer_received_bytes`.
    pub peer_labels: LabelBudget,
    /// Cold blob requests refused (503) because the fetch budget stayed full.
    pub fetches_refused: Counter,
    /// Fetches stopped because no client followed them any more.
    pub fetches_cancelled: Counter,
    /// Source bodies cut for sending slower than the minimum rate.
    pub slow_sources: Counter,
    /// Fetches stopped for exceeding the blob's size (descriptor size or --max-blob-size).
    pub blobs_too_large: Counter,
    /// Memory held by the fetches in flight: chunks received and not yet out of the
    /// store's windows (at most --fetch-memory); set from the store at each scrape.
    pub fetch_memory: Gauge,
    /// Tag revalidations given up after the revalidation timeout.
    pub revalidation_timeouts: Counter,
    /// Endpoints by health state (set from the upstream's health at each scrape).
    pub upstream_endpoint_state: Family<EndpointStateLabels, Gauge>,
    /// Rate limits (429, or 503 with Retry-After) by endpoint.
    pub upstream_rate_limited: Family<EndpointLabels, Counter>,
    /// Circuit openings by endpoint.
    pub upstream_circuit_opens: Family<EndpointLabels, Counter>,
    /// Images of the warm list by state (`service::warm`).
    pub warm_images: Family<StateLabels, Gauge>,
    /// Bytes of blobs fetched to warm images, by source (peer, upstream).
    pub warm_bytes: Family<SourceLabels, Counter>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("kagami");
        let m = Metrics {
            requests: Family::default(),
            bytes_served: Family::default(),
            cache: Family::default(),
            upstream_fetches: Family::default(),
            upstream_failures: Family::default(),
            inflight: Gauge::default(),
            store_bytes: Gauge::default(),
            store_blobs: Gauge::default(),
            evictions: Counter::default(),
            stale_served: Counter::default(),
            peer_lookups: Counter::default(),
            peer_lookup_hits: Counter::default(),
            peer_received: Family::default(),
            refused: Family::default(),
            endpoint_labels: LabelBudget::new(MAX_ENDPOINT_LABELS),
            peer_labels: LabelBudget::new(MAX_PEER_LABELS),
            peer_lookup_seconds: Histogram::new([
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0,
            ]),
            fetches_refused: Counter::default(),
            fetches_cancelled: Counter::default(),
            slow_sources: Counter::default(),
            blobs_too_large: Counter::default(),
            fetch_memory: Gauge::default(),
            revalidation_timeouts: Counter::default(),
            upstream_endpoint_state: Family::default(),
            upstream_rate_limited: Family::default(),
            upstream_circuit_opens: Family::default(),
            warm_images: Family::default(),
            warm_bytes: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "http_requests",
            "HTTP requests by route, method and status",
            m.requests.clone(),
        );
        registry.register(
            "served_bytes",
            "Bytes of blobs and manifests served, by source (local, upstream)",
            m.bytes_served.clone(),
        );
        registry.register(
            "cache_requests",
            "Blob and manifest lookups by result (hit, miss)",
            m.cache.clone(),
        );
        registry.register(
            "upstream_fetches",
            "Fetches answered by an upstream endpoint",
            m.upstream_fetches.clone(),
        );
        registry.register(
            "upstream_failures",
            "Fetches that failed at every upstream attempt, by the first endpoint tried",
            m.upstream_failures.clone(),
        );
        registry.register(
            "inflight_fetches",
            "Upstream blob fetches in progress",
            m.inflight.clone(),
        );
        registry.register(
            "store_size_bytes",
            "Bytes of blobs in the content store",
            m.store_bytes.clone(),
        );
        registry.register(
            "store_blobs",
            "Blobs in the content store",
            m.store_blobs.clone(),
        );
        registry.register(
            "store_evictions",
            "Blobs evicted to keep the store under its size limit",
            m.evictions.clone(),
        );
        registry.register(
            "stale_tags_served",
            "Tag requests answered from cache because every upstream failed",
            m.stale_served.clone(),
        );
        registry.register(
            "peer_lookups",
            "Lookups of content among the other nodes",
            m.peer_lookups.clone(),
        );
        registry.register(
            "peer_lookup_hits",
            "Lookups that found at least one other node holding the content",
            m.peer_lookup_hits.clone(),
        );
        registry.register(
            "peer_received_bytes",
            "Bytes received from each other node",
            m.peer_received.clone(),
        );
        registry.register(
            "peer_lookup_seconds",
            "Time to find which other nodes hold a key (bounded by the lookup timeout)",
            m.peer_lookup_seconds.clone(),
        );
        registry.register(
            "refused_requests",
            "Requests kagami refused (every status but a genuine not-found), by registry and reason: containerd pulls each of them around the mirror",
            m.refused.clone(),
        );
        registry.register(
            "fetches_refused",
            "Cold blob requests answered 503 because the fetch budget stayed full",
            m.fetches_refused.clone(),
        );
        registry.register(
            "fetches_cancelled",
            "Blob fetches stopped because no client followed them any more",
            m.fetches_cancelled.clone(),
        );
        registry.register(
            "slow_sources",
            "Blob bodies cut for arriving slower than the minimum rate",
            m.slow_sources.clone(),
        );
        registry.register(
            "blobs_too_large",
            "Blob fetches stopped at the blob's known size or at --max-blob-size",
            m.blobs_too_large.clone(),
        );
        registry.register(
            "fetch_memory_bytes",
            "Memory held by the blob fetches in flight: chunks received and not yet out of the store's windows for followers (bounded by --fetch-memory)",
            m.fetch_memory.clone(),
        );
        registry.register(
            "revalidation_timeouts",
            "Tag revalidations given up after the revalidation timeout",
            m.revalidation_timeouts.clone(),
        );
        registry.register(
            "upstream_endpoint_state",
            "Upstream endpoints by health state (healthy, backing_off, open, half_open): 1 for the endpoint's state, 0 for the others; only endpoints that have failed or been rate limited",
            m.upstream_endpoint_state.clone(),
        );
        registry.register(
            "upstream_rate_limited",
            "Rate limits (429, or 503 with Retry-After) answered by an upstream endpoint, each starting a back-off",
            m.upstream_rate_limited.clone(),
        );
        registry.register(
            "upstream_circuit_opens",
            "Times an upstream endpoint's circuit opened (failures in a row, or a failed probe)",
            m.upstream_circuit_opens.clone(),
        );
        registry.register(
            "warm_images",
            "Images of this node's warm list by state (queued, fetching, held, failed, not_chosen)",
            m.warm_images.clone(),
        );
        registry.register(
            "warm_fetched_bytes",
            "Bytes of blobs this node fetched to warm images, by source (peer, upstream)",
            m.warm_bytes.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The `endpoint` label for `endpoint`, within [`MAX_ENDPOINT_LABELS`].
    pub fn endpoint(&self, endpoint: &str) -> EndpointLabels {
        EndpointLabels {
            endpoint: self.endpoint_labels.label(endpoint),
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_chosen_labels_are_bounded() {
        let b = LabelBudget::new(2);
        assert_eq!(b.label("a"), "a");
        assert_eq!(b.label("b"), "b");
        assert_eq!(b.label("c"), "other");
        assert_eq!(b.label("a"), "a");
        let mut labels = b.labels();
        labels.sort();
        assert_eq!(labels, ["a", "b", "other"]);
    }
}
