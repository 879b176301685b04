//! `kagami containerd-config`: rendered hosts.toml snapshots, TOML escaping, ownership of
//! directories, and the real consumer: containerd 1.6 pulling through the files.

use crate::support::{Containerd, Registry, build_image, example, kagami, pki, run};

/// A fresh temp dir holding test certificates under `certs/` and `yaml` as
/// `registries.yaml`, and a `kagami containerd-config --config registries.yaml` command run
/// in it, for the caller to add the output flags to.
fn containerd_config(yaml: &str) -> (tempfile::TempDir, std::process::Command) {
    let dir = tempfile::tempdir().unwrap();
    pki::generate(&dir.path().join("certs"));
    std::fs::write(dir.path().join("registries.yaml"), yaml).unwrap();
    let mut cmd = kagami();
    cmd.current_dir(dir.path())
        .args(["containerd-config", "--config", "registries.yaml"]);
    (dir, cmd)
}

/// Renders `yaml` into a fresh hosts dir and returns every file as
/// "== <dir>/hosts.toml\n<contents>", with the temp dir replaced by `<dir>`.
fn render(yaml: &str, extra: &[&str]) -> String {
    let (dir, mut cmd) = containerd_config(yaml);
    let hosts = dir.path().join("certs.d");
    run(cmd.arg("--hosts-dir").arg(&hosts).args(extra));
    let mut names: Vec<_> = std::fs::read_dir(&hosts)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let mut out = String::new();
    for n in names {
        let text = std::fs::read_to_string(hosts.join(&n).join("hosts.toml")).unwrap();
        // Every file must be valid TOML.
        text.parse::<toml_edit::DocumentMut>()
            .unwrap_or_else(|e| panic!("{n}/hosts.toml is not valid TOML: {e}\n{text}"));
        out.push_str(&format!("== {n}/hosts.toml\n{text}"));
    }
    out.replace(&dir.path().display().to_string(), "<dir>")
        .replace("<dir>/./", "<dir>/")
}

#[test]
fn spec_section4_as_k3s_writes_it() {
    insta::assert_snapshot!(
        "hosts_spec_section4",
        render(&example("spec-section4.yaml"), &[])
    );
}

#[test]
fn spec_section4_with_kagami_first() {
    insta::assert_snapshot!(
        "hosts_spec_section4_mirror",
        render(
            &example("spec-section4.yaml"),
            &["--mirror", "127.0.0.1:5000"]
        )
    );
}

#[test]
fn seed_configurations() {
    for (name, file) in [
        (
            "hosts_rewrite_harbor_project",
            "rewrite-harbor-project.yaml",
        ),
        ("hosts_harbor_proxy_cache", "harbor-proxy-cache.yaml"),
        ("hosts_endpoints_auth_tls", "endpoints-auth-tls.yaml"),
    ] {
        insta::assert_snapshot!(name, render(&example(file), &[]));
    }
}

#[test]
fn wildcard_and_disabled_default() {
    let yaml = "mirrors:\n  \"*\":\n    endpoint: [\"https://cache.example.com\"]\n  quay.io:\n    endpoint: [\"https://q.example.com\"]\n";
    insta::assert_snapshot!("hosts_wildcard", render(yaml, &[]));
    insta::assert_snapshot!(
        "hosts_wildcard_no_default",
        render(yaml, &["--disable-default-registry-endpoint"])
    );
}

