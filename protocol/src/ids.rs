//! Identifiers: of keys (BDK ID, initial key ID, KSN), of terminals and of transactions.
//!
//! Each is a newtype built through `TryFrom` or `FromStr`, so a value that exists is valid.
//! Binary identifiers display as uppercase hexadecimal and parse from hex in either case.

use std::fmt;
use std::str::FromStr;

use crate::error::ProtocolError;

/// Largest transaction counter a terminal may use (ANSI X9.24-3-2017).
pub const TRANSACTION_COUNTER_MAX: u32 = 0xFFFF_0000;
/// Most one-bits a valid transaction counter may have (ANSI X9.24-3-2017).
pub const TRANSACTION_COUNTER_ONE_BITS_MAX: u32 = 16;
/// Longest terminal or account ID, in bytes.
pub const IDENTIFIER_BYTES_MAX: usize = 32;

/// Decodes exactly `N` bytes from `hex_digits`, naming `field` in the error.
pub(crate) fn hex_array<const N: usize>(
    field: &'static str,
    hex_digits: &str,
) -> Result<[u8; N], ProtocolError> {
    if hex_digits.len() != 2 * N {
        return Err(ProtocolError::Length {
            field,
            expected: N,
            actual: hex_digits.len() / 2,
        });
    }
    let mut bytes = [0u8; N];
    hex::decode_to_slice(hex_digits, &mut bytes).map_err(|_| ProtocolError::Hex { field })?;
    Ok(bytes)
}

/// Copies exactly `N` bytes out of `bytes`, naming `field` in the error.
pub(crate) fn byte_array<const N: usize>(
    field: &'static str,
    bytes: &[u8],
) -> Result<[u8; N], ProtocolError> {
    bytes.try_into().map_err(|_| ProtocolError::Length {
        field,
        expected: N,
        actual: bytes.len(),
    })
}

/// Implements uppercase-hex `Display`/`Debug`, `FromStr` from hex, and `TryFrom<&[u8]>`.
macro_rules! hex_newtype {
    ($name:ident, $len:expr, $field:expr) => {
        impl $name {
            /// Length of the binary form, in bytes.
            pub const LEN: usize = $len;

            /// The identifier's bytes.
            pub fn to_bytes(self) -> [u8; $len] {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&hex::encode_upper(self.0))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({self})", stringify!($name))
            }
        }

        impl FromStr for $name {
            type Err = ProtocolError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::from_array(hex_array::<$len>($field, s)?)
            }
        }

        impl TryFrom<&[u8]> for $name {
            type Error = ProtocolError;
            fn try_from(bytes: &[u8]) -> Result<Self, Self::Error> {
                Self::from_array(byte_array::<$len>($field, bytes)?)
            }
        }
    };
}

/// Identifies a base derivation key (BDK): the first 4 bytes of every KSN under it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BdkId([u8; 4]);
hex_newtype!(BdkId, 4, "BDK ID");

impl From<[u8; 4]> for BdkId {
    fn from(bytes: [u8; 4]) -> Self {
        Self(bytes)
    }
}

impl BdkId {
    fn from_array(bytes: [u8; 4]) -> Result<Self, ProtocolError> {
        Ok(Self(bytes))
    }
}

/// Identifies one terminal's initial key under a BDK: bytes 5–8 of its KSNs.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DerivationId([u8; 4]);
hex_newtype!(DerivationId, 4, "derivation ID");

impl From<[u8; 4]> for DerivationId {
    fn from(bytes: [u8; 4]) -> Self {
        Self(bytes)
    }
}

impl DerivationId {
    fn from_array(bytes: [u8; 4]) -> Result<Self, ProtocolError> {
        Ok(Self(bytes))
    }
}

/// The Initial Key ID: BDK ID (4 bytes) followed by derivation ID (4 bytes).
///
/// The platform derives a terminal's initial key from the BDK and this value.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InitialKeyId([u8; 8]);
hex_newtype!(InitialKeyId, 8, "initial key ID");

impl From<[u8; 8]> for InitialKeyId {
    fn from(bytes: [u8; 8]) -> Self {
        Self(bytes)
    }
}

impl InitialKeyId {
    fn from_array(bytes: [u8; 8]) -> Result<Self, ProtocolError> {
        Ok(Self(bytes))
    }
}

impl InitialKeyId {
    /// Joins a BDK ID and a derivation ID.
    pub fn new(bdk_id: BdkId, derivation_id: DerivationId) -> Self {
        let mut bytes = [0u8; 8];
        bytes[..4].copy_from_slice(&bdk_id.0);
        bytes[4..].copy_from_slice(&derivation_id.0);
        Self(bytes)
    }

    /// The BDK this initial key is derived from.
    pub fn bdk_id(self) -> BdkId {
        BdkId([self.0[0], self.0[1], self.0[2], self.0[3]])
    }

