//! `migrations-gate check`: what the gate would find, shown before a deploy. It connects exactly
//! as a replica that may migrate does (the same URL, hosts and retries: [`crate::db::Db::connect`])
//! and then only reads: the host it reached and why ([`crate::db::Db::reached`]), the route and
//! its proof ([`crate::replica::Replica::judge_route`]), the server, who holds the lock, the
//! ledger and the release's state ([`crate::ledger`]), and each privilege the gate needs
//! ([`crate::schema::Tables::needs`], `pg_signal_backend` for [`crate::sessions`]). It never
//! takes the lock and never writes: no DDL, no ledger row.
//!
//! The exit code says whether the gate has what it needs ([`crate::error::check_exit_code`]).

use serde::Serialize;

use crate::config::Check;
use crate::db::{Conn, Reached, close};
use crate::error::{Error, Result, check_exit_code};
use crate::ledger::{AttemptRow, ContractState, ReadKey};
use crate::lock::{self, GrantedSession, Scope};
use crate::preflight::{self, Fleet};
use crate::replica::Replica;
use crate::route::Route;
use crate::schema::{Inspected, Need};
use crate::sessions;
use crate::sql::{one_row, query};

/// The JSON document `check --json` prints. Field names are a stable interface.
#[derive(Debug, Serialize)]
pub(crate) struct CheckReport {
    /// Whether the gate has everything it needs (exit 0).
    pub(crate) ok: bool,
    /// The exit code of `check`.
    pub(crate) exit_code: i32,
    /// The database URL, its password replaced by `***`.
    pub(crate) database_url: String,
    /// The host the connection reached, and why that one; `null` when none was reached.
    pub(crate) reached: Option<Reached>,
    /// What sits between the gate and PostgreSQL.
    pub(crate) route: Option<RouteSeen>,
    /// The server and the session.
    pub(crate) server: Option<Server>,
    /// The advisory lock, and who holds it now.
    pub(crate) lock: Option<LockSeen>,
    /// The ledger and the release's state.
    pub(crate) ledger: Option<LedgerSeen>,
    /// Every privilege the gate needs, or may need, and whether the role has it.
    pub(crate) privileges: Vec<Need>,
    /// The fleet-wide checks (`--shared-dir`, `--preset open-webui`); `null` when none applies.
    pub(crate) fleet: Option<Fleet>,
    /// What stops the gate here, most fundamental first; empty when `ok`.
    pub(crate) problems: Vec<Blocker>,
}

/// The route, the lock scope it implies, and the proof (or which part of it failed).
#[derive(Debug, Serialize)]
pub(crate) struct RouteSeen {
    /// `direct`, `transaction_pooling` or `middlebox`.
    pub(crate) route: Route,
    /// The scope the gate would lock in (`--lock-scope`, or what `auto` picks for the route).
    pub(crate) lock_scope: Scope,
    /// Why: the proof of a direct route, or what failed it.
    pub(crate) why: String,
}

/// The server, as the session sees it.
#[derive(Debug, Serialize)]
pub(crate) struct Server {
    /// `server_version`.
    pub(crate) version: String,
    /// `server_version_num`.
    pub(crate) version_num: i64,
    /// `pg_is_in_recovery()`: a hot standby.
    pub(crate) standby: bool,
    /// `transaction_read_only` (a standby, or `default_transaction_read_only`).
    pub(crate) read_only: bool,
    /// `current_database()`.
    pub(crate) database: String,
    /// `current_user`.
    pub(crate) user: String,
}

/// The advisory lock.
#[derive(Debug, Serialize)]
pub(crate) struct LockSeen {
    /// Its name (`id:N` for `--lock-id`).
    pub(crate) name: String,
    /// Its 64-bit key.
    pub(crate) key: i64,
    /// The session holding it now, if any.
    pub(crate) holder: Option<GrantedSession>,
}

