//! Sessions of another release of the same lock: apps of an older release still connected,
//! found by the release field of their tag (`--other-releases`).

use std::fmt;

use sqlx::postgres::PgConnection;

use super::Tag;
use crate::sql::{Cols, lit, query};

/// Sessions of another release of the same lock, connected now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OtherRelease {
    /// The release field of their tag (the first 32 bits of the release ID's SHA-256).
    pub(crate) hash: String,
    /// The release's name, when the ledger knows one with this hash.
    pub(crate) name: Option<String>,
    /// How many sessions.
    pub(crate) sessions: i64,
    /// Their client addresses (`local` for a Unix socket), comma-separated.
    pub(crate) clients: String,
}

impl fmt::Display for OtherRelease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            Some(name) => write!(f, "release {name:?}")?,
            None => write!(f, "a release with hash {}", self.hash)?,
        }
        write!(f, ": {} session(s) from {}", self.sessions, self.clients)
    }
}

/// The sessions in our database tagged with `tag`'s whole identity (lock key and ledger) but another release than `tag`'s
/// (apps of an older release still running): sessions without a release (`-`), the gate's own
/// (never tagged) and other clients' (untagged) do not count. The release names recorded in
/// `ledger` (the quoted table name) for `lock_key` name the hashes.
pub(crate) async fn other_releases(
    conn: &mut PgConnection,
    tag: &Tag,
    (ledger, lock_key): (&str, i64),
) -> Result<Vec<OtherRelease>, sqlx::Error> {
    let sql = other_releases_statement(tag, ledger, lock_key);
    query(conn, sql)
        .await?
        .iter()
        .map(|r| {
            let c = Cols(r);
            let name = c.text(1)?;
            Ok(OtherRelease {
                hash: c.text(0)?,
                name: (!name.is_empty()).then_some(name),
                sessions: c.parse(2)?,
                clients: c.text(3)?,
            })
        })
        .collect()
}

/// The statement of [`other_releases`]. A tag's release field is the 4th `:`-separated field of
/// the first word of `application_name` (`mgate:<key>:<ledger>:<release>:<attempt>`); tags are
/// per lock, and the same lock name recurs in every database of a cluster: only our database
/// counts.
fn other_releases_statement(tag: &Tag, ledger: &str, lock_key: i64) -> String {
    format!(
        "WITH s AS (SELECT split_part(split_part(a.application_name, ' ', 1), ':', 4) AS hash, \
                           coalesce(host(a.client_addr), 'local') AS client \
                    FROM pg_stat_activity a \
                    WHERE left(a.application_name, {len}) = {prefix} AND a.datname = current_database() \
                      AND split_part(split_part(a.application_name, ' ', 1), ':', 4) NOT IN ({own}, '-', '') \
                      AND a.pid <> pg_backend_pid()), \
              n AS (SELECT DISTINCT ON (h) h, release \
                    FROM (SELECT left(encode(sha256(convert_to(r.release, 'UTF8')), 'hex'), 8) AS h, \
                                 r.release FROM (SELECT DISTINCT release FROM {ledger} \
                                                 WHERE lock_key = {lock_key} AND release IS NOT NULL) r) x \
                    ORDER BY h, release) \
         SELECT s.hash, coalesce(n.release, ''), count(*)::text, \
                string_agg(DISTINCT s.client, ', ') \
         FROM s LEFT JOIN n ON n.h = s.hash GROUP BY s.hash, n.release ORDER BY s.hash",
        len = tag.identity_prefix().len(),
        prefix = lit(&tag.identity_prefix()),
        own = lit(&tag.release),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Effect: tests/watching.rs (a new release waits for the old release's app, refuses under
    /// `fail`, goes on under `ignore`) and tests/neighbours.rs (another application's release
    /// with the same ID is refused, not followed).
    #[test]
    fn other_releases_whole() {
        let lock = crate::lock::LockKey::from_name("migrations-gate");
        let identity = crate::identity::Identity::new(&lock, "migrations_gate");
        let tag = Tag::new(&identity, Some("r2"), None);
        insta::assert_snapshot!(crate::sql::pretty(&other_releases_statement(
            &tag,
            "\"migrations_gate\".ledger",
            lock.key
        )));
    }
}
