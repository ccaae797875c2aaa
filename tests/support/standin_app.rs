//! A stand-in application for tests, the demo and the benchmark. Its migration is deliberately
//! racy (check, sleep, act; several steps that each commit), so two copies that migrate at once
//! visibly break it: a "relation already exists" crash or a seed row inserted twice.
//!
//! Usage: `standin-app setup|migrate|start|serve` with `DATABASE_URL` set, or `standin-app stamp
//! FILE` (no database: appends "PID NANOS_SINCE_EPOCH FLAG" to FILE and exits, for timing hand-offs),
//! or `standin-app blocking-gate STAMPFILE GOFILE`: the common alternative to the gate, for the
//! benchmark: block in `pg_advisory_lock`, migrate (wait for GOFILE to exist) if nobody has, unlock,
//! stamp.
//! - `setup`: creates the bookkeeping tables (`mg_runs`, `app_starts`, `app_signals`); run once.
//! - `migrate`: runs the migration (a migration command for `migrate --` / `--migrate`).
//! - `start`: records its start (PID, flag value), migrates if the flag is on, exits 0.
//! - `serve`: like `start`, then answers HTTP on `STANDIN_PORT` until SIGTERM/SIGINT, which it
//!   records and answers by exiting with `STANDIN_TERM_CODE` (default 42).
//!
//! Knobs: `STANDIN_FLAG` (default `ENABLE_DB_MIGRATIONS`), `STANDIN_STEP_MS` (default 200),
//! `STANDIN_FAIL` (exit 3 after the first step), `STANDIN_STEP_CONNECT` (open a fresh
//! connection at every step; exit 4 if the server has none left), `STANDIN_EXIT_BEFORE_READY` (serve: exit 5
//! before listening), `STANDIN_RUN_LOG=FILE` (appends "start PID NANOS_SINCE_EPOCH" when a
//! migration begins and "end PID NANOS_SINCE_EPOCH" when it succeeds, one O_APPEND write per line:
//! overlap evidence that survives a database failover), `STANDIN_WITNESS_URL=URL` (take the
//! overlap probe lock 4242 on a connection of its own to URL, kept for the whole migration,
//! instead of on the migration's connection: a session lock taken through a transaction pooler
//! would land on whichever server connection runs that statement; point it at PostgreSQL itself).

use std::time::Duration;

use sqlx::postgres::PgConnection;
use sqlx::{AssertSqlSafe, Connection, Row};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

async fn exec(conn: &mut PgConnection, sql: &str) -> Res<()> {
    sqlx::raw_sql(AssertSqlSafe(sql.to_string()))
        .execute(conn)
        .await?;
    Ok(())
}

async fn scalar(conn: &mut PgConnection, sql: &str) -> Res<String> {
    let rows = sqlx::raw_sql(AssertSqlSafe(sql.to_string()))
        .fetch_all(conn)
        .await?;
    let row = rows.first().ok_or("no row")?;
    Ok(row
        .try_get_unchecked::<Option<String>, _>(0)?
        .unwrap_or_default())
}

async fn step_sleep() {
    let ms = env("STANDIN_STEP_MS")
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    // Like a migration tool that opens connections as it goes: fails (and so fails the
    // migration) if waiting gates have left it no connection.
    if env("STANDIN_STEP_CONNECT").is_some()
        && let Some(url) = env("DATABASE_URL")
    {
        match PgConnection::connect(&url).await {
            Ok(c) => {
                let _ = c.close().await;
            }
            Err(e) => {
                eprintln!(
                    "standin-app[{}]: no connection for the next step: {e}",
                    std::process::id()
                );
                std::process::exit(4);
            }
        }
    }
}

