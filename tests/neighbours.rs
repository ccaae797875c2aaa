//! A good neighbour in a shared database: two applications on one PostgreSQL database, each
//! with its own lock and ledger (or, by mistake, the gate's defaults for both). A gate ends,
//! waits for, refuses because of, or prunes only what is provably its own: its lock's full key
//! and its ledger.

mod support;

use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::process::{Child, Command, Output};
use std::time::Duration;

use support::*;

/// `migrate --release RELEASE LOCK... -- psql -c SQL` on `db`, started in the background.
fn migrating(db: &TestDb, lock: &[&str], release: &str, extra: &[&str], sql: &str) -> Child {
    spawn(
        db.gate()
            .arg("migrate")
            .args(lock)
            .args(["--release", release])
            .args(extra)
            .arg("--")
            .args(psql_command(&db.url, sql)),
    )
}

/// The same, to the end.
fn migrate(db: &TestDb, lock: &[&str], release: &str, extra: &[&str], sql: &str) -> Output {
    wait_output(migrating(db, lock, release, extra, sql), HANG_GUARD)
}

fn table_exists(db: &TestDb, name: &str) -> bool {
    db.one(&format!("SELECT to_regclass('public.{name}') IS NOT NULL")) == "t"
}

/// Waits until a session runs `pg_sleep` with `marker` in its text: the migration is under way.
fn wait_sleeping(db: &TestDb, marker: &str) {
    eventually(Duration::from_secs(30), "the migration's pg_sleep", || {
        db.one(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE '%pg_sleep%{marker}%' \
             AND query NOT LIKE '%pg_stat_activity%'"
        )) == "1"
    });
}

fn kill9(pid: u32) {
    // SAFETY: signalling a child process of this test by its PID.
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
}

/// Locks given by small `--lock-id`s (their high halves are all 0) and by `--lock` names.
const LOCKS: [(&[&str], &[&str]); 2] = [
    (&["--lock-id", "11"], &["--lock-id", "12"]),
    (&["--lock", "shop"], &["--lock", "billing"]),
];

#[test]
fn another_locks_refusal_never_cancels_a_running_migration() {
    for (i, (a_lock, b_lock)) in LOCKS.iter().enumerate() {
        let db = cluster().new_db(&format!("neighbour_refusal_{i}"));
        let a = migrating(
            &db,
            a_lock,
            "a1",
            &["--schema", "iso_a"],
            "select pg_sleep(6) /* app_a */; create table a_done ()",
        );
        wait_sleeping(&db, "app_a");
        // B refuses to migrate while apps of another release *of its own* are connected: A's
        // migration is not one of them.
        let b = migrate(
            &db,
            b_lock,
            "b1",
            &["--schema", "iso_b", "--other-releases", "fail"],
            "create table b_done ()",
        );
        let a = wait_output(a, HANG_GUARD);
        assert!(
            table_exists(&db, "a_done"),
            "A's migration was stopped: {}",
            stderr(&a)
        );
        assert!(
            table_exists(&db, "b_done"),
            "B did not migrate: {}",
            stderr(&b)
        );
        assert_eq!(db.ledger_in("iso_a").times_done("a1"), 1);
        assert_eq!(db.ledger_in("iso_b").times_done("b1"), 1);
        assert_codes(&[(&a, 0), (&b, 0)]);
    }
}

#[test]
fn another_locks_takeover_never_ends_a_running_migration() {
    for (i, (c_lock, d_lock)) in LOCKS.iter().enumerate() {
        let db = cluster().new_db(&format!("neighbour_takeover_{i}"));
        let c = migrating(
            &db,
            c_lock,
            "c1",
            &["--schema", "iso_c"],
            "select pg_sleep(16) /* app_c */; create table c_done ()",
        );
        wait_sleeping(&db, "app_c");
        let d1 = migrating(
            &db,
            d_lock,
            "d1",
            &["--schema", "iso_d", "--other-releases", "ignore"],
            "select pg_sleep(60) /* app_d */",
        );
        wait_sleeping(&db, "app_d");
        kill9(d1.id());
        let _ = wait_output(d1, HANG_GUARD);
        // (D ignores other releases: on a gate that took C's migration for an old release of
        // D's own, D would otherwise wait for C first.) D's taker-over waits out the fencing
        // time, then ends D's first attempt's sessions:
        // attempt 1 of ledger iso_d, never attempt 1 of ledger iso_c.
        let d2 = migrate(
            &db,
            d_lock,
            "d1",
            &["--schema", "iso_d", "--other-releases", "ignore"],
            "create table d_done ()",
        );
        let c = wait_output(c, HANG_GUARD);
        assert!(
            table_exists(&db, "c_done"),
            "C's migration was ended: {}",
            stderr(&c)
        );
        assert!(
            table_exists(&db, "d_done"),
            "D did not take over: {}",
            stderr(&d2)
        );
        assert_eq!(db.ledger_in("iso_c").outcomes_at("c1"), ["done"]);
        assert_eq!(db.ledger_in("iso_d").times_done("d1"), 1);
        assert_codes(&[(&c, 0), (&d2, 0)]);
    }
}

