//! Helpers for integration tests: free loopback ports, real daemons started and stopped
//! by PID (docker-registry, containerd), and test images built with umoci and pushed with
//! skopeo. Nothing here reaches beyond 127.0.0.0/8.

#![allow(dead_code)]

pub mod clients;
#[cfg(feature = "containerd")]
pub mod cri;
pub mod node;
pub mod pki;

pub use clients::{ContainersTools, Dockerd, HostsGuard};
pub use node::{Node, containerd_digest, private};

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

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

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs a command, panicking with its output when it fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// True when every named program is on PATH. Tests that need real daemons call
/// [`require`], which fails (never skips) when a tool is missing: the README's test
/// command installs them.
pub fn require(tools: &[&str]) {
    for t in tools {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(t).is_file()))
            .unwrap_or(false);
        assert!(
            found,
            "{t} is not installed; run the README's test command (scripts/test.sh), which installs it"
        );
    }
}

/// Waits (bounded) until something accepts connections on `addr`.
pub fn wait_for_port(addr: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect(addr).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("nothing listening on {addr} after {timeout:?}");
}

/// A child process killed (by PID) when dropped.
pub struct Daemon {
    pub child: Child,
    pub name: &'static str,
}

impl Daemon {
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A real docker-registry (CNCF distribution) on a loopback port.
pub struct Registry {
    pub daemon: Daemon,
    pub port: u16,
    pub dir: PathBuf,
    pub log: PathBuf,
}

#[derive(Default)]
pub struct RegistryOptions {
    /// htpasswd file for basic auth.
    pub htpasswd: Option<PathBuf>,
    /// TLS certificate and key.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// CA for client certificates (mTLS).
    pub client_ca: Option<PathBuf>,
    /// Pull-through mode upstream.
    pub proxy_remote: Option<String>,
}

impl Registry {
    pub fn start(dir: &Path) -> Registry {
        Self::start_with(dir, RegistryOptions::default())
    }

    pub fn start_with(dir: &Path, opts: RegistryOptions) -> Registry {
        require(&["docker-registry"]);
        let port = free_port();
        let storage = dir.join("storage");
        std::fs::create_dir_all(&storage).unwrap();
        let mut yaml = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            storage.display()
        );
        if let Some((cert, key)) = &opts.tls {
            yaml.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                cert.display(),
                key.display()
            ));
            if let Some(ca) = &opts.client_ca {
                yaml.push_str(&format!("    clientcas:\n      - {}\n", ca.display()));
            }
        }
        yaml.push_str("health:\n  storagedriver:\n    enabled: false\n");
        if let Some(h) = &opts.htpasswd {
            yaml.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: kagami-test\n    path: {}\n",
                h.display()
            ));
        }
        if let Some(remote) = &opts.proxy_remote {
            yaml.push_str(&format!("proxy:\n  remoteurl: {remote}\n"));
        }
        let config = dir.join("registry.yml");
        std::fs::write(&config, yaml).unwrap();
        let log = dir.join("registry.log");
        let logfile = std::fs::File::create(&log).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(logfile.try_clone().unwrap())
            .stderr(logfile)
            .spawn()
            .expect("start docker-registry");
        let reg = Registry {
            daemon: Daemon {
                child,
                name: "docker-registry",
            },
            port,
            dir: dir.to_path_buf(),
            log,
        };
        wait_for_port(&reg.addr(), Duration::from_secs(10));
        reg
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Access-log lines (the Apache-style ones, not logrus lines).
    pub fn access_log(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.contains("level=") && l.contains("HTTP/"))
            .map(str::to_string)
            .collect()
    }

    /// Number of access-log lines for GET requests whose path contains `needle`.
    pub fn count_gets(&self, needle: &str) -> usize {
        self.access_log()
            .iter()
            .filter(|l| l.contains("\"GET ") && l.contains(needle))
            .count()
    }
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

/// Fills a buffer with non-repeating pseudo-random bytes (xorshift, seeded from the clock),
/// fast enough for hundreds of megabytes.
pub fn random_fill(buf: &mut [u8]) {
    let mut x = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
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

/// A real containerd 1.6 with its root, state and socket under `dir`.
pub struct Containerd {
    pub daemon: Daemon,
    pub socket: PathBuf,
    pub dir: PathBuf,
    pub hosts_dir: PathBuf,
}

impl Containerd {
    pub fn start(dir: &Path) -> Containerd {
        require(&["containerd", "ctr"]);
        let hosts_dir = dir.join("certs.d");
        std::fs::create_dir_all(&hosts_dir).unwrap();
        let socket = dir.join("containerd.sock");
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.internal.v1.tracing", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "{socket}"
[ttrpc]
  address = "{socket}.ttrpc"
[debug]
  address = "{socket}.debug"
[metrics]
  address = ""
"#,
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            socket = socket.display(),
        );
        let cfg = dir.join("containerd.toml");
        std::fs::write(&cfg, config).unwrap();
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&cfg)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start containerd");
        let c = Containerd {
            daemon: Daemon {
                child,
                name: "containerd",
            },
            socket,
            dir: dir.to_path_buf(),
            hosts_dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !c.socket.exists() {
            assert!(
                Instant::now() < deadline,
                "containerd did not create its socket"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // The socket appears before the API answers; wait for `ctr version`.
        while !c
            .ctr()
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            assert!(Instant::now() < deadline, "containerd does not answer");
            std::thread::sleep(Duration::from_millis(50));
        }
        c
    }

    pub fn ctr(&self) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address").arg(&self.socket).stdin(Stdio::null());
        c
    }

    /// `ctr images pull --hosts-dir` of `image`; returns the command output.
    pub fn pull(&self, image: &str) -> Output {
        self.ctr()
            .args(["images", "pull", "--hosts-dir"])
            .arg(&self.hosts_dir)
            .arg(image)
            .output()
            .unwrap()
    }

    pub fn images(&self) -> String {
        let out = run(self.ctr().args(["images", "ls", "-q"]));
        String::from_utf8(out.stdout).unwrap()
    }
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
