//! The gate's contract, tested with real processes against a real PostgreSQL.

mod support;

use std::process::{Command, Output};
use std::time::Duration;

use support::*;

fn migrate_cmd(db: &TestDb, release: Option<&str>) -> Command {
    migrate_with(db, release, &[])
}

fn migrate_with(db: &TestDb, release: Option<&str>, flags: &[&str]) -> Command {
    let mut c = db.gate();
    c.arg("migrate");
    if let Some(r) = release {
        c.args(["--release", r]);
    }
    c.args(flags).args(["--", standin(), "migrate"]);
    c
}

/// `migrations-gate migrate FLAGS... --database-url URL -- true`, run to the end, without the
/// environment of [`TestDb::gate`].
fn migrate_true_at(url: &str, flags: &[&str]) -> Output {
    Command::new(gate_bin())
        .arg("migrate")
        .args(flags)
        .args(["--database-url", url, "--", "true"])
        .output()
        .unwrap()
}

fn assert_all_ok(outs: &[Output]) {
    for out in outs {
        assert_eq!(code(out), 0, "a gate failed:\n{}", stderr(out));
    }
}

#[test]
fn eight_migrate_gates_at_once_migrate_exactly_once() {
    let db = cluster().new_db("race_migrate");
    let outs = run_all(
        (0..8).map(|_| migrate_cmd(&db, Some("r1"))).collect(),
        HANG_GUARD,
    );
    assert_all_ok(&outs);
    assert_eq!(
        db.migrations_started(),
        1,
        "the migration ran more than once"
    );
    assert_eq!(db.seed_rows(), 1);
    assert_no_overlap(&db);
    assert_eq!(db.ledger().times_done("r1"), 1);
    db.assert_no_gate_locks();
    let waited = outs
        .iter()
        .filter(|o| stderr(o).contains("release is done"))
        .count();
    assert_eq!(waited, 7, "seven replicas should have gone on as followers");
}

#[test]
fn without_the_gate_the_standin_migration_really_races() {
    // Proves the race tests exercise a real race: eight bare migrations at once break.
    let db = cluster().new_db("race_bare");
    let cmds: Vec<Command> = (0..8)
        .map(|_| {
            let mut c = Command::new(standin());
            c.arg("migrate")
                .env("DATABASE_URL", &db.url)
                .env("STANDIN_STEP_MS", "150");
            c
        })
        .collect();
    let outs = run_all(cmds, HANG_GUARD);
    let failed = outs.iter().filter(|o| !o.status.success()).count();
    let overlapped = db.one("SELECT count(*) FROM mg_runs WHERE overlapped");
    let seeds = db.seed_rows();
    assert!(
        failed > 0 || overlapped != "0" || seeds != 1,
        "bare migrations did not visibly race (failed {failed}, overlapped {overlapped}, seeds {seeds})"
    );
}

#[test]
fn eight_run_gates_with_migrate_start_every_app_with_the_flag_off_after_the_migration() {
    let db = cluster().new_db("race_run");
    let migrate = format!("{} migrate", standin());
    let cmds = (0..8)
        .map(|_| {
            let mut c = db.gate();
            c.args(run_args("r1", &migrate, &[standin(), "start"]));
            c
        })
        .collect();
    let outs = run_all(cmds, HANG_GUARD);
    assert_all_ok(&outs);
    assert_eq!(db.migrations_started(), 1);
    assert_eq!(db.seed_rows(), 1);
    assert_no_overlap(&db);
    assert_eq!(db.app_starts(), 8);
    assert_eq!(
        db.app_starts_flag_off_on_ready_schema(),
        8,
        "every app start must see the flag off and a finished schema"
    );
    db.assert_no_gate_locks();
}

