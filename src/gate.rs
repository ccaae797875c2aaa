//! The gate protocol: who migrates, who waits, and when a release is done.
//!
//! 1. Every replica connects and reads the ledger. Release done: it is a follower, at once
//!    (also on a read-only standby: the `done` row is replayed after the migration's commits).
//! 2. Otherwise it tries `pg_try_advisory_lock` (never the blocking form). Busy: it waits for a
//!    notification or a jittered, growing delay and goes back to 1. It only goes on when the
//!    release is recorded done, never merely because the lock became free: a holder that
//!    crashed frees the lock without migrating. ([`crate::waiting`])
//! 3. The replica that gets the lock re-reads the ledger (the previous holder may have finished
//!    between 1 and 2), marks attempts left `running` by a vanished holder as `abandoned`,
//!    records its own attempt and migrates, checking on every heartbeat that its lock session is
//!    alive. If that session is lost, another replica may take the lock, so it stops its
//!    migration at once (fencing) and fails. ([`crate::holding`])
//! 4. It records the outcome and notifies the waiters on the lock session, commits, and only
//!    then frees the lock.
//!
//! This file holds what every step shares: the [`Gate`] (where the database, the lock and the
//! ledger are) and the step-1-to-3 decision of one round, [`Gate::round`].

use std::time::Duration;

use tracing::{info, warn};

use crate::config::Target;
use crate::db::{Conn, Db, Failure};
use crate::error::{Error, Result};
use crate::holding::Holding;
use crate::ledger::{Attempt, Ledger, ReadKey, Seen};
use crate::lock::{self, LockKey, Route, Scope, WaitSlots};

/// One replica's view of the lock and the ledger.
pub(crate) struct Gate {
    pub(crate) target: Target,
    pub(crate) db: Db,
    pub(crate) ledger: Ledger,
    pub(crate) release: Option<String>,
    host: String,
}

/// What the replica wants from a round.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Want {
    /// Its turn to migrate (`migrate`, `run`): take the lock when it is free.
    Lock {
        /// `--kill-grace`, recorded so that a taker-over knows how long fencing takes.
        kill_grace: Duration,
        /// `--waiting-connections`.
        slots: WaitSlots,
    },
    /// Only to see the release done (`wait`): never take the lock.
    Done {
        /// `--waiting-connections`.
        slots: WaitSlots,
    },
}

impl Want {
    /// `--waiting-connections`.
    pub(crate) fn slots(self) -> WaitSlots {
        match self {
            Want::Lock { slots, .. } | Want::Done { slots } => slots,
        }
    }
}

/// The state a waiter carries from round to round on one connection.
#[derive(Default)]
pub(crate) struct Session {
    /// What sits between us and PostgreSQL, and the lock scope: decided once per gate.
    pub(crate) route: Option<(Route, Scope)>,
    /// Whether this connection holds a waiting slot.
    pub(crate) slot: bool,
    /// Whether this connection already tried to move to a listening one (once per connection:
    /// without a free slot it would open a connection on every poll).
    pub(crate) listen_tried: bool,
    /// Whether the ledger is known to exist.
    pub(crate) ensured: bool,
}

/// What one round saw.
pub(crate) enum Round {
    /// The release is done: go on with the flag off. What the ledger read saw goes to the
    /// preflight checks.
    Done(Seen),
    /// We hold the lock and have recorded an attempt: migrate.
    Holder(Box<Holding>),
    /// Not yet. `keep`: whether this waiter may keep its connection; `pressure`: the share of
    /// `max_connections` in use, when known.
    Busy { keep: bool, pressure: f64 },
    /// The server is a read-only standby and the release is not done there.
    Standby,
}

/// What a round returns: what it saw, and the connection to go on with (if it may be kept);
/// or an error already sorted into "retry" and "give up".
pub(crate) type Step = Result<(Round, Option<Conn>), Failure>;

impl Gate {
    /// Prepares a gate; fails on a malformed URL.
    pub(crate) fn new(target: Target, release: Option<String>) -> Result<Gate> {
        let db = Db::new(
            &target.database_url,
            &target.application_name,
            target.connect_timeout,
        )?;
        let ledger = Ledger::new(&target.schema, &target.lock);
        Ok(Gate {
            target,
            db,
            ledger,
            release,
            host: crate::config::hostname(),
        })
    }

    pub(crate) fn lock(&self) -> &LockKey {
        &self.target.lock
    }

    pub(crate) fn release(&self) -> Option<&str> {
        self.release.as_deref()
    }

    /// What a waiter waits for, for messages.
    pub(crate) fn waiting_for(&self) -> String {
        match self.release() {
            Some(r) => format!("release {r:?} to be migrated"),
            None => "our turn to migrate".into(),
        }
    }

    /// Who holds the lock, for messages.
    pub(crate) async fn describe_holder(&self, conn: &mut Conn) -> String {
        let holder = match conn.pg().await {
            Ok(c) => lock::holder(c, self.lock()).await,
            Err(e) => Err(e),
        };
        match holder {
            Ok(Some(h)) => h.to_string(),
            Ok(None) => "nobody (about to be taken)".into(),
            Err(e) => format!("unknown ({e})"),
        }
    }

    /// The route and lock scope, decided on the first connection that needs them.
    pub(crate) async fn route(
        &self,
        conn: &mut Conn,
        session: &mut Session,
    ) -> Result<(Route, Scope), sqlx::Error> {
        if let Some(known) = session.route {
            return Ok(known);
        }
        let (route, why) = lock::detect_route(conn.pg().await?, self.db.dialled_port()).await?;
        let scope = match self.target.lock_scope {
            Scope::Auto => route.scope(),
            fixed => fixed,
        };
        info!(?route, ?scope, why, "connection route detected");
        session.route = Some((route, scope));
        Ok((route, scope))
    }

