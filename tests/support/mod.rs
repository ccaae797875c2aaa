//! Test support: one private PostgreSQL per test binary (initdb + pg_ctl on a free port in a
//! temp dir, stopped when the binary exits), a fresh database per test, and helpers to start
//! gates as real processes.

#![allow(dead_code)]

pub mod postgres;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sqlx::postgres::PgConnection;
use sqlx::{AssertSqlSafe, Connection, Row};

pub mod freezer;
pub mod ledger;
pub mod netns;
pub mod role;
mod standin_tables;

/// Password of the cluster's superuser `postgres` (password auth on TCP, so tests can refuse it).
pub const PASSWORD: &str = "s3cret-test-pw";

/// How long a test waits for a process or a condition before it fails instead of hanging: a
/// guard, not a timing assertion (a test that bounds a time asserts it itself).
pub const HANG_GUARD: Duration = Duration::from_secs(120);

/// The environment variable that lets a test whose environment is missing (iptables, a
/// network namespace) skip, with a printed line, instead of failing. Never set in CI.
pub const ALLOW_SKIP: &str = "MIGRATIONS_GATE_TEST_ALLOW_SKIP";

/// A test's environment: `Ok` runs the test; `Err(why)` fails it with one line, or, when
/// [`ALLOW_SKIP`] is `1`, prints `SKIPPED` and returns `false` so the test returns early.
#[track_caller]
pub fn environment_ready(test: &str, ready: Result<(), String>) -> bool {
    let Err(why) = ready else { return true };
    if std::env::var(ALLOW_SKIP).as_deref() == Ok("1") {
        eprintln!("SKIPPED {test}: {why} ({ALLOW_SKIP}=1)");
        return false;
    }
    panic!(
        "{test} cannot run here: {why}. .ci/run installs what it needs; to skip it knowingly, set {ALLOW_SKIP}=1"
    );
}