async fn setup(conn: &mut PgConnection) -> Res<()> {
    exec(
        conn,
        "CREATE TABLE IF NOT EXISTS mg_runs (id serial PRIMARY KEY, pid int NOT NULL, \
           started_at timestamptz NOT NULL DEFAULT clock_timestamp(), finished_at timestamptz, \
           overlapped bool NOT NULL DEFAULT false);
         CREATE TABLE IF NOT EXISTS app_starts (id serial PRIMARY KEY, pid int NOT NULL, flag text, \
           schema_ready bool NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp());
         CREATE TABLE IF NOT EXISTS app_signals (id serial PRIMARY KEY, pid int NOT NULL, signal text NOT NULL);",
    )
    .await
}

/// The racy migration. Each step commits on its own, like a real multi-step migration.
async fn migrate(conn: &mut PgConnection) -> Res<()> {
    let pid = std::process::id();
    run_log("start")?;
    // A second migrator running at the same moment cannot take this lock: that is an overlap,
    // recorded on the database where the tests look.
    let mut witness = match env("STANDIN_WITNESS_URL") {
        Some(url) => Some(PgConnection::connect(&url).await?),
        None => None,
    };
    let probe = "SELECT pg_try_advisory_lock(4242)::text";
    let alone = match witness.as_mut() {
        Some(w) => scalar(w, probe).await?,
        None => scalar(conn, probe).await?,
    } == "true";
    let run_id = scalar(
        conn,
        &format!(
            "INSERT INTO mg_runs (pid, overlapped) VALUES ({pid}, {}) RETURNING id::text",
            !alone
        ),
    )
    .await?;
    eprintln!("standin-app[{pid}]: migrating (run {run_id})");

    if scalar(conn, "SELECT (to_regclass('app_users') IS NULL)::text").await? == "true" {
        step_sleep().await;
        exec(
            conn,
            "CREATE TABLE app_users (id serial PRIMARY KEY, name text NOT NULL)",
        )
        .await?;
    }
    if env("STANDIN_FAIL").is_some() {
        eprintln!("standin-app[{pid}]: failing on purpose");
        std::process::exit(3);
    }
    step_sleep().await;
    let has_email = scalar(
        conn,
        "SELECT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_name = 'app_users' AND column_name = 'email')::text",
    )
    .await?;
    if has_email == "false" {
        step_sleep().await;
        exec(conn, "ALTER TABLE app_users ADD COLUMN email text").await?;
    }
    step_sleep().await;
    if scalar(conn, "SELECT (to_regclass('app_seed') IS NULL)::text").await? == "true" {
        exec(conn, "CREATE TABLE app_seed (name text NOT NULL)").await?;
    }
    if scalar(conn, "SELECT count(*)::text FROM app_seed").await? == "0" {
        step_sleep().await;
        exec(conn, "INSERT INTO app_seed (name) VALUES ('admin')").await?;
    }
    exec(
        conn,
        &format!("UPDATE mg_runs SET finished_at = clock_timestamp() WHERE id = {run_id}"),
    )
    .await?;
    run_log("end")?;
    // The probe lock stays held until here: the whole migration is covered.
    if let Some(w) = witness {
        w.close().await?;
    }
    eprintln!("standin-app[{pid}]: migration finished");
    Ok(())
}

/// `STANDIN_RUN_LOG`: "EVENT PID NANOS" appended to the file, timestamps that do not depend on
/// the database (a failover may lose the last writes of the old primary).
fn run_log(event: &str) -> Res<()> {
    use std::io::Write;
    let Some(path) = env("STANDIN_RUN_LOG") else {
        return Ok(());
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos();
    let line = format!("{event} {} {nanos}\n", std::process::id());
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)?
        .write_all(line.as_bytes())?;
    Ok(())
}

