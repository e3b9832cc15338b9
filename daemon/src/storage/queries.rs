//! Read-only queries for the operator (`nfcpay-admin accounts list`, `transactions show`,
//! `transactions list`): what the ledger holds, as stored, through the pool. Nothing here
//! writes; every list is bounded.

use diesel::prelude::*;
use nfcpay_protocol::{TerminalId, TxnId};

use super::model::{AccountView, PostingView, TransactionStatus};
use super::schema::{accounts, audit_log, postings, transactions};
use super::settlement::TransactionRow;
use super::{Storage, StorageError, ledger};

/// [`Storage::accounts_list`] returns at most this many accounts.
pub const ACCOUNTS_LIST_MAX: i64 = 10_000;
/// [`Storage::transactions_list`] returns at most this many payments.
pub const TRANSACTIONS_LIST_MAX: u32 = 10_000;
/// [`TransactionDetail::audit`] holds at most this many records.
const AUDIT_RECORDS_PER_TRANSACTION_MAX: i64 = 100;

/// One half as the ledger recorded it (hashes and KSN in upper-case hex).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HalfRecord {
    /// The terminal that sent it.
    pub terminal_id: String,
    /// The account it names (the payee's for half A, the payer's for half B).
    pub account_id: String,
    /// Its KSN.
    pub ksn: String,
    /// SHA-256 of its envelope, as received.
    pub envelope_sha256: String,
    /// The request digest it carries (or computes, for half A).
    pub request_digest: String,
    /// The amount it names, in minor units.
    pub amount_minor: i64,
    /// Its currency.
    pub currency: String,
    /// When the platform accepted it (ms since the epoch).
    pub received_at_ms: i64,
    /// Half B only: the payee terminal it names.
    pub payee_terminal_id: Option<String>,
}

/// A payment as stored, without its postings and audit records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransactionSummary {
    /// Its ID.
    pub txn_id: TxnId,
    /// Pending, settled or expired.
    pub status: TransactionStatus,
    /// When its first half was accepted (ms).
    pub created_at_ms: i64,
    /// After this (ms) it can no longer settle.
    pub expires_at_ms: i64,
    /// Half A (the payee's), once in.
    pub half_a: Option<HalfRecord>,
    /// Half B (the payer's), once in.
    pub half_b: Option<HalfRecord>,
    /// The settlement's transfer ID, once settled.
    pub settlement_id: Option<i64>,
    /// When it settled (ms).
    pub settled_at_ms: Option<i64>,
    /// When it was marked expired (ms).
    pub expired_at_ms: Option<i64>,
}

/// One audit record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecordView {
    /// Its chain.
    pub chain_id: i64,
    /// Its place in the chain.
    pub seq: i64,
    /// When (ms).
    pub at_ms: i64,
    /// What happened (`transaction.settled`, …).
    pub kind: String,
    /// What it is about (here the transaction ID in hex).
    pub subject: String,
    /// Its details: a JSON object, as hashed into the chain.
    pub details: String,
    /// Its hash (hex).
    pub hash: String,
}

/// A payment with its settlement's postings and its audit records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransactionDetail {
    /// The payment.
    pub summary: TransactionSummary,
    /// The settlement's two postings (none before it settles).
    pub postings: Vec<PostingView>,
    /// Its audit records, oldest first.
    pub audit: Vec<AuditRecordView>,
}

/// What [`Storage::transactions_list`] selects.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TransactionFilter {
    /// Only payments in this state.
    pub status: Option<TransactionStatus>,
    /// Only payments one of whose halves this terminal sent.
    pub terminal: Option<TerminalId>,
    /// Only payments whose first half came at or after this (ms).
    pub since_ms: Option<i64>,
    /// At most this many, newest first (capped at [`TRANSACTIONS_LIST_MAX`]).
    pub limit: u32,
}

/// The connection pool now, for `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolState {
    /// Connections open (in use or idle).
    pub connections: u32,
    /// Of those, idle.
    pub idle: u32,
    /// The most the pool opens.
    pub max: u32,
}

