//! Rendering a `registries.conf.d` drop-in (containers-registries.conf(5), version 2) that
//! sends the pulls of containers/image clients — podman, buildah, skopeo, CRI-O — through
//! kagami.
//!
//! For every registry with a `mirrors` entry it writes one `[[registry]]` table whose first
//! `[[registry.mirror]]` is kagami, addressed in kagami's path form
//! (`<kagami host:port>/<registry>`; a registry with a port is written `host_port`, because a
//! containers/image location cannot hold a colon inside a path component). The entry's own
//! endpoints follow as further mirrors, unless the entry has rewrite rules: containers/image
//! cannot apply regex rewrites, so such an endpoint would be asked for the unrewritten
//! repository; those endpoints are left out (kagami applies the rewrites itself) and named in
//! a comment. The registry itself is the table's `location`, which containers/image always
//! tries last: there is no equivalent of `--disable-default-registry-endpoint`.
//!
//! What cannot be expressed is written as a comment, never silently dropped: the `"*"`
//! entry (containers/image has no wildcard registry), registries the path form cannot name
//! (IPv6 literals, and names that are not recognisably a registry), endpoints whose path
//! does not start with `/v2/`, and TLS files and credentials (containers/image reads those
//! from `/etc/containers/certs.d/<host>/` and auth.json).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::config::{Config, Mirror};
use crate::containerd::{HEADER, quote};
use crate::endpoint::{DOCKER_HUB, DOCKER_HUB_HOST, Endpoint, split_host_port};

/// Why a drop-in cannot be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    #[error(
        "kagami's endpoint {0} has a path; containers/image mirrors address kagami as host[:port] (e.g. http://127.0.0.1:5000)"
    )]
    MirrorPath(String),
}

/// The first path component that names `registry` in kagami's path form, or None when the
/// registry cannot be written there: `host:port` becomes `host_port`; an IPv6 literal has no
/// form; a name kagami would not recognise as a registry (no dot, not `localhost`) would be
/// taken for a Docker Hub repository.
pub fn path_form(registry: &str) -> Option<String> {
    if registry.starts_with('[') {
        return None;
    }
    let (host, port) = split_host_port(registry);
    if !(host.contains('.') || host == "localhost") {
        return None;
    }
    Some(match port {
        Some(p) => format!("{host}_{p}"),
        None => host.to_string(),
    })
}

/// A containers/image `location` for an endpoint: `host[:port]` plus the namespace kagami's
/// override path adds after `/v2`, or None when the path does not start with `/v2`.
fn location(ep: &Endpoint) -> Option<String> {
    if !ep.override_path {
        return Some(ep.host.clone());
    }
    let rest = ep.path.strip_prefix("/v2/")?;
    Some(format!("{}/{}", ep.host, rest))
}

/// Renders the drop-in for `config`, with kagami at `mirror` (`http://host:port` or
/// `https://host:port`, no path).
pub fn render(config: &Config, mirror: &Endpoint) -> Result<String, RenderError> {
    if mirror.override_path {
        return Err(RenderError::MirrorPath(mirror.base()));
    }
    let mut s = String::new();
    let _ = writeln!(s, "{HEADER}");
    let _ = writeln!(
        s,
        "# containers-registries.conf(5) version 2 drop-in: pulls go through kagami at {}.",
        mirror.origin()
    );
    let entries: BTreeMap<&str, &Mirror> = config
        .mirrors
        .iter()
        .map(|m| (m.registry.as_str(), m))
        .collect();
    for (registry, m) in entries {
        if registry == "*" {
            let _ = writeln!(
                s,
                "\n# \"*\": containers/image has no wildcard registry, so registries without a mirrors\n# entry of their own are pulled directly. Give each such registry a mirrors entry\n# (an empty one is enough) to pull it through kagami."
            );
            continue;
        }
        let Some(form) = path_form(registry) else {
            let _ = writeln!(
                s,
                "\n# {registry}: not mirrored; kagami's path form cannot name this registry (an IPv6\n# literal, or a name without a dot other than localhost)."
            );
            continue;
        };
        render_registry(&mut s, config, mirror, m, &form);
    }
    Ok(s)
}

