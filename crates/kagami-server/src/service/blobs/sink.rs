//! The store side of a fetch: a writer task fed through a bounded queue, so that network
//! reception and file writes overlap. Every chunk received takes its bytes from the store's
//! memory budget (`--fetch-memory`) before it is queued, and keeps them until it leaves the
//! store's window: when the budget is short, the pump waits and reads nothing more from
//! its source.
//!
//! Received bytes are copied once into a few reused buffers ([`Slabs`]) on their way to the
//! store. The copy is cheaper than what it saves: a network chunk handed on as it is keeps
//! the HTTP client's read buffer alive in the store's window, so the client allocates a
//! fresh one for each read, and the allocator hands out (and later gives back) fresh pages,
//! one page fault per 4 KiB received (docs/BENCHMARKS.md, run H).

use super::*;

/// Small upstream chunks are gathered into batches of this size before the store.
pub(super) const WRITE_BATCH: usize = 256 * 1024;

/// Chunks queued between reception and the store writer.
pub(super) const QUEUE: usize = 16;

/// Size of the reused buffers a fetch copies received bytes into: each holds a few batches.
pub(super) const SLAB: usize = 512 * 1024;

/// Buffers a fetch keeps that no chunk uses any more, for reuse (the ones still in use are
/// in the store's window or queue, counted in the memory budget).
pub(super) const SPARE_SLABS: usize = 1;

/// Buffers a fetch keeps track of at most (in use or spare): enough for a full window and
/// queue. One past this is forgotten (freed when its last chunk is dropped).
const KEPT_SLABS: usize = 32;

/// The reused buffers of one fetch. `cur` holds the batch being gathered (its bytes) and
/// room after it; a batch leaves as a `Bytes` that shares `cur`'s allocation. A buffer is
/// reused only once every chunk cut from it has been dropped (`BytesMut::try_reclaim`), so
/// a reused buffer never overwrites bytes that a follower, the window or the writer still
/// holds.
pub(super) struct Slabs {
    cur: bytes::BytesMut,
    /// Buffers with chunks still in use, oldest first, and spare ones.
    others: std::collections::VecDeque<bytes::BytesMut>,
    /// Buffers allocated so far (for tests).
    pub(super) allocated: usize,
}

impl Slabs {
    pub(super) fn new() -> Slabs {
        Slabs {
            cur: bytes::BytesMut::new(),
            others: Default::default(),
            allocated: 0,
        }
    }

    /// The batch gathered so far.
    pub(super) fn batch_len(&self) -> usize {
        self.cur.len()
    }

    /// Drops the batch gathered so far (a pump cancelled between chunks).
    fn clear(&mut self) {
        self.cur.clear();
    }

    /// Whether `n` more bytes fit after the batch.
    fn fits(&self, n: usize) -> bool {
        self.cur.capacity() - self.cur.len() >= n
    }

    /// Appends `c` (at most [`SLAB`] bytes) to the batch; the caller has sent the batch
    /// first if `c` does not fit after it ([`Slabs::fits`]).
    pub(super) fn push(&mut self, c: &[u8]) {
        if !self.fits(c.len()) {
            debug_assert!(self.cur.is_empty(), "the batch is sent before a new buffer");
            self.next_buffer();
        }
        self.cur.extend_from_slice(c);
    }

    /// The batch, as one chunk sharing the buffer.
    pub(super) fn take_batch(&mut self) -> Bytes {
        self.cur.split().freeze()
    }

