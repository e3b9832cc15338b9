//! The software backend: the [`Keystore`] in this process's memory, for development and for
//! terminals without a token. It behaves like the PKCS#11 backend — same operations, same key
//! purposes, same errors — so one conformance suite runs against both.
//!
//! # Keys
//!
//! - **Persistent**: BDKs and named P-256 key pairs, kept in the state file (below).
//! - **Transient**: keys made by [`Keystore::derive`], [`Keystore::unwrap_key`] and
//!   [`Keystore::ecdh_kek`], and P-256 key pairs generated with `persistent = false`. They live
//!   in memory until destroyed or until the store is dropped.
//!
//! Every key's bytes are in [`Zeroizing`] buffers (P-256 scalars in [`p256::SecretKey`], which
//! zeroizes itself); no structure holding a key implements `Debug`. A transient key carries the
//! [`KeyPurpose`] it was made with and can do nothing else, like a PKCS#11 object's attributes:
//!
//! | purpose   | derive | GCM | CMAC | KCV | wrap/unwrap others | be wrapped |
//! |-----------|--------|-----|------|-----|--------------------|------------|
//! | BDK       | yes    |     |      |     |                    |            |
//! | `Derive`  | yes    |     |      |     |                    |            |
//! | `Export`  | yes    |     |      |     |                    | yes        |
//! | `Encrypt` |        | yes |      |     |                    |            |
//! | `Mac`     |        |     | yes  | yes |                    |            |
//! | `Wrap`    |        |     |      |     | yes                |            |
//! | `Check`   |        |     |      | yes |                    |            |
//!
//! Anything else is [`KeystoreError::KeyNotPermitted`]; a destroyed or foreign handle is
//! [`KeystoreError::UnknownKey`].
//!
//! # State file
//!
//! [`SoftwareKeystore::open`] creates the file when it is missing (mode 0600, never replacing
//! an existing file) and refuses one that group or others may access. Every change (BDK
//! generated or imported, named key pair generated or destroyed, symmetric key persisted or
//! deleted) rewrites it atomically: a new 0600 file beside it, fsync, rename over it, fsync of
//! the directory. A crash leaves the old or the new file, never a mix. Reading checks every field — lengths, hex, algorithm, that each
//! BDK matches its stored KCV, that each scalar is a valid P-256 private key, no duplicates, no
//! unknown fields — and reports a corrupt file as an error naming it, never with a secret.
//!
//! The file is JSON (bytes as lowercase hex):
//!
//! ```json
//! {
//!   "format": "nfcpay-software-keystore",
//!   "version": 1,
//!   "bdks": [
//!     {
//!       "bdk_id": "12345678",
//!       "algorithm": "aes256",
//!       "kcv": "1A2B3C",
//!       "created_unix_seconds": 1767225600,
//!       "key": "<64 hex digits>"
//!     }
//!   ],
//!   "ec_keys": [
//!     { "label": "terminal-ecdh", "private_key": "<64 hex digits>" }
//!   ],
//!   "keys": [
//!     { "label": "nfcpay-dukpt-r00", "algorithm": "aes128", "purpose": "derive",
//!       "key": "<32 hex digits>" }
//!   ]
//! }
//! ```
//!
//! `keys` may be absent (files written before persistent symmetric keys existed). A deleted
//! key's bytes are erased from memory; the replaced file's old blocks are freed by the file
//! system, not overwritten.
//!
//! One process owns a state file at a time: a second process opening the same file would not
//! see the first one's later changes, and their saves would overwrite each other.
//!
//! # Algorithms
//!
//! Derivation is AES-ECB of the derivation data under the base key (AES-128/192/256 by its
//! length), truncated to the derived key's length. GCM uses a 12-byte nonce and a 16-byte tag
//! appended to the ciphertext. The KCV is the first 3 bytes of AES-CMAC over one zero block.
//! ECDSA signs SHA-256 of the message and returns r ‖ s with a low s. The ECDH KEK is
//! AES-256-ECB of `SHA-256(context)` under the shared x-coordinate. Key wrap is RFC 3394.

