//! `contract`: a release's contract step, run once after the rollout, when no app of an older
//! release has been connected for `--settle`. Real gates, real apps (the stand-in app serving,
//! started by the gate as followers, so their sessions carry their release's tag) and a real
//! PostgreSQL. The contract command is psql; it writes one row to `contract_runs` each time it
//! runs (with the server's clock, its flag and its application_name) and drops the column the
//! old release needed.

mod support;

use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use support::*;

/// Every gate of these tests is one application (`--app`): its replicas start by other
/// commands than its migrations.
const APP: &str = "shop";

/// The hang guard of a contract runner (`--wait-timeout`): the tests' own bound, not a timing
/// assertion.
const WAIT_TIMEOUT: &str = "60s";

/// v1 creates `items` with the column v1's code uses; v2's expand adds the one v2 uses.
const V1_EXPAND: &str = "CREATE TABLE items (id int, old_name text)";
const V2_EXPAND: &str = "ALTER TABLE items ADD COLUMN name text";

/// A fresh database with `contract_runs`, where the contract command writes.
fn new_db(name: &str) -> TestDb {
    let db = cluster().new_db(name);
    db.rows(
        "CREATE TABLE contract_runs (id serial PRIMARY KEY, flag text, app_name text, \
         at timestamptz NOT NULL)",
    );
    db
}

/// `migrate --release RELEASE --app shop FLAGS -- psql -c SQL`, to the end.
fn expand(db: &TestDb, release: &str, flags: &[&str], sql: &str) -> Output {
    let mut c = db.gate();
    c.args(["migrate", "--release", release, "--app", APP])
        .args(flags)
        .arg("--")
        .args(psql_command(&db.url, sql));
    wait_output(spawn(&mut c), HANG_GUARD)
}

/// v1 and v2 both migrated (v2's expand with `--other-releases ignore`, as in a rolling update).
fn two_releases(db: &TestDb) {
    let v1 = expand(db, "v1", &[], V1_EXPAND);
    let v2 = expand(db, "v2", &["--other-releases", "ignore"], V2_EXPAND);
    assert_codes(&[(&v1, 0), (&v2, 0)]);
}

/// `contract --release RELEASE --app shop --wait-timeout 60s FLAGS -- sh -c 'psql -c ...'`: the
/// contract command runs `before` (e.g. a `pg_sleep`), records its run and drops `old_name`, in
/// one implicit transaction.
fn contract(db: &TestDb, release: &str, flags: &[&str], before: &str) -> Command {
    let script = format!(
        "exec \"$PSQL\" \"$DATABASE_URL\" -X -q -v ON_ERROR_STOP=1 -c \"{before}\
         INSERT INTO contract_runs (flag, app_name, at) \
         VALUES ('$ENABLE_DB_MIGRATIONS', current_setting('application_name'), clock_timestamp()); \
         ALTER TABLE items DROP COLUMN old_name\""
    );
    let mut c = db.gate();
    c.env("PSQL", psql())
        .args(["contract", "--release", release, "--app", APP])
        .args(["--wait-timeout", WAIT_TIMEOUT])
        .args(flags)
        .args(["--", "sh", "-c", &script]);
    c
}

/// How many times the contract command ran (committed).
fn runs(db: &TestDb) -> usize {
    db.one("SELECT count(*) FROM contract_runs")
        .parse()
        .expect("a count")
}

/// Whether the column the old release needs is still there.
fn old_column_exists(db: &TestDb) -> bool {
    db.one(
        "SELECT count(*) FROM information_schema.columns \
         WHERE table_name = 'items' AND column_name = 'old_name'",
    ) == "1"
}

/// The release field of the gate's tags for `release` (the first 32 bits of its SHA-256).
fn release_hash(release: &str) -> String {
    format!("left(encode(sha256(convert_to('{release}', 'UTF8')), 'hex'), 8)")
}

