//! Reads with a deadline: the reads on a request's path (a terminal's state, a payment, an
//! enrollment code) run on a fixed set of reader threads, and the caller waits at most the
//! read timeout (`[database] read_timeout_ms`) for the answer.
//!
//! libpq has no read timeout: on a frozen server (the process stopped, the network silent) a
//! query waits until the server answers again. Here only a reader thread waits so; its caller
//! is answered [`StorageError::Timeout`] (`503 unavailable`) after the read timeout, and a read
//! still queued when its caller has given up is dropped unrun. At most [`READ_QUEUE_MAX`]
//! reads wait for a reader; beyond that a read fails at once with
//! [`StorageError::Overloaded`].

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::StorageError;
use super::connection::{AnyConnection, ConnectionPool};

/// Reads waiting for a reader thread.
pub const READ_QUEUE_MAX: usize = 1024;

type ReadJob = Box<dyn FnOnce(&ConnectionPool) + Send>;

/// The reader threads; dropping this lets them finish what is queued and stop.
pub(crate) struct Readers {
    queue: SyncSender<(ReadJob, Instant)>,
    timeout: Duration,
}

impl Readers {
    /// Starts `threads` readers on `pool`; each read waits at most `timeout`.
    pub(crate) fn start(
        pool: &ConnectionPool,
        threads: u32,
        timeout: Duration,
    ) -> std::io::Result<Self> {
        let (queue, jobs) = mpsc::sync_channel::<(ReadJob, Instant)>(READ_QUEUE_MAX);
        let jobs = Arc::new(Mutex::new(jobs));
        for number in 0..threads.max(1) {
            let jobs = Arc::clone(&jobs);
            let pool = pool.clone();
            std::thread::Builder::new()
                .name(format!("nfcpay-ledger-reader-{number}"))
                .spawn(move || serve(&jobs, &pool))?;
        }
        Ok(Self { queue, timeout })
    }

    /// Runs `work` on a reader thread (with [`read_on`]'s one retry on a broken connection)
    /// and waits for its answer at most the read timeout.
    pub(crate) fn read<T: Send + 'static>(
        &self,
        work: impl FnMut(&mut AnyConnection) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<T, StorageError> {
        let (reply, answer) = mpsc::sync_channel(1);
        let job: ReadJob = Box::new(move |pool| {
            // The caller may have given up; then nobody needs the answer.
            let _ = reply.send(read_on(pool, work));
        });
        let deadline = Instant::now() + self.timeout;
        self.queue
            .try_send((job, deadline))
            .map_err(|error| match error {
                TrySendError::Full(_) => StorageError::Overloaded,
                TrySendError::Disconnected(_) => self.timed_out(),
            })?;
        match answer.recv_timeout(self.timeout) {
            Ok(answer) => answer,
            // Disconnected: the job was dropped unrun, its deadline past.
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                Err(self.timed_out())
            }
        }
    }

    fn timed_out(&self) -> StorageError {
        StorageError::Timeout {
            what: "read",
            waited_ms: u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX),
        }
    }
}

/// A reader thread: runs queued reads whose caller still waits, until the queue closes.
fn serve(jobs: &Mutex<Receiver<(ReadJob, Instant)>>, pool: &ConnectionPool) {
    loop {
        let next = jobs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .recv();
        let Ok((job, deadline)) = next else {
            return; // the storage is gone
        };
        if Instant::now() < deadline {
            // A panic (a bug) ends that read only: its caller, its reply gone, is answered
            // as timed out, and this reader goes on.
            if catch_unwind(AssertUnwindSafe(|| job(pool))).is_err() {
                tracing::error!("a ledger read panicked; the reader carries on");
            }
        }
    }
}

/// Runs `work` on a pooled connection; when that connection turns out broken (the server
/// restarted since it was last used), once more on a fresh one.
pub(crate) fn read_on<T>(
    pool: &ConnectionPool,
    mut work: impl FnMut(&mut AnyConnection) -> Result<T, StorageError>,
) -> Result<T, StorageError> {
    let mut connection = pool.get().map_err(StorageError::Pool)?;
    match work(&mut connection) {
        Err(error) if error.is_connection_lost() => {
            tracing::warn!(
                error = nfcpay_protocol::ErrorChain(&error).to_string(),
                "a pooled database connection broke; reading again on a new one"
            );
            drop(connection);
            let mut connection = pool.get().map_err(StorageError::Pool)?;
            work(&mut connection)
        }
        outcome => outcome,
    }
}
