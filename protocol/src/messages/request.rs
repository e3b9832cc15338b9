//! The payment request (docs/protocol.md §3): what the payee terminal asks the payer for.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

use super::codec::{Reader, Writer, check_bytes_max, in_field};
use super::{
    DESCRIPTION_BYTES_MAX, MESSAGE_TYPE_PAYMENT_REQUEST, PAYMENT_REQUEST_BYTES_MAX,
    REQUEST_DIGEST_BYTES, REQUEST_LIFETIME_MS_MAX,
};
use crate::error::ProtocolError;
use crate::{AccountId, Amount, TerminalId, TxnId};

/// What a payment is for; the ledger books each kind separately.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum PaymentKind {
    /// Goods or services (`1`).
    Purchase,
    /// Between people (`2`).
    Transfer,
    /// To another country (`3`).
    Remittance,
    /// A loan paid out or repaid (`4`).
    Loan,
}

impl PaymentKind {
    /// The wire code.
    pub fn code(self) -> u8 {
        match self {
            Self::Purchase => 1,
            Self::Transfer => 2,
            Self::Remittance => 3,
            Self::Loan => 4,
        }
    }
}

impl TryFrom<u8> for PaymentKind {
    type Error = ProtocolError;
    fn try_from(code: u8) -> Result<Self, Self::Error> {
        match code {
            1 => Ok(Self::Purchase),
            2 => Ok(Self::Transfer),
            3 => Ok(Self::Remittance),
            4 => Ok(Self::Loan),
            _ => Err(ProtocolError::Invalid {
                field: "kind",
                reason: "not a payment kind (1 to 4)",
            }),
        }
    }
}

/// When a request was made and until when it may be settled: `created_at < expires_at ≤
/// created_at + 600 000` (ms since the Unix epoch).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct RequestValidity {
    created_at_ms: u64,
    expires_at_ms: u64,
}

impl RequestValidity {
    /// Refuses an `expires_at_ms` not after `created_at_ms`, or more than
    /// [`REQUEST_LIFETIME_MS_MAX`] after it.
    pub fn new(created_at_ms: u64, expires_at_ms: u64) -> Result<Self, ProtocolError> {
        if expires_at_ms <= created_at_ms {
            return Err(ProtocolError::Invalid {
                field: "expires_at",
                reason: "not after created_at",
            });
        }
        if expires_at_ms - created_at_ms > REQUEST_LIFETIME_MS_MAX {
            return Err(ProtocolError::Invalid {
                field: "expires_at",
                reason: "more than 600 000 ms after created_at",
            });
        }
        Ok(Self {
            created_at_ms,
            expires_at_ms,
        })
    }

    /// When the payee made the request.
    pub fn created_at_ms(self) -> u64 {
        self.created_at_ms
    }

    /// After this the platform refuses to settle the request.
    pub fn expires_at_ms(self) -> u64 {
        self.expires_at_ms
    }

    /// Whether the request can no longer be settled at `now_ms`.
    pub fn is_expired_at(self, now_ms: u64) -> bool {
        now_ms > self.expires_at_ms
    }
}

/// What the payee says the payment is for, shown to the payer: UTF-8 of at most
/// [`DESCRIPTION_BYTES_MAX`] bytes, possibly empty, without control characters (Unicode `Cc`)
/// or bidirectional formatting characters, so that what the payer sees is what the bytes say.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Description(String);

impl Description {
    /// The description as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `c` may not appear in a description.
    fn is_forbidden(c: char) -> bool {
        c.is_control()
            || matches!(
                c,
                '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
            )
    }
}

impl TryFrom<&str> for Description {
    type Error = ProtocolError;
    fn try_from(text: &str) -> Result<Self, Self::Error> {
        if text.len() > DESCRIPTION_BYTES_MAX {
            return Err(ProtocolError::Invalid {
                field: "description",
                reason: "longer than 140 bytes",
            });
        }
        if text.chars().any(Self::is_forbidden) {
            return Err(ProtocolError::Invalid {
                field: "description",
                reason: "contains a control or bidirectional formatting character",
            });
        }
        Ok(Self(text.to_owned()))
    }
}

impl TryFrom<&[u8]> for Description {
    type Error = ProtocolError;
    fn try_from(bytes: &[u8]) -> Result<Self, Self::Error> {
        if bytes.len() > DESCRIPTION_BYTES_MAX {
            return Err(ProtocolError::Invalid {
                field: "description",
                reason: "longer than 140 bytes",
            });
        }
        let text = std::str::from_utf8(bytes).map_err(|_| ProtocolError::Invalid {
            field: "description",
            reason: "not UTF-8",
        })?;
        Self::try_from(text)
    }
}

impl FromStr for Description {
    type Err = ProtocolError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::try_from(s)
    }
}

