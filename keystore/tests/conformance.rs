//! One conformance suite, run unchanged against both keystore backends: the PKCS#11 backend on
//! a fresh SoftHSM2 token and the software backend.
//!
//! It checks the published ANSI X9.24-3-2017 vectors (by KCV: neither backend ever reveals a
//! key), the terminal algorithm over each store, that what one backend encrypts, MACs or wraps
//! the other decrypts, verifies or unwraps (which is exactly how a software terminal and the
//! HSM-backed platform talk), that both refuse the same misuse with the same error, and — as a
//! property — that both derive the same keys for random BDKs and random valid KSNs.
//!
//! This is a `harness = false` test (libtest-compatible through `libtest-mimic`, so `cargo test`
//! and `cargo nextest` both run it): SoftHSM2 reads `SOFTHSM2_CONF` from the environment when
//! the module initialises, and `main` sets it before any other thread exists. Each check is
//! independent of the others, as nextest runs each in a process of its own.

// A panic is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use nfcpay_protocol::test_vectors as x9_24_3_vectors;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libtest_mimic::{Arguments, Trial};

use nfcpay_keystore::components::clear_key_kcv;
use nfcpay_keystore::dukpt::{
    TerminalKeys, TransientKey, initial_key, transaction_key, working_key, working_key_from,
};
use nfcpay_keystore::pkcs11::Pkcs11Keystore;
use nfcpay_keystore::software::SoftwareKeystore;
use nfcpay_keystore::testing::{SOFTHSM2_MODULE, SoftHsmDir, token_uri};
use nfcpay_keystore::{DeriveBase, EcPublicKey, KeyLabel, KeyPurpose, Keystore, KeystoreError};
use nfcpay_protocol::dukpt::{DerivationData, KeyAlgorithm, TerminalState, WorkingKeyUsage};
use nfcpay_protocol::{BdkId, InitialKeyId, Ksn, TransactionCounter};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use x9_24_3_vectors::{AES128_BDK, AES128_TERMINAL_KSN_SEQUENCE, AES256_BDK, BdkVectors};
use zeroize::Zeroizing;

const PIN: &str = "conformance-pin";
/// The environment variable that names another PKCS#11 module for the suite.
const MODULE_VARIABLE: &str = "NFCPAY_TEST_PKCS11_MODULE";

/// The PKCS#11 module: SoftHSM2, or the module named by [`MODULE_VARIABLE`] (`cargo xtask
/// test` runs the suite again through p11-kit's proxy module, which reaches SoftHSM2 through
/// its registration in `/usr/share/p11-kit/modules/`).
fn module() -> String {
    std::env::var(MODULE_VARIABLE).unwrap_or_else(|_| SOFTHSM2_MODULE.to_owned())
}

/// The stores every check runs against, opened once per process.
struct Stores {
    /// Tokens for the AES-128 vectors, the AES-256 vectors (both sets use BDK ID 12345678),
    /// and everything else.
    pkcs11: [Pkcs11Keystore; 3],
    software: [SoftwareKeystore; 3],
}

static TOKEN_DIR: OnceLock<PathBuf> = OnceLock::new();
static STORES: OnceLock<Stores> = OnceLock::new();
const LABELS: [&str; 3] = ["conf-aes128", "conf-aes256", "conf-main"];

fn stores() -> &'static Stores {
    STORES.get_or_init(|| {
        let dir = TOKEN_DIR.get().expect("main sets the token directory");
        Stores {
            pkcs11: LABELS.map(|label| pkcs11_store(label, dir)),
            software: [(); 3].map(|()| SoftwareKeystore::in_memory()),
        }
    })
}

