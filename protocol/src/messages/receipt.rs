//! Receipts (docs/protocol.md §7): the platform's answer to a half, MACed for the recipient and
//! signed for anyone.

use std::fmt;

use super::codec::{HexDebug, Reader, Writer, check_bytes_max, in_field};
use super::{
    MESSAGE_TYPE_RECEIPT, RECEIPT_BODY_BYTES_MAX, RECEIPT_CMAC_BYTES, RECEIPT_SEAL_BYTES,
    RECEIPT_SIGNATURE_BYTES, REQUEST_DIGEST_BYTES, SEALED_RECEIPT_BYTES_MAX,
};
use crate::error::ProtocolError;
use crate::{AccountId, Amount, Ksn, TerminalId, TxnId};

/// Where the payment stands.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum ReceiptStatus {
    /// Waiting for the other half (`1`).
    Pending,
    /// Booked in the ledger (`2`).
    Settled,
    /// The request expired before it could be settled (`3`).
    Expired,
}

impl ReceiptStatus {
    /// The wire code.
    pub fn code(self) -> u8 {
        match self {
            Self::Pending => 1,
            Self::Settled => 2,
            Self::Expired => 3,
        }
    }
}

impl TryFrom<u8> for ReceiptStatus {
    type Error = ProtocolError;
    fn try_from(code: u8) -> Result<Self, Self::Error> {
        match code {
            1 => Ok(Self::Pending),
            2 => Ok(Self::Settled),
            3 => Ok(Self::Expired),
            _ => Err(ProtocolError::Invalid {
                field: "status",
                reason: "not a receipt status (1 to 3)",
            }),
        }
    }
}

/// The fields of a receipt body (§7), each valid on its own. [`Receipt::new`] checks the rules
/// between them.
#[derive(Clone, PartialEq, Eq)]
pub struct ReceiptFields {
    /// Where the payment stands.
    pub status: ReceiptStatus,
    /// The payment.
    pub txn_id: TxnId,
    /// The terminal this copy is for.
    pub recipient_terminal_id: TerminalId,
    /// The KSN of the recipient's half this answers; names the CMAC key.
    pub recipient_ksn: Ksn,
    /// SHA-256 of the request: half A's plaintext, or half B's `request_digest` while half A
    /// has not arrived.
    pub request_digest: [u8; REQUEST_DIGEST_BYTES],
    /// The payee terminal.
    pub payee_terminal_id: TerminalId,
    /// The account credited; `None` while half A has not arrived.
    pub payee_account_id: Option<AccountId>,
    /// The payer terminal; `None` while half B has not arrived.
    pub payer_terminal_id: Option<TerminalId>,
    /// The account debited; `None` while half B has not arrived.
    pub payer_account_id: Option<AccountId>,
    /// How much, in what currency.
    pub amount: Amount,
    /// The ledger's sequence number: at least 1 when settled, 0 otherwise.
    pub settlement_id: u64,
    /// When the payment settled (ms since the Unix epoch): at least 1 when settled, 0
    /// otherwise.
    pub settled_at_ms: u64,
}

impl fmt::Debug for ReceiptFields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReceiptFields")
            .field("status", &self.status)
            .field("txn_id", &self.txn_id)
            .field("recipient_terminal_id", &self.recipient_terminal_id)
            .field("recipient_ksn", &self.recipient_ksn)
            .field("request_digest", &HexDebug(&self.request_digest))
            .field("payee_terminal_id", &self.payee_terminal_id)
            .field("payee_account_id", &self.payee_account_id)
            .field("payer_terminal_id", &self.payer_terminal_id)
            .field("payer_account_id", &self.payer_account_id)
            .field("amount", &self.amount)
            .field("settlement_id", &self.settlement_id)
            .field("settled_at_ms", &self.settled_at_ms)
            .finish()
    }
}

/// A receipt body whose fields agree with each other: settlement fields set exactly when
/// settled, payer terminal and account both known or both not, at least one half in, both
/// halves in when settled.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Receipt(ReceiptFields);

