//! Replacing a file atomically and durably — the one way the workspace saves a file that a
//! crash must not leave half-written: the software keystore's state, the terminal's DUKPT
//! state and settings, the platform's certificates.
//!
//! [`write_atomically`] writes a temporary file with a random name in the same directory
//! (created with the caller's permission bits, so a secret is never readable by others, not
//! even for a moment), syncs it, renames it over the target and syncs the directory. After a
//! crash at any point the target is either the old file or the new one; a crash before the
//! rename may leave a `.NAME.*.tmp` file behind, which nothing reads. On an error the
//! temporary file is removed.

use std::fs::{File, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// File mode of a file holding secrets: read and write by its owner only.
pub const PRIVATE_FILE_MODE: u32 = 0o600;
/// File mode of a file anyone may read (certificates, settings); the umask still applies.
pub const PUBLIC_FILE_MODE: u32 = 0o644;

/// Why a file could not be replaced.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AtomicWriteError {
    /// Writing, syncing or renaming the new file failed; the old file is unchanged.
    #[error("cannot save it")]
    Save(#[source] io::Error),
    /// The new file is in place but its directory could not be synced: a crash may still
    /// bring the old one back.
    #[error("cannot sync its directory")]
    SyncDirectory(#[source] io::Error),
}

/// Replaces `path` with `bytes`, atomically and durably, as a file of mode `mode` (before the
/// umask). See the module documentation.
pub fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), AtomicWriteError> {
    let directory = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let mut prefix = std::ffi::OsString::from(".");
    if let Some(name) = path.file_name() {
        prefix.push(name);
    }
    prefix.push(".");
    let mut temporary = tempfile::Builder::new()
        .prefix(&prefix)
        .suffix(".tmp")
        .permissions(Permissions::from_mode(mode))
        .tempfile_in(directory)
        .map_err(AtomicWriteError::Save)?;
    temporary
        .write_all(bytes)
        .and_then(|()| temporary.as_file().sync_all())
        .map_err(AtomicWriteError::Save)?;
    // On failure the temporary file comes back inside the error and is removed on drop.
    temporary
        .persist(path)
        .map_err(|error| AtomicWriteError::Save(error.error))?;
    File::open(directory)
        .and_then(|directory| directory.sync_all())
        .map_err(AtomicWriteError::SyncDirectory)
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn entries(directory: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(directory)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn creates_then_replaces_and_leaves_nothing_else() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("state.json");
        write_atomically(&path, b"first", PRIVATE_FILE_MODE).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"first");
        write_atomically(&path, b"second, longer", PRIVATE_FILE_MODE).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second, longer");
        write_atomically(&path, b"", PRIVATE_FILE_MODE).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"");
        assert_eq!(entries(directory.path()), ["state.json"]);
    }

    #[test]
    fn the_new_file_has_the_callers_mode() {
        let directory = tempfile::tempdir().unwrap();
        let secret = directory.path().join("secret");
        write_atomically(&secret, b"k", PRIVATE_FILE_MODE).unwrap();
        assert_eq!(mode(&secret), 0o600);
        // A replaced file takes the new mode, not the old one.
        fs::set_permissions(&secret, Permissions::from_mode(0o644)).unwrap();
        write_atomically(&secret, b"k2", PRIVATE_FILE_MODE).unwrap();
        assert_eq!(mode(&secret), 0o600);
        let public = directory.path().join("public.pem");
        write_atomically(&public, b"cert", PUBLIC_FILE_MODE).unwrap();
        assert_eq!(mode(&public) & 0o600, 0o600);
        assert_eq!(mode(&public) & 0o133, 0);
    }

    #[test]
    fn a_failed_write_keeps_the_old_file_and_no_temporary() {
        let directory = tempfile::tempdir().unwrap();
        // The target is a non-empty directory: the rename fails.
        let path = directory.path().join("occupied");
        fs::create_dir(&path).unwrap();
        fs::write(path.join("inside"), b"old").unwrap();
        let error = write_atomically(&path, b"new", PRIVATE_FILE_MODE).unwrap_err();
        assert!(matches!(error, AtomicWriteError::Save(_)), "{error:?}");
        assert_eq!(fs::read(path.join("inside")).unwrap(), b"old");
        assert_eq!(entries(directory.path()), ["occupied"]);
    }

    #[test]
    fn a_missing_directory_is_an_error() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("absent").join("file");
        assert!(matches!(
            write_atomically(&path, b"x", PRIVATE_FILE_MODE),
            Err(AtomicWriteError::Save(_))
        ));
    }
}
