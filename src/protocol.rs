//! The protocol, top to bottom: who migrates, who waits, and when a release is done.
//!
//! 1. Every replica connects and reads the ledger. Release done: it is a follower, at once
//!    (also on a read-only standby: the `done` row is replayed after the migration's commits).
//! 2. Otherwise it tries `pg_try_advisory_lock` (never the blocking form: a blocked call holds a
//!    snapshot that `CREATE INDEX CONCURRENTLY` in the holder's migration would wait for). Busy:
//!    it waits for a notification or a jittered, growing delay and goes back to 1. It goes on
//!    only when the release is recorded done, never merely because the lock became free: a
//!    holder that crashed frees the lock without migrating.
//! 3. The replica that gets the lock takes over ([`take_over`]): it configures its lock session,
//!    re-reads the ledger under the lock, opens the witness (transaction scope), waits out a
//!    vanished holder's fencing time, ends earlier attempts' sessions and begins its attempt.
//!    Each of those statements carries the lock's [`Proof`]: a replica that loses the lock while
//!    taking over gives up its turn and waits again. A release that failed `--max-failures`
//!    times is refused here (exit 65); once its attempt has begun, the holder releases the
//!    migration tool's stale lock rows and names its half-applied markers ([`tools`]).
//! 4. It runs the migration ([`Holding::migrate`], [`Holding::start_app`]), checking its lock
//!    session on every heartbeat; a lost session fences it ([`Holding::fence`]).
//! 5. Every other end of an attempt goes through one function, [`Holding::end`]: end its
//!    sessions if it failed, record the outcome and notify the waiters in one statement that
//!    proves the lock, commit, and only then free the lock.
//!
//! Hard bounds: `--wait-timeout` bounds the whole wait, whatever the network does; every round
//! trip has a deadline ([`crate::sql::ROUND_TRIP_TIMEOUT`]); `--connect-timeout` bounds a streak
//! of failures. Connection bookkeeping (waiting slots, the `LISTEN` upgrade, the route, failure
//! streaks, reports) is [`crate::waiting`]'s; the holder's life is [`crate::holding`]'s.

use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::application::Compared;
use crate::db::{Conn, Failure};
use crate::error::{Error, Result};
use crate::holding::{self, HolderPlan, Holding, Takeover};
use crate::ledger::{AttemptRow, Begun, HeldAttempt, Outcome, ReadKey, Seen, Stale};
use crate::lock::{self, Proof, Scope, WaitSlots};
use crate::replica::Replica;
use crate::sessions::{self, Terminated, Which};
use crate::tools;
use crate::waiting::{Busy, Waiter};

/// What the replica wants from waiting.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Role {
    /// Its turn to migrate (`migrate`, `run`): take the lock when it is free.
    Migrate {
        /// `--waiting-connections`.
        slots: WaitSlots,
        /// The holder's settings, for when it gets the lock.
        plan: HolderPlan,
    },
    /// Only to see the release done (`wait`): never take the lock.
    Watch {
        /// `--waiting-connections`.
        slots: WaitSlots,
    },
}

impl Role {
    /// `--waiting-connections`.
    pub(crate) fn slots(self) -> WaitSlots {
        match self {
            Role::Migrate { slots, .. } | Role::Watch { slots } => slots,
        }
    }
}

/// Whose turn it is: the one outcome of waiting.
pub(crate) enum Decision {
    /// The release is done: go on with the flag off. `seen`: what the ledger read saw, for the
    /// preflight checks; `conn`: its connection, for a preflight check that needs one more round
    /// trip (dropped otherwise: a follower execs or exits next, and both close the socket).
    Follow { seen: Box<Seen>, conn: Option<Conn> },
    /// We hold the lock and have begun an attempt: migrate.
    Hold(Box<Holding>),
}

/// What one round saw.
enum Round {
    /// Decided: follow or hold.
    Decided(Decision),
    /// Not yet: the lock is taken (or we only watch).
    Busy(Busy),
    /// The server is a read-only standby and the release is not done there.
    Standby,
}

