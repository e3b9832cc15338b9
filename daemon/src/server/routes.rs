//! The routes of the two HTTPS listeners (docs/protocol.md §6): the terminal listener has the
//! half and transaction routes, the enrollment listener only `POST /v1/enroll`; a route of one
//! is `404 not-found` on the other. Checks run cheapest first, and nothing reaches the [`Api`]
//! before all pass: route and method, query, rate limit (per terminal, or per address for
//! enrollment), the body's `Content-Type` (a half's, an enrollment's), declared length, then
//! the body under its cap and timeout. Who the caller is was settled in the TLS handshake,
//! before any of this (see `connection`).

use std::convert::Infallible;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Body as _, Incoming};
use nfcpay_protocol::TxnId;
use nfcpay_protocol::api::{
    ENROLL_PATH, HALF_A_PATH, HALF_B_PATH, TRANSACTIONS_PATH_PREFIX, WAIT_QUERY_PARAMETER,
};
use tokio::time::Instant;
use tracing::Instrument as _;

use super::connection::{Caller, ConnectionContext, Listener};
use super::metrics::RouteLabel;
use super::problem::{PROBLEM_CONTENT_TYPE, Problem, ProblemCode};
use super::{Api, HalfKind, Shared};

/// Media type of halves and receipts.
const OCTET_STREAM: &str = nfcpay_protocol::api::HALF_CONTENT_TYPE;
/// Media type of enrollment requests and answers.
const JSON: &str = nfcpay_protocol::api::ENROLL_CONTENT_TYPE;
/// Longest `wait_ms` value accepted as text (`u64::MAX` has 20 digits).
const WAIT_MS_DIGITS_MAX: usize = 20;

type Answer = Response<Full<Bytes>>;

/// A route of an HTTPS listener, parsed from the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Half(HalfKind),
    Transaction(TxnId),
    Enroll,
}

impl Route {
    /// The route `path` names on `listener`: `Ok(None)` for no route there, `Err` for a
    /// transaction path whose ID does not parse.
    fn parse(listener: Listener, path: &str) -> Result<Option<Self>, Problem> {
        if listener == Listener::Enrollment {
            return Ok((path == ENROLL_PATH).then_some(Self::Enroll));
        }
        Ok(match path {
            HALF_A_PATH => Some(Self::Half(HalfKind::A)),
            HALF_B_PATH => Some(Self::Half(HalfKind::B)),
            _ => match path.strip_prefix(TRANSACTIONS_PATH_PREFIX) {
                Some(hex) if !hex.is_empty() && !hex.contains('/') => {
                    let txn_id = TxnId::from_str(hex).map_err(|error| {
                        Problem::new(ProblemCode::Malformed, format!("transaction ID: {error}"))
                    })?;
                    Some(Self::Transaction(txn_id))
                }
                _ => None,
            },
        })
    }

    fn method(self) -> Method {
        match self {
            Self::Transaction(_) => Method::GET,
            Self::Half(_) | Self::Enroll => Method::POST,
        }
    }

    fn label(self) -> RouteLabel {
        match self {
            Self::Half(HalfKind::A) => RouteLabel::HalfA,
            Self::Half(HalfKind::B) => RouteLabel::HalfB,
            Self::Transaction(_) => RouteLabel::Transaction,
            Self::Enroll => RouteLabel::Enroll,
        }
    }
}

/// A refusal: the problem and what the answer needs besides it.
#[derive(Debug)]
struct Refusal {
    problem: Problem,
    extra: Extra,
}

/// A header a refusal adds to its problem document.
#[derive(Debug, Clone, Copy)]
enum Extra {
    None,
    /// `Allow`: the route's method.
    Allow(&'static str),
    /// `Retry-After`, in seconds.
    RetryAfter(u64),
    /// `Connection: close`: the rest of the body may still be on its way.
    Close,
}

/// `Retry-After` of every `503 unavailable` (the HSM or the ledger is away, or the pipeline
/// is full): a terminal sends the same bytes again after it (docs/protocol.md §8).
pub const UNAVAILABLE_RETRY_AFTER_SECONDS: u64 = 1;

impl From<Problem> for Refusal {
    fn from(problem: Problem) -> Self {
        let extra = if problem.code() == ProblemCode::Unavailable {
            Extra::RetryAfter(UNAVAILABLE_RETRY_AFTER_SECONDS)
        } else {
            Extra::None
        };
        Self { problem, extra }
    }
}

impl Refusal {
    fn with(problem: Problem, extra: Extra) -> Self {
        Self { problem, extra }
    }

