//! Enrollment (docs/protocol.md §6.3): with a one-time code from the operator, the terminal
//! makes its TLS key and an ECDH key in its keystore, sends a CSR, and receives its client
//! certificate and its initial key wrapped under a key-encryption key both sides derive with
//! ECDH. The initial key is unwrapped straight into the keystore, checked by KCV, loaded into
//! the DUKPT future-key registers and destroyed: it never exists in clear outside the two
//! keystores.
//!
//! The terminal's directory then holds `terminal.json` (identity, platform address, receipt
//! key), `certificate.pem`, `ca.pem`, and the DUKPT state; its keys are in the keystore.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use nfcpay_keystore::atomic_file;
use nfcpay_keystore::dukpt::TransientKey;
use nfcpay_keystore::key_pair::HsmKeyPair;
use nfcpay_keystore::{EcPublicKey, KeyLabel, KeyPurpose, Keystore, KeystoreError};
use nfcpay_protocol::dukpt::KeyAlgorithm;
use nfcpay_protocol::enrollment::{EnrollmentAnswer, EnrollmentRequest, kek_context};
use nfcpay_protocol::{InitialKeyId, TerminalId};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::keys::{AgentKeyError, TerminalKeyState};
use crate::platform::{ClientIdentity, PlatformClient, PlatformError};

/// Label of the terminal's TLS key in its keystore.
pub const TLS_KEY_LABEL: &str = "nfcpay-terminal-tls";
/// Label of the terminal's ECDH key for enrollment (transient).
const ECDH_KEY_LABEL: &str = "nfcpay-enrollment-ecdh";
/// The terminal's settings file in its directory.
pub const TERMINAL_FILE: &str = "terminal.json";
/// The terminal's certificate in its directory.
pub const CERTIFICATE_FILE: &str = "certificate.pem";
/// The platform's CA certificate in the terminal's directory.
pub const CA_FILE: &str = "ca.pem";

/// Why enrollment or loading a terminal failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnrollError {
    /// The platform refused or could not be reached.
    #[error(transparent)]
    Platform(#[from] PlatformError),
    /// The keystore failed.
    #[error("keystore")]
    Keystore(#[from] KeystoreError),
    /// The DUKPT state could not be made or read.
    #[error(transparent)]
    Keys(#[from] AgentKeyError),
    /// The platform's answer is not a valid enrollment.
    #[error("enrollment answer: {0}")]
    Answer(String),
    /// The platform's answer is not the enrollment JSON.
    #[error("enrollment answer: not the enrollment JSON")]
    AnswerJson(#[source] serde_json::Error),
    /// A document of the terminal's own (the request, the certificate signing request, the
    /// terminal file) could not be encoded.
    #[error("cannot encode the {what}")]
    Encoding {
        /// Which document.
        what: &'static str,
        /// Why.
        #[source]
        source: crate::platform::Cause,
    },
    /// The unwrapped initial key's KCV differs from the platform's.
    #[error("the unwrapped initial key's KCV {unwrapped} differs from the platform's {expected}")]
    KcvMismatch {
        /// The platform's KCV.
        expected: String,
        /// The unwrapped key's KCV.
        unwrapped: String,
    },
    /// A file of the terminal's directory could not be read or written, or is not what it
    /// should be.
    #[error("{}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What happened.
        #[source]
        source: crate::platform::Cause,
    },
}

/// What a terminal keeps about itself and its platform (`terminal.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TerminalFile {
    /// The terminal's ID (its certificate's common name).
    pub terminal_id: String,
    /// The account its halves name.
    pub account_id: Option<String>,
    /// The platform's terminal listener, `host:port` (not the enrollment listener).
    pub platform_address: String,
    /// The name the platform's certificate must carry.
    pub platform_server_name: String,
    /// The platform's receipt-signing public key, hex.
    pub receipt_public_key: String,
    /// The Initial Key ID of the loaded key.
    pub initial_key_id: String,
    /// Its KCV, as checked at enrollment.
    pub initial_key_kcv: String,
}

/// Where to enroll, and where to pay afterwards: the platform has two HTTPS listeners with the
/// same server certificate.
pub struct EnrollmentTarget<'a> {
    /// `host:port` of the platform's terminal listener (`[server] listen`), which requires the
    /// client certificate enrollment issues. Saved as `platform_address` in `terminal.json`;
    /// every payment goes there.
    pub address: &'a str,
    /// `host:port` of the platform's enrollment listener (`[server] enroll_listen`), which
    /// asks for no client certificate; used only for `POST /v1/enroll`.
    pub enroll_address: &'a str,
    /// The name on the platform's certificate.
    pub server_name: &'a str,
    /// The platform CA certificate(s) the operator gave (PEM).
    pub ca_pem: &'a [u8],
}

