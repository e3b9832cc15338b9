//! The set-based group commit of halves: read every row a batch touches with a few
//! `WHERE key IN (…)` queries, let [`Batch::decide`] judge each half in memory, then write what
//! changed with multi-row statements. The number of statements per batch does not depend on
//! the number of halves in it (at most 14 between `BEGIN` and `COMMIT` on SQLite, audit
//! included; on PostgreSQL the writes after the transfers are one combined statement, see
//! [`Writes`], so at most 7).
//!
//! # Locks (PostgreSQL)
//!
//! Several daemons may share one database, so a batch locks what it will change, always in
//! the same order, which keeps them free of deadlocks:
//!
//! 1. the sending terminals' rows (`FOR NO KEY UPDATE`, by ID): their replay windows;
//! 2. one transaction-scoped advisory lock per payment (by key), so the two halves of a
//!    payment arriving at two daemons are decided one after the other, even before the
//!    payment's row exists;
//! 3. the accounts the batch reads (`FOR NO KEY UPDATE`, by ID): their balances.
//!
//! Two daemons wait for each other only on the rows of the same terminal, payment or account.
//! SQLite has one writer at a time (`BEGIN IMMEDIATE`), so it needs none of these.

use std::collections::{BTreeSet, HashMap};

use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Binary, Integer, Nullable, Text};

use super::StorageError;
use super::audit::AuditLog;
use super::connection::AnyConnection;
use super::ledger::{self, AccountRow, TransferKind};
use super::model::TransactionStatus;
use super::schema::{accounts, terminals, transactions};
use super::settlement::{
    Batch, BatchAccount, BatchTerminal, BatchTransaction, QueuedHalf, TransactionRow, TxnKey,
    UsedCounter, lost_race,
};
use super::sql::{Statement, Value, Writes};
use super::terminals::{self as terminal_rows, TerminalRow};

/// The first key of the advisory locks a batch takes per payment ("nfcp"); the second is
/// the payment's first four bytes.
const PAYMENT_LOCK_SPACE: i32 = 0x6e66_6370;

/// A `used_counters` row.
#[derive(QueryableByName)]
struct UsedCounterRow {
    #[diesel(sql_type = Text)]
    terminal_id: String,
    #[diesel(sql_type = BigInt)]
    counter: i64,
    #[diesel(sql_type = Binary)]
    txn_id: Vec<u8>,
    #[diesel(sql_type = Text)]
    half: String,
    #[diesel(sql_type = Binary)]
    envelope_sha256: Vec<u8>,
    #[diesel(sql_type = BigInt)]
    used_at_ms: i64,
}

/// Takes the per-payment advisory locks of `keys` on PostgreSQL (in key order), until the end
/// of the transaction. Nothing on SQLite, whose writer holds the whole database.
pub(crate) fn lock_transactions(
    connection: &mut AnyConnection,
    keys: &[TxnKey],
) -> Result<(), StorageError> {
    let AnyConnection::Postgresql(postgres) = connection else {
        return Ok(());
    };
    let locks: BTreeSet<i32> = keys
        .iter()
        .map(|key| i32::from_be_bytes([key[0], key[1], key[2], key[3]]))
        .collect();
    if locks.is_empty() {
        return Ok(());
    }
    // `unnest` yields the array in order, so the locks are taken in ascending order.
    diesel::sql_query("SELECT pg_advisory_xact_lock($1, k) FROM unnest($2) AS k")
        .bind::<Integer, _>(PAYMENT_LOCK_SPACE)
        .bind::<Array<Integer>, _>(locks.into_iter().collect::<Vec<_>>())
        .execute(postgres)?;
    Ok(())
}

