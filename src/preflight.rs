//! Preflight: every replica passes through the gate with its environment and a database
//! connection before its app starts, so the gate refuses (exit 78, `EX_CONFIG`) the
//! multi-replica misconfigurations that would otherwise fail later as symptoms.
//!
//! Three kinds of check, in the order a replica meets them:
//!
//! 1. **Local rules** of a preset (`--preset`), before any connection: a small table of
//!    [`Rule`]s, each naming its variables, its [`Check`], whether it fails or warns, and why
//!    (the README's preset table is this table).
//! 2. **No older release** (always, unless `--allow-older-release`): a replica whose release is
//!    done but older than a release done after it must not start on a schema that moved on.
//!    The ledger read of the fast path already answers it ([`crate::ledger::Seen::newer`]): no
//!    extra round trip.
//! 3. **Same settings** (`--same-env`, and the presets' [`Check::Same`] rules): per variable, a
//!    fingerprint of this replica's value, HMAC-SHA256 under a random key that the gate creates
//!    once per ledger schema and keeps in the database (`<schema>.env_key`), so that a
//!    fingerprint alone does not reveal a short secret. The first replica of a release sets the
//!    reference (`<schema>.env_reference`); every replica records whether it agreed
//!    (`<schema>.env_checks`, for `status`). Reading the reference and recording both happen
//!    in one statement: one round trip. Values and fingerprints are never printed.

use clap::ValueEnum;
use sha2::{Digest, Sha256};
use sqlx::Row;
use sqlx::postgres::PgConnection;
use tracing::{info, warn};

use crate::config::PreflightArgs;
use crate::db::{Conn, close, ident, lit, query};
use crate::error::{Error, Result};
use crate::gate::Gate;
use crate::ledger::Seen;
use crate::lock::LockKey;

/// What a `--same-env` difference does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnMismatch {
    /// Refuse to start the app: exit 78.
    Fail,
    /// Log a warning and start the app.
    Warn,
}

/// A named set of rules for a known app (README, "Preflight").
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Preset {
    /// Open WebUI's multi-replica checklist.
    #[value(name = "open-webui")]
    OpenWebui,
}

