//! Stale lock rows of migration tools, released by the holder when it is safe.
//!
//! # When a tool's lock is stale
//! The holder releases a tool's lock row in one statement that also proves, in its `WHERE`:
//! - that our lock session still holds the gate's lock ([`Proof`]), so no other attempt of this
//!   gate runs; and it runs only after every session of the earlier attempts is gone
//!   ([`crate::protocol`], "end earlier sessions");
//! - that an earlier attempt of this lock, now ended, took it: the time the tool wrote
//!   (Liquibase's `LOCKGRANTED`, yoyo's `ctime`), read as UTC, lies within that attempt's
//!   interval in the ledger, give or take the tool's clock slack ([`Tool::slack_secs`]); for
//!   Liquibase also the host in `LOCKEDBY` is that attempt's host; and that attempt did not
//!   find the very same lock held when it began (every holder records, in
//!   `<schema>.tool_locks`, the locks it found held and left alone, before its migration
//!   starts).
//!
//! Any other lock (taken outside the gate, by another gate, or with a tool clock or time zone
//! off by more than the slack) is left alone and named with the tool's own way out. A role that
//! may not create `<schema>.tool_locks` releases nothing: without that record, a lock taken
//! outside the gate just before an attempt began would look like the attempt's. The limit: a
//! lock that a migration outside the gate took *while* a gated attempt ran looks like that
//! attempt's; two migrations at once is what the gate exists to prevent.
//!
//! # Known tools
//! | tool | table | held when | released as the tool's command does |
//! |---|---|---|---|
//! | Liquibase | `databasechangeloglock` | `locked` | `liquibase release-locks`: `UPDATE ... SET locked = false, lockgranted = NULL, lockedby = NULL` |
//! | yoyo | `yoyo_lock` | a row exists | `yoyo break-lock`: `DELETE FROM yoyo_lock` |
//!
//! knex's `knex_migrations_lock` records no owner and no time, so nothing proves who took it:
//! it is named, never released. goose's table locker and Mattermost's `db_lock` expire by lease.

use std::fmt;

use tracing::{info, warn};

use super::{ToolTable, find};
use crate::ledger::HeldAttempt;
use crate::lock::{Proof, format_held, lock_held};
use crate::replica::Replica;
use crate::sql::{Cols, ident, lit, query};

/// A migration tool that locks with a committed row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tool {
    Liquibase,
    Yoyo,
    Knex,
}

const TOOLS: [Tool; 3] = [Tool::Liquibase, Tool::Yoyo, Tool::Knex];

impl Tool {
    fn name(self) -> &'static str {
        match self {
            Tool::Liquibase => "Liquibase",
            Tool::Yoyo => "yoyo",
            Tool::Knex => "knex",
        }
    }

    fn table(self) -> &'static str {
        match self {
            Tool::Liquibase => "databasechangeloglock",
            Tool::Yoyo => "yoyo_lock",
            Tool::Knex => "knex_migrations_lock",
        }
    }

    /// The tool's own command that releases the lock.
    fn way_out(self) -> &'static str {
        match self {
            Tool::Liquibase => "liquibase release-locks",
            Tool::Yoyo => "yoyo break-lock",
            Tool::Knex => "knex migrate:unlock",
        }
    }

    /// Seconds of difference allowed between the clock that wrote the lock's time and the
    /// server's: Liquibase writes the server's `NOW()` (in the JVM's time zone), yoyo the
    /// client's `datetime.now(timezone.utc)`.
    fn slack_secs(self) -> u32 {
        match self {
            Tool::Liquibase => 1,
            Tool::Yoyo | Tool::Knex => 10,
        }
    }

    /// The privilege the gate's role needs on the table to release the lock.
    fn privilege(self) -> &'static str {
        match self {
            Tool::Liquibase | Tool::Knex => "UPDATE",
            Tool::Yoyo => "DELETE",
        }
    }
}

/// How [`name_held`] records the locks it finds held.
#[derive(Debug, Clone, Copy)]
struct LockNote {
    /// The attempt that found them.
    attempt: i64,
    /// Whether every lock is left alone (`--keep-tool-locks`, or no record possible).
    leave_alone: bool,
    /// Whether they can be recorded in `tool_locks`.
    recorded: bool,
}

/// A lock row a holder released.
#[derive(Debug, Clone)]
struct Unlocked {
    tool: Tool,
    table: String,
    locked_by: String,
    locked_at: String,
    /// The earlier attempt that took it.
    taken_in: Option<i64>,
}

