//! The network front end of `nfcpayd`: transport only. It terminates TLS 1.3 — mutual on the
//! terminal listener, server-only on the enrollment listener — reads and limits HTTP/1.1
//! requests, routes them, and hands the survivors to an [`Api`] implemented by the platform
//! service; it knows nothing about DUKPT or the ledger.
//!
//! # Listeners
//!
//! | setting | default | TLS | routes |
//! | --- | --- | --- | --- |
//! | `listen` | `0.0.0.0:8443` | 1.3, client certificate from the terminal CA required | halves, transaction status |
//! | `enroll_listen` | `0.0.0.0:8444` | 1.3, no client certificate | `POST /v1/enroll` |
//! | `ops_listen` | `127.0.0.1:9443` | none (loopback only) | `/metrics`, `/healthz`, `/readyz` |
//!
//! # Layout
//!
//! - [`config`]: `[server]` settings and every limit as a named constant; validated before
//!   any port is bound.
//! - [`api`]: the [`Api`] trait, the contract with the platform service.
//! - [`problem`]: RFC 9457 problem documents with the stable codes of docs/protocol.md §8.
//! - [`tls`]: rustls configurations of both HTTPS listeners (TLS 1.3, HSM-backed server key,
//!   terminal CA), reloaded together.
//! - `connection`: accept loops, the shared connection cap, handshake/header/idle timeouts,
//!   draining.
//! - `routes`: the terminal and enrollment routes — rate limit, body cap and timeout.
//! - `ops`: the local operations listener — `/metrics`, `/healthz`, `/readyz`.
//! - `rate`: per-terminal token buckets in a bounded map.
//! - [`metrics`]: the Prometheus registry, shared with the platform service.
//! - [`signals`]: SIGTERM/SIGINT → shutdown, SIGHUP → reload.
//! - [`systemd`]: `sd_notify` readiness, status, watchdog, reload and stop notices.
//!
//! # Lifecycle
//!
//! [`Server::new`] validates the configuration; [`Server::bind`] binds the three listeners;
//! [`Server::run`] serves until its `shutdown` future completes, then stops accepting, lets
//! in-flight requests finish until the drain deadline, closes what is left and returns.
//! [`serve`] strings these together with signals and systemd for the `nfcpayd` binary.

pub mod address;
mod api;
pub mod config;
mod connection;
pub mod metrics;
mod ops;
pub mod problem;
mod rate;
mod routes;
pub mod signals;
pub mod systemd;
pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use nfcpay_protocol::TerminalId;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use api::{Api, HalfAnswer, NotReady};
pub use config::ServerConfig;
pub use metrics::Metrics;
/// The half a `POST /v1/halves/…` route accepts: the protocol's own A/B.
pub use nfcpay_protocol::messages::HalfKind;
pub use ops::READY_TIMEOUT_MS;
pub use problem::{Problem, ProblemCode};
pub use tls::{ReloadTlsMaterial, TlsMaterial, TlsReloader};

/// `sysexits.h` `EX_USAGE`: the configuration is wrong.
pub const EXIT_USAGE: u8 = 64;
/// `sysexits.h` `EX_OSERR`: the operating system refused (a port, a signal handler).
pub const EXIT_OS_ERROR: u8 = 71;
/// `sysexits.h` `EX_CONFIG`: certificates or keys named by the configuration are unusable.
pub const EXIT_CONFIG: u8 = 78;

