//! Holding the lock: the replica that migrates. A [`Holding`] exists only while this replica
//! holds the lock; it owns the lock session, the lock's scope and the ledger row of its
//! attempt. Its life: [`Holding::migrate`] (and/or [`Holding::start_app`]), checking the lock
//! session on every heartbeat while a child runs, then [`Holding::complete`], which records the
//! outcome, notifies the waiters and frees the lock, or [`Holding::fence`] when the session was
//! lost. Both consume it: a holder cannot complete twice, nor fence and then complete.

use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use crate::child::{self, Program, Supervisor};
use crate::db::{self, Conn, close};
use crate::duration;
use crate::error::{Error, Result};
use crate::gate::Gate;
use crate::ledger::Outcome;
use crate::lock::{self, Scope};
use crate::probe::Probe;
use crate::sql;

/// How often the holder checks that its lock session is alive while a child runs.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// A heartbeat that takes longer than this counts as a lost session.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a fenced holder keeps trying to record its failed attempt.
const RECORD_FENCED_FOR: Duration = Duration::from_secs(15);
/// How often the holder probes the app for readiness.
const PROBE_EVERY: Duration = Duration::from_millis(250);

/// How long after its last heartbeat a holder with this `--kill-grace` has surely noticed a
/// lost session and stopped its child: a taker-over waits that long after a vanished holder.
pub(crate) fn fence_time(kill_grace: Duration) -> Duration {
    HEARTBEAT + HEARTBEAT_TIMEOUT + kill_grace + Duration::from_secs(1)
}

/// The lock session of the holder, its scope and its ledger row.
pub(crate) struct Holding {
    conn: Conn,
    /// In transaction scope: the connection through which the attempt row and its heartbeats
    /// commit, outside the lock's transaction (see [`crate::gate::Gate::round`]).
    witness: Option<Conn>,
    scope: Scope,
    attempt: i64,
    since: Instant,
}

/// Why a supervised child stopped being watched.
enum StepEnd {
    /// The child exited with this code.
    Exited(i32),
    /// The readiness probe passed.
    Ready,
    /// The lock session failed its heartbeat.
    LockLost(String),
    /// The app did not become ready in time.
    ReadyTimeout,
}

impl Holding {
    pub(crate) fn new(conn: Conn, witness: Option<Conn>, scope: Scope, attempt: i64) -> Holding {
        Holding {
            conn,
            witness,
            scope,
            attempt,
            since: Instant::now(),
        }
    }

    /// The ledger row of this attempt.
    pub(crate) fn attempt(&self) -> i64 {
        self.attempt
    }

