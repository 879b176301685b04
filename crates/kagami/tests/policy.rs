//! The policy file with real parts (docker-registry upstream, skopeo pulling through
//! `kagami serve`): a pinned image survives eviction while others go, purge is refused for
//! it, and once unpinned a purge removes it so that the next pull fetches it upstream
//! again; per-repository tag TTLs, reloaded; a broken policy file is fatal at start.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::serve::Kagami;
use crate::support::{
    Registry, build_image, eventually_sync, http_get, kagami, run, run_bounded, skopeo_copy_retried,
};

const KEEP: &str = "registry.example.test/team/keep:1";

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

fn mirror_config(dir: &Path, registry: &Registry) -> std::path::PathBuf {
    let path = dir.join("registries.yaml");
    write(
        &path,
        &format!(
            "mirrors:\n  registry.example.test:\n    endpoint: [\"http://{}\"]\n",
            registry.addr()
        ),
    );
    path
}

/// Config and layer digests of the image in an OCI layout written by skopeo (the
/// manifest is fetched by tag, not as a blob).
fn blob_digests(layout: &Path) -> Vec<String> {
    let read = |d: &str| -> serde_json::Value {
        let hex = d.trim_start_matches("sha256:");
        serde_json::from_slice(&std::fs::read(layout.join("blobs/sha256").join(hex)).unwrap())
            .unwrap()
    };
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifest = read(index["manifests"][0]["digest"].as_str().unwrap());
    let mut out = vec![manifest["config"]["digest"].as_str().unwrap().to_string()];
    for l in manifest["layers"].as_array().unwrap() {
        out.push(l["digest"].as_str().unwrap().to_string());
    }
    out
}

fn stored(k: &Kagami, digest: &str) -> bool {
    k.data
        .join("store/blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
        .exists()
}

fn status(k: &Kagami) -> serde_json::Value {
    serde_json::from_slice(&http_get(&k.addr(), "/status.json").2).unwrap()
}

fn purge(k: &Kagami, image: &str) -> std::process::Output {
    kagami()
        .arg("purge")
        .args(["--addr", &k.addr()])
        .arg("--data-dir")
        .arg(&k.data)
        .arg(image)
        .output()
        .unwrap()
}

fn pull(k: &Kagami, image: &str, out: &Path) {
    skopeo_copy_retried(
        &format!("{}/{image}", k.addr()),
        &format!("oci:{}:x", out.display()),
        &format!("{image} to be pulled through kagami"),
        || k.log_text(),
    );
}

#[test]
fn pinned_image_survives_eviction_then_purge_refetches_it() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry"));
    let keep = build_image(&dir.path().join("keep"), "1", 2, 200 * 1024);
    keep.push(&format!("{}/team/keep:1", registry.addr()));
    let other = build_image(&dir.path().join("other"), "1", 2, 200 * 1024);
    other.push(&format!("{}/team/other:1", registry.addr()));
    let config = mirror_config(dir.path(), &registry);
    let policy = dir.path().join("policy.yaml");
    write(&policy, &format!("pin:\n  - {KEEP}\n"));
    // Room for one image and a bit: the second one cannot fit beside the first.
    let k = Kagami::start(
        dir.path(),
        &config,
        &[
            "--disable-default-registry-endpoint",
            "--max-store-size",
            "600KiB",
        ],
    );
    pull(&k, KEEP, &dir.path().join("out-keep"));
    let keep_blobs = blob_digests(&dir.path().join("out-keep"));
    // Committed to the store as each body ends.
    eventually_sync(
        Duration::from_secs(15),
        "the pinned image to be stored",
        || keep_blobs.iter().all(|d| stored(&k, d)),
    );
    let pinned = &status(&k)["pinned"][0];
    assert_eq!(pinned["image"], KEEP, "{pinned}");
    assert_eq!(pinned["held"], "held", "{pinned}");
    assert!(
        pinned["held_bytes"].as_u64().unwrap() > 400 * 1024,
        "{pinned}"
    );
    let text = run(kagami().args(["status", "--addr", &k.addr()])).stdout;
    let text = String::from_utf8(text).unwrap();
    assert!(text.contains("Pinned images"), "{text}");
    assert!(text.contains(&format!("{KEEP}  held  ")), "{text}");

    // The other image, pulled later, pushes the store over its size: keep is the least
    // recently used, but pinned, so other's blobs are the ones evicted.
    pull(
        &k,
        "registry.example.test/team/other:1",
        &dir.path().join("out-other"),
    );
    let other_blobs = blob_digests(&dir.path().join("out-other"));
    assert!(
        other_blobs.iter().any(|d| !stored(&k, d)),
        "nothing of the other image was evicted:\n{}",
        k.log_text()
    );
    assert!(
        !k.metrics().contains("kagami_store_evictions_total 0\n"),
        "{}",
        k.metrics()
    );
    for d in &keep_blobs {
        assert!(stored(&k, d), "pinned blob {d} was evicted");
    }

    // Purging a pinned image is refused and changes nothing.
    let refused = purge(&k, KEEP);
    assert_eq!(refused.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("pinned by the policy file"), "{stderr}");
    assert!(keep_blobs.iter().all(|d| stored(&k, d)));
    assert_eq!(
        http_get(&k.addr(), "/v2/registry.example.test/team/keep/manifests/1").0,
        200
    );

    // Unpinned (the file changes and is reloaded), it can be purged.
    write(&policy, "# nothing pinned\n");
    eventually_sync(Duration::from_secs(15), "the policy to be reloaded", || {
        let s = status(&k);
        if s["pinned"].as_array().is_some_and(|p| p.is_empty()) {
            Ok(())
        } else {
            Err(format!("{}\n{}", s["pinned"], k.log_text()))
        }
    });
    let before: Vec<usize> = keep_blobs
        .iter()
        .map(|d| registry.count_gets(&format!("/blobs/{d}")))
        .collect();
    let purged = purge(&k, KEEP);
    let stdout = String::from_utf8_lossy(&purged.stdout);
    assert!(
        purged.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&purged.stderr)
    );
    assert!(stdout.contains(&format!("purged {KEEP}")), "{stdout}");
    assert!(
        stdout.contains("untagged registry.example.test/team/keep:1"),
        "{stdout}"
    );
    for d in &keep_blobs {
        assert!(!stored(&k, d), "{d} is still stored after the purge");
        assert!(stdout.contains(&format!("removed {d}")), "{stdout}");
    }
    // A second purge finds nothing: 404 with the name.
    let again = purge(&k, KEEP);
    assert_eq!(again.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(
        stderr.contains("is not in this node's store") && stderr.contains(KEEP),
        "{stderr}"
    );

    // The next pull fetches every blob from the registry again.
    pull(&k, KEEP, &dir.path().join("out-keep-2"));
    for (d, n) in keep_blobs.iter().zip(before) {
        assert_eq!(
            registry.count_gets(&format!("/blobs/{d}")),
            n + 1,
            "{d} was not fetched upstream again"
        );
    }
}

