//! `kagami bundle`: one archive that carries everything an air-gapped site needs to run
//! kagami and start its nodes with a set of images: the kagami image (from
//! `scripts/build-image.sh`), the deployment files, and the listed images as one OCI
//! archive that `kagami import`, `ctr images import` and K3s's `agent/images` folder
//! all accept (each image is named in index.json by `io.containerd.image.name`).
//!
//! The archive is written on a machine that can reach the registries; everything is
//! streamed through temporary files next to the output, never held in memory. Entries
//! have fixed owners, modes and timestamps, so the same inputs give the same bytes.

use std::fs::File;
use std::io::{BufRead as _, BufReader, BufWriter, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use kagami_config::oci::Platform;
use kagami_config::{Reference, plan};

use super::pull::{Target, pull, runtime};

/// The directory every entry of the bundle is under.
const ROOT: &str = "kagami-bundle";

/// The deployment files, as the repository has them when this binary was built.
const DEPLOY: [(&str, &str); 6] = [
    (
        "kustomization.yaml",
        include_str!("../../../../deploy/kubernetes/kustomization.yaml"),
    ),
    (
        "namespace.yaml",
        include_str!("../../../../deploy/kubernetes/namespace.yaml"),
    ),
    (
        "configmap.yaml",
        include_str!("../../../../deploy/kubernetes/configmap.yaml"),
    ),
    (
        "secret.yaml",
        include_str!("../../../../deploy/kubernetes/secret.yaml"),
    ),
    (
        "service.yaml",
        include_str!("../../../../deploy/kubernetes/service.yaml"),
    ),
    (
        "daemonset.yaml",
        include_str!("../../../../deploy/kubernetes/daemonset.yaml"),
    ),
];

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    plan: super::PlanArgs,
    /// Images to pre-load on the nodes, e.g. `alpine:3.20`, `registry.local:5000/app:1`.
    #[arg(value_name = "IMAGE")]
    images: Vec<String>,
    /// A file listing images to pre-load, one per line (`#` starts a comment).
    #[arg(long, short = 'f', value_name = "FILE")]
    images_file: Option<PathBuf>,
    /// The kagami image, as the OCI archive `scripts/build-image.sh` writes.
    #[arg(long, value_name = "FILE")]
    kagami_image: PathBuf,
    /// The bundle to write (a tar archive).
    #[arg(long, short = 'o', value_name = "FILE")]
    output: PathBuf,
    /// Platform of the pre-loaded images, `OS/ARCH[/VARIANT]` (default: this machine's).
    #[arg(long, value_name = "OS/ARCH")]
    platform: Option<String>,
    /// Blobs downloaded at the same time.
    #[arg(long, default_value_t = 4, value_name = "N")]
    jobs: usize,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let (config, options) = args.plan.load()?;
    let images = image_list(&args)?;
    if images.is_empty() {
        bail!("no images to bundle: name them as arguments or with --images-file");
    }
    let want = match &args.platform {
        Some(p) => Some(
            Platform::parse(p)
                .with_context(|| format!("--platform {p:?}: expected OS/ARCH[/VARIANT]"))?,
        ),
        None => None,
    };
    let kagami_names = archive_names(&args.kagami_image).with_context(|| {
        format!(
            "--kagami-image {}: not an OCI archive (build one with scripts/build-image.sh)",
            args.kagami_image.display()
        )
    })?;
    let parent = match args.output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let work = tempfile::Builder::new()
        .prefix(".kagami-bundle-")
        .tempdir_in(&parent)
        .with_context(|| {
            format!(
                "cannot create a temporary directory in {}",
                parent.display()
            )
        })?;
    let layout = work.path().join("layout");

    let rt = runtime()?;
    let mut listed = Vec::new();
    for image in &images {
        let p = plan(image, &config, options);
        let target = Target {
            output: &layout,
            all_platforms: false,
            jobs: args.jobs,
            name: Some(image.to_string()),
        };
        let summary = rt
            .block_on(pull(&target, &p, want.clone()))
            .with_context(|| format!("cannot bundle {image}"))?;
        let digest = summary
            .lines()
            .find_map(|l| l.trim().strip_prefix("digest "))
            .unwrap_or("?")
            .to_string();
        eprintln!("bundled {image} ({digest})");
        listed.push((image.to_string(), digest));
    }

    let preload = work.path().join("preload.tar");
    tar_layout(&layout, &preload)?;

    let tmp = work.path().join("bundle.tar");
    let file = File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let mut tar = tar::Builder::new(BufWriter::new(file));
    tar.mode(tar::HeaderMode::Deterministic);
    let mut list = String::new();
    for (name, digest) in &listed {
        list.push_str(&format!("{name} {digest}\n"));
    }
    let readme = readme(&kagami_names, &listed);
    add_bytes(&mut tar, &format!("{ROOT}/README.md"), readme.as_bytes())?;
    add_bytes(&mut tar, &format!("{ROOT}/images.txt"), list.as_bytes())?;
    add_file(
        &mut tar,
        &format!("{ROOT}/images/kagami.tar"),
        &args.kagami_image,
    )?;
    add_file(&mut tar, &format!("{ROOT}/images/preload.tar"), &preload)?;
    for (name, text) in DEPLOY {
        add_bytes(
            &mut tar,
            &format!("{ROOT}/deploy/kubernetes/{name}"),
            text.as_bytes(),
        )?;
    }
    let mut out = tar.into_inner().context("cannot finish the bundle")?;
    out.flush().context("cannot write the bundle")?;
    out.into_inner()
        .map_err(|e| e.into_error())?
        .sync_all()
        .context("cannot write the bundle")?;
    std::fs::rename(&tmp, &args.output)
        .with_context(|| format!("cannot write {}", args.output.display()))?;
    println!(
        "wrote {} ({} images, the kagami image, the deployment files)",
        args.output.display(),
        listed.len()
    );
    Ok(ExitCode::SUCCESS)
}

