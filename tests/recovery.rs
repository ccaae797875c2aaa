//! Recovery that finishes the job, with the real tools: a holder killed with its migration
//! (`kill -9` of the gate and its child's processes, as an OOM kill or a deleted container does)
//! leaves Liquibase's `databasechangeloglock` or yoyo's `yoyo_lock` held; the next holder
//! releases it, records it, and the fleet finishes. A lock taken outside the gate is left alone
//! and named; a golang-migrate dirty marker is named; a release that fails `--max-failures`
//! times stops re-running (exit 65) until `reset`.
//!
//! Liquibase 4.28.1 comes from the npm package `liquibase` (its jars and the PostgreSQL JDBC
//! driver), installed into `target/liquibase` on first use, and runs on the machine's Java
//! (`.ci/run` installs both when missing). yoyo comes from the Python venv of
//! `tests/python/setup-venv`.

mod support;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use support::freezer::descendants;
use support::*;

/// Real tools start slowly (a JVM, a Python interpreter): a longer hang guard.
const TOOL_HANG_GUARD: Duration = Duration::from_secs(180);
const LIQUIBASE: &str = "4.28.1";

/// The cluster's TCP port, from a test database's URL.
fn port(db: &TestDb) -> String {
    let after = db.url.split("@127.0.0.1:").nth(1).expect("URL with a port");
    after.split('/').next().expect("port").to_string()
}

/// `<repo>/target/liquibase`, with the npm package `liquibase` installed (once, under a lock:
/// test binaries run in parallel).
fn liquibase_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/liquibase");
    let stamp = dir.join(format!("installed-{LIQUIBASE}"));
    if stamp.exists() {
        return dir;
    }
    std::fs::create_dir_all(&dir).expect("create target/liquibase");
    let lock = File::create(dir.with_extension("lock")).expect("create the lock file");
    // SAFETY: flock on a descriptor we own; released when `lock` is closed.
    let rc = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) };
    assert_eq!(rc, 0, "flock of target/liquibase");
    if !stamp.exists() {
        let out = Command::new("npm")
            .arg("install")
            .arg("--prefix")
            .arg(&dir)
            .args(["--no-save", "--no-audit", "--no-fund", "--loglevel=error"])
            .arg(format!("liquibase@{LIQUIBASE}"))
            .output()
            .expect("run npm (install it: .ci/run does)");
        assert_succeeded(&out, &format!("npm install liquibase@{LIQUIBASE}"));
        std::fs::write(&stamp, LIQUIBASE).expect("write the install stamp");
    }
    drop(lock);
    dir
}

/// `liquibase update` of `changelog.sql` in `project` against `db`, as argv.
fn liquibase_update(db: &TestDb, project: &Path) -> Vec<String> {
    let dist = liquibase_dir().join("node_modules/liquibase/dist");
    vec![
        dist.join("liquibase/liquibase").display().to_string(),
        format!("--search-path={}", project.display()),
        "--changelog-file=changelog.sql".into(),
        format!("--url=jdbc:postgresql://127.0.0.1:{}/{}", port(db), db.name),
        "--username=postgres".into(),
        format!("--password={PASSWORD}"),
        format!(
            "--classpath={}",
            dist.join("drivers/postgresql-42.4.2.jar").display()
        ),
        "--log-level=WARNING".into(),
        "update".into(),
    ]
}

/// `yoyo apply` of the migrations in `dir` against `db`, as argv.
fn yoyo_apply(db: &TestDb, dir: &Path) -> Vec<String> {
    let venv = std::env::var_os("MG_PY_VENV")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/py-venv"));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/setup-venv");
    let out = Command::new("bash")
        .arg(&script)
        .env("MG_PY_VENV", &venv)
        .output()
        .expect("run tests/python/setup-venv");
    assert_succeeded(
        &out,
        "tests/python/setup-venv (Python 3.10+ with venv and pip, and PyPI)",
    );
    vec![
        venv.join("bin/yoyo").display().to_string(),
        "apply".into(),
        "--no-config-file".into(),
        "--batch".into(),
        "--database".into(),
        db.url.clone(),
        dir.display().to_string(),
    ]
}

