//! The commands that gate something: `migrate`, `run`, `wait` and `reset`. Each reads top to
//! bottom from its plan ([`crate::config`]): wait for a turn ([`crate::protocol`]), pass the
//! preflight checks that need the database ([`crate::preflight`]), then act as a follower or as
//! the holder ([`crate::holding`]).

use tracing::info;

use crate::child::{self, Program};
use crate::config::{Gate, Migrate, Reset, Run, Wait};
use crate::db::{Conn, close};
use crate::error::{EXIT_OK, Error, Result};
use crate::holding::{Ending, Holding};
use crate::lock;
use crate::preflight::Store;
use crate::protocol::{Decision, Role, wait_for_decision};
use crate::replica::Replica;
use crate::sessions;
use crate::termination;

/// `migrate -- CMD`: the holder runs CMD with the flag on; every replica exits 0 once done.
pub(crate) async fn migrate(plan: Migrate) -> Result<i32> {
    let Migrate {
        gate,
        application,
        holder,
        command,
    } = plan;
    let mut replica = replica_for(&gate)?.for_holder();
    replica.application = Some(application);
    let role = Role::Migrate {
        slots: gate.slots,
        plan: holder,
    };
    match wait_for_decision(&replica, role, gate.wait_timeout).await? {
        Decision::Follow { seen, conn } => {
            gate.preflight.follower(&replica, *seen, conn).await?;
            termination::write_success(&format!(
                "{} is done; this replica did not migrate",
                release_name(&replica)
            ));
            Ok(EXIT_OK)
        }
        Decision::Hold(holding) => {
            let holding = clear_to_migrate(&gate, &replica, *holding).await?;
            let flag = &gate.flag;
            let program = Program::new(&command, (&flag.name, &flag.on));
            let holding = holding
                .migrate(&replica, &program, "migration command")
                .await?;
            let after = holding
                .previous_failure()
                .map(|p| format!(", after attempt {p} had failed"))
                .unwrap_or_default();
            holding
                .end(
                    &replica,
                    Ending::done(Some(0), "migration command exited 0"),
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
pub(crate) async fn run(plan: Run) -> Result<i32> {
    let Run {
        gate,
        application,
        holder,
        migrate,
        probe,
        ready_timeout,
        first_start_env,
        command,
    } = plan;
    let flag = &gate.flag;
    let mut replica = replica_for(&gate)?.for_holder();
    replica.application = Some(application);
    // The app started with the flag off is no attempt: its sessions carry the release only.
    let app_off = Program::new(&command, (&flag.name, &flag.off))
        .with_env(sessions::app_env(replica.identity(), replica.release()));
    let role = Role::Migrate {
        slots: gate.slots,
        plan: holder,
    };
    let mut holding = match wait_for_decision(&replica, role, gate.wait_timeout).await? {
        Decision::Follow { seen, conn } => {
            gate.preflight.follower(&replica, *seen, conn).await?;
            return Err(child::exec(&app_off));
        }
        Decision::Hold(holding) => clear_to_migrate(&gate, &replica, *holding).await?,
    };

    if let Some(argv) = &migrate {
        let program = Program::new(argv, (&flag.name, &flag.on));
        holding = holding
            .migrate(&replica, &program, "--migrate command")
            .await?;
    }

    let Some(probe) = probe else {
        holding
            .end(
                &replica,
                Ending::done(Some(0), "--migrate command exited 0"),
            )
            .await?;
        return Err(child::exec(&app_off));
    };

    // The holder starts APP itself and keeps the lock until APP is ready: with the flag on if
    // APP migrates on start-up, off if --migrate already did.
    let value = if migrate.is_some() {
        &flag.off
    } else {
        &flag.on
    };
    let app = Program::new(&command, (&flag.name, value)).with_env(first_start_env.clone());
    let child = holding
        .start_app(&replica, &app, &probe, ready_timeout)
        .await?;
    if first_start_env.is_empty() {
        return Ok(parent_of(child).await);
    }
    Err(restart_as_configured(child, holder.kill_grace, &app_off).await)
}

/// The holder's first start of the app ran with `--first-start-env` and is ready: its start-up
/// writes are done and the release is recorded, the lock freed. Stops it as a platform would
/// (SIGTERM, SIGKILL after `--kill-grace`) and execs the app as configured, as a follower does.
/// Returns only if the exec fails.
async fn restart_as_configured(
    mut child: child::Supervisor,
    kill_grace: std::time::Duration,
    app_off: &Program<'_>,
) -> Error {
    info!(
        "the first start (--first-start-env) is ready; stopping it to start the app as configured"
    );
    let code = child.stop(kill_grace).await;
    child.finish();
    info!(
        code,
        "the first start stopped; starting the app as configured"
    );
    child::exec(app_off)
}

/// Like tini: stays as APP's parent, forwards signals, reaps, and exits with its code.
async fn parent_of(mut child: child::Supervisor) -> i32 {
    let code = child.wait().await;
    child.finish();
    info!(code, "the app exited");
    code
}

/// `wait --release R [-- CMD]`: block until R is done, then exit 0 or exec CMD (flag off).
pub(crate) async fn wait(plan: Wait) -> Result<i32> {
    let Wait { gate, command } = plan;
    let replica = replica_for(&gate)?;
    let role = Role::Watch { slots: gate.slots };
    if let Decision::Follow { seen, conn } =
        wait_for_decision(&replica, role, gate.wait_timeout).await?
    {
        gate.preflight.follower(&replica, *seen, conn).await?;
    }
    if command.is_empty() {
        termination::write_success(&format!("{} is done", release_name(&replica)));
        return Ok(EXIT_OK);
    }
    let flag = &gate.flag;
    Err(child::exec(
        &Program::new(&command, (&flag.name, &flag.off))
            .with_env(sessions::app_env(replica.identity(), replica.release())),
    ))
}

/// `reset --release R`: forget R so that it migrates again. Takes the lock (refusing if anyone
/// holds it), deletes the release's rows and its `--same-env` fingerprints, logs them, frees
/// the lock. `reset --release R --env`: forget only the fingerprints (no lock needed: the
/// release stays done, and the next replica sets them anew).
pub(crate) async fn reset(plan: Reset) -> Result<i32> {
    let release = plan.release;
    let replica = Replica::new(plan.target, Some(release.clone()))?.for_holder();
    let store = Store::new(&replica.target.schema, replica.lock());
    let mut conn = replica.db.connect().await?;
    if plan.env {
        return forget_env(&replica, &store, conn, &release).await;
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
        lock::unlock(c, replica.lock(), scope).await?;
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
    if removed.is_empty() {
        let seen = match conn.pg().await {
            Ok(c) => replica.ledger.holds(c).await,
            Err(e) => Err(e),
        };
        close(conn).await;
        return Err(Error::NothingToReset {
            release,
            lock: replica.lock().to_string(),
            ledger: replica.ledger.tables().ledger(),
            seen: seen.unwrap_or_else(|e| format!("the ledger could not be read: {e}")),
        });
    }
    close(conn).await;
    for a in &removed {
        info!(id = a.id, release, outcome = %a.outcome, holder = %a.holder, started_at = %a.started_at, "removed");
    }
    termination::write_success(&format!(
        "reset release {release:?}: removed {} attempt(s)",
        removed.len()
    ));
    Ok(EXIT_OK)
}

/// `reset --env`: forgets only the release's `--same-env` fingerprints (no lock needed: the
/// release stays done, and the next replica sets them anew).
async fn forget_env(
    replica: &Replica,
    store: &Store,
    mut conn: Conn,
    release: &str,
) -> Result<i32> {
    let forgotten = match conn.pg().await {
        Ok(c) => store.forget(c, release).await,
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
    Ok(EXIT_OK)
}

/// The replica for these flags; one that compares variables reads the key with the ledger.
fn replica_for(gate: &Gate) -> Result<Replica> {
    let mut replica = Replica::new(gate.target.clone(), gate.release.clone())?;
    if gate.preflight.compares() {
        replica.ledger.read_env_key();
    }
    Ok(replica)
}

/// The holder, cleared to migrate: its preflight checks passed, and no app of another release
/// is connected (`--other-releases`). A refusal is recorded as a failed attempt, which frees the
/// lock for a replica that is configured right.
async fn clear_to_migrate(gate: &Gate, replica: &Replica, holding: Holding) -> Result<Holding> {
    if let Err(e) = gate.preflight.holder(replica).await {
        return Err(holding.refuse(replica, e).await);
    }
    holding.no_other_releases(replica).await
}

/// "release \"R\"", or what serial mode is, for summaries.
fn release_name(replica: &Replica) -> String {
    match replica.release() {
        Some(r) => format!("release {r:?}"),
        None => "the migration (no --release: serial mode)".into(),
    }
}
