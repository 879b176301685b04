//! Claims: one upstream fetch per cluster decided by one node rather than by
//! announcements that may cross (docs/p2p.md, "One upstream fetch per cluster").
//!
//! Before a node fetches from upstream a blob no other node holds, it asks the blob's
//! *coordinator* for the claim on the digest; before it resolves a tag no other node has
//! resolved, it asks for the claim on the tag key (`tag:<registry>/<repository>:<tag>`).
//! The coordinator is chosen by rendezvous hashing: of this node and every member its
//! router knows with an HTTP address, the one whose `sha256(key, id)` is highest. Nodes that know the same members agree without
//! talking; the coordinator grants the first asker and answers every later asker with the
//! holder and the nodes that asked before it (they stream from those, so transfers form a
//! tree rooted at the holder). The holder renews its claim while it fetches and releases
//! it when done; a claim nobody renews expires after [`CLAIM_TTL`]. An asker that cannot
//! stream from the holder says so when it asks again; the coordinator then checks the
//! holder itself and, when the check fails, grants the claim to that asker.
//!
//! When the coordinator does not answer, the next node in the rendezvous order is asked
//! (every node that finds the first one dead agrees on the second); when neither answers,
//! the caller falls back to the `inflight:` announcements. A node is its own coordinator
//! without HTTP.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use kagami_p2p::Peer;
use sha2::{Digest as _, Sha256};

use super::{ContentKey, Peers};

/// How long a claim lives without being renewed: a holder renews every [`CLAIM_RENEW`];
/// one that died stops blocking the cluster after this (or sooner, when an asker reports
/// it and the coordinator's check fails).
pub(crate) const CLAIM_TTL: Duration = Duration::from_secs(10);
/// How often a holder renews its claim while it fetches.
pub(crate) const CLAIM_RENEW: Duration = Duration::from_secs(3);
/// After a holder stored the blob, later askers are still pointed at it this long (it
/// holds the blob; its provider record may not have reached them yet).
pub(crate) const DONE_KEEP: Duration = Duration::from_secs(30);
/// The most claims a coordinator keeps; when full (after dropping expired ones) it
/// refuses, and the asker falls back to announcements.
const MAX_CLAIMS: usize = 10_000;
/// The most askers remembered per claim (the ones a later asker may stream from).
pub(crate) const MAX_ASKERS: usize = 32;
/// How long an asker waits for a coordinator's answer (which may include a check of the
/// holder, [`CHECK_TIMEOUT`]). A dead coordinator refuses the connection at once; this
/// bounds a hung one, and is long enough that a merely busy one (a loaded node) is not
/// taken for dead, which would let the asker fall back to announcements and fetch too.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a coordinator waits for a holder to answer its check. A dead holder refuses
/// at once; a busy one must not lose its claim to a slow answer (that is a second
/// upstream fetch).
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);
/// How many coordinators, in rendezvous order, are asked before falling back.
const COORDINATORS_TRIED: usize = 2;
/// How long an asker waits for the HTTP address of a claim holder its router lists
/// without one (not proven yet: the router dials it again 2 s after a failure) before the
/// announcements decide, which would likely be a second upstream fetch.
const HOLDER_WAIT: Duration = Duration::from_secs(3);
/// How often it looks while it waits.
const HOLDER_POLL: Duration = Duration::from_millis(100);

/// A node as claims name it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClaimPeer {
    pub id: String,
    pub http_addr: SocketAddr,
}

impl From<&ClaimPeer> for Peer {
    fn from(p: &ClaimPeer) -> Peer {
        Peer {
            id: p.id.clone(),
            http_addr: p.http_addr,
        }
    }
}

/// What a release says about the holder's fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Release {
    /// The holder stored the blob: later askers stream from it for a while. From another
    /// asker: it stored the blob too (it is then named in [`ClaimAnswer::stored`]).
    Done,
    /// The holder's fetch ended without the blob: the next asker gets the claim.
    Failed,
}

