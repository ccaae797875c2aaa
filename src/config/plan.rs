//! The plans the commands receive: every flag read once, validated and given its default, in the
//! order a replica meets them (the flag, the programs, the release, the local preflight rules,
//! the database), so that the first thing wrong is the one reported. Nothing here is a clap
//! type: the commands never see the command line.

use std::path::PathBuf;
use std::time::Duration;

use super::{
    CheckArgs, Command, ContractArgs, GateArgs, MigrateArgs, ResetArgs, RunArgs, StatusArgs,
    WaitArgs,
};
use crate::application::Application;
use crate::child::check_program;
use crate::error::{Error, Result};
use crate::holding::{HolderPlan, OtherReleases};
use crate::ledger::CONTRACT_STEP;
use crate::lock::WaitSlots;
use crate::preflight::{Mode, Preflight, Preset};
use crate::probe::{self, Probe};
use crate::replica::Target;

/// What to do, with everything it needs.
pub(crate) enum Plan {
    Migrate(Migrate),
    Run(Run),
    Wait(Wait),
    Contract(Contract),
    Status(Status),
    Check(Check),
    Reset(Reset),
    /// `install DIR`.
    Install(PathBuf),
    /// `completions` and `man` print and exit before any plan is made.
    Printed,
}

/// The environment variable that turns the app's migrations on or off.
#[derive(Debug, Clone)]
pub(crate) struct Flag {
    /// Variable name.
    pub(crate) name: String,
    /// Value for the migrating start.
    pub(crate) on: String,
    /// Value for every other start.
    pub(crate) off: String,
}

/// What every replica that passes the gate needs (`migrate`, `run`, `wait`).
pub(crate) struct Gate {
    /// Where the database and the lock are.
    pub(crate) target: Target,
    /// The release ID (`--release`, or the hash of `--release-from`).
    pub(crate) release: Option<String>,
    /// `--flag`, `--on`, `--off`.
    pub(crate) flag: Flag,
    /// `--wait-timeout`: bounds the whole wait.
    pub(crate) wait_timeout: Duration,
    /// `--waiting-connections`.
    pub(crate) slots: WaitSlots,
    /// The preflight checks, with their local rules already passed.
    pub(crate) preflight: Preflight,
}

/// `migrate -- CMD`.
pub(crate) struct Migrate {
    pub(crate) gate: Gate,
    /// `--app`, or the command: whose release this is.
    pub(crate) application: Application,
    /// The holder's settings.
    pub(crate) holder: HolderPlan,
    pub(crate) command: Vec<String>,
}

/// `run [--migrate CMD] [--ready-*] -- APP`.
pub(crate) struct Run {
    pub(crate) gate: Gate,
    /// `--app`, or the migration command (`--migrate`, else the app): whose release this is.
    pub(crate) application: Application,
    /// The holder's settings.
    pub(crate) holder: HolderPlan,
    /// `--migrate`, split into words.
    pub(crate) migrate: Option<Vec<String>>,
    /// `--ready-http`, `--ready-tcp` or `--ready-sql`.
    pub(crate) probe: Option<Probe>,
    /// `--ready-timeout`.
    pub(crate) ready_timeout: Duration,
    /// `--first-start-env` (or the preset's): the variables of the holder's first start of the
    /// app; empty: the holder stays the parent of that first start.
    pub(crate) first_start_env: Vec<(String, String)>,
    pub(crate) command: Vec<String>,
}

/// `wait --release R [-- CMD]`.
pub(crate) struct Wait {
    /// Its release is always set.
    pub(crate) gate: Gate,
    pub(crate) command: Vec<String>,
}

