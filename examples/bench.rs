//! Benchmark: fast path, hand-off and the cost of waiting, against the common alternative.
//!
//! ```text
//! cargo build --release --bins --examples && cargo run --release --example bench [-- --quick] [--takeover]
//! ```
//!
//! Starts its own PostgreSQL (needs the server binaries, like the tests) and prints tables. Not
//! a test: numbers depend on the machine, so every number that matters is a ratio against a
//! floor measured in the same run: `pgbench -C -c 1` running the follower's own ledger query
//! (one connection plus one query, the least any gate can do) for the fast path, and the blocking
//! `pg_advisory_lock` alternative (every waiter holds a connection) for the hand-off.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use support::*;

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let only: Option<usize> = std::env::args()
        .skip_while(|a| a != "--only")
        .nth(1)
        .and_then(|v| v.parse().ok());
    if std::env::args().any(|a| a == "--takeover") {
        takeover(&Cluster::start(&[]), if quick { 3 } else { 8 });
        return;
    }
    let sizes: &[usize] = if quick { &[10, 50] } else { &[10, 100] };
    let cluster = Cluster::start(&["max_connections=350"]);
    println!(
        "migrations-gate benchmark (PostgreSQL on loopback, {} cores)\n",
        cores()
    );

    if only.is_none() {
        fast_path(&cluster, if quick { 20 } else { 50 });
    }

    println!("\n## Hand-off: from the release's ledger commit until each waiter execs its app\n");
    println!(
        "| waiters | max_connections | approach | p50 ms | p99 ms | max ms | peak connections | peak RSS of a waiter |"
    );
    println!("|---:|---:|---|---:|---:|---:|---:|---:|");
    for &n in sizes.iter().filter(|&&n| only.is_none_or(|o| o == n)) {
        let gate = hand_off(&cluster, n, Approach::Gate);
        print_row(n, 350, "migrations-gate", &gate);
        let blocking = hand_off(&cluster, n, Approach::BlockingLock);
        print_row(n, 350, "blocking pg_advisory_lock", &blocking);
    }
    if only.is_none() {
        takeover(&cluster, if quick { 3 } else { 8 });
    }
    drop(cluster);
    // The fleet: more replicas than the server has connections. The blocking alternative
    // cannot run here at all (it needs one connection per replica).
    let fleet = if quick { 100 } else { 300 };
    if only.is_none_or(|o| o == fleet) {
        let small = Cluster::start(&["max_connections=50"]);
        let gate = hand_off(&small, fleet, Approach::Gate);
        print_row(fleet, 50, "migrations-gate", &gate);
        println!(
            "| {fleet} | 50 | blocking pg_advisory_lock | - | - | - | cannot run: needs {} connections | - |",
            fleet + 1
        );
    }
}

/// A gate of the benchmark's one application: its migrations and its app start by different
/// commands, so they name the application (`--app`; docs/guide.md, "A shared database").
fn gate(db: &TestDb) -> Command {
    let mut c = db.gate();
    c.env("MIGRATIONS_GATE_APP", "bench");
    c
}

fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn time_runs(runs: usize, mut cmd: impl FnMut() -> Command) -> Vec<f64> {
    (0..runs)
        .map(|_| {
            let t = Instant::now();
            let st = cmd()
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .expect("run");
            assert!(st.success());
            t.elapsed().as_secs_f64() * 1000.0
        })
        .collect()
}

/// Trust on loopback for this benchmark's server, so that the floor and the gate pay the same
/// (no) authentication: the ratio then measures the gate, not SCRAM.
fn trust_loopback(cluster: &Cluster) {
    let hba = cluster.dir.join("data/pg_hba.conf");
    let old = std::fs::read_to_string(&hba).expect("read pg_hba.conf");
    std::fs::write(&hba, format!("host all all 127.0.0.1/32 trust\n{old}"))
        .expect("write pg_hba.conf");
    sql(&cluster.url("postgres"), "SELECT pg_reload_conf()");
}

/// The statement a follower of a done release sends, as the gate itself logs it at trace level.
fn follower_query(db: &TestDb) -> String {
    let out = gate(db)
        .args(run_args("r1", "false", &["/bin/true"]))
        .env("MIGRATIONS_GATE_LOG_FORMAT", "json")
        .env("MIGRATIONS_GATE_LOG", "migrations_gate::sql=trace")
        .output()
        .expect("run a follower");
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|v| v.get("sql").and_then(|s| s.as_str()).map(String::from))
        .expect("the follower logged its query at trace level")
}

