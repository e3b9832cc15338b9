//! The heart: accepting a half, matching the pair and settling it exactly once
//! (protocol §6.1 steps 7–9).
//!
//! A group commit's halves are decided together: `batch::read` loads every row they touch,
//! [`Batch::decide`] judges each half in arrival order against that state in plain Rust — the
//! same code for SQLite and PostgreSQL — and `batch::write` writes what changed with a constant
//! number of multi-row statements. A refused half never touches the batch's state, so it
//! changes no row — not even the KSN counter.

use std::collections::HashMap;

use diesel::prelude::*;
use nfcpay_protocol::{Amount, Currency, Ksn, TxnId};

use super::StorageError;
use super::audit::AuditLog;
use super::batch;
use super::connection::AnyConnection;
use super::ledger;
use super::model::{
    AcceptedHalf, AccountView, HalfContent, HalfKind, Submitted, TerminalState, TerminalView,
    TransactionStatus, TransactionView,
};
use super::queries::{HalfRecord, TransactionSummary};
use super::schema::transactions;
use super::sql::Value;

/// A KSN counter is accepted only above the terminal's highest accepted counter minus this.
pub const REPLAY_WINDOW: i64 = 1024;
/// How long a half B waits for its half A (B does not carry the request's expiry; a request
/// lives at most this long).
pub const UNMATCHED_HALF_B_LIFETIME_MS: i64 = 600_000;
/// [`super::Storage::expire_unmatched`] marks at most this many per call.
pub const EXPIRE_BATCH_MAX: i64 = 1000;

/// A `transactions` row.
#[derive(Debug, Clone, Queryable, Selectable, Insertable, AsChangeset)]
#[diesel(table_name = transactions, primary_key(txn_id), treat_none_as_null = true)]
pub(crate) struct TransactionRow {
    txn_id: Vec<u8>,
    status: String,
    expires_at_ms: i64,
    created_at_ms: i64,
    a_terminal_id: Option<String>,
    a_account_id: Option<String>,
    a_ksn: Option<Vec<u8>>,
    a_envelope_sha256: Option<Vec<u8>>,
    a_request_digest: Option<Vec<u8>>,
    a_amount_minor: Option<i64>,
    a_currency: Option<String>,
    a_received_at_ms: Option<i64>,
    b_terminal_id: Option<String>,
    b_account_id: Option<String>,
    b_ksn: Option<Vec<u8>>,
    b_envelope_sha256: Option<Vec<u8>>,
    b_request_digest: Option<Vec<u8>>,
    b_payee_terminal_id: Option<String>,
    b_amount_minor: Option<i64>,
    b_currency: Option<String>,
    b_received_at_ms: Option<i64>,
    settlement_id: Option<i64>,
    settled_at_ms: Option<i64>,
    expired_at_ms: Option<i64>,
}

/// What half A says, from a row or from an incoming half.
#[derive(Debug, Clone)]
pub(crate) struct SideA {
    pub(crate) terminal: String,
    pub(crate) account: String,
    pub(crate) digest: Vec<u8>,
    pub(crate) amount_minor: i64,
    pub(crate) currency: String,
    pub(crate) expires_at_ms: i64,
}

/// What half B says, from a row or from an incoming half.
#[derive(Debug, Clone)]
pub(crate) struct SideB {
    pub(crate) terminal: String,
    pub(crate) account: String,
    pub(crate) digest: Vec<u8>,
    pub(crate) payee_terminal: String,
    pub(crate) amount_minor: i64,
    pub(crate) currency: String,
}

impl TransactionRow {
    /// Every column, in the order of [`TransactionRow::values`].
    pub(crate) const COLUMNS: [&'static str; 24] = [
        "txn_id",
        "status",
        "expires_at_ms",
        "created_at_ms",
        "a_terminal_id",
        "a_account_id",
        "a_ksn",
        "a_envelope_sha256",
        "a_request_digest",
        "a_amount_minor",
        "a_currency",
        "a_received_at_ms",
        "b_terminal_id",
        "b_account_id",
        "b_ksn",
        "b_envelope_sha256",
        "b_request_digest",
        "b_payee_terminal_id",
        "b_amount_minor",
        "b_currency",
        "b_received_at_ms",
        "settlement_id",
        "settled_at_ms",
        "expired_at_ms",
    ];

