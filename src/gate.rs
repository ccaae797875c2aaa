//! The gate protocol: who migrates, who waits, and when a release is done.
//!
//! 1. Every replica connects and reads the ledger. Release done: it is a follower, at once.
//! 2. Otherwise it tries `pg_try_advisory_lock` (never the blocking form). Busy: it sleeps a
//!    jittered, exponentially growing delay (capped at half a second) and goes back to 1. It only
//!    goes on when the release is recorded done, never merely because the lock became free: a
//!    holder that crashed frees the lock without migrating.
//! 3. The replica that gets the lock re-reads the ledger (the previous holder may have finished
//!    between 1 and 2), marks attempts left `running` by a vanished holder as `abandoned`,
//!    records its own attempt and migrates, checking on every heartbeat that its lock session is
//!    alive. If that session is lost, another replica may take the lock, so it stops its
//!    migration at once (fencing) and fails.
//! 4. It records the outcome on the lock session, commits, and only then frees the lock.

use std::cell::Cell;
use std::time::{Duration, Instant};

use sqlx::postgres::PgConnection;
use tracing::{error, info, warn};

use crate::child::{self, Program, Supervisor};
use crate::config::{self, MigrateArgs, ResetArgs, RunArgs, Settings, WaitArgs};
use crate::db::{self, Db, Failure, backoff, close, query_scalar};
use crate::error::{Error, Result};
use crate::ledger::{Attempt, Ledger, Outcome};
use crate::lock::{self, LockKey, Scope};
use crate::probe::Probe;

/// How often the holder checks that its lock session is alive while a child runs.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// A heartbeat that takes longer than this counts as a lost session.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a waiter logs who holds the lock.
const REPORT_EVERY: Duration = Duration::from_secs(10);
/// How often the holder probes the app for readiness.
const PROBE_EVERY: Duration = Duration::from_millis(250);
/// Shortest polling delay.
const POLL_MIN: Duration = Duration::from_millis(20);
/// Longest polling delay of a waiter that keeps its connection: a query on an open connection
/// is cheap, and hand-off latency is this delay.
const POLL_FAST_MAX: Duration = Duration::from_millis(100);
/// Longest polling delay of a waiter that reconnects for each poll: a new connection costs the
/// server a process and an authentication, so hundreds of these must poll gently.
const POLL_SLOW_MAX: Duration = Duration::from_millis(500);
/// Longest polling delay of a reconnecting waiter when nearly all of the server's connections
/// are in use: the migration and the apps need them more than we do.
const POLL_CROWDED_MAX: Duration = Duration::from_millis(8000);
/// Share of `max_connections` in use above which reconnecting waiters slow down, linearly up to
/// [`POLL_CROWDED_MAX`] at [`PACKED`].
const CROWDED: f64 = 0.5;
/// Share of `max_connections` in use at which reconnecting waiters poll most gently.
const PACKED: f64 = 0.9;

/// One replica's view of the lock and ledger.
pub struct Gate {
    settings: Settings,
    db: Db,
    ledger: Ledger,
    host: String,
    scope: Cell<Option<Scope>>,
    ensured: Cell<bool>,
}

/// What a replica turned out to be.
pub enum Role {
    /// The release is done: go on with the flag off.
    Follower,
    /// We hold the lock and have recorded an attempt: migrate.
    Holder(Holding),
}

/// The lock session of the holder and its ledger row.
pub struct Holding {
    conn: PgConnection,
    attempt: i64,
    since: Instant,
}

/// Why a supervised step ended.
enum StepEnd {
    /// The child exited with this code.
    Exited(i32),
    /// The readiness probe passed.
    Ready,
    /// The lock session failed its heartbeat.
    LockLost(String),
    /// The app did not become ready in time.
    ReadyTimeout,
}

enum Poll {
    Done,
    /// Someone else holds the lock. `keep`: hold on to the connection; `holder`: who holds the
    /// lock, when a report was asked for.
    Busy {
        keep: bool,
        pressure: f64,
        holder: Option<String>,
    },
    Holder(i64),
}

