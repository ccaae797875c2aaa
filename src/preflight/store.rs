//! The rows of the preflight tables next to the ledger (their DDL is in [`crate::schema`]): the
//! key (`<schema>.env_key`), each release's reference fingerprints (`<schema>.env_reference`)
//! and each replica's last comparison (`<schema>.env_checks`).
//!
//! Each statement is written whole in one `format!` (a `*_sql` method just above the function
//! that runs it) whose only parts are quoted identifiers and literals, so that it reads as
//! PostgreSQL gets it; the unit tests below show each one's text.

use sqlx::postgres::{PgConnection, PgRow};

use super::budget::Limit;
use super::fingerprint::{EnvKey, random_key};
use crate::lock::LockKey;
use crate::schema::Tables;
use crate::sql::{Cols, lit, one_row, query, query_if_exists, query_secret};

/// The preflight tables next to the ledger: the key, each release's reference fingerprints,
/// and each replica's last comparison.
pub(crate) struct Store {
    tables: Tables,
    lock: LockKey,
}

const TIME: &str = "'YYYY-MM-DD HH24:MI:SS \"UTC\"'";
const TIME_JSON: &str = "'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'";

impl Store {
    pub(crate) fn new(schema: &str, lock: &LockKey) -> Store {
        Store {
            tables: Tables::new(schema),
            lock: lock.clone(),
        }
    }

    /// Creates the tables that are missing ([`Tables::create_preflight`]).
    pub(super) async fn ensure(&self, conn: &mut PgConnection) -> Result<(), sqlx::Error> {
        self.tables.create_preflight(conn).await
    }

    /// SQL: the key, as hex; no row before the first gate that needs it has created it.
    fn env_key_sql(&self) -> String {
        format!(
            "SELECT encode(key, 'hex') FROM {env_key}",
            env_key = self.tables.env_key()
        )
    }

    /// SQL: creates the key `fresh` (hex) unless another gate was first, then reads the one kept.
    fn create_env_key_sql(&self, fresh: &str) -> String {
        format!(
            "INSERT INTO {env_key} (key) VALUES (decode({fresh}, 'hex')) ON CONFLICT (only_row) DO NOTHING; \
             SELECT encode(key, 'hex') FROM {env_key}",
            env_key = self.tables.env_key(),
            fresh = lit(fresh),
        )
    }

    /// The key, created (32 random bytes) by the first gate that needs it. Looks first, so
    /// that a read-only standby can read it.
    pub(super) async fn env_key(&self, conn: &mut PgConnection) -> Result<EnvKey, sqlx::Error> {
        let existing = query_secret(conn, self.env_key_sql()).await?;
        if let Some(k) = existing
            .first()
            .map(|r| Cols(r).text(0))
            .transpose()?
            .and_then(|h| EnvKey::from_hex(&h))
        {
            return Ok(k);
        }
        let fresh = random_key().map_err(sqlx::Error::Io)?;
        let rows = query_secret(conn, self.create_env_key_sql(&hex::encode(fresh))).await?;
        rows.first()
            .map(|r| Cols(r).text(0))
            .transpose()?
            .and_then(|h| EnvKey::from_hex(&h))
            .ok_or_else(|| crate::sql::invariant("the --same-env key could not be read"))
    }

    /// SQL of [`Store::record`], for the replica `replica` on `host` with process id `pid`.
    fn record_sql(
        &self,
        release: &str,
        mine: &[(String, String)],
        replica: &str,
        host: &str,
        pid: u32,
    ) -> String {
        format!(
            "WITH mine (variable, fingerprint) AS (VALUES {mine}), \
             ref AS ( \
                 INSERT INTO {reference} AS r (lock_key, release, variable, fingerprint, replica, host, pid) \
                 SELECT {lock_key}, {release}, variable, fingerprint, {replica}, {host}, {pid} FROM mine \
                 ON CONFLICT (lock_key, release, variable) DO UPDATE SET fingerprint = r.fingerprint \
                 RETURNING r.variable, r.fingerprint, r.replica, r.set_at), \
             checked AS ( \
                 INSERT INTO {checks} AS c (lock_key, release, variable, replica, host, pid, agrees) \
                 SELECT {lock_key}, {release}, ref.variable, {replica}, {host}, {pid}, ref.fingerprint = mine.fingerprint \
                 FROM ref JOIN mine USING (variable) \
                 ON CONFLICT (lock_key, release, variable, replica) DO UPDATE \
                 SET host = excluded.host, pid = excluded.pid, agrees = excluded.agrees, checked_at = clock_timestamp() \
                 RETURNING 1) \
             SELECT ref.variable, (ref.fingerprint = mine.fingerprint)::text, ref.replica, \
                    to_char(ref.set_at AT TIME ZONE 'UTC', {TIME}), (SELECT count(*) FROM checked)::text \
             FROM ref JOIN mine USING (variable) ORDER BY ref.variable",
            mine = values(mine),
            reference = self.tables.env_reference(),
            checks = self.tables.env_checks(),
            lock_key = self.lock.key,
            release = lit(release),
            replica = lit(replica),
            host = lit(host),
        )
    }

