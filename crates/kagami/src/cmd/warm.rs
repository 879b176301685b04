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
use kagami_server::report::format::human_bytes;
use kagami_server::warm::{WARM_PATH, WarmAccepted, WarmImage, WarmReport, WarmRequest};

use super::admin_client::AdminArgs;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Images to warm (registry/repository[:tag][@digest]).
    #[arg(value_name = "IMAGE")]
    images: Vec<String>,
    /// A file listing images, one per line; blank lines and `#` comments are skipped.
    /// May be repeated.
    #[arg(long, value_name = "FILE")]
    from: Vec<PathBuf>,
    #[command(flatten)]
    admin: AdminArgs,
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
    let admin = args.admin.connect(Some(Duration::from_secs(30)))?;
    let req = WarmRequest {
        images: images.iter().map(|r| r.to_string()).collect(),
    };
    let (accepted, _): (WarmAccepted, String) =
        admin
            .rt
            .block_on(admin.post(WARM_PATH, "warm images", "a warm request", &req))?;
    println!(
        "warming {} image{} on {}",
        accepted.images.len(),
        if accepted.images.len() == 1 { "" } else { "s" },
        admin.base
    );
    if args.no_wait {
        return Ok(ExitCode::SUCCESS);
    }
    let url = admin.url(WARM_PATH);
    admin
        .rt
        .block_on(follow(&admin.http, &url, &accepted.images, args.timeout))
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
