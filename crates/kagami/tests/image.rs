//! kagami's container image (scripts/build-image.sh), for real: built twice from the binary
//! under test with the same manifest digest, imported into a real containerd 1.6, run with
//! `ctr run` the way deploy/kubernetes/daemonset.yaml runs it (its arguments, environment,
//! mounts, host network, read-only root), and used by containerd to pull an image from a
//! loopback docker-registry; and two containers of the image on 127.0.0.2 and 127.0.0.3 with
//! P2P switched on as the DaemonSet's comment says, the second serving an image from the
//! first with the origin stopped.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::support::{
    Containerd, Registry, build_image, eventually_sync, free_port, held_within, http_get, require,
    run,
};

/// What building and running the image needs.
const TOOLS: &[&str] = &[
    "containerd",
    "ctr",
    "docker-registry",
    "tar",
    "gzip",
    "strip",
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn yaml(rel: &str) -> Value {
    let p = repo().join(rel);
    let text =
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
    serde_saphyr::from_str::<Value>(&text).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Runs scripts/build-image.sh on the binary under test; returns the digest it printed.
fn build(out: &Path) -> String {
    let output = run(Command::new(repo().join("scripts/build-image.sh"))
        .arg(out)
        .env("KAGAMI_BIN", env!("CARGO_BIN_EXE_kagami"))
        .env("SOURCE_DATE_EPOCH", "1700000000")
        .env("IMAGE_NAME", "localhost/kagami:test"));
    let stdout = String::from_utf8(output.stdout).unwrap();
    let digest = stdout.lines().last().unwrap_or("").to_string();
    assert!(
        digest.starts_with("sha256:") && digest.len() == 71,
        "build-image.sh printed no digest: {stdout}"
    );
    digest
}

/// The container started by `ctr run -d`; stopped (task kill, then removed) on drop.
struct Container<'a> {
    containerd: &'a Containerd,
    id: String,
    log: PathBuf,
}

impl Container<'_> {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn running(&self) -> bool {
        let out = self
            .containerd
            .ctr()
            .args(["tasks", "ls"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.starts_with(&self.id) && l.contains("RUNNING"))
    }
}

impl Drop for Container<'_> {
    fn drop(&mut self) {
        let ctr = |args: &[&str]| {
            let _ = self.containerd.ctr().args(args).output();
        };
        ctr(&["tasks", "kill", "-s", "SIGTERM", &self.id]);
        held_within(Duration::from_secs(15), || !self.running());
        ctr(&["tasks", "kill", "-s", "SIGKILL", &self.id]);
        ctr(&["tasks", "rm", "-f", &self.id]);
        ctr(&["containers", "rm", &self.id]);
    }
}