/// The ledger, and the release's state in it.
#[derive(Debug, Serialize)]
pub(crate) struct LedgerSeen {
    /// `--schema`.
    pub(crate) schema: String,
    /// Whether the schema exists.
    pub(crate) schema_exists: bool,
    /// Whether `<schema>.ledger` exists.
    pub(crate) table_exists: bool,
    /// Whether the role may read it.
    pub(crate) readable: bool,
    /// `--release`, if given.
    pub(crate) release: Option<String>,
    /// With `--release`: `done`, `running`, `failed`, `abandoned` (its newest attempt) or
    /// `none`; `null` without `--release` or when the ledger is not readable.
    pub(crate) release_state: Option<String>,
    /// The newest attempt (of the release, with `--release`).
    pub(crate) newest_attempt: Option<AttemptRow>,
    /// The contract step of the release (else of the newest release done), when this lock uses
    /// `contract` ([`crate::contract`]); `null` otherwise.
    pub(crate) contract: Option<ContractState>,
}

/// Something that stops the gate, with the exit code the gate would have.
#[derive(Debug, Serialize)]
pub(crate) struct Blocker {
    /// The exit code.
    pub(crate) exit_code: i32,
    /// One line: what is wrong and what to do.
    pub(crate) message: String,
    /// A missing privilege, which the text shows on its `privilege MISSING` line already.
    #[serde(skip)]
    privilege: bool,
}

/// Prints what the gate would find and returns the exit code.
pub(crate) async fn check(plan: Check) -> Result<i32> {
    let replica = Replica::new(plan.target, plan.release)?.for_holder();
    let mut report = CheckReport {
        ok: false,
        exit_code: 0,
        database_url: replica.db.redacted_url.clone(),
        reached: None,
        route: None,
        server: None,
        lock: None,
        ledger: None,
        privileges: Vec::new(),
        fleet: None,
        problems: Vec::new(),
    };
    let (problems, privileges) = match replica.db.connect().await {
        Err(e) => (vec![e], 0),
        Ok(mut conn) => {
            let looked = async {
                look(&replica, &mut conn, &mut report).await?;
                let c = conn.pg().await?;
                report.fleet = preflight::fleet(c, &replica, plan.preset, plan.shared_dir).await?;
                Ok::<_, sqlx::Error>(())
            }
            .await;
            close(conn).await;
            looked.map_err(|e| replica.db.fail(&e, "during check"))?;
            problems(&report)
        }
    };
    report.exit_code = check_exit_code(&problems);
    report.ok = problems.is_empty();
    let first_privilege = problems.len() - privileges;
    report.problems = problems
        .iter()
        .enumerate()
        .map(|(i, e)| Blocker {
            exit_code: e.exit_code(),
            message: e.to_string(),
            privilege: i >= first_privilege,
        })
        .collect();
    let text = if plan.json {
        serde_json::to_string_pretty(&report)
            .map_err(|e| Error::Internal(format!("cannot encode the check as JSON: {e}")))?
    } else {
        render(&report)
    };
    crate::output::print(text.trim_end())?;
    Ok(report.exit_code)
}

/// Everything `check` reads, on the connection the gate would use; reads only.
async fn look(
    replica: &Replica,
    conn: &mut Conn,
    report: &mut CheckReport,
) -> Result<(), sqlx::Error> {
    report.reached = replica.db.reached();
    // First, before anything else uses the connection: the proof reads our own sockets.
    let (route, lock_scope, why) = replica.judge_route(conn).await?;
    report.route = Some(RouteSeen {
        route,
        lock_scope,
        why,
    });
    let c = conn.pg().await?;
    let (server, may_signal) = server(c).await?;
    report.lock = Some(LockSeen {
        name: replica.lock().name.clone(),
        key: replica.lock().key,
        holder: lock::holder(c, replica.lock()).await?,
    });
    let tables = replica.ledger.tables();
    let found = tables.inspect(c).await?;
    let with_release = replica.release().is_some();
    report.privileges = tables.needs(&found, &server.user, &server.database, with_release);
    report.privileges.push(Need {
        privilege: "pg_signal_backend".into(),
        needed_for: "to end a failed attempt's sessions that run as another role; those of the gate's own role need nothing".into(),
        required: false,
        granted: may_signal,
        grant: sessions::signal_grant(&server.user),
    });
    report.ledger = Some(ledger(c, replica, &found).await?);
    report.server = Some(server);
    Ok(())
}

