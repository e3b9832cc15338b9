//! Conformance vectors for terminal makers: `docs/vectors/payment.json` holds one payment end
//! to end — the BDK, both terminals' initial, transaction and working keys (every usage), the
//! request, the instruction, both sealed halves and both sealed receipts — with every byte.
//!
//! Two tests keep it honest:
//! - [`the_file_is_what_the_code_generates`] builds the document again from fixed inputs with the
//!   platform's own code (the keystore's host DUKPT derivation, GCM and CMAC, the protocol
//!   encoders) and compares it with the file byte for byte. `NFCPAY_UPDATE_VECTORS=1` rewrites
//!   the file instead.
//! - [`the_file_checks_with_independent_crypto`] reads the file alone, as a terminal maker
//!   would, and checks it with the RustCrypto primitives directly: key derivation from the BDK
//!   (and the payee's keys against the published X9.24-3-2017 AES-256 vectors), GCM opening of
//!   both halves, the request digest, both receipts' CMAC and signature, and the decoders.

// A panic is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use aes::cipher::{Array, BlockCipherEncrypt, KeyInit, consts::U16};
use aes_gcm::AeadInOut;
use cmac::{Cmac, Mac};
use nfcpay_keystore::dukpt::{TransientKey, working_key};
use nfcpay_keystore::software::SoftwareKeystore;
use nfcpay_keystore::{KeyPurpose, Keystore};
use nfcpay_protocol::dukpt::{DerivationData, KeyAlgorithm, WorkingKeyUsage, transaction_key_path};
use nfcpay_protocol::messages::{
    HalfEnvelope, HalfHeader, HalfKind, PaymentInstruction, PaymentKind, PaymentRequest, Receipt,
    ReceiptFields, ReceiptStatus, RequestValidity, SealedReceipt,
};
use nfcpay_protocol::{Amount, BdkId, InitialKeyId, Ksn, TerminalId, TxnId};
use p256::ecdsa::signature::{Signer as _, Verifier as _};
use p256::elliptic_curve::sec1::ToSec1Point as _;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use zeroize::Zeroizing;

/// The published X9.24-3-2017 AES-256 BDK (so the payee's keys can be checked against the
/// published values).
const BDK_HEX: &str = "FEDCBA9876543210F1F1F1F1F1F1F1F1FEDCBA9876543210F1F1F1F1F1F1F1F1";
const BDK_ID: &str = "12345678";
/// The payee's initial key ID is the published one; the payer's is another derivation ID.
const PAYEE_INITIAL_KEY_ID: &str = "1234567890123456";
const PAYER_INITIAL_KEY_ID: &str = "12345678ABCDEF01";
/// A fixed receipt-signing key (a P-256 scalar): never a real platform's.
const RECEIPT_PRIVATE_KEY_HEX: &str =
    "C9AFA9D845BA75166B5C215767B1D6934E50C3DB36E89B127B8A622B120F6721";
const CREATED_AT_MS: u64 = 1_800_000_000_000;

fn file() -> PathBuf {
    nfcpay_tests::workspace_root().join("docs/vectors/payment.json")
}

fn hex_of(bytes: impl AsRef<[u8]>) -> String {
    hex::encode_upper(bytes)
}

// ---------------------------------------------------------------------------------------------
// Clear-key AES (the checker's own, and the generator's to print the keys)

fn ecb(key: &[u8], data: &[u8]) -> Vec<u8> {
    let cipher = aes::Aes256::new_from_slice(key).unwrap();
    let mut out = data.to_vec();
    let (blocks, rest) = Array::<u8, U16>::slice_as_chunks_mut(&mut out);
    assert!(rest.is_empty());
    cipher.encrypt_blocks(blocks);
    out
}

/// One X9.24-3 derivation: AES-ECB of the derivation data, truncated to the derived key.
fn derive(key: &[u8], data: &DerivationData) -> Vec<u8> {
    let mut out = ecb(key, data.as_bytes());
    out.truncate(data.derived_algorithm().key_bytes());
    out
}

fn cmac(key: &[u8], data: &[u8]) -> [u8; 16] {
    let mut mac = <Cmac<aes::Aes256> as KeyInit>::new_from_slice(key).unwrap();
    mac.update(data);
    mac.finalize().into_bytes().into()
}

fn kcv(key: &[u8]) -> String {
    hex_of(&cmac(key, &[0; 16])[..3])
}

