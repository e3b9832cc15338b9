//! TLS for the two HTTPS listeners: TLS 1.3 only, one server certificate whose key is behind
//! rustls's [`SigningKey`] (so it can stay in the HSM), and both rustls configurations swapped
//! together on reload.
//!
//! - The **terminal listener** requires a client certificate that chains to the platform's
//!   terminal CA *in the handshake*: without one, with one from another CA, or over TLS 1.2,
//!   the handshake fails and no HTTP byte is ever exchanged.
//! - The **enrollment listener** asks for no client certificate at all: a terminal that has
//!   none yet gets one there (`POST /v1/enroll`, its only route).
//!
//! # The server key's signature has a deadline
//!
//! rustls asks for the handshake's signature synchronously, from inside the connection task's
//! poll, and the key is in the HSM: a stalled HSM would hold a runtime thread for every
//! handshake, and a `C_Sign` that never returns would hold it for good. So the server key is
//! wrapped ([`HandshakeSigning`]): each signature is made on a thread of its own, at most
//! [`TLS_SIGNATURES_IN_FLIGHT_MAX`] at once (one more is refused at once), and the handshake
//! waits for it at most [`TLS_SIGNATURE_TIMEOUT`]. On nfcpayd's multi-thread runtime the wait is
//! inside [`tokio::task::block_in_place`], which hands the worker's other tasks to another
//! thread first, so the runtime keeps serving while a handshake waits. A signature not made in
//! time fails that handshake, counted in `nfcpayd_tls_signatures_failed_total{reason}`.

use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::{CertifiedKey, Signer, SigningKey};
use rustls::{SignatureAlgorithm, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, SubjectPublicKeyInfoDer};
use tokio_rustls::TlsAcceptor;

use super::{Metrics, ServerError};
use crate::pki::{self, ClientTerminal, PkiError};

/// ALPN protocol both HTTPS listeners speak.
const ALPN_HTTP_1_1: &[u8] = b"http/1.1";

/// Longest a TLS handshake waits for the server key's signature: as long as a half waits for
/// one HSM job (`service::workers::HSM_JOB_TIMEOUT`); beyond, the HSM is taken as stalled and
/// the handshake fails.
pub const TLS_SIGNATURE_TIMEOUT: Duration = Duration::from_secs(3);
/// Most handshake signatures in progress at once (each on a thread of its own, which a
/// `C_Sign` that never returns keeps): one more fails its handshake at once.
pub const TLS_SIGNATURES_IN_FLIGHT_MAX: usize = 64;

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
    /// The bound on the server key's signatures, shared by every configuration it makes.
    signing: Arc<HandshakeSigning>,
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
        let signing = Arc::new(HandshakeSigning::new(
            TLS_SIGNATURES_IN_FLIGHT_MAX,
            TLS_SIGNATURE_TIMEOUT,
        ));
        Ok(Self {
            current: RwLock::new(server_configs(material, &signing)?),
            reload,
            signing,
        })
    }

    /// Registers `nfcpayd_tls_signatures_failed_total{reason}` with the front end's metrics.
    pub fn register_metrics(&self, metrics: &Metrics) {
        metrics.register(
            "tls_signatures_failed",
            "TLS handshakes failed for want of the server key's signature: too many in progress \
             (busy), not made within the deadline (timed_out), refused by the keystore \
             (failed), or the signer panicked",
            self.signing.failures.clone(),
        );
    }

    /// Calls the reload callback and swaps both new configurations in at once. On any error
    /// the current ones stay. May block (the callback may talk to the HSM): from async code,
    /// call it through `spawn_blocking`.
    pub fn reload(&self) -> Result<(), ServerError> {
        let configs = server_configs((self.reload)()?, &self.signing)?;
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
/// The key signs within `signing`'s bounds.
fn server_configs(
    material: TlsMaterial,
    signing: &Arc<HandshakeSigning>,
) -> Result<Arc<ServerConfigs>, ServerError> {
    let provider = crypto_provider();
    let mut roots = RootCertStore::empty();
    for certificate in material.client_ca {
        roots.add(certificate).map_err(ServerError::Tls)?;
    }
    // No `allow_unauthenticated`: a client without a certificate fails the handshake.
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(ServerError::ClientVerifier)?;
    let key = Arc::new(BoundedSigningKey {
        key: material.key,
        signing: Arc::clone(signing),
    });
    let certified = CertifiedKey::new(material.chain, key);
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

/// The bound on the server key's handshake signatures: how many at once, how long each may
/// take, and the count of those not made.
pub(crate) struct HandshakeSigning {
    in_flight: Arc<AtomicUsize>,
    in_flight_max: usize,
    timeout: Duration,
    failures: Family<SignatureFailureLabels, Counter>,
}

/// Labels of `nfcpayd_tls_signatures_failed_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SignatureFailureLabels {
    reason: &'static str,
}

/// Why a handshake signature was not made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SignatureFailure {
    /// [`HandshakeSigning::in_flight_max`] signatures were already in progress.
    Busy,
    /// Not made within the deadline (it goes on, or hangs, without the handshake).
    TimedOut,
    /// The key refused (the keystore has logged why), or no thread could be started.
    Failed,
    /// The signer panicked (a bug).
    Panicked,
}

