//! The command line, the top layer: flags, their `MIGRATIONS_GATE_*` environment twins, and their
//! validation into the plain settings the rest of the crate receives ([`Target`], the probe's
//! and the preflight's settings). Nothing below this module sees a clap type. Every default
//! lives in a clap attribute here.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

mod contract;
mod database;
mod holder;
mod plan;
mod value_enums;

pub(crate) use contract::ContractArgs;
pub(crate) use holder::HolderArgs;
pub(crate) use plan::{Check, Contract, Gate, Migrate, Plan, Reset, Run, Status, Wait};

use crate::db::ConnUrl;
use crate::error::{Error, Result};
use crate::lock::{LockKey, Scope, WaitSlots};
use crate::preflight::{self, OnMismatch, Preset};
use crate::release::release_from_path;
use crate::replica::{GATE_NAME_PREFIX, Target, hostname};

const AFTER_HELP: &str = "\
Exit codes:
  0    ok
  1    release not done (status --release)
  64   usage: a wrong flag or value
  65   the release failed --max-failures times (fix it, then `reset --release R`)
  66   reset found nothing recorded for its lock, ledger and release
  69   database unavailable (check: also a read-only standby where the release is not done)
  70   internal error
  74   the output could not be written (a full disk; a closed pipe is a normal end)
  75   timed out: waiting, readiness, --migration-timeout, --other-releases wait; reset while
       the lock is held
  77   authentication or permission refused (check: a privilege the gate needs is missing)
  78   configuration refused: a preflight check (--same-env, --preset, an older release),
       a release older than one whose contract step ran, a contract step with no tagged app
       of its release in sight, --other-releases fail, a release migrated for another
       application, another application's table where the ledger should be, PostgreSQL
       older than 13
  126  command not executable
  127  command not found
A failed migration passes on its own exit code (128+N if killed by signal N).

The final one-line outcome is also written to /dev/termination-log when that file exists and is
writable (Kubernetes shows it in `kubectl describe pod`); MIGRATIONS_GATE_TERMINATION_LOG names
another file.

Every flag has an environment twin (shown as [env: ...]). Log level: MIGRATIONS_GATE_LOG
(e.g. info, debug, migrations_gate=trace). Default: info, with PostgreSQL NOTICEs (sqlx::postgres::notice) only from warn up.";

/// migrations-gate: run database migrations exactly once when many replicas start at once.
///
/// Before the app starts, the gate takes a PostgreSQL advisory lock. Exactly one replica runs the
/// migrations with the flag on (ENABLE_DB_MIGRATIONS=True); every other replica waits until the
/// release is recorded done, then starts the app with the flag off.
#[derive(Debug, Parser)]
#[command(name = "migrations-gate", version, about, long_about, after_help = AFTER_HELP)]
pub(crate) struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// The gate's modes.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run CMD once per release with the flag on, then exit 0 on every replica (init container, job).
    ///
    /// The lock holder runs CMD to completion with the flag on. Exit 0 marks the release done and
    /// every replica exits 0; a failing CMD is recorded and its exit code passed on.
    Migrate(MigrateArgs),

    /// Gate the start of APP (Docker entrypoint, Swarm, Compose): followers exec APP with the flag off.
    ///
    /// The lock holder runs --migrate with the flag on and then execs APP with the flag off; or,
    /// with a --ready-* probe, starts APP itself (flag on, or off after --migrate), keeps the lock
    /// until APP is ready, records the release and stays as APP's parent, forwarding signals.
    Run(RunArgs),

    /// After a rollout: run CMD once for a release (its contract step) when no replica of an older release is left.
    ///
    /// Waits until the release is done and no app session of an older release of this lock has
    /// been seen for --settle, then runs CMD with the flag on under the lock, once, recorded in
    /// the ledger as the release's contract step (`contract:R`); every other runner of the step
    /// waits for it and exits 0. Afterwards a replica of an older release is refused (exit 78).
    Contract(ContractArgs),

    /// Block until a release is done (workers, cron jobs, sidecars), then exit 0 or exec CMD.
    ///
    /// Never takes the lock and never migrates: it only waits for the positive signal. CMD runs
    /// with the flag off.
    Wait(WaitArgs),

    /// Show who holds the lock and every recorded attempt; with --release, exit 0 only if it is done.
    Status(StatusArgs),

    /// Before a deploy: connect as the gate will and show what it would find, without taking the lock or writing anything.
    ///
    /// One line each: the host reached and why, the route and its proof, the server (version,
    /// primary or standby), the database and user, the lock, the ledger and the release's state,
    /// and each privilege the gate needs, with the GRANT to ask for when it is missing. Exits 0
    /// when the gate has everything it needs, else as the gate would (69, 77).
    Check(CheckArgs),

    /// Forget a release so that it migrates again (refuses while the lock is held); with --env, only its --same-env fingerprints.
    Reset(ResetArgs),

    /// Copy this binary to DIR/migrations-gate (for a shared volume or another image).
    ///
    /// The entrypoint-wrapper mode runs inside the app's container: copy the gate there from
    /// an init container into an emptyDir, or use `COPY --from` in the app's Dockerfile.
    Install {
        /// Target directory (created if missing).
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },

    /// Print shell completions (generated from the same definitions as --help).
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },

    /// Print the man page (roff, generated from the same definitions as --help).
    Man,
}

