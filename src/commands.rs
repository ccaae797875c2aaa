//! The commands that gate something: `migrate`, `run`, `wait` and `reset`. Each reads top to
//! bottom: check the flags, the programs and the local preflight rules, wait for a turn
//! ([`crate::waiting`]), pass the preflight checks that need the database ([`crate::preflight`]),
//! then act as a follower or as the holder ([`crate::holding`]).

use tracing::info;

use crate::child::{self, Program};
use crate::config::{self, DbArgs, MigrateArgs, ResetArgs, RunArgs, WaitArgs};
use crate::db::close;
use crate::error::{EXIT_OK, Error, Result};
use crate::holding::Holding;
use crate::ledger::Outcome;
use crate::lock;
use crate::preflight::{Mode, Preflight, Store};
use crate::replica::Replica;
use crate::sessions;
use crate::termination;
use crate::waiting::{Turn, Want, wait_turn};

/// `migrate -- CMD`: the holder runs CMD with the flag on; every replica exits 0 once done.
pub(crate) async fn migrate(args: MigrateArgs) -> Result<i32> {
    let flag = args.gate.flag.flag()?;
    check_program(&args.command)?;
    let release = args.gate.release.resolve()?;
    let preflight = Preflight::new(
        &args.gate.preflight.settings(),
        Mode::Migrate,
        release.as_deref(),
    )?;
    let replica = replica_for(&args.gate.db, release, &preflight)?.for_holder();
    let bounds = args.holder.bounds(args.gate.preflight.preset);
    let kill_grace = bounds.kill_grace;
    let want = Want::Lock {
        kill_grace,
        slots: args.gate.waiting.waiting_connections,
        wait_timeout: args.gate.waiting.wait_timeout,
    };
    match wait_turn(&replica, want, args.gate.waiting.wait_timeout).await? {
        Turn::Follower { seen, conn } => {
            preflight.follower(&replica, seen, conn).await?;
            termination::write_success(&format!(
                "{} is done; this replica did not migrate",
                release_name(&replica)
            ));
            Ok(EXIT_OK)
        }
        Turn::Holder(holding) => {
            let holding = holder_preflight(&preflight, &replica, *holding)
                .await?
                .no_other_releases(
                    &replica,
                    bounds.other_releases,
                    args.gate.waiting.wait_timeout,
                )
                .await?;
            let program = Program::new(&args.command, (&flag.name, &flag.on));
            let holding = holding
                .migrate(&replica, &program, "migration command", &bounds)
                .await?;
            let after = holding
                .previous_failure()
                .map(|p| format!(", after attempt {p} had failed"))
                .unwrap_or_default();
            holding
                .complete(
                    &replica,
                    Outcome::Done,
                    Some(0),
                    "migration command exited 0",
                )
                .await?;
            termination::write_success(&format!(
                "migrated {} (this replica held the lock; the migration command exited 0{after})",
                release_name(&replica)
            ));
            Ok(EXIT_OK)
        }
    }
}

