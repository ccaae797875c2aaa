//! Real migration tools behind the gate: Alembic (SQLAlchemy + psycopg2) and Django's `migrate`,
//! run as many replicas at once against a real PostgreSQL.
//!
//! The projects are in `tests/python/`; the tools come from a venv at `$MG_PY_VENV` (default
//! `<repo>/target/py-venv`), which `tests/python/setup-venv` makes on first use (a fast no-op
//! once it is there). A venv that cannot be made fails these tests; they are never skipped.
//!
//! The real Open WebUI (`--preset open-webui`) runs from its own venv, `$MG_OWUI_VENV` (default
//! `<repo>/target/owui-venv`, from `tests/python/open-webui-requirements.txt`: about 7 GB), and
//! the older release of the upgrade tests from its own, `$MG_OWUI_OLD` (default
//! `<repo>/target/owui-old`, from `tests/python/open-webui-old-requirements.txt`).

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

use support::*;

/// The hang guard for real Python tools, longer than the shared one: eight interpreters import
/// SQLAlchemy or Django at once, and Open WebUI is a large application.
const PYTHON_HANG_GUARD: Duration = Duration::from_secs(180);
const REPLICAS: usize = 8;
/// Alembic's last revision (release R2 in the rolling upgrade) and the one before it (R1).
const HEAD: &str = "0004_color";
const R1_REV: &str = "0003_seed";

fn py_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python")
}

/// Runs `tests/python/setup-venv` for the venv at `$VAR` (default `<repo>/DEFAULT`), with the
/// extra settings `env`; `what` and `needs` complete its failure message. Returns the venv's
/// directory.
fn setup_venv(
    var: &str,
    default: &str,
    env: &[(&str, PathBuf)],
    what: &str,
    needs: &str,
) -> PathBuf {
    let dir = std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(default));
    let script = py_dir().join("setup-venv");
    let out = Command::new("bash")
        .arg(&script)
        .env("MG_PY_VENV", &dir)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{}{what} failed ({}); {needs}:\n{}\n{}",
        script.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

/// The venv with Alembic and Django, made by `tests/python/setup-venv` when missing or stale.
fn venv() -> &'static Path {
    static VENV: OnceLock<PathBuf> = OnceLock::new();
    VENV.get_or_init(|| {
        let dir = setup_venv(
            "MG_PY_VENV",
            "target/py-venv",
            &[],
            "",
            "these tests need Python 3.10+ with venv and pip, and PyPI",
        );
        for tool in ["bin/python", "bin/alembic"] {
            assert!(
                dir.join(tool).exists(),
                "{} has no {tool} after setup",
                dir.display()
            );
        }
        dir
    })
}

fn python() -> String {
    path_str(&venv().join("bin/python"))
}

fn path_str(p: &Path) -> String {
    p.to_str().expect("UTF-8 path").to_string()
}

/// `alembic -c <ini> upgrade <target>` as argv.
fn alembic_upgrade(target: &str) -> Vec<String> {
    vec![
        path_str(&venv().join("bin/alembic")),
        "-c".into(),
        path_str(&py_dir().join("alembic_app/alembic.ini")),
        "upgrade".into(),
        target.into(),
    ]
}

/// `python manage.py migrate --noinput` as argv.
fn django_migrate() -> Vec<String> {
    vec![
        python(),
        path_str(&py_dir().join("django_app/manage.py")),
        "migrate".into(),
        "--noinput".into(),
    ]
}