fn main() {
    // All tokens first: SoftHSM2 sees only the tokens that exist when the module initialises.
    // SAFETY: `main` runs before this process starts any other thread (the test runner starts
    // its threads later, in `libtest_mimic::run`), so nothing reads the environment
    // concurrently.
    #[allow(unsafe_code)]
    let hsm = unsafe { SoftHsmDir::for_this_process(PIN, &LABELS) };
    TOKEN_DIR.set(hsm.path().to_owned()).unwrap();

    type Check = fn(&dyn Keystore, &dyn Keystore, &dyn Keystore);
    let per_backend: [(&str, Check); 8] = [
        ("AES-128 BDK vectors", |a, _, _| {
            known_answers(a, &AES128_BDK)
        }),
        ("AES-256 BDK vectors", |_, b, _| {
            known_answers(b, &AES256_BDK)
        }),
        ("terminal algorithm over the store", |a, _, _| {
            terminal_over_store(a, &AES128_BDK)
        }),
        ("BDK management", |_, _, main| bdk_management(main)),
        ("misuse is refused", |_, _, main| misuse_is_refused(main)),
        ("ECDSA signatures verify on the host", |_, _, main| {
            ecdsa_verifies(main)
        }),
        ("persistent keys by label", |_, _, main| {
            persistent_keys(main)
        }),
        (
            "the enrollment KEK is the documented construction",
            |a, _, _| enrollment_kek_construction(a),
        ),
    ];
    let mut trials = Vec::new();
    for (name, check) in per_backend {
        trials.push(Trial::test(format!("pkcs11::{name}"), move || {
            let [a, b, main] = &stores().pkcs11;
            check(a, b, main);
            Ok(())
        }));
        trials.push(Trial::test(format!("software::{name}"), move || {
            let [a, b, main] = &stores().software;
            check(a, b, main);
            Ok(())
        }));
    }
    type Pair = fn(&dyn Keystore, &dyn Keystore);
    let between: [(&str, Pair); 3] = [
        ("GCM and CMAC interoperate", symmetric_interop),
        (
            "enrollment key transport (ECDH, wrap, unwrap)",
            enrollment_interop,
        ),
        ("random BDKs and KSNs agree by KCV", backends_agree),
    ];
    for (name, check) in between {
        trials.push(Trial::test(format!("pkcs11_software::{name}"), move || {
            check(&stores().pkcs11[2], &stores().software[2]);
            Ok(())
        }));
    }
    let conclusion = libtest_mimic::run(&Arguments::from_args(), trials);
    drop(hsm);
    conclusion.exit();
}

fn pkcs11_store(label: &str, dir: &Path) -> Pkcs11Keystore {
    Pkcs11Keystore::open(&token_uri(dir, label, &module())).unwrap()
}

fn bytes(hex_digits: &str) -> Zeroizing<Vec<u8>> {
    Zeroizing::new(hex::decode(hex_digits).unwrap())
}

fn kcv_of(hex_digits: &str) -> String {
    clear_key_kcv(&bytes(hex_digits)).unwrap().to_string()
}

fn kcv(store: &dyn Keystore, key: nfcpay_keystore::KeyHandle) -> String {
    let key = TransientKey::new(store, key);
    store.kcv(key.handle()).unwrap().to_string()
}

/// Imports the set's BDK and checks initial, transaction and working keys by KCV.
/// Imports the set's BDK unless an earlier check of this process already did.
fn ensure_bdk(store: &dyn Keystore, set: &BdkVectors) -> nfcpay_keystore::BdkInfo {
    let initial_key_id: InitialKeyId = set.initial_key_id.parse().unwrap();
    match store.import_bdk(initial_key_id.bdk_id(), &bytes(set.bdk)) {
        Err(KeystoreError::BdkExists(id)) => store.bdk_info(id).unwrap(),
        other => other.unwrap(),
    }
}

