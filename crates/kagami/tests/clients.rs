//! Clients other than containerd pulling through `kagami serve`, each the real program:
//!
//! - dockerd 20.10 (Debian's `docker.io`) with `registry-mirrors`: it asks a mirror only for
//!   Docker Hub images and names no registry (`/v2/library/app/manifests/1`), which kagami
//!   serves as `--default-registry` (docker.io);
//! - podman 4.3, buildah 1.28 and skopeo 1.9 (containers/image) through the registries.conf.d drop-in
//!   `kagami registries-conf` renders: a registry with a port (path form `host_port`), a
//!   Docker Hub short name, and a registry whose mirrors entry rewrites repositories.
//!
//! Every registry is a docker-registry on loopback. kagami reaches Docker Hub's name only
//! through a registries.yaml mirror (`--disable-default-registry-endpoint`), and the names a
//! client could fall back to (`registry-1.docker.io`, `registry.example.test`) are mapped to
//! 127.0.0.1 in /etc/hosts for the duration of a test ([`HostsGuard`]), so nothing leaves
//! the machine even when kagami fails. Each test proves the pull went through kagami: the
//! origin registry saw only kagami's user agent, every blob of the image was fetched from it
//! exactly once, and a second pull after removing the image fetched no blob from it.

use std::path::Path;

use crate::serve::Kagami;
use crate::support::{
    ContainersTools, Dockerd, HostsGuard, Registry, TestImage, build_image, http_get, kagami, run,
};

/// The config and layer digests of a test image (what a client fetches as blobs).
fn image_blobs(image: &TestImage) -> Vec<String> {
    let read = |digest: &str| -> serde_json::Value {
        let hex = digest.strip_prefix("sha256:").unwrap();
        serde_json::from_slice(&std::fs::read(image.layout.join("blobs/sha256").join(hex)).unwrap())
            .unwrap()
    };
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(image.layout.join("index.json")).unwrap()).unwrap();
    let desc = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == image.tag.as_str())
        .unwrap();
    let manifest = read(desc["digest"].as_str().unwrap());
    let mut blobs = vec![manifest["config"]["digest"].as_str().unwrap().to_string()];
    for l in manifest["layers"].as_array().unwrap() {
        blobs.push(l["digest"].as_str().unwrap().to_string());
    }
    blobs.sort();
    blobs
}

/// The origin's access-log lines from `mark` on.
fn origin_lines(origin: &Registry, mark: usize) -> Vec<String> {
    origin.access_log().split_off(mark)
}

/// The digests of the blob GETs in `lines`, sorted.
fn blob_gets(lines: &[String]) -> Vec<String> {
    let mut v: Vec<String> = lines
        .iter()
        .filter(|l| l.contains("\"GET "))
        .filter_map(|l| {
            let at = l.find("/blobs/sha256:")? + "/blobs/".len();
            l.get(at..at + 71).map(str::to_string)
        })
        .collect();
    v.sort();
    v
}

/// What every test asserts of a first pull: only kagami talked to the origin (clients send
/// their own user agents: `docker/…`, `containers/…`, `skopeo/…`), and it fetched every
/// blob of the image exactly once.
fn assert_pulled_through_kagami(origin: &Registry, mark: usize, image: &TestImage) {
    let lines = origin_lines(origin, mark);
    assert!(!lines.is_empty(), "the origin saw no request at all");
    for l in &lines {
        assert!(
            l.ends_with("\"kagami/0.1.0\""),
            "a request reached the origin without going through kagami:\n{l}\n{lines:#?}"
        );
    }
    assert_eq!(blob_gets(&lines), image_blobs(image), "{lines:#?}");
}

/// kagami refused nothing (a refused request would mean a name form it does not serve).
fn assert_nothing_refused(k: &Kagami) {
    let status: serde_json::Value =
        serde_json::from_slice(&http_get(&k.addr(), "/status.json").2).unwrap();
    assert_eq!(status["refused"], serde_json::json!([]), "{status:#}");
    let metrics = k.metrics();
    assert!(
        !metrics
            .lines()
            .any(|l| l.starts_with("kagami_refused_requests_total{") && !l.ends_with(" 0")),
        "{metrics}"
    );
}

fn write_config(dir: &Path, yaml: &str) -> std::path::PathBuf {
    let p = dir.join("registries.yaml");
    std::fs::write(&p, yaml).unwrap();
    p
}

