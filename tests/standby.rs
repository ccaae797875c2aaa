//! A gate pointed at a hot standby (a real streaming replica of the test cluster, made with
//! `pg_basebackup -R`). A would-be holder cannot record anything there, so it fails at once and
//! says to point the gate at the primary; `reset` refuses the same way. Documented decision: a
//! follower of a release already done proceeds on a standby (the ledger row is replayed after
//! the migration's own commits, so the schema it needs is there too), and `status` works.

mod support;

use std::time::{Duration, Instant};

use support::*;

/// The test database on the primary, with release `done` done (so the ledger exists), and a
/// standby that has replayed it.
fn primary_and_standby(name: &str, done: &str) -> (TestDb, Cluster) {
    let db = cluster().new_db(name);
    let out = db.gate_output(&["migrate", "--release", done, "--", "true"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let standby = cluster().standby();
    cluster().wait_replayed(&standby, HANG_GUARD);
    (db, standby)
}

/// A gate command aimed at the standby's copy of `db`.
fn gate_on(standby: &Cluster, db: &TestDb) -> std::process::Command {
    let mut c = db.gate();
    c.env("MIGRATIONS_GATE_DATABASE_URL", standby.url(&db.name))
        .env("DATABASE_URL", standby.url(&db.name));
    c
}

/// Runs `migrations-gate ARGS...` against the standby's copy of `db`, with the hang guard.
fn gate_output_on(standby: &Cluster, db: &TestDb, args: &[&str]) -> std::process::Output {
    wait_output(spawn(gate_on(standby, db).args(args)), HANG_GUARD)
}

#[test]
fn a_would_be_holder_on_a_standby_exits_69_at_once_saying_to_use_the_primary() {
    let (db, standby) = primary_and_standby("standby_holder", "r0");
    let started = Instant::now();
    let out = gate_output_on(
        &standby,
        &db,
        &[
            "migrate",
            "--release",
            "r1",
            "--connect-timeout",
            "3s",
            "--",
            standin(),
            "migrate",
        ],
    );
    let took = started.elapsed();
    cluster().wait_replayed(&standby, HANG_GUARD);
    assert_eq!(
        db.ledger().attempts_at("r1"),
        [],
        "nothing may be recorded for r1"
    );
    assert_eq!(db.migrations_started(), 0);
    assert_eq!(code(&out), 69, "{}", stderr(&out));
    assert!(
        took < Duration::from_secs(3 + 10),
        "a standby is not a database that is not up yet: took {took:?}"
    );
    let err = stderr(&out);
    assert!(err.contains("read-only standby"), "{err}");
    assert!(err.contains("point the gate at the primary"), "{err}");
}

#[test]
fn a_follower_of_a_release_done_on_the_primary_proceeds_on_a_standby() {
    let db = cluster().new_db("standby_follower");
    let standby = cluster().standby();
    let out = db.gate_output(&["migrate", "--release", "r1", "--", standin(), "migrate"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    cluster().wait_replayed(&standby, HANG_GUARD);
    let on_standby = TestDb {
        url: standby.url(&db.name),
        name: db.name.clone(),
    };
    assert_eq!(on_standby.ledger().times_done("r1"), 1);
    // `false` would fail the gate: it must not run.
    let on = |args: &[&str]| gate_output_on(&standby, &db, args);
    let migrate = on(&["migrate", "--release", "r1", "--", "false"]);
    let run = on(&["run", "--release", "r1", "--migrate", "false", "--", "true"]);
    let wait = on(&["wait", "--release", "r1", "--wait-timeout", "30s"]);
    assert_eq!(db.migrations_started(), 1);
    assert_eq!(db.ledger().attempts_at("r1").len(), 1);
    for (what, out) in [("migrate", &migrate), ("run", &run), ("wait", &wait)] {
        assert_eq!(code(out), 0, "{what} on the standby:\n{}", stderr(out));
    }
}

#[test]
fn reset_on_a_standby_exits_69_saying_it_is_read_only() {
    let (db, standby) = primary_and_standby("standby_reset", "r1");
    let out = gate_output_on(&standby, &db, &["reset", "--release", "r1"]);
    assert_eq!(
        db.ledger().times_done("r1"),
        1,
        "the release must still be done on the primary"
    );
    assert_eq!(code(&out), 69, "{}", stderr(&out));
    assert_stderr_has(&out, "read-only");
    assert!(
        stderr(&out).contains("point the gate at the primary"),
        "the message must say what to do: {}",
        stderr(&out)
    );
}

#[test]
fn status_on_a_standby_shows_a_done_release() {
    let (db, standby) = primary_and_standby("standby_status", "r1");
    let out = gate_output_on(&standby, &db, &["status", "--release", "r1"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_stdout_has(&out, "done");
}

#[test]
fn a_would_be_holder_on_a_standby_says_so_at_once_and_that_it_retries_for_the_connect_timeout() {
    use std::io::BufRead;
    let (db, standby) = primary_and_standby("standby_said", "r0");
    let started = Instant::now();
    let mut child = spawn(gate_on(&standby, &db).args([
        "migrate",
        "--release",
        "r1",
        "--connect-timeout",
        "5s",
        "--",
        standin(),
        "migrate",
    ]));
    let err = child.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        std::io::BufReader::new(err)
            .lines()
            .map_while(|l| l.ok())
            .map(|l| (started.elapsed(), l))
            .collect::<Vec<_>>()
    });
    let out = wait_output(child, HANG_GUARD);
    let lines = reader.join().expect("stderr reader");
    let all: String = lines.iter().map(|(_, l)| format!("{l}\n")).collect();
    assert_eq!(db.migrations_started(), 0);
    assert_eq!(code(&out), 69, "{all}");
    let (when, said) = lines
        .iter()
        .find(|(_, l)| l.contains("WARN") && l.contains("is a read-only standby"))
        .unwrap_or_else(|| panic!("no warning that the server is a standby:\n{all}"));
    assert!(
        *when < Duration::from_secs(3),
        "the standby warning came after {when:?}, not at once:\n{all}"
    );
    assert_mentions(said, &["up to 5", "--connect-timeout", "failover"]);
    assert!(!said.contains(PASSWORD), "{said}");
    assert_eq!(
        lines
            .iter()
            .filter(|(_, l)| l.contains("is a read-only standby") && l.contains("WARN"))
            .count(),
        1,
        "said once, not on every retry:\n{all}"
    );
}