fn known_answers(store: &dyn Keystore, set: &BdkVectors) {
    let initial_key_id: InitialKeyId = set.initial_key_id.parse().unwrap();
    let info = ensure_bdk(store, set);
    assert_eq!(info.kcv.to_string(), kcv_of(set.bdk));
    assert_eq!(info.algorithm, set.algorithm());
    let ik = initial_key(store, initial_key_id, KeyPurpose::Check).unwrap();
    assert_eq!(
        kcv(store, ik),
        kcv_of(set.initial_key),
        "{} initial key",
        set.name
    );
    let mut checked = 0;
    for txn in set.transactions {
        let Ok(ksn) = txn.ksn.parse::<Ksn>() else {
            continue; // 0x1FFFF and 0xFFFFFFFF: not counters a terminal may use.
        };
        if !txn.transaction_key.is_empty() {
            let key = transaction_key(store, ksn, KeyPurpose::Check).unwrap();
            assert_eq!(
                kcv(store, key),
                kcv_of(txn.transaction_key),
                "{} {ksn}",
                set.name
            );
            checked += 1;
        }
        for working in txn.working_keys {
            let key = working_key(
                store,
                ksn,
                working.key_usage(),
                Some(working.key_algorithm()),
                KeyPurpose::Check,
            )
            .unwrap();
            assert_eq!(
                kcv(store, key),
                kcv_of(working.key),
                "{} {ksn} {}",
                set.name,
                working.usage
            );
            checked += 1;
        }
    }
    assert!(checked > 40, "only {checked} vectors checked");
}

/// Loads the set's initial key into the terminal algorithm running over the store and checks
/// the first transactions' PIN keys.
fn terminal_over_store(store: &dyn Keystore, set: &BdkVectors) {
    let initial_key_id: InitialKeyId = set.initial_key_id.parse().unwrap();
    ensure_bdk(store, set);
    let ik = initial_key(store, initial_key_id, KeyPurpose::Derive).unwrap();
    let mut keys = TerminalKeys(store);
    let mut state =
        TerminalState::load_initial_key(&mut keys, ik, set.algorithm(), initial_key_id).unwrap();
    for expected in AES128_TERMINAL_KSN_SEQUENCE {
        let (ksn, transaction) = state.next_transaction_key(&mut keys).unwrap();
        assert_eq!(ksn.to_string(), *expected);
        let transaction = TransientKey::new(store, transaction);
        let published = set
            .transactions
            .iter()
            .find(|t| t.ksn == *expected)
            .unwrap();
        let pin = published
            .working_keys
            .iter()
            .find(|w| w.usage == "PIN")
            .unwrap();
        let key = working_key_from(
            store,
            transaction.handle(),
            ksn,
            WorkingKeyUsage::PinEncryption,
            Some(pin.key_algorithm()),
            KeyPurpose::Check,
        )
        .unwrap();
        assert_eq!(kcv(store, key), kcv_of(pin.key), "{ksn}");
    }
    state.discard_all(&mut keys);
}

fn bdk_management(store: &dyn Keystore) {
    let id: BdkId = "B0B0B0B0".parse().unwrap();
    let info = store.generate_bdk(id, KeyAlgorithm::Aes256).unwrap();
    assert_eq!(info.algorithm, KeyAlgorithm::Aes256);
    assert!(matches!(
        store.generate_bdk(id, KeyAlgorithm::Aes128),
        Err(KeystoreError::BdkExists(_))
    ));
    assert!(matches!(
        store.import_bdk(id, &bytes(&"11".repeat(16))),
        Err(KeystoreError::BdkExists(_))
    ));
    assert_eq!(
        store.bdk_info(id).unwrap(),
        info,
        "a refused duplicate changes nothing"
    );
    let listed = store.list_bdks().unwrap();
    assert!(listed.contains(&info));
    assert!(
        listed
            .windows(2)
            .all(|pair| pair[0].bdk_id < pair[1].bdk_id),
        "sorted by ID"
    );
    let imported_id: BdkId = "B0B0B0B1".parse().unwrap();
    assert!(matches!(
        store.import_bdk(imported_id, &bytes(&"11".repeat(15))),
        Err(KeystoreError::InvalidInput { .. })
    ));
    assert!(matches!(
        store.bdk_info(imported_id),
        Err(KeystoreError::UnknownBdk(_))
    ));
    let info = store
        .import_bdk(imported_id, &bytes(&"2B".repeat(24)))
        .unwrap();
    assert_eq!(info.algorithm, KeyAlgorithm::Aes192);
    assert_eq!(info.kcv.to_string(), kcv_of(&"2B".repeat(24)));
}

