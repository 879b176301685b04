//! `kagami serve` with real parts: docker-registry upstream, containerd 1.6 pulling
//! through hosts.toml written by kagami, skopeo through the path-prefix form, and faults
//! at the process level (kill -9, stopped upstream, full disk).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{
    Containerd, Daemon, Registry, build_image, eventually_sync, free_port, http_get, kagami,
    random_fill, run, skopeo_copy_retried, wait_for_port,
};

/// A `kagami serve` process on a loopback port.
pub struct Kagami {
    pub daemon: Daemon,
    pub port: u16,
    pub data: PathBuf,
    pub log: PathBuf,
}

impl Kagami {
    /// On a free port (another one if the first was taken before kagami bound it).
    pub fn start(dir: &Path, config: &Path, extra: &[&str]) -> Kagami {
        kagami_testkit::start_on_free_ports(
            Duration::from_secs(20),
            || {
                let k = Self::spawn_on(dir, config, free_port(), extra);
                let (addr, log) = (k.addr(), k.log.clone());
                (k, addr, log)
            },
            |k| &mut k.daemon.child,
        )
    }

    pub fn start_on(dir: &Path, config: &Path, port: u16, extra: &[&str]) -> Kagami {
        let mut k = Self::spawn_on(dir, config, port, extra);
        let addr = k.addr();
        kagami_testkit::wait_for_child_port(
            &mut k.daemon.child,
            &addr,
            &k.log,
            Duration::from_secs(20),
        );
        k
    }

