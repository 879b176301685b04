//! The one walk of a plan (ARCHITECTURE.md, kagami-client): every operation that goes
//! through a [`Plan`] — the client's pulls and the mirror's upstream alike — tries the
//! plan's endpoint attempts as a [`Walk`] says, so that they all follow the same
//! fallback and retry rule. An operation that needs nothing but the attempt calls
//! [`Walk::run`]; one that carries state from try to try (a blob written to a file)
//! drives the walk itself, in a plain loop (a closure borrowing that state mutably would
//! make the future not `Send`):
//!
//! ```text
//! let mut walk = Walk::new(plan, 0);
//! while let Some((_, a)) = walk.next_try() {
//!     match op(a).await {
//!         Ok(v) => return Ok(v),
//!         Err(e) => walk.failed(e)?,
//!     }
//! }
//! Err(walk.all_failed(what))
//! ```

use kagami_config::{Attempt, EndpointAttempt, Plan};

use crate::error::{AttemptError, Error};

/// The endpoint attempts of a plan, in order (the peers attempt is not this client's).
pub fn endpoint_attempts(plan: &Plan) -> impl Iterator<Item = &EndpointAttempt> {
    plan.attempts.iter().filter_map(|a| match a {
        Attempt::Endpoint(e) => Some(e),
        Attempt::Peers => None,
    })
}

/// A walk of the plan's endpoint attempts, in order. The rule:
///
/// - any failure of an attempt moves on to the next one;
/// - a transient failure ([`Error::is_transient`]: a 5xx, or a network error other than
///   a timeout) of the last attempt is retried once, and only that one;
/// - a local failure ([`Error::Io`], e.g. writing the file a blob goes to) is nobody's
///   endpoint's fault: [`Walk::failed`] gives it back, to end the walk at once.
pub struct Walk<'p> {
    attempts: Vec<&'p EndpointAttempt>,
    /// The number of the next attempt to try.
    next: usize,
    /// The last attempt is to be tried again.
    again: bool,
    retried: bool,
    errors: Vec<AttemptError>,
}

impl<'p> Walk<'p> {
    /// A walk from the attempt numbered `from` on (numbers count endpoint attempts only,
    /// as [`endpoint_attempts`] lists them).
    pub fn new(plan: &'p Plan, from: usize) -> Walk<'p> {
        Walk {
            attempts: endpoint_attempts(plan).collect(),
            next: from,
            again: false,
            retried: false,
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
                Ok(v) => return Ok(v),
                Err(e) => self.failed(e)?,
            }
        }
        Err(self.all_failed(what()))
    }

    /// The next try: the attempt's number and the attempt; `None` when none is left.
    pub fn next_try(&mut self) -> Option<(usize, &'p EndpointAttempt)> {
        if std::mem::take(&mut self.again) {
            let i = self.next - 1;
            return Some((i, self.attempts[i]));
        }
        let a = *self.attempts.get(self.next)?;
        self.next += 1;
        Some((self.next - 1, a))
    }

    /// Notes how the last try [`Walk::next_try`] gave failed. `Err`: a local failure, to
    /// be returned as it is.
    pub fn failed(&mut self, error: Error) -> Result<(), Error> {
        if let Error::Io { .. } = error {
            return Err(error);
        }
        let a = self.attempts[self.next - 1];
        tracing::info!(endpoint = %a.endpoint, %error, "attempt failed");
        if self.next == self.attempts.len() && !self.retried && error.is_transient() {
            self.retried = true;
            self.again = true;
            return Ok(());
        }
        self.errors.push(AttemptError {
            endpoint: a.endpoint.base(),
            error,
        });
        Ok(())
    }

    /// The error once every attempt failed: [`Error::AllFailed`] about `what`, naming each
    /// attempt and its (last) failure.
    pub fn all_failed(self, what: String) -> Error {
        Error::AllFailed {
            what,
            attempts: self.errors,
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
        }
    }

    /// Runs a walk whose attempt `i` answers `answers[i]` in turn, and returns what it
    /// gave back with the calls made, as attempt numbers.
    fn run(
        hosts: &[&str],
        from: usize,
        mut answers: Vec<Vec<Result<u32, Error>>>,
    ) -> (Result<u32, Error>, Vec<usize>) {
        let p = plan(hosts);
        let mut calls = Vec::new();
        let mut walk = Walk::new(&p, from);
        while let Some((i, _)) = walk.next_try() {
            calls.push(i);
            match answers[i].remove(0) {
                Ok(v) => return (Ok(v), calls),
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
}
