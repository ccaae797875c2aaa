//! The database sessions of an attempt: the tag every session of a child carries, finding those
//! sessions in `pg_stat_activity`, and ending them.
//!
//! A backend whose client died keeps executing its statement until it next writes to the client
//! (PostgreSQL, "Connections and Authentication": `client_connection_check_interval`), so a
//! stopped migration's `INSERT` or a queued `ALTER TABLE` would run on, and commit, after the
//! gate recorded the attempt and freed the lock. An attempt is therefore over only when every
//! session it opened is gone: the holder cancels them (`pg_cancel_backend`), terminates what is
//! left after a short grace (`pg_terminate_backend`), and confirms they are gone before it
//! records the outcome (PostgreSQL, "Server Signaling Functions").
//!
//! # The tag
//! The gate sets `PGAPPNAME` in the environment of every program it starts, which libpq-based
//! clients (psql, psycopg 2 and 3, SQLAlchemy, Alembic, Django, Rails' pg, pgx, node-postgres)
//! send as `application_name`:
//!
//! ```text
//! mgate:<key>:<ledger>:<release>:<attempt>[ <the operator's PGAPPNAME>]
//! mgate:0000000000000007:5f3a1c2e:9f86d081:42 alembic
//! ```
//!
//! `<key>:<ledger>` is the gate's whole [`Identity`]: the lock key in 16 hex digits
//! (`pg_locks.classid` then `objid`) and the first 32 bits of SHA-256 of the ledger's schema name;
//! `<release>` the first 32 bits of the release ID's SHA-256 in hex (`-` without a release),
//! `<attempt>` the ledger row of the holder's attempt (`-` for a follower's app, which is no
//! attempt). Another application on the same database, with its own lock or its own ledger,
//! never shares the `mgate:<key>:<ledger>:` prefix, so its sessions are never ended, waited for
//! or counted as another release. Tags of gates before 0.2 (`mgate:<classid>:<release>:<attempt>`)
//! carry only half the key and no ledger: they are never matched. The tag comes first
//! because the server cuts `application_name` to 63 bytes: the operator's own name is cut, ours
//! never is (47 bytes up to attempt 999999). A client that sets `application_name` itself overrides `PGAPPNAME`; see
//! [`AttemptSessions::remember`] for how the holder finds those sessions anyway.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use sha2::{Digest, Sha256};
use sqlx::postgres::PgConnection;
use tracing::warn;

use crate::identity::Identity;
use crate::lock::Proof;
use crate::sql::{Cols, lit, query};

mod ending;
mod others;

use ending::settle;
pub(crate) use ending::{TerminateError, Terminated, signal_grant, terminate};
pub(crate) use others::{OtherRelease, other_releases};

/// The prefix that marks a session as started by a gate's child.
const PREFIX: &str = "mgate";
/// How often the holder looks again while sessions end.
const POLL: Duration = Duration::from_millis(100);

/// The tag of the sessions a gate's child opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Tag {
    /// `<key>:<ledger>` ([`Identity::tag_field`]).
    identity: String,
    release: String,
    attempt: Option<i64>,
}

impl Tag {
    /// The tag for a child of the gate `identity` migrating (or starting the app of)
    /// `release`, as attempt `attempt` (`None`: a follower's app).
    pub(crate) fn new(identity: &Identity, release: Option<&str>, attempt: Option<i64>) -> Tag {
        Tag {
            identity: identity.tag_field(),
            release: release.map(release_hash).unwrap_or_else(|| "-".into()),
            attempt,
        }
    }

    /// The `PGAPPNAME` for the child: the tag, then the operator's own `PGAPPNAME` if any.
    pub(crate) fn app_name(&self, operator: Option<&str>) -> String {
        match operator.map(str::trim).filter(|s| !s.is_empty()) {
            Some(own) => format!("{self} {own}"),
            None => self.to_string(),
        }
    }

    /// The start of the `application_name` of every session of this gate's children: the whole
    /// identity, up to and including the colon after it.
    fn identity_prefix(&self) -> String {
        format!("{PREFIX}:{}:", self.identity)
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.attempt {
            Some(id) => write!(f, "{}{}:{id}", self.identity_prefix(), self.release),
            None => write!(f, "{}{}:-", self.identity_prefix(), self.release),
        }
    }
}