    fn spawn_on(dir: &Path, config: &Path, port: u16, extra: &[&str]) -> Kagami {
        let data = dir.join("kagami-data");
        let log = dir.join(format!("kagami-{port}.log"));
        let child = kagami()
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--log-format",
                "json",
            ])
            .arg("--data-dir")
            .arg(&data)
            .arg("--config")
            .arg(config)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start kagami serve");
        Kagami {
            daemon: Daemon {
                child,
                name: "kagami",
            },
            port,
            data,
            log,
        }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn metrics(&self) -> String {
        String::from_utf8(http_get(&self.addr(), "/metrics").2).unwrap()
    }

    pub fn kill9(&mut self) {
        let _ = Command::new("kill")
            .args(["-9", &self.daemon.child.id().to_string()])
            .status();
        let _ = self.daemon.child.wait();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Starts `curl URL | sha256sum` (the body never touches the disk); see [`finish_digest`].
fn download_digest(url: &str) -> std::process::Child {
    Command::new("sh")
        .arg("-c")
        .arg(format!("curl -sS -f --max-time 120 '{url}' | sha256sum"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The `sha256:<hex>` of what a [`download_digest`] received.
fn finish_digest(child: std::process::Child) -> String {
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let sum = String::from_utf8(out.stdout).unwrap();
    format!("sha256:{}", sum.split_whitespace().next().unwrap_or(""))
}

/// registries.yaml mirroring the made-up `registry.example.test` from `registry`.
fn mirror_config(dir: &Path, registry: &Registry) -> PathBuf {
    write(
        &dir.join("registries.yaml"),
        &format!(
            "mirrors:\n  registry.example.test:\n    endpoint: [\"http://{}\"]\n",
            registry.addr()
        ),
    )
}

fn write(path: &Path, text: &str) -> PathBuf {
    std::fs::write(path, text).unwrap();
    path.to_path_buf()
}

/// Blob digests of an image in an OCI layout (manifest, config and layers).
fn blob_digests(layout: &Path) -> Vec<String> {
    std::fs::read_dir(layout.join("blobs/sha256"))
        .unwrap()
        .map(|e| format!("sha256:{}", e.unwrap().file_name().to_string_lossy()))
        .collect()
}

fn remove_image_and_content(c: &Containerd, image: &str) {
    let _ = c.ctr().args(["images", "rm", "--sync", image]).output();
    let out = run(c.ctr().args(["content", "ls", "-q"]));
    for d in String::from_utf8(out.stdout).unwrap().lines() {
        let _ = c.ctr().args(["content", "rm", d]).output();
    }
}

fn pull_ok(c: &Containerd, image: &str) {
    let out = c.pull(image);
    assert!(
        out.status.success(),
        "ctr pull {image} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// containerd, for real: a multi-layer image through kagami; every blob fetched from
/// upstream once; a second cold pull makes no upstream blob request; with the upstream
/// stopped, pulls by tag and by digest still work.
#[test]
fn containerd_pulls_through_kagami() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry"));
    let image = build_image(&dir.path().join("image"), "1", 3, 256 * 1024);
    image.push(&format!("{}/library/app:1", registry.addr()));
    let config = mirror_config(dir.path(), &registry);
    let containerd = Containerd::start(&dir.path().join("containerd"));
    // A short tag TTL so that the pull with the upstream stopped must revalidate and fall
    // back to the cached digest (stale-if-error).
    let k = Kagami::start(
        dir.path(),
        &config,
        &[
            "--disable-default-registry-endpoint",
            "--tag-ttl",
            "0s",
            "--containerd-hosts-dir",
            containerd.hosts_dir.to_str().unwrap(),
        ],
    );
    let hosts = std::fs::read_to_string(
        containerd
            .hosts_dir
            .join("registry.example.test/hosts.toml"),
    )
    .unwrap();
    let first_host = hosts.lines().find(|l| l.starts_with("[host.\"")).unwrap();
    assert_eq!(
        first_host,
        format!("[host.\"http://{}/v2\"]", k.addr()),
        "{hosts}"
    );

    pull_ok(&containerd, "registry.example.test/library/app:1");
    let digests = blob_digests(&image.layout);
    let layer_and_config: Vec<&String> = digests
        .iter()
        .filter(|d| registry.count_gets(&format!("/blobs/{d}")) > 0)
        .collect();
    assert!(
        layer_and_config.len() >= 4,
        "3 layers and a config fetched: {:?}",
        registry.access_log()
    );
    for d in &layer_and_config {
        assert_eq!(
            registry.count_gets(&format!("/blobs/{d}")),
            1,
            "{d} fetched from upstream more than once"
        );
    }
    // Every upstream request came from kagami, none from containerd directly.
    assert!(
        registry
            .access_log()
            .iter()
            .all(|l| !l.contains("containerd/")),
        "{:?}",
        registry.access_log()
    );

    remove_image_and_content(&containerd, "registry.example.test/library/app:1");
    let before = registry.count_gets("/blobs/");
    pull_ok(&containerd, "registry.example.test/library/app:1");
    assert_eq!(
        registry.count_gets("/blobs/"),
        before,
        "second pull reached upstream for blobs"
    );

    let digest = {
        let out = run(containerd.ctr().args(["images", "ls"]));
        let text = String::from_utf8(out.stdout).unwrap();
        text.lines()
            .find(|l| l.starts_with("registry.example.test/library/app:1"))
            .unwrap()
            .split_whitespace()
            .nth(2)
            .unwrap()
            .to_string()
    };
    drop(registry);
    remove_image_and_content(&containerd, "registry.example.test/library/app:1");
    pull_ok(&containerd, "registry.example.test/library/app:1");
    remove_image_and_content(&containerd, "registry.example.test/library/app:1");
    pull_ok(
        &containerd,
        &format!("registry.example.test/library/app@{digest}"),
    );
    assert!(
        k.log_text().contains("stale-if-error"),
        "the tag was served stale after revalidation failed"
    );
    assert!(k.metrics().contains("kagami_stale_tags_served_total"));
}

/// Rewrites end to end, the Harbor proxy-cache layout: the upstream holds the image only
/// under production/; containerd pulls docker.io/rancher/busybox:1.35 and lists it under
/// that name.
#[test]
fn rewrites_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry"));
    let image = build_image(&dir.path().join("image"), "1.35", 1, 64 * 1024);
    image.push(&format!("{}/production/busybox:1.35", registry.addr()));
    let config = write(
        &dir.path().join("registries.yaml"),
        &format!(
            "mirrors:\n  docker.io:\n    endpoint: [\"http://{}\"]\n    rewrite:\n      \"^rancher/(.*)\": \"production/$1\"\n",
            registry.addr()
        ),
    );
    let containerd = Containerd::start(&dir.path().join("containerd"));
    let _k = Kagami::start(
        dir.path(),
        &config,
        &[
            "--disable-default-registry-endpoint",
            "--containerd-hosts-dir",
            containerd.hosts_dir.to_str().unwrap(),
        ],
    );
    let hosts = std::fs::read_to_string(containerd.hosts_dir.join("docker.io/hosts.toml")).unwrap();
    assert!(
        !hosts.contains("server ="),
        "no default endpoint may be tried: {hosts}"
    );
    pull_ok(&containerd, "docker.io/rancher/busybox:1.35");
    assert!(
        containerd
            .images()
            .contains("docker.io/rancher/busybox:1.35")
    );
    let log = registry.access_log();
    assert!(
        log.iter()
            .any(|l| l.contains("/v2/production/busybox/manifests/1.35")),
        "{log:?}"
    );
    assert!(
        registry.count_gets("/v2/production/busybox/blobs/") >= 2,
        "{log:?}"
    );
    assert!(!log.iter().any(|l| l.contains("/v2/rancher/")), "{log:?}");
}

/// skopeo inspect and copy through kagami's path-prefix form.
#[test]
fn skopeo_through_the_path_prefix_form() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry"));
    let image = build_image(&dir.path().join("image"), "2", 2, 128 * 1024);
    image.push(&format!("{}/team/tool:2", registry.addr()));
    let config = mirror_config(dir.path(), &registry);
    let k = Kagami::start(
        dir.path(),
        &config,
        &["--disable-default-registry-endpoint"],
    );
    let via = format!("{}/registry.example.test/team/tool:2", k.addr());
    let direct = crate::support::skopeo_digest(&format!("{}/team/tool:2", registry.addr()));
    assert_eq!(crate::support::skopeo_digest(&via), direct);
    let out = dir.path().join("copy");
    run(Command::new("skopeo")
        .args(["copy", "--quiet", "--src-tls-verify=false"])
        .arg(format!("docker://{via}"))
        .arg(format!("oci:{}:2", out.display())));
    assert!(out.join("index.json").exists());
    // Unserved registries get a fast 404 with an OCI body.
    let (status, _, body) = http_get(&k.addr(), "/v2/quay.io/team/tool/manifests/2");
    assert_eq!(status, 404);
    assert!(String::from_utf8_lossy(&body).contains("NAME_UNKNOWN"));
}

/// `tags/list` is the upstream's, in lexical order (docker-registry 2.8 does not sort),
/// named as the client asked, page by page (`n`, `last`, a `Link` to the next page that
/// comes back to kagami in the client's form); with the upstream gone it falls back to
/// the tags this mirror has resolved.
#[test]
fn tag_lists_come_from_upstream_and_survive_an_outage() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry"));
    let image = build_image(&dir.path().join("image"), "2", 1, 1024);
    for tag in ["1", "2", "3"] {
        image.push(&format!("{}/team/tool:{tag}", registry.addr()));
    }
    let config = mirror_config(dir.path(), &registry);
    let k = Kagami::start(
        dir.path(),
        &config,
        &["--disable-default-registry-endpoint"],
    );
    let tags = |path: &str| {
        let (status, head, body) = http_get(&k.addr(), path);
        let json: serde_json::Value = serde_json::from_slice(&body)
            .unwrap_or_else(|e| panic!("{path}: {e}: {head}\n{}", String::from_utf8_lossy(&body)));
        let list: Vec<String> = json["tags"]
            .as_array()
            .map(|a| a.iter().map(|t| t.as_str().unwrap().to_string()).collect())
            .unwrap_or_default();
        let link = head
            .lines()
            .find_map(|l| l.strip_prefix("link: "))
            .map(|l| {
                l.trim_start_matches('<')
                    .split('>')
                    .next()
                    .unwrap()
                    .to_string()
            });
        (status, json["name"].clone(), list, link)
    };
    let (status, name, all, link) = tags("/v2/registry.example.test/team/tool/tags/list");
    assert_eq!(status, 200);
    assert_eq!(name, "registry.example.test/team/tool");
    assert_eq!(all, ["1", "2", "3"], "none was pulled yet; sorted");
    assert_eq!(link, None);

    // Pages: the link comes back in the form the client used.
    let (_, _, first, link) = tags("/v2/registry.example.test/team/tool/tags/list?n=2");
    assert_eq!(first, ["1", "2"]);
    let link = link.expect("a Link to the next page");
    assert_eq!(
        link,
        "/v2/registry.example.test/team/tool/tags/list?n=2&last=2"
    );
    let (status, _, rest, _) = tags(&link);
    assert_eq!(status, 200);
    assert_eq!(rest, ["3"]);
    let (_, name, first, link) = tags("/v2/team/tool/tags/list?n=1&ns=registry.example.test");
    assert_eq!(
        (name.as_str(), first.as_slice()),
        (Some("team/tool"), &["1".to_string()][..])
    );
    let link = link.expect("a Link to the next page");
    assert_eq!(
        link,
        "/v2/team/tool/tags/list?n=1&last=1&ns=registry.example.test"
    );
    assert_eq!(tags(&link).2, ["2"]);

    // Resolve one tag through kagami, then take the upstream away.
    let via = format!("{}/registry.example.test/team/tool:2", k.addr());
    crate::support::skopeo_digest(&via);
    drop(registry);
    let (status, _, local, _) = tags("/v2/team/tool/tags/list?ns=registry.example.test");
    assert_eq!(status, 200);
    assert_eq!(local, ["2"], "only the tag this mirror resolved");
    let (status, _, _, _) = tags("/v2/registry.example.test/team/other/tags/list");
    assert_eq!(status, 404);
}

/// Pushes a raw blob of `size` random bytes to the registry (monolithic upload with curl);
/// returns its digest.
fn push_blob(registry: &Registry, repo: &str, dir: &Path, size: usize) -> (String, PathBuf) {
    let file = dir.join("blob.bin");
    let mut data = vec![0u8; size];
    random_fill(&mut data);
    std::fs::write(&file, &data).unwrap();
    drop(data);
    let sum = run(Command::new("sha256sum").arg(&file));
    let digest = format!(
        "sha256:{}",
        String::from_utf8(sum.stdout)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
    );
    let out = run(Command::new("curl")
        .args(["-sS", "-i", "-X", "POST"])
        .arg(format!(
            "http://{}/v2/{repo}/blobs/uploads/",
            registry.addr()
        )));
    let head = String::from_utf8(out.stdout).unwrap();
    let location = head
        .lines()
        .find_map(|l| {
            l.strip_prefix("Location: ")
                .or_else(|| l.strip_prefix("location: "))
        })
        .unwrap()
        .trim()
        .to_string();
    let sep = if location.contains('?') { '&' } else { '?' };
    let url = if location.starts_with("http") {
        location
    } else {
        format!("http://{}{location}", registry.addr())
    };
    run(Command::new("curl")
        .args([
            "-sS",
            "-f",
            "-X",
            "PUT",
            "-H",
            "Content-Type: application/octet-stream",
            "--data-binary",
        ])
        .arg(format!("@{}", file.display()))
        .arg(format!("{url}{sep}digest={digest}")));
    (digest, file)
}

/// 20 concurrent cold requests for one ~200 MB blob: every client gets the right bytes,
/// upstream sends it once.
#[test]
fn twenty_concurrent_cold_requests_fetch_upstream_once() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry"));
    let (digest, _) = push_blob(&registry, "big/blob", dir.path(), 200 * 1024 * 1024);
    let config = mirror_config(dir.path(), &registry);
    let k = Kagami::start(
        dir.path(),
        &config,
        &["--disable-default-registry-endpoint"],
    );
    let url = format!(
        "http://{}/v2/big/blob/blobs/{digest}?ns=registry.example.test",
        k.addr()
    );
    let children: Vec<_> = (0..20).map(|_| download_digest(&url)).collect();
    for c in children {
        assert_eq!(finish_digest(c), digest);
    }
    assert_eq!(
        registry.count_gets(&format!("/blobs/{digest}")),
        1,
        "upstream sent the blob more than once"
    );
}

/// `--max-blob-age`: a blob nobody asks for again is evicted once it is older than the age
/// (counted in kagami_store_evictions_total), and the next request fetches it again.
#[test]
fn blobs_unused_for_max_blob_age_are_evicted() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry"));
    let (digest, _) = push_blob(&registry, "team/aged", dir.path(), 64 * 1024);
    let config = mirror_config(dir.path(), &registry);
    let k = Kagami::start(
        dir.path(),
        &config,
        &[
            "--disable-default-registry-endpoint",
            "--max-blob-age",
            "2s",
        ],
    );
    let path = format!("/v2/team/aged/blobs/{digest}?ns=registry.example.test");
    assert_eq!(http_get(&k.addr(), &path).0, 200);
    let file = k
        .data
        .join("store/blobs/sha256")
        .join(digest.trim_start_matches("sha256:"));
    // Committed to the store as the body ends; then evicted once 2 s old.
    eventually_sync(
        Duration::from_secs(10),
        format!("{} to be stored", file.display()),
        || file.exists(),
    );
    eventually_sync(Duration::from_secs(20), "the blob to be evicted", || {
        !file.exists()
    });
    assert!(
        k.metrics().contains("kagami_store_evictions_total 1\n"),
        "{}",
        k.metrics()
    );
    assert!(
        k.log_text()
            .contains("unused for longer than --max-blob-age")
    );
    assert_eq!(http_get(&k.addr(), &path).0, 200);
    assert_eq!(registry.count_gets(&format!("/blobs/{digest}")), 2);
}

