//! The terminal's HTTPS client of the platform (docs/protocol.md §6): TLS 1.3 only, the
//! platform's certificate checked against the terminal CA it was given at enrollment, and the
//! terminal's client certificate whose private key signs inside the terminal's keystore.
//!
//! One client keeps one HTTP/1.1 connection alive and reconnects when it is gone. Refusals
//! come back as [`PlatformError::Refused`] with the problem's stable code.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use nfcpay_protocol::TxnId;
use nfcpay_protocol::api::{self, ENROLL_PATH};
use nfcpay_protocol::messages::HalfKind;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

/// Largest answer accepted from the platform, in bytes.
pub const ANSWER_BYTES_MAX: usize = 64 * 1024;
/// Time allowed to connect and complete the TLS handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for an answer beyond the `wait` the request asked for.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);

/// A refusal by the platform: an RFC 9457 problem document (`status` is the HTTP status the
/// answer came with; `code` is `"unknown"` when the document has none).
pub use nfcpay_protocol::api::ProblemDocument as Problem;

/// What went wrong underneath a [`PlatformError`] (rustls, hyper, the socket), kept as its
/// `source()`.
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

/// Why a call to the platform failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlatformError {
    /// The platform refused the request.
    #[error("platform refused ({}, {}): {}", .0.status, .0.code, .0.detail)]
    Refused(Problem),
    /// The certificates, the server name or the request are unusable.
    #[error("configuration: {what}")]
    Configuration {
        /// Which: `CA certificate`, `TLS`, `server name`, `request`.
        what: &'static str,
        /// Why.
        #[source]
        source: Cause,
    },
    /// Connecting, TLS or HTTP failed.
    #[error("connection to the platform ({step})")]
    Connection {
        /// The step that failed: `connect`, `TLS`, `HTTP`.
        step: &'static str,
        /// Why.
        #[source]
        source: Cause,
    },
    /// No answer in time.
    #[error("the platform did not answer in time")]
    Timeout,
    /// The answer is not what the protocol says.
    #[error("unexpected answer from the platform: {0}")]
    Answer(String),
}

/// The terminal's TLS identity: its certificate chain and its keystore-held key.
pub struct ClientIdentity {
    /// The terminal's certificate (then any intermediates).
    pub certificate_chain: Vec<CertificateDer<'static>>,
    /// Its private key, signing inside the keystore.
    pub key: Arc<dyn rustls::sign::SigningKey>,
}

/// Longest `Retry-After` honoured: a longer one is waited for only this long.
pub const RETRY_AFTER_MAX: Duration = Duration::from_secs(10);

/// Why a half got no receipt, with the platform's `Retry-After` when its refusal had one.
#[derive(Debug)]
pub struct HalfFailure {
    /// What went wrong.
    pub error: PlatformError,
    /// How long the platform asked to wait before the same bytes are sent again (at most
    /// [`RETRY_AFTER_MAX`]).
    pub retry_after: Option<Duration>,
}

/// The answer to a half.
#[derive(Debug, Clone)]
pub struct HalfReply {
    /// `true` when the payment is settled (HTTP 200), `false` when pending (202).
    pub settled: bool,
    /// The sealed receipt.
    pub receipt: Vec<u8>,
}

/// A client of one platform.
pub struct PlatformClient {
    address: String,
    server_name: ServerName<'static>,
    connector: tokio_rustls::TlsConnector,
    connection: Mutex<Option<SendRequest<Full<Bytes>>>>,
}

impl PlatformClient {
    /// A client of the platform at `address` (`host:port`), whose certificate must name
    /// `server_name` and chain to one of `ca_certificates`; with `identity`, it authenticates
    /// as the terminal (every route but enrollment needs it).
    pub fn new(
        address: &str,
        server_name: &str,
        ca_certificates: &[CertificateDer<'static>],
        identity: Option<ClientIdentity>,
    ) -> Result<Self, PlatformError> {
        let configuration = |what: &'static str| {
            move |error: Box<dyn std::error::Error + Send + Sync>| PlatformError::Configuration {
                what,
                source: error,
            }
        };
        let mut roots = rustls::RootCertStore::empty();
        for certificate in ca_certificates {
            roots
                .add(certificate.clone())
                .map_err(|error| configuration("CA certificate")(error.into()))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|error| configuration("TLS")(error.into()))?
            .with_root_certificates(roots);
        let config = match identity {
            Some(identity) => builder.with_client_cert_resolver(Arc::new(
                rustls::sign::SingleCertAndKey::from(Arc::new(rustls::sign::CertifiedKey::new(
                    identity.certificate_chain,
                    identity.key,
                ))),
            )),
            None => builder.with_no_client_auth(),
        };
        let server_name = ServerName::try_from(server_name.to_owned())
            .map_err(|error| configuration("server name")(error.into()))?;
        Ok(Self {
            address: address.to_owned(),
            server_name,
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            connection: Mutex::new(None),
        })
    }

