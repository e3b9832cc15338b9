//! The PKCS#11 backend against a real SoftHSM2 token made for this test binary.
//!
//! `C_Initialize` happens once per process and `SOFTHSM2_CONF` must be set before it, so the
//! binary makes one token (through `softhsm-setup/init-token`) and shares one store through
//! a `OnceLock`. Tests take a lock first: they run one at a time (SoftHSM serialises
//! symmetric operations anyway), which lets them count session objects and log the token
//! out without disturbing each other. Each test uses its own BDK IDs and labels.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};

use aes::cipher::{Array, BlockCipherEncrypt, KeyInit, consts::U16};
use cmac::{Cmac, Mac};
use cryptoki::context::Pkcs11;
use cryptoki::object::{Attribute, AttributeInfo, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use cryptoki::slot::Slot;
use nfcpay_keystore::dukpt;
use nfcpay_keystore::pkcs11::Pkcs11Keystore;
use nfcpay_keystore::testing::SoftHsmDir;
use nfcpay_keystore::uri::Pkcs11Uri;
use nfcpay_keystore::{DeriveBase, Kcv, KeyLabel, KeyPurpose, Keystore, KeystoreError};
use nfcpay_protocol::dukpt::{DerivationData, KeyAlgorithm, WorkingKeyUsage};
use nfcpay_protocol::{BdkId, InitialKeyId, Ksn};
use zeroize::Zeroizing;

const MODULE: &str = nfcpay_keystore::testing::SOFTHSM2_MODULE;
const TOKEN_LABEL: &str = "nfcpay-keystore-test";
const PIN: &str = "123456";

/// X9.24-3-2017 test vectors (AES-128 BDK set).
const KAT_BDK: &str = "FEDCBA9876543210F1F1F1F1F1F1F1F1";
const KAT_INITIAL_KEY_ID: &str = "1234567890123456";
const KAT_INITIAL_KEY: &str = "1273671EA26AC29AFA4D1084127652A1";
const KAT_KSN: &str = "123456789012345600000001";
const KAT_TRANSACTION_KEY: &str = "4F21B565BAD9835E112B6465635EAE44";

struct Fixture {
    store: Pkcs11Keystore,
    uri: Pkcs11Uri,
    /// The test's own view of the token, to inspect objects (same module instance).
    context: Pkcs11,
    slot: Slot,
    hsm: SoftHsmDir,
}

static FIXTURE: OnceLock<Fixture> = OnceLock::new();
static SERIAL: Mutex<()> = Mutex::new(());

fn fixture() -> (MutexGuard<'static, ()>, &'static Fixture) {
    let guard = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    (guard, FIXTURE.get_or_init(make_fixture))
}

#[allow(unsafe_code)]
fn make_fixture() -> Fixture {
    let hsm = SoftHsmDir::new(PIN);
    hsm.make_token(TOKEN_LABEL);
    // The PIN file as an editor leaves it, with a final newline (which the keystore strips).
    std::fs::write(hsm.pin_file(), format!("{PIN}\n")).unwrap();
    // SAFETY: the environment is written once, inside `OnceLock` initialisation under the
    // SERIAL lock that every test takes before doing anything else, and before any
    // `C_Initialize`; no other thread of this binary reads or writes the environment then.
    unsafe { hsm.set_conf_variable() };
    let uri = hsm.uri(TOKEN_LABEL);
    let store = Pkcs11Keystore::open(&uri).unwrap();
    let context = Pkcs11::new(MODULE).unwrap();
    let slot = context
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|slot| context.get_token_info(*slot).unwrap().label() == TOKEN_LABEL)
        .unwrap();
    Fixture {
        store,
        uri,
        context,
        slot,
        hsm,
    }
}

impl Fixture {
    /// A session of the test's own (logged in, since login is per application).
    fn session(&self) -> Session {
        self.context.open_ro_session(self.slot).unwrap()
    }

    fn session_objects(&self) -> usize {
        self.session()
            .find_objects(&[Attribute::Token(false)])
            .unwrap()
            .len()
    }

    /// Token objects with this label (the store's session copies of BDKs are not counted).
    fn objects_labelled(&self, label: &str) -> Vec<ObjectHandle> {
        self.session()
            .find_objects(&[
                Attribute::Token(true),
                Attribute::Label(label.as_bytes().to_vec()),
            ])
            .unwrap()
    }
}

