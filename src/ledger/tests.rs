//! The text of the ledger's statements that carry the lock's proof, whole (the snapshots in
//! `snapshots/`). Their effect on a real database is tested in `tests/` (named in each test).

use super::*;
use crate::lock::Proof;
use crate::sql::pretty;

fn ledger() -> Ledger {
    Ledger::new("migrations_gate", &LockKey::from_name("migrations-gate"))
}

fn attempt(release: Option<&str>, app: Option<&str>) -> NewAttempt<'static> {
    NewAttempt {
        release: release.map(|r| Box::leak(r.to_string().into_boxed_str()) as &str),
        holder: "migrations-gate/host-a",
        host: "host-a",
        pid: 42,
        fence_secs: 25,
        app: app.map(str::to_string),
    }
}

/// Effect: tests/gate.rs (one migration per release), tests/faults.rs (a lost lock begins
/// nothing), tests/neighbours.rs (the app column).
#[test]
fn begin() {
    let l = ledger();
    let proof = Proof::example();
    insta::assert_snapshot!(
        "begin_release_with_app",
        pretty(&l.begin_statement(&attempt(Some("r1"), Some("app-fp")), &proof))
    );
    insta::assert_snapshot!(
        "begin_serial_without_app",
        pretty(&l.begin_statement(&attempt(None, None), &proof))
    );
}

/// Effect: tests/gate.rs (done and failed recorded), tests/faults.rs (a holder whose row was
/// removed records nothing).
#[test]
fn finish() {
    let end = AttemptEnd {
        outcome: Outcome::Done,
        exit_code: Some(0),
        detail: "migrated",
    };
    insta::assert_snapshot!(pretty(&ledger().finish_statement(
        7,
        &end,
        &Proof::example()
    )));
}

/// Effect: tests/faults.rs (killed holders are marked abandoned by the one that takes over).
#[test]
fn abandon() {
    insta::assert_snapshot!(pretty(
        &ledger().abandon_statement("no session left", &Proof::example())
    ));
}

/// Effect: tests/faults.rs and tests/poolers.rs (the taker-over waits out the fencing time).
#[test]
fn stale() {
    insta::assert_snapshot!(pretty(&ledger().stale_statement(&Proof::example())));
}
