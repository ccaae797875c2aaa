//! `contract`: a release's contract step, run once after the rollout, when no replica of an
//! older release is left.
//!
//! Apps that upgrade without downtime split a schema change in two: *expand* (what `migrate` and
//! `run` do before the new code starts) and *contract* (drop the old column, add the NOT NULL),
//! safe only once no replica of the old release runs. Every replica the gate starts tags its
//! sessions with its release ([`crate::sessions`]), so the gate can see when the old ones are
//! gone; the step then runs as a migration of its own, under the same lock and ledger:
//!
//! 1. **Settle** ([`settle`]): wait until release R is done and no app session of an *older*
//!    release of this lock has been seen for `--settle` (the rollback window; one that appears
//!    restarts it). Older: any release not recorded after R was done (an unknown tag too);
//!    R's own sessions and those of newer releases (a rollout to R+1 under way) do not count.
//!    At the end of the window at least one of R's own apps must be visible by its tag, or the
//!    step refuses (`--accept-untagged` accepts the risk): without it the gate is blind.
//! 2. **Run** ([`crate::protocol::wait_for_decision`] on the step's own release ID,
//!    [`contract_step`]): one runner takes the lock and runs CMD as a migration (fencing, the
//!    attempt's sessions, tool locks, `--max-failures`, `--migration-timeout`); the others wait
//!    and follow. Under the lock the runner looks once more: an older release's app that came
//!    back since the window closed ends the attempt (recorded `refused: `, not counted) and the
//!    window starts again.
//! 3. Afterwards a replica of an older release is refused (exit 78) where it would follow
//!    ([`crate::ledger::Seen::contracted`]). R+1's expand and R's contract never overlap: they
//!    take the same lock.
//!
//! `--wait-timeout` bounds the whole command.

use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::child::Program;
use crate::config::Contract;
use crate::db::{self, Conn, Failure};
use crate::duration::short;
use crate::error::{EXIT_OK, Error, Result};
use crate::holding::Ending;
use crate::ledger::{CONTRACT_STEP, ReadKey, contract_step};
use crate::protocol::{Decision, Role, wait_for_decision};
use crate::replica::Replica;
use crate::sessions::{self, OtherRelease, Tag};
use crate::sql::{ROUND_TRIP_TIMEOUT, deadline};
use crate::termination;

/// How often a runner looks at the ledger and the sessions while it settles.
const POLL: Duration = Duration::from_secs(1);
/// How often it says what it waits for.
const REPORT_EVERY: Duration = Duration::from_secs(10);

/// `contract --release R [--settle D] -- CMD`: exit 0 once R's contract step is done, whoever ran
/// it.
pub(crate) async fn contract(plan: Contract) -> Result<i32> {
    let until = Instant::now() + plan.wait_timeout;
    let step = contract_step(&plan.release);
    let mut replica = Replica::new(plan.target.clone(), Some(step))?.for_holder();
    replica.application = Some(plan.application.clone());
    // The step's sessions are R's: they count as R's own apps, never as an older release.
    replica.tag_release = Some(plan.release.clone());
    loop {
        if settle(&replica, &plan, until).await? == Settled::StepDone {
            return Ok(done_elsewhere(&plan.release));
        }
        let role = Role::Migrate {
            slots: plan.slots,
            plan: plan.holder,
        };
        let left = until.saturating_duration_since(Instant::now());
        let holding = match wait_for_decision(&replica, role, left).await? {
            Decision::Follow { .. } => return Ok(done_elsewhere(&plan.release)),
            Decision::Hold(holding) => *holding,
        };
        // The window closed before the lock was taken: look once more, now that no other
        // runner can start the step.
        let again = match look(&replica, &plan, &mut None).await {
            Ok(again) => again,
            Err(Failure::Fatal(e)) => return Err(holding.refuse(&replica, e).await),
            Err(Failure::Retry(reason)) => {
                let e = Error::Unavailable(format!(
                    "could not look for apps of older releases under the lock: {reason}"
                ));
                return Err(holding.refuse(&replica, e).await);
            }
        };
        if !again.older.is_empty() {
            let e = Error::Config(format!(
                "an app of an older release connected again before the contract step of {:?} could run: {}; the settle window starts again",
                plan.release,
                list(&again.older)
            ));
            warn!("{}", holding.refuse(&replica, e).await);
            continue;
        }
        let program = Program::new(&plan.command, (&plan.flag.name, &plan.flag.on));
        let holding = holding
            .migrate(&replica, &program, "contract command")
            .await?;
        holding
            .end(&replica, Ending::done(Some(0), "contract command exited 0"))
            .await?;
        termination::write_success(&format!(
            "ran the contract step of release {:?} (this runner held the lock; the contract command exited 0)",
            plan.release
        ));
        return Ok(EXIT_OK);
    }
}

