//! The libp2p router: a private Kademlia DHT (`/kagami/kad/1.0.0`) over TCP, optionally a
//! pre-shared-key network (pnet), noise and yamux.
//!
//! - Keys are advertised as Kademlia *provider records* (`start_providing`), kept alive by
//!   Kademlia's own re-provide job and expiring `provider_ttl` after the last re-provide.
//! - A provider record only names a peer id. The peer's HTTP address travels two ways, both
//!   feeding one cache: identify's agent version (`kagami/<version> http=<addr>`), which every
//!   connected peer sends at once; and a DHT value record `/kagami/node/<peer-id>` → `<addr>`
//!   that each node puts when it joins and Kademlia re-publishes, fetched for providers this node
//!   has never been connected to.
//! - An HTTP address is used only when it is bound to the peer: its IP must be one the peer
//!   proved it has — the source of a connection it opened to this node, or an address this
//!   node dialled and reached it at (noise authenticates the peer id). Otherwise a member
//!   could aim the other nodes' token-carrying requests at any host. An unspecified IP
//!   (`0.0.0.0:port`) is taken as the peer's proven IP with that port.
//! - A member whose HTTP address is not proven yet is dialled on its claimed IP, from a new
//!   port (a dial from the listen port can collide with a connection of a node that
//!   restarted at the same address and fail), again after [`PROOF_RETRY`] until it is,
//!   each wait twice the last (at most [`RETRY_CAP`]); one whose address never came
//!   (identify lost on a loaded node) has its node record looked up the same way from
//!   [`RECORD_RETRY`] on. Until then the member is known but unusable: the claims of
//!   `kagami-server` leave it out, and a node missing the member that holds a claim would
//!   fetch from upstream itself.
//! - The swarm lives in one tokio task; the [`Router`] methods talk to it over a channel, and it
//!   answers every lookup by its deadline with what it has resolved by then.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::StreamExt;
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::Boxed;
use libp2p::core::upgrade::Version;
use libp2p::identity::Keypair;
use libp2p::kad::store::{MemoryStore, MemoryStoreConfig, RecordStore};
use libp2p::kad::{self, GetProvidersOk, GetRecordOk, QueryId, QueryResult, Quorum, RecordKey};
use libp2p::multiaddr::Protocol;
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm, Transport, identify, noise, tcp, yamux};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::capped_store::CappedStore;
use crate::keys::load_or_create_identity;
use crate::{BoxFuture, Member, P2pError, Peer, Router};

/// The Kademlia protocol name: kagami nodes form their own DHT, apart from any public one.
pub const KAD_PROTOCOL: &str = "/kagami/kad/1.0.0";
const IDENTIFY_PROTOCOL_VERSION: &str = "/kagami/1.0.0";
const NODE_RECORD_PREFIX: &str = "/kagami/node/";
const AGENT_HTTP_MARKER: &str = " http=";
/// How often to dial the bootstrap list again while this node is connected to no one.
const REBOOTSTRAP_INTERVAL: Duration = Duration::from_secs(10);
/// How long [`Libp2pRouter::start`] waits for the listener to report its address.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(5);

/// [`P2pConfig::max_provider_records_per_peer`] by default: a node advertises each blob and
/// tag it holds, and 100,000 is several times what a large node holds.
pub const DEFAULT_MAX_PROVIDER_RECORDS_PER_PEER: usize = 100_000;

/// Settings of a [`Libp2pRouter`]. [`P2pConfig::new`] fills in the defaults.
#[derive(Clone)]
pub struct P2pConfig {
    /// Where to listen for other nodes (port 0 picks a free port; see
    /// [`Libp2pRouter::listen_multiaddrs`]).
    pub listen: SocketAddr,
    /// This node's HTTP address for peers, published to the other nodes.
    pub http_addr: SocketAddr,
    /// The node's persistent ed25519 keypair, created with mode 0600 when missing.
    pub identity_path: PathBuf,
    /// Nodes to join through: `host:port` (a DNS name is resolved to all its addresses) or a
    /// multiaddr (`/ip4/…/tcp/…`, `/dns4/…/tcp/…`), either with or without `/p2p/<peer-id>`.
    pub bootstrap: Vec<String>,
    /// The network's pre-shared key: nodes without the same key cannot connect.
    pub psk: Option<[u8; 32]>,
    /// The longest a lookup waits for answers (default 150 ms).
    pub lookup_timeout: Duration,
    /// How long other nodes keep this node's provider records (default 10 min).
    pub provider_ttl: Duration,
    /// How often this node re-announces what it holds (default 3 min); keep it well under
    /// `provider_ttl`.
    pub reprovide_interval: Duration,
    /// The most provider records this node keeps for any one other node (default 100,000):
    /// beyond it that node's announcements are refused until some expire.
    pub max_provider_records_per_peer: usize,
}

impl P2pConfig {
    pub fn new(
        listen: SocketAddr,
        http_addr: SocketAddr,
        identity_path: impl Into<PathBuf>,
    ) -> Self {
        P2pConfig {
            listen,
            http_addr,
            identity_path: identity_path.into(),
            bootstrap: Vec::new(),
            psk: None,
            lookup_timeout: Duration::from_millis(150),
            provider_ttl: Duration::from_secs(10 * 60),
            reprovide_interval: Duration::from_secs(3 * 60),
            max_provider_records_per_peer: DEFAULT_MAX_PROVIDER_RECORDS_PER_PEER,
        }
    }
}

impl fmt::Debug for P2pConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("P2pConfig")
            .field("listen", &self.listen)
            .field("http_addr", &self.http_addr)
            .field("identity_path", &self.identity_path)
            .field("bootstrap", &self.bootstrap)
            .field("psk", &self.psk.map(|_| "<redacted>"))
            .field("lookup_timeout", &self.lookup_timeout)
            .field("provider_ttl", &self.provider_ttl)
            .field("reprovide_interval", &self.reprovide_interval)
            .field(
                "max_provider_records_per_peer",
                &self.max_provider_records_per_peer,
            )
            .finish()
    }
}

