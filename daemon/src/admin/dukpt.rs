//! `nfcpay-admin dukpt …`: key check values of DUKPT keys derived inside the keystore.

use std::io::Write;

use clap::Subcommand;
use nfcpay_keystore::dukpt::{TransientKey, transaction_key, working_key};
use nfcpay_keystore::{KeyPurpose, Keystore};
use nfcpay_protocol::Ksn;
use nfcpay_protocol::dukpt::{KeyAlgorithm, WorkingKeyUsage};

use serde_json::{Value, json};

use super::AdminError;

/// `dukpt` subcommands.
#[derive(Debug, Subcommand)]
pub enum DukptCommand {
    /// KCV of the transaction key of a KSN, or of one of its working keys, derived inside the
    /// keystore from the BDK the KSN names. Never prints a key.
    Kcv {
        /// KSN: 24 hex digits (BDK ID 8 | derivation ID 8 | transaction counter 8).
        #[arg(long)]
        ksn: Ksn,
        /// A working key usage: data-both, data-encrypt, data-decrypt, mac-gen, mac-verify,
        /// mac-both, pin or kek. Without it, the transaction key's KCV.
        #[arg(long)]
        usage: Option<WorkingKeyUsage>,
        /// Working key algorithm (default: the BDK's).
        #[arg(long, requires = "usage")]
        algorithm: Option<KeyAlgorithm>,
    },
}

/// Runs a `dukpt` subcommand.
pub fn run(
    command: DukptCommand,
    keystore: &dyn Keystore,
    out: &mut dyn Write,
) -> Result<Value, AdminError> {
    match command {
        DukptCommand::Kcv {
            ksn,
            usage,
            algorithm,
        } => {
            let (what, key) = match usage {
                None => (
                    "transaction key".to_owned(),
                    transaction_key(keystore, ksn, KeyPurpose::Check)?,
                ),
                Some(usage) => (
                    format!("{usage} working key"),
                    working_key(keystore, ksn, usage, algorithm, KeyPurpose::Check)?,
                ),
            };
            let key = TransientKey::new(keystore, key);
            let kcv = keystore.kcv(key.handle())?;
            writeln!(
                out,
                "KSN {ksn} {what} ({}) KCV {kcv}",
                key.handle().algorithm()
            )?;
            Ok(json!({
                "ksn": ksn.to_string(),
                "usage": usage.map_or("transaction-key".to_owned(), |usage| usage.to_string()),
                "algorithm": key.handle().algorithm().to_string(),
                "kcv": kcv.to_string(),
            }))
        }
    }
}
