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
    /// A handle to a persistent key no longer names it: the token was removed, replaced or
    /// re-initialised under the store. The store looks its keys up again (recovery).
    #[error("PKCS#11 {function}: key handle no longer valid (token removed or re-initialised)")]
    StaleHandle {
        /// The PKCS#11 function.
        function: &'static str,
    },
    /// The device failed (`CKR_DEVICE_ERROR`, `CKR_DEVICE_MEMORY`, `CKR_FUNCTION_FAILED`, a
    /// general error where no verification was involved, …): retried after recovery.
    #[error("PKCS#11 device error ({function}: {code})")]
    Device {
        /// The PKCS#11 function.
        function: &'static str,
        /// The `CKR_*` name.
        code: String,
    },
    /// No HSM session became free within the deadline, or too many callers were already
    /// waiting: the HSM is stalled or overloaded.
    #[error("HSM busy: {what}")]
    Busy {
        /// What ran out (the wait, or the places to wait in).
        what: &'static str,
    },
    /// The store lost its token and is re-opening it; calls fail fast until it succeeds.
    #[error("HSM recovering: {reason}")]
    Recovering {
        /// Why the last attempt failed (no key material, no PIN).
        reason: String,
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

impl KeystoreError {
    /// Whether the failure is the key store's availability, not the request: the token or a
    /// session went away, a handle went stale, the device failed, the HSM is busy or the store
    /// is recovering. Such a call may succeed if made again later (a server answers `503`
    /// with `Retry-After`); anything else (bad input, a tag that does not verify, an unknown
    /// BDK, a refused PIN, a wrong configuration) will fail the same way again.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            Self::SessionLost { .. }
                | Self::StaleHandle { .. }
                | Self::Device { .. }
                | Self::Busy { .. }
                | Self::Recovering { .. }
                | Self::TokenNotFound(_)
        )
    }

    /// Whether the store should re-open its token after this failure (a subset of
    /// [`Self::is_unavailable`]: being busy or already recovering is not a reason).
    ///
    /// A lost session or login alone is not: the session is retired and the next one logs in
    /// again (several stores in one process share the login, and re-opening the module would
    /// end the others' sessions too).
    pub(crate) fn needs_recovery(&self) -> bool {
        match self {
            Self::SessionLost { code, .. } => matches!(
                code.as_str(),
                "CKR_TOKEN_NOT_PRESENT" | "CKR_DEVICE_REMOVED" | "CKR_CRYPTOKI_NOT_INITIALIZED"
            ),
            Self::StaleHandle { .. } | Self::Device { .. } | Self::TokenNotFound(_) => true,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn availability_is_told_apart_from_refusals() {
        let unavailable = [
            KeystoreError::SessionLost {
                function: "C_Sign",
                code: "CKR_SESSION_HANDLE_INVALID".into(),
            },
            KeystoreError::StaleHandle { function: "C_Sign" },
            KeystoreError::Device {
                function: "C_Sign",
                code: "CKR_DEVICE_ERROR".into(),
            },
            KeystoreError::Busy { what: "no session" },
            KeystoreError::Recovering {
                reason: "token gone".into(),
            },
            KeystoreError::TokenNotFound("t".into()),
        ];
        for error in &unavailable {
            assert!(error.is_unavailable(), "{error}");
        }
        let refused = [
            KeystoreError::AuthenticationFailed,
            KeystoreError::UnknownBdk(BdkId::from([1, 2, 3, 4])),
            KeystoreError::InvalidInput { what: "x" },
            KeystoreError::PinRefused,
            KeystoreError::KeyNotPermitted,
            KeystoreError::UnknownKey,
            KeystoreError::Configuration("x".into()),
        ];
        for error in &refused {
            assert!(!error.is_unavailable(), "{error}");
            assert!(!error.needs_recovery(), "{error}");
        }
        assert!(!KeystoreError::Busy { what: "x" }.needs_recovery());
        assert!(
            !KeystoreError::SessionLost {
                function: "C_Sign",
                code: "CKR_USER_NOT_LOGGED_IN".into(),
            }
            .needs_recovery()
        );
        assert!(
            KeystoreError::SessionLost {
                function: "C_Sign",
                code: "CKR_TOKEN_NOT_PRESENT".into(),
            }
            .needs_recovery()
        );
    }
}
