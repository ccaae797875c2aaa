//! The values of the flags that take one of a few words, as clap parses and documents them
//! (`--help` lists each with its line). Each is turned into the crate's own type here, so that
//! nothing below the command line derives or sees clap.

use clap::ValueEnum;

use crate::holding::OtherReleases;
use crate::lock::Scope;
use crate::preflight::{OnMismatch, Preset};

/// How the lock is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum ScopeArg {
    /// Decide once per gate, on its first connection that needs it: session on a direct
    /// connection, transaction when a pooler or proxy sits between.
    Auto,
    /// `pg_try_advisory_lock`, held by the session: no open transaction while migrating, so
    /// `CREATE INDEX CONCURRENTLY` in the migration never waits for us. Needs a direct
    /// connection or session pooling.
    Session,
    /// `pg_try_advisory_xact_lock` inside a transaction kept open (with heartbeats) until the
    /// ledger row commits: correct behind transaction pooling, where a session lock would leak
    /// onto a pooled server connection and never be released.
    Transaction,
}

impl From<ScopeArg> for Scope {
    fn from(a: ScopeArg) -> Scope {
        match a {
            ScopeArg::Auto => Scope::Auto,
            ScopeArg::Session => Scope::Session,
            ScopeArg::Transaction => Scope::Transaction,
        }
    }
}

/// What the holder does when apps of another release of the same lock are still connected
/// before it migrates (`--other-releases`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum OtherReleasesArg {
    /// Wait until they have disconnected (bounded by --wait-timeout), then migrate.
    Wait,
    /// Refuse (exit 78): record the attempt failed and free the lock.
    Fail,
    /// Migrate anyway (migrations that old releases survive).
    Ignore,
}

impl From<OtherReleasesArg> for OtherReleases {
    fn from(a: OtherReleasesArg) -> OtherReleases {
        match a {
            OtherReleasesArg::Wait => OtherReleases::Wait,
            OtherReleasesArg::Fail => OtherReleases::Fail,
            OtherReleasesArg::Ignore => OtherReleases::Ignore,
        }
    }
}

/// What a `--same-env` difference does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum OnMismatchArg {
    /// Refuse to start the app: exit 78.
    Fail,
    /// Log a warning and start the app.
    Warn,
}

impl From<OnMismatchArg> for OnMismatch {
    fn from(a: OnMismatchArg) -> OnMismatch {
        match a {
            OnMismatchArg::Fail => OnMismatch::Fail,
            OnMismatchArg::Warn => OnMismatch::Warn,
        }
    }
}

/// A named set of rules for a known app (README, "Preflight").
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum PresetArg {
    /// Open WebUI's multi-replica checklist.
    #[value(name = "open-webui")]
    OpenWebui,
}

impl From<PresetArg> for Preset {
    fn from(a: PresetArg) -> Preset {
        match a {
            PresetArg::OpenWebui => Preset::OpenWebui,
        }
    }
}