/// kill -9 of kagami during a cold fetch, restart, pull again: no corrupt data, the pull works.
#[test]
fn kill_during_cold_fetch_then_restart() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry"));
    let (digest, _) = push_blob(&registry, "big/blob", dir.path(), 64 * 1024 * 1024);
    let config = mirror_config(dir.path(), &registry);
    let port = free_port();
    let mut k = Kagami::start_on(
        dir.path(),
        &config,
        port,
        &["--disable-default-registry-endpoint"],
    );
    let url = format!(
        "http://{}/v2/big/blob/blobs/{digest}?ns=registry.example.test",
        k.addr()
    );
    // A slow reader keeps the fetch in progress while we kill the server.
    let mut slow = Command::new("curl")
        .args(["-sS", "--limit-rate", "2M", "-o", "/dev/null", &url])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    k.kill9();
    let _ = slow.kill();
    let _ = slow.wait();
    let blob_path = k
        .data
        .join("store/blobs/sha256")
        .join(digest.trim_start_matches("sha256:"));
    if blob_path.exists() {
        // If it got there, it must be complete and right.
        let sum = run(Command::new("sha256sum").arg(&blob_path));
        assert!(
            String::from_utf8(sum.stdout)
                .unwrap()
                .starts_with(digest.trim_start_matches("sha256:"))
        );
    }
    let k = Kagami::start_on(
        dir.path(),
        &config,
        port,
        &["--disable-default-registry-endpoint"],
    );
    let out = run(Command::new("sh")
        .arg("-c")
        .arg(format!("curl -sS -f --max-time 60 '{url}' | sha256sum")));
    assert_eq!(
        format!(
            "sha256:{}",
            String::from_utf8(out.stdout)
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap()
        ),
        digest
    );
    let tmp = k.data.join("store/tmp");
    let leftovers = std::fs::read_dir(&tmp).map(|d| d.count()).unwrap_or(0);
    assert!(
        leftovers <= 1,
        "temp files from the killed run were not cleaned: {leftovers}"
    );
}

