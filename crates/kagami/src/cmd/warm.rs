//! `kagami warm`: asks the running `kagami serve` of this node to fetch images ahead of
//! need (docs/warm.md). Every reference is checked here first — on the command line and
//! in `--from` files (one per line, `#` comments) — and a malformed one stops the command
//! before anything is sent, naming the file and line. The images are posted to the
//! server's admin route `POST /kagami/warm` with the admin token; then, unless
//! `--no-wait`, the command follows `GET /kagami/warm` until each image is held or failed.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use kagami_config::Reference;
use kagami_server::admin::{ADMIN_TOKEN_FILE, read_token};
use kagami_server::report::format::human_bytes;
use kagami_server::warm::{WARM_PATH, WarmAccepted, WarmImage, WarmReport, WarmRequest};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Images to warm (registry/repository[:tag][@digest]).
    #[arg(value_name = "IMAGE")]
    images: Vec<String>,
    /// A file listing images, one per line; blank lines and `#` comments are skipped.
    /// May be repeated.
    #[arg(long, value_name = "FILE")]
    from: Vec<PathBuf>,
    /// The kagami to ask: its --listen address, as http://host:port or host:port.
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
    /// Return once the server accepted the list, without following the progress.
    #[arg(long)]
    no_wait: bool,
    /// How long to follow the progress before giving up (the server keeps warming).
    #[arg(long, default_value = "30m", value_parser = super::serve::parse_duration, value_name = "DURATION")]
    timeout: Duration,
}

/// The references of `text` (a `--from` file's content): one per line, blank lines and
/// `#` comments (whole-line or after the reference) skipped. The first malformed line is
/// an error naming `file` and the line number.
pub fn parse_list(file: &Path, text: &str) -> anyhow::Result<Vec<Reference>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let r = Reference::parse(line)
            .map_err(|e| anyhow::anyhow!("{}:{}: {e}", file.display(), i + 1))?;
        out.push(r);
    }
    Ok(out)
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut images: Vec<Reference> = Vec::new();
    for (i, s) in args.images.iter().enumerate() {
        images.push(Reference::parse(s).with_context(|| format!("argument {} ({s:?})", i + 1))?);
    }
    for file in &args.from {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("reading the image list {}", file.display()))?;
        images.extend(parse_list(file, &text)?);
    }
    anyhow::ensure!(
        !images.is_empty(),
        "no image to warm: give IMAGE arguments or --from FILE"
    );
    let base = super::normalise_base(&args.addr)
        .with_context(|| format!("--addr {:?} is not an http(s) address", args.addr))?;
    let url = format!("{base}{WARM_PATH}");
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
        .timeout(Duration::from_secs(30))
        .no_proxy()
        .build()
        .context("building the HTTP client")?;
    let req = WarmRequest {
        images: images.iter().map(|r| r.to_string()).collect(),
    };
    let accepted = rt.block_on(post(&client, &url, &token, &req))?;
    println!(
        "warming {} image{} on {base}",
        accepted.images.len(),
        if accepted.images.len() == 1 { "" } else { "s" }
    );
    if args.no_wait {
        return Ok(ExitCode::SUCCESS);
    }
    rt.block_on(follow(&client, &url, &accepted.images, args.timeout))
}

async fn post(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    req: &WarmRequest,
) -> anyhow::Result<WarmAccepted> {
    let resp = client
        .post(url)
        .bearer_auth(token)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(serde_json::to_vec(req).expect("a request serialises"))
        .send()
        .await
        .with_context(|| {
            format!("asking {url} to warm images (is `kagami serve` running there?)")
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
    serde_json::from_str(&body).with_context(|| format!("{url} did not answer a warm request"))
}

/// Follows the progress of `images` until each is held or failed (exit 0 when all are
/// held, 2 otherwise), printing each image's state when it changes.
async fn follow(
    client: &reqwest::Client,
    url: &str,
    images: &[String],
    timeout: Duration,
) -> anyhow::Result<ExitCode> {
    let deadline = Instant::now() + timeout;
    let mut printed: std::collections::HashMap<String, String> = Default::default();
    loop {
        let body = client
            .get(url)
            .send()
            .await
            .with_context(|| format!("asking {url} for the progress"))?
            .text()
            .await
            .with_context(|| format!("reading the answer of {url}"))?;
        let report: WarmReport = serde_json::from_str(&body)
            .with_context(|| format!("{url} did not answer a warm report"))?;
        let mine: Vec<&WarmImage> = images
            .iter()
            .filter_map(|i| report.images.iter().find(|w| &w.image == i))
            .collect();
        for w in &mine {
            let line = render(w);
            if printed.get(&w.image) != Some(&line) {
                println!("{line}");
                printed.insert(w.image.clone(), line);
            }
        }
        // The server queued every image it accepted (`queued`) before answering: a held or
        // failed state is this request's outcome.
        let done = mine.len() == images.len()
            && mine
                .iter()
                .all(|w| w.state == "held" || w.state == "failed");
        if done {
            let failed = mine.iter().filter(|w| w.state == "failed").count();
            return Ok(if failed == 0 {
                ExitCode::SUCCESS
            } else {
                eprintln!(
                    "kagami: error: {failed} of {} image{} failed",
                    images.len(),
                    if images.len() == 1 { "" } else { "s" }
                );
                ExitCode::from(2)
            });
        }
        if Instant::now() >= deadline {
            anyhow::bail!(
                "still warming after {timeout:?} (the server goes on; see `kagami status`)"
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// One image's progress on one line.
pub fn render(w: &WarmImage) -> String {
    let detail = match w.state.as_str() {
        "held" => format!(
            "held ({} blob{}, {})",
            w.blobs_total,
            if w.blobs_total == 1 { "" } else { "s" },
            human_bytes(w.bytes_total)
        ),
        "fetching" => format!(
            "fetching {} of {} blobs, {} of {}",
            w.blobs_held.min(w.blobs_total),
            w.blobs_total,
            human_bytes(w.bytes_held),
            human_bytes(w.bytes_total)
        ),
        "failed" => format!("failed: {}", w.error.as_deref().unwrap_or("unknown error")),
        "not_chosen" => format!("not chosen here: held by {}", w.chosen.join(", ")),
        other => other.to_string(),
    };
    format!(
        "{} {detail}; copies seen in the cluster: {}",
        w.image, w.copies_seen
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_skip_comments_and_name_the_bad_line() {
        let f = Path::new("/etc/kagami/warm.txt");
        let ok = parse_list(f, "# head\n\n  r.test/app:1  # note\nr.test/lib@sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\n").unwrap();
        assert_eq!(ok.len(), 2);
        assert_eq!(ok[0].to_string(), "r.test/app:1");
        let e = parse_list(f, "r.test/app:1\n\nr.test/App:1\n").unwrap_err();
        assert!(e.to_string().starts_with("/etc/kagami/warm.txt:3: "), "{e}");
    }
}