impl fmt::Display for Unlocked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "released {}'s stale lock in {} (locked by {} since {}",
            self.tool.name(),
            self.table,
            self.locked_by,
            self.locked_at
        )?;
        match self.taken_in {
            Some(id) => write!(f, ", in attempt {id})"),
            None => write!(f, ")"),
        }
    }
}

/// Releases the lock rows of known tools that an earlier, ended attempt of this lock took
/// (see the module documentation), records each in `<schema>.tool_locks` with `attempt`, and
/// names every other held lock. Returns what was released, for the attempt's record.
///
/// Runs after every earlier attempt's sessions are gone and before the migration starts. It
/// never fails the attempt: a lock it cannot release (no privilege, an error) is logged with
/// what to do, and the tool then waits for its lock as it would without the gate.
pub(crate) async fn clear_stale_locks(
    replica: &Replica,
    conn: &mut sqlx::PgConnection,
    held: &HeldAttempt,
    leave_alone: bool,
) -> Vec<String> {
    let names: Vec<&str> = TOOLS.iter().map(|t| t.table()).collect();
    let found = match find(conn, &names).await {
        Ok(found) => found,
        Err(e) => {
            warn!(error = %e, "could not look for migration tools' lock tables");
            return Vec::new();
        }
    };
    if found.is_empty() {
        return Vec::new();
    }
    let tables = replica.ledger.tables();
    let recorded = match tables.create_tool_locks(conn).await {
        Ok(()) => true,
        Err(e) => {
            warn!(
                "could not create {} to record migration tools' locks ({e}); tool locks are left alone",
                tables.tool_locks()
            );
            false
        }
    };
    let leave_alone = leave_alone || !recorded;
    let mut notes = Vec::new();
    for table in found {
        let Some(tool) = TOOLS.into_iter().find(|t| t.table() == table.name) else {
            continue;
        };
        if !leave_alone {
            match unlock(replica, conn, tool, &table, held).await {
                Ok(released) => notes.extend(released.iter().map(ToString::to_string)),
                Err(e) => warn!(
                    tool = tool.name(),
                    table = table.shown(),
                    "could not release {}'s lock in {} ({e}); the role {} needs `GRANT {} ON {} TO {}`, or run `{}` once no migration is running",
                    tool.name(),
                    table.shown(),
                    ident(replica.db.username()),
                    tool.privilege(),
                    table.sql(),
                    ident(replica.db.username()),
                    tool.way_out()
                ),
            }
        }
        let how = LockNote {
            attempt: held.id,
            leave_alone,
            recorded,
        };
        if let Err(e) = name_held(replica, conn, tool, &table, how).await {
            warn!(error = %e, table = table.shown(), "could not read {}'s lock", tool.name());
        }
    }
    notes
}

/// Releases `tool`'s lock rows in `table` that an earlier attempt took, under the proof, and
/// records them.
async fn unlock(
    replica: &Replica,
    conn: &mut sqlx::PgConnection,
    tool: Tool,
    table: &ToolTable,
    held: &HeldAttempt,
) -> Result<Vec<Unlocked>, sqlx::Error> {
    let tables = replica.ledger.tables();
    let Some(sql) = unlock_statement(
        tool,
        (&table.sql(), &table.shown()),
        (&tables.ledger(), &tables.tool_locks(), replica.lock().key),
        (held.id, &held.proof),
    ) else {
        return Ok(Vec::new());
    };
    let rows = query(conn, sql).await?;
    let mut released = Vec::new();
    for r in &rows {
        let c = Cols(r);
        let one = Unlocked {
            tool,
            table: table.shown(),
            locked_by: c.text(0)?,
            locked_at: c.opt(1)?.unwrap_or_else(|| "an unknown time".into()),
            taken_in: c.parse_opt(2)?,
        };
        info!(
            tool = tool.name(),
            table = table.shown(),
            locked_by = one.locked_by,
            locked_at = one.locked_at,
            "{one}: an earlier attempt of this gate took it, and all its sessions are gone"
        );
        released.push(one);
    }
    Ok(released)
}