mod crypto;
mod file;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use nfcpay_protocol::BdkId;
use nfcpay_protocol::dukpt::{DerivationData, KeyAlgorithm};
use p256::ecdsa::signature::Signer;
use p256::elliptic_curve::Generate;
use p256::elliptic_curve::sec1::ToSec1Point;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::{
    BdkInfo, CMAC_BYTES, DeriveBase, ECDSA_P256_SIGNATURE_BYTES, EcPublicKey, GCM_NONCE_BYTES, Kcv,
    KeyHandle, KeyLabel, KeyPurpose, Keystore, KeystoreError, PrivateKeyHandle,
};
use file::StateFile;

/// Most persistent symmetric keys the store holds ([`Keystore::persist_key`]).
pub const PERSISTENT_KEYS_MAX: usize = 4096;

/// Most transient keys (symmetric and P-256) alive at once; beyond it, making one fails.
/// Generous: a host DUKPT derivation holds two, a terminal 33.
pub const TRANSIENT_KEYS_MAX: usize = 1_000_000;

/// The software key store. Safe to share between threads: one mutex guards its state, and
/// saves to the state file happen under it, in order.
pub struct SoftwareKeystore {
    /// `None` for [`SoftwareKeystore::in_memory`].
    file: Option<StateFile>,
    state: Mutex<State>,
}

/// Everything the store holds. Not `Debug`: it holds keys.
struct State {
    bdks: BTreeMap<BdkId, Bdk>,
    keys: HashMap<u64, SymmetricKey>,
    ec_keys: HashMap<u64, EcKey>,
    /// Label → ID in `ec_keys` of each persistent key pair.
    ec_labels: BTreeMap<String, u64>,
    /// Label → persistent symmetric key.
    persisted: BTreeMap<String, SymmetricKey>,
    next_id: u64,
}

struct Bdk {
    info: BdkInfo,
    key: Zeroizing<Vec<u8>>,
}

struct SymmetricKey {
    bytes: Zeroizing<Vec<u8>>,
    algorithm: KeyAlgorithm,
    purpose: KeyPurpose,
}

struct EcKey {
    secret: p256::SecretKey,
    public: EcPublicKey,
    /// The label of a persistent key pair; `None` for a transient one.
    label: Option<KeyLabel>,
}

/// What a symmetric key is asked to do.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Operation {
    Derive,
    Gcm,
    Cmac,
    Kcv,
    WrapOrUnwrap,
    BeWrapped,
}

impl Operation {
    /// Whether a key made for `purpose` may do this (see the table in the module doc).
    fn permitted_for(self, purpose: KeyPurpose) -> bool {
        matches!(
            (purpose, self),
            (KeyPurpose::Derive | KeyPurpose::Export, Operation::Derive)
                | (KeyPurpose::Export, Operation::BeWrapped)
                | (KeyPurpose::Encrypt, Operation::Gcm)
                | (KeyPurpose::Mac, Operation::Cmac | Operation::Kcv)
                | (KeyPurpose::Check, Operation::Kcv)
                | (KeyPurpose::Wrap, Operation::WrapOrUnwrap)
        )
    }
}

impl std::fmt::Debug for SoftwareKeystore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftwareKeystore")
            .field("file", &self.file)
            .finish_non_exhaustive()
    }
}

impl SoftwareKeystore {
    /// Opens the store whose state is in the file at `path`, creating an empty file (mode
    /// 0600) when there is none. Refuses a file that group or others may access, and a
    /// corrupt one.
    pub fn open(path: &Path) -> Result<Self, KeystoreError> {
        let (file, contents) = StateFile::open(path)?;
        let mut state = State::new();
        for bdk in contents.bdks {
            state.bdks.insert(
                bdk.info.bdk_id,
                Bdk {
                    info: bdk.info,
                    key: bdk.key,
                },
            );
        }
        for ec_key in contents.ec_keys {
            let id = state.next_id()?;
            let public = public_key_of(&ec_key.secret)?;
            state.ec_labels.insert(ec_key.label.as_str().to_owned(), id);
            state.ec_keys.insert(
                id,
                EcKey {
                    secret: ec_key.secret,
                    public,
                    label: Some(ec_key.label),
                },
            );
        }
        for key in contents.keys {
            let algorithm = KeyAlgorithm::from_key_bytes(key.key.len())?;
            state.persisted.insert(
                key.label.as_str().to_owned(),
                SymmetricKey {
                    bytes: key.key,
                    algorithm,
                    purpose: key.purpose,
                },
            );
        }
        tracing::debug!(path = %file.path().display(), bdks = state.bdks.len(),
            ec_keys = state.ec_labels.len(), keys = state.persisted.len(),
            "opened the software keystore");
        Ok(Self {
            file: Some(file),
            state: Mutex::new(state),
        })
    }

