//! Helpers for kagami's integration tests: the kagami binary, test images built with umoci
//! and pushed with skopeo, real clients (dockerd, podman, CRI), P2P nodes. What other
//! crates' tests share too (free loopback ports, docker-registry and containerd started and
//! stopped by PID, bounded waits) comes from `kagami-testkit`, re-exported here. Nothing
//! here reaches beyond 127.0.0.0/8.

#![allow(dead_code)]

pub mod clients;
#[cfg(feature = "containerd")]
pub mod cri;
pub mod node;
pub mod pki;

pub use clients::{ContainersTools, Dockerd, HostsGuard};
pub use kagami_testkit::{
    Containerd, Daemon, Registry, RegistryOptions, eventually_sync, free_port, held_within,
    random_fill, require, run, run_bounded, wait_child, wait_for_port,
};
pub use node::{Node, containerd_digest, private};

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The text of `examples/<name>` (the seed configurations).
pub fn example(name: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../examples")
            .join(name),
    )
    .unwrap()
}

/// The kagami binary under test.
pub fn kagami() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kagami"))
}

/// A test image built with umoci: `layers` layers of `layer_size` random bytes each.
pub struct TestImage {
    /// The OCI layout directory.
    pub layout: PathBuf,
    pub tag: String,
}

pub fn build_image(dir: &Path, tag: &str, layers: usize, layer_size: usize) -> TestImage {
    require(&["umoci"]);
    let layout = dir.join("oci");
    if !layout.exists() {
        run(Command::new("umoci")
            .args(["init", "--layout"])
            .arg(&layout));
    }
    let img = format!("{}:{tag}", layout.display());
    run(Command::new("umoci").args(["new", "--image"]).arg(&img));
    for i in 0..layers {
        let file = dir.join(format!("{tag}-layer{i}.bin"));
        let mut data = vec![0u8; layer_size];
        random_fill(&mut data);
        std::fs::write(&file, &data).unwrap();
        run(Command::new("umoci")
            .args(["insert", "--image"])
            .arg(&img)
            .arg(&file)
            .arg(format!("/layer{i}.bin")));
    }
    run(Command::new("umoci")
        .args(["config", "--image"])
        .arg(&img)
        .args([
            "--architecture",
            "amd64",
            "--os",
            "linux",
            "--config.cmd",
            "/layer0.bin",
        ]));
    TestImage {
        layout,
        tag: tag.to_string(),
    }
}

impl TestImage {
    /// Pushes the image with skopeo to `docker://<dest>` (plain http / no TLS verify).
    pub fn push(&self, dest: &str) {
        require(&["skopeo"]);
        run(Command::new("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:{}", self.layout.display(), self.tag))
            .arg(format!("docker://{dest}")));
    }
}

/// `skopeo copy` of `docker://<src>` to `dest` (e.g. `oci:<dir>:<tag>`), retried (for at
/// most 20 s) while P2P routing tables fill; `context` (logs) goes into the timeout's message.
pub fn skopeo_copy_retried(src: &str, dest: &str, what: &str, context: impl Fn() -> String) {
    require(&["skopeo"]);
    eventually_sync(Duration::from_secs(20), what, || {
        let out = Command::new("skopeo")
            .args(["copy", "--quiet", "--src-tls-verify=false"])
            .arg(format!("docker://{src}"))
            .arg(dest)
            .output()
            .unwrap();
        if out.status.success() {
            return Ok(());
        }
        Err(format!(
            "{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            context()
        ))
    });
}

/// `skopeo inspect --raw`-free digest lookup: the manifest digest of `docker://ref`.
pub fn skopeo_digest(reference: &str) -> String {
    let out = run(Command::new("skopeo")
        .args(["inspect", "--tls-verify=false", "--format", "{{.Digest}}"])
        .arg(format!("docker://{reference}")));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A minimal HTTP/1.1 GET over loopback; returns (status, headers, body).
pub fn http_get(addr: &str, path: &str) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("http response has headers");
    let head = String::from_utf8_lossy(&buf[..split]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap();
    (status, head, buf[split + 4..].to_vec())
}

impl TestImage {
    /// Pushes the image with skopeo and extra arguments (e.g. `--dest-creds u:p`).
    pub fn push_args(&self, dest: &str, args: &[&str]) {
        require(&["skopeo"]);
        run(Command::new("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false"])
            .args(args)
            .arg(format!("oci:{}:{}", self.layout.display(), self.tag))
            .arg(format!("docker://{dest}")));
    }
}

/// A multi-platform image: one small image per `os/arch` built with umoci in one layout,
/// and an OCI index over them (written by hand) tagged `tag`. Push it with
/// `skopeo copy --all` ([`push_all`]).
pub fn build_index(dir: &Path, tag: &str, platforms: &[&str], layer_size: usize) -> TestImage {
    let mut entries = Vec::new();
    for p in platforms {
        let (os, arch) = p.split_once('/').unwrap();
        let sub = format!("{tag}-{os}-{arch}");
        let img = build_image(dir, &sub, 1, layer_size);
        run(Command::new("umoci")
            .args(["config", "--image"])
            .arg(format!("{}:{sub}", img.layout.display()))
            .args(["--architecture", arch, "--os", os]));
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(img.layout.join("index.json")).unwrap()).unwrap();
        let desc = index["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == sub.as_str())
            .unwrap()
            .clone();
        entries.push(serde_json::json!({
            "mediaType": desc["mediaType"],
            "digest": desc["digest"],
            "size": desc["size"],
            "platform": {"os": os, "architecture": arch},
        }));
    }
    let layout = dir.join("oci");
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": entries,
    });
    let bytes = serde_json::to_vec(&index).unwrap();
    let digest = sha256_hex(&bytes);
    std::fs::write(layout.join("blobs/sha256").join(&digest), &bytes).unwrap();
    let path = layout.join("index.json");
    let mut top: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    top["manifests"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": format!("sha256:{digest}"),
            "size": bytes.len(),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }));
    std::fs::write(&path, serde_json::to_vec(&top).unwrap()).unwrap();
    TestImage {
        layout,
        tag: tag.to_string(),
    }
}

/// `skopeo copy --all` of a layout image (index and every platform).
pub fn push_all(img: &TestImage, dest: &str) {
    img.push_args(dest, &["--all"]);
}

/// Hex sha256 of bytes.
pub fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(b))
}

/// `htpasswd -Bbn user password` into `path` (apache2-utils).
pub fn htpasswd(path: &Path, user: &str, password: &str) {
    require(&["htpasswd"]);
    let out = run(Command::new("htpasswd").args(["-Bbn", user, password]));
    std::fs::write(path, out.stdout).unwrap();
}
