//! Every table the gate creates, in one schema (`--schema`, default `migrations_gate`): their
//! names, their DDL, how they are created, and the grants a role needs. A DBA reads them here.
//!
//! - `<schema>.ledger`: one row per migration attempt ([`crate::ledger`]); a unique index makes
//!   a second `done` row for the same release impossible.
//! - `<schema>.env_key`: the one `--same-env` HMAC key (a secret), `<schema>.env_reference`:
//!   each release's reference fingerprints, `<schema>.env_checks`: each replica's last
//!   comparison ([`crate::preflight`]). Created only by a replica that compares variables.
//!
//! Only what is missing is created, and nothing else: a role without `CREATE` on the database
//! can use a schema a DBA made for it (`CREATE SCHEMA {schema} AUTHORIZATION {role}`, or
//! `GRANT USAGE, CREATE ON SCHEMA`), and `CREATE SCHEMA IF NOT EXISTS` would check that privilege
//! even when the schema exists. No DDL ever runs inside a lock transaction.

use sqlx::postgres::PgConnection;

use crate::lock::LockKey;
use crate::sql::{ident, lit, one_row, query};

/// The gate's tables in one schema.
#[derive(Debug, Clone)]
pub(crate) struct Tables {
    schema: String,
}

/// The `--same-env` key as `<schema>.env_key` stores it (hex), read with the ledger on the fast
/// path; the preflight decodes it. Its `Debug` never shows it.
#[derive(Clone, Default)]
pub(crate) struct StoredKey(pub(crate) String);

impl std::fmt::Debug for StoredKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoredKey(..)")
    }
}

impl Tables {
    pub(crate) fn new(schema: &str) -> Tables {
        Tables {
            schema: schema.to_string(),
        }
    }

    /// `<schema>.ledger`.
    pub(crate) fn ledger(&self) -> String {
        format!("{}.ledger", ident(&self.schema))
    }

    /// `<schema>.env_key`.
    pub(crate) fn env_key(&self) -> String {
        format!("{}.env_key", ident(&self.schema))
    }

    /// `<schema>.env_reference`.
    pub(crate) fn env_reference(&self) -> String {
        format!("{}.env_reference", ident(&self.schema))
    }

    /// `<schema>.env_checks`.
    pub(crate) fn env_checks(&self) -> String {
        format!("{}.env_checks", ident(&self.schema))
    }