    /// Sets the release's reference where it has none, records whether this replica agrees,
    /// and returns the reference of each variable: one statement. `ON CONFLICT DO UPDATE`
    /// (a no-op update) returns the reference even when another replica set it concurrently.
    pub(super) async fn record(
        &self,
        conn: &mut PgConnection,
        release: &str,
        mine: &[(String, String)],
        replica: &str,
        host: &str,
    ) -> Result<Vec<Reference>, sqlx::Error> {
        // Nothing to compare (a shared directory that could not be looked at, alone): an empty
        // VALUES list is no SQL.
        if mine.is_empty() {
            return Ok(Vec::new());
        }
        let sql = self.record_sql(release, mine, replica, host, std::process::id());
        references(&query_secret(conn, sql).await?)
    }

    /// SQL of [`Store::compare_without_recording`].
    fn compare_sql(&self, release: &str, mine: &[(String, String)]) -> String {
        format!(
            "WITH mine (variable, fingerprint) AS (VALUES {mine}) \
             SELECT r.variable, (r.fingerprint = mine.fingerprint)::text, r.replica, \
                    to_char(r.set_at AT TIME ZONE 'UTC', {TIME}) \
             FROM {reference} r JOIN mine USING (variable) WHERE r.lock_key = {lock_key} AND r.release = {release} \
             ORDER BY r.variable",
            mine = values(mine),
            reference = self.tables.env_reference(),
            lock_key = self.lock.key,
            release = lit(release),
        )
    }

    /// Compares with the release's reference without recording anything (a read-only
    /// standby). A variable without a reference is not returned.
    pub(super) async fn compare_without_recording(
        &self,
        conn: &mut PgConnection,
        release: &str,
        mine: &[(String, String)],
    ) -> Result<Vec<Reference>, sqlx::Error> {
        if mine.is_empty() {
            return Ok(Vec::new());
        }
        references(&query_secret(conn, self.compare_sql(release, mine)).await?)
    }

    /// SQL of [`Store::forget`].
    fn forget_sql(&self, release: &str) -> String {
        format!(
            "WITH r AS (DELETE FROM {reference} WHERE lock_key = {lock_key} AND release = {release} RETURNING 1), \
                  c AS (DELETE FROM {checks} WHERE lock_key = {lock_key} AND release = {release} RETURNING 1) \
             SELECT (SELECT count(*) FROM r)::text, (SELECT count(*) FROM c)::text",
            reference = self.tables.env_reference(),
            checks = self.tables.env_checks(),
            lock_key = self.lock.key,
            release = lit(release),
        )
    }

    /// Forgets the fingerprints of `release`; returns how many variables had a reference.
    pub(crate) async fn forget(
        &self,
        conn: &mut PgConnection,
        release: &str,
    ) -> Result<u64, sqlx::Error> {
        // No row: the tables do not exist yet, so nothing was forgotten.
        let rows = query_if_exists(conn, self.forget_sql(release)).await?;
        rows.first().map_or(Ok(0), |r| Cols(r).parse(0))
    }

    /// SQL of [`Store::replicas_and_limit`]: the server's settings as in
    /// [`super::fleet::NO_REPLICAS_AND_LIMIT`].
    fn replicas_and_limit_sql(&self, release: &str) -> String {
        format!(
            "SELECT (SELECT count(DISTINCT replica) FROM {checks} WHERE lock_key = {lock_key} AND release = {release})::text, \
                    current_setting('max_connections'), \
                    current_setting('superuser_reserved_connections'), \
                    coalesce(current_setting('reserved_connections', true), '0')",
            checks = self.tables.env_checks(),
            lock_key = self.lock.key,
            release = lit(release),
        )
    }

