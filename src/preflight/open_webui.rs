//! Where Open WebUI finds its database, for `--preset open-webui`: the same decision its
//! `open_webui/env.py` makes (0.11.0), then the URL read as SQLAlchemy 2.0 reads it, so that the
//! gate locks the database the app migrates, or refuses (78) where the app would fail or go
//! elsewhere.
//!
//! `open_webui/env.py` (0.11.0), the part that decides:
//!
//! ```python
//! DATABASE_URL = os.getenv('DATABASE_URL', f'sqlite:///{DATA_DIR}/webui.db')
//!
//! DATABASE_TYPE = os.getenv('DATABASE_TYPE')
//! DATABASE_USER = os.getenv('DATABASE_USER')
//! DATABASE_PASSWORD = os.getenv('DATABASE_PASSWORD')
//!
//! DATABASE_CRED = ''
//! if DATABASE_USER:
//!     DATABASE_CRED += f'{DATABASE_USER}'
//! if DATABASE_PASSWORD:
//!     DATABASE_CRED += f':{DATABASE_PASSWORD}'
//!
//! DB_VARS = {
//!     'db_type': DATABASE_TYPE,
//!     'db_cred': DATABASE_CRED,
//!     'db_host': os.getenv('DATABASE_HOST'),
//!     'db_port': os.getenv('DATABASE_PORT'),
//!     'db_name': os.getenv('DATABASE_NAME'),
//! }
//!
//! if all(DB_VARS.values()):
//!     DATABASE_URL = (
//!         f'{DB_VARS["db_type"]}://{DB_VARS["db_cred"]}@{DB_VARS["db_host"]}:{DB_VARS["db_port"]}/{DB_VARS["db_name"]}'
//!     )
//! elif DATABASE_TYPE == 'sqlite+sqlcipher' and not os.getenv('DATABASE_URL'):
//!     # Handle SQLCipher with local file when DATABASE_URL wasn't explicitly set
//!     DATABASE_URL = f'sqlite+sqlcipher:///{DATA_DIR}/webui.db'
//!
//! # Replace the postgres:// with postgresql://
//! if 'postgres://' in DATABASE_URL:
//!     DATABASE_URL = DATABASE_URL.replace('postgres://', 'postgresql://')
//! ```
//!
//! So: the parts win over `DATABASE_URL` when all five (type, user or password, host, port,
//! name) are non-empty; the user and password go into the URL as they are, not encoded; an
//! empty `DATABASE_PASSWORD` means no password in the URL (libpq then reads `PGPASSWORD` or a
//! `.pgpass` file); `DATABASE_URL` set but empty stays empty (the app fails); nothing else
//! (no `*_FILE` variable) names the database. `env.py` also loads a `.env` file beside the
//! installed package (`load_dotenv`, not overriding the environment): the gate does not read it.
//!
//! The app then hands the URL to SQLAlchemy (`create_engine`, and Alembic's `env.py` for the
//! migrations), whose `sqlalchemy.engine.url._parse_url` reads it with this pattern, then
//! percent-decodes the user and password only:
//!
//! ```text
//! (?P<name>[\w\+]+)://
//! (?:(?P<username>[^:/]*)(?::(?P<password>[^@]*))?@)?
//! (?:(?:\[(?P<ipv6host>[^/\?]+)\]|(?P<ipv4host>[^/:\?]+))?(?::(?P<port>[^/\?]*))?)?
//! (?:/(?P<database>[^\?]*))?
//! (?:\?(?P<query>.*))?
//! ```
//!
//! and psycopg2 gets each non-empty part as a keyword (`host`, `port`, `user`, `password`,
//! `dbname`), the query's parameters after them. Before that, Open WebUI's `internal/db.py`
//! (`extract_ssl_params_from_url`) turns `ssl=` into `sslmode=`. The gate hands the same parts
//! to its own connection as a libpq key/value string.