    /// The terminal's derivation ID under that BDK.
    pub fn derivation_id(self) -> DerivationId {
        DerivationId([self.0[4], self.0[5], self.0[6], self.0[7]])
    }
}

/// A DUKPT transaction counter: at least 1, at most [`TRANSACTION_COUNTER_MAX`], and with at
/// most [`TRANSACTION_COUNTER_ONE_BITS_MAX`] one-bits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TransactionCounter(u32);

impl TransactionCounter {
    /// The counter's value.
    pub fn get(self) -> u32 {
        self.0
    }

    /// Whether `value` is a counter a terminal may use.
    pub fn is_valid(value: u32) -> bool {
        value != 0
            && value <= TRANSACTION_COUNTER_MAX
            && value.count_ones() <= TRANSACTION_COUNTER_ONE_BITS_MAX
    }
}

impl TryFrom<u32> for TransactionCounter {
    type Error = ProtocolError;
    fn try_from(value: u32) -> Result<Self, Self::Error> {
        let reason = if value == 0 {
            "zero is not a transaction counter"
        } else if value > TRANSACTION_COUNTER_MAX {
            "above 0xFFFF0000"
        } else if value.count_ones() > TRANSACTION_COUNTER_ONE_BITS_MAX {
            "more than 16 one-bits"
        } else {
            return Ok(Self(value));
        };
        Err(ProtocolError::Invalid {
            field: "transaction counter",
            reason,
        })
    }
}

impl fmt::Display for TransactionCounter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08X}", self.0)
    }
}

impl fmt::Debug for TransactionCounter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TransactionCounter({self})")
    }
}

/// The AES DUKPT key serial number: BDK ID (4) | derivation ID (4) | transaction counter (4).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ksn {
    initial_key_id: InitialKeyId,
    counter: TransactionCounter,
}

impl Ksn {
    /// Length of the binary form, in bytes.
    pub const LEN: usize = 12;

    /// Joins an initial key ID and a counter.
    pub fn new(initial_key_id: InitialKeyId, counter: TransactionCounter) -> Self {
        Self {
            initial_key_id,
            counter,
        }
    }

    /// The BDK named by this KSN.
    pub fn bdk_id(self) -> BdkId {
        self.initial_key_id.bdk_id()
    }

    /// BDK ID and derivation ID.
    pub fn initial_key_id(self) -> InitialKeyId {
        self.initial_key_id
    }

    /// The transaction counter.
    pub fn counter(self) -> TransactionCounter {
        self.counter
    }

    /// The 12-byte wire form.
    pub fn to_bytes(self) -> [u8; 12] {
        let mut bytes = [0u8; 12];
        bytes[..8].copy_from_slice(&self.initial_key_id.0);
        bytes[8..].copy_from_slice(&self.counter.0.to_be_bytes());
        bytes
    }
}

impl TryFrom<[u8; 12]> for Ksn {
    type Error = ProtocolError;
    fn try_from(bytes: [u8; 12]) -> Result<Self, Self::Error> {
        let [a, b, c, d, e, f, g, h, counter @ ..] = bytes;
        Ok(Self {
            initial_key_id: InitialKeyId([a, b, c, d, e, f, g, h]),
            counter: TransactionCounter::try_from(u32::from_be_bytes(counter))?,
        })
    }
}

impl TryFrom<&[u8]> for Ksn {
    type Error = ProtocolError;
    fn try_from(bytes: &[u8]) -> Result<Self, Self::Error> {
        Self::try_from(byte_array::<12>("KSN", bytes)?)
    }
}

impl FromStr for Ksn {
    type Err = ProtocolError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::try_from(hex_array::<12>("KSN", s)?)
    }
}

impl fmt::Display for Ksn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.initial_key_id, self.counter)
    }
}

impl fmt::Debug for Ksn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Ksn({self})")
    }
}

/// Checks a name against the identifier alphabet and length, naming `field` in the error.
fn identifier(field: &'static str, bytes: &[u8]) -> Result<String, ProtocolError> {
    if bytes.is_empty() || bytes.len() > IDENTIFIER_BYTES_MAX {
        return Err(ProtocolError::Invalid {
            field,
            reason: "must be 1 to 32 characters",
        });
    }
    if !bytes
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(ProtocolError::Invalid {
            field,
            reason: "only A-Z, a-z, 0-9, '.', '_' and '-' are allowed",
        });
    }
    // Every byte was checked to be ASCII above, so this is valid UTF-8.
    Ok(bytes.iter().map(|&b| char::from(b)).collect())
}

/// Implements `TryFrom<&[u8]>`, `FromStr`, `Display`, `Debug` and `as_str` for a name.
macro_rules! identifier_newtype {
    ($name:ident, $field:expr) => {
        impl $name {
            /// The identifier as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<&[u8]> for $name {
            type Error = ProtocolError;
            fn try_from(bytes: &[u8]) -> Result<Self, Self::Error> {
                identifier($field, bytes).map(Self)
            }
        }

        impl FromStr for $name {
            type Err = ProtocolError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::try_from(s.as_bytes())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }
    };
}

