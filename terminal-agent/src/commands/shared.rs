//! What the commands share: the one error type, where the terminal lives (its directory and
//! its keystore), the NFC and platform settings, and the path of a half from its DUKPT counter
//! to a verified receipt, with the receipt's printing.
//!
//! # The order of a half
//!
//! The request goes over NFC first; only then is a DUKPT counter taken
//! ([`TerminalKeyState::next_transaction`](crate::keys::TerminalKeyState::next_transaction)
//! saves the advanced counter before it returns the key), the half sealed, kept in
//! `DIR/pending/` ([`crate::pending`]) and submitted (`submit`), the same bytes again after a
//! fault ([`crate::delivery`]). So a failed NFC exchange costs no counter, a process that dies
//! after taking a counter never uses it again (the next run takes the next one), and a half
//! that was sealed is sent again as it is, never sealed anew: `nfcpay-agent pending --resend`
//! finishes what a killed run left. The transaction's working keys are kept until the receipt
//! is verified, since the platform MACs every answer about this half (including
//! `GET /v1/transactions/{id}`) under the half's own KSN.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nfcpay_keystore::software::SoftwareKeystore;
use nfcpay_keystore::{Keystore, KeystoreConfig, KeystoreError};
use nfcpay_protocol::messages::{HalfKind, Receipt, ReceiptStatus};
use nfcpay_protocol::{AccountId, ProtocolError, TerminalId, TxnId};

use crate::delivery::{self, Attempts, Transience, Undelivered};
use crate::enroll::{self, EnrollError, TERMINAL_FILE, Terminal};
use crate::halves::{SealError, TransactionKeys};
use crate::keys::AgentKeyError;
use crate::nfc::libnfc::DepSpeed;
use crate::nfc::{Connstring, LibnfcInitiator, LibnfcTarget, NfcError, NfcLink, Role, Timeouts};
use crate::pending::{PendingDir, PendingError};
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
/// The keystore a terminal was enrolled with (`software` or its `pkcs11:` URI, which names a
/// PIN file, never a PIN), so that later commands need no `--keystore`.
pub const KEYSTORE_CHOICE_FILE: &str = "keystore";

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
        "the payment is still pending after {waited:?} (transaction ID {txn_id}): it settles \
         if the other terminal's half reaches the platform before the request expires; ask \
         again with `{}`", agent_command(dir, &["status", "--txn", &txn_id.to_string()])
    )]
    StillPending {
        /// The transaction.
        txn_id: TxnId,
        /// How long the agent waited.
        waited: Duration,
        /// The terminal directory (for the command that asks again).
        dir: PathBuf,
    },
    /// A kept half got no final answer; it stays kept, to be sent again as it is.
    #[error(transparent)]
    Undelivered(Box<UndeliveredHalf>),
    /// The pending directory or a kept half could not be used.
    #[error("pending halves")]
    Pending(#[from] PendingError),
    /// `pending --resend` left halves without a final answer, or found files it cannot send.
    #[error("{0}")]
    PendingLeft(String),
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
    /// A background task (the NFC thread), the async runtime or a file of the agent's own
    /// failed, or the platform answered what cannot be.
    #[error("internal: {what}")]
    Internal {
        /// What failed.
        what: String,
        /// Why, when something underneath said.
        #[source]
        source: Option<crate::platform::Cause>,
    },
}

impl AgentError {
    /// An [`AgentError::Internal`] of `what`, with no cause underneath.
    pub fn internal(what: impl Into<String>) -> Self {
        Self::Internal {
            what: what.into(),
            source: None,
        }
    }

    /// An [`AgentError::Internal`] of `what`, caused by `error`.
    pub fn internal_caused(
        what: impl Into<String>,
        error: impl Into<crate::platform::Cause>,
    ) -> Self {
        Self::Internal {
            what: what.into(),
            source: Some(error.into()),
        }
    }
}

