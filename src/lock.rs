//! The PostgreSQL advisory lock: how its key is derived, how it is taken without blocking, and
//! who holds it.
//!
//! # Key derivation
//! The 64-bit key of `--lock NAME` is the first 8 bytes of SHA-256 of the UTF-8 name, read as a
//! big-endian signed integer. An operator can compute it in SQL (PostgreSQL 11+):
//!
//! ```sql
//! SELECT ('x' || left(encode(sha256(convert_to('migrations-gate', 'UTF8')), 'hex'), 16))::bit(64)::bigint;
//! -- -2194319167836551848
//! ```
//!
//! In `pg_locks` a bigint advisory lock shows as `classid` = high 32 bits, `objid` = low 32 bits,
//! `objsubid` = 1.

use std::fmt;

use sha2::{Digest, Sha256};
use sqlx::postgres::PgConnection;

use crate::sql::{Cols, lit, one_row, query, query_scalar};

/// An advisory lock key, with the name it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LockKey {
    /// The `--lock` name, or `id:N` for `--lock-id N`.
    pub(crate) name: String,
    /// The 64-bit key passed to `pg_try_advisory_lock`.
    pub(crate) key: i64,
}

impl LockKey {
    /// The key for `--lock NAME` (see the module documentation for the derivation).
    pub(crate) fn from_name(name: &str) -> LockKey {
        let digest = Sha256::digest(name.as_bytes());
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        LockKey {
            name: name.to_string(),
            key: i64::from_be_bytes(first),
        }
    }

    /// The key for `--lock-id N`.
    pub(crate) fn from_id(id: i64) -> LockKey {
        LockKey {
            name: format!("id:{id}"),
            key: id,
        }
    }

    /// `pg_locks.classid` of this key.
    pub(crate) fn classid(&self) -> u32 {
        ((self.key as u64) >> 32) as u32
    }

    /// `pg_locks.objid` of this key.
    pub(crate) fn objid(&self) -> u32 {
        (self.key as u64 & 0xffff_ffff) as u32
    }
}

impl fmt::Display for LockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (key {})", self.name, self.key)
    }
}

/// How the lock is held (`--lock-scope`). Why each: its `--help` line, in
/// `config/value_enums.rs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Scope {
    /// Session or transaction, decided on the gate's first connection that needs it.
    Auto,
    /// `pg_try_advisory_lock`, held by the session.
    Session,
    /// `pg_try_advisory_xact_lock`, in a transaction kept open until the ledger row commits.
    Transaction,
}

/// Tries to take the lock; never waits. A blocked `pg_advisory_lock` would hold a snapshot
/// that `CREATE INDEX CONCURRENTLY` in the holder's migration waits for: a deadlock. In
/// transaction scope a successful try leaves the transaction open.
pub(crate) async fn try_acquire(
    conn: &mut PgConnection,
    lock: &LockKey,
    scope: Scope,
) -> Result<bool, sqlx::Error> {
    let got = query_scalar(conn, try_acquire_statement(lock, scope)).await?;
    if got.as_deref() == Some("true") {
        return Ok(true);
    }
    if scope == Scope::Transaction {
        query(conn, ROLLBACK.into()).await?;
    }
    Ok(false)
}

/// The statement of [`try_acquire`]: `true` when the lock was taken. In transaction scope it
/// opens the lock transaction, which [`ROLLBACK`] ends when the lock was not taken.
fn try_acquire_statement(lock: &LockKey, scope: Scope) -> String {
    if scope == Scope::Transaction {
        format!(
            "BEGIN; SELECT pg_try_advisory_xact_lock({})::text",
            lock.key
        )
    } else {
        format!("SELECT pg_try_advisory_lock({})::text", lock.key)
    }
}

/// Ends the lock transaction of a [`try_acquire`] that did not get the lock.
const ROLLBACK: &str = "ROLLBACK";

/// Frees the lock: unlock in session scope, COMMIT (of everything written meanwhile, the
/// ledger row included) in transaction scope.
pub(crate) async fn unlock(
    conn: &mut PgConnection,
    lock: &LockKey,
    scope: Scope,
) -> Result<(), sqlx::Error> {
    query(conn, unlock_statement(lock, scope)).await.map(|_| ())
}

