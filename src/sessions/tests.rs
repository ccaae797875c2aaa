//! Unit tests of [`super`]: the text of its statements (snapshots in `snapshots/`) and its
//! pure parts.

use super::*;

/// The position of a tag's release field (`mgate:<key>:<ledger>:<release>:<attempt>`), as
/// the statements read it (`split_part(.., ':', 4)`).
const RELEASE_FIELD: u8 = 4;
/// The position of a tag's attempt field, as the statements read it (`split_part(.., ':', 5)`).
const ATTEMPT_FIELD: u8 = 5;

fn example_tag(attempt: Option<i64>) -> (crate::lock::LockKey, Tag) {
    let lock = crate::lock::LockKey::from_name("migrations-gate");
    let identity = Identity::new(&lock, "migrations_gate");
    let tag = Tag::new(&identity, Some("r1"), attempt);
    (lock, tag)
}

/// The sessions of one attempt, listed: tagged with it, or seen on the child's sockets.
/// Effect: tests/attempt_sessions.rs (a killed migration's statement is ended before the
/// attempt is recorded; a client that sets its own application_name is ended too) and
/// tests/operator.rs (`status` lists a running attempt's sessions).
#[test]
fn list_of_an_attempt() {
    let (_, tag) = example_tag(Some(42));
    let seen = BTreeSet::from([
        (4242, "2026-01-01 00:00:00.5+00".to_string()),
        (4243, "2026-01-01 00:00:01+00".to_string()),
    ]);
    insta::assert_snapshot!(
        "list_attempt",
        crate::sql::pretty(&list_statement(&Which::attempt(&tag, 42, &BTreeSet::new())))
    );
    insta::assert_snapshot!(
        "list_attempt_and_seen",
        crate::sql::pretty(&list_statement(&Which::attempt(&tag, 42, &seen)))
    );
}

/// The sessions of unfinished attempts, listed. Effect: tests/attempt_sessions.rs (a
/// taker-over ends a SIGKILLed holder's statement before it migrates; never another
/// database's attempt with the same ID).
#[test]
fn list_of_unfinished_attempts() {
    let (lock, tag) = example_tag(None);
    let which = Which::unfinished(&tag, "\"migrations_gate\".ledger", lock.key);
    insta::assert_snapshot!(crate::sql::pretty(&list_statement(&which)));
}

/// Effect: tests/attempt_sessions.rs (a migration client that sets its own
/// application_name is found on the child's sockets, recorded and ended).
#[test]
fn remember_by_ports() {
    insta::assert_snapshot!(crate::sql::pretty(&remember_statement(&[40001, 40002])));
}

/// The sessions a taker-over ends, whole. Effect: tests/attempt_sessions.rs (an earlier
/// attempt's tagged and untagged sessions are ended; another lock's are not).
#[test]
fn unfinished_attempts_sessions() {
    let lock = crate::lock::LockKey::from_name("migrations-gate");
    let identity = Identity::new(&lock, "migrations_gate");
    let tag = Tag::new(&identity, Some("r1"), None);
    let which = Which::unfinished(&tag, "\"migrations_gate\".\"ledger\"", lock.key);
    insta::assert_snapshot!(crate::sql::pretty(which.condition()));
}

#[test]
fn tag_names_the_whole_identity_release_and_attempt_and_keeps_the_operators_name_after_it() {
    let lock = crate::lock::LockKey::from_name("migrations-gate");
    let identity = Identity::new(&lock, "migrations_gate");
    let tag = Tag::new(&identity, Some("r1"), Some(42));
    let s = tag.to_string();
    assert!(
        s.starts_with(&format!(
            "mgate:{:016x}:{}:",
            lock.key as u64,
            identity.ledger_hex()
        )),
        "{s}"
    );
    assert!(s.ends_with(":42"), "{s}");
    assert_eq!(
        s.split(':').nth(RELEASE_FIELD as usize - 1),
        Some(release_hash("r1").as_str())
    );
    assert_eq!(s.split(':').nth(ATTEMPT_FIELD as usize - 1), Some("42"));
    assert_eq!(tag.app_name(None), s);
    assert_eq!(tag.app_name(Some("alembic")), format!("{s} alembic"));
    assert_eq!(tag.app_name(Some("  ")), s);
    let follower = Tag::new(&identity, None, None).to_string();
    assert!(follower.ends_with(":-:-"), "{follower}");
    // The server keeps 63 bytes of application_name: ours always fits, and up to attempt
    // 999999 leaves 16 bytes for the operator's own name.
    let longest = Tag::new(&identity, Some("x"), Some(i64::MAX)).to_string();
    assert!(longest.len() <= 63, "{longest}");
    assert!(
        Tag::new(&identity, Some("x"), Some(999_999))
            .to_string()
            .len()
            <= 47
    );
}

#[test]
fn another_lock_or_another_ledger_has_another_prefix() {
    use crate::lock::LockKey;
    let mine = Tag::new(
        &Identity::new(&LockKey::from_id(11), "iso_a"),
        Some("a1"),
        Some(1),
    );
    for other in [
        Identity::new(&LockKey::from_id(12), "iso_a"),
        Identity::new(&LockKey::from_id(11), "iso_b"),
        Identity::new(&LockKey::from_id(11 + (1 << 32)), "iso_a"),
    ] {
        let theirs = Tag::new(&other, Some("a1"), Some(1));
        assert!(!theirs.to_string().starts_with(&mine.identity_prefix()));
    }
}

#[test]
fn ended_reads_like_the_ledger_says_it() {
    assert_eq!(Terminated::default().to_string(), "no session left");
    let e = Terminated {
        cancelled: 1,
        terminated: 2,
    };
    assert_eq!(e.to_string(), "1 session(s) cancelled, 2 terminated");
}