/// A half kept in `DIR/pending/` that got no final answer.
#[derive(Debug, thiserror::Error)]
#[error(
    "half of transaction {txn_id} not delivered: it is kept in {}; send the same bytes again \
     with `{}`", path.display(), agent_command(dir, &["pending", "--resend"])
)]
pub struct UndeliveredHalf {
    /// The transaction.
    pub txn_id: TxnId,
    /// The kept half.
    pub path: PathBuf,
    /// The terminal directory.
    pub dir: PathBuf,
    /// The last attempt's failure.
    #[source]
    pub source: Undelivered,
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
        if let Self::Undelivered(half) = self {
            return match &half.source.error {
                PlatformError::Refused(problem) => Some(problem),
                _ => None,
            };
        }
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

impl KeystoreChoice {
    /// How it is written on the command line and in [`KEYSTORE_CHOICE_FILE`].
    pub fn as_text(&self) -> &str {
        match self {
            Self::Software => "software",
            Self::Pkcs11(uri) => uri,
        }
    }
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
    /// Where its keys are, when `--keystore` says; otherwise the one the terminal was
    /// enrolled with ([`KEYSTORE_CHOICE_FILE`]), or the software keystore.
    pub keystore: Option<KeystoreChoice>,
}

impl TerminalPlace {
    /// The keystore to use: `--keystore`, else the one remembered at enrollment, else software.
    pub fn keystore(&self) -> Result<KeystoreChoice, AgentError> {
        if let Some(given) = &self.keystore {
            return Ok(given.clone());
        }
        let path = self.dir.join(KEYSTORE_CHOICE_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => text
                .trim()
                .parse()
                .map_err(|error| AgentError::Usage(format!("{}: {error}", path.display()))),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                Ok(KeystoreChoice::Software)
            }
            Err(source) => Err(AgentError::File {
                path,
                action: "read the enrolled keystore choice",
                source,
            }),
        }
    }

    /// Remembers `choice` for the commands after enrollment.
    pub fn remember_keystore(&self, choice: &KeystoreChoice) -> Result<(), AgentError> {
        let path = self.dir.join(KEYSTORE_CHOICE_FILE);
        nfcpay_keystore::atomic_file::write_atomically(
            &path,
            format!("{}\n", choice.as_text()).as_bytes(),
            nfcpay_keystore::atomic_file::PUBLIC_FILE_MODE,
        )
        .map_err(|error| AgentError::internal_caused(path.display().to_string(), error))
    }