    /// The row's values, in the order of [`TransactionRow::COLUMNS`].
    pub(crate) fn values(&self) -> [Value; 24] {
        [
            Value::from(self.txn_id.clone()),
            Value::from(self.status.clone()),
            Value::from(self.expires_at_ms),
            Value::from(self.created_at_ms),
            Value::from(self.a_terminal_id.clone()),
            Value::from(self.a_account_id.clone()),
            Value::from(self.a_ksn.clone()),
            Value::from(self.a_envelope_sha256.clone()),
            Value::from(self.a_request_digest.clone()),
            Value::from(self.a_amount_minor),
            Value::from(self.a_currency.clone()),
            Value::from(self.a_received_at_ms),
            Value::from(self.b_terminal_id.clone()),
            Value::from(self.b_account_id.clone()),
            Value::from(self.b_ksn.clone()),
            Value::from(self.b_envelope_sha256.clone()),
            Value::from(self.b_request_digest.clone()),
            Value::from(self.b_payee_terminal_id.clone()),
            Value::from(self.b_amount_minor),
            Value::from(self.b_currency.clone()),
            Value::from(self.b_received_at_ms),
            Value::from(self.settlement_id),
            Value::from(self.settled_at_ms),
            Value::from(self.expired_at_ms),
        ]
    }

    /// The row's key, if it is one (16 bytes).
    pub(crate) fn key(&self) -> Option<TxnKey> {
        self.txn_id.as_slice().try_into().ok()
    }

    fn has(&self, kind: HalfKind) -> bool {
        match kind {
            HalfKind::A => self.a_terminal_id.is_some(),
            HalfKind::B => self.b_terminal_id.is_some(),
        }
    }

    fn envelope(&self, kind: HalfKind) -> Option<&[u8]> {
        match kind {
            HalfKind::A => self.a_envelope_sha256.as_deref(),
            HalfKind::B => self.b_envelope_sha256.as_deref(),
        }
    }

    pub(crate) fn side_a(&self) -> Option<SideA> {
        Some(SideA {
            terminal: self.a_terminal_id.clone()?,
            account: self.a_account_id.clone()?,
            digest: self.a_request_digest.clone()?,
            amount_minor: self.a_amount_minor?,
            currency: self.a_currency.clone()?,
            expires_at_ms: self.expires_at_ms,
        })
    }

    pub(crate) fn side_b(&self) -> Option<SideB> {
        Some(SideB {
            terminal: self.b_terminal_id.clone()?,
            account: self.b_account_id.clone()?,
            digest: self.b_request_digest.clone()?,
            payee_terminal: self.b_payee_terminal_id.clone()?,
            amount_minor: self.b_amount_minor?,
            currency: self.b_currency.clone()?,
        })
    }

    /// A new pending row holding only `half`.
    fn new_pending(half: &AcceptedHalf, amount_minor: i64) -> Self {
        let mut row = Self {
            txn_id: half.txn_id.to_bytes().to_vec(),
            status: TransactionStatus::Pending.as_str().to_owned(),
            expires_at_ms: 0,
            created_at_ms: half.received_at_ms,
            a_terminal_id: None,
            a_account_id: None,
            a_ksn: None,
            a_envelope_sha256: None,
            a_request_digest: None,
            a_amount_minor: None,
            a_currency: None,
            a_received_at_ms: None,
            b_terminal_id: None,
            b_account_id: None,
            b_ksn: None,
            b_envelope_sha256: None,
            b_request_digest: None,
            b_payee_terminal_id: None,
            b_amount_minor: None,
            b_currency: None,
            b_received_at_ms: None,
            settlement_id: None,
            settled_at_ms: None,
            expired_at_ms: None,
        };
        row.expires_at_ms = match &half.content {
            HalfContent::A { expires_at_ms, .. } => *expires_at_ms,
            HalfContent::B { .. } => half.received_at_ms + UNMATCHED_HALF_B_LIFETIME_MS,
        };
        row.put(half, amount_minor);
        row
    }

