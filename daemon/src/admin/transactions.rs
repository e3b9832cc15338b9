//! `nfcpay-admin transactions …`: look a payment up by its transaction ID (both halves, status,
//! settlement, postings, audit records) and list payments.

use std::io::Write;

use clap::{Subcommand, ValueEnum};
use nfcpay_protocol::{Currency, TerminalId, TxnId};
use serde_json::{Value, json};

use super::accounts::posting_json;
use super::{AdminError, decimal_minor, format_utc_ms};
use crate::storage::queries::TRANSACTIONS_LIST_MAX;
use crate::storage::{
    AuditRecordView, HalfRecord, Storage, TransactionFilter, TransactionStatus, TransactionSummary,
};

/// `transactions list` shows this many unless `--limit` says otherwise.
const TRANSACTIONS_LIST_DEFAULT: u32 = 100;

/// `transactions` subcommands.
#[derive(Debug, Subcommand)]
pub enum TransactionsCommand {
    /// One payment: both halves, status, settlement, postings and audit records.
    Show {
        /// Transaction ID: 32 hex digits.
        txn_id: TxnId,
    },
    /// Payments, newest first.
    List {
        /// Only payments in this state.
        #[arg(long, value_enum)]
        status: Option<Status>,
        /// Only payments one of whose halves this terminal sent.
        #[arg(long)]
        terminal: Option<TerminalId>,
        /// Only payments whose first half came at or after this time: RFC 3339
        /// (2026-12-03T12:00:00Z) or milliseconds since the Unix epoch.
        #[arg(long, value_parser = parse_since)]
        since: Option<i64>,
        /// At most this many (1 to 10000).
        #[arg(long, default_value_t = TRANSACTIONS_LIST_DEFAULT,
              value_parser = clap::value_parser!(u32).range(1..=i64::from(TRANSACTIONS_LIST_MAX)))]
        limit: u32,
    },
}

/// A payment's state, as `--status` takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Status {
    /// One half is in.
    Pending,
    /// Settled.
    Settled,
    /// Expired unmatched.
    Expired,
}

impl From<Status> for TransactionStatus {
    fn from(status: Status) -> Self {
        match status {
            Status::Pending => Self::Pending,
            Status::Settled => Self::Settled,
            Status::Expired => Self::Expired,
        }
    }
}

/// Runs a `transactions` subcommand.
pub fn run(
    command: TransactionsCommand,
    storage: &Storage,
    out: &mut dyn Write,
) -> Result<Value, AdminError> {
    match command {
        TransactionsCommand::Show { txn_id } => {
            let detail = storage
                .transaction_detail(&txn_id)?
                .ok_or_else(|| AdminError::NotFound(format!("no transaction {txn_id}")))?;
            let summary = &detail.summary;
            let currency = currency_of(summary);
            writeln!(out, "transaction {}: {}", summary.txn_id, summary.status)?;
            writeln!(out, "  created:  {}", format_utc_ms(summary.created_at_ms))?;
            writeln!(out, "  expires:  {}", format_utc_ms(summary.expires_at_ms))?;
            for (name, half) in [
                ("half A (payee)", &summary.half_a),
                ("half B (payer)", &summary.half_b),
            ] {
                match half {
                    None => writeln!(out, "  {name}: not received")?,
                    Some(half) => writeln!(
                        out,
                        "  {name}: terminal {} account {} amount {} {} KSN {} at {}",
                        half.terminal_id,
                        half.account_id,
                        amount_text(half.amount_minor, &half.currency),
                        half.currency,
                        half.ksn,
                        format_utc_ms(half.received_at_ms)
                    )?,
                }
            }
            if let (Some(id), Some(at_ms)) = (summary.settlement_id, summary.settled_at_ms) {
                writeln!(out, "  settlement {id} at {}", format_utc_ms(at_ms))?;
            }
            for posting in &detail.postings {
                writeln!(
                    out,
                    "    posting {}: {} {}",
                    posting.id,
                    posting.account_id,
                    currency.map_or(posting.amount_minor.to_string(), |currency| {
                        decimal_minor(posting.amount_minor, currency)
                    })
                )?;
            }
            for record in &detail.audit {
                writeln!(
                    out,
                    "  audit chain {} record {}: {} {}",
                    record.chain_id, record.seq, record.kind, record.details
                )?;
            }
            let mut document = summary_json(summary);
            document["postings"] = match currency {
                Some(currency) => detail
                    .postings
                    .iter()
                    .map(|posting| posting_json(posting, currency))
                    .collect(),
                None => json!([]),
            };
            document["audit"] = detail.audit.iter().map(audit_json).collect();
            Ok(json!({ "transaction": document }))
        }
        TransactionsCommand::List {
            status,
            terminal,
            since,
            limit,
        } => {
            let list = storage.transactions_list(&TransactionFilter {
                status: status.map(TransactionStatus::from),
                terminal,
                since_ms: since,
                limit,
            })?;
            writeln!(
                out,
                "{:<32} {:<8} {:>16} {:<4} {:<20} {:<20} CREATED (UTC)",
                "TRANSACTION", "STATUS", "AMOUNT", "CUR", "PAYEE", "PAYER"
            )?;
            for summary in &list {
                let (amount_minor, currency) = amount_of(summary);
                writeln!(
                    out,
                    "{:<32} {:<8} {:>16} {:<4} {:<20} {:<20} {}",
                    summary.txn_id.to_string(),
                    summary.status.as_str(),
                    amount_text(amount_minor, &currency),
                    currency,
                    payee_of(summary).unwrap_or("-"),
                    summary
                        .half_b
                        .as_ref()
                        .map_or("-", |half| half.terminal_id.as_str()),
                    format_utc_ms(summary.created_at_ms)
                )?;
            }
            Ok(json!({ "transactions": list.iter().map(summary_json).collect::<Vec<_>>() }))
        }
    }
}

