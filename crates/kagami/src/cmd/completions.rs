//! `kagami completions` and `kagami man`: shell completion scripts and man pages, both
//! generated from the clap tree so they never drift from the real flags.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::CommandFactory as _;
use clap_complete::Shell;

#[derive(Debug, clap::Args)]
pub struct CompletionsArgs {
    /// The shell to write a completion script for.
    #[arg(value_enum)]
    shell: Shell,
}

#[derive(Debug, clap::Args)]
pub struct ManArgs {
    /// Write one page per command (kagami.1, kagami-serve.1, ...) into DIR instead of
    /// printing the page of `kagami` itself to stdout.
    #[arg(long, short = 'o', value_name = "DIR")]
    output: Option<PathBuf>,
}

/// Prints the completion script for a shell to stdout.
///
/// bash: `kagami completions bash > /etc/bash_completion.d/kagami`;
/// zsh: into a directory on `$fpath` as `_kagami`;
/// fish: `~/.config/fish/completions/kagami.fish`.
pub fn run(args: CompletionsArgs) -> anyhow::Result<ExitCode> {
    let mut cmd = crate::Cli::command();
    let mut out = std::io::stdout().lock();
    clap_complete::generate(args.shell, &mut cmd, "kagami", &mut out);
    out.flush().context("writing the completion script")?;
    Ok(ExitCode::SUCCESS)
}

/// Prints the man page of `kagami` (roff) to stdout, or writes every command's page into
/// a directory.
pub fn man(args: ManArgs) -> anyhow::Result<ExitCode> {
    let cmd = crate::Cli::command();
    match args.output {
        Some(dir) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            clap_mangen::generate_to(cmd, &dir)
                .with_context(|| format!("writing man pages into {}", dir.display()))?;
        }
        None => {
            let mut out = std::io::stdout().lock();
            clap_mangen::Man::new(cmd)
                .render(&mut out)
                .context("writing the man page")?;
            out.flush().context("writing the man page")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
