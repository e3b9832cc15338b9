//! Accounts and double-entry transfers.
//!
//! Every transfer writes exactly two postings that sum to zero. Money enters the ledger from a
//! per-currency funding account (`__funding-EUR`, …) that has no lower limit, so the sum of
//! all balances — and of all postings — per currency is always zero.

use diesel::prelude::*;
use nfcpay_protocol::{AccountId, Amount, Currency, TxnId};

use super::StorageError;
use super::audit::AuditLog;
use super::connection::AnyConnection;
use super::model::{AccountView, PostingView};
use super::schema::{accounts, postings, transfers};

/// Identifiers starting with this are the ledger's own.
pub const RESERVED_ACCOUNT_PREFIX: &str = "__";
/// The funding account of a currency is this prefix followed by the currency code.
pub const FUNDING_ACCOUNT_PREFIX: &str = "__funding-";
/// [`super::Storage::postings`] returns at most this many (the newest).
pub const POSTINGS_LIST_MAX: i64 = 10_000;

/// The funding account of `currency`.
pub fn funding_account_id(currency: Currency) -> AccountId {
    let text = format!("{FUNDING_ACCOUNT_PREFIX}{}", currency.code());
    // A currency code is three ASCII letters, so the identifier is valid.
    #[allow(clippy::expect_used)]
    text.parse().expect("a funding account identifier is valid")
}

/// An `accounts` row, as stored.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = accounts)]
pub(super) struct AccountRow {
    id: String,
    currency: String,
    balance_minor: i64,
    limit_minor: Option<i64>,
    created_at_ms: i64,
}

pub(super) fn account_view(row: AccountRow) -> Result<AccountView, StorageError> {
    let AccountRow {
        id,
        currency,
        balance_minor,
        limit_minor,
        created_at_ms,
    } = row;
    Ok(AccountView {
        id: id
            .parse()
            .map_err(|_| StorageError::corrupt(format!("account id {id:?}")))?,
        currency: currency
            .parse()
            .map_err(|_| StorageError::corrupt(format!("currency {currency:?}")))?,
        balance_minor,
        limit_minor,
        created_at_ms,
    })
}

/// Reads an account.
pub(crate) fn load(
    connection: &mut AnyConnection,
    id: &AccountId,
) -> Result<AccountView, StorageError> {
    let row: Option<AccountRow> = accounts::table
        .find(id.as_str())
        .select(AccountRow::as_select())
        .first(connection)
        .optional()?;
    account_view(row.ok_or_else(|| StorageError::UnknownAccount(id.clone()))?)
}

/// On PostgreSQL, locks the accounts' rows until the end of the transaction, in a fixed order.
pub(crate) fn lock(connection: &mut AnyConnection, ids: &[&AccountId]) -> Result<(), StorageError> {
    if let AnyConnection::Postgresql(postgres) = connection {
        let mut ids: Vec<&str> = ids.iter().map(|id| id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        for id in ids {
            diesel::sql_query("SELECT id FROM accounts WHERE id = $1 FOR UPDATE")
                .bind::<diesel::sql_types::Text, _>(id)
                .execute(postgres)?;
        }
    }
    Ok(())
}

/// Creates an account (and its currency's funding account, the first time).
pub(crate) fn create(
    connection: &mut AnyConnection,
    audit: &mut AuditLog,
    id: &AccountId,
    currency: Currency,
    limit_minor: i64,
    now_ms: i64,
) -> Result<(), StorageError> {
    if id.as_str().starts_with(RESERVED_ACCOUNT_PREFIX) {
        return Err(StorageError::ReservedAccount);
    }
    if limit_minor > 0 {
        return Err(StorageError::InvalidLimit(limit_minor));
    }
    if exists(connection, id)? {
        return Err(StorageError::AccountExists(id.clone()));
    }
    ensure_funding_account(connection, currency, now_ms)?;
    insert(connection, id, currency, Some(limit_minor), now_ms)?;
    audit.record(
        now_ms,
        "account.created",
        id.as_str(),
        &serde_json::json!({ "currency": currency.code(), "limit_minor": limit_minor }),
    );
    Ok(())
}

fn exists(connection: &mut AnyConnection, id: &AccountId) -> Result<bool, StorageError> {
    Ok(accounts::table
        .find(id.as_str())
        .select(accounts::id)
        .first::<String>(connection)
        .optional()?
        .is_some())
}

fn insert(
    connection: &mut AnyConnection,
    id: &AccountId,
    currency: Currency,
    limit_minor: Option<i64>,
    now_ms: i64,
) -> Result<(), StorageError> {
    diesel::insert_into(accounts::table)
        .values((
            accounts::id.eq(id.as_str()),
            accounts::currency.eq(currency.code()),
            accounts::balance_minor.eq(0_i64),
            accounts::limit_minor.eq(limit_minor),
            accounts::created_at_ms.eq(now_ms),
        ))
        .execute(connection)?;
    Ok(())
}

fn ensure_funding_account(
    connection: &mut AnyConnection,
    currency: Currency,
    now_ms: i64,
) -> Result<AccountId, StorageError> {
    let id = funding_account_id(currency);
    if !exists(connection, &id)? {
        insert(connection, &id, currency, None, now_ms)?;
    }
    Ok(id)
}

/// Converts a protocol amount (1 ..= 2^53) to signed minor units.
pub(crate) fn minor_units(amount: Amount) -> Result<i64, StorageError> {
    i64::try_from(amount.minor_units()).map_err(|_| StorageError::Overflow)
}

/// Credits `id` from its currency's funding account.
pub(crate) fn fund(
    connection: &mut AnyConnection,
    audit: &mut AuditLog,
    id: &AccountId,
    amount: Amount,
    now_ms: i64,
) -> Result<AccountView, StorageError> {
    let account = load(connection, id)?;
    if account.limit_minor.is_none() {
        return Err(StorageError::ReservedAccount);
    }
    if account.currency != amount.currency() {
        return Err(StorageError::CurrencyMismatch {
            expected: account.currency.code().to_owned(),
            actual: amount.currency().code().to_owned(),
        });
    }
    let funding_id = ensure_funding_account(connection, account.currency, now_ms)?;
    lock(connection, &[id, &funding_id])?;
    let account = load(connection, id)?;
    let funding = load(connection, &funding_id)?;
    let amount_minor = minor_units(amount)?;
    let transfer_id = transfer(
        connection,
        TransferKind::Funding,
        None,
        &funding,
        &account,
        amount_minor,
        now_ms,
    )?;
    audit.record(
        now_ms,
        "account.funded",
        id.as_str(),
        &serde_json::json!({
            "transfer_id": transfer_id,
            "amount_minor": amount_minor,
            "currency": amount.currency().code(),
        }),
    );
    load(connection, id)
}

/// Why money moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TransferKind {
    /// From a funding account (operator action).
    Funding,
    /// A payment between two terminals' accounts.
    Settlement,
}

