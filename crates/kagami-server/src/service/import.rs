//! `kagami import`: loads images from air-gap tarballs into the store, so that this node
//! serves them and shares them with the other nodes.
//!
//! Accepted inputs (see docs/import.md):
//! - an OCI image layout directory (`oci-layout`, `index.json`, `blobs/<alg>/<hex>`);
//! - a tar of one (`ctr images export`, `skopeo copy ... oci-archive:`, `docker save` from
//!   Docker 25 on, which writes both forms);
//! - a `docker save` tarball (`manifest.json`): its layers are uncompressed tars, so a Docker
//!   schema2 manifest is built for them — same content as the registry's image, a different
//!   manifest digest.
//!
//! Tars are read entry by entry and unpacked into a temp directory under the store's `tmp/`
//! (emptied by the store at open, so a crash leaves nothing behind for long); every blob then
//! goes through `Store::begin` → `write` → `commit`, which verifies it against its digest. A
//! blob already stored is skipped. Blobs are written before the manifests that name them,
//! manifests before the tags that point at them: an import that fails half-way leaves
//! verified content and no tag pointing at anything missing.

use std::collections::HashSet;
use std::io::{self, Read as _};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, PoisonError, RwLock};
use std::time::SystemTime;

use kagami_config::{Digest, Reference};
use kagami_store::{Begin, CHUNK, StoreError, TagEntry};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::AsyncReadExt;

use crate::peers::Cluster;
use kagami_config::oci::{
    DOCKER_CONFIG, DOCKER_LAYER, DOCKER_LAYER_GZIP, DOCKER_MANIFEST, Descriptor, Hasher,
    MAX_MANIFEST_SIZE as MAX_MANIFEST, ManifestView, is_index,
};
use kagami_config::reference::Algorithm;

/// Imports air-gap archives into the store (see the module's documentation).
pub(crate) struct Importer {
    store: kagami_store::Store,
    config: Arc<RwLock<Arc<kagami_config::Config>>>,
    cluster: Cluster,
    /// The admin credential, whose data directory nothing may be imported from.
    admin: Arc<OnceLock<crate::admin::Admin>>,
}

impl Importer {
    pub(crate) fn new(
        deps: &crate::service::Deps,
        config: Arc<RwLock<Arc<kagami_config::Config>>>,
        admin: Arc<OnceLock<crate::admin::Admin>>,
    ) -> Importer {
        Importer {
            store: deps.store.clone(),
            config,
            cluster: deps.cluster.clone(),
            admin,
        }
    }

    fn store(&self) -> &kagami_store::Store {
        &self.store
    }

    fn config(&self) -> Arc<kagami_config::Config> {
        self.config
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn peers(&self) -> Option<&Arc<crate::peers::Peers>> {
        self.cluster.peers()
    }

    /// Imports the OCI layout directory, OCI archive or `docker save` tarball at `path`
    /// into the store. `name` names the image when the archive gives none (or adds a name
    /// when the archive holds one image); see docs/import.md.
    pub(crate) async fn import(
        &self,
        path: &Path,
        name: Option<&str>,
    ) -> Result<ImportReport, ImportError> {
        import_path(self, path, name).await
    }
}

const CONTAINERD_NAME: &str = "io.containerd.image.name";
const OCI_REF_NAME: &str = "org.opencontainers.image.ref.name";
/// The largest image config read from a `docker save` archive.
const MAX_CONFIG: u64 = 16 * 1024 * 1024;

/// What one import did.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImportReport {
    /// The file or directory imported, as given.
    pub path: String,
    /// `oci-layout`, `oci-archive`, `docker-archive` or `docker-directory`.
    pub format: String,
    /// Every image name recorded (and images stored by digest only, with `name: null`).
    pub images: Vec<ImportedImage>,
    /// Blobs (layers, configs, manifests) written to the store.
    pub blobs_added: u64,
    /// Blobs that were already in the store.
    pub blobs_skipped: u64,
    /// Bytes of the blobs written.
    pub bytes_added: u64,
    /// Things worth knowing that did not stop the import (platforms missing from an index,
    /// registries this mirror does not serve, ...).
    pub notes: Vec<String>,
}

/// One image of an import.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImportedImage {
    /// `registry/repository:tag`; `None` when the archive gave the image no name.
    pub name: Option<String>,
    /// The digest of the manifest (or index) the name points to.
    pub digest: String,
    pub media_type: String,
    /// True when the tag was advertised to the other nodes.
    pub shared: bool,
}