/// The statement that releases `tool`'s lock rows in `table` (quoted; `shown` for the record)
/// that an earlier, ended attempt of this lock took, while the lock session of `proof` holds the
/// lock, and records each in the gate's `tool_locks` with `attempt`, in the same statement:
/// released exactly when recorded. It returns each row as it was: who held it (`who`), since when
/// (`at`, text) and the attempt that took it (`taken_in`). `None` for a tool whose lock is never
/// released.
///
/// The attempt that took a lock row (`taken_in`): the newest of this lock's ended attempts,
/// other than `attempt`, within whose interval the tool's time (a `timestamp`, read as UTC) lies,
/// give or take [`Tool::slack_secs`], and which did not find the very same lock held when it
/// began; for Liquibase also on whose host (the host part of `LOCKEDBY`, which is
/// `host[#description] (address)`). Computed once per row, in the locked read of the row.
fn unlock_statement(
    tool: Tool,
    (table, shown): (&str, &str),
    (ledger, tool_locks, lock_key): (&str, &str, i64),
    (attempt, proof): (i64, &Proof),
) -> Option<String> {
    // Each tool's statement whole at compile time; the same values bound.
    macro_rules! unlock {
        ($sql:expr) => {
            format_held!(
                proof,
                $sql,
                table = table,
                ledger = ledger,
                lock_key = lock_key,
                attempt = attempt,
                tool_locks = tool_locks,
                slack = tool.slack_secs(),
                name = lit(tool.name()),
                shown = lit(shown),
            )
        };
    }
    match tool {
        // An UPDATE returns the new row: the old one comes from the locked read.
        Tool::Liquibase => Some(unlock!(concat!(
            "WITH r AS ( \
                   UPDATE {table} SET locked = false, lockgranted = NULL, lockedby = NULL \
                   FROM (SELECT k.id AS o_id, coalesce(k.lockedby, 'unknown') AS o_who, k.lockgranted AS o_at, \
                                (SELECT max(l.id) FROM {ledger} l \
                                 WHERE l.lock_key = {lock_key} AND l.id <> {attempt} AND l.outcome <> 'running' \
                                   AND (k.lockgranted AT TIME ZONE 'UTC') BETWEEN l.started_at - make_interval(secs => {slack}) \
                                       AND coalesce(l.finished_at, l.heartbeat_at, l.started_at) + make_interval(secs => {slack}) \
                                   AND lower(split_part(l.host, '.', 1)) = lower(split_part(split_part(split_part( \
                                       coalesce(k.lockedby, 'unknown'), ' (', 1), '#', 1), '.', 1)) \
                                   AND NOT EXISTS (SELECT 1 FROM {tool_locks} s WHERE s.attempt_id = l.id AND NOT s.released \
                                       AND s.tool = {name} AND s.locked_by = coalesce(k.lockedby, 'unknown') \
                                       AND s.locked_at IS NOT DISTINCT FROM k.lockgranted::text)) AS o_taken_in \
                         FROM {table} k WHERE k.locked FOR UPDATE) o \
                   WHERE {table}.id = o.o_id AND o.o_taken_in IS NOT NULL AND ",
            lock_held!(),
            " RETURNING o.o_who AS who, o.o_at::text AS at, o.o_taken_in AS taken_in), \
                 i AS (INSERT INTO {tool_locks} (attempt_id, tool, lock_table, locked_by, locked_at, taken_in, released) \
                       SELECT {attempt}, {name}, {shown}, r.who, r.at, r.taken_in, true FROM r) \
                 SELECT who, at, taken_in::text FROM r"
        ))),
        Tool::Yoyo => Some(unlock!(concat!(
            "WITH r AS ( \
                   DELETE FROM {table} k \
                   USING (SELECT k.ctid AS o_ctid, \
                                 (SELECT max(l.id) FROM {ledger} l \
                                  WHERE l.lock_key = {lock_key} AND l.id <> {attempt} AND l.outcome <> 'running' \
                                    AND (k.ctime AT TIME ZONE 'UTC') BETWEEN l.started_at - make_interval(secs => {slack}) \
                                        AND coalesce(l.finished_at, l.heartbeat_at, l.started_at) + make_interval(secs => {slack}) \
                                    AND NOT EXISTS (SELECT 1 FROM {tool_locks} s WHERE s.attempt_id = l.id AND NOT s.released \
                                        AND s.tool = {name} AND s.locked_by = 'process ' || k.pid \
                                        AND s.locked_at IS NOT DISTINCT FROM k.ctime::text)) AS o_taken_in \
                          FROM {table} k) o \
                   WHERE k.ctid = o.o_ctid AND o.o_taken_in IS NOT NULL AND ",
            lock_held!(),
            " RETURNING 'process ' || k.pid AS who, k.ctime::text AS at, o.o_taken_in AS taken_in), \
                 i AS (INSERT INTO {tool_locks} (attempt_id, tool, lock_table, locked_by, locked_at, taken_in, released) \
                       SELECT {attempt}, {name}, {shown}, r.who, r.at, r.taken_in, true FROM r) \
                 SELECT who, at, taken_in::text FROM r"
        ))),
        Tool::Knex => None,
    }
}

