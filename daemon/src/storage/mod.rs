//! The ledger: accounts, terminals, replay state, payments and the audit log, in SQLite (the
//! default, one file, no server) or PostgreSQL (shared by several daemons), through one code
//! path. The design is in `docs/ledger.md`.
//!
//! # Layout
//!
//! - [`connection`]: one diesel connection type over both databases, URLs, the pool, settings
//!   and the embedded migrations (`daemon/migrations/{sqlite,postgres}`).
//! - [`writer`]: group commit — every write runs on one writer thread, many jobs per commit.
//! - `readers`: the reads on a request's path, on reader threads, each with a deadline.
//! - [`settlement`]: deciding a half — replay state, match, settlement — exactly once.
//! - `batch`: a group commit's halves read and written as sets (constant statements per
//!   batch), and the lock order that lets daemons share PostgreSQL; `sql`: its statements.
//! - [`ledger`]: accounts and double-entry transfers.
//! - [`terminals`]: registration, enrollment codes, state rules.
//! - [`audit`]: the hash-chained audit log, one chain per writer.
//! - [`queries`]: the operator's read-only views (payments with their halves, postings and
//!   audit records; lists).
//! - [`model`]: what goes in and what comes out; [`error`]: [`StorageError`].
//!
//! Writes ([`Storage::submit_half`], …) block until their group commit is durable, at most
//! `write_timeout_ms`; reads use the pool (those on a request's path at most
//! `read_timeout_ms`). From async code, call both through `tokio::task::spawn_blocking`.

pub mod audit;
mod batch;
mod connection;
pub mod error;
pub mod ledger;
pub mod model;
pub mod queries;
mod readers;
mod schema;
pub mod settlement;
mod sql;
pub mod terminals;
pub mod writer;

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use diesel::prelude::*;
use nfcpay_protocol::{AccountId, Amount, Currency, TerminalId, TxnId};
use serde::Deserialize;

use audit::AuditLog;
use connection::{AnyConnection, ConnectionPool};
use readers::Readers;
use writer::Writer;

pub use connection::SchemaChange;
pub use error::{EnrollmentRefusal, StorageError};
pub use model::{
    AcceptedHalf, AccountView, AuditBreak, AuditReport, ChainHead, HalfContent, HalfKind,
    NewTerminal, PostingView, Submitted, TerminalState, TerminalView, TransactionStatus,
    TransactionView,
};
pub use queries::{
    AuditRecordView, HalfRecord, TransactionDetail, TransactionFilter, TransactionSummary,
};
pub use settlement::REPLAY_WINDOW;
pub use writer::{
    CommitHold, GROUP_COMMIT_MAX, HalfComing, WRITE_QUEUE_MAX, WriterFault, WriterMetrics,
};

/// The `[database]` section of the configuration. Its `Debug` hides the URL's password.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `sqlite:///var/lib/nfcpay/ledger.db` (or a plain path) for SQLite,
    /// `postgres://user@host/db` for PostgreSQL. The URL may hold a password; it is never logged.
    #[serde(default = "DatabaseConfig::default_url")]
    pub url: String,
    /// Connections for reads and the writer.
    #[serde(default = "DatabaseConfig::default_pool_size")]
    pub pool_size: u32,
    /// How long to wait for a pooled connection (ms).
    #[serde(default = "DatabaseConfig::default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// SQLite: how long to wait for another process's write lock (ms).
    #[serde(default = "DatabaseConfig::default_busy_timeout_ms")]
    pub busy_timeout_ms: u64,
    /// How long a write (a half, an operator action) waits for its group commit before it is
    /// answered [`StorageError::Timeout`] (`503 unavailable`), both databases (ms). Queued work
    /// whose caller has given up is dropped unrun.
    #[serde(default = "DatabaseConfig::default_write_timeout_ms")]
    pub write_timeout_ms: u64,
    /// The most the ledger writer waits, before it begins a batch of halves, for other halves
    /// still being verified, so that they share its commit (µs; 0: never waits). It waits
    /// only while some are on their way: a lone payment never waits.
    #[serde(default = "DatabaseConfig::default_commit_delay_us")]
    pub commit_delay_us: u64,
    /// PostgreSQL: ledger writer threads, each with its own connection and audit chain, taking
    /// turns at the queue so that one batch's round trips and commit overlap the next's
    /// (1–8). SQLite always has one: it serialises writes on its file lock.
    #[serde(default = "DatabaseConfig::default_writers")]
    pub writers: u32,
    /// How long a read on a request's path (a terminal's state, a payment, an enrollment
    /// code) waits before it is answered [`StorageError::Timeout`] (`503 unavailable`), both
    /// databases (ms).
    #[serde(default = "DatabaseConfig::default_read_timeout_ms")]
    pub read_timeout_ms: u64,
    /// PostgreSQL: the server cancels a statement running longer than this
    /// (`statement_timeout`, ms; 0: never).
    #[serde(default = "DatabaseConfig::default_statement_timeout_ms")]
    pub statement_timeout_ms: u64,
    /// PostgreSQL: the server cancels a statement waiting longer than this for a row lock
    /// (`lock_timeout`, ms; 0: never).
    #[serde(default = "DatabaseConfig::default_lock_timeout_ms")]
    pub lock_timeout_ms: u64,
}

