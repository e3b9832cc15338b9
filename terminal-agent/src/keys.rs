//! The terminal's DUKPT keys: the ANSI X9.24-3-2017 terminal algorithm
//! ([`TerminalState`]) over a keystore, persisted so that the keys survive restarts and
//! crashes, with either keystore backend.
//!
//! # What is stored
//!
//! - The 32 future-key registers, each as a persistent key of the keystore labelled
//!   `nfcpay-dukpt-r00` … `nfcpay-dukpt-r31` ([`Keystore::persist_key`]; with PKCS#11 a token
//!   object, sensitive and never extractable). While the terminal runs, each is also held as
//!   a transient copy.
//! - The state file `dukpt-state.json` ([`STATE_FILE_NAME`]) in the agent's directory: the
//!   Initial Key ID, the algorithm, the next transaction counter, and for each register the
//!   counter whose key it holds. It holds no key. It is replaced atomically (a 0600
//!   temporary file, fsync, rename, fsync of the directory), so a crash leaves the old or
//!   the new file.
//!
//! ```json
//! {
//!   "format": "nfcpay-dukpt-terminal",
//!   "version": 1,
//!   "initial_key_id": "1234567890123456",
//!   "algorithm": "aes128",
//!   "next_counter": 3,
//!   "registers": [3, null, 4, 8, 16, "… 32 entries: register i holds the key of this counter"]
//! }
//! ```
//!
//! A register's counter follows from the next counter `n` ([`register_counter`]): register
//! `i` is in use only if `i` is the lowest one-bit of `n` (it holds `n`'s key) or lies above it
//! with bit `i` of `n` clear (it holds the key of `n`'s bits above `i` plus bit `i`). The file
//! records it anyway, and [`TerminalKeyState::open`] uses a register only when the recorded
//! counter is exactly that one; any other register is discarded and its persistent key
//! deleted.
//!
//! # Taking a transaction key
//!
//! [`TerminalKeyState::next_transaction`] takes the key of counter `c` (whose lowest one-bit
//! is `t`): in memory, register `t` is emptied and registers `t-1 … 0` are refilled from its
//! key. Before the key is returned:
//!
//! 1. the state file is saved with the advanced next counter and the new registers' counters
//!    — from then on no restart can hand out `c` again;
//! 2. the refilled registers are persisted (none when `c` has 16 one-bits);
//! 3. register `t`'s persistent key is deleted — from then on nothing that could re-derive
//!    `c`'s key (or any earlier one) is left.
//!
//! Two invariants make every crash safe:
//!
//! - *On disk*: a register the state file records as in use holds that counter's key, or
//!   nothing. Step 1 only records registers that were empty before, and an empty register
//!   has no persistent key (next invariant), so step 1 keeps this; steps 2 and 3 only add the
//!   recorded keys and delete an unrecorded one.
//! - *In a running state*: an empty register has no persistent key. [`TerminalKeyState::open`]
//!   establishes it (it deletes the persistent key of every register not in use, and fails
//!   if it cannot), and every completed transaction keeps it (step 3). If a step fails
//!   without a crash, the state refuses further transactions
//!   ([`AgentKeyError::ReopenRequired`]) until it is opened again, which repairs it.
//!
//! A register recorded as in use whose key is missing is simply empty: the terminal
//! algorithm skips every counter that would need it. That costs counters, never safety.
//!
//! | crash point in `next_transaction` | state file after restart | registers after `open` | next KSN after restart |
//! | --- | --- | --- | --- |
//! | while deriving (before step 1) | old: next counter `c` | unchanged, register `t` still holds `c` | `c` (it was never returned) |
//! | during step 1, before the rename | old (the temporary file is ignored) | unchanged | `c` (never returned) |
//! | after step 1's rename, before step 2 | new: next `c+1` (or past `c`'s subtree) | `t` recorded empty: its key is deleted; `t-1 … 0` recorded but missing, so empty | the first counter after `c` whose register exists (counters below `t`'s subtree are skipped) |
//! | during step 2 (some refilled registers persisted) | new | the persisted ones are used (they hold exactly the recorded keys); the others are empty; `t` deleted | `c+1` if register 0 was persisted, else the first counter whose register exists |
//! | after step 2, before step 3 | new | all refilled registers used; register `t`, recorded empty, is deleted | `c+1` |
//! | after step 3, before returning | new | as recorded | `c+1` (`c` was never returned, and is never reused) |
//! | after returning | new | as recorded | `c+1` |
//!
//! In every row the next KSN is greater than every KSN ever returned, and no register that
//! held `c`'s key, or any used key, survives the restart. [`TerminalKeyState::load_initial_key`]
//! follows the same rules: it deletes all 32 register keys, saves the state file (counter 1,
//! every register recorded), then persists the registers; a crash in between leaves registers
//! missing (skipped counters), never a wrong key.
//!
//! One process owns the directory at a time: the state takes an exclusive lock on
//! `dukpt-state.lock` ([`LOCK_FILE_NAME`]) for as long as it is open.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nfcpay_keystore::atomic_file::{self, AtomicWriteError};
use nfcpay_keystore::dukpt::{KeyGuard, TerminalKeys};
use nfcpay_keystore::{KeyHandle, KeyLabel, Keystore, KeystoreError};
use nfcpay_protocol::dukpt::{FUTURE_KEY_REGISTERS, KeyAlgorithm, TerminalState};
use nfcpay_protocol::{InitialKeyId, Ksn, ProtocolError, TransactionCounter};
use serde::{Deserialize, Serialize};

