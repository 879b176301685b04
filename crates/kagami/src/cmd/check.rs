//! `kagami check`: validate a registries.yaml.

use std::path::PathBuf;
use std::process::ExitCode;

use kagami_config::{Severity, check_file};

use super::{count, print_diagnostics};
use crate::Format;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// registries.yaml to check.
    #[arg(
        long,
        short = 'c',
        env = "KAGAMI_CONFIG",
        value_name = "FILE",
        default_value = "/etc/rancher/k3s/registries.yaml"
    )]
    config: PathBuf,
    /// text: one line per problem on stderr; json: a report on stdout.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let report = check_file(&args.config);
    let errors = count(&report.diagnostics, Severity::Error);
    let warnings = count(&report.diagnostics, Severity::Warning);
    match args.format {
        Format::Json => {
            let out = serde_json::json!({
                "file": args.config.display().to_string(),
                "ok": report.config.is_some(),
                "errors": errors,
                "warnings": warnings,
                "diagnostics": report.diagnostics,
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        Format::Text => {
            print_diagnostics(&report.diagnostics);
            let file = args.config.display();
            if report.config.is_some() {
                eprintln!("{file}: ok ({warnings} warning(s))");
            } else {
                eprintln!("{file}: {errors} error(s), {warnings} warning(s)");
            }
        }
    }
    Ok(if report.config.is_some() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
