//! The fetch budget: how many fetches (and pass-throughs) run at once, a fair (FIFO)
//! semaphore; `503` with `Retry-After` when it stays full. Their memory is the store's
//! memory budget (`--fetch-memory`), taken chunk by chunk as they receive (see `sink.rs`):
//! a fetch short of memory waits rather than being refused.

use super::*;

/// The fetch budget's count.
pub struct Budget {
    pub(super) count: Arc<Semaphore>,
}

/// Room taken in the [`Budget`] by one fetch or pass-through, given back on drop.
pub struct Permit {
    pub(super) _count: OwnedSemaphorePermit,
}

impl Budget {
    pub fn new(limits: &FetchLimits) -> Budget {
        Budget {
            count: Arc::new(Semaphore::new(limits.max_fetches.max(1))),
        }
    }

    /// Waits up to `wait` for room for one fetch.
    pub(super) async fn acquire(&self, wait: Duration) -> Option<Permit> {
        let count = tokio::time::timeout(wait, self.count.clone().acquire_owned())
            .await
            .ok()?
            .ok()?;
        Some(Permit { _count: count })
    }
}

/// The answer when the fetch budget stays full: containerd moves on to its next host (the
/// registry itself, unless the default endpoint is disabled) and kagami stays within its
/// bounds.
pub(super) fn busy(limits: &FetchLimits) -> ApiError {
    let mut e = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "TOOMANYREQUESTS",
        format!(
            "kagami is already fetching as many blobs as it may ({} at once: --max-fetches); retry later",
            limits.max_fetches,
        ),
    )
    .refused("busy");
    e.retry_after = Some(5);
    e
}