/// `POST /p2p/claim/<digest>` on the coordinator's peer API.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ClaimRequest {
    /// The asker.
    pub asker: ClaimPeer,
    /// The holder the asker could not stream from (its id), to be checked.
    #[serde(default)]
    pub failed: Option<String>,
    /// Set by the holder to give the claim up.
    #[serde(default)]
    pub release: Option<Release>,
}

/// The coordinator's answer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClaimAnswer {
    /// Who holds the claim (the asker itself when `granted`).
    pub holder: ClaimPeer,
    /// The asker holds the claim: it fetches from upstream.
    pub granted: bool,
    /// Nodes that asked before this asker (the holder first), to stream from.
    #[serde(default)]
    pub earlier: Vec<ClaimPeer>,
    /// Nodes that said they stored the whole blob (the holder first, once done): the
    /// asker fetches from them as from providers, whose announcements may not be out yet.
    /// Absent from older coordinators' answers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stored: Vec<ClaimPeer>,
}

/// `GET /p2p/claim/<key>` on a coordinator: the nodes that said they stored it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoredAnswer {
    pub stored: Vec<ClaimPeer>,
}

struct Entry {
    holder: ClaimPeer,
    expires: Instant,
    done: bool,
    /// In the order they asked, the holder first.
    askers: Vec<ClaimPeer>,
    /// The nodes that said they stored it, in that order (at most [`MAX_ASKERS`]).
    stored: Vec<ClaimPeer>,
}

/// The claims this node coordinates.
#[derive(Default)]
pub(crate) struct Claims(Mutex<HashMap<String, Entry>>);

/// The coordinator's claim table is full.
#[derive(Debug)]
pub(crate) struct Full;

enum Step {
    Answer(ClaimAnswer),
    Check(ClaimPeer),
}

impl Claims {
    /// Answers `req` for `key` (a claim key's text); `check` tells whether a holder
    /// reported as failed still holds or fetches what the key names (called without the
    /// lock held, bounded by the caller).
    pub(crate) async fn ask<F, Fut>(
        &self,
        key: &str,
        req: &ClaimRequest,
        check: F,
    ) -> Result<Option<ClaimAnswer>, Full>
    where
        F: FnOnce(ClaimPeer) -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        match self.step(key, req, None)? {
            Step::Answer(a) => Ok(Some(a)),
            Step::Check(holder) => {
                let alive = check(holder.clone()).await;
                let checked = (!alive).then_some(holder.id.as_str());
                match self.step(key, req, checked.or(Some("")))? {
                    Step::Answer(a) => Ok(Some(a)),
                    Step::Check(_) => unreachable!("a checked request is answered"),
                }
            }
        }
        .map(|a| a.filter(|_| req.release.is_none()))
    }

    /// The nodes that said they stored what `key` names, while its claim lives; `None`
    /// when none did.
    pub(crate) fn stored(&self, key: &str) -> Option<Vec<ClaimPeer>> {
        let map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(key)
            .filter(|e| e.expires > Instant::now() && !e.stored.is_empty())
            .map(|e| e.stored.clone())
    }

    /// One look at the table. `checked` is `Some` on the second look, after the check:
    /// `Some(id)` when holder `id` failed it.
    fn step(&self, key: &str, req: &ClaimRequest, checked: Option<&str>) -> Result<Step, Full> {
        let now = Instant::now();
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let asker = &req.asker;
        let grant = |map: &mut HashMap<String, Entry>, askers: Vec<ClaimPeer>| {
            map.insert(
                key.to_string(),
                Entry {
                    holder: asker.clone(),
                    expires: now + CLAIM_TTL,
                    done: false,
                    askers,
                    stored: Vec::new(),
                },
            );
            Step::Answer(ClaimAnswer {
                holder: asker.clone(),
                granted: true,
                earlier: Vec::new(),
                stored: Vec::new(),
            })
        };
        let live = map.get(key).is_some_and(|e| e.expires > now);
        if !live {
            if req.release.is_some() {
                map.remove(key);
                return Ok(Step::Answer(not_granted(asker)));
            }
            if map.len() >= MAX_CLAIMS {
                map.retain(|_, e| e.expires > now);
                if map.len() >= MAX_CLAIMS {
                    return Err(Full);
                }
            }
            return Ok(grant(&mut map, vec![asker.clone()]));
        }
        let e = map.get_mut(key).expect("live");
        if e.holder.id == asker.id {
            match req.release {
                Some(Release::Done) => {
                    e.done = true;
                    e.expires = now + DONE_KEEP;
                    e.add_stored(asker);
                }
                Some(Release::Failed) => {
                    map.remove(key);
                }
                None => e.expires = now + CLAIM_TTL,
            }
            return Ok(grant_again(asker));
        }
        if req.release.is_some() {
            if req.release == Some(Release::Done) {
                e.add_stored(asker);
            }
            return Ok(Step::Answer(not_granted(asker)));
        }
        if req.failed.as_deref() == Some(e.holder.id.as_str()) {
            match checked {
                None => return Ok(Step::Check(e.holder.clone())),
                Some(id) if id == e.holder.id => {
                    let mut askers = std::mem::take(&mut e.askers);
                    askers.retain(|p| p.id != id && p.id != asker.id);
                    askers.insert(0, asker.clone());
                    return Ok(grant(&mut map, askers));
                }
                // The holder passed the check (or changed meanwhile).
                Some(_) => {}
            }
        }
        let pos = match e.askers.iter().position(|p| p.id == asker.id) {
            Some(i) => i,
            None if e.askers.len() < MAX_ASKERS => {
                e.askers.push(asker.clone());
                e.askers.len() - 1
            }
            None => e.askers.len(),
        };
        let mut earlier: Vec<ClaimPeer> = e.askers[..pos].to_vec();
        if !earlier.iter().any(|p| p.id == e.holder.id) {
            earlier.insert(0, e.holder.clone());
        }
        Ok(Step::Answer(ClaimAnswer {
            holder: e.holder.clone(),
            granted: false,
            earlier,
            stored: e.stored.clone(),
        }))
    }
}

