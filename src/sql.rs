//! Running queries in a way poolers accept, and quoting the values they inline.
//!
//! Every query of the gate goes through [`query`], which uses the simple query protocol: no
//! prepared statement is ever created, so nothing can collide behind PgBouncer in transaction
//! mode (sqlx's `42P05 prepared statement "sqlx_s_1" already exists`). Values are therefore
//! inlined with [`lit`] and [`ident`], which quote them the way PostgreSQL's own `quote_literal`
//! and `quote_ident` do. Every round trip has a deadline ([`ROUND_TRIP_TIMEOUT`]).

use std::time::Duration;

use sqlx::postgres::{PgConnection, PgRow};
use sqlx::{AssertSqlSafe, Row};

use tracing::trace;

use crate::duration::short;

/// Longest round trip of any query of the gate's. Its queries are tiny; one that takes longer
/// rides on a dead socket (a node's network blip, a blackholed address after a failover), and
/// without a deadline it would hang until TCP gives up, about 15 minutes later.
pub(crate) const ROUND_TRIP_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `sql` with the simple query protocol and returns its rows, within
/// [`ROUND_TRIP_TIMEOUT`]. After a timeout the connection is unusable: drop it.
pub(crate) async fn query(conn: &mut PgConnection, sql: String) -> Result<Vec<PgRow>, sqlx::Error> {
    // Every statement, at trace level (`MIGRATIONS_GATE_LOG=migrations_gate::sql=trace`): what
    // the gate asks, for an operator, and the benchmark's floor runs the very same query.
    trace!(sql = %sql, "query");
    query_secret(conn, sql).await
}

/// [`query`] for a statement that carries a secret (the `--same-env` key, fingerprints): never
/// logged, not even at trace level.
pub(crate) async fn query_secret(
    conn: &mut PgConnection,
    sql: String,
) -> Result<Vec<PgRow>, sqlx::Error> {
    deadline(
        ROUND_TRIP_TIMEOUT,
        sqlx::raw_sql(AssertSqlSafe(sql)).fetch_all(conn),
    )
    .await
}

/// Runs `sql` and returns the first column of the first row as text (NULL and no row: `None`).
/// Any column type works: the simple query protocol sends every value as text.
pub(crate) async fn query_scalar(
    conn: &mut PgConnection,
    sql: String,
) -> Result<Option<String>, sqlx::Error> {
    let rows = query(conn, sql).await?;
    match rows.first() {
        Some(row) => row.try_get_unchecked::<Option<String>, _>(0),
        None => Ok(None),
    }
}

/// Runs `sql` like [`query`], but a table of ours that does not exist yet reads as no rows.
pub(crate) async fn query_if_exists(
    conn: &mut PgConnection,
    sql: String,
) -> Result<Vec<PgRow>, sqlx::Error> {
    match query(conn, sql).await {
        Err(e) if is_missing_relation(&e) => Ok(Vec::new()),
        other => other,
    }
}

/// One row of a query, read column by column. The simple query protocol sends every value as
/// text, so every column is read as text and parsed here: a column the caller needs that is
/// NULL or does not parse is a decode error, never a silent default.
#[derive(Clone, Copy)]
pub(crate) struct Cols<'r>(pub(crate) &'r PgRow);

impl Cols<'_> {
    /// Column `i`; NULL is `None`.
    pub(crate) fn opt(&self, i: usize) -> Result<Option<String>, sqlx::Error> {
        self.0.try_get::<Option<String>, _>(i)
    }

    /// Column `i`; NULL is a decode error.
    pub(crate) fn text(&self, i: usize) -> Result<String, sqlx::Error> {
        self.0.try_get::<String, _>(i)
    }

    /// Column `i` parsed; NULL or text that does not parse is a decode error.
    pub(crate) fn parse<T>(&self, i: usize) -> Result<T, sqlx::Error>
    where
        T: std::str::FromStr,
        T::Err: std::error::Error + Send + Sync + 'static,
    {
        parse_column(i, &self.text(i)?)
    }

    /// Column `i` parsed, where NULL or empty text means "none"; other text that does not parse
    /// is a decode error.
    pub(crate) fn parse_opt<T>(&self, i: usize) -> Result<Option<T>, sqlx::Error>
    where
        T: std::str::FromStr,
        T::Err: std::error::Error + Send + Sync + 'static,
    {
        match self.opt(i)? {
            Some(t) if !t.is_empty() => parse_column(i, &t).map(Some),
            _ => Ok(None),
        }
    }
}

/// The first row of `rows`, which a query that always returns one must have.
pub(crate) fn one_row(rows: &[PgRow]) -> Result<Cols<'_>, sqlx::Error> {
    rows.first()
        .map(Cols)
        .ok_or_else(|| invariant("the query returned no row"))
}

/// A promise of the gate's own queries that the server's answer broke (a row that must be
/// there is not): a bug or a hand-edited table, never a passing condition. Classified as an
/// internal error (exit 70), not retried ([`crate::db::Db::classify`]).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Invariant(String);

/// The error for a broken [`Invariant`].
pub(crate) fn invariant(what: impl Into<String>) -> sqlx::Error {
    sqlx::Error::Decode(Box::new(Invariant(what.into())))
}

fn parse_column<T>(i: usize, text: &str) -> Result<T, sqlx::Error>
where
    T: std::str::FromStr,
    T::Err: std::error::Error + Send + Sync + 'static,
{
    text.parse().map_err(|e: T::Err| sqlx::Error::ColumnDecode {
        index: i.to_string(),
        source: Box::new(e),
    })
}

/// `SQLSTATE`s that mean "a table of ours does not exist yet" (nor, perhaps, its schema).
pub(crate) fn is_missing_relation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("42P01") | Some("3F000")))
}

/// `SQLSTATE` 25006: a write on a read-only standby.
pub(crate) fn is_read_only(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("25006"))
}

/// `fut`, or a timed-out I/O error after `limit`.
pub(crate) async fn deadline<T>(
    limit: Duration,
    fut: impl Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, sqlx::Error> {
    match tokio::time::timeout(limit, fut).await {
        Ok(result) => result,
        Err(_) => Err(sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer within {}", short(limit)),
        ))),
    }
}

/// A SQL string literal: `E'...'` with `\` and `'` escaped, correct whatever
/// `standard_conforming_strings` says.
pub(crate) fn lit(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 3);
    out.push_str("E'");
    for ch in s.chars() {
        match ch {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            '\0' => {} // PostgreSQL text cannot hold NUL.
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// A SQL identifier, always double-quoted.
pub(crate) fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('\0', "").replace('"', "\"\""))
}

/// A statement laid out one clause per line, for the snapshots that pin statements' text.
#[cfg(test)]
pub(crate) fn pretty(sql: &str) -> String {
    sqlformat::format(
        sql,
        &sqlformat::QueryParams::None,
        &sqlformat::FormatOptions::default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lit_escapes_quotes_and_backslashes_and_drops_nul() {
        assert_eq!(lit("r1"), "E'r1'");
        assert_eq!(lit("it's"), "E'it''s'");
        assert_eq!(lit(r"a\b"), r"E'a\\b'");
        assert_eq!(lit("a\0b"), "E'ab'");
        assert_eq!(lit(""), "E''");
    }

    #[test]
    fn ident_always_quotes_and_doubles_inner_quotes() {
        assert_eq!(ident("migrations_gate"), "\"migrations_gate\"");
        assert_eq!(ident("My \"odd\" schema"), "\"My \"\"odd\"\" schema\"");
        assert_eq!(ident("a\0b"), "\"ab\"");
    }
}
