//! Where a fetch gets a blob, in the plan's order: providers among the other nodes, then
//! the endpoints; and one fetch from upstream per cluster for a blob nobody holds.

use super::*;

/// How long a node waits, after announcing it is about to fetch a blob nobody holds, for
/// the announcements of other nodes about to do the same.
pub(super) const SETTLE: Duration = Duration::from_millis(150);

/// One upstream fetch per cluster: when no node holds a blob, every node about to fetch it
/// announces `inflight:<digest>`, waits briefly, and looks the key up; the node with the
/// lowest id fetches from upstream and the others stream from it while it downloads (its
/// peer API serves blobs in flight). Returns the nodes to stream from, empty when this
/// node is the fetcher. Announcements that raced past each other degrade to two fetches,
/// never to a failure; a stale announcement is a provider that answers 404, then skipped.
pub(super) async fn cluster_fetcher(
    svc: &Blobs,
    peers: &crate::peers::Peers,
    digest: &Digest,
) -> Vec<kagami_p2p::Peer> {
    let Some(me) = svc.cluster.me().map(str::to_string) else {
        return Vec::new();
    };
    let key = ContentKey::Inflight(digest.clone()).to_string();
    peers.router.advertise(vec![key.clone()]).await;
    tokio::time::sleep(SETTLE).await;
    let earlier: Vec<kagami_p2p::Peer> = peers
        .providers(&key)
        .await
        .into_iter()
        .filter(|p| p.id < me)
        .collect();
    let earlier = spread_followers(&me, digest, earlier);
    if let Some(first) = earlier.first() {
        tracing::debug!(%digest, from = %first.id, "another node is fetching this blob; streaming from it");
    }
    earlier
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

/// For the node fetching a blob for the cluster: looks at the announcements again after
/// 0.3, 1 and 3 s and returns a node with a lower id that announced the same blob (its
/// announcement had not arrived in time), to continue from it; otherwise never returns.
pub(super) async fn lower_fetcher(
    svc: &Blobs,
    peers: &crate::peers::Peers,
    digest: &Digest,
) -> kagami_p2p::Peer {
    if let Some(me) = svc.cluster.me() {
        let key = ContentKey::Inflight(digest.clone()).to_string();
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
}

/// Where a blob can come from, in the plan's order: providers among the other nodes
/// (when the registry is shared and P2P is on), then the endpoints.
pub(super) struct Sources<'a> {
    pub(super) svc: &'a Blobs,
    pub(super) plan: &'a kagami_config::Plan,
    pub(super) path: &'a OciPath,
    pub(super) digest: &'a Digest,
    pub(super) providers: Vec<kagami_p2p::Peer>,
    /// This node fetches the blob from an endpoint for the cluster (no other node had it
    /// or had announced it).
    pub(super) cluster_leader: bool,
}

impl<'a> Sources<'a> {
    pub(super) async fn new(
        svc: &'a Blobs,
        plan: &'a kagami_config::Plan,
        path: &'a OciPath,
        digest: &'a Digest,
    ) -> Sources<'a> {
        let wants_peers = plan
            .attempts
            .iter()
            .any(|a| matches!(a, kagami_config::Attempt::Peers));
        let mut cluster_leader = false;
        let providers = match svc.cluster.peers() {
            Some(p) if wants_peers => {
                let holders = p.providers(&digest.to_string()).await;
                if holders.is_empty() {
                    let earlier = cluster_fetcher(svc, p, digest).await;
                    cluster_leader = earlier.is_empty() && svc.cluster.me().is_some();
                    earlier
                } else {
                    holders
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
        }
    }

    /// The first source from `from` on that answers, at `offset`.
    pub(super) async fn open(
        &self,
        offset: u64,
        from: Attempt,
    ) -> Result<Opened, crate::upstream::UpstreamError> {
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
                )
                .await
        {
            let at = Attempt::Provider(b.attempt);
            return Ok(Opened {
                body: rate_guarded(self.svc, b),
                origin,
                at,
            });
        }
        let endpoint = match from {
            Attempt::Endpoint(i) => i,
            Attempt::Provider(_) => 0,
        };
        let b = self
            .svc
            .upstream
            .blob(self.plan, self.digest, offset, endpoint)
            .await?;
        Ok(Opened {
            at: Attempt::Endpoint(b.attempt),
            origin: Origin::Endpoint(b.source.clone()),
            body: rate_guarded(self.svc, b),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
