//! `kagami import`: asks the running `kagami serve` to load image tarballs (OCI layouts,
//! `ctr images export` / `skopeo ... oci-archive:` tars, `docker save` tars) into its store.
//! The server does the work (one process owns the store); this command posts each file's
//! absolute path to its admin route, with the admin token that server wrote to its data
//! directory, and prints what was imported.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use kagami_server::admin::{ADMIN_TOKEN_FILE, read_token};
use kagami_server::import::{IMPORT_PATH, ImportReport, ImportRequest};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Image archives or OCI layout directories, on this machine (the server reads them).
    #[arg(required = true, value_name = "FILE")]
    files: Vec<PathBuf>,
    /// Name (registry/repository[:tag]) for an image the archive does not name; with a
    /// single-image archive that names its image, an extra name.
    #[arg(long, value_name = "REF")]
    name: Option<String>,
    /// The kagami to load into: its --listen address, as http://host:port or host:port.
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
    /// Print each report as JSON (one line per file) instead of the summary.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let base = super::normalise_base(&args.addr)
        .with_context(|| format!("--addr {:?} is not an http(s) address", args.addr))?;
    let url = format!("{base}{IMPORT_PATH}");
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
    for file in &args.files {
        let path = match std::fs::canonicalize(file).or_else(|_| std::path::absolute(file)) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("kagami: error: {}: {e}", file.display());
                failed += 1;
                continue;
            }
        };
        let req = ImportRequest {
            path: path.display().to_string(),
            name: args.name.clone(),
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
    req: &ImportRequest,
) -> anyhow::Result<(ImportReport, String)> {
    let resp = client
        .post(url)
        .bearer_auth(token)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(serde_json::to_vec(req).expect("a request serialises"))
        .send()
        .await
        .with_context(|| {
            format!(
                "asking {url} to import {} (is `kagami serve` running there?)",
                req.path
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
    let report: ImportReport = serde_json::from_str(&body)
        .with_context(|| format!("{url} did not answer an import report"))?;
    Ok((report, body))
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
