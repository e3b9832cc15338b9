//! Prometheus metrics of the front end, and the registry the platform service adds its own
//! metrics to. Served as OpenMetrics text on the operations listener's `/metrics`.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Metric, Registry};

/// Prefix of every metric name registered here (`nfcpayd_…`).
pub const METRICS_PREFIX: &str = "nfcpayd";
/// Media type of the `/metrics` answer.
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A route of the terminal listener, as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum RouteLabel {
    HalfA,
    HalfB,
    Transaction,
    Enroll,
    /// Anything that matched no route.
    Other,
}

impl RouteLabel {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::HalfA => "half_a",
            Self::HalfB => "half_b",
            Self::Transaction => "transaction",
            Self::Enroll => "enroll",
            Self::Other => "other",
        }
    }
}

impl EncodeLabelValue for RouteLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), fmt::Error> {
        fmt::Write::write_str(encoder, self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    route: RouteLabel,
    status: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RouteLabels {
    route: RouteLabel,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RefusalLabels {
    route: RouteLabel,
    code: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ListenerLabels {
    listener: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ComponentLabels {
    component: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CertificateLabels {
    certificate: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct HandshakeLabels {
    listener: &'static str,
    result: &'static str,
}

/// Why a connection was closed by the front end, as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum TimeoutLabel {
    Handshake,
    Header,
    Idle,
    /// Idle on a crowded listener, where the header timeout applies.
    IdleCrowded,
}

impl EncodeLabelValue for TimeoutLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), fmt::Error> {
        let text = match self {
            Self::Handshake => "handshake",
            Self::Header => "header",
            Self::Idle => "idle",
            Self::IdleCrowded => "idle_crowded",
        };
        fmt::Write::write_str(encoder, text)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TimeoutLabels {
    phase: TimeoutLabel,
}

type LatencyFamily = Family<RouteLabels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 1 ms to about 16 s: covers a cached derivation and a full `wait_ms` hold.
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

struct Inner {
    registry: Mutex<Registry>,
    requests: Family<RequestLabels, Counter>,
    latency: LatencyFamily,
    open_connections: Gauge,
    handshake_failures: Counter,
    rate_limited: Counter,
    timeouts: Family<TimeoutLabels, Counter>,
    refusals: Family<RefusalLabels, Counter>,
    connections: Family<ListenerLabels, Counter>,
    handshakes: Family<HandshakeLabels, Counter>,
    refused_per_address: Family<ListenerLabels, Counter>,
    component_ready: Family<ComponentLabels, Gauge>,
    certificate_expiry: Family<CertificateLabels, Gauge>,
    audit_checkpoint_success: Gauge,
}

/// A cheap, cloneable handle on the metrics registry.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with the front end's metrics registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix(METRICS_PREFIX);
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = LatencyFamily::new_with_constructor(latency_histogram);
        let open_connections = Gauge::default();
        let handshake_failures = Counter::default();
        let rate_limited = Counter::default();
        let timeouts = Family::<TimeoutLabels, Counter>::default();
        // Every phase from the start, at 0: a rate over a series that appears only with its
        // first event misses that event, and an absent metric looks like a broken exporter.
        for phase in [
            TimeoutLabel::Handshake,
            TimeoutLabel::Header,
            TimeoutLabel::Idle,
        ] {
            timeouts.get_or_create(&TimeoutLabels { phase }).inc_by(0);
        }
        let refusals = Family::<RefusalLabels, Counter>::default();
        let connections = Family::<ListenerLabels, Counter>::default();
        let handshakes = Family::<HandshakeLabels, Counter>::default();
        let component_ready = Family::<ComponentLabels, Gauge>::default();
        let certificate_expiry = Family::<CertificateLabels, Gauge>::default();
        let audit_checkpoint_success = Gauge::default();
        registry.register(
            "component_ready",
            "1 when the component (hsm, database) answered the readiness check made at this \
             scrape, 0 when it failed; an earlier answer when an earlier component failed first",
            component_ready.clone(),
        );
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "Earliest notAfter (Unix seconds) in the certificate files: server (certificate_chain) \
             and client_ca, read at this scrape",
            certificate_expiry.clone(),
        );
        registry.register(
            "audit_checkpoint_success_timestamp_seconds",
            "When (Unix seconds) the audit checkpoint task last ran without error",
            audit_checkpoint_success.clone(),
        );
        registry.register(
            "refusals",
            "Problem answers on both HTTPS listeners, by route and problem code",
            refusals.clone(),
        );
        registry.register(
            "connections",
            "TCP connections accepted, by listener (terminals, enrollment)",
            connections.clone(),
        );
        registry.register(
            "tls_handshakes",
            "TLS handshakes, by listener and result (ok, failed, timeout)",
            handshakes.clone(),
        );
        let refused_per_address = Family::<ListenerLabels, Counter>::default();
        registry.register(
            "http_requests",
            "Requests answered on both HTTPS listeners (terminals, enrollment), by route and \
             status",
            requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time from the end of a request head to the answer, by route",
            latency.clone(),
        );
        registry.register(
            "open_connections",
            "Connections open now on both HTTPS listeners (terminals, enrollment), TLS handshake \
             included",
            open_connections.clone(),
        );
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes that failed or timed out on both HTTPS listeners (terminals, \
             enrollment)",
            handshake_failures.clone(),
        );
        registry.register(
            "rate_limited_requests",
            "Requests refused with 429 rate-limited",
            rate_limited.clone(),
        );
        registry.register(
            "connection_timeouts",
            "Connections on both HTTPS listeners (terminals, enrollment) closed for being too \
             slow, by phase",
            timeouts.clone(),
        );
        registry.register(
            "connections_refused_per_address",
            "Connections closed at accept because their address (IPv4, IPv6 /64) had its share of the listener open, by listener",
            refused_per_address.clone(),
        );
        Self {
            inner: Arc::new(Inner {
                registry: Mutex::new(registry),
                requests,
                latency,
                open_connections,
                handshake_failures,
                rate_limited,
                timeouts,
                refusals,
                connections,
                handshakes,
                refused_per_address,
                component_ready,
                certificate_expiry,
                audit_checkpoint_success,
            }),
        }
    }

    /// Registers a collector of the platform service, asked for its metrics at each scrape;
    /// its names get the `nfcpayd_` prefix.
    pub fn register_collector(&self, collector: Box<dyn prometheus_client::collector::Collector>) {
        self.registry().register_collector(collector);
    }

    /// Registers a metric of the platform service; its name gets the `nfcpayd_` prefix.
    pub fn register(&self, name: &str, help: &str, metric: impl Metric) {
        self.registry().register(name, help, metric);
    }

    /// The whole registry as OpenMetrics text.
    pub fn encode(&self) -> Result<String, fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry())?;
        Ok(text)
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        // Registration and encoding leave the registry consistent at every step.
        self.inner
            .registry
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn request(&self, route: RouteLabel, status: u16, latency: Duration) {
        self.inner
            .requests
            .get_or_create(&RequestLabels { route, status })
            .inc();
        self.inner
            .latency
            .get_or_create(&RouteLabels { route })
            .observe(latency.as_secs_f64());
    }

    /// Counts a problem answer by its code.
    pub(crate) fn refused(&self, route: RouteLabel, code: nfcpay_protocol::api::ProblemCode) {
        self.inner
            .refusals
            .get_or_create(&RefusalLabels {
                route,
                code: code.as_str(),
            })
            .inc();
    }

    /// Records whether `component` (`hsm`, `database`) is ready.
    pub(crate) fn component_ready(&self, component: &'static str, ready: bool) {
        self.inner
            .component_ready
            .get_or_create(&ComponentLabels { component })
            .set(i64::from(ready));
    }

    /// Records the earliest expiry (Unix seconds) in a certificate file.
    pub(crate) fn certificate_expiry(&self, certificate: &'static str, not_after_unix: i64) {
        self.inner
            .certificate_expiry
            .get_or_create(&CertificateLabels { certificate })
            .set(not_after_unix);
    }

    /// Records that the audit checkpoint task ran without error at `unix_seconds`.
    pub fn audit_checkpoint_succeeded(&self, unix_seconds: i64) {
        self.inner.audit_checkpoint_success.set(unix_seconds);
    }

    /// Counts a TLS handshake's result (`ok`, `failed`, `timeout`) on `listener`.
    pub(crate) fn handshake(&self, listener: &'static str, result: &'static str) {
        self.inner
            .handshakes
            .get_or_create(&HandshakeLabels { listener, result })
            .inc();
    }

    pub(crate) fn connection_opened(&self, listener: &'static str) -> OpenConnection {
        self.inner
            .connections
            .get_or_create(&ListenerLabels { listener })
            .inc();
        self.inner.open_connections.inc();
        OpenConnection {
            gauge: self.inner.open_connections.clone(),
        }
    }

    pub(crate) fn handshake_failed(&self) {
        self.inner.handshake_failures.inc();
    }

    pub(crate) fn rate_limited(&self) {
        self.inner.rate_limited.inc();
    }

    pub(crate) fn refused_per_address(&self, listener: &'static str) {
        self.inner
            .refused_per_address
            .get_or_create(&ListenerLabels { listener })
            .inc();
    }

    pub(crate) fn timed_out(&self, phase: TimeoutLabel) {
        self.inner
            .timeouts
            .get_or_create(&TimeoutLabels { phase })
            .inc();
    }
}

/// Counts one open connection until dropped.
#[derive(Debug)]
pub(crate) struct OpenConnection {
    gauge: Gauge,
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_front_end_and_service_metrics() {
        let metrics = Metrics::new();
        metrics.request(RouteLabel::HalfA, 202, Duration::from_millis(3));
        let service_counter = Counter::<u64>::default();
        metrics.register("settlements", "Settled payments", service_counter.clone());
        service_counter.inc();
        {
            let _open = metrics.connection_opened("terminals");
            assert!(
                metrics
                    .encode()
                    .unwrap()
                    .contains("nfcpayd_open_connections 1")
            );
        }
        let text = metrics.encode().unwrap();
        assert!(
            text.contains(r#"nfcpayd_http_requests_total{route="half_a",status="202"} 1"#),
            "{text}"
        );
        assert!(text.contains("nfcpayd_settlements_total 1"), "{text}");
        assert!(text.contains("nfcpayd_open_connections 0"), "{text}");
        assert!(
            text.contains(r#"nfcpayd_connections_total{listener="terminals"} 1"#),
            "{text}"
        );
        metrics.refused(
            RouteLabel::HalfB,
            nfcpay_protocol::api::ProblemCode::ReplayedKsn,
        );
        metrics.handshake("enrollment", "ok");
        let text = metrics.encode().unwrap();
        assert!(
            text.contains(r#"nfcpayd_refusals_total{route="half_b",code="replayed-ksn"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"nfcpayd_tls_handshakes_total{listener="enrollment",result="ok"} 1"#),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }

    /// The front end counts these on both HTTPS listeners (`server::connection` serves both
    /// with the same code), and docs/operations.md says so: their help must not say otherwise.
    #[test]
    fn help_of_metrics_counted_on_both_listeners_says_so() {
        let metrics = Metrics::new();
        // A family without a series has no help line either.
        metrics.request(RouteLabel::Enroll, 200, Duration::from_millis(1));
        let text = metrics.encode().unwrap();
        for name in [
            "http_requests",
            "open_connections",
            "tls_handshake_failures",
            "connection_timeouts",
        ] {
            let prefix = format!("# HELP nfcpayd_{name} ");
            let help = text
                .lines()
                .find_map(|line| line.strip_prefix(&prefix))
                .unwrap_or_else(|| panic!("no help for {name}:\n{text}"));
            assert!(
                help.contains("both HTTPS listeners (terminals, enrollment)"),
                "{name}: {help}"
            );
        }
    }
}