impl Entry {
    fn add_stored(&mut self, node: &ClaimPeer) {
        if self.stored.len() < MAX_ASKERS && !self.stored.iter().any(|p| p.id == node.id) {
            self.stored.push(node.clone());
        }
    }
}

fn not_granted(asker: &ClaimPeer) -> ClaimAnswer {
    ClaimAnswer {
        holder: asker.clone(),
        granted: false,
        earlier: Vec::new(),
        stored: Vec::new(),
    }
}

fn grant_again(asker: &ClaimPeer) -> Step {
    Step::Answer(ClaimAnswer {
        holder: asker.clone(),
        granted: true,
        earlier: Vec::new(),
        stored: Vec::new(),
    })
}

/// The rendezvous score of node `id` for claim key `key`: the highest coordinates.
/// SHA-256, not the standard library's hasher, so that nodes built by different Rust
/// versions agree.
fn score(key: &str, id: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"kagami claim coordinator v1\0");
    h.update(key.as_bytes());
    h.update(b"\0");
    h.update(id.as_bytes());
    h.finalize().into()
}

/// `ids` in the order nodes ask them to coordinate the claim on `key` (a blob's digest or
/// a tag key, as text): the coordinator first, then the one asked when it does not
/// answer, and so on.
pub fn coordinator_order(key: &str, ids: &[&str]) -> Vec<String> {
    let mut v: Vec<(&str, [u8; 32])> = ids.iter().map(|id| (*id, score(key, id))).collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    v.dedup_by(|a, b| a.0 == b.0);
    v.into_iter().map(|(id, _)| id.to_string()).collect()
}

/// Where a claim was decided: by a coordinator, or nowhere (no coordinator answered).
#[derive(Debug, Clone)]
pub(crate) enum Claimed {
    /// This node holds the claim.
    Granted,
    /// Another node holds it: stream from `earlier` (holder included), or fetch from
    /// `stored`, the nodes that hold it whole, when there are any.
    Held {
        holder: Peer,
        earlier: Vec<Peer>,
        stored: Vec<Peer>,
    },
}

