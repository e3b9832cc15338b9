//! `nfcpayd` from start to stop: configuration, keystore, ledger, service, front end.
//!
//! Everything that can be wrong with the configuration is found before a port is bound. Each
//! failure exits with a `sysexits.h` code that tells systemd whether a restart can help
//! ([`DaemonError::exit_code`], docs/operations.md §11); the HSM PIN comes from the
//! `pin-source` file named in the keystore URI (a systemd credential under
//! `$CREDENTIALS_DIRECTORY`, or a 0600 file), never from the command line.
//! [`check_startup`] (`nfcpayd --check-config`) runs start-up's checks without serving.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nfcpay_keystore::{Keystore, KeystoreError};
use nfcpay_protocol::ErrorChain;

use crate::config::{Config, ConfigError};
use crate::pki::{self, PkiError};
use crate::server::metrics::Metrics;
use crate::server::tls::{ReloadTlsMaterial, TlsMaterial, TlsReloader};
use crate::server::{Server, ServerError};
use crate::service::Platform;
use crate::service::metered::MeteredKeystore;
use crate::storage::{Storage, StorageError};

/// Exit code for a usage or configuration error (`EX_USAGE` of sysexits.h): fix the
/// configuration; a restart cannot help.
pub const EXIT_USAGE: u8 = 64;
/// Exit code when a service the daemon needs (HSM, database) is unavailable
/// (`EX_UNAVAILABLE`): it may come back, so systemd restarts the daemon.
pub const EXIT_UNAVAILABLE: u8 = 69;
/// Exit code when a part of the daemon failed while it ran (`EX_SOFTWARE`): the ledger
/// writer stopped. systemd restarts it (`Restart=on-failure`).
pub const EXIT_SOFTWARE: u8 = 70;
/// How often the daemon checks that its ledger writer still runs.
pub const WRITER_WATCH_INTERVAL: Duration = Duration::from_millis(500);
/// Exit code when the operating system refused (a port in use, no runtime): `EX_OSERR`.
pub const EXIT_OS_ERROR: u8 = crate::server::EXIT_OS_ERROR;
/// Exit code when keys, certificates or the PIN named by the configuration are missing or
/// refused (`EX_CONFIG`): a restart cannot help (and would spend PIN tries).
pub const EXIT_CONFIG: u8 = crate::server::EXIT_CONFIG;

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
    #[error("keystore")]
    Keystore(#[from] KeystoreError),
    /// The ledger could not be opened.
    #[error("database")]
    Storage(#[from] StorageError),
    /// The ledger writer stopped while serving: the daemon drained and stopped, for systemd
    /// to start it again.
    #[error("the ledger writer stopped; exiting for a restart")]
    WriterStopped,
    /// Certificates or platform keys are missing (run `nfcpay-admin init`).
    #[error("PKI (has `nfcpay-admin init` been run?)")]
    Pki(#[from] PkiError),
    /// A key start-up does not need but terminals do is missing (`--check-config` only).
    #[error("{0}")]
    MissingKey(String),
    /// The front end failed.
    #[error(transparent)]
    Server(#[from] ServerError),
}

impl DaemonError {
    /// The process exit code for this error: [`EXIT_USAGE`] and [`EXIT_CONFIG`] for what
    /// only the operator can fix, [`EXIT_UNAVAILABLE`] and [`EXIT_OS_ERROR`] for what may pass.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Config(_) | Self::Root | Self::Storage(StorageError::InvalidUrl { .. }) => {
                EXIT_USAGE
            }
            Self::Keystore(error) | Self::Pki(PkiError::Keystore(error)) => {
                keystore_exit_code(error)
            }
            Self::Pki(_) | Self::MissingKey(_) => EXIT_CONFIG,
            Self::Server(error) => error.exit_code(),
            Self::WriterStopped => EXIT_SOFTWARE,
            Self::Storage(_) => EXIT_UNAVAILABLE,
        }
    }
}

