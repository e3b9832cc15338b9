//! Terminals: registration, the one-time enrollment code, and the state rules.
//!
//! `pending` → (enrollment code) → `active` ⇄ `suspended`; any state → `revoked`, which is
//! final. A pending terminal may be suspended, but never made active except by its code, so a
//! suspended terminal that never enrolled stays out (revoke it and add a new one).

use diesel::prelude::*;
use nfcpay_protocol::TerminalId;

use super::StorageError;
use super::audit::AuditLog;
use super::connection::AnyConnection;
use super::error::EnrollmentRefusal;
use super::ledger;
use super::model::{NewTerminal, TerminalState, TerminalView};
use super::schema::terminals;

/// [`super::Storage::terminals`] returns at most this many.
pub const TERMINALS_LIST_MAX: i64 = 100_000;

pub(super) type TerminalRow = (
    String,
    String,
    String,
    String,
    Option<Vec<u8>>,
    i64,
    Option<i64>,
    Option<String>,
    i64,
);

pub(super) type TerminalColumns = (
    terminals::id,
    terminals::account_id,
    terminals::initial_key_id,
    terminals::state,
    terminals::enrollment_code_sha256,
    terminals::code_expires_at_ms,
    terminals::enrolled_at_ms,
    terminals::certificate_serial,
    terminals::highest_counter,
);

pub(super) const COLUMNS: TerminalColumns = (
    terminals::id,
    terminals::account_id,
    terminals::initial_key_id,
    terminals::state,
    terminals::enrollment_code_sha256,
    terminals::code_expires_at_ms,
    terminals::enrolled_at_ms,
    terminals::certificate_serial,
    terminals::highest_counter,
);

/// A terminal with its stored code hash (which never leaves this module).
pub(crate) struct TerminalRecord {
    pub(crate) view: TerminalView,
    code_sha256: Option<Vec<u8>>,
}

pub(super) fn record(row: TerminalRow) -> Result<TerminalRecord, StorageError> {
    let (
        id,
        account_id,
        initial_key_id,
        state,
        code_sha256,
        code_expires_at_ms,
        enrolled_at_ms,
        certificate_serial,
        highest_counter,
    ) = row;
    let corrupt = |what: &str, value: &str| StorageError::corrupt(format!("{what} {value:?}"));
    Ok(TerminalRecord {
        view: TerminalView {
            id: id.parse().map_err(|_| corrupt("terminal id", &id))?,
            account_id: account_id
                .parse()
                .map_err(|_| corrupt("account id", &account_id))?,
            initial_key_id: initial_key_id
                .parse()
                .map_err(|_| corrupt("initial key id", &initial_key_id))?,
            state: state.parse()?,
            code_expires_at_ms,
            enrolled_at_ms,
            certificate_serial,
            highest_counter,
        },
        code_sha256,
    })
}

/// Reads a terminal.
pub(crate) fn load(
    connection: &mut AnyConnection,
    id: &TerminalId,
) -> Result<Option<TerminalRecord>, StorageError> {
    terminals::table
        .find(id.as_str())
        .select(COLUMNS)
        .first::<TerminalRow>(connection)
        .optional()?
        .map(record)
        .transpose()
}

/// Reads a terminal, which must exist.
pub(crate) fn load_existing(
    connection: &mut AnyConnection,
    id: &TerminalId,
) -> Result<TerminalRecord, StorageError> {
    load(connection, id)?.ok_or_else(|| StorageError::UnknownTerminal(id.clone()))
}

/// On PostgreSQL, locks the terminal's row (its replay state) until the end of the transaction.
pub(crate) fn lock(connection: &mut AnyConnection, id: &TerminalId) -> Result<(), StorageError> {
    if let AnyConnection::Postgresql(postgres) = connection {
        diesel::sql_query("SELECT id FROM terminals WHERE id = $1 FOR UPDATE")
            .bind::<diesel::sql_types::Text, _>(id.as_str())
            .execute(postgres)?;
    }
    Ok(())
}

