//! The ledger storage suite: every test runs against SQLite, and against PostgreSQL when
//! `NFCPAY_TEST_DATABASE_URL` is set (each PostgreSQL test gets its own schema, dropped after).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// Amounts are written as units_cents (100_00 is 100.00 EUR).
#![allow(clippy::inconsistent_digit_grouping)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use diesel::Connection as _;
use diesel::connection::SimpleConnection as _;
use nfcpay_daemon::pki::CertificateSerial;
use nfcpay_daemon::storage::{
    AcceptedHalf, DatabaseConfig, EnrollmentRefusal, HalfContent, NewTerminal, Storage,
    StorageError, TerminalState, TransactionStatus, TransactionView, WriterFault,
};
use nfcpay_protocol::{AccountId, Amount, Currency, InitialKeyId, Ksn, TerminalId, TxnId};
use sha2::{Digest as _, Sha256};

const NOW_MS: i64 = 1_800_000_000_000;
const LIFETIME_MS: i64 = 60_000;

// ---------------------------------------------------------------------------------------
// Databases

/// A database for one test; removed on drop.
struct Db {
    url: String,
    sqlite_path: Option<std::path::PathBuf>,
    _directory: Option<tempfile::TempDir>,
    postgres: Option<(String, String)>,
}

fn unique() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{}_{}_{}",
        std::process::id(),
        nanos,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

impl Db {
    fn sqlite() -> Self {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("ledger.db");
        Self {
            url: format!("sqlite://{}", path.display()),
            sqlite_path: Some(path),
            _directory: Some(directory),
            postgres: None,
        }
    }

    fn postgres() -> Option<Self> {
        let base = nfcpay_daemon::testing::postgres_url("PostgreSQL case")?;
        let schema = format!("t_{}", unique());
        diesel::PgConnection::establish(&base)
            .unwrap()
            .batch_execute(&format!("CREATE SCHEMA {schema}"))
            .unwrap();
        let separator = if base.contains('?') { '&' } else { '?' };
        Some(Self {
            url: format!("{base}{separator}options=-csearch_path%3D{schema}"),
            sqlite_path: None,
            _directory: None,
            postgres: Some((base, schema)),
        })
    }

    fn open(&self) -> Storage {
        Storage::open(&self.url).unwrap()
    }

    /// Runs SQL behind the storage's back (to tamper with it).
    fn execute(&self, sql: &str) -> diesel::QueryResult<()> {
        match &self.sqlite_path {
            Some(path) => diesel::SqliteConnection::establish(path.to_str().unwrap())
                .unwrap()
                .batch_execute(sql),
            None => diesel::PgConnection::establish(&self.url)
                .unwrap()
                .batch_execute(sql),
        }
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        if let Some((base, schema)) = &self.postgres
            && let Ok(mut connection) = diesel::PgConnection::establish(base)
        {
            let _ = connection.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"));
        }
    }
}

/// Every test, once per database.
macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[test] fn $name() { super::$name(&super::Db::sqlite()) })*
        }
        mod postgres {
            $(#[test] fn $name() {
                if let Some(db) = super::Db::postgres() { super::$name(&db) }
            })*
        }
    };
}

suite!(
    settles_a_then_b_with_balanced_postings,
    settles_b_then_a,
    resent_halves_get_the_same_answer,
    conflicting_half_is_refused_and_changes_nothing,
    replayed_counter_with_other_bytes_is_refused,
    stale_counter_is_refused_and_window_admits_out_of_order,
    each_mismatch_is_refused_and_changes_nothing,
    account_currency_must_be_the_amounts,
    insufficient_funds_is_refused_and_changes_nothing,
    credit_limit_allows_a_negative_balance_down_to_it,
    expired_request_is_refused_and_expires_later,
    lone_half_b_expires,
    suspended_revoked_and_pending_terminals_are_refused,
    a_half_under_a_superseded_certificate_is_refused,
    terminal_state_rules,
    enrollment_code_works_once_unexpired_and_exact,
    enrollment_code_check_refuses_alike_and_redeems_nothing,
    audit_chain_verifies_and_detects_tampering,
    signed_checkpoints_catch_a_cut_chain_and_a_wrong_key,
    group_commit_settles_200_concurrent_payments,
    both_halves_in_one_batch_answer_pending_then_settled,
    a_batch_costs_the_same_statements_whatever_its_size,
    two_storages_racing_the_halves_settle_exactly_once,
    accounts_refuse_bad_input,
    a_panicking_batch_fails_alone_and_the_writer_carries_on,
    a_stopped_writer_fails_the_health_check,
    a_write_not_committed_in_time_is_answered_unavailable_and_later_work_goes_on,
    a_broken_pooled_connection_is_replaced_without_an_error,
    an_async_half_settles_and_its_wait_is_bounded_like_a_blocking_one,
    the_writer_waits_for_halves_on_their_way_and_only_for_them,
    the_commit_delay_never_costs_a_caller_its_deadline,
    a_second_writer_commits_while_the_first_holds_its_batch,
);

// ---------------------------------------------------------------------------------------
// A small world: two terminals with their accounts, and a third for mismatches.

fn eur() -> Currency {
    "EUR".parse().unwrap()
}

fn account(id: &str) -> AccountId {
    id.parse().unwrap()
}

fn terminal(id: &str) -> TerminalId {
    id.parse().unwrap()
}

fn eur_amount(minor: u64) -> Amount {
    Amount::new(minor, eur()).unwrap()
}

fn initial_key_id(n: u8) -> InitialKeyId {
    InitialKeyId::from([0x12, 0x34, 0x56, 0x78, 0, 0, 0, n])
}

fn code_hash(code: &str) -> [u8; 32] {
    Sha256::digest(code.as_bytes()).into()
}

fn txn(n: u32) -> TxnId {
    let mut bytes = [0xA5; 16];
    bytes[12..].copy_from_slice(&n.to_be_bytes());
    TxnId::try_from(bytes).unwrap()
}

struct Party {
    terminal: TerminalId,
    account: AccountId,
    key: InitialKeyId,
    /// Its enrolled client certificate's serial.
    serial: CertificateSerial,
}

struct World {
    storage: Storage,
    payee: Party,
    payer: Party,
    other: Party,
}

fn add_party(storage: &Storage, name: &str, n: u8, currency: Currency, funds: u64) -> Party {
    let party = Party {
        terminal: terminal(&format!("term-{name}")),
        account: account(&format!("acct-{name}")),
        key: initial_key_id(n),
        serial: format!("{n:02x}").parse().unwrap(),
    };
    storage.create_account(&party.account, currency, 0).unwrap();
    if funds > 0 {
        storage
            .fund(&party.account, Amount::new(funds, currency).unwrap())
            .unwrap();
    }
    storage
        .add_terminal(NewTerminal {
            id: party.terminal.clone(),
            account_id: party.account.clone(),
            initial_key_id: party.key,
            code_sha256: code_hash(name),
            code_expires_at_ms: NOW_MS + 3_600_000,
        })
        .unwrap();
    storage
        .redeem_enrollment_code(
            &party.terminal,
            code_hash(name),
            NOW_MS,
            &party.serial.to_string(),
        )
        .unwrap();
    party
}

fn world(db: &Db) -> World {
    world_on(db.open())
}

fn world_on(storage: Storage) -> World {
    World {
        payee: add_party(&storage, "payee", 1, eur(), 0),
        payer: add_party(&storage, "payer", 2, eur(), 100_00),
        other: add_party(&storage, "other", 3, eur(), 0),
        storage,
    }
}

fn ksn(party: &Party, counter: u32) -> Ksn {
    Ksn::new(party.key, counter.try_into().unwrap())
}

fn request_digest(txn_id: TxnId) -> [u8; 32] {
    Sha256::digest(txn_id.to_bytes()).into()
}

/// The envelope hash is derived from everything the half says, so equal halves are
/// "byte-identical" and any change makes other bytes.
fn sealed(mut half: AcceptedHalf) -> AcceptedHalf {
    half.envelope_sha256 = Sha256::digest(format!("{:?}{:?}", half.ksn, half.content)).into();
    half
}

fn half_a(w: &World, txn_id: TxnId, counter: u32, amount: Amount) -> AcceptedHalf {
    sealed(AcceptedHalf {
        txn_id,
        terminal_id: w.payee.terminal.clone(),
        certificate_serial: w.payee.serial,
        ksn: ksn(&w.payee, counter),
        envelope_sha256: [0; 32],
        received_at_ms: NOW_MS,
        content: HalfContent::A {
            request_digest: request_digest(txn_id),
            payee_account: w.payee.account.clone(),
            amount,
            expires_at_ms: NOW_MS + LIFETIME_MS,
        },
    })
}

fn half_b(w: &World, txn_id: TxnId, counter: u32, amount: Amount) -> AcceptedHalf {
    sealed(AcceptedHalf {
        txn_id,
        terminal_id: w.payer.terminal.clone(),
        certificate_serial: w.payer.serial,
        ksn: ksn(&w.payer, counter),
        envelope_sha256: [0; 32],
        received_at_ms: NOW_MS,
        content: HalfContent::B {
            request_digest: request_digest(txn_id),
            payer_account: w.payer.account.clone(),
            payee_terminal: w.payee.terminal.clone(),
            amount,
        },
    })
}

