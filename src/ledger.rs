//! The release ledger: one row per migration attempt, in `<schema>.ledger` (created by the gate:
//! its DDL is in [`crate::schema`]); this module reads and writes its rows.
//!
//! A release is done when a row with outcome `done` exists for its lock key and release ID. Only
//! the lock holder writes rows, and it commits the `done` row before it frees the lock, so a
//! replica that reads `done` knows the migration it depends on has committed. A unique index
//! makes a second `done` row for the same release impossible.
//!
//! Outcomes: `running` (the holder is at it), `done`, `failed` (the command exited non-zero, or
//! the holder fenced itself), `abandoned` (the holder vanished; marked by the next holder).

use sqlx::postgres::PgConnection;

use crate::identity::Identity;
use crate::lock::{LockKey, Proof};
use crate::schema::{StoredKey, Tables};
use crate::sql::{Cols, is_missing_relation, lit, one_row, query, query_if_exists, query_scalar};

/// The ledger of one lock in one schema.
#[derive(Debug)]
pub(crate) struct Ledger {
    tables: Tables,
    lock: LockKey,
    /// The lock and this schema: the channel the holder notifies on.
    identity: Identity,
    /// Whether [`Ledger::is_done`] also reads the `--same-env` key ([`Ledger::read_env_key`]).
    env_key: bool,
}

/// Who begins an attempt, for the record.
#[derive(Debug, Clone)]
pub(crate) struct NewAttempt<'a> {
    /// The release being migrated to (`None` in serial mode).
    pub(crate) release: Option<&'a str>,
    /// The gate's `application_name`.
    pub(crate) holder: &'a str,
    /// The gate's host name.
    pub(crate) host: &'a str,
    /// The gate's process ID.
    pub(crate) pid: u32,
    /// Seconds this holder needs, after its last heartbeat, to notice a lost session and stop
    /// its migration: a taker-over waits that long after a vanished holder.
    pub(crate) fence_secs: u32,
    /// The fingerprint of the application it migrates for ([`crate::application`]), written
    /// only where the ledger has the `app` column.
    pub(crate) app: Option<String>,
}

/// What [`Ledger::stale`] found.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stale {
    /// Attempts still recorded `running`.
    pub(crate) running: u64,
    /// Seconds until the latest of their holders has surely stopped its migration.
    pub(crate) wait_secs: f64,
    /// Whether our lock session still held the lock when this was read.
    pub(crate) held: bool,
}

/// What [`Ledger::begin`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Begun {
    /// The attempt is recorded `running` with this row ID.
    Attempt(i64),
    /// Nothing: the lock is no longer held by our lock session.
    LockLost,
    /// Nothing: the release is done.
    AlreadyDone,
}

/// Where an attempt stands: the ledger's `outcome` column, every state it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Outcome {
    /// The holder is at it.
    Running,
    /// Migrated; the release is done.
    Done,
    /// The command failed, the holder refused or stopped it, or fenced itself.
    Failed,
    /// The holder vanished; marked by the next holder.
    Abandoned,
}

impl Outcome {
    /// As the ledger spells it.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Outcome::Running => "running",
            Outcome::Done => "done",
            Outcome::Failed => "failed",
            Outcome::Abandoned => "abandoned",
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Outcome {
    type Err = UnknownOutcome;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            Outcome::Running,
            Outcome::Done,
            Outcome::Failed,
            Outcome::Abandoned,
        ]
        .into_iter()
        .find(|o| o.as_str() == s)
        .ok_or_else(|| UnknownOutcome(s.to_string()))
    }
}

/// Why a `failed` attempt does not count against `--max-failures` ([`Ledger::failures`]): the
/// start of its `detail`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotCounted {
    /// The holder lost its lock session and stopped the migration.
    Fenced,
    /// The migration never started.
    Refused,
    /// The gate was stopped by a signal (SIGTERM, SIGINT, SIGQUIT) and passed it on.
    Interrupted,
}