/// Waits until the release is done (follower) or, with [`Role::Migrate`], this replica holds the
/// lock and has begun an attempt (holder). Fails after `wait_timeout` (`--wait-timeout`, also how
/// long a holder waits for earlier sessions it may not end), or after `--connect-timeout` of
/// trouble.
pub(crate) async fn wait_for_decision(
    replica: &Replica,
    role: Role,
    wait_timeout: Duration,
) -> Result<Decision> {
    let started = Instant::now();
    let deadline = tokio::time::Instant::from_std(started + wait_timeout);
    let mut waiter = Waiter::new(replica);
    loop {
        let round = async {
            let conn = waiter.connection().await?;
            round(&mut waiter, conn, role, wait_timeout).await
        };
        match tokio::time::timeout_at(deadline, round).await {
            Err(_) => return Err(waiter.timed_out(started.elapsed())),
            Ok(Ok(Round::Decided(decision))) => {
                return Ok(log_decision(replica, decision, started));
            }
            Ok(Ok(Round::Busy(busy))) => waiter.busy(busy, role.slots()).await,
            Ok(Ok(Round::Standby)) => waiter.standby()?,
            Ok(Err(Failure::Fatal(e))) => return Err(e),
            Ok(Err(Failure::Retry(reason))) => waiter.retry(reason)?,
        }
        if started.elapsed() >= wait_timeout {
            return Err(waiter.timed_out(started.elapsed()));
        }
        waiter.pause(deadline).await;
    }
}

/// Logs whose turn it is and how long the wait took.
fn log_decision(replica: &Replica, decision: Decision, started: Instant) -> Decision {
    let waited_ms = started.elapsed().as_millis() as u64;
    match &decision {
        Decision::Follow { .. } if replica.tag_release.is_some() => info!(
            release = replica.release(),
            waited_ms, "the contract step is done"
        ),
        Decision::Follow { .. } => info!(
            release = replica.release(),
            waited_ms, "release is done; starting with the flag off"
        ),
        Decision::Hold(holding) => info!(
            release = replica.release(),
            lock = %replica.lock(),
            attempt = holding.attempt_id(),
            waited_ms,
            "lock taken; this replica migrates"
        ),
    }
    decision
}

/// One round (steps 1 and 2) on `conn`: done? follow; lock free? take over; otherwise busy.
async fn round(
    waiter: &mut Waiter<'_>,
    mut conn: Conn,
    role: Role,
    wait_timeout: Duration,
) -> Result<Round, Failure> {
    let replica = waiter.replica();
    let sql = |e: sqlx::Error| replica.db.classify(&e);
    match read_release(waiter, &mut conn).await? {
        Some(seen) if seen.done == Some(true) => {
            same_application(replica, &seen)?;
            return Ok(follower(seen, conn));
        }
        Some(seen) if seen.standby => return Ok(Round::Standby),
        _ => {}
    }
    let Role::Migrate { plan, .. } = role else {
        return waiter
            .keep_or_drop(conn, role.slots())
            .await
            .map(Round::Busy);
    };
    // First run against this database: create the ledger before anyone locks, so that no DDL
    // ever runs inside a lock transaction.
    waiter.ensure_ledger(&mut conn).await?;
    let app_column = match replica.application {
        Some(_) => waiter.app_column(&mut conn).await?,
        None => false,
    };
    let (route, scope) = waiter.route(&mut conn).await.map_err(sql)?;
    let c = conn.pg().await.map_err(sql)?;
    if !lock::try_acquire(c, replica.lock(), scope)
        .await
        .map_err(sql)?
    {
        return waiter
            .keep_or_drop(conn, role.slots())
            .await
            .map(Round::Busy);
    }
    let takeover = Takeover {
        route,
        scope,
        wait_timeout,
        app_column,
        plan,
    };
    take_over(replica, conn, takeover).await.map(Round::Decided)
}

/// Whether the release is done (one round trip, the whole fast path); `None` without a
/// release (serial mode).
async fn read_release(waiter: &mut Waiter<'_>, conn: &mut Conn) -> Result<Option<Seen>, Failure> {
    let replica = waiter.replica();
    let Some(release) = replica.release() else {
        return Ok(None);
    };
    let sql = |e: sqlx::Error| replica.db.classify(&e);
    let c = conn.pg().await.map_err(sql)?;
    let seen = replica
        .ledger
        .is_done(c, release, ReadKey::IfCompared)
        .await
        .map_err(sql)?;
    if seen.done == Some(false) {
        waiter.ledger_exists();
    }
    Ok(Some(seen))
}

/// A done release is followed only if it was migrated for this application: two applications
/// with the same lock and ledger share release IDs (`1.4.0`, `latest`), and following the other
/// one's would start this one without its migration ([`crate::application`]).
fn same_application(replica: &Replica, seen: &Seen) -> Result<(), Failure> {
    let Some(app) = &replica.application else {
        return Ok(());
    };
    if app.compare(seen.app.as_deref()) != Compared::Other {
        return Ok(());
    }
    Err(Failure::Fatal(Error::Config(format!(
        "release {:?} of lock {} in ledger {} was migrated for another application: {} differs from the one that migrated it, \
         so this application's migration never ran; give each application its own --lock (and --schema), \
         or, if this is one application started by different commands, pass the same --app NAME to each",
        replica.release().unwrap_or_default(),
        replica.lock(),
        replica.ledger.tables().ledger(),
        app.describe(),
    ))))
}

