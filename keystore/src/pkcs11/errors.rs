//! The one place where PKCS#11 return codes become [`KeystoreError`]s.

use cryptoki::error::{Error, RvError};

use crate::KeystoreError;

/// The function name given to [`map_error`] for an AES-GCM decryption: SoftHSM 2.6.1 reports a
/// tag that does not verify as `CKR_GENERAL_ERROR`, not `CKR_ENCRYPTED_DATA_INVALID`, so for
/// this call (and only this one) a general error means "authentication failed".
pub(super) const GCM_DECRYPT: &str = "C_Decrypt(CKM_AES_GCM)";
/// The function name given to [`map_error`] for an AES key unwrap: a wrong KEK or tampered
/// data fails the RFC 3394 integrity check, which modules report as `CKR_WRAPPED_KEY_INVALID`,
/// `CKR_ENCRYPTED_DATA_INVALID` or (SoftHSM) `CKR_GENERAL_ERROR`.
pub(super) const UNWRAP: &str = "C_UnwrapKey(CKM_AES_KEY_WRAP)";

/// Maps an error of the PKCS#11 function `function` to a [`KeystoreError`].
///
/// - PIN refused or locked → [`KeystoreError::PinRefused`];
/// - session, login or token gone → [`KeystoreError::SessionLost`] (the store recovers);
/// - the device failed → [`KeystoreError::Device`] (the store recovers);
/// - key attributes forbid the operation → [`KeystoreError::KeyNotPermitted`];
/// - handle unknown → [`KeystoreError::UnknownKey`];
/// - tag, MAC or wrapped key does not verify → [`KeystoreError::AuthenticationFailed`];
/// - anything else → [`KeystoreError::Pkcs11`] with the `CKR_*` name.
///
/// The variants that tell the module's answer apart keep it as their `source`; the others
/// (a refused PIN, a tag that does not verify, …) say all there is to say.
pub(crate) fn map_error(function: &'static str, error: Error) -> KeystoreError {
    let rv = match &error {
        Error::Pkcs11(rv, _) => *rv,
        _ => {
            return KeystoreError::Pkcs11 {
                function,
                code: "not a PKCS#11 return value".to_owned(),
                source: Some(error),
            };
        }
    };
    let verifying = function == GCM_DECRYPT || function == UNWRAP;
    match rv {
        RvError::PinIncorrect
        | RvError::PinLocked
        | RvError::PinInvalid
        | RvError::PinLenRange
        | RvError::PinExpired => KeystoreError::PinRefused,
        RvError::SessionHandleInvalid
        | RvError::SessionClosed
        | RvError::DeviceRemoved
        | RvError::TokenNotPresent
        | RvError::UserNotLoggedIn
        | RvError::CryptokiNotInitialized => KeystoreError::SessionLost {
            function,
            code: ckr_name(rv),
            source: Some(error),
        },
        RvError::DeviceError
        | RvError::DeviceMemory
        | RvError::FunctionFailed
        | RvError::TokenNotRecognized
        | RvError::CryptokiAlreadyInitialized => KeystoreError::Device {
            function,
            code: ckr_name(rv),
            source: Some(error),
        },
        RvError::GeneralError if !verifying => KeystoreError::Device {
            function,
            code: ckr_name(rv),
            source: Some(error),
        },
        RvError::KeyFunctionNotPermitted
        | RvError::KeyTypeInconsistent
        | RvError::KeyUnextractable
        | RvError::KeyNotWrappable
        | RvError::WrappingKeyTypeInconsistent
        | RvError::UnwrappingKeyTypeInconsistent => KeystoreError::KeyNotPermitted,
        RvError::KeyHandleInvalid
        | RvError::ObjectHandleInvalid
        | RvError::WrappingKeyHandleInvalid
        | RvError::UnwrappingKeyHandleInvalid => KeystoreError::UnknownKey,
        RvError::EncryptedDataInvalid
        | RvError::EncryptedDataLenRange
        | RvError::SignatureInvalid
        | RvError::SignatureLenRange => KeystoreError::AuthenticationFailed,
        RvError::WrappedKeyInvalid | RvError::WrappedKeyLenRange if function == UNWRAP => {
            KeystoreError::AuthenticationFailed
        }
        RvError::GeneralError if verifying => KeystoreError::AuthenticationFailed,
        other => KeystoreError::Pkcs11 {
            function,
            code: ckr_name(other),
            source: Some(error),
        },
    }
}

