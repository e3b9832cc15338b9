//! The platform's certificates, with every private key in the keystore (HSM), never in a file.
//!
//! Three P-256 key pairs live in the keystore as persistent objects under fixed labels:
//!
//! - [`CA_KEY_LABEL`]: the terminal CA. It signs its own certificate, the daemon's server
//!   certificate and each terminal's client certificate (issued at enrollment from the
//!   terminal's CSR, docs/protocol.md §6.3).
//! - [`SERVER_KEY_LABEL`]: the daemon's TLS server key, used by rustls through
//!   [`HsmKeyPair`]'s [`rustls::sign::SigningKey`].
//! - [`RECEIPT_KEY_LABEL`]: signs receipts (docs/protocol.md §7); terminals get its public key.
//!
//! The certificate directory holds only public certificates: [`CA_CERTIFICATE_FILE`] and
//! [`SERVER_CERTIFICATE_FILE`] (the server certificate, then the CA certificate), each written
//! atomically. Every function here blocks (keystore calls, file I/O): async callers run them
//! on blocking threads.

#[cfg(test)]
mod tests;

pub use nfcpay_keystore::key_pair::HsmKeyPair;

use std::fs;
use std::io::{self, Read as _};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nfcpay_keystore::atomic_file::{self, AtomicWriteError};
use nfcpay_keystore::{EcPublicKey, KeyLabel, Keystore, KeystoreError};
use nfcpay_protocol::TerminalId;
use p256::ecdsa::signature::Verifier as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyUsagePurpose, PublicKeyData as _, SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};
use sha2::{Digest as _, Sha256};
use time::OffsetDateTime;
use x509_parser::asn1_rs::Tag;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::oid_registry::OID_SIG_ECDSA_WITH_SHA256;
use x509_parser::prelude::{FromDer as _, X509Certificate, X509Name};

use nfcpay_keystore::key_pair::P256PublicKey;

/// Keystore label of the terminal CA's key pair.
pub const CA_KEY_LABEL: &str = "nfcpay-terminal-ca";
/// Keystore label of the daemon's TLS server key pair.
pub const SERVER_KEY_LABEL: &str = "nfcpay-server-tls";
/// Keystore label of the receipt-signing key pair.
pub const RECEIPT_KEY_LABEL: &str = "nfcpay-receipt";

/// The CA certificate's file name in the certificate directory.
pub const CA_CERTIFICATE_FILE: &str = "ca.pem";
/// The server certificate chain's file name in the certificate directory.
pub const SERVER_CERTIFICATE_FILE: &str = "server.pem";

/// The CA certificate's subject common name.
pub const CA_COMMON_NAME: &str = "nfcpay terminal CA";
/// The server certificate's subject common name (clients check its names, not this).
pub const SERVER_COMMON_NAME: &str = "nfcpay platform";

/// Largest CSR accepted, in bytes of PEM; checked before parsing. A P-256 CSR is about
/// 500 bytes, and the enrollment request that carries one is at most 4096 bytes.
pub const CSR_PEM_BYTES_MAX: usize = 4096;
/// Largest certificate file read from the certificate directory, in bytes.
pub const CERTIFICATE_FILE_BYTES_MAX: u64 = 64 * 1024;
/// Most names (DNS names and IP addresses) in a server certificate.
pub const SERVER_NAMES_MAX: usize = 32;
/// Validity of a server certificate (reissue with `nfcpay-admin init`, reload with SIGHUP).
pub const SERVER_CERTIFICATE_VALIDITY: Duration = Duration::from_secs(397 * 24 * 60 * 60);
/// Longest validity of any certificate issued here.
pub const CERTIFICATE_VALIDITY_MAX: Duration = Duration::from_secs(30 * 366 * 24 * 60 * 60);
/// How far before "now" a certificate's validity starts, for clocks slightly behind ours.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(5 * 60);
/// Length of a random certificate serial number, in bytes.
pub const SERIAL_BYTES: usize = 16;

