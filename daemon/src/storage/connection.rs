//! One connection type for both databases, the pool, per-connection settings and migrations.

use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::migration::MigrationSource;
use diesel::pg::Pg;
use diesel::r2d2::{CustomizeConnection, ManageConnection, Pool, R2D2Connection};
use diesel::sqlite::Sqlite;
use diesel::{Connection, PgConnection, SqliteConnection};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

use super::{DatabaseConfig, StorageError};

const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");
const POSTGRES_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");

/// An arbitrary constant naming the advisory lock daemons hold while migrating PostgreSQL.
const POSTGRES_MIGRATION_LOCK_KEY: i64 = 0x6e66_6370_6179_0001;

/// A connection to either database; queries are written once against it.
#[derive(diesel::MultiConnection)]
pub enum AnyConnection {
    /// PostgreSQL, for a shared ledger behind several daemons.
    Postgresql(PgConnection),
    /// SQLite, the default: one file, no server.
    Sqlite(SqliteConnection),
}

/// Which database a URL names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    /// A `postgres://` or `postgresql://` URL, handed to libpq as is (multi-host URLs and
    /// `target_session_attrs` included), with a `connect_timeout` added if it has none.
    Postgres(String),
    /// An SQLite database file.
    Sqlite(String),
}

impl Target {
    /// `postgres://…`/`postgresql://…` is PostgreSQL; `sqlite://PATH` or a plain path is SQLite.
    pub(crate) fn parse(url: &str) -> Result<Self, StorageError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Self::Postgres(url.to_owned()));
        }
        let path = url.strip_prefix("sqlite://").unwrap_or(url);
        if path.is_empty() {
            return Err(StorageError::InvalidUrl {
                reason: "empty SQLite path",
            });
        }
        if path == ":memory:" || path.contains("mode=memory") {
            // Each pooled connection would see its own empty database.
            return Err(StorageError::InvalidUrl {
                reason: "an in-memory SQLite database cannot be shared by a pool",
            });
        }
        if path.contains("://") {
            return Err(StorageError::InvalidUrl {
                reason: "unknown scheme (expected postgres://, postgresql:// or sqlite://)",
            });
        }
        Ok(Self::Sqlite(path.to_owned()))
    }

    /// With libpq's `connect_timeout` (whole seconds, at least 2, as libpq takes it) set to
    /// `connect_timeout_ms` unless the URL sets it: a server that accepts the TCP connection
    /// but does not answer (frozen) costs that long, not forever.
    fn with_connect_timeout(self, connect_timeout_ms: u64) -> Self {
        match self {
            Self::Postgres(url) if !url.contains("connect_timeout=") => {
                let seconds = connect_timeout_ms.div_ceil(1000).max(2);
                let separator = if url.contains('?') { '&' } else { '?' };
                Self::Postgres(format!("{url}{separator}connect_timeout={seconds}"))
            }
            other => other,
        }
    }

    fn establish(&self) -> Result<AnyConnection, diesel::ConnectionError> {
        match self {
            Self::Postgres(url) => PgConnection::establish(url).map(AnyConnection::Postgresql),
            Self::Sqlite(path) => SqliteConnection::establish(path).map(AnyConnection::Sqlite),
        }
    }
}

/// Opens pooled connections to the one database the URL named (diesel's own manager would
/// try each backend in turn, and could create an SQLite file named after a PostgreSQL URL).
#[derive(Debug)]
pub(crate) struct Manager {
    target: Target,
}

impl ManageConnection for Manager {
    type Connection = AnyConnection;
    type Error = diesel::r2d2::Error;

    fn connect(&self) -> Result<AnyConnection, Self::Error> {
        self.target
            .establish()
            .map_err(diesel::r2d2::Error::ConnectionError)
    }

    fn is_valid(&self, connection: &mut AnyConnection) -> Result<(), Self::Error> {
        connection.ping().map_err(diesel::r2d2::Error::QueryError)
    }

    fn has_broken(&self, connection: &mut AnyConnection) -> bool {
        std::thread::panicking() || connection.is_broken()
    }
}

