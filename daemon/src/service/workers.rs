//! The HSM workers: a few threads that do every keystore call of a half, fed by a bounded queue.
//!
//! A half needs the HSM twice — before the ledger (derive, decrypt, derive the receipt's MAC
//! key) and after it (MAC and sign the receipt) — and waits for the group commit in between.
//! Running all of that on one blocking thread per half parked up to hundreds of threads on the
//! keystore's session pool and on the commit, and the kernel's context switches cost more CPU
//! than the work. Instead, as many workers as the keystore has sessions ([`HSM_WORKERS`]) take
//! HSM jobs from one queue, so a worker always finds a free session, and the wait for the
//! commit is an `.await` that holds no thread.
//!
//! Bounds: at most [`HSM_QUEUE_MAX`] jobs wait (one more is refused at once as
//! [`WorkError::Busy`]), and a caller waits at most its deadline ([`HSM_JOB_TIMEOUT`] on the
//! half's path) before it is answered [`WorkError::TimedOut`]; a job whose caller has stopped
//! waiting is dropped unrun. A job that panics (a bug) answers [`WorkError::Panicked`] and the
//! worker carries on. A stalled HSM therefore costs `503`s after a bounded time, never a
//! growing number of parked threads.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::oneshot;

/// Worker threads: one per PKCS#11 session the keystore keeps open.
pub const HSM_WORKERS: usize = nfcpay_keystore::pkcs11::SESSIONS_MAX;
/// Most HSM jobs waiting for a worker: as many as halves admitted into the pipeline
/// ([`super::HALVES_IN_FLIGHT_MAX`]), so that load alone never fills it.
pub const HSM_QUEUE_MAX: usize = super::HALVES_IN_FLIGHT_MAX;
/// Longest a half waits for one HSM job (queue and work): beyond, the HSM is taken as stalled.
pub const HSM_JOB_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a job gave no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WorkError {
    /// The queue was full.
    #[error("too many HSM jobs are waiting")]
    Busy,
    /// The job did not finish within its deadline (it runs, or is dropped, without its caller).
    #[error("the HSM did not answer within {0:?}")]
    TimedOut(Duration),
    /// The job panicked (a bug).
    #[error("an HSM job panicked")]
    Panicked,
    /// The workers have stopped (the daemon is shutting down).
    #[error("the HSM workers have stopped")]
    Stopped,
}

type Job = Box<dyn FnOnce() + Send>;

thread_local! {
    /// Whether this thread is an HSM worker.
    static ON_WORKER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the calling thread is an HSM worker (where HSM calls belong).
pub fn on_worker() -> bool {
    ON_WORKER.with(std::cell::Cell::get)
}

/// The workers and their queue. Dropping it lets the workers finish the queued jobs and stop.
pub struct HsmWorkers {
    queue: Option<SyncSender<Job>>,
    threads: Vec<JoinHandle<()>>,
}

impl HsmWorkers {
    /// Starts `workers` threads sharing a queue of at most `queue_max` jobs.
    pub fn start(workers: usize, queue_max: usize) -> std::io::Result<Self> {
        let (queue, jobs) = mpsc::sync_channel::<Job>(queue_max);
        let jobs = Arc::new(Mutex::new(jobs));
        let mut threads = Vec::with_capacity(workers);
        for index in 0..workers.max(1) {
            let jobs = Arc::clone(&jobs);
            threads.push(
                std::thread::Builder::new()
                    .name(format!("nfcpay-hsm-{index}"))
                    .spawn(move || work(&jobs))?,
            );
        }
        Ok(Self {
            queue: Some(queue),
            threads,
        })
    }

    /// Runs `job` on a worker and waits for its answer at most `timeout`.
    pub async fn run<T, F>(&self, timeout: Duration, job: F) -> Result<T, WorkError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        self.submit(job)?.wait(timeout).await
    }

    /// Queues `job` now (or refuses it at once); its answer comes through the returned handle.
    pub fn submit<T, F>(&self, job: F) -> Result<Answer<T>, WorkError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (answer, answered) = oneshot::channel();
        let job: Job = Box::new(move || {
            // The caller gave up while the job waited: nothing to do (dropping `job` drops
            // what it owns, transient keys included, which destroys them).
            if answer.is_closed() {
                return;
            }
            let result = catch_unwind(AssertUnwindSafe(job)).map_err(|_| WorkError::Panicked);
            // The caller may have gone meanwhile; the result is then dropped here.
            let _ = answer.send(result);
        });
        let queue = self.queue.as_ref().ok_or(WorkError::Stopped)?;
        queue.try_send(job).map_err(|error| match error {
            TrySendError::Full(_) => WorkError::Busy,
            TrySendError::Disconnected(_) => WorkError::Stopped,
        })?;
        Ok(Answer { answered })
    }
}

