//! The router conformance suite: the behaviour every [`Router`] must have, written once against
//! a [`Cluster`] factory and run for each implementation.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use kagami_p2p::{MemoryNetwork, MemoryRouter, Peer, Router};

use crate::support::{self, addr, always, eventually};

/// One started node and what others should see of it.
pub struct Node {
    pub router: Box<dyn Router>,
    pub peer: Peer,
}

/// Starts `n` nodes that know each other.
pub trait Cluster {
    async fn start(&mut self, n: usize) -> Vec<Node>;
    /// How long after a withdraw other nodes may still return the node.
    fn withdraw_grace(&self) -> Duration;
}

const FIND_WITHIN: Duration = Duration::from_secs(10);

fn key(name: &str) -> String {
    format!("sha256:{:0>64}", hex_of(name))
}

fn hex_of(name: &str) -> String {
    name.bytes().map(|b| format!("{b:02x}")).collect()
}

async fn lookup_ids(node: &Node, key: &str) -> Vec<String> {
    let mut ids: Vec<String> = node
        .router
        .lookup(key, 10)
        .await
        .into_iter()
        .map(|p| p.id)
        .collect();
    ids.sort();
    ids
}

pub async fn advertised_key_is_found_by_every_other_node(cluster: &mut impl Cluster) {
    let nodes = cluster.start(3).await;
    let k = key("found");
    let tag = "tag:docker.io/library/alpine:3.20".to_owned();
    nodes[0]
        .router
        .advertise(vec![k.clone(), tag.clone()])
        .await;
    for other in &nodes[1..] {
        for key in [&k, &tag] {
            let found = eventually(
                FIND_WITHIN,
                &format!("{} finds {} for {key}", other.peer.id, nodes[0].peer.id),
                || async {
                    let found = other.router.lookup(key, 10).await;
                    (!found.is_empty()).then_some(found)
                },
            )
            .await;
            assert_eq!(
                found,
                vec![nodes[0].peer.clone()],
                "peer id and http address"
            );
        }
    }
}

pub async fn unknown_key_is_empty_quickly(cluster: &mut impl Cluster) {
    let nodes = cluster.start(3).await;
    nodes[0].router.advertise(vec![key("something-else")]).await;
    for node in &nodes {
        for name in ["unknown-1", "unknown-2"] {
            let started = Instant::now();
            let found = node.router.lookup(&key(name), 10).await;
            let took = started.elapsed();
            assert!(found.is_empty(), "{found:?}");
            // A behaviour, not a benchmark: the default timeout is 150 ms.
            assert!(took < Duration::from_secs(1), "lookup took {took:?}");
        }
    }
}

pub async fn withdrawn_key_is_no_longer_found(cluster: &mut impl Cluster) {
    let nodes = cluster.start(3).await;
    let k = key("withdrawn");
    let kept = key("kept");
    nodes[0]
        .router
        .advertise(vec![k.clone(), kept.clone()])
        .await;
    eventually(FIND_WITHIN, "node 1 finds the key", || async {
        (!nodes[1].router.lookup(&k, 10).await.is_empty()).then_some(())
    })
    .await;
    nodes[0].router.withdraw(vec![k.clone()]).await;
    let grace = cluster.withdraw_grace() + Duration::from_secs(5);
    for other in &nodes[1..] {
        eventually(grace, "the withdrawn key disappears", || async {
            other.router.lookup(&k, 10).await.is_empty().then_some(())
        })
        .await;
    }
    // Withdrawing one key leaves the others; and it stays gone (no re-provide).
    always(
        Duration::from_secs(1),
        "the withdrawn key stays gone",
        || async { nodes[1].router.lookup(&k, 10).await.is_empty() },
    )
    .await;
    assert_eq!(
        nodes[2].router.lookup(&kept, 10).await,
        vec![nodes[0].peer.clone()]
    );
}

pub async fn a_node_never_returns_itself(cluster: &mut impl Cluster) {
    let nodes = cluster.start(3).await;
    let mine = key("mine");
    let shared = key("shared");
    nodes[0]
        .router
        .advertise(vec![mine.clone(), shared.clone()])
        .await;
    nodes[1].router.advertise(vec![shared.clone()]).await;
    nodes[2].router.advertise(vec![shared.clone()]).await;

    let mut want_from_0 = vec![nodes[1].peer.id.clone(), nodes[2].peer.id.clone()];
    want_from_0.sort();
    eventually(FIND_WITHIN, "node 0 finds nodes 1 and 2", || async {
        (lookup_ids(&nodes[0], &shared).await == want_from_0).then_some(())
    })
    .await;
    assert!(nodes[0].router.lookup(&mine, 10).await.is_empty());
    assert!(
        nodes[0]
            .router
            .members()
            .iter()
            .all(|m| m.id != nodes[0].peer.id)
    );

    // `limit` bounds the answer.
    let one = eventually(FIND_WITHIN, "node 2 finds one of nodes 0 and 1", || async {
        let found = nodes[2].router.lookup(&shared, 1).await;
        (!found.is_empty()).then_some(found)
    })
    .await;
    assert_eq!(one.len(), 1);
    assert!(
        one[0] == nodes[0].peer || one[0] == nodes[1].peer,
        "{one:?}"
    );
    assert!(nodes[2].router.lookup(&shared, 0).await.is_empty());
}

