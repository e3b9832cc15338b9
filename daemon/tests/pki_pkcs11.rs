//! The platform PKI with its keys in a fresh SoftHSM2 token: the CA, the server's TLS key and
//! the receipt key are token objects, certificates are issued and TLS handshakes signed by
//! the token, and the certificate directory holds certificates only.
//!
//! This is a `harness = false` test (libtest-compatible through `libtest-mimic`, so `cargo test`
//! and `cargo nextest` both run it): SoftHSM2 reads `SOFTHSM2_CONF` from the environment when
//! the module initialises, and `main` sets it before any other thread exists. Checks share one
//! initialised CA (made once per process) and never change it, so they run in any order.

// A panic is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libtest_mimic::{Arguments, Trial};
use nfcpay_daemon::pki::{
    self, CA_CERTIFICATE_FILE, CA_KEY_LABEL, CSR_PEM_BYTES_MAX, PkiError, RequestedName,
    SERVER_CERTIFICATE_FILE, SERVER_KEY_LABEL,
};
use nfcpay_keystore::Keystore;
use nfcpay_keystore::pkcs11::Pkcs11Keystore;
use nfcpay_keystore::uri::Pkcs11Uri;
use nfcpay_protocol::TerminalId;
use p256::ecdsa::signature::Verifier as _;
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SignatureAlgorithm};
use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier as _;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use x509_parser::prelude::{FromDer as _, X509Certificate};

const PIN: &str = "pki-test-pin";
const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
/// The token every check uses, and one more for "a CA of another keystore".
const MAIN_TOKEN: &str = "pki-main";
const OTHER_TOKEN: &str = "pki-other";
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
const TERMINAL_VALIDITY: Duration = Duration::from_secs(365 * 24 * 60 * 60);

static TOKEN_DIR: OnceLock<PathBuf> = OnceLock::new();
static FIXTURE: OnceLock<Fixture> = OnceLock::new();

/// The main token's keystore with an initialised CA and server certificate in `dir`.
struct Fixture {
    keystore: Arc<dyn Keystore>,
    dir: PathBuf,
}

fn fixture() -> &'static Fixture {
    FIXTURE.get_or_init(|| {
        let token_dir = TOKEN_DIR.get().expect("main sets the token directory");
        let keystore = open_store(MAIN_TOKEN, token_dir);
        let dir = token_dir.join("certificates");
        let ca = pki::init_ca(&keystore, &dir, CA_VALIDITY).unwrap();
        assert!(ca.created);
        pki::issue_server_certificate(
            &keystore,
            &dir,
            &["localhost".to_owned(), "127.0.0.1".to_owned()],
        )
        .unwrap();
        Fixture { keystore, dir }
    })
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    // SAFETY: `main` runs before this process starts any other thread (the test runner starts
    // its threads later, in `libtest_mimic::run`), so nothing reads the environment
    // concurrently.
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var("SOFTHSM2_CONF", dir.path().join("softhsm2.conf"));
    }
    fs::write(dir.path().join("pin"), PIN).unwrap();
    // All tokens first: SoftHSM2 sees only the tokens that exist when the module initialises.
    for label in [MAIN_TOKEN, OTHER_TOKEN] {
        make_token(dir.path(), label);
    }
    TOKEN_DIR.set(dir.path().to_owned()).unwrap();

    let checks: [(&str, fn()); 12] = [
        (
            "CA certificate is self-signed by the token's key",
            ca_is_self_signed_by_the_token_key,
        ),
        (
            "init_ca twice keeps the same CA",
            init_ca_twice_keeps_the_same_ca,
        ),
        (
            "a CA certificate of another keystore is refused",
            ca_of_another_keystore_is_refused,
        ),
        (
            "terminal certificate verifies and names the terminal",
            terminal_certificate_verifies,
        ),
        (
            "CSR for another terminal is refused",
            csr_for_another_terminal_is_refused,
        ),
        (
            "CSR with a broken signature is refused",
            csr_with_a_broken_signature_is_refused,
        ),
        ("non-P-256 CSRs are refused", non_p256_csrs_are_refused),
        (
            "oversized and garbage CSRs are refused",
            oversized_and_garbage_csrs_are_refused,
        ),
        ("server chain verifies for localhost", server_chain_verifies),
        (
            "TLS signatures by the token verify on the host",
            tls_signatures_verify_on_the_host,
        ),
        (
            "mutual TLS handshake with the server key in the token",
            tls_handshake_completes,
        ),
        (
            "the certificate directory holds certificates only",
            only_certificates_are_written,
        ),
    ];
    let trials = checks
        .into_iter()
        .map(|(name, check)| {
            Trial::test(name, move || {
                check();
                Ok(())
            })
        })
        .collect();
    let conclusion = libtest_mimic::run(&Arguments::from_args(), trials);
    drop(dir);
    conclusion.exit();
}