/// Every terminal, by identifier.
pub(crate) fn list(connection: &mut AnyConnection) -> Result<Vec<TerminalView>, StorageError> {
    terminals::table
        .order(terminals::id.asc())
        .limit(TERMINALS_LIST_MAX)
        .select(COLUMNS)
        .load::<TerminalRow>(connection)?
        .into_iter()
        .map(|row| record(row).map(|record| record.view))
        .collect()
}

/// Registers a terminal, pending enrollment.
pub(crate) fn add(
    connection: &mut AnyConnection,
    audit: &mut AuditLog,
    new: &NewTerminal,
    now_ms: i64,
) -> Result<(), StorageError> {
    ledger::load(connection, &new.account_id)?;
    if load(connection, &new.id)?.is_some() {
        return Err(StorageError::TerminalExists(new.id.clone()));
    }
    let initial_key_id = new.initial_key_id.to_string();
    let taken = terminals::table
        .filter(terminals::initial_key_id.eq(&initial_key_id))
        .select(terminals::id)
        .first::<String>(connection)
        .optional()?;
    if taken.is_some() {
        return Err(StorageError::InitialKeyIdInUse);
    }
    diesel::insert_into(terminals::table)
        .values((
            terminals::id.eq(new.id.as_str()),
            terminals::account_id.eq(new.account_id.as_str()),
            terminals::initial_key_id.eq(&initial_key_id),
            terminals::state.eq(TerminalState::Pending.as_str()),
            terminals::enrollment_code_sha256.eq(Some(new.code_sha256.as_slice())),
            terminals::code_expires_at_ms.eq(new.code_expires_at_ms),
            terminals::highest_counter.eq(0_i64),
            terminals::created_at_ms.eq(now_ms),
        ))
        .execute(connection)?;
    audit.record(
        now_ms,
        "terminal.added",
        new.id.as_str(),
        &serde_json::json!({
            "account_id": new.account_id.as_str(),
            "initial_key_id": initial_key_id,
            "code_expires_at_ms": new.code_expires_at_ms,
        }),
    );
    Ok(())
}

/// Whether the rules allow going from `from` to `to` (`enrolled`: the terminal has redeemed
/// its code).
fn allowed(from: TerminalState, to: TerminalState, enrolled: bool) -> bool {
    use TerminalState::{Active, Pending, Revoked, Suspended};
    match (from, to) {
        (Revoked, _) | (_, Pending) => false,
        (_, Revoked) => true,
        (Pending | Active, Suspended) => true,
        (Suspended, Active) => enrolled,
        _ => false,
    }
}

/// Suspends, reactivates or revokes a terminal.
pub(crate) fn set_state(
    connection: &mut AnyConnection,
    audit: &mut AuditLog,
    id: &TerminalId,
    to: TerminalState,
    now_ms: i64,
) -> Result<(), StorageError> {
    lock(connection, id)?;
    let terminal = load_existing(connection, id)?.view;
    let from = terminal.state;
    if from == to {
        return Ok(());
    }
    if !allowed(from, to, terminal.enrolled_at_ms.is_some()) {
        return Err(StorageError::InvalidStateChange { from, to });
    }
    diesel::update(terminals::table.find(id.as_str()))
        .set(terminals::state.eq(to.as_str()))
        .execute(connection)?;
    audit.record(
        now_ms,
        "terminal.state",
        id.as_str(),
        &serde_json::json!({ "from": from.as_str(), "to": to.as_str() }),
    );
    Ok(())
}

/// Compares two byte strings in time that depends only on their lengths (`subtle`).
fn constant_time_eq(left: &[u8], right: &[u8]) -> bool {
    use subtle::ConstantTimeEq as _;
    left.ct_eq(right).into()
}

