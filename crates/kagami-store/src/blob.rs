//! Writing blobs, sharing a write in flight with its followers, and reading blobs back.
//!
//! A write goes to a temp file under `tmp/`. Each chunk is published to followers as soon as
//! the writer has it, before it reaches the file: followers take recent chunks from a small
//! in-memory window (shared `Bytes`, no copy) and only a follower that has fallen behind the
//! window reads the file (positional reads on one shared descriptor, so the rename at commit
//! does not disturb them). The file write and the hashing of a chunk run on a blocking
//! thread while the next chunk arrives. The last byte received is held back until the
//! digest has been verified, and the window never drops a chunk before it is on disk.
//!
//! Every chunk in a window holds its bytes in the store's memory budget (`memory.rs`), from
//! before the writer receives it until it leaves the window. While the budget is short,
//! windows keep nothing that is already on disk: followers read the file, and the writer's
//! caller waits for room before it takes more from its source.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use futures_util::Stream;
use kagami_config::Digest;
use kagami_config::oci::Hasher;
use tokio::sync::watch;

use crate::memory::MemoryPermit;
use crate::{Inner, StoreError, StoreEvent};

/// Size of the chunks a follower's stream yields when it reads the file.
pub const CHUNK: usize = 128 * 1024;

/// Bytes already on disk that a write keeps in memory for followers a little behind it, when
/// the store's memory budget is not short (then it keeps none). Chunks not yet on disk stay
/// in the window whatever its size; the writer writes one batch (one `write_chunks` call) at
/// a time, so a window holds at most this plus one batch.
pub const WINDOW: usize = 4 * 1024 * 1024;

/// A complete blob opened for reading. The blob cannot be evicted while this handle lives.
#[derive(Debug)]
pub struct BlobHandle {
    pub size: u64,
    pub file: tokio::fs::File,
    pub(crate) _pin: Pin,
}

impl BlobHandle {
    /// `len` bytes from `offset`, in chunks of at most `chunk` bytes. Each chunk is read
    /// (positionally, on a blocking thread) into a buffer of its own only when the stream is
    /// polled: nothing is read ahead and no buffer is kept between reads, so a response
    /// sent slowly holds only the chunk it is sending. The blob stays pinned while the
    /// stream lives. A blob shorter than the range ends with an `UnexpectedEof` error.
    pub fn into_stream(
        self,
        offset: u64,
        len: u64,
        chunk: usize,
    ) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
        let BlobHandle { file, _pin, .. } = self;
        // No operation is in flight on a handle just opened, so this does not fail.
        let file = file.try_into_std().map(Arc::new);
        let chunk = chunk.max(1) as u64;
        let end = offset.saturating_add(len);
        futures_util::stream::unfold(
            (file, offset, _pin, false),
            move |(file, pos, pin, failed)| async move {
                if pos >= end || failed {
                    return None;
                }
                let f = match &file {
                    Ok(f) => f.clone(),
                    Err(_) => {
                        let e = io::Error::other("blob file busy");
                        return Some((Err(e), (file, pos, pin, true)));
                    }
                };
                let n = (end - pos).min(chunk) as usize;
                // Allocated here, on a runtime thread, not on the blocking thread: see
                // `read_buffer`.
                let mut buf = read_buffer(n);
                let r = tokio::task::spawn_blocking(move || {
                    buf.resize(n, 0);
                    f.read_exact_at(&mut buf, pos).map(|()| Bytes::from(buf))
                })
                .await
                .unwrap_or_else(|e| Err(io::Error::other(e)));
                let failed = r.is_err();
                Some((r, (file, pos + n as u64, pin, failed)))
            },
        )
    }
}

/// The buffer of one read of a stored or in-flight blob, taken on the runtime thread that
/// asks (and filled on a blocking thread): glibc gives each thread that allocates an arena
/// of its own and keeps what is freed in it, so buffers allocated on tokio's many blocking
/// threads would spread over up to 8 arenas per core, each keeping its own free memory.
fn read_buffer(n: usize) -> Vec<u8> {
    Vec::with_capacity(n)
}

