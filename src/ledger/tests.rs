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

/// The fast path's one statement. Effect: tests/gate.rs (followers of a done release),
/// tests/preflight.rs (an older release refused), tests/contract.rs (a release older than a
/// contract step refused; the step's own runners follow).
#[test]
fn is_done() {
    let l = ledger();
    insta::assert_snapshot!("is_done", pretty(&l.is_done_statement("v1", false)));
    insta::assert_snapshot!("is_done_with_key", pretty(&l.is_done_statement("v1", true)));
}

/// Effect: tests/contract.rs (a release's own sessions and newer ones never hold its step).
#[test]
fn newer_than_and_contract_state() {
    let l = ledger();
    insta::assert_snapshot!(
        "contract_state_of_v2",
        pretty(&l.contract_state_statement(Some("v2")))
    );
    insta::assert_snapshot!(
        "contract_state_of_newest",
        pretty(&l.contract_state_statement(None))
    );
    insta::assert_snapshot!("newer_than_v2", pretty(&l.newer_than_statement("v2")));
}

/// Effect: tests/faults.rs (a holder whose row was removed or marked fences itself; a fenced
/// holder's failure recorded; an abandoned row kept), tests/attempt_sessions.rs (untagged
/// sessions noted and ended by the taker-over), tests/gate.rs and tests/recovery.rs (`reset`).
#[test]
fn heartbeat_note_fenced_forget() {
    let l = ledger();
    insta::assert_snapshot!("heartbeat", pretty(&l.heartbeat_statement(7)));
    insta::assert_snapshot!(
        "note_sessions",
        pretty(&l.note_sessions_statement(7, "sessions seen: 12@2026-01-01 00:00:00+00;"))
    );
    insta::assert_snapshot!(
        "record_fenced",
        pretty(&l.record_fenced_statement(7, &attempt(Some("r1"), None), 137, "fenced: lost"))
    );
    insta::assert_snapshot!("forget", pretty(&l.forget_statement("r1")));
}

/// Effect: tests/recovery.rs (`--max-failures`: interrupted, refused and fenced attempts do not
/// count), tests/operator.rs (`status`, `reset` naming what the ledger holds).
#[test]
fn attempts_failures_holds() {
    let l = ledger();
    insta::assert_snapshot!(
        "failures_of_r1",
        pretty(&l.attempts_statement(Some("r1"), &Ledger::counted_failure(), 3))
    );
    insta::assert_snapshot!("attempts", pretty(&l.attempts_statement(None, "true", 20)));
    insta::assert_snapshot!("holds", pretty(&l.holds_statement()));
}
