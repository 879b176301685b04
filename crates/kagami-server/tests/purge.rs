//! Purge and pins on a real store: what a purge removes and keeps (blobs of other tagged
//! images, a manifest another repository's tag points at), its refusals (pinned, in use,
//! unknown, no token) that change nothing, the withdraw seen by another node of the
//! in-memory P2P network, and the pinned images' status.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use crate::common::*;
use kagami_config::{Digest, Policy, Reference};
use kagami_p2p::{MemoryNetwork, MemoryRouter, Router};
use kagami_server::ServerOptions;
use kagami_server::admin::Admin;
use kagami_store::TagEntry;

const REG: &str = "registry.example.test";
const MT: &str = "application/vnd.oci.image.manifest.v1+json";
const TOKEN: &str = "purge-test-token";

/// Stores a blob and returns its digest.
async fn blob(s: &Server, data: &[u8]) -> Digest {
    let d = digest_of(data);
    s.state.store().put_bytes(&d, data).await.unwrap();
    d
}

/// Stores an image manifest naming `config` and `layers`, and returns its digest.
async fn manifest(s: &Server, config: &Digest, layers: &[&Digest]) -> Digest {
    let desc = |d: &Digest, mt: &str| serde_json::json!({"mediaType": mt, "digest": d.to_string(), "size": s.state.store().blob_size(d).unwrap()});
    let body = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MT,
        "config": desc(config, "application/vnd.oci.image.config.v1+json"),
        "layers": layers.iter().map(|l| desc(l, "application/vnd.oci.image.layer.v1.tar")).collect::<Vec<_>>(),
    });
    let bytes = serde_json::to_vec(&body).unwrap();
    let d = blob(s, &bytes).await;
    s.state.store().put_media_type(&d, MT).unwrap();
    d
}

fn tag(s: &Server, repo: &str, t: &str, d: &Digest) {
    s.state
        .store()
        .put_tag(
            REG,
            repo,
            t,
            TagEntry {
                digest: d.clone(),
                media_type: MT.into(),
                fetched_at: SystemTime::now(),
            },
        )
        .unwrap();
}

/// `POST /kagami/purge` with `{"image": image}`; returns (status, body as JSON).
async fn post_purge(
    addr: SocketAddr,
    image: &str,
    token: Option<&str>,
) -> (u16, serde_json::Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = serde_json::json!({ "image": image }).to_string();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "POST /kagami/purge HTTP/1.1\r\nHost: kagami\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut buf))
        .await
        .expect("an answer within 30 s")
        .unwrap();
    let text = String::from_utf8(buf).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        String::from_utf8(dechunk(body.as_bytes())).unwrap()
    } else {
        body.to_string()
    };
    (status, serde_json::from_str(&body).unwrap_or_default())
}

fn pin(images: &[&str]) -> Policy {
    Policy {
        pin: images
            .iter()
            .map(|i| Reference::parse(i).unwrap())
            .collect(),
        ..Policy::default()
    }
}

