//! The files under deploy/ and the operator docs: every file parses, and what they claim
//! about kagami (flags, environment variables, endpoints, metric names) is true of the
//! binary and the code as they are. Also `kagami completions` and `kagami man`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::support::kagami;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(rel: &str) -> String {
    let p = repo().join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

fn yaml(rel: &str) -> Value {
    serde_saphyr::from_str::<Value>(&read(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Runs `kagami ARGS --help` and returns its text, with the environment cleared of
/// KAGAMI_* so that clap shows no current values.
fn help(args: &[&str]) -> String {
    let mut cmd = kagami();
    cmd.args(args).arg("--help");
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("KAGAMI_") {
            cmd.env_remove(k);
        }
    }
    let out = cmd.output().expect("running kagami --help");
    assert!(out.status.success(), "kagami {args:?} --help failed");
    String::from_utf8(out.stdout).unwrap()
}

/// The long flags `kagami CMD --help` lists (without the leading dashes).
fn flags(cmd: &str) -> BTreeSet<String> {
    help(&[cmd])
        .lines()
        .filter_map(|l| {
            let l = l.trim_start();
            let l = l
                .strip_prefix('-')
                .filter(|r| !r.starts_with('-'))
                .map_or(l, |r| r.get(3..).unwrap_or(""));
            let name = l.strip_prefix("--")?;
            let end = name
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
                .unwrap_or(name.len());
            Some(name[..end].to_string())
        })
        .filter(|f| !f.is_empty())
        .collect()
}

/// The environment variables `kagami CMD --help` names (`[env: KAGAMI_X=]`).
fn env_vars(cmd: &str) -> BTreeSet<String> {
    let text = help(&[cmd])
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    text.match_indices("[env: ")
        .map(|(i, m)| {
            let rest = &text[i + m.len()..];
            rest[..rest.find('=').expect("env: NAME=")].to_string()
        })
        .collect()
}

/// The subcommands `kagami --help` lists.
fn subcommands() -> Vec<String> {
    let text = help(&[]);
    let section = text
        .split("Commands:")
        .nth(1)
        .expect("a Commands: section")
        .split("Options:")
        .next()
        .unwrap()
        .to_string();
    section
        .lines()
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|c| c != "help")
        .collect()
}

/// Asserts that every `--flag` in `args` is one `kagami serve` accepts.
fn assert_serve_flags(what: &str, args: &[String]) {
    let known = flags("serve");
    for a in args.iter().filter(|a| a.starts_with("--")) {
        let name = a[2..].split('=').next().unwrap();
        assert!(
            known.contains(name),
            "{what} passes --{name}, which `kagami serve --help` does not list ({known:?})"
        );
    }
}

#[test]
fn help_parsing_finds_the_serve_flags() {
    // Guards the helpers above: if they found nothing, the checks below would pass vacuously.
    let f = flags("serve");
    for name in [
        "config",
        "listen",
        "data-dir",
        "containerd-hosts-dir",
        "log-format",
    ] {
        assert!(f.contains(name), "{name} missing from {f:?}");
    }
    assert!(env_vars("serve").contains("KAGAMI_TAG_TTL"));
    assert!(subcommands().contains(&"serve".to_string()));
    assert!(subcommands().contains(&"explain".to_string()));
}

#[test]
fn kubernetes_files_parse_and_kustomization_lists_them() {
    let dir = repo().join("deploy/kubernetes");
    let mut files: BTreeSet<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    assert!(files.remove("kustomization.yaml"));
    for f in &files {
        let v = yaml(&format!("deploy/kubernetes/{f}"));
        assert!(v["apiVersion"].is_string(), "{f}: no apiVersion");
        assert!(v["kind"].is_string(), "{f}: no kind");
        assert!(v["metadata"]["name"].is_string(), "{f}: no metadata.name");
    }
    let k = yaml("deploy/kubernetes/kustomization.yaml");
    assert_eq!(k["kind"], "Kustomization");
    let listed: BTreeSet<String> = k["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .map(|r| r.as_str().unwrap().to_string())
        .collect();
    assert_eq!(listed, files, "kustomization.yaml resources vs files");
    for want in [
        "daemonset.yaml",
        "configmap.yaml",
        "service.yaml",
        "secret.yaml",
    ] {
        assert!(files.contains(want), "{want} missing");
    }
}

#[test]
fn daemonset_runs_serve_on_the_host_network_with_real_flags() {
    let ds = yaml("deploy/kubernetes/daemonset.yaml");
    assert_eq!(ds["kind"], "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    let c = &pod["containers"][0];
    let args: Vec<String> = c["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    assert_eq!(args[0], "serve");
    assert_serve_flags("daemonset.yaml", &args);
    let arg = |name: &str| {
        args.iter()
            .find_map(|a| a.strip_prefix(&format!("--{name}=")))
            .unwrap_or_else(|| panic!("daemonset.yaml has no --{name}=VALUE"))
            .to_string()
    };

    // Probes reach the address kagami listens on.
    let listen = arg("listen");
    let (host, port) = listen.rsplit_once(':').unwrap();
    for (probe, path) in [
        ("readinessProbe", "/readyz"),
        ("livenessProbe", "/healthz"),
        ("startupProbe", "/healthz"),
    ] {
        let g = &c[probe]["httpGet"];
        assert_eq!(g["path"], path, "{probe}");
        assert_eq!(g["port"].as_u64().unwrap().to_string(), port, "{probe}");
        assert_eq!(g["host"], host, "{probe}: kagami listens on {listen}");
    }

    // The data dir and containerd's certs.d are hostPath volumes mounted where the flags say.
    let host_path_mount = |dir: &str| -> String {
        let m = c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["mountPath"] == dir)
            .unwrap_or_else(|| panic!("nothing mounted at {dir}"));
        assert_ne!(m["readOnly"], true, "{dir} must be writable");
        let v = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == m["name"])
            .unwrap();
        v["hostPath"]["path"]
            .as_str()
            .unwrap_or_else(|| panic!("{dir} is not a hostPath"))
            .to_string()
    };
    assert_eq!(host_path_mount(&arg("data-dir")), "/var/lib/kagami");
    assert_eq!(
        host_path_mount(&arg("containerd-hosts-dir")),
        "/etc/containerd/certs.d"
    );

    // The config file comes from the ConfigMap of configmap.yaml, mounted as a directory
    // (a subPath mount would never see updates).
    let config = PathBuf::from(arg("config"));
    let mount = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| Path::new(m["mountPath"].as_str().unwrap()) == config.parent().unwrap())
        .expect("the config file's directory is mounted");
    assert!(mount.get("subPath").is_none());
    let vol = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    let cm = yaml("deploy/kubernetes/configmap.yaml");
    assert_eq!(vol["configMap"]["name"], cm["metadata"]["name"]);
    let key = config.file_name().unwrap().to_str().unwrap();
    assert!(cm["data"][key].is_string(), "configmap.yaml has no {key}");

    // docs/k3s.md removes these by index in its kustomize patch.
    assert!(args[6].starts_with("--containerd-hosts-dir="));
    assert_eq!(c["volumeMounts"][2]["name"], "certs-d");
    assert_eq!(pod["volumes"][2]["name"], "certs-d");

    assert_eq!(c["resources"]["limits"]["memory"], "256Mi");
    let sc = &c["securityContext"];
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["capabilities"]["drop"][0], "ALL");
    // No environment variable the binary does not know (P2P ones stay commented out),
    // besides glibc's MALLOC_ARENA_MAX, which must be 2 (docs/operations.md, "Memory").
    let known = env_vars("serve");
    let mut arenas = None;
    for e in c["env"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().unwrap();
        if name == "MALLOC_ARENA_MAX" {
            arenas = e["value"].as_str().map(str::to_string);
            continue;
        }
        assert!(known.contains(name), "daemonset.yaml sets unknown {name}");
    }
    assert_eq!(
        arenas.as_deref(),
        Some("2"),
        "MALLOC_ARENA_MAX in daemonset.yaml"
    );
}