/// The per-connection settings every pooled connection gets.
#[derive(Debug, Clone, Copy)]
struct SessionSettings {
    busy_timeout_ms: u64,
    /// PostgreSQL `statement_timeout`; `None` on the migrating connection (migrations and
    /// the wait for another daemon's migrations take what they take).
    statement_timeout_ms: Option<u64>,
    /// PostgreSQL `lock_timeout`; `None` on the migrating connection.
    lock_timeout_ms: Option<u64>,
}

impl CustomizeConnection<AnyConnection, diesel::r2d2::Error> for SessionSettings {
    fn on_acquire(&self, connection: &mut AnyConnection) -> Result<(), diesel::r2d2::Error> {
        self.apply(connection)
            .map_err(diesel::r2d2::Error::QueryError)
    }
}

impl SessionSettings {
    /// SQLite: full fsync at every commit, foreign keys, wait for a busy file instead of
    /// failing. PostgreSQL: a commit returns only once it is flushed (whatever the server's
    /// default), the server cancels a statement that runs or waits for a lock too long, and
    /// plans look rows up by their keys.
    ///
    /// Why `enable_seqscan = off`: every statement nfcpay runs finds its rows by a key, and
    /// its statements are prepared once and run on a cached generic plan. A plan made while a
    /// table was nearly empty (a new ledger; any table before autovacuum's first `ANALYZE`)
    /// scans the whole table and keeps doing so as the table grows: in `storage_bench` on
    /// fresh tables, most of PostgreSQL's time went to comparing every payment's `txn_id` with
    /// the batch's (`byteaeq` under a sequential scan). The setting only makes a sequential
    /// scan the planner's last resort; a query with no usable index still gets one.
    fn apply(&self, connection: &mut AnyConnection) -> diesel::QueryResult<()> {
        match connection {
            AnyConnection::Sqlite(sqlite) => sqlite.batch_execute(&format!(
                "PRAGMA busy_timeout = {}; \
                 PRAGMA synchronous = FULL; \
                 PRAGMA foreign_keys = ON;",
                self.busy_timeout_ms
            )),
            AnyConnection::Postgresql(postgres) => {
                let mut settings = String::from(
                    "SET synchronous_commit = on; \
                     SET default_transaction_isolation = 'read committed'; \
                     SET enable_seqscan = off;",
                );
                if let Some(ms) = self.statement_timeout_ms {
                    settings.push_str(&format!(" SET statement_timeout = {ms};"));
                }
                if let Some(ms) = self.lock_timeout_ms {
                    settings.push_str(&format!(" SET lock_timeout = {ms};"));
                }
                postgres.batch_execute(&settings)
            }
        }
    }
}

pub(crate) type ConnectionPool = Pool<Manager>;

/// What opening the database did to its schema.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SchemaChange {
    /// Every migration ran: the database was empty.
    Created {
        /// Migrations run (all this build knows).
        applied: usize,
    },
    /// Some migrations ran (`applied` of the `known`): the schema was older than this build.
    Migrated {
        /// Migrations run now.
        applied: usize,
        /// Migrations this build knows.
        known: usize,
    },
    /// Nothing to do: the schema was already this build's.
    UpToDate,
}

/// Prepares the database (WAL, migrations) and builds the pool.
pub(crate) fn open_pool(
    config: &DatabaseConfig,
) -> Result<(ConnectionPool, SchemaChange), StorageError> {
    let target = Target::parse(&config.url)?.with_connect_timeout(config.connect_timeout_ms);
    let mut first = target.establish().map_err(StorageError::Connect)?;
    let settings = SessionSettings {
        busy_timeout_ms: config.busy_timeout_ms,
        statement_timeout_ms: Some(config.statement_timeout_ms),
        lock_timeout_ms: Some(config.lock_timeout_ms),
    };
    SessionSettings {
        statement_timeout_ms: None,
        lock_timeout_ms: None,
        ..settings
    }
    .apply(&mut first)?;
    let change = migrate(&mut first)?;
    drop(first);

    let pool = Pool::builder()
        .max_size(config.pool_size)
        .connection_timeout(Duration::from_millis(config.connect_timeout_ms))
        .connection_customizer(Box::new(settings))
        .build(Manager { target })
        .map_err(StorageError::PoolBuild)?;
    Ok((pool, change))
}