/// Quotes argv for `--migrate` (split shell-style by the gate; no shell runs it).
fn shell_join(argv: &[String]) -> String {
    argv.iter()
        .map(|a| format!("'{}'", a.replace('\'', r"'\''")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A file each run of Alembic or Django appends one line to (env.py / manage.py write it).
struct RunLog(PathBuf);

impl RunLog {
    fn new(test: &str) -> RunLog {
        let p = std::env::temp_dir().join(format!("mg-pytools-{}-{test}.log", std::process::id()));
        let _ = std::fs::remove_file(&p);
        RunLog(p)
    }

    fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.0)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn assert_every_bare_run_started(&self) {
        assert_eq!(
            self.lines().len(),
            REPLICAS,
            "every bare run should have started"
        );
    }
}

impl Drop for RunLog {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A fresh database `py_NAME` and run log `NAME` for one test.
fn fresh(name: &str) -> (TestDb, RunLog) {
    (cluster().new_db(&format!("py_{name}")), RunLog::new(name))
}

/// Environment for the Python tools, on top of what `TestDb::gate` sets (DATABASE_URL).
fn py_env(c: &mut Command, log: &RunLog) {
    c.env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1")
        .env("MG_TOOL_RUN_LOG", &log.0);
}

/// `migrations-gate migrate --release R -- CMD...` for one replica.
fn gate_migrate(db: &TestDb, log: &RunLog, release: &str, cmd: &[String]) -> Command {
    let mut c = db.gate();
    py_env(&mut c, log);
    c.args(["migrate", "--release", release, "--"]).args(cmd);
    c
}

/// `n` gated `migrate --release RELEASE -- CMD...` replicas started at once; their outputs.
fn migrate_all(db: &TestDb, log: &RunLog, n: usize, release: &str, cmd: &[String]) -> Vec<Output> {
    run_all(
        (0..n)
            .map(|_| gate_migrate(db, log, release, cmd))
            .collect(),
        PYTHON_HANG_GUARD,
    )
}

/// `REPLICAS` bare runs of `cmd` at once (no gate), with one extra setting `env`.
fn bare_all(db: &TestDb, log: &RunLog, cmd: &[String], env: (&str, &str)) -> Vec<Output> {
    let cmds = (0..REPLICAS)
        .map(|_| {
            let mut c = Command::new(&cmd[0]);
            c.args(&cmd[1..])
                .env_clear()
                .env("PATH", std::env::var_os("PATH").unwrap_or_default())
                .env("DATABASE_URL", &db.url)
                .env(env.0, env.1);
            py_env(&mut c, log);
            c
        })
        .collect();
    run_all(cmds, PYTHON_HANG_GUARD)
}

/// How many runs failed, and the last line naming an error of each, for the race report.
fn failures(outs: &[Output]) -> (usize, Vec<String>) {
    let failed = outs.iter().filter(|o| !o.status.success()).count();
    let why = outs
        .iter()
        .filter(|o| !o.status.success())
        .filter_map(|o| {
            stderr(o)
                .lines()
                .rev()
                .find(|l| l.contains("Error"))
                .map(str::to_string)
        })
        .collect();
    (failed, why)
}

/// Asserts the tool's run log has exactly one line; `what` reads "alembic ran" and the like.
fn assert_one_run(log: &RunLog, what: &str) {
    assert_eq!(
        log.lines().len(),
        1,
        "{what} more than once: {:?}",
        log.lines()
    );
}

/// Asserts Alembic's version is `HEAD` and the seed revision ran once.
fn assert_alembic_at_head(db: &TestDb) {
    assert_eq!(alembic_version(db), HEAD);
    assert_eq!(
        widgets_named(db, "seed"),
        "1",
        "the seed revision ran twice"
    );
}

fn assert_all_ok(outs: &[Output]) {
    for (i, out) in outs.iter().enumerate() {
        assert!(
            out.status.success(),
            "replica {i} failed ({}):\n{}",
            out.status,
            stderr(out)
        );
    }
}

fn followers(outs: &[Output]) -> usize {
    outs.iter()
        .filter(|o| stderr(o).contains("release is done"))
        .count()
}

/// The outcomes of `release`'s attempts, oldest first, joined by commas.
fn ledger(db: &TestDb, release: &str) -> String {
    db.ledger().outcomes_at(release).join(",")
}

fn alembic_version(db: &TestDb) -> String {
    db.one("SELECT coalesce(string_agg(version_num, ','), '') FROM alembic_version")
}

fn widgets_named(db: &TestDb, name: &str) -> String {
    db.one(&format!(
        "SELECT count(*) FROM widgets WHERE name = '{name}'"
    ))
}

#[test]
fn eight_gated_alembic_upgrades_migrate_exactly_once() {
    let (db, log) = fresh("alembic");
    let outs = migrate_all(&db, &log, REPLICAS, "R", &alembic_upgrade("head"));
    assert_all_ok(&outs);
    assert_one_run(&log, "alembic ran");
    assert_eq!(followers(&outs), REPLICAS - 1);
    assert_alembic_at_head(&db);
    assert_eq!(widgets_named(&db, "r2-seed"), "1");
    assert_eq!(ledger(&db, "R"), "done");
    db.assert_no_gate_locks();
}

#[test]
fn eight_run_gates_with_alembic_start_every_app_with_the_flag_off_after_one_migration() {
    let (db, log) = fresh("alembic_run");
    db.one(
        "CREATE TABLE py_app_starts (id serial PRIMARY KEY, pid int NOT NULL, flag text, \
         alembic_version text, at timestamptz NOT NULL DEFAULT clock_timestamp())",
    );
    let migrate = shell_join(&alembic_upgrade("head"));
    let app = path_str(&py_dir().join("record_start.py"));
    let cmds = (0..REPLICAS)
        .map(|_| {
            let mut c = db.gate();
            py_env(&mut c, &log);
            c.args(["run", "--release", "R", "--migrate", &migrate, "--"])
                .arg(python())
                .arg(&app);
            c
        })
        .collect();
    let outs = run_all(cmds, PYTHON_HANG_GUARD);
    assert_all_ok(&outs);
    assert_one_run(&log, "alembic ran");
    assert_eq!(followers(&outs), REPLICAS - 1);
    assert_alembic_at_head(&db);
    assert_eq!(ledger(&db, "R"), "done");
    assert_eq!(
        db.one("SELECT count(*) FROM py_app_starts"),
        REPLICAS.to_string(),
        "every replica's app must start"
    );
    assert_eq!(
        db.one(&format!(
            "SELECT count(*) FROM py_app_starts WHERE flag = 'False' AND alembic_version = '{HEAD}'"
        )),
        REPLICAS.to_string(),
        "every app must start with the flag off on the migrated schema: {:?}",
        db.rows("SELECT pid::text, flag, alembic_version FROM py_app_starts")
    );
    db.assert_no_gate_locks();
}

#[test]
fn without_the_gate_concurrent_alembic_upgrades_really_race() {
    // Proves the tests above exercise a real race: eight bare `alembic upgrade head` at once on
    // a fresh database break (a crash on a table, index or version row another run made, or a
    // seed row inserted twice).
    let (db, log) = fresh("alembic_bare");
    // A longer slow revision: every run is past its start-up while the first is in it.
    let slow = ("ALEMBIC_SLOW_SECONDS", "3");
    let (failed, why) = failures(&bare_all(&db, &log, &alembic_upgrade("head"), slow));
    let seeds = db.one(
        "SELECT CASE WHEN to_regclass('widgets') IS NULL THEN 'no table' \
         ELSE (SELECT count(*) FROM widgets WHERE name = 'seed')::text END",
    );
    eprintln!("bare alembic: {failed} of {REPLICAS} failed, seed rows {seeds}; errors: {why:#?}");
    log.assert_every_bare_run_started();
    assert!(
        failed > 0 || seeds != "1",
        "bare concurrent alembic upgrades did not visibly race (failed {failed}, seed rows {seeds})"
    );
}

#[test]
fn eight_gated_django_migrates_apply_each_migration_once() {
    let (db, log) = fresh("django");
    let outs = migrate_all(&db, &log, REPLICAS, "R", &django_migrate());
    assert_all_ok(&outs);
    assert_one_run(&log, "manage.py migrate ran");
    assert_eq!(followers(&outs), REPLICAS - 1);
    assert_eq!(
        db.rows(
            "SELECT app, name, count(*)::text FROM django_migrations GROUP BY app, name \
             HAVING count(*) > 1"
        ),
        Vec::<Vec<String>>::new(),
        "a migration was recorded more than once"
    );
    assert_eq!(
        db.one(
            "SELECT string_agg(name, ',' ORDER BY name) FROM django_migrations WHERE app = 'inventory'"
        ),
        "0001_initial,0002_seed"
    );
    assert_ne!(
        db.one("SELECT count(*) FROM django_migrations WHERE app IN ('auth', 'contenttypes')"),
        "0",
        "Django's own apps should be migrated too"
    );
    assert_eq!(
        db.one("SELECT count(*) FROM inventory_item WHERE name = 'seed'"),
        "1",
        "the data migration ran twice"
    );
    assert_eq!(ledger(&db, "R"), "done");
    db.assert_no_gate_locks();
}

#[test]
fn rolling_upgrade_r2_migrates_once_while_r1_restarts_skip() {
    let (db, log) = fresh("rolling");
    let r1 = alembic_upgrade(R1_REV);
    let r2 = alembic_upgrade("head");

    // Release R1 is deployed: migrated up to the revision before R2's.
    let outs = migrate_all(&db, &log, 4, "R1", &r1);
    assert_all_ok(&outs);
    assert_one_run(&log, "R1 migrated");
    assert_eq!(alembic_version(&db), R1_REV);
    assert_eq!(ledger(&db, "R1"), "done");
    assert_eq!(widgets_named(&db, "seed"), "1");
    assert_eq!(
        db.one(
            "SELECT count(*) FROM information_schema.columns \
             WHERE table_name = 'widgets' AND column_name = 'color'"
        ),
        "0",
        "R2's column must not exist yet"
    );

    // Rolling upgrade: four R2 replicas start while four R1 replicas restart, interleaved.
    let log2 = RunLog::new("rolling_r2");
    let mut cmds = Vec::new();
    for _ in 0..4 {
        cmds.push(gate_migrate(&db, &log2, "R2", &r2));
        // R2's migrations are backward compatible (expand/contract), so R1 replicas may start
        // once R2 is done: the deliberate opt-out of the older-release refusal.
        let mut old = gate_migrate(&db, &log2, "R1", &r1);
        old.env("MIGRATIONS_GATE_ALLOW_OLDER_RELEASE", "true");
        cmds.push(old);
    }
    let outs = run_all(cmds, PYTHON_HANG_GUARD);
    assert_all_ok(&outs);
    let runs = log2.lines();
    assert_eq!(runs.len(), 1, "exactly one migration should run: {runs:?}");
    assert!(
        runs[0].ends_with("upgrade head"),
        "the one migration must be R2's: {runs:?}"
    );
    for (i, out) in outs.iter().enumerate().filter(|(i, _)| i % 2 == 1) {
        assert!(
            stderr(out).contains("release is done"),
            "R1 restart {i} should have skipped:\n{}",
            stderr(out)
        );
    }
    assert_eq!(
        followers(&outs),
        7,
        "all but R2's one holder go on as followers"
    );
    assert_eq!(
        ledger(&db, "R1"),
        "done",
        "R1 restarts must not make new attempts"
    );
    assert_eq!(ledger(&db, "R2"), "done");
    assert_eq!(alembic_version(&db), HEAD);
    assert_eq!(widgets_named(&db, "seed"), "1");
    assert_eq!(
        widgets_named(&db, "r2-seed"),
        "1",
        "R2's revision ran twice"
    );
    db.assert_no_gate_locks();
}

#[test]
fn without_the_gate_concurrent_django_migrates_really_race() {
    // The same proof for Django: eight bare `manage.py migrate` at once on a fresh database
    // break (a crash on a table another run made, or a migration recorded or applied twice).
    let (db, log) = fresh("django_bare");
    let slow = ("DJANGO_SEED_SLEEP_SECONDS", "2");
    let (failed, why) = failures(&bare_all(&db, &log, &django_migrate(), slow));
    let exists =
        |t: &str| db.one(&format!("SELECT (to_regclass('{t}') IS NOT NULL)::text")) == "true";
    let twice = if exists("django_migrations") {
        db.one(
            "SELECT count(*) FROM (SELECT 1 FROM django_migrations GROUP BY app, name \
             HAVING count(*) > 1) d",
        )
    } else {
        "no table".into()
    };
    let seeds = if exists("inventory_item") {
        db.one("SELECT count(*) FROM inventory_item WHERE name = 'seed'")
    } else {
        "no table".into()
    };
    eprintln!(
        "bare django: {failed} of {REPLICAS} failed, migrations recorded twice {twice}, \
         seed rows {seeds}; errors: {why:#?}"
    );
    log.assert_every_bare_run_started();
    assert!(
        failed > 0 || twice != "0" || seeds != "1",
        "bare concurrent Django migrates did not visibly race (failed {failed}, \
         recorded twice {twice}, seed rows {seeds})"
    );
}

/// The venv with the real Open WebUI, made by `tests/python/setup-venv` when missing or stale.
fn owui_venv() -> &'static Path {
    static VENV: OnceLock<PathBuf> = OnceLock::new();
    VENV.get_or_init(|| {
        setup_venv(
            "MG_OWUI_VENV",
            "target/owui-venv",
            &[
                (
                    "MG_PY_REQUIREMENTS",
                    py_dir().join("open-webui-requirements.txt"),
                ),
                ("MG_PY_CHECK", PathBuf::from("import open_webui")),
            ],
            " (Open WebUI)",
            "it needs Python 3.11 with venv and pip, PyPI and about 7 GB",
        )
    })
}

/// The status code of `GET http://127.0.0.1:{port}{path}`, if anything answers.
fn http_status(port: u16, path: &str) -> Option<u16> {
    http_status_within(port, path, Duration::from_secs(5))
}

/// [`http_status`], waiting at most `limit` for the answer.
fn http_status_within(port: u16, path: &str, limit: Duration) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(limit)).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// An Open WebUI release, each in its own venv.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owui {
    /// 0.12.4 (`tests/python/open-webui-requirements.txt`).
    Current,
    /// 0.11.0 (`tests/python/open-webui-old-requirements.txt`): eleven Alembic revisions and 37
    /// config keys behind.
    Old,
}

