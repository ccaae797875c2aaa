//! The connection budget of a fleet of Open WebUI replicas (`--preset open-webui`): the most
//! connections its own code can open, against what the server allows. The failure it prevents
//! ("QueuePool limit reached", "too many clients already") appears only under load, long after
//! the deploy.
//!
//! Per process, from Open WebUI 0.11's `env.py` and `internal/db.py`: a sync engine (start-up
//! and config) and an async engine (every request), each with `pool_size = DATABASE_POOL_SIZE`
//! and `max_overflow = DATABASE_POOL_MAX_OVERFLOW` (default 0) when the size is set and positive;
//! SQLAlchemy's `QueuePool` defaults (5 + 10) when it is unset; `NullPool` (no bound) when it is
//! 0 or less. Processes: `UVICORN_WORKERS` (default 1) per replica, times the replicas of the
//! release that have passed the gate so far. Plus the gate's own: the holder's lock session and
//! witness while it migrates.

use std::fmt;

/// SQLAlchemy's `QueuePool` defaults (`pool_size`, `max_overflow`).
const SQLALCHEMY_DEFAULT: (i64, i64) = (5, 10);
/// Engines per Open WebUI process: sync and async.
const ENGINES: i64 = 2;
/// The gate's own connections while a holder migrates (lock session and witness).
const GATE_OWN: i64 = 2;

/// What one Open WebUI process may open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PerProcess {
    /// At most this many, and how that was derived.
    Bounded { connections: i64, how: String },
    /// `NullPool` (`DATABASE_POOL_SIZE` ≤ 0) or `max_overflow` -1: no bound to check.
    Unbounded(String),
}

/// Open WebUI's pool settings read from the environment as `env.py` reads them (an unparsable
/// number is unset, as its `try`/`except` makes it), with the workers per replica.
pub(crate) fn open_webui(var: &dyn Fn(&str) -> Option<String>) -> (PerProcess, i64) {
    let int = |name: &str| {
        var(name)
            .filter(|v| !v.is_empty())
            .and_then(|v| super::open_webui::python_int(&v))
    };
    let workers = int("UVICORN_WORKERS").unwrap_or(1).max(1);
    let per = match int("DATABASE_POOL_SIZE") {
        None => {
            let (size, overflow) = SQLALCHEMY_DEFAULT;
            PerProcess::Bounded {
                connections: ENGINES * (size + overflow),
                how: format!(
                    "{ENGINES} engines × (SQLAlchemy's default pool_size {size} + max_overflow {overflow}; DATABASE_POOL_SIZE unset)"
                ),
            }
        }
        Some(size) if size <= 0 => PerProcess::Unbounded(
            "DATABASE_POOL_SIZE ≤ 0 makes Open WebUI use NullPool, which opens a connection per concurrent session".into(),
        ),
        Some(size) => match int("DATABASE_POOL_MAX_OVERFLOW").unwrap_or(0) {
            overflow if overflow < 0 => PerProcess::Unbounded(
                "DATABASE_POOL_MAX_OVERFLOW -1 lets SQLAlchemy open connections without a bound".into(),
            ),
            // Values come from the app's environment: saturate, never wrap or panic.
            overflow => PerProcess::Bounded {
                connections: size.saturating_add(overflow).saturating_mul(ENGINES),
                how: format!(
                    "{ENGINES} engines × (DATABASE_POOL_SIZE {size} + DATABASE_POOL_MAX_OVERFLOW {overflow})"
                ),
            },
        },
    };
    (per, workers)
}

/// What the server allows non-superusers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub(crate) struct Limit {
    pub(crate) max_connections: i64,
    pub(crate) superuser_reserved: i64,
    /// `reserved_connections` (16+; 0 before).
    pub(crate) reserved: i64,
}

impl Limit {
    pub(crate) fn usable(&self) -> i64 {
        self.max_connections - self.superuser_reserved - self.reserved
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (max_connections {} − superuser_reserved_connections {}",
            self.usable(),
            self.max_connections,
            self.superuser_reserved
        )?;
        if self.reserved > 0 {
            write!(f, " − reserved_connections {}", self.reserved)?;
        }
        write!(f, ")")
    }
}

