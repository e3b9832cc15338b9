//! The payment instruction (docs/protocol.md §4): the payer's consent to one request.

use std::fmt;

use super::codec::{HexDebug, Reader, Writer, check_bytes_max};
use super::{
    MESSAGE_TYPE_PAYMENT_INSTRUCTION, PAYMENT_INSTRUCTION_BYTES_MAX, PaymentRequest,
    REQUEST_DIGEST_BYTES,
};
use crate::error::ProtocolError;
use crate::{AccountId, Amount, TerminalId, TxnId};

/// A payment instruction (§4): built by the payer terminal once the payer consents, and sealed
/// as half B. It repeats the payee, amount and currency so that what the payer consented to is
/// explicit in its own half.
#[derive(Clone, PartialEq, Eq)]
pub struct PaymentInstruction {
    /// Copied from the request.
    pub txn_id: TxnId,
    /// SHA-256 of the request bytes as received over NFC ([`PaymentRequest::digest`]).
    pub request_digest: [u8; REQUEST_DIGEST_BYTES],
    /// The payer terminal.
    pub payer_terminal_id: TerminalId,
    /// The account to debit.
    pub payer_account_id: AccountId,
    /// Copied from the request.
    pub payee_terminal_id: TerminalId,
    /// Copied from the request.
    pub amount: Amount,
    /// When the payer consented (ms since the Unix epoch).
    pub consented_at_ms: u64,
}

impl PaymentInstruction {
    /// The instruction consenting to the request received as `request_bytes`: decodes them,
    /// copies what the instruction repeats and commits to their digest.
    pub fn consenting_to(
        request_bytes: &[u8],
        payer_terminal_id: TerminalId,
        payer_account_id: AccountId,
        consented_at_ms: u64,
    ) -> Result<Self, ProtocolError> {
        let request = PaymentRequest::decode(request_bytes)?;
        Ok(Self {
            txn_id: request.txn_id,
            request_digest: PaymentRequest::digest(request_bytes),
            payer_terminal_id,
            payer_account_id,
            payee_terminal_id: request.payee_terminal_id,
            amount: request.amount,
            consented_at_ms,
        })
    }

    /// The canonical encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut writer = Writer::message(
            MESSAGE_TYPE_PAYMENT_INSTRUCTION,
            PAYMENT_INSTRUCTION_BYTES_MAX,
        );
        writer.bytes(&self.txn_id.to_bytes());
        writer.bytes(&self.request_digest);
        writer.str8(self.payer_terminal_id.as_str());
        writer.str8(self.payer_account_id.as_str());
        writer.str8(self.payee_terminal_id.as_str());
        writer.amount(self.amount);
        writer.u64(self.consented_at_ms);
        writer.into_bytes()
    }

    /// Decodes exactly one canonical payment instruction, refusing anything else.
    pub fn decode(bytes: &[u8]) -> Result<Self, ProtocolError> {
        check_bytes_max("payment instruction", bytes, PAYMENT_INSTRUCTION_BYTES_MAX)?;
        let mut reader = Reader::new(bytes);
        reader.version_and_type(
            MESSAGE_TYPE_PAYMENT_INSTRUCTION,
            "not a payment instruction",
        )?;
        let instruction = Self {
            txn_id: reader.txn_id("txn_id")?,
            request_digest: reader.array("request_digest")?,
            payer_terminal_id: reader.identifier("payer_terminal_id")?,
            payer_account_id: reader.identifier("payer_account_id")?,
            payee_terminal_id: reader.identifier("payee_terminal_id")?,
            amount: reader.amount()?,
            consented_at_ms: reader.u64("consented_at")?,
        };
        reader.finish("payment instruction")?;
        Ok(instruction)
    }
}

