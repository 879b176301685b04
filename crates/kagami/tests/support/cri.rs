//! containerd 1.6 with its CRI plugin on (the kubelet's path), and a CRI client.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

pub use kagami_cri_test::{Cri, basic_auth};

use super::{Daemon, eventually_sync, require, run};

/// How the CRI plugin finds registry hosts.
pub enum RegistryConfig<'a> {
    /// `config_path` = this directory (containerd 1.5 and later).
    ConfigPath(&'a Path),
    /// `config_path` left empty, and this TOML text (the legacy
    /// `registry.mirrors`/`registry.configs` tables) appended to config.toml.
    Legacy(&'a str),
}

/// A real containerd 1.6 whose CRI image service is on, with root, state and socket under
/// `dir`. CRI images live in the `k8s.io` namespace.
pub struct CriContainerd {
    pub daemon: Daemon,
    pub socket: PathBuf,
    pub dir: PathBuf,
    pub log: PathBuf,
}

impl CriContainerd {
    pub fn start(dir: &Path, registry: RegistryConfig) -> CriContainerd {
        require(&["containerd", "ctr"]);
        std::fs::create_dir_all(dir).unwrap();
        let socket = dir.join("containerd.sock");
        let (config_path, legacy) = match registry {
            RegistryConfig::ConfigPath(p) => (p.display().to_string(), ""),
            RegistryConfig::Legacy(t) => (String::new(), t),
        };
        // The CNI directories are empty (no pod networking): the image service does not
        // need them. The streaming server stays on loopback.
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.internal.v1.tracing", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "{socket}"
[ttrpc]
  address = "{socket}.ttrpc"
[debug]
  address = "{socket}.debug"
  level = "debug"
[metrics]
  address = ""
[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
[plugins."io.containerd.grpc.v1.cri".cni]
  bin_dir = "{cni}/bin"
  conf_dir = "{cni}/conf"
[plugins."io.containerd.grpc.v1.cri".registry]
  config_path = "{config_path}"
{legacy}
"#,
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            socket = socket.display(),
            cni = dir.join("cni").display(),
        );
        let cfg = dir.join("containerd.toml");
        std::fs::write(&cfg, config).unwrap();
        let log = dir.join("containerd.log");
        let logfile = std::fs::File::create(&log).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&cfg)
            .stdout(logfile.try_clone().unwrap())
            .stderr(logfile)
            .spawn()
            .expect("start containerd");
        let c = CriContainerd {
            daemon: Daemon {
                child,
                name: "containerd",
            },
            socket,
            dir: dir.to_path_buf(),
            log,
        };
        eventually_sync(
            Duration::from_secs(30),
            "containerd's CRI image service to answer",
            || {
                if c.socket.exists()
                    && let Ok(mut cri) = Cri::connect(&c.socket)
                    && cri.ready()
                {
                    return Ok(());
                }
                Err(c.log_text())
            },
        );
        c
    }

    pub fn cri(&self) -> Cri {
        Cri::connect(&self.socket).expect("connect to the CRI socket")
    }

    pub fn ctr(&self) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address")
            .arg(&self.socket)
            .args(["-n", "k8s.io"])
            .stdin(Stdio::null());
        c
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Removes every image (CRI `RemoveImage`) and then every blob of the content store,
    /// so that the next pull is cold for containerd.
    pub fn remove_all(&self) {
        let mut cri = self.cri();
        for image in cri.list().unwrap() {
            cri.remove(&image.id).unwrap();
        }
        let out = run(self.ctr().args(["content", "ls", "-q"]));
        for d in String::from_utf8(out.stdout).unwrap().lines() {
            let _ = self.ctr().args(["content", "rm", d]).output();
        }
        let left = run(self.ctr().args(["content", "ls", "-q"]));
        assert!(
            left.stdout.is_empty(),
            "content left after removal: {}",
            String::from_utf8_lossy(&left.stdout)
        );
    }
}
