//! `nfcpay-admin terminals …`: register terminals with one-time enrollment codes, list and
//! show them, suspend, reactivate and revoke them.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Subcommand;
use nfcpay_keystore::Keystore;
use nfcpay_protocol::{AccountId, BdkId, DerivationId, InitialKeyId, TerminalId};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::AdminError;
use crate::config::Config;
use crate::storage::{NewTerminal, Storage, StorageError, TerminalState, TerminalView};

/// Characters of an enrollment code: Crockford's base32 (no I, L, O, U: nothing to misread).
const CODE_ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
/// Characters in an enrollment code (5 bits each: 100 bits).
pub const CODE_CHARS: usize = 20;
/// Attempts at a fresh random derivation ID before giving up.
const DERIVATION_ID_ATTEMPTS_MAX: usize = 16;

/// `terminals` subcommands.
#[derive(Debug, Subcommand)]
pub enum TerminalsCommand {
    /// Register a terminal: prints its Initial Key ID and a one-time enrollment code (or, with
    /// --code-file, writes the code to a new file readable by its owner only).
    Add {
        /// Terminal ID (1–32 of A–Z a–z 0–9 . _ -), the certificate's common name.
        #[arg(long)]
        id: TerminalId,
        /// The account the terminal's halves may name.
        #[arg(long)]
        account: AccountId,
        /// BDK to derive its initial key from (default: `[platform] enrollment_bdk_id`, or the
        /// keystore's only BDK).
        #[arg(long)]
        bdk_id: Option<BdkId>,
        /// Hours the enrollment code works (default: `[platform] enrollment_code_validity_hours`).
        #[arg(long)]
        code_validity_hours: Option<u32>,
        /// Write the enrollment code to this new file (mode 0600; refused if it exists)
        /// instead of printing it.
        #[arg(long)]
        code_file: Option<PathBuf>,
    },
    /// List terminals.
    List,
    /// Show one terminal: account, initial key ID, state, enrollment, highest KSN counter.
    Show {
        /// Terminal ID.
        id: TerminalId,
    },
    /// Refuse a terminal's halves until reactivated.
    Suspend {
        /// Terminal ID.
        #[arg(long)]
        id: TerminalId,
    },
    /// Accept a suspended terminal's halves again.
    Reactivate {
        /// Terminal ID.
        #[arg(long)]
        id: TerminalId,
    },
    /// Refuse a terminal for good.
    Revoke {
        /// Terminal ID.
        #[arg(long)]
        id: TerminalId,
    },
}

/// Runs a `terminals` subcommand. `keystore` is needed by `add` only.
pub fn run(
    command: TerminalsCommand,
    config: &Config,
    storage: &Storage,
    keystore: impl FnOnce() -> Result<Box<dyn Keystore>, AdminError>,
    out: &mut dyn Write,
) -> Result<Value, AdminError> {
    let set_state = |id: TerminalId, state: TerminalState, out: &mut dyn Write| {
        storage.set_terminal_state(&id, state)?;
        writeln!(out, "terminal {id}: {}", state.as_str())?;
        Ok::<_, AdminError>(json!({ "terminal": terminal_json(&shown(storage, &id)?) }))
    };
    match command {
        TerminalsCommand::Add {
            id,
            account,
            bdk_id,
            code_validity_hours,
            code_file,
        } => {
            let bdk_id = match bdk_id.or(config.platform.enrollment_bdk_id()?) {
                Some(bdk_id) => keystore()?.bdk_info(bdk_id)?.bdk_id,
                None => only_bdk(keystore()?.as_ref())?,
            };
            let hours =
                code_validity_hours.unwrap_or(config.platform.enrollment_code_validity_hours);
            add(
                storage,
                id,
                account,
                bdk_id,
                hours,
                code_file.as_deref(),
                out,
            )
        }
        TerminalsCommand::Show { id } => {
            let terminal = shown(storage, &id)?;
            writeln!(out, "terminal {id}")?;
            writeln!(out, "  account:          {}", terminal.account_id)?;
            writeln!(out, "  initial key ID:   {}", terminal.initial_key_id)?;
            writeln!(out, "  state:            {}", terminal.state)?;
            match terminal.enrolled_at_ms {
                Some(at_ms) => {
                    writeln!(out, "  enrolled:         {}", super::format_utc_ms(at_ms))?
                }
                None => writeln!(
                    out,
                    "  enrollment code:  valid until {}",
                    super::format_utc_ms(terminal.code_expires_at_ms)
                )?,
            }
            if let Some(serial) = &terminal.certificate_serial {
                writeln!(out, "  certificate:      serial {serial}")?;
            }
            writeln!(out, "  highest counter:  {}", terminal.highest_counter)?;
            Ok(json!({ "terminal": terminal_json(&terminal) }))
        }
        TerminalsCommand::List => {
            writeln!(
                out,
                "{:<20} {:<20} {:<18} {:<10} {:>10}",
                "TERMINAL", "ACCOUNT", "INITIAL KEY ID", "STATE", "COUNTER"
            )?;
            let terminals = storage.terminals()?;
            for terminal in &terminals {
                writeln!(
                    out,
                    "{:<20} {:<20} {:<18} {:<10} {:>10}",
                    terminal.id.as_str(),
                    terminal.account_id.as_str(),
                    terminal.initial_key_id.to_string(),
                    terminal.state.as_str(),
                    terminal.highest_counter
                )?;
            }
            Ok(json!({ "terminals": terminals.iter().map(terminal_json).collect::<Vec<_>>() }))
        }
        TerminalsCommand::Suspend { id } => set_state(id, TerminalState::Suspended, out),
        TerminalsCommand::Reactivate { id } => set_state(id, TerminalState::Active, out),
        TerminalsCommand::Revoke { id } => set_state(id, TerminalState::Revoked, out),
    }
}