/// Rewrites half B's content (and so its envelope).
fn with_b(
    mut half: AcceptedHalf,
    change: impl FnOnce(&mut [u8; 32], &mut AccountId, &mut TerminalId, &mut Amount),
) -> AcceptedHalf {
    if let HalfContent::B {
        request_digest,
        payer_account,
        payee_terminal,
        amount,
    } = &mut half.content
    {
        change(request_digest, payer_account, payee_terminal, amount);
    }
    sealed(half)
}

fn balance(w: &World, id: &AccountId) -> i64 {
    w.storage.account(id).unwrap().balance_minor
}

fn funding_balance(w: &World) -> i64 {
    balance(w, &account("__funding-EUR"))
}

fn assert_refused(
    w: &World,
    half: AcceptedHalf,
    now_ms: i64,
    expected: impl Fn(&StorageError) -> bool,
) {
    let before = w.storage.dump_state().unwrap();
    let audit_before = w.storage.audit_verify().unwrap().records;
    match w.storage.submit_half(half, now_ms) {
        Err(error) if expected(&error) => {}
        other => panic!("unexpected answer {other:?}"),
    }
    assert_eq!(
        w.storage.dump_state().unwrap(),
        before,
        "a refused half changed state"
    );
    assert_eq!(w.storage.audit_verify().unwrap().records, audit_before);
}

// ---------------------------------------------------------------------------------------
// Settlement

fn settles_a_then_b_with_balanced_postings(db: &Db) {
    let w = world(db);
    let pending = w
        .storage
        .submit_half(half_a(&w, txn(1), 1, eur_amount(12_50)), NOW_MS)
        .unwrap();
    assert_eq!(pending.status, TransactionStatus::Pending);
    assert_eq!(pending.payee_terminal, w.payee.terminal);
    assert_eq!(pending.payer_terminal, None);
    assert_eq!(pending.settlement_id, None);
    assert_eq!(pending.expires_at_ms, NOW_MS + LIFETIME_MS);
    assert_eq!(w.storage.transaction(&txn(1)).unwrap(), Some(pending));

    let settled = w
        .storage
        .submit_half(half_b(&w, txn(1), 1, eur_amount(12_50)), NOW_MS + 5)
        .unwrap();
    assert_eq!(settled.status, TransactionStatus::Settled);
    assert_eq!(settled.payer_account, Some(w.payer.account.clone()));
    assert_eq!(settled.payee_account, Some(w.payee.account.clone()));
    assert_eq!(settled.half_a_ksn, Some(ksn(&w.payee, 1)));
    assert_eq!(settled.half_b_ksn, Some(ksn(&w.payer, 1)));
    assert_eq!(settled.settled_at_ms, Some(NOW_MS + 5));
    assert_eq!(settled.request_digest, request_digest(txn(1)));
    assert!(settled.settlement_id.is_some());
    assert_eq!(
        w.storage.transaction(&txn(1)).unwrap(),
        Some(settled.clone())
    );

    assert_eq!(balance(&w, &w.payer.account), 100_00 - 12_50);
    assert_eq!(balance(&w, &w.payee.account), 12_50);
    let total = balance(&w, &w.payer.account)
        + balance(&w, &w.payee.account)
        + balance(&w, &w.other.account)
        + funding_balance(&w);
    assert_eq!(total, 0, "balances per currency sum to zero");

    let payee_postings = w.storage.postings(&w.payee.account).unwrap();
    assert_eq!(payee_postings.len(), 1);
    assert_eq!(payee_postings[0].amount_minor, 12_50);
    assert_eq!(payee_postings[0].balance_after_minor, 12_50);
    let settlement_id = i64::try_from(settled.settlement_id.unwrap()).unwrap();
    assert_eq!(payee_postings[0].transfer_id, settlement_id);
    let payer_postings = w.storage.postings(&w.payer.account).unwrap();
    assert_eq!(payer_postings.len(), 2, "funding and payment");
    assert_eq!(payer_postings[1].amount_minor, -12_50);
    assert_eq!(payer_postings[1].balance_after_minor, 100_00 - 12_50);
    let all: i64 = [
        &w.payer.account,
        &w.payee.account,
        &w.other.account,
        &account("__funding-EUR"),
    ]
    .iter()
    .flat_map(|id| w.storage.postings(id).unwrap())
    .map(|posting| posting.amount_minor)
    .sum();
    assert_eq!(all, 0, "postings per currency sum to zero");
    assert_eq!(
        w.storage
            .terminal(&w.payer.terminal)
            .unwrap()
            .unwrap()
            .highest_counter,
        1
    );
    w.storage.check_health().unwrap();
}

fn settles_b_then_a(db: &Db) {
    let w = world(db);
    let pending = w
        .storage
        .submit_half(half_b(&w, txn(2), 7, eur_amount(3_00)), NOW_MS)
        .unwrap();
    assert_eq!(pending.status, TransactionStatus::Pending);
    assert_eq!(
        pending.payee_terminal, w.payee.terminal,
        "B's claim while A is missing"
    );
    assert_eq!(pending.payee_account, None);
    let settled = w
        .storage
        .submit_half(half_a(&w, txn(2), 9, eur_amount(3_00)), NOW_MS)
        .unwrap();
    assert_eq!(settled.status, TransactionStatus::Settled);
    assert_eq!(settled.expires_at_ms, NOW_MS + LIFETIME_MS, "A's expiry");
    assert_eq!(balance(&w, &w.payee.account), 3_00);
}

fn resent_halves_get_the_same_answer(db: &Db) {
    let w = world(db);
    let a = half_a(&w, txn(3), 1, eur_amount(1_00));
    let b = half_b(&w, txn(3), 1, eur_amount(1_00));
    let pending = w.storage.submit_half(a.clone(), NOW_MS).unwrap();
    let dump = w.storage.dump_state().unwrap();
    assert_eq!(
        w.storage.submit_half(a.clone(), NOW_MS + 1).unwrap(),
        pending
    );
    assert_eq!(w.storage.dump_state().unwrap(), dump);

    let settled = w.storage.submit_half(b.clone(), NOW_MS).unwrap();
    let dump = w.storage.dump_state().unwrap();
    assert_eq!(w.storage.submit_half(b, NOW_MS + 1).unwrap(), settled);
    assert_eq!(w.storage.submit_half(a, NOW_MS + 2).unwrap(), settled);
    assert_eq!(w.storage.dump_state().unwrap(), dump);
    assert_eq!(balance(&w, &w.payee.account), 1_00, "settled once");
}

fn conflicting_half_is_refused_and_changes_nothing(db: &Db) {
    let w = world(db);
    w.storage
        .submit_half(half_a(&w, txn(4), 1, eur_amount(1_00)), NOW_MS)
        .unwrap();
    let other_a = half_a(&w, txn(4), 2, eur_amount(9_00));
    assert_refused(&w, other_a, NOW_MS, |e| matches!(e, StorageError::Conflict));
    w.storage
        .submit_half(half_b(&w, txn(4), 1, eur_amount(1_00)), NOW_MS)
        .unwrap();
    let other_b = half_b(&w, txn(4), 2, eur_amount(9_00));
    assert_refused(&w, other_b, NOW_MS, |e| matches!(e, StorageError::Conflict));
    let other_a = half_a(&w, txn(4), 3, eur_amount(9_00));
    assert_refused(&w, other_a, NOW_MS, |e| matches!(e, StorageError::Conflict));
}

fn replayed_counter_with_other_bytes_is_refused(db: &Db) {
    let w = world(db);
    w.storage
        .submit_half(half_a(&w, txn(5), 40, eur_amount(1_00)), NOW_MS)
        .unwrap();
    // Same counter, another payment.
    let replay = half_a(&w, txn(6), 40, eur_amount(1_00));
    assert_refused(&w, replay, NOW_MS, |e| {
        matches!(e, StorageError::ReplayedKsn)
    });
    // Same counter, same payment, other bytes.
    let replay = half_a(&w, txn(5), 40, eur_amount(2_00));
    assert_refused(&w, replay, NOW_MS, |e| {
        matches!(e, StorageError::ReplayedKsn)
    });
}

