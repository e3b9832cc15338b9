//! The HSM goes away under load and comes back, against the real `nfcpayd`: the fixture's
//! SoftHSM2 token directory (the one its own `softhsm2.conf` names) is renamed away and back
//! while [`PAIRS`] terminal pairs pay concurrently, on SQLite and on PostgreSQL.
//!
//! What must hold (issue 8): every half refused meanwhile is `503 unavailable`, never `500`;
//! `/readyz` turns 503 naming the HSM and back to 200; the daemon recovers by itself (same
//! process): payments settle again, and a terminal enrolls over a new TLS connection (server
//! key and CA key in the HSM); and no payment is lost — every half answered with an error is
//! sent again, byte for byte, until it is answered, and then every payment is settled exactly
//! once with the balances to match. The figures (halves refused, time to notice the loss and
//! to recover, payments settled) are printed, never asserted.

// A panic is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Mutex;
use std::time::{Duration, Instant};

use nfcpay_tests::faults::{self, Load, PAIRS, Tally, check_run};
use nfcpay_tests::{Ledger, PlatformFixture, http_get};

/// How long the pairs pay before the token goes away.
const WARM_UP: Duration = Duration::from_secs(1);
/// How long the token stays away, at least (the load runs meanwhile).
const TOKEN_AWAY: Duration = Duration::from_secs(2);
/// How long the pairs go on paying once the token is back, if it came back in time.
const AFTER_RETURN: Duration = Duration::from_secs(2);
/// Longest the daemon may take to notice the loss, or to recover once the token is back.
const NOTICE_OR_RECOVER_MAX: Duration = Duration::from_secs(20);
/// How often `/readyz` is asked.
const READINESS_POLL: Duration = Duration::from_millis(20);
/// The answer the payers count as refused by the fault.
const UNAVAILABLE: &str = "503 unavailable";

/// `/readyz`'s status and body (`0` when it did not answer), asked off the async runtime.
async fn readyz(platform: &PlatformFixture) -> (u16, String) {
    let ops = platform.ops_address.clone();
    tokio::task::spawn_blocking(move || {
        http_get(&ops, "/readyz").unwrap_or((0, "no answer".to_owned()))
    })
    .await
    .unwrap()
}

/// How many of `tally`'s answers were sent in `from..to` and were of `kind` (any kind but a
/// success when `None`).
fn answers_between(tally: &Tally, from: Instant, to: Instant, kind: Option<&str>) -> usize {
    tally
        .answers
        .iter()
        .filter(|answer| answer.sent >= from && answer.sent < to)
        .filter(|answer| match kind {
            Some(kind) => answer.kind == kind,
            None => !matches!(answer.kind.as_str(), "200" | "202"),
        })
        .count()
}

/// `duration` in whole milliseconds, or `none`.
fn milliseconds(duration: Option<Duration>) -> String {
    duration.map_or_else(|| "none".to_owned(), |took| took.as_millis().to_string())
}