fn misuse_is_refused(store: &dyn Keystore) {
    let unknown: Ksn = "DEADBEEF0000000100000001".parse().unwrap();
    assert!(matches!(
        transaction_key(store, unknown, KeyPurpose::Check),
        Err(KeystoreError::UnknownBdk(_))
    ));
    let id: BdkId = "C0C0C0C0".parse().unwrap();
    store.import_bdk(id, &bytes(&"5A".repeat(32))).unwrap();
    let ksn: Ksn = "C0C0C0C00000000100000003".parse().unwrap();
    let derive_only = TransientKey::new(
        store,
        transaction_key(store, ksn, KeyPurpose::Derive).unwrap(),
    );
    assert!(matches!(
        store.kcv(derive_only.handle()),
        Err(KeystoreError::KeyNotPermitted)
    ));
    assert!(matches!(
        store.gcm_encrypt(derive_only.handle(), &[0; 12], b"", b"x"),
        Err(KeystoreError::KeyNotPermitted)
    ));
    let encrypt = TransientKey::new(
        store,
        working_key(
            store,
            ksn,
            WorkingKeyUsage::DataBoth,
            None,
            KeyPurpose::Encrypt,
        )
        .unwrap(),
    );
    assert!(matches!(
        store.cmac_generate(encrypt.handle(), b"x"),
        Err(KeystoreError::KeyNotPermitted)
    ));
    let sealed = store
        .gcm_encrypt(encrypt.handle(), &[7; 12], b"header", b"body")
        .unwrap();
    for index in 0..sealed.len() {
        let mut tampered = sealed.clone();
        tampered[index] ^= 0x01;
        assert!(matches!(
            store.gcm_decrypt(encrypt.handle(), &[7; 12], b"header", &tampered),
            Err(KeystoreError::AuthenticationFailed)
        ));
    }
    assert!(matches!(
        store.gcm_decrypt(encrypt.handle(), &[7; 12], b"headeR", &sealed),
        Err(KeystoreError::AuthenticationFailed)
    ));
    assert!(
        store
            .gcm_decrypt(encrypt.handle(), &[7; 12], b"header", &sealed[..10])
            .is_err()
    );
    let mac = TransientKey::new(
        store,
        working_key(store, ksn, WorkingKeyUsage::MacBoth, None, KeyPurpose::Mac).unwrap(),
    );
    let tag = store.cmac_generate(mac.handle(), b"message").unwrap();
    store.cmac_verify(mac.handle(), b"message", &tag).unwrap();
    assert!(matches!(
        store.cmac_verify(mac.handle(), b"messagE", &tag),
        Err(KeystoreError::AuthenticationFailed)
    ));
    let export = TransientKey::new(
        store,
        transaction_key(store, ksn, KeyPurpose::Derive).unwrap(),
    );
    let not_a_kek = store.wrap_key(mac.handle(), export.handle());
    assert!(
        matches!(not_a_kek, Err(KeystoreError::KeyNotPermitted)),
        "{not_a_kek:?}"
    );
}

fn ecdsa_verifies(store: &dyn Keystore) {
    use p256::ecdsa::signature::Verifier;
    let label: KeyLabel = "conformance-signer".parse().unwrap();
    let (_generated, public) = store.generate_ec_p256(&label, true).unwrap();
    let (found, found_public) = store.find_ec_p256(&label).unwrap().unwrap();
    assert_eq!(found_public, public);
    let signature = store.sign_p256_sha256(&found, b"receipt").unwrap();
    let verifying = p256::ecdsa::VerifyingKey::from_sec1_bytes(public.as_bytes()).unwrap();
    let signature = p256::ecdsa::Signature::from_slice(&signature).unwrap();
    verifying.verify(b"receipt", &signature).unwrap();
    assert!(verifying.verify(b"receipT", &signature).is_err());
    assert!(
        store
            .find_ec_p256(&"no-such-key".parse().unwrap())
            .unwrap()
            .is_none()
    );
    store.destroy_ec(found).unwrap();
    assert!(store.find_ec_p256(&label).unwrap().is_none(), "destroyed");
}

