//! The verification pipeline of a half (docs/protocol.md §6.1), up to the ledger.
//!
//! `verify` runs on an HSM worker (`super::workers`): steps 2–6 and the receipt's MAC key.
//! The ledger's commit (steps 7–9) is awaited by the caller; [`Outcome`] is what it decided.

use std::sync::{Arc, Weak};
use std::time::Instant;

use nfcpay_keystore::dukpt::TransientKey;
use nfcpay_keystore::{KeyHandle, KeyPurpose, Keystore};
use nfcpay_protocol::dukpt::WorkingKeyUsage;
use nfcpay_protocol::messages::{
    CLOCK_SKEW_MS_MAX, HalfEnvelope, HalfKind, PaymentInstruction, PaymentRequest,
};
use nfcpay_protocol::{InitialKeyId, Ksn, TerminalId, TxnId};
use sha2::{Digest, Sha256};

use super::active::ActiveTerminal;
use super::workers::{self, HsmWorkers};
use super::{Inner, now_ms, problems};
use crate::pki::ClientTerminal;
use crate::server::problem::{Problem, ProblemCode};
use crate::storage::{
    AcceptedHalf, HalfContent, Submitted, TerminalState, TerminalView, TransactionView,
};

/// A transient HSM key that may cross threads (from the HSM worker that derived it, through
/// the ledger's commit, to the one that uses it): destroyed when dropped unless taken.
///
/// Destroying is an HSM call (a network round trip on a network HSM), so it is made on an HSM
/// worker: dropped on a worker, the key is destroyed there; dropped elsewhere — an async
/// thread, when a refused half's request ends or its client goes away — the destruction is
/// queued for a worker, without waiting. Only when no worker takes it (the queue full, the
/// workers stopped) is it destroyed on the dropping thread.
pub struct HeldKey {
    keystore: Arc<dyn Keystore>,
    workers: Weak<HsmWorkers>,
    key: Option<KeyHandle>,
}

impl HeldKey {
    /// Takes charge of destroying `key`, on one of `workers` when dropped elsewhere.
    pub(super) fn new(
        keystore: Arc<dyn Keystore>,
        workers: Weak<HsmWorkers>,
        key: KeyHandle,
    ) -> Self {
        Self {
            keystore,
            workers,
            key: Some(key),
        }
    }

    /// Gives the key back to the caller, who then must destroy it.
    pub(super) fn into_handle(mut self) -> Option<KeyHandle> {
        self.key.take()
    }
}

impl Drop for HeldKey {
    fn drop(&mut self) {
        let Some(key) = self.key.take() else {
            return;
        };
        if !workers::on_worker()
            && let Some(workers) = self.workers.upgrade()
        {
            // Not run (queue full, workers stopped), the job is dropped here, and with it
            // this key, which then has no workers to go to: destroyed on this thread.
            let here = Self {
                keystore: Arc::clone(&self.keystore),
                workers: Weak::new(),
                key: Some(key),
            };
            let _answer = workers.submit(move || drop(here));
            return;
        }
        drop(TransientKey::new(self.keystore.as_ref(), key));
    }
}

/// A half that passed steps 2–6, ready for the ledger.
pub struct Verified {
    /// What the ledger records.
    pub half: AcceptedHalf,
    /// When it arrived (the ledger's clock for matching and expiry).
    pub received_at_ms: i64,
    /// The sender's receipt MAC key, derived before any money moves (docs/protocol.md §8).
    pub receipt_mac_key: HeldKey,
}

impl Verified {
    /// Splits off what the ledger records; the rest waits for the ledger's answer.
    pub fn into_parts(self) -> (AcceptedHalf, i64, AwaitingLedger) {
        let awaiting = AwaitingLedger {
            recipient: self.half.terminal_id.clone(),
            txn_id: self.half.txn_id,
            recipient_ksn: self.half.ksn,
            receipt_mac_key: self.receipt_mac_key,
        };
        (self.half, self.received_at_ms, awaiting)
    }
}

/// A verified half while the ledger decides it.
pub struct AwaitingLedger {
    recipient: TerminalId,
    txn_id: TxnId,
    recipient_ksn: Ksn,
    /// Destroyed with this value if the ledger refuses the half.
    pub receipt_mac_key: HeldKey,
}