impl DatabaseConfig {
    /// The default SQLite file.
    pub const DEFAULT_URL: &str = "sqlite:///var/lib/nfcpay/ledger.db";
    /// The default pool size.
    pub const DEFAULT_POOL_SIZE: u32 = 8;
    /// The default pool wait (ms).
    pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 5_000;
    /// The default SQLite busy timeout (ms).
    pub const DEFAULT_BUSY_TIMEOUT_MS: u64 = 5_000;
    /// The default wait of a write for its group commit (ms).
    pub const DEFAULT_WRITE_TIMEOUT_MS: u64 = 5_000;
    /// The default commit delay (µs): under load, batches about three times larger for about
    /// a quarter less of the writer's CPU per payment (docs/performance.md).
    pub const DEFAULT_COMMIT_DELAY_US: u64 = 2_000;
    /// The default number of PostgreSQL ledger writers.
    pub const DEFAULT_WRITERS: u32 = 2;
    /// The most PostgreSQL ledger writers.
    pub const WRITERS_MAX: u32 = 8;
    /// The largest commit delay accepted (µs): more would be a typo, not a tuning.
    pub const COMMIT_DELAY_US_MAX: u64 = 1_000_000;
    /// The default wait of a read on a request's path (ms).
    pub const DEFAULT_READ_TIMEOUT_MS: u64 = 5_000;
    /// The default PostgreSQL `statement_timeout` (ms).
    pub const DEFAULT_STATEMENT_TIMEOUT_MS: u64 = 5_000;
    /// The default PostgreSQL `lock_timeout` (ms).
    pub const DEFAULT_LOCK_TIMEOUT_MS: u64 = 2_000;

    /// The defaults with another URL.
    pub fn with_url(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ..Self::default()
        }
    }

    /// Checks what deserialization cannot: a URL naming a known database, and limits that
    /// are positive (a zero wait would fail every request).
    pub fn validate(&self) -> Result<(), StorageError> {
        let target = connection::Target::parse(&self.url)?;
        if self.pool_size == 0
            || self.connect_timeout_ms == 0
            || self.write_timeout_ms == 0
            || self.read_timeout_ms == 0
        {
            return Err(StorageError::InvalidSetting {
                reason: "pool_size, connect_timeout_ms, write_timeout_ms and read_timeout_ms \
                         must be positive",
            });
        }
        if !(1..=Self::WRITERS_MAX).contains(&self.writers) {
            return Err(StorageError::InvalidSetting {
                reason: "writers must be between 1 and 8",
            });
        }
        if matches!(target, connection::Target::Postgres(_)) && self.writers >= self.pool_size {
            return Err(StorageError::InvalidSetting {
                reason: "on PostgreSQL, pool_size must be larger than writers: each writer \
                         holds a connection while it runs a batch, and reads need one too",
            });
        }
        if self.commit_delay_us > Self::COMMIT_DELAY_US_MAX {
            return Err(StorageError::InvalidSetting {
                reason: "commit_delay_us must be at most 1000000 (1 s)",
            });
        }
        Ok(())
    }

    fn default_url() -> String {
        Self::DEFAULT_URL.to_owned()
    }

    fn default_pool_size() -> u32 {
        Self::DEFAULT_POOL_SIZE
    }

    fn default_connect_timeout_ms() -> u64 {
        Self::DEFAULT_CONNECT_TIMEOUT_MS
    }

    fn default_busy_timeout_ms() -> u64 {
        Self::DEFAULT_BUSY_TIMEOUT_MS
    }

    fn default_write_timeout_ms() -> u64 {
        Self::DEFAULT_WRITE_TIMEOUT_MS
    }

    fn default_writers() -> u32 {
        Self::DEFAULT_WRITERS
    }

    fn default_commit_delay_us() -> u64 {
        Self::DEFAULT_COMMIT_DELAY_US
    }

    fn default_read_timeout_ms() -> u64 {
        Self::DEFAULT_READ_TIMEOUT_MS
    }

    fn default_statement_timeout_ms() -> u64 {
        Self::DEFAULT_STATEMENT_TIMEOUT_MS
    }

    fn default_lock_timeout_ms() -> u64 {
        Self::DEFAULT_LOCK_TIMEOUT_MS
    }
}

