//! The platform service: what happens to a half between the TLS front end and the ledger.
//!
//! For each half (docs/protocol.md §6.1): decode the envelope, check it against the client
//! certificate and the terminal's record, derive the sender's working key inside the keystore
//! (through the [`HostKeyCache`]), decrypt and verify it, decode and time-check the plaintext,
//! then hand the ledger an [`AcceptedHalf`](crate::storage::AcceptedHalf) to record, match and settle in one durable
//! transaction. Every answer is a receipt sealed twice: an AES-CMAC only the recipient terminal
//! and the platform can make, and an ECDSA signature by the platform's receipt key that anyone
//! can check.
//!
//! Keystore and database calls block. A half's HSM work runs on the HSM workers
//! ([`workers`], as many threads as the keystore has sessions, behind a bounded queue): once to
//! verify it and derive its receipt's MAC key, once to seal the receipt. Between the two, the
//! half waits for the ledger's group commit as an `.await` that holds no thread. At most
//! [`HALVES_IN_FLIGHT_MAX`] halves are in that pipeline at once; a half that cannot get in within
//! [`HALF_ADMISSION_WAIT`] is answered `503 unavailable`, and so is one whose HSM job is refused
//! by a full queue or not done within [`workers::HSM_JOB_TIMEOUT`]. Other calls (a payment's
//! lookup, enrollment, readiness) run on tokio's blocking threads.
//!
//! # Layout
//!
//! - [`halves`]: the verification pipeline of a half.
//! - [`active`]: the short memory of active terminals that spares a database read per half.
//! - [`receipts`]: building and sealing receipts.
//! - [`enroll`]: remote key loading and certificate issuance.
//! - [`metered`]: the keystore wrapper that counts HSM operations for `/metrics`.
//! - [`readiness`]: the HSM's readiness canary, with a deadline and one probe at a time.
//! - [`workers`]: the HSM worker threads and their bounded queue.
//! - `problems`: the one mapping from errors below to API problems.

pub mod active;
pub mod enroll;
pub mod halves;
pub mod metered;
mod problems;
pub mod readiness;
pub mod receipts;
pub mod workers;

use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use nfcpay_keystore::dukpt::HostKeyCache;
use nfcpay_keystore::{EcPublicKey, Keystore, PrivateKeyHandle};
use nfcpay_protocol::{ErrorChain, TxnId};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::{Notify, Semaphore};

use crate::pki::{self, ClientTerminal};
use crate::server::problem::{Problem, ProblemCode};
use crate::server::{Api, HalfAnswer, HalfKind, NotReady};
use crate::storage::{ChainHead, Storage, TransactionStatus, audit};

/// Most halves in the blocking pipeline at once (HSM work and the group commit they wait for).
pub const HALVES_IN_FLIGHT_MAX: usize = 256;
/// How long a half waits for a place in the pipeline before it is refused as unavailable.
pub const HALF_ADMISSION_WAIT: Duration = Duration::from_secs(2);

/// How long a readiness answer is reused: probes in quick succession cost the HSM one canary.
pub const READY_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// How often a waiting request re-reads the ledger, for halves settled by another daemon.
pub const WAIT_POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How long a terminal certificate issued at enrollment is valid.
pub const TERMINAL_CERTIFICATE_VALIDITY: Duration = Duration::from_secs(2 * 365 * 24 * 60 * 60);

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
        })
}

/// The platform service: keystore, key cache, ledger and the receipt key.
pub struct Platform {
    inner: Arc<Inner>,
    /// The threads that make the halves' HSM calls (their jobs hold `inner`, never this:
    /// `inner` has only a weak reference, so the workers never join themselves).
    hsm: Arc<workers::HsmWorkers>,
    /// HSM jobs not done, by reason (`busy`, `timed_out`, `panicked`, `stopped`).
    hsm_jobs_failed: Family<JobFailureLabels, Counter>,
}

/// Labels of `nfcpayd_hsm_jobs_failed_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct JobFailureLabels {
    reason: &'static str,
}

