//! The presets: data-driven tables of local rules for known apps (`--preset`), checked before
//! the gate connects. The README's preset table is this table.

use super::open_webui::{self, AppDatabase, Problem};

/// A named set of rules for a known app (README, "Preflight"; `--preset`, whose `--help` line
/// for each is in `config/value_enums.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Preset {
    /// `open-webui`: [`OPEN_WEBUI`].
    OpenWebui,
}

impl Preset {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Preset::OpenWebui => "open-webui",
        }
    }

    pub(super) fn rules(self) -> &'static [Rule] {
        match self {
            Preset::OpenWebui => OPEN_WEBUI,
        }
    }

    /// The database the app itself would use, found in the environment `var` reads as the
    /// app finds it; `None` for an app whose own settings the gate does not read.
    pub(crate) fn database(self, var: &dyn Fn(&str) -> Option<String>) -> Option<AppDatabase> {
        match self {
            Preset::OpenWebui => Some(open_webui::database(var)),
        }
    }
}

/// Whether a broken rule stops the replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Level {
    /// Exit 78 without starting the app.
    Fail,
    /// Log a warning and go on.
    Warn,
}

/// What a rule wants of its variables.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Condition {
    /// The same value (or unset) on every replica of a release: compared by fingerprint.
    Same,
    /// Set and not empty.
    Set,
    /// Equal to this, ignoring ASCII case; `unset_ok`: unset means the app's default, which is it.
    Is { value: &'static str, unset_ok: bool },
    /// Holds when the function says so: for rules that read several variables or the command.
    Holds(fn(&Context) -> bool),
    /// Holds unless the function says why not (naming variables, never their values).
    Why(fn(&Context) -> Option<String>),
}

/// One row of a preset.
#[derive(Debug)]
pub(crate) struct Rule {
    /// The variables the rule reads (with [`Condition::Same`]: the ones compared).
    pub(crate) vars: &'static [&'static str],
    /// What it wants, as the gate tests it ([`Rule::wants`] says it in words).
    pub(crate) condition: Condition,
    /// What it does when broken.
    pub(crate) level: Level,
    /// What it wants, for messages ("DATABASE_URL points at PostgreSQL").
    pub(crate) wants: &'static str,
    /// Why, for messages and the README.
    pub(crate) why: &'static str,
}