/// The images named on the command line and in `--images-file`, in that order, each once.
fn image_list(args: &Args) -> anyhow::Result<Vec<Reference>> {
    let mut raw: Vec<(String, String)> = args
        .images
        .iter()
        .map(|i| (i.clone(), "the command line".to_string()))
        .collect();
    if let Some(path) = &args.images_file {
        let f = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
        for (n, line) in BufReader::new(f).lines().enumerate() {
            let line = line.with_context(|| format!("cannot read {}", path.display()))?;
            let line = line.split('#').next().unwrap_or("").trim();
            if !line.is_empty() {
                raw.push((line.to_string(), format!("{}:{}", path.display(), n + 1)));
            }
        }
    }
    let mut out: Vec<Reference> = Vec::new();
    for (text, at) in raw {
        let r = Reference::parse(&text).with_context(|| format!("{at}: {text:?}"))?;
        if !out.iter().any(|o| o.to_string() == r.to_string()) {
            out.push(r);
        }
    }
    Ok(out)
}

/// Writes the OCI layout directory `dir` as a tar at `out` (an OCI archive), with its
/// entries in a stable order.
fn tar_layout(dir: &Path, out: &Path) -> anyhow::Result<()> {
    let file = File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut tar = tar::Builder::new(BufWriter::new(file));
    tar.mode(tar::HeaderMode::Deterministic);
    let mut files = Vec::new();
    collect(dir, dir, &mut files)?;
    files.sort();
    for rel in files {
        add_file(&mut tar, &rel, &dir.join(&rel))?;
    }
    tar.into_inner()
        .context("cannot finish the image archive")?
        .flush()
        .context("cannot write the image archive")?;
    Ok(())
}

/// The files under `dir`, relative to `base`, `/`-separated.
fn collect(base: &Path, dir: &Path, out: &mut Vec<String>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            collect(base, &path, out)?;
        } else {
            let rel = path.strip_prefix(base)?;
            out.push(
                rel.components()
                    .map(|c| c.as_os_str().to_string_lossy())
                    .collect::<Vec<_>>()
                    .join("/"),
            );
        }
    }
    Ok(())
}

