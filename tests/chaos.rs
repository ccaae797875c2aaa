//! Randomized faults: seeded schedules of several releases in a row, each migrated by a fleet of
//! 4 to 8 replicas while faults strike at random moments, on a direct connection and through
//! PgBouncer in transaction mode (gate, migration and app all through the pooler, a pool smaller
//! than the fleet). An invariant checker then reads the server: the migration writes its own
//! timestamps (`statement_timestamp()`, `clock_timestamp()` at the end of each transaction,
//! tagged with its attempt by `application_name`), a sampler watches `pg_stat_activity`, the
//! ledger is read at the end. The sampler must itself have watched the whole schedule: a schedule
//! without samples, or with a gap in them far longer than its period that no PostgreSQL restart
//! explains, is a violation.
//!
//! Faults: SIGKILL and SIGTERM of the holder, of a waiter and of the migration; the holder's gate
//! and migration frozen together (the cgroup freezer, as `docker pause`) longer than its fencing
//! time while its lock session is terminated, then thawed; a taker-over's lock session terminated
//! while it waits out a vanished holder's fencing time; `pg_terminate_backend` of a gate session;
//! a PostgreSQL restart; a PgBouncer restart.
//!
//! A bystander shares every schedule's database: another application, gated by the same binary
//! with its own lock (`--lock bystander`) and its own ledger (`--schema bystander_gate`),
//! connected directly to the server (never through the schedule's PgBouncer). For the whole
//! schedule it rolls out releases `b1`, `b2`, ... one after another, each a `run --migrate` whose
//! migration takes a few seconds of `pg_sleep` steps and writes rows tagged with its attempt to
//! `bystander_writes`, then execs its app: one psql session kept open that writes a heartbeat row
//! to `bystander_serving` every 200 ms until told to stop (a stop file), so that the fleet always
//! sees tagged sessions of another lock and ledger, idle and busy, beside its own. Both use one
//! `--shared-dir`, so that each prunes its markers beside the other's. The invariant: nothing of
//! the bystander is ever touched by the gated fleet, under every fault kind. Every bystander gate
//! exits 0 (its app when told to stop), its ledger shows only `done` attempts, each with all its
//! rows, every row it saw committed is still there, its newest two markers still exist, and no
//! fleet gate's log names any of it (nor a bystander's log the fleet's). The faults are aimed at
//! the fleet only (its processes, its lock session, its gate sessions); a PostgreSQL restart ends
//! every session on the server, the bystander's too: a bystander failure is excused only when a
//! restart happened during it, and the bystander then starts its app again. The fleet's own checks
//! (the sampler's overlaps, sessions and locks left behind) look at the fleet's identity only
//! (`mgate:<key>:<ledger>:`), and the bystander is stopped before locks are counted.
//!
//! Every schedule prints its seed and a summary (the bystander's releases and heartbeats, the
//! sampler's samples); `MG_CHAOS_SEED=0x... cargo test --test chaos ROUTE` reruns
//! exactly that one (ROUTE: `direct` or `pooler`). `MG_CHAOS_SCHEDULES=N` runs N schedules per
//! route (default 3: about 2 minutes for the file on 2 cores); the soak runs 30.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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
/// The fleet's lock name and ledger schema (the gate's defaults).
const FLEET_LOCK: &str = "migrations-gate";
const FLEET_SCHEMA: &str = "migrations_gate";
/// The bystander's own lock name and ledger schema.
const BYSTANDER_LOCK: &str = "bystander";
const BYSTANDER_SCHEMA: &str = "bystander_gate";
/// Rows (and `pg_sleep` steps) of one bystander migration.
const BYSTANDER_STEPS: usize = 4;
/// How often the sampler looks, and the longest gap between two samples that no PostgreSQL
/// restart explains before the schedule counts as not watched.
const SAMPLE_PERIOD: Duration = Duration::from_millis(25);
const SAMPLE_GAP: Duration = Duration::from_secs(3);
/// A PostgreSQL restart explains what fails this long before it began or after it ended.
const RESTART_SLACK: Duration = Duration::from_secs(2);

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
    /// The directory every gate, the fleet's and the bystander's, passes as `--shared-dir`.
    shared: PathBuf,
    /// Each PostgreSQL restart: from just before the stop to just after the start.
    restarts: Vec<(SystemTime, SystemTime)>,
    /// When the schedule began (times in violations are given from here).
    began: SystemTime,
    /// The seed of the bystander's own choices (drawn first, so the fleet's stay as they were).
    bystander_seed: u64,
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
             CREATE TABLE chaos_starts (release text NOT NULL, flag text, at timestamptz NOT NULL DEFAULT clock_timestamp()); \
             CREATE TABLE bystander_writes (tag text NOT NULL, release text NOT NULL, step int NOT NULL, \
               at timestamptz NOT NULL DEFAULT clock_timestamp()); \
             CREATE TABLE bystander_serving (serve int NOT NULL, release text NOT NULL, backend int NOT NULL, \
               at timestamptz NOT NULL DEFAULT clock_timestamp())",
        );
        let dir = server_dir("mg-chaos");
        let shared = dir.join("shared");
        std::fs::create_dir_all(&shared).expect("create the shared directory");
        let bouncer_port = free_port();
        let mut rng = fastrand::Rng::with_seed(seed);
        let bystander_seed = rng.u64(..);
        let mut s = Schedule {
            server,
            route,
            rng,
            db,
            dir,
            bouncer: None,
            bouncer_port,
            gates: Vec::new(),
            faults: BTreeMap::new(),
            frozen: Vec::new(),
            mark: format!("{seed:x}-{}", std::process::id()),
            shared,
            restarts: Vec::new(),
            began: SystemTime::now(),
            bystander_seed,
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
    /// statement), then a transaction that ends with a row naming its attempt (the tag's 5th
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
        let (by_migrate, by_app) = self.bystander_scripts();
        for (name, text) in [
            ("migrate.sh", migrate.as_str()),
            ("app.sh", app),
            ("bystander_migrate.sh", by_migrate.as_str()),
            ("bystander_app.sh", by_app),
        ] {
            let path = self.dir.join(name);
            std::fs::write(&path, text).expect("write script");
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                .expect("chmod script");
        }
    }

    /// The bystander's migration and app. The migration: [`BYSTANDER_STEPS`] transactions, each
    /// a `pg_sleep` and a row tagged with its attempt, and a line `written <release>` printed to
    /// `bystander_writes.out` once it committed. The app: one psql session for its whole life,
    /// a heartbeat row every 200 ms (`beat` printed to its own file once committed) until its
    /// stop file appears; psql exits 2 if its session is lost, and the app with it.
    fn bystander_scripts(&self) -> (String, &'static str) {
        let mut rng = fastrand::Rng::with_seed(self.bystander_seed);
        let mut steps = String::new();
        for step in 1..=BYSTANDER_STEPS {
            steps.push_str(&format!(
                "BEGIN;\nSELECT pg_sleep(0.{});\n\
                 INSERT INTO bystander_writes (tag, release, step) VALUES (split_part(current_setting('application_name'), ' ', 1), :'release', {step});\n\
                 COMMIT;\n\\echo written :release\n",
                rng.u64(4..10)
            ));
        }
        std::fs::write(self.dir.join("bystander_steps.sql"), steps)
            .expect("write bystander_steps.sql");
        let migrate = format!(
            "#!/bin/sh\nexec psql \"$DATABASE_URL\" -X -q -t -A -v ON_ERROR_STOP=1 -v release=\"$BYSTANDER_RELEASE\" -f {} >> {}\n",
            self.dir.join("bystander_steps.sql").display(),
            self.dir.join("bystander_writes.out").display()
        );
        let app = "#!/bin/sh\n\
                   ( while [ ! -e \"$BYSTANDER_STOP\" ]; do\n\
                       printf '%s\\n' \"INSERT INTO bystander_serving (serve, release, backend) VALUES ($BYSTANDER_SERVE, '$BYSTANDER_RELEASE', pg_backend_pid()) RETURNING 'beat';\"\n\
                       sleep 0.2\n\
                     done\n\
                     printf '%s\\n' '\\q' ) | psql \"$DATABASE_URL\" -X -q -t -A -v ON_ERROR_STOP=1 > \"$BYSTANDER_BEATS\"\n";
        (migrate, app)
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
                "--shared-dir",
                &self.shared.to_string_lossy(),
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
        let sampler = Sampler::start(self.direct(), fleet_prefix());
        let bystander = Bystander::start(&self);
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
        let by = bystander.stop();
        let samples = sampler.stop();
        let violations = self.check(n_releases, samples, by);
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
                // A fleet gate's own session: the bystander's gates are named like gates too
                // (`migrations-gate/bystander-N`), and are not the fleet's.
                let _ = try_sql(
                    &self.direct(),
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE datname = current_database() AND application_name LIKE 'migrations-gate/chaos-%' \
                     ORDER BY random() LIMIT 1",
                );
            }
            Fault::RestartPostgres => {
                let from = SystemTime::now();
                self.server.stop_fast();
                std::thread::sleep(Duration::from_millis(self.rng.u64(0..1000)));
                self.server.start_again();
                self.restarts.push((from, SystemTime::now()));
            }
            Fault::RestartPgBouncer => {
                self.bouncer = None;
                std::thread::sleep(Duration::from_millis(self.rng.u64(0..500)));
                self.start_bouncer();
            }
        }
        self.count(fault);
    }

    /// Ends the server session that holds the fleet's lock (the default lock name's whole key,
    /// never the bystander's).
    fn terminate_lock_session(&self) {
        let (classid, objid) = lock_halves(FLEET_LOCK);
        let _ = try_sql(
            &self.direct(),
            &format!(
                "SELECT pg_terminate_backend(l.pid) FROM pg_locks l WHERE l.locktype = 'advisory' \
                 AND l.granted AND l.objsubid = 1 AND l.classid = {classid} AND l.objid = {objid} \
                 AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
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
    fn check(&mut self, n_releases: usize, samples: Samples, by: BystanderRun) -> Vec<String> {
        let url = self.direct();
        let q = |sql: &str| try_sql(&url, sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
        // 0. The sampler watched the whole schedule.
        let mut v = self.check_sampler(&samples);
        v.extend(
            samples
                .overlaps
                .iter()
                .filter(|(at, _)| !self.in_thaw_window(at))
                .map(|(at, ids)| format!("attempts {ids} had busy sessions at once at {at}")),
        );
        // 1. No two attempts' work overlaps.
        let excused = self.excused();
        for row in q(&format!(
            "WITH w AS (SELECT split_part(tag, ':', 5) AS attempt, min(stmt_at) AS s, max(commit_at) AS e \
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
            "SELECT split_part(w.tag, ':', 5), w.release FROM chaos_writes w JOIN migrations_gate.ledger d \
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
             ON l.id::text = split_part(w.tag, ':', 5) \
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
        // 8. Nothing of the bystander touched (it has stopped: what is left below is the fleet's).
        let summary = self.check_bystander(&by, &mut v);
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
        // Every advisory lock: the bystander has stopped (its locks went with its sessions).
        let locks = lingering(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        );
        if locks != "0" {
            let held = try_sql(
                &url,
                "SELECT string_agg(format('%s/%s/%s by %s', l.classid, l.objid, l.objsubid, \
                   coalesce(a.application_name, '?')), ', ') FROM pg_locks l \
                 LEFT JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' \
                 AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            )
            .ok()
            .and_then(|r| r.first().map(|r| r[0].clone()))
            .unwrap_or_default();
            v.push(format!("{locks} advisory lock(s) left: {held}"));
        }
        let tagged = lingering(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND application_name LIKE '{}%' AND state <> 'idle'",
            fleet_prefix()
        ));
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
        eprintln!(
            "chaos: route={:?}: {summary}; sampler: {} samples, {} connection errors, longest gap {} ms, {} restart(s)",
            self.route,
            samples.taken,
            samples.errors,
            samples.longest.as_millis(),
            self.restarts.len()
        );
        v
    }

    /// Seconds from the schedule's start to `t` (for violations' texts).
    fn secs(&self, t: SystemTime) -> f64 {
        t.duration_since(self.began)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0)
    }

    /// Whether a PostgreSQL restart (give or take [`RESTART_SLACK`]) fell in `[from, to]`.
    fn restart_during(&self, from: SystemTime, to: SystemTime) -> bool {
        self.restarts
            .iter()
            .any(|&(a, b)| a <= to + RESTART_SLACK && b + RESTART_SLACK >= from)
    }

    /// The schedule's PostgreSQL restarts, for a violation's text.
    fn restarts_text(&self) -> String {
        if self.restarts.is_empty() {
            return "no PostgreSQL restart in this schedule".into();
        }
        let at: Vec<String> = self
            .restarts
            .iter()
            .map(|&(a, b)| format!("+{:.1}..+{:.1} s", self.secs(a), self.secs(b)))
            .collect();
        format!("PostgreSQL restarts at {}", at.join(", "))
    }

    /// The sampler took samples, and no gap between two of them is far longer than its period
    /// unless a PostgreSQL restart explains it.
    fn check_sampler(&self, s: &Samples) -> Vec<String> {
        let mut v = Vec::new();
        if s.taken == 0 {
            v.push(format!(
                "the sampler took no sample ({} connection errors)",
                s.errors
            ));
        }
        for &(a, b) in &s.gaps {
            let len = b.duration_since(a).unwrap_or_default();
            let explained: Duration = self
                .restarts
                .iter()
                .map(|&(ra, rb)| {
                    let from = a.max(ra.checked_sub(RESTART_SLACK).unwrap_or(ra));
                    let to = b.min(rb + RESTART_SLACK);
                    to.duration_since(from).unwrap_or_default()
                })
                .sum();
            if len.saturating_sub(explained) > SAMPLE_GAP {
                v.push(format!(
                    "the sampler took no sample for {:.1} s (+{:.1}..+{:.1} s) and no PostgreSQL restart explains it ({}; {} connection errors in all)",
                    len.as_secs_f64(),
                    self.secs(a),
                    self.secs(b),
                    self.restarts_text(),
                    s.errors
                ));
            }
        }
        v
    }

    /// The bystander's invariant: nothing of it touched by the fleet. Its failures are excused
    /// only when a PostgreSQL restart happened during them. Returns the summary line's part.
    fn check_bystander(&self, by: &BystanderRun, v: &mut Vec<String>) -> String {
        let url = self.direct();
        let mut excused = 0;
        let restarts = self.restarts_text();
        for p in &by.problems {
            v.push(format!("{p} ({restarts})"));
        }
        // Every bystander gate exits 0: its app, once told to stop.
        for p in &by.procs {
            let Some((code, at)) = p.exit else {
                v.push(format!(
                    "bystander gate {} of {} never exited",
                    p.pid, p.release
                ));
                continue;
            };
            if p.killed {
                v.push(format!(
                    "bystander gate {} of {} did not stop when told and was killed: {}",
                    p.pid,
                    p.release,
                    last_line(&p.log)
                ));
                continue;
            }
            if code == 0 {
                continue;
            }
            if self.restart_during(p.spawned, at) {
                excused += 1;
                continue;
            }
            v.push(format!(
                "bystander gate {} of {} ({}, +{:.1}..+{:.1} s) exited {code} with no PostgreSQL restart during it ({restarts}): {}",
                p.pid,
                p.release,
                if p.served { "serving" } else { "migrating" },
                self.secs(p.spawned),
                self.secs(at),
                last_line(&p.log)
            ));
        }
        // Its ledger shows only done attempts.
        let epoch = |s: &str| {
            UNIX_EPOCH + Duration::from_secs_f64(s.parse::<f64>().unwrap_or(0.0).max(0.0))
        };
        match try_sql(
            &url,
            &format!(
                "SELECT id::text, release, outcome, extract(epoch FROM started_at)::text, \
                 extract(epoch FROM coalesce(finished_at, clock_timestamp()))::text, coalesce(detail, '') \
                 FROM {BYSTANDER_SCHEMA}.ledger WHERE outcome <> 'done' ORDER BY id"
            ),
        ) {
            Err(e) => v.push(format!("the bystander's ledger cannot be read: {e}")),
            Ok(rows) => {
                for r in rows {
                    let (from, to) = (epoch(&r[3]), epoch(&r[4]));
                    if self.restart_during(from, to) {
                        excused += 1;
                        continue;
                    }
                    v.push(format!(
                        "bystander attempt {} of {} was recorded {} (+{:.1}..+{:.1} s) with no PostgreSQL restart during it ({restarts}): {}",
                        r[0],
                        r[1],
                        r[2],
                        self.secs(from),
                        self.secs(to),
                        r[5]
                    ));
                }
            }
        }
        // Each release it served is done, by an attempt whose every row is there, in its tag.
        let done: BTreeMap<String, (String, usize)> = try_sql(
            &url,
            &format!(
                "SELECT l.release, l.id::text, count(w.step)::text FROM {BYSTANDER_SCHEMA}.ledger l \
                 LEFT JOIN bystander_writes w ON w.release = l.release AND w.tag = '{}' || \
                   left(encode(sha256(convert_to(l.release, 'UTF8')), 'hex'), 8) || ':' || l.id \
                 WHERE l.outcome = 'done' GROUP BY 1, 2",
                tag_prefix(BYSTANDER_LOCK, BYSTANDER_SCHEMA)
            ),
        )
        .unwrap_or_default()
        .into_iter()
        .map(|r| (r[0].clone(), (r[1].clone(), r[2].parse().unwrap_or(0))))
        .collect();
        for release in &by.releases {
            match done.get(release) {
                None => v.push(format!(
                    "the bystander's release {release} served but is not recorded done"
                )),
                Some((id, n)) if *n != BYSTANDER_STEPS => v.push(format!(
                    "the bystander's attempt {id} of {release} is done with {n} of its {BYSTANDER_STEPS} rows"
                )),
                Some(_) => {}
            }
        }
        // Every migration row it saw committed is still there.
        let mut written: BTreeMap<String, usize> = BTreeMap::new();
        for line in std::fs::read_to_string(self.dir.join("bystander_writes.out"))
            .unwrap_or_default()
            .lines()
        {
            if let Some(release) = line.strip_prefix("written ") {
                *written.entry(release.trim().to_string()).or_default() += 1;
            }
        }
        let there: BTreeMap<String, usize> = try_sql(
            &url,
            "SELECT release, count(*)::text FROM bystander_writes GROUP BY 1",
        )
        .unwrap_or_default()
        .into_iter()
        .map(|r| (r[0].clone(), r[1].parse().unwrap_or(0)))
        .collect();
        let releases: BTreeSet<&String> = written.keys().chain(there.keys()).collect();
        for release in releases {
            let (w, t) = (
                written.get(release).copied().unwrap_or(0),
                there.get(release).copied().unwrap_or(0),
            );
            if t < w {
                v.push(format!(
                    "the bystander's migrations of {release} saw {w} row(s) committed, {t} are there"
                ));
            } else if t > w && self.restarts.is_empty() {
                v.push(format!(
                    "{t} row(s) of the bystander's migrations of {release} are there, but they saw only {w} committed ({restarts})"
                ));
            }
        }
        // Every heartbeat its apps saw committed is still there, each app on one session.
        let beats: BTreeMap<usize, (usize, usize)> = try_sql(
            &url,
            "SELECT serve::text, count(*)::text, count(DISTINCT backend)::text FROM bystander_serving GROUP BY 1",
        )
        .unwrap_or_default()
        .into_iter()
        .filter_map(|r| Some((r[0].parse().ok()?, (r[1].parse().ok()?, r[2].parse().ok()?))))
        .collect();
        let (mut heartbeats, mut apps) = (0, 0);
        for (i, p) in by.procs.iter().enumerate() {
            let (t, sessions) = beats.get(&i).copied().unwrap_or((0, 0));
            heartbeats += t;
            if !p.served || p.killed {
                continue;
            }
            apps += 1;
            let seen = std::fs::read_to_string(&p.beats)
                .unwrap_or_default()
                .lines()
                .filter(|l| l.trim() == "beat")
                .count();
            let restarted = p
                .exit
                .is_some_and(|(_, at)| self.restart_during(p.spawned, at));
            if t < seen {
                v.push(format!(
                    "the bystander's app {} ({}) saw {seen} heartbeat(s) committed, {t} are there",
                    p.pid, p.release
                ));
            } else if t > seen && !restarted {
                v.push(format!(
                    "{t} heartbeat(s) of the bystander's app {} ({}) are there, but it saw only {seen} committed ({restarts})",
                    p.pid, p.release
                ));
            }
            if sessions > 1 {
                v.push(format!(
                    "the bystander's app {} ({}) wrote on {sessions} sessions: its session was replaced",
                    p.pid, p.release
                ));
            }
        }
        // Its newest markers are still in the shared directory (it keeps two: the newest
        // release's, and the one before it).
        let mut tried: Vec<&String> = Vec::new();
        for p in &by.procs {
            if tried.last() != Some(&&p.release) {
                tried.push(&p.release);
            }
        }
        for release in tried.iter().rev().take(2) {
            if !by.releases.contains(release) {
                continue;
            }
            let name = marker_name(BYSTANDER_LOCK, BYSTANDER_SCHEMA, release);
            if !self.shared.join(&name).exists() {
                v.push(format!(
                    "the bystander's marker {name} of {release} is gone from the shared directory"
                ));
            }
        }
        // No fleet gate's log names anything of the bystander, nor a bystander's the fleet.
        let mut of_bystander = vec![
            "bystander".to_string(),
            key16(BYSTANDER_LOCK),
            hash8(BYSTANDER_SCHEMA),
        ];
        of_bystander.extend(
            by.procs
                .iter()
                .map(|p| hash8(&p.release))
                .collect::<BTreeSet<_>>(),
        );
        let mut of_fleet = vec!["migrations-gate/chaos".to_string(), key16(FLEET_LOCK)];
        of_fleet.extend(
            self.gates
                .iter()
                .map(|g| hash8(&g.release))
                .collect::<BTreeSet<_>>(),
        );
        let logs = self
            .gates
            .iter()
            .map(|g| ("fleet gate", g.pid, &g.log, &of_bystander))
            .chain(
                by.procs
                    .iter()
                    .map(|p| ("bystander gate", p.pid, &p.log, &of_fleet)),
            );
        for (whose, pid, log, needles) in logs {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            if let Some(line) = text
                .lines()
                .find(|l| needles.iter().any(|n| l.contains(n.as_str())))
            {
                v.push(format!("{whose} {pid} names the other application: {line}"));
            }
        }
        format!(
            "bystander: {} release(s) done, {} gate(s) ({excused} failure(s) excused by restarts), {heartbeats} heartbeats written by {apps} app(s), {} migration rows",
            by.releases.len(),
            by.procs.len(),
            there.values().sum::<usize>()
        )
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

/// The first 32 bits of SHA-256 of `text`, in hex: a ledger (of its schema's name) and a
/// release (of its ID), as the gate derives them.
fn hash8(text: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(&Sha256::digest(text.as_bytes())[..4])
}

/// A `--lock NAME`'s key in 16 hex digits: the first 8 bytes of SHA-256 of the name, as the
/// README derives it (`pg_locks.classid` then `objid`).
fn key16(lock: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(&Sha256::digest(lock.as_bytes())[..8])
}

/// A lock name's key as `pg_locks` shows it: `classid` and `objid`.
fn lock_halves(lock: &str) -> (u32, u32) {
    let key = u64::from_str_radix(&key16(lock), 16).expect("16 hex digits");
    ((key >> 32) as u32, key as u32)
}

/// The start of every tagged `application_name` of a gate with this lock and ledger.
fn tag_prefix(lock: &str, schema: &str) -> String {
    format!("mgate:{}:{}:", key16(lock), hash8(schema))
}

/// The fleet's tag prefix.
fn fleet_prefix() -> String {
    tag_prefix(FLEET_LOCK, FLEET_SCHEMA)
}

/// The shared-directory marker of `release` of a gate with this lock and ledger.
fn marker_name(lock: &str, schema: &str, release: &str) -> String {
    format!(
        ".migrations-gate-{}-{}-{}",
        key16(lock),
        hash8(schema),
        hash8(release)
    )
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

/// What the sampler saw: the overlaps, and how well it watched.
#[derive(Default)]
struct Samples {
    /// When two of the fleet's attempts were busy at once, and which.
    overlaps: Vec<(String, String)>,
    /// Queries answered.
    taken: u64,
    /// Failed connections and queries (a PostgreSQL restart makes some).
    errors: u64,
    /// Gaps between two answers (or the start or the stop and an answer) longer than
    /// [`SAMPLE_GAP`].
    gaps: Vec<(SystemTime, SystemTime)>,
    /// The longest gap.
    longest: Duration,
}

/// Watches `pg_stat_activity` every [`SAMPLE_PERIOD`] from a direct connection: two of the
/// fleet's attempts' sessions busy (a statement running, or a transaction open) at once is an
/// overlap. Only sessions tagged with the fleet's identity count (the bystander's attempts
/// number from 1 in their own ledger, and run beside the fleet's). Counts its answers and
/// errors, and the gaps between answers, so that the checker knows it watched throughout.
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Samples>>,
}

impl Sampler {
    fn start(url: String, prefix: String) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let query = format!(
                "SELECT clock_timestamp()::text, string_agg(DISTINCT a, ',') FROM ( \
                 SELECT split_part(split_part(application_name, ' ', 1), ':', 5) AS a FROM pg_stat_activity \
                 WHERE datname = current_database() AND application_name LIKE '{prefix}%' \
                 AND state IN ('active', 'idle in transaction', 'idle in transaction (aborted)')) t \
                 WHERE a <> '-' HAVING count(DISTINCT a) > 1"
            );
            let mut out = Samples::default();
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return out;
            };
            let mut last = SystemTime::now();
            let gap = |out: &mut Samples, last: &mut SystemTime| {
                let now = SystemTime::now();
                let d = now.duration_since(*last).unwrap_or_default();
                out.longest = out.longest.max(d);
                if d > SAMPLE_GAP {
                    out.gaps.push((*last, now));
                }
                *last = now;
            };
            rt.block_on(async {
                let mut conn: Option<PgConnection> = None;
                while !s.load(Ordering::Relaxed) {
                    if conn.is_none() {
                        match PgConnection::connect(&url).await {
                            Ok(c) => conn = Some(c),
                            Err(_) => out.errors += 1,
                        }
                    }
                    if let Some(c) = conn.as_mut() {
                        match sqlx::raw_sql(AssertSqlSafe(query.as_str()))
                            .fetch_all(c)
                            .await
                        {
                            Ok(rows) => {
                                out.taken += 1;
                                gap(&mut out, &mut last);
                                for r in rows {
                                    let at: String = r.try_get_unchecked(0).unwrap_or_default();
                                    let ids: String = r.try_get_unchecked(1).unwrap_or_default();
                                    out.overlaps.push((at, ids));
                                }
                            }
                            Err(_) => {
                                out.errors += 1;
                                conn = None;
                            }
                        }
                    }
                    tokio::time::sleep(SAMPLE_PERIOD).await;
                }
            });
            gap(&mut out, &mut last);
            out
        });
        Sampler {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the sampler; a sampler that panicked took no samples.
    fn stop(mut self) -> Samples {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

/// One process the bystander started: `run --release bN --migrate ... -- bystander_app.sh`,
/// which migrates bN if it is not done, then becomes the app (one serving instance).
struct ByProc {
    child: Child,
    pid: i32,
    release: String,
    log: PathBuf,
    /// Where its app prints `beat` for each heartbeat row committed.
    beats: PathBuf,
    /// The file that tells its app to stop.
    stop: PathBuf,
    spawned: SystemTime,
    /// Its app wrote a heartbeat: it serves.
    served: bool,
    exit: Option<(i32, SystemTime)>,
    /// The bystander killed it: it did not stop when told, or hung.
    killed: bool,
}

/// What the bystander did.
#[derive(Default)]
struct BystanderRun {
    procs: Vec<ByProc>,
    /// The releases it brought to serving, in order.
    releases: Vec<String>,
    /// What went wrong in its own loop (a release that never served).
    problems: Vec<String>,
}

/// The bystander (see the module's documentation): a thread that rolls out releases of
/// another application on the schedule's database for as long as the schedule runs.
struct Bystander {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<BystanderRun>>,
    mark: String,
}

impl Bystander {
    /// Starts the bystander and waits (at most a minute) until its first release serves, so
    /// that the fleet starts beside it.
    fn start(s: &Schedule) -> Bystander {
        let stop = Arc::new(AtomicBool::new(false));
        let up = Arc::new(AtomicBool::new(false));
        let mark = format!("{}-bystander", s.mark);
        let mut runner = ByRunner {
            url: s.direct(),
            dir: s.dir.clone(),
            shared: s.shared.clone(),
            mark: mark.clone(),
            rng: fastrand::Rng::with_seed(s.bystander_seed ^ 0x5eed),
            stop: stop.clone(),
            up: up.clone(),
            run: BystanderRun::default(),
        };
        let thread = std::thread::spawn(move || {
            runner.roll();
            runner.run
        });
        let start = Instant::now();
        while !up.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(100));
        }
        Bystander {
            stop,
            thread: Some(thread),
            mark,
        }
    }

    /// Lets the release in flight finish, stops the serving app, and returns what it did
    /// (with any of its processes still running after that as a problem).
    fn stop(mut self) -> BystanderRun {
        self.stop.store(true, Ordering::Relaxed);
        let mut run = match self.thread.take().map(|t| t.join()) {
            Some(Ok(run)) => run,
            _ => BystanderRun {
                problems: vec!["the bystander's thread panicked".into()],
                ..BystanderRun::default()
            },
        };
        let start = Instant::now();
        let mut left = marked_processes(&self.mark);
        while !left.is_empty() && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(100));
            left = marked_processes(&self.mark);
        }
        if !left.is_empty() {
            run.problems.push(format!(
                "bystander processes left once it stopped: {left:?}"
            ));
        }
        run
    }
}

impl Drop for Bystander {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        for pid in marked_processes(&self.mark) {
            // SAFETY: plain system call on a process of this schedule's bystander.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

/// The bystander's thread.
struct ByRunner {
    url: String,
    dir: PathBuf,
    shared: PathBuf,
    mark: String,
    rng: fastrand::Rng,
    stop: Arc<AtomicBool>,
    up: Arc<AtomicBool>,
    run: BystanderRun,
}

impl ByRunner {
    fn spawn(&mut self, release: &str) -> usize {
        let i = self.run.procs.len();
        let log = self.dir.join(format!("bystander-{i}.log"));
        let beats = self.dir.join(format!("bystander-{i}.beats"));
        let stop = self.dir.join(format!("bystander-{i}.stop"));
        let file = std::fs::File::create(&log).expect("create bystander log");
        let child = Command::new(gate_bin())
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("MIGRATIONS_GATE_DATABASE_URL", &self.url)
            .env("DATABASE_URL", &self.url)
            // The operator's own name, after the tag: `mgate:<key>:<ledger>:<release>:<attempt> bystander`.
            .env("PGAPPNAME", "bystander")
            .env("CHAOS_MARK", &self.mark)
            .env("BYSTANDER_RELEASE", release)
            .env("BYSTANDER_SERVE", i.to_string())
            .env("BYSTANDER_STOP", &stop)
            .env("BYSTANDER_BEATS", &beats)
            .args([
                "run",
                "--lock",
                BYSTANDER_LOCK,
                "--schema",
                BYSTANDER_SCHEMA,
                "--release",
                release,
                // Named like a gate: only the fleet's names may be the fleet's.
                "--application-name",
                &format!("migrations-gate/bystander-{i}"),
                "--connect-timeout",
                "120s",
                "--wait-timeout",
                "240s",
                // A rolling upgrade: the previous release's app serves while the next migrates.
                "--other-releases",
                "ignore",
                // A release whose migration a restart failed is simply tried again.
                "--max-failures",
                "0",
                "--shared-dir",
                &self.shared.to_string_lossy(),
                "--migrate",
                &self.dir.join("bystander_migrate.sh").to_string_lossy(),
                "--",
                &self.dir.join("bystander_app.sh").to_string_lossy(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start a bystander gate");
        self.run.procs.push(ByProc {
            pid: child.id() as i32,
            child,
            release: release.to_string(),
            log,
            beats,
            stop,
            spawned: SystemTime::now(),
            served: false,
            exit: None,
            killed: false,
        });
        i
    }

    fn reap(&mut self) {
        for p in self.run.procs.iter_mut().filter(|p| p.exit.is_none()) {
            if let Ok(Some(status)) = p.child.try_wait() {
                use std::os::unix::process::ExitStatusExt;
                let code = status
                    .code()
                    .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
                p.exit = Some((code, SystemTime::now()));
            }
        }
    }

    fn kill(&mut self, i: usize) {
        let p = &mut self.run.procs[i];
        let _ = p.child.kill();
        p.killed = true;
        if let Ok(status) = p.child.wait() {
            use std::os::unix::process::ExitStatusExt;
            let code = status
                .code()
                .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
            p.exit = Some((code, SystemTime::now()));
        }
    }

    /// Whether process `i`'s app wrote a heartbeat.
    fn serves(&self, i: usize) -> bool {
        try_sql(
            &self.url,
            &format!("SELECT count(*) FROM bystander_serving WHERE serve = {i}"),
        )
        .is_ok_and(|r| r.first().is_some_and(|r| r[0] != "0"))
    }

    /// Starts a replica of `release` until one serves (it migrates the release first if the
    /// release is not done): a replica that exits (a PostgreSQL restart, or a defect) is
    /// started again, as an orchestrator would.
    fn bring_up(&mut self, release: &str) -> Option<usize> {
        for _ in 0..10 {
            let i = self.spawn(release);
            loop {
                self.reap();
                if self.run.procs[i].exit.is_some() {
                    break;
                }
                if self.serves(i) {
                    self.run.procs[i].served = true;
                    return Some(i);
                }
                if self.run.procs[i]
                    .spawned
                    .elapsed()
                    .is_ok_and(|e| e > Duration::from_secs(180))
                {
                    self.kill(i);
                    self.run.problems.push(format!(
                        "bystander gate {} of {release} neither served nor exited within 180 s: {}",
                        self.run.procs[i].pid,
                        last_line(&self.run.procs[i].log)
                    ));
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        self.run.problems.push(format!(
            "bystander release {release} never served in 10 tries"
        ));
        None
    }

    /// Tells the app of process `i` to stop, and waits for it (15 s, then it is killed).
    fn stop_app(&mut self, i: usize) {
        let _ = std::fs::write(&self.run.procs[i].stop, b"stop");
        let start = Instant::now();
        while self.run.procs[i].exit.is_none() && start.elapsed() < Duration::from_secs(15) {
            std::thread::sleep(Duration::from_millis(50));
            self.reap();
        }
        if self.run.procs[i].exit.is_none() {
            self.kill(i);
        }
    }

    /// Releases b1, b2, ... one after another until told to stop: each replaces the previous
    /// release's app once it serves, and serves 1 to 3 s before the next begins.
    fn roll(&mut self) {
        let mut current: Option<(usize, String)> = None;
        let mut n = 0;
        while !self.stop.load(Ordering::Relaxed) {
            n += 1;
            let release = format!("b{n}");
            let Some(new) = self.bring_up(&release) else {
                break;
            };
            self.run.releases.push(release.clone());
            if let Some((old, _)) = current.replace((new, release)) {
                self.stop_app(old);
            }
            self.up.store(true, Ordering::Relaxed);
            let until = Instant::now() + Duration::from_millis(self.rng.u64(1000..3000));
            while Instant::now() < until && !self.stop.load(Ordering::Relaxed) {
                self.reap();
                if let Some((c, rel)) = current.clone() {
                    // Its session ended (a PostgreSQL restart): the app starts again.
                    if self.run.procs[c].exit.is_some() {
                        current = self.bring_up(&rel).map(|i| (i, rel));
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if current.is_none() {
                break;
            }
        }
        if let Some((c, _)) = current {
            self.stop_app(c);
        }
        self.reap();
    }
}

/// The last line of a log (for a violation's text).
fn last_line(log: &std::path::Path) -> String {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .last()
        .unwrap_or_default()
        .to_string()
}