/// Renews this node's claim on a key while it lives; released when dropped: as done when
/// `done` says what the key names is here by then (the blob stored, the tag resolved),
/// else as failed (the next asker gets the claim).
pub(crate) struct ClaimGuard {
    renew: tokio::task::JoinHandle<()>,
    peers: std::sync::Arc<Peers>,
    me: String,
    key: ContentKey,
    done: Box<dyn Fn() -> bool + Send + Sync>,
}

impl ClaimGuard {
    pub(crate) fn start(
        peers: &std::sync::Arc<Peers>,
        me: &str,
        key: ContentKey,
        done: impl Fn() -> bool + Send + Sync + 'static,
    ) -> ClaimGuard {
        let (p, m, k) = (peers.clone(), me.to_string(), key.clone());
        let renew = tokio::spawn(async move {
            loop {
                tokio::time::sleep(CLAIM_RENEW).await;
                // A renewal never asks for a check: nothing to check locally.
                p.claim(&m, &k, None, None, &|| true).await;
            }
        });
        ClaimGuard {
            renew,
            peers: peers.clone(),
            me: me.to_string(),
            key,
            done: Box::new(done),
        }
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        self.renew.abort();
        let release = if (self.done)() {
            Release::Done
        } else {
            Release::Failed
        };
        let (p, m, k) = (self.peers.clone(), self.me.clone(), self.key.clone());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                p.claim(&m, &k, None, Some(release), &|| true).await;
            });
        }
    }
}

impl Peers {
    /// This node as claims name it, when its peer HTTP address is known.
    fn claim_self(&self, me: &str) -> Option<ClaimPeer> {
        Some(ClaimPeer {
            id: me.to_string(),
            http_addr: *self.own_http_addr.get()?,
        })
    }

    /// Member `p` at the peer HTTP address this node's router knows for it: never the
    /// address a claim names (a member could name another host's, and peer requests
    /// carry the token; docs/security.md). `None` for a node this router does not know.
    fn known(p: &ClaimPeer, members: &HashMap<String, SocketAddr>) -> Option<Peer> {
        Some(Peer {
            id: p.id.clone(),
            http_addr: *members.get(&p.id)?,
        })
    }

    /// `nodes` other than this one (`me`), at the addresses this node's router knows (see
    /// [`Peers::known`]); nodes it does not know are left out.
    fn known_others(
        nodes: &[ClaimPeer],
        me: &str,
        members: &HashMap<String, SocketAddr>,
    ) -> Vec<Peer> {
        nodes
            .iter()
            .filter(|p| p.id != me)
            .filter_map(|p| Self::known(p, members))
            .collect()
    }

    /// The members' peer HTTP addresses, and the ids of `key`'s coordinators in the order
    /// nodes ask them (this node, `me`, among them).
    fn coordinators(
        &self,
        me: &str,
        key: &ContentKey,
    ) -> (HashMap<String, SocketAddr>, Vec<String>) {
        let members = self.member_addrs();
        let mut ids: Vec<&str> = members.keys().map(String::as_str).collect();
        ids.push(me);
        let order = coordinator_order(&key.to_string(), &ids);
        (members, order)
    }

    /// The claim holder at the address this node's router proved for it; when the router
    /// lists it without one yet, waits up to [`HOLDER_WAIT`] for it (refreshing `members`).
    /// The address the coordinator passed on is never used: any member could have put it
    /// there.
    async fn holder_known(
        &self,
        key: &ContentKey,
        holder: &ClaimPeer,
        members: &mut HashMap<String, SocketAddr>,
    ) -> Option<Peer> {
        if let Some(p) = Self::known(holder, members) {
            return Some(p);
        }
        if !self.router.members().iter().any(|m| m.id == holder.id) {
            return None;
        }
        tracing::info!(%key, holder = %holder.id, "the claim holder's HTTP address is not proven yet; waiting for it");
        let deadline = Instant::now() + HOLDER_WAIT;
        while Instant::now() < deadline {
            tokio::time::sleep(HOLDER_POLL).await;
            *members = self.member_addrs();
            if let Some(p) = Self::known(holder, members) {
                return Some(p);
            }
        }
        None
    }