fn render_registry(s: &mut String, config: &Config, mirror: &Endpoint, m: &Mirror, form: &str) {
    let registry = m.registry.as_str();
    let default = Endpoint::default_for(registry);
    let is_default = |ep: &Endpoint| {
        !ep.override_path
            && (ep.host == registry || (registry == DOCKER_HUB && ep.host == DOCKER_HUB_HOST))
    };
    // The registry itself is `location`; plain http (a loopback registry with a port, or an
    // endpoint naming the registry over http) or skip-verify makes it insecure.
    let own_insecure = default.scheme == "http"
        || m.endpoints
            .iter()
            .any(|ep| is_default(ep) && ep.scheme == "http")
        || insecure_tls(config, &default.host);
    let _ = writeln!(s, "\n[[registry]]");
    let _ = writeln!(s, "prefix = {}", quote(registry));
    let _ = writeln!(s, "location = {}", quote(registry));
    if own_insecure {
        let _ = writeln!(s, "insecure = true");
    }
    let _ = writeln!(s, "\n[[registry.mirror]]");
    let _ = writeln!(
        s,
        "location = {}",
        quote(&format!("{}/{form}", mirror.host))
    );
    if mirror.scheme == "http" {
        let _ = writeln!(s, "insecure = true");
    }
    let others: Vec<&Endpoint> = m.endpoints.iter().filter(|ep| !is_default(ep)).collect();
    if !m.rewrites.is_empty() {
        if !others.is_empty() {
            let names: Vec<String> = others.iter().map(|ep| ep.base()).collect();
            let _ = writeln!(
                s,
                "# Not listed: {} (rewrite rules apply; containers/image cannot apply them,\n# kagami does).",
                names.join(", ")
            );
        }
        return;
    }
    for ep in others {
        let Some(loc) = location(ep) else {
            let _ = writeln!(
                s,
                "# Not listed: {} (containers/image always puts /v2 first in the path).",
                ep.base()
            );
            continue;
        };
        let _ = writeln!(s, "\n[[registry.mirror]]");
        let _ = writeln!(s, "location = {}", quote(&loc));
        if ep.scheme == "http" || insecure_tls(config, &ep.host) {
            let _ = writeln!(s, "insecure = true");
        }
        if let Some(c) = config.config_for_host(&ep.host) {
            let files = c
                .tls
                .as_ref()
                .is_some_and(|t| t.ca_file.is_some() || t.client.is_some());
            if files {
                let _ = writeln!(
                    s,
                    "# TLS files for {0}: containers/image reads ca.crt, client.cert and client.key\n# from /etc/containers/certs.d/{0}/.",
                    ep.host
                );
            }
            if c.auth.is_some() {
                let _ = writeln!(
                    s,
                    "# Credentials for {}: containers/image reads them from auth.json (podman login).",
                    ep.host
                );
            }
        }
    }
}

