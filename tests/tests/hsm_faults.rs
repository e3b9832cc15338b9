//! The HSM goes away under load and comes back, against the real `nfcpayd`: the fixture's
//! SoftHSM2 token directory (the one its own `softhsm2.conf` names) is renamed away and back.
//!
//! What must hold (issue 8): every half refused meanwhile is `503 unavailable`, never `500`;
//! `/readyz` turns 503 naming the HSM and back to 200; the daemon recovers by itself (same
//! process): payments settle again, and a terminal enrolls over a new TLS connection (server
//! key and CA key in the HSM); and no payment is lost — every half that was answered
//! with an error is sent again, byte for byte, and then every payment is settled exactly once
//! with the balances to match. The figures (errors seen, time to recover) are printed, never
//! asserted.

// A panic is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use nfcpay_daemon::storage::TransactionStatus;
use nfcpay_protocol::TxnId;
use nfcpay_protocol::messages::{HalfKind, PaymentRequest, ReceiptStatus};
use nfcpay_terminal_agent::halves::TransactionKeys;
use nfcpay_terminal_agent::platform::PlatformError;
use nfcpay_tests::{Ledger, PlatformFixture, TestTerminal, http_get};

/// How long the token stays away, at least (the load runs meanwhile).
const TOKEN_AWAY: Duration = Duration::from_secs(2);
/// Longest the daemon may take to notice the loss, or to recover once the token is back.
const NOTICE_OR_RECOVER_MAX: Duration = Duration::from_secs(20);
/// The amount of every payment, and how it prints.
const AMOUNT: &str = "1.00";

/// One half as sent: its bytes (for an identical re-send) and the keys that open its receipt.
struct SentHalf {
    kind: HalfKind,
    envelope: Vec<u8>,
    keys: TransactionKeys,
}

/// What became of one half.
#[derive(Debug)]
enum Answer {
    Receipt(ReceiptStatus),
    Refused {
        status: u16,
        code: String,
    },
    /// No HTTP answer (a connection or handshake that failed).
    Unanswered(String),
}

/// Tallies of the answers seen.
#[derive(Debug, Default)]
struct Tally {
    settled: u32,
    pending: u32,
    unavailable: u32,
    no_answer: u32,
    last_no_answer: String,
    other: Vec<String>,
}

impl Tally {
    fn add(&mut self, answer: &Answer) {
        match answer {
            Answer::Receipt(ReceiptStatus::Settled) => self.settled += 1,
            Answer::Receipt(_) => self.pending += 1,
            Answer::Refused { status: 503, code } if code == "unavailable" => {
                self.unavailable += 1;
            }
            Answer::Refused { status, code } => self.other.push(format!("{status} {code}")),
            Answer::Unanswered(reason) => {
                self.no_answer += 1;
                self.last_no_answer.clone_from(reason);
            }
        }
    }
}

async fn send(terminal: &TestTerminal, half: &SentHalf) -> Answer {
    match terminal
        .submit(half.kind, half.envelope.clone(), Duration::ZERO)
        .await
    {
        Ok(reply) => {
            let receipt = terminal
                .open_receipt(&half.keys, &reply.receipt)
                .expect("a receipt that does not verify");
            Answer::Receipt(receipt.status())
        }
        Err(PlatformError::Refused(problem)) => Answer::Refused {
            status: problem.status,
            code: problem.code,
        },
        Err(other) => Answer::Unanswered(other.to_string()),
    }
}

/// One payment: its ID and both halves, sealed once (re-sends use the same bytes).
struct Payment {
    txn_id: TxnId,
    half_a: SentHalf,
    half_b: SentHalf,
    /// Whether the last answer to each half was an error (it is sent again after recovery).
    failed: [bool; 2],
}

fn new_payment(payee: &mut TestTerminal, payer: &mut TestTerminal) -> Payment {
    let request = payee.request(AMOUNT, "EUR", "fault test").unwrap();
    let txn_id = PaymentRequest::decode(&request).unwrap().txn_id;
    let (keys, envelope) = payee.seal(HalfKind::A, &request).unwrap();
    let half_a = SentHalf {
        kind: HalfKind::A,
        envelope,
        keys,
    };
    let instruction = payer.instruction(&request).unwrap();
    let (keys, envelope) = payer.seal(HalfKind::B, &instruction).unwrap();
    let half_b = SentHalf {
        kind: HalfKind::B,
        envelope,
        keys,
    };
    Payment {
        txn_id,
        half_a,
        half_b,
        failed: [false; 2],
    }
}

/// Sends both halves of `payment` and records what came back.
async fn run(payee: &TestTerminal, payer: &TestTerminal, payment: &mut Payment, tally: &mut Tally) {
    let answer = send(payee, &payment.half_a).await;
    payment.failed[0] = !matches!(answer, Answer::Receipt(_));
    tally.add(&answer);
    let answer = send(payer, &payment.half_b).await;
    payment.failed[1] = !matches!(answer, Answer::Receipt(_));
    tally.add(&answer);
}