    /// Writes `half` into its columns.
    fn put(&mut self, half: &AcceptedHalf, amount_minor: i64) {
        let currency = Some(half.amount().currency().code().to_owned());
        match &half.content {
            HalfContent::A {
                request_digest,
                payee_account,
                expires_at_ms,
                ..
            } => {
                self.a_terminal_id = Some(half.terminal_id.as_str().to_owned());
                self.a_account_id = Some(payee_account.as_str().to_owned());
                self.a_ksn = Some(half.ksn.to_bytes().to_vec());
                self.a_envelope_sha256 = Some(half.envelope_sha256.to_vec());
                self.a_request_digest = Some(request_digest.to_vec());
                self.a_amount_minor = Some(amount_minor);
                self.a_currency = currency;
                self.a_received_at_ms = Some(half.received_at_ms);
                self.expires_at_ms = *expires_at_ms;
            }
            HalfContent::B {
                request_digest,
                payer_account,
                payee_terminal,
                ..
            } => {
                self.b_terminal_id = Some(half.terminal_id.as_str().to_owned());
                self.b_account_id = Some(payer_account.as_str().to_owned());
                self.b_ksn = Some(half.ksn.to_bytes().to_vec());
                self.b_envelope_sha256 = Some(half.envelope_sha256.to_vec());
                self.b_request_digest = Some(request_digest.to_vec());
                self.b_payee_terminal_id = Some(payee_terminal.as_str().to_owned());
                self.b_amount_minor = Some(amount_minor);
                self.b_currency = currency;
                self.b_received_at_ms = Some(half.received_at_ms);
            }
        }
    }

    /// The row as callers see it.
    fn view(&self) -> Result<TransactionView, StorageError> {
        let corrupt = |what: &str| StorageError::corrupt(format!("transaction {what}"));
        let txn_id = TxnId::try_from(self.txn_id.as_slice()).map_err(|_| corrupt("id"))?;
        let payee_terminal = self
            .a_terminal_id
            .as_ref()
            .or(self.b_payee_terminal_id.as_ref())
            .ok_or_else(|| corrupt("without payee"))?;
        let (amount_minor, currency, digest) = match (self.side_a(), self.side_b()) {
            (Some(a), _) => (a.amount_minor, a.currency, a.digest),
            (None, Some(b)) => (b.amount_minor, b.currency, b.digest),
            (None, None) => return Err(corrupt("without halves")),
        };
        let currency: Currency = currency.parse().map_err(|_| corrupt("currency"))?;
        let amount = u64::try_from(amount_minor)
            .ok()
            .and_then(|minor| Amount::new(minor, currency).ok())
            .ok_or_else(|| corrupt("amount"))?;
        let ksn = |bytes: &Option<Vec<u8>>| {
            bytes
                .as_deref()
                .map(|bytes| Ksn::try_from(bytes).map_err(|_| corrupt("KSN")))
                .transpose()
        };
        let terminal = |id: &Option<String>| {
            id.as_deref()
                .map(|id| id.parse().map_err(|_| corrupt("terminal")))
                .transpose()
        };
        let account = |id: &Option<String>| {
            id.as_deref()
                .map(|id| id.parse().map_err(|_| corrupt("account")))
                .transpose()
        };
        Ok(TransactionView {
            txn_id,
            status: self.status.parse()?,
            payee_terminal: payee_terminal
                .parse()
                .map_err(|_| corrupt("payee terminal"))?,
            payee_account: account(&self.a_account_id)?,
            payer_terminal: terminal(&self.b_terminal_id)?,
            payer_account: account(&self.b_account_id)?,
            amount,
            request_digest: digest.try_into().map_err(|_| corrupt("request digest"))?,
            half_a_ksn: ksn(&self.a_ksn)?,
            half_b_ksn: ksn(&self.b_ksn)?,
            settlement_id: self
                .settlement_id
                .map(|id| u64::try_from(id).map_err(|_| corrupt("settlement id")))
                .transpose()?,
            settled_at_ms: self.settled_at_ms,
            expires_at_ms: self.expires_at_ms,
        })
    }