/// A dead endpoint (connection refused) is answered within seconds, not containerd's 30 s,
/// and the error names what was tried, without the connection error (that stays in the
/// log, under the request id the body and the `X-Request-Id` header give).
#[test]
fn dead_endpoint_answers_fast() {
    let dir = tempfile::tempdir().unwrap();
    let dead = free_port();
    let config = write(
        &dir.path().join("registries.yaml"),
        &format!(
            "mirrors:\n  registry.example.test:\n    endpoint: [\"http://127.0.0.1:{dead}\"]\n"
        ),
    );
    let k = Kagami::start(
        dir.path(),
        &config,
        &["--disable-default-registry-endpoint"],
    );
    let start = Instant::now();
    let (status, head, body) = http_get(&k.addr(), "/v2/registry.example.test/a/b/manifests/1");
    let took = start.elapsed();
    assert_eq!(status, 404);
    let body = String::from_utf8_lossy(&body).into_owned();
    assert!(body.contains(&format!("127.0.0.1:{dead}")), "{body}");
    assert!(body.contains("no answer"), "{body}");
    assert!(!body.contains("os error"), "{body}");
    let id = head
        .lines()
        .find_map(|l| l.strip_prefix("x-request-id: "))
        .unwrap_or_else(|| panic!("no X-Request-Id in {head}"));
    assert!(body.contains(id), "{body}");
    let logged = eventually_sync(
        Duration::from_secs(10),
        format!("a log line for {id}"),
        || {
            let log = k.log_text();
            log.lines()
                .find(|l| l.contains(id) && l.contains("every attempt failed"))
                .map(str::to_string)
                .ok_or(log)
        },
    );
    assert!(logged.contains("os error 111"), "{logged}");
    assert!(
        took < Duration::from_secs(5),
        "a refused endpoint took {took:?}"
    );
}

