//! Every way the gate can fail, and the one place that turns a failure into an exit code.
//!
//! The exit codes follow sysexits(3) where one fits and the shell's conventions for commands
//! (126 not executable, 127 not found). They are part of the public contract and documented in
//! the README: change them only with a major version.

use std::time::Duration;

/// Exit code: success.
pub(crate) const EXIT_OK: i32 = 0;
/// Exit code of `status --release R` when R is not done (a check, not a failure).
pub(crate) const EXIT_NOT_DONE: i32 = 1;
/// Exit code: command-line usage error, malformed URL, bad configuration (`EX_USAGE`).
pub(crate) const EXIT_USAGE: i32 = 64;
/// Exit code: the release's migration failed `--max-failures` times, so no replica runs it
/// again until `reset --release R` (`EX_DATAERR`: what the release brings is wrong, not the
/// gate's input or the database).
pub(crate) const EXIT_RELEASE_FAILING: i32 = 65;
/// Exit code: `reset` found nothing recorded for its lock, ledger and release (`EX_NOINPUT`):
/// most often a wrong `--lock`, `--schema` or `--release`.
pub(crate) const EXIT_NOTHING_TO_RESET: i32 = 66;
/// Exit code: the database could not be reached, or was lost (`EX_UNAVAILABLE`); `check`: also
/// a read-only standby where the release is not done.
pub(crate) const EXIT_UNAVAILABLE: i32 = 69;
/// Exit code: an internal error (`EX_SOFTWARE`).
pub(crate) const EXIT_INTERNAL: i32 = 70;
/// Exit code: the gate's output could not be written (`EX_IOERR`): standard output is a full
/// disk or a closed file (a closed pipe is a normal end, exit 0), or `install` cannot write
/// its copy (a read-only filesystem).
pub(crate) const EXIT_OUTPUT: i32 = 74;
/// Exit code: timed out waiting for the lock, the release, or readiness (`EX_TEMPFAIL`).
pub(crate) const EXIT_TIMEOUT: i32 = 75;
/// Exit code: the database refused our credentials or permissions (`EX_NOPERM`); `check`: a
/// privilege the gate needs is missing.
pub(crate) const EXIT_AUTH: i32 = 77;
/// Exit code: a preflight check refused this replica's configuration (`EX_CONFIG`): a
/// `--same-env` variable differs from the release's first replica, a preset rule fails, or the
/// release is older than one already migrated; or the server is older than the supported range
/// (PostgreSQL 13 to 18), refused right after connecting, before any DDL.
pub(crate) const EXIT_CONFIG: i32 = 78;
/// Exit code: the command exists but could not be executed (as shells do).
pub(crate) const EXIT_NOT_EXECUTABLE: i32 = 126;
/// Exit code: the command was not found (as shells do).
pub(crate) const EXIT_NOT_FOUND: i32 = 127;

/// Every exit code of the gate's own; a failed migration passes on its command's code besides.
/// `--help` and the README's "Exit codes" table list each one: the tests check both against
/// this list, and that every [`Error`] maps into it.
#[cfg(test)]
pub(crate) const EXIT_CODES: [i32; 13] = [
    EXIT_OK,
    EXIT_NOT_DONE,
    EXIT_USAGE,
    EXIT_RELEASE_FAILING,
    EXIT_NOTHING_TO_RESET,
    EXIT_UNAVAILABLE,
    EXIT_INTERNAL,
    EXIT_OUTPUT,
    EXIT_TIMEOUT,
    EXIT_AUTH,
    EXIT_CONFIG,
    EXIT_NOT_EXECUTABLE,
    EXIT_NOT_FOUND,
];

