//! The platform PKI, checked once for every keystore backend: each check runs over the
//! software keystore (in memory) and over a fresh SoftHSM2 token, where the CA, the server's
//! TLS key and the receipt key are token objects and every signature is made by the token.
//!
//! This is a `harness = false` test (libtest-compatible through `libtest-mimic`, so `cargo test`
//! and `cargo nextest` both run it): SoftHSM2 reads `SOFTHSM2_CONF` from the environment when
//! the module initialises, and `main` sets it before any other thread exists. The tokens are
//! made only when a `pkcs11:` check is selected. The checks of one backend share one
//! initialised CA (made once per process) and never change it, so they run in any order; a
//! check that needs to change certificates works on a copy.

// A panic is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libtest_mimic::{Arguments, Trial};
use nfcpay_daemon::pki::{
    self, CA_CERTIFICATE_FILE, CA_COMMON_NAME, CA_KEY_LABEL, CSR_PEM_BYTES_MAX, PkiError,
    RequestedName, SERIAL_BYTES, SERVER_CERTIFICATE_FILE, SERVER_KEY_LABEL,
};
use nfcpay_keystore::Keystore;
use nfcpay_keystore::pkcs11::Pkcs11Keystore;
use nfcpay_keystore::software::SoftwareKeystore;
use nfcpay_keystore::testing::{SOFTHSM2_MODULE, SoftHsmDir, token_uri};
use nfcpay_protocol::TerminalId;
use p256::ecdsa::signature::Verifier as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, SignatureAlgorithm,
};
use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier as _;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use x509_parser::prelude::{FromDer as _, X509Certificate};

const PIN: &str = "pki-test-pin";
/// The token every PKCS#11 check uses, and one more that never gets a CA.
const MAIN_TOKEN: &str = "pki-main";
const OTHER_TOKEN: &str = "pki-other";
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
const TERMINAL_VALIDITY: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// Where this process keeps its tokens and certificate directories (removed at the end).
static ROOT: OnceLock<PathBuf> = OnceLock::new();
static SOFTWARE: OnceLock<Fixture> = OnceLock::new();
static PKCS11: OnceLock<Fixture> = OnceLock::new();

/// A keystore backend under test.
#[derive(Clone, Copy, Debug)]
enum Backend {
    Software,
    Pkcs11,
}

impl Backend {
    const ALL: [Self; 2] = [Self::Software, Self::Pkcs11];

    fn name(self) -> &'static str {
        match self {
            Self::Software => "software",
            Self::Pkcs11 => "pkcs11",
        }
    }

    /// The initialised CA and server certificate of this backend, made on first use.
    fn fixture(self) -> &'static Fixture {
        let cell = match self {
            Self::Software => &SOFTWARE,
            Self::Pkcs11 => &PKCS11,
        };
        cell.get_or_init(|| {
            let root = ROOT.get().expect("main sets the root directory");
            let (keystore, other) = match self {
                Self::Software => (software_store(), software_store()),
                Self::Pkcs11 => (
                    token_store(MAIN_TOKEN, root),
                    token_store(OTHER_TOKEN, root),
                ),
            };
            let dir = root.join(format!("{}-certificates", self.name()));
            let ca = pki::init_ca(&keystore, &dir, CA_VALIDITY).unwrap();
            assert!(ca.created);
            pki::issue_server_certificate(
                &keystore,
                &dir,
                &["localhost".to_owned(), "127.0.0.1".to_owned()],
            )
            .unwrap();
            Fixture {
                keystore,
                other,
                dir,
            }
        })
    }
}

/// A keystore with an initialised CA and server certificate in `dir`, and another keystore
/// of the same backend that has no CA.
struct Fixture {
    keystore: Arc<dyn Keystore>,
    other: Arc<dyn Keystore>,
    dir: PathBuf,
}

impl Fixture {
    fn issue(&self, id: &str, csr_pem: &str) -> Result<pki::IssuedCertificate, PkiError> {
        pki::issue_terminal_certificate(
            &self.keystore,
            &self.dir,
            csr_pem,
            &terminal(id),
            TERMINAL_VALIDITY,
        )
    }

