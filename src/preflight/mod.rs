//! Preflight: every replica passes through the gate with its environment and a database
//! connection before its app starts, so the gate refuses (exit 78, `EX_CONFIG`) the
//! multi-replica misconfigurations that would otherwise fail later as symptoms.
//!
//! Three kinds of check, in the order a replica meets them:
//!
//! 1. **Local rules** of a preset (`--preset`), before any connection: a small table of
//!    [`Rule`]s, each naming its variables, its [`Check`], whether it fails or warns, and why
//!    (the README's preset table is this table: [`presets`]).
//! 2. **No older release** (always, unless `--allow-older-release`): a replica whose release is
//!    done but older than a release done after it must not start on a schema that moved on.
//!    The ledger read of the fast path already answers it ([`crate::ledger::Seen::newer`]): no
//!    extra round trip.
//! 3. **Same settings** (`--same-env`, and the presets' [`Check::Same`] rules): per variable, a
//!    fingerprint of this replica's value, HMAC-SHA256 under a random key that the gate creates
//!    once per ledger schema and keeps in the database (`<schema>.env_key`), so that a
//!    fingerprint alone does not reveal a short secret ([`fingerprint`]). The first replica of a
//!    release sets the reference (`<schema>.env_reference`); every replica records whether it
//!    agreed (`<schema>.env_checks`, for `status`). Reading the reference and recording both
//!    happen in one statement: one round trip ([`store`]). Values and fingerprints are never
//!    printed.
//!
//! This file holds the [`Preflight`] of one replica: what it compares, and the follower's and
//! the holder's checks, top to bottom.

mod budget;
mod fingerprint;
mod open_webui;
mod presets;
mod shared_dir;
mod store;

use tracing::{info, warn};

use crate::db::{Conn, close};
use crate::error::{Error, Result};
use crate::ledger::Seen;
use crate::replica::Replica;
use crate::schema::Tables;
use crate::sql::{is_missing_relation, is_read_only};

pub(crate) use fingerprint::EnvKey;
pub(crate) use open_webui::{Problem, python_int};
use presets::{Check, Context, Level, Rule, broken};
pub(crate) use presets::{Mode, Preset};
use store::Reference;
pub(crate) use store::{EnvCheck, Store};

/// The name a shared directory's marker is compared under, as a `--same-env` variable is.
const SHARED_DIR: &str = "shared-dir";

/// What a `--same-env` difference does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OnMismatch {
    /// Refuse to start the app: exit 78.
    Fail,
    /// Log a warning and start the app.
    Warn,
}

/// What the preflight checks, as the command line asked (`--same-env`, `--on-mismatch`,
/// `--preset`, `--allow-older-release`).
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// Variables that must be the same on every replica of a release.
    pub(crate) same_env: Vec<String>,
    /// What a difference does.
    pub(crate) on_mismatch: OnMismatch,
    /// A known app's rules.
    pub(crate) preset: Option<Preset>,
    /// Start even when a newer release was migrated on this database.
    pub(crate) allow_older_release: bool,
    /// A directory every replica must share (`--shared-dir`).
    pub(crate) shared_dir: Option<std::path::PathBuf>,
    /// Refuse (exit 78) a replica that does not share it (`--require-shared-dir`).
    pub(crate) require_shared_dir: bool,
}

/// A variable compared across replicas, and what a difference does.
#[derive(Debug, Clone)]
struct Compared {
    name: String,
    level: Level,
    /// The preset rule that asked for it, if any.
    rule: Option<(&'static str, &'static Rule)>,
    /// Not a variable but a directory every replica must share: the value compared is the
    /// token of the release's marker in it ([`shared_dir`]).
    marker: Option<std::path::PathBuf>,
}

/// The checks of one replica, decided from its flags and environment.
pub(crate) struct Preflight {
    compared: Vec<Compared>,
    /// Open WebUI's connections per process and its workers (`--preset open-webui`).
    budget: Option<(budget::PerProcess, i64)>,
    allow_older: bool,
    on_mismatch: OnMismatch,
}

