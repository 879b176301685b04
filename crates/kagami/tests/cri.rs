//! The kubelet's path (feature `containerd`): Kubernetes and K3s pull through containerd's
//! CRI plugin (`runtime.v1.ImageService/PullImage`), which reads registry hosts from the
//! `config_path` of containerd's own config.toml, or, when that is empty, from the legacy
//! `registry.mirrors` tables. These tests call the CRI of a real containerd 1.6 and check,
//! in the upstream registry's access log, who fetched what: a pull that only succeeds
//! because containerd fell back past kagami to the registry fails them.

use std::path::Path;

use crate::serve::Kagami;
use crate::support::cri::{CriContainerd, RegistryConfig, basic_auth};
use crate::support::{Registry, RegistryOptions, TestImage, build_image, htpasswd, kagami, run};

/// The sum of every sample of metric `name` whose labels contain all of `labels`.
fn metric(text: &str, name: &str, labels: &[&str]) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next().is_some_and(|n| n == name))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .map(|l| {
            l.rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0) as u64
        })
        .sum()
}

/// Blob digests of an image in an OCI layout (manifest, config and layers).
fn blob_digests(image: &TestImage) -> Vec<String> {
    std::fs::read_dir(image.layout.join("blobs/sha256"))
        .unwrap()
        .map(|e| format!("sha256:{}", e.unwrap().file_name().to_string_lossy()))
        .collect()
}

/// Upstream access-log lines after the first `since` that did not come from kagami
/// (containerd falling back to the registry, typically).
fn not_from_kagami(registry: &Registry, since: usize) -> Vec<String> {
    registry
        .access_log()
        .into_iter()
        .skip(since)
        .filter(|l| !l.contains("\"kagami/"))
        .collect()
}

/// Asserts that every blob of `image` that upstream served was fetched once, by kagami,
/// and that at least `min` blobs were (config and layers).
/// `since` is the length of the access log before the pull (skopeo's push is in it).
fn assert_blobs_fetched_once_by_kagami(
    registry: &Registry,
    since: usize,
    image: &TestImage,
    min: usize,
) {
    let fetched: Vec<String> = blob_digests(image)
        .into_iter()
        .filter(|d| registry.count_gets(&format!("/blobs/{d}")) > 0)
        .collect();
    assert!(
        fetched.len() >= min,
        "{} blobs fetched upstream, want {min}: {:#?}",
        fetched.len(),
        registry.access_log()
    );
    for d in &fetched {
        assert_eq!(
            registry.count_gets(&format!("/blobs/{d}")),
            1,
            "{d} fetched more than once: {:#?}",
            registry.access_log()
        );
    }
    let others = not_from_kagami(registry, since);
    assert!(
        others.is_empty(),
        "upstream requests that did not come from kagami: {others:#?}"
    );
}

/// (a) A registry named with a port, `127.0.0.1:PORT/team/app:1`, pulled through the CRI
/// with `config_path` at a hosts dir that `kagami serve --containerd-hosts-dir` wrote.
/// containerd sends `?ns=127.0.0.1%3APORT`; kagami must serve it (once from upstream,
/// then from its store), not let containerd fall back to the registry.
#[test]
fn cri_pull_of_a_registry_with_a_port_goes_through_kagami() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry"));
    let image = build_image(&dir.path().join("image"), "1", 2, 256 * 1024);
    let name = format!("{}/team/app:1", registry.addr());
    image.push(&name);
    let config = dir.path().join("registries.yaml");
    std::fs::write(
        &config,
        format!(
            "mirrors:\n  \"{0}\":\n    endpoint: [\"http://{0}\"]\n",
            registry.addr()
        ),
    )
    .unwrap();
    let hosts_dir = dir.path().join("certs.d");
    let k = Kagami::start(
        dir.path(),
        &config,
        &["--containerd-hosts-dir", hosts_dir.to_str().unwrap()],
    );
    let hosts =
        std::fs::read_to_string(hosts_dir.join(registry.addr()).join("hosts.toml")).unwrap();
    assert!(
        hosts.contains(&format!("[host.\"http://{}/v2\"]", k.addr())),
        "{hosts}"
    );
    let containerd = CriContainerd::start(
        &dir.path().join("containerd"),
        RegistryConfig::ConfigPath(&hosts_dir),
    );
    let mut cri = containerd.cri();
    let pushed = registry.access_log().len();

    let image_ref = cri.pull(&name, None).unwrap_or_else(|e| {
        panic!(
            "CRI pull failed: {e}\nkagami:\n{}\nregistry:\n{:#?}",
            k.log_text(),
            registry.access_log()
        )
    });
    assert!(image_ref.starts_with("sha256:"), "{image_ref}");
    assert!(
        cri.list()
            .unwrap()
            .iter()
            .any(|i| i.repo_tags.contains(&name)),
        "{:?}",
        cri.list()
    );
    // kagami served the manifest, the config and both layers.
    let metrics = k.metrics();
    assert!(
        metric(
            &metrics,
            "kagami_http_requests_total",
            &["route=\"blob\"", "method=\"GET\"", "status=\"200\""]
        ) >= 3,
        "kagami served fewer than 3 blobs\nkagami:\n{}\nregistry:\n{:#?}",
        k.log_text(),
        registry.access_log()
    );
    assert_blobs_fetched_once_by_kagami(&registry, pushed, &image, 3);
    assert!(
        k.log_text().contains(&format!("ns={}", registry.addr()))
            || k.log_text().contains("ns=127.0.0.1%3A"),
        "{}",
        k.log_text()
    );

    // Cold again for containerd: image and content removed. No blob reaches upstream.
    containerd.remove_all();
    let blob_gets = registry.count_gets("/blobs/");
    let served = metric(
        &k.metrics(),
        "kagami_http_requests_total",
        &["route=\"blob\"", "method=\"GET\"", "status=\"200\""],
    );
    cri.pull(&name, None).unwrap();
    assert_eq!(
        registry.count_gets("/blobs/"),
        blob_gets,
        "the second pull reached upstream for blobs: {:#?}",
        registry.access_log()
    );
    assert!(
        metric(
            &k.metrics(),
            "kagami_http_requests_total",
            &["route=\"blob\"", "method=\"GET\"", "status=\"200\""]
        ) >= served + 3,
        "kagami did not serve the second pull's blobs"
    );
    assert!(not_from_kagami(&registry, pushed).is_empty());
}