/// Every reason an attempt does not count.
pub(crate) const NOT_COUNTED: [NotCounted; 3] = [
    NotCounted::Fenced,
    NotCounted::Refused,
    NotCounted::Interrupted,
];

impl AttemptRow {
    /// Why this failed attempt does not count against `--max-failures`, if it does not.
    pub(crate) fn not_counted(&self) -> Option<NotCounted> {
        if self.outcome != Outcome::Failed {
            return None;
        }
        NOT_COUNTED
            .into_iter()
            .find(|n| self.detail.starts_with(n.prefix()))
    }
}

impl NotCounted {
    /// How the attempt's `detail` starts.
    pub(crate) fn prefix(self) -> &'static str {
        match self {
            NotCounted::Fenced => "fenced: ",
            NotCounted::Refused => "refused: ",
            NotCounted::Interrupted => "interrupted: ",
        }
    }
}

/// An `outcome` the gate does not know (a newer gate's, or a hand edit).
#[derive(Debug, thiserror::Error)]
#[error("unknown attempt outcome {0:?} in the ledger")]
pub(crate) struct UnknownOutcome(String);

impl Ledger {
    /// The ledger for `lock` in `schema`.
    pub(crate) fn new(schema: &str, lock: &LockKey) -> Ledger {
        Ledger {
            tables: Tables::new(schema),
            lock: lock.clone(),
            identity: Identity::new(lock, schema),
            env_key: false,
        }
    }

    /// Makes [`Ledger::is_done`] read the `--same-env` key too (same statement, no extra round
    /// trip), for replicas that compare variables.
    pub(crate) fn read_env_key(&mut self) {
        self.env_key = true;
    }

    /// Its lock and schema: what the gate treats as its own ([`crate::identity`]).
    pub(crate) fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The tables of its schema (the ledger is created with [`Tables::create_ledger`]).
    pub(crate) fn tables(&self) -> &Tables {
        &self.tables
    }

    fn table(&self) -> String {
        self.tables.ledger()
    }

    /// Whether `release` is recorded done (`None` when the ledger does not exist yet), and
    /// whether the server is a read-only standby: one round trip, the whole fast path. The same
    /// statement finds the newest release done after this one (the older-release check) and,
    /// with [`Ledger::read_env_key`], the `--same-env` key.
    pub(crate) async fn is_done(
        &self,
        conn: &mut PgConnection,
        release: &str,
        read_key: ReadKey,
    ) -> Result<Seen, sqlx::Error> {
        let table = self.table();
        let key = self.lock.key;
        let release = lit(release);
        // A ledger made by an older gate has no key table yet: then read without it.
        for with_key in [self.env_key && read_key == ReadKey::IfCompared, false] {
            let key_column = if with_key {
                format!(
                    ", (SELECT encode(key, 'hex') FROM {})",
                    self.tables.env_key()
                )
            } else {
                String::new()
            };
            let sql = format!(
                "SELECT EXISTS (SELECT 1 FROM {table} WHERE lock_key = {key} AND release = {release} AND outcome = 'done')::text, \
                        pg_is_in_recovery()::text, n.release, n.holder, n.finished_at, \
                        (SELECT to_jsonb(d) ->> 'app' FROM {table} d WHERE d.lock_key = {key} AND d.release = {release} AND d.outcome = 'done'){key_column} \
                 FROM (SELECT 1) one LEFT JOIN LATERAL ( \
                     SELECT release, holder, to_char(finished_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS \"UTC\"') AS finished_at \
                     FROM {table} WHERE lock_key = {key} AND outcome = 'done' AND release IS NOT NULL \
                     AND id > (SELECT id FROM {table} WHERE lock_key = {key} AND release = {release} AND outcome = 'done') \
                     ORDER BY id DESC LIMIT 1) n ON true"
            );
            match query(conn, sql).await {
                Ok(rows) => {
                    let row = one_row(&rows)?;
                    let text = |i: usize| row.opt(i);
                    let newer = match (text(2)?, text(3)?, text(4)?) {
                        (Some(release), Some(holder), finished_at) => Some(Newer {
                            release,
                            holder,
                            finished_at: finished_at.unwrap_or_default(),
                        }),
                        _ => None,
                    };
                    return Ok(Seen {
                        done: Some(text(0)?.as_deref() == Some("true")),
                        standby: text(1)?.as_deref() == Some("true"),
                        newer,
                        app: text(5)?,
                        env_key: if with_key {
                            text(6)?.map(StoredKey)
                        } else {
                            None
                        },
                    });
                }
                Err(e) if is_missing_relation(&e) && with_key => continue,
                Err(e) if is_missing_relation(&e) => break,
                Err(e) => return Err(e),
            }
        }
        Ok(Seen {
            done: None,
            standby: query_scalar(conn, "SELECT pg_is_in_recovery()::text".into())
                .await?
                .as_deref()
                == Some("true"),
            ..Seen::default()
        })
    }

