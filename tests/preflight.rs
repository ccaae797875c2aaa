//! Preflight: `--same-env` fingerprints, the older-release refusal, preset rules, the
//! termination message, and what `status` shows, with the stand-in app. Database first, then
//! exit codes, then messages; no value, fingerprint or key ever appears in any output.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use support::*;

const SECRET_A: &str = "secret-A-4f1c9e-never-printed";
const SECRET_B: &str = "secret-B-77d0aa-never-printed";

/// `run --release R --same-env APP_SECRET --migrate "standin migrate" -- standin start` as
/// replica `name`, with `APP_SECRET` set to `secret` (unset when `None`).
fn replica(db: &TestDb, release: &str, name: &str, secret: Option<&str>) -> Command {
    replica_with(db, release, name, secret, &[])
}

/// Runs [`replica`] to the end.
fn replica_output(db: &TestDb, release: &str, name: &str, secret: Option<&str>) -> Output {
    replica(db, release, name, secret).output().unwrap()
}

/// [`replica`] with more gate flags.
fn replica_with(
    db: &TestDb,
    release: &str,
    name: &str,
    secret: Option<&str>,
    extra: &[&str],
) -> Command {
    let mut c = db.gate();
    c.arg("run").args(extra);
    c.args([
        "--release",
        release,
        "--application-name",
        name,
        "--same-env",
        "APP_SECRET",
        "--migrate",
        &format!("'{}' migrate", standin()),
        "--",
        standin(),
        "start",
    ]);
    if let Some(s) = secret {
        c.env("APP_SECRET", s);
    }
    c
}

fn migrate(db: &TestDb, release: &str) -> Output {
    db.gate()
        .args(["migrate", "--release", release, "--", standin(), "migrate"])
        .output()
        .unwrap()
}

/// (replica, agrees) of every `--same-env` check, in the order they were made.
fn verdicts(db: &TestDb) -> Vec<(String, bool)> {
    db.env_checks()
        .into_iter()
        .map(|c| (c.replica, c.agrees))
        .collect()
}

/// Everything a test printed or wrote must not contain a value, a fingerprint or the key.
fn assert_nothing_secret(db: &TestDb, texts: &[String]) {
    let mut secrets: Vec<String> = vec![SECRET_A.into(), SECRET_B.into()];
    secrets.extend(db.env_references().into_iter().map(|r| r.fingerprint));
    secrets.extend(
        db.rows("SELECT encode(key, 'hex') FROM migrations_gate.env_key")
            .into_iter()
            .map(|r| r[0].clone()),
    );
    // Any 16 hex digits of a fingerprint would already be too much.
    for s in &secrets {
        let probe = &s[..16.min(s.len())];
        for t in texts {
            assert!(
                !t.contains(probe),
                "output contains a secret or fingerprint: {t}"
            );
        }
    }
}

/// A file the gate may use as its termination log (it never creates one).
struct TermLog(PathBuf);

impl TermLog {
    fn new(test: &str) -> TermLog {
        let p = std::env::temp_dir().join(format!("mg-termlog-{}-{test}", std::process::id()));
        std::fs::write(&p, "").unwrap();
        TermLog(p)
    }

    fn read(&self) -> String {
        std::fs::read_to_string(&self.0).unwrap_or_default()
    }
}

impl Drop for TermLog {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn same_env_mismatch_refuses_with_78_and_the_app_never_starts() {
    let db = cluster().new_db("pf_mismatch");
    let a = replica_output(&db, "r1", "replica-a", Some(SECRET_A));
    let b = replica_output(&db, "r1", "replica-b", Some(SECRET_B));
    let c = replica_output(&db, "r1", "replica-c", Some(SECRET_A));

    assert_eq!(db.migrations_started(), 1, "one migration");
    assert_eq!(db.app_starts(), 2, "replica-b's app must not start");
    assert_eq!(
        verdicts(&db),
        [
            ("replica-a".to_string(), true),
            ("replica-b".into(), false),
            ("replica-c".into(), true),
        ]
    );
    assert_eq!(
        db.env_references()
            .into_iter()
            .filter(|r| r.variable == "APP_SECRET")
            .map(|r| r.replica)
            .collect::<Vec<_>>(),
        ["replica-a"],
        "the release's first replica sets the reference"
    );

    assert_codes(&[(&a, 0), (&b, 78), (&c, 0)]);

