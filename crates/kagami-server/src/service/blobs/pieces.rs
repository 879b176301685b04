//! A blob fetched in pieces from several nodes that hold it whole (docs/p2p.md, "Pieces"):
//! up to [`HOLDERS`] workers, one per holder, each taking the next piece nobody has taken
//! (a faster holder takes more) with a `Range: bytes=a-b` request, and one stream that
//! yields the blob's bytes in order. That stream is an ordinary source body: the store
//! hashes it as it goes and checks the digest at commit, followers stream from the write,
//! and a failure ends it at the in-order frontier so that the fetch continues from the
//! next source at that offset.
//!
//! Pieces received ahead of the frontier wait in a reorder buffer of at most
//! [`LOOKAHEAD`] pieces; each piece taken ahead first takes its length from the store's
//! memory budget (`--fetch-memory`), and when the budget has no room the worker waits
//! rather than fetch ahead. The piece at the frontier needs no room: its bytes go on as
//! they arrive (the pump takes their room), so a fetch always makes progress.

use std::collections::{BTreeSet, VecDeque};

use futures_util::future::BoxFuture;

use super::*;

/// Bytes per piece: 1 MiB. Large enough that a request's round trip on a LAN (well under a
/// millisecond) is small next to the piece's transfer even at 10 Gbit/s with [`HOLDERS`]
/// workers covering each other's gaps; small enough that [`LOOKAHEAD`] pieces fit in the
/// default fetch memory beside the store's window.
pub(super) const PIECE: u64 = 1024 * 1024;

/// The smallest blob fetched in pieces: below it, one holder's stream is as fast.
pub(super) const MIN_BLOB: u64 = 4 * PIECE;

/// The most holders (and workers) one blob is fetched from at once. Past 4, a node's own
/// link is the limit on any network where one holder can fill a quarter of it.
pub(super) const HOLDERS: usize = 4;

/// The most pieces fetched ahead of the frontier piece (the reorder buffer).
pub(super) const LOOKAHEAD: usize = 4;

/// Pieces ahead, every fetch's together, hold at most 1/this of the memory budget: the rest
/// is the pumps', which always get room back from the store's windows, so no fetch waits
/// for room only pieces ahead hold. (What the windows hold does not count here: it goes
/// back as soon as a pump waits. Counting it kept a lone fetch at its frontier piece, one
/// holder at a time, whenever its window held a third of the default budget.)
const AHEAD_SHARE: u64 = 2;

/// The bytes held by pieces fetched ahead of their frontier, every fetch of one server
/// together (see [`AHEAD_SHARE`]).
#[derive(Clone, Default)]
pub(super) struct Ahead(Arc<std::sync::atomic::AtomicU64>);

impl Ahead {
    /// `n` bytes more, when the total stays within `cap`.
    fn take(&self, n: u64, cap: u64) -> Option<AheadHold> {
        use std::sync::atomic::Ordering::SeqCst;
        self.0
            .fetch_update(SeqCst, SeqCst, |held| {
                held.checked_add(n).filter(|t| *t <= cap)
            })
            .ok()?;
        Some(AheadHold {
            ahead: self.clone(),
            bytes: n,
        })
    }
}

/// A piece's share of [`Ahead`], given back on drop.
struct AheadHold {
    ahead: Ahead,
    bytes: u64,
}

impl Drop for AheadHold {
    fn drop(&mut self) {
        self.ahead
            .0
            .fetch_sub(self.bytes, std::sync::atomic::Ordering::SeqCst);
    }
}

/// How long a worker with nothing to take waits before it looks again (it is woken as the
/// frontier moves; this covers room freed in the memory budget by other fetches and
/// a frontier piece becoming late).
const RECHECK: Duration = Duration::from_millis(100);

/// A piece at the frontier is late, and taken over by a worker with nothing else to do,
/// once its holder has had it for this many times the typical time of a piece...
const LATE_FACTOR: u32 = 4;
/// ...and at least this long.
const LATE_MIN: Duration = Duration::from_secs(1);

/// Pieces whose times make the typical time of a piece (their median).
const TIMES: usize = 8;

