//! The one walk of a plan (ARCHITECTURE.md, kagami-client): every operation that goes
//! through a [`Plan`] — the client's pulls and the mirror's upstream alike — tries the
//! plan's endpoint attempts as a [`Walk`] says, so that they all follow the same
//! fallback, retry and skip rule. An operation that needs nothing but the attempt calls
//! [`Walk::run`]; one that carries state from try to try (a blob written to a file)
//! drives the walk itself, in a plain loop (a closure borrowing that state mutably would
//! make the future not `Send`):
//!
//! ```text
//! let mut walk = Walk::new(plan, 0, health);
//! while let Some((_, a)) = walk.next_try() {
//!     match op(a).await {
//!         Ok(v) => {
//!             walk.succeeded();
//!             return Ok(v);
//!         }
//!         Err(e) => walk.failed(e)?,
//!     }
//! }
//! Err(walk.all_failed(what))
//! ```

use kagami_config::{Attempt, EndpointAttempt, Plan};

use crate::error::{AttemptError, Error};
use crate::health::Health;

/// The endpoint attempts of a plan, in order (the peers attempt is not this client's).
pub fn endpoint_attempts(plan: &Plan) -> impl Iterator<Item = &EndpointAttempt> {
    plan.attempts.iter().filter_map(|a| match a {
        Attempt::Endpoint(e) => Some(e),
        Attempt::Peers => None,
    })
}

/// A walk of the plan's endpoint attempts, in order. The rule:
///
/// - an endpoint that [`Health`] says to leave alone (backing off after a rate limit, or
///   its circuit open) is skipped, with the reason recorded as its failure
///   ([`Error::Skipped`]), and the walk moves on;
/// - any failure of an attempt moves on to the next one, and is told to [`Health`];
/// - a transient failure ([`Error::is_transient`]: a 5xx without `Retry-After`, or a
///   network error other than a timeout) of the last attempt is retried once, and only
///   that one (not when its endpoint is now to be left alone); a rate limit never is;
/// - a local failure ([`Error::Io`], e.g. writing the file a blob goes to) is nobody's
///   endpoint's fault: [`Walk::failed`] gives it back, to end the walk at once.
pub struct Walk<'p> {
    attempts: Vec<&'p EndpointAttempt>,
    health: Health,
    /// The number of the next attempt to try.
    next: usize,
    /// The last attempt is to be tried again; its failure, kept in case it is skipped.
    again: Option<Error>,
    retried: bool,
    /// The endpoint of the try in progress when it is a half-open circuit's probe.
    probe: Option<String>,
    errors: Vec<AttemptError>,
}