#[test]
fn ready_http_holder_starts_app_with_flag_on_and_signals_reach_every_app() {
    let db = cluster().new_db("race_ready");
    let n = 6;
    let mut children = Vec::new();
    for _ in 0..n {
        let port = free_port();
        let mut c = db.gate();
        c.args(["run", "--release", "r1", "--ready-http"])
            .arg(format!("http://127.0.0.1:{port}/health"))
            .args(["--", standin(), "serve"])
            .env("STANDIN_PORT", port.to_string());
        children.push(spawn(&mut c));
    }
    eventually(HANG_GUARD, "every app started", || db.app_starts() == n);
    // Every app is up: the holder's app under the gate, the others exec'd in place of theirs.
    for child in &children {
        // SAFETY: plain system call on a PID we spawned.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
    }
    let outs = wait_all(children, HANG_GUARD);
    for out in &outs {
        assert_eq!(
            code(out),
            42,
            "the app's own exit code must come back:\n{}",
            stderr(out)
        );
    }
    assert_eq!(db.migrations_started(), 1);
    assert_no_overlap(&db);
    assert_eq!(
        db.one("SELECT count(*) FROM app_starts WHERE flag = 'True'"),
        "1"
    );
    assert_eq!(db.app_starts_flag_off_on_ready_schema(), n - 1);
    assert_eq!(
        db.one("SELECT count(*) FROM app_signals WHERE signal = 'SIGTERM'"),
        n.to_string()
    );
    assert_eq!(db.ledger().count("done"), 1);
    db.assert_no_gate_locks();
}

#[test]
fn follower_execs_app_in_place_with_the_same_pid() {
    let db = cluster().new_db("exec_pid");
    let out = wait_output(spawn(&mut migrate_cmd(&db, Some("r1"))), HANG_GUARD);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let mut c = db.gate();
    let migrate = format!("{} migrate", standin());
    c.args(run_args("r1", &migrate, &[standin(), "start"]));
    let child = spawn(&mut c);
    let pid = child.id();
    let out = wait_output(child, HANG_GUARD);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(
        db.one("SELECT pid FROM app_starts"),
        pid.to_string(),
        "APP must replace the gate"
    );
    assert_eq!(db.one("SELECT flag FROM app_starts"), "False");
}

#[test]
fn done_release_is_skipped_and_a_new_release_migrates_again() {
    let db = cluster().new_db("skip");
    for release in ["r1", "r1", "r1"] {
        let out = wait_output(spawn(&mut migrate_cmd(&db, Some(release))), HANG_GUARD);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
    }
    assert_eq!(db.migrations_started(), 1);
    let out = wait_output(spawn(&mut migrate_cmd(&db, Some("r2"))), HANG_GUARD);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(db.migrations_started(), 2);
    assert_eq!(db.ledger().done_releases(), ["r1", "r2"]);
}

#[test]
fn without_release_replicas_migrate_one_after_another() {
    let db = cluster().new_db("serial");
    let outs = run_all((0..4).map(|_| migrate_cmd(&db, None)).collect(), HANG_GUARD);
    assert_all_ok(&outs);
    assert_eq!(db.migrations_finished(), 4);
    assert_no_overlap(&db);
    assert_eq!(db.seed_rows(), 1);
    assert_stderr_has(&outs[0], "no --release given");
    db.assert_no_gate_locks();
}

#[test]
fn failed_migration_is_recorded_frees_the_lock_and_passes_its_exit_code() {
    let db = cluster().new_db("failed");
    let mut c = migrate_cmd(&db, Some("r1"));
    c.env("STANDIN_FAIL", "1");
    let out = wait_output(spawn(&mut c), HANG_GUARD);
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert_stderr_has(&out, "failed with exit code 3");
    assert_eq!(db.ledger().exits(), [("failed".to_string(), Some(3))]);
    db.assert_no_gate_locks();
    // The next try succeeds and the release ends done.
    let out = wait_output(spawn(&mut migrate_cmd(&db, Some("r1"))), HANG_GUARD);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(db.ledger().outcomes(), ["failed", "done"]);
}

#[test]
fn holder_killed_mid_migration_is_taken_over_once() {
    let db = cluster().new_db("takeover");
    let mut first = migrate_cmd(&db, Some("r1"));
    first.env("STANDIN_STEP_MS", "1500");
    let first = spawn(&mut first);
    eventually(HANG_GUARD, "the first holder started migrating", || {
        db.migrations_started() == 1
    });
    let first_migrator = db.first_migration_pid();
    let waiters: Vec<_> = (0..4)
        .map(|_| spawn(&mut migrate_cmd(&db, Some("r1"))))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: plain system call on a PID we spawned.
    unsafe {
        libc::kill(first.id() as i32, libc::SIGKILL);
    }
    let killed = wait_output(first, HANG_GUARD);
    assert_eq!(killed.status.code(), None);
    let outs = wait_all(waiters, HANG_GUARD);
    assert_all_ok(&outs);
    eventually(
        Duration::from_secs(10),
        "the killed holder's migration died with it",
        || !alive(first_migrator),
    );
    assert_eq!(db.migrations_started(), 2, "exactly one waiter took over");
    assert_eq!(db.migrations_finished(), 1);
    assert_no_overlap(&db);
    assert_eq!(db.seed_rows(), 1);
    assert_eq!(db.ledger().outcomes(), ["abandoned", "done"]);
    db.assert_no_gate_locks();
}

