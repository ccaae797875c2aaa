//! The holder's flags: how the replica that migrates stops its child, bounds the migration and
//! watches what it waits on. Shared by `migrate` and `run`; turned into plain
//! [`crate::holding::HolderPlan`] by the plan.

use std::time::Duration;

use clap::Args;

use super::{parse_duration, parse_lock_timeout};
use crate::holding::OtherReleases;

/// How the holder stops, bounds and watches the migration.
#[derive(Debug, Clone, Args)]
pub(crate) struct HolderArgs {
    /// After SIGTERM, wait this long before SIGKILL when the gate must stop its child (a timeout, a signal to the gate). A holder that lost its lock session never waits: it SIGKILLs at once, so that the next holder can take over 7s after its last heartbeat.
    #[arg(long, env = "MIGRATIONS_GATE_KILL_GRACE", value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub(crate) kill_grace: Duration,

    /// Stop the migration (like a failed one: its process group, then its database sessions) if it runs longer than this; recorded failed, exit 75. Default: no bound.
    #[arg(long, env = "MIGRATIONS_GATE_MIGRATION_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    pub(crate) migration_timeout: Option<Duration>,

    /// Pass `-c lock_timeout=<ms>` in PGOPTIONS to the migration command's sessions, so that a DDL statement fails instead of queueing behind a long transaction (and blocking every reader of its table). Direct connections only: a pooler refuses PGOPTIONS. The migration then needs a retry.
    #[arg(long, env = "MIGRATIONS_GATE_LOCK_TIMEOUT", value_name = "DURATION", value_parser = parse_lock_timeout)]
    pub(crate) lock_timeout: Option<Duration>,

    /// While the migration runs, log (WARN) each of its sessions that has waited on a lock for longer than this, with who blocks it; repeated every 30s while it lasts.
    #[arg(long, env = "MIGRATIONS_GATE_REPORT_WAITS_AFTER", value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub(crate) report_waits_after: Duration,

    /// Stop re-running a release whose migration failed this many times: every replica then exits 65 with the last failure, until `reset --release R`. Attempts that crashed (abandoned), were fenced, or were refused by a check of their own configuration do not count. 0: never stop. Needs --release.
    #[arg(long, env = "MIGRATIONS_GATE_MAX_FAILURES", value_name = "N", default_value_t = 3)]
    pub(crate) max_failures: u32,

    /// Leave the migration tool's own stale lock rows alone (Liquibase's databasechangeloglock, yoyo's yoyo_lock). By default the holder releases such a lock when an earlier attempt of this gate took it and every session of that attempt is gone (docs/guide.md, "Migration tools and their own locks").
    #[arg(long, env = "MIGRATIONS_GATE_KEEP_TOOL_LOCKS")]
    pub(crate) keep_tool_locks: bool,

    /// Before migrating, what to do while apps of another release of this lock are connected (their sessions' tags name it; the gate's own and untagged clients never count; needs --release): wait for them to disconnect (up to --wait-timeout), fail (exit 78, recorded failed), or ignore. [default: wait; fail with --preset open-webui]
    #[arg(long, env = "MIGRATIONS_GATE_OTHER_RELEASES", value_enum, value_name = "POLICY")]
    pub(crate) other_releases: Option<OtherReleases>,

    /// The application this gate migrates for, recorded (as a salted fingerprint) with each attempt and compared before following a done release: a replica that finds its release migrated for another application refuses (exit 78) instead of starting unmigrated. Default: the migration command itself (--migrate CMD, the command after `--` for migrate, or the app for run without --migrate), which every replica of one release shares. Set the same NAME where one application's replicas start by different commands.
    #[arg(long, env = "MIGRATIONS_GATE_APP", value_name = "NAME")]
    pub(crate) app: Option<String>,
}
