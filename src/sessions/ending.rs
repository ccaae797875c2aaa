//! Ending an attempt's sessions: cancel what runs, terminate what is left after a grace, and
//! confirm they are gone (PostgreSQL, "Server Signaling Functions").

use std::fmt;
use std::time::Duration;

use sqlx::postgres::PgConnection;
use tracing::info;

use super::{POLL, Session, Which, list};
use crate::lock::{format_held, lock_held};
use crate::sql::query;

/// How long cancelled sessions get to end before they are terminated.
const CANCEL_GRACE: Duration = Duration::from_secs(2);
/// How long terminated sessions get to disappear from `pg_stat_activity`.
const TERMINATE_GRACE: Duration = Duration::from_secs(5);

/// How an attempt's sessions ended, for the ledger and `status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Terminated {
    /// Sessions that ended after `pg_cancel_backend`.
    pub(crate) cancelled: usize,
    /// Sessions that had to be terminated.
    pub(crate) terminated: usize,
}

impl fmt::Display for Terminated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.cancelled, self.terminated) {
            (0, 0) => write!(f, "no session left"),
            (c, 0) => write!(f, "{c} session(s) cancelled"),
            (0, t) => write!(f, "{t} session(s) terminated"),
            (c, t) => write!(f, "{c} session(s) cancelled, {t} terminated"),
        }
    }
}

/// Why sessions could not be ended.
#[derive(Debug)]
pub(crate) enum TerminateError {
    /// The database could not be asked.
    Sql(sqlx::Error),
    /// Our role may not signal these sessions (SQLSTATE 42501): they belong to another role and
    /// ours lacks `pg_signal_backend`, or to a superuser.
    Denied(Vec<Session>),
    /// Signalled, but still there after the grace.
    Stuck(Vec<Session>),
    /// Not signalled: the guard of [`Which::while_holding`] no longer holds (the lock is lost).
    LockLost,
}

impl From<sqlx::Error> for TerminateError {
    fn from(e: sqlx::Error) -> Self {
        TerminateError::Sql(e)
    }
}

impl TerminateError {
    /// One line for the log and the error: which sessions, and what to do.
    pub(crate) fn describe(&self, role: &str) -> String {
        let list = |s: &[Session]| {
            s.iter()
                .map(Session::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        match self {
            TerminateError::Sql(e) => format!("could not look at the attempt's sessions: {e}"),
            TerminateError::Denied(s) => format!(
                "the role {role:?} may not end {}: ask a DBA to run `{}` \
                 (or run the migration as the gate's role), or end them yourself with \
                 `SELECT pg_terminate_backend(pid)`",
                list(s),
                signal_grant(role)
            ),
            TerminateError::LockLost => {
                "the lock session lost the lock: earlier attempts' sessions are no longer ours to end".into()
            }
            TerminateError::Stuck(s) => format!(
                "{} did not end within {} of pg_terminate_backend",
                list(s),
                crate::duration::short(TERMINATE_GRACE)
            ),
        }
    }
}

/// The statement that lets `role` end sessions of roles it is not a member of (a migration
/// that runs as another role): `GRANT pg_signal_backend TO <role>;`. Its own need nothing.
pub(crate) fn signal_grant(role: &str) -> String {
    format!("GRANT pg_signal_backend TO {};", crate::sql::ident(role))
}

/// Sends `pg_cancel_backend` or `pg_terminate_backend` to `pid`, under `which`'s guard if it
/// has one. `Ok(false)`: not allowed.
async fn signal(
    conn: &mut PgConnection,
    which: &Which,
    function: &str,
    pid: i32,
) -> Result<bool, TerminateError> {
    let sql = signal_statement(which, function, pid);
    match query(conn, sql).await {
        Ok(rows) if rows.is_empty() => Err(TerminateError::LockLost),
        Ok(_) => Ok(true),
        Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42501") => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// The statement of [`signal`]: one row when it was sent; none when the guard no longer holds.
fn signal_statement(which: &Which, function: &str, pid: i32) -> String {
    match &which.guard {
        None => format!("SELECT {function}({pid})::text"),
        Some(proof) => format_held!(
            proof,
            concat!("SELECT {function}({pid})::text WHERE ", lock_held!()),
            function = function,
            pid = pid,
        ),
    }
}

/// Waits up to `limit` until none of `which`'s sessions is left that `counts` selects; returns
/// those still there.
pub(super) async fn settle(
    conn: &mut PgConnection,
    which: &Which,
    limit: Duration,
    counts: fn(&Session) -> bool,
) -> Result<Vec<Session>, sqlx::Error> {
    let until = tokio::time::Instant::now() + limit;
    loop {
        let left: Vec<Session> = list(conn, which)
            .await?
            .into_iter()
            .filter(counts)
            .collect();
        if left.is_empty() || tokio::time::Instant::now() >= until {
            return Ok(left);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Ends every session `which` selects: cancels what runs, waits [`CANCEL_GRACE`], terminates
/// what is left (idle ones too: their client is gone), and confirms they are gone.
pub(crate) async fn terminate(
    conn: &mut PgConnection,
    which: &Which,
) -> Result<Terminated, TerminateError> {
    let found = list(conn, which).await?;
    if found.is_empty() {
        return Ok(Terminated::default());
    }
    let mut denied = Vec::new();
    for s in found.iter().filter(|s| s.busy()) {
        if !signal(conn, which, "pg_cancel_backend", s.pid).await? {
            denied.push(s.clone());
        }
    }
    if !denied.is_empty() {
        return Err(TerminateError::Denied(denied));
    }
    let left = settle(conn, which, CANCEL_GRACE, Session::busy).await?;
    // A session may turn busy during the grace (a pooled connection picking up a statement):
    // then more are left busy than were cancelled.
    let cancelled = found
        .iter()
        .filter(|s| s.busy())
        .count()
        .saturating_sub(left.len());
    // Busy ones that ignored the cancel, and idle ones (a dead client's, or a pooled server
    // connection still carrying the tag): terminate them all.
    let rest = list(conn, which).await?;
    for s in &rest {
        if !signal(conn, which, "pg_terminate_backend", s.pid).await? {
            denied.push(s.clone());
        }
    }
    if !denied.is_empty() {
        return Err(TerminateError::Denied(denied));
    }
    let stuck = settle(conn, which, TERMINATE_GRACE, |_| true).await?;
    if !stuck.is_empty() {
        return Err(TerminateError::Stuck(stuck));
    }
    let ended = Terminated {
        cancelled,
        terminated: rest.len(),
    };
    if ended != Terminated::default() {
        info!(%ended, "ended the attempt's remaining database sessions");
    }
    Ok(ended)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Effect: tests/attempt_sessions.rs and tests/faults.rs (sessions of earlier attempts
    /// ended only while the lock is held).
    #[test]
    fn signal_under_the_proof() {
        let lock = crate::lock::LockKey::from_name("migrations-gate");
        let identity = crate::identity::Identity::new(&lock, "migrations_gate");
        let tag = super::super::Tag::new(&identity, Some("r1"), None);
        let which = Which::unfinished(&tag, "l", lock.key);
        assert_eq!(
            signal_statement(&which, "pg_cancel_backend", 12),
            "SELECT pg_cancel_backend(12)::text"
        );
        let guarded = which.while_holding(&crate::lock::Proof::example());
        insta::assert_snapshot!(crate::sql::pretty(&signal_statement(
            &guarded,
            "pg_terminate_backend",
            12
        )));
    }
}