    /// A store with no file: nothing outlives it. For tests and the conformance suite.
    pub fn in_memory() -> Self {
        Self {
            file: None,
            state: Mutex::new(State::new()),
        }
    }

    /// The state, even if a thread panicked while holding it: every change to it is made
    /// whole or rolled back before anything that could panic.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes the persistent part of `state` to the file (nothing for an in-memory store).
    fn save(&self, state: &State) -> Result<(), KeystoreError> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        file.save(
            state
                .bdks
                .values()
                .map(|bdk| (&bdk.info, bdk.key.as_slice())),
            state.ec_labels.values().filter_map(|id| {
                let ec_key = state.ec_keys.get(id)?;
                Some((ec_key.label.as_ref()?, &ec_key.secret))
            }),
            state
                .persisted
                .iter()
                .map(|(label, key)| (label.as_str(), key.purpose, key.bytes.as_slice())),
        )
    }

    /// Stores a new BDK and saves; on a failed save the store is as before.
    fn add_bdk(
        &self,
        bdk_id: BdkId,
        algorithm: KeyAlgorithm,
        key: Zeroizing<Vec<u8>>,
    ) -> Result<BdkInfo, KeystoreError> {
        let info = BdkInfo {
            bdk_id,
            algorithm,
            kcv: crypto::kcv(&key)?,
            created_unix_seconds: unix_seconds_now(),
        };
        let mut state = self.lock();
        if state.bdks.contains_key(&bdk_id) {
            return Err(KeystoreError::BdkExists(bdk_id));
        }
        state.bdks.insert(
            bdk_id,
            Bdk {
                info: info.clone(),
                key,
            },
        );
        if let Err(error) = self.save(&state) {
            state.bdks.remove(&bdk_id);
            return Err(error);
        }
        tracing::info!(%bdk_id, %algorithm, kcv = %info.kcv, "stored a BDK");
        Ok(info)
    }

    /// Inserts a key made for a test, with known bytes.
    #[cfg(test)]
    fn insert_key_for_test(&self, bytes: &[u8], purpose: KeyPurpose) -> KeyHandle {
        self.lock()
            .insert_key(Zeroizing::new(bytes.to_vec()), purpose)
            .unwrap()
    }
}

impl State {
    fn new() -> Self {
        Self {
            bdks: BTreeMap::new(),
            keys: HashMap::new(),
            ec_keys: HashMap::new(),
            ec_labels: BTreeMap::new(),
            persisted: BTreeMap::new(),
            next_id: 1,
        }
    }

    /// A fresh handle number, if there is room for one more transient key.
    fn next_id(&mut self) -> Result<u64, KeystoreError> {
        if self.keys.len() + self.ec_keys.len() >= TRANSIENT_KEYS_MAX {
            return Err(KeystoreError::InvalidInput {
                what: "too many keys alive in the software keystore: destroy transient keys after use",
            });
        }
        let id = self.next_id;
        self.next_id = id.checked_add(1).ok_or(KeystoreError::InvalidInput {
            what: "software keystore ran out of handle numbers",
        })?;
        Ok(id)
    }

    /// Stores a transient symmetric key.
    fn insert_key(
        &mut self,
        bytes: Zeroizing<Vec<u8>>,
        purpose: KeyPurpose,
    ) -> Result<KeyHandle, KeystoreError> {
        let algorithm = KeyAlgorithm::from_key_bytes(bytes.len())?;
        let id = self.next_id()?;
        self.keys.insert(
            id,
            SymmetricKey {
                bytes,
                algorithm,
                purpose,
            },
        );
        Ok(KeyHandle::new(id, algorithm))
    }