struct Inner {
    keystore: Arc<dyn Keystore>,
    /// Where a transient key dropped off the workers is destroyed ([`halves::HeldKey`]).
    hsm: Weak<workers::HsmWorkers>,
    keys: HostKeyCache,
    storage: Storage,
    receipt_key: PrivateKeyHandle,
    receipt_public_key: EcPublicKey,
    pki_dir: PathBuf,
    /// Woken whenever this daemon settles a payment.
    settled: Notify,
    /// Halves by route and outcome (`pending`, `settled`, or the refusal's problem code).
    halves: Family<HalfLabels, Counter>,
    /// Terminals recently found active.
    active_terminals: active::ActiveTerminals,
    /// Places in the blocking pipeline ([`HALVES_IN_FLIGHT_MAX`]).
    in_flight: Arc<Semaphore>,
    /// The chain heads this daemon last signed a checkpoint of.
    last_checkpoint: std::sync::Mutex<Option<Vec<ChainHead>>>,
    /// The HSM's readiness canary, one at a time ([`readiness::HSM_HEALTH_TIMEOUT`]).
    hsm_probe: readiness::HsmProbe,
    /// The last readiness answer and when it was made ([`READY_CHECK_INTERVAL`]).
    last_ready: std::sync::Mutex<Option<(std::time::Instant, Result<(), NotReady>)>>,
}

/// Labels of `nfcpayd_halves_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct HalfLabels {
    half: &'static str,
    outcome: &'static str,
}

impl Platform {
    /// Builds the service; the receipt key and the CA must exist (`nfcpay-admin init`).
    pub fn new(
        keystore: Arc<dyn Keystore>,
        storage: Storage,
        pki_dir: PathBuf,
        key_cache_entries: usize,
    ) -> Result<Self, crate::pki::PkiError> {
        let receipt_public_key = pki::ensure_receipt_key(&keystore)?;
        let label = pki::RECEIPT_KEY_LABEL
            .parse()
            .map_err(crate::pki::PkiError::Keystore)?;
        let (receipt_key, _) = keystore
            .find_ec_p256(&label)
            .map_err(crate::pki::PkiError::Keystore)?
            .ok_or(crate::pki::PkiError::Keystore(
                nfcpay_keystore::KeystoreError::UnknownKey,
            ))?;
        let hsm = Arc::new(
            workers::HsmWorkers::start(workers::HSM_WORKERS, workers::HSM_QUEUE_MAX)
                .map_err(crate::pki::PkiError::Workers)?,
        );
        Ok(Self {
            hsm_jobs_failed: Family::default(),
            inner: Arc::new(Inner {
                hsm: Arc::downgrade(&hsm),
                keys: HostKeyCache::new(Arc::clone(&keystore), key_cache_entries),
                keystore,
                storage,
                receipt_key,
                receipt_public_key,
                pki_dir,
                settled: Notify::new(),
                halves: Family::default(),
                active_terminals: active::ActiveTerminals::default(),
                in_flight: Arc::new(Semaphore::new(HALVES_IN_FLIGHT_MAX)),
                last_checkpoint: std::sync::Mutex::new(None),
                hsm_probe: readiness::HsmProbe::new(readiness::HSM_HEALTH_TIMEOUT),
                last_ready: std::sync::Mutex::new(None),
            }),
            hsm,
        })
    }

    /// Registers the service's metrics (halves by route and outcome) with the front end's.
    pub fn register_metrics(&self, metrics: &crate::server::metrics::Metrics) {
        metrics.register(
            "halves",
            "Halves received, by route and outcome (pending, settled, expired, or the problem code)",
            self.inner.halves.clone(),
        );
        metrics.register(
            "hsm_jobs_failed",
            "HSM jobs of halves not done: queue full (busy), past their deadline (timed_out), \
             panicked, or the workers stopped",
            self.hsm_jobs_failed.clone(),
        );
        let writer = self.inner.storage.writer_metrics();
        metrics.register(
            "ledger_statements_per_batch",
            "SQL statements per committed batch of halves, BEGIN and COMMIT included",
            writer.statements_per_batch.clone(),
        );
        metrics.register(
            "ledger_halves_per_batch",
            "Halves per committed batch (group commit)",
            writer.halves_per_batch.clone(),
        );
        metrics.register(
            "ledger_batch_retries",
            "Batches rolled back and run again after a lost race with another writer",
            writer.batch_retries.clone(),
        );
        metrics.register_collector(Box::new(PoolCollector {
            storage: self.inner.storage.clone(),
        }));
        metrics.register(
            "ledger_batch_commit_seconds",
            "Time from BEGIN to durable COMMIT of a batch of halves",
            writer.batch_commit_seconds.clone(),
        );
        metrics.register(
            "ledger_batch_panics",
            "Ledger writer batches that panicked, were rolled back and answered unavailable",
            writer.batch_panics.clone(),
        );
    }