    fn into_answer(self) -> Answer {
        let mut answer = problem_answer(&self.problem);
        let headers = answer.headers_mut();
        match self.extra {
            Extra::None => {}
            Extra::Allow(method) => {
                headers.insert(header::ALLOW, HeaderValue::from_static(method));
            }
            Extra::RetryAfter(seconds) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
            }
            Extra::Close => {
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
        }
        answer
    }
}

/// What answering a request learnt besides the answer.
#[derive(Debug)]
struct Progress {
    /// The route, once known.
    label: RouteLabel,
    /// Whether the body was read to its end.
    body_read: bool,
}

/// Answers one request on a terminal or enrollment connection.
///
/// An answer after which the connection closes says `Connection: close`: every answer on a
/// connection that is not kept alive (enrollment), and every answer given before the request's
/// body was read to its end (a refusal before the body, a route that takes none), since the
/// rest of that body may still be on its way and the connection cannot carry another request.
pub(super) async fn handle<A: Api>(
    shared: Arc<Shared<A>>,
    context: Arc<ConnectionContext>,
    request: Request<Incoming>,
) -> Result<Answer, Infallible> {
    let started = Instant::now();
    context.activity.request_started();
    let has_body = !request.body().is_end_stream();
    let mut progress = Progress {
        label: RouteLabel::Other,
        body_read: false,
    };
    // Every line logged while answering carries who asked; the service adds the KSN of a
    // half once decoded, and the reason of a refused enrollment.
    let span = tracing::info_span!(
        "request",
        peer = %context.peer,
        terminal = tracing::field::Empty,
        ksn = tracing::field::Empty,
        reason = tracing::field::Empty,
    );
    if let Caller::Terminal(client) = &context.caller {
        span.record("terminal", tracing::field::display(&client.terminal_id));
    }
    let answered = respond(&shared, &context, request, &mut progress)
        .instrument(span.clone())
        .await;
    let mut answer = match answered {
        Ok(answer) => answer,
        Err(refusal) => {
            shared
                .metrics
                .refused(progress.label, refusal.problem.code());
            span.in_scope(|| log_refusal(progress.label, &refusal.problem));
            refusal.into_answer()
        }
    };
    if !context.keep_alive || (has_body && !progress.body_read) {
        answer
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    let label = progress.label;
    let status = answer.status().as_u16();
    shared.metrics.request(label, status, started.elapsed());
    if answer.status().is_server_error() {
        tracing::warn!(peer = %context.peer, route = ?label, status, "answered");
    } else {
        tracing::debug!(peer = %context.peer, route = ?label, status, "answered");
    }
    context.activity.request_finished(Instant::now());
    Ok(answer)
}

/// Logs a refusal once, at `info`: what tells an attack from a broken terminal. The request's
/// span adds the peer address, the terminal, the KSN and a refused enrollment's reason; the
/// detail never names a key or a code.
fn log_refusal(route: RouteLabel, problem: &Problem) {
    let (route_name, code, status) = (
        route.as_str(),
        problem.code().as_str(),
        problem.code().status(),
    );
    let detail = problem.detail();
    match route {
        RouteLabel::HalfA | RouteLabel::HalfB => {
            tracing::info!(route = %route_name, code = %code, status, detail, "half refused");
        }
        RouteLabel::Enroll => {
            tracing::info!(route = %route_name, code = %code, status, detail, "enrollment refused");
        }
        RouteLabel::Transaction | RouteLabel::Other => {
            tracing::info!(route = %route_name, code = %code, status, detail, "request refused");
        }
    }
}

/// Runs the checks in order and calls the service; records the route and whether the body
/// was read in `progress`.
async fn respond<A: Api>(
    shared: &Shared<A>,
    context: &ConnectionContext,
    request: Request<Incoming>,
    progress: &mut Progress,
) -> Result<Answer, Refusal> {
    let route = Route::parse(context.caller.listener(), request.uri().path())?
        .ok_or_else(|| Problem::new(ProblemCode::NotFound, "no such route on this listener"))?;
    progress.label = route.label();
    if request.method() != route.method() {
        let allow = if route.method() == Method::GET {
            "GET"
        } else {
            "POST"
        };
        let problem = Problem::new(
            ProblemCode::MethodNotAllowed,
            format!("this route takes {allow}"),
        );
        return Err(Refusal::with(problem, Extra::Allow(allow)));
    }
    let wait = parse_query(route, request.uri().query(), shared.config.wait_ms_max)?;
    let now = std::time::Instant::now();
    let allowed = match &context.caller {
        Caller::Terminal(client) => shared.terminal_rate.check(&client.terminal_id, now),
        Caller::Enrollee => shared.enrollment_rate.check(&context.peer.ip().into(), now),
    };
    if let Err(retry_after) = allowed {
        shared.metrics.rate_limited();
        let seconds = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
        let problem = Problem::new(
            ProblemCode::RateLimited,
            "request rate exceeded; retry later",
        );
        return Err(Refusal::with(problem, Extra::RetryAfter(seconds.max(1))));
    }
    dispatch(
        shared,
        route,
        &context.caller,
        wait,
        request,
        &mut progress.body_read,
    )
    .await
}

/// Reads the body (setting `body_read` once it is read to its end) and calls the service.
async fn dispatch<A: Api>(
    shared: &Shared<A>,
    route: Route,
    caller: &Caller,
    wait: Duration,
    request: Request<Incoming>,
    body_read: &mut bool,
) -> Result<Answer, Refusal> {
    let api = &shared.api;
    match (route, caller) {
        (Route::Half(kind), Caller::Terminal(client)) => {
            let client = client.clone();
            check_content_type(request.headers(), OCTET_STREAM)?;
            let body = read_body(shared, request).await?;
            *body_read = true;
            let answer = api.submit_half(kind, client, body, wait).await?;
            let status = if answer.settled {
                StatusCode::OK
            } else {
                StatusCode::ACCEPTED
            };
            Ok(bytes_answer(status, OCTET_STREAM, answer.receipt))
        }
        (Route::Transaction(txn_id), Caller::Terminal(client)) => {
            let receipt = api.transaction(client.clone(), txn_id).await?;
            Ok(bytes_answer(StatusCode::OK, OCTET_STREAM, receipt))
        }
        (Route::Enroll, Caller::Enrollee) => {
            check_content_type(request.headers(), JSON)?;
            let body = read_body(shared, request).await?;
            *body_read = true;
            let answer = api.enroll(body).await?;
            Ok(bytes_answer(StatusCode::OK, JSON, answer))
        }
        (Route::Half(_) | Route::Transaction(_), Caller::Enrollee)
        | (Route::Enroll, Caller::Terminal(_)) => {
            // `Route::parse` gives each listener only its own routes.
            tracing::error!(?route, "a route reached dispatch on the wrong listener");
            Err(Problem::new(ProblemCode::Internal, "internal error").into())
        }
    }
}

/// Parses the query: only the half routes take one, and only `wait_ms` (capped at
/// `wait_ms_max`).
fn parse_query(route: Route, query: Option<&str>, wait_ms_max: u64) -> Result<Duration, Problem> {
    let malformed = |detail: &str| Problem::new(ProblemCode::Malformed, detail);
    let Some(query) = query else {
        return Ok(Duration::ZERO);
    };
    if !matches!(route, Route::Half(_)) {
        return Err(malformed("this route takes no query"));
    }
    let mut wait_ms = None;
    for pair in query.split('&') {
        let Some((WAIT_QUERY_PARAMETER, value)) = pair.split_once('=') else {
            return Err(malformed("the only query parameter is wait_ms"));
        };
        if wait_ms.is_some() {
            return Err(malformed("wait_ms given twice"));
        }
        if value.is_empty()
            || value.len() > WAIT_MS_DIGITS_MAX
            || !value.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(malformed("wait_ms must be a number of milliseconds"));
        }
        // All digits and at most 20 of them: only overflow can fail, and that is "too long".
        let value = value.parse::<u64>().unwrap_or(u64::MAX);
        wait_ms = Some(value.min(wait_ms_max));
    }
    Ok(Duration::from_millis(wait_ms.unwrap_or(0)))
}

/// Refuses a body that does not say it is of media type `expected` (parameters aside, case
/// insensitive), or says so more than once: `415 unsupported-media-type`.
fn check_content_type(headers: &http::HeaderMap, expected: &str) -> Result<(), Problem> {
    let mut values = headers.get_all(header::CONTENT_TYPE).iter();
    let media_type = match (values.next(), values.next()) {
        (Some(value), None) => value.to_str().ok().map(|value| {
            value
                .split_once(';')
                .map_or(value, |(essence, _)| essence)
                .trim()
        }),
        _ => None,
    };
    if media_type.is_some_and(|media_type| media_type.eq_ignore_ascii_case(expected)) {
        return Ok(());
    }
    Err(Problem::new(
        ProblemCode::UnsupportedMediaType,
        format!("the body must be sent as Content-Type: {expected}"),
    ))
}

/// Collects the body: refused without reading if its declared length is over the cap,
/// otherwise read under the cap and the body timeout. Every refusal closes the connection,
/// since the rest of the body may still be on its way.
async fn read_body<A>(shared: &Shared<A>, request: Request<Incoming>) -> Result<Bytes, Refusal> {
    let config = &shared.config;
    let limit = config.body_bytes_max;
    let closing = |code, detail: String| Refusal::with(Problem::new(code, detail), Extra::Close);
    let too_large = || {
        closing(
            ProblemCode::BodyTooLarge,
            format!("the body may be at most {limit} bytes"),
        )
    };
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(too_large());
    }
    let body = Limited::new(request.into_body(), limit);
    match tokio::time::timeout(config.body_read_timeout(), body.collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(error)) if error.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Ok(Err(error)) => {
            tracing::debug!(%error, "request body could not be read");
            Err(closing(
                ProblemCode::Malformed,
                "the body could not be read".to_owned(),
            ))
        }
        Err(_) => Err(closing(
            ProblemCode::Timeout,
            format!(
                "the body did not arrive within {} ms",
                config.body_read_timeout_ms
            ),
        )),
    }
}