#[test]
fn configmap_registries_yaml_passes_kagami_check() {
    let cm = yaml("deploy/kubernetes/configmap.yaml");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("registries.yaml");
    std::fs::write(&file, cm["data"]["registries.yaml"].as_str().unwrap()).unwrap();
    assert_check_passes(&file, "configmap.yaml's registries.yaml");
}

/// The commented `policy.yaml` key of configmap.yaml, uncommented, is a ConfigMap whose
/// policy file `kagami check` accepts beside the registries.yaml (read from the same
/// directory, with no flag, as `kagami serve` reads it).
#[test]
fn configmap_commented_policy_passes_kagami_check() {
    let text = read("deploy/kubernetes/configmap.yaml");
    let start = text
        .find("  # policy.yaml: |")
        .expect("configmap.yaml has a commented policy.yaml");
    let uncommented: String = text[start..]
        .lines()
        .take_while(|l| l.starts_with("  #"))
        .map(|l| format!("  {}\n", l.strip_prefix("  # ").unwrap_or("")))
        .collect();
    let cm: Value = serde_saphyr::from_str(&format!("{}{uncommented}", &text[..start]))
        .expect("configmap.yaml with policy.yaml uncommented parses");
    let policy = cm["data"]["policy.yaml"]
        .as_str()
        .expect("a policy.yaml key");
    assert!(policy.contains("warm:"), "{policy}");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("registries.yaml");
    std::fs::write(&config, cm["data"]["registries.yaml"].as_str().unwrap()).unwrap();
    std::fs::write(dir.path().join("policy.yaml"), policy).unwrap();
    let out = kagami()
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("policy.yaml: ok"), "{stderr}");
}