fn insecure_tls(config: &Config, host: &str) -> bool {
    config
        .config_for_host(host)
        .and_then(|c| c.tls.as_ref())
        .is_some_and(|t| t.insecure_skip_verify)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(yaml: &str) -> Config {
        let report = crate::check_str(yaml, Path::new("registries.yaml"));
        let errors: Vec<_> = report.errors().collect();
        assert!(errors.is_empty(), "{errors:?}");
        report.config.unwrap()
    }

    fn kagami() -> Endpoint {
        Endpoint::parse("http://127.0.0.1:5000").unwrap()
    }

    /// Every rendered file must be valid TOML with the v2 schema's shape.
    fn check_toml(text: &str) -> toml_edit::DocumentMut {
        let doc: toml_edit::DocumentMut = text.parse().unwrap_or_else(|e| panic!("{e}\n{text}"));
        if let Some(regs) = doc.get("registry") {
            for r in regs.as_array_of_tables().unwrap() {
                assert!(r["prefix"].as_str().is_some());
                assert!(r["location"].as_str().is_some());
                for m in r["mirror"].as_array_of_tables().unwrap() {
                    assert!(m["location"].as_str().is_some());
                }
            }
        }
        doc
    }

    /// The `[[registry.mirror]]` tables of the first `[[registry]]`.
    fn first_mirrors(doc: &toml_edit::DocumentMut) -> &toml_edit::ArrayOfTables {
        doc["registry"]
            .as_array_of_tables()
            .unwrap()
            .get(0)
            .unwrap()["mirror"]
            .as_array_of_tables()
            .unwrap()
    }

    #[test]
    fn every_name_form() {
        let yaml = r#"
mirrors:
  docker.io:
    endpoint: ["https://mirror.example.com", "https://registry-1.docker.io"]
  "127.0.0.1:5001":
    endpoint: ["http://127.0.0.1:5001"]
  registry.example.test:
    endpoint: ["http://127.0.0.1:5002"]
    rewrite:
      "^team/(.*)$": "production/$1"
  quay.io:
  "localhost:5003":
  "[::1]:5004":
  "*":
"#;
        let text = render(&config(yaml), &kagami()).unwrap();
        check_toml(&text);
        insta::assert_snapshot!("registries_conf_every_name_form", text);
    }

    #[test]
    fn endpoints_paths_tls_and_auth() {
        let yaml = r#"
mirrors:
  docker.io:
    endpoint:
      - "https://mirror1.example.com:5000"
      - "mirror2.example.com/v2/dockerhub"
      - "https://mirror3.example.com/cache"
configs:
  "mirror2.example.com":
    tls:
      insecure_skip_verify: true
    auth:
      username: u
      password: p
"#;
        let text = render(&config(yaml), &kagami()).unwrap();
        let doc = check_toml(&text);
        let mirrors = first_mirrors(&doc)
            .iter()
            .map(|m| {
                (
                    m["location"].as_str().unwrap().to_string(),
                    m.get("insecure").and_then(|i| i.as_bool()).unwrap_or(false),
                )
            })
            .collect::<Vec<_>>();
        assert_eq!(
            mirrors,
            [
                ("127.0.0.1:5000/docker.io".to_string(), true),
                ("mirror1.example.com:5000".to_string(), false),
                ("mirror2.example.com/dockerhub".to_string(), true),
            ]
        );
        // Secrets never go into the drop-in.
        assert!(
            !text.contains("password") && !text.contains("\"p\""),
            "{text}"
        );
        insta::assert_snapshot!("registries_conf_endpoints_paths_tls_and_auth", text);
    }

    #[test]
    fn https_kagami_and_a_path_refused() {
        let c = config("mirrors:\n  quay.io:\n");
        let text = render(&c, &Endpoint::parse("https://kagami.local:5443").unwrap()).unwrap();
        let doc = check_toml(&text);
        let m = first_mirrors(&doc).get(0).unwrap();
        assert_eq!(m["location"].as_str(), Some("kagami.local:5443/quay.io"));
        assert!(m.get("insecure").is_none());
        let e = render(&c, &Endpoint::parse("http://127.0.0.1:5000/v2/x").unwrap()).unwrap_err();
        assert!(e.to_string().contains("has a path"), "{e}");
    }

    #[test]
    fn path_forms_match_what_kagami_parses() {
        for (registry, form) in [
            ("docker.io", Some("docker.io")),
            ("127.0.0.1:5000", Some("127.0.0.1_5000")),
            ("localhost:5000", Some("localhost_5000")),
            ("localhost", Some("localhost")),
            ("registry.local:443", Some("registry.local_443")),
            ("[::1]:5000", None),
            ("myregistry:5000", None),
            ("myregistry", None),
        ] {
            assert_eq!(path_form(registry).as_deref(), form, "{registry}");
        }
    }
}
