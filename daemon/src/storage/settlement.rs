//! The heart: accepting a half, matching the pair and settling it exactly once
//! (protocol §6.1 steps 7–9).
//!
//! Everything here runs inside one savepoint of the writer's group commit: a refused half
//! returns an error, the savepoint rolls back, and no row changes — not even the KSN counter.

use diesel::prelude::*;
use nfcpay_protocol::{Amount, Currency, Ksn, TerminalId, TxnId};

use super::StorageError;
use super::audit;
use super::connection::AnyConnection;
use super::ledger::{self, TransferKind};
use super::model::{
    AcceptedHalf, HalfContent, HalfKind, TerminalState, TransactionStatus, TransactionView,
};
use super::schema::{terminals, transactions, used_counters};
use super::terminals as terminal_rows;

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
struct SideA {
    terminal: String,
    account: String,
    digest: Vec<u8>,
    amount_minor: i64,
    currency: String,
    expires_at_ms: i64,
}

/// What half B says, from a row or from an incoming half.
struct SideB {
    terminal: String,
    account: String,
    digest: Vec<u8>,
    payee_terminal: String,
    amount_minor: i64,
    currency: String,
}

impl TransactionRow {
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

    fn side_a(&self) -> Option<SideA> {
        Some(SideA {
            terminal: self.a_terminal_id.clone()?,
            account: self.a_account_id.clone()?,
            digest: self.a_request_digest.clone()?,
            amount_minor: self.a_amount_minor?,
            currency: self.a_currency.clone()?,
            expires_at_ms: self.expires_at_ms,
        })
    }

