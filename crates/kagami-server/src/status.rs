//! The status view: `/status` (a server-rendered HTML page, no external assets, no
//! JavaScript) and `/status.json` (the same data, for `kagami status` and tests).
//!
//! What the metrics do not keep is recorded here, bounded: bytes served by source in
//! 10-second buckets over the last 30 minutes (fed as body chunks are sent), the last 50
//! manifest and blob requests (recorded when their body ends), and per upstream endpoint
//! the fetches, failures and last error. Everything else is read from the metrics, the
//! store and the P2P router when the page is asked for.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::Response;
use serde::{Deserialize, Serialize};

use crate::app::{AppState, Source};
use crate::path::{ManifestRef, Target};
use crate::telemetry::metrics::{CacheLabels, SourceLabels};

/// Width of one bucket of the bytes-by-source series, in seconds.
pub const INTERVAL_SECS: u64 = 10;
/// Buckets kept: 30 minutes.
pub const BUCKETS: usize = 180;
/// Requests kept in the recent pulls list.
pub const RECENT: usize = 50;
/// Upstream endpoints tracked (a reload can name new ones; the oldest-touched go).
const MAX_ENDPOINTS: usize = 64;
/// Longest error message kept per endpoint.
const MAX_ERROR: usize = 300;

/// The sources of served bytes, in the order of the series and the chart's stacking.
const SOURCES: [&str; 3] = ["local", "peer", "upstream"];

/// What the server remembers for the status view. Lives in the app state.
pub struct Status {
    started_at: SystemTime,
    listen: OnceLock<String>,
    series: Mutex<VecDeque<(u64, [u64; 3])>>,
    recent: Mutex<VecDeque<Pull>>,
    endpoints: Mutex<BTreeMap<String, EndpointHealth>>,
}

impl Default for Status {
    fn default() -> Self {
        Self::new()
    }
}

impl Status {
    pub fn new() -> Status {
        Status {
            started_at: SystemTime::now(),
            listen: OnceLock::new(),
            series: Mutex::new(VecDeque::with_capacity(BUCKETS + 1)),
            recent: Mutex::new(VecDeque::with_capacity(RECENT + 1)),
            endpoints: Mutex::new(BTreeMap::new()),
        }
    }

    /// The address `kagami serve` listens on, shown on the page (set once at start).
    pub fn set_listen(&self, addr: String) {
        let _ = self.listen.set(addr);
    }

    /// `n` bytes of a response body from `source` were just sent.
    pub(crate) fn add_bytes(&self, source: Source, n: u64) {
        let idx = match source {
            Source::Local => 0,
            Source::Peer => 1,
            Source::Upstream => 2,
            Source::None => return,
        };
        if n == 0 {
            return;
        }
        let slot = unix_secs(SystemTime::now()) / INTERVAL_SECS;
        let mut series = self.series.lock().expect("status lock");
        if series.back().is_none_or(|(s, _)| *s < slot) {
            series.push_back((slot, [0; 3]));
            while series.len() > BUCKETS {
                series.pop_front();
            }
        }
        // A clock stepping back lands in the newest bucket.
        series.back_mut().expect("just pushed").1[idx] += n;
    }

    fn push_pull(&self, pull: Pull) {
        let mut recent = self.recent.lock().expect("status lock");
        recent.push_back(pull);
        while recent.len() > RECENT {
            recent.pop_front();
        }
    }

    /// An upstream endpoint answered a fetch.
    pub(crate) fn endpoint_ok(&self, endpoint: &str) {
        if endpoint.starts_with("peer:") {
            return;
        }
        self.with_endpoint(endpoint, |e| {
            e.fetches += 1;
            e.last_ok_at = Some(unix_millis(SystemTime::now()));
        });
    }

    /// A fetch through an endpoint failed (`why` is kept as its last error).
    pub(crate) fn endpoint_failed(&self, endpoint: &str, why: &str) {
        if endpoint.starts_with("peer:") {
            return;
        }
        let mut why = why.trim().to_string();
        if why.len() > MAX_ERROR {
            let mut cut = MAX_ERROR;
            while !why.is_char_boundary(cut) {
                cut -= 1;
            }
            why.truncate(cut);
            why.push('…');
        }
        self.with_endpoint(endpoint, |e| {
            e.failures += 1;
            e.last_error = Some(why);
            e.last_error_at = Some(unix_millis(SystemTime::now()));
        });
    }

    fn with_endpoint(&self, endpoint: &str, f: impl FnOnce(&mut EndpointHealth)) {
        let mut map = self.endpoints.lock().expect("status lock");
        if !map.contains_key(endpoint) && map.len() >= MAX_ENDPOINTS {
            let oldest = map
                .iter()
                .min_by_key(|(_, e)| e.last_ok_at.max(e.last_error_at))
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                map.remove(&k);
            }
        }
        let e = map
            .entry(endpoint.to_string())
            .or_insert_with(|| EndpointHealth {
                endpoint: endpoint.to_string(),
                ..Default::default()
            });
        f(e);
    }

    fn samples(&self, now: SystemTime) -> Vec<Sample> {
        let now_slot = unix_secs(now) / INTERVAL_SECS;
        let first = now_slot + 1 - BUCKETS as u64;
        let series = self.series.lock().expect("status lock");
        let mut it = series.iter().filter(|(s, _)| *s >= first).peekable();
        (first..=now_slot)
            .map(|slot| {
                let mut v = [0; 3];
                while let Some((s, b)) = it.peek() {
                    if *s < slot {
                        it.next();
                    } else {
                        if *s == slot {
                            v = *b;
                        }
                        break;
                    }
                }
                Sample {
                    at: slot * INTERVAL_SECS,
                    local: v[0],
                    peer: v[1],
                    upstream: v[2],
                }
            })
            .collect()
    }
}

