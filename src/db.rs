//! Connecting to PostgreSQL: URL parsing, retrying a database that is not up yet, classifying
//! errors into "retry" and "give up", client-side keepalives, and URLs safe to print. Queries
//! themselves go through [`crate::sql`].

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
    options: PgConnectOptions,
    connect_timeout: Duration,
    /// The URL's `connect_timeout`: the longest single attempt, when it sets one.
    attempt_cap: Option<Duration>,
    /// The URL with its password replaced, safe to print.
    pub(crate) redacted_url: String,
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
/// that a route is direct (the server's view is the other, [`crate::lock::ServerSide`]).
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
        check_tls_files(&parsed.url)?;
        let options = PgConnectOptions::from_str(&parsed.url)
            .map_err(|e| {
                Error::Usage(format!(
                    "malformed database URL {redacted_url}: {}; expected postgresql://USER:PASSWORD@HOST:PORT/DATABASE",
                    scrub(&scrub(&e.to_string(), url), &parsed.url)
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
            attempt_cap: parsed.attempt_cap,
            redacted_url,
        })
    }

    /// The Unix socket we dial (`{dir}/.s.PGSQL.{port}`, as sqlx and libpq build it), or `None`
    /// for TCP.
    fn unix_socket(&self) -> Option<PathBuf> {
        let dir = match self.options.get_socket() {
            Some(dir) => dir.clone(),
            None if self.options.get_host().starts_with('/') => {
                PathBuf::from(self.options.get_host())
            }
            None => return None,
        };
        Some(dir.join(format!(".s.PGSQL.{}", self.options.get_port())))
    }

    /// The gate's own end of its connections, as the kernel sees it, for the route proof
    /// ([`crate::lock::judge_route`]): read after a connection is made, before it is used
    /// by anything else.
    pub(crate) fn own_end(&self) -> OwnEnd {
        match self.unix_socket() {
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

    /// The error after `--connect-timeout` of transient failures, the last one being `reason`.
    pub(crate) fn gave_up(&self, reason: &str) -> Error {
        Error::Unavailable(format!(
            "database unavailable at {} after {}: {reason}; check that PostgreSQL is running and reachable, or raise --connect-timeout",
            self.redacted_url,
            short(self.connect_timeout),
        ))
    }

    /// The user name we log in as.
    pub(crate) fn username(&self) -> &str {
        self.options.get_username()
    }

    /// The longest single attempt: at most a third of `--connect-timeout`, so that an attempt
    /// that hangs (a dropped SYN, a stalled server) leaves room for more.
    /// The URL's `connect_timeout`, when it has one, sets it instead (as in libpq).
    pub(crate) fn attempt_limit(&self) -> Duration {
        self.attempt_cap.unwrap_or_else(|| {
            (self.connect_timeout / 3).clamp(Duration::from_secs(1), ATTEMPT_TIMEOUT)
        })
    }

    /// One connection attempt, bounded by `limit` (and by [`Db::attempt_limit`]).
    pub(crate) async fn connect_once(&self, limit: Duration) -> Result<Conn, Failure> {
        let limit = limit.clamp(Duration::from_millis(100), self.attempt_limit());
        match tokio::time::timeout(limit, self.options.connect()).await {
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
        let limit = self.attempt_limit();
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .min_connections(0)
            .max_lifetime(None)
            .idle_timeout(None)
            .test_before_acquire(false)
            .acquire_timeout(limit)
            .connect_lazy_with(self.options.clone());
        let mut listener = deadline(limit, PgListener::connect_with(&pool)).await?;
        listener.eager_reconnect(false);
        listener.ignore_pool_close_event(true);
        set_client_keepalives();
        deadline(ROUND_TRIP_TIMEOUT, listener.listen(channel)).await?;
        Ok(Conn::Listening(Box::new(listener)))
    }

    /// Sorts an error into retry or give up, with a message that names the URL safely.
    pub(crate) fn classify(&self, e: &sqlx::Error) -> Failure {
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
                        "permission denied at {at}: {msg}; see \"Privileges\" in the README for the grants the gate's role needs"
                    ))),
                    "3D000" => Failure::Fatal(Error::Unavailable(format!(
                        "{msg} at {at}; create the database or fix the URL"
                    ))),
                    "25006" => Failure::Fatal(Error::Unavailable(format!(
                        "the server at {at} is read-only ({msg}): a hot standby, or default_transaction_read_only is on; point the gate at the primary"
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
            sqlx::Error::Configuration(c) => {
                Failure::Fatal(Error::Usage(format!("bad database URL {at}: {c}")))
            }
            sqlx::Error::Protocol(p) => Failure::Retry(format!("protocol error: {p}")),
            other => Failure::Retry(other.to_string()),
        }
    }

    /// The error for a database call that failed after retries were no longer an option.
    pub(crate) fn fail(&self, e: &sqlx::Error, doing: &str) -> Error {
        match self.classify(e) {
            Failure::Fatal(err) => err,
            Failure::Retry(reason) => Error::Unavailable(format!(
                "lost the database connection {doing} at {}: {reason}",
                self.redacted_url
            )),
        }
    }
}

/// Sets client-side keepalives and `TCP_USER_TIMEOUT` on the gate's TCP sockets: all of them
/// are the gate's own database connections or short-lived probes, for which the settings are
/// right too.
fn set_client_keepalives() {
    let set = |fd: libc::c_int, level: libc::c_int, name: libc::c_int, value: libc::c_int| {
        // SAFETY: setsockopt with a pointer to a live c_int and its size.
        unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    };
    for (fd, domain) in own_stream_sockets() {
        if !matches!(domain, libc::AF_INET | libc::AF_INET6) {
            continue;
        }
        set(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
        set(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, KEEPALIVE_IDLE_S);
        set(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_KEEPINTVL,
            KEEPALIVE_INTERVAL_S,
        );
        set(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, KEEPALIVE_COUNT);
        set(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            USER_TIMEOUT_MS,
        );
    }
}

/// The process's stream sockets, as (descriptor, address family). sqlx opens its sockets itself
/// and does not expose them, so this walks the process's few descriptors (allocated lowest
/// first), stopping after a run of descriptors that are not sockets.
fn own_stream_sockets() -> Vec<(libc::c_int, libc::c_int)> {
    let get = |fd: libc::c_int, name: libc::c_int| -> Option<libc::c_int> {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt with a pointer to a live c_int and its size.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                name,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        (rc == 0).then_some(value)
    };
    let mut found = Vec::new();
    let mut misses = 0;
    for fd in 3..1024 {
        let Some(kind) = get(fd, libc::SO_TYPE) else {
            misses += 1;
            if misses > 32 {
                break;
            }
            continue;
        };
        misses = 0;
        if kind != libc::SOCK_STREAM {
            continue;
        }
        if let Some(domain) = get(fd, libc::SO_DOMAIN) {
            found.push((fd, domain));
        }
    }
    found
}

/// The local address and port of each of the gate's TCP sockets (`getsockname`), IPv4-mapped
/// IPv6 addresses written as IPv4 (as PostgreSQL shows them).
fn own_tcp_addresses() -> Vec<SocketAddr> {
    own_stream_sockets()
        .into_iter()
        .filter(|(_, domain)| matches!(*domain, libc::AF_INET | libc::AF_INET6))
        .filter_map(|(fd, _)| {
            // SAFETY: sockaddr_storage is plain data; all zeroes is a valid value.
            let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            // SAFETY: getsockname writes at most `len` bytes into the live `addr`.
            let rc = unsafe {
                libc::getsockname(
                    fd,
                    (&mut addr as *mut libc::sockaddr_storage).cast(),
                    &mut len,
                )
            };
            (rc == 0).then(|| socket_addr(&addr)).flatten()
        })
        .collect()
}

/// A `sockaddr_storage` filled in for AF_INET or AF_INET6, as a [`SocketAddr`].
fn socket_addr(addr: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match addr.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the kernel wrote a sockaddr_in (ss_family says so); storage is larger.
            let v4 =
                unsafe { &*(addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = std::net::Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr));
            Some(SocketAddr::new(IpAddr::V4(ip), u16::from_be(v4.sin_port)))
        }
        libc::AF_INET6 => {
            // SAFETY: the kernel wrote a sockaddr_in6 (ss_family says so); storage is larger.
            let v6 =
                unsafe { &*(addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = std::net::Ipv6Addr::from(v6.sin6_addr.s6_addr);
            Some(SocketAddr::new(
                ip.to_canonical(),
                u16::from_be(v6.sin6_port),
            ))
        }
        _ => None,
    }
}

/// The PID of the process listening on the Unix socket at `path`, from the gate's own
/// connection to it (`SO_PEERCRED` gives the listener's credentials); `None` when no connection
/// of ours goes there or the listener is not visible in our PID namespace.
fn unix_listener_pid(path: &Path) -> Option<i32> {
    let wanted = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
    own_stream_sockets()
        .into_iter()
        .filter(|(_, domain)| *domain == libc::AF_UNIX)
        .find_map(|(fd, _)| {
            // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
            let mut peer: libc::sockaddr_un = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
            // SAFETY: getpeername writes at most `len` bytes into the live `peer`.
            let rc = unsafe {
                libc::getpeername(fd, (&mut peer as *mut libc::sockaddr_un).cast(), &mut len)
            };
            if rc != 0 {
                return None;
            }
            let name: Vec<u8> = peer
                .sun_path
                .iter()
                .take_while(|&&c| c != 0)
                .map(|&c| c as u8)
                .collect();
            if name != wanted {
                return None;
            }
            // SAFETY: ucred is plain data; all zeroes is a valid value.
            let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
            // SAFETY: getsockopt(SO_PEERCRED) writes at most `len` bytes into the live `cred`.
            let rc = unsafe {
                libc::getsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_PEERCRED,
                    (&mut cred as *mut libc::ucred).cast(),
                    &mut len,
                )
            };
            (rc == 0 && cred.pid > 0).then_some(cred.pid)
        })
}

/// The parent of process `pid` in our PID namespace (`/proc/PID/stat`), if it is visible.
pub(crate) fn parent_pid(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "PID (comm) STATE PPID ...": comm may hold spaces and parentheses; it ends at the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// A database URL in one of the forms the gate accepts, rewritten for sqlx, with the settings the
/// gate honours itself taken out. Accepted: `postgresql://` and `postgres://`, and SQLAlchemy's
/// `postgresql+DRIVER://` (the driver is dropped). Every query parameter is either honoured or
/// refused with a usage error that names it and says what to write instead (sqlx would ignore
/// an unknown one with a warning that prints its value, which may be a secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConnUrl {
    /// The URL for sqlx: `postgresql://`, only the parameters sqlx honours as libpq does.
    url: String,
    /// `connect_timeout=N`: the longest single connection attempt (libpq: at least 2 s; 0 or
    /// less: no limit of its own, so the gate's applies).
    pub(crate) attempt_cap: Option<Duration>,
    /// `application_name=`.
    pub(crate) application_name: Option<String>,
}

/// The values of `sslmode`, as libpq spells them.
const SSL_MODES: [&str; 6] = [
    "disable",
    "allow",
    "prefer",
    "require",
    "verify-ca",
    "verify-full",
];

impl ConnUrl {
    /// Parses `raw`: a URL, libpq's key/value form (`host=db port=5432 dbname=app user=u`), or
    /// nothing (the empty string: the libpq environment alone, `PGHOST`, `PGPORT`, ...). The
    /// errors name the setting and never show the password.
    pub(crate) fn parse(raw: &str) -> Result<ConnUrl> {
        let shown = redact_url(raw);
        if !raw.contains("://") && (raw.trim().is_empty() || raw.contains('=')) {
            let pairs = key_values(raw).map_err(|e| {
                Error::Usage(format!(
                    "malformed key/value connection string {shown}: {e}; expected host=HOST port=PORT dbname=DATABASE user=USER"
                ))
            })?;
            // No `//`: no host of the URL's own, so sqlx starts from PGHOST and its defaults,
            // as libpq does; every setting is a parameter.
            let url = url::Url::parse("postgresql:").map_err(|e| Error::Internal(e.to_string()))?;
            return ConnUrl::with_params(url, Vec::new(), pairs, &shown);
        }
        let expected = "expected postgresql://USER:PASSWORD@HOST:PORT/DATABASE";
        let Some((scheme, rest)) = raw.split_once("://") else {
            return Err(Error::Usage(format!(
                "malformed database URL {shown}: no scheme; {expected}"
            )));
        };
        let scheme = scheme.to_ascii_lowercase();
        let driver_ok =
            |d: &str| !d.is_empty() && d.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        match scheme.split_once('+') {
            None if matches!(scheme.as_str(), "postgres" | "postgresql") => {}
            Some(("postgresql", driver)) if driver_ok(driver) => {}
            _ => {
                return Err(Error::Usage(format!(
                    "unsupported database URL scheme {scheme:?} in {shown}: the gate needs PostgreSQL; write postgresql:// (postgres:// and SQLAlchemy's postgresql+DRIVER:// are accepted too)"
                )));
            }
        }
        let authority = rest.split(['/', '?']).next().unwrap_or_default();
        let hosts = authority.rsplit('@').next().unwrap_or_default();
        if hosts.contains(',') {
            return Err(Error::Usage(format!(
                "database URL {shown} lists several hosts: multi-host URLs are not supported yet; give one host (the primary, or a proxy that follows it)"
            )));
        }
        // `user:password@/db?host=/run/postgresql` (an empty host: libpq's default, or the
        // `host=` parameter) is valid for libpq and SQLAlchemy but not for the url crate: the
        // user and password move to parameters.
        let (rest, userinfo) = match authority.rsplit_once('@') {
            Some((userinfo, "")) => (&rest[authority.len()..], Some(userinfo)),
            _ => (rest, None),
        };
        let url = url::Url::parse(&format!("postgresql://{rest}")).map_err(|e| {
            Error::Usage(format!("malformed database URL {shown}: {e}; {expected}"))
        })?;
        let mut kept: Vec<(String, String)> = Vec::new();
        if let Some(userinfo) = userinfo {
            let decode = |s: &str| {
                url::form_urlencoded::parse(format!("v={}", s.replace('+', "%2B")).as_bytes())
                    .map(|(_, v)| v.into_owned())
                    .next()
                    .unwrap_or_default()
            };
            let (user, password) = match userinfo.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (userinfo, None),
            };
            if !user.is_empty() {
                kept.push(("user".into(), decode(user)));
            }
            if let Some(p) = password {
                kept.push(("password".into(), decode(p)));
            }
        }
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        ConnUrl::with_params(url, kept, pairs, &shown)
    }

    /// Checks the settings `pairs` (the URL's query, or a key/value string) and puts those
    /// sqlx honours as libpq does into `url`'s query, after `kept`. libpq's environment fills in
    /// what `pairs` leaves unset: sqlx reads `PGHOST`, `PGHOSTADDR`, `PGPORT`, `PGDATABASE`,
    /// `PGUSER`, `PGPASSWORD`, `PGPASSFILE` and the `PGSSL*` files and mode itself; the others
    /// are read here.
    fn with_params(
        mut url: url::Url,
        mut kept: Vec<(String, String)>,
        pairs: Vec<(String, String)>,
        shown: &str,
    ) -> Result<ConnUrl> {
        let mut sslmode: Option<(String, String)> = None;
        let mut attempt_cap = None;
        let mut application_name = None;
        let mut hosts_given = 0;
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        for name in ["PGSERVICE", "PGSERVICEFILE"] {
            if env(name).is_some() {
                return Err(Error::Usage(format!(
                    "{name} is set, but the gate does not read pg_service.conf: give the connection settings in the database URL and unset {name} for the gate"
                )));
            }
        }
        let mut pairs = pairs;
        for (var, key) in [
            ("PGTARGETSESSIONATTRS", "target_session_attrs"),
            ("PGCONNECT_TIMEOUT", "connect_timeout"),
            ("PGAPPNAME", "application_name"),
            ("PGOPTIONS", "options"),
        ] {
            if let Some(value) = env(var)
                && !pairs.iter().any(|(k, _)| k == key)
            {
                pairs.insert(0, (key.into(), value));
            }
        }
        for (key, value) in pairs {
            match key.as_str() {
                "sslmode" | "ssl" => {
                    let mode = ssl_mode(&key, &value)?;
                    if let Some((other, was)) = &sslmode
                        && *was != mode
                    {
                        return Err(Error::Usage(format!(
                            "database URL {shown} sets both {other} and {key}, to different TLS modes ({was} and {mode}): keep one (sslmode={mode} or sslmode={was})"
                        )));
                    }
                    sslmode = Some((key, mode));
                }
                "connect_timeout" => attempt_cap = connect_timeout(&value)?,
                "application_name" => application_name = Some(value),
                "target_session_attrs" => match value.as_str() {
                    // A holder needs the primary whatever this says; on one host, a standby is
                    // found out and said at once, and retried for --connect-timeout.
                    "any" | "read-write" | "primary" => {}
                    other => {
                        return Err(Error::Usage(format!(
                            "target_session_attrs={other} in the database URL is not supported: the replica that migrates needs the primary; write target_session_attrs=read-write, or remove it"
                        )));
                    }
                },
                "host" => {
                    hosts_given += 1;
                    if hosts_given > 1 || value.contains(',') {
                        return Err(Error::Usage(format!(
                            "database URL {shown} names several hosts: multi-host lists are not supported yet; give one host"
                        )));
                    }
                    kept.push((key, value));
                }
                "sslrootcert" | "sslcert" | "sslkey" | "options" | "port" | "dbname" | "user"
                | "password" => kept.push((key, value)),
                other => return Err(Error::Usage(unsupported_parameter(other))),
            }
        }
        if let Some((_, mode)) = sslmode {
            kept.push(("sslmode".into(), mode));
        }
        if kept.is_empty() {
            url.set_query(None);
        } else {
            url.query_pairs_mut().clear().extend_pairs(kept);
        }
        Ok(ConnUrl {
            url: url.to_string(),
            attempt_cap,
            application_name,
        })
    }
}

/// libpq's key/value form: `key = value` pairs separated by white space; a value may be in
/// single quotes (to hold spaces or be empty), and `\\` escapes the next character. Errors name
/// the key, never a value.
fn key_values(s: &str) -> std::result::Result<Vec<(String, String)>, String> {
    let mut pairs = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(pairs);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(format!("{key:?} has no \"=\""));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\'') => break,
                    Some('\\') => match chars.next() {
                        Some(c) => value.push(c),
                        None => return Err(format!("the value of {key:?} has no closing quote")),
                    },
                    Some(c) => value.push(c),
                    None => return Err(format!("the value of {key:?} has no closing quote")),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    if let Some(next) = chars.next() {
                        value.push(next);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        pairs.push((key, value));
    }
}

