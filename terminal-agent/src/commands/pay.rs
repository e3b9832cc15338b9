//! `nfcpay-agent pay`: the payer receives a payment request over NFC, shows it, takes the
//! payer's consent (a limit, `--yes`, or a prompt), submits half B, and prints the verified
//! receipt.

use std::io::{BufRead, IsTerminal, Read, Write};
use std::path::PathBuf;

use nfcpay_protocol::Amount;
use nfcpay_protocol::messages::{HalfKind, PaymentInstruction, PaymentKind, PaymentRequest};

use super::shared::{
    AgentError, NfcSettings, PlatformWait, TerminalPlace, finish, line, now_ms, output_error,
    submit, terminal_account,
};
use crate::nfc::receive_message;

/// The payer's inputs.
pub struct PayOptions {
    /// The NFC link.
    pub nfc: NfcSettings,
    /// Consent given in advance (unattended).
    pub yes: bool,
    /// Consent only up to this amount (decimal, in the request's currency).
    pub max_amount: Option<String>,
    /// The platform waits.
    pub wait: PlatformWait,
    /// Diagnostic: also write the sealed half here.
    pub save_half: Option<PathBuf>,
}

/// The payer: receives a request over NFC, shows it, takes consent, submits half B, prints the
/// verified receipt.
pub async fn run(
    place: &TerminalPlace,
    options: PayOptions,
    out: &mut dyn Write,
) -> Result<(), AgentError> {
    let mut terminal = place.open_terminal()?;
    let account = terminal_account(&terminal, "to pay from")?;
    line(
        out,
        format_args!(
            "waiting up to {:?} for a payment request over NFC on {} as {}",
            options.nfc.wait, options.nfc.connstring, options.nfc.role
        ),
    )?;
    let request_bytes = options.nfc.exchange(receive_message).await?;
    let request = PaymentRequest::decode(&request_bytes).map_err(AgentError::InvalidRequest)?;
    let now = now_ms();
    let expires_at_ms = request.validity.expires_at_ms();
    line(
        out,
        format_args!("payment request received ({} bytes):", request_bytes.len()),
    )?;
    line(
        out,
        format_args!(
            "  payee:        {} (account {})",
            request.payee_terminal_id, request.payee_account_id
        ),
    )?;
    line(out, format_args!("  amount:       {}", request.amount))?;
    line(
        out,
        format_args!("  kind:         {}", kind_name(request.kind)),
    )?;
    line(out, format_args!("  description:  {}", request.description))?;
    line(out, format_args!("  transaction:  {}", request.txn_id))?;
    line(
        out,
        format_args!(
            "  expires:      in {} s",
            expires_at_ms.saturating_sub(now) / 1000
        ),
    )?;
    if request.validity.is_expired_at(now) {
        return Err(AgentError::Expired("before the payer could consent"));
    }
    consent(&request, options.yes, options.max_amount.as_deref(), out)?;
    let instruction = PaymentInstruction::consenting_to(
        &request_bytes,
        terminal.terminal_id.clone(),
        account,
        now_ms(),
    )
    .map_err(AgentError::InvalidRequest)?;
    let receipt = submit(
        &mut terminal,
        HalfKind::B,
        &instruction.encode(),
        request.txn_id,
        options.wait,
        options.save_half.as_deref(),
        out,
    )
    .await?;
    finish(&receipt, out)
}

/// The payer's consent: a limit, `--yes`, or a prompt on the terminal.
fn consent(
    request: &PaymentRequest,
    yes: bool,
    max_amount: Option<&str>,
    out: &mut dyn Write,
) -> Result<(), AgentError> {
    if let Some(max_text) = max_amount {
        let max = Amount::parse_decimal(max_text, request.amount.currency())
            .map_err(|error| AgentError::Usage(format!("--max-amount {max_text}: {error}")))?;
        if request.amount.minor_units() > max.minor_units() {
            return Err(AgentError::NotConsented(format!(
                "{} is above the limit of {max} (--max-amount)",
                request.amount
            )));
        }
        line(
            out,
            format_args!("consent: {} is within the limit of {max}", request.amount),
        )?;
        return Ok(());
    }
    if yes {
        line(out, format_args!("consent: given in advance (--yes)"))?;
        return Ok(());
    }
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return Err(AgentError::NotConsented(
            "nobody to ask (stdin is not a terminal); give --yes or --max-amount for unattended use"
                .into(),
        ));
    }
    write!(
        out,
        "Pay {} to {} (account {})? [y/N] ",
        request.amount, request.payee_terminal_id, request.payee_account_id
    )
    .and_then(|()| out.flush())
    .map_err(output_error)?;
    let mut answer = String::new();
    stdin
        .lock()
        .take(16)
        .read_line(&mut answer)
        .map_err(|source| AgentError::File {
            path: PathBuf::from("(stdin)"),
            action: "read the answer",
            source,
        })?;
    if matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes") {
        Ok(())
    } else {
        Err(AgentError::NotConsented("the payer declined".into()))
    }
}

/// The name of a payment kind, as the `--kind` flag takes it.
pub fn kind_name(kind: PaymentKind) -> &'static str {
    match kind {
        PaymentKind::Purchase => "purchase",
        PaymentKind::Transfer => "transfer",
        PaymentKind::Remittance => "remittance",
        PaymentKind::Loan => "loan",
    }
}