    fn member_addrs(&self) -> HashMap<String, SocketAddr> {
        self.router
            .members()
            .into_iter()
            .filter_map(|m| Some((m.id, m.http_addr?)))
            .collect()
    }

    /// Asks the coordinators of `key` (a blob's digest or a tag key; this node included:
    /// answered here, without HTTP) for the claim; `failed` names a holder this node could
    /// not get it from, `local_has` tells whether this node holds or fetches what the key
    /// names (for a check of itself). `None` when no coordinator answered: the caller falls back to
    /// announcements.
    pub(crate) async fn claim(
        &self,
        me: &str,
        key: &ContentKey,
        failed: Option<&str>,
        release: Option<Release>,
        local_has: &(dyn Fn() -> bool + Send + Sync),
    ) -> Option<Claimed> {
        let asker = self.claim_self(me)?;
        let (mut members, order) = self.coordinators(me, key);
        let req = ClaimRequest {
            asker,
            failed: failed.map(str::to_string),
            release,
        };
        for id in order.iter().take(COORDINATORS_TRIED) {
            let answer = if id == me {
                // A full table (`Err`) answers nothing: the announcements decide.
                self.coordinate(me, key, &req, local_has)
                    .await
                    .ok()
                    .flatten()
            } else {
                let coordinator = Peer {
                    id: id.clone(),
                    http_addr: members[id],
                };
                match self.ask_remote(&coordinator, key, &req).await {
                    Ok(a) => a,
                    Err(why) => {
                        tracing::warn!(%key, coordinator = %id, why, "claim coordinator did not answer; trying the next");
                        continue;
                    }
                }
            };
            let Some(a) = answer else {
                // A release (no answer needed), or a full table: nothing more to ask.
                return None;
            };
            tracing::debug!(%key, coordinator = %id, members = members.len(), granted = a.granted, holder = %a.holder.id, "claim answered");
            if a.granted {
                return Some(Claimed::Granted);
            }
            let Some(holder) = self.holder_known(key, &a.holder, &mut members).await else {
                // A holder this node cannot reach safely: the announcements decide.
                let routed = self.router.members().iter().any(|m| m.id == a.holder.id);
                tracing::warn!(%key, holder = %a.holder.id, in_routing_table = routed, claimed = %a.holder.http_addr, "the claim holder is not a member this node knows an HTTP address of; the announcements decide");
                return None;
            };
            let mut earlier = Self::known_others(&a.earlier, me, &members);
            if !earlier.iter().any(|p| p.id == holder.id) {
                earlier.insert(0, holder.clone());
            }
            let stored = Self::known_others(&a.stored, me, &members);
            return Some(Claimed::Held {
                holder,
                earlier,
                stored,
            });
        }
        None
    }

    /// Answers a claim request as its coordinator (from the peer API, or from this node
    /// itself). A holder reported as failed is checked: itself locally, another node over
    /// its peer API.
    pub(crate) async fn coordinate(
        &self,
        me: &str,
        key: &ContentKey,
        req: &ClaimRequest,
        local_has: &(dyn Fn() -> bool + Send + Sync),
    ) -> Result<Option<ClaimAnswer>, Full> {
        self.claims
            .ask(&key.to_string(), req, |holder| async move {
                if holder.id == me {
                    return local_has();
                }
                self.holds(&Peer::from(&holder), key).await
            })
            .await
    }

    /// What this node, as a coordinator, was told stored `key` (see [`Claims::stored`]).
    pub(crate) fn stored_here(&self, key: &ContentKey) -> Option<Vec<ClaimPeer>> {
        self.claims.stored(&key.to_string())
    }

