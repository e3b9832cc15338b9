//! The terminal's outstanding halves: each sealed half is kept on disk, in `DIR/pending/`,
//! from before it is first sent until the platform gives a final answer, so that a fault (a
//! lost connection, a timeout, `503`, the agent itself killed) never burns a new KSN nor leaves
//! a payment half-done: the very same bytes are sent again (`nfcpay-agent pending --resend`).
//!
//! # Format
//!
//! One file per half, named `<TXN_ID>-<A|B>.half` (the transaction ID in 32 upper-case hex
//! digits), holding the sealed envelope exactly as sent (docs/protocol.md §5), mode 0600.
//! Nothing else belongs in the directory; the `.<name>.*.tmp` files a crash may leave behind
//! while one is written are ignored.
//!
//! # Crash table
//!
//! | crash point | on disk after restart | what `pending --resend` does |
//! | --- | --- | --- |
//! | before the half is kept ([`PendingDir::keep`]'s rename) | no file (maybe a `.tmp`); the KSN is spent, nothing was sent | nothing: the payment was never started on the platform |
//! | after it is kept, before or while it is sent | the file | sends it; the platform processes it (first time) or answers as before (re-send) |
//! | after the final answer, before [`PendingDir::forget`] | the file | sends it again: the same receipt, or the same refusal |
//! | after [`PendingDir::forget`] | no file | nothing |
//!
//! A kept file is checked before it is sent ([`PendingHalf::read`]): its name, its size, that
//! it decodes as a half of the kind its name says, and that the half is this terminal's. A
//! file that fails is reported and never sent. The transaction ID is in the encrypted body,
//! which the terminal can no longer open (its key is gone); the name's is shown, and the
//! platform decides by the bytes alone.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nfcpay_keystore::atomic_file::{self, AtomicWriteError};
use nfcpay_protocol::messages::{HalfEnvelope, HalfKind};
use nfcpay_protocol::{Ksn, TerminalId, TxnId};

/// The directory of outstanding halves, inside the terminal directory.
pub const PENDING_DIR_NAME: &str = "pending";
/// The ending of a kept half's file name.
pub const HALF_FILE_SUFFIX: &str = ".half";
/// Largest kept half read, in bytes (docs/protocol.md §9: a half is at most 2133 bytes).
pub const HALF_FILE_BYTES_MAX: u64 = 4096;
/// Most entries looked at in the directory: a terminal has one or two halves outstanding at
/// a time; thousands mean something else is writing there.
pub const PENDING_ENTRIES_MAX: usize = 1024;
/// Mode of a kept half.
const HALF_FILE_MODE: u32 = atomic_file::PRIVATE_FILE_MODE;
/// Mode of the directory.
const PENDING_DIR_MODE: u32 = 0o700;

/// Why the pending directory or one of its files could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PendingError {
    /// Reading, writing or removing failed.
    #[error("{path}: cannot {action}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done.
        action: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The file is not a half this agent kept; it is not sent.
    #[error("{path}: not a pending half ({reason}); it is not sent")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The file is a half of another terminal; it is not sent.
    #[error("{path}: a half of terminal {terminal_id}, not of this terminal; it is not sent")]
    Foreign {
        /// The file.
        path: PathBuf,
        /// The terminal its header names.
        terminal_id: TerminalId,
    },
    /// The directory has more entries than [`PENDING_ENTRIES_MAX`].
    #[error("{path}: more than {PENDING_ENTRIES_MAX} entries; it is not a pending directory")]
    TooManyEntries {
        /// The directory.
        path: PathBuf,
    },
}

/// A half kept on disk, read and checked: it may be sent.
pub struct PendingHalf {
    /// Its file.
    pub path: PathBuf,
    /// The transaction its name says.
    pub txn_id: TxnId,
    /// Half A or B (its name and its header agree).
    pub kind: HalfKind,
    /// The KSN it is sealed under.
    pub ksn: Ksn,
    /// When it was sealed (its header's `sent_at`, ms since the Unix epoch).
    pub sealed_at_ms: u64,
    bytes: Vec<u8>,
}

