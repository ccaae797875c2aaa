//! `migrations-gate status`: who holds the lock now, and the ledger, for people (a table) and for
//! scripts (stable JSON). With `--release R` it doubles as a readiness check: exit 0 only when R
//! is done.

use serde::Serialize;

use crate::config::Status;
use crate::db::close;
use crate::error::{EXIT_NOT_DONE, EXIT_OK, Error, Result};
use crate::ledger::{AttemptRow, ContractState, Outcome, ReadKey};
use crate::lock::{self, GrantedSession};
use crate::lockwaits::{self, Wait};
use crate::preflight::{EnvCheck, Store};
use crate::replica::Replica;
use crate::sessions::{self, Session};
use crate::tools::{self, ToolLock};

/// The JSON document `status --json` prints. Field names are a stable interface.
#[derive(Debug, Serialize)]
pub(crate) struct StatusReport {
    /// The lock's name (`id:N` for `--lock-id`).
    pub(crate) lock: String,
    /// The 64-bit advisory lock key.
    pub(crate) lock_key: i64,
    /// The session holding the lock now, if any.
    pub(crate) holder: Option<GrantedSession>,
    /// With `--release`: whether it is done.
    pub(crate) release_done: Option<bool>,
    /// Attempts, newest first.
    pub(crate) attempts: Vec<AttemptRow>,
    /// The database sessions of each shown attempt that is `running`, and what they wait on.
    pub(crate) running: Vec<Running>,
    /// `--same-env` comparisons of the shown releases (with `--release`, of that one): per
    /// release and variable, who set the reference, how many replicas agreed, which disagreed.
    pub(crate) env_checks: Vec<EnvCheck>,
    /// Migration tools' locks the shown attempts found held before migrating, released or left alone ([`crate::tools`]).
    pub(crate) tool_locks: Vec<ToolLock>,
    /// The contract step of the release (else of the newest release done), when this lock uses
    /// `contract` ([`crate::contract`]); `null` otherwise.
    pub(crate) contract: Option<ContractState>,
}

/// A running attempt's database sessions (those that carry its tag) and their lock waits.
#[derive(Debug, Serialize)]
pub(crate) struct Running {
    /// The attempt's ledger row.
    pub(crate) attempt: i64,
    /// Its sessions.
    pub(crate) sessions: Vec<Session>,
    /// Those of them waiting on a lock, with who blocks them.
    pub(crate) waits: Vec<Wait>,
}

/// The sessions and waits of the `running` ones among `attempts`: two queries per running
/// attempt, none when nothing runs.
async fn running(
    c: &mut sqlx::PgConnection,
    replica: &Replica,
    attempts: &[AttemptRow],
) -> Result<Vec<Running>, sqlx::Error> {
    let version = c.server_version_num().unwrap_or(0);
    let mut found = Vec::new();
    for a in attempts.iter().filter(|a| a.outcome == Outcome::Running) {
        let which =
            sessions::AttemptSessions::new(replica.identity(), a.release.as_deref(), a.id).which();
        found.push(Running {
            attempt: a.id,
            sessions: sessions::list(c, &which).await?,
            waits: lockwaits::waits(c, &which, std::time::Duration::ZERO, version).await?,
        });
    }
    Ok(found)
}

/// Prints the status and returns the exit code.
pub(crate) async fn status(plan: Status) -> Result<i32> {
    let replica = Replica::new(plan.target, plan.release)?;
    let store = Store::new(&replica.target.schema, replica.lock());
    let mut conn = replica.db.connect().await?;
    let gathered = async {
        let c = conn.pg().await?;
        let holder = lock::holder(c, replica.lock()).await?;
        let attempts = replica
            .ledger
            .attempts(c, replica.release(), plan.limit)
            .await?;
        let release_done = match replica.release() {
            Some(r) => Some(
                replica
                    .ledger
                    .is_done(c, r, ReadKey::No)
                    .await?
                    .done
                    .unwrap_or(false),
            ),
            None => None,
        };
        let releases: Vec<String> = match replica.release() {
            Some(r) => vec![r.to_string()],
            None => {
                let mut shown: Vec<String> =
                    attempts.iter().filter_map(|a| a.release.clone()).collect();
                shown.sort();
                shown.dedup();
                shown
            }
        };
        let env_checks = store.summary(c, Some(&releases)).await?;
        let running = running(c, &replica, &attempts).await?;
        let ids: Vec<i64> = attempts.iter().map(|a| a.id).collect();
        let tool_locks = tools::found_tool_locks(c, replica.ledger.tables(), &ids).await?;
        let contract = replica.ledger.contract_state(c, replica.release()).await?;
        Ok::<_, sqlx::Error>((
            holder,
            attempts,
            release_done,
            env_checks,
            running,
            (tool_locks, contract),
        ))
    }
    .await;
    close(conn).await;
    let (holder, attempts, release_done, env_checks, running, (tool_locks, contract)) =
        gathered.map_err(|e| replica.db.fail(&e, "while reading the status"))?;
    let report = StatusReport {
        lock: replica.lock().name.clone(),
        lock_key: replica.lock().key,
        holder,
        release_done,
        attempts,
        running,
        env_checks,
        tool_locks,
        contract,
    };
    let text = if plan.json {
        serde_json::to_string_pretty(&report)
            .map_err(|e| Error::Internal(format!("cannot encode the status as JSON: {e}")))?
    } else {
        render(&report, replica.release())
    };
    crate::output::print(&text)?;
    Ok(match report.release_done {
        Some(false) => EXIT_NOT_DONE,
        _ => EXIT_OK,
    })
}

