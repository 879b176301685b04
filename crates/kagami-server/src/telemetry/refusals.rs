//! Requests kagami refused. containerd takes any error from a mirror as "try the next
//! host" and pulls from the registry itself, silently: no cache, no sharing. So every
//! refusal (any error but a genuine not-found) is counted by registry and reason in
//! `kagami_refused_requests_total`, kept for `/status` and `kagami status` (shown first),
//! and logged at most once a minute per (registry, reason).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::{Method, Uri};

use crate::telemetry::metrics::{LabelBudget, Metrics, RefusalLabels};

/// The response header that names the reason of a refusal (`curl -I` shows it).
pub const HEADER: &str = "kagami-refused";
/// A request carrying this header (what `kagami doctor` sends) is parsed and checked
/// against the configuration like any other, then answered `200` with the registry and
/// repository kagami understood, without asking any source.
pub const PROBE_HEADER: &str = "kagami-probe";

/// What one refused request was.
pub struct Refused<'a> {
    pub registry: Option<&'a str>,
    pub reason: &'static str,
    pub status: u16,
    pub message: &'a str,
}

/// Distinct registries given their own metric label and status row; the registry name
/// comes from the client, so later ones are counted as `other`.
pub const MAX_REGISTRIES: usize = 64;
/// How often one (registry, reason) is logged.
pub const LOG_EVERY: Duration = Duration::from_secs(60);
/// The label of requests that named no valid registry.
pub const NO_REGISTRY: &str = "-";
const MAX_MESSAGE: usize = 300;

pub use crate::report::Refusal;

pub struct Refusals {
    inner: Mutex<Inner>,
    registries: LabelBudget,
}

impl Default for Refusals {
    fn default() -> Self {
        Refusals {
            inner: Mutex::default(),
            registries: LabelBudget::new(MAX_REGISTRIES),
        }
    }
}

#[derive(Default)]
struct Inner {
    rows: HashMap<(String, &'static str), (Refusal, Option<Instant>)>,
}

impl Refusals {
    /// Every row, most recent first.
    pub fn rows(&self) -> Vec<Refusal> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<Refusal> = inner.rows.values().map(|(r, _)| r.clone()).collect();
        v.sort_by_key(|r| std::cmp::Reverse(r.last_at));
        v
    }
}

impl Refusals {
    /// Counts, keeps and (rate-limited) logs one refused request.
    pub(crate) fn record(&self, metrics: &Metrics, r: Refused<'_>, method: &Method, uri: &Uri) {
        let Refused {
            registry,
            reason,
            status,
            message,
        } = r;
        let refusals = self;
        let mut inner = refusals.inner.lock().unwrap_or_else(|e| e.into_inner());
        let label = match registry {
            None => NO_REGISTRY.to_string(),
            Some(r) => refusals.registries.label(r),
        };
        metrics
            .refused
            .get_or_create(&RefusalLabels {
                registry: label.clone(),
                reason,
            })
            .inc();
        let message = super::shorten(message, MAX_MESSAGE);
        let request = format!("{method} {uri}");
        let now = Instant::now();
        let (row, logged) = inner
            .rows
            .entry((label.clone(), reason))
            .or_insert_with(|| {
                (
                    Refusal {
                        registry: label.clone(),
                        reason: reason.to_string(),
                        count: 0,
                        last_at: 0,
                        last_status: 0,
                        last_request: String::new(),
                        last_message: String::new(),
                    },
                    None,
                )
            });
        row.count += 1;
        row.last_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        row.last_status = status;
        row.last_request = request.clone();
        row.last_message = message.clone();
        if logged.is_none_or(|t| now.duration_since(t) >= LOG_EVERY) {
            *logged = Some(now);
            tracing::warn!(
                registry = %label, reason, status, request = %request,
                error = %message, count = row.count,
                "refused a request: containerd will try the next host in hosts.toml (normally the registry itself), so this pull bypasses the mirror; logged once a minute per registry and reason"
            );
        }
    }
}
