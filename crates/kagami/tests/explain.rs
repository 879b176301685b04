//! `kagami explain`: the seed configurations plan as the issue says, and the JSON shape.

use serde_json::{Value, json};

use crate::support::{example, kagami, pki};

/// Runs `kagami explain --format json` with `yaml` as the config (certificates generated
/// under certs/ next to it) and returns the parsed plan.
fn explain(yaml: &str, image: &str, extra: &[&str]) -> Value {
    let dir = tempfile::tempdir().unwrap();
    pki::generate(&dir.path().join("certs"));
    std::fs::write(dir.path().join("registries.yaml"), yaml).unwrap();
    let out = kagami()
        .current_dir(dir.path())
        .args(["explain", "--config", "registries.yaml", "--format", "json"])
        .args(extra)
        .arg(image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn summary(plan: &Value) -> Vec<(String, String, String)> {
    plan["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["source"].as_str().unwrap().to_string(),
                a["endpoint"].as_str().unwrap_or("").to_string(),
                a["repository"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

fn s(a: &str, b: &str, c: &str) -> (String, String, String) {
    (a.into(), b.into(), c.into())
}

#[test]
fn rewrite_to_harbor_project_then_docker_hub() {
    let plan = explain(
        &example("rewrite-harbor-project.yaml"),
        "rancher/busybox:1.35",
        &[],
    );
    let tls_none = json!({"ca_file": null, "client_cert": false, "insecure_skip_verify": false});
    assert_eq!(plan["image"], "docker.io/rancher/busybox:1.35");
    assert_eq!(plan["registry"], "docker.io");
    assert_eq!(plan["repository"], "rancher/busybox");
    assert_eq!(plan["reference"], "1.35");
    assert_eq!(plan["attempts"][0], json!({"source": "peers"}));
    let m = &plan["attempts"][1];
    assert_eq!(m["source"], "mirror");
    assert_eq!(m["endpoint"], "https://harbor.example.com/v2");
    assert_eq!(m["repository"], "production/busybox");
    assert_eq!(
        m["url"],
        "https://harbor.example.com/v2/production/busybox/manifests/1.35?ns=docker.io"
    );
    assert_eq!(m["auth"], "none");
    assert_eq!(m["tls"], tls_none);
    assert_eq!(m["token_scope"], "repository:production/busybox:pull");
    let d = &plan["attempts"][2];
    assert_eq!(d["source"], "default");
    assert_eq!(d["endpoint"], "https://registry-1.docker.io/v2");
    assert_eq!(d["repository"], "rancher/busybox");
    assert_eq!(
        d["url"],
        "https://registry-1.docker.io/v2/rancher/busybox/manifests/1.35"
    );
    assert_eq!(d["tls"], tls_none);
    assert_eq!(plan["attempts"].as_array().unwrap().len(), 3);
}

#[test]
fn rewrite_leaves_other_repositories_alone() {
    let plan = explain(&example("rewrite-harbor-project.yaml"), "alpine", &[]);
    assert_eq!(
        summary(&plan)[1..],
        [
            s("mirror", "https://harbor.example.com/v2", "library/alpine"),
            s(
                "default",
                "https://registry-1.docker.io/v2",
                "library/alpine"
            ),
        ]
    );
}

#[test]
fn harbor_proxy_cache_layout() {
    let yaml = example("harbor-proxy-cache.yaml");
    let plan = explain(&yaml, "quay.io/coreos/etcd:v3.5.0", &[]);
    assert_eq!(
        summary(&plan),
        [
            s("peers", "", ""),
            s(
                "mirror",
                "https://harbor.example.com/v2",
                "quay.io/coreos/etcd"
            ),
            s("default", "https://quay.io/v2", "coreos/etcd"),
        ]
    );
    assert_eq!(plan["attempts"][1]["auth"], "basic");
    assert_eq!(
        plan["attempts"][1]["url"],
        "https://harbor.example.com/v2/quay.io/coreos/etcd/manifests/v3.5.0?ns=quay.io"
    );
    // The default endpoint has no configs entry of its own: no credentials go there.
    assert_eq!(plan["attempts"][2]["auth"], "none");
    let hub = explain(
        &yaml,
        "nginx:1.27",
        &["--disable-default-registry-endpoint"],
    );
    assert_eq!(
        summary(&hub),
        [
            s("peers", "", ""),
            s(
                "mirror",
                "https://harbor.example.com/v2",
                "docker.io/library/nginx"
            ),
        ]
    );
}

#[test]
fn two_endpoints_http_auth_and_tls() {
    let plan = explain(
        &example("endpoints-auth-tls.yaml"),
        "registry.example.com/team/app@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        &[],
    );
    let a = plan["attempts"].as_array().unwrap();
    assert_eq!(a.len(), 4);
    assert_eq!(a[1]["endpoint"], "https://mirror1.example.com:5000/v2");
    assert_eq!(a[1]["auth"], "none");
    assert_eq!(a[1]["tls"]["client_cert"], true);
    assert_eq!(a[1]["tls"]["insecure_skip_verify"], true);
    assert!(
        a[1]["tls"]["ca_file"]
            .as_str()
            .unwrap()
            .ends_with("certs/ca.pem")
    );
    assert_eq!(a[2]["endpoint"], "http://mirror2.example.com:8080/v2/cache");
    assert_eq!(a[2]["auth"], "basic");
    assert_eq!(a[2]["token_scope"], "repository:cache/team/app:pull");
    assert_eq!(
        a[2]["url"],
        "http://mirror2.example.com:8080/v2/cache/team/app/manifests/sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef?ns=registry.example.com"
    );
    assert_eq!(a[3]["source"], "default");
    assert_eq!(a[3]["endpoint"], "https://registry.example.com/v2");
    assert_eq!(a[3]["ns"], Value::Null);
}

#[test]
fn entry_without_endpoints_is_shared_and_uses_the_default() {
    let plan = explain(
        &example("endpoints-auth-tls.yaml"),
        "registry.k8s.io/pause:3.9",
        &[],
    );
    assert_eq!(
        summary(&plan),
        [
            s("peers", "", ""),
            s("default", "https://registry.k8s.io/v2", "pause")
        ]
    );
}

#[test]
fn unmirrored_registry_goes_straight_to_its_default() {
    let plan = explain(
        &example("endpoints-auth-tls.yaml"),
        "ghcr.io/org/tool:1",
        &[],
    );
    assert_eq!(
        summary(&plan),
        [s("default", "https://ghcr.io/v2", "org/tool")]
    );
}

#[test]
fn loopback_registries_are_never_shared_and_use_http() {
    let plan = explain("mirrors:\n  \"*\":\n", "127.0.0.1:5000/a/b:1", &[]);
    assert_eq!(
        summary(&plan),
        [s("default", "http://127.0.0.1:5000/v2", "a/b")]
    );
}

#[test]
fn wildcard_mirror_and_rewrite_order() {
    let yaml = "mirrors:\n  \"*\":\n    endpoint: [\"https://cache.example.com\"]\n    rewrite:\n      \"^nomatch/(.*)$\": \"x/$1\"\n      \"^library/(.*)$\": \"first/$1\"\n      \"^(.*)$\": \"second/$1\"\n";
    let plan = explain(yaml, "alpine:3.20", &[]);
    assert_eq!(plan["attempts"][1]["repository"], "first/alpine");
    assert_eq!(plan["attempts"][1]["rewrite"]["pattern"], "^library/(.*)$");
    let q = explain(yaml, "quay.io/a/b", &[]);
    assert_eq!(q["attempts"][1]["repository"], "second/a/b");
    assert_eq!(
        q["attempts"][1]["url"],
        "https://cache.example.com/v2/second/a/b/manifests/latest?ns=quay.io"
    );
}

#[test]
fn last_endpoint_equal_to_default_is_not_tried_twice() {
    let yaml = "mirrors:\n  docker.io:\n    endpoint: [\"https://m.example.com\", \"https://registry-1.docker.io\"]\n";
    let plan = explain(yaml, "alpine", &[]);
    assert_eq!(
        summary(&plan)[1..],
        [
            s("mirror", "https://m.example.com/v2", "library/alpine"),
            s(
                "default",
                "https://registry-1.docker.io/v2",
                "library/alpine"
            ),
        ]
    );
}

#[test]
fn docker_hub_credentials_under_either_name() {
    for key in ["docker.io", "registry-1.docker.io"] {
        let yaml = format!("configs:\n  {key}:\n    auth: {{username: u, password: p}}\n");
        let plan = explain(&yaml, "alpine", &[]);
        assert_eq!(
            plan["attempts"][0]["auth"], "basic",
            "credentials under {key}"
        );
        assert_eq!(plan["attempts"][0]["config"], key);
    }
}

#[test]
fn wildcard_configs_apply_to_hosts_without_their_own() {
    let yaml = "mirrors:\n  ghcr.io:\n  quay.io:\n  \"*\":\n    endpoint: [\"https://cache.example.com\"]\nconfigs:\n  \"*\":\n    auth: {identity_token: tok}\n  quay.io:\n    tls: {insecure_skip_verify: true}\n";
    let g = explain(yaml, "ghcr.io/a/b", &[]);
    assert_eq!(g["attempts"][1]["auth"], "identity_token", "{g}");
    let q = explain(yaml, "quay.io/a/b", &[]);
    assert_eq!(q["attempts"][1]["auth"], "none");
    assert_eq!(q["attempts"][1]["tls"]["insecure_skip_verify"], true);
}

/// `configs."*".auth` goes only to hosts the file names: not to the default endpoint of
/// a registry reached through `mirrors."*"` (a client of `kagami serve` names it), but to
/// the endpoints listed under `"*"`.
#[test]
fn wildcard_credentials_are_not_sent_to_registries_the_file_does_not_name() {
    let yaml = "mirrors:\n  \"*\":\n    endpoint: [\"https://cache.example.com\"]\nconfigs:\n  \"*\":\n    auth: {username: u, password: p}\n";
    let p = explain(yaml, "evil.example.com/a/b", &[]);
    assert_eq!(p["attempts"][1]["endpoint"], "https://cache.example.com/v2");
    assert_eq!(p["attempts"][1]["auth"], "basic", "{p}");
    assert_eq!(p["attempts"][2]["endpoint"], "https://evil.example.com/v2");
    assert_eq!(p["attempts"][2]["auth"], "none", "{p}");
    // Nor without any mirrors entry.
    let yaml = "configs:\n  \"*\":\n    auth: {username: u, password: p}\n";
    let p = explain(yaml, "ghcr.io/a/b", &[]);
    assert_eq!(p["attempts"][0]["auth"], "none", "{p}");
}

#[test]
fn text_form_lists_attempts_in_order() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("r.yaml"),
        example("rewrite-harbor-project.yaml"),
    )
    .unwrap();
    let out = kagami()
        .current_dir(dir.path())
        .args(["explain", "-c", "r.yaml", "rancher/busybox:1.35"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    insta::assert_snapshot!("explain_text", text);
}

#[test]
fn invalid_image_is_a_clear_error() {
    let out = kagami()
        .args(["explain", "Docker.io/Alpine"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid image reference \"Docker.io/Alpine\""),
        "{err}"
    );
}

#[test]
fn config_with_errors_stops_explain() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("r.yaml"),
        "mirrors:\n  docker.io:\n    endpoints: [x]\n",
    )
    .unwrap();
    let out = kagami()
        .current_dir(dir.path())
        .args(["explain", "-c", "r.yaml", "alpine"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("r.yaml:3:5: error: unknown key \"endpoints\""),
        "{err}"
    );
    assert!(err.contains("kagami check --config r.yaml"), "{err}");
}