    /// Creates what is missing of the schema, the ledger and its index.
    pub(crate) async fn create_ledger(&self, conn: &mut PgConnection) -> Result<(), sqlx::Error> {
        let schema = ident(&self.schema);
        let table = self.ledger();
        let index = format!("{schema}.ledger_one_done_per_release");
        let objects = [
            (
                format!("to_regnamespace({})::text", lit(&schema)),
                format!("CREATE SCHEMA IF NOT EXISTS {schema};"),
            ),
            (
                format!("to_regclass({})", lit(&table)),
                format!(
                    "CREATE TABLE IF NOT EXISTS {table} (
                 id          bigserial PRIMARY KEY,
                 lock_key    bigint NOT NULL,
                 lock_name   text NOT NULL,
                 release     text,
                 outcome     text NOT NULL CHECK (outcome IN ('running', 'done', 'failed', 'abandoned')),
                 holder      text NOT NULL,
                 host        text NOT NULL,
                 pid         integer NOT NULL,
                 started_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
                 finished_at timestamptz,
                 exit_code   integer,
                 detail      text,
                 heartbeat_at timestamptz,
                 fence_secs  integer NOT NULL DEFAULT 0
             );"
                ),
            ),
            (
                format!("to_regclass({})", lit(&index)),
                format!(
                    "CREATE UNIQUE INDEX IF NOT EXISTS ledger_one_done_per_release \
                     ON {table} (lock_key, release) WHERE outcome = 'done';"
                ),
            ),
        ];
        self.create_missing(conn, &objects).await
    }

    /// Creates the `--same-env` tables that are missing (the ledger made the schema).
    pub(crate) async fn create_preflight(
        &self,
        conn: &mut PgConnection,
    ) -> Result<(), sqlx::Error> {
        let key = format!(
            "CREATE TABLE IF NOT EXISTS {} (
                 only_row   boolean PRIMARY KEY DEFAULT true CHECK (only_row),
                 key        bytea NOT NULL,
                 created_at timestamptz NOT NULL DEFAULT clock_timestamp()
             );",
            self.env_key()
        );
        let reference = format!(
            "CREATE TABLE IF NOT EXISTS {} (
                 lock_key bigint NOT NULL, release text NOT NULL, variable text NOT NULL,
                 fingerprint text NOT NULL,
                 replica text NOT NULL, host text NOT NULL, pid integer NOT NULL,
                 set_at timestamptz NOT NULL DEFAULT clock_timestamp(),
                 PRIMARY KEY (lock_key, release, variable)
             );",
            self.env_reference()
        );
        let checks = format!(
            "CREATE TABLE IF NOT EXISTS {} (
                 lock_key bigint NOT NULL, release text NOT NULL, variable text NOT NULL,
                 replica text NOT NULL, host text NOT NULL, pid integer NOT NULL,
                 agrees boolean NOT NULL,
                 checked_at timestamptz NOT NULL DEFAULT clock_timestamp(),
                 PRIMARY KEY (lock_key, release, variable, replica)
             );",
            self.env_checks()
        );
        let regclass = |table: String| format!("to_regclass({})", lit(&table));
        let objects = [
            (regclass(self.env_key()), key),
            (regclass(self.env_reference()), reference),
            (regclass(self.env_checks()), checks),
        ];
        self.create_missing(conn, &objects).await
    }

    /// What to tell an operator whose role may not create the ledger: the grants, as SQL a DBA
    /// can run once (README "Privileges").
    pub(crate) fn ledger_grants(&self, role: &str, at: &str, denied: &str) -> String {
        let schema = ident(&self.schema);
        let role = ident(role);
        format!(
            "the role {role} may not create the gate's ledger {} at {at} ({denied}): ask a DBA to run once \
             `CREATE SCHEMA {schema} AUTHORIZATION {role};` (or, if the schema exists, \
             `GRANT USAGE, CREATE ON SCHEMA {schema} TO {role};`), or pass --schema naming a schema where it may create tables; see \"Privileges\" in the README",
            self.ledger()
        )
    }

    /// What to tell an operator whose role may not create or write the `--same-env` tables.
    pub(crate) fn preflight_grants(&self, denied: &str) -> String {
        let schema = ident(&self.schema);
        format!(
            "the role may not create or write the gate's --same-env tables in schema {schema} ({denied}): \
             ask a DBA to `GRANT USAGE, CREATE ON SCHEMA {schema} TO <role>;` (see \"Privileges\" in the README)"
        )
    }

    /// Creates each object of `objects` that does not exist yet, and nothing else: `(check, ddl)`,
    /// where `check` is a SQL expression that is NULL while the object is missing. Concurrent
    /// gates with different lock names may race here, so the DDL runs in one transaction under
    /// an advisory lock of its own, one per schema (the ledger's and the preflight tables next to
    /// it).
    async fn create_missing(
        &self,
        conn: &mut PgConnection,
        objects: &[(String, String)],
    ) -> Result<(), sqlx::Error> {
        let checks: Vec<String> = objects
            .iter()
            .map(|(check, _)| format!("({check} IS NULL)::text"))
            .collect();
        let rows = query(conn, format!("SELECT {}", checks.join(", "))).await?;
        let row = one_row(&rows)?;
        let mut missing = Vec::new();
        for (i, (_, ddl)) in objects.iter().enumerate() {
            if row.text(i)? == "true" {
                missing.push(ddl.as_str());
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        let name = format!("migrations-gate ledger ddl {}", self.schema);
        let ddl_key = LockKey::from_name(&name).key;
        let sql = format!(
            "BEGIN; SELECT pg_advisory_xact_lock({ddl_key});{}COMMIT;",
            missing.concat()
        );
        query(conn, sql).await.map(|_| ())
    }
}