/// Reads (and on PostgreSQL locks) every row `halves` touch: four queries, five with the
/// advisory locks.
pub(crate) fn read(
    connection: &mut AnyConnection,
    halves: &[QueuedHalf],
    statements: &mut u32,
) -> Result<Batch, StorageError> {
    let mut batch = Batch::default();

    let terminal_ids: BTreeSet<&str> = halves
        .iter()
        .map(|queued| queued.half.terminal_id.as_str())
        .collect();
    let query = terminals::table
        .filter(terminals::id.eq_any(terminal_ids.iter().copied()))
        .order(terminals::id.asc())
        .select(terminal_rows::COLUMNS);
    let rows: Vec<TerminalRow> = match connection {
        AnyConnection::Postgresql(postgres) => query.for_no_key_update().load(postgres)?,
        AnyConnection::Sqlite(sqlite) => query.load(sqlite)?,
    };
    *statements += 1;
    for row in rows {
        let view = terminal_rows::record(row)?.view;
        batch.terminals.insert(
            view.id.as_str().to_owned(),
            BatchTerminal {
                highest_counter: view.highest_counter,
                view,
            },
        );
    }

    let keys: BTreeSet<TxnKey> = halves
        .iter()
        .map(|queued| queued.half.txn_id.to_bytes())
        .collect();
    let keys: Vec<TxnKey> = keys.into_iter().collect();
    if connection_is_postgres(connection) {
        lock_transactions(connection, &keys)?;
        *statements += 1;
    }
    let rows: Vec<TransactionRow> = transactions::table
        .filter(transactions::txn_id.eq_any(keys.iter().map(|key| key.to_vec())))
        .select(TransactionRow::as_select())
        .load(connection)?;
    *statements += 1;
    for row in rows {
        let key = row
            .key()
            .ok_or_else(|| StorageError::corrupt("transaction id length"))?;
        batch.transactions.insert(
            key,
            BatchTransaction {
                row,
                stored: true,
                changed: false,
            },
        );
    }

    // Exactly the (terminal, counter) pairs of the batch, each found through the primary key.
    let pairs: BTreeSet<(&str, i64)> = halves
        .iter()
        .map(|queued| {
            (
                queued.half.terminal_id.as_str(),
                i64::from(queued.half.ksn.counter().get()),
            )
        })
        .collect();
    let mut query = Statement::new("WITH v (terminal_id, counter) AS (");
    query
        .rows(
            pairs
                .iter()
                .map(|&(terminal, counter)| [Value::from(terminal), Value::from(counter)]),
        )
        .sql(
            ") SELECT u.terminal_id, u.counter, u.txn_id, u.half, u.envelope_sha256, \
             u.used_at_ms FROM v JOIN used_counters AS u \
             ON u.terminal_id = v.terminal_id AND u.counter = v.counter",
        );
    let used: Vec<UsedCounterRow> = query.load_in(connection)?;
    *statements += 1;
    for UsedCounterRow {
        terminal_id,
        counter,
        txn_id,
        half,
        envelope_sha256,
        used_at_ms,
    } in used
    {
        let corrupt = || StorageError::corrupt("used counter row");
        let used = UsedCounter {
            txn_id: txn_id.as_slice().try_into().map_err(|_| corrupt())?,
            kind: super::model::parse_stored_kind(&half).ok_or_else(corrupt)?,
            envelope_sha256: envelope_sha256
                .as_slice()
                .try_into()
                .map_err(|_| corrupt())?,
            terminal_id,
            counter,
            used_at_ms,
        };
        batch
            .used
            .insert((used.terminal_id.clone(), used.counter), used);
    }

    // The halves' own accounts, and the accounts of the halves already stored.
    let mut account_ids: BTreeSet<String> = halves
        .iter()
        .map(|queued| queued.half.own_account().as_str().to_owned())
        .collect();
    for stored in batch.transactions.values() {
        for side in [
            stored.row.side_a().map(|a| a.account),
            stored.row.side_b().map(|b| b.account),
        ]
        .into_iter()
        .flatten()
        {
            account_ids.insert(side);
        }
    }
    let query = accounts::table
        .filter(accounts::id.eq_any(account_ids.iter().map(String::as_str)))
        .order(accounts::id.asc());
    // `as_select` is made for one backend, so each arm selects its own.
    let rows: Vec<AccountRow> = match connection {
        AnyConnection::Postgresql(postgres) => query
            .select(AccountRow::as_select())
            .for_no_key_update()
            .load(postgres)?,
        AnyConnection::Sqlite(sqlite) => query.select(AccountRow::as_select()).load(sqlite)?,
    };
    *statements += 1;
    for row in rows {
        let view = ledger::account_view(row)?;
        batch.accounts.insert(
            view.id.as_str().to_owned(),
            BatchAccount {
                view,
                changed: false,
            },
        );
    }
    Ok(batch)
}

