//! Preflight: every replica passes through the gate with its environment and a database
//! connection before its app starts, so the gate refuses (exit 78, `EX_CONFIG`) the
//! multi-replica misconfigurations that would otherwise fail later as symptoms.
//!
//! Three kinds of check, in the order a replica meets them:
//!
//! 1. **Local rules** of a preset (`--preset`), before any connection: a small table of
//!    [`Rule`]s, each naming its variables, its [`presets::Condition`], whether it fails or
//!    warns, and why (the README's preset table is this table: [`presets`]).
//! 2. **No older release** (always, unless `--allow-older-release`): a replica whose release is
//!    done but older than a release done after it must not start on a schema that moved on.
//!    The ledger read of the fast path already answers it ([`crate::ledger::Seen::newer`]): no
//!    extra round trip.
//! 3. **Same settings** (`--same-env`, and the presets' [`presets::Condition::Same`] rules):
//!    per variable, a fingerprint of this replica's value, HMAC-SHA256 under a random key that
//!    the gate creates once per ledger schema and keeps in the database (`<schema>.env_key`), so
//!    that a fingerprint alone does not reveal a short secret ([`fingerprint`]). The first
//!    replica of a release sets the reference (`<schema>.env_reference`); every replica records
//!    whether it agreed (`<schema>.env_checks`, for `status`). Reading the reference and
//!    recording both happen in one statement: one round trip ([`store`]). Values and
//!    fingerprints are never printed.
//!
//! This file holds what the command line hands the preflight ([`Settings`]) and the
//! [`Preflight`] of one replica, the state its steps share. The steps live apart because they
//! run at different times and touch different things: [`compile`] turns the flags and the
//! preset's rules into what to compare, before any connection; [`same_env`] is the one round
//! trip that records and compares, after the ledger read; [`mod@fleet`] is what only `check`
//! reports, reading and never writing.

mod budget;
mod compile;
mod fingerprint;
mod fleet;
mod open_webui;
mod presets;
mod same_env;
mod shared_dir;
mod store;
#[cfg(test)]
mod tests;

pub(crate) use fleet::{Fleet, fleet};
pub(crate) use open_webui::{Problem, python_int};
use presets::{Level, Rule};
pub(crate) use presets::{Mode, Preset};
pub(crate) use store::{EnvCheck, Store};

/// The name a shared directory's marker is compared under, as a `--same-env` variable is.
const SHARED_DIR: &str = "shared-dir";

/// What a `--same-env` difference does (`--on-mismatch`; each value's `--help` line is in
/// `config/value_enums.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OnMismatch {
    /// Refuse: exit 78.
    Fail,
    /// Warn and start.
    Warn,
}

/// What the preflight checks, as the command line asked (`--same-env`, `--on-mismatch`,
/// `--preset`, `--allow-older-release`).
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// Variables that must be the same on every replica of a release.
    pub(crate) same_env: Vec<String>,
    /// What a difference does.
    pub(crate) on_mismatch: OnMismatch,
    /// A known app's rules.
    pub(crate) preset: Option<Preset>,
    /// Start even when a newer release was migrated on this database.
    pub(crate) allow_older_release: bool,
    /// A directory every replica must share (`--shared-dir`).
    pub(crate) shared_dir: Option<std::path::PathBuf>,
    /// Refuse (exit 78) a replica that does not share it (`--require-shared-dir`).
    pub(crate) require_shared_dir: bool,
}

/// A variable compared across replicas, and what a difference does.
#[derive(Debug, Clone)]
struct Compared {
    name: String,
    level: Level,
    /// The preset rule that asked for it, if any.
    rule: Option<(&'static str, &'static Rule)>,
    /// Not a variable but a directory every replica must share: the value compared is the
    /// token of the release's marker in it ([`shared_dir`]).
    shared_dir: Option<std::path::PathBuf>,
}

/// The checks of one replica, decided from its flags and environment.
pub(crate) struct Preflight {
    compared: Vec<Compared>,
    /// Open WebUI's connections per process and its workers (`--preset open-webui`).
    budget: Option<(budget::PerProcess, i64)>,
    allow_older: bool,
    on_mismatch: OnMismatch,
}

impl Preflight {
    /// Whether this replica compares variables with the others (and so needs the key).
    pub(crate) fn compares(&self) -> bool {
        !self.compared.is_empty()
    }
}

/// The compared names, for messages: `A,B`.
fn names(compared: &[Compared]) -> String {
    compared
        .iter()
        .map(|c| c.name.as_str())
        .collect::<Vec<_>>()
        .join(",")
}
