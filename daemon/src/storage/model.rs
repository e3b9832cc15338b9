//! What goes into the ledger and what comes out: accepted halves, new terminals, and views.

use std::fmt;
use std::str::FromStr;

use nfcpay_protocol::{AccountId, Amount, Currency, InitialKeyId, Ksn, TerminalId, TxnId};

use crate::pki::CertificateSerial;

/// Which half of a payment: the protocol's own type.
pub use nfcpay_protocol::messages::HalfKind;

/// `"A"` or `"B"`: a half's kind as the ledger stores it (`used_counters.half`).
pub(crate) fn stored_kind(kind: HalfKind) -> &'static str {
    match kind {
        HalfKind::A => "A",
        HalfKind::B => "B",
    }
}

/// The kind [`stored_kind`] stored, or `None` for anything else.
pub(crate) fn parse_stored_kind(stored: &str) -> Option<HalfKind> {
    match stored {
        "A" => Some(HalfKind::A),
        "B" => Some(HalfKind::B),
        _ => None,
    }
}

/// A half the service layer has decrypted, decoded and verified (protocol §6.1 steps 1–6);
/// the ledger enforces the rest (steps 7–9).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedHalf {
    /// The payment's idempotency key.
    pub txn_id: TxnId,
    /// The sending terminal (already checked against its client certificate).
    pub terminal_id: TerminalId,
    /// The serial of the client certificate it came with: the ledger records the half only if
    /// it is the terminal's enrolled certificate's, read in the same transaction.
    pub certificate_serial: CertificateSerial,
    /// The KSN the half was sealed under.
    pub ksn: Ksn,
    /// SHA-256 of the whole envelope as received: a byte-identical re-send has the same.
    pub envelope_sha256: [u8; 32],
    /// When the platform received it (ms).
    pub received_at_ms: i64,
    /// What the half says.
    pub content: HalfContent,
}

/// The decoded body of a half.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HalfContent {
    /// Half A: the payee's request.
    A {
        /// SHA-256 of the request bytes (half A's plaintext).
        request_digest: [u8; 32],
        /// The account to credit.
        payee_account: AccountId,
        /// What to pay.
        amount: Amount,
        /// After this (ms) the request may not settle.
        expires_at_ms: i64,
    },
    /// Half B: the payer's instruction.
    B {
        /// The SHA-256 of the request as the payer received it.
        request_digest: [u8; 32],
        /// The account to debit.
        payer_account: AccountId,
        /// The payee terminal the payer consented to pay.
        payee_terminal: TerminalId,
        /// The amount the payer consented to.
        amount: Amount,
    },
}

impl AcceptedHalf {
    /// Which half this is.
    pub fn kind(&self) -> HalfKind {
        match self.content {
            HalfContent::A { .. } => HalfKind::A,
            HalfContent::B { .. } => HalfKind::B,
        }
    }

    /// The account this half names for its own terminal (payee's for A, payer's for B).
    pub fn own_account(&self) -> &AccountId {
        match &self.content {
            HalfContent::A { payee_account, .. } => payee_account,
            HalfContent::B { payer_account, .. } => payer_account,
        }
    }

    /// The amount this half names.
    pub fn amount(&self) -> Amount {
        match &self.content {
            HalfContent::A { amount, .. } | HalfContent::B { amount, .. } => *amount,
        }
    }

    /// The request digest this half names.
    pub fn request_digest(&self) -> [u8; 32] {
        match &self.content {
            HalfContent::A { request_digest, .. } | HalfContent::B { request_digest, .. } => {
                *request_digest
            }
        }
    }
}

/// A terminal to register (`nfcpay-admin terminals add`).
#[derive(Clone, PartialEq, Eq)]
pub struct NewTerminal {
    /// Its identifier (the certificate's common name once enrolled).
    pub id: TerminalId,
    /// The account its halves may name.
    pub account_id: AccountId,
    /// The DUKPT initial key ID it will be given.
    pub initial_key_id: InitialKeyId,
    /// SHA-256 of the one-time enrollment code (the code itself is never stored).
    pub code_sha256: [u8; 32],
    /// When the code stops working (ms).
    pub code_expires_at_ms: i64,
}

impl fmt::Debug for NewTerminal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewTerminal")
            .field("id", &self.id)
            .field("account_id", &self.account_id)
            .field("initial_key_id", &self.initial_key_id)
            .field("code_expires_at_ms", &self.code_expires_at_ms)
            .finish_non_exhaustive()
    }
}

macro_rules! text_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant),*
        }

        impl $name {
            /// The stored spelling.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text),*
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = super::StorageError;
            fn from_str(text: &str) -> Result<Self, Self::Err> {
                match text {
                    $($text => Ok(Self::$variant),)*
                    _ => Err(super::StorageError::corrupt(format!(
                        concat!(stringify!($name), " {:?}"),
                        text
                    ))),
                }
            }
        }
    };
}

text_enum! {
    /// Where a terminal is in its life.
    TerminalState {
        /// Registered; waits for enrollment with its one-time code.
        Pending => "pending",
        /// Enrolled; may submit halves.
        Active => "active",
        /// Temporarily refused; may be reactivated.
        Suspended => "suspended",
        /// Refused for good.
        Revoked => "revoked",
    }
}

