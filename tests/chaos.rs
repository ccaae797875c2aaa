//! Randomized faults: seeded schedules of several releases in a row, each migrated by a fleet of
//! 4 to 8 replicas while faults strike at random moments, on a direct connection and through
//! PgBouncer in transaction mode (gate, migration and app all through the pooler, a pool smaller
//! than the fleet). An invariant checker then reads the server: the migration writes its own
//! timestamps (`statement_timestamp()`, `clock_timestamp()` at the end of each transaction,
//! tagged with its attempt by `application_name`), a sampler watches `pg_stat_activity`, the
//! ledger is read at the end.
//!
//! Faults: SIGKILL and SIGTERM of the holder, of a waiter and of the migration; the holder's gate
//! and migration frozen together (the cgroup freezer, as `docker pause`) longer than its fencing
//! time while its lock session is terminated, then thawed; a taker-over's lock session terminated
//! while it waits out a vanished holder's fencing time; `pg_terminate_backend` of a gate session;
//! a PostgreSQL restart; a PgBouncer restart.
//!
//! Every schedule prints its seed; `MG_CHAOS_SEED=0x... cargo test --test chaos ROUTE` reruns
//! exactly that one (ROUTE: `direct` or `pooler`). `MG_CHAOS_SCHEDULES=N` runs N schedules per
//! route (default 3: about 2 minutes for the file on 2 cores); the soak runs 30.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sqlx::postgres::PgConnection;
use sqlx::{AssertSqlSafe, Connection, Row};
use support::freezer::{Freezer, descendants};
use support::*;

/// `--kill-grace` of every gate (a SIGTERM'd holder's migration gets this long; fencing never
/// waits for it).
const KILL_GRACE_S: u64 = 1;
/// A holder's fencing time: 1 s heartbeat + 5 s heartbeat timeout + 1 s for the SIGKILL.
const FENCE: Duration = Duration::from_secs(1 + 5 + 1);
/// Once faults stop, a release must be done within this.
const SETTLE: Duration = Duration::from_secs(150);
/// Server connections per pool: fewer than the fleet.
const POOL: u32 = 4;
const DEFAULT_SCHEDULES: u64 = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    Direct,
    Pooler,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    KillHolder,
    TermHolder,
    KillWaiter,
    TermWaiter,
    KillMigration,
    FreezeHolder,
    TakerOverLosesLock,
    TerminateGateSession,
    RestartPostgres,
    RestartPgBouncer,
}

#[test]
fn direct() {
    schedules(Route::Direct);
}

#[test]
fn pooler() {
    schedules(Route::Pooler);
}

/// Runs the schedules of one route, each on a fresh database of a server of the route's own (a
/// restart must not disturb the other route), and fails listing every violation with its seed.
fn schedules(route: Route) {
    let (seeds, rerun) = match std::env::var("MG_CHAOS_SEED") {
        Ok(s) => (vec![parse_seed(&s)], true),
        Err(_) => {
            let n = std::env::var("MG_CHAOS_SCHEDULES")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(DEFAULT_SCHEDULES);
            let base = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
                ^ (route as u64) << 40;
            let mut r = fastrand::Rng::with_seed(base);
            ((0..n).map(|_| r.u64(..) >> 16).collect(), false)
        }
    };
    let server = Cluster::start(&["max_connections=100"]);
    let mut faults: BTreeMap<Fault, usize> = BTreeMap::new();
    let (mut releases, mut failures) = (0, Vec::new());
    for seed in seeds {
        let name = format!("{route:?}").to_lowercase();
        eprintln!(
            "chaos: route={name} seed={seed:#x}: rerun with `MG_CHAOS_SEED={seed:#x} cargo test --test chaos {name} -- --nocapture`"
        );
        let outcome = Schedule::new(&server, route, seed).run();
        releases += outcome.releases;
        for (f, n) in outcome.faults {
            *faults.entry(f).or_default() += n;
        }
        if !outcome.violations.is_empty() {
            failures.push(format!(
                "seed {seed:#x}:\n  {}",
                outcome.violations.join("\n  ")
            ));
        }
        if rerun {
            break;
        }
    }
    let total: usize = faults.values().sum();
    eprintln!(
        "chaos: route={route:?}: {releases} releases, {total} faults {faults:?}, {} schedule(s) with violations",
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn parse_seed(s: &str) -> u64 {
    let s = s.trim();
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    }
    .unwrap_or_else(|_| panic!("MG_CHAOS_SEED={s} is not a number"))
}

/// What a schedule did and found.
struct Outcome {
    releases: usize,
    faults: BTreeMap<Fault, usize>,
    violations: Vec<String>,
}

/// One gate process of the fleet.
struct Gate {
    child: Child,
    pid: i32,
    release: String,
    log: PathBuf,
    /// Whether the test signalled this gate itself (its exit code is the signal's).
    signalled: bool,
    exit: Option<(i32, SystemTime)>,
}

/// A freeze the test made: the holder's attempt (from its tag) and when it thawed.
struct Frozen {
    thawed_at: String,
}

struct Schedule<'s> {
    server: &'s Cluster,
    route: Route,
    rng: fastrand::Rng,
    db: String,
    dir: PathBuf,
    bouncer: Option<PgBouncer>,
    bouncer_port: u16,
    gates: Vec<Gate>,
    faults: BTreeMap<Fault, usize>,
    frozen: Vec<Frozen>,
    /// Marks every process of this schedule (in its environment), to find leftovers.
    mark: String,
}

