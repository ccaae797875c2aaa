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

    /// What exists of the ledger, and what the connected role may do with it. Read from the
    /// catalogs and the `has_*_privilege` functions only, never through the schema itself
    /// (`to_regclass` would need `USAGE` on it): works without any privilege, changes nothing.
    pub(crate) async fn inspect(&self, conn: &mut PgConnection) -> Result<Inspected, sqlx::Error> {
        let sql = self.inspect_statement();
        let rows = query(conn, sql).await?;
        let row = one_row(&rows)?;
        let yes = |i: usize| -> Result<bool, sqlx::Error> { Ok(row.text(i)? == "true") };
        Ok(Inspected {
            schema: yes(0)?,
            table: yes(1)?,
            index: yes(2)?,
            sequence: row.opt(3)?,
            create_on_database: yes(4)?,
            usage_on_schema: yes(5)?,
            create_on_schema: yes(6)?,
            owns_table: yes(7)?,
            select: yes(8)?,
            insert: yes(9)?,
            update: yes(10)?,
            delete: yes(11)?,
            usage_on_sequence: yes(12)?,
        })
    }

    /// The statement of [`Tables::inspect`].
    fn inspect_statement(&self) -> String {
        format!(
            "SELECT (n.oid IS NOT NULL)::text, (t.oid IS NOT NULL)::text, \
                    (i.oid IS NOT NULL)::text, s.relname, \
                    has_database_privilege(current_database(), 'CREATE')::text, \
                    coalesce(has_schema_privilege(n.oid, 'USAGE'), false)::text, \
                    coalesce(has_schema_privilege(n.oid, 'CREATE'), false)::text, \
                    coalesce(pg_has_role(t.relowner, 'USAGE'), false)::text, \
                    coalesce(has_table_privilege(t.oid, 'SELECT'), false)::text, \
                    coalesce(has_table_privilege(t.oid, 'INSERT'), false)::text, \
                    coalesce(has_table_privilege(t.oid, 'UPDATE'), false)::text, \
                    coalesce(has_table_privilege(t.oid, 'DELETE'), false)::text, \
                    coalesce(has_sequence_privilege(s.oid, 'USAGE, UPDATE'), false)::text \
             FROM (SELECT 1) one \
             LEFT JOIN pg_namespace n ON n.nspname = {schema} \
             LEFT JOIN pg_class t ON t.relnamespace = n.oid AND t.relname = 'ledger' AND t.relkind IN ('r', 'p') \
             LEFT JOIN pg_class i ON i.relnamespace = n.oid AND i.relname = {index} AND i.relkind IN ('i', 'I') \
             LEFT JOIN LATERAL (SELECT c.oid, c.relname FROM pg_depend d JOIN pg_class c ON c.oid = d.objid \
                 WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass \
                 AND d.refobjid = t.oid AND d.deptype = 'a' AND c.relkind = 'S' LIMIT 1) s ON true",
            schema = lit(&self.schema),
            index = lit(LEDGER_INDEX),
        )
    }

    /// Every privilege `role` needs for what [`Tables::create_ledger`] and the ledger's
    /// statements ([`crate::ledger`]) would do with what `found` says exists, in `database`:
    /// whatever is missing is created on first use, so a missing schema needs `CREATE` on the
    /// database, a missing table `CREATE` on the schema; an existing table needs read and write.
    /// A missing index is created only by a replica without a release (`with_release`: one with
    /// a release that finds the table never runs [`Tables::create_ledger`]).
    pub(crate) fn needs(
        &self,
        found: &Inspected,
        role: &str,
        database: &str,
        with_release: bool,
    ) -> Vec<Need> {
        let schema = ident(&self.schema);
        let table = self.ledger();
        let need = |privilege: String, needed_for: &str, required, granted, grant: String| Need {
            privilege,
            needed_for: needed_for.to_string(),
            required,
            granted,
            grant,
        };
        if !found.schema {
            let needed_for = format!(
                "to create schema {schema} and its ledger on first use, unless a DBA creates the schema for the role"
            );
            return vec![need(
                format!("CREATE on database {}", ident(database)),
                &needed_for,
                true,
                found.create_on_database,
                self.create_schema_for(role),
            )];
        }
        let usage = if found.table {
            "USAGE"
        } else {
            "USAGE, CREATE"
        };
        let mut needs = vec![need(
            format!("USAGE on schema {schema}"),
            "to reach the ledger",
            true,
            found.usage_on_schema,
            self.grant_on_schema(usage, role),
        )];
        if !found.table {
            needs.push(need(
                format!("CREATE on schema {schema}"),
                "to create the ledger on first use",
                true,
                found.create_on_schema,
                self.grant_on_schema(usage, role),
            ));
            return needs;
        }
        for (privilege, needed_for, required, granted) in [
            (
                "SELECT",
                "to read which releases are done",
                true,
                found.select,
            ),
            ("INSERT", "to record an attempt", true, found.insert),
            (
                "UPDATE",
                "to record heartbeats and outcomes",
                true,
                found.update,
            ),
            ("DELETE", "for reset only", false, found.delete),
        ] {
            needs.push(need(
                format!("{privilege} on {table}"),
                needed_for,
                required,
                granted,
                self.grant_on_ledger(privilege, role),
            ));
        }
        if let Some(sequence) = &found.sequence {
            let sequence = format!("{schema}.{}", ident(sequence));
            needs.push(need(
                format!("USAGE on sequence {sequence}"),
                "to number attempts",
                true,
                found.usage_on_sequence,
                format!("GRANT USAGE ON SEQUENCE {sequence} TO {};", ident(role)),
            ));
        }
        if !found.index {
            needs.push(need(
                format!("ownership of {table} and CREATE on schema {schema}"),
                "to create the ledger's missing unique index, as a replica without --release does on first use, unless a DBA creates it",
                !with_release,
                found.owns_table && found.create_on_schema,
                self.ledger_index(),
            ));
        }
        needs
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

/// What exists of the ledger, and what the connected role may do with it
/// ([`Tables::inspect`]); [`Tables::needs`] turns it into privileges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Inspected {
    /// The schema exists.
    pub(crate) schema: bool,
    /// `<schema>.ledger` exists.
    pub(crate) table: bool,
    /// Its unique index exists.
    pub(crate) index: bool,
    /// The name of its `id` sequence (`bigserial`), when it has one.
    pub(crate) sequence: Option<String>,
    create_on_database: bool,
    usage_on_schema: bool,
    create_on_schema: bool,
    owns_table: bool,
    select: bool,
    insert: bool,
    update: bool,
    delete: bool,
    usage_on_sequence: bool,
}

