//! `kagami sync` from one real docker-registry into another that requires htpasswd
//! auth: every platform copied, digests unchanged, blobs mounted across repositories,
//! and a second run that copies nothing.

use std::process::Command;

use crate::pull::{ok, write_config};
use crate::support::{self, Registry, RegistryOptions, build_image, kagami, skopeo_digest};

fn target_digest(reference: &str) -> String {
    let out = support::run(
        Command::new("skopeo")
            .args(["inspect", "--tls-verify=false", "--creds", "alice:s3cret"])
            .args(["--format", "{{.Digest}}"])
            .arg(format!("docker://{reference}")),
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn writes(reg: &Registry) -> usize {
    reg.access_log()
        .iter()
        .filter(|l| l.contains("\"PUT ") || l.contains("\"POST ") || l.contains("\"PATCH "))
        .count()
}

#[test]
fn sync_copies_every_platform_and_a_second_run_copies_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let src = Registry::start(&tmp.path().join("src"));
    let htpasswd = tmp.path().join("htpasswd");
    support::htpasswd(&htpasswd, "alice", "s3cret");
    let dst = Registry::start_with(
        &tmp.path().join("dst"),
        RegistryOptions {
            htpasswd: Some(htpasswd),
            ..Default::default()
        },
    );
    let app = build_image(&tmp.path().join("app"), "1", 2, 128 * 1024);
    app.push(&format!("{}/library/app:1", src.addr()));
    // The same image under a second name: its blobs are mounted, not uploaded again.
    app.push(&format!("{}/other/app:1", src.addr()));
    let multi = support::build_index(
        &tmp.path().join("multi"),
        "2",
        &["linux/amd64", "linux/arm64"],
        64 * 1024,
    );
    support::push_all(&multi, &format!("{}/library/multi:2", src.addr()));

    let list = tmp.path().join("images.txt");
    let s = src.addr();
    std::fs::write(
        &list,
        format!("# images to mirror\n{s}/library/app:1\n\n{s}/other/app:1   # same layers\n{s}/library/multi:2\n"),
    )
    .unwrap();
    let cfg = write_config(
        tmp.path(),
        &format!(
            "configs:\n  \"{}\":\n    auth:\n      username: alice\n      password: s3cret\n",
            dst.addr()
        ),
    );
    let sync = || {
        kagami()
            .env_remove("KAGAMI_CONFIG")
            .args(["sync", "--config"])
            .arg(&cfg)
            .arg("--images")
            .arg(&list)
            .arg("--to")
            .arg(format!("{}/mirror", dst.addr()))
            .output()
            .unwrap()
    };
    let first = ok(&sync());
    assert!(
        first.contains("3 images: 3 copied, 0 up to date, 0 failed"),
        "{first}"
    );
    for (repo, tag) in [
        ("library/app", "1"),
        ("other/app", "1"),
        ("library/multi", "2"),
    ] {
        let want = skopeo_digest(&format!("{}/{repo}:{tag}", src.addr()));
        let got = target_digest(&format!("{}/mirror/{repo}:{tag}", dst.addr()));
        assert_eq!(got, want, "{repo}:{tag}\n{first}");
    }
    // Every platform of the index is there.
    let arm = support::run(
        Command::new("skopeo")
            .args(["inspect", "--tls-verify=false", "--creds", "alice:s3cret"])
            .args(["--override-arch", "arm64", "--format", "{{.Architecture}}"])
            .arg(format!("docker://{}/mirror/library/multi:2", dst.addr())),
    );
    assert_eq!(String::from_utf8(arm.stdout).unwrap().trim(), "arm64");
    let other = first
        .lines()
        .find(|l| l.contains("/other/app:1") && l.contains("copied"))
        .unwrap_or_else(|| panic!("{first}"));
    let cols: Vec<&str> = other.split_whitespace().collect();
    // IMAGE TARGET STATUS COPIED MOUNTED PRESENT BYTES(2 words)
    assert_eq!(
        cols[3], "0",
        "nothing uploaded for the second name: {other}"
    );
    assert_eq!(cols[4], "3", "config and two layers mounted: {other}");

    let before = writes(&dst);
    let second = ok(&sync());
    assert!(
        second.contains("3 images: 0 copied, 3 up to date, 0 failed; 0 blobs copied"),
        "{second}"
    );
    assert_eq!(writes(&dst), before, "the second run wrote nothing");
}