/// dockerd's `registry-mirrors` pointed at kagami: `docker pull app:1` (docker.io/library/app)
/// goes through kagami, whose docker.io mirror is a loopback registry.
#[test]
fn dockerd_registry_mirrors_pull_through_kagami() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Registry::start(&dir.path().join("origin"));
    let image = build_image(&dir.path().join("image"), "1", 2, 64 * 1024);
    image.push(&format!("{}/library/app:1", origin.addr()));
    let cfg = write_config(
        dir.path(),
        &format!(
            "mirrors:\n  docker.io:\n    endpoint: [\"http://{}\"]\n",
            origin.addr()
        ),
    );
    let k = Kagami::start(dir.path(), &cfg, &["--disable-default-registry-endpoint"]);
    // dockerd falls back to registry-1.docker.io when the mirror fails.
    let _hosts = HostsGuard::map(&["registry-1.docker.io", "index.docker.io"]);
    let dockerd = Dockerd::start(&dir.path().join("dockerd"), &format!("http://{}", k.addr()));

    let mark = origin.access_log().len();
    let out = run(dockerd.docker().args(["pull", "app:1"]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("docker.io/library/app:1"), "{stdout}");
    run(dockerd
        .docker()
        .args(["image", "inspect", "docker.io/library/app:1"]));
    assert_pulled_through_kagami(&origin, mark, &image);
    // dockerd named no registry: kagami served the bare path as docker.io.
    let log = k.log_text();
    assert!(
        log.contains("/v2/library/app/manifests/1"),
        "kagami never saw dockerd's request:\n{log}"
    );

    run(dockerd.docker().args(["rmi", "app:1"]));
    let mark = origin.access_log().len();
    run(dockerd.docker().args(["pull", "app:1"]));
    let again = origin_lines(&origin, mark);
    assert_eq!(blob_gets(&again), Vec::<String>::new(), "{again:#?}");
    assert_nothing_refused(&k);
}

/// One containers/image case: `yaml` mirrors the registry of `pull` to `origin`, the image
/// is pushed to the origin as `push`, `kagami registries-conf` renders the drop-in, podman
/// pulls `pull`, and kagami must have been asked for `kagami_path`.
struct PodmanCase<'a> {
    yaml: String,
    push: String,
    pull: &'a str,
    /// The name podman stores the image under.
    stored: &'a str,
    kagami_path: String,
    /// Names mapped to 127.0.0.1 while the test runs (what podman falls back to).
    fallback_names: &'a [&'a str],
    main_conf: &'a str,
}

fn podman_case(dir: &Path, origin: &Registry, case: PodmanCase) -> (Kagami, String) {
    let image = build_image(&dir.join("image"), "1", 2, 64 * 1024);
    image.push(&case.push);
    let cfg = write_config(dir, &case.yaml);
    let k = Kagami::start(dir, &cfg, &["--disable-default-registry-endpoint"]);
    let _hosts = HostsGuard::map(case.fallback_names);
    let tools = ContainersTools::new(&dir.join("podman"), case.main_conf);
    let dropin = tools.dropin_dir().join("50-kagami.conf");
    run(kagami()
        .args(["registries-conf", "--mirror"])
        .arg(format!("http://{}", k.addr()))
        .arg("-c")
        .arg(&cfg)
        .arg("-o")
        .arg(&dropin));
    let rendered = std::fs::read_to_string(&dropin).unwrap();

    let mark = origin.access_log().len();
    let out = tools.pull(case.pull);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        stderr.contains(&format!("Trying to pull {}", case.stored)),
        "{stderr}"
    );
    assert_pulled_through_kagami(origin, mark, &image);
    let log = k.log_text();
    assert!(
        log.contains(&case.kagami_path),
        "kagami never saw {}:\n{log}",
        case.kagami_path
    );

    // skopeo reads the same drop-in.
    let mark = origin.access_log().len();
    let out = run(tools
        .cmd("skopeo")
        .args(["inspect", "--no-tags", "--format", "{{.Digest}}"])
        .arg(format!("docker://{}", case.stored)));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("sha256:"));
    for l in origin_lines(origin, mark) {
        assert!(
            l.ends_with("\"kagami/0.1.0\""),
            "skopeo went around kagami: {l}"
        );
    }

    tools.rmi(case.stored);
    let mark = origin.access_log().len();
    tools.pull(case.pull);
    let again = origin_lines(origin, mark);
    assert_eq!(blob_gets(&again), Vec::<String>::new(), "{again:#?}");

    // buildah too (`--policy always` asks for the manifest even though podman's shared
    // storage holds the image).
    let asked = |k: &Kagami| k.log_text().matches(&case.kagami_path).count();
    let before = asked(&k);
    let mark = origin.access_log().len();
    run(tools
        .cmd("buildah")
        .args(["pull", "--quiet", "--policy", "always", case.pull]));
    assert!(asked(&k) > before, "buildah did not go through kagami");
    for l in origin_lines(origin, mark) {
        assert!(
            l.ends_with("\"kagami/0.1.0\""),
            "buildah went around kagami: {l}"
        );
    }
    assert_nothing_refused(&k);
    (k, rendered)
}

const NO_SEARCH: &str = "unqualified-search-registries = []\n";

/// The first `[[registry]]` table of a rendered registries.conf drop-in.
fn first_registry(rendered: &str) -> toml_edit::Table {
    let doc: toml_edit::DocumentMut = rendered
        .parse()
        .unwrap_or_else(|e| panic!("{e}\n{rendered}"));
    doc["registry"]
        .as_array_of_tables()
        .unwrap()
        .get(0)
        .unwrap()
        .clone()
}