#[test]
fn killing_the_gate_kills_a_shell_scripts_grandchild_too() {
    let db = cluster().new_db("orphan");
    // `; true` keeps sh from exec'ing: standin-app is sh's child, the gate's grandchild.
    let script = format!("{} migrate; true", standin());
    let mut c = db.gate();
    c.args(["migrate", "--release", "r1", "--", "sh", "-c", &script])
        .env("STANDIN_STEP_MS", "3000");
    let gate = spawn(&mut c);
    eventually(HANG_GUARD, "the grandchild started migrating", || {
        db.migrations_started() == 1
    });
    let grandchild = db.first_migration_pid();
    assert!(alive(grandchild));
    // SAFETY: plain system call on a PID we spawned.
    unsafe {
        libc::kill(gate.id() as i32, libc::SIGKILL);
    }
    let _ = wait_output(gate, HANG_GUARD);
    eventually(
        Duration::from_secs(5),
        "the grandchild died with the gate",
        || !alive(grandchild),
    );
    // The next holder migrates alone.
    let out = wait_output(spawn(&mut migrate_cmd(&db, Some("r1"))), HANG_GUARD);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_no_overlap(&db);
    assert_eq!(db.seed_rows(), 1);
}

#[test]
fn waiter_gives_up_after_wait_timeout_naming_the_holder() {
    let db = cluster().new_db("timeout");
    let (holder, _) = hold_lock(
        &format!("{}?application_name=stuck-holder", db.url),
        "migrations-gate",
    );
    let mut c = migrate_with(&db, Some("r1"), &["--wait-timeout", "2s"]);
    let out = wait_output(spawn(&mut c), HANG_GUARD);
    assert_eq!(code(&out), 75, "{}", stderr(&out));
    assert_stderr_has(&out, "timed out waiting for release \"r1\"");
    let err = stderr(&out);
    assert!(
        err.contains("stuck-holder"),
        "the message must name the holder: {err}"
    );
    assert_eq!(db.migrations_started(), 0);
    drop(holder);
}

#[test]
fn a_free_lock_alone_never_lets_a_waiter_skip_the_migration() {
    // The lock is free but the release is not done: the waiter migrates; it does not just go on.
    let db = cluster().new_db("positive");
    let migrate = format!("{} migrate", standin());
    let mut c = db.gate();
    c.args(run_args("r1", &migrate, &[standin(), "start"]));
    let out = wait_output(spawn(&mut c), HANG_GUARD);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(db.migrations_finished(), 1);
    assert_eq!(db.one("SELECT schema_ready::text FROM app_starts"), "true");
}

#[test]
fn different_lock_names_never_block_each_other() {
    let db = cluster().new_db("locknames");
    let (_holder, key) = hold_lock(&db.url, "app-a");
    for (release, lock, want) in [
        ("r1", ["--lock", "app-b", "--wait-timeout", "20s"], 0),
        // The same name is blocked: proves the SQL derivation in the README matches the gate's.
        ("r9", ["--lock", "app-a", "--wait-timeout", "1s"], 75),
        // --lock-id sets the key directly.
        ("r9", ["--lock-id", &key, "--wait-timeout", "1s"], 75),
    ] {
        let out = wait_output(
            spawn(&mut migrate_with(&db, Some(release), &lock)),
            HANG_GUARD,
        );
        assert_eq!(code(&out), want, "{lock:?}: {}", stderr(&out));
    }
}

#[test]
fn app_that_exits_before_ready_fails_the_attempt() {
    let db = cluster().new_db("notready");
    let port = free_port();
    let mut c = db.gate();
    c.args(["run", "--release", "r1", "--ready-tcp"])
        .arg(format!("127.0.0.1:{port}"))
        .args(["--", standin(), "serve"])
        .env("STANDIN_EXIT_BEFORE_READY", "1");
    let out = wait_output(spawn(&mut c), HANG_GUARD);
    assert_eq!(code(&out), 5, "{}", stderr(&out));
    assert_stderr_has(&out, "exited before it was ready");
    assert_eq!(db.ledger().outcomes(), ["failed"]);
    db.assert_no_gate_locks();
}

