//! Helpers: libp2p nodes on loopback addresses, and the bounded waits of kagami-testkit.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use kagami_p2p::{Libp2pRouter, P2pConfig, Router};
pub use kagami_testkit::{always, eventually};

pub fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A config for a node listening on `ip` (a free port), short provider TTLs for fast tests.
pub fn config(dir: &Path, name: &str, ip: &str, http_port: u16) -> P2pConfig {
    let mut config = P2pConfig::new(
        addr(&format!("{ip}:0")),
        addr(&format!("{ip}:{http_port}")),
        dir.join(format!("{name}.key")),
    );
    config.lookup_timeout = Duration::from_millis(150);
    config.provider_ttl = Duration::from_secs(3);
    config.reprovide_interval = Duration::from_secs(1);
    config
}

pub async fn start(config: P2pConfig) -> Libp2pRouter {
    Libp2pRouter::start(config)
        .await
        .expect("start a libp2p node")
}

/// Waits until `node` knows every id in `ids` as a member.
pub async fn wait_members(node: &dyn Router, ids: &[String]) {
    eventually(
        Duration::from_secs(15),
        &format!("members {ids:?}"),
        || async {
            let members = node.members();
            ids.iter()
                .all(|id| members.iter().any(|m| m.id == *id && m.http_addr.is_some()))
                .then_some(())
        },
    )
    .await;
}

pub fn init_tracing() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}