fn gcm_open(key: &[u8], nonce: &[u8], aad: &[u8], body: &[u8]) -> Option<Vec<u8>> {
    let aead =
        aes_gcm::AesGcm::<aes::Aes256, aes_gcm::aead::consts::U12>::new_from_slice(key).unwrap();
    let (ciphertext, tag) = body.split_at(body.len() - 16);
    let mut plaintext = ciphertext.to_vec();
    let nonce = Array::try_from(nonce).unwrap();
    let tag = Array::<u8, U16>::try_from(tag).unwrap();
    aead.decrypt_inout_detached(&nonce, aad, plaintext.as_mut_slice().into(), &tag)
        .ok()
        .map(|()| plaintext)
}

// ---------------------------------------------------------------------------------------------
// The generator

/// One terminal's keys for one KSN, computed in clear, with the derivation data used.
fn terminal_keys(bdk: &[u8], initial_key_id: InitialKeyId, ksn: Ksn) -> Value {
    let algorithm = KeyAlgorithm::Aes256;
    let initial_data = DerivationData::initial_key(algorithm, initial_key_id);
    let initial_key = derive(bdk, &initial_data);
    let mut transaction_key = initial_key.clone();
    let mut path = Vec::new();
    for data in transaction_key_path(algorithm, ksn) {
        path.push(hex_of(data.as_bytes()));
        transaction_key = derive(&transaction_key, &data);
    }
    let mut working_keys = serde_json::Map::new();
    for usage in WorkingKeyUsage::ALL {
        let data = DerivationData::working_key(usage, algorithm, ksn);
        let key = derive(&transaction_key, &data);
        working_keys.insert(
            usage.name().to_owned(),
            json!({
                "derivation_data": hex_of(data.as_bytes()),
                "key": hex_of(&key),
                "kcv": kcv(&key),
            }),
        );
    }
    json!({
        "initial_key_id": initial_key_id.to_string(),
        "initial_key_derivation_data": hex_of(initial_data.as_bytes()),
        "initial_key": hex_of(&initial_key),
        "initial_key_kcv": kcv(&initial_key),
        "ksn": ksn.to_string(),
        "transaction_key_derivation_path": path,
        "transaction_key": hex_of(&transaction_key),
        "working_keys": working_keys,
    })
}

/// The KCV of a working key derived by the keystore's host path (a key of its own: a key made
/// to encrypt or MAC may not be used for a check value).
fn keystore_kcv(store: &dyn Keystore, ksn: Ksn, usage: WorkingKeyUsage) -> String {
    let key = TransientKey::new(
        store,
        working_key(store, ksn, usage, None, KeyPurpose::Check).unwrap(),
    );
    store.kcv(key.handle()).unwrap().to_string()
}

/// Seals a half with the keystore's host derivation (as the platform derives the key) and a
/// fixed nonce; checks the keystore's key against the clear one by KCV.
fn seal_half(store: &dyn Keystore, header: HalfHeader, plaintext: &[u8], keys: &Value) -> Value {
    let (ksn, nonce) = (header.ksn, header.nonce);
    let (terminal_id, sent_at_ms) = (header.terminal_id.clone(), header.sent_at_ms);
    let key = TransientKey::new(
        store,
        working_key(
            store,
            ksn,
            WorkingKeyUsage::DataEncrypt,
            None,
            KeyPurpose::Encrypt,
        )
        .unwrap(),
    );
    assert_eq!(
        keystore_kcv(store, ksn, WorkingKeyUsage::DataEncrypt),
        keys["working_keys"]["data-encrypt"]["kcv"],
        "the keystore and the clear derivation disagree"
    );
    let aad = header.encode(plaintext.len() + 16).unwrap();
    let body = store
        .gcm_encrypt(key.handle(), &nonce, &aad, plaintext)
        .unwrap();
    let envelope = HalfEnvelope::new(header, body.clone()).unwrap().encode();
    json!({
        "terminal_id": terminal_id.as_str(),
        "ksn": ksn.to_string(),
        "sent_at_ms": sent_at_ms,
        "nonce": hex_of(nonce),
        "header": hex_of(&aad),
        "body": hex_of(&body),
        "bytes": hex_of(&envelope),
        "sha256": hex_of(Sha256::digest(&envelope)),
    })
}

