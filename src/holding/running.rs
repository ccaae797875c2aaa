//! Running the holder's child with the lock held (step 4 of [`crate::protocol`]): a migration
//! command to completion, or the app until it is ready. Both are supervised the same way
//! (heartbeats that fence, reports of what its sessions wait on) and end in [`Holding::end`],
//! or in [`Holding::fence`] when the lock session is lost.

use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use super::{Ending, FROZEN_AFTER, HEARTBEAT, Holding, LOOK_AT_WAITS, PROBE_EVERY};
use crate::child::{self, Program, Supervisor};
use crate::db::{Db, close};
use crate::duration;
use crate::error::{Error, Result};
use crate::lockwaits;
use crate::probe::Probe;
use crate::replica::Replica;

/// Why a supervised child stopped being watched: `W` is what else ends the watch, a
/// migration's bound ([`Overran`]) or an app's readiness ([`Readiness`]).
enum StepEnd<W> {
    /// The child exited with this code.
    Exited(i32),
    /// The lock session failed its heartbeat: the child is killed at once
    /// ([`Holding::fence`]), paused or not.
    LockLost { reason: String },
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
    /// Runs a migration command to completion with the flag on, within `--migration-timeout`.
    /// Success hands the lock back for the next step; failure (or the bound) is recorded,
    /// frees the lock, and becomes the error (with the command's code, or 75).
    pub(crate) async fn migrate(
        mut self,
        replica: &Replica,
        program: &Program<'_>,
        what: &str,
    ) -> Result<Holding> {
        let bounds = self.plan;
        info!(command = %program.display(), flag = %format!("{}={}", program.flag.0, program.flag.1), tag = %self.sessions.tag(), "migration started");
        self.say_route_limits();
        let started = Instant::now();
        let program = program.with_env(self.child_env(bounds.lock_timeout));
        let mut child = match child::spawn(&program) {
            Ok(c) => c,
            Err(e) => return Err(self.refuse(replica, e).await),
        };
        let bound = overran(bounds.migration_timeout);
        let watching = ("the migration", bounds.report_waits_after);
        let end = self.supervise(replica, &mut child, bound, watching).await;
        if let StepEnd::Exited(code) = end {
            child.finish();
            let secs = format!("{:.1}", started.elapsed().as_secs_f64());
            info!(code, secs, "migration finished");
        }
        let display = program.display();
        match end {
            StepEnd::Exited(0) => self.settle_after_success(replica, what).await,
            StepEnd::Exited(code) => {
                let stopped_by = child.stopped_by();
                Err(self
                    .migration_failed(replica, (what, &display), code, stopped_by)
                    .await)
            }
            StepEnd::Watched(Overran(limit)) => {
                let code = child.stop(bounds.kill_grace).await;
                child.finish();
                Err(self.overran(replica, (what, &display), limit, code).await)
            }
            StepEnd::LockLost { reason } => Err(self.fence(replica, &mut child, &reason).await),
        }
    }

    /// What a route through a pooler or proxy means for the migration, said as it starts.
    fn say_route_limits(&self) {
        let bounds = self.plan;
        if self.direct {
            return;
        }
        if bounds.lock_timeout.is_some() {
            warn!(
                "--lock-timeout is not passed to the migration: the gate reaches PostgreSQL through a pooler or proxy, and PgBouncer refuses the PGOPTIONS it travels in; set lock_timeout in the migration itself (SET lock_timeout = ...) or connect it directly"
            );
        }
        info!(
            "the gate reaches PostgreSQL through a pooler or proxy; if the migration does too, a statement it sends in the instant a freeze of this replica ends (docker pause, a paused VM) may commit beside the next holder's migration: give the migration a direct connection to close that (docs/design.md, \"Frozen holders\")"
        );
    }

    /// The migration command (`what`, running `program`) failed with `code`: recorded failed,
    /// and the error passes its code. After the gate passed on a stopping signal (`stopped_by`)
    /// the migration was interrupted, which is recorded as such and does not count against
    /// `--max-failures` ([`crate::ledger::NotCounted`]).
    async fn migration_failed(
        self,
        replica: &Replica,
        (what, program): (&str, &str),
        code: i32,
        stopped_by: Option<&str>,
    ) -> Error {
        let too = self.failed_too();
        let detail = interrupted_or(stopped_by, format!("{what} failed"));
        if let Err(e) = self.end(replica, Ending::failed(Some(code), &detail)).await {
            return e;
        }
        Error::MigrationFailed {
            what: format!("{what} `{program}`{too}"),
            code,
        }
    }