/// Names what `applied` of `known` migrations did.
fn schema_change(applied: usize, known: usize) -> SchemaChange {
    match applied {
        0 => SchemaChange::UpToDate,
        _ if applied == known => SchemaChange::Created { applied },
        _ => SchemaChange::Migrated { applied, known },
    }
}

/// Runs the pending migrations of the connection's database, one migrator at a time.
fn migrate(connection: &mut AnyConnection) -> Result<SchemaChange, StorageError> {
    match connection {
        AnyConnection::Sqlite(sqlite) => {
            // WAL persists in the file; switching needs no other writer, so it happens here,
            // before the pool opens more connections.
            sqlite.batch_execute("PRAGMA journal_mode = WAL;")?;
            let known = MigrationSource::<Sqlite>::migrations(&SQLITE_MIGRATIONS)
                .map_err(StorageError::Migration)?
                .len();
            sqlite
                .run_pending_migrations(SQLITE_MIGRATIONS)
                .map(|applied| schema_change(applied.len(), known))
                .map_err(StorageError::Migration)
        }
        AnyConnection::Postgresql(postgres) => {
            let known = MigrationSource::<Pg>::migrations(&POSTGRES_MIGRATIONS)
                .map_err(StorageError::Migration)?
                .len();
            // Several daemons may start at once against one database.
            let lock = format!("SELECT pg_advisory_lock({POSTGRES_MIGRATION_LOCK_KEY})");
            postgres.batch_execute(&lock)?;
            let migrated = postgres
                .run_pending_migrations(POSTGRES_MIGRATIONS)
                .map(|applied| schema_change(applied.len(), known))
                .map_err(StorageError::Migration);
            let unlock = format!("SELECT pg_advisory_unlock({POSTGRES_MIGRATION_LOCK_KEY})");
            postgres.batch_execute(&unlock)?;
            migrated
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_the_migrations_did_is_named() {
        assert_eq!(schema_change(0, 5), SchemaChange::UpToDate);
        assert_eq!(schema_change(5, 5), SchemaChange::Created { applied: 5 });
        assert_eq!(
            schema_change(2, 5),
            SchemaChange::Migrated {
                applied: 2,
                known: 5
            }
        );
    }

    #[test]
    fn urls_choose_the_backend() {
        assert_eq!(
            Target::parse("postgres://u@h/db").unwrap(),
            Target::Postgres("postgres://u@h/db".into())
        );
        assert_eq!(
            Target::parse("postgresql://u@h/db").unwrap(),
            Target::Postgres("postgresql://u@h/db".into())
        );
        assert_eq!(
            Target::parse("sqlite:///var/lib/nfcpay/ledger.db").unwrap(),
            Target::Sqlite("/var/lib/nfcpay/ledger.db".into())
        );
        assert_eq!(
            Target::parse("ledger.db").unwrap(),
            Target::Sqlite("ledger.db".into())
        );
        for bad in ["", "sqlite://", ":memory:", "mysql://h/db"] {
            assert!(Target::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn postgres_urls_get_a_connect_timeout_unless_they_have_one() {
        let with = |url: &str, ms| Target::parse(url).unwrap().with_connect_timeout(ms);
        assert_eq!(
            with("postgres://u@h/db", 5_000),
            Target::Postgres("postgres://u@h/db?connect_timeout=5".into())
        );
        assert_eq!(
            with("postgres://u@h1,h2/db?target_session_attrs=read-write", 500),
            Target::Postgres(
                "postgres://u@h1,h2/db?target_session_attrs=read-write&connect_timeout=2".into()
            )
        );
        assert_eq!(
            with("postgres://u@h/db?connect_timeout=30", 5_000),
            Target::Postgres("postgres://u@h/db?connect_timeout=30".into())
        );
        assert_eq!(with("ledger.db", 5_000), Target::Sqlite("ledger.db".into()));
    }
}
