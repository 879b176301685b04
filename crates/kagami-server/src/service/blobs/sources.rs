//! Where a fetch gets a blob, in the plan's order: providers among the other nodes, then
//! the endpoints; and one fetch from upstream per cluster for a blob nobody holds.

use super::*;

/// How long a node waits, after announcing it is about to fetch a blob nobody holds, for
/// the announcements of other nodes about to do the same.
pub(super) const SETTLE: Duration = Duration::from_millis(150);

/// How many times a follower asks for the claim again (its holder failed, or a new
/// holder failed too) before it goes to the endpoints itself.
const MAX_REASK: u32 = 3;

/// How many of the nodes that asked for the claim before it a follower tries (the holder
/// is always among them).
const CLAIM_SOURCES: usize = 4;

/// How many followers stream a blob in flight from one node, by the claim's order: the
/// followers form a tree of this fan-out with the holder at its root (see
/// [`tree_sources`]). Each node then sends the blob at most this many times while it
/// arrives, so a node's link needs this many times the rate of the link the blob comes
/// in by (a NIC of 1 Gbit/s or more against a registry link of a few hundred Mbit/s),
/// and 50 nodes are at most three hops from the holder.
pub(super) const FANOUT: usize = 4;

impl Blobs {
    /// Whether this node holds `digest` or is fetching it right now (a claim coordinator's
    /// check of a holder).
    pub(crate) fn holds_or_fetches(&self, digest: &Digest) -> bool {
        self.store.blob_size(digest).is_some()
            || self
                .fetches
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .any(|((d, _), f)| {
                    d == digest && !matches!(*f.state.borrow(), FetchState::Failed(_))
                })
    }
}