pub async fn members_are_the_other_nodes(cluster: &mut impl Cluster) {
    let nodes = cluster.start(3).await;
    assert!(nodes[0].router.ready().await);
    for node in &nodes {
        let mut want: Vec<&Peer> = nodes
            .iter()
            .map(|n| &n.peer)
            .filter(|p| *p != &node.peer)
            .collect();
        want.sort_by(|a, b| a.id.cmp(&b.id));
        let members = node.router.members();
        let got: Vec<(String, Option<SocketAddr>)> = members
            .iter()
            .map(|m| (m.id.clone(), m.http_addr))
            .collect();
        let want: Vec<(String, Option<SocketAddr>)> = want
            .iter()
            .map(|p| (p.id.clone(), Some(p.http_addr)))
            .collect();
        assert_eq!(got, want);
        assert!(node.router.ready().await);
    }
}

/// Nodes on one [`MemoryNetwork`].
pub struct MemoryCluster;

impl Cluster for MemoryCluster {
    async fn start(&mut self, n: usize) -> Vec<Node> {
        let net = MemoryNetwork::new();
        (0..n)
            .map(|i| {
                let router = MemoryRouter::join(
                    &net,
                    format!("node-{i}"),
                    addr(&format!("127.0.0.{}:5000", i + 2)),
                );
                let peer = router.peer().clone();
                Node {
                    router: Box::new(router),
                    peer,
                }
            })
            .collect()
    }

    fn withdraw_grace(&self) -> Duration {
        Duration::ZERO
    }
}

/// libp2p nodes on 127.0.0.2, .3, .4, …: the first alone, the others bootstrapping from it.
pub struct Libp2pCluster {
    dir: tempfile::TempDir,
}

impl Libp2pCluster {
    pub fn new() -> Self {
        support::init_tracing();
        Libp2pCluster {
            dir: tempfile::tempdir().unwrap(),
        }
    }
}

impl Cluster for Libp2pCluster {
    async fn start(&mut self, n: usize) -> Vec<Node> {
        let mut nodes: Vec<Node> = Vec::new();
        let mut bootstrap = Vec::new();
        for i in 0..n {
            let ip = format!("127.0.0.{}", i + 2);
            let mut config = support::config(self.dir.path(), &format!("node-{i}"), &ip, 5000);
            config.bootstrap = bootstrap.clone();
            let http_addr = config.http_addr;
            let router = support::start(config).await;
            if i == 0 {
                bootstrap = router.listen_multiaddrs();
            }
            let peer = Peer {
                id: router.local_peer_id(),
                http_addr,
            };
            nodes.push(Node {
                router: Box::new(router),
                peer,
            });
        }
        for node in &nodes {
            let others: Vec<String> = nodes
                .iter()
                .filter(|n| n.peer != node.peer)
                .map(|n| n.peer.id.clone())
                .collect();
            support::wait_members(node.router.as_ref(), &others).await;
        }
        nodes
    }

    fn withdraw_grace(&self) -> Duration {
        // Other nodes keep a provider record until its TTL (3 s in these tests) runs out:
        // Kademlia has no remote removal.
        Duration::from_secs(3)
    }
}

macro_rules! suite {
    ($module:ident, $cluster:expr) => {
        mod $module {
            #[allow(unused_imports)]
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn advertised_key_is_found_by_every_other_node() {
                super::advertised_key_is_found_by_every_other_node(&mut $cluster).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn unknown_key_is_empty_quickly() {
                super::unknown_key_is_empty_quickly(&mut $cluster).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn withdrawn_key_is_no_longer_found() {
                super::withdrawn_key_is_no_longer_found(&mut $cluster).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_node_never_returns_itself() {
                super::a_node_never_returns_itself(&mut $cluster).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn members_are_the_other_nodes() {
                super::members_are_the_other_nodes(&mut $cluster).await;
            }
        }
    };
}

suite!(memory, MemoryCluster);
suite!(libp2p, Libp2pCluster::new());
