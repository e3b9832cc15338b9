//! Unit tests of the PKI's private parts. `daemon/tests/pki.rs` checks the public flow (CA,
//! server and terminal certificates, TLS) over every keystore backend.

// A panic is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use rcgen::{KeyPair, SignatureAlgorithm};

use super::*;

/// A CSR with subject CN `name` and its key.
fn csr(name: &str, algorithm: &'static SignatureAlgorithm) -> (KeyPair, String) {
    let key = KeyPair::generate_for(algorithm).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name(name);
    let pem = params.serialize_request(&key).unwrap().pem().unwrap();
    (key, pem)
}

#[test]
fn signature_by_another_key_does_not_verify() {
    let (_, pem) = csr("T-1", &rcgen::PKCS_ECDSA_P256_SHA256);
    let (_, other) = csr("T-1", &rcgen::PKCS_ECDSA_P256_SHA256);
    let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes()).unwrap();
    let other_der = CertificateSigningRequestDer::from_pem_slice(other.as_bytes()).unwrap();
    let (_, request) = X509CertificationRequest::from_der(der.as_ref()).unwrap();
    let (_, other_request) = X509CertificationRequest::from_der(other_der.as_ref()).unwrap();
    let public_key = TerminalCsr::parse(&pem).unwrap().public_key;
    let info = request.certification_request_info.raw;
    let algorithm = &request.signature_algorithm;
    verify_p256_sha256(&public_key, info, algorithm, &request.signature_value.data).unwrap();
    // The same request info under the other key's signature.
    assert!(matches!(
        verify_p256_sha256(
            &public_key,
            info,
            algorithm,
            &other_request.signature_value.data
        ),
        Err(PkiError::CsrSignatureInvalid)
    ));
}