/// Where Open WebUI's database URL came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// All of `DATABASE_TYPE`, `DATABASE_USER`/`DATABASE_PASSWORD`, `DATABASE_HOST`,
    /// `DATABASE_PORT` and `DATABASE_NAME`: they win over `DATABASE_URL`.
    Parts,
    /// `DATABASE_URL`.
    Url,
    /// Neither: SQLite in `DATA_DIR` (SQLCipher with `DATABASE_TYPE=sqlite+sqlcipher`).
    Default,
}

impl Source {
    /// For logs: where the database came from.
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Source::Parts => {
                "Open WebUI's DATABASE_TYPE, DATABASE_USER, DATABASE_PASSWORD, DATABASE_HOST, DATABASE_PORT and DATABASE_NAME \
                 (--preset open-webui: all set, so they win over DATABASE_URL, as in Open WebUI)"
            }
            Source::Url => "DATABASE_URL, read as Open WebUI reads it (--preset open-webui)",
            Source::Default => "Open WebUI's default SQLite file (--preset open-webui)",
        }
    }
}

/// Why the gate cannot use what Open WebUI would use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Problem {
    /// Not PostgreSQL (SQLite, another scheme, an empty `DATABASE_URL`): what says so.
    NotPostgres(String),
    /// PostgreSQL, but SQLAlchemy would not read the settings as written, or could not read the
    /// port: which setting, and what to do.
    Misread(String),
}

/// Open WebUI's database, as the app would resolve it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AppDatabase {
    /// Where it came from.
    pub(crate) source: Source,
    /// The connection for the gate: a libpq key/value string of the parts SQLAlchemy hands to
    /// psycopg2 (holds the password: never log it), or why there is none.
    pub(crate) conninfo: Result<String, Problem>,
}

/// The parts that win over `DATABASE_URL`, for messages.
const PARTS: &str = "DATABASE_TYPE, DATABASE_USER or DATABASE_PASSWORD, DATABASE_HOST, DATABASE_PORT and DATABASE_NAME";

/// Resolves Open WebUI's database from its environment, read through `var`.
pub(crate) fn database(var: &dyn Fn(&str) -> Option<String>) -> AppDatabase {
    let set = |name: &str| var(name).filter(|v| !v.is_empty());
    let mut cred = set("DATABASE_USER").unwrap_or_default();
    if let Some(password) = set("DATABASE_PASSWORD") {
        cred.push(':');
        cred.push_str(&password);
    }
    let parts = [
        ("DATABASE_TYPE", set("DATABASE_TYPE")),
        (
            "DATABASE_USER or DATABASE_PASSWORD",
            Some(cred).filter(|c| !c.is_empty()),
        ),
        ("DATABASE_HOST", set("DATABASE_HOST")),
        ("DATABASE_PORT", set("DATABASE_PORT")),
        ("DATABASE_NAME", set("DATABASE_NAME")),
    ];
    let (source, url) = if let [Some(ty), Some(cred), Some(host), Some(port), Some(name)] =
        parts.clone().map(|(_, v)| v)
    {
        (Source::Parts, format!("{ty}://{cred}@{host}:{port}/{name}"))
    } else if set("DATABASE_TYPE").as_deref() == Some("sqlite+sqlcipher")
        && set("DATABASE_URL").is_none()
    {
        (Source::Default, "sqlite+sqlcipher:///webui.db".to_string())
    } else if let Some(url) = var("DATABASE_URL") {
        (Source::Url, url)
    } else {
        (Source::Default, "sqlite:///webui.db".to_string())
    };
    // Some of the parts but not all: say which are missing, so that a half-set group is not
    // silently ignored (Open WebUI ignores it too).
    let missing: Vec<&str> = parts
        .iter()
        .filter(|(_, v)| v.is_none())
        .map(|(n, _)| *n)
        .collect();
    let partial = if source != Source::Parts && missing.len() < parts.len() {
        format!(
            " ({} unset or empty, so Open WebUI does not build its URL from {PARTS})",
            missing.join(", ")
        )
    } else {
        String::new()
    };
    let url = url.replace("postgres://", "postgresql://");
    let conninfo = read(source, &url, var).map_err(|p| match p {
        Problem::NotPostgres(why) => Problem::NotPostgres(format!("{why}{partial}")),
        misread => misread,
    });
    AppDatabase { source, conninfo }
}