    /// Opens the keystore (creating the directory and a software keystore when missing).
    pub fn open_store(&self) -> Result<Arc<dyn Keystore>, AgentError> {
        match &self.keystore()? {
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

impl NfcSettings {
    /// Brings up the link in this terminal's role (waiting up to [`Self::wait`] for the other
    /// terminal) and runs `exchange` over it, on a blocking thread: libnfc calls block.
    pub async fn exchange<T: Send + 'static>(
        self,
        exchange: impl FnOnce(NfcLink<'_>, &Timeouts) -> Result<T, NfcError> + Send + 'static,
    ) -> Result<T, AgentError> {
        tokio::task::spawn_blocking(move || {
            let timeouts = Timeouts::DEFAULT;
            match self.role {
                Role::Initiator => {
                    let mut link =
                        LibnfcInitiator::connect(&self.connstring, DepSpeed::default(), self.wait)?;
                    exchange(NfcLink::Initiator(&mut link), &timeouts)
                }
                Role::Target => {
                    let mut link = LibnfcTarget::listen(&self.connstring, self.wait)?;
                    exchange(NfcLink::Target(&mut link), &timeouts)
                }
            }
        })
        .await
        .map_err(|error| AgentError::internal_caused("NFC thread", error))?
        .map_err(AgentError::Nfc)
    }
}

/// The account the terminal's enrollment named, for a payment `purpose` ("to pay from", "to be
/// paid into").
pub fn terminal_account(terminal: &Terminal, purpose: &str) -> Result<AccountId, AgentError> {
    terminal
        .file
        .account_id
        .as_deref()
        .ok_or_else(|| {
            AgentError::Usage(format!(
                "the terminal has no account {purpose}: enroll it with --account"
            ))
        })?
        .parse()
        .map_err(|error: ProtocolError| AgentError::Usage(format!("account: {error}")))
}

/// How long to wait for the platform.
#[derive(Debug, Clone, Copy)]
pub struct PlatformWait {
    /// `wait_ms` asked of the platform with the half (at most [`PLATFORM_WAIT_MAX`]).
    pub half: Duration,
    /// How long to keep asking while the payment is pending, after the half's answer.
    pub settle: Duration,
    /// How many times the half is sent at most after faults (the same bytes each time).
    pub attempts: Attempts,
}

/// Takes the next KSN, seals the half, keeps it in `DIR/pending/`, submits it (the same bytes
/// again after a fault) and waits for a verified, final receipt.
pub(super) async fn submit(
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
    // Kept durably before it is sent: from here on a fault, or this process killed, is
    // repaired by sending these very bytes again.
    let dir = terminal.dir.clone();
    let pending = PendingDir::of(&dir);
    let kept = pending.keep(txn_id, kind, &envelope)?;
    line(
        out,
        format_args!(
            "half {} sealed under KSN {ksn} (counter {}), {} bytes, kept in {}; submitting to {}",
            half_name(kind),
            ksn.counter().get(),
            envelope.len(),
            kept.display(),
            terminal.file.platform_address
        ),
    )?;
    let delivered = delivery::deliver(
        &terminal.platform,
        kind,
        &envelope,
        wait.half,
        wait.attempts,
        &mut delivery::log_retry,
    )
    .await;
    let reply = match delivered {
        Ok(reply) => reply,
        Err(undelivered) if undelivered.transience == Transience::Final => {
            // A definitive refusal: sending these bytes again would get it again.
            pending.forget(&kept)?;
            return Err(AgentError::Platform(undelivered.error));
        }
        Err(undelivered) => {
            return Err(AgentError::Undelivered(Box::new(UndeliveredHalf {
                txn_id,
                path: kept,
                dir: dir.clone(),
                source: undelivered,
            })));
        }
    };
    // A receipt that does not verify is no answer: the half stays kept.
    let mut receipt = keys.open_receipt(
        &reply.receipt,
        &terminal.terminal_id,
        &terminal.receipt_public_key,
    )?;
    pending.forget(&kept)?;
    let started = Instant::now();
    while receipt.status() == ReceiptStatus::Pending {
        if started.elapsed() >= wait.settle {
            print_receipt(&receipt, "pending", out)?;
            return Err(AgentError::StillPending {
                txn_id,
                waited: wait.half + wait.settle,
                dir: dir.clone(),
            });
        }
        tokio::time::sleep(STATUS_POLL_INTERVAL).await;
        match terminal.platform.transaction(txn_id).await {
            Ok(answer) => {
                receipt = keys.open_receipt(
                    &answer,
                    &terminal.terminal_id,
                    &terminal.receipt_public_key,
                )?;
            }
            // The half is recorded; a fault while asking is asked through again.
            Err(error) if delivery::transience(&error) == Transience::Retry => {
                tracing::warn!(%error, "status not answered; asking again");
            }
            Err(error) => return Err(error.into()),
        }
    }
    Ok(receipt)
}

/// The command line of `nfcpay-agent --dir DIR ARGS…`, quoted for a POSIX shell where needed.
pub fn agent_command(dir: &Path, args: &[&str]) -> String {
    let dir = dir.to_string_lossy();
    let mut words = vec![
        "nfcpay-agent".to_owned(),
        "--dir".to_owned(),
        shell_word(&dir),
    ];
    words.extend(args.iter().map(|arg| shell_word(arg)));
    words.join(" ")
}

fn shell_word(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || b"-_./:=@+,".contains(&byte));
    if plain {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

pub(super) fn finish(receipt: &Receipt, out: &mut dyn Write) -> Result<(), AgentError> {
    print_receipt(
        receipt,
        "verified: the platform's signature and this half's DUKPT MAC",
        out,
    )?;
    match receipt.status() {
        ReceiptStatus::Settled => Ok(()),
        ReceiptStatus::Expired => Err(AgentError::Expired("before both halves arrived")),
        ReceiptStatus::Pending => Err(AgentError::internal("pending receipt as final")),
    }
}

/// Prints a receipt the caller has verified (`how` says how).
pub(super) fn print_receipt(
    receipt: &Receipt,
    how: &str,
    out: &mut dyn Write,
) -> Result<(), AgentError> {
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
            format_args!("  settled at:    {}", utc_time(fields.settled_at_ms)),
        )?;
    }
    Ok(())
}

/// Milliseconds since the Unix epoch as RFC 3339 UTC (`2026-12-03T12:34:56.789Z`); a time
/// beyond what RFC 3339 can show is printed as its milliseconds.
pub(super) fn utc_time(milliseconds: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(milliseconds) * 1_000_000)
        .ok()
        .and_then(|time| {
            time.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{milliseconds} ms since the Unix epoch"))
}

/// Reads a whole file of at most `bytes_max` bytes.
pub(super) fn read_file(
    path: &Path,
    bytes_max: u64,
    action: &'static str,
) -> Result<Vec<u8>, AgentError> {
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

/// Milliseconds since the Unix epoch.
pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
        })
}

pub(super) fn line(out: &mut dyn Write, text: std::fmt::Arguments<'_>) -> Result<(), AgentError> {
    writeln!(out, "{text}").map_err(output_error)
}

pub(super) fn output_error(source: std::io::Error) -> AgentError {
    AgentError::File {
        path: PathBuf::from("(stdout)"),
        action: "write",
        source,
    }
}

pub(super) fn half_name(kind: HalfKind) -> &'static str {
    match kind {
        HalfKind::A => "A",
        HalfKind::B => "B",
    }
}

