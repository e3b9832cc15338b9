//! The terminal's DUKPT keys (`nfcpay_terminal_agent::keys`) over the PKCS#11 backend, on a
//! fresh SoftHSM2 token per check: the published X9.24-3 AES-128 sequence across a reopen
//! between every transaction, a crash injected at every keystore step of a transaction, and
//! the register keys being sensitive, non-extractable token objects.
//!
//! `harness = false` (libtest-mimic), like `keystore/tests/conformance.rs`: SoftHSM2 reads
//! `SOFTHSM2_CONF` when the module initialises, and `main` sets it before any other thread
//! exists. The terminal's token holds the vectors' BDK only so that the test can derive the
//! initial key in it; a real terminal receives its initial key wrapped at enrollment.

// A panic is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use nfcpay_protocol::test_vectors as x9_24_3_vectors;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use cryptoki::context::Pkcs11;
use cryptoki::object::{Attribute, AttributeType, ObjectClass};
use libtest_mimic::{Arguments, Trial};
use nfcpay_keystore::components::clear_key_kcv;
use nfcpay_keystore::dukpt::initial_key;
use nfcpay_keystore::pkcs11::Pkcs11Keystore;
use nfcpay_keystore::software::SoftwareKeystore;
use nfcpay_keystore::testing::{
    FailingKeystore, SOFTHSM2_MODULE, SoftHsmDir, assert_fresh_transaction, pin_key_kcv, token_uri,
};
use nfcpay_keystore::{KeyPurpose, Keystore, KeystoreError};
use nfcpay_protocol::InitialKeyId;
use nfcpay_protocol::dukpt::KeyAlgorithm;
use nfcpay_terminal_agent::keys::{STATE_FILE_NAME, TerminalKeyState, register_label};
use x9_24_3_vectors::{AES128_BDK, AES128_TERMINAL_KSN_SEQUENCE};
use zeroize::Zeroizing;

const PIN: &str = "keys-pkcs11-pin";
const LABELS: [&str; 3] = ["keys-vectors", "keys-crash", "keys-attributes"];

static TOKEN_DIR: OnceLock<PathBuf> = OnceLock::new();

fn main() {
    // All tokens first: SoftHSM2 sees only the tokens that exist when the module initialises.
    // SAFETY: `main` runs before this process starts any other thread (libtest-mimic starts
    // its threads later, in `run`), so nothing reads the environment concurrently.
    #[allow(unsafe_code)]
    let hsm = unsafe { SoftHsmDir::for_this_process(PIN, &LABELS) };
    TOKEN_DIR.set(hsm.path().to_owned()).unwrap();
    let trials = vec![
        Trial::test(
            "pkcs11::published vectors across a reopen between every transaction",
            || {
                published_vectors(LABELS[0]);
                Ok(())
            },
        ),
        Trial::test(
            "pkcs11::a crash at any step never reuses a counter or a used key",
            || {
                crash_at_every_step(LABELS[1]);
                Ok(())
            },
        ),
        Trial::test("pkcs11::register keys are sensitive token objects", || {
            registers_stay_in_the_token(LABELS[2]);
            Ok(())
        }),
    ];
    let conclusion = libtest_mimic::run(&Arguments::from_args(), trials);
    drop(hsm);
    conclusion.exit();
}

fn token_store(label: &str) -> Arc<Pkcs11Keystore> {
    let dir = TOKEN_DIR.get().unwrap();
    Arc::new(Pkcs11Keystore::open(&token_uri(dir, label, SOFTHSM2_MODULE)).unwrap())
}

fn initial_key_id() -> InitialKeyId {
    AES128_BDK.initial_key_id.parse().unwrap()
}

fn bdk() -> Zeroizing<Vec<u8>> {
    Zeroizing::new(hex::decode(AES128_BDK.bdk).unwrap())
}

/// The host: the vectors' BDK in a software store.
fn host() -> SoftwareKeystore {
    let host = SoftwareKeystore::in_memory();
    host.import_bdk(initial_key_id().bdk_id(), &bdk()).unwrap();
    host
}