impl fmt::Display for Description {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Description {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Description({:?})", self.0)
    }
}

/// A payment request (§3): built by the payee terminal, sent to the payer over NFC, and sealed
/// by the payee as half A.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct PaymentRequest {
    /// The payment's idempotency key, random, chosen by the payee terminal.
    pub txn_id: TxnId,
    /// The payee terminal.
    pub payee_terminal_id: TerminalId,
    /// The account to credit.
    pub payee_account_id: AccountId,
    /// How much, in what currency.
    pub amount: Amount,
    /// What the payment is for.
    pub kind: PaymentKind,
    /// `created_at` and `expires_at`.
    pub validity: RequestValidity,
    /// Shown to the payer.
    pub description: Description,
}

impl PaymentRequest {
    /// The canonical encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut writer = Writer::message(MESSAGE_TYPE_PAYMENT_REQUEST, PAYMENT_REQUEST_BYTES_MAX);
        writer.bytes(&self.txn_id.to_bytes());
        writer.str8(self.payee_terminal_id.as_str());
        writer.str8(self.payee_account_id.as_str());
        writer.amount(self.amount);
        writer.u8(self.kind.code());
        writer.u64(self.validity.created_at_ms());
        writer.u64(self.validity.expires_at_ms());
        writer.str8(self.description.as_str());
        writer.into_bytes()
    }

    /// Decodes exactly one canonical payment request, refusing anything else.
    pub fn decode(bytes: &[u8]) -> Result<Self, ProtocolError> {
        check_bytes_max("payment request", bytes, PAYMENT_REQUEST_BYTES_MAX)?;
        let mut reader = Reader::new(bytes);
        reader.version_and_type(MESSAGE_TYPE_PAYMENT_REQUEST, "not a payment request")?;
        let txn_id = reader.txn_id("txn_id")?;
        let payee_terminal_id = reader.identifier("payee_terminal_id")?;
        let payee_account_id = reader.identifier("payee_account_id")?;
        let amount = reader.amount()?;
        let kind = PaymentKind::try_from(reader.u8("kind")?)?;
        let created_at_ms = reader.u64("created_at")?;
        let expires_at_ms = reader.u64("expires_at")?;
        let validity = RequestValidity::new(created_at_ms, expires_at_ms)?;
        let description_bytes = reader.str8(
            "description",
            DESCRIPTION_BYTES_MAX,
            "longer than 140 bytes",
        )?;
        let description =
            Description::try_from(description_bytes).map_err(|e| in_field(e, "description"))?;
        reader.finish("payment request")?;
        Ok(Self {
            txn_id,
            payee_terminal_id,
            payee_account_id,
            amount,
            kind,
            validity,
            description,
        })
    }

    /// SHA-256 of a request's bytes, as the payer received them: what its instruction commits
    /// to (`request_digest`).
    pub fn digest(bytes: &[u8]) -> [u8; REQUEST_DIGEST_BYTES] {
        Sha256::digest(bytes).into()
    }
}

#[cfg(test)]
mod tests {
    use super::super::strategies::{arbitrary_request, bytes_of_hex, field_of};
    use super::*;
    use proptest::prelude::*;

    /// The request of the test vector below.
    fn sample() -> PaymentRequest {
        PaymentRequest {
            txn_id: "000102030405060708090A0B0C0D0E0F".parse().unwrap(),
            payee_terminal_id: "payee-01".parse().unwrap(),
            payee_account_id: "shop.42_eur".parse().unwrap(),
            amount: Amount::new(1250, "EUR".parse().unwrap()).unwrap(),
            kind: PaymentKind::Transfer,
            validity: RequestValidity::new(1_700_000_000_000, 1_700_000_120_000).unwrap(),
            description: "Café ☕".parse().unwrap(),
        }
    }

    /// The fields of a request as raw wire values, to write invalid ones.
    #[derive(Clone)]
    struct Raw {
        version: u8,
        message_type: u8,
        txn_id: [u8; 16],
        payee_terminal_id: Vec<u8>,
        payee_account_id: Vec<u8>,
        amount: u64,
        currency: [u8; 3],
        kind: u8,
        created_at: u64,
        expires_at: u64,
        description: Vec<u8>,
    }

    impl Raw {
        fn valid() -> Self {
            Self {
                version: 1,
                message_type: 1,
                txn_id: [7; 16],
                payee_terminal_id: b"payee-01".to_vec(),
                payee_account_id: b"shop".to_vec(),
                amount: 1250,
                currency: *b"EUR",
                kind: 1,
                created_at: 1_000_000,
                expires_at: 1_060_000,
                description: b"coffee".to_vec(),
            }
        }