    /// One round of the protocol (steps 1 to 3 of the module documentation).
    pub(crate) async fn round(&self, mut conn: Conn, session: &mut Session, want: Want) -> Step {
        let sql = |e: sqlx::Error| self.db.classify(&e);
        if let Some(release) = self.release() {
            let seen = self
                .ledger
                .is_done(conn.pg().await.map_err(sql)?, release, ReadKey::IfCompared)
                .await
                .map_err(sql)?;
            match seen.done {
                Some(true) => return Ok((Round::Done(seen), Some(conn))),
                _ if seen.standby => return Ok((Round::Standby, None)),
                Some(false) => session.ensured = true,
                None => {}
            }
        }
        let (kill_grace, slots) = match want {
            Want::Lock { kill_grace, slots } => (kill_grace, slots),
            Want::Done { slots } => return self.busy(conn, session, slots).await,
        };
        if !session.ensured {
            // First run against this database: create the ledger before anyone locks, so that
            // no DDL ever runs inside a lock transaction.
            if let Err(e) = self.ledger.ensure(conn.pg().await.map_err(sql)?).await {
                return Err(self.ensure_failed(&e));
            }
            session.ensured = true;
        }
        let (_, scope) = self.route(&mut conn, session).await.map_err(sql)?;
        let c = conn.pg().await.map_err(sql)?;
        if !lock::try_acquire(c, self.lock(), scope)
            .await
            .map_err(sql)?
        {
            return self.busy(conn, session, slots).await;
        }
        lock::configure_lock_session(c, scope).await.map_err(sql)?;
        if let Some(release) = self.release() {
            let seen = self
                .ledger
                .is_done(c, release, ReadKey::No)
                .await
                .map_err(sql)?;
            if seen.done == Some(true) {
                // The previous holder finished between our read and our lock.
                lock::release(c, self.lock(), scope).await.map_err(sql)?;
                return Ok((Round::Done(seen), Some(conn)));
            }
        }
        // The attempt row and its heartbeats must be visible to a taker-over even if this
        // holder vanishes. In session scope they commit on the lock session itself; in
        // transaction scope everything written there rolls back with the lock, so they go
        // through a second connection that commits on its own: the witness.
        let mut witness = match scope {
            Scope::Session => None,
            _ => Some(self.db.connect_once(self.db.attempt_limit()).await?),
        };
        let book = match witness.as_mut() {
            Some(w) => w.pg().await.map_err(sql)?,
            None => conn.pg().await.map_err(sql)?,
        };
        let (stale, wait) = self.ledger.stale(book).await.map_err(sql)?;
        if stale > 0 {
            warn!(
                stale,
                fence_wait_s = format!("{wait:.1}"),
                "the previous holder vanished mid-migration; taking over once it has surely stopped its migration"
            );
            // Holding the lock, so nobody else starts meanwhile; the rows stay `running` until
            // the wait is over, so a taker-over that dies meanwhile hands the wait on.
            tokio::time::sleep(Duration::from_secs_f64(wait.min(3600.0))).await;
            self.ledger.abandon_stale(book).await.map_err(sql)?;
        }
        let id = self
            .ledger
            .begin(book, &self.attempt(kill_grace))
            .await
            .map_err(sql)?;
        let holding = Holding::new(conn, witness, scope, id);
        Ok((Round::Holder(Box::new(holding)), None))
    }

    /// The lock is taken (or we only watch): may this waiter keep its connection? Only where a
    /// waiting connection costs no pooled server connection that the migration may need: on a
    /// direct connection with a waiting slot, or behind proven transaction pooling. Behind a
    /// session pooler or a proxy every waiter reconnects for each poll.
    async fn busy(&self, mut conn: Conn, session: &mut Session, slots: WaitSlots) -> Step {
        let sql = |e: sqlx::Error| self.db.classify(&e);
        let (route, _) = self.route(&mut conn, session).await.map_err(sql)?;
        let (keep, pressure) = match route {
            Route::TransactionPooling => (true, 0.0),
            Route::Middlebox => (false, 0.0),
            Route::Direct if session.slot => (true, 0.0),
            Route::Direct => {
                let c = conn.pg().await.map_err(sql)?;
                let slot = lock::try_take_wait_slot(c, self.lock(), slots)
                    .await
                    .map_err(sql)?;
                session.slot = slot.taken;
                (slot.taken, slot.pressure)
            }
        };
        Ok((Round::Busy { keep, pressure }, Some(conn)))
    }

    /// A failed ledger creation: a missing privilege gets the grants to ask for.
    fn ensure_failed(&self, e: &sqlx::Error) -> Failure {
        match e {
            sqlx::Error::Database(db) if db.code().as_deref() == Some("42501") => {
                Failure::Fatal(Error::Auth(self.ledger.grants_needed(
                    self.db.username(),
                    &self.db.redacted_url,
                    db.message(),
                )))
            }
            _ => self.db.classify(e),
        }
    }

    /// This replica's attempt, for the ledger.
    pub(crate) fn attempt(&self, kill_grace: Duration) -> Attempt<'_> {
        Attempt {
            release: self.release(),
            holder: &self.target.application_name,
            host: &self.host,
            pid: std::process::id(),
            fence_secs: crate::holding::fence_time(kill_grace)
                .as_secs()
                .try_into()
                .unwrap_or(u32::MAX),
        }
    }
}
