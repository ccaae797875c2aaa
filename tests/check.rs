//! `migrations-gate check`: before a deploy, the gate connects as it will and says what it would
//! find (host, route and proof, server, lock, ledger, privileges), and never takes the lock or
//! writes. Each test looks at the database first (nothing created, nothing locked), then the
//! exit code, then what was printed.

mod support;

use std::process::Output;

use support::role::Role;
use support::*;

/// `check` as a bare [`Role`].
trait Checks {
    fn check(&self, db: &TestDb, args: &[&str]) -> Output;
}

impl Checks for Role {
    /// `migrations-gate check ARGS...` as this role, to the end.
    fn check(&self, db: &TestDb, args: &[&str]) -> Output {
        self.gate(db)
            .arg("check")
            .args(args)
            .output()
            .expect("run migrations-gate check")
    }
}

/// `migrations-gate check ARGS...` as the superuser, to the end.
fn check(db: &TestDb, args: &[&str]) -> Output {
    let mut all = vec!["check"];
    all.extend_from_slice(args);
    db.gate_output(&all)
}

/// The lines of stdout that start with `prefix`.
fn lines_with(out: &Output, prefix: &str) -> Vec<String> {
    stdout(out)
        .lines()
        .filter(|l| l.starts_with(prefix))
        .map(String::from)
        .collect()
}

/// Whether schema `migrations_gate` exists.
fn gate_schema_exists(db: &TestDb) -> bool {
    db.one("SELECT count(*) FROM pg_namespace WHERE nspname = 'migrations_gate'") == "1"
}

/// `check --json ...`, parsed.
fn json(out: &Output) -> serde_json::Value {
    serde_json::from_str(&stdout(out))
        .unwrap_or_else(|e| panic!("check --json must print JSON ({e}):\n{}", stdout(out)))
}

/// The keys of a JSON object, sorted.
fn keys(v: &serde_json::Value) -> Vec<String> {
    let mut k: Vec<String> = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect();
    k.sort();
    k
}

#[test]
fn a_least_privilege_role_on_a_fresh_database_gets_the_grant_to_ask_for_exit_77_and_nothing_created()
 {
    let db = cluster().new_db("check_fresh");
    sql(
        &db.url,
        &format!("REVOKE CREATE ON DATABASE {} FROM PUBLIC", db.name),
    );
    let role = Role::create(&db, "check");
    let out = role.check(&db, &["--release", "r1"]);
    let js = role.check(&db, &["--release", "r1", "--json"]);

    assert!(!gate_schema_exists(&db), "check created the gate's schema");
    db.assert_no_gate_locks();
    assert_eq!(code(&out), 77, "{}{}", stdout(&out), stderr(&out));
    assert_eq!(code(&js), 77, "{}", stderr(&js));

    let text = stdout(&out);
    assert_mentions(
        &text,
        &[
            &format!("session: database \"{}\", user \"{}\"", db.name, role.name),
            "ledger: schema \"migrations_gate\" does not exist",
            "release: r1 none",
            "result: 1 problem(s)",
        ],
    );
    let missing = lines_with(&out, "privilege MISSING:");
    assert_eq!(missing.len(), 1, "{text}");
    assert_mentions(
        &missing[0],
        &[
            &format!("CREATE on database \"{}\"", db.name),
            &format!(
                "ask a DBA: CREATE SCHEMA \"migrations_gate\" AUTHORIZATION \"{}\";",
                role.name
            ),
        ],
    );
    // Not needed by migrate or run: shown, never a problem.
    assert_eq!(
        lines_with(&out, "privilege missing, optional: pg_signal_backend").len(),
        1,
        "{text}"
    );
    let v = json(&js);
    assert_eq!(v["ok"], false);
    assert_eq!(v["exit_code"], 77);
    assert_eq!(v["privileges"][0]["granted"], false);
    assert_eq!(v["privileges"][0]["required"], true);
    assert_eq!(v["problems"][0]["exit_code"], 77);
    for (what, text) in [
        ("stdout", text),
        ("stderr", stderr(&out)),
        ("json", stdout(&js)),
    ] {
        assert!(
            !text.contains(&role.password),
            "the password appears on {what}: {text}"
        );
    }
}