/// One piece's bytes, `start..=end` of the blob, from one holder.
pub(super) type RangeBody = BoxStream<'static, io::Result<Bytes>>;
pub(super) type RangeFn =
    Arc<dyn Fn(u64, u64) -> BoxFuture<'static, Result<RangeBody, String>> + Send + Sync>;

/// A node that holds the whole blob, and how to ask it for a range.
pub(super) struct Holder {
    pub(super) id: String,
    pub(super) range: RangeFn,
}

/// How a blob is cut: piece size and reorder buffer.
#[derive(Debug, Clone, Copy)]
pub(super) struct Layout {
    pub(super) piece: u64,
    pub(super) lookahead: usize,
    /// The least time before a frontier piece is late (see [`LATE_MIN`]).
    pub(super) late_min: Duration,
}

impl Default for Layout {
    fn default() -> Self {
        Layout {
            piece: PIECE,
            lookahead: LOOKAHEAD,
            late_min: LATE_MIN,
        }
    }
}

/// A piece between the frontier and the end of the lookahead.
struct Slot {
    /// Bytes received and not yet yielded.
    chunks: VecDeque<Bytes>,
    /// Bytes received so far (a retry continues after them).
    received: u64,
    len: u64,
    /// Its room in the memory budget, taken before it was fetched ahead of the frontier,
    /// and its share of the pieces ahead.
    permit: MemoryPermit,
    ahead: Option<AheadHold>,
    /// The worker fetching it, and since when (`None`: nobody).
    owner: Option<(usize, Instant)>,
}

struct State {
    /// Where the stream starts (a resume) and the blob's size.
    start: u64,
    size: u64,
    layout: Layout,
    count: usize,
    /// The piece being yielded.
    frontier: usize,
    /// `slots[k]` is piece `frontier + k`.
    slots: VecDeque<Slot>,
    /// The first piece never taken.
    next_new: usize,
    /// Pieces given back by a holder that failed, to be taken first.
    returned: BTreeSet<usize>,
    /// Workers whose holder has not failed.
    alive: usize,
    errors: Vec<String>,
    /// Bytes received and not yet yielded, and the most ever.
    buffered: u64,
    peak: u64,
    /// Bytes received from each holder.
    by_holder: Vec<u64>,
    /// How long the last pieces took, and how many late pieces were taken over.
    times: VecDeque<Duration>,
    taken_over: usize,
    waker: Option<std::task::Waker>,
}

impl State {
    fn piece_start(&self, i: usize) -> u64 {
        self.start + i as u64 * self.layout.piece
    }

    fn piece_len(&self, i: usize) -> u64 {
        (self.size - self.piece_start(i)).min(self.layout.piece)
    }

    fn slot(&mut self, i: usize) -> &mut Slot {
        let k = i - self.frontier;
        while self.slots.len() <= k {
            let len = self.piece_len(self.frontier + self.slots.len());
            self.slots.push_back(Slot {
                chunks: VecDeque::new(),
                received: 0,
                len,
                permit: MemoryPermit::empty(),
                ahead: None,
                owner: None,
            });
        }
        &mut self.slots[k]
    }

