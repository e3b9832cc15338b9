//! Group commit: writer threads per [`super::Storage`] run every write — one on SQLite (it
//! serialises writes anyway), `[database] writers` (2 by default) on PostgreSQL.
//!
//! Callers hand their work to a bounded queue ([`WRITE_QUEUE_MAX`]) and block on their own
//! reply channel. A writer takes up to [`GROUP_COMMIT_MAX`] queued items and commits them
//! together, and only then answers each one: many settlements share one durable commit. The
//! writers take turns at the queue — one gathers its batch while the others run theirs — so
//! on PostgreSQL one batch's round trips and commit overlap the next one's: two writers of one
//! daemon are two writers in the sense below, each with its own chain.
//!
//! - **Halves** are decided as a set (`batch`): a constant number of statements per batch,
//!   whatever its size.
//! - **Other jobs** (operator actions, expiry) are closures run one after the other, each in its
//!   own savepoint, so a refused job rolls back alone.
//!
//! Each batch appends its audit records to the writer's own chain (`audit`), claimed when the
//! writer first writes and renewed with every batch: writers of several daemons sharing one
//! PostgreSQL never wait for each other except on the rows of the same terminal, payment or
//! account (see `batch`). A batch that loses a race with another writer anyway (a row changed
//! meanwhile, a unique key taken, a deadlock, its chain taken over) is rolled back and run
//! again, at most [`JOB_ATTEMPTS_MAX`] times. A batch of halves that fails for another reason is
//! split and each half run alone, so one half the database refuses cannot fail the others.
//!
//! **Commit delay.** A commit costs about the same for one half as for sixty (a WAL flush, the
//! fixed statements), so while other halves are on their way to the writer (being verified on
//! an HSM worker: see [`HalfComing`]) the writer waits up to `[database] commit_delay_us` for
//! them before it begins, as PostgreSQL's `commit_delay` does for its WAL flush. With none on
//! their way it begins at once: a lone payment never waits.
//!
//! Every wait has a deadline. A caller waits for its commit at most the write timeout
//! (`[database] write_timeout_ms`) and is then answered [`StorageError::Timeout`]; the writer
//! drops unrun what it takes from the queue after its caller's deadline. A batch that fails
//! because its connection broke (the server restarted, crashed, or closed it) is run again on
//! a fresh connection, within the same bound of attempts and its callers' deadline. While one
//! batch waits on the database longer than the write timeout (a frozen server), readiness
//! fails with [`StorageError::WriterStalled`]; when the database answers again the writer
//! carries on where it was.
//!
//! A batch that panics (a bug) is caught: its transaction is rolled back, its callers are
//! answered [`StorageError::BatchPanicked`] (wrapped in [`StorageError::Unavailable`]), and the
//! writer goes on with the next batch. Should the thread stop anyway, `Storage::check_health`
//! fails with [`StorageError::WriterStopped`] and so does `/readyz`.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use diesel::Connection as _;
use diesel::connection::{AnsiTransactionManager, TransactionManager};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;

use super::audit::{self, AuditLog, Chain};
use super::connection::{AnyConnection, ConnectionPool};
use super::model::Submitted;
use super::settlement::{QueuedHalf, Verdict};
use super::sql::Writes;
use super::{StorageError, batch};

/// Items waiting for the writer; beyond this, writes fail fast with [`StorageError::Overloaded`].
pub const WRITE_QUEUE_MAX: usize = 4096;
/// Items sharing one database transaction (one durable commit).
pub const GROUP_COMMIT_MAX: usize = 64;
/// How many times a batch that lost a race with another writer is run.
pub const JOB_ATTEMPTS_MAX: u32 = 8;
/// Pause before running again a batch whose connection broke, times the attempt: the server
/// may be restarting.
const RECONNECT_PAUSE: Duration = Duration::from_millis(50);
/// While lingering for halves on their way, the writer looks this often whether any are left.
const LINGER_POLL: Duration = Duration::from_micros(250);
/// An idle writer renews its chain's lease this often.
const LEASE_RENEW_INTERVAL: Duration =
    Duration::from_millis(audit::CHAIN_LEASE_MS.unsigned_abs() / 3);

/// The writer's figures, for `/metrics`. Cheap to clone; clones share the values.
#[derive(Debug, Clone)]
pub struct WriterMetrics {
    /// Statements per committed batch of halves, `BEGIN` and `COMMIT` included.
    pub statements_per_batch: Histogram,
    /// Halves per committed batch.
    pub halves_per_batch: Histogram,
    /// Batches rolled back and run again after a lost race.
    pub batch_retries: Counter,
    /// Batches that panicked (a bug), rolled back and answered as unavailable.
    pub batch_panics: Counter,
    /// Seconds from a batch of halves' `BEGIN` to its durable `COMMIT` (the attempt that
    /// committed).
    pub batch_commit_seconds: Histogram,
}

