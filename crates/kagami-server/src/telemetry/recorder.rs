//! The status recorder: what the metrics do not keep, bounded. Bytes served by source in
//! 10-second buckets over the last 30 minutes (fed as body chunks are sent), the last 50
//! manifest and blob requests (recorded when their body ends), and per upstream endpoint
//! the fetches, failures and last error.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::origin::Source;
use crate::path::{ManifestRef, Target};
use crate::report::{BUCKETS, EndpointHealth, INTERVAL_SECS, Pull, RECENT, Sample};

/// Upstream endpoints tracked (a reload can name new ones; the oldest-touched go).
const MAX_ENDPOINTS: usize = 64;
/// Longest error message kept per endpoint.
const MAX_ERROR: usize = 300;

/// What the server remembers for the status view, beyond the metrics. Part of
/// [`super::Telemetry`].
pub struct Recorder {
    started_at: SystemTime,
    listen: OnceLock<String>,
    series: Mutex<VecDeque<(u64, [u64; 3])>>,
    recent: Mutex<VecDeque<Pull>>,
    endpoints: Mutex<BTreeMap<String, EndpointHealth>>,
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

impl Recorder {
    pub fn new() -> Recorder {
        Recorder {
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

    /// The address set by [`Recorder::set_listen`].
    pub fn listen(&self) -> Option<String> {
        self.listen.get().cloned()
    }

    /// When the server started.
    pub fn started_at(&self) -> SystemTime {
        self.started_at
    }

    /// The recent pulls, oldest first.
    pub fn recent_pulls(&self) -> Vec<Pull> {
        self.recent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }

    /// Every endpoint tracked, by name.
    pub fn endpoints(&self) -> Vec<EndpointHealth> {
        self.endpoints
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
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
        let mut series = self.series.lock().unwrap_or_else(PoisonError::into_inner);
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
        let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
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
        let why = super::shorten(why.trim(), MAX_ERROR);
        self.with_endpoint(endpoint, |e| {
            e.failures += 1;
            e.last_error = Some(why);
            e.last_error_at = Some(unix_millis(SystemTime::now()));
        });
    }

    fn with_endpoint(&self, endpoint: &str, f: impl FnOnce(&mut EndpointHealth)) {
        let mut map = self
            .endpoints
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
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

    pub(crate) fn samples(&self, now: SystemTime) -> Vec<Sample> {
        let now_slot = unix_secs(now) / INTERVAL_SECS;
        let first = now_slot + 1 - BUCKETS as u64;
        let series = self.series.lock().unwrap_or_else(PoisonError::into_inner);
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

impl Recorder {
    /// Records a finished request in the recent pulls (manifests and blobs only).
    pub(crate) fn record_request(&self, r: Finished<'_>) {
        let path = r.path;
        let (kind, reference, digest) = match &path.target {
            Target::Blob(d) => ("blob", d.to_string(), Some(d.to_string())),
            Target::Manifest(ManifestRef::Digest(d)) => ("manifest", d.to_string(), r.digest),
            Target::Manifest(ManifestRef::Tag(t)) => ("manifest", t.clone(), r.digest),
            Target::TagsList | Target::Referrers(_) => return,
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

pub(crate) fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

pub(crate) fn unix_millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_keeps_thirty_minutes_of_buckets() {
        let s = Recorder::new();
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
        let s = Recorder::new();
        s.endpoint_ok("https://a.example");
        s.endpoint_failed("https://a.example", &"x".repeat(1000));
        s.endpoint_ok("peer:abc");
        let map = s.endpoints.lock().unwrap();
        assert_eq!(map.len(), 1);
        let e = &map["https://a.example"];
        assert_eq!((e.fetches, e.failures), (1, 1));
        assert!(e.last_error.as_ref().unwrap().chars().count() <= MAX_ERROR + 1);
    }
}
