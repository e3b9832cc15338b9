//! The refusal suite (issue 3, item 9): every way a half, a client or an enrollment can be
//! wrong, sent to the real `nfcpayd` over real mutual TLS. Each refusal is checked for its exact
//! problem code and HTTP status (docs/protocol.md §8), for leaving the ledger exactly as it was
//! (every row, and the audit log's length: "a refused half changes no state"), and, where it
//! makes sense, for the correct half still being accepted afterwards.
//!
//! Every scenario runs against SQLite and, when `NFCPAY_TEST_DATABASE_URL` is set (`cargo xtask
//! test` sets it), against PostgreSQL: [`both_ledgers!`] makes the two `#[tokio::test]`s.

// A panic is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fmt::Debug;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nfcpay_daemon::service::now_ms;
use nfcpay_daemon::storage::{Storage, TransactionStatus};
use nfcpay_keystore::key_pair::HsmKeyPair;
use nfcpay_keystore::software::SoftwareKeystore;
use nfcpay_keystore::{KeyPurpose, Keystore};
use nfcpay_protocol::dukpt::{FUTURE_KEY_REGISTERS, KeyAlgorithm};
use nfcpay_protocol::messages::{
    HalfKind, PaymentInstruction, PaymentRequest, Receipt, ReceiptStatus, RequestValidity,
};
use nfcpay_protocol::{Amount, BdkId, DerivationId, InitialKeyId, Ksn, TransactionCounter, TxnId};
use nfcpay_terminal_agent::enroll::{CERTIFICATE_FILE, EnrollError, TLS_KEY_LABEL, enroll};
use nfcpay_terminal_agent::halves::{TransactionKeys, verify_receipt_signature};
use nfcpay_terminal_agent::keys::{STATE_FILE_NAME, register_label};
use nfcpay_terminal_agent::platform::{
    ClientIdentity, HalfReply, PlatformClient, PlatformError, Problem,
};
use nfcpay_tests::{Ledger, LedgerSnapshot, PlatformFixture, TestTerminal};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use zeroize::Zeroizing;

/// Answer at once (no `wait_ms`).
const NO_WAIT: Duration = Duration::ZERO;
/// A BDK ID the fixture's HSM does not hold (until a test makes it).
const FOREIGN_BDK_ID: &str = "DEADBEEF";
/// Longest a test waits for the daemon's expiry sweep (it runs every second).
const EXPIRY_SWEEP_WAIT_MAX: Duration = Duration::from_secs(15);

/// Two `#[tokio::test]`s for a scenario `async fn NAME(ledger: Ledger)`: `NAME::sqlite` and
/// `NAME::postgres` (which returns early when `NFCPAY_TEST_DATABASE_URL` is unset).
macro_rules! both_ledgers {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            use nfcpay_tests::Ledger;

            #[tokio::test]
            async fn sqlite() {
                super::$scenario(Ledger::Sqlite).await;
            }

            #[tokio::test]
            async fn postgres() {
                let Some(ledger) = Ledger::from_environment(true) else {
                    eprintln!(
                        "NFCPAY_TEST_DATABASE_URL not set: `cargo xtask test` runs this against PostgreSQL"
                    );
                    return;
                };
                super::$scenario(ledger).await;
            }
        }
    )*};
}

both_ledgers!(
    tampered_halves,
    replayed_halves,
    stale_counters,
    client_certificates,
    superseded_certificates,
    suspended_and_revoked_terminals,
    mismatched_halves,
    expired_requests,
    unknown_bdks,
    oversized_and_garbage_bodies,
    insufficient_funds,
    resent_halves,
    a_lone_half_waits_for_the_other,
    transaction_status,
    enrollment_refusals,
    racing_halves_settle_once,
    the_audit_chain_survives_a_mixed_run,
);

/// A platform with a payee terminal `shop-1` (account `shop`, EUR, empty) and a payer terminal
/// `alice-phone` (account `alice`, EUR), and the daemon's ledger opened beside it.
struct Market {
    platform: PlatformFixture,
    storage: Storage,
    payee: TestTerminal,
    payer: TestTerminal,
}

impl Market {
    /// The market with `alice` holding 100.00 EUR.
    async fn open(ledger: &Ledger) -> Self {
        Self::open_with_funds(ledger, "100.00").await
    }

    async fn open_with_funds(ledger: &Ledger, payer_funds: &str) -> Self {
        let platform = PlatformFixture::start(ledger).unwrap();
        platform.account("shop", "EUR", None).unwrap();
        platform.account("alice", "EUR", Some(payer_funds)).unwrap();
        let payee = platform.enroll("shop-1", "shop").await.unwrap();
        let payer = platform.enroll("alice-phone", "alice").await.unwrap();
        let storage = platform.storage().unwrap();
        Self {
            platform,
            storage,
            payee,
            payer,
        }
    }

    fn snapshot(&self) -> LedgerSnapshot {
        LedgerSnapshot::of(&self.storage).unwrap()
    }

    /// Awaits `call` — not started yet, futures being lazy — and checks that it is refused with
    /// `status` and `code`, and that the ledger is exactly as it was before.
    async fn refused<T: Debug>(
        &self,
        call: impl Future<Output = Result<T, PlatformError>>,
        status: u16,
        code: &str,
    ) -> Problem {
        let before = self.snapshot();
        let problem = expect_problem(call.await, &self.platform);
        assert_eq!(
            (problem.status, problem.code.as_str()),
            (status, code),
            "wrong refusal: {problem:?}"
        );
        assert_eq!(
            self.snapshot(),
            before,
            "the refusal {code} changed the ledger"
        );
        problem
    }

    /// The payee's half A, submitted without waiting: refused with `status` and `code`, the
    /// ledger unchanged.
    async fn half_a_refused(&self, half_a: Vec<u8>, status: u16, code: &str) -> Problem {
        self.refused(
            self.payee.submit(HalfKind::A, half_a, NO_WAIT),
            status,
            code,
        )
        .await
    }

    /// The payer's half B, submitted without waiting: refused with `status` and `code`, the
    /// ledger unchanged.
    async fn half_b_refused(&self, half_b: Vec<u8>, status: u16, code: &str) -> Problem {
        self.refused(
            self.payer.submit(HalfKind::B, half_b, NO_WAIT),
            status,
            code,
        )
        .await
    }

    /// The payee's half A, submitted without waiting: answered pending, a receipt the payee
    /// opens with `keys`.
    async fn half_a_pending(&self, keys: &TransactionKeys, half_a: Vec<u8>) -> Receipt {
        let submitted = self.payee.submit(HalfKind::A, half_a, NO_WAIT);
        self.answered(&self.payee, keys, submitted, ReceiptStatus::Pending)
            .await
    }

    /// The payer's half B, submitted without waiting: the payment settles, a receipt the
    /// payer opens with `keys`.
    async fn half_b_settles(&self, keys: &TransactionKeys, half_b: Vec<u8>) -> Receipt {
        let submitted = self.payer.submit(HalfKind::B, half_b, NO_WAIT);
        self.answered(&self.payer, keys, submitted, ReceiptStatus::Settled)
            .await
    }

    /// Awaits `call` and checks that it is answered, without a problem, with a receipt of
    /// `status` that `recipient` can open with `keys`.
    async fn answered(
        &self,
        recipient: &TestTerminal,
        keys: &TransactionKeys,
        call: impl Future<Output = Result<HalfReply, PlatformError>>,
        status: ReceiptStatus,
    ) -> Receipt {
        let reply = call
            .await
            .unwrap_or_else(|error| panic!("{error}\n{}", self.platform.daemon_log()));
        assert_eq!(reply.settled, status == ReceiptStatus::Settled);
        let receipt = recipient.open_receipt(keys, &reply.receipt).unwrap();
        assert_eq!(receipt.status(), status);
        receipt
    }

