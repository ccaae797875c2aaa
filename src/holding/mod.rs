//! Holding the lock: the replica that migrates, from taking over to the end of its attempt. A
//! [`Holding`] exists only while this replica holds the lock; it owns the lock session, the
//! lock's scope and the ledger row of its attempt. Its life: [`Holding::take_over`] once the
//! waiter got the lock, [`Holding::migrate`] (and/or [`Holding::start_app`]), checking the lock
//! session on every heartbeat while a child runs, then the attempt ends in one of two places:
//! [`Holding::complete`], which records the outcome, notifies the waiters and frees the lock, or
//! [`Holding::fence`] when the session was lost. Both consume it: a holder cannot complete twice,
//! nor fence and then complete.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use crate::child::{self, Program, Supervisor};
use crate::db::{Conn, close};
use crate::duration;
use crate::error::{Error, Result};
use crate::ledger::{AttemptRow, Outcome};
use crate::lock::{self, Proof, Scope};
use crate::lockwaits;
use crate::probe::Probe;
use crate::replica::Replica;
use crate::route::Route;
use crate::sessions::{self, Ended};

mod ending;
mod watch;

pub(crate) use ending::{end_sessions, new_attempt, wait_out_fence};
pub(crate) use watch::{Bounds, OtherReleases};

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
    /// commit, outside the lock's transaction (see [`Holding::take_over`]).
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
    /// `--wait-timeout`: how long to keep the lock waiting for sessions we may not end.
    wait_timeout: Duration,
    /// What taking over ended of earlier attempts, for this attempt's record.
    note: Option<String>,
    /// The attempt before ours when it failed, for the termination message ("the previous
    /// attempt 3 failed too").
    previous_failure: Option<String>,
}

/// What a replica got with the lock, for its attempt: how it reaches PostgreSQL and holds the
/// lock, and the bounds its fencing and ending depend on.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Taken {
    /// What sits between the gate and PostgreSQL.
    pub(crate) route: Route,
    /// How the lock is held.
    pub(crate) scope: Scope,
    /// `--kill-grace`, recorded so that a taker-over knows how long fencing takes.
    pub(crate) kill_grace: Duration,
    /// `--wait-timeout`: how long to keep the lock waiting for sessions we may not end.
    pub(crate) wait_timeout: Duration,
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

/// Why a supervised child stopped being watched: `W` is what else ends the watch, a
/// migration's bound ([`Overran`]) or an app's readiness ([`Readiness`]).
enum StepEnd<W> {
    /// The child exited with this code.
    Exited(i32),
    /// The lock session failed its heartbeat (`paused`: the child is paused, after the gate
    /// woke up late, and must not run again).
    LockLost { reason: String, paused: bool },
    /// What else was watched.
    Watched(W),
}

/// The migration ran longer than `--migration-timeout` (this long).
struct Overran(Duration);

/// How the readiness probe of an app started with the lock ended.
enum Readiness {
    /// The probe passed.
    Ready,
    /// `--ready-timeout` passed first.
    NotReady,
}

impl Holding {
    /// The holder of attempt `id`, begun by [`crate::protocol`] on `conn` (and its witness)
    /// with the lock's `proof`.
    pub(crate) fn new(
        replica: &Replica,
        (conn, witness): (Conn, Option<Conn>),
        (proof, id): (Proof, i64),
        taken: Taken,
        server_version: u32,
    ) -> Holding {
        Holding {
            conn,
            witness,
            scope: taken.scope,
            proof,
            attempt: id,
            since: Instant::now(),
            sessions: sessions::AttemptSessions::new(replica.lock(), replica.release(), id),
            ports_seen: BTreeMap::new(),
            direct: taken.route == Route::Direct,
            server_version,
            wait_timeout: taken.wait_timeout,
            note: None,
            previous_failure: None,
        }
    }

