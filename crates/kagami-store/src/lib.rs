//! kagami's content store: the blobs, tags and manifest media types that `kagami serve`
//! caches on the node.
//!
//! - Blobs live at `<root>/blobs/sha256/<hex>` (OCI-layout-like) and get there only by a
//!   rename after their digest was verified and the data fsynced: a crash at any moment never
//!   leaves a partial or wrong blob visible. Writes in flight live in `<root>/tmp/`, which is
//!   emptied at open.
//! - One write per digest: [`Store::begin`] hands the first caller a [`BlobWriter`] and every
//!   later caller an [`Inflight`] that streams the growing file, withholding the last byte
//!   until the digest is verified.
//! - A size limit is kept by evicting the least recently used complete blobs after a commit,
//!   never one that is pinned by an open [`BlobHandle`] or still read by a follower.
//! - Tags and media types are small records held in memory and persisted one file each.
//!
//! One process per root, enforced: `open` takes an exclusive `flock` on the root directory
//! and a second open fails with [`StoreError::Locked`] naming it. Directories are created
//! 0700 and files 0600.
//!
//! The size limit covers writes in flight too: every byte written to `tmp/` counts, and a
//! write that would take complete blobs plus writes in flight over the limit (after evicting
//! what can be evicted) fails with [`StoreError::OverBudget`].
//!
//! A memory budget covers writes in flight too: the bytes of every chunk held in memory for
//! a write (from [`Store::reserve_memory`] or [`BlobWriter::write_chunks`] until the chunk
//! leaves its write's window) are taken from one budget, [`StoreOptions::memory`]. When it
//! is short, windows keep only what is not yet on disk and reservations wait: memory stays
//! bounded however many blobs are written at once, and followers read from disk instead.

mod blob;
mod error;
mod layout;
mod memory;
mod tags;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use kagami_config::Digest;
use tokio::sync::{broadcast, watch};

pub use blob::{Begin, BlobHandle, BlobWriter, CHUNK, Inflight, WINDOW};
pub use error::StoreError;
pub use memory::MemoryPermit;
pub use tags::TagEntry;

use blob::{Phase, Pin, Progress, Shared};
use layout::{Layout, TagMap};

/// Options for [`Store::open`].
#[derive(Debug, Clone, Default)]
pub struct StoreOptions {
    /// The most bytes of complete blobs to keep; `None` for no limit.
    pub max_size: Option<u64>,
    /// The most bytes of blob data that writes in flight hold in memory together (their
    /// windows for followers and what callers reserved for them); `None` for no limit.
    pub memory: Option<u64>,
}

/// A snapshot of the store's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Bytes of complete blobs (temp files of writes in flight not included).
    pub bytes: u64,
    /// Bytes written so far by writes in flight (in `tmp/`); counted in the size limit.
    pub tmp_bytes: u64,
    /// Number of complete blobs.
    pub blobs: u64,
    /// Blobs evicted since open.
    pub evictions: u64,
    /// Writes in flight.
    pub in_flight: u64,
}

/// A blob appeared in or left the store (for P2P advertise and withdraw).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreEvent {
    Added(Digest),
    Removed(Digest),
}

/// The content store. Cheap to clone; all clones share one state.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("root", &self.inner.layout.root())
            .field("usage", &self.usage())
            .finish()
    }
}

pub(crate) struct Inner {
    layout: Layout,
    max_size: Option<u64>,
    /// What writes in flight hold in memory (see [`StoreOptions::memory`]).
    memory: Arc<memory::Memory>,
    /// The open root directory, exclusively `flock`ed while the store lives.
    _lock: std::fs::File,
    state: Mutex<State>,
    events: broadcast::Sender<StoreEvent>,
    /// Bumped whenever blobs or tags change (`Store::changes`).
    changes: watch::Sender<u64>,
    next_tmp: AtomicU64,
    /// Test hook: writes reaching this many bytes fail with ENOSPC.
    #[cfg(feature = "fault-injection")]
    fail_after: AtomicU64,
}