/// Keeps a complete blob from being evicted; released on drop.
pub(crate) struct Pin {
    pub(crate) inner: Arc<Inner>,
    pub(crate) digest: Digest,
}

impl std::fmt::Debug for Pin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Pin").field(&self.digest).finish()
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut st = self.inner.state();
        if let Some(e) = st.blobs.get_mut(&self.digest) {
            e.pins = e.pins.saturating_sub(1);
        }
    }
}

/// Where a write stands. `written` is the size once `Committed`.
#[derive(Debug, Clone)]
pub(crate) struct Progress {
    /// Bytes the writer has received (in the window or on disk).
    pub written: u64,
    pub phase: Phase,
}

/// The newest chunks of a write, in order and contiguous: they cover `[start, written)`,
/// where `start` is the offset of the first chunk; every byte before `start` is on disk.
#[derive(Default)]
pub(crate) struct Window {
    chunks: std::collections::VecDeque<(u64, Bytes, MemoryPermit)>,
    /// Bytes on disk, from offset 0.
    persisted: u64,
    /// Total length of `chunks`.
    bytes: usize,
}

impl Window {
    fn push(&mut self, offset: u64, chunk: Bytes, permit: MemoryPermit) {
        self.bytes += chunk.len();
        self.chunks.push_back((offset, chunk, permit));
    }

    /// Records `[.., end)` as on disk and drops the oldest chunks that are on disk while the
    /// window holds more than [`WINDOW`] bytes without them (or all of them, when `short`:
    /// the memory budget is short).
    fn persisted(&mut self, end: u64, short: bool) {
        self.persisted = end;
        self.trim(if short { 0 } else { WINDOW });
    }

    /// Drops the oldest chunks that are on disk while the window holds more than `keep`
    /// bytes without them.
    fn trim(&mut self, keep: usize) {
        while let Some((off, c, _)) = self.chunks.front() {
            let on_disk = off + c.len() as u64 <= self.persisted;
            if !on_disk || self.bytes - c.len() < keep {
                break;
            }
            self.bytes -= c.len();
            self.chunks.pop_front();
        }
    }

    /// Up to `max` bytes at `pos` from memory, or `None` when `pos` is before the window.
    fn get(&self, pos: u64, max: u64) -> Option<Bytes> {
        let first = self.chunks.front()?.0;
        if pos < first {
            return None;
        }
        let i = self.chunks.partition_point(|(off, _, _)| *off <= pos) - 1;
        let (off, c, _) = &self.chunks[i];
        let from = (pos - off) as usize;
        if from >= c.len() {
            return None;
        }
        let to = (from as u64 + max).min(c.len() as u64) as usize;
        Some(c.slice(from..to))
    }
}

#[derive(Debug, Clone)]
pub(crate) enum Phase {
    Writing,
    /// Digest and size verified; fsync and rename still to come. Followers may read
    /// everything: the bytes are known good, durability is the store's own business.
    Verified,
    /// Verified and renamed into `blobs/`.
    Committed,
    /// Mismatch, write error or abandoned writer: followers end with this message.
    Failed(Arc<str>),
}

/// The state of one write, shared by its writer and followers.
pub(crate) struct Shared {
    pub digest: Digest,
    pub expected_size: Option<u64>,
    pub tmp_path: PathBuf,
    pub final_path: PathBuf,
    /// The temp file, opened read-write; set before any progress is published.
    pub file: OnceLock<Arc<File>>,
    pub tx: watch::Sender<Progress>,
    /// Once committed: keeps the blob from eviction while followers still read it.
    pub pin: OnceLock<Pin>,
    /// Recent chunks, for followers (emptied at commit: the file is complete then).
    pub window: std::sync::Mutex<Window>,
}

