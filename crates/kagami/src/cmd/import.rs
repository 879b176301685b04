//! `kagami import`: asks the running `kagami serve` to load image tarballs (OCI layouts,
//! `ctr images export` / `skopeo ... oci-archive:` tars, `docker save` tars) into its store.
//! The server does the work (one process owns the store); this command posts each file's
//! absolute path to its admin route, with the admin token that server wrote to its data
//! directory, and prints what was imported.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use kagami_server::import::{IMPORT_PATH, ImportReport, ImportRequest};

use super::admin_client::AdminArgs;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Image archives or OCI layout directories, on this machine (the server reads them).
    #[arg(required = true, value_name = "FILE")]
    files: Vec<PathBuf>,
    /// Name (registry/repository[:tag]) for an image the archive does not name; with a
    /// single-image archive that names its image, an extra name.
    #[arg(long, value_name = "REF")]
    name: Option<String>,
    #[command(flatten)]
    admin: AdminArgs,
    /// Print each report as JSON (one line per file) instead of the summary.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let admin = args.admin.connect(None)?;
    Ok(admin.for_each(&args.files, async |admin, file| {
        let path = std::fs::canonicalize(file)
            .or_else(|_| std::path::absolute(file))
            .with_context(|| file.display().to_string())?;
        let req = ImportRequest {
            path: path.display().to_string(),
            name: args.name.clone(),
        };
        let doing = format!("import {}", req.path);
        let (report, raw): (ImportReport, String) = admin
            .post(IMPORT_PATH, &doing, "an import report", &req)
            .await?;
        if args.json {
            println!("{}", raw.trim_end());
        } else {
            print!("{}", render(&report));
        }
        Ok(())
    }))
}

/// The human summary of one import.
pub fn render(r: &ImportReport) -> String {
    let mut out = format!(
        "{} ({}): {} blob{} added ({}), {} already stored\n",
        r.path,
        r.format,
        r.blobs_added,
        if r.blobs_added == 1 { "" } else { "s" },
        kagami_server::report::format::human_bytes(r.bytes_added),
        r.blobs_skipped
    );
    for i in &r.images {
        let name = i.name.as_deref().unwrap_or("(no name)");
        out.push_str(&format!(
            "  imported {name} {}{}\n",
            i.digest,
            if i.shared {
                " (advertised to peers)"
            } else {
                ""
            }
        ));
    }
    for n in &r.notes {
        out.push_str(&format!("  note: {n}\n"));
    }
    out
}