/// An enrolled terminal, ready to pay.
pub struct Terminal {
    /// Its directory (`terminal.json`, certificates, DUKPT state, `pending/`).
    pub dir: PathBuf,
    /// Its settings.
    pub file: TerminalFile,
    /// Its ID.
    pub terminal_id: TerminalId,
    /// The platform's receipt key.
    pub receipt_public_key: EcPublicKey,
    /// Its DUKPT keys.
    pub keys: TerminalKeyState,
    /// Its client of the platform, authenticated with its certificate.
    pub platform: PlatformClient,
}

/// Enrolls `terminal_id` with `code`, keeping keys in `store` and files in `dir`.
pub async fn enroll(
    store: Arc<dyn Keystore>,
    dir: &Path,
    target: &EnrollmentTarget<'_>,
    terminal_id: &TerminalId,
    code: &Zeroizing<String>,
) -> Result<Terminal, EnrollError> {
    std::fs::create_dir_all(dir).map_err(|error| io_error(dir, error))?;
    let ca = certificates(target.ca_pem, Path::new("(given CA)"))?;
    let tls_label = label(TLS_KEY_LABEL)?;
    let tls_key = match HsmKeyPair::find(&store, &tls_label)? {
        // A key from an earlier, failed attempt is reused: the certificate will match it.
        Some(key) => key,
        None => HsmKeyPair::find_or_generate(&store, &tls_label)?.0,
    };
    let csr = {
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, terminal_id.as_str());
        params
            .serialize_request(&tls_key)
            .and_then(|csr| csr.pem())
            .map_err(|error| EnrollError::Encoding {
                what: "certificate signing request",
                source: error.into(),
            })?
    };
    let (ecdh, ecdh_public) = store.generate_ec_p256(&label(ECDH_KEY_LABEL)?, false)?;
    let result = async {
        let request = serde_json::to_vec(&EnrollmentRequest {
            terminal_id: terminal_id.as_str().to_owned(),
            code: Zeroizing::new(code.as_str().to_owned()),
            csr: csr.clone(),
            ecdh_public_key: hex::encode_upper(ecdh_public.as_bytes()),
        })
        .map_err(|error| EnrollError::Encoding {
            what: "enrollment request",
            source: error.into(),
        })?;
        let request = Zeroizing::new(request);
        let enrollment = PlatformClient::new(target.enroll_address, target.server_name, &ca, None)?;
        let answer = enrollment.enroll(request.to_vec()).await?;
        let answer = parse_answer(&answer)?;
        load_answer(&store, dir, target, terminal_id, &ecdh, answer, tls_key)
    }
    .await;
    if let Err(error) = store.destroy_ec(ecdh) {
        tracing::warn!(%error, "could not destroy the enrollment ECDH key");
    }
    result
}

