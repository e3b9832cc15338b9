//! The [`Keystore`] implementation: one line per method, each naming the file that does the
//! work (`bdks`, `symmetric`, `ec_keys`, `persistent`, or the store itself for health).
//!
//! Nothing happens here: a reader looking for what a method does follows its line; a new
//! trait method gets its line here and its body in the file of its kind.

use nfcpay_protocol::BdkId;
use nfcpay_protocol::dukpt::{DerivationData, KeyAlgorithm};
use zeroize::Zeroizing;

use super::{Pkcs11Keystore, bdks, ec_keys, persistent, symmetric};
use crate::{
    BdkInfo, CMAC_BYTES, DeriveBase, ECDSA_P256_SIGNATURE_BYTES, EcPublicKey, GCM_NONCE_BYTES, Kcv,
    KeyHandle, KeyLabel, KeyPurpose, Keystore, KeystoreError, PrivateKeyHandle,
};

impl Keystore for Pkcs11Keystore {
    fn generate_bdk(
        &self,
        bdk_id: BdkId,
        algorithm: KeyAlgorithm,
    ) -> Result<BdkInfo, KeystoreError> {
        bdks::generate(self, bdk_id, algorithm)
    }

    fn import_bdk(
        &self,
        bdk_id: BdkId,
        key: &Zeroizing<Vec<u8>>,
    ) -> Result<BdkInfo, KeystoreError> {
        bdks::import(self, bdk_id, key)
    }

    fn bdk_info(&self, bdk_id: BdkId) -> Result<BdkInfo, KeystoreError> {
        bdks::info(self, bdk_id)
    }

    fn list_bdks(&self) -> Result<Vec<BdkInfo>, KeystoreError> {
        bdks::list(self)
    }

    fn derive(
        &self,
        base: DeriveBase<'_>,
        data: &DerivationData,
        purpose: KeyPurpose,
    ) -> Result<KeyHandle, KeystoreError> {
        bdks::derive(self, base, data, purpose)
    }

    fn gcm_encrypt(
        &self,
        key: &KeyHandle,
        nonce: &[u8; GCM_NONCE_BYTES],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, KeystoreError> {
        symmetric::gcm_encrypt(self, key, nonce, aad, plaintext)
    }

    fn gcm_decrypt(
        &self,
        key: &KeyHandle,
        nonce: &[u8; GCM_NONCE_BYTES],
        aad: &[u8],
        ciphertext_and_tag: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, KeystoreError> {
        symmetric::gcm_decrypt(self, key, nonce, aad, ciphertext_and_tag)
    }

    fn cmac_generate(
        &self,
        key: &KeyHandle,
        data: &[u8],
    ) -> Result<[u8; CMAC_BYTES], KeystoreError> {
        symmetric::cmac_generate(self, key, data)
    }

    fn cmac_verify(&self, key: &KeyHandle, data: &[u8], mac: &[u8]) -> Result<(), KeystoreError> {
        symmetric::cmac_verify(self, key, data, mac)
    }

    fn kcv(&self, key: &KeyHandle) -> Result<Kcv, KeystoreError> {
        symmetric::kcv(self, key)
    }

    fn generate_ec_p256(
        &self,
        label: &KeyLabel,
        persistent: bool,
    ) -> Result<(PrivateKeyHandle, EcPublicKey), KeystoreError> {
        ec_keys::generate(self, label, persistent)
    }

    fn find_ec_p256(
        &self,
        label: &KeyLabel,
    ) -> Result<Option<(PrivateKeyHandle, EcPublicKey)>, KeystoreError> {
        ec_keys::find(self, label)
    }

    fn sign_p256_sha256(
        &self,
        key: &PrivateKeyHandle,
        message: &[u8],
    ) -> Result<[u8; ECDSA_P256_SIGNATURE_BYTES], KeystoreError> {
        ec_keys::sign(self, key, message, ec_keys::PairObject::Working)
    }

    fn ecdh_kek(
        &self,
        key: &PrivateKeyHandle,
        peer: &EcPublicKey,
        context: &[u8],
    ) -> Result<KeyHandle, KeystoreError> {
        ec_keys::ecdh_kek(self, key, peer, context)
    }

    fn wrap_key(&self, kek: &KeyHandle, key: &KeyHandle) -> Result<Vec<u8>, KeystoreError> {
        symmetric::wrap_key(self, kek, key)
    }

    fn unwrap_key(
        &self,
        kek: &KeyHandle,
        wrapped: &[u8],
        algorithm: KeyAlgorithm,
        purpose: KeyPurpose,
    ) -> Result<KeyHandle, KeystoreError> {
        symmetric::unwrap_key(self, kek, wrapped, algorithm, purpose)
    }

    fn destroy(&self, key: KeyHandle) -> Result<(), KeystoreError> {
        symmetric::destroy(self, key)
    }

    fn persist_key(&self, key: &KeyHandle, label: &KeyLabel) -> Result<(), KeystoreError> {
        persistent::persist(self, key, label)
    }

    fn load_key(&self, label: &KeyLabel) -> Result<Option<KeyHandle>, KeystoreError> {
        persistent::load(self, label)
    }

    fn delete_key(&self, label: &KeyLabel) -> Result<bool, KeystoreError> {
        persistent::delete(self, label)
    }

    fn destroy_ec(&self, key: PrivateKeyHandle) -> Result<(), KeystoreError> {
        ec_keys::destroy(self, key)
    }

    fn check_health(&self) -> Result<(), KeystoreError> {
        self.health()
    }
}
