//! An attempt ends when its database work ends: a stopped migration's statement never runs on
//! beside the next holder's, nor commits after its attempt was recorded. Each case runs through
//! a direct connection and through PgBouncer in transaction mode, with the migration on the same
//! URL as the gate. The migration is `psql` running one long statement that records its own
//! `statement_timestamp()` and `clock_timestamp()`, so the database itself says when each ran;
//! a sampler thread watches `pg_stat_activity` meanwhile.

mod support;

use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use support::*;

/// How the migration and the gate reach PostgreSQL.
#[derive(Clone, Copy, Debug)]
enum Route {
    Direct,
    Transaction,
}

/// One test's database, the URL the gate and its migration use, and a scratch folder.
struct Case {
    db: TestDb,
    url: String,
    dir: PathBuf,
    /// PgBouncer in transaction mode with a pool of 4, for [`Route::Transaction`]: fewer server
    /// connections than the gates, their lock sessions and the migrations would like. Stopped
    /// when the case ends.
    _bouncer: Option<PgBouncer>,
}

impl Case {
    fn new(name: &str, route: Route) -> Case {
        let db = cluster().new_db(name);
        db.rows("CREATE TABLE runs (tag text, started timestamptz, finished timestamptz)");
        let bouncer = match route {
            Route::Direct => None,
            Route::Transaction => Some(PgBouncer::start(cluster(), "transaction", 4)),
        };
        let url = match &bouncer {
            None => db.url.clone(),
            Some(b) => b.url(&db.name),
        };
        let dir =
            std::env::temp_dir().join(format!("mg-sessions-{}-{}", std::process::id(), db.name));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Case {
            db,
            url,
            dir,
            _bouncer: bouncer,
        }
    }

    fn psql(&self) -> String {
        pg_bindir().join("psql").to_string_lossy().into_owned()
    }

    /// `sh -c` that writes its PID (then psql's, by exec) to `pidfile` and runs `$MIG_SQL`.
    fn migration(&self, pidfile: &str) -> Vec<String> {
        let script = format!(
            "echo $$ > {}; exec {} -X -q -v ON_ERROR_STOP=1 \"$MIG_URL\" -c \"$MIG_SQL\"",
            self.dir.join(pidfile).display(),
            self.psql()
        );
        vec!["sh".into(), "-c".into(), script]
    }

    /// A gate migrating `release` with `statement` (run by psql), pidfile `name`.
    fn gate(&self, name: &str, statement: &str, flags: &[&str]) -> Command {
        let mut c = self.db.gate();
        c.env("MIGRATIONS_GATE_DATABASE_URL", &self.url)
            .env("DATABASE_URL", &self.url)
            .env("MIG_URL", &self.url)
            .env("MIG_SQL", statement)
            .args(["migrate", "--release", "r1", "--kill-grace", "1s"])
            .args(flags)
            .arg("--")
            .args(self.migration(name));
        c
    }

    fn pid(&self, name: &str) -> i32 {
        let path = self.dir.join(name);
        let mut pid = None;
        eventually(HANG_GUARD, "the migration wrote its pid", || {
            pid = std::fs::read_to_string(&path)
                .ok()
                .and_then(|s| s.trim().parse().ok());
            pid.is_some()
        });
        pid.unwrap_or(0)
    }

    /// Waits until a statement of `runs` like `pattern` is active on the server.
    fn wait_active(&self, pattern: &str) {
        let q = format!(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND state = 'active' AND query LIKE '{pattern}'"
        );
        eventually(HANG_GUARD, "the migration's statement is active", || {
            self.db.one(&q) != "0"
        });
    }
}