impl Shared {
    pub(crate) fn new(
        digest: Digest,
        expected_size: Option<u64>,
        tmp_path: PathBuf,
        final_path: PathBuf,
        progress: Progress,
    ) -> Shared {
        Shared {
            digest,
            expected_size,
            tmp_path,
            final_path,
            file: OnceLock::new(),
            tx: watch::Sender::new(progress),
            pin: OnceLock::new(),
            window: Default::default(),
        }
    }

    fn is_writing(&self) -> bool {
        matches!(self.tx.borrow().phase, Phase::Writing | Phase::Verified)
    }

    fn window(&self) -> std::sync::MutexGuard<'_, Window> {
        self.window.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Gives up every chunk of the window that is already on disk (the memory budget is
    /// short): followers read those from the file.
    pub(crate) fn drop_persisted(&self) {
        self.window().trim(0);
    }
}

/// What [`crate::Store::begin`] returns: the caller writes, or follows a write (or a complete
/// blob) that is already there.
pub enum Begin {
    Writer(BlobWriter),
    Joined(Inflight),
}

impl std::fmt::Debug for Begin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Begin::Writer(w) => f.debug_tuple("Writer").field(&w.shared.digest).finish(),
            Begin::Joined(i) => f.debug_tuple("Joined").field(&i.shared.digest).finish(),
        }
    }
}

/// The one writer of a blob in flight. Dropping it without [`BlobWriter::commit`] abandons the
/// write: the temp file is deleted and followers get an error.
pub struct BlobWriter {
    pub(crate) inner: Arc<Inner>,
    pub(crate) shared: Arc<Shared>,
    // Boxed: the sha512 state is large and `Begin` holds a writer by value. `None` while a
    // chunk is being hashed on a blocking thread (and forever if that write was cancelled).
    hasher: Option<Box<Hasher>>,
    written: u64,
    /// Set once the write has failed or committed; nothing more may happen.
    done: bool,
}

impl BlobWriter {
    pub(crate) fn new(inner: Arc<Inner>, shared: Arc<Shared>) -> BlobWriter {
        inner.memory.register(&shared);
        BlobWriter {
            hasher: Some(Box::new(Hasher::new(shared.digest.algorithm()))),
            inner,
            shared,
            written: 0,
            done: false,
        }
    }

    pub fn digest(&self) -> &Digest {
        &self.shared.digest
    }

    /// Bytes written so far: a fetch that fails mid-blob continues from the next source at
    /// this offset.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// A reader of this write, for the writer's own client.
    pub fn follow(&self) -> Inflight {
        Inflight {
            shared: self.shared.clone(),
        }
    }

    fn aborted(&self) -> StoreError {
        StoreError::Aborted {
            digest: self.shared.digest.clone(),
            reason: "an earlier write or verification failed".into(),
        }
    }