impl Preset {
    fn name(self) -> &'static str {
        match self {
            Preset::OpenWebui => "open-webui",
        }
    }

    fn rules(self) -> &'static [Rule] {
        match self {
            Preset::OpenWebui => OPEN_WEBUI,
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
pub(crate) enum Check {
    /// The same value (or unset) on every replica of a release: compared by fingerprint.
    Same,
    /// Set and not empty.
    Set,
    /// Equal to this, ignoring ASCII case; `unset_ok`: unset means the app's default, which is it.
    Is { value: &'static str, unset_ok: bool },
    /// Starts with one of these, ignoring ASCII case.
    StartsWith(&'static [&'static str]),
    /// Holds when the function says so: for rules that read several variables or the command.
    Holds(fn(&Context) -> bool),
}

/// One row of a preset.
#[derive(Debug)]
pub(crate) struct Rule {
    /// The variables the rule reads (with [`Check::Same`]: the ones compared).
    pub(crate) vars: &'static [&'static str],
    /// What it wants.
    pub(crate) check: Check,
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
        check: Check::Same,
        level: Level::Fail,
        wants: "WEBUI_SECRET_KEY is the same on every replica",
        why: "each replica signs sessions with its key: different keys mean login loops and 401s",
    },
    Rule {
        vars: &["WEBUI_SECRET_KEY"],
        check: Check::Set,
        level: Level::Warn,
        wants: "WEBUI_SECRET_KEY is set",
        why: "unset, each container generates its own key in its data directory, so replicas disagree unless they share that directory",
    },
    Rule {
        vars: &["DATABASE_URL"],
        check: Check::StartsWith(&["postgres://", "postgresql://", "postgresql+"]),
        level: Level::Fail,
        wants: "DATABASE_URL points at PostgreSQL",
        why: "without it Open WebUI uses SQLite, which does not support more than one instance, and the gate's lock would guard a database the app does not use",
    },
    Rule {
        vars: &["DATABASE_URL"],
        check: Check::Same,
        level: Level::Warn,
        wants: "DATABASE_URL is the same on every replica",
        why: "replicas on different databases share no users, chats or settings",
    },
    Rule {
        vars: &["ENABLE_WEBSOCKET_SUPPORT"],
        check: Check::Is {
            value: "true",
            unset_ok: true,
        },
        level: Level::Warn,
        wants: "ENABLE_WEBSOCKET_SUPPORT=True",
        why: "without websockets across replicas, events reach only the replica that made them",
    },
    Rule {
        vars: &["WEBSOCKET_MANAGER"],
        check: Check::Is {
            value: "redis",
            unset_ok: false,
        },
        level: Level::Warn,
        wants: "WEBSOCKET_MANAGER=redis",
        why: "websocket sessions otherwise live in one process: 403s and lost events behind a load balancer",
    },
    Rule {
        vars: &["WEBSOCKET_REDIS_URL"],
        check: Check::Set,
        level: Level::Warn,
        wants: "WEBSOCKET_REDIS_URL is set",
        why: "the websocket manager needs a Redis shared by every replica",
    },
    Rule {
        vars: &["REDIS_URL"],
        check: Check::Set,
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
        check: Check::Same,
        level: Level::Warn,
        wants: "the websocket and Redis settings are the same on every replica",
        why: "replicas must share one Redis for websockets and config sync",
    },
    Rule {
        vars: &["VECTOR_DB", "CHROMA_HTTP_HOST", "UVICORN_WORKERS"],
        check: Check::Holds(|cx| cx.workers() <= 1 || shared_vector_store(cx)),
        level: Level::Fail,
        wants: "a client-server vector store (VECTOR_DB other than chroma, or CHROMA_HTTP_HOST) when UVICORN_WORKERS > 1",
        why: "the default local ChromaDB keeps its index in SQLite, and forked workers crash on it",
    },
    Rule {
        vars: &["VECTOR_DB", "CHROMA_HTTP_HOST"],
        check: Check::Holds(shared_vector_store),
        level: Level::Warn,
        wants: "a client-server vector store (VECTOR_DB other than chroma, or CHROMA_HTTP_HOST)",
        why: "the default local ChromaDB is per container (replicas do not see each other's documents) and SQLite on a shared volume is unsafe",
    },
    Rule {
        vars: &["VECTOR_DB"],
        check: Check::Same,
        level: Level::Warn,
        wants: "VECTOR_DB is the same on every replica",
        why: "replicas would index and search different stores",
    },
    Rule {
        vars: &[],
        check: Check::Holds(|cx| !matches!(cx.mode, Mode::Run { migrate: false })),
        level: Level::Warn,
        wants: "`run` has --migrate \"python -c 'import open_webui.config'\"",
        why: "without it the app migrates on start-up, and with UVICORN_WORKERS > 1 its own workers race each other inside the migrating container",
    },
];

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
type Lookup = Box<dyn Fn(&str) -> Option<String>>;

/// What the rules look at: the environment the app will get, and the command.
pub(crate) struct Context {
    vars: Lookup,
    mode: Mode,
}

impl Context {
    fn var(&self, name: &str) -> Option<String> {
        (self.vars)(name)
    }

    /// `UVICORN_WORKERS`, 1 when unset or not a number.
    fn workers(&self) -> u32 {
        self.var("UVICORN_WORKERS")
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(1)
    }
}

/// A variable compared across replicas, and what a difference does.
#[derive(Debug, Clone)]
struct Compared {
    name: String,
    level: Level,
    /// The preset rule that asked for it, if any.
    rule: Option<(&'static str, &'static Rule)>,
}

