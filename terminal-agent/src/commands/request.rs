//! `nfcpay-agent request`: the payee sends a payment request over NFC, submits half A, and
//! prints the verified receipt.

use std::io::Write;
use std::path::PathBuf;

use nfcpay_protocol::messages::{
    Description, HalfKind, PaymentKind, PaymentRequest, RequestValidity,
};
use nfcpay_protocol::{AccountId, Amount, Currency, ProtocolError, TxnId};

use super::shared::{
    AgentError, NfcSettings, PlatformWait, REQUEST_VALIDITY_MS, TerminalPlace, finish, line,
    now_ms, submit,
};
use crate::nfc::libnfc::DepSpeed;
use crate::nfc::{
    LibnfcInitiator, LibnfcTarget, NfcError, NfcLink, Role, Timeouts, random_message_id,
    send_message,
};

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
    let account: AccountId = terminal
        .file
        .account_id
        .as_deref()
        .ok_or_else(|| {
            AgentError::Usage(
                "the terminal has no account to be paid into: enroll it with --account".into(),
            )
        })?
        .parse()
        .map_err(|error: ProtocolError| AgentError::Usage(format!("account: {error}")))?;
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
    nfc_send(options.nfc, request_bytes.clone()).await?;
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

async fn nfc_send(nfc: NfcSettings, message: Vec<u8>) -> Result<(), AgentError> {
    tokio::task::spawn_blocking(move || -> Result<(), NfcError> {
        let timeouts = Timeouts::DEFAULT;
        let message_id = random_message_id()?;
        match nfc.role {
            Role::Initiator => {
                let mut link =
                    LibnfcInitiator::connect(&nfc.connstring, DepSpeed::default(), nfc.wait)?;
                send_message(
                    NfcLink::Initiator(&mut link),
                    message_id,
                    &message,
                    &timeouts,
                )
            }
            Role::Target => {
                let mut link = LibnfcTarget::listen(&nfc.connstring, nfc.wait)?;
                send_message(NfcLink::Target(&mut link), message_id, &message, &timeouts)
            }
        }
    })
    .await
    .map_err(|error| AgentError::internal_caused("NFC thread", error))?
    .map_err(AgentError::Nfc)
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
