//! Real container clients other than containerd: dockerd (Debian's `docker.io`) and the
//! containers/image family (podman, skopeo), each confined to a test directory, and an
//! `/etc/hosts` guard so that a client falling back to a registry's own name stays on
//! loopback.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::{Daemon, eventually_sync, require, run, wait_child};

/// Serialises this process's edits of /etc/hosts.
static HOSTS_LOCK: Mutex<()> = Mutex::new(());
static HOSTS_SEQ: AtomicUsize = AtomicUsize::new(0);

/// Maps registry names to 127.0.0.1 in `/etc/hosts` while it lives: a client that falls
/// back from the mirror to the registry itself then gets a refused connection on loopback
/// instead of a DNS lookup out of the machine. The line carries a marker unique to this
/// guard and is removed on drop, also when the test panics.
pub struct HostsGuard {
    marker: String,
}

const HOSTS: &str = "/etc/hosts";

impl HostsGuard {
    pub fn map(names: &[&str]) -> HostsGuard {
        let marker = format!(
            "# kagami-test {} {}",
            std::process::id(),
            HOSTS_SEQ.fetch_add(1, Ordering::SeqCst)
        );
        if names.is_empty() {
            return HostsGuard { marker };
        }
        let _lock = HOSTS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let mut text = std::fs::read_to_string(HOSTS).unwrap_or_default();
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        // Written in place (not renamed): /etc/hosts is often a bind mount.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(HOSTS)
            .unwrap_or_else(|e| panic!("cannot write {HOSTS} (tests run as root): {e}"));
        writeln!(f, "{text}127.0.0.1 {} {marker}", names.join(" ")).unwrap();
        HostsGuard { marker }
    }
}

impl Drop for HostsGuard {
    fn drop(&mut self) {
        let _lock = HOSTS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let Ok(text) = std::fs::read_to_string(HOSTS) else {
            return;
        };
        let kept: String = text
            .lines()
            .filter(|l| !l.ends_with(&self.marker))
            .map(|l| format!("{l}\n"))
            .collect();
        let _ = std::fs::write(HOSTS, kept);
    }
}

/// A real dockerd (Debian's `docker.io`) with its data root, exec root, pid file and socket
/// under `dir`, no networking of its own (`bridge: none`, no iptables) and the vfs storage
/// driver, pulling Docker Hub images through `registry-mirrors`.
pub struct Dockerd {
    daemon: Daemon,
    pub socket: PathBuf,
    pub dir: PathBuf,
}

impl Dockerd {
    pub fn start(dir: &Path, mirror: &str) -> Dockerd {
        require(&["dockerd", "docker"]);
        std::fs::create_dir_all(dir.join("docker-config")).unwrap();
        let socket = dir.join("docker.sock");
        let config = serde_json::json!({
            "registry-mirrors": [mirror],
            "data-root": dir.join("data"),
            "exec-root": dir.join("exec"),
            "pidfile": dir.join("docker.pid"),
            "hosts": [format!("unix://{}", socket.display())],
            "iptables": false,
            "ip6tables": false,
            "bridge": "none",
            "storage-driver": "vfs",
        });
        let file = dir.join("daemon.json");
        std::fs::write(&file, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
        let daemon = Daemon::spawn(
            "dockerd",
            Command::new("dockerd")
                .arg("--config-file")
                .arg(&file)
                .stdin(Stdio::null()),
            &dir.join("dockerd.log"),
        );
        let d = Dockerd {
            daemon,
            socket,
            dir: dir.to_path_buf(),
        };
        eventually_sync(
            Duration::from_secs(60),
            format!("dockerd to answer on {}", d.socket.display()),
            || {
                if d.docker()
                    .arg("version")
                    .output()
                    .is_ok_and(|o| o.status.success())
                {
                    return Ok(());
                }
                assert!(d.daemon_alive(), "dockerd exited:\n{}", d.log_text());
                Err(d.log_text())
            },
        );
        d
    }

    fn daemon_alive(&self) -> bool {
        // `try_wait` needs `&mut`; a signal 0 answers the same question.
        Command::new("kill")
            .args(["-0", &self.daemon.child.id().to_string()])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// The docker CLI talking to this daemon, with a config directory of its own.
    pub fn docker(&self) -> Command {
        let mut c = Command::new("docker");
        c.arg("-H")
            .arg(format!("unix://{}", self.socket.display()))
            .env("DOCKER_CONFIG", self.dir.join("docker-config"))
            .stdin(Stdio::null());
        c
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default()
    }
}

impl Drop for Dockerd {
    /// SIGTERM first, so that dockerd stops the containerd it started; SIGKILL after 20 s.
    fn drop(&mut self) {
        let pid = self.daemon.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        wait_child(&mut self.daemon.child, Duration::from_secs(20));
    }
}

/// podman, buildah and skopeo (containers/image) confined to `dir`: rootful, storage (vfs) and
/// podman's runtime files under `dir`, the main registries.conf given by the test and the
/// drop-in directory `dir/home/.config/containers/registries.conf.d` (containers/image
/// reads `$HOME`'s drop-in directory as well as the system one; podman 4.3 has no variable
/// that replaces the system one).
pub struct ContainersTools {
    pub dir: PathBuf,
}

impl ContainersTools {
    pub fn new(dir: &Path, main_registries_conf: &str) -> ContainersTools {
        require(&["podman", "skopeo", "buildah"]);
        let home = dir.join("home");
        std::fs::create_dir_all(home.join(".config/containers/registries.conf.d")).unwrap();
        for d in ["run", "graph", "tmp"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        std::fs::write(dir.join("registries.conf"), main_registries_conf).unwrap();
        std::fs::write(
            dir.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"vfs\"\nrunroot = \"{}\"\ngraphroot = \"{}\"\n",
                dir.join("run").display(),
                dir.join("graph").display()
            ),
        )
        .unwrap();
        std::fs::write(
            dir.join("containers.conf"),
            format!(
                "[engine]\ntmp_dir = \"{}\"\nevents_logger = \"file\"\nevents_logfile_path = \"{}\"\n",
                dir.join("tmp").display(),
                dir.join("events.log").display()
            ),
        )
        .unwrap();
        ContainersTools {
            dir: dir.to_path_buf(),
        }
    }

    /// Where a drop-in goes.
    pub fn dropin_dir(&self) -> PathBuf {
        self.dir.join("home/.config/containers/registries.conf.d")
    }

    /// `program` (podman, skopeo, buildah) with this directory's configuration.
    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("HOME", self.dir.join("home"))
            .env_remove("XDG_CONFIG_HOME")
            .env(
                "CONTAINERS_REGISTRIES_CONF",
                self.dir.join("registries.conf"),
            )
            .env("CONTAINERS_STORAGE_CONF", self.dir.join("storage.conf"))
            .env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .stdin(Stdio::null());
        c
    }

    /// `podman pull IMAGE`, panicking with its output when it fails.
    pub fn pull(&self, image: &str) -> Output {
        run(self.cmd("podman").args(["pull", image]))
    }

    pub fn rmi(&self, image: &str) {
        run(self.cmd("podman").args(["rmi", image]));
    }
}
