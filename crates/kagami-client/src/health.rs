//! Endpoint health, shared by every request of a process: rate limits (`429` and
//! `Retry-After`) and a circuit breaker per endpoint, so that the walk of a plan
//! ([`crate::Walk`]) skips an endpoint that asked to be left alone or keeps failing, and
//! moves on to the next attempt as it does for a failure.
//!
//! An endpoint is keyed by its base URL ([`kagami_config::Endpoint::base`]: scheme, host,
//! port and the API path, so two override paths on one host are two endpoints). Its state:
//!
//! - **healthy**: tried as usual;
//! - **backing off** until a time: it answered `429` (or `503` with `Retry-After`). The
//!   time is its `Retry-After` (seconds or an HTTP date), else an exponential back-off
//!   (`backoff`, doubling with each rate limit in a row), capped at `max_backoff`. Once the
//!   time has passed it is tried again;
//! - **open** until a time: `failures_to_open` failures in a row (a network error, a
//!   timeout, a 5xx without `Retry-After`); answers such as 404 or 401 are not failures.
//!   The first cool-down is `open_for`, doubling with each opening in a row up to
//!   `max_open_for`;
//! - **half-open**: the cool-down has passed; one request (the probe) goes through and the
//!   others skip the endpoint until it ends. Any answer closes the circuit; a failure opens
//!   it again, for longer. A probe abandoned (its request dropped) lets the next one probe.
//!
//! Nothing here does I/O; time comes from a [`Clock`] (a [`ManualClock`] in tests).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use crate::error::Error;

/// The thresholds of [`Health`].
#[derive(Debug, Clone)]
pub struct HealthPolicy {
    /// Failures in a row that open the circuit.
    pub failures_to_open: u32,
    /// The first cool-down of an open circuit.
    pub open_for: Duration,
    /// The longest cool-down (it doubles with each opening in a row).
    pub max_open_for: Duration,
    /// The back-off after a rate limit without `Retry-After` (doubling with each one in a row).
    pub backoff: Duration,
    /// The longest back-off, `Retry-After` included.
    pub max_backoff: Duration,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        HealthPolicy {
            failures_to_open: 5,
            open_for: Duration::from_secs(30),
            max_open_for: Duration::from_secs(300),
            backoff: Duration::from_secs(10),
            max_backoff: Duration::from_secs(600),
        }
    }
}

/// Where [`Health`] reads the time.
pub trait Clock: Send + Sync {
    fn now(&self) -> Instant;
}

struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// A clock that moves only when told (tests: a back-off passes without waiting for it).
pub struct ManualClock {
    start: Instant,
    offset: Mutex<Duration>,
}

impl Default for ManualClock {
    fn default() -> Self {
        ManualClock {
            start: Instant::now(),
            offset: Mutex::new(Duration::ZERO),
        }
    }
}

impl ManualClock {
    pub fn advance(&self, by: Duration) {
        *self.offset.lock().unwrap_or_else(PoisonError::into_inner) += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.start + *self.offset.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// An endpoint's state, as shown on `/status` and in metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    Healthy,
    BackingOff,
    Open,
    HalfOpen,
}

impl State {
    pub const ALL: [State; 4] = [
        State::Healthy,
        State::BackingOff,
        State::Open,
        State::HalfOpen,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Healthy => "healthy",
            State::BackingOff => "backing_off",
            State::Open => "open",
            State::HalfOpen => "half_open",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One endpoint's health, for status pages.
#[derive(Debug, Clone)]
pub struct EndpointStatus {
    /// The endpoint's base URL.
    pub endpoint: String,
    pub state: State,
    /// Until when it is skipped (backing off or open).
    pub until: Option<SystemTime>,
    pub consecutive_failures: u32,
    /// The last failure or rate limit, in kagami's words ([`Error::reason`]).
    pub last_error: Option<String>,
    /// Rate limits (429, or 503 with `Retry-After`) since the process started.
    pub rate_limited: u64,
    /// Times the circuit opened since the process started.
    pub circuit_opens: u64,
}

/// Told of the events worth counting (the server's metrics).
pub trait HealthEvents: Send + Sync {
    /// `endpoint` answered a rate limit and is skipped for `backoff`.
    fn rate_limited(&self, endpoint: &str, backoff: Duration);
    /// `endpoint`'s circuit opened (again) for `cool_down`.
    fn circuit_opened(&self, endpoint: &str, cool_down: Duration);
}

/// Why the walk skipped an endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skip {
    pub state: State,
    pub until: Option<SystemTime>,
    pub why: String,
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.why)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Healthy,
    BackingOff(Instant),
    Open(Instant),
    HalfOpen { probing: bool },
}

#[derive(Debug)]
struct Entry {
    mode: Mode,
    failures: u32,
    opens_in_row: u32,
    limits_in_row: u32,
    last_error: Option<String>,
    rate_limited: u64,
    circuit_opens: u64,
    touched: Instant,
}

impl Entry {
    fn new(now: Instant) -> Entry {
        Entry {
            mode: Mode::Healthy,
            failures: 0,
            opens_in_row: 0,
            limits_in_row: 0,
            last_error: None,
            rate_limited: 0,
            circuit_opens: 0,
            touched: now,
        }
    }