fn readyz(platform: &PlatformFixture) -> (u16, String) {
    http_get(&platform.ops_address, "/readyz").unwrap_or((0, "no answer".to_owned()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_that_disappears_and_returns_costs_503s_and_loses_no_payment() {
    let platform = PlatformFixture::start(&Ledger::Sqlite).unwrap();
    platform.account("shop", "EUR", None).unwrap();
    platform.account("alice", "EUR", Some("1000.00")).unwrap();
    let mut payee = platform.enroll("shop-1", "shop").await.unwrap();
    let mut payer = platform.enroll("alice-phone", "alice").await.unwrap();
    let pid = platform.daemon_pids()[0];
    let mut payments = Vec::new();
    let mut before = Tally::default();
    for _ in 0..3 {
        let mut payment = new_payment(&mut payee, &mut payer);
        run(&payee, &payer, &mut payment, &mut before).await;
        payments.push(payment);
    }
    assert_eq!(before.settled, 3, "{before:?}\n{}", platform.daemon_log());

    // A terminal registered now enrolls while the token is away (refused) and after it is
    // back (a new TLS handshake signed by the server key, a certificate by the CA key).
    let code = platform.add_terminal("late-shop", "shop").unwrap();

    // The token goes away; payments keep coming.
    let tokens = platform.token_dir();
    let away = platform.dir().join("tokens.away");
    std::fs::rename(&tokens, &away).unwrap();
    let gone_at = Instant::now();
    let mut during = Tally::default();
    let mut readiness_failed = None;
    while gone_at.elapsed() < TOKEN_AWAY || readiness_failed.is_none() {
        assert!(
            gone_at.elapsed() < NOTICE_OR_RECOVER_MAX,
            "/readyz never failed: {:?}",
            readyz(&platform)
        );
        let mut payment = new_payment(&mut payee, &mut payer);
        run(&payee, &payer, &mut payment, &mut during).await;
        payments.push(payment);
        let (status, body) = readyz(&platform);
        if status == 503 && readiness_failed.is_none() {
            assert!(body.contains("hsm: "), "{body}");
            readiness_failed = Some(body);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let refused = platform
        .enroll_with_code("late-shop", "shop", &code)
        .await
        .err()
        .expect("enrolled while the token was away");
    let refused = format!("{refused:#}");
    assert!(!refused.contains("500"), "{refused}");
    assert!(
        during.other.is_empty(),
        "answers other than 503 unavailable while the token was away: {:?}\n{}",
        during.other,
        platform.daemon_log()
    );
    assert!(
        during.unavailable > 0,
        "no half was refused while the token was away: {during:?}"
    );

    // The token comes back: readiness and payments return without a restart.
    std::fs::rename(&away, &tokens).unwrap();
    let back_at = Instant::now();
    let mut after = Tally::default();
    let first_settled = loop {
        assert!(
            back_at.elapsed() < NOTICE_OR_RECOVER_MAX,
            "no payment settled after the token came back: {after:?}\n{}",
            platform.daemon_log()
        );
        let mut payment = new_payment(&mut payee, &mut payer);
        run(&payee, &payer, &mut payment, &mut after).await;
        let settled = payment.failed == [false, false];
        payments.push(payment);
        if settled {
            break back_at.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let ready_again = loop {
        let (status, body) = readyz(&platform);
        if status == 200 {
            break back_at.elapsed();
        }
        assert!(
            back_at.elapsed() < NOTICE_OR_RECOVER_MAX,
            "/readyz still not ready: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(after.other.is_empty(), "{:?}", after.other);
    let late = platform
        .enroll_with_code("late-shop", "shop", &code)
        .await
        .unwrap_or_else(|error| panic!("no enrollment after recovery: {error:#}"));
    assert_eq!(late.id().as_str(), "late-shop");
    let recorded_then_503 = platform
        .daemon_log()
        .matches("half recorded but its receipt could not be sealed")
        .count();
    assert_eq!(platform.daemon_pids(), [pid], "the daemon was restarted");

    // Every half answered with an error is sent again, byte for byte.
    let mut resent = Tally::default();
    for payment in &mut payments {
        if payment.failed[0] {
            let answer = send(&payee, &payment.half_a).await;
            assert!(matches!(answer, Answer::Receipt(_)), "{answer:?}");
            resent.add(&answer);
        }
        if payment.failed[1] {
            let answer = send(&payer, &payment.half_b).await;
            assert!(
                matches!(answer, Answer::Receipt(ReceiptStatus::Settled)),
                "{answer:?}"
            );
            resent.add(&answer);
        }
    }
    // Every payment is settled exactly once, and the balances say so.
    let storage = platform.storage().unwrap();
    for payment in &payments {
        let view = storage.transaction(&payment.txn_id).unwrap().unwrap();
        assert_eq!(view.status, TransactionStatus::Settled);
    }
    let count = payments.len();
    assert_eq!(platform.balance("shop").unwrap(), format!("{count}.00 EUR"));
    assert_eq!(
        platform.balance("alice").unwrap(),
        format!("{}.00 EUR", 1000 - count)
    );
    let audit = platform.admin_ok(&["audit", "verify"]).unwrap();
    assert!(audit.contains("intact"), "{audit}");

    println!(
        "hsm fault: token away {:.1} s; during: {} halves 503 unavailable, {} without an answer, \
         {} settled, {} pending; after return: first payment settled in {} ms, /readyz 200 in \
         {} ms, {} halves refused before that; re-sent {} halves ({} settled receipts); \
         {recorded_then_503} halves recorded then answered 503; payments {count}, lost 0; \
         /readyz said: {}; last half without an answer: {}",
        back_at.duration_since(gone_at).as_secs_f64(),
        during.unavailable,
        during.no_answer,
        during.settled,
        during.pending,
        first_settled.as_millis(),
        ready_again.as_millis(),
        after.unavailable + after.no_answer,
        resent.settled + resent.pending,
        resent.settled,
        readiness_failed.unwrap_or_default().trim(),
        during.last_no_answer,
    );
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
    let mut payment = new_payment(&mut payee, &mut payer);
    let mut tally = Tally::default();
    run(&payee, &payer, &mut payment, &mut tally).await;
    assert_eq!(tally.settled, 1, "{tally:?}\n{}", platform.daemon_log());
    assert_eq!(platform.balance("alice").unwrap(), "9.00 EUR");
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
