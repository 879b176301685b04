//! containerd 1.6 with its CRI plugin on (the kubelet's path), and a CRI client.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub use kagami_cri_test::{Cri, basic_auth};

use super::{Containerd, eventually_sync, run};

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
    pub containerd: Containerd,
    pub log: PathBuf,
}

impl CriContainerd {
    pub fn start(dir: &Path, registry: RegistryConfig) -> CriContainerd {
        let (config_path, legacy) = match registry {
            RegistryConfig::ConfigPath(p) => (p.display().to_string(), ""),
            RegistryConfig::Legacy(t) => (String::new(), t),
        };
        // The CNI directories are empty (no pod networking): the image service does not
        // need them. The streaming server stays on loopback.
        let cri = format!(
            r#"[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
[plugins."io.containerd.grpc.v1.cri".cni]
  bin_dir = "{cni}/bin"
  conf_dir = "{cni}/conf"
[plugins."io.containerd.grpc.v1.cri".registry]
  config_path = "{config_path}"
{legacy}
"#,
            cni = dir.join("cni").display(),
        );
        let c = CriContainerd {
            containerd: Containerd::start_with(dir, Some(&cri)),
            log: dir.join("containerd.log"),
        };
        eventually_sync(
            Duration::from_secs(30),
            "containerd's CRI image service to answer",
            || {
                if let Ok(mut cri) = Cri::connect(&c.containerd.socket)
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
        Cri::connect(&self.containerd.socket).expect("connect to the CRI socket")
    }

    pub fn ctr(&self) -> Command {
        let mut c = self.containerd.ctr();
        c.args(["-n", "k8s.io"]);
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