/// This node's part in a claim on a blob nobody holds (`peers::claims`).
pub(super) enum ClaimRole {
    /// No claim: P2P is off, another node holds the blob, or no coordinator answered.
    None,
    /// This node holds the claim and fetches from upstream; renewed until dropped.
    Holder(#[allow(dead_code)] ClaimGuard),
    /// Another node holds it; `asked` counts the times this node asked again.
    Follower {
        holder: kagami_p2p::Peer,
        asked: u32,
    },
}

/// Who fetches a blob nobody holds, for the cluster: this node when empty.
pub(super) struct ClusterFetch {
    /// The nodes to stream from.
    pub(super) sources: Vec<kagami_p2p::Peer>,
    pub(super) claim: ClaimRole,
    /// This node fetches, elected by announcements (no coordinator answered): it watches
    /// for a lower id that announced the blob too (see [`lower_fetcher`]).
    pub(super) elected: bool,
    /// `sources` hold the blob whole (the nodes that told its coordinator they stored it,
    /// before their announcements are out): fetched from as from providers.
    pub(super) whole: bool,
}

/// One upstream fetch per cluster. Every node about to fetch a blob nobody holds asks
/// the blob's claim coordinator (`peers::claims`): the first asker fetches from upstream,
/// every later one streams from the nodes that asked before it, the holder among them.
/// The holder announces `inflight:<digest>`, and so does every node no coordinator
/// answered: the announcements decide among those. Such a node waits briefly, looks the
/// key up, and the node with the lowest id fetches while
/// the others stream from it (its peer API serves blobs in flight). Announcements that
/// raced past each other degrade to two fetches, never to a failure; a stale
/// announcement is a provider that answers 404, then skipped.
pub(super) async fn cluster_fetcher(
    svc: &Blobs,
    peers: &Arc<crate::peers::Peers>,
    digest: &Digest,
) -> ClusterFetch {
    let Some(me) = svc.cluster.me().map(str::to_string) else {
        return ClusterFetch {
            sources: Vec::new(),
            claim: ClaimRole::None,
            elected: false,
            whole: false,
        };
    };
    let has = || svc.holds_or_fetches(digest);
    match claim(peers, &me, digest, None, &has).await {
        Some(crate::peers::Claimed::Granted) => {
            tracing::debug!(%digest, "claim granted; fetching this blob for the cluster");
            announce_fetching(peers, digest).await;
            return ClusterFetch {
                sources: Vec::new(),
                claim: ClaimRole::Holder(blob_claim_guard(peers, &me, digest, &svc.store)),
                elected: false,
                whole: false,
            };
        }
        Some(crate::peers::Claimed::Held { stored, .. }) if !stored.is_empty() => {
            tracing::debug!(%digest, holders = stored.len(), "nodes of this blob's claim have stored it; fetching from them");
            return ClusterFetch {
                sources: crate::peers::shuffled(stored),
                claim: ClaimRole::None,
                elected: false,
                whole: true,
            };
        }
        Some(crate::peers::Claimed::Held {
            holder, earlier, ..
        }) => {
            let sources = tree_sources(&me, digest, earlier, &holder);
            tracing::debug!(%digest, holder = %holder.id, from = %sources[0].id, "another node holds the claim on this blob; streaming");
            return ClusterFetch {
                sources,
                claim: ClaimRole::Follower { holder, asked: 0 },
                elected: false,
                whole: false,
            };
        }
        // Announcements may cross on a loaded machine or a slow network, and then two nodes
        // fetch: worth a line at the default log level.
        None => {
            tracing::warn!(%digest, "no claim coordinator answered; the announcements decide who fetches this blob");
            announce_fetching(peers, digest).await;
        }
    }
    tokio::time::sleep(SETTLE).await;
    let earlier: Vec<kagami_p2p::Peer> = peers
        .providers(&crate::peers::inflight_key(digest))
        .await
        .into_iter()
        .filter(|p| p.id < me)
        .collect();
    let earlier = spread_followers(&me, digest, earlier);
    if let Some(first) = earlier.first() {
        tracing::debug!(%digest, from = %first.id, "another node is fetching this blob; streaming from it");
    }
    ClusterFetch {
        elected: earlier.is_empty(),
        sources: earlier,
        claim: ClaimRole::None,
        whole: false,
    }
}

/// `holders` (providers of the blob, from the DHT) plus, when they are too few to fetch
/// in pieces from, the nodes that told the blob's claim coordinator they stored it: right
/// after a cluster-wide pull the DHT names only the nodes whose (deferred) announcements are
/// out, while the coordinator knows every node that stored it.
async fn more_holders(
    svc: &Blobs,
    peers: &crate::peers::Peers,
    digest: &Digest,
    expected: Option<u64>,
    mut holders: Vec<kagami_p2p::Peer>,
) -> Vec<kagami_p2p::Peer> {
    let Some(me) = svc.cluster.me() else {
        return holders;
    };
    if holders.len() >= 2 || expected.is_some_and(|s| s < super::pieces::MIN_BLOB) {
        return holders;
    }
    let stored = peers
        .stored_holders(me, &ContentKey::Digest(digest.clone()))
        .await;
    for p in crate::peers::shuffled(stored) {
        if !holders.iter().any(|h| h.id == p.id) {
            holders.push(p);
        }
    }
    holders
}

/// Asks for the claim on a blob (see [`crate::peers::Peers::claim`]).
async fn claim(
    peers: &crate::peers::Peers,
    me: &str,
    digest: &Digest,
    failed: Option<&str>,
    has: &(dyn Fn() -> bool + Send + Sync),
) -> Option<crate::peers::Claimed> {
    let key = ContentKey::Digest(digest.clone());
    peers.claim(me, &key, failed, None, has).await
}

/// Announces that this node fetches `digest` from upstream (`inflight:<digest>`), for
/// the nodes that no claim coordinator answers. Followers in a claim's tree do not
/// announce: every announcement is a DHT query and its stores on other nodes, and at the
/// start of a cluster-wide pull those compete for CPU with the holder's first bytes.
async fn announce_fetching(peers: &crate::peers::Peers, digest: &Digest) {
    let key = crate::peers::inflight_key(digest);
    peers.router.advertise(vec![key]).await;
}

/// Holds this node's claim on a blob: released as done once the store has it.
fn blob_claim_guard(
    peers: &Arc<crate::peers::Peers>,
    me: &str,
    digest: &Digest,
    store: &Store,
) -> ClaimGuard {
    let (store, d) = (store.clone(), digest.clone());
    ClaimGuard::start(peers, me, ContentKey::Digest(digest.clone()), move || {
        store.blob_size(&d).is_some()
    })
}

/// The order in which a follower tries the nodes that announced a blob before it: by a
/// hash of (its own id, theirs, the digest) rather than lowest id first, so that followers
/// spread over every earlier node (each streaming from the fetching node or from another
/// follower, verifying as it goes) instead of all streaming from the one fetching node.
/// Every earlier node has a lower id, so the chains end at the fetching node and never
/// loop.
pub(super) fn spread_followers(
    me: &str,
    digest: &Digest,
    mut earlier: Vec<kagami_p2p::Peer>,
) -> Vec<kagami_p2p::Peer> {
    use std::hash::{Hash, Hasher};
    earlier.sort_by_cached_key(|p| {
        // SipHash with fixed keys: the same order on every run and every node.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (me, &p.id, digest.to_string()).hash(&mut h);
        h.finish()
    });
    earlier
}

/// The nodes a follower streams a blob in flight from, in order, given the nodes that
/// asked for its claim before it (`earlier`, in the order they asked; the holder first):
/// the followers form a tree of fan-out [`FANOUT`] — the i-th asker streams from asker
/// (i - 1) / FANOUT — so that no node sends the blob more than FANOUT times while it
/// arrives and the chain from the holder stays short (a random choice among earlier
/// nodes gives some nodes more followers than their link carries and chains as long as
/// e·ln N). After its parent a follower tries the askers just before it, nearest first,
/// then the parent's ancestors, [`CLAIM_SOURCES`] in all with the holder always among
/// them: the followers of a parent that dies go on from distinct nodes, each of which
/// takes one more follower, rather than all from the parent's parent (which feeds FANOUT
/// already; measured at 20 nodes, the holder's orphaned children all went to the new
/// holder, which then fed 7 streams on a link for 5). A follower past the coordinator's
/// list of askers (it keeps [`crate::peers::MAX_ASKERS`]) sees the whole list: it picks
/// its parent among the list's leaves by hash instead, then its ancestors, then others
/// spread as in [`spread_followers`].
pub(super) fn tree_sources(
    me: &str,
    digest: &Digest,
    earlier: Vec<kagami_p2p::Peer>,
    holder: &kagami_p2p::Peer,
) -> Vec<kagami_p2p::Peer> {
    let k = earlier.len();
    let mut chain: Vec<usize> = Vec::new();
    if k > 0 {
        let mut parent = if k >= crate::peers::MAX_ASKERS {
            // Past the list: the leaves (no followers of their own in the list).
            let leaves = (k - 1) / FANOUT + 1;
            let order = spread_followers(me, digest, earlier[leaves.min(k - 1)..].to_vec());
            earlier
                .iter()
                .position(|p| p.id == order[0].id)
                .unwrap_or(0)
        } else {
            (k - 1) / FANOUT
        };
        loop {
            chain.push(parent);
            if parent == 0 {
                break;
            }
            parent = (parent - 1) / FANOUT;
        }
    }
    let at = |i: &usize| earlier[*i].clone();
    let others: Vec<usize> = (0..k).filter(|i| !chain.contains(i)).collect();
    let mut sources: Vec<kagami_p2p::Peer> = chain.first().map(at).into_iter().collect();
    if k >= crate::peers::MAX_ASKERS {
        // Every late follower sees the same list: spread them.
        sources.extend(chain.iter().skip(1).map(at));
        sources.extend(spread_followers(
            me,
            digest,
            others.iter().map(at).collect(),
        ));
    } else {
        // When the parent dies, its followers go on from the askers just before each of
        // them, nearest first: they are distinct, so every node takes at most one more
        // follower (its ancestors, each feeding FANOUT already, would take them all).
        sources.extend(others.iter().rev().map(at));
        sources.extend(chain.iter().skip(1).map(at));
    }
    sources.truncate(CLAIM_SOURCES);
    if !sources.iter().any(|p| p.id == holder.id) {
        if sources.len() == CLAIM_SOURCES {
            sources.pop();
        }
        sources.push(holder.clone());
    }
    sources
}

/// For the node fetching a blob for the cluster: looks at the announcements again after
/// 0.3, 1 and 3 s and returns a node with a lower id that announced the same blob (its
/// announcement had not arrived in time), to continue from it; otherwise never returns.
pub(super) async fn lower_fetcher(
    svc: &Blobs,
    peers: &crate::peers::Peers,
    digest: &Digest,
) -> kagami_p2p::Peer {
    if let Some(me) = svc.cluster.me() {
        let key = crate::peers::inflight_key(digest);
        for wait in [300, 700, 2000] {
            tokio::time::sleep(Duration::from_millis(wait)).await;
            let lowest = peers
                .providers(&key)
                .await
                .into_iter()
                .filter(|p| p.id.as_str() < me)
                .min_by(|a, b| a.id.cmp(&b.id));
            if let Some(p) = lowest {
                return p;
            }
        }
    }
    std::future::pending().await
}

/// Which source of [`Sources`] a body came from, so that a resume continues after the one
/// that failed: the providers (other nodes) first, then the plan's endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Attempt {
    /// The i-th provider among the other nodes.
    Provider(usize),
    /// The plan's endpoint attempt of this index (`BlobBody::attempt` of the upstream).
    Endpoint(usize),
}