impl Default for WriterMetrics {
    fn default() -> Self {
        Self {
            statements_per_batch: Histogram::new([4.0, 8.0, 12.0, 16.0, 20.0, 32.0, 64.0, 128.0]),
            halves_per_batch: Histogram::new([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]),
            // 250 µs to about 4 s: an fsync on a fast disk up to a database in trouble.
            batch_commit_seconds: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.000_25, 2.0, 15),
            ),
            batch_retries: Counter::default(),
            batch_panics: Counter::default(),
        }
    }
}

/// Where the test hook [`CommitHold`] stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HoldPhase {
    /// Batches commit as soon as they are written.
    Off,
    /// The next batch stops before its commit.
    Armed,
    /// A batch is stopped before its commit, its rows locked.
    Holding,
}

type HoldState = Arc<(Mutex<HoldPhase>, Condvar)>;

/// Test hook: while this guard lives, the writer's next batch stops after writing and before
/// committing, holding its transaction (and its locks) open; dropping the guard lets it commit.
/// It shows that another writer on the same database is not blocked by an open batch.
#[must_use = "the batch commits when the guard is dropped"]
pub struct CommitHold {
    state: HoldState,
}

impl CommitHold {
    /// Waits until a batch is stopped before its commit; `false` if none is within `timeout`.
    pub fn wait_until_holding(&self, timeout: Duration) -> bool {
        let (phase, changed) = &*self.state;
        let guard = phase
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let (guard, _) = changed
            .wait_timeout_while(guard, timeout, |phase| *phase != HoldPhase::Holding)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *guard == HoldPhase::Holding
    }
}

impl Drop for CommitHold {
    fn drop(&mut self) {
        let (phase, changed) = &*self.state;
        *phase
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = HoldPhase::Off;
        changed.notify_all();
    }
}

/// Stops here, before a commit, while a [`CommitHold`] is armed.
fn hold_if_armed(state: &HoldState) {
    let (phase, changed) = &**state;
    let mut guard = phase
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if *guard != HoldPhase::Armed {
        return;
    }
    *guard = HoldPhase::Holding;
    changed.notify_all();
    let _released = changed
        .wait_while(guard, |phase| *phase == HoldPhase::Holding)
        .unwrap_or_else(|poisoned| poisoned.into_inner());
}

/// Test hook: a fault the writer's next batch suffers, to show how the writer and readiness
/// respond to a bug.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[doc(hidden)]
#[repr(u8)]
pub enum WriterFault {
    /// None (the normal case).
    None = 0,
    /// The next batch panics after writing, before its commit: caught, rolled back.
    PanicInBatch = 1,
    /// The thread panics when it takes the next item, outside any batch: the writer stops.
    StopThread = 2,
}

/// Where [`WriterFault`] is armed; shared by the handle and the thread.
type FaultState = Arc<AtomicU8>;

/// Takes the armed fault, if it is `fault`, and disarms it.
fn take_fault(state: &FaultState, fault: WriterFault) -> bool {
    state
        .compare_exchange(
            fault as u8,
            WriterFault::None as u8,
            Ordering::SeqCst,
            Ordering::SeqCst,
        )
        .is_ok()
}

/// A closure job, run in a savepoint.
trait Job: Send {
    /// Runs the work; on success keeps its value for [`Job::answer`].
    fn run(
        &mut self,
        connection: &mut AnyConnection,
        audit: &mut AuditLog,
    ) -> Result<(), StorageError>;
    /// Sends the caller its answer: the kept value if `outcome` is `Ok`, else the error.
    fn answer(self: Box<Self>, outcome: Result<(), StorageError>);
}

struct TypedJob<T, F> {
    work: F,
    value: Option<T>,
    reply: SyncSender<Result<T, StorageError>>,
}

impl<T, F> Job for TypedJob<T, F>
where
    T: Send,
    F: FnMut(&mut AnyConnection, &mut AuditLog) -> Result<T, StorageError> + Send,
{
    fn run(
        &mut self,
        connection: &mut AnyConnection,
        audit: &mut AuditLog,
    ) -> Result<(), StorageError> {
        self.value = Some((self.work)(connection, audit)?);
        Ok(())
    }

    fn answer(self: Box<Self>, outcome: Result<(), StorageError>) {
        let Self { value, reply, .. } = *self;
        let answer = outcome.and_then(|()| {
            value.ok_or_else(|| StorageError::corrupt("a job succeeded without a value"))
        });
        // The caller may have gone away; then nobody needs the answer.
        let _ = reply.send(answer);
    }
}

