//! `nfcpay-agent request`: the payee sends a payment request over NFC, submits half A, and
//! prints the verified receipt.

use std::io::Write;
use std::path::PathBuf;

use nfcpay_protocol::messages::{
    Description, HalfKind, PaymentKind, PaymentRequest, RequestValidity,
};
use nfcpay_protocol::{Amount, Currency, TxnId};

use super::shared::{
    AgentError, NfcSettings, PlatformWait, REQUEST_VALIDITY_MS, TerminalPlace, finish, line,
    now_ms, submit, terminal_account,
};
use crate::nfc::{random_message_id, send_message};

/// The payee's inputs.
pub struct RequestOptions {
    /// Amount as a decimal in `currency` (`12.50`).
    pub amount: String,
    /// ISO 4217 currency.
    pub currency: Currency,
    /// What the payer is shown.
    pub description: Description,
    /// What the payment is for.
    pub kind: PaymentKind,
    /// The NFC link.
    pub nfc: NfcSettings,
    /// The platform waits.
    pub wait: PlatformWait,
    /// Diagnostic: also write the sealed half here.
    pub save_half: Option<PathBuf>,
}

/// The payee: sends the request over NFC, submits half A, prints the verified receipt.
pub async fn run(
    place: &TerminalPlace,
    options: RequestOptions,
    out: &mut dyn Write,
) -> Result<(), AgentError> {
    let amount = Amount::parse_decimal(&options.amount, options.currency)
        .map_err(|error| AgentError::Usage(format!("--amount {}: {error}", options.amount)))?;
    let mut terminal = place.open_terminal()?;
    let account = terminal_account(&terminal, "to be paid into")?;
    let created_at_ms = now_ms();
    let request = PaymentRequest {
        txn_id: random_txn_id()?,
        payee_terminal_id: terminal.terminal_id.clone(),
        payee_account_id: account,
        amount,
        kind: options.kind,
        validity: RequestValidity::new(created_at_ms, created_at_ms + REQUEST_VALIDITY_MS)
            .map_err(|error| AgentError::internal_caused("request validity", error))?,
        description: options.description,
    };
    let request_bytes = request.encode();
    line(
        out,
        format_args!(
            "payment request {}: {} to {} (account {}), \"{}\"",
            request.txn_id,
            request.amount,
            request.payee_terminal_id,
            request.payee_account_id,
            request.description
        ),
    )?;
    line(
        out,
        format_args!(
            "sending it over NFC on {} as {}; waiting up to {:?} for the payer terminal",
            options.nfc.connstring, options.nfc.role, options.nfc.wait
        ),
    )?;
    let message = request_bytes.clone();
    options
        .nfc
        .exchange(move |link, timeouts| {
            send_message(link, random_message_id()?, &message, timeouts)
        })
        .await?;
    line(
        out,
        format_args!(
            "the payer terminal received the request ({} bytes, digest checked)",
            request_bytes.len()
        ),
    )?;
    let receipt = submit(
        &mut terminal,
        HalfKind::A,
        &request_bytes,
        request.txn_id,
        options.wait,
        options.save_half.as_deref(),
        out,
    )
    .await?;
    finish(&receipt, out)
}

fn random_txn_id() -> Result<TxnId, AgentError> {
    loop {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes)
            .map_err(|error| AgentError::internal_caused("no randomness", error))?;
        // All zero is the only refused value: draw again.
        if let Ok(txn_id) = TxnId::try_from(bytes) {
            return Ok(txn_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transaction_ids_are_random_and_never_zero() {
        let first = random_txn_id().unwrap_or_else(|error| panic!("{error}"));
        let second = random_txn_id().unwrap_or_else(|error| panic!("{error}"));
        assert_ne!(first, second);
    }
}