fn make_token(dir: &Path, label: &str) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../softhsm-setup/init-token");
    let output = Command::new(script)
        .arg("--dir")
        .arg(dir)
        .args([
            "--label",
            label,
            "--pin",
            PIN,
            "--so-pin",
            "pki-test-so-pin",
        ])
        .output()
        .expect(
            "softhsm-setup/init-token runs (is softhsm2 installed? `cargo xtask test` installs it)",
        );
    assert!(
        output.status.success(),
        "init-token failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn open_store(label: &str, token_dir: &Path) -> Arc<dyn Keystore> {
    let uri: Pkcs11Uri = format!(
        "pkcs11:token={label}?module-path={MODULE}&pin-source=file:{}",
        token_dir.join("pin").display()
    )
    .parse()
    .unwrap();
    Arc::new(Pkcs11Keystore::open(&uri).unwrap())
}

fn terminal(id: &str) -> TerminalId {
    id.parse().unwrap()
}

fn csr(common_name: &str, algorithm: &'static SignatureAlgorithm) -> (KeyPair, String) {
    let key = KeyPair::generate_for(algorithm).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    let pem = params.serialize_request(&key).unwrap().pem().unwrap();
    (key, pem)
}

fn issue(id: &str, csr_pem: &str) -> Result<pki::IssuedCertificate, PkiError> {
    let Fixture { keystore, dir } = fixture();
    pki::issue_terminal_certificate(keystore, dir, csr_pem, &terminal(id), TERMINAL_VALIDITY)
}

fn ca_der() -> CertificateDer<'static> {
    CertificateDer::from_pem_file(fixture().dir.join(CA_CERTIFICATE_FILE)).unwrap()
}