    /// In one round trip: how many replicas (by `application_name`) of `release` have recorded
    /// a comparison, and what the server allows non-superusers: `max_connections` less
    /// `superuser_reserved_connections` and, on 16+, `reserved_connections` (PostgreSQL,
    /// "Connections and Authentication").
    pub(super) async fn replicas_and_limit(
        &self,
        conn: &mut PgConnection,
        release: &str,
    ) -> Result<(u64, Limit), sqlx::Error> {
        replicas_and_limit(&query(conn, self.replicas_and_limit_sql(release)).await?)
    }

    /// SQL of [`Store::summary`]: `releases` are literals (`NULL` when `every_release`).
    fn summary_sql(&self, every_release: bool, releases: &str) -> String {
        format!(
            "SELECT r.release, r.variable, r.replica, r.host, to_char(r.set_at AT TIME ZONE 'UTC', {TIME_JSON}), \
                    (SELECT count(*) FROM {checks} c WHERE (c.lock_key, c.release, c.variable) = (r.lock_key, r.release, r.variable) AND c.agrees)::text, \
                    coalesce((SELECT json_agg(json_build_object('replica', c.replica, 'host', c.host, \
                                  'at', to_char(c.checked_at AT TIME ZONE 'UTC', {TIME_JSON})) ORDER BY c.checked_at) \
                              FROM {checks} c WHERE (c.lock_key, c.release, c.variable) = (r.lock_key, r.release, r.variable) \
                              AND NOT c.agrees)::text, '[]') \
             FROM {reference} r WHERE r.lock_key = {lock_key} AND ({every_release} OR r.release IN ({releases})) \
             ORDER BY r.set_at DESC, r.release, r.variable",
            checks = self.tables.env_checks(),
            reference = self.tables.env_reference(),
            lock_key = self.lock.key,
        )
    }

    /// What `status` shows: per release and variable, who set the reference, how many
    /// replicas agreed, and which disagreed. `releases`: only these (all when `None`).
    pub(crate) async fn summary(
        &self,
        conn: &mut PgConnection,
        releases: Option<&[String]>,
    ) -> Result<Vec<EnvCheck>, sqlx::Error> {
        let sql = match releases {
            Some([]) => return Ok(Vec::new()),
            Some(list) => self.summary_sql(false, &lits(list)),
            None => self.summary_sql(true, "NULL"),
        };
        query_if_exists(conn, sql)
            .await?
            .iter()
            .map(env_check)
            .collect()
    }
}

/// `values` as a list of literals: `E'a', E'b'`.
fn lits(values: &[String]) -> String {
    values.iter().map(|v| lit(v)).collect::<Vec<_>>().join(", ")
}

/// The row of [`Store::replicas_and_limit`] and [`super::fleet::NO_REPLICAS_AND_LIMIT`]: the
/// replicas, then the server's three settings.
pub(super) fn replicas_and_limit(rows: &[PgRow]) -> Result<(u64, Limit), sqlx::Error> {
    let row = one_row(rows)?;
    Ok((
        row.parse(0)?,
        Limit {
            max_connections: row.parse(1)?,
            superuser_reserved: row.parse(2)?,
            reserved: row.parse(3)?,
        },
    ))
}

/// This replica's `(variable, fingerprint)` pairs as the rows of a `VALUES` list.
fn values(mine: &[(String, String)]) -> String {
    let rows: Vec<String> = mine
        .iter()
        .map(|(v, f)| format!("({}, {})", lit(v), lit(f)))
        .collect();
    rows.join(", ")
}

/// One variable's reference as this replica's record returned it.
#[derive(Debug, Clone)]
pub(super) struct Reference {
    pub(super) variable: String,
    pub(super) agrees: bool,
    pub(super) replica: String,
    pub(super) set_at: String,
}

