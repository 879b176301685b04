//! The credential of the admin routes (`POST /kagami/import`, `POST /kagami/warm`): a
//! random token that `kagami serve` writes at each start to `<data-dir>/admin.token` (mode
//! 0600, so only the user kagami runs as, root on a node, can read it). A request must carry it as
//! `Authorization: Bearer <token>`; it is compared in constant time. Without a token set
//! (an [`AppState`] nobody called [`enable`] on) the admin routes refuse everything.
//!
//! See docs/security.md, "Admin operations".

use std::io::{self, Read as _, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use http::{HeaderMap, StatusCode, header};

use crate::app::AppState;
use crate::service::error::ApiError;

/// The token file's name in the data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// What the admin routes check: the token and the data directory no import may read from.
#[derive(Clone)]
pub struct Admin {
    token: String,
    data_dir: PathBuf,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("token", &"<redacted>")
            .field("data_dir", &self.data_dir)
            .finish()
    }
}

impl Admin {
    /// Creates a new random token in `<data_dir>/admin.token` (0600, written to a temporary
    /// file and renamed, so a reader never sees half a token), replacing the previous one.
    pub fn create(data_dir: &Path) -> io::Result<Admin> {
        let mut raw = [0u8; 32];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut raw)?;
        let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        std::fs::create_dir_all(data_dir)?;
        let path = data_dir.join(ADMIN_TOKEN_FILE);
        let tmp = data_dir.join(format!("{ADMIN_TOKEN_FILE}.tmp.{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let written = (|| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(format!("{token}\n").as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        Ok(Admin::new(token, data_dir))
    }

    /// An admin credential with a known token (tests, or a token kept elsewhere).
    pub fn new(token: String, data_dir: &Path) -> Admin {
        Admin {
            token,
            data_dir: data_dir.to_path_buf(),
        }
    }

    /// The kagami data directory: nothing under it may be imported.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }
}

/// Reads a token file written by [`Admin::create`].
pub fn read_token(path: &Path) -> io::Result<String> {
    let text = std::fs::read_to_string(path)?;
    let token = text.trim();
    if token.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the file is empty",
        ));
    }
    Ok(token.to_string())
}

/// Turns the admin routes on for `state` (once, at start).
pub fn enable(state: &AppState, admin: Admin) {
    let _ = state.inner.admin.set(admin);
}

pub(crate) fn get(state: &AppState) -> Option<&Admin> {
    state.inner.admin.get()
}

/// Equality of two secrets in time independent of where they differ.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq as _;
    // Lengths are not secret (tokens have a fixed length); `ct_eq` on slices of different
    // lengths is false.
    a.ct_eq(b).into()
}

/// Checks a request to an admin route: 403 when admin is off, 401 without the right token.
pub(crate) fn check<'a>(state: &'a AppState, headers: &HeaderMap) -> Result<&'a Admin, ApiError> {
    let Some(admin) = get(state) else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "DENIED",
            "the admin routes are off on this server (no admin token)",
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(t) if ct_eq(t.as_bytes(), admin.token.as_bytes()) => Ok(admin),
        _ => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            format!(
                "the admin routes need \"Authorization: Bearer <token>\" with the token in {}",
                admin.data_dir.join(ADMIN_TOKEN_FILE).display()
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn token_file_is_0600_random_and_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let a = Admin::create(dir.path()).unwrap();
        let path = dir.path().join(ADMIN_TOKEN_FILE);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(read_token(&path).unwrap(), a.token);
        assert_eq!(a.token.len(), 64);
        let b = Admin::create(dir.path()).unwrap();
        assert_ne!(a.token, b.token);
        assert_eq!(read_token(&path).unwrap(), b.token);
    }

    #[test]
    fn constant_time_equality() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"abcd"));
        assert!(!ct_eq(b"", b"a"));
    }
}
