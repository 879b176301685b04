//! `kagami pull` against real docker-registry instances (plain http, htpasswd, TLS,
//! mTLS, rewrites, multi-platform) and against in-test fakes that fail in the ways the
//! fallback rules are about. Everything is on loopback; made-up registry names always
//! have their default endpoint disabled.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::fake_registry::FakeOptions;
use crate::support::{self, Registry, RegistryOptions, build_image, kagami, skopeo_digest};

/// A registries.yaml in `dir`.
pub fn write_config(dir: &Path, yaml: &str) -> PathBuf {
    let p = dir.join("registries.yaml");
    std::fs::write(&p, yaml).unwrap();
    p
}

/// `kagami pull [--config C] IMAGE -o OUT ARGS...`; images of the made-up
/// `registry.example.test` get `--disable-default-registry-endpoint` so that nothing
/// leaves the machine.
pub fn pull(config: Option<&Path>, image: &str, out: &Path, args: &[&str]) -> Output {
    let mut c: Command = kagami();
    c.env_remove("KAGAMI_CONFIG").arg("pull");
    if let Some(cfg) = config {
        c.arg("--config").arg(cfg);
    }
    if image.starts_with("registry.example.test/") {
        c.arg("--disable-default-registry-endpoint");
    }
    c.arg(image).arg("--output").arg(out).args(args);
    c.output().unwrap()
}

pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "kagami failed with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

pub fn failed(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "kagami should have failed\nstdout:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stderr.clone()).unwrap()
}

/// Pulls `image` into `out` (as [`pull`], no extra arguments), which must succeed with the
/// manifest digest `want` and leave a layout tagged `tag`; returns the summary.
pub fn pull_expecting(
    config: Option<&Path>,
    image: &str,
    out: &Path,
    tag: &str,
    want: &str,
) -> String {
    let summary = ok(&pull(config, image, out, &[]));
    assert!(summary.contains(&format!("digest {want}")), "{summary}");
    check_layout(out, tag, want);
    summary
}

/// The image the rewrite tests pull: `rancher/` is rewritten to `production/` upstream.
pub const REWRITTEN: &str = "registry.example.test/rancher/busybox:1.35";

/// The digest of the first entry of an index's `manifests` that `pred` accepts.
pub fn digest_of(index: &serde_json::Value, pred: impl Fn(&serde_json::Value) -> bool) -> String {
    index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| pred(m))
        .unwrap()["digest"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Checks an OCI layout: `tag` names `digest` in index.json, and every blob file hashes
/// to its name. Returns index.json's entry.
pub fn check_layout(dir: &Path, tag: &str, digest: &str) -> serde_json::Value {
    let layout: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("oci-layout")).unwrap()).unwrap();
    assert_eq!(layout["imageLayoutVersion"], "1.0.0");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    let entry = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap_or_else(|| panic!("no {tag} in {index}"))
        .clone();
    assert_eq!(entry["digest"], digest, "{index}");
    let mut n = 0;
    for f in std::fs::read_dir(dir.join("blobs/sha256")).unwrap() {
        let f = f.unwrap();
        let name = f.file_name().into_string().unwrap();
        assert!(
            !name.starts_with(".tmp"),
            "temporary file left behind: {name}"
        );
        assert_eq!(support::sha256_hex(&std::fs::read(f.path()).unwrap()), name);
        n += 1;
    }
    assert!(
        n >= 3,
        "a manifest, a config and a layer at least; found {n}"
    );
    entry
}

/// The SOURCE column of the summary line for `kind` rows.
fn sources(summary: &str, kind: &str) -> Vec<String> {
    summary
        .lines()
        .filter(|l| l.starts_with(&format!("{kind} ")))
        .map(|l| l.split("  ").last().unwrap().trim().to_string())
        .collect()
}

