//! The reader and writer every message is decoded and encoded with (docs/protocol.md §2).

use super::PROTOCOL_VERSION;
use crate::error::ProtocolError;
use crate::ids::IDENTIFIER_BYTES_MAX;
use crate::{Amount, Currency, TxnId};

/// Refuses a message longer than the longest valid one, before anything in it is read.
pub(super) fn check_bytes_max(
    message: &'static str,
    bytes: &[u8],
    bytes_max: usize,
) -> Result<(), ProtocolError> {
    if bytes.len() > bytes_max {
        return Err(ProtocolError::Invalid {
            field: message,
            reason: "longer than the longest valid message of its type",
        });
    }
    Ok(())
}

/// Names `field` in an error made by a newtype's constructor, which names its own type instead.
pub(super) fn in_field(error: ProtocolError, field: &'static str) -> ProtocolError {
    match error {
        ProtocolError::Length {
            expected, actual, ..
        } => ProtocolError::Length {
            field,
            expected,
            actual,
        },
        ProtocolError::Hex { .. } => ProtocolError::Hex { field },
        ProtocolError::Invalid { reason, .. } => ProtocolError::Invalid { field, reason },
        other => other,
    }
}

/// Reads fields off the front of a received message. Every method refuses truncation with
/// [`ProtocolError::Length`] naming the field, and borrows what it reads (nothing is copied
/// until a field has been checked).
pub(super) struct Reader<'a> {
    rest: &'a [u8],
    consumed: usize,
}

impl<'a> Reader<'a> {
    pub(super) fn new(bytes: &'a [u8]) -> Self {
        Self {
            rest: bytes,
            consumed: 0,
        }
    }

    /// How many bytes have been read so far.
    pub(super) fn consumed(&self) -> usize {
        self.consumed
    }

    /// The next `count` bytes.
    pub(super) fn take(
        &mut self,
        field: &'static str,
        count: usize,
    ) -> Result<&'a [u8], ProtocolError> {
        if self.rest.len() < count {
            return Err(ProtocolError::Length {
                field,
                expected: count,
                actual: self.rest.len(),
            });
        }
        let (taken, rest) = self.rest.split_at(count);
        self.rest = rest;
        self.consumed += count;
        Ok(taken)
    }

    pub(super) fn array<const N: usize>(
        &mut self,
        field: &'static str,
    ) -> Result<[u8; N], ProtocolError> {
        let taken = self.take(field, N)?;
        taken.try_into().map_err(|_| ProtocolError::Length {
            field,
            expected: N,
            actual: taken.len(),
        })
    }

    pub(super) fn u8(&mut self, field: &'static str) -> Result<u8, ProtocolError> {
        self.array::<1>(field).map(|[byte]| byte)
    }

    pub(super) fn u16(&mut self, field: &'static str) -> Result<u16, ProtocolError> {
        self.array(field).map(u16::from_be_bytes)
    }

    pub(super) fn u64(&mut self, field: &'static str) -> Result<u64, ProtocolError> {
        self.array(field).map(u64::from_be_bytes)
    }

    /// A `str8`: a length byte, checked against `bytes_max` (refused with `too_long`) before
    /// the bytes it announces are read.
    pub(super) fn str8(
        &mut self,
        field: &'static str,
        bytes_max: usize,
        too_long: &'static str,
    ) -> Result<&'a [u8], ProtocolError> {
        let length = usize::from(self.u8(field)?);
        if length > bytes_max {
            return Err(ProtocolError::Invalid {
                field,
                reason: too_long,
            });
        }
        self.take(field, length)
    }

    /// The version and type bytes, which must be [`PROTOCOL_VERSION`] and `message_type`.
    pub(super) fn version_and_type(
        &mut self,
        message_type: u8,
        wrong_type: &'static str,
    ) -> Result<(), ProtocolError> {
        if self.u8("version")? != PROTOCOL_VERSION {
            return Err(ProtocolError::Invalid {
                field: "version",
                reason: "unsupported protocol version",
            });
        }
        if self.u8("type")? != message_type {
            return Err(ProtocolError::Invalid {
                field: "type",
                reason: wrong_type,
            });
        }
        Ok(())
    }

    pub(super) fn txn_id(&mut self, field: &'static str) -> Result<TxnId, ProtocolError> {
        TxnId::try_from(self.array::<{ TxnId::LEN }>(field)?).map_err(|e| in_field(e, field))
    }

    /// A `str8` identifier (terminal or account ID) of 1 to 32 characters.
    pub(super) fn identifier<T>(&mut self, field: &'static str) -> Result<T, ProtocolError>
    where
        T: for<'b> TryFrom<&'b [u8], Error = ProtocolError>,
    {
        let bytes = self.str8(field, IDENTIFIER_BYTES_MAX, "longer than 32 bytes")?;
        T::try_from(bytes).map_err(|e| in_field(e, field))
    }

    /// A `str8` identifier that is empty (`None`) while the party is not known yet.
    pub(super) fn optional_identifier<T>(
        &mut self,
        field: &'static str,
    ) -> Result<Option<T>, ProtocolError>
    where
        T: for<'b> TryFrom<&'b [u8], Error = ProtocolError>,
    {
        let bytes = self.str8(field, IDENTIFIER_BYTES_MAX, "longer than 32 bytes")?;
        if bytes.is_empty() {
            return Ok(None);
        }
        T::try_from(bytes).map(Some).map_err(|e| in_field(e, field))
    }

    /// `amount` (`u64` minor units) followed by `currency` (`bytes[3]`).
    pub(super) fn amount(&mut self) -> Result<Amount, ProtocolError> {
        let minor_units = self.u64("amount")?;
        let currency = Currency::try_from(self.array::<3>("currency")?)
            .map_err(|e| in_field(e, "currency"))?;
        Amount::new(minor_units, currency)
    }

    /// Refuses anything left after the last field.
    pub(super) fn finish(self, message: &'static str) -> Result<(), ProtocolError> {
        if !self.rest.is_empty() {
            return Err(ProtocolError::Length {
                field: message,
                expected: self.consumed,
                actual: self.consumed + self.rest.len(),
            });
        }
        Ok(())
    }
}

