//! Every write to the ledger: the state transitions of an attempt (see the table in
//! [`super`]), the heartbeat, and `reset`'s removal.

use sqlx::postgres::PgConnection;

use super::{AttemptEnd, AttemptRow, Begun, Ledger, NewAttempt};
use crate::lock::{Proof, format_held, lock_held};
use crate::sql::{lit, one_row, query, query_scalar};

impl Ledger {
    /// Records the start of an attempt, in one statement that proves we hold the lock and reads
    /// `release` as not done under it: an attempt begins only then.
    pub(crate) async fn begin(
        &self,
        conn: &mut PgConnection,
        attempt: &NewAttempt<'_>,
        proof: &Proof,
    ) -> Result<Begun, sqlx::Error> {
        let rows = query(conn, self.begin_statement(attempt, proof)).await?;
        let row = one_row(&rows)?;
        Ok(match (row.parse_opt(0)?, row.parse::<bool>(1)?) {
            (Some(id), _) => Begun::Attempt(id),
            (None, false) => Begun::LockLost,
            (None, true) => Begun::AlreadyDone,
        })
    }

    /// Proves the holder alive to a future taker-over: stamps `heartbeat_at`. Returns whether
    /// the row was there, still `running`, to stamp: a row a taker-over marked, or a `reset`
    /// deleted, means the lock was lost at some point.
    pub(crate) async fn heartbeat(
        &self,
        conn: &mut PgConnection,
        id: i64,
    ) -> Result<bool, sqlx::Error> {
        let n = query_scalar(conn, self.heartbeat_statement(id)).await?;
        Ok(n.as_deref() == Some("1"))
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
        query(conn, self.note_sessions_statement(id, note))
            .await
            .map(|_| ())
    }

    /// Records how attempt `id` ended, on the lock session, in a statement that proves it still
    /// holds the lock. Committed before the lock is freed. Returns whether it was recorded:
    /// false when the row is no longer `running` (a taker-over marked it, a `reset` removed it)
    /// or the lock is lost; a row that is not `running` is never overwritten.
    pub(crate) async fn finish(
        &self,
        conn: &mut PgConnection,
        id: i64,
        ended: &AttemptEnd<'_>,
        proof: &Proof,
    ) -> Result<bool, sqlx::Error> {
        let sql = self.finish_statement(id, ended, proof);
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
        let sql = self.record_fenced_statement(id, attempt, exit_code, detail);
        query(conn, sql).await.map(|_| ())
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
        let sql = self.abandon_statement(sessions, proof);
        Ok(query_scalar(conn, sql).await?.as_deref() == Some("true"))
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
        query(conn, self.forget_statement(release)).await?;
        Ok(before)
    }

    /// The statement of [`Ledger::begin`]: the new row's ID (or NULL), whether the lock is held,
    /// whether the release is not done.
    pub(super) fn begin_statement(&self, attempt: &NewAttempt<'_>, proof: &Proof) -> String {
        // The app column only where the ledger has it ([`NewAttempt::app`]). In serial mode the
        // release is NULL, which `release = NULL` never matches: never done.
        let (app_column, app) = match &attempt.app {
            Some(fingerprint) => (", app", format!(", {}", lit(fingerprint))),
            None => ("", String::new()),
        };
        format_held!(
            proof,
            concat!(
                "WITH i AS (INSERT INTO {table} (lock_key, lock_name, release, outcome, holder, host, pid, fence_secs{app_column}) \
                     SELECT {key}, {name}, {release}, 'running', {holder}, {host}, {pid}, {fence_secs}{app} WHERE ",
                lock_held!(),
                " AND NOT EXISTS (SELECT 1 FROM {table} WHERE lock_key = {key} AND release = {release} AND outcome = 'done') RETURNING id) \
                 SELECT (SELECT id::text FROM i), (",
                lock_held!(),
                ")::text, (NOT EXISTS (SELECT 1 FROM {table} WHERE lock_key = {key} AND release = {release} AND outcome = 'done'))::text"
            ),
            table = self.table(),
            app_column = app_column,
            app = app,
            key = self.lock.key,
            name = lit(&self.lock.name),
            release = attempt.release.map(lit).unwrap_or_else(|| "NULL".into()),
            holder = lit(attempt.holder),
            host = lit(attempt.host),
            pid = attempt.pid,
            fence_secs = attempt.fence_secs,
        )
    }

