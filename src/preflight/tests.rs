//! Unit tests of the flags and the presets' local rules ([`super::compile`]): no database.

use super::presets::Context;
use super::*;

fn cx(vars: &[(&str, &str)], mode: Mode) -> Context {
    let owned: Vec<(String, String)> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Context {
        vars: Box::new(move |name| {
            owned
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        }),
        mode,
    }
}

fn args(preset: Option<Preset>) -> Settings {
    Settings {
        same_env: Vec::new(),
        on_mismatch: OnMismatch::Fail,
        preset,
        allow_older_release: false,
        shared_dir: None,
        require_shared_dir: false,
    }
}

#[test]
fn open_webui_on_sqlite_fails_and_missing_redis_only_warns() {
    let good = [
        ("DATABASE_URL", "postgresql://u@h/db"),
        ("WEBUI_SECRET_KEY", "k"),
    ];
    let p = Preflight::with_context(
        &args(Some(Preset::OpenWebui)),
        &cx(&good, Mode::Run { migrate: true }),
        Some("r1"),
    )
    .expect("Redis and the vector store only warn");
    assert!(
        p.compared
            .iter()
            .any(|c| c.name == "WEBUI_SECRET_KEY" && c.level == Level::Fail)
    );
    assert!(
        p.compared
            .iter()
            .any(|c| c.name == "REDIS_URL" && c.level == Level::Warn)
    );

    let e = Preflight::with_context(
        &args(Some(Preset::OpenWebui)),
        &cx(
            &[("DATABASE_URL", "sqlite:///data/webui.db")],
            Mode::Run { migrate: true },
        ),
        Some("r1"),
    )
    .err()
    .expect("SQLite fails");
    assert_eq!(e.exit_code(), 78);
    assert!(
        e.to_string().contains("DATABASE_URL has another scheme"),
        "{e}"
    );
    assert!(
        !e.to_string().contains("sqlite:///"),
        "never the value: {e}"
    );

    let e = Preflight::with_context(
        &args(Some(Preset::OpenWebui)),
        &cx(
            &[
                ("DATABASE_URL", "postgres://h/db"),
                ("UVICORN_WORKERS", "4"),
            ],
            Mode::Run { migrate: true },
        ),
        Some("r1"),
    )
    .err()
    .expect("local Chroma with forked workers fails");
    assert!(e.to_string().contains("UVICORN_WORKERS > 1"), "{e}");

    // Forked workers and a holder that would start the app with the flag on: every worker
    // would run Alembic at once. With --migrate (or one worker) it passes.
    let workers = |n: &str, mode| {
        Preflight::with_context(
            &args(Some(Preset::OpenWebui)),
            &cx(
                &[
                    ("DATABASE_URL", "postgres://h/db"),
                    ("VECTOR_DB", "pgvector"),
                    ("UVICORN_WORKERS", n),
                ],
                mode,
            ),
            Some("r1"),
        )
    };
    let e = workers("2", Mode::Run { migrate: false })
        .err()
        .expect("forked workers migrating on start-up fail");
    assert_eq!(e.exit_code(), 78);
    assert!(
        e.to_string()
            .contains("--migrate \"python -c 'import open_webui.config'\""),
        "{e}"
    );
    assert!(workers("2", Mode::Run { migrate: true }).is_ok());
    assert!(workers("1", Mode::Run { migrate: false }).is_ok());
}

#[test]
fn same_env_needs_a_release_and_a_valid_name() {
    let mut a = args(None);
    a.same_env = vec!["A".into()];
    let e = Preflight::with_context(&a, &cx(&[], Mode::Migrate), None)
        .err()
        .unwrap();
    assert_eq!(e.exit_code(), 64);
    a.same_env = vec!["A=B".into()];
    let e = Preflight::with_context(&a, &cx(&[], Mode::Migrate), Some("r"))
        .err()
        .unwrap();
    assert_eq!(e.exit_code(), 64);
}