async fn record_start(conn: &mut PgConnection) -> Res<bool> {
    let flag_name = env("STANDIN_FLAG").unwrap_or_else(|| "ENABLE_DB_MIGRATIONS".into());
    let flag = env(&flag_name);
    let ready = scalar(
        conn,
        "SELECT (to_regclass('app_seed') IS NOT NULL AND EXISTS (SELECT 1 FROM pg_attribute \
           WHERE attrelid = to_regclass('app_users') AND attname = 'email'))::text",
    )
    .await?
        == "true"
        && scalar(conn, "SELECT count(*)::text FROM app_seed").await? != "0";
    let flag_sql = flag
        .as_deref()
        .map(|f| format!("'{}'", f.replace('\'', "''")))
        .unwrap_or_else(|| "NULL".into());
    exec(
        conn,
        &format!(
            "INSERT INTO app_starts (pid, flag, schema_ready) VALUES ({}, {flag_sql}, {ready})",
            std::process::id()
        ),
    )
    .await?;
    Ok(matches!(
        flag.as_deref(),
        Some("True") | Some("true") | Some("1")
    ))
}

async fn serve(conn: &mut PgConnection) -> Res<()> {
    if env("STANDIN_EXIT_BEFORE_READY").is_some() {
        eprintln!("standin-app: exiting before ready on purpose");
        std::process::exit(5);
    }
    let port = env("STANDIN_PORT").ok_or("STANDIN_PORT is required for serve")?;
    let listener = tokio::net::TcpListener::bind(format!("127.0.0.1:{port}")).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    loop {
        let name = tokio::select! {
            accepted = listener.accept() => {
                if let Ok((mut sock, _)) = accepted {
                    let mut buf = [0u8; 1024];
                    let _ = sock.read(&mut buf).await;
                    let _ = sock.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
                }
                continue;
            }
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        exec(
            conn,
            &format!(
                "INSERT INTO app_signals (pid, signal) VALUES ({}, '{name}')",
                std::process::id()
            ),
        )
        .await?;
        let code = env("STANDIN_TERM_CODE")
            .and_then(|c| c.parse().ok())
            .unwrap_or(42);
        std::process::exit(code);
    }
}

fn stamp(path: &str) -> Res<()> {
    use std::io::Write;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos();
    let flag = env(&env("STANDIN_FLAG").unwrap_or_else(|| "ENABLE_DB_MIGRATIONS".into()))
        .unwrap_or_default();
    let line = format!("{} {nanos} {flag}\n", std::process::id());
    // One write with O_APPEND: lines from hundreds of processes never interleave.
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?
        .write_all(line.as_bytes())?;
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mode = std::env::args().nth(1).unwrap_or_default();
    if mode == "stamp" {
        let path = std::env::args().nth(2).unwrap_or_default();
        if let Err(e) = stamp(&path) {
            eprintln!("standin-app stamp {path}: {e}");
            std::process::exit(1);
        }
        return;
    }
    let result: Res<()> = async {
        let url = env("DATABASE_URL").ok_or("DATABASE_URL is not set")?;
        let mut conn = PgConnection::connect(&url).await?;
        match mode.as_str() {
            "setup" => setup(&mut conn).await,
            "migrate" => migrate(&mut conn).await,
            "start" => {
                if record_start(&mut conn).await? {
                    migrate(&mut conn).await?;
                }
                Ok(())
            }
            "blocking-gate" => {
                let stamp_file = std::env::args().nth(2).unwrap_or_default();
                let go = std::env::args().nth(3).unwrap_or_default();
                exec(&mut conn, "SELECT pg_advisory_lock(777)").await?;
                if scalar(
                    &mut conn,
                    "SELECT (to_regclass('bench_done') IS NULL)::text",
                )
                .await?
                    == "true"
                {
                    while !std::path::Path::new(&go).exists() {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    exec(
                        &mut conn,
                        "CREATE TABLE bench_done AS SELECT clock_timestamp() AS at",
                    )
                    .await?;
                }
                exec(&mut conn, "SELECT pg_advisory_unlock(777)").await?;
                stamp(&stamp_file)
            }
            "serve" => {
                if record_start(&mut conn).await? {
                    migrate(&mut conn).await?;
                }
                serve(&mut conn).await
            }
            other => {
                Err(format!("unknown mode {other:?}; use setup, migrate, start or serve").into())
            }
        }
    }
    .await;
    if let Err(e) = result {
        eprintln!("standin-app[{}]: {e}", std::process::id());
        std::process::exit(1);
    }
}
