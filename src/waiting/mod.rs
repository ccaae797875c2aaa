//! The bookkeeping of a waiting replica between rounds of the protocol ([`crate::protocol`]):
//! which connection it keeps (a waiting slot, the `LISTEN` upgrade), the route and lock scope
//! decided once per gate, failure streaks bounded by `--connect-timeout`, the periodic report of
//! who holds the lock, and the pause between rounds.
//!
//! A waiter that keeps its connection on a direct connection `LISTEN`s: the holder notifies in
//! the transaction that writes `done`, so the waiter wakes when it commits and needs one more
//! round trip to read the row. Polling stays as the fallback (a lost notification, a holder that
//! crashed, transaction pooling where `LISTEN` does not work).

use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::db::{self, Conn, Failure, backoff};
use crate::duration::short;
use crate::error::{Error, Result};
use crate::lock::{self, Scope, WaitSlots};
use crate::replica::{HolderNote, Replica};
use crate::route::Route;

mod pace;

use pace::*;

/// How often a waiter logs who holds the lock.
const REPORT_EVERY: Duration = Duration::from_secs(10);

/// A round that found the lock taken (or that only watches): the connection, whether this
/// waiter may keep it, and the share of `max_connections` in use, when known.
pub(crate) struct Busy {
    pub(crate) conn: Conn,
    pub(crate) keep: bool,
    pub(crate) pressure: f64,
}

/// A connection kept between rounds.
struct Kept {
    conn: Conn,
    /// Whether it holds a waiting slot.
    slot: bool,
    /// Whether it already tried to move to a listening one (once per connection: without a free
    /// slot it would open a connection on every poll).
    listen_tried: bool,
}

type Delays = Box<dyn Iterator<Item = Duration> + Send>;

/// The state a waiting replica carries from round to round.
pub(crate) struct Waiter<'g> {
    replica: &'g Replica,
    /// The connection kept between rounds, if this waiter may keep one.
    kept: Option<Kept>,
    /// The connection of the round under way: whether it holds a slot, tried `LISTEN`.
    current: (bool, bool),
    /// What sits between us and PostgreSQL, and the lock scope: decided once per gate.
    route: Option<(Route, Scope)>,
    /// Whether the ledger is known to exist.
    ledger_exists: bool,
    /// Whether the ledger has its `app` column, once known ([`Waiter::app_column`]).
    app_column: Option<bool>,
    /// Since when rounds fail for transient reasons (no connection, a standby).
    trouble_since: Option<Instant>,
    /// The latest such reason.
    last_trouble: Option<String>,
    /// The lock holder as last seen, for the timeout message.
    last_holder: Option<HolderNote>,
    next_report: Instant,
    /// Whether the warning that the server is a standby was logged (once per gate).
    standby_said: bool,
    /// The share of `max_connections` in use, as last seen.
    pressure: f64,
    /// Polling delays: on a kept connection that listens, on one that does not, and when
    /// reconnecting for every poll.
    delays: (Delays, Delays, Delays),
}

impl<'g> Waiter<'g> {
    pub(crate) fn new(replica: &'g Replica) -> Waiter<'g> {
        if replica.release().is_none() {
            info!(lock = %replica.lock(), "no --release given: every replica runs the migration in turn under the lock (correct for idempotent migrators, slower)");
        }
        Waiter {
            replica,
            kept: None,
            current: (false, false),
            route: None,
            ledger_exists: false,
            app_column: None,
            trouble_since: None,
            last_trouble: None,
            last_holder: None,
            next_report: Instant::now(),
            standby_said: false,
            pressure: 0.0,
            delays: (
                Box::new(backoff(POLL_MIN, POLL_LISTENING_MAX)),
                Box::new(backoff(POLL_MIN, POLL_FAST_MAX)),
                Box::new(backoff(POLL_MIN, POLL_SLOW_MAX)),
            ),
        }
    }

    pub(crate) fn replica(&self) -> &'g Replica {
        self.replica
    }

