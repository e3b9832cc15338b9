//! Unit tests of the PKI's private parts. `daemon/tests/pki.rs` checks the public flow (CA,
//! server and terminal certificates, TLS) over every keystore backend.

// A panic is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use rcgen::{DnValue, KeyPair, SignatureAlgorithm};

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

/// A self-signed certificate whose subject has these common names, with this serial.
fn certificate(names: &[DnValue], serial: &[u8]) -> Vec<u8> {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    for name in names {
        params
            .distinguished_name
            .push(DnType::CommonName, name.clone());
    }
    params.serial_number = Some(SerialNumber::from_slice(serial));
    params.self_signed(&key).unwrap().der().to_vec()
}

#[test]
fn client_terminal_reads_the_terminal_and_the_serial() {
    let serial = [0x40, 0x01, 0x02, 0x03, 0xFF];
    for name in [
        DnValue::Utf8String("shop-42".to_owned()),
        DnValue::PrintableString("shop-42".try_into().unwrap()),
    ] {
        let client = client_terminal(&certificate(&[name], &serial)).unwrap();
        assert_eq!(client.terminal_id.as_str(), "shop-42");
        assert_eq!(client.certificate_serial.as_bytes(), serial);
        assert_eq!(client.certificate_serial.to_string(), "40010203ff");
        assert_eq!(
            "40010203FF".parse::<CertificateSerial>().unwrap(),
            client.certificate_serial
        );
    }
}

#[test]
fn client_terminal_refuses_what_is_not_strictly_a_terminal() {
    let serial = [0x40, 0x01];
    // (rcgen keeps one value per attribute type, so two common names cannot be made here.)
    for names in [
        vec![],
        vec![DnValue::Utf8String("no spaces".to_owned())],
        vec![DnValue::Utf8String(String::new())],
        vec![DnValue::Utf8String("x".repeat(33))],
        // A valid ID, but in a string type a terminal CA never writes.
        vec![DnValue::Ia5String("shop-42".try_into().unwrap())],
    ] {
        assert!(
            matches!(
                client_terminal(&certificate(&names, &serial)),
                Err(PkiError::MalformedCertificate { .. })
            ),
            "{names:?}"
        );
    }
    let mut trailing = certificate(&[DnValue::Utf8String("shop-42".to_owned())], &serial);
    client_terminal(&trailing).unwrap();
    trailing.push(0);
    assert!(client_terminal(&trailing).is_err());
    assert!(client_terminal(&[0x30, 0x03, 1, 2, 3]).is_err());
    assert!(client_terminal(b"").is_err());
}

#[test]
fn serials_are_one_to_twenty_bytes() {
    assert!(CertificateSerial::try_from(&[][..]).is_err());
    assert!(CertificateSerial::try_from(&[1; SERIAL_BYTES_MAX + 1][..]).is_err());
    let longest = CertificateSerial::try_from(&[0xAB; SERIAL_BYTES_MAX][..]).unwrap();
    assert_eq!(longest.to_string(), "ab".repeat(SERIAL_BYTES_MAX));
    assert_eq!(
        longest.to_string().parse::<CertificateSerial>().unwrap(),
        longest
    );
    // Shorter serials are not equal to a longer one that starts with them.
    assert_ne!(
        "01".parse::<CertificateSerial>().unwrap(),
        "0100".parse::<CertificateSerial>().unwrap()
    );
    for text in [
        "",
        "0",
        "zz",
        "serial-e1",
        &"ab".repeat(SERIAL_BYTES_MAX + 1),
    ] {
        assert!(text.parse::<CertificateSerial>().is_err(), "{text:?}");
    }
}
