//! The store's error type.

use std::io;
use std::path::PathBuf;

use kagami_config::Digest;

/// Everything that can go wrong in the content store. Messages are lower-case and name the
/// path or digest involved.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A filesystem operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The filesystem is full (ENOSPC or a quota); the write was abandoned and its temp file
    /// removed.
    #[error("no space left writing {}: {source}", path.display())]
    Full {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The bytes written do not hash to the digest they were written under.
    #[error("digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
    /// The bytes written are not as many as announced to `Store::begin`.
    #[error("size mismatch for {digest}: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        digest: Digest,
        expected: u64,
        actual: u64,
    },
    /// The write already failed (or was abandoned) and can take no more data.
    #[error("write of {digest} was abandoned: {reason}")]
    Aborted { digest: Digest, reason: String },
    /// Another process (or another `Store` in this one) has the store open.
    #[error(
        "content store {} is in use by another process (it holds an exclusive lock on the directory); run one kagami serve per --data-dir",
        path.display()
    )]
    Locked { path: PathBuf },
    /// Taking the blob further would put the store (complete blobs plus writes in flight)
    /// over its size limit, and nothing more can be evicted.
    #[error(
        "writing {digest} would exceed the store's size limit of {max} bytes ({used} bytes used by stored blobs and writes in flight)"
    )]
    OverBudget { digest: Digest, max: u64, used: u64 },
    /// A blob cannot be removed now (see `Store::remove`).
    #[error("{digest} cannot be removed: {why}")]
    InUse { digest: Digest, why: &'static str },
    /// A tag index key or media type that cannot be stored.
    #[error("invalid {what} {value:?}: {why}")]
    Invalid {
        what: &'static str,
        value: String,
        why: &'static str,
    },
}

impl StoreError {
    /// Wraps an I/O error, classifying "disk full" errors as [`StoreError::Full`].
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        let path = path.into();
        if is_full(&source) {
            StoreError::Full { path, source }
        } else {
            StoreError::Io { op, path, source }
        }
    }
}

fn is_full(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded | io::ErrorKind::FileTooLarge
    )
}