/// A half waiting for its group commit.
struct HalfItem {
    queued: QueuedHalf,
    reply: HalfReply,
    /// When its caller stops waiting.
    deadline: Instant,
}

/// Where a half's caller waits: on a blocking thread, or in an async task that holds no thread
/// while the batch commits.
enum HalfReply {
    Blocking(SyncSender<Result<Submitted, StorageError>>),
    Async(tokio::sync::oneshot::Sender<Result<Submitted, StorageError>>),
}

impl HalfItem {
    fn answer(self, answer: Result<Submitted, StorageError>) {
        // The caller may have gone away; then nobody needs the answer.
        match self.reply {
            HalfReply::Blocking(reply) => {
                let _ = reply.send(answer);
            }
            HalfReply::Async(reply) => {
                let _ = reply.send(answer);
            }
        }
    }
}

// Nearly every item is a half: boxing it to shrink the rare job would allocate once per half.
#[allow(clippy::large_enum_variant)]
enum Item {
    /// A closure job and when its caller stops waiting.
    Job(Box<dyn Job>, Instant),
    Half(HalfItem),
}

impl Item {
    fn deadline(&self) -> Instant {
        match self {
            Self::Job(_, deadline) => *deadline,
            Self::Half(half) => half.deadline,
        }
    }

    /// Answers its caller [`StorageError::WriterStopped`], without running its work.
    fn stop(self) {
        match self {
            Self::Job(job, _) => job.answer(Err(StorageError::WriterStopped)),
            Self::Half(half) => half.answer(Err(StorageError::WriterStopped)),
        }
    }

    /// Answers a caller who has stopped waiting, without running its work.
    fn expire(self, waited_ms: u64) {
        let error = || StorageError::Timeout {
            what: "write",
            waited_ms,
        };
        match self {
            Self::Job(job, _) => job.answer(Err(error())),
            Self::Half(half) => half.answer(Err(error())),
        }
    }
}

/// What the writer takes from the queue for one commit.
#[derive(Default)]
struct Batch {
    jobs: Vec<(Box<dyn Job>, Instant)>,
    halves: Vec<HalfItem>,
    /// The earliest deadline of the items taken.
    first_deadline: Option<Instant>,
}

impl Batch {
    fn len(&self) -> usize {
        self.jobs.len() + self.halves.len()
    }

    /// Takes `item`, or answers it `Timeout` (after `waited_ms`) if its caller has given up.
    fn take(&mut self, item: Item, waited_ms: u64) {
        let deadline = item.deadline();
        if deadline <= Instant::now() {
            // Its caller has been answered `Timeout` already: running it now would only
            // commit what nobody waits for.
            return item.expire(waited_ms);
        }
        self.first_deadline = Some(self.first_deadline.map_or(deadline, |d| d.min(deadline)));
        match item {
            Item::Job(job, deadline) => self.jobs.push((job, deadline)),
            Item::Half(half) => self.halves.push(half),
        }
    }
}

/// Since when the writer has been inside one batch, for readiness: milliseconds since the
/// writer started, plus one; 0 while it waits for work.
#[derive(Clone)]
struct Busy {
    started: Instant,
    since: Arc<AtomicU64>,
}

impl Busy {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            since: Arc::new(AtomicU64::new(0)),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis())
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1)
    }

    fn enter(&self) {
        self.since.store(self.now(), Ordering::SeqCst);
    }

    fn leave(&self) {
        self.since.store(0, Ordering::SeqCst);
    }

    /// How long the current batch has run; zero while idle.
    fn elapsed(&self) -> Duration {
        match self.since.load(Ordering::SeqCst) {
            0 => Duration::ZERO,
            since => Duration::from_millis(self.now().saturating_sub(since)),
        }
    }
}

/// A half on its way to the writer (being verified), which the writer may wait for so that it
/// shares the next commit. Drop it once the half is queued, or refused before it was.
#[must_use = "the half counts as coming until this is dropped"]
pub struct HalfComing {
    coming: Arc<AtomicUsize>,
}

