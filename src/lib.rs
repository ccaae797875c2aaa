//! migrations-gate: run database migrations exactly once when many replicas start at once.
//!
//! A reader looking for a rule finds it in one module. Dependencies run one way, from the
//! commands down (`ci/module-cycles` checks that no module reaches back up):
//! - [`config`]: the command line (flags, environment twins, validation), turned once into the
//!   plain plan each command receives; nothing below it names clap (`ci/clap-stays-in-config`);
//! - [`commands`]: `migrate`, `run`, `wait`, `reset`, top to bottom; [`status`]: what the lock
//!   and the ledger say, for people and scripts; [`check`]: what the gate would find, before a
//!   deploy (read-only); [`install`]: copying the binary for the wrapper pattern;
//! - [`preflight`]: checks before the app starts (`--same-env`, presets, older releases);
//! - [`protocol`]: **the protocol in one file**, top to bottom: the waiting loop (done? follow;
//!   lock free? take over; otherwise wait) and taking over as named steps, ending in a
//!   [`protocol::Decision`];
//! - [`waiting`]: a waiting replica's bookkeeping between rounds (kept connections, waiting
//!   slots, `LISTEN`, the route, failure streaks, reports, pauses);
//! - [`holding`]: the holder's life once it has begun an attempt (migrate, start the app,
//!   heartbeat, fence) and its one exit, [`holding::Holding::end`];
//! - [`sessions`]: the database sessions of an attempt: their tag (`PGAPPNAME`), finding them,
//!   ending them; [`lockwaits`]: what those sessions wait on, and who blocks them;
//!   [`tools`]: what a migration tool leaves behind (stale lock rows, half-applied markers);
//!   [`sockets`]: the TCP connections of a child's process group, from `/proc`;
//! - [`probe`]: readiness checks; [`child`]: spawning, guarding, signal forwarding, reaping,
//!   `exec`; [`termination`]: the final one-line outcome in `/dev/termination-log`;
//! - [`replica`]: one replica's view of the database, the lock and the ledger, shared by every
//!   step; [`release`]: the release ID of `--release-from`, a hash of the files;
//! - [`ledger`]: which releases are done, and every attempt (its rows);
//! - [`schema`]: every table the gate creates, its DDL and the grants it needs;
//! - [`route`]: what sits between the gate and PostgreSQL, direct only when proven;
//! - [`application`]: which application a release was migrated for (the ledger's fingerprint);
//! - [`identity`]: what a gate treats as its own (its lock's full key and its ledger);
//! - [`lock`]: the advisory lock key, its session's settings, and who holds it;
//! - [`db`]: the connection string's forms, connecting, retrying, classifying errors,
//!   keepalives, redacting URLs;
//! - [`sql`]: pooler-safe queries with deadlines, reading rows, quoting, SQLSTATE predicates;
//! - [`mod@error`]: failures and their exit codes; [`duration`]: durations for people.
//!
//! Visibility: the library exports [`main_entry`] and [`cli_command`] and nothing else; below
//! them an item is `pub(crate)` when another module uses it, `pub(super)` when only its own
//! module's files do, and private otherwise, so the compiler reports what nobody uses.

#![warn(missing_docs)]

mod application;
mod check;
mod child;
mod commands;
mod config;
mod contract;
mod db;
mod duration;
mod error;
mod files;
mod holding;
mod identity;
mod install;
mod ledger;
mod lock;
mod lockwaits;
mod output;
mod preflight;
mod probe;
mod protocol;
mod release;
mod replica;
mod route;
mod schema;
mod sessions;
mod sockets;
mod sql;
mod status;
mod termination;
mod tools;
mod waiting;

use tracing::error;

use config::{Cli, Command, LogFormat, Plan};
use error::{EXIT_INTERNAL, EXIT_OK, EXIT_USAGE};

/// Parses the command line, runs the chosen mode and returns the process exit code. Errors are
/// logged as one line and mapped to exit codes here and nowhere else.
pub fn main_entry() -> i32 {
    let parsed = cli_command()
        .try_get_matches()
        .and_then(|m| <Cli as clap::FromArgMatches>::from_arg_matches(&m));
    let cli = match parsed {
        Ok(cli) => cli,
        Err(e) => {
            let printed = e.print();
            if !e.use_stderr() {
                // --help, --version: their text is the result.
                return match printed {
                    Err(io) if io.kind() != std::io::ErrorKind::BrokenPipe => {
                        // Before logging starts: the one line goes to stderr as it is.
                        eprintln!("error: cannot write to standard output: {io}");
                        error::EXIT_OUTPUT
                    }
                    _ => EXIT_OK,
                };
            }
            let text = e.to_string();
            let line = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
            termination::write_failure(EXIT_USAGE, line);
            return EXIT_USAGE;
        }
    };
    // Generated from the same clap definitions as --help, so they never drift apart.
    match &cli.command {
        Command::Completions { shell } => {
            let mut cmd = cli_command();
            // Into memory first: clap_complete panics when its writer fails.
            let mut text = Vec::new();
            clap_complete::generate(*shell, &mut cmd, "migrations-gate", &mut text);
            return printed(output::print_bytes(&text));
        }
        Command::Man => {
            let mut page = Vec::new();
            if let Err(e) = clap_mangen::Man::new(cli_command()).render(&mut page) {
                eprintln!("error: cannot render the man page: {e}");
                return EXIT_INTERNAL;
            }
            return printed(output::print_bytes(&page));
        }
        _ => {}
    }
    let log_format = cli.command.log_format();
    init_logging(log_format);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!("cannot start the async runtime: {e}");
            return EXIT_INTERNAL;
        }
    };
    // The current-thread runtime matters: children get PR_SET_PDEATHSIG, which fires when the
    // *thread* that spawned them exits, and the main thread lives as long as the gate.
    let result = runtime.block_on(async {
        match cli.command.plan()? {
            Plan::Migrate(plan) => commands::migrate(plan).await,
            Plan::Run(plan) => commands::run(plan).await,
            Plan::Wait(plan) => commands::wait(plan).await,
            Plan::Contract(plan) => contract::contract(plan).await,
            Plan::Status(plan) => status::status(plan).await,
            Plan::Check(plan) => check::check(plan).await,
            Plan::Reset(plan) => commands::reset(plan).await,
            Plan::Install(dir) => install::install(&dir).map(|_| EXIT_OK),
            Plan::Printed => Ok(EXIT_OK),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            error!(exit_code = e.exit_code(), "{e}");
            termination::write_failure(e.exit_code(), &e.to_string());
            e.exit_code()
        }
    }
}

