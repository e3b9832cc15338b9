//! Database faults under load, against the real daemon: each PostgreSQL test starts a cluster
//! of its own (`nfcpay_tests::postgres`) and restarts, crashes or freezes only that one.
//!
//! - PostgreSQL restarted and crashed under load: no half is answered `500`; every payment
//!   acknowledged as settled is in the ledger exactly once; payments settle again after.
//! - PostgreSQL frozen (SIGSTOP): halves are answered `503` while it is still frozen (after
//!   the daemon's `write_timeout_ms`/`read_timeout_ms`, not the freeze); `/readyz` names the database; after
//!   SIGCONT payments settle again, exactly once.
//! - `nfcpayd` killed with SIGKILL under load on SQLite: after the restart every acknowledged
//!   payment is in the ledger exactly once.
//! - The ledger writer thread stopped (SIGUSR2, debug builds) under load on SQLite: the
//!   daemon drains and exits 70; after the restart every acknowledged payment is there once.
//! - No secret (HSM PIN, enrollment codes) in the daemon's log at `trace` or the SQLite file.
//! - An idle TCP flood on the enrollment listener, three times its cap: a terminal pair on
//!   the terminal listener pays as usual meanwhile.
//!
//! The figures (answers by kind, time to `503`, recovery time) are printed, not asserted:
//! `cargo test -p nfcpay-tests --test faults -- --nocapture` shows them. The PostgreSQL tests
//! skip only where PostgreSQL is not installed and not required (`CI`,
//! `NFCPAY_REQUIRE_POSTGRES`).
// A panic is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nfcpay_tests::faults::{self, Load, Tally, check_run};
use nfcpay_tests::postgres::{self, Cluster};
use nfcpay_tests::{Ledger, PlatformFixture, http_get};

/// The daemon's write and read timeouts in the freeze test (ms), below the freeze.
const TIMEOUT_MS: u64 = 1_000;
/// How long PostgreSQL stays frozen in the freeze test.
const FREEZE: Duration = Duration::from_secs(4);
/// How far into the freeze `/readyz` must be answering 503: twice the timeouts.
const READINESS_NOTICE_MAX: Duration = Duration::from_millis(2 * TIMEOUT_MS);
/// The enrollment listener's cap in the flood test (its default is 64).
const ENROLLMENT_CAP: usize = 8;
/// Idle TCP connections opened to the enrollment listener in the flood test.
const FLOOD: usize = 3 * ENROLLMENT_CAP;
/// Payments a terminal pair makes during the flood.
const FLOOD_PAYMENTS: usize = 20;
/// Within how long every payment during the flood must have settled: generous (about 0.1 s
/// each unflooded on this machine); the point is that terminals are not starved.
const FLOOD_PAYMENTS_WITHIN: Duration = Duration::from_secs(30);

/// Prints how long after `back` (the end of the fault, at `event`) the first payment settled,
/// and asserts that one did.
fn a_payment_settled_after(name: &str, tally: &Tally, back: Instant, event: &str) {
    let first_settled = tally.first_settled_after(back);
    println!("{name}: first payment settled {first_settled:?} after {event}");
    assert!(
        first_settled.is_some(),
        "{name}: no payment settled after {event}"
    );
}

