//! How the holder's attempt ends other than by [`Holding::end`] alone: sessions left busy
//! after a successful migration, a child that could not start, a lost lock session (fencing),
//! the heartbeat that notices it, and ending sessions while the lock is held.

use std::time::{Duration, Instant};

use tracing::{error, warn};

use super::{
    Ending, HEARTBEAT, HEARTBEAT_TIMEOUT, Holding, RECORD_FENCED_FOR, RETRY_END,
    SETTLE_AFTER_SUCCESS,
};
use crate::child::Supervisor;
use crate::db::close;
use crate::duration;
use crate::error::{Error, Result};
use crate::ledger::{NewAttempt, NotCounted};
use crate::lock::{self, Proof};
use crate::replica::Replica;
use crate::sessions::{self, TerminateError, Terminated, Which};
use crate::sql;

/// How long after its last heartbeat a holder has surely noticed a lost session and stopped its
/// child: a taker-over waits that long after a vanished holder. A heartbeat is due
/// [`HEARTBEAT`] after the last one and fails within [`HEARTBEAT_TIMEOUT`]; a holder that
/// fences then SIGKILLs its child's process group at once, with no `--kill-grace` (the next
/// holder must not wait for a migration to clean up), which leaves the second for the kernel to
/// deliver it. The child's sessions are the taker-over's to end ([`terminate_sessions`]); the tool's
/// own lock rows that the kill leaves are cleared by [`crate::tools`].
const FENCE_TIME: Duration = HEARTBEAT
    .saturating_add(HEARTBEAT_TIMEOUT)
    .saturating_add(Duration::from_secs(1));

/// This replica's attempt as it begins, for the ledger.
/// `app_column`: whether the ledger can record the application's fingerprint.
pub(crate) fn new_attempt(replica: &Replica, app_column: bool) -> NewAttempt<'_> {
    NewAttempt {
        app: replica
            .application
            .as_ref()
            .filter(|_| app_column)
            .map(|a| a.fingerprint()),
        release: replica.release(),
        holder: &replica.target.application_name,
        host: replica.host(),
        pid: std::process::id(),
        fence_secs: FENCE_TIME.as_secs().try_into().unwrap_or(u32::MAX),
    }
}

impl Holding {
    /// The migration exited 0: a session of it still running a statement or inside a
    /// transaction could still change the schema, so the attempt is not done before it ends.
    /// Waits [`SETTLE_AFTER_SUCCESS`] for such sessions; if any is left, ends it and records
    /// the attempt failed.
    pub(super) async fn settle_after_success(
        mut self,
        replica: &Replica,
        what: &str,
    ) -> Result<Holding> {
        let sessions = self.sessions.clone();
        let busy = match self.ledger_conn().await {
            Ok(c) => sessions.busy_after_success(c, SETTLE_AFTER_SUCCESS).await,
            Err(e) => Err(e),
        };
        let left = match busy {
            Ok(left) if left.is_empty() => return Ok(self),
            Ok(left) => left
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            Err(e) => format!("its sessions could not be checked ({e})"),
        };
        let detail = format!("{what} exited 0 but left {left} running");
        self.end(replica, Ending::failed(Some(0), &detail)).await?;
        Err(Error::Timeout {
            what: detail,
            waited: SETTLE_AFTER_SUCCESS,
            hint: "the sessions were ended and the attempt recorded as failed; make the migration wait for its statements before it exits".into(),
        })
    }

    /// The holder refuses to go on (a child that could not be started, a preflight check, apps
    /// of another release): records the attempt failed with `e`'s exit code and message, frees
    /// the lock, and returns `e` to report. A failure to record it is logged: `e` says more.
    pub(crate) async fn refuse(self, replica: &Replica, e: Error) -> Error {
        let (code, detail) = (
            e.exit_code(),
            format!("{}{e}", NotCounted::Refused.prefix()),
        );
        if let Err(recording) = self.end(replica, Ending::failed(Some(code), &detail)).await {
            warn!("{recording}");
        }
        e
    }