fn bdk_id(hex: &str) -> BdkId {
    hex.parse().unwrap()
}

fn key_bytes(hex: &str) -> Zeroizing<Vec<u8>> {
    Zeroizing::new(hex::decode(hex).unwrap())
}

fn aes_ecb(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut output = data.to_vec();
    let (blocks, _) = Array::<u8, U16>::slice_as_chunks_mut(&mut output);
    match key.len() {
        16 => aes::Aes128::new_from_slice(key)
            .unwrap()
            .encrypt_blocks(blocks),
        24 => aes::Aes192::new_from_slice(key)
            .unwrap()
            .encrypt_blocks(blocks),
        32 => aes::Aes256::new_from_slice(key)
            .unwrap()
            .encrypt_blocks(blocks),
        _ => panic!("bad key length"),
    }
    output
}

fn host_kcv(key: &[u8]) -> Kcv {
    let zero = [0u8; 16];
    let cmac: [u8; 16] = match key.len() {
        16 => {
            let mut mac = <Cmac<aes::Aes128> as KeyInit>::new_from_slice(key).unwrap();
            mac.update(&zero);
            mac.finalize().into_bytes().into()
        }
        24 => {
            let mut mac = <Cmac<aes::Aes192> as KeyInit>::new_from_slice(key).unwrap();
            mac.update(&zero);
            mac.finalize().into_bytes().into()
        }
        _ => {
            let mut mac = <Cmac<aes::Aes256> as KeyInit>::new_from_slice(key).unwrap();
            mac.update(&zero);
            mac.finalize().into_bytes().into()
        }
    };
    Kcv::from_cmac(&cmac)
}

#[test]
fn generates_imports_and_lists_bdks() {
    let (_serial, fixture) = fixture();
    let store = &fixture.store;
    let generated = store
        .generate_bdk(bdk_id("A0000001"), KeyAlgorithm::Aes256)
        .unwrap();
    assert_eq!(generated.algorithm, KeyAlgorithm::Aes256);
    let bdk = key_bytes("00112233445566778899AABBCCDDEEFF0011223344556677");
    let imported = store.import_bdk(bdk_id("A0000002"), &bdk).unwrap();
    assert_eq!(imported.algorithm, KeyAlgorithm::Aes192);
    assert_eq!(imported.kcv, host_kcv(&bdk));

    let listed = store.list_bdks().unwrap();
    assert!(listed.contains(&generated) && listed.contains(&imported));
    assert!(
        listed
            .windows(2)
            .all(|pair| pair[0].bdk_id < pair[1].bdk_id)
    );
    assert_eq!(store.bdk_info(bdk_id("A0000002")).unwrap(), imported);
    assert!(matches!(
        store.bdk_info(bdk_id("A00000FF")),
        Err(KeystoreError::UnknownBdk(_))
    ));
    assert!(matches!(
        store.import_bdk(bdk_id("A0000003"), &key_bytes("0011")),
        Err(KeystoreError::InvalidInput { .. })
    ));
}

#[test]
fn a_duplicate_bdk_is_refused_and_creates_nothing() {
    let (_serial, fixture) = fixture();
    let store = &fixture.store;
    let id = bdk_id("A1000001");
    store.generate_bdk(id, KeyAlgorithm::Aes128).unwrap();
    let label = "nfcpay-bdk-A1000001";
    assert_eq!(fixture.objects_labelled(label).len(), 2); // key + description
    assert!(matches!(
        store.generate_bdk(id, KeyAlgorithm::Aes256),
        Err(KeystoreError::BdkExists(_))
    ));
    assert!(matches!(
        store.import_bdk(id, &key_bytes(KAT_BDK)),
        Err(KeystoreError::BdkExists(_))
    ));
    assert_eq!(fixture.objects_labelled(label).len(), 2);
}