        fn encode(&self) -> Vec<u8> {
            let str8 = |bytes: &[u8]| [&[bytes.len() as u8][..], bytes].concat();
            [
                &[self.version, self.message_type][..],
                &self.txn_id,
                &str8(&self.payee_terminal_id),
                &str8(&self.payee_account_id),
                &self.amount.to_be_bytes(),
                &self.currency,
                &[self.kind],
                &self.created_at.to_be_bytes(),
                &self.expires_at.to_be_bytes(),
                &str8(&self.description),
            ]
            .concat()
        }

        /// Asserts that the request with `edit` applied is refused, naming `field`.
        fn refused(edit: impl FnOnce(&mut Self), field: &str) {
            let mut raw = Self::valid();
            edit(&mut raw);
            let error = PaymentRequest::decode(&raw.encode()).unwrap_err();
            assert_eq!(field_of(&error), field, "{error}");
        }
    }

    #[test]
    fn request_test_vector_matches_the_field_table() {
        let expected = bytes_of_hex(concat!(
            "01",                               // version
            "01",                               // type: payment request
            "000102030405060708090a0b0c0d0e0f", // txn_id
            "08 70617965652d3031",              // payee_terminal_id: L = 8, "payee-01"
            "0b 73686f702e34325f657572",        // payee_account_id: L = 11, "shop.42_eur"
            "00000000000004e2",                 // amount: 1250 minor units
            "455552",                           // currency: "EUR"
            "02",                               // kind: transfer
            "0000018bcfe56800",                 // created_at: 1 700 000 000 000 ms
            "0000018bcfe73cc0",                 // expires_at: 1 700 000 120 000 ms
            "09 436166c3a920e29895",            // description: L = 9, "Café ☕" in UTF-8
        ));
        assert_eq!(sample().encode(), expected);
        assert_eq!(PaymentRequest::decode(&expected).unwrap(), sample());
    }

