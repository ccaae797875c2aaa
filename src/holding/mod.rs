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
use crate::db::{Conn, Failure, close};
use crate::duration;
use crate::error::{Error, Result};
use crate::ledger::{Begun, Outcome, ReadKey, Seen};
use crate::lock::{self, Proof, Scope};
use crate::lockwaits;
use crate::probe::Probe;
use crate::replica::Replica;
use crate::route::Route;
use crate::sessions::{self, Ended, Which};

mod ending;
mod watch;

use ending::{attempt, end_sessions};
use watch::Watch;
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
    sessions: sessions::Attempt,
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

/// What taking over found.
pub(crate) enum TakeOver {
    /// We hold the lock and have recorded an attempt: migrate.
    Holding(Box<Holding>),
    /// The previous holder finished between the waiter's read and our lock: the lock is freed
    /// again, and this replica is a follower after all.
    AlreadyDone { seen: Seen, conn: Conn },
}

/// Why a supervised child stopped being watched.
enum StepEnd {
    /// The child exited with this code.
    Exited(i32),
    /// The readiness probe passed.
    Ready,
    /// The lock session failed its heartbeat (`paused`: the child is paused, after the gate
    /// woke up late, and must not run again).
    LockLost { reason: String, paused: bool },
    /// The app did not become ready in time.
    ReadyTimeout,
    /// The migration ran longer than `--migration-timeout` (this long).
    TimedOut(Duration),
}