impl Inspected {
    /// Whether the role may read the ledger's rows (for the release's state).
    pub(crate) fn readable(&self) -> bool {
        self.table && self.usage_on_schema && self.select
    }
}

/// One privilege the gate needs, whether the role has it, and the statement that grants it.
/// The JSON field names are a stable interface (`check --json`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub(crate) struct Need {
    /// The privilege and its object: `INSERT on "migrations_gate".ledger`.
    pub(crate) privilege: String,
    /// What the gate does with it.
    pub(crate) needed_for: String,
    /// Whether `migrate` and `run` need it (`false`: only `reset` does, or only a migration
    /// that runs as another role, or only a replica without a release).
    pub(crate) required: bool,
    /// Whether the role has it.
    pub(crate) granted: bool,
    /// The statement a DBA runs (once) to give it.
    pub(crate) grant: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tables() -> Tables {
        Tables::new("migrations_gate")
    }

    /// The checks and the DDL of the ledger, of `tool_locks` and of the `--same-env` tables, each
    /// as sent when all of it is missing. Effect: tests/privileges.rs (a role without CREATE on
    /// the database uses the schema a DBA made for it; a ledger that lost its index names the
    /// CREATE INDEX), tests/gate.rs (first use creates the ledger), tests/recovery.rs
    /// (`tool_locks`) and tests/preflight.rs (the `--same-env` tables, in transaction scope too).
    #[test]
    fn create_statements() {
        let t = tables();
        for (name, objects) in [
            ("ledger", t.ledger_objects()),
            ("tool_locks", t.tool_locks_objects()),
            ("preflight", t.preflight_objects()),
        ] {
            insta::assert_snapshot!(
                format!("missing_{name}"),
                crate::sql::pretty(&objects.missing)
            );
            let ddl: Vec<&str> = objects.ddl.iter().map(String::as_str).collect();
            insta::assert_snapshot!(format!("create_{name}"), t.create_statement(&ddl));
        }
    }

    /// No effect test adds the `app` column to a ledger made before 0.2; tests/gate.rs and
    /// tests/neighbours.rs run the first statement on every would-be holder's ledger.
    #[test]
    fn app_column_statements() {
        let t = tables();
        insta::assert_snapshot!("app_column", crate::sql::pretty(&t.app_column_statement()));
        insta::assert_snapshot!("add_app_column", t.add_app_column_statement());
        insta::assert_snapshot!("add_app_column_rollback", ROLLBACK);
    }

    /// Effect: tests/check.rs (a least-privilege role on a fresh database gets the grant to ask
    /// for; a DBA-made ledger with read-only rights names each missing grant).
    #[test]
    fn inspect_statement_whole() {
        insta::assert_snapshot!(crate::sql::pretty(&tables().inspect_statement()));
    }
}