    /// Pays `amount` EUR from the payer to the payee, both halves without waiting; returns
    /// the request and each side's keys.
    async fn settle(&mut self, amount: &str) -> (Vec<u8>, TransactionKeys, TransactionKeys) {
        let request = self.payee.request(amount, "EUR", "settled").unwrap();
        let (payee_keys, half_a) = self.payee.seal(HalfKind::A, &request).unwrap();
        self.half_a_pending(&payee_keys, half_a).await;
        let instruction = self.payer.instruction(&request).unwrap();
        let (payer_keys, half_b) = self.payer.seal(HalfKind::B, &instruction).unwrap();
        self.half_b_settles(&payer_keys, half_b).await;
        (request, payee_keys, payer_keys)
    }

    /// The last check of every scenario: `nfcpay-admin audit verify` finds the chain intact
    /// and as long as the ledger says.
    fn audit_intact(&self) {
        let audit = self.platform.admin_ok(&["audit", "verify"]).unwrap();
        let records = self.snapshot().audit_records;
        assert!(
            audit.contains(&format!("audit log intact: {records} records")),
            "{audit}"
        );
    }
}

/// The problem of a refused call; any other outcome fails the test.
fn expect_problem<T: Debug>(
    result: Result<T, PlatformError>,
    platform: &PlatformFixture,
) -> Problem {
    match result {
        Err(PlatformError::Refused(problem)) => problem,
        other => panic!(
            "expected a refusal, got {other:?}\n{}",
            platform.daemon_log()
        ),
    }
}

/// `terminal`'s instruction for `request`, changed by `change` before it is encoded.
fn instruction_with(
    terminal: &TestTerminal,
    request: &[u8],
    change: impl FnOnce(&mut PaymentInstruction),
) -> Vec<u8> {
    let mut instruction = PaymentInstruction::consenting_to(
        request,
        terminal.id().clone(),
        terminal.account.clone(),
        now_ms(),
    )
    .unwrap();
    change(&mut instruction);
    instruction.encode()
}

/// A request of 12.50 EUR from `terminal`, changed by `change` before it is encoded.
fn request_with(terminal: &TestTerminal, change: impl FnOnce(&mut PaymentRequest)) -> Vec<u8> {
    let mut request = PaymentRequest::decode(&terminal.request("12.50", "EUR", "").unwrap())
        .expect("a fixture request decodes");
    change(&mut request);
    request.encode()
}

fn txn_id_of(request: &[u8]) -> TxnId {
    PaymentRequest::decode(request).unwrap().txn_id
}

fn eur(amount: &str) -> Amount {
    Amount::parse_decimal(amount, "EUR".parse().unwrap()).unwrap()
}

/// `bytes` with the byte at `index` XORed with `mask`.
fn flipped(bytes: &[u8], index: usize, mask: u8) -> Vec<u8> {
    let mut bytes = bytes.to_vec();
    bytes[index] ^= mask;
    bytes
}

/// Where the fields of a half's clear header start (docs/protocol.md §5).
struct HeaderLayout {
    /// The first character of `terminal_id` (after its length byte).
    terminal_id: usize,
    terminal_id_length: usize,
    ksn: usize,
    sent_at: usize,
    nonce: usize,
    body_length: usize,
    body: usize,
}

impl HeaderLayout {
    fn of(envelope: &[u8]) -> Self {
        let terminal_id_length = usize::from(envelope[2]);
        let terminal_id = 3;
        let ksn = terminal_id + terminal_id_length;
        let sent_at = ksn + Ksn::LEN;
        let nonce = sent_at + 8;
        let body_length = nonce + 12;
        let body = body_length + 2;
        let declared = usize::from(u16::from_be_bytes([
            envelope[body_length],
            envelope[body_length + 1],
        ]));
        assert_eq!(
            body + declared,
            envelope.len(),
            "not a half: {envelope:02X?}"
        );
        Self {
            terminal_id,
            terminal_id_length,
            ksn,
            sent_at,
            nonce,
            body_length,
            body,
        }
    }
}

/// The CA certificates of the fixture's PKI.
fn platform_ca(platform: &PlatformFixture) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(&platform.ca_pem().unwrap())
        .collect::<Result<_, _>>()
        .unwrap()
}

/// A client of the platform's listener at `address` presenting `identity` (`None`: no client
/// certificate).
fn client(
    platform: &PlatformFixture,
    address: &str,
    identity: Option<ClientIdentity>,
) -> PlatformClient {
    PlatformClient::new(address, "localhost", &platform_ca(platform), identity).unwrap()
}

/// A second client of the platform for `terminal`, on a connection of its own: its certificate
/// and its keystore-held TLS key. For requests after which the platform closes the connection,
/// and after a daemon restart.
fn new_client(platform: &PlatformFixture, terminal: &TestTerminal) -> PlatformClient {
    let certificate_pem = std::fs::read(terminal.dir().join(CERTIFICATE_FILE)).unwrap();
    let key = HsmKeyPair::find(&terminal.store, &TLS_KEY_LABEL.parse().unwrap())
        .unwrap()
        .expect("an enrolled terminal has its TLS key");
    let identity = ClientIdentity {
        certificate_chain: CertificateDer::pem_slice_iter(&certificate_pem)
            .collect::<Result<_, _>>()
            .unwrap(),
        key: key.rustls_signing_key(),
    };
    client(platform, &platform.address, Some(identity))
}

/// A client identity for `terminal_id` issued by a CA of its own: an unrelated one, or, with
/// `impersonated`, one with the same name and extensions as that CA certificate (but another
/// key).
fn identity_from_another_ca(
    terminal_id: &str,
    impersonated: Option<&CertificateDer<'_>>,
) -> ClientIdentity {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let issuer = match impersonated {
        Some(certificate) => rcgen::Issuer::from_ca_cert_der(certificate, ca_key).unwrap(),
        None => {
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "another terminal CA");
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params.key_usages = vec![
                rcgen::KeyUsagePurpose::KeyCertSign,
                rcgen::KeyUsagePurpose::DigitalSignature,
            ];
            rcgen::Issuer::new(params, ca_key)
        }
    };
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, terminal_id);
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let certificate = params.signed_by(&key, &issuer).unwrap();
    let private_key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    ClientIdentity {
        certificate_chain: vec![certificate.der().clone()],
        key: rustls::crypto::ring::sign::any_ecdsa_type(&private_key).unwrap(),
    }
}

