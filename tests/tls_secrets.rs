//! TLS and secrets: every sslmode the README promises connects (and really uses TLS where it
//! should), certificate problems fail at once with a clear message instead of being retried, and
//! the password reaches the server from every documented source without ever being printed.
//!
//! The certificates are made here with the `openssl` command-line tool (Debian: package
//! `openssl`, pulled in by `postgresql` through `ssl-cert`): a CA and a server certificate for
//! `localhost` / `127.0.0.1`, and a second CA with a server certificate for `wrong.example`.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use support::*;

/// `--connect-timeout` of the runs that must fail: a certificate problem has to be reported
/// well before this, since retrying cannot fix it.
const CONNECT_TIMEOUT: &str = "5s";
/// What "well before the connect timeout" means (a failing handshake takes milliseconds).
const FAIL_FAST: Duration = Duration::from_millis(2500);

static RUN: AtomicUsize = AtomicUsize::new(0);

/// A unique release per run, so that every successful run really takes the lock and runs CMD.
fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        RUN.fetch_add(1, Ordering::SeqCst)
    )
}

// ---------------------------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------------------------

/// A CA and a server certificate signed by it, in a directory the server can read.
struct Pki {
    dir: PathBuf,
    /// The CA certificate (what a client passes as `sslrootcert`).
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl Pki {
    /// `-c` settings that make a cluster present this certificate.
    fn server_settings(&self) -> Vec<String> {
        vec![
            "ssl=on".into(),
            format!("ssl_cert_file={}", self.cert.display()),
            format!("ssl_key_file={}", self.key.display()),
        ]
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = match Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "the `openssl` command-line tool is not installed, and these tests make their \
             certificates with it: install it (Debian/Ubuntu: apt-get install openssl; add \
             `openssl` to the apt installs in .ci/run)"
        ),
        Err(e) => panic!("cannot run openssl: {e}"),
    };
    assert!(
        out.status.success(),
        "openssl {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Makes a fresh CA named `ca_name` and a server certificate with `san` (e.g.
/// `DNS:localhost,IP:127.0.0.1`) signed by it. EC P-256 keys: fast to make, and both rustls and
/// PostgreSQL take them.
fn make_pki(ca_name: &str, cn: &str, san: &str) -> Pki {
    let dir = server_dir("mg-tls-pki");
    std::fs::write(
        dir.join("ca.cnf"),
        format!(
            "[req]\nprompt = no\ndistinguished_name = dn\nx509_extensions = v3_ca\n\
             [dn]\nCN = {ca_name}\n\
             [v3_ca]\nbasicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign,cRLSign\n\
             subjectKeyIdentifier = hash\n"
        ),
    )
    .expect("write ca.cnf");
    std::fs::write(
        dir.join("server.cnf"),
        format!(
            "[req]\nprompt = no\ndistinguished_name = dn\n[dn]\nCN = {cn}\n\
             [v3_server]\nbasicConstraints = critical,CA:FALSE\nkeyUsage = critical,digitalSignature\n\
             extendedKeyUsage = serverAuth\nsubjectAltName = {san}\n\
             subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid\n"
        ),
    )
    .expect("write server.cnf");
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca_args = vec!["req", "-x509", "-new", "-config", "ca.cnf", "-days", "3"];
    ca_args.extend(ec);
    ca_args.extend(["-keyout", "ca.key", "-out", "ca.crt"]);
    openssl(&dir, &ca_args);
    let mut csr_args = vec!["req", "-new", "-config", "server.cnf"];
    csr_args.extend(ec);
    csr_args.extend(["-keyout", "server.key", "-out", "server.csr"]);
    openssl(&dir, &csr_args);
    openssl(
        &dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-CAserial",
            "ca.srl",
            "-days",
            "3",
            "-extfile",
            "server.cnf",
            "-extensions",
            "v3_server",
            "-out",
            "server.crt",
        ],
    );
    // The server refuses a key file that others can read, or that is not its own.
    let key = dir.join("server.key");
    chmod_600(&key);
    chmod_600(&dir.join("ca.key"));
    give_to_postgres(&dir);
    Pki {
        ca: dir.join("ca.crt"),
        cert: dir.join("server.crt"),
        key,
        dir,
    }
}

/// A temp directory removed on drop (also when the test fails).
struct TempDir(PathBuf);

impl TempDir {
    fn new(prefix: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("{prefix}-{}", unique("d")));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn chmod_600(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod 600");
}

/// Starts a dedicated cluster presenting `pki`'s certificate, logging every connection (the log
/// line says whether the connection uses TLS).
fn tls_cluster(pki: &Pki) -> Cluster {
    let mut settings = pki.server_settings();
    settings.push("log_connections=on".into());
    let refs: Vec<&str> = settings.iter().map(String::as_str).collect();
    Cluster::start(&refs)
}

/// The good setup: CA 1, a server certificate for localhost / 127.0.0.1, and its cluster. Shared
/// by the tests of this binary, stopped when the binary exits.
struct Good {
    pki: Pki,
    cluster: Cluster,
}

static GOOD: OnceLock<Good> = OnceLock::new();

extern "C" fn stop_good_at_exit() {
    if let Some(g) = GOOD.get() {
        g.cluster.stop_immediate();
        let _ = std::fs::remove_dir_all(&g.cluster.dir);
        let _ = std::fs::remove_dir_all(&g.pki.dir);
    }
}

fn good() -> &'static Good {
    GOOD.get_or_init(|| {
        let pki = make_pki(
            "migrations-gate test CA",
            "localhost",
            "DNS:localhost,IP:127.0.0.1",
        );
        let cluster = tls_cluster(&pki);
        // SAFETY: registering a plain extern "C" function.
        unsafe {
            libc::atexit(stop_good_at_exit);
        }
        Good { pki, cluster }
    })
}

/// A second CA with a server certificate for another host. Not shared: only one test uses it.
fn wrong_host_pki() -> Pki {
    make_pki(
        "migrations-gate other test CA",
        "wrong.example",
        "DNS:wrong.example",
    )
}

// ---------------------------------------------------------------------------------------------
// Running the gate
// ---------------------------------------------------------------------------------------------

/// A gate with a clean environment (only PATH, and a HOME that does not exist, so that no
/// `~/.pgpass` of the machine takes part) plus `env`.
fn gate(env: &[(&str, &str)], args: &[&str]) -> Command {
    let mut c = Command::new(gate_bin());
    c.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        // A home without a `.pgpass` (it does not exist at all).
        .env("HOME", "/nonexistent/mg-tls-empty-home")
        .stdin(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    c.args(args);
    c
}

/// Runs a gate and returns its output and how long it took.
fn run(mut cmd: Command) -> (Output, Duration) {
    let started = Instant::now();
    let out = wait_output(spawn(&mut cmd), HANG_GUARD);
    (out, started.elapsed())
}

/// Asserts that none of `secrets` appears in the gate's stdout or stderr.
fn assert_no_secret(out: &Output, secrets: &[&str], what: &str) {
    let (o, e) = (stdout(out), stderr(out));
    for s in secrets {
        assert!(
            !o.contains(s) && !e.contains(s),
            "{what}: a password appeared in the output\n--- stdout\n{o}\n--- stderr\n{e}"
        );
    }
}

fn describe(out: &Output, took: Duration) -> String {
    format!(
        "exit {} after {took:?}\n--- stdout\n{}\n--- stderr\n{}",
        code(out),
        stdout(out),
        stderr(out)
    )
}

/// `postgres://postgres:PASSWORD@HOST:PORT/DB?QUERY`.
fn url(host: &str, port: u16, db: &str, query: &str) -> String {
    let mut u = format!("postgres://postgres:{PASSWORD}@{host}:{port}/{db}");
    if !query.is_empty() {
        u.push('?');
        u.push_str(query);
    }
    u
}

/// The "connection authorized" lines the server logged for `application_name`.
fn connection_lines(log: &str, application_name: &str) -> Vec<String> {
    let tag = format!("application_name={application_name}");
    log.lines()
        .filter(|l| l.contains("connection authorized:"))
        .filter(|l| {
            l.match_indices(&tag)
                .any(|(i, _)| matches!(l[i + tag.len()..].chars().next(), None | Some(' ')))
        })
        .map(String::from)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn sslmode_require_verify_ca_and_verify_full_connect_with_the_test_ca() {
    let g = good();
    let db = g.cluster.new_db("tls_modes");
    let ca = g.pki.ca.display().to_string();
    let port = g.cluster.port;
    let socket_dir = g.cluster.dir.display().to_string();
    // (application_name, host, query, whether the gate's connections must use TLS)
    let cases = [
        (
            "mgtls-require",
            "127.0.0.1",
            "sslmode=require".to_string(),
            true,
        ),
        (
            "mgtls-verifyca",
            "127.0.0.1",
            format!("sslmode=verify-ca&sslrootcert={ca}"),
            true,
        ),
        (
            "mgtls-verifyfull-ip",
            "127.0.0.1",
            format!("sslmode=verify-full&sslrootcert={ca}"),
            true,
        ),
        (
            "mgtls-verifyfull-name",
            "localhost",
            format!("sslmode=verify-full&sslrootcert={ca}"),
            true,
        ),
        (
            "mgtls-disable",
            "127.0.0.1",
            "sslmode=disable".to_string(),
            false,
        ),
    ];
    for (app, host, query, want_tls) in &cases {
        let u = url(host, port, &db.name, query);
        let release = unique("tls");
        // The migration command runs while the gate still holds its lock session: it asks the
        // server (over the Unix socket, trust auth) whether that session uses TLS.
        let check = format!(
            "SELECT 'tls-check ssl=' || coalesce(bool_and(s.ssl)::text, 'none') || ' sessions=' || count(*) \
             FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.application_name = '{app}'"
        );
        let port_s = port.to_string();
        let cmd = gate(
            &[("MIGRATIONS_GATE_DATABASE_URL", &u)],
            &[
                "migrate",
                "--release",
                &release,
                "--application-name",
                app,
                "--connect-timeout",
                "30s",
                "--",
                "psql",
                "-XAtq",
                "-h",
                &socket_dir,
                "-p",
                &port_s,
                "-U",
                "postgres",
                "-d",
                &db.name,
                "-c",
                &check,
            ],
        );
        let (out, took) = run(cmd);
        let what = format!("{app} ({query})");
        assert_eq!(
            code(&out),
            0,
            "{what} must connect: {}",
            describe(&out, took)
        );
        assert_no_secret(&out, &[PASSWORD], &what);
        assert_eq!(
            db.ledger().outcomes_at(&release),
            ["done"],
            "{what}: the release must be recorded done"
        );
        // 1. While the gate held its lock, its session used TLS (or not).
        let o = stdout(&out);
        let want = format!("tls-check ssl={want_tls} ");
        assert!(
            o.contains(&want),
            "{what}: the gate's lock session must {}use TLS; the migration command saw: {o:?}\n{}",
            if *want_tls { "" } else { "not " },
            describe(&out, took)
        );
        // 2. Every connection the gate opened, as the server logged it.
        let log = g.cluster.log();
        let lines = connection_lines(&log, app);
        assert!(
            !lines.is_empty(),
            "{what}: the server logged no connection of the gate (log_connections=on)"
        );
        for l in &lines {
            assert_eq!(
                l.contains(" SSL enabled (protocol="),
                *want_tls,
                "{what}: a connection of the gate {} TLS: {l}",
                if *want_tls { "did not use" } else { "used" }
            );
        }
    }
}

#[test]
fn verify_full_against_a_certificate_for_another_host_fails_clearly() {
    let pki = wrong_host_pki();
    let cluster = tls_cluster(&pki);
    let db = cluster.new_db("tls_wrong_host");
    let ca = pki.ca.display().to_string();

    // The chain is fine (verify-ca with its CA connects): what is wrong is the name only.
    let u = url(
        "127.0.0.1",
        cluster.port,
        &db.name,
        &format!("sslmode=verify-ca&sslrootcert={ca}"),
    );
    let release = unique("wrong-host-ok");
    let (out, took) = run(gate(
        &[("MIGRATIONS_GATE_DATABASE_URL", &u)],
        &["migrate", "--release", &release, "--", "true"],
    ));
    assert_eq!(
        code(&out),
        0,
        "verify-ca with the server's own CA must connect: {}",
        describe(&out, took)
    );
    assert_no_secret(&out, &[PASSWORD], "verify-ca (wrong-host cluster)");

    for host in ["127.0.0.1", "localhost"] {
        let u = url(
            host,
            cluster.port,
            &db.name,
            &format!("sslmode=verify-full&sslrootcert={ca}"),
        );
        let what = format!("verify-full to {host} against a certificate for wrong.example");
        assert_refused_for_tls(&u, "wrong-host", &what);
    }
    let refused_recorded: Vec<String> = db
        .ledger()
        .attempts()
        .into_iter()
        .filter_map(|a| a.release)
        .filter(|r| r.starts_with("wrong-host-") && !r.starts_with("wrong-host-ok"))
        .collect();
    assert_eq!(
        refused_recorded,
        Vec::<String>::new(),
        "a refused connection must not record anything"
    );
}

#[test]
fn verify_ca_with_an_unknown_ca_fails() {
    let g = good();
    let db = g.cluster.new_db("tls_unknown_ca");
    // A CA that did not sign the server's certificate.
    let other = wrong_host_pki();
    let cases = [
        (
            "sslrootcert is another CA",
            format!("sslmode=verify-ca&sslrootcert={}", other.ca.display()),
        ),
        (
            "no sslrootcert (public roots only)",
            "sslmode=verify-ca".to_string(),
        ),
    ];
    for (label, query) in &cases {
        let u = url("127.0.0.1", g.cluster.port, &db.name, query);
        assert_refused_for_tls(&u, "unknown-ca", &format!("verify-ca, {label}"));
    }
}

/// Runs `migrate --release PREFIX-… -- true` at `u` and asserts that it fails (69) as a TLS
/// failure should ([`assert_tls_failure`]), without printing the password.
fn assert_refused_for_tls(u: &str, prefix: &str, what: &str) {
    let release = unique(prefix);
    let (out, took) = run(gate(
        &[("MIGRATIONS_GATE_DATABASE_URL", u)],
        &[
            "migrate",
            "--release",
            &release,
            "--connect-timeout",
            CONNECT_TIMEOUT,
            "--",
            "true",
        ],
    ));
    assert_no_secret(&out, &[PASSWORD], what);
    assert_eq!(code(&out), 69, "{what}: {}", describe(&out, took));
    assert_tls_failure(&out, took, what);
}

/// A certificate problem: reported at once (not retried until --connect-timeout) with the
/// documented message, which names the URL without its password.
///
/// A TLS failure is final: rustls reports a rejected certificate as an `io::Error` wrapping a
/// `rustls::Error`, and the gate must not mistake it for a network problem and retry it.
fn assert_tls_failure(out: &Output, took: Duration, what: &str) {
    let e = stderr(out);
    assert!(
        took < FAIL_FAST,
        "{what}: a certificate problem must fail at once, not be retried until --connect-timeout \
         {CONNECT_TIMEOUT}: {}",
        describe(out, took)
    );
    assert!(
        e.contains("TLS connection to") && e.contains("check sslmode and sslrootcert"),
        "{what}: the message must say the TLS connection failed and point at sslmode/sslrootcert: {}",
        describe(out, took)
    );
    assert!(
        e.to_lowercase().contains("certificate"),
        "{what}: the message must say what is wrong with the certificate: {}",
        describe(out, took)
    );
    assert!(
        e.contains("postgres:***@"),
        "{what}: the message must name the URL, password redacted: {}",
        describe(out, took)
    );
}

#[test]
fn password_from_database_url_file_pgpassword_and_pgpassfile() {
    let c = cluster();
    // Every connection and refusal in the server log, with ms timestamps and PIDs, so that a
    // slow answer can be told apart from a client that never got through (see `server_tail`).
    for setting in ["log_connections = on", "log_line_prefix = '%m [%p] '"] {
        sql(&c.url("postgres"), &format!("ALTER SYSTEM SET {setting}"));
    }
    sql(&c.url("postgres"), "SELECT pg_reload_conf()");
    let server_tail = || {
        let log = c.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    };
    let db = c.new_db("secrets");
    let port = c.port;
    let with_pw = url("127.0.0.1", port, &db.name, "");
    let without_pw = format!("postgres://postgres@127.0.0.1:{port}/{}", db.name);
    const WRONG: &str = "not-the-pw-8d1f3a";
    let wrong_pw = with_pw.replace(PASSWORD, WRONG);

    let tmp = TempDir::new("mg-tls-secrets");
    let files = &tmp.0;
    let pgpass = files.join("pgpass");
    std::fs::write(&pgpass, format!("127.0.0.1:{port}:*:postgres:{PASSWORD}\n")).expect("pgpass");
    chmod_600(&pgpass);
    let url_file = files.join("database-url");
    std::fs::write(&url_file, format!("{with_pw}\n")).expect("url file");
    chmod_600(&url_file);
    let wrong_url_file = files.join("database-url-wrong");
    std::fs::write(&wrong_url_file, format!("{wrong_pw}\n")).expect("url file");
    chmod_600(&wrong_url_file);
    let pgpass_s = pgpass.display().to_string();
    let url_file_s = url_file.display().to_string();
    let wrong_url_file_s = wrong_url_file.display().to_string();

    struct Case<'a> {
        name: &'a str,
        env: Vec<(&'a str, &'a str)>,
        args: Vec<&'a str>,
        code: i32,
    }
    let cases = [
        Case {
            name: "URL without password + PGPASSWORD",
            env: vec![
                ("MIGRATIONS_GATE_DATABASE_URL", &without_pw),
                ("PGPASSWORD", PASSWORD),
            ],
            args: vec![],
            code: 0,
        },
        Case {
            name: "URL without password + PGPASSFILE",
            env: vec![
                ("MIGRATIONS_GATE_DATABASE_URL", &without_pw),
                ("PGPASSFILE", &pgpass_s),
            ],
            args: vec![],
            code: 0,
        },
        Case {
            name: "--database-url-file",
            env: vec![],
            args: vec!["--database-url-file", &url_file_s],
            code: 0,
        },
        Case {
            name: "--database-url with the password on the command line",
            env: vec![],
            args: vec!["--database-url", &with_pw],
            code: 0,
        },
        Case {
            name: "DATABASE_URL with the password",
            env: vec![("DATABASE_URL", &with_pw)],
            args: vec![],
            code: 0,
        },
        Case {
            name: "URL without password + wrong PGPASSWORD",
            env: vec![
                ("MIGRATIONS_GATE_DATABASE_URL", &without_pw),
                ("PGPASSWORD", WRONG),
            ],
            args: vec![],
            code: 77,
        },
        Case {
            name: "--database-url-file with a wrong password",
            env: vec![],
            args: vec!["--database-url-file", &wrong_url_file_s],
            code: 77,
        },
    ];
    let variants: [(&str, &[&str], Option<&str>); 4] = [
        ("text", &[], None),
        ("json", &["--log-format", "json"], None),
        ("text, debug", &[], Some("debug")),
        ("json, debug", &["--log-format", "json"], Some("debug")),
    ];
    for case in &cases {
        for (variant, flags, level) in &variants {
            let release = unique("pw");
            let marker = format!("ran-{release}");
            let mut env = case.env.clone();
            if let Some(level) = level {
                env.push(("MIGRATIONS_GATE_LOG", level));
            }
            let mut args = vec!["migrate", "--release", &release];
            args.extend(flags.iter());
            args.extend(case.args.iter());
            args.extend(["--connect-timeout", "10s", "--", "echo", &marker]);
            let (out, took) = run(gate(&env, &args));
            let what = format!("{} [{variant}]", case.name);
            assert_no_secret(&out, &[PASSWORD, WRONG], &what);
            assert_eq!(
                code(&out),
                case.code,
                "{what}: {}\n--- server log (tail)\n{}",
                describe(&out, took),
                server_tail()
            );
            if case.code == 0 {
                assert!(
                    stdout(&out).contains(&marker),
                    "{what}: the migration command must have run: {}",
                    describe(&out, took)
                );
            } else {
                assert!(
                    stderr(&out).contains("authentication refused"),
                    "{what}: the refusal must be explained: {}",
                    describe(&out, took)
                );
                assert!(
                    took < FAIL_FAST,
                    "{what}: a refused password must not be retried: {}",
                    describe(&out, took)
                );
            }
            if variant.starts_with("json") {
                for line in stderr(&out).lines().filter(|l| !l.trim().is_empty()) {
                    assert!(
                        serde_json::from_str::<serde_json::Value>(line).is_ok(),
                        "{what}: a stderr line is not JSON: {line}"
                    );
                }
            }
            if case.code == 0 && *level == Some("debug") {
                // Debug output really was on (the gate logs the child's start at debug), so the
                // check above covered it.
                assert!(
                    stderr(&out).contains("DEBUG")
                        || stderr(&out).contains("\"debug\"")
                        || stderr(&out).contains("\"DEBUG\""),
                    "{what}: MIGRATIONS_GATE_LOG=debug produced no debug line: {}",
                    describe(&out, took)
                );
            }
        }
    }
}

#[test]
fn a_missing_sslrootcert_file_is_a_usage_error_naming_the_path() {
    let out = std::process::Command::new(gate_bin())
        .args(["migrate", "--release", "r1", "--database-url"])
        .arg("postgres://u:pw-leak-2@127.0.0.1:1/db?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem")
        .args(["--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert_stderr_has(&out, "/nonexistent/ca.pem");
    assert!(!stderr(&out).contains("pw-leak-2"));
}
