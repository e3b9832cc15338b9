//! The keystore's one error type. PKCS#11 return codes become these in `pkcs11::errors`.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use nfcpay_protocol::{BdkId, ProtocolError};

/// Why a keystore operation failed. No variant carries key material or a PIN.
///
/// A failure keeps its cause as [`std::error::Error::source`] (the `cryptoki` error of a
/// PKCS#11 call or of loading the module, the `std::io::Error` of a file, the `serde_json`
/// error of a software store's file, the failure a readiness canary's part met) and shows it
/// only there: print a failure with
/// its whole chain (`: `-joined), not just its `Display`. Not `Clone`, since causes are not:
/// the one failure the store keeps and shows to many callers (why it is recovering) is shared
/// through an [`Arc`].
#[derive(Debug, thiserror::Error)]
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
    /// A `pkcs11:` URI or a backend setting is wrong, or the token holds objects this store
    /// cannot make sense of: a problem that words alone describe (no cause to keep).
    #[error("keystore configuration: {0}")]
    Configuration(String),
    /// The PKCS#11 module could not be loaded: no such file, not a shared object, or not a
    /// PKCS#11 module (no `C_GetFunctionList`). The operator's to fix.
    #[error("cannot load PKCS#11 module {}", .path.display())]
    ModuleLoad {
        /// The module's path, as the `pkcs11:` URI gave it.
        path: PathBuf,
        /// Why: cryptoki's error, and under it the dynamic loader's.
        #[source]
        source: ModuleLoadError,
    },
    /// The readiness canary failed on one of its parts in a way that trying again will not
    /// fix (a key the token refuses to use as it must, say); a failure that may pass is
    /// [`Self::Recovering`] instead.
    #[error("readiness canary: cannot {part}")]
    CanaryFailed {
        /// The part that failed (`derive from BDK …`, `sign with …`): no key material.
        part: String,
        /// Why.
        #[source]
        source: Box<KeystoreError>,
    },
    /// The software store's file is not the JSON of a keystore file: not JSON at all, cut
    /// short, a field missing, unknown or of the wrong type. (A file that is such JSON but
    /// breaks a rule, such as a key that does not match its KCV, is [`Self::Io`].)
    #[error("keystore file {}: corrupt or not a keystore file", .path.display())]
    SoftwareStoreDecode {
        /// The file.
        path: PathBuf,
        /// serde_json's error: what and where (line, column). It quotes no key: the key
        /// fields' own errors never quote their text.
        #[source]
        source: serde_json::Error,
    },
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
        /// The `CKR_*` name (the classification; the module's own words are in `source`).
        code: String,
        /// The module's answer, when there was one.
        #[source]
        source: Option<cryptoki::error::Error>,
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
        /// The `CKR_*` name (the classification; the module's own words are in `source`).
        code: String,
        /// The module's answer.
        #[source]
        source: Option<cryptoki::error::Error>,
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
        /// Where the recovery stands (no key material, no PIN).
        reason: String,
        /// What the store last failed on: the loss itself, or the last attempt to re-open.
        /// One failure, shared by every call that fails meanwhile.
        #[source]
        last_failure: Option<Arc<KeystoreError>>,
    },
    /// Any other PKCS#11 failure.
    #[error("PKCS#11 {function} failed: {code}")]
    Pkcs11 {
        /// The PKCS#11 function.
        function: &'static str,
        /// The `CKR_*` name, or what was wrong with an answer that succeeded.
        code: String,
        /// The module's answer, when it failed.
        #[source]
        source: Option<cryptoki::error::Error>,
    },
    /// Reading or writing the software store's file (or a PIN file) failed.
    #[error("keystore file {path}: {message}")]
    Io {
        /// The file.
        path: String,
        /// What was being done (with `source`), or what is wrong with the file.
        message: String,
        /// The operating system's error, when there was one.
        #[source]
        source: Option<std::io::Error>,
    },
    /// A DUKPT rule was broken (e.g. the terminal's counter is exhausted).
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
}

/// Why a PKCS#11 module could not be loaded ([`KeystoreError::ModuleLoad`]): cryptoki's error.
///
/// cryptoki both prints the dynamic loader's words and gives them as its `source()`; this
/// shows cryptoki's own part only, so that a printed chain shows the loader's words once.
#[derive(Debug)]
pub struct ModuleLoadError(cryptoki::error::Error);

impl ModuleLoadError {
    /// cryptoki's error, as it was.
    pub fn cryptoki(&self) -> &cryptoki::error::Error {
        &self.0
    }
}

impl From<cryptoki::error::Error> for ModuleLoadError {
    fn from(error: cryptoki::error::Error) -> Self {
        Self(error)
    }
}

impl fmt::Display for ModuleLoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            // cryptoki's text is "libloading error ({the loader's words})": the loader's
            // words are the source.
            cryptoki::error::Error::LibraryLoading(_) => {
                f.write_str("the dynamic loader refused it")
            }
            other => fmt::Display::fmt(other, f),
        }
    }
}

