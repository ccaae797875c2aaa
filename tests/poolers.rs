//! Through a real PgBouncer whose pool is smaller than the fleet, in session and transaction
//! pooling modes, with the gate, its migration and the app all connecting through the pooler
//! (as a real deployment with one `DATABASE_URL` does): the race still migrates once, every app
//! starts, a killed holder is still taken over, and no advisory lock is ever left behind.
//!
//! PgBouncer keeps its defaults (`query_wait_timeout` = 120 s among them), as an operator's
//! would. The stand-in's overlap probe (session advisory lock 4242) cannot be trusted through a
//! transaction pooler, so it is taken on a direct connection of its own (`STANDIN_WITNESS_URL`):
//! an independent second witness next to the ledger.

mod support;

use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use support::*;

/// The hang guard behind a pooler: longer than PgBouncer's default `query_wait_timeout` (120 s),
/// so a migration starved of server connections fails visibly instead of hanging the test.
const POOLER_HANG_GUARD: Duration = Duration::from_secs(240);
/// Server connections per pool: fewer than the replicas.
const POOL: u32 = 3;
const REPLICAS: usize = 10;

/// A gate, its migration and its app all connecting through the pooler; the stand-in's overlap
/// witness connects directly.
fn gate_via(bouncer: &PgBouncer, db: &TestDb) -> Command {
    let mut c = db.gate();
    c.env("MIGRATIONS_GATE_DATABASE_URL", bouncer.url(&db.name))
        .env("DATABASE_URL", bouncer.url(&db.name))
        .env("STANDIN_WITNESS_URL", &db.url);
    c
}

fn race(bouncer: &PgBouncer, db: &TestDb, n: usize) -> Vec<Output> {
    let migrate = format!("{} migrate", standin());
    let cmds = (0..n)
        .map(|_| {
            let mut c = gate_via(bouncer, db);
            c.args(run_args("r1", &migrate, &[standin(), "start"]));
            c
        })
        .collect();
    run_all_within(cmds, POOLER_HANG_GUARD, || {
        let ledger = if db.ledger().exists() {
            db.ledger()
                .attempts()
                .iter()
                .map(|a| format!("{a:?}"))
                .collect::<Vec<_>>()
                .join("\n")
        } else {
            "(no ledger)".into()
        };
        format!(
            "mg_runs: {} started, {} finished; ledger:\n{ledger}\npgbouncer log (tail):\n{}",
            db.migrations_started(),
            db.migrations_finished(),
            bouncer
                .log()
                .lines()
                .rev()
                .take(15)
                .collect::<Vec<_>>()
                .join("\n")
        )
    })
}

