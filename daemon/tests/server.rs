//! The network front end over real sockets and real mutual TLS: a fake [`Api`] stands in for
//! the platform service, and throwaway CAs and certificates are made with rcgen for each test.
//! Every listener (terminal, enrollment, operations) binds `127.0.0.1:0`. Sleeps appear only where a test plays a slow client or
//! a slow service on purpose.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use nfcpay_daemon::pki::ClientTerminal;
use nfcpay_daemon::server::{
    Api, HalfAnswer, HalfKind, Metrics, NotReady, Problem, ProblemCode, Server, ServerConfig,
    ServerError, TlsMaterial, TlsReloader, signals, tls::crypto_provider,
};
use nfcpay_protocol::TxnId;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::client::ResolvesClientCert;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::sign::{CertifiedKey, Signer, SigningKey};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// Upper bound on any wait in these tests; reached only when something is broken.
const PATIENCE: Duration = Duration::from_secs(20);
/// The transaction the fake does not know.
const UNKNOWN_TXN: &str = "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF";

// ---------------------------------------------------------------------------------------------
// Certificates

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    certificate: CertificateDer<'static>,
}

impl Ca {
    fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let certificate = params.self_signed(&key).unwrap().der().clone();
        Self {
            issuer: Issuer::new(params, key),
            certificate,
        }
    }

    /// A leaf for `common_name`, for a server (with `localhost` as its name) or a client.
    fn leaf(
        &self,
        common_name: &str,
        server: bool,
    ) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        self.leaf_named(DnValue::Utf8String(common_name.to_owned()), server)
    }

    /// A leaf whose subject's common name is `common_name`, encoded as given.
    fn leaf_named(
        &self,
        common_name: DnValue,
        server: bool,
    ) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate().unwrap();
        let names = if server {
            vec!["localhost".to_owned()]
        } else {
            Vec::new()
        };
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        let certificate = params.signed_by(&key, &self.issuer).unwrap().der().clone();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        (certificate, key)
    }

    /// Server TLS material: a fresh server certificate under this CA, whose key is a rustls
    /// `SigningKey` (as the HSM-backed one will be), and this CA as the terminal CA.
    fn server_material(&self, common_name: &str) -> TlsMaterial {
        let (certificate, key) = self.leaf(common_name, true);
        TlsMaterial {
            chain: vec![certificate, self.certificate.clone()],
            key: rustls::crypto::ring::sign::any_ecdsa_type(&key).unwrap(),
            client_ca: vec![self.certificate.clone()],
        }
    }
}

/// A client's TLS settings: which CA it trusts for the server, and its certificate if any.
#[derive(Clone)]
struct Client {
    config: Arc<rustls::ClientConfig>,
}

impl Client {
    fn builder(
        ca: &Ca,
    ) -> rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.certificate.clone()).unwrap();
        rustls::ClientConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
    }

    fn anonymous(server_ca: &Ca) -> Self {
        Self::with_config(Self::builder(server_ca).with_no_client_auth())
    }

    /// A terminal whose certificate `issuer` signed for `terminal`.
    fn terminal(server_ca: &Ca, issuer: &Ca, terminal: &str) -> Self {
        Self::terminal_named(server_ca, issuer, DnValue::Utf8String(terminal.to_owned()))
    }

    /// A client whose certificate `issuer` signed with the subject common name `name`.
    fn terminal_named(server_ca: &Ca, issuer: &Ca, name: DnValue) -> Self {
        let (certificate, key) = issuer.leaf_named(name, false);
        let chain = vec![certificate, issuer.certificate.clone()];
        Self::with_config(
            Self::builder(server_ca)
                .with_client_auth_cert(chain, key)
                .unwrap(),
        )
    }

    /// A terminal whose certificate `issuer` signed for `terminal`, offered through a resolver
    /// that records whether a server asked for it (rustls consults the resolver only when
    /// the server sends a CertificateRequest).
    fn terminal_recording(
        server_ca: &Ca,
        issuer: &Ca,
        terminal: &str,
    ) -> (Self, Arc<AskedForCertificate>) {
        let (certificate, key) = issuer.leaf(terminal, false);
        let key = rustls::crypto::ring::sign::any_ecdsa_type(&key).unwrap();
        let resolver = Arc::new(AskedForCertificate {
            asked: AtomicBool::new(false),
            certified: Arc::new(CertifiedKey::new(
                vec![certificate, issuer.certificate.clone()],
                key,
            )),
        });
        let config = Self::builder(server_ca).with_client_cert_resolver(resolver.clone());
        (Self::with_config(config), resolver)
    }

    fn with_config(mut config: rustls::ClientConfig) -> Self {
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Self {
            config: Arc::new(config),
        }
    }

    async fn tls(&self, address: SocketAddr) -> std::io::Result<TlsStream<TcpStream>> {
        self.tls_from(None, address).await
    }

    /// A TLS connection from `source` (any loopback address on Linux), or from the default
    /// address with `None`.
    async fn tls_from(
        &self,
        source: Option<IpAddr>,
        address: SocketAddr,
    ) -> std::io::Result<TlsStream<TcpStream>> {
        let tcp = match source {
            Some(source) => connect_from(source, address).await?,
            None => TcpStream::connect(address).await?,
        };
        let name = ServerName::try_from("localhost").unwrap();
        TlsConnector::from(Arc::clone(&self.config))
            .connect(name, tcp)
            .await
    }

    /// An HTTP/1.1 connection; the task drives it and ends when the connection closes.
    async fn http(
        &self,
        address: SocketAddr,
    ) -> std::io::Result<(SendRequest<Full<Bytes>>, JoinHandle<()>)> {
        let tls = self.tls(address).await?;
        http_over(tls).await
    }
}

/// A TCP connection to `address` from `source`.
async fn connect_from(source: IpAddr, address: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(address).await
}

/// Offers one client certificate, and remembers whether a server asked for one.
#[derive(Debug)]
struct AskedForCertificate {
    asked: AtomicBool,
    certified: Arc<CertifiedKey>,
}

impl AskedForCertificate {
    fn asked(&self) -> bool {
        self.asked.load(Ordering::SeqCst)
    }
}

impl ResolvesClientCert for AskedForCertificate {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.asked.store(true, Ordering::SeqCst);
        Some(Arc::clone(&self.certified))
    }

    fn has_certs(&self) -> bool {
        true
    }
}

async fn http_over<S>(stream: S) -> std::io::Result<(SendRequest<Full<Bytes>>, JoinHandle<()>)>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(std::io::Error::other)?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok((sender, driver))
}

/// One answer, collected.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    headers: http::HeaderMap,
    body: Bytes,
}

impl Answer {
    fn content_type(&self) -> &str {
        self.headers
            .get(http::header::CONTENT_TYPE)
            .map_or("", |value| value.to_str().unwrap())
    }

    /// Checks that this is a problem document with `code` and its status.
    fn assert_problem(&self, code: ProblemCode) {
        assert_eq!(self.content_type(), "application/problem+json", "{self:?}");
        let document: serde_json::Value = serde_json::from_slice(&self.body).unwrap();
        assert_eq!(document["code"], code.as_str(), "{document}");
        assert_eq!(
            document["type"],
            format!("https://nfcpay.dev/problems/{code}"),
            "{document}"
        );
        assert_eq!(document["status"], code.status(), "{document}");
        assert_eq!(self.status, code.status(), "{document}");
        assert!(document["title"].as_str().is_some_and(|t| !t.is_empty()));
    }

    fn text(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap()
    }
}

/// Sends a request as a terminal would: a half as `application/octet-stream`, an enrollment
/// as `application/json`.
async fn send(
    sender: &mut SendRequest<Full<Bytes>>,
    method: Method,
    path: &str,
    body: impl Into<Bytes>,
) -> hyper::Result<Answer> {
    let content_type = if path.starts_with("/v1/halves/") {
        Some("application/octet-stream")
    } else if path.starts_with("/v1/enroll") {
        Some("application/json")
    } else {
        None
    };
    send_as(sender, method, path, content_type, body).await
}

/// Sends a request with this `Content-Type` (none for `None`).
async fn send_as(
    sender: &mut SendRequest<Full<Bytes>>,
    method: Method,
    path: &str,
    content_type: Option<&str>,
    body: impl Into<Bytes>,
) -> hyper::Result<Answer> {
    sender.ready().await?;
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, "localhost");
    if let Some(content_type) = content_type {
        request = request.header(http::header::CONTENT_TYPE, content_type);
    }
    let request = request.body(Full::new(body.into())).unwrap();
    let response = sender.send_request(request).await?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

// ---------------------------------------------------------------------------------------------
// The fake service

/// Answers as documented in each method; counts calls so tests can see what got through.
#[derive(Default)]
struct FakeApi {
    half_calls: AtomicUsize,
    enroll_calls: AtomicUsize,
    not_ready: AtomicBool,
    /// Notified when a half with body `slow` has arrived at the service.
    slow_entered: Notify,
    slow_duration: Mutex<Duration>,
}