/// Why a certificate operation failed. No variant carries key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// The keystore failed or refused.
    #[error("keystore")]
    Keystore(#[from] KeystoreError),
    /// A certificate file could not be read or written.
    #[error("certificate file {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What happened.
        #[source]
        source: io::Error,
    },
    /// A certificate file is larger than [`CERTIFICATE_FILE_BYTES_MAX`].
    #[error("certificate file {path} is larger than {CERTIFICATE_FILE_BYTES_MAX} bytes")]
    CertificateFileTooLarge {
        /// The file.
        path: PathBuf,
    },
    /// The CA certificate is missing: run `nfcpay-admin init` first.
    #[error("no CA certificate at {path}: initialise the CA first")]
    CaCertificateMissing {
        /// Where it was looked for.
        path: PathBuf,
    },
    /// The threads that make the platform's HSM calls could not be started.
    #[error("cannot start the HSM worker threads")]
    Workers(#[source] io::Error),
    /// A key pair this operation needs is not in the keystore.
    #[error("no key pair labelled {label} in the keystore")]
    KeyMissing {
        /// Its label.
        label: &'static str,
    },
    /// The certificate at `path` is not for the key pair `label` in the keystore (a different
    /// keystore, or the key was replaced); nothing was overwritten.
    #[error(
        "the certificate {path} does not belong to the key {label} in this keystore; \
         refusing to use or replace it"
    )]
    CertificateKeyMismatch {
        /// The certificate file.
        path: PathBuf,
        /// The key's label.
        label: &'static str,
    },
    /// A certificate (from a file or a peer) could not be parsed or lacks what it needs.
    #[error("malformed certificate: {reason}")]
    MalformedCertificate {
        /// What is wrong.
        reason: &'static str,
    },
    /// A CSR is larger than [`CSR_PEM_BYTES_MAX`].
    #[error("certificate signing request larger than {CSR_PEM_BYTES_MAX} bytes")]
    CsrTooLarge,
    /// A CSR is not a PEM PKCS#10 request.
    #[error("malformed certificate signing request: {reason}")]
    MalformedCsr {
        /// What is wrong.
        reason: &'static str,
    },
    /// A CSR's key is not an ECDSA P-256 key.
    #[error("certificate signing request: the key must be ECDSA P-256")]
    CsrKeyNotP256,
    /// A CSR's self-signature is not an ECDSA-with-SHA-256 signature by its own key.
    #[error("certificate signing request: its signature does not verify")]
    CsrSignatureInvalid,
    /// A CSR's subject common name is not the terminal ID it must be.
    #[error(
        "certificate signing request names {requested}, but it was expected for terminal {expected}"
    )]
    CsrTerminalMismatch {
        /// The terminal the request was expected for (the enrollment code's).
        expected: TerminalId,
        /// What the CSR's common name says, when it is a valid terminal ID at all.
        requested: RequestedName,
    },
    /// A server name is neither a valid DNS name nor an IP address.
    #[error("invalid server name {name:?}: not a DNS name or IP address")]
    InvalidServerName {
        /// The name.
        name: String,
    },
    /// A server certificate needs 1 to [`SERVER_NAMES_MAX`] names.
    #[error("a server certificate needs 1 to {SERVER_NAMES_MAX} names")]
    ServerNameCount,
    /// A validity is zero or longer than [`CERTIFICATE_VALIDITY_MAX`].
    #[error("certificate validity must be more than zero and at most 30 years")]
    InvalidValidity,
    /// The system's random number generator failed.
    #[error("random number generator")]
    Random(#[source] getrandom::Error),
    /// rcgen could not build or sign a certificate (a keystore refusal to sign is logged).
    #[error("building the certificate failed")]
    Certificate(#[source] rcgen::Error),
}

/// The common name a refused CSR asked for, as far as it can be shown.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RequestedName {
    /// A well-formed terminal ID, but another one.
    Terminal(TerminalId),
    /// Something that is not a terminal ID (not shown: it is arbitrary peer input).
    NotATerminalId,
}