/// A bootstrap entry as written, checked at start and resolved at each (re-)bootstrap.
#[derive(Clone, Debug, PartialEq, Eq)]
enum BootstrapTarget {
    /// A multiaddr usable as it is.
    Addr(Multiaddr),
    /// A name (or IP literal) and port to resolve; `v4`/`v6` restrict the address family.
    Resolve {
        host: String,
        port: u16,
        peer: Option<PeerId>,
        family: Option<IpFamily>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum IpFamily {
    V4,
    V6,
}

fn parse_bootstrap(entry: &str) -> Result<BootstrapTarget, String> {
    let entry = entry.trim();
    if entry.starts_with('/') {
        let addr = Multiaddr::from_str(entry).map_err(|e| e.to_string())?;
        let mut parts = addr.iter();
        let (host, family) = match parts.next() {
            Some(Protocol::Dns(h)) => (h.to_string(), None),
            Some(Protocol::Dns4(h)) => (h.to_string(), Some(IpFamily::V4)),
            Some(Protocol::Dns6(h)) => (h.to_string(), Some(IpFamily::V6)),
            Some(Protocol::Ip4(_) | Protocol::Ip6(_)) => {
                if !addr.iter().any(|p| matches!(p, Protocol::Tcp(_))) {
                    return Err("a multiaddr must name a tcp port".to_owned());
                }
                return Ok(BootstrapTarget::Addr(addr));
            }
            _ => return Err("expected /ip4, /ip6, /dns, /dns4 or /dns6 first".to_owned()),
        };
        let Some(Protocol::Tcp(port)) = parts.next() else {
            return Err("expected /tcp/<port> after the host".to_owned());
        };
        let peer = match parts.next() {
            None => None,
            Some(Protocol::P2p(peer)) if parts.next().is_none() => Some(peer),
            Some(_) => return Err("only /p2p/<peer-id> may follow the port".to_owned()),
        };
        return Ok(BootstrapTarget::Resolve {
            host,
            port,
            peer,
            family,
        });
    }
    let (hostport, peer) = match entry.split_once("/p2p/") {
        Some((hostport, peer)) => (
            hostport,
            Some(PeerId::from_str(peer).map_err(|e| format!("bad peer id {peer:?}: {e}"))?),
        ),
        None => (entry, None),
    };
    let (host, port) = hostport
        .rsplit_once(':')
        .ok_or_else(|| "expected host:port or a multiaddr".to_owned())?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return Err("the host is empty".to_owned());
    }
    let port = port
        .parse::<u16>()
        .map_err(|_| format!("bad port {port:?}"))?;
    Ok(BootstrapTarget::Resolve {
        host: host.to_owned(),
        port,
        peer,
        family: None,
    })
}

/// Resolves the bootstrap list into dialable multiaddrs (ending in `/p2p/<id>` when known).
async fn resolve_bootstrap(targets: Vec<BootstrapTarget>) -> Vec<Multiaddr> {
    let mut out = Vec::new();
    for target in targets {
        match target {
            BootstrapTarget::Addr(addr) => out.push(addr),
            BootstrapTarget::Resolve {
                host,
                port,
                peer,
                family,
            } => match tokio::net::lookup_host((host.as_str(), port)).await {
                Ok(addrs) => {
                    for sa in addrs {
                        let keep = match family {
                            Some(IpFamily::V4) => sa.is_ipv4(),
                            Some(IpFamily::V6) => sa.is_ipv6(),
                            None => true,
                        };
                        if keep {
                            let mut addr = socket_multiaddr(sa);
                            if let Some(peer) = peer {
                                addr.push(Protocol::P2p(peer));
                            }
                            out.push(addr);
                        }
                    }
                }
                Err(e) => tracing::warn!(%host, port, error = %e, "cannot resolve bootstrap peer"),
            },
        }
    }
    out
}

fn socket_multiaddr(sa: SocketAddr) -> Multiaddr {
    Multiaddr::empty()
        .with(Protocol::from(sa.ip()))
        .with(Protocol::Tcp(sa.port()))
}

/// Splits a trailing `/p2p/<id>` off an address.
fn split_peer(mut addr: Multiaddr) -> (Multiaddr, Option<PeerId>) {
    match addr.iter().last() {
        Some(Protocol::P2p(peer)) => {
            addr.pop();
            (addr, Some(peer))
        }
        _ => (addr, None),
    }
}

/// The most IPs remembered per peer as proven.
const MAX_PROVEN_IPS: usize = 8;

/// How long after a failed proof of a member's HTTP address it is dialled again; the
/// wait doubles with each retry, up to [`RETRY_CAP`].
const PROOF_RETRY: Duration = Duration::from_secs(2);
/// The same for a node-record lookup of a member that never said its HTTP address.
const RECORD_RETRY: Duration = Duration::from_secs(30);
/// The longest wait between two retries of one member.
const RETRY_CAP: Duration = Duration::from_secs(120);

/// When each peer was last tried (a proof dial, a record lookup) and how many retries it
/// had, so that retries keep their interval and back off: a member that stays unreachable
/// on the IP it claims is not dialled every few seconds for ever.
#[derive(Default)]
struct Retries(HashMap<PeerId, (Instant, u32)>);

impl Retries {
    /// Whether `peer` is due: never tried, or last tried `every` × 2^retries ago or longer
    /// (at most [`RETRY_CAP`]); when it is, records `now` as its last try.
    fn due(&mut self, peer: PeerId, now: Instant, every: Duration) -> bool {
        match self.0.get_mut(&peer) {
            None => {
                self.0.insert(peer, (now, 0));
                true
            }
            Some((last, retries)) => {
                let wait = every.saturating_mul(1 << (*retries).min(16)).min(RETRY_CAP);
                if now.duration_since(*last) < wait {
                    return false;
                }
                *last = now;
                *retries += 1;
                true
            }
        }
    }

    /// Records a first try of `peer` at `now` unless it was tried before; whether it is
    /// the first.
    fn tried(&mut self, peer: PeerId, now: Instant) -> bool {
        if self.0.contains_key(&peer) {
            return false;
        }
        self.0.insert(peer, (now, 0));
        true
    }

    /// Forgets every peer `keep` rejects (proven, or no longer a member).
    fn retain(&mut self, mut keep: impl FnMut(&PeerId) -> bool) {
        self.0.retain(|p, _| keep(p));
    }
}

/// The IP an address starts with.
fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    match addr.iter().next() {
        Some(Protocol::Ip4(ip)) => Some(IpAddr::V4(ip)),
        Some(Protocol::Ip6(ip)) => Some(IpAddr::V6(ip)),
        _ => None,
    }
}

fn is_loopback(addr: &Multiaddr) -> bool {
    match addr.iter().next() {
        Some(Protocol::Ip4(ip)) => ip.is_loopback(),
        Some(Protocol::Ip6(ip)) => ip.is_loopback(),
        _ => false,
    }
}

