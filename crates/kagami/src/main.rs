//! The `kagami` binary: a thin CLI over the library crates.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

mod cmd;

/// kagami (鏡, "mirror"): a node-local OCI registry mirror for Kubernetes and K3s.
///
/// kagami reads a K3s-style registries.yaml (mirrors with ordered endpoints, rewrites of
/// repository names, per-host auth and TLS) and checks it, explains where each pull
/// goes, writes containerd's hosts.toml files, and pulls and copies images.
#[derive(Debug, Parser)]
#[command(
    name = "kagami",
    version,
    propagate_version = true,
    max_term_width = 100
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Output formats for commands that report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// The registries.yaml every command reads.
#[derive(Debug, Clone, clap::Args)]
pub struct ConfigArgs {
    /// registries.yaml to read (K3s format). Without it, kagami uses its embedded
    /// default, which mirrors the well-known public registries (docker.io, ghcr.io,
    /// quay.io, registry.k8s.io, ...) from their default endpoints.
    #[arg(long, short = 'c', env = "KAGAMI_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check a registries.yaml and report every problem with file, line, column and key.
    ///
    /// Exits 0 when the file is usable (warnings go to stderr), 1 when it has errors.
    Check(cmd::check::Args),
    /// Print the ordered list of places a pull of IMAGE goes to: peers, mirror endpoints
    /// (with rewrites, auth and TLS) and the default endpoint.
    Explain(cmd::explain::Args),
    /// Write containerd's certs.d/<registry>/hosts.toml files for a registries.yaml.
    ContainerdConfig(cmd::containerd_config::Args),
    /// Write the registries.conf.d drop-in (containers-registries.conf v2) that sends the
    /// pulls of podman, buildah, skopeo and CRI-O through kagami.
    RegistriesConf(cmd::registries_conf::Args),
    /// Fetch IMAGE through the resolution plan (mirrors, rewrites, auth, TLS, fallback)
    /// into an OCI image layout directory.
    Pull(cmd::pull::Args),
    /// Copy the images listed in a file (every platform) into another registry.
    Sync(cmd::sync::Args),
    /// Run the mirror: the OCI distribution pull API containerd talks to, with a
    /// content store, one upstream fetch per blob, tag revalidation and metrics.
    Serve(Box<cmd::serve::Args>),
    /// Check that containerd on this node pulls through kagami: for every registry in
    /// containerd's hosts directory (and K3s's registries.yaml), whether the first host is
    /// this kagami and whether kagami accepts a request encoded as containerd encodes it.
    ///
    /// Exits 0 when every registry goes through kagami, 1 when one bypasses it (or none is
    /// configured).
    Doctor(cmd::doctor::Args),
    /// Ask a running `kagami serve` for its status (node, members, store, hit ratio, bytes
    /// by source, recent pulls, endpoint health) and print a summary.
    Status(cmd::status::Args),
    /// Load image tarballs (docker save, ctr images export, OCI archives or layouts) into a
    /// running `kagami serve`, which then serves them and shares them with other nodes.
    Import(cmd::import::Args),
    /// Warm images on this node: ask the running `kagami serve` to fetch them ahead of
    /// need (through the other nodes, else upstream) and follow the progress.
    Warm(cmd::warm::Args),
    /// Remove images from a running `kagami serve` on this node (tag, manifests and the
    /// blobs no other stored image uses) and withdraw them from the cluster; refused for an
    /// image the policy file pins.
    Purge(cmd::purge::Args),
    /// Write an air-gap bundle: one archive with the kagami image, the deployment files
    /// and the listed images (an OCI archive that `kagami import`, `ctr images import` and
    /// K3s's agent/images folder accept), pulled through the resolution plan.
    Bundle(cmd::bundle::Args),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) to stdout.
    Completions(cmd::completions::CompletionsArgs),
    /// Print kagami's man page (roff) to stdout, or write one page per command with --output.
    Man(cmd::completions::ManArgs),
    /// Start an upstream registry and kagami nodes (three by default) in this process, pull
    /// a generated image on each node, and show that the upstream sent each blob once.
    Demo(cmd::demo::Args),
}

fn main() -> ExitCode {
    // reqwest is built without a TLS provider of its own: ring serves every client.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check(a) => cmd::check::run(a),
        Command::Explain(a) => cmd::explain::run(a),
        Command::ContainerdConfig(a) => cmd::containerd_config::run(a),
        Command::RegistriesConf(a) => cmd::registries_conf::run(a),
        Command::Pull(a) => cmd::pull::run(a),
        Command::Sync(a) => cmd::sync::run(a),
        Command::Serve(a) => cmd::serve::run(*a),
        Command::Status(a) => cmd::status::run(a),
        Command::Doctor(a) => cmd::doctor::run(a),
        Command::Import(a) => cmd::import::run(a),
        Command::Warm(a) => cmd::warm::run(a),
        Command::Purge(a) => cmd::purge::run(a),
        Command::Bundle(a) => cmd::bundle::run(a),
        Command::Completions(a) => cmd::completions::run(a),
        Command::Man(a) => cmd::completions::man(a),
        Command::Demo(a) => cmd::demo::run(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kagami: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