/// `--since`: RFC 3339, or milliseconds since the epoch.
fn parse_since(text: &str) -> Result<i64, String> {
    if let Ok(ms) = text.parse::<i64>() {
        return Ok(ms);
    }
    let at = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map_err(|error| format!("neither RFC 3339 nor milliseconds since the epoch: {error}"))?;
    i64::try_from(at.unix_timestamp_nanos() / 1_000_000).map_err(|_| "out of range".to_owned())
}

/// The payment's amount and currency: half A's, or half B's while A is missing.
fn amount_of(summary: &TransactionSummary) -> (i64, String) {
    summary
        .half_a
        .as_ref()
        .or(summary.half_b.as_ref())
        .map_or((0, String::new()), |half| {
            (half.amount_minor, half.currency.clone())
        })
}

fn currency_of(summary: &TransactionSummary) -> Option<Currency> {
    amount_of(summary).1.parse().ok()
}

/// The payee terminal: half A's sender, or the one half B names.
fn payee_of(summary: &TransactionSummary) -> Option<&str> {
    summary
        .half_a
        .as_ref()
        .map(|half| half.terminal_id.as_str())
        .or_else(|| {
            summary
                .half_b
                .as_ref()
                .and_then(|half| half.payee_terminal_id.as_deref())
        })
}

fn amount_text(amount_minor: i64, currency: &str) -> String {
    currency
        .parse()
        .map_or(amount_minor.to_string(), |currency| {
            decimal_minor(amount_minor, currency)
        })
}

fn half_json(half: &HalfRecord) -> Value {
    json!({
        "terminal": half.terminal_id,
        "account": half.account_id,
        "ksn": half.ksn,
        "envelope_sha256": half.envelope_sha256,
        "request_digest": half.request_digest,
        "amount_minor": half.amount_minor,
        "currency": half.currency,
        "received_at_ms": half.received_at_ms,
    })
}

/// A payment in JSON (docs/admin-cli.md).
fn summary_json(summary: &TransactionSummary) -> Value {
    let (amount_minor, currency) = amount_of(summary);
    let mut half_b = summary.half_b.as_ref().map(half_json);
    if let (Some(json), Some(half)) = (&mut half_b, &summary.half_b) {
        json["payee_terminal"] = json!(half.payee_terminal_id);
    }
    json!({
        "txn_id": summary.txn_id.to_string(),
        "status": summary.status.as_str(),
        "amount_minor": amount_minor,
        "currency": currency,
        "amount": amount_text(amount_minor, &currency),
        "payee_terminal": payee_of(summary),
        "payer_terminal": summary.half_b.as_ref().map(|half| half.terminal_id.as_str()),
        "created_at_ms": summary.created_at_ms,
        "expires_at_ms": summary.expires_at_ms,
        "half_a": summary.half_a.as_ref().map(half_json),
        "half_b": half_b,
        "settlement_id": summary.settlement_id,
        "settled_at_ms": summary.settled_at_ms,
        "expired_at_ms": summary.expired_at_ms,
    })
}

fn audit_json(record: &AuditRecordView) -> Value {
    // The details were written as a JSON object; shown as text if they no longer parse.
    let details = serde_json::from_str::<Value>(&record.details)
        .unwrap_or_else(|_| Value::String(record.details.clone()));
    json!({
        "chain_id": record.chain_id,
        "seq": record.seq,
        "at_ms": record.at_ms,
        "kind": record.kind,
        "subject": record.subject,
        "details": details,
        "hash": record.hash,
    })
}
