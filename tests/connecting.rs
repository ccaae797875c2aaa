//! The connection forms an app's `DATABASE_URL` may have, against a real server, with `psql` as
//! the oracle: for each form the gate, while it holds the lock, must be seen by the server on
//! the same database as the same user as `psql` given the equivalent libpq URL.

mod support;

use std::process::Command;

use support::*;

/// A login role of the test's own with the rights the gate needs on `db`.
fn role_for(db: &TestDb) -> (String, String) {
    let role = format!("r_{}", db.name);
    let password = "pw-with-@-and-:";
    sql(
        &cluster().url("postgres"),
        &format!(
            "CREATE ROLE {role} LOGIN PASSWORD '{password}'; GRANT ALL ON DATABASE {} TO {role}",
            db.name
        ),
    );
    (role, password.into())
}

/// Runs the gate on `gate_url` with a migration that asks the server, through `psql` on
/// `libpq_url`, where psql is and whether the gate's own session (tagged `tag`) is there too.
/// Returns psql's line: `database|user|port|gate sessions there as that user`.
fn reached(db: &TestDb, gate_url: &str, libpq_url: &str, tag: &str) -> (String, String) {
    let probe = format!(
        "SELECT current_database(), current_user, coalesce(inet_server_port(), 0), \
         (SELECT count(*) FROM pg_stat_activity a WHERE a.application_name = '{tag}' \
          AND a.datname = current_database() AND a.usename = current_user)"
    );
    let out = db
        .gate()
        .env("MIGRATIONS_GATE_DATABASE_URL", gate_url)
        .env("DATABASE_URL", gate_url)
        .env("ORACLE_URL", libpq_url)
        .env("PROBE", &probe)
        .args([
            "migrate",
            "--release",
            tag,
            "--application-name",
            tag,
            "--",
            "sh",
            "-c",
            r#"psql "$ORACLE_URL" -v ON_ERROR_STOP=1 -Atc "$PROBE""#,
        ])
        .output()
        .expect("run the gate");
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    (stdout(&out).trim().to_string(), stderr(&out))
}

/// What psql alone reaches with `libpq_url`: `database|user|port`.
fn psql_alone(libpq_url: &str) -> String {
    let out = Command::new("psql")
        .arg(libpq_url)
        .args([
            "-Atc",
            "SELECT current_database(), current_user, coalesce(inet_server_port(), 0)",
        ])
        .output()
        .expect("run psql");
    assert_succeeded(&out, "psql");
    stdout(&out).trim().to_string()
}

#[test]
fn sqlalchemy_urls_reach_the_database_and_user_psql_reaches() {
    let db = cluster().new_db("sqla");
    let (role, password) = role_for(&db);
    let pw = "pw-with-%40-and-%3A";
    assert_eq!(password.replace('@', "%40").replace(':', "%3A"), pw);
    let port = cluster().port;
    let socket_dir = cluster().dir.display().to_string();
    let forms = [
        (
            format!(
                "postgresql+psycopg2://{role}:{pw}@127.0.0.1:{port}/{}",
                db.name
            ),
            format!("postgresql://{role}:{pw}@127.0.0.1:{port}/{}", db.name),
            "tcp",
        ),
        (
            format!(
                "postgresql+asyncpg://{role}:{pw}@127.0.0.1:{port}/{}?ssl=disable&connect_timeout=5",
                db.name
            ),
            format!(
                "postgresql://{role}:{pw}@127.0.0.1:{port}/{}?sslmode=disable&connect_timeout=5",
                db.name
            ),
            "tcp",
        ),
        (
            // SQLAlchemy's Unix-socket form: no host in the authority, the folder in `host=`.
            format!(
                "postgresql+psycopg2://{role}:{pw}@/{}?host={socket_dir}&port={port}",
                db.name
            ),
            format!(
                "postgresql://{role}:{pw}@/{}?host={socket_dir}&port={port}",
                db.name
            ),
            "unix",
        ),
    ];
    for (i, (gate_url, libpq_url, via)) in forms.iter().enumerate() {
        let tag = format!("mg-form-{i}");
        let alone = psql_alone(libpq_url);
        let (seen, log) = reached(&db, gate_url, libpq_url, &tag);
        let expected_port = if *via == "unix" {
            "0"
        } else {
            &port.to_string()
        };
        assert_eq!(
            alone,
            format!("{}|{role}|{expected_port}", db.name),
            "psql with {libpq_url}"
        );
        assert_eq!(
            seen,
            format!("{alone}|1"),
            "the gate with {gate_url} must hold a session where psql with {libpq_url} is:\n{log}"
        );
        assert!(!log.contains("pw-with"), "the password was printed:\n{log}");
        // Direct, proven both over TCP and over the Unix socket.
        assert!(log.contains("route=Direct"), "{via}: {log}");
    }
    assert_eq!(db.ledger().times_done("mg-form-0"), 1);
}

#[test]
fn a_url_parameter_the_gate_cannot_honour_exits_64_naming_it_without_the_password() {
    let db = cluster().new_db("badparam");
    let url = format!(
        "postgresql://postgres:{PASSWORD}@127.0.0.1:{}/{}?gssencmode=disable",
        cluster().port,
        db.name
    );
    let out = db
        .gate()
        .env("MIGRATIONS_GATE_DATABASE_URL", &url)
        .args(["migrate", "--release", "r1", "--", "true"])
        .output()
        .expect("run the gate");
    assert_eq!(code(&out), 64, "{}", stderr(&out));
    assert_mentions(&stderr(&out), &["gssencmode", "remove it"]);
    assert!(!stderr(&out).contains(PASSWORD), "{}", stderr(&out));
}

