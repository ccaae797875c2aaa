//! Holding the lock: the replica that migrates, from taking over to the end of its attempt. A
//! [`Holding`] exists only while this replica holds the lock; it owns the lock session, the
//! lock's scope and the ledger row of its attempt. Its life: [`Holding::new`] once
//! [`crate::protocol`] took over and began the attempt, [`Holding::migrate`] (and/or
//! [`Holding::start_app`]), checking the lock session on every heartbeat while a child runs, then
//! the attempt ends in one of two places: [`Holding::end`], which records the outcome, notifies
//! the waiters and frees the lock, or [`Holding::fence`] when the session was lost. Both consume
//! it: a holder cannot end twice, nor fence and then end.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tracing::info;

use crate::db::{Conn, close};
use crate::error::{Error, Result};
use crate::ledger::{AttemptEnd, AttemptRow, HeldAttempt, Outcome};
use crate::lock::{self, Proof, Scope};
use crate::replica::Replica;
use crate::route::Route;
use crate::sessions::{self, Terminated};

mod ending;
mod running;
mod watch;

pub(crate) use ending::{new_attempt, terminate_sessions, wait_out_fence};
pub(crate) use watch::{HolderPlan, OtherReleases};

/// How often the holder checks that its lock session is alive while a child runs.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// A heartbeat this late means the gate itself did not run meanwhile: its process was frozen
/// (SIGSTOP, a cgroup freezer as `docker pause` uses, a paused VM) or starved. Its child was
/// most likely frozen with it and resumes in the same instant, while the lock may have been
/// lost and taken over meanwhile: the holder pauses the child before it asks the server.
const FROZEN_AFTER: Duration = Duration::from_secs(2);
/// A heartbeat that takes longer than this counts as a lost session.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a fenced holder keeps trying to record its failed attempt.
const RECORD_FENCED_FOR: Duration = Duration::from_secs(15);
/// How long sessions a migration left running after it exited 0 get to finish before the
/// attempt counts as failed.
const SETTLE_AFTER_SUCCESS: Duration = Duration::from_secs(10);
/// How often a holder that may not end a session looks again.
const RETRY_END: Duration = Duration::from_secs(1);
/// How often, at most, the holder looks at what the migration's sessions wait on.
const LOOK_AT_WAITS: Duration = Duration::from_secs(5);
/// How often the holder probes the app for readiness.
const PROBE_EVERY: Duration = Duration::from_millis(250);

/// The lock session of the holder, its scope and its ledger row.
pub(crate) struct Holding {
    conn: Conn,
    /// In transaction scope: the connection through which the attempt row and its heartbeats
    /// commit, outside the lock's transaction (see [`crate::protocol`], "open the witness").
    witness: Option<Conn>,
    scope: Scope,
    /// The server's proof that the lock session holds the lock, carried by every statement
    /// that acts for the holder.
    proof: Proof,
    attempt: i64,
    since: Instant,
    /// The database sessions of this attempt: its tag, and those seen on the child's sockets.
    sessions: sessions::AttemptSessions,
    /// Local ports of the child's TCP connections already looked up.
    ports_seen: BTreeMap<u16, u32>,
    /// Whether the gate reaches PostgreSQL without a pooler or proxy between (so do, we
    /// assume, its children on the same URL).
    direct: bool,
    /// The server's `server_version_num`, from the connection's start-up (0: unknown).
    server_version: u32,
    /// `--wait-timeout`: how long to keep the lock waiting for sessions we may not end, and
    /// for apps of other releases to disconnect.
    wait_timeout: Duration,
    /// The holder's settings.
    plan: HolderPlan,
    /// What taking over ended of earlier attempts, for this attempt's record.
    note: Option<String>,
    /// The attempt before ours when it failed, for the termination message ("the previous
    /// attempt 3 failed too").
    previous_failure: Option<String>,
}