/// Name of the state file in the agent's directory.
pub const STATE_FILE_NAME: &str = "dukpt-state.json";
/// Name of the lock file that keeps a second process away from the same keys.
pub const LOCK_FILE_NAME: &str = "dukpt-state.lock";
/// Largest state file read, in bytes (a full one is under 1 KiB): checked before reading.
pub const STATE_FILE_BYTES_MAX: u64 = 16 * 1024;
/// Label prefix of the persistent register keys: `nfcpay-dukpt-r00` … `nfcpay-dukpt-r31`.
pub const REGISTER_LABEL_PREFIX: &str = "nfcpay-dukpt-r";
/// The value of the state file's `format` field.
const STATE_FILE_FORMAT: &str = "nfcpay-dukpt-terminal";
/// The state file version this code reads and writes.
const STATE_FILE_VERSION: u32 = 1;
/// Mode of the state file, its temporary copies and the lock file.
const STATE_FILE_MODE: u32 = 0o600;

/// Why the terminal's keys could not be loaded, opened or used. No variant carries key
/// material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentKeyError {
    /// There is no state file: no initial key was ever loaded here.
    #[error("no DUKPT keys in {path}: enroll the terminal (load an initial key) first")]
    NotLoaded {
        /// The state file looked for.
        path: PathBuf,
    },
    /// The state file is not one this code wrote.
    #[error("DUKPT state file {path} is corrupt: {reason}; re-enroll the terminal")]
    Corrupt {
        /// The state file.
        path: PathBuf,
        /// What is wrong (never a key).
        reason: String,
    },
    /// Reading or writing the state file or its directory failed.
    #[error("DUKPT state file {path}: cannot {action}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done.
        action: &'static str,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// Another process has the keys of this directory open.
    #[error("DUKPT state in {path} is in use by another process")]
    Locked {
        /// The lock file.
        path: PathBuf,
    },
    /// The keystore failed.
    #[error("keystore")]
    Keystore(#[from] KeystoreError),
    /// Every transaction counter is used: the terminal needs a new initial key.
    #[error("the terminal's DUKPT keys are exhausted (end of life): load a new initial key")]
    EndOfLife,
    /// This initial key was already used here: loading it again would repeat counters.
    #[error(
        "initial key {0} has already been used on this terminal; loading it again would repeat \
         transaction counters: load one with a new Initial Key ID"
    )]
    InitialKeyReused(InitialKeyId),
    /// An earlier transaction failed while saving: open the state again (which repairs it).
    #[error("an earlier save of the DUKPT state failed: open it again before the next transaction")]
    ReopenRequired,
}

/// What the operator sees of the terminal's keys (`nfcpay-agent status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyStatus {
    /// The terminal's Initial Key ID (BDK ID ‖ derivation ID).
    pub initial_key_id: InitialKeyId,
    /// The algorithm of its keys.
    pub algorithm: KeyAlgorithm,
    /// The counter the next transaction will use; `None` at end of life.
    pub next_counter: Option<u32>,
    /// How many transactions are left before end of life.
    pub transactions_left: u64,
}

/// A transaction key, destroyed in the keystore when dropped. Derive the transaction's
/// working keys from its [`handle`](KeyGuard::handle), then drop it.
pub type TransactionKey = KeyGuard<Arc<dyn Keystore>>;

/// The terminal's DUKPT state over a keystore, saved after every change (see the module
/// documentation for the order and why it is crash-safe).
pub struct TerminalKeyState {
    store: Arc<dyn Keystore>,
    state_path: PathBuf,
    dukpt: TerminalState<KeyHandle>,
    /// A save failed part-way: the persistent keys may not match memory.
    reopen_required: bool,
    /// Held (with an exclusive `flock`) while the state is open.
    _lock: File,
}

