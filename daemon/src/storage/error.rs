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
    /// The database could not take a group commit this request was part of.
    #[error("the database is unavailable")]
    Unavailable(#[source] std::sync::Arc<StorageError>),
    /// The write queue is full ([`super::WRITE_QUEUE_MAX`]); try again later.
    #[error("the ledger's write queue is full")]
    Overloaded,
    /// The writer thread is gone (it panicked or the storage is shutting down).
    #[error("the ledger's writer has stopped")]
    WriterStopped,
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

    /// Whether the database refused a statement (a constraint, a bad value) while the
    /// connection is fine: another batch without the offending row may succeed.
    pub(crate) fn is_statement_refused(&self) -> bool {
        use diesel::result::{DatabaseErrorKind, Error};
        match self {
            Self::Database(Error::DatabaseError(kind, _)) => !matches!(
                kind,
                DatabaseErrorKind::ClosedConnection | DatabaseErrorKind::UnableToSendCommand
            ),
            Self::Corrupt { .. } => true,
            _ => false,
        }
    }

    pub(crate) fn corrupt(what: impl Into<String>) -> Self {
        Self::Corrupt { what: what.into() }
    }
}
