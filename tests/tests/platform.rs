//! The platform end to end: the real `nfcpayd` (own SoftHSM2 token, SQLite, or PostgreSQL when
//! `NFCPAY_TEST_DATABASE_URL` is set), driven over real mutual TLS by enrolled terminals.

// A panic is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use nfcpay_protocol::messages::{HalfKind, ReceiptStatus};
use nfcpay_tests::{Ledger, PlatformFixture};

async fn a_payment_settles_and_balances_move(ledger: Ledger) {
    let mut platform = PlatformFixture::start(&ledger).unwrap();
    platform.account("shop", "EUR", None).unwrap();
    platform.account("alice", "EUR", Some("100.00")).unwrap();
    let mut payee = platform.enroll("shop-1", "shop").await.unwrap();
    let mut payer = platform.enroll("alice-phone", "alice").await.unwrap();

    let request = payee.request("12.50", "EUR", "coffee and cake").unwrap();
    let (payee_keys, half_a) = payee.seal(HalfKind::A, &request).unwrap();
    let pending = payee
        .submit(HalfKind::A, half_a, Duration::ZERO)
        .await
        .unwrap();
    assert!(!pending.settled);
    let receipt = payee.open_receipt(&payee_keys, &pending.receipt).unwrap();
    assert_eq!(receipt.status(), ReceiptStatus::Pending);

    let instruction = payer.instruction(&request).unwrap();
    let (payer_keys, half_b) = payer.seal(HalfKind::B, &instruction).unwrap();
    let settled = payer
        .submit(HalfKind::B, half_b, Duration::ZERO)
        .await
        .unwrap();
    assert!(settled.settled, "{}", platform.daemon_log());
    let receipt = payer.open_receipt(&payer_keys, &settled.receipt).unwrap();
    assert_eq!(receipt.status(), ReceiptStatus::Settled);
    assert_eq!(receipt.fields().amount.to_string(), "12.50 EUR");

    assert_eq!(platform.balance("alice").unwrap(), "87.50 EUR");
    assert_eq!(platform.balance("shop").unwrap(), "12.50 EUR");
    let audit = platform.admin_ok(&["audit", "verify"]).unwrap();
    assert!(audit.contains("intact"), "{audit}");
    assert!(audit.contains(", 0 signed checkpoints"), "{audit}");

    // A daemon that stops signs a checkpoint of every chain's head with the receipt key.
    assert_eq!(platform.stop().unwrap(), Some(0));
    let audit = platform.admin_ok(&["audit", "verify"]).unwrap();
    assert!(audit.contains(", 1 signed checkpoints"), "{audit}");
}

#[tokio::test]
async fn sqlite_a_payment_settles_and_balances_move() {
    a_payment_settles_and_balances_move(Ledger::Sqlite).await;
}

#[tokio::test]
async fn postgres_a_payment_settles_and_balances_move() {
    let Some(ledger) = Ledger::from_environment(true) else {
        eprintln!(
            "NFCPAY_TEST_DATABASE_URL not set: `cargo xtask test` runs this against PostgreSQL"
        );
        return;
    };
    a_payment_settles_and_balances_move(ledger).await;
}
