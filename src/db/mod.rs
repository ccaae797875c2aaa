//! Connecting to PostgreSQL: retrying a database that is not up yet, and client-side keepalives.
//! The connection string's forms and parameters are read in [`conninfo`] (and `pg_service.conf`
//! in [`service`]); a host list is tried in [`hosts`]; errors are sorted into "retry" and "give
//! up" in [`failure`]; URLs are made safe to print in [`redact`]; what the gate knows of its own
//! end of a connection (its sockets) in [`own_end`]. Queries themselves go through
//! [`crate::sql`].

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use backon::BackoffBuilder;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPoolOptions};
use sqlx::{Acquire, ConnectOptions, Connection};
use tracing::{debug, warn};

use crate::duration::short;
use crate::error::{Error, Result};
use crate::sql::{ROUND_TRIP_TIMEOUT, deadline};

mod conninfo;
mod failure;
mod hosts;
mod own_end;
mod redact;
mod service;

pub(crate) use conninfo::{ConnUrl, SessionAttrs};
use failure::check_tls_files;
pub(crate) use own_end::parent_pid;
use own_end::*;
pub(crate) use redact::redact_url;
use redact::scrub;

/// Longest single connection attempt: a host that drops SYNs would otherwise hang for minutes.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// Client-side TCP settings of every connection: a peer that vanished without a reset is
/// noticed within about 30 s even by a socket that waits for nothing.
const KEEPALIVE_IDLE_S: libc::c_int = 10;
const KEEPALIVE_INTERVAL_S: libc::c_int = 5;
const KEEPALIVE_COUNT: libc::c_int = 3;
const USER_TIMEOUT_MS: libc::c_int = 30_000;

/// The oldest PostgreSQL the gate supports (`server_version_num` format): 13. The README's
/// supported range is 13 to 18; newer majors are not refused.
const OLDEST_SERVER: u32 = 13_00_00;

/// How to reach the database.
#[derive(Debug, Clone)]
pub(crate) struct Db {
    /// The host list, in the order given (one host for most URLs).
    hosts: Vec<Host>,
    /// `target_session_attrs` of the URL.
    attrs: SessionAttrs,
    /// `load_balance_hosts=random`.
    load_balance: bool,
    /// A replica that may migrate: it needs the read-write host of a list ([`Db::for_holder`]).
    for_holder: bool,
    connect_timeout: Duration,
    /// The URL's `connect_timeout`: the longest single attempt, when it sets one.
    attempt_cap: Option<Duration>,
    /// The URL with its password replaced, safe to print.
    pub(crate) redacted_url: String,
    /// The host the last connection reached (an index into `hosts`), and why that one
    /// ([`Db::reached`]); later connections of the same replica (a listening waiter's, the
    /// route proof's socket path) go to the same host.
    reached: std::sync::Arc<std::sync::Mutex<Option<(usize, Reached)>>>,
    /// Whether "no host of the list suits" was said (once per process).
    said_no_host: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// One host of the list.
#[derive(Debug, Clone)]
struct Host {
    options: PgConnectOptions,
    /// `host:port` as given, for messages.
    shown: String,
}

/// The host a connection reached, and why that one: the first that answered, or the first
/// read-write one of a multi-host list (libpq's order, `target_session_attrs`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub(crate) struct Reached {
    /// `host:port`, or the Unix socket's path.
    pub(crate) host: String,
    /// Why this host: "the only host", "the first of 2 hosts that is read-write (db1:5432: a standby)".
    pub(crate) why: String,
}

/// What to do about a failed database call.
#[derive(Debug)]
pub(crate) enum Failure {
    /// Transient (refused, restarting, too many connections, lost connection): retry.
    Retry(String),
    /// Retrying cannot help (bad password, missing database, bad TLS setup).
    Fatal(Error),
}

/// The gate's own end of its database connections, as its kernel sees it: one half of the proof
/// that a route is direct (the server's view is the other, [`crate::route::ServerSide`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum OwnEnd {
    /// Over TCP: the local address and port of each of the gate's TCP sockets (`getsockname`).
    Tcp(Vec<SocketAddr>),
    /// Over a Unix socket: its path, and the PID of the process that listens on it
    /// (`SO_PEERCRED`; `None` when that process is not visible in our PID namespace).
    Unix {
        path: PathBuf,
        listener: Option<i32>,
    },
}

/// One connection of the gate's: a plain session, or one that `LISTEN`s. sqlx delivers
/// notifications only to a `PgListener`, which needs a pool; only a waiter that keeps its
/// connection on a direct route listens ([`Db::connect_listening`]), so every other connection
/// (the fast path, polls, the holder) stays a plain one, with sqlx's own errors classified as they
/// happen.
pub(crate) enum Conn {
    Plain(PgConnection),
    Listening(Box<PgListener>),
}

impl Conn {
    /// The session, for queries.
    pub(crate) async fn pg(&mut self) -> Result<&mut PgConnection, sqlx::Error> {
        match self {
            Conn::Plain(c) => Ok(c),
            // `acquire` would reconnect only after `notified` saw the connection lost, and then
            // the waiting loop drops this `Conn` instead.
            Conn::Listening(l) => l.acquire().await,
        }
    }