#[test]
fn rewrite_patterns_are_escaped() {
    let yaml = "mirrors:\n  docker.io:\n    endpoint: [\"https://m.example.com\"]\n    rewrite:\n      \"^library/(\\\\w+)\\\\.x\\\"$\": \"lib/$1\"\n";
    let text = render(yaml, &[]);
    let body = text.split_once('\n').unwrap().1;
    let doc: toml_edit::DocumentMut = body.parse().unwrap();
    let rewrite = doc["host"]["https://m.example.com/v2"]["rewrite"]
        .as_table()
        .unwrap();
    let (pattern, replacement) = rewrite.iter().next().unwrap();
    assert_eq!(pattern, r#"^library/(\w+)\.x"$"#);
    assert_eq!(replacement.as_str(), Some("lib/$1"));
}

#[test]
fn auth_stanza_for_config_toml() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("r.yaml"),
        "configs:\n  registry-1.docker.io:\n    auth: {username: \"me\", password: \"p\\\"w\"}\n  quay.io:\n    auth: {identity_token: tok}\n",
    )
    .unwrap();
    run(kagami().current_dir(dir.path()).args([
        "containerd-config",
        "-c",
        "r.yaml",
        "--hosts-dir",
        "h",
        "--containerd-config-out",
        "auth.toml",
    ]));
    let text = std::fs::read_to_string(dir.path().join("auth.toml")).unwrap();
    let doc: toml_edit::DocumentMut = text.parse().unwrap();
    let configs = &doc["plugins"]["io.containerd.grpc.v1.cri"]["registry"]["configs"];
    assert_eq!(
        configs["registry-1.docker.io"]["auth"]["username"].as_str(),
        Some("me")
    );
    assert_eq!(
        configs["registry-1.docker.io"]["auth"]["password"].as_str(),
        Some("p\"w")
    );
    assert_eq!(
        configs["quay.io"]["auth"]["identitytoken"].as_str(),
        Some("tok")
    );
    // Credentials never go into hosts.toml.
    let hosts =
        std::fs::read_to_string(dir.path().join("h/registry-1.docker.io/hosts.toml")).unwrap();
    assert!(!hosts.contains("me") && !hosts.contains("tok"), "{hosts}");
}

#[test]
fn only_touches_directories_it_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("certs.d");
    let own = hosts.join("docker.io");
    std::fs::create_dir_all(&own).unwrap();
    std::fs::write(
        own.join("hosts.toml"),
        "server = \"https://mine.example.com\"\n",
    )
    .unwrap();
    let cfg = dir.path().join("r.yaml");
    std::fs::write(
        &cfg,
        "mirrors:\n  docker.io:\n    endpoint: [\"https://m.example.com\"]\n  quay.io:\n    endpoint: [\"https://q.example.com\"]\n",
    )
    .unwrap();
    let out = run(kagami()
        .args(["containerd-config", "-c"])
        .arg(&cfg)
        .arg("--hosts-dir")
        .arg(&hosts));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("left") && stderr.contains("docker.io"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(own.join("hosts.toml")).unwrap(),
        "server = \"https://mine.example.com\"\n"
    );
    assert!(hosts.join("quay.io/hosts.toml").exists());
    // quay.io leaves the configuration: kagami removes the directory it wrote, and only it.
    std::fs::write(
        &cfg,
        "mirrors:\n  docker.io:\n    endpoint: [\"https://m.example.com\"]\n",
    )
    .unwrap();
    run(kagami()
        .args(["containerd-config", "-c"])
        .arg(&cfg)
        .arg("--hosts-dir")
        .arg(&hosts));
    assert!(!hosts.join("quay.io").exists());
    assert!(own.join("hosts.toml").exists());
}