    /// Runs a migration command to completion with the flag on. Success hands the lock back
    /// for the next step; failure is recorded, frees the lock, and becomes the error (with the
    /// command's code).
    pub(crate) async fn migrate(
        mut self,
        gate: &Gate,
        program: &Program<'_>,
        what: &str,
        kill_grace: Duration,
    ) -> Result<Holding> {
        info!(command = %program.display(), flag = %format!("{}={}", program.flag.0, program.flag.1), "migration started");
        let started = Instant::now();
        let mut child = match child::spawn(program) {
            Ok(c) => c,
            Err(e) => return Err(self.fail_to_start(gate, e).await),
        };
        match self.supervise(gate, &mut child, None).await {
            StepEnd::Exited(code) => {
                child.finish();
                info!(
                    code,
                    secs = format!("{:.1}", started.elapsed().as_secs_f64()),
                    "migration finished"
                );
                if code == 0 {
                    return Ok(self);
                }
                self.complete(gate, Outcome::Failed, Some(code), &format!("{what} failed"))
                    .await?;
                Err(Error::MigrationFailed {
                    what: format!("{what} `{}`", program.display()),
                    code,
                })
            }
            StepEnd::LockLost(reason) => {
                Err(self.fence(gate, &mut child, &reason, kill_grace).await)
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
        gate: &Gate,
        app: &Program<'_>,
        probe: &Probe,
        ready_timeout: Duration,
        kill_grace: Duration,
    ) -> Result<Supervisor> {
        info!(command = %app.display(), probe = %probe.describe(), flag = %format!("{}={}", app.flag.0, app.flag.1), "starting the app; holding the lock until it is ready");
        let started = Instant::now();
        let mut child = match child::spawn(app) {
            Ok(c) => c,
            Err(e) => return Err(self.fail_to_start(gate, e).await),
        };
        match self
            .supervise(gate, &mut child, Some((probe, ready_timeout)))
            .await
        {
            StepEnd::Ready => {
                info!(
                    secs = format!("{:.1}", started.elapsed().as_secs_f64()),
                    "the app is ready"
                );
                self.complete(gate, Outcome::Done, None, "the app became ready")
                    .await?;
                Ok(child)
            }
            StepEnd::Exited(code) => {
                child.finish();
                self.complete(
                    gate,
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
            StepEnd::ReadyTimeout => {
                let code = child.stop(kill_grace).await;
                child.finish();
                self.complete(
                    gate,
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
            StepEnd::LockLost(reason) => {
                Err(self.fence(gate, &mut child, &reason, kill_grace).await)
            }
        }
    }

    /// Records the outcome and notifies the waiters on the lock session, commits, then frees
    /// the lock (step 4 of the protocol).
    pub(crate) async fn complete(
        mut self,
        gate: &Gate,
        outcome: Outcome,
        exit_code: Option<i32>,
        detail: &str,
    ) -> Result<()> {
        let result = async {
            let c = self.conn.pg().await?;
            gate.ledger
                .finish(c, self.attempt, outcome, exit_code, detail)
                .await?;
            info!(attempt = self.attempt, outcome = ?outcome, "ledger written");
            lock::release(c, gate.lock(), self.scope).await
        }
        .await;
        close(self.conn).await;
        if let Some(w) = self.witness {
            close(w).await;
        }
        match result {
            Ok(()) => {
                info!(
                    held_ms = self.since.elapsed().as_millis() as u64,
                    "lock released"
                );
                Ok(())
            }
            Err(e) => Err(Error::Unavailable(format!(
                "the attempt ended ({outcome:?}) but the ledger could not be written: {e}; \
                 the lock is freed with the session and the next holder will migrate again"
            ))),
        }
    }

    /// The child could not be started: recorded as a failed attempt (best effort), and the
    /// start error is what the gate reports.
    async fn fail_to_start(self, gate: &Gate, e: Error) -> Error {
        let _ = self
            .complete(gate, Outcome::Failed, Some(e.exit_code()), &e.to_string())
            .await;
        e
    }

    /// The lock session is lost, so another replica may take the lock: stop the child at once,
    /// record the failure from a new connection (best effort: the database may be gone too).
    async fn fence(
        self,
        gate: &Gate,
        child: &mut Supervisor,
        reason: &str,
        kill_grace: Duration,
    ) -> Error {
        error!(
            reason,
            "lost the lock session while migrating: another replica may take the lock now, so the migration is stopped"
        );
        drop(self.conn);
        drop(self.witness);
        let code = child.stop(kill_grace).await;
        child.finish();
        let detail = format!("fenced: lost the lock session ({reason}); child stopped");
        // The database may be failing over: keep trying for a while, so that the record says
        // what happened ("failed", fenced) rather than a taker-over's guess ("abandoned").
        let record_for = gate.target.connect_timeout.min(RECORD_FENCED_FOR);
        match tokio::time::timeout(record_for, gate.db.connect()).await {
            Ok(Ok(mut c)) => {
                let recorded = match c.pg().await {
                    Ok(pg) => {
                        gate.ledger
                            .record_fenced(
                                pg,
                                self.attempt,
                                &gate.attempt(kill_grace),
                                code,
                                &detail,
                            )
                            .await
                    }
                    Err(e) => Err(e),
                };
                if let Err(e) = recorded {
                    warn!(error = %e, "could not record the failed attempt");
                }
                close(c).await;
            }
            _ => warn!(
                "could not reconnect within {} to record the failed attempt; the next holder marks it abandoned",
                duration::short(record_for)
            ),
        }
        Error::Unavailable(format!(
            "lost the database session holding the lock ({reason}); stopped the migration (exit {code}) so that two migrations never overlap; the next holder will retry"
        ))
    }

    /// Checks that the lock session is alive and still holds the lock, and stamps the ledger
    /// row's heartbeat where others can see it.
    async fn heartbeat(&mut self, gate: &Gate) -> Result<(), String> {
        let check = async {
            let held = lock::held_by_us(self.conn.pg().await?, gate.lock()).await?;
            if held {
                let book = match self.witness.as_mut() {
                    Some(w) => w.pg().await?,
                    None => self.conn.pg().await?,
                };
                gate.ledger.heartbeat(book, self.attempt).await?;
            }
            Ok::<_, sqlx::Error>(held)
        };
        match sql::deadline(HEARTBEAT_TIMEOUT, check).await {
            Ok(true) => Ok(()),
            Ok(false) => Err("the lock is no longer held by our session".into()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Watches `child` while holding the lock: heartbeats, and the readiness probe if any.
    async fn supervise(
        &mut self,
        gate: &Gate,
        child: &mut Supervisor,
        probe: Option<(&Probe, Duration)>,
    ) -> StepEnd {
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut probe_tick = tokio::time::interval(PROBE_EVERY);
        let ready_deadline =
            tokio::time::Instant::now() + probe.map(|p| p.1).unwrap_or(Duration::MAX / 4);
        let mut sql_conn = None;
        loop {
            tokio::select! {
                code = child.wait() => return StepEnd::Exited(code),
                _ = heartbeat.tick() => {
                    if let Err(reason) = self.heartbeat(gate).await {
                        return StepEnd::LockLost(reason);
                    }
                }
                _ = probe_tick.tick(), if probe.is_some() => {
                    if let Some((p, _)) = probe
                        && p.check(&gate.db, &mut sql_conn).await
                    {
                        if let Some(c) = sql_conn.take() {
                            close(c).await;
                        }
                        return StepEnd::Ready;
                    }
                }
                _ = tokio::time::sleep_until(ready_deadline), if probe.is_some() => return StepEnd::ReadyTimeout,
            }
        }
    }
}
