//! `nfcpay-admin init`: the ledger's schema, the terminal CA and the server certificate (keys
//! in the keystore, certificates in the PKI directory), and the receipt-signing key.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use nfcpay_keystore::Keystore;
use serde_json::{Value, json};

use super::AdminError;
use crate::config::Config;
use crate::pki;
use crate::storage::{SchemaChange, Storage};

/// Validity of the terminal CA certificate made by `init`.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);

/// `init` arguments.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// DNS names and IP addresses the server certificate is for (repeatable).
    #[arg(long = "server-name", default_values_t = ["localhost".to_owned(), "127.0.0.1".to_owned()])]
    pub server_names: Vec<String>,
}

/// Runs `init`: idempotent for the CA and the receipt key; the server certificate is reissued.
pub fn run(
    args: InitArgs,
    config: &Config,
    keystore: &Arc<dyn Keystore>,
    out: &mut dyn Write,
) -> Result<Value, AdminError> {
    let schema = Storage::open_with(&config.database)?.schema_change();
    let (schema_state, migrations_applied) = match schema {
        SchemaChange::Created { applied } => ("created", applied),
        SchemaChange::Migrated { applied, .. } => ("migrated", applied),
        SchemaChange::UpToDate => ("up-to-date", 0),
    };
    match schema {
        SchemaChange::Created { applied } => {
            writeln!(out, "ledger schema: created ({applied} migrations)")?;
        }
        SchemaChange::Migrated { applied, known } => writeln!(
            out,
            "ledger schema: migrated ({applied} of {known} migrations applied now)"
        )?,
        SchemaChange::UpToDate => writeln!(out, "ledger schema: up to date (nothing to migrate)")?,
    }
    let dir = &config.platform.pki_dir;
    std::fs::create_dir_all(dir)?;
    let ca = pki::init_ca(keystore, dir, CA_VALIDITY)?;
    writeln!(
        out,
        "terminal CA: {} ({}), SHA-256 fingerprint {}",
        dir.join(pki::CA_CERTIFICATE_FILE).display(),
        if ca.created { "created" } else { "kept" },
        ca.fingerprint_sha256_hex
    )?;
    let server = pki::issue_server_certificate(keystore, dir, &args.server_names)?;
    writeln!(
        out,
        "server certificate: {} for {} (serial {})",
        dir.join(pki::SERVER_CERTIFICATE_FILE).display(),
        args.server_names.join(", "),
        server.serial_hex
    )?;
    let receipt = pki::ensure_receipt_key(keystore)?;
    writeln!(
        out,
        "receipt key: {}",
        hex::encode_upper(receipt.as_bytes())
    )?;
    Ok(json!({
        "ledger_schema": schema_state,
        "migrations_applied": migrations_applied,
        "terminal_ca": {
            "certificate": dir.join(pki::CA_CERTIFICATE_FILE).display().to_string(),
            "created": ca.created,
            "fingerprint_sha256": ca.fingerprint_sha256_hex,
        },
        "server_certificate": {
            "certificate": dir.join(pki::SERVER_CERTIFICATE_FILE).display().to_string(),
            "names": args.server_names,
            "serial": server.serial_hex,
        },
        "receipt_public_key": hex::encode_upper(receipt.as_bytes()),
    }))
}