/// The token renamed away for [`TOKEN_AWAY`] (and until `/readyz` has noticed) and back,
/// while [`PAIRS`] pairs pay on `ledger`; `name` heads the printed figures.
async fn a_token_that_disappears_and_returns_under_load(ledger: Ledger, name: &str) {
    let platform = PlatformFixture::start(&ledger).unwrap();
    let pid = platform.daemon_pids()[0];
    let load = Load::start(&platform, WARM_UP + TOKEN_AWAY + AFTER_RETURN)
        .await
        .expect("terminals");
    let load_started = Instant::now();
    // A terminal registered now enrolls while the token is away (refused) and after it is
    // back (a new TLS handshake signed by the server key, a certificate by the CA key).
    let code = platform.add_terminal("late-shop", "acct-0").unwrap();
    tokio::time::sleep_until((load_started + WARM_UP).into()).await;

    // The token goes away; the pairs go on paying, re-sending what is refused.
    let tokens = platform.token_dir();
    let away = platform.dir().join("tokens.away");
    std::fs::rename(&tokens, &away).unwrap();
    let gone_at = Instant::now();
    let mut readiness_failed = None;
    while gone_at.elapsed() < TOKEN_AWAY || readiness_failed.is_none() {
        assert!(
            gone_at.elapsed() < NOTICE_OR_RECOVER_MAX,
            "/readyz never failed: {:?}",
            readyz(&platform).await
        );
        let (status, body) = readyz(&platform).await;
        if status == 503 && readiness_failed.is_none() {
            assert!(body.contains("hsm: "), "{body}");
            readiness_failed = Some((gone_at.elapsed(), body));
        }
        tokio::time::sleep(READINESS_POLL).await;
    }
    let refused = platform
        .enroll_with_code("late-shop", "acct-0", &code)
        .await
        .err()
        .expect("enrolled while the token was away");
    let refused = format!("{refused:#}");
    assert!(!refused.contains("500"), "{refused}");

    // The token comes back: readiness, payments and enrollment return without a restart.
    std::fs::rename(&away, &tokens).unwrap();
    let back_at = Instant::now();
    let ready_again = loop {
        let (status, body) = readyz(&platform).await;
        if status == 200 {
            break back_at.elapsed();
        }
        assert!(
            back_at.elapsed() < NOTICE_OR_RECOVER_MAX,
            "/readyz still not ready: {body}\n{}",
            platform.daemon_log()
        );
        tokio::time::sleep(READINESS_POLL).await;
    };
    let late = platform
        .enroll_with_code("late-shop", "acct-0", &code)
        .await
        .unwrap_or_else(|error| panic!("no enrollment after recovery: {error:#}"));
    assert_eq!(late.id().as_str(), "late-shop");

    // Every payment under way is finished: its refused halves re-sent, byte for byte.
    let (tally, accounts) = load.finish().await.expect("the payers");
    assert_eq!(platform.daemon_pids(), [pid], "the daemon was restarted");
    let recorded_then_503 = platform
        .daemon_log()
        .matches("half recorded but its receipt could not be sealed")
        .count();
    let refused_away = answers_between(&tally, gone_at, back_at, Some(UNAVAILABLE));
    let not_served_away = answers_between(&tally, gone_at, back_at, None);
    let far_future = back_at + NOTICE_OR_RECOVER_MAX * 10;
    let refused_after = answers_between(&tally, back_at, far_future, None);
    // The first half refused after the token left: when the daemon's answers noticed.
    let first_refusal = tally
        .answers
        .iter()
        .filter(|answer| answer.sent >= gone_at && answer.kind == UNAVAILABLE)
        .map(|answer| answer.sent + answer.took - gone_at)
        .min();
    let first_settled = tally.first_settled_after(back_at);
    let settled_away = tally
        .settled
        .iter()
        .filter(|(at, _)| *at >= gone_at && *at < back_at)
        .count();
    let (readiness_noticed, readiness_said) = readiness_failed.unwrap_or_default();
    println!(
        "{name}: {PAIRS} pairs, token away {:.1} s; noticed: first half refused {} ms, \
         /readyz 503 {} ms after the loss; while away: {refused_away} halves 503 unavailable, \
         {} other errors, {settled_away} payments settled; recovered: first payment settled \
         {} ms, /readyz 200 {} ms after the return, {refused_after} halves refused after it; \
         {recorded_then_503} halves recorded then answered 503; /readyz said: {}",
        back_at.duration_since(gone_at).as_secs_f64(),
        milliseconds(first_refusal),
        readiness_noticed.as_millis(),
        not_served_away - refused_away,
        milliseconds(first_settled),
        ready_again.as_millis(),
        readiness_said.trim(),
    );
    check_run(name, &platform, &tally, &accounts).expect("the ledger check runs");
    assert!(
        refused_away > 0,
        "no half was refused while the token was away: {:?}",
        tally.counts()
    );
    assert!(
        first_settled.is_some(),
        "no payment settled after the token came back\n{}",
        platform.daemon_log()
    );
    let audit = platform.admin_ok(&["audit", "verify"]).unwrap();
    assert!(audit.contains("intact"), "{audit}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_a_token_that_disappears_and_returns_costs_503s_and_loses_no_payment() {
    a_token_that_disappears_and_returns_under_load(Ledger::Sqlite, "hsm fault, sqlite").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_a_token_that_disappears_and_returns_costs_503s_and_loses_no_payment() {
    let Some(ledger) = Ledger::from_environment(true) else {
        eprintln!(
            "NFCPAY_TEST_DATABASE_URL not set: `cargo xtask test` runs this against PostgreSQL"
        );
        return;
    };
    a_token_that_disappears_and_returns_under_load(ledger, "hsm fault, postgres").await;
}

/// A BDK generated with `nfcpay-admin bdk generate` while the daemon runs (issue 11): the
/// daemon searches the token for a BDK ID it has not seen, so a terminal enrolls under the new
/// BDK and pays without a restart or reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bdk_generated_while_the_daemon_runs_is_used_without_restart() {
    const NEW_BDK_ID: &str = "5A5A0001";
    let platform = PlatformFixture::start(&Ledger::Sqlite).unwrap();
    let pid = platform.daemon_pids()[0];
    platform.account("shop", "EUR", None).unwrap();
    platform.account("alice", "EUR", Some("10.00")).unwrap();
    let mut payee = platform.enroll("shop-1", "shop").await.unwrap();

    platform
        .admin_ok(&["bdk", "generate", "--bdk-id", NEW_BDK_ID])
        .unwrap();
    let code = platform
        .add_terminal_with("alice-tablet", "alice", &["--bdk-id", NEW_BDK_ID])
        .unwrap();
    let mut payer = platform
        .enroll_with_code("alice-tablet", "alice", &code)
        .await
        .unwrap_or_else(|error| panic!("{error}\n{}", platform.daemon_log()));
    assert_eq!(
        payer.terminal.keys.status().initial_key_id.bdk_id(),
        NEW_BDK_ID.parse().unwrap()
    );
    let tally = Mutex::new(Tally::default());
    faults::pay_in_turn(
        &mut payee,
        &mut payer,
        1,
        Instant::now() + NOTICE_OR_RECOVER_MAX,
        &tally,
    )
    .await
    .unwrap_or_else(|error| panic!("{error:#}\n{}", platform.daemon_log()));
    assert_eq!(platform.balance("alice").unwrap(), "9.90 EUR");
    assert!(
        platform
            .daemon_log()
            .lines()
            .any(|line| line.contains("BDK found in the token") && line.contains(NEW_BDK_ID)),
        "{}",
        platform.daemon_log()
    );
    assert_eq!(platform.daemon_pids(), [pid], "the daemon was restarted");
}
