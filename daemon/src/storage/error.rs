//! The storage layer's one error type.

use nfcpay_protocol::{AccountId, TerminalId};

use super::model::TerminalState;

/// Why a storage operation failed.
///
/// Variants from [`StorageError::InvalidUrl`] to [`StorageError::Corrupt`] are operating errors
/// (database unreachable, overloaded); the others are refusals of the request and leave every
/// row as it was.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// The database URL is neither `postgres://…`/`postgresql://…` nor an SQLite path.
    #[error("database URL: {reason}")]
    InvalidUrl {
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A `[database]` setting is out of range.
    #[error("database setting: {reason}")]
    InvalidSetting {
        /// What is wrong.
        reason: &'static str,
    },
    /// No connection could be made.
    #[error("could not connect to the database")]
    Connect(#[source] diesel::ConnectionError),
    /// The connection pool gave no connection in time.
    #[error("no database connection available")]
    Pool(#[source] diesel::r2d2::PoolError),
    /// Building the pool failed.
    #[error("could not build the database pool")]
    PoolBuild(#[source] diesel::r2d2::PoolError),
    /// The embedded migrations failed.
    #[error("database migration failed")]
    Migration(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The database refused a statement or the connection broke.
    #[error("database error")]
    Database(#[from] diesel::result::Error),
    /// The connection broke while a commit was under way: the database may or may not have
    /// made it durable. Halves are run again (they are idempotent: a half already recorded is
    /// answered as it stands); other jobs are answered unavailable.
    #[error("the database connection broke during a commit")]
    CommitInDoubt(#[source] diesel::result::Error),
    /// The database could not take a group commit this request was part of.
    #[error("the database is unavailable")]
    Unavailable(#[source] std::sync::Arc<StorageError>),
    /// The write queue is full ([`super::WRITE_QUEUE_MAX`]); try again later.
    #[error("the ledger's write queue is full")]
    Overloaded,
    /// The writer thread is gone (it panicked or the storage is shutting down).
    #[error("the ledger's writer has stopped")]
    WriterStopped,
    /// The database did not answer in time: a write's group commit (`write_timeout_ms`), a
    /// read, or a health check. A write answered so may still commit later, when the database
    /// answers again: re-sending the same half is safe and returns the payment as it stands.
    #[error("no answer from the database within {waited_ms} ms ({what})")]
    Timeout {
        /// What waited.
        what: &'static str,
        /// How long.
        waited_ms: u64,
    },
    /// The writer has been inside one batch longer than a write may wait: the database does
    /// not answer it.
    #[error("the ledger's writer has waited {busy_ms} ms for the database")]
    WriterStalled {
        /// For how long so far.
        busy_ms: u64,
    },
    /// A batch panicked in the writer: it was rolled back, and the writer carries on.
    #[error("a ledger writer batch panicked and was rolled back")]
    BatchPanicked,
    /// A stored value does not parse: the database was changed behind our back.
    #[error("corrupt row: {what}")]
    Corrupt {
        /// Which value.
        what: String,
    },

    /// No such account.
    #[error("unknown account {0}")]
    UnknownAccount(AccountId),
    /// The account exists already.
    #[error("account {0} exists already")]
    AccountExists(AccountId),
    /// Identifiers starting with `__` belong to the ledger's own accounts.
    #[error("account identifiers starting with `__` are reserved")]
    ReservedAccount,
    /// An account's limit must be zero or negative (a credit line).
    #[error("an account limit must be 0 or negative, not {0}")]
    InvalidLimit(i64),
    /// The amount's currency is not the account's.
    #[error("currency {actual} is not the account's {expected}")]
    CurrencyMismatch {
        /// The account's currency.
        expected: String,
        /// The amount's currency.
        actual: String,
    },
    /// A balance would leave the `i64` range.
    #[error("balance out of range")]
    Overflow,

    /// No such terminal.
    #[error("unknown terminal {0}")]
    UnknownTerminal(TerminalId),
    /// The terminal exists already.
    #[error("terminal {0} exists already")]
    TerminalExists(TerminalId),
    /// Another terminal has this initial key ID.
    #[error("initial key ID in use by another terminal")]
    InitialKeyIdInUse,
    /// The terminal may not submit halves in its state.
    #[error("terminal is {0}")]
    TerminalNotActive(TerminalState),
    /// A terminal state change the rules do not allow (revoked is final; only enrollment
    /// activates a pending terminal).
    #[error("terminal cannot go from {from} to {to}")]
    InvalidStateChange {
        /// The current state.
        from: TerminalState,
        /// The state asked for.
        to: TerminalState,
    },
    /// The enrollment code was refused.
    #[error("enrollment refused: {0}")]
    EnrollmentRefused(EnrollmentRefusal),

    /// The KSN's initial key ID is not the submitting terminal's.
    #[error("the KSN is not the terminal's")]
    KsnNotTerminal,
    /// The half came with a client certificate other than the one the terminal was issued at
    /// its enrollment (`terminals.certificate_serial`): one a re-enrollment superseded.
    #[error("the client certificate is not the terminal's enrolled certificate")]
    CertificateNotEnrolled,
    /// The KSN counter was accepted before, for other bytes.
    #[error("KSN counter already used")]
    ReplayedKsn,
    /// The KSN counter is below the replay window.
    #[error("KSN counter below the replay window")]
    StaleKsn,
    /// The half's account is not the submitting terminal's.
    #[error("the account is not the terminal's")]
    AccountMismatch,
    /// Another half of the same kind stands under this transaction ID.
    #[error("another half stands under this transaction ID")]
    Conflict,
    /// The two halves disagree on a field.
    #[error("the halves disagree on {field}")]
    Mismatch {
        /// `payee_terminal`, `amount`, `currency`, `parties` (both from one terminal),
        /// `payee_account_currency` or `payer_account_currency`.
        field: &'static str,
    },
    /// Half B's request digest is not half A's.
    #[error("the request digests differ")]
    DigestMismatch,
    /// The request expired before settlement.
    #[error("the request has expired")]
    Expired,
    /// The payer's balance would go below its limit.
    #[error("insufficient funds")]
    InsufficientFunds,
}

/// What libpq and PostgreSQL say when the connection is gone, where diesel reports no
/// `ClosedConnection` (the server's shutdown notice arrives as an ordinary error first).
const CONNECTION_LOST_MESSAGES: [&str; 5] = [
    "terminating connection",
    "server closed the connection",
    "no connection to the server",
    "could not receive data from server",
    "connection to server",
];

/// What PostgreSQL says when `statement_timeout` or `lock_timeout` cancelled a statement.
const SERVER_TIMEOUT_MESSAGES: [&str; 2] = [
    "canceling statement due to statement timeout",
    "canceling statement due to lock timeout",
];

/// What SQLite says when it lacks a resource rather than refusing a statement (the file made
/// read-only under the daemon, e.g. by an operator's `chmod` or a read-only remount, is a
/// resource gone, not a refused request).
const SQLITE_RESOURCE_MESSAGES: [&str; 5] = [
    "database is locked",
    "database or disk is full",
    "disk I/O error",
    "unable to open database file",
    "attempt to write a readonly database",
];

/// Why an enrollment code was refused; the API answers all of them alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum EnrollmentRefusal {
    /// The code's hash does not match.
    WrongCode,
    /// The code was used already (the terminal is enrolled).
    AlreadyUsed,
    /// The code's validity has passed.
    Expired,
    /// The terminal is suspended or revoked.
    NotPending,
}

impl std::fmt::Display for EnrollmentRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::WrongCode => "wrong code",
            Self::AlreadyUsed => "code already used",
            Self::Expired => "code expired",
            Self::NotPending => "terminal not awaiting enrollment",
        })
    }
}

impl StorageError {
    /// Whether running the same job again may succeed: a lost race with another writer
    /// (serialization failure, deadlock, a unique key taken meanwhile, a busy SQLite file).
    pub(crate) fn is_retryable(&self) -> bool {
        use diesel::result::{DatabaseErrorKind, Error};
        match self {
            Self::Database(Error::DatabaseError(kind, info)) => match kind {
                DatabaseErrorKind::SerializationFailure | DatabaseErrorKind::UniqueViolation => {
                    true
                }
                _ => {
                    let message = info.message();
                    message.contains("deadlock detected") || message.contains("database is locked")
                }
            },
            _ => false,
        }
    }

    /// Whether the connection itself failed (the server went away, restarted, or closed it):
    /// the same work on a fresh connection may succeed.
    pub(crate) fn is_connection_lost(&self) -> bool {
        use diesel::result::{DatabaseErrorKind, Error};
        match self {
            Self::Database(Error::DatabaseError(kind, info)) => {
                matches!(
                    kind,
                    DatabaseErrorKind::ClosedConnection | DatabaseErrorKind::UnableToSendCommand
                ) || CONNECTION_LOST_MESSAGES
                    .iter()
                    .any(|lost| info.message().contains(lost))
            }
            Self::Database(Error::BrokenTransactionManager) => true,
            _ => false,
        }
    }

    /// Whether the server cancelled a statement for running or waiting on a lock too long
    /// (`statement_timeout`, `lock_timeout`).
    pub(crate) fn is_server_timeout(&self) -> bool {
        use diesel::result::Error;
        match self {
            Self::Database(Error::DatabaseError(_, info)) => SERVER_TIMEOUT_MESSAGES
                .iter()
                .any(|timeout| info.message().contains(timeout)),
            _ => false,
        }
    }

    /// Whether this is the database being unavailable (unreachable, too slow, overloaded,
    /// its writer gone) rather than a refusal of the request or corrupt data: answered
    /// `503 unavailable`, and trying again later may succeed.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            Self::Connect(_)
                | Self::Pool(_)
                | Self::Unavailable(_)
                | Self::Overloaded
                | Self::WriterStopped
                | Self::WriterStalled { .. }
                | Self::BatchPanicked
                | Self::Timeout { .. }
                | Self::CommitInDoubt(_)
        ) || self.is_connection_lost()
            || self.is_server_timeout()
            || self.is_database_resource_fault()
    }

    /// Whether SQLite failed for want of a resource (the file locked too long, the disk full
    /// or failing, the file not openable), not because of the request.
    fn is_database_resource_fault(&self) -> bool {
        use diesel::result::Error;
        match self {
            Self::Database(Error::DatabaseError(_, info)) => SQLITE_RESOURCE_MESSAGES
                .iter()
                .any(|fault| info.message().contains(fault)),
            _ => false,
        }
    }

    /// Whether the database refused a statement (a constraint, a bad value) while the
    /// connection is fine: another batch without the offending row may succeed.
    pub(crate) fn is_statement_refused(&self) -> bool {
        match self {
            Self::Database(diesel::result::Error::DatabaseError(..)) => {
                !self.is_connection_lost()
                    && !self.is_server_timeout()
                    && !self.is_database_resource_fault()
            }
            Self::Corrupt { .. } => true,
            _ => false,
        }
    }

    pub(crate) fn corrupt(what: impl Into<String>) -> Self {
        Self::Corrupt { what: what.into() }
    }
}