/// Everything mutable, behind one lock that is never held across an `.await`.
pub(crate) struct State {
    blobs: HashMap<Digest, Entry>,
    bytes: u64,
    /// Bytes in `tmp/` of writes in flight (added as written, moved to `bytes` at commit,
    /// dropped when a write is abandoned).
    tmp_bytes: u64,
    /// Logical time for LRU: bumped on every use.
    clock: u64,
    evictions: u64,
    inflight: HashMap<Digest, Arc<Shared>>,
    tags: TagMap,
    media: HashMap<Digest, String>,
    /// Digests the node's policy keeps (`Store::set_pinned`): never evicted.
    pinned: HashSet<Digest>,
}

/// A complete blob.
pub(crate) struct Entry {
    size: u64,
    last_used: u64,
    /// Wall-clock time of the last use (the file's mtime at open), for eviction by age.
    used_at: SystemTime,
    /// Open handles and committed writes still followed; a pinned blob is never evicted.
    pins: u32,
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Tells `Store::changes` watchers that blobs or tags changed.
    pub(crate) fn changed(&self) {
        self.changes.send_modify(|g| *g = g.wrapping_add(1));
    }

    fn tmp_path(&self, what: &str) -> PathBuf {
        let n = self.next_tmp.fetch_add(1, Ordering::Relaxed);
        self.layout
            .tmp_dir()
            .join(format!("{what}.{}.{n}", std::process::id()))
    }

    #[cfg(feature = "fault-injection")]
    fn injected_failure(&self, end: u64) -> Option<std::io::Error> {
        (end > self.fail_after.load(Ordering::Relaxed))
            .then(|| std::io::Error::from(std::io::ErrorKind::StorageFull))
    }

    #[cfg(not(feature = "fault-injection"))]
    fn injected_failure(&self, _end: u64) -> Option<std::io::Error> {
        None
    }

    async fn evict_async(self: Arc<Self>, extra: u64) {
        if self.max_size.is_none() {
            return;
        }
        let _ = tokio::task::spawn_blocking(move || self.evict(extra)).await;
    }

    /// Evicts least recently used, unpinned complete blobs until complete blobs, writes in
    /// flight and `extra` more bytes fit in the limit (or only pinned blobs are left).
    /// Blocking.
    fn evict(&self, extra: u64) {
        let Some(max) = self.max_size else { return };
        let mut victims = Vec::new();
        {
            let mut st = self.state();
            let over = |st: &State| st.bytes + st.tmp_bytes + extra > max;
            if !over(&st) {
                return;
            }
            let mut candidates: Vec<(u64, Digest)> = st
                .blobs
                .iter()
                .filter(|(d, e)| e.pins == 0 && !st.pinned.contains(*d))
                .map(|(d, e)| (e.last_used, d.clone()))
                .collect();
            candidates.sort();
            for (_, d) in candidates {
                if !over(&st) {
                    break;
                }
                self.take_out(&mut st, &d, &mut victims);
            }
        }
        self.delete_victims(victims);
    }

    /// Evicts every unpinned complete blob last used before `cutoff`; returns how many and
    /// their bytes. Blocking.
    fn evict_unused_since(&self, cutoff: SystemTime) -> (u64, u64) {
        let mut victims = Vec::new();
        let mut bytes = 0;
        {
            let mut st = self.state();
            let old: Vec<(Digest, u64)> = st
                .blobs
                .iter()
                .filter(|(d, e)| e.pins == 0 && e.used_at < cutoff && !st.pinned.contains(*d))
                .map(|(d, e)| (d.clone(), e.size))
                .collect();
            for (d, size) in old {
                if self.take_out(&mut st, &d, &mut victims) {
                    bytes += size;
                }
            }
        }
        let n = victims.len() as u64;
        self.delete_victims(victims);
        (n, bytes)
    }

