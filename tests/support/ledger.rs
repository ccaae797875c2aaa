//! What the gate records, read back as rows: its ledger (one row an attempt at a release) and
//! the preflight's `--same-env` tables, in schema `migrations_gate` (the default `--schema`)
//! unless a test moved them. Each query is written once here; tests compare what it returns.

use super::TestDb;

/// The schema the gate keeps its tables in when no `--schema` is given.
pub const SCHEMA: &str = "migrations_gate";

/// One row of the ledger: an attempt at a release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// `None` for a gate run without `--release`.
    pub release: Option<String>,
    /// `running`, `done`, `failed` or `abandoned`.
    pub outcome: String,
    /// The exit code recorded with the outcome; `None` while running or when none was recorded.
    pub exit_code: Option<i32>,
    /// The PID of the gate that made the attempt.
    pub pid: i32,
    /// Why the attempt ended as it did; empty when nothing was said.
    pub detail: String,
}

/// One `--same-env` comparison a replica made (`env_checks`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvCheck {
    pub release: String,
    pub variable: String,
    pub replica: String,
    pub agrees: bool,
}

/// The fingerprint a release's first replica set for one variable (`env_reference`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvReference {
    pub release: String,
    pub variable: String,
    pub replica: String,
    pub fingerprint: String,
}

/// The gate's ledger table in one schema of a test database.
pub struct Ledger<'a> {
    db: &'a TestDb,
    table: String,
}

impl TestDb {
    /// The ledger in schema `migrations_gate`.
    pub fn ledger(&self) -> Ledger<'_> {
        self.ledger_in(SCHEMA)
    }

    /// The ledger in `schema` (`--schema SCHEMA`).
    pub fn ledger_in(&self, schema: &str) -> Ledger<'_> {
        Ledger {
            db: self,
            table: format!("{schema}.ledger"),
        }
    }

    /// Every `--same-env` check, in the order they were made.
    pub fn env_checks(&self) -> Vec<EnvCheck> {
        let query = format!(
            "SELECT release, variable, replica, agrees::text FROM {SCHEMA}.env_checks \
             ORDER BY checked_at, replica, variable"
        );
        let rows = self.rows(&query).into_iter().map(columns);
        rows.map(|[release, variable, replica, agrees]| EnvCheck {
            release,
            variable,
            replica,
            agrees: agrees == "true",
        })
        .collect()
    }

    /// Every reference fingerprint, in the order they were set.
    pub fn env_references(&self) -> Vec<EnvReference> {
        let query = format!(
            "SELECT release, variable, replica, fingerprint FROM {SCHEMA}.env_reference \
             ORDER BY set_at, release, variable"
        );
        let rows = self.rows(&query).into_iter().map(columns);
        rows.map(|[release, variable, replica, fingerprint]| EnvReference {
            release,
            variable,
            replica,
            fingerprint,
        })
        .collect()
    }
}

impl Ledger<'_> {
    /// Whether the table exists (the first gate creates it).
    pub fn exists(&self) -> bool {
        self.db.one(&format!(
            "SELECT (to_regclass('{}') IS NOT NULL)::text",
            self.table
        )) == "true"
    }

    /// Every attempt, oldest first.
    pub fn attempts(&self) -> Vec<Attempt> {
        let query = format!(
            "SELECT (release IS NULL)::text, coalesce(release, ''), outcome, \
             coalesce(exit_code::text, ''), pid::text, coalesce(detail, '') \
             FROM {} ORDER BY id",
            self.table
        );
        let rows = self.db.rows(&query).into_iter().map(columns);
        rows.map(
            |[no_release, release, outcome, exit_code, pid, detail]| Attempt {
                release: (no_release == "false").then_some(release),
                outcome,
                exit_code: exit_code.parse().ok(),
                pid: pid.parse().expect("ledger pid"),
                detail,
            },
        )
        .collect()
    }

    /// The attempts at `release`, oldest first.
    pub fn attempts_at(&self, release: &str) -> Vec<Attempt> {
        self.attempts()
            .into_iter()
            .filter(|a| a.release.as_deref() == Some(release))
            .collect()
    }

    /// The outcome of every attempt, oldest first.
    pub fn outcomes(&self) -> Vec<String> {
        self.attempts().into_iter().map(|a| a.outcome).collect()
    }

    /// The outcome of every attempt at `release`, oldest first.
    pub fn outcomes_at(&self, release: &str) -> Vec<String> {
        self.attempts_at(release)
            .into_iter()
            .map(|a| a.outcome)
            .collect()
    }

    /// The outcome and exit code of every attempt, oldest first.
    pub fn exits(&self) -> Vec<(String, Option<i32>)> {
        self.attempts()
            .into_iter()
            .map(|a| (a.outcome, a.exit_code))
            .collect()
    }

    /// How many attempts have `outcome`, whatever their release.
    pub fn count(&self, outcome: &str) -> usize {
        self.attempts()
            .iter()
            .filter(|a| a.outcome == outcome)
            .count()
    }

    /// How many `done` rows `release` has (the gate allows one per lock).
    pub fn times_done(&self, release: &str) -> usize {
        self.attempts_at(release)
            .iter()
            .filter(|a| a.outcome == "done")
            .count()
    }

    /// The releases recorded done, in release order.
    pub fn done_releases(&self) -> Vec<String> {
        let mut done: Vec<String> = self
            .attempts()
            .into_iter()
            .filter(|a| a.outcome == "done")
            .filter_map(|a| a.release)
            .collect();
        done.sort();
        done
    }

    /// The PIDs of the gates whose attempt is still `running`, oldest attempt first.
    pub fn running_pids(&self) -> Vec<i32> {
        self.attempts()
            .into_iter()
            .filter(|a| a.outcome == "running")
            .map(|a| a.pid)
            .collect()
    }
}

/// A row's columns as an array, to name them in a pattern.
fn columns<const N: usize>(row: Vec<String>) -> [String; N] {
    row.try_into()
        .unwrap_or_else(|row: Vec<String>| panic!("{N} columns expected, got {row:?}"))
}