    /// Submits a sealed half; with `wait`, asks the platform to hold a pending answer that
    /// long for the other half.
    pub async fn submit_half(
        &self,
        kind: HalfKind,
        envelope: Vec<u8>,
        wait: Duration,
    ) -> Result<HalfReply, PlatformError> {
        self.submit_half_once(kind, envelope, wait)
            .await
            .map_err(|failure| failure.error)
    }

    /// [`Self::submit_half`], keeping the `Retry-After` of a refusal (in seconds, at most
    /// [`RETRY_AFTER_MAX`]) for a caller that sends the same bytes again.
    pub async fn submit_half_once(
        &self,
        kind: HalfKind,
        envelope: Vec<u8>,
        wait: Duration,
    ) -> Result<HalfReply, HalfFailure> {
        let path = api::half_target(kind, wait.as_millis());
        let answer = self
            .exchange(Method::POST, &path, api::HALF_CONTENT_TYPE, envelope, wait)
            .await
            .map_err(|error| HalfFailure {
                error,
                retry_after: None,
            })?;
        if !answer.status.is_success() {
            return Err(HalfFailure {
                error: PlatformError::Refused(problem(answer.status, &answer.body)),
                retry_after: answer.retry_after,
            });
        }
        let (status, body) = (answer.status, answer.body);
        match status {
            StatusCode::OK => Ok(HalfReply {
                settled: true,
                receipt: body.to_vec(),
            }),
            StatusCode::ACCEPTED => Ok(HalfReply {
                settled: false,
                receipt: body.to_vec(),
            }),
            other => Err(HalfFailure {
                error: PlatformError::Answer(format!("status {other} for a half")),
                retry_after: None,
            }),
        }
    }

    /// The latest receipt of a payment this terminal is a party to.
    pub async fn transaction(&self, txn_id: TxnId) -> Result<Vec<u8>, PlatformError> {
        let path = api::transaction_path(txn_id);
        let (_, body) = self
            .call(
                Method::GET,
                &path,
                api::HALF_CONTENT_TYPE,
                Vec::new(),
                Duration::ZERO,
            )
            .await?;
        Ok(body.to_vec())
    }

    /// Enrollment: posts the JSON request, returns the JSON answer.
    pub async fn enroll(&self, request_json: Vec<u8>) -> Result<Vec<u8>, PlatformError> {
        let (_, body) = self
            .call(
                Method::POST,
                ENROLL_PATH,
                api::ENROLL_CONTENT_TYPE,
                request_json,
                Duration::ZERO,
            )
            .await?;
        Ok(body.to_vec())
    }

    /// One request on the kept connection (made anew if there is none or it broke). A 2xx
    /// answer is returned; anything else becomes [`PlatformError::Refused`].
    async fn call(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
        wait: Duration,
    ) -> Result<(StatusCode, Bytes), PlatformError> {
        let answer = self
            .exchange(method, path, content_type, body, wait)
            .await?;
        if answer.status.is_success() {
            Ok((answer.status, answer.body))
        } else {
            Err(PlatformError::Refused(problem(answer.status, &answer.body)))
        }
    }

    /// One request on the kept connection (made anew if there is none or it broke), and its
    /// answer whatever its status.
    async fn exchange(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
        wait: Duration,
    ) -> Result<Answer, PlatformError> {
        let mut connection = self.connection.lock().await;
        let sender = match connection.take() {
            Some(sender) if !sender.is_closed() => sender,
            _ => self.connect().await?,
        };
        let mut sender = sender;
        sender.ready().await.map_err(connection_failed("HTTP"))?;
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, self.address.as_str())
            .header(header::CONTENT_TYPE, content_type)
            .body(Full::new(Bytes::from(body)))
            .map_err(|error| PlatformError::Configuration {
                what: "request",
                source: error.into(),
            })?;
        let answer = tokio::time::timeout(wait + ANSWER_TIMEOUT, async {
            let response = sender
                .send_request(request)
                .await
                .map_err(connection_failed("HTTP"))?;
            let status = response.status();
            let retry_after = response
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|value| retry_after(value.as_bytes()));
            let body = Limited::new(response.into_body(), ANSWER_BYTES_MAX)
                .collect()
                .await
                .map_err(|error| PlatformError::Answer(error.to_string()))?
                .to_bytes();
            Ok::<_, PlatformError>(Answer {
                status,
                retry_after,
                body,
            })
        })
        .await
        .map_err(|_| PlatformError::Timeout)??;
        *connection = Some(sender);
        Ok(answer)
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, PlatformError> {
        let connect = async {
            let tcp = tcp_connect(&self.address)
                .await
                .map_err(connection_failed("connect"))?;
            let tls = self
                .connector
                .connect(self.server_name.clone(), tcp)
                .await
                .map_err(connection_failed("TLS"))?;
            let (sender, driver) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(connection_failed("HTTP"))?;
            tokio::spawn(async move {
                if let Err(error) = driver.await {
                    tracing::debug!(%error, "platform connection closed");
                }
            });
            Ok(sender)
        };
        tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| PlatformError::Timeout)?
    }
}

