//! Settlements per second of the ledger storage: `PAYMENTS` payments (half A then half B each)
//! from `THREADS` threads, against SQLite (a temporary file) and, when
//! `NFCPAY_TEST_DATABASE_URL` is set, PostgreSQL (a temporary schema).
//!
//! `cargo run --release -p nfcpay-daemon --example storage_bench [PAYMENTS] [THREADS] [WRITERS]`
//!
//! `WRITERS` is PostgreSQL's `[database] writers` (its default when absent).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Instant;

use diesel::Connection as _;
use diesel::connection::SimpleConnection as _;
use nfcpay_daemon::storage::{
    AcceptedHalf, DatabaseConfig, HalfContent, NewTerminal, Storage, TransactionStatus,
};
use nfcpay_protocol::{Amount, Currency, InitialKeyId, Ksn, TxnId};
use sha2::{Digest as _, Sha256};

const NOW_MS: i64 = 1_800_000_000_000;

/// The allocator of nfcpayd (which SQLite and libpq use there too), so that the figure is the
/// ledger's as the daemon runs it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let mut arguments = std::env::args().skip(1);
    let payments: u32 = arguments.next().map_or(2000, |a| a.parse().unwrap());
    let threads: u32 = arguments.next().map_or(50, |a| a.parse().unwrap());
    let writers: u32 = arguments
        .next()
        .map_or(DatabaseConfig::DEFAULT_WRITERS, |a| a.parse().unwrap());

    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("ledger.db");
    run(
        "sqlite (WAL, synchronous=FULL)",
        &format!("sqlite://{}", path.display()),
        payments,
        threads,
        1,
    );

    if let Ok(base) = std::env::var("NFCPAY_TEST_DATABASE_URL") {
        let schema = format!("bench_{}", std::process::id());
        let mut admin = diesel::PgConnection::establish(&base).unwrap();
        admin
            .batch_execute(&format!("CREATE SCHEMA {schema}"))
            .unwrap();
        let separator = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{separator}options=-csearch_path%3D{schema}");
        run(
            "postgresql (synchronous_commit=on)",
            &url,
            payments,
            threads,
            writers,
        );
        admin
            .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
            .unwrap();
    } else {
        println!("postgresql: NFCPAY_TEST_DATABASE_URL not set, skipped");
    }
}

fn run(name: &str, url: &str, payments: u32, threads: u32, writers: u32) {
    let storage = Storage::open_with(&DatabaseConfig {
        writers,
        ..DatabaseConfig::with_url(url)
    })
    .unwrap();
    let eur: Currency = "EUR".parse().unwrap();
    // Terminals per thread pair, so that counters stay within the replay window per terminal.
    for thread in 0..threads {
        for (role, n) in [("payee", 0_u8), ("payer", 1)] {
            let account = format!("{role}-{thread}").parse().unwrap();
            storage.create_account(&account, eur, 0).unwrap();
            if role == "payer" {
                storage
                    .fund(&account, Amount::new(1 << 40, eur).unwrap())
                    .unwrap();
            }
            let terminal = format!("t-{role}-{thread}").parse().unwrap();
            let key = InitialKeyId::from([0, 0, 0, 1, 0, 0, u8::try_from(thread).unwrap(), n]);
            let code: [u8; 32] = Sha256::digest(format!("{role}{thread}")).into();
            storage
                .add_terminal(NewTerminal {
                    id: terminal,
                    account_id: account,
                    initial_key_id: key,
                    code_sha256: code,
                    code_expires_at_ms: NOW_MS,
                })
                .unwrap();
            storage
                .redeem_enrollment_code(
                    &format!("t-{role}-{thread}").parse().unwrap(),
                    code,
                    NOW_MS,
                    "01",
                )
                .unwrap();
        }
    }
    let storage = Arc::new(storage);
    let per_thread = payments / threads;
    let started = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|thread| {
            let storage = Arc::clone(&storage);
            std::thread::spawn(move || {
                let amount = Amount::new(1, eur).unwrap();
                for i in 0..per_thread {
                    // Random-looking, as terminals make them (16 random bytes): the
                    // PostgreSQL writers' per-payment locks are keyed by the first four.
                    let mut seed = [0_u8; 8];
                    seed[..4].copy_from_slice(&thread.to_be_bytes());
                    seed[4..].copy_from_slice(&i.to_be_bytes());
                    let mut txn = [0_u8; 16];
                    txn.copy_from_slice(&Sha256::digest(seed)[..16]);
                    let txn_id = TxnId::try_from(txn).unwrap();
                    let digest: [u8; 32] = Sha256::digest(txn).into();
                    let ksn = |n: u8| {
                        let key = InitialKeyId::from([
                            0,
                            0,
                            0,
                            1,
                            0,
                            0,
                            u8::try_from(thread).unwrap(),
                            n,
                        ]);
                        Ksn::new(key, (i + 1).try_into().unwrap())
                    };
                    let half = |content, n, role: &str| AcceptedHalf {
                        txn_id,
                        terminal_id: format!("t-{role}-{thread}").parse().unwrap(),
                        // The serial recorded at enrollment above.
                        certificate_serial: "01".parse().unwrap(),
                        ksn: ksn(n),
                        envelope_sha256: Sha256::digest(format!("{role}{thread}/{i}")).into(),
                        received_at_ms: NOW_MS,
                        content,
                    };
                    let a = half(
                        HalfContent::A {
                            request_digest: digest,
                            payee_account: format!("payee-{thread}").parse().unwrap(),
                            amount,
                            expires_at_ms: NOW_MS + 60_000,
                        },
                        0,
                        "payee",
                    );
                    let b = half(
                        HalfContent::B {
                            request_digest: digest,
                            payer_account: format!("payer-{thread}").parse().unwrap(),
                            payee_terminal: format!("t-payee-{thread}").parse().unwrap(),
                            amount,
                        },
                        1,
                        "payer",
                    );
                    storage.submit_half(a, NOW_MS).unwrap();
                    let view = storage.submit_half(b, NOW_MS).unwrap();
                    assert_eq!(view.status, TransactionStatus::Settled);
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let settled = f64::from(per_thread * threads);
    println!(
        "{name}: {settled} payments ({} halves) from {threads} threads, {writers} writer(s), in \
         {elapsed:.2} s: \
         {:.0} settlements/s, {:.0} halves/s",
        2.0 * settled,
        settled / elapsed,
        2.0 * settled / elapsed
    );
    assert!(storage.audit_verify().unwrap().is_intact());
}
