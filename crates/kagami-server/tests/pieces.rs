//! A blob fetched in pieces from several nodes (docs/p2p.md, "Pieces"): real holders (each
//! a server with the blob in its store and its peer API on 127.0.0.1, so the ranges are
//! answered by the real peer API), on one in-memory network with the node under test,
//! whose upstream counts requests. A holder misbehaves through a layer on its peer API:
//! it dies part-way through what it sends, or sends wrong bytes of the right length.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use crate::common::*;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use kagami_config::Digest;
use kagami_p2p::{MemoryNetwork, MemoryRouter};
use kagami_server::{NodeInfo, Peers, ServerOptions};

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Good,
    /// Cuts its body once it has sent this many blob bytes in all, and refuses everything
    /// after.
    DieAfter(u64),
    /// Sends wrong bytes of the right length.
    Lie,
}

/// What a holder's peer API did.
#[derive(Clone)]
struct Faults {
    mode: Mode,
    dead: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    /// Blob requests, and those without a `Range` (a whole-blob transfer).
    requests: Arc<AtomicUsize>,
    whole: Arc<AtomicUsize>,
}

async fn fault_layer(
    State(f): State<Faults>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    if f.dead.load(Ordering::SeqCst) {
        return axum::http::StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let blob_get = req.uri().path().contains("/blobs/") && req.method() == "GET";
    if blob_get {
        f.requests.fetch_add(1, Ordering::SeqCst);
        if !req.headers().contains_key("range") {
            f.whole.fetch_add(1, Ordering::SeqCst);
        }
    }
    let (parts, body) = next.run(req).await.into_parts();
    if !blob_get {
        return Response::from_parts(parts, body);
    }
    let body = body.into_data_stream().map(move |c| {
        let c = c.map_err(std::io::Error::other)?;
        match f.mode {
            Mode::Good => Ok(c),
            Mode::Lie => Ok(bytes::Bytes::from(vec![0xAA; c.len()])),
            Mode::DieAfter(n) => {
                let before = f.sent.fetch_add(c.len() as u64, Ordering::SeqCst);
                if f.dead.load(Ordering::SeqCst) || before + c.len() as u64 > n {
                    f.dead.store(true, Ordering::SeqCst);
                    Err(std::io::Error::other("node died"))
                } else {
                    Ok(c)
                }
            }
        }
    });
    Response::from_parts(parts, Body::from_stream(body))
}

struct Holder {
    id: String,
    faults: Faults,
    _server: Server,
}

/// A node with `blobs` in its store, serving its peer API, a member of `net` as `id`.
async fn holder(id: &str, blobs: &[&[u8]], mode: Mode, net: &Arc<MemoryNetwork>) -> Holder {
    let mut fake = Fake::new(vec![BlobMode::Good]);
    for b in blobs {
        fake = fake.with_blob(b);
    }
    let server = start(fake, ServerOptions::default()).await;
    // Stored from its own upstream before it joins.
    for data in blobs {
        let d = digest_of(data);
        let (status, _, body, complete) = request(server.addr, "GET", &blob_path(&d), &[]).await;
        assert!(status == 200 && complete && body == *data);
        eventually(
            Duration::from_secs(10),
            "the holder stored the blob",
            async || server.state.store().blob_size(&d).is_some(),
        )
        .await;
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let peer_addr: SocketAddr = listener.local_addr().unwrap();
    let router = MemoryRouter::join(net, id.to_string(), peer_addr);
    let peers = Peers::new(Arc::new(router), None, false);
    peers.set_own_http_addr(peer_addr);
    let info = NodeInfo {
        peer_id: id.into(),
        addrs: vec![],
    };
    server.state.set_peers(Arc::new(peers), info.clone());
    tokio::spawn(kagami_server::peers::advertise_store(server.state.clone()));
    let faults = Faults {
        mode,
        dead: Default::default(),
        sent: Default::default(),
        requests: Default::default(),
        whole: Default::default(),
    };
    let app = kagami_server::peer_router(server.state.clone(), info).layer(
        axum::middleware::from_fn_with_state(faults.clone(), fault_layer),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Holder {
        id: id.into(),
        faults,
        _server: server,
    }
}

/// The node under test (no blob upstream: any upstream request is counted and fails) and
/// holders of `data` in the given modes, `h0`...
async fn setup(data: &[u8], modes: &[Mode]) -> (Server, Vec<Holder>) {
    let upstream = Fake::new(vec![BlobMode::Good]);
    setup_with(&[data], modes, ServerOptions::default(), upstream).await
}

async fn setup_with(
    blobs: &[&[u8]],
    modes: &[Mode],
    options: ServerOptions,
    upstream: Fake,
) -> (Server, Vec<Holder>) {
    let net = MemoryNetwork::new();
    let mut holders = Vec::new();
    for (i, m) in modes.iter().enumerate() {
        holders.push(holder(&format!("h{i}"), blobs, *m, &net).await);
    }
    let s = start(upstream, options).await;
    join_as_me(&s.state, &net);
    for data in blobs {
        let key = digest_of(data).to_string();
        eventually(
            Duration::from_secs(10),
            "every holder advertised",
            async || s.state.peers().unwrap().providers(&key).await.len() == modes.len(),
        )
        .await;
    }
    (s, holders)
}

/// Bytes the node under test received from each holder, by the peer-received metric.
fn received(s: &Server, holders: &[Holder]) -> Vec<u64> {
    let by = s.state.peers().unwrap().received_bytes();
    holders
        .iter()
        .map(|h| by.get(&h.id).copied().unwrap_or(0))
        .collect()
}

async fn stored(s: &Server, d: &Digest) {
    eventually(Duration::from_secs(10), "the blob stored", async || {
        s.state.store().blob_size(d).is_some()
    })
    .await;
}

#[tokio::test]
async fn a_blob_held_by_three_nodes_comes_in_pieces_from_several() {
    let data = random(6 * 1024 * 1024 + 4321, 41);
    let d = digest_of(&data);
    let (s, holders) = setup(&data, &[Mode::Good, Mode::Good, Mode::Good]).await;
    let (status, _, body, complete) = request(s.addr, "GET", &blob_path(&d), &[]).await;
    assert_eq!(status, 200);
    assert!(complete && body == data);
    stored(&s, &d).await;
    let by = received(&s, &holders);
    assert_eq!(by.iter().sum::<u64>(), data.len() as u64, "{by:?}");
    assert!(
        by.iter().filter(|&&n| n > 0).count() >= 2,
        "bytes from more than one holder: {by:?}"
    );
    // Ranges only (the size came from a HEAD), every one answered by a real peer API.
    for h in &holders {
        assert_eq!(h.faults.whole.load(Ordering::SeqCst), 0, "{}", h.id);
    }
    assert!(
        s.fake.blob_calls.lock().unwrap().is_empty(),
        "no upstream request"
    );
    // A later request is served from the store.
    let (_, _, again, _) = request(s.addr, "GET", &blob_path(&d), &[]).await;
    assert_eq!(again, data);
}

#[tokio::test]
async fn a_holder_dying_mid_piece_gives_its_piece_to_the_others() {
    let data = random(6 * 1024 * 1024, 42);
    let d = digest_of(&data);
    // h1 dies half-way through its first piece.
    let (s, holders) = setup(&data, &[Mode::Good, Mode::DieAfter(512 * 1024), Mode::Good]).await;
    let (status, _, body, complete) = request(s.addr, "GET", &blob_path(&d), &[]).await;
    assert_eq!(status, 200);
    assert!(complete && body == data);
    stored(&s, &d).await;
    let dead = &holders[1].faults;
    assert!(dead.dead.load(Ordering::SeqCst), "h1 died");
    assert_eq!(
        dead.requests.load(Ordering::SeqCst),
        1,
        "a holder that failed is not asked again"
    );
    assert!(
        s.fake.blob_calls.lock().unwrap().is_empty(),
        "no upstream request"
    );
    let by = received(&s, &holders);
    assert!(by[0] > 0 && by[2] > 0, "{by:?}");
}

#[tokio::test]
async fn a_lying_holder_never_gets_wrong_bytes_stored_nor_an_honest_one_banned() {
    let data = random(5 * 1024 * 1024, 43);
    let d = digest_of(&data);
    let (s, holders) = setup(&data, &[Mode::Good, Mode::Lie, Mode::Good]).await;
    let url = blob_path(&d);
    // The pieces pass fails its digest; the node fetches again one source at a time. When
    // that source is honest the blob is stored by that fetch; when it is the liar, the
    // liar is banned, nothing is stored, and the next request gets it from the others.
    let mut got = None;
    for _ in 0..4 {
        let (status, _, body, complete) = request(s.addr, "GET", &url, &[]).await;
        if status == 200 && complete {
            assert_eq!(body, data, "a complete answer is the right blob");
            got = Some(body);
            break;
        }
        assert!(body.len() < data.len() || body != data || !complete);
        // As a client would, a moment before it asks again.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(got.as_deref(), Some(&data[..]));
    stored(&s, &d).await;
    // Pieces first (ranges only), then one whole-blob transfer from one holder at a time.
    let whole: usize = holders
        .iter()
        .map(|h| h.faults.whole.load(Ordering::SeqCst))
        .sum();
    assert!((1..=2).contains(&whole), "{whole} whole-blob transfers");
    assert!(
        holders
            .iter()
            .all(|h| h.faults.requests.load(Ordering::SeqCst)
                > h.faults.whole.load(Ordering::SeqCst)),
        "every holder served pieces"
    );
    assert!(
        s.fake.blob_calls.lock().unwrap().is_empty(),
        "no upstream request"
    );
    let providers: Vec<String> = s
        .state
        .peers()
        .unwrap()
        .providers(&d.to_string())
        .await
        .into_iter()
        .map(|p| p.id)
        .collect();
    for honest in ["h0", "h2"] {
        assert!(
            providers.iter().any(|p| p == honest),
            "{honest} banned: {providers:?}"
        );
    }
    // The liar is banned exactly when a whole-blob transfer of its own named it.
    let liar_whole = holders[1].faults.whole.load(Ordering::SeqCst) > 0;
    assert_eq!(
        !providers.iter().any(|p| p == "h1"),
        liar_whole,
        "{providers:?}"
    );
}

#[tokio::test]
async fn pieces_fetches_at_once_within_a_small_memory_budget() {
    // 2 MiB for every fetch: at most one piece ahead among both (half the budget), and
    // the pumps never wait for room only pieces ahead hold.
    let budget = 2 * 1024 * 1024;
    let (x, y) = (
        random(6 * 1024 * 1024, 44),
        random(5 * 1024 * 1024 + 77, 45),
    );
    let options = ServerOptions {
        limits: kagami_server::FetchLimits {
            fetch_memory: budget,
            ..Default::default()
        },
        ..Default::default()
    };
    let modes = [Mode::Good, Mode::Good, Mode::Good];
    let upstream = Fake::new(vec![BlobMode::Good]);
    let (s, holders) = setup_with(&[&x, &y], &modes, options, upstream).await;
    let (dx, dy) = (digest_of(&x), digest_of(&y));
    let (px, py) = (blob_path(&dx), blob_path(&dy));
    let ((sx, _, bx, cx), (sy, _, by, cy)) = tokio::join!(
        request(s.addr, "GET", &px, &[]),
        request(s.addr, "GET", &py, &[])
    );
    assert!(sx == 200 && cx && bx == x);
    assert!(sy == 200 && cy && by == y);
    stored(&s, &dx).await;
    stored(&s, &dy).await;
    assert!(s.state.store().memory_peak() <= budget);
    for h in &holders {
        assert_eq!(
            h.faults.whole.load(Ordering::SeqCst),
            0,
            "in pieces: ranges only"
        );
    }
    let from = received(&s, &holders);
    assert_eq!(
        from.iter().sum::<u64>(),
        (x.len() + y.len()) as u64,
        "{from:?}"
    );
    assert!(from.iter().filter(|&&n| n > 0).count() >= 2, "{from:?}");
    assert!(
        s.fake.blob_calls.lock().unwrap().is_empty(),
        "no upstream request"
    );
}

#[tokio::test]
async fn when_every_holder_fails_the_fetch_continues_upstream_where_the_pieces_stopped() {
    let data = random(6 * 1024 * 1024, 46);
    let d = digest_of(&data);
    let modes = [Mode::DieAfter(1536 * 1024), Mode::DieAfter(1536 * 1024)];
    let upstream = Fake::new(vec![BlobMode::Good]).with_blob(&data);
    let (s, holders) = setup_with(&[&data], &modes, ServerOptions::default(), upstream).await;
    let (status, _, body, complete) = request(s.addr, "GET", &blob_path(&d), &[]).await;
    assert_eq!(status, 200);
    assert!(complete && body == data);
    stored(&s, &d).await;
    assert!(holders.iter().all(|h| h.faults.dead.load(Ordering::SeqCst)));
    // One upstream request, from where the in-order bytes stopped (past the first piece:
    // both holders sent more than one), not from the start.
    let calls = s.fake.blob_calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert!(calls[0].1 >= 1024 * 1024, "{calls:?}");
}