    /// The key behind `handle`, if it may do `operation`.
    fn key(
        &self,
        handle: &KeyHandle,
        operation: Operation,
    ) -> Result<&SymmetricKey, KeystoreError> {
        let key = self
            .keys
            .get(&handle.id())
            .filter(|key| key.algorithm == handle.algorithm())
            .ok_or(KeystoreError::UnknownKey)?;
        if !operation.permitted_for(key.purpose) {
            return Err(KeystoreError::KeyNotPermitted);
        }
        Ok(key)
    }

    fn ec_key(&self, handle: &PrivateKeyHandle) -> Result<&EcKey, KeystoreError> {
        self.ec_keys
            .get(&handle.id())
            .ok_or(KeystoreError::UnknownKey)
    }
}

impl Keystore for SoftwareKeystore {
    fn generate_bdk(
        &self,
        bdk_id: BdkId,
        algorithm: KeyAlgorithm,
    ) -> Result<BdkInfo, KeystoreError> {
        let mut key = Zeroizing::new(vec![0u8; algorithm.key_bytes()]);
        getrandom::fill(&mut key).map_err(random_error)?;
        self.add_bdk(bdk_id, algorithm, key)
    }

    fn import_bdk(
        &self,
        bdk_id: BdkId,
        key: &Zeroizing<Vec<u8>>,
    ) -> Result<BdkInfo, KeystoreError> {
        let algorithm =
            KeyAlgorithm::from_key_bytes(key.len()).map_err(|_| KeystoreError::InvalidInput {
                what: "a BDK must be 16, 24 or 32 bytes",
            })?;
        self.add_bdk(bdk_id, algorithm, key.clone())
    }

    fn bdk_info(&self, bdk_id: BdkId) -> Result<BdkInfo, KeystoreError> {
        self.lock()
            .bdks
            .get(&bdk_id)
            .map(|bdk| bdk.info.clone())
            .ok_or(KeystoreError::UnknownBdk(bdk_id))
    }

    fn list_bdks(&self) -> Result<Vec<BdkInfo>, KeystoreError> {
        // A `BTreeMap` keyed by BDK ID: already in order.
        Ok(self
            .lock()
            .bdks
            .values()
            .map(|bdk| bdk.info.clone())
            .collect())
    }

    fn derive(
        &self,
        base: DeriveBase<'_>,
        data: &DerivationData,
        purpose: KeyPurpose,
    ) -> Result<KeyHandle, KeystoreError> {
        let mut state = self.lock();
        let base_key = match base {
            DeriveBase::Bdk(bdk_id) => {
                &state
                    .bdks
                    .get(&bdk_id)
                    .ok_or(KeystoreError::UnknownBdk(bdk_id))?
                    .key
            }
            DeriveBase::Key(handle) => &state.key(handle, Operation::Derive)?.bytes,
        };
        let mut derived = crypto::ecb_encrypt(base_key, data.as_bytes())?;
        derived.truncate(data.derived_algorithm().key_bytes());
        state.insert_key(derived, purpose)
    }