    /// The mode once the time has passed what it waits for.
    fn settle(&mut self, now: Instant) {
        match self.mode {
            Mode::BackingOff(t) if now >= t => self.mode = Mode::Healthy,
            Mode::Open(t) if now >= t => self.mode = Mode::HalfOpen { probing: false },
            _ => {}
        }
    }

    /// Worth keeping when the table is full: anything but a healthy endpoint with
    /// nothing to count.
    fn idle(&self) -> bool {
        self.mode == Mode::Healthy && self.failures == 0 && self.limits_in_row == 0
    }
}

/// Endpoints tracked at most (plans made for client-chosen registries could name any
/// number); idle healthy ones go first.
const MAX_ENDPOINTS: usize = 1024;
/// Longest error message kept per endpoint.
const MAX_ERROR: usize = 300;

/// The health of every endpoint a process talks to. Cheap to clone; clones share it.
#[derive(Clone)]
pub struct Health {
    inner: Arc<Inner>,
}

struct Inner {
    policy: HealthPolicy,
    clock: Arc<dyn Clock>,
    map: Mutex<HashMap<String, Entry>>,
    events: OnceLock<Arc<dyn HealthEvents>>,
}

impl Default for Health {
    fn default() -> Self {
        Health::new(HealthPolicy::default())
    }
}

/// What an attempt's outcome means for its endpoint.
enum Outcome {
    /// The endpoint answered (any status but those below).
    Answered,
    /// A rate limit: back off, for `Retry-After` when it said.
    RateLimited(Option<Duration>),
    /// A failure that counts towards opening the circuit.
    Failed,
    /// Nothing learnt about the endpoint (a local failure, a refused redirect, ...).
    Neutral,
}

fn outcome(e: &Error) -> Outcome {
    match e {
        Error::Status {
            status: 429,
            retry_after,
            ..
        } => Outcome::RateLimited(*retry_after),
        Error::Status {
            status: 503,
            retry_after: Some(d),
            ..
        } => Outcome::RateLimited(Some(*d)),
        Error::Status { status, .. } if *status >= 500 => Outcome::Failed,
        Error::Network { .. } => Outcome::Failed,
        Error::Status { .. }
        | Error::DigestMismatch { .. }
        | Error::SizeMismatch { .. }
        | Error::ManifestTooBig { .. }
        | Error::InvalidManifest { .. } => Outcome::Answered,
        Error::Auth { .. }
        | Error::Redirects { .. }
        | Error::Refused { .. }
        | Error::TlsSetup { .. }
        | Error::Io { .. }
        | Error::Skipped { .. }
        | Error::AllFailed { .. } => Outcome::Neutral,
    }
}

impl Health {
    pub fn new(policy: HealthPolicy) -> Health {
        Health::with_clock(policy, Arc::new(SystemClock))
    }

    pub fn with_clock(policy: HealthPolicy, clock: Arc<dyn Clock>) -> Health {
        Health {
            inner: Arc::new(Inner {
                policy,
                clock,
                map: Mutex::new(HashMap::new()),
                events: OnceLock::new(),
            }),
        }
    }

    pub fn policy(&self) -> &HealthPolicy {
        &self.inner.policy
    }

    /// Sets who is told of rate limits and openings (once; later calls are ignored).
    pub fn observe(&self, events: Arc<dyn HealthEvents>) {
        let _ = self.inner.events.set(events);
    }

    fn now(&self) -> Instant {
        self.inner.clock.now()
    }

    /// `at` as a wall-clock time.
    fn wall(&self, at: Instant, now: Instant) -> SystemTime {
        SystemTime::now() + at.saturating_duration_since(now)
    }