/// The checks of one replica, decided from its flags and environment.
pub(crate) struct Preflight {
    compared: Vec<Compared>,
    allow_older: bool,
    on_mismatch: OnMismatch,
}

impl Preflight {
    /// Checks the flags and the presets' local rules: a failing rule is an error (78) before
    /// the gate connects; warnings are logged.
    pub(crate) fn new(
        args: &PreflightArgs,
        mode: Mode,
        release: Option<&str>,
    ) -> Result<Preflight> {
        let cx = Context {
            vars: Box::new(|name| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned())),
            mode,
        };
        Preflight::with_context(args, &cx, release)
    }

    fn with_context(
        args: &PreflightArgs,
        cx: &Context,
        release: Option<&str>,
    ) -> Result<Preflight> {
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
        if !compared.is_empty() && release.is_none() {
            return Err(Error::Usage(format!(
                "--same-env {} (or a preset that compares variables) needs --release or --release-from: \
                 the first replica of each release sets the values the others must match",
                names(&compared)
            )));
        }
        Ok(Preflight {
            compared,
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
    pub(crate) async fn follower(&self, gate: &Gate, seen: Seen, conn: Option<Conn>) -> Result<()> {
        if let (Some(newer), Some(release)) = (&seen.newer, gate.release()) {
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
        self.compare(gate, seen.env_key, conn).await
    }

    /// The holder, before it migrates: the variables only (its release is not done, so it is
    /// the newest).
    pub(crate) async fn holder(&self, gate: &Gate) -> Result<()> {
        self.compare(gate, None, None).await
    }

    /// Records this replica's fingerprints and compares them with the release's reference.
    async fn compare(&self, gate: &Gate, key: Option<EnvKey>, conn: Option<Conn>) -> Result<()> {
        if self.compared.is_empty() {
            return Ok(());
        }
        let Some(release) = gate.release() else {
            return Ok(());
        };
        let store = Store::new(&gate.target.schema, gate.lock());
        let mut conn = match conn {
            Some(c) => c,
            None => gate.db.connect().await?,
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
                let mine: Vec<(String, String)> = self
                    .compared
                    .iter()
                    .map(|v| (v.name.clone(), k.fingerprint(&v.name)))
                    .collect();
                match store
                    .record(c, release, &mine, &gate.target.application_name)
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
                    other => return other,
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
                return Err(Error::Auth(format!(
                    "the role may not create or write the gate's --same-env tables in schema {} ({}): \
                     ask a DBA to `GRANT USAGE, CREATE ON SCHEMA {} TO <role>;` (see \"Privileges\" in the README)",
                    ident(&gate.target.schema),
                    db.message(),
                    ident(&gate.target.schema)
                )));
            }
            Err(e) => return Err(gate.db.fail(&e, "while comparing --same-env fingerprints")),
        };
        self.judge(release, &seen)
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

/// Why a local rule does not hold, naming the variable but never its value; `None` if it holds.
fn broken(rule: &Rule, cx: &Context) -> Option<String> {
    let each = |f: &dyn Fn(Option<String>) -> Option<&'static str>| {
        rule.vars
            .iter()
            .find_map(|v| f(cx.var(v)).map(|how| format!("{v} {how}")))
    };
    match rule.check {
        Check::Same => None,
        Check::Set => each(&|v| match v {
            None => Some("is unset"),
            Some(v) if v.trim().is_empty() => Some("is empty"),
            Some(_) => None,
        }),
        Check::Is { value, unset_ok } => each(&|v| match v {
            None if unset_ok => None,
            None => Some("is unset"),
            Some(v) if v.trim().eq_ignore_ascii_case(value) => None,
            Some(_) => Some("has another value"),
        }),
        Check::StartsWith(prefixes) => each(&|v| match v {
            None => Some("is unset"),
            Some(v) => {
                let v = v.trim().to_ascii_lowercase();
                (!prefixes.iter().any(|p| v.starts_with(p))).then_some("has another scheme")
            }
        }),
        Check::Holds(f) => {
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

fn names(compared: &[Compared]) -> String {
    compared
        .iter()
        .map(|c| c.name.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

/// The per-ledger HMAC key. Its `Debug` never shows the bytes.
#[derive(Clone)]
pub(crate) struct EnvKey(Vec<u8>);

impl std::fmt::Debug for EnvKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EnvKey(..)")
    }
}

impl EnvKey {
    /// From the hex text the database returns.
    pub(crate) fn from_hex(hex: &str) -> Option<EnvKey> {
        let hex = hex.trim();
        if hex.is_empty() || !hex.len().is_multiple_of(2) {
            return None;
        }
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
            .collect::<Option<Vec<u8>>>()
            .map(EnvKey)
    }

    /// The fingerprint of variable `name` as this process sees it: HMAC-SHA256 over the name and
    /// the value's bytes, with "unset" and "empty" distinct.
    fn fingerprint(&self, name: &str) -> String {
        use std::os::unix::ffi::OsStrExt;
        let value = std::env::var_os(name);
        let mut message = name.as_bytes().to_vec();
        message.push(0);
        match &value {
            None => message.push(0),
            Some(v) => {
                message.push(1);
                message.extend_from_slice(v.as_bytes());
            }
        }
        hex(&hmac_sha256(&self.0, &message))
    }
}

/// HMAC-SHA256 (RFC 2104) with the `sha2` the crate already uses.
fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| k.map(|b| b ^ byte);
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(message)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// 32 bytes from the kernel's CSPRNG (`getrandom(2)`).
fn random_key() -> std::io::Result<[u8; 32]> {
    let mut buf = [0u8; 32];
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: writes at most `buf.len() - filled` bytes into the rest of `buf`.
        let n =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += n as usize;
    }
    Ok(buf)
}

/// `SQLSTATE` 25006: a write on a read-only standby.
fn is_read_only(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("25006"))
}

/// `SQLSTATE`s that mean "a table of ours does not exist yet".
fn is_missing_relation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("42P01") | Some("3F000")))
}

/// One variable's reference as this replica's record returned it.
#[derive(Debug, Clone)]
struct Reference {
    variable: String,
    agrees: bool,
    replica: String,
    set_at: String,
}

/// The preflight tables next to the ledger: the key, each release's reference fingerprints,
/// and each replica's last comparison.
pub(crate) struct Store {
    schema: String,
    lock: LockKey,
}

/// The key table's name in `schema` (for the ledger's fast-path read).
pub(crate) fn key_table(schema: &str) -> String {
    format!("{}.env_key", ident(schema))
}

const TIME: &str = "'YYYY-MM-DD HH24:MI:SS \"UTC\"'";
const TIME_JSON: &str = "'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'";

impl Store {
    pub(crate) fn new(schema: &str, lock: &LockKey) -> Store {
        Store {
            schema: schema.to_string(),
            lock: lock.clone(),
        }
    }

    fn reference(&self) -> String {
        format!("{}.env_reference", ident(&self.schema))
    }

    fn checks(&self) -> String {
        format!("{}.env_checks", ident(&self.schema))
    }

    /// Creates the tables that are missing, and nothing else (like [`crate::ledger::Ledger::ensure`]:
    /// a role owning only the schema can do it), under the ledger's DDL lock.
    async fn ensure(&self, conn: &mut PgConnection) -> Result<(), sqlx::Error> {
        let tables = [key_table(&self.schema), self.reference(), self.checks()];
        let rows = query(
            conn,
            format!(
                "SELECT (to_regclass({}) IS NULL)::text, (to_regclass({}) IS NULL)::text, (to_regclass({}) IS NULL)::text",
                lit(&tables[0]),
                lit(&tables[1]),
                lit(&tables[2])
            ),
        )
        .await?;
        let missing = |i: usize| {
            rows.first()
                .and_then(|r| r.try_get::<String, _>(i).ok())
                .as_deref()
                == Some("true")
        };
        if !(0..3).any(missing) {
            return Ok(());
        }
        let ddl_key =
            LockKey::from_name(&format!("migrations-gate ledger ddl {}", self.schema)).key;
        let mut sql = format!("BEGIN; SELECT pg_advisory_xact_lock({ddl_key});");
        if missing(0) {
            sql.push_str(&format!(
                "CREATE TABLE IF NOT EXISTS {} (
                 only_row   boolean PRIMARY KEY DEFAULT true CHECK (only_row),
                 key        bytea NOT NULL,
                 created_at timestamptz NOT NULL DEFAULT clock_timestamp()
             );",
                tables[0]
            ));
        }
        if missing(1) {
            sql.push_str(&format!(
                "CREATE TABLE IF NOT EXISTS {} (
                 lock_key    bigint NOT NULL,
                 release     text NOT NULL,
                 variable    text NOT NULL,
                 fingerprint text NOT NULL,
                 replica     text NOT NULL,
                 host        text NOT NULL,
                 pid         integer NOT NULL,
                 set_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
                 PRIMARY KEY (lock_key, release, variable)
             );",
                tables[1]
            ));
        }
        if missing(2) {
            sql.push_str(&format!(
                "CREATE TABLE IF NOT EXISTS {} (
                 lock_key   bigint NOT NULL,
                 release    text NOT NULL,
                 variable   text NOT NULL,
                 replica    text NOT NULL,
                 host       text NOT NULL,
                 pid        integer NOT NULL,
                 agrees     boolean NOT NULL,
                 checked_at timestamptz NOT NULL DEFAULT clock_timestamp(),
                 PRIMARY KEY (lock_key, release, variable, replica)
             );",
                tables[2]
            ));
        }
        sql.push_str("COMMIT;");
        query(conn, sql).await.map(|_| ())
    }

    /// The key, created (32 random bytes) by the first gate that needs it. Looks first, so
    /// that a read-only standby can read it.
    async fn key(&self, conn: &mut PgConnection) -> Result<EnvKey, sqlx::Error> {
        let table = key_table(&self.schema);
        let existing = query(conn, format!("SELECT encode(key, 'hex') FROM {table}")).await?;
        if let Some(k) = existing
            .iter()
            .find_map(|r| r.try_get::<String, _>(0).ok())
            .and_then(|h| EnvKey::from_hex(&h))
        {
            return Ok(k);
        }
        let fresh = random_key().map_err(sqlx::Error::Io)?;
        let rows = query(
            conn,
            format!(
                "INSERT INTO {table} (key) VALUES (decode({}, 'hex')) ON CONFLICT (only_row) DO NOTHING; \
                 SELECT encode(key, 'hex') FROM {table}",
                lit(&hex(&fresh))
            ),
        )
        .await?;
        rows.iter()
            .find_map(|r| r.try_get::<String, _>(0).ok())
            .and_then(|h| EnvKey::from_hex(&h))
            .ok_or_else(|| sqlx::Error::Protocol("the --same-env key could not be read".into()))
    }

    /// Sets the release's reference where it has none, records whether this replica agrees,
    /// and returns the reference of each variable: one statement. `ON CONFLICT DO UPDATE`
    /// (a no-op update) returns the reference even when another replica set it concurrently.
    async fn record(
        &self,
        conn: &mut PgConnection,
        release: &str,
        mine: &[(String, String)],
        replica: &str,
    ) -> Result<Vec<Reference>, sqlx::Error> {
        let values: Vec<String> = mine
            .iter()
            .map(|(v, f)| format!("({}, {})", lit(v), lit(f)))
            .collect();
        let (key, release, replica) = (self.lock.key, lit(release), lit(replica));
        let host = lit(&crate::config::hostname());
        let pid = std::process::id();
        let sql = format!(
            "WITH mine (variable, fingerprint) AS (VALUES {values}), \
             ref AS ( \
                 INSERT INTO {reference} AS r (lock_key, release, variable, fingerprint, replica, host, pid) \
                 SELECT {key}, {release}, variable, fingerprint, {replica}, {host}, {pid} FROM mine \
                 ON CONFLICT (lock_key, release, variable) DO UPDATE SET fingerprint = r.fingerprint \
                 RETURNING r.variable, r.fingerprint, r.replica, r.set_at), \
             checked AS ( \
                 INSERT INTO {checks} AS c (lock_key, release, variable, replica, host, pid, agrees) \
                 SELECT {key}, {release}, ref.variable, {replica}, {host}, {pid}, ref.fingerprint = mine.fingerprint \
                 FROM ref JOIN mine USING (variable) \
                 ON CONFLICT (lock_key, release, variable, replica) DO UPDATE \
                 SET host = excluded.host, pid = excluded.pid, agrees = excluded.agrees, checked_at = clock_timestamp() \
                 RETURNING 1) \
             SELECT ref.variable, (ref.fingerprint = mine.fingerprint)::text, ref.replica, \
                    to_char(ref.set_at AT TIME ZONE 'UTC', {TIME}), (SELECT count(*) FROM checked)::text \
             FROM ref JOIN mine USING (variable) ORDER BY ref.variable",
            values = values.join(", "),
            reference = self.reference(),
            checks = self.checks(),
        );
        let rows = query(conn, sql).await?;
        rows.iter()
            .map(|r| {
                Ok(Reference {
                    variable: r.try_get(0)?,
                    agrees: r.try_get::<String, _>(1)? == "true",
                    replica: r.try_get(2)?,
                    set_at: r.try_get(3)?,
                })
            })
            .collect()
    }

    /// Compares with the release's reference without recording anything (a read-only
    /// standby). A variable without a reference is not returned.
    async fn compare(
        &self,
        conn: &mut PgConnection,
        release: &str,
        mine: &[(String, String)],
    ) -> Result<Vec<Reference>, sqlx::Error> {
        let values: Vec<String> = mine
            .iter()
            .map(|(v, f)| format!("({}, {})", lit(v), lit(f)))
            .collect();
        let sql = format!(
            "WITH mine (variable, fingerprint) AS (VALUES {}) \
             SELECT r.variable, (r.fingerprint = mine.fingerprint)::text, r.replica, \
                    to_char(r.set_at AT TIME ZONE 'UTC', {TIME}) \
             FROM {} r JOIN mine USING (variable) WHERE r.lock_key = {} AND r.release = {} \
             ORDER BY r.variable",
            values.join(", "),
            self.reference(),
            self.lock.key,
            lit(release)
        );
        let rows = query(conn, sql).await?;
        rows.iter()
            .map(|r| {
                Ok(Reference {
                    variable: r.try_get(0)?,
                    agrees: r.try_get::<String, _>(1)? == "true",
                    replica: r.try_get(2)?,
                    set_at: r.try_get(3)?,
                })
            })
            .collect()
    }

    /// Forgets the fingerprints of `release`; returns how many variables had a reference.
    pub(crate) async fn forget(
        &self,
        conn: &mut PgConnection,
        release: &str,
    ) -> Result<u64, sqlx::Error> {
        let sql = format!(
            "WITH r AS (DELETE FROM {} WHERE lock_key = {key} AND release = {rel} RETURNING 1), \
                  c AS (DELETE FROM {} WHERE lock_key = {key} AND release = {rel} RETURNING 1) \
             SELECT (SELECT count(*) FROM r)::text, (SELECT count(*) FROM c)::text",
            self.reference(),
            self.checks(),
            key = self.lock.key,
            rel = lit(release),
        );
        match query(conn, sql).await {
            Ok(rows) => Ok(rows
                .first()
                .and_then(|r| r.try_get::<String, _>(0).ok())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)),
            Err(e) if is_missing_relation(&e) => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// What `status` shows: per release and variable, who set the reference, how many
    /// replicas agreed, and which disagreed. `releases`: only these (all when `None`).
    pub(crate) async fn summary(
        &self,
        conn: &mut PgConnection,
        releases: Option<&[String]>,
    ) -> Result<Vec<EnvCheck>, sqlx::Error> {
        let filter = match releases {
            Some([]) => return Ok(Vec::new()),
            Some(list) => format!(
                " AND r.release IN ({})",
                list.iter().map(|r| lit(r)).collect::<Vec<_>>().join(", ")
            ),
            None => String::new(),
        };
        let sql = format!(
            "SELECT r.release, r.variable, r.replica, r.host, to_char(r.set_at AT TIME ZONE 'UTC', {TIME_JSON}), \
                    (SELECT count(*) FROM {checks} c WHERE (c.lock_key, c.release, c.variable) = (r.lock_key, r.release, r.variable) AND c.agrees)::text, \
                    coalesce((SELECT json_agg(json_build_object('replica', c.replica, 'host', c.host, \
                                  'at', to_char(c.checked_at AT TIME ZONE 'UTC', {TIME_JSON})) ORDER BY c.checked_at) \
                              FROM {checks} c WHERE (c.lock_key, c.release, c.variable) = (r.lock_key, r.release, r.variable) \
                              AND NOT c.agrees)::text, '[]') \
             FROM {reference} r WHERE r.lock_key = {key}{filter} ORDER BY r.set_at DESC, r.release, r.variable",
            checks = self.checks(),
            reference = self.reference(),
            key = self.lock.key,
        );
        let rows = match query(conn, sql).await {
            Ok(rows) => rows,
            Err(e) if is_missing_relation(&e) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        rows.iter()
            .map(|r| {
                let t = |i: usize| r.try_get::<String, _>(i);
                Ok(EnvCheck {
                    release: t(0)?,
                    variable: t(1)?,
                    reference: Replica {
                        replica: t(2)?,
                        host: t(3)?,
                        at: t(4)?,
                    },
                    agreed: t(5)?.parse().unwrap_or(0),
                    disagreed: serde_json::from_str(&t(6)?).unwrap_or_default(),
                })
            })
            .collect()
    }
}

/// One compared variable of one release, as `status` shows it. The JSON field names are a
/// stable interface; no value or fingerprint is ever part of it.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct EnvCheck {
    /// The release.
    pub release: String,
    /// The variable's name.
    pub variable: String,
    /// The replica whose value became the reference (the release's first).
    pub reference: Replica,
    /// How many replicas (by application name) last saw the same value.
    pub agreed: u32,
    /// The replicas whose last value differed, oldest first.
    pub disagreed: Vec<Replica>,
}

/// A replica in the `--same-env` record.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct Replica {
    /// Its `application_name`.
    pub replica: String,
    /// Its host name.
    pub host: String,
    /// When it set the reference or was last checked, RFC 3339 UTC.
    pub at: String,
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

    fn args(preset: Option<Preset>) -> PreflightArgs {
        PreflightArgs {
            same_env: Vec::new(),
            on_mismatch: OnMismatch::Fail,
            preset,
            allow_older_release: false,
        }
    }

    #[test]
    fn hmac_matches_rfc_4231_test_case_2() {
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            hex(&mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let long_key = [0xaau8; 131];
        let mac = hmac_sha256(
            &long_key,
            b"Test Using Larger Than Block-Size Key - Hash Key First",
        );
        assert_eq!(
            hex(&mac),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
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

    #[test]
    fn key_round_trips_through_hex_and_hides_itself() {
        let k = EnvKey::from_hex("00ff10").unwrap();
        assert_eq!(k.0, vec![0, 255, 16]);
        assert_eq!(format!("{k:?}"), "EnvKey(..)");
        assert!(EnvKey::from_hex("abc").is_none());
    }
}
