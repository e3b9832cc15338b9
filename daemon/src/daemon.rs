//! `nfcpayd` from start to stop: configuration, keystore, ledger, service, front end.
//!
//! Everything that can be wrong with the configuration is found before a port is bound, and
//! reported with exit code 64 (`EX_USAGE`); the HSM PIN comes from the `pin-source` file named
//! in the keystore URI (a systemd credential under `$CREDENTIALS_DIRECTORY`, or a 0600 file),
//! never from the command line.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nfcpay_keystore::Keystore;

use crate::config::{Config, ConfigError};
use crate::pki;
use crate::server::metrics::Metrics;
use crate::server::tls::{ReloadTlsMaterial, TlsMaterial, TlsReloader};
use crate::server::{Server, ServerError};
use crate::service::Platform;
use crate::service::metered::MeteredKeystore;
use crate::storage::Storage;

/// Exit code for a usage or configuration error (`EX_USAGE` of sysexits.h).
pub const EXIT_USAGE: u8 = 64;
/// Exit code when a service the daemon needs (HSM, database) is unavailable (`EX_UNAVAILABLE`).
pub const EXIT_UNAVAILABLE: u8 = 69;

/// Why the daemon stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DaemonError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Started as root without `[platform] allow_root = true`.
    #[error("refusing to run as root: run as the nfcpay user, or set [platform] allow_root = true")]
    Root,
    /// The keystore could not be opened.
    #[error("keystore: {0}")]
    Keystore(#[from] nfcpay_keystore::KeystoreError),
    /// The ledger could not be opened.
    #[error("database: {0}")]
    Storage(#[from] crate::storage::StorageError),
    /// Certificates or platform keys are missing (run `nfcpay-admin init`).
    #[error("PKI: {0} (has `nfcpay-admin init` been run?)")]
    Pki(#[from] crate::pki::PkiError),
    /// The front end failed.
    #[error(transparent)]
    Server(#[from] ServerError),
}

impl DaemonError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Config(_) | Self::Root => EXIT_USAGE,
            Self::Server(error) => error.exit_code(),
            _ => EXIT_UNAVAILABLE,
        }
    }
}

/// Loads and checks the configuration, refusing root unless allowed.
pub fn load_config(path: &Path) -> Result<Config, DaemonError> {
    let config = Config::load(path)?;
    if rustix::process::geteuid().is_root() && !config.platform.allow_root {
        return Err(DaemonError::Root);
    }
    Ok(config)
}

/// Runs the daemon until SIGTERM or SIGINT, then drains and returns.
pub async fn run(config: Config) -> Result<(), DaemonError> {
    let keystore: Arc<dyn Keystore> = Arc::from(nfcpay_keystore::open(&config.keystore)?);
    let metered = Arc::new(MeteredKeystore::new(keystore));
    let keystore: Arc<dyn Keystore> = Arc::clone(&metered) as Arc<dyn Keystore>;
    let storage = Storage::open_with(&config.database)?;
    let pki_dir = config.platform.pki_dir.clone();
    let platform = Platform::new(
        Arc::clone(&keystore),
        storage,
        pki_dir.clone(),
        config.platform.key_cache_entries,
    )?;
    let tls = tls_reloader(Arc::clone(&keystore), &config, pki_dir)?;
    let platform = Arc::new(platform);
    let sweeper = tokio::spawn(sweep_expired(
        Arc::clone(&platform),
        Duration::from_millis(config.platform.expiry_sweep_interval_ms),
    ));
    let metrics = Metrics::new();
    platform.register_metrics(&metrics);
    metrics.register(
        "hsm_operations",
        "Calls into the keystore (the HSM), by operation",
        metered.operations(),
    );
    metrics.register(
        "hsm_operation_duration_seconds",
        "Time of each call into the keystore (the HSM), by operation, failures included",
        metered.durations(),
    );
    let checkpoints = tokio::spawn(checkpoint_audit(
        Arc::clone(&platform),
        AUDIT_CHECKPOINT_INTERVAL,
        metrics.clone(),
    ));
    let server = Server::new(config.server, Arc::clone(&platform), tls, metrics)?;
    let served = crate::server::serve(server).await;
    sweeper.abort();
    checkpoints.abort();
    // The last word on the chains this daemon wrote: a checkpoint of every head.
    if let Err(problem) = platform.checkpoint_audit().await {
        tracing::warn!(
            detail = problem.detail(),
            "audit checkpoint at shutdown failed"
        );
    }
    Ok(served?)
}

/// TLS material from the PKI directory and the keystore, re-read on every SIGHUP.
fn tls_reloader(
    keystore: Arc<dyn Keystore>,
    config: &Config,
    pki_dir: PathBuf,
) -> Result<Arc<TlsReloader>, DaemonError> {
    let chain = config.server.certificate_chain.clone();
    let client_ca = config.server.client_ca.clone();
    let load: ReloadTlsMaterial = Arc::new(move || {
        let server = pki::load_server_tls(&keystore, &pki_dir).map_err(|error| {
            ServerError::Certificates {
                path: pki_dir.clone(),
                reason: error.to_string(),
            }
        })?;
        TlsMaterial::from_pem_files(&chain, &client_ca, server.signing_key)
    });
    let material = load()?;
    Ok(Arc::new(TlsReloader::new(material, load)?))
}

/// Marks unmatched payments past their expiry as expired, every `interval`.
/// How often a daemon signs a checkpoint of every audit chain's head (and once when it stops).
pub const AUDIT_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(60);

async fn checkpoint_audit(platform: Arc<Platform>, interval: Duration, metrics: Metrics) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await; // the first tick is immediate: nothing to checkpoint yet
    // Started counts as a success: the alert on a stale checkpoint waits for a failing run.
    let now_unix = || i64::try_from(crate::service::now_ms() / 1000).unwrap_or(i64::MAX);
    metrics.audit_checkpoint_succeeded(now_unix());
    loop {
        ticks.tick().await;
        match platform.checkpoint_audit().await {
            Ok(()) => metrics.audit_checkpoint_succeeded(now_unix()),
            Err(problem) => {
                tracing::warn!(detail = problem.detail(), "audit checkpoint failed");
            }
        }
    }
}

async fn sweep_expired(platform: Arc<Platform>, interval: Duration) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        match platform.expire_unmatched().await {
            Ok(0) => {}
            Ok(expired) => tracing::info!(expired, "unmatched payments expired"),
            Err(problem) => tracing::warn!(detail = problem.detail(), "expiry sweep failed"),
        }
    }
}