    /// The ledger.
    pub fn storage(&self) -> &Storage {
        &self.inner.storage
    }

    /// Signs a checkpoint of every audit chain's head with the receipt key and stores it
    /// (docs/ledger.md): a later rewrite of a whole chain no longer matches it.
    pub async fn checkpoint_audit(&self) -> Result<(), Problem> {
        let inner = Arc::clone(&self.inner);
        blocking(move || {
            let heads = inner.storage.audit_heads().map_err(problems::storage)?;
            let mut last = inner
                .last_checkpoint
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            // Nothing new since the last checkpoint (an idle platform): nothing to sign.
            if heads.iter().all(|head| head.seq == 0) || last.as_ref() == Some(&heads) {
                return Ok(());
            }
            let at_ms = i64::try_from(now_ms()).unwrap_or(i64::MAX);
            let message = audit::checkpoint_message(at_ms, &audit::heads_text(&heads));
            let signature = inner
                .keystore
                .sign_p256_sha256(&inner.receipt_key, &message)
                .map_err(problems::keystore)?;
            inner
                .storage
                .add_audit_checkpoint(at_ms, heads.clone(), pki::RECEIPT_KEY_LABEL, signature)
                .map_err(problems::storage)?;
            *last = Some(heads);
            Ok(())
        })
        .await
    }

    /// Marks unmatched payments past their expiry as expired; returns how many.
    pub async fn expire_unmatched(&self) -> Result<u64, Problem> {
        let inner = Arc::clone(&self.inner);
        blocking(move || {
            let now = i64::try_from(now_ms()).unwrap_or(i64::MAX);
            inner
                .storage
                .expire_unmatched(now)
                .map_err(problems::storage)
        })
        .await
    }
}

/// The database pool's gauges, read at each scrape: `nfcpayd_database_connections{state}`
/// (`in_use`, `idle`) and `nfcpayd_database_connections_max`.
#[derive(Debug)]
struct PoolCollector {
    storage: Storage,
}

impl prometheus_client::collector::Collector for PoolCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric as _;
        use prometheus_client::metrics::gauge::ConstGauge;
        let pool = self.storage.pool_state();
        let in_use = pool.connections.saturating_sub(pool.idle);
        let mut family = encoder.encode_descriptor(
            "database_connections",
            "Pooled database connections now, by state (in_use, idle)",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (state, count) in [("in_use", in_use), ("idle", pool.idle)] {
            let labels = [("state", state)];
            ConstGauge::new(i64::from(count)).encode(family.encode_family(&labels)?)?;
        }
        let max = ConstGauge::new(i64::from(pool.max));
        max.encode(encoder.encode_descriptor(
            "database_connections_max",
            "The most connections the database pool opens",
            None,
            max.metric_type(),
        )?)?;
        Ok(())
    }
}

/// Runs blocking work (keystore, database) on tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, Problem> + Send + 'static,
) -> Result<T, Problem> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|_| Err(problems::internal("a blocking task did not finish")))
}