impl TerminalKeyState {
    /// Loads a new initial key into the terminal: fills the 32 future-key registers from it
    /// (then destroys it), deletes the register keys of any earlier initial key, saves the
    /// state file (counter 1) and persists the registers.
    ///
    /// Refuses an initial key whose ID this directory already used for a transaction.
    pub fn load_initial_key(
        store: Arc<dyn Keystore>,
        dir: &Path,
        initial_key: KeyHandle,
        algorithm: KeyAlgorithm,
        initial_key_id: InitialKeyId,
    ) -> Result<Self, AgentKeyError> {
        let state_path = dir.join(STATE_FILE_NAME);
        let prepared = lock(dir).and_then(|lock| {
            match read_state(&state_path) {
                Ok(saved)
                    if saved.initial_key_id == initial_key_id && saved.next_counter != Some(1) =>
                {
                    return Err(AgentKeyError::InitialKeyReused(initial_key_id));
                }
                // Absent, or corrupt: loading a new key is how a terminal recovers.
                Ok(_) | Err(AgentKeyError::NotLoaded { .. } | AgentKeyError::Corrupt { .. }) => {}
                Err(error) => return Err(error),
            }
            Ok(lock)
        });
        let lock = match prepared {
            Ok(lock) => lock,
            Err(error) => {
                if let Err(destroy_error) = store.destroy(initial_key) {
                    tracing::warn!(error = %destroy_error, "could not destroy an initial key");
                }
                return Err(error);
            }
        };
        let dukpt = TerminalState::load_initial_key(
            &mut TerminalKeys(store.as_ref()),
            initial_key,
            algorithm,
            initial_key_id,
        )?;
        let mut state = Self {
            store,
            state_path,
            dukpt,
            reopen_required: true,
            _lock: lock,
        };
        for register in 0..FUTURE_KEY_REGISTERS {
            state.store.delete_key(&register_label(register))?;
        }
        state.save_state()?;
        for register in (0..FUTURE_KEY_REGISTERS).rev() {
            if let Some(key) = &state.dukpt.registers()[register] {
                state.store.persist_key(key, &register_label(register))?;
            }
        }
        state.reopen_required = false;
        tracing::info!(%initial_key_id, %algorithm, "loaded an initial key into the DUKPT registers");
        Ok(state)
    }

    /// Opens the saved state: reads the state file and loads each register whose recorded
    /// counter is the one the next counter implies; every other register's persistent key is
    /// deleted, never used.
    pub fn open(store: Arc<dyn Keystore>, dir: &Path) -> Result<Self, AgentKeyError> {
        let lock = lock(dir)?;
        let state_path = dir.join(STATE_FILE_NAME);
        let saved = read_state(&state_path)?;
        let (registers, changed) = load_registers(store.as_ref(), &saved)?;
        let dukpt = TerminalState::from_parts(
            saved.initial_key_id,
            saved.algorithm,
            saved.next_counter,
            registers,
        )
        .map_err(|error| corrupt(&state_path, error))?;
        let state = Self {
            store,
            state_path,
            dukpt,
            reopen_required: false,
            _lock: lock,
        };
        if changed {
            // Record what is really there (only ever turns a register to empty).
            state.save_state()?;
        }
        Ok(state)
    }

    /// Takes the next transaction key and saves the advanced state before returning it: the
    /// state file first (so the counter is never handed out again), then the refilled
    /// registers, then deletes the used register's persistent key.
    pub fn next_transaction(&mut self) -> Result<(Ksn, TransactionKey), AgentKeyError> {
        if self.reopen_required {
            return Err(AgentKeyError::ReopenRequired);
        }
        if self.dukpt.next_counter().is_none() {
            return Err(AgentKeyError::EndOfLife);
        }
        // A failure here changes only memory (registers below the used one may be refilled
        // with keys not yet persisted, which a retry derives again): no save is needed.
        let (ksn, key) = match self
            .dukpt
            .next_transaction_key(&mut TerminalKeys(self.store.as_ref()))
        {
            Ok(taken) => taken,
            Err(KeystoreError::Protocol(ProtocolError::EndOfLife)) => {
                return Err(AgentKeyError::EndOfLife);
            }
            Err(error) => return Err(error.into()),
        };
        let key = TransactionKey::new(Arc::clone(&self.store), key);
        let used = ksn.counter().get().trailing_zeros() as usize;
        self.reopen_required = true;
        self.save_state()?;
        for register in (0..used).rev() {
            if let Some(refilled) = &self.dukpt.registers()[register] {
                self.store
                    .persist_key(refilled, &register_label(register))?;
            }
        }
        self.store.delete_key(&register_label(used))?;
        self.reopen_required = false;
        tracing::debug!(%ksn, "took a DUKPT transaction key");
        Ok((ksn, key))
    }

    /// Initial Key ID, next counter and transactions left.
    pub fn status(&self) -> KeyStatus {
        KeyStatus {
            initial_key_id: self.dukpt.initial_key_id(),
            algorithm: self.dukpt.algorithm(),
            next_counter: self.dukpt.next_counter(),
            transactions_left: self.dukpt.transactions_left(),
        }
    }

    /// The keystore the keys live in.
    pub fn store(&self) -> &Arc<dyn Keystore> {
        &self.store
    }

    /// Saves the state file from memory: next counter, and each register in use with the
    /// counter it belongs to.
    fn save_state(&self) -> Result<(), AgentKeyError> {
        let next_counter = self.dukpt.next_counter();
        let registers = std::array::from_fn(|register| {
            let counter = next_counter.and_then(|next| register_counter(register, next));
            self.dukpt.registers()[register].as_ref().and(counter)
        });
        let file = StateFileOut {
            format: STATE_FILE_FORMAT,
            version: STATE_FILE_VERSION,
            initial_key_id: self.dukpt.initial_key_id().to_string(),
            algorithm: self.dukpt.algorithm().name(),
            next_counter,
            registers,
        };
        let mut bytes = serde_json::to_vec_pretty(&file).map_err(|error| AgentKeyError::Io {
            path: self.state_path.clone(),
            action: "encode it",
            source: io::Error::other(error),
        })?;
        bytes.push(b'\n');
        write_atomically(&self.state_path, &bytes)
    }
}