/// What the URL's scheme and parts say, given where it came from.
fn read(
    source: Source,
    url: &str,
    var: &dyn Fn(&str) -> Option<String>,
) -> Result<String, Problem> {
    let not_postgres = |why: &str| Problem::NotPostgres(why.to_string());
    let parsed = match (source, parse(url)) {
        (Source::Default, _) if url.starts_with("sqlite+sqlcipher") => {
            return Err(not_postgres(
                "DATABASE_TYPE asks for SQLCipher and DATABASE_URL is unset, so Open WebUI uses an encrypted SQLite file",
            ));
        }
        (Source::Default, _) => {
            return Err(not_postgres(
                "DATABASE_URL is unset, so Open WebUI uses its SQLite file",
            ));
        }
        (Source::Url, _) if url.is_empty() => return Err(not_postgres("DATABASE_URL is empty")),
        (Source::Url, Some(p)) if p.is_postgres() => p,
        (Source::Url, _) => return Err(not_postgres("DATABASE_URL has another scheme")),
        (Source::Parts, Some(p)) if p.is_postgres() => p,
        (Source::Parts, _) => {
            return Err(not_postgres(
                "DATABASE_TYPE is not PostgreSQL (postgresql, postgres or postgresql+DRIVER), and Open WebUI builds its URL from it \
                 and the other DATABASE_* parts, which win over DATABASE_URL",
            ));
        }
    };
    if source == Source::Parts {
        check_parts(&parsed, var)?;
    }
    let whose = match source {
        Source::Parts => "DATABASE_PORT",
        _ => "DATABASE_URL's port",
    };
    let port = match parsed.port.as_deref() {
        None => None,
        Some("") => {
            return Err(Problem::Misread(format!(
                "{whose} is empty, which SQLAlchemy refuses"
            )));
        }
        Some(p) => match python_int(p) {
            Some(0) => None,
            Some(n @ 1..=65535) => Some(n.to_string()),
            _ => {
                return Err(Problem::Misread(format!(
                    "{whose} is not a port number (1 to 65535) as SQLAlchemy and libpq read it"
                )));
            }
        },
    };
    if parsed.host.as_deref().is_some_and(|h| h.contains('@')) {
        return Err(Problem::Misread(
            "the host SQLAlchemy reads from DATABASE_URL holds \"@\": an \"@\" in the password ends it early; \
             percent-encode it as %40"
                .into(),
        ));
    }
    let nonempty = |v: Option<String>| v.filter(|v| !v.is_empty());
    let mut pairs: Vec<(String, String)> = [
        ("host", nonempty(parsed.host.clone())),
        ("port", port),
        ("user", nonempty(parsed.username.as_deref().map(unquote))),
        (
            "password",
            nonempty(parsed.password.as_deref().map(unquote)),
        ),
        ("dbname", nonempty(parsed.database.clone())),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.map(|v| (k.to_string(), v)))
    .collect();
    for (k, v) in open_webui_ssl(query_pairs(parsed.query.as_deref().unwrap_or(""))) {
        // psycopg2's keywords: the query's win over the URL's parts (`opts.update(url.query)`).
        pairs.retain(|(have, _)| *have != k);
        pairs.push((k, v));
    }
    Ok(pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", quote(v)))
        .collect::<Vec<_>>()
        .join(" "))
}

