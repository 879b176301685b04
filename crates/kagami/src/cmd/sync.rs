//! `kagami sync --images LIST --to REGISTRY[/PREFIX]`: copy images (every platform)
//! through the resolution plan into another registry.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use kagami_client::{Client, Manifest, Mount, push_target};
use kagami_config::endpoint::validate_host;
use kagami_config::oci::is_index;
use kagami_config::{Config, Digest, EndpointAttempt, PlanOptions, Reference, plan};

use super::pull::{human, runtime};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    plan: super::PlanArgs,
    /// File with one image reference per line; `#` starts a comment, blank lines are
    /// ignored.
    #[arg(long, value_name = "FILE")]
    images: PathBuf,
    /// Target registry, with an optional path prefix: `registry.example.com:5000/mirror`.
    /// Each image goes to `<REGISTRY>/<PREFIX>/<its repository>:<its tag>`. Auth and TLS
    /// come from `configs` of the target's host; a loopback host with a port is plain http.
    #[arg(long, value_name = "REGISTRY[/PREFIX]")]
    to: String,
}

/// Parses an image list: one reference per line, `#` comments, blank lines.
pub fn parse_list(text: &str, path: &Path) -> anyhow::Result<Vec<Reference>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let r = Reference::parse(line)
            .with_context(|| format!("{}:{}: invalid image reference", path.display(), i + 1))?;
        if !out.contains(&r) {
            out.push(r);
        }
    }
    Ok(out)
}