#[tokio::test]
async fn purge_removes_what_no_other_image_uses_and_withdraws_it() {
    let s = start(Fake::new(vec![]), ServerOptions::default()).await;
    kagami_server::admin::enable(&s.state, Admin::new(TOKEN.into(), s.dir.path()));
    let store = s.state.store().clone();
    // Images a and b share a layer; c:1 (another repository) points at a's manifest.
    let shared = blob(&s, &random(3000, 1)).await;
    let (la, lb) = (
        blob(&s, &random(4000, 2)).await,
        blob(&s, &random(5000, 3)).await,
    );
    let (ca, cb) = (blob(&s, b"{\"a\":1}").await, blob(&s, b"{\"b\":1}").await);
    let ma = manifest(&s, &ca, &[&shared, &la]).await;
    let mb = manifest(&s, &cb, &[&shared, &lb]).await;
    tag(&s, "team/a", "1", &ma);
    tag(&s, "team/b", "1", &mb);
    tag(&s, "team/c", "1", &ma);

    // Another member of the P2P network sees what this node advertises.
    let net = MemoryNetwork::new();
    join_as_me(&s.state, &net);
    let other = MemoryRouter::join(&net, "other", "127.0.0.1:9".parse().unwrap());
    let advertiser = tokio::spawn(kagami_server::peers::advertise_store(s.state.clone()));
    let c_tag = kagami_server::peers::tag_key(REG, "team/c", "1");
    for key in [la.to_string(), shared.to_string(), c_tag.clone()] {
        eventually(
            Duration::from_secs(5),
            format!("{key} advertised"),
            async || !other.lookup(&key, 5).await.is_empty(),
        )
        .await;
    }

    // Refusals change nothing: no token, unknown image, pinned image, a blob being read.
    assert_eq!(
        post_purge(s.addr, "registry.example.test/team/a:1", None)
            .await
            .0,
        401
    );
    let (status, body) = post_purge(s.addr, "registry.example.test/team/zzz:1", Some(TOKEN)).await;
    assert_eq!(status, 404, "{body}");
    let message = body["errors"][0]["message"].as_str().unwrap();
    assert!(
        message.contains("registry.example.test/team/zzz:1"),
        "{message}"
    );
    assert_eq!(
        post_purge(s.addr, "not a reference", Some(TOKEN)).await.0,
        400
    );

    s.state
        .set_policy(pin(&["registry.example.test/team/b:1"]))
        .await;
    let (status, body) = post_purge(s.addr, "registry.example.test/team/b:1", Some(TOKEN)).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["errors"][0]["code"], "PINNED");
    assert!(store.get_tag(REG, "team/b", "1").is_some());
    assert!(store.blob_size(&lb).is_some());

    // a:1 goes as a tag only: c:1 still points at its manifest.
    let (status, body) = post_purge(s.addr, "registry.example.test/team/a:1", Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["tags"],
        serde_json::json!(["registry.example.test/team/a:1"])
    );
    assert_eq!(body["removed"], serde_json::json!([]));
    assert!(store.get_tag(REG, "team/a", "1").is_none());
    assert!(store.blob_size(&ma).is_some());

    let reading = store.open_blob(&la).await.unwrap().unwrap();
    let (status, body) = post_purge(s.addr, "registry.example.test/team/c:1", Some(TOKEN)).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["errors"][0]["code"], "IN_USE");
    assert!(store.get_tag(REG, "team/c", "1").is_some());
    assert!(store.blob_size(&ma).is_some() && store.blob_size(&ca).is_some());
    drop(reading);

    // Now c:1 goes with a's manifest, config and own layer; the shared layer stays for b.
    let r = s
        .state
        .purge("registry.example.test/team/c:1")
        .await
        .unwrap();
    let removed: Vec<&str> = r.removed.iter().map(|b| b.digest.as_str()).collect();
    for d in [&ma, &ca, &la] {
        assert!(removed.contains(&d.to_string().as_str()), "{removed:?}");
        assert!(store.blob_size(d).is_none());
    }
    assert_eq!(r.kept, vec![shared.to_string()]);
    assert_eq!(r.bytes, r.removed.iter().map(|b| b.bytes).sum::<u64>());
    assert!(r.withdrawn);
    assert!(store.blob_size(&shared).is_some());
    assert!(store.all_tags().iter().all(|(_, repo, _)| repo == "team/b"));

    // The other node no longer finds this one for what went; the shared layer stays.
    for key in [la.to_string(), ma.to_string(), c_tag] {
        eventually(
            Duration::from_secs(5),
            format!("{key} withdrawn"),
            async || other.lookup(&key, 5).await.is_empty(),
        )
        .await;
    }
    assert!(!other.lookup(&shared.to_string(), 5).await.is_empty());
    advertiser.abort();
}