    /// The row as the operator sees it (`nfcpay-admin transactions …`).
    pub(crate) fn summary(self) -> Result<TransactionSummary, StorageError> {
        let txn_id = <[u8; 16]>::try_from(self.txn_id.as_slice())
            .ok()
            .and_then(|bytes| TxnId::try_from(bytes).ok())
            .ok_or_else(|| StorageError::corrupt("transaction ID"))?;
        // One half's columns, in the order of the row's (half B's payee terminal last).
        type HalfColumns = (
            Option<String>,
            Option<String>,
            Option<Vec<u8>>,
            Option<Vec<u8>>,
            Option<Vec<u8>>,
            Option<i64>,
            Option<String>,
            Option<i64>,
            Option<String>,
        );
        let half = |(
            terminal,
            account,
            ksn,
            envelope,
            digest,
            amount,
            currency,
            received,
            payee,
        ): HalfColumns| {
            Some(HalfRecord {
                terminal_id: terminal?,
                account_id: account?,
                ksn: hex::encode_upper(ksn?),
                envelope_sha256: hex::encode_upper(envelope?),
                request_digest: hex::encode_upper(digest?),
                amount_minor: amount?,
                currency: currency?,
                received_at_ms: received?,
                payee_terminal_id: payee,
            })
        };
        Ok(TransactionSummary {
            txn_id,
            status: self.status.parse()?,
            created_at_ms: self.created_at_ms,
            expires_at_ms: self.expires_at_ms,
            half_a: half((
                self.a_terminal_id,
                self.a_account_id,
                self.a_ksn,
                self.a_envelope_sha256,
                self.a_request_digest,
                self.a_amount_minor,
                self.a_currency,
                self.a_received_at_ms,
                None,
            )),
            half_b: half((
                self.b_terminal_id,
                self.b_account_id,
                self.b_ksn,
                self.b_envelope_sha256,
                self.b_request_digest,
                self.b_amount_minor,
                self.b_currency,
                self.b_received_at_ms,
                self.b_payee_terminal_id,
            )),
            settlement_id: self.settlement_id,
            settled_at_ms: self.settled_at_ms,
            expired_at_ms: self.expired_at_ms,
        })
    }
}

fn side_a_of(half: &AcceptedHalf, amount_minor: i64) -> Option<SideA> {
    match &half.content {
        HalfContent::A {
            request_digest,
            payee_account,
            amount,
            expires_at_ms,
        } => Some(SideA {
            terminal: half.terminal_id.as_str().to_owned(),
            account: payee_account.as_str().to_owned(),
            digest: request_digest.to_vec(),
            amount_minor,
            currency: amount.currency().code().to_owned(),
            expires_at_ms: *expires_at_ms,
        }),
        HalfContent::B { .. } => None,
    }
}

fn side_b_of(half: &AcceptedHalf, amount_minor: i64) -> Option<SideB> {
    match &half.content {
        HalfContent::B {
            request_digest,
            payer_account,
            payee_terminal,
            amount,
        } => Some(SideB {
            terminal: half.terminal_id.as_str().to_owned(),
            account: payer_account.as_str().to_owned(),
            digest: request_digest.to_vec(),
            payee_terminal: payee_terminal.as_str().to_owned(),
            amount_minor,
            currency: amount.currency().code().to_owned(),
        }),
        HalfContent::A { .. } => None,
    }
}