/// The store on a small tmpfs that fills up: serving continues (uncached pass-through).
#[test]
fn full_store_passes_through() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry"));
    let (small, _) = push_blob(
        &registry,
        "big/blob",
        &dir.path().join("a").tap_mkdir(),
        2 * 1024 * 1024,
    );
    let (large, _) = push_blob(
        &registry,
        "big/blob",
        &dir.path().join("b").tap_mkdir(),
        12 * 1024 * 1024,
    );
    let config = mirror_config(dir.path(), &registry);
    let mnt = dir.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(
        mounted.success(),
        "mounting a tmpfs needs root (the test script runs as root)"
    );
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mnt.clone());
    let port = free_port();
    let log = std::fs::File::create(dir.path().join("k.log")).unwrap();
    let child = kagami()
        .args([
            "serve",
            "--disable-default-registry-endpoint",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
        ])
        .arg(&mnt)
        .arg("--config")
        .arg(&config)
        .stderr(log)
        .spawn()
        .unwrap();
    let _k = Daemon {
        child,
        name: "kagami",
    };
    let addr = format!("127.0.0.1:{port}");
    wait_for_port(&addr, Duration::from_secs(20));
    for (digest, attempts) in [(&small, 1), (&large, 3)] {
        let url = format!("http://{addr}/v2/big/blob/blobs/{digest}?ns=registry.example.test");
        // The first request for the large blob may be cut when the disk fills; the
        // following ones pass through uncached.
        let mut ok = false;
        for _ in 0..attempts {
            let out = Command::new("sh")
                .arg("-c")
                .arg(format!("curl -sS -f --max-time 60 '{url}' | sha256sum"))
                .output()
                .unwrap();
            let sum = String::from_utf8(out.stdout).unwrap();
            if format!("sha256:{}", sum.split_whitespace().next().unwrap_or("")) == *digest {
                ok = true;
                break;
            }
        }
        assert!(ok, "{digest} was not served with the store full");
    }
    // The small one is stored and served locally; the large one is not stored.
    assert!(
        mnt.join("store/blobs/sha256")
            .join(small.trim_start_matches("sha256:"))
            .exists()
    );
    assert!(
        !mnt.join("store/blobs/sha256")
            .join(large.trim_start_matches("sha256:"))
            .exists()
    );
}