/// `contract --release R [--settle D] -- CMD`.
pub(crate) struct Contract {
    /// Where the database and the lock are.
    pub(crate) target: Target,
    /// The release whose contract step this is.
    pub(crate) release: String,
    /// `--flag`, `--on`, `--off`: CMD runs with the flag on.
    pub(crate) flag: Flag,
    /// `--wait-timeout`: bounds the whole command.
    pub(crate) wait_timeout: Duration,
    /// `--waiting-connections`.
    pub(crate) slots: WaitSlots,
    /// `--settle`: the rollback window.
    pub(crate) settle: Duration,
    /// `--accept-untagged`.
    pub(crate) accept_untagged: bool,
    /// `--app`, or the command: whose step this is.
    pub(crate) application: Application,
    /// The holder's settings (`--other-releases` does not apply: the step waits itself).
    pub(crate) holder: HolderPlan,
    pub(crate) command: Vec<String>,
}

/// `status`.
pub(crate) struct Status {
    pub(crate) target: Target,
    pub(crate) release: Option<String>,
    pub(crate) json: bool,
    /// `--limit`: attempts shown.
    pub(crate) limit: u32,
}

/// `check`.
pub(crate) struct Check {
    pub(crate) target: Target,
    pub(crate) release: Option<String>,
    pub(crate) json: bool,
    /// `--preset`: also its fleet-wide checks (the shared `DATA_DIR`, the connection budget).
    pub(crate) preset: Option<Preset>,
    /// `--shared-dir`.
    pub(crate) shared_dir: Option<std::path::PathBuf>,
}

/// `reset`.
pub(crate) struct Reset {
    pub(crate) target: Target,
    pub(crate) release: String,
    /// `--env`: forget only the release's `--same-env` fingerprints.
    pub(crate) env: bool,
}

impl Command {
    /// The plan for this command.
    pub(crate) fn plan(self) -> Result<Plan> {
        Ok(match self {
            Command::Migrate(a) => Plan::Migrate(migrate(a)?),
            Command::Run(a) => Plan::Run(run(a)?),
            Command::Wait(a) => Plan::Wait(wait(a)?),
            Command::Contract(a) => Plan::Contract(contract(a)?),
            Command::Status(a) => Plan::Status(status(a)?),
            Command::Check(a) => Plan::Check(check(a)?),
            Command::Reset(a) => Plan::Reset(reset(a)?),
            Command::Install { dir } => Plan::Install(dir),
            Command::Completions { .. } | Command::Man => Plan::Printed,
        })
    }
}

fn migrate(a: MigrateArgs) -> Result<Migrate> {
    let flag = flag(&a.gate.flag)?;
    check_program(&a.command)?;
    let release = a.gate.release.resolve()?;
    let preset = a.gate.preflight.preset;
    Ok(Migrate {
        application: application(a.holder.app.as_deref(), &a.command)?,
        gate: gate(a.gate, flag, release, Mode::Migrate)?,
        holder: holder_plan(&a.holder, preset),
        command: a.command,
    })
}

fn contract(a: ContractArgs) -> Result<Contract> {
    let flag = flag(&a.flag)?;
    check_program(&a.command)?;
    let Some(release) = a.release.resolve()? else {
        return Err(Error::Usage(
            "contract needs --release R (or --release-from PATH): the release whose contract step this is"
                .into(),
        ));
    };
    not_a_step(&release)?;
    if a.holder.other_releases.is_some() {
        return Err(Error::Usage(
            "contract waits for older releases' apps itself (--settle): --other-releases does not apply"
                .into(),
        ));
    }
    let mut holder = holder_plan(&a.holder, None);
    // Checked by the step itself, before it takes the lock and again under it.
    holder.other_releases = OtherReleases::Ignore;
    Ok(Contract {
        application: application(a.holder.app.as_deref(), &a.command)?,
        target: a.db.target(None)?,
        release,
        flag,
        wait_timeout: a.waiting.wait_timeout,
        slots: a.waiting.waiting_connections,
        settle: a.settle,
        accept_untagged: a.accept_untagged,
        holder,
        command: a.command,
    })
}