/// Milliseconds per connection plus the follower's own ledger query: `pgbench -C -c 1`.
fn floor_ms(cluster: &Cluster, db: &TestDb, transactions: usize) -> f64 {
    let script = cluster.dir.join("fast-path.sql");
    std::fs::write(&script, format!("{};\n", follower_query(db))).expect("write pgbench script");
    let out = Command::new(cluster.bindir.join("pgbench"))
        .args(["-n", "-C", "-c", "1", "-t"])
        .arg(transactions.to_string())
        .arg("-f")
        .arg(&script)
        .args(["-h", "127.0.0.1", "-p"])
        .arg(cluster.port.to_string())
        .args(["-U", "postgres"])
        .arg(&db.name)
        .output()
        .expect("run pgbench");
    let text = String::from_utf8_lossy(&out.stdout);
    let tps: f64 = text
        .lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "pgbench printed no tps: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    1000.0 / tps
}

fn fast_path(cluster: &Cluster, runs: usize) {
    trust_loopback(cluster);
    let db = cluster.new_db("bench_fast");
    let st = gate(&db)
        .args(["migrate", "--release", "r1", "--", "true"])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let floor = floor_ms(cluster, &db, runs * 4);
    let follower = time_runs(runs, || {
        let mut c = gate(&db);
        c.args(run_args("r1", "false", &["/bin/true"]));
        c
    });
    let bare = time_runs(runs, || Command::new("/bin/true"));
    let (f, b) = (median(follower), median(bare));
    println!(
        "## Fast path: a follower whose release is already done (median of {runs} runs, trust auth)\n"
    );
    println!("| command | ms |");
    println!("|---|---:|");
    println!("| `/bin/true` | {b:.2} |");
    println!("| `migrations-gate run --release r1 ... -- /bin/true` | {f:.2} |");
    println!("| **added by the gate** | **{:.2}** |", f - b);
    println!("| floor: `pgbench -C -c 1`, one connection + the same ledger query | {floor:.2} |");
    println!(
        "| **ratio added / floor** (target ≤ 1.2) | **{:.2}** |",
        (f - b) / floor
    );
}

#[derive(Clone, Copy, PartialEq)]
enum Approach {
    Gate,
    BlockingLock,
}

struct Result {
    lags_ms: Vec<f64>,
    peak_connections: usize,
    peak_rss_kb: usize,
}

fn print_row(n: usize, max_connections: usize, name: &str, r: &Result) {
    let mut l = r.lags_ms.clone();
    l.sort_by(|a, b| a.total_cmp(b));
    println!(
        "| {n} | {max_connections} | {name} | {:.0} | {:.0} | {:.0} | {} | {} |",
        percentile(&l, 0.5),
        percentile(&l, 0.99),
        l[l.len() - 1],
        r.peak_connections,
        if r.peak_rss_kb > 0 {
            format!("{:.1} MB", r.peak_rss_kb as f64 / 1024.0)
        } else {
            "-".into()
        }
    );
}