impl Gate {
    /// Prepares a gate; fails on a malformed URL.
    pub fn new(settings: Settings) -> Result<Gate> {
        let db = Db::new(
            &settings.database_url,
            &settings.application_name,
            settings.connect_timeout,
        )?;
        let ledger = Ledger::new(&settings.schema, &settings.lock);
        Ok(Gate {
            settings,
            db,
            ledger,
            host: config::hostname(),
            scope: Cell::new(None),
            ensured: Cell::new(false),
        })
    }

    fn lock(&self) -> &LockKey {
        &self.settings.lock
    }

    fn release(&self) -> Option<&str> {
        self.settings.release.as_deref()
    }

    /// Waits until the release is done (follower) or this replica holds the lock (holder).
    pub async fn acquire(&self) -> Result<Role> {
        let started = Instant::now();
        let mut fast = backoff(POLL_MIN, POLL_FAST_MAX);
        let mut slow = backoff(POLL_MIN, POLL_SLOW_MAX);
        let mut conn: Option<PgConnection> = None;
        let mut watching = false;
        let mut pressure = 0.0;
        let mut next_report = started;
        if self.release().is_none() {
            info!(lock = %self.lock(), "no --release given: every replica runs the migration in turn under the lock (correct for idempotent migrators, slower)");
        }
        loop {
            let c = match conn.as_mut() {
                Some(c) => c,
                None => conn.insert(self.db.connect().await?),
            };
            let waited = started.elapsed();
            let report = Instant::now() >= next_report || waited >= self.settings.wait_timeout;
            match self.poll(c, &mut watching, report).await {
                Ok(Poll::Done) => {
                    if let Some(c) = conn.take() {
                        close(c).await;
                    }
                    info!(
                        release = self.release(),
                        waited_ms = started.elapsed().as_millis() as u64,
                        "release is done; starting with the flag off"
                    );
                    return Ok(Role::Follower);
                }
                Ok(Poll::Holder(attempt)) => {
                    let Some(conn) = conn.take() else {
                        return Err(Error::Internal("lock session vanished".into()));
                    };
                    info!(release = self.release(), lock = %self.lock(), attempt, waited_ms = started.elapsed().as_millis() as u64, "lock taken; this replica migrates");
                    return Ok(Role::Holder(Holding {
                        conn,
                        attempt,
                        since: Instant::now(),
                    }));
                }
                Ok(Poll::Busy {
                    keep,
                    pressure: seen,
                    holder,
                }) => {
                    pressure = seen;
                    if let Some(holder) = holder {
                        if waited >= self.settings.wait_timeout {
                            return Err(Error::Timeout {
                                what: format!("timed out waiting for {}", self.waiting_for()),
                                waited,
                                hint: format!(
                                    "the lock is held by {holder}: check that replica's logs, or raise --wait-timeout"
                                ),
                            });
                        }
                        info!(
                            release = self.release(),
                            waited_s = waited.as_secs(),
                            holder,
                            "waiting for {}",
                            self.waiting_for()
                        );
                        next_report = Instant::now() + REPORT_EVERY;
                    }
                    if !keep && let Some(c) = conn.take() {
                        close(c).await;
                    }
                }
                Err(e) => match self.db.classify(&e) {
                    Failure::Retry(reason) => {
                        db::log_retry("lost the database connection while waiting", &reason);
                        conn = None;
                        watching = false;
                    }
                    Failure::Fatal(err) => return Err(err),
                },
            }
            let waited = started.elapsed();
            let delay = if conn.is_some() {
                fast.next()
            } else if pressure > CROWDED {
                Some(crowded_delay(pressure))
            } else {
                slow.next()
            };
            let delay = delay.unwrap_or(POLL_SLOW_MAX);
            tokio::time::sleep(delay.min(self.settings.wait_timeout.saturating_sub(waited))).await;
        }
    }

    fn waiting_for(&self) -> String {
        match self.release() {
            Some(r) => format!("release {r:?} to be migrated"),
            None => "our turn to migrate".into(),
        }
    }