impl Api for Platform {
    async fn submit_half(
        &self,
        kind: HalfKind,
        client: ClientTerminal,
        body: Bytes,
        wait: Duration,
    ) -> Result<HalfAnswer, Problem> {
        let inner = Arc::clone(&self.inner);
        let half = kind.letter();
        let count = |outcome: &'static str| {
            self.inner
                .halves
                .get_or_create(&HalfLabels { half, outcome })
                .inc();
        };
        let Ok(Ok(place)) = tokio::time::timeout(
            HALF_ADMISSION_WAIT,
            Arc::clone(&self.inner.in_flight).acquire_owned(),
        )
        .await
        else {
            count(ProblemCode::Unavailable.as_str());
            return Err(Problem::new(
                ProblemCode::Unavailable,
                "too many halves in progress; try again",
            ));
        };
        let _place = place;
        let seal_pending = wait.is_zero();
        // Verify on an HSM worker, wait for the ledger's commit holding no thread, then seal
        // the receipt on an HSM worker, unless the terminal asked to wait for a pending
        // payment to settle. The request's span (peer, terminal) goes with each job, so the
        // KSN it records and every line it logs belong to the request.
        let span = tracing::Span::current();
        let accepted = async {
            // Under load the ledger's writer waits a moment for this half while it is verified.
            let coming = self.inner.storage.half_coming();
            let verified = {
                let span = span.clone();
                self.hsm_job(move || {
                    let _in_span = span.enter();
                    halves::verify(&inner, kind, &client, &body)
                })
                .await?
            };
            let (half, received_at_ms, awaiting) = verified.into_parts();
            let submitted = self.inner.storage.accept_half_async(half, received_at_ms);
            // Queued (or refused): no longer on its way.
            drop(coming);
            let submitted = submitted.await.map_err(problems::storage);
            // On a refusal (or when this request is dropped, its client gone) the receipt MAC
            // key goes with `awaiting`: `HeldKey` destroys it on a worker, not on this thread.
            let mut outcome = awaiting.outcome(submitted?);
            if !seal_pending && outcome.view.status == TransactionStatus::Pending {
                // Sealed once the payment settles or the wait ends, with a key derived then.
                drop(outcome.receipt_mac_key.take());
                return Ok((outcome, None));
            }
            let inner = Arc::clone(&self.inner);
            self.hsm_job(move || {
                let _in_span = span.enter();
                let sealed = receipts::answer(&inner, &mut outcome);
                Ok((outcome, Some(sealed)))
            })
            .await
            .map_err(|problem| receipts::recorded_but_unsealed(&problem))
        }
        .await;
        let (outcome, sealed) = match accepted {
            Ok(accepted) => accepted,
            Err(problem) => {
                // Logged once, with the request's peer, terminal and KSN, as the answer leaves
                // (`server::routes`).
                count(problem.code().as_str());
                return Err(problem);
            }
        };
        count(match outcome.view.status {
            TransactionStatus::Settled => "settled",
            TransactionStatus::Pending => "pending",
            TransactionStatus::Expired => "expired",
        });
        if outcome.settled_now {
            self.inner.settled.notify_waiters();
        }
        match sealed {
            Some(answer) => answer,
            None => self.wait_for_settlement(outcome, wait).await,
        }
    }

    async fn transaction(&self, client: ClientTerminal, txn_id: TxnId) -> Result<Bytes, Problem> {
        let inner = Arc::clone(&self.inner);
        blocking(move || receipts::status(&inner, &client, txn_id)).await
    }

    async fn enroll(&self, body: Bytes) -> Result<Bytes, Problem> {
        let inner = Arc::clone(&self.inner);
        let span = tracing::Span::current();
        blocking(move || {
            let _in_span = span.enter();
            enroll::enroll(&inner, &body)
        })
        .await
    }

    async fn ready(&self) -> Result<(), NotReady> {
        let now = std::time::Instant::now();
        let cached = |inner: &Inner| {
            // Only whole values are stored: a poisoned lock still holds a valid one.
            let last = inner
                .last_ready
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            last.as_ref()
                .filter(|(at, _)| now.duration_since(*at) < READY_CHECK_INTERVAL)
                .map(|(_, answer)| answer.clone())
        };
        if let Some(answer) = cached(&self.inner) {
            return answer;
        }
        // The HSM's canary (a session, a derivation from each BDK in use and a signature by
        // each key pair in use: TLS server key, CA, receipt key; each failure named) and the
        // database's, side by side, each within its own deadline; the HSM's failure is
        // named first.
        let hsm = self.inner.hsm_probe.check(&self.inner.keystore);
        let inner = Arc::clone(&self.inner);
        let database = tokio::task::spawn_blocking(move || {
            inner.storage.check_health().map_err(|error| NotReady {
                component: "database",
                reason: ErrorChain(&error).to_string(),
            })
        });
        let (hsm, database) = tokio::join!(hsm, database);
        let answer = hsm.and_then(|()| {
            database.unwrap_or_else(|_| {
                Err(NotReady {
                    component: "service",
                    reason: "readiness check did not finish".into(),
                })
            })
        });
        *self
            .inner
            .last_ready
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some((now, answer.clone()));
        answer
    }
}