/// `run [--migrate CMD] [--ready-*] -- APP`: gate the start of APP.
pub(crate) async fn run(args: RunArgs) -> Result<i32> {
    let flag = args.gate.flag.flag()?;
    let probe = args.probe()?;
    let migrate_argv = args
        .migrate
        .as_deref()
        .map(config::split_command)
        .transpose()?;
    if probe.is_none() && migrate_argv.is_none() {
        return Err(Error::Usage(
            "run needs --migrate CMD, a readiness probe (--ready-http, --ready-tcp, --ready-sql), or both: \
             otherwise the gate cannot tell when the migration is done"
                .into(),
        ));
    }
    check_program(&args.command)?;
    if let Some(argv) = &migrate_argv {
        check_program(argv)?;
    }
    let release = args.gate.release.resolve()?;
    let mode = Mode::Run {
        migrate: migrate_argv.is_some(),
    };
    let preflight = Preflight::new(&args.gate.preflight.settings(), mode, release.as_deref())?;
    let replica = replica_for(&args.gate.db, release, &preflight)?.for_holder();
    let bounds = args.holder.bounds(args.gate.preflight.preset);
    let kill_grace = bounds.kill_grace;
    // The app started with the flag off is no attempt: its sessions carry the release only.
    let app_off = Program::new(&args.command, (&flag.name, &flag.off))
        .with_env(sessions::follower_env(replica.lock(), replica.release()));
    let want = Want::Lock {
        kill_grace,
        slots: args.gate.waiting.waiting_connections,
        wait_timeout: args.gate.waiting.wait_timeout,
    };
    let mut holding = match wait_turn(&replica, want, args.gate.waiting.wait_timeout).await? {
        Turn::Follower { seen, conn } => {
            preflight.follower(&replica, seen, conn).await?;
            return Err(child::exec(&app_off));
        }
        Turn::Holder(holding) => {
            holder_preflight(&preflight, &replica, *holding)
                .await?
                .no_other_releases(
                    &replica,
                    bounds.other_releases,
                    args.gate.waiting.wait_timeout,
                )
                .await?
        }
    };

    if let Some(argv) = &migrate_argv {
        let program = Program::new(argv, (&flag.name, &flag.on));
        holding = holding
            .migrate(&replica, &program, "--migrate command", &bounds)
            .await?;
    }

    let Some(probe) = probe else {
        holding
            .complete(
                &replica,
                Outcome::Done,
                Some(0),
                "--migrate command exited 0",
            )
            .await?;
        return Err(child::exec(&app_off));
    };

    // The holder starts APP itself and keeps the lock until APP is ready: with the flag on if
    // APP migrates on start-up, off if --migrate already did.
    let app = Program::new(
        &args.command,
        (
            &flag.name,
            if migrate_argv.is_some() {
                &flag.off
            } else {
                &flag.on
            },
        ),
    );
    let mut child = holding
        .start_app(&replica, &app, &probe, args.ready_timeout, &bounds)
        .await?;
    // Like tini: stay as APP's parent, forward signals, reap, exit with its code.
    let code = child.wait().await;
    child.finish();
    info!(code, "the app exited");
    Ok(code)
}

/// `wait --release R [-- CMD]`: block until R is done, then exit 0 or exec CMD (flag off).
pub(crate) async fn wait(args: WaitArgs) -> Result<i32> {
    let flag = args.gate.flag.flag()?;
    let release = args.release()?;
    if !args.command.is_empty() {
        check_program(&args.command)?;
    }
    let preflight = Preflight::new(&args.gate.preflight.settings(), Mode::Wait, Some(&release))?;
    let replica = replica_for(&args.gate.db, Some(release), &preflight)?;
    let want = Want::Done {
        slots: args.gate.waiting.waiting_connections,
    };
    if let Turn::Follower { seen, conn } =
        wait_turn(&replica, want, args.gate.waiting.wait_timeout).await?
    {
        preflight.follower(&replica, seen, conn).await?;
    }
    if args.command.is_empty() {
        termination::write_success(&format!("{} is done", release_name(&replica)));
        return Ok(EXIT_OK);
    }
    Err(child::exec(
        &Program::new(&args.command, (&flag.name, &flag.off))
            .with_env(sessions::follower_env(replica.lock(), replica.release())),
    ))
}