    async fn describe_holder(&self, conn: &mut PgConnection) -> String {
        match lock::holder(conn, self.lock()).await {
            Ok(Some(h)) => h.to_string(),
            Ok(None) => "nobody (about to be taken)".into(),
            Err(e) => format!("unknown ({e})"),
        }
    }

    /// The lock scope, decided on the first connection that needs it.
    async fn scope(&self, conn: &mut PgConnection) -> Result<Scope, sqlx::Error> {
        if let Some(scope) = self.scope.get() {
            return Ok(scope);
        }
        let scope = match self.settings.lock_scope {
            Scope::Auto => {
                let (scope, why) = lock::detect_scope(conn, self.db.dialled_port()).await?;
                info!(scope = ?scope, why, "lock scope chosen (--lock-scope auto)");
                scope
            }
            fixed => fixed,
        };
        self.scope.set(Some(scope));
        Ok(scope)
    }

    /// One round of the protocol (steps 1 to 3 of the module documentation).
    async fn poll(
        &self,
        conn: &mut PgConnection,
        watching: &mut bool,
        report: bool,
    ) -> Result<Poll, sqlx::Error> {
        match self.release() {
            Some(release) => match self.ledger.is_done(conn, release).await? {
                Some(true) => return Ok(Poll::Done),
                Some(false) => {}
                // First run against this database: create the ledger before anyone locks, so
                // that no DDL ever runs inside a lock transaction.
                None => self.ledger.ensure(conn).await?,
            },
            None => {
                if !self.ensured.get() {
                    self.ledger.ensure(conn).await?;
                    self.ensured.set(true);
                }
            }
        }
        let scope = self.scope(conn).await?;
        if !lock::try_acquire(conn, self.lock(), scope).await? {
            let holder = if report {
                Some(self.describe_holder(conn).await)
            } else {
                None
            };
            // Behind a transaction pooler a client connection costs no server connection; a
            // direct one does, so only a few waiters (those with a slot) keep theirs.
            let (keep, pressure) = match scope {
                Scope::Transaction => (true, 0.0),
                _ if *watching => (true, 0.0),
                _ => {
                    let slot = lock::try_take_wait_slot(
                        conn,
                        self.lock(),
                        self.settings.waiting_connections,
                    )
                    .await?;
                    *watching = slot.taken;
                    (slot.taken, slot.pressure)
                }
            };
            return Ok(Poll::Busy {
                keep,
                pressure,
                holder,
            });
        }
        lock::configure_keepalives(conn, scope).await?;
        if let Some(release) = self.release()
            && self.ledger.is_done(conn, release).await? == Some(true)
        {
            // The previous holder finished between our read and our lock.
            lock::release(conn, self.lock(), scope).await?;
            return Ok(Poll::Done);
        }
        let (stale, wait) = self.ledger.abandon_stale(conn).await?;
        if stale > 0 {
            warn!(
                stale,
                fence_wait_s = format!("{wait:.1}"),
                "the previous holder vanished mid-migration; taking over once it has surely stopped its migration"
            );
            // Holding the lock, so nobody else starts meanwhile.
            tokio::time::sleep(Duration::from_secs_f64(wait.min(3600.0))).await;
        }
        let id = self.ledger.begin(conn, &self.attempt()).await?;
        Ok(Poll::Holder(id))
    }