/// `kagami check --config FILE` succeeds; `what` names the file in the failure.
fn assert_check_passes(file: &std::path::Path, what: &str) {
    let out = kagami()
        .args(["check", "--config"])
        .arg(file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kagami check on {what}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The registries.yaml examples in docs/k3s.md are files `kagami check` accepts.
#[test]
fn k3s_doc_examples_pass_kagami_check() {
    let doc = read("docs/k3s.md");
    let blocks: Vec<&str> = doc
        .split("```yaml\n")
        .skip(1)
        .map(|b| b.split("```").next().unwrap())
        .filter(|b| b.trim_start().starts_with("mirrors:"))
        .collect();
    assert!(
        !blocks.is_empty(),
        "no registries.yaml example in docs/k3s.md"
    );
    let dir = tempfile::tempdir().unwrap();
    for (i, b) in blocks.iter().enumerate() {
        let file = dir.path().join(format!("example{i}.yaml"));
        let text: String = b
            .lines()
            .map(|l| format!("{}\n", l.strip_prefix("   ").unwrap_or(l)))
            .collect();
        std::fs::write(&file, text).unwrap();
        assert_check_passes(&file, &format!("docs/k3s.md example {i}:\n{b}"));
    }
}

#[test]
fn peer_service_and_psk_secret() {
    let svc = yaml("deploy/kubernetes/service.yaml");
    assert_eq!(svc["spec"]["clusterIP"], "None", "headless");
    let port = &svc["spec"]["ports"][0];
    assert_eq!(port["name"], "p2p");
    assert_eq!(port["port"], 5001);
    let ds = yaml("deploy/kubernetes/daemonset.yaml");
    assert_eq!(
        svc["spec"]["selector"],
        ds["spec"]["template"]["metadata"]["labels"]
    );
    let secret = yaml("deploy/kubernetes/secret.yaml");
    assert_eq!(secret["kind"], "Secret");
    let psk = secret["stringData"]["psk"]
        .as_str()
        .expect("stringData.psk");
    // The placeholder must never work as a key: kagami refuses it (not 64 hex digits).
    assert!(
        !(psk.len() == 64 && psk.chars().all(|c| c.is_ascii_hexdigit())),
        "secret.yaml holds a usable key; keep a placeholder"
    );
}

/// The P2P settings the files carry commented out are ones `kagami serve` reads, so that
/// switching P2P on is a matter of uncommenting them.
#[test]
fn commented_p2p_settings_are_real() {
    let known = env_vars("serve");
    let mut found = 0;
    for rel in [
        "deploy/systemd/kagami.env",
        "deploy/kubernetes/daemonset.yaml",
    ] {
        let text = read(rel);
        for (i, _) in text.match_indices("KAGAMI_P2P_") {
            let name: String = text[i..]
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            assert!(
                known.contains(&name),
                "{rel} mentions {name}, which `kagami serve` does not read"
            );
            found += 1;
        }
    }
    assert!(
        found >= 6,
        "expected the P2P settings in kagami.env and daemonset.yaml"
    );

    // The commented env block of the DaemonSet, uncommented, is valid YAML whose
    // variables all exist.
    let ds = read("deploy/kubernetes/daemonset.yaml");
    let block: String = ds
        .lines()
        .skip_while(|l| l.trim() != "# env (continued):")
        .skip(1)
        .take_while(|l| l.trim_start().starts_with('#'))
        .map(|l| format!("{}\n", l.trim_start().trim_start_matches("# ")))
        .collect();
    let block = format!("env:\n{block}");
    let env: Value = serde_saphyr::from_str(&block).unwrap_or_else(|e| panic!("{block}: {e}"));
    let names: Vec<&str> = env["env"]
        .as_array()
        .expect("env list")
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"KAGAMI_P2P_LISTEN"), "{names:?}");
    for n in names.iter().filter(|n| n.starts_with("KAGAMI_")) {
        // A build without the containerd feature does not read these
        // (commented_containerd_settings_are_real checks them with it).
        if !cfg!(feature = "containerd") && CONTAINERD_VARS.contains(n) {
            continue;
        }
        assert!(known.contains(*n), "{n}");
    }
}