    /// The kept connection, or a new one.
    pub(crate) async fn connection(&mut self) -> Result<Conn, Failure> {
        if let Some(k) = self.kept.take() {
            self.current = (k.slot, k.listen_tried);
            return Ok(k.conn);
        }
        self.current = (false, false);
        let db = &self.replica.db;
        db.connect_once(db.connect_try_timeout()).await
    }

    /// The round read the ledger: it exists.
    pub(crate) fn ledger_exists(&mut self) {
        self.ledger_exists = true;
    }

    /// Creates the ledger unless it is known to exist.
    pub(crate) async fn ensure_ledger(&mut self, conn: &mut Conn) -> Result<(), Failure> {
        if !self.ledger_exists {
            self.replica.create_ledger(conn).await?;
            self.ledger_exists = true;
        }
        Ok(())
    }

    /// Whether attempts can record their application's fingerprint: the ledger's `app` column,
    /// added if missing and allowed ([`crate::schema::Tables::ensure_app_column`]); looked at
    /// once per gate, before its first try of the lock.
    pub(crate) async fn app_column(&mut self, conn: &mut Conn) -> Result<bool, Failure> {
        if let Some(known) = self.app_column {
            return Ok(known);
        }
        let replica = self.replica;
        let sql = |e: sqlx::Error| replica.db.classify(&e);
        let c = conn.pg().await.map_err(sql)?;
        let known = replica
            .ledger
            .tables()
            .ensure_app_column(c)
            .await
            .map_err(sql)?;
        if !known {
            info!(
                ledger = %replica.ledger.tables().ledger(),
                "the ledger predates its app column and this role may not add it: attempts are recorded without the application's fingerprint (its owner adds it: `ALTER TABLE {} ADD COLUMN app text`)",
                replica.ledger.tables().ledger()
            );
        }
        self.app_column = Some(known);
        Ok(known)
    }

    /// The route and lock scope, decided on the first connection that needs them.
    pub(crate) async fn route(&mut self, conn: &mut Conn) -> Result<(Route, Scope), sqlx::Error> {
        if let Some(known) = self.route {
            return Ok(known);
        }
        let known = self.replica.detect_route(conn).await?;
        self.route = Some(known);
        Ok(known)
    }

    /// The lock is taken (or we only watch): may this waiter keep its connection? Only where a
    /// waiting connection costs no pooled server connection that the migration may need: on a
    /// direct connection with a waiting slot, or behind proven transaction pooling. Behind a
    /// session pooler or a proxy every waiter reconnects for each poll.
    pub(crate) async fn keep_or_drop(
        &mut self,
        mut conn: Conn,
        slots: WaitSlots,
    ) -> Result<Busy, Failure> {
        let sql = |e: sqlx::Error| self.replica.db.classify(&e);
        let (route, _) = self.route(&mut conn).await.map_err(sql)?;
        let (keep, pressure) = match route {
            Route::TransactionPooling => (true, 0.0),
            Route::Middlebox => (false, 0.0),
            Route::Direct if self.current.0 => (true, 0.0),
            Route::Direct => {
                let c = conn.pg().await.map_err(sql)?;
                let slot = lock::try_take_wait_slot(c, self.replica.identity().slot_space(), slots)
                    .await
                    .map_err(sql)?;
                self.current.0 = slot.taken;
                (slot.taken, slot.pressure)
            }
        };
        Ok(Busy {
            conn,
            keep,
            pressure,
        })
    }

    /// After a busy round: the trouble is over; keep the connection (moving to a listening one
    /// once) or close it; report who holds the lock now and then.
    pub(crate) async fn busy(&mut self, busy: Busy, slots: WaitSlots) {
        let Busy {
            mut conn,
            keep,
            pressure,
        } = busy;
        self.trouble_since = None;
        self.last_trouble = None;
        self.pressure = pressure;
        if !keep {
            self.report(&mut conn).await;
            db::close(conn).await;
            return;
        }
        let (mut slot, mut listen_tried) = self.current;
        if !conn.listens() && !listen_tried && self.may_listen() {
            listen_tried = true;
            (conn, slot) = self.listen_instead(conn, slot, slots).await;
        }
        // Reported on the connection it keeps: once "waiting for" is logged, the connection the
        // waiter holds from then on is settled (the fault tests cut exactly that one).
        self.report(&mut conn).await;
        self.kept = Some(Kept {
            conn,
            slot,
            listen_tried,
        });
    }