    /// May the walk try `endpoint` now? `Ok(probe)`: yes (`probe` when this try decides
    /// whether a half-open circuit closes); `Err`: skip it, and why.
    pub(crate) fn admit(&self, endpoint: &str) -> Result<bool, Skip> {
        let now = self.now();
        let mut map = self
            .inner
            .map
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(e) = map.get_mut(endpoint) else {
            return Ok(false);
        };
        e.settle(now);
        let last = e
            .last_error
            .as_deref()
            .map(|l| format!("; last: {l}"))
            .unwrap_or_default();
        match e.mode {
            Mode::Healthy => Ok(false),
            Mode::HalfOpen { probing: false } => {
                e.mode = Mode::HalfOpen { probing: true };
                Ok(true)
            }
            Mode::HalfOpen { probing: true } => Err(Skip {
                state: State::HalfOpen,
                until: None,
                why: format!("circuit half-open: waiting for the probe in flight{last}"),
            }),
            Mode::BackingOff(t) => {
                let until = self.wall(t, now);
                Err(Skip {
                    state: State::BackingOff,
                    until: Some(until),
                    why: format!(
                        "rate limited until {}{last}",
                        httpdate::fmt_http_date(until)
                    ),
                })
            }
            Mode::Open(t) => {
                let until = self.wall(t, now);
                Err(Skip {
                    state: State::Open,
                    until: Some(until),
                    why: format!(
                        "circuit open until {} after {} failures in a row{last}",
                        httpdate::fmt_http_date(until),
                        e.failures
                    ),
                })
            }
        }
    }

    /// A try of `endpoint` admitted as a probe ended without an outcome (its request was
    /// dropped): the next request probes instead.
    pub(crate) fn abandon_probe(&self, endpoint: &str) {
        let mut map = self
            .inner
            .map
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(e) = map.get_mut(endpoint)
            && e.mode == (Mode::HalfOpen { probing: true })
        {
            e.mode = Mode::HalfOpen { probing: false };
        }
    }

    /// A try of `endpoint` succeeded.
    pub(crate) fn succeeded(&self, endpoint: &str) {
        let mut map = self
            .inner
            .map
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(e) = map.get_mut(endpoint) {
            answered(e, endpoint);
        }
    }

    /// A try of `endpoint` failed with `error`.
    pub(crate) fn failed(&self, endpoint: &str, error: &Error) {
        let outcome = outcome(error);
        let now = self.now();
        let p = &self.inner.policy;
        let mut event = None;
        {
            let mut map = self
                .inner
                .map
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Outcome::Answered | Outcome::Neutral = outcome {
                if let (Outcome::Answered, Some(e)) = (outcome, map.get_mut(endpoint)) {
                    answered(e, endpoint);
                }
                return;
            }
            if !map.contains_key(endpoint) && map.len() >= MAX_ENDPOINTS {
                make_room(&mut map);
            }
            let e = map
                .entry(endpoint.to_string())
                .or_insert_with(|| Entry::new(now));
            e.touched = now;
            e.settle(now);
            e.last_error = Some(shorten(&error.reason()));
            match outcome {
                Outcome::RateLimited(after) => {
                    let d = match after {
                        Some(d) => d,
                        None => p.backoff.saturating_mul(1 << e.limits_in_row.min(16)),
                    }
                    .min(p.max_backoff);
                    e.limits_in_row = e.limits_in_row.saturating_add(1);
                    e.rate_limited += 1;
                    // A rate limit is an answer: the endpoint is up. A half-open circuit's
                    // probe that gets one closes the circuit into the back-off.
                    e.failures = 0;
                    e.opens_in_row = 0;
                    e.mode = Mode::BackingOff(now + d);
                    tracing::warn!(endpoint, backoff = ?d, "endpoint rate limited: skipped until the back-off ends");
                    event = Some((true, d));
                }
                Outcome::Failed => {
                    e.failures = e.failures.saturating_add(1);
                    let reopen = matches!(e.mode, Mode::HalfOpen { .. });
                    let open = e.failures >= p.failures_to_open
                        && matches!(e.mode, Mode::Healthy | Mode::BackingOff(_));
                    if reopen || open {
                        let d = p
                            .open_for
                            .saturating_mul(1 << e.opens_in_row.min(16))
                            .min(p.max_open_for);
                        e.opens_in_row = e.opens_in_row.saturating_add(1);
                        e.circuit_opens += 1;
                        e.mode = Mode::Open(now + d);
                        tracing::warn!(endpoint, failures = e.failures, cool_down = ?d, "endpoint circuit opened: skipped until a probe succeeds");
                        event = Some((false, d));
                    }
                }
                Outcome::Answered | Outcome::Neutral => unreachable!("returned above"),
            }
        }
        if let (Some((limited, d)), Some(events)) = (event, self.inner.events.get()) {
            if limited {
                events.rate_limited(endpoint, d);
            } else {
                events.circuit_opened(endpoint, d);
            }
        }
    }

