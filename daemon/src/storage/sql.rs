//! Set-based statements: one SQL text with any number of rows, for both databases.
//!
//! The batch writer (`batch`) reads and writes every row a group commit touches with a
//! constant number of statements — `WHERE id IN (…)`, `INSERT … <rows>`,
//! `WITH v(…) AS (<rows>) UPDATE … FROM v` — whatever the batch size. Diesel's query builder
//! cannot express the multi-row `UPDATE … FROM`, and its `sql_query` is never cached, so this
//! module has its own small statement type: SQL text with typed bind parameters, rendered with
//! each backend's placeholders (`$1` or `?`) by diesel itself, and safe to cache.
//!
//! A set of rows ([`Statement::rows`]) is rendered as each database reads a table best:
//! `VALUES (?, ?), (?, ?), …` on SQLite, and `SELECT * FROM unnest($1, $2, …)` with one array
//! per column on PostgreSQL. The PostgreSQL text therefore does not depend on the number of
//! rows: each statement is parsed and planned once per connection and then runs on its cached
//! plan, where a `VALUES` list would be a new statement for every batch size. (SQLite has no
//! arrays; parsing is cheap there.)
//!
//! Values are bound, never formatted into the text: only identifiers written in this crate
//! go into the SQL.

use diesel::backend::Backend;
use diesel::pg::Pg;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::query_dsl::LoadQuery;
use diesel::serialize::ToSql;
use diesel::sql_types::{Array, BigInt, Binary, HasSqlType, Nullable, Text, Untyped};
use diesel::sqlite::Sqlite;
use diesel::{PgConnection, QueryResult, RunQueryDsl, SqliteConnection};

use super::StorageError;
use super::connection::AnyConnection;

/// One bound value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Value {
    /// `TEXT`.
    Text(Option<String>),
    /// `BIGINT`/`INTEGER`.
    Int(Option<i64>),
    /// `BYTEA`/`BLOB`.
    Bytes(Option<Vec<u8>>),
}

impl From<String> for Value {
    fn from(value: String) -> Self {
        Self::Text(Some(value))
    }
}

impl From<&str> for Value {
    fn from(value: &str) -> Self {
        Self::Text(Some(value.to_owned()))
    }
}

impl From<Option<String>> for Value {
    fn from(value: Option<String>) -> Self {
        Self::Text(value)
    }
}

impl From<i64> for Value {
    fn from(value: i64) -> Self {
        Self::Int(Some(value))
    }
}

impl From<Option<i64>> for Value {
    fn from(value: Option<i64>) -> Self {
        Self::Int(value)
    }
}

impl From<Vec<u8>> for Value {
    fn from(value: Vec<u8>) -> Self {
        Self::Bytes(Some(value))
    }
}

impl From<Option<Vec<u8>>> for Value {
    fn from(value: Option<Vec<u8>>) -> Self {
        Self::Bytes(value)
    }
}

#[derive(Debug, Clone)]
enum Part {
    Sql(String),
    Bind(Value),
    Rows(Rows),
}

/// One column of a set of rows, all of one type.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Column {
    Text(Vec<Option<String>>),
    Int(Vec<Option<i64>>),
    Bytes(Vec<Option<Vec<u8>>>),
}

impl Column {
    fn of(value: &Value) -> Self {
        match value {
            Value::Text(_) => Self::Text(Vec::new()),
            Value::Int(_) => Self::Int(Vec::new()),
            Value::Bytes(_) => Self::Bytes(Vec::new()),
        }
    }

    /// Appends `value`; false if it is not of the column's type.
    fn push(&mut self, value: Value) -> bool {
        match (self, value) {
            (Self::Text(column), Value::Text(value)) => column.push(value),
            (Self::Int(column), Value::Int(value)) => column.push(value),
            (Self::Bytes(column), Value::Bytes(value)) => column.push(value),
            _ => return false,
        }
        true
    }
}

