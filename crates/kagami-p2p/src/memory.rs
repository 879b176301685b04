//! Routers that share one in-process [`MemoryNetwork`]: deterministic, instant, for tests.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use crate::{BoxFuture, Member, Peer, Router};

/// The shared state of in-memory nodes: who is a member and which keys each advertised.
#[derive(Debug, Default)]
pub struct MemoryNetwork {
    nodes: Mutex<Nodes>,
    /// Key prefixes no lookup finds (see [`MemoryNetwork::hide_keys`]).
    hidden: Mutex<Vec<String>>,
    /// Every key advertised, with the node that advertised it, in order.
    announced: Mutex<Vec<(String, String)>>,
    /// Keys whose lookups find one node at most (see [`MemoryNetwork::show_only`]).
    only: Mutex<BTreeMap<String, String>>,
    /// (viewer, member): `viewer` lists `member` without an HTTP address (see
    /// [`MemoryNetwork::unprove`]).
    unproven: Mutex<BTreeSet<(String, String)>>,
}

#[derive(Debug, Default)]
struct Nodes {
    next_generation: u64,
    by_id: BTreeMap<String, MemoryNode>,
}

#[derive(Debug)]
struct MemoryNode {
    generation: u64,
    http_addr: SocketAddr,
    keys: BTreeSet<String>,
}

impl MemoryNetwork {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// A test hook: from now on no lookup finds a key starting with `prefix`, as if
    /// every announcement of such a key were still on its way (announcements that cross
    /// on a slow network). Advertising and withdrawing them still work.
    pub fn hide_keys(&self, prefix: impl Into<String>) {
        self.hidden
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(prefix.into());
    }

    /// A test hook: node `viewer` lists node `member` without an HTTP address, as a libp2p
    /// node lists a member whose address it has not proven yet, until [`MemoryNetwork::prove`].
    /// Lookups are not affected.
    pub fn unprove(&self, viewer: impl Into<String>, member: impl Into<String>) {
        self.unproven
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert((viewer.into(), member.into()));
    }

    /// A test hook: undoes [`MemoryNetwork::unprove`].
    pub fn prove(&self, viewer: &str, member: &str) {
        self.unproven
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&(viewer.to_owned(), member.to_owned()));
    }

    /// A test hook: the ids of the nodes that advertised `key`, once per advertisement,
    /// in order (withdrawn ones included).
    pub fn announcers(&self, key: &str) -> Vec<String> {
        self.announced
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|(_, k)| k == key)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// A test hook: from now on a lookup of `key` finds node `id` alone (if it advertised
    /// the key), as if the other nodes' announcements were still on their way.
    pub fn show_only(&self, key: impl Into<String>, id: impl Into<String>) {
        self.only
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key.into(), id.into());
    }

    fn hidden(&self, key: &str) -> bool {
        self.hidden
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .any(|p| key.starts_with(p.as_str()))
    }

    fn with<R>(&self, f: impl FnOnce(&mut Nodes) -> R) -> R {
        f(&mut self.nodes.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// One node on a [`MemoryNetwork`]. Dropping it leaves the network and forgets its keys.
#[derive(Debug)]
pub struct MemoryRouter {
    net: Arc<MemoryNetwork>,
    me: Peer,
    generation: u64,
}

impl MemoryRouter {
    /// Joins `net` as node `id`. A node already joined under the same id is replaced (as after a
    /// restart): its advertised keys are forgotten.
    pub fn join(net: &Arc<MemoryNetwork>, id: impl Into<String>, http_addr: SocketAddr) -> Self {
        let me = Peer {
            id: id.into(),
            http_addr,
        };
        let generation = net.with(|nodes| {
            nodes.next_generation += 1;
            let generation = nodes.next_generation;
            nodes.by_id.insert(
                me.id.clone(),
                MemoryNode {
                    generation,
                    http_addr,
                    keys: BTreeSet::new(),
                },
            );
            generation
        });
        MemoryRouter {
            net: Arc::clone(net),
            me,
            generation,
        }
    }

    /// This node as others see it.
    pub fn peer(&self) -> &Peer {
        &self.me
    }

    fn with_me(&self, f: impl FnOnce(&mut MemoryNode)) {
        self.net.with(|nodes| {
            if let Some(node) = nodes.by_id.get_mut(&self.me.id)
                && node.generation == self.generation
            {
                f(node);
            }
        });
    }
}

impl Drop for MemoryRouter {
    fn drop(&mut self) {
        self.net.with(|nodes| {
            if nodes
                .by_id
                .get(&self.me.id)
                .is_some_and(|n| n.generation == self.generation)
            {
                nodes.by_id.remove(&self.me.id);
            }
        });
    }
}

impl Router for MemoryRouter {
    fn ready(&self) -> BoxFuture<'_, bool> {
        Box::pin(async { true })
    }

    fn lookup(&self, key: &str, limit: usize) -> BoxFuture<'_, Vec<Peer>> {
        if self.net.hidden(key) {
            return Box::pin(async { Vec::new() });
        }
        let only = self
            .net
            .only
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .cloned();
        let found = self.net.with(|nodes| {
            nodes
                .by_id
                .iter()
                .filter(|(id, _)| only.as_ref().is_none_or(|o| o == *id))
                .filter(|(id, node)| **id != self.me.id && node.keys.contains(key))
                .take(limit)
                .map(|(id, node)| Peer {
                    id: id.clone(),
                    http_addr: node.http_addr,
                })
                .collect()
        });
        Box::pin(async move { found })
    }

    fn advertise(&self, keys: Vec<String>) -> BoxFuture<'_, ()> {
        self.net
            .announced
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(keys.iter().map(|k| (self.me.id.clone(), k.clone())));
        self.with_me(|node| node.keys.extend(keys));
        Box::pin(async {})
    }

    fn withdraw(&self, keys: Vec<String>) -> BoxFuture<'_, ()> {
        self.with_me(|node| {
            for key in &keys {
                node.keys.remove(key);
            }
        });
        Box::pin(async {})
    }

    fn members(&self) -> Vec<Member> {
        let unproven = self
            .net
            .unproven
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        self.net.with(|nodes| {
            nodes
                .by_id
                .iter()
                .filter(|(id, _)| **id != self.me.id)
                .map(|(id, node)| Member {
                    id: id.clone(),
                    http_addr: (!unproven.contains(&(self.me.id.clone(), id.clone())))
                        .then_some(node.http_addr),
                    addrs: Vec::new(),
                })
                .collect()
        })
    }
}