    /// Appends `chunk` (copied; see [`BlobWriter::write_chunks`]).
    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), StoreError> {
        self.write_chunks(vec![Bytes::copy_from_slice(chunk)]).await
    }

    /// Appends `chunks`, in order: followers see them at once (from memory), then they are
    /// written to the temp file and hashed on one blocking thread. Their bytes are taken
    /// from the store's memory budget first, waiting for room (see
    /// [`crate::Store::reserve_memory`]). On any error the write is abandoned (temp file
    /// deleted, followers told). A write whose future is dropped half-way abandons the blob
    /// at the next call: its bytes may be neither on disk nor in the hash.
    pub async fn write_chunks(&mut self, chunks: Vec<Bytes>) -> Result<(), StoreError> {
        self.write_reserved(chunks, MemoryPermit::empty()).await
    }

    /// [`BlobWriter::write_chunks`] for chunks whose bytes the caller has already taken
    /// from the store's memory budget (`permit`, from [`crate::Store::reserve_memory`]):
    /// whatever the permit does not cover is taken (waiting) first. Each chunk's share is
    /// given back when the chunk leaves the window.
    pub async fn write_reserved(
        &mut self,
        mut chunks: Vec<Bytes>,
        mut permit: MemoryPermit,
    ) -> Result<(), StoreError> {
        if self.done {
            return Err(self.aborted());
        }
        chunks.retain(|c| !c.is_empty());
        if chunks.is_empty() {
            return Ok(());
        }
        let len: u64 = chunks.iter().map(|c| c.len() as u64).sum();
        if permit.bytes() < len {
            permit.merge(self.inner.memory.reserve(len - permit.bytes()).await);
        }
        let Some(mut hasher) = self.hasher.take() else {
            let err = StoreError::Aborted {
                digest: self.shared.digest.clone(),
                reason: "an earlier write was cancelled".into(),
            };
            self.fail(&err);
            return Err(err);
        };
        let end = self.written + len;
        if let Some(expected) = self.shared.expected_size
            && end > expected
        {
            let err = StoreError::SizeMismatch {
                digest: self.shared.digest.clone(),
                expected,
                actual: end,
            };
            self.fail(&err);
            return Err(err);
        }
        let file = self.file().await?;
        if let Err(err) = self.reserve(len).await {
            self.fail(&err);
            return Err(err);
        }
        // From here to the progress update there is no await: the bytes just counted in
        // `tmp_bytes` are in `written` before anything can abandon the write.
        let start = self.written;
        {
            let mut w = self.shared.window();
            let mut pos = start;
            for c in &chunks {
                w.push(pos, c.clone(), permit.split(c.len() as u64));
                pos += c.len() as u64;
            }
        }
        self.written = end;
        self.shared.tx.send_modify(|p| p.written = end);
        let injected = self.inner.injected_failure(end);
        // The file write and the hashing run side by side on two blocking threads.
        let hashing = {
            let chunks = chunks.clone();
            tokio::task::spawn_blocking(move || {
                for c in &chunks {
                    hasher.update(c);
                }
                hasher
            })
        };
        let writing = tokio::task::spawn_blocking(move || {
            if let Some(e) = injected {
                return Err(e);
            }
            let mut pos = start;
            for c in &chunks {
                file.write_all_at(c, pos)?;
                pos += c.len() as u64;
            }
            Ok(())
        });
        let (hashed, written) = tokio::join!(hashing, writing);
        let r = match (hashed, written) {
            (Ok(hasher), Ok(r)) => Ok((r, hasher)),
            (Err(e), _) | (_, Err(e)) => Err(e),
        };
        let r = match r {
            Ok((r, hasher)) => {
                self.hasher = Some(hasher);
                r
            }
            Err(e) => Err(io::Error::other(e)),
        };
        if let Err(e) = r {
            let err = StoreError::io("write", &self.shared.tmp_path, e);
            self.fail(&err);
            return Err(err);
        }
        let short = self.inner.memory.short();
        self.shared.window().persisted(end, short);
        Ok(())
    }

    /// Counts `len` more bytes of this write in the store's size limit, evicting complete
    /// blobs to make room when needed; fails when even that leaves no room.
    async fn reserve(&mut self, len: u64) -> Result<(), StoreError> {
        let fits = |st: &mut crate::State| {
            let fits = self
                .inner
                .max_size
                .is_none_or(|max| st.bytes + st.tmp_bytes + len <= max);
            if fits {
                st.tmp_bytes += len;
            }
            fits
        };
        if fits(&mut self.inner.state()) {
            return Ok(());
        }
        self.inner.clone().evict_async(len).await;
        let mut st = self.inner.state();
        if fits(&mut st) {
            return Ok(());
        }
        Err(StoreError::OverBudget {
            digest: self.shared.digest.clone(),
            max: self.inner.max_size.unwrap_or(u64::MAX),
            used: st.bytes + st.tmp_bytes,
        })
    }

    /// The temp file, created on first use.
    async fn file(&mut self) -> Result<Arc<File>, StoreError> {
        if let Some(f) = self.shared.file.get() {
            return Ok(f.clone());
        }
        let path = self.shared.tmp_path.clone();
        let r = tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::OpenOptionsExt;
            File::options()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
        })
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e)));
        match r {
            Ok(f) => Ok(self.shared.file.get_or_init(|| Arc::new(f)).clone()),
            Err(e) => {
                let err = StoreError::io("create", &self.shared.tmp_path, e);
                self.fail(&err);
                Err(err)
            }
        }
    }

    /// Verifies the digest (and the expected size), fsyncs, and renames the temp file into
    /// `blobs/`. Followers then get the last byte. On mismatch nothing is stored and followers
    /// get an error. Returns the size.
    pub async fn commit(mut self) -> Result<u64, StoreError> {
        if self.done {
            return Err(self.aborted());
        }
        let Some(hasher) = &self.hasher else {
            let err = StoreError::Aborted {
                digest: self.shared.digest.clone(),
                reason: "an earlier write was cancelled".into(),
            };
            self.fail(&err);
            return Err(err);
        };
        let actual = (**hasher).clone().finish();
        if actual != self.shared.digest {
            let err = StoreError::DigestMismatch {
                expected: self.shared.digest.clone(),
                actual,
            };
            self.fail(&err);
            return Err(err);
        }
        if let Some(expected) = self.shared.expected_size
            && expected != self.written
        {
            let err = StoreError::SizeMismatch {
                digest: self.shared.digest.clone(),
                expected,
                actual: self.written,
            };
            self.fail(&err);
            return Err(err);
        }
        let file = self.file().await?;
        // Release the last byte now: clients need not wait for the fsync of a large blob.
        self.shared.tx.send_modify(|p| {
            if matches!(p.phase, Phase::Writing) {
                p.phase = Phase::Verified;
            }
        });
        let (inner, shared, size) = (self.inner.clone(), self.shared.clone(), self.written);
        let r = tokio::task::spawn_blocking(move || commit_blocking(&inner, &shared, &file, size))
            .await
            .unwrap_or_else(|e| {
                Err(StoreError::io(
                    "commit",
                    &self.shared.tmp_path,
                    io::Error::other(e),
                ))
            });
        if let Err(err) = r {
            self.fail(&err);
            return Err(err);
        }
        self.done = true;
        self.inner.changed();
        let _ = self
            .inner
            .events
            .send(StoreEvent::Added(self.shared.digest.clone()));
        // The pin taken at commit keeps this blob out of its own eviction pass.
        self.inner.clone().evict_async(0).await;
        Ok(size)
    }

    /// Abandons the write: followers get `err`, the temp file is deleted.
    fn fail(&mut self, err: &StoreError) {
        self.done = true;
        abandon(&self.inner, &self.shared, err.to_string());
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if !self.done {
            abandon(
                &self.inner,
                &self.shared,
                format!(
                    "write of {} was abandoned before commit",
                    self.shared.digest
                ),
            );
        }
    }
}