/// The statement of [`unlock`].
fn unlock_statement(lock: &LockKey, scope: Scope) -> String {
    if scope == Scope::Transaction {
        "COMMIT".into()
    } else {
        format!("SELECT pg_advisory_unlock({})", lock.key)
    }
}

/// Whether this session still holds `lock` (the holder's heartbeat; in transaction scope also
/// a proof that the transaction is still open).
pub(crate) async fn held_by_us(
    conn: &mut PgConnection,
    lock: &LockKey,
) -> Result<bool, sqlx::Error> {
    let n = query_scalar(conn, held_by_us_statement(lock)).await?;
    Ok(n.is_some_and(|n| n != "0"))
}

/// The statement of [`held_by_us`]: how many granted rows of `lock` in `pg_locks` are this
/// session's.
fn held_by_us_statement(lock: &LockKey) -> String {
    format!(
        "SELECT count(*)::text FROM pg_locks l \
         WHERE l.locktype = 'advisory' AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
           AND l.classid = {classid} AND l.objid = {objid} AND l.objsubid = 1 \
           AND l.granted AND l.pid = pg_backend_pid()",
        classid = lock.classid(),
        objid = lock.objid(),
    )
}

/// The server's proof that one session holds the lock *now*: a SQL condition that a statement
/// of the holder's carries in its own `WHERE`, so that what the statement does (begin an
/// attempt, mark one abandoned, end a session, record the outcome) happens only if the lock is
/// still held at that instant. A timer or an earlier read proves nothing: the lock session may
/// have been terminated a millisecond ago, and another replica may hold the lock since.
///
/// It names the lock session by backend PID and `backend_start` (a PID alone may be reused by a
/// later session), so it holds through any connection of the same role: the witness of
/// transaction scope included, where the lock's transaction keeps one server connection even
/// behind a transaction pooler. `pg_locks` is read live by every statement, even inside a
/// transaction (PostgreSQL, "pg_locks"), unlike `pg_stat_activity`, whose snapshot is taken
/// once per transaction; the session's own `backend_start` never changes, so that is safe.
#[derive(Debug, Clone)]
pub(crate) struct Proof {
    /// `pg_locks.classid` of the lock's key.
    pub(crate) classid: u32,
    /// `pg_locks.objid` of the lock's key.
    pub(crate) objid: u32,
    /// The lock session's backend PID.
    pub(crate) pid: i32,
    /// The lock session's `backend_start`, as a SQL literal.
    pub(crate) start: String,
}

/// SQL, a string literal: the condition that the lock session of a [`Proof`] holds its lock now.
/// Written once, here, and spliced at compile time (`concat!`) into each statement that carries
/// it, so that each statement's text is whole in one `format!`; it binds `held_classid`,
/// `held_objid`, `held_pid` and `held_start` by name ([`Proof`]'s fields). The unit tests of those
/// statements show them whole.
macro_rules! lock_held {
    () => {
        "EXISTS (SELECT 1 FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
         AND l.classid = {held_classid} AND l.objid = {held_objid} AND l.objsubid = 1 \
         AND l.granted AND l.pid = {held_pid} AND a.backend_start = {held_start}::timestamptz)"
    };
}
pub(crate) use lock_held;

/// `format!` for a statement that carries [`lock_held!`]: binds its values from `proof`, then
/// the statement's own named arguments.
macro_rules! format_held {
    ($proof:expr, $sql:expr, $($args:tt)*) => {
        format!(
            $sql,
            held_classid = $proof.classid,
            held_objid = $proof.objid,
            held_pid = $proof.pid,
            held_start = $proof.start,
            $($args)*
        )
    };
}
pub(crate) use format_held;

/// The statement of [`Proof::of`]: this session's backend PID and `backend_start`.
const THIS_SESSION: &str =
    "SELECT pid::text, backend_start::text FROM pg_stat_activity WHERE pid = pg_backend_pid()";

impl Proof {
    /// The proof for the lock session `conn`, which must hold `lock`.
    pub(crate) async fn of(conn: &mut PgConnection, lock: &LockKey) -> Result<Proof, sqlx::Error> {
        let rows = query(conn, THIS_SESSION.into()).await?;
        let row = one_row(&rows)?;
        Ok(Proof {
            classid: lock.classid(),
            objid: lock.objid(),
            pid: row.parse(0)?,
            start: lit(&row.text(1)?),
        })
    }