#[test]
fn pull_plain_http_into_layout_that_skopeo_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(&tmp.path().join("reg"));
    let img = build_image(&tmp.path().join("img"), "1", 2, 256 * 1024);
    let src = format!("{}/library/plain:1", reg.addr());
    img.push(&src);
    let want = skopeo_digest(&src);

    let out = tmp.path().join("out");
    // No config: the embedded default; a loopback registry's default endpoint is http.
    let summary = ok(&pull(None, &src, &out, &[]));
    assert!(summary.contains(&format!("digest {want}")), "{summary}");
    let layers = sources(&summary, "layer");
    assert_eq!(layers.len(), 2, "{summary}");
    for s in &layers {
        assert_eq!(s, &format!("http://{}/v2", reg.addr()));
    }
    check_layout(&out, "1", &want);

    // A real tool reads the layout, and the digest survives the round trip.
    let back = format!("{}/roundtrip/plain:1", reg.addr());
    support::run(
        Command::new("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:1", out.display()))
            .arg(format!("docker://{back}")),
    );
    assert_eq!(skopeo_digest(&back), want);

    // Pulling again reuses (and verifies) every blob.
    let gets = reg.count_gets("/blobs/");
    let again = ok(&pull(None, &src, &out, &[]));
    assert!(
        again.contains("4 blobs: 0 fetched (0 B), 4 already present"),
        "{again}"
    );
    assert_eq!(reg.count_gets("/blobs/"), gets, "no blob downloaded again");
    // A damaged blob is noticed and fetched again.
    let layer = sources(&summary, "layer");
    assert!(!layer.is_empty());
    let entry = check_layout(&out, "1", &want);
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            out.join("blobs/sha256").join(
                entry["digest"]
                    .as_str()
                    .unwrap()
                    .strip_prefix("sha256:")
                    .unwrap(),
            ),
        )
        .unwrap(),
    )
    .unwrap();
    let l0 = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .strip_prefix("sha256:")
        .unwrap()
        .to_string();
    let path = out.join("blobs/sha256").join(&l0);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[10] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    let third = ok(&pull(None, &src, &out, &[]));
    assert!(third.contains("1 fetched"), "{third}");
    check_layout(&out, "1", &want);
}

#[test]
fn pull_with_htpasswd_basic_auth() {
    let tmp = tempfile::tempdir().unwrap();
    let htpasswd = tmp.path().join("htpasswd");
    support::htpasswd(&htpasswd, "alice", "s3cret");
    let reg = Registry::start_with(
        &tmp.path().join("reg"),
        RegistryOptions {
            htpasswd: Some(htpasswd),
            ..Default::default()
        },
    );
    let img = build_image(&tmp.path().join("img"), "1", 1, 128 * 1024);
    let src = format!("{}/team/app:1", reg.addr());
    img.push_args(&src, &["--dest-creds", "alice:s3cret"]);

    let out = tmp.path().join("out");
    // Without credentials: refused, and the error says so.
    let err = failed(&pull(None, &src, &out, &[]));
    assert!(err.contains("HTTP 401"), "{err}");

    let bad = write_config(
        tmp.path(),
        &format!(
            "configs:\n  \"{}\":\n    auth:\n      username: alice\n      password: wrong\n",
            reg.addr()
        ),
    );
    let err = failed(&pull(Some(&bad), &src, &out, &[]));
    assert!(err.contains("HTTP 401"), "{err}");

    let cfg = write_config(
        tmp.path(),
        &format!(
            "configs:\n  \"{}\":\n    auth:\n      username: alice\n      password: s3cret\n",
            reg.addr()
        ),
    );
    let before = reg.access_log().len();
    let summary = ok(&pull(Some(&cfg), &src, &out, &[]));
    assert!(summary.contains("3 fetched"), "{summary}");
    // One 401 to learn the challenge; after it the credentials go up front.
    let log = reg.access_log()[before..].to_vec();
    let denied = log.iter().filter(|l| l.contains("\" 401 ")).count();
    assert_eq!(denied, 1, "{}", log.join("\n"));
    assert_eq!(
        log.len(),
        5,
        "HEAD 401, HEAD, GET manifest, 2 blobs:\n{}",
        log.join("\n")
    );
}

fn tls_registry(dir: &Path, client_ca: bool) -> (Registry, support::pki::Pki, String) {
    let pki = support::pki::generate(&dir.join("pki"));
    // Push through a plain instance on the same storage, then serve it over TLS.
    let img = build_image(&dir.join("img"), "1", 1, 128 * 1024);
    let plain = Registry::start(&dir.join("reg"));
    img.push(&format!("{}/secure/app:1", plain.addr()));
    let want = skopeo_digest(&format!("{}/secure/app:1", plain.addr()));
    drop(plain);
    let reg = Registry::start_with(
        &dir.join("reg"),
        RegistryOptions {
            tls: Some((pki.server_cert.clone(), pki.server_key.clone())),
            client_ca: client_ca.then(|| pki.ca.clone()),
            ..Default::default()
        },
    );
    (reg, pki, want)
}