fn agent_version(http_addr: SocketAddr) -> String {
    format!(
        "kagami/{}{AGENT_HTTP_MARKER}{http_addr}",
        env!("CARGO_PKG_VERSION")
    )
}

fn http_addr_from_agent(agent: &str) -> Option<SocketAddr> {
    if !agent.starts_with("kagami/") {
        return None;
    }
    let (_, rest) = agent.split_once(AGENT_HTTP_MARKER)?;
    rest.split_whitespace().next()?.parse().ok()
}

fn node_record_key(peer: &PeerId) -> RecordKey {
    RecordKey::new(&format!("{NODE_RECORD_PREFIX}{peer}"))
}

/// The HTTP address in `peer`'s node record, if the record is really about `peer`.
fn http_addr_from_record(peer: &PeerId, record: &kad::Record) -> Option<SocketAddr> {
    if record.key != node_record_key(peer) || record.publisher.is_some_and(|p| p != *peer) {
        return None;
    }
    std::str::from_utf8(&record.value).ok()?.parse().ok()
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    kad: kad::Behaviour<CappedStore>,
    identify: identify::Behaviour,
}

fn build_transport(
    keypair: &Keypair,
    psk: Option<[u8; 32]>,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, P2pError> {
    let noise = noise::Config::new(keypair).map_err(|e| P2pError::Transport(e.to_string()))?;
    let tcp = tcp::tokio::Transport::new(tcp::Config::new().nodelay(true));
    let timeout = Duration::from_secs(10);
    Ok(match psk {
        // pnet encrypts the raw TCP stream with the key before anything else is said: a node
        // without the key fails the noise handshake that follows and never connects.
        Some(key) => {
            let pnet = PnetConfig::new(PreSharedKey::new(key));
            tcp.and_then(move |socket, _| pnet.handshake(socket))
                .upgrade(Version::V1Lazy)
                .authenticate(noise)
                .multiplex(yamux::Config::default())
                .timeout(timeout)
                .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
                .boxed()
        }
        None => tcp
            .upgrade(Version::V1Lazy)
            .authenticate(noise)
            .multiplex(yamux::Config::default())
            .timeout(timeout)
            .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
            .boxed(),
    })
}

/// Nodes that keep each provider record and value record (Kademlia's k; libp2p's default
/// is 20). A query ends once the `REPLICATION` nodes closest to its key have answered, and
/// an announcement stores its record on those nodes, so this sets the DHT requests each
/// lookup and each announcement makes. At the start of a cluster-wide pull every node
/// looks up and announces several keys at once, and with 20 these requests took a third
/// of the machine's CPU for the first second (a profile of 20 nodes on two cores, where
/// each request costs ~0.3 ms in libp2p's closest-peers search alone). Five copies of a
/// record survive four of those nodes going away before the next re-provide
/// (`reprovide_interval`) puts it back on the five closest then.
const REPLICATION: std::num::NonZeroUsize = std::num::NonZeroUsize::new(5).unwrap();

/// Requests one query keeps in flight (Kademlia's alpha; libp2p's default is 3). Equal to
/// [`REPLICATION`]: when a node knows every member (see [`BUCKET_SIZE`]), the first round
/// asks exactly the nodes that hold the key's records, and a query ends after it; more in
/// flight would only add requests, and fewer would add rounds.
const LOOKUP_PARALLELISM: std::num::NonZeroUsize = REPLICATION;

/// Entries per k-bucket of the routing table (Kademlia's k is 20). The member list is the
/// routing table, and nodes agree on a blob's claim coordinator and on who warms an image
/// only when they know the same members: with 20 per bucket, the farthest bucket (half of
/// the cluster) is full beyond about 40 nodes and each node misses a few others, so two
/// coordinators grant the same blob (measured: twice the image from upstream at 50
/// nodes). With 256 per bucket every node can know every other in clusters up to about
/// 500 nodes; past that the views are partial again (docs/p2p-scaling.md).
pub const BUCKET_SIZE: std::num::NonZeroUsize = std::num::NonZeroUsize::new(256).unwrap();

/// How often a node runs a Kademlia bootstrap (a lookup of its own id and of a random id in
/// each bucket's range) once joined; libp2p's default is 5 minutes. Each lookup also makes
/// the nodes it asks learn this one, so that a node whose first lookups ran before most
/// others had joined learns them within half a minute. (Measured on 50 nodes started at
/// once: every node knew the 49 others within 5 s, before the first of these rounds.)
const MEMBERSHIP_REFRESH: Duration = Duration::from_secs(30);

fn build_kad(peer_id: PeerId, config: &P2pConfig) -> kad::Behaviour<CappedStore> {
    let mut kad_config = kad::Config::new(StreamProtocol::new(KAD_PROTOCOL));
    kad_config
        .set_kbucket_size(BUCKET_SIZE)
        .set_periodic_bootstrap_interval(Some(MEMBERSHIP_REFRESH))
        // Background queries (announcements, record fetches); lookups end by their own deadline.
        .set_query_timeout(Duration::from_secs(30))
        // A lookup for a key nobody holds must ask every one of the closest nodes, and
        // latency is rounds: all of them in one round.
        .set_parallelism(LOOKUP_PARALLELISM)
        .set_replication_factor(REPLICATION)
        .set_provider_record_ttl(Some(config.provider_ttl))
        .set_provider_publication_interval(Some(config.reprovide_interval))
        .set_record_ttl(Some(config.provider_ttl))
        .set_publication_interval(Some(config.reprovide_interval))
        .set_replication_interval(None);
    let store = CappedStore::new(
        MemoryStore::with_config(
            peer_id,
            MemoryStoreConfig {
                max_records: 65_536,
                max_value_bytes: 1024,
                max_providers_per_key: kad::K_VALUE.get(),
                max_provided_keys: 1_000_000,
            },
        ),
        peer_id,
        config.max_provider_records_per_peer,
    );
    let mut kad = kad::Behaviour::with_config(peer_id, store, kad_config);
    // Every node answers queries, whatever its addresses look like (by default a node is a
    // client until it has a confirmed external address, which loopback nodes never get).
    kad.set_mode(Some(kad::Mode::Server));
    kad
}

enum Command {
    Lookup {
        key: String,
        limit: usize,
        reply: oneshot::Sender<Vec<Peer>>,
    },
    Advertise(Vec<String>, oneshot::Sender<()>),
    Withdraw(Vec<String>, oneshot::Sender<()>),
}

/// State the swarm task shares with the handle, read without a round trip.
#[derive(Default)]
struct Shared {
    members: Mutex<Vec<Member>>,
    listen: Mutex<Vec<Multiaddr>>,
    ready: AtomicBool,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A [`Router`] on a private libp2p Kademlia DHT. Dropping it stops the node.
pub struct Libp2pRouter {
    commands: mpsc::Sender<Command>,
    shared: Arc<Shared>,
    peer_id: PeerId,
    lookup_timeout: Duration,
    task: tokio::task::JoinHandle<()>,
}

impl fmt::Debug for Libp2pRouter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Libp2pRouter")
            .field("peer_id", &self.peer_id)
            .finish_non_exhaustive()
    }
}