fn stale_counter_is_refused_and_window_admits_out_of_order(db: &Db) {
    let w = world(db);
    w.storage
        .submit_half(half_a(&w, txn(10), 2000, eur_amount(1_00)), NOW_MS)
        .unwrap();
    // 2000 − 1024 = 976: at or below is stale.
    let stale = half_a(&w, txn(11), 976, eur_amount(1_00));
    assert_refused(&w, stale, NOW_MS, |e| matches!(e, StorageError::StaleKsn));
    for (n, counter) in [(12, 977), (13, 1500), (14, 1200), (15, 1999)] {
        let view = w
            .storage
            .submit_half(half_a(&w, txn(n), counter, eur_amount(1_00)), NOW_MS)
            .unwrap();
        assert_eq!(view.status, TransactionStatus::Pending);
    }
    assert_eq!(
        w.storage
            .terminal(&w.payee.terminal)
            .unwrap()
            .unwrap()
            .highest_counter,
        2000
    );
    // A higher counter moves the window.
    w.storage
        .submit_half(half_a(&w, txn(16), 3000, eur_amount(1_00)), NOW_MS)
        .unwrap();
    let stale = half_a(&w, txn(17), 1976, eur_amount(1_00));
    assert_refused(&w, stale, NOW_MS, |e| matches!(e, StorageError::StaleKsn));
}

fn each_mismatch_is_refused_and_changes_nothing(db: &Db) {
    let w = world(db);
    w.storage
        .submit_half(half_a(&w, txn(20), 1, eur_amount(5_00)), NOW_MS)
        .unwrap();
    let good_b = half_b(&w, txn(20), 1, eur_amount(5_00));
    let usd: Currency = "USD".parse().unwrap();
    let cases: Vec<(AcceptedHalf, &str)> = vec![
        (
            with_b(good_b.clone(), |_, _, _, amount| *amount = eur_amount(5_01)),
            "amount",
        ),
        (
            with_b(good_b.clone(), |_, _, _, amount| {
                *amount = Amount::new(5_00, usd).unwrap()
            }),
            "currency",
        ),
        (
            with_b(good_b.clone(), |_, _, payee, _| {
                *payee = terminal("term-other")
            }),
            "payee_terminal",
        ),
    ];
    for (half, field) in cases {
        assert_refused(
            &w,
            half,
            NOW_MS,
            |e| matches!(e, StorageError::Mismatch { field: f } if *f == field),
        );
    }
    let wrong_digest = with_b(good_b.clone(), |digest, _, _, _| digest[0] ^= 1);
    assert_refused(&w, wrong_digest, NOW_MS, |e| {
        matches!(e, StorageError::DigestMismatch)
    });
    // The payer's account is not the payer terminal's.
    let not_its_account = with_b(good_b.clone(), |_, payer, _, _| {
        *payer = w.other.account.clone()
    });
    assert_refused(&w, not_its_account, NOW_MS, |e| {
        matches!(e, StorageError::AccountMismatch)
    });
    // Both halves from the payee terminal.
    let mut same_terminal = good_b.clone();
    same_terminal.terminal_id = w.payee.terminal.clone();
    same_terminal.certificate_serial = w.payee.serial;
    same_terminal.ksn = ksn(&w.payee, 2);
    let same_terminal = with_b(same_terminal, |_, payer, _, _| {
        *payer = w.payee.account.clone()
    });
    assert_refused(&w, same_terminal, NOW_MS, |e| {
        matches!(e, StorageError::Mismatch { field: "parties" })
    });
    // A KSN of another terminal.
    let mut foreign_ksn = good_b.clone();
    foreign_ksn.ksn = ksn(&w.other, 1);
    assert_refused(&w, sealed(foreign_ksn), NOW_MS, |e| {
        matches!(e, StorageError::KsnNotTerminal)
    });
    // Nothing was consumed: the right half with the same counter still settles.
    let settled = w.storage.submit_half(good_b, NOW_MS).unwrap();
    assert_eq!(settled.status, TransactionStatus::Settled);
}

fn account_currency_must_be_the_amounts(db: &Db) {
    let w = world(db);
    let usd: Currency = "USD".parse().unwrap();
    let dollars = add_party(&w.storage, "dollars", 4, usd, 0);
    let mut a = half_a(&w, txn(21), 1, eur_amount(1_00));
    a.terminal_id = dollars.terminal.clone();
    a.certificate_serial = dollars.serial;
    a.ksn = ksn(&dollars, 1);
    if let HalfContent::A { payee_account, .. } = &mut a.content {
        *payee_account = dollars.account.clone();
    }
    assert_refused(&w, sealed(a), NOW_MS, |e| {
        matches!(
            e,
            StorageError::Mismatch {
                field: "payee_account_currency"
            }
        )
    });
}

fn insufficient_funds_is_refused_and_changes_nothing(db: &Db) {
    let w = world(db);
    w.storage
        .submit_half(half_a(&w, txn(30), 1, eur_amount(100_01)), NOW_MS)
        .unwrap();
    let b = half_b(&w, txn(30), 1, eur_amount(100_01));
    assert_refused(&w, b.clone(), NOW_MS, |e| {
        matches!(e, StorageError::InsufficientFunds)
    });
    w.storage.fund(&w.payer.account, eur_amount(1)).unwrap();
    let settled = w.storage.submit_half(b, NOW_MS).unwrap();
    assert_eq!(settled.status, TransactionStatus::Settled);
    assert_eq!(balance(&w, &w.payer.account), 0);
}

fn credit_limit_allows_a_negative_balance_down_to_it(db: &Db) {
    let storage = db.open();
    let payee = add_party(&storage, "payee", 1, eur(), 0);
    let credit = Party {
        terminal: terminal("term-credit"),
        account: account("acct-credit"),
        key: initial_key_id(9),
        serial: "09".parse().unwrap(),
    };
    storage
        .create_account(&credit.account, eur(), -5_00)
        .unwrap();
    storage
        .add_terminal(NewTerminal {
            id: credit.terminal.clone(),
            account_id: credit.account.clone(),
            initial_key_id: credit.key,
            code_sha256: code_hash("credit"),
            code_expires_at_ms: NOW_MS + 1,
        })
        .unwrap();
    storage
        .redeem_enrollment_code(&credit.terminal, code_hash("credit"), NOW_MS, "09")
        .unwrap();
    let other = add_party(&storage, "other", 3, eur(), 0);
    let w = World {
        storage,
        payee,
        payer: credit,
        other,
    };
    w.storage
        .submit_half(half_a(&w, txn(31), 1, eur_amount(5_00)), NOW_MS)
        .unwrap();
    w.storage
        .submit_half(half_b(&w, txn(31), 1, eur_amount(5_00)), NOW_MS)
        .unwrap();
    assert_eq!(balance(&w, &w.payer.account), -5_00);
    w.storage
        .submit_half(half_a(&w, txn(32), 2, eur_amount(1)), NOW_MS)
        .unwrap();
    let b = half_b(&w, txn(32), 2, eur_amount(1));
    assert_refused(&w, b, NOW_MS, |e| {
        matches!(e, StorageError::InsufficientFunds)
    });
}

fn expired_request_is_refused_and_expires_later(db: &Db) {
    let w = world(db);
    w.storage
        .submit_half(half_a(&w, txn(40), 1, eur_amount(1_00)), NOW_MS)
        .unwrap();
    let late = NOW_MS + LIFETIME_MS + 1;
    let b = half_b(&w, txn(40), 1, eur_amount(1_00));
    assert_refused(&w, b.clone(), late, |e| matches!(e, StorageError::Expired));
    assert_eq!(
        w.storage.transaction(&txn(40)).unwrap().unwrap().status,
        TransactionStatus::Pending
    );
    // At the expiry instant it may still settle; expire_unmatched only takes what has passed.
    assert_eq!(w.storage.expire_unmatched(NOW_MS + LIFETIME_MS).unwrap(), 0);
    let records = w.storage.audit_verify().unwrap().records;
    assert_eq!(w.storage.expire_unmatched(late).unwrap(), 1);
    assert_eq!(w.storage.expire_unmatched(late).unwrap(), 0);
    assert_eq!(w.storage.audit_verify().unwrap().records, records + 1);
    let view = w.storage.transaction(&txn(40)).unwrap().unwrap();
    assert_eq!(view.status, TransactionStatus::Expired);
    assert_refused(&w, b, NOW_MS, |e| matches!(e, StorageError::Expired));
    // The expired half A re-sent gets its (expired) answer.
    let again = w
        .storage
        .submit_half(half_a(&w, txn(40), 1, eur_amount(1_00)), late)
        .unwrap();
    assert_eq!(again, view);
    assert_eq!(balance(&w, &w.payer.account), 100_00);
}

fn lone_half_b_expires(db: &Db) {
    let w = world(db);
    let pending = w
        .storage
        .submit_half(half_b(&w, txn(41), 1, eur_amount(1_00)), NOW_MS)
        .unwrap();
    assert_eq!(pending.expires_at_ms, NOW_MS + 600_000);
    assert_eq!(w.storage.expire_unmatched(NOW_MS + 600_001).unwrap(), 1);
    let a = half_a(&w, txn(41), 1, eur_amount(1_00));
    assert_refused(&w, a, NOW_MS, |e| matches!(e, StorageError::Expired));
}