/// Imports the same BDK into both stores (under a fresh ID).
fn shared_bdk(a: &dyn Keystore, b: &dyn Keystore, id: BdkId, key: &Zeroizing<Vec<u8>>) {
    a.import_bdk(id, key).unwrap();
    b.import_bdk(id, key).unwrap();
}

fn symmetric_interop(a: &dyn Keystore, b: &dyn Keystore) {
    let id: BdkId = "1D1D1D1D".parse().unwrap();
    shared_bdk(a, b, id, &bytes(&"3C".repeat(32)));
    let ksn: Ksn = "1D1D1D1D0000002A00000101".parse().unwrap();
    let ka = TransientKey::new(
        a,
        working_key(a, ksn, WorkingKeyUsage::DataBoth, None, KeyPurpose::Encrypt).unwrap(),
    );
    let kb = TransientKey::new(
        b,
        working_key(b, ksn, WorkingKeyUsage::DataBoth, None, KeyPurpose::Encrypt).unwrap(),
    );
    let sealed = a
        .gcm_encrypt(ka.handle(), &[1; 12], b"aad", b"half A")
        .unwrap();
    assert_eq!(
        b.gcm_decrypt(kb.handle(), &[1; 12], b"aad", &sealed)
            .unwrap()
            .as_slice(),
        b"half A"
    );
    let sealed = b.gcm_encrypt(kb.handle(), &[2; 12], b"", b"").unwrap();
    assert_eq!(sealed.len(), 16);
    assert!(
        a.gcm_decrypt(ka.handle(), &[2; 12], b"", &sealed)
            .unwrap()
            .is_empty()
    );
    let ma = TransientKey::new(
        a,
        working_key(a, ksn, WorkingKeyUsage::MacBoth, None, KeyPurpose::Mac).unwrap(),
    );
    let mb = TransientKey::new(
        b,
        working_key(b, ksn, WorkingKeyUsage::MacBoth, None, KeyPurpose::Mac).unwrap(),
    );
    let tag = a.cmac_generate(ma.handle(), b"receipt").unwrap();
    assert_eq!(b.cmac_generate(mb.handle(), b"receipt").unwrap(), tag);
    b.cmac_verify(mb.handle(), b"receipt", &tag).unwrap();
}

