//! Halves (docs/protocol.md §5): a clear header, which is the AAD, and a GCM body.

use std::fmt;

use super::codec::{HexDebug, Reader, Writer, check_bytes_max, in_field};
use super::{
    GCM_NONCE_BYTES, HALF_BODY_BYTES_MAX, HALF_BODY_BYTES_MIN, HALF_BYTES_MAX,
    HALF_HEADER_BYTES_MAX, MESSAGE_TYPE_HALF_A, MESSAGE_TYPE_HALF_B, PROTOCOL_VERSION,
};
use crate::error::ProtocolError;
use crate::{Ksn, TerminalId};

/// Which half: A from the payee (body: the payment request), B from the payer (body: the
/// payment instruction).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum HalfKind {
    /// The payee's half, type `0x41`.
    A,
    /// The payer's half, type `0x42`.
    B,
}

impl HalfKind {
    /// The half's letter, lowercase: the last segment of its route
    /// ([`crate::api::half_path`]) and its label in metrics.
    pub fn letter(self) -> &'static str {
        match self {
            Self::A => "a",
            Self::B => "b",
        }
    }

    /// The type byte.
    pub fn code(self) -> u8 {
        match self {
            Self::A => MESSAGE_TYPE_HALF_A,
            Self::B => MESSAGE_TYPE_HALF_B,
        }
    }
}

impl TryFrom<u8> for HalfKind {
    type Error = ProtocolError;
    fn try_from(code: u8) -> Result<Self, Self::Error> {
        match code {
            MESSAGE_TYPE_HALF_A => Ok(Self::A),
            MESSAGE_TYPE_HALF_B => Ok(Self::B),
            _ => Err(ProtocolError::Invalid {
                field: "type",
                reason: "not a half (0x41 or 0x42)",
            }),
        }
    }
}

/// The clear header of a half, without `body_length` (which follows from the body).
#[derive(Clone, PartialEq, Eq)]
pub struct HalfHeader {
    /// Half A or half B.
    pub kind: HalfKind,
    /// The sending terminal; the platform checks it against the client certificate.
    pub terminal_id: TerminalId,
    /// The sending terminal's DUKPT KSN for this half; names the GCM key.
    pub ksn: Ksn,
    /// The terminal's clock when sealing (ms since the Unix epoch).
    pub sent_at_ms: u64,
    /// The GCM nonce, random.
    pub nonce: [u8; GCM_NONCE_BYTES],
}

impl HalfHeader {
    /// The header bytes, `version` through `body_length`, for a body of `body_length` bytes
    /// (the plaintext's length plus [`GCM_TAG_BYTES`](super::GCM_TAG_BYTES)): the AAD to seal
    /// that body under. Refuses a length outside [`HALF_BODY_BYTES_MIN`]`..=`
    /// [`HALF_BODY_BYTES_MAX`].
    pub fn encode(&self, body_length: usize) -> Result<Vec<u8>, ProtocolError> {
        let body_length = check_body_length(body_length)?;
        let mut writer = Writer::new(HALF_HEADER_BYTES_MAX);
        writer.u8(PROTOCOL_VERSION);
        writer.u8(self.kind.code());
        writer.str8(self.terminal_id.as_str());
        writer.bytes(&self.ksn.to_bytes());
        writer.u64(self.sent_at_ms);
        writer.bytes(&self.nonce);
        writer.u16(body_length);
        Ok(writer.into_bytes())
    }
}

impl fmt::Debug for HalfHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HalfHeader")
            .field("kind", &self.kind)
            .field("terminal_id", &self.terminal_id)
            .field("ksn", &self.ksn)
            .field("sent_at_ms", &self.sent_at_ms)
            .field("nonce", &HexDebug(&self.nonce))
            .finish()
    }
}

