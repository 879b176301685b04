//! `kagami doctor`: does containerd on this node really pull through kagami?
//!
//! containerd takes any error from a mirror as "try the next host" and pulls around it
//! without a word. For every registry configured in containerd's hosts directory (and in
//! K3s's registries.yaml, when there is one), this command checks that containerd's first
//! host is this kagami and that kagami accepts a manifest request encoded exactly as
//! containerd encodes it (`?ns=` percent-encoded), with a probe that kagami answers without
//! asking any registry. Exit code 0 when every registry goes through kagami, 1 when one
//! bypasses it (or none is configured), 2 when the check itself failed.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use serde::Serialize;

use super::normalise_base;
use crate::Format;

/// Where K3s keeps containerd's hosts directory, then containerd's own default.
const HOSTS_DIRS: [&str; 2] = [
    "/var/lib/rancher/k3s/agent/etc/containerd/certs.d",
    "/etc/containerd/certs.d",
];
const K3S_REGISTRIES: &str = "/etc/rancher/k3s/registries.yaml";
/// The Accept header containerd 1.6 sends with a manifest request.
const CONTAINERD_ACCEPT: &str = "application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, */*";
/// The repository and tag of the probe (kagami answers a probe without asking anyone).
const PROBE_REPOSITORY: &str = "kagami-doctor/probe";
const PROBE_TAG: &str = "doctor";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// This node's kagami, as containerd's hosts.toml names it (its --listen address).
    #[arg(
        long,
        env = "KAGAMI_STATUS_ADDR",
        default_value = "http://127.0.0.1:5000",
        value_name = "URL"
    )]
    kagami: String,
    /// containerd's hosts directory (`config_path`). Default: K3s's
    /// (/var/lib/rancher/k3s/agent/etc/containerd/certs.d) when it exists, else
    /// /etc/containerd/certs.d.
    #[arg(long, value_name = "DIR")]
    hosts_dir: Option<PathBuf>,
    /// K3s's registries.yaml, from which K3s writes the hosts directory: each of its
    /// mirrors must list kagami as the first endpoint. Default:
    /// /etc/rancher/k3s/registries.yaml when it exists.
    #[arg(long, value_name = "FILE")]
    k3s_config: Option<PathBuf>,
    /// text for people, json for scripts.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

