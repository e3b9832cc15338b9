//! The keystore's one error type, and the one place PKCS#11 return codes become errors.

use nfcpay_protocol::{BdkId, ProtocolError};

/// Why a keystore operation failed. No variant carries key material or a PIN.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum KeystoreError {
    /// No BDK with this ID is in the store.
    #[error("no BDK with ID {0} in the keystore")]
    UnknownBdk(BdkId),
    /// A BDK with this ID is already in the store.
    #[error("a BDK with ID {0} is already in the keystore")]
    BdkExists(BdkId),
    /// A handle that this store did not issue, or already destroyed.
    #[error("unknown or destroyed key handle")]
    UnknownKey,
    /// A key was used for something its purpose does not allow.
    #[error("key not permitted for this operation")]
    KeyNotPermitted,
    /// A GCM tag, CMAC or key wrap did not verify: wrong key or tampered data.
    #[error("authentication failed: wrong key or tampered data")]
    AuthenticationFailed,
    /// An argument has the wrong shape.
    #[error("invalid input: {what}")]
    InvalidInput {
        /// What is wrong.
        what: &'static str,
    },
    /// A `pkcs11:` URI or a backend setting is wrong.
    #[error("keystore configuration: {0}")]
    Configuration(String),
    /// The token named by the URI is not present.
    #[error("PKCS#11 token {0:?} not found")]
    TokenNotFound(String),
    /// The PIN was refused.
    #[error("PKCS#11 login failed: PIN incorrect or locked")]
    PinRefused,
    /// The token or session went away; the store reopens it on the next call.
    #[error("PKCS#11 session lost ({function}: {code})")]
    SessionLost {
        /// The PKCS#11 function.
        function: &'static str,
        /// The `CKR_*` name.
        code: String,
    },
    /// Any other PKCS#11 failure.
    #[error("PKCS#11 {function} failed: {code}")]
    Pkcs11 {
        /// The PKCS#11 function.
        function: &'static str,
        /// The `CKR_*` name.
        code: String,
    },
    /// Reading or writing the software store's file failed.
    #[error("keystore file {path}: {message}")]
    Io {
        /// The file.
        path: String,
        /// What happened.
        message: String,
    },
    /// A DUKPT rule was broken (e.g. the terminal's counter is exhausted).
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
}