/// Reads a transaction.
pub(crate) fn load(
    connection: &mut AnyConnection,
    txn_id: &TxnId,
) -> Result<Option<TransactionRow>, StorageError> {
    Ok(transactions::table
        .find(txn_id.to_bytes().to_vec())
        .select(TransactionRow::as_select())
        .first(connection)
        .optional()?)
}

/// Reads a transaction as callers see it.
pub(crate) fn view(
    connection: &mut AnyConnection,
    txn_id: &TxnId,
) -> Result<Option<TransactionView>, StorageError> {
    load(connection, txn_id)?.map(|row| row.view()).transpose()
}

/// A row changed between our read and our write: only another daemon can do that; the batch
/// runs again (see `writer`).
pub(crate) fn lost_race() -> StorageError {
    StorageError::Database(diesel::result::Error::DatabaseError(
        diesel::result::DatabaseErrorKind::SerializationFailure,
        Box::new(String::from("a transaction row changed concurrently")),
    ))
}

/// The first 16 bytes of a transaction's row key.
pub(crate) type TxnKey = [u8; 16];

/// A half the writer has queued, with the time it is judged at.
#[derive(Debug, Clone)]
pub(crate) struct QueuedHalf {
    pub(crate) half: AcceptedHalf,
    pub(crate) now_ms: i64,
}

/// A terminal as a batch sees it: its stored row, and its window as the batch moves it.
#[derive(Debug, Clone)]
pub(crate) struct BatchTerminal {
    pub(crate) view: TerminalView,
    /// The highest counter accepted so far, this batch included.
    pub(crate) highest_counter: i64,
}

/// A used KSN counter: which half it carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UsedCounter {
    pub(crate) terminal_id: String,
    pub(crate) counter: i64,
    pub(crate) txn_id: TxnKey,
    pub(crate) kind: HalfKind,
    pub(crate) envelope_sha256: [u8; 32],
    pub(crate) used_at_ms: i64,
}

/// An account as a batch sees it.
#[derive(Debug, Clone)]
pub(crate) struct BatchAccount {
    pub(crate) view: AccountView,
    /// Whether the batch changed its balance.
    pub(crate) changed: bool,
}

/// A transaction row as a batch sees it.
#[derive(Debug, Clone)]
pub(crate) struct BatchTransaction {
    pub(crate) row: TransactionRow,
    /// Whether the row is in the database (else the batch inserts it).
    pub(crate) stored: bool,
    /// Whether the batch changed it.
    pub(crate) changed: bool,
}

/// A settlement the batch books: one transfer, two postings, one audit record.
#[derive(Debug, Clone)]
pub(crate) struct Booking {
    pub(crate) txn_id: TxnKey,
    pub(crate) payer: SideB,
    pub(crate) payee: SideA,
    pub(crate) payer_balance_after: i64,
    pub(crate) payee_balance_after: i64,
    pub(crate) at_ms: i64,
    /// The transfer's ID, once inserted.
    pub(crate) settlement_id: Option<i64>,
}

/// What a batch decided for one half that was not refused. A half is answered with the
/// payment as it stood when the half was decided — as if the batch's halves had been committed
/// one by one: of two halves of one payment in one batch, the first finds it pending and only
/// the second settles it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// A byte-identical re-send: the payment as it stands (its view if it was pending then;
    /// a settled or expired payment does not change again within the batch).
    Again(TxnKey, Option<TransactionView>),
    /// The first half of its payment: stored, pending.
    Pending(TransactionView),
    /// The second half: the payment settled (its settlement ID is known once written).
    Settled(TxnKey),
}

/// The view of `row` if it is pending (what a re-send of one of its halves is answered).
fn pending_view(row: &TransactionRow) -> Result<Option<TransactionView>, StorageError> {
    if row.status == TransactionStatus::Pending.as_str() {
        row.view().map(Some)
    } else {
        Ok(None)
    }
}