fn receipt_fields_json(fields: &ReceiptFields) -> Value {
    json!({
        "status": fields.status.code(),
        "txn_id": fields.txn_id.to_string(),
        "recipient_terminal_id": fields.recipient_terminal_id.as_str(),
        "recipient_ksn": fields.recipient_ksn.to_string(),
        "request_digest": hex_of(fields.request_digest),
        "payee_terminal_id": fields.payee_terminal_id.as_str(),
        "payee_account_id": fields.payee_account_id.as_ref().map_or("", |a| a.as_str()),
        "payer_terminal_id": fields.payer_terminal_id.as_ref().map_or("", |t| t.as_str()),
        "payer_account_id": fields.payer_account_id.as_ref().map_or("", |a| a.as_str()),
        "amount": fields.amount.minor_units(),
        "currency": fields.amount.currency().code(),
        "settlement_id": fields.settlement_id,
        "settled_at_ms": fields.settled_at_ms,
    })
}

/// Seals a receipt: CMAC by the keystore under the recipient's MAC-verification key, and a
/// deterministic (RFC 6979) ECDSA signature by the fixed receipt key.
fn seal_receipt(store: &dyn Keystore, fields: ReceiptFields, keys: &Value) -> Value {
    let ksn = fields.recipient_ksn;
    let key = TransientKey::new(
        store,
        working_key(
            store,
            ksn,
            WorkingKeyUsage::MacVerification,
            None,
            KeyPurpose::Mac,
        )
        .unwrap(),
    );
    assert_eq!(
        keystore_kcv(store, ksn, WorkingKeyUsage::MacVerification),
        keys["working_keys"]["mac-verify"]["kcv"]
    );
    let receipt = Receipt::new(fields.clone()).unwrap();
    let body = receipt.encode();
    let mac = store.cmac_generate(key.handle(), &body).unwrap();
    let signing_key =
        p256::ecdsa::SigningKey::from_slice(&hex::decode(RECEIPT_PRIVATE_KEY_HEX).unwrap())
            .unwrap();
    let signature: p256::ecdsa::Signature = signing_key.sign(&body);
    let signature: [u8; 64] = signature.normalize_s().to_bytes().into();
    let sealed = SealedReceipt::new(receipt, mac, signature).encode();
    json!({
        "fields": receipt_fields_json(&fields),
        "body": hex_of(&body),
        "cmac": hex_of(mac),
        "signature": hex_of(signature),
        "bytes": hex_of(&sealed),
    })
}

