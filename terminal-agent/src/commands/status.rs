//! `nfcpay-agent status`: the terminal's identity, certificate expiry and DUKPT key state;
//! with `--txn TXN_ID`, the payment of that transaction as the platform has it now (the
//! question a payer or payee left pending is told to ask).

use std::io::Write;

use nfcpay_protocol::TxnId;

use super::shared::{AgentError, TerminalPlace, line, print_receipt, read_file};
use crate::enroll::CERTIFICATE_FILE;
use crate::halves::verify_receipt_addressed;

/// Asks the platform for the latest receipt of `txn_id` (`GET /v1/transactions/{id}`; this
/// terminal must be a party) and prints it, checked by the platform's signature and its
/// recipient, this terminal. (The MAC key of the half it answers is gone from the terminal.)
pub async fn run_transaction(
    place: &TerminalPlace,
    txn_id: TxnId,
    out: &mut dyn Write,
) -> Result<(), AgentError> {
    let terminal = place.open_terminal()?;
    let answer = terminal.platform.transaction(txn_id).await?;
    let receipt = verify_receipt_addressed(
        &answer,
        &terminal.terminal_id,
        None,
        &terminal.receipt_public_key,
    )?;
    if receipt.fields().txn_id != txn_id {
        return Err(AgentError::internal(format!(
            "the platform answered about transaction {} when asked about {txn_id}",
            receipt.fields().txn_id
        )));
    }
    print_receipt(
        &receipt,
        "verified: the platform's signature, addressed to this terminal",
        out,
    )
}

/// Prints the terminal's identity, certificate expiry and key state.
pub fn run(place: &TerminalPlace, out: &mut dyn Write) -> Result<(), AgentError> {
    let terminal = place.open_terminal()?;
    let certificate_path = place.dir.join(CERTIFICATE_FILE);
    let certificate = read_file(&certificate_path, 64 * 1024, "read the certificate")?;
    let not_after = certificate_expiry(&certificate).map_err(|reason| AgentError::Certificate {
        path: certificate_path,
        reason,
    })?;
    let keys = terminal.keys.status();
    line(
        out,
        format_args!("terminal ID:         {}", terminal.terminal_id),
    )?;
    line(
        out,
        format_args!(
            "account:             {}",
            terminal.file.account_id.as_deref().unwrap_or("(none)")
        ),
    )?;
    line(
        out,
        format_args!(
            "platform:            {} (certificate name {})",
            terminal.file.platform_address, terminal.file.platform_server_name
        ),
    )?;
    line(out, format_args!("certificate expires: {not_after}"))?;
    line(
        out,
        format_args!("initial key ID:      {}", keys.initial_key_id),
    )?;
    line(
        out,
        format_args!("initial key KCV:     {}", terminal.file.initial_key_kcv),
    )?;
    line(out, format_args!("key algorithm:       {}", keys.algorithm))?;
    match keys.next_counter {
        Some(counter) => line(out, format_args!("next KSN counter:    {counter}"))?,
        None => line(out, format_args!("next KSN counter:    none (end of life)"))?,
    }
    line(
        out,
        format_args!("transactions left:   {}", keys.transactions_left),
    )?;
    Ok(())
}

/// The certificate's `notAfter`, as text.
fn certificate_expiry(pem: &[u8]) -> Result<String, String> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem).map_err(|error| error.to_string())?;
    let certificate = pem.parse_x509().map_err(|error| error.to_string())?;
    Ok(certificate.validity().not_after.to_string())
}
