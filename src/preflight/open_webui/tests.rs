//! Open WebUI's resolution, case by case. The expected parts of `parse` were checked against
//! SQLAlchemy 2.0.50's `make_url` and `create_connect_args` in Open WebUI 0.11.0's venv.

use super::*;
use crate::db::ConnUrl;

const PW: &str = "s3cret-pw";

fn resolve(vars: &[(&str, &str)]) -> AppDatabase {
    let owned: Vec<(String, String)> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    database(&move |name: &str| {
        owned
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    })
}

/// The parts, with `over` replacing or adding variables.
fn parts(over: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
    let mut v = vec![
        ("DATABASE_TYPE", "postgresql"),
        ("DATABASE_USER", "app"),
        ("DATABASE_PASSWORD", PW),
        ("DATABASE_HOST", "db.internal"),
        ("DATABASE_PORT", "5433"),
        ("DATABASE_NAME", "owui"),
    ];
    for (k, val) in over {
        v.retain(|(have, _)| have != k);
        v.push((k, val));
    }
    v
}

fn conninfo(vars: &[(&str, &str)]) -> String {
    let db = resolve(vars);
    let c = db
        .conninfo
        .unwrap_or_else(|p| panic!("{vars:?}: expected a connection, got {p:?}"));
    ConnUrl::parse(&c).unwrap_or_else(|e| panic!("the gate cannot read {c}: {e}"));
    c
}

fn not_postgres(vars: &[(&str, &str)]) -> String {
    match resolve(vars).conninfo {
        Err(Problem::NotPostgres(why)) => why,
        other => panic!("{vars:?}: expected NotPostgres, got {other:?}"),
    }
}

fn misread(vars: &[(&str, &str)]) -> String {
    match resolve(vars).conninfo {
        Err(Problem::Misread(why)) => {
            assert!(!why.contains(PW), "never the password: {why}");
            why
        }
        other => panic!("{vars:?}: expected Misread, got {other:?}"),
    }
}

#[test]
fn the_parts_alone_and_the_parts_over_another_database_url() {
    let want =
        "host='db.internal' port='5433' user='app' password='s3cret-pw' dbname='owui'".to_string();
    assert_eq!(resolve(&parts(&[])).source, Source::Parts);
    assert_eq!(conninfo(&parts(&[])), want);
    let with_url = parts(&[("DATABASE_URL", "postgresql://other:pw@elsewhere:5432/other")]);
    assert_eq!(resolve(&with_url).source, Source::Parts, "the parts win");
    assert_eq!(conninfo(&with_url), want);
}

#[test]
fn all_five_parts_or_none_then_database_url_then_sqlite() {
    // DATABASE_NAME missing: Open WebUI ignores the other parts and reads DATABASE_URL.
    let mut half = parts(&[("DATABASE_URL", "postgresql://u@h/fromurl")]);
    half.retain(|(k, _)| *k != "DATABASE_NAME");
    assert_eq!(resolve(&half).source, Source::Url);
    assert_eq!(conninfo(&half), "host='h' user='u' dbname='fromurl'");
    // An empty part counts as unset (Python's `all()` of the strings).
    let empty = parts(&[("DATABASE_HOST", ""), ("DATABASE_URL", "postgresql://h/u")]);
    assert_eq!(resolve(&empty).source, Source::Url);
    // No DATABASE_URL either: Open WebUI's SQLite, and the message names what is missing.
    half.retain(|(k, _)| *k != "DATABASE_URL");
    assert_eq!(resolve(&half).source, Source::Default);
    let why = not_postgres(&half);
    assert!(
        why.starts_with("DATABASE_URL is unset, so Open WebUI uses its SQLite file (DATABASE_NAME unset or empty"),
        "{why}"
    );
    let why = not_postgres(&[]);
    assert_eq!(
        why,
        "DATABASE_URL is unset, so Open WebUI uses its SQLite file"
    );
    assert!(not_postgres(&[("DATABASE_URL", "")]).starts_with("DATABASE_URL is empty"));
    let why = not_postgres(&[("DATABASE_TYPE", "sqlite+sqlcipher")]);
    assert!(why.contains("SQLCipher"), "{why}");
}