impl std::fmt::Display for RequestedName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Terminal(terminal_id) => write!(f, "terminal {terminal_id}"),
            Self::NotATerminalId => f.write_str("no valid terminal ID"),
        }
    }
}

/// The CA certificate, as [`init_ca`] left it.
#[derive(Debug, Clone)]
pub struct CaCertificate {
    /// The certificate, PEM.
    pub pem: String,
    /// SHA-256 of the DER certificate, uppercase hex, for operators to compare.
    pub fingerprint_sha256_hex: String,
    /// Whether this call made it (else it was already there, for the same key).
    pub created: bool,
}

/// A certificate just issued.
#[derive(Debug, Clone)]
pub struct IssuedCertificate {
    /// The certificate, PEM.
    pub pem: String,
    /// Its serial number, lowercase hex (32 digits).
    pub serial_hex: String,
}

/// What the TLS server needs: its certificate chain, its signing key (in the keystore) and
/// the CA certificates client certificates must chain to.
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// The server certificate, then the CA certificate.
    pub certificate_chain: Vec<CertificateDer<'static>>,
    /// The server's private key, signing in the keystore.
    pub signing_key: Arc<dyn rustls::sign::SigningKey>,
    /// The terminal CA certificate(s), the only roots for client certificates.
    pub client_ca_certificates: Vec<CertificateDer<'static>>,
}

impl ServerTls {
    /// Chain and key together, as a rustls server certificate resolver takes them (e.g.
    /// `rustls::sign::SingleCertAndKey::from(tls.certified_key())`).
    pub fn certified_key(&self) -> Arc<rustls::sign::CertifiedKey> {
        Arc::new(rustls::sign::CertifiedKey::new(
            self.certificate_chain.clone(),
            Arc::clone(&self.signing_key),
        ))
    }
}