    /// Makes `cur` an empty buffer with [`SLAB`] bytes of room: `cur` itself or another one
    /// whose chunks have all been dropped, else a new one.
    fn next_buffer(&mut self) {
        if self.cur.try_reclaim(SLAB) {
            return;
        }
        let old = std::mem::take(&mut self.cur);
        if self.allocated > 0 {
            self.others.push_back(old);
        }
        if let Some(i) = self.others.iter_mut().position(|b| b.try_reclaim(SLAB)) {
            self.cur = self.others.remove(i).expect("an index found");
        } else {
            self.cur = bytes::BytesMut::with_capacity(SLAB);
            self.allocated += 1;
        }
        // Keep at most SPARE_SLABS buffers that nothing uses; those in use are kept only
        // to be reused later (dropping them frees them once their chunks are dropped).
        let mut spare = 0;
        self.others.retain_mut(|b| {
            if b.try_reclaim(SLAB) {
                spare += 1;
                spare <= SPARE_SLABS
            } else {
                true
            }
        });
        while self.others.len() > KEPT_SLABS {
            self.others.pop_front();
        }
    }
}

pub(super) enum Pump {
    /// Another node with a lower id is fetching the same blob from upstream.
    Yield(kagami_p2p::Peer),
    Done,
    UpstreamFailed,
    StoreFailed,
    /// Nobody follows the fetch and it is not worth finishing.
    Abandoned,
    /// The body went past where the blob must end (this many bytes).
    TooLarge(u64),
}

/// The store side of a fetch, on its own task: network reception and file writes overlap
/// (a bounded queue of chunks between them), so a fetch runs at the slower of the two
/// rather than at the sum of both. The writer takes whatever is queued in one go.
pub(super) struct StoreSink {
    pub(super) tx: Option<tokio::sync::mpsc::Sender<(Bytes, MemoryPermit)>>,
    store: Store,
    /// Buffers for the received bytes, kept across pumps (sources) of the fetch.
    pub(super) slabs: Slabs,
    /// Bytes handed to the store so far: the offset a resume continues from.
    pub(super) received: u64,
    pub(super) task:
        tokio::task::JoinHandle<(kagami_store::BlobWriter, Option<kagami_store::StoreError>)>,
}

impl StoreSink {
    pub(super) fn new(mut writer: kagami_store::BlobWriter, store: Store) -> StoreSink {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(Bytes, MemoryPermit)>(QUEUE);
        let task = tokio::spawn(async move {
            let mut queued = Vec::with_capacity(QUEUE);
            while rx.recv_many(&mut queued, QUEUE).await > 0 {
                let mut permit = MemoryPermit::empty();
                let chunks = queued
                    .drain(..)
                    .map(|(c, p)| {
                        permit.merge(p);
                        c
                    })
                    .collect();
                if let Err(e) = writer.write_reserved(chunks, permit).await {
                    return (writer, Some(e));
                }
            }
            (writer, None)
        });
        StoreSink {
            tx: Some(tx),
            store,
            slabs: Slabs::new(),
            received: 0,
            task,
        }
    }

    /// Room in the memory budget for `n` bytes received: at once when it has room, else
    /// after `batch` (whose bytes are taken already) has gone to the store, so that a
    /// waiting fetch holds nothing the store cannot give back.
    async fn reserve(&mut self, n: u64, batch: &mut MemoryPermit) -> Option<MemoryPermit> {
        if let Some(p) = self.store.try_reserve_memory(n) {
            return Some(p);
        }
        if self.slabs.batch_len() > 0 && !self.send_batch(batch).await {
            return None;
        }
        Some(self.store.reserve_memory(n).await)
    }

    /// Sends the batch gathered in `slabs` (whose room in the memory budget is `permit`).
    async fn send_batch(&mut self, permit: &mut MemoryPermit) -> bool {
        let full = self.slabs.take_batch();
        let permit = std::mem::replace(permit, MemoryPermit::empty());
        self.send(full, permit).await
    }

    /// False when the store side has stopped (a write failed).
    pub(super) async fn send(&mut self, chunk: Bytes, permit: MemoryPermit) -> bool {
        let n = chunk.len() as u64;
        match &self.tx {
            Some(tx) if tx.send((chunk, permit)).await.is_ok() => {
                self.received += n;
                true
            }
            _ => false,
        }
    }