impl TransferKind {
    /// As stored in `transfers.kind`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Funding => "funding",
            Self::Settlement => "settlement",
        }
    }
}

/// Books `amount_minor` from `from` to `to`: one transfer row and two postings. The caller
/// has locked both accounts and read them inside this transaction.
pub(crate) fn transfer(
    connection: &mut AnyConnection,
    kind: TransferKind,
    txn_id: Option<&TxnId>,
    from: &AccountView,
    to: &AccountView,
    amount_minor: i64,
    now_ms: i64,
) -> Result<i64, StorageError> {
    assert!(amount_minor > 0, "transfers move a positive amount");
    assert_eq!(
        from.currency, to.currency,
        "transfers stay within a currency"
    );
    let from_after = from
        .balance_minor
        .checked_sub(amount_minor)
        .ok_or(StorageError::Overflow)?;
    let to_after = to
        .balance_minor
        .checked_add(amount_minor)
        .ok_or(StorageError::Overflow)?;
    if from.limit_minor.is_some_and(|limit| from_after < limit) {
        return Err(StorageError::InsufficientFunds);
    }
    let txn_bytes = txn_id.map(|txn_id| txn_id.to_bytes().to_vec());
    let transfer_id: i64 = diesel::insert_into(transfers::table)
        .values((
            transfers::kind.eq(kind.as_str()),
            transfers::txn_id.eq(txn_bytes),
            transfers::amount_minor.eq(amount_minor),
            transfers::currency.eq(from.currency.code()),
            transfers::created_at_ms.eq(now_ms),
        ))
        .returning(transfers::id)
        .get_result(connection)?;
    for (account, amount, balance_after) in [
        (&from.id, -amount_minor, from_after),
        (&to.id, amount_minor, to_after),
    ] {
        diesel::update(accounts::table.find(account.as_str()))
            .set(accounts::balance_minor.eq(balance_after))
            .execute(connection)?;
        diesel::insert_into(postings::table)
            .values((
                postings::transfer_id.eq(transfer_id),
                postings::account_id.eq(account.as_str()),
                postings::amount_minor.eq(amount),
                postings::balance_after_minor.eq(balance_after),
                postings::created_at_ms.eq(now_ms),
            ))
            .execute(connection)?;
    }
    Ok(transfer_id)
}

/// A `postings` row, as stored.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = postings)]
pub(super) struct PostingRow {
    id: i64,
    transfer_id: i64,
    account_id: String,
    amount_minor: i64,
    balance_after_minor: i64,
    created_at_ms: i64,
}

pub(super) fn posting_view(row: PostingRow) -> Result<PostingView, StorageError> {
    let PostingRow {
        id,
        transfer_id,
        account_id,
        amount_minor,
        balance_after_minor,
        created_at_ms,
    } = row;
    Ok(PostingView {
        id,
        transfer_id,
        account_id: account_id
            .parse()
            .map_err(|_| StorageError::corrupt(format!("account id {account_id:?}")))?,
        amount_minor,
        balance_after_minor,
        created_at_ms,
    })
}

/// An account's postings, oldest first (at most the newest [`POSTINGS_LIST_MAX`]).
pub(crate) fn postings(
    connection: &mut AnyConnection,
    id: &AccountId,
) -> Result<Vec<PostingView>, StorageError> {
    load(connection, id)?;
    let mut rows: Vec<PostingRow> = postings::table
        .filter(postings::account_id.eq(id.as_str()))
        .order(postings::id.desc())
        .limit(POSTINGS_LIST_MAX)
        .select(PostingRow::as_select())
        .load(connection)?;
    rows.reverse();
    rows.into_iter().map(posting_view).collect()
}