/// Rows of bound values, kept by column: what [`Statement::rows`] renders as a table.
#[derive(Debug, Clone, Default)]
struct Rows {
    columns: Vec<Column>,
    count: usize,
    /// Why the rows cannot be rendered (a row of another width or type than the first).
    invalid: Option<&'static str>,
}

impl Rows {
    fn push(&mut self, row: impl IntoIterator<Item = Value>) {
        let first = self.count == 0;
        let mut width = 0;
        for value in row {
            if first {
                self.columns.push(Column::of(&value));
            }
            match self.columns.get_mut(width) {
                Some(column) => {
                    if !column.push(value) {
                        self.refuse("a row's value is not of its column's type");
                    }
                }
                None => self.refuse("a row is wider than the first"),
            }
            width += 1;
        }
        if width < self.columns.len() {
            self.refuse("a row is narrower than the first");
        }
        self.count += 1;
    }

    /// Keeps the first reason the rows cannot be rendered.
    fn refuse(&mut self, reason: &'static str) {
        self.invalid.get_or_insert(reason);
    }

    fn check(&self) -> QueryResult<()> {
        let invalid = match self.invalid {
            Some(reason) => reason,
            None if self.count == 0 || self.columns.is_empty() => "an empty set of rows",
            None => return Ok(()),
        };
        Err(diesel::result::Error::QueryBuilderError(invalid.into()))
    }

    /// `VALUES (?, ?), (?, ?), …`: one placeholder per value (SQLite).
    fn walk_values<'b>(&'b self, out: &mut AstPass<'_, 'b, Sqlite>) -> QueryResult<()> {
        self.check()?;
        out.push_sql("VALUES ");
        for row in 0..self.count {
            out.push_sql(if row == 0 { "(" } else { ", (" });
            for (index, column) in self.columns.iter().enumerate() {
                if index > 0 {
                    out.push_sql(", ");
                }
                match column {
                    Column::Text(values) => {
                        out.push_bind_param::<Nullable<Text>, _>(&values[row])?;
                    }
                    Column::Int(values) => {
                        out.push_bind_param::<Nullable<BigInt>, _>(&values[row])?;
                    }
                    Column::Bytes(values) => {
                        out.push_bind_param::<Nullable<Binary>, _>(&values[row])?;
                    }
                }
            }
            out.push_sql(")");
        }
        Ok(())
    }

    /// `SELECT * FROM unnest($1, $2, …)`: one array per column, whatever the number of rows.
    fn walk_arrays<'b>(&'b self, out: &mut AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        self.check()?;
        out.push_sql("SELECT * FROM unnest(");
        for (index, column) in self.columns.iter().enumerate() {
            if index > 0 {
                out.push_sql(", ");
            }
            match column {
                Column::Text(values) => {
                    out.push_bind_param::<Array<Nullable<Text>>, _>(values)?;
                }
                Column::Int(values) => {
                    out.push_bind_param::<Array<Nullable<BigInt>>, _>(values)?;
                }
                Column::Bytes(values) => {
                    out.push_bind_param::<Array<Nullable<Binary>>, _>(values)?;
                }
            }
        }
        out.push_sql(")");
        Ok(())
    }
}

/// A statement under construction: SQL text interleaved with bound values.
#[derive(Debug, Clone, Default)]
pub(crate) struct Statement {
    parts: Vec<Part>,
}

impl Statement {
    /// A statement starting with `sql`.
    pub(crate) fn new(sql: &str) -> Self {
        Self {
            parts: vec![Part::Sql(sql.to_owned())],
        }
    }

    /// Appends SQL text (identifiers and keywords written in this crate only).
    pub(crate) fn sql(&mut self, sql: &str) -> &mut Self {
        match self.parts.last_mut() {
            Some(Part::Sql(text)) => text.push_str(sql),
            _ => self.parts.push(Part::Sql(sql.to_owned())),
        }
        self
    }

    /// Appends one bound value.
    pub(crate) fn bind(&mut self, value: impl Into<Value>) -> &mut Self {
        self.parts.push(Part::Bind(value.into()));
        self
    }