/// Finds or generates the CA key pair and makes the self-signed CA certificate
/// `dir/ca.pem`, valid for `validity` from now.
///
/// Idempotent: when `ca.pem` exists and belongs to the CA key in the keystore, it is kept as
/// it is. When it exists for another key (or the keystore has no CA key), nothing is
/// generated or overwritten and the call fails.
#[tracing::instrument(skip(keystore))]
pub fn init_ca(
    keystore: &Arc<dyn Keystore>,
    dir: &Path,
    validity: Duration,
) -> Result<CaCertificate, PkiError> {
    let path = dir.join(CA_CERTIFICATE_FILE);
    let label = key_label(CA_KEY_LABEL)?;
    if let Some(pem) = read_optional_file(&path)? {
        let mismatch = || PkiError::CertificateKeyMismatch {
            path: path.clone(),
            label: CA_KEY_LABEL,
        };
        let key = HsmKeyPair::find(keystore, &label)?.ok_or_else(mismatch)?;
        let certificate = first_certificate(&pem)?;
        if !certificate_is_for_key(&certificate, &key)? {
            return Err(mismatch());
        }
        tracing::info!(path = %path.display(), "CA certificate already present for the CA key");
        return Ok(CaCertificate {
            fingerprint_sha256_hex: hex::encode_upper(Sha256::digest(&certificate)),
            pem,
            created: false,
        });
    }
    let (not_before, not_after) = validity_window(validity)?;
    let (key, _) = HsmKeyPair::find_or_generate(keystore, &label)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name(CA_COMMON_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.serial_number = Some(random_serial()?);
    params.not_before = not_before;
    params.not_after = not_after;
    let certificate = params.self_signed(&key).map_err(PkiError::Certificate)?;
    let pem = certificate.pem();
    fs::create_dir_all(dir).map_err(|source| PkiError::Io {
        path: dir.to_owned(),
        source,
    })?;
    write_atomically(&path, pem.as_bytes())?;
    tracing::info!(path = %path.display(), "created the CA certificate");
    Ok(CaCertificate {
        fingerprint_sha256_hex: hex::encode_upper(Sha256::digest(certificate.der())),
        pem,
        created: true,
    })
}

/// Finds or generates the server's TLS key pair and issues it a certificate signed by the
/// CA for `names` (DNS names and IP addresses, e.g. `localhost`, `127.0.0.1`), valid for
/// [`SERVER_CERTIFICATE_VALIDITY`]; writes `dir/server.pem` (the certificate, then the CA
/// certificate), replacing any previous one.
#[tracing::instrument(skip(keystore))]
pub fn issue_server_certificate(
    keystore: &Arc<dyn Keystore>,
    dir: &Path,
    names: &[String],
) -> Result<IssuedCertificate, PkiError> {
    if names.is_empty() || names.len() > SERVER_NAMES_MAX {
        return Err(PkiError::ServerNameCount);
    }
    let subject_alt_names = names
        .iter()
        .map(|name| server_name(name))
        .collect::<Result<Vec<_>, _>>()?;
    let authority = CertificateAuthority::load(keystore, dir)?;
    let (key, _) = HsmKeyPair::find_or_generate(keystore, &key_label(SERVER_KEY_LABEL)?)?;
    let (not_before, not_after) = validity_window(SERVER_CERTIFICATE_VALIDITY)?;
    let serial = random_serial()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name(SERVER_COMMON_NAME);
    params.subject_alt_names = subject_alt_names;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(serial.clone());
    params.not_before = not_before;
    params.not_after = not_after;
    let certificate = params
        .signed_by(&key, &authority.issuer()?)
        .map_err(PkiError::Certificate)?;
    let pem = certificate.pem();
    let chain = format!("{pem}{}", authority.pem);
    write_atomically(&dir.join(SERVER_CERTIFICATE_FILE), chain.as_bytes())?;
    tracing::info!(serial = %hex::encode(serial.to_bytes()), "issued the server certificate");
    Ok(IssuedCertificate {
        pem,
        serial_hex: hex::encode(serial.to_bytes()),
    })
}

/// Finds or generates the receipt-signing key pair; its public key is what terminals get.
#[tracing::instrument(skip(keystore))]
pub fn ensure_receipt_key(keystore: &Arc<dyn Keystore>) -> Result<EcPublicKey, PkiError> {
    let (key, _) = HsmKeyPair::find_or_generate(keystore, &key_label(RECEIPT_KEY_LABEL)?)?;
    Ok(key.public_key().clone())
}

/// Loads what the TLS server needs from `dir` and the keystore, checking that the server
/// certificate is for the server key.
#[tracing::instrument(skip(keystore))]
pub fn load_server_tls(keystore: &Arc<dyn Keystore>, dir: &Path) -> Result<ServerTls, PkiError> {
    let chain_path = dir.join(SERVER_CERTIFICATE_FILE);
    let chain_pem = read_optional_file(&chain_path)?.ok_or_else(|| PkiError::Io {
        path: chain_path.clone(),
        source: io::ErrorKind::NotFound.into(),
    })?;
    let certificate_chain = certificates(&chain_pem)?;
    let key =
        HsmKeyPair::find(keystore, &key_label(SERVER_KEY_LABEL)?)?.ok_or(PkiError::KeyMissing {
            label: SERVER_KEY_LABEL,
        })?;
    // `certificates` returns at least one.
    let leaf = certificate_chain
        .first()
        .ok_or(PkiError::MalformedCertificate {
            reason: "no certificate in the PEM file",
        })?;
    if !certificate_is_for_key(leaf, &key)? {
        return Err(PkiError::CertificateKeyMismatch {
            path: chain_path,
            label: SERVER_KEY_LABEL,
        });
    }
    let authority = CertificateAuthority::load(keystore, dir)?;
    Ok(ServerTls {
        certificate_chain,
        signing_key: key.rustls_signing_key(),
        client_ca_certificates: vec![authority.certificate],
    })
}

/// Issues a terminal's client certificate from its CSR (PEM PKCS#10), valid for `validity`.
///
/// Refuses, before anything is signed: a CSR over [`CSR_PEM_BYTES_MAX`]; one that does not
/// parse; a key other than P-256; a self-signature that does not verify (ECDSA with
/// SHA-256); a subject whose one common name is not exactly `expected_terminal_id`. Nothing
/// else in the CSR is used: the certificate names the terminal (CN only), is not a CA, allows
/// client authentication only, and has a random 16-byte serial.
#[tracing::instrument(skip(keystore, csr_pem), fields(csr_bytes = csr_pem.len()))]
pub fn issue_terminal_certificate(
    keystore: &Arc<dyn Keystore>,
    dir: &Path,
    csr_pem: &str,
    expected_terminal_id: &TerminalId,
    validity: Duration,
) -> Result<IssuedCertificate, PkiError> {
    let request = TerminalCsr::parse(csr_pem)?;
    if request.common_name.as_ref() != Some(expected_terminal_id) {
        return Err(PkiError::CsrTerminalMismatch {
            expected: expected_terminal_id.clone(),
            requested: request
                .common_name
                .map_or(RequestedName::NotATerminalId, RequestedName::Terminal),
        });
    }
    let (not_before, not_after) = validity_window(validity)?;
    let authority = CertificateAuthority::load(keystore, dir)?;
    let serial = random_serial()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name(expected_terminal_id.as_str());
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(serial.clone());
    params.not_before = not_before;
    params.not_after = not_after;
    let certificate = params
        .signed_by(&P256PublicKey(&request.public_key), &authority.issuer()?)
        .map_err(PkiError::Certificate)?;
    let serial_hex = hex::encode(serial.to_bytes());
    tracing::info!(terminal_id = %expected_terminal_id, serial = %serial_hex, "issued a terminal certificate");
    Ok(IssuedCertificate {
        pem: certificate.pem(),
        serial_hex,
    })
}

/// Who a client certificate on the terminal listener says its holder is. rustls has verified
/// the chain to the terminal CA in the handshake; this is what the leaf names, read by
/// [`client_terminal`], the one parser of client certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTerminal {
    /// The terminal: the subject's one common name.
    pub terminal_id: TerminalId,
    /// The certificate's serial, to compare with the terminal's enrolled certificate
    /// (`terminals.certificate_serial`): a certificate the CA issued for the same terminal
    /// earlier (superseded by a re-enrollment) names the terminal but has another serial.
    pub certificate_serial: CertificateSerial,
}

