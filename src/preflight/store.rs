//! The rows of the preflight tables next to the ledger (their DDL is in [`crate::schema`]): the
//! key (`<schema>.env_key`), each release's reference fingerprints (`<schema>.env_reference`)
//! and each replica's last comparison (`<schema>.env_checks`).

use sqlx::postgres::{PgConnection, PgRow};

use super::fingerprint::{EnvKey, random_key};
use crate::lock::LockKey;
use crate::schema::Tables;
use crate::sql::{Cols, lit, query_if_exists, query_secret};

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

    fn reference(&self) -> String {
        self.tables.env_reference()
    }

    fn checks(&self) -> String {
        self.tables.env_checks()
    }

    /// Creates the tables that are missing ([`Tables::create_preflight`]).
    pub(super) async fn ensure(&self, conn: &mut PgConnection) -> Result<(), sqlx::Error> {
        self.tables.create_preflight(conn).await
    }

    /// The key, created (32 random bytes) by the first gate that needs it. Looks first, so
    /// that a read-only standby can read it.
    pub(super) async fn key(&self, conn: &mut PgConnection) -> Result<EnvKey, sqlx::Error> {
        let table = self.tables.env_key();
        let existing =
            query_secret(conn, format!("SELECT encode(key, 'hex') FROM {table}")).await?;
        if let Some(k) = existing
            .first()
            .map(|r| Cols(r).text(0))
            .transpose()?
            .and_then(|h| EnvKey::from_hex(&h))
        {
            return Ok(k);
        }
        let fresh = random_key().map_err(sqlx::Error::Io)?;
        let rows = query_secret(
            conn,
            format!(
                "INSERT INTO {table} (key) VALUES (decode({}, 'hex')) ON CONFLICT (only_row) DO NOTHING; \
                 SELECT encode(key, 'hex') FROM {table}",
                lit(&hex::encode(fresh))
            ),
        )
        .await?;
        rows.first()
            .map(|r| Cols(r).text(0))
            .transpose()?
            .and_then(|h| EnvKey::from_hex(&h))
            .ok_or_else(|| crate::sql::invariant("the --same-env key could not be read"))
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
        let (key, release, replica) = (self.lock.key, lit(release), lit(replica));
        let host = lit(host);
        let pid = std::process::id();
        let sql = format!(
            "WITH mine (variable, fingerprint) AS (VALUES {values}), \
             ref AS ( \
                 INSERT INTO {reference} AS r (lock_key, release, variable, fingerprint, replica, host, pid) \
                 SELECT {key}, {release}, variable, fingerprint, {replica}, {host}, {pid} FROM mine \
                 ON CONFLICT (lock_key, release, variable) DO UPDATE SET fingerprint = r.fingerprint \
                 RETURNING r.variable, r.fingerprint, r.replica, r.set_at), \
             checked AS ( \
                 INSERT INTO {checks} AS c (lock_key, release, variable, replica, host, pid, agrees) \
                 SELECT {key}, {release}, ref.variable, {replica}, {host}, {pid}, ref.fingerprint = mine.fingerprint \
                 FROM ref JOIN mine USING (variable) \
                 ON CONFLICT (lock_key, release, variable, replica) DO UPDATE \
                 SET host = excluded.host, pid = excluded.pid, agrees = excluded.agrees, checked_at = clock_timestamp() \
                 RETURNING 1) \
             SELECT ref.variable, (ref.fingerprint = mine.fingerprint)::text, ref.replica, \
                    to_char(ref.set_at AT TIME ZONE 'UTC', {TIME}), (SELECT count(*) FROM checked)::text \
             FROM ref JOIN mine USING (variable) ORDER BY ref.variable",
            values = values(mine),
            reference = self.reference(),
            checks = self.checks(),
        );
        references(&query_secret(conn, sql).await?)
    }

    /// Compares with the release's reference without recording anything (a read-only
    /// standby). A variable without a reference is not returned.
    pub(super) async fn compare(
        &self,
        conn: &mut PgConnection,
        release: &str,
        mine: &[(String, String)],
    ) -> Result<Vec<Reference>, sqlx::Error> {
        if mine.is_empty() {
            return Ok(Vec::new());
        }
        let sql = format!(
            "WITH mine (variable, fingerprint) AS (VALUES {}) \
             SELECT r.variable, (r.fingerprint = mine.fingerprint)::text, r.replica, \
                    to_char(r.set_at AT TIME ZONE 'UTC', {TIME}) \
             FROM {} r JOIN mine USING (variable) WHERE r.lock_key = {} AND r.release = {} \
             ORDER BY r.variable",
            values(mine),
            self.reference(),
            self.lock.key,
            lit(release)
        );
        references(&query_secret(conn, sql).await?)
    }

    /// Forgets the fingerprints of `release`; returns how many variables had a reference.
    pub(crate) async fn forget(
        &self,
        conn: &mut PgConnection,
        release: &str,
    ) -> Result<u64, sqlx::Error> {
        let sql = format!(
            "WITH r AS (DELETE FROM {} WHERE lock_key = {key} AND release = {rel} RETURNING 1), \
                  c AS (DELETE FROM {} WHERE lock_key = {key} AND release = {rel} RETURNING 1) \
             SELECT (SELECT count(*) FROM r)::text, (SELECT count(*) FROM c)::text",
            self.reference(),
            self.checks(),
            key = self.lock.key,
            rel = lit(release),
        );
        // No row: the tables do not exist yet, so nothing was forgotten.
        let rows = query_if_exists(conn, sql).await?;
        rows.first().map_or(Ok(0), |r| Cols(r).parse(0))
    }

    /// SQL: a subquery of how many replicas (by `application_name`) of `release` have
    /// recorded a comparison.
    pub(super) fn replicas(&self, release: &str) -> String {
        format!(
            "SELECT count(DISTINCT replica) FROM {} WHERE lock_key = {} AND release = {}",
            self.checks(),
            self.lock.key,
            lit(release),
        )
    }

    /// What `status` shows: per release and variable, who set the reference, how many
    /// replicas agreed, and which disagreed. `releases`: only these (all when `None`).
    pub(crate) async fn summary(
        &self,
        conn: &mut PgConnection,
        releases: Option<&[String]>,
    ) -> Result<Vec<EnvCheck>, sqlx::Error> {
        let filter = match releases {
            Some([]) => return Ok(Vec::new()),
            Some(list) => format!(
                " AND r.release IN ({})",
                list.iter().map(|r| lit(r)).collect::<Vec<_>>().join(", ")
            ),
            None => String::new(),
        };
        let sql = format!(
            "SELECT r.release, r.variable, r.replica, r.host, to_char(r.set_at AT TIME ZONE 'UTC', {TIME_JSON}), \
                    (SELECT count(*) FROM {checks} c WHERE (c.lock_key, c.release, c.variable) = (r.lock_key, r.release, r.variable) AND c.agrees)::text, \
                    coalesce((SELECT json_agg(json_build_object('replica', c.replica, 'host', c.host, \
                                  'at', to_char(c.checked_at AT TIME ZONE 'UTC', {TIME_JSON})) ORDER BY c.checked_at) \
                              FROM {checks} c WHERE (c.lock_key, c.release, c.variable) = (r.lock_key, r.release, r.variable) \
                              AND NOT c.agrees)::text, '[]') \
             FROM {reference} r WHERE r.lock_key = {key}{filter} ORDER BY r.set_at DESC, r.release, r.variable",
            checks = self.checks(),
            reference = self.reference(),
            key = self.lock.key,
        );
        query_if_exists(conn, sql)
            .await?
            .iter()
            .map(env_check)
            .collect()
    }
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

/// The rows of [`Store::record`] and [`Store::compare`]: variable, agrees, replica, set at.
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