/// A private registry (htpasswd) behind the made-up name `private.example.test`.
struct Private {
    registry: Registry,
    image: TestImage,
    /// The access log's length after the push.
    pushed: usize,
}

const USER: &str = "kubelet";
const PASSWORD: &str = "s3cret:pw";
const PRIVATE: &str = "private.example.test/team/app:1";

fn private_registry(dir: &Path) -> Private {
    let htpasswd_file = dir.join("htpasswd");
    htpasswd(&htpasswd_file, USER, PASSWORD);
    let registry = Registry::start_with(
        &dir.join("registry"),
        RegistryOptions {
            htpasswd: Some(htpasswd_file),
            ..Default::default()
        },
    );
    let image = build_image(&dir.join("image"), "1", 2, 128 * 1024);
    image.push_args(
        &format!("{}/team/app:1", registry.addr()),
        &["--dest-creds", &format!("{USER}:{PASSWORD}")],
    );
    let pushed = registry.access_log().len();
    Private {
        registry,
        image,
        pushed,
    }
}

/// registries.yaml for `private.example.test` served by `registry`, with or without the
/// credentials; no default endpoint (it would leave the machine).
fn private_config(dir: &Path, registry: &Registry, with_auth: bool) -> std::path::PathBuf {
    let mut yaml = format!(
        "mirrors:\n  private.example.test:\n    endpoint: [\"http://{}\"]\n",
        registry.addr()
    );
    if with_auth {
        yaml.push_str(&format!(
            "configs:\n  \"{}\":\n    auth: {{username: {USER}, password: \"{PASSWORD}\"}}\n",
            registry.addr()
        ));
    }
    let path = dir.join("registries.yaml");
    std::fs::write(&path, yaml).unwrap();
    path
}

/// `kagami serve` writing containerd's hosts directory, and a containerd whose CRI plugin
/// reads it (`config_path`), as on a node.
fn kagami_with_cri(dir: &Path, config: &Path) -> (Kagami, CriContainerd) {
    let hosts_dir = dir.join("certs.d");
    let k = Kagami::start(
        dir,
        config,
        &[
            "--disable-default-registry-endpoint",
            "--containerd-hosts-dir",
            hosts_dir.to_str().unwrap(),
        ],
    );
    let containerd = CriContainerd::start(
        &dir.join("containerd"),
        RegistryConfig::ConfigPath(&hosts_dir),
    );
    (k, containerd)
}

/// (b) Credentials. With them in registries.yaml, kagami authenticates upstream and the
/// kubelet's pull goes through kagami, with or without a pull secret in the CRI request.
#[test]
fn cri_pull_of_a_private_registry_with_credentials_in_registries_yaml() {
    let dir = tempfile::tempdir().unwrap();
    let p = private_registry(dir.path());
    let config = private_config(dir.path(), &p.registry, true);
    let (k, containerd) = kagami_with_cri(dir.path(), &config);
    let mut cri = containerd.cri();
    cri.pull(PRIVATE, None).unwrap_or_else(|e| {
        panic!(
            "CRI pull failed: {e}\nkagami:\n{}\nregistry:\n{:#?}",
            k.log_text(),
            p.registry.access_log()
        )
    });
    assert_blobs_fetched_once_by_kagami(&p.registry, p.pushed, &p.image, 3);

    // The same pull with a pull secret in the request as well: containerd has no reason to
    // send it (kagami never challenges), kagami serves from its store, and nothing reaches
    // upstream.
    containerd.remove_all();
    let blob_gets = p.registry.count_gets("/blobs/");
    cri.pull(PRIVATE, Some(basic_auth(USER, PASSWORD))).unwrap();
    assert_eq!(p.registry.count_gets("/blobs/"), blob_gets);
    assert!(not_from_kagami(&p.registry, p.pushed).is_empty());
}

