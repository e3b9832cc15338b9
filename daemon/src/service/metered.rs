//! A [`Keystore`] that counts and times what it asks of the HSM, by operation, for `/metrics`
//! (`nfcpayd_hsm_operations_total{operation="derive"}`, …, and
//! `nfcpayd_hsm_operation_duration_seconds`): the figures that tell an operator how much HSM
//! capacity each payment costs and how fast the HSM answers, and the load generator its HSM
//! bound.

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
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use zeroize::Zeroizing;

/// Labels of `nfcpayd_hsm_operations_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct OperationLabels {
    operation: &'static str,
}

/// Histograms of `nfcpayd_hsm_operation_duration_seconds`, by operation.
pub type OperationDurations = Family<OperationLabels, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    // 50 µs (a cached software operation) to about 1.6 s (a network HSM in trouble).
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

/// Counts and times each call into the wrapped keystore.
pub struct MeteredKeystore {
    inner: Arc<dyn Keystore>,
    operations: Family<OperationLabels, Counter>,
    durations: OperationDurations,
}

impl MeteredKeystore {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Keystore>) -> Self {
        Self {
            inner,
            operations: Family::default(),
            durations: OperationDurations::new_with_constructor(duration_histogram),
        }
    }

    /// The duration histograms, to register with the front end's metrics.
    pub fn durations(&self) -> OperationDurations {
        self.durations.clone()
    }

    /// How many `operation` calls were made (for tests).
    #[cfg(test)]
    pub(crate) fn count(&self, operation: &'static str) -> u64 {
        self.operations
            .get_or_create(&OperationLabels { operation })
            .get()
    }

    /// The counters, to register with the front end's metrics.
    pub fn operations(&self) -> Family<OperationLabels, Counter> {
        self.operations.clone()
    }

    /// Counts `operation`, makes it, and records how long it took (failures too: a slow
    /// failing HSM is what an operator needs to see).
    fn timed<T>(&self, operation: &'static str, call: impl FnOnce(&dyn Keystore) -> T) -> T {
        let labels = OperationLabels { operation };
        self.operations.get_or_create(&labels).inc();
        let started = std::time::Instant::now();
        let result = call(self.inner.as_ref());
        self.durations
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
        result
    }
}

impl Keystore for MeteredKeystore {
    fn generate_bdk(
        &self,
        bdk_id: BdkId,
        algorithm: KeyAlgorithm,
    ) -> Result<BdkInfo, KeystoreError> {
        self.timed("generate_bdk", |keystore| {
            keystore.generate_bdk(bdk_id, algorithm)
        })
    }

    fn import_bdk(
        &self,
        bdk_id: BdkId,
        key: &Zeroizing<Vec<u8>>,
    ) -> Result<BdkInfo, KeystoreError> {
        self.timed("import_bdk", |keystore| keystore.import_bdk(bdk_id, key))
    }

    fn bdk_info(&self, bdk_id: BdkId) -> Result<BdkInfo, KeystoreError> {
        // Cached by the backends after the first lookup: not an HSM operation.
        self.inner.bdk_info(bdk_id)
    }

    fn list_bdks(&self) -> Result<Vec<BdkInfo>, KeystoreError> {
        self.timed("list_bdks", |keystore| keystore.list_bdks())
    }

    fn derive(
        &self,
        base: DeriveBase<'_>,
        data: &DerivationData,
        purpose: KeyPurpose,
    ) -> Result<KeyHandle, KeystoreError> {
        self.timed("derive", |keystore| keystore.derive(base, data, purpose))
    }