impl FakeApi {
    fn half_calls(&self) -> usize {
        self.half_calls.load(Ordering::SeqCst)
    }

    fn enroll_calls(&self) -> usize {
        self.enroll_calls.load(Ordering::SeqCst)
    }
}

impl Api for FakeApi {
    /// `settle` settles (200); `slow` waits `slow_duration` first; everything else is pending
    /// (202). The receipt echoes what the front end passed on.
    async fn submit_half(
        &self,
        kind: HalfKind,
        client: ClientTerminal,
        body: Bytes,
        wait: Duration,
    ) -> Result<HalfAnswer, Problem> {
        self.half_calls.fetch_add(1, Ordering::SeqCst);
        if body.as_ref() == b"slow" {
            self.slow_entered.notify_one();
            let duration = *self.slow_duration.lock().unwrap();
            tokio::time::sleep(duration).await;
        }
        if body.as_ref() == b"garbage" {
            return Err(Problem::new(
                ProblemCode::Malformed,
                "envelope does not decode",
            ));
        }
        let receipt = format!(
            "{kind:?}|{}|{}|{}",
            client.terminal_id,
            wait.as_millis(),
            String::from_utf8_lossy(&body)
        );
        Ok(HalfAnswer {
            settled: body.as_ref() == b"settle",
            receipt: Bytes::from(receipt),
        })
    }

    async fn transaction(&self, client: ClientTerminal, txn_id: TxnId) -> Result<Bytes, Problem> {
        if txn_id.to_string() == UNKNOWN_TXN {
            return Err(Problem::new(
                ProblemCode::UnknownTransaction,
                "no such payment",
            ));
        }
        Ok(Bytes::from(format!(
            "receipt|{}|{txn_id}",
            client.terminal_id
        )))
    }

    async fn enroll(&self, body: Bytes) -> Result<Bytes, Problem> {
        self.enroll_calls.fetch_add(1, Ordering::SeqCst);
        let request: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|_| Problem::new(ProblemCode::Malformed, "not JSON"))?;
        Ok(Bytes::from(
            serde_json::json!({"terminal_id": request["code"]}).to_string(),
        ))
    }

    async fn ready(&self) -> Result<(), NotReady> {
        if self.not_ready.load(Ordering::SeqCst) {
            return Err(NotReady {
                component: "hsm",
                reason: "session lost".to_owned(),
            });
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// A running front end

struct Running {
    /// The terminal listener.
    address: SocketAddr,
    /// The enrollment listener.
    enroll_address: SocketAddr,
    ops_address: SocketAddr,
    api: Arc<FakeApi>,
    ca: Ca,
    tls: Arc<TlsReloader>,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<()>,
}

/// Where the reload callback takes its next material from.
type NextMaterial = Arc<Mutex<Option<TlsMaterial>>>;

impl Running {
    async fn start(adjust: impl FnOnce(&mut ServerConfig)) -> Self {
        Self::start_with_reload(adjust, Arc::default()).await
    }

    async fn start_with_reload(
        adjust: impl FnOnce(&mut ServerConfig),
        next_material: NextMaterial,
    ) -> Self {
        Self::start_with_key(adjust, next_material, |key| key).await
    }

    /// Starts with the server key `wrap` makes of the first material's key.
    async fn start_with_key(
        adjust: impl FnOnce(&mut ServerConfig),
        next_material: NextMaterial,
        wrap: impl FnOnce(Arc<dyn SigningKey>) -> Arc<dyn SigningKey>,
    ) -> Self {
        let ca = Ca::new("platform terminal CA");
        let mut config = ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            enroll_listen: "127.0.0.1:0".parse().unwrap(),
            ops_listen: "127.0.0.1:0".parse().unwrap(),
            ..ServerConfig::default()
        };
        adjust(&mut config);
        let reload = Arc::new(move || {
            next_material
                .lock()
                .unwrap()
                .take()
                .ok_or_else(|| ServerError::Material("no new material".into()))
        });
        let mut material = ca.server_material("server-1");
        material.key = wrap(material.key);
        let tls = Arc::new(TlsReloader::new(material, reload).unwrap());
        let api = Arc::new(FakeApi::default());
        let server =
            Server::new(config, Arc::clone(&api), Arc::clone(&tls), Metrics::new()).unwrap();
        let listeners = server.bind().await.unwrap();
        let address = listeners.terminals.local_addr().unwrap();
        let enroll_address = listeners.enrollment.local_addr().unwrap();
        let ops_address = listeners.operations.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(server.run(listeners, async move {
            let _ = stopped.await;
        }));
        Self {
            address,
            enroll_address,
            ops_address,
            api,
            ca,
            tls,
            stop: Some(stop),
            server,
        }
    }

    fn terminal(&self, terminal: &str) -> Client {
        Client::terminal(&self.ca, &self.ca, terminal)
    }

    /// A client without a certificate that trusts the server: a terminal about to enroll.
    fn enrollee(&self) -> Client {
        Client::anonymous(&self.ca)
    }

    /// An HTTP connection of `terminal` to the terminal listener.
    async fn http_as_terminal(&self, terminal: &str) -> (SendRequest<Full<Bytes>>, JoinHandle<()>) {
        self.terminal(terminal).http(self.address).await.unwrap()
    }

    /// A TLS connection of `terminal` to the terminal listener, for writing raw HTTP.
    async fn tls_as_terminal(&self, terminal: &str) -> TlsStream<TcpStream> {
        self.terminal(terminal).tls(self.address).await.unwrap()
    }

    /// An HTTP connection of an enrollee to the enrollment listener.
    async fn http_as_enrollee(&self) -> (SendRequest<Full<Bytes>>, JoinHandle<()>) {
        self.enrollee().http(self.enroll_address).await.unwrap()
    }

    /// A TLS connection of an enrollee to the enrollment listener, for writing raw HTTP.
    async fn tls_as_enrollee(&self) -> TlsStream<TcpStream> {
        self.enrollee().tls(self.enroll_address).await.unwrap()
    }

    /// How many handshakes the front end counts as failed so far.
    async fn handshake_failures(&self) -> u64 {
        let metrics = self.ops_get("/metrics").await;
        metrics
            .text()
            .lines()
            .find_map(|line| line.strip_prefix("nfcpayd_tls_handshake_failures_total "))
            .map_or(0, |value| value.trim().parse().unwrap())
    }

    /// Asserts that `/metrics` holds `line` (a metric with its labels and value).
    async fn assert_metric(&self, line: &str) {
        let metrics = self.ops_get("/metrics").await;
        assert!(metrics.text().contains(line), "{line}\n{}", metrics.text());
    }

    /// Whether `/metrics` holds `line` now; for [`eventually`].
    async fn metrics_contain(&self, line: &str) -> bool {
        self.ops_get("/metrics").await.text().contains(line)
    }

    /// An HTTP connection to the operations listener, which speaks plain HTTP.
    async fn http_to_operations(&self) -> (SendRequest<Full<Bytes>>, JoinHandle<()>) {
        let tcp = TcpStream::connect(self.ops_address).await.unwrap();
        http_over(tcp).await.unwrap()
    }

    async fn ops_get(&self, path: &str) -> Answer {
        let (mut sender, _driver) = self.http_to_operations().await;
        send(&mut sender, Method::GET, path, Bytes::new())
            .await
            .unwrap()
    }

    /// Asks for shutdown and waits for `run` to return.
    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(PATIENCE, &mut self.server)
            .await
            .expect("run returns after shutdown")
            .unwrap();
    }
}