    /// Appends a table of `rows` (at least one, all of the first's width and types): `VALUES
    /// (…), (…)` on SQLite, `SELECT * FROM unnest(…)` with one array per column on
    /// PostgreSQL. Write it where SQL takes a query: after `INSERT INTO t (…)`, inside
    /// `WITH v (…) AS (…)`.
    pub(crate) fn rows<R>(&mut self, rows: impl IntoIterator<Item = R>) -> &mut Self
    where
        R: IntoIterator<Item = Value>,
    {
        let mut set = Rows::default();
        for row in rows {
            set.push(row);
        }
        self.parts.push(Part::Rows(set));
        self
    }

    /// Runs the statement and loads what it returns.
    pub(crate) fn load_in<U>(self, connection: &mut AnyConnection) -> QueryResult<Vec<U>>
    where
        Self: LoadQuery<'static, PgConnection, U> + LoadQuery<'static, SqliteConnection, U>,
    {
        match connection {
            AnyConnection::Postgresql(postgres) => RunQueryDsl::load(self, postgres),
            AnyConnection::Sqlite(sqlite) => RunQueryDsl::load(self, sqlite),
        }
    }

    /// How many values are bound.
    #[cfg(test)]
    pub(crate) fn bind_count(&self) -> usize {
        self.parts
            .iter()
            .map(|part| match part {
                Part::Sql(_) => 0,
                Part::Bind(_) => 1,
                Part::Rows(rows) => rows.count * rows.columns.len(),
            })
            .sum()
    }
}

/// Writes whose only answer is how many rows each changed. On SQLite they run one after the
/// other; on PostgreSQL they go as **one** statement, each write a data-modifying `WITH` member
/// (`WITH w0 AS (INSERT … RETURNING 1), w1 AS (UPDATE … RETURNING 1) SELECT ARRAY[count(w0),
/// …]`), so a batch's writes cost one round trip however many tables they touch.
///
/// The members of that one statement see the same snapshot: none may read what another
/// writes, and no row may be written by two members. Every write pushed here must be an
/// `INSERT`, `UPDATE` or `DELETE` without a `RETURNING` clause of its own.
#[derive(Default)]
pub(crate) struct Writes {
    statements: Vec<Statement>,
    /// Per statement: the number of rows it must change, and the error if it changes another.
    expected: Vec<Option<Expected>>,
}

/// A write's expected row count, and the error if it changes another number of rows.
type Expected = (usize, fn() -> StorageError);

/// The rows each member of a combined write changed (PostgreSQL).
#[derive(diesel::QueryableByName)]
struct WriteCounts {
    #[diesel(sql_type = Array<BigInt>)]
    counts: Vec<i64>,
}

impl Writes {
    /// Adds a write that may change any number of rows.
    pub(crate) fn push(&mut self, statement: Statement) {
        self.statements.push(statement);
        self.expected.push(None);
    }

    /// Adds a write that must change exactly `rows` rows; if it changes another number, the
    /// writes fail with `otherwise()` (and the caller's transaction is rolled back).
    pub(crate) fn push_expecting(
        &mut self,
        statement: Statement,
        rows: usize,
        otherwise: fn() -> StorageError,
    ) {
        self.statements.push(statement);
        self.expected.push(Some((rows, otherwise)));
    }

    /// How many statements the writes cost on `connection`'s database.
    pub(crate) fn statements_on(&self, connection: &AnyConnection) -> u32 {
        let count = match connection {
            AnyConnection::Postgresql(_) => usize::from(!self.statements.is_empty()),
            AnyConnection::Sqlite(_) => self.statements.len(),
        };
        u32::try_from(count).unwrap_or(u32::MAX)
    }

