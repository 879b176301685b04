//! What kagami's integration tests share (a dev-dependency only, never published): free
//! loopback ports, real daemons started and stopped by PID (docker-registry, containerd),
//! bounded waits ([`eventually`]) and test bytes. Nothing here reaches beyond 127.0.0.0/8.

mod daemons;
mod wait;

pub use daemons::{Containerd, Registry, RegistryOptions};
pub use wait::{Outcome, always, eventually, eventually_sync, held_within, wait_child};

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::Duration;

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

/// Asserts that every named program is on PATH. Tests that need real daemons call it; it
/// fails (never skips) when a tool is missing: the README's test command installs them.
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
    eventually_sync(timeout, format!("something listening on {addr}"), || {
        TcpStream::connect(addr).is_ok()
    });
}

/// Waits (bounded) until `child`, which logs to `log`, accepts connections on `addr`. When
/// it exits first, or never listens, the panic says how it ended and shows the end of its
/// log (a daemon that could not start says why there).
pub fn wait_for_child_port(child: &mut Child, addr: &str, log: &Path, timeout: Duration) {
    if let Err(exited) = child_listening(child, addr, timeout) {
        not_listening(addr, exited, log, timeout);
    }
}

fn not_listening(addr: &str, exited: Option<ExitStatus>, log: &Path, timeout: Duration) -> ! {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(30).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    panic!(
        "nothing listening on {addr} ({}); the end of {}:\n{}",
        match exited {
            Some(status) => format!("the process exited: {status}"),
            None => format!("still running after {timeout:?}"),
        },
        log.display(),
        tail.join("\n")
    );
}

/// How many times [`start_on_free_ports`] starts a daemon that exits before it listens.
const PORT_ATTEMPTS: usize = 3;

/// Starts a daemon on ports picked free and waits (bounded) until it listens:
/// `start()` picks its ports ([`free_port`]), starts it and returns it with the address to
/// wait for and its log's path; `child` reaches its process. A free port can be taken by
/// another test between the pick and the daemon's bind: a daemon that exits before it
/// listens is started again on other ports (3 times at most). One that never listens
/// fails with the end of its log.
pub fn start_on_free_ports<T>(
    timeout: Duration,
    mut start: impl FnMut() -> (T, String, std::path::PathBuf),
    child: impl Fn(&mut T) -> &mut Child,
) -> T {
    for attempt in 1..=PORT_ATTEMPTS {
        let (mut started, addr, log) = start();
        match child_listening(child(&mut started), &addr, timeout) {
            Ok(()) => return started,
            Err(Some(status)) if attempt < PORT_ATTEMPTS => {
                eprintln!(
                    "exited before listening on {addr} ({status}; log {}): starting it on other ports",
                    log.display()
                );
            }
            Err(exited) => not_listening(&addr, exited, &log, timeout),
        }
    }
    unreachable!("the last attempt returns or panics")
}