#[test]
fn bdk_objects_are_sensitive_never_extractable_and_derive_only() {
    let (_serial, fixture) = fixture();
    fixture
        .store
        .generate_bdk(bdk_id("A2000001"), KeyAlgorithm::Aes256)
        .unwrap();
    let session = fixture.session();
    let keys = session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Token(true),
            Attribute::Label(b"nfcpay-bdk-A2000001".to_vec()),
        ])
        .unwrap();
    assert_eq!(keys.len(), 1);
    let key = keys[0];
    // get_attributes silently omits sensitive attributes: ask get_attribute_info.
    let info = session
        .get_attribute_info(key, &[AttributeType::Value])
        .unwrap();
    assert!(matches!(info[0], AttributeInfo::Sensitive));
    let attributes = session
        .get_attributes(
            key,
            &[
                AttributeType::Token,
                AttributeType::Sensitive,
                AttributeType::Extractable,
                AttributeType::NeverExtractable,
                AttributeType::AlwaysSensitive,
                AttributeType::Sign,
                AttributeType::Derive,
                AttributeType::Encrypt,
                AttributeType::Wrap,
                AttributeType::Id,
            ],
        )
        .unwrap();
    for attribute in attributes {
        match attribute {
            Attribute::Token(value)
            | Attribute::Sensitive(value)
            | Attribute::NeverExtractable(value)
            | Attribute::AlwaysSensitive(value)
            | Attribute::Derive(value) => assert!(value, "{attribute:?}"),
            Attribute::Extractable(value)
            | Attribute::Sign(value)
            | Attribute::Encrypt(value)
            | Attribute::Wrap(value) => assert!(!value, "{attribute:?}"),
            Attribute::Id(id) => assert_eq!(id, [0xA2, 0, 0, 1]),
            other => panic!("unexpected {other:?}"),
        }
    }
    // The description holds no key.
    let description = session
        .find_objects(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Label(b"nfcpay-bdk-A2000001".to_vec()),
        ])
        .unwrap();
    let value = session
        .get_attributes(description[0], &[AttributeType::Value])
        .unwrap();
    let Attribute::Value(text) = &value[0] else {
        panic!("no value")
    };
    let text = String::from_utf8(text.clone()).unwrap();
    assert!(
        text.starts_with("created=") && text.ends_with(";algorithm=aes256"),
        "{text}"
    );
}

#[test]
fn derivation_matches_aes_ecb_for_every_length() {
    let (_serial, fixture) = fixture();
    let store = &fixture.store;
    let bdks = [
        ("A3000001", "000102030405060708090A0B0C0D0E0F"),
        (
            "A3000002",
            "000102030405060708090A0B0C0D0E0F1011121314151617",
        ),
        (
            "A3000003",
            "000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F",
        ),
    ];
    let initial_key_id: InitialKeyId = "A300000112345678".parse().unwrap();
    for (id, bdk_hex) in bdks {
        let bdk = key_bytes(bdk_hex);
        store.import_bdk(bdk_id(id), &bdk).unwrap();
        for algorithm in [
            KeyAlgorithm::Aes128,
            KeyAlgorithm::Aes192,
            KeyAlgorithm::Aes256,
        ] {
            let data = DerivationData::initial_key(algorithm, initial_key_id);
            let expected = aes_ecb(&bdk, data.as_bytes());
            let key = store
                .derive(DeriveBase::Bdk(bdk_id(id)), &data, KeyPurpose::Check)
                .unwrap();
            assert_eq!(key.algorithm(), algorithm);
            assert_eq!(
                store.kcv(&key).unwrap(),
                host_kcv(&expected[..algorithm.key_bytes()]),
                "BDK {id}, derived {algorithm}"
            );
            store.destroy(key).unwrap();
        }
    }
}

#[test]
fn dukpt_keys_match_the_published_vectors() {
    let (_serial, fixture) = fixture();
    let store = &fixture.store;
    store
        .import_bdk(bdk_id("12345678"), &key_bytes(KAT_BDK))
        .unwrap();
    let initial_key = dukpt::initial_key(
        store,
        KAT_INITIAL_KEY_ID.parse().unwrap(),
        KeyPurpose::Check,
    )
    .unwrap();
    assert_eq!(
        store.kcv(&initial_key).unwrap(),
        host_kcv(&hex::decode(KAT_INITIAL_KEY).unwrap())
    );
    store.destroy(initial_key).unwrap();
    let ksn: Ksn = KAT_KSN.parse().unwrap();
    let transaction_key = dukpt::transaction_key(store, ksn, KeyPurpose::Check).unwrap();
    assert_eq!(
        store.kcv(&transaction_key).unwrap(),
        host_kcv(&hex::decode(KAT_TRANSACTION_KEY).unwrap())
    );
    store.destroy(transaction_key).unwrap();
}

