//! What an attempt's sessions wait on: the sessions of a running migration that wait on a lock,
//! the lock (relation and mode) and who blocks them (`pg_blocking_pids`), in one query over
//! `pg_stat_activity` and `pg_locks`. The holder reports them while the migration runs
//! ([`Reporter`]), and `status` shows them for a running attempt.
//!
//! Never the text of a query: it can carry secrets and personal data, and logs are widely
//! readable. A statement shows as its command tag only (`ALTER TABLE`, `SELECT`), cut from the
//! start of the query on the server.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

use sqlx::postgres::PgConnection;
use tracing::{info, warn};

use crate::sessions::Which;
use crate::sql::{Cols, query};

/// How often a wait that lasts is reported again.
pub(crate) const REPEAT: Duration = Duration::from_secs(30);

/// A session that blocks a waiting one.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub(crate) struct Blocker {
    /// Backend PID.
    pub(crate) pid: i32,
    /// Its `application_name`.
    pub(crate) application_name: String,
    /// Its client address (`local` for a Unix socket, empty when hidden).
    pub(crate) client: String,
    /// `active`, `idle in transaction`, ... (empty when hidden from our role).
    pub(crate) state: String,
    /// How long its transaction has been open, in seconds (`None`: no transaction, or hidden).
    pub(crate) transaction_secs: Option<f64>,
    /// The command tag of its current (or last) statement.
    pub(crate) command: String,
}

impl fmt::Display for Blocker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pid {} (application_name {:?}, client {}, {}",
            self.pid,
            self.application_name,
            if self.client.is_empty() {
                "hidden"
            } else {
                &self.client
            },
            if self.state.is_empty() {
                "state hidden"
            } else {
                &self.state
            }
        )?;
        if let Some(t) = self.transaction_secs {
            write!(f, ", transaction open {t:.0}s")?;
        }
        if !self.command.is_empty() {
            write!(f, ", {}", self.command)?;
        }
        write!(f, ")")
    }
}

/// A session of the attempt waiting on a lock.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub(crate) struct Wait {
    /// Backend PID of the waiting session.
    pub(crate) pid: i32,
    /// The command tag of its statement.
    pub(crate) command: String,
    /// How long it has waited, in seconds (since its statement started, before PostgreSQL 14).
    pub(crate) waited_secs: f64,
    /// The relation it waits for (`pg_locks.relation::regclass`), or the lock type.
    pub(crate) lock: String,
    /// The mode of its ungranted lock (`AccessExclusiveLock`).
    pub(crate) mode: String,
    /// Who blocks it (`pg_blocking_pids`).
    pub(crate) blocked_by: Vec<Blocker>,
}

impl fmt::Display for Wait {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pid {}", self.pid)?;
        if !self.command.is_empty() {
            write!(f, " ({})", self.command)?;
        }
        write!(
            f,
            " has waited {:.0}s for {} on {}",
            self.waited_secs, self.mode, self.lock
        )?;
        if self.blocked_by.is_empty() {
            return write!(f, "; blocked by: nobody visible");
        }
        let by: Vec<String> = self.blocked_by.iter().map(ToString::to_string).collect();
        write!(f, "; blocked by {}", by.join(", "))
    }
}

/// The sessions `which` selects that have waited on a lock for at least `after`, with their
/// blockers: one query. `server_version` (`server_version_num`) 14+ knows when the wait began
/// (`pg_locks.waitstart`); before, the statement's start stands in.
pub(crate) async fn waits(
    conn: &mut PgConnection,
    which: &Which,
    after: Duration,
    server_version: u32,
) -> Result<Vec<Wait>, sqlx::Error> {
    let sql = waits_statement(which, after, server_version);
    let mut found: Vec<Wait> = Vec::new();
    for r in &query(conn, sql).await? {
        let c = Cols(r);
        let pid: i32 = c.parse(0)?;
        if found.last().map(|w| w.pid) != Some(pid) {
            found.push(Wait {
                pid,
                command: c.text(1)?,
                waited_secs: c.parse(2)?,
                lock: c.text(3)?,
                mode: c.text(4)?,
                blocked_by: Vec::new(),
            });
        }
        let blocker = c.text(5)?;
        if let (Some(w), Ok(bpid)) = (found.last_mut(), blocker.parse()) {
            w.blocked_by.push(Blocker {
                pid: bpid,
                application_name: c.text(6)?,
                client: c.text(7)?,
                state: c.text(8)?,
                transaction_secs: c.text(9)?.parse().ok(),
                command: c.text(10)?,
            });
        }
    }
    Ok(found)
}

