//! `nfcpay-admin`, the operator's command line: key ceremony today; accounts, terminals and
//! audit as the platform grows. One file per group of commands.
//!
//! Every command reads the same configuration file as the daemon (`--config`), prints key
//! check values to identify keys, and never prints a key.
//!
//! Output: prose for people by default; with `--format json`, exactly one JSON document on
//! standard output, and a failure as one JSON document on standard error with a non-zero exit
//! code. The shapes are documented in `docs/admin-cli.md` and are stable: fields may be added,
//! never renamed or removed. Each command returns its JSON document and writes its prose to
//! `out`; [`run`] prints the one that was asked for.
//!
//! Log events (`NFCPAY_LOG`, errors only by default) go to standard error as text; with
//! `--format json` they are not written unless `NFCPAY_LOG` is set, and then as JSON lines,
//! so that standard error holds nothing a script cannot parse.

mod accounts;
mod audit;
mod bdk;
mod dukpt;
mod init;
mod terminals;
mod transactions;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use nfcpay_keystore::{Keystore, KeystoreError};
use nfcpay_protocol::ErrorChain;
use serde_json::{Value, json};

use crate::config::{Config, ConfigError};

/// Exit code for a usage or configuration error (`EX_USAGE` of sysexits.h).
pub const EXIT_USAGE: u8 = 64;
/// Exit code for malformed arguments (clap's own).
pub const EXIT_ARGUMENTS: u8 = 2;
/// The environment variable of the log filter (`tracing_subscriber::EnvFilter` directives,
/// e.g. `debug` or `nfcpay_keystore=debug`).
pub const LOG_VARIABLE: &str = "NFCPAY_LOG";

/// How a command reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum Format {
    /// Prose and tables for people.
    #[default]
    Human,
    /// One JSON document on standard output (errors: one on standard error).
    Json,
}

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
        global = true,
        env = "NFCPAY_CONFIG",
        default_value = "/etc/nfcpay/nfcpay.toml"
    )]
    pub config: PathBuf,

    /// Output format: `human` (prose) or `json` (one JSON document on standard output, errors
    /// as JSON on standard error; shapes in docs/admin-cli.md).
    #[arg(long, global = true, value_enum, default_value_t = Format::Human)]
    pub format: Format,

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
    /// Ledger accounts: create, fund, list, show balance and postings.
    #[command(subcommand)]
    Accounts(accounts::AccountsCommand),
    /// Terminals: add (with a one-time enrollment code), list, show, suspend, reactivate,
    /// revoke.
    #[command(subcommand)]
    Terminals(terminals::TerminalsCommand),
    /// Payments: look one up by transaction ID (both halves, postings, audit records), list.
    #[command(subcommand)]
    Transactions(transactions::TransactionsCommand),
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
    /// The ledger refused or failed (with the database's own words, when it failed).
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
    /// Certificates or platform keys could not be made.
    #[error(transparent)]
    Pki(#[from] crate::pki::PkiError),
    /// What was asked for does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The audit chain is broken.
    #[error("{0}")]
    AuditBroken(String),
    /// Reading standard input or writing standard output failed.
    #[error("I/O")]
    Io(#[from] std::io::Error),
}

impl AdminError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Self::Config(_)
            | Self::Input(_)
            | Self::Keystore(
                KeystoreError::Configuration(_)
                | KeystoreError::ModuleLoad { .. }
                | KeystoreError::CanaryFailed { .. }
                | KeystoreError::InvalidInput { .. },
            ) => ExitCode::from(EXIT_USAGE),
            _ => ExitCode::FAILURE,
        }
    }

    /// A stable name for the kind of failure (`error.kind` in JSON).
    pub fn kind(&self) -> &'static str {
        use crate::storage::StorageError;
        match self {
            // An account or terminal named on the command line that the ledger does not have
            // is the same failure as an unknown transaction, whichever layer finds it.
            Self::Storage(StorageError::UnknownAccount(_) | StorageError::UnknownTerminal(_)) => {
                "not-found"
            }
            Self::Config(_) => "config",
            Self::Keystore(_) => "keystore",
            Self::Input(_) => "input",
            Self::Storage(_) => "storage",
            Self::Pki(_) => "pki",
            Self::NotFound(_) => "not-found",
            Self::AuditBroken(_) => "audit-broken",
            Self::Io(_) => "io",
        }
    }

    /// Whether this is standard output closed by its reader (`nfcpay-admin … | head`): not a
    /// failure of the command.
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, Self::Io(error) if error.kind() == std::io::ErrorKind::BrokenPipe)
    }
}

/// The whole program: parses the arguments, runs the command, reports in the format asked for,
/// and returns the exit code. A closed standard output (EPIPE) ends it quietly with success.
pub fn main(args: impl IntoIterator<Item = std::ffi::OsString>) -> ExitCode {
    let args: Vec<std::ffi::OsString> = args.into_iter().collect();
    let json = json_asked(&args);
    init_logging(json);
    let cli = match Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        Err(error) => return argument_error(&error, json),
    };
    let format = cli.format;
    let mut stdout = std::io::stdout().lock();
    let result = run(cli, &mut stdout).and_then(|()| stdout.flush().map_err(AdminError::from));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if error.is_broken_pipe() => ExitCode::SUCCESS,
        Err(error) => {
            let code = error.exit_code();
            report_error(
                format,
                error.kind(),
                &ErrorChain(&error).to_string(),
                exit_number(&error),
            );
            code
        }
    }
}

