//! Attribute templates: what each kind of key object may do.

use cryptoki::object::{Attribute, KeyType, ObjectClass};
use nfcpay_protocol::BdkId;
use nfcpay_protocol::dukpt::KeyAlgorithm;

use crate::KeyPurpose;

/// `CKA_APPLICATION` of the data objects that describe BDKs.
pub(super) const APPLICATION: &[u8] = b"nfcpay";
/// DER encoding of the OID of P-256 (1.2.840.10045.3.1.7), the value of `CKA_EC_PARAMS`.
pub(super) const P256_EC_PARAMS: [u8; 10] =
    [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// `nfcpay-bdk-<BDK ID hex>`: the label of a BDK and of its description.
pub(super) fn bdk_label(bdk_id: BdkId) -> String {
    format!("nfcpay-bdk-{bdk_id}")
}

/// A BDK: a token AES key, sensitive, never extractable, able to derive and (only until its
/// KCV is computed, then turned off) to sign. It stays modifiable so that `CKA_SIGN` can be
/// cleared; `CKA_SENSITIVE` and `CKA_EXTRACTABLE` cannot be loosened by PKCS#11 rules anyway.
pub(super) fn bdk(bdk_id: BdkId, algorithm: KeyAlgorithm, generate: bool) -> Vec<Attribute> {
    let mut template = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Modifiable(true),
        Attribute::Derive(true),
        Attribute::Sign(true),
        Attribute::Verify(false),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Label(bdk_label(bdk_id).into_bytes()),
        Attribute::Id(bdk_id.to_bytes().to_vec()),
    ];
    // C_GenerateKey needs the length; C_CreateObject takes it from CKA_VALUE and refuses it.
    if generate {
        template.push(value_len(algorithm));
    }
    template
}

/// The token data object describing a BDK (never its value).
pub(super) fn bdk_description(bdk_id: BdkId, value: Vec<u8>) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::DATA),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Modifiable(false),
        Attribute::Application(APPLICATION.to_vec()),
        Attribute::Label(bdk_label(bdk_id).into_bytes()),
        Attribute::Value(value),
    ]
}

/// A transient AES key (session object) for `purpose`. `with_length` adds `CKA_VALUE_LEN`,
/// which derivations need and unwrapping takes from the wrapped data.
pub(super) fn transient_key(
    algorithm: KeyAlgorithm,
    purpose: KeyPurpose,
    with_length: bool,
) -> Vec<Attribute> {
    let derive = matches!(purpose, KeyPurpose::Derive | KeyPurpose::Export);
    let encrypt = purpose == KeyPurpose::Encrypt;
    let sign = matches!(purpose, KeyPurpose::Mac | KeyPurpose::Check);
    let verify = purpose == KeyPurpose::Mac;
    let wrap = purpose == KeyPurpose::Wrap;
    let mut template = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        // Only an initial key being enrolled may leave the token, wrapped, once.
        Attribute::Extractable(purpose == KeyPurpose::Export),
        Attribute::Derive(derive),
        Attribute::Encrypt(encrypt),
        Attribute::Decrypt(encrypt),
        Attribute::Sign(sign),
        Attribute::Verify(verify),
        Attribute::Wrap(wrap),
        Attribute::Unwrap(wrap),
    ];
    if with_length {
        template.push(value_len(algorithm));
    }
    template
}

/// The public half of a P-256 key pair.
pub(super) fn ec_public(label: &str, persistent: bool) -> Vec<Attribute> {
    let mut template = vec![
        Attribute::Class(ObjectClass::PUBLIC_KEY),
        Attribute::KeyType(KeyType::EC),
        Attribute::Token(persistent),
        Attribute::Private(false),
        Attribute::EcParams(P256_EC_PARAMS.to_vec()),
        Attribute::Verify(true),
    ];
    if persistent {
        template.push(Attribute::Label(label.as_bytes().to_vec()));
    }
    template
}

/// The private half of a P-256 key pair: sensitive, never extractable, signs and derives.
pub(super) fn ec_private(label: &str, persistent: bool) -> Vec<Attribute> {
    let mut template = vec![
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::KeyType(KeyType::EC),
        Attribute::Token(persistent),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(true),
        Attribute::Derive(true),
    ];
    if persistent {
        template.push(Attribute::Label(label.as_bytes().to_vec()));
    }
    template
}

/// `CKA_ID` of the persistent symmetric keys made by `persist_key`: it keeps them apart from
/// BDKs (whose `CKA_ID` is their 4-byte ID) and anything else in the token, whatever the label.
pub(super) const PERSISTENT_KEY_ID: &[u8] = b"nfcpay-persistent-key";

/// Finds the persistent symmetric keys labelled `label` (token objects only: a transient
/// copy made by `load_key` keeps the label but is a session object).
pub(super) fn persistent_key_search(label: &str) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::Token(true),
        Attribute::Id(PERSISTENT_KEY_ID.to_vec()),
        Attribute::Label(label.as_bytes().to_vec()),
    ]
}

/// What `C_CopyObject` changes when a transient key becomes a persistent one; every other
/// attribute (sensitive, not extractable, what it may do) is copied unchanged.
pub(super) fn persistent_key_copy(label: &str) -> Vec<Attribute> {
    vec![
        Attribute::Token(true),
        Attribute::Id(PERSISTENT_KEY_ID.to_vec()),
        Attribute::Label(label.as_bytes().to_vec()),
    ]
}

fn value_len(algorithm: KeyAlgorithm) -> Attribute {
    // Key lengths are 16, 24 or 32: they fit any CK_ULONG.
    Attribute::ValueLen((algorithm.key_bytes() as cryptoki_sys::CK_ULONG).into())
}