impl Holding {
    /// Takes over once the waiter's `conn` holds the lock in `scope` (step 3 of the protocol,
    /// [`crate::waiting`]): keepalives on the lock session, the ledger read again inside the
    /// lock, the witness connection, the wait for a vanished holder's fencing time, and this
    /// attempt's row. Errors come sorted into "retry" and "give up".
    pub(crate) async fn take_over(
        replica: &Replica,
        mut conn: Conn,
        (route, scope): (Route, Scope),
        kill_grace: Duration,
        wait_timeout: Duration,
    ) -> Result<TakeOver, Failure> {
        let sql = |e: sqlx::Error| replica.db.classify(&e);
        let lost = |when: &str| {
            Failure::Retry(format!(
                "the lock session lost the lock {when}; nothing was migrated, waiting again"
            ))
        };
        let c = conn.pg().await.map_err(sql)?;
        let server_version = c.server_version_num().unwrap_or(0);
        lock::configure_lock_session(c, scope).await.map_err(sql)?;
        let proof = Proof::of(c, replica.lock()).await.map_err(sql)?;
        if let Some(release) = replica.release() {
            let seen = replica
                .ledger
                .is_done(c, release, ReadKey::No)
                .await
                .map_err(sql)?;
            if seen.done == Some(true) {
                // The previous holder finished between our read and our lock.
                lock::release(c, replica.lock(), scope).await.map_err(sql)?;
                return Ok(TakeOver::AlreadyDone { seen, conn });
            }
        }
        // The attempt row and its heartbeats must be visible to a taker-over even if this
        // holder vanishes. In session scope they commit on the lock session itself; in
        // transaction scope everything written there rolls back with the lock, so they go
        // through a second connection that commits on its own: the witness. Every statement
        // below that acts for the holder carries the lock's proof ([`Proof`]): the witness is
        // another session, and the lock session may be lost at any moment.
        let mut witness = match scope {
            Scope::Session => None,
            _ => Some(replica.db.connect_once(replica.db.attempt_limit()).await?),
        };
        let book = match witness.as_mut() {
            Some(w) => w.pg().await.map_err(sql)?,
            None => conn.pg().await.map_err(sql)?,
        };
        let stale = replica.ledger.stale(book, &proof).await.map_err(sql)?;
        if !stale.held {
            return Err(lost("before it began"));
        }
        if stale.running > 0 {
            warn!(
                stale = stale.running,
                fence_wait_s = format!("{:.1}", stale.wait_secs),
                "the previous holder vanished mid-migration; taking over once it has surely stopped its migration"
            );
            if !ending::wait_out_fence(replica, book, &proof, stale.wait_secs).await {
                return Err(lost("while waiting out the previous holder's fencing time"));
            }
        }
        // An attempt is over only when its sessions are: a vanished, fenced or failed holder's
        // statement may still run (or sit in a lock queue) on the server.
        let tag = sessions::Tag::new(replica.lock(), replica.release(), None);
        let earlier = Which::unfinished(
            &tag,
            &replica.ledger.unfinished_ids(),
            &replica.ledger.unfinished_seen(),
        )
        .while_holding(&proof);
        let Some(ended) = end_sessions(book, &earlier, replica.db.username(), wait_timeout)
            .await
            .map_err(Failure::Fatal)?
        else {
            return Err(lost("while ending earlier attempts' sessions"));
        };
        if stale.running > 0
            && !replica
                .ledger
                .abandon_stale(book, &ended.to_string(), &proof)
                .await
                .map_err(sql)?
        {
            return Err(lost(
                "before it marked the vanished holder's attempt abandoned",
            ));
        }
        let previous = replica.ledger.attempts(book, replica.release(), 1).await;
        let attempt = match replica
            .ledger
            .begin(book, &attempt(replica, kill_grace), &proof)
            .await
            .map_err(sql)?
        {
            Begun::Attempt(id) => id,
            Begun::LockLost => return Err(lost("before it began")),
            Begun::AlreadyDone => {
                // Impossible while we hold the lock (only a holder writes `done`), and cheap to
                // honour: a follower after all.
                let c = conn.pg().await.map_err(sql)?;
                lock::release(c, replica.lock(), scope).await.map_err(sql)?;
                let release = replica.release().unwrap_or_default();
                let seen = replica
                    .ledger
                    .is_done(c, release, ReadKey::No)
                    .await
                    .map_err(sql)?;
                return Ok(TakeOver::AlreadyDone { seen, conn });
            }
        };
        let previous_failure = watch::say_previous_failure(previous.ok());
        Ok(TakeOver::Holding(Box::new(Holding {
            conn,
            witness,
            scope,
            proof,
            attempt,
            since: Instant::now(),
            sessions: sessions::Attempt::new(replica.lock(), replica.release(), attempt),
            ports_seen: BTreeMap::new(),
            direct: route == Route::Direct,
            server_version,
            wait_timeout,
            previous_failure,
            note: (ended != Ended::default())
                .then(|| format!("before it, earlier attempts' sessions: {ended}")),
        })))
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
    pub(crate) fn attempt(&self) -> i64 {
        self.attempt
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
            Err(e) => return Err(self.fail_to_start(replica, e).await),
        };
        let watch = Watch {
            limit: bounds.migration_timeout,
            report_waits_after: bounds.report_waits_after,
        };
        match self.supervise(replica, &mut child, None, watch).await {
            StepEnd::Exited(code) => {
                child.finish();
                info!(
                    code,
                    secs = format!("{:.1}", started.elapsed().as_secs_f64()),
                    "migration finished"
                );
                if code == 0 {
                    return self.settle_after_success(replica, what).await;
                }
                self.complete(
                    replica,
                    Outcome::Failed,
                    Some(code),
                    &format!("{what} failed"),
                )
                .await?;
                Err(Error::MigrationFailed {
                    what: format!("{what} `{}`{}", program.display(), too),
                    code,
                })
            }
            StepEnd::TimedOut(limit) => {
                let code = child.stop(bounds.kill_grace).await;
                child.finish();
                let reason = format!(
                    "{what} ran longer than --migration-timeout ({}) and was stopped",
                    duration::short(limit)
                );
                error!(code, "{reason}");
                self.complete(replica, Outcome::Failed, Some(code), &reason)
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
            StepEnd::Ready | StepEnd::ReadyTimeout => Err(Error::Internal(
                "a probe ended a migration without a probe".into(),
            )),
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
        let watch = Watch {
            limit: None,
            report_waits_after,
        };
        let app = &app.with_env(self.child_env(None));
        let mut child = match child::spawn(app) {
            Ok(c) => c,
            Err(e) => return Err(self.fail_to_start(replica, e).await),
        };
        match self
            .supervise(replica, &mut child, Some((probe, ready_timeout)), watch)
            .await
        {
            StepEnd::Ready => {
                info!(
                    secs = format!("{:.1}", started.elapsed().as_secs_f64()),
                    "the app is ready"
                );
                self.complete(replica, Outcome::Done, None, "the app became ready")
                    .await?;
                Ok(child)
            }
            StepEnd::Exited(code) => {
                child.finish();
                self.complete(
                    replica,
                    Outcome::Failed,
                    Some(code),
                    "the app exited before it was ready",
                )
                .await?;
                Err(Error::MigrationFailed {
                    what: format!(
                        "the app `{}` exited before it was ready, so the migration",
                        app.display()
                    ),
                    code,
                })
            }
            StepEnd::ReadyTimeout | StepEnd::TimedOut(_) => {
                let code = child.stop(kill_grace).await;
                child.finish();
                self.complete(
                    replica,
                    Outcome::Failed,
                    Some(code),
                    "the app was not ready in time",
                )
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

    /// Ends the attempt: when it failed, first ends its database sessions and confirms they are
    /// gone (keeping the lock meanwhile); then records the outcome and notifies the waiters on
    /// the lock session, commits, and only then frees the lock (step 4 of the protocol). Every
    /// way an attempt ends but fencing passes here.
    pub(crate) async fn complete(
        mut self,
        replica: &Replica,
        outcome: Outcome,
        exit_code: Option<i32>,
        detail: &str,
    ) -> Result<()> {
        let mut detail = detail.to_string();
        if outcome == Outcome::Failed {
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
                    close(self.conn).await;
                    if let Some(w) = self.witness {
                        close(w).await;
                    }
                    return Err(e);
                }
            }
        }
        if let Some(note) = &self.note {
            detail = format!("{detail}; {note}");
        }
        let result = async {
            let c = self.conn.pg().await?;
            let recorded = replica
                .ledger
                .finish(c, self.attempt, (outcome, exit_code, &detail), &self.proof)
                .await?;
            if recorded {
                info!(attempt = self.attempt, outcome = ?outcome, "ledger written");
            }
            lock::release(c, replica.lock(), self.scope).await?;
            Ok::<_, sqlx::Error>(recorded)
        }
        .await;
        close(self.conn).await;
        if let Some(w) = self.witness {
            close(w).await;
        }
        match result {
            Ok(true) => {
                info!(
                    held_ms = self.since.elapsed().as_millis() as u64,
                    "lock released"
                );
                Ok(())
            }
            Ok(false) => Err(Error::Unavailable(format!(
                "the attempt ended ({outcome:?}) but was not recorded: attempt {} is no longer \
                 `running` or the lock session lost the lock (another replica took over, or a \
                 reset removed it); the next holder decides what happens to the release",
                self.attempt
            ))),
            Err(e) => Err(Error::Unavailable(format!(
                "the attempt ended ({outcome:?}) but the ledger could not be written: {e}; \
                 the lock is freed with the session and the next holder will migrate again"
            ))),
        }
    }

    /// Watches `child` while holding the lock: heartbeats, and the readiness probe if any.
    async fn supervise(
        &mut self,
        replica: &Replica,
        child: &mut Supervisor,
        probe: Option<(&Probe, Duration)>,
        watch: Watch,
    ) -> StepEnd {
        let limit = watch.limit.unwrap_or(Duration::MAX / 4);
        let limit_deadline = tokio::time::Instant::now() + limit;
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut probe_tick = tokio::time::interval(PROBE_EVERY);
        let ready_deadline =
            tokio::time::Instant::now() + probe.map(|p| p.1).unwrap_or(Duration::MAX / 4);
        let mut sql_conn = None;
        // What the migration waits on: every 5 s, or sooner for a shorter threshold (not on
        // every heartbeat: one query with pg_blocking_pids, on the holder only).
        let every = LOOK_AT_WAITS.min(watch.report_waits_after.max(HEARTBEAT));
        let mut waits_tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        waits_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reporter = lockwaits::Reporter::new(match probe {
            Some(_) => "the app starting with the flag on",
            None => "the migration",
        });
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
                    self.report_waits(&mut reporter, watch.report_waits_after).await;
                }
                _ = probe_tick.tick(), if probe.is_some() => {
                    if let Some((p, _)) = probe
                        && p.check(&replica.db, &mut sql_conn).await
                    {
                        if let Some(c) = sql_conn.take() {
                            close(c).await;
                        }
                        return StepEnd::Ready;
                    }
                }
                _ = tokio::time::sleep_until(ready_deadline), if probe.is_some() => return StepEnd::ReadyTimeout,
                _ = tokio::time::sleep_until(limit_deadline), if watch.limit.is_some() => return StepEnd::TimedOut(limit),
            }
        }
    }
}
