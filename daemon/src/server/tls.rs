//! TLS for the terminal listener: TLS 1.3 only, the server key behind rustls's [`SigningKey`]
//! (so it can stay in the HSM), client certificates verified against the platform's terminal
//! CA, and the whole rustls configuration swapped on reload.
//!
//! Client authentication is *optional at the TLS layer* (`allow_unauthenticated`) only so that
//! a terminal that has no certificate yet can reach `POST /v1/enroll`; a certificate that is
//! presented and does not chain to the terminal CA fails the handshake. Every other route
//! refuses a connection without a verified certificate (see `ClientIdentity`).

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, PoisonError, RwLock};

use nfcpay_protocol::TerminalId;
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::{CertifiedKey, SigningKey};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio_rustls::TlsAcceptor;

use super::ServerError;

/// ALPN protocol the terminal listener speaks.
const ALPN_HTTP_1_1: &[u8] = b"http/1.1";

/// The one place that chooses the cryptography: *ring*. Everything in the daemon that builds a
/// rustls configuration gets its provider here, so no process-wide default is needed.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What the terminal listener's TLS is made of.
pub struct TlsMaterial {
    /// The server's certificate chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key; typically backed by the HSM, so it is never in this process.
    pub key: Arc<dyn SigningKey>,
    /// The platform's terminal CA certificate(s): client certificates must chain to one.
    pub client_ca: Vec<CertificateDer<'static>>,
}

impl fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("chain_certificates", &self.chain.len())
            .field("key_algorithm", &self.key.algorithm())
            .field("client_ca_certificates", &self.client_ca.len())
            .finish()
    }
}

impl TlsMaterial {
    /// Reads the chain and the client CA from PEM files (`[server] certificate_chain` and
    /// `client_ca`) and pairs them with `key`.
    pub fn from_pem_files(
        certificate_chain: &Path,
        client_ca: &Path,
        key: Arc<dyn SigningKey>,
    ) -> Result<Self, ServerError> {
        Ok(Self {
            chain: read_certificates(certificate_chain)?,
            key,
            client_ca: read_certificates(client_ca)?,
        })
    }
}

fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, ServerError> {
    let pem_error = |reason: String| ServerError::Certificates {
        path: path.to_owned(),
        reason,
    };
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(|error| pem_error(error.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| pem_error(error.to_string()))?;
    if certificates.is_empty() {
        return Err(pem_error("no CERTIFICATE block".to_owned()));
    }
    Ok(certificates)
}

/// Produces fresh [`TlsMaterial`] on reload (SIGHUP): re-reads the files, re-opens the key.
pub type ReloadTlsMaterial = Arc<dyn Fn() -> Result<TlsMaterial, ServerError> + Send + Sync>;

/// The terminal listener's current rustls configuration, replaced as a whole on reload.
///
/// Each new connection takes the configuration current when it is accepted; connections
/// already open keep theirs.
pub struct TlsReloader {
    current: RwLock<Arc<rustls::ServerConfig>>,
    reload: ReloadTlsMaterial,
}

impl fmt::Debug for TlsReloader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsReloader").finish_non_exhaustive()
    }
}

impl TlsReloader {
    /// Builds the first configuration from `material`; `reload` makes the next ones.
    pub fn new(material: TlsMaterial, reload: ReloadTlsMaterial) -> Result<Self, ServerError> {
        Ok(Self {
            current: RwLock::new(server_config(material)?),
            reload,
        })
    }

    /// Calls the reload callback and swaps the new configuration in. On any error the current
    /// configuration stays. May block (the callback may talk to the HSM): from async code, call
    /// it through `spawn_blocking`.
    pub fn reload(&self) -> Result<(), ServerError> {
        let config = server_config((self.reload)()?)?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = config;
        Ok(())
    }

    pub(crate) fn acceptor(&self) -> TlsAcceptor {
        // Writers only store a complete `Arc`, so a poisoned lock still holds a valid one.
        TlsAcceptor::from(Arc::clone(
            &self.current.read().unwrap_or_else(PoisonError::into_inner),
        ))
    }
}

/// Builds the terminal listener's rustls configuration: TLS 1.3 only, `http/1.1`, client
/// certificates verified against `material.client_ca` but optional (for enrollment).
fn server_config(material: TlsMaterial) -> Result<Arc<rustls::ServerConfig>, ServerError> {
    let provider = crypto_provider();
    let mut roots = RootCertStore::empty();
    for certificate in material.client_ca {
        roots.add(certificate).map_err(ServerError::Tls)?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(ServerError::ClientVerifier)?;
    let certified = CertifiedKey::new(material.chain, material.key);
    match certified.keys_match() {
        // A key that cannot tell its public half (some HSM-backed keys) is taken on trust.
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(error) => return Err(ServerError::Tls(error)),
    }
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(ServerError::Tls)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(SingleCertificate(Arc::new(certified))));
    config.alpn_protocols = vec![ALPN_HTTP_1_1.to_vec()];
    Ok(Arc::new(config))
}

/// Answers every client hello with the one certificate (no SNI-based choice).
#[derive(Debug)]
struct SingleCertificate(Arc<CertifiedKey>);

impl ResolvesServerCert for SingleCertificate {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }
}

/// Who is at the other end of a terminal connection, as its TLS handshake established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ClientIdentity {
    /// No client certificate: only enrollment is open to it.
    Anonymous,
    /// A certificate that chained to the terminal CA, naming this terminal.
    Terminal(TerminalId),
    /// A certificate that chained to the terminal CA but names no valid terminal ID: treated
    /// as no certificate, with the reason logged.
    Unusable(String),
}

impl ClientIdentity {
    /// Reads the identity from a completed handshake. rustls has verified the chain already;
    /// here only the leaf's subject common name is read.
    pub(crate) fn of(connection: &rustls::ServerConnection) -> Self {
        match connection
            .peer_certificates()
            .and_then(|chain| chain.first())
        {
            None => Self::Anonymous,
            Some(leaf) => match terminal_id_of(leaf) {
                Ok(terminal) => Self::Terminal(terminal),
                Err(reason) => Self::Unusable(reason),
            },
        }
    }
}

/// The terminal ID a client certificate names: its subject's one common name.
fn terminal_id_of(certificate: &CertificateDer<'_>) -> Result<TerminalId, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(certificate)
        .map_err(|error| format!("certificate does not parse: {error}"))?;
    let mut names = parsed.subject().iter_common_name();
    let (Some(name), None) = (names.next(), names.next()) else {
        return Err("the subject must have exactly one common name".to_owned());
    };
    let name = name
        .as_str()
        .map_err(|error| format!("common name is not a string: {error}"))?;
    TerminalId::from_str(name).map_err(|error| format!("common name: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certificate_with_subject(names: &[&str]) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        for name in names {
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, *name);
        }
        params.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn reads_the_terminal_id_from_the_common_name() {
        let terminal = terminal_id_of(&certificate_with_subject(&["shop-42"])).unwrap();
        assert_eq!(terminal.as_str(), "shop-42");
        // (rcgen keeps one value per attribute type, so two common names cannot be made here.)
        for names in [&[][..], &["no spaces"][..], &[""][..]] {
            assert!(
                terminal_id_of(&certificate_with_subject(names)).is_err(),
                "{names:?}"
            );
        }
        assert!(terminal_id_of(&CertificateDer::from(vec![0x30, 0x03, 1, 2, 3])).is_err());
    }
}
