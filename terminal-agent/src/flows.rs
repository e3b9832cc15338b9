//! What the `nfcpay-agent` commands do, with typed inputs: enrolling, the payee's `request`,
//! the payer's `pay`, `status`, `devices` and the diagnostic `resend`. The command line itself
//! (parsing, help, exit codes) is [`crate::cli`].
//!
//! # The order of a half
//!
//! The request goes over NFC first; only then is a DUKPT counter taken
//! ([`TerminalKeyState::next_transaction`] saves the advanced counter before it returns the
//! key), the half sealed and submitted. So a failed NFC exchange costs no counter, and a
//! process that dies after taking a counter never uses it again: the next run takes the next
//! one. The transaction's working keys are kept until the receipt is verified, since the
//! platform MACs every answer about this half (including `GET /v1/transactions/{id}`) under
//! the half's own KSN.

use std::io::{BufRead, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nfcpay_keystore::software::SoftwareKeystore;
use nfcpay_keystore::{Keystore, KeystoreConfig, KeystoreError};
use nfcpay_protocol::messages::{
    Description, HalfEnvelope, HalfKind, PaymentInstruction, PaymentKind, PaymentRequest, Receipt,
    ReceiptStatus, RequestValidity,
};
use nfcpay_protocol::{AccountId, Amount, Currency, ProtocolError, TerminalId, TxnId};
use zeroize::Zeroizing;

use crate::enroll::{
    self, CERTIFICATE_FILE, EnrollError, EnrollmentTarget, TERMINAL_FILE, Terminal,
};
use crate::halves::{SealError, TransactionKeys, verify_receipt_signature};
use crate::keys::AgentKeyError;
use crate::nfc::libnfc::{DepSpeed, Probe};
use crate::nfc::{
    Connstring, LibnfcInitiator, LibnfcTarget, NfcError, NfcLink, Role, Timeouts,
    random_message_id, receive_message, send_message,
};
use crate::platform::{PlatformError, Problem};

/// Lifetime of a payment request the payee makes: 5 minutes (the protocol allows 10).
pub const REQUEST_VALIDITY_MS: u64 = 5 * 60 * 1000;
/// Longest `wait_ms` the platform accepts (docs/protocol.md §6.2).
pub const PLATFORM_WAIT_MAX: Duration = Duration::from_millis(nfcpay_protocol::api::WAIT_MS_MAX);
/// Pause between two status questions while a payment is pending.
pub const STATUS_POLL_INTERVAL: Duration = Duration::from_millis(500);
/// Longest accepted enrollment code file, in bytes.
pub const CODE_BYTES_MAX: usize = 256;
/// Longest saved half `resend` reads (docs/protocol.md §9: a half is at most 2133 bytes).
pub const SAVED_HALF_BYTES_MAX: u64 = 4096;
/// Name of the software keystore's file in the terminal directory.
pub const SOFTWARE_KEYSTORE_FILE: &str = "keystore.json";

/// Why a command failed. Nothing here carries a key, a PIN or an enrollment code.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The command line or its values are wrong (exit code 64).
    #[error("{0}")]
    Usage(String),
    /// The keystore could not be opened or failed.
    #[error("keystore")]
    Keystore(#[from] KeystoreError),
    /// Enrolling or opening the terminal failed.
    #[error("terminal")]
    Enroll(#[from] EnrollError),
    /// The terminal's DUKPT keys failed.
    #[error("DUKPT keys")]
    Keys(#[from] AgentKeyError),
    /// Sealing a half or verifying a receipt failed.
    #[error("half or receipt")]
    Seal(#[from] SealError),
    /// The platform refused or could not be reached.
    #[error("platform")]
    Platform(#[from] PlatformError),
    /// The NFC exchange with the other terminal failed.
    #[error("NFC")]
    Nfc(#[from] NfcError),
    /// What came over NFC is not a valid payment request.
    #[error("the payment request received over NFC is invalid")]
    InvalidRequest(#[source] ProtocolError),
    /// The payer did not consent.
    #[error("no consent: {0}")]
    NotConsented(String),
    /// The request expired (before consent, or on the platform).
    #[error("the payment request expired {0}")]
    Expired(&'static str),
    /// The payment was still pending when the agent stopped waiting.
    #[error(
        "the payment is still pending after {waited:?}; ask again with the transaction ID {txn_id}"
    )]
    StillPending {
        /// The transaction.
        txn_id: TxnId,
        /// How long the agent waited.
        waited: Duration,
    },
    /// A file could not be read or written.
    #[error("{path}: cannot {action}")]
    File {
        /// The file.
        path: PathBuf,
        /// What was being done.
        action: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The certificate file is not a certificate.
    #[error("{path}: not a PEM certificate: {reason}")]
    Certificate {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A background task (the NFC thread) or the async runtime failed.
    #[error("internal: {0}")]
    Internal(String),
}

impl AgentError {
    /// The process exit code: 64 (`EX_USAGE`) for usage errors, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Usage(_) => 64,
            _ => 1,
        }
    }

    /// The platform's problem, when the platform refused.
    pub fn problem(&self) -> Option<&Problem> {
        match self {
            Self::Platform(PlatformError::Refused(problem))
            | Self::Enroll(EnrollError::Platform(PlatformError::Refused(problem))) => Some(problem),
            _ => None,
        }
    }
}

/// Which keystore holds the terminal's keys.
#[derive(Clone)]
pub enum KeystoreChoice {
    /// The software keystore, `DIR/keystore.json`.
    Software,
    /// A PKCS#11 token named by an RFC 7512 URI (with `module-path` and `pin-source`).
    Pkcs11(String),
}

impl std::str::FromStr for KeystoreChoice {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if text == "software" {
            Ok(Self::Software)
        } else if text.starts_with("pkcs11:") {
            Ok(Self::Pkcs11(text.to_owned()))
        } else {
            Err("expected `software` or a `pkcs11:` URI".into())
        }
    }
}

// The URI names a PIN source, never a PIN; still, it is not printed.
impl std::fmt::Debug for KeystoreChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Software => f.write_str("Software"),
            Self::Pkcs11(_) => f.write_str("Pkcs11(..)"),
        }
    }
}

/// The terminal this agent runs as: its directory and its keystore.
#[derive(Debug, Clone)]
pub struct TerminalPlace {
    /// The terminal directory (`terminal.json`, certificates, DUKPT state).
    pub dir: PathBuf,
    /// Where its keys are.
    pub keystore: KeystoreChoice,
}

impl TerminalPlace {
    /// Opens the keystore (creating the directory and a software keystore when missing).
    pub fn open_store(&self) -> Result<Arc<dyn Keystore>, AgentError> {
        match &self.keystore {
            KeystoreChoice::Software => {
                std::fs::create_dir_all(&self.dir).map_err(|source| AgentError::File {
                    path: self.dir.clone(),
                    action: "create the terminal directory",
                    source,
                })?;
                let store = SoftwareKeystore::open(&self.dir.join(SOFTWARE_KEYSTORE_FILE))?;
                Ok(Arc::new(store))
            }
            KeystoreChoice::Pkcs11(uri) => {
                Ok(Arc::from(nfcpay_keystore::open(&KeystoreConfig::Pkcs11 {
                    uri: uri.clone(),
                })?))
            }
        }
    }

    /// Opens the enrolled terminal.
    pub fn open_terminal(&self) -> Result<Terminal, AgentError> {
        if !self.dir.join(TERMINAL_FILE).is_file() {
            return Err(AgentError::Usage(format!(
                "{} holds no enrolled terminal: run `nfcpay-agent enroll` first (or give --dir)",
                self.dir.display()
            )));
        }
        Ok(enroll::open(self.open_store()?, &self.dir)?)
    }
}

/// The NFC side of a flow: which reader, which role, how long to wait for the other terminal.
#[derive(Debug, Clone)]
pub struct NfcSettings {
    /// The reader.
    pub connstring: Connstring,
    /// Initiator or target.
    pub role: Role,
    /// How long to wait for the other terminal to come into the field.
    pub wait: Duration,
}

/// How long to wait for the platform.
#[derive(Debug, Clone, Copy)]
pub struct PlatformWait {
    /// `wait_ms` asked of the platform with the half (at most [`PLATFORM_WAIT_MAX`]).
    pub half: Duration,
    /// How long to keep asking while the payment is pending, after the half's answer.
    pub settle: Duration,
}

/// Enrollment inputs.
pub struct EnrollOptions {
    /// `host:port` of the platform's terminal listener (where halves go).
    pub platform: String,
    /// `host:port` of its enrollment listener, when it has one of its own.
    pub enroll_address: Option<String>,
    /// The name on the platform's certificate.
    pub server_name: String,
    /// The platform CA certificate file (PEM).
    pub ca_file: PathBuf,
    /// The terminal ID the operator registered.
    pub terminal_id: TerminalId,
    /// The one-time enrollment code.
    pub code: Zeroizing<String>,
    /// The account this terminal's halves name.
    pub account: Option<AccountId>,
}

/// Enrolls the terminal and records its account; prints its ID and the loaded key's KCV.
pub async fn enroll(
    place: &TerminalPlace,
    options: EnrollOptions,
    out: &mut dyn Write,
) -> Result<(), AgentError> {
    let ca_pem = read_file(
        &options.ca_file,
        64 * 1024,
        "read the platform CA certificate",
    )?;
    let store = place.open_store()?;
    let target = EnrollmentTarget {
        address: &options.platform,
        enroll_address: options
            .enroll_address
            .as_deref()
            .unwrap_or(&options.platform),
        server_name: &options.server_name,
        ca_pem: &ca_pem,
    };
    let mut terminal = enroll::enroll(
        store,
        &place.dir,
        &target,
        &options.terminal_id,
        &options.code,
    )
    .await?;
    terminal.file.account_id = options.account.as_ref().map(ToString::to_string);
    write_terminal_file(&place.dir, &terminal)?;
    let status = terminal.keys.status();
    line(
        out,
        format_args!("enrolled terminal {}", terminal.terminal_id),
    )?;
    line(
        out,
        format_args!("  terminal ID:       {}", terminal.terminal_id),
    )?;
    if let Some(account) = &terminal.file.account_id {
        line(out, format_args!("  account:           {account}"))?;
    }
    line(
        out,
        format_args!("  platform:          {}", terminal.file.platform_address),
    )?;
    line(
        out,
        format_args!("  initial key ID:    {}", status.initial_key_id),
    )?;
    line(
        out,
        format_args!("  initial key KCV:   {}", terminal.file.initial_key_kcv),
    )?;
    line(
        out,
        format_args!("  directory:         {}", place.dir.display()),
    )?;
    Ok(())
}

fn write_terminal_file(dir: &Path, terminal: &Terminal) -> Result<(), AgentError> {
    let path = dir.join(TERMINAL_FILE);
    let json = serde_json::to_vec_pretty(&terminal.file)
        .map_err(|error| AgentError::Internal(error.to_string()))?;
    let temporary = dir.join(format!("{TERMINAL_FILE}.new"));
    std::fs::write(&temporary, json)
        .and_then(|()| std::fs::rename(&temporary, &path))
        .map_err(|source| AgentError::File {
            path,
            action: "write",
            source,
        })
}

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
pub async fn request(
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
            .map_err(|error| AgentError::Internal(error.to_string()))?,
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
pub async fn pay(
    place: &TerminalPlace,
    options: PayOptions,
    out: &mut dyn Write,
) -> Result<(), AgentError> {
    let mut terminal = place.open_terminal()?;
    let account: AccountId = terminal
        .file
        .account_id
        .as_deref()
        .ok_or_else(|| {
            AgentError::Usage(
                "the terminal has no account to pay from: enroll it with --account".into(),
            )
        })?
        .parse()
        .map_err(|error: ProtocolError| AgentError::Usage(format!("account: {error}")))?;
    line(
        out,
        format_args!(
            "waiting up to {:?} for a payment request over NFC on {} as {}",
            options.nfc.wait, options.nfc.connstring, options.nfc.role
        ),
    )?;
    let request_bytes = nfc_receive(options.nfc).await?;
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

/// Takes the next KSN, seals the half, submits it and waits for a verified, final receipt.
async fn submit(
    terminal: &mut Terminal,
    kind: HalfKind,
    plaintext: &[u8],
    txn_id: TxnId,
    wait: PlatformWait,
    save_half: Option<&Path>,
    out: &mut dyn Write,
) -> Result<Receipt, AgentError> {
    // The counter is saved as used before the key comes back: a crash from here on never
    // reuses it.
    let (ksn, transaction_key) = terminal.keys.next_transaction()?;
    let keys = TransactionKeys::derive(
        Arc::clone(terminal.keys.store()),
        ksn,
        transaction_key.handle(),
    )?;
    drop(transaction_key);
    let envelope = keys.seal_half(kind, &terminal.terminal_id, plaintext, now_ms())?;
    if let Some(path) = save_half {
        std::fs::write(path, &envelope).map_err(|source| AgentError::File {
            path: path.to_owned(),
            action: "save the half",
            source,
        })?;
    }
    line(
        out,
        format_args!(
            "half {} sealed under KSN {ksn} (counter {}), {} bytes; submitting to {}",
            half_name(kind),
            ksn.counter().get(),
            envelope.len(),
            terminal.file.platform_address
        ),
    )?;
    let reply = terminal
        .platform
        .submit_half(kind, envelope, wait.half)
        .await?;
    let mut receipt = keys.open_receipt(
        &reply.receipt,
        &terminal.terminal_id,
        &terminal.receipt_public_key,
    )?;
    let started = Instant::now();
    while receipt.status() == ReceiptStatus::Pending {
        if started.elapsed() >= wait.settle {
            print_receipt(&receipt, "pending", out)?;
            return Err(AgentError::StillPending {
                txn_id,
                waited: wait.half + wait.settle,
            });
        }
        tokio::time::sleep(STATUS_POLL_INTERVAL).await;
        let answer = terminal.platform.transaction(txn_id).await?;
        receipt =
            keys.open_receipt(&answer, &terminal.terminal_id, &terminal.receipt_public_key)?;
    }
    Ok(receipt)
}

fn finish(receipt: &Receipt, out: &mut dyn Write) -> Result<(), AgentError> {
    print_receipt(
        receipt,
        "verified: the platform's signature and this half's DUKPT MAC",
        out,
    )?;
    match receipt.status() {
        ReceiptStatus::Settled => Ok(()),
        ReceiptStatus::Expired => Err(AgentError::Expired("before both halves arrived")),
        ReceiptStatus::Pending => Err(AgentError::Internal("pending receipt as final".into())),
    }
}

/// Prints a receipt the caller has verified (`how` says how).
fn print_receipt(receipt: &Receipt, how: &str, out: &mut dyn Write) -> Result<(), AgentError> {
    let fields = receipt.fields();
    let party =
        |terminal: Option<&TerminalId>, account: Option<&AccountId>| match (terminal, account) {
            (Some(terminal), Some(account)) => format!("{terminal} (account {account})"),
            (Some(terminal), None) => terminal.to_string(),
            _ => "(not known yet)".to_owned(),
        };
    line(out, format_args!("receipt ({how}):"))?;
    line(
        out,
        format_args!("  status:        {}", status_name(fields.status)),
    )?;
    line(out, format_args!("  transaction:   {}", fields.txn_id))?;
    line(out, format_args!("  amount:        {}", fields.amount))?;
    line(
        out,
        format_args!(
            "  payee:         {}",
            party(
                Some(&fields.payee_terminal_id),
                fields.payee_account_id.as_ref()
            )
        ),
    )?;
    line(
        out,
        format_args!(
            "  payer:         {}",
            party(
                fields.payer_terminal_id.as_ref(),
                fields.payer_account_id.as_ref()
            )
        ),
    )?;
    line(
        out,
        format_args!(
            "  for terminal:  {} (KSN {})",
            fields.recipient_terminal_id, fields.recipient_ksn
        ),
    )?;
    if fields.status == ReceiptStatus::Settled {
        line(
            out,
            format_args!("  settlement id: {}", fields.settlement_id),
        )?;
        line(
            out,
            format_args!(
                "  settled at:    {} ms since the Unix epoch",
                fields.settled_at_ms
            ),
        )?;
    }
    Ok(())
}

/// Diagnostic: submits a half saved with `--save-half` again, as it is or with one byte of its
/// GCM tag flipped, and shows the platform's answer. The half's MAC key is gone from the
/// terminal (DUKPT keeps only future keys), so an answer is checked by its signature only.
pub async fn resend(
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
    let receipt = verify_receipt_signature(&reply.receipt, &terminal.receipt_public_key)?;
    print_receipt(
        &receipt,
        "verified: the platform's signature; this KSN's MAC key no longer exists on the terminal",
        out,
    )
}

/// Prints the terminal's identity, certificate expiry and key state.
pub fn status(place: &TerminalPlace, out: &mut dyn Write) -> Result<(), AgentError> {
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

/// Lists the readers libnfc finds, or opens the connection strings given.
pub fn devices(given: &[Connstring], out: &mut dyn Write) -> Result<(), AgentError> {
    let reports = crate::nfc::devices(given)?;
    if reports.is_empty() {
        line(
            out,
            format_args!("libnfc found no reader (give connection strings to open them)"),
        )?;
    }
    for report in reports {
        match report.probe {
            Probe::Opened { name, chip } => line(
                out,
                format_args!(
                    "{}: {name}{}",
                    report.connstring,
                    chip.map(|chip| format!(", chip: {chip}"))
                        .unwrap_or_default()
                ),
            )?,
            Probe::Failed { error } => {
                line(
                    out,
                    format_args!("{}: cannot open: {error}", report.connstring),
                )?;
            }
        }
    }
    Ok(())
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
    .map_err(|error| AgentError::Internal(format!("NFC thread: {error}")))?
    .map_err(AgentError::Nfc)
}

async fn nfc_receive(nfc: NfcSettings) -> Result<Vec<u8>, AgentError> {
    tokio::task::spawn_blocking(move || -> Result<Vec<u8>, NfcError> {
        let timeouts = Timeouts::DEFAULT;
        match nfc.role {
            Role::Initiator => {
                let mut link =
                    LibnfcInitiator::connect(&nfc.connstring, DepSpeed::default(), nfc.wait)?;
                receive_message(NfcLink::Initiator(&mut link), &timeouts)
            }
            Role::Target => {
                let mut link = LibnfcTarget::listen(&nfc.connstring, nfc.wait)?;
                receive_message(NfcLink::Target(&mut link), &timeouts)
            }
        }
    })
    .await
    .map_err(|error| AgentError::Internal(format!("NFC thread: {error}")))?
    .map_err(AgentError::Nfc)
}

fn random_txn_id() -> Result<TxnId, AgentError> {
    loop {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes)
            .map_err(|error| AgentError::Internal(format!("no randomness: {error}")))?;
        // All zero is the only refused value: draw again.
        if let Ok(txn_id) = TxnId::try_from(bytes) {
            return Ok(txn_id);
        }
    }
}

/// Reads a whole file of at most `bytes_max` bytes.
fn read_file(path: &Path, bytes_max: u64, action: &'static str) -> Result<Vec<u8>, AgentError> {
    let file_error = |source| AgentError::File {
        path: path.to_owned(),
        action,
        source,
    };
    let file = std::fs::File::open(path).map_err(file_error)?;
    let mut bytes = Vec::new();
    file.take(bytes_max + 1)
        .read_to_end(&mut bytes)
        .map_err(file_error)?;
    if bytes.len() as u64 > bytes_max {
        return Err(AgentError::Usage(format!(
            "{}: longer than {bytes_max} bytes",
            path.display()
        )));
    }
    Ok(bytes)
}

/// Reads an enrollment code (one line, trimmed) from a file or stdin, in a zeroized buffer.
pub fn read_code(from: Option<&Path>) -> Result<Zeroizing<String>, AgentError> {
    let mut raw = Zeroizing::new(Vec::with_capacity(CODE_BYTES_MAX + 1));
    let limit = (CODE_BYTES_MAX + 1) as u64;
    let (path, result) = match from {
        Some(path) => (
            path.to_owned(),
            std::fs::File::open(path).and_then(|file| file.take(limit).read_to_end(&mut raw)),
        ),
        None => (
            PathBuf::from("(stdin)"),
            std::io::stdin().lock().take(limit).read_to_end(&mut raw),
        ),
    };
    result.map_err(|source| AgentError::File {
        path: path.clone(),
        action: "read the enrollment code",
        source,
    })?;
    if raw.len() > CODE_BYTES_MAX {
        return Err(AgentError::Usage(format!(
            "{}: an enrollment code is at most {CODE_BYTES_MAX} bytes",
            path.display()
        )));
    }
    let text = std::str::from_utf8(&raw).map_err(|_| {
        AgentError::Usage(format!(
            "{}: the enrollment code is not text",
            path.display()
        ))
    })?;
    let code = Zeroizing::new(text.trim().to_owned());
    if code.is_empty() {
        return Err(AgentError::Usage(format!(
            "{}: no enrollment code in it",
            path.display()
        )));
    }
    Ok(code)
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
        })
}

fn line(out: &mut dyn Write, text: std::fmt::Arguments<'_>) -> Result<(), AgentError> {
    writeln!(out, "{text}").map_err(output_error)
}

fn output_error(source: std::io::Error) -> AgentError {
    AgentError::File {
        path: PathBuf::from("(stdout)"),
        action: "write",
        source,
    }
}

fn half_name(kind: HalfKind) -> &'static str {
    match kind {
        HalfKind::A => "A",
        HalfKind::B => "B",
    }
}

fn status_name(status: ReceiptStatus) -> &'static str {
    match status {
        ReceiptStatus::Pending => "pending",
        ReceiptStatus::Settled => "settled",
        ReceiptStatus::Expired => "expired",
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keystore_choices_parse() {
        assert!(matches!("software".parse(), Ok(KeystoreChoice::Software)));
        assert!(matches!(
            "pkcs11:token=t?module-path=/m.so&pin-source=file:/p".parse(),
            Ok(KeystoreChoice::Pkcs11(_))
        ));
        assert!("hsm".parse::<KeystoreChoice>().is_err());
        let debug = format!("{:?}", KeystoreChoice::Pkcs11("pkcs11:secret".into()));
        assert!(!debug.contains("secret"));
    }

    #[test]
    fn usage_errors_exit_64_and_others_1() {
        assert_eq!(AgentError::Usage("x".into()).exit_code(), 64);
        assert_eq!(AgentError::NotConsented("x".into()).exit_code(), 1);
    }

    #[test]
    fn a_refusal_exposes_its_problem() {
        let problem = Problem::new(
            nfcpay_protocol::api::ProblemCode::ReplayedKsn,
            "KSN already used",
        );
        let error = AgentError::Platform(PlatformError::Refused(problem.clone()));
        assert_eq!(error.problem(), Some(&problem));
        assert_eq!(AgentError::Expired("x").problem(), None);
    }

    #[test]
    fn codes_are_read_trimmed_and_bounded() {
        let dir = tempfile::tempdir().unwrap_or_else(|error| panic!("{error}"));
        let path = dir.path().join("code");
        std::fs::write(&path, "ABCD-1234\n").unwrap_or_else(|error| panic!("{error}"));
        assert_eq!(
            read_code(Some(&path)).map(|code| code.to_string()).ok(),
            Some("ABCD-1234".into())
        );
        std::fs::write(&path, "\n").unwrap_or_else(|error| panic!("{error}"));
        assert!(matches!(read_code(Some(&path)), Err(AgentError::Usage(_))));
        std::fs::write(&path, "A".repeat(CODE_BYTES_MAX + 1))
            .unwrap_or_else(|error| panic!("{error}"));
        assert!(matches!(read_code(Some(&path)), Err(AgentError::Usage(_))));
    }

    #[test]
    fn transaction_ids_are_random_and_never_zero() {
        let first = random_txn_id().unwrap_or_else(|error| panic!("{error}"));
        let second = random_txn_id().unwrap_or_else(|error| panic!("{error}"));
        assert_ne!(first, second);
    }
}
