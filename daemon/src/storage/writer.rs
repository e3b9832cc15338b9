//! Group commit: one writer thread per [`super::Storage`] runs every write.
//!
//! Callers hand a job to a bounded queue ([`WRITE_QUEUE_MAX`]) and block on their own reply
//! channel. The writer takes up to [`GROUP_COMMIT_MAX`] queued jobs, opens one database
//! transaction, runs each job inside its own savepoint (a refused job rolls back alone), commits
//! once, and only then answers every job: many settlements share one durable commit.
//!
//! A batch first takes the database's write lock — `BEGIN IMMEDIATE` on SQLite, the
//! `audit_head` row lock on PostgreSQL — so batches of several daemons sharing one database
//! never interleave or deadlock, and the audit chain stays linear. A job that loses a race
//! anyway (a unique key taken meanwhile, a serialization failure) is run again in the next
//! batch, at most [`JOB_ATTEMPTS_MAX`] times.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::thread::JoinHandle;

use diesel::Connection as _;
use diesel::connection::{AnsiTransactionManager, SimpleConnection as _, TransactionManager};

use super::StorageError;
use super::connection::{AnyConnection, ConnectionPool};

/// Jobs waiting for the writer; beyond this, writes fail fast with [`StorageError::Overloaded`].
pub const WRITE_QUEUE_MAX: usize = 4096;
/// Jobs sharing one database transaction (one durable commit).
pub const GROUP_COMMIT_MAX: usize = 64;
/// How many times a job that lost a race with another writer is run.
pub const JOB_ATTEMPTS_MAX: u32 = 8;

/// A unit of work the writer runs in a savepoint.
trait Job: Send {
    /// Runs the work; on success keeps its value for [`Job::answer`].
    fn run(&mut self, connection: &mut AnyConnection) -> Result<(), StorageError>;
    /// Sends the caller its answer: the kept value if `outcome` is `Ok`, else the error.
    fn answer(self: Box<Self>, outcome: Result<(), StorageError>);
    /// Counts one more attempt; returns whether another is allowed.
    fn may_retry(&mut self) -> bool;
}

struct TypedJob<T, F> {
    work: F,
    value: Option<T>,
    reply: SyncSender<Result<T, StorageError>>,
    attempts: u32,
}

impl<T, F> Job for TypedJob<T, F>
where
    T: Send,
    F: FnMut(&mut AnyConnection) -> Result<T, StorageError> + Send,
{
    fn run(&mut self, connection: &mut AnyConnection) -> Result<(), StorageError> {
        self.value = Some((self.work)(connection)?);
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

    fn may_retry(&mut self) -> bool {
        self.attempts += 1;
        self.attempts < JOB_ATTEMPTS_MAX
    }
}

/// The handle callers use; dropping it lets the thread finish the queue and stop.
pub(crate) struct Writer {
    queue: Option<SyncSender<Box<dyn Job>>>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    /// Starts the writer thread.
    pub(crate) fn start(pool: ConnectionPool) -> std::io::Result<Self> {
        let (queue, jobs) = mpsc::sync_channel(WRITE_QUEUE_MAX);
        let thread = std::thread::Builder::new()
            .name("nfcpay-ledger-writer".into())
            .spawn(move || run(&pool, &jobs))?;
        Ok(Self {
            queue: Some(queue),
            thread: Some(thread),
        })
    }

    /// Runs `work` in the next group commit and waits until that commit is durable.
    ///
    /// `work` may run more than once (after a lost race, in a fresh savepoint), so it must not
    /// have effects outside the connection.
    pub(crate) fn write<T, F>(&self, work: F) -> Result<T, StorageError>
    where
        T: Send + 'static,
        F: FnMut(&mut AnyConnection) -> Result<T, StorageError> + Send + 'static,
    {
        let queue = self.queue.as_ref().ok_or(StorageError::WriterStopped)?;
        let (reply, answer) = mpsc::sync_channel(1);
        let job = Box::new(TypedJob {
            work,
            value: None,
            reply,
            attempts: 0,
        });
        queue.try_send(job).map_err(|error| match error {
            TrySendError::Full(_) => StorageError::Overloaded,
            TrySendError::Disconnected(_) => StorageError::WriterStopped,
        })?;
        answer.recv().map_err(|_| StorageError::WriterStopped)?
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        drop(self.queue.take());
        if let Some(thread) = self.thread.take() {
            // A panicked writer has already failed its callers; nothing more to do.
            let _ = thread.join();
        }
    }
}

fn run(pool: &ConnectionPool, jobs: &Receiver<Box<dyn Job>>) {
    let mut again: VecDeque<Box<dyn Job>> = VecDeque::new();
    loop {
        let mut batch: Vec<Box<dyn Job>> = Vec::with_capacity(GROUP_COMMIT_MAX);
        while batch.len() < GROUP_COMMIT_MAX {
            match again.pop_front() {
                Some(job) => batch.push(job),
                None => break,
            }
        }
        if batch.is_empty() {
            match jobs.recv() {
                Ok(job) => batch.push(job),
                Err(_) => return, // every Storage handle is gone
            }
        }
        while batch.len() < GROUP_COMMIT_MAX {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        run_batch(pool, batch, &mut again);
    }
}

/// One database transaction for the whole batch, one savepoint per job.
fn run_batch(pool: &ConnectionPool, batch: Vec<Box<dyn Job>>, again: &mut VecDeque<Box<dyn Job>>) {
    let mut connection = match pool.get() {
        Ok(connection) => connection,
        Err(error) => return fail_all(batch, StorageError::Pool(error)),
    };
    let connection: &mut AnyConnection = &mut connection;
    if let Err(error) = begin(connection) {
        return fail_all(batch, error);
    }
    let mut finished = Vec::with_capacity(batch.len());
    for mut job in batch {
        let outcome = connection.transaction(|savepoint| job.run(savepoint));
        match outcome {
            Err(error) if error.is_retryable() && job.may_retry() => again.push_back(job),
            outcome => finished.push((job, outcome)),
        }
    }
    match AnyConnection::commit_transaction(connection) {
        Ok(()) => {
            for (job, outcome) in finished {
                job.answer(outcome);
            }
        }
        Err(error) => {
            // Nothing of the batch is written; refusals stay refusals.
            let cause = Arc::new(StorageError::Database(error));
            for (job, outcome) in finished {
                job.answer(outcome.and(Err(StorageError::Unavailable(Arc::clone(&cause)))));
            }
        }
    }
}

/// Opens the batch's transaction holding the database's write lock.
fn begin(connection: &mut AnyConnection) -> Result<(), StorageError> {
    match connection {
        AnyConnection::Sqlite(sqlite) => {
            AnsiTransactionManager::begin_transaction_sql(sqlite, "BEGIN IMMEDIATE")?;
        }
        AnyConnection::Postgresql(postgres) => {
            AnsiTransactionManager::begin_transaction(postgres)?;
            let locked =
                postgres.batch_execute("SELECT seq FROM audit_head WHERE id = 1 FOR UPDATE");
            if let Err(error) = locked {
                let _ = AnsiTransactionManager::rollback_transaction(postgres);
                return Err(error.into());
            }
        }
    }
    Ok(())
}

fn fail_all(batch: Vec<Box<dyn Job>>, error: StorageError) {
    let cause = Arc::new(error);
    for job in batch {
        job.answer(Err(StorageError::Unavailable(Arc::clone(&cause))));
    }
}