/// A release ID the ledger keeps for contract steps (`contract:R`) is not a release of its own.
fn not_a_step(release: &str) -> Result<()> {
    if release.starts_with(CONTRACT_STEP) {
        return Err(Error::Usage(format!(
            "release IDs that start with {CONTRACT_STEP:?} name contract steps in the ledger (migrations-gate contract --release R): give the release itself"
        )));
    }
    Ok(())
}

fn run(a: RunArgs) -> Result<Run> {
    let flag = flag(&a.gate.flag)?;
    let probe = Probe::from_settings(&probe::Requested {
        http: a.ready_http,
        tcp: a.ready_tcp,
        sql: a.ready_sql,
    })?;
    let migrate = a.migrate.as_deref().map(split_command).transpose()?;
    if probe.is_none() && migrate.is_none() {
        return Err(Error::Usage(
            "run needs --migrate CMD, a readiness probe (--ready-http, --ready-tcp, --ready-sql), or both: \
             otherwise the gate cannot tell when the migration is done"
                .into(),
        ));
    }
    check_program(&a.command)?;
    if let Some(argv) = &migrate {
        check_program(argv)?;
    }
    let mode = Mode::Run {
        migrate: migrate.is_some(),
    };
    let release = a.gate.release.resolve()?;
    let preset = a.gate.preflight.preset;
    let first_start_env = first_start_env(&a.first_start_env, preset, probe.is_some())?;
    Ok(Run {
        first_start_env,
        application: application(
            a.holder.app.as_deref(),
            migrate.as_deref().unwrap_or(&a.command),
        )?,
        gate: gate(a.gate, flag, release, mode)?,
        holder: holder_plan(&a.holder, preset),
        migrate,
        probe,
        ready_timeout: a.ready_timeout,
        command: a.command,
    })
}

/// `--first-start-env NAME=VALUE,...`, validated; under `--preset open-webui` with
/// `UVICORN_WORKERS` > 1 and no such flag, `UVICORN_WORKERS=1` (every Open WebUI worker writes
/// its config rows at start-up). Only with a readiness probe: without one the holder does not
/// wait for its app, so there is no first start to hold the lock through.
fn first_start_env(
    given: &[String],
    preset: Option<Preset>,
    probe: bool,
) -> Result<Vec<(String, String)>> {
    let mut pairs = Vec::new();
    for item in given.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        match item.split_once('=') {
            Some((name, value))
                if !name.is_empty() && !name.contains('\0') && !value.contains('\0') =>
            {
                pairs.push((name.to_string(), value.to_string()));
            }
            _ => {
                return Err(Error::Usage(format!(
                    "--first-start-env {item:?} is not NAME=VALUE (e.g. UVICORN_WORKERS=1)"
                )));
            }
        }
    }
    if !pairs.is_empty() && !probe {
        return Err(Error::Usage(
            "--first-start-env needs a readiness probe (--ready-http, --ready-tcp or --ready-sql): \
             the holder keeps the lock through its first start of the app until it is ready"
                .into(),
        ));
    }
    if pairs.is_empty() && probe && matches!(preset, Some(Preset::OpenWebui)) {
        let workers = std::env::var("UVICORN_WORKERS").ok();
        if workers
            .as_deref()
            .and_then(crate::preflight::python_int)
            .is_some_and(|n| n > 1)
        {
            pairs.push(("UVICORN_WORKERS".to_string(), "1".to_string()));
        }
    }
    Ok(pairs)
}

/// `--app NAME`, or the command that migrates.
fn application(name: Option<&str>, migrating: &[String]) -> Result<Application> {
    match name {
        Some(n) if n.trim().is_empty() || n.contains('\0') => Err(Error::Usage(format!(
            "--app {n:?} is not a name: give each application one name of its own, or leave --app out"
        ))),
        Some(n) => Ok(Application::named(n)),
        None => Ok(Application::of_command(migrating)),
    }
}