/// What a replica got with the lock, for its attempt: how it reaches PostgreSQL and holds the
/// lock, and the bounds its fencing and ending depend on.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Takeover {
    /// What sits between the gate and PostgreSQL.
    pub(crate) route: Route,
    /// How the lock is held.
    pub(crate) scope: Scope,
    /// `--wait-timeout`: how long to keep the lock waiting for sessions we may not end.
    pub(crate) wait_timeout: Duration,
    /// The holder's settings.
    pub(crate) plan: HolderPlan,
    /// Whether the ledger has its `app` column ([`crate::application`]).
    pub(crate) app_column: bool,
}

/// How an attempt ends, for [`Holding::end`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ending<'a> {
    /// `done` or `failed`.
    pub(crate) outcome: Outcome,
    /// The child's exit code, or the gate's own for a refusal.
    pub(crate) exit_code: Option<i32>,
    /// Why, for the ledger.
    pub(crate) detail: &'a str,
}

impl<'a> Ending<'a> {
    /// The release is done.
    pub(crate) fn done(exit_code: Option<i32>, detail: &'a str) -> Ending<'a> {
        Ending {
            outcome: Outcome::Done,
            exit_code,
            detail,
        }
    }

    /// The attempt failed.
    pub(crate) fn failed(exit_code: Option<i32>, detail: &'a str) -> Ending<'a> {
        Ending {
            outcome: Outcome::Failed,
            exit_code,
            detail,
        }
    }
}

impl Holding {
    /// The holder of the attempt `held`, begun by [`crate::protocol`] on `conn` (and its
    /// witness) under the lock's proof.
    pub(crate) fn new(
        replica: &Replica,
        (conn, witness): (Conn, Option<Conn>),
        held: HeldAttempt,
        taken: Takeover,
        server_version: u32,
    ) -> Holding {
        Holding {
            conn,
            witness,
            scope: taken.scope,
            sessions: sessions::AttemptSessions::new(
                replica.identity(),
                replica.tagged_release(),
                held.id,
            ),
            proof: held.proof,
            attempt: held.id,
            since: Instant::now(),
            ports_seen: BTreeMap::new(),
            direct: taken.route == Route::Direct,
            server_version,
            wait_timeout: taken.wait_timeout,
            plan: taken.plan,
            note: None,
            previous_failure: None,
        }
    }

    /// What came before this attempt: the newest earlier attempt of the release (`previous`,
    /// said when it failed) and what taking over ended of earlier attempts' sessions.
    pub(crate) fn with_history(
        mut self,
        previous: Option<Vec<AttemptRow>>,
        ended: Terminated,
    ) -> Holding {
        self.previous_failure = watch::say_previous_failure(previous);
        self.note = (ended != Terminated::default())
            .then(|| format!("before it, earlier attempts' sessions: {ended}"));
        self
    }

    /// What taking over found of the migration tool's own state ([`crate::tools`]), for this
    /// attempt's record.
    pub(crate) fn with_tool_notes(mut self, lines: Vec<String>) -> Holding {
        if !lines.is_empty() {
            let lines = lines.join("; ");
            self.note = Some(match self.note.take() {
                Some(note) => format!("{note}; {lines}"),
                None => lines,
            });
        }
        self
    }

    /// The environment of this attempt's children: the session tag and `PGOPTIONS` (with
    /// `lock_timeout`, for the migration command).
    fn child_env(&self, lock_timeout: Option<Duration>) -> Vec<(String, String)> {
        sessions::child_env(
            self.sessions.tag(),
            self.direct,
            self.server_version,
            lock_timeout,
        )
    }

    /// The connection that commits on its own: the witness in transaction scope, else the lock
    /// session. `pg_stat_activity` is read through it: inside the lock's transaction it would
    /// show the same snapshot on every read.
    async fn ledger_conn(&mut self) -> Result<&mut sqlx::PgConnection, sqlx::Error> {
        match self.witness.as_mut() {
            Some(w) => w.pg().await,
            None => self.conn.pg().await,
        }
    }

    /// The ledger row of this attempt.
    pub(crate) fn attempt_id(&self) -> i64 {
        self.attempt
    }

    /// Closes the lock session (freeing the lock) and the witness: for ends that record nothing.
    pub(super) async fn close(self) {
        close(self.conn).await;
        if let Some(w) = self.witness {
            close(w).await;
        }
    }

    /// The one exit of an attempt but fencing ([`Holding::fence`]): done, failed, timed out,
    /// refused by a preflight check or by `--other-releases`, failed to start, not ready. When
    /// it failed, first ends its database sessions and confirms they are gone (keeping the lock
    /// meanwhile); then records the outcome and notifies the waiters in one statement that
    /// proves the lock, commits, and only then frees the lock (step 5 of [`crate::protocol`]).
    /// A row that is no longer `running` is not overwritten: the lock was lost at some point,
    /// and the next holder decides.
    pub(crate) async fn end(mut self, replica: &Replica, ending: Ending<'_>) -> Result<()> {
        let mut detail = ending.detail.to_string();
        if ending.outcome == Outcome::Failed {
            match self.end_own_sessions(replica).await {
                Ok(ended) => detail = format!("{detail}; sessions: {ended}"),
                Err(e) => {
                    // The row stays `running`: the next holder waits out our fencing time and
                    // ends what is left before it migrates.
                    self.close().await;
                    return Err(e);
                }
            }
        }
        if let Some(note) = &self.note {
            detail = format!("{detail}; {note}");
        }
        let (outcome, attempt) = (ending.outcome, self.attempt);
        let result = self
            .record_and_unlock(
                replica,
                &AttemptEnd {
                    outcome,
                    exit_code: ending.exit_code,
                    detail: &detail,
                },
            )
            .await;
        let held_ms = self.since.elapsed().as_millis() as u64;
        self.close().await;
        match result {
            Ok(true) => {
                info!(attempt, outcome = ?outcome, "ledger written");
                info!(held_ms, "lock released");
                Ok(())
            }
            Ok(false) => Err(Error::Unavailable(format!(
                "the attempt ended ({outcome:?}) but was not recorded: attempt {attempt} is no \
                 longer `running` or the lock session lost the lock (another replica took over, \
                 or a reset removed it); the next holder decides what happens to the release"
            ))),
            Err(e) => Err(Error::Unavailable(format!(
                "the attempt ended ({outcome:?}) but the ledger could not be written: {e}; \
                 the lock is freed with the session and the next holder will migrate again"
            ))),
        }
    }

    /// Ends this attempt's database sessions and confirms they are gone, keeping the lock.
    async fn end_own_sessions(&mut self, replica: &Replica) -> Result<Terminated> {
        let (which, bound) = (self.sessions.which(), self.wait_timeout);
        let c = self.ledger_conn().await.map_err(|e| {
            Error::Unavailable(format!("could not look at the attempt's sessions: {e}"))
        })?;
        // Our own attempt's sessions are ended without a guard: `None` is never returned.
        Ok(terminate_sessions(c, &which, replica.db.username(), bound)
            .await?
            .unwrap_or_default())
    }

    /// Records the outcome on the lock session, under the lock's proof, then frees the lock.
    /// Whether it was recorded (false: the row is no longer `running`, or the lock is lost).
    async fn record_and_unlock(
        &mut self,
        replica: &Replica,
        ended: &AttemptEnd<'_>,
    ) -> Result<bool, sqlx::Error> {
        let (attempt, proof, scope) = (self.attempt, self.proof.clone(), self.scope);
        let c = self.conn.pg().await?;
        let recorded = replica.ledger.finish(c, attempt, ended, &proof).await?;
        lock::unlock(c, replica.lock(), scope).await?;
        Ok(recorded)
    }
}