fn suspended_revoked_and_pending_terminals_are_refused(db: &Db) {
    let w = world(db);
    let a = half_a(&w, txn(50), 1, eur_amount(1_00));
    w.storage
        .set_terminal_state(&w.payee.terminal, TerminalState::Suspended)
        .unwrap();
    assert_refused(&w, a.clone(), NOW_MS, |e| {
        matches!(e, StorageError::TerminalNotActive(TerminalState::Suspended))
    });
    w.storage
        .set_terminal_state(&w.payee.terminal, TerminalState::Active)
        .unwrap();
    w.storage.submit_half(a, NOW_MS).unwrap();
    w.storage
        .set_terminal_state(&w.payer.terminal, TerminalState::Revoked)
        .unwrap();
    let b = half_b(&w, txn(50), 1, eur_amount(1_00));
    assert_refused(&w, b, NOW_MS, |e| {
        matches!(e, StorageError::TerminalNotActive(TerminalState::Revoked))
    });
    // Registered but never enrolled.
    let fresh = Party {
        terminal: terminal("term-fresh"),
        account: w.payer.account.clone(),
        key: initial_key_id(7),
        serial: "07".parse().unwrap(),
    };
    w.storage
        .add_terminal(NewTerminal {
            id: fresh.terminal.clone(),
            account_id: fresh.account.clone(),
            initial_key_id: fresh.key,
            code_sha256: code_hash("fresh"),
            code_expires_at_ms: NOW_MS + 1,
        })
        .unwrap();
    let mut b = half_b(&w, txn(50), 1, eur_amount(1_00));
    b.terminal_id = fresh.terminal.clone();
    b.ksn = ksn(&fresh, 1);
    assert_refused(&w, sealed(b), NOW_MS, |e| {
        matches!(e, StorageError::TerminalNotActive(TerminalState::Pending))
    });
    let mut unknown = half_b(&w, txn(50), 1, eur_amount(1_00));
    unknown.terminal_id = terminal("term-nobody");
    assert_refused(&w, sealed(unknown), NOW_MS, |e| {
        matches!(e, StorageError::UnknownTerminal(_))
    });
}

/// The ledger checks the half's client certificate against the terminal's enrolled one in the
/// transaction that would record it: another serial (one a re-enrollment superseded) is
/// refused and changes nothing; the enrolled one is accepted.
fn a_half_under_a_superseded_certificate_is_refused(db: &Db) {
    let w = world(db);
    let mut a = half_a(&w, txn(51), 1, eur_amount(1_00));
    a.certificate_serial = "4001".parse().unwrap();
    assert_refused(&w, a, NOW_MS, |e| {
        matches!(e, StorageError::CertificateNotEnrolled)
    });
    // Re-enrolled: the certificate it had is now the superseded one.
    w.storage
        .danger_replace_certificate_serial(&w.payee.terminal, "4001")
        .unwrap();
    let old = half_a(&w, txn(51), 1, eur_amount(1_00));
    assert_refused(&w, old.clone(), NOW_MS, |e| {
        matches!(e, StorageError::CertificateNotEnrolled)
    });
    let mut new = old;
    new.certificate_serial = "4001".parse().unwrap();
    w.storage.submit_half(new, NOW_MS).unwrap();
}

fn terminal_state_rules(db: &Db) {
    let w = world(db);
    let id = &w.other.terminal;
    w.storage
        .set_terminal_state(id, TerminalState::Revoked)
        .unwrap();
    for to in [
        TerminalState::Active,
        TerminalState::Suspended,
        TerminalState::Pending,
    ] {
        assert!(matches!(
            w.storage.set_terminal_state(id, to),
            Err(StorageError::InvalidStateChange {
                from: TerminalState::Revoked,
                ..
            })
        ));
    }
    let listed = w.storage.terminals().unwrap();
    assert_eq!(listed.len(), 3);
    assert_eq!(
        listed.iter().find(|t| &t.id == id).unwrap().state,
        TerminalState::Revoked
    );
    assert!(matches!(
        w.storage
            .set_terminal_state(&terminal("term-nobody"), TerminalState::Suspended),
        Err(StorageError::UnknownTerminal(_))
    ));
}

fn enrollment_code_works_once_unexpired_and_exact(db: &Db) {
    let storage = db.open();
    storage
        .create_account(&account("acct-e"), eur(), 0)
        .unwrap();
    for (name, n) in [("e1", 1), ("e2", 2)] {
        storage
            .add_terminal(NewTerminal {
                id: terminal(name),
                account_id: account("acct-e"),
                initial_key_id: initial_key_id(n),
                code_sha256: code_hash(name),
                code_expires_at_ms: NOW_MS,
            })
            .unwrap();
    }
    let refused = |result: Result<_, StorageError>, why| {
        assert!(
            matches!(result, Err(StorageError::EnrollmentRefused(r)) if r == why),
            "{result:?}"
        );
    };
    refused(
        storage.redeem_enrollment_code(&terminal("e1"), code_hash("wrong"), NOW_MS, "s"),
        EnrollmentRefusal::WrongCode,
    );
    refused(
        storage.redeem_enrollment_code(&terminal("e2"), code_hash("e2"), NOW_MS + 1, "s"),
        EnrollmentRefusal::Expired,
    );
    let view = storage
        .redeem_enrollment_code(&terminal("e1"), code_hash("e1"), NOW_MS, "serial-e1")
        .unwrap();
    assert_eq!(view.state, TerminalState::Active);
    assert_eq!(view.enrolled_at_ms, Some(NOW_MS));
    assert_eq!(view.certificate_serial.as_deref(), Some("serial-e1"));
    refused(
        storage.redeem_enrollment_code(&terminal("e1"), code_hash("e1"), NOW_MS, "s"),
        EnrollmentRefusal::AlreadyUsed,
    );
    assert!(matches!(
        storage.add_terminal(NewTerminal {
            id: terminal("e3"),
            account_id: account("acct-e"),
            initial_key_id: initial_key_id(1),
            code_sha256: code_hash("e3"),
            code_expires_at_ms: NOW_MS,
        }),
        Err(StorageError::InitialKeyIdInUse)
    ));
    assert!(matches!(
        storage.add_terminal(NewTerminal {
            id: terminal("e1"),
            account_id: account("acct-e"),
            initial_key_id: initial_key_id(5),
            code_sha256: code_hash("e1"),
            code_expires_at_ms: NOW_MS,
        }),
        Err(StorageError::TerminalExists(_))
    ));
}

/// The read-only check enrollment makes before any HSM work: the same refusals as redeeming,
/// and nothing written — the code still works once afterwards.
fn enrollment_code_check_refuses_alike_and_redeems_nothing(db: &Db) {
    let storage = db.open();
    storage
        .create_account(&account("acct-c"), eur(), 0)
        .unwrap();
    storage
        .add_terminal(NewTerminal {
            id: terminal("c1"),
            account_id: account("acct-c"),
            initial_key_id: initial_key_id(1),
            code_sha256: code_hash("c1"),
            code_expires_at_ms: NOW_MS,
        })
        .unwrap();
    let before = storage.dump_state().unwrap();
    let refused = |result: Result<_, StorageError>, why| {
        assert!(
            matches!(result, Err(StorageError::EnrollmentRefused(r)) if r == why),
            "{result:?}"
        );
    };
    refused(
        storage.check_enrollment_code(&terminal("c1"), &code_hash("wrong"), NOW_MS),
        EnrollmentRefusal::WrongCode,
    );
    refused(
        storage.check_enrollment_code(&terminal("c1"), &code_hash("c1"), NOW_MS + 1),
        EnrollmentRefusal::Expired,
    );
    assert!(matches!(
        storage.check_enrollment_code(&terminal("nobody"), &code_hash("c1"), NOW_MS),
        Err(StorageError::UnknownTerminal(_))
    ));
    // Passing the check twice redeems nothing.
    for _ in 0..2 {
        let view = storage
            .check_enrollment_code(&terminal("c1"), &code_hash("c1"), NOW_MS)
            .unwrap();
        assert_eq!(view.state, TerminalState::Pending);
        assert_eq!(view.initial_key_id, initial_key_id(1));
    }
    assert_eq!(storage.dump_state().unwrap(), before);
    storage
        .redeem_enrollment_code(&terminal("c1"), code_hash("c1"), NOW_MS, "serial-c1")
        .unwrap();
    refused(
        storage.check_enrollment_code(&terminal("c1"), &code_hash("c1"), NOW_MS),
        EnrollmentRefusal::AlreadyUsed,
    );
    storage
        .set_terminal_state(&terminal("c1"), TerminalState::Suspended)
        .unwrap();
    refused(
        storage.check_enrollment_code(&terminal("c1"), &code_hash("c1"), NOW_MS),
        EnrollmentRefusal::AlreadyUsed,
    );
}

