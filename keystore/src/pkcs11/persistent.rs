//! Persistent symmetric keys, stored by label: persist, load, delete.
//!
//! A persistent symmetric key ([`Keystore::persist_key`]) is a token copy of a transient key
//! (`C_CopyObject` with `CKA_TOKEN=true`, its label, and `CKA_ID` `nfcpay-persistent-key`, which
//! keeps these apart from BDKs and key pairs); every other attribute is copied, so it stays
//! sensitive, not extractable and limited to its purpose. Replacing one creates the new object
//! first and then destroys the old; a crash in between leaves both, which `load_key` reports
//! rather than guess. `load_key` makes a session copy; `delete_key` destroys the token object.
//!
//! [`Keystore::persist_key`]: crate::Keystore::persist_key

use cryptoki::object::{Attribute, AttributeType, ObjectHandle};
use cryptoki::session::Session;
use nfcpay_protocol::dukpt::KeyAlgorithm;

use super::handles::object;
use super::{Checked, Pkcs11Keystore, templates};
use crate::{KeyHandle, KeyLabel, KeystoreError};

/// [`Keystore::persist_key`]: the new token copy first, then the old ones destroyed.
pub(super) fn persist(
    store: &Pkcs11Keystore,
    key: &KeyHandle,
    label: &KeyLabel,
) -> Result<(), KeystoreError> {
    store.with_session(|session, gate| {
        let key = object(key, gate)?;
        // Looked up first, so that only these are destroyed once the new object exists.
        let replaced = session
            .find_objects(&templates::persistent_key_search(label.as_str()))
            .ck("C_FindObjects")?;
        session
            .copy_object(key, &templates::persistent_key_copy(label.as_str()))
            .ck("C_CopyObject")?;
        for old in &replaced {
            session.destroy_object(*old).ck("C_DestroyObject")?;
        }
        tracing::debug!(%label, replaced = replaced.len(), "stored a persistent key");
        Ok(())
    })
}

/// [`Keystore::load_key`]: a session copy of the one token key with this label.
pub(super) fn load(
    store: &Pkcs11Keystore,
    label: &KeyLabel,
) -> Result<Option<KeyHandle>, KeystoreError> {
    store.with_session(|session, gate| {
        let found = session
            .find_objects(&templates::persistent_key_search(label.as_str()))
            .ck("C_FindObjects")?;
        let stored = match found.as_slice() {
            [] => return Ok(None),
            [stored] => *stored,
            _ => {
                return Err(KeystoreError::Configuration(format!(
                    "the token holds {} persistent keys labelled {label}, expected one \
                     (a replacement was interrupted): delete the label and store it again",
                    found.len()
                )));
            }
        };
        let algorithm = key_algorithm_of(session, stored)?;
        let copy = session
            .copy_object(stored, &[Attribute::Token(false)])
            .ck("C_CopyObject")?;
        Ok(Some(KeyHandle::with_epoch(
            copy.handle(),
            algorithm,
            gate.epoch(),
        )))
    })
}

/// [`Keystore::delete_key`].
pub(super) fn delete(store: &Pkcs11Keystore, label: &KeyLabel) -> Result<bool, KeystoreError> {
    store.with_session(|session, _| {
        let found = session
            .find_objects(&templates::persistent_key_search(label.as_str()))
            .ck("C_FindObjects")?;
        for stored in &found {
            session.destroy_object(*stored).ck("C_DestroyObject")?;
        }
        if !found.is_empty() {
            tracing::debug!(%label, "deleted a persistent key");
        }
        Ok(!found.is_empty())
    })
}

/// The algorithm of an AES key object, from its `CKA_VALUE_LEN`.
fn key_algorithm_of(session: &Session, key: ObjectHandle) -> Result<KeyAlgorithm, KeystoreError> {
    let attributes = session
        .get_attributes(key, &[AttributeType::ValueLen])
        .ck("C_GetAttributeValue")?;
    let Some(Attribute::ValueLen(length)) = attributes.into_iter().next() else {
        return Err(KeystoreError::Pkcs11 {
            function: "C_GetAttributeValue",
            code: "no CKA_VALUE_LEN".to_owned(),
            source: None,
        });
    };
    Ok(KeyAlgorithm::from_key_bytes(usize::from(length))?)
}