/// Another runner ran the step (or it was done before this one started).
fn done_elsewhere(release: &str) -> i32 {
    info!(
        release,
        "the contract step of this release is done; this runner did not run it"
    );
    termination::write_success(&format!(
        "the contract step of release {release:?} is done; this runner did not run it"
    ));
    EXIT_OK
}

/// How [`settle`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settled {
    /// The step is done: nothing to run.
    StepDone,
    /// The release is done and no older app was seen for `--settle`.
    Quiet,
}

/// Step 1: waits until the release is done and no app of an older release has been seen for
/// `--settle`, saying every [`REPORT_EVERY`] what it waits for. Fails at `until`
/// (`--wait-timeout`), after `--connect-timeout` of lost connections, or (78) when no app of the
/// release is visible by its tag and `--accept-untagged` is not given.
async fn settle(replica: &Replica, plan: &Contract, until: Instant) -> Result<Settled> {
    let started = Instant::now();
    let mut conn: Option<Conn> = None;
    let mut quiet_since: Option<Instant> = None;
    let mut trouble_since: Option<Instant> = None;
    let mut next_report = Instant::now();
    let mut last = String::from("nothing seen yet");
    loop {
        if Instant::now() >= until {
            return Err(Error::Timeout {
                what: format!(
                    "timed out before the contract step of release {:?} could run",
                    plan.release
                ),
                waited: started.elapsed(),
                hint: format!("{last}; raise --wait-timeout, or stop the older release's replicas"),
            });
        }
        let seen = match look(replica, plan, &mut conn).await {
            Ok(seen) => seen,
            Err(Failure::Fatal(e)) => return Err(e),
            Err(Failure::Retry(reason)) => {
                conn = None;
                let since = *trouble_since.get_or_insert_with(|| {
                    db::log_retry("lost the database connection while settling", &reason);
                    Instant::now()
                });
                if since.elapsed() >= replica.target.connect_timeout {
                    return Err(replica.db.gave_up(&reason));
                }
                tokio::time::sleep(POLL).await;
                continue;
            }
        };
        trouble_since = None;
        if seen.step_done {
            return Ok(Settled::StepDone);
        }
        let report = Instant::now() >= next_report;
        if !seen.release_done {
            quiet_since = None;
            last = format!("release {:?} is not done", plan.release);
            if report {
                info!(
                    release = plan.release,
                    "waiting for release {:?} to be migrated before its contract step",
                    plan.release
                );
            }
        } else if !seen.older.is_empty() {
            if quiet_since.take().is_some() {
                info!(
                    release = plan.release,
                    "an app of an older release connected again; the settle window starts again: {}",
                    list(&seen.older)
                );
            }
            last = format!(
                "apps of older releases were still connected: {}",
                list(&seen.older)
            );
            if report {
                info!(
                    release = plan.release,
                    waited_s = started.elapsed().as_secs(),
                    "waiting for apps of older releases to disconnect before the contract step: {}",
                    list(&seen.older)
                );
            }
        } else {
            let since = *quiet_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= plan.settle {
                if seen.own == 0 && !plan.accept_untagged {
                    return Err(untagged(plan));
                }
                info!(
                    release = plan.release,
                    own_sessions = seen.own,
                    "no app of an older release seen for {} (--settle); running the contract step",
                    short(plan.settle)
                );
                return Ok(Settled::Quiet);
            }
            last = format!(
                "no app of an older release seen for {} of the {} --settle",
                short(since.elapsed()),
                short(plan.settle)
            );
            if report {
                info!(
                    release = plan.release,
                    own_sessions = seen.own,
                    "no app of an older release connected; running the contract step once none has been seen for {} (--settle, {} left)",
                    short(plan.settle),
                    short(plan.settle.saturating_sub(since.elapsed()))
                );
            }
        }
        if report {
            next_report = Instant::now() + REPORT_EVERY;
        }
        let pause = POLL.min(until.saturating_duration_since(Instant::now()));
        tokio::time::sleep(pause).await;
    }
}