/// A PostgreSQL server private to this test binary.
pub struct Cluster {
    pub dir: PathBuf,
    pub port: u16,
    pub bindir: PathBuf,
    opts: String,
    /// Stop and remove the cluster on drop (dedicated clusters; the shared one stops at exit).
    owned: bool,
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();
static DB_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Where the default PostgreSQL server binaries are (see [`postgres`] for other versions).
pub fn pg_bindir() -> PathBuf {
    postgres::default_bindir()
}

fn is_root() -> bool {
    // SAFETY: plain system call.
    unsafe { libc::geteuid() == 0 }
}

/// Runs a PostgreSQL server binary, as the `postgres` user when we are root (initdb, pg_ctl and
/// pgbouncer refuse to run as root).
pub fn as_postgres(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// A fresh temp directory owned by the user that runs the servers.
pub fn server_dir(prefix: &str) -> PathBuf {
    let base = std::env::temp_dir();
    let dir = base.join(format!(
        "{prefix}-{}-{}",
        std::process::id(),
        DB_COUNTER.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create temp dir");
    give_to_postgres(&dir);
    dir
}

/// Hands `path` (recursively) to the `postgres` user when we are root, so the servers, which
/// then run as `postgres`, can read it.
pub fn give_to_postgres(path: &Path) {
    if is_root() {
        let st = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(path)
            .status()
            .expect("chown");
        assert!(st.success(), "chown of {} failed", path.display());
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

extern "C" fn stop_cluster_at_exit() {
    if let Some(c) = CLUSTER.get() {
        let _ = as_postgres(&c.bindir.join("pg_ctl"))
            .arg("-D")
            .arg(c.dir.join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&c.dir);
    }
}

/// The shared cluster, started on first use.
pub fn cluster() -> &'static Cluster {
    CLUSTER.get_or_init(|| {
        let mut c = Cluster::start(&[]);
        c.owned = false;
        // SAFETY: registering a plain extern "C" function.
        unsafe {
            libc::atexit(stop_cluster_at_exit);
        }
        c
    })
}

impl Cluster {
    /// initdb + pg_ctl start on a free port; `extra` are `-c name=value` settings.
    pub fn start(extra: &[&str]) -> Cluster {
        Cluster::start_with(pg_bindir(), extra)
    }

    /// [`Cluster::start`] with the server binaries in `bindir` (see [`postgres::bindir_for`]).
    pub fn start_with(bindir: PathBuf, extra: &[&str]) -> Cluster {
        let dir = server_dir("mg-pg");
        let data = dir.join("data");
        let pwfile = dir.join("pw");
        std::fs::write(&pwfile, PASSWORD).expect("write pwfile");
        give_to_postgres(&pwfile);
        let out = as_postgres(&bindir.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--no-sync",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()
            .expect("run initdb");
        assert_succeeded(&out, "initdb failed");
        let port = free_port();
        let mut opts = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300",
            dir.display()
        );
        for e in extra {
            opts.push_str(" -c ");
            opts.push_str(e);
        }
        let out = as_postgres(&bindir.join("pg_ctl"))
            .arg("-D")
            .arg(&data)
            .arg("-o")
            .arg(&opts)
            .arg("-l")
            .arg(dir.join("log"))
            .args(["-w", "-t", "60", "start"])
            .output()
            .expect("run pg_ctl");
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(dir.join("log")).unwrap_or_default()
        );
        Cluster {
            dir,
            port,
            bindir,
            opts,
            owned: true,
        }
    }

    fn pg_ctl(&self, args: &[&str]) -> Output {
        as_postgres(&self.bindir.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-o")
            .arg(&self.opts)
            .arg("-l")
            .arg(self.dir.join("log"))
            .args(args)
            .output()
            .expect("run pg_ctl")
    }

    /// Stops the server (fast shutdown: every session is terminated, as in a restart).
    pub fn stop_fast(&self) {
        let out = self.pg_ctl(&["-m", "fast", "-w", "stop"]);
        assert_succeeded(&out, "pg_ctl stop");
    }

    /// Starts the server again after [`Cluster::stop_fast`].
    pub fn start_again(&self) {
        let out = self.pg_ctl(&["-w", "-t", "60", "start"]);
        assert_succeeded(&out, "pg_ctl start");
    }

    /// A real hot standby of this cluster: `pg_basebackup -R -c fast` over streaming
    /// replication (as `postgres`, SCRAM over TCP as initdb's pg_hba allows), started with
    /// `hot_standby=on` on another free port. Stopped and removed on drop.
    pub fn standby(&self) -> Cluster {
        // Tests of one binary make standbys at once: one base backup at a time, and WAL kept
        // long enough that neither a backup nor a standby's stream finds its segment recycled.
        static BASEBACKUP: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one_at_a_time = BASEBACKUP.lock().unwrap_or_else(|e| e.into_inner());
        sql(
            &self.url("postgres"),
            "ALTER SYSTEM SET wal_keep_size = '512MB'",
        );
        sql(&self.url("postgres"), "SELECT pg_reload_conf()");
        let dir = server_dir("mg-standby");
        let port = free_port();
        // The primary's settings (max_connections among them: a hot standby needs at least the
        // primary's) on its own port and socket directory.
        let opts = self.opts.replacen(
            &format!("-p {} -k {}", self.port, self.dir.display()),
            &format!("-p {port} -k {}", dir.display()),
            1,
        ) + " -c hot_standby=on";
        // Owned from here on: a failed backup or start still removes the directory.
        let standby = Cluster {
            dir,
            port,
            bindir: self.bindir.clone(),
            opts,
            owned: true,
        };
        if self.bindir.join("pg_basebackup").exists() {
            let out = as_postgres(&self.bindir.join("pg_basebackup"))
                .arg("-D")
                .arg(standby.dir.join("data"))
                .args(["-R", "-c", "fast", "-X", "stream", "--no-sync"])
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    "postgres",
                ])
                .env("PGPASSWORD", PASSWORD)
                .output()
                .expect("run pg_basebackup");
            assert_succeeded(&out, "pg_basebackup failed");
        } else {
            postgres::copy_for_standby(
                &self.url("postgres"),
                &self.dir.join("data"),
                &standby.dir.join("data"),
                &format!(
                    "host=127.0.0.1 port={} user=postgres password={PASSWORD}",
                    self.port
                ),
            );
        }
        let out = standby.pg_ctl(&["-w", "-t", "60", "start"]);
        assert!(
            out.status.success(),
            "standby did not start: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            standby.log()
        );
        assert_eq!(
            sql(&standby.url("postgres"), "SELECT pg_is_in_recovery()::text")[0][0],
            "true",
            "the standby is not in recovery"
        );
        standby
    }

    /// Waits (hang guard `limit`) until `standby` has replayed everything written on this
    /// primary so far.
    pub fn wait_replayed(&self, standby: &Cluster, limit: Duration) {
        // The insert position: with synchronous_commit=off a commit may not be written yet.
        let lsn = sql(
            &self.url("postgres"),
            "SELECT pg_current_wal_insert_lsn()::text",
        )[0][0]
            .clone();
        let check = format!("SELECT (pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn)::text");
        eventually(limit, "the standby replayed the primary's WAL", || {
            sql(&standby.url("postgres"), &check)[0][0] == "true"
        });
    }

    /// Stops the server at once (like a crash).
    pub fn stop_immediate(&self) {
        let _ = as_postgres(&self.bindir.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }

    /// The server's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://postgres:{PASSWORD}@127.0.0.1:{}/{db}",
            self.port
        )
    }

    /// A fresh database for one test, with the stand-in app's bookkeeping tables.
    pub fn new_db(&self, name: &str) -> TestDb {
        let db = format!("{name}_{}", DB_COUNTER.fetch_add(1, Ordering::SeqCst));
        sql(&self.url("postgres"), &format!("CREATE DATABASE {db}"));
        let url = self.url(&db);
        let out = Command::new(standin())
            .arg("setup")
            .env("DATABASE_URL", &url)
            .output()
            .expect("run standin-app setup");
        assert_succeeded(&out, "setup failed");
        TestDb { url, name: db }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.owned {
            self.stop_immediate();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// One test's database.
pub struct TestDb {
    pub url: String,
    pub name: String,
}

impl TestDb {
    /// Runs SQL and returns every row as text.
    pub fn rows(&self, query: &str) -> Vec<Vec<String>> {
        sql(&self.url, query)
    }

    /// The first column of the first row.
    pub fn one(&self, query: &str) -> String {
        self.rows(query)
            .first()
            .and_then(|r| r.first().cloned())
            .unwrap_or_default()
    }

    /// A `migrations-gate` command aimed at this database.
    pub fn gate(&self) -> Command {
        let mut c = Command::new(gate_bin());
        c.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("MIGRATIONS_GATE_DATABASE_URL", &self.url)
            .env("DATABASE_URL", &self.url)
            .env("STANDIN_STEP_MS", "150")
            .stdin(Stdio::null());
        c
    }

    /// Runs `migrations-gate ARGS...` against this database to the end (no hang guard: for
    /// commands that do not wait on anything).
    pub fn gate_output(&self, args: &[&str]) -> Output {
        self.gate()
            .args(args)
            .output()
            .expect("run migrations-gate")
    }

    /// Asserts that no advisory lock of the gate's is left behind.
    pub fn assert_no_gate_locks(&self) {
        let n = self.one(
            "SELECT count(*) FROM pg_locks l WHERE l.locktype = 'advisory' AND l.objid <> 4242 \
             AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        );
        assert_eq!(n, "0", "advisory locks left behind");
    }
}

/// Runs `query` on `url` (simple protocol) and returns every row as text.
pub fn sql(url: &str, query: &str) -> Vec<Vec<String>> {
    try_sql(url, query).unwrap_or_else(|e| panic!("query failed: {query}: {e}"))
}

/// [`sql`] that says what failed instead of panicking (the server may be restarting).
pub fn try_sql(url: &str, query: &str) -> Result<Vec<Vec<String>>, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let mut conn = PgConnection::connect(url)
            .await
            .map_err(|e| format!("connect to test database: {e}"))?;
        let rows = sqlx::raw_sql(AssertSqlSafe(query.to_string()))
            .fetch_all(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        let out = rows
            .iter()
            .map(|r| {
                (0..r.len())
                    .map(|i| {
                        r.try_get_unchecked::<Option<String>, _>(i)
                            .ok()
                            .flatten()
                            .unwrap_or_default()
                    })
                    .collect()
            })
            .collect();
        let _ = conn.close().await;
        Ok(out)
    })
}

/// Takes the gate's advisory lock for lock name `name` (`--lock`; the default is
/// `migrations-gate`) on a session of the test's own at `url`, with the key derivation the README
/// gives. Returns the session, which holds the lock until dropped, and the key.
pub fn hold_lock(url: &str, name: &str) -> (Session, String) {
    let mut holder = Session::open(url);
    let key = holder.one(&format!(
        "SELECT ('x' || left(encode(sha256(convert_to('{name}', 'UTF8')), 'hex'), 16))::bit(64)::bigint"
    ));
    assert_eq!(
        holder.one(&format!("SELECT pg_try_advisory_lock({key})")),
        "t"
    );
    (holder, key)
}

/// A connection held by the test itself (e.g. to hold a lock), on its own runtime.
pub struct Session {
    rt: tokio::runtime::Runtime,
    conn: Option<PgConnection>,
}

impl Session {
    pub fn open(url: &str) -> Session {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let conn = rt.block_on(PgConnection::connect(url)).expect("connect");
        Session {
            rt,
            conn: Some(conn),
        }
    }

    pub fn one(&mut self, query: &str) -> String {
        let conn = self.conn.as_mut().expect("open session");
        self.rt.block_on(async {
            let rows = sqlx::raw_sql(AssertSqlSafe(query.to_string()))
                .fetch_all(conn)
                .await
                .unwrap_or_else(|e| panic!("query failed: {query}: {e}"));
            rows.first()
                .and_then(|r| r.try_get_unchecked::<Option<String>, _>(0).ok().flatten())
                .unwrap_or_default()
        })
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(c) = self.conn.take() {
            let _ = self.rt.block_on(c.close());
        }
    }
}

/// The arguments of `run --release RELEASE --migrate MIGRATE -- APP...`: a replica that migrates
/// with MIGRATE if it holds the lock, then starts APP.
pub fn run_args<'a>(release: &'a str, migrate: &'a str, app: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["run", "--release", release, "--migrate", migrate, "--"];
    args.extend_from_slice(app);
    args
}

/// The `migrations-gate` binary: Cargo tells integration tests where it is; examples (demo,
/// benchmark) look beside their own directory (`target/<profile>/examples/..`).
pub fn gate_bin() -> &'static str {
    static PATH: OnceLock<String> = OnceLock::new();
    binary(
        &PATH,
        option_env!("CARGO_BIN_EXE_migrations-gate"),
        "migrations-gate",
    )
}

/// The stand-in app (see `tests/support/standin_app.rs`): an example, so that `cargo install`
/// never installs it. `cargo test` builds it into `target/<profile>/examples`, beside the demo
/// and the benchmark; a test executable lives in `target/<profile>/deps`.
pub fn standin() -> &'static str {
    static PATH: OnceLock<String> = OnceLock::new();
    PATH.get_or_init(|| {
        let exe = std::env::current_exe().expect("current_exe");
        let profile = exe.parent().and_then(|d| d.parent()).expect("target dir");
        let path = profile.join("examples").join("standin-app");
        assert!(
            path.exists(),
            "{} not found: build it first (cargo build --examples, or cargo test builds it)",
            path.display()
        );
        path.to_string_lossy().into_owned()
    })
}

/// The path Cargo gave (`built`), else the binary `name` beside our own directory; found once.
fn binary(
    path: &'static OnceLock<String>,
    built: Option<&'static str>,
    name: &str,
) -> &'static str {
    path.get_or_init(|| built.map(String::from).unwrap_or_else(|| sibling(name)))
}