impl Attempt {
    pub(super) fn next(self) -> Attempt {
        match self {
            Attempt::Provider(i) => Attempt::Provider(i + 1),
            Attempt::Endpoint(i) => Attempt::Endpoint(i + 1),
        }
    }
}

/// A body opened by [`Sources::open`]: where it came from and which attempt it was.
pub(super) struct Opened {
    pub(super) body: BlobBody,
    pub(super) origin: Origin,
    pub(super) at: Attempt,
    /// The body comes in pieces from several nodes (`pieces`): a digest mismatch names
    /// no single node.
    pub(super) pieces: bool,
}

/// Where a blob can come from, in the plan's order: providers among the other nodes
/// (when the registry is shared and P2P is on), then the endpoints.
pub(super) struct Sources<'a> {
    pub(super) svc: &'a Blobs,
    pub(super) plan: &'a kagami_config::Plan,
    pub(super) path: &'a OciPath,
    pub(super) digest: &'a Digest,
    pub(super) providers: Vec<kagami_p2p::Peer>,
    /// This node fetches the blob from an endpoint for the cluster, elected by
    /// announcements (no claim coordinator answered, no other node had it or had
    /// announced it).
    pub(super) cluster_leader: bool,
    /// This node's part in the blob's claim.
    claim: Mutex<ClaimRole>,
    /// The fetch's state, moved from `Connecting` to `ConnectingUpstream` when the sources
    /// come to the endpoints — at once when no node has the blob, or later when the nodes
    /// streamed from all failed (other nodes streaming from this one then wait for it as
    /// for a node connecting upstream, not as for one still looking among the nodes).
    state: &'a watch::Sender<FetchState>,
    /// `providers` hold the whole blob (providers of its digest, not of the blob in flight).
    whole: bool,
    /// The blob's size from its manifest, if known.
    expected: Option<u64>,
    /// This pass may fetch the blob in pieces from several providers (see `pieces`).
    pieces: bool,
}