/// The DaemonSet's kagami container and pod spec.
fn daemonset() -> (Value, Value) {
    let ds = yaml("deploy/kubernetes/daemonset.yaml");
    let pod = ds["spec"]["template"]["spec"].clone();
    let c = pod["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "kagami")
        .expect("a container named kagami")
        .clone();
    (pod, c)
}

/// Builds the image from the binary under test into `d/kagami.tar` and imports it into
/// `containerd`; returns the image config's Entrypoint.
fn build_and_import(d: &Path, containerd: &Containerd, twice: bool) -> Vec<String> {
    let archive = d.join("kagami.tar");
    let digest = build(&archive);
    if twice {
        // Reproducible: two builds, same manifest digest and the same bytes.
        let again = d.join("kagami-again.tar");
        assert_eq!(build(&again), digest, "two builds gave different digests");
        assert!(
            std::fs::read(&archive).unwrap() == std::fs::read(&again).unwrap(),
            "two builds gave different archives"
        );
    }
    // What the image says it runs: the kubelet runs Entrypoint + the container's args.
    let layout = d.join("layout");
    std::fs::create_dir_all(&layout).unwrap();
    run(Command::new("tar")
        .arg("-xf")
        .arg(&archive)
        .arg("-C")
        .arg(&layout));
    let index = json(&layout.join("index.json"));
    assert_eq!(index["manifests"][0]["digest"], digest.as_str());
    let blob = |digest: &str| layout.join("blobs/sha256").join(&digest["sha256:".len()..]);
    let manifest = json(&blob(&digest));
    let config = json(&blob(manifest["config"]["digest"].as_str().unwrap()));
    assert_eq!(
        config["config"]["Entrypoint"],
        serde_json::json!(["/kagami"])
    );
    assert_eq!(config["config"]["Cmd"], serde_json::json!(["serve"]));

    run(containerd.ctr().args(["images", "import"]).arg(&archive));
    let images = containerd.images();
    assert!(
        images.lines().any(|l| l == "localhost/kagami:test"),
        "import did not create localhost/kagami:test: {images}"
    );
    config["config"]["Entrypoint"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

/// One node's kagami in the image, run by `ctr run` as the DaemonSet runs it.
struct NodeSpec<'a> {
    /// Names the container and its volume directories.
    name: &'a str,
    /// Replaces the DaemonSet's --listen.
    listen: String,
    /// Mounted where the DaemonSet mounts containerd's certs.d.
    hosts_dir: PathBuf,
    /// The registry name added to the ConfigMap's registries.yaml (and whose hosts.toml
    /// kagami must write)...
    registry_name: String,
    /// ...with the origin registry's address as its endpoint.
    registry: String,
    /// Environment on top of the DaemonSet's (e.g. the P2P variables its comment names).
    env: Vec<(String, String)>,
    /// Extra read-only mounts (host directory, container path).
    mounts: Vec<(PathBuf, String)>,
}

fn start<'c>(
    d: &Path,
    containerd: &'c Containerd,
    entrypoint: &[String],
    spec: NodeSpec<'_>,
) -> Container<'c> {
    let (pod, c) = daemonset();
    assert_eq!(
        pod["hostNetwork"], true,
        "the DaemonSet runs on the host network"
    );
    let mut argv: Vec<String> = entrypoint.to_vec();
    let mut listen_seen = false;
    for a in c["args"].as_array().expect("args") {
        let a = a.as_str().unwrap();
        if a.starts_with("--listen=") {
            listen_seen = true;
            argv.push(format!("--listen={}", spec.listen));
        } else {
            argv.push(a.to_string());
        }
    }
    assert!(listen_seen, "the DaemonSet passes no --listen");
    let mut run_args: Vec<String> = vec!["run".into(), "-d".into(), "--net-host".into()];
    let mut env: Vec<(String, String)> = c["env"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
        .iter()
        .map(|e| {
            let value = e["value"].as_str().unwrap_or_else(|| {
                panic!(
                    "env {}: only plain values can be run outside Kubernetes",
                    e["name"]
                )
            });
            (e["name"].as_str().unwrap().to_string(), value.to_string())
        })
        .collect();
    env.extend(spec.env);
    for (k, v) in env {
        run_args.push("--env".into());
        run_args.push(format!("{k}={v}"));
    }
    let sc = &c["securityContext"];
    if sc["readOnlyRootFilesystem"] == true {
        run_args.push("--read-only".into());
    }
    if sc["seccompProfile"]["type"] == "RuntimeDefault" {
        run_args.push("--seccomp".into());
    }
    assert_ne!(sc["privileged"], true);

    // Every volume mount, from a directory of the test: the ConfigMap's files (with the
    // test's registry added to its registries.yaml), the node's hosts dir for certs-d, an
    // empty directory for the others.
    let vols = d.join("volumes").join(spec.name);
    let mut hosts_dir_mounted = false;
    let mut mounts: Vec<(PathBuf, String, &str)> = Vec::new();
    for m in c["volumeMounts"].as_array().expect("volumeMounts") {
        let name = m["name"].as_str().unwrap();
        let target = m["mountPath"].as_str().unwrap();
        let vol = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no volume {name}"));
        let src = if let Some(cm) = vol["configMap"]["name"].as_str() {
            let cm_file = yaml("deploy/kubernetes/configmap.yaml");
            assert_eq!(cm_file["metadata"]["name"], cm);
            let src = vols.join(name);
            std::fs::create_dir_all(&src).unwrap();
            for (key, text) in cm_file["data"].as_object().unwrap() {
                let mut text = text.as_str().unwrap().to_string();
                if key == "registries.yaml" {
                    let mut cfg: Value = serde_saphyr::from_str(&text).unwrap();
                    let addr = spec.registry.clone();
                    cfg["mirrors"][&spec.registry_name] =
                        serde_json::json!({"endpoint": [format!("http://{addr}")]});
                    text = serde_json::to_string_pretty(&cfg).unwrap();
                }
                std::fs::write(src.join(key), text).unwrap();
            }
            src
        } else if target == "/etc/containerd/certs.d" {
            hosts_dir_mounted = true;
            spec.hosts_dir.clone()
        } else {
            assert!(
                vol["hostPath"].is_object(),
                "volume {name}: unexpected kind"
            );
            let src = vols.join(name);
            std::fs::create_dir_all(&src).unwrap();
            src
        };
        let mode = if m["readOnly"] == true { "ro" } else { "rw" };
        mounts.push((src, target.to_string(), mode));
    }
    assert!(
        hosts_dir_mounted,
        "the DaemonSet mounts no containerd hosts dir"
    );
    for (src, target) in spec.mounts {
        mounts.push((src, target, "ro"));
    }
    for (src, target, mode) in mounts {
        run_args.push("--mount".into());
        run_args.push(format!(
            "type=bind,src={},dst={target},options=rbind:{mode}",
            src.display()
        ));
    }

    let id = format!("kagami-image-test-{}-{}", std::process::id(), spec.name);
    let log = d.join(format!("kagami-{}.log", spec.name));
    run_args.push(format!("--log-uri=file://{}", log.display()));
    run_args.push("localhost/kagami:test".into());
    run_args.push(id.clone());
    run_args.extend(argv);
    run(containerd.ctr().args(&run_args));
    let container = Container {
        containerd,
        id,
        log,
    };

    // Ready by the DaemonSet's own readiness probe path.
    let listen = &spec.listen;
    let ready_path = c["readinessProbe"]["httpGet"]["path"].as_str().unwrap();
    eventually_sync(
        Duration::from_secs(60),
        format!("the containerized kagami to become ready on {listen}"),
        || {
            if std::net::TcpStream::connect(listen).is_ok() && http_get(listen, ready_path).0 == 200
            {
                return Ok(());
            }
            assert!(
                container.running(),
                "the containerized kagami did not become ready on {listen}:\n{}",
                container.log()
            );
            Err(container.log())
        },
    );

    // kagami wrote the hosts.toml for the test registry into the hosts dir, pointing at
    // itself.
    let hosts_toml = spec
        .hosts_dir
        .join(spec.registry_name.clone())
        .join("hosts.toml");
    eventually_sync(
        Duration::from_secs(20),
        format!("{} to be written", hosts_toml.display()),
        || {
            if hosts_toml.exists() {
                Ok(())
            } else {
                Err(container.log())
            }
        },
    );
    let hosts = std::fs::read_to_string(&hosts_toml).unwrap();
    assert!(
        hosts.contains(&format!("[host.\"http://{listen}/v2\"]")),
        "{hosts}"
    );
    container
}

/// `ctr images pull --hosts-dir HOSTS image`, asserting success.
fn pull(containerd: &Containerd, hosts_dir: &Path, image: &str, container: &Container<'_>) {
    let out = containerd
        .ctr()
        .args(["images", "pull", "--hosts-dir"])
        .arg(hosts_dir)
        .arg(image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ctr pull {image} failed:\n{}\n{}\nkagami:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        container.log()
    );
}

/// The value of a metric line `NAME VALUE` in kagami's /metrics, if there is one.
fn metric(listen: &str, name: &str) -> Option<f64> {
    let (status, _, body) = http_get(listen, "/metrics");
    assert_eq!(status, 200);
    let metrics = String::from_utf8(body).unwrap();
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .map(|v| v.trim().parse().unwrap())
}

fn blob_gets(registry: &Registry) -> Vec<String> {
    registry
        .access_log()
        .into_iter()
        .filter(|l| l.contains("\"GET ") && l.contains("/blobs/"))
        .collect()
}

#[test]
fn image_runs_as_the_daemonset_and_serves_containerd() {
    require(TOOLS);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // The origin registry with a test image.
    let registry = Registry::start(&d.join("registry"));
    let app = build_image(&d.join("app"), "1", 2, 512 * 1024);
    let image = format!("{}/library/app:1", registry.addr());
    app.push(&image);

    let containerd = Containerd::start(&d.join("containerd"));
    let entrypoint = build_and_import(d, &containerd, true);
    let listen = format!("127.0.0.1:{}", free_port());
    let container = start(
        d,
        &containerd,
        &entrypoint,
        NodeSpec {
            name: "single",
            listen: listen.clone(),
            hosts_dir: containerd.hosts_dir.clone(),
            registry_name: registry.addr(),
            registry: registry.addr(),
            env: Vec::new(),
            mounts: Vec::new(),
        },
    );
    pull(&containerd, &containerd.hosts_dir, &image, &container);

    // The pull went through the containerized kagami: every blob request the origin saw
    // came from kagami's user agent, none from containerd's.
    let log = registry.access_log();
    let gets = blob_gets(&registry);
    assert!(gets.len() >= 3, "2 layers and a config: {log:#?}");
    assert!(gets.iter().all(|l| l.contains("\"kagami/")), "{log:#?}");
    assert!(log.iter().all(|l| !l.contains("containerd/")), "{log:#?}");
    let upstream = metric(&listen, "kagami_served_bytes_total{source=\"upstream\"}")
        .expect("kagami_served_bytes_total{source=\"upstream\"} in /metrics");
    assert!(upstream >= 2.0 * 512.0 * 1024.0, "{upstream}");

    let id = container.id.clone();
    drop(container);
    let out = run(containerd.ctr().args(["containers", "ls", "-q"]));
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains(&id),
        "the container was not removed"
    );
}