/// Alembic's head of each release (Open WebUI's `migrations/versions`).
const OWUI_HEAD: &str = "0bd252b206fb";
const OWUI_OLD_HEAD: &str = "f0bd01a18a3d";

impl Owui {
    /// The gate's `--release` for it.
    fn release(self) -> &'static str {
        match self {
            Owui::Current => "owui-0.12.4",
            Owui::Old => "owui-0.11.0",
        }
    }

    /// Its venv.
    fn venv(self) -> &'static Path {
        match self {
            Owui::Current => owui_venv(),
            Owui::Old => owui_old(),
        }
    }

    fn python(self) -> String {
        path_str(&self.venv().join("bin/python"))
    }

    /// The environment that runs it, from its venv. `FROM_INIT_PY=true` is what `open-webui
    /// serve` sets for itself: with it, `import open_webui.config` finds the frontend inside the
    /// installed package. Without it, 0.12 raises "Static asset source directory not found"
    /// after migrating (0.11 went on without the static files), so a pip install's `--migrate`
    /// step needs it too; the image's layout (`/app/build`) does not.
    fn env(self, c: &mut Command, secret: &str, data: &Path) {
        c.env(
            "PATH",
            format!(
                "{}:{}",
                self.venv().join("bin").display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .env("HOME", data)
        .env("DATA_DIR", data)
        .env("FROM_INIT_PY", "true")
        .env("WEBUI_SECRET_KEY", secret)
        .env("OFFLINE_MODE", "true")
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", data.join("hf"))
        .env("ENABLE_OLLAMA_API", "false")
        .env("ENABLE_OPENAI_API", "false")
        .env("ENABLE_VERSION_UPDATE_CHECK", "false")
        .env("SCARF_NO_ANALYTICS", "true")
        .env("DO_NOT_TRACK", "true")
        .env("ANONYMIZED_TELEMETRY", "false")
        .env("PYTHONDONTWRITEBYTECODE", "1");
    }

    /// Open WebUI's migration as the recipe runs it (`import open_webui.config` runs Alembic).
    fn migrate_command(self) -> String {
        format!("{} -c 'import open_webui.config'", self.python())
    }

    /// `open-webui serve` on 127.0.0.1:`port`, as argv.
    fn serve(self, port: u16) -> Vec<String> {
        let mut argv = vec![path_str(&self.venv().join("bin/open-webui"))];
        argv.extend(
            ["serve", "--host", "127.0.0.1", "--port", &port.to_string()].map(String::from),
        );
        argv
    }

    /// The config keys this release seeds at start-up: its `DEFAULT_CONFIG`, less those its
    /// database does not keep (`Config.persistent_enabled_for`), read from the release itself.
    /// `data` is a scratch `DATA_DIR` (the import makes folders in it).
    fn seeded_config_keys(self, data: &Path) -> Vec<String> {
        let script = "import open_webui.config as c; from open_webui.models.config import Config; \
                      print('\\n'.join('KEY ' + k for k in c.DEFAULT_CONFIG \
                      if Config.persistent_enabled_for(k)))";
        std::fs::create_dir_all(data).unwrap();
        let mut cmd = Command::new(self.python());
        cmd.env_clear();
        self.env(&mut cmd, "key-unused", data);
        let out = cmd
            .env("ENABLE_DB_MIGRATIONS", "False")
            .args(["-c", script])
            .output()
            .expect("run the venv's python");
        assert!(
            out.status.success(),
            "reading DEFAULT_CONFIG failed: {}",
            stderr(&out)
        );
        let keys: Vec<String> = stdout(&out)
            .lines()
            .filter_map(|l| l.strip_prefix("KEY "))
            .map(str::to_string)
            .collect();
        assert!(keys.len() > 100, "too few config keys: {keys:?}");
        keys
    }
}

/// The older Open WebUI release's venv, made by `tests/python/setup-venv` (as
/// `tests/python/setup-owui-old` would) when missing or stale.
fn owui_old() -> &'static Path {
    static VENV: OnceLock<PathBuf> = OnceLock::new();
    VENV.get_or_init(|| {
        setup_venv(
            "MG_OWUI_OLD",
            "target/owui-old",
            &[
                (
                    "MG_PY_REQUIREMENTS",
                    py_dir().join("open-webui-old-requirements.txt"),
                ),
                ("MG_PY_CHECK", PathBuf::from("import open_webui")),
            ],
            " (the older Open WebUI)",
            "it needs Python 3.11 with venv and pip, PyPI and about 7 GB",
        )
    })
}