/// Retries `check` every few milliseconds until it holds; for effects that happen after the
/// client has its answer (a counter bumped after a failed handshake, a signal handled).
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends `body` to `path` once as each of `content_types`, each on a connection of its own:
/// each is refused `415` before the body is read, and the connection closes.
async fn assert_media_types_refused(
    client: &Client,
    address: SocketAddr,
    path: &str,
    content_types: impl IntoIterator<Item = Option<&str>>,
    body: &'static str,
) {
    for content_type in content_types {
        let answer = post_once_as(client, address, path, content_type, body).await;
        answer.assert_problem(ProblemCode::UnsupportedMediaType);
        assert_eq!(answer.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert_eq!(
            answer.headers.get(http::header::CONNECTION).unwrap(),
            "close",
            "{content_type:?}"
        );
    }
}

/// Posts `body` to `path` with this `Content-Type` on a connection of its own.
async fn post_once_as(
    client: &Client,
    address: SocketAddr,
    path: &str,
    content_type: Option<&str>,
    body: &'static str,
) -> Answer {
    let (mut sender, _driver) = client.http(address).await.unwrap();
    send_as(&mut sender, Method::POST, path, content_type, body)
        .await
        .unwrap()
}

/// Returns once the server's header allowance (`header_read_timeout_ms`) has run out, on the
/// server's own clock, for every connection that was idle before the call: the server closes
/// a witness connection whose head, started now, never completes.
async fn outlast_the_header_allowance(running: &Running) {
    let mut witness = running.tls_as_terminal("witness").await;
    assert_eq!(
        raw_exchange(&mut witness, b"GET /v1/transactions/").await,
        ""
    );
}

/// A kept-alive connection of `client` that has had one half (`body`) accepted.
async fn open_with_a_half(
    client: &Client,
    address: SocketAddr,
    body: &'static str,
) -> (SendRequest<Full<Bytes>>, JoinHandle<()>) {
    let (mut sender, driver) = client.http(address).await.unwrap();
    send_accepted_half(&mut sender, body).await;
    (sender, driver)
}

/// Sends half A with `body`, which the fake takes as pending: asserts `202 Accepted`.
async fn send_accepted_half(
    sender: &mut SendRequest<Full<Bytes>>,
    body: impl Into<Bytes>,
) -> Answer {
    let answer = send(sender, Method::POST, "/v1/halves/a", body)
        .await
        .unwrap();
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{answer:?}");
    answer
}

/// Sends a half that the fake service holds for `duration` before it answers, and returns
/// once the service has it: the request is in flight.
async fn a_slow_half_in_flight(
    running: &Running,
    duration: Duration,
) -> JoinHandle<hyper::Result<Answer>> {
    *running.api.slow_duration.lock().unwrap() = duration;
    let (mut sender, _driver) = running.http_as_terminal("shop-1").await;
    let in_flight =
        tokio::spawn(async move { send(&mut sender, Method::POST, "/v1/halves/a", "slow").await });
    running.api.slow_entered.notified().await;
    in_flight
}

/// Connects with `client`, sends one request and returns the status of the answer, if any;
/// `None` when the handshake or the first exchange fails without an HTTP answer. In TLS 1.3
/// the client finishes its side before the server has checked the client's certificate, so
/// a refusal of it shows on the first exchange.
async fn answer_status(
    client: &Client,
    address: SocketAddr,
    method: Method,
    path: &str,
) -> Option<StatusCode> {
    let (mut sender, _driver) = client.http(address).await.ok()?;
    send(&mut sender, method, path, "half")
        .await
        .ok()
        .map(|answer| answer.status)
}

/// Writes `bytes` on a TLS connection and reads until the server closes it.
async fn raw_exchange(stream: &mut TlsStream<TcpStream>, bytes: &[u8]) -> String {
    stream.write_all(bytes).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut answer))
        .await
        .expect("the server closes the connection");
    String::from_utf8_lossy(&answer).into_owned()
}

// ---------------------------------------------------------------------------------------------
// Routes