    /// The statement of [`Ledger::finish`]: how many rows it recorded (0 or 1).
    pub(super) fn finish_statement(
        &self,
        id: i64,
        ended: &AttemptEnd<'_>,
        proof: &Proof,
    ) -> String {
        let code = ended
            .exit_code
            .map(|c| c.to_string())
            .unwrap_or_else(|| "NULL".into());
        // The notification is delivered when this commits (with the row in session scope, with
        // the lock's transaction in transaction scope): waiters that LISTEN wake at once and
        // read the row themselves; the payload is only a hint.
        format_held!(
            proof,
            concat!(
                "WITH u AS (UPDATE {table} SET outcome = {outcome}, finished_at = clock_timestamp(), exit_code = {code}, detail = {detail} \
                     WHERE id = {id} AND outcome = 'running' AND ",
                lock_held!(),
                " RETURNING 1) \
                 SELECT count(*)::text FROM (SELECT pg_notify({channel}, {outcome}) FROM u) n"
            ),
            table = self.table(),
            id = id,
            code = code,
            outcome = lit(ended.outcome.as_str()),
            detail = lit(ended.detail),
            channel = lit(&self.identity.channel()),
        )
    }

    /// The statement of [`Ledger::abandon_stale`]: whether the lock is held.
    pub(super) fn abandon_statement(&self, sessions: &str, proof: &Proof) -> String {
        let detail = format!(
            "the holder vanished (crash, kill or lost connection); taken over; sessions: {sessions}"
        );
        format_held!(
            proof,
            concat!(
                "WITH u AS (UPDATE {table} SET outcome = 'abandoned', finished_at = clock_timestamp(), detail = {detail} \
                     WHERE lock_key = {key} AND outcome = 'running' AND ",
                lock_held!(),
                " RETURNING 1) \
                 SELECT (",
                lock_held!(),
                ")::text FROM (SELECT count(*) FROM u) n"
            ),
            table = self.table(),
            detail = lit(&detail),
            key = self.lock.key,
        )
    }

    /// The statement of [`Ledger::record_fenced`].
    pub(super) fn record_fenced_statement(
        &self,
        id: i64,
        attempt: &NewAttempt<'_>,
        exit_code: i32,
        detail: &str,
    ) -> String {
        let table = self.table();
        let release = attempt.release.map(lit).unwrap_or_else(|| "NULL".into());
        let detail = lit(detail);
        format!(
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
        )
    }

    /// The statement of [`Ledger::heartbeat`]: how many rows it stamped (0 or 1).
    pub(super) fn heartbeat_statement(&self, id: i64) -> String {
        format!(
            "WITH u AS (UPDATE {table} SET heartbeat_at = clock_timestamp() WHERE id = {id} AND outcome = 'running' RETURNING 1) \
             SELECT count(*)::text FROM u",
            table = self.table()
        )
    }

    /// The statement of [`Ledger::note_sessions`].
    pub(super) fn note_sessions_statement(&self, id: i64, note: &str) -> String {
        format!(
            "UPDATE {table} SET detail = {note} WHERE id = {id} AND outcome = 'running'",
            table = self.table(),
            note = lit(note)
        )
    }

    /// The statement of [`Ledger::forget`].
    pub(super) fn forget_statement(&self, release: &str) -> String {
        format!(
            "DELETE FROM {table} WHERE lock_key = {key} AND release = {release}",
            table = self.table(),
            key = self.lock.key,
            release = lit(release)
        )
    }
}
