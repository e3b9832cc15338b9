//! Key management for nfcpay: one [`Keystore`] trait, two backends, AES DUKPT on top.
//!
//! # Layout
//!
//! - [`Keystore`]: what the platform and a terminal need from a key store — BDKs, AES key
//!   derivation, AES-GCM and AES-CMAC with a handle, key check values, ECDSA P-256, ECDH and
//!   AES key wrap. Keys are addressed by opaque handles; their bytes never cross the trait.
//! - [`pkcs11`]: the backend for any PKCS#11 module (SoftHSM2 in tests, a network HSM in
//!   production), through `cryptoki`; every key lives in the token.
//! - [`software`]: the backend for development and for terminals without a token; key bytes
//!   in zeroizing memory, state saved atomically to a 0600 file.
//! - [`dukpt`]: the ANSI X9.24-3-2017 host derivation (initial key, transaction key, working
//!   keys) and the terminal adapter, written once against the trait, so with PKCS#11 the whole
//!   derivation runs inside the token.
//! - `key_pair` (feature `tls`): a P-256 key pair in the store as an rcgen signer and a
//!   rustls signing key.
//! - [`uri`]: RFC 7512 `pkcs11:` URIs with `module-path` and `pin-source`.
//! - [`error`]: [`KeystoreError`], the crate's one error type (and [`ModuleLoadError`], why a
//!   PKCS#11 module did not load).
//! - [`atomic_file`]: replacing a file atomically and durably, for every crate that saves one.

pub mod atomic_file;
pub mod components;
pub mod config;
pub mod dukpt;
pub mod error;
#[cfg(feature = "tls")]
pub mod key_pair;
pub mod pkcs11;
pub mod software;
#[cfg(feature = "testing")]
pub mod testing;
pub mod types;
pub mod uri;

pub use config::{KeystoreConfig, open};
pub use error::{KeystoreError, ModuleLoadError};
pub use types::{
    BdkInfo, DeriveBase, EcPublicKey, Kcv, KeyHandle, KeyLabel, KeyPurpose, PrivateKeyHandle,
};

use nfcpay_protocol::BdkId;
use nfcpay_protocol::dukpt::{DerivationData, KeyAlgorithm};
use zeroize::Zeroizing;

/// Length of an AES-GCM nonce, in bytes.
pub const GCM_NONCE_BYTES: usize = 12;
/// Length of an AES-GCM tag, in bytes.
pub const GCM_TAG_BYTES: usize = 16;
/// Length of an AES-CMAC, in bytes.
pub const CMAC_BYTES: usize = 16;
/// Length of a raw ECDSA P-256 signature (r ‖ s), in bytes.
pub const ECDSA_P256_SIGNATURE_BYTES: usize = 64;

/// A key store. Every method is blocking: async callers run them on blocking threads.
///
/// Symmetric keys made by [`Keystore::derive`], [`Keystore::unwrap_key`] and
/// [`Keystore::ecdh_kek`] are transient (session objects in PKCS#11): the caller destroys
/// them with [`Keystore::destroy`] when done. BDKs and named EC key pairs are persistent, and
/// so are symmetric keys stored by label with [`Keystore::persist_key`].
pub trait Keystore: Send + Sync {
    /// Generates a BDK inside the store: sensitive, never extractable, usable only to derive.
    fn generate_bdk(
        &self,
        bdk_id: BdkId,
        algorithm: KeyAlgorithm,
    ) -> Result<BdkInfo, KeystoreError>;

    /// Stores `key` (the already combined clear components) as a BDK, like a generated one.
    /// The caller zeroizes its copy; the store keeps none outside the key object.
    fn import_bdk(&self, bdk_id: BdkId, key: &Zeroizing<Vec<u8>>)
    -> Result<BdkInfo, KeystoreError>;

    /// One BDK's description (looked up once, then cached).
    fn bdk_info(&self, bdk_id: BdkId) -> Result<BdkInfo, KeystoreError>;

    /// Every BDK in the store, ordered by BDK ID.
    fn list_bdks(&self) -> Result<Vec<BdkInfo>, KeystoreError>;

    /// Derives a transient AES key: AES-ECB of `data` under `base`, truncated to
    /// `data.derived_algorithm()`, with the attributes `purpose` allows.
    fn derive(
        &self,
        base: DeriveBase<'_>,
        data: &DerivationData,
        purpose: KeyPurpose,
    ) -> Result<KeyHandle, KeystoreError>;