    fn wake(&mut self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the workers: the frontier moved, or a piece was given back.
    notify: tokio::sync::Notify,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The blob's bytes from `start` to `size`, in order, fetched in pieces from `holders`
/// (see the module). Dropping it stops the workers.
pub(super) struct Pieces {
    shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    done: bool,
}

impl Pieces {
    pub(super) fn new(
        holders: Vec<Holder>,
        start: u64,
        size: u64,
        layout: Layout,
        store: Store,
        ahead: Ahead,
    ) -> Pieces {
        let count = (size.saturating_sub(start)).div_ceil(layout.piece) as usize;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                start,
                size,
                layout,
                count,
                frontier: 0,
                slots: VecDeque::new(),
                next_new: 0,
                returned: BTreeSet::new(),
                alive: holders.len(),
                errors: Vec::new(),
                buffered: 0,
                peak: 0,
                by_holder: vec![0; holders.len()],
                times: VecDeque::new(),
                taken_over: 0,
                waker: None,
            }),
            notify: tokio::sync::Notify::new(),
        });
        let tasks = holders
            .into_iter()
            .enumerate()
            .map(|(n, h)| {
                let (shared, store, ahead) = (shared.clone(), store.clone(), ahead.clone());
                tokio::spawn(work(shared, n, h, store, ahead))
            })
            .collect();
        Pieces {
            shared,
            tasks,
            done: false,
        }
    }

    /// The most bytes ever waiting in the reorder buffer (received, not yet yielded).
    #[cfg(test)]
    fn peak_buffered(&self) -> u64 {
        self.shared.lock().peak
    }

    /// Bytes received from each holder, in the order given.
    #[cfg(test)]
    fn by_holder(&self) -> Vec<u64> {
        self.shared.lock().by_holder.clone()
    }

    /// Late pieces taken over by another holder.
    #[cfg(test)]
    fn taken_over(&self) -> usize {
        self.shared.lock().taken_over
    }
}