/// (b) Credentials only in the CRI request (an image pull secret), none in registries.yaml.
/// containerd sends a pull secret only to a host that challenges it with a 401; kagami
/// never challenges: when upstream answers it 401, kagami answers 404, so containerd moves
/// on to the next host of hosts.toml, the registry itself, and authenticates there. The
/// pull works but bypasses kagami: nothing is cached or shared. This test pins that down
/// (docs/containerd.md, "Credentials"); it is not a pull through kagami.
#[test]
fn cri_credentials_only_in_the_request_bypass_kagami() {
    let dir = tempfile::tempdir().unwrap();
    let p = private_registry(dir.path());
    let config = private_config(dir.path(), &p.registry, false);
    let (k, containerd) = kagami_with_cri(dir.path(), &config);
    let mut cri = containerd.cri();
    cri.pull(PRIVATE, Some(basic_auth(USER, PASSWORD)))
        .unwrap_or_else(|e| panic!("CRI pull failed: {e}\nkagami:\n{}", k.log_text()));
    let log: Vec<String> = p.registry.access_log().into_iter().skip(p.pushed).collect();
    let blob_gets = |agent: &str, status: &str| {
        log.iter()
            .filter(|l| l.contains("\"GET ") && l.contains("/blobs/"))
            .filter(|l| l.contains(&format!(" {status} ")) && l.contains(agent))
            .count()
    };
    // kagami asked without credentials and was refused; containerd fetched the config
    // and both layers itself, with the pull secret.
    assert!(blob_gets("\"kagami/", "401") >= 1, "{log:#?}");
    assert_eq!(blob_gets("\"kagami/", "200"), 0, "{log:#?}");
    assert!(blob_gets("\"containerd/", "200") >= 3, "{log:#?}");
    // What containerd got from kagami: 404s, never a 401 challenge.
    let metrics = k.metrics();
    assert_eq!(
        metric(
            &metrics,
            "kagami_http_requests_total",
            &["route=\"blob\"", "status=\"200\""]
        ),
        0,
        "{metrics}"
    );
    assert!(
        metric(
            &metrics,
            "kagami_http_requests_total",
            &["route=\"blob\"", "status=\"404\""]
        ) >= 1,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "kagami_http_requests_total", &["status=\"401\""]),
        0,
        "{metrics}"
    );
}

/// Part of issue 14: containerd's older mirror form. With the CRI `config_path` empty,
/// containerd 1.6 reads `registry.mirrors."<registry>".endpoint` from config.toml (the form
/// older K3s releases wrote); `kagami containerd-config --containerd-config-out FILE
/// --legacy-mirrors --mirror URL` renders it with kagami first. A CRI pull of `image`
/// (given the registry's address) with kagami configured by `yaml` must go through kagami:
/// every blob fetched upstream once, by kagami, and a second cold pull fetches none.
/// containerd appends each registry's default endpoint itself; every name used here has a
/// loopback one.
fn pull_through_legacy_mirrors(yaml: impl Fn(&str) -> String, image: impl Fn(&str) -> String) {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry"));
    let built = build_image(&dir.path().join("image"), "1", 2, 256 * 1024);
    built.push(&format!("{}/team/app:1", registry.addr()));
    let name = image(&registry.addr());
    let config = dir.path().join("registries.yaml");
    std::fs::write(&config, yaml(&registry.addr())).unwrap();
    let port = crate::support::free_port();
    let stanza = dir.path().join("legacy.toml");
    run(kagami()
        .args(["containerd-config", "-c"])
        .arg(&config)
        .args(["--mirror", &format!("http://127.0.0.1:{port}")])
        .arg("--containerd-config-out")
        .arg(&stanza)
        .arg("--legacy-mirrors"));
    let stanza = std::fs::read_to_string(&stanza).unwrap();
    assert!(
        stanza.contains(&format!("endpoint = [\"http://127.0.0.1:{port}\"")),
        "{stanza}"
    );
    let k = Kagami::start_on(dir.path(), &config, port, &[]);
    let containerd = CriContainerd::start(
        &dir.path().join("containerd"),
        RegistryConfig::Legacy(&stanza),
    );
    let mut cri = containerd.cri();
    let pushed = registry.access_log().len();
    cri.pull(&name, None).unwrap_or_else(|e| {
        panic!(
            "CRI pull of {name} failed: {e}\nkagami:\n{}\nregistry:\n{:#?}",
            k.log_text(),
            registry.access_log()
        )
    });
    let served = metric(
        &k.metrics(),
        "kagami_http_requests_total",
        &["route=\"blob\"", "method=\"GET\"", "status=\"200\""],
    );
    assert!(
        served >= 3,
        "kagami served {served} blobs of {name}\nkagami:\n{}\nregistry:\n{:#?}",
        k.log_text(),
        registry.access_log()
    );
    assert_blobs_fetched_once_by_kagami(&registry, pushed, &built, 3);

    containerd.remove_all();
    let blob_gets = registry.count_gets("/blobs/");
    cri.pull(&name, None).unwrap();
    assert_eq!(registry.count_gets("/blobs/"), blob_gets);
    assert!(not_from_kagami(&registry, pushed).is_empty());
}

