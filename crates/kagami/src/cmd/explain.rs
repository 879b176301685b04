//! `kagami explain IMAGE`: print the resolution plan.

use std::process::ExitCode;

use anyhow::Context as _;
use kagami_config::{PlanOptions, Reference, plan};

use super::load_config;
use crate::{ConfigArgs, Format};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    config: ConfigArgs,
    /// As K3s's flag: no default endpoint for registries that have a mirrors entry.
    #[arg(long, env = "KAGAMI_DISABLE_DEFAULT_REGISTRY_ENDPOINT")]
    disable_default_registry_endpoint: bool,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
    /// Image reference, e.g. `alpine`, `quay.io/coreos/etcd:v3.5.0`, `repo@sha256:...`.
    image: String,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let config = load_config(&args.config)?;
    let image = Reference::parse(&args.image).context("cannot explain")?;
    let p = plan(
        &image,
        &config,
        PlanOptions {
            disable_default_endpoint: args.disable_default_registry_endpoint,
        },
    );
    match args.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&p.to_json())?),
        Format::Text => print!("{}", p.to_text()),
    }
    Ok(ExitCode::SUCCESS)
}