/// Open WebUI's "Scaling & HA" checklist. Only what breaks even a single replica, or is never
/// right, fails; what only matters with several replicas warns, because a single-replica user
/// may put the gate in front of Open WebUI for safe upgrades too.
const OPEN_WEBUI: &[Rule] = &[
    Rule {
        vars: &["WEBUI_SECRET_KEY"],
        condition: Condition::Same,
        level: Level::Fail,
        wants: "WEBUI_SECRET_KEY is the same on every replica",
        why: "each replica signs sessions with its key: different keys mean login loops and 401s",
    },
    Rule {
        vars: &["WEBUI_SECRET_KEY"],
        condition: Condition::Set,
        level: Level::Warn,
        wants: "WEBUI_SECRET_KEY is set",
        why: "unset, each container generates its own key in its data directory, so replicas disagree unless they share that directory",
    },
    Rule {
        vars: &["DATABASE_URL", "DATABASE_TYPE"],
        condition: Condition::Why(|cx| match open_webui_database(cx).conninfo {
            Err(Problem::NotPostgres(why)) => Some(why),
            _ => None,
        }),
        level: Level::Fail,
        wants: "Open WebUI's database (its DATABASE_* parts, else DATABASE_URL) is PostgreSQL",
        why: "without it Open WebUI uses SQLite, which does not support more than one instance, and the gate's lock would guard a database the app does not use",
    },
    Rule {
        vars: &OPEN_WEBUI_DATABASE,
        condition: Condition::Why(|cx| match open_webui_database(cx).conninfo {
            Err(Problem::Misread(why)) => Some(why),
            _ => None,
        }),
        level: Level::Fail,
        wants: "Open WebUI reads its database settings as they are written",
        why: "Open WebUI would fail to connect, or connect to another database than the one they name, so the gate cannot lock the database the app migrates",
    },
    Rule {
        vars: &OPEN_WEBUI_DATABASE,
        condition: Condition::Same,
        level: Level::Warn,
        wants: "Open WebUI's database settings are the same on every replica",
        why: "replicas on different databases share no users, chats or settings",
    },
    Rule {
        vars: &["ENABLE_WEBSOCKET_SUPPORT"],
        condition: Condition::Is {
            value: "true",
            unset_ok: true,
        },
        level: Level::Warn,
        wants: "ENABLE_WEBSOCKET_SUPPORT=True",
        why: "without websockets across replicas, events reach only the replica that made them",
    },
    Rule {
        vars: &["WEBSOCKET_MANAGER"],
        condition: Condition::Is {
            value: "redis",
            unset_ok: false,
        },
        level: Level::Warn,
        wants: "WEBSOCKET_MANAGER=redis",
        why: "websocket sessions otherwise live in one process: 403s and lost events behind a load balancer",
    },
    // Open WebUI's env.py: `WEBSOCKET_REDIS_URL = os.environ.get("WEBSOCKET_REDIS_URL",
    // REDIS_URL)`, so REDIS_URL alone serves the websocket manager too.
    Rule {
        vars: &["WEBSOCKET_REDIS_URL", "REDIS_URL"],
        condition: Condition::Holds(|cx| cx.set("WEBSOCKET_REDIS_URL") || cx.set("REDIS_URL")),
        level: Level::Warn,
        wants: "WEBSOCKET_REDIS_URL is set, or REDIS_URL (which Open WebUI falls back to)",
        why: "the websocket manager needs a Redis shared by every replica",
    },
    Rule {
        vars: &["REDIS_URL"],
        condition: Condition::Set,
        level: Level::Warn,
        wants: "REDIS_URL is set",
        why: "settings changed on one replica reach the others through Redis",
    },
    Rule {
        vars: &[
            "ENABLE_WEBSOCKET_SUPPORT",
            "WEBSOCKET_MANAGER",
            "WEBSOCKET_REDIS_URL",
            "REDIS_URL",
        ],
        condition: Condition::Same,
        level: Level::Warn,
        wants: "the websocket and Redis settings are the same on every replica",
        why: "replicas must share one Redis for websockets and config sync",
    },
    Rule {
        vars: &["VECTOR_DB", "CHROMA_HTTP_HOST", "UVICORN_WORKERS"],
        condition: Condition::Holds(|cx| cx.workers() <= 1 || shared_vector_store(cx)),
        level: Level::Fail,
        wants: "a client-server vector store (VECTOR_DB other than chroma, or CHROMA_HTTP_HOST) when UVICORN_WORKERS > 1",
        why: "the default local ChromaDB keeps its index in SQLite, and forked workers crash on it",
    },
    Rule {
        vars: &["UVICORN_WORKERS"],
        condition: Condition::Holds(|cx| {
            cx.workers() <= 1 || !matches!(cx.mode, Mode::Run { migrate: false })
        }),
        level: Level::Fail,
        wants: "`run` has --migrate \"python -c 'import open_webui.config'\" when UVICORN_WORKERS > 1",
        why: "without it the holder starts the app with the flag on, and every uvicorn worker runs Alembic at once inside that one container (Open WebUI's Scaling & HA guide warns about exactly this)",
    },
    Rule {
        vars: &["VECTOR_DB", "CHROMA_HTTP_HOST"],
        condition: Condition::Holds(shared_vector_store),
        level: Level::Warn,
        wants: "a client-server vector store (VECTOR_DB other than chroma, or CHROMA_HTTP_HOST)",
        why: "the default local ChromaDB is per container (replicas do not see each other's documents) and SQLite on a shared volume is unsafe",
    },
    Rule {
        vars: &["VECTOR_DB"],
        condition: Condition::Same,
        level: Level::Warn,
        wants: "VECTOR_DB is the same on every replica",
        why: "replicas would index and search different stores",
    },
    // Open WebUI reads these with int(): a value that is not a whole number is a typo the
    // gate's own arithmetic (the connection budget, the first start's workers) must not guess.
    Rule {
        vars: &[
            "UVICORN_WORKERS",
            "DATABASE_POOL_SIZE",
            "DATABASE_POOL_MAX_OVERFLOW",
        ],
        condition: Condition::Why(|cx| {
            [
                "UVICORN_WORKERS",
                "DATABASE_POOL_SIZE",
                "DATABASE_POOL_MAX_OVERFLOW",
            ]
            .into_iter()
            .find(|v| {
                cx.var(v)
                    .filter(|x| !x.trim().is_empty())
                    .is_some_and(|x| super::open_webui::python_int(&x).is_none())
            })
            .map(|v| format!("{v} is not a whole number"))
        }),
        level: Level::Warn,
        wants: "UVICORN_WORKERS, DATABASE_POOL_SIZE and DATABASE_POOL_MAX_OVERFLOW are whole numbers when set",
        why: "Open WebUI reads them with int(); the gate counts such a value as unset",
    },
    // Open WebUI 0.11 and 0.12: RESET_CONFIG_ON_START makes main.py's lifespan() call
    // async_reset_config() (Config.clear(): every `config` row deleted) in each worker of each
    // replica at start-up, outside ENABLE_DB_MIGRATIONS.
    Rule {
        vars: &["RESET_CONFIG_ON_START"],
        condition: Condition::Holds(|cx| {
            !cx.var("RESET_CONFIG_ON_START")
                .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
        }),
        level: Level::Warn,
        wants: "RESET_CONFIG_ON_START is not true",
        why: "Open WebUI then deletes every config row at start-up in each worker of each replica: with more than one replica, a replica starting later wipes the settings the others serve from; set it for one start of one replica only",
    },
    Rule {
        vars: &[],
        condition: Condition::Holds(|cx| !matches!(cx.mode, Mode::Run { migrate: false })),
        level: Level::Warn,
        wants: "`run` has --migrate \"python -c 'import open_webui.config'\"",
        why: "without it the app migrates on start-up, and with UVICORN_WORKERS > 1 its own workers race each other inside the migrating container",
    },
];

