//! `nfcpay-admin audit verify`: walks the hash-chained audit log.

use std::io::Write;

use clap::Subcommand;

use nfcpay_keystore::{KeyLabel, Keystore};
use p256::ecdsa::signature::Verifier as _;
use p256::ecdsa::{Signature, VerifyingKey};
use serde_json::{Value, json};

use super::AdminError;
use crate::pki::RECEIPT_KEY_LABEL;
use crate::storage::Storage;

/// `audit` subcommands.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check every link of every audit chain, and every signed checkpoint of the chains'
    /// heads (its signature by the receipt key in the keystore, and that each head is still on
    /// its chain); exit 1 at the first broken one.
    Verify,
}

/// Runs an `audit` subcommand.
pub fn run(
    command: AuditCommand,
    storage: &Storage,
    keystore: &dyn Keystore,
    out: &mut dyn Write,
) -> Result<Value, AdminError> {
    match command {
        AuditCommand::Verify => {
            let label: KeyLabel = RECEIPT_KEY_LABEL.parse()?;
            let receipt_key = keystore.find_ec_p256(&label)?;
            let signatures_checked = receipt_key.is_some();
            let report = match receipt_key {
                Some((_, public_key)) => {
                    let verifying_key = VerifyingKey::from_sec1_bytes(public_key.as_bytes())
                        .map_err(|_| {
                            AdminError::AuditBroken(
                                "the receipt public key is not a P-256 point".into(),
                            )
                        })?;
                    let check = move |message: &[u8], signature: &[u8; 64]| {
                        Signature::from_slice(signature).is_ok_and(|signature| {
                            verifying_key.verify(message, &signature).is_ok()
                        })
                    };
                    storage.audit_verify_signed(&check)?
                }
                None => {
                    writeln!(
                        out,
                        "no receipt key in the keystore: checkpoint signatures not checked"
                    )?;
                    storage.audit_verify()?
                }
            };
            match &report.first_break {
                None => {
                    writeln!(
                        out,
                        "audit log intact: {} records in {} chains, {} signed checkpoints",
                        report.records,
                        report.chains.len(),
                        report.checkpoints
                    )?;
                    for head in &report.chains {
                        writeln!(
                            out,
                            "  chain {}: {} records, head {}",
                            head.chain_id,
                            head.seq,
                            hex::encode_upper(head.hash)
                        )?;
                    }
                    Ok(json!({
                        "intact": true,
                        "records": report.records,
                        "checkpoints": report.checkpoints,
                        "checkpoint_signatures_checked": signatures_checked,
                        "chains": report.chains.iter().map(|head| json!({
                            "chain_id": head.chain_id,
                            "records": head.seq,
                            "head_hash": hex::encode_upper(head.hash),
                        })).collect::<Vec<_>>(),
                    }))
                }
                Some(broken) => Err(AdminError::AuditBroken(format!(
                    "audit log broken in chain {} at record {}: {}",
                    broken.chain_id, broken.seq, broken.reason
                ))),
            }
        }
    }
}
