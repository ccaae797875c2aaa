//! The ledger's row types: what an attempt records and what a read returns.

use crate::lock::Proof;
use crate::schema::StoredKey;

/// Who begins an attempt, for the record.
#[derive(Debug, Clone)]
pub(crate) struct NewAttempt<'a> {
    /// The release being migrated to (`None` in serial mode).
    pub(crate) release: Option<&'a str>,
    /// The gate's `application_name`.
    pub(crate) holder: &'a str,
    /// The gate's host name.
    pub(crate) host: &'a str,
    /// The gate's process ID.
    pub(crate) pid: u32,
    /// Seconds this holder needs, after its last heartbeat, to notice a lost session and stop
    /// its migration: a taker-over waits that long after a vanished holder.
    pub(crate) fence_secs: u32,
    /// The fingerprint of the application it migrates for ([`crate::application`]), written
    /// only where the ledger has the `app` column.
    pub(crate) app: Option<String>,
}

/// The attempt a holder has begun, and the proof that its lock session holds the lock: what
/// every statement acting for that attempt carries.
#[derive(Debug, Clone)]
pub(crate) struct HeldAttempt {
    /// The attempt's row ID.
    pub(crate) id: i64,
    /// The lock session's proof.
    pub(crate) proof: Proof,
}

/// How an attempt ended, as [`super::Ledger::finish`] records it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttemptEnd<'a> {
    pub(crate) outcome: Outcome,
    /// The migration's (or app's) exit code, if it exited.
    pub(crate) exit_code: Option<i32>,
    /// Why, for people (`status`).
    pub(crate) detail: &'a str,
}

/// What [`super::Ledger::stale`] found.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stale {
    /// Attempts still recorded `running`.
    pub(crate) running: u64,
    /// Seconds until the latest of their holders has surely stopped its migration.
    pub(crate) wait_secs: f64,
    /// Whether our lock session still held the lock when this was read.
    pub(crate) held: bool,
}

/// What [`super::Ledger::begin`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Begun {
    /// The attempt is recorded `running` with this row ID.
    Attempt(i64),
    /// Nothing: the lock is no longer held by our lock session.
    LockLost,
    /// Nothing: the release is done.
    AlreadyDone,
}

/// Where an attempt stands: the ledger's `outcome` column, every state it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Outcome {
    /// The holder is at it.
    Running,
    /// Migrated; the release is done.
    Done,
    /// The command failed, the holder refused or stopped it, or fenced itself.
    Failed,
    /// The holder vanished; marked by the next holder.
    Abandoned,
}

impl Outcome {
    /// As the ledger spells it.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Outcome::Running => "running",
            Outcome::Done => "done",
            Outcome::Failed => "failed",
            Outcome::Abandoned => "abandoned",
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Outcome {
    type Err = UnknownOutcome;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            Outcome::Running,
            Outcome::Done,
            Outcome::Failed,
            Outcome::Abandoned,
        ]
        .into_iter()
        .find(|o| o.as_str() == s)
        .ok_or_else(|| UnknownOutcome(s.to_string()))
    }
}

/// Why a `failed` attempt does not count against `--max-failures` ([`super::Ledger::failures`]): the
/// start of its `detail`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotCounted {
    /// The holder lost its lock session and stopped the migration.
    Fenced,
    /// The migration never started.
    Refused,
    /// The gate was stopped by a signal (SIGTERM, SIGINT, SIGQUIT) and passed it on.
    Interrupted,
}

/// Every reason an attempt does not count.
pub(crate) const NOT_COUNTED: [NotCounted; 3] = [
    NotCounted::Fenced,
    NotCounted::Refused,
    NotCounted::Interrupted,
];

impl AttemptRow {
    /// Why this failed attempt does not count against `--max-failures`, if it does not.
    pub(crate) fn not_counted(&self) -> Option<NotCounted> {
        if self.outcome != Outcome::Failed {
            return None;
        }
        NOT_COUNTED
            .into_iter()
            .find(|n| self.detail.starts_with(n.prefix()))
    }
}