impl AwaitingLedger {
    /// The outcome of this half once the ledger has `submitted` it.
    pub fn outcome(self, submitted: Submitted) -> Outcome {
        tracing::info!(
            terminal = %self.recipient,
            txn_id = %self.txn_id,
            ksn = %self.recipient_ksn,
            status = %submitted.view.status.as_str(),
            "half accepted"
        );
        Outcome {
            view: submitted.view,
            recipient: self.recipient,
            recipient_ksn: self.recipient_ksn,
            settled_now: submitted.settled_now,
            receipt_mac_key: Some(self.receipt_mac_key),
        }
    }
}

/// What became of an accepted half.
pub struct Outcome {
    /// The payment after the ledger's commit.
    pub view: TransactionView,
    /// The terminal that sent the half (the receipt's recipient).
    pub recipient: TerminalId,
    /// The KSN of that half (names the receipt's CMAC key).
    pub recipient_ksn: Ksn,
    /// Whether this half completed the payment (rather than finding it settled already).
    pub settled_now: bool,
    /// The recipient's receipt MAC key, derived before the ledger committed (so that sealing
    /// the receipt after the commit needs only the receipt key's signature); taken and
    /// destroyed by [`super::receipts::answer`] or when dropped.
    pub(super) receipt_mac_key: Option<HeldKey>,
}

/// Verifies a half (steps 2–6) and derives its receipt MAC key. Blocking: run it on an HSM
/// worker.
pub(super) fn verify(
    inner: &Inner,
    route: HalfKind,
    client_certificate: &ClientTerminal,
    body: &[u8],
) -> Result<Verified, Problem> {
    let client = &client_certificate.terminal_id;
    let received_at_ms = now_ms();
    // 2. The envelope decodes and its type matches the route.
    let envelope = HalfEnvelope::decode(body).map_err(|error| problems::malformed(&error))?;
    let header = envelope.header();
    tracing::Span::current().record("ksn", tracing::field::display(header.ksn));
    if header.kind != route {
        return Err(Problem::new(
            ProblemCode::WrongHalfType,
            "the envelope's type is not this route's half",
        ));
    }
    // 3. The terminal named inside is the certificate's, may send, and the certificate is the
    // one it was issued at its enrollment.
    if &header.terminal_id != client {
        return Err(Problem::new(
            ProblemCode::TerminalMismatch,
            "the half names another terminal than the client certificate",
        ));
    }
    let initial_key_id = active_initial_key_id(inner, client_certificate)?;
    // 4. The KSN is the terminal's.
    if header.ksn.initial_key_id() != initial_key_id {
        return Err(Problem::new(
            ProblemCode::TerminalMismatch,
            "the KSN is not the terminal's",
        ));
    }
    // 5. Decrypt and verify under the working key derived inside the keystore.
    let key = inner
        .keys
        .working_key(
            header.ksn,
            WorkingKeyUsage::DataEncrypt,
            KeyPurpose::Encrypt,
        )
        .map_err(problems::keystore)?;
    let key = TransientKey::new(inner.keystore.as_ref(), key);
    let plaintext = inner
        .keystore
        .gcm_decrypt(
            key.handle(),
            &header.nonce,
            envelope.header_bytes(),
            envelope.body(),
        )
        .map_err(problems::keystore)?;
    drop(key);
    // 6. The plaintext decodes, names the sender, and is on time.
    if header.sent_at_ms.abs_diff(received_at_ms) > CLOCK_SKEW_MS_MAX {
        return Err(Problem::new(
            ProblemCode::ClockSkew,
            "sent_at is more than 5 minutes from the platform's clock",
        ));
    }
    let content = match header.kind {
        HalfKind::A => {
            let request =
                PaymentRequest::decode(&plaintext).map_err(|error| problems::malformed(&error))?;
            if &request.payee_terminal_id != client {
                return Err(Problem::new(
                    ProblemCode::TerminalMismatch,
                    "the request names another payee terminal",
                ));
            }
            if request.validity.is_expired_at(received_at_ms) {
                return Err(Problem::new(
                    ProblemCode::Expired,
                    "the request has expired",
                ));
            }
            // A request dated in the future would stretch its 10-minute lifetime.
            if request.validity.created_at_ms() > received_at_ms + CLOCK_SKEW_MS_MAX {
                return Err(Problem::new(
                    ProblemCode::ClockSkew,
                    "the request is dated more than 5 minutes in the future",
                ));
            }
            (
                request.txn_id,
                HalfContent::A {
                    request_digest: PaymentRequest::digest(&plaintext),
                    payee_account: request.payee_account_id,
                    amount: request.amount,
                    expires_at_ms: to_i64(request.validity.expires_at_ms()),
                },
            )
        }
        HalfKind::B => {
            let instruction = PaymentInstruction::decode(&plaintext)
                .map_err(|error| problems::malformed(&error))?;
            if &instruction.payer_terminal_id != client {
                return Err(Problem::new(
                    ProblemCode::TerminalMismatch,
                    "the instruction names another payer terminal",
                ));
            }
            (
                instruction.txn_id,
                HalfContent::B {
                    request_digest: instruction.request_digest,
                    payer_account: instruction.payer_account_id,
                    payee_terminal: instruction.payee_terminal_id,
                    amount: instruction.amount,
                },
            )
        }
    };
    let (txn_id, content) = content;
    // 7–9 (the caller's): replay state, match and settlement in one durable transaction.
    let half = AcceptedHalf {
        txn_id,
        terminal_id: client.clone(),
        certificate_serial: client_certificate.certificate_serial,
        ksn: header.ksn,
        envelope_sha256: Sha256::digest(body).into(),
        received_at_ms: to_i64(received_at_ms),
        content,
    };
    // What the receipt needs from the HSM is obtained before any money moves: its MAC key
    // now, and the receipt key's signature is the only HSM work left after the commit
    // (docs/protocol.md §8: if that fails, the same bytes sent again get the receipt).
    let receipt_mac_key = inner
        .keys
        .working_key(
            header.ksn,
            WorkingKeyUsage::MacVerification,
            KeyPurpose::Mac,
        )
        .map_err(problems::keystore)?;
    Ok(Verified {
        half,
        received_at_ms: to_i64(received_at_ms),
        receipt_mac_key: HeldKey::new(
            Arc::clone(&inner.keystore),
            inner.hsm.clone(),
            receipt_mac_key,
        ),
    })
}

