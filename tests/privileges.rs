//! Least-privilege roles. PostgreSQL 15 revokes CREATE on schema `public` from PUBLIC, and DBAs
//! often give an app no CREATE on its database. The gate looks before it creates (schema, table,
//! index: only what is missing), so it works with whatever the DBA has prepared, and when it
//! cannot work it says in one line what to grant.
//!
//! Each test creates its own role (unique name, password, SCRAM over TCP) with exactly the
//! grants under test, runs the gate, its migration and the app as that role (one URL for all),
//! and drops the role again, also when the test fails.

mod support;

use std::process::Command;

use support::role::Role;
use support::*;

/// The app's rights on top of a bare [`Role`].
trait AppRole {
    fn app_only(db: &TestDb, what: &str) -> Role;
    fn grant_app_rights(&self);
}

impl AppRole for Role {
    /// After [`revoke_create_on_database`], a new role with the app's rights
    /// ([`Role::grant_app_rights`]) and nothing else.
    fn app_only(db: &TestDb, what: &str) -> Role {
        revoke_create_on_database(db);
        let role = Role::create(db, what);
        role.grant_app_rights();
        role
    }

    /// What the stand-in app itself needs: create its tables in `public`, and write the
    /// bookkeeping tables `standin-app setup` made as the superuser.
    fn grant_app_rights(&self) {
        let r = &self.name;
        sql(
            &self.admin_url,
            &format!(
                "GRANT USAGE, CREATE ON SCHEMA public TO {r};
                 GRANT SELECT, INSERT, UPDATE ON mg_runs, app_starts, app_signals TO {r};
                 GRANT USAGE ON SEQUENCE mg_runs_id_seq, app_starts_id_seq, app_signals_id_seq TO {r};"
            ),
        );
    }
}

/// `REVOKE CREATE ON DATABASE ... FROM PUBLIC`: nobody but the owner and superusers may create
/// schemas in the test database.
fn revoke_create_on_database(db: &TestDb) {
    sql(
        &db.url,
        &format!("REVOKE CREATE ON DATABASE {} FROM PUBLIC", db.name),
    );
}

/// `run --release r1 --migrate "standin migrate" -- standin start`, as `role`.
fn run_gate(role: &Role, db: &TestDb, flags: &[&str]) -> Command {
    let mut c = role.gate(db);
    c.args(["run", "--release", "r1"])
        .args(flags)
        .args(["--migrate", &format!("{} migrate", standin())])
        .args(["--", standin(), "start"]);
    c
}

/// `n` replicas of [`run_gate`] at once, to the end.
fn run_replicas(role: &Role, db: &TestDb, n: usize) -> Vec<std::process::Output> {
    run_all(
        (0..n).map(|_| run_gate(role, db, &[])).collect(),
        HANG_GUARD,
    )
}

/// One [`run_gate`] with `flags`, to the end.
fn run_one(role: &Role, db: &TestDb, flags: &[&str]) -> std::process::Output {
    wait_output(spawn(&mut run_gate(role, db, flags)), HANG_GUARD)
}

/// The migration ran once, `n` apps started with the flag off on a ready schema, and release
/// r1 is done in the ledger in `schema`.
fn assert_migrated_once_and_all_started(db: &TestDb, schema: &str, n: usize) {
    assert_eq!(db.migrations_started(), 1);
    assert_no_overlap(db);
    assert_eq!(db.seed_rows(), 1);
    assert_eq!(db.app_starts_flag_off_on_ready_schema(), n);
    assert_eq!(db.ledger_in(schema).times_done("r1"), 1);
    db.assert_no_gate_locks();
}

fn assert_all_ok(outs: &[std::process::Output]) {
    for out in outs {
        assert_eq!(code(out), 0, "a gate failed:\n{}", stderr(out));
    }
}

#[test]
fn without_create_on_the_database_the_gate_uses_the_schema_the_dba_made_for_it() {
    let db = cluster().new_db("priv_schema");
    let role = Role::app_only(&db, "owner");
    sql(
        &db.url,
        &format!("CREATE SCHEMA migrations_gate AUTHORIZATION {}", role.name),
    );
    assert_eq!(
        db.one(&format!(
            "SELECT has_database_privilege('{}', current_database(), 'CREATE')::text",
            role.name
        )),
        "false"
    );
    let outs = run_replicas(&role, &db, 4);
    assert_eq!(
        db.migrations_started(),
        1,
        "the migration must run once; a gate said:\n{}",
        stderr(&outs[0])
    );
    assert_migrated_once_and_all_started(&db, "migrations_gate", 4);
    assert_eq!(
        db.one("SELECT tableowner FROM pg_tables WHERE schemaname = 'migrations_gate' AND tablename = 'ledger'"),
        role.name,
        "the gate created its ledger in the schema the DBA made for it"
    );
    assert_all_ok(&outs);
}

