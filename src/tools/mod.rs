//! What a migration *tool* leaves behind when an attempt ends badly, which the gate's own
//! takeover does not undo: a lock row the tool committed ([`locks`]), and its marker of a
//! half-applied migration ([`dirty`]).
//!
//! Tools that lock with a row rather than with a session-level advisory lock cannot tell a crashed
//! run from a slow one, which is why their docs say to run `liquibase release-locks` or
//! `yoyo break-lock` "only if you are sure no migration is running". The holder is the one party
//! that is sure: it holds the gate's lock, and it has ended every session of the earlier
//! attempts. Tools that lock with `pg_advisory_lock` (Flyway, golang-migrate, Prisma,
//! node-pg-migrate, sqlx, dbmate) leave nothing: PostgreSQL frees a session's locks when it ends.

use sqlx::postgres::PgConnection;

use crate::sql::{Cols, lit, query};

mod dirty;
mod locks;
mod recorded;

pub(crate) use dirty::report_dirty;
pub(crate) use locks::clear_stale_locks;
pub(crate) use recorded::{ToolLock, found_tool_locks};

/// A table of a known tool, found in the gated database.
#[derive(Debug, Clone)]
struct ToolTable {
    /// Its schema.
    schema: String,
    /// Its name.
    name: String,
}

impl ToolTable {
    /// `schema.name`, quoted for SQL.
    fn sql(&self) -> String {
        format!(
            "{}.{}",
            crate::sql::ident(&self.schema),
            crate::sql::ident(&self.name)
        )
    }

    /// `schema.name`, for people.
    fn shown(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }
}

/// The tables named one of `names` in any schema of the database that the role may see (a
/// tool's tables live in the schema its own connection uses, which need not be the gate's).
async fn find(conn: &mut PgConnection, names: &[&str]) -> Result<Vec<ToolTable>, sqlx::Error> {
    let sql = find_statement(names);
    query(conn, sql)
        .await?
        .iter()
        .map(|r| {
            let c = Cols(r);
            Ok(ToolTable {
                schema: c.text(0)?,
                name: c.text(1)?,
            })
        })
        .collect()
}

/// The statement of [`find`].
fn find_statement(names: &[&str]) -> String {
    let names: Vec<String> = names.iter().map(|n| lit(n)).collect();
    format!(
        "SELECT n.nspname::text, c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relkind IN ('r', 'p') AND c.relname IN ({}) \
           AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
         ORDER BY n.nspname, c.relname",
        names.join(", ")
    )
}

#[cfg(test)]
mod tests {
    /// Effect: tests/recovery.rs (Liquibase's and yoyo's lock tables and golang-migrate's
    /// `schema_migrations` are found in the gated database).
    #[test]
    fn find_statement_whole() {
        insta::assert_snapshot!(crate::sql::pretty(&super::find_statement(&[
            "databasechangeloglock",
            "yoyo_lock"
        ])));
    }
}