    /// Runs the writes in order and checks the counts of those pushed with
    /// [`Writes::push_expecting`].
    pub(crate) fn execute_in(self, connection: &mut AnyConnection) -> Result<(), StorageError> {
        let expected = self.expected;
        let counts = Self::counts(self.statements, connection)?;
        for (count, expected) in counts.into_iter().zip(expected) {
            if let Some((rows, otherwise)) = expected
                && count != rows
            {
                return Err(otherwise());
            }
        }
        Ok(())
    }

    /// Runs `statements`; the number of rows each changed.
    fn counts(
        statements: Vec<Statement>,
        connection: &mut AnyConnection,
    ) -> QueryResult<Vec<usize>> {
        if statements.is_empty() {
            return Ok(Vec::new());
        }
        let postgres = match connection {
            AnyConnection::Sqlite(sqlite) => {
                return statements
                    .into_iter()
                    .map(|statement| RunQueryDsl::execute(statement, sqlite))
                    .collect();
            }
            AnyConnection::Postgresql(postgres) => postgres,
        };
        let members = statements.len();
        let mut combined = Statement::new("WITH ");
        for (index, statement) in statements.into_iter().enumerate() {
            if index > 0 {
                combined.sql(", ");
            }
            combined.sql(&format!("w{index} AS ("));
            combined.parts.extend(statement.parts);
            combined.sql(" RETURNING 1)");
        }
        combined.sql(" SELECT ARRAY[");
        for index in 0..members {
            if index > 0 {
                combined.sql(", ");
            }
            combined.sql(&format!("(SELECT count(*) FROM w{index})"));
        }
        combined.sql("] AS counts");
        let rows: Vec<WriteCounts> = RunQueryDsl::load(combined, postgres)?;
        let counts = rows.into_iter().next().map(|row| row.counts);
        match counts {
            Some(counts) if counts.len() == members => Ok(counts
                .into_iter()
                .map(|count| usize::try_from(count).unwrap_or(0))
                .collect()),
            _ => Err(diesel::result::Error::DeserializationError(
                "a combined write did not answer one count per member".into(),
            )),
        }
    }
}

impl QueryId for Statement {
    type QueryId = ();
    // The text varies, so the statement cache keys it by its SQL (see `walk_ast`).
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl Query for Statement {
    type SqlType = Untyped;
}

impl<Conn> RunQueryDsl<Conn> for Statement {}

impl Statement {
    /// Walks the text and the single binds, handing each set of rows to `rows`.
    fn walk<'b, DB>(
        &'b self,
        out: &mut AstPass<'_, 'b, DB>,
        mut rows: impl FnMut(&'b Rows, &mut AstPass<'_, 'b, DB>) -> QueryResult<()>,
    ) -> QueryResult<()>
    where
        DB: Backend
            + HasSqlType<Nullable<Text>>
            + HasSqlType<Nullable<BigInt>>
            + HasSqlType<Nullable<Binary>>,
        Option<String>: ToSql<Nullable<Text>, DB>,
        Option<i64>: ToSql<Nullable<BigInt>, DB>,
        Option<Vec<u8>>: ToSql<Nullable<Binary>, DB>,
    {
        // Safe to cache: the same text always has the same binds, in number and types.
        for part in &self.parts {
            match part {
                Part::Sql(text) => out.push_sql(text),
                Part::Bind(Value::Text(value)) => {
                    out.push_bind_param::<Nullable<Text>, _>(value)?;
                }
                Part::Bind(Value::Int(value)) => {
                    out.push_bind_param::<Nullable<BigInt>, _>(value)?;
                }
                Part::Bind(Value::Bytes(value)) => {
                    out.push_bind_param::<Nullable<Binary>, _>(value)?;
                }
                Part::Rows(set) => rows(set, out)?,
            }
        }
        Ok(())
    }
}

impl QueryFragment<Pg> for Statement {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        self.walk(&mut out, |rows, out| rows.walk_arrays(out))
    }
}

impl QueryFragment<Sqlite> for Statement {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Sqlite>) -> QueryResult<()> {
        self.walk(&mut out, |rows, out| rows.walk_values(out))
    }
}