impl Command {
    /// The log format the command asked for.
    pub(crate) fn log_format(&self) -> LogFormat {
        match self {
            Command::Migrate(a) => a.gate.db.log_format,
            Command::Run(a) => a.gate.db.log_format,
            Command::Wait(a) => a.gate.db.log_format,
            Command::Contract(a) => a.db.log_format,
            Command::Status(a) => a.db.log_format,
            Command::Check(a) => a.db.log_format,
            Command::Reset(a) => a.db.log_format,
            Command::Install { .. } | Command::Completions { .. } | Command::Man => LogFormat::Text,
        }
    }
}

/// Where the database and the lock are: flags shared by every command that connects.
#[derive(Debug, Clone, Args)]
pub(crate) struct DbArgs {
    /// PostgreSQL URL: postgresql://user:pass@host:port/db?sslmode=... (also postgres://, SQLAlchemy's postgresql+DRIVER://, libpq's "host=... dbname=...", host lists "db1,db2" tried in libpq's order with target_session_attrs (a replica that may migrate takes the read-write host), and service=NAME from pg_service.conf; a parameter the gate cannot honour is refused). Falls back to DATABASE_URL, then to libpq's PG* environment (PGHOST, PGPORT, PGDATABASE, PGUSER, PGPASSWORD, PGSERVICE, ...). With --preset open-webui the fallback is the database Open WebUI itself would use: its DATABASE_TYPE, DATABASE_USER, DATABASE_PASSWORD, DATABASE_HOST, DATABASE_PORT and DATABASE_NAME when all are set (they win over DATABASE_URL, as in Open WebUI), else DATABASE_URL; without the preset those DATABASE_* parts are not read.
    #[arg(long, env = "MIGRATIONS_GATE_DATABASE_URL", hide_env_values = true)]
    pub(crate) database_url: Option<String>,

    /// Read the database URL from this file (e.g. a mounted secret).
    #[arg(long, env = "MIGRATIONS_GATE_DATABASE_URL_FILE", value_name = "PATH")]
    #[arg(conflicts_with = "database_url")]
    pub(crate) database_url_file: Option<PathBuf>,

    /// Name of the lock; different names never block each other.
    #[arg(long, env = "MIGRATIONS_GATE_LOCK", value_name = "NAME")]
    #[arg(default_value = "migrations-gate")]
    pub(crate) lock: String,

    /// Use this 64-bit advisory lock key directly instead of deriving it from --lock.
    #[arg(long, env = "MIGRATIONS_GATE_LOCK_ID", value_name = "N", allow_negative_numbers = true)]
    pub(crate) lock_id: Option<i64>,

    /// Schema of the gate's ledger table (created on first use).
    #[arg(long, env = "MIGRATIONS_GATE_SCHEMA", value_name = "NAME")]
    #[arg(default_value = "migrations_gate")]
    pub(crate) schema: String,

    /// How the lock is held: session, transaction (for transaction-pooling PgBouncer), or auto-detect.
    #[arg(long, env = "MIGRATIONS_GATE_LOCK_SCOPE", value_enum, default_value_t = Scope::Auto)]
    pub(crate) lock_scope: Scope,

    /// Keep retrying a database that is not up yet for this long.
    #[arg(long, env = "MIGRATIONS_GATE_CONNECT_TIMEOUT", value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub(crate) connect_timeout: Duration,

    /// application_name of the gate's connections, shown to waiting replicas [default: the URL's application_name, else migrations-gate/<hostname>].
    #[arg(long, env = "MIGRATIONS_GATE_APPLICATION_NAME", value_name = "NAME")]
    pub(crate) application_name: Option<String>,

    /// Log format on stderr.
    #[arg(long, env = "MIGRATIONS_GATE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub(crate) log_format: LogFormat,
}