/// Why an import failed. Messages name the archive and the entry in it.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{}: {why}", path.display())]
    Denied { path: PathBuf, why: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{}: not an OCI image layout, OCI archive or docker save archive: {why}",
        path.display()
    )]
    Unrecognised { path: PathBuf, why: String },
    #[error("{}: {file}: {why}", path.display())]
    Invalid {
        path: PathBuf,
        file: String,
        why: String,
    },
    #[error("{}: {what} {digest} is not in the archive (no {file})", path.display())]
    MissingBlob {
        path: PathBuf,
        what: String,
        digest: String,
        file: String,
    },
    #[error("{}: {why}", path.display())]
    Names { path: PathBuf, why: String },
    #[error("invalid image name {name:?}: {why}")]
    Name { name: String, why: String },
    #[error("{}: storing {file}: {source}", path.display())]
    Store {
        path: PathBuf,
        file: String,
        #[source]
        source: StoreError,
    },
}

impl ImportError {
    /// True when the input is at fault (HTTP 400), false for the server's own failures.
    pub fn is_bad_input(&self) -> bool {
        !matches!(self, ImportError::Store { .. })
            && !matches!(self, ImportError::Io { source, .. } if source.kind() != io::ErrorKind::NotFound && source.kind() != io::ErrorKind::PermissionDenied)
    }
}

/// The body of `POST /kagami/import`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImportRequest {
    /// An absolute path on the server's machine.
    pub path: String,
    /// The name for images the archive does not name.
    #[serde(default)]
    pub name: Option<String>,
}

async fn import_path(
    state: &Importer,
    path: &Path,
    name: Option<&str>,
) -> Result<ImportReport, ImportError> {
    let given = name.map(GivenName::parse).transpose()?;
    // Everything below reads the real path: a symbolic link is followed once, here, and its
    // target is what must not be in kagami's own directories.
    let real = std::fs::canonicalize(path).map_err(|source| ImportError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    refuse_own_files(state, path, &real)?;
    let meta = tokio::fs::metadata(&real)
        .await
        .map_err(|source| ImportError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    let mut ctx = Ctx {
        state,
        archive: path.to_path_buf(),
        root: real.clone(),
        confined: real.clone(),
        done: HashSet::new(),
        report: ImportReport {
            path: path.display().to_string(),
            format: String::new(),
            images: Vec::new(),
            blobs_added: 0,
            blobs_skipped: 0,
            bytes_added: 0,
            notes: Vec::new(),
        },
    };
    let _temp;
    if meta.is_dir() {
        ctx.report.format = "oci-layout".into();
    } else {
        let dir = state.store().root().join("tmp").join(format!(
            "import-{}-{}",
            std::process::id(),
            NEXT_TEMP.fetch_add(1, Ordering::Relaxed)
        ));
        _temp = TempDir(dir.clone());
        let (a, d) = (real.clone(), dir.clone());
        tokio::task::spawn_blocking(move || unpack(&a, &d))
            .await
            .map_err(|e| ImportError::Io {
                path: path.to_path_buf(),
                source: io::Error::other(e),
            })??;
        ctx.confined = std::fs::canonicalize(&dir).map_err(|source| ImportError::Io {
            path: dir.clone(),
            source,
        })?;
        ctx.root = dir;
        ctx.report.format = "oci-archive".into();
    }
    // A tar made of a directory (`tar cf x.tar layout/`) has it all under one top directory.
    if !ctx.root.join("index.json").is_file()
        && !ctx.root.join("manifest.json").is_file()
        && let Some(sub) = single_subdirectory(&ctx.root)
    {
        ctx.root = sub;
    }
    if ctx.root.join("index.json").is_file() {
        if !ctx.root.join("oci-layout").is_file() {
            ctx.report
                .notes
                .push("no oci-layout file; read as an OCI image layout all the same".into());
        }
        import_oci(&mut ctx, given.as_ref()).await?;
    } else if ctx.root.join("manifest.json").is_file() {
        ctx.report.format = if meta.is_dir() {
            "docker-directory".into()
        } else {
            "docker-archive".into()
        };
        import_docker(&mut ctx, given.as_ref()).await?;
    } else {
        return Err(ImportError::Unrecognised {
            path: path.to_path_buf(),
            why: if meta.is_dir() {
                "the directory has neither index.json nor manifest.json".into()
            } else {
                "the tar has neither index.json nor manifest.json at its top".into()
            },
        });
    }
    tracing::info!(
        path = %path.display(),
        format = %ctx.report.format,
        images = ctx.report.images.len(),
        blobs_added = ctx.report.blobs_added,
        blobs_skipped = ctx.report.blobs_skipped,
        "imported"
    );
    Ok(ctx.report)
}

/// Refuses to import anything inside kagami's data directory (its store included): files
/// there are written by kagami for clients (a blob fetched on anyone's request is a file
/// there), so importing one would let a client plant images.
fn refuse_own_files(state: &Importer, given: &Path, real: &Path) -> Result<(), ImportError> {
    let mut own = vec![state.store().root().to_path_buf()];
    if let Some(admin) = state.admin.get() {
        own.push(admin.data_dir().to_path_buf());
    }
    for dir in own {
        let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
        if real.starts_with(&dir) {
            return Err(ImportError::Denied {
                path: given.to_path_buf(),
                why: format!(
                    "is inside kagami's data directory {} (whose files clients can have written); copy the archive elsewhere first",
                    dir.display()
                ),
            });
        }
    }
    Ok(())
}

/// The only entry of `dir`, when it is a directory.
fn single_subdirectory(dir: &Path) -> Option<PathBuf> {
    let mut entries = std::fs::read_dir(dir).ok()?;
    let only = entries.next()?.ok()?;
    if entries.next().is_some() || !only.file_type().ok()?.is_dir() {
        return None;
    }
    Some(only.path())
}

static NEXT_TEMP: AtomicU64 = AtomicU64::new(0);

/// Removes the unpacked archive when the import ends, however it ends.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.0.display(), error = %e, "cannot remove an import's temp directory (the store empties tmp/ at its next start)");
        }
    }
}

