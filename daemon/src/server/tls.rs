//! TLS for the two HTTPS listeners: TLS 1.3 only, one server certificate whose key is behind
//! rustls's [`SigningKey`] (so it can stay in the HSM), and both rustls configurations swapped
//! together on reload.
//!
//! - The **terminal listener** requires a client certificate that chains to the platform's
//!   terminal CA *in the handshake*: without one, with one from another CA, or over TLS 1.2,
//!   the handshake fails and no HTTP byte is ever exchanged.
//! - The **enrollment listener** asks for no client certificate at all: a terminal that has
//!   none yet gets one there (`POST /v1/enroll`, its only route).

use std::fmt;
use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock};

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::{CertifiedKey, SigningKey};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio_rustls::TlsAcceptor;

use super::ServerError;
use crate::pki::{self, ClientTerminal, PkiError};

/// ALPN protocol both HTTPS listeners speak.
const ALPN_HTTP_1_1: &[u8] = b"http/1.1";

/// The one place that chooses the cryptography: *ring*. Everything in the daemon that builds a
/// rustls configuration gets its provider here, so no process-wide default is needed.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What the HTTPS listeners' TLS is made of.
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
    let pem_error =
        |reason, source: Option<rustls_pki_types::pem::Error>| ServerError::Certificates {
            path: path.to_owned(),
            reason,
            source: source.map(|error| error.into()),
        };
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(|error| pem_error("cannot read PEM", Some(error)))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| pem_error("not PEM certificates", Some(error)))?;
    if certificates.is_empty() {
        return Err(pem_error("no CERTIFICATE block", None));
    }
    Ok(certificates)
}

/// Produces fresh [`TlsMaterial`] on reload (SIGHUP): re-reads the files, re-opens the key.
pub type ReloadTlsMaterial = Arc<dyn Fn() -> Result<TlsMaterial, ServerError> + Send + Sync>;

/// The listeners' current rustls configurations, replaced together on reload.
///
/// Each new connection takes the configuration current when it is accepted; connections
/// already open keep theirs.
pub struct TlsReloader {
    current: RwLock<Arc<ServerConfigs>>,
    reload: ReloadTlsMaterial,
}

/// The two rustls configurations, made from the same [`TlsMaterial`].
struct ServerConfigs {
    /// Client certificate required and verified against the terminal CA.
    terminals: Arc<rustls::ServerConfig>,
    /// No client certificate asked for.
    enrollment: Arc<rustls::ServerConfig>,
}

impl fmt::Debug for TlsReloader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsReloader").finish_non_exhaustive()
    }
}

impl TlsReloader {
    /// Builds the first configurations from `material`; `reload` makes the next ones.
    pub fn new(material: TlsMaterial, reload: ReloadTlsMaterial) -> Result<Self, ServerError> {
        Ok(Self {
            current: RwLock::new(server_configs(material)?),
            reload,
        })
    }

    /// Calls the reload callback and swaps both new configurations in at once. On any error
    /// the current ones stay. May block (the callback may talk to the HSM): from async code,
    /// call it through `spawn_blocking`.
    pub fn reload(&self) -> Result<(), ServerError> {
        let configs = server_configs((self.reload)()?)?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = configs;
        Ok(())
    }

    /// The acceptor for a new connection on the terminal listener.
    pub(crate) fn terminal_acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(Arc::clone(&self.current().terminals))
    }

    /// The acceptor for a new connection on the enrollment listener.
    pub(crate) fn enrollment_acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(Arc::clone(&self.current().enrollment))
    }

    fn current(&self) -> Arc<ServerConfigs> {
        // Writers only store a complete `Arc`, so a poisoned lock still holds a valid one.
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }
}

/// Builds both listeners' rustls configurations from one `material`: TLS 1.3 only,
/// `http/1.1`, the same server certificate and key; the terminal listener's requires a client
/// certificate that chains to `material.client_ca`, the enrollment listener's asks for none.
fn server_configs(material: TlsMaterial) -> Result<Arc<ServerConfigs>, ServerError> {
    let provider = crypto_provider();
    let mut roots = RootCertStore::empty();
    for certificate in material.client_ca {
        roots.add(certificate).map_err(ServerError::Tls)?;
    }
    // No `allow_unauthenticated`: a client without a certificate fails the handshake.
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(ServerError::ClientVerifier)?;
    let certified = CertifiedKey::new(material.chain, material.key);
    match certified.keys_match() {
        // A key that cannot tell its public half (some HSM-backed keys) is taken on trust.
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(error) => return Err(ServerError::Tls(error)),
    }
    let resolver = Arc::new(SingleCertificate(Arc::new(certified)));
    let tls13 = || {
        rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(ServerError::Tls)
    };
    let with_alpn = |mut config: rustls::ServerConfig| {
        config.alpn_protocols = vec![ALPN_HTTP_1_1.to_vec()];
        Arc::new(config)
    };
    let terminals = tls13()?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver.clone());
    let enrollment = tls13()?.with_no_client_auth().with_cert_resolver(resolver);
    Ok(Arc::new(ServerConfigs {
        terminals: with_alpn(terminals),
        enrollment: with_alpn(enrollment),
    }))
}

/// Answers every client hello with the one certificate (no SNI-based choice).
#[derive(Debug)]
struct SingleCertificate(Arc<CertifiedKey>);

impl ResolvesServerCert for SingleCertificate {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }
}

/// The terminal a connection on the terminal listener comes from, and its certificate's
/// serial: what its client certificate names, read by [`pki::client_terminal`] (the one strict
/// parser of client certificates). rustls has verified the chain in the handshake already (so
/// there is a certificate). `Err` says why the certificate names no valid terminal.
pub(crate) fn client_terminal(
    connection: &rustls::ServerConnection,
) -> Result<ClientTerminal, PkiError> {
    let leaf = connection
        .peer_certificates()
        .and_then(|chain| chain.first())
        .ok_or(PkiError::MalformedCertificate {
            reason: "no client certificate",
        })?;
    pki::client_terminal(leaf.as_ref())
}
