//! AES DUKPT (ANSI X9.24-3-2017) on top of any [`Keystore`].
//!
//! The derivation data and the order of derivations come from [`nfcpay_protocol::dukpt`];
//! each derivation is one [`Keystore::derive`] call, so with the PKCS#11 backend every
//! intermediate key is a token session object and nothing is ever in host memory. Keys on the
//! way are destroyed as soon as the next one exists ([`TransientKey`] guarantees it on every
//! path, errors included).

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use nfcpay_protocol::dukpt::{
    DerivationData, DeriveKey, KeyAlgorithm, WorkingKeyUsage, intermediate_counters,
    transaction_key_path,
};
use nfcpay_protocol::{InitialKeyId, Ksn};

use crate::{DeriveBase, KeyHandle, KeyPurpose, Keystore, KeystoreError};

/// What holds the store a [`KeyGuard`] destroys its key in: a borrow or an `Arc`.
pub trait HoldsStore {
    /// The store.
    fn store(&self) -> &dyn Keystore;
}

impl HoldsStore for &dyn Keystore {
    fn store(&self) -> &dyn Keystore {
        *self
    }
}

impl HoldsStore for Arc<dyn Keystore> {
    fn store(&self) -> &dyn Keystore {
        self.as_ref()
    }
}

/// A key that is destroyed in its keystore when dropped, unless taken with
/// [`KeyGuard::into_handle`]. `S` holds the store: a borrow ([`TransientKey`]) for a key that
/// lives within one call, an `Arc` for one that outlives it (a terminal's transaction key).
pub struct KeyGuard<S: HoldsStore> {
    store: S,
    key: Option<KeyHandle>,
}

/// A [`KeyGuard`] borrowing its store: the keys on the way of one derivation.
pub type TransientKey<'s> = KeyGuard<&'s dyn Keystore>;