/// The initial key ID of the client's terminal if it may send halves with this certificate:
/// from the memory of active terminals, else from the ledger (whose transaction checks the
/// state and the certificate again when it records the half).
fn active_initial_key_id(inner: &Inner, client: &ClientTerminal) -> Result<InitialKeyId, Problem> {
    let now = Instant::now();
    let terminal_id = &client.terminal_id;
    let active = match inner.active_terminals.get(terminal_id, now) {
        Some(active) => active,
        None => {
            let terminal = inner
                .storage
                .terminal(terminal_id)
                .map_err(problems::storage)?
                .ok_or_else(|| Problem::new(ProblemCode::TerminalMismatch, "unknown terminal"))?;
            terminal_may_send(&terminal)?;
            let active = ActiveTerminal {
                initial_key_id: terminal.initial_key_id,
                certificate_serial: terminal.enrolled_certificate(),
            };
            inner.active_terminals.put(terminal_id, active, now);
            active
        }
    };
    if active.certificate_serial != Some(client.certificate_serial) {
        return Err(not_enrolled_certificate());
    }
    Ok(active.initial_key_id)
}

/// Refuses a terminal that is not active, with the code its state calls for.
fn terminal_may_send(terminal: &TerminalView) -> Result<(), Problem> {
    match terminal.state {
        TerminalState::Active => Ok(()),
        TerminalState::Suspended => Err(Problem::new(
            ProblemCode::TerminalSuspended,
            "terminal is suspended",
        )),
        TerminalState::Revoked => Err(Problem::new(
            ProblemCode::TerminalRevoked,
            "terminal is revoked",
        )),
        TerminalState::Pending => Err(Problem::new(
            ProblemCode::TerminalMismatch,
            "terminal is not enrolled",
        )),
    }
}

/// The refusal of a client certificate that names the terminal but is not the one issued at
/// its enrollment (superseded by a re-enrollment): `terminal-mismatch`.
pub(super) fn not_enrolled_certificate() -> Problem {
    Problem::new(
        ProblemCode::TerminalMismatch,
        "the client certificate is not the terminal's enrolled certificate",
    )
}

