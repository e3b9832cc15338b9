//! A [`Keystore`] that counts what it asks of the HSM, by operation, for `/metrics`
//! (`nfcpayd_hsm_operations_total{operation="derive"}`, …): the figure that tells an operator
//! how much HSM capacity each payment costs, and the load generator its HSM bound.

use std::sync::Arc;

use nfcpay_keystore::{
    BdkInfo, CMAC_BYTES, DeriveBase, ECDSA_P256_SIGNATURE_BYTES, EcPublicKey, GCM_NONCE_BYTES, Kcv,
    KeyHandle, KeyLabel, KeyPurpose, Keystore, KeystoreError, PrivateKeyHandle,
};
use nfcpay_protocol::BdkId;
use nfcpay_protocol::dukpt::{DerivationData, KeyAlgorithm};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use zeroize::Zeroizing;

/// Labels of `nfcpayd_hsm_operations_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct OperationLabels {
    operation: &'static str,
}

/// Counts each call into the wrapped keystore, then makes it.
pub struct MeteredKeystore {
    inner: Arc<dyn Keystore>,
    operations: Family<OperationLabels, Counter>,
}

impl MeteredKeystore {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Keystore>) -> Self {
        Self {
            inner,
            operations: Family::default(),
        }
    }

    /// The counters, to register with the front end's metrics.
    pub fn operations(&self) -> Family<OperationLabels, Counter> {
        self.operations.clone()
    }

    fn count(&self, operation: &'static str) -> &dyn Keystore {
        self.operations
            .get_or_create(&OperationLabels { operation })
            .inc();
        self.inner.as_ref()
    }
}

impl Keystore for MeteredKeystore {
    fn generate_bdk(
        &self,
        bdk_id: BdkId,
        algorithm: KeyAlgorithm,
    ) -> Result<BdkInfo, KeystoreError> {
        self.count("generate_bdk").generate_bdk(bdk_id, algorithm)
    }

    fn import_bdk(
        &self,
        bdk_id: BdkId,
        key: &Zeroizing<Vec<u8>>,
    ) -> Result<BdkInfo, KeystoreError> {
        self.count("import_bdk").import_bdk(bdk_id, key)
    }

    fn bdk_info(&self, bdk_id: BdkId) -> Result<BdkInfo, KeystoreError> {
        // Cached by the backends after the first lookup: not an HSM operation.
        self.inner.bdk_info(bdk_id)
    }

    fn list_bdks(&self) -> Result<Vec<BdkInfo>, KeystoreError> {
        self.count("list_bdks").list_bdks()
    }

    fn derive(
        &self,
        base: DeriveBase<'_>,
        data: &DerivationData,
        purpose: KeyPurpose,
    ) -> Result<KeyHandle, KeystoreError> {
        self.count("derive").derive(base, data, purpose)
    }

    fn gcm_encrypt(
        &self,
        key: &KeyHandle,
        nonce: &[u8; GCM_NONCE_BYTES],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, KeystoreError> {
        self.count("gcm_encrypt")
            .gcm_encrypt(key, nonce, aad, plaintext)
    }

    fn gcm_decrypt(
        &self,
        key: &KeyHandle,
        nonce: &[u8; GCM_NONCE_BYTES],
        aad: &[u8],
        ciphertext_and_tag: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, KeystoreError> {
        self.count("gcm_decrypt")
            .gcm_decrypt(key, nonce, aad, ciphertext_and_tag)
    }

    fn cmac_generate(
        &self,
        key: &KeyHandle,
        data: &[u8],
    ) -> Result<[u8; CMAC_BYTES], KeystoreError> {
        self.count("cmac_generate").cmac_generate(key, data)
    }

    fn cmac_verify(&self, key: &KeyHandle, data: &[u8], mac: &[u8]) -> Result<(), KeystoreError> {
        self.count("cmac_verify").cmac_verify(key, data, mac)
    }

    fn kcv(&self, key: &KeyHandle) -> Result<Kcv, KeystoreError> {
        self.count("kcv").kcv(key)
    }

    fn generate_ec_p256(
        &self,
        label: &KeyLabel,
        persistent: bool,
    ) -> Result<(PrivateKeyHandle, EcPublicKey), KeystoreError> {
        self.count("generate_ec_p256")
            .generate_ec_p256(label, persistent)
    }

    fn find_ec_p256(
        &self,
        label: &KeyLabel,
    ) -> Result<Option<(PrivateKeyHandle, EcPublicKey)>, KeystoreError> {
        self.count("find_ec_p256").find_ec_p256(label)
    }

    fn sign_p256_sha256(
        &self,
        key: &PrivateKeyHandle,
        message: &[u8],
    ) -> Result<[u8; ECDSA_P256_SIGNATURE_BYTES], KeystoreError> {
        self.count("sign").sign_p256_sha256(key, message)
    }

    fn ecdh_kek(
        &self,
        key: &PrivateKeyHandle,
        peer: &EcPublicKey,
        context: &[u8],
    ) -> Result<KeyHandle, KeystoreError> {
        self.count("ecdh").ecdh_kek(key, peer, context)
    }

    fn wrap_key(&self, kek: &KeyHandle, key: &KeyHandle) -> Result<Vec<u8>, KeystoreError> {
        self.count("wrap").wrap_key(kek, key)
    }

    fn unwrap_key(
        &self,
        kek: &KeyHandle,
        wrapped: &[u8],
        algorithm: KeyAlgorithm,
        purpose: KeyPurpose,
    ) -> Result<KeyHandle, KeystoreError> {
        self.count("unwrap")
            .unwrap_key(kek, wrapped, algorithm, purpose)
    }

    fn destroy(&self, key: KeyHandle) -> Result<(), KeystoreError> {
        self.count("destroy").destroy(key)
    }

    fn persist_key(&self, key: &KeyHandle, label: &KeyLabel) -> Result<(), KeystoreError> {
        self.count("persist_key").persist_key(key, label)
    }

    fn load_key(&self, label: &KeyLabel) -> Result<Option<KeyHandle>, KeystoreError> {
        self.count("load_key").load_key(label)
    }

    fn delete_key(&self, label: &KeyLabel) -> Result<bool, KeystoreError> {
        self.count("delete_key").delete_key(label)
    }

    fn destroy_ec(&self, key: PrivateKeyHandle) -> Result<(), KeystoreError> {
        self.count("destroy_ec").destroy_ec(key)
    }

    fn check_health(&self) -> Result<(), KeystoreError> {
        self.count("check_health").check_health()
    }
}

#[cfg(test)]
mod tests {
    use nfcpay_keystore::software::SoftwareKeystore;
    use prometheus_client::encoding::text::encode;
    use prometheus_client::registry::Registry;

    use super::*;

    #[test]
    fn each_call_is_counted_by_operation() {
        let store = MeteredKeystore::new(Arc::new(SoftwareKeystore::in_memory()));
        let label: KeyLabel = "metered".parse().unwrap();
        let (key, _) = store.generate_ec_p256(&label, false).unwrap();
        store.sign_p256_sha256(&key, b"one").unwrap();
        store.sign_p256_sha256(&key, b"two").unwrap();
        let mut registry = Registry::default();
        registry.register("hsm_operations", "HSM operations", store.operations());
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("hsm_operations_total{operation=\"sign\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("hsm_operations_total{operation=\"generate_ec_p256\"} 1"),
            "{text}"
        );
    }
}
