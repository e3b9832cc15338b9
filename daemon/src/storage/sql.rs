//! Set-based statements: one SQL text with any number of rows, for both databases.
//!
//! The batch writer (`batch`) reads and writes every row a group commit touches with a
//! constant number of statements — `WHERE id IN (…)`, `INSERT … VALUES (…), (…)`,
//! `WITH v(…) AS (VALUES …) UPDATE … FROM v` — whatever the batch size. Diesel's query builder
//! cannot express the multi-row `UPDATE … FROM`, and its `sql_query` is never cached, so this
//! module has its own small statement type: SQL text with typed bind parameters, rendered with
//! each backend's placeholders (`$1` or `?`) by diesel itself, and safe to cache, so a
//! statement of a given shape (table, columns, number of rows) is prepared once per connection.
//!
//! Values are bound, never formatted into the text: only identifiers written in this crate
//! go into the SQL.

use diesel::backend::{Backend, DieselReserveSpecialization};
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::serialize::ToSql;
use diesel::sql_types::{BigInt, Binary, HasSqlType, Nullable, Text, Untyped};
use diesel::{QueryResult, RunQueryDsl};

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

    /// Appends `(v1, v2, …)`, one placeholder per value.
    pub(crate) fn row(&mut self, values: impl IntoIterator<Item = Value>) -> &mut Self {
        self.sql("(");
        for (index, value) in values.into_iter().enumerate() {
            if index > 0 {
                self.sql(", ");
            }
            self.bind(value);
        }
        self.sql(")")
    }

    /// Appends `(…), (…), …`: the rows of a `VALUES` list.
    pub(crate) fn rows<R>(&mut self, rows: impl IntoIterator<Item = R>) -> &mut Self
    where
        R: IntoIterator<Item = Value>,
    {
        for (index, row) in rows.into_iter().enumerate() {
            if index > 0 {
                self.sql(", ");
            }
            self.row(row);
        }
        self
    }

    /// How many values are bound.
    #[cfg(test)]
    pub(crate) fn bind_count(&self) -> usize {
        self.parts
            .iter()
            .filter(|part| matches!(part, Part::Bind(_)))
            .count()
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

impl<DB> QueryFragment<DB> for Statement
where
    DB: Backend
        + DieselReserveSpecialization
        + HasSqlType<Nullable<Text>>
        + HasSqlType<Nullable<BigInt>>
        + HasSqlType<Nullable<Binary>>,
    Option<String>: ToSql<Nullable<Text>, DB>,
    Option<i64>: ToSql<Nullable<BigInt>, DB>,
    Option<Vec<u8>>: ToSql<Nullable<Binary>, DB>,
{
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, DB>) -> QueryResult<()> {
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
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use diesel::debug_query;
    use diesel::pg::Pg;
    use diesel::sqlite::Sqlite;

    use super::*;

    fn example() -> Statement {
        let mut statement = Statement::new("INSERT INTO t (a, b) VALUES ");
        statement.rows([
            [Value::from("x"), Value::from(1_i64)],
            [Value::from(None::<String>), Value::from(vec![1_u8, 2])],
        ]);
        statement.sql(" RETURNING a");
        statement
    }

    #[test]
    fn placeholders_follow_the_backend() {
        let statement = example();
        assert_eq!(statement.bind_count(), 4);
        let postgres = debug_query::<Pg, _>(&statement).to_string();
        assert!(
            postgres.starts_with("INSERT INTO t (a, b) VALUES ($1, $2), ($3, $4) RETURNING a"),
            "{postgres}"
        );
        let sqlite = debug_query::<Sqlite, _>(&statement).to_string();
        assert!(
            sqlite.starts_with("INSERT INTO t (a, b) VALUES (?, ?), (?, ?) RETURNING a"),
            "{sqlite}"
        );
    }

    #[test]
    fn values_are_bound_not_formatted() {
        let mut statement = Statement::new("SELECT 1 WHERE a IN ");
        statement.row([Value::from("'; DROP TABLE t; --")]);
        let sqlite = debug_query::<Sqlite, _>(&statement).to_string();
        assert!(sqlite.starts_with("SELECT 1 WHERE a IN (?)"), "{sqlite}");
    }
}