/// Why the front end could not start or reload.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// A `[server]` setting is out of range.
    #[error("[server] {setting}: {reason}")]
    Config {
        /// The setting.
        setting: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A listener could not be bound.
    #[error("cannot listen on {address}")]
    Bind {
        /// The address.
        address: SocketAddr,
        /// The operating system's refusal.
        #[source]
        source: std::io::Error,
    },
    /// A certificate file is missing, unreadable or holds no certificate.
    #[error("certificates in {path}: {reason}")]
    Certificates {
        /// The file (or the directory of the platform's PKI).
        path: PathBuf,
        /// What is wrong with it, or what was being read when `source` failed.
        reason: &'static str,
        /// The cause: the operating system's, the PEM parser's or the keystore's error.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// rustls refused the certificates or key (e.g. the key does not match the certificate).
    #[error("TLS configuration")]
    Tls(#[source] rustls::Error),
    /// The client certificate verifier could not be built from the terminal CA.
    #[error("terminal CA")]
    ClientVerifier(#[source] rustls::server::VerifierBuilderError),
    /// The provider of [`TlsMaterial`] (e.g. the keystore holding the server key) failed.
    #[error("TLS material")]
    Material(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A signal handler could not be installed.
    #[error("cannot handle signals")]
    Signal(#[source] std::io::Error),
}

impl ServerError {
    /// The process exit status this error calls for (`sysexits.h`).
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Config { .. } => EXIT_USAGE,
            Self::Bind { .. } | Self::Signal(_) => EXIT_OS_ERROR,
            Self::Certificates { .. }
            | Self::Tls(_)
            | Self::ClientVerifier(_)
            | Self::Material(_) => EXIT_CONFIG,
        }
    }
}

/// What every connection task shares.
struct Shared<A> {
    api: Arc<A>,
    config: ServerConfig,
    tls: Arc<TlsReloader>,
    metrics: Metrics,
    terminal_rate: rate::RateLimiter<TerminalId>,
    enrollment_rate: rate::RateLimiter<address::ClientAddress>,
}

/// The three listeners, bound; from [`Server::bind`], for [`Server::run`].
#[derive(Debug)]
pub struct Listeners {
    /// `[server] listen`: terminals, with client certificates.
    pub terminals: TcpListener,
    /// `[server] enroll_listen`: enrollment, without client certificates.
    pub enrollment: TcpListener,
    /// `[server] ops_listen`: metrics and health, plain HTTP on loopback.
    pub operations: TcpListener,
}

/// The front end, configured and ready to bind and run.
pub struct Server<A> {
    shared: Arc<Shared<A>>,
}

impl<A> std::fmt::Debug for Server<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl<A: Api> Server<A> {
    /// Checks `config` ([`ServerConfig::validate`]) and assembles the front end.
    pub fn new(
        config: ServerConfig,
        api: Arc<A>,
        tls: Arc<TlsReloader>,
        metrics: Metrics,
    ) -> Result<Self, ServerError> {
        config.validate()?;
        tls.register_metrics(&metrics);
        let terminal_rate = rate::RateLimiter::new(
            config.terminal_requests_per_second,
            config.terminal_request_burst,
            config.rate_limiter_entries_max,
        );
        let enrollment_rate = rate::RateLimiter::new(
            config.enrollment_requests_per_second,
            config.enrollment_request_burst,
            config.rate_limiter_entries_max,
        );
        Ok(Self {
            shared: Arc::new(Shared {
                api,
                config,
                tls,
                metrics,
                terminal_rate,
                enrollment_rate,
            }),
        })
    }

    /// Binds the terminal, enrollment and operations listeners named in the configuration.
    pub async fn bind(&self) -> Result<Listeners, ServerError> {
        let config = &self.shared.config;
        let bind = |address: SocketAddr| async move {
            TcpListener::bind(address)
                .await
                .map_err(|source| ServerError::Bind { address, source })
        };
        Ok(Listeners {
            terminals: bind(config.listen).await?,
            enrollment: bind(config.enroll_listen).await?,
            operations: bind(config.ops_listen).await?,
        })
    }

    /// Serves terminals, enrollment and operators on `listeners` until `shutdown` completes;
    /// then stops accepting on all three, lets in-flight requests finish (at most
    /// `drain_timeout_ms`), closes the rest and returns. Each HTTPS listener has its own cap of
    /// open connections (`connections_max`, `enrollment_connections_max`).
    pub async fn run(self, listeners: Listeners, shutdown: impl Future<Output = ()>) {
        let (stop, stopped) = watch::channel(false);
        let https = connection::serve_https(
            listeners.terminals,
            listeners.enrollment,
            Arc::clone(&self.shared),
            stopped.clone(),
        );
        let operators = ops::serve(listeners.operations, Arc::clone(&self.shared), stopped);
        let trigger = async move {
            shutdown.await;
            tracing::info!("shutting down: no new connections; draining in-flight requests");
            // Nobody may have subscribed yet; `send_replace` stores the value regardless.
            stop.send_replace(true);
        };
        tokio::join!(https, operators, trigger);
        tracing::info!("front end stopped");
    }
}

/// Runs `server` as the `nfcpayd` binary does: binds the three listeners, tells systemd it is
/// ready, reloads TLS on SIGHUP, pings the watchdog, and on SIGTERM or SIGINT tells systemd it
/// is stopping and drains.
pub async fn serve<A: Api>(server: Server<A>) -> Result<(), ServerError> {
    serve_until(server, std::future::pending()).await
}

/// [`serve`], also stopping (and draining) when `fault` completes: a part the daemon cannot
/// go on without has failed, and the caller exits for systemd to restart it.
pub async fn serve_until<A: Api>(
    server: Server<A>,
    fault: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let shutdown = signals::shutdown_signal()?;
    let hangups = signals::hangups()?;
    let listeners = server.bind().await?;
    let addresses = (
        listeners.terminals.local_addr(),
        listeners.enrollment.local_addr(),
        listeners.operations.local_addr(),
    );
    if let (Ok(terminals), Ok(enrollment), Ok(operators)) = addresses {
        tracing::info!(%terminals, %enrollment, %operators, "listening");
    }
    let reloads = tokio::spawn(signals::reload_on_hangup(
        hangups,
        Arc::clone(&server.shared.tls),
    ));
    let watchdog = systemd::spawn_watchdog();
    systemd::ready("serving");
    server
        .run(listeners, async move {
            tokio::select! {
                () = shutdown => {}
                () = fault => {}
            }
            systemd::stopping();
        })
        .await;
    reloads.abort();
    if let Some(watchdog) = watchdog {
        watchdog.abort();
    }
    Ok(())
}