/// Manifest requests kagami sent upstream for `repo` (HEAD and GET, by tag).
fn manifest_requests(registry: &Registry, repo: &str) -> usize {
    registry
        .access_log()
        .iter()
        .filter(|l| l.contains(&format!("/v2/{repo}/manifests/1?")) && l.contains("kagami/"))
        .count()
}

#[test]
fn tag_ttl_per_repository_with_reload() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry"));
    let image = build_image(&dir.path().join("image"), "1", 1, 16 * 1024);
    image.push(&format!("{}/team/fresh:1", registry.addr()));
    image.push(&format!("{}/team/cached:1", registry.addr()));
    let config = mirror_config(dir.path(), &registry);
    let policy = dir.path().join("rules.yaml");
    write(
        &policy,
        "tagTTL:\n  - match: \"registry.example.test/team/fresh\"\n    ttl: 0s\n",
    );
    let k = Kagami::start(
        dir.path(),
        &config,
        &[
            "--disable-default-registry-endpoint",
            "--tag-ttl",
            "1h",
            "--policy",
            policy.to_str().unwrap(),
        ],
    );
    let get = |repo: &str| {
        let path = format!("/v2/registry.example.test/{repo}/manifests/1");
        assert_eq!(http_get(&k.addr(), &path).0, 200, "{}", k.log_text());
    };
    // Three pulls each: the 0s rule revalidates every one, the global 1h none after the first.
    let counts = |repo: &str| {
        get(repo);
        let first = manifest_requests(&registry, repo);
        get(repo);
        get(repo);
        (first, manifest_requests(&registry, repo))
    };
    let (first, third) = counts("team/fresh");
    assert!(first >= 1);
    assert!(third >= first + 2, "fresh: {first} then {third}");
    let (first, third) = counts("team/cached");
    assert!(first >= 1);
    assert_eq!(third, first, "cached: revalidated within the global TTL");

    // Reloaded: the rule now names the other repository.
    write(
        &policy,
        "tagTTL:\n  - match: \"registry.example.test/team/cach*\"\n    ttl: 0s\n",
    );
    eventually_sync(Duration::from_secs(15), "the policy to be reloaded", || {
        k.log_text().contains("policy file reloaded")
    });
    let (first, third) = counts("team/cached");
    assert!(
        third >= first + 2,
        "cached after reload: {first} then {third}"
    );
    let (first, third) = counts("team/fresh");
    assert_eq!(third, first, "fresh after reload");

    // A broken version is refused and the running one kept.
    write(&policy, "tagTTL:\n  - match: \"[x\"\n    ttl: soon\n");
    eventually_sync(Duration::from_secs(15), "the refusal to be logged", || {
        k.log_text().contains("new policy file refused")
    });
    let (first, third) = counts("team/cached");
    assert!(third >= first + 2, "cached after a refused reload");
}

