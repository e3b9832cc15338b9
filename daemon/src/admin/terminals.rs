//! `nfcpay-admin terminals …`: register terminals with one-time enrollment codes, list them,
//! suspend, reactivate and revoke them.

use std::io::Write;

use clap::Subcommand;
use nfcpay_keystore::Keystore;
use nfcpay_protocol::{AccountId, BdkId, DerivationId, InitialKeyId, TerminalId};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::AdminError;
use crate::config::Config;
use crate::storage::{NewTerminal, Storage, StorageError, TerminalState};

/// Characters of an enrollment code: Crockford's base32 (no I, L, O, U: nothing to misread).
const CODE_ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
/// Characters in an enrollment code (5 bits each: 100 bits).
pub const CODE_CHARS: usize = 20;
/// Attempts at a fresh random derivation ID before giving up.
const DERIVATION_ID_ATTEMPTS_MAX: usize = 16;

/// `terminals` subcommands.
#[derive(Debug, Subcommand)]
pub enum TerminalsCommand {
    /// Register a terminal: prints its Initial Key ID and a one-time enrollment code.
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
    },
    /// List terminals.
    List,
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
) -> Result<(), AdminError> {
    let set_state = |id: TerminalId, state: TerminalState, out: &mut dyn Write| {
        storage.set_terminal_state(&id, state)?;
        writeln!(out, "terminal {id}: {}", state.as_str())?;
        Ok::<_, AdminError>(())
    };
    match command {
        TerminalsCommand::Add {
            id,
            account,
            bdk_id,
            code_validity_hours,
        } => {
            let bdk_id = match bdk_id.or(config.platform.enrollment_bdk_id()?) {
                Some(bdk_id) => keystore()?.bdk_info(bdk_id)?.bdk_id,
                None => only_bdk(keystore()?.as_ref())?,
            };
            let hours =
                code_validity_hours.unwrap_or(config.platform.enrollment_code_validity_hours);
            add(storage, id, account, bdk_id, hours, out)
        }
        TerminalsCommand::List => {
            writeln!(
                out,
                "{:<20} {:<20} {:<18} {:<10} {:>10}",
                "TERMINAL", "ACCOUNT", "INITIAL KEY ID", "STATE", "COUNTER"
            )?;
            for terminal in storage.terminals()? {
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
            Ok(())
        }
        TerminalsCommand::Suspend { id } => set_state(id, TerminalState::Suspended, out),
        TerminalsCommand::Reactivate { id } => set_state(id, TerminalState::Active, out),
        TerminalsCommand::Revoke { id } => set_state(id, TerminalState::Revoked, out),
    }
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
    out: &mut dyn Write,
) -> Result<(), AdminError> {
    let code = enrollment_code()?;
    let code_sha256: [u8; 32] = Sha256::digest(code.as_bytes()).into();
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
                writeln!(out, "enrollment code: {}", code.as_str())?;
                writeln!(
                    out,
                    "the code works once, for {code_validity_hours} hours; give it to the terminal's installer only"
                )?;
                return Ok(());
            }
        }
    }
    Err(AdminError::Input(
        "could not find a free derivation ID under this BDK".into(),
    ))
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
