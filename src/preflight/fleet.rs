//! What only `check` reports of the fleet-wide checks, before a deploy: it reads (the shared
//! directory's marker, the recorded replicas, the server's connection limit) and never writes,
//! unlike the replicas' own checks in [`super::same_env`].

use super::store::{Store, replicas_and_limit};
use super::{Preset, budget, shared_dir};
use crate::error::Result;
use crate::replica::Replica;
use crate::sql::{is_missing_relation, query};

/// What `check` shows of the fleet-wide checks: the shared directory (`--shared-dir`, or Open
/// WebUI's `DATA_DIR` under the preset) and Open WebUI's connection budget. The JSON field names
/// are a stable interface.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Fleet {
    /// The directory every replica must share, and what it holds; `null` when none is checked.
    pub(crate) shared_dir: Option<SharedDirSeen>,
    /// The connection budget (`--preset open-webui`); `null` otherwise.
    pub(crate) connection_budget: Option<BudgetSeen>,
}

/// A shared directory as `check` sees it from this machine.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct SharedDirSeen {
    pub(crate) path: String,
    /// What is there, in words.
    pub(crate) state: String,
}

/// Open WebUI's connection budget as `check` computes it.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct BudgetSeen {
    /// Replicas of the release recorded so far (at least 1: the one being checked).
    pub(crate) replicas: u64,
    /// Whether the most connections exceed what the server allows.
    pub(crate) over: bool,
    /// The arithmetic, in words.
    pub(crate) line: String,
}

/// The fleet-wide checks for `check`, from this environment: reads only.
pub(crate) async fn fleet(
    c: &mut sqlx::PgConnection,
    replica: &Replica,
    preset: Option<Preset>,
    shared: Option<std::path::PathBuf>,
) -> Result<Option<Fleet>, sqlx::Error> {
    let var = |n: &str| std::env::var_os(n).map(|v| v.to_string_lossy().into_owned());
    let dir = shared.or_else(|| match preset {
        Some(Preset::OpenWebui) => shared_dir::open_webui_data_dir(&var),
        None => None,
    });
    let shared_dir = match dir {
        None => None,
        Some(d) => Some(SharedDirSeen {
            state: shared_dir::look(&d, replica.identity(), replica.release()).await,
            path: d.display().to_string(),
        }),
    };
    let connection_budget = match preset {
        Some(Preset::OpenWebui) => {
            let store = Store::new(&replica.target.schema, replica.lock());
            let release = replica.release().unwrap_or_default();
            let (recorded, limit) = match store.replicas_and_limit(c, release).await {
                // No comparison recorded yet: the tables do not exist.
                Err(e) if is_missing_relation(&e) => no_replicas_and_limit(c).await?,
                other => other?,
            };
            let replicas = recorded.max(1);
            let (per, workers) = budget::open_webui(&var);
            let judged = budget::judge(&per, workers, replicas, limit);
            Some(BudgetSeen {
                replicas,
                over: judged.is_err(),
                line: judged.unwrap_or_else(|over| over),
            })
        }
        None => None,
    };
    if shared_dir.is_none() && connection_budget.is_none() {
        return Ok(None);
    }
    Ok(Some(Fleet {
        shared_dir,
        connection_budget,
    }))
}

/// What the server allows non-superusers, for `check` before any replica has recorded a
/// comparison (the preflight tables do not exist yet): the columns of
/// [`Store::replicas_and_limit`], with 0 replicas.
pub(super) const NO_REPLICAS_AND_LIMIT: &str = "\
    SELECT 0::text, current_setting('max_connections'), \
           current_setting('superuser_reserved_connections'), \
           coalesce(current_setting('reserved_connections', true), '0')";

/// Runs [`NO_REPLICAS_AND_LIMIT`].
async fn no_replicas_and_limit(
    c: &mut sqlx::PgConnection,
) -> Result<(u64, budget::Limit), sqlx::Error> {
    let rows = query(c, NO_REPLICAS_AND_LIMIT.to_string()).await?;
    replicas_and_limit(&rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_replicas_and_limit_reads_the_three_settings() {
        assert_eq!(
            NO_REPLICAS_AND_LIMIT,
            "SELECT 0::text, current_setting('max_connections'), current_setting('superuser_reserved_connections'), \
             coalesce(current_setting('reserved_connections', true), '0')"
        );
    }
}