/// With the parts, Open WebUI's URL must read back as the parts say: `DATABASE_USER` and
/// `DATABASE_PASSWORD` go in unencoded, so an `@`, `:` or `/` in them moves the URL's
/// boundaries, and the app would fail or connect elsewhere.
fn check_parts(parsed: &Parsed, var: &dyn Fn(&str) -> Option<String>) -> Result<(), Problem> {
    let set = |name: &str| var(name).filter(|v| !v.is_empty());
    let some = |v: Option<&str>| v.filter(|v| !v.is_empty()).map(str::to_string);
    let host = set("DATABASE_HOST").unwrap_or_default();
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(&host)
        .to_string();
    let name = set("DATABASE_NAME").unwrap_or_default();
    let name = name.split('?').next().unwrap_or_default().to_string();
    let checks = [
        (
            "DATABASE_USER",
            set("DATABASE_USER").map(|u| unquote(&u)),
            some(parsed.username.as_deref()).map(|u| unquote(&u)),
        ),
        (
            "DATABASE_PASSWORD",
            set("DATABASE_PASSWORD").map(|p| unquote(&p)),
            some(parsed.password.as_deref()).map(|p| unquote(&p)),
        ),
        ("DATABASE_HOST", Some(host), parsed.host.clone()),
        ("DATABASE_PORT", set("DATABASE_PORT"), parsed.port.clone()),
        ("DATABASE_NAME", Some(name), parsed.database.clone()),
    ];
    match checks.iter().find(|(_, given, read)| given != read) {
        None => Ok(()),
        Some((name, _, _)) => Err(Problem::Misread(format!(
            "{name} is not what SQLAlchemy reads back from the URL Open WebUI builds from the DATABASE_* parts \
             (they go in unencoded: an \"@\" in DATABASE_PASSWORD, a \":\" or \"/\" in DATABASE_USER, a \"/\" or \":\" \
             in DATABASE_HOST move the URL's boundaries); percent-encode such a character in DATABASE_USER or \
             DATABASE_PASSWORD (Open WebUI decodes them; @ as %40), write an IPv6 host in brackets, or set DATABASE_URL \
             and unset the parts"
        ))),
    }
}

/// The URL's parts as SQLAlchemy's `_parse_url` finds them (before decoding).
#[derive(Debug, Default, PartialEq, Eq)]
struct Parsed {
    name: String,
    username: Option<String>,
    password: Option<String>,
    host: Option<String>,
    port: Option<String>,
    database: Option<String>,
    query: Option<String>,
}

impl Parsed {
    /// SQLAlchemy's PostgreSQL dialect names (case matters: `POSTGRESQL://` fails to load).
    fn is_postgres(&self) -> bool {
        self.name == "postgresql"
            || self
                .name
                .strip_prefix("postgresql+")
                .is_some_and(|d| !d.is_empty() && !d.contains('+'))
    }
}

