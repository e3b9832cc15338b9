//! Test support for this crate's tests and the crates that build on it (feature `testing`;
//! never enabled in a shipped binary): a keystore that fails on cue ([`FailingKeystore`]), a
//! throwaway SoftHSM2 directory ([`SoftHsmDir`]) and the PIN-key checks the DUKPT tests
//! make.

mod softhsm;

pub use softhsm::{SOFTHSM2_MODULE, SoftHsmDir, token_uri};

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use nfcpay_protocol::dukpt::{DerivationData, KeyAlgorithm, WorkingKeyUsage};
use nfcpay_protocol::{BdkId, Ksn};
use zeroize::Zeroizing;

use crate::dukpt::{TransientKey, working_key, working_key_from};
use crate::{
    BdkInfo, CMAC_BYTES, DeriveBase, ECDSA_P256_SIGNATURE_BYTES, EcPublicKey, GCM_NONCE_BYTES, Kcv,
    KeyHandle, KeyLabel, KeyPurpose, Keystore, KeystoreError, PrivateKeyHandle,
};

/// The KCV of the PIN-encryption key of `ksn` that `store` derives from `transaction_key` (a
/// terminal's transaction or register key): how a test compares a terminal's key with the
/// host's ([`host_pin_key_kcv`]) without either revealing it.
pub fn pin_key_kcv(
    store: &dyn Keystore,
    transaction_key: &KeyHandle,
    ksn: Ksn,
) -> Result<Kcv, KeystoreError> {
    let pin_key = working_key_from(
        store,
        transaction_key,
        ksn,
        WorkingKeyUsage::PinEncryption,
        None,
        KeyPurpose::Check,
    )?;
    let pin_key = TransientKey::new(store, pin_key);
    store.kcv(pin_key.handle())
}

/// The KCV of the PIN-encryption key of `ksn` that the host derives from the BDK in `host`.
pub fn host_pin_key_kcv(host: &dyn Keystore, ksn: Ksn) -> Result<Kcv, KeystoreError> {
    let pin_key = working_key(
        host,
        ksn,
        WorkingKeyUsage::PinEncryption,
        None,
        KeyPurpose::Check,
    )?;
    let pin_key = TransientKey::new(host, pin_key);
    host.kcv(pin_key.handle())
}

/// Checks a terminal's transaction after a crash: its KSN comes after every KSN in
/// `handed_out` (no counter is ever used twice), and its key in `terminal` derives the same PIN
/// key as the host's BDK in `host`; then records the KSN in `handed_out`. `context` says which
/// crash, for the failure message.
#[allow(clippy::expect_used)] // A failed check fails the test that asked for it.
pub fn assert_fresh_transaction(
    terminal: &dyn Keystore,
    host: &dyn Keystore,
    handed_out: &mut Vec<Ksn>,
    (ksn, key): (Ksn, &KeyHandle),
    context: &str,
) {
    assert!(
        handed_out.iter().all(|earlier| *earlier < ksn),
        "{ksn} after {context}"
    );
    assert_eq!(
        pin_key_kcv(terminal, key, ksn).expect("the terminal derives its PIN key"),
        host_pin_key_kcv(host, ksn).expect("the host derives the PIN key"),
        "{ksn} after {context}"
    );
    handed_out.push(ksn);
}

/// A keystore that, once [armed](Self::arm), fails the `fail_at`-th call (counting from 0) to
/// the calls that change a terminal's key state (`derive`, `persist_key`, `delete_key`), like
/// a crash at that point; and whose signatures and health checks fail, panic or stall on cue
/// ([`Self::fault_signatures`], [`Self::fault_health_checks`]). Every other call goes to the
/// keystore it wraps.
pub struct FailingKeystore {
    inner: Arc<dyn Keystore>,
    armed: AtomicBool,
    calls: AtomicUsize,
    fail_at: usize,
    faults: Mutex<Faults>,
    /// Signalled whenever a fault is changed: a stalled call looks again.
    faults_changed: Condvar,
    sign_calls: AtomicUsize,
    health_calls: AtomicUsize,
}

/// What a faulted call does instead of its work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Fails with a device error (`CKR_DEVICE_ERROR`: the HSM is unavailable).
    Fail,
    /// Panics (a bug below the caller).
    Panic,
    /// Waits until the fault is changed (a stalled HSM), then does what the new setting says.
    Stall,
}

