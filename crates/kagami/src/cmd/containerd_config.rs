//! `kagami containerd-config`: write containerd's hosts.toml files.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use kagami_config::Endpoint;
use kagami_config::containerd::{
    RenderOptions, render, render_auth_stanza, render_legacy_stanza, write_hosts_dir,
};

use super::load_config;
use crate::ConfigArgs;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    config: ConfigArgs,
    /// containerd's hosts directory (`config_path`), e.g. /etc/containerd/certs.d.
    /// Optional with --containerd-config-out (a containerd without `config_path`).
    #[arg(
        long,
        env = "KAGAMI_CONTAINERD_HOSTS_DIR",
        value_name = "DIR",
        required_unless_present = "containerd_config_out"
    )]
    hosts_dir: Option<PathBuf>,
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
    /// Add the legacy `registry.mirrors` tables (and `configs.<host>.tls`) to
    /// --containerd-config-out, for a containerd whose `config_path` is empty (before 1.5,
    /// or older K3s). containerd 1.5+ refuses them when `config_path` is set.
    #[arg(long, requires = "containerd_config_out")]
    legacy_mirrors: bool,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let config = load_config(&args.config)?;
    let mirror = args
        .mirror
        .as_deref()
        .map(Endpoint::parse)
        .transpose()
        .context("invalid --mirror")?;
    let options = RenderOptions {
        mirror,
        disable_default_endpoint: args.disable_default_registry_endpoint,
    };
    if let Some(hosts_dir) = &args.hosts_dir {
        write_hosts(&config, &options, hosts_dir)?;
    }
    if let Some(out) = &args.containerd_config_out {
        let mut text = render_auth_stanza(&config);
        if args.legacy_mirrors {
            if args.disable_default_registry_endpoint {
                eprintln!(
                    "kagami: warning: --disable-default-registry-endpoint does not apply to the legacy mirrors: containerd always adds each registry's default endpoint after them"
                );
            }
            text.push_str(&render_legacy_stanza(&config, &options));
        }
        std::fs::write(out, text).with_context(|| format!("writing {}", out.display()))?;
        println!("wrote {}", out.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn write_hosts(
    config: &kagami_config::Config,
    options: &RenderOptions,
    hosts_dir: &std::path::Path,
) -> anyhow::Result<()> {
    let files = render(config, options);
    let report = write_hosts_dir(hosts_dir, &files)
        .with_context(|| format!("writing hosts.toml files under {}", hosts_dir.display()))?;
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
    Ok(())
}