    /// How many attempts were left `running` by a holder that vanished, how long to wait
    /// before migrating, and whether our lock session still holds the lock (`proof`): until the
    /// latest vanished holder's last heartbeat plus its fencing time (heartbeat timeout + kill
    /// grace), by which point a holder that merely lost its session has surely stopped its
    /// migration. A holder killed outright took its migration with it (the guard), but we cannot
    /// tell the two apart from here. Nothing is marked yet: a taker-over that dies while it waits
    /// leaves the rows `running`, so the next one waits too ([`Ledger::abandon_stale`] marks
    /// them after the wait).
    pub(crate) async fn stale(
        &self,
        conn: &mut PgConnection,
        proof: &Proof,
    ) -> Result<Stale, sqlx::Error> {
        let sql = format!(
            "SELECT count(*)::text, \
                    coalesce(greatest(0, extract(epoch FROM max(coalesce(heartbeat_at, started_at) \
                        + make_interval(secs => fence_secs)) - clock_timestamp())), 0)::float8::text, \
                    ({})::text \
             FROM {} WHERE lock_key = {} AND outcome = 'running'",
            proof.sql(),
            self.table(),
            self.lock.key
        );
        let rows = query(conn, sql).await?;
        let row = one_row(&rows)?;
        Ok(Stale {
            running: row.parse(0)?,
            wait_secs: row.parse(1)?,
            held: row.parse(2)?,
        })
    }

    /// Marks attempts left `running` by a vanished holder as `abandoned`, once
    /// [`Ledger::stale`]'s wait is over and their sessions are gone (`sessions`: how they were
    /// ended, for the record), in the same statement that proves we hold the lock. Returns
    /// whether we did (false: the lock is lost, and nothing was marked).
    pub(crate) async fn abandon_stale(
        &self,
        conn: &mut PgConnection,
        sessions: &str,
        proof: &Proof,
    ) -> Result<bool, sqlx::Error> {
        let detail = format!(
            "the holder vanished (crash, kill or lost connection); taken over; sessions: {sessions}"
        );
        let sql = format!(
            "WITH u AS (UPDATE {} SET outcome = 'abandoned', finished_at = clock_timestamp(), detail = {} \
                 WHERE lock_key = {} AND outcome = 'running' AND {} RETURNING 1) \
             SELECT ({})::text FROM (SELECT count(*) FROM u) n",
            self.table(),
            lit(&detail),
            self.lock.key,
            proof.sql(),
            proof.sql()
        );
        Ok(query_scalar(conn, sql).await?.as_deref() == Some("true"))
    }

    /// A subquery of the IDs (as text) of this lock's attempts that did not end `done`: the
    /// attempts whose sessions a taker-over must see gone before it migrates
    /// ([`crate::sessions::Which::unfinished`]).
    pub(crate) fn unfinished_ids(&self) -> String {
        format!(
            "SELECT id::text FROM {} WHERE lock_key = {} AND outcome IN ('running', 'failed', 'abandoned')",
            self.table(),
            self.lock.key
        )
    }

