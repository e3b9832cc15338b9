//! Handles, labels and descriptions of keys: what crosses the [`crate::Keystore`] trait
//! instead of key bytes.

use std::fmt;
use std::str::FromStr;

use nfcpay_protocol::BdkId;
use nfcpay_protocol::dukpt::KeyAlgorithm;

use crate::KeystoreError;

/// Longest key label, in bytes.
pub const KEY_LABEL_BYTES_MAX: usize = 64;
/// Length of an uncompressed SEC1 P-256 public key (`04 ‖ x ‖ y`), in bytes.
pub const EC_P256_PUBLIC_KEY_BYTES: usize = 65;

/// A transient symmetric key held by a store: an opaque number, meaningful only to the store
/// that issued it. It is deliberately not `Clone`: destroying it consumes it.
#[derive(PartialEq, Eq, Hash)]
pub struct KeyHandle {
    id: u64,
    algorithm: KeyAlgorithm,
    /// Which opening of the store's token made it (PKCS#11: a key made before the store
    /// re-opened its token died with the old sessions).
    epoch: u32,
}

impl KeyHandle {
    /// Made by a backend for a key it holds.
    pub(crate) fn new(id: u64, algorithm: KeyAlgorithm) -> Self {
        Self::with_epoch(id, algorithm, 0)
    }

    /// Made by a backend that counts the openings of its token.
    pub(crate) fn with_epoch(id: u64, algorithm: KeyAlgorithm, epoch: u32) -> Self {
        Self {
            id,
            algorithm,
            epoch,
        }
    }

    /// The backend's number for this key.
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// The opening of the token that made this key.
    pub(crate) fn epoch(&self) -> u32 {
        self.epoch
    }

    /// The key's algorithm (length).
    pub fn algorithm(&self) -> KeyAlgorithm {
        self.algorithm
    }
}

impl fmt::Debug for KeyHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyHandle({}, {})", self.id, self.algorithm)
    }
}

/// A P-256 private key held by a store. Not `Clone`, like [`KeyHandle`].
#[derive(PartialEq, Eq, Hash)]
pub struct PrivateKeyHandle {
    id: u64,
    /// As [`KeyHandle`]'s; a backend may reserve a value for keys it looks up by label again.
    epoch: u32,
}

impl PrivateKeyHandle {
    /// Made by a backend for a key it holds.
    pub(crate) fn new(id: u64) -> Self {
        Self::with_epoch(id, 0)
    }

    /// Made by a backend that counts the openings of its token.
    pub(crate) fn with_epoch(id: u64, epoch: u32) -> Self {
        Self { id, epoch }
    }

    /// The backend's number for this key.
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// The opening of the token that made this key (or the backend's reserved value).
    pub(crate) fn epoch(&self) -> u32 {
        self.epoch
    }
}

impl fmt::Debug for PrivateKeyHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKeyHandle({})", self.id)
    }
}

/// What the key to derive from is.
#[derive(Debug, Clone, Copy)]
pub enum DeriveBase<'a> {
    /// A BDK, by its ID (the store looks its handle up once and caches it).
    Bdk(BdkId),
    /// A transient key.
    Key(&'a KeyHandle),
}

/// What a derived or unwrapped key may be used for; it sets the key's attributes, so a key
/// can do nothing else (in PKCS#11 terms: `CKA_DERIVE`, `CKA_ENCRYPT`/`CKA_DECRYPT`,
/// `CKA_SIGN`/`CKA_VERIFY`, `CKA_WRAP`/`CKA_UNWRAP`, `CKA_EXTRACTABLE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyPurpose {
    /// Derive further keys (DUKPT intermediate and transaction keys).
    Derive,
    /// Derive further keys, and be wrapped once for a terminal (an initial key at enrollment).
    Export,
    /// AES-GCM encryption and decryption.
    Encrypt,
    /// AES-CMAC generation and verification.
    Mac,
    /// Wrap and unwrap other keys.
    Wrap,
    /// Nothing but its key check value (operator commands that show a KCV).
    Check,
}

