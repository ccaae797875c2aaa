//! A gate pointed at a hot standby (a real streaming replica of the test cluster, made with
//! `pg_basebackup -R`). A would-be holder cannot record anything there, so it fails at once and
//! says to point the gate at the primary; `reset` refuses the same way. Documented decision: a
//! follower of a release already done proceeds on a standby (the ledger row is replayed after
//! the migration's own commits, so the schema it needs is there too), and `status` works.

mod support;

use std::time::{Duration, Instant};

use support::*;

/// The test database on the primary, with release `done` done (so the ledger exists), and a
/// standby that has replayed it.
fn primary_and_standby(name: &str, done: &str) -> (TestDb, Cluster) {
    let db = cluster().new_db(name);
    let out = db.gate_output(&["migrate", "--release", done, "--", "true"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let standby = cluster().standby();
    cluster().wait_replayed(&standby, HANG_GUARD);
    (db, standby)
}

/// A gate command aimed at the standby's copy of `db`.
fn gate_on(standby: &Cluster, db: &TestDb) -> std::process::Command {
    let mut c = db.gate();
    c.env("MIGRATIONS_GATE_DATABASE_URL", standby.url(&db.name))
        .env("DATABASE_URL", standby.url(&db.name));
    c
}

/// Runs `migrations-gate ARGS...` against the standby's copy of `db`, with the hang guard.
fn gate_output_on(standby: &Cluster, db: &TestDb, args: &[&str]) -> std::process::Output {
    wait_output(spawn(gate_on(standby, db).args(args)), HANG_GUARD)
}

#[test]
fn a_would_be_holder_on_a_standby_exits_69_at_once_saying_to_use_the_primary() {
    let (db, standby) = primary_and_standby("standby_holder", "r0");
    let started = Instant::now();
    let out = gate_output_on(
        &standby,
        &db,
        &[
            "migrate",
            "--release",
            "r1",
            "--connect-timeout",
            "3s",
            "--",
            standin(),
            "migrate",
        ],
    );
    let took = started.elapsed();
    cluster().wait_replayed(&standby, HANG_GUARD);
    assert_eq!(
        db.ledger().attempts_at("r1"),
        [],
        "nothing may be recorded for r1"
    );
    assert_eq!(db.migrations_started(), 0);
    assert_eq!(code(&out), 69, "{}", stderr(&out));
    assert!(
        took < Duration::from_secs(3 + 10),
        "a standby is not a database that is not up yet: took {took:?}"
    );
    let err = stderr(&out);
    assert!(err.contains("read-only standby"), "{err}");
    assert!(err.contains("point the gate at the primary"), "{err}");
}

#[test]
fn a_follower_of_a_release_done_on_the_primary_proceeds_on_a_standby() {
    let db = cluster().new_db("standby_follower");
    let standby = cluster().standby();
    // One application (`--app`) whose followers name a command that would fail if it ran.
    let out = db.gate_output(&[
        "migrate",
        "--release",
        "r1",
        "--app",
        "t",
        "--",
        standin(),
        "migrate",
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    cluster().wait_replayed(&standby, HANG_GUARD);
    let on_standby = TestDb {
        url: standby.url(&db.name),
        name: db.name.clone(),
    };
    assert_eq!(on_standby.ledger().times_done("r1"), 1);
    // `false` would fail the gate: it must not run.
    let on = |args: &[&str]| gate_output_on(&standby, &db, args);
    let migrate = on(&["migrate", "--release", "r1", "--app", "t", "--", "false"]);
    let run = on(&[
        "run",
        "--release",
        "r1",
        "--app",
        "t",
        "--migrate",
        "false",
        "--",
        "true",
    ]);
    let wait = on(&["wait", "--release", "r1", "--wait-timeout", "30s"]);
    assert_eq!(db.migrations_started(), 1);
    assert_eq!(db.ledger().attempts_at("r1").len(), 1);
    for (what, out) in [("migrate", &migrate), ("run", &run), ("wait", &wait)] {
        assert_eq!(code(out), 0, "{what} on the standby:\n{}", stderr(out));
    }
}

#[test]
fn reset_on_a_standby_exits_69_saying_it_is_read_only() {
    let (db, standby) = primary_and_standby("standby_reset", "r1");
    let out = gate_output_on(&standby, &db, &["reset", "--release", "r1"]);
    assert_eq!(
        db.ledger().times_done("r1"),
        1,
        "the release must still be done on the primary"
    );
    assert_eq!(code(&out), 69, "{}", stderr(&out));
    assert_stderr_has(&out, "read-only");
    assert!(
        stderr(&out).contains("point the gate at the primary"),
        "the message must say what to do: {}",
        stderr(&out)
    );
}

#[test]
fn status_on_a_standby_shows_a_done_release() {
    let (db, standby) = primary_and_standby("standby_status", "r1");
    let out = gate_output_on(&standby, &db, &["status", "--release", "r1"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_stdout_has(&out, "done");
}

#[test]
fn a_would_be_holder_on_a_standby_says_so_at_once_and_that_it_retries_for_the_connect_timeout() {
    use std::io::BufRead;
    let (db, standby) = primary_and_standby("standby_said", "r0");
    let started = Instant::now();
    let mut child = spawn(gate_on(&standby, &db).args([
        "migrate",
        "--release",
        "r1",
        "--connect-timeout",
        "5s",
        "--",
        standin(),
        "migrate",
    ]));
    let err = child.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        std::io::BufReader::new(err)
            .lines()
            .map_while(|l| l.ok())
            .map(|l| (started.elapsed(), l))
            .collect::<Vec<_>>()
    });
    let out = wait_output(child, HANG_GUARD);
    let lines = reader.join().expect("stderr reader");
    let all: String = lines.iter().map(|(_, l)| format!("{l}\n")).collect();
    assert_eq!(db.migrations_started(), 0);
    assert_eq!(code(&out), 69, "{all}");
    let (when, said) = lines
        .iter()
        .find(|(_, l)| l.contains("WARN") && l.contains("is a read-only standby"))
        .unwrap_or_else(|| panic!("no warning that the server is a standby:\n{all}"));
    assert!(
        *when < Duration::from_secs(3),
        "the standby warning came after {when:?}, not at once:\n{all}"
    );
    assert_mentions(said, &["up to 5", "--connect-timeout", "failover"]);
    assert!(!said.contains(PASSWORD), "{said}");
    assert_eq!(
        lines
            .iter()
            .filter(|(_, l)| l.contains("is a read-only standby") && l.contains("WARN"))
            .count(),
        1,
        "said once, not on every retry:\n{all}"
    );
}

/// A host list naming `ports` in order (`127.0.0.1` each), with `attrs` for
/// `target_session_attrs`.
fn host_list(db: &TestDb, ports: &[u16], attrs: &str) -> String {
    let hosts: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    format!(
        "postgresql://postgres:{PASSWORD}@{}/{}?target_session_attrs={attrs}",
        hosts.join(","),
        db.name
    )
}

/// The port `psql` reaches with `url` (or with the environment `env`).
fn psql_port(url: &str, env: &[(&str, String)]) -> String {
    let mut c = std::process::Command::new("psql");
    if !url.is_empty() {
        c.arg(url);
    }
    let out = c
        .envs(env.iter().map(|(k, v)| (k, v)))
        .args(["-Atc", "SELECT inet_server_port()"])
        .output()
        .expect("run psql");
    assert_succeeded(&out, "psql");
    stdout(&out).trim().to_string()
}

/// Runs `migrate --release RELEASE` on `url` (or the environment alone when `url` is empty),
/// with a migration that prints, through psql on `oracle` (libpq's own choice of host), the port
/// it reached and how many of the gate's sessions (application_name `tag`) are on that server.
fn migrate_on_list(
    db: &TestDb,
    url: &str,
    env: &[(&str, String)],
    oracle: &str,
    release: &str,
) -> std::process::Output {
    let probe = format!(
        "SELECT inet_server_port(), (SELECT count(*) FROM pg_stat_activity \
         WHERE application_name = '{release}' AND datname = current_database())"
    );
    let mut c = db.gate();
    if url.is_empty() {
        c.env_remove("MIGRATIONS_GATE_DATABASE_URL")
            .env_remove("DATABASE_URL");
    } else {
        c.env("MIGRATIONS_GATE_DATABASE_URL", url)
            .env("DATABASE_URL", url);
    }
    c.envs(env.iter().map(|(k, v)| (k, v)))
        .env("ORACLE_URL", oracle)
        .env("PROBE", probe)
        .args([
            "migrate",
            "--release",
            release,
            "--application-name",
            release,
            "--connect-timeout",
            "5s",
            "--",
            "sh",
            "-c",
            r#"psql $ORACLE_URL -v ON_ERROR_STOP=1 -Atc "$PROBE""#,
        ]);
    wait_output(spawn(&mut c), HANG_GUARD)
}

#[test]
fn on_a_host_list_a_holder_reaches_the_primary_where_psql_with_read_write_does() {
    let (db, standby) = primary_and_standby("list_holder", "r0");
    let (primary, standby_port) = (cluster().port, standby.port);
    // A port nothing listens on first, then the standby, then the primary: libpq's order.
    let dead = free_port();
    let ports = [dead, standby_port, primary];
    let any = host_list(&db, &ports, "any");
    let read_write = host_list(&db, &ports, "read-write");
    // The oracle: libpq with `any` takes the standby (the first that answers), with
    // read-write the primary; a replica that may migrate needs the primary whatever the URL says.
    assert_eq!(psql_port(&any, &[]), standby_port.to_string());
    assert_eq!(psql_port(&read_write, &[]), primary.to_string());
    for (i, url) in [&any, &read_write].into_iter().enumerate() {
        let release = format!("list-{i}");
        let out = migrate_on_list(&db, url, &[], &read_write, &release);
        assert_eq!(db.ledger().times_done(&release), 1, "{}", stderr(&out));
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        assert_eq!(
            stdout(&out).trim(),
            format!("{primary}|1"),
            "the gate must hold its lock where psql with read-write is:\n{}",
            stderr(&out)
        );
        assert!(!stderr(&out).contains(PASSWORD), "{}", stderr(&out));
    }
    // libpq's environment alone: PGHOST and PGPORT lists and PGTARGETSESSIONATTRS.
    let env = [
        ("PGHOST", "127.0.0.1,127.0.0.1".to_string()),
        ("PGPORT", format!("{standby_port},{primary}")),
        ("PGUSER", "postgres".to_string()),
        ("PGPASSWORD", PASSWORD.to_string()),
        ("PGDATABASE", db.name.clone()),
        ("PGTARGETSESSIONATTRS", "read-write".to_string()),
    ];
    assert_eq!(psql_port("", &env), primary.to_string());
    let out = migrate_on_list(&db, "", &env, "", "list-env");
    assert_eq!(db.ledger().times_done("list-env"), 1, "{}", stderr(&out));
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(
        stdout(&out).trim(),
        format!("{primary}|1"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_host_list_without_a_read_write_host_says_so_at_once_and_exits_69_after_the_connect_timeout() {
    let (db, standby) = primary_and_standby("list_no_primary", "r0");
    let url = host_list(&db, &[standby.port, free_port()], "any");
    let started = Instant::now();
    let out = migrate_on_list(&db, &url, &[], "", "list-none");
    let took = started.elapsed();
    cluster().wait_replayed(&standby, HANG_GUARD);
    assert_eq!(db.ledger().attempts_at("list-none"), []);
    assert_eq!(code(&out), 69, "{}", stderr(&out));
    assert!(took < Duration::from_secs(5 + 10), "took {took:?}");
    let err = stderr(&out);
    assert_mentions(
        &err,
        &["none of the 2 hosts is read-write", "a standby", "failover"],
    );
    assert!(!err.contains(PASSWORD), "{err}");
}

#[test]
fn wait_and_status_on_a_host_list_go_where_target_session_attrs_says() {
    let (db, standby) = primary_and_standby("list_status", "r0");
    // The primary first; `standby` must skip it, as libpq does.
    let url = host_list(&db, &[cluster().port, standby.port], "standby");
    assert_eq!(psql_port(&url, &[]), standby.port.to_string());
    let on = |args: &[&str]| {
        let mut c = db.gate();
        c.env("MIGRATIONS_GATE_DATABASE_URL", &url)
            .env("MIGRATIONS_GATE_LOG", "migrations_gate=debug")
            .args(args);
        wait_output(spawn(&mut c), HANG_GUARD)
    };
    for args in [
        &["wait", "--release", "r0", "--wait-timeout", "30s"][..],
        &["status", "--release", "r0"][..],
    ] {
        let out = on(args);
        assert_eq!(code(&out), 0, "{args:?}: {}", stderr(&out));
        assert_mentions(
            &stderr(&out),
            &[&format!("127.0.0.1:{}", standby.port), "is standby"],
        );
    }
}