/// One line for a release's contract step, and what to do when it is pending.
pub(crate) fn contract_line(c: &ContractState) -> String {
    let todo = match c.state.as_str() {
        "pending" => format!(
            ": run `migrations-gate contract --release {} -- CMD` once no replica of an older release is left",
            c.release
        ),
        _ => String::new(),
    };
    format!("contract step of release {}: {}{todo}", c.release, c.state)
}

/// The human-readable table.
pub(crate) fn render(report: &StatusReport, release: Option<&str>) -> String {
    let mut s = format!("lock {} (key {})\n", report.lock, report.lock_key);
    match &report.holder {
        Some(h) => s.push_str(&format!(
            "  held by {h}, connected since {}\n",
            h.backend_start
        )),
        None => s.push_str("  free\n"),
    }
    if let (Some(r), Some(done)) = (release, report.release_done) {
        s.push_str(&format!(
            "release {r}: {}\n",
            if done { "done" } else { "NOT done" }
        ));
    }
    if let Some(c) = &report.contract {
        s.push_str(&format!("{}\n", contract_line(c)));
    }
    if report.attempts.is_empty() {
        s.push_str("\nno attempts recorded\n");
        render_env(&mut s, &report.env_checks);
        return s;
    }
    let header = [
        "ID",
        "RELEASE",
        "OUTCOME",
        "HOLDER",
        "STARTED (UTC)",
        "DURATION",
        "EXIT",
    ];
    let rows: Vec<[String; 7]> = report
        .attempts
        .iter()
        .map(|a| {
            [
                a.id.to_string(),
                a.release.clone().unwrap_or_else(|| "-".into()),
                match a.not_counted() {
                    Some(why) => format!(
                        "{} ({})",
                        a.outcome,
                        why.prefix().trim_end_matches([':', ' '])
                    ),
                    None => a.outcome.to_string(),
                },
                format!("{} (pid {})", a.holder, a.pid),
                a.started_at
                    .replace('T', " ")
                    .trim_end_matches('Z')
                    .to_string(),
                a.duration_secs
                    .map(|d| format!("{d:.1}s"))
                    .unwrap_or_else(|| "-".into()),
                a.exit_code
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    s.push('\n');
    let line = |cells: &[String]| -> String {
        cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    s.push_str(&line(&header.map(String::from)));
    s.push('\n');
    for row in &rows {
        s.push_str(&line(row));
        s.push('\n');
    }
    render_running(&mut s, &report.running);
    if !report.tool_locks.is_empty() {
        s.push_str("\nmigration tools' locks found before migrating:\n");
        for l in &report.tool_locks {
            s.push_str(&format!("  {l}\n"));
        }
    }
    render_env(&mut s, &report.env_checks);
    s
}

/// The sessions of running attempts, and what they wait on.
fn render_running(s: &mut String, running: &[Running]) {
    for r in running {
        s.push_str(&format!(
            "\nattempt {} is running; its database sessions:\n",
            r.attempt
        ));
        if r.sessions.is_empty() {
            s.push_str("  none\n");
        }
        for session in &r.sessions {
            s.push_str(&format!("  {session}\n"));
        }
        for w in &r.waits {
            s.push_str(&format!("  waiting: {w}\n"));
        }
    }
}

/// The `--same-env` section: one line per release and variable, then who disagreed.
fn render_env(s: &mut String, checks: &[EnvCheck]) {
    if checks.is_empty() {
        return;
    }
    s.push_str("\nsame environment (--same-env):\n");
    for c in checks {
        s.push_str(&format!(
            "  release {} {}: {} replica(s) agreed, {} disagreed; reference from {} at {}\n",
            c.release,
            c.variable,
            c.agreed,
            c.disagreed.len(),
            c.reference.replica,
            c.reference.at.replace('T', " ").trim_end_matches('Z'),
        ));
        for d in &c.disagreed {
            s.push_str(&format!(
                "    differs on {} (host {}) at {}\n",
                d.replica,
                d.host,
                d.at.replace('T', " ").trim_end_matches('Z')
            ));
        }
    }
}