    /// The nodes that told `key`'s coordinator (asked as for a claim: this node locally,
    /// else the first two in the rendezvous order) they stored what it names, minus this
    /// node and nodes its router does not know. Empty when none answers: a coordinator of
    /// an older version answers `405`.
    pub(crate) async fn stored_holders(&self, me: &str, key: &ContentKey) -> Vec<Peer> {
        let (members, order) = self.coordinators(me, key);
        for id in order.iter().take(COORDINATORS_TRIED) {
            let stored = if id == me {
                self.stored_here(key).unwrap_or_default()
            } else {
                let coordinator = Peer {
                    id: id.clone(),
                    http_addr: members[id],
                };
                let path = format!("/p2p/claim/{}", crate::path::encode(&key.to_string()));
                let r = self
                    .request(&coordinator, reqwest::Method::GET, &path)
                    .timeout(CHECK_TIMEOUT)
                    .send()
                    .await;
                let Ok(resp) = r else { continue };
                if resp.status() != reqwest::StatusCode::OK {
                    return Vec::new();
                }
                match super::read_bounded(resp, 64 * 1024).await {
                    Some(body) => serde_json::from_slice::<StoredAnswer>(&body)
                        .map(|a| a.stored)
                        .unwrap_or_default(),
                    None => Vec::new(),
                }
            };
            return Self::known_others(&stored, me, &members);
        }
        Vec::new()
    }

    /// Whether `peer` answers that it holds or fetches what `key` names (the
    /// coordinator's check).
    async fn holds(&self, peer: &Peer, key: &ContentKey) -> bool {
        let path = format!("/p2p/has/{}", crate::path::encode(&key.to_string()));
        let r = self
            .request(peer, reqwest::Method::GET, &path)
            .timeout(CHECK_TIMEOUT)
            .send()
            .await;
        matches!(r, Ok(r) if r.status() == reqwest::StatusCode::OK)
    }