impl Drop for Case {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A long backfill: one row that says when the statement started and ended.
fn backfill(secs: f64) -> String {
    format!(
        "INSERT INTO runs SELECT current_setting('application_name'), statement_timestamp(), clock_timestamp() FROM pg_sleep({secs})"
    )
}

/// Samples `pg_stat_activity` every 20 ms and keeps the highest number of the tests'
/// statements that were running at once.
struct Sampler {
    stop: Arc<AtomicBool>,
    most: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl Sampler {
    fn start(db: &TestDb, pattern: &str) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let most = Arc::new(AtomicUsize::new(0));
        let (s, m, url) = (stop.clone(), most.clone(), db.url.clone());
        let q = format!(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND state <> 'idle' AND query LIKE '{pattern}' AND pid <> pg_backend_pid()"
        );
        let thread = std::thread::spawn(move || {
            let mut session = Session::open(&url);
            while !s.load(Ordering::SeqCst) {
                let n: usize = session.one(&q).parse().unwrap_or(0);
                m.fetch_max(n, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Sampler {
            stop,
            most,
            thread: Some(thread),
        }
    }

    fn most(mut self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.most.load(Ordering::SeqCst)
    }
}

fn kill(pid: i32, sig: i32) {
    // SAFETY: plain system call on a PID this test started.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// What the database must show after a stopped first attempt and a second that migrated:
/// exactly one row in `runs`, the second attempt's; the first `failed`, the second `done`.
fn assert_only_the_second_ran(case: &Case, first_started: Instant, first_secs: f64) {
    // The stopped statement would have committed `first_secs` after it started: look after that.
    let until = first_started + Duration::from_secs_f64(first_secs + 1.0);
    if let Some(rest) = until.checked_duration_since(Instant::now()) {
        std::thread::sleep(rest);
    }
    let runs = case.db.rows("SELECT tag FROM runs ORDER BY started");
    let attempts = case.db.rows(
        "SELECT id::text, outcome FROM migrations_gate.ledger WHERE release = 'r1' ORDER BY id",
    );
    assert_eq!(attempts.len(), 2, "two attempts: {attempts:?}");
    assert_eq!(attempts[0][1], "failed", "{attempts:?}");
    assert_eq!(attempts[1][1], "done", "{attempts:?}");
    assert_eq!(
        runs.len(),
        1,
        "only the second attempt's statement committed: {runs:?}"
    );
    assert!(
        runs[0][0].ends_with(&format!(":{}", attempts[1][0])),
        "the committed row is the second attempt's: {runs:?} {attempts:?}"
    );
    case.db.assert_no_gate_locks();
}

/// What stops the first attempt while its statement runs and a second gate waits.
#[derive(Clone, Copy)]
enum Stop {
    /// The migration process is killed (the OOM killer, a crash); the gate survives.
    KillMigration,
    /// The holder gate gets SIGTERM (pod deletion, a rollout): it forwards it and exits.
    TermHolder,
}

/// The first attempt's backfill is stopped by `stop`; the second gate migrates. Only the second
/// attempt's statement may ever run or commit.
fn first_attempt_stopped(route: Route, stop: Stop) {
    let case = Case::new("stopped", route);
    let sampler = Sampler::start(&case.db, "INSERT INTO runs%");
    let first_started = Instant::now();
    let a = spawn(&mut case.gate("a.pid", &backfill(6.0), &[]));
    case.wait_active("INSERT INTO runs%");
    let b = spawn(&mut case.gate("b.pid", &backfill(0.5), &[]));
    let code = match stop {
        Stop::KillMigration => {
            kill(case.pid("a.pid"), libc::SIGKILL);
            137
        }
        Stop::TermHolder => {
            kill(a.id() as i32, libc::SIGTERM);
            143
        }
    };
    let a = wait_output(a, HANG_GUARD);
    let b = wait_output(b, HANG_GUARD);
    assert_only_the_second_ran(&case, first_started, 6.0);
    assert!(sampler.most() <= 1, "two attempts' statements ran at once");
    assert_codes(&[(&a, code), (&b, 0)]);
    let detail = case.db.one(
        "SELECT detail FROM migrations_gate.ledger WHERE release = 'r1' AND outcome = 'failed'",
    );
    assert_mentions(&detail, &["sessions: "]);
}

#[test]
fn a_killed_migrations_statement_is_ended_before_the_attempt_is_recorded_direct() {
    first_attempt_stopped(Route::Direct, Stop::KillMigration);
}

#[test]
fn a_killed_migrations_statement_is_ended_before_the_attempt_is_recorded_pgbouncer() {
    first_attempt_stopped(Route::Transaction, Stop::KillMigration);
}

#[test]
fn sigterm_to_the_holder_ends_its_statement_before_the_next_holder_migrates_direct() {
    first_attempt_stopped(Route::Direct, Stop::TermHolder);
}

#[test]
fn sigterm_to_the_holder_ends_its_statement_before_the_next_holder_migrates_pgbouncer() {
    first_attempt_stopped(Route::Transaction, Stop::TermHolder);
}

fn holder_killed(route: Route) {
    let case = Case::new("holder_sigkill", route);
    let sampler = Sampler::start(&case.db, "INSERT INTO runs%");
    let first_started = Instant::now();
    // Longer than the taker-over's fence wait (about 8 s with --kill-grace 1s).
    let a = spawn(&mut case.gate("a.pid", &backfill(14.0), &[]));
    case.wait_active("INSERT INTO runs%");
    let b = spawn(&mut case.gate("b.pid", &backfill(0.5), &[]));
    let mut a: Child = a;
    let _ = a.kill();
    let _ = a.wait();
    let b = wait_output(b, HANG_GUARD);
    let runs_before_b = case.db.rows("SELECT tag FROM runs");
    assert_eq!(runs_before_b.len(), 1, "{runs_before_b:?}");
    let ledger = case.db.rows(
        "SELECT outcome, detail FROM migrations_gate.ledger WHERE release = 'r1' ORDER BY id",
    );
    assert_eq!(ledger[0][0], "abandoned", "{ledger:?}");
    if let Route::Transaction = route {
        // No client_connection_check_interval behind a pooler: the statement was still running
        // when the taker-over came, which ended it and said so in both rows.
        assert_mentions(&ledger[0][1], &["sessions: 1 session(s) cancelled"]);
        assert_mentions(
            &ledger[1][1],
            &["earlier attempts' sessions: 1 session(s) cancelled"],
        );
    }
    assert_codes(&[(&b, 0)]);
    assert!(sampler.most() <= 1, "two attempts' statements ran at once");
    // The dead holder's statement never commits.
    let until = first_started + Duration::from_secs(15);
    if let Some(rest) = until.checked_duration_since(Instant::now()) {
        std::thread::sleep(rest);
    }
    assert_eq!(case.db.one("SELECT count(*) FROM runs"), "1");
}

#[test]
fn a_sigkilled_holders_statement_is_ended_before_a_taker_over_migrates_direct() {
    holder_killed(Route::Direct);
}

#[test]
fn a_sigkilled_holders_statement_is_ended_before_a_taker_over_migrates_pgbouncer() {
    holder_killed(Route::Transaction);
}

/// An `ALTER TABLE` queued behind another session's open transaction, and a reader queued
/// behind the `ALTER`: stopping the holder must free the reader at once and the `ALTER` must
/// never commit.
fn queued_alter_stopped(route: Route, signal: i32) {
    let case = Case::new("queued_alter", route);
    // An old release's open transaction: direct, as an app's long transaction would be.
    let mut old = Session::open(&case.db.url);
    old.one("BEGIN");
    old.one("SELECT count(*) FROM runs");
    let a = spawn(&mut case.gate("a.pid", "ALTER TABLE runs ADD COLUMN added_by_a int", &[]));
    case.wait_active("ALTER TABLE runs%");
    eventually(HANG_GUARD, "the ALTER waits on a lock", || {
        case.db.one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE 'ALTER TABLE runs%'",
        ) == "1"
    });
    let mut reader = Command::new(case.psql());
    reader
        .args(["-X", "-q", "-c", "SELECT count(*) FROM runs"])
        .arg(&case.db.url);
    let reader = spawn(&mut reader);
    eventually(HANG_GUARD, "the reader queues behind the ALTER", || {
        case.db.one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE 'SELECT count(*) FROM runs%'",
        ) == "1"
    });
    let mut a: Child = a;
    kill(a.id() as i32, signal);
    if signal == libc::SIGKILL {
        let _ = a.wait();
        // The taker-over ends the dead holder's queued ALTER before it migrates.
        let b = wait_output(spawn(&mut case.gate("b.pid", "SELECT 1", &[])), HANG_GUARD);
        assert_codes(&[(&b, 0)]);
    } else {
        let a = wait_output(a, HANG_GUARD);
        assert_codes(&[(&a, 128 + signal)]);
    }
    // The reader got through while the old transaction is still open.
    let reader = wait_output(reader, HANG_GUARD);
    assert_succeeded(&reader, "the reader");
    assert_eq!(
        case.db.one("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'ALTER TABLE runs%' AND pid <> pg_backend_pid()"),
        "0",
        "the ALTER is gone"
    );
    old.one("COMMIT");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        case.db.one("SELECT count(*) FROM information_schema.columns WHERE table_name = 'runs' AND column_name = 'added_by_a'"),
        "0",
        "the stopped ALTER never committed"
    );
}

#[test]
fn a_stopped_alter_left_in_the_lock_queue_is_cancelled_and_readers_go_on_direct() {
    queued_alter_stopped(Route::Direct, libc::SIGTERM);
}

#[test]
fn a_stopped_alter_left_in_the_lock_queue_is_cancelled_and_readers_go_on_pgbouncer() {
    queued_alter_stopped(Route::Transaction, libc::SIGTERM);
}

#[test]
fn a_queued_alter_of_a_sigkilled_holder_is_ended_by_the_taker_over() {
    queued_alter_stopped(Route::Transaction, libc::SIGKILL);
}

#[test]
fn a_migration_client_that_sets_its_own_application_name_is_ended_too() {
    let case = Case::new("own_appname", Route::Direct);
    let sampler = Sampler::start(&case.db, "INSERT INTO runs%");
    let first_started = Instant::now();
    let own = format!("{}?application_name=my-migrator", case.db.url);
    let mut a = case.gate("a.pid", &backfill(6.0), &[]);
    a.env("MIG_URL", &own);
    let a = spawn(&mut a);
    eventually(HANG_GUARD, "the migration runs as my-migrator", || {
        case.db.one("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'my-migrator' AND state = 'active'") == "1"
    });
    // The holder looks at its child's sockets on its heartbeat (every second) and records the
    // sessions it finds in its attempt's row, where a taker-over of a `kill -9`ed holder reads
    // them.
    eventually(
        HANG_GUARD,
        "the holder records the session it found",
        || {
            case.db.one(
                "SELECT count(*) FROM migrations_gate.ledger l, pg_stat_activity a \
             WHERE l.outcome = 'running' AND a.application_name = 'my-migrator' \
               AND l.detail LIKE 'sessions seen: %' AND l.detail LIKE '%' || a.pid || '@%'",
            ) == "1"
        },
    );
    let b = spawn(&mut case.gate("b.pid", &backfill(0.5), &[]));
    kill(case.pid("a.pid"), libc::SIGKILL);
    let a = wait_output(a, HANG_GUARD);
    let b = wait_output(b, HANG_GUARD);
    assert!(sampler.most() <= 1, "two attempts' statements ran at once");
    let until = first_started + Duration::from_secs(7);
    if let Some(rest) = until.checked_duration_since(Instant::now()) {
        std::thread::sleep(rest);
    }
    let runs = case.db.rows("SELECT tag FROM runs");
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_codes(&[(&a, 137), (&b, 0)]);
}

/// Two roles of one test, dropped on drop (also when the test fails).
struct Roles {
    admin_url: String,
    names: Vec<String>,
}

impl Drop for Roles {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = std::panic::catch_unwind(|| {
                sql(
                    &self.admin_url,
                    &format!(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{name}'"
                    ),
                );
                sql(
                    &self.admin_url,
                    &format!("DROP OWNED BY {name} CASCADE; DROP ROLE {name}"),
                );
            });
        }
    }
}

#[test]
fn a_session_the_gate_may_not_end_keeps_the_lock_and_exits_77_naming_the_grant() {
    let case = Case::new("denied", Route::Direct);
    let n = std::process::id();
    let (gate_role, mig_role) = (format!("mg_gate_{n}"), format!("mg_mig_{n}"));
    case.db.rows(&format!(
        "CREATE ROLE {gate_role} LOGIN PASSWORD '{PASSWORD}'; \
         CREATE ROLE {mig_role} LOGIN PASSWORD '{PASSWORD}'; \
         CREATE SCHEMA migrations_gate AUTHORIZATION {gate_role}; \
         GRANT SELECT, INSERT ON runs TO {mig_role}"
    ));
    let _roles = Roles {
        admin_url: case.db.url.clone(),
        names: vec![gate_role.clone(), mig_role.clone()],
    };
    let as_role = |role: &str| {
        case.db.url.replacen(
            &format!("postgres:{PASSWORD}@"),
            &format!("{role}:{PASSWORD}@"),
            1,
        )
    };
    let mut a = case.gate("a.pid", &backfill(10.0), &["--wait-timeout", "3s"]);
    a.env("MIGRATIONS_GATE_DATABASE_URL", as_role(&gate_role))
        .env("DATABASE_URL", as_role(&gate_role))
        .env("MIG_URL", as_role(&mig_role))
        // The operator's own setting wins: without it the server would end the statement itself.
        .env("PGOPTIONS", "-c client_connection_check_interval=0");
    let a = spawn(&mut a);
    case.wait_active("INSERT INTO runs%");
    kill(case.pid("a.pid"), libc::SIGKILL);
    let locked = "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
                  WHERE l.locktype = 'advisory' AND l.granted AND a.datname = current_database()";
    // The migration is dead but its statement runs on: the gate keeps the lock meanwhile.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        case.db.one(locked),
        "1",
        "the lock is kept while the statement runs"
    );
    let a = wait_output(a, HANG_GUARD);
    // It gave up before the statement ended, and said so; the ledger does not claim it failed.
    assert_eq!(
        case.db.one(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = '{mig_role}' AND state = 'active'"
        )),
        "1",
        "the statement still runs when the gate gives up"
    );
    assert_eq!(
        case.db.one("SELECT outcome FROM migrations_gate.ledger"),
        "running"
    );
    assert_codes(&[(&a, 77)]);
    assert_mentions(
        &stderr(&a),
        &[
            &mig_role,
            "pg_signal_backend",
            &format!("GRANT pg_signal_backend TO \"{gate_role}\""),
        ],
    );
    assert!(!stderr(&a).contains(PASSWORD), "{}", stderr(&a));
}

