//! `kagami import` at the server level: OCI layouts, OCI archives (ctr export style) and
//! `docker save` tarballs built here are imported into a server on a real store, then pulled
//! through the server by tag with a fake upstream that must never be asked.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use crate::common::*;
use kagami_server::ServerOptions;
use kagami_server::import::{ImportReport, import_path};
use serde_json::json;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// A blob: bytes and digest string.
struct Blob {
    bytes: Vec<u8>,
    digest: String,
}

fn blob(bytes: Vec<u8>) -> Blob {
    let digest = digest_of(&bytes).to_string();
    Blob { bytes, digest }
}

fn desc(media_type: &str, b: &Blob) -> serde_json::Value {
    json!({"mediaType": media_type, "digest": b.digest, "size": b.bytes.len()})
}

/// An image: config, layers and the manifest over them.
struct Image {
    config: Blob,
    layers: Vec<Blob>,
    manifest: Blob,
}

fn image(seed: u64, arch: &str) -> Image {
    let layers: Vec<Blob> = (0..2)
        .map(|i| blob(random(300 * 1024 + i * 7, seed * 10 + i as u64)))
        .collect();
    let config = blob(
        serde_json::to_vec(&json!({
            "architecture": arch, "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.digest.clone()).collect::<Vec<_>>()},
        }))
        .unwrap(),
    );
    let manifest = blob(
        serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": desc("application/vnd.oci.image.config.v1+json", &config),
            "layers": layers.iter().map(|l| desc("application/vnd.oci.image.layer.v1.tar+gzip", l)).collect::<Vec<_>>(),
        }))
        .unwrap(),
    );
    Image {
        config,
        layers,
        manifest,
    }
}

fn write_blob(layout: &Path, b: &Blob) {
    let (alg, hex) = b.digest.split_once(':').unwrap();
    let dir = layout.join("blobs").join(alg);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(hex), &b.bytes).unwrap();
}

fn write_image(layout: &Path, img: &Image) {
    for b in img.layers.iter().chain([&img.config, &img.manifest]) {
        write_blob(layout, b);
    }
}

fn write_index(layout: &Path, manifests: serde_json::Value) {
    std::fs::create_dir_all(layout).unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(
            &json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}),
        )
        .unwrap(),
    )
    .unwrap();
}

/// Tars a directory (its contents at the top of the archive).
fn tar_dir(dir: &Path, out: &Path) {
    let f = std::fs::File::create(out).unwrap();
    let mut b = tar::Builder::new(f);
    b.append_dir_all(".", dir).unwrap();
    b.finish().unwrap();
}

/// GETs `path` through the server, expecting 200.
async fn get_ok(s: &Server, path: &str) -> (std::collections::HashMap<String, String>, Vec<u8>) {
    let (status, h, body, complete) = request(s.addr, "GET", path, &[]).await;
    assert_eq!(
        status,
        200,
        "GET {path}: {}",
        String::from_utf8_lossy(&body)
    );
    assert!(complete);
    (h, body)
}

async fn assert_blobs_served(s: &Server, repo: &str, blobs: &[&Blob]) {
    for b in blobs {
        let (_, body) = get_ok(
            s,
            &format!("/v2/{repo}/blobs/{}?ns=registry.example.test", b.digest),
        )
        .await;
        assert_eq!(digest_of(&body).to_string(), b.digest);
        assert!(body == b.bytes, "blob {} differs", b.digest);
    }
}

fn assert_upstream_untouched(s: &Server) {
    assert_eq!(s.fake.manifest_calls.load(Ordering::SeqCst), 0);
    assert_eq!(s.fake.head_calls.load(Ordering::SeqCst), 0);
    assert!(s.fake.blob_calls.lock().unwrap().is_empty());
}