/// Restart (clean) and crash (immediate stop, WAL recovery) of PostgreSQL under load.
#[tokio::test(flavor = "multi_thread")]
async fn postgres_restarted_and_crashed_under_load_costs_no_500_and_no_payment() {
    let Some(cluster) = postgres::own_cluster() else {
        return;
    };
    let platform = PlatformFixture::start(&Ledger::Postgres(cluster.url())).expect("platform");
    let load = Load::start(&platform, Duration::from_secs(8))
        .await
        .expect("terminals");

    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let cluster = Arc::new(cluster);
    let ops = platform.ops_address.clone();
    let (readiness, restarted) = tokio::task::spawn_blocking({
        let cluster = Arc::clone(&cluster);
        move || {
            cluster.stop()?;
            let readiness = http_get(&ops, "/readyz");
            cluster.start_server()?;
            anyhow::Ok((readiness, Instant::now()))
        }
    })
    .await
    .unwrap()
    .expect("PostgreSQL restarted");
    let (status, body) = readiness.expect("/readyz answers while the database is down");
    println!("postgres stopped: /readyz {status} {body:?}");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("not ready: database: "), "{body}");
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let recovered = tokio::task::spawn_blocking({
        let cluster = Arc::clone(&cluster);
        move || {
            cluster.crash()?;
            std::thread::sleep(Duration::from_millis(500));
            cluster.start_server()?;
            anyhow::Ok(Instant::now())
        }
    })
    .await
    .unwrap()
    .expect("PostgreSQL recovered after a crash");
    let (tally, accounts) = load.finish().await.expect("the payers");

    for (what, back) in [("restart", restarted), ("crash", recovered)] {
        println!(
            "postgres {what}: first payment settled {:?} after the server was back",
            tally.first_settled_after(back)
        );
    }
    assert!(
        tally.first_settled_after(recovered).is_some(),
        "no payment settled after the crash"
    );
    check_run("postgres restart and crash", &platform, &tally, &accounts)
        .expect("the ledger check runs");
    let log = platform.daemon_log();
    let causes = log
        .lines()
        .filter(|line| line.contains("database unavailable"))
        .count();
    println!("postgres restart and crash: {causes} 'database unavailable' log lines");
}

