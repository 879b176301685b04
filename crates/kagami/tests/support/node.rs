//! `kagami serve` nodes with P2P on a loopback address, reaching no registry.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use super::{Containerd, Daemon, eventually_sync, free_port, http_get, kagami, run};

/// The pre-shared key every test node uses.
pub const PSK: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\n";

/// A `kagami serve` with P2P on `ip`, reaching no registry (`mirrors: {ksd.test.com: }` and
/// no default endpoint).
pub struct Node {
    pub daemon: Daemon,
    pub api: String,
    pub p2p: String,
    pub log: PathBuf,
    pub dir: PathBuf,
}

impl Node {
    pub fn start(dir: &Path, ip: &str, bootstrap: Option<&str>) -> Node {
        Self::start_with(dir, ip, bootstrap, &[])
    }

    /// As [`Node::start`], with more `kagami serve` arguments.
    pub fn start_with(dir: &Path, ip: &str, bootstrap: Option<&str>, extra: &[&str]) -> Node {
        std::fs::create_dir_all(dir).unwrap();
        let config = dir.join("registries.yaml");
        std::fs::write(&config, "mirrors:\n  ksd.test.com:\n").unwrap();
        let psk = dir.join("psk");
        std::fs::write(&psk, PSK).unwrap();
        private(&psk);
        Self::start_configured(dir, ip, &config, &psk, bootstrap, extra)
    }

    /// A node with its own `registries.yaml` and pre-shared key file.
    pub fn start_configured(
        dir: &Path,
        ip: &str,
        config: &Path,
        psk: &Path,
        bootstrap: Option<&str>,
        extra: &[&str],
    ) -> Node {
        std::fs::create_dir_all(dir).unwrap();
        let log = dir.join("kagami.log");
        // Ports are picked free on 127.0.0.1 and given up before the node binds them on
        // `ip`, where another test's process may hold one (started again on other ports).
        kagami_testkit::start_on_free_ports(
            Duration::from_secs(20),
            || {
                let (api, p2p, http) = (free_port(), free_port(), free_port());
                let mut cmd = kagami();
                cmd.arg("serve")
                    .args(["--listen", &format!("{ip}:{api}")])
                    .args(["--p2p-listen", &format!("{ip}:{p2p}")])
                    .args(["--p2p-http-listen", &format!("{ip}:{http}")])
                    .arg("--p2p-psk-file")
                    .arg(psk)
                    .arg("--disable-default-registry-endpoint")
                    .args(["--log-format", "json"])
                    .arg("--data-dir")
                    .arg(dir.join("data"))
                    .arg("--config")
                    .arg(config)
                    .args(extra);
                if let Some(b) = bootstrap {
                    cmd.args(["--p2p-bootstrap", b]);
                }
                let child = cmd
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(&log).unwrap())
                    .spawn()
                    .expect("start kagami serve");
                let api = format!("{ip}:{api}");
                let node = Node {
                    daemon: Daemon {
                        child,
                        name: "kagami",
                    },
                    api: api.clone(),
                    p2p: format!("{ip}:{p2p}"),
                    log: log.clone(),
                    dir: dir.to_path_buf(),
                };
                (node, api, log.clone())
            },
            |n| &mut n.daemon.child,
        )
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `/p2p/status` as JSON.
    pub fn p2p_status(&self) -> serde_json::Value {
        serde_json::from_slice(&http_get(&self.api, "/p2p/status").2).unwrap()
    }

    /// Waits (at most 20 s) until this node knows another member.
    pub fn wait_for_members(&self) {
        eventually_sync(
            Duration::from_secs(20),
            format!("{} to see another node", self.api),
            || {
                let status = self.p2p_status();
                if status["members"].as_array().is_some_and(|m| !m.is_empty()) {
                    return Ok(());
                }
                Err(format!("{status}\n{}", self.log_text()))
            },
        );
    }

    /// Where this node's store keeps blob `digest` (`sha256:<hex>`).
    pub fn store_blob(&self, digest: &str) -> PathBuf {
        let (alg, hex) = digest.split_once(':').unwrap();
        self.dir.join("data/store/blobs").join(alg).join(hex)
    }
}

/// Makes a key file readable by its owner only (kagami refuses a pre-shared key others can
/// read).
pub fn private(path: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// The digest containerd records for `name` (`ctr images ls`) in namespace `ns`.
pub fn containerd_digest(c: &Containerd, ns: &str, name: &str) -> String {
    let out = run(c.ctr().args(["-n", ns, "images", "ls"]));
    let text = String::from_utf8(out.stdout).unwrap();
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().find(|w| w.starts_with("sha256:")))
        .unwrap_or_else(|| panic!("{name} not in ctr -n {ns} images ls:\n{text}"))
        .to_string()
}