fn audit_chain_verifies_and_detects_tampering(db: &Db) {
    let w = world(db);
    w.storage
        .submit_half(half_a(&w, txn(60), 1, eur_amount(1_00)), NOW_MS)
        .unwrap();
    w.storage
        .submit_half(half_b(&w, txn(60), 1, eur_amount(1_00)), NOW_MS)
        .unwrap();
    let report = w.storage.audit_verify().unwrap();
    assert!(report.is_intact(), "{report:?}");
    // 3 accounts, 2 fundings… at least one record per operation.
    assert!(report.records >= 10, "{report:?}");
    assert!(
        report
            .chains
            .iter()
            .any(|head| head.seq > 0 && head.hash != [0; 32]),
        "{report:?}"
    );

    // The database itself refuses changes to the log.
    assert!(
        db.execute("UPDATE audit_log SET details = '{}' WHERE seq = 2")
            .is_err()
    );
    assert!(db.execute("DELETE FROM audit_log WHERE seq = 2").is_err());

    // Someone with full access removes the guard and edits a record.
    let drop_guard = if db.sqlite_path.is_some() {
        "DROP TRIGGER audit_log_no_update"
    } else {
        "DROP TRIGGER audit_log_no_update ON audit_log"
    };
    db.execute(drop_guard).unwrap();
    db.execute("UPDATE audit_log SET details = '{\"forged\":true}' WHERE seq = 2")
        .unwrap();
    let report = w.storage.audit_verify().unwrap();
    let broken = report.first_break.expect("tampering detected");
    assert_eq!(broken.seq, 2);
    assert_eq!(report.records, 1);
}

fn signed_checkpoints_catch_a_cut_chain_and_a_wrong_key(db: &Db) {
    use nfcpay_daemon::storage::audit;
    use p256::ecdsa::signature::{Signer as _, Verifier as _};
    use p256::ecdsa::{Signature, SigningKey, VerifyingKey};

    let w = world(db);
    w.storage
        .submit_half(half_a(&w, txn(61), 1, eur_amount(1_00)), NOW_MS)
        .unwrap();
    w.storage
        .submit_half(half_b(&w, txn(61), 1, eur_amount(1_00)), NOW_MS)
        .unwrap();
    let heads = w.storage.audit_heads().unwrap();
    let head = heads.iter().max_by_key(|head| head.seq).unwrap().clone();
    assert!(head.seq >= 3, "{heads:?}");
    let key = SigningKey::from_slice(&[7; 32]).unwrap();
    let message = audit::checkpoint_message(NOW_MS, &audit::heads_text(&heads));
    let signature: Signature = key.sign(&message);
    w.storage
        .add_audit_checkpoint(
            NOW_MS,
            heads.clone(),
            "test-key",
            signature.to_bytes().into(),
        )
        .unwrap();
    let check_with = |key: VerifyingKey| {
        move |message: &[u8], signature: &[u8; 64]| {
            Signature::from_slice(signature).is_ok_and(|s| key.verify(message, &s).is_ok())
        }
    };
    let right = check_with(*key.verifying_key());
    let report = w.storage.audit_verify_signed(&right).unwrap();
    assert!(report.is_intact(), "{report:?}");
    assert_eq!(report.checkpoints, 1);

    // Another key did not sign it.
    let other = SigningKey::from_slice(&[8; 32]).unwrap();
    let wrong = check_with(*other.verifying_key());
    let report = w.storage.audit_verify_signed(&wrong).unwrap();
    let broken = report.first_break.expect("a foreign signature detected");
    assert_eq!(broken.reason, "a checkpoint's signature does not verify");

    // Someone with full access cuts the chain's newest records and moves its head back,
    // consistently: the chain alone verifies, the checkpoint does not.
    let drop_guards = if db.sqlite_path.is_some() {
        "DROP TRIGGER audit_log_no_delete"
    } else {
        "DROP TRIGGER audit_log_no_update ON audit_log"
    };
    db.execute(drop_guards).unwrap();
    let keep = head.seq - 2;
    db.execute(&format!(
        "DELETE FROM audit_log WHERE chain_id = {} AND seq > {keep}",
        head.chain_id
    ))
    .unwrap();
    db.execute(&format!(
        "UPDATE audit_chains SET head_seq = {keep}, head_hash = \
         (SELECT hash FROM audit_log WHERE chain_id = {0} AND seq = {keep}) WHERE id = {0}",
        head.chain_id
    ))
    .unwrap();
    let report = w.storage.audit_verify_signed(&right).unwrap();
    let broken = report.first_break.clone().expect("the cut detected");
    assert_eq!(
        (broken.chain_id, broken.seq),
        (head.chain_id, head.seq),
        "{report:?}"
    );
    assert!(broken.reason.contains("not on its chain"), "{report:?}");
    assert_eq!(report.checkpoints, 0);
}

// ---------------------------------------------------------------------------------------
// Concurrency

fn group_commit_settles_200_concurrent_payments(db: &Db) {
    const PAYMENTS: u32 = 200;
    let w = Arc::new(world(db));
    let threads: Vec<_> = (0..PAYMENTS)
        .map(|i| {
            let w = Arc::clone(&w);
            std::thread::spawn(move || {
                let txn_id = txn(1000 + i);
                let a = half_a(&w, txn_id, i + 1, eur_amount(50));
                let b = half_b(&w, txn_id, i + 1, eur_amount(50));
                let first = w.storage.submit_half(a, NOW_MS).unwrap();
                assert_eq!(first.status, TransactionStatus::Pending);
                w.storage.submit_half(b, NOW_MS).unwrap()
            })
        })
        .collect();
    let views: Vec<TransactionView> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(views.iter().all(|v| v.status == TransactionStatus::Settled));
    let mut ids: Vec<u64> = views.iter().map(|v| v.settlement_id.unwrap()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), PAYMENTS as usize);
    assert_eq!(
        balance(&w, &w.payer.account),
        100_00 - 50 * i64::from(PAYMENTS)
    );
    assert_eq!(balance(&w, &w.payee.account), 50 * i64::from(PAYMENTS));
    assert_eq!(
        w.storage.postings(&w.payee.account).unwrap().len(),
        PAYMENTS as usize
    );
    assert!(w.storage.audit_verify().unwrap().is_intact());
}

/// Both halves of a payment decided in one batch: each is answered with the payment as it
/// stood when it was decided, so exactly one of them settles it.
fn both_halves_in_one_batch_answer_pending_then_settled(db: &Db) {
    let w = Arc::new(world(db));
    let hold = w.storage.hold_next_commit();
    let blocker = {
        let w = Arc::clone(&w);
        std::thread::spawn(move || w.storage.create_account(&account("held"), eur(), 0))
    };
    assert!(hold.wait_until_holding(Duration::from_secs(10)));
    // Both halves queue behind the held batch, so the writer takes them together.
    let halves: Vec<_> = [
        half_a(&w, txn(90), 1, eur_amount(3_00)),
        half_b(&w, txn(90), 1, eur_amount(3_00)),
    ]
    .into_iter()
    .map(|half| {
        let w = Arc::clone(&w);
        std::thread::spawn(move || w.storage.accept_half(half, NOW_MS).unwrap())
    })
    .collect();
    std::thread::sleep(Duration::from_millis(200));
    drop(hold);
    blocker.join().unwrap().unwrap();
    let answers: Vec<_> = halves.into_iter().map(|t| t.join().unwrap()).collect();
    let settled: Vec<_> = answers.iter().filter(|a| a.settled_now).collect();
    assert_eq!(settled.len(), 1, "{answers:?}");
    assert_eq!(settled[0].view.status, TransactionStatus::Settled);
    let other = answers.iter().find(|a| !a.settled_now).unwrap();
    assert_eq!(other.view.status, TransactionStatus::Pending, "{answers:?}");
    assert_eq!(balance(&w, &w.payee.account), 3_00);
}

/// A batch's statements do not grow with its halves: one half alone and twenty halves (ten
/// payments, inserted and settled in one batch) each cost at most the documented number
/// (docs/ledger.md: 16 on SQLite, 9 on PostgreSQL, `BEGIN` and `COMMIT` included).
fn a_batch_costs_the_same_statements_whatever_its_size(db: &Db) {
    let most = if db.postgres.is_some() { 9.0 } else { 16.0 };
    let w = Arc::new(world(db));
    let metrics = w.storage.writer_metrics();
    let batches = || {
        (
            metrics.statements_per_batch.count(),
            metrics.statements_per_batch.sum(),
        )
    };

    let before = batches();
    w.storage
        .accept_half(half_a(&w, txn(70), 1, eur_amount(1_00)), NOW_MS)
        .unwrap();
    let after = batches();
    assert_eq!(after.0 - before.0, 1);
    let alone = after.1 - before.1;
    assert!(
        alone > 0.0 && alone <= most,
        "{alone} statements for one half"
    );

    let hold = w.storage.hold_next_commit();
    let blocker = {
        let w = Arc::clone(&w);
        std::thread::spawn(move || w.storage.create_account(&account("held-2"), eur(), 0))
    };
    assert!(hold.wait_until_holding(Duration::from_secs(10)));
    let before = batches();
    let halves_before = metrics.halves_per_batch.sum();
    let halves: Vec<_> = (0..10_u32)
        .flat_map(|i| {
            [
                half_a(&w, txn(80 + i), 2 + i, eur_amount(1_00)),
                half_b(&w, txn(80 + i), 1 + i, eur_amount(1_00)),
            ]
        })
        .map(|half| {
            let w = Arc::clone(&w);
            std::thread::spawn(move || w.storage.accept_half(half, NOW_MS).unwrap())
        })
        .collect();
    // The halves queue behind the held batch (their threads have had time to queue them).
    std::thread::sleep(Duration::from_millis(300));
    drop(hold);
    blocker.join().unwrap().unwrap();
    let settled = halves
        .into_iter()
        .map(|thread| thread.join().unwrap())
        .filter(|answer| answer.settled_now)
        .count();
    assert_eq!(settled, 10);
    let after = batches();
    let (count, sum) = (after.0 - before.0, after.1 - before.1);
    assert_eq!(metrics.halves_per_batch.sum() - halves_before, 20.0);
    // Normally one batch of twenty; however a loaded machine splits them, each is bounded.
    assert!((1..=20).contains(&count), "{count} batches");
    assert!(
        sum <= most * count as f64,
        "{sum} statements in {count} batches of twenty halves"
    );
    assert_eq!(balance(&w, &w.payee.account), 10 * 1_00);
}