impl Drop for TerminalKeyState {
    fn drop(&mut self) {
        // Only the transient copies: the persistent keys stay for the next start.
        self.dukpt
            .discard_all(&mut TerminalKeys(self.store.as_ref()));
    }
}

/// The label of register `register`'s persistent key: `nfcpay-dukpt-r00` … `-r31`.
pub fn register_label(register: usize) -> KeyLabel {
    format!("{REGISTER_LABEL_PREFIX}{register:02}")
        .parse()
        .unwrap_or_else(|_| unreachable!("a short printable label"))
}

/// The counter whose key register `register` holds when the next counter is `next`, or
/// `None` when the register is empty then.
///
/// Register `i` holds the key of the next counter whose lowest one-bit is `i`, derived from
/// the bits above `i`: that is `next` itself when `i` is `next`'s lowest one-bit, else `next`'s
/// bits above `i` plus bit `i` — but only if that counter is still ahead (bit `i` of `next`
/// clear, `i` above the lowest one-bit) and valid (at most 16 one-bits). Registers below the
/// lowest one-bit are refilled when `next` is taken.
pub fn register_counter(register: usize, next: u32) -> Option<u32> {
    let bit = u32::try_from(register).ok().filter(|bit| *bit < 32)?;
    let lowest = next.trailing_zeros();
    if next == 0 || bit < lowest || (bit > lowest && next & (1 << bit) != 0) {
        return None;
    }
    let above = next
        .checked_shr(bit + 1)
        .unwrap_or(0)
        .checked_shl(bit + 1)
        .unwrap_or(0);
    Some(above | (1 << bit)).filter(|counter| TransactionCounter::is_valid(*counter))
}

/// Loads the registers `saved` records as in use and deletes the persistent key of every
/// other register; also says whether a recorded register turned out missing or discarded.
fn load_registers(
    store: &dyn Keystore,
    saved: &SavedState,
) -> Result<([Option<KeyHandle>; FUTURE_KEY_REGISTERS], bool), AgentKeyError> {
    let mut registers = Registers::new(store);
    let mut changed = false;
    for (register, recorded) in saved.registers.iter().enumerate() {
        let label = register_label(register);
        let expected = saved
            .next_counter
            .and_then(|next| register_counter(register, next));
        let loaded = match recorded {
            Some(counter) if Some(*counter) == expected => store.load_key(&label)?,
            _ => None,
        };
        match loaded {
            Some(key) if key.algorithm() == saved.algorithm => {
                registers.keys[register] = Some(key);
            }
            other => {
                if let Some(key) = other {
                    store.destroy(key)?;
                }
                changed |= recorded.is_some();
                if store.delete_key(&label)? {
                    tracing::warn!(
                        register,
                        "discarded a register left by an interrupted update"
                    );
                } else if recorded.is_some() {
                    tracing::warn!(
                        register,
                        "a register recorded in use is missing; its counters will be skipped"
                    );
                }
            }
        }
    }
    Ok((registers.take(), changed))
}

/// Registers being loaded: destroyed again if opening fails half-way.
struct Registers<'s> {
    store: &'s dyn Keystore,
    keys: [Option<KeyHandle>; FUTURE_KEY_REGISTERS],
}

impl<'s> Registers<'s> {
    fn new(store: &'s dyn Keystore) -> Self {
        Self {
            store,
            keys: std::array::from_fn(|_| None),
        }
    }

    fn take(&mut self) -> [Option<KeyHandle>; FUTURE_KEY_REGISTERS] {
        std::mem::replace(&mut self.keys, std::array::from_fn(|_| None))
    }
}

impl Drop for Registers<'_> {
    fn drop(&mut self) {
        for key in self.keys.iter_mut().filter_map(Option::take) {
            // Best effort on an error path: these are transient copies.
            let _ = self.store.destroy(key);
        }
    }
}

// --- State file -----------------------------------------------------------------------------

#[derive(Serialize)]
struct StateFileOut {
    format: &'static str,
    version: u32,
    initial_key_id: String,
    algorithm: &'static str,
    next_counter: Option<u32>,
    registers: [Option<u32>; FUTURE_KEY_REGISTERS],
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFileIn {
    format: String,
    version: u32,
    initial_key_id: String,
    algorithm: String,
    next_counter: Option<u32>,
    registers: Vec<Option<u32>>,
}

/// The state file, checked.
struct SavedState {
    initial_key_id: InitialKeyId,
    algorithm: KeyAlgorithm,
    next_counter: Option<u32>,
    registers: [Option<u32>; FUTURE_KEY_REGISTERS],
}

fn read_state(path: &Path) -> Result<SavedState, AgentKeyError> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            return Err(AgentKeyError::NotLoaded {
                path: path.to_owned(),
            });
        }
        Err(source) => {
            return Err(AgentKeyError::Io {
                path: path.to_owned(),
                action: "open it",
                source,
            });
        }
    };
    let mut bytes = Vec::new();
    file.take(STATE_FILE_BYTES_MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| AgentKeyError::Io {
            path: path.to_owned(),
            action: "read it",
            source,
        })?;
    if bytes.len() as u64 > STATE_FILE_BYTES_MAX {
        return Err(corrupt(
            path,
            format_args!("larger than {STATE_FILE_BYTES_MAX} bytes"),
        ));
    }
    decode_state(&bytes).map_err(|reason| corrupt(path, reason))
}