impl Preflight {
    /// Checks the flags and the presets' local rules: a failing rule is an error (78) before
    /// the gate connects; warnings are logged.
    pub(crate) fn new(args: &Settings, mode: Mode, release: Option<&str>) -> Result<Preflight> {
        let cx = Context {
            vars: Box::new(|name| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned())),
            mode,
        };
        Preflight::with_context(args, &cx, release)
    }

    fn with_context(args: &Settings, cx: &Context, release: Option<&str>) -> Result<Preflight> {
        let mut compared: Vec<Compared> = Vec::new();
        for name in &args.same_env {
            let name = name.trim();
            if name.is_empty() || name.contains('=') || name.contains('\0') {
                return Err(Error::Usage(format!(
                    "--same-env {name:?} is not a valid environment variable name"
                )));
            }
            if !compared.iter().any(|c| c.name == name) {
                compared.push(Compared {
                    name: name.to_string(),
                    level: Level::Fail,
                    rule: None,
                    marker: None,
                });
            }
        }
        let mut failures = Vec::new();
        if let Some(preset) = args.preset {
            for rule in preset.rules() {
                if let Check::Same = rule.check {
                    for var in rule.vars {
                        match compared.iter_mut().find(|c| c.name == *var) {
                            // An explicit --same-env or a stricter rule keeps its level.
                            Some(c) => {
                                if rule.level == Level::Fail {
                                    c.level = Level::Fail;
                                }
                            }
                            None => compared.push(Compared {
                                name: var.to_string(),
                                level: rule.level,
                                rule: Some((preset.name(), rule)),
                                marker: None,
                            }),
                        }
                    }
                    continue;
                }
                let Some(broken) = broken(rule, cx) else {
                    continue;
                };
                let line = format!(
                    "preset {}: wants {} but {broken}: {}",
                    preset.name(),
                    rule.wants,
                    rule.why
                );
                match rule.level {
                    Level::Fail => failures.push(line),
                    Level::Warn => warn!(preset = preset.name(), "{line}"),
                }
            }
        }
        if !failures.is_empty() {
            return Err(Error::Config(failures.join("; ")));
        }
        let shared = match (&args.shared_dir, args.preset) {
            (Some(dir), _) => Some((dir.clone(), None)),
            (None, Some(Preset::OpenWebui)) => {
                shared_dir::open_webui_data_dir(&|n| cx.var(n)).map(|dir| (dir, Some(())))
            }
            (None, None) => None,
        };
        if let Some((dir, _)) = shared {
            if release.is_none() {
                return Err(Error::Usage(format!(
                    "--shared-dir {} needs --release or --release-from: the first replica of each release \
                     leaves the marker the others must see",
                    dir.display()
                )));
            }
            compared.push(Compared {
                // One name whatever the path: replicas may mount the volume elsewhere.
                name: SHARED_DIR.to_string(),
                level: if args.require_shared_dir {
                    Level::Fail
                } else {
                    Level::Warn
                },
                rule: None,
                marker: Some(dir),
            });
        }
        if !compared.is_empty() && release.is_none() {
            return Err(Error::Usage(format!(
                "--same-env {} (or a preset that compares variables) needs --release or --release-from: \
                 the first replica of each release sets the values the others must match",
                names(&compared)
            )));
        }
        let budget = args
            .preset
            .map(|Preset::OpenWebui| budget::open_webui(&|n| cx.var(n)));
        Ok(Preflight {
            compared,
            budget,
            allow_older: args.allow_older_release,
            on_mismatch: args.on_mismatch,
        })
    }

    /// Whether this replica compares variables with the others (and so needs the key).
    pub(crate) fn compares(&self) -> bool {
        !self.compared.is_empty()
    }

    /// A follower (or `wait`) whose release is done: the older-release check on what the
    /// ledger read saw, then the variables. With no `--same-env` and no preset this costs
    /// nothing: no connection, no round trip.
    pub(crate) async fn follower(
        &self,
        replica: &Replica,
        seen: Seen,
        conn: Option<Conn>,
    ) -> Result<()> {
        if let (Some(newer), Some(release)) = (&seen.newer, replica.release()) {
            let line = format!(
                "release {release:?} is older than release {:?}, which was migrated after it on this database \
                 (by {} at {}): an old replica must not start on a schema that moved on. Deploy {:?} everywhere \
                 (stop the old replicas: Kubernetes strategy Recreate, Swarm stop-first); for a deliberate rollback \
                 after restoring the database, pass --allow-older-release",
                newer.release, newer.holder, newer.finished_at, newer.release
            );
            if !self.allow_older {
                return Err(Error::Config(line));
            }
            warn!("--allow-older-release: starting anyway; {line}");
        }
        let key = seen.env_key.and_then(|k| EnvKey::from_hex(&k.0));
        self.compare(replica, key, conn).await
    }

    /// The holder, before it migrates: the variables only (its release is not done, so it is
    /// the newest).
    pub(crate) async fn holder(&self, replica: &Replica) -> Result<()> {
        self.compare(replica, None, None).await
    }

    /// Records this replica's fingerprints and compares them with the release's reference.
    async fn compare(
        &self,
        replica: &Replica,
        key: Option<EnvKey>,
        conn: Option<Conn>,
    ) -> Result<()> {
        if self.compared.is_empty() {
            return Ok(());
        }
        let Some(release) = replica.release() else {
            return Ok(());
        };
        let tokens = self.marker_tokens(replica, release).await?;
        let store = Store::new(&replica.target.schema, replica.lock());
        let mut conn = match conn {
            Some(c) => c,
            None => replica.db.connect().await?,
        };
        let result = async {
            let c = conn.pg().await?;
            let mut key = key;
            let mut ensured = false;
            loop {
                let k = match key.take() {
                    Some(k) => k,
                    None => {
                        if !ensured {
                            store.ensure(c).await?;
                            ensured = true;
                        }
                        store.key(c).await?
                    }
                };
                let mine = self.fingerprints(&k, &tokens);
                match store
                    .record(c, release, &mine, &replica.target.application_name, replica.host())
                    .await
                {
                    // A read-only standby (followers may start there): compare, record nothing.
                    Err(e) if is_read_only(&e) => {
                        info!(
                            "read-only standby: comparing with the release's reference without recording"
                        );
                        return store.compare(c, release, &mine).await;
                    }
                    Err(e) if is_missing_relation(&e) && !ensured => continue,
                    Ok(seen) => {
                        self.report_budget(c, &store, release).await;
                        return Ok(seen);
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        .await;
        close(conn).await;
        let seen = match result {
            Ok(seen) => seen,
            Err(e) if is_read_only(&e) => {
                warn!("read-only standby without a --same-env record yet: variables not compared");
                return Ok(());
            }
            Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42501") => {
                let tables = Tables::new(&replica.target.schema);
                return Err(Error::Auth(tables.preflight_grants(db.message())));
            }
            Err(e) => {
                return Err(replica
                    .db
                    .fail(&e, "while comparing --same-env fingerprints"));
            }
        };
        self.judge(release, &seen)
    }

    /// The connection budget of the release's replicas seen so far ([`budget`]): a warning when
    /// over it, an INFO line otherwise. Best effort: it only informs.
    async fn report_budget(&self, c: &mut sqlx::PgConnection, store: &Store, release: &str) {
        let Some((per, workers)) = &self.budget else {
            return;
        };
        match budget_inputs(c, Some(store.replicas(release))).await {
            Ok((replicas, limit)) => match budget::judge(per, *workers, replicas, limit) {
                Ok(line) => info!(release, "{line}"),
                Err(line) => warn!(release, "preset open-webui: {line}"),
            },
            Err(e) => warn!(error = %e, "could not read the connection budget"),
        }
    }

    /// The token of the release's marker in each shared directory, read or created
    /// ([`shared_dir`]). A directory that is missing, not a directory or read-only is named in
    /// one line: an error (78) under `--require-shared-dir`, else a warning, and not compared.
    async fn marker_tokens(
        &self,
        replica: &Replica,
        release: &str,
    ) -> Result<Vec<(String, String)>> {
        let mut tokens = Vec::new();
        for c in &self.compared {
            let Some(dir) = &c.marker else { continue };
            match shared_dir::token(dir, replica.identity(), release).await {
                Ok(token) => tokens.push((c.name.clone(), token)),
                Err(why) => {
                    let line = format!(
                        "the shared directory {} must be shared by every replica of release {release:?}, but {why}; \
                         mount one shared volume there on every replica (a ReadWriteMany PersistentVolumeClaim, or one shared mount)",
                        dir.display()
                    );
                    match c.level {
                        Level::Fail => return Err(Error::Config(line)),
                        Level::Warn => warn!(release, "{line}"),
                    }
                }
            }
        }
        Ok(tokens)
    }

    /// This replica's fingerprint of each compared variable and shared directory (by its
    /// marker's token; a directory without one in `tokens` is not compared).
    fn fingerprints(&self, key: &EnvKey, tokens: &[(String, String)]) -> Vec<(String, String)> {
        self.compared
            .iter()
            .filter_map(|c| match &c.marker {
                None => Some((c.name.clone(), key.fingerprint(&c.name))),
                Some(_) => tokens
                    .iter()
                    .find(|(n, _)| *n == c.name)
                    .map(|(n, t)| (n.clone(), key.fingerprint_of(n, Some(t.as_bytes())))),
            })
            .collect()
    }

    /// Turns the comparison into the one line an operator acts on.
    fn judge(&self, release: &str, seen: &[Reference]) -> Result<()> {
        let differ: Vec<(&Compared, &Reference)> = self
            .compared
            .iter()
            .filter_map(|c| {
                seen.iter()
                    .find(|r| r.variable == c.name && !r.agrees)
                    .map(|r| (c, r))
            })
            .collect();
        if differ.is_empty() {
            info!(
                release,
                variables = %names(&self.compared),
                "same environment as the release's first replica"
            );
            return Ok(());
        }
        let describe = |list: &[&(&Compared, &Reference)]| -> String {
            let what: Vec<String> = list
                .iter()
                .map(|(c, r)| {
                    if let Some(dir) = &c.marker {
                        return format!(
                            "the shared directory {} is not the one release {release:?} first started with (on {} at {}): \
                             it holds another marker, so files written through one replica are missing on the others; \
                             mount one shared volume there on every replica (a ReadWriteMany PersistentVolumeClaim, or one shared mount)",
                            dir.display(), r.replica, r.set_at
                        );
                    }
                    let why = c
                        .rule
                        .map(|(preset, rule)| format!("; preset {preset}: {}", rule.why))
                        .unwrap_or_default();
                    format!(
                        "{} differs from the value release {release:?} first started with (on {} at {}{why})",
                        c.name, r.replica, r.set_at
                    )
                })
                .collect();
            let vars: Vec<&str> = list.iter().map(|(c, _)| c.name.as_str()).collect();
            format!(
                "{}: set the same {} on every replica; if you changed it on purpose, deploy it as a new release \
                 or run `migrations-gate reset --release {release} --env`",
                what.join(", "),
                vars.join(", ")
            )
        };
        let (fail, warn_only): (Vec<_>, Vec<_>) = differ
            .iter()
            .partition(|(c, _)| c.level == Level::Fail && self.on_mismatch == OnMismatch::Fail);
        if !warn_only.is_empty() {
            warn!(release, "{}", describe(&warn_only));
        }
        if fail.is_empty() {
            return Ok(());
        }
        Err(Error::Config(describe(&fail)))
    }
}

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
            let (seen, limit) = match budget_inputs(c, Some(store.replicas(release))).await {
                // No comparison recorded yet: the tables do not exist.
                Err(e) if is_missing_relation(&e) => budget_inputs(c, None).await?,
                other => other?,
            };
            let replicas = seen.max(1);
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

/// In one round trip: the replicas `replicas` (a SQL subquery; `None`: 0) counts, and what
/// the server allows non-superusers: `max_connections` less `superuser_reserved_connections`
/// and, on 16+, `reserved_connections` (PostgreSQL, "Connections and Authentication").
async fn budget_inputs(
    c: &mut sqlx::PgConnection,
    replicas: Option<String>,
) -> Result<(u64, budget::Limit), sqlx::Error> {
    let count = replicas.map_or("0".to_string(), |q| format!("({q})"));
    let rows = crate::sql::query(
        c,
        format!(
            "SELECT {count}::text, current_setting('max_connections'), \
                    current_setting('superuser_reserved_connections'), \
                    coalesce(current_setting('reserved_connections', true), '0')"
        ),
    )
    .await?;
    let row = crate::sql::one_row(&rows)?;
    Ok((
        row.parse(0)?,
        budget::Limit {
            max_connections: row.parse(1)?,
            superuser_reserved: row.parse(2)?,
            reserved: row.parse(3)?,
        },
    ))
}

fn names(compared: &[Compared]) -> String {
    compared
        .iter()
        .map(|c| c.name.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cx(vars: &[(&str, &str)], mode: Mode) -> Context {
        let owned: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Context {
            vars: Box::new(move |name| {
                owned
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.clone())
            }),
            mode,
        }
    }

    fn args(preset: Option<Preset>) -> Settings {
        Settings {
            same_env: Vec::new(),
            on_mismatch: OnMismatch::Fail,
            preset,
            allow_older_release: false,
            shared_dir: None,
            require_shared_dir: false,
        }
    }

    #[test]
    fn open_webui_on_sqlite_fails_and_missing_redis_only_warns() {
        let good = [
            ("DATABASE_URL", "postgresql://u@h/db"),
            ("WEBUI_SECRET_KEY", "k"),
        ];
        let p = Preflight::with_context(
            &args(Some(Preset::OpenWebui)),
            &cx(&good, Mode::Run { migrate: true }),
            Some("r1"),
        )
        .expect("Redis and the vector store only warn");
        assert!(
            p.compared
                .iter()
                .any(|c| c.name == "WEBUI_SECRET_KEY" && c.level == Level::Fail)
        );
        assert!(
            p.compared
                .iter()
                .any(|c| c.name == "REDIS_URL" && c.level == Level::Warn)
        );

        let e = Preflight::with_context(
            &args(Some(Preset::OpenWebui)),
            &cx(
                &[("DATABASE_URL", "sqlite:///data/webui.db")],
                Mode::Run { migrate: true },
            ),
            Some("r1"),
        )
        .err()
        .expect("SQLite fails");
        assert_eq!(e.exit_code(), 78);
        assert!(
            e.to_string().contains("DATABASE_URL has another scheme"),
            "{e}"
        );
        assert!(
            !e.to_string().contains("sqlite:///"),
            "never the value: {e}"
        );

        let e = Preflight::with_context(
            &args(Some(Preset::OpenWebui)),
            &cx(
                &[
                    ("DATABASE_URL", "postgres://h/db"),
                    ("UVICORN_WORKERS", "4"),
                ],
                Mode::Run { migrate: true },
            ),
            Some("r1"),
        )
        .err()
        .expect("local Chroma with forked workers fails");
        assert!(e.to_string().contains("UVICORN_WORKERS > 1"), "{e}");

        // Forked workers and a holder that would start the app with the flag on: every worker
        // would run Alembic at once. With --migrate (or one worker) it passes.
        let workers = |n: &str, mode| {
            Preflight::with_context(
                &args(Some(Preset::OpenWebui)),
                &cx(
                    &[
                        ("DATABASE_URL", "postgres://h/db"),
                        ("VECTOR_DB", "pgvector"),
                        ("UVICORN_WORKERS", n),
                    ],
                    mode,
                ),
                Some("r1"),
            )
        };
        let e = workers("2", Mode::Run { migrate: false })
            .err()
            .expect("forked workers migrating on start-up fail");
        assert_eq!(e.exit_code(), 78);
        assert!(
            e.to_string()
                .contains("--migrate \"python -c 'import open_webui.config'\""),
            "{e}"
        );
        assert!(workers("2", Mode::Run { migrate: true }).is_ok());
        assert!(workers("1", Mode::Run { migrate: false }).is_ok());
    }

    #[test]
    fn same_env_needs_a_release_and_a_valid_name() {
        let mut a = args(None);
        a.same_env = vec!["A".into()];
        let e = Preflight::with_context(&a, &cx(&[], Mode::Migrate), None)
            .err()
            .unwrap();
        assert_eq!(e.exit_code(), 64);
        a.same_env = vec!["A=B".into()];
        let e = Preflight::with_context(&a, &cx(&[], Mode::Migrate), Some("r"))
            .err()
            .unwrap();
        assert_eq!(e.exit_code(), 64);
    }
}
