//! Readiness probes: how the holder of a `run --ready-*` gate knows the app it started has
//! finished migrating (and seeding) and the lock can be passed on.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::db::{Conn, Db};
use crate::error::{Error, Result};
use crate::sql::query_scalar;

/// Longest single probe; a hung app counts as not ready yet.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Which readiness probe the command line asked for (`--ready-http`, `--ready-tcp`,
/// `--ready-sql`: at most one).
#[derive(Debug, Clone, Default)]
pub(crate) struct Requested {
    /// `--ready-http URL`.
    pub(crate) http: Option<String>,
    /// `--ready-tcp HOST:PORT`.
    pub(crate) tcp: Option<String>,
    /// `--ready-sql SQL`.
    pub(crate) sql: Option<String>,
}

/// One readiness check.
#[derive(Debug, Clone)]
pub(crate) enum Probe {
    /// `GET path` on `host:port` answers 2xx.
    Http {
        /// Address to connect to.
        addr: String,
        /// `Host` header.
        host: String,
        /// Path and query.
        path: String,
    },
    /// `addr` accepts a TCP connection.
    Tcp(String),
    /// The SQL returns a row whose first column is not false or NULL.
    Sql(String),
}

impl Probe {
    /// The probe configured by `--ready-http`, `--ready-tcp` or `--ready-sql`, if any.
    pub(crate) fn from_settings(args: &Requested) -> Result<Option<Probe>> {
        if let Some(raw) = &args.http {
            let url = url::Url::parse(raw)
                .map_err(|e| Error::Usage(format!("--ready-http {raw:?} is not a URL: {e}")))?;
            if url.scheme() != "http" {
                return Err(Error::Usage(format!(
                    "--ready-http {raw:?}: only http:// is supported (probe the app on loopback)"
                )));
            }
            let host = url
                .host_str()
                .ok_or_else(|| Error::Usage(format!("--ready-http {raw:?} has no host")))?;
            let port = url.port_or_known_default().unwrap_or(80);
            let mut path = url.path().to_string();
            if let Some(q) = url.query() {
                path.push('?');
                path.push_str(q);
            }
            return Ok(Some(Probe::Http {
                addr: format!("{host}:{port}"),
                host: host.to_string(),
                path,
            }));
        }
        if let Some(addr) = &args.tcp {
            // The port: after the last colon (an IPv6 host is bracketed), 1 to 65535.
            let port = addr
                .rsplit_once(':')
                .filter(|(host, _)| !host.is_empty())
                .and_then(|(_, p)| p.parse::<u16>().ok())
                .filter(|p| *p != 0);
            if port.is_none() {
                return Err(Error::Usage(format!(
                    "--ready-tcp {addr:?} must be HOST:PORT with a port from 1 to 65535, e.g. 127.0.0.1:8080"
                )));
            }
            return Ok(Some(Probe::Tcp(addr.clone())));
        }
        if let Some(sql) = &args.sql {
            if sql.trim().is_empty() {
                return Err(Error::Usage("--ready-sql is empty".into()));
            }
            return Ok(Some(Probe::Sql(sql.clone())));
        }
        Ok(None)
    }

    /// Checks once. `sql_conn` is the probe's own connection, opened on first use.
    pub(crate) async fn check(&self, db: &Db, sql_conn: &mut Option<Conn>) -> bool {
        let check = async {
            match self {
                Probe::Http { addr, host, path } => http_ok(addr, host, path).await,
                Probe::Tcp(addr) => TcpStream::connect(addr.as_str()).await.is_ok(),
                Probe::Sql(sql) => sql_ok(db, sql_conn, sql).await,
            }
        };
        tokio::time::timeout(PROBE_TIMEOUT, check)
            .await
            .unwrap_or(false)
    }

    /// What is probed, for logs.
    pub(crate) fn describe(&self) -> String {
        match self {
            Probe::Http { addr, path, .. } => format!("http://{addr}{path}"),
            Probe::Tcp(addr) => format!("tcp {addr}"),
            Probe::Sql(_) => "the --ready-sql query".to_string(),
        }
    }
}

async fn http_ok(addr: &str, host: &str, path: &str) -> bool {
    let Ok(mut stream) = TcpStream::connect(addr).await else {
        return false;
    };
    let request = format!(
        "GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: migrations-gate\r\nConnection: close\r\n\r\n"
    );
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    // The status line is all we need: "HTTP/1.x 200 ...".
    let mut head = [0u8; 16];
    let mut filled = 0;
    while filled < head.len() {
        match stream.read(&mut head[filled..]).await {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(_) => return false,
        }
    }
    let line = String::from_utf8_lossy(&head[..filled]);
    let code = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok());
    matches!(code, Some(200..=299))
}

async fn sql_ok(db: &Db, conn: &mut Option<Conn>, sql: &str) -> bool {
    if conn.is_none() {
        *conn = db.connect_once(PROBE_TIMEOUT).await.ok();
    }
    let Some(c) = conn.as_mut() else {
        return false;
    };
    let answer = match c.pg().await {
        Ok(pg) => query_scalar(pg, sql.to_string()).await,
        Err(e) => Err(e),
    };
    match answer {
        Ok(Some(v)) => !matches!(v.as_str(), "f" | "false"),
        Ok(None) => false,
        Err(e) => {
            // A missing table is "not ready yet"; a broken connection is reopened next time.
            if !matches!(e, sqlx::Error::Database(_)) {
                *conn = None;
            }
            false
        }
    }
}