impl std::error::Error for ModuleLoadError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.0)
    }
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

    /// A copy of a failure that makes the store re-open its token ([`Self::needs_recovery`]),
    /// for the store's record of why it is recovering; `None` for any other failure. The
    /// caller keeps the original. A module's answer is copied (a return value and a function
    /// are plain values); no other cause can be, nor is one needed for these.
    pub(crate) fn recovery_record(&self) -> Option<Self> {
        let copy = |source: &Option<cryptoki::error::Error>| match source {
            Some(cryptoki::error::Error::Pkcs11(rv, function)) => {
                Some(cryptoki::error::Error::Pkcs11(*rv, *function))
            }
            _ => None,
        };
        match self {
            Self::SessionLost {
                function,
                code,
                source,
            } => Some(Self::SessionLost {
                function,
                code: code.clone(),
                source: copy(source),
            }),
            Self::Device {
                function,
                code,
                source,
            } => Some(Self::Device {
                function,
                code: code.clone(),
                source: copy(source),
            }),
            Self::StaleHandle { function } => Some(Self::StaleHandle { function }),
            Self::TokenNotFound(label) => Some(Self::TokenNotFound(label.clone())),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn a_recovery_record_keeps_the_classification_and_the_module_answer() {
        let lost = KeystoreError::SessionLost {
            function: "C_Sign",
            code: "CKR_TOKEN_NOT_PRESENT".into(),
            source: Some(cryptoki::error::Error::Pkcs11(
                cryptoki::error::RvError::TokenNotPresent,
                cryptoki::context::Function::Sign,
            )),
        };
        let Some(record) = lost.recovery_record() else {
            panic!("a lost token makes no record")
        };
        assert_eq!(record.to_string(), lost.to_string());
        assert!(record.needs_recovery());
        assert!(record.source().is_some());
        assert!(
            KeystoreError::AuthenticationFailed
                .recovery_record()
                .is_none()
        );

        // Every call failing while the store recovers shares the one record as its cause.
        let shared = Arc::new(record);
        let recovering = KeystoreError::Recovering {
            reason: "the token was lost; waiting to re-open it".into(),
            last_failure: Some(Arc::clone(&shared)),
        };
        assert!(recovering.is_unavailable());
        assert_eq!(
            recovering.source().map(ToString::to_string),
            Some(shared.to_string())
        );
        assert!(!recovering.to_string().contains("CKR_TOKEN_NOT_PRESENT"));
    }

    #[test]
    fn a_canary_failure_names_its_part_and_keeps_the_failure_as_its_cause() {
        let failure = KeystoreError::CanaryFailed {
            part: "sign with receipt-key".into(),
            source: Box::new(KeystoreError::KeyNotPermitted),
        };
        let message = failure.to_string();
        assert_eq!(message, "readiness canary: cannot sign with receipt-key");
        let Some(cause) = failure.source() else {
            panic!("the canary's failure lost its cause")
        };
        // The cause is the boxed failure (a `Box` shows and chains as what it holds).
        assert!(matches!(
            cause
                .downcast_ref::<Box<KeystoreError>>()
                .map(|cause| &**cause),
            Some(KeystoreError::KeyNotPermitted)
        ));
        assert_eq!(
            nfcpay_protocol::ErrorChain(&failure).to_string(),
            format!("{message}: {}", KeystoreError::KeyNotPermitted)
        );
        assert!(failure.recovery_record().is_none());
    }

    #[test]
    fn a_module_load_error_shows_cryptokis_part_once() {
        let error = KeystoreError::ModuleLoad {
            path: "/usr/lib/libnothing.so".into(),
            source: cryptoki::error::Error::NotSupported.into(),
        };
        assert_eq!(
            nfcpay_protocol::ErrorChain(&error).to_string(),
            format!(
                "cannot load PKCS#11 module /usr/lib/libnothing.so: {}",
                cryptoki::error::Error::NotSupported
            )
        );
        let Some(cause) = error.source() else {
            panic!("the module load error lost its cause")
        };
        let Some(load) = cause.downcast_ref::<ModuleLoadError>() else {
            panic!("the cause is not a ModuleLoadError: {cause:?}")
        };
        assert!(matches!(
            load.cryptoki(),
            cryptoki::error::Error::NotSupported
        ));
    }

    #[test]
    fn availability_is_told_apart_from_refusals() {
        let unavailable = crate::testing::unavailable_errors();
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
            KeystoreError::ModuleLoad {
                path: "/m.so".into(),
                source: cryptoki::error::Error::NotSupported.into(),
            },
            KeystoreError::CanaryFailed {
                part: "sign with k".into(),
                source: Box::new(KeystoreError::KeyNotPermitted),
            },
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
                source: None,
            }
            .needs_recovery()
        );
        assert!(
            KeystoreError::SessionLost {
                function: "C_Sign",
                code: "CKR_TOKEN_NOT_PRESENT".into(),
                source: None,
            }
            .needs_recovery()
        );
    }
}
