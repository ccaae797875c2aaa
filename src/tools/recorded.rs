//! What the holders recorded in `<schema>.tool_locks` about migration tools' locks ([`super::locks`]),
//! as `status` shows it.

use std::fmt;

use crate::sql::Cols;

/// A tool's lock a holder found held before it migrated, released or left alone, as `status`
/// shows it (`<schema>.tool_locks`). The JSON field names are a stable interface.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct ToolLock {
    /// The attempt that found it.
    pub(crate) attempt: i64,
    /// Whether that attempt released it (false: left alone).
    pub(crate) released: bool,
    /// `Liquibase` or `yoyo`.
    pub(crate) tool: String,
    /// `schema.table`.
    pub(crate) table: String,
    /// Who held it, as the tool recorded it.
    pub(crate) locked_by: String,
    /// Since when, as the tool recorded it (`null`: unknown).
    pub(crate) locked_at: Option<String>,
    /// The earlier attempt that took it.
    pub(crate) taken_in: Option<i64>,
    /// When the attempt found it (and released it, if it did), RFC 3339 UTC.
    pub(crate) seen_at: String,
}

impl fmt::Display for ToolLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "attempt {} {} {}'s lock in {} (locked by {} since {}",
            self.attempt,
            if self.released {
                "released"
            } else {
                "left alone"
            },
            self.tool,
            self.table,
            self.locked_by,
            self.locked_at.as_deref().unwrap_or("an unknown time")
        )?;
        if let Some(id) = self.taken_in {
            write!(f, ", taken in attempt {id}")?;
        }
        write!(f, ") at {}", self.seen_at.replace('T', " "))
    }
}

/// The tool locks the attempts `ids` found held, oldest first (none when no holder ever
/// looked: the table does not exist).
pub(crate) async fn found_tool_locks(
    conn: &mut sqlx::PgConnection,
    tables: &crate::schema::Tables,
    ids: &[i64],
) -> Result<Vec<ToolLock>, sqlx::Error> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let sql = found_statement(&tables.tool_locks(), ids);
    crate::sql::query_if_exists(conn, sql)
        .await?
        .iter()
        .map(|r| {
            let c = Cols(r);
            Ok(ToolLock {
                attempt: c.parse(0)?,
                tool: c.text(1)?,
                table: c.text(2)?,
                locked_by: c.text(3)?,
                locked_at: c.opt(4)?,
                taken_in: c.parse_opt(5)?,
                seen_at: c.text(6)?,
                released: c.parse(7)?,
            })
        })
        .collect()
}

/// The statement of [`found_tool_locks`]: the rows of `tool_locks` (quoted) of the attempts
/// `ids`.
fn found_statement(tool_locks: &str, ids: &[i64]) -> String {
    let ids: Vec<String> = ids.iter().map(ToString::to_string).collect();
    format!(
        "SELECT attempt_id::text, tool, lock_table, locked_by, locked_at, coalesce(taken_in::text, ''), \
                to_char(seen_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), released::text \
         FROM {} WHERE attempt_id IN ({}) ORDER BY seen_at",
        tool_locks,
        ids.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Effect: tests/recovery.rs (`status --json` shows the released lock with the attempt
    /// that found it).
    #[test]
    fn found_statement_whole() {
        insta::assert_snapshot!(crate::sql::pretty(&found_statement(
            "\"migrations_gate\".tool_locks",
            &[7, 9]
        )));
    }
}
