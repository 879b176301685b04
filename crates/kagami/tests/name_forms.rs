//! Every registry name form, through real containerd 1.6 (`ctr --hosts-dir`): a registry
//! with a port (what containerd sends as `?ns=host%3Aport`), an IPv6 literal with a port,
//! Docker Hub by its name, its short repository form and its two aliases, `"*"`, and a
//! rewrite. Each hosts.toml has kagami first and a dead `server`, so a pull that containerd
//! routes around kagami fails instead of passing unseen; each image is fetched from the
//! origin once (by kagami, never by containerd), and pulled again with zero origin blob
//! GETs. `kagami doctor` reads the same hosts directory and reports every registry as
//! going through kagami, then catches one that does not.

use std::path::Path;

use crate::serve::Kagami;
use crate::support::{Containerd, Registry, build_image, run};

/// A port nothing listens on: containerd's fallback `server` in these tests.
const DEAD: &str = "http://127.0.0.1:9";

struct Form {
    /// What containerd is asked to pull.
    image: &'static str,
    /// containerd's hosts directory entry for it.
    hosts_dir: &'static str,
    /// Where the origin holds it.
    origin_repo: &'static str,
}

fn write_hosts(c: &Containerd, dir: &str, kagami: &str) {
    let d = c.hosts_dir.join(dir);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(
        d.join("hosts.toml"),
        format!(
            "server = \"{DEAD}\"\n\n[host.\"http://{kagami}/v2\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        ),
    )
    .unwrap();
}

fn remove_all(c: &Containerd) {
    for image in c.images().lines() {
        let _ = c.ctr().args(["images", "rm", "--sync", image]).output();
    }
    let out = run(c.ctr().args(["content", "ls", "-q"]));
    for d in String::from_utf8(out.stdout).unwrap().lines() {
        let _ = c.ctr().args(["content", "rm", d]).output();
    }
}

fn pull(c: &Containerd, image: &str, k: &Kagami) {
    let out = c.pull(image);
    assert!(
        out.status.success(),
        "ctr pull {image} failed:\n{}\n{}\nkagami log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        k.log_text()
    );
}

fn origin_blob_gets(r: &Registry) -> Vec<String> {
    r.access_log()
        .into_iter()
        .filter(|l| l.contains("\"GET ") && l.contains("/blobs/"))
        .collect()
}

#[test]
fn every_name_form_through_containerd_is_cached() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Registry::start(&dir.path().join("origin"));
    let o = origin.addr();
    let v6 = format!("[::1]:{}", origin.port);
    // The port registry and the IPv6 one are mirrored to the origin by an explicit entry;
    // Docker Hub's name forms all land on one docker.io entry; "*" catches
    // wild.example.test; rw.example.test rewrites app to team/app.
    let config = dir.path().join("registries.yaml");
    std::fs::write(
        &config,
        format!(
            "mirrors:\n  \"{o}\":\n    endpoint: [\"http://{o}\"]\n  \"{v6}\":\n    endpoint: [\"http://{o}\"]\n  docker.io:\n    endpoint: [\"http://{o}\"]\n  rw.example.test:\n    endpoint: [\"http://{o}\"]\n    rewrite:\n      \"^(.*)$\": \"rewritten/$1\"\n  \"*\":\n    endpoint: [\"http://{o}\"]\n"
        ),
    )
    .unwrap();
    let k = Kagami::start(
        dir.path(),
        &config,
        &["--disable-default-registry-endpoint", "--tag-ttl", "1h"],
    );
    let containerd = Containerd::start(&dir.path().join("containerd"));
    let port_image: &'static str = Box::leak(format!("{o}/team/app:1").into_boxed_str());
    let v6_image: &'static str = Box::leak(format!("{v6}/team/v6:1").into_boxed_str());
    let forms = [
        Form {
            image: port_image,
            hosts_dir: Box::leak(o.clone().into_boxed_str()),
            origin_repo: "team/app",
        },
        Form {
            image: v6_image,
            hosts_dir: Box::leak(v6.clone().into_boxed_str()),
            origin_repo: "team/v6",
        },
        Form {
            image: "docker.io/library/hub:1",
            hosts_dir: "docker.io",
            origin_repo: "library/hub",
        },
        Form {
            image: "docker.io/short:1",
            hosts_dir: "docker.io",
            origin_repo: "library/short",
        },
        Form {
            image: "index.docker.io/library/index:1",
            hosts_dir: "index.docker.io",
            origin_repo: "library/index",
        },
        Form {
            image: "registry-1.docker.io/library/reg1:1",
            hosts_dir: "registry-1.docker.io",
            origin_repo: "library/reg1",
        },
        Form {
            image: "wild.example.test/team/wild:1",
            hosts_dir: "wild.example.test",
            origin_repo: "team/wild",
        },
        Form {
            image: "rw.example.test/app:1",
            hosts_dir: "rw.example.test",
            origin_repo: "rewritten/app",
        },
    ];
    for f in &forms {
        write_hosts(&containerd, f.hosts_dir, &k.addr());
    }
    let mut port_digest = String::new();
    for (i, f) in forms.iter().enumerate() {
        // A fresh random image per form, so each is cold for kagami too.
        let image = build_image(&dir.path().join(format!("image-{i}")), "1", 2, 64 * 1024);
        image.push(&format!("{o}/{}:1", f.origin_repo));
        let before = origin_blob_gets(&origin).len();
        pull(&containerd, f.image, &k);
        let fetched = origin_blob_gets(&origin);
        assert!(
            fetched.len() - before >= 3,
            "{}: config and two layers fetched from the origin: {fetched:?}",
            f.image
        );
        assert!(
            fetched.iter().all(|l| !l.contains("containerd/")),
            "{}: containerd reached the origin itself: {fetched:?}",
            f.image
        );
        if i == 0 {
            let out = run(containerd.ctr().args(["images", "ls"]));
            port_digest = String::from_utf8(out.stdout)
                .unwrap()
                .lines()
                .find(|l| l.starts_with(f.image))
                .and_then(|l| l.split_whitespace().nth(2))
                .unwrap()
                .to_string();
        }
        remove_all(&containerd);
        let before = origin_blob_gets(&origin).len();
        pull(&containerd, f.image, &k);
        assert_eq!(
            origin_blob_gets(&origin).len(),
            before,
            "{}: the second pull reached the origin for blobs",
            f.image
        );
        remove_all(&containerd);
    }
    let metrics = k.metrics();
    assert!(
        !metrics.contains("kagami_refused_requests_total{"),
        "no request was refused:\n{metrics}"
    );

    // kagami doctor agrees: every registry of the hosts directory goes through kagami.
    let doctor = |hosts: &Path| {
        crate::support::kagami()
            .args(["doctor", "--format", "json", "--kagami", &k.addr()])
            .arg("--hosts-dir")
            .arg(hosts)
            .output()
            .unwrap()
    };
    let out = doctor(&containerd.hosts_dir);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("{e}: {}", String::from_utf8_lossy(&out.stderr));
    });
    assert_eq!(out.status.code(), Some(0), "{report:#}");
    assert_eq!(
        report["registries"].as_array().unwrap().len(),
        7,
        "{report:#}"
    );
    let port_row = report["registries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["registry"] == o.as_str())
        .unwrap();
    let encoded = format!("ns=127.0.0.1%3A{}", origin.port);
    assert!(
        port_row["probe"].as_str().unwrap().contains(&encoded),
        "encoded as containerd encodes it: {port_row:#}"
    );

    // The port form with the origin gone: by tag and by digest, from kagami's store.
    drop(origin);
    pull(&containerd, port_image, &k);
    remove_all(&containerd);
    let by_digest = format!("{}@{port_digest}", port_image.trim_end_matches(":1"));
    pull(&containerd, &by_digest, &k);

    // A registry kagami does not serve (this kagami mirrors docker.io only), and one whose
    // first host is not kagami: doctor says which and exits 1.
    let k2_dir = dir.path().join("k2");
    std::fs::create_dir_all(&k2_dir).unwrap();
    let config2 = k2_dir.join("registries.yaml");
    std::fs::write(
        &config2,
        format!("mirrors:\n  docker.io:\n    endpoint: [\"{DEAD}\"]\n"),
    )
    .unwrap();
    let k2 = Kagami::start(&k2_dir, &config2, &["--disable-default-registry-endpoint"]);
    let bad = dir.path().join("bad-certs.d");
    let d = bad.join("quay.io");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(
        d.join("hosts.toml"),
        format!("server = \"{DEAD}\"\n\n[host.\"http://{}\"]\n", k2.addr()),
    )
    .unwrap();
    let d = bad.join("ghcr.io");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("hosts.toml"), "server = \"https://ghcr.io\"\n").unwrap();
    let out = crate::support::kagami()
        .args(["doctor", "--format", "json", "--kagami", &k2.addr()])
        .arg("--hosts-dir")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let text = report.to_string();
    assert!(text.contains("refused: registry_not_served"), "{report:#}");
    assert!(
        text.contains("containerd's first host is https://ghcr.io/v2"),
        "{report:#}"
    );
}

