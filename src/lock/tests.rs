//! Unit tests of [`super`]: the text of its statements (snapshots in `snapshots/`) and its
//! pure parts.

use super::*;

fn lock() -> LockKey {
    LockKey::from_name("migrations-gate")
}

/// Effect: tests/gate.rs (eight gates at once migrate exactly once; a released lock is taken
/// by the next) and tests/poolers.rs (transaction scope behind a transaction pooler leaks no
/// lock).
#[test]
fn try_acquire_statements() {
    insta::assert_snapshot!(
        "try_acquire_session",
        crate::sql::pretty(&try_acquire_statement(&lock(), Scope::Session))
    );
    insta::assert_snapshot!(
        "try_acquire_transaction",
        crate::sql::pretty(&try_acquire_statement(&lock(), Scope::Transaction))
    );
    insta::assert_snapshot!("try_acquire_rollback", ROLLBACK);
}

/// Effect: tests/gate.rs (replicas without a release migrate one after another: each frees
/// the lock for the next) and tests/poolers.rs (no lock leaked behind transaction pooling).
#[test]
fn unlock_statements() {
    insta::assert_snapshot!(
        "unlock_session",
        crate::sql::pretty(&unlock_statement(&lock(), Scope::Session))
    );
    insta::assert_snapshot!(
        "unlock_transaction",
        unlock_statement(&lock(), Scope::Transaction)
    );
}

/// Effect: tests/faults.rs (a holder whose lock session is terminated fences itself, and one
/// waiter takes over).
#[test]
fn held_by_us_statement_whole() {
    insta::assert_snapshot!(crate::sql::pretty(&held_by_us_statement(&lock())));
}

/// Effect: tests/faults.rs and tests/attempt_sessions.rs (every statement carrying the
/// proof acts only while the lock session read here holds the lock).
#[test]
fn this_session_statement() {
    insta::assert_snapshot!(crate::sql::pretty(THIS_SESSION));
}

/// Effect: tests/faults.rs (a holder whose host vanishes without a goodbye frees the lock
/// within 30 seconds: the keepalives set here).
#[test]
fn lock_session_statements() {
    for (version, scope) in [
        (13_00_22, Scope::Session),
        (16_00_14, Scope::Session),
        (17_00_10, Scope::Transaction),
    ] {
        insta::assert_snapshot!(
            format!("lock_session_{version}_{scope:?}"),
            lock_session_statement(version, scope)
        );
    }
}

/// Effect: tests/faults.rs (a waiter keeps a waiting slot on exactly one connection) and
/// tests/scale.rs (300 gates against 50 connections all start).
#[test]
fn wait_slot_statements() {
    insta::assert_snapshot!(
        "wait_slot_fixed",
        crate::sql::pretty(&wait_slot_statement(7, WaitSlots::Fixed(3)))
    );
    insta::assert_snapshot!(
        "wait_slot_auto",
        crate::sql::pretty(&wait_slot_statement(7, WaitSlots::Auto))
    );
}

/// Effect: tests/gate.rs (a waiter that gives up names the holder), tests/watching.rs (a
/// lock held by a session that is not a gate is named) and tests/operator.rs (`status` shows
/// the holder).
#[test]
fn holder_statement_whole() {
    insta::assert_snapshot!(crate::sql::pretty(&holder_statement(&lock())));
}

#[test]
fn key_is_first_eight_bytes_of_sha256_big_endian() {
    // sha256("migrations-gate") starts with these 8 bytes; the SQL in the docs yields the same.
    let k = LockKey::from_name("migrations-gate");
    let digest = Sha256::digest(b"migrations-gate");
    assert_eq!(k.key.to_be_bytes(), digest[..8]);
    assert_ne!(LockKey::from_name("other").key, k.key);
}

#[test]
fn lock_session_settings_only_name_parameters_the_server_knows() {
    let names = |v| -> Vec<&str> {
        lock_session_settings(v)
            .into_iter()
            .map(|(n, _)| n)
            .collect()
    };
    for v in [13_00_00, 13_00_22] {
        assert!(names(v).contains(&"idle_in_transaction_session_timeout"));
        assert!(!names(v).contains(&"idle_session_timeout"));
        assert!(!names(v).contains(&"client_connection_check_interval"));
        assert!(!names(v).contains(&"transaction_timeout"));
    }
    assert!(names(16_00_14).contains(&"idle_session_timeout"));
    assert!(!names(16_00_14).contains(&"transaction_timeout"));
    for v in [17_00_00, 17_00_10, 18_00_04] {
        assert!(names(v).contains(&"transaction_timeout"));
        assert!(names(v).contains(&"statement_timeout"));
    }
}

#[test]
fn pg_locks_halves_recombine_into_the_key() {
    for key in [0i64, 1, -1, i64::MIN, i64::MAX, 0x1234_5678_9abc_def0] {
        let k = LockKey::from_id(key);
        let back = ((k.classid() as u64) << 32 | k.objid() as u64) as i64;
        assert_eq!(back, key);
    }
}
