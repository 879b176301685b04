//! `kagami purge`: asks the running `kagami serve` to remove images from its store (the
//! server does the work: one process owns the store), through its admin route with the
//! admin token that server wrote to its data directory, and prints what was removed.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use kagami_server::admin::{ADMIN_TOKEN_FILE, read_token};
use kagami_server::purge::{PURGE_PATH, PurgeReport, PurgeRequest};
use kagami_server::report::format::human_bytes;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Images to remove: registry/repository:tag or registry/repository@sha256:<hex>
    /// (Docker Hub short names work: nginx:1.27).
    #[arg(required = true, value_name = "IMAGE")]
    images: Vec<String>,
    /// The kagami to purge: its --listen address, as http://host:port or host:port.
    #[arg(
        long,
        env = "KAGAMI_ADDR",
        default_value = "http://127.0.0.1:5000",
        value_name = "URL"
    )]
    addr: String,
    /// The data directory of that kagami (its --data-dir): the admin token is read from
    /// admin.token there, a file only root can read.
    #[arg(
        long,
        env = "KAGAMI_DATA_DIR",
        default_value = "/var/lib/kagami",
        value_name = "DIR"
    )]
    data_dir: PathBuf,
    /// The admin token file to use instead of <data-dir>/admin.token.
    #[arg(long, env = "KAGAMI_ADMIN_TOKEN_FILE", value_name = "FILE")]
    admin_token_file: Option<PathBuf>,
    /// Print each report as JSON (one line per image) instead of the summary.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let base = super::normalise_base(&args.addr)
        .with_context(|| format!("--addr {:?} is not an http(s) address", args.addr))?;
    let url = format!("{base}{PURGE_PATH}");
    let token_file = args
        .admin_token_file
        .clone()
        .unwrap_or_else(|| args.data_dir.join(ADMIN_TOKEN_FILE));
    let token = read_token(&token_file).with_context(|| {
        format!(
            "reading the admin token {} (written by `kagami serve` at start, readable by root only; run as root, or give the server's --data-dir or --admin-token-file)",
            token_file.display()
        )
    })?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .no_proxy()
        .build()
        .context("building the HTTP client")?;
    let mut failed = 0;
    for image in &args.images {
        let req = PurgeRequest {
            image: image.clone(),
        };
        match rt.block_on(post(&client, &url, &token, &req)) {
            Ok((report, raw)) => {
                if args.json {
                    println!("{}", raw.trim_end());
                } else {
                    print!("{}", render(&report));
                }
            }
            Err(e) => {
                eprintln!("kagami: error: {e:#}");
                failed += 1;
            }
        }
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

async fn post(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    req: &PurgeRequest,
) -> anyhow::Result<(PurgeReport, String)> {
    let resp = client
        .post(url)
        .bearer_auth(token)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(serde_json::to_vec(req).expect("a request serialises"))
        .send()
        .await
        .with_context(|| {
            format!(
                "asking {url} to purge {} (is `kagami serve` running there?)",
                req.image
            )
        })?;
    let status = resp.status();
    let body = resp
        .text()
        .await
        .with_context(|| format!("reading the answer of {url}"))?;
    if !status.is_success() {
        let message = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["errors"][0]["message"].as_str().map(str::to_string))
            .unwrap_or_else(|| format!("{url} answered {status}: {}", body.trim()));
        anyhow::bail!("{message}");
    }
    let report: PurgeReport = serde_json::from_str(&body)
        .with_context(|| format!("{url} did not answer a purge report"))?;
    Ok((report, body))
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