    /// Moves a complete blob out of `blobs/` under the lock (a cheap rename, so that a new
    /// write of the same digest committing later is never deleted by this eviction) and
    /// forgets it; the file is deleted by [`Inner::delete_victims`] after the lock.
    fn take_out(
        &self,
        st: &mut State,
        d: &Digest,
        victims: &mut Vec<(Digest, Option<PathBuf>)>,
    ) -> bool {
        let from = self.layout.blob(d);
        let to = self.tmp_path("evicted");
        match std::fs::rename(&from, &to) {
            Ok(()) => victims.push((d.clone(), Some(to))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => victims.push((d.clone(), None)),
            Err(e) => {
                tracing::warn!(path = %from.display(), error = %e, "could not evict a blob");
                return false;
            }
        }
        let e = st.blobs.remove(d).expect("candidate is present");
        st.bytes -= e.size;
        st.evictions += 1;
        if st.media.remove(d).is_some() {
            let _ = layout::remove_if_exists(&self.layout.meta(d));
        }
        true
    }

    fn delete_victims(&self, victims: Vec<(Digest, Option<PathBuf>)>) {
        if !victims.is_empty() {
            self.changed();
        }
        for (d, path) in victims {
            if let Some(path) = path
                && let Err(e) = layout::remove_if_exists(&path)
            {
                tracing::warn!(error = %e, "could not delete an evicted blob");
            }
            tracing::debug!(digest = %d, "evicted");
            let _ = self.events.send(StoreEvent::Removed(d));
        }
    }
}

impl Store {
    /// Opens (creating if needed) the store at `root`: creates `blobs/sha256`, `tmp`, `tags`
    /// and `meta`; deletes leftover temp files and files in `blobs/` that are not named by a
    /// digest; reads blob sizes and modification times (the initial LRU order), media types
    /// and the tag index. Blobs already in place are trusted, not re-hashed. If the blobs
    /// exceed `max_size`, the least recently used are evicted.
    pub async fn open(root: impl Into<PathBuf>, opts: StoreOptions) -> Result<Store, StoreError> {
        let layout = Layout::new(root.into());
        let l = layout.clone();
        let (lock, scanned) = tokio::task::spawn_blocking(move || {
            // The lock comes first: the scan empties tmp/, which must not be another
            // process's writes in flight.
            let lock = layout::lock_root(l.root())?;
            Ok::<_, StoreError>((lock, layout::scan(&l)?))
        })
        .await
        .map_err(|e| StoreError::io("open", layout.root(), std::io::Error::other(e)))??;

        let mut blobs = scanned.blobs;
        blobs.sort_by(|a, b| a.mtime.cmp(&b.mtime).then(a.digest.cmp(&b.digest)));
        let mut state = State {
            blobs: HashMap::with_capacity(blobs.len()),
            bytes: 0,
            tmp_bytes: 0,
            clock: 0,
            evictions: 0,
            inflight: HashMap::new(),
            tags: HashMap::new(),
            media: scanned.media,
            pinned: HashSet::new(),
        };
        for b in blobs {
            state.clock += 1;
            state.bytes += b.size;
            let entry = Entry {
                size: b.size,
                last_used: state.clock,
                used_at: b.mtime,
                pins: 0,
            };
            state.blobs.insert(b.digest, entry);
        }
        for t in scanned.tags {
            state
                .tags
                .entry((t.registry, t.repository))
                .or_default()
                .insert(t.tag, t.entry);
        }
        let inner = Arc::new(Inner {
            layout,
            max_size: opts.max_size,
            memory: Arc::new(memory::Memory::new(opts.memory)),
            _lock: lock,
            state: Mutex::new(state),
            events: broadcast::channel(1024).0,
            changes: watch::channel(0).0,
            next_tmp: AtomicU64::new(0),
            #[cfg(feature = "fault-injection")]
            fail_after: AtomicU64::new(u64::MAX),
        });
        inner.clone().evict_async(0).await;
        Ok(Store { inner })
    }

