//! Builds the [`Report`] from the metrics, the recorder and the refusal log, plus what the
//! caller hands in about the store and the P2P network (plain values: telemetry does not
//! reach into the app state).

use std::time::SystemTime;

use crate::report::{
    BytesBySource, CacheInfo, ContainerdInfo, EndpointHealth, HitMiss, INTERVAL_SECS, MemberInfo,
    Node, PeersSummary, Pull, Report, Series, StoreInfo,
};

use super::Telemetry;
use super::metrics::{CacheLabels, SourceLabels};
use super::recorder::{unix_millis, unix_secs};

/// What the report needs from outside telemetry.
pub struct ReportInputs<'a> {
    /// The address the page was asked for (the request's Host header).
    pub address: Option<&'a str>,
    pub store: StoreInfo,
    /// Whether sharing between nodes is on.
    pub peers_enabled: bool,
    /// The other nodes the router knows.
    pub members: Vec<kagami_p2p::Member>,
    /// This node's P2P identity and addresses, when P2P is on.
    pub peer_id: Option<String>,
    pub p2p_addrs: Vec<String>,
    /// The shared containerd, when there is one.
    pub containerd: Option<ContainerdInfo>,
    /// The upstream's endpoint health (rate limits, circuits).
    pub endpoint_health: Vec<kagami_client::EndpointStatus>,
    /// Cluster warming, when this node has a warm list.
    pub warm: Option<crate::report::WarmReport>,
}

impl Telemetry {
    /// Everything the status view shows.
    pub fn report(&self, inputs: ReportInputs<'_>) -> Report {
        let now = SystemTime::now();
        let st = &self.recorder;
        let m = &self.metrics;
        let cache = |kind: &'static str, result: &'static str| {
            m.cache
                .get(&CacheLabels { kind, result })
                .map_or(0, |c| c.get())
        };
        let blob = HitMiss {
            hits: cache("blob", "hit"),
            misses: cache("blob", "miss"),
        };
        let manifest = HitMiss {
            hits: cache("manifest", "hit"),
            misses: cache("manifest", "miss"),
        };
        let all = HitMiss {
            hits: blob.hits + manifest.hits,
            misses: blob.misses + manifest.misses,
        };
        let served = |source: &'static str| {
            m.bytes_served
                .get(&SourceLabels { source })
                .map_or(0, |c| c.get())
        };
        let counts = self.peer_counts();
        let members = inputs
            .members
            .into_iter()
            .map(|mb| MemberInfo {
                received_bytes: counts.received.get(&mb.id).copied().unwrap_or(0),
                id: mb.id,
                http_addr: mb.http_addr.map(|a| a.to_string()),
                addrs: mb.addrs,
            })
            .collect();
        let peers = if inputs.peers_enabled {
            PeersSummary {
                enabled: true,
                lookups: counts.lookups,
                lookup_hits: counts.lookup_hits,
            }
        } else {
            PeersSummary {
                enabled: false,
                lookups: 0,
                lookup_hits: 0,
            }
        };
        let mut recent_pulls: Vec<Pull> = st.recent_pulls();
        recent_pulls.reverse();
        Report {
            generated_at: unix_secs(now),
            refused: self.refusals.rows(),
            node: Node {
                version: env!("CARGO_PKG_VERSION").to_string(),
                listen: st.listen(),
                address: inputs.address.map(str::to_string),
                started_at: unix_secs(st.started_at()),
                uptime_seconds: now
                    .duration_since(st.started_at())
                    .unwrap_or_default()
                    .as_secs(),
                peer_id: inputs.peer_id,
                p2p_addrs: inputs.p2p_addrs,
            },
            peers,
            members,
            store: inputs.store,
            cache: CacheInfo {
                hits: all.hits,
                misses: all.misses,
                hit_ratio: all.ratio(),
                blob,
                manifest,
            },
            bytes_served: BytesBySource {
                local: served("local"),
                peer: served("peer"),
                upstream: served("upstream"),
            },
            series: Series {
                interval_seconds: INTERVAL_SECS,
                samples: st.samples(now),
            },
            recent_pulls,
            endpoints: endpoints(st.endpoints(), inputs.endpoint_health),
            inflight_fetches: m.inflight.get(),
            stale_tags_served: m.stale_served.get(),
            containerd: inputs.containerd,
            warm: inputs.warm,
            pinned: Vec::new(),
        }
    }
}

/// The recorder's endpoints with their health (state, until when, failures in a row), by
/// name; an endpoint only the health knows of is added.
fn endpoints(
    mut recorded: Vec<EndpointHealth>,
    health: Vec<kagami_client::EndpointStatus>,
) -> Vec<EndpointHealth> {
    for h in health {
        let i = match recorded.iter().position(|e| e.endpoint == h.endpoint) {
            Some(i) => i,
            None => {
                recorded.push(EndpointHealth {
                    endpoint: h.endpoint.clone(),
                    ..Default::default()
                });
                recorded.len() - 1
            }
        };
        let e = &mut recorded[i];
        e.state = h.state.as_str().to_string();
        e.until = h.until.map(unix_millis);
        e.consecutive_failures = h.consecutive_failures;
        e.last_failure = h.last_error;
        e.rate_limited = h.rate_limited;
        e.circuit_opens = h.circuit_opens;
    }
    for e in &mut recorded {
        if e.state.is_empty() {
            e.state = "healthy".into();
        }
    }
    recorded.sort_by(|a, b| a.endpoint.cmp(&b.endpoint));
    recorded
}