    fn ca_der(&self) -> CertificateDer<'static> {
        CertificateDer::from_pem_file(self.dir.join(CA_CERTIFICATE_FILE)).unwrap()
    }

    fn roots(&self) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca_der()).unwrap();
        Arc::new(roots)
    }

    /// A fresh directory holding a copy of the CA certificate (and the server certificate
    /// when `with_server` is set), for checks that change certificate files.
    fn copy_of_dir(&self, with_server: bool) -> tempfile::TempDir {
        let copy = tempfile::tempdir().unwrap();
        let mut names = vec![CA_CERTIFICATE_FILE];
        if with_server {
            names.push(SERVER_CERTIFICATE_FILE);
        }
        for name in names {
            fs::copy(self.dir.join(name), copy.path().join(name)).unwrap();
        }
        copy
    }
}

type Check = fn(&Fixture);

fn main() {
    let arguments = Arguments::from_args();
    // The tokens' directory, and the certificates' beside them.
    let root = SoftHsmDir::new(PIN);
    // SAFETY: `main` runs before this process starts any other thread (the test runner starts
    // its threads later, in `libtest_mimic::run`), so nothing reads the environment
    // concurrently.
    #[allow(unsafe_code)]
    unsafe {
        root.set_conf_variable();
    }
    ROOT.set(root.path().to_owned()).unwrap();

    let checks: [(&str, Check); 20] = [
        (
            "the CA certificate is self-signed by the keystore's key",
            ca_certificate_is_self_signed_by_the_keystore_key,
        ),
        (
            "init_ca twice keeps the same CA",
            init_ca_twice_keeps_the_same_ca,
        ),
        (
            "init_ca refuses the CA certificate of another keystore's key",
            init_ca_refuses_the_certificate_of_another_key,
        ),
        (
            "a terminal certificate verifies for client auth and names the terminal",
            terminal_certificate_verifies_for_client_auth_and_names_the_terminal,
        ),
        (
            "a terminal certificate ignores what else the CSR asks for",
            terminal_certificate_ignores_what_else_the_csr_asks_for,
        ),
        ("serials are random", serials_are_random),
        (
            "a CSR for another terminal is refused",
            csr_for_another_terminal_is_refused,
        ),
        (
            "a CSR without a terminal ID is refused",
            csr_without_a_terminal_id_is_refused,
        ),
        (
            "a CSR with a broken signature is refused",
            csr_with_a_broken_signature_is_refused,
        ),
        ("non-P-256 CSRs are refused", non_p256_csrs_are_refused),
        (
            "oversized and garbage CSRs are refused",
            oversized_and_garbage_csrs_are_refused,
        ),
        (
            "a terminal certificate needs the CA",
            terminal_certificate_needs_the_ca,
        ),
        (
            "terminal_id_of refuses what names no terminal",
            terminal_id_of_refuses_what_names_no_terminal,
        ),
        (
            "the server chain verifies for its names",
            server_chain_verifies_for_its_names,
        ),
        ("server names are checked", server_names_are_checked),
        (
            "load_server_tls refuses a certificate of another key",
            load_server_tls_refuses_a_certificate_of_another_key,
        ),
        (
            "the rustls signing key signs with the keystore's key",
            rustls_signing_key_signs_with_the_keystore_key,
        ),
        (
            "the receipt key is stable and its own",
            receipt_key_is_stable_and_its_own,
        ),
        (
            "the certificate directory holds certificates only",
            only_certificates_are_written,
        ),
        (
            "a mutual TLS handshake with the server key in the keystore completes",
            tls_handshake_with_the_keystore_key_completes,
        ),
    ];
    let trials: Vec<Trial> = Backend::ALL
        .into_iter()
        .flat_map(|backend| {
            checks.iter().map(move |&(name, check)| {
                Trial::test(format!("{}: {name}", backend.name()), move || {
                    check(backend.fixture());
                    Ok(())
                })
            })
        })
        .collect();
    // Tokens only when a PKCS#11 check will run, all made before the module initialises:
    // SoftHSM2 sees only the tokens that exist then.
    let selected = |trial: &Trial| match &arguments.filter {
        None => true,
        Some(filter) if arguments.exact => trial.name() == filter,
        Some(filter) => trial.name().contains(filter.as_str()),
    };
    let pkcs11_selected = trials
        .iter()
        .any(|trial| trial.name().starts_with("pkcs11:") && selected(trial));
    if pkcs11_selected {
        for label in [MAIN_TOKEN, OTHER_TOKEN] {
            root.make_token(label);
        }
    }
    let conclusion = libtest_mimic::run(&arguments, trials);
    drop(root);
    conclusion.exit();
}

