//! `kagami explain IMAGE`: print the resolution plan.

use std::process::ExitCode;

use anyhow::Context as _;
use kagami_config::{Reference, plan};

use crate::Format;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    plan: super::PlanArgs,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
    /// Image reference, e.g. `alpine`, `quay.io/coreos/etcd:v3.5.0`, `repo@sha256:...`.
    image: String,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let (config, options) = args.plan.load()?;
    let image = Reference::parse(&args.image).context("cannot explain")?;
    let p = plan(&image, &config, options);
    match args.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&p.to_json())?),
        Format::Text => print!("{}", p.to_text()),
    }
    Ok(ExitCode::SUCCESS)
}
