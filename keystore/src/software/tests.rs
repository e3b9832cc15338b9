//! Tests of the software backend: every error path, the state file, and known answers through
//! the trait.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nfcpay_protocol::dukpt::{DerivationData, KeyAlgorithm};
use nfcpay_protocol::{BdkId, ErrorChain, InitialKeyId, Ksn};
use p256::ecdsa::signature::Verifier;
use zeroize::Zeroizing;

use super::{SoftwareKeystore, crypto};
use crate::{
    DeriveBase, GCM_NONCE_BYTES, Kcv, KeyHandle, KeyLabel, KeyPurpose, Keystore, KeystoreError,
    dukpt,
};

const ALL_PURPOSES: [KeyPurpose; 6] = [
    KeyPurpose::Derive,
    KeyPurpose::Export,
    KeyPurpose::Encrypt,
    KeyPurpose::Mac,
    KeyPurpose::Wrap,
    KeyPurpose::Check,
];

fn bytes(text: &str) -> Vec<u8> {
    hex::decode(text).unwrap()
}

fn bdk_id(text: &str) -> BdkId {
    text.parse().unwrap()
}

fn label(text: &str) -> KeyLabel {
    text.parse().unwrap()
}

fn secret(text: &str) -> Zeroizing<Vec<u8>> {
    Zeroizing::new(bytes(text))
}

fn kcv_of(key_hex: &str) -> Kcv {
    crypto::kcv(&bytes(key_hex)).unwrap()
}

/// A fresh directory and the path of a store file inside it (not yet created).
fn store_path() -> (tempfile::TempDir, PathBuf) {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("keystore.json");
    (directory, path)
}

