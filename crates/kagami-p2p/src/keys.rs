//! Files this crate reads: the node's persistent identity and the network's pre-shared key.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use libp2p::identity::Keypair;

use crate::P2pError;

const SWARM_KEY_HEADER: &str = "/key/swarm/psk/1.0.0/";
const SWARM_KEY_ENCODING: &str = "/base16/";

/// Reads a 32-byte pre-shared key from `path`: either the libp2p `swarm.key` format
/// (`/key/swarm/psk/1.0.0/`, `/base16/`, then 64 hex digits, one per line) or a single line of
/// 64 hex digits. A file that users other than its owner may read or write (any of the
/// mode bits 0o077 set) is refused: the key is the network's only credential.
pub fn load_psk(path: &Path) -> Result<[u8; 32], P2pError> {
    let meta = std::fs::metadata(path).map_err(|source| P2pError::PskRead {
        path: path.to_owned(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(P2pError::PskInvalid {
            path: path.to_owned(),
            reason: format!(
                "its mode is {mode:04o}: group and other users may access it; chmod 600 it (in Kubernetes, defaultMode: 0400 on the Secret volume)"
            ),
        });
    }
    let text = std::fs::read_to_string(path).map_err(|source| P2pError::PskRead {
        path: path.to_owned(),
        source,
    })?;
    parse_psk(&text).map_err(|reason| P2pError::PskInvalid {
        path: path.to_owned(),
        reason,
    })
}

fn parse_psk(text: &str) -> Result<[u8; 32], String> {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let hex_line = match lines.as_slice() {
        [] => return Err("the file is empty".to_owned()),
        [header, rest @ ..] if *header == SWARM_KEY_HEADER => match rest {
            [encoding, key] if *encoding == SWARM_KEY_ENCODING => *key,
            [encoding, _] => {
                return Err(format!(
                    "unsupported encoding {encoding:?} after {SWARM_KEY_HEADER} (expected {SWARM_KEY_ENCODING})"
                ));
            }
            _ => {
                return Err(format!(
                    "expected {SWARM_KEY_HEADER}, {SWARM_KEY_ENCODING} and 64 hex digits on three lines"
                ));
            }
        },
        [key] => *key,
        _ => {
            return Err(format!(
                "expected 64 hex digits on one line, or the swarm.key format starting with {SWARM_KEY_HEADER}"
            ));
        }
    };
    if hex_line.len() != 64 {
        return Err(format!(
            "the key must be 64 hex digits (32 bytes), found {} characters",
            hex_line.len()
        ));
    }
    let mut key = [0u8; 32];
    hex::decode_to_slice(hex_line, &mut key)
        .map_err(|e| format!("the key is not hexadecimal: {e}"))?;
    Ok(key)
}

/// Loads the node's ed25519 keypair from `path` (libp2p's protobuf encoding), creating it with
/// mode 0600 (and its parent directory) when the file does not exist. The same file always gives
/// the same peer id.
pub(crate) fn load_or_create_identity(path: &Path) -> Result<Keypair, P2pError> {
    match std::fs::read(path) {
        Ok(bytes) => {
            if let Ok(meta) = std::fs::metadata(path)
                && meta.permissions().mode() & 0o077 != 0
            {
                tracing::warn!(path = %path.display(), "identity file is readable by other users");
            }
            Keypair::from_protobuf_encoding(&bytes).map_err(|e| P2pError::IdentityDecode {
                path: path.to_owned(),
                reason: e.to_string(),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => create_identity(path),
        Err(source) => Err(P2pError::IdentityRead {
            path: path.to_owned(),
            source,
        }),
    }
}

/// The peer id of the identity in `path`, creating the identity when the file does not exist
/// (as [`crate::Libp2pRouter::start`] would): for tools that print or pre-register a node's id.
pub fn identity_peer_id(path: &Path) -> Result<String, P2pError> {
    Ok(load_or_create_identity(path)?
        .public()
        .to_peer_id()
        .to_string())
}

fn create_identity(path: &Path) -> Result<Keypair, P2pError> {
    let write_err = |source| P2pError::IdentityWrite {
        path: path.to_owned(),
        source,
    };
    let keypair = Keypair::generate_ed25519();
    let bytes = keypair
        .to_protobuf_encoding()
        .map_err(|e| write_err(std::io::Error::other(e)))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(write_err)?;
    }
    // Write a temporary file and rename it, so that a crash never leaves a truncated key.
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = Path::new(&tmp_name);
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(tmp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        std::fs::rename(tmp, path)
    })();
    if let Err(source) = result {
        let _ = std::fs::remove_file(tmp);
        return Err(write_err(source));
    }
    tracing::info!(path = %path.display(), peer_id = %keypair.public().to_peer_id(), "created node identity");
    Ok(keypair)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    #[test]
    fn psk_formats() {
        let want: [u8; 32] = hex::decode(HEX).unwrap().try_into().unwrap();
        assert_eq!(parse_psk(&format!("{HEX}\n")).unwrap(), want);
        assert_eq!(
            parse_psk(&format!("/key/swarm/psk/1.0.0/\n/base16/\n{HEX}\n")).unwrap(),
            want
        );
        assert_eq!(
            parse_psk(&format!(
                "/key/swarm/psk/1.0.0/\r\n/base16/\r\n{}",
                HEX.to_uppercase()
            ))
            .unwrap(),
            want
        );
    }

    #[test]
    fn psk_errors_name_the_file_and_problem() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("swarm.key");
        let err = load_psk(&path).unwrap_err().to_string();
        assert!(err.starts_with("cannot read pre-shared key file"), "{err}");
        assert!(err.contains("swarm.key"), "{err}");

        std::fs::write(&path, format!("{HEX}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        for (content, expect) in [
            ("", "empty"),
            ("abcd\n", "64 hex digits"),
            (&format!("{}zz\n", &HEX[..62]), "not hexadecimal"),
            (
                &format!("/key/swarm/psk/1.0.0/\n/base64/\n{HEX}\n"),
                "unsupported encoding",
            ),
            ("/key/swarm/psk/1.0.0/\n", "three lines"),
        ] {
            std::fs::write(&path, content).unwrap();
            let err = load_psk(&path).unwrap_err().to_string();
            assert!(err.contains("swarm.key is invalid"), "{err}");
            assert!(err.contains(expect), "{content:?}: {err}");
        }
    }

    /// Finding 2g: a key file others may read (or write) is refused, naming the file and
    /// its mode; 0600 and 0400 are accepted.
    #[test]
    fn psk_file_readable_by_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("psk");
        std::fs::write(&path, format!("{HEX}\n")).unwrap();
        for mode in [0o644, 0o640, 0o604, 0o620, 0o660] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = load_psk(&path).unwrap_err().to_string();
            assert!(err.contains("psk is invalid"), "{err}");
            assert!(err.contains(&format!("{mode:04o}")), "{err}");
            assert!(err.contains("chmod 600"), "{err}");
        }
        for mode in [0o600, 0o400] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            assert!(load_psk(&path).is_ok(), "{mode:o}");
        }
    }

    #[test]
    fn identity_is_created_0600_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/identity.key");
        let first = load_or_create_identity(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = load_or_create_identity(&path).unwrap();
        assert_eq!(first.public().to_peer_id(), again.public().to_peer_id());

        std::fs::write(&path, b"garbage").unwrap();
        let err = load_or_create_identity(&path).unwrap_err().to_string();
        assert!(
            err.contains("identity.key is not a libp2p private key"),
            "{err}"
        );
    }
}