/// The variables Open WebUI finds its database with ([`open_webui`]).
const OPEN_WEBUI_DATABASE: [&str; 7] = [
    "DATABASE_URL",
    "DATABASE_TYPE",
    "DATABASE_USER",
    "DATABASE_PASSWORD",
    "DATABASE_HOST",
    "DATABASE_PORT",
    "DATABASE_NAME",
];

/// Open WebUI's database, as the app resolves it from the context's environment.
fn open_webui_database(cx: &Context) -> AppDatabase {
    open_webui::database(&|name| cx.var(name))
}

/// Whether Open WebUI's vector store is a server every replica shares.
fn shared_vector_store(cx: &Context) -> bool {
    let set = |name: &str| cx.var(name).is_some_and(|v| !v.trim().is_empty());
    set("CHROMA_HTTP_HOST")
        || cx
            .var("VECTOR_DB")
            .is_some_and(|v| !v.trim().is_empty() && !v.trim().eq_ignore_ascii_case("chroma"))
}

/// What the gate is about to do, for rules that look at the command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// `migrate -- CMD`.
    Migrate,
    /// `run`; `migrate`: whether `--migrate` was given.
    Run { migrate: bool },
    /// `wait`.
    Wait,
}

/// Reads one environment variable (the process's own, or a test's table).
pub(super) type Lookup = Box<dyn Fn(&str) -> Option<String>>;

/// What the rules look at: the environment the app will get, and the command.
pub(crate) struct Context {
    pub(super) vars: Lookup,
    pub(super) mode: Mode,
}

impl Context {
    pub(super) fn var(&self, name: &str) -> Option<String> {
        (self.vars)(name)
    }

    /// Whether `name` is set to something other than the empty string.
    fn set(&self, name: &str) -> bool {
        self.var(name).is_some_and(|v| !v.trim().is_empty())
    }

    /// `UVICORN_WORKERS`, 1 when unset or not a number.
    fn workers(&self) -> u32 {
        self.var("UVICORN_WORKERS")
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(1)
    }
}

/// Why a local rule does not hold, naming the variable but never its value; `None` if it holds.
pub(super) fn broken(rule: &Rule, cx: &Context) -> Option<String> {
    let each = |f: &dyn Fn(Option<String>) -> Option<&'static str>| {
        rule.vars
            .iter()
            .find_map(|v| f(cx.var(v)).map(|how| format!("{v} {how}")))
    };
    match rule.condition {
        Condition::Same => None,
        Condition::Set => each(&|v| match v {
            None => Some("is unset"),
            Some(v) if v.trim().is_empty() => Some("is empty"),
            Some(_) => None,
        }),
        Condition::Is { value, unset_ok } => each(&|v| match v {
            None if unset_ok => None,
            None => Some("is unset"),
            Some(v) if v.trim().eq_ignore_ascii_case(value) => None,
            Some(_) => Some("has another value"),
        }),
        Condition::Why(f) => f(cx),
        Condition::Holds(f) => {
            if f(cx) {
                None
            } else if rule.vars.is_empty() {
                Some("it does not".to_string())
            } else {
                let state: Vec<String> = rule
                    .vars
                    .iter()
                    .map(|v| {
                        format!(
                            "{v} {}",
                            if cx.var(v).is_some() {
                                "is set"
                            } else {
                                "is unset"
                            }
                        )
                    })
                    .collect();
                Some(state.join(", "))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cx(vars: &'static [(&'static str, &'static str)]) -> Context {
        Context {
            vars: Box::new(move |name| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }),
            mode: Mode::Run { migrate: true },
        }
    }

    /// The rules that name the websocket Redis, and what they say of `vars`.
    fn websocket_redis(vars: &'static [(&'static str, &'static str)]) -> Vec<String> {
        Preset::OpenWebui
            .rules()
            .iter()
            .filter(|r| {
                r.vars.contains(&"WEBSOCKET_REDIS_URL") && !matches!(r.condition, Condition::Same)
            })
            .filter_map(|r| broken(r, &cx(vars)))
            .collect()
    }

    #[test]
    fn redis_url_alone_serves_the_websocket_manager_as_in_open_webuis_env_py() {
        assert!(websocket_redis(&[("REDIS_URL", "redis://r:6379/0")]).is_empty());
        assert!(websocket_redis(&[("WEBSOCKET_REDIS_URL", "redis://r:6379/1")]).is_empty());
        assert_eq!(websocket_redis(&[]).len(), 1);
        assert_eq!(websocket_redis(&[("REDIS_URL", " ")]).len(), 1);
    }
}