/// The server and the session, and whether the role may end other roles' sessions.
async fn server(c: &mut sqlx::PgConnection) -> Result<(Server, bool), sqlx::Error> {
    let rows = query(
        c,
        "SELECT current_setting('server_version'), current_setting('server_version_num'), \
                pg_is_in_recovery()::text, current_setting('transaction_read_only'), \
                current_database()::text, current_user::text, \
                pg_has_role('pg_signal_backend', 'USAGE')::text"
            .into(),
    )
    .await?;
    let row = one_row(&rows)?;
    let on = |i: usize| -> Result<bool, sqlx::Error> {
        Ok(matches!(row.text(i)?.as_str(), "true" | "on"))
    };
    let server = Server {
        version: row.text(0)?,
        version_num: row.parse(1)?,
        standby: on(2)?,
        read_only: on(3)?,
        database: row.text(4)?,
        user: row.text(5)?,
    };
    Ok((server, on(6)?))
}

/// The ledger and the release's state, read with the gate's own ledger queries when the role
/// may read it.
async fn ledger(
    c: &mut sqlx::PgConnection,
    replica: &Replica,
    found: &Inspected,
) -> Result<LedgerSeen, sqlx::Error> {
    let release = replica.release();
    let contract = if found.readable() {
        replica.ledger.contract_state(c, release).await?
    } else {
        None
    };
    let (release_state, newest_attempt) = if found.readable() {
        let newest = replica.ledger.attempts(c, release, 1).await?.pop();
        let state = match release {
            Some(r) if replica.ledger.is_done(c, r, ReadKey::No).await?.done == Some(true) => {
                Some("done".to_string())
            }
            Some(_) => Some(
                newest
                    .as_ref()
                    .map_or("none".into(), |a| a.outcome.to_string()),
            ),
            None => None,
        };
        (state, newest)
    } else if !found.table {
        (release.map(|_| "none".to_string()), None)
    } else {
        (None, None)
    };
    Ok(LedgerSeen {
        schema: replica.target.schema.clone(),
        schema_exists: found.schema,
        table_exists: found.table,
        readable: found.readable(),
        release: release.map(String::from),
        release_state,
        newest_attempt,
        contract,
    })
}

/// What stops the gate, most fundamental first: a server where a holder cannot write, then
/// each privilege it needs and lacks (how many: the second value).
fn problems(report: &CheckReport) -> (Vec<Error>, usize) {
    let mut found = Vec::new();
    let done = report
        .ledger
        .as_ref()
        .is_some_and(|l| l.release_state.as_deref() == Some("done"));
    let host = report
        .reached
        .as_ref()
        .map_or_else(|| report.database_url.clone(), |r| r.host.clone());
    if let Some(s) = &report.server
        && (s.standby || s.read_only)
        && !done
    {
        let what = if s.standby {
            "a read-only standby (pg_is_in_recovery() is true)"
        } else {
            "read-only (transaction_read_only is on: default_transaction_read_only)"
        };
        found.push(Error::Unavailable(format!(
            "{host} is {what}{}: the replica that migrates needs the primary; point the gate at the primary (or at a proxy that follows the leader)",
            match report.ledger.as_ref().and_then(|l| l.release.as_ref()) {
                Some(r) => format!(" and release {r:?} is not done there"),
                None => String::new(),
            }
        )));
    }
    let user = report.server.as_ref().map_or("", |s| s.user.as_str());
    let missing: Vec<&Need> = report
        .privileges
        .iter()
        .filter(|n| n.required && !n.granted)
        .collect();
    for need in &missing {
        found.push(Error::Auth(format!(
            "the role {user:?} lacks {} ({}): ask a DBA to run `{}`; see \"Privileges\" in the README",
            need.privilege, need.needed_for, need.grant
        )));
    }
    (found, missing.len())
}