    fn attempt(&self) -> Attempt<'_> {
        Attempt {
            release: self.release(),
            holder: &self.settings.application_name,
            host: &self.host,
            pid: std::process::id(),
            fence_secs: (HEARTBEAT
                + HEARTBEAT_TIMEOUT
                + self.settings.kill_grace
                + Duration::from_secs(1))
            .as_secs()
            .try_into()
            .unwrap_or(u32::MAX),
        }
    }

    /// Records the outcome on the lock session, commits, then frees the lock (step 4).
    pub async fn complete(
        &self,
        mut holding: Holding,
        outcome: Outcome,
        exit_code: Option<i32>,
        detail: &str,
    ) -> Result<()> {
        let result = async {
            self.ledger
                .finish(
                    &mut holding.conn,
                    holding.attempt,
                    outcome,
                    exit_code,
                    detail,
                )
                .await?;
            info!(attempt = holding.attempt, outcome = ?outcome, "ledger written");
            lock::release(
                &mut holding.conn,
                self.lock(),
                self.scope.get().unwrap_or(Scope::Session),
            )
            .await
        }
        .await;
        close(holding.conn).await;
        match result {
            Ok(_) => {
                info!(
                    held_ms = holding.since.elapsed().as_millis() as u64,
                    "lock released"
                );
                Ok(())
            }
            Err(e) => Err(Error::Unavailable(format!(
                "the attempt ended ({outcome:?}) but the ledger could not be written: {e}; \
                 the lock is freed with the session and the next holder will migrate again"
            ))),
        }
    }

    /// Records a failed attempt from a fresh connection after the lock session was lost. Best
    /// effort: the database may be gone too.
    async fn record_fenced(&self, attempt: i64, code: i32, reason: &str) {
        match self.db.connect_once(HEARTBEAT_TIMEOUT).await {
            Ok(mut c) => {
                let detail = format!("fenced: lost the lock session ({reason}); child stopped");
                if let Err(e) = self
                    .ledger
                    .record_fenced(&mut c, attempt, &self.attempt(), code, &detail)
                    .await
                {
                    warn!(error = %e, "could not record the failed attempt");
                }
                close(c).await;
            }
            Err(_) => warn!("could not reconnect to record the failed attempt"),
        }
    }

    /// Checks that the lock session is alive and still holds the lock, and (in session scope,
    /// where others can see it) stamps the ledger row's heartbeat.
    async fn heartbeat(&self, holding: &mut Holding) -> Result<(), String> {
        let sql = format!(
            "SELECT count(*)::text FROM pg_locks l WHERE {} AND l.granted AND l.pid = pg_backend_pid()",
            self.lock().pg_locks_filter()
        );
        let check = async {
            let held = query_scalar(&mut holding.conn, sql).await?;
            if self.scope.get() != Some(Scope::Transaction) {
                self.ledger
                    .heartbeat(&mut holding.conn, holding.attempt)
                    .await?;
            }
            Ok::<_, sqlx::Error>(held)
        };
        match tokio::time::timeout(HEARTBEAT_TIMEOUT, check).await {
            Ok(Ok(Some(n))) if n != "0" => Ok(()),
            Ok(Ok(_)) => Err("the lock is no longer held by our session".into()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "no answer within {}",
                humantime::format_duration(HEARTBEAT_TIMEOUT)
            )),
        }
    }

    /// Supervises `child` while holding the lock: heartbeats, optional readiness probe.
    async fn supervise(
        &self,
        holding: &mut Holding,
        child: &mut Supervisor,
        probe: Option<(&Probe, Duration)>,
    ) -> StepEnd {
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut probe_tick = tokio::time::interval(PROBE_EVERY);
        let ready_deadline =
            tokio::time::Instant::now() + probe.map(|p| p.1).unwrap_or(Duration::MAX / 4);
        let mut sql_conn = None;
        loop {
            tokio::select! {
                code = child.wait() => return StepEnd::Exited(code),
                _ = heartbeat.tick() => {
                    if let Err(reason) = self.heartbeat(holding).await {
                        return StepEnd::LockLost(reason);
                    }
                }
                _ = probe_tick.tick(), if probe.is_some() => {
                    if let Some((p, _)) = probe
                        && p.check(&self.db, &mut sql_conn).await
                    {
                        if let Some(c) = sql_conn.take() {
                            close(c).await;
                        }
                        return StepEnd::Ready;
                    }
                }
                _ = tokio::time::sleep_until(ready_deadline), if probe.is_some() => return StepEnd::ReadyTimeout,
            }
        }
    }

    /// Runs `program` to completion as the holder. On a lost lock session it fences: stops the
    /// child's process group, records the failure and returns an error.
    async fn run_to_completion(&self, holding: &mut Holding, program: &Program<'_>) -> Result<i32> {
        info!(command = %program.display(), flag = %format!("{}={}", program.flag.0, program.flag.1), "migration started");
        let started = Instant::now();
        let mut child = child::spawn(program)?;
        let end = self.supervise(holding, &mut child, None).await;
        match end {
            StepEnd::Exited(code) => {
                child.finish();
                info!(
                    code,
                    secs = format!("{:.1}", started.elapsed().as_secs_f64()),
                    "migration finished"
                );
                Ok(code)
            }
            StepEnd::LockLost(reason) => Err(self.fence(holding, &mut child, &reason).await),
            StepEnd::Ready | StepEnd::ReadyTimeout => {
                Err(Error::Internal("unexpected probe result".into()))
            }
        }
    }

    /// Runs a migration command as the holder. Success hands the lock back for the next step;
    /// failure is recorded, frees the lock, and becomes the error (with the command's code).
    async fn migration_step(
        &self,
        mut holding: Holding,
        program: &Program<'_>,
        what: &str,
    ) -> Result<Holding> {
        let code = match self.run_to_completion(&mut holding, program).await {
            Ok(code) => code,
            Err(e) => {
                // A fenced holder has no session left and recorded its attempt already; any
                // other error (the command could not start) is recorded here.
                if !matches!(e, Error::Unavailable(_) | Error::Internal(_)) {
                    let _ = self
                        .complete(
                            holding,
                            Outcome::Failed,
                            Some(e.exit_code()),
                            &e.to_string(),
                        )
                        .await;
                }
                return Err(e);
            }
        };
        if code != 0 {
            self.complete(
                holding,
                Outcome::Failed,
                Some(code),
                &format!("{what} failed"),
            )
            .await?;
            return Err(Error::MigrationFailed {
                what: format!("{what} `{}`", program.display()),
                code,
            });
        }
        Ok(holding)
    }

    async fn fence(&self, holding: &Holding, child: &mut Supervisor, reason: &str) -> Error {
        error!(
            reason,
            "lost the lock session while migrating: another replica may take the lock now, so the migration is stopped"
        );
        let code = child.stop(self.settings.kill_grace).await;
        child.finish();
        self.record_fenced(holding.attempt, code, reason).await;
        Error::Unavailable(format!(
            "lost the database session holding the lock ({reason}); stopped the migration (exit {code}) so that two migrations never overlap; the next holder will retry"
        ))
    }
}