    /// Waits for every queued chunk to be written; returns the writer and the write error,
    /// if one stopped it.
    pub(super) async fn finish(
        mut self,
    ) -> (kagami_store::BlobWriter, Option<kagami_store::StoreError>) {
        drop(self.tx.take());
        self.task
            .await
            .expect("the store writer task does not panic")
    }
}

/// Hands a body to the store sink: chunks are copied into the sink's reused buffers
/// ([`Slabs`]) and go to the store in batches of at least `WRITE_BATCH` bytes (or what a
/// buffer holds); a chunk larger than a buffer goes as it is. Each chunk takes its room in
/// the memory budget first (see [`StoreSink`]). A pump dropped between chunks drops the
/// batch it was gathering: `sink.received` counts only what went to the store.
pub(super) async fn pump(sink: &mut StoreSink, body: &mut BlobBody, cap: u64) -> Pump {
    sink.slabs.clear();
    let mut batch = MemoryPermit::empty();
    loop {
        let next = body.stream.next().await;
        let permit = match &next {
            Some(Ok(c)) => {
                let total = sink.received + sink.slabs.batch_len() as u64 + c.len() as u64;
                if total > cap {
                    return Pump::TooLarge(total);
                }
                match sink.reserve(c.len() as u64, &mut batch).await {
                    Some(p) => p,
                    None => return Pump::StoreFailed,
                }
            }
            _ => MemoryPermit::empty(),
        };
        let (end, failed) = match next {
            Some(Ok(c)) => {
                if !sink.slabs.fits(c.len())
                    && sink.slabs.batch_len() > 0
                    && !sink.send_batch(&mut batch).await
                {
                    return Pump::StoreFailed;
                }
                if c.len() > SLAB {
                    if !sink.send(c, permit).await {
                        return Pump::StoreFailed;
                    }
                    continue;
                }
                sink.slabs.push(&c);
                batch.merge(permit);
                (false, false)
            }
            Some(Err(_)) => (true, true),
            None => (true, false),
        };
        if (end || sink.slabs.batch_len() >= WRITE_BATCH)
            && sink.slabs.batch_len() > 0
            && !sink.send_batch(&mut batch).await
        {
            return Pump::StoreFailed;
        }
        if end {
            return if failed {
                Pump::UpstreamFailed
            } else {
                Pump::Done
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(len: usize, seed: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 + seed * 7) as u8).collect()
    }

    #[test]
    fn slabs_keep_held_chunks_intact_and_reuse_dropped_ones() {
        let mut slabs = Slabs::new();
        let mut held = Vec::new();
        // Batches of 3 chunks of 100 KiB: a buffer holds one batch and part of another.
        for n in 0..200 {
            let mut expected = Vec::new();
            for k in 0..3 {
                let c = pattern(100 * 1024, n * 3 + k);
                if !slabs.fits(c.len()) && slabs.batch_len() > 0 {
                    // A batch cut short; a pump sends it.
                    let early = slabs.take_batch();
                    assert_eq!(&early[..], &expected[..]);
                    expected.clear();
                }
                slabs.push(&c);
                expected.extend_from_slice(&c);
            }
            let batch = slabs.take_batch();
            assert_eq!(&batch[..], &expected[..], "batch {n}");
            // The first 20 batches stay in use (a window, followers); the rest are
            // dropped at once (written, sent).
            if n < 20 {
                held.push((batch, expected));
            }
        }
        for (n, (batch, expected)) in held.iter().enumerate() {
            assert_eq!(&batch[..], &expected[..], "held batch {n} was overwritten");
        }
        // One buffer per held batch or two, plus a few for the rest: not one per batch.
        assert!(
            slabs.allocated <= 2 * held.len() + 4,
            "{} buffers allocated for 200 batches",
            slabs.allocated
        );
    }

    #[test]
    fn a_cleared_batch_is_not_sent() {
        let mut slabs = Slabs::new();
        slabs.push(b"abc");
        slabs.clear();
        slabs.push(b"def");
        assert_eq!(&slabs.take_batch()[..], b"def");
        assert_eq!(slabs.batch_len(), 0);
    }
}
