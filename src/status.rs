//! `migrations-gate status`: who holds the lock now, and the ledger, for people (a table) and for
//! scripts (stable JSON). With `--release R` it doubles as a readiness check: exit 0 only when R
//! is done.

use std::io::Write;

use serde::Serialize;

use crate::config::StatusArgs;
use crate::db::close;
use crate::error::{EXIT_NOT_DONE, EXIT_OK, Error, Result};
use crate::ledger::{AttemptRow, ReadKey};
use crate::lock::{self, Holder};
use crate::preflight::{EnvCheck, Store};
use crate::replica::Replica;

/// The JSON document `status --json` prints. Field names are a stable interface.
#[derive(Debug, Serialize)]
pub(crate) struct Report {
    /// The lock's name (`id:N` for `--lock-id`).
    pub lock: String,
    /// The 64-bit advisory lock key.
    pub lock_key: i64,
    /// The session holding the lock now, if any.
    pub holder: Option<Holder>,
    /// With `--release`: whether it is done.
    pub release_done: Option<bool>,
    /// Attempts, newest first.
    pub attempts: Vec<AttemptRow>,
    /// `--same-env` comparisons of the shown releases (with `--release`, of that one): per
    /// release and variable, who set the reference, how many replicas agreed, which disagreed.
    pub env_checks: Vec<EnvCheck>,
}

/// Prints the status and returns the exit code.
pub(crate) async fn status(args: StatusArgs) -> Result<i32> {
    let replica = Replica::new(args.db.target()?, args.release.resolve()?)?;
    let store = Store::new(&replica.target.schema, replica.lock());
    let mut conn = replica.db.connect().await?;
    let gathered = async {
        let c = conn.pg().await?;
        let holder = lock::holder(c, replica.lock()).await?;
        let attempts = replica
            .ledger
            .attempts(c, replica.release(), args.limit)
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
        Ok::<_, sqlx::Error>((holder, attempts, release_done, env_checks))
    }
    .await;
    close(conn).await;
    let (holder, attempts, release_done, env_checks) =
        gathered.map_err(|e| replica.db.fail(&e, "while reading the status"))?;
    let report = Report {
        lock: replica.lock().name.clone(),
        lock_key: replica.lock().key,
        holder,
        release_done,
        attempts,
        env_checks,
    };
    let text = if args.json {
        serde_json::to_string_pretty(&report)
            .map_err(|e| Error::Internal(format!("cannot encode the status as JSON: {e}")))?
    } else {
        render(&report, replica.release())
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}");
    Ok(match report.release_done {
        Some(false) => EXIT_NOT_DONE,
        _ => EXIT_OK,
    })
}

/// The human-readable table.
pub(crate) fn render(report: &Report, release: Option<&str>) -> String {
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
                a.outcome.clone(),
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
    render_env(&mut s, &report.env_checks);
    s
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