fn header(size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_size(size);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    h
}

fn add_bytes<W: std::io::Write>(
    tar: &mut tar::Builder<W>,
    name: &str,
    bytes: &[u8],
) -> anyhow::Result<()> {
    let mut h = header(bytes.len() as u64);
    tar.append_data(&mut h, name, bytes)
        .with_context(|| format!("cannot add {name} to the archive"))
}

/// Streams the file at `path` into the archive as `name`.
fn add_file<W: std::io::Write>(
    tar: &mut tar::Builder<W>,
    name: &str,
    path: &Path,
) -> anyhow::Result<()> {
    let f = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let size = f.metadata()?.len();
    let mut h = header(size);
    tar.append_data(&mut h, name, BufReader::new(f))
        .with_context(|| format!("cannot add {} to {name}", path.display()))
}

/// The images an OCI archive names in its index.json (`io.containerd.image.name`, else
/// `org.opencontainers.image.ref.name`), with their digests. Reads the archive's entries
/// in turn and only index.json's bytes.
fn archive_names(path: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let f = File::open(path).context("cannot read it")?;
    let mut archive = tar::Archive::new(BufReader::new(f));
    for entry in archive.entries().context("cannot read it as a tar")? {
        let entry = entry.context("cannot read it as a tar")?;
        let name = entry.path()?.to_string_lossy().into_owned();
        if name.trim_start_matches("./") != "index.json" {
            continue;
        }
        if entry.size() > 4 * 1024 * 1024 {
            bail!("its index.json is {} bytes", entry.size());
        }
        let index: serde_json::Value =
            serde_json::from_reader(entry).context("its index.json is not valid JSON")?;
        let names = index["manifests"]
            .as_array()
            .context("its index.json has no manifests list")?
            .iter()
            .map(|m| {
                let a = &m["annotations"];
                let name = a["io.containerd.image.name"]
                    .as_str()
                    .or(a["org.opencontainers.image.ref.name"].as_str())
                    .unwrap_or("(unnamed)");
                (
                    name.to_string(),
                    m["digest"].as_str().unwrap_or("?").to_string(),
                )
            })
            .collect::<Vec<_>>();
        if names.is_empty() {
            bail!("its index.json lists no image");
        }
        return Ok(names);
    }
    bail!("it has no index.json")
}

/// The bundle's README: what is in it and the install steps.
fn readme(kagami: &[(String, String)], images: &[(String, String)]) -> String {
    let mut s = format!(
        "# kagami {} air-gap bundle\n\n\
         - `images/kagami.tar`: the kagami image (OCI archive).\n\
         - `images/preload.tar`: the images below (one OCI archive, each image named).\n\
         - `images.txt`: those images and their digests.\n\
         - `deploy/kubernetes/`: the DaemonSet and its configuration.\n\n\
         ## Install\n\n\
         On every node (K3s imports archives from its images folder at start):\n\n\
         ```\n\
         cp images/kagami.tar images/preload.tar /var/lib/rancher/k3s/agent/images/\n\
         ```\n\n\
         or, with containerd alone:\n\n\
         ```\n\
         ctr -n k8s.io images import images/kagami.tar\n\
         ctr -n k8s.io images import images/preload.tar\n\
         ```\n\n\
         Edit `deploy/kubernetes/configmap.yaml` (your registries.yaml), then:\n\n\
         ```\n\
         kubectl apply -k deploy/kubernetes\n\
         ```\n\n\
         To serve the images from kagami's store (and share them between nodes) instead:\n\
         `kagami import images/preload.tar` on a node where `kagami serve` runs.\n\n\
         ## The kagami image\n\n",
        env!("CARGO_PKG_VERSION")
    );
    for (name, digest) in kagami {
        s.push_str(&format!("- {name} `{digest}`\n"));
    }
    s.push_str("\n## Pre-loaded images\n\n");
    for (name, digest) in images {
        s.push_str(&format!("- {name} `{digest}`\n"));
    }
    s
}