/// SQL, a string literal: the statement of [`waits`], one row per waiting session and blocker,
/// with `$since` (a literal) for when a wait began; it binds `which` ([`Which::condition`]) and
/// `after` (seconds) by name. A statement shows as its command tag only (`w.command`,
/// `b.command`): the first word of its text, and `TABLE`, `INDEX` or `MATERIALIZED VIEW` after
/// it; empty when the text is hidden from our role or starts otherwise (a comment).
macro_rules! waits_sql {
    ($since:literal) => {
        concat!(
            "SELECT w.pid::text, w.command, round(w.secs::numeric, 1)::text, w.lock, w.mode, \
                    coalesce(b.pid::text, ''), coalesce(b.application_name, ''), \
                    coalesce(host(b.client_addr), CASE WHEN b.pid IS NOT NULL AND b.client_port = -1 THEN 'local' ELSE '' END), \
                    coalesce(b.state, ''), \
                    coalesce(round(extract(epoch FROM now() - b.xact_start)::numeric, 1)::text, ''), \
                    coalesce(substring(upper(ltrim(b.query, E' \\t\\r\\n')) \
                                       from '^[A-Z]+(?:\\s+(?:TABLE|INDEX|MATERIALIZED VIEW))?'), '') \
             FROM (SELECT a.pid, \
                          coalesce(substring(upper(ltrim(a.query, E' \\t\\r\\n')) \
                                             from '^[A-Z]+(?:\\s+(?:TABLE|INDEX|MATERIALIZED VIEW))?'), '') AS command, \
                          extract(epoch FROM now() - ",
            $since,
            ") AS secs, \
                          coalesce(l.relation::regclass::text, l.locktype) AS lock, l.mode \
                   FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid AND NOT l.granted \
                   WHERE a.wait_event_type = 'Lock' AND a.pid <> pg_backend_pid() AND ({which})) w \
             LEFT JOIN LATERAL unnest(pg_blocking_pids(w.pid)) AS bp(pid) ON true \
             LEFT JOIN pg_stat_activity b ON b.pid = bp.pid \
             WHERE w.secs >= {after} \
             ORDER BY w.pid, b.pid"
        )
    };
}

/// The statement of [`waits`]: `server_version` (`server_version_num`) 14+ knows when the wait
/// began (`pg_locks.waitstart`); before, the statement's start stands in.
fn waits_statement(which: &Which, after: Duration, server_version: u32) -> String {
    let (which, after) = (which.condition(), after.as_secs_f64());
    if server_version >= 140_000 {
        format!(
            waits_sql!("coalesce(l.waitstart, a.query_start)"),
            which = which,
            after = after
        )
    } else {
        format!(waits_sql!("a.query_start"), which = which, after = after)
    }
}

/// Reports the waits of a running attempt: one WARN line per waiting session when it is
/// first seen past the threshold, again every [`REPEAT`] while it lasts, and one INFO line when
/// it ended.
#[derive(Debug)]
pub(crate) struct Reporter {
    /// What the sessions belong to, for the log: "the migration", or "the app starting with
    /// the flag on" (a holder that starts the app and waits for it to be ready).
    of: &'static str,
    /// Per waiting PID: when it was last reported, and the wait as last seen.
    reported: BTreeMap<i32, (Instant, Wait)>,
}

impl Reporter {
    /// A reporter for the sessions of `of` ("the migration", ...).
    pub(crate) fn new(of: &'static str) -> Reporter {
        Reporter {
            of,
            reported: BTreeMap::new(),
        }
    }

    /// Logs what changed since the last look: `waits` is every session waiting now.
    pub(crate) fn observe(&mut self, waits: Vec<Wait>) {
        let now = Instant::now();
        let current: BTreeMap<i32, Wait> = waits.into_iter().map(|w| (w.pid, w)).collect();
        self.reported.retain(|pid, (_, last)| {
            let lasts = current.contains_key(pid);
            if !lasts {
                info!(
                    pid,
                    waited_s = format!("{:.0}", last.waited_secs),
                    "a session of {} no longer waits for a lock: pid {pid} ({}) on {}, after at least {:.0}s",
                    self.of,
                    last.command,
                    last.lock,
                    last.waited_secs
                );
            }
            lasts
        });
        for (pid, w) in current {
            let due = self
                .reported
                .get(&pid)
                .is_none_or(|(at, _)| now.duration_since(*at) >= REPEAT);
            let at = if due {
                warn!(
                    pid,
                    waited_s = format!("{:.0}", w.waited_secs),
                    "a session of {} waits for a lock: {w}",
                    self.of
                );
                now
            } else {
                self.reported.get(&pid).map_or(now, |(at, _)| *at)
            };
            self.reported.insert(pid, (at, w));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The waits of one attempt's sessions, on PostgreSQL 14+ (`pg_locks.waitstart`) and 13.
    /// Effect: tests/watching.rs (a migration blocked behind an open transaction is reported
    /// with its blocker until it commits) and tests/operator.rs (`status` of a running attempt).
    #[test]
    fn waits_statements() {
        let lock = crate::lock::LockKey::from_name("migrations-gate");
        let identity = crate::identity::Identity::new(&lock, "migrations_gate");
        let which = crate::sessions::AttemptSessions::new(&identity, Some("r1"), 42).which();
        for version in [13_00_22, 17_00_10] {
            insta::assert_snapshot!(
                format!("waits_{version}"),
                crate::sql::pretty(&waits_statement(
                    &which,
                    Duration::from_millis(5500),
                    version
                ))
            );
        }
    }

    #[test]
    fn a_wait_reads_with_its_blocker_and_never_a_query() {
        let w = Wait {
            pid: 42,
            command: "ALTER TABLE".into(),
            waited_secs: 6.4,
            lock: "runs".into(),
            mode: "AccessExclusiveLock".into(),
            blocked_by: vec![Blocker {
                pid: 7,
                application_name: "psql".into(),
                client: "10.0.0.5".into(),
                state: "idle in transaction".into(),
                transaction_secs: Some(12.2),
                command: "SELECT".into(),
            }],
        };
        assert_eq!(
            w.to_string(),
            "pid 42 (ALTER TABLE) has waited 6s for AccessExclusiveLock on runs; blocked by pid 7 \
             (application_name \"psql\", client 10.0.0.5, idle in transaction, transaction open 12s, SELECT)"
        );
    }
}
