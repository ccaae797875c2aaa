//! Waiting: the protocol up to the lock, and the one loop of every replica that is not the
//! holder yet (`migrate`, `run`) and of `wait`, which never takes the lock.
//!
//! 1. Every replica connects and reads the ledger. Release done: it is a follower, at once
//!    (also on a read-only standby: the `done` row is replayed after the migration's commits).
//! 2. Otherwise it tries `pg_try_advisory_lock` (never the blocking form). Busy: it waits for a
//!    notification or a jittered, growing delay and goes back to 1. It only goes on when the
//!    release is recorded done, never merely because the lock became free: a holder that
//!    crashed frees the lock without migrating.
//! 3. The replica that gets the lock takes over ([`Holding::take_over`]): it re-reads the ledger
//!    (the previous holder may have finished between 1 and 2), waits out a vanished holder's
//!    fencing time and marks its attempts `abandoned`, records its own attempt and migrates,
//!    checking on every heartbeat that its lock session is alive. If that session is lost,
//!    another replica may take the lock, so it stops its migration at once (fencing) and fails.
//! 4. It records the outcome and notifies the waiters on the lock session, commits, and only
//!    then frees the lock ([`Holding::complete`]).
//!
//! Steps 1 and 2 are one round (`Waiter::round`), which ends in a [`Turn`] or in "not yet".
//! Between rounds a waiter that keeps its connection on a direct connection `LISTEN`s: the
//! holder notifies in the transaction that writes `done`, so the waiter wakes when it commits and
//! needs one more round trip to read the row. Polling stays as the fallback (a lost
//! notification, a holder that crashed, transaction pooling where `LISTEN` does not work).
//!
//! Hard bounds: `--wait-timeout` bounds the whole wait, whatever the network does; every round
//! trip has a deadline ([`crate::sql::ROUND_TRIP_TIMEOUT`]) after which its connection is dropped
//! and a new one made; `--connect-timeout` bounds a streak of failures (no connection, lost
//! connections, a read-only standby).

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::db::{self, Conn, Failure, backoff};
use crate::duration::short;
use crate::error::{Error, Result};
use crate::holding::{Holding, TakeOver};
use crate::ledger::{ReadKey, Seen};
use crate::lock::{self, Scope, WaitSlots};
use crate::replica::{HolderNote, Replica};
use crate::route::Route;

mod pace;

use pace::*;

/// How often a waiter logs who holds the lock.
const REPORT_EVERY: Duration = Duration::from_secs(10);
/// What the replica wants from a round.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Want {
    /// Its turn to migrate (`migrate`, `run`): take the lock when it is free.
    Lock {
        /// `--kill-grace`, recorded so that a taker-over knows how long fencing takes.
        kill_grace: Duration,
        /// `--waiting-connections`.
        slots: WaitSlots,
        /// `--wait-timeout`: also how long a holder keeps the lock waiting for an earlier
        /// attempt's sessions that it may not end.
        wait_timeout: Duration,
    },
    /// Only to see the release done (`wait`): never take the lock.
    Done {
        /// `--waiting-connections`.
        slots: WaitSlots,
    },
}

impl Want {
    /// `--waiting-connections`.
    fn slots(self) -> WaitSlots {
        match self {
            Want::Lock { slots, .. } | Want::Done { slots } => slots,
        }
    }
}

/// Whose turn it is: what a replica turns out to be, the one outcome of waiting.
pub(crate) enum Turn {
    /// The release is done: go on with the flag off. `seen`: what the ledger read saw, for the
    /// preflight checks; `conn`: its connection, for a preflight check that needs one more round
    /// trip (dropped otherwise: a follower execs or exits next, and both close the socket).
    Follower { seen: Seen, conn: Option<Conn> },
    /// We hold the lock and have recorded an attempt: migrate.
    Holder(Box<Holding>),
}

/// What one round saw: a turn, or not yet.
enum Round {
    Turn(Turn),
    /// Not yet. `conn`: the connection to go on with; `keep`: whether this waiter may keep it;
    /// `pressure`: the share of `max_connections` in use, when known.
    Busy {
        conn: Conn,
        keep: bool,
        pressure: f64,
    },
    /// The server is a read-only standby and the release is not done there.
    Standby,
}