fn follower(seen: Seen, conn: Conn) -> Round {
    Round::Decided(Decision::Follow {
        seen: Box::new(seen),
        conn: Some(conn),
    })
}

/// Step 3, once `conn` holds the lock: each step a function below, in order. Errors come sorted
/// into "retry" (the lock is lost: wait again) and "give up".
async fn take_over(
    replica: &Replica,
    mut conn: Conn,
    takeover: Takeover,
) -> Result<Decision, Failure> {
    let sql = |e: sqlx::Error| replica.db.classify(&e);
    let (proof, server_version) =
        configure_lock_session(replica, &mut conn, takeover.scope).await?;
    if let Some(seen) = done_under_lock(replica, &mut conn, takeover.scope).await? {
        same_application(replica, &seen)?;
        return Ok(Decision::Follow {
            seen: Box::new(seen),
            conn: Some(conn),
        });
    }
    refuse_failing_release(replica, &mut conn, &takeover).await?;
    let mut witness = open_witness(replica, takeover.scope).await?;
    let ledger_conn = match witness.as_mut() {
        Some(w) => w.pg().await.map_err(sql)?,
        None => conn.pg().await.map_err(sql)?,
    };
    let stale = wait_out_vanished_holder(replica, ledger_conn, &proof).await?;
    let ended =
        terminate_earlier_sessions(replica, ledger_conn, &proof, &stale, takeover.wait_timeout)
            .await?;
    let previous = replica
        .ledger
        .attempts(ledger_conn, replica.release(), 1)
        .await;
    let new = holding::new_attempt(replica, takeover.app_column);
    let id = match replica
        .ledger
        .begin(ledger_conn, &new, &proof)
        .await
        .map_err(sql)?
    {
        Begun::Attempt(id) => id,
        Begun::LockLost => return Err(lost("before it began")),
        // Only a holder writes `done`, so not while we hold the lock; cheap to honour anyway.
        Begun::AlreadyDone => return Err(lost("before it began (the release is done)")),
    };
    let held = HeldAttempt { id, proof };
    let cleaned = tool_state(replica, ledger_conn, &held, &previous, &takeover).await;
    let holding = Holding::new(replica, (conn, witness), held, takeover, server_version)
        .with_history(previous.ok(), ended)
        .with_tool_notes(cleaned);
    Ok(Decision::Hold(Box::new(holding)))
}

/// What the migration tool left behind, now that every earlier attempt's session is gone and
/// before the migration starts ([`tools`]): after a failed or abandoned attempt, its markers of
/// a half-applied migration, named; then its stale lock rows, released under the proof. Returns
/// the lines for this attempt's record.
async fn tool_state(
    replica: &Replica,
    ledger_conn: &mut sqlx::PgConnection,
    held: &HeldAttempt,
    previous: &std::result::Result<Vec<AttemptRow>, sqlx::Error>,
    takeover: &Takeover,
) -> Vec<String> {
    let after_trouble = previous.as_ref().is_ok_and(|p| {
        p.first()
            .is_some_and(|a| matches!(a.outcome, Outcome::Failed | Outcome::Abandoned))
    });
    let mut lines = Vec::new();
    if after_trouble {
        lines.extend(tools::report_dirty(ledger_conn).await);
    }
    lines.extend(
        tools::clear_stale_locks(replica, ledger_conn, held, takeover.plan.keep_tool_locks).await,
    );
    lines
}

/// The lock is lost while taking over: another replica may hold it now, so wait again.
fn lost(when: &str) -> Failure {
    Failure::Retry(format!(
        "the lock session lost the lock {when}; nothing was migrated, waiting again"
    ))
}

/// Keepalives and no server-side timeouts on the lock session ([`lock::configure_lock_session`]),
/// and the server's proof that it holds the lock, for every statement that acts for the holder.
/// Also the server's version, from the connection's start-up (0: unknown).
async fn configure_lock_session(
    replica: &Replica,
    conn: &mut Conn,
    scope: Scope,
) -> Result<(Proof, u32), Failure> {
    let sql = |e: sqlx::Error| replica.db.classify(&e);
    let c = conn.pg().await.map_err(sql)?;
    let server_version = c.server_version_num().unwrap_or(0);
    lock::configure_lock_session(c, scope).await.map_err(sql)?;
    let proof = Proof::of(c, replica.lock()).await.map_err(sql)?;
    Ok((proof, server_version))
}

/// The ledger re-read under the lock: the previous holder may have finished between the round's
/// read and our lock. Then the lock is freed again and this replica follows after all.
async fn done_under_lock(
    replica: &Replica,
    conn: &mut Conn,
    scope: Scope,
) -> Result<Option<Seen>, Failure> {
    let sql = |e: sqlx::Error| replica.db.classify(&e);
    let Some(release) = replica.release() else {
        return Ok(None);
    };
    let c = conn.pg().await.map_err(sql)?;
    let seen = replica
        .ledger
        .is_done(c, release, ReadKey::No)
        .await
        .map_err(sql)?;
    if seen.done != Some(true) {
        return Ok(None);
    }
    lock::unlock(c, replica.lock(), scope).await.map_err(sql)?;
    Ok(Some(seen))
}

