//! `nfcpay-admin audit verify`: walks the hash-chained audit log.

use std::io::Write;

use clap::Subcommand;

use super::AdminError;
use crate::storage::Storage;

/// `audit` subcommands.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check every link of the audit chain; exit 1 at the first broken one.
    Verify,
}

/// Runs an `audit` subcommand.
pub fn run(
    command: AuditCommand,
    storage: &Storage,
    out: &mut dyn Write,
) -> Result<(), AdminError> {
    match command {
        AuditCommand::Verify => {
            let report = storage.audit_verify()?;
            match &report.first_break {
                None => {
                    writeln!(
                        out,
                        "audit log intact: {} records in {} chains",
                        report.records,
                        report.chains.len()
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
                    Ok(())
                }
                Some(broken) => Err(AdminError::AuditBroken(format!(
                    "audit log broken in chain {} at record {}: {}",
                    broken.chain_id, broken.seq, broken.reason
                ))),
            }
        }
    }
}