/// Starts every command at once and waits for all of them within one overall `limit`; kills
/// whatever still runs then and fails, showing what the gates said and `diagnose()`.
fn run_all_within(
    mut cmds: Vec<Command>,
    limit: Duration,
    diagnose: impl Fn() -> String,
) -> Vec<Output> {
    let start = Instant::now();
    let mut children: Vec<Child> = cmds.iter_mut().map(spawn).collect();
    loop {
        let running = children
            .iter_mut()
            .map(|c| c.try_wait().expect("try_wait").is_none())
            .filter(|&still| still)
            .count();
        if running == 0 {
            break;
        }
        if start.elapsed() >= limit {
            for c in children.iter_mut() {
                let _ = c.kill();
            }
            let outs: Vec<Output> = children
                .into_iter()
                .map(|c| c.wait_with_output().expect("collect output"))
                .collect();
            let finished: Vec<String> = outs
                .iter()
                .filter(|o| o.status.code().is_some())
                .map(|o| format!("exit {}:\n{}", code(o), stderr(o)))
                .collect();
            let stuck = outs.iter().find(|o| o.status.code().is_none()).map(stderr);
            panic!(
                "{running} of {} gates were still running after {limit:?}\n{}\n\
                 one of those still running said:\n{}\nthose that finished said:\n{}",
                outs.len(),
                diagnose(),
                stuck.unwrap_or_default(),
                finished.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    children
        .into_iter()
        .map(|c| c.wait_with_output().expect("collect output"))
        .collect()
}

fn assert_race_ok(db: &TestDb, bouncer: &PgBouncer, outs: &[Output], n: usize) {
    let codes: Vec<i32> = outs.iter().map(code).collect();
    let first_failure = outs
        .iter()
        .find(|o| code(o) != 0)
        .map(stderr)
        .unwrap_or_default();
    assert_eq!(
        db.migrations_started(),
        1,
        "the migration must run exactly once (gate exit codes {codes:?}); a failed gate said:\n{first_failure}\npgbouncer log:\n{}",
        bouncer.log()
    );
    assert_no_overlap(db);
    assert_eq!(db.seed_rows(), 1);
    assert_eq!(
        db.app_starts_flag_off_on_ready_schema(),
        n,
        "every app starts once, with the flag off, on a ready schema (gate exit codes {codes:?})"
    );
    assert_eq!(db.app_starts(), n);
    assert_eq!(db.ledger().times_done("r1"), 1);
    db.assert_no_gate_locks();
    for out in outs {
        assert_eq!(code(out), 0, "a gate failed:\n{}", stderr(out));
        assert!(
            !stderr(out).contains("42P05"),
            "prepared statement clash: {}",
            stderr(out)
        );
    }
}

#[test]
fn ten_replicas_behind_session_pooling_with_a_pool_of_three_migrate_once_and_all_start() {
    let bouncer = PgBouncer::start(cluster(), "session", POOL);
    let db = cluster().new_db("pool_session");
    let outs = race(&bouncer, &db, REPLICAS);
    assert_race_ok(&db, &bouncer, &outs, REPLICAS);
}

#[test]
fn ten_replicas_behind_transaction_pooling_with_a_pool_of_three_migrate_once_and_leak_no_lock() {
    let bouncer = PgBouncer::start(cluster(), "transaction", POOL);
    let db = cluster().new_db("pool_tx");
    let outs = race(&bouncer, &db, REPLICAS);
    assert_race_ok(&db, &bouncer, &outs, REPLICAS);
    let holder = outs
        .iter()
        .find(|o| stderr(o).contains("this replica migrates"))
        .expect("a holder");
    assert_stderr_has(holder, "scope=Transaction");
    // The fast path works through the pooler too (no prepared statements anywhere).
    let migrate = format!("{} migrate", standin());
    for _ in 0..5 {
        let out = gate_via(&bouncer, &db)
            .args(run_args("r1", &migrate, &["true"]))
            .output()
            .unwrap();
        assert_eq!(code(&out), 0, "{}", stderr(&out));
    }
    db.assert_no_gate_locks();
}

#[test]
fn holder_killed_behind_transaction_pooling_with_a_pool_of_three_is_taken_over_and_its_lock_released()
 {
    let bouncer = PgBouncer::start(cluster(), "transaction", POOL);
    let db = cluster().new_db("pool_kill");
    let mut first = gate_via(&bouncer, &db);
    first
        .args(["migrate", "--release", "r1", "--", standin(), "migrate"])
        .env("STANDIN_STEP_MS", "1000");
    let first = spawn(&mut first);
    eventually(POOLER_HANG_GUARD, "the holder started migrating", || {
        db.migrations_started() == 1
    });
    let first_migration = db.first_migration_pid();
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
    let _ = wait_output(first, POOLER_HANG_GUARD);
    let outs = wait_all(waiters, POOLER_HANG_GUARD);
    eventually(
        Duration::from_secs(10),
        "the killed holder's migration is gone",
        || !alive(first_migration),
    );
    assert_no_overlap(&db);
    assert_eq!(db.migrations_finished(), 1);
    assert_eq!(db.seed_rows(), 1);
    assert_eq!(db.ledger().count("done"), 1);
    // The killed holder's attempt outlived its lock transaction (written by its witness
    // connection), so the taker-over saw it and waited out its fencing time before migrating:
    // a holder cut off rather than killed would have stopped its migration by then.
    assert_eq!(
        db.ledger().count("abandoned"),
        1,
        "the vanished holder's attempt must be visible to the taker-over"
    );
    assert_eq!(
        db.one(&format!(
            "SELECT count(*) FROM mg_runs r, migrations_gate.ledger l WHERE l.outcome = 'abandoned' \
             AND r.pid <> {first_migration} \
             AND r.started_at < coalesce(l.heartbeat_at, l.started_at) + make_interval(secs => l.fence_secs)"
        )),
        "0",
        "the taker-over migrated before the vanished holder's fencing time had passed"
    );
    db.assert_no_gate_locks();
    for out in &outs {
        assert_eq!(code(out), 0, "{}", stderr(out));
    }
}

/// Replicas of the same-port tests: twice the pool.
const SAME_PORT_REPLICAS: usize = 6;

/// PostgreSQL and a PgBouncer in front of it on the same port number: PgBouncer listens in a
/// network namespace of the test's own and reaches PostgreSQL over a veth pair, as an operator's
/// PgBouncer Service on 5432 does. Fields drop in order: PgBouncer, the server, the namespace.
struct SamePort {
    bouncer: PgBouncer,
    db: TestDb,
    _cluster: Cluster,
    _ns: support::netns::NetNs,
}

/// [`SamePort`], or `None` (with the reason on stderr) where `ip netns` is unusable.
fn same_port_pooler(pool_mode: &str, pool_size: u32) -> Option<SamePort> {
    let ns = match support::netns::NetNs::create() {
        Ok(ns) => ns,
        Err(why) => {
            environment_ready(
                "the same-port pooler tests",
                Err(format!("`ip netns` is unusable here ({why})")),
            );
            return None;
        }
    };
    let cluster = Cluster::start(&[&format!("listen_addresses=127.0.0.1,{}", ns.host_ip)]);
    let hba = cluster.dir.join("data/pg_hba.conf");
    let mut rules = std::fs::read_to_string(&hba).expect("read pg_hba.conf");
    rules.push_str(&format!("host all all {} scram-sha-256\n", ns.subnet()));
    std::fs::write(&hba, rules).expect("write pg_hba.conf");
    sql(&cluster.url("postgres"), "SELECT pg_reload_conf()");
    let at = Listen {
        addr: ns.ns_ip.clone(),
        port: cluster.port,
        server: format!("host={} port={}", ns.host_ip, cluster.port),
        netns: Some(ns.name.clone()),
    };
    let bouncer = PgBouncer::start_at(&at, pool_mode, pool_size);
    let db = cluster.new_db("same_port");
    Some(SamePort {
        bouncer,
        db,
        _cluster: cluster,
        _ns: ns,
    })
}

/// Every gate that looked at the route said it was not proven direct, and the holder locked in
/// transaction scope.
fn assert_no_route_taken_for_direct(outs: &[Output]) {
    for out in outs {
        let err = stderr(out);
        assert!(
            !err.contains("route=Direct"),
            "a pooler on the same port number was taken for a direct connection:\n{err}"
        );
    }
    let holder = outs
        .iter()
        .find(|o| stderr(o).contains("this replica migrates"))
        .expect("a holder");
    // "not proven direct: the server sees the client ..." or "not direct: the backend PID changed".
    assert_stderr_has(holder, "why=\"not ");
    assert_stderr_has(holder, "scope=Transaction");
}

#[test]
fn a_pooler_on_the_same_port_number_in_transaction_mode_is_not_taken_for_the_server() {
    let Some(sp) = same_port_pooler("transaction", POOL) else {
        return;
    };
    let outs = race(&sp.bouncer, &sp.db, SAME_PORT_REPLICAS);
    assert_race_ok(&sp.db, &sp.bouncer, &outs, SAME_PORT_REPLICAS);
    assert_no_route_taken_for_direct(&outs);
}

#[test]
fn a_pooler_on_the_same_port_number_in_session_mode_with_a_pool_of_three_lets_six_replicas_migrate_once()
 {
    let Some(sp) = same_port_pooler("session", POOL) else {
        return;
    };
    let outs = race(&sp.bouncer, &sp.db, SAME_PORT_REPLICAS);
    assert_race_ok(&sp.db, &sp.bouncer, &outs, SAME_PORT_REPLICAS);
    assert_no_route_taken_for_direct(&outs);
}

/// A gate through the pooler whose stderr goes to a file the test reads while it runs.
fn spawn_logged(mut cmd: Command, log: &std::path::Path) -> Child {
    let file = std::fs::File::create(log).expect("create the gate's log file");
    cmd.stdout(std::process::Stdio::null())
        .stderr(file)
        .spawn()
        .expect("start the gate")
}

fn read_log(log: &std::path::Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

/// Ends the server session that holds the gate's lock (not the stand-in's probe lock 4242).
fn terminate_lock_session(db: &TestDb) -> String {
    db.one(
        "SELECT count(pg_terminate_backend(l.pid)) FROM pg_locks l \
         WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND l.granted AND l.objid <> 4242 \
         AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
}

/// Issue 21, sequence 1: a taker-over (A) holds the lock in transaction scope and waits out a
/// vanished holder's fencing time; its lock session is lost meanwhile, another replica (B) takes
/// the lock, migrates and records the release done. A must give up its turn when it sees its
/// lock gone, never begin an attempt of a done release, never mark B's attempt abandoned nor end
/// B's sessions: it waits again and follows.
#[test]
fn taker_over_that_loses_its_lock_while_waiting_out_the_fencing_time_waits_again_and_never_migrates_a_done_release()
 {
    let bouncer = PgBouncer::start(cluster(), "transaction", POOL);
    let db = cluster().new_db("pool_lost_taker");
    let gate = |step_ms: &str| {
        let mut c = gate_via(&bouncer, &db);
        c.args([
            "migrate",
            "--release",
            "r1",
            "--kill-grace",
            "1s",
            "--",
            standin(),
            "migrate",
        ])
        .env("STANDIN_STEP_MS", step_ms);
        c
    };
    let vanished = spawn(&mut gate("1000"));
    eventually(
        POOLER_HANG_GUARD,
        "the first holder started migrating",
        || db.migrations_started() == 1,
    );
    // SAFETY: plain system call on a PID this test started.
    unsafe {
        libc::kill(vanished.id() as i32, libc::SIGKILL);
    }
    let _ = wait_output(vanished, POOLER_HANG_GUARD);

    let dir = server_dir("mg-lost-taker");
    let a_log = dir.join("a.log");
    let mut a = spawn_logged(gate("100"), &a_log);
    let start = Instant::now();
    while !read_log(&a_log).contains("taking over once it has surely stopped its migration") {
        let gone = a.try_wait().expect("try_wait").is_some();
        assert!(
            !gone && start.elapsed() < POOLER_HANG_GUARD,
            "A did not wait out the fencing time; it said:\n{}",
            read_log(&a_log)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(terminate_lock_session(&db), "1", "A holds the lock");
    let b = spawn(&mut gate("100"));
    let b = wait_output(b, POOLER_HANG_GUARD);
    let a = wait_output(a, POOLER_HANG_GUARD);
    let a_said = read_log(&a_log);

    // The database: one done attempt, after which nothing of r1 began; the vanished holder's
    // attempt is the only one abandoned; the migrations never overlapped.
    let attempts = db.ledger().attempts();
    let shown = format!("{attempts:#?}\nA said:\n{a_said}\nB said:\n{}", stderr(&b));
    assert_eq!(db.ledger().times_done("r1"), 1, "{shown}");
    assert_eq!(
        db.one(
            "SELECT count(*) FROM migrations_gate.ledger a, migrations_gate.ledger d \
             WHERE d.outcome = 'done' AND a.release = d.release AND a.started_at > d.finished_at"
        ),
        "0",
        "an attempt of r1 began after it was done: {shown}"
    );
    assert_eq!(
        attempts.len(),
        2,
        "only the vanished holder's attempt and B's: A began none: {shown}"
    );
    assert_eq!(db.ledger().count("abandoned"), 1, "{shown}");
    assert_eq!(db.migrations_finished(), 1, "{shown}");
    assert_no_overlap(&db);
    db.assert_no_gate_locks();
    // The processes: both exit 0; A never migrated, and said why it waited again.
    assert_eq!(code(&b), 0, "{shown}");
    assert_eq!(code(&a), 0, "{shown}");
    assert!(!a_said.contains("this replica migrates"), "{shown}");
    assert!(
        a_said.contains("lost the lock while waiting out the previous holder's fencing time"),
        "{shown}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue 21, sequence 2: the holder's gate and its migration are frozen together (a cgroup
/// freezer, as `docker pause` or a stalled node) longer than its fencing time, and its lock
/// session is lost meanwhile; the next holder takes over and migrates. Behind a transaction
/// pooler the frozen migration has no server session to end, so whatever it sends once thawed
/// gets a fresh one. The gate, awake in the same instant, pauses it before it asks the server
/// anything and kills it without a grace: nothing the old attempt starts afterwards runs. The
/// migration here ignores SIGTERM (as tools that finish their step on SIGTERM do), so a grace
/// would let it write on beside the next holder.
#[test]
fn holder_frozen_with_its_migration_behind_transaction_pooling_stops_it_as_it_thaws() {
    let freezer = match support::freezer::Freezer::create() {
        Ok(f) => f,
        Err(why) => panic!("this test needs the cgroup v1 freezer (CI runs as root): {why}"),
    };
    let bouncer = PgBouncer::start(cluster(), "transaction", POOL);
    let db = cluster().new_db("pool_frozen");
    db.one(
        "CREATE TABLE frozen_writes (tag text NOT NULL, stmt_at timestamptz NOT NULL DEFAULT statement_timestamp()); \
         SELECT 1",
    );
    // One autocommit INSERT per step, each from a new psql through the pooler, N steps.
    let script = "trap '' TERM; i=0; while [ $i -lt $N ]; do \
        psql \"$DATABASE_URL\" -qAtc \"INSERT INTO frozen_writes (tag) VALUES (split_part(current_setting('application_name'), ' ', 1))\" || exit 1; \
        sleep 0.05; i=$((i+1)); done";
    let gate = |steps: &str| {
        let mut c = gate_via(&bouncer, &db);
        c.args([
            "migrate",
            "--release",
            "r1",
            "--kill-grace",
            "2s",
            "--",
            "sh",
            "-c",
            script,
        ])
        .env("N", steps)
        .env("PATH", std::env::var_os("PATH").unwrap_or_default());
        c
    };
    let dir = server_dir("mg-frozen");
    let h_log = dir.join("h.log");
    let h = spawn_logged(gate("100000"), &h_log);
    let writes_of = |attempt: &str| {
        db.one(&format!(
            "SELECT count(*) FROM frozen_writes WHERE split_part(tag, ':', 5) = '{attempt}'"
        ))
        .parse::<u32>()
        .expect("a count")
    };
    eventually(POOLER_HANG_GUARD, "the holder's migration writes", || {
        writes_of("1") >= 3
    });
    freezer.add_tree(h.id() as i32);
    freezer.freeze();
    assert_eq!(
        terminate_lock_session(&db),
        "1",
        "the frozen holder held the lock"
    );
    let b = spawn(&mut gate("20"));
    eventually(POOLER_HANG_GUARD, "the next holder migrates", || {
        writes_of("2") >= 1
    });
    let thawed_at = db.one("SELECT clock_timestamp()::text");
    freezer.thaw();
    let h = wait_output(h, POOLER_HANG_GUARD);
    let b = wait_output(b, POOLER_HANG_GUARD);
    let h_said = read_log(&h_log);
    let shown = format!(
        "{:#?}\nH said:\n{h_said}\nB said:\n{}",
        db.ledger().attempts(),
        stderr(&b)
    );

    // The database: nothing the frozen attempt sent after the thaw started later than the
    // instant the gate needs to pause it (half a second of slack for a loaded machine); B's
    // attempt is the one done.
    let late = db.one(&format!(
        "SELECT count(*) FROM frozen_writes WHERE split_part(tag, ':', 5) = '1' \
         AND stmt_at > '{thawed_at}'::timestamptz + interval '500 ms'"
    ));
    assert_eq!(late, "0", "the thawed migration wrote on: {shown}");
    assert!(
        db.one(&format!(
            "SELECT count(*) FROM frozen_writes WHERE split_part(tag, ':', 5) = '1' \
             AND stmt_at > '{thawed_at}'::timestamptz"
        ))
        .parse::<u32>()
        .expect("a count")
            <= 1,
        "more than the statement in flight at the thaw: {shown}"
    );
    assert_eq!(db.ledger().times_done("r1"), 1, "{shown}");
    assert_eq!(writes_of("2"), 20, "{shown}");
    assert_eq!(db.ledger().count("running"), 0, "{shown}");
    db.assert_no_gate_locks();
    // The processes: the frozen holder fenced itself (69), the next holder exits 0.
    assert_eq!(code(&h), 69, "{shown}");
    assert_eq!(code(&b), 0, "{shown}");
    assert!(h_said.contains("the migration is paused"), "{shown}");
    let _ = std::fs::remove_dir_all(&dir);
}