    /// Records, in a `running` attempt's `detail`, the sessions its holder found on the child's
    /// own sockets ([`crate::sessions::AttemptSessions::note`]): a taker-over of a holder killed with
    /// `kill -9` cannot ask it, and must end them too. The outcome's own detail replaces it.
    pub(crate) async fn note_sessions(
        &self,
        conn: &mut PgConnection,
        id: i64,
        note: &str,
    ) -> Result<(), sqlx::Error> {
        let sql = format!(
            "UPDATE {} SET detail = {} WHERE id = {id} AND outcome = 'running'",
            self.table(),
            lit(note)
        );
        query(conn, sql).await.map(|_| ())
    }

    /// A subquery of the sessions (`pid`, `backend_start`) recorded by this lock's `running`
    /// attempts ([`Ledger::note_sessions`]).
    pub(crate) fn unfinished_seen(&self) -> String {
        format!(
            "SELECT split_part(s, '@', 1)::int, split_part(s, '@', 2)::timestamptz \
             FROM {} l, unnest(string_to_array(substr(l.detail, {}), ';')) s \
             WHERE l.lock_key = {} AND l.outcome = 'running' AND starts_with(l.detail, {}) AND s <> ''",
            self.table(),
            crate::sessions::SEEN_NOTE.len() + 1,
            self.lock.key,
            lit(crate::sessions::SEEN_NOTE)
        )
    }

    /// A subquery of every release this lock's ledger names (column `release`), for mapping
    /// a session tag's release hash back to a name.
    pub(crate) fn release_names(&self) -> String {
        format!(
            "SELECT DISTINCT release FROM {} WHERE lock_key = {} AND release IS NOT NULL",
            self.table(),
            self.lock.key
        )
    }

    /// What this ledger holds, for an operator whose `reset` found nothing: this lock's newest
    /// releases, and the other locks recorded in the same ledger. One line.
    pub(crate) async fn holds(&self, conn: &mut PgConnection) -> Result<String, sqlx::Error> {
        let table = self.table();
        let rows = query_if_exists(
            conn,
            format!(
                "SELECT coalesce((SELECT string_agg(release, ', ') FROM (SELECT release FROM {table} \
                                   WHERE lock_key = {key} AND release IS NOT NULL \
                                   GROUP BY release ORDER BY max(id) DESC LIMIT 5) r), ''), \
                        coalesce((SELECT string_agg(DISTINCT lock_name, ', ') FROM {table} WHERE lock_key <> {key}), '')",
                key = self.lock.key
            ),
        )
        .await?;
        let Some(row) = rows.first() else {
            return Ok("the ledger does not exist".into());
        };
        let row = Cols(row);
        let (releases, others) = (row.text(0)?, row.text(1)?);
        let mut seen = if releases.is_empty() {
            "no release recorded for this lock".to_string()
        } else {
            format!("this lock's newest releases: {releases}")
        };
        if !others.is_empty() {
            seen.push_str(&format!("; other locks in this ledger: {others}"));
        }
        Ok(seen)
    }

    /// Proves the holder alive to a future taker-over: stamps `heartbeat_at`. Returns whether
    /// the row was there, still `running`, to stamp: a row a taker-over marked, or a `reset`
    /// deleted, means the lock was lost at some point.
    pub(crate) async fn heartbeat(
        &self,
        conn: &mut PgConnection,
        id: i64,
    ) -> Result<bool, sqlx::Error> {
        let n = query_scalar(
            conn,
            format!(
                "WITH u AS (UPDATE {} SET heartbeat_at = clock_timestamp() WHERE id = {id} AND outcome = 'running' RETURNING 1) \
                 SELECT count(*)::text FROM u",
                self.table()
            ),
        )
        .await?;
        Ok(n.as_deref() == Some("1"))
    }