    /// The directory the store lives in.
    pub fn root(&self) -> &Path {
        self.inner.layout.root()
    }

    /// The size limit the store was opened with, if any.
    pub fn max_size(&self) -> Option<u64> {
        self.inner.max_size
    }

    /// Takes `bytes` from the memory budget of writes in flight ([`StoreOptions::memory`]),
    /// for chunks the caller is about to hand to [`BlobWriter::write_reserved`]; waits while
    /// the budget is short (windows meanwhile give up what is already on disk). A caller
    /// that waits here before reading more from its source is how a fetch is held back.
    pub async fn reserve_memory(&self, bytes: u64) -> MemoryPermit {
        self.inner.memory.reserve(bytes).await
    }

    /// Takes `bytes` from the memory budget if they fit now (see
    /// [`Store::reserve_memory`]); `None` when the budget is short.
    pub fn try_reserve_memory(&self, bytes: u64) -> Option<MemoryPermit> {
        self.inner.memory.try_reserve(bytes)
    }

    /// Sets the memory budget of writes in flight (see [`StoreOptions::memory`]); `None`
    /// for no limit. Bytes already taken stay taken.
    pub fn set_memory_limit(&self, limit: Option<u64>) {
        self.inner.memory.set_limit(limit);
    }

    /// Bytes taken from the memory budget now: chunks in the windows of writes in flight
    /// and reservations not yet written.
    pub fn memory_used(&self) -> u64 {
        self.inner.memory.used()
    }

    /// The most bytes ever taken from the memory budget at once since open.
    pub fn memory_peak(&self) -> u64 {
        self.inner.memory.peak()
    }

    /// The memory budget of writes in flight, if any.
    pub fn memory_limit(&self) -> Option<u64> {
        self.inner.memory.limit()
    }

    /// Size of a complete (verified) blob, if present. Does not count as a use.
    pub fn blob_size(&self, d: &Digest) -> Option<u64> {
        self.inner.state().blobs.get(d).map(|e| e.size)
    }

    /// Opens a complete blob for reading, marks it used (in memory and in the file's mtime,
    /// so LRU order roughly survives restarts), and pins it against eviction while the handle
    /// lives. `None` if the blob is not (or no longer) present.
    pub async fn open_blob(&self, d: &Digest) -> Result<Option<BlobHandle>, StoreError> {
        let Some((pin, _)) = self.pin(d) else {
            return Ok(None);
        };
        let path = self.inner.layout.blob(d);
        let p = path.clone();
        let r = tokio::task::spawn_blocking(move || {
            let f = std::fs::File::open(&p)?;
            // Best effort: a read-only filesystem only loses the LRU order across restarts.
            let _ = f.set_modified(SystemTime::now());
            let size = f.metadata()?.len();
            Ok::<_, std::io::Error>((f, size))
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        match r {
            Ok((f, size)) => Ok(Some(BlobHandle {
                size,
                file: tokio::fs::File::from_std(f),
                _pin: pin,
            })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Deleted behind our back: forget it, it is a miss.
                tracing::warn!(path = %path.display(), "a stored blob disappeared");
                drop(pin);
                let removed = {
                    let mut st = self.inner.state();
                    let removed = st.blobs.remove(d);
                    if let Some(e) = &removed {
                        st.bytes -= e.size;
                    }
                    removed.is_some()
                };
                if removed {
                    self.inner.changed();
                    let _ = self.inner.events.send(StoreEvent::Removed(d.clone()));
                }
                Ok(None)
            }
            Err(e) => Err(StoreError::io("open", path, e)),
        }
    }

    /// The bytes of a small stored blob (a manifest) of at most `max` bytes, without
    /// counting as a use: for bookkeeping that reads manifests (the pinned set, purge).
    /// `None` when the blob is not stored or is larger than `max`.
    pub async fn read_small(&self, d: &Digest, max: u64) -> Result<Option<Vec<u8>>, StoreError> {
        match self.blob_size(d) {
            Some(size) if size <= max => {}
            _ => return Ok(None),
        }
        let path = self.inner.layout.blob(d);
        match tokio::fs::read(&path).await {
            Ok(bytes) if bytes.len() as u64 <= max => Ok(Some(bytes)),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::io("read", path, e)),
        }
    }

    /// Evicts every complete blob not used for `age` (never a pinned one: an open handle, a
    /// joined reader, a just-committed blob still followed); returns how many blobs and
    /// bytes went. Use is the last open (the file's modification time across restarts) or
    /// the commit.
    pub async fn evict_unused_for(&self, age: std::time::Duration) -> (u64, u64) {
        let Some(cutoff) = SystemTime::now().checked_sub(age) else {
            return (0, 0);
        };
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.evict_unused_since(cutoff))
            .await
            .unwrap_or((0, 0))
    }