/// The rows of [`Store::record`] and [`Store::compare_without_recording`]: variable, agrees,
/// replica, set at.
fn references(rows: &[PgRow]) -> Result<Vec<Reference>, sqlx::Error> {
    rows.iter()
        .map(|r| {
            let row = Cols(r);
            Ok(Reference {
                variable: row.text(0)?,
                agrees: row.text(1)? == "true",
                replica: row.text(2)?,
                set_at: row.text(3)?,
            })
        })
        .collect()
}

/// A row of [`Store::summary`].
fn env_check(r: &PgRow) -> Result<EnvCheck, sqlx::Error> {
    let row = Cols(r);
    let t = |i: usize| row.text(i);
    let disagreed = serde_json::from_str(&t(6)?).map_err(|e| sqlx::Error::ColumnDecode {
        index: "6".into(),
        source: Box::new(e),
    })?;
    Ok(EnvCheck {
        release: t(0)?,
        variable: t(1)?,
        reference: ReplicaSeen {
            replica: t(2)?,
            host: t(3)?,
            at: t(4)?,
        },
        agreed: row.parse(5)?,
        disagreed,
    })
}

/// One compared variable of one release, as `status` shows it. The JSON field names are a
/// stable interface; no value or fingerprint is ever part of it.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct EnvCheck {
    /// The release.
    pub(crate) release: String,
    /// The variable's name.
    pub(crate) variable: String,
    /// The replica whose value became the reference (the release's first).
    pub(crate) reference: ReplicaSeen,
    /// How many replicas (by application name) last saw the same value.
    pub(crate) agreed: u32,
    /// The replicas whose last value differed, oldest first.
    pub(crate) disagreed: Vec<ReplicaSeen>,
}

/// A replica in the `--same-env` record.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct ReplicaSeen {
    /// Its `application_name`.
    pub(crate) replica: String,
    /// Its host name.
    pub(crate) host: String,
    /// When it set the reference or was last checked, RFC 3339 UTC.
    pub(crate) at: String,
}

#[cfg(test)]
mod tests {
    //! The text of each statement, whole, for fixed inputs: what the gate sends, to read and to
    //! diff. Their effect on a real database is tested in `tests/preflight.rs`, except
    //! [`Store::compare_without_recording`] (a read-only standby) and [`Store::summary`] of
    //! every release (no caller asks for it).

    use super::*;

    fn store() -> Store {
        Store::new("migrations_gate", &LockKey::from_id(42))
    }

    fn mine() -> Vec<(String, String)> {
        vec![("A".into(), "fa".into()), ("B".into(), "f'b".into())]
    }

    #[test]
    fn the_key_is_read_then_created_once_per_schema() {
        assert_eq!(
            store().env_key_sql(),
            "SELECT encode(key, 'hex') FROM \"migrations_gate\".env_key"
        );
        assert_eq!(
            store().create_env_key_sql("00ff"),
            "INSERT INTO \"migrations_gate\".env_key (key) VALUES (decode(E'00ff', 'hex')) ON \
            CONFLICT (only_row) DO NOTHING; SELECT encode(key, 'hex') \
            FROM \"migrations_gate\".env_key"
        );
    }

    #[test]
    fn record_sets_the_reference_and_records_the_check_in_one_statement() {
        assert_eq!(
            store().record_sql("r1", &mine(), "app/h1", "h1", 4242),
            "WITH mine (variable, fingerprint) AS (VALUES (E'A', E'fa'), (E'B', E'f''b')), ref AS \
            ( INSERT INTO \"migrations_gate\".env_reference AS r (lock_key, release, variable, \
            fingerprint, replica, host, pid) SELECT 42, E'r1', variable, fingerprint, E'app/h1', \
            E'h1', 4242 FROM mine ON CONFLICT (lock_key, release, variable) DO UPDATE \
            SET fingerprint = r.fingerprint RETURNING r.variable, r.fingerprint, r.replica, \
            r.set_at), checked AS ( INSERT INTO \"migrations_gate\".env_checks AS c (lock_key, \
            release, variable, replica, host, pid, agrees) \
            SELECT 42, E'r1', ref.variable, E'app/h1', E'h1', 4242, ref.fingerprint = \
            mine.fingerprint FROM ref JOIN mine USING (variable) ON CONFLICT (lock_key, release, \
            variable, replica) DO UPDATE SET host = excluded.host, pid = excluded.pid, agrees = \
            excluded.agrees, checked_at = clock_timestamp() \
            RETURNING 1) SELECT ref.variable, (ref.fingerprint = mine.fingerprint)::text, \
            ref.replica, to_char(ref.set_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS \"UTC\"'), \
            (SELECT count(*) FROM checked)::text FROM ref JOIN mine USING (variable) \
            ORDER BY ref.variable"
        );
    }