#[derive(Debug, Default, Clone, Copy)]
struct Faults {
    sign: Option<Fault>,
    health: Option<Fault>,
}

impl FailingKeystore {
    /// Wraps `inner`, disarmed, to fail the `fail_at`-th state-changing call once armed.
    pub fn new(inner: Arc<dyn Keystore>, fail_at: usize) -> Self {
        Self {
            inner,
            armed: AtomicBool::new(false),
            calls: AtomicUsize::new(0),
            fail_at,
            faults: Mutex::new(Faults::default()),
            faults_changed: Condvar::new(),
            sign_calls: AtomicUsize::new(0),
            health_calls: AtomicUsize::new(0),
        }
    }

    /// From now on every `sign_p256_sha256` does `fault` (`None`: signs again); a stalled
    /// signature goes on once this is called again.
    pub fn fault_signatures(&self, fault: Option<Fault>) {
        self.set_faults(|faults| faults.sign = fault);
    }

    /// From now on every `check_health` does `fault` (`None`: checks again); a stalled check
    /// goes on once this is called again.
    pub fn fault_health_checks(&self, fault: Option<Fault>) {
        self.set_faults(|faults| faults.health = fault);
    }

    /// How many times `sign_p256_sha256` was called, faulted or not.
    pub fn sign_calls(&self) -> usize {
        self.sign_calls.load(Ordering::SeqCst)
    }

    /// How many times `check_health` was called, faulted or not.
    pub fn health_calls(&self) -> usize {
        self.health_calls.load(Ordering::SeqCst)
    }

    fn set_faults(&self, change: impl FnOnce(&mut Faults)) {
        change(&mut self.faults.lock().unwrap_or_else(PoisonError::into_inner));
        self.faults_changed.notify_all();
    }

    /// Does what `which` of the faults says, waiting while it says [`Fault::Stall`].
    fn faulted(
        &self,
        which: fn(&Faults) -> Option<Fault>,
        function: &'static str,
    ) -> Result<(), KeystoreError> {
        let mut faults = self.faults.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            match which(&faults) {
                None => return Ok(()),
                Some(Fault::Fail) => {
                    return Err(KeystoreError::Device {
                        function,
                        code: "CKR_DEVICE_ERROR".to_owned(),
                        source: None,
                    });
                }
                Some(Fault::Panic) => {
                    drop(faults);
                    panic!("injected panic in {function}");
                }
                Some(Fault::Stall) => {
                    faults = self
                        .faults_changed
                        .wait(faults)
                        .unwrap_or_else(PoisonError::into_inner);
                }
            }
        }
    }

    /// From now on, state-changing calls count towards `fail_at`.
    pub fn arm(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }

    fn step(&self) -> Result<(), KeystoreError> {
        if self.armed.load(Ordering::SeqCst)
            && self.calls.fetch_add(1, Ordering::SeqCst) == self.fail_at
        {
            return Err(KeystoreError::Io {
                path: "injected".to_owned(),
                message: "a crash".to_owned(),
                source: None,
            });
        }
        Ok(())
    }
}