    fn side_b(&self) -> Option<SideB> {
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

/// On PostgreSQL, locks the transaction's row (if it exists) until the end of the transaction.
fn lock(connection: &mut AnyConnection, txn_id: &TxnId) -> Result<(), StorageError> {
    if let AnyConnection::Postgresql(postgres) = connection {
        diesel::sql_query("SELECT txn_id FROM transactions WHERE txn_id = $1 FOR UPDATE")
            .bind::<diesel::sql_types::Binary, _>(txn_id.to_bytes().to_vec())
            .execute(postgres)?;
    }
    Ok(())
}

/// A row changed between our read and our write: only another daemon can do that; the job
/// runs again after this batch (see `writer`).
fn lost_race() -> StorageError {
    StorageError::Database(diesel::result::Error::DatabaseError(
        diesel::result::DatabaseErrorKind::SerializationFailure,
        Box::new(String::from("the transaction row changed concurrently")),
    ))
}

/// Accepts one half: replay check, ownership, then pending, idempotent answer or settlement.
pub(crate) fn submit_half(
    connection: &mut AnyConnection,
    half: &AcceptedHalf,
    now_ms: i64,
) -> Result<TransactionView, StorageError> {
    let kind = half.kind();
    let amount_minor = ledger::minor_units(half.amount())?;

    // Step 7: the terminal and its replay state.
    terminal_rows::lock(connection, &half.terminal_id)?;
    let terminal = terminal_rows::load_existing(connection, &half.terminal_id)?.view;
    if terminal.state != TerminalState::Active {
        return Err(StorageError::TerminalNotActive(terminal.state));
    }
    if half.ksn.initial_key_id() != terminal.initial_key_id {
        return Err(StorageError::KsnNotTerminal);
    }
    lock(connection, &half.txn_id)?;
    let existing = load(connection, &half.txn_id)?;
    let counter = i64::from(half.ksn.counter().get());
    let used: Option<(Vec<u8>, String, Vec<u8>)> = used_counters::table
        .find((half.terminal_id.as_str(), counter))
        .select((
            used_counters::txn_id,
            used_counters::half,
            used_counters::envelope_sha256,
        ))
        .first(connection)
        .optional()?;
    if let Some((used_txn, used_kind, used_envelope)) = used {
        let same = used_txn.as_slice() == half.txn_id.to_bytes().as_slice()
            && used_kind == kind.as_str()
            && used_envelope.as_slice() == half.envelope_sha256.as_slice();
        return match (same, existing) {
            (true, Some(row)) => row.view(),
            _ => Err(StorageError::ReplayedKsn),
        };
    }
    if counter <= terminal.highest_counter - REPLAY_WINDOW {
        return Err(StorageError::StaleKsn);
    }
    if half.own_account().as_str() != terminal.account_id.as_str() {
        return Err(StorageError::AccountMismatch);
    }

    // Step 8: the transaction row.
    let Some(mut row) = existing else {
        return accept_first_half(
            connection,
            half,
            amount_minor,
            terminal.highest_counter,
            now_ms,
        );
    };
    if row.has(kind) {
        return if row.envelope(kind) == Some(half.envelope_sha256.as_slice()) {
            row.view()
        } else {
            Err(StorageError::Conflict)
        };
    }
    if row.status != TransactionStatus::Pending.as_str() {
        return Err(StorageError::Expired);
    }
    let (a, b) = match kind {
        HalfKind::A => (side_a_of(half, amount_minor), row.side_b()),
        HalfKind::B => (row.side_a(), side_b_of(half, amount_minor)),
    };
    let (Some(a), Some(b)) = (a, b) else {
        return Err(StorageError::corrupt(
            "pending transaction without its half",
        ));
    };
    check_pair(connection, &a, &b)?;
    if now_ms > a.expires_at_ms {
        return Err(StorageError::Expired);
    }

    // Step 9: settle.
    let payer_id = b
        .account
        .parse()
        .map_err(|_| StorageError::corrupt("payer account"))?;
    let payee_id = a
        .account
        .parse()
        .map_err(|_| StorageError::corrupt("payee account"))?;
    ledger::lock(connection, &[&payer_id, &payee_id])?;
    let payer = ledger::load(connection, &payer_id)?;
    let payee = ledger::load(connection, &payee_id)?;
    let settlement_id = ledger::transfer(
        connection,
        TransferKind::Settlement,
        Some(&half.txn_id),
        &payer,
        &payee,
        a.amount_minor,
        now_ms,
    )?;
    row.put(half, amount_minor);
    row.status = TransactionStatus::Settled.as_str().to_owned();
    row.settlement_id = Some(settlement_id);
    row.settled_at_ms = Some(now_ms);
    // Only if nobody settled or expired it meanwhile.
    let pending = transactions::table
        .find(row.txn_id.clone())
        .filter(transactions::status.eq(TransactionStatus::Pending.as_str()));
    let updated = match kind {
        HalfKind::A => diesel::update(pending.filter(transactions::a_terminal_id.is_null()))
            .set(&row)
            .execute(connection)?,
        HalfKind::B => diesel::update(pending.filter(transactions::b_terminal_id.is_null()))
            .set(&row)
            .execute(connection)?,
    };
    if updated != 1 {
        return Err(lost_race());
    }
    record_counter(connection, half, terminal.highest_counter, now_ms)?;
    audit::append(
        connection,
        now_ms,
        "transaction.settled",
        &half.txn_id.to_string(),
        &serde_json::json!({
            "settlement_id": settlement_id,
            "payer_terminal": b.terminal,
            "payer_account": b.account,
            "payee_terminal": a.terminal,
            "payee_account": a.account,
            "amount_minor": a.amount_minor,
            "currency": a.currency,
        }),
    )?;
    row.view()
}

/// No row yet: store this half, pending.
fn accept_first_half(
    connection: &mut AnyConnection,
    half: &AcceptedHalf,
    amount_minor: i64,
    highest_counter: i64,
    now_ms: i64,
) -> Result<TransactionView, StorageError> {
    let own = ledger::load(connection, half.own_account())?;
    if own.currency != half.amount().currency() {
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
    diesel::insert_into(transactions::table)
        .values(&row)
        .execute(connection)?;
    record_counter(connection, half, highest_counter, now_ms)?;
    row.view()
}

/// The halves must describe the same payment (the transaction ID is the row's key).
fn check_pair(connection: &mut AnyConnection, a: &SideA, b: &SideB) -> Result<(), StorageError> {
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
        let id = account
            .parse()
            .map_err(|_| StorageError::corrupt("account"))?;
        if ledger::load(connection, &id)?.currency.code() != a.currency {
            return mismatch(field);
        }
    }
    Ok(())
}

/// Marks the half's counter used and moves the terminal's window.
fn record_counter(
    connection: &mut AnyConnection,
    half: &AcceptedHalf,
    highest_counter: i64,
    now_ms: i64,
) -> Result<(), StorageError> {
    let counter = i64::from(half.ksn.counter().get());
    diesel::insert_into(used_counters::table)
        .values((
            used_counters::terminal_id.eq(half.terminal_id.as_str()),
            used_counters::counter.eq(counter),
            used_counters::txn_id.eq(half.txn_id.to_bytes().to_vec()),
            used_counters::half.eq(half.kind().as_str()),
            used_counters::envelope_sha256.eq(half.envelope_sha256.to_vec()),
            used_counters::used_at_ms.eq(now_ms),
        ))
        .execute(connection)?;
    if counter > highest_counter {
        let terminal: &TerminalId = &half.terminal_id;
        diesel::update(terminals::table.find(terminal.as_str()))
            .set(terminals::highest_counter.eq(counter))
            .execute(connection)?;
        // Counters at or below the new window's floor are refused as stale anyway.
        diesel::delete(
            used_counters::table
                .filter(used_counters::terminal_id.eq(terminal.as_str()))
                .filter(used_counters::counter.le(counter - REPLAY_WINDOW)),
        )
        .execute(connection)?;
    }
    Ok(())
}

/// Marks pending transactions whose time has passed as expired (at most [`EXPIRE_BATCH_MAX`]).
pub(crate) fn expire_unmatched(
    connection: &mut AnyConnection,
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
            audit::append(
                connection,
                now_ms,
                "transaction.expired",
                &hex::encode_upper(&txn_id),
                &serde_json::json!({ "expires_at_ms": expires_at_ms }),
            )?;
            expired += 1;
        }
    }
    Ok(expired)
}