impl Gate {
    /// Waits until the release is done, never taking the lock (`wait` mode).
    pub async fn wait_for_release(&self) -> Result<()> {
        let Some(release) = self.release() else {
            return Err(Error::Usage("wait needs a release".into()));
        };
        let started = Instant::now();
        let mut delays = backoff(POLL_MIN, POLL_SLOW_MAX);
        let mut conn: Option<PgConnection> = None;
        let mut next_report = started;
        info!(release, "waiting for the release to be done");
        loop {
            let c = match conn.as_mut() {
                Some(c) => c,
                None => conn.insert(self.db.connect().await?),
            };
            let waited = started.elapsed();
            let report = Instant::now() >= next_report || waited >= self.settings.wait_timeout;
            let polled = async {
                let done = self.ledger.is_done(c, release).await? == Some(true);
                let holder = if !done && report {
                    Some(self.describe_holder(c).await)
                } else {
                    None
                };
                Ok::<_, sqlx::Error>((done, holder))
            }
            .await;
            match polled {
                Ok((true, _)) => {
                    if let Some(c) = conn.take() {
                        close(c).await;
                    }
                    info!(
                        release,
                        waited_ms = started.elapsed().as_millis() as u64,
                        "release is done"
                    );
                    return Ok(());
                }
                Ok((false, Some(holder))) => {
                    if waited >= self.settings.wait_timeout {
                        return Err(Error::Timeout {
                            what: format!("timed out waiting for {}", self.waiting_for()),
                            waited,
                            hint: format!(
                                "the lock is held by {holder}; raise --wait-timeout or check the migrating replica"
                            ),
                        });
                    }
                    info!(
                        release,
                        waited_s = waited.as_secs(),
                        holder,
                        "waiting for {}",
                        self.waiting_for()
                    );
                    next_report = Instant::now() + REPORT_EVERY;
                }
                Ok((false, None)) => {}
                Err(e) => match self.db.classify(&e) {
                    Failure::Retry(reason) => {
                        db::log_retry("lost the database connection while waiting", &reason);
                        conn = None;
                    }
                    Failure::Fatal(err) => return Err(err),
                },
            }
            let delay = delays.next().unwrap_or(POLL_SLOW_MAX);
            tokio::time::sleep(delay.min(self.settings.wait_timeout.saturating_sub(waited))).await;
        }
    }