#[test]
fn a_broken_or_missing_policy_file_is_fatal_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("registries.yaml");
    write(&config, "mirrors:\n  docker.io:\n");
    let serve = |extra: &[&str]| {
        let out = run_bounded(
            kagami()
                .args(["serve", "--listen", "127.0.0.1:0"])
                .arg("--data-dir")
                .arg(dir.path().join("data"))
                .arg("--config")
                .arg(&config)
                .args(extra),
            Duration::from_secs(20),
        );
        assert_eq!(out.status.and_then(|s| s.code()), Some(2), "{}", out.stderr);
        out.stderr
    };
    // Next to registries.yaml, found without a flag.
    write(&dir.path().join("policy.yaml"), "warm:\n  copies: 0\n");
    let stderr = serve(&[]);
    assert!(
        stderr.contains("policy.yaml:2:11: error: copies must be at least 1"),
        "{stderr}"
    );
    // Named by --policy, it must exist.
    let stderr = serve(&["--policy", "/nonexistent/policy.yaml"]);
    assert!(stderr.contains("/nonexistent/policy.yaml"), "{stderr}");
    // `kagami check` reports the one next to registries.yaml too.
    let out = run_bounded(
        kagami().arg("check").arg("--config").arg(&config),
        Duration::from_secs(20),
    );
    assert_eq!(out.status.and_then(|s| s.code()), Some(1));
    assert!(out.stderr.contains("registries.yaml: ok"), "{}", out.stderr);
    assert!(
        out.stderr
            .contains("policy.yaml:2:11: error: copies must be at least 1 (at warm.copies)"),
        "{}",
        out.stderr
    );
    write(
        &dir.path().join("policy.yaml"),
        "pin: [registry.k8s.io/pause:3.10]\n",
    );
    run(Command::new(env!("CARGO_BIN_EXE_kagami"))
        .arg("check")
        .arg("--config")
        .arg(&config));
}

/// The example of docs/policy.md is a valid policy file.
#[test]
fn the_documented_example_checks_clean() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/policy.md"))
        .unwrap();
    let start = doc.find("```yaml\n").expect("a yaml block") + "```yaml\n".len();
    let example = &doc[start..start + doc[start..].find("```").unwrap()];
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.yaml");
    write(&file, example);
    write(&dir.path().join("registries.yaml"), "");
    let out = run_bounded(
        kagami()
            .arg("check")
            .arg("--config")
            .arg(dir.path().join("registries.yaml"))
            .arg("--policy")
            .arg(&file),
        Duration::from_secs(20),
    );
    assert_eq!(out.status.and_then(|s| s.code()), Some(0), "{}", out.stderr);
    assert!(
        out.stderr.contains("policy.yaml: ok (0 warning(s))"),
        "{}",
        out.stderr
    );
}

/// `gc.maxUnusedAge` evicts by age like `--max-blob-age`, never a pinned image.
#[test]
fn gc_max_unused_age_spares_pinned_images() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry"));
    for repo in ["keep", "other"] {
        let image = build_image(&dir.path().join(repo), "1", 1, 64 * 1024);
        image.push(&format!("{}/team/{repo}:1", registry.addr()));
    }
    let config = mirror_config(dir.path(), &registry);
    write(
        &dir.path().join("policy.yaml"),
        &format!("pin: [{KEEP}]\ngc:\n  maxUnusedAge: 2s\n"),
    );
    let k = Kagami::start(
        dir.path(),
        &config,
        &["--disable-default-registry-endpoint"],
    );
    pull(&k, KEEP, &dir.path().join("out-keep"));
    pull(
        &k,
        "registry.example.test/team/other:1",
        &dir.path().join("out-other"),
    );
    let (keep, other) = (
        blob_digests(&dir.path().join("out-keep")),
        blob_digests(&dir.path().join("out-other")),
    );
    eventually_sync(
        Duration::from_secs(20),
        "the other image to be evicted",
        || other.iter().all(|d| !stored(&k, d)),
    );
    assert!(keep.iter().all(|d| stored(&k, d)), "{}", k.log_text());
    assert!(
        k.log_text()
            .contains("unused for longer than the policy's gc.maxUnusedAge"),
        "{}",
        k.log_text()
    );
}
