//! The version matrix: the contract tests that depend on the server, against every supported
//! major (13 to 18), each in a private server of its own started from that major's binaries
//! (`support::postgres`: the system package, else the pinned npm package, cached in
//! `target/pg-versions`). Per major: a race of 8 gates in both wrapper modes, takeover after
//! `kill -9` of the holder, transaction scope through PgBouncer (transaction pooling) with
//! database-level timeouts shorter than the migration, a least-privilege role, a hot standby.
//! And: PostgreSQL 12 is refused with one line and exit 78 before any DDL.
//!
//! The full suite runs on the default (system) version; this file only what differs by version.
//! The test harness runs two tests at a time on two cores: two servers at once.

mod support;

use std::process::{Command, Output};
use std::time::Duration;

use support::postgres::{SUPPORTED, bindir_for};
use support::*;

const HANG_GUARD: Duration = Duration::from_secs(180);

/// A private server of PostgreSQL `major`, checked to be that major. Stopped on drop.
fn server(major: u32) -> Cluster {
    let cluster = Cluster::start_with(bindir_for(major), &[]);
    let num: u32 = sql(&cluster.url("postgres"), "SHOW server_version_num")[0][0]
        .parse()
        .expect("server_version_num");
    assert_eq!(num / 10_000, major, "the server is not PostgreSQL {major}");
    cluster
}

/// The whole matrix for one major, on one server, one check after another.
fn contract_holds_on(major: u32) {
    assert!(SUPPORTED.contains(&major));
    let cluster = server(major);
    eight_migrate_gates_at_once_migrate_exactly_once(&cluster);
    eight_run_gates_start_every_app_after_one_migration(&cluster);
    holder_killed_mid_migration_is_taken_over_once(&cluster);
    let mut timeouts = vec!["idle_in_transaction_session_timeout", "statement_timeout"];
    if major >= 17 {
        timeouts.push("transaction_timeout");
    }
    transaction_scope_through_pgbouncer_outlasts_shorter_timeouts(&cluster, &timeouts);
    if major >= 14 {
        session_scope_outlasts_a_shorter_idle_session_timeout(&cluster);
    }
    least_privilege_role_with_a_schema_the_dba_made(&cluster);
    hot_standby_refuses_a_holder_and_lets_a_follower_of_a_done_release_pass(&cluster);
}

#[test]
fn postgres_13_keeps_the_contract() {
    contract_holds_on(13);
}

#[test]
fn postgres_14_keeps_the_contract() {
    contract_holds_on(14);
}

#[test]
fn postgres_15_keeps_the_contract() {
    contract_holds_on(15);
}

#[test]
fn postgres_16_keeps_the_contract() {
    contract_holds_on(16);
}

#[test]
fn postgres_17_keeps_the_contract() {
    contract_holds_on(17);
}

#[test]
fn postgres_18_keeps_the_contract() {
    contract_holds_on(18);
}

/// Issue 15's "done when": `transaction_timeout` shorter than the migration, set on the
/// database as DBAs and managed services do, with the lock in transaction scope behind
/// PgBouncer. Without the gate's `SET LOCAL transaction_timeout = 0` every holder is terminated
/// 2 s into its migration and fenced.
#[test]
fn postgres_17_transaction_timeout_shorter_than_the_migration_through_pgbouncer_migrates_once() {
    let cluster = server(17);
    transaction_scope_through_pgbouncer_outlasts_shorter_timeouts(
        &cluster,
        &["transaction_timeout"],
    );
}

#[test]
fn postgres_12_is_refused_with_one_line_and_exit_78_before_any_ddl() {
    let cluster = server(12);
    let db = cluster.new_db("too_old");
    let out = wait_output(
        spawn(db.gate().args([
            "run",
            "--release",
            "r1",
            "--migrate",
            &format!("{} migrate", standin()),
            "--",
            standin(),
            "start",
        ])),
        HANG_GUARD,
    );
    assert_eq!(
        db.one("SELECT count(*) FROM pg_namespace WHERE nspname = 'migrations_gate'"),
        "0",
        "no DDL on a server that is too old"
    );
    assert_eq!(db.one("SELECT count(*) FROM mg_runs"), "0");
    assert_eq!(db.one("SELECT count(*) FROM app_starts"), "0");
    assert_eq!(code(&out), 78, "{}", stderr(&out));
    let err = stderr(&out);
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("not supported"))
        .collect();
    assert_eq!(lines.len(), 1, "one line:\n{err}");
    assert_mentions(lines[0], &["PostgreSQL 12.", "13 to 18"]);
}

/// `migrate --release r1 -- standin migrate` against `db` (with the environment of
/// [`TestDb::gate`]).
fn migrate_cmd(db: &TestDb) -> Command {
    let mut c = db.gate();
    c.args(["migrate", "--release", "r1", "--", standin(), "migrate"]);
    c
}

