//! `kagami registries-conf`: write the registries.conf.d drop-in that sends the pulls of
//! containers/image clients (podman, buildah, skopeo, CRI-O) through kagami.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use kagami_config::Endpoint;
use kagami_config::containerd::HEADER;
use kagami_config::registries_conf::render;

use super::load_config;
use crate::ConfigArgs;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    config: ConfigArgs,
    /// kagami's endpoint as these clients reach it (e.g. http://127.0.0.1:5000; no path):
    /// the first mirror of every registry with a mirrors entry. Plain http is written
    /// `insecure = true`.
    #[arg(long, env = "KAGAMI_MIRROR", value_name = "URL")]
    mirror: String,
    /// The drop-in to write, e.g. /etc/containers/registries.conf.d/50-kagami.conf
    /// (replaced only if kagami wrote it). Without it, the file goes to stdout.
    #[arg(long, short = 'o', value_name = "FILE")]
    output: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let config = load_config(&args.config)?;
    let mirror = Endpoint::parse(&args.mirror).context("invalid --mirror")?;
    let text = render(&config, &mirror)?;
    let Some(out) = &args.output else {
        print!("{text}");
        return Ok(ExitCode::SUCCESS);
    };
    match std::fs::read_to_string(out) {
        Ok(old) if old.lines().next() != Some(HEADER) => anyhow::bail!(
            "{} exists and was not written by kagami (its first line is not {HEADER:?}); remove it or choose another --output",
            out.display()
        ),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", out.display())),
    }
    let name = out
        .file_name()
        .with_context(|| format!("{} names no file", out.display()))?;
    let tmp = out.with_file_name(format!(".{}.kagami-tmp", name.to_string_lossy()));
    std::fs::write(&tmp, &text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, out).with_context(|| format!("writing {}", out.display()))?;
    println!("wrote {}", out.display());
    Ok(ExitCode::SUCCESS)
}
