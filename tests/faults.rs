//! Faults: killed holders, lost lock sessions, a vanished host, PostgreSQL restarts. Each test
//! checks the database afterwards: the release ends done once, the seed row exists once, and no
//! two migrators overlapped.

mod support;

use std::process::{Child, Command};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use support::*;

fn migrate(db: &TestDb, flags: &[&str], step_ms: u32) -> Command {
    let mut c = db.gate();
    c.args(["migrate", "--release", "r1"])
        .args(flags)
        .args(["--", standin(), "migrate"])
        .env("STANDIN_STEP_MS", step_ms.to_string());
    c
}

fn kill(child_pid: i32, sig: i32) {
    // SAFETY: plain system call on a PID this test started.
    unsafe {
        libc::kill(child_pid, sig);
    }
}

fn assert_done_once(db: &TestDb) {
    assert_no_overlap(db);
    assert_eq!(db.seed_rows(), 1, "seed row must exist once");
    assert_eq!(db.ledger().times_done("r1"), 1);
    assert_eq!(
        db.migrations_finished(),
        1,
        "exactly one migration may finish"
    );
    db.assert_no_gate_locks();
}

/// A small deterministic generator, seeded from the clock and printed so a failure can be
/// replayed by reading the log.
struct Lcg(u64);

impl Lcg {
    fn new() -> Lcg {
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(7);
        eprintln!("random seed: {seed}");
        Lcg(seed)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

#[test]
fn holders_killed_at_random_points_repeatedly_still_migrate_once() {
    let db = cluster().new_db("kill_repeat");
    let mut rng = Lcg::new();
    let gates: Vec<Child> = (0..5)
        .map(|_| spawn(&mut migrate(&db, &["--kill-grace", "1s"], 300)))
        .collect();
    let mut killed: Vec<i32> = Vec::new();
    eventually(HANG_GUARD, "the first gate created the ledger", || {
        db.ledger().exists()
    });
    for _ in 0..3 {
        let mut holder = None;
        eventually(HANG_GUARD, "a live holder is migrating", || {
            holder = db.ledger().running_pids().into_iter().max();
            holder.is_some_and(|pid| !killed.contains(&pid))
        });
        let holder = holder.expect("a live holder");
        // Anywhere within the migration's five steps (~1.5 s), or just after it.
        std::thread::sleep(Duration::from_millis(rng.below(1800)));
        let still = db
            .ledger()
            .running_pids()
            .iter()
            .filter(|&&pid| pid == holder)
            .count();
        if still == 1 {
            kill(holder, libc::SIGKILL);
            killed.push(holder);
        } else {
            break;
        }
    }
    let outs = wait_all(gates, HANG_GUARD);
    let failed: Vec<_> = outs
        .iter()
        .filter(|o| o.status.code().is_some_and(|c| c != 0))
        .collect();
    assert!(
        failed.is_empty(),
        "a surviving gate failed:\n{}",
        stderr(failed[0])
    );
    assert_eq!(
        outs.iter().filter(|o| o.status.code().is_none()).count(),
        killed.len()
    );
    assert_done_once(&db);
    assert_eq!(db.ledger().count("abandoned"), killed.len());
    // Every killed holder's migration died with it.
    for pid in db.rows("SELECT pid FROM mg_runs WHERE finished_at IS NULL") {
        let pid: i32 = pid[0].parse().unwrap();
        eventually(
            Duration::from_secs(10),
            "killed holder's migration is gone",
            || !alive(pid),
        );
    }
}

#[test]
fn holder_whose_lock_session_is_terminated_fences_itself_and_one_waiter_takes_over() {
    let db = cluster().new_db("terminated");
    // The migration ignores SIGTERM (inherited through exec), and --kill-grace is long: fencing
    // must SIGKILL it at once, never wait for the grace (the taker-over waits only 7 s).
    let script = format!("trap '' TERM; exec {} migrate", standin());
    let mut a = db.gate();
    a.args([
        "migrate",
        "--release",
        "r1",
        "--kill-grace",
        "120s",
        "--",
        "sh",
        "-c",
        &script,
    ])
    .env("STANDIN_STEP_MS", "1500");
    let a = spawn(&mut a);
    eventually(HANG_GUARD, "the holder's migration started", || {
        db.migrations_started() == 1
    });
    let first_migration = db.first_migration_pid();
    let b = spawn(&mut migrate(&db, &[], 100));
    std::thread::sleep(Duration::from_millis(300));
    let terminated = db.one(
        "SELECT count(pg_terminate_backend(l.pid)) FROM pg_locks l JOIN pg_stat_activity s ON s.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND l.granted AND s.application_name LIKE 'migrations-gate/%' \
         AND s.datname = current_database()",
    );
    assert_eq!(terminated, "1", "exactly one gate session holds the lock");
    let a = wait_output(a, HANG_GUARD);
    assert_eq!(code(&a), 69, "{}", stderr(&a));
    assert_stderr_has(&a, "lost the database session holding the lock");
    assert!(!alive(first_migration), "the fenced migration must be dead");
    let b = wait_output(b, HANG_GUARD);
    assert_eq!(code(&b), 0, "{}", stderr(&b));
    assert_done_once(&db);
    let fenced: Vec<(String, Option<i32>)> = db
        .ledger()
        .attempts()
        .into_iter()
        .filter(|a| a.detail.starts_with("fenced"))
        .map(|a| (a.outcome, a.exit_code))
        .collect();
    assert_eq!(
        fenced,
        [("failed".to_string(), Some(137))],
        "the fenced attempt is recorded with the child's exit (SIGKILL)"
    );
}

/// The holder's attempt row is removed under it (a DBA's `DELETE`, a `reset` that raced the
/// lock): the heartbeat finds the row no longer `running`, so the holder fences itself, stops its
/// migration and records nothing as done; the next replica migrates.
#[test]
fn holder_whose_attempt_row_is_removed_fences_itself_and_records_nothing() {
    let db = cluster().new_db("row_removed");
    let a = spawn(&mut migrate(&db, &["--kill-grace", "1s"], 1000));
    eventually(HANG_GUARD, "the holder's migration started", || {
        db.migrations_started() == 1
    });
    let first_migration = db.first_migration_pid();
    assert_eq!(
        db.one(
            "WITH d AS (DELETE FROM migrations_gate.ledger WHERE outcome = 'running' RETURNING 1) \
             SELECT count(*) FROM d"
        ),
        "1"
    );
    let a = wait_output(a, HANG_GUARD);
    assert_eq!(db.ledger().count("done"), 0, "nothing done: {}", stderr(&a));
    assert!(!alive(first_migration), "the migration must be stopped");
    assert_eq!(code(&a), 69, "{}", stderr(&a));
    assert_stderr_has(&a, "no longer `running`");
    let b = wait_output(spawn(&mut migrate(&db, &[], 50)), HANG_GUARD);
    assert_eq!(code(&b), 0, "{}", stderr(&b));
    assert_eq!(db.ledger().times_done("r1"), 1);
}

#[test]
fn holder_host_vanishing_without_a_goodbye_frees_the_lock_within_30_seconds() {
    if !iptables_usable("holder_host_vanishing_without_a_goodbye_frees_the_lock_within_30_seconds")
    {
        return;
    }
    let db = cluster().new_db("partition");
    let a = spawn(&mut migrate(&db, &["--kill-grace", "2s"], 3000));
    eventually(HANG_GUARD, "the holder's migration started", || {
        db.migrations_started() == 1
    });
    let first_migration = db.first_migration_pid();
    let b = spawn(&mut migrate(&db, &[], 100));
    let lock_session = db.rows(
        "SELECT s.pid::text, s.client_port::text FROM pg_locks l JOIN pg_stat_activity s ON s.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND l.granted AND s.application_name LIKE 'migrations-gate/%' \
         AND s.datname = current_database()",
    );
    assert_eq!(lock_session.len(), 1);
    let (backend, client_port) = (
        lock_session[0][0].clone(),
        lock_session[0][1].parse::<u16>().unwrap(),
    );
    let cut_at = db
        .one("SELECT extract(epoch FROM clock_timestamp())::float8")
        .parse::<f64>()
        .unwrap();
    let cut = Instant::now();
    let partition = Partition::cut(client_port, cluster().port);

    // The holder notices first (heartbeat timeout) and stops its migration...
    let a = wait_output(a, HANG_GUARD);
    assert_eq!(code(&a), 69, "{}", stderr(&a));
    assert!(
        !alive(first_migration),
        "the cut-off holder's migration must be dead"
    );
    eprintln!(
        "holder fenced itself {:.1}s after the cut",
        cut.elapsed().as_secs_f64()
    );
    // ...then PostgreSQL's keepalives drop the dead session and a waiter takes over.
    let b = wait_output(b, HANG_GUARD);
    assert_eq!(code(&b), 0, "{}", stderr(&b));
    let taken = db
        .one("SELECT extract(epoch FROM started_at)::float8 FROM migrations_gate.ledger WHERE outcome = 'done'")
        .parse::<f64>()
        .unwrap();
    let takeover = taken - cut_at;
    eprintln!("a waiter took over {takeover:.1}s after the holder's packets started vanishing");
    assert!(
        takeover < 45.0,
        "keepalives must free the lock within ~30 s, took {takeover:.1}s"
    );
    assert_eq!(
        db.one(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = {backend}"
        )),
        "0"
    );
    drop(partition);
    assert_done_once(&db);
}

#[test]
fn postgres_restart_while_replicas_wait_is_survived_and_migrates_once() {
    let own = Cluster::start(&[]);
    let db = own.new_db("restart");
    // A holder that is not a gate: it never records the release done, and the restart ends it.
    let (holder, _) = hold_lock(&db.url, "migrations-gate");
    let waiters: Vec<Child> = (0..4).map(|_| spawn(&mut migrate(&db, &[], 100))).collect();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        db.migrations_started(),
        0,
        "nobody may migrate while the lock is held"
    );
    own.stop_fast();
    std::mem::forget(holder); // its connection died with the server
    std::thread::sleep(Duration::from_secs(2));
    own.start_again();
    let outs = wait_all(waiters, HANG_GUARD);
    for out in &outs {
        assert_eq!(
            code(out),
            0,
            "a waiter failed across the restart:\n{}",
            stderr(out)
        );
    }
    assert!(
        outs.iter().any(|o| stderr(o).contains("retrying")),
        "the waiters should have seen the restart"
    );
    assert_eq!(
        db.migrations_started(),
        1,
        "the migration happens once after the restart"
    );
    assert_done_once(&db);
}