/// `client_connection_check_interval` passed to a child's sessions, in milliseconds: a backend
/// whose client died aborts its statement within about this long, even when the gate itself is
/// gone (PostgreSQL 14+, "Connections and Authentication").
const CLIENT_CHECK_MS: u32 = 1000;
/// The first server version that knows `client_connection_check_interval`.
const CLIENT_CHECK_SINCE: u32 = 140_000;

/// The environment a child of the gate gets for its sessions: `PGAPPNAME` with `tag` (then the
/// operator's own `PGAPPNAME`), and, when the child reaches PostgreSQL `server_version` (as
/// `server_version_num`) 14+ without a pooler between, `-c client_connection_check_interval=1s`
/// appended to the operator's `PGOPTIONS`; on a direct route too, `-c lock_timeout=<ms>` for
/// `lock_timeout` (`--lock-timeout`), after the operator's options so that the flag wins. Never
/// behind a pooler: PgBouncer refuses the `options` startup parameter. An operator's own
/// `client_connection_check_interval` in `PGOPTIONS` wins (`=0` turns it off).
pub(crate) fn child_env(
    tag: &Tag,
    direct: bool,
    server_version: u32,
    lock_timeout: Option<Duration>,
) -> Vec<(String, String)> {
    let own = |name: &str| std::env::var(name).ok();
    let mut env = vec![(
        "PGAPPNAME".to_string(),
        tag.app_name(own("PGAPPNAME").as_deref()),
    )];
    let mut options = own("PGOPTIONS").unwrap_or_default();
    let before = options.clone();
    if direct
        && server_version >= CLIENT_CHECK_SINCE
        && !options.contains("client_connection_check_interval")
    {
        options = format!("{options} -c client_connection_check_interval={CLIENT_CHECK_MS}");
    }
    if let (true, Some(limit)) = (direct, lock_timeout.filter(|l| !l.is_zero())) {
        // At least 1 ms: 0 would mean no limit (a zero --lock-timeout passes nothing).
        let ms = limit.as_millis().max(1);
        options = format!("{options} -c lock_timeout={ms}");
    }
    if options != before {
        env.push(("PGOPTIONS".to_string(), options.trim().to_string()));
    }
    env
}

/// The environment of an app started with the flag off (a follower's, or the holder's once the
/// release is done, which is no attempt either): the tag names the lock and the release only.
pub(crate) fn app_env(identity: &Identity, release: Option<&str>) -> Vec<(String, String)> {
    child_env(&Tag::new(identity, release, None), false, 0, None)
}

/// The first 32 bits of the release ID's SHA-256, in hex: short enough for
/// `application_name`, and the same in every replica of a release.
pub(crate) fn release_hash(release: &str) -> String {
    hex::encode(&Sha256::digest(release.as_bytes())[..4])
}

/// One session of an attempt, as `pg_stat_activity` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Session {
    /// Backend PID.
    pub(crate) pid: i32,
    /// Its role (`usename`).
    pub(crate) role: String,
    /// Its `application_name`.
    pub(crate) application_name: String,
    /// `active`, `idle in transaction`, `idle`, ... (empty when hidden from our role).
    pub(crate) state: String,
    /// When its current (or last) statement started, UTC.
    pub(crate) query_start: String,
    /// Whether it is inside a transaction (which it could still commit).
    pub(crate) in_transaction: bool,
}

impl fmt::Display for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pid {} (role {:?}, application_name {:?}, {}",
            self.pid,
            self.role,
            self.application_name,
            if self.state.is_empty() {
                "state hidden"
            } else {
                &self.state
            }
        )?;
        if !self.query_start.is_empty() {
            write!(f, " since {}", self.query_start)?;
        }
        write!(f, ")")
    }
}

impl Session {
    /// Whether the session could still change something: a statement running, or a transaction
    /// open. An idle session outside a transaction does nothing until its client speaks, and its
    /// client is gone (or is a pooler that hands the server connection to someone else).
    fn busy(&self) -> bool {
        self.in_transaction || !matches!(self.state.as_str(), "idle" | "")
    }
}

/// Which sessions to look at: a SQL condition on `pg_stat_activity` aliased `a`, built here
/// from literals only, which [`list`], [`terminate`]'s signals and [`crate::lockwaits::waits`]
/// share: the tests of their statements show it whole. Tagged sessions count only in the gate's
/// own database (`a.datname = current_database()`): tags are per lock, and the same lock name
/// (and attempt numbers) recur in every database of a cluster. A tag's attempt field is the 5th
/// `:`-separated field of the first word of `application_name`
/// (`mgate:<key>:<ledger>:<release>:<attempt>`).
#[derive(Debug, Clone)]
pub(crate) struct Which {
    cond: String,
    /// The lock session every signal is sent under ([`Which::while_holding`]).
    guard: Option<Proof>,
}