#[test]
fn user_and_password_as_open_webui_puts_them_in() {
    // No password (unset or empty): no password in the URL; libpq then reads PGPASSWORD.
    for pw in [None, Some("")] {
        let mut v = parts(&[]);
        v.retain(|(k, _)| *k != "DATABASE_PASSWORD");
        if let Some(pw) = pw {
            v.push(("DATABASE_PASSWORD", pw));
        }
        assert_eq!(
            conninfo(&v),
            "host='db.internal' port='5433' user='app' dbname='owui'"
        );
    }
    // A password without a user: `:pw@`, an empty user (libpq's default user).
    let mut v = parts(&[]);
    v.retain(|(k, _)| *k != "DATABASE_USER");
    assert_eq!(
        conninfo(&v),
        "host='db.internal' port='5433' password='s3cret-pw' dbname='owui'"
    );
    // Characters SQLAlchemy reads as part of the password, unencoded: `/`, `:`, `?`, `#`, and
    // quotes and backslashes for the key/value form; `://` is escaped so the gate does not take
    // the string for a URL.
    let c = conninfo(&parts(&[("DATABASE_PASSWORD", r"a/b:c?d#e'f\g://h")]));
    assert!(c.contains(r"password='a\/b:c?d#e\'f\\g:\/\/h'"), "{c}");
    // Percent-escapes are decoded, as SQLAlchemy decodes them: %40 is how to write an `@`.
    let c = conninfo(&parts(&[("DATABASE_PASSWORD", "p%40ss%zz")]));
    assert!(c.contains("password='p@ss%zz'"), "{c}");
    // An `@` unencoded ends the password early: Open WebUI would connect to host "ss@db...".
    let why = misread(&parts(&[("DATABASE_PASSWORD", "s3cret-pw@x")]));
    assert!(
        why.starts_with("DATABASE_PASSWORD is not what SQLAlchemy reads back"),
        "{why}"
    );
    assert!(why.contains("%40"), "{why}");
    let why = misread(&parts(&[("DATABASE_USER", "a:b")]));
    assert!(why.starts_with("DATABASE_USER "), "{why}");
    let why = misread(&parts(&[("DATABASE_USER", "a/b")]));
    assert!(why.starts_with("DATABASE_USER "), "{why}");
}

#[test]
fn type_host_port_and_name() {
    // postgres:// is rewritten; SQLAlchemy's drivers pass; other types are not PostgreSQL.
    for ty in [
        "postgres",
        "postgresql",
        "postgresql+psycopg2",
        "postgresql+psycopg",
    ] {
        conninfo(&parts(&[("DATABASE_TYPE", ty)]));
    }
    for ty in ["sqlite", "mysql", "POSTGRESQL", "postgresql+"] {
        let why = not_postgres(&parts(&[("DATABASE_TYPE", ty)]));
        assert!(
            why.starts_with("DATABASE_TYPE is not PostgreSQL"),
            "{ty}: {why}"
        );
    }
    assert!(conninfo(&parts(&[("DATABASE_HOST", "[::1]")])).starts_with("host='::1' "));
    assert!(misread(&parts(&[("DATABASE_HOST", "::1")])).starts_with("DATABASE_HOST "));
    assert!(misread(&parts(&[("DATABASE_HOST", "/run/postgresql")])).starts_with("DATABASE_HOST "));
    assert!(
        misread(&parts(&[("DATABASE_PORT", "x5432")])).starts_with("DATABASE_PORT is not a port")
    );
    assert!(
        misread(&parts(&[("DATABASE_PORT", "70000")])).starts_with("DATABASE_PORT is not a port")
    );
    assert!(conninfo(&parts(&[("DATABASE_PORT", "5_433")])).contains("port='5433'"));
    // A query in DATABASE_NAME is the URL's query.
    let c = conninfo(&parts(&[("DATABASE_NAME", "owui?sslmode=require")]));
    assert!(c.ends_with("dbname='owui' sslmode='require'"), "{c}");
}