    /// What came before this attempt: the newest earlier attempt of the release (`previous`,
    /// said when it failed) and what taking over ended of earlier attempts' sessions.
    pub(crate) fn after(mut self, previous: Option<Vec<AttemptRow>>, ended: Ended) -> Holding {
        self.previous_failure = watch::say_previous_failure(previous);
        self.note = (ended != Ended::default())
            .then(|| format!("before it, earlier attempts' sessions: {ended}"));
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
    async fn book(&mut self) -> Result<&mut sqlx::PgConnection, sqlx::Error> {
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

    /// Runs a migration command to completion with the flag on, within `--migration-timeout`.
    /// Success hands the lock back for the next step; failure (or the bound) is recorded,
    /// frees the lock, and becomes the error (with the command's code, or 75).
    pub(crate) async fn migrate(
        mut self,
        replica: &Replica,
        program: &Program<'_>,
        what: &str,
        bounds: &Bounds,
    ) -> Result<Holding> {
        info!(command = %program.display(), flag = %format!("{}={}", program.flag.0, program.flag.1), tag = %self.sessions.tag(), "migration started");
        if bounds.lock_timeout.is_some() && !self.direct {
            warn!(
                "--lock-timeout is not passed to the migration: the gate reaches PostgreSQL through a pooler or proxy, and PgBouncer refuses the PGOPTIONS it travels in; set lock_timeout in the migration itself (SET lock_timeout = ...) or connect it directly"
            );
        }
        if !self.direct {
            info!(
                "the gate reaches PostgreSQL through a pooler or proxy; if the migration does too, a statement it sends in the instant a freeze of this replica ends (docker pause, a paused VM) may commit beside the next holder's migration: give the migration a direct connection to close that (docs/design.md, \"Frozen holders\")"
            );
        }
        let started = Instant::now();
        let too = self.failed_too();
        let program = program.with_env(self.child_env(bounds.lock_timeout));
        let mut child = match child::spawn(&program) {
            Ok(c) => c,
            Err(e) => return Err(self.refuse(replica, e).await),
        };
        let limit = bounds.migration_timeout;
        let bound = async move {
            match limit {
                Some(limit) => {
                    tokio::time::sleep(limit).await;
                    Overran(limit)
                }
                None => std::future::pending().await,
            }
        };
        let watching = ("the migration", bounds.report_waits_after);
        match self.supervise(replica, &mut child, bound, watching).await {
            StepEnd::Exited(0) => {
                child.finish();
                info!(
                    secs = format!("{:.1}", started.elapsed().as_secs_f64()),
                    "migration finished"
                );
                self.settle_after_success(replica, what).await
            }
            StepEnd::Exited(code) => {
                child.finish();
                info!(
                    code,
                    secs = format!("{:.1}", started.elapsed().as_secs_f64()),
                    "migration finished"
                );
                let detail = format!("{what} failed");
                self.end(replica, Ending::failed(Some(code), &detail))
                    .await?;
                Err(Error::MigrationFailed {
                    what: format!("{what} `{}`{}", program.display(), too),
                    code,
                })
            }
            StepEnd::Watched(Overran(limit)) => {
                let code = child.stop(bounds.kill_grace).await;
                child.finish();
                let reason = format!(
                    "{what} ran longer than --migration-timeout ({}) and was stopped",
                    duration::short(limit)
                );
                error!(code, "{reason}");
                self.end(replica, Ending::failed(Some(code), &reason))
                    .await?;
                Err(Error::Timeout {
                    what: format!("{what} `{}` did not finish{}", program.display(), too),
                    waited: limit,
                    hint: "it was stopped, its database sessions ended and the attempt recorded as failed; the next replica migrates again (raise --migration-timeout if it needs longer)".into(),
                })
            }
            StepEnd::LockLost { reason, paused } => {
                let grace = if paused {
                    Duration::ZERO
                } else {
                    bounds.kill_grace
                };
                Err(self.fence(replica, &mut child, &reason, grace).await)
            }
        }
    }

    /// Starts the app and keeps the lock until `probe` passes; records the release done and
    /// returns the running app, which the caller stays the parent of.
    pub(crate) async fn start_app(
        mut self,
        replica: &Replica,
        app: &Program<'_>,
        probe: &Probe,
        ready_timeout: Duration,
        bounds: &Bounds,
    ) -> Result<Supervisor> {
        let (kill_grace, report_waits_after) = (bounds.kill_grace, bounds.report_waits_after);
        info!(command = %app.display(), probe = %probe.describe(), flag = %format!("{}={}", app.flag.0, app.flag.1), tag = %self.sessions.tag(), "starting the app; holding the lock until it is ready");
        let started = Instant::now();
        let app = &app.with_env(self.child_env(None));
        let mut child = match child::spawn(app) {
            Ok(c) => c,
            Err(e) => return Err(self.refuse(replica, e).await),
        };
        let db = &replica.db;
        let readiness = async move {
            let mut tick = tokio::time::interval(PROBE_EVERY);
            let mut sql_conn = None;
            let ready = async {
                loop {
                    tick.tick().await;
                    if probe.check(db, &mut sql_conn).await {
                        return;
                    }
                }
            };
            tokio::select! {
                () = ready => {
                    if let Some(c) = sql_conn.take() {
                        close(c).await;
                    }
                    Readiness::Ready
                }
                () = tokio::time::sleep(ready_timeout) => Readiness::NotReady,
            }
        };
        let watching = ("the app starting with the flag on", report_waits_after);
        match self
            .supervise(replica, &mut child, readiness, watching)
            .await
        {
            StepEnd::Watched(Readiness::Ready) => {
                info!(
                    secs = format!("{:.1}", started.elapsed().as_secs_f64()),
                    "the app is ready"
                );
                self.end(replica, Ending::done(None, "the app became ready"))
                    .await?;
                Ok(child)
            }
            StepEnd::Exited(code) => {
                child.finish();
                let detail = "the app exited before it was ready";
                self.end(replica, Ending::failed(Some(code), detail))
                    .await?;
                Err(Error::MigrationFailed {
                    what: format!(
                        "the app `{}` exited before it was ready, so the migration",
                        app.display()
                    ),
                    code,
                })
            }
            StepEnd::Watched(Readiness::NotReady) => {
                let code = child.stop(kill_grace).await;
                child.finish();
                let detail = "the app was not ready in time";
                self.end(replica, Ending::failed(Some(code), detail))
                    .await?;
                Err(Error::Timeout {
                    what: format!("the app was not ready ({})", probe.describe()),
                    waited: ready_timeout,
                    hint: "it was stopped and the attempt recorded as failed; check the app's logs or raise --ready-timeout".into(),
                })
            }
            StepEnd::LockLost { reason, paused } => {
                let grace = if paused { Duration::ZERO } else { kill_grace };
                Err(self.fence(replica, &mut child, &reason, grace).await)
            }
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
            let (which, bound) = (self.sessions.which(), self.wait_timeout);
            let ended = match self.book().await {
                Ok(c) => end_sessions(c, &which, replica.db.username(), bound).await,
                Err(e) => Err(Error::Unavailable(format!(
                    "could not look at the attempt's sessions: {e}"
                ))),
            };
            match ended {
                Ok(Some(ended)) => detail = format!("{detail}; sessions: {ended}"),
                // Our own attempt's sessions are ended without a guard: never reached.
                Ok(None) => {}
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
        let (outcome, attempt, proof) = (ending.outcome, self.attempt, self.proof.clone());
        let result = async {
            let c = self.conn.pg().await?;
            let recorded = replica
                .ledger
                .finish(c, attempt, (outcome, ending.exit_code, &detail), &proof)
                .await?;
            lock::unlock(c, replica.lock(), self.scope).await?;
            Ok::<_, sqlx::Error>(recorded)
        }
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

    /// Watches `child` while holding the lock: heartbeats (fencing), what its sessions wait on
    /// (`watching`: who they are, for the report, and after how long a wait is reported), and
    /// `watched`, whatever else ends the watch.
    async fn supervise<W>(
        &mut self,
        replica: &Replica,
        child: &mut Supervisor,
        watched: impl Future<Output = W>,
        (who, report_waits_after): (&'static str, Duration),
    ) -> StepEnd<W> {
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // What the migration waits on: every 5 s, or sooner for a shorter threshold (not on
        // every heartbeat: one query with pg_blocking_pids, on the holder only).
        let every = LOOK_AT_WAITS.min(report_waits_after.max(HEARTBEAT));
        let mut waits_tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        waits_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reporter = lockwaits::Reporter::new(who);
        let mut watched = std::pin::pin!(watched);
        loop {
            tokio::select! {
                // The heartbeat first: after a freeze every branch is ready at once, and the
                // child must be paused before anything else is asked of the server.
                biased;
                beat = heartbeat.tick() => {
                    let late = beat.elapsed();
                    let paused = late >= FROZEN_AFTER;
                    if paused {
                        child.pause();
                        warn!(
                            late_ms = late.as_millis() as u64,
                            "this gate did not run for {} (frozen or starved): the migration is paused until the lock is proven still ours",
                            duration::short(late)
                        );
                    }
                    if let Err(reason) = self.heartbeat(replica).await {
                        return StepEnd::LockLost { reason, paused };
                    }
                    if paused {
                        child.resume();
                        info!("the lock is still ours; the migration goes on");
                    }
                    if self.direct {
                        self.remember_sessions(replica, child.pgid()).await;
                    }
                }
                code = child.wait() => {
                    // Its statements are over, and with them every wait.
                    reporter.observe(Vec::new());
                    return StepEnd::Exited(code);
                }
                _ = waits_tick.tick() => {
                    self.report_waits(&mut reporter, report_waits_after).await;
                }
                w = &mut watched => return StepEnd::Watched(w),
            }
        }
    }
}