/// What happened to one image.
#[derive(Default)]
struct Stats {
    copied: usize,
    mounted: usize,
    present: usize,
    bytes: u64,
    manifests: usize,
    up_to_date: bool,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let (config, opts) = args.plan.load()?;
    let text = std::fs::read_to_string(&args.images)
        .with_context(|| format!("cannot read {}", args.images.display()))?;
    let images = parse_list(&text, &args.images)?;
    let to = args.to.trim_end_matches('/');
    let (host, prefix) = match to.split_once('/') {
        Some((h, p)) => (h, Some(p)),
        None => (to, None),
    };
    validate_host(host).map_err(|e| anyhow::anyhow!("--to {to:?}: registry {host:?}: {e}"))?;
    let tmp = std::env::temp_dir().join(format!("kagami-sync-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let rt = runtime()?;
    let client = Client::default();
    // Where each blob was last seen in the target, for cross-repository mounts.
    let mut seen: HashMap<Digest, String> = HashMap::new();
    let mut table = Vec::new();
    let mut failed = 0;
    for image in &images {
        let repo = match prefix {
            Some(p) => format!("{p}/{}", image.repository),
            None => image.repository.clone(),
        };
        let target = push_target(&config, host, &repo);
        let dest = format!("{host}/{repo}:{}", image.reference());
        let result = rt.block_on(copy_image(
            &client, &config, opts, image, &target, &tmp, &mut seen,
        ));
        match result {
            Ok(s) => table.push((image.to_string(), dest, Ok(s))),
            Err(e) => {
                failed += 1;
                eprintln!("kagami: error: {image}: {e:#}");
                table.push((image.to_string(), dest, Err(())));
            }
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    print!("{}", render(&table));
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

type TableRow = (String, String, Result<Stats, ()>);

fn render(rows: &[TableRow]) -> String {
    let w_img = rows.iter().map(|r| r.0.len()).max().unwrap_or(0).max(5);
    let w_dst = rows.iter().map(|r| r.1.len()).max().unwrap_or(0).max(6);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<w_img$}  {:<w_dst$}  {:<10}  {:>6}  {:>7}  {:>7}  {:>10}",
        "IMAGE", "TARGET", "STATUS", "COPIED", "MOUNTED", "PRESENT", "BYTES"
    );
    let (mut copied, mut current, mut failed, mut blobs, mut bytes) = (0, 0, 0, 0, 0);
    for (img, dst, r) in rows {
        match r {
            Ok(st) => {
                let status = if st.up_to_date {
                    "up to date"
                } else {
                    "copied"
                };
                if st.up_to_date {
                    current += 1;
                } else {
                    copied += 1;
                }
                blobs += st.copied;
                bytes += st.bytes;
                let _ = writeln!(
                    s,
                    "{img:<w_img$}  {dst:<w_dst$}  {status:<10}  {:>6}  {:>7}  {:>7}  {:>10}",
                    st.copied,
                    st.mounted,
                    st.present,
                    human(st.bytes)
                );
            }
            Err(()) => {
                failed += 1;
                let _ = writeln!(s, "{img:<w_img$}  {dst:<w_dst$}  FAILED");
            }
        }
    }
    let _ = writeln!(
        s,
        "{} images: {copied} copied, {current} up to date, {failed} failed; {blobs} blobs copied ({})",
        rows.len(),
        human(bytes)
    );
    s
}

async fn copy_image(
    client: &Client,
    config: &Config,
    opts: PlanOptions,
    image: &Reference,
    target: &EndpointAttempt,
    tmp: &Path,
    seen: &mut HashMap<Digest, String>,
) -> anyhow::Result<Stats> {
    let p = plan(image, config, opts);
    let top = client.manifest(&p, &image.reference()).await?;
    let tag_ref = image.reference();
    let mut st = Stats::default();
    if client.manifest_digest(target, &tag_ref).await?.as_ref() == Some(&top.digest) {
        st.up_to_date = true;
        return Ok(st);
    }
    let mut children: Vec<Manifest> = Vec::new();
    if is_index(&top.media_type) {
        for d in top.view()?.manifests {
            children.push(client.manifest(&p, &d.digest.to_string()).await?);
        }
    }
    for m in &children {
        let by_digest = m.digest.to_string();
        if client.manifest_digest(target, &by_digest).await?.as_ref() == Some(&m.digest) {
            continue;
        }
        copy_blobs(client, &p, m, target, tmp, seen, &mut st).await?;
        client
            .put_manifest(target, &by_digest, &m.media_type, m.bytes.clone())
            .await?;
        st.manifests += 1;
    }
    if !is_index(&top.media_type) {
        copy_blobs(client, &p, &top, target, tmp, seen, &mut st).await?;
    }
    client
        .put_manifest(target, &tag_ref, &top.media_type, top.bytes.clone())
        .await?;
    st.manifests += 1;
    Ok(st)
}

async fn copy_blobs(
    client: &Client,
    p: &kagami_config::Plan,
    m: &Manifest,
    target: &EndpointAttempt,
    tmp: &Path,
    seen: &mut HashMap<Digest, String>,
    st: &mut Stats,
) -> anyhow::Result<()> {
    let view = m.view()?;
    if is_index(view.guess_media_type()) {
        bail!("nested indexes are not supported");
    }
    for d in view.blobs() {
        // Sized: the manifest was read with `Manifest::view` (checked).
        let (digest, size) = (&d.digest, d.size.unwrap_or_default());
        if client.blob_exists(target, &d.digest).await? {
            st.present += 1;
            seen.insert(d.digest.clone(), target.repository.clone());
            continue;
        }
        let mut location = None;
        if let Some(from) = seen.get(&d.digest).filter(|f| **f != target.repository) {
            match client.mount_blob(target, &d.digest, from).await? {
                Mount::Mounted => {
                    st.mounted += 1;
                    seen.insert(d.digest.clone(), target.repository.clone());
                    continue;
                }
                Mount::Upload(loc) => location = Some(loc),
            }
        }
        // Download (verified) to a temporary file, then upload from it.
        let path = tmp.join(digest.hex());
        let mut file = tokio::fs::File::create(&path)
            .await
            .with_context(|| format!("cannot create {}", path.display()))?;
        let fetched = client
            .fetch_blob(p, digest, Some(size), &mut file, &|_| {})
            .await;
        drop(file);
        let result = async {
            fetched?;
            let location = match location {
                Some(l) => l,
                None => client.start_upload(target).await?,
            };
            client
                .upload_file(target, &location, digest, &path, size)
                .await
        }
        .await;
        let _ = tokio::fs::remove_file(&path).await;
        result?;
        st.copied += 1;
        st.bytes += size;
        seen.insert(d.digest.clone(), target.repository.clone());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list() {
        let l = parse_list(
            "# images\n\nalpine:3.20  # comment\ndocker.io/rancher/mirrored-pause:3.6\nalpine:3.20\n",
            Path::new("l"),
        )
        .unwrap();
        assert_eq!(l.len(), 2);
        assert_eq!(l[0].to_string(), "docker.io/library/alpine:3.20");
        let e = parse_list("ok:1\nBad Ref\n", Path::new("l")).unwrap_err();
        assert!(format!("{e:#}").contains("l:2"), "{e:#}");
    }
}