impl Storage {
    /// The connection pool's state now.
    pub fn pool_state(&self) -> PoolState {
        let state = self.inner.pool.state();
        PoolState {
            connections: state.connections,
            idle: state.idle_connections,
            max: self.inner.pool.max_size(),
        }
    }

    /// Every account (the ledger's funding accounts too), by ID; at most [`ACCOUNTS_LIST_MAX`].
    pub fn accounts_list(&self) -> Result<Vec<AccountView>, StorageError> {
        self.read(|connection| {
            accounts::table
                .order(accounts::id.asc())
                .limit(ACCOUNTS_LIST_MAX)
                .select(ledger::AccountRow::as_select())
                .load(connection)?
                .into_iter()
                .map(ledger::account_view)
                .collect()
        })
    }

    /// A payment with its postings and audit records, if it exists.
    pub fn transaction_detail(
        &self,
        txn_id: &TxnId,
    ) -> Result<Option<TransactionDetail>, StorageError> {
        let key = txn_id.to_bytes().to_vec();
        self.read(|connection| {
            let Some(row) = transactions::table
                .find(key.clone())
                .select(TransactionRow::as_select())
                .first(connection)
                .optional()?
            else {
                return Ok(None);
            };
            let summary = row.summary()?;
            let postings = match summary.settlement_id {
                None => Vec::new(),
                Some(transfer_id) => postings::table
                    .filter(postings::transfer_id.eq(transfer_id))
                    .order(postings::id.asc())
                    .select(ledger::PostingRow::as_select())
                    .load(connection)?
                    .into_iter()
                    .map(ledger::posting_view)
                    .collect::<Result<_, StorageError>>()?,
            };
            let audit = audit_log::table
                .filter(audit_log::subject.eq(txn_id.to_string()))
                .order((
                    audit_log::at_ms.asc(),
                    audit_log::chain_id.asc(),
                    audit_log::seq.asc(),
                ))
                .limit(AUDIT_RECORDS_PER_TRANSACTION_MAX)
                .select((
                    audit_log::chain_id,
                    audit_log::seq,
                    audit_log::at_ms,
                    audit_log::kind,
                    audit_log::subject,
                    audit_log::details,
                    audit_log::hash,
                ))
                .load::<(i64, i64, i64, String, String, String, Vec<u8>)>(connection)?
                .into_iter()
                .map(
                    |(chain_id, seq, at_ms, kind, subject, details, hash)| AuditRecordView {
                        chain_id,
                        seq,
                        at_ms,
                        kind,
                        subject,
                        details,
                        hash: hex::encode_upper(hash),
                    },
                )
                .collect();
            Ok(Some(TransactionDetail {
                summary,
                postings,
                audit,
            }))
        })
    }

    /// Payments that pass `filter`, newest first.
    pub fn transactions_list(
        &self,
        filter: &TransactionFilter,
    ) -> Result<Vec<TransactionSummary>, StorageError> {
        let limit = i64::from(filter.limit.min(TRANSACTIONS_LIST_MAX));
        // Built anew on each try: a read is run again on a fresh connection if its own broke.
        self.read(|connection| {
            let mut query = transactions::table
                .select(TransactionRow::as_select())
                .into_boxed();
            if let Some(status) = filter.status {
                query = query.filter(transactions::status.eq(status.as_str()));
            }
            if let Some(terminal) = &filter.terminal {
                let terminal = terminal.as_str().to_owned();
                query = query.filter(
                    transactions::a_terminal_id
                        .eq(terminal.clone())
                        .or(transactions::b_terminal_id.eq(terminal)),
                );
            }
            if let Some(since_ms) = filter.since_ms {
                query = query.filter(transactions::created_at_ms.ge(since_ms));
            }
            query
                .order((
                    transactions::created_at_ms.desc(),
                    transactions::txn_id.asc(),
                ))
                .limit(limit)
                .load::<TransactionRow>(connection)?
                .into_iter()
                .map(TransactionRow::summary)
                .collect()
        })
    }
}