/// The state a waiter carries from round to round on one connection.
#[derive(Default)]
struct Session {
    /// What sits between us and PostgreSQL, and the lock scope: decided once per gate.
    route: Option<(Route, Scope)>,
    /// Whether this connection holds a waiting slot.
    slot: bool,
    /// Whether this connection already tried to move to a listening one (once per connection:
    /// without a free slot it would open a connection on every poll).
    listen_tried: bool,
    /// Whether the ledger is known to exist.
    ensured: bool,
}

/// Waits until the release is done (follower) or, with [`Want::Lock`], this replica holds the
/// lock (holder). Fails after `wait_timeout`, or after `--connect-timeout` of trouble.
pub(crate) async fn wait_turn(
    replica: &Replica,
    want: Want,
    wait_timeout: Duration,
) -> Result<Turn> {
    let started = Instant::now();
    let deadline = tokio::time::Instant::from_std(started + wait_timeout);
    let mut waiter = Waiter {
        replica,
        conn: None,
        session: Session::default(),
        trouble_since: None,
        last_trouble: None,
        last_holder: None,
        next_report: started,
        standby_said: false,
    };
    if replica.release().is_none() {
        info!(lock = %replica.lock(), "no --release given: every replica runs the migration in turn under the lock (correct for idempotent migrators, slower)");
    }
    let mut fast = backoff(POLL_MIN, POLL_FAST_MAX);
    let mut listening_delays = backoff(POLL_MIN, POLL_LISTENING_MAX);
    let mut slow = backoff(POLL_MIN, POLL_SLOW_MAX);
    loop {
        let pressure = match tokio::time::timeout_at(deadline, waiter.step(want)).await {
            Err(_) => return Err(waiter.timed_out(started.elapsed())),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(ControlFlow::Break(turn))) => {
                let waited_ms = started.elapsed().as_millis() as u64;
                match &turn {
                    Turn::Follower { .. } => info!(
                        release = replica.release(),
                        waited_ms, "release is done; starting with the flag off"
                    ),
                    Turn::Holder(holding) => {
                        info!(release = replica.release(), lock = %replica.lock(), attempt = holding.attempt(), waited_ms, "lock taken; this replica migrates")
                    }
                }
                return Ok(turn);
            }
            Ok(Ok(ControlFlow::Continue(pressure))) => pressure,
        };
        if started.elapsed() >= wait_timeout {
            return Err(waiter.timed_out(started.elapsed()));
        }
        let pause = match &waiter.conn {
            Some(c) if c.listens() => listening_delays.next(),
            Some(_) => fast.next(),
            None if pressure > CROWDED => Some(crowded_delay(pressure)),
            None => slow.next(),
        }
        .unwrap_or(POLL_SLOW_MAX);
        let until = deadline.min(tokio::time::Instant::now() + pause);
        waiter.pause_until(until).await;
    }
}

/// The loop's state between rounds.
struct Waiter<'g> {
    replica: &'g Replica,
    /// The connection kept between rounds, if this waiter may keep one.
    conn: Option<Conn>,
    session: Session,
    /// Since when rounds fail for transient reasons (no connection, a standby).
    trouble_since: Option<Instant>,
    /// The latest such reason.
    last_trouble: Option<String>,
    /// The lock holder as last seen, for the timeout message.
    last_holder: Option<HolderNote>,
    next_report: Instant,
    /// Whether the warning that the server is a standby was logged (once per gate).
    standby_said: bool,
}

/// What a step of the loop gives: a turn, or wait and go again (`pressure`: the share of
/// `max_connections` in use, when known).
type Next = ControlFlow<Turn, f64>;