/// The real consumer: docker-registry and containerd 1.6 on loopback; an image pushed with
/// skopeo; hosts.toml rendered by kagami for a made-up registry name whose mirror endpoint
/// is that registry; `ctr images pull --hosts-dir` pulls through it.
#[test]
fn real_containerd_pulls_through_rendered_hosts_toml() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry"));
    let image = build_image(&dir.path().join("image"), "1", 2, 64 * 1024);
    image.push(&format!("{}/production/app:1", registry.addr()));

    let containerd = Containerd::start(&dir.path().join("containerd"));
    // The default endpoint must not leave the machine: disable it.
    let yaml = format!(
        "mirrors:\n  registry.example.test:\n    endpoint: [\"http://{}\"]\n    rewrite:\n      \"^team/(.*)$\": \"production/$1\"\n",
        registry.addr()
    );
    let cfg = dir.path().join("registries.yaml");
    std::fs::write(&cfg, yaml).unwrap();
    run(kagami()
        .args([
            "containerd-config",
            "--disable-default-registry-endpoint",
            "-c",
        ])
        .arg(&cfg)
        .arg("--hosts-dir")
        .arg(&containerd.hosts_dir));
    let hosts = std::fs::read_to_string(
        containerd
            .hosts_dir
            .join("registry.example.test/hosts.toml"),
    )
    .unwrap();
    assert!(!hosts.contains("server ="), "{hosts}");

    // Stock containerd ignores rewrite tables, so pull by the path the mirror holds.
    let out = containerd.pull("registry.example.test/production/app:1");
    assert!(
        out.status.success(),
        "ctr pull failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        containerd
            .images()
            .contains("registry.example.test/production/app:1")
    );
    // containerd sent ?ns= with the original registry name, through the mirror endpoint.
    assert!(
        registry.count_gets("ns=registry.example.test") > 0,
        "{:?}",
        registry.access_log()
    );
    assert!(registry.count_gets("/v2/production/app/blobs/sha256:") >= 3);
}

/// Renders `--containerd-config-out` with `--legacy-mirrors` (no hosts dir) for `yaml`;
/// the output must be valid TOML.
fn render_legacy(yaml: &str, extra: &[&str]) -> String {
    let (dir, mut cmd) = containerd_config(yaml);
    run(cmd
        .args(["--containerd-config-out", "config.toml", "--legacy-mirrors"])
        .args(extra));
    assert!(!dir.path().join("certs.d").exists());
    let text = std::fs::read_to_string(dir.path().join("config.toml")).unwrap();
    text.parse::<toml_edit::DocumentMut>()
        .unwrap_or_else(|e| panic!("not valid TOML: {e}\n{text}"));
    text.replace(&dir.path().display().to_string(), "<dir>")
        .replace("<dir>/./", "<dir>/")
}

/// The legacy `registry.mirrors` form (containerd without `config_path`): K3s's order
/// without --mirror; kagami first, and no endpoint with rewrites, with it.
#[test]
fn legacy_mirrors_for_config_toml() {
    insta::assert_snapshot!(
        "legacy_spec_section4",
        render_legacy(&example("spec-section4.yaml"), &[])
    );
    insta::assert_snapshot!(
        "legacy_spec_section4_mirror",
        render_legacy(
            &example("spec-section4.yaml"),
            &["--mirror", "127.0.0.1:5000"]
        )
    );
    insta::assert_snapshot!(
        "legacy_endpoints_auth_tls_mirror",
        render_legacy(
            &example("endpoints-auth-tls.yaml"),
            &["--mirror", "http://127.0.0.1:5000"]
        )
    );
    let wildcard = "mirrors:\n  \"*\":\n    endpoint: [\"https://cache.example.com\"]\n  \"127.0.0.1:5001\": {}\n";
    insta::assert_snapshot!(
        "legacy_wildcard_mirror",
        render_legacy(wildcard, &["--mirror", "http://127.0.0.1:5000"])
    );
}

/// Without --hosts-dir, --containerd-config-out is needed; --legacy-mirrors needs it too.
#[test]
fn legacy_mirrors_flags() {
    let out = kagami()
        .args(["containerd-config", "--legacy-mirrors", "--hosts-dir", "x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--containerd-config-out"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The default endpoint cannot be disabled in the legacy form: a warning says so.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("r.yaml"),
        "mirrors:\n  docker.io:\n    endpoint: [\"https://m.example.com\"]\n",
    )
    .unwrap();
    let out = run(kagami().current_dir(dir.path()).args([
        "containerd-config",
        "-c",
        "r.yaml",
        "--containerd-config-out",
        "c.toml",
        "--legacy-mirrors",
        "--disable-default-registry-endpoint",
    ]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--disable-default-registry-endpoint does not apply"),
        "{stderr}"
    );
    let out = kagami().args(["containerd-config"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--hosts-dir"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