    fn gcm_encrypt(
        &self,
        key: &KeyHandle,
        nonce: &[u8; GCM_NONCE_BYTES],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, KeystoreError> {
        self.timed("gcm_encrypt", |keystore| {
            keystore.gcm_encrypt(key, nonce, aad, plaintext)
        })
    }

    fn gcm_decrypt(
        &self,
        key: &KeyHandle,
        nonce: &[u8; GCM_NONCE_BYTES],
        aad: &[u8],
        ciphertext_and_tag: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, KeystoreError> {
        self.timed("gcm_decrypt", |keystore| {
            keystore.gcm_decrypt(key, nonce, aad, ciphertext_and_tag)
        })
    }

    fn cmac_generate(
        &self,
        key: &KeyHandle,
        data: &[u8],
    ) -> Result<[u8; CMAC_BYTES], KeystoreError> {
        self.timed("cmac_generate", |keystore| {
            keystore.cmac_generate(key, data)
        })
    }

    fn cmac_verify(&self, key: &KeyHandle, data: &[u8], mac: &[u8]) -> Result<(), KeystoreError> {
        self.timed("cmac_verify", |keystore| {
            keystore.cmac_verify(key, data, mac)
        })
    }

    fn kcv(&self, key: &KeyHandle) -> Result<Kcv, KeystoreError> {
        self.timed("kcv", |keystore| keystore.kcv(key))
    }

    fn generate_ec_p256(
        &self,
        label: &KeyLabel,
        persistent: bool,
    ) -> Result<(PrivateKeyHandle, EcPublicKey), KeystoreError> {
        self.timed("generate_ec_p256", |keystore| {
            keystore.generate_ec_p256(label, persistent)
        })
    }

    fn find_ec_p256(
        &self,
        label: &KeyLabel,
    ) -> Result<Option<(PrivateKeyHandle, EcPublicKey)>, KeystoreError> {
        self.timed("find_ec_p256", |keystore| keystore.find_ec_p256(label))
    }

    fn sign_p256_sha256(
        &self,
        key: &PrivateKeyHandle,
        message: &[u8],
    ) -> Result<[u8; ECDSA_P256_SIGNATURE_BYTES], KeystoreError> {
        self.timed("sign", |keystore| keystore.sign_p256_sha256(key, message))
    }

    fn ecdh_kek(
        &self,
        key: &PrivateKeyHandle,
        peer: &EcPublicKey,
        context: &[u8],
    ) -> Result<KeyHandle, KeystoreError> {
        self.timed("ecdh", |keystore| keystore.ecdh_kek(key, peer, context))
    }

    fn wrap_key(&self, kek: &KeyHandle, key: &KeyHandle) -> Result<Vec<u8>, KeystoreError> {
        self.timed("wrap", |keystore| keystore.wrap_key(kek, key))
    }

    fn unwrap_key(
        &self,
        kek: &KeyHandle,
        wrapped: &[u8],
        algorithm: KeyAlgorithm,
        purpose: KeyPurpose,
    ) -> Result<KeyHandle, KeystoreError> {
        self.timed("unwrap", |keystore| {
            keystore.unwrap_key(kek, wrapped, algorithm, purpose)
        })
    }

    fn destroy(&self, key: KeyHandle) -> Result<(), KeystoreError> {
        self.timed("destroy", |keystore| keystore.destroy(key))
    }

    fn persist_key(&self, key: &KeyHandle, label: &KeyLabel) -> Result<(), KeystoreError> {
        self.timed("persist_key", |keystore| keystore.persist_key(key, label))
    }

    fn load_key(&self, label: &KeyLabel) -> Result<Option<KeyHandle>, KeystoreError> {
        self.timed("load_key", |keystore| keystore.load_key(label))
    }

    fn delete_key(&self, label: &KeyLabel) -> Result<bool, KeystoreError> {
        self.timed("delete_key", |keystore| keystore.delete_key(label))
    }

    fn destroy_ec(&self, key: PrivateKeyHandle) -> Result<(), KeystoreError> {
        self.timed("destroy_ec", |keystore| keystore.destroy_ec(key))
    }

    fn check_health(&self) -> Result<(), KeystoreError> {
        self.timed("check_health", |keystore| keystore.check_health())
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

    #[test]
    fn each_call_is_timed_by_operation_failures_too() {
        let store = MeteredKeystore::new(Arc::new(SoftwareKeystore::in_memory()));
        let label: KeyLabel = "metered".parse().unwrap();
        let (key, _) = store.generate_ec_p256(&label, false).unwrap();
        store.sign_p256_sha256(&key, b"one").unwrap();
        store.destroy_ec(key).unwrap();
        assert!(store.find_ec_p256(&label).unwrap().is_none());
        assert!(store.list_bdks().unwrap().is_empty());
        let short_key = Zeroizing::new(vec![0u8; 5]);
        assert!(
            store
                .import_bdk("0A0B0C0D".parse().unwrap(), &short_key)
                .is_err()
        );
        let mut registry = Registry::default();
        registry.register("hsm_duration_seconds", "HSM time", store.durations());
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        for operation in [
            "generate_ec_p256",
            "sign",
            "destroy_ec",
            "find_ec_p256",
            "list_bdks",
        ] {
            assert!(
                text.contains(&format!(
                    "hsm_duration_seconds_count{{operation=\"{operation}\"}} 1"
                )),
                "{operation}: {text}"
            );
        }
    }
}