impl Receipt {
    /// Checks the rules between `fields`.
    pub fn new(fields: ReceiptFields) -> Result<Self, ProtocolError> {
        let settled = fields.status == ReceiptStatus::Settled;
        if settled != (fields.settlement_id != 0) {
            return Err(ProtocolError::Invalid {
                field: "settlement_id",
                reason: "must be at least 1 when settled and 0 otherwise",
            });
        }
        if settled != (fields.settled_at_ms != 0) {
            return Err(ProtocolError::Invalid {
                field: "settled_at",
                reason: "must be at least 1 when settled and 0 otherwise",
            });
        }
        let payer_known = fields.payer_terminal_id.is_some();
        if payer_known != fields.payer_account_id.is_some() {
            return Err(ProtocolError::Invalid {
                field: "payer_account_id",
                reason: "must be empty exactly when payer_terminal_id is",
            });
        }
        let payee_known = fields.payee_account_id.is_some();
        if !payer_known && !payee_known {
            return Err(ProtocolError::Invalid {
                field: "payee_account_id",
                reason: "empty while the payer is too: a receipt answers at least one half",
            });
        }
        if settled && !(payer_known && payee_known) {
            return Err(ProtocolError::Invalid {
                field: if payer_known {
                    "payee_account_id"
                } else {
                    "payer_terminal_id"
                },
                reason: "empty in a settled receipt",
            });
        }
        Ok(Self(fields))
    }

    /// The fields.
    pub fn fields(&self) -> &ReceiptFields {
        &self.0
    }

    /// The fields, by value.
    pub fn into_fields(self) -> ReceiptFields {
        self.0
    }

    /// Where the payment stands.
    pub fn status(&self) -> ReceiptStatus {
        self.0.status
    }

    /// The canonical encoding of the receipt body.
    pub fn encode(&self) -> Vec<u8> {
        let fields = &self.0;
        let mut writer = Writer::message(MESSAGE_TYPE_RECEIPT, RECEIPT_BODY_BYTES_MAX);
        writer.u8(fields.status.code());
        writer.bytes(&fields.txn_id.to_bytes());
        writer.str8(fields.recipient_terminal_id.as_str());
        writer.bytes(&fields.recipient_ksn.to_bytes());
        writer.bytes(&fields.request_digest);
        writer.str8(fields.payee_terminal_id.as_str());
        writer.optional_str8(fields.payee_account_id.as_ref().map(AccountId::as_str));
        writer.optional_str8(fields.payer_terminal_id.as_ref().map(TerminalId::as_str));
        writer.optional_str8(fields.payer_account_id.as_ref().map(AccountId::as_str));
        writer.amount(fields.amount);
        writer.u64(fields.settlement_id);
        writer.u64(fields.settled_at_ms);
        writer.into_bytes()
    }

    /// Decodes exactly one canonical receipt body, refusing anything else.
    pub fn decode(bytes: &[u8]) -> Result<Self, ProtocolError> {
        check_bytes_max("receipt", bytes, RECEIPT_BODY_BYTES_MAX)?;
        let mut reader = Reader::new(bytes);
        reader.version_and_type(MESSAGE_TYPE_RECEIPT, "not a receipt")?;
        let fields = ReceiptFields {
            status: ReceiptStatus::try_from(reader.u8("status")?)?,
            txn_id: reader.txn_id("txn_id")?,
            recipient_terminal_id: reader.identifier("recipient_terminal_id")?,
            recipient_ksn: Ksn::try_from(reader.array::<{ Ksn::LEN }>("recipient_ksn")?)
                .map_err(|e| in_field(e, "recipient_ksn"))?,
            request_digest: reader.array("request_digest")?,
            payee_terminal_id: reader.identifier("payee_terminal_id")?,
            payee_account_id: reader.optional_identifier("payee_account_id")?,
            payer_terminal_id: reader.optional_identifier("payer_terminal_id")?,
            payer_account_id: reader.optional_identifier("payer_account_id")?,
            amount: reader.amount()?,
            settlement_id: reader.u64("settlement_id")?,
            settled_at_ms: reader.u64("settled_at")?,
        };
        reader.finish("receipt")?;
        Self::new(fields)
    }
}

