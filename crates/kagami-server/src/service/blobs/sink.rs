//! The store side of a fetch: a writer task fed through a bounded queue, so that network
//! reception and file writes overlap. Every chunk received takes its bytes from the store's
//! memory budget (`--fetch-memory`) before it is queued, and keeps them until it leaves the
//! store's window: when the budget is short, the pump waits and reads nothing more from
//! its source.

use super::*;

/// Small upstream chunks are gathered into batches of this size before the store.
pub(super) const WRITE_BATCH: usize = 256 * 1024;

/// Chunks queued between reception and the store writer.
pub(super) const QUEUE: usize = 16;

/// A batch started this long ago goes to the store even when not full, so that followers
/// (a client, or other nodes streaming the blob in flight from this one, each adding its
/// own hop) see bytes this soon after they arrive when the source is slow: at 10 MB/s a
/// full batch would take 26 ms to gather at each hop of a chain of nodes.
pub(super) const BATCH_DELAY: Duration = Duration::from_millis(5);

/// Room a fetch takes in the memory budget before it reads from its source: the largest
/// chunk one read of the upstream connection returns (hyper's default read buffer limit,
/// 8 KiB + 400 KiB, which reqwest does not let us lower). The chunk received is then
/// counted from the moment it exists, and a fetch that waits for room waits before
/// reading, holding no chunk the budget does not count. With a budget under 8 times this,
/// an eighth of the budget (see [`read_ahead`]).
pub(super) const READ_AHEAD: u64 = 8192 + 4096 * 100;

/// The room taken before each read: [`READ_AHEAD`], or an eighth of a smaller budget, so
/// that a small `--fetch-memory` still lets 8 fetches read at once (a larger chunk then
/// takes the rest of its room when it arrives).
fn read_ahead(store: &Store) -> u64 {
    store
        .memory_limit()
        .map_or(READ_AHEAD, |l| (l / 8).clamp(1, READ_AHEAD))
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
            received: 0,
            task,
        }
    }

    /// Room in the memory budget for `n` bytes received: at once when it has room, else
    /// after `batch` (whose bytes are taken already) has gone to the store, so that a
    /// waiting fetch holds nothing the store cannot give back.
    async fn reserve(&mut self, n: u64, batch: &mut Batch) -> Option<MemoryPermit> {
        if let Some(p) = self.store.try_reserve_memory(n) {
            return Some(p);
        }
        if !batch.bytes.is_empty() && !self.send_batch(batch).await {
            return None;
        }
        Some(self.store.reserve_memory(n).await)
    }

    /// Tops `credit` up to `n` bytes: at once when the budget has room, else after giving
    /// back what it holds, so that no fetch waits while holding room (fetches waiting with
    /// part of their room could hold the whole budget between them).
    async fn top_up(&mut self, credit: &mut MemoryPermit, n: u64, batch: &mut Batch) -> bool {
        if credit.bytes() >= n {
            return true;
        }
        if let Some(p) = self.store.try_reserve_memory(n - credit.bytes()) {
            credit.merge(p);
            return true;
        }
        *credit = MemoryPermit::empty();
        match self.reserve(n, batch).await {
            Some(p) => {
                *credit = p;
                true
            }
            None => false,
        }
    }

    async fn send_batch(&mut self, batch: &mut Batch) -> bool {
        let full = batch.bytes.split().freeze();
        let permit = std::mem::replace(&mut batch.permit, MemoryPermit::empty());
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

/// Small chunks gathered for the store, and their room in the memory budget.
pub(super) struct Batch {
    bytes: bytes::BytesMut,
    permit: MemoryPermit,
}

/// Hands a body to the store sink. Large network chunks go as they are (no copy); small
/// ones (TLS records are 16 KiB) are gathered into batches of up to `WRITE_BATCH` bytes.
/// Each chunk takes its room in the memory budget first (see [`StoreSink`]).
pub(super) async fn pump(sink: &mut StoreSink, body: &mut BlobBody, cap: u64) -> Pump {
    let mut batch = Batch {
        bytes: bytes::BytesMut::new(),
        permit: MemoryPermit::empty(),
    };
    // Room taken ahead of the next read (see READ_AHEAD).
    let ahead = read_ahead(&sink.store);
    let mut credit = MemoryPermit::empty();
    let mut started = tokio::time::Instant::now();
    loop {
        if !sink.top_up(&mut credit, ahead, &mut batch).await {
            return Pump::StoreFailed;
        }
        let next = if batch.bytes.is_empty() {
            let next = body.stream.next().await;
            started = tokio::time::Instant::now();
            next
        } else {
            match tokio::time::timeout_at(started + BATCH_DELAY, body.stream.next()).await {
                Ok(next) => next,
                Err(_) => {
                    // A slow source: what is gathered goes now (polling a stream's
                    // `next` again after a timeout loses nothing).
                    if !sink.send_batch(&mut batch).await {
                        return Pump::StoreFailed;
                    }
                    continue;
                }
            }
        };
        let permit = match &next {
            Some(Ok(c)) => {
                let total = sink.received + batch.bytes.len() as u64 + c.len() as u64;
                if total > cap {
                    return Pump::TooLarge(total);
                }
                let n = c.len() as u64;
                if !sink.top_up(&mut credit, n, &mut batch).await {
                    return Pump::StoreFailed;
                }
                credit.split(n)
            }
            _ => MemoryPermit::empty(),
        };
        let (end, failed) = match next {
            Some(Ok(c)) if c.len() >= WRITE_BATCH / 4 && batch.bytes.is_empty() => {
                if !sink.send(c, permit).await {
                    return Pump::StoreFailed;
                }
                continue;
            }
            Some(Ok(c)) => {
                batch.bytes.extend_from_slice(&c);
                batch.permit.merge(permit);
                (false, false)
            }
            Some(Err(_)) => (true, true),
            None => (true, false),
        };
        if (end || batch.bytes.len() >= WRITE_BATCH)
            && !batch.bytes.is_empty()
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