    /// Marks a complete blob used and pins it; returns the pin and the blob's size.
    fn pin(&self, d: &Digest) -> Option<(Pin, u64)> {
        let mut st = self.inner.state();
        st.clock += 1;
        let tick = st.clock;
        let e = st.blobs.get_mut(d)?;
        e.last_used = tick;
        e.used_at = SystemTime::now();
        e.pins += 1;
        let pin = Pin {
            inner: self.inner.clone(),
            digest: d.clone(),
        };
        Some((pin, e.size))
    }

    /// Stores a small blob held in memory (a manifest, a config). `Ok(true)` when this
    /// call wrote it, `Ok(false)` when it was already there or another write of it finished;
    /// a concurrent write that fails is retried (three times in all).
    pub async fn put_bytes(&self, d: &Digest, bytes: &[u8]) -> Result<bool, StoreError> {
        for _ in 0..3 {
            if self.blob_size(d).is_some() {
                return Ok(false);
            }
            match self.begin(d, Some(bytes.len() as u64))? {
                Begin::Writer(mut w) => {
                    for c in bytes.chunks(CHUNK) {
                        w.write(c).await?;
                    }
                    w.commit().await?;
                    return Ok(true);
                }
                Begin::Joined(inflight) => {
                    if inflight.finished().await {
                        return Ok(false);
                    }
                }
            }
        }
        Err(StoreError::Aborted {
            digest: d.clone(),
            reason: "another write of this blob kept failing".into(),
        })
    }

    /// Starts writing `d`, or joins the write already in flight for `d`. If `d` is already
    /// complete, returns `Joined` with a reader of the stored blob (pinned while it lives).
    pub fn begin(&self, d: &Digest, expected_size: Option<u64>) -> Result<Begin, StoreError> {
        self.begin_inner(d, expected_size, true)
    }

    /// Like [`Store::begin`], but never joins a write of `d` already in flight: this
    /// writer writes its own temp file (whichever verified write commits first stores the
    /// blob; a later one replaces it with the same bytes). For a caller that must not
    /// depend on another source's write (one registry's fetch must not be stalled by
    /// another's). A complete blob is still returned as `Joined`.
    pub fn begin_separate(
        &self,
        d: &Digest,
        expected_size: Option<u64>,
    ) -> Result<Begin, StoreError> {
        self.begin_inner(d, expected_size, false)
    }

