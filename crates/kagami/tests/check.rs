//! `kagami check`: every mistake docs/configuration.md lists, with the right message at the
//! right line (snapshots), and the exit codes.

use std::path::Path;

use crate::support::{kagami, pki};

/// Writes `yaml` as registries.yaml in a fresh directory (with test certificates under
/// certs/), runs `kagami check` there and returns (exit code, stderr).
fn check_in(dir: &Path, yaml: &str, json: bool) -> (i32, String, String) {
    std::fs::write(dir.join("registries.yaml"), yaml).unwrap();
    let mut cmd = kagami();
    cmd.current_dir(dir)
        .args(["check", "--config", "registries.yaml"]);
    if json {
        cmd.args(["--format", "json"]);
    }
    let out = cmd.output().unwrap();
    let dir_text = dir.display().to_string();
    let clean = |b: Vec<u8>| String::from_utf8(b).unwrap().replace(&dir_text, "<dir>");
    (
        out.status.code().unwrap(),
        clean(out.stdout),
        clean(out.stderr),
    )
}

fn check(yaml: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    pki::generate(&dir.path().join("certs"));
    let (code, _, stderr) = check_in(dir.path(), yaml, false);
    (code, stderr)
}

fn assert_error(name: &str, yaml: &str) {
    let (code, stderr) = check(yaml);
    assert_eq!(code, 1, "expected errors for {name}:\n{stderr}");
    insta::assert_snapshot!(name, stderr);
}

fn assert_warning(name: &str, yaml: &str) {
    let (code, stderr) = check(yaml);
    assert_eq!(code, 0, "expected only warnings for {name}:\n{stderr}");
    assert!(stderr.contains("warning:"), "{stderr}");
    insta::assert_snapshot!(name, stderr);
}

#[test]
fn valid_file_exits_zero_and_says_ok() {
    let (code, stderr) = check(
        "mirrors:\n  docker.io:\n    endpoint: [\"https://harbor.example.com\"]\n    rewrite:\n      \"^rancher/(.*)\": \"production/$1\"\n",
    );
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stderr.trim(), "registries.yaml: ok (0 warning(s))");
}