/// Sends log events to standard error: text for people; with `--format json`, JSON lines and
/// only when `NFCPAY_LOG` asks for them, so that by default the one JSON error document is all
/// a script finds there.
fn init_logging(json: bool) {
    if json && std::env::var_os(LOG_VARIABLE).is_none() {
        return;
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env(LOG_VARIABLE))
        // Colour only for a person at a terminal, never into a file or a pipe.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    // Fails only when a subscriber is set already (`main` called twice in one process): that
    // one stays.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Whether the raw arguments ask for JSON (for errors found before they parse).
fn json_asked(args: &[std::ffi::OsString]) -> bool {
    args.windows(2)
        .any(|pair| pair[0] == "--format" && pair[1] == "json")
        || args.iter().any(|arg| arg == "--format=json")
}

/// Reports a command line clap refused. `--help` and `--version` asked for are not errors:
/// clap prints them in either format. Every usage error in JSON mode (a missing subcommand
/// too, for which clap would print the help text) is a JSON error document.
fn argument_error(error: &clap::Error, json: bool) -> ExitCode {
    use clap::error::ErrorKind;
    if !json
        || matches!(
            error.kind(),
            ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
        )
    {
        // clap prints help and usage itself (and ignores a closed pipe).
        let _ = error.print();
        return ExitCode::from(u8::try_from(error.exit_code()).unwrap_or(EXIT_ARGUMENTS));
    }
    let rendered = error.render().to_string();
    let message = if error.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        // The rendering is the help text; its usage line says what is missing.
        let usage = rendered
            .lines()
            .find_map(|line| line.strip_prefix("Usage: "))
            .unwrap_or("see --help");
        format!("a subcommand is required: {usage}")
    } else {
        rendered
            .lines()
            .next()
            .unwrap_or_default()
            .trim_start_matches("error: ")
            .to_owned()
    };
    report_error(Format::Json, "arguments", &message, EXIT_ARGUMENTS);
    ExitCode::from(EXIT_ARGUMENTS)
}

fn exit_number(error: &AdminError) -> u8 {
    match error.exit_code() {
        code if code == ExitCode::from(EXIT_USAGE) => EXIT_USAGE,
        _ => 1,
    }
}

/// Writes a failure to standard error: prose, or `{"error": {"kind", "message", "exit_code"}}`.
fn report_error(format: Format, kind: &str, message: &str, exit_code: u8) {
    let mut stderr = std::io::stderr().lock();
    // Nothing is left to tell if standard error itself is gone.
    let _ = match format {
        Format::Human => writeln!(stderr, "nfcpay-admin: {message}"),
        Format::Json => writeln!(
            stderr,
            "{}",
            json!({ "error": { "kind": kind, "message": message, "exit_code": exit_code } })
        ),
    };
}

/// `12.50` for 1250 minor units of EUR (no currency code).
pub fn decimal_minor(minor: i64, currency: nfcpay_protocol::Currency) -> String {
    let exponent = u32::from(currency.exponent());
    let sign = if minor < 0 { "-" } else { "" };
    let magnitude = minor.unsigned_abs();
    if exponent == 0 {
        return format!("{sign}{magnitude}");
    }
    let scale = 10u64.pow(exponent);
    format!(
        "{sign}{}.{:0width$}",
        magnitude / scale,
        magnitude % scale,
        width = exponent as usize
    )
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for milliseconds since the epoch.
pub fn format_utc_ms(at_ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(at_ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| at_ms.to_string())
}

/// Runs one command, writing its report to `out` in the format asked for. Each command opens
/// only what it needs.
pub fn run(cli: Cli, out: &mut dyn Write) -> Result<(), AdminError> {
    let config = Config::load(&cli.config)?;
    config.check_not_root_in_service_directory("nfcpay-admin")?;
    let keystore = || nfcpay_keystore::open(&config.keystore).map_err(AdminError::from);
    let storage = || crate::storage::Storage::open_with(&config.database).map_err(AdminError::from);
    let mut sink = std::io::sink();
    let json = cli.format == Format::Json;
    let prose: &mut dyn Write = if json { &mut sink } else { &mut *out };
    let document = dispatch(cli.command, &config, keystore, storage, prose)?;
    if json {
        serde_json::to_writer_pretty(&mut *out, &document).map_err(std::io::Error::from)?;
        writeln!(out)?;
    }
    Ok(())
}

fn dispatch(
    command: Command,
    config: &Config,
    keystore: impl Fn() -> Result<Box<dyn Keystore>, AdminError>,
    storage: impl Fn() -> Result<crate::storage::Storage, AdminError>,
    out: &mut dyn Write,
) -> Result<Value, AdminError> {
    match command {
        Command::Bdk(command) => bdk::run(command, keystore()?.as_ref(), out),
        Command::Dukpt(command) => dukpt::run(command, keystore()?.as_ref(), out),
        Command::Init(args) => {
            let keystore: Arc<dyn Keystore> = Arc::from(keystore()?);
            init::run(args, config, &keystore, out)
        }
        Command::Accounts(command) => accounts::run(command, &storage()?, out),
        Command::Terminals(command) => terminals::run(command, config, &storage()?, keystore, out),
        Command::Transactions(command) => transactions::run(command, &storage()?, out),
        Command::Audit(command) => audit::run(command, &storage()?, keystore()?.as_ref(), out),
    }
}