/// PostgreSQL frozen with SIGSTOP for 4 s under load, the daemon's write and read timeouts 1 s.
#[tokio::test(flavor = "multi_thread")]
async fn postgres_frozen_costs_503_within_the_timeouts_then_payments_go_on() {
    let Some(cluster) = postgres::own_cluster() else {
        return;
    };
    let platform = PlatformFixture::start_with_database_settings(
        &Ledger::Postgres(cluster.url()),
        &format!("write_timeout_ms = {TIMEOUT_MS}\nread_timeout_ms = {TIMEOUT_MS}"),
    )
    .expect("platform");
    let load = Load::start(&platform, Duration::from_secs(9))
        .await
        .expect("terminals");

    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let frozen_pids = cluster.freeze().expect("PostgreSQL frozen");
    let frozen = Instant::now();
    let ops = platform.ops_address.clone();
    // Asked until it answers 503, for at most READINESS_NOTICE_MAX into the freeze.
    let readiness = tokio::task::spawn_blocking(move || {
        loop {
            let readiness = http_get(&ops, "/readyz");
            let unready = matches!(readiness, Ok((503, _)));
            if unready || frozen.elapsed() >= READINESS_NOTICE_MAX {
                break readiness;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await
    .unwrap();
    tokio::time::sleep_until(tokio::time::Instant::from_std(frozen + FREEZE)).await;
    cluster.thaw(&frozen_pids).expect("PostgreSQL thawed");
    let thawed = Instant::now();
    let (tally, accounts) = load.finish().await.expect("the payers");

    let (status, body) = readiness.expect("/readyz answers while the database is frozen");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("not ready: database: "), "{body}");
    let during_freeze: Vec<_> = tally
        .answers
        .iter()
        .filter(|answer| answer.kind == "503 unavailable" && answer.sent + answer.took < thawed)
        .collect();
    let mut took_ms: Vec<u64> = during_freeze
        .iter()
        .map(|answer| u64::try_from(answer.took.as_millis()).unwrap_or(u64::MAX))
        .collect();
    took_ms.sort_unstable();
    println!(
        "postgres frozen {:?}: {} halves answered 503 while frozen, each after {:?} ms \
         (min, median, max); readiness {status} {body:?}; first payment settled {:?} after \
         SIGCONT",
        thawed - frozen,
        during_freeze.len(),
        (
            took_ms.first(),
            took_ms.get(took_ms.len() / 2),
            took_ms.last()
        ),
        tally.first_settled_after(thawed)
    );
    assert!(
        !during_freeze.is_empty(),
        "no half was answered 503 while the database was frozen: {:?}",
        tally.counts()
    );
    assert!(
        tally.first_settled_after(thawed).is_some(),
        "no payment settled after the database thawed"
    );
    check_run("postgres frozen", &platform, &tally, &accounts).expect("the ledger check runs");
}

/// `nfcpayd` killed with SIGKILL under load on SQLite, then started again.
#[tokio::test(flavor = "multi_thread")]
async fn nfcpayd_killed_under_load_keeps_every_acknowledged_payment_once() {
    let mut platform = PlatformFixture::start(&Ledger::Sqlite).expect("platform");
    let load = Load::start(&platform, Duration::from_secs(6))
        .await
        .expect("terminals");

    tokio::time::sleep(Duration::from_millis(2_000)).await;
    let platform = tokio::task::spawn_blocking(move || {
        platform
            .kill_and_restart()
            .map(|()| (platform, Instant::now()))
    })
    .await
    .unwrap();
    let (platform, restarted) = platform.expect("nfcpayd restarted");
    let (tally, accounts) = load.finish().await.expect("the payers");

    a_payment_settled_after(
        "nfcpayd kill -9",
        &tally,
        restarted,
        "the restarted daemon was ready",
    );
    check_run("nfcpayd kill -9", &platform, &tally, &accounts).expect("the ledger check runs");
}

/// The ledger writer thread stopping as a bug would (debug builds stop it on SIGUSR2) under
/// load on SQLite: the daemon drains and exits 70 for systemd to restart it, saying why; no
/// half is answered `500`; after the restart every payment acknowledged as settled is in the
/// ledger exactly once and the payers' re-sends settle the rest.
#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_ledger_writer_drains_and_exits_70_for_a_restart() {
    let mut platform = PlatformFixture::start(&Ledger::Sqlite).expect("platform");
    let load = Load::start(&platform, Duration::from_secs(6))
        .await
        .expect("terminals");

    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let pid = platform.daemon_pids()[0].to_string();
    let stopped = Instant::now();
    assert!(
        std::process::Command::new("kill")
            .args(["-USR2", &pid])
            .status()
            .unwrap()
            .success()
    );
    let platform = tokio::task::spawn_blocking(move || {
        let status = platform.wait_for_exit(Duration::from_secs(20))?;
        let exited = stopped.elapsed();
        let log = platform.daemon_log();
        platform.kill_and_restart()?;
        anyhow::Ok((platform, status, exited, log, Instant::now()))
    })
    .await
    .unwrap();
    let (platform, status, exited, log, restarted) = platform.expect("nfcpayd restarted");
    println!("ledger writer stopped: nfcpayd exited {status:?} {exited:?} after SIGUSR2");
    assert_eq!(status, Some(70), "{log}");
    assert_eq!(
        log.matches("the ledger writer has stopped: draining, then exiting with status 70")
            .count(),
        1,
        "{log}"
    );
    let (tally, accounts) = load.finish().await.expect("the payers");
    a_payment_settled_after(
        "ledger writer stopped",
        &tally,
        restarted,
        "the restarted daemon was ready",
    );
    check_run("ledger writer stopped", &platform, &tally, &accounts)
        .expect("the ledger check runs");
}

/// No secret reaches the daemon's log even at `trace`, the most it logs, nor the SQLite
/// ledger file: not the HSM PIN, not an enrollment code (a good one redeemed, a wrong one
/// refused), while terminals enroll and pay.
#[tokio::test(flavor = "multi_thread")]
async fn no_secret_reaches_the_trace_log_or_the_ledger_file() {
    let mut platform = PlatformFixture::start(&Ledger::Sqlite).expect("platform");
    platform.restart_logging("trace").expect("nfcpayd at trace");
    let pin = std::fs::read_to_string(platform.dir().join("pin")).unwrap();
    platform.account("shop", faults::CURRENCY, None).unwrap();
    let code = platform.add_terminal("shop-1", "shop").unwrap();
    // Another code of the right shape, as random-looking as the real one (a run of zeros
    // could turn up in any hex the log prints).
    let wrong = zeroize::Zeroizing::new(format!("{}{}", &code[1..], &code[..1]));
    assert_ne!(*wrong, *code);
    assert!(
        platform
            .enroll_with_code("shop-1", "shop", &wrong)
            .await
            .is_err()
    );
    platform
        .enroll_with_code("shop-1", "shop", &code)
        .await
        .expect("enrolled");
    let load = Load::start(&platform, Duration::from_secs(1))
        .await
        .expect("terminals");
    let (tally, _) = load.finish().await.expect("the payers");
    assert!(!tally.settled.is_empty(), "no payment settled");
    platform.stop().unwrap();

    let log = platform.daemon_log();
    // The database file and whatever of it is still in the WAL.
    let mut ledger = std::fs::read(platform.dir().join("ledger.db")).unwrap();
    ledger.extend(std::fs::read(platform.dir().join("ledger.db-wal")).unwrap_or_default());
    let trace_lines = log.lines().filter(|line| line.contains(" TRACE ")).count();
    println!(
        "trace log: {} lines ({trace_lines} at TRACE), {} bytes; ledger file {} bytes",
        log.lines().count(),
        log.len(),
        ledger.len()
    );
    assert!(trace_lines > 0, "the daemon did not log at trace: {log}");
    for (what, secret) in [
        ("the HSM PIN", pin.trim()),
        ("the enrollment code", code.as_str()),
        ("the wrong enrollment code", wrong.as_str()),
    ] {
        assert!(!secret.is_empty());
        assert!(!log.contains(secret), "{what} is in the daemon's log");
        assert!(
            !ledger
                .windows(secret.len())
                .any(|window| window == secret.as_bytes()),
            "{what} is in the ledger file"
        );
    }
}

/// A primary with a synchronous standby (streaming replication from a real
/// `pg_basebackup`), two daemons on a libpq multi-host URL with
/// `target_session_attrs=read-write`, the halves of each payment split between them. The
/// primary is killed with SIGKILL under load and the standby promoted (`pg_ctl promote`): the
/// daemons carry on without a restart, and every payment acknowledged as settled is in the
/// promoted database exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn postgres_failover_to_a_synchronous_standby_loses_no_acknowledged_payment() {
    let Some(primary) = postgres::own_cluster() else {
        return;
    };
    let setup = Instant::now();
    let standby = Cluster::start_synchronous_standby(&primary).expect("a synchronous standby");
    println!(
        "postgres failover: standby streaming after {:?}",
        setup.elapsed()
    );
    let url = format!(
        "postgres://postgres@{},{}/{}?target_session_attrs=read-write",
        primary.host_port(),
        standby.host_port(),
        postgres::DATABASE
    );
    let mut platform = PlatformFixture::start(&Ledger::Postgres(url)).expect("platform");
    platform.start_extra_daemon().expect("a second daemon");
    let daemons = platform.daemon_pids();
    let load = Load::start(&platform, Duration::from_secs(8))
        .await
        .expect("terminals");

    tokio::time::sleep(Duration::from_millis(2_000)).await;
    let (primary, standby, promoted) = tokio::task::spawn_blocking(move || {
        primary.kill()?;
        standby.promote()?;
        anyhow::Ok((primary, standby, Instant::now()))
    })
    .await
    .unwrap()
    .expect("primary killed, standby promoted");
    let (tally, accounts) = load.finish().await.expect("the payers");

    a_payment_settled_after(
        "postgres failover",
        &tally,
        promoted,
        "the standby was promoted",
    );
    assert_eq!(platform.daemon_pids(), daemons);
    for pid in daemons {
        assert!(
            std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "nfcpayd {pid} did not survive the failover"
        );
    }
    assert_eq!(
        standby.psql_value("SELECT pg_is_in_recovery()").unwrap(),
        "f",
        "the standby is not the primary now"
    );
    check_run("postgres failover", &platform, &tally, &accounts).expect("the ledger check runs");
    drop(primary);
}

/// The value of the metric line that starts with `series` (name and labels) on the daemon's
/// `/metrics`.
fn metric(platform: &PlatformFixture, series: &str) -> u64 {
    let (status, text) = http_get(&platform.ops_address, "/metrics").expect("/metrics");
    assert_eq!(status, 200, "{text}");
    text.lines()
        .find_map(|line| line.strip_prefix(series))
        .map_or(0, |value| value.trim().parse().expect("a counter"))
}

/// Three times as many idle TCP connections as the enrollment listener's cap (8 here; the
/// handshake timeout raised so that none is dropped during the test): the listener is full —
/// it accepts exactly its cap and no more, before and after the payments — while a terminal
/// pair makes [`FLOOD_PAYMENTS`] payments on the terminal listener, each settled (once in the
/// ledger) within [`FLOOD_PAYMENTS_WITHIN`].
#[tokio::test(flavor = "multi_thread")]
async fn an_idle_flood_on_the_enrollment_listener_leaves_terminals_paying() {
    let platform = PlatformFixture::start_with_settings(
        &Ledger::Sqlite,
        "",
        &format!(
            "enrollment_connections_max = {ENROLLMENT_CAP}\n\
             enrollment_connections_per_address_max = {ENROLLMENT_CAP}\n\
             tls_handshake_timeout_ms = 60000\n"
        ),
    )
    .expect("platform");
    // Enrolled before the flood: enrollment is what the flood blocks.
    let (mut pairs, accounts) = faults::enroll_pairs(&platform, 1).await.expect("terminals");
    let (mut payee, mut payer) = pairs.pop().expect("a pair");
    let accepted = r#"nfcpayd_connections_total{listener="enrollment"} "#;
    let accepted_before = metric(&platform, accepted);

    let flood: Vec<std::net::TcpStream> = (0..FLOOD)
        .map(|_| {
            std::net::TcpStream::connect(&platform.enroll_address).expect("a flood connection")
        })
        .collect();
    let deadline = Instant::now() + FLOOD_PAYMENTS_WITHIN;
    while metric(&platform, accepted) < accepted_before + ENROLLMENT_CAP as u64 {
        assert!(
            Instant::now() < deadline,
            "the flood never filled the enrollment listener"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let tally = Mutex::new(Tally::default());
    let started = Instant::now();
    let took = faults::pay_in_turn(
        &mut payee,
        &mut payer,
        FLOOD_PAYMENTS,
        started + FLOOD_PAYMENTS_WITHIN,
        &tally,
    )
    .await
    .expect("every payment settles during the flood");
    let elapsed = started.elapsed();
    // Still full: the flood held the whole time, and the listener took no more than its cap.
    assert_eq!(
        metric(&platform, accepted),
        accepted_before + ENROLLMENT_CAP as u64
    );
    drop(flood);

    let mut sorted = took.clone();
    sorted.sort();
    println!(
        "enrollment flood ({FLOOD} idle connections, cap {ENROLLMENT_CAP}): {} payments \
         settled in {elapsed:.2?}; per payment median {:.1?}, max {:.1?}",
        took.len(),
        sorted[sorted.len() / 2],
        sorted[sorted.len() - 1],
    );
    assert!(elapsed < FLOOD_PAYMENTS_WITHIN, "{elapsed:?}");
    let tally = tally.into_inner().unwrap();
    check_run("enrollment flood", &platform, &tally, &accounts).expect("the ledger check runs");
}