/// Unpacks the tar at `archive` into `dest`, entry by entry (blocking).
fn unpack(archive: &Path, dest: &Path) -> Result<(), ImportError> {
    let corrupt = |why: String| ImportError::Invalid {
        path: archive.to_path_buf(),
        file: "tar".into(),
        why,
    };
    let io_err = |source| ImportError::Io {
        path: archive.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(archive).map_err(io_err)?;
    let mut magic = [0u8; 4];
    let n = f.read(&mut magic).map_err(io_err)?;
    let why = match &magic[..n] {
        [0x1f, 0x8b, ..] => Some("it is gzip-compressed; gunzip it first"),
        [0x28, 0xb5, 0x2f, 0xfd] => Some("it is zstd-compressed; unzstd it first"),
        _ => None,
    };
    if let Some(why) = why {
        return Err(ImportError::Unrecognised {
            path: archive.to_path_buf(),
            why: why.into(),
        });
    }
    drop(f);
    std::fs::create_dir_all(dest).map_err(|source| ImportError::Io {
        path: dest.to_path_buf(),
        source,
    })?;
    let f = std::fs::File::open(archive).map_err(io_err)?;
    let mut ar = tar::Archive::new(io::BufReader::with_capacity(CHUNK, f));
    ar.set_preserve_permissions(false);
    ar.set_preserve_mtime(false);
    ar.set_overwrite(true);
    let entries = ar
        .entries()
        .map_err(|e| corrupt(format!("not a tar archive: {e}")))?;
    for entry in entries {
        let mut entry =
            entry.map_err(|e| corrupt(format!("not a tar archive, or a corrupt one: {e}")))?;
        let name = entry
            .path()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "?".into());
        use tar::EntryType as T;
        match entry.header().entry_type() {
            T::Regular | T::Continuous | T::Directory | T::Symlink | T::Link => {}
            _ => continue,
        }
        entry.unpack_in(dest).map_err(|e| ImportError::Invalid {
            path: archive.to_path_buf(),
            file: name,
            why: format!("cannot unpack (truncated or corrupt tar?): {e}"),
        })?;
    }
    Ok(())
}

/// A `--name`: the reference, and whether a tag was written (else a tag from the archive
/// may complete it).
struct GivenName {
    reference: Reference,
    explicit_tag: bool,
}

impl GivenName {
    fn parse(s: &str) -> Result<GivenName, ImportError> {
        let reference = parse_name(s)?;
        let last = s.rsplit('/').next().unwrap_or(s);
        Ok(GivenName {
            reference,
            explicit_tag: last.contains(':') || s.contains('@'),
        })
    }

    /// This name with `tag` when the name had no tag of its own.
    fn with_tag(&self, tag: &str) -> Result<Reference, ImportError> {
        if self.explicit_tag {
            return Ok(self.reference.clone());
        }
        kagami_config::reference::validate_tag(tag).map_err(|why| ImportError::Name {
            name: tag.into(),
            why,
        })?;
        Ok(Reference {
            tag: Some(tag.into()),
            ..self.reference.clone()
        })
    }
}

fn parse_name(s: &str) -> Result<Reference, ImportError> {
    Reference::parse(s).map_err(|e| ImportError::Name {
        name: s.into(),
        why: e.to_string(),
    })
}