fn two_storages_racing_the_halves_settle_exactly_once(db: &Db) {
    const PAYMENTS: u32 = 40;
    let w = Arc::new(world(db));
    let second = db.open();
    let threads: Vec<_> = (0..PAYMENTS)
        .flat_map(|i| {
            let txn_id = txn(5000 + i);
            let a = half_a(&w, txn_id, i + 1, eur_amount(10));
            let b = half_b(&w, txn_id, i + 1, eur_amount(10));
            // Half A to one daemon, half B to both: the three race.
            [
                (w.storage.clone(), a),
                (second.clone(), b.clone()),
                (w.storage.clone(), b),
            ]
        })
        .map(|(storage, half)| {
            std::thread::spawn(move || storage.submit_half(half, NOW_MS).unwrap())
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    for i in 0..PAYMENTS {
        let view = w.storage.transaction(&txn(5000 + i)).unwrap().unwrap();
        assert_eq!(view.status, TransactionStatus::Settled, "{view:?}");
        assert_eq!(second.transaction(&txn(5000 + i)).unwrap().unwrap(), view);
    }
    assert_eq!(balance(&w, &w.payee.account), 10 * i64::from(PAYMENTS));
    assert_eq!(
        balance(&w, &w.payer.account),
        100_00 - 10 * i64::from(PAYMENTS)
    );
    assert_eq!(
        w.storage.postings(&w.payee.account).unwrap().len(),
        PAYMENTS as usize
    );
    assert!(second.audit_verify().unwrap().is_intact());
}

fn accounts_refuse_bad_input(db: &Db) {
    let storage = db.open();
    storage.create_account(&account("a1"), eur(), 0).unwrap();
    assert!(matches!(
        storage.create_account(&account("a1"), eur(), 0),
        Err(StorageError::AccountExists(_))
    ));
    assert!(matches!(
        storage.create_account(&account("__x"), eur(), 0),
        Err(StorageError::ReservedAccount)
    ));
    assert!(matches!(
        storage.create_account(&account("a2"), eur(), 1),
        Err(StorageError::InvalidLimit(1))
    ));
    let usd: Currency = "USD".parse().unwrap();
    assert!(matches!(
        storage.fund(&account("a1"), Amount::new(1, usd).unwrap()),
        Err(StorageError::CurrencyMismatch { .. })
    ));
    assert!(matches!(
        storage.fund(&account("nope"), eur_amount(1)),
        Err(StorageError::UnknownAccount(_))
    ));
    assert!(matches!(
        storage.fund(&account("__funding-EUR"), eur_amount(1)),
        Err(StorageError::ReservedAccount)
    ));
    let view = storage.fund(&account("a1"), eur_amount(7)).unwrap();
    assert_eq!(view.balance_minor, 7);
    assert_eq!(view.limit_minor, Some(0));
    assert_eq!(
        storage
            .account(&account("__funding-EUR"))
            .unwrap()
            .balance_minor,
        -7
    );
    assert!(Storage::open("mysql://localhost/x").is_err());
}

// ---------------------------------------------------------------------------------------
// Writer faults

fn is_batch_panicked(result: &Result<impl std::fmt::Debug, StorageError>) -> bool {
    matches!(result, Err(StorageError::Unavailable(cause)) if matches!(**cause, StorageError::BatchPanicked))
}

/// A batch that panics after writing is rolled back and answered as unavailable, alone: the
/// writer carries on, the next write succeeds, nothing of the panicked batch remains, and the
/// audit chain is intact. Both kinds of batch: a closure job and a set of halves.
fn a_panicking_batch_fails_alone_and_the_writer_carries_on(db: &Db) {
    let w = world(db);
    let before = w.storage.dump_state().unwrap();
    let audit_before = w.storage.audit_verify().unwrap().records;

    w.storage.inject_writer_fault(WriterFault::PanicInBatch);
    let funded = w.storage.fund(&w.payee.account, eur_amount(5_00));
    assert!(is_batch_panicked(&funded), "{funded:?}");
    let half = half_a(&w, txn(1), 1, eur_amount(10_00));
    w.storage.inject_writer_fault(WriterFault::PanicInBatch);
    let submitted = w.storage.submit_half(half.clone(), NOW_MS);
    assert!(is_batch_panicked(&submitted), "{submitted:?}");
    assert_eq!(w.storage.dump_state().unwrap(), before);
    assert_eq!(w.storage.audit_verify().unwrap().records, audit_before);
    assert_eq!(w.storage.writer_metrics().batch_panics.get(), 2);
    w.storage.check_health().unwrap();

    // The writer goes on: the same work now succeeds, the half's counter unspent.
    w.storage.fund(&w.payee.account, eur_amount(5_00)).unwrap();
    assert_eq!(balance(&w, &w.payee.account), 5_00);
    let view = w.storage.submit_half(half, NOW_MS).unwrap();
    assert_eq!(view.status, TransactionStatus::Pending);
    let report = w.storage.audit_verify().unwrap();
    assert!(report.is_intact(), "{report:?}");
    assert!(report.records > audit_before);
}

/// A writer thread that has stopped fails every write and the health check (`/readyz`).
fn a_stopped_writer_fails_the_health_check(db: &Db) {
    let storage = db.open();
    storage.check_health().unwrap();
    storage.inject_writer_fault(WriterFault::StopThread);
    let created = storage.create_account(&account("acct-s"), eur(), 0);
    assert!(
        matches!(created, Err(StorageError::WriterStopped)),
        "{created:?}"
    );
    // The caller is answered while the thread unwinds; it is gone moments later.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match storage.check_health() {
            Err(StorageError::WriterStopped) => break,
            Ok(()) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            other => panic!("the health check did not see the stopped writer: {other:?}"),
        }
    }
    assert!(matches!(
        storage.fund(&account("acct-s"), eur_amount(1)),
        Err(StorageError::WriterStopped)
    ));
}

/// A write whose group commit does not come within `write_timeout_ms` (here: the writer held
/// before its commit, as by a frozen database) is answered `Timeout`, which the API answers
/// `503 unavailable`; readiness says the writer is stalled. A write queued meanwhile is
/// dropped unrun once its caller has given up. When the database answers again, the held
/// batch commits (a re-sent half would find it) and the writer carries on.
fn a_write_not_committed_in_time_is_answered_unavailable_and_later_work_goes_on(db: &Db) {
    // One writer: the hook holds one batch, as a frozen database would hold every writer's.
    let config = DatabaseConfig {
        write_timeout_ms: 300,
        writers: 1,
        ..DatabaseConfig::with_url(&db.url)
    };
    let storage = Storage::open_with(&config).unwrap();
    let hold = storage.hold_next_commit();
    let held = {
        let storage = storage.clone();
        std::thread::spawn(move || storage.create_account(&account("acct-held"), eur(), 0))
    };
    assert!(hold.wait_until_holding(Duration::from_secs(10)));
    let answered = held.join().unwrap();
    assert!(
        matches!(
            answered,
            Err(StorageError::Timeout {
                what: "write",
                waited_ms: 300
            })
        ),
        "{answered:?}"
    );
    assert!(answered.unwrap_err().is_unavailable());
    let queued = storage.create_account(&account("acct-queued"), eur(), 0);
    assert!(
        matches!(queued, Err(StorageError::Timeout { .. })),
        "{queued:?}"
    );
    let health = storage.check_health();
    assert!(
        matches!(health, Err(StorageError::WriterStalled { busy_ms }) if busy_ms > 300),
        "{health:?}"
    );

    drop(hold);
    storage
        .create_account(&account("acct-after"), eur(), 0)
        .unwrap();
    storage.check_health().unwrap();
    storage.account(&account("acct-held")).unwrap();
    assert!(matches!(
        storage.account(&account("acct-queued")),
        Err(StorageError::UnknownAccount(_))
    ));
}