    /// Every endpoint that has failed or been rate limited, by name.
    pub fn snapshot(&self) -> Vec<EndpointStatus> {
        let now = self.now();
        let mut map = self
            .inner
            .map
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut v: Vec<EndpointStatus> = map
            .iter_mut()
            .map(|(k, e)| {
                e.settle(now);
                let (state, until) = match e.mode {
                    Mode::Healthy => (State::Healthy, None),
                    Mode::BackingOff(t) => (State::BackingOff, Some(self.wall(t, now))),
                    Mode::Open(t) => (State::Open, Some(self.wall(t, now))),
                    Mode::HalfOpen { .. } => (State::HalfOpen, None),
                };
                EndpointStatus {
                    endpoint: k.clone(),
                    state,
                    until,
                    consecutive_failures: e.failures,
                    last_error: e.last_error.clone(),
                    rate_limited: e.rate_limited,
                    circuit_opens: e.circuit_opens,
                }
            })
            .collect();
        v.sort_by(|a, b| a.endpoint.cmp(&b.endpoint));
        v
    }
}

/// The endpoint answered: failures in a row end, an open or half-open circuit closes (a
/// request sent before the circuit opened may answer after).
fn answered(e: &mut Entry, endpoint: &str) {
    if let Mode::HalfOpen { .. } | Mode::Open(_) = e.mode {
        tracing::info!(endpoint, "endpoint circuit closed: the probe succeeded");
        e.mode = Mode::Healthy;
    }
    if let Mode::Healthy = e.mode {
        e.limits_in_row = 0;
    }
    e.failures = 0;
    e.opens_in_row = 0;
}

/// Drops the idle entry touched longest ago, else the oldest of all.
fn make_room(map: &mut HashMap<String, Entry>) {
    let victim = map
        .iter()
        .filter(|(_, e)| e.idle())
        .min_by_key(|(_, e)| e.touched)
        .or_else(|| map.iter().min_by_key(|(_, e)| e.touched))
        .map(|(k, _)| k.clone());
    if let Some(k) = victim {
        map.remove(&k);
    }
}

fn shorten(s: &str) -> String {
    if s.len() <= MAX_ERROR {
        return s.to_string();
    }
    let mut cut = MAX_ERROR;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}…", &s[..cut])
}

