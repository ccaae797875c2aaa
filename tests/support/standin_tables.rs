//! What the stand-in app records (`standin-app setup` makes the tables; its migration creates
//! `app_seed`), read back: how often its migration started and finished, its seed row, and its
//! starts.

use super::TestDb;

impl TestDb {
    /// How many times the stand-in's migration started (rows of `mg_runs`), finished or not.
    pub fn migrations_started(&self) -> usize {
        self.count("SELECT count(*) FROM mg_runs")
    }

    /// How many of the stand-in's migrations ran to the end.
    pub fn migrations_finished(&self) -> usize {
        self.count("SELECT count(*) FROM mg_runs WHERE finished_at IS NOT NULL")
    }

    /// The PID of the first stand-in migration that started.
    pub fn first_migration_pid(&self) -> i32 {
        self.one("SELECT pid FROM mg_runs ORDER BY id LIMIT 1")
            .parse()
            .expect("a migration started")
    }

    /// How many seed rows the migration wrote (`app_seed`; exactly one when it ran once).
    pub fn seed_rows(&self) -> usize {
        self.count("SELECT count(*) FROM app_seed")
    }

    /// How many times the stand-in app started.
    pub fn app_starts(&self) -> usize {
        self.count("SELECT count(*) FROM app_starts")
    }

    /// How many app starts saw the flag off and a finished schema (how every app but a
    /// `--ready-*` holder's must start).
    pub fn app_starts_flag_off_on_ready_schema(&self) -> usize {
        self.count("SELECT count(*) FROM app_starts WHERE flag = 'False' AND schema_ready")
    }

    fn count(&self, query: &str) -> usize {
        self.one(query)
            .parse()
            .unwrap_or_else(|e| panic!("{query}: not a count: {e}"))
    }
}