/// What was found for one registry.
#[derive(Debug, Serialize)]
struct Finding {
    registry: String,
    /// Where it was configured.
    source: String,
    /// containerd's first host for it.
    first_host: Option<String>,
    first_host_is_kagami: bool,
    /// The request sent, and what kagami answered.
    probe: Option<String>,
    answer: Option<String>,
    ok: bool,
    problem: Option<String>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let kagami = normalise_base(&args.kagami)
        .with_context(|| format!("--kagami {:?} is not an http(s) URL", args.kagami))?;
    let hosts_dir = match &args.hosts_dir {
        Some(d) => d.clone(),
        None => HOSTS_DIRS
            .iter()
            .map(PathBuf::from)
            .find(|d| d.is_dir())
            .unwrap_or_else(|| PathBuf::from(HOSTS_DIRS[1])),
    };
    let k3s = args.k3s_config.clone().or_else(|| {
        let p = PathBuf::from(K3S_REGISTRIES);
        p.is_file().then_some(p)
    });
    let mut findings = Vec::new();
    for (registry, file) in hosts_files(&hosts_dir)? {
        findings.push(check_hosts_file(&registry, &file, &kagami)?);
    }
    if let Some(k3s) = &k3s {
        findings.extend(check_k3s(k3s, &kagami, &findings)?);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(probe_all(&mut findings, &kagami))?;
    // No registry configured at all: containerd pulls every image around kagami.
    let bypass = findings.is_empty() || findings.iter().any(|f| !f.ok);
    match args.format {
        Format::Json => println!(
            "{}",
            serde_json::json!({"kagami": kagami, "hosts_dir": hosts_dir, "k3s_config": k3s, "registries": findings, "ok": !bypass})
        ),
        Format::Text => print!("{}", render(&kagami, &hosts_dir, &findings)),
    }
    Ok(if bypass {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// `(registry, hosts.toml)` for every registry directory, sorted.
fn hosts_files(dir: &Path) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    let mut out = Vec::new();
    for e in entries {
        let e = e.with_context(|| format!("reading {}", dir.display()))?;
        let file = e.path().join("hosts.toml");
        if file.is_file() {
            out.push((e.file_name().to_string_lossy().into_owned(), file));
        }
    }
    out.sort();
    Ok(out)
}

/// The URL containerd sends requests to for a `[host."..."]` key: `/v2` appended unless
/// the path already ends with it or `override_path` is set.
fn host_base(key: &str, override_path: bool) -> String {
    let key = key.trim_end_matches('/');
    if override_path || key.ends_with("/v2") {
        key.to_string()
    } else {
        format!("{key}/v2")
    }
}

fn origin_of(url: &str) -> Option<String> {
    normalise_base(url).ok()
}

fn check_hosts_file(registry: &str, file: &Path, kagami: &str) -> anyhow::Result<Finding> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let doc: toml_edit::DocumentMut = text
        .parse()
        .with_context(|| format!("{} is not valid TOML", file.display()))?;
    // `[host."URL"]` tables in file order: containerd tries them in that order, then
    // `server`.
    let first = doc
        .get("host")
        .and_then(|h| h.as_table())
        .and_then(|hosts| {
            hosts.iter().find_map(|(key, t)| {
                let override_path = t
                    .get("override_path")
                    .and_then(|v| v.as_bool())
                    .unwrap_or(false);
                (!key.is_empty()).then(|| host_base(key, override_path))
            })
        });
    let first = first.or_else(|| {
        doc.get("server")
            .and_then(|v| v.as_str())
            .map(|s| host_base(s, false))
    });
    let is_kagami = first
        .as_deref()
        .and_then(origin_of)
        .is_some_and(|o| o == kagami);
    let problem = match &first {
        None => Some("no host and no server: containerd pulls from the registry itself".into()),
        Some(h) if !is_kagami => Some(format!(
            "containerd's first host is {h}, not this kagami ({kagami})"
        )),
        _ => None,
    };
    Ok(Finding {
        registry: registry.to_string(),
        source: file.display().to_string(),
        first_host: first,
        first_host_is_kagami: is_kagami,
        probe: None,
        answer: None,
        ok: problem.is_none(),
        problem,
    })
}

/// K3s writes the hosts directory from its registries.yaml: a mirror whose first endpoint
/// is not kagami bypasses it, and one with no hosts.toml yet is reported too.
fn check_k3s(file: &Path, kagami: &str, found: &[Finding]) -> anyhow::Result<Vec<Finding>> {
    let (config, _) = kagami_config::Config::load(file).map_err(|e| {
        anyhow::anyhow!(
            "{}: {e}; run `kagami check --config {}`",
            file.display(),
            file.display()
        )
    })?;
    let mut out = Vec::new();
    for m in &config.mirrors {
        if m.registry == "*" {
            continue;
        }
        let first = m.endpoints.first().map(|e| e.to_string());
        let is_kagami = first
            .as_deref()
            .and_then(origin_of)
            .is_some_and(|o| o == kagami);
        let in_hosts_dir = found.iter().any(|f| f.registry == m.registry);
        let problem = if !is_kagami {
            Some(format!(
                "its first endpoint in {} is {}, not this kagami ({kagami})",
                file.display(),
                first.as_deref().unwrap_or("none")
            ))
        } else if !in_hosts_dir {
            Some("no hosts.toml for it in the hosts directory (restart K3s to write it)".into())
        } else {
            None
        };
        // A registry whose hosts.toml was checked already is probed once, there.
        if problem.is_none() {
            continue;
        }
        out.push(Finding {
            registry: m.registry.clone(),
            source: file.display().to_string(),
            first_host: first,
            first_host_is_kagami: is_kagami,
            probe: None,
            answer: None,
            ok: false,
            problem,
        });
    }
    Ok(out)
}

/// For every registry whose first host is kagami: a manifest HEAD as containerd sends it,
/// with the probe header.
async fn probe_all(findings: &mut [Finding], kagami: &str) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .no_proxy()
        .build()
        .context("building the HTTP client")?;
    for f in findings.iter_mut().filter(|f| f.first_host_is_kagami) {
        let base = f
            .first_host
            .clone()
            .unwrap_or_else(|| format!("{kagami}/v2"));
        let ns: String = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("ns", &f.registry)
            .finish();
        let url = format!("{base}/{PROBE_REPOSITORY}/manifests/{PROBE_TAG}?{ns}");
        f.probe = Some(format!("HEAD {url}"));
        let resp = client
            .head(&url)
            .header("Accept", CONTAINERD_ACCEPT)
            .header(kagami_server::refusals::PROBE_HEADER, "1")
            .send()
            .await;
        let (answer, problem) = match resp {
            Err(e) => (
                format!("no answer: {e}"),
                Some(format!(
                    "kagami does not answer at {base}: containerd moves on to the next host"
                )),
            ),
            Ok(r) => {
                let status = r.status().as_u16();
                let probe = r
                    .headers()
                    .get(kagami_server::refusals::PROBE_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let refused = r
                    .headers()
                    .get(kagami_server::refusals::HEADER)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                match (probe.as_deref(), refused) {
                    (Some("accepted"), _) => (format!("{status}, accepted"), None),
                    (_, Some(reason)) => (
                        format!("{status}, refused: {reason}"),
                        Some(format!(
                            "kagami refuses containerd's requests for {} ({reason}): containerd pulls around it",
                            f.registry
                        )),
                    ),
                    _ => (
                        format!("{status}"),
                        Some(format!(
                            "{base} answered {status} without kagami's probe header: not a kagami, or one older than this command"
                        )),
                    ),
                }
            }
        };
        f.answer = Some(answer);
        if problem.is_some() {
            f.ok = false;
            f.problem = problem;
        }
    }
    Ok(())
}

fn render(kagami: &str, hosts_dir: &Path, findings: &[Finding]) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "kagami {kagami}, containerd hosts directory {}",
        hosts_dir.display()
    );
    if findings.is_empty() {
        let _ = writeln!(
            o,
            "no registry is configured there: containerd pulls every image from the registry itself \
             (write the files with `kagami serve --containerd-hosts-dir` or `kagami containerd-config`)"
        );
        return o;
    }
    for f in findings {
        let _ = writeln!(
            o,
            "\n{} {}",
            if f.ok { "ok    " } else { "BYPASS" },
            f.registry
        );
        let _ = writeln!(o, "  configured in  {}", f.source);
        let _ = writeln!(
            o,
            "  first host     {}{}",
            f.first_host.as_deref().unwrap_or("none"),
            if f.first_host_is_kagami {
                " (this kagami)"
            } else {
                ""
            }
        );
        if let (Some(p), Some(a)) = (&f.probe, &f.answer) {
            let _ = writeln!(o, "  probe          {p}\n  answer         {a}");
        }
        if let Some(p) = &f.problem {
            let _ = writeln!(o, "  problem        {p}");
        }
    }
    let bad = findings.iter().filter(|f| !f.ok).count();
    let _ = writeln!(
        o,
        "\n{} of {} registries go through kagami",
        findings.len() - bad,
        findings.len()
    );
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_urls_as_containerd_reads_them() {
        assert_eq!(
            host_base("http://127.0.0.1:5000", false),
            "http://127.0.0.1:5000/v2"
        );
        assert_eq!(
            host_base("http://127.0.0.1:5000/v2", false),
            "http://127.0.0.1:5000/v2"
        );
        assert_eq!(host_base("https://h/v2/cache", true), "https://h/v2/cache");
        assert_eq!(
            normalise_base("127.0.0.1:5000").unwrap(),
            "http://127.0.0.1:5000"
        );
        assert_eq!(
            normalise_base("http://127.0.0.1:5000/v2/").unwrap(),
            "http://127.0.0.1:5000"
        );
        assert!(normalise_base("ftp://x").is_err());
    }
}