trait TapMkdir {
    fn tap_mkdir(self) -> Self;
}

impl TapMkdir for PathBuf {
    fn tap_mkdir(self) -> Self {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}

/// registries.yaml is reloaded when it changes; a version with errors is refused and the
/// running configuration kept.
#[test]
fn reload_on_change_keeps_the_old_config_on_errors() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry"));
    let image = build_image(&dir.path().join("image"), "1", 1, 32 * 1024);
    image.push(&format!("{}/team/app:1", registry.addr()));
    let config = write(
        &dir.path().join("registries.yaml"),
        &format!(
            "mirrors:\n  one.example.test:\n    endpoint: [\"http://{}\"]\n",
            registry.addr()
        ),
    );
    let k = Kagami::start(
        dir.path(),
        &config,
        &["--disable-default-registry-endpoint"],
    );
    let path = "/v2/two.example.test/team/app/manifests/1";
    assert_eq!(
        http_get(&k.addr(), path).0,
        404,
        "two.example.test is not configured yet"
    );
    write(
        &config,
        &format!(
            "mirrors:\n  two.example.test:\n    endpoint: [\"http://{}\"]\n",
            registry.addr()
        ),
    );
    let served = |p: &str, what: &str| {
        eventually_sync(Duration::from_secs(15), what, || {
            http_get(&k.addr(), p).0 == 200
        })
    };
    served(path, "the changed file to be picked up");
    // A broken file is refused: two.example.test stays served.
    write(
        &config,
        "mirrors:\n  two.example.test:\n    endpoints: [oops]\n",
    );
    eventually_sync(Duration::from_secs(15), "a refusal logged", || {
        let log = k.log_text();
        if log.contains("new configuration refused") {
            Ok(())
        } else {
            Err(log)
        }
    });
    assert_eq!(http_get(&k.addr(), path).0, 200);
    // SIGHUP reloads too.
    write(
        &config,
        &format!(
            "mirrors:\n  one.example.test:\n    endpoint: [\"http://{}\"]\n",
            registry.addr()
        ),
    );
    run(Command::new("kill").args(["-HUP", &k.daemon.child.id().to_string()]));
    served(
        "/v2/one.example.test/team/app/manifests/1",
        "SIGHUP to reload the file",
    );
}