/// The clap definition behind parsing, `--help`, completions and the man page. Environment
/// values are never shown: `--help` must not print a password taken from the environment.
pub fn cli_command() -> clap::Command {
    fn hide(cmd: clap::Command) -> clap::Command {
        cmd.mut_args(|a| a.hide_env_values(true))
            .mut_subcommands(hide)
    }
    hide(<Cli as clap::CommandFactory>::command())
}

/// The log filter when `MIGRATIONS_GATE_LOG` is unset: `info`, except PostgreSQL's NOTICEs
/// (sqlx logs them at INFO under this target), such as "relation ... already exists, skipping"
/// from the gate's own `CREATE ... IF NOT EXISTS`, which read like errors on every start.
/// WARNING notices still show.
const DEFAULT_LOG_FILTER: &str = "info,sqlx::postgres::notice=warn";

/// The exit code of a command whose result is what it printed (before logging starts: its one
/// line goes to stderr as it is).
fn printed(result: error::Result<()>) -> i32 {
    match result {
        Ok(()) => EXIT_OK,
        Err(e) => {
            eprintln!("error: {e}");
            e.exit_code()
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MIGRATIONS_GATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(ansi);
    match format {
        // A value in a text line must not start a line of its own (JSON escapes by itself).
        LogFormat::Text => builder
            .with_writer(move || output::LogWriter { ansi })
            .init(),
        LogFormat::Json => builder
            .with_writer(std::io::stderr)
            .json()
            .flatten_event(true)
            .init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use error::{EXIT_CODES, Error};

    /// The numbers in the part of `text` that starts at `from` and ends at `to`.
    fn numbers_between(text: &str, from: &str, to: &str) -> Vec<i32> {
        let start = text.find(from).unwrap_or(text.len());
        let part = &text[start..];
        let part = &part[..part[from.len().min(part.len())..]
            .find(to)
            .map_or(part.len(), |end| end + from.len())];
        part.split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse().ok())
            .collect()
    }

    #[test]
    fn every_exit_code_is_in_the_help_and_the_readme_table() {
        let help = cli_command().render_long_help().to_string();
        let in_help = numbers_between(&help, "Exit codes:", "\n\n");
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
            .expect("README.md next to Cargo.toml");
        let section = readme
            .split("\n## ")
            .find(|s| s.starts_with("Exit codes"))
            .expect("README has an \"## Exit codes\" section");
        // The first cell of each row: `| 64 |`, `| 126 / 127 |`.
        let in_table: Vec<i32> = section
            .lines()
            .filter_map(|l| l.strip_prefix('|'))
            .filter_map(|l| l.split('|').next())
            .flat_map(|cell| cell.split('/').map(|n| n.trim().parse().ok()))
            .flatten()
            .collect();
        for code in EXIT_CODES {
            assert!(
                in_help.contains(&code),
                "exit code {code} is not in --help: {help}"
            );
            assert!(
                in_table.contains(&code),
                "exit code {code} is not in the README's table"
            );
        }
    }

    #[test]
    fn every_error_exits_with_a_listed_code() {
        let errors = [
            Error::Usage(String::new()),
            Error::Unavailable(String::new()),
            Error::Auth(String::new()),
            Error::Config(String::new()),
            Error::Timeout {
                what: String::new(),
                waited: std::time::Duration::ZERO,
                hint: String::new(),
            },
            Error::LockHeld {
                lock: String::new(),
                holder: String::new(),
            },
            Error::CommandNotFound {
                program: String::new(),
            },
            Error::CommandNotExecutable {
                program: String::new(),
                source: std::io::ErrorKind::PermissionDenied.into(),
            },
            Error::ReleaseFailing {
                release: String::new(),
                failures: 3,
                id: 1,
                host: String::new(),
                holder: String::new(),
                last: String::new(),
            },
            Error::NothingToReset {
                release: String::new(),
                lock: String::new(),
                ledger: String::new(),
                seen: String::new(),
            },
            Error::Output(String::new()),
            Error::Internal(String::new()),
        ];
        for e in errors {
            assert!(EXIT_CODES.contains(&e.exit_code()), "{e:?}");
        }
    }
}
