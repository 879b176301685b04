//! The store side of a fetch: a writer task fed through a bounded queue, so that network
//! reception and file writes overlap.

use super::*;

/// Small upstream chunks are gathered into batches of this size before the store.
pub(super) const WRITE_BATCH: usize = 256 * 1024;

/// Chunks queued between reception and the store writer.
pub(super) const QUEUE: usize = 16;

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
    pub(super) tx: Option<tokio::sync::mpsc::Sender<bytes::Bytes>>,
    /// Bytes handed to the store so far: the offset a resume continues from.
    pub(super) received: u64,
    pub(super) task:
        tokio::task::JoinHandle<(kagami_store::BlobWriter, Option<kagami_store::StoreError>)>,
}

impl StoreSink {
    pub(super) fn new(mut writer: kagami_store::BlobWriter) -> StoreSink {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(QUEUE);
        let task = tokio::spawn(async move {
            let mut chunks = Vec::with_capacity(QUEUE);
            while rx.recv_many(&mut chunks, QUEUE).await > 0 {
                if let Err(e) = writer.write_chunks(std::mem::take(&mut chunks)).await {
                    return (writer, Some(e));
                }
            }
            (writer, None)
        });
        StoreSink {
            tx: Some(tx),
            received: 0,
            task,
        }
    }

    /// False when the store side has stopped (a write failed).
    pub(super) async fn send(&mut self, chunk: bytes::Bytes) -> bool {
        let n = chunk.len() as u64;
        match &self.tx {
            Some(tx) if tx.send(chunk).await.is_ok() => {
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

/// Hands a body to the store sink. Large network chunks go as they are (no copy); small
/// ones (TLS records are 16 KiB) are gathered into batches of up to `WRITE_BATCH` bytes.
pub(super) async fn pump(sink: &mut StoreSink, body: &mut BlobBody, cap: u64) -> Pump {
    let mut batch = bytes::BytesMut::new();
    loop {
        let next = body.stream.next().await;
        if let Some(Ok(c)) = &next {
            let total = sink.received + batch.len() as u64 + c.len() as u64;
            if total > cap {
                return Pump::TooLarge(total);
            }
        }
        let (end, failed) = match next {
            Some(Ok(c)) if c.len() >= WRITE_BATCH / 4 && batch.is_empty() => {
                if !sink.send(c).await {
                    return Pump::StoreFailed;
                }
                continue;
            }
            Some(Ok(c)) => {
                batch.extend_from_slice(&c);
                (false, false)
            }
            Some(Err(_)) => (true, true),
            None => (true, false),
        };
        if (end || batch.len() >= WRITE_BATCH) && !batch.is_empty() {
            let full = batch.split().freeze();
            if !sink.send(full).await {
                return Pump::StoreFailed;
            }
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
