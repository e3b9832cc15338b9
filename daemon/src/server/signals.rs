//! Signals of the `nfcpayd` process: SIGTERM and SIGINT stop it (draining), SIGHUP reloads the
//! TLS certificates, key and terminal CA without a restart.
//!
//! Handlers are installed when these functions are called, not when their futures are first
//! polled, so a signal that arrives between start-up and serving is not lost, and a failure to
//! install one is reported before any port is bound.

use std::future::Future;
use std::sync::Arc;

use nfcpay_protocol::ErrorChain;
use tokio::signal::unix::{Signal, SignalKind, signal};

use super::ServerError;
use super::systemd;
use super::tls::TlsReloader;

/// Completes at the first SIGTERM (systemd's stop) or SIGINT (Ctrl-C).
pub fn shutdown_signal() -> Result<impl Future<Output = ()> + Send + 'static, ServerError> {
    let mut terminate = signal(SignalKind::terminate()).map_err(ServerError::Signal)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(ServerError::Signal)?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => tracing::info!("SIGTERM received"),
            _ = interrupt.recv() => tracing::info!("SIGINT received"),
        }
    })
}

/// SIGHUP, installed now; pass it to [`reload_on_hangup`].
#[derive(Debug)]
pub struct Hangups(Signal);

/// Installs the SIGHUP handler.
pub fn hangups() -> Result<Hangups, ServerError> {
    signal(SignalKind::hangup())
        .map(Hangups)
        .map_err(ServerError::Signal)
}

/// On each SIGHUP: tells systemd it is reloading, reloads `tls` off the async threads, logs
/// the outcome and tells systemd it is ready again. A failed reload keeps the current
/// certificates. Runs until the task is aborted.
pub async fn reload_on_hangup(mut hangups: Hangups, tls: Arc<TlsReloader>) {
    while hangups.0.recv().await.is_some() {
        tracing::info!("SIGHUP received: reloading TLS certificates");
        systemd::reloading();
        let reloader = Arc::clone(&tls);
        let status = match tokio::task::spawn_blocking(move || reloader.reload()).await {
            Ok(Ok(())) => {
                tracing::info!("TLS certificates reloaded; new connections use them");
                "serving; certificates reloaded"
            }
            Ok(Err(error)) => {
                tracing::error!(error = %ErrorChain(&error), "reload failed; keeping the current certificates");
                "serving; last reload failed (see the log)"
            }
            Err(error) => {
                tracing::error!(%error, "reload task failed; keeping the current certificates");
                "serving; last reload failed (see the log)"
            }
        };
        systemd::ready(status);
    }
}