fn decode_state(bytes: &[u8]) -> Result<SavedState, String> {
    let file: StateFileIn = serde_json::from_slice(bytes).map_err(|error| error.to_string())?;
    if file.format != STATE_FILE_FORMAT {
        return Err(format!("`format` is not {STATE_FILE_FORMAT:?}"));
    }
    if file.version != STATE_FILE_VERSION {
        return Err(format!(
            "version {} is not supported (this build reads version {STATE_FILE_VERSION})",
            file.version
        ));
    }
    let initial_key_id: InitialKeyId = file
        .initial_key_id
        .parse()
        .map_err(|_| "`initial_key_id` is not 16 hex digits".to_owned())?;
    let algorithm: KeyAlgorithm = file
        .algorithm
        .parse()
        .map_err(|_| "`algorithm` is not aes128, aes192 or aes256".to_owned())?;
    if let Some(next) = file.next_counter
        && !TransactionCounter::is_valid(next)
    {
        return Err(format!("`next_counter` {next:#x} is not a valid counter"));
    }
    let registers: [Option<u32>; FUTURE_KEY_REGISTERS] =
        file.registers.try_into().map_err(|registers: Vec<_>| {
            format!(
                "{} registers, expected {FUTURE_KEY_REGISTERS}",
                registers.len()
            )
        })?;
    Ok(SavedState {
        initial_key_id,
        algorithm,
        next_counter: file.next_counter,
        registers,
    })
}

fn corrupt(path: &Path, reason: impl std::fmt::Display) -> AgentKeyError {
    AgentKeyError::Corrupt {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

/// Takes the directory's exclusive lock (without waiting).
fn lock(dir: &Path) -> Result<File, AgentKeyError> {
    let path = dir.join(LOCK_FILE_NAME);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(STATE_FILE_MODE)
        .open(&path)
        .map_err(|source| AgentKeyError::Io {
            path: path.clone(),
            action: "open the lock file",
            source,
        })?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(file),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(AgentKeyError::Locked { path }),
        Err(errno) => Err(AgentKeyError::Io {
            path,
            action: "lock it",
            source: errno.into(),
        }),
    }
}

/// Writes `bytes` as a 0600 file over `path`, atomically and durably
/// ([`nfcpay_keystore::atomic_file`]): after a crash the file is the old one or the new one.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), AgentKeyError> {
    atomic_file::write_atomically(path, bytes, STATE_FILE_MODE).map_err(|error| {
        let (action, source) = match error {
            AtomicWriteError::Save(source) => ("save it", source),
            AtomicWriteError::SyncDirectory(source) => ("sync its directory", source),
            other => ("save it", io::Error::other(other)),
        };
        AgentKeyError::Io {
            path: path.to_owned(),
            action,
            source,
        }
    })
}