    /// Records the start of an attempt, in one statement that proves we hold the lock and reads
    /// `release` as not done under it: an attempt begins only then.
    pub(crate) async fn begin(
        &self,
        conn: &mut PgConnection,
        attempt: &NewAttempt<'_>,
        proof: &Proof,
    ) -> Result<Begun, sqlx::Error> {
        let table = self.table();
        let (release, not_done) = match attempt.release {
            Some(r) => (
                lit(r),
                format!(
                    "NOT EXISTS (SELECT 1 FROM {table} WHERE lock_key = {} AND release = {} AND outcome = 'done')",
                    self.lock.key,
                    lit(r)
                ),
            ),
            None => ("NULL".into(), "true".into()),
        };
        let (app_column, app) = match &attempt.app {
            Some(fingerprint) => (", app", format!(", {}", lit(fingerprint))),
            None => ("", String::new()),
        };
        let sql = format!(
            "WITH i AS (INSERT INTO {table} (lock_key, lock_name, release, outcome, holder, host, pid, fence_secs{app_column}) \
                 SELECT {}, {}, {release}, 'running', {}, {}, {}, {}{app} WHERE {} AND {not_done} RETURNING id) \
             SELECT (SELECT id::text FROM i), ({})::text, ({not_done})::text",
            self.lock.key,
            lit(&self.lock.name),
            lit(attempt.holder),
            lit(attempt.host),
            attempt.pid,
            attempt.fence_secs,
            proof.sql(),
            proof.sql(),
        );
        let rows = query(conn, sql).await?;
        let row = one_row(&rows)?;
        Ok(match (row.parse_opt(0)?, row.parse::<bool>(1)?) {
            (Some(id), _) => Begun::Attempt(id),
            (None, false) => Begun::LockLost,
            (None, true) => Begun::AlreadyDone,
        })
    }

    /// Records how attempt `id` ended, on the lock session, in a statement that proves it still
    /// holds the lock. Committed before the lock is freed. Returns whether it was recorded:
    /// false when the row is no longer `running` (a taker-over marked it, a `reset` removed it)
    /// or the lock is lost; a row that is not `running` is never overwritten.
    pub(crate) async fn finish(
        &self,
        conn: &mut PgConnection,
        id: i64,
        ended: (Outcome, Option<i32>, &str),
        proof: &Proof,
    ) -> Result<bool, sqlx::Error> {
        let (outcome, exit_code, detail) = ended;
        let code = exit_code
            .map(|c| c.to_string())
            .unwrap_or_else(|| "NULL".into());
        // The notification is delivered when this commits (with the row in session scope, with
        // the lock's transaction in transaction scope): waiters that LISTEN wake at once and
        // read the row themselves; the payload is only a hint.
        let sql = format!(
            "WITH u AS (UPDATE {} SET outcome = '{}', finished_at = clock_timestamp(), exit_code = {code}, detail = {} \
                 WHERE id = {id} AND outcome = 'running' AND {} RETURNING 1) \
             SELECT count(*)::text FROM (SELECT pg_notify({}, {}) FROM u) n",
            self.table(),
            outcome.as_str(),
            lit(detail),
            proof.sql(),
            lit(&self.identity.channel()),
            lit(outcome.as_str()),
        );
        Ok(query_scalar(conn, sql).await?.as_deref() == Some("1"))
    }