impl Drop for Pieces {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Stream for Pieces {
    type Item = io::Result<Bytes>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        let mut st = this.shared.lock();
        loop {
            if st.frontier >= st.count {
                this.done = true;
                return Poll::Ready(None);
            }
            let frontier = st.frontier;
            let slot = st.slot(frontier);
            if let Some(c) = slot.chunks.pop_front() {
                st.buffered -= c.len() as u64;
                return Poll::Ready(Some(Ok(c)));
            }
            if slot.received == slot.len {
                // Its room in the budget goes back with it.
                st.slots.pop_front();
                st.frontier += 1;
                this.shared.notify.notify_waiters();
                continue;
            }
            if st.alive == 0 {
                this.done = true;
                let at = st.piece_start(frontier) + st.slot(frontier).received;
                let msg = format!(
                    "every node serving pieces failed (at byte {at}): {}",
                    st.errors.join("; ")
                );
                return Poll::Ready(Some(Err(io::Error::other(msg))));
            }
            st.waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
    }
}

/// One holder's worker: takes the next piece and fetches it, until every piece is in or
/// its holder fails (then its piece goes back and the holder is not asked again).
async fn work(shared: Arc<Shared>, n: usize, holder: Holder, store: Store, ahead: Ahead) {
    loop {
        let Some((i, from, to)) = take(&shared, n, &store, &ahead).await else {
            return;
        };
        if let Err(why) = fetch_piece(&shared, n, &holder, i, from, to).await {
            tracing::debug!(holder = %holder.id, piece = i, error = %why, "a node serving pieces failed; its piece goes to another");
            let mut st = shared.lock();
            // Back to the queue, unless another worker took it over meanwhile.
            if i >= st.frontier {
                let slot = st.slot(i);
                if slot.owner.is_some_and(|(o, _)| o == n) {
                    slot.owner = None;
                    st.returned.insert(i);
                }
            }
            st.alive -= 1;
            st.errors.push(why);
            st.wake();
            drop(st);
            shared.notify.notify_waiters();
            return;
        }
    }
}

/// The next piece for worker `n` and the byte range still missing from it, once the
/// reorder buffer and the memory budget have room for it; else the frontier piece when it
/// is late (see [`late`]); `None` once every piece is in.
async fn take(
    shared: &Shared,
    n: usize,
    store: &Store,
    ahead: &Ahead,
) -> Option<(usize, u64, u64)> {
    loop {
        let notified = shared.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        {
            let mut st = shared.lock();
            if st.frontier >= st.count {
                return None;
            }
            let next = st
                .returned
                .first()
                .copied()
                .or((st.next_new < st.count).then_some(st.next_new));
            if let Some(i) = next
                && i <= st.frontier + st.layout.lookahead
            {
                let is_ahead = i != st.frontier;
                let st_lookahead = st.layout.lookahead;
                // Pieces fetched ahead keep their room until yielded, at the frontier too:
                // never more than the lookahead's worth at once.
                let held = st.slots.iter().filter(|s| s.permit.bytes() > 0).count();
                let slot = st.slot(i);
                let len = slot.len;
                // Ahead of the frontier, a piece first takes its room in the budget; when
                // the budget has none, fewer pieces are fetched ahead (never more memory).
                // Never past a share of it: the pumps take room for every chunk they pass
                // on, and pieces ahead go back only as they do (see [`AHEAD_SHARE`]).
                let mut room = !is_ahead || slot.permit.bytes() > 0;
                if !room
                    && held < st_lookahead
                    && let Some(hold) = match store.memory_limit() {
                        Some(l) => ahead.take(len, l / AHEAD_SHARE).map(Some),
                        None => Some(None),
                    }
                    && let Some(p) = store.try_reserve_memory(len)
                {
                    slot.permit = p;
                    slot.ahead = hold;
                    room = true;
                }
                if room {
                    let received = slot.received;
                    slot.owner = Some((n, Instant::now()));
                    if !st.returned.remove(&i) {
                        st.next_new += 1;
                    }
                    let from = st.piece_start(i) + received;
                    return Some((i, from, st.piece_start(i) + len - 1));
                }
            }
            if let Some(late) = late(&mut st, n) {
                return Some(late);
            }
        }
        let _ = tokio::time::timeout(RECHECK, notified).await;
    }
}

/// The frontier piece, taken over by worker `n`, when another worker has had it for
/// [`LATE_FACTOR`] times the median time of the last pieces (and at least `late_min`):
/// a slow holder must not hold the frontier for ever. The holder it had is not counted as
/// failed (it stops that piece at its next chunk and takes another); the bytes of the
/// piece received so far are kept.
fn late(st: &mut State, n: usize) -> Option<(usize, u64, u64)> {
    let i = st.frontier;
    if i >= st.count || st.returned.contains(&i) || st.times.is_empty() {
        return None;
    }
    let mut times: Vec<Duration> = st.times.iter().copied().collect();
    times.sort();
    let late_after = (times[times.len() / 2] * LATE_FACTOR).max(st.layout.late_min);
    let start = st.piece_start(i);
    let slot = st.slot(i);
    match slot.owner {
        Some((owner, since)) if owner != n && since.elapsed() > late_after => {}
        _ => return None,
    }
    if slot.received == slot.len {
        return None;
    }
    slot.owner = Some((n, Instant::now()));
    let (from, to) = (start + slot.received, start + slot.len - 1);
    st.taken_over += 1;
    tracing::debug!(piece = i, "a late piece goes to another node");
    Some((i, from, to))
}

/// Fetches bytes `from..=to` of piece `i` into its slot; stops early, without error, when
/// another worker took the piece over (see [`late`]).
async fn fetch_piece(
    shared: &Shared,
    n: usize,
    holder: &Holder,
    i: usize,
    from: u64,
    to: u64,
) -> Result<(), String> {
    let mut body = (holder.range)(from, to).await?;
    while let Some(c) = body.next().await {
        let c = c.map_err(|e| format!("peer {}: {e}", holder.id))?;
        let mut st = shared.lock();
        if i < st.frontier {
            return Ok(()); // taken over, and done
        }
        let slot = st.slot(i);
        if slot.owner.is_none_or(|(o, _)| o != n) {
            return Ok(());
        }
        if slot.received + c.len() as u64 > slot.len {
            return Err(format!(
                "peer {} sent more than the range {from}-{to}",
                holder.id
            ));
        }
        let len = c.len() as u64;
        slot.received += len;
        slot.chunks.push_back(c);
        st.buffered += len;
        st.peak = st.peak.max(st.buffered);
        st.by_holder[n] += len;
        st.wake();
    }
    let mut st = shared.lock();
    if i < st.frontier {
        return Ok(());
    }
    let start = st.piece_start(i);
    let slot = st.slot(i);
    match slot.owner {
        Some((o, since)) if o == n => {
            if slot.received < slot.len {
                let at = start + slot.received;
                return Err(format!(
                    "peer {} ended the range {from}-{to} at byte {at}",
                    holder.id
                ));
            }
            slot.owner = None;
            let took = since.elapsed();
            if st.times.len() == TIMES {
                st.times.pop_front();
            }
            st.times.push_back(took);
            st.wake();
            Ok(())
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Pieces of 64 KiB (tests move a few MiB at most), the default lookahead.
    fn small(late_min: Duration) -> Layout {
        Layout {
            piece: 64 * 1024,
            lookahead: LOOKAHEAD,
            late_min,
        }
    }

    fn data(n: usize) -> Bytes {
        (0..n)
            .map(|i| (i * 7 + i / 251) as u8)
            .collect::<Vec<u8>>()
            .into()
    }

    /// A holder serving `data` in 16 KiB chunks, each after `delay`; it fails its
    /// `fail_on`-th request after half the range.
    fn holder(id: &str, data: Bytes, delay: Duration, fail_on: Option<usize>) -> Holder {
        let calls = Arc::new(AtomicUsize::new(0));
        Holder {
            id: id.into(),
            range: Arc::new(move |from, to| {
                let call = calls.fetch_add(1, Ordering::SeqCst);
                let bytes = data.slice(from as usize..=to as usize);
                let cut = fail_on == Some(call);
                async move {
                    let half = bytes.len() / 2;
                    let bytes = if cut { bytes.slice(..half) } else { bytes };
                    let chunks: Vec<Bytes> = (0..bytes.len())
                        .step_by(16 * 1024)
                        .map(|i| bytes.slice(i..(i + 16 * 1024).min(bytes.len())))
                        .collect();
                    let s = futures_util::stream::iter(chunks)
                        .then(move |c| async move {
                            tokio::time::sleep(delay).await;
                            Ok(c)
                        })
                        .chain(futures_util::stream::iter(
                            cut.then(|| Err(io::Error::other("cut"))),
                        ));
                    Ok(s.boxed())
                }
                .boxed()
            }),
        }
    }

    /// `blob` from `start` on, fetched from `holders`, with a server's pieces ahead of its own.
    fn fetch(
        holders: Vec<Holder>,
        start: u64,
        blob: &Bytes,
        layout: Layout,
        store: &Store,
    ) -> Pieces {
        Pieces::new(
            holders,
            start,
            blob.len() as u64,
            layout,
            store.clone(),
            Ahead::default(),
        )
    }

    async fn store(limit: Option<u64>) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("s"), Default::default())
            .await
            .unwrap();
        store.set_memory_limit(limit);
        (dir, store)
    }

    async fn collect(
        mut p: Pieces,
        store: &Store,
        piece: u64,
    ) -> (Vec<u8>, Option<String>, Pieces) {
        let mut out = Vec::new();
        let mut err = None;
        while let Some(c) = tokio::time::timeout(Duration::from_secs(20), p.next())
            .await
            .expect("pieces within 20 s")
        {
            match c {
                Ok(c) => out.extend_from_slice(&c),
                Err(e) => {
                    err = Some(e.to_string());
                    break;
                }
            }
            // Never more than the lookahead taken from the budget by this fetch.
            assert!(store.memory_used() <= LOOKAHEAD as u64 * piece);
        }
        (out, err, p)
    }

    #[tokio::test]
    async fn pieces_come_in_order_from_every_holder_within_the_lookahead() {
        let blob = data(40 * 64 * 1024 + 123);
        let (_d, store) = store(None).await;
        let layout = small(LATE_MIN);
        let holders = vec![
            holder("a", blob.clone(), Duration::from_millis(1), None),
            holder("b", blob.clone(), Duration::from_millis(1), None),
            holder("c", blob.clone(), Duration::from_millis(3), None),
        ];
        let p = fetch(holders, 0, &blob, layout, &store);
        let (out, err, p) = collect(p, &store, layout.piece).await;
        assert_eq!(err, None);
        assert_eq!(out, blob);
        let by = p.by_holder();
        assert!(by.iter().all(|&n| n > 0), "every holder served: {by:?}");
        assert_eq!(by.iter().sum::<u64>(), blob.len() as u64);
        // The reorder buffer: the frontier piece plus the lookahead, at most.
        assert!(p.peak_buffered() <= (LOOKAHEAD as u64 + 1) * layout.piece);
        assert!(store.memory_peak() <= LOOKAHEAD as u64 * layout.piece);
        drop(p);
        assert_eq!(store.memory_used(), 0, "every permit given back");
    }

    #[tokio::test]
    async fn a_short_budget_fetches_fewer_pieces_ahead_never_more_memory() {
        let blob = data(24 * 64 * 1024);
        // Room for one piece ahead only (half the budget).
        let (_d, store) = store(Some(3 * 64 * 1024)).await;
        let layout = small(LATE_MIN);
        let holders = (0..3)
            .map(|i| holder(&i.to_string(), blob.clone(), Duration::from_millis(1), None))
            .collect();
        let p = fetch(holders, 0, &blob, layout, &store);
        let (out, err, p) = collect(p, &store, layout.piece).await;
        assert_eq!(err, None);
        assert_eq!(out, blob);
        // Pieces went ahead, one at a time.
        let peak = store.memory_peak();
        assert!(peak > 0 && peak <= 64 * 1024, "{peak}");
        assert!(p.peak_buffered() <= 2 * layout.piece);
    }

    /// The pump takes room in the same budget for every chunk it passes on; what it holds
    /// the store gives back when someone waits (written chunks leave the window), but
    /// pieces held ahead go back only as the pump passes them on. So pieces ahead, of
    /// every fetch together, must never take the whole budget: two fetches here, each of
    /// which would hold 4 pieces ahead in a budget of 6.
    ///
    /// What the store's windows hold does not stop pieces ahead: a lone fetch whose window
    /// holds half of a budget of 12 pieces still fetches from several holders at once
    /// (when it counted, the fetch took only its frontier piece, one holder at a time).
    #[tokio::test]
    async fn pieces_go_ahead_while_the_windows_hold_part_of_the_budget() {
        let piece = 64 * 1024;
        let blob = data(16 * piece as usize);
        let (_d, store) = store(Some(12 * piece)).await;
        let window = store.try_reserve_memory(6 * piece).unwrap();
        // Range requests open at once, counted until their body is dropped.
        struct Open(Arc<AtomicUsize>);
        impl Drop for Open {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let (open, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let holders = (0..4)
            .map(|i| {
                let h = holder(&i.to_string(), blob.clone(), Duration::from_millis(2), None);
                let (inner, open, most) = (h.range, open.clone(), most.clone());
                let range: RangeFn = Arc::new(move |from, to| {
                    let (inner, open, most) = (inner.clone(), open.clone(), most.clone());
                    Box::pin(async move {
                        most.fetch_max(open.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
                        let guard = Open(open);
                        let body = inner(from, to).await?;
                        Ok(body
                            .map(move |c| {
                                let _open = &guard;
                                c
                            })
                            .boxed())
                    })
                });
                Holder { id: h.id, range }
            })
            .collect();
        let layout = small(LATE_MIN);
        let mut p = fetch(holders, 0, &blob, layout, &store);
        let mut out = Vec::new();
        while let Some(c) = tokio::time::timeout(Duration::from_secs(20), p.next())
            .await
            .expect("pieces within 20 s")
        {
            out.extend_from_slice(&c.unwrap());
            assert!(store.memory_used() <= (6 + LOOKAHEAD as u64) * piece);
        }
        assert!(out == blob);
        assert!(
            most.load(Ordering::SeqCst) > 1,
            "one piece at a time: none was fetched ahead of the frontier"
        );
        assert!(p.by_holder().iter().filter(|b| **b > 0).count() > 1);
        drop(window);
        assert_eq!(store.memory_used(), 0, "every permit given back");
    }

    #[tokio::test]
    async fn pieces_ahead_leave_the_consumers_room_in_the_budget() {
        let piece = 64 * 1024;
        let blob = data(32 * piece as usize);
        let (_d, store) = store(Some(6 * piece)).await;
        let layout = small(LATE_MIN);
        // One server's fetches share their pieces ahead.
        let ahead = Ahead::default();
        let read = |n: usize| {
            let (blob, store, ahead) = (blob.clone(), store.clone(), ahead.clone());
            async move {
                let holders = (0..4)
                    .map(|i| {
                        holder(
                            &format!("{n}.{i}"),
                            blob.clone(),
                            Duration::from_millis(1),
                            None,
                        )
                    })
                    .collect();
                let mut p =
                    Pieces::new(holders, 0, blob.len() as u64, layout, store.clone(), ahead);
                let mut out = Vec::new();
                // The store's window: what the pump took, given back when someone waits.
                let mut window: Vec<MemoryPermit> = Vec::new();
                while let Some(c) = p.next().await {
                    let c = c.unwrap();
                    let len = c.len() as u64;
                    let permit = match store.try_reserve_memory(len) {
                        Some(p) => p,
                        None => {
                            window.clear();
                            store.reserve_memory(len).await
                        }
                    };
                    window.push(permit);
                    if window.len() > 8 {
                        window.remove(0);
                    }
                    out.extend_from_slice(&c);
                }
                out
            }
        };
        let both = futures_util::future::join(read(0), read(1));
        let (a, b) = tokio::time::timeout(Duration::from_secs(10), both)
            .await
            .expect("no fetch waits for room only pieces ahead hold");
        assert!(a == blob && b == blob);
    }

    #[tokio::test]
    async fn a_holder_cut_mid_piece_gives_it_back_and_is_not_asked_again() {
        let blob = data(16 * 64 * 1024 + 5);
        let (_d, store) = store(None).await;
        let layout = small(LATE_MIN);
        let holders = vec![
            holder("good", blob.clone(), Duration::from_millis(1), None),
            holder("cut", blob.clone(), Duration::from_millis(1), Some(1)),
        ];
        let p = fetch(holders, 0, &blob, layout, &store);
        let (out, err, p) = collect(p, &store, layout.piece).await;
        assert_eq!(err, None);
        assert_eq!(out, blob);
        // The cut holder served its first piece and half of its second, no more.
        assert_eq!(p.by_holder()[1], layout.piece + layout.piece / 2);
    }

    #[tokio::test]
    async fn a_late_frontier_piece_is_taken_over_by_a_faster_holder() {
        let blob = data(12 * 64 * 1024);
        let (_d, store) = store(None).await;
        let layout = small(Duration::from_millis(20));
        // "slow" would need 4 s for one piece; the test's deadline is 20 s, and without
        // the take-over the frontier would wait on it for every piece it takes.
        let holders = vec![
            holder("fast", blob.clone(), Duration::from_millis(1), None),
            holder("slow", blob.clone(), Duration::from_secs(1), None),
        ];
        let p = fetch(holders, 0, &blob, layout, &store);
        let (out, err, p) = collect(p, &store, layout.piece).await;
        assert_eq!(err, None);
        assert_eq!(out, blob);
        assert!(p.taken_over() >= 1);
        // The slow holder never finished a piece: every one it took went to the other.
        assert!(p.by_holder()[1] < layout.piece, "{:?}", p.by_holder());
    }

    #[tokio::test]
    async fn when_every_holder_fails_the_body_ends_with_an_error_at_the_frontier() {
        let blob = data(16 * 64 * 1024);
        let (_d, store) = store(None).await;
        let layout = small(LATE_MIN);
        let holders = vec![
            holder("a", blob.clone(), Duration::from_millis(1), Some(0)),
            holder("b", blob.clone(), Duration::from_millis(2), Some(0)),
        ];
        let start = 3 * 1024;
        let p = fetch(holders, start, &blob, layout, &store);
        let (out, err, _p) = collect(p, &store, layout.piece).await;
        let err = err.expect("an error at the end");
        assert!(err.contains("every node serving pieces failed"), "{err}");
        // What came is the blob from `start` on, in order, up to the frontier.
        assert_eq!(&out[..], &blob[start as usize..start as usize + out.len()]);
        assert!(
            err.contains(&format!("at byte {}", start as usize + out.len())),
            "{err}"
        );
    }
}
