//! Waiting: the one loop of every replica that is not the holder yet (`migrate`, `run`) and of
//! `wait`, which never takes the lock.
//!
//! Each round ([`Gate::round`]) reads the ledger and, when it may, tries the lock. Between
//! rounds a waiter that keeps its connection on a direct connection `LISTEN`s: the holder
//! notifies in the transaction that writes `done`, so the waiter wakes when it commits and
//! needs one more round trip to read the row. Polling stays as the fallback (a lost
//! notification, a holder that crashed, transaction pooling where `LISTEN` does not work).
//!
//! Hard bounds: `--wait-timeout` bounds the whole wait, whatever the network does; every round
//! trip has a deadline ([`crate::sql::ROUND_TRIP_TIMEOUT`]) after which its connection is dropped
//! and a new one made; `--connect-timeout` bounds a streak of failures (no connection, lost
//! connections, a read-only standby).

use std::time::{Duration, Instant};

use tracing::info;

use crate::db::{self, Conn, Failure, backoff};
use crate::duration::short;
use crate::error::{Error, Result};
use crate::gate::{Gate, Round, Session, Want};
use crate::holding::Holding;
use crate::ledger::Seen;
use crate::lock::{self, Route, WaitSlots};

/// How often a waiter logs who holds the lock.
const REPORT_EVERY: Duration = Duration::from_secs(10);
/// Shortest polling delay.
const POLL_MIN: Duration = Duration::from_millis(20);
/// Longest polling delay of a waiter that `LISTEN`s: the notification is the fast path, the
/// poll only catches a holder that died (its lock frees without a notification).
const POLL_LISTENING_MAX: Duration = Duration::from_millis(1000);
/// Longest polling delay of a waiter that keeps its connection without `LISTEN` (behind a
/// transaction pooler): a query on an open connection is cheap, and hand-off latency is this
/// delay.
const POLL_FAST_MAX: Duration = Duration::from_millis(100);
/// Longest polling delay of a waiter that reconnects for each poll: a new connection costs the
/// server a process and an authentication, so hundreds of these must poll gently.
const POLL_SLOW_MAX: Duration = Duration::from_millis(500);
/// Longest polling delay of a reconnecting waiter when nearly all of the server's connections
/// are in use: the migration and the apps need them more than we do.
const POLL_CROWDED_MAX: Duration = Duration::from_millis(8000);
/// Share of `max_connections` in use above which reconnecting waiters slow down, linearly up to
/// [`POLL_CROWDED_MAX`] at [`PACKED`].
const CROWDED: f64 = 0.5;
/// Share of `max_connections` in use at which reconnecting waiters poll most gently.
const PACKED: f64 = 0.9;

/// What a replica turned out to be.
pub(crate) enum Role {
    /// The release is done: go on with the flag off. `seen`: what the ledger read saw; `conn`:
    /// its connection, for a preflight check that needs one more round trip (dropped otherwise:
    /// a follower execs or exits next, and both close the socket).
    Follower { seen: Seen, conn: Option<Conn> },
    /// We hold the lock and have recorded an attempt: migrate.
    Holder(Box<Holding>),
}