impl Platform {
    /// Holds a pending answer until the payment settles (here or on another daemon) or `wait`
    /// runs out, then answers with the receipt as it stands.
    async fn wait_for_settlement(
        &self,
        mut outcome: halves::Outcome,
        wait: Duration,
    ) -> Result<HalfAnswer, Problem> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.inner.settled.notified();
            let sleep = tokio::time::sleep_until(
                deadline.min(tokio::time::Instant::now() + WAIT_POLL_INTERVAL),
            );
            tokio::select! {
                () = notified => {}
                () = sleep => {}
            }
            let inner = Arc::clone(&self.inner);
            let txn_id = outcome.view.txn_id;
            let view = blocking(move || {
                inner
                    .storage
                    .transaction(&txn_id)
                    .map_err(problems::storage)?
                    .ok_or_else(|| problems::internal("a recorded payment vanished"))
            })
            .await?;
            outcome.view = view;
            if outcome.view.status != TransactionStatus::Pending
                || tokio::time::Instant::now() >= deadline
            {
                break;
            }
        }
        let inner = Arc::clone(&self.inner);
        self.hsm_job(move || receipts::answer(&inner, &mut outcome))
            .await
            .map_err(|problem| receipts::recorded_but_unsealed(&problem))
    }

    /// Runs `job` on an HSM worker, within [`workers::HSM_JOB_TIMEOUT`]; a full queue, a
    /// stalled HSM or a shut-down platform is `503 unavailable`.
    async fn hsm_job<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> Result<T, Problem> + Send + 'static,
    ) -> Result<T, Problem> {
        self.hsm
            .run(workers::HSM_JOB_TIMEOUT, job)
            .await
            .unwrap_or_else(|error| {
                tracing::warn!(%error, "HSM job not done");
                let reason = match error {
                    workers::WorkError::Busy => "busy",
                    workers::WorkError::TimedOut(_) => "timed_out",
                    workers::WorkError::Panicked => "panicked",
                    workers::WorkError::Stopped => "stopped",
                };
                self.hsm_jobs_failed
                    .get_or_create(&JobFailureLabels { reason })
                    .inc();
                Err(match error {
                    workers::WorkError::Panicked => problems::internal("an HSM job panicked"),
                    _ => Problem::new(ProblemCode::Unavailable, "the HSM is busy; try again"),
                })
            })
    }
}

#[cfg(test)]
mod tests {
    // A panic is how a test fails.
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use nfcpay_keystore::software::SoftwareKeystore;
    use nfcpay_keystore::testing::{FailingKeystore, Fault};

    use super::*;
    use crate::storage::WriterFault;

    /// A stopped ledger writer turns readiness to "database: the ledger's writer has stopped".
    #[tokio::test]
    async fn readiness_fails_once_the_ledger_writer_has_stopped() {
        let dir = tempfile::TempDir::new().unwrap();
        let storage = Storage::open(dir.path().join("ledger.db").to_str().unwrap()).unwrap();
        let keystore: Arc<dyn Keystore> = Arc::new(SoftwareKeystore::in_memory());
        let platform = Platform::new(keystore, storage.clone(), dir.path().to_owned(), 16).unwrap();
        platform.ready().await.unwrap();

        storage.inject_writer_fault(WriterFault::StopThread);
        let created = tokio::task::spawn_blocking(move || {
            storage.create_account(&"acct".parse().unwrap(), "EUR".parse().unwrap(), 0)
        })
        .await
        .unwrap();
        assert!(created.is_err());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let not_ready = loop {
            match platform.ready().await {
                Err(not_ready) => break not_ready,
                Ok(()) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Ok(()) => panic!("still ready with the ledger writer stopped"),
            }
        };
        assert_eq!(not_ready.component, "database");
        assert_eq!(not_ready.reason, "the ledger's writer has stopped");
    }

    fn platform() -> (tempfile::TempDir, Platform) {
        let dir = tempfile::TempDir::new().unwrap();
        let storage = Storage::open(dir.path().join("ledger.db").to_str().unwrap()).unwrap();
        let keystore: Arc<dyn Keystore> = Arc::new(SoftwareKeystore::in_memory());
        let platform = Platform::new(keystore, storage, dir.path().to_owned(), 16).unwrap();
        (dir, platform)
    }

    fn failed(platform: &Platform, reason: &'static str) -> u64 {
        platform
            .hsm_jobs_failed
            .get_or_create(&JobFailureLabels { reason })
            .get()
    }

    /// A platform over a software keystore that fails on cue and an SQLite ledger.
    fn failing_platform() -> (tempfile::TempDir, Arc<FailingKeystore>, Platform) {
        let dir = tempfile::TempDir::new().unwrap();
        let failing = Arc::new(FailingKeystore::new(
            Arc::new(SoftwareKeystore::in_memory()),
            usize::MAX,
        ));
        let storage = Storage::open(dir.path().join("ledger.db").to_str().unwrap()).unwrap();
        let platform = Platform::new(failing.clone(), storage, dir.path().to_owned(), 16).unwrap();
        (dir, failing, platform)
    }