impl<S: HoldsStore> KeyGuard<S> {
    /// Takes charge of destroying `key`.
    pub fn new(store: S, key: KeyHandle) -> Self {
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

impl<S: HoldsStore> Drop for KeyGuard<S> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take()
            && let Err(error) = self.store.store().destroy(key)
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

/// Number of intermediate keys [`HostKeyCache`] keeps by default.
pub const HOST_KEY_CACHE_ENTRIES_DEFAULT: usize = 4096;

/// A cached intermediate derivation key, destroyed when the last user lets go of it.
struct CachedKey {
    store: Arc<dyn Keystore>,
    key: Option<KeyHandle>,
}

impl Drop for CachedKey {
    fn drop(&mut self) {
        if let Some(key) = self.key.take()
            && let Err(error) = self.store.destroy(key)
        {
            tracing::warn!(%error, "could not destroy a cached DUKPT key");
        }
    }
}

impl CachedKey {
    fn handle(&self) -> &KeyHandle {
        // `key` is `Some` until `drop` takes it.
        self.key
            .as_ref()
            .unwrap_or_else(|| unreachable!("key taken"))
    }
}

/// The platform's bounded cache of DUKPT intermediate keys, so that a new KSN usually costs
/// one or two derivations instead of up to seventeen.
///
/// Keys are cached by (Initial Key ID, counter prefix) — the prefix 0 is the initial key —
/// as keystore session objects with [`KeyPurpose::Derive`]: nothing leaves the HSM and no
/// terminal key is stored anywhere else. Consecutive counters of one terminal share all but
/// the last steps of their paths (see [`nfcpay_protocol::dukpt::intermediate_counters`]).
/// The least recently used key is destroyed when the cache is full; a key in use by another
/// thread is destroyed when that thread lets go of it. If the keystore loses its session
/// objects (a reopened PKCS#11 session), the cache empties itself and derives afresh once.
pub struct HostKeyCache {
    store: Arc<dyn Keystore>,
    entries: Mutex<lru::LruCache<(InitialKeyId, u32), Arc<CachedKey>>>,
}

impl HostKeyCache {
    /// A cache of at most `entries` keys (at least 1) held in `store`.
    pub fn new(store: Arc<dyn Keystore>, entries: usize) -> Self {
        let capacity = NonZeroUsize::new(entries).unwrap_or(NonZeroUsize::MIN);
        Self {
            store,
            entries: Mutex::new(lru::LruCache::new(capacity)),
        }
    }

    /// The keystore the keys live in.
    pub fn store(&self) -> &Arc<dyn Keystore> {
        &self.store
    }

    /// Derives the working key of `ksn` for `usage` (algorithm: the BDK's), starting from the
    /// longest cached prefix of the KSN's derivation path and caching the keys on the way.
    pub fn working_key(
        &self,
        ksn: Ksn,
        usage: WorkingKeyUsage,
        purpose: KeyPurpose,
    ) -> Result<KeyHandle, KeystoreError> {
        match self.try_working_key(ksn, usage, purpose) {
            Err(KeystoreError::UnknownKey | KeystoreError::SessionLost { .. }) => {
                // A cached session object is gone: start again from the BDK.
                self.clear();
                self.try_working_key(ksn, usage, purpose)
            }
            other => other,
        }
    }

    /// Destroys every cached key (those in use go when their users let go).
    pub fn clear(&self) {
        self.lock().clear();
    }

    /// Number of keys cached now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, lru::LruCache<(InitialKeyId, u32), Arc<CachedKey>>> {
        // A panic while holding this lock leaves only a cache behind: keep using it.
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn try_working_key(
        &self,
        ksn: Ksn,
        usage: WorkingKeyUsage,
        purpose: KeyPurpose,
    ) -> Result<KeyHandle, KeystoreError> {
        let store = self.store.as_ref();
        let initial_key_id = ksn.initial_key_id();
        let algorithm = store.bdk_info(ksn.bdk_id())?.algorithm;
        let path: Vec<u32> = intermediate_counters(ksn.counter()).collect();
        // Longest cached prefix: walk from the transaction key back to the initial key.
        let (mut key, start) = {
            let mut entries = self.lock();
            let cached = path
                .iter()
                .enumerate()
                .rev()
                .find_map(|(index, bits)| {
                    entries
                        .get(&(initial_key_id, *bits))
                        .map(|key| (Arc::clone(key), index + 1))
                })
                .or_else(|| {
                    entries
                        .get(&(initial_key_id, 0))
                        .map(|key| (Arc::clone(key), 0))
                });
            match cached {
                Some(found) => found,
                None => {
                    drop(entries);
                    let initial = self.cache(
                        initial_key_id,
                        0,
                        initial_key(store, initial_key_id, KeyPurpose::Derive)?,
                    );
                    (initial, 0)
                }
            }
        };
        for bits in &path[start..] {
            let data = DerivationData::intermediate(algorithm, initial_key_id, *bits);
            let next = store.derive(DeriveBase::Key(key.handle()), &data, KeyPurpose::Derive)?;
            key = self.cache(initial_key_id, *bits, next);
        }
        working_key_from(store, key.handle(), ksn, usage, None, purpose)
    }

    fn cache(&self, initial_key_id: InitialKeyId, bits: u32, key: KeyHandle) -> Arc<CachedKey> {
        let cached = Arc::new(CachedKey {
            store: Arc::clone(&self.store),
            key: Some(key),
        });
        self.lock().put((initial_key_id, bits), Arc::clone(&cached));
        cached
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::software::SoftwareKeystore;
    use zeroize::Zeroizing;

    fn store_with_bdk() -> Arc<dyn Keystore> {
        let store = SoftwareKeystore::in_memory();
        store
            .import_bdk(
                "12345678".parse().unwrap(),
                &Zeroizing::new(hex::decode("FEDCBA9876543210F1F1F1F1F1F1F1F1").unwrap()),
            )
            .unwrap();
        Arc::new(store)
    }

    fn kcv(store: &dyn Keystore, key: KeyHandle) -> String {
        let key = TransientKey::new(store, key);
        store.kcv(key.handle()).unwrap().to_string()
    }

    fn ksn(counter: u32) -> Ksn {
        format!("1234567890123456{counter:08X}").parse().unwrap()
    }

    #[test]
    fn cached_keys_equal_direct_derivation_and_reuse_prefixes() {
        let store = store_with_bdk();
        let cache = HostKeyCache::new(Arc::clone(&store), 64);
        let usage = WorkingKeyUsage::DataEncrypt;
        let mut sizes = Vec::new();
        for counter in [5, 6, 7, 8, 0x0001_FFFE, 0x0002_0000] {
            let cached = cache
                .working_key(ksn(counter), usage, KeyPurpose::Check)
                .unwrap();
            let direct =
                working_key(store.as_ref(), ksn(counter), usage, None, KeyPurpose::Check).unwrap();
            assert_eq!(
                kcv(store.as_ref(), cached),
                kcv(store.as_ref(), direct),
                "{counter:X}"
            );
            sizes.push(cache.len());
        }
        // 5 = IK, 4, 5; then 6 and 7 each add one key; 8 adds one; 0x1FFFE adds 16;
        // 0x20000 adds one.
        assert_eq!(sizes, [3, 4, 5, 6, 22, 23]);
    }

    #[test]
    fn a_full_cache_evicts_and_stays_correct() {
        let store = store_with_bdk();
        let cache = HostKeyCache::new(Arc::clone(&store), 4);
        for counter in (1..200).step_by(7) {
            let cached = cache
                .working_key(ksn(counter), WorkingKeyUsage::MacBoth, KeyPurpose::Check)
                .unwrap();
            let direct = working_key(
                store.as_ref(),
                ksn(counter),
                WorkingKeyUsage::MacBoth,
                None,
                KeyPurpose::Check,
            )
            .unwrap();
            assert_eq!(kcv(store.as_ref(), cached), kcv(store.as_ref(), direct));
            assert!(cache.len() <= 4);
        }
        cache.clear();
        assert!(cache.is_empty());
    }

    #[test]
    fn unknown_bdks_are_reported_and_nothing_is_cached() {
        let store = store_with_bdk();
        let cache = HostKeyCache::new(Arc::clone(&store), 8);
        let unknown: Ksn = "DEADBEEF0000000100000001".parse().unwrap();
        assert!(matches!(
            cache.working_key(unknown, WorkingKeyUsage::DataEncrypt, KeyPurpose::Encrypt),
            Err(KeystoreError::UnknownBdk(_))
        ));
        assert!(cache.is_empty());
    }
}
