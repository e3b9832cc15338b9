//! The one place where errors of the layers below become API problems (RFC 9457).
//!
//! A problem's detail goes to the peer: it names what was wrong with the request, never a key,
//! a PIN, an enrollment code or an internal path. Faults of the platform itself are logged here
//! with their cause and answered with a bare `internal` or `unavailable`.

use nfcpay_keystore::KeystoreError;
use nfcpay_protocol::{ErrorChain, ProtocolError};

use crate::server::problem::{Problem, ProblemCode};
use crate::storage::{StorageError, TerminalState};

/// A message that does not decode.
pub(crate) fn malformed(error: &ProtocolError) -> Problem {
    Problem::new(ProblemCode::Malformed, error.to_string())
}

/// Maps a keystore error. What may work when tried again (the HSM's session, token or device
/// away, a stale handle, the HSM busy or recovering; see [`KeystoreError::is_unavailable`]) is
/// `503 unavailable` (with `Retry-After`), never `500`; so is a key handle the store no longer
/// knows (its session went with a lost token) and a refused PIN or a file it cannot read (the
/// operator's to fix, not the terminal's).
pub(crate) fn keystore(error: KeystoreError) -> Problem {
    match error {
        KeystoreError::UnknownBdk(id) => {
            Problem::new(ProblemCode::UnknownBdk, format!("no BDK with ID {id}"))
        }
        KeystoreError::AuthenticationFailed => Problem::new(
            ProblemCode::AuthenticationFailed,
            "the message does not authenticate under the terminal's key",
        ),
        error if error.is_unavailable() => {
            tracing::warn!(
                error = ErrorChain(&error).to_string(),
                "keystore unavailable"
            );
            hsm_unavailable()
        }
        KeystoreError::UnknownKey
        | KeystoreError::Pkcs11 { .. }
        | KeystoreError::PinRefused
        | KeystoreError::Io { .. }
        | KeystoreError::SoftwareStoreDecode { .. } => {
            tracing::error!(
                error = ErrorChain(&error).to_string(),
                "keystore unavailable"
            );
            hsm_unavailable()
        }
        other => {
            tracing::error!(error = ErrorChain(&other).to_string(), "keystore fault");
            Problem::new(ProblemCode::Internal, "internal error")
        }
    }
}

/// The answer while the HSM cannot serve.
fn hsm_unavailable() -> Problem {
    Problem::new(
        ProblemCode::Unavailable,
        "the HSM is unavailable; try again",
    )
}

/// Maps a storage error.
pub(crate) fn storage(error: StorageError) -> Problem {
    use ProblemCode as Code;
    let (code, detail) = match &error {
        StorageError::ReplayedKsn => (Code::ReplayedKsn, error.to_string()),
        StorageError::StaleKsn => (Code::StaleKsn, error.to_string()),
        StorageError::Conflict => (Code::Conflict, error.to_string()),
        StorageError::Mismatch {
            field: "payee_account_currency",
        } => (
            Code::AccountCurrency,
            "the payee's account is in another currency than the payment".to_owned(),
        ),
        StorageError::Mismatch {
            field: "payer_account_currency",
        } => (
            Code::AccountCurrency,
            "the payer's account is in another currency than the payment".to_owned(),
        ),
        StorageError::Mismatch { .. } => (Code::Mismatch, error.to_string()),
        StorageError::AccountMismatch => (Code::ForeignAccount, error.to_string()),
        StorageError::UnknownAccount(_) => (Code::UnknownAccount, error.to_string()),
        StorageError::DigestMismatch => (Code::DigestMismatch, error.to_string()),
        StorageError::Expired => (Code::Expired, error.to_string()),
        StorageError::InsufficientFunds => (Code::InsufficientFunds, error.to_string()),
        StorageError::KsnNotTerminal
        | StorageError::CertificateNotEnrolled
        | StorageError::UnknownTerminal(_) => (Code::TerminalMismatch, error.to_string()),
        StorageError::TerminalNotActive(TerminalState::Suspended) => {
            (Code::TerminalSuspended, error.to_string())
        }
        StorageError::TerminalNotActive(TerminalState::Revoked) => {
            (Code::TerminalRevoked, error.to_string())
        }
        StorageError::TerminalNotActive(_) => (Code::TerminalMismatch, error.to_string()),
        StorageError::EnrollmentRefused(_) => (Code::EnrollmentRefused, enrollment_detail()),
        _ if error.is_unavailable() => {
            // The cause (PostgreSQL's or SQLite's own words) goes to the log, not the peer.
            tracing::error!(
                error = ErrorChain(&error).to_string(),
                "database unavailable"
            );
            (
                Code::Unavailable,
                "the ledger is unavailable; try again".to_owned(),
            )
        }
        _ => {
            tracing::error!(error = ErrorChain(&error).to_string(), "storage fault");
            (Code::Internal, "internal error".to_owned())
        }
    };
    Problem::new(code, detail)
}