impl SignatureFailure {
    fn reason(self) -> &'static str {
        match self {
            Self::Busy => "busy",
            Self::TimedOut => "timed_out",
            Self::Failed => "failed",
            Self::Panicked => "panicked",
        }
    }
}

impl fmt::Debug for HandshakeSigning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandshakeSigning")
            .field("in_flight", &self.in_flight.load(Ordering::Relaxed))
            .field("in_flight_max", &self.in_flight_max)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl HandshakeSigning {
    pub(crate) fn new(in_flight_max: usize, timeout: Duration) -> Self {
        Self {
            in_flight: Arc::new(AtomicUsize::new(0)),
            in_flight_max,
            timeout,
            failures: Family::default(),
        }
    }

    /// `signer`'s signature of `message`, made on a thread of its own and waited for at most
    /// the deadline; a failure is counted, logged, and fails the handshake.
    fn sign(&self, signer: &Arc<dyn Signer>, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        self.sign_bounded(signer, message).map_err(|failure| {
            self.failures
                .get_or_create(&SignatureFailureLabels {
                    reason: failure.reason(),
                })
                .inc();
            tracing::warn!(
                reason = failure.reason(),
                timeout_ms = u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX),
                "the server key's TLS signature was not made; the handshake fails"
            );
            rustls::Error::General("the server key did not sign in time".into())
        })
    }

    fn sign_bounded(
        &self,
        signer: &Arc<dyn Signer>,
        message: &[u8],
    ) -> Result<Vec<u8>, SignatureFailure> {
        let place =
            InFlight::take(&self.in_flight, self.in_flight_max).ok_or(SignatureFailure::Busy)?;
        let (answer, answered) = mpsc::sync_channel(1);
        let signer = Arc::clone(signer);
        let message = message.to_vec();
        std::thread::Builder::new()
            .name("nfcpay-tls-sign".to_owned())
            .spawn(move || {
                let signature = signer.sign(&message);
                // The place is given back when the signature is done, however late (and
                // before the answer, so that a caller that has it finds the place free).
                drop(place);
                // The handshake may have stopped waiting: the signature is then dropped.
                let _ = answer.send(signature);
            })
            .map_err(|error| {
                tracing::error!(%error, "no thread for a TLS signature");
                SignatureFailure::Failed
            })?;
        let wait = || answered.recv_timeout(self.timeout);
        let answer = match tokio::runtime::Handle::try_current() {
            // Hands this worker's other tasks to another thread before blocking.
            Ok(runtime)
                if runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread =>
            {
                tokio::task::block_in_place(wait)
            }
            // `block_in_place` would panic on a current-thread runtime (tests): the wait is
            // still bounded.
            _ => wait(),
        };
        match answer {
            Ok(Ok(signature)) => Ok(signature),
            Ok(Err(_)) => Err(SignatureFailure::Failed),
            Err(RecvTimeoutError::Timeout) => Err(SignatureFailure::TimedOut),
            // The thread ended without an answer: the signer panicked.
            Err(RecvTimeoutError::Disconnected) => Err(SignatureFailure::Panicked),
        }
    }
}

/// One of [`HandshakeSigning`]'s places, given back when dropped.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn take(count: &Arc<AtomicUsize>, max: usize) -> Option<Self> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |now| {
                (now < max).then_some(now + 1)
            })
            .ok()
            .map(|_| Self(Arc::clone(count)))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The server key, its signatures made within [`HandshakeSigning`]'s bounds.
#[derive(Debug)]
struct BoundedSigningKey {
    key: Arc<dyn SigningKey>,
    signing: Arc<HandshakeSigning>,
}

impl SigningKey for BoundedSigningKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        let signer = self.key.choose_scheme(offered)?;
        Some(Box::new(BoundedSigner {
            signer: Arc::from(signer),
            signing: Arc::clone(&self.signing),
        }))
    }

    fn public_key(&self) -> Option<SubjectPublicKeyInfoDer<'_>> {
        self.key.public_key()
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        self.key.algorithm()
    }
}

#[derive(Debug)]
struct BoundedSigner {
    signer: Arc<dyn Signer>,
    signing: Arc<HandshakeSigning>,
}

impl Signer for BoundedSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        self.signing.sign(&self.signer, message)
    }

    fn scheme(&self) -> SignatureScheme {
        self.signer.scheme()
    }
}

#[cfg(test)]
mod tests {
    // A panic is how a test fails.
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::sync::Mutex;

    use super::*;

    /// Upper bound on a wait that only a broken test reaches.
    const PATIENCE: Duration = Duration::from_secs(20);