#[test]
fn a_working_key_leaves_no_session_object_behind() {
    let (_serial, fixture) = fixture();
    let store = &fixture.store;
    let id = bdk_id("A4000001");
    store.generate_bdk(id, KeyAlgorithm::Aes256).unwrap();
    let ksn: Ksn = "A400000100000001000F0F0F".parse().unwrap();
    let before = fixture.session_objects();
    let key = dukpt::working_key(
        store,
        ksn,
        WorkingKeyUsage::MacGeneration,
        None,
        KeyPurpose::Mac,
    )
    .unwrap();
    assert_eq!(fixture.session_objects(), before + 1);
    store.cmac_generate(&key, b"message").unwrap();
    store.destroy(key).unwrap();
    assert_eq!(fixture.session_objects(), before);
}

#[test]
fn gcm_round_trips_and_refuses_a_tampered_tag() {
    let (_serial, fixture) = fixture();
    let store = &fixture.store;
    let id = bdk_id("A5000001");
    store.generate_bdk(id, KeyAlgorithm::Aes256).unwrap();
    let data =
        DerivationData::initial_key(KeyAlgorithm::Aes256, "A500000100000001".parse().unwrap());
    let key = store
        .derive(DeriveBase::Bdk(id), &data, KeyPurpose::Encrypt)
        .unwrap();
    let nonce = [7u8; 12];
    let sealed = store
        .gcm_encrypt(&key, &nonce, b"aad", b"card data")
        .unwrap();
    assert_eq!(sealed.len(), 9 + 16);
    let opened = store.gcm_decrypt(&key, &nonce, b"aad", &sealed).unwrap();
    assert_eq!(opened.as_slice(), b"card data");
    let mut tampered = sealed.clone();
    *tampered.last_mut().unwrap() ^= 1;
    assert!(matches!(
        store.gcm_decrypt(&key, &nonce, b"aad", &tampered),
        Err(KeystoreError::AuthenticationFailed)
    ));
    assert!(matches!(
        store.gcm_decrypt(&key, &nonce, b"other aad", &sealed),
        Err(KeystoreError::AuthenticationFailed)
    ));
    assert!(matches!(
        store.cmac_generate(&key, b"x"),
        Err(KeystoreError::KeyNotPermitted)
    ));
    store.destroy(key).unwrap();
}

#[test]
fn cmac_verifies_and_refuses_a_wrong_mac() {
    let (_serial, fixture) = fixture();
    let store = &fixture.store;
    let id = bdk_id("A6000001");
    let bdk = key_bytes("2B7E151628AED2A6ABF7158809CF4F3C");
    store.import_bdk(id, &bdk).unwrap();
    let data =
        DerivationData::initial_key(KeyAlgorithm::Aes128, "A600000100000001".parse().unwrap());
    let key = store
        .derive(DeriveBase::Bdk(id), &data, KeyPurpose::Mac)
        .unwrap();
    let derived = aes_ecb(&bdk, data.as_bytes());
    let mac = store.cmac_generate(&key, b"message").unwrap();
    let mut host = <Cmac<aes::Aes128> as KeyInit>::new_from_slice(&derived).unwrap();
    host.update(b"message");
    assert_eq!(mac.as_slice(), host.finalize().into_bytes().as_slice());
    store.cmac_verify(&key, b"message", &mac).unwrap();
    assert!(matches!(
        store.cmac_verify(&key, b"messagf", &mac),
        Err(KeystoreError::AuthenticationFailed)
    ));
    assert!(matches!(
        store.cmac_verify(&key, b"message", &mac[..8]),
        Err(KeystoreError::AuthenticationFailed)
    ));
    assert_eq!(store.kcv(&key).unwrap(), host_kcv(&derived));
    store.destroy(key).unwrap();
    assert!(matches!(
        store.kcv(
            &store
                .derive(DeriveBase::Bdk(id), &data, KeyPurpose::Derive)
                .unwrap()
        ),
        Err(KeystoreError::KeyNotPermitted)
    ));
}

