//! Through a real PgBouncer in session and transaction pooling modes: the race still migrates
//! once, a killed holder is still taken over, and no advisory lock is ever left behind.

mod support;

use std::process::{Child, Command, Output};
use std::time::Duration;

use support::*;

const HANG_GUARD: Duration = Duration::from_secs(180);

/// A gate whose own connections go through the pooler; the stand-in app connects directly, so
/// its overlap detector (a session advisory lock) stays trustworthy.
fn gate_via(bouncer: &PgBouncer, db: &TestDb) -> Command {
    let mut c = db.gate();
    c.env("MIGRATIONS_GATE_DATABASE_URL", bouncer.url(&db.name));
    c
}

fn race(bouncer: &PgBouncer, db: &TestDb, n: usize) -> Vec<Output> {
    let migrate = format!("{} migrate", standin());
    let children: Vec<Child> = (0..n)
        .map(|_| {
            let mut c = gate_via(bouncer, db);
            c.args([
                "run",
                "--release",
                "r1",
                "--migrate",
                &migrate,
                "--",
                standin(),
                "start",
            ]);
            spawn(&mut c)
        })
        .collect();
    children
        .into_iter()
        .map(|c| wait_output(c, HANG_GUARD))
        .collect()
}

fn assert_race_ok(db: &TestDb, outs: &[Output], n: usize) {
    for out in outs {
        assert_eq!(
            out.status.code(),
            Some(0),
            "a gate failed:\n{}",
            stderr(out)
        );
        assert!(
            !stderr(out).contains("42P05"),
            "prepared statement clash: {}",
            stderr(out)
        );
    }
    assert_eq!(db.one("SELECT count(*) FROM mg_runs"), "1");
    assert_no_overlap(db);
    assert_eq!(db.one("SELECT count(*) FROM app_seed"), "1");
    assert_eq!(
        db.one("SELECT count(*) FROM app_starts WHERE flag = 'False' AND schema_ready"),
        n.to_string()
    );
    db.assert_no_gate_locks();
}

#[test]
fn race_through_transaction_pooling_uses_a_transaction_lock_and_leaks_nothing() {
    let bouncer = PgBouncer::start(cluster(), "transaction");
    let db = cluster().new_db("pool_tx");
    let outs = race(&bouncer, &db, 8);
    assert_race_ok(&db, &outs, 8);
    let holder = outs
        .iter()
        .find(|o| stderr(o).contains("this replica migrates"))
        .expect("a holder");
    assert!(
        stderr(holder).contains("scope=Transaction"),
        "{}",
        stderr(holder)
    );
    // The fast path works through the pooler too (no prepared statements anywhere).
    for _ in 0..5 {
        let out = gate_via(&bouncer, &db)
            .args(["run", "--release", "r1", "--migrate", "false", "--", "true"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    }
    db.assert_no_gate_locks();
}

#[test]
fn race_through_session_pooling_migrates_once() {
    let bouncer = PgBouncer::start(cluster(), "session");
    let db = cluster().new_db("pool_session");
    let outs = race(&bouncer, &db, 8);
    assert_race_ok(&db, &outs, 8);
}

#[test]
fn holder_killed_behind_transaction_pooling_is_taken_over_and_its_lock_released() {
    let bouncer = PgBouncer::start(cluster(), "transaction");
    let db = cluster().new_db("pool_kill");
    let mut first = gate_via(&bouncer, &db);
    first
        .args(["migrate", "--release", "r1", "--", standin(), "migrate"])
        .env("STANDIN_STEP_MS", "1000");
    let first = spawn(&mut first);
    eventually(HANG_GUARD, "the holder started migrating", || {
        db.one("SELECT count(*) FROM mg_runs") == "1"
    });
    let first_migration: i32 = db.one("SELECT pid FROM mg_runs").parse().unwrap();
    let waiters: Vec<Child> = (0..3)
        .map(|_| {
            let mut c = gate_via(&bouncer, &db);
            c.args(["migrate", "--release", "r1", "--", standin(), "migrate"]);
            spawn(&mut c)
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: plain system call on a PID this test started.
    unsafe {
        libc::kill(first.id() as i32, libc::SIGKILL);
    }
    let _ = wait_output(first, HANG_GUARD);
    for w in waiters {
        let out = wait_output(w, HANG_GUARD);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    }
    eventually(
        Duration::from_secs(10),
        "the killed holder's migration is gone",
        || !alive(first_migration),
    );
    assert_no_overlap(&db);
    assert_eq!(
        db.one("SELECT count(*) FROM mg_runs WHERE finished_at IS NOT NULL"),
        "1"
    );
    assert_eq!(db.one("SELECT count(*) FROM app_seed"), "1");
    assert_eq!(
        db.one("SELECT count(*) FROM migrations_gate.ledger WHERE outcome = 'done'"),
        "1"
    );
    db.assert_no_gate_locks();
}
