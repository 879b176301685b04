//! `kagami demo`: one process, an in-process upstream and three nodes; its table must show
//! node 1 fed from upstream, the others from peers, each blob sent upstream once, and
//! nothing left listening or on disk afterwards. And the README's quickstart runs it.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::support::{self, kagami};

/// What a finished `kagami demo` printed.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// One demo at a time: they all use 127.0.0.2-4, and a port one demo closed must not be
/// taken by another before the check that it refuses connections.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `cmd` to completion within `limit`, killing it (by PID) past that.
fn run_bounded(cmd: &mut Command, limit: Duration) -> Run {
    let done = support::run_bounded(cmd, limit);
    let Some(status) = done.status else {
        panic!(
            "kagami demo did not finish within {limit:?}\nstdout:\n{}\nstderr:\n{}",
            done.stdout, done.stderr
        );
    };
    Run {
        code: status.code(),
        stdout: done.stdout,
        stderr: done.stderr,
    }
}

/// Every `127.x.y.z:port` (and `/ip4/127.x.y.z/tcp/port`) the output names.
fn addresses(text: &str) -> Vec<SocketAddr> {
    let mut found = Vec::new();
    let normalized = text.replace("/tcp/", ":").replace("/ip4/", " ");
    for word in normalized.split(|c: char| !(c.is_ascii_digit() || c == '.' || c == ':')) {
        if word.starts_with("127.")
            && let Ok(a) = word.trim_end_matches(':').parse::<SocketAddr>()
        {
            found.push(a);
        }
    }
    found.sort();
    found.dedup();
    found
}

/// Checks the demo's report: the table, the upstream counts, the clean exit.
fn check_demo_output(run: &Run, nodes: usize) {
    let ctx = format!("stdout:\n{}\nstderr:\n{}", run.stdout, run.stderr);
    assert_eq!(run.code, Some(0), "kagami demo failed\n{ctx}");

    // The table: a header starting with "node", then one row per node.
    let mut lines = run.stdout.lines();
    let header = lines
        .by_ref()
        .find(|l| l.starts_with("node ") && l.contains("manifest"))
        .unwrap_or_else(|| panic!("no table\n{ctx}"));
    let columns: Vec<&str> = header.split_whitespace().collect();
    // node, api, manifest, config, layer N..., bytes, time ("layer 1" is two words).
    let objects = 2 + columns.iter().filter(|c| **c == "layer").count();
    assert!(
        objects >= 4,
        "a manifest, a config and 2+ layers: {header}\n{ctx}"
    );
    let rows: Vec<Vec<&str>> = lines
        .take(nodes)
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), nodes, "{ctx}");
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row[0], (i + 1).to_string(), "row {i}: {row:?}\n{ctx}");
        let origins = &row[2..2 + objects];
        if i == 0 {
            assert!(
                origins.iter().all(|o| *o == "upstream"),
                "node 1 gets everything from upstream: {row:?}\n{ctx}"
            );
        } else {
            assert!(
                origins.iter().all(|o| o.starts_with("peer:")),
                "node {} gets everything from peers: {row:?}\n{ctx}",
                i + 1
            );
        }
    }

    // The upstream's own count: every object sent exactly once.
    let sent: Vec<&str> = run
        .stdout
        .lines()
        .filter(|l| l.contains(" sent ") && (l.ends_with(" time") || l.ends_with(" times")))
        .collect();
    assert_eq!(sent.len(), objects, "one count per object\n{ctx}");
    for l in &sent {
        assert!(
            l.ends_with("sent 1 time"),
            "sent more than once: {l}\n{ctx}"
        );
    }

    // Nothing left behind: every address it printed refuses connections, the temp dir
    // is gone.
    let addrs = addresses(&run.stdout);
    assert!(
        addrs.len() > 2 * nodes,
        "the registry and each node's API, peer API and P2P address: {addrs:?}\n{ctx}"
    );
    for a in &addrs {
        assert!(
            TcpStream::connect_timeout(a, Duration::from_millis(300)).is_err(),
            "{a} still accepts connections after the demo\n{ctx}"
        );
    }
    let removed = run
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("stopped: "))
        .and_then(|l| l.split_whitespace().nth_back(1))
        .unwrap_or_else(|| panic!("no stopped line\n{ctx}"));
    assert!(!Path::new(removed).exists(), "{removed} left behind\n{ctx}");
}

#[test]
fn demo_shares_through_peers_and_leaves_nothing_behind() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let run = run_bounded(kagami().arg("demo"), Duration::from_secs(120));
    check_demo_output(&run, 3);
}

#[test]
fn demo_with_two_nodes() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let run = run_bounded(
        kagami().args(["demo", "--nodes", "2"]),
        Duration::from_secs(120),
    );
    check_demo_output(&run, 2);
}

/// The README's Quickstart block, shell lines joined across `\` continuations, comments
/// dropped.
fn quickstart_commands(readme: &str) -> Vec<String> {
    let section = readme
        .split("\n## ")
        .find(|s| s.starts_with("Quickstart"))
        .expect("README.md has a Quickstart section");
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("\n```").next())
        .expect("the Quickstart section has a ```sh block");
    let mut commands = Vec::new();
    let mut current = String::new();
    for line in block.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part.trim_end());
                current.push(' ');
            }
            None => {
                current.push_str(line);
                commands.push(std::mem::take(&mut current));
            }
        }
    }
    commands
}

/// The README's first command after the build is the demo, and it works as written.
///
/// The line is `cargo run --release -p kagami -- demo`. Running it for real would build
/// kagami in release mode (3-5 minutes here, on top of the suite's debug build) from
/// inside `cargo test`, a nested cargo contending for the target directory's lock with
/// the suite. So this test pins the line exactly (changing it must change this test) and
/// runs what it runs, `kagami` with the arguments after `--`, through the binary under
/// test, built from the same sources.
#[test]
fn readme_quickstart_demo_runs_as_written() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md"))
            .unwrap();
    let demo = demo_command(&readme);
    let args: Vec<&str> = demo
        .split_once(" -- ")
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let run = run_bounded(kagami().args(&args), Duration::from_secs(120));
    check_demo_output(&run, 3);
}

/// The Quickstart's `cargo run ... -- demo` line, which must read exactly
/// `cargo run --release -p kagami -- demo`.
fn demo_command(readme: &str) -> String {
    let commands = quickstart_commands(readme);
    let demo = commands
        .iter()
        .find(|c| c.starts_with("cargo run") && c.contains("-- demo"))
        .unwrap_or_else(|| panic!("no `cargo run ... -- demo` in the Quickstart: {commands:?}"));
    assert_eq!(demo, "cargo run --release -p kagami -- demo");
    demo.clone()
}

#[test]
fn quickstart_parser_joins_continuations() {
    let readme = "# x\n\n## Quickstart\n\ntext\n\n```sh\n# build\ncargo run --release -p kagami -- demo\n\nkagami serve \\\n    --data-dir /tmp/k\n```\n\n## Next\n";
    assert_eq!(
        quickstart_commands(readme),
        [
            "cargo run --release -p kagami -- demo",
            "kagami serve --data-dir /tmp/k"
        ]
    );
    assert_eq!(
        demo_command(readme),
        "cargo run --release -p kagami -- demo"
    );
}