/// Reads a client certificate strictly: one DER X.509 certificate and nothing after it, a
/// serial of 1 to [`SERIAL_BYTES_MAX`] bytes, and a subject with exactly one common name, a
/// UTF8String or PrintableString that is a valid terminal ID. (Whether the certificate is the
/// CA's is rustls' check, not this.)
pub fn client_terminal(certificate_der: &[u8]) -> Result<ClientTerminal, PkiError> {
    let (rest, certificate) =
        X509Certificate::from_der(certificate_der).map_err(|_| PkiError::MalformedCertificate {
            reason: "not a DER X.509 certificate",
        })?;
    if !rest.is_empty() {
        return Err(PkiError::MalformedCertificate {
            reason: "bytes after the certificate",
        });
    }
    let name = single_common_name(certificate.subject()).ok_or(PkiError::MalformedCertificate {
        reason: "the subject needs exactly one UTF-8 or printable common name",
    })?;
    let terminal_id = name.parse().map_err(|_| PkiError::MalformedCertificate {
        reason: "the subject's common name is not a terminal ID",
    })?;
    let certificate_serial = CertificateSerial::try_from(certificate.raw_serial())?;
    Ok(ClientTerminal {
        terminal_id,
        certificate_serial,
    })
}

/// The terminal a client certificate names ([`client_terminal`]'s reading, serial aside).
pub fn terminal_id_of(certificate_der: &[u8]) -> Result<TerminalId, PkiError> {
    client_terminal(certificate_der).map(|client| client.terminal_id)
}