/// Logs every lock of `tool` in `table` still held (not an earlier attempt's, so not ours to
/// release), and records it as found held when `attempt` began: a later holder must not take
/// it for this attempt's.
async fn name_held(
    replica: &Replica,
    conn: &mut sqlx::PgConnection,
    tool: Tool,
    table: &ToolTable,
    how: LockNote,
) -> Result<(), sqlx::Error> {
    let LockNote {
        attempt,
        leave_alone,
        recorded,
    } = how;
    let tool_locks = replica.ledger.tables().tool_locks();
    let record = recorded.then_some((tool_locks.as_str(), attempt));
    let sql = name_held_statement(tool, (&table.sql(), &table.shown()), record);
    for r in &query(conn, sql).await? {
        let c = Cols(r);
        let who = c.text(0)?;
        let when = c.opt(1)?.unwrap_or_else(|| "an unknown time".into());
        let why = if leave_alone {
            "left alone (--keep-tool-locks)".to_string()
        } else if tool == Tool::Knex {
            "left alone: knex records no owner, so nothing proves that a crashed attempt took it"
                .to_string()
        } else {
            "left alone: no earlier attempt of this gate took it (a migration outside the gate, or a tool clock or time zone other than the server's UTC)".to_string()
        };
        warn!(
            tool = tool.name(),
            table = table.shown(),
            locked_by = who,
            locked_at = when,
            "{}'s lock in {} is held by {who} since {when}; {why}; the migration waits for it. If no migration is running, `{}` releases it",
            tool.name(),
            table.shown(),
            tool.way_out()
        );
    }
    Ok(())
}

/// SQL, a string literal: the held lock rows of a tool's table `{table}` (aliased `k`): who
/// holds each, as the tool records it, and since when (the `timestamp` it wrote, as text, or
/// NULL). Columns of the tool's table are qualified `k.`.
macro_rules! held_rows {
    (Liquibase) => {
        "SELECT coalesce(k.lockedby, 'unknown') AS who, k.lockgranted::text AS at FROM {table} k WHERE k.locked"
    };
    (Yoyo) => {
        "SELECT 'process ' || k.pid AS who, k.ctime::text AS at FROM {table} k WHERE true"
    };
    (Knex) => {
        "SELECT 'unknown (knex records no owner)' AS who, NULL::timestamp::text AS at FROM {table} k WHERE k.is_locked = 1"
    };
}

/// SQL, a string literal: [`held_rows`] of `$tool`, each also recorded in the gate's
/// `{tool_locks}` as left alone by attempt `{attempt}` (`{tool}` and `{shown}`: literals).
macro_rules! held_rows_recorded {
    ($tool:ident) => {
        concat!(
            "WITH h AS (",
            held_rows!($tool),
            "), i AS (INSERT INTO {tool_locks} (attempt_id, tool, lock_table, locked_by, locked_at, released) \
                 SELECT {attempt}, {tool}, {shown}, h.who, h.at, false FROM h) \
             SELECT who, at FROM h"
        )
    };
}

/// The statement of [`name_held`]: who holds `tool`'s lock rows in `table` (quoted; `shown` for
/// the record) and since when (text); with `record` (the gate's `tool_locks` and the attempt),
/// it also records each as left alone, in the same statement.
fn name_held_statement(
    tool: Tool,
    (table, shown): (&str, &str),
    record: Option<(&str, i64)>,
) -> String {
    let Some((tool_locks, attempt)) = record else {
        return match tool {
            Tool::Liquibase => format!(held_rows!(Liquibase), table = table),
            Tool::Yoyo => format!(held_rows!(Yoyo), table = table),
            Tool::Knex => format!(held_rows!(Knex), table = table),
        };
    };
    let (name, shown) = (lit(tool.name()), lit(shown));
    // One statement text per tool, each whole at compile time; the same values bound.
    macro_rules! recorded {
        ($tool:ident) => {
            format!(
                held_rows_recorded!($tool),
                table = table,
                tool_locks = tool_locks,
                attempt = attempt,
                tool = name,
                shown = shown
            )
        };
    }
    match tool {
        Tool::Liquibase => recorded!(Liquibase),
        Tool::Yoyo => recorded!(Yoyo),
        Tool::Knex => recorded!(Knex),
    }
}

#[cfg(test)]
mod tests;