fn connection_is_postgres(connection: &AnyConnection) -> bool {
    matches!(connection, AnyConnection::Postgresql(_))
}

/// Writes what the batch changed. The settlements' transfers are inserted at once (their IDs
/// go into the payments' rows and the audit records, which `audit` is asked for); every other
/// write is queued on `writes` (at most seven), for the caller to run with the audit append
/// as one combined write. A transaction row that is no longer pending when written means
/// another writer got there first: [`lost_race`], and the batch runs again.
pub(crate) fn write(
    connection: &mut AnyConnection,
    batch: &mut Batch,
    audit: &mut AuditLog,
    writes: &mut Writes,
    statements: &mut u32,
) -> Result<(), StorageError> {
    let ids = insert_transfers(connection, batch, statements)?;
    batch.assign_settlements(&ids, audit)?;
    write_counters(connection, batch, writes);
    write_bookings(batch, &ids, writes)?;
    write_transactions(batch, writes);
    Ok(())
}

/// The used counters, the terminals' windows, and the counters that fell out of them.
fn write_counters(connection: &AnyConnection, batch: &Batch, writes: &mut Writes) {
    if batch.new_used.is_empty() {
        return;
    }
    let mut insert = Statement::new(
        "INSERT INTO used_counters \
         (terminal_id, counter, txn_id, half, envelope_sha256, used_at_ms) ",
    );
    insert.rows(batch.new_used.iter().map(|used| {
        [
            Value::from(used.terminal_id.clone()),
            Value::from(used.counter),
            Value::from(used.txn_id.to_vec()),
            Value::from(super::model::stored_kind(used.kind)),
            Value::from(used.envelope_sha256.to_vec()),
            Value::from(used.used_at_ms),
        ]
    }));
    writes.push(insert);

    let mut moved: Vec<(&str, i64)> = batch
        .terminals
        .values()
        .filter(|terminal| terminal.highest_counter > terminal.view.highest_counter)
        .map(|terminal| (terminal.view.id.as_str(), terminal.highest_counter))
        .collect();
    if moved.is_empty() {
        return;
    }
    moved.sort_unstable();
    let windows = || {
        moved
            .iter()
            .map(|&(id, highest)| [Value::from(id), Value::from(highest)])
    };
    let mut update = Statement::new("WITH v (id, highest) AS (");
    update
        .rows(windows())
        .sql(") UPDATE terminals SET highest_counter = v.highest FROM v WHERE terminals.id = v.id");
    writes.push(update);

    // Counters at or below a window's floor are refused as stale anyway. On PostgreSQL this
    // runs in one statement with the insert above and does not see its rows: a counter of this
    // batch already under the new floor (a terminal that jumped ahead) stays until the
    // terminal's next prune, refused as stale meanwhile like any other.
    let mut prune = Statement::new("WITH v (id, highest) AS (");
    prune.rows(windows());
    match connection {
        AnyConnection::Postgresql(_) => prune.sql(
            ") DELETE FROM used_counters USING v \
             WHERE used_counters.terminal_id = v.id \
             AND used_counters.counter <= v.highest - 1024",
        ),
        AnyConnection::Sqlite(_) => prune.sql(
            ") DELETE FROM used_counters WHERE (terminal_id, counter) IN \
             (SELECT u.terminal_id, u.counter FROM v JOIN used_counters AS u \
             ON u.terminal_id = v.id AND u.counter <= v.highest - 1024)",
        ),
    };
    const _: () = assert!(super::settlement::REPLAY_WINDOW == 1024);
    writes.push(prune);
}

#[derive(QueryableByName)]
struct InsertedTransfer {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = Nullable<Binary>)]
    txn_id: Option<Vec<u8>>,
}

