//! Connecting to PostgreSQL: URL parsing, retrying a database that is not up yet, classifying
//! errors into "retry" and "give up", and running queries in a way poolers accept.
//!
//! Every query of the gate goes through [`query`], which uses the simple query protocol: no
//! prepared statement is ever created, so nothing can collide behind PgBouncer in transaction
//! mode (sqlx's `42P05 prepared statement "sqlx_s_1" already exists`). Values are therefore
//! inlined with [`lit`] and [`ident`], which quote them the way PostgreSQL's own `quote_literal`
//! and `quote_ident` do.

use std::str::FromStr;
use std::time::{Duration, Instant};

use backon::BackoffBuilder;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgRow};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, Row};
use tracing::{debug, warn};

use crate::error::{Error, Result};

/// Longest single connection attempt: a host that drops SYNs would otherwise hang for minutes.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// How to reach the database.
#[derive(Debug, Clone)]
pub struct Db {
    options: PgConnectOptions,
    connect_timeout: Duration,
    /// The URL with its password replaced, safe to print.
    pub redacted_url: String,
}

/// What to do about a failed database call.
#[derive(Debug)]
pub enum Failure {
    /// Transient (refused, restarting, too many connections, lost connection): retry.
    Retry(String),
    /// Retrying cannot help (bad password, missing database, bad TLS setup).
    Fatal(Error),
}