/// Attempt IDs are rows of one database's ledger: a taker-over in one database never ends the
/// sessions of another database's attempt with the same ID (same lock name, same server).
#[test]
fn a_taker_over_never_ends_another_databases_attempt_with_the_same_id() {
    let x = Case::new("other_db_x", Route::Direct);
    let y = Case::new("other_db_y", Route::Direct);
    // Attempt 1 of X fails: its ID is now "unfinished" in X's ledger.
    let failed = wait_output(spawn(&mut x.gate("x1.pid", "SELECT 1/0", &[])), HANG_GUARD);
    assert_codes(&[(&failed, 1)]);
    // Attempt 1 of Y runs a backfill, tagged with the same lock and attempt ID.
    let y1 = spawn(&mut y.gate("y1.pid", &backfill(3.0), &[]));
    y.wait_active("INSERT INTO runs%");
    // X's next holder ends X's unfinished attempts' sessions before it migrates.
    let x2 = wait_output(spawn(&mut x.gate("x2.pid", "SELECT 1", &[])), HANG_GUARD);
    let y1 = wait_output(y1, HANG_GUARD);
    assert_eq!(
        y.db.one("SELECT count(*) FROM runs"),
        "1",
        "Y's backfill committed"
    );
    assert_eq!(
        y.db.one("SELECT outcome FROM migrations_gate.ledger"),
        "done"
    );
    assert_codes(&[(&x2, 0), (&y1, 0)]);
}