    async fn ask_remote(
        &self,
        coordinator: &Peer,
        key: &ContentKey,
        req: &ClaimRequest,
    ) -> Result<Option<ClaimAnswer>, String> {
        let path = format!("/p2p/claim/{}", crate::path::encode(&key.to_string()));
        let resp = self
            .request(coordinator, reqwest::Method::POST, &path)
            .timeout(ASK_TIMEOUT)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(serde_json::to_vec(req).expect("serialisable"))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        match resp.status() {
            reqwest::StatusCode::OK => {}
            reqwest::StatusCode::NO_CONTENT => return Ok(None),
            s => return Err(format!("answered {s}")),
        }
        let body = super::read_bounded(resp, 64 * 1024)
            .await
            .ok_or("answer unreadable or over 64 KiB")?;
        serde_json::from_slice(&body)
            .map(Some)
            .map_err(|e| format!("answer is not a claim: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kagami_config::Digest;

    fn peer(id: &str) -> ClaimPeer {
        ClaimPeer {
            id: id.into(),
            http_addr: "127.0.0.1:9".parse().unwrap(),
        }
    }

    fn ask(id: &str) -> ClaimRequest {
        ClaimRequest {
            asker: peer(id),
            failed: None,
            release: None,
        }
    }

    fn d() -> Digest {
        Digest::sha256_from_bytes(&Sha256::digest(b"claims"))
    }

    async fn answer(c: &Claims, req: ClaimRequest, alive: bool) -> ClaimAnswer {
        c.ask(&d().to_string(), &req, |_| async move { alive })
            .await
            .unwrap()
            .unwrap()
    }

    #[tokio::test]
    async fn the_first_asker_holds_and_later_ones_are_told_who_asked_before() {
        let c = Claims::default();
        assert!(answer(&c, ask("a"), true).await.granted);
        let b = answer(&c, ask("b"), true).await;
        assert!(!b.granted);
        assert_eq!(b.holder.id, "a");
        let c3 = answer(&c, ask("c"), true).await;
        let ids: Vec<&str> = c3.earlier.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        // Asking again keeps one's place; the holder renews.
        let b2 = answer(&c, ask("b"), true).await;
        assert_eq!(b2.earlier, vec![peer("a")]);
        assert!(answer(&c, ask("a"), true).await.granted);
    }

    #[tokio::test]
    async fn a_holder_that_fails_the_check_loses_the_claim_and_one_that_passes_keeps_it() {
        let c = Claims::default();
        answer(&c, ask("a"), true).await;
        let mut report = ask("b");
        report.failed = Some("a".into());
        let kept = answer(&c, report.clone(), true).await;
        assert!(!kept.granted, "a passed the check");
        assert!(answer(&c, report, false).await.granted);
        // A late report about the old holder does not take the claim from the new one.
        let mut late = ask("c");
        late.failed = Some("a".into());
        let c3 = answer(&c, late, false).await;
        assert_eq!(c3.holder.id, "b");
        assert!(!c3.granted);
    }

    #[tokio::test]
    async fn a_failed_release_frees_the_claim_and_a_done_one_points_at_the_holder() {
        let c = Claims::default();
        answer(&c, ask("a"), true).await;
        let mut rel = ask("a");
        rel.release = Some(Release::Failed);
        assert!(
            c.ask(&d().to_string(), &rel, |_| async { true })
                .await
                .unwrap()
                .is_none()
        );
        assert!(answer(&c, ask("b"), true).await.granted);
        rel.asker = peer("b");
        rel.release = Some(Release::Done);
        c.ask(&d().to_string(), &rel, |_| async { true })
            .await
            .unwrap();
        let a = answer(&c, ask("c"), true).await;
        assert_eq!((a.granted, a.holder.id.as_str()), (false, "b"));
        // A release by a node that does not hold the claim changes nothing.
        let mut stray = ask("z");
        stray.release = Some(Release::Failed);
        c.ask(&d().to_string(), &stray, |_| async { true })
            .await
            .unwrap();
        assert_eq!(answer(&c, ask("c"), true).await.holder.id, "b");
    }

    #[tokio::test]
    async fn nodes_that_stored_the_blob_are_named_to_later_askers() {
        let c = Claims::default();
        answer(&c, ask("a"), true).await;
        let b = answer(&c, ask("b"), true).await;
        assert!(b.stored.is_empty(), "nothing stored yet: {b:?}");
        let done = |id: &str| {
            let mut r = ask(id);
            r.release = Some(Release::Done);
            r
        };
        // A follower that stored it before the holder said so (or a stray report) is
        // named too: it holds the blob whole.
        assert!(
            c.ask(&d().to_string(), &done("b"), |_| async { true })
                .await
                .unwrap()
                .is_none()
        );
        assert!(
            c.ask(&d().to_string(), &done("a"), |_| async { true })
                .await
                .unwrap()
                .is_none()
        );
        assert!(
            c.ask(&d().to_string(), &done("b"), |_| async { true })
                .await
                .unwrap()
                .is_none()
        );
        let later = answer(&c, ask("c"), true).await;
        let ids: Vec<&str> = later.stored.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(ids, ["b", "a"]);
        assert!(!later.granted);
        // Older coordinators' answers have no `stored`: they still parse.
        let old: ClaimAnswer = serde_json::from_str(
            r#"{"holder":{"id":"a","http_addr":"127.0.0.1:9"},"granted":false,"earlier":[]}"#,
        )
        .unwrap();
        assert!(old.stored.is_empty());
    }

    #[test]
    fn every_node_computes_the_same_coordinator_and_they_spread() {
        let ids = ["n0", "n1", "n2", "n3", "n4"];
        let mut first = HashMap::new();
        for i in 0..200u32 {
            let digest = Digest::sha256_from_bytes(&Sha256::digest(i.to_be_bytes()));
            let order = coordinator_order(&digest.to_string(), &ids);
            let mut reversed = ids;
            reversed.reverse();
            assert_eq!(order, coordinator_order(&digest.to_string(), &reversed));
            assert_eq!(order.len(), 5);
            *first.entry(order[0].clone()).or_insert(0) += 1;
        }
        for id in ids {
            assert!(first.get(id).copied().unwrap_or(0) >= 20, "{first:?}");
        }
    }
}