/// A request for a manifest or blob that has ended (its body sent or abandoned).
pub(crate) struct Finished<'a> {
    pub method: &'static str,
    /// The request as the dispatcher parsed it.
    pub path: &'a crate::path::OciPath,
    pub status: u16,
    pub source: Source,
    pub bytes: u64,
    pub duration_ms: f64,
    pub complete: bool,
    /// `Docker-Content-Digest` of the response, when it had one.
    pub digest: Option<String>,
}

impl Status {
    /// Records a finished request in the recent pulls (manifests and blobs only).
    pub(crate) fn record_request(&self, r: Finished<'_>) {
        let path = r.path;
        let (kind, reference, digest) = match &path.target {
            Target::Blob(d) => ("blob", d.to_string(), Some(d.to_string())),
            Target::Manifest(ManifestRef::Digest(d)) => ("manifest", d.to_string(), r.digest),
            Target::Manifest(ManifestRef::Tag(t)) => ("manifest", t.clone(), r.digest),
            Target::TagsList => return,
        };
        self.push_pull(Pull {
            at: unix_millis(SystemTime::now()),
            method: r.method.to_string(),
            kind: kind.to_string(),
            registry: path.registry.clone(),
            repository: path.repository.clone(),
            reference,
            digest,
            source: r.source.as_str().to_string(),
            bytes: r.bytes,
            duration_ms: (r.duration_ms * 10.0).round() / 10.0,
            status: r.status,
            complete: r.complete,
        });
    }
}

// ---------------------------------------------------------------------------------------
// The report: what /status.json answers and /status renders.