/// A scratch directory for a test's project files.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mg-recovery-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create a scratch directory");
    dir
}

/// `migrate --release v1 -- ARGV` for one replica.
fn replica(db: &TestDb, argv: &[String]) -> Child {
    let mut c = db.gate();
    c.args(["migrate", "--release", "v1", "--"]).args(argv);
    spawn(&mut c)
}

/// Kills the holder as an OOM kill or a deleted container does: the gate and every process of
/// its child, with SIGKILL, at once. Returns the gate's PID.
fn kill_holder(db: &TestDb) -> i32 {
    let pids = db.ledger().running_pids();
    assert_eq!(pids.len(), 1, "one running attempt: {pids:?}");
    let holder = pids[0];
    let mut all = descendants(holder);
    all.push(holder);
    for pid in all {
        // SAFETY: plain kill(2) of processes this test started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    holder
}

/// The tool-lock rows the gate recorded: (attempt, tool, released, taken_in).
fn tool_locks(db: &TestDb) -> Vec<(String, String, String, String)> {
    db.rows(
        "SELECT attempt_id::text, tool, released::text, coalesce(taken_in::text, '-') \
         FROM migrations_gate.tool_locks ORDER BY seen_at",
    )
    .into_iter()
    .map(|r| (r[0].clone(), r[1].clone(), r[2].clone(), r[3].clone()))
    .collect()
}

/// After the kill: the release is done once, every other replica exited 0, the tool's lock was
/// released by the taker-over and recorded with the abandoned attempt, and `status` shows it.
fn assert_recovered(db: &TestDb, outs: &[std::process::Output], tool: &str, holder: i32) {
    assert_eq!(
        db.ledger().times_done("v1"),
        1,
        "{:?}",
        db.ledger().attempts()
    );
    let abandoned: Vec<String> = db
        .rows("SELECT id FROM migrations_gate.ledger WHERE outcome = 'abandoned'")
        .into_iter()
        .map(|r| r[0].clone())
        .collect();
    assert_eq!(abandoned.len(), 1, "{:?}", db.ledger().attempts());
    let done_id = db.one("SELECT id FROM migrations_gate.ledger WHERE outcome = 'done'");
    assert_eq!(
        tool_locks(db),
        [(
            done_id.clone(),
            tool.to_string(),
            "true".into(),
            abandoned[0].clone()
        )],
        "the taker-over released the lock the killed attempt took"
    );
    let killed = outs.iter().filter(|o| o.status.code().is_none()).count();
    assert_eq!(killed, 1, "only the killed holder (pid {holder}) died");
    for o in outs.iter().filter(|o| o.status.code().is_some()) {
        assert_eq!(code(o), 0, "{}", stderr(o));
    }
    let taker = outs
        .iter()
        .find(|o| stderr(o).contains(&format!("released {tool}'s stale lock")))
        .expect("the taker-over says what it released");
    assert_stderr_has(taker, &format!("in attempt {}", abandoned[0]));
    let status = db.gate_output(&["status", "--release", "v1", "--json"]);
    assert_eq!(code(&status), 0, "{}", stderr(&status));
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status JSON");
    let shown = &json["tool_locks"][0];
    assert_eq!(shown["tool"], tool, "{json}");
    assert_eq!(shown["released"], true, "{json}");
    assert_eq!(shown["attempt"].to_string(), done_id, "{json}");
}

#[test]
fn liquibase_lock_left_by_a_killed_holder_is_released_and_the_fleet_finishes() {
    let db = cluster().new_db("liquibase_killed");
    let project = scratch("liquibase");
    std::fs::write(
        project.join("changelog.sql"),
        "--liquibase formatted sql\n--changeset gate:1\nselect pg_sleep(8);\n\
         create table lq_t (id int);\ninsert into lq_t values (1);\n",
    )
    .expect("write the changelog");
    let argv = liquibase_update(&db, &project);
    let replicas: Vec<Child> = (0..3).map(|_| replica(&db, &argv)).collect();
    eventually(
        TOOL_HANG_GUARD,
        "the holder's Liquibase took its lock",
        || {
            try_sql(
                &db.url,
                "SELECT count(*) FROM databasechangeloglock WHERE locked",
            )
            .is_ok_and(|r| r[0][0] == "1")
        },
    );
    std::thread::sleep(Duration::from_secs(2));
    let holder = kill_holder(&db);
    let outs = wait_all(replicas, TOOL_HANG_GUARD);
    assert_eq!(
        db.rows("SELECT id FROM lq_t"),
        [["1"]],
        "the changeset ran once"
    );
    assert_eq!(db.one("SELECT count(*) FROM databasechangelog"), "1");
    assert_eq!(
        db.one("SELECT locked::text FROM databasechangeloglock"),
        "false",
        "Liquibase's lock is released"
    );
    assert_recovered(&db, &outs, "Liquibase", holder);
    let _ = std::fs::remove_dir_all(&project);
}

#[test]
fn yoyo_lock_left_by_a_killed_holder_is_released_and_the_fleet_finishes() {
    let db = cluster().new_db("yoyo_killed");
    let project = scratch("yoyo");
    std::fs::write(
        project.join("0001_slow.sql"),
        "select pg_sleep(8);\ncreate table yy_t (id int);\ninsert into yy_t values (1);\n",
    )
    .expect("write the migration");
    let argv = yoyo_apply(&db, &project);
    let replicas: Vec<Child> = (0..4).map(|_| replica(&db, &argv)).collect();
    eventually(TOOL_HANG_GUARD, "the holder's yoyo took its lock", || {
        try_sql(&db.url, "SELECT count(*) FROM yoyo_lock").is_ok_and(|r| r[0][0] == "1")
    });
    std::thread::sleep(Duration::from_secs(2));
    let holder = kill_holder(&db);
    let outs = wait_all(replicas, TOOL_HANG_GUARD);
    assert_eq!(
        db.rows("SELECT id FROM yy_t"),
        [["1"]],
        "the migration ran once"
    );
    assert_eq!(
        db.one("SELECT count(*) FROM yoyo_lock"),
        "0",
        "yoyo's lock is released"
    );
    assert_recovered(&db, &outs, "yoyo", holder);
    let _ = std::fs::remove_dir_all(&project);
}

/// A yoyo lock taken outside the gate (by a session that stays connected) just before the gate's
/// first attempt: neither that attempt nor the one after its failure may release it, although
/// its time lies within the first attempt's interval.
#[test]
fn tool_lock_taken_outside_the_gate_is_left_alone_and_named() {
    let db = cluster().new_db("outside_lock");
    let mut outsider = Session::open(&db.url);
    outsider.one(
        "CREATE TABLE yoyo_lock (locked INT DEFAULT 1, ctime TIMESTAMP, pid INT NOT NULL, PRIMARY KEY (locked))",
    );
    outsider.one(
        "INSERT INTO yoyo_lock (locked, ctime, pid) VALUES (1, now() AT TIME ZONE 'UTC', 4242)",
    );
    let failing = db.gate_output(&["migrate", "--release", "v1", "--", "sh", "-c", "exit 3"]);
    assert_eq!(code(&failing), 3, "{}", stderr(&failing));
    let ok = db.gate_output(&["migrate", "--release", "v1", "--", standin(), "migrate"]);
    assert_eq!(code(&ok), 0, "{}", stderr(&ok));
    assert_eq!(
        db.rows("SELECT pid::text FROM yoyo_lock"),
        [["4242"]],
        "the outsider's lock is untouched"
    );
    let seen: Vec<(String, String)> = tool_locks(&db)
        .into_iter()
        .map(|(_, tool, released, _)| (tool, released))
        .collect();
    assert_eq!(
        seen,
        [
            ("yoyo".into(), "false".into()),
            ("yoyo".into(), "false".into())
        ],
        "each attempt recorded the lock as held and left alone"
    );
    for out in [&failing, &ok] {
        assert_stderr_has(
            out,
            "yoyo's lock in public.yoyo_lock is held by process 4242",
        );
        assert_stderr_has(out, "`yoyo break-lock` releases it");
    }
    assert_eq!(outsider.one("SELECT 'still connected'"), "still connected");
}

/// golang-migrate's marker of a half-applied migration (`schema_migrations.dirty`, its own DDL),
/// named after a failed attempt with the tool's way out, and never changed.
#[test]
fn dirty_marker_of_golang_migrate_is_named_after_a_failed_attempt() {
    let db = cluster().new_db("dirty_marker");
    db.rows(
        "CREATE TABLE schema_migrations (version bigint NOT NULL PRIMARY KEY, dirty boolean NOT NULL); \
         INSERT INTO schema_migrations VALUES (20240101, true)",
    );
    let first = db.gate_output(&["migrate", "--release", "v1", "--", "sh", "-c", "exit 3"]);
    assert_eq!(code(&first), 3, "{}", stderr(&first));
    assert!(
        !stderr(&first).contains("golang-migrate"),
        "named only after a failed or abandoned attempt: {}",
        stderr(&first)
    );
    let second = db.gate_output(&["migrate", "--release", "v1", "--", standin(), "migrate"]);
    assert_eq!(code(&second), 0, "{}", stderr(&second));
    assert_eq!(
        db.rows("SELECT version::text, dirty::text FROM schema_migrations"),
        [["20240101", "true"]],
        "the marker is never changed"
    );
    let line = "golang-migrate in public.schema_migrations: version 20240101 is dirty";
    assert_stderr_has(&second, line);
    assert_stderr_has(&second, "`migrate force V`");
    let detail = db.one("SELECT detail FROM migrations_gate.ledger WHERE outcome = 'done'");
    assert!(detail.contains(line), "recorded on the attempt: {detail}");
}

/// A release whose migration fails every time: three failed attempts (the default
/// `--max-failures`), then every replica exits 65 with the last failure, without running it;
/// `reset` lets it run again.
#[test]
fn failing_release_stops_after_max_failures_and_reset_lets_it_run_again() {
    let db = cluster().new_db("failing_release");
    let fail = ["migrate", "--release", "v1", "--", "sh", "-c", "exit 3"];
    for _ in 0..3 {
        let out = db.gate_output(&fail);
        assert_eq!(code(&out), 3, "{}", stderr(&out));
    }
    let log = scratch("failing").join("termination-log");
    std::fs::write(&log, "").expect("create the termination log");
    let fleet: Vec<Child> = (0..4)
        .map(|_| {
            let mut c = db.gate();
            c.env("MIGRATIONS_GATE_TERMINATION_LOG", &log).args(fail);
            spawn(&mut c)
        })
        .collect();
    let outs = wait_all(fleet, HANG_GUARD);
    assert_eq!(db.ledger().count("failed"), 3, "no replica ran it again");
    assert_eq!(db.ledger().attempts().len(), 3);
    for o in &outs {
        assert_eq!(code(o), 65, "{}", stderr(o));
        assert_stderr_has(o, "release \"v1\" failed 3 time(s)");
        assert_stderr_has(o, "exit 3");
        assert_stderr_has(o, "migrations-gate reset --release v1");
    }
    let said = std::fs::read_to_string(&log).expect("read the termination log");
    assert!(said.contains("failed 3 time(s)"), "{said}");
    let reset = db.gate_output(&["reset", "--release", "v1"]);
    assert_eq!(code(&reset), 0, "{}", stderr(&reset));
    let ok = db.gate_output(&["migrate", "--release", "v1", "--", standin(), "migrate"]);
    assert_eq!(code(&ok), 0, "{}", stderr(&ok));
    assert_eq!(db.ledger().times_done("v1"), 1);
    let _ = std::fs::remove_dir_all(log.parent().expect("scratch"));
}

/// Only a migration's own failure counts against `--max-failures`. A holder stopped by the
/// platform (SIGTERM: a pod deleted, a rollout, a drain) passes the signal on; its migration
/// exits 143 and the attempt is recorded as interrupted. Three of them, then a normal replica:
/// it migrates and exits 0, where it used to exit 65.
#[test]
fn sigtermed_holders_do_not_lock_the_release_out() {
    let db = cluster().new_db("sigtermed_holders");
    let slow = [
        "migrate",
        "--release",
        "r1",
        "--kill-grace",
        "1s",
        "--",
        "sleep",
        "30",
    ];
    for _ in 0..3 {
        let holder = spawn(db.gate().args(slow));
        // The migration runs (the gate passes signals on only while it has a child).
        let gate = holder.id() as i32;
        eventually(Duration::from_secs(30), "the holder's migration", || {
            descendants(gate).iter().any(|p| {
                std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                    .is_ok_and(|c| c.starts_with("sleep\0"))
            })
        });
        // SAFETY: signalling a child process of this test by its PID.
        unsafe {
            libc::kill(holder.id() as i32, libc::SIGTERM);
        }
        let out = wait_output(holder, HANG_GUARD);
        assert_eq!(code(&out), 143, "{}", stderr(&out));
    }
    let recorded = db.rows(
        "SELECT outcome, detail FROM migrations_gate.ledger WHERE release = 'r1' ORDER BY id",
    );
    assert_eq!(recorded.len(), 3);
    for row in &recorded {
        assert_eq!(row[0], "failed");
        assert!(
            row[1].starts_with("interrupted: the gate received SIGTERM"),
            "{row:?}"
        );
    }
    let out = db.gate_output(&["migrate", "--release", "r1", "--", standin(), "migrate"]);
    assert_eq!(db.ledger().times_done("r1"), 1);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let status = db.gate_output(&["status", "--release", "r1"]);
    assert_stdout_has(&status, "interrupted");
}

/// Holders that gave up waiting for apps of another release (`--other-releases wait`, exit 75)
/// never ran the migration: recorded as refused, not counted. Once the old app is gone, a
/// normal replica migrates.
#[test]
fn other_releases_wait_timeouts_do_not_lock_the_release_out() {
    let db = cluster().new_db("other_releases_timeouts");
    assert_eq!(
        code(&db.gate_output(&["migrate", "--release", "r0", "--", standin(), "migrate"])),
        0
    );
    // An app of r0, started by the gate as a follower: its session carries r0's tag.
    let psql = pg_bindir().join("psql").to_string_lossy().into_owned();
    let same_migration = format!("{} migrate", standin());
    let old_app = spawn(db.gate().args([
        "run",
        "--release",
        "r0",
        "--migrate",
        &same_migration,
        "--",
        &psql,
        &db.url,
        "-X",
        "-q",
        "-c",
        "select pg_sleep(600)",
    ]));
    eventually(Duration::from_secs(30), "the r0 app's session", || {
        db.one("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'select pg_sleep(600)%'")
            == "1"
    });
    for _ in 0..3 {
        let out = db.gate_output(&[
            "migrate",
            "--release",
            "r1",
            "--other-releases",
            "wait",
            "--wait-timeout",
            "2s",
            "--",
            "true",
        ]);
        assert_eq!(code(&out), 75, "{}", stderr(&out));
    }
    assert_eq!(db.ledger().count("failed"), 3);
    let mut old_app = old_app;
    let _ = old_app.kill();
    let _ = old_app.wait();
    db.one("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE query LIKE 'select pg_sleep(600)%'");
    eventually(Duration::from_secs(30), "the r0 app gone", || {
        db.one("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'select pg_sleep(600)%'")
            == "0"
    });
    let out = db.gate_output(&[
        "migrate",
        "--release",
        "r1",
        "--other-releases",
        "wait",
        "--",
        "true",
    ]);
    assert_eq!(db.ledger().times_done("r1"), 1);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
}
