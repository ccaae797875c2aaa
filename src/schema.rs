//! Every table the gate creates, in one schema (`--schema`, default `migrations_gate`): their
//! names, their DDL, how they are created, and the grants a role needs. A DBA reads them here.
//!
//! - `<schema>.ledger`: one row per migration attempt ([`crate::ledger`]); a unique index makes
//!   a second `done` row for the same release impossible. Its `app` column (added in 0.2) holds
//!   the fingerprint of the application each attempt migrated for ([`crate::application`]); a
//!   ledger made before it gets it from its owner's first gate ([`Tables::ensure_app_column`]).
//! - `<schema>.env_key`: the one `--same-env` HMAC key (a secret), `<schema>.env_reference`:
//!   each release's reference fingerprints, `<schema>.env_checks`: each replica's last
//!   comparison ([`crate::preflight`]). Created only by a replica that compares variables.
//! - `<schema>.tool_locks`: each lock of a migration tool that a holder found held before it
//!   migrated: released (stale, taken by an earlier attempt) or left alone, with the attempt
//!   that found it ([`crate::tools`]). Created by the first holder that looks.
//!
//! Only what is missing is created, and nothing else: a role without `CREATE` on the database
//! can use a schema a DBA made for it (`CREATE SCHEMA {schema} AUTHORIZATION {role}`, or
//! `GRANT USAGE, CREATE ON SCHEMA`), and `CREATE SCHEMA IF NOT EXISTS` would check that privilege
//! even when the schema exists. No DDL ever runs inside a lock transaction.

use sqlx::postgres::PgConnection;

use crate::lock::LockKey;
use crate::sql::{ident, lit, one_row, query};

/// The ledger's unique index (one `done` row per lock and release).
const LEDGER_INDEX: &str = "ledger_one_done_per_release";