#[test]
fn ready_sql_probe_and_quoted_migrate_string() {
    let db = cluster().new_db("readysql");
    let port = free_port();
    let mut c = db.gate();
    // The --migrate string is split like a shell would, quotes kept together, and run without one.
    c.args([
        "run",
        "--release",
        "r1",
        "--migrate",
        "sh -c 'exit 0'",
        "--ready-sql",
        "SELECT count(*) > 0 FROM app_seed",
    ])
    .args(["--", standin(), "serve"])
    .env("STANDIN_PORT", port.to_string());
    let child = spawn(&mut c);
    // With --migrate and a probe the app starts with the flag off; nothing seeds, so it is never
    // ready. Seed from outside and watch the gate release.
    eventually(HANG_GUARD, "the app started", || db.app_starts() == 1);
    assert_eq!(db.one("SELECT flag FROM app_starts"), "False");
    assert_eq!(db.ledger().count("running"), 1);
    db.rows("CREATE TABLE IF NOT EXISTS app_seed (name text); INSERT INTO app_seed VALUES ('x')");
    eventually(HANG_GUARD, "the release is done", || {
        db.ledger().count("done") == 1
    });
    db.assert_no_gate_locks();
    // SAFETY: plain system call on a PID we spawned.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let out = wait_output(child, HANG_GUARD);
    assert_eq!(code(&out), 42, "{}", stderr(&out));
    assert_eq!(db.one("SELECT signal FROM app_signals"), "SIGINT");
}

#[test]
fn unreachable_database_exits_69_after_connect_timeout() {
    let port = free_port();
    let url = format!("postgres://u:hunter2pw@127.0.0.1:{port}/db");
    let out = migrate_true_at(&url, &["--connect-timeout", "1s", "--release", "r1"]);
    assert_eq!(code(&out), 69, "{}", stderr(&out));
    assert_stderr_has(&out, "database unavailable");
    let err = stderr(&out);
    assert!(!err.contains("hunter2pw"), "password leaked: {err}");
}

#[test]
fn wrong_password_exits_77_without_printing_it() {
    let c = cluster();
    let url = format!(
        "postgres://postgres:wrong-pw-xyz@127.0.0.1:{}/postgres",
        c.port
    );
    let out = migrate_true_at(&url, &["--release", "r1", "--log-format", "json"]);
    assert_eq!(code(&out), 77, "{}", stderr(&out));
    assert_stderr_has(&out, "authentication refused");
    let err = stderr(&out);
    assert!(!err.contains("wrong-pw-xyz"), "password leaked: {err}");
    for line in err.lines() {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok(),
            "not JSON: {line}"
        );
    }
}

#[test]
fn malformed_url_exits_64_without_printing_the_password() {
    for url in [
        "postgres://user:pw-leak-1@host:notaport/db",
        "mysql://user:pw-leak-1@host/db",
        "::::",
    ] {
        let out = migrate_true_at(url, &["--release", "r1"]);
        assert_eq!(code(&out), 64, "{url}: {}", stderr(&out));
        assert!(
            !stderr(&out).contains("pw-leak-1"),
            "password leaked: {}",
            stderr(&out)
        );
    }
}

#[test]
fn missing_or_unexecutable_command_exits_127_or_126_before_locking() {
    let db = cluster().new_db("missing");
    let mut c = db.gate();
    c.args(["migrate", "--release", "r1", "--", "no-such-command-xyz"]);
    let out = c.output().unwrap();
    assert_eq!(code(&out), 127, "{}", stderr(&out));
    assert_stderr_has(&out, "command not found: no-such-command-xyz");
    let mut c = db.gate();
    c.args(run_args("r1", "true", &["/etc/passwd"]));
    let out = c.output().unwrap();
    assert_eq!(code(&out), 126, "{}", stderr(&out));
    db.assert_no_gate_locks();
}