/// Refuses a body length outside the limits; a length within them fits the `u16` field.
fn check_body_length(body_length: usize) -> Result<u16, ProtocolError> {
    if !(HALF_BODY_BYTES_MIN..=HALF_BODY_BYTES_MAX).contains(&body_length) {
        return Err(ProtocolError::Invalid {
            field: "body_length",
            reason: "outside 16 ..= 2064 bytes",
        });
    }
    u16::try_from(body_length).map_err(|_| ProtocolError::Invalid {
        field: "body_length",
        reason: "outside 16 ..= 2064 bytes",
    })
}

/// A half as sent: its header, the header's exact bytes (the AAD), and the GCM body
/// (ciphertext ‖ tag), which is opaque here.
#[derive(Clone, PartialEq, Eq)]
pub struct HalfEnvelope {
    header: HalfHeader,
    header_bytes: Vec<u8>,
    body: Vec<u8>,
}

impl HalfEnvelope {
    /// A half of `header` and the sealed `body`, whose length must be within
    /// [`HALF_BODY_BYTES_MIN`]`..=`[`HALF_BODY_BYTES_MAX`]. The body must have been sealed under
    /// `header.encode(body.len())` as AAD.
    pub fn new(header: HalfHeader, body: Vec<u8>) -> Result<Self, ProtocolError> {
        let header_bytes = header.encode(body.len())?;
        Ok(Self {
            header,
            header_bytes,
            body,
        })
    }

    /// Decodes exactly one canonical half, of either kind, refusing anything else. The caller
    /// checks the kind against the route.
    pub fn decode(bytes: &[u8]) -> Result<Self, ProtocolError> {
        check_bytes_max("half", bytes, HALF_BYTES_MAX)?;
        let mut reader = Reader::new(bytes);
        if reader.u8("version")? != PROTOCOL_VERSION {
            return Err(ProtocolError::Invalid {
                field: "version",
                reason: "unsupported protocol version",
            });
        }
        let kind = HalfKind::try_from(reader.u8("type")?)?;
        let terminal_id = reader.identifier("terminal_id")?;
        let ksn =
            Ksn::try_from(reader.array::<{ Ksn::LEN }>("ksn")?).map_err(|e| in_field(e, "ksn"))?;
        let sent_at_ms = reader.u64("sent_at")?;
        let nonce = reader.array("nonce")?;
        let body_length = usize::from(reader.u16("body_length")?);
        check_body_length(body_length)?;
        let header_length = reader.consumed();
        let body = reader.take("body", body_length)?;
        reader.finish("half")?;
        Ok(Self {
            header: HalfHeader {
                kind,
                terminal_id,
                ksn,
                sent_at_ms,
                nonce,
            },
            header_bytes: bytes[..header_length].to_vec(),
            body: body.to_vec(),
        })
    }

    /// The canonical encoding: header bytes ‖ body.
    pub fn encode(&self) -> Vec<u8> {
        [&self.header_bytes[..], &self.body[..]].concat()
    }

    /// The header.
    pub fn header(&self) -> &HalfHeader {
        &self.header
    }

    /// Half A or half B.
    pub fn kind(&self) -> HalfKind {
        self.header.kind
    }

    /// The header bytes exactly as received (or encoded), `version` through `body_length`
    /// inclusive: the GCM AAD.
    pub fn header_bytes(&self) -> &[u8] {
        &self.header_bytes
    }

    /// The GCM ciphertext ‖ tag.
    pub fn body(&self) -> &[u8] {
        &self.body
    }
}