/// The P2P environment the DaemonSet's comment tells operators to uncomment, as
/// (name, value): the commented `env` entries after "Sharing between nodes (P2P)", up to the
/// containerd part. Read from the YAML so the test and the file cannot drift.
fn commented_p2p_env() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo().join("deploy/kubernetes/daemonset.yaml")).unwrap();
    let mut lines = text
        .lines()
        .map(str::trim)
        .skip_while(|l| *l != "# env (continued):")
        .skip(1)
        .take_while(|l| l.starts_with('#') && !l.contains("Also share"));
    let mut env = Vec::new();
    while let Some(l) = lines.next() {
        let Some(name) = l.strip_prefix("#   - name: ") else {
            continue;
        };
        let value = lines.next().unwrap_or_default();
        if let Some(v) = value.strip_prefix("#     value: ") {
            env.push((name.trim().to_string(), v.trim().to_string()));
        } else {
            // NODE_IP comes from the downward API: substituted below.
            assert!(value.contains("status.hostIP"), "{name}: {value}");
        }
    }
    assert!(
        !env.is_empty(),
        "no commented P2P env block in daemonset.yaml"
    );
    env
}

#[test]
fn two_containers_of_the_image_share_over_p2p_with_the_origin_stopped() {
    require(TOOLS);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A name only the site uses, mirrored to the loopback origin: loopback registry names
    // are node-local, so kagami never shares them between nodes.
    let name = "ksd.test.com";
    let registry = Registry::start(&d.join("registry"));
    let app = build_image(&d.join("app"), "1", 2, 512 * 1024);
    app.push(&format!("{}/library/app:1", registry.addr()));
    let image = format!("{name}/library/app:1");

    let containerd = Containerd::start(&d.join("containerd"));
    let entrypoint = build_and_import(d, &containerd, false);
    // The key, as secret.yaml's comment generates it, mounted where the DaemonSet mounts it.
    let psk_dir = d.join("p2p-psk");
    std::fs::create_dir_all(&psk_dir).unwrap();
    let psk = psk_dir.join("psk");
    std::fs::write(&psk, format!("{}\n", "ab".repeat(32))).unwrap();
    std::fs::set_permissions(&psk, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();

    let env = commented_p2p_env();
    let psk_path = env
        .iter()
        .find(|(k, _)| k == "KAGAMI_P2P_PSK_FILE")
        .map(|(_, v)| v.clone())
        .expect("KAGAMI_P2P_PSK_FILE in the comment");
    let node = |ip: &str, p2p_port: u16, bootstrap: &str| -> Vec<(String, String)> {
        env.iter()
            .map(|(k, v)| {
                let v = match k.as_str() {
                    // The Service name needs cluster DNS: the first node's address instead.
                    "KAGAMI_P2P_BOOTSTRAP" => bootstrap.to_string(),
                    _ => v
                        .replace("$(NODE_IP)", ip)
                        .replace(":5001", &format!(":{p2p_port}")),
                };
                (k.clone(), v)
            })
            .collect()
    };
    let (pa, pb) = (free_port(), free_port());
    let a_p2p = format!("127.0.0.2:{pa}");
    let spec = |n: &'static str, ip: &str, p2p: u16, bootstrap: &str| NodeSpec {
        name: n,
        listen: format!("{ip}:{}", free_port()),
        hosts_dir: d.join(format!("hosts-{n}")),
        registry_name: name.to_string(),
        registry: registry.addr(),
        env: node(ip, p2p, bootstrap),
        mounts: vec![(
            psk_dir.clone(),
            Path::new(&psk_path).parent().unwrap().display().to_string(),
        )],
    };
    let spec_a = spec("a", "127.0.0.2", pa, &a_p2p);
    let spec_b = spec("b", "127.0.0.3", pb, &a_p2p);
    let (hosts_a, hosts_b, listen_b) = (
        spec_a.hosts_dir.clone(),
        spec_b.hosts_dir.clone(),
        spec_b.listen.clone(),
    );
    for h in [&hosts_a, &hosts_b] {
        std::fs::create_dir_all(h).unwrap();
    }
    let a = start(d, &containerd, &entrypoint, spec_a);
    let b = start(d, &containerd, &entrypoint, spec_b);
    eventually_sync(Duration::from_secs(30), "node b to see node a", || {
        let (_, _, body) = http_get(&listen_b, "/p2p/status");
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        v["members"].as_array().is_some_and(|m| !m.is_empty())
    });

    // Node a pulls the image from the origin for containerd.
    pull(&containerd, &hosts_a, &image, &a);
    let gets = blob_gets(&registry);
    assert!(gets.len() >= 3, "2 layers and a config through a");

    // The origin goes away; containerd forgets the image (and its content), then pulls it
    // again through node b, which only a can serve.
    drop(registry);
    run(containerd.ctr().args(["images", "rm", "--sync", &image]));
    pull(&containerd, &hosts_b, &image, &b);
    let peer = metric(&listen_b, "kagami_served_bytes_total{source=\"peer\"}")
        .unwrap_or_else(|| panic!("no peer bytes in b's /metrics:\n{}", b.log()));
    assert!(peer >= 2.0 * 512.0 * 1024.0, "{peer}");
    assert_eq!(
        metric(&listen_b, "kagami_served_bytes_total{source=\"upstream\"}").unwrap_or(0.0),
        0.0,
        "b reached an upstream"
    );
}
