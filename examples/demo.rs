//! Demo: a throwaway PostgreSQL and five replicas of a deliberately racy app started at once
//! through the gate. Prints who migrated, who waited, and what the database says.
//!
//! ```text
//! cargo build --release --bins --examples && cargo run --release --example demo
//! ```

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::{Child, Stdio};
use std::time::Duration;

use support::*;

const REPLICAS: usize = 5;

fn main() {
    println!("starting a throwaway PostgreSQL...");
    let cluster = Cluster::start(&[]);
    let db = cluster.new_db("demo");
    println!("database ready: {}\n", db.url.replace(PASSWORD, "***"));

    let migrate = format!("{} migrate", standin());
    println!(
        "starting {REPLICAS} replicas at once, each:\n  migrations-gate run --release v1 --migrate \"standin-app migrate\" -- standin-app start\n"
    );
    let replicas: Vec<Child> = (0..REPLICAS)
        .map(|_| {
            db.gate()
                .args(run_args("v1", &migrate, &[standin(), "start"]))
                .env("STANDIN_STEP_MS", "300")
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start a replica")
        })
        .collect();
    let pids: Vec<u32> = replicas.iter().map(|c| c.id()).collect();
    for (i, (child, pid)) in replicas.into_iter().zip(pids).enumerate() {
        let out = wait_output(child, Duration::from_secs(120));
        let log = String::from_utf8_lossy(&out.stderr);
        let role = if log.contains("this replica migrates") {
            "MIGRATED (held the lock, ran the migration with ENABLE_DB_MIGRATIONS=True)".to_string()
        } else {
            let waited = log
                .lines()
                .find(|l| l.contains("release is done"))
                .and_then(|l| l.split("waited_ms=").nth(1))
                .and_then(|v| v.split_whitespace().next())
                .unwrap_or("?");
            format!("waited {waited} ms, then started the app with ENABLE_DB_MIGRATIONS=False")
        };
        println!(
            "replica {} (pid {pid}, exit {}): {role}",
            i + 1,
            out.status.code().unwrap_or(-1)
        );
    }

    println!("\nwhat the database says:");
    println!(
        "  migration runs:      {}",
        db.one("SELECT count(*) FROM mg_runs")
    );
    println!(
        "  seed rows:           {}",
        db.one("SELECT count(*) FROM app_seed")
    );
    println!(
        "  app starts:          {} (flag values: {})",
        db.one("SELECT count(*) FROM app_starts"),
        db.one("SELECT string_agg(flag, ', ' ORDER BY id) FROM app_starts")
    );
    for row in db.rows(
        "SELECT release, outcome, holder, (finished_at - started_at)::text FROM migrations_gate.ledger ORDER BY id",
    ) {
        println!("  ledger:              release {} {} by {} in {}", row[0], row[1], row[2], row[3]);
    }

    println!("\na rolling restart of the same release: {REPLICAS} more replicas");
    let restarts: Vec<Child> = (0..REPLICAS)
        .map(|_| {
            db.gate()
                .args(run_args("v1", &migrate, &[standin(), "start"]))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start a replica")
        })
        .collect();
    let started = std::time::Instant::now();
    for child in restarts {
        let out = wait_output(child, Duration::from_secs(120));
        assert!(out.status.success());
    }
    println!(
        "  all started in {} ms; migration runs still {}: a done release is never migrated twice",
        started.elapsed().as_millis(),
        db.one("SELECT count(*) FROM mg_runs")
    );
}
