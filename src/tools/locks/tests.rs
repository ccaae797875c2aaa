//! Unit tests of [`super`]: the text of its statements (snapshots in `snapshots/`) and its
//! pure parts.

use super::*;

/// The statements that name the held locks each tool's table has, recorded in `tool_locks`
/// or not. Effect: tests/recovery.rs (a tool lock taken outside the gate is left alone and
/// named, and `status` shows it); knex's has no effect test.
#[test]
fn name_held_statements() {
    for tool in TOOLS {
        let table = format!("\"public\".\"{}\"", tool.table());
        let shown = format!("public.{}", tool.table());
        insta::assert_snapshot!(
            format!("held_{}", tool.name()),
            crate::sql::pretty(&name_held_statement(tool, (&table, &shown), None))
        );
        insta::assert_snapshot!(
            format!("held_recorded_{}", tool.name()),
            crate::sql::pretty(&name_held_statement(
                tool,
                (&table, &shown),
                Some(("\"migrations_gate\".tool_locks", 9))
            ))
        );
    }
}

/// The release statements whole. Effect: tests/recovery.rs (a killed holder's Liquibase and
/// yoyo locks released and the fleet finishes; a lock taken outside the gate left alone).
#[test]
fn release_statements() {
    let proof = Proof::example();
    let ledger = (
        "\"migrations_gate\".\"ledger\"",
        "\"migrations_gate\".\"tool_locks\"",
        7,
    );
    for (tool, table) in [
        (Tool::Liquibase, "\"public\".\"databasechangeloglock\""),
        (Tool::Yoyo, "\"public\".\"yoyo_lock\""),
    ] {
        let sql = unlock_statement(tool, (table, "public.t"), ledger, (9, &proof));
        insta::assert_snapshot!(
            format!("release_{}", tool.name()),
            crate::sql::pretty(&sql.unwrap_or_default())
        );
    }
    assert_eq!(
        unlock_statement(Tool::Knex, ("k", "k"), ledger, (9, &proof)),
        None
    );
}