/// The answer to come of a queued job.
pub struct Answer<T> {
    answered: oneshot::Receiver<Result<T, WorkError>>,
}

impl<T> Answer<T> {
    /// Waits for the job's answer at most `timeout`; after that the job runs (or is dropped
    /// unrun) without its caller.
    pub async fn wait(self, timeout: Duration) -> Result<T, WorkError> {
        match tokio::time::timeout(timeout, self.answered).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(WorkError::Stopped),
            Err(_) => Err(WorkError::TimedOut(timeout)),
        }
    }
}

impl Drop for HsmWorkers {
    fn drop(&mut self) {
        drop(self.queue.take());
        for thread in self.threads.drain(..) {
            // A worker catches its jobs' panics; one that stopped anyway has nothing to add.
            let _ = thread.join();
        }
    }
}

/// A worker's loop: one job at a time until the queue is closed and empty.
fn work(jobs: &Mutex<Receiver<Job>>) {
    ON_WORKER.with(|on| on.set(true));
    loop {
        // The lock is held only while waiting for the next job, never while running one.
        let next = jobs.lock().unwrap_or_else(PoisonError::into_inner).recv();
        match next {
            Ok(job) => job(),
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    // A panic is how a test fails.
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::sync::Barrier;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    const LONG: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn jobs_run_on_the_workers_and_answer() {
        let workers = HsmWorkers::start(2, 8).unwrap();
        let name = workers
            .run(LONG, || std::thread::current().name().map(str::to_owned))
            .await
            .unwrap();
        assert!(name.unwrap().starts_with("nfcpay-hsm-"));
        assert_eq!(workers.run(LONG, || 6 * 7).await, Ok(42));
    }

    /// Queues a job that holds the only worker until `gate` is passed, and returns once the
    /// worker runs it.
    fn hold_the_worker(workers: &HsmWorkers, gate: &Arc<Barrier>) -> Answer<()> {
        let (started, running) = std::sync::mpsc::channel();
        let gate = Arc::clone(gate);
        let held = workers
            .submit(move || {
                started.send(()).unwrap();
                gate.wait();
            })
            .unwrap();
        running.recv().unwrap();
        held
    }

    #[tokio::test]
    async fn a_full_queue_refuses_at_once() {
        let workers = HsmWorkers::start(1, 1).unwrap();
        let gate = Arc::new(Barrier::new(2));
        let held = hold_the_worker(&workers, &gate);
        let queued = workers.submit(|| 1).unwrap();
        assert_eq!(workers.submit(|| 2).err(), Some(WorkError::Busy));
        gate.wait();
        assert_eq!(held.wait(LONG).await, Ok(()));
        assert_eq!(queued.wait(LONG).await, Ok(1));
    }

    #[tokio::test]
    async fn a_caller_stops_waiting_at_its_deadline_and_its_job_is_dropped_unrun() {
        let workers = HsmWorkers::start(1, 4).unwrap();
        let gate = Arc::new(Barrier::new(2));
        let held = hold_the_worker(&workers, &gate);
        let ran = Arc::new(AtomicUsize::new(0));
        let late = {
            let ran = Arc::clone(&ran);
            workers.submit(move || {
                ran.fetch_add(1, Ordering::SeqCst);
            })
        };
        let short = Duration::from_millis(1);
        assert_eq!(
            late.unwrap().wait(short).await,
            Err(WorkError::TimedOut(short))
        );
        gate.wait();
        assert_eq!(held.wait(LONG).await, Ok(()));
        // The worker is free again; the abandoned job was skipped.
        workers.run(LONG, || ()).await.unwrap();
        assert_eq!(ran.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_panicking_job_answers_an_error_and_the_worker_carries_on() {
        let workers = HsmWorkers::start(1, 4).unwrap();
        let panicked = workers.run(LONG, || panic!("a bug")).await;
        assert_eq!(panicked, Err::<(), _>(WorkError::Panicked));
        assert_eq!(workers.run(LONG, || 1).await, Ok(1));
    }
}