impl<'s> Schedule<'s> {
    fn new(server: &'s Cluster, route: Route, seed: u64) -> Schedule<'s> {
        let db = format!("chaos_{seed:x}");
        sql(&server.url("postgres"), &format!("CREATE DATABASE {db}"));
        sql(
            &server.url(&db),
            "CREATE TABLE chaos_writes (tag text NOT NULL, release text NOT NULL, step int NOT NULL, \
               stmt_at timestamptz NOT NULL DEFAULT statement_timestamp(), \
               commit_at timestamptz NOT NULL DEFAULT clock_timestamp()); \
             CREATE TABLE chaos_starts (release text NOT NULL, flag text, at timestamptz NOT NULL DEFAULT clock_timestamp())",
        );
        let dir = server_dir("mg-chaos");
        let bouncer_port = free_port();
        let mut s = Schedule {
            server,
            route,
            rng: fastrand::Rng::with_seed(seed),
            db,
            dir,
            bouncer: None,
            bouncer_port,
            gates: Vec::new(),
            faults: BTreeMap::new(),
            frozen: Vec::new(),
            mark: format!("{seed:x}-{}", std::process::id()),
        };
        if route == Route::Pooler {
            s.start_bouncer();
        }
        s.write_scripts();
        s
    }

    fn start_bouncer(&mut self) {
        let at = Listen {
            addr: "127.0.0.1".into(),
            port: self.bouncer_port,
            server: format!("host=127.0.0.1 port={}", self.server.port),
            netns: None,
        };
        self.bouncer = Some(PgBouncer::start_at(&at, "transaction", POOL));
    }

    /// The URL of the route: the gate, its migration and its app all connect there.
    fn url(&self) -> String {
        match &self.bouncer {
            Some(b) => b.url(&self.db),
            None if self.route == Route::Pooler => format!(
                "postgres://postgres:{PASSWORD}@127.0.0.1:{}/{}",
                self.bouncer_port, self.db
            ),
            None => self.server.url(&self.db),
        }
    }

    /// The direct URL, for the checker and the sampler.
    fn direct(&self) -> String {
        self.server.url(&self.db)
    }

    /// The migration: one psql session, several steps, each some work on the client (a pause,
    /// as a tool that computes between statements) and on the server (`pg_sleep`, as a long
    /// statement), then a transaction that ends with a row naming its attempt (the tag's 4th
    /// field) and the time it was about to commit. In some schedules it ignores SIGTERM (as
    /// tools that finish their step on SIGTERM do). The app records its start and its flag.
    fn write_scripts(&mut self) {
        let mut steps = String::new();
        for step in 1..=6 {
            let (client, server) = (self.rng.u64(0..4), self.rng.u64(0..4));
            steps.push_str(&format!(
                "\\! sleep 0.{client}\nBEGIN;\nSELECT pg_sleep(0.{server});\nCREATE TABLE IF NOT EXISTS :\"table\" (step int);\n\
                 INSERT INTO :\"table\" VALUES ({step});\n\
                 INSERT INTO chaos_writes (tag, release, step) VALUES (split_part(current_setting('application_name'), ' ', 1), :'release', {step});\n\
                 COMMIT;\n"
            ));
        }
        std::fs::write(self.dir.join("migrate.sql"), steps).expect("write migrate.sql");
        let trap = if self.rng.bool() {
            "trap '' TERM\n"
        } else {
            ""
        };
        let migrate = format!(
            "#!/bin/sh\n{trap}exec psql \"$DATABASE_URL\" -X -q -v ON_ERROR_STOP=1 -v release=\"$CHAOS_RELEASE\" -v table=\"t_$CHAOS_RELEASE\" -f {}\n",
            self.dir.join("migrate.sql").display()
        );
        let app = "#!/bin/sh\nexec psql \"$DATABASE_URL\" -X -q -v ON_ERROR_STOP=1 -c \
                   \"INSERT INTO chaos_starts (release, flag) VALUES ('$CHAOS_RELEASE', '$ENABLE_DB_MIGRATIONS')\"\n";
        for (name, text) in [("migrate.sh", migrate.as_str()), ("app.sh", app)] {
            let path = self.dir.join(name);
            std::fs::write(&path, text).expect("write script");
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                .expect("chmod script");
        }
    }

    fn spawn_gate(&mut self, release: &str) {
        let n = self.gates.len();
        let log = self.dir.join(format!("gate-{n}.log"));
        let file = std::fs::File::create(&log).expect("create gate log");
        let url = self.url();
        let child = Command::new(gate_bin())
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("MIGRATIONS_GATE_DATABASE_URL", &url)
            .env("DATABASE_URL", &url)
            .env("CHAOS_RELEASE", release)
            .env("CHAOS_MARK", &self.mark)
            .args([
                "run",
                "--release",
                release,
                "--kill-grace",
                &format!("{KILL_GRACE_S}s"),
                "--wait-timeout",
                "240s",
                "--connect-timeout",
                "120s",
                "--application-name",
                &format!("migrations-gate/chaos-{n}"),
                "--migrate",
                &self.dir.join("migrate.sh").to_string_lossy(),
                "--",
                &self.dir.join("app.sh").to_string_lossy(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start a gate");
        let pid = child.id() as i32;
        self.gates.push(Gate {
            child,
            pid,
            release: release.to_string(),
            log,
            signalled: false,
            exit: None,
        });
    }

    /// Whether `at` (a server timestamp) falls in the window [`Schedule::excused`] allows.
    fn in_thaw_window(&self, at: &str) -> bool {
        let excused = self.excused();
        !excused.is_empty()
            && try_sql(
                &self.direct(),
                &format!(
                    "SELECT (NOT ({}))::text FROM (SELECT '{at}'::timestamptz AS stmt_at) t",
                    excused.trim_start_matches("WHERE ")
                ),
            )
            .is_ok_and(|r| r[0][0] == "true")
    }

    fn run(mut self) -> Outcome {
        let sampler = Sampler::start(self.direct());
        let n_releases = 2 + self.rng.usize(..2);
        for r in 1..=n_releases {
            let release = format!("r{r}");
            let fleet = 4 + self.rng.usize(..5);
            for _ in 0..fleet {
                self.spawn_gate(&release);
            }
            let faults = 1 + self.rng.usize(..4);
            for _ in 0..faults {
                std::thread::sleep(Duration::from_millis(self.rng.u64(100..1500)));
                self.reap();
                if self.done(&release) {
                    break;
                }
                self.strike(&release);
            }
            self.settle(&release, fleet);
        }
        let overlaps = sampler.stop();
        let violations = self.check(n_releases, overlaps);
        let _ = std::fs::remove_dir_all(&self.dir);
        Outcome {
            releases: n_releases,
            faults: std::mem::take(&mut self.faults),
            violations,
        }
    }

    /// Records the exit of every gate that ended.
    fn reap(&mut self) {
        for g in self.gates.iter_mut().filter(|g| g.exit.is_none()) {
            if let Ok(Some(status)) = g.child.try_wait() {
                use std::os::unix::process::ExitStatusExt;
                let code = status
                    .code()
                    .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
                g.exit = Some((code, SystemTime::now()));
            }
        }
    }

    fn done(&self, release: &str) -> bool {
        try_sql(
            &self.direct(),
            &format!(
                "SELECT count(*) FROM migrations_gate.ledger WHERE release = '{release}' AND outcome = 'done'"
            ),
        )
        .is_ok_and(|rows| rows.first().is_some_and(|r| r[0] != "0"))
    }

    /// After the faults: keep a fleet of this release running (restarting what died, as an
    /// orchestrator would) until every gate has exited 0 or the bound passes.
    fn settle(&mut self, release: &str, fleet: usize) {
        let start = Instant::now();
        loop {
            self.reap();
            let alive = self
                .gates
                .iter()
                .filter(|g| g.release == release && g.exit.is_none())
                .count();
            let done = self.done(release);
            if done && alive == 0 {
                return;
            }
            if !done && alive < fleet.min(2) {
                self.spawn_gate(release);
            }
            if start.elapsed() > SETTLE {
                // Stop what is left: the checker reports the release as not done.
                for g in self.gates.iter_mut().filter(|g| g.exit.is_none()) {
                    let _ = g.child.kill();
                    g.signalled = true;
                }
                self.reap();
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The gate of `release` that holds the lock and runs its migration: the one with a
    /// `migrate.sh` (psql) among its descendants.
    fn holder(&self, release: &str) -> Option<usize> {
        self.gates.iter().position(|g| {
            g.release == release
                && g.exit.is_none()
                && descendants(g.pid).iter().any(|p| {
                    std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                        .is_ok_and(|c| c.contains("migrate.sql"))
                })
        })
    }

    fn waiter(&mut self, release: &str) -> Option<usize> {
        let holder = self.holder(release);
        let waiters: Vec<usize> = (0..self.gates.len())
            .filter(|&i| {
                let g = &self.gates[i];
                g.release == release && g.exit.is_none() && Some(i) != holder
            })
            .collect();
        (!waiters.is_empty()).then(|| waiters[self.rng.usize(..waiters.len())])
    }

    fn signal(&mut self, i: usize, sig: i32) {
        self.gates[i].signalled = true;
        // SAFETY: plain system call on a PID this test started.
        unsafe {
            libc::kill(self.gates[i].pid, sig);
        }
    }

    fn count(&mut self, f: Fault) {
        *self.faults.entry(f).or_default() += 1;
    }

    /// One fault, chosen at random among those that apply now.
    fn strike(&mut self, release: &str) {
        let mut kinds = vec![
            Fault::KillHolder,
            Fault::TermHolder,
            Fault::KillWaiter,
            Fault::TermWaiter,
            Fault::KillMigration,
            Fault::FreezeHolder,
            Fault::TakerOverLosesLock,
            Fault::TerminateGateSession,
            Fault::RestartPostgres,
        ];
        if self.route == Route::Pooler {
            kinds.push(Fault::RestartPgBouncer);
        }
        // The faults that found real defects come up more often.
        kinds.extend([
            Fault::FreezeHolder,
            Fault::TakerOverLosesLock,
            Fault::KillHolder,
        ]);
        let fault = kinds[self.rng.usize(..kinds.len())];
        // A holder, once one migrates (the fleet may still be starting, or between holders).
        let start = Instant::now();
        let holder = loop {
            self.reap();
            match self.holder(release) {
                Some(h) => break Some(h),
                None if self.done(release) || start.elapsed() > Duration::from_secs(3) => {
                    break None;
                }
                None => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        match fault {
            Fault::KillHolder | Fault::TermHolder => {
                let Some(h) = holder else { return };
                let sig = if fault == Fault::KillHolder {
                    libc::SIGKILL
                } else {
                    libc::SIGTERM
                };
                self.signal(h, sig);
            }
            Fault::KillWaiter | Fault::TermWaiter => {
                let Some(w) = self.waiter(release) else {
                    return;
                };
                let sig = if fault == Fault::KillWaiter {
                    libc::SIGKILL
                } else {
                    libc::SIGTERM
                };
                self.signal(w, sig);
            }
            Fault::KillMigration => {
                let Some(h) = holder else { return };
                let migration = descendants(self.gates[h].pid).into_iter().find(|p| {
                    std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                        .is_ok_and(|c| c.contains("migrate.sql"))
                });
                let Some(pid) = migration else { return };
                // SAFETY: plain system call on a process of a gate this test started.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
            Fault::FreezeHolder => {
                let Some(h) = holder else { return };
                if !self.freeze(h) {
                    return;
                }
            }
            Fault::TakerOverLosesLock => {
                let Some(h) = holder else { return };
                let said_before: Vec<usize> =
                    self.gates.iter().map(|g| takeovers_said(&g.log)).collect();
                self.signal(h, libc::SIGKILL);
                // A waiter takes the lock and waits out the vanished holder's fencing time.
                let start = Instant::now();
                let taking_over = loop {
                    let found = self.gates.iter().enumerate().position(|(i, g)| {
                        g.release == release
                            && g.exit.is_none()
                            && takeovers_said(&g.log) > said_before[i]
                    });
                    if found.is_some() || start.elapsed() > Duration::from_secs(5) {
                        break found;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                };
                if taking_over.is_none() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(self.rng.u64(0..1500)));
                self.terminate_lock_session();
            }
            Fault::TerminateGateSession => {
                let _ = try_sql(
                    &self.direct(),
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE datname = current_database() AND application_name LIKE 'migrations-gate/%' \
                     ORDER BY random() LIMIT 1",
                );
            }
            Fault::RestartPostgres => {
                self.server.stop_fast();
                std::thread::sleep(Duration::from_millis(self.rng.u64(0..1000)));
                self.server.start_again();
            }
            Fault::RestartPgBouncer => {
                self.bouncer = None;
                std::thread::sleep(Duration::from_millis(self.rng.u64(0..500)));
                self.start_bouncer();
            }
        }
        self.count(fault);
    }

    /// Ends the server session that holds the gate's lock (the default lock name's key).
    fn terminate_lock_session(&self) {
        let _ = try_sql(
            &self.direct(),
            &format!(
                "SELECT pg_terminate_backend(l.pid) FROM pg_locks l WHERE l.locktype = 'advisory' \
                 AND l.granted AND l.objsubid = 1 AND l.classid = {} \
                 AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                gate_lock_classid()
            ),
        );
    }

    /// Freezes the holder's gate and migration (and everything they started) longer than the
    /// fencing time, ends its lock session meanwhile, and thaws them all at once.
    fn freeze(&mut self, h: usize) -> bool {
        let Ok(freezer) = Freezer::create() else {
            return false;
        };
        freezer.add_tree(self.gates[h].pid);
        freezer.freeze();
        self.terminate_lock_session();
        // Others wait out the holder's fencing time and take over meanwhile.
        std::thread::sleep(FENCE + Duration::from_millis(self.rng.u64(1000..4000)));
        let thawed_at = try_sql(&self.direct(), "SELECT clock_timestamp()::text")
            .ok()
            .and_then(|r| r.first().map(|r| r[0].clone()))
            .unwrap_or_default();
        freezer.thaw();
        self.frozen.push(Frozen { thawed_at });
        true
    }

    /// The invariants, read on the server first, then the processes.
    fn check(&mut self, n_releases: usize, overlaps: Vec<(String, String)>) -> Vec<String> {
        let url = self.direct();
        let q = |sql: &str| try_sql(&url, sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
        let mut v: Vec<String> = overlaps
            .into_iter()
            .filter(|(at, _)| !self.in_thaw_window(at))
            .map(|(at, ids)| format!("attempts {ids} had busy sessions at once at {at}"))
            .collect();
        // 1. No two attempts' work overlaps.
        let excused = self.excused();
        for row in q(&format!(
            "WITH w AS (SELECT split_part(tag, ':', 4) AS attempt, min(stmt_at) AS s, max(commit_at) AS e \
                        FROM chaos_writes {excused} GROUP BY 1) \
             SELECT a.attempt, b.attempt FROM w a JOIN w b ON a.attempt < b.attempt \
             WHERE tstzrange(a.s, a.e, '[]') && tstzrange(b.s, b.e, '[]')"
        )) {
            v.push(format!("attempts {} and {} wrote at once", row[0], row[1]));
        }
        // 1. As the ledger records them too: no attempt began while another was running.
        for row in q(
            "SELECT a.id, b.id FROM migrations_gate.ledger a JOIN migrations_gate.ledger b ON a.id < b.id \
             WHERE tstzrange(a.started_at, coalesce(a.finished_at, 'infinity')) \
                && tstzrange(b.started_at, coalesce(b.finished_at, 'infinity'))",
        ) {
            v.push(format!(
                "attempts {} and {} were running at once (ledger)",
                row[0], row[1]
            ));
        }
        // 2. A release is done at most once, and never attempted after its done attempt.
        for row in q(
            "SELECT release, count(*) FROM migrations_gate.ledger WHERE outcome = 'done' GROUP BY 1 HAVING count(*) > 1",
        ) {
            v.push(format!("release {} was done {} times", row[0], row[1]));
        }
        for row in q(
            "SELECT a.release, a.id, d.id FROM migrations_gate.ledger a JOIN migrations_gate.ledger d \
             ON a.release = d.release AND d.outcome = 'done' WHERE a.started_at > d.finished_at",
        ) {
            v.push(format!(
                "release {} was attempted again ({}) after its done attempt {}",
                row[0], row[1], row[2]
            ));
        }
        for row in q(&format!(
            "SELECT split_part(w.tag, ':', 4), w.release FROM chaos_writes w JOIN migrations_gate.ledger d \
             ON d.release = w.release AND d.outcome = 'done' \
             WHERE w.stmt_at > d.finished_at {}",
            excused.replacen("WHERE", "AND", 1)
        )) {
            v.push(format!(
                "attempt {} wrote to release {} after it was done",
                row[0], row[1]
            ));
        }
        // 3. No app starts before its release is done, and every app gets the flag off.
        for row in q(
            "SELECT s.release, s.flag, s.at::text FROM chaos_starts s LEFT JOIN migrations_gate.ledger d \
             ON d.release = s.release AND d.outcome = 'done' WHERE d.id IS NULL OR s.at < d.finished_at OR s.flag <> 'False'",
        ) {
            v.push(format!(
                "an app of {} started at {} with the flag {:?} before the release was done (or with the flag on)",
                row[0], row[2], row[1]
            ));
        }
        // 5. Nothing of an attempt recorded failed or abandoned commits after its end.
        for row in q(&format!(
            "SELECT l.id, l.outcome, count(*) FROM chaos_writes w JOIN migrations_gate.ledger l \
             ON l.id::text = split_part(w.tag, ':', 4) \
             WHERE l.outcome IN ('failed', 'abandoned') AND w.commit_at > l.finished_at {} GROUP BY 1, 2",
            excused.replacen("WHERE", "AND", 1)
        )) {
            v.push(format!(
                "attempt {} was recorded {} yet {} of its rows committed later",
                row[0], row[1], row[2]
            ));
        }
        // 7. Every release is done.
        for r in 1..=n_releases {
            if !self.done(&format!("r{r}")) {
                v.push(format!("release r{r} was not done once faults stopped"));
            }
        }
        // 4. Only documented exit codes: 0, 69, 75, or a failed migration's own (recorded).
        let recorded: BTreeSet<(i32, i32)> =
            q("SELECT pid, exit_code FROM migrations_gate.ledger WHERE exit_code IS NOT NULL")
                .iter()
                .filter_map(|r| Some((r[0].parse().ok()?, r[1].parse().ok()?)))
                .collect();
        for g in &self.gates {
            let Some((code, at)) = g.exit else { continue };
            if g.signalled || [0, 69, 75].contains(&code) || recorded.contains(&(g.pid, code)) {
                if code == 0 && !self.done_before(&g.release, at) {
                    v.push(format!(
                        "gate {} exited 0 before {} was done",
                        g.pid, g.release
                    ));
                }
                continue;
            }
            let log = std::fs::read_to_string(&g.log).unwrap_or_default();
            let last = log.lines().last().unwrap_or_default();
            v.push(format!(
                "gate {} exited {code} (not a documented code): {last}",
                g.pid
            ));
        }
        // 6. Nothing left behind: no lock, no tagged session, no process of this schedule.
        let lingering = |sql: &str| {
            let start = Instant::now();
            loop {
                let n = q(sql)[0][0].clone();
                if n == "0" || start.elapsed() > Duration::from_secs(15) {
                    return n;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        };
        let locks = lingering(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        );
        if locks != "0" {
            v.push(format!("{locks} advisory lock(s) left"));
        }
        let tagged = lingering(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND application_name LIKE 'mgate:%' AND state <> 'idle'",
        );
        if tagged != "0" {
            v.push(format!("{tagged} busy tagged session(s) left"));
        }
        let left = marked_processes(&self.mark);
        if !left.is_empty() {
            v.push(format!("processes left: {left:?}"));
            for pid in left {
                // SAFETY: plain system call on a process of this schedule.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
        v
    }

    /// Whether `release` was recorded done before `at`.
    fn done_before(&self, release: &str, at: SystemTime) -> bool {
        let secs = at
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        try_sql(
            &self.direct(),
            &format!(
                "SELECT count(*) FROM migrations_gate.ledger WHERE release = '{release}' \
                 AND outcome = 'done' AND finished_at <= to_timestamp({secs})"
            ),
        )
        .is_ok_and(|r| r[0][0] != "0")
    }

    /// The rows the README's rules allow (docs/design.md, "Frozen holders"): behind a pooler, a
    /// statement a frozen holder's migration sent in the instant its freeze ended may commit.
    /// Half a second after a thaw gives a loaded machine room; a direct route excuses nothing.
    fn excused(&self) -> String {
        if self.route == Route::Direct || self.frozen.is_empty() {
            return String::new();
        }
        let windows: Vec<String> = self
            .frozen
            .iter()
            .map(|f| {
                format!(
                    "stmt_at BETWEEN '{0}'::timestamptz AND '{0}'::timestamptz + interval '500 ms'",
                    f.thawed_at
                )
            })
            .collect();
        format!("WHERE NOT ({})", windows.join(" OR "))
    }
}

impl Drop for Schedule<'_> {
    fn drop(&mut self) {
        for g in self.gates.iter_mut() {
            if g.exit.is_none() {
                let _ = g.child.kill();
                let _ = g.child.wait();
            }
        }
        for pid in marked_processes(&self.mark) {
            // SAFETY: plain system call on a process of this schedule.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

/// How many times a gate's log says it waits out a vanished holder's fencing time.
fn takeovers_said(log: &std::path::Path) -> usize {
    std::fs::read_to_string(log)
        .map(|l| l.matches("taking over once it has surely stopped").count())
        .unwrap_or(0)
}

/// The high 32 bits of the default lock's key (`pg_locks.classid`), as the README derives it.
fn gate_lock_classid() -> u32 {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(b"migrations-gate");
    u32::from_be_bytes([d[0], d[1], d[2], d[3]])
}

/// Processes whose environment holds `CHAOS_MARK=mark`.
fn marked_processes(mark: &str) -> Vec<i32> {
    let needle = format!("CHAOS_MARK={mark}");
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                .filter(|p| {
                    std::fs::read(format!("/proc/{p}/environ"))
                        .is_ok_and(|env| env.split(|b| *b == 0).any(|kv| kv == needle.as_bytes()))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Watches `pg_stat_activity` every 25 ms from a direct connection: two attempts' sessions busy
/// (a statement running, or a transaction open) at once is an overlap.
struct Sampler {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<(String, String)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(url: String) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (s, found) = (stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            let query = "SELECT clock_timestamp()::text, string_agg(DISTINCT a, ',') FROM ( \
                 SELECT split_part(split_part(application_name, ' ', 1), ':', 4) AS a FROM pg_stat_activity \
                 WHERE datname = current_database() AND application_name LIKE 'mgate:%' \
                 AND state IN ('active', 'idle in transaction', 'idle in transaction (aborted)')) t \
                 WHERE a <> '-' HAVING count(DISTINCT a) > 1";
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                let mut conn: Option<PgConnection> = None;
                while !s.load(Ordering::Relaxed) {
                    if conn.is_none() {
                        conn = PgConnection::connect(&url).await.ok();
                    }
                    if let Some(c) = conn.as_mut() {
                        match sqlx::raw_sql(AssertSqlSafe(query)).fetch_all(c).await {
                            Ok(rows) => {
                                for r in rows {
                                    let at: String = r.try_get_unchecked(0).unwrap_or_default();
                                    let ids: String = r.try_get_unchecked(1).unwrap_or_default();
                                    if let Ok(mut f) = found.lock() {
                                        f.push((at, ids));
                                    }
                                }
                            }
                            Err(_) => conn = None,
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
            });
        });
        Sampler {
            stop,
            seen,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> Vec<(String, String)> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.seen.lock().map(|v| v.clone()).unwrap_or_default()
    }
}