impl Db {
    /// Parses `url` and prepares connection options; a malformed URL is a usage error.
    pub fn new(url: &str, application_name: &str, connect_timeout: Duration) -> Result<Db> {
        let redacted_url = redact_url(url);
        match url::Url::parse(url) {
            Ok(u) if matches!(u.scheme(), "postgres" | "postgresql") => {}
            Ok(u) => {
                return Err(Error::Usage(format!(
                    "unsupported database URL scheme {:?} in {redacted_url}: use postgres:// or postgresql://",
                    u.scheme()
                )));
            }
            Err(e) => {
                return Err(Error::Usage(format!(
                    "malformed database URL {redacted_url}: {e}; expected postgres://USER:PASSWORD@HOST:PORT/DATABASE"
                )));
            }
        }
        check_tls_files(url)?;
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| {
                Error::Usage(format!(
                    "malformed database URL {redacted_url}: {}; expected postgres://USER:PASSWORD@HOST:PORT/DATABASE",
                    scrub(&e.to_string(), url)
                ))
            })?
            .application_name(application_name)
            // PgBouncer refuses unknown startup parameters; sqlx would send this one.
            .extra_float_digits(None)
            .statement_cache_capacity(0)
            .disable_statement_logging();
        Ok(Db {
            options,
            connect_timeout,
            redacted_url,
        })
    }

    /// The TCP port we dial (`None` for a Unix socket), to spot a pooler or proxy in between.
    pub fn dialled_port(&self) -> Option<u16> {
        match self.options.get_socket() {
            Some(_) => None,
            None => Some(self.options.get_port()),
        }
    }

    /// Connects, retrying transient failures with jittered exponential backoff until
    /// `--connect-timeout` has passed. Authentication and configuration errors fail at once.
    pub async fn connect(&self) -> Result<PgConnection> {
        let started = Instant::now();
        let mut delays = backoff(Duration::from_millis(50), Duration::from_secs(2));
        loop {
            let remaining = self.connect_timeout.saturating_sub(started.elapsed());
            match self.connect_once(remaining.min(ATTEMPT_TIMEOUT)).await {
                Ok(conn) => return Ok(conn),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Retry(reason)) => {
                    let remaining = self.connect_timeout.saturating_sub(started.elapsed());
                    if remaining.is_zero() {
                        return Err(Error::Unavailable(format!(
                            "database unavailable at {} after {}: {reason}; check that PostgreSQL is running and reachable, or raise --connect-timeout",
                            self.redacted_url,
                            humantime::format_duration(round(self.connect_timeout)),
                        )));
                    }
                    let delay = delays
                        .next()
                        .unwrap_or(Duration::from_secs(1))
                        .min(remaining);
                    debug!(reason, ?delay, "database not reachable yet; retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// One connection attempt, bounded by `limit`.
    pub async fn connect_once(&self, limit: Duration) -> Result<PgConnection, Failure> {
        let limit = limit.max(Duration::from_millis(100));
        match tokio::time::timeout(limit, self.options.connect()).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(self.classify(&e)),
            Err(_) => Err(Failure::Retry(format!(
                "no answer within {}",
                humantime::format_duration(round(limit))
            ))),
        }
    }

    /// Sorts an error into retry or give up, with a message that names the URL safely.
    pub fn classify(&self, e: &sqlx::Error) -> Failure {
        let at = &self.redacted_url;
        match e {
            sqlx::Error::Database(db) => {
                let code = db.code().map(|c| c.to_string()).unwrap_or_default();
                let msg = db.message().to_string();
                match code.as_str() {
                    "28P01" | "28000" => Failure::Fatal(Error::Auth(format!(
                        "authentication refused by {at}: {msg}; check the user name and password"
                    ))),
                    "42501" => Failure::Fatal(Error::Auth(format!(
                        "permission denied at {at}: {msg}; the gate's user needs CONNECT on the database and CREATE on it (or an existing ledger schema)"
                    ))),
                    "3D000" => Failure::Fatal(Error::Unavailable(format!(
                        "{msg} at {at}; create the database or fix the URL"
                    ))),
                    // Too many connections, server starting or shutting down, connection
                    // failures, crash recovery: all pass.
                    c if c.starts_with("53") || c.starts_with("57") || c.starts_with("08") => {
                        Failure::Retry(format!("{msg} (SQLSTATE {c})"))
                    }
                    c => Failure::Fatal(Error::Unavailable(format!(
                        "database error at {at}: {msg} (SQLSTATE {c})"
                    ))),
                }
            }
            // rustls reports a rejected certificate (and every other handshake failure) as an
            // io::Error of kind InvalidData wrapping a rustls::Error: retrying cannot fix it.
            sqlx::Error::Io(io) if is_tls_failure(io) => Failure::Fatal(Error::Unavailable(
                format!("TLS connection to {at} failed: {io}; check sslmode and sslrootcert"),
            )),
            sqlx::Error::Io(io) => Failure::Retry(io.to_string()),
            sqlx::Error::Tls(t) => Failure::Fatal(Error::Unavailable(format!(
                "TLS connection to {at} failed: {t}; check sslmode and sslrootcert"
            ))),
            sqlx::Error::Configuration(c) => Failure::Fatal(Error::Usage(format!(
                "bad database URL {at}: {}",
                scrub(&c.to_string(), "")
            ))),
            sqlx::Error::Protocol(p) => Failure::Retry(format!("protocol error: {p}")),
            other => Failure::Retry(other.to_string()),
        }
    }
}

/// Fails with a usage error naming the path when a TLS file named in the URL (or
/// `PGSSLROOTCERT`) cannot be read: sqlx would report a bare "No such file or directory", and
/// retrying cannot create the file.
fn check_tls_files(url: &str) -> Result<()> {
    let Ok(parsed) = url::Url::parse(url) else {
        return Ok(());
    };
    let mut files: Vec<(String, String)> = parsed
        .query_pairs()
        .filter(|(k, _)| matches!(k.as_ref(), "sslrootcert" | "sslcert" | "sslkey"))
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    if !files.iter().any(|(k, _)| k == "sslrootcert")
        && let Ok(path) = std::env::var("PGSSLROOTCERT")
    {
        files.push(("PGSSLROOTCERT".into(), path));
    }
    for (name, path) in files {
        if let Err(e) = std::fs::File::open(&path) {
            return Err(Error::Usage(format!(
                "cannot read {name} file {path:?}: {e}"
            )));
        }
    }
    Ok(())
}

/// Whether an I/O error is a TLS handshake failure (bad certificate, wrong host, no common
/// protocol) rather than a network problem.
fn is_tls_failure(io: &std::io::Error) -> bool {
    io.kind() == std::io::ErrorKind::InvalidData
        && io
            .get_ref()
            .is_some_and(|e| e.downcast_ref::<rustls::Error>().is_some())
}

/// Runs `sql` with the simple query protocol and returns its rows.
pub async fn query(conn: &mut PgConnection, sql: String) -> Result<Vec<PgRow>, sqlx::Error> {
    sqlx::raw_sql(AssertSqlSafe(sql)).fetch_all(conn).await
}

/// Runs `sql` and returns the first column of the first row as text (NULL and no row: `None`).
/// Any column type works: the simple query protocol sends every value as text.
pub async fn query_scalar(
    conn: &mut PgConnection,
    sql: String,
) -> Result<Option<String>, sqlx::Error> {
    let rows = query(conn, sql).await?;
    match rows.first() {
        Some(row) => row.try_get_unchecked::<Option<String>, _>(0),
        None => Ok(None),
    }
}

/// Closes a connection politely, so the server frees its session (and locks) at once.
pub async fn close(conn: PgConnection) {
    if let Err(e) = conn.close().await {
        debug!(error = %e, "closing the database connection failed");
    }
}

/// A SQL string literal: `E'...'` with `\` and `'` escaped, correct whatever
/// `standard_conforming_strings` says.
pub fn lit(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 3);
    out.push_str("E'");
    for ch in s.chars() {
        match ch {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            '\0' => {} // PostgreSQL text cannot hold NUL.
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// A SQL identifier, always double-quoted.
pub fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('\0', "").replace('"', "\"\""))
}

/// The URL with any password replaced by `***`, for messages and logs.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("***"));
            }
            let pairs: Vec<(String, String)> = parsed
                .query_pairs()
                .map(|(k, v)| {
                    let v = if k.eq_ignore_ascii_case("password") {
                        "***".to_string()
                    } else {
                        v.into_owned()
                    };
                    (k.into_owned(), v)
                })
                .collect();
            if pairs
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("password"))
            {
                parsed.query_pairs_mut().clear().extend_pairs(pairs);
            }
            parsed.to_string()
        }
        // Unparseable: we cannot tell where a password would be, so show nothing of it.
        Err(_) => "(unparseable URL, not shown)".to_string(),
    }
}

/// Removes `secret` (the raw URL, which may hold a password) from a message built by a library.
fn scrub(message: &str, secret: &str) -> String {
    if secret.is_empty() {
        message.to_string()
    } else {
        message.replace(secret, "(URL not shown)")
    }
}

/// Jittered exponential backoff delays, forever: the first near `min`, each later one up to
/// twice the one before, never more than `max`. backon's jitter adds up to 100% to each delay,
/// so the base delays are halved to keep the jittered ones under `max`.
pub fn backoff(min: Duration, max: Duration) -> impl Iterator<Item = Duration> {
    backon::ExponentialBuilder::default()
        .with_min_delay(min / 2)
        .with_max_delay(max / 2)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

/// Rounds to whole milliseconds so durations print as `60s`, not `60s 3us 12ns`.
pub fn round(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

/// Logs a transient failure in one place so every retry loop reports the same way.
pub fn log_retry(context: &str, reason: &str) {
    warn!(reason, "{context}; retrying");
}
