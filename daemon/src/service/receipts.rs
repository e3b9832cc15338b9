//! Receipts: the platform's answer to each terminal (docs/protocol.md §7), sealed with an
//! AES-CMAC under the recipient's MAC-verification working key and an ECDSA signature by the
//! receipt key, both computed inside the keystore.

use bytes::Bytes;
use nfcpay_keystore::dukpt::TransientKey;
use nfcpay_keystore::{KeyHandle, KeyPurpose};
use nfcpay_protocol::dukpt::WorkingKeyUsage;
use nfcpay_protocol::messages::{Receipt, ReceiptFields, ReceiptStatus, SealedReceipt};
use nfcpay_protocol::{Ksn, TerminalId, TxnId};

use super::halves::Outcome;
use super::{Inner, problems};
use crate::pki::ClientTerminal;
use crate::server::HalfAnswer;
use crate::server::problem::{Problem, ProblemCode};
use crate::storage::{TerminalState, TransactionStatus, TransactionView};

/// The answer to a half: its sender's receipt. Blocking.
///
/// The half is in the ledger already, so a failure here must not read as a refusal: an HSM
/// that cannot seal is `503 unavailable` saying that the half was recorded, and the same bytes
/// sent again get the receipt (docs/protocol.md §8).
pub(super) fn answer(inner: &Inner, outcome: &mut Outcome) -> Result<HalfAnswer, Problem> {
    let mac_key = outcome
        .receipt_mac_key
        .take()
        .and_then(super::halves::HeldKey::into_handle);
    let receipt = seal(
        inner,
        &outcome.view,
        &outcome.recipient,
        outcome.recipient_ksn,
        mac_key,
    )
    .map_err(|problem| {
        if problem.code() == ProblemCode::Unavailable {
            tracing::warn!(
                txn_id = %outcome.view.txn_id,
                terminal = %outcome.recipient,
                "half recorded but its receipt could not be sealed; a re-send gets it"
            );
        }
        recorded_but_unsealed(&problem)
    })?;
    Ok(HalfAnswer {
        settled: outcome.view.status == TransactionStatus::Settled,
        receipt,
    })
}

/// The answer when a recorded half's receipt could not be sealed, whatever the cause (an HSM
/// unavailable or stalled, a keystore fault, a panic in the job): the ledger has committed
/// the half, so no failure may read as a refusal or as `500`. It is `503` saying that a re-send
/// of the same bytes gets the receipt (docs/protocol.md §8); a cause other than an unavailable
/// HSM is logged here as an error (its own line, if any, says more).
pub(super) fn recorded_but_unsealed(problem: &Problem) -> Problem {
    if problem.code() != ProblemCode::Unavailable {
        tracing::error!(
            code = problem.code().as_str(),
            "half recorded but its receipt could not be sealed (a fault, not the HSM's \
             absence); answered unavailable, a re-send gets the receipt"
        );
    }
    Problem::new(
        ProblemCode::Unavailable,
        "the half is recorded but its receipt could not be sealed; send the same bytes again",
    )
}

/// The latest receipt of a payment for one of its parties. Blocking.
pub(super) fn status(
    inner: &Inner,
    client_certificate: &ClientTerminal,
    txn_id: TxnId,
) -> Result<Bytes, Problem> {
    let client = &client_certificate.terminal_id;
    // Revoked is for good, on every route (a suspended terminal only loses its halves): a
    // certificate that still chains to the CA must not keep reading the payments' receipts.
    // Nor may a certificate of the terminal that is not its enrolled one (superseded).
    let terminal = inner
        .storage
        .terminal(client)
        .map_err(problems::storage)?
        .ok_or_else(|| Problem::new(ProblemCode::TerminalMismatch, "unknown terminal"))?;
    if terminal.state == TerminalState::Revoked {
        return Err(Problem::new(
            ProblemCode::TerminalRevoked,
            "terminal is revoked",
        ));
    }
    if !terminal.has_certificate(client_certificate.certificate_serial) {
        return Err(super::halves::not_enrolled_certificate());
    }
    let view = inner
        .storage
        .transaction(&txn_id)
        .map_err(problems::storage)?
        .ok_or_else(|| Problem::new(ProblemCode::UnknownTransaction, "no such transaction"))?;
    let ksn = if &view.payee_terminal == client {
        view.half_a_ksn
    } else if view.payer_terminal.as_ref() == Some(client) {
        view.half_b_ksn
    } else {
        None
    };
    // A party whose half is not in yet is not a party for the platform.
    let ksn = ksn.ok_or_else(|| {
        Problem::new(
            ProblemCode::NotAParty,
            "the terminal has no half in this transaction",
        )
    })?;
    seal(inner, &view, client, ksn, None)
}

/// Builds and seals the receipt of `view` for `recipient`, whose half came under `ksn`, with
/// `mac_key` (that KSN's MAC-verification key, destroyed here) or one derived now.
fn seal(
    inner: &Inner,
    view: &TransactionView,
    recipient: &TerminalId,
    ksn: Ksn,
    mac_key: Option<KeyHandle>,
) -> Result<Bytes, Problem> {
    // Destroyed on every path, errors included.
    let mac_key = mac_key.map(|key| TransientKey::new(inner.keystore.as_ref(), key));
    let status = match view.status {
        TransactionStatus::Pending => ReceiptStatus::Pending,
        TransactionStatus::Settled => ReceiptStatus::Settled,
        TransactionStatus::Expired => ReceiptStatus::Expired,
    };
    let receipt = Receipt::new(ReceiptFields {
        status,
        txn_id: view.txn_id,
        recipient_terminal_id: recipient.clone(),
        recipient_ksn: ksn,
        request_digest: view.request_digest,
        payee_terminal_id: view.payee_terminal.clone(),
        payee_account_id: view.payee_account.clone(),
        payer_terminal_id: view.payer_terminal.clone(),
        payer_account_id: view.payer_account.clone(),
        amount: view.amount,
        settlement_id: view.settlement_id.unwrap_or(0),
        settled_at_ms: view
            .settled_at_ms
            .and_then(|at| u64::try_from(at).ok())
            .unwrap_or(0),
    })
    .map_err(|error| {
        tracing::error!(%error, txn_id = %view.txn_id, "ledger view makes no valid receipt");
        problems::internal("receipt")
    })?;
    let body = receipt.encode();
    let mac_key = match mac_key {
        Some(key) => key,
        None => TransientKey::new(
            inner.keystore.as_ref(),
            inner
                .keys
                .working_key(ksn, WorkingKeyUsage::MacVerification, KeyPurpose::Mac)
                .map_err(problems::keystore)?,
        ),
    };
    let cmac = inner
        .keystore
        .cmac_generate(mac_key.handle(), &body)
        .map_err(problems::keystore)?;
    drop(mac_key);
    let signature = inner
        .keystore
        .sign_p256_sha256(&inner.receipt_key, &body)
        .map_err(problems::keystore)?;
    Ok(Bytes::from(
        SealedReceipt::new(receipt, cmac, signature).encode(),
    ))
}