    let line = stderr(&b);
    assert_mentions(
        &line,
        &[
            "APP_SECRET differs from the value release \"r1\" first started with",
            "on replica-a at ",
            "set the same APP_SECRET on every replica",
            "migrations-gate reset --release r1 --env",
        ],
    );
    assert!(stderr(&c).contains("same environment as the release's first replica"));
    let texts: Vec<String> = [&a, &b, &c]
        .iter()
        .flat_map(|o| [stderr(o), stdout(o)])
        .collect();
    assert_nothing_secret(&db, &texts);
}

#[test]
fn unset_and_empty_are_different_values() {
    let db = cluster().new_db("pf_unset");
    let unset = replica_output(&db, "r1", "replica-unset", None);
    let empty = replica_output(&db, "r1", "replica-empty", Some(""));
    let unset_again = replica_output(&db, "r1", "replica-unset-2", None);
    assert_eq!(db.app_starts(), 2);
    assert_codes(&[(&unset, 0), (&empty, 78), (&unset_again, 0)]);
}

#[test]
fn warn_mode_logs_the_difference_and_starts_the_app() {
    let db = cluster().new_db("pf_warn");
    let a = replica_output(&db, "r1", "replica-a", Some(SECRET_A));
    let b = replica_with(
        &db,
        "r1",
        "replica-b",
        Some(SECRET_B),
        &["--on-mismatch", "warn"],
    )
    .output()
    .unwrap();
    assert_eq!(db.app_starts(), 2);
    assert_eq!(
        verdicts(&db),
        [("replica-a".to_string(), true), ("replica-b".into(), false)],
        "a warned difference is still recorded"
    );
    assert_eq!(code(&a), 0);
    assert_eq!(code(&b), 0, "{}", stderr(&b));
    assert!(
        stderr(&b).contains("WARN") && stderr(&b).contains("APP_SECRET differs"),
        "{}",
        stderr(&b)
    );
    assert_nothing_secret(&db, &[stderr(&a), stderr(&b)]);
}

#[test]
fn reset_env_forgets_the_fingerprints_and_the_next_replica_sets_them() {
    let db = cluster().new_db("pf_reset_env");
    assert_eq!(code(&replica_output(&db, "r1", "a", Some(SECRET_A))), 0);
    assert_eq!(code(&replica_output(&db, "r1", "b", Some(SECRET_B))), 78);

    let out = db.gate_output(&["reset", "--release", "r1", "--env"]);
    assert_eq!(db.env_references(), []);
    assert_eq!(db.env_checks(), []);
    assert_eq!(
        db.ledger().count("done"),
        1,
        "reset --env keeps the release done"
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));

    // The rotated value is now the reference; the old one is the odd one out.
    let b = replica_output(&db, "r1", "b", Some(SECRET_B));
    let a = replica_output(&db, "r1", "a", Some(SECRET_A));
    assert_eq!(db.migrations_started(), 1, "no second migration");
    assert_eq!(db.app_starts(), 2);
    assert_codes(&[(&b, 0), (&a, 78)]);

    // A plain reset forgets the fingerprints with the release.
    let out = db.gate_output(&["reset", "--release", "r1"]);
    assert_eq!(db.env_references(), []);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
}

#[test]
fn holder_with_a_different_value_records_a_failed_attempt_and_frees_the_lock() {
    let db = cluster().new_db("pf_holder");
    let migrate_as = |secret: &str, cmd: &[&str]| {
        db.gate()
            .args([
                "migrate",
                "--release",
                "r1",
                "--same-env",
                "APP_SECRET",
                "--",
            ])
            .args(cmd)
            .env("APP_SECRET", secret)
            .output()
            .unwrap()
    };
    // The first holder sets the reference, then its migration fails.
    let first = migrate_as(SECRET_A, &["false"]);
    let second = migrate_as(SECRET_B, &[standin(), "migrate"]);
    assert_eq!(db.migrations_started(), 0, "no migration ran");
    assert_eq!(
        db.ledger().exits(),
        [
            ("failed".to_string(), Some(1)),
            ("failed".to_string(), Some(78))
        ]
    );
    db.assert_no_gate_locks();
    assert_eq!(code(&first), 1);
    assert_eq!(code(&second), 78, "{}", stderr(&second));
    assert!(stderr(&second).contains("APP_SECRET differs"));
}