impl fmt::Debug for PaymentInstruction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PaymentInstruction")
            .field("txn_id", &self.txn_id)
            .field("request_digest", &HexDebug(&self.request_digest))
            .field("payer_terminal_id", &self.payer_terminal_id)
            .field("payer_account_id", &self.payer_account_id)
            .field("payee_terminal_id", &self.payee_terminal_id)
            .field("amount", &self.amount)
            .field("consented_at_ms", &self.consented_at_ms)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::super::strategies::{arbitrary_instruction, bytes_of_hex, field_of};
    use super::*;
    use proptest::prelude::*;

    /// The request the instruction of the test vector consents to (the request test vector).
    const REQUEST_HEX: &str = concat!(
        "0101000102030405060708090a0b0c0d0e0f0870617965652d30310b73686f702e34325f657572",
        "00000000000004e2455552020000018bcfe568000000018bcfe73cc009436166c3a920e29895",
    );

    fn sample() -> PaymentInstruction {
        PaymentInstruction::consenting_to(
            &bytes_of_hex(REQUEST_HEX),
            "payer-07".parse().unwrap(),
            "alice-main".parse().unwrap(),
            1_700_000_030_000,
        )
        .unwrap()
    }

    #[derive(Clone)]
    struct Raw {
        version: u8,
        message_type: u8,
        txn_id: [u8; 16],
        request_digest: [u8; 32],
        payer_terminal_id: Vec<u8>,
        payer_account_id: Vec<u8>,
        payee_terminal_id: Vec<u8>,
        amount: u64,
        currency: [u8; 3],
        consented_at: u64,
    }

    impl Raw {
        fn valid() -> Self {
            Self {
                version: 1,
                message_type: 2,
                txn_id: [7; 16],
                request_digest: [0xAB; 32],
                payer_terminal_id: b"payer-07".to_vec(),
                payer_account_id: b"alice".to_vec(),
                payee_terminal_id: b"payee-01".to_vec(),
                amount: 1250,
                currency: *b"EUR",
                consented_at: 1_000_000,
            }
        }

        fn encode(&self) -> Vec<u8> {
            let str8 = |bytes: &[u8]| [&[bytes.len() as u8][..], bytes].concat();
            [
                &[self.version, self.message_type][..],
                &self.txn_id,
                &self.request_digest,
                &str8(&self.payer_terminal_id),
                &str8(&self.payer_account_id),
                &str8(&self.payee_terminal_id),
                &self.amount.to_be_bytes(),
                &self.currency,
                &self.consented_at.to_be_bytes(),
            ]
            .concat()
        }

        fn refused(edit: impl FnOnce(&mut Self), field: &str) {
            let mut raw = Self::valid();
            edit(&mut raw);
            let error = PaymentInstruction::decode(&raw.encode()).unwrap_err();
            assert_eq!(field_of(&error), field, "{error}");
        }
    }

    #[test]
    fn instruction_test_vector_matches_the_field_table() {
        let expected = bytes_of_hex(concat!(
            "01",                               // version
            "02",                               // type: payment instruction
            "000102030405060708090a0b0c0d0e0f", // txn_id, copied from the request
            // request_digest: SHA-256 of the request test vector's 77 bytes
            "cbb440a4491ef7dad6a66046ecb86e2f415dc394243b5d4063dc47acb249b13f",
            "08 70617965722d3037",     // payer_terminal_id: L = 8, "payer-07"
            "0a 616c6963652d6d61696e", // payer_account_id: L = 10, "alice-main"
            "08 70617965652d3031",     // payee_terminal_id: L = 8, "payee-01"
            "00000000000004e2",        // amount: 1250 minor units
            "455552",                  // currency: "EUR"
            "0000018bcfe5dd30",        // consented_at: 1 700 000 030 000 ms
        ));
        assert_eq!(sample().encode(), expected);
        assert_eq!(PaymentInstruction::decode(&expected).unwrap(), sample());
    }

    #[test]
    fn instruction_round_trips() {
        let bytes = sample().encode();
        assert_eq!(PaymentInstruction::decode(&bytes).unwrap().encode(), bytes);
        let longest = Raw {
            payer_terminal_id: vec![b'p'; 32],
            payer_account_id: vec![b'a'; 32],
            payee_terminal_id: vec![b'q'; 32],
            ..Raw::valid()
        }
        .encode();
        assert_eq!(longest.len(), PAYMENT_INSTRUCTION_BYTES_MAX);
        assert_eq!(
            PaymentInstruction::decode(&longest).unwrap().encode(),
            longest
        );
    }

    #[test]
    fn instruction_consenting_to_refuses_a_malformed_request() {
        let mut request = bytes_of_hex(REQUEST_HEX);
        request.push(0);
        assert!(
            PaymentInstruction::consenting_to(
                &request,
                "payer-07".parse().unwrap(),
                "alice".parse().unwrap(),
                1
            )
            .is_err()
        );
    }

    #[test]
    fn instruction_debug_shows_the_digest_in_hex() {
        let text = format!("{:?}", sample());
        assert!(text.contains("request_digest: cbb440a4"), "{text}");
        assert!(text.contains("TerminalId(payer-07)"), "{text}");
    }

    #[test]
    fn instruction_refuses_wrong_version_and_type() {
        Raw::refused(|r| r.version = 0, "version");
        Raw::refused(|r| r.message_type = 1, "type");
        Raw::refused(|r| r.message_type = 0x42, "type");
    }

    #[test]
    fn instruction_refuses_every_truncation_and_trailing_bytes() {
        let bytes = Raw::valid().encode();
        for length in 0..bytes.len() {
            assert!(
                matches!(
                    PaymentInstruction::decode(&bytes[..length]),
                    Err(ProtocolError::Length { .. })
                ),
                "truncated to {length} bytes"
            );
        }
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(
            field_of(&PaymentInstruction::decode(&long).unwrap_err()),
            "payment instruction"
        );
        let too_long = vec![1; PAYMENT_INSTRUCTION_BYTES_MAX + 1];
        assert_eq!(
            field_of(&PaymentInstruction::decode(&too_long).unwrap_err()),
            "payment instruction"
        );
    }

    #[test]
    fn instruction_refuses_invalid_fields() {
        Raw::refused(|r| r.txn_id = [0; 16], "txn_id");
        Raw::refused(|r| r.payer_terminal_id.clear(), "payer_terminal_id");
        Raw::refused(
            |r| r.payer_terminal_id = vec![b'x'; 33],
            "payer_terminal_id",
        );
        Raw::refused(|r| r.payer_account_id = b"a b".to_vec(), "payer_account_id");
        Raw::refused(
            |r| r.payee_terminal_id = b"a:b".to_vec(),
            "payee_terminal_id",
        );
        Raw::refused(|r| r.amount = 0, "amount");
        Raw::refused(|r| r.amount = (1 << 53) + 1, "amount");
        Raw::refused(|r| r.currency = *b"XXX", "currency");
    }

    proptest! {
        #[test]
        fn instruction_encode_decode_encode_is_identity(instruction in arbitrary_instruction()) {
            let bytes = instruction.encode();
            prop_assert!(bytes.len() <= PAYMENT_INSTRUCTION_BYTES_MAX);
            let decoded = PaymentInstruction::decode(&bytes).unwrap();
            prop_assert_eq!(&decoded, &instruction);
            prop_assert_eq!(decoded.encode(), bytes);
        }

        #[test]
        fn instruction_decode_never_panics_and_is_canonical(
            bytes in proptest::collection::vec(any::<u8>(), 0..200)
        ) {
            if let Ok(instruction) = PaymentInstruction::decode(&bytes) {
                prop_assert_eq!(instruction.encode(), bytes);
            }
        }

        #[test]
        fn instruction_with_one_byte_changed_decodes_canonically_or_not_at_all(
            instruction in arbitrary_instruction(),
            index: prop::sample::Index,
            value: u8,
        ) {
            let mut bytes = instruction.encode();
            let position = index.index(bytes.len());
            bytes[position] = value;
            if let Ok(decoded) = PaymentInstruction::decode(&bytes) {
                prop_assert_eq!(decoded.encode(), bytes);
            }
        }
    }
}