/// Names a terminal: 1 to [`IDENTIFIER_BYTES_MAX`] characters from `A–Z a–z 0–9 . _ -`.
///
/// It is the subject of the terminal's client certificate and appears in every half it sends.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TerminalId(String);
identifier_newtype!(TerminalId, "terminal ID");

/// Names a ledger account, with the same alphabet and length as a [`TerminalId`].
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccountId(String);
identifier_newtype!(AccountId, "account ID");

/// A transaction ID: 16 random bytes chosen by the payee terminal; the idempotency key of a
/// payment.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TxnId([u8; 16]);
hex_newtype!(TxnId, 16, "transaction ID");

impl TryFrom<[u8; 16]> for TxnId {
    type Error = ProtocolError;
    fn try_from(bytes: [u8; 16]) -> Result<Self, Self::Error> {
        Self::from_array(bytes)
    }
}

impl TxnId {
    fn from_array(bytes: [u8; 16]) -> Result<Self, ProtocolError> {
        if bytes == [0u8; 16] {
            return Err(ProtocolError::Invalid {
                field: "transaction ID",
                reason: "all zero",
            });
        }
        Ok(Self(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ksn_round_trips_through_hex_and_bytes() {
        let ksn: Ksn = "123456789012345600000001".parse().unwrap();
        assert_eq!(ksn.bdk_id().to_string(), "12345678");
        assert_eq!(ksn.initial_key_id().derivation_id().to_string(), "90123456");
        assert_eq!(ksn.counter().get(), 1);
        assert_eq!(ksn.to_string(), "123456789012345600000001");
        assert_eq!(Ksn::try_from(ksn.to_bytes()).unwrap(), ksn);
        assert_eq!(
            "abcdef0123456789000000ff"
                .parse::<Ksn>()
                .unwrap()
                .to_string(),
            "ABCDEF0123456789000000FF"
        );
    }

    #[test]
    fn ksn_refuses_invalid_counters() {
        for counter in ["00000000", "0001FFFF", "FFFF0001", "FFFFFFFF"] {
            let text = format!("1234567890123456{counter}");
            assert!(
                matches!(
                    text.parse::<Ksn>(),
                    Err(ProtocolError::Invalid {
                        field: "transaction counter",
                        ..
                    })
                ),
                "{counter} was accepted"
            );
        }
        assert!("1234567890123456FFFF0000".parse::<Ksn>().is_ok());
        assert!("12345678901234560000FFFF".parse::<Ksn>().is_ok());
    }

    #[test]
    fn ksn_refuses_wrong_lengths_and_non_hex() {
        assert!(matches!(
            "12345678901234560000000".parse::<Ksn>(),
            Err(ProtocolError::Length { .. })
        ));
        assert!(matches!(
            "1234567890123456000000001".parse::<Ksn>(),
            Err(ProtocolError::Length { .. })
        ));
        assert!(matches!(
            "12345678901234560000000G".parse::<Ksn>(),
            Err(ProtocolError::Hex { .. })
        ));
        assert!(matches!(
            Ksn::try_from(&[0u8; 11][..]),
            Err(ProtocolError::Length { actual: 11, .. })
        ));
    }

    #[test]
    fn terminal_id_accepts_only_the_documented_alphabet() {
        assert_eq!(
            "term-01.a_b".parse::<TerminalId>().unwrap().as_str(),
            "term-01.a_b"
        );
        for bad in ["", "has space", "slash/", "ünï", &"x".repeat(33)] {
            assert!(bad.parse::<TerminalId>().is_err(), "{bad:?} was accepted");
        }
        assert!("x".repeat(32).parse::<TerminalId>().is_ok());
        assert!("acct-1".parse::<AccountId>().is_ok());
        assert!("acct 1".parse::<AccountId>().is_err());
    }

    #[test]
    fn txn_id_refuses_all_zero() {
        assert!("00000000000000000000000000000000".parse::<TxnId>().is_err());
        assert!("00000000000000000000000000000001".parse::<TxnId>().is_ok());
    }

    proptest! {
        #[test]
        fn counter_validity_matches_the_rule(value: u32) {
            let valid = value != 0 && value <= 0xFFFF_0000 && value.count_ones() <= 16;
            prop_assert_eq!(TransactionCounter::try_from(value).is_ok(), valid);
            prop_assert_eq!(TransactionCounter::is_valid(value), valid);
        }

        #[test]
        fn ksn_bytes_parse_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..20)) {
            if let Ok(ksn) = Ksn::try_from(&bytes[..]) {
                prop_assert_eq!(&ksn.to_bytes()[..], &bytes[..]);
            }
        }
    }
}