#[cfg(test)]
mod tests {
    use diesel::result::{DatabaseErrorKind, Error};

    use super::*;

    fn database(kind: DatabaseErrorKind, message: &str) -> StorageError {
        StorageError::Database(Error::DatabaseError(kind, Box::new(message.to_owned())))
    }

    #[test]
    fn a_broken_connection_or_a_server_timeout_is_unavailable_not_a_refusal() {
        for lost in [
            database(
                DatabaseErrorKind::ClosedConnection,
                "server closed the connection unexpectedly",
            ),
            database(
                DatabaseErrorKind::Unknown,
                "terminating connection due to administrator command",
            ),
        ] {
            assert!(lost.is_connection_lost(), "{lost:?}");
            assert!(lost.is_unavailable(), "{lost:?}");
            assert!(!lost.is_statement_refused(), "{lost:?}");
        }
        for slow in [
            "canceling statement due to statement timeout",
            "canceling statement due to lock timeout",
        ] {
            let slow = database(DatabaseErrorKind::Unknown, slow);
            assert!(
                slow.is_server_timeout() && slow.is_unavailable(),
                "{slow:?}"
            );
            assert!(!slow.is_connection_lost() && !slow.is_statement_refused());
        }
        let full = database(DatabaseErrorKind::Unknown, "database or disk is full");
        assert!(full.is_unavailable() && !full.is_statement_refused());
        let read_only = database(
            DatabaseErrorKind::Unknown,
            "attempt to write a readonly database",
        );
        assert!(read_only.is_unavailable() && !read_only.is_statement_refused());
        assert!(
            !read_only.is_retryable(),
            "not a lost race: the writer must not spin"
        );
    }

    #[test]
    fn a_refused_statement_is_not_unavailable() {
        let refused = database(
            DatabaseErrorKind::CheckViolation,
            "new row violates check constraint",
        );
        assert!(!refused.is_unavailable());
        assert!(!refused.is_connection_lost());
        assert!(refused.is_statement_refused());
        assert!(!StorageError::Conflict.is_unavailable());
    }
}
