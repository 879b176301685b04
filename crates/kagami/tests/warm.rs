//! `kagami warm` with real parts: a `kagami serve` mirroring a real docker-registry warms
//! an image listed in a file, after which skopeo pulls it through kagami with no request
//! to the registry; bad input (an image the registry lacks, a malformed line) is reported
//! clearly and changes nothing.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::serve::Kagami;
use crate::support::{
    Registry, build_image, build_index, eventually_sync, http_get, kagami, push_all, run,
};

fn mirror(dir: &Path, registry: &Registry) -> Kagami {
    let config = dir.join("registries.yaml");
    std::fs::write(
        &config,
        format!(
            "mirrors:\n  registry.example.test:\n    endpoint: [\"http://{}\"]\n",
            registry.addr()
        ),
    )
    .unwrap();
    Kagami::start(dir, &config, &["--disable-default-registry-endpoint"])
}

/// `kagami warm` aimed at `k`, with its data directory (where its admin token is).
fn warm(k: &Kagami) -> Command {
    let mut cmd = kagami();
    cmd.arg("warm")
        .args(["--addr", &k.addr()])
        .arg("--data-dir")
        .arg(&k.data);
    cmd
}

fn warm_json(k: &Kagami) -> serde_json::Value {
    serde_json::from_slice(&http_get(&k.addr(), "/kagami/warm").2).unwrap()
}

#[test]
fn warmed_from_a_list_then_pulled_with_no_upstream_request() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry"));
    let image = build_image(&dir.path().join("image"), "1", 2, 256 * 1024);
    image.push(&format!("{}/team/app:1", registry.addr()));
    let k = mirror(dir.path(), &registry);

    let list = dir.path().join("images.txt");
    std::fs::write(
        &list,
        "# images the site needs\n\nregistry.example.test/team/app:1   # the app\n",
    )
    .unwrap();
    let out = run(warm(&k).arg("--from").arg(&list));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("registry.example.test/team/app:1 held (3 blobs"),
        "{stdout}"
    );

    // The image's manifest, config and layers are in kagami's store.
    let (manifest, blobs) = image_blobs(&image.layout);
    let stored = k.data.join("store/blobs/sha256");
    for hex in blobs.iter().chain([&manifest]) {
        assert!(stored.join(hex).exists(), "sha256:{hex} not stored");
    }

    // A pull through kagami now asks the registry nothing.
    let before = registry.access_log().len();
    run(Command::new("skopeo")
        .args(["copy", "--quiet", "--src-tls-verify=false"])
        .arg(format!(
            "docker://{}/registry.example.test/team/app:1",
            k.addr()
        ))
        .arg(format!("oci:{}:1", dir.path().join("copy").display())));
    assert_eq!(
        registry.access_log().len(),
        before,
        "{:#?}",
        registry.access_log()
    );

    // The status shows it, in JSON, on the page and in `kagami status`; the metrics count it.
    let w = warm_json(&k);
    assert_eq!(w["images"][0]["state"], "held", "{w}");
    assert_eq!(w["images"][0]["listed_by"], "runtime", "{w}");
    let page = String::from_utf8(http_get(&k.addr(), "/status").2).unwrap();
    assert!(page.contains("Warm images (1)"), "{page}");
    let status = run(kagami().args(["status", "--addr", &k.addr()]));
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("Warm images (1"), "{text}");
    assert!(
        text.contains("registry.example.test/team/app:1 held"),
        "{text}"
    );
    let metrics = k.metrics();
    assert!(
        metrics.contains("kagami_warm_images{state=\"held\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("kagami_warm_fetched_bytes_total{source=\"upstream\"}"),
        "{metrics}"
    );

    // Warming it again fetches nothing more.
    let again = run(warm(&k).arg("registry.example.test/team/app:1"));
    assert!(String::from_utf8_lossy(&again.stdout).contains("held"));
    assert_eq!(registry.count_gets("/blobs/"), blobs.len());
}

/// The policy file's `warm:` list (a `policy.yaml` next to registries.yaml, read by
/// `kagami serve` with no flag) is fetched at start with no pull and no `kagami warm`, and
/// a reload that empties it takes it off the list while the store keeps what was fetched.
#[test]
fn the_policy_files_warm_list_is_fetched_at_start_and_follows_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry"));
    let image = build_image(&dir.path().join("image"), "1", 2, 64 * 1024);
    image.push(&format!("{}/team/app:1", registry.addr()));
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        "warm:\n  images:\n    - registry.example.test/team/app:1\n",
    )
    .unwrap();
    let k = mirror(dir.path(), &registry);

    let w = eventually_sync(
        Duration::from_secs(30),
        "the policy's warm image to be held",
        || {
            let w = warm_json(&k);
            if w["images"][0]["state"] == "held" {
                Ok(w)
            } else {
                Err(w.to_string())
            }
        },
    );
    assert_eq!(w["images"][0]["listed_by"], "policy", "{w}");
    assert_eq!(
        w["images"][0]["image"], "registry.example.test/team/app:1",
        "{w}"
    );
    let (manifest, blobs) = image_blobs(&image.layout);
    let stored = k.data.join("store/blobs/sha256");
    for hex in blobs.iter().chain([&manifest]) {
        assert!(stored.join(hex).exists(), "sha256:{hex} not stored");
    }
    assert_eq!(registry.count_gets("/blobs/"), blobs.len());

    // The list emptied (the file's change is seen and reloaded): no image left to warm, and nothing deleted.
    std::fs::write(&policy, "warm:\n  images: []\n").unwrap();
    eventually_sync(Duration::from_secs(15), "the emptied list to apply", || {
        let w = warm_json(&k);
        let images = w["images"].as_array().map_or(0, Vec::len);
        if w.is_null() || images == 0 {
            Ok(())
        } else {
            Err(w.to_string())
        }
    });
    for hex in blobs.iter().chain([&manifest]) {
        assert!(
            stored.join(hex).exists(),
            "sha256:{hex} deleted by the reload"
        );
    }
}