impl fmt::Debug for HalfEnvelope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HalfEnvelope")
            .field("header", &self.header)
            .field("body_length", &self.body.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::super::strategies::{arbitrary_half, bytes_of_hex, field_of};
    use super::*;
    use proptest::prelude::*;

    fn sample_header() -> HalfHeader {
        HalfHeader {
            kind: HalfKind::A,
            terminal_id: "payee-01".parse().unwrap(),
            ksn: "123456789012345600000001".parse().unwrap(),
            sent_at_ms: 1_700_000_031_000,
            nonce: bytes_of_hex("a0a1a2a3a4a5a6a7a8a9aaab").try_into().unwrap(),
        }
    }

    /// 20 bytes standing for ciphertext ‖ tag.
    fn sample_body() -> Vec<u8> {
        bytes_of_hex("000102030405060708090a0b0c0d0e0f10111213")
    }

    #[derive(Clone)]
    struct Raw {
        version: u8,
        message_type: u8,
        terminal_id: Vec<u8>,
        ksn: [u8; 12],
        sent_at: u64,
        nonce: [u8; 12],
        body_length: u16,
        body: Vec<u8>,
    }

    impl Raw {
        fn valid() -> Self {
            Self {
                version: 1,
                message_type: 0x42,
                terminal_id: b"payer-07".to_vec(),
                ksn: bytes_of_hex("123456789012345600000003").try_into().unwrap(),
                sent_at: 1_000_000,
                nonce: [9; 12],
                body_length: 16,
                body: vec![0x5A; 16],
            }
        }

        fn encode(&self) -> Vec<u8> {
            [
                &[
                    self.version,
                    self.message_type,
                    self.terminal_id.len() as u8,
                ][..],
                &self.terminal_id,
                &self.ksn,
                &self.sent_at.to_be_bytes(),
                &self.nonce,
                &self.body_length.to_be_bytes(),
                &self.body,
            ]
            .concat()
        }

        fn refused(edit: impl FnOnce(&mut Self), field: &str) {
            let mut raw = Self::valid();
            edit(&mut raw);
            let error = HalfEnvelope::decode(&raw.encode()).unwrap_err();
            assert_eq!(field_of(&error), field, "{error}");
        }
    }

    #[test]
    fn half_test_vector_matches_the_field_table() {
        let header = bytes_of_hex(concat!(
            "01",                        // version
            "41",                        // type: half A
            "08 70617965652d3031",       // terminal_id: L = 8, "payee-01"
            "1234567890123456 00000001", // ksn: initial key ID, counter 1
            "0000018bcfe5e118",          // sent_at: 1 700 000 031 000 ms
            "a0a1a2a3a4a5a6a7a8a9aaab",  // nonce
            "0014",                      // body_length: 20
        ));
        let expected = [&header[..], &sample_body()].concat(); // body: ciphertext ‖ tag
        let half = HalfEnvelope::new(sample_header(), sample_body()).unwrap();
        assert_eq!(half.encode(), expected);
        assert_eq!(half.header_bytes(), header);
        assert_eq!(sample_header().encode(20).unwrap(), header);

        let decoded = HalfEnvelope::decode(&expected).unwrap();
        assert_eq!(decoded, half);
        assert_eq!(decoded.kind(), HalfKind::A);
        assert_eq!(decoded.header_bytes(), header);
        assert_eq!(decoded.body(), sample_body());
    }

    #[test]
    fn half_round_trips_at_the_body_limits() {
        for length in [HALF_BODY_BYTES_MIN, HALF_BODY_BYTES_MAX] {
            let raw = Raw {
                terminal_id: vec![b't'; 32],
                body_length: length as u16,
                body: vec![0xEE; length],
                ..Raw::valid()
            };
            let bytes = raw.encode();
            let half = HalfEnvelope::decode(&bytes).unwrap();
            assert_eq!(half.kind(), HalfKind::B);
            assert_eq!(half.header_bytes(), &bytes[..HALF_HEADER_BYTES_MAX]);
            assert_eq!(half.encode(), bytes);
        }
    }

    #[test]
    fn half_new_refuses_a_body_out_of_range() {
        for length in [0, HALF_BODY_BYTES_MIN - 1, HALF_BODY_BYTES_MAX + 1, 70_000] {
            let error = HalfEnvelope::new(sample_header(), vec![0; length]).unwrap_err();
            assert_eq!(field_of(&error), "body_length");
        }
        assert!(sample_header().encode(15).is_err());
    }

    #[test]
    fn half_refuses_wrong_version_and_type() {
        Raw::refused(|r| r.version = 2, "version");
        Raw::refused(|r| r.message_type = 0x43, "type");
        Raw::refused(|r| r.message_type = 0x01, "type");
        Raw::refused(|r| r.message_type = 0x52, "type");
    }

    #[test]
    fn half_refuses_body_lengths_out_of_range_before_reading_the_body() {
        Raw::refused(
            |r| {
                r.body_length = 15;
                r.body.truncate(15);
            },
            "body_length",
        );
        // Announces more than the limit, carrying nothing: refused for the length, not for
        // truncation.
        Raw::refused(
            |r| {
                r.body_length = HALF_BODY_BYTES_MAX as u16 + 1;
                r.body.clear();
            },
            "body_length",
        );
        Raw::refused(
            |r| {
                r.body_length = u16::MAX;
                r.body.clear();
            },
            "body_length",
        );
    }

    #[test]
    fn half_refuses_a_body_shorter_or_longer_than_body_length() {
        Raw::refused(
            |r| {
                r.body.pop();
            },
            "body",
        );
        Raw::refused(|r| r.body.push(0), "half");
        let too_long = vec![0; HALF_BYTES_MAX + 1];
        assert_eq!(
            field_of(&HalfEnvelope::decode(&too_long).unwrap_err()),
            "half"
        );
    }

    #[test]
    fn half_refuses_every_truncation() {
        let bytes = Raw::valid().encode();
        for length in 0..bytes.len() {
            assert!(
                matches!(
                    HalfEnvelope::decode(&bytes[..length]),
                    Err(ProtocolError::Length { .. })
                ),
                "truncated to {length} bytes"
            );
        }
    }

    #[test]
    fn half_refuses_invalid_terminal_ids_and_ksns() {
        Raw::refused(|r| r.terminal_id.clear(), "terminal_id");
        Raw::refused(|r| r.terminal_id = vec![b'x'; 33], "terminal_id");
        Raw::refused(|r| r.terminal_id = b"no space".to_vec(), "terminal_id");
        Raw::refused(|r| r.ksn[8..].copy_from_slice(&[0; 4]), "ksn");
        Raw::refused(|r| r.ksn[8..].copy_from_slice(&[0xFF; 4]), "ksn");
    }

    #[test]
    fn half_debug_is_readable() {
        let half = HalfEnvelope::new(sample_header(), sample_body()).unwrap();
        let text = format!("{half:?}");
        assert!(text.contains("nonce: a0a1a2a3a4a5a6a7a8a9aaab"), "{text}");
        assert!(text.contains("body_length: 20"), "{text}");
        assert!(text.contains("Ksn(123456789012345600000001)"), "{text}");
    }

    proptest! {
        #[test]
        fn half_encode_decode_encode_is_identity(half in arbitrary_half()) {
            let bytes = half.encode();
            prop_assert!(bytes.len() <= HALF_BYTES_MAX);
            let decoded = HalfEnvelope::decode(&bytes).unwrap();
            prop_assert_eq!(decoded.header_bytes(), half.header_bytes());
            prop_assert_eq!(decoded.encode(), bytes);
            prop_assert_eq!(decoded, half);
        }

        #[test]
        fn half_decode_never_panics_and_is_canonical(
            bytes in proptest::collection::vec(any::<u8>(), 0..200)
        ) {
            if let Ok(half) = HalfEnvelope::decode(&bytes) {
                prop_assert_eq!(half.encode(), bytes);
            }
        }

        #[test]
        fn half_with_one_header_byte_changed_decodes_canonically_or_not_at_all(
            half in arbitrary_half(),
            index: prop::sample::Index,
            value: u8,
        ) {
            let mut bytes = half.encode();
            let position = index.index(half.header_bytes().len());
            bytes[position] = value;
            if let Ok(decoded) = HalfEnvelope::decode(&bytes) {
                prop_assert_eq!(decoded.header_bytes(), &bytes[..decoded.header_bytes().len()]);
                prop_assert_eq!(decoded.encode(), bytes);
            }
        }
    }
}