/// Marks a write failed and deletes its temp file, unless it has committed meanwhile (a
/// commit whose future was dropped while its blocking part ran).
fn abandon(inner: &Inner, shared: &Arc<Shared>, msg: String) {
    {
        let mut st = inner.state();
        if !shared.is_writing() {
            return;
        }
        st.tmp_bytes = st.tmp_bytes.saturating_sub(shared.tx.borrow().written);
        shared
            .tx
            .send_modify(|p| p.phase = Phase::Failed(msg.into()));
        if st
            .inflight
            .get(&shared.digest)
            .is_some_and(|s| Arc::ptr_eq(s, shared))
        {
            st.inflight.remove(&shared.digest);
        }
    }
    *shared.window() = Window::default();
    if let Err(e) = crate::layout::remove_if_exists(&shared.tmp_path) {
        tracing::warn!(error = %e, "could not delete the temp file of an abandoned write");
    }
}

/// fsync, then (under the store lock, so that eviction and other commits see one order)
/// rename into place, account the blob, and wake followers.
fn commit_blocking(
    inner: &Arc<Inner>,
    shared: &Arc<Shared>,
    file: &File,
    size: u64,
) -> Result<(), StoreError> {
    file.sync_all()
        .map_err(|e| StoreError::io("sync", &shared.tmp_path, e))?;
    let dir = inner.layout.blobs_dir(shared.digest.algorithm());
    crate::layout::create_private_dir(&dir)?;
    {
        let mut st = inner.state();
        if !shared.is_writing() {
            return Err(StoreError::Aborted {
                digest: shared.digest.clone(),
                reason: "the writer was dropped during commit".into(),
            });
        }
        std::fs::rename(&shared.tmp_path, &shared.final_path)
            .map_err(|e| StoreError::io("rename", &shared.tmp_path, e))?;
        st.clock += 1;
        let tick = st.clock;
        if let Some(old) = st.blobs.insert(
            shared.digest.clone(),
            crate::Entry {
                size,
                last_used: tick,
                used_at: std::time::SystemTime::now(),
                pins: 1,
            },
        ) {
            // Only possible if the same blob was also stored by another route; keep its pins.
            st.bytes -= old.size;
            if let Some(e) = st.blobs.get_mut(&shared.digest) {
                e.pins += old.pins;
            }
        }
        st.bytes += size;
        st.tmp_bytes = st.tmp_bytes.saturating_sub(size);
        if st
            .inflight
            .get(&shared.digest)
            .is_some_and(|s| Arc::ptr_eq(s, shared))
        {
            st.inflight.remove(&shared.digest);
        }
        let _ = shared.pin.set(Pin {
            inner: inner.clone(),
            digest: shared.digest.clone(),
        });
        shared.tx.send_modify(|p| {
            p.written = size;
            p.phase = Phase::Committed;
        });
    }
    // Followers read the complete file from now on.
    *shared.window() = Window::default();
    // Make the rename durable; the blob is valid either way.
    if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// A reader of a blob being written (or already complete). Cheap to clone.
#[derive(Clone)]
pub struct Inflight {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for Inflight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inflight")
            .field("digest", &self.shared.digest)
            .field("progress", &*self.shared.tx.borrow())
            .finish()
    }
}