/// One Open WebUI replica behind the gate, as the README's recipe runs it (`open-webui serve`
/// stands in for the image's `start.sh`), with its own data directory and port.
fn open_webui_replica(db: &TestDb, name: &str, secret: &str, port: u16, data: &Path) -> Command {
    open_webui_gate(db, Owui::Current, name, secret, port, data)
}

/// [`open_webui_replica`] of release `owui`.
fn open_webui_gate(
    db: &TestDb,
    owui: Owui,
    name: &str,
    secret: &str,
    port: u16,
    data: &Path,
) -> Command {
    let mut c = db.gate();
    owui.env(&mut c, secret, data);
    c.env(
        "DATABASE_URL",
        db.url.replacen("postgres://", "postgresql://", 1),
    )
    .args([
        "run",
        "--release",
        owui.release(),
        "--application-name",
        name,
        "--preset",
        "open-webui",
        "--migrate",
        &owui.migrate_command(),
        "--ready-http",
        &format!("http://127.0.0.1:{port}/health"),
        "--ready-timeout",
        "600s",
        "--",
    ])
    .args(owui.serve(port));
    c
}

/// Waits until the replica's Open WebUI answers `/health` with 200 (hang guard 10 minutes);
/// panics with its output if it exits first.
fn wait_serving(replica: &mut std::process::Child, port: u16, what: &str) {
    let started = std::time::Instant::now();
    while http_status(port, "/health") != Some(200) {
        if let Ok(Some(status)) = replica.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = replica.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut err);
            }
            panic!("{what} exited ({status}) before serving:\n{err}");
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "{what}: Open WebUI did not answer /health within 10 minutes"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Spawns `cmd` with its stdout and stderr going to the file `log`: Open WebUI logs every
/// request, which would fill a pipe nobody reads while it serves.
fn spawn_logged(cmd: &mut Command, log: &Path) -> std::process::Child {
    let file = std::fs::File::create(log).unwrap();
    cmd.stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .expect("spawn")
}

/// Stops a replica like Kubernetes would: SIGTERM to the gate, forwarded to Open WebUI.
fn stop(replica: std::process::Child) -> Output {
    // SAFETY: plain kill(2) on our own child.
    unsafe {
        libc::kill(replica.id() as i32, libc::SIGTERM);
    }
    wait_output(replica, PYTHON_HANG_GUARD)
}

#[test]
fn open_webui_replica_with_another_secret_key_refuses_with_78_and_the_first_keeps_serving() {
    let db = cluster().new_db("py_owui");
    let tmp = std::env::temp_dir().join(format!("mg-owui-{}", std::process::id()));
    // One DATA_DIR shared by both replicas, as Open WebUI's Scaling & HA guide asks (an RWX
    // volume): the preset checks it.
    let data1 = tmp.join("data");
    let data2 = data1.clone();
    std::fs::create_dir_all(&data1).unwrap();
    let (port1, port2) = (free_port(), free_port());

    // Replica 1 migrates, starts Open WebUI, keeps the lock until /health answers, then serves.
    let mut first = spawn(&mut open_webui_replica(
        &db,
        "owui-1",
        "key-one-5e1f0b",
        port1,
        &data1,
    ));
    wait_serving(&mut first, port1, "replica 1");
    eventually(Duration::from_secs(60), "the release recorded done", || {
        ledger(&db, Owui::Current.release()) == "done"
    });

    // Replica 2 has another WEBUI_SECRET_KEY: it must not start Open WebUI.
    let second = wait_output(
        spawn(&mut open_webui_replica(
            &db,
            "owui-2",
            "key-two-93ac44",
            port2,
            &data2,
        )),
        PYTHON_HANG_GUARD,
    );

    assert_eq!(
        ledger(&db, Owui::Current.release()),
        "done",
        "one attempt, by replica 1"
    );
    assert_eq!(
        db.env_checks()
            .into_iter()
            .filter(|c| c.variable == "WEBUI_SECRET_KEY")
            .map(|c| (c.replica, c.agrees))
            .collect::<Vec<_>>(),
        [("owui-1".to_string(), true), ("owui-2".into(), false)]
    );
    assert_eq!(
        db.env_checks()
            .into_iter()
            .filter(|c| c.variable == "shared-dir")
            .map(|c| (c.replica, c.agrees))
            .collect::<Vec<_>>(),
        [("owui-1".to_string(), true), ("owui-2".into(), true)],
        "both replicas see the marker in their shared DATA_DIR"
    );
    assert_ne!(
        db.one("SELECT count(*) FROM information_schema.tables WHERE table_name = 'config'"),
        "0",
        "Open WebUI's own tables exist"
    );
    assert_eq!(code(&second), 78, "{}", stderr(&second));
    assert_eq!(
        http_status(port2, "/health"),
        None,
        "replica 2 never served"
    );
    assert_eq!(
        http_status(port1, "/health"),
        Some(200),
        "replica 1 keeps serving"
    );
    assert!(
        first.try_wait().unwrap().is_none(),
        "replica 1 is still running"
    );
    let line = stderr(&second);
    assert!(
        line.contains(&format!(
            "WEBUI_SECRET_KEY differs from the value release \"{}\" first started with (on owui-1 at",
            Owui::Current.release()
        )),
        "{line}"
    );
    assert!(line.contains("login loops"), "{line}");
    assert!(!line.contains("key-one-5e1f0b") && !line.contains("key-two-93ac44"));

    // Stop replica 1 like Kubernetes would: SIGTERM to the gate, forwarded to Open WebUI.
    let out = stop(first);
    let log = stderr(&out);
    assert!(!log.contains("key-one-5e1f0b"), "never the key");
    let _ = std::fs::remove_dir_all(&tmp);
}