/// Makes a [`PlatformError::Connection`] of an error at `step`.
fn connection_failed<E>(step: &'static str) -> impl FnOnce(E) -> PlatformError
where
    E: std::error::Error + Send + Sync + 'static,
{
    move |error| PlatformError::Connection {
        step,
        source: Box::new(error),
    }
}

/// An answer of the platform, whatever its status.
struct Answer {
    status: StatusCode,
    /// Its `Retry-After`, when it has one in seconds.
    retry_after: Option<Duration>,
    body: Bytes,
}

/// Reads a `Retry-After` in delay-seconds (RFC 9110 §10.2.3), capped at [`RETRY_AFTER_MAX`].
/// The HTTP-date form (the platform never sends it) and anything malformed give `None`: the
/// caller's own backoff applies.
fn retry_after(value: &[u8]) -> Option<Duration> {
    let text = std::str::from_utf8(value).ok()?.trim();
    if text.is_empty() || text.len() > 10 || !text.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    let seconds: u64 = text.parse().ok()?;
    Some(Duration::from_secs(seconds).min(RETRY_AFTER_MAX))
}

/// Reads a problem document; a body that is not one still gives the status.
fn problem(status: StatusCode, body: &[u8]) -> Problem {
    let mut document: Problem = serde_json::from_slice(body).unwrap_or_default();
    document.status = status.as_u16();
    if document.code.is_empty() {
        "unknown".clone_into(&mut document.code);
    }
    document
}

/// A TCP connection to the platform with `TCP_NODELAY` set (protocol.md §6.2): a request's
/// head and body, written apart, would otherwise wait on Nagle's algorithm and the server's
/// delayed ACK.
async fn tcp_connect(address: &str) -> std::io::Result<TcpStream> {
    let tcp = TcpStream::connect(address).await?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

#[cfg(test)]
mod tests {
    use nfcpay_protocol::api::ProblemCode;

    use super::*;

    #[tokio::test]
    async fn connections_to_the_platform_set_tcp_nodelay() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let tcp = tcp_connect(&address).await.unwrap();
        assert!(tcp.nodelay().unwrap());
        // A fresh socket does not have it: the check above is not vacuous.
        let plain = TcpStream::connect(&address).await.unwrap();
        assert!(!plain.nodelay().unwrap());
    }

    /// Causes are kept as sources and printed once, by the one chain printer.
    #[tokio::test]
    async fn a_failure_keeps_its_cause_as_its_source() {
        let Err(error) = PlatformClient::new("127.0.0.1:1", "not a name!", &[], None) else {
            panic!("a bad server name was accepted");
        };
        assert!(
            matches!(
                error,
                PlatformError::Configuration {
                    what: "server name",
                    ..
                }
            ),
            "{error:?}"
        );
        assert!(std::error::Error::source(&error).is_some());

        // Nothing listens on port 1: the connection fails, the socket's error underneath.
        let client = PlatformClient::new("127.0.0.1:1", "localhost", &[], None).unwrap();
        let error = client
            .submit_half_once(HalfKind::A, vec![0], Duration::ZERO)
            .await
            .unwrap_err()
            .error;
        let PlatformError::Connection { step, source } = &error else {
            panic!("{error:?}");
        };
        assert_eq!(*step, "connect");
        let shown = nfcpay_protocol::ErrorChain(&error).to_string();
        assert!(
            shown.starts_with("connection to the platform (connect): "),
            "{shown}"
        );
        assert_eq!(shown.matches(&source.to_string()).count(), 1, "{shown}");
    }

    #[test]
    fn a_problem_document_is_read_with_the_answer_status() {
        let sent = Problem::new(ProblemCode::Conflict, "another half stands");
        let body = serde_json::to_vec(&sent).unwrap();
        let read = problem(StatusCode::CONFLICT, &body);
        assert_eq!(read, sent);
        assert_eq!(read.known_code(), Some(ProblemCode::Conflict));
    }

    #[test]
    fn retry_after_is_read_in_seconds_and_capped() {
        assert_eq!(retry_after(b"1"), Some(Duration::from_secs(1)));
        assert_eq!(retry_after(b" 3 "), Some(Duration::from_secs(3)));
        assert_eq!(retry_after(b"0"), Some(Duration::ZERO));
        assert_eq!(retry_after(b"86400"), Some(RETRY_AFTER_MAX));
        assert_eq!(retry_after(b"99999999999999999999"), None);
        for malformed in [
            &b""[..],
            b"-1",
            b"1.5",
            b"soon",
            b"Wed, 21 Oct 2015 07:28:00 GMT",
            b"\xff",
        ] {
            assert_eq!(retry_after(malformed), None, "{malformed:?}");
        }
    }

    #[test]
    fn a_body_that_is_no_problem_document_still_gives_the_status() {
        let read = problem(StatusCode::BAD_GATEWAY, b"<html>bad gateway</html>");
        assert_eq!(
            (read.status, read.code.as_str(), read.detail.as_str()),
            (502, "unknown", "")
        );
    }
}