    /// A proof with fixed values, for the tests that pin statements' text.
    #[cfg(test)]
    pub(crate) fn example() -> Proof {
        Proof {
            classid: 1,
            objid: 2,
            pid: 3,
            start: lit("2026-01-01 00:00:00+00"),
        }
    }
}

/// Sets up the lock session right after the lock is taken: keepalives, so that PostgreSQL frees
/// the lock within about 25 s when the holder's host vanishes without closing its socket (TCP's
/// default is two hours), and no server-side timeout that could end the lock while a long
/// migration runs. Role- or database-level settings (`ALTER DATABASE app SET transaction_timeout
/// = '5min'`, common on managed services) would otherwise terminate the session that holds the
/// lock in the middle of the migration; heartbeats do not reset `transaction_timeout`. The gate's
/// own queries stay bounded client-side ([`crate::sql::ROUND_TRIP_TIMEOUT`]).
///
/// In transaction scope every setting is local to the lock transaction (`set_config(.., true)`,
/// as `SET LOCAL`): behind a transaction pooler a session setting would leak onto a server
/// connection that other clients use next. Settings newer than the server (read from the
/// `server_version` it announced at startup: no round trip) are never sent.
pub(crate) async fn configure_lock_session(
    conn: &mut PgConnection,
    scope: Scope,
) -> Result<(), sqlx::Error> {
    let version = conn.server_version_num().unwrap_or(0);
    query(conn, lock_session_statement(version, scope))
        .await
        .map(|_| ())
}

/// The statement of [`configure_lock_session`] for a server of `version`: one `DO` block per
/// setting, each of which ignores its own failure (a managed service that forbids one setting
/// still gets the others).
fn lock_session_statement(version: u32, scope: Scope) -> String {
    let local = scope == Scope::Transaction;
    lock_session_settings(version)
        .into_iter()
        .map(|(name, value)| {
            format!(
                "DO $$ BEGIN PERFORM set_config('{name}', '{value}', {local}); \
                 EXCEPTION WHEN OTHERS THEN NULL; END $$;"
            )
        })
        .collect()
}

/// The settings of [`configure_lock_session`] that a server of `version` (`server_version_num`
/// format, e.g. 170010) knows.
fn lock_session_settings(version: u32) -> Vec<(&'static str, &'static str)> {
    let mut settings = vec![
        ("tcp_keepalives_idle", "10"),
        ("tcp_keepalives_interval", "5"),
        ("tcp_keepalives_count", "3"),
        ("tcp_user_timeout", "25000"),
        // The lock transaction is open for the whole migration; its statements are short.
        ("statement_timeout", "0"),
        ("idle_in_transaction_session_timeout", "0"),
    ];
    if version >= 14_00_00 {
        settings.push(("client_connection_check_interval", "5000"));
        // A session-scope lock session is idle between heartbeats.
        settings.push(("idle_session_timeout", "0"));
    }
    if version >= 17_00_00 {
        // Counts from BEGIN whatever the heartbeats do; set inside the transaction it stops the
        // timer already running.
        settings.push(("transaction_timeout", "0"));
    }
    settings
}

/// How many waiters may keep a connection open while they wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WaitSlots {
    /// A third of the server's free connections at the moment a waiter asks (at least 5, at
    /// most 100). As waiters take slots the free count shrinks, so they settle near a quarter
    /// of what was free, leaving the rest to the migration and the apps.
    Auto,
    /// A fixed number (0: every waiter reconnects for each poll).
    Fixed(u32),
}

impl std::str::FromStr for WaitSlots {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "auto" {
            return Ok(WaitSlots::Auto);
        }
        s.parse()
            .map(WaitSlots::Fixed)
            .map_err(|_| format!("{s:?} is neither `auto` nor a number of connections"))
    }
}

/// Tries to take a "waiting connection" slot of this gate's identity: `slot_space` is the first
/// key of its two-int advisory locks ([`crate::identity::Identity::slot_space`]). Waiters that get one keep their
/// connection and poll often (a query on an open connection is cheap); the others reconnect for
/// every poll (a new connection costs the server a process and an authentication), so a fleet of
/// hundreds never holds more connections than the slots while it waits. Session-level advisory
/// locks: only used on a direct route, where a connection is its own server session.
pub(crate) async fn try_take_wait_slot(
    conn: &mut PgConnection,
    slot_space: i32,
    slots: WaitSlots,
) -> Result<Slot, sqlx::Error> {
    let rows = query(conn, wait_slot_statement(slot_space, slots)).await?;
    let row = one_row(&rows)?;
    Ok(Slot {
        taken: row.text(0)? == "1",
        pressure: row.parse(1)?,
    })
}