/// A failure of the gate. Each variant's message is one line a human can act on; none ever
/// contains a password.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// Wrong flags or configuration.
    #[error("{0}")]
    Usage(String),

    /// The database did not answer in time, or the connection was lost.
    #[error("{0}")]
    Unavailable(String),

    /// The database refused the credentials or a permission.
    #[error("{0}")]
    Auth(String),

    /// A preflight check refused this replica's configuration; the app was not started.
    #[error("{0}")]
    Config(String),

    /// Waited longer than the configured timeout.
    #[error("{what} after {}; {hint}", crate::duration::short(*waited))]
    Timeout {
        /// What we were waiting for.
        what: String,
        /// How long we waited.
        waited: Duration,
        /// What the operator can do about it.
        hint: String,
    },

    /// `reset` found the lock held: a migration may be running. It exits like a timeout (75,
    /// `EX_TEMPFAIL`: the same command succeeds later), with the message it has always had.
    #[error(
        "reset refused: lock {lock} is held by {holder} after 0ms; a migration may be running; try again when it has finished"
    )]
    LockHeld {
        /// The lock, as it prints.
        lock: String,
        /// Who holds it, as it prints.
        holder: String,
    },

    /// The command to run does not exist.
    #[error(
        "command not found: {program}: check the command after `--` (or in --migrate) and the PATH"
    )]
    CommandNotFound {
        /// The program name as given.
        program: String,
    },

    /// The command exists but could not be started.
    #[error("cannot execute {program}: {source}")]
    CommandNotExecutable {
        /// The program name as given.
        program: String,
        /// Why the kernel refused.
        source: std::io::Error,
    },

    /// The migration (or the app started to migrate) failed; the gate exits with its code.
    #[error("{what} failed with exit code {code}; the release was not marked done")]
    MigrationFailed {
        /// The failing step, e.g. "migration command `alembic upgrade head`".
        what: String,
        /// The exit code to pass on (128+signal if it was killed).
        code: i32,
    },

    /// The release's migration failed `--max-failures` times: no replica runs it again until
    /// `reset`.
    #[error(
        "release {release:?} failed {failures} time(s), the limit set by --max-failures; not running it again. Last failure: attempt {id} on {host} ({holder}), {last}. Fix the migration, then run `migrations-gate reset --release {release}`"
    )]
    ReleaseFailing {
        /// The release ID.
        release: String,
        /// Failed attempts counted.
        failures: usize,
        /// The last failed attempt's row ID.
        id: i64,
        /// Its holder's host name.
        host: String,
        /// Its holder's `application_name`.
        holder: String,
        /// The first line of its recorded failure.
        last: String,
    },

    /// `reset` found nothing of the release under this lock and ledger.
    #[error(
        "nothing to reset: no attempt of release {release:?} is recorded for lock {lock} in ledger {ledger} ({seen}); check --lock, --schema and --release (or --release-from): give reset the deployment's own settings"
    )]
    NothingToReset {
        /// The release looked for.
        release: String,
        /// The lock, with its key.
        lock: String,
        /// The ledger table.
        ledger: String,
        /// What the ledger does hold, for the operator to compare.
        seen: String,
    },

    /// What the gate writes (standard output, the binary `install` copies) could not be
    /// written: a full disk, a read-only filesystem, a closed file. The message says what to check.
    #[error("{0}")]
    Output(String),

    /// Something that should not happen.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// The process exit code for this failure. This is the only mapping from errors to codes.
    pub(crate) fn exit_code(&self) -> i32 {
        match self {
            Error::Usage(_) => EXIT_USAGE,
            Error::ReleaseFailing { .. } => EXIT_RELEASE_FAILING,
            Error::NothingToReset { .. } => EXIT_NOTHING_TO_RESET,
            Error::Unavailable(_) => EXIT_UNAVAILABLE,
            Error::Auth(_) => EXIT_AUTH,
            Error::Config(_) => EXIT_CONFIG,
            Error::Timeout { .. } | Error::LockHeld { .. } => EXIT_TIMEOUT,
            Error::CommandNotFound { .. } => EXIT_NOT_FOUND,
            Error::CommandNotExecutable { .. } => EXIT_NOT_EXECUTABLE,
            // A command that reports success but failed (killed by a signal maps to 128+n, so
            // 0 only appears if the app exited cleanly before it was ready): still a failure.
            Error::MigrationFailed { code, .. } => {
                if *code == 0 {
                    1
                } else {
                    *code
                }
            }
            Error::Internal(_) => EXIT_INTERNAL,
            Error::Output(_) => EXIT_OUTPUT,
        }
    }
}

/// The exit code of `check`, from what it found (`problems`, most fundamental first): 0 when the
/// gate has everything it needs; otherwise the code the gate itself would exit with on the
/// first problem, so that a script reads `check` as it reads the gate: 69 not reachable, or a
/// read-only standby (or read-only server) where the release is not done (a holder needs the
/// primary); 77 credentials refused or a privilege the gate needs missing; 78 a server older
/// than 13. What the gate does not need (`DELETE` for `reset`, `pg_signal_backend`) is shown,
/// never a problem.
pub(crate) fn check_exit_code(problems: &[Error]) -> i32 {
    problems.first().map_or(EXIT_OK, Error::exit_code)
}

/// Shorthand used throughout the crate.
pub(crate) type Result<T, E = Error> = std::result::Result<T, E>;