    #[test]
    fn compare_without_recording_only_reads_the_reference() {
        assert_eq!(
            store().compare_sql("r1", &mine()),
            "WITH mine (variable, fingerprint) AS (VALUES (E'A', E'fa'), (E'B', E'f''b')) \
            SELECT r.variable, (r.fingerprint = mine.fingerprint)::text, r.replica, \
            to_char(r.set_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS \"UTC\"') \
            FROM \"migrations_gate\".env_reference r JOIN mine USING (variable) \
            WHERE r.lock_key = 42 AND r.release = E'r1' ORDER BY r.variable"
        );
    }

    #[test]
    fn forget_deletes_the_releases_references_and_checks() {
        assert_eq!(
            store().forget_sql("r1"),
            "WITH r AS (DELETE FROM \"migrations_gate\".env_reference \
            WHERE lock_key = 42 AND release = E'r1' RETURNING 1), c AS (DELETE \
            FROM \"migrations_gate\".env_checks WHERE lock_key = 42 AND release = E'r1' \
            RETURNING 1) SELECT (SELECT count(*) FROM r)::text, (SELECT count(*) \
            FROM c)::text"
        );
    }

    #[test]
    fn replicas_and_limit_counts_the_releases_replicas_with_the_servers_settings() {
        assert_eq!(
            store().replicas_and_limit_sql("r1"),
            "SELECT (SELECT count(DISTINCT replica) FROM \"migrations_gate\".env_checks \
            WHERE lock_key = 42 AND release = E'r1')::text, current_setting('max_connections'), \
            current_setting('superuser_reserved_connections'), \
            coalesce(current_setting('reserved_connections', true), '0')"
        );
    }

    #[test]
    fn summary_filters_by_release_with_literals_only() {
        assert_eq!(
            store().summary_sql(false, &lits(&["r1".to_string(), "r2".to_string()])),
            "SELECT r.release, r.variable, r.replica, r.host, to_char(r.set_at AT TIME ZONE 'UTC', \
            'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), (SELECT count(*) \
            FROM \"migrations_gate\".env_checks c WHERE (c.lock_key, c.release, c.variable) = \
            (r.lock_key, r.release, r.variable) AND c.agrees)::text, \
            coalesce((SELECT json_agg(json_build_object('replica', c.replica, 'host', c.host, \
            'at', to_char(c.checked_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')) \
            ORDER BY c.checked_at) FROM \"migrations_gate\".env_checks c \
            WHERE (c.lock_key, c.release, c.variable) = (r.lock_key, r.release, r.variable) AND \
            NOT c.agrees)::text, '[]') FROM \"migrations_gate\".env_reference r \
            WHERE r.lock_key = 42 AND (false OR r.release IN (E'r1', E'r2')) \
            ORDER BY r.set_at DESC, r.release, r.variable"
        );
        assert_eq!(
            store().summary_sql(true, "NULL"),
            "SELECT r.release, r.variable, r.replica, r.host, to_char(r.set_at AT TIME ZONE 'UTC', \
            'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), (SELECT count(*) \
            FROM \"migrations_gate\".env_checks c WHERE (c.lock_key, c.release, c.variable) = \
            (r.lock_key, r.release, r.variable) AND c.agrees)::text, \
            coalesce((SELECT json_agg(json_build_object('replica', c.replica, 'host', c.host, \
            'at', to_char(c.checked_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')) \
            ORDER BY c.checked_at) FROM \"migrations_gate\".env_checks c \
            WHERE (c.lock_key, c.release, c.variable) = (r.lock_key, r.release, r.variable) AND \
            NOT c.agrees)::text, '[]') FROM \"migrations_gate\".env_reference r \
            WHERE r.lock_key = 42 AND (true OR r.release IN (NULL)) \
            ORDER BY r.set_at DESC, r.release, r.variable"
        );
    }
}