/// `reset --release R`: forget R so that it migrates again. Takes the lock (refusing if anyone
/// holds it), deletes the release's rows and its `--same-env` fingerprints, logs them, frees
/// the lock. `reset --release R --env`: forget only the fingerprints (no lock needed: the
/// release stays done, and the next replica sets them anew).
pub(crate) async fn reset(args: ResetArgs) -> Result<i32> {
    let release = args.release;
    let replica = Replica::new(args.db.target()?, Some(release.clone()))?.for_holder();
    let store = Store::new(&replica.target.schema, replica.lock());
    let mut conn = replica.db.connect().await?;
    if args.env {
        let forgotten = match conn.pg().await {
            Ok(c) => store.forget(c, &release).await,
            Err(e) => Err(e),
        };
        close(conn).await;
        let n = forgotten.map_err(|e| replica.db.fail(&e, "during reset --env"))?;
        info!(
            release,
            variables = n,
            "forgot the release's --same-env fingerprints; the next replica sets them anew"
        );
        termination::write_success(&format!(
            "forgot the --same-env fingerprints of {n} variable(s) of release {release:?}"
        ));
        return Ok(EXIT_OK);
    }
    let result = async {
        let (_, scope) = replica.detect_route(&mut conn).await?;
        let c = conn.pg().await?;
        // Looked at before the lock: in transaction scope a missing ledger would abort the lock's
        // transaction, and then its COMMIT would silently roll back.
        if replica
            .ledger
            .attempts(c, Some(&release), 1)
            .await?
            .is_empty()
        {
            store.forget(c, &release).await?;
            return Ok(Ok(Vec::new()));
        }
        if !lock::try_acquire(c, replica.lock(), scope).await? {
            return Ok(Err(()));
        }
        let removed = replica.ledger.forget(c, &release).await?;
        lock::release(c, replica.lock(), scope).await?;
        // Outside the lock's transaction, for the same reason (its tables may not exist).
        store.forget(c, &release).await?;
        Ok::<_, sqlx::Error>(Ok(removed))
    }
    .await;
    let removed = match result {
        Ok(Ok(removed)) => removed,
        Ok(Err(())) => {
            let holder = replica.describe_holder(&mut conn).await.text;
            close(conn).await;
            return Err(Error::LockHeld {
                lock: replica.lock().to_string(),
                holder,
            });
        }
        Err(e) => return Err(replica.db.fail(&e, "during reset")),
    };
    close(conn).await;
    if removed.is_empty() {
        info!(
            release,
            "nothing recorded for this release; nothing to reset"
        );
    }
    for a in &removed {
        info!(id = a.id, release, outcome = %a.outcome, holder = %a.holder, started_at = %a.started_at, "removed");
    }
    termination::write_success(&format!(
        "reset release {release:?}: removed {} attempt(s)",
        removed.len()
    ));
    Ok(EXIT_OK)
}

/// The replica for these flags; one that compares variables reads the key with the ledger.
fn replica_for(db: &DbArgs, release: Option<String>, preflight: &Preflight) -> Result<Replica> {
    let mut replica = Replica::new(db.target()?, release)?;
    if preflight.compares() {
        replica.ledger.read_env_key();
    }
    Ok(replica)
}

/// The holder's preflight, before it migrates: a refusal is recorded as a failed attempt (which
/// frees the lock for a replica that is configured right).
async fn holder_preflight(
    preflight: &Preflight,
    replica: &Replica,
    holding: Holding,
) -> Result<Holding> {
    match preflight.holder(replica).await {
        Ok(()) => Ok(holding),
        Err(e) => {
            holding
                .complete(
                    replica,
                    Outcome::Failed,
                    Some(e.exit_code()),
                    &e.to_string(),
                )
                .await?;
            Err(e)
        }
    }
}

/// "release \"R\"", or what serial mode is, for summaries.
fn release_name(replica: &Replica) -> String {
    match replica.release() {
        Some(r) => format!("release {r:?}"),
        None => "the migration (no --release: serial mode)".into(),
    }
}

/// Stops with 127/126 before taking any lock if `argv[0]` cannot be found or executed.
fn check_program(argv: &[String]) -> Result<()> {
    let Some(program) = argv.first() else {
        return Err(Error::Usage("no command given after `--`".into()));
    };
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &std::path::Path| {
        std::fs::metadata(p)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if program.contains('/') {
        let path = std::path::Path::new(program);
        if !path.exists() {
            return Err(Error::CommandNotFound {
                program: program.clone(),
            });
        }
        if !executable(path) {
            return Err(Error::CommandNotExecutable {
                program: program.clone(),
                source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
            });
        }
        return Ok(());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&path).any(|dir| executable(&dir.join(program))) {
        Ok(())
    } else {
        Err(Error::CommandNotFound {
            program: program.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_program_is_127_and_unexecutable_is_126() {
        let e = check_program(&["definitely-not-a-command-xyz".into()]).unwrap_err();
        assert_eq!(e.exit_code(), 127);
        let file = std::env::temp_dir().join(format!("mg-not-executable-{}", std::process::id()));
        std::fs::write(&file, "data").unwrap();
        let e = check_program(&[file.to_string_lossy().into_owned()]).unwrap_err();
        let _ = std::fs::remove_file(&file);
        assert_eq!(e.exit_code(), 126);
        assert!(check_program(&["sh".into()]).is_ok());
    }
}