    /// Forgets a release (`reset`): takes the lock (refusing if anyone holds it), deletes the
    /// release's rows, logs them, frees the lock.
    pub async fn reset(&self, release: &str) -> Result<usize> {
        let mut conn = self.db.connect().await?;
        let result = async {
            let scope = self.scope(&mut conn).await?;
            if !lock::try_acquire(&mut conn, self.lock(), scope).await? {
                return Ok(Err(self.describe_holder(&mut conn).await));
            }
            let removed = self.ledger.forget(&mut conn, release).await?;
            lock::release(&mut conn, self.lock(), scope).await?;
            Ok(Ok(removed))
        }
        .await;
        close(conn).await;
        match result {
            Ok(Ok(removed)) => {
                if removed.is_empty() {
                    info!(
                        release,
                        "nothing recorded for this release; nothing to reset"
                    );
                }
                for a in &removed {
                    info!(id = a.id, release, outcome = %a.outcome, holder = %a.holder, started_at = %a.started_at, "removed");
                }
                Ok(removed.len())
            }
            Ok(Err(holder)) => Err(Error::Timeout {
                what: format!("reset refused: lock {} is held by {holder}", self.lock()),
                waited: Duration::ZERO,
                hint: "a migration may be running; try again when it has finished".into(),
            }),
            Err(e) => Err(match self.db.classify(&e) {
                Failure::Fatal(err) => err,
                Failure::Retry(reason) => Error::Unavailable(format!(
                    "lost the database connection during reset: {reason}"
                )),
            }),
        }
    }
}

