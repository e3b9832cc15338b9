//! AES with transient keys: GCM, CMAC, KCV, key wrap and unwrap, destroy.
//!
//! Each operation checks the handle's epoch (`handles`), runs on a pooled session, and maps
//! the module's answer through `map_error`; a tag, MAC or wrapped key that does not verify is
//! [`KeystoreError::AuthenticationFailed`]. A reader may add an operation on a transient key
//! here; keys themselves are made in `bdks` (derive), `ec_keys` (ECDH) and here (unwrap).

use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;
use nfcpay_protocol::dukpt::KeyAlgorithm;
use zeroize::Zeroizing;

use super::errors::{GCM_DECRYPT, UNWRAP};
use super::handles::{object, raw_object};
use super::{Checked, Pkcs11Keystore, templates};
use crate::{
    CMAC_BYTES, GCM_NONCE_BYTES, GCM_TAG_BYTES, Kcv, KeyHandle, KeyPurpose, KeystoreError,
};

/// Tag length of AES-GCM, in bits.
const GCM_TAG_BITS: u64 = 128;
/// Length of an AES key-wrap (RFC 3394) integrity block, in bytes.
const KEY_WRAP_OVERHEAD_BYTES: usize = 8;

/// [`Keystore::gcm_encrypt`].
pub(super) fn gcm_encrypt(
    store: &Pkcs11Keystore,
    key: &KeyHandle,
    nonce: &[u8; GCM_NONCE_BYTES],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, KeystoreError> {
    let mut iv = *nonce;
    let params = GcmParams::new(&mut iv, aad, GCM_TAG_BITS.into()).ck("C_EncryptInit")?;
    store.with_session(|session, gate| {
        session
            .encrypt(&Mechanism::AesGcm(params), object(key, gate)?, plaintext)
            .ck("C_Encrypt(CKM_AES_GCM)")
    })
}

/// [`Keystore::gcm_decrypt`].
pub(super) fn gcm_decrypt(
    store: &Pkcs11Keystore,
    key: &KeyHandle,
    nonce: &[u8; GCM_NONCE_BYTES],
    aad: &[u8],
    ciphertext_and_tag: &[u8],
) -> Result<Zeroizing<Vec<u8>>, KeystoreError> {
    if ciphertext_and_tag.len() < GCM_TAG_BYTES {
        return Err(KeystoreError::AuthenticationFailed);
    }
    let mut iv = *nonce;
    let params = GcmParams::new(&mut iv, aad, GCM_TAG_BITS.into()).ck("C_DecryptInit")?;
    store.with_session(|session, gate| {
        session
            .decrypt(
                &Mechanism::AesGcm(params),
                object(key, gate)?,
                ciphertext_and_tag,
            )
            .map(Zeroizing::new)
            // SoftHSM reports a bad tag as CKR_GENERAL_ERROR: map_error knows GCM_DECRYPT.
            .ck(GCM_DECRYPT)
    })
}

/// [`Keystore::cmac_generate`].
pub(super) fn cmac_generate(
    store: &Pkcs11Keystore,
    key: &KeyHandle,
    data: &[u8],
) -> Result<[u8; CMAC_BYTES], KeystoreError> {
    store.with_session(|session, gate| cmac(session, object(key, gate)?, data))
}

/// [`Keystore::cmac_verify`].
pub(super) fn cmac_verify(
    store: &Pkcs11Keystore,
    key: &KeyHandle,
    data: &[u8],
    mac: &[u8],
) -> Result<(), KeystoreError> {
    if mac.len() != CMAC_BYTES {
        return Err(KeystoreError::AuthenticationFailed);
    }
    store.with_session(|session, gate| {
        session
            .verify(&Mechanism::AesCMac, object(key, gate)?, data, mac)
            .ck("C_Verify(CKM_AES_CMAC)")
    })
}

/// [`Keystore::kcv`].
pub(super) fn kcv(store: &Pkcs11Keystore, key: &KeyHandle) -> Result<Kcv, KeystoreError> {
    store.with_session(|session, gate| kcv_of(session, object(key, gate)?))
}

/// [`Keystore::wrap_key`].
pub(super) fn wrap_key(
    store: &Pkcs11Keystore,
    kek: &KeyHandle,
    key: &KeyHandle,
) -> Result<Vec<u8>, KeystoreError> {
    store.with_session(|session, gate| {
        session
            .wrap_key(
                &Mechanism::AesKeyWrap,
                object(kek, gate)?,
                object(key, gate)?,
            )
            .ck("C_WrapKey(CKM_AES_KEY_WRAP)")
    })
}

/// [`Keystore::unwrap_key`].
pub(super) fn unwrap_key(
    store: &Pkcs11Keystore,
    kek: &KeyHandle,
    wrapped: &[u8],
    algorithm: KeyAlgorithm,
    purpose: KeyPurpose,
) -> Result<KeyHandle, KeystoreError> {
    if wrapped.len() != algorithm.key_bytes() + KEY_WRAP_OVERHEAD_BYTES {
        return Err(KeystoreError::InvalidInput {
            what: "wrapped key length does not match its algorithm",
        });
    }
    let template = templates::transient_key(algorithm, purpose, false);
    store.with_session(|session, gate| {
        let key = session
            .unwrap_key(
                &Mechanism::AesKeyWrap,
                object(kek, gate)?,
                wrapped,
                &template,
            )
            .ck(UNWRAP)?;
        Ok(KeyHandle::with_epoch(key.handle(), algorithm, gate.epoch()))
    })
}

/// [`Keystore::destroy`]: a key of an earlier epoch is already gone.
pub(super) fn destroy(store: &Pkcs11Keystore, key: KeyHandle) -> Result<(), KeystoreError> {
    store.call(|gate| {
        // A key of an earlier opening died with its session: nothing to destroy, and its
        // number may name a new object now.
        if key.epoch() != gate.epoch() {
            return Ok(());
        }
        store
            .pool
            .with_session(&store.connector, gate.slot(), |session| {
                session
                    .destroy_object(raw_object(key.id()))
                    .ck("C_DestroyObject")
            })
    })
}

fn cmac(
    session: &Session,
    key: ObjectHandle,
    data: &[u8],
) -> Result<[u8; CMAC_BYTES], KeystoreError> {
    let mac = session
        .sign(&Mechanism::AesCMac, key, data)
        .ck("C_Sign(CKM_AES_CMAC)")?;
    mac.as_slice()
        .try_into()
        .map_err(|_| KeystoreError::Pkcs11 {
            function: "C_Sign(CKM_AES_CMAC)",
            code: format!("a {}-byte CMAC, expected 16", mac.len()),
            source: None,
        })
}

/// KCV: the first 3 bytes of AES-CMAC over one zero block.
pub(super) fn kcv_of(session: &Session, key: ObjectHandle) -> Result<Kcv, KeystoreError> {
    Ok(Kcv::from_cmac(&cmac(session, key, &[0u8; 16])?))
}