#[cfg(test)]
use nfcpay_protocol::test_vectors as x9_24_3_vectors;

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    use nfcpay_keystore::components::clear_key_kcv;
    use nfcpay_keystore::dukpt::{TransientKey, initial_key};
    use nfcpay_keystore::software::SoftwareKeystore;
    use nfcpay_keystore::testing::{
        FailingKeystore, assert_fresh_transaction, host_pin_key_kcv, pin_key_kcv,
    };
    use nfcpay_keystore::{DeriveBase, Kcv, KeyPurpose};
    use nfcpay_protocol::dukpt::{DerivationData, DeriveKey};
    use zeroize::Zeroizing;

    use super::*;

    use super::x9_24_3_vectors::{AES128_BDK, AES128_TERMINAL_KSN_SEQUENCE};

    /// A terminal: its directory, the path of its software keystore file, and the host.
    struct Terminal {
        directory: tempfile::TempDir,
        host: Arc<dyn Keystore>,
    }

    impl Terminal {
        /// A terminal loaded with the AES-128 vectors' initial key (unwrapped at enrollment in
        /// real life; here derived from the same BDK in the terminal's own store).
        fn loaded() -> (Self, TerminalKeyState) {
            let directory = tempfile::tempdir().unwrap();
            let host: Arc<dyn Keystore> = Arc::new(SoftwareKeystore::in_memory());
            let bdk = Zeroizing::new(hex::decode(AES128_BDK.bdk).unwrap());
            let initial_key_id: InitialKeyId = AES128_BDK.initial_key_id.parse().unwrap();
            host.import_bdk(initial_key_id.bdk_id(), &bdk).unwrap();
            let terminal = Self { directory, host };
            let store = terminal.store();
            let factory = SoftwareKeystore::in_memory();
            factory.import_bdk(initial_key_id.bdk_id(), &bdk).unwrap();
            // Move the IK into the terminal's store the way enrollment does: wrapped.
            let ik = move_initial_key(&factory, store.as_ref(), initial_key_id);
            let state = TerminalKeyState::load_initial_key(
                store,
                terminal.directory.path(),
                ik,
                KeyAlgorithm::Aes128,
                initial_key_id,
            )
            .unwrap();
            (terminal, state)
        }

        /// The terminal's keystore as a new process would open it.
        fn store(&self) -> Arc<dyn Keystore> {
            Arc::new(SoftwareKeystore::open(&self.directory.path().join("keystore.json")).unwrap())
        }

        fn reopen(&self) -> TerminalKeyState {
            TerminalKeyState::open(self.store(), self.directory.path()).unwrap()
        }

        /// The host's KCV of the PIN key of `ksn`.
        fn host_pin_kcv(&self, ksn: Ksn) -> Kcv {
            host_pin_key_kcv(self.host.as_ref(), ksn).unwrap()
        }
    }

    /// Wraps an IK derived in `factory` under an ECDH KEK and unwraps it into `terminal`.
    fn move_initial_key(
        factory: &dyn Keystore,
        terminal: &dyn Keystore,
        initial_key_id: InitialKeyId,
    ) -> KeyHandle {
        let label: KeyLabel = "ecdh".parse().unwrap();
        let (platform_private, platform_public) = factory.generate_ec_p256(&label, false).unwrap();
        let (terminal_private, terminal_public) = terminal.generate_ec_p256(&label, false).unwrap();
        let platform_kek = TransientKey::new(
            factory,
            factory
                .ecdh_kek(&platform_private, &terminal_public, b"test")
                .unwrap(),
        );
        let terminal_kek = TransientKey::new(
            terminal,
            terminal
                .ecdh_kek(&terminal_private, &platform_public, b"test")
                .unwrap(),
        );
        let ik = TransientKey::new(
            factory,
            initial_key(factory, initial_key_id, KeyPurpose::Export).unwrap(),
        );
        let wrapped = factory
            .wrap_key(platform_kek.handle(), ik.handle())
            .unwrap();
        terminal.destroy_ec(terminal_private).unwrap();
        terminal
            .unwrap_key(
                terminal_kek.handle(),
                &wrapped,
                KeyAlgorithm::Aes128,
                KeyPurpose::Derive,
            )
            .unwrap()
    }

    /// The KCV of the PIN key derived from a terminal's transaction (or register) key.
    fn pin_kcv(store: &dyn Keystore, key: &KeyHandle, ksn: Ksn) -> Kcv {
        pin_key_kcv(store, key, ksn).unwrap()
    }

    fn ksn_of(state: &TerminalKeyState, counter: u32) -> Ksn {
        Ksn::new(
            state.status().initial_key_id,
            TransactionCounter::try_from(counter).unwrap(),
        )
    }

    /// Every register in use holds the host's key of the counter it is recorded for, and no
    /// persistent register key exists for a register not in use.
    fn assert_registers_consistent(terminal: &Terminal, state: &TerminalKeyState) {
        let next = state.status().next_counter;
        for register in 0..FUTURE_KEY_REGISTERS {
            let persisted = state.store.load_key(&register_label(register)).unwrap();
            match &state.dukpt.registers()[register] {
                Some(key) => {
                    let counter = next.and_then(|next| register_counter(register, next));
                    let counter = counter.expect("a register in use has a counter");
                    let ksn = ksn_of(state, counter);
                    assert_eq!(
                        pin_kcv(state.store.as_ref(), key, ksn),
                        terminal.host_pin_kcv(ksn),
                        "register {register}"
                    );
                    let persisted = persisted.expect("a register in use is persisted");
                    assert_eq!(
                        pin_kcv(state.store.as_ref(), &persisted, ksn),
                        terminal.host_pin_kcv(ksn)
                    );
                    state.store.destroy(persisted).unwrap();
                }
                None => assert!(
                    persisted.is_none(),
                    "register {register} is empty but its key is still stored"
                ),
            }
        }
    }

    #[test]
    fn published_vectors_across_a_reopen_between_every_transaction() {
        let (terminal, state) = Terminal::loaded();
        assert_eq!(state.status().next_counter, Some(1));
        drop(state);
        for expected in AES128_TERMINAL_KSN_SEQUENCE {
            let mut state = terminal.reopen();
            assert_registers_consistent(&terminal, &state);
            let (ksn, key) = state.next_transaction().unwrap();
            assert_eq!(ksn.to_string(), *expected);
            let pin = AES128_BDK.working_key(expected, "PIN").unwrap();
            let expected_kcv = clear_key_kcv(&hex::decode(pin.key).unwrap()).unwrap();
            assert_eq!(
                pin_kcv(state.store.as_ref(), key.handle(), ksn),
                expected_kcv
            );
        }
        let state = terminal.reopen();
        assert_eq!(state.status().next_counter, Some(9));
        assert_registers_consistent(&terminal, &state);
    }

    #[test]
    fn register_counters_follow_the_terminal_algorithm() {
        /// A key is the counter bits of the data it was derived with.
        struct Bits;
        impl DeriveKey for Bits {
            type Key = u32;
            type Error = ProtocolError;
            fn derive(&mut self, _: &u32, data: &DerivationData) -> Result<u32, ProtocolError> {
                let bytes = data.as_bytes();
                Ok(u32::from_be_bytes([
                    bytes[12], bytes[13], bytes[14], bytes[15],
                ]))
            }
            fn discard(&mut self, _: u32) -> Result<(), ProtocolError> {
                Ok(())
            }
        }
        let initial_key_id: InitialKeyId = "1234567890123456".parse().unwrap();
        let check = |state: &TerminalState<u32>| {
            let next = state.next_counter().unwrap();
            for (register, key) in state.registers().iter().enumerate() {
                assert_eq!(
                    *key,
                    register_counter(register, next),
                    "{register} at {next:#x}"
                );
            }
        };
        let mut state =
            TerminalState::load_initial_key(&mut Bits, 0, KeyAlgorithm::Aes128, initial_key_id)
                .unwrap();
        for _ in 0..5000 {
            check(&state);
            state.next_transaction_key(&mut Bits).unwrap();
        }
        // Around the first counter with 17 one-bits, and near the end of life.
        for start in [0x0001_FFF0u32, 0xFFFE_8000] {
            let registers = std::array::from_fn(|register| register_counter(register, start));
            let mut state = TerminalState::from_parts(
                initial_key_id,
                KeyAlgorithm::Aes128,
                Some(start),
                registers,
            )
            .unwrap();
            while state.next_counter().is_some() && state.next_counter() < Some(start + 0x40) {
                check(&state);
                state.next_transaction_key(&mut Bits).unwrap();
            }
        }
        assert_eq!(register_counter(0, 0), None);
        assert_eq!(register_counter(32, 1), None);
    }

    /// A crash at every keystore step of the transaction that takes `crash_counter`, after
    /// the transactions before it went well: the restarted terminal never repeats a KSN and
    /// its keys stay the host's.
    #[test]
    fn a_crash_at_any_step_never_reuses_a_counter_or_a_used_key() {
        let mut scenarios = 0;
        for crash_counter in [1u32, 2, 4, 6, 8, 16] {
            // The transaction of counter c makes tz(c) derivations and persists and 1 delete.
            let steps = 2 * crash_counter.trailing_zeros() as usize + 1;
            for fail_at in 0..steps {
                let (terminal, mut state) = Terminal::loaded();
                let mut handed_out = Vec::new();
                while state.status().next_counter != Some(crash_counter) {
                    handed_out.push(state.next_transaction().unwrap().0);
                }
                drop(state);
                let failing = Arc::new(FailingKeystore::new(terminal.store(), fail_at));
                let mut state =
                    TerminalKeyState::open(Arc::clone(&failing) as _, terminal.directory.path())
                        .unwrap();
                failing.arm();
                assert!(
                    state.next_transaction().is_err(),
                    "counter {crash_counter:#x}, step {fail_at}"
                );
                // A failed derivation changed nothing on disk, and a retry may go on; a failed
                // save makes the state refuse until it is opened again.
                match state.next_transaction() {
                    Ok((ksn, _)) => {
                        assert!(fail_at < crash_counter.trailing_zeros() as usize);
                        handed_out.push(ksn);
                    }
                    Err(error) => {
                        assert!(matches!(error, AgentKeyError::ReopenRequired), "{error}")
                    }
                }
                drop(state); // the crash

                let mut state = terminal.reopen();
                assert_registers_consistent(&terminal, &state);
                for _ in 0..3 {
                    let (ksn, key) = state.next_transaction().unwrap();
                    assert_fresh_transaction(
                        state.store.as_ref(),
                        terminal.host.as_ref(),
                        &mut handed_out,
                        (ksn, key.handle()),
                        &format!("a crash at step {fail_at} of {crash_counter:#x}"),
                    );
                }
                assert_registers_consistent(&terminal, &state);
                scenarios += 1;
            }
        }
        assert_eq!(scenarios, 1 + 3 + 5 + 3 + 7 + 9);
    }

    #[test]
    fn the_state_file_is_private_and_a_corrupt_one_is_refused_clearly() {
        let (terminal, state) = Terminal::loaded();
        let path = terminal.directory.path().join(STATE_FILE_NAME);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let saved = fs::read_to_string(&path).unwrap();
        assert!(saved.contains("\"next_counter\": 1"), "{saved}");
        drop(state);
        let mut short: serde_json::Value = serde_json::from_str(&saved).unwrap();
        short["registers"].as_array_mut().unwrap().pop();
        let short = short.to_string();
        let corruptions = [
            ("", "EOF"),
            ("{", "EOF"),
            ("[]", "invalid length"),
            (
                &saved.replace("\"version\": 1", "\"version\": 9"),
                "version 9",
            ),
            (
                &saved.replace("\"next_counter\": 1", "\"next_counter\": 131071"),
                "not a valid counter",
            ),
            (&saved.replace("\"aes128\"", "\"des\""), "algorithm"),
            (&saved.replace("nfcpay-dukpt-terminal", "other"), "format"),
            (
                &saved.replace("1234567890123456", "12345678"),
                "initial_key_id",
            ),
            (&short, "31 registers"),
            (&" ".repeat(20_000), "larger than"),
        ];
        for (contents, needle) in corruptions {
            fs::write(&path, contents).unwrap();
            match TerminalKeyState::open(terminal.store(), terminal.directory.path()) {
                Err(error @ AgentKeyError::Corrupt { .. }) => {
                    let message = error.to_string();
                    assert!(message.contains(needle), "{message:?} lacks {needle:?}");
                    assert!(message.contains(STATE_FILE_NAME), "{message}");
                }
                Err(other) => panic!("expected a corrupt-file error, got {other}"),
                Ok(_) => panic!("a corrupt state file ({needle}) was accepted"),
            }
        }
        fs::remove_file(&path).unwrap();
        assert!(matches!(
            TerminalKeyState::open(terminal.store(), terminal.directory.path()),
            Err(AgentKeyError::NotLoaded { .. })
        ));
    }

    #[test]
    fn end_of_life_is_reported_and_kept() {
        let (terminal, state) = Terminal::loaded();
        drop(state);
        // Put the terminal just before its last counter: register 16 holds 0xFFFF0000's key.
        let store = terminal.store();
        let last = 0xFFFF_0000u32;
        let initial_key_id: InitialKeyId = AES128_BDK.initial_key_id.parse().unwrap();
        // The terminal's own register key for it, derived from its IK down the host path.
        let factory = SoftwareKeystore::in_memory();
        factory
            .import_bdk(
                initial_key_id.bdk_id(),
                &Zeroizing::new(hex::decode(AES128_BDK.bdk).unwrap()),
            )
            .unwrap();
        let ik = move_initial_key(&factory, store.as_ref(), initial_key_id);
        let ik = TransientKey::new(store.as_ref(), ik);
        let mut key = None;
        let mut bits = 0u32;
        for bit in (16..32).rev() {
            bits |= 1 << bit;
            let data = DerivationData::intermediate(KeyAlgorithm::Aes128, initial_key_id, bits);
            let base = key.as_ref().map_or(ik.handle(), TransientKey::handle);
            let next = store
                .derive(DeriveBase::Key(base), &data, KeyPurpose::Derive)
                .unwrap();
            key = Some(TransientKey::new(store.as_ref(), next));
        }
        let key = key.unwrap();
        for register in 0..FUTURE_KEY_REGISTERS {
            store.delete_key(&register_label(register)).unwrap();
        }
        store
            .persist_key(key.handle(), &register_label(16))
            .unwrap();
        let mut registers = vec![serde_json::Value::Null; FUTURE_KEY_REGISTERS];
        registers[16] = last.into();
        let file = serde_json::json!({
            "format": "nfcpay-dukpt-terminal", "version": 1,
            "initial_key_id": AES128_BDK.initial_key_id, "algorithm": "aes128",
            "next_counter": last, "registers": registers,
        });
        fs::write(
            terminal.directory.path().join(STATE_FILE_NAME),
            file.to_string(),
        )
        .unwrap();
        drop(key);
        drop(ik);
        drop(store);

        let mut state = terminal.reopen();
        assert_eq!(state.status().transactions_left, 1);
        let (ksn, key) = state.next_transaction().unwrap();
        assert_eq!(ksn.counter().get(), last);
        assert_eq!(
            pin_kcv(state.store.as_ref(), key.handle(), ksn),
            terminal.host_pin_kcv(ksn)
        );
        assert_eq!(state.status().next_counter, None);
        assert_eq!(state.status().transactions_left, 0);
        assert!(matches!(
            state.next_transaction(),
            Err(AgentKeyError::EndOfLife)
        ));
        drop(state);
        let mut state = terminal.reopen();
        assert_eq!(state.status().transactions_left, 0);
        assert!(matches!(
            state.next_transaction(),
            Err(AgentKeyError::EndOfLife)
        ));
        assert!(state.store.load_key(&register_label(16)).unwrap().is_none());
    }

    #[test]
    fn one_process_at_a_time_and_no_reloading_a_used_initial_key() {
        let (terminal, mut state) = Terminal::loaded();
        assert!(matches!(
            TerminalKeyState::open(terminal.store(), terminal.directory.path()),
            Err(AgentKeyError::Locked { .. })
        ));
        state.next_transaction().unwrap();
        drop(state);
        let store = terminal.store();
        let initial_key_id: InitialKeyId = AES128_BDK.initial_key_id.parse().unwrap();
        let factory = SoftwareKeystore::in_memory();
        factory
            .import_bdk(
                initial_key_id.bdk_id(),
                &Zeroizing::new(hex::decode(AES128_BDK.bdk).unwrap()),
            )
            .unwrap();
        let ik = move_initial_key(&factory, store.as_ref(), initial_key_id);
        let refused = TerminalKeyState::load_initial_key(
            Arc::clone(&store),
            terminal.directory.path(),
            ik,
            KeyAlgorithm::Aes128,
            initial_key_id,
        );
        assert!(matches!(refused, Err(AgentKeyError::InitialKeyReused(_))));
        assert_eq!(terminal.reopen().status().next_counter, Some(2));
    }

    #[test]
    fn status_and_errors_show_no_key() {
        let (_terminal, state) = Terminal::loaded();
        let status = state.status();
        assert_eq!(status.next_counter, Some(1));
        assert_eq!(status.algorithm, KeyAlgorithm::Aes128);
        assert_eq!(status.initial_key_id.to_string(), AES128_BDK.initial_key_id);
        let shown = format!("{status:?} {}", AgentKeyError::EndOfLife);
        assert!(!shown.to_ascii_uppercase().contains(&AES128_BDK.bdk[..8]));
    }
}
