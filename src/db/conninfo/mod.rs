//! The connection string: libpq's URL and key/value forms, SQLAlchemy's schemes, the `PG*`
//! environment, and the parameters the gate honours or refuses.

use super::*;

mod params;
#[cfg(test)]
mod tests;

pub(in crate::db) use params::*;

/// A connection string in one of the forms the gate accepts, turned into one sqlx URL per host
/// of its host list, with the settings the gate honours itself taken out. Accepted: libpq's URL
/// (`postgresql://`, `postgres://`) and key/value forms, SQLAlchemy's `postgresql+DRIVER://`
/// (the driver is dropped), and libpq's environment and `pg_service.conf` for what they leave
/// unset. Every parameter is either honoured or refused with a usage error that names it and says
/// what to write instead (sqlx would ignore an unknown one with a warning that prints its value,
/// which may be a secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConnUrl {
    /// One entry per host of the list, in libpq's order (libpq: "Specifying Multiple Hosts").
    pub(crate) hosts: Vec<HostUrl>,
    /// `target_session_attrs`: which host of the list a session may use.
    pub(crate) attrs: SessionAttrs,
    /// `load_balance_hosts=random` (libpq 16): try the hosts in a random order.
    pub(crate) load_balance: bool,
    /// `connect_timeout=N`: the longest attempt on one host (libpq: at least 2 s; 0 or less:
    /// no limit of its own, so the gate's applies).
    pub(crate) attempt_cap: Option<Duration>,
    /// `application_name=`.
    pub(crate) application_name: Option<String>,
}

/// One host of a connection string's host list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HostUrl {
    /// The URL for sqlx: `postgresql:?host=..&port=..&..`, only the parameters sqlx honours as
    /// libpq does (sqlx reads the `PG*` variables the gate leaves to it: `PGUSER`, `PGPASSWORD`,
    /// `PGDATABASE`, `PGPASSFILE`, `PGSSLMODE` and the `PGSSL*` files).
    pub(super) url: String,
    /// `host:port` as given (empty parts: libpq's defaults), for messages.
    pub(crate) shown: String,
}

/// libpq's `target_session_attrs` (libpq, "Parameter Key Words"): which server of a host list
/// a session may use. A replica that may migrate asks for [`SessionAttrs::ReadWrite`] whatever
/// the URL says ([`crate::db::Db::for_holder`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum SessionAttrs {
    #[default]
    Any,
    ReadWrite,
    ReadOnly,
    Primary,
    Standby,
    PreferStandby,
}

impl SessionAttrs {
    fn parse(value: &str) -> Result<SessionAttrs> {
        Ok(match value {
            "any" => SessionAttrs::Any,
            "read-write" => SessionAttrs::ReadWrite,
            "read-only" => SessionAttrs::ReadOnly,
            "primary" => SessionAttrs::Primary,
            "standby" => SessionAttrs::Standby,
            "prefer-standby" => SessionAttrs::PreferStandby,
            other => {
                return Err(Error::Usage(format!(
                    "target_session_attrs={other:?} is not one of libpq's values: write any, read-write, read-only, primary, standby or prefer-standby"
                )));
            }
        })
    }

    /// libpq's spelling.
    pub(crate) fn name(self) -> &'static str {
        match self {
            SessionAttrs::Any => "any",
            SessionAttrs::ReadWrite => "read-write",
            SessionAttrs::ReadOnly => "read-only",
            SessionAttrs::Primary => "primary",
            SessionAttrs::Standby => "standby",
            SessionAttrs::PreferStandby => "prefer-standby",
        }
    }
}

/// Whether `raw` is libpq's key/value form (or empty: the environment alone) rather than a URL.
/// As in libpq, a URL is a string that starts with its scheme and `://`; a `://` later on (in a
/// quoted password, say) leaves a key/value string one.
pub(in crate::db) fn is_key_value(raw: &str) -> bool {
    let scheme = raw.split_once("://").map(|(scheme, _)| scheme);
    let is_url = scheme.is_some_and(|s| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    });
    !is_url && (raw.trim().is_empty() || raw.contains('='))
}