struct Ctx<'a> {
    state: &'a Importer,
    /// What the user named (for messages).
    archive: PathBuf,
    /// The directory read: the layout itself, or where the tar was unpacked.
    root: PathBuf,
    /// The canonical directory no file read may leave through a symbolic link: the layout
    /// or `docker save` directory imported, or where the tar was unpacked.
    confined: PathBuf,
    /// Manifests and indexes already imported.
    done: HashSet<Digest>,
    report: ImportReport,
}

/// The platform a descriptor names, for notes.
fn platform(d: &Descriptor) -> String {
    d.platform
        .as_ref()
        .map_or_else(|| "platform unknown".into(), ToString::to_string)
}

/// An annotation of a descriptor.
fn annotation<'d>(d: &'d Descriptor, key: &str) -> Option<&'d str> {
    d.annotations.as_ref()?.get(key)?.as_str()
}

/// A manifest, index or `index.json` read with the one parser; a descriptor it cannot
/// read stops the import.
fn read_view(ctx: &Ctx<'_>, rel: &str, bytes: &[u8]) -> Result<ManifestView, ImportError> {
    let v =
        ManifestView::parse(bytes).map_err(|e| ctx.invalid(rel, format!("invalid JSON: {e}")))?;
    match v.rejected.first() {
        Some(why) => Err(ctx.invalid(rel, why.clone())),
        None => Ok(v),
    }
}

fn blob_rel(d: &Digest) -> String {
    format!("blobs/{}/{}", d.algorithm().name(), d.hex())
}