/// A key/value string with the password's value replaced by `***`, or a placeholder when it is
/// not readable.
fn redact_key_values(s: &str) -> String {
    match key_values(s) {
        Ok(pairs) => pairs
            .into_iter()
            .map(|(k, v)| {
                let v = if k == "password" {
                    "***".to_string()
                } else {
                    v
                };
                if v.is_empty() || v.contains(char::is_whitespace) {
                    format!("{k}='{v}'")
                } else {
                    format!("{k}={v}")
                }
            })
            .collect::<Vec<_>>()
            .join(" "),
        Err(_) => "(unreadable key/value string, not shown)".into(),
    }
}

/// The libpq environment the gate connects with when no URL is given, for messages: every
/// `PG*` connection variable that is set, `PGPASSWORD` as `***`.
fn describe_environment() -> String {
    let set: Vec<String> = [
        "PGHOST",
        "PGHOSTADDR",
        "PGPORT",
        "PGDATABASE",
        "PGUSER",
        "PGPASSWORD",
    ]
    .iter()
    .filter_map(|name| {
        let v = std::env::var(name).ok().filter(|v| !v.is_empty())?;
        Some(if *name == "PGPASSWORD" {
            format!("{name}=***")
        } else {
            format!("{name}={v}")
        })
    })
    .collect();
    format!("the libpq environment ({})", set.join(" "))
}