/// The polling delay of a reconnecting waiter on a crowded server: from [`POLL_SLOW_MAX`] when
/// [`CROWDED`] to [`POLL_CROWDED_MAX`] when [`PACKED`], jittered over its upper half so that a
/// fleet spreads its reconnections.
fn crowded_delay(pressure: f64) -> Duration {
    let f = ((pressure - CROWDED) / (PACKED - CROWDED)).clamp(0.0, 1.0);
    let cap = POLL_SLOW_MAX.as_secs_f64() + f * (POLL_CROWDED_MAX - POLL_SLOW_MAX).as_secs_f64();
    Duration::from_secs_f64(cap * (0.5 + 0.5 * fastrand::f64()))
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

/// `migrate -- CMD`: the holder runs CMD with the flag on; every replica exits 0 once done.
pub async fn migrate(args: MigrateArgs) -> Result<i32> {
    let settings = args.gate.settings()?;
    check_program(&args.command)?;
    let gate = Gate::new(settings)?;
    let flag = &gate.settings.flag;
    match gate.acquire().await? {
        Role::Follower => Ok(0),
        Role::Holder(holding) => {
            let program = Program {
                argv: &args.command,
                flag: (&flag.name, &flag.on),
            };
            let holding = gate
                .migration_step(holding, &program, "migration command")
                .await?;
            gate.complete(
                holding,
                Outcome::Done,
                Some(0),
                "migration command exited 0",
            )
            .await?;
            Ok(0)
        }
    }
}

/// `wait --release R [-- CMD]`: block until R is done, then exit 0 or exec CMD (flag off).
pub async fn wait(args: WaitArgs) -> Result<i32> {
    let settings = args.settings()?;
    if !args.command.is_empty() {
        check_program(&args.command)?;
    }
    let gate = Gate::new(settings)?;
    gate.wait_for_release().await?;
    if args.command.is_empty() {
        return Ok(0);
    }
    let flag = &gate.settings.flag;
    Err(child::exec(&Program {
        argv: &args.command,
        flag: (&flag.name, &flag.off),
    }))
}

/// `reset --release R`: forget R so that it migrates again.
pub async fn reset(args: ResetArgs) -> Result<i32> {
    let gate = Gate::new(args.db.settings()?)?;
    gate.reset(&args.release).await?;
    Ok(0)
}

/// `run [--migrate CMD] [--ready-*] -- APP`: gate the start of APP.
pub async fn run(args: RunArgs) -> Result<i32> {
    let settings = args.gate.settings()?;
    let probe = Probe::from_args(&args)?;
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
    let gate = Gate::new(settings)?;
    let flag = &gate.settings.flag;
    let app_off = Program {
        argv: &args.command,
        flag: (&flag.name, &flag.off),
    };
    let mut holding = match gate.acquire().await? {
        Role::Follower => return Err(child::exec(&app_off)),
        Role::Holder(holding) => holding,
    };

    if let Some(argv) = &migrate_argv {
        let program = Program {
            argv,
            flag: (&flag.name, &flag.on),
        };
        holding = gate
            .migration_step(holding, &program, "--migrate command")
            .await?;
    }

    let Some(probe) = probe else {
        gate.complete(
            holding,
            Outcome::Done,
            Some(0),
            "--migrate command exited 0",
        )
        .await?;
        return Err(child::exec(&app_off));
    };

    // The holder starts APP itself and keeps the lock until APP is ready: with the flag on if
    // APP migrates on start-up, off if --migrate already did.
    let app = Program {
        argv: &args.command,
        flag: (
            &flag.name,
            if migrate_argv.is_some() {
                &flag.off
            } else {
                &flag.on
            },
        ),
    };
    info!(command = %app.display(), probe = %probe.describe(), flag = %format!("{}={}", app.flag.0, app.flag.1), "starting the app; holding the lock until it is ready");
    let started = Instant::now();
    let mut child = match child::spawn(&app) {
        Ok(c) => c,
        Err(e) => {
            let _ = gate
                .complete(
                    holding,
                    Outcome::Failed,
                    Some(e.exit_code()),
                    &e.to_string(),
                )
                .await;
            return Err(e);
        }
    };
    match gate
        .supervise(&mut holding, &mut child, Some((&probe, args.ready_timeout)))
        .await
    {
        StepEnd::Ready => {
            info!(
                secs = format!("{:.1}", started.elapsed().as_secs_f64()),
                "the app is ready"
            );
            gate.complete(holding, Outcome::Done, None, "the app became ready")
                .await?;
        }
        StepEnd::Exited(code) => {
            child.finish();
            gate.complete(
                holding,
                Outcome::Failed,
                Some(code),
                "the app exited before it was ready",
            )
            .await?;
            return Err(Error::MigrationFailed {
                what: format!(
                    "the app `{}` exited before it was ready, so the migration",
                    app.display()
                ),
                code,
            });
        }
        StepEnd::ReadyTimeout => {
            let code = child.stop(gate.settings.kill_grace).await;
            child.finish();
            gate.complete(
                holding,
                Outcome::Failed,
                Some(code),
                "the app was not ready in time",
            )
            .await?;
            return Err(Error::Timeout {
                what: format!("the app was not ready ({})", probe.describe()),
                waited: args.ready_timeout,
                hint: "it was stopped and the attempt recorded as failed; check the app's logs or raise --ready-timeout".into(),
            });
        }
        StepEnd::LockLost(reason) => return Err(gate.fence(&holding, &mut child, &reason).await),
    }

    // Like tini: stay as APP's parent, forward signals, reap, exit with its code.
    let code = child.wait().await;
    child.finish();
    info!(code, "the app exited");
    Ok(code)
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