#[test]
fn a_dba_made_ledger_with_read_only_rights_names_each_missing_grant_and_with_them_exits_0() {
    let db = cluster().new_db("check_dml");
    let out = db.gate_output(&["migrate", "--release", "r1", "--", "true"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    sql(
        &db.url,
        &format!("REVOKE CREATE ON DATABASE {} FROM PUBLIC", db.name),
    );
    let role = Role::create(&db, "check");
    let r = &role.name;
    sql(
        &db.url,
        &format!(
            "GRANT USAGE ON SCHEMA migrations_gate TO {r}; GRANT SELECT ON migrations_gate.ledger TO {r};"
        ),
    );
    let rows = db.ledger().attempts().len();

    let out = role.check(&db, &["--release", "r1"]);
    assert_eq!(
        db.ledger().attempts().len(),
        rows,
        "check wrote a ledger row"
    );
    db.assert_no_gate_locks();
    assert_eq!(code(&out), 77, "{}{}", stdout(&out), stderr(&out));
    let missing = lines_with(&out, "privilege MISSING:");
    let grants: Vec<String> = missing
        .iter()
        .filter_map(|l| l.split("ask a DBA: ").nth(1).map(String::from))
        .collect();
    assert_eq!(
        grants,
        [
            format!("GRANT INSERT ON \"migrations_gate\".ledger TO \"{r}\";"),
            format!("GRANT UPDATE ON \"migrations_gate\".ledger TO \"{r}\";"),
            format!("GRANT USAGE ON SEQUENCE \"migrations_gate\".\"ledger_id_seq\" TO \"{r}\";"),
        ],
        "{}",
        stdout(&out)
    );
    assert_mentions(
        &stdout(&out),
        &[
            "privilege ok: SELECT on \"migrations_gate\".ledger",
            "privilege missing, optional: DELETE on \"migrations_gate\".ledger, for reset only",
            "release: r1 done",
            "result: 3 problem(s), 3 of them a missing privilege",
        ],
    );

    // What the guide's DML-only set-up grants is everything the gate needs.
    sql(
        &db.url,
        &format!(
            "GRANT SELECT, INSERT, UPDATE, DELETE ON migrations_gate.ledger TO {r};
             GRANT USAGE ON SEQUENCE migrations_gate.ledger_id_seq TO {r};"
        ),
    );
    let out = role.check(&db, &["--release", "r1"]);
    assert_eq!(code(&out), 0, "{}{}", stdout(&out), stderr(&out));
    assert!(
        lines_with(&out, "privilege MISSING").is_empty(),
        "{}",
        stdout(&out)
    );
    assert_mentions(&stdout(&out), &["result: ok"]);
}

#[test]
fn with_a_done_release_check_reads_the_ledger_and_the_lock_and_changes_neither() {
    let db = cluster().new_db("check_done");
    // A fresh database: the superuser may create everything; check creates nothing itself.
    let fresh = check(&db, &["--release", "r1"]);
    assert!(!gate_schema_exists(&db), "check created the gate's schema");
    assert_eq!(code(&fresh), 0, "{}{}", stdout(&fresh), stderr(&fresh));
    assert_mentions(
        &stdout(&fresh),
        &[
            &format!("privilege ok: CREATE on database \"{}\"", db.name),
            "result: ok",
        ],
    );

    let out = db.gate_output(&["migrate", "--release", "r1", "--", "true"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    // A session of the test's own holds the gate's lock: check reads it, never waits for it.
    let (holder, _key) = hold_lock(&db.url, "migrations-gate");
    let done = check(&db, &["--release", "r1"]);
    let other = check(&db, &["--release", "r2"]);
    assert_eq!(db.ledger().attempts().len(), 1, "check wrote a ledger row");
    drop(holder);
    db.assert_no_gate_locks();
    assert_eq!(code(&done), 0, "{}{}", stdout(&done), stderr(&done));
    assert_eq!(code(&other), 0, "{}{}", stdout(&other), stderr(&other));

    let port = cluster().port;
    let text = stdout(&done);
    assert_mentions(
        &text,
        &[
            &format!("host: 127.0.0.1:{port} (the only host)"),
            "route: direct, lock scope session: direct, proven: the server (backend PID ",
            "server: PostgreSQL ",
            ", primary, read-write",
            &format!("session: database \"{}\", user \"postgres\"", db.name),
            "lock: migrations-gate (key -2194319167836551848), held by ",
            "ledger: migrations_gate.ledger exists",
            "release: r1 done (newest attempt 1 done by ",
            "result: ok",
        ],
    );
    assert!(!text.contains(PASSWORD), "{text}");
    assert!(
        lines_with(&done, "privilege MISSING").is_empty(),
        "the superuser lacks nothing: {text}"
    );
    assert_mentions(&stdout(&other), &["release: r2 none", "result: ok"]);
}

#[test]
fn through_pgbouncer_the_route_is_not_direct_and_check_says_why() {
    let db = cluster().new_db("check_bouncer");
    for mode in ["session", "transaction"] {
        let bouncer = PgBouncer::start(cluster(), mode, 3);
        let out = db
            .gate()
            .env("MIGRATIONS_GATE_DATABASE_URL", bouncer.url(&db.name))
            .args(["check", "--release", "r1", "--json"])
            .output()
            .expect("run migrations-gate check");
        assert!(!gate_schema_exists(&db), "{mode}: check created the schema");
        assert_eq!(code(&out), 0, "{mode}: {}{}", stdout(&out), stderr(&out));
        let v = json(&out);
        let route = &v["route"];
        assert_ne!(route["route"], "direct", "{mode}: {route}");
        assert_eq!(route["lock_scope"], "transaction", "{mode}: {route}");
        let why = route["why"].as_str().unwrap_or_default();
        assert!(why.starts_with("not "), "{mode}: {why}");
        assert_eq!(
            v["reached"]["host"],
            format!("127.0.0.1:{}", bouncer.port),
            "{mode}"
        );
        if mode == "session" {
            // One server connection per client: the server sees PgBouncer's socket, not ours.
            assert_eq!(route["route"], "middlebox");
            assert_mentions(why, &["the server sees the client", "not our own socket"]);
        }
    }
}

#[test]
fn check_json_has_the_stable_keys_and_an_unreachable_server_exits_69_with_json_too() {
    let db = cluster().new_db("check_json");
    let out = db.gate_output(&["migrate", "--release", "r1", "--", "true"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = check(&db, &["--release", "r1", "--json"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let v = json(&out);
    assert_eq!(
        keys(&v),
        [
            "database_url",
            "exit_code",
            "fleet",
            "ledger",
            "lock",
            "ok",
            "privileges",
            "problems",
            "reached",
            "route",
            "server"
        ]
    );
    assert_eq!(keys(&v["reached"]), ["host", "why"]);
    assert_eq!(keys(&v["route"]), ["lock_scope", "route", "why"]);
    assert_eq!(
        keys(&v["server"]),
        [
            "database",
            "read_only",
            "standby",
            "user",
            "version",
            "version_num"
        ]
    );
    assert_eq!(keys(&v["lock"]), ["holder", "key", "name"]);
    assert_eq!(
        keys(&v["ledger"]),
        [
            "contract",
            "newest_attempt",
            "readable",
            "release",
            "release_state",
            "schema",
            "schema_exists",
            "table_exists"
        ]
    );
    for p in v["privileges"].as_array().expect("privileges is a list") {
        assert_eq!(
            keys(p),
            ["grant", "granted", "needed_for", "privilege", "required"]
        );
    }
    assert_eq!(v["ok"], true);
    assert_eq!(v["exit_code"], 0);
    assert_eq!(v["reached"]["why"], "the only host");
    assert_eq!(v["route"]["route"], "direct");
    assert_eq!(v["server"]["standby"], false);
    assert_eq!(v["server"]["database"], db.name.as_str());
    assert_eq!(v["ledger"]["release_state"], "done");
    assert_eq!(v["ledger"]["newest_attempt"]["outcome"], "done");
    assert_eq!(v["problems"], serde_json::json!([]));
    assert!(!stdout(&out).contains(PASSWORD));

    // Nothing listens: exit 69 after --connect-timeout, and still a JSON document.
    let url = format!("postgres://postgres:{PASSWORD}@127.0.0.1:{}/x", free_port());
    let out = db
        .gate()
        .env("MIGRATIONS_GATE_DATABASE_URL", &url)
        .args(["check", "--json", "--connect-timeout", "1s"])
        .output()
        .expect("run migrations-gate check");
    assert_eq!(code(&out), 69, "{}", stderr(&out));
    let v = json(&out);
    assert_eq!(v["ok"], false);
    assert_eq!(v["reached"], serde_json::Value::Null);
    assert_eq!(v["problems"][0]["exit_code"], 69);
    assert!(!stdout(&out).contains(PASSWORD));
}

#[test]
fn on_a_standby_check_exits_69_unless_the_release_is_done_there() {
    let primary = cluster();
    let db = primary.new_db("check_standby");
    let out = db.gate_output(&["migrate", "--release", "r1", "--", "true"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let standby = primary.standby();
    primary.wait_replayed(&standby, HANG_GUARD);
    let url = standby.url(&db.name);
    let on_standby = |release: &str| {
        db.gate()
            .env("MIGRATIONS_GATE_DATABASE_URL", &url)
            .args(["check", "--release", release])
            .output()
            .expect("run migrations-gate check")
    };
    let done = on_standby("r1");
    let not_done = on_standby("r2");
    assert_eq!(code(&done), 0, "{}{}", stdout(&done), stderr(&done));
    assert_eq!(
        code(&not_done),
        69,
        "{}{}",
        stdout(&not_done),
        stderr(&not_done)
    );
    assert_mentions(
        &stdout(&done),
        &[", standby, read-only", "release: r1 done"],
    );
    let problems = lines_with(&not_done, "problem:");
    assert_eq!(problems.len(), 1, "{}", stdout(&not_done));
    assert_mentions(
        &problems[0],
        &[
            "read-only standby",
            "release \"r2\" is not done there",
            "point the gate at the primary",
        ],
    );
}