/// A query for the number of app sessions (tag without an attempt) of `release` in the test's
/// database, with the server's clock: `COUNT|TIMESTAMP`.
fn sessions_query(release: &str) -> String {
    format!(
        "SELECT count(*)::text || '|' || clock_timestamp()::text FROM pg_stat_activity \
         WHERE datname = current_database() \
         AND split_part(split_part(application_name, ' ', 1), ':', 4) = {} \
         AND split_part(split_part(application_name, ' ', 1), ':', 5) = '-'",
        release_hash(release)
    )
}

/// Watches the app sessions of one release from a session of the test's own.
struct Watch {
    session: Session,
    query: String,
}

impl Watch {
    fn new(db: &TestDb, release: &str) -> Watch {
        Watch {
            session: Session::open(&db.url),
            query: sessions_query(release),
        }
    }

    /// (sessions, the server's clock when it counted them).
    fn look(&mut self) -> (usize, String) {
        let row = self.session.one(&self.query);
        let (n, at) = row.split_once('|').expect("COUNT|TIMESTAMP");
        (n.parse().expect("a count"), at.to_string())
    }

    /// Waits until exactly `n` app sessions of the release are connected. Returns the server's
    /// clock at the last look that still found more (when it ever did), and at the first look
    /// that found `n`.
    fn until(&mut self, n: usize) -> (Option<String>, String) {
        let start = Instant::now();
        let mut more = None;
        loop {
            let (seen, at) = self.look();
            if seen == n {
                return (more, at);
            }
            if seen > n {
                more = Some(at);
            }
            assert!(
                start.elapsed() < HANG_GUARD,
                "timed out waiting for {n} app session(s), {seen} connected"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops `app` (SIGTERM) and waits until `n` app sessions of the release are left. Returns
    /// the app's output and the server's clock at the last look that still found more than `n`
    /// (one is taken just before the signal: the session went after it) and at the first look
    /// that found `n` (it had gone by then).
    fn stop(&mut self, app: App, n: usize) -> (Output, String, String) {
        let (before, at) = self.look();
        assert!(
            before > n,
            "{before} app session(s) before the stop, {n} after"
        );
        let child = app.terminate();
        let (more, gone) = self.until(n);
        (wait_output(child, HANG_GUARD), more.unwrap_or(at), gone)
    }
}

/// Seconds from server timestamp `from` to the contract command's run (the one row).
fn run_after(db: &TestDb, from: &str) -> f64 {
    db.one(&format!(
        "SELECT extract(epoch FROM (SELECT at FROM contract_runs) - '{from}'::timestamptz)::text"
    ))
    .parse()
    .expect("seconds")
}

/// A replica of the app serving, started by the gate as a follower of `release` (`run ... --
/// standin-app serve`): its session carries the release's tag. It records its start in
/// `app_starts` with `flag` = its release. Stopped with SIGKILL if the test ends first.
struct App {
    child: Option<Child>,
}

impl App {
    fn start(db: &TestDb, release: &str, flags: &[&str]) -> App {
        let mut c = replica(db, release, flags, "serve");
        c.env("STANDIN_PORT", free_port().to_string());
        App {
            child: Some(spawn(&mut c)),
        }
    }

    /// SIGTERM, as a rollout stops a pod: the stand-in app records it and exits 42. Returns
    /// the process, to wait for.
    fn terminate(mut self) -> Child {
        let child = self.child.take().expect("running");
        // SAFETY: signalling a child process of this test by its PID (the gate exec'd the app).
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        child
    }

    /// [`App::terminate`], to the end.
    fn stop(self) -> Output {
        wait_output(self.terminate(), HANG_GUARD)
    }

    fn alive(&self) -> bool {
        self.child.as_ref().is_some_and(|c| alive(c.id() as i32))
    }
}

impl Drop for App {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `run --release RELEASE --app shop --migrate true FLAGS -- standin-app MODE`, the stand-in
/// recording `flag` = RELEASE.
fn replica(db: &TestDb, release: &str, flags: &[&str], mode: &str) -> Command {
    let mut c = db.gate();
    c.env("STANDIN_FLAG", "APP_RELEASE")
        .env("APP_RELEASE", release)
        .args([
            "run",
            "--release",
            release,
            "--app",
            APP,
            "--migrate",
            "true",
        ])
        .args(flags)
        .args(["--", standin(), mode]);
    c
}

/// How many apps of `release` started (the stand-in's `app_starts`).
fn starts(db: &TestDb, release: &str) -> String {
    db.one(&format!(
        "SELECT count(*) FROM app_starts WHERE flag = '{release}'"
    ))
}

/// The outcomes of the contract step's attempts, oldest first.
fn step_outcomes(db: &TestDb, release: &str) -> Vec<String> {
    db.ledger().outcomes_at(&format!("contract:{release}"))
}

/// v1 and v2 migrated, one app of v2 serving, and v2's contract step done: returns that app.
fn contracted(db: &TestDb) -> App {
    two_releases(db);
    let v2 = App::start(db, "v2", &[]);
    Watch::new(db, "v2").until(1);
    let out = wait_output(
        spawn(&mut contract(db, "v2", &["--settle", "1s"], "")),
        HANG_GUARD,
    );
    assert_eq!(runs(db), 1);
    assert_eq!(step_outcomes(db, "v2"), ["done"]);
    assert_codes(&[(&out, 0)]);
    v2
}

/// A rolling update from v1 to v2 with three replicas each, then three contract runners at
/// once: nothing runs while any v1 app is connected, however long; once the last one has gone,
/// the step runs exactly once, `--settle` later, with the flag on and v2's tag, and every
/// runner exits 0.
#[test]
fn the_contract_step_runs_once_settle_after_the_last_old_replica_went() {
    let db = new_db("contract_rollout");
    let v1 = expand(&db, "v1", &[], V1_EXPAND);
    assert_codes(&[(&v1, 0)]);
    let mut old: Vec<App> = (0..3).map(|_| App::start(&db, "v1", &[])).collect();
    let mut watch = Watch::new(&db, "v1");
    watch.until(3);
    let v2 = expand(&db, "v2", &["--other-releases", "ignore"], V2_EXPAND);
    assert_codes(&[(&v2, 0)]);
    let new: Vec<App> = (0..3).map(|_| App::start(&db, "v2", &[])).collect();
    Watch::new(&db, "v2").until(3);

    let runners: Vec<Child> = (0..3)
        .map(|_| spawn(&mut contract(&db, "v2", &["--settle", "2s"], "")))
        .collect();
    // The v1 replicas stop one by one, each after longer than --settle: nothing runs (no
    // attempt either) while one of them is connected.
    let mut last_seen = String::new();
    let mut gone_at = String::new();
    while let Some(app) = old.pop() {
        std::thread::sleep(Duration::from_secs(3));
        assert_eq!(
            runs(&db),
            0,
            "the contract step ran while a v1 app was connected"
        );
        assert!(step_outcomes(&db, "v2").is_empty());
        assert!(old_column_exists(&db));
        let out;
        (out, last_seen, gone_at) = watch.stop(app, old.len());
        assert_eq!(code(&out), 42, "{}", stderr(&out));
    }
    let outs = wait_all(runners, HANG_GUARD);

    assert_eq!(runs(&db), 1, "the contract command ran once");
    assert!(
        !old_column_exists(&db),
        "the contract command dropped the column"
    );
    let after = run_after(&db, &last_seen);
    assert!(
        after >= 2.0,
        "ran {after:.3}s after the last v1 app was last seen, before --settle (2s) had passed"
    );
    let late = run_after(&db, &gone_at);
    assert!(late < 10.0, "ran {late:.3}s after the last v1 app went");
    assert_eq!(step_outcomes(&db, "v2"), ["done"]);
    assert_eq!(db.ledger().times_done("v2"), 1);
    // The command ran as a migration: the flag on, its session tagged with v2 and its attempt.
    let attempt = db.one(
        "SELECT id FROM migrations_gate.ledger WHERE release = 'contract:v2' AND outcome = 'done'",
    );
    let tagged = db.one(&format!(
        "SELECT (flag = 'True' AND split_part(split_part(app_name, ' ', 1), ':', 4) = {} \
                AND split_part(split_part(app_name, ' ', 1), ':', 5) = '{attempt}')::text \
         FROM contract_runs",
        release_hash("v2")
    ));
    assert_eq!(
        tagged,
        "true",
        "{:?}",
        db.rows("SELECT * FROM contract_runs")
    );
    // The v2 apps served on; they are v2's own and never held the step up.
    assert!(new.iter().all(App::alive), "a v2 app stopped");
    assert_eq!(starts(&db, "v1"), "3");
    assert_eq!(starts(&db, "v2"), "3");

    assert_codes(&[(&outs[0], 0), (&outs[1], 0), (&outs[2], 0)]);
    for out in &outs {
        assert_stderr_has(
            out,
            "waiting for apps of older releases to disconnect before the contract step: \
             release \"v1\": 3 session(s) from 127.0.0.1",
        );
    }
    let (followers, ran): (Vec<&Output>, Vec<&Output>) = outs.iter().partition(|o| {
        stderr(o).contains("the contract step of this release is done; this runner did not run it")
    });
    assert_eq!(followers.len(), 2, "the other runners followed");
    assert_stderr_has(
        ran[0],
        "no app of an older release seen for 2.0s (--settle); running the contract step",
    );
    for app in new {
        let out = app.stop();
        assert_eq!(code(&out), 42, "{}", stderr(&out));
    }
    db.assert_no_gate_locks();
}

/// The runner that holds the step is killed with SIGKILL while its command runs (a `pg_sleep`
/// before the insert, in one transaction): the other runner takes over after the fencing wait,
/// ends the killed attempt's session, and the command's insert happens exactly once.
#[test]
fn a_contract_runner_killed_mid_step_is_taken_over_and_the_step_runs_once() {
    let db = new_db("contract_killed");
    two_releases(&db);
    let app = App::start(&db, "v2", &[]);
    Watch::new(&db, "v2").until(1);
    let flags = ["--settle", "1s", "--kill-grace", "1s"];
    let runners: Vec<Child> = (0..2)
        .map(|_| spawn(&mut contract(&db, "v2", &flags, "SELECT pg_sleep(4); ")))
        .collect();
    eventually(HANG_GUARD, "the contract command's pg_sleep", || {
        db.one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND state = 'active' AND query LIKE 'SELECT pg_sleep(4);%'",
        ) == "1"
    });
    let holder = db.ledger().running_pids();
    assert_eq!(holder.len(), 1, "{:?}", db.ledger().attempts());
    assert!(
        runners.iter().any(|r| r.id() as i32 == holder[0]),
        "the holder is one of the runners"
    );
    // SAFETY: signalling a child process of this test by its PID.
    unsafe {
        libc::kill(holder[0], libc::SIGKILL);
    }
    let outs = wait_all(runners, HANG_GUARD);

    assert_eq!(runs(&db), 1, "the contract command's insert happened once");
    assert!(!old_column_exists(&db));
    assert_eq!(step_outcomes(&db, "v2"), ["abandoned", "done"]);
    let done_by = db.one(
        "SELECT pid FROM migrations_gate.ledger WHERE release = 'contract:v2' AND outcome = 'done'",
    );
    assert_ne!(done_by, holder[0].to_string(), "another runner finished it");
    let killed = outs.iter().filter(|o| o.status.code().is_none()).count();
    assert_eq!(killed, 1, "only the killed runner died");
    let taker = outs
        .iter()
        .find(|o| o.status.code().is_some())
        .expect("the other runner");
    assert_codes(&[(taker, 0)]);
    assert_stderr_has(taker, "no app of an older release seen for 1.0s (--settle)");
    assert!(app.alive());
    db.assert_no_gate_locks();
}

/// Once v2's contract step has run, a replica of v1 is refused (78) where it would start, also
/// with `--allow-older-release`: v1's code may need the column the step dropped. A v2 replica
/// still starts. Forgetting the step (`reset --release contract:v2`, as a restore of the
/// database from before it does) lets v1 start again, as an older release.
#[test]
fn a_replica_of_an_older_release_is_refused_after_the_contract_step() {
    let db = new_db("contract_refuses_older");
    let _app = contracted(&db);
    let attempts = db.ledger().attempts().len();
    let v1 = replica(&db, "v1", &[], "start")
        .output()
        .expect("run the gate");
    let v1_allowed = replica(&db, "v1", &["--allow-older-release"], "start")
        .output()
        .expect("run the gate");
    let v2 = replica(&db, "v2", &[], "start")
        .output()
        .expect("run the gate");

    assert_eq!(starts(&db, "v1"), "0", "no v1 app started");
    assert_eq!(starts(&db, "v2"), "2", "the serving v2 app and the new one");
    assert_eq!(db.ledger().attempts().len(), attempts, "nothing recorded");
    assert_codes(&[(&v1, 78), (&v1_allowed, 78), (&v2, 0)]);
    for out in [&v1, &v1_allowed] {
        assert_mentions(
            &stderr(out),
            &[
                "release \"v1\" is older than release \"v2\", whose contract step ran on this database at ",
                "the schema was contracted for \"v2\"",
                "restore the database from before that contract step",
            ],
        );
    }

    let reset = db.gate_output(&["reset", "--release", "contract:v2"]);
    let v1_again = replica(&db, "v1", &["--allow-older-release"], "start")
        .output()
        .expect("run the gate");
    assert!(step_outcomes(&db, "v2").is_empty(), "the step is forgotten");
    assert_eq!(starts(&db, "v1"), "1");
    assert_codes(&[(&reset, 0), (&v1_again, 0)]);
    assert_stderr_has(&v1_again, "--allow-older-release: starting anyway");
}

/// A contract step that runs late, after a newer release was migrated (v2's step inside its
/// settle window while v3 rolled out), contracts nothing v3 needs: v3's replicas still start,
/// v1's (older than v2) are refused.
#[test]
fn a_late_contract_step_never_refuses_a_newer_release() {
    let db = new_db("contract_late");
    two_releases(&db);
    let _v2 = App::start(&db, "v2", &[]);
    Watch::new(&db, "v2").until(1);
    let v3 = expand(&db, "v3", &["--other-releases", "ignore"], "SELECT 1");
    assert_codes(&[(&v3, 0)]);
    let step = wait_output(
        spawn(&mut contract(&db, "v2", &["--settle", "1s"], "")),
        HANG_GUARD,
    );
    let v3_replica = replica(&db, "v3", &[], "start")
        .output()
        .expect("run the gate");
    let v1_replica = replica(&db, "v1", &[], "start")
        .output()
        .expect("run the gate");

    assert_eq!(runs(&db), 1);
    assert_eq!(step_outcomes(&db, "v2"), ["done"]);
    assert_eq!(starts(&db, "v3"), "1", "the v3 replica started");
    assert_eq!(starts(&db, "v1"), "0", "no v1 app started");
    assert_codes(&[(&step, 0), (&v3_replica, 0), (&v1_replica, 78)]);
    assert_stderr_has(&v1_replica, "the schema was contracted for \"v2\"");
}

/// An app of v1 that connects again while the window runs (a rollback started, an old pod
/// restarted) restarts it: the step runs `--settle` after that app went, not after the first
/// quiet moment.
#[test]
fn an_older_app_that_connects_during_the_settle_window_restarts_it() {
    let db = new_db("contract_reappears");
    let v1 = expand(&db, "v1", &[], V1_EXPAND);
    assert_codes(&[(&v1, 0)]);
    let old = App::start(&db, "v1", &[]);
    let mut watch = Watch::new(&db, "v1");
    watch.until(1);
    let v2 = expand(&db, "v2", &["--other-releases", "ignore"], V2_EXPAND);
    assert_codes(&[(&v2, 0)]);
    let app = App::start(&db, "v2", &[]);
    Watch::new(&db, "v2").until(1);
    let (out, _, _) = watch.stop(old, 0);
    assert_eq!(code(&out), 42, "{}", stderr(&out));

    let runner = spawn(&mut contract(&db, "v2", &["--settle", "4s"], ""));
    std::thread::sleep(Duration::from_secs(2));
    // A v1 pod that restarts mid-window (before the step, v1 may still start).
    let back = App::start(&db, "v1", &["--allow-older-release"]);
    watch.until(1);
    assert_eq!(runs(&db), 0);
    std::thread::sleep(Duration::from_secs(2));
    let (out, last_seen, _) = watch.stop(back, 0);
    let runner = wait_output(runner, HANG_GUARD);

    assert_eq!(runs(&db), 1);
    let after = run_after(&db, &last_seen);
    assert!(
        after >= 4.0,
        "ran {after:.3}s after the returning v1 app was last seen, before --settle (4s) had passed"
    );
    assert_eq!(step_outcomes(&db, "v2"), ["done"]);
    assert_eq!(starts(&db, "v1"), "2");
    assert_codes(&[(&runner, 0), (&out, 42)]);
    assert_mentions(
        &stderr(&runner),
        &[
            "an app of an older release connected again; the settle window starts again: \
             release \"v1\": 1 session(s) from 127.0.0.1",
            "no app of an older release seen for 4.0s (--settle); running the contract step",
        ],
    );
    assert!(app.alive());
}

/// With no app of the release visible by its tag (apps not started through the gate, or whose
/// driver does not send PGAPPNAME), the gate cannot see older apps either: the step refuses
/// (78) without running, unless `--accept-untagged`.
#[test]
fn without_a_tagged_app_of_the_release_the_step_refuses_unless_accept_untagged() {
    let db = new_db("contract_untagged");
    two_releases(&db);
    // An app the gate did not start: connected, but untagged.
    let mut untagged = Session::open(&db.url);
    assert_eq!(untagged.one("SELECT 'connected'"), "connected");

    let refused = wait_output(
        spawn(&mut contract(&db, "v2", &["--settle", "1s"], "")),
        HANG_GUARD,
    );
    assert_eq!(runs(&db), 0, "refused without running");
    assert!(old_column_exists(&db));
    assert!(
        step_outcomes(&db, "v2").is_empty(),
        "refused before the lock"
    );
    assert_codes(&[(&refused, 78)]);
    assert_mentions(
        &stderr(&refused),
        &[
            "no app session of release \"v2\" is visible by its tag",
            "or pass --accept-untagged to run the contract step anyway",
        ],
    );

    let accepted = wait_output(
        spawn(&mut contract(
            &db,
            "v2",
            &["--settle", "1s", "--accept-untagged"],
            "",
        )),
        HANG_GUARD,
    );
    assert_eq!(runs(&db), 1);
    assert!(!old_column_exists(&db));
    assert_eq!(step_outcomes(&db, "v2"), ["done"]);
    assert_codes(&[(&accepted, 0)]);
    assert_stderr_has(
        &accepted,
        "no app of an older release seen for 1.0s (--settle); running the contract step",
    );
}

/// A runner started after the step is done exits 0 at once, whatever its `--settle`, without
/// running the command; `--other-releases` does not apply to `contract`, and `contract:` names
/// no release of `migrate` (64, nothing recorded).
#[test]
fn a_late_runner_exits_at_once_and_misuse_is_refused() {
    let db = new_db("contract_late");
    let _app = contracted(&db);
    let attempts = db.ledger().attempts().len();

    let started = Instant::now();
    let late = wait_output(
        spawn(&mut contract(&db, "v2", &["--settle", "10m"], "")),
        HANG_GUARD,
    );
    let took = started.elapsed();
    let other_releases = contract(&db, "v2", &["--other-releases", "fail"], "")
        .output()
        .expect("run the gate");
    let step_as_release = db.gate_output(&["migrate", "--release", "contract:x", "--", "true"]);

    assert_eq!(runs(&db), 1, "the late runner did not run the command");
    assert_eq!(step_outcomes(&db, "v2"), ["done"]);
    assert_eq!(db.ledger().attempts().len(), attempts, "nothing recorded");
    assert_codes(&[(&late, 0), (&other_releases, 64), (&step_as_release, 64)]);
    assert!(
        took < Duration::from_secs(10),
        "the late runner took {took:?}"
    );
    assert_stderr_has(
        &late,
        "the contract step of this release is done; this runner did not run it",
    );
    assert_stderr_has(&other_releases, "--other-releases does not apply");
    assert_stderr_has(&step_as_release, "name contract steps in the ledger");
}
