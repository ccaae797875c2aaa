//! The PostgreSQL advisory lock: how its key is derived, how it is taken without blocking, and
//! who holds it.
//!
//! # Key derivation
//! The 64-bit key of `--lock NAME` is the first 8 bytes of SHA-256 of the UTF-8 name, read as a
//! big-endian signed integer. An operator can compute it in SQL (PostgreSQL 11+):
//!
//! ```sql
//! SELECT ('x' || left(encode(sha256(convert_to('migrations-gate', 'UTF8')), 'hex'), 16))::bit(64)::bigint;
//! -- 2948330413224442496... (see README for the default's value)
//! ```
//!
//! In `pg_locks` a bigint advisory lock shows as `classid` = high 32 bits, `objid` = low 32 bits,
//! `objsubid` = 1.

use std::fmt;

use sha2::{Digest, Sha256};
use sqlx::Row;
use sqlx::postgres::PgConnection;

use crate::db::{query, query_scalar};

/// An advisory lock key, with the name it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockKey {
    /// The `--lock` name, or `id:N` for `--lock-id N`.
    pub name: String,
    /// The 64-bit key passed to `pg_try_advisory_lock`.
    pub key: i64,
}

impl LockKey {
    /// The key for `--lock NAME` (see the module documentation for the derivation).
    pub fn from_name(name: &str) -> LockKey {
        let digest = Sha256::digest(name.as_bytes());
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        LockKey {
            name: name.to_string(),
            key: i64::from_be_bytes(first),
        }
    }

    /// The key for `--lock-id N`.
    pub fn from_id(id: i64) -> LockKey {
        LockKey {
            name: format!("id:{id}"),
            key: id,
        }
    }

    /// `pg_locks.classid` of this key.
    pub fn classid(&self) -> u32 {
        ((self.key as u64) >> 32) as u32
    }

    /// `pg_locks.objid` of this key.
    pub fn objid(&self) -> u32 {
        (self.key as u64 & 0xffff_ffff) as u32
    }

    /// SQL condition selecting this lock's rows in `pg_locks` aliased `l`.
    pub fn pg_locks_filter(&self) -> String {
        format!(
            "l.locktype = 'advisory' AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
             AND l.classid = {} AND l.objid = {} AND l.objsubid = 1",
            self.classid(),
            self.objid()
        )
    }
}

impl fmt::Display for LockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (key {})", self.name, self.key)
    }
}

/// Tries to take the session-level lock; never waits. A blocked `pg_advisory_lock` would hold a
/// snapshot that `CREATE INDEX CONCURRENTLY` in the holder's migration waits for: a deadlock.
pub async fn try_acquire(conn: &mut PgConnection, lock: &LockKey) -> Result<bool, sqlx::Error> {
    let got = query_scalar(
        conn,
        format!("SELECT pg_try_advisory_lock({})::text", lock.key),
    )
    .await?;
    Ok(got.as_deref() == Some("true"))
}

/// Frees the lock taken on this session.
pub async fn release(conn: &mut PgConnection, lock: &LockKey) -> Result<bool, sqlx::Error> {
    let freed = query_scalar(
        conn,
        format!("SELECT pg_advisory_unlock({})::text", lock.key),
    )
    .await?;
    Ok(freed.as_deref() == Some("true"))
}

/// The session that holds a lock, as PostgreSQL sees it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Holder {
    /// Backend PID of the holding session.
    pub pid: i32,
    /// Its `application_name` (the gate sets `migrations-gate/<hostname>` by default).
    pub application_name: String,
    /// Its client address (empty for a Unix socket).
    pub client_addr: String,
    /// When its connection started.
    pub backend_start: String,
    /// How long ago, in seconds.
    pub connected_secs: f64,
    /// Its state (`idle`, `active`, ...).
    pub state: String,
}

/// Who holds `lock` now, if anyone.
pub async fn holder(
    conn: &mut PgConnection,
    lock: &LockKey,
) -> Result<Option<Holder>, sqlx::Error> {
    let sql = format!(
        "SELECT a.pid::text, coalesce(a.application_name, ''), coalesce(host(a.client_addr), ''), \
                coalesce(a.backend_start::text, ''), \
                coalesce(extract(epoch FROM now() - a.backend_start)::float8::text, '0'), \
                coalesce(a.state, '') \
         FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE {} AND l.granted LIMIT 1",
        lock.pg_locks_filter()
    );
    let rows = query(conn, sql).await?;
    let Some(row) = rows.first() else {
        return Ok(None);
    };
    let text = |i: usize| -> Result<String, sqlx::Error> {
        Ok(row.try_get::<Option<String>, _>(i)?.unwrap_or_default())
    };
    Ok(Some(Holder {
        pid: text(0)?.parse().unwrap_or(0),
        application_name: text(1)?,
        client_addr: text(2)?,
        backend_start: text(3)?,
        connected_secs: text(4)?.parse().unwrap_or(0.0),
        state: text(5)?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_first_eight_bytes_of_sha256_big_endian() {
        // sha256("migrations-gate") starts with these 8 bytes; the SQL in the docs yields the same.
        let k = LockKey::from_name("migrations-gate");
        let digest = Sha256::digest(b"migrations-gate");
        assert_eq!(k.key.to_be_bytes(), digest[..8]);
        assert_ne!(LockKey::from_name("other").key, k.key);
    }

    #[test]
    fn pg_locks_halves_recombine_into_the_key() {
        for key in [0i64, 1, -1, i64::MIN, i64::MAX, 0x1234_5678_9abc_def0] {
            let k = LockKey::from_id(key);
            let back = ((k.classid() as u64) << 32 | k.objid() as u64) as i64;
            assert_eq!(back, key);
        }
    }
}