/// `PinIncorrect` → `CKR_PIN_INCORRECT`.
fn ckr_name(rv: RvError) -> String {
    let debug = format!("{rv:?}");
    let mut name = String::from("CKR");
    for character in debug.chars() {
        if character.is_ascii_uppercase() {
            name.push('_');
        }
        name.push(character.to_ascii_uppercase());
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;
    use cryptoki::context::Function;

    fn mapped(function: &'static str, rv: RvError) -> KeystoreError {
        map_error(function, Error::Pkcs11(rv, Function::Decrypt))
    }

    #[test]
    fn names_codes_like_the_header() {
        assert_eq!(ckr_name(RvError::PinIncorrect), "CKR_PIN_INCORRECT");
        assert_eq!(
            ckr_name(RvError::KeyFunctionNotPermitted),
            "CKR_KEY_FUNCTION_NOT_PERMITTED"
        );
    }

    #[test]
    fn maps_each_family() {
        assert!(matches!(
            mapped("C_Login", RvError::PinIncorrect),
            KeystoreError::PinRefused
        ));
        assert!(matches!(
            mapped("C_Login", RvError::PinLocked),
            KeystoreError::PinRefused
        ));
        assert!(matches!(
            mapped("C_Sign", RvError::SessionHandleInvalid),
            KeystoreError::SessionLost { .. }
        ));
        assert!(matches!(
            mapped("C_Sign", RvError::KeyFunctionNotPermitted),
            KeystoreError::KeyNotPermitted
        ));
        assert!(matches!(
            mapped("C_Verify", RvError::SignatureInvalid),
            KeystoreError::AuthenticationFailed
        ));
        assert!(matches!(
            mapped(GCM_DECRYPT, RvError::GeneralError),
            KeystoreError::AuthenticationFailed
        ));
        assert!(matches!(
            mapped("C_Encrypt", RvError::GeneralError),
            KeystoreError::Device { .. }
        ));
        assert!(mapped("C_Sign", RvError::DeviceRemoved).is_unavailable());
        assert!(mapped("C_Sign", RvError::TokenNotPresent).is_unavailable());
        let KeystoreError::Device { code, .. } = mapped("C_Encrypt", RvError::DeviceMemory) else {
            panic!("not a device error")
        };
        assert_eq!(code, "CKR_DEVICE_MEMORY");
        let KeystoreError::Pkcs11 { code, .. } = mapped("C_Encrypt", RvError::DataLenRange) else {
            panic!("not a Pkcs11 error")
        };
        assert_eq!(code, "CKR_DATA_LEN_RANGE");
        assert!(!mapped("C_Encrypt", RvError::DataLenRange).is_unavailable());
    }

    #[test]
    fn the_module_answer_is_the_cause_and_shown_once() {
        use std::error::Error as _;
        let error = mapped("C_Encrypt", RvError::DeviceMemory);
        assert_eq!(
            error.to_string(),
            "PKCS#11 device error (C_Encrypt: CKR_DEVICE_MEMORY)"
        );
        let Some(cause) = error.source() else {
            panic!("the module's answer was dropped")
        };
        assert!(matches!(
            cause.downcast_ref::<Error>(),
            Some(Error::Pkcs11(RvError::DeviceMemory, _))
        ));
        assert!(!error.to_string().contains(&cause.to_string()));
        for rv in [RvError::SessionHandleInvalid, RvError::DataLenRange] {
            assert!(mapped("C_Sign", rv).source().is_some(), "{rv:?}");
        }
        let not_a_return_value = map_error("C_Sign", Error::NotSupported);
        assert!(not_a_return_value.source().is_some());
    }
}