impl Ctx<'_> {
    fn invalid(&self, file: impl Into<String>, why: impl Into<String>) -> ImportError {
        ImportError::Invalid {
            path: self.archive.clone(),
            file: file.into(),
            why: why.into(),
        }
    }

    /// The real path of `rel` inside the layout, or `None` when it does not exist. Refuses
    /// names that leave the layout (`..`, absolute paths, symbolic links pointing out of the
    /// directory or tar imported).
    fn locate(&self, rel: &str) -> Result<Option<PathBuf>, ImportError> {
        let p = Path::new(rel);
        if p.components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(self.invalid(rel, "names a file outside the archive"));
        }
        let full = self.root.join(p);
        if !full.exists() {
            return Ok(None);
        }
        let real = std::fs::canonicalize(&full).map_err(|source| ImportError::Io {
            path: full.clone(),
            source,
        })?;
        if !real.starts_with(&self.confined) {
            return Err(self.invalid(
                rel,
                "is a symbolic link to a file outside what is imported: refused",
            ));
        }
        if !real.is_file() {
            return Err(self.invalid(rel, "is not a regular file"));
        }
        Ok(Some(real))
    }

    /// Reads a small file (JSON) whole, refusing one larger than `max`.
    async fn read_small(&self, rel: &str, max: u64) -> Result<Option<Vec<u8>>, ImportError> {
        let Some(full) = self.locate(rel)? else {
            return Ok(None);
        };
        let f = tokio::fs::File::open(&full)
            .await
            .map_err(|source| ImportError::Io {
                path: full.clone(),
                source,
            })?;
        let mut buf = Vec::new();
        f.take(max + 1)
            .read_to_end(&mut buf)
            .await
            .map_err(|source| ImportError::Io {
                path: full.clone(),
                source,
            })?;
        if buf.len() as u64 > max {
            return Err(self.invalid(rel, format!("larger than {max} bytes")));
        }
        Ok(Some(buf))
    }

    fn parse_json<T: serde::de::DeserializeOwned>(
        &self,
        rel: &str,
        bytes: &[u8],
    ) -> Result<T, ImportError> {
        serde_json::from_slice(bytes).map_err(|e| self.invalid(rel, format!("invalid JSON: {e}")))
    }

    fn store_err(&self, file: &str, e: StoreError) -> ImportError {
        match e {
            StoreError::DigestMismatch { expected, actual } => self.invalid(
                file,
                format!(
                    "content does not match its digest (expected {expected}, got {actual}); nothing stored for it"
                ),
            ),
            StoreError::SizeMismatch {
                expected, actual, ..
            } => self.invalid(
                file,
                format!("{actual} bytes where {expected} were announced; nothing stored for it"),
            ),
            source => ImportError::Store {
                path: self.archive.clone(),
                file: file.into(),
                source,
            },
        }
    }

    /// Writes the file `rel` into the store as blob `d` (verified by the store).
    async fn put_file(&mut self, rel: &str, full: &Path, d: &Digest) -> Result<(), ImportError> {
        let size = tokio::fs::metadata(full)
            .await
            .map_err(|source| ImportError::Io {
                path: full.to_path_buf(),
                source,
            })?
            .len();
        let store = self.state.store().clone();
        for _ in 0..3 {
            if store.blob_size(d).is_some() {
                self.report.blobs_skipped += 1;
                return Ok(());
            }
            match store
                .begin(d, Some(size))
                .map_err(|e| self.store_err(rel, e))?
            {
                Begin::Writer(mut w) => {
                    let mut f =
                        tokio::fs::File::open(full)
                            .await
                            .map_err(|source| ImportError::Io {
                                path: full.to_path_buf(),
                                source,
                            })?;
                    let mut buf = vec![0u8; CHUNK];
                    loop {
                        let n = f.read(&mut buf).await.map_err(|source| ImportError::Io {
                            path: full.to_path_buf(),
                            source,
                        })?;
                        if n == 0 {
                            break;
                        }
                        w.write(&buf[..n])
                            .await
                            .map_err(|e| self.store_err(rel, e))?;
                    }
                    w.commit().await.map_err(|e| self.store_err(rel, e))?;
                    self.report.blobs_added += 1;
                    self.report.bytes_added += size;
                    return Ok(());
                }
                Begin::Joined(inflight) => {
                    // Being fetched right now: wait for that write (and try again if it fails).
                    if inflight.finished().await {
                        self.report.blobs_skipped += 1;
                        return Ok(());
                    }
                }
            }
        }
        Err(self.invalid(rel, "another write of this blob kept failing"))
    }

    /// Writes bytes held in memory (a manifest or config) as blob `d`.
    async fn put_bytes(&mut self, what: &str, bytes: &[u8], d: &Digest) -> Result<(), ImportError> {
        let added = self
            .state
            .store()
            .put_bytes(d, bytes)
            .await
            .map_err(|e| self.store_err(what, e))?;
        if added {
            self.report.blobs_added += 1;
            self.report.bytes_added += bytes.len() as u64;
        } else {
            self.report.blobs_skipped += 1;
        }
        Ok(())
    }

    /// Records `name` → `digest`, advertises it for shared registries.
    async fn tag(
        &mut self,
        name: &Reference,
        digest: &Digest,
        media_type: &str,
    ) -> Result<(), ImportError> {
        let Some(tag) = &name.tag else {
            if name.digest.as_ref() != Some(digest) {
                self.report.notes.push(format!(
                    "{name} names a digest, not a tag: {digest} is stored by digest only"
                ));
            }
            self.report.images.push(ImportedImage {
                name: Some(name.to_string()),
                digest: digest.to_string(),
                media_type: media_type.into(),
                shared: false,
            });
            return Ok(());
        };
        let entry = TagEntry {
            digest: digest.clone(),
            media_type: media_type.into(),
            fetched_at: SystemTime::now(),
        };
        self.state
            .store()
            .put_tag(&name.registry, &name.repository, tag, entry)
            .map_err(|e| self.store_err(&format!("tag {name}"), e))?;
        let config = self.state.config();
        let mut shared = false;
        if kagami_config::plan::is_shared(&config, &name.registry)
            && let Some(peers) = self.state.peers()
        {
            peers
                .router
                .advertise(vec![
                    crate::peers::ContentKey::tag(&name.registry, &name.repository, tag)
                        .to_string(),
                ])
                .await;
            shared = true;
        }
        if config.mirror_for(&name.registry).is_none() {
            self.report.notes.push(format!(
                "registry {} is not served by this mirror (no mirrors entry and no \"*\"): {name} is stored but not served until the configuration names it",
                name.registry
            ));
        }
        self.report.images.push(ImportedImage {
            name: Some(format!("{}/{}:{tag}", name.registry, name.repository)),
            digest: digest.to_string(),
            media_type: media_type.into(),
            shared,
        });
        Ok(())
    }

    /// A name found in the archive; one that is not a valid reference is noted and ignored.
    fn archive_name(&mut self, s: &str) -> Option<Reference> {
        match Reference::parse(s) {
            Ok(r) => Some(r),
            Err(e) => {
                self.report
                    .notes
                    .push(format!("the archive's image name {s:?} is ignored: {e}"));
                None
            }
        }
    }

    fn unnamed(&mut self, digest: &Digest, media_type: &str) {
        self.report.notes.push(format!(
            "{digest} has no name in the archive: stored by digest only (give one with --name)"
        ));
        self.report.images.push(ImportedImage {
            name: None,
            digest: digest.to_string(),
            media_type: media_type.into(),
            shared: false,
        });
    }
}