/// A receipt as sent: body ‖ CMAC ‖ signature. Neither is checked here; the body bytes they
/// cover are kept exactly as received.
#[derive(Clone, PartialEq, Eq)]
pub struct SealedReceipt {
    receipt: Receipt,
    body_bytes: Vec<u8>,
    cmac: [u8; RECEIPT_CMAC_BYTES],
    signature: [u8; RECEIPT_SIGNATURE_BYTES],
}

impl SealedReceipt {
    /// Joins a receipt with the CMAC and signature computed over its encoding.
    pub fn new(
        receipt: Receipt,
        cmac: [u8; RECEIPT_CMAC_BYTES],
        signature: [u8; RECEIPT_SIGNATURE_BYTES],
    ) -> Self {
        let body_bytes = receipt.encode();
        Self {
            receipt,
            body_bytes,
            cmac,
            signature,
        }
    }

    /// Decodes a sealed receipt: the body must decode as a [`Receipt`]; the last 80 bytes are
    /// the CMAC and the signature.
    pub fn decode(bytes: &[u8]) -> Result<Self, ProtocolError> {
        check_bytes_max("sealed receipt", bytes, SEALED_RECEIPT_BYTES_MAX)?;
        let body_length =
            bytes
                .len()
                .checked_sub(RECEIPT_SEAL_BYTES)
                .ok_or(ProtocolError::Length {
                    field: "sealed receipt",
                    expected: RECEIPT_SEAL_BYTES,
                    actual: bytes.len(),
                })?;
        let mut reader = Reader::new(bytes);
        let body_bytes = reader.take("receipt", body_length)?;
        let receipt = Receipt::decode(body_bytes)?;
        let cmac = reader.array("cmac")?;
        let signature = reader.array("signature")?;
        reader.finish("sealed receipt")?;
        Ok(Self {
            receipt,
            body_bytes: body_bytes.to_vec(),
            cmac,
            signature,
        })
    }

    /// The canonical encoding: body ‖ CMAC ‖ signature.
    pub fn encode(&self) -> Vec<u8> {
        [&self.body_bytes[..], &self.cmac, &self.signature].concat()
    }

    /// The receipt.
    pub fn receipt(&self) -> &Receipt {
        &self.receipt
    }

    /// The body bytes exactly as received: what the CMAC and the signature cover.
    pub fn body_bytes(&self) -> &[u8] {
        &self.body_bytes
    }

    /// AES-CMAC of the body under the recipient's MAC key.
    pub fn cmac(&self) -> &[u8; RECEIPT_CMAC_BYTES] {
        &self.cmac
    }

    /// ECDSA P-256 signature of the body by the platform's receipt key, raw `r ‖ s`.
    pub fn signature(&self) -> &[u8; RECEIPT_SIGNATURE_BYTES] {
        &self.signature
    }
}