/// The async submission (the daemon's: its caller holds no thread while the batch commits)
/// decides halves as the blocking one does, and its wait has the same bounds: a commit that
/// does not come within the write timeout is `Timeout`, a stopped writer `WriterStopped`.
fn an_async_half_settles_and_its_wait_is_bounded_like_a_blocking_one(db: &Db) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    // One writer: the hook holds one batch, as a frozen database would hold every writer's.
    let config = DatabaseConfig {
        write_timeout_ms: 300,
        writers: 1,
        ..DatabaseConfig::with_url(&db.url)
    };
    let w = world_on(Storage::open_with(&config).unwrap());
    let submit = |half: AcceptedHalf| runtime.block_on(w.storage.accept_half_async(half, NOW_MS));

    let a = submit(half_a(&w, txn(1), 1, eur_amount(10_00))).unwrap();
    assert_eq!(a.view.status, TransactionStatus::Pending);
    assert!(!a.settled_now);
    let b = submit(half_b(&w, txn(1), 1, eur_amount(10_00))).unwrap();
    assert_eq!(b.view.status, TransactionStatus::Settled);
    assert!(b.settled_now);
    assert_eq!(balance(&w, &w.payee.account), 10_00);

    // A commit held (as by a frozen database) answers the async caller at the write timeout.
    let hold = w.storage.hold_next_commit();
    let held = {
        let storage = w.storage.clone();
        std::thread::spawn(move || storage.create_account(&account("acct-held"), eur(), 0))
    };
    assert!(hold.wait_until_holding(Duration::from_secs(10)));
    let late = submit(half_a(&w, txn(2), 2, eur_amount(1_00)));
    assert!(
        matches!(
            late,
            Err(StorageError::Timeout {
                what: "write",
                waited_ms: 300
            })
        ),
        "{late:?}"
    );
    drop(hold);
    // The held write's own caller gives up at its deadline, before the hold is dropped; but a
    // thread descheduled past its deadline on a loaded machine may find the answer already
    // there when it wakes. (That the held batch then commits is shown by
    // `a_write_not_committed_in_time_is_answered_unavailable_and_later_work_goes_on`.)
    let held = held.join().unwrap();
    assert!(
        matches!(
            held,
            Ok(()) | Err(StorageError::Timeout { what: "write", .. })
        ),
        "{held:?}"
    );

    w.storage.inject_writer_fault(WriterFault::StopThread);
    // The first item taken stops the thread; once it is gone, a half finds no writer.
    let _ = w.storage.create_account(&account("acct-stop"), eur(), 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !matches!(w.storage.check_health(), Err(StorageError::WriterStopped)) {
        assert!(
            std::time::Instant::now() < deadline,
            "the writer did not stop"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let stopped = submit(half_a(&w, txn(3), 3, eur_amount(1_00)));
    assert!(
        matches!(stopped, Err(StorageError::WriterStopped)),
        "{stopped:?}"
    );
}

/// A pooled connection the server has closed (PostgreSQL: the backend terminated, as by a
/// restart; SQLite has no server, so the case only checks that work goes on) is found broken,
/// replaced, and the read or the write run again on a new one: nobody sees an error.
fn a_broken_pooled_connection_is_replaced_without_an_error(db: &Db) {
    let name = format!("nfcpay_{}", unique());
    let url = if db.postgres.is_some() {
        format!("{}&application_name={name}", db.url)
    } else {
        db.url.clone()
    };
    let storage = Storage::open(&url).unwrap();
    storage
        .create_account(&account("acct-1"), eur(), 0)
        .unwrap();
    storage.account(&account("acct-1")).unwrap();
    if db.postgres.is_some() {
        let terminated = format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = '{name}'"
        );
        db.execute(&terminated).unwrap();
    }
    storage.account(&account("acct-1")).unwrap();
    storage
        .create_account(&account("acct-2"), eur(), 0)
        .unwrap();
    storage.fund(&account("acct-2"), eur_amount(5)).unwrap();
    storage.check_health().unwrap();
}

/// The writer's connection breaks (its backend terminated, as in a server restart) while a
/// batch with a settling half B is written and not yet committed: the commit fails, the batch
/// runs again on a new connection, and the payer is answered "settled" — debited once.
#[test]
fn postgres_a_batch_whose_connection_breaks_before_its_commit_runs_again() {
    let Some(db) = Db::postgres() else {
        return;
    };
    let name = format!("nfcpay_{}", unique());
    let storage = Storage::open(&format!("{}&application_name={name}", db.url)).unwrap();
    let w = world_on(storage);
    let txn_id = prefixed_txn(0x7b, 1);
    let pending = w
        .storage
        .submit_half(half_a(&w, txn_id, 1, eur_amount(7_00)), NOW_MS)
        .unwrap();
    assert_eq!(pending.status, TransactionStatus::Pending);
    let before = balance(&w, &w.payer.account);

    let hold = w.storage.hold_next_commit();
    let settling = {
        let storage = w.storage.clone();
        let half = half_b(&w, txn_id, 1, eur_amount(7_00));
        std::thread::spawn(move || storage.submit_half(half, NOW_MS))
    };
    assert!(hold.wait_until_holding(Duration::from_secs(10)));
    db.execute(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = '{name}'"
    ))
    .unwrap();
    drop(hold);
    let settled = settling.join().unwrap().unwrap();
    assert_eq!(settled.status, TransactionStatus::Settled);
    assert_eq!(balance(&w, &w.payer.account), before - 7_00);
    assert!(w.storage.writer_metrics().batch_retries.get() >= 1);
    let report = w.storage.audit_verify().unwrap();
    assert!(report.is_intact(), "{report:?}");
}

/// A read on a request's path that the database does not answer (here: waiting on a table
/// lock held by another session; a frozen server is the same to the caller) is answered
/// `Timeout` after `read_timeout_ms`, which the API answers `503 unavailable`; once the
/// database answers again, reads work.
#[test]
fn postgres_a_read_the_database_does_not_answer_is_answered_in_time() {
    let Some(db) = Db::postgres() else {
        return;
    };
    let config = DatabaseConfig {
        read_timeout_ms: 300,
        ..DatabaseConfig::with_url(&db.url)
    };
    let storage = Storage::open_with(&config).unwrap();
    assert!(storage.terminal(&terminal("term-x")).unwrap().is_none());
    let mut locker = diesel::PgConnection::establish(&db.url).unwrap();
    locker
        .batch_execute("BEGIN; LOCK TABLE terminals IN ACCESS EXCLUSIVE MODE;")
        .unwrap();
    let read = storage.terminal(&terminal("term-x"));
    assert!(
        matches!(
            read,
            Err(StorageError::Timeout {
                what: "read",
                waited_ms: 300
            })
        ),
        "{read:?}"
    );
    assert!(read.unwrap_err().is_unavailable());
    locker.batch_execute("ROLLBACK").unwrap();
    assert!(storage.terminal(&terminal("term-x")).unwrap().is_none());
}

/// A database that cannot be opened is reported with the database's own words: libpq's for
/// a PostgreSQL server that refuses connections, SQLite's for a file that cannot be made.
#[test]
fn an_unreachable_database_is_reported_with_its_cause() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let error = Storage::open(&format!("postgres://nobody@127.0.0.1:{port}/ledger")).unwrap_err();
    assert!(matches!(error, StorageError::Connect(_)), "{error:?}");
    let chain = nfcpay_protocol::ErrorChain(&error).to_string();
    assert!(
        chain.starts_with("could not connect to the database: "),
        "{chain}"
    );
    assert!(chain.contains(&port.to_string()), "{chain}");

    let directory = tempfile::tempdir().unwrap();
    let missing = directory.path().join("no-such-directory/ledger.db");
    let error = Storage::open(missing.to_str().unwrap()).unwrap_err();
    let chain = nfcpay_protocol::ErrorChain(&error).to_string();
    assert!(
        chain
            .to_lowercase()
            .contains("unable to open the database file"),
        "{chain}"
    );
}

/// `statement_timeout` cancels a slow statement of a batch (answered unavailable, nothing
/// written), but not the work of its `COMMIT` (here a deferred trigger; in production the wait
/// for a synchronous standby): PostgreSQL disarms the timeout before committing. Were it cut
/// short, a synchronous commit would be reported done with a mere warning, durable on the
/// primary alone, which a failover could lose.
#[test]
fn postgres_statement_timeout_cancels_a_slow_statement_but_not_the_commit() {
    let Some(db) = Db::postgres() else {
        return;
    };
    let config = DatabaseConfig {
        statement_timeout_ms: 300,
        ..DatabaseConfig::with_url(&db.url)
    };
    let storage = Storage::open_with(&config).unwrap();
    db.execute(
        "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN PERFORM pg_sleep(0.6); RETURN NULL; END $$; \
         CREATE TRIGGER slow_insert AFTER INSERT ON accounts \
         FOR EACH ROW EXECUTE FUNCTION slow();",
    )
    .unwrap();
    let slow = storage.create_account(&account("acct-slow"), eur(), 0);
    assert!(
        slow.as_ref().is_err_and(StorageError::is_unavailable),
        "{slow:?}"
    );
    assert!(matches!(
        storage.account(&account("acct-slow")),
        Err(StorageError::UnknownAccount(_))
    ));

    db.execute(
        "DROP TRIGGER slow_insert ON accounts; \
         CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON accounts \
         DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow();",
    )
    .unwrap();
    storage
        .create_account(&account("acct-commit"), eur(), 0)
        .unwrap();
    storage.account(&account("acct-commit")).unwrap();
}