#[test]
fn empty_file_is_valid() {
    let (code, stderr) = check("");
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn missing_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = kagami()
        .current_dir(dir.path())
        .args(["check", "--config", "nope.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("nope.yaml") && stderr.contains("cannot read file"),
        "{stderr}"
    );
}

#[test]
fn syntax_error_unquoted_star() {
    assert_error(
        "syntax_unquoted_star",
        "mirrors:\n  docker.io:\n    endpoint: [\"https://a.example.com\"]\n  *:\n    endpoint: [\"https://b.example.com\"]\n",
    );
}

#[test]
fn unknown_key_endpoints() {
    assert_error(
        "unknown_key_endpoints",
        "mirrors:\n  docker.io:\n    endpoints:\n      - https://mirror.example.com\n",
    );
}

#[test]
fn unknown_key_auth_token() {
    assert_error(
        "unknown_key_auth_token",
        "configs:\n  registry.example.com:\n    auth:\n      token: abc\n",
    );
}

#[test]
fn unknown_top_level_key() {
    assert_error(
        "unknown_top_level_key",
        "mirror:\n  docker.io:\n    endpoint: [\"https://m.example.com\"]\n",
    );
}

#[test]
fn invalid_registry_names() {
    assert_error(
        "invalid_registry_names",
        "mirrors:\n  https://docker.io:\n    endpoint: [\"https://m.example.com\"]\n  docker.io/library:\n    endpoint: [\"https://m.example.com\"]\n  \"bad_host\":\n",
    );
}

#[test]
fn invalid_and_duplicate_endpoints() {
    assert_error(
        "invalid_endpoints",
        "mirrors:\n  docker.io:\n    endpoint:\n      - \"ftp://mirror.example.com\"\n      - \"https://user:pw@mirror.example.com\"\n      - \"https://mirror.example.com:99999\"\n      - \"mirror.example.com\"\n      - \"https://mirror.example.com/v2\"\n      - \"\"\n",
    );
}

#[test]
fn endpoint_as_a_string() {
    assert_error(
        "endpoint_as_a_string",
        "mirrors:\n  docker.io:\n    endpoint: https://mirror.example.com\n",
    );
}

#[test]
fn regex_does_not_compile() {
    assert_error(
        "regex_does_not_compile",
        "mirrors:\n  docker.io:\n    endpoint: [\"https://m.example.com\"]\n    rewrite:\n      \"^rancher/(.*\": \"production/$1\"\n",
    );
}

#[test]
fn replacement_names_missing_group() {
    // The K3s mistake from the wild: $1 with no capture group in the pattern.
    assert_error(
        "replacement_missing_group",
        "mirrors:\n  artifactory.example.com:\n    endpoint: [\"https://artifactory.example.com\"]\n    rewrite:\n      \"^cp/se-data-center-edge/.+$\": \"se-next-gen-docker-local/$1\"\n",
    );
}

#[test]
fn replacement_ambiguous_group_name() {
    assert_error(
        "replacement_ambiguous_group",
        "mirrors:\n  docker.io:\n    endpoint: [\"https://m.example.com\"]\n    rewrite:\n      \"^(.*)$\": \"mirror/$1x\"\n",
    );
}

#[test]
fn certificate_files_missing() {
    assert_error(
        "certificate_files_missing",
        "configs:\n  m.example.com:\n    tls:\n      ca_file: /nonexistent/ca.pem\n      cert_file: /nonexistent/client.pem\n      key_file: /nonexistent/client-key.pem\n",
    );
}

#[test]
fn certificate_and_key_mismatch() {
    assert_error(
        "certificate_key_mismatch",
        "configs:\n  m.example.com:\n    tls:\n      cert_file: certs/client.pem\n      key_file: certs/other-key.pem\n",
    );
}

#[test]
fn certificate_without_key() {
    assert_error(
        "certificate_without_key",
        "configs:\n  m.example.com:\n    tls:\n      cert_file: certs/client.pem\n",
    );
}

#[test]
fn ca_file_is_not_a_certificate() {
    assert_error(
        "ca_file_not_a_certificate",
        "configs:\n  m.example.com:\n    tls:\n      ca_file: certs/client-key.pem\n",
    );
}

#[test]
fn configs_keys_must_be_bare_hosts() {
    assert_error(
        "configs_keys_not_bare",
        "configs:\n  \"https://harbor.example.com\":\n    auth: {username: u, password: p}\n  \"harbor.example.com/v2\":\n    auth: {username: u, password: p}\n",
    );
}

#[test]
fn auth_not_base64() {
    assert_error(
        "auth_not_base64",
        "configs:\n  m.example.com:\n    auth:\n      auth: \"not base64!\"\n",
    );
}

#[test]
fn duplicate_keys() {
    assert_error(
        "duplicate_keys",
        "mirrors:\n  docker.io:\n    endpoint: [\"https://a.example.com\"]\n  docker.io:\n    endpoint: [\"https://b.example.com\"]\n",
    );
}

#[test]
fn where_k3s_differs() {
    assert_warning(
        "k3s_differences",
        "mirrors:\n  docker.io:\n    endpoint: [\"https://m.example.com\"]\n    rewrite:\n      \"^rancher/(.*)\": \"a/$1\"\n      \"^library/(\\\\w+)$\": \"b/$1\"\n  quay.io:\n    rewrite:\n      \"^(.*)$\": \"q/$1\"\nconfigs:\n  docker.io:\n    auth: {username: u, password: p}\n  \"*\":\n    auth: {username: u, password: p}\n  m.example.com:\n    tls:\n      insecure_skip_verify: \"true\"\n",
    );
}

#[test]
fn yaml11_booleans_are_accepted() {
    let (code, stderr) =
        check("configs:\n  m.example.com:\n    tls:\n      insecure_skip_verify: yes\n");
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn json_report_lists_every_diagnostic() {
    let dir = tempfile::tempdir().unwrap();
    let (code, stdout, _) = check_in(
        dir.path(),
        "mirrors:\n  docker.io:\n    endpoints: [a]\n    rewrite:\n      \"^x/.+$\": \"y/$1\"\n",
        true,
    );
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(v["errors"], 2);
    let d = &v["diagnostics"][0];
    assert_eq!(d["line"], 3);
    assert_eq!(d["column"], 5);
    assert_eq!(d["key"], "mirrors.\"docker.io\".endpoints");
    assert_eq!(d["severity"], "error");
    assert_eq!(v["diagnostics"][1]["line"], 5);
}

#[test]
fn every_example_checks() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let mut n = 0;
    for entry in std::fs::read_dir(&examples).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let dir = tempfile::tempdir().unwrap();
        pki::generate(&dir.path().join("certs"));
        let (code, _, stderr) =
            check_in(dir.path(), &std::fs::read_to_string(&path).unwrap(), false);
        assert_eq!(code, 0, "{}:\n{stderr}", path.display());
        n += 1;
    }
    assert!(n >= 4, "examples/ should hold the seed configurations");
}