impl PendingHalf {
    /// Reads the kept half at `path` and checks it is one of `terminal_id`'s.
    pub fn read(path: &Path, terminal_id: &TerminalId) -> Result<Self, PendingError> {
        let corrupt = |reason: String| PendingError::Corrupt {
            path: path.to_owned(),
            reason,
        };
        let name = path
            .file_name()
            .and_then(|name| name.to_str())
            .ok_or_else(|| corrupt("its name is not text".into()))?;
        let (txn_id, kind) = parse_file_name(name).ok_or_else(|| {
            corrupt(format!(
                "its name is not <transaction ID>-<A|B>{HALF_FILE_SUFFIX}"
            ))
        })?;
        let bytes = read_regular_file(path)?;
        let envelope = HalfEnvelope::decode(&bytes)
            .map_err(|error| corrupt(format!("not a sealed half: {error}")))?;
        let header = envelope.header();
        if header.kind != kind {
            return Err(corrupt(format!(
                "its name says half {}, its header half {}",
                kind_letter(kind),
                kind_letter(header.kind)
            )));
        }
        if &header.terminal_id != terminal_id {
            return Err(PendingError::Foreign {
                path: path.to_owned(),
                terminal_id: header.terminal_id.clone(),
            });
        }
        Ok(Self {
            path: path.to_owned(),
            txn_id,
            kind,
            ksn: header.ksn,
            sealed_at_ms: header.sent_at_ms,
            bytes,
        })
    }

    /// The sealed envelope, exactly as it was first sent.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// `DIR/pending/` of one terminal directory.
#[derive(Debug, Clone)]
pub struct PendingDir {
    path: PathBuf,
}

impl PendingDir {
    /// The pending directory of the terminal directory `terminal_dir` (not created here).
    pub fn of(terminal_dir: &Path) -> Self {
        Self {
            path: terminal_dir.join(PENDING_DIR_NAME),
        }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Keeps `envelope`, the half `kind` of `txn_id`, durably (a temporary file, fsync,
    /// rename, fsync of the directory) before it is sent; returns its path.
    pub fn keep(
        &self,
        txn_id: TxnId,
        kind: HalfKind,
        envelope: &[u8],
    ) -> Result<PathBuf, PendingError> {
        self.create()?;
        let path = self.path.join(file_name(txn_id, kind));
        atomic_file::write_atomically(&path, envelope, HALF_FILE_MODE).map_err(|error| {
            let (action, source) = match error {
                AtomicWriteError::Save(source) => ("keep the half", source),
                AtomicWriteError::SyncDirectory(source) => ("sync the pending directory", source),
                other => ("keep the half", io::Error::other(other)),
            };
            PendingError::Io {
                path: path.clone(),
                action,
                source,
            }
        })?;
        Ok(path)
    }

    /// Forgets a half that got its final answer: removes its file and syncs the directory, so
    /// that a crash after this never sends it again. A file already gone is no error.
    pub fn forget(&self, path: &Path) -> Result<(), PendingError> {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(source) => {
                return Err(PendingError::Io {
                    path: path.to_owned(),
                    action: "remove the answered half",
                    source,
                });
            }
        }
        File::open(&self.path)
            .and_then(|directory| directory.sync_all())
            .map_err(|source| PendingError::Io {
                path: self.path.clone(),
                action: "sync the pending directory",
                source,
            })
    }

    /// Every entry of the directory, sorted by name, each read and checked as a half of
    /// `terminal_id`; none when the directory does not exist. Temporary files are skipped.
    pub fn list(
        &self,
        terminal_id: &TerminalId,
    ) -> Result<Vec<Result<PendingHalf, PendingError>>, PendingError> {
        let entries = match std::fs::read_dir(&self.path) {
            Ok(entries) => entries,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(PendingError::Io {
                    path: self.path.clone(),
                    action: "list the pending directory",
                    source,
                });
            }
        };
        let mut paths = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| PendingError::Io {
                path: self.path.clone(),
                action: "list the pending directory",
                source,
            })?;
            let name = entry.file_name();
            if is_temporary(&name.to_string_lossy()) {
                continue;
            }
            if paths.len() == PENDING_ENTRIES_MAX {
                return Err(PendingError::TooManyEntries {
                    path: self.path.clone(),
                });
            }
            paths.push(entry.path());
        }
        paths.sort();
        Ok(paths
            .iter()
            .map(|path| PendingHalf::read(path, terminal_id))
            .collect())
    }

    fn create(&self) -> Result<(), PendingError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(PENDING_DIR_MODE)
            .create(&self.path)
            .map_err(|source| PendingError::Io {
                path: self.path.clone(),
                action: "create the pending directory",
                source,
            })
    }
}

/// `<TXN_ID>-<A|B>.half`.
pub fn file_name(txn_id: TxnId, kind: HalfKind) -> String {
    format!("{txn_id}-{}{HALF_FILE_SUFFIX}", kind_letter(kind))
}

fn parse_file_name(name: &str) -> Option<(TxnId, HalfKind)> {
    let stem = name.strip_suffix(HALF_FILE_SUFFIX)?;
    let (txn, kind) = stem.split_once('-')?;
    let kind = match kind {
        "A" => HalfKind::A,
        "B" => HalfKind::B,
        _ => return None,
    };
    // Only the form `file_name` writes: 32 upper-case hex digits.
    if txn.len() != 32
        || !txn
            .bytes()
            .all(|byte| matches!(byte, b'0'..=b'9' | b'A'..=b'F'))
    {
        return None;
    }
    Some((txn.parse().ok()?, kind))
}