    /// AES-GCM encryption with a 12-byte nonce; returns ciphertext ‖ 16-byte tag.
    fn gcm_encrypt(
        &self,
        key: &KeyHandle,
        nonce: &[u8; GCM_NONCE_BYTES],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, KeystoreError>;

    /// AES-GCM decryption of ciphertext ‖ tag; [`KeystoreError::AuthenticationFailed`] when the
    /// tag does not verify.
    fn gcm_decrypt(
        &self,
        key: &KeyHandle,
        nonce: &[u8; GCM_NONCE_BYTES],
        aad: &[u8],
        ciphertext_and_tag: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, KeystoreError>;

    /// AES-CMAC of `data`.
    fn cmac_generate(
        &self,
        key: &KeyHandle,
        data: &[u8],
    ) -> Result<[u8; CMAC_BYTES], KeystoreError>;

    /// Checks an AES-CMAC; [`KeystoreError::AuthenticationFailed`] when it does not match.
    fn cmac_verify(&self, key: &KeyHandle, data: &[u8], mac: &[u8]) -> Result<(), KeystoreError>;

    /// The key check value of a key made with [`KeyPurpose::Check`] or [`KeyPurpose::Mac`].
    fn kcv(&self, key: &KeyHandle) -> Result<Kcv, KeystoreError>;

    /// Generates a P-256 key pair; persistent under `label` when `persistent`, else transient.
    fn generate_ec_p256(
        &self,
        label: &KeyLabel,
        persistent: bool,
    ) -> Result<(PrivateKeyHandle, EcPublicKey), KeystoreError>;

    /// Finds a persistent P-256 key pair by label.
    fn find_ec_p256(
        &self,
        label: &KeyLabel,
    ) -> Result<Option<(PrivateKeyHandle, EcPublicKey)>, KeystoreError>;

    /// ECDSA over SHA-256 of `message`; the raw signature r ‖ s.
    fn sign_p256_sha256(
        &self,
        key: &PrivateKeyHandle,
        message: &[u8],
    ) -> Result<[u8; ECDSA_P256_SIGNATURE_BYTES], KeystoreError>;

    /// Derives an AES-256 key-encryption key from ECDH between `key` and `peer`:
    /// the shared x-coordinate Z becomes a transient AES-256 key, and the KEK is
    /// AES-ECB under Z of the two blocks `SHA-256(context)` (see docs/key-management.md).
    fn ecdh_kek(
        &self,
        key: &PrivateKeyHandle,
        peer: &EcPublicKey,
        context: &[u8],
    ) -> Result<KeyHandle, KeystoreError>;

    /// Wraps `key` (made with [`KeyPurpose::Export`]) under `kek` with AES key wrap (RFC 3394).
    fn wrap_key(&self, kek: &KeyHandle, key: &KeyHandle) -> Result<Vec<u8>, KeystoreError>;

    /// Unwraps an AES key wrapped with [`Keystore::wrap_key`] into a transient key.
    fn unwrap_key(
        &self,
        kek: &KeyHandle,
        wrapped: &[u8],
        algorithm: KeyAlgorithm,
        purpose: KeyPurpose,
    ) -> Result<KeyHandle, KeystoreError>;

    /// Destroys a transient symmetric key.
    fn destroy(&self, key: KeyHandle) -> Result<(), KeystoreError>;

    /// Stores a copy of the transient key `key` as a persistent key labelled `label`, with the
    /// same algorithm and purpose (PKCS#11: a token object, still sensitive and never
    /// extractable). A persistent key already labelled `label` is replaced, and only once the
    /// new one exists. `key` stays a transient key of its own. Persistent symmetric keys are
    /// a namespace of their own: BDKs and P-256 key pairs are never found or replaced here.
    fn persist_key(&self, key: &KeyHandle, label: &KeyLabel) -> Result<(), KeystoreError>;

    /// A transient copy of the persistent key labelled `label` (same algorithm and purpose),
    /// or `None` when there is none. Destroy the copy with [`Keystore::destroy`].
    fn load_key(&self, label: &KeyLabel) -> Result<Option<KeyHandle>, KeystoreError>;

    /// Destroys the persistent key labelled `label` (its bytes are erased); `false` when there
    /// was none. Transient copies made by [`Keystore::load_key`] are not affected.
    fn delete_key(&self, label: &KeyLabel) -> Result<bool, KeystoreError>;

    /// Destroys a P-256 key pair (transient or persistent).
    fn destroy_ec(&self, key: PrivateKeyHandle) -> Result<(), KeystoreError>;

    /// Checks that the store answers (an HSM session is usable), for readiness probes.
    fn check_health(&self) -> Result<(), KeystoreError>;
}