/// Everything the status view shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// When the report was made (Unix seconds).
    pub generated_at: u64,
    /// Requests kagami refused, most recent first: each one a pull that containerd made
    /// around the mirror (see [`crate::refusals`]).
    #[serde(default)]
    pub refused: Vec<crate::refusals::Refusal>,
    pub node: Node,
    pub peers: PeersSummary,
    pub members: Vec<MemberInfo>,
    pub store: StoreInfo,
    pub cache: CacheInfo,
    pub bytes_served: BytesBySource,
    pub series: Series,
    /// Newest first.
    pub recent_pulls: Vec<Pull>,
    pub endpoints: Vec<EndpointHealth>,
    pub inflight_fetches: i64,
    pub stale_tags_served: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Node {
    pub version: String,
    /// The address `kagami serve` listens on, when it said.
    pub listen: Option<String>,
    /// The address this page was asked for (the request's Host header).
    pub address: Option<String>,
    pub started_at: u64,
    pub uptime_seconds: u64,
    /// This node's P2P identity, when sharing between nodes is on.
    pub peer_id: Option<String>,
    pub p2p_addrs: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeersSummary {
    pub enabled: bool,
    pub lookups: u64,
    pub lookup_hits: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberInfo {
    pub id: String,
    pub http_addr: Option<String>,
    pub addrs: Vec<String>,
    pub received_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoreInfo {
    pub bytes: u64,
    pub blobs: u64,
    pub evictions: u64,
    /// Blob writes in progress.
    pub writing: u64,
    /// `--max-store-size`, when set.
    pub max_bytes: Option<u64>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct HitMiss {
    pub hits: u64,
    pub misses: u64,
}

impl HitMiss {
    /// Hits over lookups, `None` before the first lookup.
    pub fn ratio(&self) -> Option<f64> {
        let total = self.hits + self.misses;
        (total > 0).then(|| self.hits as f64 / total as f64)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CacheInfo {
    pub hits: u64,
    pub misses: u64,
    /// Hits over lookups (blobs and manifests), null before the first lookup.
    pub hit_ratio: Option<f64>,
    pub blob: HitMiss,
    pub manifest: HitMiss,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct BytesBySource {
    pub local: u64,
    pub peer: u64,
    pub upstream: u64,
}

impl BytesBySource {
    pub fn total(&self) -> u64 {
        self.local + self.peer + self.upstream
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Series {
    pub interval_seconds: u64,
    /// Oldest first, one per interval, the last one the current (partial) interval.
    pub samples: Vec<Sample>,
}

/// Bytes served during one interval starting at `at` (Unix seconds).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Sample {
    pub at: u64,
    pub local: u64,
    pub peer: u64,
    pub upstream: u64,
}

impl Sample {
    pub fn total(&self) -> u64 {
        self.local + self.peer + self.upstream
    }
}

/// One finished manifest or blob request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pull {
    /// When it ended (Unix milliseconds).
    pub at: u64,
    pub method: String,
    /// `manifest` or `blob`.
    pub kind: String,
    pub registry: String,
    pub repository: String,
    /// The tag or digest asked for.
    pub reference: String,
    /// The digest served, when known.
    pub digest: Option<String>,
    /// `local`, `peer`, `upstream` or `none`.
    pub source: String,
    pub bytes: u64,
    pub duration_ms: f64,
    pub status: u16,
    /// False when the client went away or the body was cut.
    pub complete: bool,
}

/// How one upstream endpoint has been doing.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EndpointHealth {
    pub endpoint: String,
    /// Fetches it answered (blob bodies and manifests).
    pub fetches: u64,
    /// Fetches that failed with it as the first endpoint of the plan, and cut transfers.
    pub failures: u64,
    /// Unix milliseconds.
    pub last_ok_at: Option<u64>,
    pub last_error: Option<String>,
    /// Unix milliseconds.
    pub last_error_at: Option<u64>,
}

impl EndpointHealth {
    /// Healthy when it has not failed since it last answered.
    pub fn healthy(&self) -> bool {
        match (self.last_ok_at, self.last_error_at) {
            (_, None) => true,
            (Some(ok), Some(err)) => ok > err,
            (None, Some(_)) => false,
        }
    }
}

/// Builds the report. `address` is the Host the page was asked for.
pub fn report(state: &AppState, address: Option<&str>) -> Report {
    let inner = &state.inner;
    let now = SystemTime::now();
    let st = &inner.telemetry.status;
    let m = &inner.telemetry.metrics;
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
    let usage = inner.store.usage();
    let (members, peers) = match state.peers() {
        Some(p) => {
            let received = p.received.lock().expect("lock").clone();
            let members = p
                .router
                .members()
                .into_iter()
                .map(|mb| MemberInfo {
                    received_bytes: received.get(&mb.id).copied().unwrap_or(0),
                    id: mb.id,
                    http_addr: mb.http_addr.map(|a| a.to_string()),
                    addrs: mb.addrs,
                })
                .collect();
            let summary = PeersSummary {
                enabled: true,
                lookups: p.lookups.load(std::sync::atomic::Ordering::Relaxed),
                lookup_hits: p.lookup_hits.load(std::sync::atomic::Ordering::Relaxed),
            };
            (members, summary)
        }
        None => (
            Vec::new(),
            PeersSummary {
                enabled: false,
                lookups: 0,
                lookup_hits: 0,
            },
        ),
    };
    let node_info = inner.node_info.get();
    let mut recent_pulls: Vec<Pull> = st
        .recent
        .lock()
        .expect("status lock")
        .iter()
        .cloned()
        .collect();
    recent_pulls.reverse();
    Report {
        generated_at: unix_secs(now),
        refused: inner.telemetry.refusals.rows(),
        node: Node {
            version: env!("CARGO_PKG_VERSION").to_string(),
            listen: st.listen.get().cloned(),
            address: address.map(str::to_string),
            started_at: unix_secs(st.started_at),
            uptime_seconds: now
                .duration_since(st.started_at)
                .unwrap_or_default()
                .as_secs(),
            peer_id: node_info.map(|n| n.peer_id.clone()),
            p2p_addrs: node_info.map(|n| n.addrs.clone()).unwrap_or_default(),
        },
        peers,
        members,
        store: StoreInfo {
            bytes: usage.bytes,
            blobs: usage.blobs,
            evictions: usage.evictions,
            writing: usage.in_flight,
            max_bytes: inner.store.max_size(),
        },
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
        endpoints: st
            .endpoints
            .lock()
            .expect("status lock")
            .values()
            .cloned()
            .collect(),
        inflight_fetches: m.inflight.get(),
        stale_tags_served: m.stale_served.get(),
    }
}

fn host(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| !h.is_empty())
}

fn respond(body: String, content_type: &'static str) -> Response {
    let mut r = Response::new(Body::from(body));
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// `GET /status`: the HTML page.
pub async fn html(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let report = report(&state, host(&headers));
    let mut r = respond(render_html(&report), "text/html; charset=utf-8");
    r.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'; img-src data:"),
    );
    r
}

/// `GET /status.json`: the same data as JSON.
pub async fn json(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let report = report(&state, host(&headers));
    respond(
        serde_json::to_string_pretty(&report).expect("serialisable"),
        "application/json",
    )
}

// ---------------------------------------------------------------------------------------
// Formatting, shared with `kagami status`.

/// Escapes text for HTML element content and quoted attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `1.5 MiB`, `512 B`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if v >= 100.0 {
        format!("{v:.0} {}", UNITS[u])
    } else if v >= 10.0 {
        format!("{v:.1} {}", UNITS[u])
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

/// `850 ms`, `1.2 s`, `2m 05s`.
pub fn human_duration_ms(ms: f64) -> String {
    if ms < 10.0 {
        format!("{ms:.1} ms")
    } else if ms < 1000.0 {
        format!("{ms:.0} ms")
    } else if ms < 60_000.0 {
        format!("{:.1} s", ms / 1000.0)
    } else {
        let s = (ms / 1000.0) as u64;
        format!("{}m {:02}s", s / 60, s % 60)
    }
}

/// `3d 4h`, `2h 05m`, `4m 10s`, `12s`.
pub fn human_uptime(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d}d {h}h")
    } else if h > 0 {
        format!("{h}h {m:02}m")
    } else if m > 0 {
        format!("{m}m {s:02}s")
    } else {
        format!("{s}s")
    }
}

/// `2026-11-22 06:21:04` (UTC) from Unix seconds.
pub fn utc_datetime(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// `06:21:04` (UTC) from Unix seconds.
pub fn utc_time(secs: u64) -> String {
    utc_datetime(secs)[11..].to_string()
}

/// `sha256:0123456789ab` from a full digest.
pub fn short_digest(d: &str) -> String {
    match d.split_once(':') {
        Some((alg, hex)) if hex.len() > 12 => format!("{alg}:{}", &hex[..12]),
        _ => d.to_string(),
    }
}

/// The image a request was for: `registry/repository`, plus `:tag` for manifests by tag.
pub fn pull_image(p: &Pull) -> String {
    if p.kind == "manifest" && !p.reference.contains(':') {
        format!("{}/{}:{}", p.registry, p.repository, p.reference)
    } else {
        format!("{}/{}", p.registry, p.repository)
    }
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

fn unix_millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

// ---------------------------------------------------------------------------------------
// The HTML page.

const COLORS: [&str; 3] = ["#2f9e6a", "#3b82f6", "#f08c2e"];

const CSS: &str = r#"
*{box-sizing:border-box}
body{margin:0;background:#f3f5f8;color:#1c2430;font:14px/1.45 -apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,"Liberation Sans","DejaVu Sans",sans-serif}
header{background:#17202c;color:#fff;padding:18px 32px;display:flex;align-items:baseline;gap:16px}
header h1{margin:0;font-size:22px;font-weight:650;letter-spacing:.02em}
header .sub{color:#9fb0c4}
header .right{margin-left:auto;color:#9fb0c4;font-size:13px}
main{padding:24px 32px;display:grid;gap:20px;grid-template-columns:repeat(12,minmax(0,1fr))}
section{grid-column:span 3;background:#fff;border-radius:10px;box-shadow:0 1px 2px rgba(16,24,40,.06),0 1px 3px rgba(16,24,40,.08);padding:18px 20px;min-width:0}
section.wide{grid-column:1/-1}
section.members{grid-column:span 5}
section.endpoints{grid-column:span 7}
h2{margin:0 0 12px;font-size:13px;font-weight:650;text-transform:uppercase;letter-spacing:.06em;color:#5b6777}
.big{font-size:30px;font-weight:650;line-height:1.1;margin-bottom:6px;font-variant-numeric:tabular-nums}
.muted{color:#6b7686}
.kv{display:grid;grid-template-columns:auto 1fr;gap:4px 12px;margin:0}
.kv dt{color:#6b7686}
.kv dd{margin:0;overflow-wrap:anywhere}
.mono{font-family:"DejaVu Sans Mono",Menlo,Consolas,monospace;font-size:12.5px}
.bar{height:10px;border-radius:5px;background:#e7ebf0;overflow:hidden;display:flex;margin:10px 0 6px}
.bar span{display:block;height:100%}
.legend{display:flex;gap:18px;flex-wrap:wrap;margin-bottom:6px}
.legend span{display:inline-flex;align-items:center;gap:6px}
.sw{width:11px;height:11px;border-radius:3px;display:inline-block}
.rows div{display:flex;justify-content:space-between;gap:8px;padding:2px 0}
.rows b{font-weight:600;font-variant-numeric:tabular-nums}
table{width:100%;border-collapse:collapse;font-variant-numeric:tabular-nums}
th{text-align:left;font-weight:600;color:#5b6777;font-size:12px;text-transform:uppercase;letter-spacing:.04em;border-bottom:1px solid #e3e7ed;padding:6px 8px}
td{border-bottom:1px solid #eef1f4;padding:6px 8px;vertical-align:top}
tr:last-child td{border-bottom:0}
td.num,th.num{text-align:right;white-space:nowrap}
.pill{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600;color:#fff}
.ok{color:#1f8a57;font-weight:600}.bad{color:#c4372b;font-weight:600}.warn{color:#b26b00;font-weight:600}
.dot{display:inline-block;width:9px;height:9px;border-radius:50%;margin-right:6px}
.nowrap{white-space:nowrap}
td.err{font-size:12.5px;overflow-wrap:anywhere;color:#8f2a21;background:#fdf3f2;border-radius:6px;padding:6px 10px 6px 25px}
tr.joined td{border-bottom:0}
.donut svg{flex:none}
.empty{color:#8a94a3;font-style:italic;padding:6px 0}
.donut{display:flex;align-items:center;gap:18px}
svg text{font-family:inherit}
"#;

fn source_color(source: &str) -> &'static str {
    match source {
        "local" => COLORS[0],
        "peer" => COLORS[1],
        "upstream" => COLORS[2],
        _ => "#8a94a3",
    }
}

/// Renders the page. Every string from outside is escaped.
pub fn render_html(r: &Report) -> String {
    let mut h = String::with_capacity(32 * 1024);
    let title = match (&r.node.listen, &r.node.address) {
        (Some(a), _) | (None, Some(a)) => format!("kagami status · {a}"),
        _ => "kagami status".to_string(),
    };
    let _ = write!(
        h,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"5\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{}</title><style>{CSS}</style></head><body>\n",
        escape(&title)
    );
    let _ = write!(
        h,
        "<header><h1>kagami</h1><span class=\"sub\">registry mirror · node status</span>\
         <span class=\"right\">updated {} UTC · refreshes every 5 s · <a style=\"color:#9fb0c4\" href=\"/status.json\">JSON</a></span></header>\n<main>\n",
        utc_datetime(r.generated_at)
    );
    refused_card(&mut h, r);
    node_card(&mut h, r);
    store_card(&mut h, r);
    hit_card(&mut h, r);
    bytes_card(&mut h, r);
    chart_card(&mut h, r);
    members_card(&mut h, r);
    endpoints_card(&mut h, r);
    pulls_card(&mut h, r);
    h.push_str("</main></body></html>\n");
    h
}

/// First on the page, and only when there is something to say.
fn refused_card(h: &mut String, r: &Report) {
    if r.refused.is_empty() {
        return;
    }
    let total: u64 = r.refused.iter().map(|x| x.count).sum();
    let _ = write!(
        h,
        "<section class=\"wide\" id=\"refused\"><h2 class=\"bad\">Refused requests: {total} pulled around this mirror</h2>\
         <p class=\"muted\">containerd takes any error from kagami as \"try the next host\" and pulls from the registry itself: \
         no cache and no sharing for these. <code>kagami doctor</code> checks a node's setup.</p>\
         <table><tr><th>registry</th><th>reason</th><th class=\"num\">count</th><th class=\"num\">last</th><th class=\"num\">status</th><th>last request</th></tr>"
    );
    for x in &r.refused {
        let _ = write!(
            h,
            "<tr class=\"joined\"><td class=\"mono\">{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num muted\">{}</td><td class=\"num bad\">{}</td><td class=\"mono\">{}</td></tr>\
             <tr><td colspan=\"6\" class=\"err\">{}</td></tr>",
            escape(&x.registry),
            escape(&x.reason),
            x.count,
            ago(r.generated_at, x.last_at),
            x.last_status,
            escape(&ellipsis(&x.last_request, 120)),
            escape(&x.last_message),
        );
    }
    h.push_str("</table></section>\n");
}

fn node_card(h: &mut String, r: &Report) {
    let n = &r.node;
    h.push_str("<section id=\"node\"><h2>Node</h2>");
    let addr = n
        .listen
        .as_deref()
        .or(n.address.as_deref())
        .unwrap_or("unknown");
    let _ = write!(
        h,
        "<div class=\"big mono\" style=\"font-size:20px\">{}</div><dl class=\"kv\">\
         <dt>version</dt><dd>{}</dd><dt>up</dt><dd>{} <span class=\"muted\">(since {} UTC)</span></dd>",
        escape(addr),
        escape(&n.version),
        human_uptime(n.uptime_seconds),
        utc_time(n.started_at)
    );
    match &n.peer_id {
        Some(id) => {
            let _ = write!(
                h,
                "<dt>P2P</dt><dd><span class=\"ok\">on</span></dd><dt>peer id</dt><dd class=\"mono\" title=\"{}\">{}</dd>",
                escape(id),
                escape(&ellipsis(id, 24))
            );
        }
        None => h.push_str("<dt>P2P</dt><dd class=\"muted\">off</dd>"),
    }
    let _ = writeln!(
        h,
        "<dt>fetching</dt><dd>{} blob{}</dd></dl></section>",
        r.inflight_fetches,
        if r.inflight_fetches == 1 { "" } else { "s" }
    );
}

fn ellipsis(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let head: String = s.chars().take(max / 2).collect();
    let tail: String = s
        .chars()
        .rev()
        .take(max / 2 - 1)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    format!("{head}…{tail}")
}

fn store_card(h: &mut String, r: &Report) {
    let s = &r.store;
    let _ = write!(
        h,
        "<section id=\"store\"><h2>Store</h2><div class=\"big\">{}</div>",
        human_bytes(s.bytes)
    );
    match s.max_bytes {
        Some(max) if max > 0 => {
            let pct = (s.bytes as f64 / max as f64 * 100.0).min(100.0);
            let color = if pct > 90.0 { "#c4372b" } else { "#3b82f6" };
            let _ = write!(
                h,
                "<div class=\"bar\"><span style=\"width:{pct:.1}%;background:{color}\"></span></div>\
                 <div class=\"muted\">{pct:.0}% of {}</div>",
                human_bytes(max)
            );
        }
        _ => h.push_str(
            "<div class=\"bar\"><span style=\"width:0\"></span></div><div class=\"muted\">no size limit</div>",
        ),
    }
    let _ = writeln!(
        h,
        "<div class=\"rows\" style=\"margin-top:8px\"><div><span>blobs</span><b>{}</b></div>\
         <div><span>evictions</span><b>{}</b></div><div><span>writes in progress</span><b>{}</b></div></div></section>",
        s.blobs, s.evictions, s.writing
    );
}

fn hit_card(h: &mut String, r: &Report) {
    let c = &r.cache;
    h.push_str("<section id=\"hit-ratio\"><h2>Hit ratio</h2><div class=\"donut\">");
    // A ring: hits in green over a grey track.
    let (radius, stroke) = (31.0_f64, 11.0);
    let circ = 2.0 * std::f64::consts::PI * radius;
    let ratio = c.hit_ratio.unwrap_or(0.0);
    let label = c
        .hit_ratio
        .map_or("–".to_string(), |v| format!("{:.0}%", v * 100.0));
    let _ = write!(
        h,
        "<svg width=\"84\" height=\"84\" viewBox=\"0 0 84 84\" role=\"img\" aria-label=\"hit ratio {label}\">\
         <circle cx=\"42\" cy=\"42\" r=\"{radius}\" fill=\"none\" stroke=\"#e7ebf0\" stroke-width=\"{stroke}\"/>\
         <circle cx=\"42\" cy=\"42\" r=\"{radius}\" fill=\"none\" stroke=\"{}\" stroke-width=\"{stroke}\" \
         stroke-dasharray=\"{:.2} {:.2}\" transform=\"rotate(-90 42 42)\"/>\
         <text x=\"42\" y=\"48\" text-anchor=\"middle\" font-size=\"17\" font-weight=\"650\" fill=\"#1c2430\">{label}</text></svg>",
        COLORS[0],
        circ * ratio,
        circ
    );
    let total = c.hits + c.misses;
    let _ = write!(
        h,
        "<div class=\"muted\">{} of {} lookup{} answered from the store</div></div>",
        c.hits,
        total,
        if total == 1 { "" } else { "s" }
    );
    let row = |name: &str, hm: &HitMiss| {
        format!(
            "<div><span>{name}</span><b>{} <span class=\"muted\" style=\"font-weight:400\">· {} of {}</span></b></div>",
            hm.ratio()
                .map_or("–".to_string(), |v| format!("{:.0}%", v * 100.0)),
            hm.hits,
            hm.hits + hm.misses,
        )
    };
    let _ = writeln!(
        h,
        "<div class=\"rows\" style=\"margin-top:10px\">{}{}</div></section>",
        row("blobs", &c.blob),
        row("manifests", &c.manifest)
    );
}

fn bytes_card(h: &mut String, r: &Report) {
    let b = &r.bytes_served;
    let total = b.total();
    let _ = write!(
        h,
        "<section id=\"bytes\"><h2>Bytes served</h2><div class=\"big\">{}</div><div class=\"bar\">",
        human_bytes(total)
    );
    let values = [b.local, b.peer, b.upstream];
    if total > 0 {
        for (i, v) in values.iter().enumerate() {
            let _ = write!(
                h,
                "<span style=\"width:{:.2}%;background:{}\"></span>",
                *v as f64 / total as f64 * 100.0,
                COLORS[i]
            );
        }
    }
    h.push_str("</div><div class=\"rows\">");
    for (i, v) in values.iter().enumerate() {
        let pct = if total > 0 {
            format!("{:.0}%", *v as f64 / total as f64 * 100.0)
        } else {
            "–".into()
        };
        let _ = write!(
            h,
            "<div><span><i class=\"sw\" style=\"background:{}\"></i> {}</span><b>{} <span class=\"muted\" style=\"font-weight:400\">{pct}</span></b></div>",
            COLORS[i],
            SOURCES[i],
            human_bytes(*v)
        );
    }
    h.push_str("</div></section>\n");
}

/// The y axis of the chart: a step (1, 2, 2.5 or 5 times a power of ten, in the unit of
/// the largest value, so that labels read "0.5 MiB/s", "1 MiB/s", "1.5 MiB/s") that fits
/// `max` in at most five steps, and that unit.
fn axis(max: f64) -> (f64, Axis) {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut u = 0;
    while max >= 1024f64.powi(u as i32 + 1) && u < UNITS.len() - 1 {
        u += 1;
    }
    let unit = 1024f64.powi(u as i32);
    let x = (max / unit).max(1.0);
    let mut step = 10f64.powf((x / 5.0).log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        let candidate = 10f64.powf((x / 5.0).log10().floor()) * m;
        if x / candidate <= 5.0 {
            step = candidate;
            break;
        }
    }
    if u == 0 {
        step = step.max(1.0).round();
    }
    (
        step * unit,
        Axis {
            unit,
            name: UNITS[u],
        },
    )
}

struct Axis {
    unit: f64,
    name: &'static str,
}

impl Axis {
    fn label(&self, bytes_per_sec: f64) -> String {
        let v = bytes_per_sec / self.unit;
        let text = format!("{v:.2}");
        let text = text.trim_end_matches('0').trim_end_matches('.');
        format!("{text} {}/s", self.name)
    }
}

fn chart_card(h: &mut String, r: &Report) {
    let samples = &r.series.samples;
    let interval = r.series.interval_seconds.max(1) as f64;
    let (w, ht) = (1160.0_f64, 240.0_f64);
    let (left, right, top, bottom) = (78.0, 12.0, 12.0, 28.0);
    let (pw, ph) = (w - left - right, ht - top - bottom);
    let _ = write!(
        h,
        "<section class=\"wide\" id=\"bytes-by-source\"><h2>Bytes served by source · last {} minutes</h2><div class=\"legend\">",
        samples.len() as u64 * r.series.interval_seconds / 60
    );
    for (i, s) in SOURCES.iter().enumerate() {
        let _ = write!(
            h,
            "<span><i class=\"sw\" style=\"background:{}\"></i>{s}</span>",
            COLORS[i]
        );
    }
    let _ = write!(
        h,
        "<span class=\"muted\">bytes per second, {}-second buckets</span></div>",
        r.series.interval_seconds
    );
    let max = samples.iter().map(|s| s.total()).max().unwrap_or(0) as f64 / interval;
    let (step, axis) = axis(max);
    let ticks = ((max / step).ceil() as usize).max(1);
    let top_value = step * ticks as f64;
    let _ = write!(
        h,
        "<svg viewBox=\"0 0 {w} {ht}\" width=\"100%\" role=\"img\" aria-label=\"bytes served by source over time\">"
    );
    // Grid and y labels.
    for i in 0..=ticks {
        let v = step * i as f64;
        let y = top + ph - v / top_value * ph;
        let _ = write!(
            h,
            "<line x1=\"{left}\" x2=\"{:.1}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"{}\" stroke-width=\"1\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" font-size=\"11\" fill=\"#6b7686\">{}</text>",
            left + pw,
            if i == 0 { "#c9d0d9" } else { "#edf0f4" },
            left - 8.0,
            y + 4.0,
            if max > 0.0 || i == 0 {
                axis.label(v)
            } else {
                String::new()
            }
        );
    }
    // X labels every 5 minutes, counted back from now.
    let n = samples.len().max(1);
    let slot_w = pw / n as f64;
    let per_label = (300.0 / interval).round().max(1.0) as usize;
    for k in (0..n).rev().step_by(per_label) {
        let back = (n - 1 - k) as u64 * r.series.interval_seconds;
        let x = left + slot_w * (k as f64 + 0.5);
        let text = if back == 0 {
            "now".to_string()
        } else {
            format!("−{} min", back / 60)
        };
        let _ = write!(
            h,
            "<text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"11\" fill=\"#6b7686\">{text}</text>",
            ht - 8.0
        );
    }
    if n > per_label {
        let _ = write!(
            h,
            "<text x=\"{left}\" y=\"{:.1}\" text-anchor=\"start\" font-size=\"11\" fill=\"#6b7686\">−{} min</text>",
            ht - 8.0,
            n as u64 * r.series.interval_seconds / 60
        );
    }
    // Stacked bars.
    let bar_w = (slot_w * 0.78).max(1.0);
    for (k, s) in samples.iter().enumerate() {
        if s.total() == 0 {
            continue;
        }
        let x = left + slot_w * k as f64 + (slot_w - bar_w) / 2.0;
        let _ = write!(
            h,
            "<g><title>{} UTC · local {} · peer {} · upstream {}</title>",
            utc_time(s.at),
            human_bytes(s.local),
            human_bytes(s.peer),
            human_bytes(s.upstream)
        );
        let mut base = top + ph;
        for (i, v) in [s.local, s.peer, s.upstream].iter().enumerate() {
            if *v == 0 {
                continue;
            }
            let bh = (*v as f64 / interval / top_value * ph).max(1.0);
            base -= bh;
            let _ = write!(
                h,
                "<rect x=\"{x:.1}\" y=\"{base:.1}\" width=\"{bar_w:.1}\" height=\"{bh:.1}\" fill=\"{}\"/>",
                COLORS[i]
            );
        }
        h.push_str("</g>");
    }
    if max == 0.0 {
        let _ = write!(
            h,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"14\" fill=\"#8a94a3\">nothing served in the last 30 minutes</text>",
            left + pw / 2.0,
            top + ph / 2.0
        );
    }
    h.push_str("</svg></section>\n");
}

fn members_card(h: &mut String, r: &Report) {
    let _ = write!(
        h,
        "<section class=\"members\" id=\"members\"><h2>Members ({})</h2>",
        r.members.len()
    );
    if !r.peers.enabled {
        h.push_str("<div class=\"empty\">Sharing between nodes is off (no <span class=\"mono\">--p2p-listen</span>).</div></section>\n");
        return;
    }
    let _ = write!(
        h,
        "<div class=\"muted\" style=\"margin-bottom:8px\">{} lookups, {} found content on another node</div>",
        r.peers.lookups, r.peers.lookup_hits
    );
    if r.members.is_empty() {
        h.push_str("<div class=\"empty\">No other node known yet.</div></section>\n");
        return;
    }
    h.push_str(
        "<table><tr><th>peer id</th><th>HTTP address</th><th class=\"num\">received</th></tr>",
    );
    for m in &r.members {
        let _ = write!(
            h,
            "<tr><td class=\"mono\" title=\"{}\">{}</td><td class=\"mono\">{}</td><td class=\"num\">{}</td></tr>",
            escape(&m.id),
            escape(&ellipsis(&m.id, 24)),
            escape(m.http_addr.as_deref().unwrap_or("–")),
            human_bytes(m.received_bytes)
        );
    }
    h.push_str("</table></section>\n");
}

fn ago(now: u64, at_ms: u64) -> String {
    let secs = now.saturating_sub(at_ms / 1000);
    format!("{} ago", human_uptime(secs))
}

fn endpoints_card(h: &mut String, r: &Report) {
    h.push_str("<section class=\"endpoints\" id=\"endpoints\"><h2>Upstream endpoints</h2>");
    if r.endpoints.is_empty() {
        h.push_str("<div class=\"empty\">No upstream fetch yet.</div></section>\n");
        return;
    }
    h.push_str(
        "<table><tr><th>endpoint</th><th class=\"num\">fetches</th><th class=\"num\">failures</th>\
         <th class=\"num\">last answer</th><th class=\"num\">last error</th></tr>",
    );
    for e in &r.endpoints {
        let (dot, state) = if e.healthy() {
            ("#2f9e6a", "healthy")
        } else {
            ("#c4372b", "failing")
        };
        let when = |at: Option<u64>| at.map_or("–".to_string(), |at| ago(r.generated_at, at));
        let error_row = e.last_error.is_some();
        let _ = write!(
            h,
            "<tr{}><td class=\"mono nowrap\"><i class=\"dot\" style=\"background:{dot}\" title=\"{state}\"></i>{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num muted\">{}</td><td class=\"num muted\">{}</td></tr>",
            if error_row { " class=\"joined\"" } else { "" },
            escape(&e.endpoint),
            e.fetches,
            e.failures,
            when(e.last_ok_at),
            when(e.last_error_at),
        );
        if let Some(err) = &e.last_error {
            let _ = write!(
                h,
                "<tr><td colspan=\"5\" class=\"err\">{}</td></tr>",
                escape(err)
            );
        }
    }
    h.push_str("</table></section>\n");
}

fn pulls_card(h: &mut String, r: &Report) {
    let _ = write!(
        h,
        "<section class=\"wide\" id=\"recent-pulls\"><h2>Recent pulls (last {})</h2>",
        RECENT
    );
    if r.recent_pulls.is_empty() {
        h.push_str("<div class=\"empty\">No manifest or blob requests yet.</div></section>\n");
        return;
    }
    h.push_str(
        "<table><tr><th>time (UTC)</th><th>request</th><th>image</th><th>digest</th><th>source</th>\
         <th class=\"num\">bytes</th><th class=\"num\">duration</th><th class=\"num\">status</th></tr>",
    );
    for p in &r.recent_pulls {
        let status_class = match p.status {
            200..=299 if p.complete => "ok",
            200..=299 => "warn",
            404 => "warn",
            _ => "bad",
        };
        let digest = p.digest.as_deref().map_or("–".to_string(), short_digest);
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{} {}</td><td class=\"mono\">{}</td><td class=\"mono\">{}</td>\
             <td><span class=\"pill\" style=\"background:{}\">{}</span></td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"num {status_class}\">{}{}</td></tr>",
            utc_time(p.at / 1000),
            escape(&p.method),
            escape(&p.kind),
            escape(&pull_image(p)),
            escape(&digest),
            source_color(&p.source),
            escape(&p.source),
            human_bytes(p.bytes),
            human_duration_ms(p.duration_ms),
            p.status,
            if p.complete { "" } else { " cut" }
        );
    }
    h.push_str("</table></section>\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_covers_markup_and_quotes() {
        assert_eq!(
            escape(r#"<script>alert("x&y")</script>'"#),
            "&lt;script&gt;alert(&quot;x&amp;y&quot;)&lt;/script&gt;&#39;"
        );
        assert_eq!(escape("plain/text:1"), "plain/text:1");
    }

    #[test]
    fn dates_and_sizes() {
        assert_eq!(utc_datetime(0), "1970-01-01 00:00:00");
        assert_eq!(utc_datetime(1_795_328_464), "2026-11-22 06:21:04");
        assert_eq!(utc_datetime(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1536), "1.50 KiB");
        assert_eq!(human_bytes(20 * 1024 * 1024 * 1024), "20.0 GiB");
        assert_eq!(human_uptime(3725), "1h 02m");
        assert_eq!(
            short_digest("sha256:0123456789abcdef"),
            "sha256:0123456789ab"
        );
    }

    #[test]
    fn axis_steps_read_well() {
        let labels = |max: f64| {
            let (step, a) = axis(max);
            let ticks = (max / step).ceil().max(1.0) as usize;
            assert!(ticks <= 5, "{max}: {ticks} ticks");
            (0..=ticks)
                .map(|i| a.label(step * i as f64))
                .collect::<Vec<_>>()
                .join(", ")
        };
        assert_eq!(labels(0.0), "0 B/s, 1 B/s");
        assert_eq!(
            labels(1000.0),
            "0 B/s, 200 B/s, 400 B/s, 600 B/s, 800 B/s, 1000 B/s"
        );
        assert_eq!(
            labels(1.2 * 1024.0 * 1024.0),
            "0 MiB/s, 0.25 MiB/s, 0.5 MiB/s, 0.75 MiB/s, 1 MiB/s, 1.25 MiB/s"
        );
        assert_eq!(
            labels(230.0 * 1024.0),
            "0 KiB/s, 50 KiB/s, 100 KiB/s, 150 KiB/s, 200 KiB/s, 250 KiB/s"
        );
        assert_eq!(
            labels(3.0 * 1024.0 * 1024.0),
            "0 MiB/s, 1 MiB/s, 2 MiB/s, 3 MiB/s"
        );
    }

    #[test]
    fn series_keeps_thirty_minutes_of_buckets() {
        let s = Status::new();
        s.add_bytes(Source::Local, 10);
        s.add_bytes(Source::Upstream, 5);
        s.add_bytes(Source::None, 99);
        let samples = s.samples(SystemTime::now());
        assert_eq!(samples.len(), BUCKETS);
        let last = samples.last().unwrap();
        assert_eq!((last.local, last.peer, last.upstream), (10, 0, 5));
        // Old buckets fall out of the window.
        let later = SystemTime::now() + std::time::Duration::from_secs(31 * 60);
        assert!(s.samples(later).iter().all(|x| x.total() == 0));
    }

    #[test]
    fn endpoint_health_keeps_the_last_error() {
        let s = Status::new();
        s.endpoint_ok("https://a.example");
        s.endpoint_failed("https://a.example", &"x".repeat(1000));
        s.endpoint_ok("peer:abc");
        let map = s.endpoints.lock().unwrap();
        assert_eq!(map.len(), 1);
        let e = &map["https://a.example"];
        assert_eq!((e.fetches, e.failures), (1, 1));
        assert!(e.last_error.as_ref().unwrap().chars().count() <= MAX_ERROR + 1);
    }

    fn hostile_report() -> Report {
        let evil = "<img src=x onerror=alert(1)>\"'&";
        Report {
            generated_at: 1_795_328_464,
            refused: vec![],
            node: Node {
                version: "0.1.0".into(),
                listen: None,
                address: Some(evil.into()),
                started_at: 1_795_328_000,
                uptime_seconds: 464,
                peer_id: Some(evil.into()),
                p2p_addrs: vec![],
            },
            peers: PeersSummary {
                enabled: true,
                lookups: 3,
                lookup_hits: 1,
            },
            members: vec![MemberInfo {
                id: evil.into(),
                http_addr: Some(evil.into()),
                addrs: vec![],
                received_bytes: 5,
            }],
            store: StoreInfo {
                bytes: 1 << 20,
                blobs: 3,
                evictions: 0,
                writing: 0,
                max_bytes: Some(10 << 20),
            },
            cache: CacheInfo {
                hits: 1,
                misses: 1,
                hit_ratio: Some(0.5),
                blob: HitMiss { hits: 1, misses: 1 },
                manifest: HitMiss::default(),
            },
            bytes_served: BytesBySource {
                local: 10,
                peer: 0,
                upstream: 20,
            },
            series: Series {
                interval_seconds: 10,
                samples: vec![],
            },
            recent_pulls: vec![Pull {
                at: 1_795_328_464_000,
                method: "GET".into(),
                kind: "manifest".into(),
                registry: evil.into(),
                repository: evil.into(),
                reference: evil.into(),
                digest: Some(evil.into()),
                source: evil.into(),
                bytes: 1,
                duration_ms: 1.0,
                status: 200,
                complete: true,
            }],
            endpoints: vec![EndpointHealth {
                endpoint: evil.into(),
                fetches: 1,
                failures: 1,
                last_ok_at: None,
                last_error: Some(evil.into()),
                last_error_at: Some(1_795_328_464_000),
            }],
            inflight_fetches: 0,
            stale_tags_served: 0,
        }
    }

    #[test]
    fn every_outside_string_is_escaped() {
        let page = render_html(&hostile_report());
        assert!(!page.contains("<img"), "{page}");
        assert!(!page.contains("\"'&<"), "{page}");
        assert!(page.contains("&lt;img src=x onerror=alert(1)&gt;"));
        for heading in [
            "Node",
            "Members",
            "Store",
            "Hit ratio",
            "Bytes served by source",
            "Recent pulls",
            "Upstream endpoints",
        ] {
            assert!(page.contains(&format!(">{heading}")), "{heading}");
        }
    }
}
