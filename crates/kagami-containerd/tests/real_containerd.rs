//! The client against a real containerd (1.6, as Debian ships it) started on a temporary
//! root with its own socket and stopped by PID: an OCI archive built here is imported with
//! `ctr images import`, then listed, sized and read back through the gRPC API.

use std::path::Path;
use std::time::Duration;

use futures_util::StreamExt;
use kagami_containerd::{Containerd, Error};
// The real containerd daemon, as opposed to the client under test.
use kagami_testkit::Containerd as Daemon;
use sha2::Digest as _;

const NAME: &str = "ksd.test.com/ksd/app:1.0";

fn digest_of(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(b)))
}

struct Archive {
    layer: Vec<u8>,
    layer_digest: String,
    manifest: Vec<u8>,
    manifest_digest: String,
}

/// An OCI archive of one image named [`NAME`]: a tar layer of `size` pseudo-random bytes.
fn oci_archive(path: &Path, size: usize) -> Archive {
    let data = kagami_testkit::random(size, 0x9e37_79b9_7f4a_7c15);
    let mut layer = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(size as u64);
    header.set_mode(0o644);
    header.set_cksum();
    layer
        .append_data(&mut header, "data.bin", &data[..])
        .unwrap();
    let layer = layer.into_inner().unwrap();
    let layer_digest = digest_of(&layer);
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        "config": {}
    }))
    .unwrap();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest_of(&config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer.len()}]
    }))
    .unwrap();
    let manifest_digest = digest_of(&manifest);
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest, "size": manifest.len(),
            "annotations": {"io.containerd.image.name": NAME, "org.opencontainers.image.ref.name": "1.0"}
        }]
    }))
    .unwrap();
    let digests: Vec<String> = [&config, &layer, &manifest]
        .iter()
        .map(|b| digest_of(b)["sha256:".len()..].to_string())
        .collect();
    kagami_testkit::write_oci_archive(
        path,
        &index,
        digests
            .iter()
            .map(String::as_str)
            .zip([&config[..], &layer[..], &manifest[..]]),
    );
    Archive {
        layer,
        layer_digest,
        manifest,
        manifest_digest,
    }
}

async fn collect(c: &Containerd, digest: &str, offset: u64, len: Option<u64>) -> (Vec<u8>, usize) {
    let mut s = c.read(digest, offset, len).await.unwrap();
    let (mut out, mut chunks) = (Vec::new(), 0);
    while let Some(chunk) = s.next().await {
        out.extend_from_slice(&chunk.unwrap());
        chunks += 1;
    }
    (out, chunks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_content_and_events_of_one_namespace() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path());
    let c = Containerd::connect(&daemon.socket, "k8s.io").await.unwrap();
    assert!(c.images().await.unwrap().is_empty());
    let mut events = c.subscribe();
    let other = Containerd::connect(&daemon.socket, "default")
        .await
        .unwrap();
    let mut other_events = other.subscribe();

    let tar = dir.path().join("app.tar");
    let a = oci_archive(&tar, 3 * 1024 * 1024 + 123);
    daemon.ctr_run(&[
        "-n",
        "k8s.io",
        "images",
        "import",
        "--no-unpack",
        tar.to_str().unwrap(),
    ]);

    // The import is signalled.
    let changed = tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .expect("an event within 10 s")
        .expect("the stream is open")
        .unwrap();
    assert!(
        changed.topic.starts_with("/images/") || changed.topic.starts_with("/content/"),
        "{changed:?}"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), other_events.next())
            .await
            .is_err(),
        "an event of k8s.io reached a subscriber of default"
    );

    let images = c.images().await.unwrap();
    let image = images
        .iter()
        .find(|i| i.name == NAME)
        .unwrap_or_else(|| panic!("{NAME} in {images:?}"));
    assert_eq!(image.target.digest, a.manifest_digest);
    assert_eq!(image.target.size, a.manifest.len() as u64);
    assert_eq!(
        image.target.media_type,
        "application/vnd.oci.image.manifest.v1+json"
    );

    let absent = digest_of(b"not there");
    assert_eq!(
        c.info(&a.layer_digest).await.unwrap(),
        Some(a.layer.len() as u64)
    );
    assert_eq!(c.info(&absent).await.unwrap(), None);
    let all = c.list_content().await.unwrap();
    assert_eq!(all.get(&a.layer_digest), Some(&(a.layer.len() as u64)));
    assert_eq!(
        all.get(&a.manifest_digest),
        Some(&(a.manifest.len() as u64))
    );

    // Reads stream in chunks; ranges are honoured.
    let (whole, chunks) = collect(&c, &a.layer_digest, 0, None).await;
    assert!(whole == a.layer, "whole blob differs");
    assert!(chunks > 1, "a 3 MiB blob came in {chunks} chunk(s)");
    let (part, _) = collect(&c, &a.layer_digest, 1000, Some(5000)).await;
    assert!(part == a.layer[1000..6000], "range differs");
    let from = 1024 * 1024 + 7;
    let (tail, _) = collect(&c, &a.layer_digest, from as u64, None).await;
    assert!(tail == a.layer[from..], "tail differs");
    let (empty, _) = collect(&c, &a.layer_digest, 10, Some(0)).await;
    assert!(empty.is_empty());
    match c.read(&absent, 0, None).await {
        Err(e) => assert!(e.is_not_found(), "{e}"),
        Ok(_) => panic!("read of an absent blob succeeded"),
    }

    // Small reads are bounded.
    assert_eq!(
        c.read_small(&a.manifest_digest, 4 << 20)
            .await
            .unwrap()
            .as_deref(),
        Some(&a.manifest[..])
    );
    assert_eq!(c.read_small(&absent, 4 << 20).await.unwrap(), None);
    let e = c.read_small(&a.layer_digest, 1 << 20).await.unwrap_err();
    assert!(matches!(e, Error::TooLarge { .. }), "{e}");

    // Another namespace sees none of it.
    assert!(other.images().await.unwrap().is_empty());
    assert_eq!(other.info(&a.layer_digest).await.unwrap(), None);
    assert!(other.list_content().await.unwrap().is_empty());

    // Removing the image is signalled too.
    daemon.ctr_run(&["-n", "k8s.io", "images", "rm", NAME]);
    let changed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let c = events.next().await.unwrap().unwrap();
            if c.topic == "/images/delete" {
                return c;
            }
        }
    })
    .await
    .expect("/images/delete within 10 s");
    assert_eq!(changed.topic, "/images/delete");
    assert!(c.images().await.unwrap().is_empty());

    // containerd going away ends the event stream with an error.
    drop(daemon);
    let end = tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .expect("the stream ends within 10 s");
    assert!(matches!(end, Some(Err(_)) | None), "{end:?}");
}