/// Enrollment: the platform (a) wraps a terminal's initial key under a KEK both sides derive
/// with ECDH; the terminal (b) unwraps it. The KCVs must match the host's IK.
fn enrollment_interop(platform: &dyn Keystore, terminal: &dyn Keystore) {
    let id: BdkId = "E0E0E0E0".parse().unwrap();
    platform.import_bdk(id, &bytes(&"A5".repeat(32))).unwrap();
    let initial_key_id = InitialKeyId::new(id, [0, 0, 0, 9].into());
    let label: KeyLabel = "enrollment-ecdh".parse().unwrap();
    let (platform_private, platform_public) = platform.generate_ec_p256(&label, false).unwrap();
    let (terminal_private, terminal_public) = terminal.generate_ec_p256(&label, false).unwrap();
    let context = b"nfcpay enrollment v1 | terminal T-0009";
    let platform_kek = TransientKey::new(
        platform,
        platform
            .ecdh_kek(&platform_private, &terminal_public, context)
            .unwrap(),
    );
    let terminal_kek = TransientKey::new(
        terminal,
        terminal
            .ecdh_kek(&terminal_private, &platform_public, context)
            .unwrap(),
    );
    let ik = TransientKey::new(
        platform,
        initial_key(platform, initial_key_id, KeyPurpose::Export).unwrap(),
    );
    let wrapped = platform
        .wrap_key(platform_kek.handle(), ik.handle())
        .unwrap();
    assert_eq!(wrapped.len(), 32 + 8);
    let loaded = terminal
        .unwrap_key(
            terminal_kek.handle(),
            &wrapped,
            KeyAlgorithm::Aes256,
            KeyPurpose::Check,
        )
        .unwrap();
    let host = initial_key(platform, initial_key_id, KeyPurpose::Check).unwrap();
    assert_eq!(kcv(terminal, loaded), kcv(platform, host));
    let mut tampered = wrapped.clone();
    tampered[5] ^= 0x80;
    assert!(matches!(
        terminal.unwrap_key(
            terminal_kek.handle(),
            &tampered,
            KeyAlgorithm::Aes256,
            KeyPurpose::Check
        ),
        Err(KeystoreError::AuthenticationFailed)
    ));
    let other_context = TransientKey::new(
        terminal,
        terminal
            .ecdh_kek(&terminal_private, &platform_public, b"other")
            .unwrap(),
    );
    assert!(
        terminal
            .unwrap_key(
                other_context.handle(),
                &wrapped,
                KeyAlgorithm::Aes256,
                KeyPurpose::Check
            )
            .is_err()
    );
    // A key derived for use (not for export) cannot be wrapped.
    let not_exportable = TransientKey::new(
        platform,
        initial_key(platform, initial_key_id, KeyPurpose::Derive).unwrap(),
    );
    assert!(
        platform
            .wrap_key(platform_kek.handle(), not_exportable.handle())
            .is_err()
    );
    platform.destroy_ec(platform_private).unwrap();
    terminal.destroy_ec(terminal_private).unwrap();
}

/// The enrollment KEK is what docs/key-management.md says, computed on the host from the
/// outside: Z, the x-coordinate ECDH with the store's (persistent) key pair shares, then
/// KEK = AES-256-ECB(Z, SHA-256(context)); the store's KEK wraps the published initial key to
/// the same bytes as AES key wrap under the host's KEK. The KEK only wraps; a key not made for
/// export is not wrapped; another context's KEK does not unwrap.
fn enrollment_kek_construction(store: &dyn Keystore) {
    use aes::cipher::{Array, BlockCipherEncrypt, KeyInit, consts::U16};
    use sha2::Digest;

    ensure_bdk(store, &AES128_BDK);
    let initial_key_id: InitialKeyId = AES128_BDK.initial_key_id.parse().unwrap();
    let label: KeyLabel = "conf-enrollment-kek".parse().unwrap();
    let (private, public) = store.generate_ec_p256(&label, true).unwrap();
    let host_secret = p256::SecretKey::from_slice(&[0x11; 32]).unwrap();
    let host_public = EcPublicKey::try_from(&host_secret.public_key().to_sec1_bytes()[..]).unwrap();
    let context = b"nfcpay enrollment v1|T-0042";
    let kek = TransientKey::new(
        store,
        store.ecdh_kek(&private, &host_public, context).unwrap(),
    );
    assert_eq!(kek.handle().algorithm(), KeyAlgorithm::Aes256);
    let ik = TransientKey::new(
        store,
        initial_key(store, initial_key_id, KeyPurpose::Export).unwrap(),
    );
    let wrapped = store.wrap_key(kek.handle(), ik.handle()).unwrap();

    let shared =
        host_secret.diffie_hellman(&p256::PublicKey::from_sec1_bytes(public.as_bytes()).unwrap());
    let mut host_kek: [u8; 32] = sha2::Sha256::digest(context).into();
    let (blocks, _) = Array::<u8, U16>::slice_as_chunks_mut(&mut host_kek);
    aes::Aes256::new_from_slice(shared.raw_secret_bytes().as_slice())
        .unwrap()
        .encrypt_blocks(blocks);
    let mut wrapped_on_host = [0u8; 24];
    aes_kw::AesKw::<aes::Aes256>::new_from_slice(&host_kek)
        .unwrap()
        .wrap_key(&bytes(AES128_BDK.initial_key), &mut wrapped_on_host)
        .unwrap();
    assert_eq!(wrapped, wrapped_on_host);

    assert!(matches!(
        store.kcv(kek.handle()),
        Err(KeystoreError::KeyNotPermitted)
    ));
    let not_for_export = TransientKey::new(
        store,
        initial_key(store, initial_key_id, KeyPurpose::Derive).unwrap(),
    );
    assert!(matches!(
        store.wrap_key(kek.handle(), not_for_export.handle()),
        Err(KeystoreError::KeyNotPermitted)
    ));
    let other = TransientKey::new(
        store,
        store.ecdh_kek(&private, &host_public, b"other").unwrap(),
    );
    assert!(matches!(
        store.unwrap_key(
            other.handle(),
            &wrapped,
            KeyAlgorithm::Aes128,
            KeyPurpose::Check
        ),
        Err(KeystoreError::AuthenticationFailed)
    ));
    store.destroy_ec(private).unwrap();
}