fn wait(a: WaitArgs) -> Result<Wait> {
    let flag = flag(&a.gate.flag)?;
    let Some(release) = a.gate.release.resolve()? else {
        return Err(Error::Usage(
            "wait needs --release ID or --release-from PATH: the release to wait for".into(),
        ));
    };
    if !a.command.is_empty() {
        check_program(&a.command)?;
    }
    Ok(Wait {
        gate: gate(a.gate, flag, Some(release), Mode::Wait)?,
        command: a.command,
    })
}

fn status(a: StatusArgs) -> Result<Status> {
    Ok(Status {
        target: a.db.target(a.preset)?,
        release: a.release.resolve()?,
        json: a.json,
        limit: a.limit,
    })
}

fn check(a: CheckArgs) -> Result<Check> {
    Ok(Check {
        target: a.db.target(a.preset)?,
        release: a.release.resolve()?,
        json: a.json,
        preset: a.preset,
        shared_dir: a.shared_dir,
    })
}

fn reset(a: ResetArgs) -> Result<Reset> {
    let Some(release) = a.release.resolve()? else {
        return Err(Error::Usage(
            "reset needs --release ID or --release-from PATH: the release to forget".into(),
        ));
    };
    Ok(Reset {
        target: a.db.target(a.preset)?,
        release,
        env: a.env,
    })
}

/// The flags of every gating replica, in the order they are checked after the flag, the
/// programs and the release: the local preflight rules, the database.
fn gate(a: GateArgs, flag: Flag, release: Option<String>, mode: Mode) -> Result<Gate> {
    if let Some(r) = &release {
        not_a_step(r)?;
    }
    let preset = a.preflight.preset;
    let preflight = Preflight::new(&a.preflight.settings(), mode, release.as_deref())?;
    Ok(Gate {
        target: a.db.target(preset)?,
        release,
        flag,
        wait_timeout: a.waiting.wait_timeout,
        slots: a.waiting.waiting_connections,
        preflight,
    })
}

/// The validated `--flag`, `--on`, `--off`.
fn flag(f: &super::FlagArgs) -> Result<Flag> {
    if f.flag.is_empty() || f.flag.contains('=') || f.flag.contains('\0') {
        return Err(Error::Usage(format!(
            "--flag {:?} is not a valid environment variable name",
            f.flag
        )));
    }
    // The gate sets these itself, or the child cannot run without them.
    const NEEDED: [&str; 5] = ["PATH", "HOME", "PGAPPNAME", "PGOPTIONS", "LD_LIBRARY_PATH"];
    if NEEDED.contains(&f.flag.as_str()) {
        return Err(Error::Usage(format!(
            "--flag {} names a variable the child needs for itself: name the variable your app reads to turn its migrations on (e.g. ENABLE_DB_MIGRATIONS)",
            f.flag
        )));
    }
    Ok(Flag {
        name: f.flag.clone(),
        on: f.on.clone(),
        off: f.off.clone(),
    })
}

/// The holder's settings; `preset` picks the default of `--other-releases`.
fn holder_plan(a: &super::HolderArgs, preset: Option<Preset>) -> HolderPlan {
    let other_releases = match (a.other_releases, preset) {
        (Some(chosen), _) => chosen,
        (None, Some(Preset::OpenWebui)) => OtherReleases::Fail,
        (None, None) => OtherReleases::Wait,
    };
    HolderPlan {
        kill_grace: a.kill_grace,
        migration_timeout: a.migration_timeout,
        lock_timeout: a.lock_timeout,
        report_waits_after: a.report_waits_after,
        other_releases,
        max_failures: a.max_failures,
        keep_tool_locks: a.keep_tool_locks,
    }
}

/// Splits a `--migrate` string into words as a POSIX shell would, without running a shell.
fn split_command(s: &str) -> Result<Vec<String>> {
    let words = shell_words::split(s)
        .map_err(|e| Error::Usage(format!("--migrate {s:?} cannot be split into words: {e}")))?;
    if words.is_empty() {
        return Err(Error::Usage("--migrate is empty".into()));
    }
    Ok(words)
}