impl Drop for HalfComing {
    fn drop(&mut self) {
        self.coming.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The handle callers use; dropping it lets the threads finish the queue and stop.
pub(crate) struct Writer {
    queue: Option<SyncSender<Item>>,
    coming: Arc<AtomicUsize>,
    threads: Vec<JoinHandle<()>>,
    /// Set when a writer thread has stopped: the others stop too (see [`Stopping`]).
    stopped: Arc<AtomicBool>,
    metrics: WriterMetrics,
    hold: HoldState,
    fault: FaultState,
    busy: Vec<Busy>,
    write_timeout: Duration,
}

/// Marks the writers stopped when a writer thread ends, by a panic outside a batch included:
/// the others then stop as well, answering what they take [`StorageError::WriterStopped`], so
/// that the daemon is seen not ready and restarted rather than running on part of its writers.
struct Stopping(Arc<AtomicBool>);

impl Drop for Stopping {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

impl Writer {
    /// Starts `writers` writer threads (at least one); each write waits at most
    /// `write_timeout` for its commit, and a batch of halves waits at most `commit_delay` for
    /// the halves still on their way.
    pub(crate) fn start(
        pool: ConnectionPool,
        writers: usize,
        write_timeout: Duration,
        commit_delay: Duration,
    ) -> std::io::Result<Self> {
        let (queue, items) = mpsc::sync_channel(WRITE_QUEUE_MAX);
        let items = Arc::new(Mutex::new(items));
        let coming = Arc::new(AtomicUsize::new(0));
        let stopped = Arc::new(AtomicBool::new(false));
        let metrics = WriterMetrics::default();
        let hold: HoldState = Arc::new((Mutex::new(HoldPhase::Off), Condvar::new()));
        let fault: FaultState = Arc::new(AtomicU8::new(WriterFault::None as u8));
        let mut threads = Vec::with_capacity(writers.max(1));
        let mut busy = Vec::with_capacity(writers.max(1));
        for index in 0..writers.max(1) {
            let mut state = WriterState {
                busy: Busy::new(),
                write_timeout,
                commit_delay,
                idle_wait: LEASE_RENEW_INTERVAL / u32::try_from(writers.max(1)).unwrap_or(1),
                coming: Arc::clone(&coming),
                stopped: Arc::clone(&stopped),
                pool: pool.clone(),
                chain: None,
                owner: chain_owner(),
                renewed_at: Instant::now(),
                metrics: metrics.clone(),
                hold: Arc::clone(&hold),
                fault: Arc::clone(&fault),
            };
            busy.push(state.busy.clone());
            let items = Arc::clone(&items);
            threads.push(
                std::thread::Builder::new()
                    .name(format!("nfcpay-ledger-writer-{index}"))
                    .spawn(move || {
                        let _stopping = Stopping(Arc::clone(&state.stopped));
                        state.run(&items);
                    })?,
            );
        }
        Ok(Self {
            queue: Some(queue),
            coming,
            threads,
            stopped,
            metrics,
            hold,
            fault,
            busy,
            write_timeout,
        })
    }

    /// How long the longest-running writer has been inside its current batch (zero while all
    /// are idle).
    pub(crate) fn busy_for(&self) -> Duration {
        self.busy
            .iter()
            .map(Busy::elapsed)
            .max()
            .unwrap_or(Duration::ZERO)
    }

    /// How long a write waits for its commit.
    pub(crate) fn write_timeout(&self) -> Duration {
        self.write_timeout
    }

    /// Whether the writer threads still run: `false` once one has stopped (panicked outside a
    /// batch), after which every write fails [`StorageError::WriterStopped`].
    pub(crate) fn is_running(&self) -> bool {
        !self.stopped.load(Ordering::SeqCst)
            && !self.threads.is_empty()
            && self.threads.iter().all(|thread| !thread.is_finished())
    }

    /// Arms the test hook [`WriterFault`] for the next batch.
    pub(crate) fn inject_fault(&self, fault: WriterFault) {
        self.fault.store(fault as u8, Ordering::SeqCst);
    }

    /// Arms the test hook [`CommitHold`].
    pub(crate) fn hold_next_commit(&self) -> CommitHold {
        let (phase, _) = &*self.hold;
        *phase
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = HoldPhase::Armed;
        CommitHold {
            state: Arc::clone(&self.hold),
        }
    }

    /// Counts a half as on its way until the returned guard is dropped.
    pub(crate) fn half_coming(&self) -> HalfComing {
        self.coming.fetch_add(1, Ordering::SeqCst);
        HalfComing {
            coming: Arc::clone(&self.coming),
        }
    }

    /// The writer's figures.
    pub(crate) fn metrics(&self) -> &WriterMetrics {
        &self.metrics
    }

    /// Runs `work` in the next group commit and waits until that commit is durable.
    ///
    /// `work` may run more than once (after a lost race, in a fresh transaction), so it must
    /// not have effects outside the connection and the audit log it is given.
    pub(crate) fn write<T, F>(&self, work: F) -> Result<T, StorageError>
    where
        T: Send + 'static,
        F: FnMut(&mut AnyConnection, &mut AuditLog) -> Result<T, StorageError> + Send + 'static,
    {
        let (reply, answer) = mpsc::sync_channel(1);
        let deadline = Instant::now() + self.write_timeout;
        self.enqueue(Item::Job(
            Box::new(TypedJob {
                work,
                value: None,
                reply,
            }),
            deadline,
        ))?;
        self.wait(&answer, deadline)
    }

    /// Decides `half` in the next group commit and waits until that commit is durable.
    pub(crate) fn submit_half(&self, queued: QueuedHalf) -> Result<Submitted, StorageError> {
        let (reply, answer) = mpsc::sync_channel(1);
        let deadline = Instant::now() + self.write_timeout;
        self.enqueue(Item::Half(HalfItem {
            queued,
            reply: HalfReply::Blocking(reply),
            deadline,
        }))?;
        self.wait(&answer, deadline)
    }

    /// [`Writer::submit_half`] for async callers: queues `half` at once (or refuses it) and
    /// returns the wait for its commit, which holds no thread.
    pub(crate) fn submit_half_async(
        &self,
        queued: QueuedHalf,
    ) -> impl Future<Output = Result<Submitted, StorageError>> + Send + use<> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let deadline = Instant::now() + self.write_timeout;
        let write_timeout = self.write_timeout;
        let queued = self.enqueue(Item::Half(HalfItem {
            queued,
            reply: HalfReply::Async(reply),
            deadline,
        }));
        async move {
            queued?;
            match tokio::time::timeout_at(deadline.into(), answer).await {
                Ok(Ok(answer)) => answer,
                Ok(Err(_)) => Err(StorageError::WriterStopped),
                Err(_) => Err(StorageError::Timeout {
                    what: "write",
                    waited_ms: millis(write_timeout),
                }),
            }
        }
    }

    /// Waits for the writer's answer until `deadline`.
    fn wait<T>(
        &self,
        answer: &Receiver<Result<T, StorageError>>,
        deadline: Instant,
    ) -> Result<T, StorageError> {
        match answer.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(answer) => answer,
            Err(RecvTimeoutError::Timeout) => Err(StorageError::Timeout {
                what: "write",
                waited_ms: millis(self.write_timeout),
            }),
            Err(RecvTimeoutError::Disconnected) => Err(StorageError::WriterStopped),
        }
    }

    fn enqueue(&self, item: Item) -> Result<(), StorageError> {
        let queue = self.queue.as_ref().ok_or(StorageError::WriterStopped)?;
        queue.try_send(item).map_err(|error| match error {
            TrySendError::Full(_) => StorageError::Overloaded,
            TrySendError::Disconnected(_) => StorageError::WriterStopped,
        })
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        drop(self.queue.take());
        for thread in self.threads.drain(..) {
            // A panicked writer has already failed its callers; nothing more to do.
            let _ = thread.join();
        }
    }
}

/// Names this writer in `audit_chains.lease_owner`: the process and a random tag, so a chain
/// is resumed only by the writer that holds it.
fn chain_owner() -> String {
    let mut tag = [0_u8; 8];
    // Without randomness the tag is zeros: the process ID and the time still tell writers apart.
    let _ = getrandom::fill(&mut tag);
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos());
    format!(
        "pid {} tag {}{:x}",
        std::process::id(),
        hex::encode(tag),
        started & 0xffff
    )
}

