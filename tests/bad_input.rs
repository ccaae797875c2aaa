//! Bad input, one table: every wrong flag, file, environment value, output stream and foreign
//! table gets its documented exit code and one line that says what to do, never a panic, a
//! hang or a raw server error.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;

/// One hostile input: what to run, and what must come of it.
struct Case {
    name: &'static str,
    /// Arguments after the binary.
    args: Vec<String>,
    /// Extra environment.
    env: Vec<(&'static str, String)>,
    /// Whether the test database's URL is left out of the environment (for a URL of its own).
    no_url: bool,
    /// Where standard output goes: `None` a pipe read to the end.
    stdout: Option<&'static str>,
    /// The exit code.
    code: i32,
    /// A part of the one line on stderr (empty: the code alone is the contract).
    says: &'static str,
}

fn case(name: &'static str, args: &[&str], code: i32, says: &'static str) -> Case {
    Case {
        name,
        args: args.iter().map(|a| a.to_string()).collect(),
        env: Vec::new(),
        no_url: false,
        stdout: None,
        code,
        says,
    }
}

impl Case {
    fn env(mut self, name: &'static str, value: &str) -> Case {
        self.env.push((name, value.to_string()));
        self
    }

    fn no_url(mut self) -> Case {
        self.no_url = true;
        self
    }