/// The budget of `replicas` replicas: `Ok(line)` within it, `Err(line)` over it (the warning,
/// with the arithmetic and the knobs), `None` when the pools are unbounded (said in `Ok`).
pub(crate) fn judge(
    per: &PerProcess,
    workers: i64,
    replicas: u64,
    limit: Limit,
) -> Result<String, String> {
    let replicas = i64::try_from(replicas).unwrap_or(i64::MAX).max(1);
    match per {
        PerProcess::Unbounded(why) => Ok(format!(
            "connection budget not checked: {why}; PostgreSQL allows {limit}"
        )),
        PerProcess::Bounded { connections, how } => {
            let total = connections
                .saturating_mul(workers)
                .saturating_mul(replicas)
                .saturating_add(GATE_OWN);
            let line = format!(
                "Open WebUI may open {total} connections: {connections} per process ({how}) × {workers} UVICORN_WORKERS × {replicas} replica(s) of this release seen so far + {GATE_OWN} for the gate; PostgreSQL allows {limit}"
            );
            if total > limit.usable() {
                Err(format!(
                    "{line}: over budget, so \"QueuePool limit reached\" or \"too many clients already\" will appear under load. Lower DATABASE_POOL_SIZE and DATABASE_POOL_MAX_OVERFLOW or UVICORN_WORKERS, put PgBouncer in front, or raise max_connections"
                ))
            } else {
                Ok(line)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }

    const PG_DEFAULT: Limit = Limit {
        max_connections: 100,
        superuser_reserved: 3,
        reserved: 0,
    };

    /// Values from the app's environment are arbitrary: a huge pool is over budget, never an
    /// overflow (which panicked in debug builds and wrapped to a small number in release ones).
    #[test]
    fn huge_pool_sizes_are_over_budget_without_overflowing() {
        let max = i64::MAX.to_string();
        let (per, workers) = open_webui(&env(&[
            ("DATABASE_POOL_SIZE", &max),
            ("DATABASE_POOL_MAX_OVERFLOW", &max),
            ("UVICORN_WORKERS", &max),
        ]));
        assert!(
            matches!(per, PerProcess::Bounded { connections, .. } if connections == i64::MAX),
            "{per:?}"
        );
        let line = judge(&per, workers, u64::MAX, PG_DEFAULT).unwrap_err();
        assert!(line.contains(&format!("may open {}", i64::MAX)), "{line}");
    }

    /// Open WebUI's guide: pool 15 + overflow 20, 2 workers, 3 replicas.
    #[test]
    fn the_guides_example_is_over_postgresqls_default() {
        let (per, workers) = open_webui(&env(&[
            ("DATABASE_POOL_SIZE", "15"),
            ("DATABASE_POOL_MAX_OVERFLOW", "20"),
            ("UVICORN_WORKERS", "2"),
        ]));
        assert_eq!(workers, 2);
        let line = judge(&per, workers, 3, PG_DEFAULT).unwrap_err();
        assert!(
            line.contains("may open 422 connections: 70 per process"),
            "{line}"
        );
        assert!(line.contains("allows 97 (max_connections 100"), "{line}");
    }

    #[test]
    fn defaults_and_nullpool() {
        let (per, workers) = open_webui(&env(&[]));
        assert_eq!(
            judge(&per, workers, 3, PG_DEFAULT).unwrap(),
            "Open WebUI may open 92 connections: 30 per process (2 engines × (SQLAlchemy's default pool_size 5 + max_overflow 10; DATABASE_POOL_SIZE unset)) × 1 UVICORN_WORKERS × 3 replica(s) of this release seen so far + 2 for the gate; PostgreSQL allows 97 (max_connections 100 − superuser_reserved_connections 3)"
        );
        let (per, _) = open_webui(&env(&[("DATABASE_POOL_SIZE", "0")]));
        assert!(matches!(per, PerProcess::Unbounded(_)));
        // An unparsable size is unset, as env.py's except makes it.
        let (per, _) = open_webui(&env(&[("DATABASE_POOL_SIZE", "lots")]));
        assert!(matches!(
            per,
            PerProcess::Bounded {
                connections: 30,
                ..
            }
        ));
    }
}