#[tokio::test]
async fn pinned_images_status_and_set_follow_the_store() {
    let s = start(Fake::new(vec![]), ServerOptions::default()).await;
    let store = s.state.store().clone();
    s.state
        .set_policy(pin(&[
            "registry.example.test/team/p:1",
            "registry.example.test/team/absent:1",
        ]))
        .await;
    let status = s.state.pinned();
    assert_eq!(status.len(), 2);
    assert!(
        status
            .iter()
            .all(|p| p.held == "not held" && p.held_bytes == 0)
    );

    // The manifest and tag arrive first (as in a pull): its blobs are pinned before they
    // are stored, and counted missing.
    let layer_data = random(6000, 9);
    let layer = digest_of(&layer_data);
    let config = blob(&s, b"{\"p\":1}").await;
    let desc = |d: &Digest, size: usize, mt: &str| serde_json::json!({"mediaType": mt, "digest": d.to_string(), "size": size});
    let body = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MT,
        "config": desc(&config, 7, "application/vnd.oci.image.config.v1+json"),
        "layers": [desc(&layer, 6000, "application/vnd.oci.image.layer.v1.tar")],
    }))
    .unwrap();
    let m = blob(&s, &body).await;
    tag(&s, "team/p", "1", &m);
    eventually(
        Duration::from_secs(5),
        "the pinned set to follow the tag",
        async || store.is_pinned(&layer) && s.state.pinned()[0].held == "partly held",
    )
    .await;
    assert_eq!(s.state.pinned()[0].blobs_missing, 1);
    store.put_bytes(&layer, &layer_data).await.unwrap();
    eventually(Duration::from_secs(5), "the image to be held", async || {
        s.state.pinned()[0].held == "held"
    })
    .await;
    let p = &s.state.pinned()[0];
    assert_eq!(p.held_bytes, 6000 + 7 + body.len() as u64);
    assert_eq!(p.digest.as_deref(), Some(m.to_string().as_str()));
    assert_eq!(s.state.pinned()[1].held, "not held");
    // /status.json carries it.
    let (code, _, json, _) = request(s.addr, "GET", "/status.json", &[]).await;
    assert_eq!(code, 200);
    let report: serde_json::Value = serde_json::from_slice(&json).unwrap();
    assert_eq!(
        report["pinned"][0]["image"],
        "registry.example.test/team/p:1"
    );
    assert_eq!(report["pinned"][0]["held"], "held");

    // Age eviction skips the pinned image; unpinned, it goes.
    let other = blob(&s, &random(100, 10)).await;
    let (n, _) = store.evict_unused_for(Duration::ZERO).await;
    assert_eq!(n, 1);
    assert!(store.blob_size(&other).is_none());
    assert!(
        [&m, &config, &layer]
            .iter()
            .all(|d| store.blob_size(d).is_some())
    );
    s.state.set_policy(Policy::default()).await;
    assert!(s.state.pinned().is_empty());
    let (n, _) = store.evict_unused_for(Duration::ZERO).await;
    assert_eq!(n, 3);
}

/// A multi-platform image: held when the platforms this node fetched are complete (the
/// others are named, not missing); a purge takes the index and the fetched platform.
#[tokio::test]
async fn an_index_is_pinned_and_purged_with_its_fetched_platform() {
    let s = start(Fake::new(vec![]), ServerOptions::default()).await;
    let store = s.state.store().clone();
    let layer = blob(&s, &random(2000, 20)).await;
    let config = blob(&s, b"{\"amd64\":1}").await;
    let amd64 = manifest(&s, &config, &[&layer]).await;
    let arm64 = digest_of(b"a platform this node never fetched");
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": MT, "digest": amd64.to_string(), "size": store.blob_size(&amd64).unwrap(),
             "platform": {"os": "linux", "architecture": "amd64"}},
            {"mediaType": MT, "digest": arm64.to_string(), "size": 34,
             "platform": {"os": "linux", "architecture": "arm64"}},
        ],
    }))
    .unwrap();
    let idx = blob(&s, &index).await;
    tag(&s, "team/multi", "1", &idx);
    s.state
        .set_policy(pin(&["registry.example.test/team/multi:1"]))
        .await;
    let p = &s.state.pinned()[0];
    assert_eq!(p.held, "held", "{p:?}");
    assert_eq!((p.blobs_held, p.blobs_missing), (4, 0), "{p:?}");
    assert!(store.is_pinned(&arm64) && store.is_pinned(&layer));
    // Pinned by digest too: the purge of the index by digest is refused.
    let e = s
        .state
        .purge(&format!("registry.example.test/team/multi@{idx}"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("pinned by the policy file"), "{e}");
    s.state.set_policy(Policy::default()).await;
    // By digest: the repository's tags pointing at it go too.
    let r = s
        .state
        .purge(&format!("registry.example.test/team/multi@{idx}"))
        .await
        .unwrap();
    assert_eq!(
        r.tags,
        vec!["registry.example.test/team/multi:1".to_string()]
    );
    assert_eq!(r.removed.len(), 4, "{r:?}");
    assert_eq!(store.usage().blobs, 0);
}