/// The password of the role the `DATABASE_*` parts name: characters Open WebUI puts into its URL
/// unencoded and SQLAlchemy still reads as the password.
const PARTS_PASSWORD: &str = "Pa/ss:w?rd#9";

#[test]
fn open_webui_preset_migrates_the_database_open_webuis_own_database_parts_name() {
    // Open WebUI's DATABASE_TYPE/USER/PASSWORD/HOST/PORT/NAME alone (database A), and together
    // with a DATABASE_URL that names database B (they name C): Open WebUI migrates the one they
    // name, and so must the gate lock and record that one. `migrate` runs Open WebUI's own
    // migration (`import open_webui.config`), which finds its database from the same variables.
    let a = cluster().new_db("py_owui_parts");
    let b = cluster().new_db("py_owui_url");
    let c = cluster().new_db("py_owui_parts_over_url");
    a.one(&format!(
        "CREATE ROLE owui_parts LOGIN PASSWORD '{PARTS_PASSWORD}'"
    ));
    for db in [&a, &c] {
        a.one(&format!("ALTER DATABASE {} OWNER TO owui_parts", db.name));
    }
    let tmp = std::env::temp_dir().join(format!("mg-owui-parts-{}", std::process::id()));
    let gate = |name: &str, parts_db: &TestDb, url: Option<&TestDb>| {
        let data = tmp.join(name);
        std::fs::create_dir_all(&data).unwrap();
        let mut cmd = parts_db.gate();
        Owui::Current.env(&mut cmd, "key-parts-71c2", &data);
        cmd.env_remove("MIGRATIONS_GATE_DATABASE_URL")
            .env_remove("DATABASE_URL")
            .env("DATABASE_TYPE", "postgres")
            .env("DATABASE_USER", "owui_parts")
            .env("DATABASE_PASSWORD", PARTS_PASSWORD)
            .env("DATABASE_HOST", "127.0.0.1")
            .env("DATABASE_PORT", cluster().port.to_string())
            .env("DATABASE_NAME", &parts_db.name);
        if let Some(url) = url {
            cmd.env(
                "DATABASE_URL",
                url.url.replacen("postgres://", "postgresql://", 1),
            );
        }
        cmd.args([
            "migrate",
            "--release",
            Owui::Current.release(),
            "--application-name",
            name,
            "--preset",
            "open-webui",
            "--",
            &path_str(&owui_venv().join("bin/python")),
            "-c",
            "import open_webui.config",
        ]);
        spawn(&mut cmd)
    };
    let started = std::time::Instant::now();
    let alone = gate("parts-alone", &a, None);
    let over_url = gate("parts-over-url", &c, Some(&b));
    let outs = wait_all(vec![alone, over_url], Duration::from_secs(600));
    eprintln!(
        "two Open WebUI migrations through the gate took {:?}",
        started.elapsed()
    );

    // The database first: Open WebUI's schema and the gate's ledger are in A and C, made by the
    // role the parts name, and nothing of either is in B.
    for (db, what) in [(&a, "the parts alone"), (&c, "the parts over DATABASE_URL")] {
        assert_eq!(
            alembic_version(db),
            OWUI_HEAD,
            "{what}: Open WebUI migrated"
        );
        assert_eq!(
            db.one("SELECT tableowner FROM pg_tables WHERE tablename = 'config'"),
            "owui_parts",
            "{what}: Open WebUI connected with the parts' user"
        );
        assert_eq!(
            ledger(db, Owui::Current.release()),
            "done",
            "{what}: the gate's ledger is in the same database"
        );
        assert_eq!(
            db.one(
                "SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'migrations_gate'"
            ),
            "owui_parts",
            "{what}: the gate connected with the parts' user and password"
        );
    }
    assert_eq!(
        b.one(
            "SELECT (to_regclass('alembic_version') IS NULL \
             AND to_regnamespace('migrations_gate') IS NULL)::text"
        ),
        "true",
        "the database DATABASE_URL names must be untouched: the parts win"
    );

    // Then the exit codes and what the gate said.
    for out in &outs {
        assert_eq!(code(out), 0, "{}", stderr(out));
        let log = stderr(out);
        assert!(
            log.contains("database from Open WebUI's DATABASE_TYPE, DATABASE_USER"),
            "{log}"
        );
        assert!(!log.contains(PARTS_PASSWORD), "never the password: {log}");
    }
    // The role owns A and C; it goes with the test binary's cluster.
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn open_webui_upgrade_migrates_only_after_the_old_release_stopped_and_refuses_it_afterwards() {
    // Open WebUI 0.11.0 serves on the database; 0.12.4 starts through the gate with the preset's
    // strict policy (--other-releases fail): refused while 0.11.0 is connected, migrates once it
    // stopped; then 0.11.0 cannot start again on the migrated schema.
    let db = cluster().new_db("py_owui_upgrade");
    let data = std::env::temp_dir().join(format!("mg-owui-upgrade-{}", std::process::id()));
    std::fs::create_dir_all(&data).unwrap();
    let secret = "key-upgrade-3b9d1e";
    let (old, new) = (Owui::Old.release(), Owui::Current.release());
    let (port_old, port_new) = (free_port(), free_port());
    let replica = |owui: Owui, name: &str, port: u16| {
        spawn(&mut open_webui_gate(&db, owui, name, secret, port, &data))
    };
    // The replicas that serve write to files: Open WebUI logs every request, which would fill
    // a pipe nobody reads while they serve.
    let serving = |owui: Owui, name: &str, port: u16| {
        let log = data.join(format!("{name}.log"));
        let child = spawn_logged(
            &mut open_webui_gate(&db, owui, name, secret, port, &data),
            &log,
        );
        (child, log)
    };
    // Sessions of apps the gate started (their application_name is the gate's tag).
    let tagged =
        || db.one("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'mgate:%'");
    let started = std::time::Instant::now();

    // 0.11.0 migrates a fresh database and serves.
    let (mut r1, r1_log) = serving(Owui::Old, "owui-old-1", port_old);
    wait_serving(
        &mut r1,
        port_old,
        &format!("Open WebUI 0.11.0 (log: {})", r1_log.display()),
    );
    eventually(Duration::from_secs(60), "0.11.0 recorded done", || {
        ledger(&db, old) == "done"
    });
    assert_eq!(alembic_version(&db), OWUI_OLD_HEAD);
    eventually(
        Duration::from_secs(60),
        "0.11.0's sessions, tagged by the gate",
        || tagged() != "0",
    );
    let serving_old = started.elapsed();

    // 0.12.4 while 0.11.0 is connected: refused before it migrates.
    let refused = wait_output(
        replica(Owui::Current, "owui-new-1", port_new),
        PYTHON_HANG_GUARD,
    );
    assert_eq!(
        alembic_version(&db),
        OWUI_OLD_HEAD,
        "nothing migrated under the old release"
    );
    assert_eq!(ledger(&db, new), "failed", "the refusal is recorded");
    assert_eq!(
        http_status(port_new, "/health"),
        None,
        "0.12.4 never served"
    );
    assert_eq!(
        http_status(port_old, "/health"),
        Some(200),
        "0.11.0 still serves"
    );
    assert_eq!(code(&refused), 78, "{}", stderr(&refused));
    assert_stderr_has(
        &refused,
        &format!(
            "refusing to migrate release \"{new}\" while apps of another release are connected (release \"{old}\""
        ),
    );

    // 0.11.0 stops; 0.12.4 starts again: it migrates to its head and serves.
    stop(r1);
    let r1_said = std::fs::read_to_string(&r1_log).unwrap();
    assert!(!r1_said.contains(secret), "never the key");
    eventually(Duration::from_secs(30), "0.11.0's sessions gone", || {
        tagged() == "0"
    });
    let (mut r2, r2_log) = serving(Owui::Current, "owui-new-2", port_new);
    wait_serving(
        &mut r2,
        port_new,
        &format!("Open WebUI 0.12.4 (log: {})", r2_log.display()),
    );
    eventually(Duration::from_secs(60), "0.12.4 recorded done", || {
        ledger(&db, new) == "failed,done"
    });
    assert_eq!(alembic_version(&db), OWUI_HEAD);

    // 0.11.0 again: the older-release refusal, and the schema stays 0.12.4's.
    let again = wait_output(
        replica(Owui::Old, "owui-old-2", port_old),
        PYTHON_HANG_GUARD,
    );
    assert_eq!(alembic_version(&db), OWUI_HEAD);
    assert_eq!(ledger(&db, old), "done", "no new attempt at 0.11.0");
    assert_eq!(
        http_status(port_old, "/health"),
        None,
        "0.11.0 never served again"
    );
    assert_eq!(code(&again), 78, "{}", stderr(&again));
    assert_stderr_has(
        &again,
        &format!("release \"{old}\" is older than release \"{new}\""),
    );
    assert_eq!(
        http_status(port_new, "/health"),
        Some(200),
        "0.12.4 keeps serving"
    );

    stop(r2);
    eprintln!(
        "upgrade: 0.11.0 served after {serving_old:?}, the whole test took {:?}",
        started.elapsed()
    );
    db.assert_no_gate_locks();
    let _ = std::fs::remove_dir_all(&data);
}

/// A server the test runs as its child for Open WebUI's checklist (Redis, Chroma), on a free
/// loopback port, its output in a file; stopped by its PID when dropped (SIGTERM, then SIGKILL
/// after 10 s).
struct Daemon {
    child: std::process::Child,
    port: u16,
}

impl Daemon {
    /// Starts `cmd` and waits until `answers(port)` (hang guard 60 s); panics with its log if it
    /// cannot start or exits first. `what` names it and how to install it.
    fn start(
        what: &str,
        cmd: &mut Command,
        port: u16,
        log: &Path,
        answers: impl Fn(u16) -> bool,
    ) -> Daemon {
        let file = std::fs::File::create(log).unwrap();
        let child = cmd
            .stdin(std::process::Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let mut daemon = Daemon { child, port };
        let started = std::time::Instant::now();
        while !answers(port) {
            let said = || std::fs::read_to_string(log).unwrap_or_default();
            if let Ok(Some(status)) = daemon.child.try_wait() {
                panic!(
                    "{what} exited ({status}) before answering on port {port}:\n{}",
                    said()
                );
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "{what} did not answer on port {port} within 60 s:\n{}",
                said()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        daemon
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(10));
    }
}

/// Stops our child as a platform would: SIGTERM, then SIGKILL after `grace`; its exit status.
/// A child that already exited is only reaped: its PID is never signalled once it could have
/// been reused.
fn stop_child(child: &mut std::process::Child, grace: Duration) -> std::process::ExitStatus {
    if let Ok(Some(status)) = child.try_wait() {
        return status;
    }
    // SAFETY: plain kill(2) on our own, unreaped child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let started = std::time::Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return status;
        }
        if started.elapsed() > grace {
            let _ = child.kill();
            return child.wait().expect("wait");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether a Redis answers `PING` on 127.0.0.1:`port`.
fn redis_answers(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let mut pong = [0u8; 7];
    s.set_read_timeout(Some(Duration::from_secs(2))).is_ok()
        && s.write_all(b"PING\r\n").is_ok()
        && s.read_exact(&mut pong).is_ok()
        && &pong == b"+PONG\r\n"
}

/// Open WebUI's checklist for several replicas, as the guide gives it: a Redis for websockets
/// and config sync (`WEBSOCKET_MANAGER=redis`, `REDIS_URL`), Chroma over HTTP (`VECTOR_DB=chroma`,
/// `CHROMA_HTTP_HOST`, `CHROMA_HTTP_PORT`) and `UVICORN_WORKERS=2`; [`Owui::env`] adds the one
/// `WEBUI_SECRET_KEY` and the one shared `DATA_DIR`. Its Redis (Debian's `redis-server`) and
/// Chroma (the Open WebUI venv's `chroma run`) stop when it is dropped.
struct Checklist {
    redis: Daemon,
    chroma: Daemon,
}

impl Checklist {
    /// Starts its Redis and Chroma, their files in `dir`.
    fn start(dir: &Path) -> Checklist {
        let port = free_port();
        let redis = Daemon::start(
            "redis-server (Debian: apt-get install redis-server)",
            Command::new("redis-server")
                .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
                .args(["--save", "", "--appendonly", "no", "--dir"])
                .arg(dir),
            port,
            &dir.join("redis.log"),
            redis_answers,
        );
        let port = free_port();
        let chroma = Daemon::start(
            "chroma run (the Open WebUI venv's chromadb)",
            Command::new(owui_venv().join("bin/chroma"))
                .args([
                    "run",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    &port.to_string(),
                    "--path",
                ])
                .arg(dir.join("chroma"))
                .env("ANONYMIZED_TELEMETRY", "False"),
            port,
            &dir.join("chroma.log"),
            |port| http_status(port, "/api/v2/heartbeat") == Some(200),
        );
        Checklist { redis, chroma }
    }

    fn env(&self, c: &mut Command) {
        c.env("UVICORN_WORKERS", "2")
            .env("ENABLE_WEBSOCKET_SUPPORT", "true")
            .env("WEBSOCKET_MANAGER", "redis")
            .env(
                "REDIS_URL",
                format!("redis://127.0.0.1:{}/0", self.redis.port),
            )
            .env("VECTOR_DB", "chroma")
            .env("CHROMA_HTTP_HOST", "127.0.0.1")
            .env("CHROMA_HTTP_PORT", self.chroma.port.to_string());
    }
}

/// One replica of [`checklist_replicas`]: the gate, then the app it execs, logging to `log`.
struct LoggedReplica {
    name: String,
    port: u16,
    child: std::process::Child,
    log: PathBuf,
}

impl LoggedReplica {
    fn said(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops it like Kubernetes would (SIGTERM to the gate or the app it exec'd; SIGKILL after
    /// 60 s); its exit status.
    fn stop(&mut self) -> std::process::ExitStatus {
        stop_child(&mut self.child, Duration::from_secs(60))
    }
}

impl Drop for LoggedReplica {
    /// A test that failed midway still stops its replicas.
    fn drop(&mut self) {
        self.stop();
    }
}

/// Three replicas of `owui` on the `checklist` started at once, as `open_webui_gate` runs them:
/// named `NAME-1` to `NAME-3`, each with its own port and its log in `dir`, sharing `data`.
fn checklist_replicas(
    db: &TestDb,
    owui: Owui,
    checklist: &Checklist,
    name: &str,
    dir: &Path,
    data: &Path,
) -> Vec<LoggedReplica> {
    (1..=3)
        .map(|i| {
            let name = format!("{name}-{i}");
            let port = free_port();
            let log = dir.join(format!("{name}.log"));
            let mut gate = open_webui_gate(db, owui, &name, CHECKLIST_SECRET, port, data);
            checklist.env(&mut gate);
            let child = spawn_logged(&mut gate, &log);
            LoggedReplica {
                name,
                port,
                child,
                log,
            }
        })
        .collect()
}

const CHECKLIST_SECRET: &str = "key-checklist-4d7a90";

/// Waits until every replica answers `/health` with 200 at once (hang guard 10 minutes),
/// polling them in turn; panics with the log of one that exits first. Returns when, since
/// `since`, each began to answer for the last time (for the holder: the app as configured, not
/// its first start, which is stopped within a second of being ready).
fn wait_all_serving(replicas: &mut [LoggedReplica], since: std::time::Instant) -> Vec<Duration> {
    let mut up = vec![None; replicas.len()];
    loop {
        for (i, r) in replicas.iter_mut().enumerate() {
            let now = http_status_within(r.port, "/health", Duration::from_millis(500));
            match (now == Some(200), up[i]) {
                (true, None) => up[i] = Some(since.elapsed()),
                (false, Some(_)) => up[i] = None,
                _ => {}
            }
            if let Ok(Some(status)) = r.child.try_wait() {
                panic!(
                    "{} exited ({status}) before serving (log: {}):\n{}",
                    r.name,
                    r.log.display(),
                    r.said()
                );
            }
        }
        if let Some(up) = up.iter().copied().collect::<Option<Vec<_>>>() {
            return up;
        }
        assert!(
            since.elapsed() < Duration::from_secs(600),
            "not every replica answered /health within 10 minutes (logs in {})",
            replicas[0].log.parent().unwrap().display()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// What a start-up race leaves in Open WebUI's log (issue 29): a worker's write that lost to
/// another's, a migration that met another's table, a worker that gave up.
const START_UP_RACE_SIGNS: [&str; 4] = [
    "UniqueViolation",
    "DuplicateTable",
    "already exists",
    "Application startup failed",
];

/// Asserts that no replica's log shows a sign of a start-up race; names every line that does.
fn assert_no_start_up_race(replicas: &[LoggedReplica]) {
    let found: Vec<String> = replicas
        .iter()
        .flat_map(|r| {
            r.said()
                .lines()
                .filter(|l| START_UP_RACE_SIGNS.iter().any(|s| l.contains(s)))
                .map(|l| format!("{} ({}): {l}", r.name, r.log.display()))
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(
        found.is_empty(),
        "a start-up race in Open WebUI's logs:\n{}",
        found.join("\n")
    );
}

/// `keys` as an SQL list of string literals.
fn sql_list(keys: &[String]) -> String {
    keys.iter()
        .map(|k| format!("'{}'", k.replace('\'', "''")))
        .collect::<Vec<_>>()
        .join(",")
}

/// Asserts that Open WebUI's `config` table holds each of `keys` once; `what` names them.
fn assert_config_keys_once(db: &TestDb, keys: &[String], what: &str) {
    let present: Vec<String> = db
        .rows(&format!(
            "SELECT key FROM config WHERE key IN ({}) ORDER BY key",
            sql_list(keys)
        ))
        .into_iter()
        .map(|r| r[0].clone())
        .collect();
    let missing: Vec<&String> = keys.iter().filter(|k| !present.contains(k)).collect();
    assert!(
        missing.is_empty(),
        "{what} config keys missing: {missing:?}"
    );
    assert_eq!(present.len(), keys.len(), "{what} config keys, each once");
}

/// The replicas that took the lock (`holders`) and that went on after the release was done.
fn roles(replicas: &[LoggedReplica]) -> (Vec<usize>, usize) {
    let holders = (0..replicas.len())
        .filter(|&i| {
            replicas[i]
                .said()
                .contains("lock taken; this replica migrates")
        })
        .collect();
    let followers = replicas
        .iter()
        .filter(|r| r.said().contains("release is done"))
        .count();
    (holders, followers)
}

/// The gate's line once the holder's first start is ready, before it stops it.
const FIRST_START_READY: &str = "the first start (--first-start-env) is ready";

/// Asserts every replica still runs and answers `/health`, one held the lock and two followed,
/// and the holder's first start ran one uvicorn process (uvicorn says "Started server process"
/// once per process, and "Started parent process" only with several workers), was stopped and
/// the app started as configured. Returns that holder's index.
fn assert_one_holder_started_once_with_one_worker(replicas: &mut [LoggedReplica]) -> usize {
    for r in replicas.iter_mut() {
        assert!(
            r.child.try_wait().unwrap().is_none(),
            "{} exited:\n{}",
            r.name,
            r.said()
        );
        assert_eq!(
            http_status(r.port, "/health"),
            Some(200),
            "{} serves",
            r.name
        );
    }
    let (holders, followers) = roles(replicas);
    assert_eq!(holders.len(), 1, "one replica migrates: {holders:?}");
    assert_eq!(followers, 2, "the two others follow");
    let holder = &replicas[holders[0]];
    let said = holder.said();
    let (first, then) = said.split_once(FIRST_START_READY).unwrap_or_else(|| {
        panic!(
            "{}'s gate must run a first start (log: {})",
            holder.name,
            holder.log.display()
        )
    });
    assert_eq!(
        (
            first.matches("Started server process").count(),
            first.matches("Started parent process").count()
        ),
        (1, 0),
        "the first start runs one uvicorn process (log: {})",
        holder.log.display()
    );
    assert!(
        then.contains("the first start stopped; starting the app as configured")
            && then.contains("Started parent process"),
        "then the app as configured, with its two workers (log: {})",
        holder.log.display()
    );
    holders[0]
}

/// Seconds since the Unix epoch of `t`.
fn epoch(t: std::time::SystemTime) -> f64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Prints how long the start took and what the holder's first start cost: from the release
/// recorded done (the first start ready; the ledger's `finished_at`) to the holder serving the
/// app as configured. `since` is when the replicas were started, `up` from [`wait_all_serving`].
fn report_start(
    what: &str,
    db: &TestDb,
    owui: Owui,
    (replicas, holder): (&[LoggedReplica], usize),
    since: std::time::SystemTime,
    up: &[Duration],
) {
    let done: f64 = db
        .one(&format!(
            "SELECT extract(epoch FROM finished_at)::text FROM migrations_gate.ledger \
             WHERE release = '{}' AND outcome = 'done'",
            owui.release()
        ))
        .parse()
        .expect("the done attempt's finished_at");
    let serving = epoch(since) + up[holder].as_secs_f64();
    let gate_said = |key: &str| {
        let said = replicas[holder].said();
        let line = said.lines().find(|l| l.contains(key)).unwrap_or_default();
        line.split("secs=\"")
            .nth(1)
            .and_then(|v| v.split('"').next())
            .unwrap_or("?")
            .to_string()
    };
    eprintln!(
        "{what}: migration {} s, first start ready after {} s; the app as configured served \
         {:.1} s after the release was done; all {} replicas served after {:.1} s",
        gate_said("migration finished"),
        gate_said("the app is ready"),
        serving - done,
        replicas.len(),
        up.iter().max().unwrap().as_secs_f64(),
    );
}

#[test]
fn open_webui_checklist_three_replicas_with_two_workers_write_config_once_without_a_start_up_race()
{
    // The guide's checklist for several replicas (Redis, Chroma over HTTP, UVICORN_WORKERS=2,
    // one WEBUI_SECRET_KEY, one shared DATA_DIR), three replicas started at once on a fresh
    // database. Open WebUI 0.12 writes its config rows at start-up in every worker, whatever
    // ENABLE_DB_MIGRATIONS says (issue 29): the holder's two workers raced on them. The preset
    // runs the holder's first start with UVICORN_WORKERS=1 until it is ready, then the app as
    // configured.
    let db = cluster().new_db("py_owui_workers");
    let tmp = std::env::temp_dir().join(format!("mg-owui-workers-{}", std::process::id()));
    let data = tmp.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let checklist = Checklist::start(&tmp);
    let owui = Owui::Current;
    let seeded = owui.seeded_config_keys(&tmp.join("keys"));

    let since = (std::time::Instant::now(), std::time::SystemTime::now());
    let mut replicas = checklist_replicas(&db, owui, &checklist, "owui-w", &tmp, &data);
    let up = wait_all_serving(&mut replicas, since.0);

    // The database first: one attempt, done; Open WebUI at its head; every config key once.
    assert_eq!(
        ledger(&db, owui.release()),
        "done",
        "one attempt, by the holder"
    );
    assert_eq!(alembic_version(&db), OWUI_HEAD);
    assert_config_keys_once(&db, &seeded, "0.12.4's");
    // Then the processes; then what every replica's log says.
    let holder = assert_one_holder_started_once_with_one_worker(&mut replicas);
    assert_no_start_up_race(&replicas);
    report_start(
        "0.12.4, fresh database",
        &db,
        owui,
        (&replicas, holder),
        since.1,
        &up,
    );

    for r in &mut replicas {
        r.stop();
    }
    assert!(
        !replicas.iter().any(|r| r.said().contains(CHECKLIST_SECRET)),
        "never the key"
    );
    db.assert_no_gate_locks();
    drop((replicas, checklist));
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn open_webui_checklist_upgrade_with_two_workers_adds_config_keys_without_a_start_up_race() {
    // The same checklist: three 0.11.0 replicas at once on a fresh database, stopped (the
    // recipe's Recreate), then three 0.12.4 replicas at once on it. 0.12.4 migrates eleven
    // Alembic revisions and adds 37 config keys, which its workers insert at start-up.
    let db = cluster().new_db("py_owui_workers_upgrade");
    let tmp = std::env::temp_dir().join(format!("mg-owui-workers-up-{}", std::process::id()));
    let data = tmp.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let checklist = Checklist::start(&tmp);
    let (old, new) = (Owui::Old, Owui::Current);
    let old_keys = old.seeded_config_keys(&tmp.join("keys-old"));
    let new_keys = new.seeded_config_keys(&tmp.join("keys-new"));
    let added: Vec<String> = new_keys
        .iter()
        .filter(|k| !old_keys.contains(k))
        .cloned()
        .collect();
    // Sessions of apps the gate started (their application_name is the gate's tag).
    let tagged =
        || db.one("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'mgate:%'");

    let since = (std::time::Instant::now(), std::time::SystemTime::now());
    let mut olds = checklist_replicas(&db, old, &checklist, "owui-old", &tmp, &data);
    let up = wait_all_serving(&mut olds, since.0);
    assert_eq!(ledger(&db, old.release()), "done");
    assert_eq!(alembic_version(&db), OWUI_OLD_HEAD);
    assert_config_keys_once(&db, &old_keys, "0.11.0's");
    assert!(!added.is_empty(), "0.12.4 adds config keys");
    assert_eq!(
        db.one(&format!(
            "SELECT count(*) FROM config WHERE key IN ({})",
            sql_list(&added)
        )),
        "0",
        "0.12.4's added keys are not there yet"
    );
    let holder = assert_one_holder_started_once_with_one_worker(&mut olds);
    report_start(
        "0.11.0, fresh database",
        &db,
        old,
        (&olds, holder),
        since.1,
        &up,
    );
    for r in &mut olds {
        r.stop();
    }
    eventually(Duration::from_secs(30), "0.11.0's sessions gone", || {
        tagged() == "0"
    });

    let since = (std::time::Instant::now(), std::time::SystemTime::now());
    let mut news = checklist_replicas(&db, new, &checklist, "owui-new", &tmp, &data);
    let up = wait_all_serving(&mut news, since.0);

    // The database first: each release done once, 0.12.4's head, all its keys there once.
    assert_eq!(
        ledger(&db, old.release()),
        "done",
        "no new attempt at 0.11.0"
    );
    assert_eq!(ledger(&db, new.release()), "done", "one attempt at 0.12.4");
    assert_eq!(alembic_version(&db), OWUI_HEAD);
    assert_config_keys_once(&db, &new_keys, "0.12.4's");
    // Then the processes; then what all six replicas' logs say.
    let holder = assert_one_holder_started_once_with_one_worker(&mut news);
    assert_no_start_up_race(&olds);
    assert_no_start_up_race(&news);
    report_start(
        "0.12.4 over 0.11.0",
        &db,
        new,
        (&news, holder),
        since.1,
        &up,
    );

    for r in &mut news {
        r.stop();
    }
    db.assert_no_gate_locks();
    drop((olds, news, checklist));
    let _ = std::fs::remove_dir_all(&tmp);
}