fn shown(storage: &Storage, id: &TerminalId) -> Result<TerminalView, AdminError> {
    storage
        .terminal(id)?
        .ok_or_else(|| AdminError::NotFound(format!("unknown terminal {id}")))
}

/// A terminal in JSON (docs/admin-cli.md); never its enrollment code or the code's hash.
pub fn terminal_json(terminal: &TerminalView) -> Value {
    json!({
        "id": terminal.id.as_str(),
        "account": terminal.account_id.as_str(),
        "initial_key_id": terminal.initial_key_id.to_string(),
        "state": terminal.state.as_str(),
        "code_expires_at_ms": terminal.code_expires_at_ms,
        "enrolled_at_ms": terminal.enrolled_at_ms,
        "certificate_serial": terminal.certificate_serial,
        "highest_counter": terminal.highest_counter,
    })
}

fn only_bdk(keystore: &dyn Keystore) -> Result<BdkId, AdminError> {
    match keystore.list_bdks()?.as_slice() {
        [only] => Ok(only.bdk_id),
        [] => Err(AdminError::Input(
            "the keystore holds no BDK: run `bdk generate` first".into(),
        )),
        _ => Err(AdminError::Input(
            "several BDKs: choose one with --bdk-id or [platform] enrollment_bdk_id".into(),
        )),
    }
}

fn add(
    storage: &Storage,
    id: TerminalId,
    account: AccountId,
    bdk_id: BdkId,
    code_validity_hours: u32,
    code_file: Option<&Path>,
    out: &mut dyn Write,
) -> Result<Value, AdminError> {
    let code = enrollment_code()?;
    let code_sha256: [u8; 32] = Sha256::digest(code.as_bytes()).into();
    // The file first: if it cannot be made, nothing is registered.
    let written = code_file
        .map(|path| CodeFile::create(path, code.as_str()))
        .transpose()?;
    let now_ms = i64::try_from(crate::service::now_ms()).unwrap_or(i64::MAX);
    let code_expires_at_ms = now_ms + i64::from(code_validity_hours) * 3_600_000;
    for _ in 0..DERIVATION_ID_ATTEMPTS_MAX {
        let initial_key_id = InitialKeyId::new(bdk_id, DerivationId::from(random::<4>()?));
        let added = storage.add_terminal(NewTerminal {
            id: id.clone(),
            account_id: account.clone(),
            initial_key_id,
            code_sha256,
            code_expires_at_ms,
        });
        match added {
            Err(StorageError::InitialKeyIdInUse) => continue,
            Err(error) => return Err(error.into()),
            Ok(()) => {
                writeln!(out, "terminal {id} registered for account {account}")?;
                writeln!(out, "initial key ID: {initial_key_id}")?;
                let mut document = json!({
                    "terminal": terminal_json(&shown(storage, &id)?),
                    "code_validity_hours": code_validity_hours,
                });
                match written {
                    Some(file) => {
                        writeln!(out, "enrollment code: written to {}", file.path.display())?;
                        document["code_file"] = json!(file.keep().display().to_string());
                    }
                    None => {
                        writeln!(out, "enrollment code: {}", code.as_str())?;
                        document["enrollment_code"] = json!(code.as_str());
                    }
                }
                writeln!(
                    out,
                    "the code works once, for {code_validity_hours} hours; give it to the terminal's installer only"
                )?;
                return Ok(document);
            }
        }
    }
    Err(AdminError::Input(
        "could not find a free derivation ID under this BDK".into(),
    ))
}

/// An enrollment code written to a new file (mode 0600), removed again on drop unless kept
/// (when the terminal could not be registered).
struct CodeFile {
    path: PathBuf,
    kept: bool,
}

impl CodeFile {
    fn create(path: &Path, code: &str) -> Result<Self, AdminError> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|error| {
                AdminError::Input(format!("--code-file {}: {error}", path.display()))
            })?;
        let written = Self {
            path: path.to_owned(),
            kept: false,
        };
        file.write_all(code.as_bytes())?;
        file.write_all(b"\n")?;
        file.sync_all()?;
        Ok(written)
    }

    fn keep(mut self) -> PathBuf {
        self.kept = true;
        std::mem::take(&mut self.path)
    }
}

impl Drop for CodeFile {
    fn drop(&mut self) {
        if !self.kept {
            // Best effort: the code in it was never registered, so it is worthless anyway.
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A fresh one-time enrollment code: [`CODE_CHARS`] characters of Crockford base32.
fn enrollment_code() -> Result<Zeroizing<String>, AdminError> {
    let bytes = Zeroizing::new(random::<CODE_CHARS>()?);
    Ok(Zeroizing::new(
        bytes
            .iter()
            .map(|b| char::from(CODE_ALPHABET[usize::from(b & 0x1F)]))
            .collect(),
    ))
}

fn random<const N: usize>() -> Result<[u8; N], AdminError> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes)
        .map_err(|error| AdminError::Input(format!("no randomness from the OS: {error}")))?;
    Ok(bytes)
}