/// Which release: `--release` or `--release-from`.
#[derive(Debug, Clone, Args)]
pub(crate) struct ReleaseArgs {
    /// What this deployment migrates to (app version, image tag). Done releases are skipped.
    #[arg(long, env = "MIGRATIONS_GATE_RELEASE", value_name = "ID")]
    #[arg(conflicts_with = "release_from")]
    pub(crate) release: Option<String>,

    /// Use a content hash of the files under PATH (e.g. the migrations folder) as the release ID.
    #[arg(long, env = "MIGRATIONS_GATE_RELEASE_FROM", value_name = "PATH")]
    pub(crate) release_from: Option<PathBuf>,
}

/// Flags of every replica that passes the gate: `migrate`, `run` and `wait`.
#[derive(Debug, Clone, Args)]
pub(crate) struct GateArgs {
    /// Where the database and the lock are.
    #[command(flatten)]
    pub(crate) db: DbArgs,

    /// Which release.
    #[command(flatten)]
    pub(crate) release: ReleaseArgs,

    /// The environment variable handed to the app.
    #[command(flatten)]
    pub(crate) flag: FlagArgs,

    /// How a replica waits.
    #[command(flatten)]
    pub(crate) waiting: WaitingArgs,

    /// Preflight checks before the app starts.
    #[command(flatten)]
    pub(crate) preflight: PreflightArgs,
}

/// How a replica waits: shared by the gating modes and `wait`.
#[derive(Debug, Clone, Args)]
pub(crate) struct WaitingArgs {
    /// Give up waiting for the release after this long (e.g. 90s, 30m): a hard bound, whatever the network does.
    #[arg(long, env = "MIGRATIONS_GATE_WAIT_TIMEOUT", value_name = "DURATION", default_value = "30m", value_parser = parse_duration)]
    pub(crate) wait_timeout: Duration,

    /// How many waiters keep their connection open on a direct connection (they hear "done" at once by LISTEN): a number, or auto (a third of the server's free connections, at least 5, at most 100). The others reconnect per poll; behind a proxy or a session pooler every waiter does.
    #[arg(long, env = "MIGRATIONS_GATE_WAITING_CONNECTIONS", value_name = "N|auto")]
    #[arg(default_value = "auto")]
    pub(crate) waiting_connections: WaitSlots,
}

/// Preflight checks before the app starts (README "Preflight"): shared by the gating modes and
/// `wait`. A refusal exits 78.
#[derive(Debug, Clone, Args)]
pub(crate) struct PreflightArgs {
    /// Refuse to start (exit 78) when one of these variables differs from the value the release's first replica started with. Compared as keyed fingerprints kept in the database, never as values; unset and empty differ. Needs --release.
    #[arg(long, env = "MIGRATIONS_GATE_SAME_ENV", value_name = "NAME[,NAME...]")]
    #[arg(value_delimiter = ',')]
    pub(crate) same_env: Vec<String>,

    /// What a --same-env difference does: fail (exit 78, the app does not start) or warn (log it and start).
    #[arg(long, env = "MIGRATIONS_GATE_ON_MISMATCH", value_enum, default_value_t = OnMismatch::Fail)]
    pub(crate) on_mismatch: OnMismatch,

    /// Check a known app's multi-replica setup (its rules fail with 78 or warn; see the README, "Preflight"), and find the database as the app does when no --database-url is given (open-webui: its DATABASE_* parts, else DATABASE_URL).
    #[arg(long, env = "MIGRATIONS_GATE_PRESET", value_enum)]
    pub(crate) preset: Option<Preset>,

    /// Start even when a newer release was already migrated on this database (e.g. a deliberate rollback after restoring it). Without it such a replica exits 78.
    #[arg(long, env = "MIGRATIONS_GATE_ALLOW_OLDER_RELEASE")]
    pub(crate) allow_older_release: bool,

    /// A directory every replica of the release must share (uploads, generated files): the first replica leaves a marker with a random token there (`.migrations-gate-<key>-<ledger>-<release>`, written whole by a link, never read or pruned by another lock or ledger), and a replica whose directory lacks it is told, in one line, that the replicas do not share it (a warning; see --require-shared-dir). A missing or read-only directory is named as such. Needs --release. With --preset open-webui: Open WebUI's DATA_DIR (default /app/backend/data) unless given.
    #[arg(long, env = "MIGRATIONS_GATE_SHARED_DIR", value_name = "PATH")]
    pub(crate) shared_dir: Option<std::path::PathBuf>,