fn software_store() -> Arc<dyn Keystore> {
    Arc::new(SoftwareKeystore::in_memory())
}

fn token_store(label: &str, root: &Path) -> Arc<dyn Keystore> {
    Arc::new(Pkcs11Keystore::open(&token_uri(root, label, SOFTHSM2_MODULE)).unwrap())
}

fn terminal(id: &str) -> TerminalId {
    id.parse().unwrap()
}

fn single_common_name(name: &str) -> DistinguishedName {
    let mut names = DistinguishedName::new();
    names.push(DnType::CommonName, name);
    names
}

/// A CSR with subject CN `common_name` (none when `None`) and its key.
fn csr(common_name: Option<&str>, algorithm: &'static SignatureAlgorithm) -> (KeyPair, String) {
    let key = KeyPair::generate_for(algorithm).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = match common_name {
        Some(name) => single_common_name(name),
        None => DistinguishedName::new(),
    };
    let pem = params.serialize_request(&key).unwrap().pem().unwrap();
    (key, pem)
}

fn p256_csr(common_name: &str) -> (KeyPair, String) {
    csr(Some(common_name), &rcgen::PKCS_ECDSA_P256_SHA256)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn public_key(keystore: &Arc<dyn Keystore>, label: &str) -> Vec<u8> {
    let (_, public_key) = keystore
        .find_ec_p256(&label.parse().unwrap())
        .unwrap()
        .unwrap_or_else(|| panic!("the keystore holds {label}"));
    public_key.as_bytes().to_vec()
}

fn ca_certificate_is_self_signed_by_the_keystore_key(fixture: &Fixture) {
    let der = fixture.ca_der();
    let (_, certificate) = X509Certificate::from_der(&der).unwrap();
    certificate.verify_signature(None).unwrap();
    assert_eq!(
        certificate.public_key().subject_public_key.data.as_ref(),
        public_key(&fixture.keystore, CA_KEY_LABEL)
    );
    let common_names: Vec<_> = certificate
        .subject()
        .iter_common_name()
        .map(|name| name.as_str().unwrap())
        .collect();
    assert_eq!(common_names, [CA_COMMON_NAME]);
    assert_eq!(certificate.subject(), certificate.issuer());
    assert!(certificate.is_ca());
    let key_usage = certificate.key_usage().unwrap().unwrap().value;
    assert!(key_usage.key_cert_sign() && key_usage.crl_sign());
    assert!(!key_usage.digital_signature());
}

fn init_ca_twice_keeps_the_same_ca(fixture: &Fixture) {
    let before = fs::read_to_string(fixture.dir.join(CA_CERTIFICATE_FILE)).unwrap();
    let again = pki::init_ca(&fixture.keystore, &fixture.dir, CA_VALIDITY).unwrap();
    assert!(!again.created);
    assert_eq!(again.pem, before);
    assert_eq!(
        again.fingerprint_sha256_hex,
        hex::encode_upper(Sha256::digest(fixture.ca_der()))
    );
}

fn init_ca_refuses_the_certificate_of_another_key(fixture: &Fixture) {
    let before = fs::read_to_string(fixture.dir.join(CA_CERTIFICATE_FILE)).unwrap();
    let error = pki::init_ca(&fixture.other, &fixture.dir, CA_VALIDITY).unwrap_err();
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
        fs::read_to_string(fixture.dir.join(CA_CERTIFICATE_FILE)).unwrap(),
        before
    );
    // Nothing was generated in the other keystore either.
    assert!(
        fixture
            .other
            .find_ec_p256(&CA_KEY_LABEL.parse().unwrap())
            .unwrap()
            .is_none()
    );
    // And that keystore cannot issue under this CA.
    let (_, pem) = p256_csr("T-1");
    let error = pki::issue_terminal_certificate(
        &fixture.other,
        &fixture.dir,
        &pem,
        &terminal("T-1"),
        TERMINAL_VALIDITY,
    )
    .unwrap_err();
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

fn terminal_certificate_verifies_for_client_auth_and_names_the_terminal(fixture: &Fixture) {
    let (_, pem) = p256_csr("TERM-0001");
    let issued = fixture.issue("TERM-0001", &pem).unwrap();
    assert_eq!(issued.serial_hex.len(), 2 * SERIAL_BYTES);
    let der = CertificateDer::from_pem_slice(issued.pem.as_bytes()).unwrap();

    let verifier = WebPkiClientVerifier::builder_with_provider(fixture.roots(), provider())
        .build()
        .unwrap();
    verifier
        .verify_client_cert(&der, &[], UnixTime::now())
        .unwrap();
    assert_eq!(pki::terminal_id_of(&der).unwrap(), terminal("TERM-0001"));
    // The live path reads the serial that enrollment records.
    assert_eq!(
        pki::client_terminal(&der)
            .unwrap()
            .certificate_serial
            .to_string(),
        issued.serial_hex
    );

    let (_, certificate) = X509Certificate::from_der(&der).unwrap();
    assert_eq!(hex::encode(certificate.raw_serial()), issued.serial_hex);
    assert!(!certificate.is_ca());
    let usage = certificate.extended_key_usage().unwrap().unwrap().value;
    assert!(usage.client_auth && !usage.server_auth && !usage.any);
    // A server verifier refuses it: it is not a server certificate.
    let server_verifier = WebPkiServerVerifier::builder_with_provider(fixture.roots(), provider())
        .build()
        .unwrap();
    let name = ServerName::try_from("TERM-0001").unwrap();
    assert!(
        server_verifier
            .verify_server_cert(&der, &[], &name, &[], UnixTime::now())
            .is_err()
    );
}

fn terminal_certificate_ignores_what_else_the_csr_asks_for(fixture: &Fixture) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::new(vec!["evil.example".to_owned()]).unwrap();
    params.distinguished_name = single_common_name("TERM-0002");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let pem = params.serialize_request(&key).unwrap().pem().unwrap();
    let issued = fixture.issue("TERM-0002", &pem).unwrap();
    let der = CertificateDer::from_pem_slice(issued.pem.as_bytes()).unwrap();
    let (_, certificate) = X509Certificate::from_der(&der).unwrap();
    assert!(!certificate.is_ca());
    assert!(certificate.subject_alternative_name().unwrap().is_none());
    let usage = certificate.extended_key_usage().unwrap().unwrap().value;
    assert!(usage.client_auth && !usage.server_auth);
    assert_eq!(certificate.subject().iter_attributes().count(), 1);
}