/// Legacy form, a registry named with a port (`127.0.0.1:PORT/team/app:1`): containerd
/// sends `?ns=127.0.0.1%3APORT`, as through hosts.toml.
#[test]
fn cri_pull_through_legacy_mirrors_registry_with_a_port() {
    pull_through_legacy_mirrors(
        |addr| format!("mirrors:\n  \"{addr}\":\n    endpoint: [\"http://{addr}\"]\n"),
        |addr| format!("{addr}/team/app:1"),
    );
}

/// Legacy form, a registry name without a port (`localhost/team/app:1`, served by the
/// loopback registry as its endpoint).
#[test]
fn cri_pull_through_legacy_mirrors_registry_without_a_port() {
    pull_through_legacy_mirrors(
        |addr| format!("mirrors:\n  localhost:\n    endpoint: [\"http://{addr}\"]\n"),
        |_| "localhost/team/app:1".to_string(),
    );
}

/// Legacy form, `mirrors."*"`: containerd 1.6 uses it for a registry without a table of
/// its own; kagami serves the registry from the endpoint the `"*"` entry names (a loopback
/// registry reached only as its own default endpoint through `"*"` would be refused: see
/// docs/security.md).
#[test]
fn cri_pull_through_legacy_mirrors_wildcard() {
    pull_through_legacy_mirrors(
        |addr| format!("mirrors:\n  \"*\":\n    endpoint: [\"http://{addr}\"]\n"),
        |addr| format!("{addr}/team/app:1"),
    );
}

/// Docker Hub names as pod specs write them (`app:1`, `library/app:1`,
/// `docker.io/library/app:1`): the CRI normalises them to `docker.io/library/app`, reads
/// `certs.d/docker.io`, and kagami serves them. Docker Hub itself is replaced by a loopback
/// registry and the default endpoint is disabled, so nothing leaves the machine.
#[test]
fn cri_pull_of_docker_hub_short_names_goes_through_kagami() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry"));
    let image = build_image(&dir.path().join("image"), "1", 2, 128 * 1024);
    image.push(&format!("{}/library/app:1", registry.addr()));
    let config = dir.path().join("registries.yaml");
    std::fs::write(
        &config,
        format!(
            "mirrors:\n  docker.io:\n    endpoint: [\"http://{}\"]\n",
            registry.addr()
        ),
    )
    .unwrap();
    let (k, containerd) = kagami_with_cri(dir.path(), &config);
    let mut cri = containerd.cri();
    let pushed = registry.access_log().len();
    for (i, name) in ["app:1", "library/app:1", "docker.io/library/app:1"]
        .into_iter()
        .enumerate()
    {
        if i > 0 {
            containerd.remove_all();
        }
        cri.pull(name, None).unwrap_or_else(|e| {
            panic!(
                "CRI pull of {name} failed: {e}\nkagami:\n{}\nregistry:\n{:#?}",
                k.log_text(),
                registry.access_log()
            )
        });
        let images = cri.list().unwrap();
        assert!(
            images
                .iter()
                .any(|i| i.repo_tags.iter().any(|t| t == "docker.io/library/app:1")),
            "{images:?}"
        );
        let served = metric(
            &k.metrics(),
            "kagami_http_requests_total",
            &["route=\"blob\"", "method=\"GET\"", "status=\"200\""],
        );
        assert!(
            served >= 3 * (i as u64 + 1),
            "kagami served {served} blobs after pulling {name}\n{}",
            k.log_text()
        );
    }
    // Fetched once upstream, by kagami, for the three pulls.
    assert_blobs_fetched_once_by_kagami(&registry, pushed, &image, 3);
    assert!(
        k.log_text().contains("ns=docker.io"),
        "containerd names the registry: {}",
        k.log_text()
    );
}
