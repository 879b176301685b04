//! One module per subcommand: each has an `Args` struct (what the user typed) and a
//! `run` function.

use std::path::Path;

use anyhow::Context as _;
use kagami_config::{Config, Diagnostic, LoadError, Severity};

use crate::ConfigArgs;

pub mod admin_client;
pub mod bundle;
pub mod check;
pub mod completions;
pub mod containerd_config;
pub mod demo;
pub mod doctor;
pub mod explain;
pub mod import;
pub mod node;
pub mod pull;
pub mod purge;
pub mod registries_conf;
pub mod serve;
pub mod status;
pub mod sync;
pub mod warm;

/// `--config` and `--disable-default-registry-endpoint`: what the commands that resolve
/// images (explain, pull, sync, bundle) plan with.
#[derive(Debug, Clone, clap::Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// As K3s's flag: no default endpoint for registries that have a mirrors entry.
    #[arg(long, env = "KAGAMI_DISABLE_DEFAULT_REGISTRY_ENDPOINT")]
    pub disable_default_registry_endpoint: bool,
}

impl PlanArgs {
    /// The configuration ([`load_config`]) and the plan options these flags give.
    pub fn load(&self) -> anyhow::Result<(Config, kagami_config::PlanOptions)> {
        Ok((
            load_config(&self.config)?,
            kagami_config::PlanOptions {
                disable_default_endpoint: self.disable_default_registry_endpoint,
            },
        ))
    }
}

/// `http://host:port` from what the user typed (`host:port`, a URL, with or without `/v2`).
pub(crate) fn normalise_base(s: &str) -> anyhow::Result<String> {
    let with_scheme = if s.contains("://") {
        s.to_string()
    } else {
        format!("http://{s}")
    };
    let url = url::Url::parse(&with_scheme)?;
    anyhow::ensure!(
        matches!(url.scheme(), "http" | "https"),
        "scheme {}",
        url.scheme()
    );
    let host = url.host_str().context("no host")?;
    Ok(match url.port() {
        Some(p) => format!("{}://{host}:{p}", url.scheme()),
        None => format!("{}://{host}", url.scheme()),
    })
}

/// Loads the configuration named by `--config`, or the embedded default. Warnings are
/// printed to stderr; errors stop the command.
pub fn load_config(args: &ConfigArgs) -> anyhow::Result<Config> {
    let Some(path) = &args.config else {
        return Ok(Config::embedded_default());
    };
    match Config::load(path) {
        Ok((config, diags)) => {
            print_diagnostics(&diags);
            Ok(config)
        }
        Err(LoadError::Invalid { errors, path }) => {
            print_diagnostics(&errors);
            anyhow::bail!(
                "{} has errors; run `kagami check --config {}` for details",
                path.display(),
                path.display()
            )
        }
        Err(e) => Err(e).with_context(|| format!("loading {}", Path::new(path).display())),
    }
}

pub fn print_diagnostics(diags: &[Diagnostic]) {
    for d in diags {
        eprintln!("{d}");
    }
}

pub fn count(diags: &[Diagnostic], sev: Severity) -> usize {
    diags.iter().filter(|d| d.severity == sev).count()
}