pub(super) fn status_name(status: ReceiptStatus) -> &'static str {
    match status {
        ReceiptStatus::Pending => "pending",
        ReceiptStatus::Settled => "settled",
        ReceiptStatus::Expired => "expired",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file of the agent's own it cannot write: the file named, the I/O error underneath
    /// kept as the source and printed once.
    #[test]
    fn an_unwritable_choice_file_keeps_its_cause() {
        let dir = tempfile::tempdir().unwrap();
        let place = TerminalPlace {
            dir: dir.path().join("absent"),
            keystore: None,
        };
        let error = place
            .remember_keystore(&KeystoreChoice::Software)
            .unwrap_err();
        let AgentError::Internal {
            what,
            source: Some(source),
        } = &error
        else {
            panic!("{error:?}");
        };
        assert!(what.ends_with(KEYSTORE_CHOICE_FILE), "{what}");
        let shown = nfcpay_protocol::ErrorChain(&error).to_string();
        assert!(shown.starts_with(&format!("internal: {what}: ")), "{shown}");
        assert_eq!(shown.matches(&source.to_string()).count(), 1, "{shown}");
    }

    #[test]
    fn the_keystore_chosen_at_enrollment_is_remembered_and_a_given_one_overrides_it() {
        let dir = tempfile::tempdir().unwrap();
        let place = |keystore: Option<&str>| TerminalPlace {
            dir: dir.path().to_path_buf(),
            keystore: keystore.map(|text| text.parse().unwrap()),
        };
        assert_eq!(place(None).keystore().unwrap().as_text(), "software");
        let uri = "pkcs11:token=t?module-path=/m.so&pin-source=file:/p";
        let enrolling = place(Some(uri));
        enrolling
            .remember_keystore(&enrolling.keystore().unwrap())
            .unwrap();
        assert_eq!(place(None).keystore().unwrap().as_text(), uri);
        assert_eq!(
            place(Some("software")).keystore().unwrap().as_text(),
            "software"
        );
        std::fs::write(dir.path().join(KEYSTORE_CHOICE_FILE), "tpm\n").unwrap();
        let error = place(None).keystore().expect_err("a bad file is refused");
        assert!(error.to_string().contains("pkcs11"), "{error}");
    }

    #[test]
    fn settlement_times_print_as_utc() {
        assert_eq!(utc_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_time(1_796_301_296_789), "2026-12-03T12:34:56.789Z");
        assert_eq!(
            utc_time(u64::MAX),
            "18446744073709551615 ms since the Unix epoch"
        );
    }

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
    fn the_pending_message_names_the_exact_command() {
        let txn_id: TxnId = "0123456789ABCDEF0123456789ABCDEF".parse().unwrap();
        let error = AgentError::StillPending {
            txn_id,
            waited: Duration::from_secs(70),
            dir: PathBuf::from("/var/lib/nfcpay terminal"),
        };
        assert!(
            error.to_string().contains(
                "`nfcpay-agent --dir '/var/lib/nfcpay terminal' status --txn \
                 0123456789ABCDEF0123456789ABCDEF`"
            ),
            "{error}"
        );
        assert_eq!(
            agent_command(Path::new("it's"), &["pending", "--resend"]),
            r"nfcpay-agent --dir 'it'\''s' pending --resend"
        );
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
}