#[test]
fn database_url_as_sqlalchemy_reads_it() {
    let url = |u: &str| conninfo(&[("DATABASE_URL", u)]);
    assert_eq!(
        url("postgres://u:p@h:5432/db"),
        "host='h' port='5432' user='u' password='p' dbname='db'"
    );
    // A `/` in the password is the password for SQLAlchemy (libpq's URL parser would stop).
    assert_eq!(
        url("postgresql://u:p/w@h/db"),
        r"host='h' user='u' password='p\/w' dbname='db'"
    );
    // An `@` is not: the host would be "ss@h".
    let why = misread(&[("DATABASE_URL", "postgresql://u:s3cret-pw@ss@h/db")]);
    assert!(why.contains("%40"), "{why}");
    // A Unix socket folder in the query; the query wins over the URL's parts.
    assert_eq!(
        url("postgresql+psycopg2://u:p@/db?host=/run/postgresql"),
        r"user='u' password='p' dbname='db' host='\/run\/postgresql'"
    );
    assert_eq!(
        url("postgresql://h/db?dbname=other"),
        "host='h' dbname='other'"
    );
    // Open WebUI's SSL handling: ssl= becomes sslmode= verbatim (so ssl=true fails there and
    // here), `+` is a space, empty values are dropped, port 0 is no port.
    assert!(url("postgresql://h/db?ssl=require").ends_with("sslmode='require'"));
    let c = resolve(&[("DATABASE_URL", "postgresql://h/db?ssl=true")])
        .conninfo
        .unwrap();
    assert!(c.ends_with("sslmode='true'"), "{c}");
    assert!(ConnUrl::parse(&c).is_err(), "libpq has no sslmode=true");
    assert_eq!(
        url("postgresql://h:0/db?application_name=a+b&options="),
        "host='h' dbname='db' application_name='a b'"
    );
    for other in [
        "sqlite:////data/webui.db",
        "POSTGRESQL://h/db",
        "postgres+psycopg2://h/db",
        "h/db",
    ] {
        let why = not_postgres(&[("DATABASE_URL", other)]);
        assert_eq!(why, "DATABASE_URL has another scheme", "{other}");
    }
    assert!(misread(&[("DATABASE_URL", "postgresql://h:/db")]).contains("is empty"));
}

#[test]
fn the_pattern_matches_sqlalchemys() {
    let p = |u: &str| {
        let p = parse(u).unwrap();
        (p.username, p.password, p.host, p.port, p.database, p.query)
    };
    let s = |v: &str| Some(v.to_string());
    assert_eq!(
        p("postgresql://u:p@ss@h:5432/db"),
        (s("u"), s("p"), s("ss@h"), s("5432"), s("db"), None)
    );
    assert_eq!(
        p("postgresql://u@x@h:5432/db"),
        (s("u@x"), None, s("h"), s("5432"), s("db"), None)
    );
    assert_eq!(
        p("postgresql://a:b:pw@h:1/d"),
        (s("a"), s("b:pw"), s("h"), s("1"), s("d"), None)
    );
    assert_eq!(
        p("postgresql://u@[::1]x:5/db"),
        (s("u"), None, s("::1"), None, None, None)
    );
    assert_eq!(
        p("postgresql://u@h:5432/db?x=a@b"),
        (s("u@h"), s("5432/db?x=a"), s("b"), None, None, None)
    );
    assert_eq!(
        p("postgresql://u:p%41@h:5/db%20x?sslmode=require"),
        (
            s("u"),
            s("p%41"),
            s("h"),
            s("5"),
            s("db%20x"),
            s("sslmode=require")
        )
    );
    assert_eq!(p("sqlite:///"), (None, None, None, None, s(""), None));
    assert!(parse("no scheme").is_none());
    assert_eq!(python_int(" +5_432 "), Some(5432));
    assert_eq!(python_int("5__432"), None);
    assert_eq!(unquote("%e2%82%ac%4"), "€%4");
}

/// `unquote` as the hand-written decoder it replaced returned (recorded by running it): valid
/// escapes in either case, a `%` without two hex digits kept as is, bytes that are not UTF-8
/// replaced, and `+` left alone (only `query_pairs` turns it into a space).
#[test]
fn unquote_keeps_what_the_hand_written_decoder_returned() {
    for (escaped, decoded) in [
        ("p%40ss", "p@ss"),
        ("a%3Ab%2Fc", "a:b/c"),
        ("%e2%82%ac", "€"),
        ("%E2%82%AC", "€"),
        ("%C3%A9t%C3%A9", "été"),
        ("é%41", "éA"),
        ("%00", "\0"),
        ("100%", "100%"),
        ("%4", "%4"),
        ("%2", "%2"),
        ("%zz", "%zz"),
        ("%4g", "%4g"),
        ("%+1", "%+1"),
        ("%%", "%%"),
        ("%%41", "%A"),
        ("%ff", "\u{fffd}"),
        ("%e2%82", "\u{fffd}"),
        ("a+b", "a+b"),
    ] {
        assert_eq!(unquote(escaped), decoded, "{escaped:?}");
    }
}