fn serials_are_random(fixture: &Fixture) {
    let (_, pem) = p256_csr("T-1");
    let first = fixture.issue("T-1", &pem).unwrap();
    let second = fixture.issue("T-1", &pem).unwrap();
    assert_ne!(first.serial_hex, second.serial_hex);
}

fn csr_for_another_terminal_is_refused(fixture: &Fixture) {
    let (_, pem) = p256_csr("TERM-0002");
    let error = fixture.issue("TERM-0001", &pem).unwrap_err();
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
        let (_, pem) = p256_csr(near);
        assert!(matches!(
            fixture.issue("TERM-0001", &pem),
            Err(PkiError::CsrTerminalMismatch { .. })
        ));
    }
}

fn csr_without_a_terminal_id_is_refused(fixture: &Fixture) {
    for name in [None, Some("not a terminal id"), Some("")] {
        let (_, pem) = csr(name, &rcgen::PKCS_ECDSA_P256_SHA256);
        let error = fixture.issue("T-1", &pem).unwrap_err();
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

fn csr_with_a_broken_signature_is_refused(fixture: &Fixture) {
    let (_, pem) = p256_csr("T-1");
    // The signature is the DER's last bytes: change one base64 digit near the end.
    let position = pem.find("\n-----END").unwrap() - 8;
    let mut bytes = pem.into_bytes();
    bytes[position] = if bytes[position] == b'A' { b'B' } else { b'A' };
    let error = fixture
        .issue("T-1", &String::from_utf8(bytes).unwrap())
        .unwrap_err();
    assert!(matches!(error, PkiError::CsrSignatureInvalid), "{error}");
}

fn non_p256_csrs_are_refused(fixture: &Fixture) {
    for algorithm in [&rcgen::PKCS_ED25519, &rcgen::PKCS_ECDSA_P384_SHA384] {
        let (_, pem) = csr(Some("T-1"), algorithm);
        let error = fixture.issue("T-1", &pem).unwrap_err();
        assert!(matches!(error, PkiError::CsrKeyNotP256), "{error}");
    }
}

fn oversized_and_garbage_csrs_are_refused(fixture: &Fixture) {
    let (_, pem) = p256_csr("T-1");
    let padded = format!("{pem}{}", " ".repeat(CSR_PEM_BYTES_MAX + 1 - pem.len()));
    assert!(matches!(
        fixture.issue("T-1", &padded),
        Err(PkiError::CsrTooLarge)
    ));
    assert!(matches!(
        fixture.issue("T-1", &"A".repeat(10 * CSR_PEM_BYTES_MAX)),
        Err(PkiError::CsrTooLarge)
    ));
    let ca_pem = fs::read_to_string(fixture.dir.join(CA_CERTIFICATE_FILE)).unwrap();
    for garbage in [
        "",
        "garbage",
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        "-----BEGIN CERTIFICATE REQUEST-----\n!!!!\n-----END CERTIFICATE REQUEST-----\n",
        &ca_pem,
    ] {
        let error = fixture.issue("T-1", garbage).unwrap_err();
        assert!(
            matches!(error, PkiError::MalformedCsr { .. }),
            "{garbage:?}: {error}"
        );
    }
}

fn terminal_certificate_needs_the_ca(fixture: &Fixture) {
    let empty = tempfile::tempdir().unwrap();
    let (_, pem) = p256_csr("T-1");
    let error = pki::issue_terminal_certificate(
        &fixture.keystore,
        empty.path(),
        &pem,
        &terminal("T-1"),
        TERMINAL_VALIDITY,
    )
    .unwrap_err();
    assert!(
        matches!(error, PkiError::CaCertificateMissing { .. }),
        "{error}"
    );
}

fn terminal_id_of_refuses_what_names_no_terminal(fixture: &Fixture) {
    assert!(matches!(
        pki::terminal_id_of(b"garbage"),
        Err(PkiError::MalformedCertificate { .. })
    ));
    // The CA certificate's name is not a terminal ID.
    assert!(matches!(
        pki::terminal_id_of(&fixture.ca_der()),
        Err(PkiError::MalformedCertificate { .. })
    ));
}

fn server_chain_verifies_for_its_names(fixture: &Fixture) {
    let tls = pki::load_server_tls(&fixture.keystore, &fixture.dir).unwrap();
    assert_eq!(tls.certificate_chain.len(), 2);
    assert_eq!(tls.certificate_chain[1], fixture.ca_der());
    assert_eq!(tls.client_ca_certificates, vec![fixture.ca_der()]);
    tls.certified_key().keys_match().unwrap();
    let verifier = WebPkiServerVerifier::builder_with_provider(fixture.roots(), provider())
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

fn server_names_are_checked(fixture: &Fixture) {
    let dir = fixture.copy_of_dir(false);
    for bad in ["", "with space", "under_score!", "-"] {
        let error = pki::issue_server_certificate(&fixture.keystore, dir.path(), &[bad.to_owned()])
            .unwrap_err();
        assert!(
            matches!(error, PkiError::InvalidServerName { .. }),
            "{bad:?}: {error}"
        );
    }
    assert!(matches!(
        pki::issue_server_certificate(&fixture.keystore, dir.path(), &[]),
        Err(PkiError::ServerNameCount)
    ));
    assert!(!dir.path().join(SERVER_CERTIFICATE_FILE).exists());
}

fn load_server_tls_refuses_a_certificate_of_another_key(fixture: &Fixture) {
    let dir = fixture.copy_of_dir(false);
    fs::copy(
        dir.path().join(CA_CERTIFICATE_FILE),
        dir.path().join(SERVER_CERTIFICATE_FILE),
    )
    .unwrap();
    let error = pki::load_server_tls(&fixture.keystore, dir.path()).unwrap_err();
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

fn rustls_signing_key_signs_with_the_keystore_key(fixture: &Fixture) {
    let tls = pki::load_server_tls(&fixture.keystore, &fixture.dir).unwrap();
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
    let signature = p256::ecdsa::Signature::from_der(&signer.sign(message).unwrap()).unwrap();
    let verifying_key = p256::ecdsa::VerifyingKey::from_sec1_bytes(&public_key(
        &fixture.keystore,
        SERVER_KEY_LABEL,
    ))
    .unwrap();
    verifying_key.verify(message, &signature).unwrap();
    assert!(
        verifying_key
            .verify(b"another message", &signature)
            .is_err()
    );
}

fn receipt_key_is_stable_and_its_own(fixture: &Fixture) {
    let receipt = pki::ensure_receipt_key(&fixture.keystore).unwrap();
    assert_eq!(pki::ensure_receipt_key(&fixture.keystore).unwrap(), receipt);
    for other in [CA_KEY_LABEL, SERVER_KEY_LABEL] {
        assert_ne!(public_key(&fixture.keystore, other), receipt.as_bytes());
    }
}

fn only_certificates_are_written(fixture: &Fixture) {
    let (_, pem) = p256_csr("T-1");
    fixture.issue("T-1", &pem).unwrap();
    pki::ensure_receipt_key(&fixture.keystore).unwrap();
    let mut names: Vec<_> = fs::read_dir(&fixture.dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, [CA_CERTIFICATE_FILE, SERVER_CERTIFICATE_FILE]);
    for name in names {
        let text = fs::read_to_string(fixture.dir.join(name)).unwrap();
        assert!(!text.contains("PRIVATE"));
        assert_eq!(
            text.matches("-----BEGIN ").count(),
            text.matches("-----BEGIN CERTIFICATE-----").count()
        );
    }
}

/// One mutual TLS 1.3 handshake on 127.0.0.1: the server signs with the keystore's key, the
/// client presents a freshly issued terminal certificate, and the server sees that terminal.
fn tls_handshake_with_the_keystore_key_completes(fixture: &Fixture) {
    let (terminal_key, pem) = p256_csr("TERM-0042");
    let issued = fixture.issue("TERM-0042", &pem).unwrap();
    let server_tls = pki::load_server_tls(&fixture.keystore, &fixture.dir).unwrap();
    let client_key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(terminal_key.serialize_der()));
    let client_chain = vec![CertificateDer::from_pem_slice(issued.pem.as_bytes()).unwrap()];

    let client_verifier = WebPkiClientVerifier::builder_with_provider(fixture.roots(), provider())
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
        .with_root_certificates(fixture.roots())
        .with_client_auth_cert(client_chain, client_key)
        .unwrap();

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let peer = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut stream = acceptor.accept(tcp).await.unwrap();
            let peer = stream.get_ref().1.peer_certificates().unwrap()[0].clone();
            stream.write_all(b"hello terminal\n").await.unwrap();
            stream.shutdown().await.unwrap();
            pki::terminal_id_of(&peer).unwrap()
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
    });
    assert_eq!(peer, terminal("TERM-0042"));
}