    /// Whether this connection hears notifications.
    pub(crate) fn listens(&self) -> bool {
        matches!(self, Conn::Listening(_))
    }

    /// Waits up to `limit` for a notification. `Ok(true)`: one arrived; `Ok(false)`: none in
    /// time (a plain connection just waits); an error: the connection is lost.
    pub(crate) async fn notified(&mut self, limit: Duration) -> Result<bool, sqlx::Error> {
        let Conn::Listening(l) = self else {
            tokio::time::sleep(limit).await;
            return Ok(false);
        };
        match tokio::time::timeout(limit, l.try_recv()).await {
            Ok(Ok(Some(_))) => {
                // One wake-up is enough however many arrived.
                while l.next_buffered().is_some() {}
                Ok(true)
            }
            Ok(Ok(None)) => Err(sqlx::Error::Io(std::io::ErrorKind::ConnectionReset.into())),
            Ok(Err(e)) => Err(e),
            Err(_) => Ok(false),
        }
    }
}

impl Db {
    /// Parses `url` ([`ConnUrl::parse`]) and prepares connection options; a malformed URL or a
    /// setting the gate cannot honour is a usage error.
    pub(crate) fn new(url: &str, application_name: &str, connect_timeout: Duration) -> Result<Db> {
        let redacted_url = redact_url(url);
        let parsed = ConnUrl::parse(url)?;
        let hosts = parsed
            .hosts
            .iter()
            .map(|host| {
                check_tls_files(&host.url)?;
                let options = PgConnectOptions::from_str(&host.url)
                    .map_err(|e| {
                        Error::Usage(format!(
                            "malformed database URL {redacted_url}: {}; expected postgresql://USER:PASSWORD@HOST:PORT/DATABASE",
                            scrub(&scrub(&e.to_string(), url), &host.url)
                        ))
                    })?
                    .application_name(application_name)
                    // PgBouncer refuses unknown startup parameters; sqlx would send this one.
                    .extra_float_digits(None)
                    .statement_cache_capacity(0)
                    .disable_statement_logging();
                Ok(Host {
                    options,
                    shown: host.shown.clone(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Db {
            hosts,
            attrs: parsed.attrs,
            load_balance: parsed.load_balance,
            for_holder: false,
            connect_timeout,
            attempt_cap: parsed.attempt_cap,
            redacted_url,
            reached: Default::default(),
            said_no_host: Default::default(),
        })
    }

    /// The same database, for a replica that may take the lock: on a host list it connects to
    /// a read-write host whatever `target_session_attrs` says.
    pub(crate) fn for_holder(mut self) -> Db {
        self.for_holder = true;
        self
    }

    /// The options of the host the last connection reached (the first host before any).
    fn options(&self) -> &PgConnectOptions {
        let i = self
            .reached
            .lock()
            .ok()
            .and_then(|r| r.as_ref().map(|(i, _)| *i))
            .unwrap_or(0);
        &self.hosts[i.min(self.hosts.len() - 1)].options
    }

    /// Records that host `i` was reached, and why.
    fn remember(&self, i: usize, why: String) {
        let reached = Reached {
            host: self.shown_host(&self.hosts[i].options),
            why,
        };
        if self.hosts.len() > 1 {
            debug!(host = reached.host, why = reached.why, "connected");
        }
        if let Ok(mut r) = self.reached.lock() {
            *r = Some((i, reached));
        }
    }

    /// The Unix socket we dial (`{dir}/.s.PGSQL.{port}`, as sqlx and libpq build it), or `None`
    /// for TCP.
    fn unix_socket(options: &PgConnectOptions) -> Option<PathBuf> {
        let dir = match options.get_socket() {
            Some(dir) => dir.clone(),
            None if options.get_host().starts_with('/') => PathBuf::from(options.get_host()),
            None => return None,
        };
        Some(dir.join(format!(".s.PGSQL.{}", options.get_port())))
    }

    /// The host we dial, for messages: `host:port`, or the Unix socket's path.
    fn shown_host(&self, options: &PgConnectOptions) -> String {
        match Db::unix_socket(options) {
            Some(path) => path.display().to_string(),
            None if options.get_host().contains(':') => {
                format!("[{}]:{}", options.get_host(), options.get_port())
            }
            None => format!("{}:{}", options.get_host(), options.get_port()),
        }
    }

    /// The gate's own end of its connections, as the kernel sees it, for the route proof
    /// ([`crate::route::judge_route`]): read after a connection is made, before it is used
    /// by anything else.
    pub(crate) fn own_end(&self) -> OwnEnd {
        match Db::unix_socket(self.options()) {
            None => OwnEnd::Tcp(own_tcp_addresses()),
            Some(path) => OwnEnd::Unix {
                listener: unix_listener_pid(&path),
                path,
            },
        }
    }

    /// Connects, retrying transient failures with jittered exponential backoff until
    /// `--connect-timeout` has passed. Authentication and configuration errors fail at once.
    pub(crate) async fn connect(&self) -> Result<Conn> {
        let started = Instant::now();
        let mut delays = backoff(Duration::from_millis(50), Duration::from_secs(2));
        loop {
            let remaining = self.connect_timeout.saturating_sub(started.elapsed());
            match self.connect_once(remaining).await {
                Ok(conn) => return Ok(conn),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Retry(reason)) => {
                    let remaining = self.connect_timeout.saturating_sub(started.elapsed());
                    if remaining.is_zero() {
                        return Err(self.gave_up(&reason));
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

    /// The host the last successful connection reached, and why ([`Reached`]); `None` before
    /// the first.
    pub(crate) fn reached(&self) -> Option<Reached> {
        self.reached
            .lock()
            .ok()
            .and_then(|r| r.as_ref().map(|(_, r)| r.clone()))
    }

    /// The user name we log in as.
    pub(crate) fn username(&self) -> &str {
        self.options().get_username()
    }

    /// The longest single attempt: at most a third of `--connect-timeout`, so that an attempt
    /// that hangs (a dropped SYN, a stalled server) leaves room for more.
    /// The URL's `connect_timeout`, when it has one, sets it instead (as in libpq).
    pub(crate) fn connect_try_timeout(&self) -> Duration {
        self.attempt_cap.unwrap_or_else(|| {
            (self.connect_timeout / 3).clamp(Duration::from_secs(1), ATTEMPT_TIMEOUT)
        })
    }

    /// One connection attempt to host `i`, bounded by `limit` and [`Db::connect_try_timeout`].
    async fn connect_host(&self, i: usize, limit: Duration) -> Result<Conn, Failure> {
        let limit = limit.clamp(Duration::from_millis(100), self.connect_try_timeout());
        match tokio::time::timeout(limit, self.hosts[i].options.connect()).await {
            Ok(Ok(conn)) => {
                set_client_keepalives();
                self.check_server_version(&conn)?;
                Ok(Conn::Plain(conn))
            }
            Ok(Err(e)) => Err(self.classify(&e)),
            Err(_) => Err(Failure::Retry(format!("no answer within {}", short(limit)))),
        }
    }

    /// Refuses a server older than [`OLDEST_SERVER`], before any query: the version comes from
    /// the `server_version` the server announced at startup (no round trip).
    fn check_server_version(&self, conn: &PgConnection) -> Result<(), Failure> {
        match conn.server_version_num() {
            Some(v) if v < OLDEST_SERVER => {
                // 120022 is 12.22; before 10 the middle digits were part of the major: 90624 is 9.6.24.
                let version = match v {
                    100_000.. => format!("{}.{}", v / 10_000, v % 10_000),
                    _ => format!("{}.{}.{}", v / 10_000, v / 100 % 100, v % 100),
                };
                Err(Failure::Fatal(Error::Config(format!(
                    "PostgreSQL {version} at {} is not supported: the gate supports PostgreSQL 13 to 18; upgrade the server",
                    self.redacted_url
                ))))
            }
            _ => Ok(()),
        }
    }

    /// A connection that `LISTEN`s on `channel`, for a waiter that keeps its connection. The
    /// one-connection pool behind it retries a refused connection and "too many connections" by
    /// itself until the attempt limit; the caller has a plain connection already and simply
    /// keeps polling on it when this fails.
    pub(crate) async fn connect_listening(&self, channel: &str) -> Result<Conn, sqlx::Error> {
        let limit = self.connect_try_timeout();
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .min_connections(0)
            .max_lifetime(None)
            .idle_timeout(None)
            .test_before_acquire(false)
            .acquire_timeout(limit)
            .connect_lazy_with(self.options().clone());
        let mut listener = deadline(limit, PgListener::connect_with(&pool)).await?;
        listener.eager_reconnect(false);
        listener.ignore_pool_close_event(true);
        set_client_keepalives();
        deadline(ROUND_TRIP_TIMEOUT, listener.listen(channel)).await?;
        Ok(Conn::Listening(Box::new(listener)))
    }
}

/// Closes a connection: the server frees its session (and session locks) at once. Bounded: a
/// connection on a dead socket is simply dropped.
pub(crate) async fn close(conn: Conn) {
    match conn {
        Conn::Plain(c) => {
            if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(1), c.close()).await {
                debug!(error = %e, "closing the database connection failed");
            }
        }
        Conn::Listening(l) => {
            drop(l);
            // The listener hands its connection back to its one-connection pool on a task;
            // yielding lets that run, and dropping the pool then closes the socket.
            tokio::task::yield_now().await;
        }
    }
}

/// Jittered exponential backoff delays, forever: the first near `min`, each later one up to
/// twice the one before, never more than `max`. backon's jitter adds up to 100% to each delay,
/// so the base delays are halved to keep the jittered ones under `max`.
pub(crate) fn backoff(min: Duration, max: Duration) -> impl Iterator<Item = Duration> {
    backon::ExponentialBuilder::default()
        .with_min_delay(min / 2)
        .with_max_delay(max / 2)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

/// Logs a transient failure in one place so every retry loop reports the same way.
pub(crate) fn log_retry(context: &str, reason: &str) {
    warn!(reason, "{context}; retrying");
}