fn load_answer(
    store: &Arc<dyn Keystore>,
    dir: &Path,
    target: &EnrollmentTarget<'_>,
    terminal_id: &TerminalId,
    ecdh: &nfcpay_keystore::PrivateKeyHandle,
    answer: EnrollmentAnswer,
    tls_key: HsmKeyPair,
) -> Result<Terminal, EnrollError> {
    let invalid = |what: &str| EnrollError::Answer(what.to_owned());
    if answer.terminal_id != terminal_id.as_str() {
        return Err(invalid("the platform enrolled another terminal"));
    }
    let point = |hex_text: &str| {
        hex::decode(hex_text)
            .ok()
            .and_then(|bytes| EcPublicKey::try_from(&bytes[..]).ok())
    };
    let platform_public =
        point(&answer.platform_ecdh_public_key).ok_or_else(|| invalid("platform ECDH key"))?;
    let receipt_public_key =
        point(&answer.receipt_public_key).ok_or_else(|| invalid("receipt key"))?;
    let initial_key_id: InitialKeyId = answer
        .initial_key_id
        .parse()
        .map_err(|_| invalid("initial key ID"))?;
    let algorithm: KeyAlgorithm = answer
        .initial_key_algorithm
        .parse()
        .map_err(|_| invalid("initial key algorithm"))?;
    let wrapped = hex::decode(&answer.wrapped_initial_key).map_err(|_| invalid("wrapped key"))?;
    // The platform's word on the account, checked as an account ID (an older platform says
    // nothing: the caller may supply it).
    let account_id = answer
        .account_id
        .as_deref()
        .map(|account| {
            account
                .parse::<nfcpay_protocol::AccountId>()
                .map(|account| account.to_string())
                .map_err(|_| invalid("account ID"))
        })
        .transpose()?;
    let store_ref = store.as_ref();
    let context = kek_context(terminal_id);
    let kek = TransientKey::new(
        store_ref,
        store_ref.ecdh_kek(ecdh, &platform_public, &context)?,
    );
    // Check the key before loading it: a copy made only for its KCV, then the one to load.
    let check = TransientKey::new(
        store_ref,
        store_ref.unwrap_key(kek.handle(), &wrapped, algorithm, KeyPurpose::Check)?,
    );
    let kcv = store_ref.kcv(check.handle())?.to_string();
    drop(check);
    if kcv != answer.initial_key_kcv {
        return Err(EnrollError::KcvMismatch {
            expected: answer.initial_key_kcv,
            unwrapped: kcv,
        });
    }
    let initial_key =
        store_ref.unwrap_key(kek.handle(), &wrapped, algorithm, KeyPurpose::Derive)?;
    drop(kek);
    let keys = TerminalKeyState::load_initial_key(
        Arc::clone(store),
        dir,
        initial_key,
        algorithm,
        initial_key_id,
    )?;
    write(dir, CERTIFICATE_FILE, answer.certificate.as_bytes())?;
    write(dir, CA_FILE, answer.ca_certificate.as_bytes())?;
    let file = TerminalFile {
        terminal_id: terminal_id.to_string(),
        account_id,
        platform_address: target.address.to_owned(),
        platform_server_name: target.server_name.to_owned(),
        receipt_public_key: answer.receipt_public_key,
        initial_key_id: initial_key_id.to_string(),
        initial_key_kcv: kcv,
    };
    let json = serde_json::to_vec_pretty(&file).map_err(|error| EnrollError::Encoding {
        what: "terminal file",
        source: error.into(),
    })?;
    write(dir, TERMINAL_FILE, &json)?;
    let platform = client(&file, dir, &tls_key)?;
    tracing::info!(terminal = %terminal_id, initial_key_id = %initial_key_id, kcv = %file.initial_key_kcv, "enrolled");
    Ok(Terminal {
        dir: dir.to_owned(),
        terminal_id: terminal_id.clone(),
        receipt_public_key,
        keys,
        platform,
        file,
    })
}

/// Opens an enrolled terminal from its directory and keystore.
pub fn open(store: Arc<dyn Keystore>, dir: &Path) -> Result<Terminal, EnrollError> {
    let file = read_terminal_file(dir)?;
    let terminal_id: TerminalId = file
        .terminal_id
        .parse()
        .map_err(|_| EnrollError::Answer("terminal ID".into()))?;
    let receipt_public_key = hex::decode(&file.receipt_public_key)
        .ok()
        .and_then(|bytes| EcPublicKey::try_from(&bytes[..]).ok())
        .ok_or_else(|| EnrollError::Answer("receipt key".into()))?;
    let platform = authenticated_client(&store, dir, &file)?;
    let keys = TerminalKeyState::open(store, dir)?;
    Ok(Terminal {
        dir: dir.to_owned(),
        terminal_id,
        receipt_public_key,
        keys,
        platform,
        file,
    })
}

/// Another client of the platform for the terminal enrolled in `dir` with its keys in
/// `store`, on a connection of its own; the terminal's DUKPT state is not opened. For load
/// tests that hold many connections as one terminal.
pub fn platform_client(
    store: &Arc<dyn Keystore>,
    dir: &Path,
) -> Result<PlatformClient, EnrollError> {
    authenticated_client(store, dir, &read_terminal_file(dir)?)
}