fn sibling(name: &str) -> String {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found: build the binaries first (cargo build --release --bins)",
        path.display()
    );
    path.to_string_lossy().into_owned()
}

/// The server's own `psql`.
pub fn psql() -> String {
    pg_bindir().join("psql").to_string_lossy().into_owned()
}

/// `psql URL -X -q -v ON_ERROR_STOP=1 -c SQL`: a migration command that fails on the first error.
pub fn psql_command(url: &str, sql: &str) -> Vec<String> {
    let mut argv = vec![psql(), url.to_string()];
    argv.extend(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", sql].map(String::from));
    argv
}

/// Waits for a child with a hang guard; kills it and panics if it does not finish.
pub fn wait_output(mut child: Child, limit: Duration) -> Output {
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return child.wait_with_output().expect("collect output"),
            Ok(None) if start.elapsed() < limit => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let out = child.wait_with_output().expect("collect output");
                panic!(
                    "process did not finish within {limit:?}; stderr:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
}

/// Asserts that a helper program exited 0; `what` leads the message, before its stderr.
#[track_caller]
pub fn assert_succeeded(out: &Output, what: &str) {
    assert!(out.status.success(), "{what}: {}", stderr(out));
}

/// Spawns `cmd` with captured output.
pub fn spawn(cmd: &mut Command) -> Child {
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn")
}

/// Polls `cond` until it holds or `limit` passes (a hang guard, not a timing assertion).
pub fn eventually(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Whether process `pid` exists (and is not a zombie).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .map(|rest| rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Asserts that the process's stderr contains `text`, showing the stderr when it does not.
#[track_caller]
pub fn assert_stderr_has(out: &Output, text: &str) {
    assert!(stderr(out).contains(text), "{}", stderr(out));
}

/// Asserts that the process's stdout contains `text`, showing the stdout when it does not.
#[track_caller]
pub fn assert_stdout_has(out: &Output, text: &str) {
    assert!(stdout(out).contains(text), "{}", stdout(out));
}

/// Asserts each process's exit code, showing its stderr when it is not the one expected.
#[track_caller]
pub fn assert_codes(outs: &[(&Output, i32)]) {
    for (out, want) in outs {
        assert_eq!(code(out), *want, "{}", stderr(out));
    }
}

/// Asserts that `text` contains every one of `parts`.
#[track_caller]
pub fn assert_mentions(text: &str, parts: &[&str]) {
    for part in parts {
        assert!(text.contains(part), "missing {part:?} in:\n{text}");
    }
}

/// The exit code, or -1 when the process was killed by a signal.
pub fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

/// Starts every command at once and collects their outputs, each with the hang guard `limit`.
pub fn run_all(mut cmds: Vec<Command>, limit: Duration) -> Vec<Output> {
    wait_all(cmds.iter_mut().map(spawn).collect(), limit)
}

/// Waits for every child in turn, each with the hang guard `limit`; their outputs in order.
pub fn wait_all(children: Vec<Child>, limit: Duration) -> Vec<Output> {
    children
        .into_iter()
        .map(|c| wait_output(c, limit))
        .collect()
}

/// Asserts that no two finished migration runs overlapped in time and none saw another running.
pub fn assert_no_overlap(db: &TestDb) {
    assert_eq!(
        db.one("SELECT count(*) FROM mg_runs WHERE overlapped"),
        "0",
        "two migrators ran at once"
    );
    let overlaps = db.one(
        "SELECT count(*) FROM mg_runs a JOIN mg_runs b ON a.id < b.id \
         WHERE a.finished_at IS NOT NULL AND b.finished_at IS NOT NULL \
         AND tstzrange(a.started_at, a.finished_at) && tstzrange(b.started_at, b.finished_at)",
    );
    assert_eq!(overlaps, "0", "migration intervals intersect");
}

/// Whether this process runs as root (needed for iptables).
pub fn running_as_root() -> bool {
    is_root()
}

/// iptables rules that silently drop the packets of one loopback TCP connection, removed on
/// drop (also when the test fails). Traffic never leaves loopback: the rules only match `lo`.
pub struct Partition {
    rules: Vec<Vec<String>>,
}

impl Partition {
    /// Drops both directions of the connection between `client_port` and `server_port`.
    pub fn cut(client_port: u16, server_port: u16) -> Partition {
        let tag = format!("mg-test-{}", std::process::id());
        let rules: Vec<Vec<String>> = [(client_port, server_port), (server_port, client_port)]
            .iter()
            .map(|(sport, dport)| {
                vec![
                    "INPUT".into(),
                    "-i".into(),
                    "lo".into(),
                    "-p".into(),
                    "tcp".into(),
                    "--sport".into(),
                    sport.to_string(),
                    "--dport".into(),
                    dport.to_string(),
                    "-m".into(),
                    "comment".into(),
                    "--comment".into(),
                    tag.clone(),
                    "-j".into(),
                    "DROP".into(),
                ]
            })
            .collect();
        let mut p = Partition { rules: Vec::new() };
        for rule in rules {
            let st = Command::new("iptables")
                .arg("-w")
                .arg("-I")
                .args(&rule)
                .status()
                .expect("run iptables");
            assert!(st.success(), "iptables -I failed");
            p.rules.push(rule);
        }
        p
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        for rule in self.rules.drain(..) {
            let _ = Command::new("iptables")
                .arg("-w")
                .arg("-D")
                .args(&rule)
                .status();
        }
    }
}

/// A PgBouncer in front of a cluster, stopped on drop.
pub struct PgBouncer {
    pub port: u16,
    /// The address it listens on.
    pub addr: String,
    dir: PathBuf,
    child: Child,
}

impl PgBouncer {
    /// Starts PgBouncer with `pool_mode` (`session` or `transaction`) in front of `cluster`,
    /// with at most `pool_size` server connections per database and user (`default_pool_size`;
    /// PgBouncer's own default is 20). Every other setting, `query_wait_timeout` included, keeps
    /// PgBouncer's default.
    pub fn start(cluster: &Cluster, pool_mode: &str, pool_size: u32) -> PgBouncer {
        let at = Listen {
            addr: "127.0.0.1".into(),
            port: free_port(),
            server: format!("host=127.0.0.1 port={}", cluster.port),
            netns: None,
        };
        PgBouncer::start_at(&at, pool_mode, pool_size)
    }

    /// [`PgBouncer::start`] listening where `at` says (in a network namespace, if it names one).
    pub fn start_at(at: &Listen, pool_mode: &str, pool_size: u32) -> PgBouncer {
        let dir = server_dir("mg-bouncer");
        let port = at.port;
        let ini = format!(
            "[databases]\n* = {server}\n\n[pgbouncer]\nlisten_addr = {addr}\nlisten_port = {port}\n\
             unix_socket_dir =\nauth_type = scram-sha-256\nauth_file = {dir}/userlist.txt\npool_mode = {pool_mode}\n\
             max_client_conn = 2000\ndefault_pool_size = {pool_size}\nignore_startup_parameters = extra_float_digits\n\
             logfile = {dir}/pgbouncer.log\nserver_reset_query = DISCARD ALL\n",
            server = at.server,
            addr = at.addr,
            dir = dir.display()
        );
        std::fs::write(dir.join("pgbouncer.ini"), ini).expect("write pgbouncer.ini");
        std::fs::write(
            dir.join("userlist.txt"),
            format!("\"postgres\" \"{PASSWORD}\"\n"),
        )
        .expect("write userlist");
        give_to_postgres(&dir);
        let program = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .expect("pgbouncer not found: install `pgbouncer` (see .ci/run)");
        let mut cmd = match &at.netns {
            None => as_postgres(&program),
            Some(ns) => {
                // `ip netns exec` execs runuser, which forwards SIGTERM to pgbouncer.
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "runuser", "-u", "postgres", "--"])
                    .arg(&program);
                c
            }
        };
        let child = cmd
            .arg(dir.join("pgbouncer.ini"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start pgbouncer");
        let bouncer = PgBouncer {
            port,
            addr: at.addr.clone(),
            dir,
            child,
        };
        let start = Instant::now();
        while std::net::TcpStream::connect((at.addr.as_str(), port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "pgbouncer did not start: {}",
                bouncer.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        bouncer
    }

    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://postgres:{PASSWORD}@{}:{}/{db}",
            self.addr, self.port
        )
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
    }
}

/// Where a [`PgBouncer`] listens and what it forwards to.
pub struct Listen {
    /// Its listening address.
    pub addr: String,
    /// Its listening port.
    pub port: u16,
    /// Its `[databases]` connection string to the server (`host=... port=...`).
    pub server: String,
    /// The network namespace it runs in, if not ours.
    pub netns: Option<String>,
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        // runuser forwards SIGTERM to pgbouncer and waits for it.
        // SAFETY: plain system call on a PID we started.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
