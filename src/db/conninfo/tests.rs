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
    let u = ConnUrl::parse("postgresql+psycopg2://app:p%40ss@/db?host=/run/postgresql").unwrap();
    let o = PgConnectOptions::from_str(&u.hosts[0].url).unwrap();
    assert_eq!(o.get_username(), "app");
    assert_eq!(o.get_database(), Some("db"));
    assert_eq!(
        o.get_socket().map(|p| p.display().to_string()).as_deref(),
        Some("/run/postgresql")
    );
    assert!(u.hosts[0].url.contains("password=p%40ss"), "{:?}", u.hosts);
}

#[test]
fn the_key_value_form_reads_as_libpq_reads_it() {
    let u = ConnUrl::parse(
        "host=db.internal port = 5433 dbname=app user=u password='p w\\'d' sslmode=require connect_timeout=7",
    )
    .unwrap();
    assert_eq!(u.attempt_cap, Some(Duration::from_secs(7)));
    let o = PgConnectOptions::from_str(&u.hosts[0].url).unwrap();
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
        let url = with(q).unwrap().hosts[0].url.clone();
        assert!(url.contains(&format!("sslmode={mode}")), "{q}: {url}");
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
    let url = &u.hosts[0].url;
    assert!(!url.contains("connect_timeout") && !url.contains("application_name"));
    assert!(url.contains("sslmode=require"), "{url}");
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
        ("target_session_attrs=secondary", "prefer-standby"),
        ("load_balance_hosts=yes", "random"),
    ] {
        let m = usage(&format!("postgresql://u:hunter2@db/app?{q}"));
        let key = q.split('=').next().unwrap();
        assert!(m.contains(key) && m.contains(says), "{q}: {m}");
        assert!(!m.contains("hunter2"), "{m}");
    }
    for ok in [
        "any",
        "read-write",
        "read-only",
        "primary",
        "standby",
        "prefer-standby",
    ] {
        ConnUrl::parse(&format!("postgresql://db/app?target_session_attrs={ok}")).unwrap();
    }
}

/// Host `i`'s options.
fn host(u: &ConnUrl, i: usize) -> PgConnectOptions {
    PgConnectOptions::from_str(&u.hosts[i].url).unwrap()
}

#[test]
fn a_host_list_is_one_url_per_host_in_libpqs_order_with_per_host_ports() {
    let u = ConnUrl::parse(
        "postgresql://app:p%40ss@db1:5433,[2001:db8::1]:5434,db3/app?target_session_attrs=read-write&sslmode=require",
    )
    .unwrap();
    assert_eq!(u.attrs, SessionAttrs::ReadWrite);
    let seen: Vec<(String, u16)> = (0..3)
        .map(|i| {
            let o = host(&u, i);
            (o.get_host().to_string(), o.get_port())
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("db1".to_string(), 5433),
            ("2001:db8::1".to_string(), 5434),
            // No port of its own: libpq's default (PGPORT, else 5432).
            (
                "db3".to_string(),
                host(&ConnUrl::parse("postgresql://db3/app").unwrap(), 0).get_port()
            ),
        ]
    );
    let shown: Vec<&str> = u.hosts.iter().map(|h| h.shown.as_str()).collect();
    assert_eq!(shown, ["db1:5433", "[2001:db8::1]:5434", "db3"]);
    for i in 0..3 {
        let o = host(&u, i);
        assert_eq!((o.get_username(), o.get_database()), ("app", Some("app")));
        assert!(
            u.hosts[i].url.contains("password=p%40ss"),
            "{:?}",
            u.hosts[i]
        );
        assert!(
            u.hosts[i].url.contains("sslmode=require"),
            "{:?}",
            u.hosts[i]
        );
    }
    // The key/value form: one port for all hosts, or one each.
    let kv = ConnUrl::parse("host=a,b,c port=6000 dbname=app").unwrap();
    assert!((0..3).all(|i| host(&kv, i).get_port() == 6000));
    let kv =
        ConnUrl::parse("host=a,b port=6001,6002 dbname=app load_balance_hosts=random").unwrap();
    assert_eq!(
        (host(&kv, 0).get_port(), host(&kv, 1).get_port()),
        (6001, 6002)
    );
    assert!(kv.load_balance);
    // A query's host overrides the authority's, as in libpq.
    let q = ConnUrl::parse("postgresql://u@ignored/app?host=db1,db2&port=1,2").unwrap();
    assert_eq!(q.hosts.len(), 2);
    assert_eq!(host(&q, 1).get_host(), "db2");
    let m = usage("postgresql://u:hunter2@a,b,c/app?port=1,2");
    assert!(
        m.contains("2 ports for 3 hosts") && !m.contains("hunter2"),
        "{m}"
    );
    let m = usage("postgresql://u:hunter2@a:5432,b:x/app");
    assert!(m.contains("invalid port") && !m.contains("hunter2"), "{m}");
    assert!(usage("host=a,,b").contains("empty host"));
}

#[test]
fn libpq_decodes_only_percent_escapes_in_a_url() {
    let u = ConnUrl::parse("postgresql://u:a+b%2Bc@db/app?application_name=a+b").unwrap();
    assert!(
        u.hosts[0].url.contains("password=a%2Bb%2Bc"),
        "{:?}",
        u.hosts
    );
    assert_eq!(u.application_name.as_deref(), Some("a+b"));
    // A Unix socket's directory, percent-encoded in the host part.
    let u = ConnUrl::parse("postgresql://u@%2Frun%2Fpostgresql:5433/app").unwrap();
    assert_eq!(
        host(&u, 0)
            .get_socket()
            .map(|p| p.display().to_string())
            .as_deref(),
        Some("/run/postgresql")
    );
}

#[test]
fn a_key_value_string_with_a_url_in_a_quoted_value_stays_key_value_and_hidden() {
    let kv = "host=db dbname=app user=u password='p://w@d'";
    let u = ConnUrl::parse(kv).unwrap();
    assert_eq!(host(&u, 0).get_host(), "db");
    assert_eq!(redact_url(kv), "host=db dbname=app user=u password=***");
}

mod sweep {
    use super::*;
    use proptest::prelude::*;

    /// Pieces a hostile connection string is made of: libpq's keywords and separators, percent
    /// escapes (a NUL among them), quotes, and arbitrary text.
    fn piece() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("postgres://".to_string()),
            Just("postgresql+psycopg2://".to_string()),
            Just("@".to_string()),
            Just(":".to_string()),
            Just("/".to_string()),
            Just("?".to_string()),
            Just("&".to_string()),
            Just("=".to_string()),
            Just(",".to_string()),
            Just("'".to_string()),
            Just("\\".to_string()),
            Just(" ".to_string()),
            Just("%00".to_string()),
            Just("%zz".to_string()),
            Just("[::1]".to_string()),
            Just("host=".to_string()),
            Just("port=".to_string()),
            Just("sslmode=".to_string()),
            Just("service=".to_string()),
            Just("connect_timeout=".to_string()),
            Just("target_session_attrs=".to_string()),
            Just("options=-c statement_timeout=1".to_string()),
            "[0-9]{1,7}",
            any::<String>(),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 4000, .. ProptestConfig::default() })]

        /// No input panics, and every refusal is one line.
        #[test]
        fn any_connection_string_parses_or_is_refused_in_one_line(
            pieces in proptest::collection::vec(piece(), 0..12)
        ) {
            let raw: String = pieces.concat();
            if let Err(e) = ConnUrl::parse(&raw) {
                let line = e.to_string();
                prop_assert!(!line.contains('\n'), "{line:?}");
                prop_assert!(!line.is_empty());
            }
        }
    }
}