impl Which {
    /// The sessions of one attempt: tagged with it, or seen by [`AttemptSessions::remember`] on the
    /// child's own sockets.
    fn attempt(tag: &Tag, id: i64, seen: &BTreeSet<(i32, String)>) -> Which {
        let mut cond = format!(
            "(left(a.application_name, {prefix_len}) = {prefix} \
              AND split_part(split_part(a.application_name, ' ', 1), ':', 5) = {attempt} \
              AND a.datname = current_database())",
            prefix_len = tag.identity_prefix().len(),
            prefix = lit(&tag.identity_prefix()),
            attempt = lit(&id.to_string())
        );
        for (pid, start) in seen {
            cond.push_str(&format!(
                " OR (a.pid = {pid} AND a.backend_start = {}::timestamptz)",
                lit(start)
            ));
        }
        Which { cond, guard: None }
    }

    /// The SQL condition, on `pg_stat_activity` aliased `a`.
    pub(crate) fn condition(&self) -> &str {
        &self.cond
    }

    /// Signals these sessions only while `proof` holds, in the very statement that sends the
    /// signal: sessions of *earlier* attempts are ours to end only while we hold the lock (after
    /// losing it, they may be the next holder's).
    pub(crate) fn while_holding(mut self, proof: &Proof) -> Which {
        self.guard = Some(proof.clone());
        self
    }

    /// The sessions of this lock's attempts that its ledger (`ledger`, the quoted table name,
    /// rows of `lock_key`) does not record `done`: what a holder that takes over must see gone
    /// before it migrates. Tagged with an attempt recorded `running`, `failed` or `abandoned`,
    /// or one of the untagged sessions (`pid@backend_start`) that a `running` attempt's holder
    /// recorded in its `detail` after [`SEEN_NOTE`] ([`crate::ledger::Ledger::note_sessions`]).
    pub(crate) fn unfinished(tag: &Tag, ledger: &str, lock_key: i64) -> Which {
        Which {
            cond: format!(
                "((left(a.application_name, {prefix_len}) = {prefix} \
                   AND split_part(split_part(a.application_name, ' ', 1), ':', 5) IN ( \
                      SELECT id::text FROM {ledger} WHERE lock_key = {lock_key} AND outcome IN ('running', 'failed', 'abandoned')) \
                   AND a.datname = current_database()) \
                  OR (a.pid, a.backend_start) IN ( \
                      SELECT split_part(s, '@', 1)::int, split_part(s, '@', 2)::timestamptz \
                      FROM {ledger} l, unnest(string_to_array(substr(l.detail, {after_note}), ';')) s \
                      WHERE l.lock_key = {lock_key} AND l.outcome = 'running' AND starts_with(l.detail, {note}) AND s <> ''))",
                prefix_len = tag.identity_prefix().len(),
                prefix = lit(&tag.identity_prefix()),
                after_note = SEEN_NOTE.len() + 1,
                note = lit(SEEN_NOTE),
            ),
            guard: None,
        }
    }
}

/// Lists the sessions `which` selects, except our own.
pub(crate) async fn list(
    conn: &mut PgConnection,
    which: &Which,
) -> Result<Vec<Session>, sqlx::Error> {
    let sql = list_statement(which);
    query(conn, sql)
        .await?
        .iter()
        .map(|r| {
            let c = Cols(r);
            Ok(Session {
                pid: c.parse(0)?,
                role: c.text(1)?,
                application_name: c.text(2)?,
                state: c.text(3)?,
                query_start: c.text(4)?,
                in_transaction: c.parse(5)?,
            })
        })
        .collect()
}

/// The statement of [`list`].
fn list_statement(which: &Which) -> String {
    format!(
        "SELECT a.pid::text, coalesce(a.usename::text, ''), coalesce(a.application_name, ''), \
                coalesce(a.state, ''), \
                coalesce(to_char(a.query_start AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), ''), \
                (a.xact_start IS NOT NULL)::text \
         FROM pg_stat_activity a WHERE a.pid <> pg_backend_pid() AND ({}) ORDER BY a.pid",
        which.cond
    )
}

/// How many heartbeats a socket of the child's is matched against `pg_stat_activity` before the
/// holder stops looking for its session: a connection being authenticated has none yet.
const PORT_LOOKS: u32 = 5;