/// Why `terminal` may not redeem `code_sha256` at `now_ms`, if it may not. The hashes are
/// compared in constant time.
fn code_refusal(
    terminal: &TerminalRecord,
    code_sha256: &[u8; 32],
    now_ms: i64,
) -> Option<EnrollmentRefusal> {
    match terminal.view.state {
        TerminalState::Pending => {}
        _ if terminal.view.enrolled_at_ms.is_some() => return Some(EnrollmentRefusal::AlreadyUsed),
        _ => return Some(EnrollmentRefusal::NotPending),
    }
    let Some(stored) = &terminal.code_sha256 else {
        return Some(EnrollmentRefusal::AlreadyUsed);
    };
    if !constant_time_eq(stored, code_sha256) {
        return Some(EnrollmentRefusal::WrongCode);
    }
    if now_ms > terminal.view.code_expires_at_ms {
        return Some(EnrollmentRefusal::Expired);
    }
    None
}

/// Checks the one-time enrollment code as [`redeem`] would, without redeeming it or writing
/// anything: lets enrollment refuse a stranger before it asks the HSM for any work.
pub(crate) fn check_code(
    connection: &mut AnyConnection,
    id: &TerminalId,
    code_sha256: &[u8; 32],
    now_ms: i64,
) -> Result<TerminalView, StorageError> {
    let terminal = load_existing(connection, id)?;
    match code_refusal(&terminal, code_sha256, now_ms) {
        Some(why) => Err(StorageError::EnrollmentRefused(why)),
        None => Ok(terminal.view),
    }
}

/// Redeems the one-time enrollment code: pending → active, the code's hash erased.
pub(crate) fn redeem(
    connection: &mut AnyConnection,
    audit: &mut AuditLog,
    id: &TerminalId,
    code_sha256: [u8; 32],
    now_ms: i64,
    certificate_serial: &str,
) -> Result<TerminalView, StorageError> {
    lock(connection, id)?;
    let terminal = load_existing(connection, id)?;
    if let Some(why) = code_refusal(&terminal, &code_sha256, now_ms) {
        return Err(StorageError::EnrollmentRefused(why));
    }
    diesel::update(terminals::table.find(id.as_str()))
        .set((
            terminals::state.eq(TerminalState::Active.as_str()),
            terminals::enrollment_code_sha256.eq(None::<Vec<u8>>),
            terminals::enrolled_at_ms.eq(Some(now_ms)),
            terminals::certificate_serial.eq(Some(certificate_serial)),
        ))
        .execute(connection)?;
    audit.record(
        now_ms,
        "terminal.enrolled",
        id.as_str(),
        &serde_json::json!({ "certificate_serial": certificate_serial }),
    );
    Ok(load_existing(connection, id)?.view)
}

/// Records `certificate_serial` as the terminal's enrolled certificate, superseding the one
/// it had (what a re-enrollment does; only a test hook calls it for now).
pub(crate) fn replace_certificate_serial(
    connection: &mut AnyConnection,
    audit: &mut AuditLog,
    id: &TerminalId,
    certificate_serial: &str,
    now_ms: i64,
) -> Result<(), StorageError> {
    lock(connection, id)?;
    let terminal = load_existing(connection, id)?.view;
    diesel::update(terminals::table.find(id.as_str()))
        .set(terminals::certificate_serial.eq(Some(certificate_serial)))
        .execute(connection)?;
    audit.record(
        now_ms,
        "terminal.certificate_replaced",
        id.as_str(),
        &serde_json::json!({
            "from": terminal.certificate_serial,
            "to": certificate_serial,
        }),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use TerminalState::{Active, Pending, Revoked, Suspended};

    #[test]
    fn revoked_is_final_and_only_enrollment_activates() {
        for to in [Pending, Active, Suspended] {
            assert!(!allowed(Revoked, to, true));
        }
        assert!(!allowed(Pending, Active, false));
        assert!(!allowed(Suspended, Active, false));
        assert!(allowed(Suspended, Active, true));
        assert!(allowed(Active, Suspended, true));
        assert!(allowed(Pending, Revoked, false));
        assert!(!allowed(Active, Pending, true));
    }

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
