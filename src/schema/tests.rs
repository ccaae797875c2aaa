//! Unit tests of [`super`]: the text of its statements (snapshots in `snapshots/`) and its
//! pure parts.

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
