//! Connection strings safe to print: passwords replaced by `***` in every form the gate reads.

use super::conninfo::key_values;

/// The URL (or key/value string, or for the empty string the libpq environment) with any
/// password replaced by `***`, for messages and logs.
pub(crate) fn redact_url(url: &str) -> String {
    if url.trim().is_empty() {
        return describe_environment();
    }
    if !url.contains("://") && url.contains('=') {
        return redact_key_values(url);
    }
    // By hand rather than with the url crate, which cannot read a host list.
    let Some((scheme, rest)) = url.split_once("://") else {
        // Unparseable: we cannot tell where a password would be, so show nothing of it.
        return "(unparseable URL, not shown)".to_string();
    };
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match rest.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (rest, None),
    };
    let mut shown = format!("{scheme}://");
    match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => {
            match userinfo.split_once(':') {
                Some((user, _)) => shown.push_str(&format!("{user}:***@")),
                None => shown.push_str(&format!("{userinfo}@")),
            }
            shown.push_str(hosts);
        }
        None => shown.push_str(authority),
    }
    if let Some(path) = path {
        shown.push('/');
        shown.push_str(path);
    }
    if let Some(query) = query {
        let params: Vec<String> = query
            .split('&')
            .map(|param| match param.split_once('=') {
                Some((k, _))
                    if percent_encoding::percent_decode_str(k)
                        .decode_utf8_lossy()
                        .eq_ignore_ascii_case("password") =>
                {
                    format!("{k}=***")
                }
                _ => param.to_string(),
            })
            .collect();
        shown.push('?');
        shown.push_str(&params.join("&"));
    }
    shown
}

/// Removes `secret` (the raw URL, which may hold a password) from a message built by a library.
pub(super) fn scrub(message: &str, secret: &str) -> String {
    if secret.is_empty() {
        message.to_string()
    } else {
        message.replace(secret, "(URL not shown)")
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

#[cfg(test)]
mod tests {
    use super::*;

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