impl Keystore for FailingKeystore {
    fn generate_bdk(&self, id: BdkId, a: KeyAlgorithm) -> Result<BdkInfo, KeystoreError> {
        self.inner.generate_bdk(id, a)
    }
    fn import_bdk(&self, id: BdkId, k: &Zeroizing<Vec<u8>>) -> Result<BdkInfo, KeystoreError> {
        self.inner.import_bdk(id, k)
    }
    fn bdk_info(&self, id: BdkId) -> Result<BdkInfo, KeystoreError> {
        self.inner.bdk_info(id)
    }
    fn list_bdks(&self) -> Result<Vec<BdkInfo>, KeystoreError> {
        self.inner.list_bdks()
    }
    fn derive(
        &self,
        base: DeriveBase<'_>,
        data: &DerivationData,
        purpose: KeyPurpose,
    ) -> Result<KeyHandle, KeystoreError> {
        self.step()?;
        self.inner.derive(base, data, purpose)
    }
    fn gcm_encrypt(
        &self,
        key: &KeyHandle,
        nonce: &[u8; GCM_NONCE_BYTES],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, KeystoreError> {
        self.inner.gcm_encrypt(key, nonce, aad, plaintext)
    }
    fn gcm_decrypt(
        &self,
        key: &KeyHandle,
        nonce: &[u8; GCM_NONCE_BYTES],
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, KeystoreError> {
        self.inner.gcm_decrypt(key, nonce, aad, sealed)
    }
    fn cmac_generate(
        &self,
        key: &KeyHandle,
        data: &[u8],
    ) -> Result<[u8; CMAC_BYTES], KeystoreError> {
        self.inner.cmac_generate(key, data)
    }
    fn cmac_verify(&self, key: &KeyHandle, data: &[u8], mac: &[u8]) -> Result<(), KeystoreError> {
        self.inner.cmac_verify(key, data, mac)
    }
    fn kcv(&self, key: &KeyHandle) -> Result<Kcv, KeystoreError> {
        self.inner.kcv(key)
    }
    fn generate_ec_p256(
        &self,
        label: &KeyLabel,
        persistent: bool,
    ) -> Result<(PrivateKeyHandle, EcPublicKey), KeystoreError> {
        self.inner.generate_ec_p256(label, persistent)
    }
    fn find_ec_p256(
        &self,
        label: &KeyLabel,
    ) -> Result<Option<(PrivateKeyHandle, EcPublicKey)>, KeystoreError> {
        self.inner.find_ec_p256(label)
    }
    fn sign_p256_sha256(
        &self,
        key: &PrivateKeyHandle,
        message: &[u8],
    ) -> Result<[u8; ECDSA_P256_SIGNATURE_BYTES], KeystoreError> {
        self.sign_calls.fetch_add(1, Ordering::SeqCst);
        self.faulted(|faults| faults.sign, "C_Sign")?;
        self.inner.sign_p256_sha256(key, message)
    }
    fn ecdh_kek(
        &self,
        key: &PrivateKeyHandle,
        peer: &EcPublicKey,
        context: &[u8],
    ) -> Result<KeyHandle, KeystoreError> {
        self.inner.ecdh_kek(key, peer, context)
    }
    fn wrap_key(&self, kek: &KeyHandle, key: &KeyHandle) -> Result<Vec<u8>, KeystoreError> {
        self.inner.wrap_key(kek, key)
    }
    fn unwrap_key(
        &self,
        kek: &KeyHandle,
        wrapped: &[u8],
        algorithm: KeyAlgorithm,
        purpose: KeyPurpose,
    ) -> Result<KeyHandle, KeystoreError> {
        self.inner.unwrap_key(kek, wrapped, algorithm, purpose)
    }
    fn destroy(&self, key: KeyHandle) -> Result<(), KeystoreError> {
        self.inner.destroy(key)
    }
    fn persist_key(&self, key: &KeyHandle, label: &KeyLabel) -> Result<(), KeystoreError> {
        self.step()?;
        self.inner.persist_key(key, label)
    }
    fn load_key(&self, label: &KeyLabel) -> Result<Option<KeyHandle>, KeystoreError> {
        self.inner.load_key(label)
    }
    fn delete_key(&self, label: &KeyLabel) -> Result<bool, KeystoreError> {
        self.step()?;
        self.inner.delete_key(label)
    }
    fn destroy_ec(&self, key: PrivateKeyHandle) -> Result<(), KeystoreError> {
        self.inner.destroy_ec(key)
    }
    fn check_health(&self) -> Result<(), KeystoreError> {
        self.health_calls.fetch_add(1, Ordering::SeqCst);
        self.faulted(|faults| faults.health, "C_GetSessionInfo")?;
        self.inner.check_health()
    }
}

/// One of each [`KeystoreError`] that [`KeystoreError::is_unavailable`] calls passing (a
/// session or token lost, a stale handle, a device error, no session free, recovery under
/// way), for the tests of how a caller answers them.
pub fn unavailable_errors() -> Vec<KeystoreError> {
    vec![
        KeystoreError::SessionLost {
            function: "C_Sign",
            code: "CKR_SESSION_HANDLE_INVALID".into(),
            source: None,
        },
        KeystoreError::StaleHandle { function: "C_Sign" },
        KeystoreError::Device {
            function: "C_Sign",
            code: "CKR_DEVICE_ERROR".into(),
            source: None,
        },
        KeystoreError::Busy { what: "no session" },
        KeystoreError::Recovering {
            reason: "token gone".into(),
            last_failure: None,
        },
        KeystoreError::TokenNotFound("t".into()),
    ]
}
