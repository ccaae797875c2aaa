//! The flags of `contract`, the post-rollout step ([`crate::contract`]): the gate's own groups
//! (database, release, flag, waiting, holder) and what only the step has.

use std::time::Duration;

use clap::Args;

use super::{DbArgs, FlagArgs, HolderArgs, ReleaseArgs, WaitingArgs, parse_duration};

/// `contract` mode.
#[derive(Debug, Clone, Args)]
pub(crate) struct ContractArgs {
    /// Where the database and the lock are.
    #[command(flatten)]
    pub(crate) db: DbArgs,

    /// The release whose contract step this is (it must be done first).
    #[command(flatten)]
    pub(crate) release: ReleaseArgs,

    /// The environment variable handed to CMD (set to its "on" value).
    #[command(flatten)]
    pub(crate) flag: FlagArgs,

    /// How a runner waits (--wait-timeout bounds the whole command: the release, the settle window, the lock).
    #[command(flatten)]
    pub(crate) waiting: WaitingArgs,

    /// How the runner that holds the lock stops, bounds and watches CMD.
    #[command(flatten)]
    pub(crate) holder: HolderArgs,

    /// How long no app session of an older release of this lock (tagged with its release, as the gate tags every app it starts) must have been seen before CMD runs: the rollback window. A session of an older release that appears meanwhile restarts it.
    #[arg(long, env = "MIGRATIONS_GATE_SETTLE", value_name = "DURATION", default_value = "10m", value_parser = parse_duration)]
    pub(crate) settle: Duration,

    /// Run even when no app session of the release itself is visible by its tag. Without it the step refuses (exit 78): with no tagged session of the release in sight, the gate cannot see an older one either (apps whose driver does not read PGAPPNAME, or not started through the gate).
    #[arg(long, env = "MIGRATIONS_GATE_ACCEPT_UNTAGGED")]
    pub(crate) accept_untagged: bool,

    /// The contract command (drop the old column, add the NOT NULL), run with the flag on by the runner that holds the lock, once per release.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub(crate) command: Vec<String>,
}