#[test]
fn an_older_release_refuses_with_78_unless_allowed() {
    let db = cluster().new_db("pf_older");
    assert_eq!(code(&migrate(&db, "r1")), 0);
    assert_eq!(code(&migrate(&db, "r2")), 0);

    let run = |release: &str, extra: &[&str]| {
        db.gate()
            .args([
                "run",
                "--release",
                release,
                "--migrate",
                &format!("'{}' migrate", standin()),
            ])
            .args(extra)
            .args(["--", standin(), "start"])
            .output()
            .unwrap()
    };
    let old = run("r1", &[]);
    assert_eq!(db.app_starts(), 0, "an old replica must not start");
    let new = run("r2", &[]);
    assert_eq!(db.app_starts(), 1);
    let allowed = run("r1", &["--allow-older-release"]);
    assert_eq!(db.app_starts(), 2);
    let waiter = db.gate_output(&["wait", "--release", "r1"]);
    assert_eq!(db.migrations_started(), 2, "nothing migrated again");

    assert_codes(&[(&old, 78), (&new, 0), (&allowed, 0), (&waiter, 78)]);
    let line = stderr(&old);
    assert_mentions(
        &line,
        &[
            "release \"r1\" is older than release \"r2\"",
            "pass --allow-older-release",
        ],
    );
    assert!(stderr(&allowed).contains("--allow-older-release: starting anyway"));

    // Migrating r1 again (reset) makes it the newest: then r2 is the older one.
    assert_eq!(code(&db.gate_output(&["reset", "--release", "r1"])), 0);
    assert_eq!(code(&migrate(&db, "r1")), 0);
    assert_eq!(code(&run("r2", &[])), 78);
    assert_eq!(code(&run("r1", &[])), 0);
}

#[test]
fn open_webui_preset_fails_on_sqlite_before_connecting_and_warns_on_missing_redis() {
    let db = cluster().new_db("pf_preset");
    let preset = |env: &[(&str, &str)], extra: &[&str]| {
        let mut c = db.gate();
        // The gate's own URL stays MIGRATIONS_GATE_DATABASE_URL; DATABASE_URL is the app's.
        c.env_remove("DATABASE_URL")
            .args([
                "migrate",
                "--release",
                "r1",
                "--preset",
                "open-webui",
                "--app",
                "owui",
            ])
            .args(extra)
            .args(["--", standin(), "migrate"])
            .envs(env.iter().copied());
        c.output().unwrap()
    };
    let sqlite = preset(
        &[("DATABASE_URL", "sqlite:////app/backend/data/webui.db")],
        &[],
    );
    assert!(
        !db.ledger().exists(),
        "a failing local rule stops the gate before it touches the database"
    );
    assert_eq!(code(&sqlite), 78, "{}", stderr(&sqlite));
    assert_stderr_has(
        &sqlite,
        "preset open-webui: wants Open WebUI's database (its DATABASE_* parts, else DATABASE_URL) is PostgreSQL but DATABASE_URL has another scheme",
    );
    assert!(!stderr(&sqlite).contains("sqlite:"), "never the value");

    let forked = preset(
        &[("DATABASE_URL", db.url.as_str()), ("UVICORN_WORKERS", "4")],
        &[],
    );
    assert_eq!(code(&forked), 78, "{}", stderr(&forked));
    assert_stderr_has(&forked, "UVICORN_WORKERS > 1");

    // PostgreSQL and one worker: Redis, the secret key and the vector store only warn.
    let ok = preset(&[("DATABASE_URL", db.url.as_str())], &[]);
    assert_eq!(db.migrations_started(), 1);
    assert_eq!(
        db.env_references().len(),
        13,
        "the preset compares WEBUI_SECRET_KEY, DATABASE_URL and the six DATABASE_* parts, the four websocket/Redis settings and VECTOR_DB"
    );
    assert_eq!(code(&ok), 0, "{}", stderr(&ok));
    let log = stderr(&ok);
    for warned in [
        "wants REDIS_URL is set but REDIS_URL is unset",
        "wants WEBSOCKET_MANAGER=redis but WEBSOCKET_MANAGER is unset",
        "wants WEBUI_SECRET_KEY is set but WEBUI_SECRET_KEY is unset",
        "wants a client-server vector store",
    ] {
        assert!(
            log.contains(warned),
            "missing warning {warned:?} in:\n{log}"
        );
    }
    assert!(!log.contains(&db.url), "never the value of DATABASE_URL");

    // A different secret key on a later replica of the release fails; `run` without --migrate
    // only warns.
    let other_key = preset(
        &[
            ("DATABASE_URL", db.url.as_str()),
            ("WEBUI_SECRET_KEY", SECRET_B),
        ],
        &[],
    );
    assert_eq!(code(&other_key), 78, "{}", stderr(&other_key));
    assert!(stderr(&other_key).contains("WEBUI_SECRET_KEY differs"));
    assert!(
        stderr(&other_key).contains("login loops"),
        "the preset says why: {}",
        stderr(&other_key)
    );
    let no_migrate = db.gate_output(&[
        "run",
        "--release",
        "r1",
        "--preset",
        "open-webui",
        "--app",
        "owui",
        "--ready-sql",
        "SELECT true",
        "--",
        standin(),
        "start",
    ]);
    assert_eq!(code(&no_migrate), 0, "{}", stderr(&no_migrate));
    assert_stderr_has(&no_migrate, "wants `run` has --migrate");
    assert_nothing_secret(&db, &[stderr(&ok), stderr(&other_key), stderr(&no_migrate)]);
}