/// Waits until the release is done (follower) or, with [`Want::Lock`], this replica holds the
/// lock (holder). Fails after `wait_timeout`, or after `--connect-timeout` of trouble.
pub(crate) async fn wait_turn(gate: &Gate, want: Want, wait_timeout: Duration) -> Result<Role> {
    let started = Instant::now();
    let deadline = tokio::time::Instant::from_std(started + wait_timeout);
    let mut waiter = Waiter {
        gate,
        conn: None,
        session: Session::default(),
        trouble_since: None,
        last_trouble: None,
        last_holder: None,
        next_report: started,
    };
    if gate.release().is_none() {
        info!(lock = %gate.lock(), "no --release given: every replica runs the migration in turn under the lock (correct for idempotent migrators, slower)");
    }
    let mut fast = backoff(POLL_MIN, POLL_FAST_MAX);
    let mut listening_delays = backoff(POLL_MIN, POLL_LISTENING_MAX);
    let mut slow = backoff(POLL_MIN, POLL_SLOW_MAX);
    loop {
        let pressure = match tokio::time::timeout_at(deadline, waiter.step(want)).await {
            Err(_) => return Err(waiter.timed_out(started.elapsed())),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(Step::Done { seen, conn })) => {
                info!(
                    release = gate.release(),
                    waited_ms = started.elapsed().as_millis() as u64,
                    "release is done; starting with the flag off"
                );
                return Ok(Role::Follower { seen, conn });
            }
            Ok(Ok(Step::Holder(holding))) => {
                info!(release = gate.release(), lock = %gate.lock(), attempt = holding.attempt(), waited_ms = started.elapsed().as_millis() as u64, "lock taken; this replica migrates");
                return Ok(Role::Holder(holding));
            }
            Ok(Ok(Step::Wait { pressure })) => pressure,
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
    gate: &'g Gate,
    /// The connection kept between rounds, if this waiter may keep one.
    conn: Option<Conn>,
    session: Session,
    /// Since when rounds fail for transient reasons (no connection, a standby).
    trouble_since: Option<Instant>,
    /// The latest such reason.
    last_trouble: Option<String>,
    /// The lock holder as last seen, for the timeout message.
    last_holder: Option<String>,
    next_report: Instant,
}

enum Step {
    Done {
        seen: Seen,
        conn: Option<Conn>,
    },
    Holder(Box<Holding>),
    /// Wait and go again; `pressure`: share of `max_connections` in use, when known.
    Wait {
        pressure: f64,
    },
}

impl Waiter<'_> {
    /// One round on the kept connection or a new one, with the failure bookkeeping.
    async fn step(&mut self, want: Want) -> Result<Step> {
        let gate = self.gate;
        let conn = match self.conn.take() {
            Some(c) => Ok(c),
            None => {
                self.session.slot = false;
                self.session.listen_tried = false;
                gate.db.connect_once(gate.db.attempt_limit()).await
            }
        };
        let round = match conn {
            Ok(conn) => gate.round(conn, &mut self.session, want).await,
            Err(failure) => Err(failure),
        };
        match round {
            Ok((Round::Done(seen), conn)) => Ok(Step::Done { seen, conn }),
            Ok((Round::Holder(holding), _)) => Ok(Step::Holder(holding)),
            Ok((Round::Busy { keep, pressure }, conn)) => {
                self.trouble_since = None;
                self.last_trouble = None;
                if let Some(mut c) = conn {
                    self.report(&mut c).await;
                    if keep {
                        if !c.listens() && !self.session.listen_tried && self.may_listen() {
                            self.session.listen_tried = true;
                            c = self.listen_instead(c, want.slots()).await;
                        }
                        self.conn = Some(c);
                    } else {
                        db::close(c).await;
                    }
                }
                Ok(Step::Wait { pressure })
            }
            Ok((Round::Standby, _)) => self.trouble(
                "the server is a read-only standby (pg_is_in_recovery() is true)".into(),
                |gate, since| {
                    Error::Unavailable(format!(
                        "{} is a read-only standby (pg_is_in_recovery() is true) and has been for {}: point the gate at the primary (or at a proxy that follows the leader)",
                        gate.db.redacted_url,
                        short(since)
                    ))
                },
            ),
            Err(Failure::Fatal(e)) => Err(e),
            Err(Failure::Retry(reason)) => {
                db::log_retry("lost the database connection while waiting", &reason);
                let last = reason.clone();
                self.trouble(reason, move |gate, _| gate.db.gave_up(&last))
            }
        }
    }

    /// A transient failure: go on, unless failures have lasted `--connect-timeout`.
    fn trouble(
        &mut self,
        reason: String,
        give_up: impl FnOnce(&Gate, Duration) -> Error,
    ) -> Result<Step> {
        let since = self
            .trouble_since
            .get_or_insert_with(Instant::now)
            .elapsed();
        self.last_trouble = Some(reason);
        if since >= self.gate.target.connect_timeout {
            return Err(give_up(self.gate, since));
        }
        Ok(Step::Wait { pressure: 0.0 })
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
        let gate = self.gate;
        let Ok(mut listening) = gate.db.connect_listening(&gate.lock().channel()).await else {
            return plain;
        };
        let taken = match listening.pg().await {
            Ok(c) => lock::try_take_wait_slot(c, gate.lock(), slots)
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
        let holder = self.gate.describe_holder(conn).await;
        info!(
            release = self.gate.release(),
            holder,
            "waiting for {}",
            self.gate.waiting_for()
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
            (Some(holder), _) => format!(
                "the lock is held by {holder}: check that replica's logs, or raise --wait-timeout"
            ),
            (None, _) => "check the replica that migrates, or raise --wait-timeout".into(),
        };
        Error::Timeout {
            what: format!("timed out waiting for {}", self.gate.waiting_for()),
            waited,
            hint,
        }
    }
}

/// The polling delay of a reconnecting waiter on a crowded server: from [`POLL_SLOW_MAX`] when
/// [`CROWDED`] to [`POLL_CROWDED_MAX`] when [`PACKED`], jittered over its upper half so that a
/// fleet spreads its reconnections.
fn crowded_delay(pressure: f64) -> Duration {
    let f = ((pressure - CROWDED) / (PACKED - CROWDED)).clamp(0.0, 1.0);
    let cap = POLL_SLOW_MAX.as_secs_f64() + f * (POLL_CROWDED_MAX - POLL_SLOW_MAX).as_secs_f64();
    Duration::from_secs_f64(cap * (0.5 + 0.5 * fastrand::f64()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crowded_delay_grows_with_pressure_and_stays_within_its_bounds() {
        for _ in 0..200 {
            let calm = crowded_delay(0.5);
            assert!(
                calm >= POLL_SLOW_MAX / 2 && calm <= POLL_SLOW_MAX,
                "{calm:?}"
            );
            let packed = crowded_delay(0.95);
            assert!(
                packed >= POLL_CROWDED_MAX / 2 && packed <= POLL_CROWDED_MAX,
                "{packed:?}"
            );
        }
        let mid: Duration = (0..200).map(|_| crowded_delay(0.7)).sum::<Duration>() / 200;
        assert!(mid > POLL_SLOW_MAX && mid < POLL_CROWDED_MAX, "{mid:?}");
    }
}