impl<'a> Sources<'a> {
    pub(super) async fn new(
        svc: &'a Blobs,
        want: Wanted<'a>,
        pieces: bool,
        state: &'a watch::Sender<FetchState>,
    ) -> Sources<'a> {
        let (plan, path, digest, expected) = (want.plan, want.path, want.digest, want.expected);
        let wants_peers = plan
            .attempts
            .iter()
            .any(|a| matches!(a, kagami_config::Attempt::Peers));
        let mut cluster_leader = false;
        let mut claim = ClaimRole::None;
        let mut whole = false;
        let providers = match svc.cluster.peers() {
            Some(p) if wants_peers => {
                let holders = p.providers(&digest.to_string()).await;
                if holders.is_empty() {
                    let f = cluster_fetcher(svc, p, digest).await;
                    cluster_leader = f.elected;
                    whole = f.whole;
                    // A follower in a claim's tree (a cluster-wide pull) defers its
                    // announcement and reports the blob stored to the coordinator instead.
                    // The holder announces at once, so that every node finds at least one
                    // provider whatever coordinator it computes (a node that joined since
                    // may compute another); a node finding that one alone asks the
                    // coordinator for the others (`more_holders`).
                    if matches!(f.claim, ClaimRole::Follower { .. })
                        && let Some(me) = svc.cluster.me()
                    {
                        p.defer_announcement(me, digest);
                    }
                    claim = f.claim;
                    f.sources
                } else {
                    whole = true;
                    more_holders(svc, p, digest, expected, holders).await
                }
            }
            _ => Vec::new(),
        };
        Sources {
            svc,
            plan,
            path,
            digest,
            providers,
            cluster_leader,
            claim: Mutex::new(claim),
            state,
            whole,
            expected,
            pieces,
        }
    }

    /// The first source from `from` on that answers, at `offset`.
    pub(super) async fn open(
        &self,
        offset: u64,
        from: Attempt,
    ) -> Result<Opened, crate::upstream::UpstreamError> {
        if from == Attempt::Provider(0)
            && let Some(opened) = self.open_pieces(offset).await
        {
            return Ok(opened);
        }
        if let Attempt::Provider(i) = from
            && i < self.providers.len()
            && let Some(peers) = self.svc.cluster.peers()
            && let Some((b, origin)) = peers
                .blob(
                    &self.providers,
                    i,
                    &self.path.registry,
                    &self.path.repository,
                    self.digest,
                    offset,
                    self.whole,
                )
                .await
        {
            let at = Attempt::Provider(b.attempt);
            return Ok(Opened {
                body: rate_guarded(self.svc, b),
                origin,
                at,
                pieces: false,
            });
        }
        if let Attempt::Provider(_) = from
            && let Some(opened) = self.follow_claim(offset).await
        {
            return Ok(opened);
        }
        let endpoint = match from {
            Attempt::Endpoint(i) => i,
            Attempt::Provider(_) => 0,
        };
        if let Attempt::Provider(_) = from
            && !self.providers.is_empty()
        {
            // One upstream fetch per cluster did not hold for this blob: rare, and the
            // line that tells which node made the second fetch and why.
            let follower = matches!(
                *self.claim.lock().unwrap_or_else(PoisonError::into_inner),
                ClaimRole::Follower { .. }
            );
            tracing::info!(%self.digest, offset, nodes = self.providers.len(), follower, "no node that holds or fetches this blob could send it; fetching it from upstream");
        }
        self.state.send_if_modified(|s| {
            let connecting = matches!(s, FetchState::Connecting);
            if connecting {
                *s = FetchState::ConnectingUpstream;
            }
            connecting
        });
        let b = self
            .svc
            .upstream
            .blob(self.plan, self.digest, offset, endpoint)
            .await?;
        Ok(Opened {
            at: Attempt::Endpoint(b.attempt),
            origin: Origin::Endpoint(b.source.clone()),
            body: rate_guarded(self.svc, b),
            pieces: false,
        })
    }

    /// The blob in pieces from up to [`pieces::HOLDERS`] providers at once, from `offset`
    /// on: when at least two providers hold it whole and it is at least
    /// [`pieces::MIN_BLOB`] (its size from its manifest, else from the first provider's
    /// `HEAD`). Should every one of them fail, the next attempt is the provider after them.
    async fn open_pieces(&self, offset: u64) -> Option<Opened> {
        if !self.pieces || !self.whole || self.providers.len() < 2 {
            return None;
        }
        let peers = self.svc.cluster.peers()?;
        let used = &self.providers[..self.providers.len().min(pieces::HOLDERS)];
        let path =
            crate::peers::Peers::blob_path(&self.path.registry, &self.path.repository, self.digest);
        let size = match self.expected {
            Some(s) => s,
            None => peers.blob_size(&used[0], &path).await?,
        };
        if size < pieces::MIN_BLOB || offset >= size {
            return None;
        }
        let holders = used
            .iter()
            .map(|p| {
                let (peers, peer, path) = (peers.clone(), p.clone(), path.clone());
                let range: pieces::RangeFn = Arc::new(move |from, to| {
                    let (peers, peer, path) = (peers.clone(), peer.clone(), path.clone());
                    Box::pin(async move { peers.blob_range(&peer, &path, from, to).await })
                });
                pieces::Holder {
                    id: p.id.clone(),
                    range,
                }
            })
            .collect();
        tracing::debug!(digest = %self.digest, size, offset, holders = used.len(), "fetching the blob in pieces from several nodes");
        let stream = pieces::Pieces::new(
            holders,
            offset,
            size,
            pieces::Layout::default(),
            self.svc.store.clone(),
            self.svc.pieces_ahead.clone(),
        );
        let origin = Origin::Peer(used[0].id.clone());
        let last = used.len() - 1;
        let body = BlobBody {
            stream: stream.boxed(),
            size: Some(size),
            source: origin.to_string(),
            attempt: last,
        };
        Some(Opened {
            body: rate_guarded(self.svc, body),
            origin,
            at: Attempt::Provider(last),
            pieces: true,
        })
    }
}