impl Libp2pRouter {
    /// Loads (or creates) the identity, starts listening and begins joining through the
    /// bootstrap list in the background. Returns once the listener is bound, so that
    /// [`Libp2pRouter::listen_multiaddrs`] is known. Must run inside a tokio runtime.
    pub async fn start(config: P2pConfig) -> Result<Libp2pRouter, P2pError> {
        Self::start_with(config, true).await
    }

    /// `http_from_identify: false` leaves node records as the only source of peers' HTTP
    /// addresses (tests of that path; in a small test network every node is connected to
    /// every other, so identify would always answer first).
    async fn start_with(
        config: P2pConfig,
        http_from_identify: bool,
    ) -> Result<Libp2pRouter, P2pError> {
        let bootstrap = config
            .bootstrap
            .iter()
            .map(|entry| {
                parse_bootstrap(entry).map_err(|reason| P2pError::Bootstrap {
                    entry: entry.clone(),
                    reason,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let keypair = load_or_create_identity(&config.identity_path)?;
        let peer_id = keypair.public().to_peer_id();
        let transport = build_transport(&keypair, config.psk)?;
        let identify = identify::Behaviour::new(
            identify::Config::new(IDENTIFY_PROTOCOL_VERSION.to_owned(), keypair.public())
                .with_agent_version(agent_version(config.http_addr)),
        );
        let behaviour = Behaviour {
            kad: build_kad(peer_id, &config),
            identify,
        };
        let mut swarm = Swarm::new(
            transport,
            behaviour,
            peer_id,
            libp2p::swarm::Config::with_tokio_executor()
                .with_idle_connection_timeout(Duration::from_secs(120)),
        );
        let listen_err = |reason: String| P2pError::Listen {
            addr: config.listen,
            reason,
        };
        // libp2p-tcp sets SO_REUSEPORT on its listeners, so binding a port another process
        // (say a second kagami) listens on would succeed and share it. A plain bind first
        // fails on a port in use.
        if config.listen.port() != 0 {
            drop(
                std::net::TcpListener::bind(config.listen)
                    .map_err(|e| listen_err(e.to_string()))?,
            );
        }
        swarm
            .listen_on(socket_multiaddr(config.listen))
            .map_err(|e| listen_err(e.to_string()))?;
        let deadline = Instant::now() + LISTEN_TIMEOUT;
        let first = loop {
            match tokio::time::timeout_at(deadline, swarm.select_next_some()).await {
                Ok(SwarmEvent::NewListenAddr { address, .. }) => break address,
                Ok(SwarmEvent::ListenerClosed { reason: Err(e), .. })
                | Ok(SwarmEvent::ListenerError { error: e, .. }) => {
                    return Err(listen_err(e.to_string()));
                }
                Ok(_) => {}
                Err(_) => return Err(listen_err("no listen address reported".to_owned())),
            }
        };
        tracing::info!(%peer_id, listen = %first, http_addr = %config.http_addr, "p2p router started");

        let shared = Arc::new(Shared::default());
        locked(&shared.listen).push(first);
        let alone = bootstrap.is_empty();
        shared.ready.store(alone, Ordering::Relaxed);
        let (commands, commands_rx) = mpsc::channel(1024);
        let (bootstrap_tx, bootstrap_rx) = mpsc::channel(4);
        let mut task = Task {
            swarm,
            local: peer_id,
            shared: Arc::clone(&shared),
            commands: commands_rx,
            bootstrap,
            bootstrap_tx,
            bootstrap_rx,
            bootstrap_in_flight: false,
            last_bootstrap: None,
            alone,
            joined: false,
            http_addr: config.http_addr,
            lookup_timeout: config.lookup_timeout,
            http_from_identify,
            http_addrs: HashMap::new(),
            proven_ips: HashMap::new(),
            listen_addrs: HashMap::new(),
            lookups: HashMap::new(),
            record_queries: HashMap::new(),
            resolving: HashSet::new(),
            proofs: Retries::default(),
            records: Retries::default(),
        };
        task.put_node_record();
        task.start_bootstrap();
        let task = tokio::spawn(task.run());
        Ok(Libp2pRouter {
            commands,
            shared,
            peer_id,
            lookup_timeout: config.lookup_timeout,
            task,
        })
    }

    /// This node's libp2p peer id.
    pub fn local_peer_id(&self) -> String {
        self.peer_id.to_string()
    }

    /// The addresses other nodes can bootstrap from, each ending in `/p2p/<peer-id>`.
    pub fn listen_multiaddrs(&self) -> Vec<String> {
        locked(&self.shared.listen)
            .iter()
            .map(|a| a.clone().with(Protocol::P2p(self.peer_id)).to_string())
            .collect()
    }

    async fn call<T: Default>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> T {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(make(tx)).await.is_err() {
            return T::default();
        }
        rx.await.unwrap_or_default()
    }
}

impl Drop for Libp2pRouter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Router for Libp2pRouter {
    fn ready(&self) -> BoxFuture<'_, bool> {
        Box::pin(async { self.shared.ready.load(Ordering::Relaxed) })
    }

    fn lookup(&self, key: &str, limit: usize) -> BoxFuture<'_, Vec<Peer>> {
        let key = key.to_owned();
        Box::pin(async move {
            if limit == 0 {
                return Vec::new();
            }
            // The task answers by the lookup deadline; this bound only guards a stuck task.
            let bound = self.lookup_timeout + Duration::from_secs(1);
            let call = self.call(|reply| Command::Lookup { key, limit, reply });
            tokio::time::timeout(bound, call).await.unwrap_or_default()
        })
    }

    fn advertise(&self, keys: Vec<String>) -> BoxFuture<'_, ()> {
        Box::pin(self.call(|reply| Command::Advertise(keys, reply)))
    }

    fn withdraw(&self, keys: Vec<String>) -> BoxFuture<'_, ()> {
        Box::pin(self.call(|reply| Command::Withdraw(keys, reply)))
    }