impl NotCounted {
    /// How the attempt's `detail` starts.
    pub(crate) fn prefix(self) -> &'static str {
        match self {
            NotCounted::Fenced => "fenced: ",
            NotCounted::Refused => "refused: ",
            NotCounted::Interrupted => "interrupted: ",
        }
    }
}

/// An `outcome` the gate does not know (a newer gate's, or a hand edit).
#[derive(Debug, thiserror::Error)]
#[error("unknown attempt outcome {0:?} in the ledger")]
pub(crate) struct UnknownOutcome(String);

/// Whether [`super::Ledger::is_done`] may read the `--same-env` key. Not inside the lock's
/// transaction: a missing key table there would abort it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadKey {
    /// When this replica compares variables.
    IfCompared,
    /// Never.
    No,
}

/// What one look at the ledger saw.
#[derive(Debug, Clone, Default)]
pub(crate) struct Seen {
    /// Whether the release is done; `None` when the ledger does not exist yet.
    pub(crate) done: Option<bool>,
    /// Whether the server is a read-only standby (`pg_is_in_recovery()`).
    pub(crate) standby: bool,
    /// When the release is done: the newest release done after it on this lock, if any (a
    /// replica of an older release must not start on a schema that moved on).
    pub(crate) newer: Option<Newer>,
    /// When the release is done: the newest contract step of *another* release done after it
    /// (`release` is that release): the schema was contracted for a newer release, and this
    /// one's code may not run on it.
    pub(crate) contracted: Option<Newer>,
    /// The `--same-env` key, when asked for ([`super::Ledger::read_env_key`]) and it exists.
    pub(crate) env_key: Option<StoredKey>,
    /// When the release is done: the fingerprint of the application its holder migrated for
    /// ([`crate::application`]); `None` when none was recorded. Read as `to_jsonb(row) ->>
    /// 'app'`, so that a ledger without the column reads `NULL` instead of failing.
    pub(crate) app: Option<String>,
}

/// How the ledger names a release's contract step (`migrations-gate contract`, [`crate::contract`]):
/// its own release ID in the ledger, so that it is done once, fenced, bounded and counted as a
/// migration is. `--release` refuses IDs that start with it.
pub(crate) const CONTRACT_STEP: &str = "contract:";

/// The ledger's release ID of `release`'s contract step.
pub(crate) fn contract_step(release: &str) -> String {
    format!("{CONTRACT_STEP}{release}")
}

/// Where a release's contract step stands, for `status` and `check`. The JSON field names are
/// a stable interface.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub(crate) struct ContractState {
    /// The release.
    pub(crate) release: String,
    /// Its step's release ID in the ledger (`contract:R`).
    pub(crate) step: String,
    /// `pending` (the release is done, its step has not run), `waiting for its release`, or the
    /// outcome of the step's newest attempt: `running`, `done`, `failed`, `abandoned`.
    pub(crate) state: String,
}

/// A release done after the one a replica asked about.
#[derive(Debug, Clone)]
pub(crate) struct Newer {
    /// Its ID.
    pub(crate) release: String,
    /// Who migrated it (`application_name`).
    pub(crate) holder: String,
    /// When, for people (`YYYY-MM-DD HH:MM:SS UTC`).
    pub(crate) finished_at: String,
}

/// One attempt as `status` shows it. The JSON field names are a stable interface.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct AttemptRow {
    /// Row ID (grows with each attempt).
    pub(crate) id: i64,
    /// Release ID (`null` in serial mode).
    pub(crate) release: Option<String>,
    /// `running`, `done`, `failed` or `abandoned`.
    pub(crate) outcome: Outcome,
    /// The holder's `application_name`.
    pub(crate) holder: String,
    /// The holder's host name.
    pub(crate) host: String,
    /// The holder gate's process ID.
    pub(crate) pid: i64,
    /// Start, RFC 3339 UTC.
    pub(crate) started_at: String,
    /// End, RFC 3339 UTC (`null` while running).
    pub(crate) finished_at: Option<String>,
    /// Seconds from start to end (or to now while running).
    pub(crate) duration_secs: Option<f64>,
    /// Exit code of the migration (or app), if known.
    pub(crate) exit_code: Option<i32>,
    /// Why it ended this way.
    pub(crate) detail: String,
}