impl Waiter<'_> {
    /// One round on the kept connection or a new one, with the failure bookkeeping.
    async fn step(&mut self, want: Want) -> Result<Next> {
        let replica = self.replica;
        let conn = match self.conn.take() {
            Some(c) => Ok(c),
            None => {
                self.session.slot = false;
                self.session.listen_tried = false;
                replica.db.connect_once(replica.db.attempt_limit()).await
            }
        };
        let round = match conn {
            Ok(conn) => self.round(conn, want).await,
            Err(failure) => Err(failure),
        };
        match round {
            Ok(Round::Turn(turn)) => Ok(ControlFlow::Break(turn)),
            Ok(Round::Busy {
                mut conn,
                keep,
                pressure,
            }) => {
                self.trouble_since = None;
                self.last_trouble = None;
                self.report(&mut conn).await;
                if keep {
                    if !conn.listens() && !self.session.listen_tried && self.may_listen() {
                        self.session.listen_tried = true;
                        conn = self.listen_instead(conn, want.slots()).await;
                    }
                    self.conn = Some(conn);
                } else {
                    db::close(conn).await;
                }
                Ok(ControlFlow::Continue(pressure))
            }
            Ok(Round::Standby) => {
                if !self.standby_said {
                    self.standby_said = true;
                    warn!(
                        "{} is a read-only standby (pg_is_in_recovery() is true) and release {:?} is not done there: migrating needs the primary; retrying for up to {} (--connect-timeout) in case a failover is under way",
                        replica.db.redacted_url,
                        replica.release().unwrap_or_default(),
                        short(replica.target.connect_timeout)
                    );
                }
                self.trouble(
                "the server is a read-only standby (pg_is_in_recovery() is true)".into(),
                |replica, since| {
                    Error::Unavailable(format!(
                        "{} is a read-only standby (pg_is_in_recovery() is true) and has been for {}: point the gate at the primary (or at a proxy that follows the leader)",
                        replica.db.redacted_url,
                        short(since)
                    ))
                },
                )
            }
            Err(Failure::Fatal(e)) => Err(e),
            Err(Failure::Retry(reason)) => {
                // Said once per streak of failures; the retries of a streak only at debug (a
                // failover takes seconds of them), and its end is the next good round.
                if self.trouble_since.is_none() {
                    db::log_retry("lost the database connection while waiting", &reason);
                } else {
                    tracing::debug!(reason, "still no database connection; retrying");
                }
                let last = reason.clone();
                self.trouble(reason, move |replica, _| replica.db.gave_up(&last))
            }
        }
    }

    /// One round of the protocol (steps 1 and 2 of the module documentation; step 3 is the
    /// holder's), on `conn`. Errors come sorted into "retry" and "give up".
    async fn round(&mut self, mut conn: Conn, want: Want) -> Result<Round, Failure> {
        let replica = self.replica;
        let sql = |e: sqlx::Error| replica.db.classify(&e);
        if let Some(release) = replica.release() {
            let seen = replica
                .ledger
                .is_done(conn.pg().await.map_err(sql)?, release, ReadKey::IfCompared)
                .await
                .map_err(sql)?;
            match seen.done {
                Some(true) => {
                    return Ok(Round::Turn(Turn::Follower {
                        seen,
                        conn: Some(conn),
                    }));
                }
                _ if seen.standby => return Ok(Round::Standby),
                Some(false) => self.session.ensured = true,
                None => {}
            }
        }
        let (kill_grace, slots, wait_timeout) = match want {
            Want::Lock {
                kill_grace,
                slots,
                wait_timeout,
            } => (kill_grace, slots, wait_timeout),
            Want::Done { slots } => return self.busy(conn, slots).await,
        };
        if !self.session.ensured {
            // First run against this database: create the ledger before anyone locks, so that
            // no DDL ever runs inside a lock transaction.
            replica.create_ledger(&mut conn).await?;
            self.session.ensured = true;
        }
        let (route, scope) = self.route(&mut conn).await.map_err(sql)?;
        let c = conn.pg().await.map_err(sql)?;
        if !lock::try_acquire(c, replica.lock(), scope)
            .await
            .map_err(sql)?
        {
            return self.busy(conn, slots).await;
        }
        Ok(Round::Turn(
            match Holding::take_over(replica, conn, (route, scope), kill_grace, wait_timeout)
                .await?
            {
                TakeOver::Holding(holding) => Turn::Holder(holding),
                TakeOver::AlreadyDone { seen, conn } => Turn::Follower {
                    seen,
                    conn: Some(conn),
                },
            },
        ))
    }

    /// The lock is taken (or we only watch): may this waiter keep its connection? Only where a
    /// waiting connection costs no pooled server connection that the migration may need: on a
    /// direct connection with a waiting slot, or behind proven transaction pooling. Behind a
    /// session pooler or a proxy every waiter reconnects for each poll.
    async fn busy(&mut self, mut conn: Conn, slots: WaitSlots) -> Result<Round, Failure> {
        let replica = self.replica;
        let sql = |e: sqlx::Error| replica.db.classify(&e);
        let (route, _) = self.route(&mut conn).await.map_err(sql)?;
        let (keep, pressure) = match route {
            Route::TransactionPooling => (true, 0.0),
            Route::Middlebox => (false, 0.0),
            Route::Direct if self.session.slot => (true, 0.0),
            Route::Direct => {
                let c = conn.pg().await.map_err(sql)?;
                let slot = lock::try_take_wait_slot(c, replica.lock(), slots)
                    .await
                    .map_err(sql)?;
                self.session.slot = slot.taken;
                (slot.taken, slot.pressure)
            }
        };
        Ok(Round::Busy {
            conn,
            keep,
            pressure,
        })
    }

    /// The route and lock scope, decided on the first connection that needs them.
    async fn route(&mut self, conn: &mut Conn) -> Result<(Route, Scope), sqlx::Error> {
        if let Some(known) = self.session.route {
            return Ok(known);
        }
        let known = self.replica.detect_route(conn).await?;
        self.session.route = Some(known);
        Ok(known)
    }

    /// A transient failure: go on, unless failures have lasted `--connect-timeout`.
    fn trouble(
        &mut self,
        reason: String,
        give_up: impl FnOnce(&Replica, Duration) -> Error,
    ) -> Result<Next> {
        let since = self
            .trouble_since
            .get_or_insert_with(Instant::now)
            .elapsed();
        self.last_trouble = Some(reason);
        if since >= self.replica.target.connect_timeout {
            return Err(give_up(self.replica, since));
        }
        Ok(ControlFlow::Continue(0.0))
    }

    /// LISTEN only on a connection that is its own server session.
    fn may_listen(&self) -> bool {
        matches!(self.session.route, Some((Route::Direct, _)))
    }

    /// A waiter that keeps its plain connection on a direct route moves to one that `LISTEN`s.
    /// It takes a waiting slot there before it lets go of the one it holds, so the count of kept
    /// connections never grows past the slots; without a free slot, or when the listening
    /// connection fails, it keeps polling on the plain one.
    async fn listen_instead(&mut self, plain: Conn, slots: WaitSlots) -> Conn {
        let replica = self.replica;
        let Ok(mut listening) = replica
            .db
            .connect_listening(&replica.lock().channel())
            .await
        else {
            return plain;
        };
        let taken = match listening.pg().await {
            Ok(c) => lock::try_take_wait_slot(c, replica.lock(), slots)
                .await
                .is_ok_and(|s| s.taken),
            Err(_) => false,
        };
        if taken {
            db::close(plain).await;
            listening
        } else {
            db::close(listening).await;
            plain
        }
    }

    /// Every [`REPORT_EVERY`]: who holds the lock, in the log.
    async fn report(&mut self, conn: &mut Conn) {
        if Instant::now() < self.next_report {
            return;
        }
        let holder = self.replica.describe_holder(conn).await;
        info!(
            release = self.replica.release(),
            holder = holder.text,
            "waiting for {}",
            self.replica.waiting_for()
        );
        self.last_holder = Some(holder);
        self.next_report = Instant::now() + REPORT_EVERY;
    }

    /// Sleeps until `until`, or less when a listening connection hears the holder finish.
    async fn pause_until(&mut self, until: tokio::time::Instant) {
        let Some(conn) = self.conn.as_mut() else {
            tokio::time::sleep_until(until).await;
            return;
        };
        let limit = until.saturating_duration_since(tokio::time::Instant::now());
        if let Err(e) = conn.notified(limit).await {
            // Lost: the next round reconnects.
            db::log_retry("lost the database connection while waiting", &e.to_string());
            self.conn = None;
        }
    }

    fn timed_out(&self, waited: Duration) -> Error {
        let hint = match (&self.last_holder, &self.last_trouble) {
            (_, Some(reason)) => {
                format!(
                    "the database was not reachable ({reason}); check it, or raise --wait-timeout"
                )
            }
            (Some(holder), _) if holder.foreign.is_some() => format!(
                "the lock is held by {}; or raise --wait-timeout",
                holder.text
            ),
            (Some(holder), _) => format!(
                "the lock is held by {}: check that replica's logs, or raise --wait-timeout",
                holder.text
            ),
            (None, _) => "check the replica that migrates, or raise --wait-timeout".into(),
        };
        Error::Timeout {
            what: format!("timed out waiting for {}", self.replica.waiting_for()),
            waited,
            hint,
        }
    }
}