/// The scenario: node A holds ksd.test.com/ksd/nginx:1.27 (pulled earlier through
/// its own store); nodes B and C reach no registry (`mirrors: {ksd.test.com: }` and no
/// default endpoint) and pull it, by tag and by digest, from A through the DHT. B bootstraps
/// from A's P2P address, C from A's peer HTTP address. All three share a pre-shared key.
#[test]
fn three_nodes_share_through_the_dht() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry"));
    let image = build_image(&dir.path().join("image"), "1.27", 2, 256 * 1024);
    image.push(&format!("{}/ksd/nginx:1.27", registry.addr()));
    let psk = write(
        &dir.path().join("psk"),
        "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\n",
    );
    crate::support::private(&psk);
    let config_a = write(
        &dir.path().join("a.yaml"),
        &format!(
            "mirrors:\n  ksd.test.com:\n    endpoint: [\"http://{}\"]\n",
            registry.addr()
        ),
    );
    let config_bc = write(&dir.path().join("bc.yaml"), "mirrors:\n  ksd.test.com:\n");
    let node = |name: &str, ip: &str, config: &Path, bootstrap: Option<String>| {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        let (api, p2p, http) = (free_port(), free_port(), free_port());
        let mut args = vec![
            "serve".to_string(),
            "--listen".into(),
            format!("{ip}:{api}"),
            "--p2p-listen".into(),
            format!("{ip}:{p2p}"),
            "--p2p-http-listen".into(),
            format!("{ip}:{http}"),
            "--p2p-psk-file".into(),
            psk.display().to_string(),
            "--disable-default-registry-endpoint".into(),
            "--log-format".into(),
            "json".into(),
            "--data-dir".into(),
            d.join("data").display().to_string(),
            "--config".into(),
            config.display().to_string(),
        ];
        if let Some(b) = bootstrap {
            args.extend(["--p2p-bootstrap".into(), b]);
        }
        let child = kagami()
            .args(&args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("kagami.log")).unwrap())
            .spawn()
            .unwrap();
        let api_addr = format!("{ip}:{api}");
        wait_for_port(&api_addr, Duration::from_secs(20));
        (
            Daemon {
                child,
                name: "kagami",
            },
            api_addr,
            format!("{ip}:{p2p}"),
            format!("{ip}:{http}"),
            d,
        )
    };
    let (_a, a_api, a_p2p, a_http, _) = node("a", "127.0.0.2", &config_a, None);
    // A pulls the image through its own store.
    let via_a = format!("{a_api}/ksd.test.com/ksd/nginx:1.27");
    let digest = crate::support::skopeo_digest(&via_a);
    run(Command::new("skopeo")
        .args(["copy", "--quiet", "--src-tls-verify=false"])
        .arg(format!("docker://{via_a}"))
        .arg(format!("oci:{}:a", dir.path().join("out-a").display())));
    let upstream_blob_gets = registry.count_gets("/blobs/");
    assert!(upstream_blob_gets >= 3);

    let (_b, b_api, _, _, b_dir) = node("b", "127.0.0.3", &config_bc, Some(a_p2p.clone()));
    let (_c, c_api, _, _, c_dir) = node(
        "c",
        "127.0.0.4",
        &config_bc,
        Some(format!("http://{a_http}")),
    );
    for (api, d) in [(&b_api, &b_dir), (&c_api, &c_dir)] {
        // Wait (bounded) until the node sees A.
        eventually_sync(
            Duration::from_secs(20),
            format!("{api} to see a member"),
            || {
                let status = String::from_utf8(http_get(api, "/p2p/status").2).unwrap();
                if status.contains("\"members\":[{") {
                    return Ok(());
                }
                Err(format!(
                    "{status}\n{}",
                    std::fs::read_to_string(d.join("kagami.log")).unwrap()
                ))
            },
        );
    }
    for (name, api) in [("b", &b_api), ("c", &c_api)] {
        let by_tag = format!("{api}/ksd.test.com/ksd/nginx:1.27");
        // Provider records take a moment to spread: retried.
        skopeo_copy_retried(
            &by_tag,
            &format!(
                "oci:{}:tag",
                dir.path().join(format!("out-{name}")).display()
            ),
            &format!("node {name} to pull by tag from A"),
            String::new,
        );
        assert_eq!(crate::support::skopeo_digest(&by_tag), digest);
        let by_digest = format!("{api}/ksd.test.com/ksd/nginx@{digest}");
        run(Command::new("skopeo")
            .args(["copy", "--quiet", "--src-tls-verify=false"])
            .arg(format!("docker://{by_digest}"))
            .arg(format!(
                "oci:{}:digest",
                dir.path().join(format!("out-{name}")).display()
            )));
        let metrics = String::from_utf8(http_get(api, "/metrics").2).unwrap();
        assert!(
            metrics.contains("kagami_served_bytes_total{source=\"peer\"}"),
            "{metrics}"
        );
    }
    assert_eq!(
        registry.count_gets("/blobs/"),
        upstream_blob_gets,
        "B and C must not reach the registry"
    );
    // A machine without the key cannot download from A's peer API.
    let (status, _, _) = http_get(
        &a_http,
        &format!("/v2/ksd/nginx/manifests/{digest}?ns=ksd.test.com"),
    );
    assert_eq!(status, 401);
}