/// The whole document, from fixed inputs.
fn generate() -> Value {
    let bdk = hex::decode(BDK_HEX).unwrap();
    let store = SoftwareKeystore::in_memory();
    let bdk_id: BdkId = BDK_ID.parse().unwrap();
    let bdk_info = store
        .import_bdk(bdk_id, &Zeroizing::new(bdk.clone()))
        .unwrap();
    assert_eq!(bdk_info.kcv.to_string(), kcv(&bdk));

    let payee: TerminalId = "shop-1".parse().unwrap();
    let payer: TerminalId = "alice-phone".parse().unwrap();
    let payee_ksn = Ksn::new(PAYEE_INITIAL_KEY_ID.parse().unwrap(), 1.try_into().unwrap());
    let payer_ksn = Ksn::new(PAYER_INITIAL_KEY_ID.parse().unwrap(), 5.try_into().unwrap());
    let payee_keys = terminal_keys(&bdk, payee_ksn.initial_key_id(), payee_ksn);
    let payer_keys = terminal_keys(&bdk, payer_ksn.initial_key_id(), payer_ksn);

    let txn_id: TxnId = "0F1E2D3C4B5A69788796A5B4C3D2E1F0".parse().unwrap();
    let amount = Amount::parse_decimal("12.50", "EUR".parse().unwrap()).unwrap();
    let request = PaymentRequest {
        txn_id,
        payee_terminal_id: payee.clone(),
        payee_account_id: "shop".parse().unwrap(),
        amount,
        kind: PaymentKind::Purchase,
        validity: RequestValidity::new(CREATED_AT_MS, CREATED_AT_MS + 120_000).unwrap(),
        description: "2 coffees".parse().unwrap(),
    };
    let request_bytes = request.encode();
    let request_digest = PaymentRequest::digest(&request_bytes);
    let instruction = PaymentInstruction {
        txn_id,
        request_digest,
        payer_terminal_id: payer.clone(),
        payer_account_id: "alice".parse().unwrap(),
        payee_terminal_id: payee.clone(),
        amount,
        consented_at_ms: CREATED_AT_MS + 4_000,
    };
    let instruction_bytes = instruction.encode();

    let half_a = seal_half(
        &store,
        HalfHeader {
            kind: HalfKind::A,
            terminal_id: payee.clone(),
            ksn: payee_ksn,
            sent_at_ms: CREATED_AT_MS + 1_000,
            nonce: [0xA0; 12],
        },
        &request_bytes,
        &payee_keys,
    );
    let half_b = seal_half(
        &store,
        HalfHeader {
            kind: HalfKind::B,
            terminal_id: payer.clone(),
            ksn: payer_ksn,
            sent_at_ms: CREATED_AT_MS + 5_000,
            nonce: [0xB0; 12],
        },
        &instruction_bytes,
        &payer_keys,
    );
    let receipt_a = seal_receipt(
        &store,
        ReceiptFields {
            status: ReceiptStatus::Pending,
            txn_id,
            recipient_terminal_id: payee.clone(),
            recipient_ksn: payee_ksn,
            request_digest,
            payee_terminal_id: payee.clone(),
            payee_account_id: Some(request.payee_account_id.clone()),
            payer_terminal_id: None,
            payer_account_id: None,
            amount,
            settlement_id: 0,
            settled_at_ms: 0,
        },
        &payee_keys,
    );
    let receipt_b = seal_receipt(
        &store,
        ReceiptFields {
            status: ReceiptStatus::Settled,
            txn_id,
            recipient_terminal_id: payer.clone(),
            recipient_ksn: payer_ksn,
            request_digest,
            payee_terminal_id: payee.clone(),
            payee_account_id: Some(request.payee_account_id.clone()),
            payer_terminal_id: Some(payer.clone()),
            payer_account_id: Some(instruction.payer_account_id.clone()),
            amount,
            settlement_id: 42,
            settled_at_ms: CREATED_AT_MS + 5_010,
        },
        &payer_keys,
    );
    let signing_key =
        p256::ecdsa::SigningKey::from_slice(&hex::decode(RECEIPT_PRIVATE_KEY_HEX).unwrap())
            .unwrap();
    let public_key = hex_of(
        p256::PublicKey::from(signing_key.verifying_key())
            .to_sec1_point(false)
            .as_bytes(),
    );
    json!({
        "about": "One nfcpay payment, every byte (docs/protocol.md). Hex is upper case; integers are decimal. Generated and checked by tests/tests/vectors.rs. The receipt signature here is deterministic (RFC 6979); a platform's HSM signs with a random nonce, so verify signatures, never compare them.",
        "bdk": {
            "bdk_id": BDK_ID,
            "algorithm": "aes256",
            "key": BDK_HEX,
            "kcv": kcv(&bdk),
        },
        "payee": payee_keys,
        "payer": payer_keys,
        "receipt_key": {
            "private_key": RECEIPT_PRIVATE_KEY_HEX,
            "public_key": public_key,
        },
        "request": {
            "fields": {
                "txn_id": txn_id.to_string(),
                "payee_terminal_id": payee.as_str(),
                "payee_account_id": "shop",
                "amount": amount.minor_units(),
                "currency": "EUR",
                "kind": PaymentKind::Purchase.code(),
                "created_at_ms": CREATED_AT_MS,
                "expires_at_ms": CREATED_AT_MS + 120_000,
                "description": "2 coffees",
            },
            "bytes": hex_of(&request_bytes),
            "sha256": hex_of(request_digest),
        },
        "instruction": {
            "fields": {
                "txn_id": txn_id.to_string(),
                "request_digest": hex_of(request_digest),
                "payer_terminal_id": payer.as_str(),
                "payer_account_id": "alice",
                "payee_terminal_id": payee.as_str(),
                "amount": amount.minor_units(),
                "currency": "EUR",
                "consented_at_ms": CREATED_AT_MS + 4_000,
            },
            "bytes": hex_of(&instruction_bytes),
        },
        "half_a": half_a,
        "half_b": half_b,
        "receipt_a": receipt_a,
        "receipt_b": receipt_b,
    })
}

fn render(document: &Value) -> String {
    let mut text = serde_json::to_string_pretty(document).unwrap();
    text.push('\n');
    text
}