    /// The migration ran past `--migration-timeout` and was stopped (exit `code`): recorded
    /// failed, exit 75.
    async fn overran(
        self,
        replica: &Replica,
        (what, program): (&str, &str),
        limit: Duration,
        code: i32,
    ) -> Error {
        let too = self.failed_too();
        let reason = format!(
            "{what} ran longer than --migration-timeout ({}) and was stopped",
            duration::short(limit)
        );
        error!(code, "{reason}");
        if let Err(e) = self.end(replica, Ending::failed(Some(code), &reason)).await {
            return e;
        }
        Error::Timeout {
            what: format!("{what} `{program}` did not finish{too}"),
            waited: limit,
            hint: "it was stopped, its database sessions ended and the attempt recorded as failed; the next replica migrates again (raise --migration-timeout if it needs longer)".into(),
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
    ) -> Result<Supervisor> {
        let bounds = self.plan;
        info!(command = %app.display(), probe = %probe.describe(), flag = %format!("{}={}", app.flag.0, app.flag.1), tag = %self.sessions.tag(), "starting the app; holding the lock until it is ready");
        let started = Instant::now();
        let app = &app.with_env(self.child_env(None));
        let mut child = match child::spawn(app) {
            Ok(c) => c,
            Err(e) => return Err(self.refuse(replica, e).await),
        };
        let ready = readiness(probe, &replica.db, ready_timeout);
        let watching = (
            "the app starting with the flag on",
            bounds.report_waits_after,
        );
        match self.supervise(replica, &mut child, ready, watching).await {
            StepEnd::Watched(Readiness::Ready) => {
                let secs = format!("{:.1}", started.elapsed().as_secs_f64());
                info!(secs, "the app is ready");
                let ending = Ending::done(None, "the app became ready");
                self.end(replica, ending).await?;
                Ok(child)
            }
            StepEnd::Exited(code) => {
                child.finish();
                let detail = interrupted_or(
                    child.stopped_by(),
                    "the app exited before it was ready".into(),
                );
                let ending = Ending::failed(Some(code), &detail);
                self.end(replica, ending).await?;
                let app = app.display();
                let what = format!("the app `{app}` exited before it was ready, so the migration");
                Err(Error::MigrationFailed { what, code })
            }
            StepEnd::Watched(Readiness::NotReady) => {
                let code = child.stop(bounds.kill_grace).await;
                child.finish();
                let ending = Ending::failed(Some(code), "the app was not ready in time");
                self.end(replica, ending).await?;
                Err(not_ready(probe, ready_timeout))
            }
            StepEnd::LockLost { reason } => Err(self.fence(replica, &mut child, &reason).await),
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
                    if let Err(lost) = self.beat(replica, child, beat.elapsed()).await {
                        return lost;
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

    /// One heartbeat, `late` after it was due. A gate that woke this late did not run
    /// meanwhile (frozen or starved), and its child most likely thawed with it: the child is
    /// paused before the lock is proven, and goes on only if it is still ours.
    async fn beat<W>(
        &mut self,
        replica: &Replica,
        child: &Supervisor,
        late: Duration,
    ) -> Result<(), StepEnd<W>> {
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
            return Err(StepEnd::LockLost { reason });
        }
        if paused {
            child.resume();
            info!("the lock is still ours; the migration goes on");
        }
        if self.direct {
            self.remember_sessions(replica, child.pgid()).await;
        }
        Ok(())
    }
}

/// Ends with the migration's bound, `--migration-timeout` (never without one).
async fn overran(limit: Option<Duration>) -> Overran {
    match limit {
        Some(limit) => {
            tokio::time::sleep(limit).await;
            Overran(limit)
        }
        None => std::future::pending().await,
    }
}

/// Probes the app every [`PROBE_EVERY`] until it is ready or `ready_timeout` passed.
async fn readiness(probe: &Probe, db: &Db, ready_timeout: Duration) -> Readiness {
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
}

/// The error of an app that was not ready within `--ready-timeout`.
fn not_ready(probe: &Probe, ready_timeout: Duration) -> Error {
    Error::Timeout {
        what: format!("the app was not ready ({})", probe.describe()),
        waited: ready_timeout,
        hint: "it was stopped and the attempt recorded as failed; check the app's logs or raise --ready-timeout".into(),
    }
}

/// `detail`, or, when the gate passed on a stopping signal to the child (`stopped_by`), that it
/// was interrupted: the child's exit then says nothing about the migration.
fn interrupted_or(stopped_by: Option<&str>, detail: String) -> String {
    match stopped_by {
        Some(sig) => format!(
            "{}the gate received {sig} and passed it on (a pod deleted, a rollout, a drain); {detail}",
            crate::ledger::NotCounted::Interrupted.prefix()
        ),
        None => detail,
    }
}