    #[test]
    fn request_round_trips_and_its_digest_is_of_the_bytes_as_received() {
        let bytes = sample().encode();
        let decoded = PaymentRequest::decode(&bytes).unwrap();
        assert_eq!(decoded.encode(), bytes);
        assert_eq!(
            PaymentRequest::digest(&decoded.encode()),
            PaymentRequest::digest(&bytes)
        );
        // SHA-256("abc"), FIPS 180-4 example.
        assert_eq!(
            hex::encode(PaymentRequest::digest(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn request_at_its_longest_decodes() {
        let mut raw = Raw::valid();
        raw.payee_terminal_id = vec![b'T'; 32];
        raw.payee_account_id = vec![b'a'; 32];
        raw.description = "é".repeat(70).into_bytes();
        raw.amount = 1 << 53;
        raw.expires_at = raw.created_at + REQUEST_LIFETIME_MS_MAX;
        let bytes = raw.encode();
        assert_eq!(bytes.len(), PAYMENT_REQUEST_BYTES_MAX);
        assert_eq!(PaymentRequest::decode(&bytes).unwrap().encode(), bytes);
    }

    #[test]
    fn request_refuses_wrong_version_and_type() {
        Raw::refused(|r| r.version = 2, "version");
        Raw::refused(|r| r.version = 0, "version");
        Raw::refused(|r| r.message_type = 2, "type");
        Raw::refused(|r| r.message_type = 0x41, "type");
    }

    #[test]
    fn request_refuses_every_truncation() {
        let bytes = Raw::valid().encode();
        for length in 0..bytes.len() {
            assert!(
                matches!(
                    PaymentRequest::decode(&bytes[..length]),
                    Err(ProtocolError::Length { .. })
                ),
                "truncated to {length} bytes"
            );
        }
    }

    #[test]
    fn request_refuses_trailing_bytes() {
        let mut bytes = Raw::valid().encode();
        bytes.push(0);
        assert!(matches!(
            PaymentRequest::decode(&bytes),
            Err(ProtocolError::Length {
                field: "payment request",
                ..
            })
        ));
    }

    #[test]
    fn request_refuses_more_than_the_longest_request_before_reading_it() {
        let mut bytes = vec![0xFF; PAYMENT_REQUEST_BYTES_MAX + 1];
        bytes[..2].copy_from_slice(&[1, 1]);
        assert_eq!(
            field_of(&PaymentRequest::decode(&bytes).unwrap_err()),
            "payment request"
        );
    }

    #[test]
    fn request_refuses_an_all_zero_txn_id() {
        Raw::refused(|r| r.txn_id = [0; 16], "txn_id");
    }

    #[test]
    fn request_refuses_invalid_identifiers() {
        Raw::refused(|r| r.payee_terminal_id.clear(), "payee_terminal_id");
        Raw::refused(
            |r| r.payee_terminal_id = vec![b'x'; 33],
            "payee_terminal_id",
        );
        Raw::refused(
            |r| r.payee_terminal_id = b"a b".to_vec(),
            "payee_terminal_id",
        );
        Raw::refused(|r| r.payee_account_id.clear(), "payee_account_id");
        Raw::refused(
            |r| r.payee_account_id = b"acct/1".to_vec(),
            "payee_account_id",
        );
        Raw::refused(
            |r| r.payee_account_id = vec![0xC3, 0xA9],
            "payee_account_id",
        );
    }

    #[test]
    fn request_refuses_invalid_amounts_and_currencies() {
        Raw::refused(|r| r.amount = 0, "amount");
        Raw::refused(|r| r.amount = (1 << 53) + 1, "amount");
        Raw::refused(|r| r.amount = u64::MAX, "amount");
        Raw::refused(|r| r.currency = *b"ZZZ", "currency");
        Raw::refused(|r| r.currency = *b"eur", "currency");
        Raw::refused(|r| r.currency = *b"XAU", "currency");
        Raw::refused(|r| r.currency = [0xFF, b'U', b'R'], "currency");
    }

    #[test]
    fn request_refuses_unknown_kinds() {
        for kind in [0, 5, 0xFF] {
            Raw::refused(|r| r.kind = kind, "kind");
        }
    }

    #[test]
    fn request_refuses_expiry_outside_its_lifetime() {
        Raw::refused(|r| r.expires_at = r.created_at, "expires_at");
        Raw::refused(|r| r.expires_at = r.created_at - 1, "expires_at");
        Raw::refused(
            |r| r.expires_at = r.created_at + REQUEST_LIFETIME_MS_MAX + 1,
            "expires_at",
        );
        Raw::refused(
            |r| {
                r.created_at = u64::MAX - 1;
                r.expires_at = 1;
            },
            "expires_at",
        );
        assert!(RequestValidity::new(u64::MAX - 1, u64::MAX).is_ok());
    }

    #[test]
    fn request_refuses_invalid_descriptions() {
        Raw::refused(|r| r.description = vec![b'x'; 141], "description");
        Raw::refused(|r| r.description = vec![0xC3], "description");
        Raw::refused(|r| r.description = vec![0xC0, 0x80], "description"); // overlong NUL
        Raw::refused(|r| r.description = b"line\nbreak".to_vec(), "description");
        Raw::refused(|r| r.description = b"nul\0".to_vec(), "description");
        Raw::refused(|r| r.description = "c1\u{0085}".into(), "description");
        Raw::refused(|r| r.description = "rlo\u{202E}".into(), "description");
        Raw::refused(|r| r.description = "isolate\u{2067}".into(), "description");
    }

    #[test]
    fn description_accepts_empty_and_the_limit() {
        assert_eq!(Description::try_from("").unwrap().as_str(), "");
        assert!(Description::try_from("x".repeat(140).as_str()).is_ok());
        assert!(Description::try_from("x".repeat(141).as_str()).is_err());
        assert_eq!(
            format!("{:?}", Description::try_from("tea").unwrap()),
            "Description(\"tea\")"
        );
    }

    #[test]
    fn payment_kind_codes_round_trip() {
        for kind in [
            PaymentKind::Purchase,
            PaymentKind::Transfer,
            PaymentKind::Remittance,
            PaymentKind::Loan,
        ] {
            assert_eq!(PaymentKind::try_from(kind.code()).unwrap(), kind);
        }
    }

    #[test]
    fn validity_expires_after_expires_at() {
        let validity = RequestValidity::new(10, 20).unwrap();
        assert!(!validity.is_expired_at(20));
        assert!(validity.is_expired_at(21));
    }

    proptest! {
        #[test]
        fn request_encode_decode_encode_is_identity(request in arbitrary_request()) {
            let bytes = request.encode();
            prop_assert!(bytes.len() <= PAYMENT_REQUEST_BYTES_MAX);
            let decoded = PaymentRequest::decode(&bytes).unwrap();
            prop_assert_eq!(&decoded, &request);
            prop_assert_eq!(decoded.encode(), bytes);
        }

        #[test]
        fn request_decode_never_panics_and_is_canonical(
            bytes in proptest::collection::vec(any::<u8>(), 0..300)
        ) {
            if let Ok(request) = PaymentRequest::decode(&bytes) {
                prop_assert_eq!(request.encode(), bytes);
            }
        }

        #[test]
        fn request_with_one_byte_changed_decodes_canonically_or_not_at_all(
            request in arbitrary_request(),
            index: prop::sample::Index,
            value: u8,
        ) {
            let mut bytes = request.encode();
            let position = index.index(bytes.len());
            bytes[position] = value;
            if let Ok(decoded) = PaymentRequest::decode(&bytes) {
                prop_assert_eq!(decoded.encode(), bytes);
            }
        }
    }
}