impl Inflight {
    /// Waits for the end of the write without reading it: true when the blob was verified
    /// and stored, false when the write failed or was abandoned.
    pub async fn finished(&self) -> bool {
        let mut rx = self.shared.tx.subscribe();
        loop {
            match &rx.borrow_and_update().phase {
                Phase::Committed => return true,
                Phase::Failed(_) => return false,
                Phase::Writing | Phase::Verified => {}
            }
            if rx.changed().await.is_err() {
                return false;
            }
        }
    }

    pub fn digest(&self) -> &Digest {
        &self.shared.digest
    }

    /// True once the write has failed or was abandoned (its readers end with an error).
    pub fn failed(&self) -> bool {
        matches!(self.shared.tx.borrow().phase, Phase::Failed(_))
    }

    /// The size announced to `begin` by the writer, if any.
    pub fn expected_size(&self) -> Option<u64> {
        self.shared.expected_size
    }

    /// Bytes written so far (the size, once committed).
    pub fn written(&self) -> u64 {
        self.shared.tx.borrow().written
    }

    /// Bytes from `offset` to the end (or `len` bytes), read as they are written and from the
    /// final file once committed, in chunks of at most [`CHUNK`] bytes. The last byte of the
    /// blob is yielded only after its digest was verified; if the write fails the stream ends
    /// with an error. A range past the end of the committed blob ends with an
    /// `UnexpectedEof` error.
    pub fn stream(
        &self,
        offset: u64,
        len: Option<u64>,
    ) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
        let reader = Reader {
            rx: self.shared.tx.subscribe(),
            shared: self.shared.clone(),
            pos: offset,
            end: len.map(|l| offset.saturating_add(l)),
            file: None,
            done: false,
        };
        futures_util::stream::unfold(reader, |mut r| async move {
            let item = r.next_chunk().await?;
            Some((item, r))
        })
    }
}

