//! The load generator's ledger check finds what it is for: on a real platform (SQLite) with
//! two settled payments, it passes with the true receipts, and fails when a receipt is
//! counted twice, when a settlement has no receipt and no failure explains it, or when a
//! receipt names a settlement the ledger does not have.

use std::time::Duration;

use anyhow::{Result, ensure};

use nfcpay_protocol::messages::HalfKind;
use nfcpay_tests::loadgen::{SettledPayment, check_ledger};
use nfcpay_tests::{Ledger, PlatformFixture, TestTerminal};

async fn pay(payee: &mut TestTerminal, payer: &mut TestTerminal) -> Result<SettledPayment> {
    let request = payee.request("2.50", "EUR", "check")?;
    let (_, half_a) = payee.seal(HalfKind::A, &request)?;
    let pending = payee.submit(HalfKind::A, half_a, Duration::ZERO).await?;
    ensure!(!pending.settled, "half A alone settled");
    let instruction = payer.instruction(&request)?;
    let (keys, half_b) = payer.seal(HalfKind::B, &instruction)?;
    let answer = payer.submit(HalfKind::B, half_b, Duration::ZERO).await?;
    ensure!(answer.settled, "half B did not settle");
    let receipt = payer.open_receipt(&keys, &answer.receipt)?;
    SettledPayment::from_receipt(&receipt)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_ledger_check_passes_on_the_truth_and_fails_on_each_lie() {
    let platform = PlatformFixture::start(&Ledger::Sqlite).expect("platform");
    platform
        .account("acct-a", "EUR", Some("100.00"))
        .expect("account a");
    platform
        .account("acct-b", "EUR", Some("100.00"))
        .expect("account b");
    let mut a = platform.enroll("term-a", "acct-a").await.expect("enroll a");
    let mut b = platform.enroll("term-b", "acct-b").await.expect("enroll b");
    b.danger_keep_keys_in_memory().expect("memory keys");
    let first = pay(&mut a, &mut b).await.expect("first payment");
    let second = pay(&mut b, &mut a).await.expect("second payment");
    let storage = platform.storage().expect("storage");
    let accounts = ["acct-a", "acct-b"].map(|id| id.parse().expect("a valid account ID"));
    let eur = "EUR".parse().expect("a valid currency");
    let check = |payments: &[SettledPayment], failed| {
        check_ledger(&storage, payments, &accounts, eur, failed).expect("check runs")
    };

    let truth = check(&[first.clone(), second.clone()], 0);
    assert!(truth.is_ok(), "{truth:?}");
    assert_eq!(truth.ledger_settlements, 2);

    let twice = check(&[first.clone(), second.clone(), first.clone()], 0);
    assert!(!twice.exactly_once, "a receipt counted twice: {twice:?}");

    let missing = check(std::slice::from_ref(&first), 0);
    assert!(
        !missing.exactly_once,
        "a settlement without receipt: {missing:?}"
    );
    let explained = check(std::slice::from_ref(&first), 1);
    assert!(
        explained.exactly_once,
        "explained by a failure: {explained:?}"
    );

    let mut invented = second.clone();
    invented.settlement_id += 1000;
    let wrong = check(&[first, invented], 0);
    assert!(
        !wrong.exactly_once,
        "a settlement the ledger lacks: {wrong:?}"
    );
    assert!(truth.postings_balanced && wrong.postings_balanced);
}