/// The one answer to every refused enrollment, whatever the reason (code wrong, used, expired,
/// terminal unknown, CSR not matching): a caller learns nothing about which.
pub(crate) fn enrollment_detail() -> String {
    "enrollment refused: check the terminal ID, the code and its expiry, and the CSR".to_owned()
}

/// A fault of the platform (a task that did not finish, an invariant that did not hold).
pub(crate) fn internal(what: &str) -> Problem {
    tracing::error!(what, "internal fault");
    Problem::new(ProblemCode::Internal, "internal error")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every keystore failure that may pass is 503, never 500; the terminal's own faults keep
    /// their codes.
    #[test]
    fn keystore_faults_are_unavailable_and_refusals_keep_their_codes() {
        let mut unavailable = nfcpay_keystore::testing::unavailable_errors();
        unavailable.extend([
            KeystoreError::UnknownKey,
            KeystoreError::PinRefused,
            KeystoreError::Pkcs11 {
                function: "C_Sign",
                code: "CKR_DATA_LEN_RANGE".into(),
                source: None,
            },
        ]);
        for error in unavailable {
            let text = error.to_string();
            assert_eq!(keystore(error).code(), ProblemCode::Unavailable, "{text}");
        }
        assert_eq!(
            keystore(KeystoreError::AuthenticationFailed).code(),
            ProblemCode::AuthenticationFailed
        );
        assert_eq!(
            keystore(KeystoreError::UnknownBdk("01020304".parse().unwrap())).code(),
            ProblemCode::UnknownBdk
        );
        assert_eq!(
            keystore(KeystoreError::InvalidInput { what: "x" }).code(),
            ProblemCode::Internal
        );
    }

    /// The keystore's failures that keep a typed cause answer as they did when the cause was
    /// flattened into text: a store file that is not one as the file's other faults (`503`),
    /// a module that does not load and a key the readiness canary cannot use as the
    /// keystore's other configuration (`500`).
    #[test]
    fn keystore_failures_with_a_typed_cause_keep_their_problem_codes() {
        let decode = KeystoreError::SoftwareStoreDecode {
            path: "/var/lib/nfcpay/keystore.json".into(),
            source: serde_json::from_str::<u8>("x").unwrap_err(),
        };
        assert_eq!(keystore(decode).code(), ProblemCode::Unavailable);
        let uri = "pkcs11:token=t?module-path=/nonexistent/libnothing.so&pin-source=file:/none";
        let Err(module_load) = nfcpay_keystore::pkcs11::Pkcs11Keystore::open(&uri.parse().unwrap())
        else {
            panic!("a store opened without a module")
        };
        let canary = KeystoreError::CanaryFailed {
            part: "derive from BDK 01020304".into(),
            source: Box::new(KeystoreError::KeyNotPermitted),
        };
        for error in [
            KeystoreError::Configuration("x".into()),
            module_load,
            canary,
        ] {
            let text = error.to_string();
            assert_eq!(keystore(error).code(), ProblemCode::Internal, "{text}");
        }
    }
}