/// The `sslmode` that `key=value` asks for: `sslmode` takes libpq's names; `ssl` (asyncpg and
/// other drivers) takes them too, and true/false.
fn ssl_mode(key: &str, value: &str) -> Result<String> {
    let v = value.to_ascii_lowercase();
    if SSL_MODES.contains(&v.as_str()) {
        return Ok(v);
    }
    if key == "ssl" {
        match v.as_str() {
            // A driver's `ssl=true` asks for TLS; checking the certificate needs verify-full.
            "true" | "1" | "yes" | "on" => return Ok("require".into()),
            "false" | "0" | "no" | "off" => return Ok("disable".into()),
            _ => {}
        }
    }
    Err(Error::Usage(format!(
        "{key}={value:?} in the database URL is not a TLS mode: write sslmode= one of {}",
        SSL_MODES.join(", ")
    )))
}

/// libpq's `connect_timeout`: whole seconds; 0 or less means no limit of its own; 1 counts as
/// 2 (libpq's minimum).
fn connect_timeout(value: &str) -> Result<Option<Duration>> {
    let secs: i64 = value.trim().parse().map_err(|_| {
        Error::Usage(format!(
            "connect_timeout={value:?} in the database URL is not a whole number of seconds: write e.g. connect_timeout=10"
        ))
    })?;
    Ok((secs > 0).then(|| Duration::from_secs(secs.max(2) as u64)))
}