    fn members(&self) -> Vec<Member> {
        locked(&self.shared.members).clone()
    }
}

struct PendingLookup {
    limit: usize,
    deadline: Instant,
    /// Providers in the order found, never the local node.
    providers: Vec<PeerId>,
    /// The provider query has ended (no more providers will come).
    finished: bool,
    reply: oneshot::Sender<Vec<Peer>>,
}

struct Task {
    swarm: Swarm<Behaviour>,
    local: PeerId,
    shared: Arc<Shared>,
    commands: mpsc::Receiver<Command>,
    bootstrap: Vec<BootstrapTarget>,
    bootstrap_tx: mpsc::Sender<Vec<Multiaddr>>,
    bootstrap_rx: mpsc::Receiver<Vec<Multiaddr>>,
    bootstrap_in_flight: bool,
    last_bootstrap: Option<Instant>,
    /// The bootstrap list names no node but this one: ready without peers.
    alone: bool,
    /// The routing table was non-empty at the last look.
    joined: bool,
    http_addr: SocketAddr,
    lookup_timeout: Duration,
    http_from_identify: bool,
    /// Peers' HTTP addresses as they claim them, from identify and node records; used only
    /// through [`Task::http_addr_of`].
    http_addrs: HashMap<PeerId, SocketAddr>,
    /// The IPs each peer proved it has (see the module doc), most recent last, each with
    /// whether this node reached the peer there (else the peer connected from it).
    proven_ips: HashMap<PeerId, Vec<(IpAddr, bool)>>,
    /// Peers' listen addresses from identify (to dial a claimed IP and prove it).
    listen_addrs: HashMap<PeerId, Vec<Multiaddr>>,
    lookups: HashMap<QueryId, PendingLookup>,
    /// Node-record queries in flight, and the peer each is about.
    record_queries: HashMap<QueryId, PeerId>,
    resolving: HashSet<PeerId>,
    /// Members whose HTTP address is not proven yet: the last proof dial of each.
    proofs: Retries,
    /// Members that never said their HTTP address: the last node-record lookup of each.
    records: Retries,
}