impl fmt::Debug for SealedReceipt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealedReceipt")
            .field("receipt", &self.receipt)
            .field("cmac", &HexDebug(&self.cmac))
            .field("signature", &HexDebug(&self.signature))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::super::strategies::{arbitrary_receipt, bytes_of_hex, field_of};
    use super::*;
    use proptest::prelude::*;

    const DIGEST_HEX: &str = "cbb440a4491ef7dad6a66046ecb86e2f415dc394243b5d4063dc47acb249b13f";

    /// The pending receipt to the payee of the first test vector: half A in, half B not.
    fn pending_to_payee() -> ReceiptFields {
        ReceiptFields {
            status: ReceiptStatus::Pending,
            txn_id: "000102030405060708090A0B0C0D0E0F".parse().unwrap(),
            recipient_terminal_id: "payee-01".parse().unwrap(),
            recipient_ksn: "123456789012345600000001".parse().unwrap(),
            request_digest: bytes_of_hex(DIGEST_HEX).try_into().unwrap(),
            payee_terminal_id: "payee-01".parse().unwrap(),
            payee_account_id: Some("shop.42_eur".parse().unwrap()),
            payer_terminal_id: None,
            payer_account_id: None,
            amount: Amount::new(1250, "EUR".parse().unwrap()).unwrap(),
            settlement_id: 0,
            settled_at_ms: 0,
        }
    }

    /// The settled receipt to the payer of the second test vector.
    fn settled_to_payer() -> ReceiptFields {
        ReceiptFields {
            status: ReceiptStatus::Settled,
            recipient_terminal_id: "payer-07".parse().unwrap(),
            recipient_ksn: "ABCDEF012345678900000005".parse().unwrap(),
            payer_terminal_id: Some("payer-07".parse().unwrap()),
            payer_account_id: Some("alice-main".parse().unwrap()),
            settlement_id: 42,
            settled_at_ms: 1_700_000_032_500,
            ..pending_to_payee()
        }
    }

    /// Asserts that `fields` with `edit` applied are refused, naming `field`, by both
    /// [`Receipt::new`] and (when encodable) [`Receipt::decode`].
    fn refused(edit: impl FnOnce(&mut ReceiptFields), field: &str) {
        let mut fields = settled_to_payer();
        edit(&mut fields);
        let error = Receipt::new(fields.clone()).unwrap_err();
        assert_eq!(field_of(&error), field, "{error}");
        // Encode the invalid fields with the encoder of a valid receipt, then decode.
        let bytes = Receipt(fields).encode();
        let error = Receipt::decode(&bytes).unwrap_err();
        assert_eq!(field_of(&error), field, "{error}");
    }

    /// A settled receipt's body with the byte at `offset` replaced by `value`.
    fn body_with(offset: usize, value: u8) -> Vec<u8> {
        let mut bytes = Receipt::new(settled_to_payer()).unwrap().encode();
        bytes[offset] = value;
        bytes
    }

    #[test]
    fn receipt_test_vector_pending_without_half_b_matches_the_field_table() {
        let expected = bytes_of_hex(concat!(
            "01",                               // version
            "52",                               // type: receipt
            "01",                               // status: pending
            "000102030405060708090a0b0c0d0e0f", // txn_id
            "08 70617965652d3031",              // recipient_terminal_id: L = 8, "payee-01"
            "1234567890123456 00000001",        // recipient_ksn: the KSN of half A
            // request_digest: SHA-256 of the request test vector (half A's plaintext)
            "cbb440a4491ef7dad6a66046ecb86e2f415dc394243b5d4063dc47acb249b13f",
            "08 70617965652d3031",       // payee_terminal_id: L = 8, "payee-01"
            "0b 73686f702e34325f657572", // payee_account_id: L = 11, "shop.42_eur"
            "00",                        // payer_terminal_id: empty, half B not in
            "00",                        // payer_account_id: empty, half B not in
            "00000000000004e2",          // amount: 1250 minor units
            "455552",                    // currency: "EUR"
            "0000000000000000",          // settlement_id: 0, not settled
            "0000000000000000",          // settled_at: 0, not settled
        ));
        let receipt = Receipt::new(pending_to_payee()).unwrap();
        assert_eq!(receipt.encode(), expected);
        let decoded = Receipt::decode(&expected).unwrap();
        assert_eq!(decoded, receipt);
        assert_eq!(decoded.fields().payer_terminal_id, None);
        assert_eq!(decoded.fields().payer_account_id, None);
    }

    #[test]
    fn receipt_test_vector_settled_matches_the_field_table() {
        let expected = bytes_of_hex(concat!(
            "01",                                                               // version
            "52",                                                               // type: receipt
            "02",                                                               // status: settled
            "000102030405060708090a0b0c0d0e0f",                                 // txn_id
            "08 70617965722d3037", // recipient_terminal_id: L = 8, "payer-07"
            "abcdef0123456789 00000005", // recipient_ksn: the KSN of half B
            "cbb440a4491ef7dad6a66046ecb86e2f415dc394243b5d4063dc47acb249b13f", // request_digest
            "08 70617965652d3031", // payee_terminal_id: L = 8, "payee-01"
            "0b 73686f702e34325f657572", // payee_account_id: L = 11, "shop.42_eur"
            "08 70617965722d3037", // payer_terminal_id: L = 8, "payer-07"
            "0a 616c6963652d6d61696e", // payer_account_id: L = 10, "alice-main"
            "00000000000004e2",    // amount: 1250 minor units
            "455552",              // currency: "EUR"
            "000000000000002a",    // settlement_id: 42
            "0000018bcfe5e6f4",    // settled_at: 1 700 000 032 500 ms
        ));
        let receipt = Receipt::new(settled_to_payer()).unwrap();
        assert_eq!(receipt.encode(), expected);
        assert_eq!(Receipt::decode(&expected).unwrap(), receipt);
        assert_eq!(receipt.status(), ReceiptStatus::Settled);
    }

    #[test]
    fn sealed_receipt_test_vector_is_body_then_cmac_then_signature() {
        let body = Receipt::new(settled_to_payer()).unwrap().encode();
        let cmac_hex = "c0c1c2c3c4c5c6c7c8c9cacbcccdcecf";
        let signature_hex = concat!(
            "5000000000000000000000000000000000000000000000000000000000000001", // r
            "5300000000000000000000000000000000000000000000000000000000000002", // s
        );
        let expected = [
            &body[..],                    // receipt body
            &bytes_of_hex(cmac_hex),      // cmac: bytes[16]
            &bytes_of_hex(signature_hex), // signature: bytes[64], r ‖ s
        ]
        .concat();
        let sealed = SealedReceipt::new(
            Receipt::new(settled_to_payer()).unwrap(),
            bytes_of_hex(cmac_hex).try_into().unwrap(),
            bytes_of_hex(signature_hex).try_into().unwrap(),
        );
        assert_eq!(sealed.encode(), expected);
        let decoded = SealedReceipt::decode(&expected).unwrap();
        assert_eq!(decoded, sealed);
        assert_eq!(decoded.body_bytes(), body);
        assert_eq!(hex::encode(decoded.cmac()), cmac_hex);
        assert_eq!(hex::encode(decoded.signature()), signature_hex);
        assert_eq!(decoded.receipt().fields().settlement_id, 42);
    }

    #[test]
    fn receipt_round_trips_in_every_state() {
        let only_half_b = ReceiptFields {
            status: ReceiptStatus::Pending,
            payee_account_id: None,
            settlement_id: 0,
            settled_at_ms: 0,
            ..settled_to_payer()
        };
        let expired = ReceiptFields {
            status: ReceiptStatus::Expired,
            ..pending_to_payee()
        };
        for fields in [pending_to_payee(), settled_to_payer(), only_half_b, expired] {
            let receipt = Receipt::new(fields.clone()).unwrap();
            let bytes = receipt.encode();
            let decoded = Receipt::decode(&bytes).unwrap();
            assert_eq!(decoded.encode(), bytes);
            assert_eq!(decoded.into_fields(), fields);
        }
    }

    #[test]
    fn receipt_refuses_wrong_version_type_and_status() {
        assert_eq!(
            field_of(&Receipt::decode(&body_with(0, 2)).unwrap_err()),
            "version"
        );
        assert_eq!(
            field_of(&Receipt::decode(&body_with(1, 0x01)).unwrap_err()),
            "type"
        );
        assert_eq!(
            field_of(&Receipt::decode(&body_with(1, 0x41)).unwrap_err()),
            "type"
        );
        for status in [0, 4, 0xFF] {
            assert_eq!(
                field_of(&Receipt::decode(&body_with(2, status)).unwrap_err()),
                "status"
            );
        }
    }

    #[test]
    fn receipt_refuses_invalid_fields() {
        // txn_id at 3..19; recipient_terminal_id's length byte at 19.
        let mut zero_txn = Receipt::new(settled_to_payer()).unwrap().encode();
        zero_txn[3..19].fill(0);
        assert_eq!(field_of(&Receipt::decode(&zero_txn).unwrap_err()), "txn_id");
        assert_eq!(
            field_of(&Receipt::decode(&body_with(19, 33)).unwrap_err()),
            "recipient_terminal_id"
        );
        assert_eq!(
            field_of(&Receipt::decode(&body_with(19, 0)).unwrap_err()),
            "recipient_terminal_id"
        );
        // recipient_ksn at 28..40, its counter at 36..40: zero is not a counter.
        let mut zero_counter = Receipt::new(settled_to_payer()).unwrap().encode();
        zero_counter[36..40].fill(0);
        assert_eq!(
            field_of(&Receipt::decode(&zero_counter).unwrap_err()),
            "recipient_ksn"
        );
        // payee_terminal_id's length byte follows the digest, at 40 + 32 = 72.
        assert_eq!(
            field_of(&Receipt::decode(&body_with(72, 0)).unwrap_err()),
            "payee_terminal_id"
        );
        let mut bad_currency = Receipt::new(settled_to_payer()).unwrap().encode();
        let currency_at = bad_currency.len() - 19;
        bad_currency[currency_at..currency_at + 3].copy_from_slice(b"ZZZ");
        assert_eq!(
            field_of(&Receipt::decode(&bad_currency).unwrap_err()),
            "currency"
        );
        let mut zero_amount = Receipt::new(settled_to_payer()).unwrap().encode();
        let amount_at = zero_amount.len() - 27;
        zero_amount[amount_at..amount_at + 8].fill(0);
        assert_eq!(
            field_of(&Receipt::decode(&zero_amount).unwrap_err()),
            "amount"
        );
    }

    #[test]
    fn receipt_refuses_an_optional_identifier_that_is_present_but_invalid() {
        // payer_account_id "alice-main" → "alice main".
        let mut bytes = Receipt::new(settled_to_payer()).unwrap().encode();
        let at = bytes.len() - 27 - 5;
        assert_eq!(bytes[at], b'-');
        bytes[at] = b' ';
        assert_eq!(
            field_of(&Receipt::decode(&bytes).unwrap_err()),
            "payer_account_id"
        );
    }

    #[test]
    fn receipt_refuses_settlement_fields_not_matching_the_status() {
        refused(|f| f.settlement_id = 0, "settlement_id");
        refused(|f| f.settled_at_ms = 0, "settled_at");
        refused(
            |f| {
                f.status = ReceiptStatus::Pending;
                f.settled_at_ms = 0;
            },
            "settlement_id",
        );
        refused(
            |f| {
                f.status = ReceiptStatus::Expired;
                f.settlement_id = 0;
            },
            "settled_at",
        );
    }

    #[test]
    fn receipt_refuses_inconsistent_parties() {
        refused(|f| f.payer_account_id = None, "payer_account_id");
        refused(|f| f.payer_terminal_id = None, "payer_account_id");
        refused(
            |f| {
                f.payer_terminal_id = None;
                f.payer_account_id = None;
            },
            "payer_terminal_id",
        );
        refused(|f| f.payee_account_id = None, "payee_account_id");
        refused(
            |f| {
                f.status = ReceiptStatus::Pending;
                f.settlement_id = 0;
                f.settled_at_ms = 0;
                f.payee_account_id = None;
                f.payer_terminal_id = None;
                f.payer_account_id = None;
            },
            "payee_account_id",
        );
    }

    #[test]
    fn receipt_refuses_every_truncation_and_trailing_bytes() {
        let bytes = Receipt::new(settled_to_payer()).unwrap().encode();
        for length in 0..bytes.len() {
            assert!(
                matches!(
                    Receipt::decode(&bytes[..length]),
                    Err(ProtocolError::Length { .. })
                ),
                "truncated to {length} bytes"
            );
        }
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(field_of(&Receipt::decode(&long).unwrap_err()), "receipt");
        let too_long = vec![1; RECEIPT_BODY_BYTES_MAX + 1];
        assert_eq!(
            field_of(&Receipt::decode(&too_long).unwrap_err()),
            "receipt"
        );
    }

    #[test]
    fn sealed_receipt_refuses_short_long_and_invalid_bodies() {
        let sealed = SealedReceipt::new(
            Receipt::new(settled_to_payer()).unwrap(),
            [1; RECEIPT_CMAC_BYTES],
            [2; RECEIPT_SIGNATURE_BYTES],
        )
        .encode();
        for length in [0, RECEIPT_SEAL_BYTES - 1] {
            assert_eq!(
                field_of(&SealedReceipt::decode(&sealed[..length]).unwrap_err()),
                "sealed receipt"
            );
        }
        // Any other truncation cuts the body short.
        for length in RECEIPT_SEAL_BYTES..sealed.len() {
            assert!(SealedReceipt::decode(&sealed[..length]).is_err());
        }
        // A byte more makes the body one byte longer than its fields.
        let mut long = sealed.clone();
        long.push(0);
        assert_eq!(
            field_of(&SealedReceipt::decode(&long).unwrap_err()),
            "receipt"
        );
        let too_long = vec![1; SEALED_RECEIPT_BYTES_MAX + 1];
        assert_eq!(
            field_of(&SealedReceipt::decode(&too_long).unwrap_err()),
            "sealed receipt"
        );
        let mut bad_status = sealed.clone();
        bad_status[2] = 9;
        assert_eq!(
            field_of(&SealedReceipt::decode(&bad_status).unwrap_err()),
            "status"
        );
    }

    #[test]
    fn receipt_debug_is_readable() {
        let sealed = SealedReceipt::new(
            Receipt::new(pending_to_payee()).unwrap(),
            [0xCC; RECEIPT_CMAC_BYTES],
            [0x55; RECEIPT_SIGNATURE_BYTES],
        );
        let text = format!("{sealed:?}");
        assert!(
            text.contains(&format!("request_digest: {DIGEST_HEX}")),
            "{text}"
        );
        assert!(text.contains("payer_terminal_id: None"), "{text}");
        assert!(text.contains("cmac: cccccccc"), "{text}");
    }

    proptest! {
        #[test]
        fn receipt_encode_decode_encode_is_identity(receipt in arbitrary_receipt()) {
            let bytes = receipt.encode();
            prop_assert!(bytes.len() <= RECEIPT_BODY_BYTES_MAX);
            let decoded = Receipt::decode(&bytes).unwrap();
            prop_assert_eq!(&decoded, &receipt);
            prop_assert_eq!(decoded.encode(), bytes);
        }

        #[test]
        fn sealed_receipt_encode_decode_encode_is_identity(
            receipt in arbitrary_receipt(),
            cmac: [u8; 16],
            signature in prop::collection::vec(any::<u8>(), 64),
        ) {
            let signature: [u8; 64] = signature.try_into().unwrap();
            let sealed = SealedReceipt::new(receipt, cmac, signature);
            let bytes = sealed.encode();
            prop_assert!(bytes.len() <= SEALED_RECEIPT_BYTES_MAX);
            let decoded = SealedReceipt::decode(&bytes).unwrap();
            prop_assert_eq!(decoded.encode(), bytes);
            prop_assert_eq!(decoded, sealed);
        }

        #[test]
        fn receipt_decoders_never_panic_and_are_canonical(
            bytes in proptest::collection::vec(any::<u8>(), 0..400)
        ) {
            if let Ok(receipt) = Receipt::decode(&bytes) {
                prop_assert_eq!(receipt.encode(), bytes.clone());
            }
            if let Ok(sealed) = SealedReceipt::decode(&bytes) {
                prop_assert_eq!(sealed.encode(), bytes);
            }
        }

        #[test]
        fn receipt_with_one_byte_changed_decodes_canonically_or_not_at_all(
            receipt in arbitrary_receipt(),
            index: prop::sample::Index,
            value: u8,
        ) {
            let mut bytes = receipt.encode();
            let position = index.index(bytes.len());
            bytes[position] = value;
            if let Ok(decoded) = Receipt::decode(&bytes) {
                prop_assert_eq!(decoded.encode(), bytes);
            }
        }
    }
}