    fn begin_inner(
        &self,
        d: &Digest,
        expected_size: Option<u64>,
        join: bool,
    ) -> Result<Begin, StoreError> {
        if let Some((pin, size)) = self.pin(d) {
            let shared = Shared::new(
                d.clone(),
                Some(size),
                PathBuf::new(),
                self.inner.layout.blob(d),
                Progress {
                    written: size,
                    phase: Phase::Committed,
                },
            );
            let _ = shared.pin.set(pin);
            return Ok(Begin::Joined(Inflight {
                shared: Arc::new(shared),
            }));
        }
        let mut st = self.inner.state();
        if join && let Some(shared) = st.inflight.get(d) {
            return Ok(Begin::Joined(Inflight {
                shared: shared.clone(),
            }));
        }
        let tmp = self
            .inner
            .tmp_path(&format!("{}-{}", d.algorithm().name(), d.hex()));
        let shared = Arc::new(Shared::new(
            d.clone(),
            expected_size,
            tmp,
            self.inner.layout.blob(d),
            Progress {
                written: 0,
                phase: Phase::Writing,
            },
        ));
        // A separate write is registered only when no other write of `d` is (followers
        // join the registered one).
        st.inflight
            .entry(d.clone())
            .or_insert_with(|| shared.clone());
        drop(st);
        Ok(Begin::Writer(BlobWriter::new(self.inner.clone(), shared)))
    }

    /// Replaces the set of digests kept by the node's policy (pinned images): eviction, by
    /// size or by age, never removes them. They count in the size limit like any blob; when
    /// pinned blobs alone exceed it, new writes fail with `OverBudget`. Digests not (yet) in
    /// the store may be named; they are kept from the moment they arrive.
    pub fn set_pinned(&self, digests: HashSet<Digest>) {
        self.inner.state().pinned = digests;
    }

    /// Whether `d` is in the policy's pinned set.
    pub fn is_pinned(&self, d: &Digest) -> bool {
        self.inner.state().pinned.contains(d)
    }

    /// Removes tags and blobs at once (`kagami purge`), or nothing: fails with
    /// [`StoreError::InUse`] when one of the blobs is read (an open handle, a follower),
    /// written (a write in flight) or pinned by the policy. Blobs not in the store and tags
    /// not in the index are skipped. Returns the blobs removed with their sizes; each is
    /// announced as [`StoreEvent::Removed`]. Blocking (small file operations).
    pub fn remove(
        &self,
        tags: &[(String, String, String)],
        digests: &[Digest],
    ) -> Result<Vec<(Digest, u64)>, StoreError> {
        let mut victims = Vec::new();
        let mut removed = Vec::new();
        {
            let mut st = self.inner.state();
            for d in digests {
                let why = if st.inflight.contains_key(d) {
                    Some("it is being written")
                } else if st.blobs.get(d).is_some_and(|e| e.pins > 0) {
                    Some("it is being read")
                } else if st.pinned.contains(d) && st.blobs.contains_key(d) {
                    Some("it is pinned by the policy")
                } else {
                    None
                };
                if let Some(why) = why {
                    return Err(StoreError::InUse {
                        digest: d.clone(),
                        why,
                    });
                }
            }
            for (registry, repository, tag) in tags {
                let key = (registry.clone(), repository.clone());
                let Some(map) = st.tags.get_mut(&key) else {
                    continue;
                };
                if map.remove(tag).is_none() {
                    continue;
                }
                if map.is_empty() {
                    st.tags.remove(&key);
                }
                let file = self
                    .inner
                    .layout
                    .tags_dir()
                    .join(tags::tag_file_name(registry, repository, tag));
                layout::remove_if_exists(&file)?;
            }
            for d in digests {
                let Some(size) = st.blobs.get(d).map(|e| e.size) else {
                    continue;
                };
                if self.inner.take_out(&mut st, d, &mut victims) {
                    // Not an eviction: the counter is the size bound's and the age's.
                    st.evictions -= 1;
                    removed.push((d.clone(), size));
                }
            }
        }
        if !tags.is_empty() {
            self.inner.changed();
        }
        self.inner.delete_victims(victims);
        Ok(removed)
    }