/// Waits (bounded) until `child` accepts connections on `addr`: `Err` with its exit status
/// when it exits first, `Err(None)` when it is still not listening after `timeout`.
pub fn child_listening(
    child: &mut Child,
    addr: &str,
    timeout: Duration,
) -> Result<(), Option<ExitStatus>> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait().ok().flatten() {
            return Err(Some(status));
        }
        if std::time::Instant::now() >= deadline {
            return Err(None);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What [`run_bounded`] saw: the exit status (`None` when the command was killed for
/// running past its limit) and everything it wrote.
pub struct Bounded {
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` to completion within `limit`, killing it (by PID) past that. Its output is read
/// on threads, so that a chatty command never blocks on a full pipe; what a pipe still held
/// open 5 s after the exit or the kill (by a grandchild) is left out.
pub fn run_bounded(cmd: &mut Command, limit: Duration) -> Bounded {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let read = |mut pipe: Box<dyn Read + Send>| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = pipe.read_to_string(&mut s);
            let _ = tx.send(s);
        });
        rx
    };
    let out = read(Box::new(child.stdout.take().unwrap()));
    let err = read(Box::new(child.stderr.take().unwrap()));
    let status = wait_child(&mut child, limit);
    let collect = |rx: std::sync::mpsc::Receiver<String>| {
        rx.recv_timeout(Duration::from_secs(5))
            .unwrap_or_else(|_| "(the pipe stayed open)".to_string())
    };
    Bounded {
        status,
        stdout: collect(out),
        stderr: collect(err),
    }
}

/// A child process killed (by PID) when dropped.
pub struct Daemon {
    pub child: Child,
    pub name: &'static str,
}

impl Daemon {
    /// Starts `cmd` as the daemon `name`, its stdout and stderr in the file `log` (created
    /// afresh).
    pub fn spawn(name: &'static str, cmd: &mut Command, log: &Path) -> Daemon {
        let file = std::fs::File::create(log)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
        let child = cmd
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Daemon { child, name }
    }

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

/// `n` deterministic pseudo-random bytes (xorshift, one byte a step) from `seed`.
pub fn random(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
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

/// Writes an OCI archive (what `ctr images export` writes) at `path`: `oci-layout`, the
/// given `index.json`, and each blob under `blobs/sha256/<hex>`, given as (hex, bytes).
pub fn write_oci_archive<'a>(
    path: &std::path::Path,
    index: &[u8],
    blobs: impl IntoIterator<Item = (&'a str, &'a [u8])>,
) {
    let mut tar = tar::Builder::new(std::fs::File::create(path).unwrap());
    let mut add = |name: &str, bytes: &[u8]| {
        let mut h = tar::Header::new_ustar();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, name, bytes).unwrap();
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
    add("index.json", index);
    for (hex, bytes) in blobs {
        add(&format!("blobs/sha256/{hex}"), bytes);
    }
    tar.finish().unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_bounded_returns_the_output_or_kills_past_the_limit() {
        let done = run_bounded(
            Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]),
            Duration::from_secs(10),
        );
        assert_eq!(done.status.and_then(|s| s.code()), Some(3));
        assert_eq!(
            (done.stdout.as_str(), done.stderr.as_str()),
            ("out\n", "err\n")
        );
        let killed = run_bounded(
            Command::new("sh").args(["-c", "echo started; exec sleep 30"]),
            Duration::from_millis(300),
        );
        assert!(killed.status.is_none());
        assert_eq!(killed.stdout, "started\n");
    }

    /// A daemon that exits before it listens (its port taken meanwhile) is started again
    /// on another port; the first one that listens is returned.
    #[test]
    fn a_daemon_that_cannot_bind_is_started_again_on_another_port() {
        require(&["busybox"]);
        let dir = std::env::temp_dir().join(format!("testkit-ports-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut ports = Vec::new();
        let mut listening = start_on_free_ports(
            Duration::from_secs(10),
            || {
                let port = free_port();
                ports.push(port);
                let log = dir.join(format!("{port}.log"));
                // The first start fails as a daemon whose port was taken does.
                let script = if ports.len() == 1 {
                    "echo address already in use >&2; exit 1".to_owned()
                } else {
                    format!(
                        "exec busybox httpd -f -p 127.0.0.1:{port} -h {}",
                        dir.display()
                    )
                };
                let d = Daemon::spawn("listener", Command::new("sh").args(["-c", &script]), &log);
                (d, format!("127.0.0.1:{port}"), log)
            },
            |d| &mut d.child,
        );
        assert_eq!(ports.len(), 2, "started twice: {ports:?}");
        assert!(
            listening.child.try_wait().unwrap().is_none(),
            "the second one runs"
        );
        assert!(TcpStream::connect(("127.0.0.1", ports[1])).is_ok());
        listening.stop();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_daemon_that_exits_before_listening_is_reported_with_its_log() {
        let log = std::env::temp_dir().join(format!("testkit-{}.log", std::process::id()));
        let mut child = Command::new("sh")
            .args(["-c", "echo cannot bind the port >&2; exit 3"])
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let panic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            wait_for_child_port(&mut child, &addr, &log, Duration::from_secs(10))
        }))
        .unwrap_err();
        let _ = std::fs::remove_file(&log);
        let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(message.contains("exited"), "{message}");
        assert!(message.contains("cannot bind the port"), "{message}");
    }
}
