//! `kagami check`: validate a registries.yaml and the policy file beside it.

use std::path::PathBuf;
use std::process::ExitCode;

use kagami_config::{Diagnostic, Severity, check_file, policy};

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
    /// The policy file to check too (see docs/policy.md). Default: policy.yaml next to
    /// --config, checked when it exists.
    #[arg(long, env = "KAGAMI_POLICY", value_name = "FILE")]
    policy: Option<PathBuf>,
    /// text: one line per problem on stderr; json: a report on stdout.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let report = check_file(&args.config);
    let config = FileResult {
        file: args.config.clone(),
        ok: report.config.is_some(),
        diagnostics: report.diagnostics,
    };
    let policy_file = args.policy.clone().or_else(|| {
        let dir = match args.config.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        Some(dir.join(policy::POLICY_FILE)).filter(|p| p.exists())
    });
    let policy = policy_file.map(|file| {
        let r = policy::check_file(&file);
        FileResult {
            file,
            ok: r.policy.is_some(),
            diagnostics: r.diagnostics,
        }
    });
    let ok = config.ok && policy.as_ref().is_none_or(|p| p.ok);
    match args.format {
        Format::Json => {
            let mut out = config.json();
            if let Some(p) = &policy {
                out["policy"] = p.json();
                out["ok"] = ok.into();
            }
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        Format::Text => {
            config.print();
            if let Some(p) = &policy {
                p.print();
            }
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// One file's outcome.
struct FileResult {
    file: PathBuf,
    ok: bool,
    diagnostics: Vec<Diagnostic>,
}

impl FileResult {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "file": self.file.display().to_string(),
            "ok": self.ok,
            "errors": count(&self.diagnostics, Severity::Error),
            "warnings": count(&self.diagnostics, Severity::Warning),
            "diagnostics": self.diagnostics,
        })
    }

    fn print(&self) {
        print_diagnostics(&self.diagnostics);
        let file = self.file.display();
        let errors = count(&self.diagnostics, Severity::Error);
        let warnings = count(&self.diagnostics, Severity::Warning);
        if self.ok {
            eprintln!("{file}: ok ({warnings} warning(s))");
        } else {
            eprintln!("{file}: {errors} error(s), {warnings} warning(s)");
        }
    }
}