/// libpq decodes `%XX` in every part of a URL, and nothing else (a `+` stays a `+`).
fn decode(part: &str, what: &str, shown: &str) -> Result<String> {
    percent_encoding::percent_decode_str(part)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| {
            Error::Usage(format!(
                "the {what} in database URL {shown} is not UTF-8 after percent-decoding"
            ))
        })
}

/// A URL's settings as libpq's key/value pairs, in the order libpq applies them (the query
/// after the authority and path, so `?host=` overrides the host before `/`).
fn url_pairs(raw: &str, shown: &str) -> Result<Vec<(String, String)>> {
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
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut pairs = Vec::new();
    let (userinfo, hostlist) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    if let Some(userinfo) = userinfo {
        let (user, password) = match userinfo.split_once(':') {
            Some((u, p)) => (u, Some(p)),
            None => (userinfo, None),
        };
        if !user.is_empty() {
            pairs.push(("user".into(), decode(user, "user name", shown)?));
        }
        if let Some(p) = password {
            pairs.push(("password".into(), decode(p, "password", shown)?));
        }
    }
    if !hostlist.is_empty() {
        let mut hosts = Vec::new();
        let mut ports = Vec::new();
        for entry in hostlist.split(',') {
            // `[2001:db8::1]:5432`: an IPv6 address in brackets, as in RFC 3986.
            let (host, port) = match entry.strip_prefix('[') {
                Some(v6) => {
                    let (addr, after) = v6.split_once(']').ok_or_else(|| {
                        Error::Usage(format!(
                            "malformed database URL {shown}: an IPv6 address without its closing \"]\"; {expected}"
                        ))
                    })?;
                    (addr.to_string(), after.strip_prefix(':').unwrap_or(after))
                }
                None => match entry.split_once(':') {
                    Some((h, p)) => (decode(h, "host", shown)?, p),
                    None => (decode(entry, "host", shown)?, ""),
                },
            };
            hosts.push(host);
            ports.push(port.to_string());
        }
        pairs.push(("host".into(), hosts.join(",")));
        if ports.iter().any(|p| !p.is_empty()) {
            pairs.push(("port".into(), ports.join(",")));
        }
    }
    if !path.is_empty() {
        pairs.push(("dbname".into(), decode(path, "database name", shown)?));
    }
    for param in query.split('&').filter(|p| !p.is_empty()) {
        let Some((key, value)) = param.split_once('=') else {
            return Err(Error::Usage(format!(
                "malformed database URL {shown}: the parameter {:?} has no \"=\"; {expected}",
                decode(param, "parameter", shown)?
            )));
        };
        pairs.push((
            decode(key, "parameter name", shown)?,
            decode(value, "parameter value", shown)?,
        ));
    }
    Ok(pairs)
}

impl ConnUrl {
    /// Parses `raw`: a URL, libpq's key/value form (`host=db port=5432 dbname=app user=u`), or
    /// nothing (the empty string: the libpq environment alone, `PGHOST`, `PGPORT`, ...). The
    /// errors name the setting and never show the password.
    pub(crate) fn parse(raw: &str) -> Result<ConnUrl> {
        let shown = redact_url(raw);
        let pairs = if is_key_value(raw) {
            key_values(raw).map_err(|e| {
                Error::Usage(format!(
                    "malformed key/value connection string {shown}: {e}; expected host=HOST port=PORT dbname=DATABASE user=USER"
                ))
            })?
        } else {
            url_pairs(raw, &shown)?
        };
        ConnUrl::from_pairs(pairs, &shown)
    }

