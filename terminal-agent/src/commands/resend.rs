//! `nfcpay-agent resend`: a diagnostic that submits a saved half again, as it is or tampered.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use nfcpay_protocol::messages::HalfEnvelope;

use super::shared::{
    AgentError, SAVED_HALF_BYTES_MAX, TerminalPlace, half_name, line, print_receipt, read_file,
};
use crate::halves::verify_receipt_addressed;

/// Diagnostic: submits a half saved with `--save-half` again, as it is or with one byte of its
/// GCM tag flipped, and shows the platform's answer. The half's MAC key is gone from the
/// terminal (DUKPT keeps only future keys), so an answer is checked by its signature only.
pub async fn run(
    place: &TerminalPlace,
    file: &Path,
    tamper: bool,
    out: &mut dyn Write,
) -> Result<(), AgentError> {
    let mut bytes = read_file(file, SAVED_HALF_BYTES_MAX, "read the saved half")?;
    let envelope = HalfEnvelope::decode(&bytes).map_err(|error| {
        AgentError::Usage(format!("{}: not a sealed half: {error}", file.display()))
    })?;
    let terminal = place.open_terminal()?;
    let header = envelope.header();
    if tamper && let Some(last) = bytes.last_mut() {
        *last ^= 0x01;
    }
    line(
        out,
        format_args!(
            "re-sending half {} of terminal {} under KSN {} ({} bytes, {})",
            half_name(header.kind),
            header.terminal_id,
            header.ksn,
            bytes.len(),
            if tamper {
                "last byte of the GCM tag flipped"
            } else {
                "byte-identical"
            }
        ),
    )?;
    let reply = terminal
        .platform
        .submit_half(header.kind, bytes, Duration::ZERO)
        .await?;
    let receipt = verify_receipt_addressed(
        &reply.receipt,
        &terminal.terminal_id,
        Some(header.ksn),
        &terminal.receipt_public_key,
    )?;
    print_receipt(
        &receipt,
        "verified: the platform's signature; this KSN's MAC key no longer exists on the terminal",
        out,
    )
}