/// A PIN refused, a PIN file or module missing, a store file that is not one, a key the
/// readiness canary cannot use: only the operator can fix it, and a restart loop would lock
/// the token. A token or session that does not answer may come back.
fn keystore_exit_code(error: &KeystoreError) -> u8 {
    match error {
        KeystoreError::Configuration(_)
        | KeystoreError::ModuleLoad { .. }
        | KeystoreError::CanaryFailed { .. }
        | KeystoreError::PinRefused
        | KeystoreError::Io { .. }
        | KeystoreError::SoftwareStoreDecode { .. }
        | KeystoreError::UnknownKey
        | KeystoreError::KeyNotPermitted => EXIT_CONFIG,
        _ => EXIT_UNAVAILABLE,
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

/// What `nfcpayd --check-config` checks, in start-up's order and with start-up's code, each
/// step reported on `out` as `ok  …`: the files the configuration names are readable, the
/// keystore opens and logs in with the PIN, the platform's keys and certificates are there and
/// match, the BDK terminals enroll under exists, the database answers (opened as start-up
/// opens it, so pending migrations are applied). Stops at the first failure, which it returns.
/// Binds no port.
pub fn check_startup(config: &Config, out: &mut dyn Write) -> Result<(), DaemonError> {
    // The report is best effort; the result is the exit code.
    let ok = |out: &mut dyn Write, what: &str| {
        let _ = writeln!(out, "ok    {what}");
    };
    let pki_dir = &config.platform.pki_dir;
    let files = [
        (
            "[server] certificate_chain",
            &config.server.certificate_chain,
        ),
        ("[server] client_ca", &config.server.client_ca),
        (
            "the server certificate",
            &pki_dir.join(pki::SERVER_CERTIFICATE_FILE),
        ),
    ];
    for (what, path) in files {
        std::fs::File::open(path).map_err(|error| ServerError::Certificates {
            path: path.clone(),
            reason: what,
            source: Some(error.into()),
        })?;
    }
    ok(out, "certificate files are readable");
    if let nfcpay_keystore::KeystoreConfig::Pkcs11 { uri } = &config.keystore
        && uri.contains("pin-source=file:/run/credentials/")
        && std::env::var_os("CREDENTIALS_DIRECTORY").is_none()
    {
        let _ = writeln!(
            out,
            "note  the PIN is a systemd credential, which exists only while the service runs; \
             to check it before, override the URI with pin-source=file:/etc/nfcpay/hsm-pin \
             (NFCPAY_KEYSTORE__URI, docs/operations.md §4)"
        );
    }
    // A PIN file its group or others can read is refused as the keystore opens (exit 78).
    let keystore: Arc<dyn Keystore> = Arc::from(nfcpay_keystore::open(&config.keystore)?);
    ok(out, "keystore open, logged in");
    for label in [
        pki::CA_KEY_LABEL,
        pki::SERVER_KEY_LABEL,
        pki::RECEIPT_KEY_LABEL,
    ] {
        let found = label
            .parse()
            .and_then(|label| keystore.find_ec_p256(&label))
            .map_err(PkiError::Keystore)?;
        if found.is_none() {
            return Err(DaemonError::MissingKey(format!(
                "no key pair labelled {label} in the keystore: run `nfcpay-admin init`"
            )));
        }
    }
    ok(
        out,
        "platform keys (terminal CA, server, receipt) are in the keystore",
    );
    let bdks = keystore.list_bdks()?;
    let enrollment_bdk = config.platform.enrollment_bdk_id()?;
    match (enrollment_bdk, bdks.len()) {
        (Some(bdk_id), _) if !bdks.iter().any(|bdk| bdk.bdk_id == bdk_id) => {
            return Err(DaemonError::MissingKey(format!(
                "[platform] enrollment_bdk_id {bdk_id}: no such BDK in the keystore \
                 (nfcpay-admin bdk list); terminals could not enroll"
            )));
        }
        (None, 0) => {
            return Err(DaemonError::MissingKey(
                "no BDK in the keystore: run `nfcpay-admin bdk generate` (or `bdk import`); \
                 terminals could not enroll"
                    .to_owned(),
            ));
        }
        _ => ok(out, &format!("{} BDK(s) in the keystore", bdks.len())),
    }
    let storage = Storage::open_with(&config.database)?;
    storage.check_health()?;
    ok(
        out,
        "database reachable, schema current (pending migrations applied)",
    );
    tls_reloader(Arc::clone(&keystore), config, pki_dir.clone())?;
    ok(
        out,
        "TLS: the server certificate matches the server key; the terminal CA loads",
    );
    Ok(())
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
    #[cfg(debug_assertions)]
    let writer_fault_hook = tokio::spawn(stop_the_writer_on_sigusr2(Arc::clone(&platform)));
    let server = Server::new(config.server, Arc::clone(&platform), tls, metrics)?;
    let served = crate::server::serve_until(server, writer_stopped(Arc::clone(&platform))).await;
    sweeper.abort();
    checkpoints.abort();
    #[cfg(debug_assertions)]
    writer_fault_hook.abort();
    if !platform.storage().writer_is_running() {
        // Nothing more can be written, not even the checkpoint below.
        return Err(DaemonError::WriterStopped);
    }
    // The last word on the chains this daemon wrote: a checkpoint of every head.
    if let Err(problem) = platform.checkpoint_audit().await {
        tracing::warn!(
            detail = problem.detail(),
            "audit checkpoint at shutdown failed"
        );
    }
    Ok(served?)
}

/// Debug builds only (never a release build, never the package): SIGUSR2 stops the ledger
/// writer thread as a bug would, so that the fault tests can show, against the real process,
/// what follows — `503` for writes, `/readyz` failing, the drain and exit status 70.
#[cfg(debug_assertions)]
async fn stop_the_writer_on_sigusr2(platform: Arc<Platform>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut usr2) = signal(SignalKind::user_defined2()) else {
        return;
    };
    if usr2.recv().await.is_some() {
        tracing::warn!("debug build: SIGUSR2 stops the ledger writer thread (fault-test hook)");
        platform
            .storage()
            .inject_writer_fault(crate::storage::WriterFault::StopThread);
    }
}

/// Completes once the ledger writer has stopped: every write would fail from then on, and a
/// restart is the way out.
async fn writer_stopped(platform: Arc<Platform>) {
    let mut ticks = tokio::time::interval(WRITER_WATCH_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if !platform.storage().writer_is_running() {
            tracing::error!(
                "the ledger writer has stopped: draining, then exiting with status {EXIT_SOFTWARE} \
                 for systemd to restart the daemon"
            );
            return;
        }
    }
}

/// TLS material from the PKI directory and the keystore, re-read on every SIGHUP.
fn tls_reloader(
    keystore: Arc<dyn Keystore>,
    config: &Config,
    pki_dir: PathBuf,
) -> Result<Arc<TlsReloader>, DaemonError> {
    let chain = config.server.certificate_chain.clone();
    let client_ca = config.server.client_ca.clone();
    let running = config.clone();
    let first_load = std::sync::atomic::AtomicBool::new(true);
    let load: ReloadTlsMaterial = Arc::new(move || {
        if !first_load.swap(false, std::sync::atomic::Ordering::Relaxed) {
            log_settings_a_reload_ignores(&running);
        }
        let server = pki::load_server_tls(&keystore, &pki_dir).map_err(|error| {
            ServerError::Certificates {
                path: pki_dir.clone(),
                reason: "the server key and certificate",
                source: Some(error.into()),
            }
        })?;
        TlsMaterial::from_pem_files(&chain, &client_ca, server.signing_key)
    });
    let material = load()?;
    Ok(Arc::new(TlsReloader::new(material, load)?))
}

/// On SIGHUP: reads the configuration file again and logs each changed setting, none of
/// which a reload applies (only the certificates' content is re-read).
fn log_settings_a_reload_ignores(running: &Config) {
    let Some(path) = &running.source else { return };
    match Config::load(path) {
        Ok(now) => {
            for setting in running.changed_settings(&now) {
                tracing::warn!(
                    %setting,
                    "SIGHUP: this setting changed in the configuration; a reload does not apply \
                     it, restart nfcpayd to use it (still running with the old value)"
                );
            }
        }
        Err(error) => tracing::warn!(
            error = %ErrorChain(&error),
            "SIGHUP: the configuration file no longer loads; still running with the one \
             loaded at start (a restart would fail)"
        ),
    }
}

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

/// Marks unmatched payments past their expiry as expired, every `interval`.
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

#[cfg(test)]
mod tests {
    // A panic is how a test fails.
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use nfcpay_keystore::software::SoftwareKeystore;

    use super::*;
    use crate::storage::WriterFault;

    /// The watch that makes the daemon drain and exit completes once the ledger writer stops,
    /// and not before; the daemon then exits with `EX_SOFTWARE` for systemd to restart it.
    #[tokio::test]
    async fn a_stopped_ledger_writer_ends_the_daemon_with_a_restartable_status() {
        let dir = tempfile::TempDir::new().unwrap();
        let storage = Storage::open(dir.path().join("ledger.db").to_str().unwrap()).unwrap();
        let keystore: Arc<dyn Keystore> = Arc::new(SoftwareKeystore::in_memory());
        let platform =
            Arc::new(Platform::new(keystore, storage.clone(), dir.path().to_owned(), 16).unwrap());
        let watch = tokio::spawn(writer_stopped(Arc::clone(&platform)));
        tokio::time::sleep(WRITER_WATCH_INTERVAL * 3).await;
        assert!(
            !watch.is_finished(),
            "the watch fired with the writer running"
        );

        storage.inject_writer_fault(WriterFault::StopThread);
        let created = tokio::task::spawn_blocking(move || {
            storage.create_account(&"acct".parse().unwrap(), "EUR".parse().unwrap(), 0)
        })
        .await
        .unwrap();
        assert!(created.is_err());
        tokio::time::timeout(Duration::from_secs(10), watch)
            .await
            .expect("the watch did not see the stopped writer")
            .unwrap();
        assert_eq!(DaemonError::WriterStopped.exit_code(), EXIT_SOFTWARE);
        assert_ne!(EXIT_SOFTWARE, EXIT_USAGE);
    }

    /// A module that does not load, a key the readiness canary cannot use and a software store
    /// file that is not one wait for the operator: `nfcpayd` exits with `EX_CONFIG` (no restart
    /// loop); `nfcpay-admin` with `EX_USAGE` for the first two, like the keystore's other
    /// configuration, and with a plain failure for the file, like the file's other faults.
    #[test]
    fn keystore_failures_that_wait_for_the_operator_keep_their_exit_codes() {
        // Each call makes them anew: a keystore error is not `Clone`.
        let failures = || {
            let uri = "pkcs11:token=t?module-path=/nonexistent/libnothing.so&pin-source=file:/none";
            let Err(module_load) =
                nfcpay_keystore::pkcs11::Pkcs11Keystore::open(&uri.parse().unwrap())
            else {
                panic!("a store opened without a module")
            };
            assert!(matches!(module_load, KeystoreError::ModuleLoad { .. }));
            let canary = KeystoreError::CanaryFailed {
                part: "sign with receipt-key".into(),
                source: Box::new(KeystoreError::KeyNotPermitted),
            };
            let decode = KeystoreError::SoftwareStoreDecode {
                path: "/var/lib/nfcpay/keystore.json".into(),
                source: serde_json::from_str::<u8>("x").unwrap_err(),
            };
            [module_load, canary, decode]
        };
        let [module_load, canary, decode] = failures();
        assert_eq!(DaemonError::Keystore(module_load).exit_code(), EXIT_CONFIG);
        assert_eq!(
            DaemonError::Pki(PkiError::Keystore(canary)).exit_code(),
            EXIT_CONFIG
        );
        assert_eq!(DaemonError::Keystore(decode).exit_code(), EXIT_CONFIG);

        let admin_exit = |error| crate::admin::AdminError::Keystore(error).exit_code();
        let [module_load, canary, decode] = failures();
        let usage = std::process::ExitCode::from(EXIT_USAGE);
        assert_eq!(admin_exit(module_load), usage);
        assert_eq!(admin_exit(canary), usage);
        assert_eq!(admin_exit(decode), std::process::ExitCode::FAILURE);
    }
}
