//! `kagami pull IMAGE --output DIR`: fetch an image through the resolution plan into an
//! OCI image layout.

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use futures_util::{StreamExt as _, stream};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use kagami_client::{Client, Manifest};
use kagami_config::oci::{Descriptor, Hasher, OCI_INDEX, Platform, is_index};
use kagami_config::{Digest, Plan, Reference, plan};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    plan: super::PlanArgs,
    /// Image reference, e.g. `alpine:3.20`, `quay.io/coreos/etcd:v3.5.0`, `repo@sha256:...`.
    image: String,
    /// Directory of the OCI image layout to write (created if missing; blobs already
    /// there are verified and reused).
    #[arg(long, short = 'o', value_name = "DIR")]
    output: PathBuf,
    /// Platform to select from a multi-platform image, `OS/ARCH[/VARIANT]`
    /// (default: this machine's).
    #[arg(long, value_name = "OS/ARCH", conflicts_with = "all_platforms")]
    platform: Option<String>,
    /// Keep every platform of a multi-platform image (the index itself is stored).
    #[arg(long)]
    all_platforms: bool,
    /// Blobs downloaded at the same time.
    #[arg(long, default_value_t = 4, value_name = "N")]
    jobs: usize,
}

/// The tokio runtime the network commands use.
pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let (config, options) = args.plan.load()?;
    let image = Reference::parse(&args.image).context("cannot pull")?;
    let want = match &args.platform {
        Some(p) => Some(
            Platform::parse(p)
                .with_context(|| format!("--platform {p:?}: expected OS/ARCH[/VARIANT]"))?,
        ),
        None => None,
    };
    let p = plan(&image, &config, options);
    let rt = runtime()?;
    let into = Target {
        output: &args.output,
        all_platforms: args.all_platforms,
        jobs: args.jobs,
        name: None,
    };
    let summary = rt.block_on(pull(&into, &p, want))?;
    print!("{summary}");
    Ok(ExitCode::SUCCESS)
}

/// One line of the summary: a manifest or blob and where it came from.
struct Row {
    kind: &'static str,
    digest: String,
    size: u64,
    /// The endpoint it came from, or `None` when it was already in the layout.
    source: Option<String>,
}

/// Where and how [`pull`] writes an image.
pub(crate) struct Target<'a> {
    /// The OCI layout directory (created if missing; shared by several images).
    pub output: &'a Path,
    pub all_platforms: bool,
    /// Blobs downloaded at the same time.
    pub jobs: usize,
    /// The full image name recorded in index.json as `io.containerd.image.name` (what
    /// `ctr images import`, K3s's `agent/images` and `kagami import` name the image by),
    /// for layouts that hold several images.
    pub name: Option<String>,
}

