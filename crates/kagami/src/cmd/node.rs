//! Joining the P2P network, shared by `kagami serve` and `kagami demo`: the router, the
//! peer HTTP API, and advertising the store.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use kagami_server::{AppState, NodeInfo};

/// How a node joins the P2P network (serve's `--p2p-*` flags).
#[derive(Debug, Clone)]
pub struct P2pOptions {
    /// Where the P2P router (libp2p Kademlia over TCP) listens.
    pub listen: SocketAddr,
    /// Where the peer HTTP API listens; default: `listen` with the next port.
    pub http_listen: Option<SocketAddr>,
    /// Nodes to join through: host:port, a multiaddr, or `http://` a member's peer API.
    pub bootstrap: Vec<String>,
    /// The network's pre-shared key.
    pub psk: Option<[u8; 32]>,
    /// Resolve `latest` tags through other nodes too.
    pub resolve_latest: bool,
    /// The node's data directory (its identity lives in `p2p/identity.key`).
    pub data_dir: PathBuf,
    /// The API listener's connection cap; the peer listener takes half of it.
    pub max_connections: usize,
}

/// A node that joined: its identity and addresses, and the task serving the peer API.
pub struct P2pNode {
    pub info: NodeInfo,
    pub http_addr: SocketAddr,
    pub peer_server: tokio::task::JoinHandle<()>,
}

/// Reads `--p2p-psk-file`; without one, warns that anyone can join.
pub fn load_psk(path: Option<&Path>) -> anyhow::Result<Option<[u8; 32]>> {
    match path {
        Some(p) => Ok(Some(kagami_p2p::load_psk(p)?)),
        None => {
            tracing::warn!(
                "no --p2p-psk-file: any machine that reaches the P2P ports can join and download"
            );
            Ok(None)
        }
    }
}

/// Joins the P2P network: starts the router, turns on peers in `state`, advertises the
/// store and serves the peer HTTP API.
pub async fn start_p2p(opts: &P2pOptions, state: &AppState) -> anyhow::Result<P2pNode> {
    use kagami_p2p::{Libp2pRouter, P2pConfig, Router};
    let listen = opts.listen;
    let psk = opts.psk;
    let http_addr = opts
        .http_listen
        .unwrap_or_else(|| SocketAddr::new(listen.ip(), listen.port().wrapping_add(1)));
    let token = psk.as_ref().map(kagami_server::peers::peer_token);
    let mut bootstrap = Vec::new();
    for b in &opts.bootstrap {
        if b.starts_with("http://") || b.starts_with("https://") {
            bootstrap.extend(bootstrap_from_http(b, token.as_deref()).await);
        } else {
            bootstrap.push(b.clone());
        }
    }
    let mut config = P2pConfig::new(listen, http_addr, opts.data_dir.join("p2p/identity.key"));
    config.bootstrap = bootstrap;
    config.psk = psk;
    let router = Libp2pRouter::start(config)
        .await
        .context("starting the P2P router")?;
    let info = NodeInfo {
        peer_id: router.local_peer_id(),
        addrs: router.listen_multiaddrs(),
    };
    tracing::info!(peer_id = %info.peer_id, addrs = ?info.addrs, http = %http_addr, "joined the P2P network");
    let router: Arc<dyn Router> = Arc::new(router);
    let peers = Arc::new(kagami_server::Peers::new(
        router,
        psk.as_ref(),
        opts.resolve_latest,
    ));
    peers.set_own_http_addr(http_addr);
    state.set_peers(peers, info.clone());
    tokio::spawn(kagami_server::peers::advertise_store(state.clone()));
    let listener = tokio::net::TcpListener::bind(http_addr)
        .await
        .with_context(|| format!("listening for peers on {http_addr}"))?;
    let app = kagami_server::peer_router(state.clone(), info.clone());
    let max_connections = (opts.max_connections / 2).max(32);
    let peer_server = tokio::spawn(async move {
        // Half the API listener's cap: with the default cap both together stay within
        // three quarters of the open-file limit.
        let opts = kagami_server::listener::ListenOptions {
            max_connections,
            ..Default::default()
        };
        let forever = std::future::pending::<()>();
        if let Err(e) = kagami_server::listener::serve(listener, app, opts, forever).await {
            tracing::error!(error = %e, "peer API stopped");
        }
    });
    Ok(P2pNode {
        info,
        http_addr,
        peer_server,
    })
}

/// The libp2p addresses a member publishes on its peer HTTP API (`/p2p/info`); retried
/// for up to 10 s while that member starts.
async fn bootstrap_from_http(url: &str, token: Option<&str>) -> Vec<String> {
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(3))
        .build()
        .expect("http client");
    let info_url = format!("{}/p2p/info", url.trim_end_matches('/'));
    for _ in 0..20 {
        let mut req = client.get(&info_url);
        if let Some(t) = token {
            req = req.header(kagami_server::peers::PEER_TOKEN_HEADER, t);
        }
        if let Ok(resp) = req.send().await
            && resp.status().is_success()
            && let Ok(bytes) = resp.bytes().await
            && let Ok(info) = serde_json::from_slice::<NodeInfo>(&bytes)
        {
            return info.addrs;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tracing::warn!(url, "cannot bootstrap from this node's HTTP address");
    Vec::new()
}