/// Most bytes in a certificate serial number (RFC 5280 §4.1.2.2: at most 20 octets).
pub const SERIAL_BYTES_MAX: usize = 20;

/// A certificate's serial number: the content bytes of its DER INTEGER (1 to
/// [`SERIAL_BYTES_MAX`]), compared byte for byte. Written as lowercase hex, as
/// `terminals.certificate_serial` stores it; read from hex in either case. `Copy`, so that
/// the memory of active terminals hands it out without allocating.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CertificateSerial {
    /// The serial's bytes, then zeros.
    bytes: [u8; SERIAL_BYTES_MAX],
    /// How many of `bytes` are the serial's (1 ..= [`SERIAL_BYTES_MAX`]).
    length: u8,
}

impl CertificateSerial {
    /// The serial's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.length)]
    }
}

impl TryFrom<&[u8]> for CertificateSerial {
    type Error = PkiError;

    fn try_from(serial: &[u8]) -> Result<Self, PkiError> {
        if serial.is_empty() || serial.len() > SERIAL_BYTES_MAX {
            return Err(PkiError::MalformedCertificate {
                reason: "the serial number must have 1 to 20 bytes",
            });
        }
        let mut bytes = [0; SERIAL_BYTES_MAX];
        bytes[..serial.len()].copy_from_slice(serial);
        Ok(Self {
            bytes,
            // At most SERIAL_BYTES_MAX (20), checked above.
            length: u8::try_from(serial.len()).unwrap_or(u8::MAX),
        })
    }
}

impl std::str::FromStr for CertificateSerial {
    type Err = PkiError;

    fn from_str(hex_text: &str) -> Result<Self, PkiError> {
        if hex_text.len() > 2 * SERIAL_BYTES_MAX {
            return Err(PkiError::MalformedCertificate {
                reason: "the serial number must have 1 to 20 bytes",
            });
        }
        let bytes = hex::decode(hex_text).map_err(|_| PkiError::MalformedCertificate {
            reason: "the serial number is not hex",
        })?;
        Self::try_from(bytes.as_slice())
    }
}

impl std::fmt::Display for CertificateSerial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.as_bytes()))
    }
}

impl std::fmt::Debug for CertificateSerial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CertificateSerial({self})")
    }
}

/// The CA, loaded for issuing: its certificate from `ca.pem` and its key from the keystore,
/// checked to belong together.
struct CertificateAuthority {
    key: HsmKeyPair,
    certificate: CertificateDer<'static>,
    pem: String,
}

impl CertificateAuthority {
    fn load(keystore: &Arc<dyn Keystore>, dir: &Path) -> Result<Self, PkiError> {
        let path = dir.join(CA_CERTIFICATE_FILE);
        let pem = read_optional_file(&path)?
            .ok_or_else(|| PkiError::CaCertificateMissing { path: path.clone() })?;
        let certificate = first_certificate(&pem)?;
        let key =
            HsmKeyPair::find(keystore, &key_label(CA_KEY_LABEL)?)?.ok_or(PkiError::KeyMissing {
                label: CA_KEY_LABEL,
            })?;
        if !certificate_is_for_key(&certificate, &key)? {
            return Err(PkiError::CertificateKeyMismatch {
                path,
                label: CA_KEY_LABEL,
            });
        }
        Ok(Self {
            key,
            certificate,
            pem,
        })
    }

    /// The issuer rcgen signs with: the CA's name, key identifier and key usages from its
    /// certificate, and its key in the keystore.
    fn issuer(&self) -> Result<Issuer<'static, &HsmKeyPair>, PkiError> {
        Issuer::from_ca_cert_der(&self.certificate, &self.key).map_err(PkiError::Certificate)
    }
}