    /// Records attempt `id` as failed after its holder fenced itself, from a new connection.
    /// Only a row still `running` is marked: one a taker-over already marked `abandoned` keeps
    /// that record (a row that is not `running` is never overwritten). It is written anew only
    /// if it is gone (a `reset` meanwhile).
    pub(crate) async fn record_fenced(
        &self,
        conn: &mut PgConnection,
        id: i64,
        attempt: &NewAttempt<'_>,
        exit_code: i32,
        detail: &str,
    ) -> Result<(), sqlx::Error> {
        let table = self.table();
        let release = attempt.release.map(lit).unwrap_or_else(|| "NULL".into());
        let detail = lit(detail);
        let sql = format!(
            "WITH u AS (UPDATE {table} SET outcome = 'failed', finished_at = clock_timestamp(), \
                 exit_code = {exit_code}, detail = {detail} \
                 WHERE id = {id} AND outcome = 'running' RETURNING 1) \
             INSERT INTO {table} (lock_key, lock_name, release, outcome, holder, host, pid, finished_at, exit_code, detail) \
             SELECT {}, {}, {release}, 'failed', {}, {}, {}, clock_timestamp(), {exit_code}, {detail} \
             WHERE NOT EXISTS (SELECT 1 FROM {table} WHERE id = {id}) AND NOT EXISTS (SELECT 1 FROM u)",
            self.lock.key,
            lit(&self.lock.name),
            lit(attempt.holder),
            lit(attempt.host),
            attempt.pid
        );
        query(conn, sql).await.map(|_| ())
    }

    /// The failed attempts of `release` that count against `--max-failures`, newest first, at
    /// most `limit`: **only a migration's own failure counts**. An attempt whose `detail` starts
    /// with one of [`NOT_COUNTED`]'s prefixes ended for a reason that says nothing about the
    /// migration, and does not count: fenced (the holder lost its connection), refused (the
    /// migration never started: a preflight refusal, `--other-releases`, a wait the gate gave
    /// up, a command it could not start), interrupted (the platform stopped the gate: a pod
    /// deleted, a rollout, a drain). Neither do `abandoned` attempts (a crash), nor, for ledgers
    /// written before the prefixes, exit 78 (a refusal). What counts: the migration exited
    /// non-zero on its own, ran past `--migration-timeout`, or (`run` with a probe) the app
    /// exited or was not ready within `--ready-timeout`. `reset --release R` removes the
    /// attempts, and the count starts again.
    pub(crate) async fn failures(
        &self,
        conn: &mut PgConnection,
        release: &str,
        limit: u32,
    ) -> Result<Vec<AttemptRow>, sqlx::Error> {
        let not_counted: String = NOT_COUNTED
            .iter()
            .map(|p| {
                format!(
                    " AND NOT starts_with(coalesce(detail, ''), {})",
                    lit(p.prefix())
                )
            })
            .collect();
        let failed = format!(
            "outcome = 'failed'{not_counted} AND coalesce(exit_code, 0) <> {}",
            crate::error::EXIT_CONFIG
        );
        let rows = self
            .attempts_where(conn, Some(release), &failed, limit)
            .await?;
        Ok(rows)
    }

    /// The newest `limit` attempts (of `release` only, if given), newest first. An absent
    /// ledger has none.
    pub(crate) async fn attempts(
        &self,
        conn: &mut PgConnection,
        release: Option<&str>,
        limit: u32,
    ) -> Result<Vec<AttemptRow>, sqlx::Error> {
        self.attempts_where(conn, release, "true", limit).await
    }

    /// The attempts of `release` (all without one) whose row meets the SQL condition `cond`,
    /// newest first, at most `limit`.
    async fn attempts_where(
        &self,
        conn: &mut PgConnection,
        release: Option<&str>,
        cond: &str,
        limit: u32,
    ) -> Result<Vec<AttemptRow>, sqlx::Error> {
        let filter = release
            .map(|r| format!(" AND release = {}", lit(r)))
            .unwrap_or_default();
        let sql = format!(
            "SELECT id::text, coalesce(release, ''), outcome, holder, host, pid::text, \
                    coalesce(to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), started_at::text), \
                    coalesce(to_char(finished_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), finished_at::text, ''), \
                    coalesce(CASE WHEN isfinite(started_at) AND isfinite(coalesce(finished_at, clock_timestamp())) \
                             THEN extract(epoch FROM coalesce(finished_at, clock_timestamp()) - started_at)::float8::text END, ''), \
                    coalesce(exit_code::text, ''), coalesce(detail, '') \
             FROM {} WHERE lock_key = {}{filter} AND ({cond}) ORDER BY id DESC LIMIT {limit}",
            self.table(),
            self.lock.key
        );
        query_if_exists(conn, sql)
            .await?
            .iter()
            .map(|r| {
                let row = Cols(r);
                let t = |i: usize| row.text(i);
                Ok(AttemptRow {
                    id: row.parse(0)?,
                    release: Some(t(1)?).filter(|s| !s.is_empty()),
                    outcome: row.parse(2)?,
                    holder: t(3)?,
                    host: t(4)?,
                    pid: row.parse(5)?,
                    started_at: t(6)?,
                    finished_at: Some(t(7)?).filter(|s| !s.is_empty()),
                    duration_secs: row.parse_opt(8)?,
                    exit_code: row.parse_opt(9)?,
                    detail: t(10)?,
                })
            })
            .collect()
    }