#[test]
fn pull_over_tls_with_ca_file() {
    let tmp = tempfile::tempdir().unwrap();
    let (reg, pki, want) = tls_registry(tmp.path(), false);
    let image = "registry.example.test/secure/app:1";
    let out = tmp.path().join("out");
    let mirror = format!(
        "mirrors:\n  registry.example.test:\n    endpoint: [\"https://{}\"]\n",
        reg.addr()
    );
    // The test CA is not trusted by default: a TLS error, naming the endpoint.
    let cfg = write_config(tmp.path(), &mirror);
    let err = failed(&pull(Some(&cfg), image, &out, &[]));
    assert!(err.contains(&format!("https://{}/v2", reg.addr())), "{err}");
    assert!(err.to_lowercase().contains("certificate"), "{err}");

    let cfg = write_config(
        tmp.path(),
        &format!(
            "{mirror}configs:\n  \"{}\":\n    tls:\n      ca_file: {}\n",
            reg.addr(),
            pki.ca.display()
        ),
    );
    pull_expecting(Some(&cfg), image, &out, "1", &want);
}

#[test]
fn pull_over_mtls_with_client_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let (reg, pki, want) = tls_registry(tmp.path(), true);
    let image = "registry.example.test/secure/app:1";
    let out = tmp.path().join("out");
    let mirror = format!(
        "mirrors:\n  registry.example.test:\n    endpoint: [\"https://{}\"]\n",
        reg.addr()
    );
    let ca_only = write_config(
        tmp.path(),
        &format!(
            "{mirror}configs:\n  \"{}\":\n    tls:\n      ca_file: {}\n",
            reg.addr(),
            pki.ca.display()
        ),
    );
    let err = failed(&pull(Some(&ca_only), image, &out, &[]));
    assert!(err.contains(&format!("https://{}/v2", reg.addr())), "{err}");

    let cfg = write_config(
        tmp.path(),
        &format!(
            "{mirror}configs:\n  \"{}\":\n    tls:\n      ca_file: {}\n      cert_file: {}\n      key_file: {}\n",
            reg.addr(),
            pki.ca.display(),
            pki.client_cert.display(),
            pki.client_key.display()
        ),
    );
    pull_expecting(Some(&cfg), image, &out, "1", &want);
}

#[test]
fn pull_rewritten_to_another_repository_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(&tmp.path().join("reg"));
    let img = build_image(&tmp.path().join("img"), "1.35", 1, 128 * 1024);
    let src = format!("{}/production/busybox:1.35", reg.addr());
    img.push(&src);
    let want = skopeo_digest(&src);
    let cfg = write_config(
        tmp.path(),
        &format!(
            "mirrors:\n  registry.example.test:\n    endpoint: [\"{}\"]\n    rewrite:\n      \"^rancher/(.*)\": \"production/$1\"\n",
            reg.addr()
        ),
    );
    let out = tmp.path().join("out");
    pull_expecting(Some(&cfg), REWRITTEN, &out, "1.35", &want);
    // The mirror saw the rewritten path and the original registry in ?ns=.
    let log = reg.access_log();
    assert!(
        log.iter()
            .any(|l| l.contains("/v2/production/busybox/manifests/1.35?ns=registry.example.test")),
        "{}",
        log.join("\n")
    );
    assert!(
        !log.iter().any(|l| l.contains("/v2/rancher/")),
        "{}",
        log.join("\n")
    );
}

#[test]
fn pull_falls_back_past_dead_missing_and_corrupt_endpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(&tmp.path().join("reg"));
    let empty = Registry::start(&tmp.path().join("empty"));
    let img = build_image(&tmp.path().join("img"), "1", 2, 128 * 1024);
    let src = format!("{}/library/fb:1", reg.addr());
    img.push(&src);
    let want = skopeo_digest(&src);
    // The fake serves the same layout, with every blob corrupted.
    let corrupt = img.fake(FakeOptions {
        corrupt_blobs: true,
        ..Default::default()
    });
    let dead = support::free_port();
    let cfg = write_config(
        tmp.path(),
        &format!(
            "mirrors:\n  registry.example.test:\n    endpoint:\n      - \"127.0.0.1:{dead}\"\n      - \"{}\"\n      - \"{}\"\n      - \"{}\"\n",
            empty.addr(),
            corrupt.addr,
            reg.addr()
        ),
    );
    let out = tmp.path().join("out");
    // How fast the fallback is belongs to the benchmarks, not here (no timed assertions).
    let summary = ok(&pull(
        Some(&cfg),
        "registry.example.test/library/fb:1",
        &out,
        &[],
    ));
    assert!(summary.contains(&format!("digest {want}")), "{summary}");
    check_layout(&out, "1", &want);
    // The manifest came from the fake (it is intact there); every blob from the real
    // registry, after the fake's corrupted copy was refused.
    assert_eq!(
        sources(&summary, "manifest"),
        vec![format!("http://{}/v2", corrupt.addr)],
        "{summary}"
    );
    for kind in ["config", "layer"] {
        for s in sources(&summary, kind) {
            assert_eq!(s, format!("http://{}/v2", reg.addr()), "{summary}");
        }
    }
    let blob_gets = corrupt
        .seen()
        .iter()
        .filter(|s| s.path.contains("/blobs/"))
        .count();
    assert_eq!(
        blob_gets, 3,
        "config and two layers tried on the fake first"
    );
    assert!(
        empty
            .access_log()
            .iter()
            .any(|l| l.contains("/v2/library/fb/manifests/1") && l.contains("\" 404 ")),
        "the 404 endpoint was asked"
    );
}

