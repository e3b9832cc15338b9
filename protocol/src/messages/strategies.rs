//! Proptest strategies for valid messages, and helpers the message tests share.

use proptest::prelude::*;

use super::{
    DESCRIPTION_BYTES_MAX, Description, HALF_BODY_BYTES_MAX, HALF_BODY_BYTES_MIN, HalfEnvelope,
    HalfHeader, HalfKind, PaymentInstruction, PaymentKind, PaymentRequest, REQUEST_LIFETIME_MS_MAX,
    Receipt, ReceiptFields, ReceiptStatus, RequestValidity,
};
use crate::amount::AMOUNT_MINOR_UNITS_MAX;
use crate::error::ProtocolError;
use crate::ids::InitialKeyId;
use crate::{AccountId, Amount, Currency, Ksn, TerminalId, TransactionCounter, TxnId};

/// Bytes from hex written with spaces and line breaks for readability.
pub(super) fn bytes_of_hex(text: &str) -> Vec<u8> {
    let digits: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    hex::decode(digits).unwrap()
}

/// The field an error names.
pub(super) fn field_of(error: &ProtocolError) -> &'static str {
    match error {
        ProtocolError::Length { field, .. }
        | ProtocolError::Hex { field }
        | ProtocolError::Invalid { field, .. } => field,
        other => panic!("unexpected error {other:?}"),
    }
}

pub(super) fn arbitrary_txn_id() -> impl Strategy<Value = TxnId> {
    any::<[u8; 16]>().prop_filter_map("all zero", |bytes| TxnId::try_from(bytes).ok())
}

pub(super) fn arbitrary_terminal_id() -> impl Strategy<Value = TerminalId> {
    "[A-Za-z0-9._-]{1,32}".prop_map(|text| text.parse().unwrap())
}

pub(super) fn arbitrary_account_id() -> impl Strategy<Value = AccountId> {
    "[A-Za-z0-9._-]{1,32}".prop_map(|text| text.parse().unwrap())
}

pub(super) fn arbitrary_amount() -> impl Strategy<Value = Amount> {
    (
        1..=AMOUNT_MINOR_UNITS_MAX,
        prop::sample::select(vec!["EUR", "USD", "JPY", "BHD", "GBP", "CHF"]),
    )
        .prop_map(|(minor_units, code)| {
            Amount::new(minor_units, code.parse::<Currency>().unwrap()).unwrap()
        })
}

pub(super) fn arbitrary_description() -> impl Strategy<Value = Description> {
    // `\PC`: no character of Unicode category "other" (control, format, unassigned, …).
    "\\PC{0,80}".prop_map(|text| {
        let mut end = text.len().min(DESCRIPTION_BYTES_MAX);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        Description::try_from(&text[..end]).unwrap()
    })
}

pub(super) fn arbitrary_ksn() -> impl Strategy<Value = Ksn> {
    (any::<[u8; 8]>(), any::<u32>()).prop_filter_map("invalid counter", |(id, counter)| {
        let counter = TransactionCounter::try_from(counter).ok()?;
        Some(Ksn::new(InitialKeyId::from(id), counter))
    })
}

pub(super) fn arbitrary_request() -> impl Strategy<Value = PaymentRequest> {
    (
        arbitrary_txn_id(),
        arbitrary_terminal_id(),
        arbitrary_account_id(),
        arbitrary_amount(),
        prop::sample::select(vec![
            PaymentKind::Purchase,
            PaymentKind::Transfer,
            PaymentKind::Remittance,
            PaymentKind::Loan,
        ]),
        (
            0..u64::MAX - REQUEST_LIFETIME_MS_MAX,
            1..=REQUEST_LIFETIME_MS_MAX,
        ),
        arbitrary_description(),
    )
        .prop_map(
            |(txn_id, payee_terminal_id, payee_account_id, amount, kind, times, description)| {
                PaymentRequest {
                    txn_id,
                    payee_terminal_id,
                    payee_account_id,
                    amount,
                    kind,
                    validity: RequestValidity::new(times.0, times.0 + times.1).unwrap(),
                    description,
                }
            },
        )
}

pub(super) fn arbitrary_instruction() -> impl Strategy<Value = PaymentInstruction> {
    (
        arbitrary_txn_id(),
        any::<[u8; 32]>(),
        arbitrary_terminal_id(),
        arbitrary_account_id(),
        arbitrary_terminal_id(),
        arbitrary_amount(),
        any::<u64>(),
    )
        .prop_map(
            |(
                txn_id,
                request_digest,
                payer_terminal_id,
                payer_account_id,
                payee_terminal_id,
                amount,
                consented_at_ms,
            )| PaymentInstruction {
                txn_id,
                request_digest,
                payer_terminal_id,
                payer_account_id,
                payee_terminal_id,
                amount,
                consented_at_ms,
            },
        )
}

pub(super) fn arbitrary_half() -> impl Strategy<Value = HalfEnvelope> {
    (
        prop::sample::select(vec![HalfKind::A, HalfKind::B]),
        arbitrary_terminal_id(),
        arbitrary_ksn(),
        any::<u64>(),
        any::<[u8; 12]>(),
        prop::collection::vec(any::<u8>(), HALF_BODY_BYTES_MIN..=HALF_BODY_BYTES_MAX),
    )
        .prop_map(|(kind, terminal_id, ksn, sent_at_ms, nonce, body)| {
            let header = HalfHeader {
                kind,
                terminal_id,
                ksn,
                sent_at_ms,
                nonce,
            };
            HalfEnvelope::new(header, body).unwrap()
        })
}

pub(super) fn arbitrary_receipt() -> impl Strategy<Value = Receipt> {
    // Which halves are in: 0 only A, 1 only B, 2 both.
    let parties = (
        0..3u8,
        arbitrary_account_id(),
        arbitrary_terminal_id(),
        arbitrary_account_id(),
    );
    let settlement = (
        prop::sample::select(vec![
            ReceiptStatus::Pending,
            ReceiptStatus::Settled,
            ReceiptStatus::Expired,
        ]),
        1..=u64::MAX,
        1..=u64::MAX,
    );
    (
        arbitrary_txn_id(),
        arbitrary_terminal_id(),
        arbitrary_ksn(),
        any::<[u8; 32]>(),
        arbitrary_terminal_id(),
        arbitrary_amount(),
        parties,
        settlement,
    )
        .prop_map(
            |(
                txn_id,
                recipient_terminal_id,
                recipient_ksn,
                request_digest,
                payee_terminal_id,
                amount,
                (halves, payee_account, payer_terminal, payer_account),
                (status, settlement_id, settled_at_ms),
            )| {
                // Only a receipt with both halves in can be settled.
                let halves = if status == ReceiptStatus::Settled {
                    2
                } else {
                    halves
                };
                let settled = status == ReceiptStatus::Settled;
                Receipt::new(ReceiptFields {
                    status,
                    txn_id,
                    recipient_terminal_id,
                    recipient_ksn,
                    request_digest,
                    payee_terminal_id,
                    payee_account_id: (halves != 1).then_some(payee_account),
                    payer_terminal_id: (halves != 0).then_some(payer_terminal),
                    payer_account_id: (halves != 0).then_some(payer_account),
                    amount,
                    settlement_id: if settled { settlement_id } else { 0 },
                    settled_at_ms: if settled { settled_at_ms } else { 0 },
                })
                .unwrap()
            },
        )
}