/// Property: for random BDKs (each algorithm) and random valid KSNs, both stores derive keys
/// with the same KCV, for the transaction key and a working key.
fn backends_agree(a: &dyn Keystore, b: &dyn Keystore) {
    let mut runner = TestRunner::new(Config {
        cases: 24,
        failure_persistence: None,
        ..Config::default()
    });
    let next_bdk = std::cell::Cell::new(0x7000_0000u32);
    let strategy = (
        prop_oneof![Just(16usize), Just(24), Just(32)],
        proptest::collection::vec(any::<u8>(), 32),
        any::<[u8; 4]>(),
        any::<u32>().prop_filter_map("valid counter", |c| TransactionCounter::try_from(c).ok()),
        prop::sample::select(WorkingKeyUsage::ALL.to_vec()),
    );
    runner
        .run(&strategy, |(length, key, derivation_id, counter, usage)| {
            let id = BdkId::from(next_bdk.get().to_be_bytes());
            next_bdk.set(next_bdk.get() + 1);
            shared_bdk(a, b, id, &Zeroizing::new(key[..length].to_vec()));
            let ksn = Ksn::new(InitialKeyId::new(id, derivation_id.into()), counter);
            let derived = |store: &dyn Keystore| {
                let transaction = kcv(
                    store,
                    transaction_key(store, ksn, KeyPurpose::Check).unwrap(),
                );
                let working = kcv(
                    store,
                    working_key(store, ksn, usage, None, KeyPurpose::Check).unwrap(),
                );
                let data = DerivationData::working_key(usage, KeyAlgorithm::Aes128, ksn);
                let base = TransientKey::new(
                    store,
                    transaction_key(store, ksn, KeyPurpose::Derive).unwrap(),
                );
                let short = kcv(
                    store,
                    store
                        .derive(DeriveBase::Key(base.handle()), &data, KeyPurpose::Check)
                        .unwrap(),
                );
                (transaction, working, short)
            };
            prop_assert_eq!(derived(a), derived(b), "{}", ksn);
            Ok(())
        })
        .unwrap();
}

