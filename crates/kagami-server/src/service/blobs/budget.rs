//! The fetch budget: how many fetches (and pass-throughs) run at once and the memory they
//! reserve, each a fair (FIFO) semaphore; `503` with `Retry-After` when it stays full.

use super::*;

/// The fetch budget: a count and memory (in KiB), each a fair (FIFO) semaphore.
pub struct Budget {
    pub(super) count: Arc<Semaphore>,
    pub(super) kib: Arc<Semaphore>,
    pub(super) total_kib: u32,
}

/// Room taken in the [`Budget`] by one fetch or pass-through, given back on drop.
pub struct Permit {
    pub(super) _count: OwnedSemaphorePermit,
    pub(super) _kib: OwnedSemaphorePermit,
    pub(super) bytes: u64,
    pub(super) gauge: prometheus_client::metrics::gauge::Gauge,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.gauge.dec_by(self.bytes as i64);
    }
}

impl Budget {
    pub fn new(limits: &FetchLimits) -> Budget {
        let total_kib = (limits.fetch_memory / 1024).clamp(1, u32::MAX as u64) as u32;
        Budget {
            count: Arc::new(Semaphore::new(limits.max_fetches.max(1))),
            kib: Arc::new(Semaphore::new(total_kib as usize)),
            total_kib,
        }
    }

    /// Waits up to `wait` for room for one fetch holding up to `bytes` of memory.
    pub(super) async fn acquire(
        &self,
        telemetry: &Telemetry,
        bytes: u64,
        wait: Duration,
    ) -> Option<Permit> {
        let kib = bytes.div_ceil(1024).clamp(1, self.total_kib as u64) as u32;
        let take = async {
            let count = self.count.clone().acquire_owned().await.ok()?;
            let kib = self.kib.clone().acquire_many_owned(kib).await.ok()?;
            Some((count, kib))
        };
        let (count, kib_permit) = tokio::time::timeout(wait, take).await.ok()??;
        let gauge = telemetry.metrics.fetch_memory.clone();
        let bytes = kib as u64 * 1024;
        gauge.inc_by(bytes as i64);
        Some(Permit {
            _count: count,
            _kib: kib_permit,
            bytes,
            gauge,
        })
    }
}

/// The answer when the fetch budget stays full: containerd moves on to its next host (the
/// registry itself, unless the default endpoint is disabled) and kagami stays within its
/// memory.
pub(super) fn busy(limits: &FetchLimits) -> ApiError {
    let mut e = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "TOOMANYREQUESTS",
        format!(
            "kagami is already fetching as many blobs as it may ({} at once, {} MiB of memory: --max-fetches, --fetch-memory); retry later",
            limits.max_fetches,
            limits.fetch_memory / (1024 * 1024)
        ),
    )
    .refused("busy");
    e.retry_after = Some(5);
    e
}