fn to_i64(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    // A panic is how a test fails.
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::sync::Barrier;
    use std::time::Duration;

    use nfcpay_keystore::software::SoftwareKeystore;
    use nfcpay_protocol::dukpt::{DerivationData, KeyAlgorithm};

    use super::*;
    use crate::service::metered::MeteredKeystore;

    const LONG: Duration = Duration::from_secs(10);

    /// A keystore that counts its calls, with a BDK, and a transient MAC key derived from it.
    fn keystore_and_key() -> (Arc<MeteredKeystore>, KeyHandle) {
        let keystore = Arc::new(MeteredKeystore::new(
            Arc::new(SoftwareKeystore::in_memory()),
        ));
        let bdk = "12345678".parse().unwrap();
        keystore.generate_bdk(bdk, KeyAlgorithm::Aes128).unwrap();
        let data =
            DerivationData::initial_key(KeyAlgorithm::Aes128, "1234567890123456".parse().unwrap());
        let key = keystore
            .derive(
                nfcpay_keystore::DeriveBase::Bdk(bdk),
                &data,
                KeyPurpose::Mac,
            )
            .unwrap();
        (keystore, key)
    }

    /// Queues a job that holds a worker of `workers` until `gate` is passed; returns once it runs.
    fn hold_a_worker(workers: &HsmWorkers, gate: &Arc<Barrier>) -> workers::Answer<()> {
        let gate = Arc::clone(gate);
        let (started, running) = std::sync::mpsc::channel();
        let answer = workers
            .submit(move || {
                started.send(()).unwrap();
                gate.wait();
            })
            .unwrap();
        running.recv().unwrap();
        answer
    }

    /// Dropped off the workers (as on an async thread when a refused half's request ends or
    /// its client goes away), the key is not destroyed on the dropping thread but by a worker,
    /// once one is free.
    #[tokio::test]
    async fn a_key_dropped_off_the_workers_is_destroyed_by_a_worker() {
        let workers = Arc::new(HsmWorkers::start(1, 8).unwrap());
        let (keystore, key) = keystore_and_key();
        let gate = Arc::new(Barrier::new(2));
        let held_worker = hold_a_worker(&workers, &gate);

        drop(HeldKey::new(
            keystore.clone(),
            Arc::downgrade(&workers),
            key,
        ));
        assert_eq!(
            keystore.count("destroy"),
            0,
            "destroyed on the dropping thread while the only worker was busy"
        );

        gate.wait();
        held_worker.wait(LONG).await.unwrap();
        // The destruction was queued first, so a job queued now runs after it.
        let counted = Arc::clone(&keystore);
        let destroyed = workers
            .run(LONG, move || counted.count("destroy"))
            .await
            .unwrap();
        assert_eq!(destroyed, 1, "the key outlived its HeldKey");
    }

    /// With no worker to take it (the workers gone, or their queue full), the key is destroyed
    /// where it is dropped; a key taken back is not destroyed at all.
    #[test]
    fn a_key_no_worker_takes_is_destroyed_in_place_and_a_taken_one_is_not() {
        let (keystore, key) = keystore_and_key();
        let gone = Arc::new(HsmWorkers::start(1, 1).unwrap());
        let workers = Arc::downgrade(&gone);
        drop(gone);
        drop(HeldKey::new(keystore.clone(), workers, key));
        assert_eq!(keystore.count("destroy"), 1);

        let (keystore, key) = keystore_and_key();
        let full = Arc::new(HsmWorkers::start(1, 1).unwrap());
        let gate = Arc::new(Barrier::new(2));
        let held_worker = hold_a_worker(&full, &gate);
        let queued = full.submit(|| ()).unwrap(); // the queue's one place
        drop(HeldKey::new(keystore.clone(), Arc::downgrade(&full), key));
        assert_eq!(keystore.count("destroy"), 1);
        gate.wait();
        drop((held_worker, queued));

        let (keystore, key) = keystore_and_key();
        let taken = HeldKey::new(keystore.clone(), Weak::new(), key)
            .into_handle()
            .unwrap();
        assert_eq!(keystore.count("destroy"), 0);
        keystore.destroy(taken).unwrap();
    }
}