#[test]
fn with_create_on_schema_public_only_the_ledger_lives_in_public() {
    let db = cluster().new_db("priv_public");
    let role = Role::app_only(&db, "public"); // the app's rights include CREATE ON SCHEMA public
    let out = run_one(&role, &db, &["--schema", "public"]);
    assert!(
        db.ledger_in("public").exists(),
        "the ledger must be public.ledger; the gate said:\n{}",
        stderr(&out)
    );
    assert_migrated_once_and_all_started(&db, "public", 1);
    assert_eq!(
        db.one("SELECT count(*) FROM pg_namespace WHERE nspname = 'migrations_gate'"),
        "0"
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
}

/// A ledger the DBA let the gate create once, as the superuser, and a role with the app's
/// rights and only what the gate needs to read and write that ledger.
fn dml_role_on_a_dba_made_ledger(db: &TestDb, what: &str) -> Role {
    let out = db.gate_output(&["migrate", "--release", "dba-bootstrap", "--", "true"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let role = Role::app_only(db, what);
    let r = &role.name;
    sql(
        &db.url,
        &format!(
            "GRANT USAGE ON SCHEMA migrations_gate TO {r};
             GRANT SELECT, INSERT, UPDATE, DELETE ON migrations_gate.ledger TO {r};
             GRANT USAGE ON SEQUENCE migrations_gate.ledger_id_seq TO {r};"
        ),
    );
    role
}

#[test]
fn with_only_read_write_rights_on_a_ledger_the_dba_created_the_gate_works() {
    let db = cluster().new_db("priv_dml");
    let role = dml_role_on_a_dba_made_ledger(&db, "dml");
    assert_eq!(
        db.one(
            "SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'migrations_gate'"
        ),
        "postgres"
    );
    let outs = run_replicas(&role, &db, 4);
    assert_migrated_once_and_all_started(&db, "migrations_gate", 4);
    assert_all_ok(&outs);
}

#[test]
fn without_any_right_to_a_ledger_the_gate_exits_77_naming_the_grant_and_never_migrates() {
    let db = cluster().new_db("priv_none");
    // The app's own rights, so that a migration that ran would show in mg_runs; nothing for
    // the gate: no CREATE on the database, no schema.
    let role = Role::app_only(&db, "none");
    let out = run_one(&role, &db, &[]);
    assert_eq!(db.migrations_started(), 0);
    assert_eq!(db.app_starts(), 0);
    assert_eq!(
        db.one("SELECT count(*) FROM pg_namespace WHERE nspname = 'migrations_gate'"),
        "0"
    );
    assert_eq!(code(&out), 77, "{}", stderr(&out));
    let err = stderr(&out);
    let grant_lines: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("CREATE SCHEMA"))
        .collect();
    assert_eq!(
        grant_lines.len(),
        1,
        "one line must say what to grant (CREATE SCHEMA ... AUTHORIZATION role):\n{err}"
    );
    assert!(
        grant_lines[0].contains("AUTHORIZATION") && grant_lines[0].contains(&role.name),
        "the line must name the statement and the role: {}",
        grant_lines[0]
    );
    for (what, text) in [("stdout", stdout(&out)), ("stderr", err.clone())] {
        assert!(
            !text.contains(&role.password),
            "the password appears on {what}: {text}"
        );
    }
}

#[test]
fn a_ledger_that_lost_its_index_names_the_create_index_its_owner_must_run() {
    let db = cluster().new_db("priv_index");
    let role = dml_role_on_a_dba_made_ledger(&db, "idx");
    sql(
        &db.url,
        "DROP INDEX migrations_gate.ledger_one_done_per_release",
    );
    // Without --release the gate makes sure its ledger is whole; only the table's owner may
    // create the index, whatever else is granted.
    let out = wait_output(
        spawn(role.gate(&db).args(["migrate", "--", standin(), "migrate"])),
        HANG_GUARD,
    );
    assert_eq!(db.migrations_started(), 0);
    assert_eq!(
        db.one("SELECT count(*) FROM pg_indexes WHERE schemaname = 'migrations_gate' AND indexname = 'ledger_one_done_per_release'"),
        "0"
    );
    assert_eq!(code(&out), 77, "{}", stderr(&out));
    assert_mentions(
        &stderr(&out),
        &[
            "lost its unique index",
            "only the table's owner may",
            "CREATE UNIQUE INDEX",
        ],
    );
    assert!(!stderr(&out).contains("CREATE SCHEMA"), "{}", stderr(&out));
    assert!(!stderr(&out).contains(&role.password), "{}", stderr(&out));
}
