//! The real daemons the tests run: docker-registry (CNCF distribution) and containerd 1.6,
//! each on a temporary directory, on loopback or a socket of its own, killed by PID on drop.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::{Daemon, eventually_sync, require, run, wait_for_port};

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

impl RegistryOptions {
    /// The registry's configuration file: storage under `dir`, listening on `port`.
    pub fn config(&self, dir: &Path, port: u16) -> String {
        let storage = dir.join("storage");
        let mut yaml = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            storage.display()
        );
        if let Some((cert, key)) = &self.tls {
            yaml.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                cert.display(),
                key.display()
            ));
            if let Some(ca) = &self.client_ca {
                yaml.push_str(&format!("    clientcas:\n      - {}\n", ca.display()));
            }
        }
        yaml.push_str("health:\n  storagedriver:\n    enabled: false\n");
        if let Some(h) = &self.htpasswd {
            yaml.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: kagami-test\n    path: {}\n",
                h.display()
            ));
        }
        if let Some(remote) = &self.proxy_remote {
            yaml.push_str(&format!("proxy:\n  remoteurl: {remote}\n"));
        }
        yaml
    }
}

impl Registry {
    pub fn start(dir: &Path) -> Registry {
        Self::start_with(dir, RegistryOptions::default())
    }

    pub fn start_with(dir: &Path, opts: RegistryOptions) -> Registry {
        require(&["docker-registry"]);
        std::fs::create_dir_all(dir.join("storage")).unwrap();
        crate::start_on_free_ports(
            Duration::from_secs(10),
            || {
                let port = crate::free_port();
                let config = dir.join("registry.yml");
                std::fs::write(&config, opts.config(dir, port)).unwrap();
                let log = dir.join("registry.log");
                let daemon = Daemon::spawn(
                    "docker-registry",
                    Command::new("docker-registry").arg("serve").arg(&config),
                    &log,
                );
                let reg = Registry {
                    daemon,
                    port,
                    dir: dir.to_path_buf(),
                    log: log.clone(),
                };
                (reg, format!("127.0.0.1:{port}"), log)
            },
            |reg| &mut reg.daemon.child,
        )
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

    /// Stops the registry (by PID) if it runs, and starts it again on the same port with
    /// the same storage (its log starts afresh).
    pub fn restart(&mut self) {
        self.daemon.stop();
        self.daemon = Daemon::spawn(
            "docker-registry",
            Command::new("docker-registry")
                .arg("serve")
                .arg(self.dir.join("registry.yml")),
            &self.log,
        );
        wait_for_port(&self.addr(), Duration::from_secs(10));
    }

    /// Number of access-log lines for GET requests whose path contains `needle`, once the
    /// log has stopped growing: docker-registry writes a request's line after its response
    /// ends, which can be just after the client read the last byte. Two reads 100 ms apart
    /// must agree (2 s at most).
    pub fn count_gets(&self, needle: &str) -> usize {
        let mut log = self.access_log();
        for _ in 0..20 {
            std::thread::sleep(Duration::from_millis(100));
            let now = self.access_log();
            let settled = now.len() == log.len();
            log = now;
            if settled {
                break;
            }
        }
        log.iter()
            .filter(|l| l.contains("\"GET ") && l.contains(needle))
            .count()
    }
}

/// A real containerd 1.6 with its root, state and socket under `dir` (its CRI plugin off
/// unless started with [`Containerd::start_with`]), and a hosts directory (`certs.d`) for
/// `ctr images pull --hosts-dir`.
pub struct Containerd {
    pub daemon: Daemon,
    pub socket: PathBuf,
    pub dir: PathBuf,
    pub hosts_dir: PathBuf,
}

impl Containerd {
    pub fn start(dir: &Path) -> Containerd {
        Self::start_with(dir, None)
    }

    /// With `cri`, the CRI plugin is on, configured by these TOML tables (appended to the
    /// configuration), and the log is at debug level; its log is `containerd.log` in `dir`.
    pub fn start_with(dir: &Path, cri: Option<&str>) -> Containerd {
        require(&["containerd", "ctr"]);
        let hosts_dir = dir.join("certs.d");
        std::fs::create_dir_all(&hosts_dir).unwrap();
        let socket = dir.join("containerd.sock");
        let (cri_off, level, cri) = match cri {
            None => ("\"io.containerd.grpc.v1.cri\", ", "", ""),
            Some(tables) => ("", "  level = \"debug\"\n", tables),
        };
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = [{cri_off}"io.containerd.internal.v1.tracing", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "{socket}"
[ttrpc]
  address = "{socket}.ttrpc"
[debug]
  address = "{socket}.debug"
{level}[metrics]
  address = ""
{cri}"#,
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            socket = socket.display(),
        );
        let cfg = dir.join("containerd.toml");
        std::fs::write(&cfg, config).unwrap();
        let daemon = Daemon::spawn(
            "containerd",
            Command::new("containerd").arg("--config").arg(&cfg),
            &dir.join("containerd.log"),
        );
        let c = Containerd {
            daemon,
            socket,
            dir: dir.to_path_buf(),
            hosts_dir,
        };
        // The socket appears before the API answers; wait for `ctr version`.
        eventually_sync(
            Duration::from_secs(20),
            "containerd to answer `ctr version` on its socket",
            || c.socket.exists() && c.ctr_ok(&["version"]),
        );
        c
    }

    /// `ctr --address <socket>`, stdin closed; add the arguments.
    pub fn ctr(&self) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address").arg(&self.socket).stdin(Stdio::null());
        c
    }

    /// True when `ctr <args>` succeeds.
    pub fn ctr_ok(&self, args: &[&str]) -> bool {
        self.ctr()
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// `ctr <args>`, panicking with its output when it fails.
    pub fn ctr_run(&self, args: &[&str]) -> Output {
        run(self.ctr().args(args))
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

    /// `ctr images ls -q`.
    pub fn images(&self) -> String {
        let out = self.ctr_run(&["images", "ls", "-q"]);
        String::from_utf8(out.stdout).unwrap()
    }
}