/// Every row a batch of halves touches, read once (see `batch::read`), decided in memory half
/// by half in arrival order, and written once (see `batch::write`). A refused half changes
/// nothing here, so it changes nothing in the database.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    pub(crate) terminals: HashMap<String, BatchTerminal>,
    pub(crate) used: HashMap<(String, i64), UsedCounter>,
    pub(crate) accounts: HashMap<String, BatchAccount>,
    pub(crate) transactions: HashMap<TxnKey, BatchTransaction>,
    /// Counters this batch uses, in order.
    pub(crate) new_used: Vec<UsedCounter>,
    /// Settlements this batch books, in order.
    pub(crate) bookings: Vec<Booking>,
}

impl Batch {
    /// Steps 7–9 of protocol §6.1 for one half, against the batch's state.
    pub(crate) fn decide(&mut self, queued: &QueuedHalf) -> Result<Verdict, StorageError> {
        let QueuedHalf { half, now_ms } = queued;
        let now_ms = *now_ms;
        let kind = half.kind();
        let amount_minor = ledger::minor_units(half.amount())?;
        let key = half.txn_id.to_bytes();

        // Step 7: the terminal and its replay state.
        let terminal = self
            .terminals
            .get(half.terminal_id.as_str())
            .ok_or_else(|| StorageError::UnknownTerminal(half.terminal_id.clone()))?;
        if terminal.view.state != TerminalState::Active {
            return Err(StorageError::TerminalNotActive(terminal.view.state));
        }
        if !terminal.view.has_certificate(half.certificate_serial) {
            return Err(StorageError::CertificateNotEnrolled);
        }
        if half.ksn.initial_key_id() != terminal.view.initial_key_id {
            return Err(StorageError::KsnNotTerminal);
        }
        let counter = i64::from(half.ksn.counter().get());
        let existing = self.transactions.get(&key);
        if let Some(used) = self
            .used
            .get(&(half.terminal_id.as_str().to_owned(), counter))
        {
            let same = used.txn_id == key
                && used.kind == kind
                && used.envelope_sha256 == half.envelope_sha256;
            return match (same, existing) {
                (true, Some(existing)) => Ok(Verdict::Again(key, pending_view(&existing.row)?)),
                _ => Err(StorageError::ReplayedKsn),
            };
        }
        if counter <= terminal.highest_counter - REPLAY_WINDOW {
            return Err(StorageError::StaleKsn);
        }
        if half.own_account().as_str() != terminal.view.account_id.as_str() {
            // The batch holds every half's own account that exists.
            return Err(if self.accounts.contains_key(half.own_account().as_str()) {
                StorageError::AccountMismatch
            } else {
                StorageError::UnknownAccount(half.own_account().clone())
            });
        }

        // Step 8: the transaction row.
        let Some(existing) = existing else {
            return self.accept_first_half(half, amount_minor, counter, now_ms);
        };
        if existing.row.has(kind) {
            return if existing.row.envelope(kind) == Some(half.envelope_sha256.as_slice()) {
                Ok(Verdict::Again(key, pending_view(&existing.row)?))
            } else {
                Err(StorageError::Conflict)
            };
        }
        if existing.row.status != TransactionStatus::Pending.as_str() {
            return Err(StorageError::Expired);
        }
        let (a, b) = match kind {
            HalfKind::A => (side_a_of(half, amount_minor), existing.row.side_b()),
            HalfKind::B => (existing.row.side_a(), side_b_of(half, amount_minor)),
        };
        let (Some(a), Some(b)) = (a, b) else {
            return Err(StorageError::corrupt(
                "pending transaction without its half",
            ));
        };
        self.check_pair(&a, &b)?;
        if now_ms > a.expires_at_ms {
            return Err(StorageError::Expired);
        }

        // Step 9: settle.
        let payer = self.account(&b.account)?;
        let payee = self.account(&a.account)?;
        let payer_balance_after = payer
            .view
            .balance_minor
            .checked_sub(a.amount_minor)
            .ok_or(StorageError::Overflow)?;
        let payee_balance_after = payee
            .view
            .balance_minor
            .checked_add(a.amount_minor)
            .ok_or(StorageError::Overflow)?;
        if payer
            .view
            .limit_minor
            .is_some_and(|limit| payer_balance_after < limit)
        {
            return Err(StorageError::InsufficientFunds);
        }

        // Accepted: only now does the batch's state change.
        for (account, balance_after) in [
            (&b.account, payer_balance_after),
            (&a.account, payee_balance_after),
        ] {
            if let Some(entry) = self.accounts.get_mut(account) {
                entry.view.balance_minor = balance_after;
                entry.changed = true;
            }
        }
        if let Some(entry) = self.transactions.get_mut(&key) {
            entry.row.put(half, amount_minor);
            entry.row.status = TransactionStatus::Settled.as_str().to_owned();
            entry.row.settled_at_ms = Some(now_ms);
            entry.changed = true;
        }
        self.bookings.push(Booking {
            txn_id: key,
            payer: b,
            payee: a,
            payer_balance_after,
            payee_balance_after,
            at_ms: now_ms,
            settlement_id: None,
        });
        self.use_counter(half, counter, now_ms);
        Ok(Verdict::Settled(key))
    }

