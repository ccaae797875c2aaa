//! Watching and bounding a running migration: what it waits on and who blocks it (logged by the
//! holder, shown by `status`), `--migration-timeout`, `--lock-timeout`. Every migration is
//! `psql` running one statement against a real PostgreSQL, through the real gate.

mod support;

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use support::*;

/// One test's database (with a table `runs`) and a scratch folder.
struct Case {
    db: TestDb,
    dir: PathBuf,
}

impl Case {
    fn new(name: &str) -> Case {
        let db = cluster().new_db(name);
        db.rows("CREATE TABLE runs (id int)");
        let dir =
            std::env::temp_dir().join(format!("mg-watching-{}-{}", std::process::id(), db.name));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        // Written only when it exists, as in Kubernetes.
        std::fs::write(dir.join("termination-log"), "").expect("termination log");
        Case { db, dir }
    }

    /// A gate migrating release `r1` with `statement` run by psql, plus `flags`.
    fn gate(&self, statement: &str, flags: &[&str]) -> Command {
        self.gate_release("r1", statement, flags)
    }

    /// A gate migrating `release` with `statement` run by psql, plus `flags`.
    fn gate_release(&self, release: &str, statement: &str, flags: &[&str]) -> Command {
        let psql = pg_bindir().join("psql");
        let mut c = self.db.gate();
        c.env("MIG_URL", &self.db.url)
            .env("MIG_SQL", statement)
            .env(
                "MIGRATIONS_GATE_TERMINATION_LOG",
                self.dir.join("termination-log"),
            )
            // One application: its apps (below) name another command.
            .args([
                "migrate",
                "--release",
                release,
                "--app",
                "watching",
                "--kill-grace",
                "1s",
            ])
            .args(flags)
            .args(["--", "sh", "-c"])
            .arg(format!(
                "exec {} -X -q -v ON_ERROR_STOP=1 \"$MIG_URL\" -c \"$MIG_SQL\"",
                psql.display()
            ));
        c
    }

    /// A replica of `release` started through the gate as a follower (the release is done):
    /// its app is psql running `statement`, with the gate's tag for `release`.
    fn app(&self, release: &str, statement: &str) -> std::process::Child {
        let psql = pg_bindir().join("psql");
        let mut c = self.db.gate();
        c.env("MIG_URL", &self.db.url)
            .env("APP_SQL", statement)
            .args([
                "run",
                "--release",
                release,
                "--app",
                "watching",
                "--migrate",
                "true",
                "--",
                "sh",
                "-c",
            ])
            .arg(format!(
                "exec {} -X -q \"$MIG_URL\" -c \"$APP_SQL\"",
                psql.display()
            ));
        spawn(&mut c)
    }

    /// Waits until `n` sessions of apps (tag without attempt) are connected.
    fn wait_apps(&self, n: usize) {
        eventually(HANG_GUARD, "the old release's app is connected", || {
            self.db.one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND application_name LIKE 'mgate:%:-'",
            ) == n.to_string()
        });
    }

    /// An old release's open transaction on `runs`, as an app's long transaction would be,
    /// under application_name `old-app`. Returns the session and its backend PID.
    fn open_transaction(&self, secret: &str) -> (Session, String) {
        let mut old = Session::open(&format!("{}?application_name=old-app", self.db.url));
        let pid = old.one("SELECT pg_backend_pid()::text");
        old.one("BEGIN");
        old.one(&format!(
            "SELECT count(*)::text FROM runs WHERE '{secret}' IS NOT NULL"
        ));
        (old, pid)
    }

    /// Waits until an `ALTER TABLE runs` waits on a lock.
    fn wait_for_queued_alter(&self) {
        eventually(HANG_GUARD, "the ALTER waits on a lock", || {
            self.db.one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND wait_event_type = 'Lock' AND query LIKE 'ALTER TABLE runs%'",
            ) == "1"
        });
    }

    fn termination_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("termination-log")).unwrap_or_default()
    }

    /// `status --json`, parsed.
    fn status_json(&self) -> serde_json::Value {
        let out = self.db.gate_output(&["status", "--json"]);
        serde_json::from_str(&stdout(&out)).expect("status --json prints JSON")
    }
}