    fn gcm_encrypt(
        &self,
        key: &KeyHandle,
        nonce: &[u8; GCM_NONCE_BYTES],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, KeystoreError> {
        let state = self.lock();
        crypto::gcm_encrypt(
            &state.key(key, Operation::Gcm)?.bytes,
            nonce,
            aad,
            plaintext,
        )
    }

    fn gcm_decrypt(
        &self,
        key: &KeyHandle,
        nonce: &[u8; GCM_NONCE_BYTES],
        aad: &[u8],
        ciphertext_and_tag: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, KeystoreError> {
        let state = self.lock();
        crypto::gcm_decrypt(
            &state.key(key, Operation::Gcm)?.bytes,
            nonce,
            aad,
            ciphertext_and_tag,
        )
    }

    fn cmac_generate(
        &self,
        key: &KeyHandle,
        data: &[u8],
    ) -> Result<[u8; CMAC_BYTES], KeystoreError> {
        let state = self.lock();
        crypto::cmac(&state.key(key, Operation::Cmac)?.bytes, data)
    }

    fn cmac_verify(&self, key: &KeyHandle, data: &[u8], mac: &[u8]) -> Result<(), KeystoreError> {
        let state = self.lock();
        crypto::cmac_verify(&state.key(key, Operation::Cmac)?.bytes, data, mac)
    }

    fn kcv(&self, key: &KeyHandle) -> Result<Kcv, KeystoreError> {
        let state = self.lock();
        crypto::kcv(&state.key(key, Operation::Kcv)?.bytes)
    }

    fn generate_ec_p256(
        &self,
        label: &KeyLabel,
        persistent: bool,
    ) -> Result<(PrivateKeyHandle, EcPublicKey), KeystoreError> {
        let secret =
            p256::SecretKey::try_generate_from_rng(&mut getrandom::SysRng).map_err(random_error)?;
        let public = public_key_of(&secret)?;
        let mut state = self.lock();
        if persistent && state.ec_labels.contains_key(label.as_str()) {
            return Err(KeystoreError::InvalidInput {
                what: "a persistent key pair with this label already exists",
            });
        }
        let id = state.next_id()?;
        state.ec_keys.insert(
            id,
            EcKey {
                secret,
                public: public.clone(),
                label: persistent.then(|| label.clone()),
            },
        );
        if persistent {
            state.ec_labels.insert(label.as_str().to_owned(), id);
            if let Err(error) = self.save(&state) {
                state.ec_labels.remove(label.as_str());
                state.ec_keys.remove(&id);
                return Err(error);
            }
            tracing::info!(%label, "stored a P-256 key pair");
        }
        Ok((PrivateKeyHandle::new(id), public))
    }

    fn find_ec_p256(
        &self,
        label: &KeyLabel,
    ) -> Result<Option<(PrivateKeyHandle, EcPublicKey)>, KeystoreError> {
        let state = self.lock();
        Ok(state.ec_labels.get(label.as_str()).and_then(|id| {
            let ec_key = state.ec_keys.get(id)?;
            Some((PrivateKeyHandle::new(*id), ec_key.public.clone()))
        }))
    }

    fn sign_p256_sha256(
        &self,
        key: &PrivateKeyHandle,
        message: &[u8],
    ) -> Result<[u8; ECDSA_P256_SIGNATURE_BYTES], KeystoreError> {
        let signing_key = {
            let state = self.lock();
            p256::ecdsa::SigningKey::from(&state.ec_key(key)?.secret)
        };
        let signature: p256::ecdsa::Signature = signing_key.sign(message);
        Ok(signature.normalize_s().to_bytes().into())
    }

    fn ecdh_kek(
        &self,
        key: &PrivateKeyHandle,
        peer: &EcPublicKey,
        context: &[u8],
    ) -> Result<KeyHandle, KeystoreError> {
        let peer = p256::PublicKey::from_sec1_bytes(peer.as_bytes()).map_err(|_| {
            KeystoreError::InvalidInput {
                what: "EC public key must be an uncompressed P-256 point (65 bytes)",
            }
        })?;
        let mut state = self.lock();
        let shared = state.ec_key(key)?.secret.diffie_hellman(&peer);
        let shared_x = Zeroizing::new(shared.raw_secret_bytes().to_vec());
        drop(shared);
        let kek = crypto::ecb_encrypt(&shared_x, &Sha256::digest(context))?;
        state.insert_key(kek, KeyPurpose::Wrap)
    }

    fn wrap_key(&self, kek: &KeyHandle, key: &KeyHandle) -> Result<Vec<u8>, KeystoreError> {
        let state = self.lock();
        let kek = state.key(kek, Operation::WrapOrUnwrap)?;
        let key = state.key(key, Operation::BeWrapped)?;
        crypto::key_wrap(&kek.bytes, &key.bytes)
    }

    fn unwrap_key(
        &self,
        kek: &KeyHandle,
        wrapped: &[u8],
        algorithm: KeyAlgorithm,
        purpose: KeyPurpose,
    ) -> Result<KeyHandle, KeystoreError> {
        let mut state = self.lock();
        let kek = state.key(kek, Operation::WrapOrUnwrap)?;
        if wrapped.len() != algorithm.key_bytes() + crypto::KEY_WRAP_OVERHEAD_BYTES {
            return Err(KeystoreError::InvalidInput {
                what: "wrapped key length does not match the algorithm",
            });
        }
        let key = crypto::key_unwrap(&kek.bytes, wrapped)?;
        state.insert_key(key, purpose)
    }

    fn destroy(&self, key: KeyHandle) -> Result<(), KeystoreError> {
        let mut state = self.lock();
        match state.keys.get(&key.id()) {
            Some(entry) if entry.algorithm == key.algorithm() => {
                state.keys.remove(&key.id());
                Ok(())
            }
            _ => Err(KeystoreError::UnknownKey),
        }
    }

    fn persist_key(&self, key: &KeyHandle, label: &KeyLabel) -> Result<(), KeystoreError> {
        let mut state = self.lock();
        let source = state
            .keys
            .get(&key.id())
            .filter(|source| source.algorithm == key.algorithm())
            .ok_or(KeystoreError::UnknownKey)?;
        let copy = SymmetricKey {
            bytes: source.bytes.clone(),
            algorithm: source.algorithm,
            purpose: source.purpose,
        };
        if state.persisted.len() >= PERSISTENT_KEYS_MAX
            && !state.persisted.contains_key(label.as_str())
        {
            return Err(KeystoreError::InvalidInput {
                what: "too many persistent keys in the software keystore",
            });
        }
        // The replaced key (if any) stays in memory until the new file is saved.
        let replaced = state.persisted.insert(label.as_str().to_owned(), copy);
        if let Err(error) = self.save(&state) {
            match replaced {
                Some(replaced) => state.persisted.insert(label.as_str().to_owned(), replaced),
                None => state.persisted.remove(label.as_str()),
            };
            return Err(error);
        }
        tracing::debug!(%label, replaced = replaced.is_some(), "stored a persistent key");
        Ok(())
    }

    fn load_key(&self, label: &KeyLabel) -> Result<Option<KeyHandle>, KeystoreError> {
        let mut state = self.lock();
        let Some(stored) = state.persisted.get(label.as_str()) else {
            return Ok(None);
        };
        let (bytes, purpose) = (stored.bytes.clone(), stored.purpose);
        state.insert_key(bytes, purpose).map(Some)
    }

    fn delete_key(&self, label: &KeyLabel) -> Result<bool, KeystoreError> {
        let mut state = self.lock();
        let Some(removed) = state.persisted.remove(label.as_str()) else {
            return Ok(false);
        };
        if let Err(error) = self.save(&state) {
            state.persisted.insert(label.as_str().to_owned(), removed);
            return Err(error);
        }
        // Dropping the `Zeroizing` buffer erases the bytes.
        drop(removed);
        tracing::debug!(%label, "deleted a persistent key");
        Ok(true)
    }

    fn destroy_ec(&self, key: PrivateKeyHandle) -> Result<(), KeystoreError> {
        let mut state = self.lock();
        let removed = state
            .ec_keys
            .remove(&key.id())
            .ok_or(KeystoreError::UnknownKey)?;
        let Some(label) = &removed.label else {
            return Ok(());
        };
        state.ec_labels.remove(label.as_str());
        if let Err(error) = self.save(&state) {
            state.ec_labels.insert(label.as_str().to_owned(), key.id());
            state.ec_keys.insert(key.id(), removed);
            return Err(error);
        }
        tracing::info!(%label, "destroyed a P-256 key pair");
        Ok(())
    }

    fn check_health(&self) -> Result<(), KeystoreError> {
        match &self.file {
            Some(file) => file.check(),
            None => Ok(()),
        }
    }
}

/// The uncompressed SEC1 encoding of `secret`'s public key.
fn public_key_of(secret: &p256::SecretKey) -> Result<EcPublicKey, KeystoreError> {
    let point = secret.public_key().to_sec1_point(false);
    EcPublicKey::try_from(point.as_bytes())
}

fn unix_seconds_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            i64::try_from(elapsed.as_secs()).unwrap_or(i64::MAX)
        })
}

fn random_error(error: getrandom::Error) -> KeystoreError {
    KeystoreError::Io {
        path: "system random number generator".to_owned(),
        message: "no random bytes".to_owned(),
        source: Some(std::io::Error::other(error)),
    }
}

#[cfg(test)]
mod tests;
