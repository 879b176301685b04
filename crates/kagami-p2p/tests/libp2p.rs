//! Behaviour of the libp2p router beyond the conformance suite: bootstrap forms, the
//! pre-shared key, a persistent identity, readiness and start errors.

use std::time::Duration;

use kagami_p2p::{Libp2pRouter, P2pError, Peer, Router};

use crate::support::{self, addr, always, eventually, wait_members};

const WITHIN: Duration = Duration::from_secs(10);

async fn finds(node: &Libp2pRouter, key: &str, want: &Peer) {
    eventually(
        WITHIN,
        &format!("lookup of {key} finds {}", want.id),
        || async { node.lookup(key, 10).await.contains(want).then_some(()) },
    )
    .await;
}

fn peer_of(node: &Libp2pRouter, http_addr: std::net::SocketAddr) -> Peer {
    Peer {
        id: node.local_peer_id(),
        http_addr,
    }
}

fn port_of(node: &Libp2pRouter) -> u16 {
    let first = node.listen_multiaddrs().remove(0);
    // "/ip4/127.0.0.2/tcp/<port>/p2p/<id>"
    first.split('/').nth(4).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_with_and_without_peer_id() {
    support::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let a_config = support::config(dir.path(), "a", "127.0.0.2", 6001);
    let a_http = a_config.http_addr;
    let a = support::start(a_config).await;
    assert!(
        a.ready().await,
        "a node without bootstrap peers is ready alone"
    );
    let a_addrs = a.listen_multiaddrs();
    assert!(a_addrs[0].starts_with("/ip4/127.0.0.2/tcp/"), "{a_addrs:?}");
    assert!(a_addrs[0].ends_with(&format!("/p2p/{}", a.local_peer_id())));

    // b: plain host:port, no peer id.
    let mut b_config = support::config(dir.path(), "b", "127.0.0.3", 6002);
    b_config.bootstrap = vec![format!("127.0.0.2:{}", port_of(&a))];
    let b_http = b_config.http_addr;
    let b = support::start(b_config).await;
    // c: host:port with /p2p/<id> of b, and a dead address that must not hold anything up.
    let mut c_config = support::config(dir.path(), "c", "127.0.0.4", 6003);
    c_config.bootstrap = vec![
        "127.0.0.9:1".to_owned(),
        format!("127.0.0.3:{}/p2p/{}", port_of(&b), b.local_peer_id()),
    ];
    let c = support::start(c_config).await;

    let ids = [a.local_peer_id(), b.local_peer_id(), c.local_peer_id()];
    wait_members(&a, &[ids[1].clone(), ids[2].clone()]).await;
    wait_members(&b, &[ids[0].clone(), ids[2].clone()]).await;
    // c learns a through b.
    wait_members(&c, &[ids[0].clone(), ids[1].clone()]).await;
    assert!(c.ready().await);

    a.advertise(vec!["sha256:aaaa".to_owned()]).await;
    finds(&c, "sha256:aaaa", &peer_of(&a, a_http)).await;
    b.advertise(vec!["sha256:bbbb".to_owned()]).await;
    finds(&a, "sha256:bbbb", &peer_of(&b, b_http)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_by_dns_name_and_multiaddr() {
    support::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let a_config = support::config(dir.path(), "a", "127.0.0.1", 6011);
    let a_http = a_config.http_addr;
    let a = support::start(a_config).await;
    let mut b_config = support::config(dir.path(), "b", "127.0.0.5", 6012);
    // "localhost" resolves to 127.0.0.1 (and maybe ::1, where nothing listens).
    b_config.bootstrap = vec![format!("localhost:{}", port_of(&a))];
    let b = support::start(b_config).await;
    let mut c_config = support::config(dir.path(), "c", "127.0.0.6", 6013);
    c_config.bootstrap = vec![format!("/dns4/localhost/tcp/{}", port_of(&a))];
    let c = support::start(c_config).await;
    wait_members(&b, &[a.local_peer_id()]).await;
    wait_members(&c, &[a.local_peer_id()]).await;
    a.advertise(vec!["sha256:dddd".to_owned()]).await;
    finds(&b, "sha256:dddd", &peer_of(&a, a_http)).await;
    finds(&c, "sha256:dddd", &peer_of(&a, a_http)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_the_psk_cannot_join() {
    support::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("swarm.key");
    std::fs::write(
        &key_file,
        format!("/key/swarm/psk/1.0.0/\n/base16/\n{}\n", "ab".repeat(32)),
    )
    .unwrap();
    std::fs::set_permissions(
        &key_file,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600),
    )
    .unwrap();
    let psk = kagami_p2p::load_psk(&key_file).unwrap();

    let mut a_config = support::config(dir.path(), "a", "127.0.0.2", 6021);
    a_config.psk = Some(psk);
    let a_http = a_config.http_addr;
    let a = support::start(a_config).await;
    let bootstrap = a.listen_multiaddrs();

    let mut b_config = support::config(dir.path(), "b", "127.0.0.3", 6022);
    b_config.psk = Some(psk);
    b_config.bootstrap = bootstrap.clone();
    let b = support::start(b_config).await;

    let mut stranger_config = support::config(dir.path(), "stranger", "127.0.0.4", 6023);
    stranger_config.bootstrap = bootstrap.clone();
    let stranger = support::start(stranger_config).await;

    let mut wrong_config = support::config(dir.path(), "wrong", "127.0.0.5", 6024);
    wrong_config.psk = Some([0xcd; 32]);
    wrong_config.bootstrap = bootstrap;
    let wrong = support::start(wrong_config).await;

    wait_members(&b, &[a.local_peer_id()]).await;
    a.advertise(vec!["sha256:5eed".to_owned()]).await;
    finds(&b, "sha256:5eed", &peer_of(&a, a_http)).await;

    let outsiders = [stranger.local_peer_id(), wrong.local_peer_id()];
    always(
        Duration::from_secs(2),
        "nodes without the key see no one and find nothing",
        || async {
            assert_eq!(stranger.members(), vec![], "stranger's members");
            assert_eq!(wrong.members(), vec![], "wrong key's members");
            assert!(!stranger.ready().await, "the stranger is not ready");
            assert_eq!(stranger.lookup("sha256:5eed", 10).await, vec![]);
            assert_eq!(wrong.lookup("sha256:5eed", 10).await, vec![]);
            let seen_by_a = a.members();
            assert!(
                seen_by_a.iter().all(|m| !outsiders.contains(&m.id)),
                "{seen_by_a:?}"
            );
            true
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_keeps_its_identity_and_is_found_again() {
    support::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let a_config = support::config(dir.path(), "a", "127.0.0.2", 6031);
    let a = support::start(a_config).await;
    let b_config = || {
        let mut config = support::config(dir.path(), "b", "127.0.0.3", 6032);
        config.bootstrap = a.listen_multiaddrs();
        config
    };
    let b_http = b_config().http_addr;

    let b = support::start(b_config()).await;
    let b_id = b.local_peer_id();
    wait_members(&a, std::slice::from_ref(&b_id)).await;
    b.advertise(vec!["sha256:0001".to_owned()]).await;
    finds(&a, "sha256:0001", &peer_of(&b, b_http)).await;
    let old_port = port_of(&b);
    drop(b);

    let b = support::start(b_config()).await;
    assert_eq!(b.local_peer_id(), b_id, "same identity file, same peer id");
    assert_ne!(
        port_of(&b),
        old_port,
        "a new port: others must learn the new address"
    );
    wait_members(&b, &[a.local_peer_id()]).await;
    b.advertise(vec!["sha256:0002".to_owned()]).await;
    finds(&a, "sha256:0002", &peer_of(&b, b_http)).await;
    // a reaches b at its new address.
    let member = a.members().into_iter().find(|m| m.id == b_id).unwrap();
    assert!(
        member
            .addrs
            .iter()
            .any(|x| x.contains(&format!("/tcp/{}/", port_of(&b)))),
        "{member:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_until_joined_and_start_errors() {
    support::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let mut lonely_config = support::config(dir.path(), "lonely", "127.0.0.2", 6041);
    lonely_config.bootstrap = vec!["127.0.0.9:1".to_owned()];
    let lonely = support::start(lonely_config).await;
    assert!(
        !lonely.ready().await,
        "bootstrap peers configured but none reachable"
    );
    assert!(lonely.lookup("sha256:ffff", 10).await.is_empty());

    // A bootstrap list naming only this node (as on the first node of a cluster): ready alone.
    let own_key = dir.path().join("first.key");
    let own_id = kagami_p2p::identity_peer_id(&own_key).unwrap();
    let mut first = support::config(dir.path(), "first", "127.0.0.3", 6045);
    first.bootstrap = vec![format!("/ip4/127.0.0.9/tcp/1/p2p/{own_id}")];
    let first = support::start(first).await;
    assert_eq!(first.local_peer_id(), own_id);
    eventually(WITHIN, "alone is ready", || async {
        first.ready().await.then_some(())
    })
    .await;

    // The port is taken: start fails and says where.
    let mut taken = support::config(dir.path(), "taken", "127.0.0.2", 6042);
    taken.listen = addr(&format!("127.0.0.2:{}", port_of(&lonely)));
    let err = Libp2pRouter::start(taken).await.unwrap_err();
    assert!(matches!(err, P2pError::Listen { .. }), "{err}");

    let mut bad = support::config(dir.path(), "bad", "127.0.0.2", 6043);
    bad.bootstrap = vec!["no-port".to_owned()];
    let err = Libp2pRouter::start(bad).await.unwrap_err().to_string();
    assert!(err.contains("bad bootstrap entry \"no-port\""), "{err}");

    let unreadable = dir.path().join("not-a-key");
    std::fs::write(&unreadable, b"not a key").unwrap();
    let mut broken = support::config(dir.path(), "broken", "127.0.0.2", 6044);
    broken.identity_path = unreadable;
    let err = Libp2pRouter::start(broken).await.unwrap_err().to_string();
    assert!(
        err.contains("not-a-key is not a libp2p private key"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_before_its_bootstrap_peer_joins_later() {
    support::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    // A free port for a, which starts only after b has tried it once.
    let a_listen = std::net::TcpListener::bind("127.0.0.2:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut b_config = support::config(dir.path(), "b", "127.0.0.3", 6052);
    b_config.bootstrap = vec![a_listen.to_string()];
    let b = support::start(b_config).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!b.ready().await);
    assert!(b.members().is_empty());

    let mut a_config = support::config(dir.path(), "a", "127.0.0.2", 6051);
    a_config.listen = a_listen;
    let a_http = a_config.http_addr;
    let a = support::start(a_config).await;
    // b dials its bootstrap list again every 10 s while it knows no one.
    eventually(Duration::from_secs(15), "b joins a", || async {
        b.ready().await.then_some(())
    })
    .await;
    a.advertise(vec!["sha256:1a7e".to_owned()]).await;
    finds(&b, "sha256:1a7e", &peer_of(&a, a_http)).await;
}

/// Finding 2c: a member's HTTP address is used only on an IP the member proved it has (it
/// connected from it, or was reached there): one claiming another host's address is never
/// returned by lookups nor shown with an address; one listening on every interface
/// (`0.0.0.0:port`) is reached on the IP it connected from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_addresses_must_be_on_the_peers_own_ip() {
    support::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let honest_config = support::config(dir.path(), "honest", "127.0.0.12", 6091);
    let honest_http = honest_config.http_addr;
    let honest = support::start(honest_config).await;
    let bootstrap = honest.listen_multiaddrs();

    // Listens on 127.0.0.13 but sends other nodes to 127.0.0.99 (say, an internal service).
    let mut liar_config = support::config(dir.path(), "liar", "127.0.0.13", 6092);
    liar_config.http_addr = addr("127.0.0.99:6092");
    liar_config.bootstrap = bootstrap.clone();
    let liar = support::start(liar_config).await;

    let mut wildcard_config = support::config(dir.path(), "wildcard", "127.0.0.14", 6093);
    wildcard_config.http_addr = addr("0.0.0.0:6093");
    wildcard_config.bootstrap = bootstrap.clone();
    let wildcard = support::start(wildcard_config).await;

    let mut observer_config = support::config(dir.path(), "observer", "127.0.0.15", 6094);
    observer_config.bootstrap = bootstrap;
    let observer = support::start(observer_config).await;

    let key = "sha256:c1a1".to_owned();
    for node in [&honest, &liar, &wildcard] {
        node.advertise(vec![key.clone()]).await;
    }
    wait_members(
        &observer,
        &[honest.local_peer_id(), wildcard.local_peer_id()],
    )
    .await;
    let honest_peer = peer_of(&honest, honest_http);
    let wildcard_peer = peer_of(&wildcard, addr("127.0.0.14:6093"));
    finds(&observer, &key, &honest_peer).await;
    finds(&observer, &key, &wildcard_peer).await;
    eventually(WITHIN, "the observer knows the liar", || async {
        observer
            .members()
            .iter()
            .any(|m| m.id == liar.local_peer_id())
            .then_some(())
    })
    .await;
    let liar_id = liar.local_peer_id();
    always(
        Duration::from_secs(2),
        "the liar's claimed address is never used",
        || async {
            let found = observer.lookup(&key, 10).await;
            let member = observer
                .members()
                .into_iter()
                .find(|m| m.id == liar_id)
                .expect("the liar stays a member");
            !found.iter().any(|p| p.id == liar_id)
                && !found
                    .iter()
                    .any(|p| p.http_addr.ip().to_string() == "127.0.0.99")
                && member.http_addr.is_none()
        },
    )
    .await;
}
