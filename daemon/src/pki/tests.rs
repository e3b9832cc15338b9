//! Unit tests of the PKI over the software keystore; `daemon/tests/pki_pkcs11.rs` runs the
//! flow with the keys in SoftHSM2.

// A panic is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use nfcpay_keystore::software::SoftwareKeystore;
use p256::ecdsa::signature::Verifier as _;
use rcgen::{KeyPair, SignatureAlgorithm};
use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier as _;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::*;

const TERMINAL_VALIDITY: Duration = Duration::from_secs(365 * 24 * 60 * 60);
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);

fn keystore() -> Arc<dyn Keystore> {
    Arc::new(SoftwareKeystore::in_memory())
}

fn terminal(id: &str) -> TerminalId {
    id.parse().unwrap()
}

/// A keystore and a directory with the CA and the server certificate for localhost.
fn initialised() -> (Arc<dyn Keystore>, TempDir) {
    let keystore = keystore();
    let dir = TempDir::new().unwrap();
    init_ca(&keystore, dir.path(), CA_VALIDITY).unwrap();
    issue_server_certificate(
        &keystore,
        dir.path(),
        &["localhost".to_owned(), "127.0.0.1".to_owned()],
    )
    .unwrap();
    (keystore, dir)
}

/// A CSR with subject CN `common_name` (none when `None`) and its key.
fn csr(common_name: Option<&str>, algorithm: &'static SignatureAlgorithm) -> (KeyPair, String) {
    let key = KeyPair::generate_for(algorithm).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    if let Some(name) = common_name {
        params.distinguished_name.push(DnType::CommonName, name);
    }
    let pem = params.serialize_request(&key).unwrap().pem().unwrap();
    (key, pem)
}

fn ca_der(dir: &Path) -> CertificateDer<'static> {
    first_certificate(&fs::read_to_string(dir.join(CA_CERTIFICATE_FILE)).unwrap()).unwrap()
}