impl Task {
    async fn run(mut self) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next_deadline = self.lookups.values().map(|l| l.deadline).min();
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                command = self.commands.recv() => match command {
                    Some(command) => self.on_command(command),
                    None => break,
                },
                Some(addrs) = self.bootstrap_rx.recv() => self.dial_bootstrap(addrs),
                () = sleep_until_opt(next_deadline), if next_deadline.is_some() => self.check_lookups(),
                _ = tick.tick() => self.on_tick(),
            }
        }
        tracing::debug!(peer_id = %self.local, "p2p router stopped");
    }

    fn kad(&mut self) -> &mut kad::Behaviour<CappedStore> {
        &mut self.swarm.behaviour_mut().kad
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Lookup { key, limit, reply } => {
                let id = self.kad().get_providers(RecordKey::new(&key));
                let deadline = Instant::now() + self.lookup_timeout;
                self.lookups.insert(
                    id,
                    PendingLookup {
                        limit,
                        deadline,
                        providers: Vec::new(),
                        finished: false,
                        reply,
                    },
                );
            }
            Command::Advertise(keys, reply) => {
                for key in keys {
                    if let Err(e) = self.kad().start_providing(RecordKey::new(&key)) {
                        tracing::warn!(%key, error = %e, "cannot advertise key");
                    }
                }
                let _ = reply.send(());
            }
            Command::Withdraw(keys, reply) => {
                for key in keys {
                    self.kad().stop_providing(&RecordKey::new(&key));
                }
                let _ = reply.send(());
            }
        }
    }

    fn on_tick(&mut self) {
        self.refresh_members();
        self.retry_unproven();
        let due = self
            .last_bootstrap
            .is_none_or(|t| t.elapsed() >= REBOOTSTRAP_INTERVAL);
        // Also when the table only holds peers this node has lost touch with (say they all
        // restarted on new addresses): dialling the list again costs one connection.
        let isolated = !self.joined || self.swarm.connected_peers().next().is_none();
        if isolated && due {
            self.start_bootstrap();
        }
    }

    fn start_bootstrap(&mut self) {
        if self.bootstrap.is_empty() || self.bootstrap_in_flight {
            return;
        }
        self.bootstrap_in_flight = true;
        self.last_bootstrap = Some(Instant::now());
        let targets = self.bootstrap.clone();
        let tx = self.bootstrap_tx.clone();
        tokio::spawn(async move {
            let _ = tx.send(resolve_bootstrap(targets).await).await;
        });
    }

    fn dial_bootstrap(&mut self, addrs: Vec<Multiaddr>) {
        self.bootstrap_in_flight = false;
        let own: Vec<Multiaddr> = self.swarm.listeners().cloned().collect();
        let (mut others, mut itself) = (0, 0);
        for addr in addrs {
            let (base, peer) = split_peer(addr);
            if peer == Some(self.local) || own.contains(&base) {
                itself += 1;
                continue;
            }
            others += 1;
            // Kademlia adds a peer it dialled once the peer confirms the protocol (so a node
            // that cannot connect, say without the PSK, never lists it); without a peer id in
            // the entry, the id is learnt from the connection.
            let result = match peer {
                Some(peer) => self.swarm.dial(
                    DialOpts::peer_id(peer)
                        .addresses(vec![base.clone()])
                        .build(),
                ),
                None => self.swarm.dial(base.clone()),
            };
            match result {
                Ok(()) => tracing::debug!(addr = %base, "dialling bootstrap peer"),
                Err(e) => tracing::debug!(addr = %base, error = %e, "cannot dial bootstrap peer"),
            }
        }
        // Not when nothing resolved: a name that fails to resolve now may resolve later.
        if others == 0 && itself > 0 && !self.alone {
            tracing::info!("the bootstrap list names only this node; ready alone");
            self.alone = true;
            self.shared.ready.store(true, Ordering::Relaxed);
        }
    }

    /// Publishes this node's HTTP address under `/kagami/node/<peer-id>`. Kademlia keeps it
    /// locally and re-publishes it every `reprovide_interval`.
    fn put_node_record(&mut self) {
        let record = kad::Record::new(
            node_record_key(&self.local),
            self.http_addr.to_string().into_bytes(),
        );
        if let Err(e) = self.kad().put_record(record, Quorum::One) {
            tracing::warn!(error = %e, "cannot store the node record");
        }
    }

    /// Rebuilds the member list from the routing table; on joining, announces what this node
    /// holds at once instead of waiting for the next re-provide.
    fn refresh_members(&mut self) {
        let resolved: HashMap<PeerId, SocketAddr> = self
            .http_addrs
            .keys()
            .filter_map(|p| self.http_addr_of(p).map(|a| (*p, a)))
            .collect();
        let Task { swarm, .. } = self;
        let mut members: Vec<Member> = swarm
            .behaviour_mut()
            .kad
            .kbuckets()
            .flat_map(|bucket| {
                bucket
                    .iter()
                    .map(|entry| {
                        let peer = *entry.node.key.preimage();
                        Member {
                            id: peer.to_string(),
                            http_addr: resolved.get(&peer).copied(),
                            addrs: entry.node.value.iter().map(ToString::to_string).collect(),
                        }
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        members.sort_by(|a, b| a.id.cmp(&b.id));
        let joined = !members.is_empty();
        *locked(&self.shared.members) = members;
        self.shared
            .ready
            .store(joined || self.alone, Ordering::Relaxed);
        if joined && !self.joined {
            tracing::info!(peer_id = %self.local, "joined the p2p network");
            self.put_node_record();
            let provided: Vec<RecordKey> = self
                .kad()
                .store_mut()
                .provided()
                .map(|r| r.key.clone())
                .collect();
            for key in provided {
                let _ = self.kad().start_providing(key);
            }
            let _ = self.kad().bootstrap();
        }
        self.joined = joined;
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Kad(event)) => self.on_kad(event),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(event)) => self.on_identify(event),
            SwarmEvent::NewListenAddr { address, .. } => {
                let mut listen = locked(&self.shared.listen);
                if !listen.contains(&address) {
                    listen.push(address);
                }
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                locked(&self.shared.listen).retain(|a| *a != address);
            }
            SwarmEvent::ConnectionEstablished {
                peer_id, endpoint, ..
            } => {
                tracing::debug!(peer = %peer_id, addr = %endpoint.get_remote_address(), "connected");
                // Dialled: the peer answered at that address; listened: it connected from it.
                if let Some(ip) = ip_of(endpoint.get_remote_address()) {
                    let ips = self.proven_ips.entry(peer_id).or_default();
                    let mut reached = endpoint.is_dialer();
                    ips.retain(|(i, r)| {
                        reached |= *i == ip && *r;
                        *i != ip
                    });
                    ips.push((ip, reached));
                    if ips.len() > MAX_PROVEN_IPS {
                        ips.remove(0);
                    }
                }
                self.refresh_members();
                self.check_lookups();
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::debug!(peer = ?peer_id, error = %error, "connection failed");
            }
            _ => {}
        }
    }

    fn on_identify(&mut self, event: identify::Event) {
        let identify::Event::Received { peer_id, info, .. } = event else {
            return;
        };
        let tcp_listen: Vec<Multiaddr> = info
            .listen_addrs
            .iter()
            .filter(|a| a.iter().any(|p| matches!(p, Protocol::Tcp(_))))
            .take(MAX_PROVEN_IPS)
            .cloned()
            .collect();
        self.listen_addrs.insert(peer_id, tcp_listen);
        if let Some(addr) = http_addr_from_agent(&info.agent_version)
            && self.http_from_identify
        {
            self.http_addrs.insert(peer_id, addr);
            self.prove_http_addr(peer_id);
        }
        // Peers that connected to us are only routable once we know where they listen.
        // A node listening on every interface also lists its loopback addresses; they are
        // useful only to a peer that reaches it over loopback (tests, one host), and dialling
        // them from elsewhere reaches the dialler itself.
        if info.protocols.iter().any(|p| p.as_ref() == KAD_PROTOCOL) {
            let via_loopback = is_loopback(&info.observed_addr);
            for addr in info.listen_addrs {
                if via_loopback || !is_loopback(&addr) {
                    self.kad().add_address(&peer_id, addr);
                }
            }
        }
        self.refresh_members();
        self.check_lookups();
    }

    fn on_kad(&mut self, event: kad::Event) {
        match event {
            kad::Event::OutboundQueryProgressed {
                id, result, step, ..
            } => match result {
                QueryResult::GetProviders(result) => {
                    let found = match result {
                        Ok(GetProvidersOk::FoundProviders { providers, .. }) => providers,
                        Ok(GetProvidersOk::FinishedWithNoAdditionalRecord { .. }) => HashSet::new(),
                        Err(e) => {
                            tracing::debug!(error = %e, "provider query failed");
                            HashSet::new()
                        }
                    };
                    let local = self.local;
                    let Some(lookup) = self.lookups.get_mut(&id) else {
                        return;
                    };
                    let mut new = Vec::new();
                    for peer in found {
                        if peer != local && !lookup.providers.contains(&peer) {
                            lookup.providers.push(peer);
                            new.push(peer);
                        }
                    }
                    lookup.finished |= step.last;
                    for peer in new {
                        self.resolve_http_addr(peer);
                    }
                    self.try_complete(id, Instant::now());
                }
                QueryResult::GetRecord(result) => {
                    let Some(peer) = self.record_queries.get(&id).copied() else {
                        return;
                    };
                    if let Ok(GetRecordOk::FoundRecord(found)) = result
                        && let Some(addr) = http_addr_from_record(&peer, &found.record)
                    {
                        self.http_addrs.entry(peer).or_insert(addr);
                        self.prove_http_addr(peer);
                        if let Some(mut query) = self.kad().query_mut(&id) {
                            query.finish();
                        }
                    }
                    if step.last {
                        self.record_queries.remove(&id);
                        self.resolving.remove(&peer);
                    }
                    self.check_lookups();
                }
                QueryResult::StartProviding(Err(e)) | QueryResult::RepublishProvider(Err(e)) => {
                    tracing::debug!(error = %e, "provider announcement incomplete");
                }
                QueryResult::PutRecord(Err(e)) | QueryResult::RepublishRecord(Err(e)) => {
                    tracing::debug!(error = %e, "node record publication incomplete");
                }
                _ => {}
            },
            kad::Event::RoutingUpdated { .. } => self.refresh_members(),
            _ => {}
        }
    }

    /// The HTTP address of `peer` when it is bound to the peer (see the module doc).
    fn http_addr_of(&self, peer: &PeerId) -> Option<SocketAddr> {
        let claimed = *self.http_addrs.get(peer)?;
        let proven = self.proven_ips.get(peer)?;
        let same_family = |ip: &&(IpAddr, bool)| ip.0.is_ipv4() == claimed.is_ipv4();
        if claimed.ip().is_unspecified() {
            // Where this node reached the peer (a listen address) rather than where a
            // connection came from (the source address the peer's kernel picked).
            let (ip, _) = proven
                .iter()
                .rev()
                .filter(same_family)
                .find(|(_, reached)| *reached)
                .or_else(|| proven.iter().rev().find(same_family))?;
            return Some(SocketAddr::new(*ip, claimed.port()));
        }
        // to_canonical: an IPv4 peer seen over an IPv6 socket (::ffff:a.b.c.d).
        proven
            .iter()
            .any(|(ip, _)| ip.to_canonical() == claimed.ip().to_canonical())
            .then_some(claimed)
    }

    /// Members whose HTTP address is not usable yet: proves a claimed one again (every
    /// [`PROOF_RETRY`]), looks up the node record of one that never came (every
    /// [`RECORD_RETRY`]).
    fn retry_unproven(&mut self) {
        let members: HashSet<PeerId> = self
            .swarm
            .behaviour_mut()
            .kad
            .kbuckets()
            .flat_map(|b| b.iter().map(|e| *e.node.key.preimage()).collect::<Vec<_>>())
            .collect();
        let unproven: Vec<PeerId> = members
            .iter()
            .filter(|p| self.http_addr_of(p).is_none())
            .copied()
            .collect();
        let keep: HashSet<PeerId> = unproven.iter().copied().collect();
        self.proofs.retain(|p| keep.contains(p));
        self.records.retain(|p| keep.contains(p));
        let now = Instant::now();
        for peer in unproven {
            if self.http_addrs.contains_key(&peer) {
                if self.proofs.due(peer, now, PROOF_RETRY) {
                    tracing::debug!(%peer, "proving a member's HTTP address again");
                    self.prove_http_addr(peer);
                }
            } else if self.records.due(peer, now, RECORD_RETRY) {
                self.resolve_http_addr(peer);
            }
        }
    }

    /// When `peer` claims an HTTP address on an IP it has not proven, dials its libp2p
    /// listen address on that IP, if it has one: reaching it there proves the IP.
    fn prove_http_addr(&mut self, peer: PeerId) {
        let Some(claimed) = self.http_addrs.get(&peer).copied() else {
            return;
        };
        if self.http_addr_of(&peer).is_some() {
            return;
        }
        let first = self.proofs.tried(peer, Instant::now());
        let on_ip: Vec<Multiaddr> = self
            .listen_addrs
            .get(&peer)
            .into_iter()
            .flatten()
            .filter(|a| ip_of(a) == Some(claimed.ip()))
            .cloned()
            .collect();
        if on_ip.is_empty() {
            if first {
                tracing::warn!(%peer, http_addr = %claimed, "peer's HTTP address is not on an IP it connects from or listens on: not used");
            }
            return;
        }
        // From a new port: what proves the IP is where the peer was reached, and a dial
        // from the listen port fails when that 4-tuple is still taken (seen as
        // `EADDRINUSE` when nodes restart at the same addresses).
        let dial = DialOpts::peer_id(peer)
            .condition(PeerCondition::Always)
            .addresses(on_ip)
            .allocate_new_port()
            .build();
        if let Err(e) = self.swarm.dial(dial) {
            tracing::debug!(%peer, error = %e, "cannot dial to check a peer's HTTP address");
        }
    }

    /// Fetches the node record of a provider whose HTTP address is unknown.
    fn resolve_http_addr(&mut self, peer: PeerId) {
        if self.http_addrs.contains_key(&peer) || self.resolving.contains(&peer) {
            return;
        }
        let id = self.kad().get_record(node_record_key(&peer));
        self.record_queries.insert(id, peer);
        self.resolving.insert(peer);
    }

    fn check_lookups(&mut self) {
        let now = Instant::now();
        let ids: Vec<QueryId> = self.lookups.keys().copied().collect();
        for id in ids {
            self.try_complete(id, now);
        }
    }

    /// Answers a lookup when it has `limit` resolved peers, when nothing more can come, or at
    /// its deadline (with what it has).
    fn try_complete(&mut self, id: QueryId, now: Instant) {
        let Some(lookup) = self.lookups.get(&id) else {
            return;
        };
        let resolved: Vec<Peer> = lookup
            .providers
            .iter()
            .filter_map(|p| {
                self.http_addr_of(p).map(|a| Peer {
                    id: p.to_string(),
                    http_addr: a,
                })
            })
            .take(lookup.limit)
            .collect();
        let waiting = lookup
            .providers
            .iter()
            .any(|p| !self.http_addrs.contains_key(p) && self.resolving.contains(p));
        let done = resolved.len() >= lookup.limit
            || (lookup.finished && !waiting)
            || now >= lookup.deadline;
        if !done {
            return;
        }
        let Some(lookup) = self.lookups.remove(&id) else {
            return;
        };
        if !lookup.finished
            && let Some(mut query) = self.kad().query_mut(&id)
        {
            query.finish();
        }
        let _ = lookup.reply.send(resolved);
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A member whose HTTP address could not be proven is tried again, at its interval and
    /// not more often, each member on its own clock, and from scratch once forgotten (it
    /// was proven, or left). Before, a failed proof dial was never retried: in 6 of 40
    /// runs of 50 nodes one node kept a member without an address for the whole run, and
    /// once that member held a blob's claim, so the node fetched the blob from upstream too.
    #[test]
    fn unproven_members_are_retried_at_their_interval() {
        let (a, b) = (PeerId::random(), PeerId::random());
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let every = Duration::from_secs(2);
        let mut r = Retries::default();
        assert!(r.due(a, at(0), every), "never tried: due");
        assert!(!r.due(a, at(1_999), every));
        assert!(r.due(b, at(1_000), every), "b has its own clock");
        assert!(r.due(a, at(2_000), every), "due again after the interval");
        assert!(!r.due(a, at(5_999), every), "then after twice the interval");
        assert!(r.due(a, at(6_000), every));
        assert!(!r.due(a, at(13_999), every));
        assert!(r.due(a, at(14_000), every));
        assert!(!r.tried(b, at(3_000)), "b was tried before");
        // Backing off stops at the cap.
        let cap = RETRY_CAP.as_millis() as u64;
        let mut t = 14_000;
        for _ in 0..20 {
            t += cap;
            assert!(r.due(a, at(t), every));
        }
        assert!(!r.due(a, at(t + cap - 1), every));
        r.retain(|p| *p != a);
        assert!(r.due(a, at(t + 1), every), "forgotten: due at once");
        assert!(r.tried(PeerId::random(), t0), "a new peer's first try");
    }

    /// The routing table, which is the member list, keeps every node of a cluster of a few
    /// hundred: with Kademlia's 20 per bucket a full bucket refuses the 21st node (and nodes
    /// of a 50-node cluster knew 42–46 of the 49 others, so that they disagreed on claim
    /// coordinators).
    #[test]
    fn the_routing_table_keeps_every_node_of_a_large_cluster() {
        let me = PeerId::random();
        let config = P2pConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            "127.0.0.1:5002".parse().unwrap(),
            "/nonexistent/key",
        );
        let mut kad = build_kad(me, &config);
        let addr: Multiaddr = "/ip4/127.0.0.2/tcp/5001".parse().unwrap();
        for _ in 0..300 {
            let added = kad.add_address(&PeerId::random(), addr.clone());
            assert!(matches!(added, kad::RoutingUpdate::Success), "{added:?}");
        }
        let kept: usize = kad.kbuckets().map(|b| b.num_entries()).sum();
        assert_eq!(kept, 300);
    }

    #[test]
    fn bootstrap_entries() {
        let peer = PeerId::random();
        assert_eq!(
            parse_bootstrap("127.0.0.2:5001").unwrap(),
            BootstrapTarget::Resolve {
                host: "127.0.0.2".into(),
                port: 5001,
                peer: None,
                family: None
            }
        );
        assert_eq!(
            parse_bootstrap(&format!("node-a.example:5001/p2p/{peer}")).unwrap(),
            BootstrapTarget::Resolve {
                host: "node-a.example".into(),
                port: 5001,
                peer: Some(peer),
                family: None
            }
        );
        assert_eq!(
            parse_bootstrap("[::1]:5001").unwrap(),
            BootstrapTarget::Resolve {
                host: "::1".into(),
                port: 5001,
                peer: None,
                family: None
            }
        );
        let ma = format!("/ip4/127.0.0.2/tcp/5001/p2p/{peer}");
        assert_eq!(
            parse_bootstrap(&ma).unwrap(),
            BootstrapTarget::Addr(ma.parse().unwrap())
        );
        assert_eq!(
            parse_bootstrap(&format!("/dns4/kagami.kube-system.svc/tcp/5001/p2p/{peer}")).unwrap(),
            BootstrapTarget::Resolve {
                host: "kagami.kube-system.svc".into(),
                port: 5001,
                peer: Some(peer),
                family: Some(IpFamily::V4)
            }
        );
        for bad in [
            "nohost",
            ":5001",
            "host:99999",
            "host:1/p2p/notapeer",
            "/ip4/127.0.0.1",
            "/dns4/x/udp/5",
            "/tcp/5",
        ] {
            assert!(parse_bootstrap(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn loopback_addresses() {
        assert!(is_loopback(&"/ip4/127.0.0.3/tcp/1".parse().unwrap()));
        assert!(is_loopback(&"/ip6/::1/tcp/1".parse().unwrap()));
        assert!(!is_loopback(&"/ip4/10.0.0.1/tcp/1".parse().unwrap()));
        assert!(!is_loopback(&"/dns4/localhost/tcp/1".parse().unwrap()));
    }

    #[test]
    fn agent_version_round_trip() {
        let addr: SocketAddr = "127.0.0.2:5000".parse().unwrap();
        assert_eq!(http_addr_from_agent(&agent_version(addr)), Some(addr));
        let v6: SocketAddr = "[::1]:5000".parse().unwrap();
        assert_eq!(http_addr_from_agent(&agent_version(v6)), Some(v6));
        assert_eq!(
            http_addr_from_agent("rust-libp2p/0.57 http=1.2.3.4:5"),
            None
        );
        assert_eq!(http_addr_from_agent("kagami/0.1.0"), None);
    }

    #[test]
    fn node_records_must_match_their_peer() {
        let peer = PeerId::random();
        let other = PeerId::random();
        let mut record = kad::Record::new(node_record_key(&peer), b"127.0.0.2:5000".to_vec());
        assert_eq!(
            http_addr_from_record(&peer, &record),
            Some("127.0.0.2:5000".parse().unwrap())
        );
        assert_eq!(http_addr_from_record(&other, &record), None);
        record.publisher = Some(other);
        assert_eq!(http_addr_from_record(&peer, &record), None);
    }

    /// Providers' HTTP addresses resolve through `/kagami/node/<peer-id>` records alone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn http_addresses_resolve_through_node_records() {
        let dir = tempfile::tempdir().unwrap();
        let mut nodes: Vec<Libp2pRouter> = Vec::new();
        let mut bootstrap = Vec::new();
        for i in 0..3u16 {
            let ip = format!("127.0.0.{}", i + 2);
            let mut config = P2pConfig::new(
                format!("{ip}:0").parse().unwrap(),
                format!("{ip}:{}", 7000 + i).parse().unwrap(),
                dir.path().join(format!("{i}.key")),
            );
            config.bootstrap = bootstrap.clone();
            let node = Libp2pRouter::start_with(config, false).await.unwrap();
            if i == 0 {
                bootstrap = node.listen_multiaddrs();
            }
            nodes.push(node);
        }
        nodes[0].advertise(vec!["sha256:beef".to_owned()]).await;
        let want = Peer {
            id: nodes[0].local_peer_id(),
            http_addr: "127.0.0.2:7000".parse().unwrap(),
        };
        for node in &nodes[1..] {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let found = node.lookup("sha256:beef", 10).await;
                if found == [want.clone()] {
                    break;
                }
                assert!(found.is_empty(), "{found:?}");
                assert!(Instant::now() < deadline, "not found through node records");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    #[tokio::test]
    async fn resolves_names_and_literals() {
        let peer = PeerId::random();
        let targets = vec![
            parse_bootstrap("localhost:5001").unwrap(),
            parse_bootstrap(&format!("127.0.0.3:5002/p2p/{peer}")).unwrap(),
        ];
        let addrs = resolve_bootstrap(targets).await;
        let want: Multiaddr = "/ip4/127.0.0.1/tcp/5001".parse().unwrap();
        assert!(addrs.contains(&want), "{addrs:?}");
        let want: Multiaddr = format!("/ip4/127.0.0.3/tcp/5002/p2p/{peer}")
            .parse()
            .unwrap();
        assert!(addrs.contains(&want), "{addrs:?}");
    }
}