#[tokio::test]
async fn a_terminal_reaches_each_route_and_gets_the_services_answers() {
    let running = Running::start(|_| {}).await;
    let (mut sender, _driver) = running.http_as_terminal("shop-1").await;

    let pending = send_accepted_half(&mut sender, "request").await;
    assert_eq!(pending.content_type(), "application/octet-stream");
    assert_eq!(pending.text(), "A|shop-1|0|request");

    let settled = send(
        &mut sender,
        Method::POST,
        "/v1/halves/b?wait_ms=250",
        "settle",
    )
    .await
    .unwrap();
    assert_eq!(settled.status, StatusCode::OK);
    assert_eq!(settled.content_type(), "application/octet-stream");
    assert_eq!(settled.text(), "B|shop-1|250|settle");
    // Receipts are never cached on the way (protocol.md §6.2).
    for receipt in [&pending, &settled] {
        assert_eq!(
            receipt.headers.get(http::header::CACHE_CONTROL).unwrap(),
            "no-store"
        );
    }

    // A wait above the maximum is capped, not refused.
    let capped = send(&mut sender, Method::POST, "/v1/halves/b?wait_ms=60000", "x")
        .await
        .unwrap();
    assert_eq!(capped.text(), "B|shop-1|10000|x");

    let txn = "00112233445566778899AABBCCDDEEFF";
    let status = send(
        &mut sender,
        Method::GET,
        &format!("/v1/transactions/{}", txn.to_lowercase()),
        Bytes::new(),
    )
    .await
    .unwrap();
    assert_eq!(status.status, StatusCode::OK);
    assert_eq!(status.content_type(), "application/octet-stream");
    assert_eq!(status.text(), format!("receipt|shop-1|{txn}"));
    assert_eq!(
        status.headers.get(http::header::CACHE_CONTROL).unwrap(),
        "no-store"
    );

    // The service's problems go out as problem+json with their status.
    let unknown = send(
        &mut sender,
        Method::GET,
        &format!("/v1/transactions/{UNKNOWN_TXN}"),
        Bytes::new(),
    )
    .await
    .unwrap();
    unknown.assert_problem(ProblemCode::UnknownTransaction);
    let garbage = send(&mut sender, Method::POST, "/v1/halves/a", "garbage")
        .await
        .unwrap();
    garbage.assert_problem(ProblemCode::Malformed);

    // Enrollment is not a route of the terminal listener.
    let enrolled = send(&mut sender, Method::POST, "/v1/enroll", r#"{"code":"c1"}"#)
        .await
        .unwrap();
    enrolled.assert_problem(ProblemCode::NotFound);
    assert_eq!(running.api.enroll_calls(), 0);
    running.stop().await;
}

#[tokio::test]
async fn without_a_client_certificate_the_terminal_listener_fails_the_handshake() {
    let running = Running::start(|_| {}).await;
    let anonymous = running.enrollee();
    for (method, path) in [
        (Method::POST, "/v1/halves/a"),
        (Method::POST, "/v1/halves/b"),
        (
            Method::GET,
            "/v1/transactions/00112233445566778899AABBCCDDEEFF",
        ),
        (Method::POST, "/v1/enroll"),
    ] {
        let status = answer_status(&anonymous, running.address, method, path).await;
        assert_eq!(status, None, "{path}: an HTTP answer without a certificate");
    }
    assert_eq!(running.api.half_calls(), 0);
    assert_eq!(running.api.enroll_calls(), 0);
    eventually("the four failed handshakes are counted", || async {
        running.handshake_failures().await == 4
    })
    .await;
    running.stop().await;
}

#[tokio::test]
async fn the_enrollment_listener_serves_enrollment_without_a_certificate_and_nothing_else() {
    let running = Running::start(|_| {}).await;
    let (mut sender, driver) = running.http_as_enrollee().await;
    let enrolled = send(&mut sender, Method::POST, "/v1/enroll", r#"{"code":"c2"}"#)
        .await
        .unwrap();
    assert_eq!(enrolled.status, StatusCode::OK);
    assert_eq!(enrolled.content_type(), "application/json");
    assert_eq!(enrolled.text(), r#"{"terminal_id":"c2"}"#);
    assert_eq!(running.api.enroll_calls(), 1);
    // An enrollment connection is not kept alive: the server closes it after the answer.
    tokio::time::timeout(PATIENCE, driver)
        .await
        .expect("enrollment connection closed")
        .unwrap();

    // The terminal routes do not exist here, with or without a certificate.
    let (enrollee, terminal) = (running.enrollee(), running.terminal("shop-1"));
    for client in [&enrollee, &terminal] {
        for (method, path) in [
            (Method::POST, "/v1/halves/a"),
            (Method::POST, "/v1/halves/b"),
            (
                Method::GET,
                "/v1/transactions/00112233445566778899AABBCCDDEEFF",
            ),
            (Method::GET, "/v1/transactions/nothex"),
            (Method::GET, "/"),
        ] {
            let (mut sender, _driver) = client.http(running.enroll_address).await.unwrap();
            let answer = send(&mut sender, method, path, "half").await.unwrap();
            answer.assert_problem(ProblemCode::NotFound);
        }
    }
    assert_eq!(running.api.half_calls(), 0);

    let (mut sender, _driver) = running.http_as_enrollee().await;
    let wrong_method = send(&mut sender, Method::GET, "/v1/enroll", Bytes::new())
        .await
        .unwrap();
    wrong_method.assert_problem(ProblemCode::MethodNotAllowed);
    assert_eq!(wrong_method.headers[http::header::ALLOW], "POST");
    let (mut sender, _driver) = running.http_as_enrollee().await;
    let query = send(&mut sender, Method::POST, "/v1/enroll?wait_ms=1", "{}")
        .await
        .unwrap();
    query.assert_problem(ProblemCode::Malformed);
    assert_eq!(running.api.enroll_calls(), 1);
    running.stop().await;
}

#[tokio::test]
async fn only_the_terminal_listener_asks_for_a_client_certificate() {
    let running = Running::start(|_| {}).await;

    let (client, resolver) = Client::terminal_recording(&running.ca, &running.ca, "shop-1");
    let (mut sender, _driver) = client.http(running.enroll_address).await.unwrap();
    let enrolled = send(&mut sender, Method::POST, "/v1/enroll", r#"{"code":"c3"}"#)
        .await
        .unwrap();
    assert_eq!(enrolled.status, StatusCode::OK);
    assert!(
        !resolver.asked(),
        "the enrollment listener asked for a client certificate"
    );

    // The control: the same client is asked on the terminal listener, and served.
    let (mut sender, _driver) = client.http(running.address).await.unwrap();
    let answer = send_accepted_half(&mut sender, "half").await;
    assert_eq!(answer.text(), "A|shop-1|0|half");
    assert!(resolver.asked());
    running.stop().await;
}

#[tokio::test]
async fn a_certificate_from_another_ca_fails_the_handshake() {
    let running = Running::start(|_| {}).await;
    let stranger = Ca::new("someone else's CA");
    let (client, resolver) = Client::terminal_recording(&running.ca, &stranger, "shop-1");
    let status = answer_status(&client, running.address, Method::POST, "/v1/halves/a").await;
    assert_eq!(status, None, "an HTTP answer to another CA's certificate");
    assert!(resolver.asked());
    assert_eq!(running.api.half_calls(), 0);
    eventually("the failed handshake is counted", || async {
        running.handshake_failures().await == 1
    })
    .await;

    // The enrollment listener does not ask for a certificate, so this one is never sent
    // there, and is neither refused nor trusted: the client is served as any enrollee.
    let (client, resolver) = Client::terminal_recording(&running.ca, &stranger, "shop-1");
    let status = answer_status(&client, running.enroll_address, Method::POST, "/v1/enroll").await;
    assert_eq!(
        status,
        Some(StatusCode::BAD_REQUEST),
        "the fake's `not JSON`"
    );
    assert!(!resolver.asked());
    running.stop().await;
}

/// A TLS 1.2 ClientHello (no `supported_versions` extension) offering ECDHE-ECDSA and
/// ECDHE-RSA AES-GCM suites, as an old client would send.
fn tls12_client_hello() -> Vec<u8> {
    let mut hello = vec![0x03, 0x03];
    hello.extend([0x5A; 32]);
    hello.push(0);
    let suites: [u8; 8] = [0xC0, 0x2B, 0xC0, 0x2F, 0xC0, 0x2C, 0xC0, 0x30];
    hello.extend(u16::try_from(suites.len()).unwrap().to_be_bytes());
    hello.extend(suites);
    hello.extend([1, 0]);
    let mut extensions = Vec::new();
    for (kind, data) in [
        (0x000A_u16, &[0x00, 0x04, 0x00, 0x1D, 0x00, 0x17][..]),
        (0x000B, &[0x01, 0x00][..]),
        (0x000D, &[0x00, 0x04, 0x04, 0x03, 0x08, 0x04][..]),
    ] {
        extensions.extend(kind.to_be_bytes());
        extensions.extend(u16::try_from(data.len()).unwrap().to_be_bytes());
        extensions.extend(data);
    }
    hello.extend(u16::try_from(extensions.len()).unwrap().to_be_bytes());
    hello.extend(extensions);
    let mut handshake = vec![0x01];
    handshake.extend(&u32::try_from(hello.len()).unwrap().to_be_bytes()[1..]);
    handshake.extend(hello);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend(u16::try_from(handshake.len()).unwrap().to_be_bytes());
    record.extend(handshake);
    record
}

#[tokio::test]
async fn a_tls_1_2_client_is_refused_on_both_listeners() {
    let running = Running::start(|_| {}).await;
    for address in [running.address, running.enroll_address] {
        let mut tcp = TcpStream::connect(address).await.unwrap();
        tcp.write_all(&tls12_client_hello()).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(PATIENCE, tcp.read_to_end(&mut answer))
            .await
            .expect("the server closes the connection")
            .unwrap();
        // A fatal alert record (21) saying protocol_version (70), and never a ServerHello (22).
        assert_eq!(answer.first(), Some(&21), "{address}: {answer:02X?}");
        assert_eq!(
            answer.get(5..7),
            Some(&[2, 70][..]),
            "{address}: {answer:02X?}"
        );
    }

    assert_eq!(running.api.half_calls(), 0);
    assert_eq!(running.api.enroll_calls(), 0);
    running.stop().await;
}

#[tokio::test]
async fn a_silent_client_is_dropped_after_the_handshake_timeout() {
    let running = Running::start(|config| config.tls_handshake_timeout_ms = 200).await;
    for address in [running.address, running.enroll_address] {
        let mut tcp = TcpStream::connect(address).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(PATIENCE, tcp.read_to_end(&mut answer))
            .await
            .expect("the server closes a connection that never says hello")
            .unwrap();
        assert!(answer.is_empty(), "{address}");
    }
    running.stop().await;
}

/// A half must say it is `application/octet-stream`: anything else, or nothing, is `415` before
/// the body is read (so the connection closes), and the service never sees it.
#[tokio::test]
async fn a_half_of_another_media_type_is_refused_with_415() {
    let running = Running::start(|_| {}).await;
    let client = running.terminal("shop-1");
    assert_media_types_refused(
        &client,
        running.address,
        "/v1/halves/a",
        [
            None,
            Some("text/plain"),
            Some("application/json"),
            Some("application/octet-streams"),
        ],
        "half",
    )
    .await;
    assert_eq!(running.api.half_calls(), 0);
    // Parameters and letter case do not matter.
    let answer = post_once_as(
        &client,
        running.address,
        "/v1/halves/a",
        Some("Application/Octet-Stream; x=1"),
        "half",
    )
    .await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{answer:?}");
    assert_eq!(running.api.half_calls(), 1);
    running
        .assert_metric(r#"nfcpayd_refusals_total{route="half_a",code="unsupported-media-type"} 4"#)
        .await;
    running.stop().await;
}

/// An enrollment must say it is `application/json`: anything else, or nothing, is `415`
/// before the body is read, and the service never sees it.
#[tokio::test]
async fn an_enrollment_of_another_media_type_is_refused_with_415() {
    let running = Running::start(|_| {}).await;
    let enrollee = running.enrollee();
    assert_media_types_refused(
        &enrollee,
        running.enroll_address,
        "/v1/enroll",
        [
            None,
            Some("text/plain"),
            Some("application/octet-stream"),
            Some("application/jsonp"),
        ],
        r#"{"code":"c9"}"#,
    )
    .await;
    assert_eq!(running.api.enroll_calls(), 0);
    // Parameters and letter case do not matter.
    let answer = post_once_as(
        &enrollee,
        running.enroll_address,
        "/v1/enroll",
        Some("Application/JSON; charset=utf-8"),
        r#"{"code":"c9"}"#,
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
    assert_eq!(running.api.enroll_calls(), 1);
    running
        .assert_metric(r#"nfcpayd_refusals_total{route="enroll",code="unsupported-media-type"} 4"#)
        .await;
    running.stop().await;
}

/// A certificate from the terminal CA whose subject is not strictly a terminal ID — not a
/// valid ID, or a valid one in a string type other than UTF8String or PrintableString — gets
/// no HTTP answer: the connection closes after the handshake, and the service never sees it.
#[tokio::test]
async fn a_certificate_that_names_no_terminal_strictly_gets_no_answer() {
    let running = Running::start(|_| {}).await;
    for name in [
        DnValue::Utf8String("shop 1".to_owned()),
        DnValue::Utf8String(String::new()),
        DnValue::Ia5String("shop-1".try_into().unwrap()),
    ] {
        let client = Client::terminal_named(&running.ca, &running.ca, name.clone());
        for (method, path) in [
            (Method::POST, "/v1/halves/a"),
            (
                Method::GET,
                "/v1/transactions/00112233445566778899AABBCCDDEEFF",
            ),
        ] {
            let status = answer_status(&client, running.address, method, path).await;
            assert_eq!(status, None, "{name:?} {path}: answered");
        }
    }
    assert_eq!(running.api.half_calls(), 0);
    // The control: the same name as a PrintableString is served.
    let control = Client::terminal_named(
        &running.ca,
        &running.ca,
        DnValue::PrintableString("shop-1".try_into().unwrap()),
    );
    let status = answer_status(&control, running.address, Method::POST, "/v1/halves/a").await;
    assert_eq!(status, Some(StatusCode::ACCEPTED));
    running.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Limits

#[tokio::test]
async fn a_body_over_the_limit_is_refused_before_the_service_sees_it() {
    let running = Running::start(|_| {}).await;

    // Exactly at the limit is fine.
    let (mut sender, _driver) = running.http_as_terminal("shop-1").await;
    send_accepted_half(&mut sender, vec![b'x'; 4096]).await;
    assert_eq!(running.api.half_calls(), 1);

    // Declared over the limit: refused on the Content-Length alone.
    let (mut sender, _driver) = running.http_as_terminal("shop-1").await;
    let answer = send(&mut sender, Method::POST, "/v1/halves/a", vec![b'x'; 4097])
        .await
        .unwrap();
    answer.assert_problem(ProblemCode::BodyTooLarge);

    // Chunked, so the length is only known while reading: refused once the cap is passed.
    let mut stream = running.tls_as_terminal("shop-1").await;
    let chunk = "x".repeat(3000);
    let request = format!(
        "POST /v1/halves/b HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/octet-stream\r\n\
         Transfer-Encoding: chunked\r\n\r\n\
         BB8\r\n{chunk}\r\nBB8\r\n{chunk}\r\n0\r\n\r\n"
    );
    let answer = raw_exchange(&mut stream, request.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
    assert!(answer.contains("\"code\":\"body-too-large\""), "{answer}");

    assert_eq!(running.api.half_calls(), 1);
    running.stop().await;
}

#[tokio::test]
async fn a_slow_body_gets_408_timeout() {
    let running = Running::start(|config| config.body_read_timeout_ms = 300).await;
    let mut stream = running.tls_as_terminal("shop-1").await;
    // The head says 100 bytes; 10 come, then nothing.
    let request = "POST /v1/halves/a HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: 100\r\n\r\n0123456789";
    let answer = raw_exchange(&mut stream, request.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    assert!(answer.contains("\"code\":\"timeout\""), "{answer}");
    assert!(
        answer.to_lowercase().contains("connection: close"),
        "{answer}"
    );
    assert_eq!(running.api.half_calls(), 0);
    running.stop().await;
}

#[tokio::test]
async fn a_slow_request_head_is_closed_without_an_answer() {
    let running = Running::start(|config| config.header_read_timeout_ms = 300).await;
    let mut stream = running.tls_as_terminal("shop-1").await;
    let answer = raw_exchange(&mut stream, b"POST /v1/halves/a HTTP/1.1\r\nHost: loc").await;
    assert_eq!(answer, "");
    assert_eq!(running.api.half_calls(), 0);
    running
        .assert_metric(r#"nfcpayd_connection_timeouts_total{phase="header"} 1"#)
        .await;
    running.stop().await;
}

#[tokio::test]
async fn a_slow_head_on_a_kept_alive_connection_is_closed() {
    // The idle allowance is far longer than this test's patience, the head allowance short:
    // the head's own timeout must apply from its first byte, not the idle one.
    let running = Running::start(|config| {
        config.header_read_timeout_ms = 300;
        config.keep_alive_idle_timeout_ms = 120_000;
    })
    .await;
    let mut stream = running.tls_as_terminal("shop-1").await;
    let txn = "00112233445566778899AABBCCDDEEFF";
    let request = format!("GET /v1/transactions/{txn} HTTP/1.1\r\nHost: localhost\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let expected = format!("receipt|shop-1|{txn}");
    let mut first = Vec::new();
    while !String::from_utf8_lossy(&first).ends_with(&expected) {
        let mut buffer = [0u8; 1024];
        let read = tokio::time::timeout(PATIENCE, stream.read(&mut buffer))
            .await
            .expect("the first answer arrives")
            .unwrap();
        assert_ne!(read, 0, "closed before the first answer");
        first.extend_from_slice(&buffer[..read]);
    }
    // Kept alive. The client idles past the first request's head allowance (so the server's
    // connection task is waiting on the long idle allowance), then sends a head that never
    // completes.
    outlast_the_header_allowance(&running).await;
    let rest = raw_exchange(&mut stream, b"GET /v1/transactions/").await;
    assert_eq!(rest, "");
    running.stop().await;
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed() {
    let running = Running::start(|config| config.keep_alive_idle_timeout_ms = 300).await;
    let (mut sender, driver) = running.http_as_terminal("shop-1").await;
    send_accepted_half(&mut sender, "half").await;
    // Kept alive after the answer, then closed by the server once idle too long.
    tokio::time::timeout(PATIENCE, driver)
        .await
        .expect("idle connection closed")
        .unwrap();
    running.stop().await;
}

/// Design: the daemon takes a connection permit before `accept`, so a client beyond the cap
/// waits in the listen backlog (no TLS handshake) until an open connection closes.
#[tokio::test]
async fn a_connection_over_the_cap_waits_until_one_closes() {
    let running = Running::start(|config| config.connections_max = 1).await;
    let client = running.terminal("shop-1");
    let (mut first, first_driver) = client.http(running.address).await.unwrap();
    send_accepted_half(&mut first, "one").await;

    let address = running.address;
    let second_client = client.clone();
    let mut second = tokio::spawn(async move {
        let (mut sender, _driver) = second_client.http(address).await.unwrap();
        send(&mut sender, Method::POST, "/v1/halves/a", "two")
            .await
            .unwrap()
    });
    // Deliberately waiting to show that nothing happens while the first connection is open.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut second)
            .await
            .is_err(),
        "the second connection was served while the first held the only permit"
    );
    assert_eq!(running.api.half_calls(), 1);

    drop(first);
    first_driver.abort();
    let answer = tokio::time::timeout(PATIENCE, second)
        .await
        .expect("served once the first closed")
        .unwrap();
    assert_eq!(answer.status, StatusCode::ACCEPTED);
    assert_eq!(answer.text(), "A|shop-1|0|two");
    running.stop().await;
}

/// Each HTTPS listener has its own cap: idle TCP connections filling the enrollment cap make
/// further enrollees wait, while terminals are served on their own listener as before; and a
/// terminal holding the only terminal permit does not keep an enrollee waiting.
#[tokio::test]
async fn an_idle_flood_on_the_enrollment_listener_leaves_terminals_their_capacity() {
    let running = Running::start(|config| {
        config.connections_max = 1;
        config.enrollment_connections_max = 2;
    })
    .await;
    // Two idle TCP connections, never a byte sent, hold both enrollment permits (the flood);
    // more would wait in the backlog.
    let mut flood = Vec::new();
    for _ in 0..4 {
        flood.push(TcpStream::connect(running.enroll_address).await.unwrap());
    }
    let (enrollee, enroll_address) = (running.enrollee(), running.enroll_address);
    let mut enrollment = tokio::spawn(async move {
        let (mut sender, _driver) = enrollee.http(enroll_address).await.unwrap();
        send(&mut sender, Method::POST, "/v1/enroll", r#"{"code":"c6"}"#)
            .await
            .unwrap()
    });

    // A terminal pays as usual on its own listener, which the flood does not touch.
    let (mut terminal, terminal_driver) = running.http_as_terminal("shop-1").await;
    for body in ["one", "two", "three"] {
        let answer = tokio::time::timeout(
            PATIENCE,
            send(&mut terminal, Method::POST, "/v1/halves/a", body),
        )
        .await
        .expect("a terminal is served during an enrollment flood")
        .unwrap();
        assert_eq!(answer.status, StatusCode::ACCEPTED);
    }
    // Deliberately waiting to show that the enrollment cap holds while the flood does.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut enrollment)
            .await
            .is_err(),
        "an enrollee was served while idle connections held every enrollment permit"
    );
    assert_eq!(running.api.enroll_calls(), 0);

    // The flood gone, the enrollee is served, while the terminal still holds its only permit.
    drop(flood);
    let answer = tokio::time::timeout(PATIENCE, enrollment)
        .await
        .expect("served once the flood closed")
        .unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(running.api.enroll_calls(), 1);
    drop(terminal);
    terminal_driver.abort();
    running.stop().await;
}

/// One address (an IPv4 address, an IPv6 /64) gets at most its share of a listener: a
/// connection beyond it is closed at once, before any TLS work, while another address is
/// served.
#[tokio::test]
async fn an_address_over_its_share_is_closed_at_once_and_others_are_served() {
    let running = Running::start(|config| {
        config.enrollment_connections_max = 16;
        config.enrollment_connections_per_address_max = 2;
    })
    .await;
    let crowd: IpAddr = "127.0.0.3".parse().unwrap();
    // Two idle connections from one address hold its share.
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(connect_from(crowd, running.enroll_address).await.unwrap());
    }
    // Its third is closed without a byte.
    let mut third = connect_from(crowd, running.enroll_address).await.unwrap();
    let mut buffer = [0u8; 16];
    let read = tokio::time::timeout(PATIENCE, third.read(&mut buffer))
        .await
        .expect("the connection over the share is closed at once");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    // Another address enrolls as usual.
    let tls = running
        .enrollee()
        .tls_from(Some("127.0.0.4".parse().unwrap()), running.enroll_address)
        .await
        .unwrap();
    let (mut sender, _driver) = http_over(tls).await.unwrap();
    let answer = send(&mut sender, Method::POST, "/v1/enroll", r#"{"code":"c7"}"#)
        .await
        .unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    running
        .assert_metric(r#"nfcpayd_connections_refused_per_address_total{listener="enrollment"} 1"#)
        .await;
    // The share comes back when a held connection closes.
    drop(held.pop());
    eventually("the address gets its share back", || async {
        let mut again = connect_from(crowd, running.enroll_address).await.unwrap();
        let mut buffer = [0u8; 1];
        // Served: the server waits for a TLS ClientHello instead of closing.
        tokio::time::timeout(Duration::from_millis(200), again.read(&mut buffer))
            .await
            .is_err()
    })
    .await;
    running.stop().await;
}

/// When fewer than an eighth of a listener's slots are free, connections idle between
/// requests get the header timeout instead of the keep-alive one, so that idle terminals
/// cannot keep the listener full.
#[tokio::test]
async fn idle_connections_get_the_short_timeout_when_the_listener_is_crowded() {
    let running = Running::start(|config| {
        config.connections_max = 8;
        config.header_read_timeout_ms = 300;
        config.keep_alive_idle_timeout_ms = 60_000;
    })
    .await;
    let client = running.terminal("shop-1");
    let mut open = Vec::new();
    for body in ["1", "2", "3", "4", "5", "6"] {
        open.push(open_with_a_half(&client, running.address, body).await);
    }
    // Seven of eight slots in use (the seventh by the witness), one free: not crowded, so an
    // idle connection outlives the header timeout.
    outlast_the_header_allowance(&running).await;
    let (first, _) = &mut open[0];
    send_accepted_half(first, "again").await;
    // The witness's slot, once the server has freed it, to the seventh connection.
    eventually("the witness's slot is free", || async {
        running
            .metrics_contain("nfcpayd_open_connections 6\n")
            .await
    })
    .await;
    open.push(open_with_a_half(&client, running.address, "7").await);

    // The eighth connection crowds the listener: an idle one (idle longer than the header
    // timeout) is closed, which leaves a free slot again; so does the ninth.
    let mut newcomers = Vec::new();
    for (round, body) in [(1, "8"), (2, "9")] {
        let (mut sender, driver) = client.http(running.address).await.unwrap();
        send_accepted_half(&mut sender, body).await;
        newcomers.push((sender, driver));
        let closed =
            format!(r#"nfcpayd_connection_timeouts_total{{phase="idle_crowded"}} {round}"#);
        eventually("an idle connection is closed for the newcomer", || async {
            running.metrics_contain(&closed).await
        })
        .await;
        eventually("seven connections are open again", || async {
            running
                .metrics_contain("nfcpayd_open_connections 7\n")
                .await
        })
        .await;
    }
    // Exactly the two: the others keep their keep-alive time.
    let finished = open
        .iter()
        .filter(|(_, driver)| driver.is_finished())
        .count();
    assert_eq!(finished, 2);
    running.stop().await;
}

#[tokio::test]
async fn a_terminal_over_its_rate_gets_429_rate_limited() {
    let running = Running::start(|config| {
        config.terminal_requests_per_second = 1;
        config.terminal_request_burst = 3;
    })
    .await;
    let (mut sender, _driver) = running.http_as_terminal("shop-1").await;
    for _ in 0..3 {
        send_accepted_half(&mut sender, "half").await;
    }
    let limited = send(&mut sender, Method::POST, "/v1/halves/a", "half")
        .await
        .unwrap();
    limited.assert_problem(ProblemCode::RateLimited);
    let retry_after: u64 = limited.headers[http::header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    assert_eq!(running.api.half_calls(), 3);

    // Another terminal has its own bucket.
    let (mut other, _driver) = running.http_as_terminal("shop-2").await;
    send_accepted_half(&mut other, "half").await;

    running
        .assert_metric("nfcpayd_rate_limited_requests_total 1")
        .await;
    running
        .assert_metric(r#"nfcpayd_http_requests_total{route="half_a",status="429"} 1"#)
        .await;
    running.stop().await;
}

#[tokio::test]
async fn enrollment_is_rate_limited_per_address_and_its_body_capped() {
    let running = Running::start(|config| {
        config.enrollment_requests_per_second = 1;
        config.enrollment_request_burst = 2;
    })
    .await;
    let enrollee = running.enrollee();
    let enroll = |body: Vec<u8>| {
        let enrollee = enrollee.clone();
        let address = running.enroll_address;
        async move {
            let (mut sender, _driver) = enrollee.http(address).await.unwrap();
            send(&mut sender, Method::POST, "/v1/enroll", body)
                .await
                .unwrap()
        }
    };
    // Over the cap: refused on its declared length, before the service sees it.
    let too_large = enroll(vec![b'x'; 4097]).await;
    too_large.assert_problem(ProblemCode::BodyTooLarge);
    assert_eq!(running.api.enroll_calls(), 0);

    let enrolled = enroll(br#"{"code":"c4"}"#.to_vec()).await;
    assert_eq!(enrolled.status, StatusCode::OK);
    // The burst of two is spent (the refused body counted too).
    let limited = enroll(br#"{"code":"c5"}"#.to_vec()).await;
    limited.assert_problem(ProblemCode::RateLimited);
    assert!(limited.headers.contains_key(http::header::RETRY_AFTER));
    assert_eq!(running.api.enroll_calls(), 1);

    // A slow enrollment body gets 408 like any other.
    running.stop().await;
    let running = Running::start(|config| config.body_read_timeout_ms = 300).await;
    let mut stream = running.tls_as_enrollee().await;
    let request = "POST /v1/enroll HTTP/1.1\r\nHost: localhost\r\n\
                   Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{";
    let answer = raw_exchange(&mut stream, request.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    assert_eq!(running.api.enroll_calls(), 0);
    running.stop().await;
}

#[tokio::test]
async fn malformed_paths_methods_and_queries_get_problems() {
    let running = Running::start(|_| {}).await;
    let (mut sender, _driver) = running.http_as_terminal("shop-1").await;
    for (method, path, code) in [
        (Method::GET, "/", ProblemCode::NotFound),
        (Method::POST, "/v1/halves/c", ProblemCode::NotFound),
        (Method::POST, "/v2/halves/a", ProblemCode::NotFound),
        (
            Method::GET,
            "/v1/transactions/nothex",
            ProblemCode::Malformed,
        ),
        (Method::GET, "/v1/transactions/0011", ProblemCode::Malformed),
        (
            Method::POST,
            "/v1/halves/a?wait_ms=soon",
            ProblemCode::Malformed,
        ),
        (
            Method::POST,
            "/v1/halves/a?wait_ms=1&wait_ms=2",
            ProblemCode::Malformed,
        ),
        (Method::POST, "/v1/halves/a?debug=1", ProblemCode::Malformed),
        (Method::POST, "/v1/enroll", ProblemCode::NotFound),
        (Method::GET, "/v1/halves/a", ProblemCode::MethodNotAllowed),
        (
            Method::DELETE,
            "/v1/transactions/00112233445566778899AABBCCDDEEFF",
            ProblemCode::MethodNotAllowed,
        ),
    ] {
        let answer = send(&mut sender, method.clone(), path, Bytes::new())
            .await
            .unwrap();
        answer.assert_problem(code);
        if code == ProblemCode::MethodNotAllowed {
            let allow = if method == Method::GET { "POST" } else { "GET" };
            assert_eq!(answer.headers[http::header::ALLOW], allow);
        }
    }
    assert_eq!(running.api.half_calls(), 0);

    // A request line hyper cannot parse gets 400 and a closed connection.
    let mut stream = running.tls_as_terminal("shop-1").await;
    let answer = raw_exchange(
        &mut stream,
        b"POST /v1/halves/a HTTP/1.1\r\nHost localhost\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    running.stop().await;
}

/// Every answer after which the server closes the connection says `Connection: close`: one
/// given before the request's body was read (the rest of it may still be on its way), and every
/// answer on the enrollment listener. An answer on a connection that stays open does not.
#[tokio::test]
async fn an_answer_before_which_the_connection_closes_says_connection_close() {
    let running = Running::start(|_| {}).await;
    let (mut sender, _driver) = running.http_as_terminal("shop-1").await;
    // Refused without a body, or answered after reading it: kept alive, nothing said.
    for (path, body, status) in [
        (
            "/v1/halves/a?wait_ms=soon",
            Bytes::new(),
            StatusCode::BAD_REQUEST,
        ),
        ("/v1/halves/a", Bytes::from("request"), StatusCode::ACCEPTED),
        (
            "/v1/halves/b",
            Bytes::from("garbage"),
            StatusCode::BAD_REQUEST,
        ),
    ] {
        let answer = send(&mut sender, Method::POST, path, body).await.unwrap();
        assert_eq!(answer.status, status, "{path}");
        assert!(
            answer.headers.get(http::header::CONNECTION).is_none(),
            "{path}: {:?}",
            answer.headers
        );
    }

    // Refused before the body was read: the server says so, then closes.
    for request in [
        "POST /v1/halves/a?wait_ms=soon HTTP/1.1\r\nHost: localhost\r\nContent-Length: 4\r\n\r\nhalf",
        "POST /v1/halves/c HTTP/1.1\r\nHost: localhost\r\nContent-Length: 4\r\n\r\nhalf",
        "PUT /v1/halves/a HTTP/1.1\r\nHost: localhost\r\nContent-Length: 4\r\n\r\nhalf",
        "GET /v1/transactions/00112233445566778899AABBCCDDEEFF HTTP/1.1\r\nHost: localhost\r\n\
         Transfer-Encoding: chunked\r\n\r\n4\r\nhalf\r\n0\r\n\r\n",
    ] {
        let mut stream = running.tls_as_terminal("shop-1").await;
        let answer = raw_exchange(&mut stream, request.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 "), "{request}: {answer}");
        assert!(
            answer
                .to_ascii_lowercase()
                .contains("\r\nconnection: close\r\n"),
            "{request}: {answer}"
        );
    }

    // The enrollment listener keeps nothing alive, and says so.
    let (mut sender, _driver) = running.http_as_enrollee().await;
    let enrolled = send(&mut sender, Method::POST, "/v1/enroll", r#"{"code":"c7"}"#)
        .await
        .unwrap();
    assert_eq!(enrolled.status, StatusCode::OK);
    assert_eq!(enrolled.headers[http::header::CONNECTION], "close");
    assert_eq!(running.api.half_calls(), 2);
    running.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Operations listener

#[tokio::test]
async fn health_readiness_and_metrics_on_the_operations_listener() {
    let running = Running::start(|_| {}).await;
    let health = running.ops_get("/healthz").await;
    assert_eq!(health.status, StatusCode::OK);

    let ready = running.ops_get("/readyz").await;
    assert_eq!(ready.status, StatusCode::OK);
    running.api.not_ready.store(true, Ordering::SeqCst);
    let not_ready = running.ops_get("/readyz").await;
    assert_eq!(not_ready.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        not_ready.text().contains("hsm: session lost"),
        "{}",
        not_ready.text()
    );

    let (mut sender, _driver) = running.http_as_terminal("shop-1").await;
    send(&mut sender, Method::POST, "/v1/halves/a", "half")
        .await
        .unwrap();
    send(&mut sender, Method::POST, "/v1/halves/b", "settle")
        .await
        .unwrap();
    send(&mut sender, Method::GET, "/nowhere", Bytes::new())
        .await
        .unwrap();
    let metrics = running.ops_get("/metrics").await;
    assert_eq!(metrics.status, StatusCode::OK);
    assert!(
        metrics
            .content_type()
            .starts_with("application/openmetrics-text")
    );
    let text = metrics.text();
    for line in [
        r#"nfcpayd_http_requests_total{route="half_a",status="202"} 1"#,
        r#"nfcpayd_http_requests_total{route="half_b",status="200"} 1"#,
        r#"nfcpayd_http_requests_total{route="other",status="404"} 1"#,
        r#"nfcpayd_http_request_duration_seconds_count{route="half_a"} 1"#,
        "nfcpayd_open_connections 1",
    ] {
        assert!(text.contains(line), "{line} missing from\n{text}");
    }

    let (mut ops, _driver) = running.http_to_operations().await;
    let wrong_method = send(&mut ops, Method::POST, "/metrics", Bytes::new())
        .await
        .unwrap();
    wrong_method.assert_problem(ProblemCode::MethodNotAllowed);
    let missing = send(&mut ops, Method::GET, "/debug", Bytes::new())
        .await
        .unwrap();
    missing.assert_problem(ProblemCode::NotFound);
    running.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The server key's signature

/// Makes every signature of a [`StallingKey`] wait while it is set: a stalled HSM.
#[derive(Debug, Default)]
struct Stall {
    stalled: Mutex<bool>,
    changed: Condvar,
    /// Signatures that have started waiting.
    waiting: AtomicUsize,
}

impl Stall {
    fn set(&self, stalled: bool) {
        *self.stalled.lock().unwrap() = stalled;
        self.changed.notify_all();
    }

    fn wait(&self) {
        let mut stalled = self.stalled.lock().unwrap();
        if *stalled {
            self.waiting.fetch_add(1, Ordering::SeqCst);
        }
        while *stalled {
            stalled = self.changed.wait(stalled).unwrap();
        }
    }
}

/// A server key whose signatures wait while its [`Stall`] is set.
#[derive(Debug)]
struct StallingKey {
    key: Arc<dyn SigningKey>,
    stall: Arc<Stall>,
}

impl SigningKey for StallingKey {
    fn choose_scheme(&self, offered: &[rustls::SignatureScheme]) -> Option<Box<dyn Signer>> {
        let signer = self.key.choose_scheme(offered)?;
        Some(Box::new(StallingSigner {
            signer,
            stall: Arc::clone(&self.stall),
        }))
    }

    fn algorithm(&self) -> rustls::SignatureAlgorithm {
        self.key.algorithm()
    }
}

#[derive(Debug)]
struct StallingSigner {
    signer: Box<dyn Signer>,
    stall: Arc<Stall>,
}

impl Signer for StallingSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        self.stall.wait();
        self.signer.sign(message)
    }

    fn scheme(&self) -> rustls::SignatureScheme {
        self.signer.scheme()
    }
}

/// While the server key's signatures stall (an HSM that does not answer), more handshakes
/// than the runtime has worker threads wait for it, each at most `TLS_SIGNATURE_TIMEOUT`, and
/// then fail, counted as `timed_out`; meanwhile a connection already open is served, and so is
/// the operations listener. Once the key signs again, so do handshakes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_server_key_fails_handshakes_at_its_deadline_and_the_rest_is_served() {
    const HANDSHAKES: usize = 4;
    let stall = Arc::new(Stall::default());
    let running = {
        let stall = Arc::clone(&stall);
        Running::start_with_key(
            |_| {},
            Arc::default(),
            move |key| Arc::new(StallingKey { key, stall }),
        )
        .await
    };
    let (mut open, _driver) = running.http_as_terminal("shop-1").await;
    stall.set(true);
    let started = std::time::Instant::now();
    let handshakes: Vec<_> = (0..HANDSHAKES)
        .map(|_| {
            let client = running.terminal("shop-2");
            let address = running.address;
            tokio::spawn(async move { client.tls(address).await.map(drop) })
        })
        .collect();
    eventually("every handshake waits for the key", || async {
        stall.waiting.load(Ordering::SeqCst) >= HANDSHAKES
    })
    .await;
    let answer = send(
        &mut open,
        Method::GET,
        "/v1/transactions/0123456789ABCDEF0123456789ABCDEF",
        Bytes::new(),
    )
    .await
    .unwrap();
    assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
    assert_eq!(running.ops_get("/healthz").await.status, StatusCode::OK);
    for handshake in handshakes {
        let result = tokio::time::timeout(PATIENCE, handshake)
            .await
            .expect("a handshake waited past the signature's deadline")
            .unwrap();
        assert!(result.is_err(), "a handshake completed with a stalled key");
    }
    println!(
        "{HANDSHAKES} handshakes with a stalled server key failed; the last after {} ms \
         (deadline {} ms); the open connection was served meanwhile",
        started.elapsed().as_millis(),
        nfcpay_daemon::server::tls::TLS_SIGNATURE_TIMEOUT.as_millis()
    );
    let counted =
        format!(r#"nfcpayd_tls_signatures_failed_total{{reason="timed_out"}} {HANDSHAKES}"#);
    eventually("the failures are counted", || {
        running.metrics_contain(&counted)
    })
    .await;

    stall.set(false);
    let (mut again, _driver) = running.http_as_terminal("shop-2").await;
    let answer = send(&mut again, Method::POST, "/v1/halves/a", "half")
        .await
        .unwrap();
    assert_eq!(answer.status, StatusCode::ACCEPTED);
    running.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Shutdown and reload

#[tokio::test]
async fn shutdown_drains_an_in_flight_request_then_run_returns() {
    let running = Running::start(|_| {}).await;
    let in_flight = a_slow_half_in_flight(&running, Duration::from_millis(500)).await;

    let (address, enroll_address) = (running.address, running.enroll_address);
    let anonymous = running.enrollee();
    running.stop().await;

    // The request in flight when shutdown began got its answer.
    let answer = in_flight.await.unwrap().unwrap();
    assert_eq!(answer.status, StatusCode::ACCEPTED);
    assert_eq!(answer.text(), "A|shop-1|0|slow");
    // And nobody is listening any more.
    assert!(TcpStream::connect(address).await.is_err());
    assert!(anonymous.http(enroll_address).await.is_err());
}

/// What docs/operations.md §6 promises a probe at shutdown: its idle keep-alive connection to
/// the operations listener is closed (not answered `503`), and a new one is refused.
#[tokio::test]
async fn shutdown_closes_an_idle_operations_connection_and_stops_listening() {
    let running = Running::start(|_| {}).await;
    let ops_address = running.ops_address;
    let mut probe = TcpStream::connect(ops_address).await.unwrap();
    probe
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: nfcpayd\r\n\r\n")
        .await
        .unwrap();
    // The whole answer: its head, then as many bytes as it says its body has.
    let mut answer = Vec::new();
    let complete = |answer: &[u8]| {
        let text = String::from_utf8_lossy(answer);
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            return false;
        };
        let length = head
            .lines()
            .find_map(|line| {
                line.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|n| n.trim().parse::<usize>().unwrap())
            })
            .unwrap_or(0);
        body.len() >= length
    };
    while !complete(&answer) {
        let mut chunk = [0; 1024];
        let read = tokio::time::timeout(PATIENCE, probe.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        assert_ne!(read, 0, "{}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&chunk[..read]);
    }
    let head = String::from_utf8_lossy(&answer).into_owned();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        !head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );

    running.stop().await;

    // The kept-alive connection ends without another byte: no 503 arrives unasked.
    let mut rest = Vec::new();
    tokio::time::timeout(PATIENCE, probe.read_to_end(&mut rest))
        .await
        .expect("the idle probe connection is closed at shutdown")
        .unwrap();
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    assert!(TcpStream::connect(ops_address).await.is_err());
}

#[tokio::test]
async fn shutdown_gives_up_on_requests_past_the_drain_deadline() {
    let running = Running::start(|config| config.drain_timeout_ms = 200).await;
    let in_flight = a_slow_half_in_flight(&running, Duration::from_secs(3600)).await;
    running.stop().await;
    // The connection was closed without an answer.
    assert!(in_flight.await.unwrap().is_err());
}

fn leaf_of(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

/// Puts fresh server material (a certificate for `common_name` under `ca`) where the next
/// reload takes it from; returns its leaf certificate.
fn stage_material(
    next_material: &NextMaterial,
    ca: &Ca,
    common_name: &str,
) -> CertificateDer<'static> {
    let material = ca.server_material(common_name);
    let new_leaf = material.chain[0].clone();
    *next_material.lock().unwrap() = Some(material);
    new_leaf
}

#[tokio::test]
async fn reload_swaps_the_server_certificate_for_new_connections() {
    let next_material = NextMaterial::default();
    let running = Running::start_with_reload(|_| {}, Arc::clone(&next_material)).await;
    let before = running.tls_as_terminal("shop-1").await;
    let old_leaf = leaf_of(&before);
    let (mut old_connection, _driver) = http_over(before).await.unwrap();

    // A failed reload keeps the current certificate.
    assert!(running.tls.reload().is_err());
    assert_eq!(leaf_of(&running.tls_as_terminal("shop-1").await), old_leaf);

    let new_leaf = stage_material(&next_material, &running.ca, "server-2");
    running.tls.reload().unwrap();

    let after = running.tls_as_terminal("shop-1").await;
    assert_eq!(leaf_of(&after), new_leaf);
    assert_ne!(new_leaf, old_leaf);
    // The enrollment listener's configuration is rebuilt from the same material.
    let enrollment = running.tls_as_enrollee().await;
    assert_eq!(leaf_of(&enrollment), new_leaf);
    // Both the new connection and the one opened before the reload work.
    let (mut new_connection, _driver) = http_over(after).await.unwrap();
    for sender in [&mut old_connection, &mut new_connection] {
        send_accepted_half(sender, "half").await;
    }
    running.stop().await;
}

#[tokio::test]
async fn sighup_reloads_the_certificates() {
    let next_material = NextMaterial::default();
    let running = Running::start_with_reload(|_| {}, Arc::clone(&next_material)).await;
    let new_leaf = stage_material(&next_material, &running.ca, "server-after-sighup");

    let hangups = signals::hangups().unwrap();
    let reloads = tokio::spawn(signals::reload_on_hangup(hangups, Arc::clone(&running.tls)));
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());

    eventually("a new connection sees the new certificate", || async {
        leaf_of(&running.tls_as_terminal("shop-1").await) == new_leaf
    })
    .await;
    let enrollment = running.tls_as_enrollee().await;
    assert_eq!(leaf_of(&enrollment), new_leaf);
    reloads.abort();
    running.stop().await;
}

#[tokio::test]
async fn a_bad_configuration_is_refused_before_any_port_is_bound() {
    let ca = Ca::new("ca");
    let reload = Arc::new(|| Err(ServerError::Material("unused".into())));
    let tls = Arc::new(TlsReloader::new(ca.server_material("server"), reload).unwrap());
    let config = ServerConfig {
        ops_listen: "0.0.0.0:0".parse().unwrap(),
        ..ServerConfig::default()
    };
    let error = Server::new(config, Arc::new(FakeApi::default()), tls, Metrics::new()).unwrap_err();
    assert!(
        matches!(
            error,
            ServerError::Config {
                setting: "ops_listen",
                ..
            }
        ),
        "{error}"
    );
    assert_eq!(error.exit_code(), 64);

    // A key that does not belong to the certificate is refused too.
    let mut mismatched = ca.server_material("server");
    mismatched.key = ca.server_material("other").key;
    let reload = Arc::new(|| Err(ServerError::Material("unused".into())));
    let error = TlsReloader::new(mismatched, reload).unwrap_err();
    assert!(matches!(error, ServerError::Tls(_)), "{error}");
}

#[tokio::test]
async fn tls_material_reads_pem_files() {
    let ca = Ca::new("ca");
    let material = ca.server_material("server");
    let directory = tempfile::tempdir().unwrap();
    let pem = |certificates: &[CertificateDer<'_>]| {
        certificates
            .iter()
            .map(|certificate| {
                let encoded = pem_encode(certificate);
                format!("-----BEGIN CERTIFICATE-----\n{encoded}-----END CERTIFICATE-----\n")
            })
            .collect::<String>()
    };
    let chain_path = directory.path().join("chain.pem");
    let ca_path = directory.path().join("ca.pem");
    std::fs::write(&chain_path, pem(&material.chain)).unwrap();
    std::fs::write(&ca_path, pem(&material.client_ca)).unwrap();
    let read = TlsMaterial::from_pem_files(&chain_path, &ca_path, material.key.clone()).unwrap();
    assert_eq!(read.chain, material.chain);
    assert_eq!(read.client_ca, material.client_ca);

    std::fs::write(&ca_path, "no certificates here\n").unwrap();
    let error = TlsMaterial::from_pem_files(&chain_path, &ca_path, material.key).unwrap_err();
    assert!(matches!(error, ServerError::Certificates { .. }), "{error}");
}

/// Base64 in 64-character lines, for writing PEM files by hand.
fn pem_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut text = String::new();
    for chunk in bytes.chunks(3) {
        let mut block = [0u8; 3];
        block[..chunk.len()].copy_from_slice(chunk);
        let value = u32::from_be_bytes([0, block[0], block[1], block[2]]);
        for index in 0..4 {
            if index <= chunk.len() {
                let sextet = (value >> (18 - 6 * index)) & 0x3F;
                text.push(char::from(ALPHABET[usize::try_from(sextet).unwrap()]));
            } else {
                text.push('=');
            }
        }
    }
    let mut wrapped = String::new();
    for line in text.as_bytes().chunks(64) {
        wrapped.push_str(std::str::from_utf8(line).unwrap());
        wrapped.push('\n');
    }
    wrapped
}

/// `nfcpayd --log-format json` writes each log line as one JSON object (for journald or ELK
/// pipelines); text stays the default.
#[test]
fn nfcpayd_logs_json_lines_when_asked() {
    let run = |format: Option<&str>| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_nfcpayd"));
        command.args(["--config", "/nonexistent/nfcpay.toml"]);
        if let Some(format) = format {
            command.args(["--log-format", format]);
        }
        let output = command.env_remove("NFCPAY_LOG").output().unwrap();
        assert_eq!(output.status.code(), Some(64), "{output:?}");
        String::from_utf8(output.stderr).unwrap()
    };
    let json = run(Some("json"));
    let line = json
        .lines()
        .find(|line| line.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON line: {json}"));
    let event: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(event["level"], "ERROR", "{event}");
    assert!(
        event["fields"]["message"]
            .as_str()
            .is_some_and(|message| message.contains("nfcpay.toml")),
        "{event}"
    );
    assert!(event["timestamp"].is_string(), "{event}");
    let text = run(None);
    assert!(text.lines().any(|line| line.contains(" ERROR ")), "{text}");
    assert!(!text.lines().any(|line| line.starts_with('{')), "{text}");
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_nfcpayd"))
        .args(["--log-format", "xml"])
        .output()
        .unwrap();
    // A command-line error is EX_USAGE, which the unit does not restart.
    assert_eq!(bad.status.code(), Some(64));
}