/// Pulls the image of `plan` into an OCI layout; returns the summary to print.
pub(crate) async fn pull(
    args: &Target<'_>,
    plan: &Plan,
    want: Option<Platform>,
) -> anyhow::Result<String> {
    let client = Client::default();
    let image = &plan.image;
    let layout = Layout::create(args.output)?;
    let top = client
        .manifest(plan, &image.reference())
        .await
        .with_context(|| format!("cannot pull {image}"))?;
    let mut rows = Vec::new();
    let mut images: Vec<Manifest> = Vec::new();
    let mut root_platform = None;
    let root = if is_index(&top.media_type) {
        let view = top.view()?;
        if args.all_platforms {
            for d in &view.manifests {
                let m = client
                    .manifest(plan, &d.digest.to_string())
                    .await
                    .with_context(|| format!("cannot pull {image}"))?;
                images.push(m);
            }
            layout.write_manifest(&top, "index", &mut rows)?;
            top
        } else {
            let want = want.unwrap_or_else(Platform::host);
            let Some(d) = view
                .manifests
                .iter()
                .find(|d| d.platform.as_ref().is_some_and(|p| want.matches(p)))
            else {
                let have: Vec<String> = view
                    .manifests
                    .iter()
                    .filter_map(|d| d.platform.as_ref().map(ToString::to_string))
                    .collect();
                bail!(
                    "{image} has no image for platform {want} (it has: {}); use --platform or --all-platforms",
                    have.join(", ")
                );
            };
            root_platform = d.platform.clone();
            let m = client
                .manifest(plan, &d.digest.to_string())
                .await
                .with_context(|| format!("cannot pull {image}"))?;
            images.push(m.clone());
            m
        }
    } else {
        images.push(top.clone());
        top
    };
    let mut blobs: Vec<(&'static str, Descriptor)> = Vec::new();
    for m in &images {
        layout.write_manifest(m, "manifest", &mut rows)?;
        let view = m.view()?;
        if is_index(&m.media_type) {
            bail!("{image}: nested indexes are not supported");
        }
        for (i, d) in view.blobs().enumerate() {
            if !blobs.iter().any(|(_, b)| b.digest == d.digest) {
                blobs.push((if i == 0 { "config" } else { "layer" }, d.clone()));
            }
        }
    }

    let bars = Bars::new();
    let client = &client;
    let layout = &layout;
    let results: Vec<anyhow::Result<Row>> = stream::iter(blobs)
        .map(|(kind, d)| {
            let bar = bars.bar(kind, &d);
            async move {
                let r = layout.fetch_blob(client, plan, &d, &bar).await;
                bar.finish_and_clear();
                r.map(|source| Row {
                    kind,
                    digest: d.digest.to_string(),
                    size: d.size.unwrap_or_default(),
                    source,
                })
            }
        })
        .buffered(args.jobs.max(1))
        .collect()
        .await;
    for r in results {
        rows.push(r?);
    }

    let tag = image.tag.clone().filter(|_| image.digest.is_none());
    let root_desc = Descriptor {
        media_type: root.media_type.clone(),
        digest: root.digest.clone(),
        size: Some(root.bytes.len() as u64),
        platform: root_platform,
        annotations: None,
        urls: Vec::new(),
    };
    layout.write_index(root_desc, tag.as_deref(), args.name.as_deref())?;

    let mut s = String::new();
    use std::fmt::Write as _;
    let _ = writeln!(s, "pulled {image}");
    let _ = writeln!(s, "  digest {}", root.digest);
    let _ = writeln!(
        s,
        "  output {} (OCI layout{})",
        args.output.display(),
        tag.map(|t| format!(", tag {t}")).unwrap_or_default()
    );
    let _ = writeln!(s, "{:<9} {:<71} {:>10}  SOURCE", "KIND", "DIGEST", "SIZE");
    let (mut fetched, mut fetched_bytes, mut present) = (0, 0, 0);
    for r in &rows {
        match &r.source {
            Some(_) => {
                fetched += 1;
                fetched_bytes += r.size;
            }
            None => present += 1,
        }
        let _ = writeln!(
            s,
            "{:<9} {:<71} {:>10}  {}",
            r.kind,
            r.digest,
            human(r.size),
            r.source.as_deref().unwrap_or("already present")
        );
    }
    let _ = writeln!(
        s,
        "{} blobs: {fetched} fetched ({}), {present} already present",
        rows.len(),
        human(fetched_bytes)
    );
    Ok(s)
}

/// Progress bars, one per blob, drawn only when stderr is a terminal.
struct Bars {
    multi: Option<MultiProgress>,
}

impl Bars {
    fn new() -> Bars {
        Bars {
            multi: std::io::stderr().is_terminal().then(MultiProgress::new),
        }
    }

    fn bar(&self, kind: &str, d: &Descriptor) -> ProgressBar {
        let Some(m) = &self.multi else {
            return ProgressBar::hidden();
        };
        let bar = m.add(ProgressBar::new(d.size.unwrap_or_default()));
        let style = ProgressStyle::with_template(
            "{prefix:<20} [{bar:30}] {bytes:>10}/{total_bytes:<10} {bytes_per_sec:>12}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        let short = d.digest.hex();
        bar.set_prefix(format!("{kind} {}", &short[..short.len().min(12)]));
        bar
    }
}

/// An OCI image layout directory.
pub(crate) struct Layout {
    dir: PathBuf,
}

impl Layout {
    fn create(dir: &Path) -> anyhow::Result<Layout> {
        std::fs::create_dir_all(dir.join("blobs"))
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let marker = dir.join("oci-layout");
        if !marker.exists() {
            std::fs::write(&marker, "{\"imageLayoutVersion\":\"1.0.0\"}\n")
                .with_context(|| format!("cannot write {}", marker.display()))?;
        }
        Ok(Layout {
            dir: dir.to_path_buf(),
        })
    }

    fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.dir
            .join("blobs")
            .join(digest.algorithm().name())
            .join(digest.hex())
    }

    fn write_manifest(
        &self,
        m: &Manifest,
        kind: &'static str,
        rows: &mut Vec<Row>,
    ) -> anyhow::Result<()> {
        let digest = &m.digest;
        let path = self.blob_path(digest);
        let present =
            std::fs::read(&path).is_ok_and(|b| Hasher::digest(digest.algorithm(), &b) == *digest);
        if !present {
            write_atomic(&path, &m.bytes)?;
        }
        rows.push(Row {
            kind,
            digest: m.digest.to_string(),
            size: m.bytes.len() as u64,
            source: (!present).then(|| m.endpoint.clone()),
        });
        Ok(())
    }

    /// Fetches a blob into the layout unless a verified copy is there; returns the
    /// endpoint it came from (`None`: already present).
    async fn fetch_blob(
        &self,
        client: &Client,
        plan: &Plan,
        d: &Descriptor,
        bar: &ProgressBar,
    ) -> anyhow::Result<Option<String>> {
        // Sized: the manifest was read with `Manifest::view` (checked).
        let (digest, size) = (&d.digest, d.size.unwrap_or_default());
        let path = self.blob_path(digest);
        if verify_file(&path, digest, size).await? {
            bar.set_position(size);
            return Ok(None);
        }
        let dir = path.parent().context("blob path has a parent")?;
        tokio::fs::create_dir_all(dir)
            .await
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let tmp = dir.join(format!(".tmp-{}-{}", digest.hex(), std::process::id()));
        let mut file = tokio::fs::File::create(&tmp)
            .await
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        let progress = |pos| bar.set_position(pos);
        let result = client
            .fetch_blob(plan, digest, Some(size), &mut file, &progress)
            .await;
        drop(file);
        match result {
            Ok(source) => {
                tokio::fs::rename(&tmp, &path)
                    .await
                    .with_context(|| format!("cannot rename {} into place", tmp.display()))?;
                Ok(Some(source))
            }
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                Err(anyhow::Error::new(e).context(format!("cannot pull {}", plan.image)))
            }
        }
    }

    /// Adds (or replaces, by name, else by tag) the image in index.json.
    fn write_index(
        &self,
        mut desc: Descriptor,
        tag: Option<&str>,
        name: Option<&str>,
    ) -> anyhow::Result<()> {
        const REF_NAME: &str = "org.opencontainers.image.ref.name";
        const CONTAINERD_NAME: &str = "io.containerd.image.name";
        let path = self.dir.join("index.json");
        let mut index: serde_json::Value = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .with_context(|| format!("{} is not valid JSON", path.display()))?,
            Err(_) => {
                serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []})
            }
        };
        let mut ann = serde_json::Map::new();
        if let Some(t) = tag {
            ann.insert(REF_NAME.into(), t.into());
        }
        if let Some(n) = name {
            ann.insert(CONTAINERD_NAME.into(), n.into());
        }
        if !ann.is_empty() {
            desc.annotations = Some(ann);
        }
        let entry = serde_json::to_value(&desc)?;
        let manifests = index
            .get_mut("manifests")
            .and_then(|m| m.as_array_mut())
            .with_context(|| format!("{} has no manifests list", path.display()))?;
        manifests.retain(|m| match (name, tag) {
            (Some(n), _) => m["annotations"][CONTAINERD_NAME].as_str() != Some(n),
            (None, Some(t)) => m["annotations"][REF_NAME].as_str() != Some(t),
            (None, None) => m["digest"].as_str() != Some(desc.digest.to_string().as_str()),
        });
        manifests.push(entry);
        write_atomic(&path, &serde_json::to_vec_pretty(&index)?)
    }
}

/// True when `path` exists with the right size and digest.
pub(crate) async fn verify_file(path: &Path, digest: &Digest, size: u64) -> anyhow::Result<bool> {
    match tokio::fs::metadata(path).await {
        Ok(m) if m.len() == size => {}
        _ => return Ok(false),
    }
    let path = path.to_path_buf();
    let digest = digest.clone();
    let ok = tokio::task::spawn_blocking(move || -> std::io::Result<bool> {
        use std::io::Read as _;
        let mut f = std::fs::File::open(&path)?;
        let mut h = Hasher::new(digest.algorithm());
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        Ok(h.finish() == digest)
    })
    .await??;
    Ok(ok)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().context("path has a parent")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".tmp-{name}-{}", std::process::id()));
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Sizes for people: `1.5 MiB`.
pub(crate) fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
