//! `kagami purge`: asks the running `kagami serve` to remove images from its store (the
//! server does the work: one process owns the store), through its admin route with the
//! admin token that server wrote to its data directory, and prints what was removed.

use std::process::ExitCode;

use kagami_server::purge::{PURGE_PATH, PurgeReport, PurgeRequest};
use kagami_server::report::format::human_bytes;

use super::admin_client::AdminArgs;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Images to remove: registry/repository:tag or registry/repository@sha256:<hex>
    /// (Docker Hub short names work: nginx:1.27).
    #[arg(required = true, value_name = "IMAGE")]
    images: Vec<String>,
    #[command(flatten)]
    admin: AdminArgs,
    /// Print each report as JSON (one line per image) instead of the summary.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let admin = args.admin.connect(None)?;
    Ok(admin.for_each(&args.images, async |admin, image| {
        let req = PurgeRequest {
            image: image.clone(),
        };
        let doing = format!("purge {image}");
        let (report, raw): (PurgeReport, String) = admin
            .post(PURGE_PATH, &doing, "a purge report", &req)
            .await?;
        if args.json {
            println!("{}", raw.trim_end());
        } else {
            print!("{}", render(&report));
        }
        Ok(())
    }))
}

/// The human summary of one purge.
pub fn render(r: &PurgeReport) -> String {
    let mut out = format!(
        "purged {} ({}): {} blob{} removed ({}), {} kept for other images\n",
        r.image,
        r.digest,
        r.removed.len(),
        if r.removed.len() == 1 { "" } else { "s" },
        human_bytes(r.bytes),
        r.kept.len()
    );
    for t in &r.tags {
        out.push_str(&format!("  untagged {t}\n"));
    }
    for b in &r.removed {
        out.push_str(&format!(
            "  removed {} ({})\n",
            b.digest,
            human_bytes(b.bytes)
        ));
    }
    if r.withdrawn {
        out.push_str("  withdrawn from other nodes\n");
    }
    out
}