/// A key check value: the first 3 bytes of AES-CMAC over one zero block, shown as 6
/// uppercase hex digits. It identifies a key without revealing it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Kcv([u8; 3]);

impl Kcv {
    /// The KCV of a key whose CMAC over one zero block is `cmac`.
    pub fn from_cmac(cmac: &[u8; 16]) -> Self {
        Self([cmac[0], cmac[1], cmac[2]])
    }
}

impl fmt::Display for Kcv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode_upper(self.0))
    }
}

impl fmt::Debug for Kcv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Kcv({self})")
    }
}

impl FromStr for Kcv {
    type Err = KeystoreError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut bytes = [0u8; 3];
        hex::decode_to_slice(s, &mut bytes).map_err(|_| KeystoreError::InvalidInput {
            what: "KCV must be 6 hex digits",
        })?;
        Ok(Self(bytes))
    }
}

/// A BDK as the operator sees it: never its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BdkInfo {
    /// Its ID (the first 4 bytes of KSNs under it).
    pub bdk_id: BdkId,
    /// AES-128, -192 or -256.
    pub algorithm: KeyAlgorithm,
    /// Its key check value.
    pub kcv: Kcv,
    /// When it was generated or imported, in seconds since the Unix epoch.
    pub created_unix_seconds: i64,
}

/// The label of a persistent key: 1 to [`KEY_LABEL_BYTES_MAX`] printable ASCII characters.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct KeyLabel(String);

impl KeyLabel {
    /// The label text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for KeyLabel {
    type Err = KeystoreError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() || s.len() > KEY_LABEL_BYTES_MAX || !s.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(KeystoreError::InvalidInput {
                what: "key label must be 1 to 64 printable ASCII characters without spaces",
            });
        }
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Display for KeyLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for KeyLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyLabel({})", self.0)
    }
}

/// An uncompressed SEC1 P-256 public key, checked to be a point on the curve.
#[derive(Clone, PartialEq, Eq)]
pub struct EcPublicKey([u8; EC_P256_PUBLIC_KEY_BYTES]);

impl EcPublicKey {
    /// The 65-byte SEC1 encoding `04 ‖ x ‖ y`.
    pub fn as_bytes(&self) -> &[u8; EC_P256_PUBLIC_KEY_BYTES] {
        &self.0
    }
}

impl TryFrom<&[u8]> for EcPublicKey {
    type Error = KeystoreError;
    fn try_from(bytes: &[u8]) -> Result<Self, Self::Error> {
        let invalid = || KeystoreError::InvalidInput {
            what: "EC public key must be an uncompressed P-256 point (65 bytes)",
        };
        let array: [u8; EC_P256_PUBLIC_KEY_BYTES] = bytes.try_into().map_err(|_| invalid())?;
        p256::PublicKey::from_sec1_bytes(&array).map_err(|_| invalid())?;
        Ok(Self(array))
    }
}

impl fmt::Debug for EcPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EcPublicKey({})", hex::encode_upper(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_refuse_empty_long_and_unprintable() {
        assert!("nfcpay-ca".parse::<KeyLabel>().is_ok());
        for bad in ["", "with space", "tab\t", &"x".repeat(65)] {
            assert!(bad.parse::<KeyLabel>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn ec_public_keys_must_be_on_the_curve() {
        let mut bytes = [0u8; 65];
        bytes[0] = 4;
        assert!(EcPublicKey::try_from(&bytes[..]).is_err());
        assert!(EcPublicKey::try_from(&bytes[..64]).is_err());
    }

    #[test]
    fn kcv_shows_six_uppercase_hex_digits() {
        let kcv = Kcv::from_cmac(&[0xab, 0x01, 0xff, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9]);
        assert_eq!(kcv.to_string(), "AB01FF");
        assert_eq!("ab01ff".parse::<Kcv>().unwrap(), kcv);
        assert!("AB01F".parse::<Kcv>().is_err());
    }
}
