//! One memory budget for every write in flight: the bytes of blob data received and not yet
//! out of a write's window (see `blob.rs`) are taken from it, chunk by chunk, and given back
//! when the chunk leaves the window.
//!
//! When the budget is short, whoever needs room first makes every window give up the
//! chunks it keeps that are already on disk (their followers read them from the temp file
//! instead), and then waits: a fetch that waits here reads nothing more from its source,
//! so the network pushes back instead of memory growing. Chunks not yet on disk are on
//! their way there (the writer never waits on the budget), so every byte taken is given
//! back in bounded time and a waiter always gets its turn.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use tokio::sync::Notify;

use crate::blob::Shared;

/// The budget. `limit` is `u64::MAX` when the store has none.
pub(crate) struct Memory {
    limit: AtomicU64,
    used: Mutex<u64>,
    /// The most ever taken at once, for tests and benchmarks.
    peak: AtomicU64,
    /// Reservations waiting for room: while any waits, windows keep nothing already on disk.
    waiters: AtomicUsize,
    released: Notify,
    /// The writes whose windows hold chunks (weak: a finished write just drops out).
    windows: Mutex<Vec<Weak<Shared>>>,
}

/// Room taken in the store's memory budget; given back when dropped.
pub struct MemoryPermit {
    memory: Option<Arc<Memory>>,
    bytes: u64,
}

impl std::fmt::Debug for MemoryPermit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("MemoryPermit").field(&self.bytes).finish()
    }
}

impl MemoryPermit {
    /// Bytes this permit holds.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Moves up to `n` bytes of this permit into a new one.
    pub fn split(&mut self, n: u64) -> MemoryPermit {
        let n = n.min(self.bytes);
        self.bytes -= n;
        MemoryPermit {
            memory: self.memory.clone(),
            bytes: n,
        }
    }

    /// Adds `other`'s bytes to this permit (both from the same store).
    pub fn merge(&mut self, mut other: MemoryPermit) {
        if self.memory.is_none() {
            self.memory = other.memory.take();
        }
        self.bytes += std::mem::take(&mut other.bytes);
    }

    /// A permit holding nothing.
    pub fn empty() -> MemoryPermit {
        MemoryPermit {
            memory: None,
            bytes: 0,
        }
    }
}

impl Drop for MemoryPermit {
    fn drop(&mut self) {
        if let Some(m) = &self.memory
            && self.bytes > 0
        {
            m.release(self.bytes);
        }
    }
}

/// Counts one reservation waiting for room while it lives.
struct Waiting<'a>(&'a Memory);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiters.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Memory {
    pub(crate) fn new(limit: Option<u64>) -> Memory {
        Memory {
            limit: AtomicU64::new(limit.unwrap_or(u64::MAX).max(1)),
            used: Mutex::new(0),
            peak: AtomicU64::new(0),
            waiters: AtomicUsize::new(0),
            released: Notify::new(),
            windows: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn limit(&self) -> Option<u64> {
        let l = self.limit.load(Ordering::SeqCst);
        (l != u64::MAX).then_some(l)
    }

    pub(crate) fn set_limit(&self, limit: Option<u64>) {
        let l = limit.unwrap_or(u64::MAX).max(1);
        self.limit.store(l, Ordering::SeqCst);
        self.released.notify_waiters();
    }

    pub(crate) fn used(&self) -> u64 {
        *self.used.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn peak(&self) -> u64 {
        self.peak.load(Ordering::SeqCst)
    }

    /// True while a reservation waits for room.
    pub(crate) fn short(&self) -> bool {
        self.waiters.load(Ordering::SeqCst) > 0
    }

    /// Takes `n` bytes if they fit (a reservation larger than the whole budget fits when
    /// nothing else is taken, so that it cannot wait for ever).
    fn try_take(&self, n: u64) -> bool {
        let mut used = self.used.lock().unwrap_or_else(PoisonError::into_inner);
        if *used == 0 || used.saturating_add(n) <= self.limit.load(Ordering::SeqCst) {
            *used += n;
            self.peak.fetch_max(*used, Ordering::SeqCst);
            true
        } else {
            false
        }
    }

    fn release(&self, n: u64) {
        {
            let mut used = self.used.lock().unwrap_or_else(PoisonError::into_inner);
            *used = used.saturating_sub(n);
        }
        self.released.notify_waiters();
    }

    /// Registers a write whose window will hold chunks (see [`Memory::reclaim`]).
    pub(crate) fn register(&self, shared: &Arc<Shared>) {
        let mut w = self.windows.lock().unwrap_or_else(PoisonError::into_inner);
        w.retain(|s| s.strong_count() > 0);
        w.push(Arc::downgrade(shared));
    }

    /// Makes every window give up the chunks it keeps that are already on disk.
    fn reclaim(&self) {
        let windows: Vec<Arc<Shared>> = self
            .windows
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for s in windows {
            s.drop_persisted();
        }
    }

    /// Takes `n` bytes if they fit now.
    pub(crate) fn try_reserve(self: &Arc<Self>, n: u64) -> Option<MemoryPermit> {
        (n == 0 || self.try_take(n)).then(|| MemoryPermit {
            memory: Some(self.clone()),
            bytes: n,
        })
    }

    /// Takes `n` bytes, waiting for room (and making windows give up what is on disk)
    /// while the budget is short.
    pub(crate) async fn reserve(self: &Arc<Self>, n: u64) -> MemoryPermit {
        let permit = || MemoryPermit {
            memory: Some(self.clone()),
            bytes: n,
        };
        if n == 0 || self.try_take(n) {
            return permit();
        }
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(self);
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            self.reclaim();
            if self.try_take(n) {
                return permit();
            }
            released.await;
        }
    }
}