/// A temporary file of [`atomic_file::write_atomically`]: `.NAME.*.tmp`.
fn is_temporary(name: &str) -> bool {
    name.starts_with('.') && name.ends_with(".tmp")
}

fn kind_letter(kind: HalfKind) -> &'static str {
    match kind {
        HalfKind::A => "A",
        HalfKind::B => "B",
    }
}

/// Reads a regular file (not a symbolic link, a directory or a device) of at most
/// [`HALF_FILE_BYTES_MAX`] bytes.
fn read_regular_file(path: &Path) -> Result<Vec<u8>, PendingError> {
    let io_error = |source| PendingError::Io {
        path: path.to_owned(),
        action: "read the pending half",
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
        .map_err(|source| {
            if source.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) {
                PendingError::Corrupt {
                    path: path.to_owned(),
                    reason: "a symbolic link".into(),
                }
            } else {
                io_error(source)
            }
        })?;
    let metadata = file.metadata().map_err(io_error)?;
    if !metadata.is_file() {
        return Err(PendingError::Corrupt {
            path: path.to_owned(),
            reason: "not a regular file".into(),
        });
    }
    let mut bytes = Vec::new();
    file.take(HALF_FILE_BYTES_MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(io_error)?;
    if bytes.len() as u64 > HALF_FILE_BYTES_MAX {
        return Err(PendingError::Corrupt {
            path: path.to_owned(),
            reason: format!("longer than {HALF_FILE_BYTES_MAX} bytes"),
        });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use nfcpay_protocol::messages::{GCM_NONCE_BYTES, HalfHeader};

    use super::*;

    const TXN: &str = "0123456789ABCDEF0123456789ABCDEF";

    fn txn() -> TxnId {
        TXN.parse().unwrap_or_else(|error| panic!("{error}"))
    }

    fn terminal(id: &str) -> TerminalId {
        id.parse().unwrap_or_else(|error| panic!("{error}"))
    }

    /// A well-formed half of `terminal_id` (its body is no real ciphertext: the platform
    /// would refuse it, the store does not care).
    fn half(kind: HalfKind, terminal_id: &str) -> Vec<u8> {
        let header = HalfHeader {
            kind,
            terminal_id: terminal(terminal_id),
            ksn: "123456789012345600000001"
                .parse()
                .unwrap_or_else(|error| panic!("{error}")),
            sent_at_ms: 1_796_301_296_789,
            nonce: [7; GCM_NONCE_BYTES],
        };
        HalfEnvelope::new(header, vec![0x5a; 48])
            .unwrap_or_else(|error| panic!("{error}"))
            .encode()
    }

    fn dir() -> (tempfile::TempDir, PendingDir) {
        let terminal_dir = tempfile::tempdir().unwrap_or_else(|error| panic!("{error}"));
        let pending = PendingDir::of(terminal_dir.path());
        (terminal_dir, pending)
    }

    fn only(pending: &PendingDir, id: &str) -> Result<PendingHalf, PendingError> {
        let mut listed = pending
            .list(&terminal(id))
            .unwrap_or_else(|error| panic!("{error}"));
        assert_eq!(listed.len(), 1);
        listed.remove(0)
    }

    #[test]
    fn a_kept_half_is_listed_with_its_identical_bytes_and_forgotten() {
        let (_terminal_dir, pending) = dir();
        assert!(pending.list(&terminal("shop-1")).unwrap().is_empty());
        let bytes = half(HalfKind::A, "shop-1");
        let path = pending.keep(txn(), HalfKind::A, &bytes).unwrap();
        assert_eq!(
            path.file_name().and_then(|name| name.to_str()),
            Some(format!("{TXN}-A.half").as_str())
        );
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // A crash in a later keep leaves a temporary file: it is not a half.
        std::fs::write(pending.path().join(".x-A.half.abc.tmp"), b"partial").unwrap();
        let kept = only(&pending, "shop-1").unwrap();
        assert_eq!(kept.bytes(), &bytes[..]);
        assert_eq!(
            (kept.txn_id, kept.kind, kept.ksn.counter().get()),
            (txn(), HalfKind::A, 1)
        );
        assert_eq!(kept.sealed_at_ms, 1_796_301_296_789);
        pending.forget(&kept.path).unwrap();
        assert!(!kept.path.exists());
        // Forgetting twice (a crash between the answer and the removal, then a re-send) is
        // no error.
        pending.forget(&kept.path).unwrap();
        assert!(pending.list(&terminal("shop-1")).unwrap().is_empty());
    }

    #[test]
    fn a_corrupt_file_is_refused_with_its_reason() {
        let (_terminal_dir, pending) = dir();
        pending.keep(txn(), HalfKind::B, b"garbage").unwrap();
        let error = only(&pending, "shop-1").err().unwrap();
        assert!(
            matches!(&error, PendingError::Corrupt { reason, .. } if reason.contains("not a sealed half")),
            "{error}"
        );
        assert!(error.to_string().contains("it is not sent"), "{error}");
    }

    #[test]
    fn a_name_that_is_not_a_halfs_is_refused() {
        for name in [
            "notes.txt",
            "0123456789ABCDEF0123456789ABCDEF-C.half",
            "0123456789abcdef0123456789abcdef-A.half",
            "00000000000000000000000000000000-A.half",
            "0123-A.half",
            "0123456789ABCDEF0123456789ABCDEF-A.half.bak",
        ] {
            let (_terminal_dir, pending) = dir();
            pending.create().unwrap();
            std::fs::write(pending.path().join(name), half(HalfKind::A, "shop-1")).unwrap();
            let error = only(&pending, "shop-1").err().unwrap();
            assert!(
                matches!(&error, PendingError::Corrupt { reason, .. } if reason.contains("its name")),
                "{name}: {error}"
            );
        }
    }

    #[test]
    fn a_half_whose_name_says_the_other_kind_is_refused() {
        let (_terminal_dir, pending) = dir();
        pending
            .keep(txn(), HalfKind::A, &half(HalfKind::B, "shop-1"))
            .unwrap();
        let error = only(&pending, "shop-1").err().unwrap();
        assert!(
            matches!(&error, PendingError::Corrupt { reason, .. } if reason.contains("half B")),
            "{error}"
        );
    }

    #[test]
    fn another_terminals_half_is_foreign() {
        let (_terminal_dir, pending) = dir();
        pending
            .keep(txn(), HalfKind::B, &half(HalfKind::B, "alice-phone"))
            .unwrap();
        let error = only(&pending, "shop-1").err().unwrap();
        assert!(
            matches!(&error, PendingError::Foreign { terminal_id, .. } if terminal_id.as_str() == "alice-phone"),
            "{error}"
        );
    }

    #[test]
    fn oversized_files_links_and_directories_are_refused() {
        let (_terminal_dir, pending) = dir();
        pending.create().unwrap();
        let big = pending.path().join(file_name(txn(), HalfKind::A));
        std::fs::write(&big, vec![0u8; HALF_FILE_BYTES_MAX as usize + 1]).unwrap();
        let error = only(&pending, "shop-1").err().unwrap();
        assert!(error.to_string().contains("longer than"), "{error}");
        std::fs::remove_file(&big).unwrap();

        let target = pending.path().join("elsewhere");
        std::fs::write(&target, half(HalfKind::A, "shop-1")).unwrap();
        let link = pending.path().join(file_name(txn(), HalfKind::A));
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let listed = pending.list(&terminal("shop-1")).unwrap();
        let reasons: Vec<String> = listed
            .into_iter()
            .map(|entry| {
                entry
                    .err()
                    .map(|error| error.to_string())
                    .unwrap_or_default()
            })
            .collect();
        assert!(
            reasons
                .iter()
                .any(|reason| reason.contains("symbolic link")),
            "{reasons:?}"
        );
        std::fs::remove_file(&link).unwrap();
        std::fs::remove_file(&target).unwrap();

        std::fs::create_dir(pending.path().join(file_name(txn(), HalfKind::B))).unwrap();
        let error = only(&pending, "shop-1").err().unwrap();
        assert!(error.to_string().contains("not a regular file"), "{error}");
    }

    #[test]
    fn a_half_that_cannot_be_kept_is_an_error_naming_the_path() {
        let (terminal_dir, pending) = dir();
        // A file where the directory should be.
        std::fs::write(terminal_dir.path().join(PENDING_DIR_NAME), b"").unwrap();
        let error = pending
            .keep(txn(), HalfKind::A, &half(HalfKind::A, "shop-1"))
            .err()
            .unwrap();
        assert!(
            matches!(
                &error,
                PendingError::Io {
                    action: "create the pending directory",
                    ..
                }
            ),
            "{error}"
        );
        assert!(
            matches!(
                pending.list(&terminal("shop-1")),
                Err(PendingError::Io {
                    action: "list the pending directory",
                    ..
                })
            ),
            "a pending path that is no directory is an error, not an empty list"
        );
    }

    #[test]
    fn a_directory_with_too_many_entries_is_refused() {
        let (_terminal_dir, pending) = dir();
        pending.create().unwrap();
        for number in 0..=PENDING_ENTRIES_MAX {
            std::fs::write(pending.path().join(format!("f{number}")), b"").unwrap();
        }
        assert!(matches!(
            pending.list(&terminal("shop-1")),
            Err(PendingError::TooManyEntries { .. })
        ));
    }
}
