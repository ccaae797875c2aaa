//! What bounds and watches the holder's migration: `--migration-timeout`, `--lock-timeout`,
//! `--report-waits-after` ([`HolderPlan`]), what its sessions wait on, and apps of other releases
//! still connected before it migrates (`--other-releases`).

use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::{HEARTBEAT_TIMEOUT, Holding};
use crate::error::{Error, Result};
use crate::ledger::{AttemptRow, Outcome};
use crate::lockwaits;
use crate::replica::Replica;
use crate::sessions;
use crate::sql;

/// The holder's settings, made once from the command line ([`crate::config`]) and carried with
/// the lock ([`crate::protocol::Role::Migrate`], then [`super::Takeover`]) into [`Holding`]:
/// what taking over reads (`--max-failures`, `--keep-tool-locks`) and how the holder stops,
/// bounds and watches a migration (`--kill-grace`, `--migration-timeout`, `--lock-timeout`,
/// `--report-waits-after`, `--other-releases`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct HolderPlan {
    /// After SIGTERM, how long before SIGKILL.
    pub(crate) kill_grace: Duration,
    /// How long the migration command may run (`None`: no bound).
    pub(crate) migration_timeout: Option<Duration>,
    /// `lock_timeout` for the migration command's sessions (direct routes only).
    pub(crate) lock_timeout: Option<Duration>,
    /// How long a session of the attempt waits on a lock before the holder reports it.
    pub(crate) report_waits_after: Duration,
    /// What to do while apps of another release are connected.
    pub(crate) other_releases: OtherReleases,
    /// `--max-failures` (0: no limit).
    pub(crate) max_failures: u32,
    /// `--keep-tool-locks`.
    pub(crate) keep_tool_locks: bool,
}

/// What the holder does when apps of another release of the same lock are still connected
/// before it migrates (`--other-releases`; each value's `--help` line is in
/// `config/value_enums.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OtherReleases {
    /// Wait for them to disconnect, then migrate.
    Wait,
    /// Refuse: exit 78.
    Fail,
    /// Migrate anyway.
    Ignore,
}

/// How often the holder looks again while other releases are connected.
const OTHER_RELEASES_POLL: Duration = Duration::from_secs(1);
/// How often it says who is still connected.
const OTHER_RELEASES_REPORT: Duration = Duration::from_secs(10);

impl Holding {
    /// `" (the previous attempt N failed too)"` after a failed attempt, else empty: for the
    /// final messages, so that repeated failures show in the termination message too.
    pub(crate) fn failed_too(&self) -> String {
        self.previous_failure
            .as_ref()
            .map(|p| format!(" (the previous attempt {p} failed too)"))
            .unwrap_or_default()
    }

    /// The attempt before ours, when it failed (`3 by <holder>`).
    pub(crate) fn previous_failure(&self) -> Option<&str> {
        self.previous_failure.as_deref()
    }

    /// Before the migration: looks for sessions of this lock's apps of another release (their
    /// tag's release differs from ours) and waits for them to disconnect, refuses, or goes on,
    /// as `policy` says. Without a release there is nothing to compare. A refusal, or a wait
    /// longer than `bound` (`--wait-timeout`), is recorded as a failed attempt (which frees the
    /// lock) and exits 78 or 75.
    pub(crate) async fn no_other_releases(mut self, replica: &Replica) -> Result<Holding> {
        let (policy, bound) = (self.plan.other_releases, self.wait_timeout);
        let Some(release) = replica.release() else {
            return Ok(self);
        };
        if policy == OtherReleases::Ignore {
            return Ok(self);
        }
        let started = Instant::now();
        let mut said: Option<Instant> = None;
        loop {
            let others = match self.other_releases(replica).await {
                Ok(others) if others.is_empty() => {
                    if said.is_some() {
                        let waited_s = started.elapsed().as_secs();
                        info!(
                            waited_s,
                            "no app of another release is connected any more; migrating"
                        );
                    }
                    return Ok(self);
                }
                Ok(others) => others,
                Err(e) => return Err(self.refuse(replica, e).await),
            };
            if let Some(e) = refusal(release, &others, policy, (started.elapsed(), bound)) {
                return Err(self.refuse(replica, e).await);
            }
            if said.is_none_or(|at| at.elapsed() >= OTHER_RELEASES_REPORT) {
                warn!(
                    waited_s = started.elapsed().as_secs(),
                    "apps of another release are still connected; waiting for them to disconnect before migrating (--other-releases wait, up to --wait-timeout): {others}"
                );
                said = Some(Instant::now());
            }
            if let Err(reason) = self.heartbeat(replica).await {
                self.close().await;
                return Err(Error::Unavailable(format!(
                    "lost the lock session while waiting for apps of other releases to disconnect ({reason}); nothing was migrated"
                )));
            }
            tokio::time::sleep(OTHER_RELEASES_POLL).await;
        }
    }