    /// A job the HSM does not finish within [`workers::HSM_JOB_TIMEOUT`] (here: stalled until
    /// released) is answered `503 unavailable`, counted as `timed_out`; paused time, so the
    /// deadline passes without waiting for it.
    #[tokio::test(start_paused = true)]
    async fn an_hsm_job_past_its_deadline_is_unavailable_not_internal() {
        let (_dir, platform) = platform();
        let (release, stalled) = std::sync::mpsc::channel::<()>();
        let answer = platform
            .hsm_job(move || {
                let _ = stalled.recv();
                Ok(())
            })
            .await;
        let problem = answer.unwrap_err();
        assert_eq!(problem.code(), ProblemCode::Unavailable);
        assert_eq!(problem.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(failed(&platform, "timed_out"), 1);
        drop(release);
    }

    /// With every worker busy and the queue full, one more job is refused at once as
    /// `503 unavailable` (`busy`); a job that panics is a bug: `500 internal` (`panicked`).
    #[tokio::test]
    async fn a_full_hsm_queue_is_unavailable_and_a_panicking_job_internal() {
        let (_dir, platform) = platform();
        let (release, stalled) = std::sync::mpsc::channel::<()>();
        let stalled = Arc::new(std::sync::Mutex::new(stalled));
        let (started, running) = std::sync::mpsc::channel::<()>();
        let stall = || {
            let stalled = Arc::clone(&stalled);
            let started = started.clone();
            move || {
                let _ = started.send(());
                let _ = stalled.lock().unwrap().recv();
            }
        };
        // First every worker holds a stalled job (each has said so), so that no worker takes
        // a job from the queue while it is filled below.
        let mut held = Vec::new();
        for _ in 0..workers::HSM_WORKERS {
            held.push(platform.hsm.submit(stall()).unwrap());
        }
        for _ in 0..workers::HSM_WORKERS {
            running.recv_timeout(Duration::from_secs(10)).unwrap();
        }
        // Then stalled jobs until the queue refuses one: the queue is full.
        loop {
            match platform.hsm.submit(stall()) {
                Ok(answer) => held.push(answer),
                Err(error) => {
                    assert_eq!(error, workers::WorkError::Busy);
                    break;
                }
            }
            assert!(held.len() <= workers::HSM_WORKERS + workers::HSM_QUEUE_MAX);
        }
        assert_eq!(held.len(), workers::HSM_WORKERS + workers::HSM_QUEUE_MAX);
        let refused = platform.hsm_job(|| Ok(())).await.unwrap_err();
        assert_eq!(refused.code(), ProblemCode::Unavailable);
        assert_eq!(failed(&platform, "busy"), 1);
        drop(release);
        drop(held);
        // The stalled jobs end once released; until the queue has room, jobs are still busy.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while platform.hsm_job(|| Ok(())).await.is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "the queue never drained"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }

        let panicked = platform
            .hsm_job::<()>(|| panic!("a bug in an HSM job"))
            .await
            .unwrap_err();
        assert_eq!(panicked.code(), ProblemCode::Internal);
        assert_eq!(failed(&platform, "panicked"), 1);
    }

    /// A canary that stalls makes readiness fail at its deadline, naming the HSM and the
    /// deadline, not when (or if) the HSM answers; paused time, so nothing waits for it.
    #[tokio::test(start_paused = true)]
    async fn a_stalled_hsm_canary_is_not_ready_at_its_deadline() {
        let (_dir, failing, platform) = failing_platform();
        failing.fault_health_checks(Some(Fault::Stall));
        let not_ready = platform.ready().await.unwrap_err();
        assert_eq!(not_ready.component, "hsm");
        assert_eq!(
            not_ready.reason,
            format!(
                "check took over {} ms",
                readiness::HSM_HEALTH_TIMEOUT.as_millis()
            )
        );
        failing.fault_health_checks(None);
    }

    /// A payee and a payer terminal, enrolled (active, with a certificate serial) on a
    /// platform whose keystore fails on cue.
    struct Market {
        _dir: tempfile::TempDir,
        failing: Arc<FailingKeystore>,
        keystore: Arc<dyn Keystore>,
        platform: Platform,
        payee: Party,
        payer: Party,
    }

    struct Party {
        client: ClientTerminal,
        account: nfcpay_protocol::AccountId,
        initial_key_id: nfcpay_protocol::InitialKeyId,
    }

    const PAYER_FUNDS_MINOR: u64 = 100_000;

    fn market() -> Market {
        use nfcpay_protocol::{BdkId, DerivationId, InitialKeyId};
        use sha2::Digest as _;

        let (dir, failing, platform) = failing_platform();
        let keystore: Arc<dyn Keystore> = failing.clone();
        let bdk_id = BdkId::from([0x0B, 0xD1, 0x00, 0x01]);
        keystore
            .generate_bdk(bdk_id, nfcpay_protocol::dukpt::KeyAlgorithm::Aes128)
            .unwrap();
        let storage = platform.storage();
        let now = i64::try_from(now_ms()).unwrap();
        let party = |name: &str, derivation: u8, serial: &str| {
            let account: nfcpay_protocol::AccountId = name.parse().unwrap();
            storage
                .create_account(&account, "EUR".parse().unwrap(), 0)
                .unwrap();
            let terminal_id: nfcpay_protocol::TerminalId = name.parse().unwrap();
            let initial_key_id =
                InitialKeyId::new(bdk_id, DerivationId::from([0, 0, 0, derivation]));
            let code = sha2::Sha256::digest(name.as_bytes()).into();
            storage
                .add_terminal(crate::storage::NewTerminal {
                    id: terminal_id.clone(),
                    account_id: account.clone(),
                    initial_key_id,
                    code_sha256: code,
                    code_expires_at_ms: now + 3_600_000,
                })
                .unwrap();
            storage
                .redeem_enrollment_code(&terminal_id, code, now, serial)
                .unwrap();
            Party {
                client: ClientTerminal {
                    terminal_id,
                    certificate_serial: serial.parse().unwrap(),
                },
                account,
                initial_key_id,
            }
        };
        let payee = party("shop-1", 1, "0a01");
        let payer = party("wallet-1", 2, "0a02");
        storage
            .fund(&payer.account, eur(PAYER_FUNDS_MINOR))
            .unwrap();
        Market {
            _dir: dir,
            failing,
            keystore,
            platform,
            payee,
            payer,
        }
    }

    fn eur(minor_units: u64) -> nfcpay_protocol::Amount {
        nfcpay_protocol::Amount::new(minor_units, "EUR".parse().unwrap()).unwrap()
    }

    impl Market {
        /// `plaintext` sealed as half `kind` of `party` under its KSN with `counter`, as the
        /// terminal would (the host's derivation gives the terminal's key).
        fn seal(&self, kind: HalfKind, party: &Party, counter: u32, plaintext: &[u8]) -> Bytes {
            use nfcpay_keystore::dukpt::{TransientKey, working_key};
            use nfcpay_protocol::messages::{HalfEnvelope, HalfHeader};

            let ksn = nfcpay_protocol::Ksn::new(
                party.initial_key_id,
                nfcpay_protocol::TransactionCounter::try_from(counter).unwrap(),
            );
            let store = self.keystore.as_ref();
            let key = working_key(
                store,
                ksn,
                nfcpay_protocol::dukpt::WorkingKeyUsage::DataEncrypt,
                None,
                nfcpay_keystore::KeyPurpose::Encrypt,
            )
            .unwrap();
            let key = TransientKey::new(store, key);
            let header = HalfHeader {
                kind,
                terminal_id: party.client.terminal_id.clone(),
                ksn,
                sent_at_ms: now_ms(),
                nonce: [u8::try_from(counter).unwrap(); nfcpay_keystore::GCM_NONCE_BYTES],
            };
            let aad = header
                .encode(plaintext.len() + nfcpay_keystore::GCM_TAG_BYTES)
                .unwrap();
            let body = store
                .gcm_encrypt(key.handle(), &header.nonce, &aad, plaintext)
                .unwrap();
            Bytes::from(HalfEnvelope::new(header, body).unwrap().encode())
        }

        /// Half A (pending) and half B of a payment of `amount_minor`: the request is
        /// submitted here, half B is returned for the test to send.
        async fn pending_payment(&self, counter: u32, amount_minor: u64) -> (TxnId, Bytes) {
            use nfcpay_protocol::messages::{
                PaymentInstruction, PaymentKind, PaymentRequest, RequestValidity,
            };

            let txn_id = TxnId::try_from([u8::try_from(counter).unwrap(); 16]).unwrap();
            let now = now_ms();
            let request = PaymentRequest {
                txn_id,
                payee_terminal_id: self.payee.client.terminal_id.clone(),
                payee_account_id: self.payee.account.clone(),
                amount: eur(amount_minor),
                kind: PaymentKind::Purchase,
                validity: RequestValidity::new(now, now + 300_000).unwrap(),
                description: "coffee".parse().unwrap(),
            }
            .encode();
            let half_a = self.seal(HalfKind::A, &self.payee, counter, &request);
            let pending = self
                .platform
                .submit_half(
                    HalfKind::A,
                    self.payee.client.clone(),
                    half_a,
                    Duration::ZERO,
                )
                .await
                .unwrap();
            assert!(!pending.settled);
            let instruction = PaymentInstruction::consenting_to(
                &request,
                self.payer.client.terminal_id.clone(),
                self.payer.account.clone(),
                now,
            )
            .unwrap()
            .encode();
            (
                txn_id,
                self.seal(HalfKind::B, &self.payer, counter, &instruction),
            )
        }

        fn balance(&self, party: &Party) -> i64 {
            self.platform
                .storage()
                .account(&party.account)
                .unwrap()
                .balance_minor
        }
    }

    /// The receipt key's signature fails — the HSM refuses (a device error), then the sealing
    /// job panics — right after the ledger commit that settles a payment: the payer is
    /// answered `503 unavailable` saying that the half is recorded (never `500`, never a
    /// refusal), the ledger holds the payment settled once, and the identical bytes sent again,
    /// once the key signs, get the settled receipt without a second settlement.
    #[tokio::test]
    async fn a_receipt_that_cannot_be_sealed_after_the_commit_is_unavailable_and_a_resend_gets_it()
    {
        use nfcpay_protocol::messages::{ReceiptStatus, SealedReceipt};

        let market = market();
        let mut paid_minor = 0;
        for (counter, fault) in [(1, Fault::Fail), (2, Fault::Panic)] {
            let amount_minor = 1_000 * u64::from(counter);
            let (txn_id, half_b) = market.pending_payment(counter, amount_minor).await;
            market.failing.fault_signatures(Some(fault));
            let signatures_before = market.failing.sign_calls();
            let problem = market
                .platform
                .submit_half(
                    HalfKind::B,
                    market.payer.client.clone(),
                    half_b.clone(),
                    Duration::ZERO,
                )
                .await
                .err()
                .unwrap_or_else(|| panic!("{fault:?}: answered although the receipt is unsigned"));
            assert!(
                market.failing.sign_calls() > signatures_before,
                "{fault:?}: the fault was not reached"
            );
            assert_eq!(problem.code(), ProblemCode::Unavailable, "{fault:?}");
            assert_eq!(problem.status(), http::StatusCode::SERVICE_UNAVAILABLE);
            assert!(
                problem.detail().contains("the half is recorded"),
                "{fault:?}: {}",
                problem.detail()
            );
            paid_minor += i64::try_from(amount_minor).unwrap();
            let settled = market
                .platform
                .storage()
                .transaction(&txn_id)
                .unwrap()
                .unwrap();
            assert_eq!(settled.status, TransactionStatus::Settled, "{fault:?}");
            assert_eq!(market.balance(&market.payee), paid_minor, "{fault:?}");

            market.failing.fault_signatures(None);
            let answer = market
                .platform
                .submit_half(
                    HalfKind::B,
                    market.payer.client.clone(),
                    half_b,
                    Duration::ZERO,
                )
                .await
                .unwrap();
            assert!(answer.settled, "{fault:?}");
            let receipt = SealedReceipt::decode(&answer.receipt).unwrap();
            let fields = receipt.receipt().fields();
            assert_eq!(fields.status, ReceiptStatus::Settled);
            assert_eq!(fields.txn_id, txn_id);
            assert_eq!(fields.settlement_id, settled.settlement_id.unwrap());
            // Settled once: the re-send moved no money.
            assert_eq!(market.balance(&market.payee), paid_minor, "{fault:?}");
            assert_eq!(
                market.balance(&market.payer),
                i64::try_from(PAYER_FUNDS_MINOR).unwrap() - paid_minor,
                "{fault:?}"
            );
        }
        assert_eq!(failed(&market.platform, "panicked"), 1);
    }
}