fn read_terminal_file(dir: &Path) -> Result<TerminalFile, EnrollError> {
    let path = dir.join(TERMINAL_FILE);
    let text = std::fs::read(&path).map_err(|error| io_error(&path, error))?;
    serde_json::from_slice(&text).map_err(|error| io_error(&path, NotATerminalFile(error)))
}

/// The terminal's client of the platform, authenticated with its certificate and TLS key.
fn authenticated_client(
    store: &Arc<dyn Keystore>,
    dir: &Path,
    file: &TerminalFile,
) -> Result<PlatformClient, EnrollError> {
    let tls_key = HsmKeyPair::find(store, &label(TLS_KEY_LABEL)?)?
        .ok_or_else(|| EnrollError::Answer("no TLS key in the keystore: enroll again".into()))?;
    client(file, dir, &tls_key)
}

fn client(
    file: &TerminalFile,
    dir: &Path,
    tls_key: &HsmKeyPair,
) -> Result<PlatformClient, EnrollError> {
    let read = |name: &str| {
        let path = dir.join(name);
        let pem = std::fs::read(&path).map_err(|error| io_error(&path, error))?;
        certificates(&pem, &path)
    };
    let identity = ClientIdentity {
        certificate_chain: read(CERTIFICATE_FILE)?,
        key: tls_key.rustls_signing_key(),
    };
    Ok(PlatformClient::new(
        &file.platform_address,
        &file.platform_server_name,
        &read(CA_FILE)?,
        Some(identity),
    )?)
}

fn certificates(pem: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>, EnrollError> {
    let certificates = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| io_error(path, error))?;
    if certificates.is_empty() {
        return Err(io_error(path, "no certificate"));
    }
    Ok(certificates)
}

/// Writes a file of the terminal's directory atomically, so a crash mid-enrollment never
/// leaves half a certificate.
fn write(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), EnrollError> {
    let path = dir.join(name);
    atomic_file::write_atomically(&path, bytes, atomic_file::PUBLIC_FILE_MODE)
        .map_err(|error| io_error(&path, error))
}

/// The platform's enrollment answer, from its JSON.
fn parse_answer(bytes: &[u8]) -> Result<EnrollmentAnswer, EnrollError> {
    serde_json::from_slice(bytes).map_err(EnrollError::AnswerJson)
}

fn label(text: &str) -> Result<KeyLabel, EnrollError> {
    Ok(text.parse()?)
}

fn io_error(path: &Path, error: impl Into<crate::platform::Cause>) -> EnrollError {
    EnrollError::Io {
        path: path.to_owned(),
        source: error.into(),
    }
}

/// A terminal file that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("not a terminal file")]
struct NotATerminalFile(#[source] serde_json::Error);

#[cfg(test)]
mod tests {
    use super::*;

    /// An answer that is not the enrollment JSON: said once, serde_json's words underneath.
    #[test]
    fn an_answer_that_is_not_the_enrollment_json_keeps_the_parse_error() {
        for answer in [&b"<html>502</html>"[..], b"{}", b"{\"terminal_id\": 7}"] {
            let error = parse_answer(answer).unwrap_err();
            let EnrollError::AnswerJson(parse) = &error else {
                panic!("{error:?}");
            };
            assert_eq!(
                nfcpay_protocol::ErrorChain(&error).to_string(),
                format!("enrollment answer: not the enrollment JSON: {parse}")
            );
        }
    }

    /// A terminal file that is not JSON: the file, then what it is not, then serde_json's
    /// words, each once.
    #[test]
    fn a_corrupt_terminal_file_names_the_file_and_keeps_the_parse_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(TERMINAL_FILE), b"{ not json").unwrap();
        let error = read_terminal_file(dir.path()).unwrap_err();
        let EnrollError::Io { path, source } = &error else {
            panic!("{error:?}");
        };
        assert_eq!(path, &dir.path().join(TERMINAL_FILE));
        let parse = source
            .downcast_ref::<NotATerminalFile>()
            .map(|not| not.0.to_string())
            .unwrap();
        let shown = nfcpay_protocol::ErrorChain(&error).to_string();
        assert_eq!(
            shown,
            format!("{}: not a terminal file: {parse}", path.display())
        );

        let missing = read_terminal_file(&dir.path().join("absent")).unwrap_err();
        assert!(
            nfcpay_protocol::ErrorChain(&missing)
                .to_string()
                .contains("No such file or directory"),
            "{missing}"
        );
    }
}
