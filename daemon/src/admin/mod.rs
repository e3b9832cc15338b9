//! `nfcpay-admin`, the operator's command line: key ceremony today; accounts, terminals and
//! audit as the platform grows. One file per group of commands.
//!
//! Every command reads the same configuration file as the daemon (`--config`), prints key
//! check values to identify keys, and never prints a key.

mod accounts;
mod audit;
mod bdk;
mod dukpt;
mod init;
mod terminals;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use nfcpay_keystore::{Keystore, KeystoreError};

use crate::config::{Config, ConfigError};

/// Exit code for a usage or configuration error (`EX_USAGE` of sysexits.h).
pub const EXIT_USAGE: u8 = 64;

/// The nfcpay operator's command line.
#[derive(Debug, Parser)]
#[command(
    name = "nfcpay-admin",
    version,
    about = "Operate an nfcpay platform: key ceremony, accounts, terminals, audit",
    long_about = "Operate an nfcpay platform.\n\n\
        Keys are identified by key check values (KCV: the first 3 bytes of AES-CMAC over one \
        zero block, as 6 hex digits); no command ever prints a key."
)]
pub struct Cli {
    /// Configuration file (TOML); `NFCPAY_*` environment variables override it.
    #[arg(
        long,
        short,
        env = "NFCPAY_CONFIG",
        default_value = "/etc/nfcpay/nfcpay.toml"
    )]
    pub config: PathBuf,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The command groups.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Base derivation keys: generate, import from components, list.
    #[command(subcommand)]
    Bdk(bdk::BdkCommand),
    /// DUKPT checks: key check values of derived keys.
    #[command(subcommand)]
    Dukpt(dukpt::DukptCommand),
    /// Prepare the platform: ledger schema, terminal CA, server certificate, receipt key.
    Init(init::InitArgs),
    /// Ledger accounts: create, fund, show balance and postings.
    #[command(subcommand)]
    Accounts(accounts::AccountsCommand),
    /// Terminals: add (with a one-time enrollment code), list, suspend, reactivate, revoke.
    #[command(subcommand)]
    Terminals(terminals::TerminalsCommand),
    /// The audit log.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// The configuration could not be loaded.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The keystore refused or failed.
    #[error(transparent)]
    Keystore(#[from] KeystoreError),
    /// Operator input was malformed.
    #[error("{0}")]
    Input(String),
    /// The ledger refused or failed.
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
    /// Certificates or platform keys could not be made.
    #[error(transparent)]
    Pki(#[from] crate::pki::PkiError),
    /// The audit chain is broken.
    #[error("{0}")]
    AuditBroken(String),
    /// Reading standard input or writing standard output failed.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl AdminError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Self::Config(_)
            | Self::Input(_)
            | Self::Keystore(
                KeystoreError::Configuration(_) | KeystoreError::InvalidInput { .. },
            ) => ExitCode::from(EXIT_USAGE),
            _ => ExitCode::FAILURE,
        }
    }
}

/// Runs one command, writing its report to `out`. Each command opens only what it needs.
pub fn run(cli: Cli, out: &mut dyn Write) -> Result<(), AdminError> {
    let config = Config::load(&cli.config)?;
    config.check_not_root_in_service_directory("nfcpay-admin")?;
    let keystore = || nfcpay_keystore::open(&config.keystore).map_err(AdminError::from);
    let storage = || crate::storage::Storage::open_with(&config.database).map_err(AdminError::from);
    match cli.command {
        Command::Bdk(command) => bdk::run(command, keystore()?.as_ref(), out),
        Command::Dukpt(command) => dukpt::run(command, keystore()?.as_ref(), out),
        Command::Init(args) => {
            let keystore: Arc<dyn Keystore> = Arc::from(keystore()?);
            init::run(args, &config, &keystore, out)
        }
        Command::Accounts(command) => accounts::run(command, &storage()?, out),
        Command::Terminals(command) => terminals::run(command, &config, &storage()?, keystore, out),
        Command::Audit(command) => audit::run(command, &storage()?, keystore()?.as_ref(), out),
    }
}
