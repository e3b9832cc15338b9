//! AES DUKPT (ANSI X9.24-3-2017) on top of any [`Keystore`].
//!
//! The derivation data and the order of derivations come from [`nfcpay_protocol::dukpt`];
//! each derivation is one [`Keystore::derive`] call, so with the PKCS#11 backend every
//! intermediate key is a token session object and nothing is ever in host memory. Keys on the
//! way are destroyed as soon as the next one exists ([`TransientKey`] guarantees it on every
//! path, errors included).

use nfcpay_protocol::dukpt::{
    DerivationData, DeriveKey, KeyAlgorithm, WorkingKeyUsage, transaction_key_path,
};
use nfcpay_protocol::{InitialKeyId, Ksn};

use crate::{DeriveBase, KeyHandle, KeyPurpose, Keystore, KeystoreError};

/// A transient key that is destroyed when dropped, unless taken with [`TransientKey::into_handle`].
pub struct TransientKey<'s> {
    store: &'s dyn Keystore,
    key: Option<KeyHandle>,
}

impl<'s> TransientKey<'s> {
    /// Takes charge of destroying `key`.
    pub fn new(store: &'s dyn Keystore, key: KeyHandle) -> Self {
        Self {
            store,
            key: Some(key),
        }
    }

    /// The key.
    pub fn handle(&self) -> &KeyHandle {
        // `key` is `Some` from construction until `into_handle` consumes `self`.
        self.key
            .as_ref()
            .unwrap_or_else(|| unreachable!("key taken"))
    }

    /// Gives the key back to the caller, who then must destroy it.
    pub fn into_handle(mut self) -> KeyHandle {
        self.key.take().unwrap_or_else(|| unreachable!("key taken"))
    }
}

impl Drop for TransientKey<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take()
            && let Err(error) = self.store.destroy(key)
        {
            tracing::warn!(%error, "could not destroy a transient key");
        }
    }
}

/// Derives the initial key of `initial_key_id` from its BDK (named by the ID's first 4 bytes).
pub fn initial_key(
    store: &dyn Keystore,
    initial_key_id: InitialKeyId,
    purpose: KeyPurpose,
) -> Result<KeyHandle, KeystoreError> {
    let algorithm = store.bdk_info(initial_key_id.bdk_id())?.algorithm;
    store.derive(
        DeriveBase::Bdk(initial_key_id.bdk_id()),
        &DerivationData::initial_key(algorithm, initial_key_id),
        purpose,
    )
}

/// Derives the transaction key of `ksn` from the BDK the KSN names (the host algorithm):
/// the initial key, then one derivation per one-bit of the counter.
pub fn transaction_key(
    store: &dyn Keystore,
    ksn: Ksn,
    purpose: KeyPurpose,
) -> Result<KeyHandle, KeystoreError> {
    let algorithm = store.bdk_info(ksn.bdk_id())?.algorithm;
    let mut key = TransientKey::new(
        store,
        initial_key(store, ksn.initial_key_id(), KeyPurpose::Derive)?,
    );
    let mut path = transaction_key_path(algorithm, ksn).peekable();
    while let Some(data) = path.next() {
        let step_purpose = if path.peek().is_none() {
            purpose
        } else {
            KeyPurpose::Derive
        };
        let next = store.derive(DeriveBase::Key(key.handle()), &data, step_purpose)?;
        key = TransientKey::new(store, next);
    }
    Ok(key.into_handle())
}

/// Derives a working key of `ksn` for `usage` from a transaction key made by
/// [`transaction_key`] or by a terminal. `algorithm` defaults to the transaction key's.
pub fn working_key_from(
    store: &dyn Keystore,
    transaction_key: &KeyHandle,
    ksn: Ksn,
    usage: WorkingKeyUsage,
    algorithm: Option<KeyAlgorithm>,
    purpose: KeyPurpose,
) -> Result<KeyHandle, KeystoreError> {
    let algorithm = algorithm.unwrap_or(transaction_key.algorithm());
    if algorithm.key_bytes() > transaction_key.algorithm().key_bytes() {
        return Err(KeystoreError::InvalidInput {
            what: "a working key cannot be longer than the key it is derived from",
        });
    }
    store.derive(
        DeriveBase::Key(transaction_key),
        &DerivationData::working_key(usage, algorithm, ksn),
        purpose,
    )
}

/// Derives a working key of `ksn` straight from the BDK (the host algorithm end to end).
pub fn working_key(
    store: &dyn Keystore,
    ksn: Ksn,
    usage: WorkingKeyUsage,
    algorithm: Option<KeyAlgorithm>,
    purpose: KeyPurpose,
) -> Result<KeyHandle, KeystoreError> {
    let transaction_key =
        TransientKey::new(store, transaction_key(store, ksn, KeyPurpose::Derive)?);
    working_key_from(
        store,
        transaction_key.handle(),
        ksn,
        usage,
        algorithm,
        purpose,
    )
}

/// The terminal algorithm's view of a keystore: derive with [`KeyPurpose::Derive`], discard by
/// destroying. Use it with [`nfcpay_protocol::dukpt::TerminalState`].
pub struct TerminalKeys<'s>(pub &'s dyn Keystore);

impl DeriveKey for TerminalKeys<'_> {
    type Key = KeyHandle;
    type Error = KeystoreError;

    fn derive(
        &mut self,
        base: &KeyHandle,
        data: &DerivationData,
    ) -> Result<KeyHandle, KeystoreError> {
        self.0
            .derive(DeriveBase::Key(base), data, KeyPurpose::Derive)
    }

    fn discard(&mut self, key: KeyHandle) -> Result<(), KeystoreError> {
        self.0.destroy(key)
    }
}