/// One line per item, for people.
pub(crate) fn render(r: &CheckReport) -> String {
    let mut s = format!("database: {}\n", r.database_url);
    match &r.reached {
        Some(h) => s.push_str(&format!("host: {} ({})\n", h.host, h.why)),
        None => s.push_str("host: not connected\n"),
    }
    if let Some(route) = &r.route {
        let name = match route.route {
            Route::Direct => "direct",
            Route::TransactionPooling => "transaction pooling",
            Route::Middlebox => "middlebox",
        };
        let scope = match route.lock_scope {
            Scope::Session => "session",
            Scope::Transaction => "transaction",
            Scope::Auto => "auto",
        };
        s.push_str(&format!(
            "route: {name}, lock scope {scope}: {}\n",
            route.why
        ));
    }
    if let Some(v) = &r.server {
        s.push_str(&format!(
            "server: PostgreSQL {}, {}, {}\n",
            v.version,
            if v.standby { "standby" } else { "primary" },
            if v.read_only {
                "read-only"
            } else {
                "read-write"
            }
        ));
        s.push_str(&format!(
            "session: database {:?}, user {:?}\n",
            v.database, v.user
        ));
    }
    if let Some(l) = &r.lock {
        let holder = l
            .holder
            .as_ref()
            .map_or("free".to_string(), |h| format!("held by {h}"));
        s.push_str(&format!("lock: {} (key {}), {holder}\n", l.name, l.key));
    }
    if let Some(l) = &r.ledger {
        render_ledger(&mut s, l);
    }
    for p in &r.privileges {
        let state = match (p.granted, p.required) {
            (true, _) => "ok",
            (false, true) => "MISSING",
            (false, false) => "missing, optional",
        };
        s.push_str(&format!(
            "privilege {state}: {}, {}",
            p.privilege, p.needed_for
        ));
        if !p.granted {
            s.push_str(&format!("; ask a DBA: {}", p.grant));
        }
        s.push('\n');
    }
    if let Some(f) = &r.fleet {
        if let Some(d) = &f.shared_dir {
            s.push_str(&format!("shared directory: {}: {}\n", d.path, d.state));
        }
        if let Some(b) = &f.connection_budget {
            let state = if b.over { "OVER" } else { "ok" };
            s.push_str(&format!("connection budget {state}: {}\n", b.line));
        }
    }
    for p in r.problems.iter().filter(|p| !p.privilege) {
        s.push_str(&format!("problem: {}\n", p.message));
    }
    let missing = r.problems.iter().filter(|p| p.privilege).count();
    if r.ok {
        s.push_str("result: ok, the gate has everything it needs (exit 0)\n");
    } else if missing > 0 {
        s.push_str(&format!(
            "result: {} problem(s), {missing} of them a missing privilege (MISSING above), exit {}\n",
            r.problems.len(),
            r.exit_code
        ));
    } else {
        s.push_str(&format!(
            "result: {} problem(s), exit {}\n",
            r.problems.len(),
            r.exit_code
        ));
    }
    s
}

/// The ledger's lines: what exists, and the release's state.
fn render_ledger(s: &mut String, l: &LedgerSeen) {
    let ledger = match (l.schema_exists, l.table_exists, l.readable) {
        (false, _, _) => format!(
            "schema {:?} does not exist (the gate creates it and its ledger on first use)",
            l.schema
        ),
        (true, false, _) => format!(
            "schema {:?} exists, no ledger yet (the gate creates it on first use)",
            l.schema
        ),
        (true, true, true) => format!("{}.ledger exists", l.schema),
        (true, true, false) => format!("{}.ledger exists, not readable by the role", l.schema),
    };
    s.push_str(&format!("ledger: {ledger}\n"));
    let newest = l.newest_attempt.as_ref().map(|a| {
        format!(
            "attempt {} {} by {} at {}",
            a.id,
            a.outcome,
            a.holder,
            a.started_at.replace('T', " ").trim_end_matches('Z')
        )
    });
    match (&l.release, &l.release_state) {
        (Some(r), Some(state)) => s.push_str(&format!(
            "release: {r} {state}{}\n",
            newest.map(|n| format!(" (newest {n})")).unwrap_or_default()
        )),
        (Some(r), None) => s.push_str(&format!("release: {r} unknown (ledger not readable)\n")),
        (None, _) => s.push_str(&format!(
            "release: none given (--release); newest attempt: {}\n",
            newest.unwrap_or_else(|| "none".into())
        )),
    }
    if let Some(c) = &l.contract {
        s.push_str(&format!("{}\n", crate::status::contract_line(c)));
    }
}