impl Drop for Case {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn tagged_sessions(db: &TestDb) -> String {
    db.one(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
         AND application_name LIKE 'mgate:%' AND pid <> pg_backend_pid()",
    )
}

#[test]
fn a_migration_blocked_behind_an_open_transaction_is_reported_with_its_blocker_until_it_commits() {
    let case = Case::new("blocked_report");
    let (mut old, old_pid) = case.open_transaction("sk_live_4f9a22");
    let gate = spawn(&mut case.gate(
        "ALTER TABLE runs ADD COLUMN note text DEFAULT 'alice@example.com'",
        &["--report-waits-after", "1s"],
    ));
    case.wait_for_queued_alter();
    // A second operator looks: the running attempt's session, and who blocks it.
    let status = case.status_json();
    let running = &status["running"][0];
    assert_eq!(
        running["sessions"].as_array().map(Vec::len),
        Some(1),
        "{status}"
    );
    let wait = &running["waits"][0];
    assert_eq!(wait["command"], "ALTER TABLE", "{status}");
    assert_eq!(wait["lock"], "runs", "{status}");
    assert_eq!(wait["mode"], "AccessExclusiveLock", "{status}");
    assert_eq!(
        wait["blocked_by"][0]["pid"].to_string(),
        old_pid,
        "{status}"
    );
    assert_eq!(
        wait["blocked_by"][0]["application_name"], "old-app",
        "{status}"
    );
    assert_eq!(
        wait["blocked_by"][0]["state"], "idle in transaction",
        "{status}"
    );
    let text = stdout(&case.db.gate_output(&["status"]));
    assert_mentions(
        &text,
        &[
            "attempt 1 is running; its database sessions:",
            "  waiting: pid ",
            &format!(
                "for AccessExclusiveLock on runs; blocked by pid {old_pid} (application_name \"old-app\""
            ),
        ],
    );
    // Past the 1 s threshold and a look (every second for this threshold).
    std::thread::sleep(Duration::from_millis(3000));
    old.one("COMMIT");
    let out = wait_output(gate, HANG_GUARD);
    assert_eq!(
        case.db.one("SELECT count(*) FROM information_schema.columns WHERE table_name = 'runs' AND column_name = 'note'"),
        "1"
    );
    assert_eq!(case.db.ledger().outcomes(), ["done"]);
    assert_codes(&[(&out, 0)]);
    let log = stderr(&out);
    assert_mentions(
        &log,
        &[
            "a session of the migration waits for a lock: pid ",
            "(ALTER TABLE) has waited ",
            "for AccessExclusiveLock on runs; blocked by pid ",
            &format!("blocked by pid {old_pid} (application_name \"old-app\", client "),
            "idle in transaction, transaction open ",
            "a session of the migration no longer waits for a lock",
        ],
    );
    assert_eq!(
        log.matches("WARN a session of the migration waits for a lock")
            .count(),
        1,
        "one report within 30 s: {log}"
    );
    for secret in ["sk_live_4f9a22", "alice@example.com"] {
        assert!(
            !log.contains(secret),
            "a query's text reached the log: {log}"
        );
    }
}

#[test]
fn migration_timeout_stops_a_stuck_migration_ends_its_sessions_and_the_next_replica_migrates() {
    let case = Case::new("migration_timeout");
    let started = Instant::now();
    let out = wait_output(
        spawn(&mut case.gate("SELECT pg_sleep(60)", &["--migration-timeout", "2s"])),
        HANG_GUARD,
    );
    let took = started.elapsed();
    assert_eq!(
        tagged_sessions(&case.db),
        "0",
        "the migration's session is gone"
    );
    let attempts = case.db.ledger().attempts();
    assert_eq!(attempts.len(), 1, "{attempts:?}");
    assert_eq!(attempts[0].outcome, "failed");
    assert_mentions(
        &attempts[0].detail,
        &["--migration-timeout (2.0s)", "session"],
    );
    assert_codes(&[(&out, 75)]);
    assert!(took < Duration::from_secs(20), "stopped in {took:?}");
    assert_mentions(&case.termination_log(), &["did not finish after 2.0s"]);
    assert_stderr_has(
        &out,
        "ran longer than --migration-timeout (2.0s) and was stopped",
    );
    // The next replica takes over, says what happened before it, and migrates.
    let next = wait_output(spawn(&mut case.gate("SELECT 1", &[])), HANG_GUARD);
    assert_eq!(case.db.ledger().outcomes(), ["failed", "done"]);
    assert_codes(&[(&next, 0)]);
    assert_stderr_has(&next, " failed with exit code ");
    assert_stderr_has(
        &next,
        "ran longer than --migration-timeout (2.0s) and was stopped; sessions: ",
    );
    case.db.assert_no_gate_locks();
}

#[test]
fn lock_timeout_makes_a_blocked_alter_fail_fast_on_a_direct_route() {
    let case = Case::new("lock_timeout");
    let (mut old, _) = case.open_transaction("x");
    let started = Instant::now();
    let out: Output = wait_output(
        spawn(&mut case.gate(
            "ALTER TABLE runs ADD COLUMN late int",
            &["--lock-timeout", "500ms"],
        )),
        HANG_GUARD,
    );
    let took = started.elapsed();
    old.one("COMMIT");
    assert_eq!(
        case.db.one("SELECT count(*) FROM information_schema.columns WHERE table_name = 'runs' AND column_name = 'late'"),
        "0"
    );
    assert_eq!(case.db.ledger().outcomes(), ["failed"]);
    assert_ne!(code(&out), 0, "{}", stderr(&out));
    assert!(took < Duration::from_secs(10), "failed after {took:?}");
    assert_stderr_has(&out, "lock timeout");
}

#[test]
fn a_new_release_waits_for_the_old_releases_app_refuses_under_fail_and_goes_on_under_ignore() {
    let case = Case::new("other_releases");
    case.db.rows("CREATE TABLE seen (who text, at timestamptz)");
    let v1 = wait_output(
        spawn(&mut case.gate_release("v1", "SELECT 1", &[])),
        HANG_GUARD,
    );
    assert_codes(&[(&v1, 0)]);
    // A replica of v1 serving, started through the gate: its session carries v1's tag.
    let v1_app = case.app(
        "v1",
        "SELECT pg_sleep(5); INSERT INTO seen VALUES ('v1 app', clock_timestamp())",
    );
    case.wait_apps(1);
    let migration = "INSERT INTO seen VALUES ('v2 migration', clock_timestamp())";

    // fail: refused, recorded, nothing migrated, the old app untouched.
    let refused = wait_output(
        spawn(&mut case.gate_release("v2", migration, &["--other-releases", "fail"])),
        HANG_GUARD,
    );
    assert_eq!(case.db.one("SELECT count(*) FROM seen"), "0");
    assert_eq!(case.db.ledger().outcomes_at("v2"), ["failed"]);
    case.wait_apps(1);
    assert_codes(&[(&refused, 78)]);
    assert_stderr_has(&refused, "release \"v1\": 1 session(s) from 127.0.0.1");
    assert_stderr_has(&refused, "strategy Recreate");

    // wait (the default): migrates once the old app has disconnected.
    let waited = wait_output(
        spawn(&mut case.gate_release("v2", migration, &["--wait-timeout", "60s"])),
        HANG_GUARD,
    );
    let v1_app = wait_output(v1_app, HANG_GUARD);
    let seen = case.db.rows("SELECT who FROM seen ORDER BY at");
    assert_eq!(
        seen,
        [["v1 app"], ["v2 migration"]],
        "migrated after the old app left"
    );
    assert_eq!(case.db.ledger().outcomes_at("v2"), ["failed", "done"]);
    assert_codes(&[(&waited, 0), (&v1_app, 0)]);
    assert_mentions(
        &stderr(&waited),
        &[
            "apps of another release are still connected; waiting for them to disconnect",
            "release \"v1\": 1 session(s) from 127.0.0.1",
            "no app of another release is connected any more; migrating",
            // The refused attempt, before migrating again.
            "failed with exit code 78 at ",
            ": refusing to migrate release \"v2\"",
        ],
    );

    assert_mentions(
        &case.termination_log(),
        &["migrated release \"v2\"", ", after attempt 2 by "],
    );

    // ignore: v3 migrates while a v2 app is connected.
    let mut v2_app = case.app("v2", "SELECT pg_sleep(30)");
    case.wait_apps(1);
    let ignored = wait_output(
        spawn(&mut case.gate_release("v3", "SELECT 1", &["--other-releases", "ignore"])),
        HANG_GUARD,
    );
    assert_eq!(case.db.ledger().outcomes_at("v3"), ["done"]);
    let _ = v2_app.kill();
    let _ = v2_app.wait();
    assert_codes(&[(&ignored, 0)]);
}

#[test]
fn a_lock_held_by_a_session_that_is_not_a_gate_is_named_with_how_to_end_it() {
    let case = Case::new("foreign_holder");
    let (mut holder, _) = hold_lock(&case.db.url, "migrations-gate");
    let pid = holder.one("SELECT pg_backend_pid()::text");
    let out = wait_output(
        spawn(&mut case.gate("SELECT 1", &["--wait-timeout", "2s"])),
        HANG_GUARD,
    );
    drop(holder);
    assert!(!case.db.ledger().exists() || case.db.ledger().attempts().is_empty());
    assert_codes(&[(&out, 75)]);
    assert_mentions(
        &stderr(&out),
        &[
            "which does not look like a migrations-gate",
            &format!("end it with `SELECT pg_terminate_backend({pid})`"),
        ],
    );
    assert!(
        !stderr(&out).contains("check that replica's logs"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn the_open_webui_preset_refuses_forked_workers_that_would_migrate_on_start_up() {
    let case = Case::new("preset_workers");
    let out = case
        .db
        .gate()
        .env("UVICORN_WORKERS", "4")
        .env("VECTOR_DB", "pgvector")
        .args(["run", "--release", "r1", "--preset", "open-webui"])
        .args(["--ready-tcp", "127.0.0.1:9", "--", "true"])
        .output()
        .expect("run the gate");
    assert!(!case.db.ledger().exists(), "refused before the database");
    assert_codes(&[(&out, 78)]);
    assert_stderr_has(
        &out,
        "wants `run` has --migrate \"python -c 'import open_webui.config'\" when UVICORN_WORKERS > 1",
    );
}

#[test]
fn lock_timeout_behind_pgbouncer_is_not_passed_and_says_why() {
    let case = Case::new("lock_timeout_pooled");
    let bouncer = PgBouncer::start(cluster(), "transaction", 4);
    let url = bouncer.url(&case.db.name);
    let out = wait_output(
        spawn(
            case.gate(
                "ALTER TABLE runs ADD COLUMN pooled int",
                &["--lock-timeout", "500ms"],
            )
            .env("MIGRATIONS_GATE_DATABASE_URL", &url)
            .env("MIG_URL", &url),
        ),
        HANG_GUARD,
    );
    drop(bouncer);
    assert_eq!(case.db.ledger().outcomes(), ["done"]);
    assert_codes(&[(&out, 0)]);
    assert_stderr_has(
        &out,
        "--lock-timeout is not passed to the migration: the gate reaches PostgreSQL through a pooler or proxy",
    );
}