/// Gives every image its names: its own, `--name` for the one without any, and `--name` as
/// a second name when the archive holds a single image.
fn assign_names(
    archive: &Path,
    own: &mut [(Digest, Vec<Reference>)],
    given: Option<&GivenName>,
    given_used: bool,
) -> Result<(), ImportError> {
    let Some(given) = given else {
        if own.iter().all(|(_, n)| n.is_empty()) {
            return Err(ImportError::Names {
                path: archive.to_path_buf(),
                why: "the archive names no image; give a name with --name".into(),
            });
        }
        return Ok(());
    };
    let distinct: HashSet<&Digest> = own.iter().map(|(d, _)| d).collect();
    let unnamed: HashSet<Digest> = own
        .iter()
        .filter(|(_, n)| n.is_empty())
        .map(|(d, _)| d.clone())
        .collect();
    let target = match (unnamed.len(), distinct.len()) {
        (1, _) => unnamed.into_iter().next(),
        // --name already completed a tag from the archive (`ref.name: 1.27`).
        (0, _) if given_used => None,
        (0, 1) => distinct.into_iter().next().cloned(),
        (0, n) => {
            return Err(ImportError::Names {
                path: archive.to_path_buf(),
                why: format!("--name is ambiguous: the archive holds {n} images, all named"),
            });
        }
        (n, _) => {
            return Err(ImportError::Names {
                path: archive.to_path_buf(),
                why: format!("{n} images in the archive have no name and --name names one"),
            });
        }
    };
    if let Some(t) = target
        && let Some((_, names)) = own.iter_mut().find(|(d, _)| *d == t)
        && !names.contains(&given.reference)
    {
        names.push(given.reference.clone());
    }
    Ok(())
}

async fn import_oci(ctx: &mut Ctx<'_>, given: Option<&GivenName>) -> Result<(), ImportError> {
    let bytes = ctx
        .read_small("index.json", MAX_MANIFEST)
        .await?
        .ok_or_else(|| ctx.invalid("index.json", "missing"))?;
    let descs = read_view(ctx, "index.json", &bytes)?.manifests;
    if descs.is_empty() {
        return Err(ctx.invalid("index.json", "lists no image"));
    }
    // Names first: a naming problem stops the import before anything is written.
    let mut own: Vec<(Digest, Vec<Reference>)> = Vec::new();
    let mut given_used = false;
    for desc in &descs {
        let d = desc.digest.clone();
        let mut names = Vec::new();
        if let Some(n) = annotation(desc, CONTAINERD_NAME) {
            names.extend(ctx.archive_name(n));
        } else if let Some(r) = annotation(desc, OCI_REF_NAME) {
            if r.contains('/') || r.contains(':') || r.contains('@') {
                names.extend(ctx.archive_name(r));
            } else if let Some(g) = given {
                names.push(g.with_tag(r)?);
                given_used = true;
            }
        }
        match own.iter_mut().find(|(x, _)| *x == d) {
            Some((_, v)) => v.extend(names),
            None => own.push((d, names)),
        }
    }
    assign_names(&ctx.archive, &mut own, given, given_used)?;
    for (d, names) in own {
        let desc = descs
            .iter()
            .find(|x| x.digest == d)
            .expect("every digest comes from a descriptor")
            .clone();
        let mt = Box::pin(import_manifest(ctx, &desc, true))
            .await?
            .expect("a top-level manifest is imported or fails");
        if names.is_empty() {
            ctx.unnamed(&d, &mt);
        }
        let mut seen = HashSet::new();
        for n in names {
            if seen.insert(n.to_string()) {
                ctx.tag(&n, &d, &mt).await?;
            }
        }
    }
    Ok(())
}