/// A terminal's CSR, parsed and its signature verified.
struct TerminalCsr {
    public_key: EcPublicKey,
    /// The subject's one common name, when it is a valid terminal ID.
    common_name: Option<TerminalId>,
}

impl TerminalCsr {
    fn parse(csr_pem: &str) -> Result<Self, PkiError> {
        if csr_pem.len() > CSR_PEM_BYTES_MAX {
            return Err(PkiError::CsrTooLarge);
        }
        let der =
            CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes()).map_err(|_| {
                PkiError::MalformedCsr {
                    reason: "no PEM CERTIFICATE REQUEST",
                }
            })?;
        let (rest, request) = X509CertificationRequest::from_der(der.as_ref()).map_err(|_| {
            PkiError::MalformedCsr {
                reason: "not a DER PKCS#10 request",
            }
        })?;
        if !rest.is_empty() {
            return Err(PkiError::MalformedCsr {
                reason: "bytes after the request",
            });
        }
        let info = &request.certification_request_info;
        let public_key = p256_public_key(
            info.subject_pki.raw,
            &info.subject_pki.subject_public_key.data,
        )
        .ok_or(PkiError::CsrKeyNotP256)?;
        verify_p256_sha256(
            &public_key,
            info.raw,
            &request.signature_algorithm,
            &request.signature_value.data,
        )?;
        let common_name = single_common_name(&info.subject).and_then(|name| name.parse().ok());
        Ok(Self {
            public_key,
            common_name,
        })
    }
}

/// The P-256 public key of a DER SubjectPublicKeyInfo whose key bits are `point`, or `None`
/// when the SPKI is not exactly `id-ecPublicKey` / `prime256v1` with an uncompressed point
/// on the curve (compared whole, as there is one valid encoding).
fn p256_public_key(subject_public_key_info: &[u8], point: &[u8]) -> Option<EcPublicKey> {
    let public_key = EcPublicKey::try_from(point).ok()?;
    let expected = P256PublicKey(&public_key).subject_public_key_info();
    (expected == subject_public_key_info).then_some(public_key)
}

/// Checks an `ecdsa-with-SHA256` signature (DER) over `message` by `public_key`.
fn verify_p256_sha256(
    public_key: &EcPublicKey,
    message: &[u8],
    algorithm: &x509_parser::x509::AlgorithmIdentifier<'_>,
    signature_der: &[u8],
) -> Result<(), PkiError> {
    if algorithm.algorithm != OID_SIG_ECDSA_WITH_SHA256 || algorithm.parameters.is_some() {
        return Err(PkiError::CsrSignatureInvalid);
    }
    let verifying_key = p256::ecdsa::VerifyingKey::from_sec1_bytes(public_key.as_bytes())
        .map_err(|_| PkiError::CsrKeyNotP256)?;
    let signature = p256::ecdsa::Signature::from_der(signature_der)
        .map_err(|_| PkiError::CsrSignatureInvalid)?;
    verifying_key
        .verify(message, &signature)
        .map_err(|_| PkiError::CsrSignatureInvalid)
}

/// The one common name of `name`, or `None` if it has none, several, or one that is not a
/// UTF8String or PrintableString (x509-parser would also take IA5 and numeric strings).
fn single_common_name<'a>(name: &'a X509Name<'_>) -> Option<&'a str> {
    let mut common_names = name.iter_common_name();
    let first = common_names.next()?;
    if common_names.next().is_some() {
        return None;
    }
    match first.attr_value().tag() {
        Tag::Utf8String | Tag::PrintableString => first.as_str().ok(),
        _ => None,
    }
}

/// Whether `certificate`'s subject public key is `key`'s.
fn certificate_is_for_key(
    certificate: &CertificateDer<'_>,
    key: &HsmKeyPair,
) -> Result<bool, PkiError> {
    let (_, parsed) =
        X509Certificate::from_der(certificate).map_err(|_| PkiError::MalformedCertificate {
            reason: "not a DER X.509 certificate",
        })?;
    Ok(parsed.public_key().raw == key.subject_public_key_info())
}