/// The hex digests of the image in an OCI layout (its only one): the manifest, and its
/// config and layers.
fn image_blobs(layout: &Path) -> (String, Vec<String>) {
    let read = |p: &Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    };
    let hex = |v: &serde_json::Value| v["digest"].as_str().unwrap()[7..].to_string();
    let index = read(&layout.join("index.json"));
    let manifest = hex(&index["manifests"][0]);
    let m = read(&layout.join("blobs/sha256").join(&manifest));
    let mut blobs = vec![hex(&m["config"])];
    blobs.extend(m["layers"].as_array().unwrap().iter().map(hex));
    (manifest, blobs)
}

/// Of a multi-platform image a node warms the index, its own platform's manifest and that
/// manifest's blobs, and nothing of the other platforms.
#[test]
fn only_this_nodes_platform_of_an_index() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry"));
    let host = kagami_config::oci::Platform::host();
    let other = if host.architecture == "amd64" {
        "linux/arm64"
    } else {
        "linux/amd64"
    };
    let mine = format!("linux/{}", host.architecture);
    let image = build_index(&dir.path().join("image"), "m", &[&mine, other], 64 * 1024);
    push_all(&image, &format!("{}/team/multi:m", registry.addr()));
    let k = mirror(dir.path(), &registry);

    run(warm(&k).arg("registry.example.test/team/multi:m"));
    let read = |hex: &str| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(image.layout.join("blobs/sha256").join(hex)).unwrap())
            .unwrap()
    };
    let top: serde_json::Value =
        serde_json::from_slice(&std::fs::read(image.layout.join("index.json")).unwrap()).unwrap();
    let index_entry = top["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == "m")
        .unwrap();
    let index_hex = &index_entry["digest"].as_str().unwrap()[7..];
    let stored = k.data.join("store/blobs/sha256");
    assert!(stored.join(index_hex).exists(), "the index is stored");
    let w = warm_json(&k);
    for m in read(index_hex)["manifests"].as_array().unwrap() {
        let hex = &m["digest"].as_str().unwrap()[7..];
        let platform = format!(
            "{}/{}",
            m["platform"]["os"].as_str().unwrap(),
            m["platform"]["architecture"].as_str().unwrap()
        );
        let manifest = read(hex);
        let layer = &manifest["layers"][0]["digest"].as_str().unwrap()[7..];
        let ours = platform == mine;
        assert_eq!(stored.join(hex).exists(), ours, "{platform} manifest");
        assert_eq!(stored.join(layer).exists(), ours, "{platform} layer");
        if ours {
            assert_eq!(
                w["images"][0]["platform_digest"],
                format!("sha256:{hex}"),
                "{w}"
            );
        }
    }
    // This platform pulls through kagami with no request to the registry.
    let before = registry.access_log().len();
    run(Command::new("skopeo")
        .args(["copy", "--quiet", "--src-tls-verify=false"])
        .args([
            "--override-arch",
            &host.architecture,
            "--override-os",
            "linux",
        ])
        .arg(format!(
            "docker://{}/registry.example.test/team/multi:m",
            k.addr()
        ))
        .arg(format!("oci:{}:m", dir.path().join("copy").display())));
    assert_eq!(registry.access_log().len(), before);
}

#[test]
fn bad_input_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry"));
    let k = mirror(dir.path(), &registry);

    // A malformed line: refused before anything is sent, naming the file and the line.
    let list = dir.path().join("list.txt");
    std::fs::write(
        &list,
        "registry.example.test/team/app:1\n# fine\nregistry.example.test/Team/App:1\n",
    )
    .unwrap();
    let out = warm(&k).arg("--from").arg(&list).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{}:3:", list.display())),
        "{stderr}"
    );
    assert_eq!(
        warm_json(&k)["images"].as_array().map(Vec::len),
        Some(0),
        "nothing was sent"
    );

    // An image the registry does not have: failed, with where it was looked for.
    let out = warm(&k)
        .arg("registry.example.test/team/missing:1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("registry.example.test/team/missing:1 failed: ")
            && stdout.contains("not found at")
            && stdout.contains(&registry.addr()),
        "{stdout}"
    );
    let status: serde_json::Value =
        serde_json::from_slice(&http_get(&k.addr(), "/status.json").2).unwrap();
    assert_eq!(status["warm"]["images"][0]["state"], "failed");
    assert_eq!(status["store"]["blobs"], 0, "{status}");

    // Without the server's admin token nothing is warmed.
    let elsewhere = dir.path().join("not-the-data-dir");
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::fs::write(elsewhere.join("admin.token"), "0".repeat(64)).unwrap();
    let denied = kagami()
        .args(["warm", "registry.example.test/team/other:1"])
        .args(["--addr", &k.addr()])
        .arg("--data-dir")
        .arg(&elsewhere)
        .output()
        .unwrap();
    assert_eq!(denied.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&denied.stderr).contains("admin.token"));
    assert_eq!(warm_json(&k)["images"].as_array().map(Vec::len), Some(1));
}