    /// Refuse to start (exit 78) a replica whose --shared-dir is not the release's shared directory, or is missing or read-only.
    #[arg(long, env = "MIGRATIONS_GATE_REQUIRE_SHARED_DIR")]
    pub(crate) require_shared_dir: bool,
}

/// The environment variable handed to the app.
#[derive(Debug, Clone, Args)]
pub(crate) struct FlagArgs {
    /// Environment variable that switches the app's migrations.
    #[arg(long, env = "MIGRATIONS_GATE_FLAG", value_name = "NAME")]
    #[arg(default_value = "ENABLE_DB_MIGRATIONS")]
    pub(crate) flag: String,

    /// Value of --flag for the replica that migrates.
    #[arg(long, env = "MIGRATIONS_GATE_ON", value_name = "VALUE", default_value = "True")]
    pub(crate) on: String,

    /// Value of --flag for every other start.
    #[arg(long, env = "MIGRATIONS_GATE_OFF", value_name = "VALUE", default_value = "False")]
    pub(crate) off: String,
}

/// `migrate` mode.
#[derive(Debug, Clone, Args)]
pub(crate) struct MigrateArgs {
    /// The flags of every replica that passes the gate.
    #[command(flatten)]
    pub(crate) gate: GateArgs,

    /// How the holder stops, bounds and watches the migration.
    #[command(flatten)]
    pub(crate) holder: HolderArgs,

    /// The migration command, run with the flag on by the lock holder only.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub(crate) command: Vec<String>,
}

/// `run` mode.
#[derive(Debug, Clone, Args)]
pub(crate) struct RunArgs {
    /// The flags of every replica that passes the gate.
    #[command(flatten)]
    pub(crate) gate: GateArgs,

    /// How the holder stops, bounds and watches the migration.
    #[command(flatten)]
    pub(crate) holder: HolderArgs,

    /// Migration command the holder runs first (flag on); split like a POSIX shell, run without one.
    #[arg(long, env = "MIGRATIONS_GATE_MIGRATE", value_name = "CMD")]
    pub(crate) migrate: Option<String>,

    /// Holder keeps the lock until this URL answers 2xx (plain http).
    #[arg(long, env = "MIGRATIONS_GATE_READY_HTTP", value_name = "URL", group = "ready")]
    pub(crate) ready_http: Option<String>,

    /// Holder keeps the lock until HOST:PORT accepts a TCP connection.
    #[arg(long, env = "MIGRATIONS_GATE_READY_TCP", value_name = "HOST:PORT", group = "ready")]
    pub(crate) ready_tcp: Option<String>,

    /// Holder keeps the lock until this SQL returns a row whose first column is not false/NULL.
    #[arg(long, env = "MIGRATIONS_GATE_READY_SQL", value_name = "SQL", group = "ready")]
    pub(crate) ready_sql: Option<String>,

    /// The holder's first start of APP (the one that holds the lock until it is ready) runs with these variables set, e.g. UVICORN_WORKERS=1: an app whose every worker writes at start-up (Open WebUI's config rows) does it once, in one process. Once APP is ready the release is recorded and the lock freed; then that APP is stopped (SIGTERM, SIGKILL after --kill-grace) and the gate execs APP as configured. Needs a readiness probe. With --preset open-webui and UVICORN_WORKERS > 1: UVICORN_WORKERS=1 unless given.
    #[arg(long, env = "MIGRATIONS_GATE_FIRST_START_ENV", value_name = "NAME=VALUE[,...]")]
    #[arg(value_delimiter = ',')]
    pub(crate) first_start_env: Vec<String>,

    /// Give up (stop APP, record the failure) if APP is not ready after this long.
    #[arg(long, env = "MIGRATIONS_GATE_READY_TIMEOUT", value_name = "DURATION", default_value = "10m", value_parser = parse_duration)]
    pub(crate) ready_timeout: Duration,

    /// The app to start.
    #[arg(last = true, required = true, value_name = "APP")]
    pub(crate) command: Vec<String>,
}

/// `wait` mode.
#[derive(Debug, Clone, Args)]
pub(crate) struct WaitArgs {
    /// The flags of every replica that passes the gate.
    #[command(flatten)]
    pub(crate) gate: GateArgs,

    /// Command to exec once the release is done (with the flag off); without one, exit 0.
    #[arg(last = true, value_name = "CMD")]
    pub(crate) command: Vec<String>,
}

/// `status`.
#[derive(Debug, Clone, Args)]
pub(crate) struct StatusArgs {
    /// Where the database and the lock are.
    #[command(flatten)]
    pub(crate) db: DbArgs,

