//! The connection string: libpq's URL and key/value forms, SQLAlchemy's schemes, the `PG*`
//! environment, and the parameters the gate honours or refuses.

use super::*;

/// A database URL in one of the forms the gate accepts, rewritten for sqlx, with the settings the
/// gate honours itself taken out. Accepted: `postgresql://` and `postgres://`, and SQLAlchemy's
/// `postgresql+DRIVER://` (the driver is dropped). Every query parameter is either honoured or
/// refused with a usage error that names it and says what to write instead (sqlx would ignore
/// an unknown one with a warning that prints its value, which may be a secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConnUrl {
    /// The URL for sqlx: `postgresql://`, only the parameters sqlx honours as libpq does.
    pub(super) url: String,
    /// `connect_timeout=N`: the longest single connection attempt (libpq: at least 2 s; 0 or
    /// less: no limit of its own, so the gate's applies).
    pub(crate) attempt_cap: Option<Duration>,
    /// `application_name=`.
    pub(crate) application_name: Option<String>,
}

/// The values of `sslmode`, as libpq spells them.
pub(super) const SSL_MODES: [&str; 6] = [
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
pub(super) fn key_values(s: &str) -> std::result::Result<Vec<(String, String)>, String> {
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
pub(super) fn redact_key_values(s: &str) -> String {
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
pub(super) fn describe_environment() -> String {
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
pub(super) fn ssl_mode(key: &str, value: &str) -> Result<String> {
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
pub(super) fn connect_timeout(value: &str) -> Result<Option<Duration>> {
    let secs: i64 = value.trim().parse().map_err(|_| {
        Error::Usage(format!(
            "connect_timeout={value:?} in the database URL is not a whole number of seconds: write e.g. connect_timeout=10"
        ))
    })?;
    Ok((secs > 0).then(|| Duration::from_secs(secs.max(2) as u64)))
}

/// The message for a query parameter the gate cannot honour: its name and what to write
/// instead, never its value.
pub(super) fn unsupported_parameter(key: &str) -> String {
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
}