fn shared_migrate(db: &TestDb, lock: &[&str], release: &str, dir: &Path, extra: &[&str]) -> Output {
    let mut cmd = db.gate();
    cmd.arg("migrate")
        .args(lock)
        .args(["--schema", &format!("s_{}", lock[1])])
        .args(["--release", release, "--shared-dir"])
        .arg(dir)
        .args(extra)
        .args(["--", "true"]);
    wait_output(spawn(&mut cmd), HANG_GUARD)
}

fn markers(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn another_locks_releases_never_prune_this_locks_marker() {
    for (i, (x_lock, y_lock)) in LOCKS.iter().enumerate() {
        let db = cluster().new_db(&format!("neighbour_markers_{i}"));
        let dir = tempdir(&format!("markers{i}"));
        let first = shared_migrate(&db, x_lock, "x1", &dir, &[]);
        assert_eq!(code(&first), 0, "{}", stderr(&first));
        let mine = markers(&dir);
        assert_eq!(mine.len(), 1, "{mine:?}");
        for release in ["y1", "y2", "y3"] {
            let out = shared_migrate(&db, y_lock, release, &dir, &[]);
            assert_eq!(code(&out), 0, "{}", stderr(&out));
        }
        let now = markers(&dir);
        assert!(now.contains(&mine[0]), "x1's marker was pruned: {now:?}");
        assert_eq!(now.len(), 3, "x1's, and y's two newest: {now:?}");
        let second = shared_migrate(&db, x_lock, "x1", &dir, &["--require-shared-dir"]);
        assert_eq!(code(&second), 0, "{}", stderr(&second));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn an_empty_marker_left_by_a_crash_is_no_marker() {
    let db = cluster().new_db("neighbour_empty_marker");
    let dir = tempdir("empty_marker");
    // What a gate that crashed between creating its marker and writing the token left, under
    // the old name (half the key) and the new one.
    let release_hash = "ba7816bf"; // SHA-256("abc")
    let key = 15u64;
    let ledger = sha256_hex8("s_15");
    for name in [
        format!(".migrations-gate-{:08x}-{release_hash}", key >> 32),
        format!(".migrations-gate-{key:016x}-{ledger}-{release_hash}"),
    ] {
        std::fs::write(dir.join(name), "").unwrap();
    }
    let lock: &[&str] = &["--lock-id", "15"];
    let first = shared_migrate(&db, lock, "abc", &dir, &["--require-shared-dir"]);
    assert_eq!(code(&first), 0, "{}", stderr(&first));
    let second = shared_migrate(&db, lock, "abc", &dir, &["--require-shared-dir"]);
    assert_eq!(code(&second), 0, "{}", stderr(&second));
    let marker = dir.join(format!(
        ".migrations-gate-{key:016x}-{ledger}-{release_hash}"
    ));
    assert_eq!(std::fs::read_to_string(marker).unwrap().trim().len(), 32);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_shared_directory_that_never_answers_is_bounded() {
    let db = cluster().new_db("neighbour_hung_dir");
    let dir = tempdir("hung_dir");
    // A FIFO nobody writes to where the marker should be: opening it blocks, as a read on a hung
    // network mount does.
    let ledger = sha256_hex8("s_17");
    let fifo = dir.join(format!(".migrations-gate-{:016x}-{ledger}-ba7816bf", 17u64));
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
    let out = shared_migrate(&db, &["--lock-id", "17"], "abc", &dir, &[]);
    assert_eq!(
        db.ledger_in("s_17").times_done("abc"),
        1,
        "{}",
        stderr(&out)
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_stderr_has(&out, "did not answer within 10 s");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn another_applications_release_with_the_same_id_is_refused_not_followed() {
    let db = cluster().new_db("neighbour_same_defaults");
    let x = migrate(&db, &[], "1.4.0", &[], "create table app_x ()");
    assert_eq!(code(&x), 0, "{}", stderr(&x));
    // A second replica of X: the same command, no flag, follows.
    let x2 = migrate(&db, &[], "1.4.0", &[], "create table app_x ()");
    assert_eq!(code(&x2), 0, "{}", stderr(&x2));
    assert_stderr_has(&x2, "release is done");
    // Y: another application with the same defaults and the same release ID.
    let y = migrate(&db, &[], "1.4.0", &[], "create table app_y ()");
    assert!(!table_exists(&db, "app_y"));
    assert_eq!(db.ledger().times_done("1.4.0"), 1);
    assert_eq!(code(&y), 78, "{}", stderr(&y));
    assert_stderr_has(&y, "migrated for another application");
    assert_stderr_has(&y, "--lock");
    // Its own lock: Y migrates.
    let y = migrate(
        &db,
        &["--lock", "app-y"],
        "1.4.0",
        &[],
        "create table app_y ()",
    );
    assert_eq!(code(&y), 0, "{}", stderr(&y));
    assert!(table_exists(&db, "app_y"));
    // One application started by two commands shares a name with --app.
    let named = migrate(
        &db,
        &["--lock", "app-z"],
        "1",
        &["--app", "z"],
        "create table app_z ()",
    );
    assert_eq!(code(&named), 0, "{}", stderr(&named));
    let other_cmd = migrate(&db, &["--lock", "app-z"], "1", &["--app", "z"], "select 1");
    assert_eq!(code(&other_cmd), 0, "{}", stderr(&other_cmd));
}

fn sha256_hex8(text: &str) -> String {
    let out = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(text.as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    String::from_utf8_lossy(&out.stdout)[..8].to_string()
}

fn tempdir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("mgate-neighbours-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