fn now_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn vm_hwm_kb(pid: u32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// One holder migrates until told to stop; `n` waiters start meanwhile. Returns each waiter's
/// delay from the release's commit to its app's start.
fn hand_off(cluster: &Cluster, n: usize, approach: Approach) -> Result {
    let db = cluster.new_db("bench_handoff");
    let dir = server_dir("mg-bench");
    let stamps = dir.join("stamps");
    let go = dir.join("go");
    let migration = format!(
        "sh -c 'while [ ! -e {} ]; do sleep 0.02; done'",
        go.display()
    );
    let command = |first: bool| -> Command {
        match approach {
            Approach::Gate => {
                let mut c = gate(&db);
                c.args(["run", "--release", "r1", "--migrate"])
                    .arg(if first { migration.as_str() } else { "false" })
                    .args(["--", standin(), "stamp"])
                    .arg(&stamps);
                c
            }
            Approach::BlockingLock => {
                let mut c = Command::new(standin());
                c.arg("blocking-gate")
                    .arg(&stamps)
                    .arg(&go)
                    .env("DATABASE_URL", &db.url);
                c
            }
        }
    };
    let mut monitor = Session::open(&db.url);
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (stop, peak, name) = (stop.clone(), peak.clone(), db.name.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let n: usize = monitor
                    .one(&format!(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{name}' AND pid <> pg_backend_pid()"
                    ))
                    .parse()
                    .unwrap_or(0);
                peak.fetch_max(n, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let mut children: Vec<Child> = Vec::new();
    // Each replica's stderr in a file, shown if it fails.
    let log = |i: usize| dir.join(format!("replica-{i}.log"));
    let mut first = command(true);
    children.push(
        first
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log(0)).unwrap())
            .spawn()
            .unwrap(),
    );
    // Let the first one take the lock before the others arrive.
    eventually(
        Duration::from_secs(30),
        "the holder is migrating",
        || match approach {
            Approach::Gate => {
                db.one("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") != "0"
            }
            Approach::BlockingLock => {
                db.one("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted")
                    != "0"
            }
        },
    );
    let mut spawned_at = HashMap::new();
    for i in 1..=n {
        let child = command(false)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log(i)).unwrap())
            .spawn()
            .unwrap();
        spawned_at.insert(child.id(), now_ns());
        children.push(child);
    }
    // Every waiter is waiting (not still starting) before the release completes.
    std::thread::sleep(Duration::from_millis(1000 + 5 * n as u64));
    let waiter_rss = children[1..]
        .iter()
        .map(|c| vm_hwm_kb(c.id()))
        .max()
        .unwrap_or(0);
    std::fs::write(&go, "").unwrap();
    for (i, mut c) in children.into_iter().enumerate() {
        let st = c.wait().unwrap();
        assert!(
            st.success(),
            "replica {i} failed ({st}):\n{}",
            std::fs::read_to_string(log(i)).unwrap_or_default()
        );
    }
    stop.store(true, Ordering::SeqCst);
    sampler.join().unwrap();
    let done_ns = match approach {
        Approach::Gate => db.one(
            "SELECT (extract(epoch FROM finished_at)::numeric * 1e9)::text FROM migrations_gate.ledger WHERE outcome = 'done'",
        ),
        Approach::BlockingLock => db.one("SELECT (extract(epoch FROM at)::numeric * 1e9)::text FROM bench_done"),
    };
    let done_ns = done_ns.parse::<f64>().unwrap() as u128;
    let lags_ms = std::fs::read_to_string(&stamps)
        .unwrap()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let pid: u32 = f[0].parse().ok()?;
            let t: u128 = f[1].parse().ok()?;
            // Waiters only; the blocking approach stamps from its own (non-exec) process.
            spawned_at.get(&pid)?;
            Some(t.saturating_sub(done_ns) as f64 / 1e6)
        })
        .collect::<Vec<_>>();
    assert_eq!(lags_ms.len(), n, "every waiter started");
    let _ = std::fs::remove_dir_all(&dir);
    Result {
        lags_ms,
        peak_connections: peak.load(Ordering::SeqCst),
        peak_rss_kb: if approach == Approach::Gate {
            waiter_rss
        } else {
            0
        },
    }
}

/// Takeover after `kill -9`: a holder migrating (`sleep 60`) and one waiter; the holder and its
/// migration are killed with SIGKILL (as an OOM kill or a deleted container does) at a random
/// point of its heartbeat period; measured from the kill until the waiter's migration starts
/// (it writes the time). Default flags.
fn takeover(cluster: &Cluster, runs: usize) {
    println!(
        "\n## Takeover: from `kill -9` of the holder and its migration until the next holder's migration starts\n"
    );
    let mut times = Vec::new();
    for run in 0..runs {
        let db = cluster.new_db("bench_takeover");
        let dir = server_dir("mg-bench-takeover");
        let stamp = dir.join("stamp");
        let mut holder = gate(&db);
        holder
            .args(["migrate", "--release", "r1", "--", "sh", "-c", "sleep 60"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut holder = holder.spawn().unwrap();
        eventually(Duration::from_secs(30), "the holder is migrating", || {
            try_sql(
                &db.url,
                "SELECT count(*) FROM migrations_gate.ledger WHERE outcome = 'running'",
            )
            .is_ok_and(|r| r[0][0] == "1")
        });
        let mut waiter = gate(&db);
        waiter
            .args(["migrate", "--release", "r1", "--", "sh", "-c"])
            .arg(format!("date +%s%N > {}", stamp.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let waiter = waiter.spawn().unwrap();
        // The waiter is waiting, then a point of the heartbeat period that differs per run.
        std::thread::sleep(Duration::from_millis(1500 + (run as u64 * 370) % 1000));
        let mut pids = support::freezer::descendants(holder.id() as i32);
        pids.push(holder.id() as i32);
        let killed_at = now_ns();
        for pid in pids {
            // SAFETY: kill(2) of processes this benchmark started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = holder.wait();
        let out = wait_output(waiter, Duration::from_secs(120));
        assert!(out.status.success(), "the waiter failed: {}", stderr(&out));
        let started: u128 = std::fs::read_to_string(&stamp)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        times.push(started.saturating_sub(killed_at) as f64 / 1e9);
        let _ = std::fs::remove_dir_all(&dir);
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!("| runs | min s | median s | max s |");
    println!("|---:|---:|---:|---:|");
    println!(
        "| {runs} | {:.1} | {:.1} | {:.1} |",
        times[0],
        median(times.clone()),
        times[times.len() - 1]
    );
}
