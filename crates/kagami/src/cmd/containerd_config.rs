//! `kagami containerd-config`: write containerd's hosts.toml files.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use kagami_config::Endpoint;
use kagami_config::containerd::{RenderOptions, render, render_auth_stanza, write_hosts_dir};

use super::load_config;
use crate::ConfigArgs;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    config: ConfigArgs,
    /// containerd's hosts directory (`config_path`), e.g. /etc/containerd/certs.d.
    #[arg(long, env = "KAGAMI_CONTAINERD_HOSTS_DIR", value_name = "DIR")]
    hosts_dir: PathBuf,
    /// kagami's own endpoint (e.g. http://127.0.0.1:5000): written first for every
    /// registry kagami serves, before the direct endpoints and the server, so that a node
    /// whose kagami is down still pulls. Without it, the files are what K3s would write.
    #[arg(long, env = "KAGAMI_MIRROR", value_name = "URL")]
    mirror: Option<String>,
    /// As K3s's flag: no `server` line for registries that have a mirrors entry.
    #[arg(long, env = "KAGAMI_DISABLE_DEFAULT_REGISTRY_ENDPOINT")]
    disable_default_registry_endpoint: bool,
    /// Also write the config.toml auth stanza (containerd reads credentials there).
    #[arg(long, value_name = "FILE")]
    containerd_config_out: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let config = load_config(&args.config)?;
    let mirror = args
        .mirror
        .as_deref()
        .map(Endpoint::parse)
        .transpose()
        .context("invalid --mirror")?;
    let files = render(
        &config,
        &RenderOptions {
            mirror,
            disable_default_endpoint: args.disable_default_registry_endpoint,
        },
    );
    let report = write_hosts_dir(&args.hosts_dir, &files).with_context(|| {
        format!(
            "writing hosts.toml files under {}",
            args.hosts_dir.display()
        )
    })?;
    for p in &report.written {
        println!("wrote {}", p.display());
    }
    for p in &report.removed {
        println!(
            "removed {} (written by kagami earlier, no longer configured)",
            p.display()
        );
    }
    for p in &report.skipped {
        eprintln!(
            "kagami: warning: left {} alone: its hosts.toml was not written by kagami; remove it to let kagami manage this registry",
            p.display()
        );
    }
    if let Some(out) = &args.containerd_config_out {
        std::fs::write(out, render_auth_stanza(&config))
            .with_context(|| format!("writing {}", out.display()))?;
        println!("wrote {}", out.display());
    }
    Ok(ExitCode::SUCCESS)
}