#[test]
fn open_webui_preset_finds_the_database_in_open_webuis_own_database_parts() {
    // Release r1 is done in `db`, which the DATABASE_* parts name; DATABASE_URL names `other`.
    let db = cluster().new_db("pf_owui_parts");
    let other = cluster().new_db("pf_owui_other");
    assert_eq!(code(&migrate(&db, "r1")), 0);
    let with_parts = |password: &str, ty: &str| {
        let mut c = db.gate();
        c.env_remove("MIGRATIONS_GATE_DATABASE_URL")
            .env("DATABASE_URL", &other.url)
            .env("DATABASE_TYPE", ty)
            .env("DATABASE_USER", "postgres")
            .env("DATABASE_PASSWORD", password)
            .env("DATABASE_HOST", "127.0.0.1")
            .env("DATABASE_PORT", cluster().port.to_string())
            .env("DATABASE_NAME", &db.name);
        c
    };

    // With the preset the parts win, as in Open WebUI; without it they are not read.
    let status = |preset: &[&str]| {
        with_parts(PASSWORD, "postgresql")
            .args(["status", "--release", "r1"])
            .args(preset)
            .output()
            .unwrap()
    };
    let parts = status(&["--preset", "open-webui"]);
    assert_eq!(
        code(&parts),
        0,
        "r1 is done where the parts point: {}",
        stderr(&parts)
    );
    assert_stderr_has(
        &parts,
        "database from Open WebUI's DATABASE_TYPE, DATABASE_USER",
    );
    let url = status(&[]);
    assert_eq!(
        code(&url),
        1,
        "DATABASE_URL's database has no r1: {}",
        stderr(&url)
    );
    assert_stderr_has(&url, "database from DATABASE_URL");

    // The preset's rules read what Open WebUI reads: parts that are not PostgreSQL, or that
    // Open WebUI would misread (an unencoded @ in the password), fail before connecting.
    let migrate_r2 = |password: &str, ty: &str| {
        with_parts(password, ty)
            .args(["migrate", "--release", "r2", "--preset", "open-webui"])
            .args(["--", standin(), "migrate"])
            .output()
            .unwrap()
    };
    let sqlite = migrate_r2(PASSWORD, "sqlite");
    let at = migrate_r2("pw@leak-5e0c", "postgresql");
    let mut no_name = with_parts(PASSWORD, "postgresql");
    let no_name = no_name
        .env_remove("DATABASE_URL")
        .env_remove("DATABASE_NAME")
        .args(["migrate", "--release", "r2", "--preset", "open-webui"])
        .args(["--", standin(), "migrate"])
        .output()
        .unwrap();
    assert!(db.ledger().attempts_at("r2").is_empty() && !other.ledger().exists());
    assert_eq!(db.migrations_started(), 1, "only r1's");
    assert_codes(&[(&sqlite, 78), (&at, 78), (&no_name, 78)]);
    assert_stderr_has(
        &sqlite,
        "wants Open WebUI's database (its DATABASE_* parts, else DATABASE_URL) is PostgreSQL but DATABASE_TYPE is not PostgreSQL",
    );
    assert_stderr_has(
        &at,
        "wants Open WebUI reads its database settings as they are written but DATABASE_PASSWORD is not what SQLAlchemy reads back",
    );
    assert!(!stderr(&at).contains("leak-5e0c"), "never the password");
    assert_stderr_has(
        &no_name,
        "but DATABASE_URL is unset, so Open WebUI uses its SQLite file (DATABASE_NAME unset or empty",
    );
}