    /// Deletes every row of `release` and returns what was removed.
    pub(crate) async fn forget(
        &self,
        conn: &mut PgConnection,
        release: &str,
    ) -> Result<Vec<AttemptRow>, sqlx::Error> {
        let before = self.attempts(conn, Some(release), u32::MAX).await?;
        if before.is_empty() {
            return Ok(before);
        }
        query(
            conn,
            format!(
                "DELETE FROM {} WHERE lock_key = {} AND release = {}",
                self.table(),
                self.lock.key,
                lit(release)
            ),
        )
        .await?;
        Ok(before)
    }
}

/// Whether [`Ledger::is_done`] may read the `--same-env` key. Not inside the lock's
/// transaction: a missing key table there would abort it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadKey {
    /// When this replica compares variables.
    IfCompared,
    /// Never.
    No,
}

/// What one look at the ledger saw.
#[derive(Debug, Clone, Default)]
pub(crate) struct Seen {
    /// Whether the release is done; `None` when the ledger does not exist yet.
    pub(crate) done: Option<bool>,
    /// Whether the server is a read-only standby (`pg_is_in_recovery()`).
    pub(crate) standby: bool,
    /// When the release is done: the newest release done after it on this lock, if any (a
    /// replica of an older release must not start on a schema that moved on).
    pub(crate) newer: Option<Newer>,
    /// The `--same-env` key, when asked for ([`Ledger::read_env_key`]) and it exists.
    pub(crate) env_key: Option<StoredKey>,
    /// When the release is done: the fingerprint of the application its holder migrated for
    /// ([`crate::application`]); `None` when none was recorded. Read as `to_jsonb(row) ->>
    /// 'app'`, so that a ledger without the column reads `NULL` instead of failing.
    pub(crate) app: Option<String>,
}

/// A release done after the one a replica asked about.
#[derive(Debug, Clone)]
pub(crate) struct Newer {
    /// Its ID.
    pub(crate) release: String,
    /// Who migrated it (`application_name`).
    pub(crate) holder: String,
    /// When, for people (`YYYY-MM-DD HH:MM:SS UTC`).
    pub(crate) finished_at: String,
}

/// One attempt as `status` shows it. The JSON field names are a stable interface.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct AttemptRow {
    /// Row ID (grows with each attempt).
    pub(crate) id: i64,
    /// Release ID (`null` in serial mode).
    pub(crate) release: Option<String>,
    /// `running`, `done`, `failed` or `abandoned`.
    pub(crate) outcome: Outcome,
    /// The holder's `application_name`.
    pub(crate) holder: String,
    /// The holder's host name.
    pub(crate) host: String,
    /// The holder gate's process ID.
    pub(crate) pid: i64,
    /// Start, RFC 3339 UTC.
    pub(crate) started_at: String,
    /// End, RFC 3339 UTC (`null` while running).
    pub(crate) finished_at: Option<String>,
    /// Seconds from start to end (or to now while running).
    pub(crate) duration_secs: Option<f64>,
    /// Exit code of the migration (or app), if known.
    pub(crate) exit_code: Option<i32>,
    /// Why it ended this way.
    pub(crate) detail: String,
}