#[test]
fn the_key_value_form_and_the_libpq_environment_alone_reach_what_psql_reaches() {
    let db = cluster().new_db("kv");
    let (role, password) = role_for(&db);
    let port = cluster().port;
    // Key/value: a quoted password with the characters a URL would need to escape.
    let kv = format!(
        "host=127.0.0.1 port={port} dbname={} user={role} password='{password}'",
        db.name
    );
    let (seen, log) = reached(&db, &kv, &kv, "mg-kv");
    assert_eq!(seen, format!("{}|{role}|{port}|1", db.name), "{log}");
    assert!(!log.contains("pw-with"), "the password was printed:\n{log}");
    // The environment alone, no URL anywhere: PGHOST, PGPORT, PGDATABASE, PGUSER, PGPASSWORD.
    let probe = "SELECT current_database(), current_user, coalesce(inet_server_port(), 0), \
         (SELECT count(*) FROM pg_stat_activity a WHERE a.application_name = 'mg-env' \
          AND a.datname = current_database() AND a.usename = current_user)";
    let env = [
        ("PGHOST", "127.0.0.1".to_string()),
        ("PGPORT", port.to_string()),
        ("PGDATABASE", db.name.clone()),
        ("PGUSER", role.clone()),
        ("PGPASSWORD", password.clone()),
    ];
    let mut gate = db.gate();
    gate.env_remove("MIGRATIONS_GATE_DATABASE_URL")
        .env_remove("DATABASE_URL")
        .env("PROBE", probe)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .args([
            "migrate",
            "--release",
            "mg-env",
            "--application-name",
            "mg-env",
            "--",
            "sh",
            "-c",
            // psql with the same environment is the oracle.
            r#"psql -v ON_ERROR_STOP=1 -Atc "$PROBE""#,
        ]);
    let out = gate.output().expect("run the gate");
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(
        stdout(&out).trim(),
        format!("{}|{role}|{port}|1", db.name),
        "{}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains("pw-with"), "{}", stderr(&out));
    // A service that is not defined anywhere: one line naming it, exit 64, as psql refuses it.
    let out = db
        .gate()
        .env_remove("MIGRATIONS_GATE_DATABASE_URL")
        .env_remove("DATABASE_URL")
        .env("PGSERVICE", "nowhere")
        .env("PGSERVICEFILE", "/nonexistent/pg_service.conf")
        .env("PGSYSCONFDIR", "/nonexistent")
        .args(["migrate", "--release", "r1", "--", "true"])
        .output()
        .expect("run the gate");
    assert_eq!(db.ledger().attempts_at("r1"), []);
    assert_eq!(code(&out), 64, "{}", stderr(&out));
    assert_mentions(
        &stderr(&out),
        &["service \"nowhere\" not found", "PGSERVICEFILE"],
    );
}

#[test]
fn a_service_in_pg_service_conf_reaches_what_psql_reaches_and_the_url_wins_over_it() {
    let db = cluster().new_db("service");
    let other = cluster().new_db("service_other");
    let (role, password) = role_for(&db);
    let port = cluster().port;
    sql(
        &cluster().url("postgres"),
        &format!("GRANT ALL ON DATABASE {} TO {role}", other.name),
    );
    let dir = std::env::temp_dir().join(format!("mg-service-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("pg_service.conf");
    std::fs::write(
        &file,
        format!(
            "# the app's service\n[mgsvc]\nhost=127.0.0.1\nport={port}\ndbname={}\nuser={role}\npassword={password}\n\n[unused]\nhost=203.0.113.1\n",
            db.name
        ),
    )
    .expect("write pg_service.conf");
    let service_file = file.display().to_string();
    // By `service=` in the connection string, and by PGSERVICE alone; then with the URL's own
    // dbname, which wins over the service's (libpq's precedence), on the other database.
    let cases = [
        ("service=mgsvc", "", db.name.clone()),
        ("", "mgsvc", db.name.clone()),
        (
            &*format!("service=mgsvc dbname={}", other.name),
            "",
            other.name.clone(),
        ),
    ];
    for (i, (conninfo, pgservice, expected_db)) in cases.iter().enumerate() {
        let tag = format!("mg-svc-{i}");
        let probe = format!(
            "SELECT current_database(), current_user, inet_server_port(), \
             (SELECT count(*) FROM pg_stat_activity a WHERE a.application_name = '{tag}' \
              AND a.datname = current_database() AND a.usename = current_user)"
        );
        let mut gate = db.gate();
        gate.env_remove("MIGRATIONS_GATE_DATABASE_URL")
            .env_remove("DATABASE_URL")
            .env("PGSERVICEFILE", &service_file)
            .env("PROBE", &probe)
            .env("ORACLE", conninfo);
        if !conninfo.is_empty() {
            gate.env("MIGRATIONS_GATE_DATABASE_URL", conninfo);
        }
        if !pgservice.is_empty() {
            gate.env("PGSERVICE", pgservice);
        }
        gate.args([
            "migrate",
            "--release",
            &tag,
            "--application-name",
            &tag,
            "--",
            "sh",
            "-c",
            // psql, with the same service file and environment, is the oracle.
            r#"psql ${ORACLE:+"$ORACLE"} -v ON_ERROR_STOP=1 -Atc "$PROBE""#,
        ]);
        let out = wait_output(spawn(&mut gate), HANG_GUARD);
        let ledger_db = if *expected_db == db.name { &db } else { &other };
        assert_eq!(ledger_db.ledger().times_done(&tag), 1, "{}", stderr(&out));
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        assert_eq!(
            stdout(&out).trim(),
            format!("{expected_db}|{role}|{port}|1"),
            "case {i}: {}",
            stderr(&out)
        );
        assert!(!stderr(&out).contains("pw-with"), "{}", stderr(&out));
    }
    let _ = std::fs::remove_dir_all(&dir);
}