/// The message for a query parameter the gate cannot honour: its name and what to write
/// instead, never its value.
fn unsupported_parameter(key: &str) -> String {
    let instead = match key {
        "ssl-mode" => "write sslmode= (libpq's spelling)".to_string(),
        "ssl-root-cert" | "ssl-ca" => "write sslrootcert= (libpq's spelling)".into(),
        "ssl-cert" => "write sslcert= (libpq's spelling)".into(),
        "ssl-key" => "write sslkey= (libpq's spelling)".into(),
        "statement-cache-capacity" => "remove it: the gate never caches statements".into(),
        "hostaddr" => "put the address in the URL's host part instead".into(),
        "keepalives" | "keepalives_idle" | "keepalives_interval" | "keepalives_count"
        | "tcp_user_timeout" => "remove it: the gate sets its own keepalives (10 s idle, 5 s interval, 3 probes) and a 30 s TCP user timeout".into(),
        "service" => "give the URL itself: pg_service.conf is not read".into(),
        _ if key.starts_with("options[") => "write options=-c NAME=VALUE".into(),
        _ => "remove it (the gate honours sslmode, ssl, sslrootcert, sslcert, sslkey, connect_timeout, application_name, options, target_session_attrs, host, port, dbname, user and password)".into(),
    };
    format!("the database URL parameter {key:?} is not supported by the gate: {instead}")
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

/// The URL (or key/value string, or for the empty string the libpq environment) with any
/// password replaced by `***`, for messages and logs.
pub(crate) fn redact_url(url: &str) -> String {
    if url.trim().is_empty() {
        return describe_environment();
    }
    if !url.contains("://") && url.contains('=') {
        return redact_key_values(url);
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(url: &str) -> String {
        match ConnUrl::parse(url) {
            Err(Error::Usage(m)) => m,
            other => panic!("{url}: expected a usage error, got {other:?}"),
        }
    }

    #[test]
    fn sqlalchemy_and_postgres_schemes_reach_the_same_url() {
        let plain = ConnUrl::parse("postgresql://u:p@db:5433/app").unwrap();
        for url in [
            "postgres://u:p@db:5433/app",
            "postgresql+psycopg2://u:p@db:5433/app",
            "postgresql+asyncpg://u:p@db:5433/app",
            "POSTGRESQL+psycopg://u:p@db:5433/app",
        ] {
            assert_eq!(ConnUrl::parse(url).unwrap(), plain, "{url}");
        }
        for url in [
            "mysql://u:p@db/app",
            "postgresql+://u:p@db/app",
            "sqlite:///app.db",
        ] {
            let m = usage(url);
            assert!(m.contains("scheme") && m.contains("postgresql://"), "{m}");
            assert!(!m.contains(":p@"), "{m}");
        }
    }

    #[test]
    fn an_empty_host_with_a_user_keeps_the_user_and_password() {
        let u =
            ConnUrl::parse("postgresql+psycopg2://app:p%40ss@/db?host=/run/postgresql").unwrap();
        let o = PgConnectOptions::from_str(&u.url).unwrap();
        assert_eq!(o.get_username(), "app");
        assert_eq!(o.get_database(), Some("db"));
        assert_eq!(
            o.get_socket().map(|p| p.display().to_string()).as_deref(),
            Some("/run/postgresql")
        );
        assert!(u.url.contains("password=p%40ss"), "{}", u.url);
    }

    #[test]
    fn the_key_value_form_reads_as_libpq_reads_it() {
        let u = ConnUrl::parse(
            "host=db.internal port = 5433 dbname=app user=u password='p w\\'d' sslmode=require connect_timeout=7",
        )
        .unwrap();
        assert_eq!(u.attempt_cap, Some(Duration::from_secs(7)));
        let o = PgConnectOptions::from_str(&u.url).unwrap();
        assert_eq!(o.get_host(), "db.internal");
        assert_eq!(o.get_port(), 5433);
        assert_eq!(o.get_database(), Some("app"));
        assert_eq!(o.get_username(), "u");
        let shown = redact_url("host=db user=u password='p w\\'d'");
        assert_eq!(shown, "host=db user=u password=***");
        for bad in ["host=db dbname", "host=db password='unclosed"] {
            let m = usage(bad);
            assert!(m.contains("key/value") && !m.contains("unclosed"), "{m}");
        }
        let m = usage("host=db password=hunter2 gssencmode=disable");
        assert!(m.contains("gssencmode") && !m.contains("hunter2"), "{m}");
        assert!(usage("host=db1,db2 dbname=app").contains("multi-host"));
    }

    #[test]
    fn asyncpg_ssl_is_read_as_sslmode() {
        let with = |q: &str| ConnUrl::parse(&format!("postgresql+asyncpg://u@db/app?{q}"));
        for (q, mode) in [
            ("ssl=disable", "disable"),
            ("ssl=require", "require"),
            ("ssl=verify-full", "verify-full"),
            ("ssl=true", "require"),
            ("ssl=false", "disable"),
            ("sslmode=verify-ca", "verify-ca"),
            ("ssl=require&sslmode=require", "require"),
        ] {
            let url = with(q).unwrap().url;
            assert!(url.ends_with(&format!("?sslmode={mode}")), "{q}: {url}");
        }
        assert!(usage("postgresql://u@db/app?ssl=maybe").contains("sslmode="));
        assert!(usage("postgresql://u@db/app?ssl=disable&sslmode=require").contains("both"));
    }

    #[test]
    fn connect_timeout_and_application_name_are_the_gates_own() {
        let u = ConnUrl::parse(
            "postgresql://u:p@db/app?connect_timeout=5&application_name=web&sslmode=require",
        )
        .unwrap();
        assert_eq!(u.attempt_cap, Some(Duration::from_secs(5)));
        assert_eq!(u.application_name.as_deref(), Some("web"));
        assert_eq!(u.url, "postgresql://u:p@db/app?sslmode=require");
        let cap = |n: &str| {
            ConnUrl::parse(&format!("postgresql://db/app?connect_timeout={n}"))
                .unwrap()
                .attempt_cap
        };
        assert_eq!(cap("1"), Some(Duration::from_secs(2)), "libpq's minimum");
        assert_eq!(cap("0"), None);
        assert_eq!(cap("-3"), None);
        assert!(usage("postgresql://db/app?connect_timeout=5s").contains("connect_timeout"));
    }

    #[test]
    fn a_parameter_the_gate_cannot_honour_is_named_with_what_to_write_and_no_password() {
        for (q, says) in [
            ("gssencmode=disable", "remove it"),
            ("ssl-mode=require", "sslmode="),
            ("statement-cache-capacity=0", "never caches"),
            ("keepalives_idle=30", "its own keepalives"),
            ("target_session_attrs=standby", "read-write"),
        ] {
            let m = usage(&format!("postgresql://u:hunter2@db/app?{q}"));
            let key = q.split('=').next().unwrap();
            assert!(m.contains(key) && m.contains(says), "{q}: {m}");
            assert!(!m.contains("hunter2"), "{m}");
        }
        for url in [
            "postgresql://u:hunter2@db1:5432,db2:5432/app",
            "postgresql+asyncpg://u:hunter2@/app?host=a:5432&host=b:5432",
        ] {
            let m = usage(url);
            assert!(m.contains("multi-host"), "{m}");
            assert!(!m.contains("hunter2"), "{m}");
        }
        for ok in ["any", "read-write", "primary"] {
            ConnUrl::parse(&format!("postgresql://db/app?target_session_attrs={ok}")).unwrap();
        }
    }

    #[test]
    fn redact_url_hides_passwords_in_userinfo_and_query() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/app"),
            "postgres://app:***@db:5432/app"
        );
        let q = redact_url("postgres://app@db/app?password=s3cret&sslmode=require");
        assert!(!q.contains("s3cret"), "{q}");
        assert!(q.contains("sslmode=require"), "{q}");
        assert_eq!(redact_url("postgres://app@db/app"), "postgres://app@db/app");
        let bad = redact_url("not a url with s3cret");
        assert!(!bad.contains("s3cret"), "{bad}");
    }
}