#[test]
fn the_termination_log_holds_the_final_line_only_if_the_file_exists() {
    let db = cluster().new_db("pf_termlog");
    let log = TermLog::new("main");
    let logged = |mut c: Command| {
        c.env("MIGRATIONS_GATE_TERMINATION_LOG", &log.0)
            .output()
            .unwrap()
    };
    let migrate_r1 = || {
        let mut c = db.gate();
        c.args(["migrate", "--release", "r1", "--", standin(), "migrate"]);
        c
    };

    assert_eq!(code(&logged(migrate_r1())), 0);
    assert_eq!(
        log.read(),
        "exit 0: migrated release \"r1\" (this replica held the lock; the migration command exited 0)\n"
    );

    assert_eq!(code(&logged(migrate_r1())), 0);
    assert_eq!(
        log.read(),
        "exit 0: release \"r1\" is done; this replica did not migrate\n"
    );

    assert_eq!(code(&logged(replica(&db, "r1", "a", Some(SECRET_A)))), 0);
    let out = logged(replica(&db, "r1", "b", Some(SECRET_B)));
    assert_eq!(code(&out), 78);
    let text = log.read();
    assert!(
        text.starts_with("exit 78: APP_SECRET differs") && text.ends_with('\n'),
        "{text}"
    );
    assert_eq!(text.lines().count(), 1);
    assert!(text.len() < 4096);
    assert!(
        stderr(&out).contains(text.trim_end().trim_start_matches("exit 78: ")),
        "the same line as the log"
    );
    assert_nothing_secret(&db, &[text]);

    let mut c = db.gate();
    c.args(["migrate", "--no-such-flag"]);
    assert_eq!(code(&logged(c)), 64);
    assert!(log.read().starts_with("exit 64: error:"), "{}", log.read());

    // Never created: outside Kubernetes the path means nothing.
    let absent = std::env::temp_dir().join(format!("mg-termlog-absent-{}", std::process::id()));
    let out = db
        .gate()
        .args(["migrate", "--release", "r1", "--", standin(), "migrate"])
        .env("MIGRATIONS_GATE_TERMINATION_LOG", &absent)
        .output()
        .unwrap();
    assert_eq!(code(&out), 0);
    assert!(
        !absent.exists(),
        "the gate must not create a termination log"
    );
}