/// A release whose migration failed `--max-failures` times is not run again: each replica that
/// gets the lock reads the count under it, frees the lock and exits 65 with the last failure,
/// until `reset` removes the attempts. Read under the lock, so that the holder that records the
/// last failure and the next reader agree on the count.
async fn refuse_failing_release(
    replica: &Replica,
    conn: &mut Conn,
    takeover: &Takeover,
) -> Result<(), Failure> {
    let sql = |e: sqlx::Error| replica.db.classify(&e);
    let (Some(release), max) = (replica.release(), takeover.plan.max_failures) else {
        return Ok(());
    };
    if max == 0 {
        return Ok(());
    }
    let c = conn.pg().await.map_err(sql)?;
    let failed = replica
        .ledger
        .failures(c, release, max)
        .await
        .map_err(sql)?;
    let Some(last) = failed.first().filter(|_| failed.len() >= max as usize) else {
        return Ok(());
    };
    lock::unlock(c, replica.lock(), takeover.scope)
        .await
        .map_err(sql)?;
    let first_line = last.detail.lines().next().unwrap_or("no detail recorded");
    let exit = last
        .exit_code
        .map(|code| format!("exit {code}: "))
        .unwrap_or_default();
    Err(Failure::Fatal(Error::ReleaseFailing {
        release: release.to_string(),
        failures: failed.len(),
        id: last.id,
        host: last.host.clone(),
        holder: last.holder.clone(),
        last: format!("{exit}{first_line}"),
    }))
}

/// The attempt row and its heartbeats must be visible to a taker-over even if this holder
/// vanishes. In session scope they commit on the lock session itself; in transaction scope
/// everything written there rolls back with the lock, so they go through a second connection
/// that commits on its own: the witness.
async fn open_witness(replica: &Replica, scope: Scope) -> Result<Option<Conn>, Failure> {
    match scope {
        Scope::Session => Ok(None),
        _ => Ok(Some(
            replica
                .db
                .connect_once(replica.db.connect_try_timeout())
                .await?,
        )),
    }
}

/// An attempt left `running` means its holder vanished mid-migration: wait until it has surely
/// stopped its migration (its last heartbeat plus its fencing time), proving the lock on every
/// look ([`holding::wait_out_fence`]).
async fn wait_out_vanished_holder(
    replica: &Replica,
    ledger_conn: &mut sqlx::PgConnection,
    proof: &Proof,
) -> Result<Stale, Failure> {
    let stale = replica
        .ledger
        .stale(ledger_conn, proof)
        .await
        .map_err(|e| replica.db.classify(&e))?;
    if !stale.held {
        return Err(lost("before it began"));
    }
    if stale.running > 0 {
        warn!(
            stale = stale.running,
            fence_wait_s = format!("{:.1}", stale.wait_secs),
            "the previous holder vanished mid-migration; taking over once it has surely stopped its migration"
        );
        if !holding::wait_out_fence(replica, ledger_conn, proof, stale.wait_secs).await {
            return Err(lost("while waiting out the previous holder's fencing time"));
        }
    }
    Ok(stale)
}

/// An attempt is over only when its sessions are: a vanished, fenced or failed holder's statement
/// may still run (or sit in a lock queue) on the server. Ends them (each signal under the proof),
/// then marks the vanished holder's attempts `abandoned` (under the proof too).
async fn terminate_earlier_sessions(
    replica: &Replica,
    ledger_conn: &mut sqlx::PgConnection,
    proof: &Proof,
    stale: &Stale,
    wait_timeout: Duration,
) -> Result<Terminated, Failure> {
    let tag = sessions::Tag::new(replica.identity(), replica.release(), None);
    let earlier = Which::unfinished(&tag, &replica.ledger.tables().ledger(), replica.lock().key)
        .while_holding(proof);
    let Some(ended) =
        holding::terminate_sessions(ledger_conn, &earlier, replica.db.username(), wait_timeout)
            .await
            .map_err(Failure::Fatal)?
    else {
        return Err(lost("while ending earlier attempts' sessions"));
    };
    if stale.running > 0
        && !replica
            .ledger
            .abandon_stale(ledger_conn, &ended.to_string(), proof)
            .await
            .map_err(|e| replica.db.classify(&e))?
    {
        return Err(lost(
            "before it marked the vanished holder's attempt abandoned",
        ));
    }
    Ok(ended)
}