    /// Checks the settings `pairs` (a later one wins over an earlier one of the same key, as in
    /// libpq) and fills in what they leave unset at libpq's precedence: the service's section of
    /// `pg_service.conf`, then the `PG*` environment. The settings sqlx honours as libpq does go
    /// into each host's URL.
    fn from_pairs(pairs: Vec<(String, String)>, shown: &str) -> Result<ConnUrl> {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let mut given: Vec<(String, String)> = Vec::new();
        let mut sslmode: Option<(String, String)> = None;
        libpq_environment(&env)?;
        for (key, value) in pairs {
            // A C string ends at NUL: libpq could never send it, and a server would see another
            // name than the one given.
            if key.contains('\0') || value.contains('\0') {
                return Err(Error::Usage(format!(
                    "the database URL's {:?} contains a NUL byte (%00): remove it",
                    key.replace('\0', "")
                )));
            }
            if matches!(key.as_str(), "sslmode" | "ssl") {
                let mode = ssl_mode(&key, &value)?;
                if let Some((other, was)) = &sslmode
                    && *was != mode
                {
                    return Err(Error::Usage(format!(
                        "database URL {shown} sets both {other} and {key}, to different TLS modes ({was} and {mode}): keep one (sslmode={mode} or sslmode={was})"
                    )));
                }
                sslmode = Some((key, mode.clone()));
                set(&mut given, "sslmode", mode);
            } else {
                set(&mut given, &key, value);
            }
        }
        // libpq: the connection string, then the service file, then the environment.
        let service = get(&given, "service").or_else(|| env("PGSERVICE"));
        if let Some(name) = service {
            for (key, value) in super::service::section(&name)? {
                if get(&given, &key).is_none() {
                    set(&mut given, &key, value);
                }
            }
        }
        for (var, key) in [
            ("PGTARGETSESSIONATTRS", "target_session_attrs"),
            ("PGLOADBALANCEHOSTS", "load_balance_hosts"),
            ("PGCONNECT_TIMEOUT", "connect_timeout"),
            ("PGAPPNAME", "application_name"),
            ("PGOPTIONS", "options"),
            // sqlx reads these itself, but a list must be split into hosts here. libpq
            // connects to `hostaddr` when both are set; so does sqlx.
            ("PGHOSTADDR", "host"),
            ("PGHOST", "host"),
            ("PGPORT", "port"),
        ] {
            if let Some(value) = env(var)
                && get(&given, key).is_none()
            {
                set(&mut given, key, value);
            }
        }
        let mut kept: Vec<(String, String)> = Vec::new();
        let mut attrs = SessionAttrs::Any;
        let mut load_balance = false;
        let mut attempt_cap = None;
        let mut application_name = None;
        let mut hosts: Vec<String> = Vec::new();
        let mut ports: Vec<String> = Vec::new();
        for (key, value) in given {
            match key.as_str() {
                "connect_timeout" => attempt_cap = connect_timeout(&value)?,
                "application_name" => application_name = Some(value),
                "target_session_attrs" => attrs = SessionAttrs::parse(&value)?,
                "load_balance_hosts" => {
                    load_balance = match value.as_str() {
                        "disable" => false,
                        "random" => true,
                        other => {
                            return Err(Error::Usage(format!(
                                "load_balance_hosts={other:?} is not one of libpq's values: write disable or random"
                            )));
                        }
                    }
                }
                "host" => hosts = value.split(',').map(str::to_string).collect(),
                "port" => ports = value.split(',').map(str::to_string).collect(),
                "service" => {}
                "sslmode" | "sslrootcert" | "sslcert" | "sslkey" | "options" | "dbname"
                | "user" | "password" => kept.push((key, value)),
                other => return Err(Error::Usage(unsupported_parameter(other))),
            }
        }
        for port in ports.iter().filter(|p| !p.is_empty()) {
            if !port.parse::<u16>().is_ok_and(|p| p > 0) {
                return Err(Error::Usage(format!(
                    "invalid port {port:?} in {shown}: write a number from 1 to 65535"
                )));
            }
        }
        if hosts.is_empty() {
            hosts.push(String::new());
        }
        if hosts.len() > 1 && hosts.iter().any(|h| h.is_empty()) {
            return Err(Error::Usage(format!(
                "{shown} has an empty host in its host list: name every host (a Unix socket's directory, such as /run/postgresql, counts)"
            )));
        }
        // libpq: one port for every host, or one per host.
        if ports.len() > 1 && ports.len() != hosts.len() {
            return Err(Error::Usage(format!(
                "{shown} gives {} ports for {} hosts: give one port for all of them, or one per host",
                ports.len(),
                hosts.len()
            )));
        }
        let hosts = hosts
            .iter()
            .enumerate()
            .map(|(i, host)| {
                let port = ports.get(i).or(ports.first()).cloned().unwrap_or_default();
                let mut pairs = kept.clone();
                if !host.is_empty() {
                    pairs.push(("host".into(), host.clone()));
                }
                if !port.is_empty() {
                    pairs.push(("port".into(), port.clone()));
                }
                let mut url =
                    url::Url::parse("postgresql:").map_err(|e| Error::Internal(e.to_string()))?;
                if !pairs.is_empty() {
                    url.query_pairs_mut().extend_pairs(pairs);
                }
                let shown = match (host.as_str(), port.as_str()) {
                    ("", "") => "the default host".to_string(),
                    (h, "") => h.to_string(),
                    ("", p) => format!("the default host, port {p}"),
                    (h, p) if h.contains(':') => format!("[{h}]:{p}"),
                    (h, p) => format!("{h}:{p}"),
                };
                Ok(HostUrl {
                    url: url.to_string(),
                    shown,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ConnUrl {
            hosts,
            attrs,
            load_balance,
            attempt_cap,
            application_name,
        })
    }
}

/// The value of `key` in `pairs`.
fn get(pairs: &[(String, String)], key: &str) -> Option<String> {
    pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
}

/// Sets `key` in `pairs`: a later setting replaces an earlier one, as in libpq.
fn set(pairs: &mut Vec<(String, String)>, key: &str, value: String) {
    match pairs.iter_mut().find(|(k, _)| k == key) {
        Some(pair) => pair.1 = value,
        None => pairs.push((key.to_string(), value)),
    }
}

/// libpq's environment variables the gate reads, checked as libpq would refuse them: one line
/// naming the variable (never the connection string) when a value cannot work.
fn libpq_environment(env: &dyn Fn(&str) -> Option<String>) -> Result<()> {
    let refuse = |var: &str, want: &str| {
        Err(Error::Usage(format!(
            "the environment variable {var} is not {want}: fix or unset it"
        )))
    };
    if let Some(mode) = env("PGSSLMODE")
        && !params::SSL_MODES.contains(&mode.to_ascii_lowercase().as_str())
    {
        return refuse(
            "PGSSLMODE",
            &format!("a TLS mode (one of {})", params::SSL_MODES.join(", ")),
        );
    }
    if let Some(t) = env("PGCONNECT_TIMEOUT")
        && t.trim().parse::<i64>().is_err()
    {
        return refuse("PGCONNECT_TIMEOUT", "a whole number of seconds");
    }
    if let Some(ports) = env("PGPORT")
        && ports
            .split(',')
            .any(|p| !p.is_empty() && !p.trim().parse::<u16>().is_ok_and(|p| p > 0))
    {
        return refuse(
            "PGPORT",
            "a port (1 to 65535) or a comma-separated list of ports",
        );
    }
    // sqlx reads the password file itself, whole: a FIFO there would block the gate and
    // /dev/zero fill its memory. libpq's default is ~/.pgpass.
    let passfile = env("PGPASSFILE")
        .map(std::path::PathBuf::from)
        .or_else(|| env("HOME").map(|h| std::path::Path::new(&h).join(".pgpass")));
    if let Some(path) = passfile.filter(|p| p.exists())
        && let Err(why) = crate::files::read_bounded(&path, crate::files::SETTINGS_LIMIT)
    {
        return Err(Error::Usage(format!(
            "cannot read the password file {} (PGPASSFILE, else ~/.pgpass): {why}",
            path.display()
        )));
    }
    Ok(())
}