/// `kagami doctor --k3s-config`: K3s writes containerd's hosts directory from its own
/// registries.yaml, so a mirror there whose first endpoint is not kagami bypasses it, and
/// one with no hosts.toml yet is reported too; a mirror listing kagami first whose
/// hosts.toml is in place is probed like any other.
#[test]
fn doctor_reads_k3s_registries_yaml() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("registries.yaml");
    std::fs::write(&config, "mirrors:\n  \"*\":\n").unwrap();
    let k = Kagami::start(
        dir.path(),
        &config,
        &["--disable-default-registry-endpoint"],
    );
    let hosts = dir.path().join("certs.d");
    std::fs::create_dir_all(hosts.join("good.example.test")).unwrap();
    std::fs::write(
        hosts.join("good.example.test/hosts.toml"),
        format!("server = \"{DEAD}\"\n\n[host.\"http://{}\"]\n", k.addr()),
    )
    .unwrap();
    let k3s = dir.path().join("k3s-registries.yaml");
    std::fs::write(
        &k3s,
        format!(
            "mirrors:\n  good.example.test:\n    endpoint: [\"http://{k}\"]\n  direct.example.test:\n    endpoint: [\"https://direct.example.test\"]\n  new.example.test:\n    endpoint: [\"http://{k}\"]\n",
            k = k.addr()
        ),
    )
    .unwrap();
    let out = crate::support::kagami()
        .args(["doctor", "--kagami", &k.addr()])
        .arg("--hosts-dir")
        .arg(&hosts)
        .arg("--k3s-config")
        .arg(&k3s)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("ok     good.example.test"), "{text}");
    assert!(text.contains("answer         200, accepted"), "{text}");
    assert!(
        text.contains("BYPASS direct.example.test")
            && text.contains("its first endpoint in")
            && text.contains("is https://direct.example.test"),
        "{text}"
    );
    assert!(
        text.contains("BYPASS new.example.test") && text.contains("no hosts.toml for it"),
        "{text}"
    );
    assert!(
        text.contains("1 of 3 registries go through kagami"),
        "{text}"
    );
}
