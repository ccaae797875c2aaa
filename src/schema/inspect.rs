//! What exists of the ledger and what the connected role may do with it (`check`, and the
//! privileges a replica is told to ask for): read from the catalogs only, changing nothing.

use sqlx::postgres::PgConnection;

use super::{LEDGER_INDEX, Tables};
use crate::sql::{ident, lit, one_row, query};

impl Tables {
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
    pub(super) fn inspect_statement(&self) -> String {
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