struct WriterState {
    busy: Busy,
    write_timeout: Duration,
    /// The most a batch of halves waits for the halves on their way (`coming`).
    commit_delay: Duration,
    /// How long an idle writer holds the queue before it lets the next writer wait there:
    /// the lease's renewal interval shared among the writers, so that each, waiting its turn
    /// at the queue, still gets to renew its lease in time.
    idle_wait: Duration,
    coming: Arc<AtomicUsize>,
    /// Set when any writer thread of this storage has stopped.
    stopped: Arc<AtomicBool>,
    pool: ConnectionPool,
    /// The chain this writer appends to, as of its last commit; `None` until claimed, and
    /// after a failed batch (the next claim resumes it from the database).
    chain: Option<Chain>,
    owner: String,
    renewed_at: Instant,
    metrics: WriterMetrics,
    hold: HoldState,
    fault: FaultState,
}

impl WriterState {
    fn run(&mut self, items: &Mutex<Receiver<Item>>) {
        loop {
            // One writer at a time gathers a batch; the others run theirs meanwhile.
            let queue = items
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let first = match queue.recv_timeout(self.idle_wait) {
                Ok(item) => {
                    if take_fault(&self.fault, WriterFault::StopThread) {
                        tracing::error!("test hook: the ledger writer thread stops");
                        #[allow(clippy::panic)] // the test hook's whole purpose
                        {
                            panic!("test hook: the ledger writer thread stops");
                        }
                    }
                    item
                }
                Err(RecvTimeoutError::Timeout) => {
                    drop(queue);
                    if self.stopped.load(Ordering::SeqCst) {
                        break;
                    }
                    if self.renewed_at.elapsed() >= LEASE_RENEW_INTERVAL {
                        self.busy.enter();
                        self.renew_lease();
                        self.busy.leave();
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break, // every Storage handle is gone
            };
            if self.stopped.load(Ordering::SeqCst) {
                // Another writer has stopped: so does this one, and the daemon is not ready.
                first.stop();
                break;
            }
            let mut batch = Batch::default();
            let waited_ms = millis(self.write_timeout);
            batch.take(first, waited_ms);
            while batch.len() < GROUP_COMMIT_MAX {
                match queue.try_recv() {
                    Ok(item) => batch.take(item, waited_ms),
                    Err(_) => break,
                }
            }
            self.linger(&queue, &mut batch);
            drop(queue);
            let Batch { jobs, halves, .. } = batch;
            self.busy.enter();
            if !jobs.is_empty() {
                self.run_jobs(jobs);
            }
            if !halves.is_empty() {
                self.run_halves(halves);
            }
            if self.renewed_at.elapsed() >= LEASE_RENEW_INTERVAL {
                self.renew_lease();
            }
            self.busy.leave();
        }
        self.release_chain();
    }

    /// Waits for the halves on their way to join `batch`, at most the commit delay and half
    /// the time left to a caller's deadline; stops as soon as none is left on its way or the
    /// batch is full.
    fn linger(&self, items: &Receiver<Item>, batch: &mut Batch) {
        let Some(first_deadline) = batch.first_deadline else {
            return;
        };
        if batch.halves.is_empty() || self.commit_delay.is_zero() {
            return;
        }
        // Never more than half of what is left of the most hurried caller's wait: the batch
        // still has to commit within it.
        let now = Instant::now();
        let until =
            (now + self.commit_delay).min(now + first_deadline.saturating_duration_since(now) / 2);
        let waited_ms = millis(self.write_timeout);
        while batch.len() < GROUP_COMMIT_MAX && self.coming.load(Ordering::SeqCst) > 0 {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match items.recv_timeout(left.min(LINGER_POLL)) {
                Ok(item) => batch.take(item, waited_ms),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
    }

    /// Whether a batch that failed with `error` on its `attempt` is run again: after a lost
    /// race, or a broken connection while a caller still waits (after a pause that grows with
    /// the attempt). A commit in doubt is run again only for `idempotent` work (halves).
    fn run_again(
        &self,
        error: &StorageError,
        attempt: u32,
        deadline: Instant,
        idempotent: bool,
    ) -> bool {
        if attempt >= JOB_ATTEMPTS_MAX {
            return false;
        }
        if error.is_retryable() {
            return true;
        }
        let broken = error.is_connection_lost()
            || (idempotent && matches!(error, StorageError::CommitInDoubt(_)));
        if !broken || Instant::now() >= deadline {
            return false;
        }
        tracing::warn!(
            error = nfcpay_protocol::ErrorChain(error).to_string(),
            attempt,
            "the ledger writer's database connection broke; running the batch again on a new one"
        );
        std::thread::sleep(RECONNECT_PAUSE * attempt);
        true
    }

    /// One transaction for the closure jobs, one savepoint each.
    fn run_jobs(&mut self, jobs: Vec<(Box<dyn Job>, Instant)>) {
        let deadline = jobs
            .iter()
            .map(|(_, deadline)| *deadline)
            .max()
            .unwrap_or_else(Instant::now);
        let mut jobs: Vec<Box<dyn Job>> = jobs.into_iter().map(|(job, _)| job).collect();
        let mut attempt = 1;
        loop {
            let mut outcomes = Vec::with_capacity(jobs.len());
            let committed = self.in_transaction(|connection, chain| {
                outcomes.clear();
                let mut audit = AuditLog::default();
                for job in &mut jobs {
                    let mut records = AuditLog::default();
                    let outcome =
                        connection.transaction(|savepoint| job.run(savepoint, &mut records));
                    match outcome {
                        // Not the job's fault: the whole batch fails (and may run again).
                        Err(error)
                            if error.is_retryable()
                                || error.is_connection_lost()
                                || error.is_server_timeout() =>
                        {
                            return Err(error);
                        }
                        Ok(()) => audit.append(&mut records),
                        Err(_) => {}
                    }
                    outcomes.push(outcome);
                }
                let mut statements = 0;
                audit::append(connection, chain, &audit, now_ms(), &mut statements)
            });
            match committed {
                Ok(()) => {
                    for (job, outcome) in jobs.into_iter().zip(outcomes) {
                        job.answer(outcome);
                    }
                    return;
                }
                Err(error) if self.run_again(&error, attempt, deadline, false) => {
                    self.metrics.batch_retries.inc();
                    attempt += 1;
                }
                Err(error) => {
                    // Nothing of the batch is written; refusals stay refusals.
                    let cause = Arc::new(error);
                    let mut outcomes = outcomes.into_iter();
                    for job in jobs {
                        job.answer(match outcomes.next() {
                            Some(Err(refusal)) => Err(refusal),
                            _ => Err(StorageError::Unavailable(Arc::clone(&cause))),
                        });
                    }
                    return;
                }
            }
        }
    }

    /// The halves as one set: read, decide, write, append the audit records, commit.
    fn run_halves(&mut self, halves: Vec<HalfItem>) {
        let queued: Vec<QueuedHalf> = halves.iter().map(|item| item.queued.clone()).collect();
        let deadline = halves
            .iter()
            .map(|item| item.deadline)
            .max()
            .unwrap_or_else(Instant::now);
        let mut attempt = 1;
        let result = loop {
            let mut statements = 2; // BEGIN, COMMIT
            let started = std::time::Instant::now();
            let committed = self.in_transaction(|connection, chain| {
                let mut batch = batch::read(connection, &queued, &mut statements)?;
                let verdicts: Vec<Result<Verdict, StorageError>> =
                    queued.iter().map(|half| batch.decide(half)).collect();
                let mut audit = AuditLog::default();
                // Everything but the transfers goes as one combined write (one statement on
                // PostgreSQL), the audit append included.
                let mut writes = Writes::default();
                batch::write(
                    connection,
                    &mut batch,
                    &mut audit,
                    &mut writes,
                    &mut statements,
                )?;
                let head = audit::queue_append(&mut writes, chain, &audit, now_ms());
                statements += writes.statements_on(connection);
                writes.execute_in(connection)?;
                let answers: Vec<Result<Submitted, StorageError>> = verdicts
                    .into_iter()
                    .map(|verdict| verdict.and_then(|verdict| batch.submitted(verdict)))
                    .collect();
                Ok((answers, head))
            });
            match committed {
                Ok(answers) => {
                    self.metrics
                        .statements_per_batch
                        .observe(f64::from(statements));
                    self.metrics.halves_per_batch.observe(queued.len() as f64);
                    self.metrics
                        .batch_commit_seconds
                        .observe(started.elapsed().as_secs_f64());
                    break Ok(answers);
                }
                Err(error) if self.run_again(&error, attempt, deadline, true) => {
                    self.metrics.batch_retries.inc();
                    attempt += 1;
                }
                Err(error) => break Err(error),
            }
        };
        match result {
            Ok(answers) => {
                for (item, answer) in halves.into_iter().zip(answers) {
                    item.answer(answer);
                }
            }
            Err(error) if halves.len() > 1 && error.is_statement_refused() => {
                tracing::warn!(%error, halves = halves.len(), "a batch of halves failed; running each alone");
                for item in halves {
                    self.run_halves(vec![item]);
                }
            }
            Err(error) => {
                let cause = Arc::new(error);
                for item in halves {
                    item.answer(Err(StorageError::Unavailable(Arc::clone(&cause))));
                }
            }
        }
    }

    /// Runs `work` in one database transaction holding the writer's chain; adopts the chain
    /// head `work` returns once the commit is durable. On any failure the chain is forgotten,
    /// to be claimed again (resumed) from the database before the next batch.
    fn in_transaction<T>(
        &mut self,
        work: impl FnOnce(&mut AnyConnection, &Chain) -> Result<T, StorageError>,
    ) -> Result<T::Value, StorageError>
    where
        T: WithHead,
    {
        let mut connection = self.pool.get().map_err(StorageError::Pool)?;
        let connection: &mut AnyConnection = &mut connection;
        let chain = match self.chain.take() {
            Some(chain) => chain,
            None => claim(connection, &self.owner)?,
        };
        begin(connection)?;
        // A panic in the work (a bug) fails this batch only: caught, rolled back, answered.
        // Nothing the work touched outlives it except the connection, rolled back below, and
        // the chain, dropped (claimed again from the database before the next batch).
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            let outcome = work(connection, &chain);
            if take_fault(&self.fault, WriterFault::PanicInBatch) {
                #[allow(clippy::panic)] // the test hook's whole purpose
                {
                    panic!("test hook: a ledger writer batch panics");
                }
            }
            outcome
        }))
        .unwrap_or_else(|_| {
            self.metrics.batch_panics.inc();
            tracing::error!(
                "a ledger writer batch panicked: rolled back, its callers answered unavailable; \
                 the writer carries on"
            );
            Err(StorageError::BatchPanicked)
        });
        let value = match outcome {
            Ok(value) => value,
            Err(error) => {
                roll_back_all(connection);
                return Err(error);
            }
        };
        hold_if_armed(&self.hold);
        AnyConnection::commit_transaction(connection).map_err(commit_failed)?;
        let (value, head) = value.split();
        self.chain = Some(chain.advanced(head));
        self.renewed_at = Instant::now();
        Ok(value)
    }

    /// Moves an idle writer's lease forward (an empty append).
    fn renew_lease(&mut self) {
        if self.chain.is_none() {
            return;
        }
        let renewed = self.in_transaction(|connection, chain| {
            let mut statements = 0;
            audit::append(
                connection,
                chain,
                &AuditLog::default(),
                now_ms(),
                &mut statements,
            )
        });
        if let Err(error) = renewed {
            tracing::warn!(%error, "could not renew the audit chain's lease");
        }
    }

    /// Gives the chain up when the writer stops, so the next writer resumes it at once.
    fn release_chain(&mut self) {
        let Some(chain) = self.chain.take() else {
            return;
        };
        let released = self
            .pool
            .get()
            .map_err(StorageError::Pool)
            .and_then(|mut connection| audit::release(&mut connection, &chain));
        if let Err(error) = released {
            tracing::warn!(%error, "could not release the audit chain");
        }
    }
}

/// What a transaction's work returns: a value and the chain's new head.
trait WithHead {
    type Value;
    fn split(self) -> (Self::Value, super::model::ChainHead);
}

impl<T> WithHead for (T, super::model::ChainHead) {
    type Value = T;
    fn split(self) -> (T, super::model::ChainHead) {
        self
    }
}

impl WithHead for super::model::ChainHead {
    type Value = ();
    fn split(self) -> ((), super::model::ChainHead) {
        ((), self)
    }
}

/// Claims a chain in a transaction of its own, retrying when another writer claims the same
/// chain at the same moment.
fn claim(connection: &mut AnyConnection, owner: &str) -> Result<Chain, StorageError> {
    let mut attempt = 1;
    loop {
        begin(connection)?;
        let claimed = audit::claim(connection, owner, now_ms());
        let outcome = match claimed {
            Ok(chain) => AnyConnection::commit_transaction(connection)
                .map(|()| chain)
                .map_err(StorageError::from),
            Err(error) => {
                let _ = AnyConnection::rollback_transaction(connection);
                Err(error)
            }
        };
        match outcome {
            Err(error) if error.is_retryable() && attempt < audit::claim_attempts_max() => {
                attempt += 1;
            }
            outcome => return outcome,
        }
    }
}

/// Rolls back every open transaction level: after a panic a job's savepoint may still be open
/// above the batch's transaction. A connection left inside a transaction is one the pool
/// discards instead of handing out again.
fn roll_back_all(connection: &mut AnyConnection) {
    type Manager = <AnyConnection as diesel::Connection>::TransactionManager;
    // Each round closes one level or stops; a transaction is never this deep.
    for _ in 0..TRANSACTION_DEPTH_MAX {
        let open = matches!(
            Manager::transaction_manager_status_mut(connection).transaction_depth(),
            Ok(Some(_))
        );
        if !open || Manager::rollback_transaction(connection).is_err() {
            return;
        }
    }
}

/// Deepest transaction nesting [`roll_back_all`] unwinds: the batch and a job's savepoint.
const TRANSACTION_DEPTH_MAX: usize = 4;

/// Opens a transaction; on SQLite it takes the database's write lock at once, so the reads of
/// a batch see what it will write over.
fn begin(connection: &mut AnyConnection) -> Result<(), StorageError> {
    match connection {
        AnyConnection::Sqlite(sqlite) => {
            AnsiTransactionManager::begin_transaction_sql(sqlite, "BEGIN IMMEDIATE")?;
        }
        AnyConnection::Postgresql(postgres) => {
            AnsiTransactionManager::begin_transaction(postgres)?;
        }
    }
    Ok(())
}

/// A commit's error: [`StorageError::CommitInDoubt`] when the connection broke.
fn commit_failed(error: diesel::result::Error) -> StorageError {
    match StorageError::from(error) {
        error if !error.is_connection_lost() => error,
        StorageError::Database(cause) => StorageError::CommitInDoubt(cause),
        other => other,
    }
}

/// A duration in whole milliseconds, for messages.
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Milliseconds since the Unix epoch (lease times).
fn now_ms() -> i64 {
    super::now_ms()
}