/// A registry with a port: `127.0.0.1:PORT/team/app:1`, which containers/image reaches at
/// kagami as `127.0.0.1:KAGAMI/127.0.0.1_PORT/team/app`.
#[test]
fn podman_pulls_a_registry_with_a_port_through_kagami() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Registry::start(&dir.path().join("origin"));
    let o = origin.addr();
    let form = o.replace(':', "_");
    let (_k, rendered) = podman_case(
        dir.path(),
        &origin,
        PodmanCase {
            yaml: format!("mirrors:\n  \"{o}\":\n    endpoint: [\"http://{o}\"]\n"),
            push: format!("{o}/team/app:1"),
            pull: &format!("{o}/team/app:1"),
            stored: &format!("{o}/team/app:1"),
            kagami_path: format!("/v2/{form}/team/app/manifests/1"),
            fallback_names: &[],
            main_conf: NO_SEARCH,
        },
    );
    // The origin's own endpoint is the registry itself (its `location`, insecure), not a
    // mirror.
    let reg = first_registry(&rendered);
    assert_eq!(reg["location"].as_str(), Some(o.as_str()));
    assert_eq!(reg["insecure"].as_bool(), Some(true));
    assert_eq!(reg["mirror"].as_array_of_tables().unwrap().len(), 1);
}

/// A Docker Hub short name: `app:1` resolves (unqualified-search-registries) to
/// docker.io/library/app:1, which kagami serves from its docker.io mirror.
#[test]
fn podman_pulls_a_docker_hub_short_name_through_kagami() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Registry::start(&dir.path().join("origin"));
    let o = origin.addr();
    podman_case(
        dir.path(),
        &origin,
        PodmanCase {
            yaml: format!("mirrors:\n  docker.io:\n    endpoint: [\"http://{o}\"]\n"),
            push: format!("{o}/library/app:1"),
            pull: "app:1",
            stored: "docker.io/library/app:1",
            kagami_path: "/v2/docker.io/library/app/manifests/1".into(),
            fallback_names: &["registry-1.docker.io", "index.docker.io"],
            main_conf: "unqualified-search-registries = [\"docker.io\"]\nshort-name-mode = \"permissive\"\n",
        },
    );
}

/// A registries.yaml rewrite: `registry.example.test/team/web:1` is `production/web` on the
/// endpoint. containers/image cannot rewrite, so the drop-in lists only kagami for it, and
/// kagami applies the rule.
#[test]
fn podman_pulls_through_a_kagami_rewrite() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Registry::start(&dir.path().join("origin"));
    let o = origin.addr();
    let mark = origin.access_log().len();
    let (_k, rendered) = podman_case(
        dir.path(),
        &origin,
        PodmanCase {
            yaml: format!(
                "mirrors:\n  registry.example.test:\n    endpoint: [\"http://{o}\"]\n    rewrite:\n      \"^team/(.*)$\": \"production/$1\"\n"
            ),
            push: format!("{o}/production/web:1"),
            pull: "registry.example.test/team/web:1",
            stored: "registry.example.test/team/web:1",
            kagami_path: "/v2/registry.example.test/team/web/manifests/1".into(),
            fallback_names: &["registry.example.test"],
            main_conf: NO_SEARCH,
        },
    );
    // Nobody asked the origin for the unrewritten name.
    let lines = origin_lines(&origin, mark);
    assert!(!lines.iter().any(|l| l.contains("/v2/team/")), "{lines:#?}");
    let reg = first_registry(&rendered);
    let mirrors = reg["mirror"].as_array_of_tables().unwrap();
    assert_eq!(mirrors.len(), 1, "{rendered}");
    assert!(
        rendered.contains(&format!("# Not listed: http://{o}/v2")),
        "{rendered}"
    );
}

/// The drop-in is written only over a file kagami wrote, and goes to stdout without -o.
#[test]
fn registries_conf_output_ownership() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "mirrors:\n  quay.io:\n");
    let out = run(kagami()
        .args(["registries-conf", "--mirror", "http://127.0.0.1:5000", "-c"])
        .arg(&cfg));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("location = \"127.0.0.1:5000/quay.io\""),
        "{text}"
    );

    let file = dir.path().join("50-kagami.conf");
    std::fs::write(&file, "# mine\n").unwrap();
    let out = kagami()
        .args(["registries-conf", "--mirror", "http://127.0.0.1:5000", "-c"])
        .arg(&cfg)
        .arg("-o")
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not written by kagami"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "# mine\n");
    std::fs::remove_file(&file).unwrap();
    for _ in 0..2 {
        run(kagami()
            .args(["registries-conf", "--mirror", "http://127.0.0.1:5000", "-c"])
            .arg(&cfg)
            .arg("-o")
            .arg(&file));
    }
    assert_eq!(std::fs::read_to_string(&file).unwrap(), text);
    let out = kagami()
        .args([
            "registries-conf",
            "--mirror",
            "http://127.0.0.1:5000/v2/x",
            "-c",
        ])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
}