    /// The round found a read-only standby where the release is not done: said once, retried
    /// for up to `--connect-timeout` (a failover may be under way).
    pub(crate) fn standby(&mut self) -> Result<()> {
        let replica = self.replica;
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

    /// A transient failure (no connection, a lost one, a lock lost while taking over): said once
    /// per streak (a failover takes seconds of them), retried for up to `--connect-timeout`.
    pub(crate) fn retry(&mut self, reason: String) -> Result<()> {
        if self.trouble_since.is_none() {
            db::log_retry("lost the database connection while waiting", &reason);
        } else {
            tracing::debug!(reason, "still no database connection; retrying");
        }
        let last = reason.clone();
        self.trouble(reason, move |replica, _| replica.db.gave_up(&last))
    }

    /// A transient failure: go on, unless failures have lasted `--connect-timeout`.
    fn trouble(
        &mut self,
        reason: String,
        give_up: impl FnOnce(&Replica, Duration) -> Error,
    ) -> Result<()> {
        let since = self
            .trouble_since
            .get_or_insert_with(Instant::now)
            .elapsed();
        self.last_trouble = Some(reason);
        self.pressure = 0.0;
        if since >= self.replica.target.connect_timeout {
            return Err(give_up(self.replica, since));
        }
        Ok(())
    }

    /// LISTEN only on a connection that is its own server session.
    fn may_listen(&self) -> bool {
        matches!(self.route, Some((Route::Direct, _)))
    }

    /// A waiter that keeps its plain connection on a direct route moves to one that `LISTEN`s.
    /// It takes a waiting slot there before it lets go of the one it holds, so the count of kept
    /// connections never grows past the slots; without a free slot, or when the listening
    /// connection fails, it keeps polling on the plain one. Returns the connection and whether
    /// it holds a slot.
    async fn listen_instead(&self, plain: Conn, slot: bool, slots: WaitSlots) -> (Conn, bool) {
        let replica = self.replica;
        let Ok(mut listening) = replica
            .db
            .connect_listening(&replica.identity().channel())
            .await
        else {
            return (plain, slot);
        };
        let taken = match listening.pg().await {
            Ok(c) => lock::try_take_wait_slot(c, replica.identity().slot_space(), slots)
                .await
                .is_ok_and(|s| s.taken),
            Err(_) => false,
        };
        if taken {
            db::close(plain).await;
            (listening, true)
        } else {
            db::close(listening).await;
            (plain, slot)
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

    /// Sleeps until the next round (never past `deadline`), or less when a listening
    /// connection hears the holder finish.
    pub(crate) async fn pause(&mut self, deadline: tokio::time::Instant) {
        let (listening, plain, reconnecting) = &mut self.delays;
        let pause = match &self.kept {
            Some(k) if k.conn.listens() => listening.next(),
            Some(_) => plain.next(),
            None if self.pressure > CROWDED => Some(crowded_delay(self.pressure)),
            None => reconnecting.next(),
        }
        .unwrap_or(POLL_SLOW_MAX);
        let until = deadline.min(tokio::time::Instant::now() + pause);
        let Some(kept) = self.kept.as_mut() else {
            tokio::time::sleep_until(until).await;
            return;
        };
        let limit = until.saturating_duration_since(tokio::time::Instant::now());
        if let Err(e) = kept.conn.notified(limit).await {
            // Lost: the next round reconnects.
            db::log_retry("lost the database connection while waiting", &e.to_string());
            self.kept = None;
        }
    }

    /// The error of a wait that lasted `--wait-timeout`, naming what it saw last.
    pub(crate) fn timed_out(&self, waited: Duration) -> Error {
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