/// The blind spot, said: no session of the release is visible by its tag.
fn untagged(plan: &Contract) -> Error {
    Error::Config(format!(
        "no app session of release {:?} is visible by its tag, so the gate cannot tell whether apps of an older release are still connected either: \
         start the apps through the gate (`run`, `wait -- APP`), whose sessions carry the release in application_name (PGAPPNAME, which libpq, psycopg, \
         node-postgres and pgx read; a driver that does not read it leaves them untagged), or pass --accept-untagged to run the contract step anyway",
        plan.release
    ))
}

/// One look at the ledger and the sessions.
#[derive(Debug, Default)]
struct Seen {
    /// The contract step is recorded done.
    step_done: bool,
    /// The release is recorded done.
    release_done: bool,
    /// Sessions of the release's own apps (and of the step's attempts).
    own: i64,
    /// Sessions of older releases (any release not recorded after this one was done).
    older: Vec<OtherRelease>,
}

/// Reads the step's and the release's state and the tagged sessions of this lock, on `conn`
/// (a new connection when `None`; dropped by the caller on error). Each round trip is bounded.
async fn look(
    replica: &Replica,
    plan: &Contract,
    conn: &mut Option<Conn>,
) -> std::result::Result<Seen, Failure> {
    let db = &replica.db;
    let c = match conn {
        Some(c) => c,
        None => conn.insert(db.connect_once(db.connect_try_timeout()).await?),
    };
    let bounded = |e: sqlx::Error| db.classify(&e);
    let c = c.pg().await.map_err(bounded)?;
    let ledger = &replica.ledger;
    let step = contract_step(&plan.release);
    let step_seen = deadline(ROUND_TRIP_TIMEOUT, ledger.is_done(c, &step, ReadKey::No))
        .await
        .map_err(bounded)?;
    let release_seen = deadline(
        ROUND_TRIP_TIMEOUT,
        ledger.is_done(c, &plan.release, ReadKey::No),
    )
    .await
    .map_err(bounded)?;
    let mut seen = Seen {
        step_done: step_seen.done == Some(true),
        release_done: release_seen.done == Some(true),
        ..Seen::default()
    };
    if seen.step_done || !seen.release_done {
        return Ok(seen);
    }
    let newer = deadline(ROUND_TRIP_TIMEOUT, ledger.newer_than(c, &plan.release))
        .await
        .map_err(bounded)?;
    // A tag without a release: every release's sessions come back, each named when the
    // ledger knows it.
    let every = Tag::new(replica.identity(), None, None);
    let table = ledger.tables().ledger();
    let tagged = deadline(
        ROUND_TRIP_TIMEOUT,
        sessions::other_releases(c, &every, (&table, replica.lock().key)),
    )
    .await
    .map_err(bounded)?;
    for group in tagged {
        match group.name.as_deref() {
            Some(name) if name == plan.release => seen.own += group.sessions,
            Some(name) if newer.iter().any(|n| n == name) || name.starts_with(CONTRACT_STEP) => {}
            _ => seen.older.push(group),
        }
    }
    Ok(seen)
}

/// Sessions of older releases, in one line.
fn list(older: &[OtherRelease]) -> String {
    older
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}