fn bytes_answer(status: StatusCode, content_type: &'static str, body: Bytes) -> Answer {
    let mut answer = Response::new(Full::new(body));
    *answer.status_mut() = status;
    let headers = answer.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    answer
}

/// The problem document as an answer.
pub(super) fn problem_answer(problem: &Problem) -> Answer {
    bytes_answer(problem.status(), PROBLEM_CONTENT_TYPE, problem.to_json())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TXN: &str = "00112233445566778899AABBCCDDEEFF";

    /// Every `503 unavailable` says when to try again; other refusals do not.
    #[test]
    fn unavailable_answers_say_retry_after() {
        let answer =
            Refusal::from(Problem::new(ProblemCode::Unavailable, "the HSM is away")).into_answer();
        assert_eq!(answer.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            answer.headers().get(header::RETRY_AFTER).unwrap(),
            &UNAVAILABLE_RETRY_AFTER_SECONDS.to_string()
        );
        let answer = Refusal::from(Problem::new(ProblemCode::Internal, "x")).into_answer();
        assert!(answer.headers().get(header::RETRY_AFTER).is_none());
    }

    #[test]
    fn parses_routes() {
        let terminals = |path: &str| Route::parse(Listener::Terminals, path);
        assert_eq!(
            terminals("/v1/halves/a").unwrap(),
            Some(Route::Half(HalfKind::A))
        );
        assert_eq!(terminals("/v1/enroll").unwrap(), None);
        let Some(Route::Transaction(txn_id)) =
            terminals(&format!("/v1/transactions/{TXN}")).unwrap()
        else {
            panic!("transaction route")
        };
        assert_eq!(txn_id.to_string(), TXN);
        for path in [
            "/",
            "/v1/halves/c",
            "/v1/halves/a/",
            "/v1/transactions/",
            "/v1/transactions/x/y",
            "/V1/enroll",
        ] {
            assert_eq!(terminals(path).unwrap(), None, "{path}");
        }
        for path in [
            "/v1/transactions/zz",
            "/v1/transactions/00000000000000000000000000000000",
        ] {
            assert_eq!(terminals(path).unwrap_err().code(), ProblemCode::Malformed);
        }
    }

    #[test]
    fn the_enrollment_listener_has_only_enrollment() {
        let enrollment = |path: &str| Route::parse(Listener::Enrollment, path);
        assert_eq!(enrollment("/v1/enroll").unwrap(), Some(Route::Enroll));
        for path in [
            "/",
            "/v1/halves/a",
            "/v1/halves/b",
            &format!("/v1/transactions/{TXN}"),
            // Not even parsed: no transaction route here to be malformed.
            "/v1/transactions/zz",
            "/v1/enroll/",
        ] {
            assert_eq!(enrollment(path).unwrap(), None, "{path}");
        }
    }

    #[test]
    fn a_half_must_be_octet_stream() {
        let check = |values: &[&str]| {
            let mut headers = http::HeaderMap::new();
            for value in values {
                headers.append(header::CONTENT_TYPE, HeaderValue::from_str(value).unwrap());
            }
            check_content_type(&headers, OCTET_STREAM).map_err(|problem| problem.code())
        };
        for good in [
            "application/octet-stream",
            "Application/Octet-Stream",
            "application/octet-stream; charset=binary",
            " application/octet-stream ",
        ] {
            assert_eq!(check(&[good]), Ok(()), "{good}");
        }
        for bad in [
            &[][..],
            &["text/plain"],
            &["application/json"],
            &["application/octet-streamx"],
            &["application/octet"],
            &[""],
            &["application/octet-stream", "application/octet-stream"],
        ] {
            assert_eq!(
                check(bad),
                Err(ProblemCode::UnsupportedMediaType),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn an_enrollment_must_be_json() {
        let check = |values: &[&str]| {
            let mut headers = http::HeaderMap::new();
            for value in values {
                headers.append(header::CONTENT_TYPE, HeaderValue::from_str(value).unwrap());
            }
            check_content_type(&headers, JSON).map_err(|problem| problem.code())
        };
        for good in ["application/json", "Application/JSON; charset=utf-8"] {
            assert_eq!(check(&[good]), Ok(()), "{good}");
        }
        for bad in [
            &[][..],
            &["application/octet-stream"],
            &["text/json"],
            &["application/jsonx"],
            &["application/json", "application/json"],
        ] {
            assert_eq!(
                check(bad),
                Err(ProblemCode::UnsupportedMediaType),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn parses_and_caps_wait_ms() {
        let half = Route::Half(HalfKind::B);
        let ms = Duration::from_millis;
        assert_eq!(parse_query(half, None, 10_000).unwrap(), ms(0));
        assert_eq!(
            parse_query(half, Some("wait_ms=250"), 10_000).unwrap(),
            ms(250)
        );
        assert_eq!(
            parse_query(half, Some("wait_ms=99999"), 10_000).unwrap(),
            ms(10_000)
        );
        assert_eq!(
            parse_query(half, Some("wait_ms=99999999999999999999"), 10_000).unwrap(),
            ms(10_000)
        );
        for query in [
            "",
            "wait_ms=",
            "wait_ms=-1",
            "wait_ms=1e3",
            "wait_ms=1&wait_ms=2",
            "wait=1",
            "wait_ms",
            "wait_ms=999999999999999999999",
        ] {
            assert_eq!(
                parse_query(half, Some(query), 10_000).unwrap_err().code(),
                ProblemCode::Malformed,
                "{query}"
            );
        }
        assert!(parse_query(Route::Enroll, Some("wait_ms=1"), 10_000).is_err());
    }
}