/// A `Retry-After` value: delay seconds, or an HTTP date (a date in the past is no wait).
/// `None` for anything else.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        return Some(Duration::from_secs(v.parse().unwrap_or(u64::MAX)));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(s: u16, retry_after: Option<u64>) -> Error {
        Error::Status {
            url: "u".into(),
            status: s,
            body: None,
            retry_after: retry_after.map(Duration::from_secs),
        }
    }

    fn health() -> (Health, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::default());
        let h = Health::with_clock(
            HealthPolicy {
                failures_to_open: 3,
                ..Default::default()
            },
            clock.clone(),
        );
        (h, clock)
    }

    const E: &str = "http://a/v2";

    #[test]
    fn retry_after_is_seconds_or_an_http_date() {
        let now = httpdate::parse_http_date("Sat, 28 Nov 2026 20:00:00 GMT").unwrap();
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("Sat, 28 Nov 2026 20:01:30 GMT", now),
            Some(Duration::from_secs(90))
        );
        assert_eq!(
            parse_retry_after("Sat, 28 Nov 2026 19:00:00 GMT", now),
            Some(Duration::ZERO),
            "a date in the past"
        );
        for garbage in ["", "-5", "1.5", "soon", "Sat, 99 Nov 2026", "12 s"] {
            assert_eq!(parse_retry_after(garbage, now), None, "{garbage:?}");
        }
        assert_eq!(
            parse_retry_after("99999999999999999999999", now),
            Some(Duration::from_secs(u64::MAX)),
            "huge: capped by the policy later"
        );
    }

    #[test]
    fn a_rate_limit_skips_the_endpoint_until_its_retry_after() {
        let (h, clock) = health();
        assert_eq!(h.admit(E), Ok(false));
        h.failed(E, &status(429, Some(60)));
        let skip = h.admit(E).unwrap_err();
        assert_eq!(skip.state, State::BackingOff);
        assert!(skip.why.starts_with("rate limited until "), "{}", skip.why);
        clock.advance(Duration::from_secs(59));
        assert!(h.admit(E).is_err());
        clock.advance(Duration::from_secs(1));
        assert_eq!(h.admit(E), Ok(false));
        let s = &h.snapshot()[0];
        assert_eq!(
            (s.state, s.rate_limited, s.circuit_opens),
            (State::Healthy, 1, 0)
        );
    }

    #[test]
    fn back_off_without_retry_after_doubles_and_is_capped() {
        let (h, clock) = health();
        let p = h.policy().clone();
        for (i, expected) in [p.backoff, p.backoff * 2, p.backoff * 4].iter().enumerate() {
            h.failed(E, &status(429, None));
            clock.advance(*expected - Duration::from_millis(1));
            assert!(h.admit(E).is_err(), "rate limit {i}");
            clock.advance(Duration::from_millis(1));
            assert_eq!(h.admit(E), Ok(false), "rate limit {i}");
        }
        // An answer ends the streak.
        h.succeeded(E);
        h.failed(E, &status(429, None));
        clock.advance(p.backoff);
        assert_eq!(h.admit(E), Ok(false));
        // Retry-After beyond the cap is capped.
        h.failed(E, &status(429, Some(100_000)));
        clock.advance(p.max_backoff);
        assert_eq!(h.admit(E), Ok(false));
    }

    #[test]
    fn failures_in_a_row_open_the_circuit_and_a_probe_closes_it() {
        let (h, clock) = health();
        let p = h.policy().clone();
        h.failed(E, &status(502, None));
        h.failed(E, &status(500, None));
        // An answer (a 404) resets the count.
        h.failed(E, &status(404, None));
        h.failed(E, &status(502, None));
        h.failed(E, &status(503, None));
        assert_eq!(h.admit(E), Ok(false));
        h.failed(E, &status(504, None));
        let skip = h.admit(E).unwrap_err();
        assert_eq!(skip.state, State::Open);
        assert!(
            skip.why.contains("after 3 failures in a row"),
            "{}",
            skip.why
        );
        assert_eq!(h.snapshot()[0].circuit_opens, 1);
        // After the cool-down: one probe, the others skip.
        clock.advance(p.open_for);
        assert_eq!(h.admit(E), Ok(true));
        assert_eq!(h.admit(E).unwrap_err().state, State::HalfOpen);
        // The probe fails: open again, for twice as long.
        h.failed(E, &status(500, None));
        clock.advance(p.open_for);
        assert_eq!(h.admit(E).unwrap_err().state, State::Open);
        clock.advance(p.open_for);
        assert_eq!(h.admit(E), Ok(true));
        // A probe dropped without an outcome lets the next request probe.
        h.abandon_probe(E);
        assert_eq!(h.admit(E), Ok(true));
        h.succeeded(E);
        assert_eq!(h.admit(E), Ok(false));
        let s = &h.snapshot()[0];
        assert_eq!(
            (s.state, s.consecutive_failures, s.circuit_opens),
            (State::Healthy, 0, 2)
        );
        // Closed: the cool-down starts over at its first length.
        for _ in 0..3 {
            h.failed(E, &status(500, None));
        }
        clock.advance(p.open_for);
        assert_eq!(h.admit(E), Ok(true));
    }

    #[test]
    fn answers_and_local_failures_do_not_open_the_circuit() {
        let (h, _) = health();
        for _ in 0..10 {
            h.failed(E, &status(404, None));
            h.failed(E, &status(401, None));
            h.failed(
                E,
                &Error::Io {
                    what: "w".into(),
                    source: std::io::Error::other("disk full"),
                },
            );
        }
        assert_eq!(h.admit(E), Ok(false));
        assert!(h.snapshot().is_empty(), "nothing worth tracking");
    }

    #[test]
    fn a_503_with_retry_after_backs_off() {
        let (h, _) = health();
        h.failed(E, &status(503, Some(30)));
        assert_eq!(h.admit(E).unwrap_err().state, State::BackingOff);
    }

    struct Count(Mutex<(u32, u32)>);
    impl HealthEvents for Count {
        fn rate_limited(&self, _: &str, _: Duration) {
            self.0.lock().unwrap().0 += 1;
        }
        fn circuit_opened(&self, _: &str, _: Duration) {
            self.0.lock().unwrap().1 += 1;
        }
    }

    #[test]
    fn events_are_told() {
        let (h, _) = health();
        let count = Arc::new(Count(Mutex::new((0, 0))));
        h.observe(count.clone());
        h.failed(E, &status(429, None));
        for _ in 0..3 {
            h.failed("http://b/v2", &status(500, None));
        }
        assert_eq!(*count.0.lock().unwrap(), (1, 1));
    }
}