#[test]
fn the_file_is_what_the_code_generates() {
    let generated = render(&generate());
    assert_eq!(
        generated,
        render(&generate()),
        "the generator is not deterministic"
    );
    if std::env::var("NFCPAY_UPDATE_VECTORS").is_ok_and(|value| value == "1") {
        std::fs::create_dir_all(file().parent().unwrap()).unwrap();
        std::fs::write(file(), &generated).unwrap();
        eprintln!("wrote {}", file().display());
        return;
    }
    let stored = std::fs::read_to_string(file()).unwrap_or_else(|error| {
        panic!(
            "{}: {error} (NFCPAY_UPDATE_VECTORS=1 writes it)",
            file().display()
        )
    });
    assert!(
        stored == generated,
        "docs/vectors/payment.json differs from what the code generates: the protocol or the \
         key derivation changed (NFCPAY_UPDATE_VECTORS=1 rewrites the file)"
    );
}

// ---------------------------------------------------------------------------------------------
// The checker: the file alone

fn bytes(value: &Value) -> Vec<u8> {
    hex::decode(value.as_str().unwrap_or_else(|| panic!("not hex: {value}"))).unwrap()
}

/// Derives a terminal's keys from the BDK again and checks every one the file gives.
fn check_terminal_keys(bdk: &[u8], terminal: &Value) {
    let mut key = derive_from_data(bdk, &bytes(&terminal["initial_key_derivation_data"]));
    assert_eq!(hex_of(&key), terminal["initial_key"]);
    assert_eq!(kcv(&key), terminal["initial_key_kcv"]);
    for data in terminal["transaction_key_derivation_path"]
        .as_array()
        .unwrap()
    {
        key = derive_from_data(&key, &bytes(data));
    }
    assert_eq!(hex_of(&key), terminal["transaction_key"]);
    let working_keys = terminal["working_keys"].as_object().unwrap();
    assert_eq!(working_keys.len(), 8, "every usage");
    for (usage, working) in working_keys {
        let derived = derive_from_data(&key, &bytes(&working["derivation_data"]));
        assert_eq!(hex_of(&derived), working["key"], "{usage}");
        assert_eq!(kcv(&derived), working["kcv"], "{usage}");
    }
}

/// An AES-256 key from two derivation blocks (X9.24-3 §6.3.2), read from the bytes alone.
fn derive_from_data(key: &[u8], data: &[u8]) -> Vec<u8> {
    assert_eq!(data.len(), 32, "two blocks for an AES-256 key");
    assert_eq!((data[0], data[1], data[17]), (0x01, 0x01, 0x02));
    assert_eq!(&data[4..8], &[0x00, 0x04, 0x01, 0x00], "AES-256, 256 bits");
    ecb(key, data)
}

fn check_half(half: &Value, key: &Value, kind: HalfKind, plaintext: &[u8]) {
    let envelope_bytes = bytes(&half["bytes"]);
    let header = bytes(&half["header"]);
    let body = bytes(&half["body"]);
    assert_eq!([header.as_slice(), &body].concat(), envelope_bytes);
    let opened = gcm_open(&bytes(&key["key"]), &bytes(&half["nonce"]), &header, &body)
        .expect("the half opens under its data-encryption key");
    assert_eq!(opened, plaintext);
    let mut tampered = body.clone();
    tampered[0] ^= 1;
    assert!(
        gcm_open(
            &bytes(&key["key"]),
            &bytes(&half["nonce"]),
            &header,
            &tampered
        )
        .is_none()
    );
    let envelope = HalfEnvelope::decode(&envelope_bytes).unwrap();
    assert_eq!(envelope.kind(), kind);
    assert_eq!(envelope.header().ksn.to_string(), half["ksn"]);
    assert_eq!(envelope.header().terminal_id.as_str(), half["terminal_id"]);
    assert_eq!(envelope.header().sent_at_ms, half["sent_at_ms"]);
    assert_eq!(envelope.header_bytes(), header);
}