/// `run --release r1 --migrate "standin migrate" -- standin start`.
fn run_cmd(mut c: Command) -> Command {
    let migrate = format!("{} migrate", standin());
    c.args(run_args("r1", &migrate, &[standin(), "start"]));
    c
}

/// Release r1 migrated exactly once, by one attempt that is done (the ledger in `ledger`), with
/// no overlap and the seed written once.
fn assert_migrated_once(db: &TestDb, ledger: &str) {
    assert_eq!(
        db.one(&format!(
            "SELECT string_agg(outcome, ',' ORDER BY id) FROM {ledger} WHERE release = 'r1'"
        )),
        "done",
        "one attempt, done"
    );
    assert_eq!(db.one("SELECT count(*) FROM mg_runs"), "1", "one migration");
    assert_no_overlap(db);
    assert_eq!(db.one("SELECT count(*) FROM app_seed"), "1");
}

#[track_caller]
fn assert_all_ok(outs: &[Output]) {
    for out in outs {
        assert_eq!(code(out), 0, "a gate failed:\n{}", stderr(out));
    }
}

fn eight_migrate_gates_at_once_migrate_exactly_once(cluster: &Cluster) {
    let db = cluster.new_db("race_migrate");
    let outs = run_all((0..8).map(|_| migrate_cmd(&db)).collect(), HANG_GUARD);
    assert_migrated_once(&db, "migrations_gate.ledger");
    db.assert_no_gate_locks();
    assert_all_ok(&outs);
}

fn eight_run_gates_start_every_app_after_one_migration(cluster: &Cluster) {
    let db = cluster.new_db("race_run");
    let outs = run_all((0..8).map(|_| run_cmd(db.gate())).collect(), HANG_GUARD);
    assert_migrated_once(&db, "migrations_gate.ledger");
    assert_eq!(
        db.one("SELECT count(*) FROM app_starts WHERE flag = 'False' AND schema_ready"),
        "8",
        "every app starts with the flag off and a finished schema"
    );
    db.assert_no_gate_locks();
    assert_all_ok(&outs);
}

fn holder_killed_mid_migration_is_taken_over_once(cluster: &Cluster) {
    let db = cluster.new_db("takeover");
    let mut first = migrate_cmd(&db);
    first.env("STANDIN_STEP_MS", "1500");
    let first = spawn(&mut first);
    eventually(HANG_GUARD, "the first holder started migrating", || {
        db.one("SELECT count(*) FROM mg_runs") == "1"
    });
    let first_migrator: i32 = db.one("SELECT pid FROM mg_runs").parse().unwrap();
    let waiters: Vec<_> = (0..4).map(|_| spawn(&mut migrate_cmd(&db))).collect();
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: plain system call on a PID we spawned.
    unsafe {
        libc::kill(first.id() as i32, libc::SIGKILL);
    }
    let killed = wait_output(first, HANG_GUARD);
    let outs: Vec<_> = waiters
        .into_iter()
        .map(|c| wait_output(c, HANG_GUARD))
        .collect();
    eventually(
        Duration::from_secs(10),
        "the killed holder's migration died with it",
        || !alive(first_migrator),
    );
    assert_eq!(
        db.one("SELECT string_agg(outcome, ',' ORDER BY id) FROM migrations_gate.ledger"),
        "abandoned,done"
    );
    assert_eq!(db.one("SELECT count(*) FROM mg_runs"), "2", "one take-over");
    assert_eq!(
        db.one("SELECT count(*) FROM mg_runs WHERE finished_at IS NOT NULL"),
        "1"
    );
    assert_no_overlap(&db);
    assert_eq!(db.one("SELECT count(*) FROM app_seed"), "1");
    db.assert_no_gate_locks();
    assert_eq!(killed.status.code(), None);
    assert_all_ok(&outs);
}

/// Four replicas through PgBouncer in transaction mode (pool of 3; `auto` picks transaction
/// scope behind any pooler), a migration of about 5 s, and each of `timeouts` set to 2 s on the database.
fn transaction_scope_through_pgbouncer_outlasts_shorter_timeouts(
    cluster: &Cluster,
    timeouts: &[&str],
) {
    let db = cluster.new_db("pooled_timeouts");
    for name in timeouts {
        sql(
            &db.url,
            &format!("ALTER DATABASE {} SET {name} = '2s'", db.name),
        );
    }
    let bouncer = PgBouncer::start(cluster, "transaction", 3);
    let cmds = (0..4)
        .map(|_| {
            let mut c = db.gate();
            c.env("MIGRATIONS_GATE_DATABASE_URL", bouncer.url(&db.name))
                .env("DATABASE_URL", bouncer.url(&db.name))
                .env("STANDIN_WITNESS_URL", &db.url)
                .env("STANDIN_STEP_MS", "1000");
            run_cmd(c)
        })
        .collect();
    let outs = run_all(cmds, HANG_GUARD);
    let ledger = db.one(
        "SELECT string_agg(id || ' ' || outcome || ' exit ' || coalesce(exit_code::text, '-') \
         || ': ' || coalesce(detail, ''), E'\\n' ORDER BY id) FROM migrations_gate.ledger",
    );
    assert_eq!(
        db.one("SELECT string_agg(outcome, ',' ORDER BY id) FROM migrations_gate.ledger"),
        "done",
        "one attempt, done, with {timeouts:?} = 2s; ledger:\n{ledger}\nserver log (tail):\n{}",
        tail(&cluster.log(), 10)
    );
    assert_eq!(db.one("SELECT count(*) FROM mg_runs"), "1", "one migration");
    assert_no_overlap(&db);
    assert_eq!(db.one("SELECT count(*) FROM app_starts"), "4");
    db.assert_no_gate_locks();
    assert_all_ok(&outs);
}