/// Appends fields to a message being encoded.
pub(super) struct Writer(Vec<u8>);

impl Writer {
    /// A writer for a message of at most `bytes_max` bytes (never reallocates).
    pub(super) fn new(bytes_max: usize) -> Self {
        Self(Vec::with_capacity(bytes_max))
    }

    /// A writer opening a message with the version and `message_type` bytes.
    pub(super) fn message(message_type: u8, bytes_max: usize) -> Self {
        let mut writer = Self::new(bytes_max);
        writer.u8(PROTOCOL_VERSION);
        writer.u8(message_type);
        writer
    }

    pub(super) fn u8(&mut self, value: u8) {
        self.0.push(value);
    }

    pub(super) fn u16(&mut self, value: u16) {
        self.0.extend_from_slice(&value.to_be_bytes());
    }

    pub(super) fn u64(&mut self, value: u64) {
        self.0.extend_from_slice(&value.to_be_bytes());
    }

    pub(super) fn bytes(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
    }

    /// A `str8`. Every text field is an identifier (at most 32 bytes) or a description (at
    /// most 140), and their types guarantee it.
    pub(super) fn str8(&mut self, text: &str) {
        let length = u8::try_from(text.len()).unwrap_or_else(|_| {
            unreachable!(
                "a str8 field of {} bytes: types bound them to 140",
                text.len()
            )
        });
        self.u8(length);
        self.bytes(text.as_bytes());
    }

    /// A `str8` that is empty for `None`.
    pub(super) fn optional_str8(&mut self, text: Option<&str>) {
        self.str8(text.unwrap_or(""));
    }

    pub(super) fn amount(&mut self, amount: Amount) {
        self.u64(amount.minor_units());
        self.bytes(&amount.currency().code_bytes());
    }

    pub(super) fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

/// Writes bytes as lowercase hex in a `Debug` impl.
pub(super) struct HexDebug<'a>(pub(super) &'a [u8]);

impl std::fmt::Debug for HexDebug<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_refuses_truncation_naming_the_field() {
        let mut reader = Reader::new(&[0x01, 0x02, 0x03]);
        assert_eq!(reader.u16("first").unwrap(), 0x0102);
        assert_eq!(
            reader.u64("second"),
            Err(ProtocolError::Length {
                field: "second",
                expected: 8,
                actual: 1
            })
        );
    }

    #[test]
    fn reader_checks_a_str8_length_before_reading() {
        // Announces 200 bytes but carries 2: refused as too long, not as truncated.
        let mut reader = Reader::new(&[200, b'a', b'b']);
        assert_eq!(
            reader.str8("text", 140, "too long"),
            Err(ProtocolError::Invalid {
                field: "text",
                reason: "too long"
            })
        );
        let mut reader = Reader::new(&[3, b'a', b'b']);
        assert!(matches!(
            reader.str8("text", 140, "too long"),
            Err(ProtocolError::Length {
                field: "text",
                expected: 3,
                actual: 2
            })
        ));
    }

    #[test]
    fn reader_refuses_trailing_bytes() {
        let mut reader = Reader::new(&[1, 2, 3]);
        reader.u8("one").unwrap();
        assert_eq!(
            reader.finish("message"),
            Err(ProtocolError::Length {
                field: "message",
                expected: 1,
                actual: 3
            })
        );
    }

    #[test]
    fn writer_writes_big_endian_and_str8() {
        let mut writer = Writer::new(16);
        writer.u16(0x0102);
        writer.u64(0x0304);
        writer.str8("ab");
        writer.optional_str8(None);
        assert_eq!(
            writer.into_bytes(),
            [1, 2, 0, 0, 0, 0, 0, 0, 3, 4, 2, b'a', b'b', 0]
        );
    }
}