fn roots(dir: &Path) -> Arc<RootCertStore> {
    let mut roots = RootCertStore::empty();
    roots.add(ca_der(dir)).unwrap();
    Arc::new(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn issue(
    keystore: &Arc<dyn Keystore>,
    dir: &Path,
    id: &str,
    pem: &str,
) -> Result<IssuedCertificate, PkiError> {
    issue_terminal_certificate(keystore, dir, pem, &terminal(id), TERMINAL_VALIDITY)
}

#[test]
fn ca_certificate_is_self_signed_by_the_keystore_key() {
    let keystore = keystore();
    let dir = TempDir::new().unwrap();
    let ca = init_ca(&keystore, dir.path(), CA_VALIDITY).unwrap();
    assert!(ca.created);
    let der = ca_der(dir.path());
    assert_eq!(
        ca.fingerprint_sha256_hex,
        hex::encode_upper(Sha256::digest(&der))
    );
    let (_, certificate) = X509Certificate::from_der(&der).unwrap();
    certificate.verify_signature(None).unwrap();
    let (_, public_key) = keystore
        .find_ec_p256(&CA_KEY_LABEL.parse().unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(
        certificate.public_key().subject_public_key.data.as_ref(),
        public_key.as_bytes()
    );
    assert_eq!(
        single_common_name(certificate.subject()),
        Some(CA_COMMON_NAME)
    );
    assert_eq!(certificate.subject(), certificate.issuer());
    assert!(certificate.is_ca());
    let key_usage = certificate.key_usage().unwrap().unwrap().value;
    assert!(key_usage.key_cert_sign() && key_usage.crl_sign());
    assert!(!key_usage.digital_signature());
}

#[test]
fn init_ca_twice_keeps_the_same_ca() {
    let keystore = keystore();
    let dir = TempDir::new().unwrap();
    let first = init_ca(&keystore, dir.path(), CA_VALIDITY).unwrap();
    let second = init_ca(&keystore, dir.path(), CA_VALIDITY).unwrap();
    assert!(first.created && !second.created);
    assert_eq!(first.pem, second.pem);
    assert_eq!(first.fingerprint_sha256_hex, second.fingerprint_sha256_hex);
}

#[test]
fn init_ca_refuses_the_certificate_of_another_key() {
    let dir = TempDir::new().unwrap();
    let first = init_ca(&keystore(), dir.path(), CA_VALIDITY).unwrap();
    let other = keystore();
    let error = init_ca(&other, dir.path(), CA_VALIDITY).unwrap_err();
    assert!(
        matches!(
            error,
            PkiError::CertificateKeyMismatch {
                label: CA_KEY_LABEL,
                ..
            }
        ),
        "{error}"
    );
    assert_eq!(
        fs::read_to_string(dir.path().join(CA_CERTIFICATE_FILE)).unwrap(),
        first.pem
    );
    // Nothing was generated in the other keystore either.
    assert!(
        other
            .find_ec_p256(&CA_KEY_LABEL.parse().unwrap())
            .unwrap()
            .is_none()
    );
    // And that keystore cannot issue under this CA.
    let (_, pem) = csr(Some("T-1"), &rcgen::PKCS_ECDSA_P256_SHA256);
    let error = issue(&other, dir.path(), "T-1", &pem).unwrap_err();
    assert!(
        matches!(
            error,
            PkiError::KeyMissing {
                label: CA_KEY_LABEL
            }
        ),
        "{error}"
    );
}

#[test]
fn terminal_certificate_verifies_for_client_auth_and_names_the_terminal() {
    let (keystore, dir) = initialised();
    let (_, pem) = csr(Some("TERM-0001"), &rcgen::PKCS_ECDSA_P256_SHA256);
    let issued = issue(&keystore, dir.path(), "TERM-0001", &pem).unwrap();
    assert_eq!(issued.serial_hex.len(), 2 * SERIAL_BYTES);
    let der = CertificateDer::from_pem_slice(issued.pem.as_bytes()).unwrap();

    let verifier = WebPkiClientVerifier::builder_with_provider(roots(dir.path()), provider())
        .build()
        .unwrap();
    verifier
        .verify_client_cert(&der, &[], UnixTime::now())
        .unwrap();
    assert_eq!(terminal_id_of(&der).unwrap(), terminal("TERM-0001"));

    let (_, certificate) = X509Certificate::from_der(&der).unwrap();
    assert_eq!(hex::encode(certificate.raw_serial()), issued.serial_hex);
    assert!(!certificate.is_ca());
    let usage = certificate.extended_key_usage().unwrap().unwrap().value;
    assert!(usage.client_auth && !usage.server_auth && !usage.any);
    // A server verifier refuses it: it is not a server certificate.
    let server_verifier =
        WebPkiServerVerifier::builder_with_provider(roots(dir.path()), provider())
            .build()
            .unwrap();
    let name = ServerName::try_from("TERM-0001").unwrap();
    assert!(
        server_verifier
            .verify_server_cert(&der, &[], &name, &[], UnixTime::now())
            .is_err()
    );
}

#[test]
fn terminal_certificate_ignores_what_else_the_csr_asks_for() {
    let (keystore, dir) = initialised();
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::new(vec!["evil.example".to_owned()]).unwrap();
    params.distinguished_name = common_name("TERM-0002");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let pem = params.serialize_request(&key).unwrap().pem().unwrap();
    let issued = issue(&keystore, dir.path(), "TERM-0002", &pem).unwrap();
    let der = CertificateDer::from_pem_slice(issued.pem.as_bytes()).unwrap();
    let (_, certificate) = X509Certificate::from_der(&der).unwrap();
    assert!(!certificate.is_ca());
    assert!(certificate.subject_alternative_name().unwrap().is_none());
    let usage = certificate.extended_key_usage().unwrap().unwrap().value;
    assert!(usage.client_auth && !usage.server_auth);
    assert_eq!(certificate.subject().iter_attributes().count(), 1);
}

#[test]
fn serials_are_random() {
    let (keystore, dir) = initialised();
    let (_, pem) = csr(Some("T-1"), &rcgen::PKCS_ECDSA_P256_SHA256);
    let first = issue(&keystore, dir.path(), "T-1", &pem).unwrap();
    let second = issue(&keystore, dir.path(), "T-1", &pem).unwrap();
    assert_ne!(first.serial_hex, second.serial_hex);
}

#[test]
fn csr_for_another_terminal_is_refused() {
    let (keystore, dir) = initialised();
    let (_, pem) = csr(Some("TERM-0002"), &rcgen::PKCS_ECDSA_P256_SHA256);
    let error = issue(&keystore, dir.path(), "TERM-0001", &pem).unwrap_err();
    match &error {
        PkiError::CsrTerminalMismatch {
            expected,
            requested: RequestedName::Terminal(requested),
        } => {
            assert_eq!(expected, &terminal("TERM-0001"));
            assert_eq!(requested, &terminal("TERM-0002"));
        }
        other => panic!("unexpected {other}"),
    }
    assert!(error.to_string().contains("TERM-0002"));
    // The match is exact: no case folding, no prefix.
    for near in ["term-0001", "TERM-00011", "TERM-000"] {
        let (_, pem) = csr(Some(near), &rcgen::PKCS_ECDSA_P256_SHA256);
        assert!(matches!(
            issue(&keystore, dir.path(), "TERM-0001", &pem),
            Err(PkiError::CsrTerminalMismatch { .. })
        ));
    }
}

#[test]
fn csr_without_a_terminal_id_is_refused() {
    let (keystore, dir) = initialised();
    for name in [None, Some("not a terminal id"), Some("")] {
        let (_, pem) = csr(name, &rcgen::PKCS_ECDSA_P256_SHA256);
        let error = issue(&keystore, dir.path(), "T-1", &pem).unwrap_err();
        assert!(
            matches!(
                error,
                PkiError::CsrTerminalMismatch {
                    requested: RequestedName::NotATerminalId,
                    ..
                }
            ),
            "{name:?}: {error}"
        );
    }
}

#[test]
fn csr_with_a_broken_signature_is_refused() {
    let (keystore, dir) = initialised();
    let (_, pem) = csr(Some("T-1"), &rcgen::PKCS_ECDSA_P256_SHA256);
    // The signature is the DER's last bytes: change one base64 digit near the end.
    let end = pem.find("\n-----END").unwrap();
    let mut bytes = pem.into_bytes();
    let position = end - 8;
    bytes[position] = if bytes[position] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(bytes).unwrap();
    let error = issue(&keystore, dir.path(), "T-1", &tampered).unwrap_err();
    assert!(matches!(error, PkiError::CsrSignatureInvalid), "{error}");
}

#[test]
fn signature_by_another_key_does_not_verify() {
    let (_, pem) = csr(Some("T-1"), &rcgen::PKCS_ECDSA_P256_SHA256);
    let (_, other) = csr(Some("T-1"), &rcgen::PKCS_ECDSA_P256_SHA256);
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

#[test]
fn non_p256_csrs_are_refused() {
    let (keystore, dir) = initialised();
    for algorithm in [&rcgen::PKCS_ED25519, &rcgen::PKCS_ECDSA_P384_SHA384] {
        let (_, pem) = csr(Some("T-1"), algorithm);
        let error = issue(&keystore, dir.path(), "T-1", &pem).unwrap_err();
        assert!(matches!(error, PkiError::CsrKeyNotP256), "{error}");
    }
}

#[test]
fn oversized_and_garbage_csrs_are_refused() {
    let (keystore, dir) = initialised();
    let (_, pem) = csr(Some("T-1"), &rcgen::PKCS_ECDSA_P256_SHA256);
    let padded = format!("{pem}{}", " ".repeat(CSR_PEM_BYTES_MAX + 1 - pem.len()));
    assert!(matches!(
        issue(&keystore, dir.path(), "T-1", &padded),
        Err(PkiError::CsrTooLarge)
    ));
    assert!(matches!(
        issue(
            &keystore,
            dir.path(),
            "T-1",
            &"A".repeat(10 * CSR_PEM_BYTES_MAX)
        ),
        Err(PkiError::CsrTooLarge)
    ));
    for garbage in [
        "",
        "garbage",
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        "-----BEGIN CERTIFICATE REQUEST-----\n!!!!\n-----END CERTIFICATE REQUEST-----\n",
        &fs::read_to_string(dir.path().join(CA_CERTIFICATE_FILE)).unwrap(),
    ] {
        let error = issue(&keystore, dir.path(), "T-1", garbage).unwrap_err();
        assert!(
            matches!(error, PkiError::MalformedCsr { .. }),
            "{garbage:?}: {error}"
        );
    }
}

#[test]
fn terminal_certificate_needs_the_ca() {
    let keystore = keystore();
    let dir = TempDir::new().unwrap();
    let (_, pem) = csr(Some("T-1"), &rcgen::PKCS_ECDSA_P256_SHA256);
    let error = issue(&keystore, dir.path(), "T-1", &pem).unwrap_err();
    assert!(
        matches!(error, PkiError::CaCertificateMissing { .. }),
        "{error}"
    );
}

#[test]
fn terminal_id_of_refuses_what_names_no_terminal() {
    let (_, dir) = initialised();
    assert!(matches!(
        terminal_id_of(b"garbage"),
        Err(PkiError::MalformedCertificate { .. })
    ));
    // The CA certificate's name is not a terminal ID.
    assert!(matches!(
        terminal_id_of(&ca_der(dir.path())),
        Err(PkiError::MalformedCertificate { .. })
    ));
}

#[test]
fn server_chain_verifies_for_its_names() {
    let (keystore, dir) = initialised();
    let tls = load_server_tls(&keystore, dir.path()).unwrap();
    assert_eq!(tls.certificate_chain.len(), 2);
    assert_eq!(tls.certificate_chain[1], ca_der(dir.path()));
    assert_eq!(tls.client_ca_certificates, vec![ca_der(dir.path())]);
    tls.certified_key().keys_match().unwrap();
    let verifier = WebPkiServerVerifier::builder_with_provider(roots(dir.path()), provider())
        .build()
        .unwrap();
    for (name, valid) in [
        ("localhost", true),
        ("127.0.0.1", true),
        ("example.com", false),
    ] {
        let result = verifier.verify_server_cert(
            &tls.certificate_chain[0],
            &tls.certificate_chain[1..],
            &ServerName::try_from(name).unwrap(),
            &[],
            UnixTime::now(),
        );
        assert_eq!(result.is_ok(), valid, "{name}: {result:?}");
    }
}

#[test]
fn server_names_are_checked() {
    let keystore = keystore();
    let dir = TempDir::new().unwrap();
    init_ca(&keystore, dir.path(), CA_VALIDITY).unwrap();
    for bad in ["", "with space", "under_score!", "-"] {
        let error = issue_server_certificate(&keystore, dir.path(), &[bad.to_owned()]).unwrap_err();
        assert!(
            matches!(error, PkiError::InvalidServerName { .. }),
            "{bad:?}: {error}"
        );
    }
    assert!(matches!(
        issue_server_certificate(&keystore, dir.path(), &[]),
        Err(PkiError::ServerNameCount)
    ));
    assert!(!dir.path().join(SERVER_CERTIFICATE_FILE).exists());
}

#[test]
fn load_server_tls_refuses_a_certificate_of_another_key() {
    let (keystore, dir) = initialised();
    fs::copy(
        dir.path().join(CA_CERTIFICATE_FILE),
        dir.path().join(SERVER_CERTIFICATE_FILE),
    )
    .unwrap();
    let error = load_server_tls(&keystore, dir.path()).unwrap_err();
    assert!(
        matches!(
            error,
            PkiError::CertificateKeyMismatch {
                label: SERVER_KEY_LABEL,
                ..
            }
        ),
        "{error}"
    );
}

#[test]
fn rustls_signing_key_signs_with_the_keystore_key() {
    let (keystore, dir) = initialised();
    let tls = load_server_tls(&keystore, dir.path()).unwrap();
    assert!(
        tls.signing_key
            .choose_scheme(&[rustls::SignatureScheme::ED25519])
            .is_none()
    );
    let signer = tls
        .signing_key
        .choose_scheme(&[
            rustls::SignatureScheme::ED25519,
            rustls::SignatureScheme::ECDSA_NISTP256_SHA256,
        ])
        .unwrap();
    assert_eq!(
        signer.scheme(),
        rustls::SignatureScheme::ECDSA_NISTP256_SHA256
    );
    let message = b"TLS 1.3, server CertificateVerify";
    let signature = signer.sign(message).unwrap();
    let (_, public_key) = keystore
        .find_ec_p256(&SERVER_KEY_LABEL.parse().unwrap())
        .unwrap()
        .unwrap();
    let verifying_key = p256::ecdsa::VerifyingKey::from_sec1_bytes(public_key.as_bytes()).unwrap();
    let signature = p256::ecdsa::Signature::from_der(&signature).unwrap();
    verifying_key.verify(message, &signature).unwrap();
    assert!(
        verifying_key
            .verify(b"another message", &signature)
            .is_err()
    );
}

#[test]
fn receipt_key_is_stable_and_its_own() {
    let (keystore, _dir) = initialised();
    let receipt = ensure_receipt_key(&keystore).unwrap();
    assert_eq!(ensure_receipt_key(&keystore).unwrap(), receipt);
    for other in [CA_KEY_LABEL, SERVER_KEY_LABEL] {
        let (_, public_key) = keystore
            .find_ec_p256(&other.parse().unwrap())
            .unwrap()
            .unwrap();
        assert_ne!(public_key, receipt);
    }
}

#[test]
fn only_certificates_are_written() {
    let (keystore, dir) = initialised();
    let (_, pem) = csr(Some("T-1"), &rcgen::PKCS_ECDSA_P256_SHA256);
    issue(&keystore, dir.path(), "T-1", &pem).unwrap();
    ensure_receipt_key(&keystore).unwrap();
    let mut names: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, [CA_CERTIFICATE_FILE, SERVER_CERTIFICATE_FILE]);
    for name in names {
        let text = fs::read_to_string(dir.path().join(name)).unwrap();
        assert!(!text.contains("PRIVATE"));
        let sections = text.matches("-----BEGIN ").count();
        assert_eq!(
            sections,
            text.matches("-----BEGIN CERTIFICATE-----").count()
        );
    }
}

#[tokio::test]
async fn tls_handshake_with_the_keystore_key_completes() {
    let (keystore, dir) = initialised();
    let terminal_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name("TERM-0042");
    let pem = params
        .serialize_request(&terminal_key)
        .unwrap()
        .pem()
        .unwrap();
    let issued = issue(&keystore, dir.path(), "TERM-0042", &pem).unwrap();
    let server_tls = load_server_tls(&keystore, dir.path()).unwrap();
    let client_key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(terminal_key.serialize_der()));
    let client_chain = vec![CertificateDer::from_pem_slice(issued.pem.as_bytes()).unwrap()];
    let peer = handshake(server_tls, roots(dir.path()), client_chain, client_key).await;
    assert_eq!(peer, terminal("TERM-0042"));
}

/// Runs one mutual TLS 1.3 handshake on 127.0.0.1 (server: `server_tls`; client: the given
/// certificate, trusting `roots`), sends a line back, and returns the terminal the server saw.
async fn handshake(
    server_tls: ServerTls,
    roots: Arc<RootCertStore>,
    client_chain: Vec<CertificateDer<'static>>,
    client_key: PrivateKeyDer<'static>,
) -> TerminalId {
    let client_verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
        .build()
        .unwrap();
    let server_config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(client_verifier)
        .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(
            server_tls.certified_key(),
        )));
    let client_config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(client_chain, client_key)
        .unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut stream = acceptor.accept(tcp).await.unwrap();
        let peer = stream.get_ref().1.peer_certificates().unwrap()[0].clone();
        stream.write_all(b"hello terminal\n").await.unwrap();
        stream.shutdown().await.unwrap();
        terminal_id_of(&peer).unwrap()
    });
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config));
    let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    let mut stream = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert_eq!(answer, "hello terminal\n");
    server.await.unwrap()
}