/// `idle_session_timeout` (14+) shorter than the lock session's heartbeat interval (1 s), on a
/// direct connection (session scope), under a migration of about 1.5 s whose own connection is
/// idle for at most two 250 ms steps in a row (with room for a loaded machine): only the lock
/// session, idle for about 1 s between heartbeats, would reach the timeout.
fn session_scope_outlasts_a_shorter_idle_session_timeout(cluster: &Cluster) {
    let db = cluster.new_db("idle_session");
    sql(
        &db.url,
        &format!(
            "ALTER DATABASE {} SET idle_session_timeout = '900ms'",
            db.name
        ),
    );
    let mut c = migrate_cmd(&db);
    c.env("STANDIN_STEP_MS", "250");
    let out = wait_output(spawn(&mut c), HANG_GUARD);
    assert_migrated_once(&db, "migrations_gate.ledger");
    assert_all_ok(&[out]);
}

fn least_privilege_role_with_a_schema_the_dba_made(cluster: &Cluster) {
    let db = cluster.new_db("least_privilege");
    let role = format!("mg_app_{}", std::process::id());
    let password = "pw-least-Zq7";
    // As PostgreSQL 15 does for `public`, and as DBAs do for the database, on every version.
    sql(
        &db.url,
        &format!(
            "REVOKE CREATE ON DATABASE {db} FROM PUBLIC;
             REVOKE CREATE ON SCHEMA public FROM PUBLIC;
             CREATE ROLE {role} LOGIN PASSWORD '{password}';
             GRANT USAGE, CREATE ON SCHEMA public TO {role};
             GRANT SELECT, INSERT, UPDATE ON mg_runs, app_starts, app_signals TO {role};
             GRANT USAGE ON SEQUENCE mg_runs_id_seq, app_starts_id_seq, app_signals_id_seq TO {role};
             CREATE SCHEMA migrations_gate AUTHORIZATION {role};",
            db = db.name
        ),
    );
    let url = db.url.replacen(
        &format!("postgres:{PASSWORD}@"),
        &format!("{role}:{password}@"),
        1,
    );
    let cmds = (0..4)
        .map(|_| {
            let mut c = db.gate();
            c.env("MIGRATIONS_GATE_DATABASE_URL", &url)
                .env("DATABASE_URL", &url);
            run_cmd(c)
        })
        .collect();
    let outs = run_all(cmds, HANG_GUARD);
    assert_migrated_once(&db, "migrations_gate.ledger");
    assert_eq!(db.one("SELECT count(*) FROM app_starts"), "4");
    db.assert_no_gate_locks();
    assert_all_ok(&outs);
}

fn hot_standby_refuses_a_holder_and_lets_a_follower_of_a_done_release_pass(cluster: &Cluster) {
    let db = cluster.new_db("standby");
    let standby = cluster.standby();
    let out = wait_output(spawn(&mut migrate_cmd(&db)), HANG_GUARD);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    cluster.wait_replayed(&standby, HANG_GUARD);
    let on_standby = |args: &[&str]| {
        let mut c = db.gate();
        c.env("MIGRATIONS_GATE_DATABASE_URL", standby.url(&db.name))
            .env("DATABASE_URL", standby.url(&db.name))
            .args(args);
        wait_output(spawn(&mut c), HANG_GUARD)
    };
    // The same application, by its own command: a follower, so mg_runs stays at 1.
    let follower = on_standby(&["migrate", "--release", "r1", "--", standin(), "migrate"]);
    let holder = on_standby(&[
        "migrate",
        "--release",
        "r2",
        "--connect-timeout",
        "3s",
        "--",
        "false",
    ]);
    cluster.wait_replayed(&standby, HANG_GUARD);
    assert_eq!(
        db.one("SELECT string_agg(release || ' ' || outcome, ',' ORDER BY id) FROM migrations_gate.ledger"),
        "r1 done",
        "nothing recorded for r2"
    );
    assert_eq!(db.one("SELECT count(*) FROM mg_runs"), "1");
    assert_eq!(code(&follower), 0, "{}", stderr(&follower));
    assert_eq!(code(&holder), 69, "{}", stderr(&holder));
    assert_stderr_has(&holder, "point the gate at the primary");
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