    /// Which release.
    #[command(flatten)]
    pub(crate) release: ReleaseArgs,

    /// Find the database as this app does when no --database-url is given, as `run --preset` does (open-webui: its DATABASE_* parts, else DATABASE_URL).
    #[arg(long, env = "MIGRATIONS_GATE_PRESET", value_enum)]
    pub(crate) preset: Option<Preset>,

    /// Print stable JSON instead of a table.
    #[arg(long, env = "MIGRATIONS_GATE_STATUS_JSON")]
    pub(crate) json: bool,

    /// Show at most this many attempts, newest first.
    #[arg(long, env = "MIGRATIONS_GATE_STATUS_LIMIT", value_name = "N", default_value_t = 20)]
    pub(crate) limit: u32,
}

/// `check`.
#[derive(Debug, Clone, Args)]
pub(crate) struct CheckArgs {
    /// Where the database and the lock are.
    #[command(flatten)]
    pub(crate) db: DbArgs,

    /// Which release.
    #[command(flatten)]
    pub(crate) release: ReleaseArgs,

    /// Print stable JSON instead of lines.
    #[arg(long, env = "MIGRATIONS_GATE_CHECK_JSON")]
    pub(crate) json: bool,

    /// Find the database as this app does when no --database-url is given, as `run --preset` does (open-webui: its DATABASE_* parts, else DATABASE_URL), and report the preset's fleet-wide checks: the shared DATA_DIR and the connection budget.
    #[arg(long, env = "MIGRATIONS_GATE_PRESET", value_enum)]
    pub(crate) preset: Option<Preset>,

    /// Report whether this directory holds the release's shared-directory marker (see `run --shared-dir`); reads only.
    #[arg(long, env = "MIGRATIONS_GATE_SHARED_DIR", value_name = "PATH")]
    pub(crate) shared_dir: Option<std::path::PathBuf>,
}

/// `reset`.
#[derive(Debug, Clone, Args)]
pub(crate) struct ResetArgs {
    /// Where the database and the lock are.
    #[command(flatten)]
    pub(crate) db: DbArgs,

    /// The release to forget (`--release` or `--release-from`, as the deployment gives it).
    #[command(flatten)]
    pub(crate) release: ReleaseArgs,

    /// Find the database as this app does when no --database-url is given, as `run --preset` does (open-webui: its DATABASE_* parts, else DATABASE_URL).
    #[arg(long, env = "MIGRATIONS_GATE_PRESET", value_enum)]
    pub(crate) preset: Option<Preset>,

    /// Forget only the release's --same-env fingerprints (the next replica sets them anew); the release stays done.
    #[arg(long, env = "MIGRATIONS_GATE_RESET_ENV")]
    pub(crate) env: bool,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The longest duration any flag takes: a year. Longer is a typo, and a deadline that far
/// overflows the clock's arithmetic.
const LONGEST: Duration = Duration::from_secs(365 * 24 * 3600);

pub(crate) fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let d =
        humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 30s, 5m, 1h)"))?;
    if d > LONGEST {
        return Err(
            "longer than a year: give a bound the gate can wait out (examples: 30m, 2h)".into(),
        );
    }
    Ok(d)
}

/// `--lock-timeout`: a duration PostgreSQL's `lock_timeout` can take, an integer number of
/// milliseconds up to 2147483647 (about 24.8 days; "Client Connection Defaults").
pub(crate) fn parse_lock_timeout(s: &str) -> std::result::Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.as_millis() > i32::MAX as u128 {
        return Err(
            "longer than PostgreSQL's lock_timeout can be (2147483647 ms, about 24.8 days)".into(),
        );
    }
    Ok(d)
}

impl ReleaseArgs {
    /// The release ID, if one was given.
    pub(crate) fn resolve(&self) -> Result<Option<String>> {
        match (&self.release, &self.release_from) {
            (Some(r), _) if r.trim().is_empty() => Err(Error::Usage(
                "--release is empty: give the app version or image tag, or leave it unset".into(),
            )),
            (Some(r), _) => Ok(Some(r.clone())),
            (None, Some(path)) => Ok(Some(release_from_path(path)?)),
            (None, None) => Ok(None),
        }
    }
}

impl PreflightArgs {
    /// The preflight's settings.
    pub(crate) fn settings(&self) -> preflight::Settings {
        preflight::Settings {
            same_env: self.same_env.clone(),
            on_mismatch: self.on_mismatch,
            preset: self.preset,
            allow_older_release: self.allow_older_release,
            shared_dir: self.shared_dir.clone(),
            require_shared_dir: self.require_shared_dir,
        }
    }
}