impl Sources<'_> {
    /// A follower whose sources all failed asks for the claim again, naming the holder
    /// it knew: when the coordinator finds that holder gone, this node gets the claim
    /// and goes to the endpoints (`None`); otherwise it streams from the holder named
    /// (at `offset`). After [`MAX_REASK`] times, or when no coordinator answers, `None`.
    async fn follow_claim(&self, offset: u64) -> Option<Opened> {
        let peers = self.svc.cluster.peers()?;
        let me = self.svc.cluster.me()?;
        let has = || self.svc.holds_or_fetches(self.digest);
        loop {
            let (known, asked) = match &*self.claim.lock().unwrap_or_else(PoisonError::into_inner) {
                ClaimRole::Follower { holder, asked } if *asked < MAX_REASK => {
                    (holder.clone(), *asked)
                }
                _ => return None,
            };
            let answer = claim(peers, me, self.digest, Some(&known.id), &has).await;
            let holder = match answer {
                Some(crate::peers::Claimed::Granted) => {
                    tracing::info!(%self.digest, offset, failed = %known.id, "the claim holder failed; this node holds the claim now and continues from upstream");
                    announce_fetching(peers, self.digest).await;
                    let guard = blob_claim_guard(peers, me, self.digest, &self.svc.store);
                    *self.claim.lock().unwrap_or_else(PoisonError::into_inner) =
                        ClaimRole::Holder(guard);
                    return None;
                }
                Some(crate::peers::Claimed::Held { holder, .. }) => holder,
                None => {
                    *self.claim.lock().unwrap_or_else(PoisonError::into_inner) = ClaimRole::None;
                    return None;
                }
            };
            *self.claim.lock().unwrap_or_else(PoisonError::into_inner) = ClaimRole::Follower {
                holder: holder.clone(),
                asked: asked + 1,
            };
            if holder.id == known.id {
                // The coordinator found the holder alive: it is still starting its fetch
                // (its peer API waits only so long for that). Give it time before trying
                // it again: 0.25, 0.5, then 1 s.
                tokio::time::sleep(Duration::from_millis(250 << asked.min(2))).await;
            }
            if let Some((b, origin)) = peers
                .blob(
                    std::slice::from_ref(&holder),
                    0,
                    &self.path.registry,
                    &self.path.repository,
                    self.digest,
                    offset,
                    false,
                )
                .await
            {
                tracing::info!(%self.digest, offset, holder = %holder.id, "continuing from the claim holder");
                return Some(Opened {
                    body: rate_guarded(self.svc, b),
                    origin,
                    // Past the providers: a failure asks for the claim again.
                    at: Attempt::Provider(self.providers.len()),
                    pieces: false,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers(n: usize) -> Vec<kagami_p2p::Peer> {
        (0..n)
            .map(|i| kagami_p2p::Peer {
                id: format!("n{i:03}"),
                http_addr: "127.0.0.1:9".parse().unwrap(),
            })
            .collect()
    }

    #[test]
    fn followers_form_a_tree_of_bounded_fanout() {
        let digest = Digest::sha256_from_bytes(&[7; 32]);
        let all = peers(crate::peers::MAX_ASKERS);
        let holder = all[0].clone();
        let mut children = std::collections::HashMap::<String, usize>::new();
        for k in 1..all.len() {
            let earlier = all[..k].to_vec();
            let s = tree_sources(&all[k].id, &digest, earlier, &holder);
            // The parent first: asker (k - 1) / FANOUT.
            assert_eq!(s[0].id, all[(k - 1) / FANOUT].id, "asker {k}");
            assert!(s.len() <= CLAIM_SOURCES, "{s:?}");
            assert!(
                s.iter().any(|p| p.id == holder.id),
                "the holder is a fallback"
            );
            let mut ids: Vec<_> = s.iter().map(|p| p.id.clone()).collect();
            ids.dedup();
            assert_eq!(ids.len(), s.len(), "no node twice");
            *children.entry(s[0].id.clone()).or_default() += 1;
        }
        assert!(children.values().all(|&c| c <= FANOUT), "{children:?}");
        // The 32nd asker streams from asker 7, then goes on from the askers just before it,
        // then the holder (three hops up: 7, 1, 0).
        let s = tree_sources("x", &digest, all[..31].to_vec(), &holder);
        let ids: Vec<_> = s.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(ids, ["n007", "n030", "n029", "n000"]);
    }

    #[test]
    fn the_followers_of_a_dead_parent_go_on_from_distinct_nodes() {
        let digest = Digest::sha256_from_bytes(&[8; 32]);
        let all = peers(crate::peers::MAX_ASKERS);
        let holder = all[0].clone();
        // Every parent dies in turn: where its followers go next.
        let mut next_of = std::collections::HashMap::<String, Vec<String>>::new();
        for k in 1..all.len() {
            let s = tree_sources(&all[k].id, &digest, all[..k].to_vec(), &holder);
            if let Some(next) = s.get(1) {
                next_of
                    .entry(s[0].id.clone())
                    .or_default()
                    .push(next.id.clone());
            }
        }
        for (parent, next) in &next_of {
            let mut distinct = next.clone();
            distinct.sort();
            distinct.dedup();
            assert_eq!(distinct.len(), next.len(), "{parent}'s followers: {next:?}");
            assert!(!next.contains(parent));
        }
        // The holder's children: the second goes on from the first, the third from the
        // second, and so on (the first has nobody before it but the holder).
        assert_eq!(next_of["n000"], ["n001", "n002", "n003"]);
    }

    #[test]
    fn followers_past_the_askers_list_spread_over_its_leaves() {
        let digest = Digest::sha256_from_bytes(&[9; 32]);
        let all = peers(crate::peers::MAX_ASKERS);
        let mut first = std::collections::HashMap::<String, usize>::new();
        for i in 0..200 {
            let s = tree_sources(&format!("late{i}"), &digest, all.clone(), &all[0]);
            let parent: usize = s[0].id[1..].parse().unwrap();
            assert!(
                parent >= crate::peers::MAX_ASKERS / FANOUT,
                "{parent} is not a leaf"
            );
            assert!(s.iter().any(|p| p.id == "n000"), "{s:?}");
            *first.entry(s[0].id.clone()).or_default() += 1;
        }
        // 200 late followers over 24 leaves: none takes a large share.
        assert!(first.len() >= 12, "{first:?}");
        assert!(first.values().all(|&c| c <= 30), "{first:?}");
    }

    #[test]
    fn followers_spread_over_earlier_nodes() {
        let earlier: Vec<kagami_p2p::Peer> = ["a", "b", "c", "d"]
            .iter()
            .map(|id| kagami_p2p::Peer {
                id: id.to_string(),
                http_addr: "127.0.0.1:9".parse().unwrap(),
            })
            .collect();
        let mut first = std::collections::HashMap::new();
        for i in 0..200u32 {
            let digest =
                Digest::sha256_from_bytes(&<sha2::Sha256 as sha2::Digest>::digest(i.to_be_bytes()));
            let order = spread_followers("z", &digest, earlier.clone());
            assert_eq!(order.len(), 4, "every earlier node stays a fallback");
            assert_eq!(order, spread_followers("z", &digest, earlier.clone()));
            *first.entry(order[0].id.clone()).or_insert(0) += 1;
        }
        // 200 blobs over 4 nodes: each is tried first for some of them.
        for id in ["a", "b", "c", "d"] {
            assert!(first.get(id).copied().unwrap_or(0) >= 20, "{first:?}");
        }
    }
}