impl<'p> Walk<'p> {
    /// A walk from the attempt numbered `from` on (numbers count endpoint attempts only,
    /// as [`endpoint_attempts`] lists them), under `health`.
    pub fn new(plan: &'p Plan, from: usize, health: &Health) -> Walk<'p> {
        Walk {
            attempts: endpoint_attempts(plan).collect(),
            health: health.clone(),
            next: from,
            again: None,
            retried: false,
            probe: None,
            errors: Vec::new(),
        }
    }

    /// Runs `op` on each try until one succeeds; the error is [`Walk::all_failed`] about
    /// `what`, or a local failure.
    pub async fn run<T, F: Future<Output = Result<T, Error>>>(
        mut self,
        what: impl FnOnce() -> String,
        mut op: impl FnMut(usize, &'p EndpointAttempt) -> F,
    ) -> Result<T, Error> {
        while let Some((i, a)) = self.next_try() {
            match op(i, a).await {
                Ok(v) => {
                    self.succeeded();
                    return Ok(v);
                }
                Err(e) => self.failed(e)?,
            }
        }
        Err(self.all_failed(what()))
    }

    /// The next try: the attempt's number and the attempt; `None` when none is left.
    /// Attempts whose endpoint is to be left alone are skipped (and recorded).
    pub fn next_try(&mut self) -> Option<(usize, &'p EndpointAttempt)> {
        if let Some(error) = self.again.take() {
            let i = self.next - 1;
            let a = self.attempts[i];
            match self.admit(a) {
                Ok(()) => return Some((i, a)),
                // Its own failure says more than "skipped".
                Err(_) => self.errors.push(AttemptError {
                    endpoint: a.endpoint.base(),
                    error,
                }),
            }
        }
        loop {
            let a = *self.attempts.get(self.next)?;
            self.next += 1;
            match self.admit(a) {
                Ok(()) => return Some((self.next - 1, a)),
                Err(skip) => {
                    let endpoint = a.endpoint.base();
                    tracing::info!(%endpoint, reason = %skip, "attempt skipped");
                    self.errors.push(AttemptError {
                        endpoint: endpoint.clone(),
                        error: Error::Skipped { endpoint, skip },
                    });
                }
            }
        }
    }

    fn admit(&mut self, a: &EndpointAttempt) -> Result<(), crate::health::Skip> {
        let endpoint = a.endpoint.base();
        if self.health.admit(&endpoint)? {
            self.probe = Some(endpoint);
        }
        Ok(())
    }

    /// Notes that the last try [`Walk::next_try`] gave succeeded.
    pub fn succeeded(&mut self) {
        self.probe = None;
        if let Some(a) = self.next.checked_sub(1).and_then(|i| self.attempts.get(i)) {
            self.health.succeeded(&a.endpoint.base());
        }
    }

    /// Notes how the last try [`Walk::next_try`] gave failed. `Err`: a local failure, to
    /// be returned as it is.
    pub fn failed(&mut self, error: Error) -> Result<(), Error> {
        let a = self.attempts[self.next - 1];
        let endpoint = a.endpoint.base();
        if let Error::Io { .. } = error {
            if self.probe.take().is_some() {
                self.health.abandon_probe(&endpoint);
            }
            return Err(error);
        }
        self.probe = None;
        self.health.failed(&endpoint, &error);
        tracing::info!(%endpoint, %error, "attempt failed");
        if self.next == self.attempts.len() && !self.retried && error.is_transient() {
            self.retried = true;
            self.again = Some(error);
            return Ok(());
        }
        self.errors.push(AttemptError { endpoint, error });
        Ok(())
    }

    /// The error once every attempt failed or was skipped: [`Error::AllFailed`] about
    /// `what`, naming each attempt and its (last) failure.
    pub fn all_failed(mut self, what: String) -> Error {
        Error::AllFailed {
            what,
            attempts: std::mem::take(&mut self.errors),
        }
    }
}

impl Drop for Walk<'_> {
    /// A probe whose try never ended (its request was dropped) lets the next one probe.
    fn drop(&mut self) {
        if let Some(endpoint) = self.probe.take() {
            self.health.abandon_probe(&endpoint);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kagami_config::{Config, Reference};

    /// A plan of the peers, then one endpoint per host (the peers are not numbered).
    fn plan(hosts: &[&str]) -> Plan {
        let config = Config::embedded_default();
        let mut attempts = vec![Attempt::Peers];
        for h in hosts {
            attempts.push(Attempt::Endpoint(crate::push_target(
                &config, h, "team/app",
            )));
        }
        Plan {
            image: Reference::parse("r.example/team/app:1").unwrap(),
            attempts,
        }
    }

    fn status(s: u16) -> Error {
        Error::Status {
            url: "u".into(),
            status: s,
            body: None,
            retry_after: None,
        }
    }

    /// Runs a walk whose attempt `i` answers `answers[i]` in turn, and returns what it
    /// gave back with the calls made, as attempt numbers.
    fn run(
        hosts: &[&str],
        from: usize,
        answers: Vec<Vec<Result<u32, Error>>>,
    ) -> (Result<u32, Error>, Vec<usize>) {
        run_with(&Health::default(), hosts, from, answers)
    }

    fn run_with(
        health: &Health,
        hosts: &[&str],
        from: usize,
        mut answers: Vec<Vec<Result<u32, Error>>>,
    ) -> (Result<u32, Error>, Vec<usize>) {
        let p = plan(hosts);
        let mut calls = Vec::new();
        let mut walk = Walk::new(&p, from, health);
        while let Some((i, _)) = walk.next_try() {
            calls.push(i);
            match answers[i].remove(0) {
                Ok(v) => {
                    walk.succeeded();
                    return (Ok(v), calls);
                }
                Err(e) => {
                    if let Err(e) = walk.failed(e) {
                        return (Err(e), calls);
                    }
                }
            }
        }
        (Err(walk.all_failed("thing".into())), calls)
    }

    const TWO: [&str; 2] = ["a.example", "b.example"];

    #[test]
    fn moves_on_and_retries_the_last_attempt_once() {
        // A 5xx on the first attempt is not retried; on the last, once.
        let (r, calls) = run(
            &TWO,
            0,
            vec![vec![Err(status(503))], vec![Err(status(502)), Ok(7)]],
        );
        assert_eq!(r.unwrap(), 7);
        assert_eq!(calls, [0, 1, 1]);
        let (r, calls) = run(
            &TWO,
            0,
            vec![
                vec![Err(status(500))],
                vec![Err(status(503)), Err(status(503))],
            ],
        );
        assert_eq!(calls, [0, 1, 1]);
        match r.unwrap_err() {
            Error::AllFailed { what, attempts } => {
                assert_eq!(what, "thing");
                assert_eq!(attempts.len(), 2);
                assert_eq!(attempts[1].endpoint, "https://b.example/v2");
            }
            e => panic!("{e}"),
        }
    }

    #[test]
    fn only_transient_failures_are_retried() {
        for s in [404, 401, 429] {
            let (r, calls) = run(&TWO, 0, vec![vec![Err(status(503))], vec![Err(status(s))]]);
            assert!(r.is_err());
            assert_eq!(calls, [0, 1], "HTTP {s}");
        }
    }

    #[test]
    fn starts_from_the_attempt_asked_and_stops_on_local_failures() {
        let (r, calls) = run(&TWO, 1, vec![vec![], vec![Ok(3)]]);
        assert_eq!((r.unwrap(), calls), (3, vec![1]));
        let (r, calls) = run(&TWO, 2, vec![]);
        assert!(matches!(r, Err(Error::AllFailed { ref attempts, .. }) if attempts.is_empty()));
        assert!(calls.is_empty());
        let io = Error::Io {
            what: "writing".into(),
            source: std::io::Error::other("disk full"),
        };
        let (r, calls) = run(&TWO, 0, vec![vec![Err(io)], vec![Ok(1)]]);
        assert!(matches!(r, Err(Error::Io { .. })));
        assert_eq!(calls, [0]);
    }

    #[test]
    fn skips_endpoints_left_alone_and_says_why() {
        use crate::health::{HealthPolicy, ManualClock};
        use std::time::Duration;
        let clock = std::sync::Arc::new(ManualClock::default());
        let health = Health::with_clock(
            HealthPolicy {
                failures_to_open: 2,
                ..Default::default()
            },
            clock.clone(),
        );
        let limited = Error::Status {
            url: "u".into(),
            status: 429,
            body: None,
            retry_after: Some(Duration::from_secs(60)),
        };
        // A 429 of the last attempt is not retried; the endpoint is skipped afterwards.
        let (r, calls) = run_with(&health, &TWO, 0, vec![vec![Ok(1)], vec![]]);
        assert_eq!((r.unwrap(), calls), (1, vec![0]));
        let (r, calls) = run_with(&health, &TWO, 1, vec![vec![], vec![Err(limited)]]);
        assert!(r.is_err());
        assert_eq!(calls, [1]);
        let (r, calls) = run_with(&health, &TWO, 0, vec![vec![Ok(2)], vec![]]);
        assert_eq!((r.unwrap(), calls), (2, vec![0]));
        let (r, calls) = run_with(&health, &TWO, 0, vec![vec![Err(status(404))], vec![]]);
        assert_eq!(calls, [0]);
        let e = r.unwrap_err().to_string();
        assert!(
            e.contains(
                "2. https://b.example/v2: https://b.example/v2: skipped: rate limited until "
            ),
            "{e}"
        );
        // Every attempt left alone: no call at all, and the error says why.
        let (r, calls) = run_with(
            &health,
            &TWO,
            0,
            vec![vec![Err(status(502)), Err(status(502))], vec![]],
        );
        assert_eq!(calls, [0], "b is backing off");
        assert!(r.is_err());
        let (r, calls) = run_with(&health, &TWO, 0, vec![vec![Err(status(502))], vec![]]);
        assert_eq!(calls, [0]);
        assert!(r.is_err());
        let (r, calls) = run_with(&health, &TWO, 0, vec![vec![], vec![]]);
        assert!(calls.is_empty());
        let e = r.unwrap_err();
        assert!(e.all_skipped(), "{e}");
        let e = e.to_string();
        assert!(
            e.contains(
                "1. https://a.example/v2: https://a.example/v2: skipped: circuit open until"
            ),
            "{e}"
        );
        // Time passes: the back-off is over and a's probe closes its circuit.
        clock.advance(Duration::from_secs(60));
        let (r, calls) = run_with(&health, &TWO, 0, vec![vec![Ok(5)], vec![]]);
        assert_eq!((r.unwrap(), calls), (5, vec![0]));
        let (r, calls) = run_with(&health, &TWO, 0, vec![vec![Err(status(404))], vec![Ok(6)]]);
        assert_eq!((r.unwrap(), calls), (6, vec![0, 1]));
    }

    #[test]
    fn the_retry_of_the_last_attempt_is_skipped_once_its_circuit_opens() {
        use crate::health::HealthPolicy;
        let health = Health::new(HealthPolicy {
            failures_to_open: 1,
            ..Default::default()
        });
        let (r, calls) = run_with(&health, &["a.example"], 0, vec![vec![Err(status(503))]]);
        assert_eq!(calls, [0]);
        let e = r.unwrap_err().to_string();
        assert!(e.contains("HTTP 503"), "its own failure is reported: {e}");
    }
}