/// Imports a manifest or index and everything it names that the archive holds; returns its
/// media type, or `None` when it was skipped (a platform of an index missing from the
/// archive, which is noted).
async fn import_manifest(
    ctx: &mut Ctx<'_>,
    desc: &Descriptor,
    top: bool,
) -> Result<Option<String>, ImportError> {
    let d = desc.digest.clone();
    let rel = blob_rel(&d);
    let Some(bytes) = ctx.read_small(&rel, MAX_MANIFEST).await? else {
        if top {
            return Err(ImportError::MissingBlob {
                path: ctx.archive.clone(),
                what: "manifest".into(),
                digest: d.to_string(),
                file: rel,
            });
        }
        ctx.report.notes.push(format!(
            "platform {} ({d}) is not in the archive: skipped",
            platform(desc)
        ));
        return Ok(None);
    };
    check_content(ctx, &rel, &bytes, &d, desc.size)?;
    let v = read_view(ctx, &rel, &bytes)?;
    let mt = Some(desc.media_type.clone())
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| v.guess_media_type().to_string());
    if ctx.done.contains(&d) {
        return Ok(Some(mt));
    }
    if is_index(&mt) {
        let children = &v.manifests;
        let mut any = false;
        for c in children {
            if Box::pin(import_manifest(ctx, c, false)).await?.is_some() {
                any = true;
            }
        }
        if !any {
            return Err(ctx.invalid(
                &rel,
                format!(
                    "none of the {} manifests this index lists is in the archive",
                    children.len()
                ),
            ));
        }
    } else if v.config.is_some() || !v.layers.is_empty() {
        let mut blobs: Vec<(String, &Descriptor)> = Vec::new();
        if let Some(c) = &v.config {
            blobs.push(("config".into(), c));
        }
        for (i, l) in v.layers.iter().enumerate() {
            blobs.push((format!("layer {i}"), l));
        }
        // Every blob must be there before anything of this image is written.
        let mut located = Vec::new();
        for (what, b) in &blobs {
            let bd = b.digest.clone();
            let brel = blob_rel(&bd);
            let Some(full) = ctx.locate(&brel)? else {
                if top {
                    return Err(ImportError::MissingBlob {
                        path: ctx.archive.clone(),
                        what: format!("{what} of manifest {d},"),
                        digest: bd.to_string(),
                        file: brel,
                    });
                }
                ctx.report.notes.push(format!(
                    "platform {} ({d}) is incomplete in the archive ({what} {bd} missing): skipped",
                    platform(desc)
                ));
                return Ok(None);
            };
            let len = std::fs::metadata(&full)
                .map_err(|source| ImportError::Io {
                    path: full.clone(),
                    source,
                })?
                .len();
            if let Some(size) = b.size
                && size != len
            {
                return Err(ctx.invalid(
                    &brel,
                    format!("is {len} bytes, but {what} of manifest {d} says {size}"),
                ));
            }
            located.push((brel, full, bd));
        }
        for (brel, full, bd) in located {
            ctx.put_file(&brel, &full, &bd).await?;
        }
    } else {
        return Err(ctx.invalid(&rel, format!("unsupported manifest media type {mt}")));
    }
    ctx.put_bytes(&rel, &bytes, &d).await?;
    ctx.state
        .store()
        .put_media_type(&d, &mt)
        .map_err(|e| ctx.store_err(&rel, e))?;
    ctx.done.insert(d);
    Ok(Some(mt))
}

/// Checks bytes read whole against their digest and announced size.
fn check_content(
    ctx: &Ctx<'_>,
    rel: &str,
    bytes: &[u8],
    d: &Digest,
    size: Option<u64>,
) -> Result<(), ImportError> {
    let actual = digest_of(d, bytes);
    if &actual != d {
        return Err(ctx.invalid(
            rel,
            format!(
                "content does not match its digest (expected {d}, got {actual}); nothing stored for it"
            ),
        ));
    }
    if let Some(size) = size
        && size != bytes.len() as u64
    {
        return Err(ctx.invalid(
            rel,
            format!("is {} bytes, its descriptor says {size}", bytes.len()),
        ));
    }
    Ok(())
}

fn digest_of(like: &Digest, bytes: &[u8]) -> Digest {
    Hasher::digest(like.algorithm(), bytes)
}

/// One image of a `docker save` manifest.json.
#[derive(Debug, Deserialize)]
struct DockerEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers", default)]
    layers: Vec<String>,
}

