//! The person on call: `status`, `wait`, `reset`, completions, the man page, and logs.

mod support;

use std::process::{Command, Output};
use std::time::Duration;

use support::*;

fn migrate(db: &TestDb, release: &str, cmd: &[&str]) -> Output {
    db.gate()
        .args(["migrate", "--release", release, "--"])
        .args(cmd)
        .output()
        .unwrap()
}

#[test]
fn status_shows_the_holder_every_attempt_and_checks_a_release() {
    let db = cluster().new_db("status");
    assert_eq!(code(&migrate(&db, "r1", &["false"])), 1);
    assert_eq!(code(&migrate(&db, "r1", &["true"])), 0);
    let (_holder, key) = hold_lock(
        &format!("{}?application_name=op-holder", db.url),
        "migrations-gate",
    );

    let out = db.gate_output(&["status"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let table = stdout(&out);
    assert!(table.contains("held by op-holder"), "{table}");
    assert!(
        table.contains("failed") && table.contains("done"),
        "{table}"
    );
    assert!(!table.contains(PASSWORD) && !stderr(&out).contains(PASSWORD));

    let out = db.gate_output(&["status", "--json", "--release", "r1"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let json: serde_json::Value =
        serde_json::from_str(&stdout(&out)).expect("status --json is JSON");
    assert_eq!(json["lock"], "migrations-gate");
    assert_eq!(json["lock_key"].to_string(), key);
    assert_eq!(json["holder"]["application_name"], "op-holder");
    assert_eq!(json["release_done"], true);
    let attempts = json["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[0]["outcome"], "done");
    assert_eq!(attempts[1]["outcome"], "failed");
    assert_eq!(attempts[1]["exit_code"], 1);
    assert!(attempts[0]["duration_secs"].is_number());
    assert!(!stdout(&out).contains(PASSWORD));

    // As a readiness check: non-zero until the release is done.
    let out = db.gate_output(&["status", "--release", "r2"]);
    assert_eq!(code(&out), 1);
    assert_stdout_has(&out, "release r2: NOT done");
}

#[test]
fn wait_blocks_until_the_release_is_done_then_execs_its_command_with_the_flag_off() {
    let db = cluster().new_db("wait");
    let mut w = db.gate();
    w.args(["wait", "--release", "r1", "--", standin(), "start"]);
    let waiter = spawn(&mut w);
    let waiter_pid = waiter.id();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        db.app_starts(),
        0,
        "wait must not start before the release is done"
    );
    assert_eq!(db.migrations_started(), 0, "wait never migrates");
    let out = migrate(&db, "r1", &[standin(), "migrate"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = wait_output(waiter, HANG_GUARD);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(
        db.rows("SELECT pid::text, flag, schema_ready::text FROM app_starts"),
        vec![vec![waiter_pid.to_string(), "False".into(), "true".into()]]
    );
    // Without a command it just exits 0; with a short timeout on an unknown release, 75.
    assert_eq!(code(&db.gate_output(&["wait", "--release", "r1"])), 0);
    let out = db.gate_output(&["wait", "--release", "r9", "--wait-timeout", "1s"]);
    assert_eq!(code(&out), 75, "{}", stderr(&out));
    let out = db.gate_output(&["wait"]);
    assert_eq!(code(&out), 64, "{}", stderr(&out));
}

#[test]
fn reset_forgets_a_release_so_it_migrates_again_and_refuses_while_locked() {
    let db = cluster().new_db("reset");
    assert_eq!(code(&migrate(&db, "r1", &[standin(), "migrate"])), 0);
    let out = db.gate_output(&["reset", "--release", "r1"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_stderr_has(&out, "removed");
    assert_eq!(db.ledger().attempts(), []);
    assert_eq!(code(&migrate(&db, "r1", &[standin(), "migrate"])), 0);
    assert_eq!(db.migrations_started(), 2, "a reset release migrates again");

    let (_holder, _) = hold_lock(&db.url, "migrations-gate");
    let out = db.gate_output(&["reset", "--release", "r1"]);
    assert_eq!(code(&out), 75, "{}", stderr(&out));
    assert_stderr_has(&out, "reset refused");
    assert_eq!(db.ledger().count("done"), 1);
}

/// A reset that finds nothing (a wrong lock, schema or release: not the deployment's own
/// settings) says what it looked for and what the ledger holds, and exits 66, never 0.
#[test]
fn reset_with_a_wrong_lock_or_release_exits_66_and_says_what_it_looked_for() {
    let db = cluster().new_db("reset_wrong");
    assert_eq!(code(&migrate(&db, "r1", &[standin(), "migrate"])), 0);
    let out = db.gate_output(&["reset", "--lock", "someone-else", "--release", "r1"]);
    assert_eq!(db.ledger().times_done("r1"), 1, "nothing removed");
    assert_eq!(code(&out), 66, "{}", stderr(&out));
    assert_stderr_has(&out, "nothing to reset");
    assert_stderr_has(&out, "someone-else");
    assert_stderr_has(&out, "other locks in this ledger: migrations-gate");
    let out = db.gate_output(&["reset", "--release", "r2"]);
    assert_eq!(code(&out), 66, "{}", stderr(&out));
    assert_stderr_has(&out, "this lock's newest releases: r1");
    let out = db.gate_output(&["reset", "--schema", "elsewhere", "--release", "r1"]);
    assert_eq!(code(&out), 66, "{}", stderr(&out));
    assert_stderr_has(&out, "the ledger does not exist");
    assert_eq!(db.ledger().times_done("r1"), 1);
}

/// `reset --release-from PATH` forgets the release the deployment's own `--release-from` names.
#[test]
fn reset_takes_the_release_from_the_same_files_as_the_deployment() {
    let db = cluster().new_db("reset_from");
    let dir = std::env::temp_dir().join(format!("mg-reset-from-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("001.sql"), "create table t ();").unwrap();
    let from = dir.to_string_lossy().into_owned();
    let out = db.gate_output(&[
        "migrate",
        "--release-from",
        &from,
        "--",
        standin(),
        "migrate",
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(db.ledger().count("done"), 1);
    let out = db.gate_output(&["reset", "--release-from", &from]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(db.ledger().attempts(), []);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn completions_and_man_page_come_from_the_same_definitions_as_help() {
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(gate_bin())
            .args(["completions", shell])
            .output()
            .unwrap();
        assert_eq!(code(&out), 0);
        assert!(
            stdout(&out).contains("wait-timeout"),
            "{shell} completions lack a flag"
        );
    }
    let out = Command::new(gate_bin()).arg("man").output().unwrap();
    assert_eq!(code(&out), 0);
    let man = stdout(&out);
    assert!(man.contains(".TH migrations-gate"), "not a man page");
    let help = Command::new(gate_bin())
        .args(["run", "--help"])
        .output()
        .unwrap();
    let help = stdout(&help);
    for twin in [
        "MIGRATIONS_GATE_DATABASE_URL",
        "MIGRATIONS_GATE_READY_HTTP",
        "MIGRATIONS_GATE_LOCK_SCOPE",
    ] {
        assert!(help.contains(twin), "--help must list the env twin {twin}");
    }
}

#[test]
fn json_logs_are_one_object_per_line_and_name_each_step_of_the_holder() {
    let db = cluster().new_db("jsonlogs");
    let out = db
        .gate()
        .args([
            "migrate",
            "--release",
            "r1",
            "--log-format",
            "json",
            "--",
            "true",
        ])
        .env("MIGRATIONS_GATE_LOG", "info")
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let lines: Vec<serde_json::Value> = stderr(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
        .collect();
    let messages: Vec<&str> = lines.iter().filter_map(|l| l["message"].as_str()).collect();
    for step in [
        "lock taken; this replica migrates",
        "migration started",
        "migration finished",
        "ledger written",
        "lock released",
    ] {
        assert!(
            messages.iter().any(|m| m.starts_with(step)),
            "missing step {step:?} in {messages:?}"
        );
    }
    let taken = lines
        .iter()
        .find(|l| {
            l["message"]
                .as_str()
                .unwrap_or("")
                .starts_with("lock taken")
        })
        .unwrap();
    assert_eq!(taken["release"], "r1", "structured fields, not only text");
    assert!(!stderr(&out).contains(PASSWORD));
}