/// One upstream fetch per cluster: three nodes that can all reach the registry ask for
/// the same cold blob at the same moment; upstream sends it once and every client gets
/// the right bytes (the others stream from the fetching node while it downloads).
#[test]
fn one_upstream_fetch_per_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry"));
    let (digest, _) = push_blob(&registry, "big/blob", dir.path(), 48 * 1024 * 1024);
    let psk = write(
        &dir.path().join("psk"),
        "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n",
    );
    crate::support::private(&psk);
    let config = mirror_config(dir.path(), &registry);
    let mut nodes = Vec::new();
    let mut first_p2p: Option<String> = None;
    for (i, ip) in ["127.0.0.2", "127.0.0.3", "127.0.0.4"].iter().enumerate() {
        let d = dir.path().join(format!("n{i}"));
        std::fs::create_dir_all(&d).unwrap();
        let (api, p2p, http) = (free_port(), free_port(), free_port());
        let mut cmd = kagami();
        cmd.args([
            "serve",
            "--disable-default-registry-endpoint",
            "--listen",
            &format!("{ip}:{api}"),
        ])
        .args([
            "--p2p-listen",
            &format!("{ip}:{p2p}"),
            "--p2p-http-listen",
            &format!("{ip}:{http}"),
        ])
        .arg("--p2p-psk-file")
        .arg(&psk)
        .arg("--data-dir")
        .arg(d.join("data"))
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(d.join("kagami.log")).unwrap());
        if let Some(b) = &first_p2p {
            cmd.args(["--p2p-bootstrap", b]);
        }
        let mut child = cmd.spawn().unwrap();
        let addr = format!("{ip}:{api}");
        kagami_testkit::wait_for_child_port(
            &mut child,
            &addr,
            &d.join("kagami.log"),
            Duration::from_secs(20),
        );
        first_p2p.get_or_insert(format!("{ip}:{p2p}"));
        nodes.push((
            Daemon {
                child,
                name: "kagami",
            },
            addr,
        ));
    }
    // Every node sees the two others before the race starts.
    for (_, addr) in &nodes {
        eventually_sync(
            Duration::from_secs(20),
            format!("{addr} to see two members"),
            || {
                let status = String::from_utf8(http_get(addr, "/p2p/status").2).unwrap();
                if status.matches("\"http_addr\"").count() >= 2 {
                    return Ok(());
                }
                Err(status)
            },
        );
    }
    let children: Vec<_> = nodes
        .iter()
        .map(|(_, addr)| {
            download_digest(&format!(
                "http://{addr}/v2/big/blob/blobs/{digest}?ns=registry.example.test"
            ))
        })
        .collect();
    for c in children {
        assert_eq!(finish_digest(c), digest);
    }
    assert_eq!(
        registry.count_gets(&format!("/blobs/{digest}")),
        1,
        "the cluster fetched the blob from upstream more than once: {:?}",
        registry.access_log()
    );
    let peer_bytes: usize = nodes
        .iter()
        .filter(|(_, addr)| {
            String::from_utf8(http_get(addr, "/metrics").2)
                .unwrap()
                .contains("kagami_served_bytes_total{source=\"peer\"}")
        })
        .count();
    assert_eq!(
        peer_bytes, 2,
        "two nodes should have streamed from the fetching one"
    );
}