#[tokio::test]
async fn oci_layout_directory_with_a_tag_and_name() {
    let s = start(Fake::new(vec![]), ServerOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    let img = image(1, "amd64");
    write_index(
        &layout,
        json!([{
            "mediaType": OCI_MANIFEST, "digest": img.manifest.digest, "size": img.manifest.bytes.len(),
            "annotations": {"org.opencontainers.image.ref.name": "1.0"},
        }]),
    );
    write_image(&layout, &img);

    // The layout names only a tag: without --name the import is refused, storing nothing.
    let e = import_path(&s.state, &layout, None).await.unwrap_err();
    assert!(e.to_string().contains("--name"), "{e}");
    assert_eq!(s.state.store().usage().blobs, 0);

    let r = import_path(&s.state, &layout, Some("registry.example.test/team/app"))
        .await
        .unwrap();
    assert_eq!(r.format, "oci-layout");
    assert_eq!(r.blobs_added, 4);
    assert_eq!(r.blobs_skipped, 0);
    assert_eq!(r.images.len(), 1);
    assert_eq!(
        r.images[0].name.as_deref(),
        Some("registry.example.test/team/app:1.0")
    );
    assert_eq!(r.images[0].digest, img.manifest.digest);

    let (h, body) = get_ok(&s, "/v2/team/app/manifests/1.0?ns=registry.example.test").await;
    assert_eq!(body, img.manifest.bytes);
    assert_eq!(h["docker-content-digest"], img.manifest.digest);
    assert_eq!(h["content-type"], OCI_MANIFEST);
    let blobs: Vec<&Blob> = img.layers.iter().chain([&img.config]).collect();
    assert_blobs_served(&s, "team/app", &blobs).await;
    assert_upstream_untouched(&s);

    // Again: everything is already there.
    let again = import_path(&s.state, &layout, Some("registry.example.test/team/app"))
        .await
        .unwrap();
    assert_eq!((again.blobs_added, again.blobs_skipped), (0, 4));
}

/// What `ctr images export` writes: an OCI layout in a tar, the full name in
/// io.containerd.image.name; here a two-platform index of which only one platform's
/// content was exported.
#[tokio::test]
async fn ctr_export_style_archive_with_a_partial_index() {
    let s = start(Fake::new(vec![]), ServerOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    let amd = image(2, "amd64");
    let arm = image(3, "arm64");
    let index = blob(
        serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": OCI_INDEX,
            "manifests": [
                {"mediaType": OCI_MANIFEST, "digest": amd.manifest.digest, "size": amd.manifest.bytes.len(), "platform": {"os": "linux", "architecture": "amd64"}},
                {"mediaType": OCI_MANIFEST, "digest": arm.manifest.digest, "size": arm.manifest.bytes.len(), "platform": {"os": "linux", "architecture": "arm64"}},
            ],
        }))
        .unwrap(),
    );
    write_index(
        &layout,
        json!([{
            "mediaType": OCI_INDEX, "digest": index.digest, "size": index.bytes.len(),
            "annotations": {
                "io.containerd.image.name": "registry.example.test/ksd/nginx:1.27",
                "org.opencontainers.image.ref.name": "1.27",
            },
        }]),
    );
    write_image(&layout, &amd);
    write_blob(&layout, &index);
    let tar = dir.path().join("export.tar");
    tar_dir(&layout, &tar);

    let r = import_path(&s.state, &tar, None).await.unwrap();
    assert_eq!(r.format, "oci-archive");
    assert_eq!(
        r.images[0].name.as_deref(),
        Some("registry.example.test/ksd/nginx:1.27")
    );
    assert_eq!(r.images[0].digest, index.digest);
    assert_eq!(r.images[0].media_type, OCI_INDEX);
    assert_eq!(r.blobs_added, 5);
    assert!(
        r.notes
            .iter()
            .any(|n| n.contains("linux/arm64") && n.contains("skipped")),
        "{:?}",
        r.notes
    );

    let (h, body) = get_ok(&s, "/v2/ksd/nginx/manifests/1.27?ns=registry.example.test").await;
    assert_eq!(body, index.bytes);
    assert_eq!(h["content-type"], OCI_INDEX);
    let (h, body) = get_ok(
        &s,
        &format!(
            "/v2/ksd/nginx/manifests/{}?ns=registry.example.test",
            amd.manifest.digest
        ),
    )
    .await;
    assert_eq!(body, amd.manifest.bytes);
    assert_eq!(h["content-type"], OCI_MANIFEST);
    let blobs: Vec<&Blob> = amd.layers.iter().chain([&amd.config]).collect();
    assert_blobs_served(&s, "ksd/nginx", &blobs).await;
    assert_upstream_untouched(&s);
    // The unpacked archive is gone from the store's tmp/.
    let tmp: Vec<PathBuf> = std::fs::read_dir(s.state.store().root().join("tmp"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(tmp.is_empty(), "{tmp:?}");
}

/// A classic `docker save` tarball: manifest.json, `<hex>.json` config, uncompressed
/// `<id>/layer.tar` layers.
#[tokio::test]
async fn docker_save_tarball() {
    let s = start(Fake::new(vec![]), ServerOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("save");
    std::fs::create_dir_all(&root).unwrap();
    let layers: Vec<Blob> = (0..2)
        .map(|i| blob(random(200 * 1024 + i, 40 + i as u64)))
        .collect();
    let config = blob(
        serde_json::to_vec(&json!({
            "architecture": "amd64", "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.digest.clone()).collect::<Vec<_>>()},
        }))
        .unwrap(),
    );
    let config_name = format!("{}.json", config.digest.strip_prefix("sha256:").unwrap());
    std::fs::write(root.join(&config_name), &config.bytes).unwrap();
    let mut layer_names = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let d = root.join(format!("layer{i}id"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("layer.tar"), &l.bytes).unwrap();
        layer_names.push(format!("layer{i}id/layer.tar"));
    }
    std::fs::write(
        root.join("manifest.json"),
        serde_json::to_vec(&json!([{
            "Config": config_name,
            "RepoTags": ["registry.example.test/lib/busy:2"],
            "Layers": layer_names,
        }]))
        .unwrap(),
    )
    .unwrap();
    let tar = dir.path().join("save.tar");
    tar_dir(&root, &tar);

    let r = import_path(&s.state, &tar, None).await.unwrap();
    assert_eq!(r.format, "docker-archive");
    assert_eq!(r.blobs_added, 4);
    assert_eq!(
        r.images[0].name.as_deref(),
        Some("registry.example.test/lib/busy:2")
    );
    let (h, body) = get_ok(&s, "/v2/lib/busy/manifests/2?ns=registry.example.test").await;
    assert_eq!(
        h["content-type"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    assert_eq!(h["docker-content-digest"], r.images[0].digest);
    assert_eq!(digest_of(&body).to_string(), r.images[0].digest);
    let m: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(m["config"]["digest"], config.digest.as_str());
    assert_eq!(
        m["config"]["mediaType"],
        "application/vnd.docker.container.image.v1+json"
    );
    for (i, l) in layers.iter().enumerate() {
        assert_eq!(m["layers"][i]["digest"], l.digest.as_str());
        assert_eq!(
            m["layers"][i]["mediaType"],
            "application/vnd.docker.image.rootfs.diff.tar"
        );
    }
    let blobs: Vec<&Blob> = layers.iter().chain([&config]).collect();
    assert_blobs_served(&s, "lib/busy", &blobs).await;
    assert_upstream_untouched(&s);
}

#[tokio::test]
async fn a_corrupt_archive_is_refused_and_stores_nothing_for_the_bad_blob() {
    let s = start(Fake::new(vec![]), ServerOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    let img = image(5, "amd64");
    write_index(
        &layout,
        json!([{
            "mediaType": OCI_MANIFEST, "digest": img.manifest.digest, "size": img.manifest.bytes.len(),
            "annotations": {"io.containerd.image.name": "registry.example.test/bad/img:1"},
        }]),
    );
    write_image(&layout, &img);
    // Same length, wrong bytes for layer 1.
    let bad = &img.layers[1];
    let (_, hex) = bad.digest.split_once(':').unwrap();
    let mut wrong = bad.bytes.clone();
    wrong[1000] ^= 0xff;
    std::fs::write(layout.join("blobs/sha256").join(hex), &wrong).unwrap();
    let tar = dir.path().join("bad.tar");
    tar_dir(&layout, &tar);

    let e = import_path(&s.state, &tar, None).await.unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains(&format!("blobs/sha256/{hex}")), "{msg}");
    assert!(msg.contains("does not match its digest"), "{msg}");
    assert!(msg.contains("bad.tar"), "{msg}");
    let d = bad.digest.parse().unwrap();
    assert_eq!(s.state.store().blob_size(&d), None);
    assert_eq!(
        s.state
            .store()
            .blob_size(&img.manifest.digest.parse().unwrap()),
        None,
        "no manifest without its layers"
    );
    assert!(
        s.state
            .store()
            .get_tag("registry.example.test", "bad/img", "1")
            .is_none()
    );
    let (status, _, _, _) = request(
        s.addr,
        "GET",
        "/v2/bad/img/manifests/1?ns=registry.example.test",
        &[],
    )
    .await;
    assert_eq!(status, 404);

    // A missing blob is named too.
    std::fs::remove_file(layout.join("blobs/sha256").join(hex)).unwrap();
    let e = import_path(&s.state, &layout, None).await.unwrap_err();
    assert!(
        e.to_string().contains(&bad.digest) && e.to_string().contains("not in the archive"),
        "{e}"
    );

    // Not a tar at all, and a truncated one.
    let junk = dir.path().join("junk.tar");
    std::fs::write(&junk, random(5000, 9)).unwrap();
    let e = import_path(&s.state, &junk, None).await.unwrap_err();
    assert!(e.to_string().contains("junk.tar"), "{e}");
    let whole = std::fs::read(&tar).unwrap();
    let cut = dir.path().join("cut.tar");
    std::fs::write(&cut, &whole[..whole.len() / 2]).unwrap();
    let e = import_path(&s.state, &cut, None).await.unwrap_err();
    assert!(e.to_string().contains("cut.tar"), "{e}");
    assert!(
        s.state
            .store()
            .get_tag("registry.example.test", "bad/img", "1")
            .is_none()
    );
}

/// POST with a body over a raw connection; returns (status, body).
async fn post(
    addr: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: kagami\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(60), s.read_to_end(&mut buf))
        .await
        .expect("response within 60 s")
        .unwrap();
    let split = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&buf[..split]).to_string();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut body = buf[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    (status, body)
}

const TOKEN: &str = "5ecret5ecret5ecret5ecret5ecret5ecret5ecret5ecret5ecret5ecret0000";

/// Turns the admin route on with [`TOKEN`]; the server's data directory is its temp dir.
fn enable_admin(s: &Server) {
    kagami_server::admin::enable(
        &s.state,
        kagami_server::admin::Admin::new(TOKEN.into(), s.dir.path()),
    );
}

/// The message and code of an OCI error envelope.
fn envelope(b: &[u8]) -> (String, String) {
    let err: serde_json::Value = serde_json::from_slice(b).unwrap();
    assert_eq!(err["errors"].as_array().map(Vec::len), Some(1), "{err}");
    (
        err["errors"][0]["code"].as_str().unwrap().to_string(),
        err["errors"][0]["message"].as_str().unwrap().to_string(),
    )
}

/// Finding 1: the route needs the admin token (the old `X-Kagami-Admin: 1` header alone is
/// refused), answers errors in the OCI envelope, and imports with the token.
#[tokio::test]
async fn the_admin_route_needs_the_token_and_answers_the_report() {
    let s = start(Fake::new(vec![]), ServerOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    let img = image(7, "amd64");
    write_index(
        &layout,
        json!([{
            "mediaType": OCI_MANIFEST, "digest": img.manifest.digest, "size": img.manifest.bytes.len(),
            "annotations": {"org.opencontainers.image.ref.name": "registry.example.test/web/site:3"},
        }]),
    );
    write_image(&layout, &img);
    let body = json!({"path": layout.display().to_string(), "name": null}).to_string();
    let bearer = format!("Bearer {TOKEN}");
    let auth = [("Authorization", bearer.as_str())];

    // Admin off (no token set): refused whatever the request carries.
    let (status, b) = post(s.addr, "/kagami/import", &auth, &body).await;
    assert_eq!(status, 403, "{}", String::from_utf8_lossy(&b));
    assert_eq!(envelope(&b).0, "DENIED");
    enable_admin(&s);
    for headers in [
        &[("X-Kagami-Admin", "1")][..],
        &[][..],
        &[("Authorization", "Bearer wrong")][..],
        &[("X-Kagami-Admin", "1"), ("Authorization", TOKEN)][..],
    ] {
        let (status, b) = post(s.addr, "/kagami/import", headers, &body).await;
        assert_eq!(status, 401, "{headers:?}: {}", String::from_utf8_lossy(&b));
        let (code, message) = envelope(&b);
        assert_eq!(code, "UNAUTHORIZED");
        assert!(message.contains("admin.token"), "{message}");
    }
    assert_eq!(s.state.store().usage().blobs, 0);

    let (status, b) = post(
        s.addr,
        "/kagami/import",
        &auth,
        r#"{"path": "relative.tar"}"#,
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(envelope(&b).0, "IMPORT_INVALID");
    let (status, b) = post(
        s.addr,
        "/kagami/import",
        &auth,
        &json!({"path": dir.path().join("missing.tar").display().to_string()}).to_string(),
    )
    .await;
    assert_eq!(status, 400);
    let (code, message) = envelope(&b);
    assert_eq!(code, "IMPORT_INVALID");
    assert!(message.contains("missing.tar"), "{message}");

    let (status, b) = post(s.addr, "/kagami/import", &auth, &body).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&b));
    let r: ImportReport = serde_json::from_slice(&b).unwrap();
    assert_eq!(
        r.images[0].name.as_deref(),
        Some("registry.example.test/web/site:3")
    );
    let (_, body) = get_ok(&s, "/v2/web/site/manifests/3?ns=registry.example.test").await;
    assert_eq!(body, img.manifest.bytes);
    assert_upstream_untouched(&s);
}

/// A `docker save` directory whose layer `layer0id/layer.tar` is given by `link`.
fn docker_dir_with_layer(root: &Path, layer: &Blob, link: impl FnOnce(&Path)) {
    let config = blob(
        serde_json::to_vec(&json!({
            "architecture": "amd64", "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [layer.digest]},
        }))
        .unwrap(),
    );
    let config_name = format!("{}.json", config.digest.strip_prefix("sha256:").unwrap());
    std::fs::create_dir_all(root.join("layer0id")).unwrap();
    std::fs::write(root.join(&config_name), &config.bytes).unwrap();
    link(&root.join("layer0id/layer.tar"));
    std::fs::write(
        root.join("manifest.json"),
        serde_json::to_vec(&json!([{
            "Config": config_name,
            "RepoTags": ["registry.example.test/lib/linked:1"],
            "Layers": ["layer0id/layer.tar"],
        }]))
        .unwrap(),
    )
    .unwrap();
}

/// Finding 1: a directory's symbolic link to a file outside it (say a root-only file) is
/// refused, for `docker save` directories and OCI layouts alike; a link inside it is fine.
#[tokio::test]
async fn symlinks_out_of_an_imported_directory_are_refused() {
    let s = start(Fake::new(vec![]), ServerOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let layer = blob(random(64 * 1024, 77));
    let secret = dir.path().join("secret");
    std::fs::write(&secret, &layer.bytes).unwrap();

    let out = dir.path().join("out");
    docker_dir_with_layer(&out, &layer, |p| {
        std::os::unix::fs::symlink(&secret, p).unwrap()
    });
    let e = import_path(&s.state, &out, None).await.unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("layer0id/layer.tar"), "{msg}");
    assert!(msg.contains("outside what is imported"), "{msg}");
    assert_eq!(s.state.store().usage().blobs, 0, "nothing stored");
    assert!(
        s.state
            .store()
            .get_tag("registry.example.test", "lib/linked", "1")
            .is_none()
    );

    // An OCI layout whose blob is a link out of it.
    let layout = dir.path().join("layout");
    let img = image(12, "amd64");
    write_index(
        &layout,
        json!([{
            "mediaType": OCI_MANIFEST, "digest": img.manifest.digest, "size": img.manifest.bytes.len(),
            "annotations": {"io.containerd.image.name": "registry.example.test/lib/oci:1"},
        }]),
    );
    write_image(&layout, &img);
    let (alg, hex) = img.layers[0].digest.split_once(':').unwrap();
    let linked = layout.join("blobs").join(alg).join(hex);
    let outside = dir.path().join("outside-blob");
    std::fs::rename(&linked, &outside).unwrap();
    std::os::unix::fs::symlink(&outside, &linked).unwrap();
    let e = import_path(&s.state, &layout, None).await.unwrap_err();
    assert!(e.to_string().contains("outside what is imported"), "{e}");
    assert_eq!(s.state.store().usage().blobs, 0, "nothing stored");

    // A link that stays inside the directory (docker save links repeated layers).
    let inside = dir.path().join("inside");
    docker_dir_with_layer(&inside, &layer, |p| {
        let real = p.parent().unwrap().parent().unwrap().join("real-layer.tar");
        std::fs::write(&real, &layer.bytes).unwrap();
        std::os::unix::fs::symlink("../real-layer.tar", p).unwrap()
    });
    let r = import_path(&s.state, &inside, None).await.unwrap();
    assert_eq!(r.format, "docker-directory");
    assert_eq!(
        r.images[0].name.as_deref(),
        Some("registry.example.test/lib/linked:1")
    );
}

/// Finding 1: nothing inside kagami's data directory is imported — not a file the store
/// wrote (a blob anyone can have fetched, say a docker save tar), not a link to one, not
/// anything else there — through the route (403) as through `import_path`.
#[tokio::test]
async fn paths_inside_the_data_directory_are_refused() {
    let s = start(Fake::new(vec![]), ServerOptions::default()).await;
    enable_admin(&s);
    // A valid archive, as a client could have had it stored as a blob.
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    let img = image(13, "amd64");
    write_index(
        &layout,
        json!([{
            "mediaType": OCI_MANIFEST, "digest": img.manifest.digest, "size": img.manifest.bytes.len(),
            "annotations": {"io.containerd.image.name": "registry.example.test/evil/planted:1"},
        }]),
    );
    write_image(&layout, &img);
    let tar = dir.path().join("planted.tar");
    tar_dir(&layout, &tar);
    let bytes = std::fs::read(&tar).unwrap();
    let d = digest_of(&bytes);
    assert!(s.state.store().put_bytes(&d, &bytes).await.unwrap());
    let stored = s.state.store().root().join("blobs/sha256").join(d.hex());
    assert!(stored.is_file(), "{}", stored.display());

    let in_data_dir = s.dir.path().join("planted.tar");
    std::fs::copy(&tar, &in_data_dir).unwrap();
    let link = dir.path().join("link.tar");
    std::os::unix::fs::symlink(&stored, &link).unwrap();
    for p in [&stored, &in_data_dir, &link] {
        let e = import_path(&s.state, p, None).await.unwrap_err();
        assert!(e.to_string().contains("data directory"), "{e}");
        let bearer = format!("Bearer {TOKEN}");
        let (status, b) = post(
            s.addr,
            "/kagami/import",
            &[("Authorization", bearer.as_str())],
            &json!({"path": p.display().to_string()}).to_string(),
        )
        .await;
        assert_eq!(status, 403, "{}", String::from_utf8_lossy(&b));
        assert_eq!(envelope(&b).0, "DENIED");
    }
    assert!(
        s.state
            .store()
            .get_tag("registry.example.test", "evil/planted", "1")
            .is_none()
    );
    // The same archive from elsewhere imports.
    import_path(&s.state, &tar, None).await.unwrap();
}

/// A tar of a directory (everything under `layout/`), whose only name is invalid: the name is
/// ignored with a note and --name names the image.
#[tokio::test]
async fn a_tar_with_a_top_directory_and_an_invalid_name() {
    let s = start(Fake::new(vec![]), ServerOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    let img = image(9, "amd64");
    write_index(
        &layout,
        json!([{
            "mediaType": OCI_MANIFEST, "digest": img.manifest.digest, "size": img.manifest.bytes.len(),
            "annotations": {"io.containerd.image.name": "UPPER.example/x:1"},
        }]),
    );
    write_image(&layout, &img);
    let tar = dir.path().join("prefixed.tar");
    let mut b = tar::Builder::new(std::fs::File::create(&tar).unwrap());
    b.append_dir_all("layout", &layout).unwrap();
    b.finish().unwrap();
    drop(b);

    let e = import_path(&s.state, &tar, None).await.unwrap_err();
    assert!(e.to_string().contains("--name"), "{e}");
    let r = import_path(&s.state, &tar, Some("registry.example.test/sub/dir:5"))
        .await
        .unwrap();
    assert!(
        r.notes.iter().any(|n| n.contains("UPPER.example/x:1")),
        "{:?}",
        r.notes
    );
    assert_eq!(
        r.images[0].name.as_deref(),
        Some("registry.example.test/sub/dir:5")
    );
    let (_, body) = get_ok(&s, "/v2/sub/dir/manifests/5?ns=registry.example.test").await;
    assert_eq!(body, img.manifest.bytes);
    assert_upstream_untouched(&s);
}
