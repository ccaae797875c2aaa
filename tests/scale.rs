//! A fleet: 300 gates started at once against a PostgreSQL with `max_connections = 50`.

mod support;

use std::fs::File;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use support::*;

const GATES: usize = 300;

#[test]
fn three_hundred_gates_against_fifty_connections_all_start_and_migrate_once() {
    let own = Cluster::start(&["max_connections=50"]);
    let db = own.new_db("fleet");
    let logs = server_dir("mg-fleet-logs");
    let stamps = logs.join("stamps");
    let migrate = format!("{} migrate", standin());

    // Sample the connections the gates hold, from a session opened before the fleet.
    let mut monitor = Session::open(&db.url);
    let stop = Arc::new(AtomicBool::new(false));
    let peak_gate = Arc::new(AtomicUsize::new(0));
    let peak_all = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (stop, peak_gate, peak_all) = (stop.clone(), peak_gate.clone(), peak_all.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let row = monitor.one(
                    "SELECT count(*) FILTER (WHERE application_name LIKE 'migrations-gate/%') || ' ' || count(*) \
                     FROM pg_stat_activity WHERE backend_type = 'client backend'",
                );
                let mut it = row.split(' ').map(|v| v.parse::<usize>().unwrap_or(0));
                peak_gate.fetch_max(it.next().unwrap_or(0), Ordering::SeqCst);
                peak_all.fetch_max(it.next().unwrap_or(0), Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };

    let started = Instant::now();
    let mut spawned_at = std::collections::HashMap::new();
    let children: Vec<Child> = (0..GATES)
        .map(|i| {
            let log = File::create(logs.join(format!("gate-{i}.log"))).unwrap();
            let mut c = db.gate();
            c.args(run_args("r1", &migrate, &[standin(), "stamp"]))
                .arg(&stamps)
                // A migration longer than it takes to start the fleet, so all of it waits.
                .env("STANDIN_STEP_MS", "1500")
                // The migration opens a new connection at every step: it fails if the waiting
                // fleet has starved it of connections.
                .env("STANDIN_STEP_CONNECT", "1")
                .stdout(Stdio::null())
                .stderr(log);
            let child = c.spawn().expect("spawn gate");
            spawned_at.insert(child.id(), now_ns());
            child
        })
        .collect();
    let spawned = started.elapsed();
    let mut failures = Vec::new();
    for (i, mut child) in children.into_iter().enumerate() {
        let status = loop {
            match child.try_wait().unwrap() {
                Some(s) => break s,
                None if started.elapsed() < Duration::from_secs(300) => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                None => {
                    let _ = child.kill();
                    break child.wait().unwrap();
                }
            }
        };
        if !status.success() {
            failures.push(format!(
                "gate {i}: {status}\n{}",
                std::fs::read_to_string(logs.join(format!("gate-{i}.log"))).unwrap_or_default()
            ));
        }
    }
    let all_done = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    sampler.join().unwrap();
    assert!(
        failures.is_empty(),
        "{} of {GATES} gates failed; first:\n{}",
        failures.len(),
        failures[0]
    );

    assert_eq!(db.migrations_started(), 1, "the migration ran once");
    assert_no_overlap(&db);
    let lines = std::fs::read_to_string(&stamps).unwrap();
    // (pid, start time, flag) of every app start; the app is exec'd, so its PID is its gate's.
    let starts: Vec<(u32, u128, &str)> = lines
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f.get(2).copied().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(starts.len(), GATES, "every replica started its app");
    assert!(
        starts.iter().all(|(_, _, flag)| *flag == "False"),
        "every app started with the flag off"
    );
    let done_ns = (db
        .one("SELECT extract(epoch FROM finished_at)::numeric * 1e9 FROM migrations_gate.ledger WHERE outcome = 'done'")
        .parse::<f64>()
        .unwrap()) as u128;
    // How long each replica took to start its app once both it existed and the release was done.
    let mut lags: Vec<f64> = starts
        .iter()
        .map(|(pid, t, _)| {
            let ready = done_ns.max(*spawned_at.get(pid).expect("a stamp from one of our gates"));
            t.saturating_sub(ready) as f64 / 1e9
        })
        .collect();
    lags.sort_by(|a, b| a.total_cmp(b));
    let lag = lags[lags.len() - 1];
    let p50 = lags[lags.len() / 2];
    let peak_gate = peak_gate.load(Ordering::SeqCst);
    eprintln!(
        "fleet of {GATES}: spawned in {:.1}s, all done after {:.1}s; app start after the release was done (or the gate started, if later): \
         p50 {p50:.2}s, max {lag:.2}s; \
         peak connections held by gates {peak_gate}, by everyone {}",
        spawned.as_secs_f64(),
        all_done.as_secs_f64(),
        peak_all.load(Ordering::SeqCst)
    );
    assert!(
        lag < 10.0,
        "every replica must start within seconds after the release is done ({lag:.1}s)"
    );
    assert!(
        peak_gate < 50,
        "waiting gates must never take every connection (peak {peak_gate})"
    );
    let _ = std::fs::remove_dir_all(&logs);
}

fn now_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}
