//! The parameters' values: libpq's key/value syntax, `sslmode` and drivers' `ssl`,
//! `connect_timeout`, and what to write instead of a parameter the gate cannot honour.

use std::time::Duration;

use crate::error::{Error, Result};

/// The values of `sslmode`, as libpq spells them.
pub(in crate::db) const SSL_MODES: [&str; 6] = [
    "disable",
    "allow",
    "prefer",
    "require",
    "verify-ca",
    "verify-full",
];

/// libpq's key/value form: `key = value` pairs separated by white space; a value may be in
/// single quotes (to hold spaces or be empty), and `\\` escapes the next character. Errors name
/// the key, never a value.
pub(in crate::db) fn key_values(s: &str) -> std::result::Result<Vec<(String, String)>, String> {
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

/// The `sslmode` that `key=value` asks for: `sslmode` takes libpq's names; `ssl` (asyncpg and
/// other drivers) takes them too, and true/false.
pub(in crate::db) fn ssl_mode(key: &str, value: &str) -> Result<String> {
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
pub(in crate::db) fn connect_timeout(value: &str) -> Result<Option<Duration>> {
    let secs: i64 = value.trim().parse().map_err(|_| {
        Error::Usage(format!(
            "connect_timeout={value:?} in the database URL is not a whole number of seconds: write e.g. connect_timeout=10"
        ))
    })?;
    Ok((secs > 0).then(|| Duration::from_secs(secs.max(2) as u64)))
}

/// The message for a query parameter the gate cannot honour: its name and what to write
/// instead, never its value.
pub(in crate::db) fn unsupported_parameter(key: &str) -> String {
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