fn common_name(name: &str) -> DistinguishedName {
    let mut distinguished_name = DistinguishedName::new();
    distinguished_name.push(DnType::CommonName, name);
    distinguished_name
}

fn server_name(name: &str) -> Result<SanType, PkiError> {
    let invalid = || PkiError::InvalidServerName {
        name: name.to_owned(),
    };
    if let Ok(address) = name.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(address));
    }
    rustls_pki_types::DnsName::try_from(name).map_err(|_| invalid())?;
    Ok(SanType::DnsName(name.try_into().map_err(|_| invalid())?))
}

fn key_label(label: &'static str) -> Result<KeyLabel, PkiError> {
    Ok(label.parse()?)
}

/// `(now − CLOCK_SKEW_ALLOWANCE, now + validity)`, whole seconds.
fn validity_window(validity: Duration) -> Result<(OffsetDateTime, OffsetDateTime), PkiError> {
    if validity.is_zero() || validity > CERTIFICATE_VALIDITY_MAX {
        return Err(PkiError::InvalidValidity);
    }
    let now = OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .map_err(|_| PkiError::InvalidValidity)?;
    let not_before = now
        .checked_sub(
            time::Duration::try_from(CLOCK_SKEW_ALLOWANCE)
                .map_err(|_| PkiError::InvalidValidity)?,
        )
        .ok_or(PkiError::InvalidValidity)?;
    let not_after = now
        .checked_add(time::Duration::try_from(validity).map_err(|_| PkiError::InvalidValidity)?)
        .ok_or(PkiError::InvalidValidity)?;
    Ok((not_before, not_after))
}

/// A random positive serial of exactly [`SERIAL_BYTES`] bytes (126 random bits: the top bit
/// is cleared so it is positive, the next set so its DER length is fixed).
fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut bytes = [0u8; SERIAL_BYTES];
    getrandom::fill(&mut bytes).map_err(PkiError::Random)?;
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

/// Every certificate in `pem`; at least one.
fn certificates(pem: &str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certificates = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| PkiError::MalformedCertificate {
            reason: "not PEM certificates",
        })?;
    if certificates.is_empty() {
        return Err(PkiError::MalformedCertificate {
            reason: "no certificate in the PEM file",
        });
    }
    Ok(certificates)
}

fn first_certificate(pem: &str) -> Result<CertificateDer<'static>, PkiError> {
    Ok(certificates(pem)?.swap_remove(0))
}

/// The file's text, or `None` if it does not exist; at most [`CERTIFICATE_FILE_BYTES_MAX`].
fn read_optional_file(path: &Path) -> Result<Option<String>, PkiError> {
    let io_error = |source| PkiError::Io {
        path: path.to_owned(),
        source,
    };
    let file = match fs::File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(io_error(error)),
    };
    let mut text = String::new();
    file.take(CERTIFICATE_FILE_BYTES_MAX + 1)
        .read_to_string(&mut text)
        .map_err(io_error)?;
    if text.len() as u64 > CERTIFICATE_FILE_BYTES_MAX {
        return Err(PkiError::CertificateFileTooLarge {
            path: path.to_owned(),
        });
    }
    Ok(Some(text))
}

/// Writes `path` atomically and durably ([`nfcpay_keystore::atomic_file`]), so a reader
/// (the daemon reloading on SIGHUP) sees the old file or the new one, never half of one.
fn write_atomically(path: &Path, contents: &[u8]) -> Result<(), PkiError> {
    atomic_file::write_atomically(path, contents, atomic_file::PUBLIC_FILE_MODE).map_err(|error| {
        let source = match error {
            AtomicWriteError::Save(source) | AtomicWriteError::SyncDirectory(source) => source,
            other => std::io::Error::other(other),
        };
        PkiError::Io {
            path: path.to_owned(),
            source,
        }
    })
}