#[test]
fn pull_error_names_every_attempt() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = Registry::start(&tmp.path().join("empty"));
    let dead = support::free_port();
    let cfg = write_config(
        tmp.path(),
        &format!(
            "mirrors:\n  registry.example.test:\n    endpoint: [\"127.0.0.1:{dead}\", \"{}\"]\n",
            empty.addr()
        ),
    );
    let err = failed(&pull(
        Some(&cfg),
        "registry.example.test/library/none:1",
        &tmp.path().join("out"),
        &[],
    ));
    assert!(err.contains("all 2 attempt(s) failed"), "{err}");
    assert!(
        err.contains(&format!("1. http://127.0.0.1:{dead}/v2")),
        "{err}"
    );
    assert!(err.to_lowercase().contains("connect"), "{err}");
    assert!(
        err.contains(&format!("2. http://{}/v2", empty.addr())),
        "{err}"
    );
    assert!(err.contains("HTTP 404"), "{err}");
}

#[test]
fn pull_selects_a_platform_or_keeps_all() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(&tmp.path().join("reg"));
    let img = support::build_index(
        &tmp.path().join("img"),
        "multi",
        &["linux/amd64", "linux/arm64"],
        64 * 1024,
    );
    let src = format!("{}/library/multi:multi", reg.addr());
    support::push_all(&img, &src);
    let index_digest = skopeo_digest(&src);
    // The arm64 manifest's digest, from the index in the layout.
    let index: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            img.layout
                .join("blobs/sha256")
                .join(index_digest.strip_prefix("sha256:").unwrap()),
        )
        .unwrap(),
    )
    .unwrap();
    let arm = digest_of(&index, |m| m["platform"]["architecture"] == "arm64");
    assert_ne!(arm, index_digest);

    let out = tmp.path().join("arm");
    let summary = ok(&pull(None, &src, &out, &["--platform", "linux/arm64"]));
    assert!(summary.contains(&format!("digest {arm}")), "{summary}");
    let entry = check_layout(&out, "multi", &arm);
    assert_eq!(entry["platform"]["architecture"], "arm64");

    let err = failed(&pull(
        None,
        &src,
        &tmp.path().join("none"),
        &["--platform", "linux/s390x"],
    ));
    assert!(err.contains("linux/amd64, linux/arm64"), "{err}");

    let out = tmp.path().join("all");
    let summary = ok(&pull(None, &src, &out, &["--all-platforms"]));
    assert!(
        summary.contains(&format!("digest {index_digest}")),
        "{summary}"
    );
    check_layout(&out, "multi", &index_digest);
    assert_eq!(sources(&summary, "layer").len(), 2, "{summary}");
}

#[test]
fn pull_resumes_a_broken_download_on_the_next_endpoint_with_range() {
    let tmp = tempfile::tempdir().unwrap();
    let img = build_image(&tmp.path().join("img"), "1", 1, 512 * 1024);
    let broken = img.fake(FakeOptions {
        truncate_blobs: true,
        ..Default::default()
    });
    let good = img.fake(FakeOptions::default());
    let cfg = write_config(
        tmp.path(),
        &format!(
            "mirrors:\n  registry.example.test:\n    endpoint: [\"{}\", \"{}\"]\n",
            broken.addr, good.addr
        ),
    );
    let out = tmp.path().join("out");
    let summary = ok(&pull(
        Some(&cfg),
        "registry.example.test/library/resume:1",
        &out,
        &[],
    ));
    for kind in ["config", "layer"] {
        assert_eq!(
            sources(&summary, kind),
            vec![format!("http://{}/v2", good.addr)],
            "{summary}"
        );
    }
    let ranges: Vec<String> = good
        .seen()
        .iter()
        .filter(|s| s.path.contains("/blobs/"))
        .map(|s| s.range.clone().unwrap_or_default())
        .collect();
    assert_eq!(ranges.len(), 2, "{ranges:?}");
    for r in &ranges {
        let n: u64 = r
            .strip_prefix("bytes=")
            .and_then(|v| v.strip_suffix('-'))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("resumed with a Range request: {ranges:?}"));
        assert!(n > 0, "{ranges:?}");
    }
    let entry: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("index.json")).unwrap()).unwrap();
    check_layout(&out, "1", entry["manifests"][0]["digest"].as_str().unwrap());
}