    /// No row yet: store this half, pending.
    fn accept_first_half(
        &mut self,
        half: &AcceptedHalf,
        amount_minor: i64,
        counter: i64,
        now_ms: i64,
    ) -> Result<Verdict, StorageError> {
        let own = self.account(half.own_account().as_str())?;
        if own.view.currency != half.amount().currency() {
            return Err(StorageError::Mismatch {
                field: match half.kind() {
                    HalfKind::A => "payee_account_currency",
                    HalfKind::B => "payer_account_currency",
                },
            });
        }
        let row = TransactionRow::new_pending(half, amount_minor);
        if now_ms > row.expires_at_ms {
            return Err(StorageError::Expired);
        }
        let view = row.view()?;
        self.transactions.insert(
            half.txn_id.to_bytes(),
            BatchTransaction {
                row,
                stored: false,
                changed: true,
            },
        );
        self.use_counter(half, counter, now_ms);
        Ok(Verdict::Pending(view))
    }

    /// The halves must describe the same payment (the transaction ID is the row's key).
    fn check_pair(&self, a: &SideA, b: &SideB) -> Result<(), StorageError> {
        if a.digest != b.digest {
            return Err(StorageError::DigestMismatch);
        }
        let mismatch = |field| Err(StorageError::Mismatch { field });
        if b.payee_terminal != a.terminal {
            return mismatch("payee_terminal");
        }
        if b.amount_minor != a.amount_minor {
            return mismatch("amount");
        }
        if b.currency != a.currency {
            return mismatch("currency");
        }
        if a.terminal == b.terminal {
            return mismatch("parties");
        }
        for (account, field) in [
            (&a.account, "payee_account_currency"),
            (&b.account, "payer_account_currency"),
        ] {
            if self.account(account)?.view.currency.code() != a.currency {
                return mismatch(field);
            }
        }
        Ok(())
    }

    fn account(&self, id: &str) -> Result<&BatchAccount, StorageError> {
        self.accounts.get(id).ok_or_else(|| match id.parse() {
            Ok(id) => StorageError::UnknownAccount(id),
            Err(_) => StorageError::corrupt(format!("account id {id:?}")),
        })
    }

    /// Marks the half's counter used and moves the terminal's window.
    fn use_counter(&mut self, half: &AcceptedHalf, counter: i64, now_ms: i64) {
        let used = UsedCounter {
            terminal_id: half.terminal_id.as_str().to_owned(),
            counter,
            txn_id: half.txn_id.to_bytes(),
            kind: half.kind(),
            envelope_sha256: half.envelope_sha256,
            used_at_ms: now_ms,
        };
        self.used
            .insert((used.terminal_id.clone(), counter), used.clone());
        self.new_used.push(used);
        if let Some(terminal) = self.terminals.get_mut(half.terminal_id.as_str()) {
            terminal.highest_counter = terminal.highest_counter.max(counter);
        }
    }