/// Loads the vectors' initial key into a fresh terminal directory over `store`.
fn load(store: Arc<dyn Keystore>, dir: &Path) -> TerminalKeyState {
    match store.import_bdk(initial_key_id().bdk_id(), &bdk()) {
        Ok(_) | Err(KeystoreError::BdkExists(_)) => {}
        Err(error) => panic!("{error}"),
    }
    let ik = initial_key(store.as_ref(), initial_key_id(), KeyPurpose::Derive).unwrap();
    TerminalKeyState::load_initial_key(store, dir, ik, KeyAlgorithm::Aes128, initial_key_id())
        .unwrap()
}

fn published_vectors(label: &str) {
    let store: Arc<dyn Keystore> = token_store(label);
    let dir = tempfile::tempdir().unwrap();
    drop(load(Arc::clone(&store), dir.path()));
    for expected in AES128_TERMINAL_KSN_SEQUENCE {
        let mut state = TerminalKeyState::open(Arc::clone(&store), dir.path()).unwrap();
        let (ksn, key) = state.next_transaction().unwrap();
        assert_eq!(ksn.to_string(), *expected);
        let pin = AES128_BDK.working_key(expected, "PIN").unwrap();
        let expected_kcv = clear_key_kcv(&hex::decode(pin.key).unwrap()).unwrap();
        assert_eq!(
            pin_key_kcv(store.as_ref(), key.handle(), ksn).unwrap(),
            expected_kcv
        );
    }
    let state = TerminalKeyState::open(Arc::clone(&store), dir.path()).unwrap();
    assert_eq!(state.status().next_counter, Some(9));
}

fn crash_at_every_step(label: &str) {
    let token: Arc<dyn Keystore> = token_store(label);
    let host = host();
    for crash_counter in [1u32, 2, 4, 8] {
        let steps = 2 * crash_counter.trailing_zeros() as usize + 1;
        for fail_at in 0..steps {
            let dir = tempfile::tempdir().unwrap();
            let mut state = load(Arc::clone(&token), dir.path());
            let mut handed_out = Vec::new();
            while state.status().next_counter != Some(crash_counter) {
                handed_out.push(state.next_transaction().unwrap().0);
            }
            drop(state);
            let failing = Arc::new(FailingKeystore::new(Arc::clone(&token), fail_at));
            let mut state = TerminalKeyState::open(Arc::clone(&failing) as _, dir.path()).unwrap();
            failing.arm();
            assert!(state.next_transaction().is_err());
            if let Ok((ksn, _)) = state.next_transaction() {
                handed_out.push(ksn);
            }
            drop(state); // the crash

            let mut state = TerminalKeyState::open(Arc::clone(&token), dir.path()).unwrap();
            for _ in 0..3 {
                let (ksn, key) = state.next_transaction().unwrap();
                assert_fresh_transaction(
                    token.as_ref(),
                    &host,
                    &mut handed_out,
                    (ksn, key.handle()),
                    &format!("a crash at step {fail_at} of {crash_counter:#x}"),
                );
            }
            // A used register's key is gone from the token.
            let used = handed_out.last().unwrap().counter().get().trailing_zeros() as usize;
            assert!(token.load_key(&register_label(used)).unwrap().is_none());
        }
    }
}

fn registers_stay_in_the_token(label: &str) {
    let store: Arc<dyn Keystore> = token_store(label);
    let dir = tempfile::tempdir().unwrap();
    let mut state = load(Arc::clone(&store), dir.path());
    state.next_transaction().unwrap();
    let mode = std::fs::metadata(dir.path().join(STATE_FILE_NAME))
        .unwrap()
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    let context = Pkcs11::new(SOFTHSM2_MODULE).unwrap();
    let slot = context
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|slot| context.get_token_info(*slot).unwrap().label() == label)
        .unwrap();
    let session = context.open_ro_session(slot).unwrap();
    let find = |register: usize| {
        session
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Token(true),
                Attribute::Label(register_label(register).as_str().as_bytes().to_vec()),
            ])
            .unwrap()
    };
    // Counter 1 used register 0; registers 1 to 31 remain, one token object each.
    assert!(find(0).is_empty());
    for register in 1..32 {
        let objects = find(register);
        assert_eq!(objects.len(), 1, "register {register}");
        let attributes = session
            .get_attributes(
                objects[0],
                &[
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::Derive,
                    AttributeType::Sign,
                    AttributeType::Encrypt,
                ],
            )
            .unwrap();
        assert_eq!(
            attributes,
            [
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Derive(true),
                Attribute::Sign(false),
                Attribute::Encrypt(false),
            ],
            "register {register}"
        );
    }
    drop(state);
}