#[test]
fn ecdsa_signatures_verify_on_the_host() {
    use p256::ecdsa::signature::Verifier;
    let (_serial, fixture) = fixture();
    let store = &fixture.store;
    let label: KeyLabel = "test-ecdsa".parse().unwrap();
    // `key` and `found` name the same pair; destroying one destroys it.
    let (key, public) = store.generate_ec_p256(&label, true).unwrap();
    let signature = store.sign_p256_sha256(&key, b"to be signed").unwrap();
    let verifier = p256::ecdsa::VerifyingKey::from_sec1_bytes(public.as_bytes()).unwrap();
    let signature = p256::ecdsa::Signature::from_slice(&signature).unwrap();
    verifier.verify(b"to be signed", &signature).unwrap();
    assert!(verifier.verify(b"to be signe", &signature).is_err());

    let (found, found_public) = store.find_ec_p256(&label).unwrap().unwrap();
    assert_eq!(found_public, public);
    assert!(matches!(
        store.generate_ec_p256(&label, true),
        Err(KeystoreError::InvalidInput { .. })
    ));
    store.destroy_ec(found).unwrap();
    assert!(store.find_ec_p256(&label).unwrap().is_none());
    assert!(fixture.objects_labelled("test-ecdsa").is_empty());
}

#[test]
fn a_lost_login_is_recovered() {
    let (_serial, fixture) = fixture();
    let store = &fixture.store;
    let id = bdk_id("A8000001");
    store.import_bdk(id, &key_bytes(KAT_BDK)).unwrap();
    let data =
        DerivationData::initial_key(KeyAlgorithm::Aes128, "A800000100000001".parse().unwrap());
    let before = store
        .derive(DeriveBase::Bdk(id), &data, KeyPurpose::Check)
        .unwrap();
    let kcv = store.kcv(&before).unwrap();
    store.destroy(before).unwrap();

    // Log the whole application out behind the store's back: private session objects
    // (the BDK copies) go, and every session loses its login.
    fixture.session().logout().unwrap();

    // The first calls may report the loss; the store recovers by itself.
    let mut recovered = None;
    for _ in 0..3 {
        match store.derive(DeriveBase::Bdk(id), &data, KeyPurpose::Check) {
            Ok(key) => {
                recovered = Some(key);
                break;
            }
            Err(KeystoreError::SessionLost { .. } | KeystoreError::UnknownKey) => {}
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    let key = recovered.expect("the store did not recover");
    assert_eq!(store.kcv(&key).unwrap(), kcv);
    store.destroy(key).unwrap();
    let mut healthy = false;
    for _ in 0..SESSIONS_TRIES {
        healthy |= store.check_health().is_ok();
    }
    assert!(healthy);
}

/// The token's directory disappears under the store (SoftHSM2: token objects become invalid
/// handles, session objects survive) and comes back (SoftHSM2 sees it again only after
/// `C_Finalize` and `C_Initialize`): every failure on the way is "unavailable", and the store
/// recovers by itself — a persistent key pair's handle taken before the loss signs again, a
/// BDK derives again, and a transient key of the old opening is refused without harm.
#[test]
fn a_token_that_disappears_and_returns_is_recovered() {
    let (_serial, fixture) = fixture();
    let store = &fixture.store;
    let id = bdk_id("A9000001");
    store.import_bdk(id, &key_bytes(KAT_BDK)).unwrap();
    let data =
        DerivationData::initial_key(KeyAlgorithm::Aes128, "A900000100000001".parse().unwrap());
    let label: KeyLabel = "test-recovery".parse().unwrap();
    let (key_pair, _) = store.generate_ec_p256(&label, true).unwrap();
    let old_key = store
        .derive(DeriveBase::Bdk(id), &data, KeyPurpose::Check)
        .unwrap();
    let kcv = store.kcv(&old_key).unwrap();
    store.check_health().unwrap();

    let tokens = fixture.hsm.path().join("tokens");
    let away = fixture.hsm.path().join("tokens.away");
    std::fs::rename(&tokens, &away).unwrap();
    // Signatures use a session copy of the key, which outlives the token's files; readiness
    // signs with the token object and sees the loss, and the store starts recovering.
    let error = store
        .check_health()
        .expect_err("healthy with a token that is gone");
    assert!(error.is_unavailable(), "{error:?}");
    // While the token is gone, every call fails as unavailable (recovering, or busy).
    for _ in 0..3 {
        let error = store.sign_p256_sha256(&key_pair, b"x").unwrap_err();
        assert!(error.is_unavailable(), "{error:?}");
        let error = store.check_health().unwrap_err();
        assert!(error.is_unavailable(), "{error:?}");
        std::thread::sleep(nfcpay_keystore::pkcs11::RECOVERY_BACKOFF_MIN);
    }
    std::fs::rename(&away, &tokens).unwrap();

    // Recovery is tried again within the longest backoff.
    let deadline = std::time::Instant::now() + 5 * nfcpay_keystore::pkcs11::RECOVERY_BACKOFF_MAX;
    let signature = loop {
        match store.sign_p256_sha256(&key_pair, b"after") {
            Ok(signature) => break signature,
            Err(error) if error.is_unavailable() && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(error) => panic!("did not recover: {error:?}"),
        }
    };
    assert_eq!(signature.len(), 64);
    let new_key = store
        .derive(DeriveBase::Bdk(id), &data, KeyPurpose::Check)
        .unwrap();
    assert_eq!(store.kcv(&new_key).unwrap(), kcv);
    // The old opening's transient key is gone; its number is not used on the new one.
    assert!(matches!(
        store.kcv(&old_key),
        Err(KeystoreError::UnknownKey)
    ));
    store.destroy(old_key).unwrap();
    store.destroy(new_key).unwrap();
    store.check_health().unwrap();
    store.destroy_ec(key_pair).unwrap();
    assert!(store.find_ec_p256(&label).unwrap().is_none());
}

/// BDK IDs not seen yet are searched in the token (so a BDK added while the store is open is
/// found), at most `BDK_SEARCHES_PER_SECOND_MAX` a second: beyond it a lookup is "busy"
/// (retryable), not "unknown"; an ID found missing is remembered without another search.
#[test]
fn searches_for_new_bdk_ids_are_rate_limited() {
    use nfcpay_keystore::pkcs11::BDK_SEARCHES_PER_SECOND_MAX;
    let (_serial, fixture) = fixture();
    let store = &fixture.store;
    let (mut unknown, mut busy) = (0, 0);
    for n in 0..BDK_SEARCHES_PER_SECOND_MAX * 3 {
        match store.bdk_info(BdkId::from((0xB000_0000_u32 + n).to_be_bytes())) {
            Err(KeystoreError::UnknownBdk(_)) => unknown += 1,
            Err(error @ KeystoreError::Busy { .. }) => {
                assert!(error.is_unavailable());
                busy += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(unknown >= 1, "no search ran");
    assert!(busy >= 1, "{unknown} searches, none refused as busy");
    // Remembered as missing: no search needed, so not busy.
    assert!(matches!(
        store.bdk_info(BdkId::from(0xB000_0000_u32.to_be_bytes())),
        Err(KeystoreError::UnknownBdk(_))
    ));
    // A BDK stored meanwhile is found (created through the store: cached at once).
    let id = bdk_id("B1000001");
    store.import_bdk(id, &key_bytes(KAT_BDK)).unwrap();
    assert_eq!(store.bdk_info(id).unwrap().bdk_id, id);
}

/// `bdk_info` for an ID the store has not seen, waiting out the per-second search budget
/// when an earlier test of this binary spent it.
fn search_bdk(
    store: &Pkcs11Keystore,
    id: BdkId,
) -> Result<nfcpay_keystore::BdkInfo, KeystoreError> {
    for _ in 0..3 {
        match store.bdk_info(id) {
            Err(KeystoreError::Busy { .. }) => {
                std::thread::sleep(std::time::Duration::from_millis(1_100))
            }
            other => return other,
        }
    }
    store.bdk_info(id)
}

#[test]
fn a_bdk_id_found_missing_is_searched_for_again_once_its_memory_expires() {
    use std::time::{Duration, Instant};
    let (_serial, fixture) = fixture();
    let store = &fixture.store;
    let memory = Duration::from_secs(2);
    store.set_unknown_bdk_recheck_interval(memory);
    let id = bdk_id("B2000001");
    assert!(matches!(
        search_bdk(store, id),
        Err(KeystoreError::UnknownBdk(_))
    ));
    let missed = Instant::now();
    // Another keystore on the token (as `nfcpay-admin bdk generate` would be) adds it.
    let other = Pkcs11Keystore::open(&fixture.uri).unwrap();
    other.import_bdk(id, &key_bytes(KAT_BDK)).unwrap();
    drop(other);
    // Within the memory the token is not searched again: still unknown.
    let remembered = store.bdk_info(id);
    if missed.elapsed() < memory {
        assert!(
            matches!(remembered, Err(KeystoreError::UnknownBdk(_))),
            "{remembered:?}"
        );
    }
    // Once it expires, the next use searches and finds it.
    std::thread::sleep(memory.saturating_sub(missed.elapsed()) + Duration::from_millis(100));
    let found = search_bdk(store, id);
    store.set_unknown_bdk_recheck_interval(nfcpay_keystore::pkcs11::UNKNOWN_BDK_RECHECK_INTERVAL);
    assert_eq!(found.unwrap().bdk_id, id);
}

/// Enough health checks to cycle through every pooled session.
const SESSIONS_TRIES: usize = nfcpay_keystore::pkcs11::SESSIONS_MAX + 2;

#[test]
fn opening_refuses_a_missing_token_or_module() {
    let (_serial, fixture) = fixture();
    let mut text = format!("{:?}", fixture.uri);
    assert!(!text.contains(PIN));
    let pin_source = fixture.uri.pin_source().unwrap().display().to_string();
    text = format!("pkcs11:token=no-such-token?module-path={MODULE}&pin-source=file:{pin_source}");
    assert!(matches!(
        Pkcs11Keystore::open(&text.parse().unwrap()),
        Err(KeystoreError::TokenNotFound(_))
    ));
    text = format!(
        "pkcs11:token={TOKEN_LABEL}?module-path=/nonexistent/libnothing.so&pin-source=file:{pin_source}"
    );
    assert_module_load_error(
        Pkcs11Keystore::open(&text.parse().unwrap()),
        "/nonexistent/libnothing.so",
    );
}

#[test]
fn a_file_that_is_not_a_pkcs11_module_is_a_module_load_error_with_its_cause() {
    let directory = tempfile::tempdir().unwrap();
    let module = directory.path().join("libnot-a-module.so");
    std::fs::write(&module, "not a shared object\n").unwrap();
    let pin = directory.path().join("pin");
    std::fs::write(&pin, PIN).unwrap();
    let text = format!(
        "pkcs11:token={TOKEN_LABEL}?module-path={}&pin-source=file:{}",
        module.display(),
        pin.display()
    );
    assert_module_load_error(
        Pkcs11Keystore::open(&text.parse().unwrap()),
        &module.display().to_string(),
    );
}

/// Asserts that opening failed to load the module at `path`, keeping cryptoki's error and,
/// under it, the dynamic loader's as causes, each shown once in the printed chain.
fn assert_module_load_error(result: Result<Pkcs11Keystore, KeystoreError>, path: &str) {
    let error = match result {
        Err(error @ KeystoreError::ModuleLoad { .. }) => error,
        Err(other) => panic!("expected a module load error, got {other:?}"),
        Ok(_) => panic!("a store opened with module {path}"),
    };
    assert!(!error.is_unavailable());
    let message = error.to_string();
    assert!(message.contains(path), "{message}");
    let Some(cause) = std::error::Error::source(&error) else {
        panic!("the module load error lost its cause: {error:?}")
    };
    let Some(load) = cause.downcast_ref::<nfcpay_keystore::ModuleLoadError>() else {
        panic!("the cause is not the module's load error: {cause:?}")
    };
    assert!(
        matches!(load.cryptoki(), cryptoki::error::Error::LibraryLoading(_)),
        "{:?}",
        load.cryptoki()
    );
    let Some(loader) = cause.source() else {
        panic!("the dynamic loader's words are lost: {cause:?}")
    };
    let loader_words = loader.to_string();
    assert!(loader_words.contains(path), "{loader_words}");
    let chain = nfcpay_protocol::ErrorChain(&error).to_string();
    assert_eq!(chain, format!("{message}: {cause}: {loader_words}"));
    assert_eq!(chain.matches(&loader_words).count(), 1, "{chain}");
    assert!(!format!("{error:?}").contains(PIN));
}