#[test]
fn status_shows_each_variable_how_many_agreed_and_who_disagreed() {
    let db = cluster().new_db("pf_status");
    assert_eq!(
        code(&replica_output(&db, "r1", "replica-a", Some(SECRET_A))),
        0
    );
    assert_eq!(
        code(&replica_output(&db, "r1", "replica-b", Some(SECRET_B))),
        78
    );
    assert_eq!(
        code(&replica_output(&db, "r1", "replica-c", Some(SECRET_A))),
        0
    );

    let out = db.gate_output(&["status", "--json", "--release", "r1"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let env = json["env_checks"].as_array().expect("env_checks");
    assert_eq!(env.len(), 1);
    assert_eq!(env[0]["release"], "r1");
    assert_eq!(env[0]["variable"], "APP_SECRET");
    assert_eq!(env[0]["reference"]["replica"], "replica-a");
    assert!(env[0]["reference"]["at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(env[0]["agreed"], 2);
    let disagreed = env[0]["disagreed"].as_array().unwrap();
    assert_eq!(disagreed.len(), 1);
    assert_eq!(disagreed[0]["replica"], "replica-b");
    assert!(disagreed[0]["host"].is_string() && disagreed[0]["at"].is_string());

    let table = db.gate_output(&["status"]);
    assert_eq!(code(&table), 0);
    let text = stdout(&table);
    assert!(
        text.contains(
            "release r1 APP_SECRET: 2 replica(s) agreed, 1 disagreed; reference from replica-a at"
        ),
        "{text}"
    );
    assert!(text.contains("differs on replica-b"), "{text}");
    assert_nothing_secret(&db, &[stdout(&out), text, stderr(&table)]);
}

#[test]
fn notices_of_the_gates_own_ddl_stay_out_of_the_default_log() {
    let db = cluster().new_db("pf_notices");
    // Gates racing on a fresh database all create what is missing: the late ones hear
    // "already exists, skipping".
    let outs = run_all(
        (0..4)
            .map(|i| {
                let mut c = replica(&db, "r1", &format!("n{i}"), Some(SECRET_A));
                c.env_remove("MIGRATIONS_GATE_LOG");
                c
            })
            .collect(),
        HANG_GUARD,
    );
    assert_eq!(db.app_starts(), 4);
    for o in &outs {
        assert_eq!(code(o), 0, "{}", stderr(o));
        assert!(
            !stderr(o).contains("skipping") && !stderr(o).contains("already exists"),
            "a NOTICE reached the default log:\n{}",
            stderr(o)
        );
    }
}

#[test]
fn same_env_on_a_first_deploy_works_in_transaction_scope_too() {
    // Behind a pooler or proxy the lock lives in a transaction: the holder's re-read of the
    // ledger inside it must not touch the fingerprint key table, which does not exist yet on a
    // first deploy (a failed statement would abort the lock's transaction).
    let db = cluster().new_db("pre_tx");
    let replicas: Vec<_> = (0..3)
        .map(|i| {
            let mut c = replica_with(
                &db,
                "r1",
                &format!("tx-{i}"),
                Some("same-value"),
                &["--lock-scope", "transaction"],
            );
            spawn(&mut c)
        })
        .collect();
    let outs = wait_all(replicas, HANG_GUARD);
    assert_eq!(db.migrations_started(), 1);
    assert_eq!(db.ledger().count("done"), 1);
    assert_eq!(db.app_starts(), 3);
    for out in &outs {
        assert_eq!(code(out), 0, "{}", stderr(out));
    }
}

/// `--shared-dir`: replicas that share the directory pass quietly; one with a directory of its
/// own is told (a warning), or refused under `--require-shared-dir`; a missing directory and a
/// file are named as such; markers of older releases are removed (the two newest stay).
#[test]
fn replicas_that_do_not_share_the_shared_dir_are_told_and_refused_when_required() {
    let db = cluster().new_db("pf_shared_dir");
    let tmp = std::env::temp_dir().join(format!("mg-shared-{}", std::process::id()));
    let (shared, own) = (tmp.join("shared"), tmp.join("own"));
    std::fs::create_dir_all(&shared).unwrap();
    std::fs::create_dir_all(&own).unwrap();
    std::fs::write(tmp.join("a-file"), "").unwrap();
    let run = |release: &str, name: &str, dir: &Path, extra: &[&str]| {
        let dir = dir.to_str().unwrap();
        let mut args = vec!["--shared-dir", dir];
        args.extend_from_slice(extra);
        replica_with(&db, release, name, Some("s3"), &args)
            .output()
            .unwrap()
    };
    let first = run("r1", "one", &shared, &[]);
    assert_eq!(code(&first), 0, "{}", stderr(&first));
    let markers = |dir: &Path| -> Vec<String> {
        let mut m: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".migrations-gate-"))
            .collect();
        m.sort();
        m
    };
    assert_eq!(
        markers(&shared).len(),
        1,
        "the first replica left its marker"
    );
    let second = run("r1", "two", &shared, &[]);
    assert_eq!(code(&second), 0, "{}", stderr(&second));
    let third = run("r1", "three", &own, &[]);
    assert_eq!(code(&third), 0, "a warning by default: {}", stderr(&third));
    let told = format!(
        "the shared directory {} is not the one release \"r1\" first started with (on one at",
        own.display()
    );
    assert_stderr_has(&third, &told);
    assert_stderr_has(&third, "ReadWriteMany");
    for quiet in [&first, &second] {
        assert!(
            !stderr(quiet).contains("another marker"),
            "{}",
            stderr(quiet)
        );
    }
    let refused = run("r1", "four", &own, &["--require-shared-dir"]);
    assert_eq!(code(&refused), 78, "{}", stderr(&refused));
    assert_stderr_has(&refused, &told);
    let missing = run("r1", "five", &tmp.join("absent"), &["--require-shared-dir"]);
    assert_eq!(code(&missing), 78, "{}", stderr(&missing));
    assert_stderr_has(&missing, "absent does not exist (is the volume mounted?)");
    let file = run("r1", "six", &tmp.join("a-file"), &[]);
    assert_eq!(code(&file), 0, "{}", stderr(&file));
    assert_stderr_has(&file, "a-file is not a directory");
    // The apps of the refused replicas never started; the others did.
    assert_eq!(db.migrations_started(), 1);
    // Newer releases replace older markers: the two newest stay.
    let before = markers(&shared);
    for release in ["r2", "r3"] {
        let out = run(release, "one", &shared, &[]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
    }
    let after = markers(&shared);
    assert_eq!(after.len(), 2, "{after:?}");
    assert!(
        !after.contains(&before[0]),
        "r1's marker is gone: {after:?}"
    );
    // `check` reports it before a deploy, reading only.
    let check = |dir: &Path, release: &str| {
        let out = db.gate_output(&[
            "check",
            "--release",
            release,
            "--shared-dir",
            dir.to_str().unwrap(),
            "--json",
        ]);
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        json["fleet"]["shared_dir"]["state"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(check(&shared, "r3"), "holds release \"r3\"'s marker");
    assert!(check(&own, "r3").starts_with("holds no marker of release \"r3\" yet"));
    assert!(check(&tmp.join("absent"), "r3").starts_with("does not exist"));
    assert_eq!(markers(&own).len(), 1, "check wrote nothing");
    let _ = std::fs::remove_dir_all(&tmp);
}

/// `--preset open-webui`: the most connections the release's replicas can open from Open
/// WebUI's own pools (two engines), against max_connections (300 here) less the superuser
/// reserve (3): one replica with pools of 100 + 50 is over budget, two of 5 + 0 are not.
#[test]
fn open_webui_fleet_over_the_connection_budget_is_warned_with_the_arithmetic() {
    let db = cluster().new_db("pf_budget");
    let replica = |release: &str, name: &str, size: &str, overflow: &str| {
        let mut c = db.gate();
        c.env_remove("DATABASE_URL")
            .args(["migrate", "--release", release, "--application-name", name])
            .args(["--preset", "open-webui", "--", standin(), "migrate"])
            .env("DATABASE_URL", &db.url)
            .env("WEBUI_SECRET_KEY", "budget-key")
            .env("DATABASE_POOL_SIZE", size)
            .env("DATABASE_POOL_MAX_OVERFLOW", overflow);
        c.output().unwrap()
    };
    let over = replica("r1", "big-1", "100", "50");
    assert_eq!(code(&over), 0, "a warning: {}", stderr(&over));
    assert_stderr_has(
        &over,
        "Open WebUI may open 302 connections: 300 per process (2 engines × (DATABASE_POOL_SIZE 100 + DATABASE_POOL_MAX_OVERFLOW 50)) × 1 UVICORN_WORKERS × 1 replica(s) of this release seen so far + 2 for the gate; PostgreSQL allows 297 (max_connections 300 − superuser_reserved_connections 3): over budget",
    );
    assert_stderr_has(&over, "Lower DATABASE_POOL_SIZE");
    for name in ["small-1", "small-2"] {
        let ok = replica("r2", name, "5", "0");
        assert_eq!(code(&ok), 0, "{}", stderr(&ok));
        assert!(!stderr(&ok).contains("over budget"), "{}", stderr(&ok));
    }
    let check = db
        .gate()
        .env_remove("DATABASE_URL")
        .env("DATABASE_URL", &db.url)
        .env("DATABASE_POOL_SIZE", "100")
        .env("DATABASE_POOL_MAX_OVERFLOW", "50")
        .args([
            "check",
            "--release",
            "r1",
            "--preset",
            "open-webui",
            "--json",
        ])
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&check.stdout).unwrap();
    let budget = &json["fleet"]["connection_budget"];
    assert_eq!(budget["over"], true, "{json}");
    assert_eq!(budget["replicas"], 1, "{json}");
    let last = replica("r2", "small-3", "5", "0");
    assert_stderr_has(
        &last,
        "Open WebUI may open 32 connections: 10 per process (2 engines × (DATABASE_POOL_SIZE 5 + DATABASE_POOL_MAX_OVERFLOW 0)) × 1 UVICORN_WORKERS × 3 replica(s)",
    );
}