/// The variables of `--containerd-content` and its settings (feature `containerd`).
const CONTAINERD_VARS: [&str; 3] = [
    "KAGAMI_CONTAINERD_CONTENT",
    "KAGAMI_CONTAINERD_ADDRESS",
    "KAGAMI_CONTAINERD_NAMESPACE",
];

/// The containerd content settings the files carry commented out are ones `kagami serve`
/// (built with the feature) reads, and the DaemonSet's commented socket mount holds the
/// socket its address names.
#[cfg(feature = "containerd")]
#[test]
fn commented_containerd_settings_are_real() {
    let known = env_vars("serve");
    for v in CONTAINERD_VARS {
        assert!(known.contains(v), "`kagami serve` does not read {v}");
        for rel in [
            "deploy/systemd/kagami.env",
            "deploy/kubernetes/daemonset.yaml",
        ] {
            assert!(read(rel).contains(v), "{rel} does not mention {v}");
        }
    }
    let env = read("deploy/systemd/kagami.env");
    assert!(env.contains("#KAGAMI_CONTAINERD_ADDRESS=/run/containerd/containerd.sock"));
    let ds = read("deploy/kubernetes/daemonset.yaml");
    let after = |needle: &str| -> String {
        let i = ds.find(needle).unwrap_or_else(|| panic!("no {needle}"));
        ds[i + needle.len()..]
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    let address = {
        let i = ds.find("name: KAGAMI_CONTAINERD_ADDRESS").unwrap();
        let rest = &ds[i..];
        let j = rest.find("value: ").unwrap();
        rest[j + "value: ".len()..]
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    let mount = after(
        "# - name: containerd-sock     # the socket file only, nothing else of /run/containerd\n            #   mountPath: ",
    );
    assert_eq!(
        Path::new(&address),
        Path::new(&mount),
        "the commented mount is not the socket kagami is told to use"
    );
    assert!(ds.contains(&format!("#     path: {mount}")));
}

/// Every metric the dashboard queries, and every label it groups by, are documented in
/// docs/operations.md (and `kagami-server/tests/telemetry.rs` checks that every documented
/// metric is exposed and moves).
#[test]
fn grafana_dashboard_queries_existing_metrics() {
    let dash: Value =
        serde_json::from_str(&read("deploy/grafana/kagami-dashboard.json")).expect("valid JSON");
    let (names, labels) = documented_metrics(&read("docs/operations.md"));
    assert!(names.contains("kagami_http_requests_total"), "{names:?}");
    assert!(names.contains("kagami_store_size_bytes"), "{names:?}");

    let mut exprs = Vec::new();
    collect_exprs(&dash, &mut exprs);
    assert!(exprs.len() >= 10, "found only {} queries", exprs.len());
    let mut used = BTreeSet::new();
    for e in &exprs {
        for (i, _) in e.match_indices("kagami_") {
            let name: String = e[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            assert!(
                names.contains(&name),
                "dashboard queries {name}, which docs/operations.md does not list ({names:?})"
            );
            used.insert(name);
        }
        for group in e.split("by (").skip(1) {
            for l in group.split(')').next().unwrap().split(',') {
                let l = l.trim();
                assert!(
                    labels.contains(l) || l == "instance" || l == "job",
                    "dashboard groups by {l:?}, which no kagami metric has ({labels:?})"
                );
            }
        }
    }
    for want in [
        "kagami_http_requests_total",
        "kagami_served_bytes_total",
        "kagami_cache_requests_total",
        "kagami_upstream_failures_total",
        "kagami_inflight_fetches",
        "kagami_store_size_bytes",
        "kagami_store_evictions_total",
        "kagami_stale_tags_served_total",
        "kagami_peer_lookups_total",
        "kagami_peer_received_bytes_total",
    ] {
        assert!(used.contains(want), "the dashboard does not show {want}");
    }
}

fn collect_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr" | "definition", Value::String(s)) => out.push(s.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

/// The names Prometheus sees, from docs/operations.md's metrics table (a histogram adds
/// `_bucket`, `_sum` and `_count`), and every label named in its labels column.
fn documented_metrics(doc: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut names = BTreeSet::new();
    let mut labels = BTreeSet::new();
    for row in doc.lines().filter(|l| l.starts_with("| `kagami_")) {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let (name, ty) = (cells[1].trim_matches('`'), cells[2]);
        if ty == "histogram" {
            for series in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{name}{series}"));
            }
        }
        names.insert(name.to_string());
        labels.extend(
            cells[3]
                .split(',')
                .map(|l| l.trim().trim_matches('`'))
                .filter(|l| !l.is_empty())
                .map(str::to_string),
        );
    }
    (names, labels)
}

/// systemd's own checker, where it is installed (it is not in CI). The unit names
/// /usr/local/bin/kagami, which systemd-analyze requires to exist: the check runs on a copy
/// pointing at the binary under test.
#[test]
fn systemd_unit_verifies() {
    let Some(tool) = which("systemd-analyze") else {
        eprintln!("systemd-analyze is not installed: skipping the systemd unit check");
        return;
    };
    let unit = read("deploy/systemd/kagami.service");
    let bin = env!("CARGO_BIN_EXE_kagami");
    assert!(unit.contains("/usr/local/bin/kagami "));
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("kagami.service");
    std::fs::write(&copy, unit.replace("/usr/local/bin/kagami", bin)).unwrap();
    let out = Command::new(tool)
        .args(["verify", "--man=no"])
        .arg(&copy)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // systemd-analyze exits 0 on many problems (unknown keys, bad values) and only
    // prints them: any line about our unit is a failure.
    let complaints: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("kagami.service"))
        .collect();
    assert!(
        out.status.success() && complaints.is_empty(),
        "systemd-analyze verify kagami.service:\n{stderr}"
    );
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// The unit's command line, its reload and its environment file use only what kagami has.
#[test]
fn systemd_unit_and_env_file_use_real_flags() {
    let unit = read("deploy/systemd/kagami.service");
    let key = |k: &str| -> Vec<String> {
        unit.lines()
            .filter_map(|l| l.strip_prefix(&format!("{k}=")))
            .map(str::to_string)
            .collect()
    };
    let exec = key("ExecStart");
    assert_eq!(exec.len(), 1);
    let words: Vec<String> = exec[0].split_whitespace().map(str::to_string).collect();
    assert_eq!(words[0], "/usr/local/bin/kagami");
    assert_eq!(words[1], "serve");
    assert_serve_flags("kagami.service", &words[2..]);
    assert_eq!(key("EnvironmentFile"), ["-/etc/default/kagami"]);
    assert_eq!(key("Environment"), ["MALLOC_ARENA_MAX=2"]);
    assert!(key("ExecReload")[0].contains("-HUP $MAINPID"));
    assert_eq!(key("Restart"), ["on-failure"]);
    assert_eq!(key("ProtectSystem"), ["strict"]);
    assert_eq!(key("CapabilityBoundingSet"), [""]);
    assert_eq!(key("NoNewPrivileges"), ["yes"]);
    assert_eq!(key("StateDirectory"), ["kagami"]);

    // Every variable the example sets is one `kagami serve` reads, and the data dir is the
    // one the unit makes writable.
    let known = env_vars("serve");
    let env = read("deploy/systemd/kagami.env");
    let mut set = BTreeSet::new();
    for line in env.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = line.split_once('=').expect("KEY=VALUE");
        assert!(
            known.contains(k),
            "kagami.env sets {k}, which `kagami serve` does not read ({known:?})"
        );
        assert!(!v.starts_with('"'), "{k}: systemd takes values literally");
        set.insert((k.to_string(), v.to_string()));
    }
    assert!(set.contains(&("KAGAMI_DATA_DIR".into(), "/var/lib/kagami".into())));
    let hosts = set
        .iter()
        .find(|(k, _)| k == "KAGAMI_CONTAINERD_HOSTS_DIR")
        .expect("KAGAMI_CONTAINERD_HOSTS_DIR");
    assert!(
        key("ReadWritePaths")
            .iter()
            .any(|p| p.trim_start_matches('-') == hosts.1),
        "the unit must make {} writable",
        hosts.1
    );
}

/// docs/operations.md has a row for every flag of every command.
#[test]
fn operations_doc_lists_every_flag() {
    let doc = read("docs/operations.md");
    for cmd in subcommands() {
        for f in flags(&cmd) {
            if f == "help" || f == "version" {
                continue;
            }
            assert!(
                doc.contains(&format!("`--{f}`")),
                "docs/operations.md does not document `kagami {cmd} --{f}`"
            );
        }
        for e in env_vars(&cmd) {
            assert!(
                doc.contains(&format!("`{e}`")),
                "docs/operations.md does not document {e} (kagami {cmd})"
            );
        }
    }
}

#[test]
fn completions_mention_the_commands() {
    for shell in ["bash", "zsh", "fish"] {
        let out = kagami().args(["completions", shell]).output().unwrap();
        assert!(out.status.success(), "completions {shell}");
        let text = String::from_utf8(out.stdout).unwrap();
        for word in ["serve", "explain", "containerd-hosts-dir"] {
            assert!(text.contains(word), "{shell} completions lack {word}");
        }
    }
    let out = kagami().args(["completions", "tcsh"]).output().unwrap();
    assert!(!out.status.success(), "an unknown shell is refused");
}

#[test]
fn man_page_mentions_the_commands() {
    let out = kagami().arg("man").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.starts_with(".ie") || text.contains(".TH kagami"),
        "roff"
    );
    for word in ["serve", "explain"] {
        assert!(text.contains(word), "man page lacks {word}");
    }

    let dir = tempfile::tempdir().unwrap();
    let out = kagami()
        .args(["man", "--output"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    for page in ["kagami.1", "kagami-serve.1", "kagami-explain.1"] {
        assert!(dir.path().join(page).is_file(), "{page} not written");
    }
    let serve = std::fs::read_to_string(dir.path().join("kagami-serve.1")).unwrap();
    assert!(serve.contains("containerd\\-hosts\\-dir"), "{serve}");
}