    /// The answer to a half the batch did not refuse, once its rows are written.
    pub(crate) fn submitted(&self, verdict: Verdict) -> Result<Submitted, StorageError> {
        let (key, settled_now) = match verdict {
            Verdict::Pending(view) | Verdict::Again(_, Some(view)) => {
                return Ok(Submitted {
                    view,
                    settled_now: false,
                });
            }
            Verdict::Again(key, None) => (key, false),
            Verdict::Settled(key) => (key, true),
        };
        let row = self
            .transactions
            .get(&key)
            .ok_or_else(|| StorageError::corrupt("a decided transaction left the batch"))?;
        Ok(Submitted {
            view: row.row.view()?,
            settled_now,
        })
    }

    /// Gives every booked settlement its transfer ID (from `ids`, by transaction) and its row
    /// the settlement ID, and asks for each one's audit record.
    pub(crate) fn assign_settlements(
        &mut self,
        ids: &HashMap<TxnKey, i64>,
        audit: &mut AuditLog,
    ) -> Result<(), StorageError> {
        for booking in &mut self.bookings {
            let id = *ids
                .get(&booking.txn_id)
                .ok_or_else(|| StorageError::corrupt("a settlement without its transfer"))?;
            booking.settlement_id = Some(id);
            if let Some(entry) = self.transactions.get_mut(&booking.txn_id) {
                entry.row.settlement_id = Some(id);
            }
            audit.record(
                booking.at_ms,
                "transaction.settled",
                &hex::encode_upper(booking.txn_id),
                &serde_json::json!({
                    "settlement_id": id,
                    "payer_terminal": booking.payer.terminal,
                    "payer_account": booking.payer.account,
                    "payee_terminal": booking.payee.terminal,
                    "payee_account": booking.payee.account,
                    "amount_minor": booking.payee.amount_minor,
                    "currency": booking.payee.currency,
                }),
            );
        }
        Ok(())
    }
}

/// Marks pending transactions whose time has passed as expired (at most [`EXPIRE_BATCH_MAX`]).
pub(crate) fn expire_unmatched(
    connection: &mut AnyConnection,
    audit: &mut AuditLog,
    now_ms: i64,
) -> Result<u64, StorageError> {
    let pending = TransactionStatus::Pending.as_str();
    let due: Vec<(Vec<u8>, i64)> = transactions::table
        .filter(transactions::status.eq(pending))
        .filter(transactions::expires_at_ms.lt(now_ms))
        .order(transactions::expires_at_ms.asc())
        .limit(EXPIRE_BATCH_MAX)
        .select((transactions::txn_id, transactions::expires_at_ms))
        .load(connection)?;
    // The same per-payment locks as a batch of halves (PostgreSQL), taken in the same order.
    let keys: Vec<TxnKey> = due
        .iter()
        .filter_map(|(txn_id, _)| txn_id.as_slice().try_into().ok())
        .collect();
    batch::lock_transactions(connection, &keys)?;
    let mut expired = 0_u64;
    for (txn_id, expires_at_ms) in due {
        let changed = diesel::update(
            transactions::table
                .find(txn_id.clone())
                .filter(transactions::status.eq(pending)),
        )
        .set((
            transactions::status.eq(TransactionStatus::Expired.as_str()),
            transactions::expired_at_ms.eq(Some(now_ms)),
        ))
        .execute(connection)?;
        if changed == 1 {
            audit.record(
                now_ms,
                "transaction.expired",
                &hex::encode_upper(&txn_id),
                &serde_json::json!({ "expires_at_ms": expires_at_ms }),
            );
            expired += 1;
        }
    }
    Ok(expired)
}