    /// Records what a tag points to; persisted at once (a small blocking file write).
    pub fn put_tag(
        &self,
        registry: &str,
        repository: &str,
        tag: &str,
        entry: TagEntry,
    ) -> Result<(), StoreError> {
        tags::check_key(registry, repository, tag)?;
        let file = tags::TagFile {
            registry: registry.into(),
            repository: repository.into(),
            tag: tag.into(),
            entry,
        };
        let dest = self
            .inner
            .layout
            .tags_dir()
            .join(tags::tag_file_name(registry, repository, tag));
        let tmp = layout::write_temp(self.inner.tmp_path("tag"), &tags::encode(&file))?;
        let mut st = self.inner.state();
        if let Err(e) = std::fs::rename(&tmp, &dest) {
            let _ = std::fs::remove_file(&tmp);
            return Err(StoreError::io("rename", tmp, e));
        }
        st.tags
            .entry((file.registry, file.repository))
            .or_default()
            .insert(file.tag, file.entry);
        drop(st);
        self.inner.changed();
        Ok(())
    }

    pub fn get_tag(&self, registry: &str, repository: &str, tag: &str) -> Option<TagEntry> {
        let st = self.inner.state();
        st.tags
            .get(&(registry.to_string(), repository.to_string()))?
            .get(tag)
            .cloned()
    }

    /// The tags known for a repository, sorted.
    pub fn list_tags(&self, registry: &str, repository: &str) -> Vec<String> {
        let st = self.inner.state();
        st.tags
            .get(&(registry.to_string(), repository.to_string()))
            .map(|m: &BTreeMap<String, TagEntry>| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Every tag in the index, as (registry, repository, tag), sorted.
    pub fn all_tags(&self) -> Vec<(String, String, String)> {
        let st = self.inner.state();
        let mut out: Vec<(String, String, String)> = st
            .tags
            .iter()
            .flat_map(|((registry, repository), tags)| {
                tags.keys()
                    .map(move |t| (registry.clone(), repository.clone(), t.clone()))
            })
            .collect();
        out.sort();
        out
    }

    /// Records the media type of a manifest stored as blob `d`; persisted at once.
    pub fn put_media_type(&self, d: &Digest, media_type: &str) -> Result<(), StoreError> {
        tags::check_media_type(media_type)?;
        let dir = self.inner.layout.meta_dir(d.algorithm());
        layout::create_private_dir(&dir)?;
        let tmp = layout::write_temp(self.inner.tmp_path("meta"), media_type.as_bytes())?;
        let dest = self.inner.layout.meta(d);
        let mut st = self.inner.state();
        if let Err(e) = std::fs::rename(&tmp, &dest) {
            let _ = std::fs::remove_file(&tmp);
            return Err(StoreError::io("rename", tmp, e));
        }
        st.media.insert(d.clone(), media_type.into());
        Ok(())
    }

    pub fn media_type(&self, d: &Digest) -> Option<String> {
        self.inner.state().media.get(d).cloned()
    }

    pub fn usage(&self) -> Usage {
        let st = self.inner.state();
        Usage {
            bytes: st.bytes,
            tmp_bytes: st.tmp_bytes,
            blobs: st.blobs.len() as u64,
            evictions: st.evictions,
            in_flight: st.inflight.len() as u64,
        }
    }

    /// Every complete blob in the store (for advertising them all at start, or after a
    /// subscriber lagged).
    pub fn digests(&self) -> Vec<Digest> {
        self.inner.state().blobs.keys().cloned().collect()
    }

    /// Blobs added and removed from now on. A receiver that falls more than 1024 events
    /// behind gets `Lagged` and should resynchronise from the store.
    pub fn subscribe(&self) -> broadcast::Receiver<StoreEvent> {
        self.inner.events.subscribe()
    }

    /// A counter bumped whenever a blob arrives or goes, or a tag is recorded or removed:
    /// for work that follows the store's content as a whole (the pinned set), where the
    /// individual events do not matter.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    /// Test hook: from now on, a write that would take a blob past `bytes` fails as if the
    /// disk were full (`None` turns this off).
    #[cfg(feature = "fault-injection")]
    #[doc(hidden)]
    pub fn inject_write_failure_after(&self, bytes: Option<u64>) {
        self.inner
            .fail_after
            .store(bytes.unwrap_or(u64::MAX), Ordering::Relaxed);
    }
}