/// The statement of [`try_take_wait_slot`]: whether a slot was taken (`1`), and the share of
/// `max_connections` in use.
fn wait_slot_statement(slot_space: i32, slots: WaitSlots) -> String {
    match slots {
        WaitSlots::Fixed(count) => format!(
            "SELECT (SELECT count(*) FROM (SELECT s FROM generate_series(0, {count} - 1) s \
                     WHERE pg_try_advisory_lock({slot_space}, s) LIMIT 1) t)::text, \
                    ((SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')::int::float8 \
                     / current_setting('max_connections')::int)::text"
        ),
        // A third of the free connections, at least 5, at most 100.
        WaitSlots::Auto => format!(
            "SELECT (SELECT count(*) FROM (SELECT s FROM generate_series(0, \
                         least(100, greatest(5, (current_setting('max_connections')::int \
                             - (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')::int) / 3)) - 1) s \
                     WHERE pg_try_advisory_lock({slot_space}, s) LIMIT 1) t)::text, \
                    ((SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')::int::float8 \
                     / current_setting('max_connections')::int)::text"
        ),
    }
}

/// The answer of [`try_take_wait_slot`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Slot {
    /// Whether this waiter got a slot (and keeps its connection).
    pub(crate) taken: bool,
    /// Share of `max_connections` in use, 0 to 1: waiters without a slot poll more gently when
    /// the server is crowded.
    pub(crate) pressure: f64,
}

/// The session that holds a lock, as PostgreSQL sees it.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct GrantedSession {
    /// Backend PID of the holding session.
    pub(crate) pid: i32,
    /// Its `application_name` (the gate sets `migrations-gate/<hostname>` by default).
    pub(crate) application_name: String,
    /// Its client address (empty for a Unix socket).
    pub(crate) client_addr: String,
    /// When its connection started.
    pub(crate) backend_start: String,
    /// How long ago, in seconds.
    pub(crate) connected_secs: f64,
    /// Its state (`idle`, `active`, ...).
    pub(crate) state: String,
}

impl fmt::Display for GrantedSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let or =
            |s: &str, default: &'static str| if s.is_empty() { default } else { s }.to_string();
        write!(
            f,
            "{} (backend pid {}, client {}, connected {}s ago, {})",
            or(&self.application_name, "?"),
            self.pid,
            or(&self.client_addr, "local"),
            self.connected_secs.round(),
            self.state
        )
    }
}

/// Who holds `lock` now, if anyone.
pub(crate) async fn holder(
    conn: &mut PgConnection,
    lock: &LockKey,
) -> Result<Option<GrantedSession>, sqlx::Error> {
    let sql = holder_statement(lock);
    let rows = query(conn, sql).await?;
    let Some(row) = rows.first().map(Cols) else {
        return Ok(None);
    };
    let text = |i: usize| Ok::<_, sqlx::Error>(row.opt(i)?.unwrap_or_default());
    Ok(Some(GrantedSession {
        // NULL when the session left pg_stat_activity between the two reads: shown as 0.
        pid: row.parse_opt(0)?.unwrap_or(0),
        application_name: text(1)?,
        client_addr: text(2)?,
        backend_start: text(3)?,
        connected_secs: row.parse(4)?,
        state: text(5)?,
    }))
}

/// The statement of [`holder`]: the session with a granted row of `lock` in `pg_locks`, if any.
fn holder_statement(lock: &LockKey) -> String {
    format!(
        "SELECT a.pid::text, coalesce(a.application_name, ''), coalesce(host(a.client_addr), ''), \
                coalesce(a.backend_start::text, ''), \
                coalesce(extract(epoch FROM now() - a.backend_start)::float8::text, '0'), \
                coalesce(a.state, '') \
         FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
           AND l.classid = {classid} AND l.objid = {objid} AND l.objsubid = 1 \
           AND l.granted LIMIT 1",
        classid = lock.classid(),
        objid = lock.objid(),
    )
}

#[cfg(test)]
mod tests;