text_enum! {
    /// Where a payment is.
    TransactionStatus {
        /// One half is in; waiting for the other.
        Pending => "pending",
        /// Both halves matched and the transfer is booked.
        Settled => "settled",
        /// The request expired before the halves matched.
        Expired => "expired",
    }
}

/// An account's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountView {
    /// The account.
    pub id: AccountId,
    /// Its currency.
    pub currency: Currency,
    /// Its balance in minor units.
    pub balance_minor: i64,
    /// The lowest balance allowed; `None` for the ledger's funding accounts.
    pub limit_minor: Option<i64>,
    /// When it was created (ms).
    pub created_at_ms: i64,
}

/// One side of a transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostingView {
    /// The posting's sequence number.
    pub id: i64,
    /// The transfer (funding or settlement) it belongs to; a settlement's is its settlement ID.
    pub transfer_id: i64,
    /// The account.
    pub account_id: AccountId,
    /// Signed amount: negative debits, positive credits.
    pub amount_minor: i64,
    /// The account's balance after this posting.
    pub balance_after_minor: i64,
    /// When (ms).
    pub created_at_ms: i64,
}

/// A terminal's state (never its enrollment code).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TerminalView {
    /// The terminal.
    pub id: TerminalId,
    /// The account its halves may name.
    pub account_id: AccountId,
    /// Its DUKPT initial key ID.
    pub initial_key_id: InitialKeyId,
    /// Its state.
    pub state: TerminalState,
    /// When its enrollment code stops (or stopped) working (ms).
    pub code_expires_at_ms: i64,
    /// When it enrolled (ms).
    pub enrolled_at_ms: Option<i64>,
    /// Its client certificate's serial number.
    pub certificate_serial: Option<String>,
    /// The highest KSN counter accepted from it (0 before any).
    pub highest_counter: i64,
}

impl TerminalView {
    /// The serial of the client certificate issued at its enrollment; `None` before it
    /// enrolled (or if the stored text is no serial, which no certificate then matches).
    pub fn enrolled_certificate(&self) -> Option<CertificateSerial> {
        self.certificate_serial.as_deref()?.parse().ok()
    }

    /// Whether `presented` is the serial of its enrolled client certificate.
    pub fn has_certificate(&self, presented: CertificateSerial) -> bool {
        self.enrolled_certificate() == Some(presented)
    }
}

/// A payment as the ledger knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransactionView {
    /// Its ID.
    pub txn_id: TxnId,
    /// Pending, settled or expired.
    pub status: TransactionStatus,
    /// The payee terminal (from half A, or half B's claim while A is missing).
    pub payee_terminal: TerminalId,
    /// The payee's account, once half A is in.
    pub payee_account: Option<AccountId>,
    /// The payer terminal, once half B is in.
    pub payer_terminal: Option<TerminalId>,
    /// The payer's account, once half B is in.
    pub payer_account: Option<AccountId>,
    /// The amount (half A's, or half B's while A is missing).
    pub amount: Amount,
    /// The request digest (half A's, or half B's while A is missing).
    pub request_digest: [u8; 32],
    /// Half A's KSN.
    pub half_a_ksn: Option<Ksn>,
    /// Half B's KSN.
    pub half_b_ksn: Option<Ksn>,
    /// The ledger's sequence number of the settlement.
    pub settlement_id: Option<u64>,
    /// When it settled (ms).
    pub settled_at_ms: Option<i64>,
    /// After this (ms) it can no longer settle.
    pub expires_at_ms: i64,
}

/// What [`super::Storage::submit_half`] did with a half.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submitted {
    /// The payment after the commit.
    pub view: TransactionView,
    /// Whether this half settled the payment (rather than finding it settled already, or
    /// leaving it pending).
    pub settled_now: bool,
}

/// The last record of one audit chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainHead {
    /// The chain.
    pub chain_id: i64,
    /// Its last record's sequence number (0 for an empty chain).
    pub seq: i64,
    /// Its last record's hash (the chain's genesis hash for an empty chain).
    pub hash: [u8; 32],
}

/// What [`super::Storage::audit_verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditReport {
    /// How many records were checked, in all chains.
    pub records: u64,
    /// The head of every chain that verified, by chain.
    pub chains: Vec<ChainHead>,
    /// How many signed checkpoints verified.
    pub checkpoints: u64,
    /// The first broken link, if any.
    pub first_break: Option<AuditBreak>,
}

impl AuditReport {
    /// Whether every chain verified.
    pub fn is_intact(&self) -> bool {
        self.first_break.is_none()
    }
}

/// Where and how an audit chain breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditBreak {
    /// The chain (0: a record outside every chain, or a checkpoint's signature).
    pub chain_id: i64,
    /// The sequence number of the first record that does not verify (with chain 0: the
    /// checkpoint's ID).
    pub seq: i64,
    /// What is wrong with it.
    pub reason: &'static str,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_kind_reads_back_and_nothing_else_does() {
        for kind in [HalfKind::A, HalfKind::B] {
            assert_eq!(parse_stored_kind(stored_kind(kind)), Some(kind));
        }
        for stored in ["a", "b", "", "AB", "C", " A"] {
            assert_eq!(parse_stored_kind(stored), None, "{stored:?}");
        }
    }
}