impl std::fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("url", &redact_password(&self.url))
            .field("pool_size", &self.pool_size)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("busy_timeout_ms", &self.busy_timeout_ms)
            .field("write_timeout_ms", &self.write_timeout_ms)
            .field("commit_delay_us", &self.commit_delay_us)
            .field("writers", &self.writers)
            .field("read_timeout_ms", &self.read_timeout_ms)
            .field("statement_timeout_ms", &self.statement_timeout_ms)
            .field("lock_timeout_ms", &self.lock_timeout_ms)
            .finish()
    }
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`.
fn redact_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((credentials, host)) = rest.split_once('@') else {
        return url.to_owned();
    };
    match credentials.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: Self::default_url(),
            pool_size: Self::DEFAULT_POOL_SIZE,
            connect_timeout_ms: Self::DEFAULT_CONNECT_TIMEOUT_MS,
            busy_timeout_ms: Self::DEFAULT_BUSY_TIMEOUT_MS,
            write_timeout_ms: Self::DEFAULT_WRITE_TIMEOUT_MS,
            commit_delay_us: Self::DEFAULT_COMMIT_DELAY_US,
            writers: Self::DEFAULT_WRITERS,
            read_timeout_ms: Self::DEFAULT_READ_TIMEOUT_MS,
            statement_timeout_ms: Self::DEFAULT_STATEMENT_TIMEOUT_MS,
            lock_timeout_ms: Self::DEFAULT_LOCK_TIMEOUT_MS,
        }
    }
}

/// The ledger. Cheap to clone; all clones share one pool and one writer thread.
#[derive(Clone)]
pub struct Storage {
    inner: Arc<Inner>,
}

struct Inner {
    pool: ConnectionPool,
    writer: Writer,
    /// The reads on a request's path, each with a deadline.
    readers: Readers,
    postgres: bool,
    /// Whether a health check's `SELECT 1` is still out (at most one is: on a frozen server
    /// it waits until the server answers again).
    health_probe: Arc<AtomicBool>,
    /// What opening the database did to its schema.
    schema_change: SchemaChange,
}

/// How long `/readyz` waits for the database's `SELECT 1`: within the ops listener's own
/// `READY_TIMEOUT_MS`, so the answer names the database.
pub const HEALTH_TIMEOUT: Duration = Duration::from_millis(1_500);
/// How long the health check waits for a pooled connection, within [`HEALTH_TIMEOUT`].
const HEALTH_CONNECTION_WAIT: Duration = Duration::from_millis(1_000);

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password: not shown.
        f.debug_struct("Storage")
            .field(
                "backend",
                &if self.inner.postgres {
                    "postgresql"
                } else {
                    "sqlite"
                },
            )
            .finish_non_exhaustive()
    }
}

/// Milliseconds since the Unix epoch, for operator actions (payments carry their own time).
fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX)
        })
}

impl Storage {
    /// Opens the database a URL names with default settings, migrating it first.
    pub fn open(url: &str) -> Result<Self, StorageError> {
        Self::open_with(&DatabaseConfig::with_url(url))
    }

    /// Opens the configured database: runs pending migrations, builds the pool, starts the
    /// writer thread.
    pub fn open_with(config: &DatabaseConfig) -> Result<Self, StorageError> {
        let postgres = matches!(
            connection::Target::parse(&config.url)?,
            connection::Target::Postgres(_)
        );
        let (pool, schema_change) = connection::open_pool(config)?;
        // SQLite serialises writers on its file lock: more than one would only wait on it.
        let writers = if postgres { config.writers } else { 1 };
        let writer = Writer::start(
            pool.clone(),
            usize::try_from(writers).unwrap_or(1),
            Duration::from_millis(config.write_timeout_ms),
            Duration::from_micros(config.commit_delay_us),
        )
        .map_err(|error| StorageError::Migration(Box::new(error)))?;
        let readers = Readers::start(
            &pool,
            config.pool_size,
            Duration::from_millis(config.read_timeout_ms),
        )
        .map_err(|error| StorageError::Migration(Box::new(error)))?;
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                writer,
                readers,
                postgres,
                health_probe: Arc::new(AtomicBool::new(false)),
                schema_change,
            }),
        })
    }

    /// What opening the database did to its schema (created, migrated or nothing).
    pub fn schema_change(&self) -> SchemaChange {
        self.inner.schema_change
    }

    /// Whether the ledger writer still runs; once it has stopped, every write fails
    /// [`StorageError::WriterStopped`] and only a restart helps.
    pub fn writer_is_running(&self) -> bool {
        self.inner.writer.is_running()
    }

    /// Whether this is PostgreSQL (else SQLite).
    pub fn is_postgres(&self) -> bool {
        self.inner.postgres
    }

    /// Runs `work` on a pooled connection, in the caller's thread (operator tools; the pool's
    /// wait and PostgreSQL's `statement_timeout` bound it), once more on a fresh connection
    /// when the first turns out broken.
    fn read<T>(
        &self,
        work: impl FnMut(&mut AnyConnection) -> Result<T, StorageError>,
    ) -> Result<T, StorageError> {
        readers::read_on(&self.inner.pool, work)
    }

    /// [`Storage::read`] on a reader thread, waiting at most `read_timeout_ms`: for the reads
    /// on a request's path.
    fn bounded_read<T: Send + 'static>(
        &self,
        work: impl FnMut(&mut AnyConnection) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<T, StorageError> {
        self.inner.readers.read(work)
    }

    fn write<T: Send + 'static>(
        &self,
        work: impl FnMut(&mut AnyConnection, &mut AuditLog) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<T, StorageError> {
        self.inner.writer.write(work)
    }

    /// Test hook: the writer's next batch stops before its commit, its transaction open, until
    /// the returned guard is dropped. For tests that show writers do not block each other.
    #[doc(hidden)]
    pub fn hold_next_commit(&self) -> CommitHold {
        self.inner.writer.hold_next_commit()
    }

    /// Test hook: the writer's next batch suffers `fault` (a panic inside the batch, or the
    /// writer thread stopping), to show what callers and readiness see.
    #[doc(hidden)]
    pub fn inject_writer_fault(&self, fault: WriterFault) {
        self.inner.writer.inject_fault(fault);
    }

    /// The ledger writer's figures (statements and halves per batch, retries), for `/metrics`.
    pub fn writer_metrics(&self) -> &WriterMetrics {
        self.inner.writer.metrics()
    }

    /// Creates an account with a zero balance. `limit_minor` is the lowest balance allowed:
    /// 0, or negative for a credit line.
    pub fn create_account(
        &self,
        id: &AccountId,
        currency: Currency,
        limit_minor: i64,
    ) -> Result<(), StorageError> {
        let id = id.clone();
        let now = now_ms();
        self.write(move |connection, audit| {
            ledger::create(connection, audit, &id, currency, limit_minor, now)
        })
    }

    /// Credits an account from its currency's funding account.
    pub fn fund(&self, id: &AccountId, amount: Amount) -> Result<AccountView, StorageError> {
        let id = id.clone();
        let now = now_ms();
        self.write(move |connection, audit| ledger::fund(connection, audit, &id, amount, now))
    }

    /// An account's balance, limit and currency.
    pub fn account(&self, id: &AccountId) -> Result<AccountView, StorageError> {
        self.read(|connection| ledger::load(connection, id))
    }

    /// An account's postings, oldest first (at most the newest [`ledger::POSTINGS_LIST_MAX`]).
    pub fn postings(&self, id: &AccountId) -> Result<Vec<PostingView>, StorageError> {
        self.read(|connection| ledger::postings(connection, id))
    }

    /// Registers a terminal, pending enrollment with its one-time code.
    pub fn add_terminal(&self, new: NewTerminal) -> Result<(), StorageError> {
        let now = now_ms();
        self.write(move |connection, audit| terminals::add(connection, audit, &new, now))
    }

    /// A terminal, if it exists.
    pub fn terminal(&self, id: &TerminalId) -> Result<Option<TerminalView>, StorageError> {
        let id = id.clone();
        self.bounded_read(move |connection| {
            Ok(terminals::load(connection, &id)?.map(|record| record.view))
        })
    }

    /// Every terminal, by identifier.
    pub fn terminals(&self) -> Result<Vec<TerminalView>, StorageError> {
        self.read(terminals::list)
    }

    /// Suspends, reactivates or revokes a terminal. Revoked is final; only enrollment makes a
    /// pending terminal active.
    pub fn set_terminal_state(
        &self,
        id: &TerminalId,
        state: TerminalState,
    ) -> Result<(), StorageError> {
        let id = id.clone();
        let now = now_ms();
        self.write(move |connection, audit| {
            terminals::set_state(connection, audit, &id, state, now)
        })
    }

    /// Checks a terminal's one-time enrollment code (compared in constant time) as
    /// [`Storage::redeem_enrollment_code`] would, without redeeming it: a read, nothing
    /// written. Returns the pending terminal; refuses with [`StorageError::EnrollmentRefused`]
    /// or [`StorageError::UnknownTerminal`].
    pub fn check_enrollment_code(
        &self,
        id: &TerminalId,
        code_sha256: &[u8; 32],
        now_ms: i64,
    ) -> Result<TerminalView, StorageError> {
        let id = id.clone();
        let code_sha256 = *code_sha256;
        self.bounded_read(move |connection| {
            terminals::check_code(connection, &id, &code_sha256, now_ms)
        })
    }

    /// Redeems a terminal's one-time enrollment code (compared in constant time): once only,
    /// before it expires, pending → active.
    pub fn redeem_enrollment_code(
        &self,
        id: &TerminalId,
        code_sha256: [u8; 32],
        now_ms: i64,
        certificate_serial: &str,
    ) -> Result<TerminalView, StorageError> {
        let id = id.clone();
        let serial = certificate_serial.to_owned();
        self.write(move |connection, audit| {
            terminals::redeem(connection, audit, &id, code_sha256, now_ms, &serial)
        })
    }

    /// Test hook: records `certificate_serial` as the terminal's enrolled certificate (with an
    /// audit record), as a re-enrollment would, so that tests can show the certificate it
    /// supersedes is refused. There is no re-enrollment command yet.
    #[doc(hidden)]
    pub fn danger_replace_certificate_serial(
        &self,
        id: &TerminalId,
        certificate_serial: &str,
    ) -> Result<(), StorageError> {
        let id = id.clone();
        let serial = certificate_serial.to_owned();
        let now = now_ms();
        self.write(move |connection, audit| {
            terminals::replace_certificate_serial(connection, audit, &id, &serial, now)
        })
    }

    /// Accepts a verified half (protocol §6.1 steps 7–9) in the next group commit and returns
    /// the payment as it stands once that commit is durable — pending, or settled when this
    /// half completed the pair — and whether this half settled it. A byte-identical re-send
    /// gets the same view again. A refused half changes nothing, not even the replay state.
    pub fn accept_half(&self, half: AcceptedHalf, now_ms: i64) -> Result<Submitted, StorageError> {
        self.inner
            .writer
            .submit_half(settlement::QueuedHalf { half, now_ms })
    }

    /// Counts a half as on its way to [`Storage::accept_half_async`] (being verified) until the
    /// guard is dropped: under load the writer waits a little for such halves so that they
    /// share its commit (`[database] commit_delay_us`). Drop the guard once the half is
    /// queued or refused.
    pub fn half_coming(&self) -> HalfComing {
        self.inner.writer.half_coming()
    }

    /// [`Storage::accept_half`] for async callers: the half is queued at once, and the returned
    /// future waits (holding no thread) until its batch is durable, at most the write timeout.
    pub fn accept_half_async(
        &self,
        half: AcceptedHalf,
        now_ms: i64,
    ) -> impl Future<Output = Result<Submitted, StorageError>> + Send + use<> {
        self.inner
            .writer
            .submit_half_async(settlement::QueuedHalf { half, now_ms })
    }

    /// [`Storage::accept_half`], for callers that need only the payment.
    pub fn submit_half(
        &self,
        half: AcceptedHalf,
        now_ms: i64,
    ) -> Result<TransactionView, StorageError> {
        self.accept_half(half, now_ms)
            .map(|submitted| submitted.view)
    }

    /// A payment, if it exists.
    pub fn transaction(&self, txn_id: &TxnId) -> Result<Option<TransactionView>, StorageError> {
        let txn_id = *txn_id;
        self.bounded_read(move |connection| settlement::view(connection, &txn_id))
    }

    /// Marks pending payments whose time has passed as expired, each with an audit record;
    /// returns how many (at most [`settlement::EXPIRE_BATCH_MAX`] per call).
    pub fn expire_unmatched(&self, now_ms: i64) -> Result<u64, StorageError> {
        self.write(move |connection, audit| settlement::expire_unmatched(connection, audit, now_ms))
    }

    /// Walks every audit chain and checkpoint and reports the first broken link; checkpoint
    /// signatures are not checked (see [`Storage::audit_verify_signed`]).
    pub fn audit_verify(&self) -> Result<AuditReport, StorageError> {
        self.read(|connection| audit::verify(connection, None))
    }

    /// [`Storage::audit_verify`], checking each checkpoint's signature with `signature`.
    pub fn audit_verify_signed(
        &self,
        signature: audit::SignatureCheck<'_>,
    ) -> Result<AuditReport, StorageError> {
        self.read(|connection| audit::verify(connection, Some(signature)))
    }

    /// Every audit chain's head now.
    pub fn audit_heads(&self) -> Result<Vec<ChainHead>, StorageError> {
        self.read(audit::heads)
    }

    /// Stores a checkpoint of `heads` signed (over [`audit::checkpoint_message`]) by the key
    /// labelled `key_label`.
    pub fn add_audit_checkpoint(
        &self,
        at_ms: i64,
        heads: Vec<ChainHead>,
        key_label: &str,
        signature: [u8; 64],
    ) -> Result<(), StorageError> {
        let key_label = key_label.to_owned();
        self.write(move |connection, _| {
            audit::insert_checkpoint(connection, at_ms, &heads, &key_label, &signature)
        })
    }

    /// For `/readyz`: the writer thread still runs ([`StorageError::WriterStopped`] if not:
    /// every write would fail), and `SELECT 1` works on a pooled connection.
    ///
    /// Bounded in time: a writer inside one batch for longer than a write may wait fails it
    /// ([`StorageError::WriterStalled`]) at once, and `SELECT 1` runs on a thread of its own
    /// for at most [`HEALTH_TIMEOUT`] ([`StorageError::Timeout`]); while one is still out, the
    /// next check fails at once instead of sending another.
    pub fn check_health(&self) -> Result<(), StorageError> {
        if !self.inner.writer.is_running() {
            return Err(StorageError::WriterStopped);
        }
        let busy = self.inner.writer.busy_for();
        if busy > self.inner.writer.write_timeout() {
            return Err(StorageError::WriterStalled {
                busy_ms: u64::try_from(busy.as_millis()).unwrap_or(u64::MAX),
            });
        }
        let timeout = StorageError::Timeout {
            what: "health check",
            waited_ms: u64::try_from(HEALTH_TIMEOUT.as_millis()).unwrap_or(u64::MAX),
        };
        if self.inner.health_probe.swap(true, Ordering::SeqCst) {
            return Err(timeout);
        }
        let (reply, answer) = std::sync::mpsc::sync_channel(1);
        let storage = self.clone();
        let spawned = std::thread::Builder::new()
            .name("nfcpay-db-health".into())
            .spawn(move || {
                // Shorter than the probe's own wait, so that a server refusing connections is
                // reported with libpq's words rather than as silence.
                let answered = storage
                    .inner
                    .pool
                    .get_timeout(HEALTH_CONNECTION_WAIT)
                    .map_err(StorageError::Pool)
                    .and_then(|mut connection| {
                        diesel::select(1_i32.into_sql::<diesel::sql_types::Integer>())
                            .get_result::<i32>(&mut connection)?;
                        Ok(())
                    });
                storage.inner.health_probe.store(false, Ordering::SeqCst);
                // The check may have given up waiting; then nobody needs the answer.
                let _ = reply.send(answered);
            });
        if let Err(error) = spawned {
            self.inner.health_probe.store(false, Ordering::SeqCst);
            return Err(StorageError::Unavailable(Arc::new(
                StorageError::Migration(Box::new(error)),
            )));
        }
        answer.recv_timeout(HEALTH_TIMEOUT).unwrap_or(Err(timeout))
    }

    /// Diagnostics: the deadlines of a pooled PostgreSQL session, as
    /// `statement_timeout=… lock_timeout=…` (empty on SQLite).
    #[doc(hidden)]
    pub fn session_settings(&self) -> Result<String, StorageError> {
        use diesel::dsl::sql;
        use diesel::sql_types::Text;
        self.read(|connection| {
            if !matches!(connection, AnyConnection::Postgresql(_)) {
                return Ok(String::new());
            }
            let (statement, lock, commit, seqscan) = diesel::select((
                sql::<Text>("current_setting('statement_timeout')"),
                sql::<Text>("current_setting('lock_timeout')"),
                sql::<Text>("current_setting('synchronous_commit')"),
                sql::<Text>("current_setting('enable_seqscan')"),
            ))
            .get_result::<(String, String, String, String)>(connection)?;
            Ok(format!(
                "statement_timeout={statement} lock_timeout={lock} \
                 synchronous_commit={commit} enable_seqscan={seqscan}"
            ))
        })
    }

    /// A deterministic text rendering of every ledger row except the audit log (accounts,
    /// transfers, postings, terminals without code hashes, used counters, transactions), for
    /// diagnostics and for tests that check "nothing changed".
    #[allow(clippy::type_complexity)] // row tuples, printed and compared only
    pub fn dump_state(&self) -> Result<String, StorageError> {
        use schema::{accounts, postings, terminals as t, transactions, transfers, used_counters};
        self.read(|connection| {
            let mut text = String::new();
            let accounts: Vec<(String, String, i64, Option<i64>)> = accounts::table
                .order(accounts::id.asc())
                .select((
                    accounts::id,
                    accounts::currency,
                    accounts::balance_minor,
                    accounts::limit_minor,
                ))
                .load(connection)?;
            let transfers: Vec<(i64, String, Option<Vec<u8>>, i64, String)> = transfers::table
                .order(transfers::id.asc())
                .select((
                    transfers::id,
                    transfers::kind,
                    transfers::txn_id,
                    transfers::amount_minor,
                    transfers::currency,
                ))
                .load(connection)?;
            let postings: Vec<(i64, i64, String, i64, i64)> = postings::table
                .order(postings::id.asc())
                .select((
                    postings::id,
                    postings::transfer_id,
                    postings::account_id,
                    postings::amount_minor,
                    postings::balance_after_minor,
                ))
                .load(connection)?;
            let terminals: Vec<(String, String, String, Option<String>, i64)> = t::table
                .order(t::id.asc())
                .select((
                    t::id,
                    t::account_id,
                    t::state,
                    t::certificate_serial,
                    t::highest_counter,
                ))
                .load(connection)?;
            let used: Vec<(String, i64, Vec<u8>, String, Vec<u8>)> = used_counters::table
                .order((
                    used_counters::terminal_id.asc(),
                    used_counters::counter.asc(),
                ))
                .select((
                    used_counters::terminal_id,
                    used_counters::counter,
                    used_counters::txn_id,
                    used_counters::half,
                    used_counters::envelope_sha256,
                ))
                .load(connection)?;
            let transactions: Vec<settlement::TransactionRow> = transactions::table
                .order(transactions::txn_id.asc())
                .select(settlement::TransactionRow::as_select())
                .load(connection)?;
            for (title, rows) in [
                ("accounts", format_rows(&accounts)),
                ("transfers", format_rows(&transfers)),
                ("postings", format_rows(&postings)),
                ("terminals", format_rows(&terminals)),
                ("used_counters", format_rows(&used)),
                ("transactions", format_rows(&transactions)),
            ] {
                let _ = writeln!(text, "[{title}]\n{rows}");
            }
            Ok(text)
        })
    }
}

fn format_rows<T: std::fmt::Debug>(rows: &[T]) -> String {
    rows.iter().fold(String::new(), |mut text, row| {
        let _ = writeln!(text, "{row:?}");
        text
    })
}

#[cfg(test)]
mod config_tests {
    use super::*;

    #[test]
    fn debug_hides_the_database_password() {
        let config = DatabaseConfig {
            url: "postgres://nfcpay:s3cret@db.example/ledger".into(),
            ..DatabaseConfig::default()
        };
        let shown = format!("{config:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(
            shown.contains("postgres://nfcpay:***@db.example/ledger"),
            "{shown}"
        );
        assert_eq!(
            redact_password("sqlite:///var/lib/x.db"),
            "sqlite:///var/lib/x.db"
        );
        assert_eq!(redact_password("postgres://u@h/d"), "postgres://u@h/d");
    }
}