    /// The sessions of this lock's apps of another release, in one line (empty: none).
    async fn other_releases(&mut self, replica: &Replica) -> Result<String> {
        let tag = self.sessions.tag().clone();
        let ledger = (replica.ledger.tables().ledger(), replica.lock().key);
        let found = match self.ledger_conn().await {
            Ok(c) => {
                sql::deadline(
                    HEARTBEAT_TIMEOUT,
                    sessions::other_releases(c, &tag, (&ledger.0, ledger.1)),
                )
                .await
            }
            Err(e) => Err(e),
        };
        let found = found.map_err(|e| {
            Error::Unavailable(format!("could not look for apps of other releases: {e}"))
        })?;
        Ok(found
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; "))
    }

    /// Looks at what the attempt's sessions wait on and logs what changed. Best effort: a
    /// failure here is the heartbeat's to notice.
    pub(super) async fn report_waits(
        &mut self,
        reporter: &mut lockwaits::Reporter,
        after: Duration,
    ) {
        let (which, version) = (self.sessions.which(), self.server_version);
        let found = match self.ledger_conn().await {
            Ok(c) => {
                sql::deadline(
                    HEARTBEAT_TIMEOUT,
                    lockwaits::waits(c, &which, after, version),
                )
                .await
            }
            Err(e) => Err(e),
        };
        match found {
            Ok(waits) => reporter.observe(waits),
            Err(e) => tracing::debug!(error = %e, "could not look at what the migration waits on"),
        }
    }
}

/// Why the holder refuses to wait any longer for apps of other releases (`others`), if it does:
/// `--other-releases fail` at once, `wait` after `--wait-timeout` (`waited` of `bound`).
fn refusal(
    release: &str,
    others: &str,
    policy: OtherReleases,
    (waited, bound): (Duration, Duration),
) -> Option<Error> {
    if policy == OtherReleases::Fail {
        return Some(Error::Config(format!(
            "refusing to migrate release {release:?} while apps of another release are connected ({others}) (--other-releases fail): \
             stop the old replicas before the new ones start (Kubernetes: strategy Recreate; Swarm: update_config order stop-first; or scale the old release to 0), \
             or use --other-releases wait or ignore"
        )));
    }
    (waited >= bound).then(|| Error::Timeout {
        what: format!("apps of another release were still connected ({others})"),
        waited: bound,
        hint: "nothing was migrated; stop the old replicas (strategy Recreate, or scale them down) or raise --wait-timeout".into(),
    })
}

/// Repeated failures are visible: logs the attempt before ours (`previous`, the newest row of
/// the release before ours was written) if it did not succeed, before we migrate again.
/// Returns it in short (`3 by <holder>`), for the final messages.
pub(super) fn say_previous_failure(previous: Option<Vec<AttemptRow>>) -> Option<String> {
    let p = previous
        .and_then(|rows| rows.into_iter().next())
        .filter(|a| matches!(a.outcome, Outcome::Failed | Outcome::Abandoned))?;
    warn!(
        previous_attempt = p.id,
        "the previous attempt {} by {} (host {}, pid {}) {} with exit code {} at {}: {}; migrating again",
        p.id,
        p.holder,
        p.host,
        p.pid,
        p.outcome,
        p.exit_code.map_or("-".into(), |c| c.to_string()),
        p.finished_at.as_deref().unwrap_or(&p.started_at),
        p.detail.lines().next().unwrap_or("no detail")
    );
    Some(format!("{} by {}", p.id, p.holder))
}