/// Polls the ledger until the payment is no longer pending (the daemon's expiry sweep runs
/// every second).
async fn wait_until_expired(storage: &Storage, txn_id: TxnId) {
    let deadline = Instant::now() + EXPIRY_SWEEP_WAIT_MAX;
    loop {
        let view = storage.transaction(&txn_id).unwrap().unwrap();
        if view.status == TransactionStatus::Expired {
            return;
        }
        assert!(Instant::now() < deadline, "not expired in time: {view:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Copies a directory tree (`cp -a`).
fn copy_tree(from: &Path, to: &Path) {
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "cp -a {} {}",
        from.display(),
        to.display()
    );
}

/// A flipped byte anywhere in a half: the header is the GCM AAD, so a changed header
/// authenticates no more than a changed body or tag — except where an earlier check (§6.1)
/// catches it first: the decoder (version, type, length), the terminal check (terminal ID, the
/// KSN's initial key ID).
async fn tampered_halves(ledger: Ledger) {
    let mut market = Market::open(&ledger).await;
    let request = market.payee.request("12.50", "EUR", "tampered").unwrap();
    let (keys, half_a) = market.payee.seal(HalfKind::A, &request).unwrap();
    let at = HeaderLayout::of(&half_a);
    let counter_low_byte = at.ksn + Ksn::LEN - 1;
    // The terminal ID's last character `1` becomes `0`: `shop-0`, a valid ID, not the sender.
    let terminal_id_last = at.terminal_id + at.terminal_id_length - 1;
    assert_eq!(half_a[terminal_id_last], b'1');
    let cases = [
        ("version", 0, 0x01, 400, "malformed"),
        // 0x41 (half A) becomes 0x42 (half B) on the half A route.
        ("type", 1, 0x03, 400, "wrong-half-type"),
        (
            "terminal ID",
            terminal_id_last,
            0x01,
            403,
            "terminal-mismatch",
        ),
        ("KSN: BDK ID", at.ksn, 0x01, 403, "terminal-mismatch"),
        (
            "KSN: derivation ID",
            at.ksn + 4,
            0x01,
            403,
            "terminal-mismatch",
        ),
        // Counter 1 becomes 0x0101: a valid counter, another key.
        (
            "KSN: counter",
            counter_low_byte - 1,
            0x01,
            400,
            "authentication-failed",
        ),
        // Counter 1 becomes 0: not a counter.
        (
            "KSN: counter to 0",
            counter_low_byte,
            0x01,
            400,
            "malformed",
        ),
        (
            "sent_at",
            at.sent_at + 7,
            0x01,
            400,
            "authentication-failed",
        ),
        // About fifty days away: still the tag first, the clock after it.
        (
            "sent_at, far",
            at.sent_at + 3,
            0x01,
            400,
            "authentication-failed",
        ),
        ("nonce", at.nonce + 5, 0x80, 400, "authentication-failed"),
        ("body_length", at.body_length + 1, 0x01, 400, "malformed"),
        ("body", at.body, 0x01, 400, "authentication-failed"),
        ("tag", half_a.len() - 1, 0x01, 400, "authentication-failed"),
    ];
    assert_eq!(
        half_a[counter_low_byte], 0x01,
        "the terminal's first counter"
    );
    for (field, index, mask, status, code) in cases {
        let tampered = flipped(&half_a, index, mask);
        let problem = market.half_a_refused(tampered, status, code).await;
        eprintln!("flipped {field}: {} {}", problem.code, problem.detail);
    }
    // Each refusal is logged with its problem code and the sender (the log is written as the
    // answer leaves; allow it a moment to reach the file).
    let logged = |code: &str| {
        market.platform.daemon_log().lines().any(|line| {
            line.contains("half refused")
                && line.contains("terminal=shop-1")
                && line.contains(&format!("code={code}"))
                && line.contains("peer=127.0.0.1:")
                && line.contains(&format!("ksn={}", keys.ksn()))
        })
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !(logged("authentication-failed") && logged("wrong-half-type"))
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        logged("authentication-failed"),
        "{}",
        market.platform.daemon_log()
    );
    assert!(
        logged("wrong-half-type"),
        "{}",
        market.platform.daemon_log()
    );
    // Correctly sealed under the same KSN, but sent_at ten minutes ago: the clock check.
    let late = keys
        .seal_half(HalfKind::A, market.payee.id(), &request, now_ms() - 600_000)
        .unwrap();
    market.half_a_refused(late, 400, "clock-skew").await;

    // None of them used the KSN: the genuine half goes through, and its payment settles.
    market.half_a_pending(&keys, half_a).await;
    let instruction = market.payer.instruction(&request).unwrap();
    let (payer_keys, half_b) = market.payer.seal(HalfKind::B, &instruction).unwrap();
    let at = HeaderLayout::of(&half_b);
    for (index, code) in [
        (at.body + 3, "authentication-failed"),
        (half_b.len() - 16, "authentication-failed"),
    ] {
        market
            .refused(
                market
                    .payer
                    .submit(HalfKind::B, flipped(&half_b, index, 0x10), NO_WAIT),
                400,
                code,
            )
            .await;
    }
    market.half_b_settles(&payer_keys, half_b).await;
    assert_eq!(market.platform.balance("alice").unwrap(), "87.50 EUR");
    market.audit_intact();
}

/// The same bytes again get the same answer; the same KSN under other bytes is a replay.
async fn replayed_halves(ledger: Ledger) {
    let mut market = Market::open(&ledger).await;
    let request = market.payee.request("12.50", "EUR", "replayed").unwrap();
    let (payee_keys, half_a) = market.payee.seal(HalfKind::A, &request).unwrap();
    market.half_a_pending(&payee_keys, half_a.clone()).await;
    let instruction = market.payer.instruction(&request).unwrap();
    let (payer_keys, half_b) = market.payer.seal(HalfKind::B, &instruction).unwrap();
    let settled = market.half_b_settles(&payer_keys, half_b.clone()).await;

    // Byte-identical re-sends after settlement: 200, the same settled receipt, nothing new.
    let before = market.snapshot();
    for (terminal, keys, kind, half) in [
        (&market.payer, &payer_keys, HalfKind::B, &half_b),
        (&market.payee, &payee_keys, HalfKind::A, &half_a),
    ] {
        let again = market
            .answered(
                terminal,
                keys,
                terminal.submit(kind, half.clone(), NO_WAIT),
                ReceiptStatus::Settled,
            )
            .await;
        assert_eq!(again.fields().settlement_id, settled.fields().settlement_id);
        assert_eq!(again.fields().settled_at_ms, settled.fields().settled_at_ms);
    }
    assert_eq!(
        market.snapshot(),
        before,
        "an idempotent re-send changed the ledger"
    );

    // The same KSN sealing other bytes: the same plaintext with a new nonce…
    let resealed = payer_keys
        .seal_half(HalfKind::B, market.payer.id(), &instruction, now_ms())
        .unwrap();
    assert_ne!(resealed, half_b);
    market.half_b_refused(resealed, 409, "replayed-ksn").await;
    // …and another payment altogether, on both sides.
    let other_request = market.payee.request("1.00", "EUR", "other").unwrap();
    let other_a = payee_keys
        .seal_half(HalfKind::A, market.payee.id(), &other_request, now_ms())
        .unwrap();
    market.half_a_refused(other_a, 409, "replayed-ksn").await;
    let other_instruction = market.payer.instruction(&other_request).unwrap();
    let other_b = payer_keys
        .seal_half(HalfKind::B, market.payer.id(), &other_instruction, now_ms())
        .unwrap();
    market.half_b_refused(other_b, 409, "replayed-ksn").await;

    // Under fresh KSNs the other payment goes through.
    let (keys, half) = market.payee.seal(HalfKind::A, &other_request).unwrap();
    market.half_a_pending(&keys, half).await;
    let (keys, half) = market.payer.seal(HalfKind::B, &other_instruction).unwrap();
    market.half_b_settles(&keys, half).await;
    assert_eq!(market.platform.balance("alice").unwrap(), "86.50 EUR");
    market.audit_intact();
}

/// A counter more than the replay window (1024) below the terminal's highest is stale; one
/// inside the window that was never used is accepted out of order.
async fn stale_counters(ledger: Ledger) {
    let mut market = Market::open(&ledger).await;
    let early_request = market.payee.request("1.00", "EUR", "early").unwrap();
    let (early_keys, early_half) = market.payee.seal(HalfKind::A, &early_request).unwrap();
    let skip = |terminal: &mut TestTerminal, counters: usize| {
        for _ in 0..counters {
            terminal.terminal.keys.next_transaction().unwrap();
        }
    };
    skip(&mut market.payee, 1000);
    let inside_request = market.payee.request("2.00", "EUR", "inside").unwrap();
    let (inside_keys, inside_half) = market.payee.seal(HalfKind::A, &inside_request).unwrap();
    skip(&mut market.payee, 100);
    let late_request = market.payee.request("3.00", "EUR", "late").unwrap();
    let (late_keys, late_half) = market.payee.seal(HalfKind::A, &late_request).unwrap();
    let counter = |keys: &TransactionKeys| i64::from(keys.ksn().counter().get());
    assert!(counter(&early_keys) < counter(&late_keys) - 1024);
    assert!(counter(&inside_keys) > counter(&late_keys) - 1024);

    market.half_a_pending(&late_keys, late_half).await;
    market.half_a_refused(early_half, 409, "stale-ksn").await;
    market.half_a_pending(&inside_keys, inside_half).await;
    market.audit_intact();
}

/// Terminal X's certificate with a half of terminal Y; no certificate; certificates from
/// another CA (an unrelated one, and an impostor with the platform CA's very name).
async fn client_certificates(ledger: Ledger) {
    let mut market = Market::open(&ledger).await;
    let request = market
        .payee
        .request("12.50", "EUR", "certificates")
        .unwrap();
    let (keys, half_a) = market.payee.seal(HalfKind::A, &request).unwrap();

    // The payer's certificate, the payee's half (which authenticates under the payee's key).
    market
        .refused(
            market
                .payer
                .terminal
                .platform
                .submit_half(HalfKind::A, half_a.clone(), NO_WAIT),
            403,
            "terminal-mismatch",
        )
        .await;

    // No client certificate: the terminal listener fails the handshake, no HTTP answer at all,
    // on every route. The enrollment listener takes no certificate, and has no half route.
    for kind in [HalfKind::A, HalfKind::B] {
        let anonymous = client(&market.platform, &market.platform.address, None);
        no_connection(
            &market,
            anonymous.submit_half(kind, half_a.clone(), NO_WAIT),
        )
        .await;
    }
    let anonymous = client(&market.platform, &market.platform.address, None);
    no_connection(&market, anonymous.transaction(txn_id_of(&request))).await;
    for kind in [HalfKind::A, HalfKind::B] {
        // One request per connection on the enrollment listener.
        let enrollee = client(&market.platform, &market.platform.enroll_address, None);
        market
            .refused(
                enrollee.submit_half(kind, half_a.clone(), NO_WAIT),
                404,
                "not-found",
            )
            .await;
    }

    // A certificate for `shop-1` from another CA: no TLS connection either.
    let platform_ca = platform_ca(&market.platform);
    for impersonated in [None, Some(&platform_ca[0])] {
        let identity = identity_from_another_ca(market.payee.id().as_str(), impersonated);
        let rogue = client(&market.platform, &market.platform.address, Some(identity));
        let reason = no_connection(
            &market,
            rogue.submit_half(HalfKind::A, half_a.clone(), NO_WAIT),
        )
        .await;
        eprintln!(
            "another CA (impostor: {}): {reason}",
            impersonated.is_some()
        );
    }

    // The payee's own certificate: accepted.
    market.half_a_pending(&keys, half_a).await;
    let instruction = market.payer.instruction(&request).unwrap();
    let (keys, half_b) = market.payer.seal(HalfKind::B, &instruction).unwrap();
    market.half_b_settles(&keys, half_b).await;
    market.audit_intact();
}

/// A certificate the terminal CA issued for `shop-1` that a re-enrollment superseded (the
/// terminal's enrolled serial is now another) is refused `terminal-mismatch` on every route,
/// changing nothing: right after a payment, while the daemon's memory of active terminals may
/// still hold the old serial (the ledger's own check in the transaction refuses it then), and
/// again after. With the enrolled serial back, the same certificate pays as before.
async fn superseded_certificates(ledger: Ledger) {
    let mut market = Market::open(&ledger).await;
    let (earlier, _, _) = market.settle("1.00").await;
    let shop = market.payee.id().clone();
    let enrolled = market
        .storage
        .terminal(&shop)
        .unwrap()
        .unwrap()
        .certificate_serial
        .expect("an enrolled terminal has a certificate serial");
    // The serial a re-enrollment would have issued: any other.
    let reissued = match enrolled.strip_prefix('4') {
        Some(rest) => format!("5{rest}"),
        None => format!("4{}", enrolled.get(1..).unwrap_or_default()),
    };
    market
        .storage
        .danger_replace_certificate_serial(&shop, &reissued)
        .unwrap();

    for attempt in ["at once", "again"] {
        let request = market.payee.request("2.00", "EUR", attempt).unwrap();
        let (_, half_a) = market.payee.seal(HalfKind::A, &request).unwrap();
        let problem = market
            .half_a_refused(half_a, 403, "terminal-mismatch")
            .await;
        assert!(
            problem.detail.contains("enrolled certificate"),
            "{attempt}: {problem:?}"
        );
    }
    market
        .refused(
            market
                .payee
                .terminal
                .platform
                .transaction(txn_id_of(&earlier)),
            403,
            "terminal-mismatch",
        )
        .await;
    // The other terminal is not concerned.
    market
        .payer
        .terminal
        .platform
        .transaction(txn_id_of(&earlier))
        .await
        .unwrap();

    market
        .storage
        .danger_replace_certificate_serial(&shop, &enrolled)
        .unwrap();
    market.settle("3.00").await;
    market.audit_intact();
}

/// Awaits a call whose TLS handshake the platform refuses, and checks that it got no HTTP
/// answer at all and that the ledger is unchanged.
async fn no_connection<T: Debug>(
    market: &Market,
    call: impl Future<Output = Result<T, PlatformError>>,
) -> String {
    let before = market.snapshot();
    let reason = match call.await {
        Err(error @ PlatformError::Connection { .. }) => {
            nfcpay_protocol::ErrorChain(&error).to_string()
        }
        other => panic!("expected a refused handshake, got {other:?}"),
    };
    assert_eq!(market.snapshot(), before);
    reason
}

/// A suspended terminal's halves are refused until it is reactivated (it may still read its
/// payments' status); a revoked terminal is refused for good, on every route.
async fn suspended_and_revoked_terminals(ledger: Ledger) {
    let mut market = Market::open(&ledger).await;
    let (earlier, payee_keys_earlier, _) = market.settle("1.00").await;
    let request = market.payee.request("12.50", "EUR", "suspended").unwrap();
    let (payee_keys, half_a) = market.payee.seal(HalfKind::A, &request).unwrap();
    let instruction = market.payer.instruction(&request).unwrap();
    let (_, half_b) = market.payer.seal(HalfKind::B, &instruction).unwrap();

    market
        .platform
        .admin_ok(&["terminals", "suspend", "--id", "shop-1"])
        .unwrap();
    market
        .half_a_refused(half_a.clone(), 403, "terminal-suspended")
        .await;
    let status = market
        .payee
        .terminal
        .platform
        .transaction(txn_id_of(&earlier))
        .await
        .unwrap();
    let receipt = market
        .payee
        .open_receipt(&payee_keys_earlier, &status)
        .unwrap();
    assert_eq!(receipt.status(), ReceiptStatus::Settled);
    market
        .platform
        .admin_ok(&["terminals", "reactivate", "--id", "shop-1"])
        .unwrap();
    market.half_a_pending(&payee_keys, half_a).await;

    market
        .platform
        .admin_ok(&["terminals", "revoke", "--id", "alice-phone"])
        .unwrap();
    market
        .half_b_refused(half_b.clone(), 403, "terminal-revoked")
        .await;
    market
        .refused(
            market
                .payer
                .terminal
                .platform
                .transaction(txn_id_of(&earlier)),
            403,
            "terminal-revoked",
        )
        .await;
    // Revoked is final.
    let reactivate = market
        .platform
        .admin(&["terminals", "reactivate", "--id", "alice-phone"], "")
        .unwrap();
    assert!(!reactivate.status.success());
    market.half_b_refused(half_b, 403, "terminal-revoked").await;
    assert_eq!(market.platform.balance("alice").unwrap(), "99.00 EUR");
    market.audit_intact();
}

/// Half B disagreeing with half A on amount, currency, payee or the request digest (or naming
/// an account not its terminal's) settles nothing; the agreeing half B then does.
async fn mismatched_halves(ledger: Ledger) {
    let mut market = Market::open(&ledger).await;
    market
        .platform
        .account("bob", "EUR", Some("50.00"))
        .unwrap();
    let request = market.payee.request("12.50", "EUR", "mismatched").unwrap();
    let (keys, half_a) = market.payee.seal(HalfKind::A, &request).unwrap();
    market.half_a_pending(&keys, half_a).await;

    // A half A naming an account that is not its terminal's, one the ledger does not have,
    // and a payment in another currency than the payee's account.
    let foreign_account = request_with(&market.payee, |request| {
        request.payee_account_id = "bob".parse().unwrap();
    });
    let (_, half) = market.payee.seal(HalfKind::A, &foreign_account).unwrap();
    market.half_a_refused(half, 403, "foreign-account").await;
    let unknown_account = request_with(&market.payee, |request| {
        request.payee_account_id = "nobody".parse().unwrap();
    });
    let (_, half) = market.payee.seal(HalfKind::A, &unknown_account).unwrap();
    market.half_a_refused(half, 422, "unknown-account").await;
    let dollars = market.payee.request("12.50", "USD", "dollars").unwrap();
    let (_, half) = market.payee.seal(HalfKind::A, &dollars).unwrap();
    market.half_a_refused(half, 422, "account-currency").await;

    // Halves whose message names another terminal than the one sending it.
    let foreign_payee = request_with(&market.payee, |request| {
        request.payee_terminal_id = "alice-phone".parse().unwrap();
    });
    let (_, half) = market.payee.seal(HalfKind::A, &foreign_payee).unwrap();
    market.half_a_refused(half, 403, "terminal-mismatch").await;
    let foreign_payer = instruction_with(&market.payer, &request, |instruction| {
        instruction.payer_terminal_id = "shop-1".parse().unwrap();
    });
    let (_, half) = market.payer.seal(HalfKind::B, &foreign_payer).unwrap();
    market.half_b_refused(half, 403, "terminal-mismatch").await;

    type Change = fn(&mut PaymentInstruction);
    let cases: [(&str, Change, u16, &str); 7] = [
        ("amount", |i| i.amount = eur("12.49"), 422, "mismatch"),
        (
            "currency",
            |i| i.amount = Amount::parse_decimal("12.50", "USD".parse().unwrap()).unwrap(),
            422,
            "mismatch",
        ),
        (
            "payee",
            |i| i.payee_terminal_id = "shop-2".parse().unwrap(),
            422,
            "mismatch",
        ),
        (
            "payer account of no terminal",
            |i| i.payer_account_id = "bob".parse().unwrap(),
            403,
            "foreign-account",
        ),
        (
            "unknown payer account",
            |i| i.payer_account_id = "nobody".parse().unwrap(),
            422,
            "unknown-account",
        ),
        (
            "request digest",
            |i| i.request_digest[31] ^= 1,
            422,
            "digest-mismatch",
        ),
        // The request digest still matches: only the digest is checked against half A's bytes.
        (
            "everything but the digest",
            |i| {
                i.amount = eur("1.00");
                i.payee_terminal_id = "shop-2".parse().unwrap();
            },
            422,
            "mismatch",
        ),
    ];
    for (what, change, status, code) in cases {
        let instruction = instruction_with(&market.payer, &request, change);
        let (_, half_b) = market.payer.seal(HalfKind::B, &instruction).unwrap();
        let problem = market.half_b_refused(half_b, status, code).await;
        eprintln!("{what}: {}", problem.detail);
    }

    let instruction = market.payer.instruction(&request).unwrap();
    let (keys, half_b) = market.payer.seal(HalfKind::B, &instruction).unwrap();
    market.half_b_settles(&keys, half_b).await;
    assert_eq!(market.platform.balance("alice").unwrap(), "87.50 EUR");
    assert_eq!(market.platform.balance("bob").unwrap(), "50.00 EUR");
    market.audit_intact();
}

/// A request past its validity is refused at half A, whether half B came first or not; a
/// payment whose request runs out while it waits for half B expires, says so, and refuses B.
async fn expired_requests(ledger: Ledger) {
    let mut market = Market::open(&ledger).await;
    let now = now_ms();
    let expired = request_with(&market.payee, |request| {
        request.validity = RequestValidity::new(now - 120_000, now - 60_000).unwrap();
    });
    let (_, half_a) = market.payee.seal(HalfKind::A, &expired).unwrap();
    market.half_a_refused(half_a, 410, "expired").await;

    // Half B carries no expiry: it waits; the expired half A is refused all the same.
    let instruction = market.payer.instruction(&expired).unwrap();
    let (payer_keys, half_b) = market.payer.seal(HalfKind::B, &instruction).unwrap();
    market
        .answered(
            &market.payer,
            &payer_keys,
            market.payer.submit(HalfKind::B, half_b, NO_WAIT),
            ReceiptStatus::Pending,
        )
        .await;
    let (_, half_a) = market.payee.seal(HalfKind::A, &expired).unwrap();
    market.half_a_refused(half_a, 410, "expired").await;

    // Valid for 1.5 s more when half A arrives; half B comes after the expiry sweep.
    let now = now_ms();
    let short = request_with(&market.payee, |request| {
        request.validity = RequestValidity::new(now - 1_000, now + 1_500).unwrap();
    });
    let (payee_keys, half_a) = market.payee.seal(HalfKind::A, &short).unwrap();
    market.half_a_pending(&payee_keys, half_a).await;
    wait_until_expired(&market.storage, txn_id_of(&short)).await;
    let status = market
        .payee
        .terminal
        .platform
        .transaction(txn_id_of(&short))
        .await
        .unwrap();
    let receipt = market.payee.open_receipt(&payee_keys, &status).unwrap();
    assert_eq!(receipt.status(), ReceiptStatus::Expired);
    let instruction = market.payer.instruction(&short).unwrap();
    let (_, half_b) = market.payer.seal(HalfKind::B, &instruction).unwrap();
    market.half_b_refused(half_b, 410, "expired").await;
    assert_eq!(market.platform.balance("alice").unwrap(), "100.00 EUR");

    // Dated a day ahead: its lifetime would not even have started.
    let tomorrow = now_ms() + 86_400_000;
    let future = request_with(&market.payee, |request| {
        request.validity = RequestValidity::new(tomorrow, tomorrow + 600_000).unwrap();
    });
    let (_, half_a) = market.payee.seal(HalfKind::A, &future).unwrap();
    market.half_a_refused(half_a, 400, "clock-skew").await;
    market.audit_intact();
}

/// A KSN under a BDK the platform does not hold. From an enrolled terminal, such a KSN is not
/// the terminal's (§6.1 step 4 compares the whole initial key ID first): terminal-mismatch.
/// `unknown-bdk` needs a terminal registered under a BDK that is gone from the HSM: the token is
/// restored from a backup taken before that BDK was made.
async fn unknown_bdks(ledger: Ledger) {
    let mut market = Market::open(&ledger).await;
    let foreign_bdk: BdkId = FOREIGN_BDK_ID.parse().unwrap();

    // Properly sealed, under a BDK of a software keystore the platform never saw.
    let request = market.payee.request("12.50", "EUR", "foreign").unwrap();
    let foreign: Arc<dyn Keystore> = Arc::new(SoftwareKeystore::in_memory());
    foreign
        .generate_bdk(foreign_bdk, KeyAlgorithm::Aes256)
        .unwrap();
    let ksn = Ksn::new(
        InitialKeyId::new(foreign_bdk, DerivationId::from([0, 0, 0, 1])),
        TransactionCounter::try_from(1).unwrap(),
    );
    let transaction_key =
        nfcpay_keystore::dukpt::transaction_key(foreign.as_ref(), ksn, KeyPurpose::Derive).unwrap();
    let foreign_keys =
        TransactionKeys::derive(Arc::clone(&foreign), ksn, &transaction_key).unwrap();
    foreign.destroy(transaction_key).unwrap();
    let foreign_half = foreign_keys
        .seal_half(HalfKind::A, market.payee.id(), &request, now_ms())
        .unwrap();
    market
        .half_a_refused(foreign_half, 403, "terminal-mismatch")
        .await;

    // A terminal enrolled under a second BDK, which then disappears from the token.
    let tokens = market.platform.token_dir();
    let backup = market.platform.dir().join("tokens-backup");
    market.platform.stop().unwrap();
    copy_tree(&tokens, &backup);
    market
        .platform
        .admin_ok(&["bdk", "generate", "--bdk-id", FOREIGN_BDK_ID])
        .unwrap();
    market.platform.restart().unwrap();
    market.platform.account("ghost", "EUR", None).unwrap();
    let code = market
        .platform
        .add_terminal_with("ghost-1", "ghost", &["--bdk-id", FOREIGN_BDK_ID])
        .unwrap();
    let mut ghost = market
        .platform
        .enroll_with_code("ghost-1", "ghost", &code)
        .await
        .unwrap();
    assert_eq!(
        ghost.terminal.keys.status().initial_key_id.bdk_id(),
        foreign_bdk
    );
    market.platform.stop().unwrap();
    std::fs::remove_dir_all(&tokens).unwrap();
    std::fs::rename(&backup, &tokens).unwrap();
    market.platform.restart().unwrap();

    let ghost_request = ghost.request("1.00", "EUR", "ghost").unwrap();
    let (_, ghost_half) = ghost.seal(HalfKind::A, &ghost_request).unwrap();
    let ghost_client = new_client(&market.platform, &ghost);
    market
        .refused(
            ghost_client.submit_half(HalfKind::A, ghost_half, NO_WAIT),
            400,
            "unknown-bdk",
        )
        .await;

    // The platform's own BDK still works (new connections: the daemon restarted).
    let (keys, half_a) = market.payee.seal(HalfKind::A, &request).unwrap();
    let payee_client = new_client(&market.platform, &market.payee);
    market
        .answered(
            &market.payee,
            &keys,
            payee_client.submit_half(HalfKind::A, half_a, NO_WAIT),
            ReceiptStatus::Pending,
        )
        .await;
    market.audit_intact();
}

/// Bodies that are not halves: too large (refused before reading), garbage, truncated, padded,
/// empty, the other half's type, or an authentic half whose plaintext is not a request.
async fn oversized_and_garbage_bodies(ledger: Ledger) {
    let mut market = Market::open(&ledger).await;
    let request = market.payee.request("12.50", "EUR", "bodies").unwrap();
    let (keys, half_a) = market.payee.seal(HalfKind::A, &request).unwrap();

    // The platform closes the connection after a body it refuses unread: a client of its own.
    let oversized_client = new_client(&market.platform, &market.payee);
    market
        .refused(
            oversized_client.submit_half(HalfKind::A, vec![0x41; 5000], NO_WAIT),
            413,
            "body-too-large",
        )
        .await;

    let mut padded = half_a.clone();
    padded.push(0);
    let garbage: Vec<u8> = (0..=255).collect();
    for body in [
        b"this is not a half".to_vec(),
        garbage,
        Vec::new(),
        half_a[..half_a.len() - 1].to_vec(),
        padded,
    ] {
        market.half_a_refused(body, 400, "malformed").await;
    }
    market
        .refused(
            market.payee.submit(HalfKind::B, half_a.clone(), NO_WAIT),
            400,
            "wrong-half-type",
        )
        .await;
    // Authentic envelopes whose plaintext is not the route's message.
    let instruction = market.payer.instruction(&request).unwrap();
    for plaintext in [b"sealed, but not a request".as_slice(), &instruction] {
        let (_, sealed) = market.payee.seal(HalfKind::A, plaintext).unwrap();
        market.half_a_refused(sealed, 400, "malformed").await;
    }

    market.half_a_pending(&keys, half_a).await;
    market.audit_intact();
}

/// A payer without the funds: refused, nothing moves, no counter used — after funding, the very
/// same half B settles.
async fn insufficient_funds(ledger: Ledger) {
    let mut market = Market::open_with_funds(&ledger, "5.00").await;
    let request = market.payee.request("12.50", "EUR", "too dear").unwrap();
    let (keys, half_a) = market.payee.seal(HalfKind::A, &request).unwrap();
    market.half_a_pending(&keys, half_a).await;
    let instruction = market.payer.instruction(&request).unwrap();
    let (payer_keys, half_b) = market.payer.seal(HalfKind::B, &instruction).unwrap();
    market
        .half_b_refused(half_b.clone(), 422, "insufficient-funds")
        .await;
    assert_eq!(market.platform.balance("alice").unwrap(), "5.00 EUR");
    assert_eq!(market.platform.balance("shop").unwrap(), "0.00 EUR");

    market
        .platform
        .admin_ok(&["accounts", "fund", "--id", "alice", "--amount", "10.00"])
        .unwrap();
    market.half_b_settles(&payer_keys, half_b).await;
    assert_eq!(market.platform.balance("alice").unwrap(), "2.50 EUR");
    assert_eq!(market.platform.balance("shop").unwrap(), "12.50 EUR");
    market.audit_intact();
}

/// Re-sending a half gets the payment's current answer and changes nothing; another half under
/// the same transaction ID is a conflict, before and after settlement.
async fn resent_halves(ledger: Ledger) {
    let mut market = Market::open(&ledger).await;
    let request = market.payee.request("12.50", "EUR", "resent").unwrap();
    let (payee_keys, half_a) = market.payee.seal(HalfKind::A, &request).unwrap();
    let first = market.half_a_pending(&payee_keys, half_a.clone()).await;
    let before = market.snapshot();
    let again = market.half_a_pending(&payee_keys, half_a.clone()).await;
    assert_eq!(again, first);
    // Byte for byte: the same receipt body and CMAC, and a signature computed anew (SoftHSM2's
    // ECDSA draws a random nonce, so its bytes differ) that verifies.
    let sealed_first = market
        .payee
        .submit(HalfKind::A, half_a.clone(), NO_WAIT)
        .await
        .unwrap()
        .receipt;
    let sealed_again = market
        .payee
        .submit(HalfKind::A, half_a.clone(), NO_WAIT)
        .await
        .unwrap()
        .receipt;
    let (body_first, signature_first) = sealed_first.split_at(sealed_first.len() - 64);
    let (body_again, signature_again) = sealed_again.split_at(sealed_again.len() - 64);
    assert_eq!(
        body_first, body_again,
        "a re-send got another receipt body or CMAC"
    );
    assert_ne!(
        signature_first, signature_again,
        "the signature was not computed anew"
    );
    assert_eq!(
        market
            .payee
            .open_receipt(&payee_keys, &sealed_again)
            .unwrap(),
        first
    );
    assert_eq!(market.snapshot(), before, "a re-send changed the ledger");

    // Another half A from the same payee under the same transaction ID, other content.
    let txn_id = txn_id_of(&request);
    let other_request = request_with(&market.payee, |other| {
        other.txn_id = txn_id;
        other.amount = eur("99.00");
    });
    let (_, conflicting_a) = market.payee.seal(HalfKind::A, &other_request).unwrap();
    market
        .refused(
            market
                .payee
                .submit(HalfKind::A, conflicting_a.clone(), NO_WAIT),
            409,
            "conflict",
        )
        .await;

    let instruction = market.payer.instruction(&request).unwrap();
    let (payer_keys, half_b) = market.payer.seal(HalfKind::B, &instruction).unwrap();
    market.half_b_settles(&payer_keys, half_b).await;

    let before = market.snapshot();
    market
        .answered(
            &market.payee,
            &payee_keys,
            market.payee.submit(HalfKind::A, half_a, NO_WAIT),
            ReceiptStatus::Settled,
        )
        .await;
    assert_eq!(market.snapshot(), before, "a re-send changed the ledger");
    market.half_a_refused(conflicting_a, 409, "conflict").await;
    let (_, conflicting_a) = market.payee.seal(HalfKind::A, &other_request).unwrap();
    market.half_a_refused(conflicting_a, 409, "conflict").await;
    // Another half B of the payer for the settled payment (consented at another time).
    let later = instruction_with(&market.payer, &request, |i| i.consented_at_ms += 1);
    let (_, conflicting_b) = market.payer.seal(HalfKind::B, &later).unwrap();
    market.half_b_refused(conflicting_b, 409, "conflict").await;
    assert_eq!(market.platform.balance("alice").unwrap(), "87.50 EUR");
    market.audit_intact();
}

/// Half A asks to wait two seconds; half B is sent once the ledger holds half A (an explicit
/// signal, not a guessed delay) and settles the payment; half A's answer is the settled
/// receipt, as soon as that happens. Both receipts verify, with each terminal's key and with
/// the platform's receipt key alone.
async fn a_lone_half_waits_for_the_other(ledger: Ledger) {
    let mut market = Market::open(&ledger).await;
    let request = market.payee.request("12.50", "EUR", "waiting").unwrap();
    let (payee_keys, half_a) = market.payee.seal(HalfKind::A, &request).unwrap();
    let instruction = market.payer.instruction(&request).unwrap();
    let (payer_keys, half_b) = market.payer.seal(HalfKind::B, &instruction).unwrap();

    let wait = Duration::from_secs(2);
    let started = Instant::now();
    let (answer_a, answer_b) = tokio::join!(
        async {
            let answer = market.payee.submit(HalfKind::A, half_a, wait).await;
            (answer, started.elapsed())
        },
        async {
            // Half A is recorded (and its sender waiting) before half B leaves.
            let txn_id = txn_id_of(&request);
            let deadline = Instant::now() + wait;
            while market.storage.transaction(&txn_id).unwrap().is_none() {
                assert!(Instant::now() < deadline, "half A never reached the ledger");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            market.payer.submit(HalfKind::B, half_b, NO_WAIT).await
        },
    );
    let (answer_a, waited) = answer_a;
    let answer_a = answer_a.unwrap();
    let answer_b = answer_b.unwrap();
    assert!(
        answer_a.settled,
        "half A was answered pending after {waited:?}"
    );
    assert!(waited < wait, "half A was held to the deadline: {waited:?}");
    let receipt_a = market
        .payee
        .open_receipt(&payee_keys, &answer_a.receipt)
        .unwrap();
    let receipt_b = market
        .payer
        .open_receipt(&payer_keys, &answer_b.receipt)
        .unwrap();
    assert_eq!(receipt_a.status(), ReceiptStatus::Settled);
    let receipt_key = &market.payee.terminal.receipt_public_key;
    for bytes in [&answer_a.receipt, &answer_b.receipt] {
        let receipt = verify_receipt_signature(bytes, receipt_key).unwrap();
        assert_eq!(receipt.fields().txn_id, txn_id_of(&request));
    }
    // Half B found half A waiting, unless the machine was very slow: then its answer was
    // pending and the payment settled with A's arrival. Either way both see one settlement.
    let status = market
        .payer
        .terminal
        .platform
        .transaction(txn_id_of(&request))
        .await
        .unwrap();
    let latest_b = market.payer.open_receipt(&payer_keys, &status).unwrap();
    assert_eq!(latest_b.status(), ReceiptStatus::Settled);
    assert_eq!(
        latest_b.fields().settlement_id,
        receipt_a.fields().settlement_id
    );
    if answer_b.settled {
        assert_eq!(receipt_b.fields(), latest_b.fields());
    }

    // A half whose partner never comes is answered pending when the wait runs out.
    let request = market.payee.request("1.00", "EUR", "alone").unwrap();
    let (keys, half_a) = market.payee.seal(HalfKind::A, &request).unwrap();
    let wait = Duration::from_millis(400);
    let started = Instant::now();
    market
        .answered(
            &market.payee,
            &keys,
            market.payee.submit(HalfKind::A, half_a, wait),
            ReceiptStatus::Pending,
        )
        .await;
    assert!(started.elapsed() >= wait);
    market.audit_intact();
}

/// The status route answers each party with a receipt for its own half, and refuses anyone
/// else.
async fn transaction_status(ledger: Ledger) {
    let mut market = Market::open(&ledger).await;
    market.platform.account("bob", "EUR", None).unwrap();
    let bystander = market.platform.enroll("bob-phone", "bob").await.unwrap();
    let request = market.payee.request("12.50", "EUR", "status").unwrap();
    let txn_id = txn_id_of(&request);
    let (payee_keys, half_a) = market.payee.seal(HalfKind::A, &request).unwrap();
    market.half_a_pending(&payee_keys, half_a).await;
    // The payer has no half in yet: not a party for the platform.
    market
        .refused(
            market.payer.terminal.platform.transaction(txn_id),
            403,
            "not-a-party",
        )
        .await;
    let instruction = market.payer.instruction(&request).unwrap();
    let (payer_keys, half_b) = market.payer.seal(HalfKind::B, &instruction).unwrap();
    market.half_b_settles(&payer_keys, half_b).await;

    for (party, keys) in [(&market.payee, &payee_keys), (&market.payer, &payer_keys)] {
        let bytes = party.terminal.platform.transaction(txn_id).await.unwrap();
        let receipt = party.open_receipt(keys, &bytes).unwrap();
        assert_eq!(receipt.status(), ReceiptStatus::Settled);
        assert_eq!(receipt.fields().amount, eur("12.50"));
    }
    market
        .refused(
            bystander.terminal.platform.transaction(txn_id),
            403,
            "not-a-party",
        )
        .await;
    market
        .refused(
            market
                .payee
                .terminal
                .platform
                .transaction(TxnId::try_from([0x5A; 16]).unwrap()),
            404,
            "unknown-transaction",
        )
        .await;
    market.audit_intact();
}

/// Enrollment with a wrong code, a used code and an expired code: the same
/// `enrollment-refused`, nothing recorded, and no key loaded into the terminal.
async fn enrollment_refusals(ledger: Ledger) {
    let platform = PlatformFixture::start(&ledger).unwrap();
    let storage = platform.storage().unwrap();
    platform.account("shop", "EUR", None).unwrap();
    let code = platform.add_terminal("shop-1", "shop").unwrap();
    // Another code of the right shape.
    let wrong = Zeroizing::new(
        code.chars()
            .map(|c| if c == '0' { '1' } else { '0' })
            .collect::<String>(),
    );
    refused_enrollment(&platform, &storage, "shop-1", &wrong).await;

    // A terminal that trusts another CA than the platform's (protocol.md §6.3: the platform CA
    // is trusted out of band) stops at the TLS handshake: its code is never sent, so it is
    // still good below.
    let impostor_ca = rcgen::KeyPair::generate()
        .and_then(|key| rcgen::CertificateParams::new(Vec::<String>::new())?.self_signed(&key))
        .unwrap()
        .pem();
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Keystore> =
        Arc::new(SoftwareKeystore::open(&dir.path().join("keystore.json")).unwrap());
    let before = LedgerSnapshot::of(&storage).unwrap();
    let untrusted = enroll(
        store,
        dir.path(),
        &platform.enrollment_target(impostor_ca.as_bytes()),
        &"shop-1".parse().unwrap(),
        &code,
    )
    .await;
    match untrusted {
        Err(EnrollError::Platform(PlatformError::Connection { step: "TLS", .. })) => {}
        other => panic!(
            "expected a TLS failure, got {:?}",
            other.map(|_| "enrolled")
        ),
    }
    assert_eq!(LedgerSnapshot::of(&storage).unwrap(), before);
    assert!(!dir.path().join(STATE_FILE_NAME).exists());

    let enrolled = platform
        .enroll_with_code("shop-1", "shop", &code)
        .await
        .unwrap();
    assert!(enrolled.dir().join(STATE_FILE_NAME).is_file());
    refused_enrollment(&platform, &storage, "shop-1", &code).await;

    // A code valid for zero hours has expired by the time it is used.
    let expired = platform
        .add_terminal_with("shop-2", "shop", &["--code-validity-hours", "0"])
        .unwrap();
    refused_enrollment(&platform, &storage, "shop-2", &expired).await;
    let terminals = platform.admin_ok(&["terminals", "list"]).unwrap();
    let shop_2 = terminals
        .lines()
        .find(|line| line.starts_with("shop-2 "))
        .unwrap();
    assert!(shop_2.contains("pending"), "{terminals}");

    let audit = platform.admin_ok(&["audit", "verify"]).unwrap();
    assert!(audit.contains("intact"), "{audit}");

    // Each refusal is logged once, at info, with its code, the terminal it claimed, the client
    // address and the reason — never the code it sent.
    let log = platform.daemon_log();
    let refusals: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("enrollment refused"))
        .collect();
    assert_eq!(refusals.len(), 3, "{log}");
    for line in &refusals {
        assert!(line.contains(" INFO "), "{line}");
        assert!(line.contains("code=enrollment-refused"), "{line}");
        assert!(line.contains("peer=127.0.0.1:"), "{line}");
        assert!(line.contains("reason="), "{line}");
    }
    assert!(refusals.iter().any(|line| line.contains("terminal=shop-1")));
    assert!(refusals.iter().any(|line| line.contains("terminal=shop-2")));
    for secret in [code.as_str(), wrong.as_str(), expired.as_str()] {
        assert!(!log.contains(secret), "an enrollment code was logged");
    }
}

/// Enrolls `terminal_id` with `code` and checks that the platform refuses it, records nothing,
/// and that the terminal is left with no DUKPT state and no key.
async fn refused_enrollment(
    platform: &PlatformFixture,
    storage: &Storage,
    terminal_id: &str,
    code: &Zeroizing<String>,
) {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Keystore> =
        Arc::new(SoftwareKeystore::open(&dir.path().join("keystore.json")).unwrap());
    let ca = platform.ca_pem().unwrap();
    let target = platform.enrollment_target(&ca);
    let before = LedgerSnapshot::of(storage).unwrap();
    let result = enroll(
        Arc::clone(&store),
        dir.path(),
        &target,
        &terminal_id.parse().unwrap(),
        code,
    )
    .await;
    let problem = match result {
        Err(EnrollError::Platform(PlatformError::Refused(problem))) => problem,
        Err(other) => panic!("expected enrollment-refused, got {other}"),
        Ok(_) => panic!("enrollment of {terminal_id} with a bad code succeeded"),
    };
    assert_eq!(
        (problem.status, problem.code.as_str()),
        (403, "enrollment-refused")
    );
    assert_eq!(LedgerSnapshot::of(storage).unwrap(), before);
    assert!(!dir.path().join(STATE_FILE_NAME).exists());
    assert!(!dir.path().join(CERTIFICATE_FILE).exists());
    for register in 0..FUTURE_KEY_REGISTERS {
        assert!(store.load_key(&register_label(register)).unwrap().is_none());
    }
}

/// Halves racing each other over separate connections: exactly one settlement each time.
/// Two different halves B for one payment: one settles, the other is a conflict. The same half
/// B twice at once: both get the one settled receipt. Halves A and B at once: settled once.
async fn racing_halves_settle_once(ledger: Ledger) {
    let mut market = Market::open(&ledger).await;
    let second_payer_client = new_client(&market.platform, &market.payer);

    let request = market.payee.request("10.00", "EUR", "race 1").unwrap();
    let (keys, half_a) = market.payee.seal(HalfKind::A, &request).unwrap();
    market.half_a_pending(&keys, half_a).await;
    let instruction = market.payer.instruction(&request).unwrap();
    let (first_keys, first_b) = market.payer.seal(HalfKind::B, &instruction).unwrap();
    let other = instruction_with(&market.payer, &request, |i| i.consented_at_ms += 1);
    let (second_keys, second_b) = market.payer.seal(HalfKind::B, &other).unwrap();
    let (first, second) = tokio::join!(
        market.payer.submit(HalfKind::B, first_b, NO_WAIT),
        second_payer_client.submit_half(HalfKind::B, second_b, NO_WAIT),
    );
    let (winner, keys, loser) = match (first, second) {
        (Ok(reply), Err(refusal)) => (reply, first_keys, refusal),
        (Err(refusal), Ok(reply)) => (reply, second_keys, refusal),
        other => panic!("expected one settlement and one conflict, got {other:?}"),
    };
    assert!(winner.settled);
    market.payer.open_receipt(&keys, &winner.receipt).unwrap();
    let problem = expect_problem(Err::<(), _>(loser), &market.platform);
    assert_eq!((problem.status, problem.code.as_str()), (409, "conflict"));
    assert_eq!(market.platform.balance("alice").unwrap(), "90.00 EUR");

    let request = market.payee.request("10.00", "EUR", "race 2").unwrap();
    let (keys, half_a) = market.payee.seal(HalfKind::A, &request).unwrap();
    market.half_a_pending(&keys, half_a).await;
    let instruction = market.payer.instruction(&request).unwrap();
    let (keys, half_b) = market.payer.seal(HalfKind::B, &instruction).unwrap();
    let (first, second) = tokio::join!(
        market.payer.submit(HalfKind::B, half_b.clone(), NO_WAIT),
        second_payer_client.submit_half(HalfKind::B, half_b, NO_WAIT),
    );
    let first = market
        .payer
        .open_receipt(&keys, &first.unwrap().receipt)
        .unwrap();
    let second = market
        .payer
        .open_receipt(&keys, &second.unwrap().receipt)
        .unwrap();
    assert_eq!(first.status(), ReceiptStatus::Settled);
    assert_eq!(first, second);
    assert_eq!(market.platform.balance("alice").unwrap(), "80.00 EUR");

    let request = market.payee.request("10.00", "EUR", "race 3").unwrap();
    let (payee_keys, half_a) = market.payee.seal(HalfKind::A, &request).unwrap();
    let instruction = market.payer.instruction(&request).unwrap();
    let (payer_keys, half_b) = market.payer.seal(HalfKind::B, &instruction).unwrap();
    let (answer_a, answer_b) = tokio::join!(
        market.payee.submit(HalfKind::A, half_a, NO_WAIT),
        market.payer.submit(HalfKind::B, half_b, NO_WAIT),
    );
    let (answer_a, answer_b) = (answer_a.unwrap(), answer_b.unwrap());
    assert!(
        answer_a.settled != answer_b.settled,
        "one half completes the payment, the other finds it pending"
    );
    market
        .payee
        .open_receipt(&payee_keys, &answer_a.receipt)
        .unwrap();
    market
        .payer
        .open_receipt(&payer_keys, &answer_b.receipt)
        .unwrap();
    assert_eq!(market.platform.balance("alice").unwrap(), "70.00 EUR");
    assert_eq!(market.platform.balance("shop").unwrap(), "30.00 EUR");
    market.audit_intact();
}

/// Payments, refusals of many kinds, suspension, funding: the audit chain verifies at the end,
/// and its length counts exactly what was recorded.
async fn the_audit_chain_survives_a_mixed_run(ledger: Ledger) {
    let mut market = Market::open_with_funds(&ledger, "20.00").await;
    let records_at_start = market.snapshot().audit_records;
    let mut settled = 0;
    for (amount, enough) in [("12.50", true), ("9.00", false), ("7.50", true)] {
        let request = market.payee.request(amount, "EUR", "mixed").unwrap();
        let (keys, half_a) = market.payee.seal(HalfKind::A, &request).unwrap();
        market
            .refused(
                market
                    .payee
                    .submit(HalfKind::A, flipped(&half_a, half_a.len() - 1, 1), NO_WAIT),
                400,
                "authentication-failed",
            )
            .await;
        market.half_a_pending(&keys, half_a).await;
        let instruction = market.payer.instruction(&request).unwrap();
        let (keys, half_b) = market.payer.seal(HalfKind::B, &instruction).unwrap();
        if enough {
            market.half_b_settles(&keys, half_b.clone()).await;
            settled += 1;
        } else {
            market
                .half_b_refused(half_b.clone(), 422, "insufficient-funds")
                .await;
        }
    }
    for state in ["suspend", "reactivate"] {
        market
            .platform
            .admin_ok(&["terminals", state, "--id", "alice-phone"])
            .unwrap();
    }
    assert_eq!(market.platform.balance("alice").unwrap(), "0.00 EUR");
    // One record per settlement and per change of a terminal's state.
    assert_eq!(
        market.snapshot().audit_records,
        records_at_start + settled + 2
    );
    market.audit_intact();
}