#[test]
fn usage_errors_exit_64() {
    let out = Command::new(gate_bin())
        .args(["migrate", "--no-such-flag"])
        .output()
        .unwrap();
    assert_eq!(code(&out), 64);
    let out = Command::new(gate_bin())
        .args([
            "run",
            "--database-url",
            "postgres://x@127.0.0.1/db",
            "--",
            "true",
        ])
        .output()
        .unwrap();
    assert_eq!(code(&out), 64, "{}", stderr(&out));
    assert_stderr_has(&out, "run needs --migrate");
    let out = Command::new(gate_bin())
        .env_remove("DATABASE_URL")
        .env_remove("MIGRATIONS_GATE_DATABASE_URL")
        .args(["migrate", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(code(&out), 64);
    assert_stderr_has(&out, "no database URL");
    let out = Command::new(gate_bin())
        .args(["migrate", "--wait-timeout", "soon", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(code(&out), 64);
}

#[test]
fn env_twins_and_release_from_a_folder() {
    let db = cluster().new_db("envtwins");
    let dir = std::env::temp_dir().join(format!("mg-release-from-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("versions")).unwrap();
    std::fs::write(dir.join("versions/001.sql"), "create table a();").unwrap();
    let mut c = db.gate();
    c.env("MIGRATIONS_GATE_RELEASE_FROM", &dir)
        .env("MIGRATIONS_GATE_FLAG", "MY_FLAG")
        .env("MIGRATIONS_GATE_ON", "yes")
        .env("MIGRATIONS_GATE_APP", "envtwins")
        .args(["migrate", "--", "sh", "-c", "test \"$MY_FLAG\" = yes"]);
    let out = c.output().unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let done = db.ledger().done_releases();
    assert_eq!(done.len(), 1, "{done:?}");
    let release = &done[0];
    assert!(
        release.starts_with("sha256:") && release.len() == 39,
        "{release}"
    );
    // Same content, same ID: skipped. A changed file is a new release.
    let migrate_false = || {
        db.gate()
            .env("MIGRATIONS_GATE_RELEASE_FROM", &dir)
            .env("MIGRATIONS_GATE_APP", "envtwins")
            .args(["migrate", "--", "false"])
            .output()
            .unwrap()
    };
    let out = migrate_false();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    std::fs::write(dir.join("versions/002.sql"), "create table b();").unwrap();
    let out = migrate_false();
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--first-start-env`: the holder's first start of the app runs with the override (one worker),
/// holds the lock until it is ready, then is stopped, and the gate execs the app as configured.
/// A follower starts as configured only.
#[test]
fn first_start_env_runs_the_holders_first_start_once_with_the_override_then_execs_as_configured() {
    let db = cluster().new_db("first_start");
    db.rows("CREATE TABLE starts (pid int, workers text, flag text, at timestamptz DEFAULT clock_timestamp())");
    let psql = pg_bindir().join("psql").to_string_lossy().into_owned();
    let app = format!(
        "{psql} -X -q \"$DATABASE_URL\" -c \"INSERT INTO starts VALUES ($$, '$WORKERS', '$ENABLE_DB_MIGRATIONS')\" && exec sleep 60"
    );
    let replica = || {
        let mut c = db.gate();
        c.env("WORKERS", "2").args([
            "run",
            "--release",
            "r1",
            "--first-start-env",
            "WORKERS=1",
            "--kill-grace",
            "2s",
            "--ready-sql",
            "SELECT count(*) > 0 FROM starts",
            "--",
            "sh",
            "-c",
            &app,
        ]);
        spawn(&mut c)
    };
    let mut holder = replica();
    eventually(HANG_GUARD, "the app as configured", || {
        db.one("SELECT count(*) FROM starts") == "2"
    });
    let mut follower = replica();
    eventually(HANG_GUARD, "the follower's app", || {
        db.one("SELECT count(*) FROM starts") == "3"
    });
    let starts = db.rows("SELECT pid::text, workers, flag FROM starts ORDER BY at");
    assert_eq!(db.ledger().times_done("r1"), 1);
    assert_eq!(
        starts
            .iter()
            .map(|r| (r[1].as_str(), r[2].as_str()))
            .collect::<Vec<_>>(),
        [("1", "True"), ("2", "False"), ("2", "False")],
        "the first start with the override and the flag on, then as configured"
    );
    // The first start is gone; the app as configured replaced the gate (same PID).
    assert!(!alive(starts[0][0].parse().unwrap()));
    assert_eq!(starts[1][0], holder.id().to_string());
    assert_eq!(starts[2][0], follower.id().to_string());
    for c in [&mut holder, &mut follower] {
        let _ = c.kill();
        let _ = c.wait();
    }
}