async fn import_docker(ctx: &mut Ctx<'_>, given: Option<&GivenName>) -> Result<(), ImportError> {
    let bytes = ctx
        .read_small("manifest.json", MAX_MANIFEST)
        .await?
        .ok_or_else(|| ctx.invalid("manifest.json", "missing"))?;
    let entries: Vec<DockerEntry> = ctx.parse_json("manifest.json", &bytes)?;
    if entries.is_empty() {
        return Err(ctx.invalid("manifest.json", "lists no image"));
    }
    // Build every manifest first (hashing configs and layers), then write.
    struct Built {
        config_rel: String,
        config: Vec<u8>,
        config_digest: Digest,
        layers: Vec<(String, PathBuf, Digest)>,
        manifest: Vec<u8>,
        digest: Digest,
    }
    let mut built = Vec::new();
    let mut own = Vec::new();
    for e in &entries {
        let config = ctx
            .read_small(&e.config, MAX_CONFIG)
            .await?
            .ok_or_else(|| ImportError::MissingBlob {
                path: ctx.archive.clone(),
                what: "image config".into(),
                digest: e.config.clone(),
                file: e.config.clone(),
            })?;
        let config_digest = Hasher::digest(Algorithm::Sha256, &config);
        if let Some(named) = digest_in_name(&e.config)
            && named != config_digest
        {
            return Err(ctx.invalid(
                &e.config,
                format!(
                    "content does not match its digest (expected {named}, got {config_digest}); nothing stored for it"
                ),
            ));
        }
        let cfg: Value = ctx.parse_json(&e.config, &config)?;
        let diff_ids: Vec<String> = cfg["rootfs"]["diff_ids"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        if !diff_ids.is_empty() && diff_ids.len() != e.layers.len() {
            return Err(ctx.invalid(
                &e.config,
                format!(
                    "names {} layers (rootfs.diff_ids), manifest.json lists {}",
                    diff_ids.len(),
                    e.layers.len()
                ),
            ));
        }
        let mut layers = Vec::new();
        let mut descs = Vec::new();
        for (i, rel) in e.layers.iter().enumerate() {
            let full = ctx.locate(rel)?.ok_or_else(|| ImportError::MissingBlob {
                path: ctx.archive.clone(),
                what: format!("layer {i} of {}", e.config),
                digest: diff_ids.get(i).cloned().unwrap_or_default(),
                file: rel.clone(),
            })?;
            let f = full.clone();
            let (digest, size, gzip) = tokio::task::spawn_blocking(move || hash_file(&f))
                .await
                .map_err(|e| ImportError::Io {
                    path: full.clone(),
                    source: io::Error::other(e),
                })?
                .map_err(|source| ImportError::Io {
                    path: full.clone(),
                    source,
                })?;
            if let Some(named) = digest_in_name(rel)
                && named != digest
            {
                return Err(ctx.invalid(
                    rel,
                    format!(
                        "content does not match its digest (expected {named}, got {digest}); nothing stored for it"
                    ),
                ));
            }
            if !gzip
                && let Some(id) = diff_ids.get(i)
                && *id != digest.to_string()
            {
                return Err(ctx.invalid(
                    rel,
                    format!(
                        "content does not match the config's diff_id {id} (got {digest}); nothing stored for it"
                    ),
                ));
            }
            descs.push(serde_json::json!({
                "mediaType": if gzip { DOCKER_LAYER_GZIP } else { DOCKER_LAYER },
                "size": size,
                "digest": digest.to_string(),
            }));
            layers.push((rel.clone(), full, digest));
        }
        let manifest = serde_json::to_vec_pretty(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": {
                "mediaType": DOCKER_CONFIG,
                "size": config.len(),
                "digest": config_digest.to_string(),
            },
            "layers": descs,
        }))
        .expect("a manifest serialises");
        let digest = Hasher::digest(Algorithm::Sha256, &manifest);
        let mut names = Vec::new();
        for t in e.repo_tags.iter().flatten() {
            names.extend(ctx.archive_name(t));
        }
        own.push((digest.clone(), names));
        built.push(Built {
            config_rel: e.config.clone(),
            config,
            config_digest,
            layers,
            manifest,
            digest,
        });
    }
    assign_names(&ctx.archive, &mut own, given, false)?;
    for (b, (_, names)) in built.into_iter().zip(own) {
        for (rel, full, d) in &b.layers {
            ctx.put_file(rel, full, d).await?;
        }
        ctx.put_bytes(&b.config_rel, &b.config, &b.config_digest)
            .await?;
        let what = format!("the manifest built for {}", b.config_rel);
        ctx.put_bytes(&what, &b.manifest, &b.digest).await?;
        ctx.state
            .store()
            .put_media_type(&b.digest, DOCKER_MANIFEST)
            .map_err(|e| ctx.store_err(&what, e))?;
        if names.is_empty() {
            ctx.unnamed(&b.digest, DOCKER_MANIFEST);
        }
        for n in names {
            ctx.tag(&n, &b.digest, DOCKER_MANIFEST).await?;
        }
    }
    ctx.report.notes.push(
        "docker save archives hold uncompressed layers: the manifest kagami built has another digest than the registry's (pull by tag, not by the registry's digest)".into(),
    );
    Ok(())
}

/// `blobs/sha256/<hex>` or `<hex>.json` (docker save's config name): the digest the name
/// claims, if any.
fn digest_in_name(rel: &str) -> Option<Digest> {
    if let Some(rest) = rel.strip_prefix("blobs/")
        && let Some((alg, hex)) = rest.split_once('/')
    {
        return format!("{alg}:{hex}").parse().ok();
    }
    let hex = rel.strip_suffix(".json")?;
    format!("sha256:{hex}").parse().ok()
}

/// sha256 and size of a file, and whether it starts like gzip (blocking, streaming).
fn hash_file(path: &Path) -> io::Result<(Digest, u64, bool)> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Hasher::new(Algorithm::Sha256);
    let mut buf = vec![0u8; CHUNK];
    let mut size = 0u64;
    let mut gzip = None;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if gzip.is_none() {
            gzip = Some(n >= 2 && buf[0] == 0x1f && buf[1] == 0x8b);
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok((h.finish(), size, gzip.unwrap_or(false)))
}