    fn stdout_to(mut self, path: &'static str) -> Case {
        self.stdout = Some(path);
        self
    }
}

fn scratch() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("mg-bad-input-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn every_bad_input_gets_its_code_and_one_line() {
    let db = cluster().new_db("bad_input");
    let dir = scratch();
    let fifo = dir.join("fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let two_lines = dir.join("two-lines");
    std::fs::write(&two_lines, format!("{}\nsecond line garbage\n", db.url)).unwrap();
    let script = |name: &str, text: &str, mode: u32| {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path.to_string_lossy().into_owned()
    };
    let junk = script("junk", "junk\n", 0o755);
    let no_interpreter = script("no-interpreter", "#!/nonexistent/sh\necho hi\n", 0o755);
    let no_x_bit = script("no-x-bit", "#!/bin/sh\n", 0o644);
    let a_directory = dir.to_string_lossy().into_owned();
    let fifo = fifo.to_string_lossy().into_owned();
    let two_lines = two_lines.to_string_lossy().into_owned();
    let long_schema = "s".repeat(64);
    let server = db.url.rsplit_once('/').unwrap().0.to_string();
    let nul_db = format!("{server}/app%00x");
    let nul_app = format!("{}?application_name=a%00b", db.url);

    let cases = vec![
        // Output that cannot be written.
        case(
            "completions to a full disk",
            &["completions", "bash"],
            74,
            "cannot write to standard output",
        )
        .stdout_to("/dev/full"),
        case(
            "--help to a full disk",
            &["--help"],
            74,
            "cannot write to standard output",
        )
        .stdout_to("/dev/full"),
        case(
            "status to a full disk",
            &["status"],
            74,
            "cannot write to standard output",
        )
        .stdout_to("/dev/full"),
        case(
            "check to a full disk",
            &["check"],
            74,
            "cannot write to standard output",
        )
        .stdout_to("/dev/full"),
        // Files that are no files, or too much.
        case(
            "a FIFO as --database-url-file",
            &["check", "--database-url-file", &fifo],
            64,
            "not a regular file (a FIFO)",
        )
        .no_url(),
        case(
            "/dev/zero as --database-url-file",
            &["check", "--database-url-file", "/dev/zero"],
            64,
            "a character device",
        )
        .no_url(),
        case(
            "a two-line URL file",
            &["check", "--database-url-file", &two_lines],
            64,
            "holds more than one line",
        )
        .no_url(),
        case(
            "/dev/zero as PGSERVICEFILE",
            &["check", "--database-url", "service=x"],
            64,
            "service file /dev/zero",
        )
        .env("PGSERVICEFILE", "/dev/zero"),
        // Names and values PostgreSQL would not take as given.
        case(
            "a system schema",
            &["migrate", "--schema", "information_schema", "--", "true"],
            64,
            "is a system schema",
        ),
        case(
            "a temporary schema",
            &["migrate", "--schema", "pg_temp", "--", "true"],
            64,
            "is a system schema",
        ),
        case(
            "a schema PostgreSQL would cut",
            &["migrate", "--schema", &long_schema, "--", "true"],
            64,
            "cuts names to 63 bytes",
        ),
        case(
            "a lock_timeout PostgreSQL cannot take",
            &["migrate", "--lock-timeout", "99999999999h", "--", "true"],
            64,
            "longer than a year",
        ),
        case(
            "a lock_timeout over PostgreSQL's",
            &["migrate", "--lock-timeout", "30d", "--", "true"],
            64,
            "2147483647 ms",
        ),
        case(
            "a wait nobody can wait out",
            &["migrate", "--wait-timeout", "99999999999h", "--", "true"],
            64,
            "longer than a year",
        ),
        case(
            "a port out of range",
            &["run", "--ready-tcp", "127.0.0.1:99999", "--", "true"],
            64,
            "a port from 1 to 65535",
        ),
        case(
            "--flag PATH",
            &["migrate", "--flag", "PATH", "--", "true"],
            64,
            "names a variable the child needs",
        ),
        case(
            "a NUL in the database name",
            &["check", "--database-url", &nul_db],
            64,
            "\"dbname\" contains a NUL byte",
        ),
        case(
            "a NUL in the application name",
            &["check", "--database-url", &nul_app],
            64,
            "\"application_name\" contains a NUL byte",
        ),
        case(
            "PGSSLMODE=bogus",
            &["check"],
            64,
            "PGSSLMODE is not a TLS mode",
        )
        .env("PGSSLMODE", "bogus"),
        case(
            "PGCONNECT_TIMEOUT=abc",
            &["check"],
            64,
            "PGCONNECT_TIMEOUT is not a whole number",
        )
        .env("PGCONNECT_TIMEOUT", "abc"),
        case(
            "/dev/zero as PGPASSFILE",
            &["check"],
            64,
            "password file /dev/zero",
        )
        .env("PGPASSFILE", "/dev/zero"),
        case(
            "--first-start-env without a probe",
            &[
                "run",
                "--migrate",
                "true",
                "--first-start-env",
                "W=1",
                "--",
                "true",
            ],
            64,
            "needs a readiness probe",
        ),
        case(
            "--first-start-env without =",
            &[
                "run",
                "--ready-sql",
                "select 1",
                "--first-start-env",
                "W",
                "--",
                "true",
            ],
            64,
            "is not NAME=VALUE",
        ),
        case(
            "an empty --app",
            &["migrate", "--app", " ", "--", "true"],
            64,
            "is not a name",
        ),
        // A table of someone else's where the ledger should be.
        case(
            "a foreign ledger table: migrate",
            &[
                "migrate",
                "--schema",
                "foreign_t",
                "--release",
                "r1",
                "--",
                "true",
            ],
            78,
            "not the shape the gate made",
        ),
        case(
            "a foreign ledger table: status",
            &["status", "--schema", "foreign_t"],
            78,
            "not the shape the gate made",
        ),
        case(
            "a foreign ledger table: wait",
            &["wait", "--schema", "foreign_t", "--release", "r1"],
            78,
            "not the shape the gate made",
        ),
        case(
            "a view where the ledger should be",
            &[
                "migrate",
                "--schema",
                "foreign_v",
                "--release",
                "r1",
                "--",
                "true",
            ],
            78,
            "pass --schema naming a schema of the gate's own",
        ),
        case(
            "a ledger row with infinite times",
            &["status", "--schema", "infinite"],
            0,
            "",
        ),
        // Commands that cannot run: the real reason, with the shell's codes.
        case(
            "a file that is no program",
            &["migrate", "--", &junk],
            126,
            "neither a program (ELF) nor a script",
        ),
        case(
            "a script whose interpreter is missing",
            &["migrate", "--", &no_interpreter],
            126,
            "its #! interpreter \"/nonexistent/sh\" is missing",
        ),
        case(
            "a file without the execute bit",
            &["migrate", "--", &no_x_bit],
            126,
            "no execute bit",
        ),
        case(
            "a directory as the command",
            &["migrate", "--", &a_directory],
            126,
            "it is a directory",
        ),
        // install where nothing can be written (sysfs refuses new files, even to root): the
        // command line was right, the filesystem is not.
        case(
            "install where nothing can be written",
            &["install", "/sys/kernel"],
            74,
            "cannot install into /sys/kernel",
        ),
        // reset of something that is not there.
        case(
            "reset of a lock never used",
            &["reset", "--lock", "nobody", "--release", "r1"],
            66,
            "nothing to reset",
        ),
    ];
    db.rows(
        "CREATE SCHEMA foreign_t; CREATE TABLE foreign_t.ledger (id int, name text); \
         CREATE SCHEMA foreign_v; CREATE VIEW foreign_v.ledger AS SELECT 1 AS id, 'x'::text AS lock_name; \
         CREATE SCHEMA infinite",
    );
    let ok = db.gate_output(&[
        "migrate",
        "--schema",
        "infinite",
        "--release",
        "r0",
        "--",
        "true",
    ]);
    assert_eq!(code(&ok), 0, "{}", stderr(&ok));
    db.rows("UPDATE infinite.ledger SET started_at = '-infinity', finished_at = 'infinity'");

    let mut failed = Vec::new();
    for c in &cases {
        let mut cmd = db.gate();
        if c.no_url {
            cmd.env_remove("MIGRATIONS_GATE_DATABASE_URL")
                .env_remove("DATABASE_URL");
        }
        cmd.args(&c.args)
            .envs(c.env.iter().map(|(k, v)| (*k, v.as_str())));
        match c.stdout {
            Some(path) => {
                cmd.stdout(std::fs::OpenOptions::new().write(true).open(path).unwrap());
            }
            None => {
                cmd.stdout(Stdio::piped());
            }
        }
        let out = wait_output(
            cmd.stderr(Stdio::piped()).spawn().unwrap(),
            Duration::from_secs(30),
        );
        let err = stderr(&out);
        let lines: Vec<&str> = err.lines().filter(|l| l.contains("ERROR")).collect();
        let said = c.says.is_empty() || err.contains(c.says);
        if code(&out) != c.code || !said || lines.len() > 1 || err.contains("panicked") {
            failed.push(format!(
                "{}: exit {} (want {}), stderr:\n{err}",
                c.name,
                code(&out),
                c.code
            ));
        }
        assert!(!err.contains(PASSWORD), "{}: the password leaked", c.name);
    }
    assert_eq!(db.ledger_in("infinite").times_done("r0"), 1);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        failed.is_empty(),
        "{} case(s) failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
}

/// A value in a text log line cannot start a line of its own.
#[test]
fn a_value_cannot_forge_a_log_line() {
    let db = cluster().new_db("bad_input_forge");
    let out = db.gate_output(&[
        "migrate",
        "--lock",
        "l\nforged line",
        "--release",
        "r1",
        "--",
        "true",
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("l\\nforged line"), "{err}");
    assert!(!err.lines().any(|l| l.starts_with("forged")), "{err}");
}

/// A closed pipe is a normal end for what the gate prints (`man | head -c1`).
#[test]
fn a_closed_pipe_is_a_normal_end() {
    for args in [["man", ""], ["completions", "bash"]] {
        let mut child = Command::new(gate_bin())
            .args(args.iter().filter(|a| !a.is_empty()))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = wait_output(child, Duration::from_secs(30));
        assert_eq!(code(&out), 0, "{args:?}: {}", stderr(&out));
    }
}