    /// The lock session is lost, so another replica may take the lock: SIGKILL the child's
    /// process group at once (no `--kill-grace`: a taker-over waits only [`FENCE_TIME`], and a
    /// paused child must not run again, even to clean up), then record the failure from a new
    /// connection (best effort: the database may be gone too).
    pub(super) async fn fence(
        self,
        replica: &Replica,
        child: &mut Supervisor,
        reason: &str,
    ) -> Error {
        error!(
            reason,
            "lost the lock session while migrating: another replica may take the lock now, so the migration is stopped"
        );
        let Holding {
            conn,
            witness,
            attempt,
            sessions,
            ..
        } = self;
        drop((conn, witness));
        let code = child.stop(Duration::ZERO).await;
        child.finish();
        let detail = format!(
            "{}lost the lock session ({reason}); child killed",
            NotCounted::Fenced.prefix()
        );
        record_fenced(replica, (attempt, &sessions), code, &detail).await;
        Error::Unavailable(format!(
            "lost the database session holding the lock ({reason}); stopped the migration (exit {code}) so that two migrations never overlap; the next holder will retry"
        ))
    }

    /// Checks that the lock session is alive and still holds the lock, and stamps the ledger
    /// row's heartbeat where others can see it.
    pub(super) async fn heartbeat(&mut self, replica: &Replica) -> Result<(), String> {
        let check = async {
            if !lock::held_by_us(self.conn.pg().await?, replica.lock()).await? {
                return Ok(Err("the lock is no longer held by our session"));
            }
            let ledger_conn = match self.witness.as_mut() {
                Some(w) => w.pg().await?,
                None => self.conn.pg().await?,
            };
            if !replica.ledger.heartbeat(ledger_conn, self.attempt).await? {
                return Ok(Err(
                    "our attempt's row is no longer `running` (another holder marked it, or a reset removed it)",
                ));
            }
            Ok::<_, sqlx::Error>(Ok(()))
        };
        match sql::deadline(HEARTBEAT_TIMEOUT, check).await {
            Ok(beat) => beat.map_err(String::from),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Notes the sessions of the child's own TCP connections ([`sessions::AttemptSessions::remember`]),
    /// for clients that do not send the tag, and records new ones in the attempt's row (through
    /// the connection that commits on its own), so that a taker-over of a holder killed with
    /// `kill -9` ends them too. Best effort: a failure here is the heartbeat's to notice.
    pub(super) async fn remember_sessions(&mut self, replica: &Replica, pgid: i32) {
        let mut sessions = self.sessions.clone();
        let mut ports = std::mem::take(&mut self.ports_seen);
        let attempt = self.attempt;
        if let Ok(c) = self.ledger_conn().await {
            let noted = async {
                if sessions.remember(c, pgid, &mut ports).await? {
                    replica
                        .ledger
                        .note_sessions(c, attempt, &sessions.note())
                        .await?;
                }
                Ok::<_, sqlx::Error>(())
            };
            if let Err(e) = sql::deadline(HEARTBEAT_TIMEOUT, noted).await {
                tracing::debug!(error = %e, "could not match the child's sockets to sessions");
            }
        }
        self.sessions = sessions;
        self.ports_seen = ports;
    }
}

/// Ends the sessions `which` selects, from `conn`, while this replica holds the lock. Where our
/// role may not end one (or it will not go), keeps trying every [`RETRY_END`] for up to
/// `bound` (`--wait-timeout`), saying once which session and what to grant; then gives up with
/// the lock never freed while they ran: exit 77 when not allowed, 69 otherwise. `None`: the
/// guard of a [`Which::while_holding`] failed, the lock is lost.
pub(crate) async fn terminate_sessions(
    conn: &mut sqlx::PgConnection,
    which: &Which,
    role: &str,
    bound: Duration,
) -> Result<Option<Terminated>> {
    let until = Instant::now() + bound;
    let mut said = false;
    loop {
        let e = match sessions::terminate(conn, which).await {
            Ok(ended) => return Ok(Some(ended)),
            Err(e) => e,
        };
        let line = e.describe(role);
        match e {
            TerminateError::LockLost => return Ok(None),
            TerminateError::Sql(_) => return Err(Error::Unavailable(line)),
            _ if Instant::now() >= until => {
                let line = format!(
                    "{line}; gave up after --wait-timeout ({}) without freeing the lock while they ran",
                    duration::short(bound)
                );
                return Err(match e {
                    TerminateError::Denied(_) => Error::Auth(line),
                    _ => Error::Unavailable(line),
                });
            }
            _ if !said => {
                error!("{line}; keeping the lock until they end (up to --wait-timeout)");
                said = true;
            }
            _ => {}
        }
        tokio::time::sleep(RETRY_END).await;
    }
}

/// How often a taker-over waiting out a vanished holder's fencing time looks whether that holder
/// recorded its attempt's end after all.
const FENCE_POLL: Duration = Duration::from_secs(1);

/// Waits out a vanished holder's fencing time, `wait` seconds ([`crate::ledger::Ledger::stale`]),
/// while holding the lock. Returns false as soon as a look shows the lock session lost the
/// lock (or cannot show it still holds it): the turn is over, whatever the ledger says.
pub(crate) async fn wait_out_fence(
    replica: &Replica,
    ledger_conn: &mut sqlx::PgConnection,
    proof: &Proof,
    wait: f64,
) -> bool {
    // Holding the lock, so nobody else starts meanwhile; the rows stay `running` until
    // the wait is over, so a taker-over that dies meanwhile hands the wait on. A fenced
    // holder records its own failure only once its migration is dead: when no row is
    // `running` any more, the wait is over early. Every look also proves the lock still ours:
    // a lock lost meanwhile may have let another replica migrate, and its `done` row would
    // look like an early end of the wait.
    let until = tokio::time::Instant::now() + Duration::from_secs_f64(wait.min(3600.0));
    loop {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        tokio::time::sleep(left.min(FENCE_POLL)).await;
        match crate::sql::deadline(HEARTBEAT_TIMEOUT, replica.ledger.stale(ledger_conn, proof))
            .await
        {
            Ok(stale) if !stale.held => return false,
            Ok(stale) if stale.running == 0 => {
                tracing::info!(
                    "the previous holder recorded the end of its attempt: its migration is stopped; taking over now"
                );
                return true;
            }
            Ok(_) if left.is_zero() => return true,
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(error = %e, "could not look at the lock and the ledger while waiting out the fencing time");
                return false;
            }
        }
    }
}

/// Records a fenced attempt from a new connection, best effort: the database may be
/// failing over, so it keeps trying for a while, so that the record says what happened
/// ("failed", fenced) rather than a taker-over's guess ("abandoned"). Its sessions get one
/// try to end (no lock to keep any more); the taker-over ends what is left.
async fn record_fenced(
    replica: &Replica,
    (attempt, sessions): (i64, &sessions::AttemptSessions),
    code: i32,
    detail: &str,
) {
    let record_for = replica.target.connect_timeout.min(RECORD_FENCED_FOR);
    let Ok(Ok(mut c)) = tokio::time::timeout(record_for, replica.db.connect()).await else {
        warn!(
            "could not reconnect within {} to record the failed attempt; the next holder marks it abandoned",
            duration::short(record_for)
        );
        return;
    };
    let recorded = async {
        let pg = c.pg().await?;
        let detail = match sessions::terminate(pg, &sessions.which()).await {
            Ok(ended) => format!("{detail}; sessions: {ended}"),
            Err(e) => {
                let line = e.describe(replica.db.username());
                warn!("{line}");
                format!("{detail}; sessions: {line}")
            }
        };
        let new = new_attempt(replica, false);
        let ledger = &replica.ledger;
        ledger.record_fenced(pg, attempt, &new, code, &detail).await
    }
    .await;
    if let Err(e) = recorded {
        warn!(error = %e, "could not record the failed attempt");
    }
    close(c).await;
}