/// SQLAlchemy's pattern (see the module's doc), step by step; `None` where it does not match.
fn parse(url: &str) -> Option<Parsed> {
    let (name, rest) = url.split_once("://")?;
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_alphanumeric() || c == '_' || c == '+')
    {
        return None;
    }
    let mut p = Parsed {
        name: name.to_string(),
        ..Parsed::default()
    };
    // The user and password: `[^:/]*` then optionally `:` and `[^@]*`, then `@`. The pattern
    // is greedy and backtracks: the longest user first; with a `:` after it, the password runs
    // to the next `@`; without one, the user ends at the last `@` before any `:` or `/`.
    let user_end = rest.find([':', '/']).unwrap_or(rest.len());
    let mut rest = rest;
    if rest[user_end..].starts_with(':')
        && let Some(at) = rest[user_end + 1..].find('@')
    {
        p.username = Some(rest[..user_end].to_string());
        p.password = Some(rest[user_end + 1..user_end + 1 + at].to_string());
        rest = &rest[user_end + 1 + at + 1..];
    } else if let Some(at) = rest[..user_end].rfind('@') {
        p.username = Some(rest[..at].to_string());
        rest = &rest[at + 1..];
    }
    // The host: `[ipv6]` (up to the last `]` before a `/` or `?`), else `[^/:\?]+`.
    let segment_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let bracketed = rest
        .strip_prefix('[')
        .and_then(|r| r[..segment_end - 1].rfind(']').filter(|&i| i > 0));
    if let Some(close) = bracketed {
        p.host = Some(rest[1..1 + close].to_string());
        rest = &rest[close + 2..];
    } else {
        let end = rest.find(['/', ':', '?']).unwrap_or(rest.len());
        if end > 0 {
            p.host = Some(rest[..end].to_string());
            rest = &rest[end..];
        }
    }
    if let Some(r) = rest.strip_prefix(':') {
        let end = r.find(['/', '?']).unwrap_or(r.len());
        p.port = Some(r[..end].to_string());
        rest = &r[end..];
    }
    if let Some(r) = rest.strip_prefix('/') {
        let end = r.find('?').unwrap_or(r.len());
        p.database = Some(r[..end].to_string());
        rest = &r[end..];
    }
    if let Some(r) = rest.strip_prefix('?') {
        p.query = Some(r.split('\n').next().unwrap_or_default().to_string());
    }
    Some(p)
}

/// Python's `int(str)` for a port: white space around, a sign, digits with single `_` between.
pub(crate) fn python_int(s: &str) -> Option<i64> {
    let s = s.trim();
    let (negative, digits) = match s.as_bytes().first()? {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    if digits.is_empty()
        || digits.starts_with('_')
        || digits.ends_with('_')
        || digits.contains("__")
        || !digits.chars().all(|c| c.is_ascii_digit() || c == '_')
    {
        return None;
    }
    let n: i64 = digits.replace('_', "").parse().ok()?;
    Some(if negative { -n } else { n })
}

/// Python's `urllib.parse.unquote`: `%XX` decoded, a `%` without two hex digits kept, the
/// bytes read as UTF-8 with replacement.
fn unquote(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// Python's `parse_qsl` as SQLAlchemy calls it: `&`-separated, `+` is a space, pairs without
/// `=` or with an empty value dropped.
fn query_pairs(query: &str) -> Vec<(String, String)> {
    let plus = |s: &str| unquote(&s.replace('+', " "));
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| (plus(k), plus(v)))
        .collect()
}

/// Open WebUI's `extract_ssl_params_from_url` and `reattach_ssl_params_to_url`: the first
/// non-empty `sslmode`, else `ssl`, becomes `sslmode` (verbatim: `ssl=true` is no libpq mode,
/// so the app fails on it, and so does the gate); the first `sslrootcert`, `sslcert`, `sslkey`
/// and `sslcrl` are kept.
fn open_webui_ssl(pairs: Vec<(String, String)>) -> Vec<(String, String)> {
    const FILES: [&str; 4] = ["sslrootcert", "sslcert", "sslkey", "sslcrl"];
    let first = |key: &str| pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
    let mode = first("sslmode").or_else(|| first("ssl"));
    let files: Vec<(String, String)> = FILES
        .iter()
        .filter_map(|k| first(k).map(|v| (k.to_string(), v)))
        .collect();
    let mut out: Vec<(String, String)> = pairs
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "sslmode" | "ssl") && !FILES.contains(&k.as_str()))
        .cloned()
        .collect();
    out.extend(mode.map(|m| ("sslmode".to_string(), m)));
    out.extend(files);
    out
}

/// A value in libpq's key/value form: single quotes, `\` before `\` and `'`, and before `/`
/// too, so that no value holds `://` (the gate takes a string with `://` for a URL).
fn quote(v: &str) -> String {
    let mut out = String::with_capacity(v.len() + 2);
    out.push('\'');
    for c in v.chars() {
        if matches!(c, '\\' | '\'' | '/') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

#[cfg(test)]
mod tests;