fn mode_of(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn directory_entries(directory: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(directory)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Asserts that opening failed on the file — [`KeystoreError::Io`], or
/// [`KeystoreError::SoftwareStoreDecode`] for a file that is not a keystore's JSON, with
/// serde_json's error as its source — and that the error mentions `needle` (an `Io` error in
/// its message, a decode error in its message or its source's).
fn assert_io_error_mentions(result: Result<SoftwareKeystore, KeystoreError>, needle: &str) {
    match result {
        Err(KeystoreError::Io { message, .. }) => {
            assert!(message.contains(needle), "{message:?} lacks {needle:?}");
        }
        Err(error @ KeystoreError::SoftwareStoreDecode { .. }) => {
            let Some(source) = std::error::Error::source(&error) else {
                panic!("a decode error without its cause: {error:?}")
            };
            assert!(source.is::<serde_json::Error>(), "{source:?}");
            let text = format!("{error}: {source}");
            assert!(text.contains(needle), "{text:?} lacks {needle:?}");
        }
        Err(other) => panic!("expected an I/O error mentioning {needle:?}, got {other}"),
        Ok(_) => panic!("expected an I/O error mentioning {needle:?}, the store opened"),
    }
}

/// Derivation data for an AES-128 key (contents do not matter here).
fn some_data() -> DerivationData {
    DerivationData::initial_key(KeyAlgorithm::Aes128, "1234567890123456".parse().unwrap())
}

// --- State file -----------------------------------------------------------------------------

#[test]
fn open_creates_a_private_file_and_reopens_it() {
    let (directory, path) = store_path();
    let store = SoftwareKeystore::open(&path).unwrap();
    assert_eq!(mode_of(&path), 0o600);
    assert!(store.list_bdks().unwrap().is_empty());
    drop(store);
    let store = SoftwareKeystore::open(&path).unwrap();
    assert!(store.list_bdks().unwrap().is_empty());
    assert_eq!(directory_entries(directory.path()), ["keystore.json"]);
}

#[test]
fn bdks_persist_sorted_and_derive_the_same_keys_after_reopening() {
    let (directory, path) = store_path();
    let store = SoftwareKeystore::open(&path).unwrap();
    let generated = store
        .generate_bdk(bdk_id("BBBB0000"), KeyAlgorithm::Aes256)
        .unwrap();
    let imported = store
        .import_bdk(
            bdk_id("AAAA0000"),
            &secret("FEDCBA9876543210F1F1F1F1F1F1F1F1"),
        )
        .unwrap();
    store
        .generate_bdk(bdk_id("CCCC0000"), KeyAlgorithm::Aes192)
        .unwrap();
    assert_eq!(imported.kcv, kcv_of("FEDCBA9876543210F1F1F1F1F1F1F1F1"));
    assert_eq!(imported.algorithm, KeyAlgorithm::Aes128);
    let derived_kcv = |store: &SoftwareKeystore| {
        let key = store
            .derive(
                DeriveBase::Bdk(bdk_id("BBBB0000")),
                &some_data(),
                KeyPurpose::Check,
            )
            .unwrap();
        let kcv = store.kcv(&key).unwrap();
        store.destroy(key).unwrap();
        kcv
    };
    let before = derived_kcv(&store);
    let listed = store.list_bdks().unwrap();
    drop(store);

    let store = SoftwareKeystore::open(&path).unwrap();
    assert_eq!(store.list_bdks().unwrap(), listed);
    let ids: Vec<String> = listed.iter().map(|info| info.bdk_id.to_string()).collect();
    assert_eq!(ids, ["AAAA0000", "BBBB0000", "CCCC0000"]);
    assert_eq!(store.bdk_info(bdk_id("BBBB0000")).unwrap(), generated);
    assert_eq!(derived_kcv(&store), before);
    assert_eq!(mode_of(&path), 0o600, "a save keeps the file private");
    assert_eq!(
        directory_entries(directory.path()),
        ["keystore.json"],
        "a save leaves no temporary file"
    );
}

#[test]
fn duplicate_bdk_is_refused_and_leaves_the_file_unchanged() {
    let (_directory, path) = store_path();
    let store = SoftwareKeystore::open(&path).unwrap();
    let first = store
        .import_bdk(bdk_id("12345678"), &secret(&"11".repeat(32)))
        .unwrap();
    let file_before = fs::read(&path).unwrap();
    for result in [
        store.generate_bdk(bdk_id("12345678"), KeyAlgorithm::Aes128),
        store.import_bdk(bdk_id("12345678"), &secret(&"22".repeat(16))),
    ] {
        assert!(matches!(result, Err(KeystoreError::BdkExists(id)) if id == bdk_id("12345678")));
    }
    assert_eq!(fs::read(&path).unwrap(), file_before);
    assert_eq!(store.list_bdks().unwrap(), [first]);
}

#[test]
fn import_refuses_keys_of_the_wrong_length() {
    let store = SoftwareKeystore::in_memory();
    for length in [0, 8, 15, 17, 31, 33, 64] {
        let result = store.import_bdk(bdk_id("12345678"), &Zeroizing::new(vec![1u8; length]));
        assert!(
            matches!(result, Err(KeystoreError::InvalidInput { .. })),
            "{length} bytes accepted"
        );
    }
    assert!(store.list_bdks().unwrap().is_empty());
}

#[test]
fn unknown_bdks_are_reported() {
    let store = SoftwareKeystore::in_memory();
    let missing = bdk_id("DEADBEEF");
    assert!(matches!(store.bdk_info(missing), Err(KeystoreError::UnknownBdk(id)) if id == missing));
    assert!(matches!(
        store.derive(DeriveBase::Bdk(missing), &some_data(), KeyPurpose::Derive),
        Err(KeystoreError::UnknownBdk(_))
    ));
}

#[test]
fn group_or_world_accessible_files_are_refused() {
    let (_directory, path) = store_path();
    drop(SoftwareKeystore::open(&path).unwrap());
    for mode in [0o640, 0o604, 0o644, 0o660, 0o602] {
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        assert_io_error_mentions(SoftwareKeystore::open(&path), "chmod 600");
    }
    fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
    SoftwareKeystore::open(&path).unwrap();
}

#[test]
fn a_directory_is_not_a_state_file() {
    let directory = tempfile::tempdir().unwrap();
    fs::set_permissions(directory.path(), fs::Permissions::from_mode(0o700)).unwrap();
    assert_io_error_mentions(
        SoftwareKeystore::open(directory.path()),
        "not a regular file",
    );
}

#[test]
fn corrupt_files_are_refused_with_a_clear_error() {
    let (_directory, path) = store_path();
    let store = SoftwareKeystore::open(&path).unwrap();
    let key_hex = "00112233445566778899aabbccddeeff";
    store
        .import_bdk(bdk_id("12345678"), &secret(key_hex))
        .unwrap();
    store.generate_ec_p256(&label("ecdh"), true).unwrap();
    drop(store);
    let good = fs::read_to_string(&path).unwrap();
    let good_kcv = kcv_of(key_hex).to_string();

    let cases: Vec<(String, &str)> = vec![
        (String::new(), "empty"),
        ("not json".to_owned(), "corrupt"),
        (good[..good.len() / 2].to_owned(), "corrupt"),
        (good.replace(key_hex, "00112233"), "corrupt"),
        (good.replace(key_hex, &"zz".repeat(16)), "not hex"),
        (
            good.replace(key_hex, &"ff".repeat(16)),
            "does not match its KCV",
        ),
        (good.replace(&good_kcv, "000000"), "does not match its KCV"),
        (
            good.replace("\"aes128\"", "\"aes512\""),
            "unknown algorithm",
        ),
        (good.replace("\"12345678\"", "\"1234\""), "BDK ID"),
        (
            good.replace("\"version\": 1", "\"version\": 2"),
            "version 2",
        ),
        (good.replace("nfcpay-software-keystore", "other"), "format"),
        (good.replace("\"ecdh\"", "\"with space\""), "label"),
        (
            good.replace("\"bdk_id\"", "\"extra\": 1, \"bdk_id\""),
            "unknown field",
        ),
        (good.replace("\"bdks\"", "\"bdkz\""), "corrupt"),
    ];
    for (contents, needle) in cases {
        fs::write(&path, &contents).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let result = SoftwareKeystore::open(&path);
        if let Err(error) = &result {
            let chain = ErrorChain(error).to_string();
            assert!(!chain.contains(key_hex), "an error quotes the key: {chain}");
            assert!(
                !format!("{error:?}").contains(key_hex),
                "an error's Debug quotes the key: {error:?}"
            );
        }
        assert_io_error_mentions(result, needle);
    }

    // A BDK listed twice, and an EC scalar that is not a valid P-256 key.
    let value: serde_json::Value = serde_json::from_str(&good).unwrap();
    let mut twice = value.clone();
    let bdk = twice["bdks"][0].clone();
    twice["bdks"].as_array_mut().unwrap().push(bdk);
    let mut zero_scalar = value.clone();
    zero_scalar["ec_keys"][0]["private_key"] = serde_json::Value::from("00".repeat(32));
    for (contents, needle) in [(twice, "appears twice"), (zero_scalar, "P-256")] {
        fs::write(&path, contents.to_string()).unwrap();
        assert_io_error_mentions(SoftwareKeystore::open(&path), needle);
    }

    fs::write(&path, &good).unwrap();
    SoftwareKeystore::open(&path).unwrap();
}

#[test]
fn a_file_that_is_not_a_keystores_json_is_a_decode_error_with_serde_json_as_its_cause() {
    let (_directory, path) = store_path();
    fs::write(
        &path,
        "{\"format\": \"nfcpay-software-keystore\", \"version\": ",
    )
    .unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    let error = match SoftwareKeystore::open(&path) {
        Err(error @ KeystoreError::SoftwareStoreDecode { .. }) => error,
        Err(other) => panic!("expected a decode error, got {other:?}"),
        Ok(_) => panic!("a cut-short file opened"),
    };
    let Some(source) = std::error::Error::source(&error) else {
        panic!("the decode error lost its cause: {error:?}")
    };
    let Some(json) = source.downcast_ref::<serde_json::Error>() else {
        panic!("the cause is not serde_json's: {source:?}")
    };
    assert!(json.is_eof(), "{json}");
    // The message names the file and leaves serde_json's words to the chain, which shows
    // them once.
    let message = error.to_string();
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(message.contains("corrupt"), "{message}");
    assert!(!message.contains(&json.to_string()), "{message}");
    let chain = ErrorChain(&error).to_string();
    assert_eq!(chain, format!("{message}: {json}"));
    assert!(!error.is_unavailable());
}

#[test]
fn oversized_files_are_refused_before_reading() {
    let (_directory, path) = store_path();
    fs::write(
        &path,
        vec![b' '; usize::try_from(super::file::FILE_BYTES_MAX).unwrap() + 1],
    )
    .unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    assert_io_error_mentions(SoftwareKeystore::open(&path), "larger than");
}

#[test]
fn health_check_notices_a_missing_file() {
    let (_directory, path) = store_path();
    let store = SoftwareKeystore::open(&path).unwrap();
    store.check_health().unwrap();
    fs::remove_file(&path).unwrap();
    assert!(matches!(
        store.check_health(),
        Err(KeystoreError::Io { .. })
    ));
    SoftwareKeystore::in_memory().check_health().unwrap();
}

#[test]
fn a_failed_save_leaves_the_store_unchanged() {
    let (directory, path) = store_path();
    let store = SoftwareKeystore::open(&path).unwrap();
    let name = label("kept");
    let (private, _) = store.generate_ec_p256(&name, true).unwrap();
    // With its directory gone no save can succeed, whoever runs the test (root included).
    fs::remove_dir_all(directory.path()).unwrap();
    assert!(matches!(
        store.generate_bdk(bdk_id("12345678"), KeyAlgorithm::Aes128),
        Err(KeystoreError::Io { .. })
    ));
    assert!(store.list_bdks().unwrap().is_empty());
    assert!(matches!(
        store.generate_ec_p256(&label("new"), true),
        Err(KeystoreError::Io { .. })
    ));
    assert!(store.find_ec_p256(&label("new")).unwrap().is_none());
    assert!(matches!(
        store.destroy_ec(private),
        Err(KeystoreError::Io { .. })
    ));
    let (found, _) = store.find_ec_p256(&name).unwrap().unwrap();
    store.sign_p256_sha256(&found, b"still usable").unwrap();
    assert!(store.check_health().is_err());
}

// --- Purposes and handles -------------------------------------------------------------------

#[test]
fn every_purpose_allows_exactly_its_operations() {
    let store = SoftwareKeystore::in_memory();
    let nonce = [0u8; GCM_NONCE_BYTES];
    let kek = store.insert_key_for_test(&[9u8; 32], KeyPurpose::Wrap);
    let exportable = store.insert_key_for_test(&[8u8; 16], KeyPurpose::Export);
    for purpose in ALL_PURPOSES {
        let key = store.insert_key_for_test(&[7u8; 16], purpose);
        let derived = store.derive(DeriveBase::Key(&key), &some_data(), KeyPurpose::Check);
        let gcm = store.gcm_encrypt(&key, &nonce, b"", b"data").map(drop);
        let gcm_open = store.gcm_decrypt(&key, &nonce, b"", &[0u8; 16]).map(drop);
        let cmac = store.cmac_generate(&key, b"data").map(drop);
        let cmac_check = store.cmac_verify(&key, b"data", &[0u8; 16]);
        let kcv = store.kcv(&key).map(drop);
        let wrap_with = store.wrap_key(&key, &exportable).map(drop);
        let unwrap_with = store
            .unwrap_key(&key, &[0u8; 24], KeyAlgorithm::Aes128, KeyPurpose::Check)
            .map(drop);
        let wrapped = store.wrap_key(&kek, &key).map(drop);

        let permitted = |result: &Result<(), KeystoreError>| {
            !matches!(result, Err(KeystoreError::KeyNotPermitted))
        };
        let expect = |operation: &str, result: Result<(), KeystoreError>, allowed: bool| {
            assert_eq!(
                permitted(&result),
                allowed,
                "{operation} with a {purpose:?} key: {result:?}"
            );
        };
        expect(
            "derive",
            derived.map(|key| store.destroy(key).unwrap()),
            matches!(purpose, KeyPurpose::Derive | KeyPurpose::Export),
        );
        expect("GCM encrypt", gcm, purpose == KeyPurpose::Encrypt);
        expect("GCM decrypt", gcm_open, purpose == KeyPurpose::Encrypt);
        expect("CMAC", cmac, purpose == KeyPurpose::Mac);
        expect("CMAC verify", cmac_check, purpose == KeyPurpose::Mac);
        expect(
            "KCV",
            kcv,
            matches!(purpose, KeyPurpose::Mac | KeyPurpose::Check),
        );
        expect("wrap with", wrap_with, purpose == KeyPurpose::Wrap);
        expect("unwrap with", unwrap_with, purpose == KeyPurpose::Wrap);
        expect("be wrapped", wrapped, purpose == KeyPurpose::Export);
        store.destroy(key).unwrap();
    }
}

#[test]
fn destroyed_and_foreign_handles_are_unknown() {
    let store = SoftwareKeystore::in_memory();
    let other_store = SoftwareKeystore::in_memory();
    let nonce = [0u8; GCM_NONCE_BYTES];
    let key = store.insert_key_for_test(&[7u8; 32], KeyPurpose::Mac);
    let copy = KeyHandle::new(key.id(), key.algorithm());
    store.destroy(key).unwrap();
    let foreign = other_store.insert_key_for_test(&[7u8; 16], KeyPurpose::Encrypt);
    let wrong_length = KeyHandle::new(foreign.id(), KeyAlgorithm::Aes256);
    for handle in [&copy, &foreign, &wrong_length] {
        let unknown = |result: Result<(), KeystoreError>| {
            assert!(
                matches!(result, Err(KeystoreError::UnknownKey)),
                "{handle:?}: {result:?}"
            );
        };
        unknown(store.kcv(handle).map(drop));
        unknown(store.cmac_generate(handle, b"").map(drop));
        unknown(store.cmac_verify(handle, b"", &[0u8; 16]));
        unknown(store.gcm_encrypt(handle, &nonce, b"", b"").map(drop));
        unknown(store.gcm_decrypt(handle, &nonce, b"", &[0u8; 16]).map(drop));
        unknown(
            store
                .derive(DeriveBase::Key(handle), &some_data(), KeyPurpose::Derive)
                .map(drop),
        );
        unknown(store.wrap_key(handle, handle).map(drop));
        unknown(
            store
                .unwrap_key(handle, &[0u8; 24], KeyAlgorithm::Aes128, KeyPurpose::Mac)
                .map(drop),
        );
    }
    unknown_destroy(&store, copy);
    unknown_destroy(&store, wrong_length);
    other_store.destroy(foreign).unwrap();

    let (private, _) = store.generate_ec_p256(&label("t"), false).unwrap();
    let private_copy = crate::PrivateKeyHandle::new(private.id());
    store.destroy_ec(private).unwrap();
    assert!(matches!(
        store.sign_p256_sha256(&private_copy, b"m"),
        Err(KeystoreError::UnknownKey)
    ));
    let (_, peer) = other_store.generate_ec_p256(&label("p"), false).unwrap();
    assert!(matches!(
        store.ecdh_kek(&private_copy, &peer, b"c"),
        Err(KeystoreError::UnknownKey)
    ));
    assert!(matches!(
        store.destroy_ec(private_copy),
        Err(KeystoreError::UnknownKey)
    ));
}

fn unknown_destroy(store: &SoftwareKeystore, handle: KeyHandle) {
    assert!(matches!(
        store.destroy(handle),
        Err(KeystoreError::UnknownKey)
    ));
}

// --- Known answers through the trait --------------------------------------------------------

#[test]
fn cmac_with_a_mac_key_matches_rfc_4493_example_1() {
    let store = SoftwareKeystore::in_memory();
    let key =
        store.insert_key_for_test(&bytes("2b7e151628aed2a6abf7158809cf4f3c"), KeyPurpose::Mac);
    let tag = store.cmac_generate(&key, b"").unwrap();
    assert_eq!(hex::encode(tag), "bb1d6929e95937287fa37d129b756746");
    store.cmac_verify(&key, b"", &tag).unwrap();
    let mut bad = tag;
    bad[0] ^= 1;
    assert!(matches!(
        store.cmac_verify(&key, b"", &bad),
        Err(KeystoreError::AuthenticationFailed)
    ));
    assert!(matches!(
        store.cmac_verify(&key, b"x", &tag),
        Err(KeystoreError::AuthenticationFailed)
    ));
    assert!(matches!(
        store.cmac_verify(&key, b"", &tag[..4]),
        Err(KeystoreError::AuthenticationFailed)
    ));
    // The KCV is the first 3 bytes of the CMAC of one zero block.
    let zero_block_cmac = store.cmac_generate(&key, &[0u8; 16]).unwrap();
    assert_eq!(store.kcv(&key).unwrap(), Kcv::from_cmac(&zero_block_cmac));
}

#[test]
fn gcm_with_an_encrypt_key_matches_test_case_16_and_refuses_tampering() {
    let store = SoftwareKeystore::in_memory();
    let key = store.insert_key_for_test(
        &bytes("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308"),
        KeyPurpose::Encrypt,
    );
    let nonce: [u8; GCM_NONCE_BYTES] = bytes("cafebabefacedbaddecaf888").try_into().unwrap();
    let aad = bytes("feedfacedeadbeeffeedfacedeadbeefabaddad2");
    let plaintext = bytes(
        "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72\
         1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39",
    );
    let sealed = store.gcm_encrypt(&key, &nonce, &aad, &plaintext).unwrap();
    assert_eq!(
        hex::encode(&sealed[sealed.len() - 16..]),
        "76fc6ece0f4e1768cddf8853bb2d551b"
    );
    assert_eq!(
        &*store.gcm_decrypt(&key, &nonce, &aad, &sealed).unwrap(),
        &plaintext
    );
    let mut tampered = sealed.clone();
    tampered[0] ^= 1;
    assert!(matches!(
        store.gcm_decrypt(&key, &nonce, &aad, &tampered),
        Err(KeystoreError::AuthenticationFailed)
    ));
    assert!(matches!(
        store.gcm_decrypt(&key, &[0u8; GCM_NONCE_BYTES], &aad, &sealed),
        Err(KeystoreError::AuthenticationFailed)
    ));
    for short in [0, 1, 15] {
        assert!(matches!(
            store.gcm_decrypt(&key, &nonce, &aad, &sealed[..short]),
            Err(KeystoreError::InvalidInput { .. })
        ));
    }
}

#[test]
fn wrap_matches_rfc_3394_section_4_1_and_unwrap_checks_integrity() {
    let store = SoftwareKeystore::in_memory();
    let kek =
        store.insert_key_for_test(&bytes("000102030405060708090a0b0c0d0e0f"), KeyPurpose::Wrap);
    let key_hex = "00112233445566778899aabbccddeeff";
    let key = store.insert_key_for_test(&bytes(key_hex), KeyPurpose::Export);
    let wrapped = store.wrap_key(&kek, &key).unwrap();
    assert_eq!(
        hex::encode(&wrapped),
        "1fa68b0a8112b447aef34bd8fb5a7b829d3e862371d2cfe5"
    );
    let unwrapped = store
        .unwrap_key(&kek, &wrapped, KeyAlgorithm::Aes128, KeyPurpose::Check)
        .unwrap();
    assert_eq!(unwrapped.algorithm(), KeyAlgorithm::Aes128);
    assert_eq!(store.kcv(&unwrapped).unwrap(), kcv_of(key_hex));

    let mut tampered = wrapped.clone();
    tampered[10] ^= 1;
    assert!(matches!(
        store.unwrap_key(&kek, &tampered, KeyAlgorithm::Aes128, KeyPurpose::Check),
        Err(KeystoreError::AuthenticationFailed)
    ));
    let other_kek = store.insert_key_for_test(&[0x55; 16], KeyPurpose::Wrap);
    assert!(matches!(
        store.unwrap_key(
            &other_kek,
            &wrapped,
            KeyAlgorithm::Aes128,
            KeyPurpose::Check
        ),
        Err(KeystoreError::AuthenticationFailed)
    ));
    for (length, algorithm) in [
        (16, KeyAlgorithm::Aes128),
        (23, KeyAlgorithm::Aes128),
        (24, KeyAlgorithm::Aes256),
        (0, KeyAlgorithm::Aes128),
    ] {
        let input = vec![0u8; length];
        let input = if length == 24 {
            &wrapped[..]
        } else {
            &input[..]
        };
        assert!(matches!(
            store.unwrap_key(&kek, input, algorithm, KeyPurpose::Check),
            Err(KeystoreError::InvalidInput { .. })
        ));
    }
}

/// ANSI X9.24-3-2017 supplement: initial keys of both BDKs, and the AES-128 BDK's first
/// transaction key (see `nfcpay_protocol::test_vectors`).
#[test]
fn derive_matches_the_x9_24_3_vectors() {
    let store = SoftwareKeystore::in_memory();
    let initial_key_id: InitialKeyId = "1234567890123456".parse().unwrap();
    for (bdk, initial_key) in [
        (
            "FEDCBA9876543210F1F1F1F1F1F1F1F1",
            "1273671EA26AC29AFA4D1084127652A1",
        ),
        (
            "FEDCBA9876543210F1F1F1F1F1F1F1F1FEDCBA9876543210F1F1F1F1F1F1F1F1",
            "CE9CE0C101D1138F97FB6CAD4DF045A7083D4EAE2D35A31789D01CCF0949550F",
        ),
    ] {
        let store = SoftwareKeystore::in_memory();
        store
            .import_bdk(initial_key_id.bdk_id(), &secret(bdk))
            .unwrap();
        let key = dukpt::initial_key(&store, initial_key_id, KeyPurpose::Check).unwrap();
        assert_eq!(store.kcv(&key).unwrap(), kcv_of(initial_key));
        store.destroy(key).unwrap();
    }

    store
        .import_bdk(
            initial_key_id.bdk_id(),
            &secret("FEDCBA9876543210F1F1F1F1F1F1F1F1"),
        )
        .unwrap();
    let ksn: Ksn = "123456789012345600000001".parse().unwrap();
    let key = dukpt::transaction_key(&store, ksn, KeyPurpose::Check).unwrap();
    assert_eq!(
        store.kcv(&key).unwrap(),
        kcv_of("4F21B565BAD9835E112B6465635EAE44")
    );
    store.destroy(key).unwrap();
    assert!(
        store.lock().keys.is_empty(),
        "every intermediate key was destroyed"
    );
}

#[test]
fn a_derived_key_keeps_the_requested_length() {
    let store = SoftwareKeystore::in_memory();
    let base = store.insert_key_for_test(&[3u8; 32], KeyPurpose::Derive);
    let ksn: Ksn = "123456789012345600000001".parse().unwrap();
    for algorithm in [
        KeyAlgorithm::Aes128,
        KeyAlgorithm::Aes192,
        KeyAlgorithm::Aes256,
    ] {
        let data = DerivationData::working_key(
            nfcpay_protocol::dukpt::WorkingKeyUsage::MacBoth,
            algorithm,
            ksn,
        );
        let derived = store
            .derive(DeriveBase::Key(&base), &data, KeyPurpose::Check)
            .unwrap();
        assert_eq!(derived.algorithm(), algorithm);
        let expected = crypto::ecb_encrypt(&[3u8; 32], data.as_bytes()).unwrap();
        assert_eq!(
            store.kcv(&derived).unwrap(),
            crypto::kcv(&expected[..algorithm.key_bytes()]).unwrap()
        );
        store.destroy(derived).unwrap();
    }
}

// --- P-256 ----------------------------------------------------------------------------------

#[test]
fn persistent_key_pairs_sign_persist_and_can_be_destroyed() {
    let (_directory, path) = store_path();
    let store = SoftwareKeystore::open(&path).unwrap();
    let name = label("tls-identity");
    let (private, public) = store.generate_ec_p256(&name, true).unwrap();
    assert_eq!(public.as_bytes()[0], 0x04);
    assert!(matches!(
        store.generate_ec_p256(&name, true),
        Err(KeystoreError::InvalidInput { .. })
    ));
    let signature = store.sign_p256_sha256(&private, b"message").unwrap();
    let verifying_key = p256::ecdsa::VerifyingKey::from_sec1_bytes(public.as_bytes()).unwrap();
    let parsed = p256::ecdsa::Signature::from_slice(&signature).unwrap();
    verifying_key.verify(b"message", &parsed).unwrap();
    assert!(verifying_key.verify(b"other", &parsed).is_err());
    assert_eq!(parsed.normalize_s(), parsed, "s is low");
    drop(store);

    let store = SoftwareKeystore::open(&path).unwrap();
    let (found, found_public) = store.find_ec_p256(&name).unwrap().unwrap();
    assert_eq!(found_public, public);
    let signature = store.sign_p256_sha256(&found, b"again").unwrap();
    verifying_key
        .verify(
            b"again",
            &p256::ecdsa::Signature::from_slice(&signature).unwrap(),
        )
        .unwrap();
    assert!(store.find_ec_p256(&label("absent")).unwrap().is_none());
    store.destroy_ec(found).unwrap();
    assert!(store.find_ec_p256(&name).unwrap().is_none());
    drop(store);

    let store = SoftwareKeystore::open(&path).unwrap();
    assert!(store.find_ec_p256(&name).unwrap().is_none());
}

#[test]
fn transient_key_pairs_are_not_found_or_saved() {
    let (_directory, path) = store_path();
    let store = SoftwareKeystore::open(&path).unwrap();
    let file_before = fs::read(&path).unwrap();
    let (private, _) = store.generate_ec_p256(&label("ephemeral"), false).unwrap();
    assert!(store.find_ec_p256(&label("ephemeral")).unwrap().is_none());
    assert_eq!(fs::read(&path).unwrap(), file_before);
    store.destroy_ec(private).unwrap();
}

#[test]
fn debug_output_shows_no_key() {
    let store = SoftwareKeystore::in_memory();
    store
        .import_bdk(bdk_id("12345678"), &secret(&"ab".repeat(32)))
        .unwrap();
    let shown = format!("{store:?}");
    assert!(!shown.to_lowercase().contains("abab"), "{shown}");
}

// --- Persistent symmetric keys --------------------------------------------------------------

#[test]
fn persistent_keys_survive_reopening_with_their_purpose() {
    let (_directory, path) = store_path();
    let store = SoftwareKeystore::open(&path).unwrap();
    let key_hex = "000102030405060708090a0b0c0d0e0f";
    let check = store.insert_key_for_test(&bytes(key_hex), KeyPurpose::Check);
    let derive = store.insert_key_for_test(&bytes(&"42".repeat(32)), KeyPurpose::Derive);
    store.persist_key(&check, &label("k-check")).unwrap();
    store.persist_key(&derive, &label("k-derive")).unwrap();
    assert!(
        fs::read_to_string(&path)
            .unwrap()
            .contains("\"purpose\": \"derive\"")
    );
    assert_eq!(mode_of(&path), 0o600);
    drop(store);

    let store = SoftwareKeystore::open(&path).unwrap();
    let loaded = store.load_key(&label("k-check")).unwrap().unwrap();
    assert_eq!(loaded.algorithm(), KeyAlgorithm::Aes128);
    assert_eq!(store.kcv(&loaded).unwrap(), kcv_of(key_hex));
    let loaded = store.load_key(&label("k-derive")).unwrap().unwrap();
    assert_eq!(loaded.algorithm(), KeyAlgorithm::Aes256);
    assert!(matches!(
        store.kcv(&loaded),
        Err(KeystoreError::KeyNotPermitted)
    ));
    store
        .derive(DeriveBase::Key(&loaded), &some_data(), KeyPurpose::Check)
        .unwrap();
    assert!(store.load_key(&label("absent")).unwrap().is_none());
}

#[test]
fn deleted_keys_leave_the_file_and_memory() {
    let (_directory, path) = store_path();
    let store = SoftwareKeystore::open(&path).unwrap();
    let key_hex = "5a".repeat(16);
    let key = store.insert_key_for_test(&bytes(&key_hex), KeyPurpose::Mac);
    store.persist_key(&key, &label("gone")).unwrap();
    assert!(fs::read_to_string(&path).unwrap().contains(&key_hex));
    let copy = store.load_key(&label("gone")).unwrap().unwrap();
    assert!(store.delete_key(&label("gone")).unwrap());
    assert!(!fs::read_to_string(&path).unwrap().contains(&key_hex));
    assert!(store.lock().persisted.is_empty());
    assert!(!store.delete_key(&label("gone")).unwrap());
    assert!(store.load_key(&label("gone")).unwrap().is_none());
    // Transient keys, the original and the loaded copy, are not affected.
    store.cmac_generate(&copy, b"x").unwrap();
    store.cmac_generate(&key, b"x").unwrap();
    drop(store);
    let store = SoftwareKeystore::open(&path).unwrap();
    assert!(store.load_key(&label("gone")).unwrap().is_none());
}

#[test]
fn persisting_replaces_by_label_and_refuses_unknown_handles() {
    let store = SoftwareKeystore::in_memory();
    let first = store.insert_key_for_test(&bytes(&"11".repeat(16)), KeyPurpose::Check);
    let second = store.insert_key_for_test(&bytes(&"22".repeat(24)), KeyPurpose::Check);
    store.persist_key(&first, &label("slot")).unwrap();
    store.persist_key(&second, &label("slot")).unwrap();
    let loaded = store.load_key(&label("slot")).unwrap().unwrap();
    assert_eq!(store.kcv(&loaded).unwrap(), kcv_of(&"22".repeat(24)));
    let foreign = SoftwareKeystore::in_memory()
        .insert_key_for_test(&bytes(&"33".repeat(16)), KeyPurpose::Check);
    let unknown = KeyHandle::new(foreign.id() + 1000, KeyAlgorithm::Aes128);
    assert!(matches!(
        store.persist_key(&unknown, &label("other")),
        Err(KeystoreError::UnknownKey)
    ));
    store.destroy(first).unwrap();
    assert!(store.load_key(&label("other")).unwrap().is_none());
}

#[test]
fn a_failed_save_keeps_persistent_keys_as_they_were() {
    let (directory, path) = store_path();
    let store = SoftwareKeystore::open(&path).unwrap();
    let kept = store.insert_key_for_test(&bytes(&"44".repeat(16)), KeyPurpose::Check);
    store.persist_key(&kept, &label("kept")).unwrap();
    fs::remove_dir_all(directory.path()).unwrap();
    let other = store.insert_key_for_test(&bytes(&"55".repeat(16)), KeyPurpose::Check);
    assert!(matches!(
        store.persist_key(&other, &label("kept")),
        Err(KeystoreError::Io { .. })
    ));
    assert!(matches!(
        store.persist_key(&other, &label("new")),
        Err(KeystoreError::Io { .. })
    ));
    assert!(matches!(
        store.delete_key(&label("kept")),
        Err(KeystoreError::Io { .. })
    ));
    assert!(store.load_key(&label("new")).unwrap().is_none());
    let loaded = store.load_key(&label("kept")).unwrap().unwrap();
    assert_eq!(store.kcv(&loaded).unwrap(), kcv_of(&"44".repeat(16)));
}

#[test]
fn corrupt_persistent_keys_are_refused() {
    let bdk_free = |keys: &str| {
        format!(
            r#"{{"format":"nfcpay-software-keystore","version":1,"bdks":[],"ec_keys":[],"keys":[{keys}]}}"#
        )
    };
    let key = |label: &str, algorithm: &str, purpose: &str, hex: &str| {
        format!(
            r#"{{"label":"{label}","algorithm":"{algorithm}","purpose":"{purpose}","key":"{hex}"}}"#
        )
    };
    let good = key("a", "aes128", "derive", &"00".repeat(16));
    for (keys, needle) in [
        (
            key("a", "aes256", "derive", &"00".repeat(16)),
            "does not match",
        ),
        (
            key("a", "aes128", "sign", &"00".repeat(16)),
            "unknown purpose",
        ),
        (
            key("a", "des", "derive", &"00".repeat(16)),
            "unknown algorithm",
        ),
        (key("", "aes128", "derive", &"00".repeat(16)), "label"),
        (format!("{good},{good}"), "twice"),
    ] {
        let (_directory, path) = store_path();
        fs::write(&path, bdk_free(&keys)).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert_io_error_mentions(SoftwareKeystore::open(&path), needle);
    }
    // Files without `keys` (written before persistent keys existed) still open.
    let (_directory, path) = store_path();
    fs::write(
        &path,
        r#"{"format":"nfcpay-software-keystore","version":1,"bdks":[],"ec_keys":[]}"#,
    )
    .unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    SoftwareKeystore::open(&path).unwrap();
}