/// The key of the default lock name `migrations-gate` (README, "The lock key").
const DEFAULT_LOCK_KEY: &str = "-2194319167836551848";

/// Whether iptables can be used here (root and a working iptables): see
/// [`environment_ready`] for what happens when it cannot.
fn iptables_usable(test: &str) -> bool {
    let ready = if !running_as_root() {
        Err("it needs root (iptables rules on loopback)".to_string())
    } else {
        match Command::new("iptables").args(["-w", "-L", "-n"]).output() {
            Ok(o) if o.status.success() => Ok(()),
            Ok(o) => Err(format!(
                "`iptables -L` failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => Err(format!("iptables is not runnable: {e}")),
        }
    };
    environment_ready(test, ready)
}

/// The connections of a waiter that hold a waiting slot (a two-int advisory lock,
/// `objsubid = 2`): backend PID and client port of each.
fn slot_connections(db: &TestDb, application_name: &str) -> Vec<(String, u16)> {
    db.rows(&format!(
        "SELECT s.pid::text, s.client_port::text FROM pg_stat_activity s \
         JOIN pg_locks l ON l.pid = s.pid AND l.locktype = 'advisory' AND l.objsubid = 2 AND l.granted \
         WHERE s.application_name = '{application_name}' AND s.datname = current_database()"
    ))
    .into_iter()
    .map(|r| (r[0].clone(), r[1].parse().expect("client_port")))
    .collect()
}

/// A gate started by [`spawn_waiter`], its stderr in a file the test reads while it runs.
struct Waiter {
    child: Child,
    log: std::path::PathBuf,
}

impl Waiter {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for it to exit (with a hang guard): its output, stderr read from the file.
    fn output(self, limit: Duration) -> std::process::Output {
        let mut out = wait_output(self.child, limit);
        out.stderr = std::fs::read(&self.log).unwrap_or_default();
        let _ = std::fs::remove_file(&self.log);
        out
    }
}

/// Starts `migrate --release r1 --wait-timeout WAIT --application-name NAME -- CMD...` while
/// the test holds the lock, and waits until its connection is settled: it has logged "waiting
/// for" (which it does on the connection it keeps, after moving to a listening one) and holds
/// a waiting slot on exactly one connection. Returns the waiter, and that connection's backend
/// PID and client port.
fn spawn_waiter(db: &TestDb, name: &str, wait: &str, cmd: &[&str]) -> (Waiter, String, u16) {
    let log = std::env::temp_dir().join(format!("{}-{name}.log", db.name));
    let file = std::fs::File::create(&log).expect("waiter log");
    let child = db
        .gate()
        .args(["migrate", "--release", "r1", "--wait-timeout", wait])
        .args(["--application-name", name, "--"])
        .args(cmd)
        .stdout(std::process::Stdio::null())
        .stderr(file)
        .spawn()
        .expect("spawn the waiter");
    let waiter = Waiter { child, log };
    eventually(Duration::from_secs(10), "the waiter logs its wait", || {
        waiter.log().contains("waiting for release")
    });
    let mut kept = Vec::new();
    eventually(
        Duration::from_secs(10),
        "the waiter keeps one connection",
        || {
            kept = slot_connections(db, name);
            kept.len() == 1
        },
    );
    let (backend, client_port) = kept.remove(0);
    (waiter, backend, client_port)
}

/// Ends the server side of a connection that was cut (PostgreSQL cannot tell it is dead: no
/// keepalives on a waiter's session), so its waiting slot does not outlive the test.
fn end_backend(db: &TestDb, backend: &str) {
    db.one(&format!("SELECT pg_terminate_backend({backend})"));
    eventually(Duration::from_secs(10), "the cut backend is gone", || {
        db.one(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = {backend}"
        )) == "0"
    });
}

/// Holds the gate's default lock from the test itself, so every gate waits.
fn hold_default_lock(db: &TestDb) -> Session {
    let mut s = Session::open(&db.url);
    assert_eq!(
        s.one(&format!(
            "SELECT pg_try_advisory_lock({DEFAULT_LOCK_KEY})::text"
        )),
        "true"
    );
    s
}

#[test]
fn waiter_whose_connection_dies_silently_still_gives_up_at_its_wait_timeout() {
    if !iptables_usable("waiter_whose_connection_dies_silently_still_gives_up_at_its_wait_timeout")
    {
        return;
    }
    let db = cluster().new_db("cut_waiter");
    let holder = hold_default_lock(&db);
    let started = Instant::now();
    let (waiter, backend, client_port) = spawn_waiter(&db, "cut-waiter", "15s", &["true"]);
    // Its packets vanish from now on, in both directions, with no RST: like a dead NAT entry
    // or a vanished network path. The cut stays until the test ends.
    let cut = Partition::cut(client_port, cluster().port);
    eprintln!("cut the waiter's connection (backend {backend}, client port {client_port})");
    let out = waiter.output(Duration::from_secs(120));
    let took = started.elapsed();
    eprintln!("the cut-off waiter exited {took:?} after its start");
    drop(cut);
    end_backend(&db, &backend);
    assert_eq!(db.ledger().attempts_at("r1"), []);
    assert_eq!(code(&out), 75, "{}", stderr(&out));
    // The bound is the behaviour under test: --wait-timeout is a hard bound.
    assert!(
        took < Duration::from_secs(15 + 10),
        "--wait-timeout 15s must bound the wait even on a dead connection: took {took:?}"
    );
    drop(holder);
}

/// How long the waiter's old connection stays cut in the test below: longer than a round-trip
/// deadline, and long enough that TCP's own retransmissions (every 0.2, 0.4, 0.8 ... s, so at
/// about 25 s and then 51 s after the cut) cannot rescue the old connection before it ends.
const LONG_CUT: Duration = Duration::from_secs(40);

#[test]
fn waiter_whose_connection_dies_silently_reconnects_and_follows_a_release_done_meanwhile() {
    if !iptables_usable(
        "waiter_whose_connection_dies_silently_reconnects_and_follows_a_release_done_meanwhile",
    ) {
        return;
    }
    let db = cluster().new_db("cut_follower");
    let holder = hold_default_lock(&db);
    let (mut waiter, backend, client_port) =
        spawn_waiter(&db, "cut-follower", "60s", &[standin(), "migrate"]);
    let cut = Partition::cut(client_port, cluster().port);
    let cut_at = Instant::now();
    // While the waiter's connection is cut, the lock is freed and another gate migrates.
    drop(holder);
    let second = wait_output(spawn(&mut migrate(&db, &[], 100)), HANG_GUARD);
    assert_eq!(code(&second), 0, "{}", stderr(&second));
    let mut cut = Some(cut);
    let exited_after = loop {
        if waiter.child.try_wait().expect("try_wait").is_some() {
            break cut_at.elapsed();
        }
        if cut_at.elapsed() >= LONG_CUT {
            cut = None; // lift the cut
        }
        if cut_at.elapsed() >= HANG_GUARD {
            let _ = waiter.child.kill();
            panic!("the waiter did not finish within {HANG_GUARD:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    drop(cut);
    let out = waiter.output(HANG_GUARD);
    end_backend(&db, &backend);
    eprintln!(
        "the cut-off waiter exited {exited_after:?} after the cut (the cut lasts {LONG_CUT:?})"
    );
    assert_eq!(db.migrations_started(), 1, "exactly one migration");
    assert_done_once(&db);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("release is done"),
        "the waiter must follow: {}",
        stderr(&out)
    );
    assert!(
        exited_after < LONG_CUT,
        "the waiter must give up its dead connection and reconnect, not wait for TCP: it exited {exited_after:?} after the cut, {:?} after the cut was lifted",
        exited_after.saturating_sub(LONG_CUT)
    );
}