fn roots() -> Arc<RootCertStore> {
    let mut roots = RootCertStore::empty();
    roots.add(ca_der()).unwrap();
    Arc::new(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn ca_is_self_signed_by_the_token_key() {
    let der = ca_der();
    let (_, certificate) = X509Certificate::from_der(&der).unwrap();
    certificate.verify_signature(None).unwrap();
    assert!(certificate.is_ca());
    let (_, public_key) = fixture()
        .keystore
        .find_ec_p256(&CA_KEY_LABEL.parse().unwrap())
        .unwrap()
        .expect("the CA key is a token object");
    assert_eq!(
        certificate.public_key().subject_public_key.data.as_ref(),
        public_key.as_bytes()
    );
}

fn init_ca_twice_keeps_the_same_ca() {
    let Fixture { keystore, dir } = fixture();
    let before = fs::read_to_string(dir.join(CA_CERTIFICATE_FILE)).unwrap();
    let again = pki::init_ca(keystore, dir, CA_VALIDITY).unwrap();
    assert!(!again.created);
    assert_eq!(again.pem, before);
}

fn ca_of_another_keystore_is_refused() {
    let dir = &fixture().dir;
    let other = open_store(OTHER_TOKEN, TOKEN_DIR.get().unwrap());
    let before = fs::read_to_string(dir.join(CA_CERTIFICATE_FILE)).unwrap();
    let error = pki::init_ca(&other, dir, CA_VALIDITY).unwrap_err();
    assert!(
        matches!(error, PkiError::CertificateKeyMismatch { .. }),
        "{error}"
    );
    assert_eq!(
        fs::read_to_string(dir.join(CA_CERTIFICATE_FILE)).unwrap(),
        before
    );
    assert!(
        other
            .find_ec_p256(&CA_KEY_LABEL.parse().unwrap())
            .unwrap()
            .is_none()
    );
}

fn terminal_certificate_verifies() {
    let (_, pem) = csr("TERM-0001", &rcgen::PKCS_ECDSA_P256_SHA256);
    let issued = issue("TERM-0001", &pem).unwrap();
    assert_eq!(issued.serial_hex.len(), 32);
    let der = CertificateDer::from_pem_slice(issued.pem.as_bytes()).unwrap();
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(), provider())
        .build()
        .unwrap();
    verifier
        .verify_client_cert(&der, &[], UnixTime::now())
        .unwrap();
    assert_eq!(pki::terminal_id_of(&der).unwrap(), terminal("TERM-0001"));
    let (_, certificate) = X509Certificate::from_der(&der).unwrap();
    assert!(!certificate.is_ca());
    assert_eq!(hex::encode(certificate.raw_serial()), issued.serial_hex);
}

fn csr_for_another_terminal_is_refused() {
    let (_, pem) = csr("TERM-0002", &rcgen::PKCS_ECDSA_P256_SHA256);
    let error = issue("TERM-0001", &pem).unwrap_err();
    assert!(
        matches!(
            &error,
            PkiError::CsrTerminalMismatch { requested: RequestedName::Terminal(other), .. }
                if *other == terminal("TERM-0002")
        ),
        "{error}"
    );
}

fn csr_with_a_broken_signature_is_refused() {
    let (_, pem) = csr("T-1", &rcgen::PKCS_ECDSA_P256_SHA256);
    // The signature is the DER's last bytes: change one base64 digit near the end.
    let position = pem.find("\n-----END").unwrap() - 8;
    let mut bytes = pem.into_bytes();
    bytes[position] = if bytes[position] == b'A' { b'B' } else { b'A' };
    let error = issue("T-1", &String::from_utf8(bytes).unwrap()).unwrap_err();
    assert!(matches!(error, PkiError::CsrSignatureInvalid), "{error}");
}

fn non_p256_csrs_are_refused() {
    for algorithm in [&rcgen::PKCS_ED25519, &rcgen::PKCS_ECDSA_P384_SHA384] {
        let (_, pem) = csr("T-1", algorithm);
        let error = issue("T-1", &pem).unwrap_err();
        assert!(matches!(error, PkiError::CsrKeyNotP256), "{error}");
    }
}

fn oversized_and_garbage_csrs_are_refused() {
    let (_, pem) = csr("T-1", &rcgen::PKCS_ECDSA_P256_SHA256);
    let padded = format!("{pem}{}", "\n".repeat(CSR_PEM_BYTES_MAX + 1 - pem.len()));
    assert!(matches!(issue("T-1", &padded), Err(PkiError::CsrTooLarge)));
    for garbage in [
        "garbage",
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
    ] {
        let error = issue("T-1", garbage).unwrap_err();
        assert!(matches!(error, PkiError::MalformedCsr { .. }), "{error}");
    }
}

fn server_chain_verifies() {
    let Fixture { keystore, dir } = fixture();
    let tls = pki::load_server_tls(keystore, dir).unwrap();
    tls.certified_key().keys_match().unwrap();
    let verifier = WebPkiServerVerifier::builder_with_provider(roots(), provider())
        .build()
        .unwrap();
    for (name, valid) in [
        ("localhost", true),
        ("127.0.0.1", true),
        ("nfcpay.example", false),
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

fn tls_signatures_verify_on_the_host() {
    let Fixture { keystore, dir } = fixture();
    let tls = pki::load_server_tls(keystore, dir).unwrap();
    let signer = tls
        .signing_key
        .choose_scheme(&[rustls::SignatureScheme::ECDSA_NISTP256_SHA256])
        .unwrap();
    let message = b"signed inside SoftHSM2";
    let signature = p256::ecdsa::Signature::from_der(&signer.sign(message).unwrap()).unwrap();
    let (_, public_key) = keystore
        .find_ec_p256(&SERVER_KEY_LABEL.parse().unwrap())
        .unwrap()
        .unwrap();
    let verifying_key = p256::ecdsa::VerifyingKey::from_sec1_bytes(public_key.as_bytes()).unwrap();
    verifying_key.verify(message, &signature).unwrap();
}

fn tls_handshake_completes() {
    let Fixture { keystore, dir } = fixture();
    let (terminal_key, pem) = csr("TERM-0042", &rcgen::PKCS_ECDSA_P256_SHA256);
    let issued = issue("TERM-0042", &pem).unwrap();
    let server_tls = pki::load_server_tls(keystore, dir).unwrap();
    let client_key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(terminal_key.serialize_der()));
    let client_chain = vec![CertificateDer::from_pem_slice(issued.pem.as_bytes()).unwrap()];

    let client_verifier = WebPkiClientVerifier::builder_with_provider(roots(), provider())
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
        .with_root_certificates(roots())
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

fn only_certificates_are_written() {
    let Fixture { keystore, dir } = fixture();
    pki::ensure_receipt_key(keystore).unwrap();
    let mut names: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, [CA_CERTIFICATE_FILE, SERVER_CERTIFICATE_FILE]);
    for name in names {
        let text = fs::read_to_string(dir.join(name)).unwrap();
        assert!(!text.contains("PRIVATE"));
        assert_eq!(
            text.matches("-----BEGIN ").count(),
            text.matches("-----BEGIN CERTIFICATE-----").count()
        );
    }
}