/// The PostgreSQL session of every pooled connection carries the configured deadlines, flushes
/// each commit, and plans key lookups as index scans even on fresh tables.
#[test]
fn postgres_connections_carry_statement_and_lock_timeouts() {
    let Some(db) = Db::postgres() else {
        return;
    };
    let config = DatabaseConfig {
        statement_timeout_ms: 1_234,
        lock_timeout_ms: 567,
        ..DatabaseConfig::with_url(&db.url)
    };
    let storage = Storage::open_with(&config).unwrap();
    storage.check_health().unwrap();
    let settings = storage.session_settings().unwrap();
    assert!(settings.contains("statement_timeout=1234ms"), "{settings}");
    assert!(settings.contains("lock_timeout=567ms"), "{settings}");
    assert!(settings.contains("synchronous_commit=on"), "{settings}");
    assert!(settings.contains("enable_seqscan=off"), "{settings}");
}

/// A transaction ID whose first byte is `prefix`: payments of the tests above share their
/// first bytes, and PostgreSQL batches lock payments by their first four bytes.
fn prefixed_txn(prefix: u8, n: u32) -> TxnId {
    let mut bytes = [prefix; 16];
    bytes[12..].copy_from_slice(&n.to_be_bytes());
    TxnId::try_from(bytes).unwrap()
}

/// Two writers on one PostgreSQL: while the first holds a batch open just before its commit
/// (its terminal, payment and account locked), the second settles an unrelated payment. With a
/// single lock shared by all writers (the old `audit_head` row), the second would wait.
#[test]
fn postgres_writers_do_not_wait_for_each_other() {
    let Some(db) = Db::postgres() else {
        return;
    };
    let w = world(&db);
    let second = db.open();
    let w2 = World {
        payee: add_party(&second, "payee2", 4, eur(), 0),
        payer: add_party(&second, "payer2", 5, eur(), 100_00),
        other: add_party(&second, "other2", 6, eur(), 0),
        storage: second,
    };
    let held_txn = prefixed_txn(0x11, 1);
    let free_txn = prefixed_txn(0x22, 2);

    let hold = w.storage.hold_next_commit();
    let first = w.storage.clone();
    let held_half = half_a(&w, held_txn, 1, eur_amount(1_00));
    let held = std::thread::spawn(move || first.submit_half(held_half, NOW_MS));
    assert!(
        hold.wait_until_holding(Duration::from_secs(10)),
        "the first writer's batch never reached its commit"
    );

    let (done, finished) = std::sync::mpsc::channel();
    let other_writer = w2.storage.clone();
    let a = half_a(&w2, free_txn, 1, eur_amount(2_00));
    let b = half_b(&w2, free_txn, 1, eur_amount(2_00));
    std::thread::spawn(move || {
        let settled = other_writer
            .submit_half(a, NOW_MS)
            .and_then(|_| other_writer.submit_half(b, NOW_MS));
        let _ = done.send(settled);
    });
    let settled = finished
        .recv_timeout(Duration::from_secs(10))
        .expect("the second writer waited for the first one's open batch")
        .unwrap();
    assert_eq!(settled.status, TransactionStatus::Settled);
    assert_eq!(balance(&w, &w2.payee.account), 2_00);
    // The held half is not committed yet.
    assert!(w2.storage.transaction(&held_txn).unwrap().is_none());

    drop(hold);
    let held = held.join().unwrap().unwrap();
    assert_eq!(held.status, TransactionStatus::Pending);
    assert!(w.storage.transaction(&held_txn).unwrap().is_some());
    let report = w.storage.audit_verify().unwrap();
    assert!(report.is_intact(), "{report:?}");
    assert!(report.chains.len() >= 2, "{report:?}");
}

/// The commit delay (`commit_delay_us`): while a half is on its way (`Storage::half_coming`),
/// the writer holds the batch it has for it, so both share one commit; with none on its way,
/// a half commits at once whatever the delay.
fn the_writer_waits_for_halves_on_their_way_and_only_for_them(db: &Db) {
    let config = DatabaseConfig {
        commit_delay_us: 20_000_000,
        write_timeout_ms: 60_000,
        ..DatabaseConfig::with_url(&db.url)
    };
    let w = Arc::new(world_on(Storage::open_with(&config).unwrap()));
    let metrics = w.storage.writer_metrics();
    let batches = || {
        (
            metrics.halves_per_batch.count(),
            metrics.halves_per_batch.sum(),
        )
    };

    // Nobody on the way: a lone half does not wait (the delay is 20 s; this bound is only
    // there to tell "waited" from "did not").
    let before = batches();
    let started = std::time::Instant::now();
    let alone = w
        .storage
        .accept_half(half_a(&w, txn(1), 1, eur_amount(1_00)), NOW_MS)
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(alone.view.status, TransactionStatus::Pending);
    assert_eq!(batches().0 - before.0, 1);

    // Half B is on its way while half A reaches the writer: they share a commit.
    let before = batches();
    let coming = w.storage.half_coming();
    let first = {
        let w = Arc::clone(&w);
        std::thread::spawn(move || {
            w.storage
                .accept_half(half_a(&w, txn(2), 2, eur_amount(2_00)), NOW_MS)
                .unwrap()
        })
    };
    // Without the delay, half A would be committed alone long before this.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !first.is_finished(),
        "half A did not wait for the half on its way"
    );
    // As the service does: B is queued, then no longer counted as on its way.
    let queued = w
        .storage
        .accept_half_async(half_b(&w, txn(2), 1, eur_amount(2_00)), NOW_MS);
    drop(coming);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let b = runtime.block_on(queued).unwrap();
    let a = first.join().unwrap();
    assert!(b.settled_now && !a.settled_now, "{a:?} {b:?}");
    let after = batches();
    assert_eq!((after.0 - before.0, after.1 - before.1), (1, 2.0));
    assert_eq!(balance(&w, &w.payee.account), 2_00);
}

/// However long the commit delay, a batch waiting for halves on their way begins in time for
/// its callers: a half is committed within its write timeout even while another is said to be
/// on its way forever.
fn the_commit_delay_never_costs_a_caller_its_deadline(db: &Db) {
    let config = DatabaseConfig {
        commit_delay_us: 60_000_000,
        write_timeout_ms: 1_000,
        ..DatabaseConfig::with_url(&db.url)
    };
    let w = world_on(Storage::open_with(&config).unwrap());
    let _never_arrives = w.storage.half_coming();
    let answer = w
        .storage
        .accept_half(half_a(&w, txn(1), 1, eur_amount(1_00)), NOW_MS)
        .unwrap();
    assert_eq!(answer.view.status, TransactionStatus::Pending);
}

/// `[database] writers`: on PostgreSQL a storage's writers take turns at the queue, so while
/// one holds its batch open (locks taken, before its commit) another commits unrelated work,
/// each on its own audit chain. SQLite has one writer whatever the setting (it serialises
/// writes on its file lock), so there the same write waits and times out.
fn a_second_writer_commits_while_the_first_holds_its_batch(db: &Db) {
    let config = DatabaseConfig {
        writers: 2,
        write_timeout_ms: 3_000,
        ..DatabaseConfig::with_url(&db.url)
    };
    let w = Arc::new(world_on(Storage::open_with(&config).unwrap()));
    let hold = w.storage.hold_next_commit();
    let held = {
        let w = Arc::clone(&w);
        std::thread::spawn(move || w.storage.create_account(&account("acct-held"), eur(), 0))
    };
    assert!(hold.wait_until_holding(Duration::from_secs(10)));
    let meanwhile = w
        .storage
        .accept_half(half_a(&w, txn(1), 1, eur_amount(1_00)), NOW_MS);
    if db.postgres.is_some() {
        assert_eq!(meanwhile.unwrap().view.status, TransactionStatus::Pending);
        // Committed, not merely queued: a reader sees it while the other batch is held.
        assert!(w.storage.transaction(&txn(1)).unwrap().is_some());
    } else {
        assert!(
            matches!(meanwhile, Err(StorageError::Timeout { what: "write", .. })),
            "{meanwhile:?}"
        );
    }
    drop(hold);
    let held = held.join().unwrap();
    if db.postgres.is_some() {
        held.unwrap();
    }
    // Committed once let go, even where its caller had stopped waiting (SQLite here): a
    // later write runs after it.
    w.storage
        .create_account(&account("acct-after"), eur(), 0)
        .unwrap();
    w.storage.account(&account("acct-held")).unwrap();
    let report = w.storage.audit_verify().unwrap();
    assert!(report.is_intact(), "{report:?}");
    if db.postgres.is_some() {
        assert!(report.chains.len() >= 2, "{report:?}");
    }
}