#[cfg(test)]
mod tests {
    use diesel::debug_query;

    use super::*;

    fn example() -> Statement {
        let mut statement = Statement::new("INSERT INTO t (a, b) ");
        statement.rows([
            [Value::from("x"), Value::from(1_i64)],
            [Value::from(None::<String>), Value::from(None::<i64>)],
        ]);
        statement.sql(" RETURNING a");
        statement
    }

    /// The statement as SQLite and as PostgreSQL get it: (text, binds) each.
    fn rendered(statement: &Statement) -> [(String, String); 2] {
        let split = |query: String| match query.split_once(" -- binds: ") {
            Some((text, binds)) => (text.to_owned(), binds.to_owned()),
            None => (query, String::new()),
        };
        [
            split(debug_query::<Sqlite, _>(statement).to_string()),
            split(debug_query::<Pg, _>(statement).to_string()),
        ]
    }

    #[test]
    fn rows_are_values_on_sqlite_and_one_array_per_column_on_postgres() {
        let statement = example();
        assert_eq!(statement.bind_count(), 4);
        let [(sqlite, _), (postgres, postgres_binds)] = rendered(&statement);
        assert_eq!(
            sqlite,
            "INSERT INTO t (a, b) VALUES (?, ?), (?, ?) RETURNING a"
        );
        assert_eq!(
            postgres,
            "INSERT INTO t (a, b) SELECT * FROM unnest($1, $2) RETURNING a"
        );
        assert_eq!(postgres_binds, r#"[[Some("x"), None], [Some(1), None]]"#);
    }

    #[test]
    fn the_postgres_text_does_not_depend_on_the_number_of_rows() {
        let text = |count: i64| {
            let mut statement = Statement::new("WITH v (a) AS (");
            statement
                .rows((0..count).map(|n| [Value::from(n)]))
                .sql(") SELECT a FROM v");
            let [(sqlite, _), (postgres, _)] = rendered(&statement);
            (postgres, sqlite)
        };
        let (postgres_1, sqlite_1) = text(1);
        let (postgres_3, sqlite_3) = text(3);
        assert_eq!(postgres_1, postgres_3);
        assert_eq!(
            postgres_1,
            "WITH v (a) AS (SELECT * FROM unnest($1)) SELECT a FROM v"
        );
        assert_ne!(sqlite_1, sqlite_3);
    }

    #[test]
    fn values_are_bound_not_formatted() {
        let mut statement = Statement::new("SELECT 1 WHERE a IN (");
        statement
            .rows([[Value::from("'; DROP TABLE t; --")]])
            .sql(")");
        let [(sqlite, sqlite_binds), (postgres, postgres_binds)] = rendered(&statement);
        assert_eq!(sqlite, "SELECT 1 WHERE a IN (VALUES (?))");
        assert_eq!(postgres, "SELECT 1 WHERE a IN (SELECT * FROM unnest($1))");
        assert!(sqlite_binds.contains("DROP TABLE"), "{sqlite_binds}");
        assert!(postgres_binds.contains("DROP TABLE"), "{postgres_binds}");
    }

    #[test]
    fn rows_of_mixed_shapes_or_none_are_refused_not_rendered() {
        let refused = |rows: Vec<Vec<Value>>| {
            let mut statement = Statement::new("INSERT INTO t ");
            statement.rows(rows);
            let error = QueryFragment::<Sqlite>::to_sql(
                &statement,
                &mut <Sqlite as Backend>::QueryBuilder::default(),
                &Sqlite,
            )
            .err()
            .map(|error| error.to_string());
            let postgres = QueryFragment::<Pg>::to_sql(
                &statement,
                &mut <Pg as Backend>::QueryBuilder::default(),
                &Pg,
            )
            .err()
            .map(|error| error.to_string());
            assert_eq!(error, postgres);
            error
        };
        let text = Value::from("x");
        let int = Value::from(1_i64);
        assert_eq!(refused(vec![]).as_deref(), Some("an empty set of rows"));
        assert_eq!(
            refused(vec![vec![text.clone()], vec![int.clone()]]).as_deref(),
            Some("a row's value is not of its column's type")
        );
        assert_eq!(
            refused(vec![vec![text.clone()], vec![text.clone(), text.clone()]]).as_deref(),
            Some("a row is wider than the first")
        );
        assert_eq!(
            refused(vec![vec![text.clone(), int.clone()], vec![text.clone()]]).as_deref(),
            Some("a row is narrower than the first")
        );
        assert_eq!(refused(vec![vec![text.clone(), int.clone()]]), None);
    }

    /// The connections a combined write is tried on: SQLite in memory, and PostgreSQL when
    /// `NFCPAY_TEST_DATABASE_URL` names one (temporary tables only; required under
    /// `cargo xtask test` and CI, see [`crate::testing`]).
    fn connections() -> Vec<AnyConnection> {
        use diesel::Connection as _;
        let mut connections = vec![AnyConnection::Sqlite(
            SqliteConnection::establish(":memory:").expect("in-memory SQLite"),
        )];
        if let Some(url) = crate::testing::postgres_url("the PostgreSQL connection") {
            connections.push(AnyConnection::Postgresql(
                PgConnection::establish(&url).expect("the test database"),
            ));
        }
        connections
    }

    fn update(id: i64, value: i64) -> Statement {
        let mut statement = Statement::new("UPDATE w_test SET v = ");
        statement.bind(value).sql(" WHERE id = ").bind(id);
        statement
    }

    #[test]
    fn combined_writes_run_in_order_and_check_their_counts() {
        use diesel::connection::SimpleConnection as _;
        for mut connection in connections() {
            match &mut connection {
                AnyConnection::Sqlite(sqlite) => sqlite.batch_execute(
                    "CREATE TEMP TABLE w_test (id BIGINT PRIMARY KEY, v BIGINT NOT NULL)",
                ),
                AnyConnection::Postgresql(postgres) => postgres.batch_execute(
                    "CREATE TEMP TABLE w_test (id BIGINT PRIMARY KEY, v BIGINT NOT NULL)",
                ),
            }
            .expect("a temporary table");
            let mut writes = Writes::default();
            let mut insert = Statement::new("INSERT INTO w_test (id, v) ");
            insert.rows((1..=3_i64).map(|id| [Value::from(id), Value::from(0_i64)]));
            writes.push(insert);
            assert_eq!(writes.statements_on(&connection), 1);
            writes.execute_in(&mut connection).expect("the insert");

            let mut writes = Writes::default();
            writes.push(update(1, 10));
            writes.push_expecting(update(2, 20), 1, || StorageError::Overloaded);
            writes.push(update(404, 1));
            let expected = match connection {
                AnyConnection::Postgresql(_) => 1,
                AnyConnection::Sqlite(_) => 3,
            };
            assert_eq!(writes.statements_on(&connection), expected);
            writes.execute_in(&mut connection).expect("the updates");

            let mut writes = Writes::default();
            writes.push(update(3, 30));
            writes.push_expecting(update(404, 1), 1, || StorageError::Overloaded);
            let error = writes.execute_in(&mut connection).err();
            assert!(matches!(error, Some(StorageError::Overloaded)), "{error:?}");

            let read = Statement::new("SELECT id, v FROM w_test ORDER BY id");
            #[derive(diesel::QueryableByName, Debug, PartialEq)]
            struct Row {
                #[diesel(sql_type = BigInt)]
                id: i64,
                #[diesel(sql_type = BigInt)]
                v: i64,
            }
            let rows: Vec<Row> = read.load_in(&mut connection).expect("the rows");
            let rows: Vec<(i64, i64)> = rows.into_iter().map(|row| (row.id, row.v)).collect();
            // The failed writes ran (the caller's transaction rolls them back).
            assert_eq!(rows, [(1, 10), (2, 20), (3, 30)]);
        }
    }
}
