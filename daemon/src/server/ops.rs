//! The operations listener: plain HTTP on a loopback address, for the local Prometheus agent
//! and health probes. `GET /metrics`, `GET /healthz` (the process answers), `GET /readyz` (the
//! HSM's canary and the database answer, through [`Api::ready`]; 503 while shutting down).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::config::{HEAD_BYTES_MAX, HEADERS_MAX, OPS_CONNECTIONS_MAX};
use super::metrics::METRICS_CONTENT_TYPE;
use super::problem::{Problem, ProblemCode};
use super::{Api, Shared, connection, routes};

/// Longest `/readyz` waits for [`Api::ready`] before answering 503.
pub const READY_TIMEOUT_MS: u64 = 2_000;

const TEXT: &str = "text/plain; charset=utf-8";

type Answer = Response<Full<Bytes>>;

/// Serves the operations listener until stopped.
pub(super) async fn serve<A: Api>(
    listener: TcpListener,
    shared: Arc<Shared<A>>,
    stopped: watch::Receiver<bool>,
) {
    let drain_timeout = shared.config.drain_timeout();
    let serve = |_, stream, peer, slot| {
        ops_connection(Arc::clone(&shared), stream, peer, stopped.clone(), slot)
    };
    // Loopback only: every client is the same address, so the share is the whole cap.
    let limits = connection::Limits {
        connections_max: OPS_CONNECTIONS_MAX,
        per_address_max: OPS_CONNECTIONS_MAX,
    };
    connection::accept_loop(
        vec![(listener, "operations")],
        limits,
        drain_timeout,
        stopped.clone(),
        serve,
        |_, _| {},
    )
    .await;
}

async fn ops_connection<A: Api>(
    shared: Arc<Shared<A>>,
    stream: TcpStream,
    peer: SocketAddr,
    mut stopped: watch::Receiver<bool>,
    _slot: connection::Slot,
) {
    let service_stopped = stopped.clone();
    let service_shared = Arc::clone(&shared);
    let service = service_fn(move |request| {
        let shared = Arc::clone(&service_shared);
        let stopping = *service_stopped.borrow();
        async move { Ok::<_, Infallible>(answer(&shared, stopping, request).await) }
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        // Here one timeout covers idle and head alike: probes are quick and local.
        .header_read_timeout(shared.config.header_read_timeout())
        .max_buf_size(HEAD_BYTES_MAX)
        .max_headers(HEADERS_MAX)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(error) = result {
                tracing::debug!(%peer, %error, "operations connection ended with an error");
            }
            return;
        }
        () = connection::until_stopped(&mut stopped) => connection.as_mut().graceful_shutdown(),
    }
    if let Err(error) = connection.await {
        tracing::debug!(%peer, %error, "operations connection ended with an error");
    }
}

async fn answer<A: Api>(shared: &Shared<A>, stopping: bool, request: Request<Incoming>) -> Answer {
    let path = request.uri().path();
    if !matches!(path, "/metrics" | "/healthz" | "/readyz") {
        return routes::problem_answer(&Problem::new(ProblemCode::NotFound, "no such route"));
    }
    if request.method() != Method::GET {
        let problem = Problem::new(ProblemCode::MethodNotAllowed, "this route takes GET");
        let mut answer = routes::problem_answer(&problem);
        answer
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET"));
        return answer;
    }
    match path {
        "/healthz" => text(StatusCode::OK, TEXT, "alive\n".to_owned()),
        "/readyz" => ready(shared, stopping).await,
        _ => match refresh_gauges(shared)
            .await
            .and_then(|()| shared.metrics.encode())
        {
            Ok(encoded) => text(StatusCode::OK, METRICS_CONTENT_TYPE, encoded),
            Err(error) => {
                tracing::error!(%error, "metrics could not be encoded");
                text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    TEXT,
                    "metrics could not be encoded\n".to_owned(),
                )
            }
        },
    }
}

async fn ready<A: Api>(shared: &Shared<A>, stopping: bool) -> Answer {
    if stopping {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            TEXT,
            "not ready: shutting down\n".to_owned(),
        );
    }
    let check = tokio::time::timeout(Duration::from_millis(READY_TIMEOUT_MS), shared.api.ready());
    match check.await {
        Ok(Ok(())) => text(StatusCode::OK, TEXT, "ready\n".to_owned()),
        Ok(Err(not_ready)) => {
            tracing::warn!(%not_ready, "not ready");
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                TEXT,
                format!("not ready: {not_ready}\n"),
            )
        }
        Err(_) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            TEXT,
            format!("not ready: the readiness check took over {READY_TIMEOUT_MS} ms\n"),
        ),
    }
}

/// Updates what a scrape must see fresh: the components' readiness (the same check as
/// `/readyz`, bounded by its timeout) and the certificate files' earliest expiry.
async fn refresh_gauges<A: Api>(shared: &Shared<A>) -> Result<(), std::fmt::Error> {
    let metrics = &shared.metrics;
    let check = tokio::time::timeout(Duration::from_millis(READY_TIMEOUT_MS), shared.api.ready());
    match check.await {
        Ok(Ok(())) => {
            metrics.component_ready("hsm", true);
            metrics.component_ready("database", true);
        }
        // The HSM is checked first: when it fails, the database's last answer stands.
        Ok(Err(not_ready)) if not_ready.component == "hsm" => metrics.component_ready("hsm", false),
        Ok(Err(not_ready)) if not_ready.component == "database" => {
            metrics.component_ready("hsm", true);
            metrics.component_ready("database", false);
        }
        Ok(Err(_)) | Err(_) => {
            metrics.component_ready("hsm", false);
            metrics.component_ready("database", false);
        }
    }
    for (certificate, path) in [
        ("server", &shared.config.certificate_chain),
        ("client_ca", &shared.config.client_ca),
    ] {
        // A file that cannot be read or parsed leaves the last value: the reload that needs
        // it fails loudly on its own.
        if let Some(not_after) = earliest_expiry(path) {
            metrics.certificate_expiry(certificate, not_after);
        }
    }
    Ok(())
}

/// The earliest `notAfter` (Unix seconds) of the PEM certificates in `path`.
fn earliest_expiry(path: &std::path::Path) -> Option<i64> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject as _;
    CertificateDer::pem_file_iter(path)
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|der| {
            x509_parser::parse_x509_certificate(&der)
                .ok()
                .map(|(_, certificate)| certificate.validity().not_after.timestamp())
        })
        .min()
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Answer {
    let mut answer = Response::new(Full::new(Bytes::from(body)));
    *answer.status_mut() = status;
    let headers = answer.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    answer
}