struct Reader {
    shared: Arc<Shared>,
    rx: watch::Receiver<Progress>,
    pos: u64,
    end: Option<u64>,
    file: Option<Arc<File>>,
    done: bool,
}

impl Reader {
    async fn next_chunk(&mut self) -> Option<io::Result<Bytes>> {
        if self.done {
            return None;
        }
        let r = self.next_inner().await;
        if !matches!(r, Some(Ok(_))) {
            self.done = true;
        }
        r
    }

    async fn next_inner(&mut self) -> Option<io::Result<Bytes>> {
        loop {
            if self.end.is_some_and(|end| self.pos >= end) {
                return None;
            }
            let p = self.rx.borrow_and_update().clone();
            let readable = match p.phase {
                // Any byte might be the last one: hold one back until verified.
                Phase::Writing => p.written.saturating_sub(1),
                Phase::Committed | Phase::Verified => {
                    let end = self.end.unwrap_or(p.written);
                    if end > p.written || self.pos > end {
                        return Some(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!(
                                "range {}..{end} is past the end of {} ({} bytes)",
                                self.pos, self.shared.digest, p.written
                            ),
                        )));
                    }
                    if self.pos == end {
                        return None;
                    }
                    p.written
                }
                Phase::Failed(msg) => return Some(Err(io::Error::other(msg.to_string()))),
            };
            if self.pos < readable {
                let limit = self.end.map_or(readable, |e| e.min(readable));
                let committed = matches!(p.phase, Phase::Committed);
                // Recent bytes come from memory; older ones (and a committed blob) from the
                // file, never past what is on disk.
                let mut n = (limit - self.pos).min(CHUNK as u64);
                if !committed {
                    let w = self.shared.window();
                    if let Some(b) = w.get(self.pos, n) {
                        drop(w);
                        self.pos += b.len() as u64;
                        return Some(Ok(b));
                    }
                    n = n.min(w.persisted.saturating_sub(self.pos));
                }
                if n > 0 {
                    return Some(self.read(n as usize, committed).await);
                }
            }
            // Wait for more bytes, the commit, or a failure. The sender lives in `shared`,
            // which we hold, so this cannot fail; a dropped writer publishes `Failed` first.
            if self.rx.changed().await.is_err() {
                return Some(Err(io::Error::other("blob writer vanished")));
            }
        }
    }

    async fn read(&mut self, n: usize, committed: bool) -> io::Result<Bytes> {
        let file = match (&self.file, self.shared.file.get()) {
            (Some(f), _) => f.clone(),
            (None, Some(f)) => f.clone(),
            // A blob that was complete before `begin`: open the stored file (pinned).
            (None, None) if committed => {
                let path = self.shared.final_path.clone();
                let f = tokio::task::spawn_blocking(move || {
                    let f = File::open(path)?;
                    // A use, for the LRU order after a restart (best effort).
                    let _ = f.set_modified(std::time::SystemTime::now());
                    Ok::<_, io::Error>(f)
                })
                .await
                .map_err(io::Error::other)??;
                Arc::new(f)
            }
            (None, None) => return Err(io::Error::other("blob temp file missing")),
        };
        self.file = Some(file.clone());
        let pos = self.pos;
        let mut buf = read_buffer(n);
        let buf = tokio::task::spawn_blocking(move || {
            buf.resize(n, 0);
            file.read_exact_at(&mut buf, pos).map(|()| buf)
        })
        .await
        .map_err(io::Error::other)??;
        self.pos += n as u64;
        Ok(Bytes::from(buf))
    }
}
