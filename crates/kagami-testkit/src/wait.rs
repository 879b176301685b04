//! Bounded waits: every wait in the tests goes through these, so every wait has a deadline
//! and a timeout names what was awaited.

use std::fmt::Display;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

/// What a check of [`eventually`] answers: `true`/`Some(value)`/`Ok(value)` when the wait is
/// over; `false`/`None`/`Err(state)` to poll again. The last `Err` (what was seen instead)
/// goes into the timeout's panic message.
pub trait Outcome {
    type Value;
    fn ready(self) -> Result<Self::Value, String>;
}

impl Outcome for bool {
    type Value = ();
    fn ready(self) -> Result<(), String> {
        if self { Ok(()) } else { Err(String::new()) }
    }
}

impl<T> Outcome for Option<T> {
    type Value = T;
    fn ready(self) -> Result<T, String> {
        self.ok_or_else(String::new)
    }
}

impl<T, E: Display> Outcome for Result<T, E> {
    type Value = T;
    fn ready(self) -> Result<T, String> {
        self.map_err(|e| e.to_string())
    }
}

/// How often a wait of `within` polls: a hundredth of it, between 20 and 100 ms.
fn poll_interval(within: Duration) -> Duration {
    (within / 100).clamp(Duration::from_millis(20), Duration::from_millis(100))
}

/// The value of a ready poll; `None` to poll again; a panic naming `what` (and what was
/// seen instead) past the deadline.
fn verdict<O: Outcome>(
    outcome: O,
    deadline: Instant,
    within: Duration,
    what: &dyn Display,
) -> Option<O::Value> {
    match outcome.ready() {
        Ok(value) => Some(value),
        Err(last) if Instant::now() >= deadline => {
            if last.is_empty() {
                panic!("timed out after {within:?} waiting for {what}");
            }
            panic!("timed out after {within:?} waiting for {what}; last seen:\n{last}");
        }
        Err(_) => None,
    }
}

/// Polls `check` (async) until it is ready, and returns its value; panics naming `what`
/// (and the last state `check` reported) when `within` has passed.
pub async fn eventually<O: Outcome>(
    within: Duration,
    what: impl Display,
    mut check: impl AsyncFnMut() -> O,
) -> O::Value {
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = verdict(check().await, deadline, within, &what) {
            return value;
        }
        tokio::time::sleep(poll_interval(within)).await;
    }
}

/// [`eventually`] for blocking tests: the same, sleeping the thread between polls.
pub fn eventually_sync<O: Outcome>(
    within: Duration,
    what: impl Display,
    mut check: impl FnMut() -> O,
) -> O::Value {
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = verdict(check(), deadline, within, &what) {
            return value;
        }
        std::thread::sleep(poll_interval(within));
    }
}

/// Asserts that `check` holds at every poll for `during` (for "nothing ever shows up").
pub async fn always(during: Duration, what: impl Display, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + during;
    while Instant::now() < deadline {
        assert!(check().await, "{what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// True when `cond` held within `within`; never panics (for `Drop`, which must not).
pub fn held_within(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(poll_interval(within));
    }
}

/// Waits (bounded) for `child` to exit; kills it (by PID) and returns `None` when it has not
/// within `within`.
pub fn wait_child(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    let mut status = None;
    held_within(within, || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eventually_sync_returns_the_value_once_ready() {
        let mut polls = 0;
        let got = eventually_sync(Duration::from_secs(5), "the third poll", || {
            polls += 1;
            (polls == 3).then_some(polls * 10)
        });
        assert_eq!(got, 30);
    }

    #[test]
    #[should_panic(expected = "waiting for the answer; last seen:\n2 of 5")]
    fn a_timeout_names_what_was_awaited_and_what_was_seen() {
        eventually_sync(Duration::from_millis(100), "the answer", || {
            Err::<(), _>("2 of 5")
        });
    }

    #[tokio::test]
    async fn eventually_polls_an_async_check() {
        let start = Instant::now();
        eventually(Duration::from_secs(5), "200 ms to pass", async || {
            start.elapsed() >= Duration::from_millis(200)
        })
        .await;
    }

    #[test]
    fn wait_child_kills_a_child_past_its_limit() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        assert!(wait_child(&mut child, Duration::from_millis(200)).is_none());
        // Killed and reaped: it has a status now.
        assert!(child.try_wait().unwrap().is_some());
        let mut quick = std::process::Command::new("true").spawn().unwrap();
        assert!(wait_child(&mut quick, Duration::from_secs(10)).is_some_and(|s| s.success()));
    }
}
