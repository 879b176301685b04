//! Where things live under the store root, and the scan done at open.
//!
//! ```text
//! <root>/blobs/sha256/<hex>   complete, verified blobs (sha512 beside it when used)
//! <root>/tmp/                 temp files of writes in flight; emptied at open
//! <root>/tags/<key>.json      one file per tag, <key> = sha256 of (registry, repository, tag)
//! <root>/meta/sha256/<hex>    the media type of a manifest blob, as text
//! ```

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use kagami_config::Digest;
use kagami_config::reference::Algorithm;

use crate::StoreError;
use crate::tags::{self, TagEntry, TagFile};

pub(crate) const ALGORITHMS: [Algorithm; 2] = [Algorithm::Sha256, Algorithm::Sha512];

#[derive(Debug, Clone)]
pub(crate) struct Layout {
    root: PathBuf,
}

impl Layout {
    pub(crate) fn new(root: PathBuf) -> Layout {
        Layout { root }
    }
    pub(crate) fn root(&self) -> &Path {
        &self.root
    }
    pub(crate) fn blobs_dir(&self, alg: Algorithm) -> PathBuf {
        self.root.join("blobs").join(alg.name())
    }
    pub(crate) fn blob(&self, d: &Digest) -> PathBuf {
        self.blobs_dir(d.algorithm()).join(d.hex())
    }
    pub(crate) fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }
    pub(crate) fn tags_dir(&self) -> PathBuf {
        self.root.join("tags")
    }
    pub(crate) fn meta_dir(&self, alg: Algorithm) -> PathBuf {
        self.root.join("meta").join(alg.name())
    }
    pub(crate) fn meta(&self, d: &Digest) -> PathBuf {
        self.meta_dir(d.algorithm()).join(d.hex())
    }
}

/// A complete blob found at open.
pub(crate) struct Found {
    pub digest: Digest,
    pub size: u64,
    pub mtime: SystemTime,
}

/// What open found on disk.
pub(crate) struct Scanned {
    pub blobs: Vec<Found>,
    pub media: HashMap<Digest, String>,
    pub tags: Vec<TagFile>,
}

fn ctx<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |e| StoreError::io(op, path, e)
}

/// Creates `dir` and its missing parents, private to the store's user (0700).
pub(crate) fn create_private_dir(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(ctx("create directory", dir))
}

/// Creates the root (0700) and takes an exclusive `flock` on it, held as long as the
/// returned file is open: a second process (or a second `Store` in this one) opening the
/// same root gets [`StoreError::Locked`]. Blocking.
pub(crate) fn lock_root(root: &Path) -> Result<fs::File, StoreError> {
    use std::os::unix::fs::PermissionsExt;
    create_private_dir(root)?;
    // A store created by an older version has 0755 directories: the root alone is enough
    // to keep other users out of everything below it.
    fs::set_permissions(root, fs::Permissions::from_mode(0o700))
        .map_err(ctx("set permissions of", root))?;
    let f = fs::File::open(root).map_err(ctx("open", root))?;
    match rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(f),
        Err(e) if e == rustix::io::Errno::WOULDBLOCK => Err(StoreError::Locked {
            path: root.to_path_buf(),
        }),
        Err(e) => Err(StoreError::io("lock", root, e.into())),
    }
}

/// Creates the directories, empties `tmp/`, and reads blobs, media types and tags.
/// Blocking: run it off the async threads.
pub(crate) fn scan(layout: &Layout) -> Result<Scanned, StoreError> {
    for dir in [
        layout.blobs_dir(Algorithm::Sha256),
        layout.tmp_dir(),
        layout.tags_dir(),
        layout.meta_dir(Algorithm::Sha256),
    ] {
        create_private_dir(&dir)?;
    }
    clean_tmp(&layout.tmp_dir())?;

    let mut blobs = Vec::new();
    for alg in ALGORITHMS {
        let dir = layout.blobs_dir(alg);
        for (path, name) in entries(&dir)? {
            let meta = fs::symlink_metadata(&path).map_err(ctx("stat", &path))?;
            match parse_name(alg, &name) {
                Some(digest) if meta.is_file() => blobs.push(Found {
                    digest,
                    size: meta.len(),
                    mtime: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                }),
                _ if meta.is_dir() => {
                    tracing::warn!(path = %path.display(), "ignoring a directory among the blobs");
                }
                _ => {
                    tracing::warn!(path = %path.display(), "deleting a file that is not a blob");
                    remove_if_exists(&path)?;
                }
            }
        }
    }

    let mut media = HashMap::new();
    for alg in ALGORITHMS {
        let dir = layout.meta_dir(alg);
        for (path, name) in entries(&dir)? {
            let text = fs::read_to_string(&path).ok();
            match (parse_name(alg, &name), text) {
                (Some(d), Some(t)) if tags::check_media_type(&t).is_ok() => {
                    media.insert(d, t);
                }
                _ => {
                    tracing::warn!(path = %path.display(), "deleting an unreadable media type file");
                    remove_if_exists(&path)?;
                }
            }
        }
    }

    let mut tags = Vec::new();
    for (path, name) in entries(&layout.tags_dir())? {
        match tags::read_tag_file(&path, &name) {
            Some(t) => tags.push(t),
            None => {
                tracing::warn!(path = %path.display(), "deleting an unreadable tag file");
                remove_if_exists(&path)?;
            }
        }
    }
    Ok(Scanned { blobs, media, tags })
}

/// `name` as a digest of algorithm `alg`, if it is one (lower-case hex of the right length).
pub(crate) fn parse_name(alg: Algorithm, name: &str) -> Option<Digest> {
    format!("{}:{name}", alg.name()).parse().ok()
}

/// Deletes everything in `tmp/`: temp files of writes that never committed (a crash), and
/// evicted blobs whose deletion was interrupted.
fn clean_tmp(dir: &Path) -> Result<(), StoreError> {
    for (path, _) in entries(dir)? {
        let meta = fs::symlink_metadata(&path).map_err(ctx("stat", &path))?;
        let r = if meta.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        match r {
            Ok(()) => tracing::debug!(path = %path.display(), "removed a leftover temp file"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::io("remove", path, e)),
        }
    }
    Ok(())
}

/// The entries of `dir` (none if it does not exist), with their names when UTF-8 (others get
/// an empty name, which never parses as a digest).
fn entries(dir: &Path) -> Result<Vec<(PathBuf, String)>, StoreError> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(StoreError::io("read directory", dir, e)),
    };
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(ctx("read directory", dir))?;
        let name = entry.file_name().into_string().unwrap_or_default();
        out.push((entry.path(), name));
    }
    Ok(out)
}

pub(crate) fn remove_if_exists(path: &Path) -> Result<(), StoreError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StoreError::io("remove", path, e)),
    }
}

/// Writes `data` to the temp file `tmp`, which the caller then renames into place under its
/// lock. Not fsynced: tags and media types are a cache, and a torn file is deleted at the next
/// open.
pub(crate) fn write_temp(tmp: PathBuf, data: &[u8]) -> Result<PathBuf, StoreError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all(data))
        .map_err(|e| {
            let _ = fs::remove_file(&tmp);
            StoreError::io("write", &tmp, e)
        })?;
    Ok(tmp)
}

/// The in-memory tag index: (registry, repository) -> tag -> entry.
pub(crate) type TagKey = (String, String);
pub(crate) type TagMap = HashMap<TagKey, std::collections::BTreeMap<String, TagEntry>>;