/// Persistent symmetric keys: persist, load (same KCV), replace, delete (then `None`), and
/// purposes kept; BDKs are not in their namespace.
fn persistent_keys(store: &dyn Keystore) {
    let id: BdkId = "5E5E5E5E".parse().unwrap();
    store.import_bdk(id, &bytes(&"6B".repeat(16))).unwrap();
    let ksn = |counter: u32| -> Ksn { format!("5E5E5E5E00000001{counter:08X}").parse().unwrap() };
    let label = |text: &str| -> KeyLabel { text.parse().unwrap() };

    // A KCV key: persist, load, same KCV; the original may go, the persistent copy stays.
    let check = transaction_key(store, ksn(1), KeyPurpose::Check).unwrap();
    let expected = store.kcv(&check).unwrap();
    store.persist_key(&check, &label("conf-check")).unwrap();
    store.destroy(check).unwrap();
    let loaded = store.load_key(&label("conf-check")).unwrap().unwrap();
    assert_eq!(loaded.algorithm(), KeyAlgorithm::Aes128);
    assert_eq!(store.kcv(&loaded).unwrap(), expected);
    // Deleting the persistent key leaves the transient copy alone.
    assert!(store.delete_key(&label("conf-check")).unwrap());
    assert_eq!(store.kcv(&loaded).unwrap(), expected);
    store.destroy(loaded).unwrap();
    assert!(store.load_key(&label("conf-check")).unwrap().is_none());
    assert!(!store.delete_key(&label("conf-check")).unwrap());

    // A derivation key keeps its purpose: it derives, and cannot show a KCV or encrypt.
    let derive = TransientKey::new(
        store,
        transaction_key(store, ksn(2), KeyPurpose::Derive).unwrap(),
    );
    store
        .persist_key(derive.handle(), &label("conf-derive"))
        .unwrap();
    let loaded = TransientKey::new(
        store,
        store.load_key(&label("conf-derive")).unwrap().unwrap(),
    );
    assert!(matches!(
        store.kcv(loaded.handle()),
        Err(KeystoreError::KeyNotPermitted)
    ));
    assert!(matches!(
        store.gcm_encrypt(loaded.handle(), &[0; 12], b"", b"x"),
        Err(KeystoreError::KeyNotPermitted)
    ));
    let pin = |key: &nfcpay_keystore::KeyHandle| {
        kcv(
            store,
            working_key_from(
                store,
                key,
                ksn(2),
                WorkingKeyUsage::PinEncryption,
                None,
                KeyPurpose::Check,
            )
            .unwrap(),
        )
    };
    assert_eq!(pin(loaded.handle()), pin(derive.handle()));

    // An encryption key keeps its purpose too, and decrypts what the original encrypted.
    let encrypt = TransientKey::new(
        store,
        working_key(
            store,
            ksn(3),
            WorkingKeyUsage::DataBoth,
            None,
            KeyPurpose::Encrypt,
        )
        .unwrap(),
    );
    store
        .persist_key(encrypt.handle(), &label("conf-encrypt"))
        .unwrap();
    let loaded = TransientKey::new(
        store,
        store.load_key(&label("conf-encrypt")).unwrap().unwrap(),
    );
    let sealed = store
        .gcm_encrypt(encrypt.handle(), &[9; 12], b"aad", b"persisted")
        .unwrap();
    assert_eq!(
        store
            .gcm_decrypt(loaded.handle(), &[9; 12], b"aad", &sealed)
            .unwrap()
            .as_slice(),
        b"persisted"
    );
    assert!(matches!(
        store.kcv(loaded.handle()),
        Err(KeystoreError::KeyNotPermitted)
    ));

    // Persisting under a used label replaces the key.
    let replacement = TransientKey::new(
        store,
        transaction_key(store, ksn(4), KeyPurpose::Check).unwrap(),
    );
    store
        .persist_key(replacement.handle(), &label("conf-encrypt"))
        .unwrap();
    let loaded = TransientKey::new(
        store,
        store.load_key(&label("conf-encrypt")).unwrap().unwrap(),
    );
    assert_eq!(
        store.kcv(loaded.handle()).unwrap(),
        store.kcv(replacement.handle()).unwrap()
    );

    // BDKs are not persistent keys: neither found nor deleted by their label.
    let bdk_label = label("nfcpay-bdk-5E5E5E5E");
    assert!(store.load_key(&bdk_label).unwrap().is_none());
    assert!(!store.delete_key(&bdk_label).unwrap());
    assert_eq!(
        store.bdk_info(id).unwrap().kcv.to_string(),
        kcv_of(&"6B".repeat(16))
    );

    for name in ["conf-derive", "conf-encrypt"] {
        assert!(store.delete_key(&label(name)).unwrap());
        assert!(store.load_key(&label(name)).unwrap().is_none());
    }
}