    /// A signer that answers `signature`, fails, panics, or first waits until released.
    #[derive(Debug)]
    enum FakeSigner {
        Signs,
        Fails,
        Panics,
        /// Signs once the sender is dropped or sends; says on `started` that it waits.
        Stalls {
            started: Mutex<mpsc::Sender<()>>,
            release: Mutex<mpsc::Receiver<()>>,
        },
    }

    impl Signer for FakeSigner {
        fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
            match self {
                Self::Signs => Ok(message.to_vec()),
                Self::Fails => Err(rustls::Error::General("refused".into())),
                Self::Panics => panic!("a bug in the signer"),
                Self::Stalls { started, release } => {
                    let _ = started.lock().unwrap().send(());
                    let _ = release.lock().unwrap().recv();
                    Ok(message.to_vec())
                }
            }
        }

        fn scheme(&self) -> SignatureScheme {
            SignatureScheme::ECDSA_NISTP256_SHA256
        }
    }

    /// A stalling signer, its release and the signal that it has started.
    fn stalling() -> (Arc<dyn Signer>, mpsc::Sender<()>, mpsc::Receiver<()>) {
        let (started, running) = mpsc::channel();
        let (release, released) = mpsc::channel();
        let signer = Arc::new(FakeSigner::Stalls {
            started: Mutex::new(started),
            release: Mutex::new(released),
        });
        (signer, release, running)
    }

    fn failures(signing: &HandshakeSigning, reason: &'static str) -> u64 {
        signing
            .failures
            .get_or_create(&SignatureFailureLabels { reason })
            .get()
    }

    #[test]
    fn a_signature_is_made_on_its_own_thread_and_returned() {
        let signing = HandshakeSigning::new(1, PATIENCE);
        let signer: Arc<dyn Signer> = Arc::new(FakeSigner::Signs);
        assert_eq!(signing.sign(&signer, b"hello").unwrap(), b"hello");
        // The place is given back: another one fits under a cap of 1.
        assert_eq!(signing.sign(&signer, b"again").unwrap(), b"again");
    }

    #[test]
    fn a_refused_or_panicking_signature_fails_and_is_counted() {
        let signing = HandshakeSigning::new(4, PATIENCE);
        let fails: Arc<dyn Signer> = Arc::new(FakeSigner::Fails);
        assert!(signing.sign(&fails, b"m").is_err());
        assert_eq!(failures(&signing, "failed"), 1);
        let panics: Arc<dyn Signer> = Arc::new(FakeSigner::Panics);
        assert!(signing.sign(&panics, b"m").is_err());
        assert_eq!(failures(&signing, "panicked"), 1);
    }

    /// A signature not made within the deadline fails the handshake; the place stays taken
    /// until the signer returns, so a second one beyond the cap is refused at once (`busy`).
    #[test]
    fn a_stalled_signature_times_out_and_holds_its_place_until_it_returns() {
        let signing = HandshakeSigning::new(1, Duration::from_millis(20));
        let (signer, release, running) = stalling();
        assert!(signing.sign(&signer, b"m").is_err());
        assert_eq!(failures(&signing, "timed_out"), 1);
        running.recv_timeout(PATIENCE).unwrap();
        let signs: Arc<dyn Signer> = Arc::new(FakeSigner::Signs);
        assert!(signing.sign(&signs, b"m").is_err());
        assert_eq!(failures(&signing, "busy"), 1);

        drop(release);
        let deadline = std::time::Instant::now() + PATIENCE;
        while signing.in_flight.load(Ordering::Acquire) > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the place never came back"
            );
            std::thread::yield_now();
        }
        assert_eq!(signing.sign(&signs, b"ok").unwrap(), b"ok");
    }

    /// On a multi-thread runtime with a single worker, a handshake waiting for a stalled
    /// signature does not stop the worker's other tasks from running.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_waiting_signature_leaves_the_runtime_serving() {
        let signing = Arc::new(HandshakeSigning::new(4, PATIENCE));
        let (signer, release, running) = stalling();
        let waiting = {
            let signing = Arc::clone(&signing);
            tokio::spawn(async move { signing.sign(&signer, b"late") })
        };
        tokio::task::spawn_blocking(move || running.recv_timeout(PATIENCE))
            .await
            .unwrap()
            .unwrap();
        let other = tokio::time::timeout(PATIENCE, tokio::spawn(async { 6 * 7 }))
            .await
            .expect("another task was starved while a signature was awaited");
        assert_eq!(other.unwrap(), 42);
        release.send(()).unwrap();
        assert_eq!(waiting.await.unwrap().unwrap(), b"late");
    }

    /// On a current-thread runtime (`block_in_place` would panic) the bounded wait is used as is.
    #[tokio::test]
    async fn a_current_thread_runtime_signs_without_block_in_place() {
        let signing = HandshakeSigning::new(1, PATIENCE);
        let signer: Arc<dyn Signer> = Arc::new(FakeSigner::Signs);
        assert_eq!(signing.sign(&signer, b"m").unwrap(), b"m");
    }
}