/// Ends the transaction of a failed [`Tables::ensure_app_column`].
const ROLLBACK: &str = "ROLLBACK";

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

    /// `<schema>.tool_locks`.
    pub(crate) fn tool_locks(&self) -> String {
        format!("{}.tool_locks", ident(&self.schema))
    }

    /// Creates `<schema>.tool_locks` if it is missing (the ledger made the schema).
    pub(crate) async fn create_tool_locks(
        &self,
        conn: &mut PgConnection,
    ) -> Result<(), sqlx::Error> {
        self.create_missing(conn, &self.tool_locks_objects()).await
    }

    /// What [`Tables::create_tool_locks`] creates.
    fn tool_locks_objects(&self) -> Objects {
        let table = format!(
            "CREATE TABLE IF NOT EXISTS {} (
                 attempt_id  bigint NOT NULL,
                 tool        text NOT NULL,
                 lock_table  text NOT NULL,
                 locked_by   text NOT NULL,
                 locked_at   text,
                 taken_in    bigint,
                 released    boolean NOT NULL,
                 seen_at     timestamptz NOT NULL DEFAULT clock_timestamp()
             );",
            self.tool_locks()
        );
        Objects {
            missing: format!(
                "SELECT (to_regclass({}) IS NULL)::text",
                lit(&self.tool_locks())
            ),
            ddl: vec![table],
        }
    }

    /// The DDL of the ledger's unique index: one `done` row per lock and release.
    fn ledger_index(&self) -> String {
        format!(
            "CREATE UNIQUE INDEX IF NOT EXISTS {LEDGER_INDEX} \
             ON {} (lock_key, release) WHERE outcome = 'done';",
            self.ledger()
        )
    }

    /// Creates what is missing of the schema, the ledger and its index.
    pub(crate) async fn create_ledger(&self, conn: &mut PgConnection) -> Result<(), sqlx::Error> {
        self.create_missing(conn, &self.ledger_objects()).await
    }

    /// What [`Tables::create_ledger`] creates: the schema, the ledger, its index.
    fn ledger_objects(&self) -> Objects {
        let schema = ident(&self.schema);
        let table = self.ledger();
        let missing = format!(
            "SELECT (to_regnamespace({schema_name})::text IS NULL)::text, \
                    (to_regclass({table_name}) IS NULL)::text, \
                    (to_regclass({index_name}) IS NULL)::text",
            schema_name = lit(&schema),
            table_name = lit(&table),
            index_name = lit(&format!("{schema}.{LEDGER_INDEX}")),
        );
        let ddl = vec![
            format!("CREATE SCHEMA IF NOT EXISTS {schema};"),
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
                 fence_secs  integer NOT NULL DEFAULT 0,
                 app         text
             );"
            ),
            self.ledger_index(),
        ];
        Objects { missing, ddl }
    }

    /// Whether the ledger has its `app` column, adding it when it is missing and the role owns the
    /// table (`ALTER TABLE` is the owner's). Runs before the lock is tried, never inside a lock
    /// transaction; the `ALTER` waits at most a second for its lock (a holder's lock transaction
    /// may be reading the ledger: then a later replica adds it). `false`: attempts are recorded
    /// without a fingerprint, and followers compare nothing.
    pub(crate) async fn ensure_app_column(
        &self,
        conn: &mut PgConnection,
    ) -> Result<bool, sqlx::Error> {
        let rows = query(conn, self.app_column_statement()).await?;
        let row = one_row(&rows)?;
        if row.text(0)? == "true" {
            return Ok(true);
        }
        if row.text(1)? != "true" {
            return Ok(false);
        }
        match query(conn, self.add_app_column_statement()).await {
            Ok(_) => Ok(true),
            Err(sqlx::Error::Database(_)) => {
                // The transaction failed (lock timeout, privileges): end it, and go on without.
                query(conn, ROLLBACK.into()).await.map(|_| false)
            }
            Err(e) => Err(e),
        }
    }

    /// The first statement of [`Tables::ensure_app_column`]: whether the ledger has its `app`
    /// column, and whether the role owns the ledger.
    fn app_column_statement(&self) -> String {
        let table = self.ledger();
        format!(
            "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass({t}) \
                                AND attname = 'app' AND NOT attisdropped)::text, \
                        coalesce((SELECT pg_has_role(relowner, 'USAGE') FROM pg_class \
                                  WHERE oid = to_regclass({t})), false)::text",
            t = lit(&table)
        )
    }

    /// The statement of [`Tables::ensure_app_column`] that adds the column, waiting at most a
    /// second for its lock.
    fn add_app_column_statement(&self) -> String {
        let table = self.ledger();
        format!(
            "BEGIN; SET LOCAL lock_timeout = '1s'; ALTER TABLE {table} ADD COLUMN IF NOT EXISTS app text; COMMIT;"
        )
    }

    /// Creates the `--same-env` tables that are missing (the ledger made the schema).
    pub(crate) async fn create_preflight(
        &self,
        conn: &mut PgConnection,
    ) -> Result<(), sqlx::Error> {
        self.create_missing(conn, &self.preflight_objects()).await
    }

    /// What [`Tables::create_preflight`] creates.
    fn preflight_objects(&self) -> Objects {
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
        let missing = format!(
            "SELECT (to_regclass({}) IS NULL)::text, (to_regclass({}) IS NULL)::text, \
                    (to_regclass({}) IS NULL)::text",
            lit(&self.env_key()),
            lit(&self.env_reference()),
            lit(&self.env_checks()),
        );
        Objects {
            missing,
            ddl: vec![key, reference, checks],
        }
    }

    /// What to tell an operator whose role may not create the ledger: the grants, as SQL a DBA
    /// can run once (README "Privileges").
    pub(crate) fn ledger_grants(&self, role: &str, at: &str, denied: &str) -> String {
        format!(
            "the role {} may not create the gate's ledger {} at {at} ({denied}): ask a DBA to run once \
             `{}` (or, if the schema exists, `{}`), or pass --schema naming a schema where it may create tables; see \"Privileges\" in the README",
            ident(role),
            self.ledger(),
            self.create_schema_for(role),
            self.grant_on_schema("USAGE, CREATE", role),
        )
    }

    /// What to tell an operator whose role may not create the ledger's missing unique index:
    /// only the table's owner may (PostgreSQL, `CREATE INDEX`), whatever else is granted.
    pub(crate) fn index_grants(&self, role: &str, at: &str, denied: &str) -> String {
        format!(
            "the gate's ledger {} at {at} has lost its unique index, and the role {} may not create it ({denied}): only the table's owner may; ask the owner or a DBA to run once `{}`",
            self.ledger(),
            ident(role),
            self.ledger_index(),
        )
    }

    /// `CREATE SCHEMA <schema> AUTHORIZATION <role>;`: the schema, owned by the role, for a role
    /// without `CREATE` on the database (the recommended set-up).
    pub(crate) fn create_schema_for(&self, role: &str) -> String {
        format!(
            "CREATE SCHEMA {} AUTHORIZATION {};",
            ident(&self.schema),
            ident(role)
        )
    }

    /// `GRANT <privileges> ON SCHEMA <schema> TO <role>;`.
    pub(crate) fn grant_on_schema(&self, privileges: &str, role: &str) -> String {
        format!(
            "GRANT {privileges} ON SCHEMA {} TO {};",
            ident(&self.schema),
            ident(role)
        )
    }

    /// `GRANT <privilege> ON <schema>.ledger TO <role>;`.
    pub(crate) fn grant_on_ledger(&self, privilege: &str, role: &str) -> String {
        format!("GRANT {privilege} ON {} TO {};", self.ledger(), ident(role))
    }

    /// What to tell an operator whose role may not create or write the `--same-env` tables.
    pub(crate) fn preflight_grants(&self, denied: &str) -> String {
        let schema = ident(&self.schema);
        format!(
            "the role may not create or write the gate's --same-env tables in schema {schema} ({denied}): \
             ask a DBA to `GRANT USAGE, CREATE ON SCHEMA {schema} TO <role>;` (see \"Privileges\" in the README)"
        )
    }

    /// Creates each object of `objects` that does not exist yet, and nothing else. Concurrent
    /// gates with different lock names may race here, so the DDL runs in one transaction under
    /// an advisory lock of its own, one per schema (the ledger's and the preflight tables next to
    /// it).
    async fn create_missing(
        &self,
        conn: &mut PgConnection,
        objects: &Objects,
    ) -> Result<(), sqlx::Error> {
        let rows = query(conn, objects.missing.clone()).await?;
        let row = one_row(&rows)?;
        let mut missing = Vec::new();
        for (i, ddl) in objects.ddl.iter().enumerate() {
            if row.text(i)? == "true" {
                missing.push(ddl.as_str());
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        query(conn, self.create_statement(&missing))
            .await
            .map(|_| ())
    }

    /// The statement of [`Tables::create_missing`] that creates the `missing` objects: their DDL
    /// (each statement whole), in one transaction under the schema's own advisory lock.
    fn create_statement(&self, missing: &[&str]) -> String {
        let name = format!("migrations-gate ledger ddl {}", self.schema);
        let ddl_key = LockKey::from_name(&name).key;
        format!(
            "BEGIN; SELECT pg_advisory_xact_lock({ddl_key});{}COMMIT;",
            missing.concat()
        )
    }
}

/// Objects that [`Tables::create_missing`] creates if they are missing.
struct Objects {
    /// The statement that says, for each object in order, whether it is missing (`true`).
    missing: String,
    /// The DDL of each, a whole statement.
    ddl: Vec<String>,
}

mod inspect;

pub(crate) use inspect::{Inspected, Need};

#[cfg(test)]
mod tests;