/// How a `running` attempt's `detail` starts when it lists the untagged sessions its holder
/// found ([`AttemptSessions::note`]).
pub(crate) const SEEN_NOTE: &str = "sessions seen: ";

/// The sessions of the holder's attempt: its tag, and the sessions seen on the child's own
/// sockets for clients that set `application_name` themselves.
#[derive(Debug, Clone)]
pub(crate) struct AttemptSessions {
    tag: Tag,
    id: i64,
    seen: BTreeSet<(i32, String)>,
}

impl AttemptSessions {
    /// The sessions of attempt `id` of the gate `identity`, migrating `release`.
    pub(crate) fn new(identity: &Identity, release: Option<&str>, id: i64) -> AttemptSessions {
        AttemptSessions {
            tag: Tag::new(identity, release, Some(id)),
            id,
            seen: BTreeSet::new(),
        }
    }

    /// The tag of this attempt's children.
    pub(crate) fn tag(&self) -> &Tag {
        &self.tag
    }

    /// Which sessions belong to this attempt.
    pub(crate) fn which(&self) -> Which {
        Which::attempt(&self.tag, self.id, &self.seen)
    }

    /// Remembers the sessions whose client is a TCP socket of process group `pgid` (the child
    /// and what it started), matched on client address and port in `pg_stat_activity`: that
    /// finds a client that ignores `PGAPPNAME` (JDBC, asyncpg) or sets `application_name`
    /// itself, while it is connected directly over TCP. Cheap when nothing changed: no query
    /// unless the child has a socket not seen before. Returns whether a session was added.
    pub(crate) async fn remember(
        &mut self,
        conn: &mut PgConnection,
        pgid: i32,
        ports_seen: &mut BTreeMap<u16, u32>,
    ) -> Result<bool, sqlx::Error> {
        // A socket is there from the client's connect(), its session in pg_stat_activity only
        // once the backend has authenticated it: a port without a session is looked at again
        // on the next heartbeats (a socket to something else than this server, a few times).
        let fresh: Vec<u16> = crate::sockets::local_tcp_ports(pgid)
            .into_iter()
            .filter(|p| {
                let looks = ports_seen.entry(*p).or_insert(0);
                *looks = looks.saturating_add(1);
                *looks <= PORT_LOOKS
            })
            .collect();
        if fresh.is_empty() {
            return Ok(false);
        }
        let before = self.seen.len();
        let rows = query(conn, remember_statement(&fresh)).await?;
        for r in &rows {
            let c = Cols(r);
            self.seen.insert((c.parse(0)?, c.text(1)?));
            // Found: never looked at again.
            ports_seen.insert(c.parse(2)?, u32::MAX);
        }
        Ok(self.seen.len() > before)
    }

    /// The sessions remembered so far, for the attempt's `detail` while it runs
    /// ([`crate::ledger::Ledger::note_sessions`]): `sessions seen: PID@BACKEND_START;...`.
    pub(crate) fn note(&self) -> String {
        let seen: Vec<String> = self
            .seen
            .iter()
            .map(|(pid, start)| format!("{pid}@{start}"))
            .collect();
        format!("{SEEN_NOTE}{}", seen.join(";"))
    }

    /// Warns about sessions still busy after the child exited 0, and waits up to `limit` for
    /// them to finish. Returns those still busy: the attempt must not be recorded `done` while
    /// they could change the schema.
    pub(crate) async fn busy_after_success(
        &self,
        conn: &mut PgConnection,
        limit: Duration,
    ) -> Result<Vec<Session>, sqlx::Error> {
        let which = self.which();
        let busy: Vec<Session> = list(conn, &which)
            .await?
            .into_iter()
            .filter(Session::busy)
            .collect();
        if busy.is_empty() {
            return Ok(busy);
        }
        for s in &busy {
            warn!(session = %s, "the migration exited 0 but left this session running; waiting for it");
        }
        settle(conn, &which, limit, Session::busy).await
    }
}

/// The statement of [`AttemptSessions::remember`]: the sessions, other than ours, whose client
/// is one of `ports` on our own client address.
fn remember_statement(ports: &[u16]) -> String {
    let ports = ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",");
    format!(
        "SELECT a.pid::text, a.backend_start::text, a.client_port::text FROM pg_stat_activity a \
         WHERE a.client_port IN ({ports}) AND a.pid <> pg_backend_pid() \
           AND a.client_addr = inet_client_addr()"
    )
}

#[cfg(test)]
mod tests;