fn check_receipt(receipt: &Value, mac_key: &Value, public_key: &p256::ecdsa::VerifyingKey) {
    let sealed_bytes = bytes(&receipt["bytes"]);
    let body = bytes(&receipt["body"]);
    let mac = bytes(&receipt["cmac"]);
    let signature = bytes(&receipt["signature"]);
    assert_eq!([body.as_slice(), &mac, &signature].concat(), sealed_bytes);
    assert_eq!(cmac(&bytes(&mac_key["key"]), &body).as_slice(), mac);
    let signature = p256::ecdsa::Signature::from_slice(&signature).unwrap();
    public_key.verify(&body, &signature).unwrap();
    let sealed = SealedReceipt::decode(&sealed_bytes).unwrap();
    assert_eq!(
        receipt_fields_json(sealed.receipt().fields()),
        receipt["fields"]
    );
}

#[test]
fn the_file_checks_with_independent_crypto() {
    let document: Value = serde_json::from_str(&std::fs::read_to_string(file()).unwrap()).unwrap();
    let bdk = bytes(&document["bdk"]["key"]);
    assert_eq!(kcv(&bdk), document["bdk"]["kcv"]);
    let (payee, payer) = (&document["payee"], &document["payer"]);
    check_terminal_keys(&bdk, payee);
    check_terminal_keys(&bdk, payer);

    // The payee's keys are the published X9.24-3-2017 AES-256 ones.
    let published = &nfcpay_protocol::test_vectors::AES256_BDK;
    assert_eq!(published.bdk, document["bdk"]["key"]);
    assert_eq!(published.initial_key_id, payee["initial_key_id"]);
    assert_eq!(published.initial_key, payee["initial_key"]);
    let counter_1 = &published.transactions[0];
    assert_eq!(counter_1.ksn, payee["ksn"]);
    assert_eq!(counter_1.transaction_key, payee["transaction_key"]);
    let mut compared = 0;
    for working in counter_1.working_keys {
        let name = match working.usage {
            "PIN" => "pin",
            "MAC_GEN" => "mac-gen",
            "MAC_VERIFY" => "mac-verify",
            "MAC_BOTH" => "mac-both",
            "DATA_ENCRYPT" => "data-encrypt",
            "DATA_DECRYPT" => "data-decrypt",
            "DATA_BOTH" => "data-both",
            "KEK" => "kek",
            other => panic!("usage {other}"),
        };
        if working.algorithm == "AES256" {
            assert_eq!(working.key, payee["working_keys"][name]["key"], "{name}");
            compared += 1;
        }
    }
    assert!(
        compared >= 2,
        "published AES-256 working keys compared: {compared}"
    );

    // The messages, the halves and the receipts.
    let request_bytes = bytes(&document["request"]["bytes"]);
    assert_eq!(
        hex_of(Sha256::digest(&request_bytes)),
        document["request"]["sha256"]
    );
    let request = PaymentRequest::decode(&request_bytes).unwrap();
    let fields = &document["request"]["fields"];
    assert_eq!(request.txn_id.to_string(), fields["txn_id"]);
    assert_eq!(request.amount.minor_units(), fields["amount"]);
    assert_eq!(
        request.payee_account_id.as_str(),
        fields["payee_account_id"]
    );
    assert_eq!(request.validity.expires_at_ms(), fields["expires_at_ms"]);
    let instruction_bytes = bytes(&document["instruction"]["bytes"]);
    let instruction = PaymentInstruction::decode(&instruction_bytes).unwrap();
    assert_eq!(
        hex_of(instruction.request_digest),
        document["request"]["sha256"],
        "the instruction commits to the request bytes"
    );
    assert_eq!(
        instruction.payer_account_id.as_str(),
        document["instruction"]["fields"]["payer_account_id"]
    );
    check_half(
        &document["half_a"],
        &payee["working_keys"]["data-encrypt"],
        HalfKind::A,
        &request_bytes,
    );
    check_half(
        &document["half_b"],
        &payer["working_keys"]["data-encrypt"],
        HalfKind::B,
        &instruction_bytes,
    );
    let public_key =
        p256::ecdsa::VerifyingKey::from_sec1_bytes(&bytes(&document["receipt_key"]["public_key"]))
            .unwrap();
    check_receipt(
        &document["receipt_a"],
        &payee["working_keys"]["mac-verify"],
        &public_key,
    );
    check_receipt(
        &document["receipt_b"],
        &payer["working_keys"]["mac-verify"],
        &public_key,
    );
    assert_eq!(document["receipt_a"]["fields"]["status"], 1);
    assert_eq!(document["receipt_b"]["fields"]["status"], 2);
}