/// Inserts the settlements' transfers; returns each one's ID by payment.
fn insert_transfers(
    connection: &mut AnyConnection,
    batch: &Batch,
    statements: &mut u32,
) -> Result<HashMap<TxnKey, i64>, StorageError> {
    if batch.bookings.is_empty() {
        return Ok(HashMap::new());
    }
    let mut insert = Statement::new(
        "INSERT INTO transfers (kind, txn_id, amount_minor, currency, created_at_ms) ",
    );
    insert.rows(batch.bookings.iter().map(|booking| {
        [
            Value::from(TransferKind::Settlement.as_str()),
            Value::from(booking.txn_id.to_vec()),
            Value::from(booking.payee.amount_minor),
            Value::from(booking.payee.currency.clone()),
            Value::from(booking.at_ms),
        ]
    }));
    insert.sql(" RETURNING id, txn_id");
    let inserted: Vec<InsertedTransfer> = insert.load_in(connection)?;
    *statements += 1;
    let mut ids = HashMap::with_capacity(inserted.len());
    for transfer in inserted {
        let key: TxnKey = transfer
            .txn_id
            .as_deref()
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or_else(|| StorageError::corrupt("an inserted transfer without its payment"))?;
        ids.insert(key, transfer.id);
    }
    Ok(ids)
}

/// The settlements' postings (under their transfers, `ids`) and the accounts' balances.
fn write_bookings(
    batch: &Batch,
    ids: &HashMap<TxnKey, i64>,
    writes: &mut Writes,
) -> Result<(), StorageError> {
    if batch.bookings.is_empty() {
        return Ok(());
    }
    let mut postings = Statement::new(
        "INSERT INTO postings \
         (transfer_id, account_id, amount_minor, balance_after_minor, created_at_ms) ",
    );
    let mut rows = Vec::with_capacity(2 * batch.bookings.len());
    for booking in &batch.bookings {
        let transfer_id = *ids
            .get(&booking.txn_id)
            .ok_or_else(|| StorageError::corrupt("a settlement without its transfer"))?;
        let amount = booking.payee.amount_minor;
        for (account, amount, balance_after) in [
            (&booking.payer.account, -amount, booking.payer_balance_after),
            (&booking.payee.account, amount, booking.payee_balance_after),
        ] {
            rows.push([
                Value::from(transfer_id),
                Value::from(account.clone()),
                Value::from(amount),
                Value::from(balance_after),
                Value::from(booking.at_ms),
            ]);
        }
    }
    postings.rows(rows);
    writes.push(postings);

    let mut changed: Vec<(&str, i64)> = batch
        .accounts
        .values()
        .filter(|account| account.changed)
        .map(|account| (account.view.id.as_str(), account.view.balance_minor))
        .collect();
    changed.sort_unstable();
    let mut update = Statement::new("WITH v (id, balance) AS (");
    update
        .rows(
            changed
                .iter()
                .map(|&(id, balance)| [Value::from(id), Value::from(balance)]),
        )
        .sql(") UPDATE accounts SET balance_minor = v.balance FROM v WHERE accounts.id = v.id");
    writes.push(update);
    Ok(())
}

/// New payments are inserted; stored ones that changed are updated only while still pending.
fn write_transactions(batch: &Batch, writes: &mut Writes) {
    let mut new_rows: Vec<&TransactionRow> = Vec::new();
    let mut changed_rows: Vec<&TransactionRow> = Vec::new();
    for entry in batch.transactions.values().filter(|entry| entry.changed) {
        if entry.stored {
            changed_rows.push(&entry.row);
        } else {
            new_rows.push(&entry.row);
        }
    }
    let columns = TransactionRow::COLUMNS.join(", ");
    if !new_rows.is_empty() {
        let mut insert = Statement::new(&format!("INSERT INTO transactions ({columns}) "));
        insert.rows(new_rows.iter().map(|row| row.values()));
        writes.push(insert);
    }
    if !changed_rows.is_empty() {
        let assignments = TransactionRow::COLUMNS
            .iter()
            .skip(1) // the key
            .map(|column| format!("{column} = v.{column}"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut update = Statement::new(&format!("WITH v ({columns}) AS ("));
        update
            .rows(changed_rows.iter().map(|row| row.values()))
            .sql(&format!(
                ") UPDATE transactions SET {assignments} FROM v \
             WHERE transactions.txn_id = v.txn_id AND transactions.status = '{}'",
                TransactionStatus::Pending.as_str()
            ));
        writes.push_expecting(update, changed_rows.len(), lost_race);
    }
}
