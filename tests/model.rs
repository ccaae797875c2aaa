//! An exhaustive model check of the gate's protocol (issue 32), with `stateright`.
//!
//! The model is the protocol of `src/protocol.rs` and `src/holding/`, one atomic step per SQL
//! statement or local decision, every interleaving of 2–3 replicas, their migrations and the
//! server, with a budget of faults so that the state space is finite. Each [`Action`] names
//! the function it stands for; [`CITED`] lists them and `the_model_cites_functions_that_exist`
//! fails when one disappears from `src/`, and [`STEPS`] lists every call of the protocol's step
//! functions with what the model makes of it, so that a step added to the code fails
//! `the_protocols_steps_are_all_in_the_model` until the model says what it is.
//!
//! What the model leaves out, on purpose: the migration tool's own lock rows and dirty markers
//! (`protocol::tool_state`), `--max-failures`, `--other-releases`, the application check,
//! waiting slots and `LISTEN` (a waiter's poll is only taken when it would see something new:
//! polling that sees nothing changes nothing), deadlines (a statement on a lost connection
//! fails at once), and the blocking-lock deadlock with `CREATE INDEX CONCURRENTLY` (the gate never
//! blocks on the lock; the model has no snapshots). Time is an ordering: a taker-over's fencing
//! wait ends only once every vanished holder that still runs has had the heartbeat that fences
//! it (docs/design.md, "Takeover in 7 s").
//!
//! `cargo test --release --test model` runs the default configurations; with
//! `MIGRATIONS_GATE_MODEL=deep` it checks bigger ones (figures in docs/testing.md).

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::time::Instant;

use stateright::{Checker, HasDiscoveries, Model, Path, Property};

// ---------------------------------------------------------------------------------------------
// Configuration: the route, the rules (each can be removed), the faults and their budget.

/// How the gate reaches PostgreSQL, and so how it holds the lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Route {
    /// Session-scope lock on a direct connection: the ledger is written on the lock session.
    Direct,
    /// Behind a transaction pooler: a transaction-scope lock, and the witness connection
    /// for the ledger.
    Pooler,
}

/// The protocol's rules (docs/design.md, "The protocol's rules"), each one a switch so that a
/// test can remove it and show that the checker then finds a counterexample.
#[derive(Clone, Copy, Debug)]
struct Rules {
    /// `ledger::Ledger::begin` carries the lock's proof.
    proof_on_begin: bool,
    /// Each look of the fencing wait (`ledger::Ledger::stale`) carries the proof.
    proof_in_fence_wait: bool,
    /// Signals to earlier attempts' sessions carry the proof (`sessions::Which::while_holding`).
    proof_on_end_sessions: bool,
    /// `ledger::Ledger::abandon_stale` carries the proof.
    proof_on_abandon: bool,
    /// `protocol::done_under_lock`: the ledger re-read once the lock is taken.
    reread_under_lock: bool,
    /// `ledger::Ledger::begin` reads the release as not done in the same statement.
    begin_reads_done: bool,
    /// `holding::wait_out_fence`: wait out a vanished holder's fencing time.
    fencing_wait: bool,
    /// `protocol::terminate_earlier_sessions`: end earlier attempts' sessions before migrating.
    end_earlier_sessions: bool,
    /// `Holding::end`: a failed attempt's own sessions end before it is recorded.
    end_own_sessions: bool,
    /// `Holding::record_and_unlock`: the outcome commits before the lock is freed.
    commit_before_unlock: bool,
    /// `Holding::fence`: a holder whose heartbeat fails kills its migration.
    fencing: bool,
    /// `Holding::beat`: a thawed holder pauses its migration before it asks the server.
    pause_on_thaw: bool,
    /// The guard process kills the migration when the gate dies (`child::spawn`).
    guard: bool,
    /// `protocol::open_witness`: behind a pooler, the attempt row commits on its own.
    witness: bool,
    /// A waiter goes on only when the release is recorded done, never because the lock is free.
    positive_signal: bool,
}

impl Rules {
    const ALL: Rules = Rules {
        proof_on_begin: true,
        proof_in_fence_wait: true,
        proof_on_end_sessions: true,
        proof_on_abandon: true,
        reread_under_lock: true,
        begin_reads_done: true,
        fencing_wait: true,
        end_earlier_sessions: true,
        end_own_sessions: true,
        commit_before_unlock: true,
        fencing: true,
        pause_on_thaw: true,
        guard: true,
        witness: true,
        positive_signal: true,
    };
}

/// Where the server may end a replica's lock session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LoseLock {
    Never,
    Anywhere,
    /// Only a taker-over's, while it waits out a vanished holder's fencing time: the schedule
    /// in which `tests/chaos.rs` found the fencing-wait bug.
    InFenceWait,
}

/// Which faults may happen, and how many in all.
#[derive(Clone, Copy, Debug)]
struct Faults {
    budget: u8,
    /// `kill -9` of a gate (the holder's, a waiter's or a taker-over's).
    crash_gate: bool,
    /// The migration dies (SIGKILL, or it fails).
    kill_child: bool,
    /// The server ends a lock session (`pg_terminate_backend`, a partition's keepalive expiry).
    lose_lock: LoseLock,
    /// A holder and its migration frozen together (cgroup freezer, a paused VM), later thawed.
    freeze: bool,
    /// PostgreSQL restarts: every session ends, uncommitted work is lost.
    restart_postgres: bool,
}

impl Faults {
    /// `budget` faults of the kinds `set` turns on.
    fn with(budget: u8, set: impl FnOnce(&mut Faults)) -> Faults {
        let mut f = Faults {
            budget,
            ..Faults::NONE
        };
        set(&mut f);
        f
    }

    const NONE: Faults = Faults {
        budget: 0,
        crash_gate: false,
        kill_child: false,
        lose_lock: LoseLock::Never,
        freeze: false,
        restart_postgres: false,
    };
    const ALL: Faults = Faults {
        budget: 2,
        crash_gate: true,
        kill_child: true,
        lose_lock: LoseLock::Anywhere,
        freeze: true,
        restart_postgres: true,
    };
}

#[derive(Clone, Copy, Debug)]
struct Gate {
    replicas: u8,
    route: Route,
    rules: Rules,
    faults: Faults,
}

impl Gate {
    fn new(replicas: u8, route: Route) -> Gate {
        Gate {
            replicas,
            route,
            rules: Rules::ALL,
            faults: Faults::ALL,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// State.

/// A replica's step, named after the function it is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Step {
    /// `protocol::round`: reads the ledger (`protocol::read_release`).
    Read,
    /// `protocol::round`: tries the lock (`lock::try_acquire`).
    TryLock,
    /// `protocol::take_over`: `protocol::done_under_lock`, then `protocol::open_witness`.
    Reread,
    /// `protocol::wait_out_vanished_holder`: the first look at the ledger.
    Stale,
    /// `holding::wait_out_fence`.
    FenceWait,
    /// `protocol::terminate_earlier_sessions`, its `holding::terminate_sessions`.
    EndEarlier,
    /// `protocol::terminate_earlier_sessions`, its `ledger::Ledger::abandon_stale`.
    Abandon,
    /// `ledger::Ledger::begin`.
    Begin,
    /// `Holding::migrate`, before `child::spawn`.
    Spawn,
    /// `Holding::supervise`: heartbeats while the migration runs.
    Supervise,
    /// `holding::ending::record_fenced`.
    Fenced,
    /// `Holding::end` of a failed attempt: `Holding::end_own_sessions`.
    EndOwn,
    /// `Holding::record_and_unlock`: `ledger::Ledger::finish`.
    Record { done: bool },
    /// `Holding::record_and_unlock`: `lock::unlock`.
    Unlock { done: bool, recorded: bool },
    /// Only without commit-before-unlock: the COMMIT after the unlock.
    Commit { done: bool },
    // The ends.
    /// Started the app with the flag off, the release done (a follower).
    Followed,
    /// Migrated, recorded the release done, started the app.
    Migrated,
    /// Exited non-zero (lost the lock, the migration failed, ...).
    Exited,
    /// Killed (`kill -9`).
    Crashed,
}

impl Step {
    fn ended(self) -> bool {
        matches!(
            self,
            Step::Followed | Step::Migrated | Step::Exited | Step::Crashed
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Replica {
    step: Step,
    /// Its attempt, once `begin` recorded it.
    attempt: Option<u8>,
    frozen: bool,
    /// Thawed, and its gate has not run since: the migration runs, the gate not yet.
    thawed: bool,
    /// Behind a pooler: the witness connection is open.
    witness: bool,
    /// The first look of the fencing wait saw a vanished holder's row `running`.
    saw_stale: bool,
    /// Only without the positive-signal rule: it saw the lock busy.
    seen_busy: bool,
    /// Only without fencing: its heartbeat noticed the lost session (and did nothing).
    lost_seen: bool,
}

/// An attempt's ledger row, as committed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Outcome {
    /// Not committed yet (inside a lock transaction without the witness).
    Absent,
    Running,
    Done,
    Failed,
    Abandoned,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Child {
    NotStarted,
    Running,
    /// Paused by its gate after a thaw (SIGSTOP).
    Paused,
    /// Exited 0 after its work committed.
    Finished,
    /// Killed, or failed.
    Dead,
}

impl Child {
    fn alive(self) -> bool {
        matches!(self, Child::Running | Child::Paused)
    }
}

/// An attempt's database work: a statement its session runs on the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Work {
    None,
    Busy,
    /// Sent behind a pooler in the instant between a thaw and the gate's pause: the design's
    /// stated limit.
    ThawRace,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Attempt {
    owner: u8,
    row: Outcome,
    /// An update of the row inside the owner's lock transaction, not committed yet.
    pending: Option<Outcome>,
    child: Child,
    /// The migration's connection: on a direct route its server session, behind a pooler its
    /// client connection to the pooler.
    conn: bool,
    work: Work,
    /// The migration's statement committed.
    work_done: bool,
}

/// What happened so far that a property judges (history, not protocol state).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
struct History {
    /// An attempt began, or a statement of one started, after the release was recorded done.
    after_done: bool,
    /// A replica started its app before the release was recorded done.
    early_start: bool,
    /// A row became `failed` or `abandoned` while its attempt still had a session.
    recorded_with_sessions: bool,
    // For the sanity checks (`sometimes`):
    taken_over: bool,
    fenced_recorded: bool,
    gave_up_turn: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct State {
    replicas: Vec<Replica>,
    attempts: Vec<Attempt>,
    /// The replica whose session holds the advisory lock.
    lock: Option<u8>,
    faults_left: u8,
    history: History,
}

// ---------------------------------------------------------------------------------------------
// Actions: each names the function of `src/` it stands for.

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Action {
    /// `protocol::read_release` (`ledger::Ledger::is_done`): done? follow.
    Read(u8),
    /// `lock::try_acquire`, then `protocol::configure_lock_session` (`lock::Proof::of`).
    TryLock(u8),
    /// `protocol::done_under_lock`, then `protocol::open_witness`.
    Reread(u8),
    /// `protocol::wait_out_vanished_holder`: `ledger::Ledger::stale`, the first look.
    Stale(u8),
    /// `holding::wait_out_fence`: a look that ends the wait or gives up the turn.
    FenceLook(u8),
    /// `protocol::terminate_earlier_sessions` → `holding::terminate_sessions` (`sessions::terminate`).
    EndEarlier(u8),
    /// `ledger::Ledger::abandon_stale`.
    Abandon(u8),
    /// `ledger::Ledger::begin` (`holding::new_attempt`).
    Begin(u8),
    /// `Holding::migrate` → `child::spawn`.
    Spawn(u8),
    /// `Holding::beat` → `Holding::heartbeat` (`lock::held_by_us`, `ledger::Ledger::heartbeat`).
    Beat(u8),
    /// `Holding::supervise`: the migration exited (`Supervisor::wait`).
    ChildExit(u8),
    /// `Holding::end_own_sessions`.
    EndOwn(u8),
    /// `Holding::record_and_unlock` → `ledger::Ledger::finish`.
    Record(u8),
    /// `Holding::record_and_unlock` → `lock::unlock`.
    Unlock(u8),
    /// The COMMIT after the unlock (only without commit-before-unlock).
    Commit(u8),
    /// `holding::ending::record_fenced` (`ledger::Ledger::record_fenced`).
    RecordFenced(u8),
    // The migration of attempt N and the server.
    /// The migration connects.
    ChildConnect(u8),
    /// The migration sends its statement.
    ChildStatement(u8),
    /// The server finishes a statement (also a dead client's: the backend runs it on).
    StatementEnds(u8),
    /// The migration exits 0.
    ChildFinishes(u8),
    // Faults.
    CrashGate(u8),
    KillChild(u8),
    LoseLockSession(u8),
    Freeze(u8),
    /// The end of a freeze, not a fault.
    Thaw(u8),
    RestartPostgres,
}

impl Action {
    fn is_fault(self) -> bool {
        matches!(
            self,
            Action::CrashGate(_)
                | Action::KillChild(_)
                | Action::LoseLockSession(_)
                | Action::Freeze(_)
                | Action::RestartPostgres
        )
    }
}

// ---------------------------------------------------------------------------------------------
// The transitions.

fn done(s: &State) -> bool {
    s.attempts.iter().any(|a| a.row == Outcome::Done)
}

fn held(s: &State, i: u8) -> bool {
    s.lock == Some(i)
}

/// Whether attempt `a` has a session on the server: a statement running, or (direct) the
/// migration's own connection.
fn has_sessions(g: &Gate, a: &Attempt) -> bool {
    a.work != Work::None || (g.route == Route::Direct && a.child.alive() && a.conn)
}

fn running_rows(s: &State) -> impl Iterator<Item = usize> + '_ {
    (0..s.attempts.len()).filter(|&k| s.attempts[k].row == Outcome::Running)
}

impl Gate {
    /// The connection the ledger is written through: the witness behind a pooler, else the
    /// lock session (gone with the lock).
    fn book_ok(&self, s: &State, i: u8) -> bool {
        if self.route == Route::Pooler && self.rules.witness {
            s.replicas[i as usize].witness
        } else {
            held(s, i)
        }
    }

    /// Whether the migration of attempt `k` is frozen with its gate.
    fn child_frozen(&self, s: &State, k: usize) -> bool {
        let r = &s.replicas[s.attempts[k].owner as usize];
        r.attempt == Some(k as u8) && r.frozen
    }

    /// In the instant after a thaw, before the gate pauses it, the migration can only send
    /// on the connection it has (connecting takes round trips): with the pause rule.
    fn in_thaw_instant(&self, s: &State, k: usize) -> bool {
        let r = &s.replicas[s.attempts[k].owner as usize];
        r.attempt == Some(k as u8) && r.thawed && self.rules.pause_on_thaw
    }

    /// Time, as an ordering: a vanished holder's fencing time is over once its gate cannot
    /// still be running its migration unfenced, i.e. unless it is alive, not frozen (its
    /// clock runs) and has not yet had the heartbeat that fences it.
    fn fence_time_over(&self, s: &State) -> bool {
        running_rows(s).all(|k| {
            let r = &s.replicas[s.attempts[k].owner as usize];
            let unfenced = match r.step {
                Step::Spawn => true,
                Step::Supervise => !r.lost_seen,
                _ => false,
            };
            r.attempt != Some(k as u8) || !unfenced || r.frozen || r.thawed
        })
    }

    /// Ends attempt `k`'s sessions: its statement is cancelled, its direct session terminated.
    fn end_sessions(&self, s: &mut State, k: usize) {
        let a = &mut s.attempts[k];
        a.work = Work::None;
        if self.route == Route::Direct {
            a.conn = false;
        }
    }

    /// Commits a row's outcome, noting a failure recorded while sessions remain.
    fn set_row(&self, s: &mut State, k: usize, outcome: Outcome) {
        // The thaw race's statement (the stated limit) is judged by the strict property only.
        let a = s.attempts[k];
        let sessions = a.work == Work::Busy || (has_sessions(self, &a) && a.work == Work::None);
        if matches!(outcome, Outcome::Failed | Outcome::Abandoned) && sessions {
            s.history.recorded_with_sessions = true;
        }
        s.attempts[k].row = outcome;
        s.attempts[k].pending = None;
    }

    /// Commits replica `i`'s lock transaction (its pending row update).
    fn commit(&self, s: &mut State, i: u8) {
        if let Some(k) = s.replicas[i as usize].attempt
            && let Some(outcome) = s.attempts[k as usize].pending
        {
            self.set_row(s, k as usize, outcome);
        }
    }

    /// Replica `i`'s lock session ends or unlocks without committing: the lock is free and
    /// its lock transaction's writes roll back.
    fn free_lock(&self, s: &mut State, i: u8) {
        if held(s, i) {
            s.lock = None;
        }
        if let Some(k) = s.replicas[i as usize].attempt {
            s.attempts[k as usize].pending = None;
        }
    }

    /// `Holding::fence`: kills the migration, drops the lock session and the witness (a lock
    /// still held, when the row was taken, is freed).
    fn fence(&self, s: &mut State, i: u8, k: usize) {
        if s.attempts[k].child.alive() {
            s.attempts[k].child = Child::Dead;
            s.attempts[k].conn = false;
        }
        self.free_lock(s, i);
        let r = &mut s.replicas[i as usize];
        r.witness = false;
        r.step = Step::Fenced;
    }

    /// `protocol::lost`: the lock (or a connection) is lost while taking over: the connection
    /// is dropped, and the replica waits again.
    fn retry(&self, s: &mut State, i: u8) {
        self.free_lock(s, i);
        let r = &mut s.replicas[i as usize];
        r.step = Step::Read;
        r.witness = false;
        r.saw_stale = false;
        s.history.gave_up_turn = true;
    }

    fn end(&self, s: &mut State, i: u8, step: Step) {
        if matches!(step, Step::Followed | Step::Migrated) && !done(s) {
            s.history.early_start = true;
        }
        s.replicas[i as usize].step = step;
    }

    fn step(&self, s: &mut State, action: Action) -> bool {
        let rules = self.rules;
        match action {
            Action::Read(i) => {
                if done(s) {
                    self.end(s, i, Step::Followed);
                } else {
                    s.replicas[i as usize].step = Step::TryLock;
                }
            }
            Action::TryLock(i) => {
                let r = s.replicas[i as usize];
                if s.lock.is_none() {
                    if !rules.positive_signal && r.seen_busy {
                        // The bug: the lock is free, so the holder must have finished.
                        self.end(s, i, Step::Followed);
                    } else {
                        s.lock = Some(i);
                        s.replicas[i as usize].step = Step::Reread;
                    }
                } else if done(s) {
                    s.replicas[i as usize].step = Step::Read;
                } else if !rules.positive_signal && !r.seen_busy {
                    s.replicas[i as usize].seen_busy = true;
                } else {
                    return false; // busy: polling sees nothing new
                }
            }
            Action::Reread(i) => {
                if !held(s, i) {
                    self.retry(s, i);
                } else if rules.reread_under_lock && done(s) {
                    self.free_lock(s, i);
                    self.end(s, i, Step::Followed);
                } else {
                    let r = &mut s.replicas[i as usize];
                    r.witness = self.route == Route::Pooler;
                    r.step = Step::Stale;
                }
            }
            Action::Stale(i) => {
                if !self.book_ok(s, i) || (rules.proof_in_fence_wait && !held(s, i)) {
                    self.retry(s, i);
                } else if running_rows(s).next().is_some() {
                    let r = &mut s.replicas[i as usize];
                    r.saw_stale = true;
                    r.step = if rules.fencing_wait {
                        Step::FenceWait
                    } else {
                        Step::EndEarlier
                    };
                } else {
                    s.replicas[i as usize].step = Step::EndEarlier;
                }
            }
            Action::FenceLook(i) => {
                if !self.book_ok(s, i) || (rules.proof_in_fence_wait && !held(s, i)) {
                    self.retry(s, i);
                } else if running_rows(s).next().is_none() || self.fence_time_over(s) {
                    s.replicas[i as usize].step = Step::EndEarlier;
                } else {
                    return false; // the wait goes on
                }
            }
            Action::EndEarlier(i) => {
                if !self.book_ok(s, i) {
                    self.retry(s, i);
                    return true;
                }
                let earlier: Vec<usize> = (0..s.attempts.len())
                    .filter(|&k| {
                        let a = &s.attempts[k];
                        matches!(
                            a.row,
                            Outcome::Running | Outcome::Failed | Outcome::Abandoned
                        ) && has_sessions(self, a)
                    })
                    .collect();
                if rules.end_earlier_sessions && !earlier.is_empty() {
                    if rules.proof_on_end_sessions && !held(s, i) {
                        self.retry(s, i);
                        return true;
                    }
                    for k in earlier {
                        self.end_sessions(s, k);
                    }
                }
                let r = &mut s.replicas[i as usize];
                r.step = if r.saw_stale {
                    Step::Abandon
                } else {
                    Step::Begin
                };
            }
            Action::Abandon(i) => {
                if !self.book_ok(s, i) {
                    self.retry(s, i);
                    return true;
                }
                // The UPDATE waits for a row that another lock transaction is updating.
                if running_rows(s).any(|k| s.attempts[k].pending.is_some()) {
                    return false;
                }
                if rules.proof_on_abandon && !held(s, i) {
                    self.retry(s, i);
                    return true;
                }
                let stale: Vec<usize> = running_rows(s).collect();
                for k in stale {
                    self.set_row(s, k, Outcome::Abandoned);
                    s.history.taken_over = true;
                }
                s.replicas[i as usize].step = Step::Begin;
            }
            Action::Begin(i) => {
                if !self.book_ok(s, i)
                    || (rules.proof_on_begin && !held(s, i))
                    || (rules.begin_reads_done && done(s))
                {
                    self.retry(s, i);
                    return true;
                }
                if done(s) {
                    s.history.after_done = true;
                }
                let in_lock_transaction = self.route == Route::Pooler && !rules.witness;
                s.attempts.push(Attempt {
                    owner: i,
                    row: if in_lock_transaction {
                        Outcome::Absent
                    } else {
                        Outcome::Running
                    },
                    pending: in_lock_transaction.then_some(Outcome::Running),
                    child: Child::NotStarted,
                    conn: false,
                    work: Work::None,
                    work_done: false,
                });
                let r = &mut s.replicas[i as usize];
                r.attempt = Some((s.attempts.len() - 1) as u8);
                r.step = Step::Spawn;
            }
            Action::Spawn(i) => {
                let k = s.replicas[i as usize].attempt.unwrap() as usize;
                s.attempts[k].child = Child::Running;
                s.replicas[i as usize].step = Step::Supervise;
            }
            Action::Beat(i) => {
                let r = s.replicas[i as usize];
                let k = r.attempt.unwrap() as usize;
                let mut paused = false;
                if r.thawed && rules.pause_on_thaw && s.attempts[k].child == Child::Running {
                    s.attempts[k].child = Child::Paused;
                    paused = true;
                }
                s.replicas[i as usize].thawed = false;
                let a = s.attempts[k];
                let row_running = a.pending.unwrap_or(a.row) == Outcome::Running;
                let ok = held(s, i) && row_running && self.book_ok(s, i);
                if ok || !rules.fencing {
                    if paused {
                        s.attempts[k].child = Child::Running;
                    }
                    if !ok {
                        s.replicas[i as usize].lost_seen = true;
                    }
                } else {
                    // `Holding::fence`: SIGKILL of the migration's process group at once.
                    self.fence(s, i, k);
                }
            }
            Action::ChildExit(i) => {
                let k = s.replicas[i as usize].attempt.unwrap() as usize;
                s.replicas[i as usize].step = match s.attempts[k].child {
                    Child::Finished => Step::Record { done: true },
                    _ => Step::EndOwn,
                };
            }
            Action::EndOwn(i) => {
                if !self.book_ok(s, i) {
                    // The row stays `running`: the next holder waits out our fencing time.
                    self.free_lock(s, i);
                    s.replicas[i as usize].step = Step::Exited;
                    return true;
                }
                if rules.end_own_sessions {
                    let k = s.replicas[i as usize].attempt.unwrap() as usize;
                    self.end_sessions(s, k);
                }
                s.replicas[i as usize].step = Step::Record { done: false };
            }
            Action::Record(i) => {
                let Step::Record { done: is_done } = s.replicas[i as usize].step else {
                    unreachable!()
                };
                if !held(s, i) {
                    self.free_lock(s, i);
                    s.replicas[i as usize].step = Step::Exited;
                    return true;
                }
                let k = s.replicas[i as usize].attempt.unwrap() as usize;
                let a = s.attempts[k];
                let outcome = if is_done {
                    Outcome::Done
                } else {
                    Outcome::Failed
                };
                let recorded = a.pending.unwrap_or(a.row) == Outcome::Running;
                if recorded {
                    if self.route == Route::Direct && rules.commit_before_unlock {
                        self.set_row(s, k, outcome);
                    } else {
                        s.attempts[k].pending = Some(outcome);
                    }
                }
                s.replicas[i as usize].step = Step::Unlock {
                    done: is_done,
                    recorded,
                };
            }
            Action::Unlock(i) => {
                let Step::Unlock {
                    done: is_done,
                    recorded,
                } = s.replicas[i as usize].step
                else {
                    unreachable!()
                };
                if !held(s, i) {
                    self.free_lock(s, i);
                    s.replicas[i as usize].step = Step::Exited;
                    return true;
                }
                if self.route == Route::Pooler {
                    // COMMIT: the row and the end of the lock in one.
                    self.commit(s, i);
                    s.lock = None;
                } else {
                    s.lock = None;
                    if !rules.commit_before_unlock {
                        s.replicas[i as usize].step = Step::Commit { done: is_done };
                        return true;
                    }
                }
                if is_done && recorded {
                    self.end(s, i, Step::Migrated);
                } else {
                    s.replicas[i as usize].step = Step::Exited;
                }
            }
            Action::Commit(i) => {
                let Step::Commit { done: is_done } = s.replicas[i as usize].step else {
                    unreachable!()
                };
                let k = s.replicas[i as usize].attempt.unwrap() as usize;
                let committed = s.attempts[k].pending.is_some();
                self.commit(s, i);
                if is_done && committed {
                    self.end(s, i, Step::Migrated);
                } else {
                    s.replicas[i as usize].step = Step::Exited;
                }
            }
            Action::RecordFenced(i) => {
                let k = s.replicas[i as usize].attempt.unwrap() as usize;
                if rules.end_own_sessions {
                    self.end_sessions(s, k);
                }
                if s.attempts[k].row == Outcome::Running {
                    self.set_row(s, k, Outcome::Failed);
                    s.history.fenced_recorded = true;
                }
                s.replicas[i as usize].step = Step::Exited;
            }
            Action::ChildConnect(k) => s.attempts[k as usize].conn = true,
            Action::ChildStatement(k) => {
                let k = k as usize;
                let race = self.route == Route::Pooler && self.in_thaw_instant(s, k);
                if done(s) && !race {
                    s.history.after_done = true;
                }
                s.attempts[k].work = if race { Work::ThawRace } else { Work::Busy };
            }
            Action::StatementEnds(k) => {
                let a = &mut s.attempts[k as usize];
                a.work = Work::None;
                if a.child.alive() {
                    a.work_done = true;
                }
            }
            Action::ChildFinishes(k) => {
                let a = &mut s.attempts[k as usize];
                a.child = Child::Finished;
                a.conn = false;
            }
            Action::CrashGate(i) => {
                self.free_lock(s, i);
                let r = s.replicas[i as usize];
                if let Some(k) = r.attempt {
                    let a = &mut s.attempts[k as usize];
                    if self.rules.guard && a.child.alive() {
                        a.child = Child::Dead;
                        a.conn = false;
                    }
                }
                let r = &mut s.replicas[i as usize];
                r.step = Step::Crashed;
                r.witness = false;
                r.thawed = false;
            }
            Action::KillChild(k) => {
                let a = &mut s.attempts[k as usize];
                a.child = Child::Dead;
                a.conn = false;
            }
            Action::LoseLockSession(i) => self.free_lock(s, i),
            Action::Freeze(i) => s.replicas[i as usize].frozen = true,
            Action::Thaw(i) => {
                let r = &mut s.replicas[i as usize];
                r.frozen = false;
                r.thawed = true;
            }
            Action::RestartPostgres => {
                if let Some(i) = s.lock {
                    self.free_lock(s, i);
                }
                for a in &mut s.attempts {
                    a.work = Work::None;
                    if self.route == Route::Direct {
                        a.conn = false;
                    }
                }
                for r in &mut s.replicas {
                    r.witness = false;
                }
            }
        }
        if action.is_fault() {
            s.faults_left -= 1;
        }
        true
    }

    /// Whether `action` may happen in `s` at all (its step, not its outcome).
    fn enabled(&self, s: &State, action: Action) -> bool {
        let f = self.faults;
        let fault_ok = s.faults_left > 0;
        let rep = |i: u8| &s.replicas[i as usize];
        // A gate runs unless frozen; once thawed, its first act is the heartbeat.
        let gate = |i: u8, step: Step| {
            let r = rep(i);
            r.step == step && !r.frozen && !r.thawed
        };
        // Both thaw in the same instant: until the gate's heartbeat pauses its migration,
        // only that migration's statement in flight can race it. Without the pause the
        // migration runs on through the heartbeat's round trip.
        if let Some(t) = s
            .replicas
            .iter()
            .position(|r| r.thawed && self.rules.pause_on_thaw)
        {
            return match action {
                Action::Beat(i) => i as usize == t,
                Action::ChildStatement(k) => {
                    s.replicas[t].attempt == Some(k) && self.statement_ok(s, k)
                }
                _ => false,
            };
        }
        match action {
            Action::Read(i) => gate(i, Step::Read),
            Action::TryLock(i) => gate(i, Step::TryLock),
            Action::Reread(i) => gate(i, Step::Reread),
            Action::Stale(i) => gate(i, Step::Stale),
            Action::FenceLook(i) => gate(i, Step::FenceWait),
            Action::EndEarlier(i) => gate(i, Step::EndEarlier),
            Action::Abandon(i) => gate(i, Step::Abandon),
            Action::Begin(i) => gate(i, Step::Begin),
            Action::Spawn(i) => gate(i, Step::Spawn),
            Action::Beat(i) => {
                let r = rep(i);
                if r.step != Step::Supervise || r.frozen {
                    return false;
                }
                if r.thawed {
                    return true;
                }
                // A heartbeat that finds everything in order changes nothing: only one that
                // fails is a step (and, without fencing, only the first).
                let a = &s.attempts[r.attempt.unwrap() as usize];
                let row_running = a.pending.unwrap_or(a.row) == Outcome::Running;
                let ok = held(s, i) && row_running && self.book_ok(s, i);
                !ok && !r.lost_seen
            }
            Action::ChildExit(i) => {
                gate(i, Step::Supervise)
                    && matches!(
                        s.attempts[rep(i).attempt.unwrap() as usize].child,
                        Child::Finished | Child::Dead
                    )
            }
            Action::EndOwn(i) => gate(i, Step::EndOwn),
            Action::Record(i) => matches!(rep(i).step, Step::Record { .. }) && !rep(i).frozen,
            Action::Unlock(i) => matches!(rep(i).step, Step::Unlock { .. }) && !rep(i).frozen,
            Action::Commit(i) => matches!(rep(i).step, Step::Commit { .. }) && !rep(i).frozen,
            Action::RecordFenced(i) => gate(i, Step::Fenced),
            Action::ChildConnect(k) => {
                let a = &s.attempts[k as usize];
                a.child == Child::Running
                    && !a.conn
                    && !a.work_done
                    && !self.child_frozen(s, k as usize)
                    && !self.in_thaw_instant(s, k as usize)
            }
            Action::ChildStatement(k) => self.statement_ok(s, k),
            Action::StatementEnds(k) => s.attempts[k as usize].work != Work::None,
            Action::ChildFinishes(k) => {
                let a = &s.attempts[k as usize];
                a.child == Child::Running
                    && a.work_done
                    && a.work == Work::None
                    && !self.child_frozen(s, k as usize)
            }
            Action::CrashGate(i) => {
                fault_ok && f.crash_gate && !rep(i).step.ended() && !rep(i).frozen
            }
            Action::KillChild(k) => {
                fault_ok && f.kill_child && s.attempts[k as usize].child.alive()
            }
            Action::LoseLockSession(i) => {
                fault_ok
                    && held(s, i)
                    && match f.lose_lock {
                        LoseLock::Never => false,
                        LoseLock::Anywhere => true,
                        LoseLock::InFenceWait => rep(i).step == Step::FenceWait,
                    }
            }
            Action::Freeze(i) => {
                let r = rep(i);
                fault_ok
                    && f.freeze
                    && r.step == Step::Supervise
                    && !r.frozen
                    && !r.thawed
                    && s.attempts[r.attempt.unwrap() as usize].child == Child::Running
            }
            Action::Thaw(i) => rep(i).frozen,
            Action::RestartPostgres => fault_ok && f.restart_postgres,
        }
    }

    fn statement_ok(&self, s: &State, k: u8) -> bool {
        let a = &s.attempts[k as usize];
        a.child == Child::Running
            && a.conn
            && a.work == Work::None
            && !a.work_done
            && !self.child_frozen(s, k as usize)
    }

    fn all_actions(&self, s: &State, out: &mut Vec<Action>) {
        for i in 0..self.replicas {
            out.extend([
                Action::Read(i),
                Action::TryLock(i),
                Action::Reread(i),
                Action::Stale(i),
                Action::FenceLook(i),
                Action::EndEarlier(i),
                Action::Abandon(i),
                Action::Begin(i),
                Action::Spawn(i),
                Action::Beat(i),
                Action::ChildExit(i),
                Action::EndOwn(i),
                Action::Record(i),
                Action::Unlock(i),
                Action::Commit(i),
                Action::RecordFenced(i),
                Action::CrashGate(i),
                Action::LoseLockSession(i),
                Action::Freeze(i),
                Action::Thaw(i),
            ]);
        }
        for k in 0..s.attempts.len() as u8 {
            out.extend([
                Action::ChildConnect(k),
                Action::ChildStatement(k),
                Action::StatementEnds(k),
                Action::ChildFinishes(k),
                Action::KillChild(k),
            ]);
        }
        out.push(Action::RestartPostgres);
    }
}

// ---------------------------------------------------------------------------------------------
// The properties.

const ONE_AT_A_TIME: &str = "at most one attempt's database work at any instant";
const ONE_AT_A_TIME_BUT_THAW: &str =
    "at most one attempt's database work, the documented thaw race behind a pooler aside";
const DONE_IS_FINAL: &str = "a release recorded done is never attempted again";
const NO_EARLY_START: &str = "no replica starts its app before the release is done";
const SESSIONS_FIRST: &str =
    "an attempt's sessions are gone before it is recorded failed or abandoned";
const NOTHING_STUCK: &str = "once faults stop, nothing is stuck: every replica has ended";
const EVERY_REPLICA_ENDS: &str = "every replica ends";
const SOMETIMES_DONE: &str = "sometimes: the release is migrated and recorded done";
const SOMETIMES_TAKEOVER: &str = "sometimes: a taker-over marks a vanished holder's attempt";
const SOMETIMES_FENCED: &str = "sometimes: a fenced holder records its failed attempt";
const SOMETIMES_GIVES_UP: &str = "sometimes: a taker-over loses the lock and waits again";
const SOMETIMES_ALL_FOLLOW: &str = "sometimes: every replica starts the app";
const SOMETIMES_THAW_RACE: &str = "sometimes: a thawed migration's statement races its pause";

/// The safety properties every correct configuration keeps (the strict one-at-a-time aside,
/// which behind a pooler with freezes is the documented limit).
const SAFETY: [&str; 5] = [
    ONE_AT_A_TIME_BUT_THAW,
    DONE_IS_FINAL,
    NO_EARLY_START,
    SESSIONS_FIRST,
    NOTHING_STUCK,
];

fn work_count(s: &State, strict: bool) -> usize {
    s.attempts
        .iter()
        .filter(|a| match a.work {
            Work::None => false,
            Work::Busy => true,
            Work::ThawRace => strict,
        })
        .count()
}

impl Model for Gate {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        let replica = Replica {
            step: Step::Read,
            attempt: None,
            frozen: false,
            thawed: false,
            witness: false,
            saw_stale: false,
            seen_busy: false,
            lost_seen: false,
        };
        vec![State {
            replicas: vec![replica; self.replicas as usize],
            attempts: Vec::new(),
            lock: None,
            faults_left: self.faults.budget,
            history: History::default(),
        }]
    }

    fn actions(&self, s: &State, actions: &mut Vec<Action>) {
        let mut all = Vec::new();
        self.all_actions(s, &mut all);
        actions.extend(all.into_iter().filter(|&a| self.enabled(s, a)));
    }

    fn next_state(&self, s: &State, action: Action) -> Option<State> {
        let mut next = s.clone();
        self.step(&mut next, action).then_some(next)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always(ONE_AT_A_TIME, |_: &Gate, s: &State| {
                work_count(s, true) <= 1
            }),
            Property::always(ONE_AT_A_TIME_BUT_THAW, |_: &Gate, s: &State| {
                work_count(s, false) <= 1
            }),
            Property::always(DONE_IS_FINAL, |_: &Gate, s: &State| !s.history.after_done),
            Property::always(NO_EARLY_START, |_: &Gate, s: &State| !s.history.early_start),
            Property::always(SESSIONS_FIRST, |_: &Gate, s: &State| {
                !s.history.recorded_with_sessions
            }),
            Property::always(NOTHING_STUCK, |g: &Gate, s: &State| {
                s.replicas.iter().all(|r| r.step.ended()) || g.can_go_on(s)
            }),
            Property::eventually(EVERY_REPLICA_ENDS, |_: &Gate, s: &State| {
                s.replicas.iter().all(|r| r.step.ended())
            }),
            Property::sometimes(SOMETIMES_DONE, |_: &Gate, s: &State| done(s)),
            Property::sometimes(SOMETIMES_TAKEOVER, |_: &Gate, s: &State| {
                s.history.taken_over
            }),
            Property::sometimes(SOMETIMES_FENCED, |_: &Gate, s: &State| {
                s.history.fenced_recorded
            }),
            Property::sometimes(SOMETIMES_GIVES_UP, |_: &Gate, s: &State| {
                s.history.gave_up_turn
            }),
            Property::sometimes(SOMETIMES_ALL_FOLLOW, |_: &Gate, s: &State| {
                s.replicas
                    .iter()
                    .all(|r| matches!(r.step, Step::Followed | Step::Migrated))
            }),
            Property::sometimes(SOMETIMES_THAW_RACE, |_: &Gate, s: &State| {
                s.attempts.iter().any(|a| a.work == Work::ThawRace)
            }),
        ]
    }
}

impl Gate {
    /// Whether anything but a fault can happen in `s`.
    fn can_go_on(&self, s: &State) -> bool {
        let mut actions = Vec::new();
        self.actions(s, &mut actions);
        actions
            .into_iter()
            .any(|a| !a.is_fault() && self.next_state(s, a).is_some())
    }
}

// ---------------------------------------------------------------------------------------------
// Running the checker.

/// What a run found, with its figures.
struct Run {
    found: HashMap<&'static str, Path<State, Action>>,
    states: usize,
    unique: usize,
    depth: usize,
    secs: f64,
}

/// The size of the main checks: 3 replicas and 3 faults by default; `MIGRATIONS_GATE_MODEL=deep`
/// for DEEP, or `=RxF` for R replicas and F faults.
fn size() -> (u8, u8) {
    const DEEP: (u8, u8) = (4, 3);
    match std::env::var("MIGRATIONS_GATE_MODEL").as_deref() {
        Ok("deep") => DEEP,
        Ok(v) => v
            .split_once('x')
            .and_then(|(r, f)| Some((r.parse().ok()?, f.parse().ok()?)))
            .unwrap_or_else(|| panic!("MIGRATIONS_GATE_MODEL={v}: deep, or RxF such as 3x4")),
        Err(_) => (3, 3),
    }
}

/// Checks `gate` exhaustively (or until `stop_at` is found), and prints its figures.
fn check(name: &str, gate: Gate, stop_at: Option<&'static str>) -> Run {
    let started = Instant::now();
    let mut builder = gate.checker();
    if let Some(p) = stop_at {
        builder = builder.finish_when(HasDiscoveries::AnyOf(BTreeSet::from([p])));
    }
    let checker = builder.spawn_bfs().join();
    let run = Run {
        found: checker.discoveries(),
        states: checker.state_count(),
        unique: checker.unique_state_count(),
        depth: checker.max_depth(),
        secs: started.elapsed().as_secs_f64(),
    };
    eprintln!(
        "model {name}: {} replicas, {:?}, {} faults: {} states, {} unique, max depth {}, {:.1} s",
        gate.replicas, gate.route, gate.faults.budget, run.states, run.unique, run.depth, run.secs
    );
    run
}

impl Run {
    fn holds(&self, gate: &Gate, property: &'static str) {
        if let Some(path) = self.found.get(property) {
            panic!(
                "{property}: counterexample\n{}",
                trace(gate, path.clone().into_vec())
            );
        }
    }

    fn counterexample(&self, gate: &Gate, property: &'static str) -> String {
        let path = self
            .found
            .get(property)
            .unwrap_or_else(|| panic!("no counterexample to {property:?}: the rule is vacuous"));
        let text = trace(gate, path.clone().into_vec());
        eprintln!("counterexample to {property:?}:\n{text}");
        text
    }

    fn reached(&self, property: &'static str) {
        assert!(
            self.found.contains_key(property),
            "never reached: {property}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Readable traces.

fn name(i: u8) -> char {
    (b'A' + i) as char
}

fn attempt_name(s: &State, k: u8) -> String {
    format!(
        "{}'s attempt #{}",
        name(s.attempts[k as usize].owner),
        k + 1
    )
}

/// One step of a trace: who did what (the function), and what came of it.
fn narrate(g: &Gate, before: &State, action: Action, after: &State) -> String {
    let step_after = |i: u8| after.replicas[i as usize].step;
    let retried =
        |i: u8| step_after(i) == Step::Read && before.replicas[i as usize].step != Step::TryLock;
    match action {
        Action::Read(i) => match step_after(i) {
            Step::Followed => format!(
                "{} reads the ledger: done; starts the app (read_release)",
                name(i)
            ),
            _ => format!("{} reads the ledger: not done (read_release)", name(i)),
        },
        Action::TryLock(i) => match (after.lock, step_after(i)) {
            (_, Step::Followed) => format!("{} sees the lock free and starts the app", name(i)),
            (Some(l), Step::Reread) if l == i => {
                format!("{} takes the lock (lock::try_acquire)", name(i))
            }
            _ => format!("{} finds the lock busy (lock::try_acquire)", name(i)),
        },
        Action::Reread(i) => match step_after(i) {
            Step::Read => format!("{} has lost its lock session; waits again", name(i)),
            Step::Followed => format!(
                "{} re-reads under the lock: done; unlocks and starts the app (done_under_lock)",
                name(i)
            ),
            _ => format!(
                "{} re-reads under the lock: not done (done_under_lock)",
                name(i)
            ),
        },
        Action::Stale(i) | Action::FenceLook(i) => match step_after(i) {
            Step::Read => format!(
                "{} looks at the ledger: its lock is gone; gives up its turn (wait_out_fence)",
                name(i)
            ),
            Step::FenceWait => format!(
                "{} looks at the ledger: a vanished holder's attempt is running; waits out its fencing time (wait_out_vanished_holder)",
                name(i)
            ),
            _ if matches!(action, Action::FenceLook(_)) => format!(
                "{} ends its fencing wait: the vanished holder has surely stopped{} (wait_out_fence)",
                name(i),
                if held(before, i) {
                    ""
                } else {
                    ", and the look does not prove the lock"
                }
            ),
            _ if after.replicas[i as usize].saw_stale => format!(
                "{} looks at the ledger: a vanished holder's attempt is running; goes on without waiting",
                name(i)
            ),
            _ => format!(
                "{} looks at the ledger: nothing running (ledger::stale)",
                name(i)
            ),
        },
        Action::EndEarlier(i) => {
            if retried(i) {
                return format!(
                    "{} may not end earlier sessions: its lock is gone; waits again",
                    name(i)
                );
            }
            let ended: Vec<String> = (0..before.attempts.len())
                .filter(|&k| {
                    has_sessions(g, &before.attempts[k]) && !has_sessions(g, &after.attempts[k])
                })
                .map(|k| attempt_name(before, k as u8))
                .collect();
            if ended.is_empty() {
                format!(
                    "{} finds no earlier attempt's session (terminate_earlier_sessions)",
                    name(i)
                )
            } else {
                format!(
                    "{} ends the sessions of {} (terminate_earlier_sessions)",
                    name(i),
                    ended.join(", ")
                )
            }
        }
        Action::Abandon(i) => {
            if retried(i) {
                return format!(
                    "{} cannot prove the lock to mark the attempt; waits again",
                    name(i)
                );
            }
            let marked: Vec<String> = (0..before.attempts.len())
                .filter(|&k| before.attempts[k].row != after.attempts[k].row)
                .map(|k| attempt_name(before, k as u8))
                .collect();
            format!(
                "{} marks {} abandoned{} (abandon_stale)",
                name(i),
                if marked.is_empty() {
                    "nothing".to_string()
                } else {
                    marked.join(", ")
                },
                if held(before, i) {
                    ""
                } else {
                    " without holding the lock"
                }
            )
        }
        Action::Begin(i) => match after.replicas[i as usize].attempt {
            Some(k) if before.replicas[i as usize].attempt != Some(k) => format!(
                "{} begins attempt #{}{} (ledger::begin)",
                name(i),
                k + 1,
                if held(before, i) {
                    ""
                } else {
                    " without holding the lock"
                }
            ),
            _ => format!(
                "{} cannot begin (lock lost or release done); waits again",
                name(i)
            ),
        },
        Action::Spawn(i) => format!("{} starts its migration (child::spawn)", name(i)),
        Action::Beat(i) => match step_after(i) {
            Step::Fenced => format!(
                "{}{}'s heartbeat finds its lock session gone; kills its migration (Holding::fence)",
                name(i),
                if before.replicas[i as usize].thawed {
                    " thawed, pauses its migration;"
                } else {
                    ""
                }
            ),
            _ if before.replicas[i as usize].thawed => format!(
                "{} thawed: pauses its migration, proves the lock (Holding::beat)",
                name(i)
            ),
            _ => format!("{}'s heartbeat fails; without fencing it goes on", name(i)),
        },
        Action::ChildExit(i) => format!("{} sees its migration exit (Holding::supervise)", name(i)),
        Action::EndOwn(i) => format!("{} ends its attempt's sessions (end_own_sessions)", name(i)),
        Action::Record(i) => format!("{} records the outcome (ledger::finish)", name(i)),
        Action::Unlock(i) => format!("{} frees the lock (lock::unlock)", name(i)),
        Action::Commit(i) => format!("{} commits after unlocking", name(i)),
        Action::RecordFenced(i) => {
            format!("{} records its attempt failed (record_fenced)", name(i))
        }
        Action::ChildConnect(k) => format!("the migration of {} connects", attempt_name(before, k)),
        Action::ChildStatement(k) => format!(
            "the migration of {} sends a statement{}",
            attempt_name(before, k),
            if after.attempts[k as usize].work == Work::ThawRace {
                " in the instant of the thaw"
            } else {
                ""
            }
        ),
        Action::StatementEnds(k) => format!("the statement of {} commits", attempt_name(before, k)),
        Action::ChildFinishes(k) => format!("the migration of {} exits 0", attempt_name(before, k)),
        Action::CrashGate(i) => format!("FAULT: {}'s gate is killed (kill -9)", name(i)),
        Action::KillChild(k) => format!("FAULT: the migration of {} dies", attempt_name(before, k)),
        Action::LoseLockSession(i) => format!("FAULT: the server ends {}'s lock session", name(i)),
        Action::Freeze(i) => format!("FAULT: {} and its migration are frozen", name(i)),
        Action::Thaw(i) => format!("{} and its migration thaw", name(i)),
        Action::RestartPostgres => "FAULT: PostgreSQL restarts".to_string(),
    }
}

/// A counterexample as numbered steps, then what is wrong at its end.
fn trace(g: &Gate, path: Vec<(State, Option<Action>)>) -> String {
    let mut out = String::new();
    for (n, w) in path.windows(2).enumerate() {
        let (before, Some(action)) = (&w[0].0, w[0].1) else {
            continue;
        };
        out.push_str(&format!(
            "{:2}. {}\n",
            n + 1,
            narrate(g, before, action, &w[1].0)
        ));
    }
    let last = &path.last().unwrap().0;
    let working: Vec<String> = (0..last.attempts.len())
        .filter(|&k| last.attempts[k].work != Work::None)
        .map(|k| attempt_name(last, k as u8))
        .collect();
    if !working.is_empty() {
        out.push_str(&format!(
            "    Now running on the server: statements of {}.\n",
            working.join(" and ")
        ));
    }
    out
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Route::Direct => "direct",
            Route::Pooler => "pooler",
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The checks.

/// The configuration the main checks run ([`size`]), with every fault.
fn main_gate(route: Route) -> Gate {
    let (replicas, budget) = size();
    let mut gate = Gate::new(replicas, route);
    gate.faults.budget = budget;
    gate
}

#[test]
fn the_protocol_holds_on_a_direct_route() {
    let gate = main_gate(Route::Direct);
    let run = check("direct", gate, None);
    for p in SAFETY
        .into_iter()
        .chain([ONE_AT_A_TIME, EVERY_REPLICA_ENDS])
    {
        run.holds(&gate, p);
    }
    for p in [
        SOMETIMES_DONE,
        SOMETIMES_TAKEOVER,
        SOMETIMES_FENCED,
        SOMETIMES_GIVES_UP,
        SOMETIMES_ALL_FOLLOW,
    ] {
        run.reached(p);
    }
}

#[test]
fn the_protocol_holds_behind_a_pooler_without_freezes() {
    let mut gate = main_gate(Route::Pooler);
    gate.faults.freeze = false;
    let run = check("pooler, no freeze", gate, None);
    for p in SAFETY
        .into_iter()
        .chain([ONE_AT_A_TIME, EVERY_REPLICA_ENDS])
    {
        run.holds(&gate, p);
    }
    for p in [
        SOMETIMES_DONE,
        SOMETIMES_TAKEOVER,
        SOMETIMES_FENCED,
        SOMETIMES_GIVES_UP,
        SOMETIMES_ALL_FOLLOW,
    ] {
        run.reached(p);
    }
}

/// docs/design.md, "Frozen holders": behind a pooler, a statement the frozen migration sends
/// in the instant of its thaw, before its gate pauses it, gets a fresh server connection and
/// may run beside the next holder's migration. The checker finds exactly that, and nothing
/// else: every other property holds with all faults, freezes included.
#[test]
fn frozen_holder_behind_a_pooler_is_the_documented_limit() {
    let gate = main_gate(Route::Pooler);
    let run = check("pooler", gate, None);
    let trace = run.counterexample(&gate, ONE_AT_A_TIME);
    assert!(trace.contains("in the instant of the thaw"), "{trace}");
    for p in SAFETY.into_iter().chain([EVERY_REPLICA_ENDS]) {
        run.holds(&gate, p);
    }
    run.reached(SOMETIMES_THAW_RACE);
}

/// Termination, checked exactly rather than with `Property::eventually` (which stateright
/// judges on terminal paths only and can miss at a join of two paths): over every reachable
/// state, the steps that are not faults form no cycle, and every state in which only a fault
/// could happen has every replica ended. So once faults stop, every run ends with every
/// replica exited or started (polling that sees nothing new is not a step: see the top).
#[test]
fn every_replica_ends_once_faults_stop() {
    for route in [Route::Direct, Route::Pooler] {
        let gate = main_gate(route);
        let started = Instant::now();
        let states = terminates(&gate);
        eprintln!(
            "model termination {route}: {states} unique states, {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
}

/// Explores `gate` and checks termination (see `every_replica_ends_once_faults_stop`);
/// returns the number of states.
fn terminates(gate: &Gate) -> usize {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    let fingerprint = |s: &State| BuildHasherDefault::<DefaultHasher>::default().hash_one(s);
    let init = gate.init_states().remove(0);
    let mut index: HashMap<u64, u32> = HashMap::from([(fingerprint(&init), 0)]);
    let mut states = vec![init];
    let mut parent: Vec<Option<(u32, Action)>> = vec![None];
    let mut edges: Vec<Vec<u32>> = Vec::new();
    let path_to = |states: &Vec<State>, parent: &Vec<Option<(u32, Action)>>, mut at: u32| {
        let mut path = vec![(states[at as usize].clone(), None)];
        while let Some((from, action)) = parent[at as usize] {
            path.push((states[from as usize].clone(), Some(action)));
            at = from;
        }
        path.reverse();
        let n = path.len();
        for k in 0..n - 1 {
            path[k].1 = path[k + 1].1;
        }
        path[n - 1].1 = None;
        path
    };
    let mut next = 0;
    while next < states.len() {
        let s = states[next].clone();
        let mut actions = Vec::new();
        gate.actions(&s, &mut actions);
        let mut out = Vec::new();
        for action in actions {
            let Some(t) = gate.next_state(&s, action) else {
                continue;
            };
            let id = *index.entry(fingerprint(&t)).or_insert_with(|| {
                states.push(t);
                parent.push(Some((next as u32, action)));
                (states.len() - 1) as u32
            });
            if !action.is_fault() {
                out.push(id);
            }
        }
        if out.is_empty() && !s.replicas.iter().all(|r| r.step.ended()) {
            panic!(
                "stuck once faults stop:\n{}",
                trace(gate, path_to(&states, &parent, next as u32))
            );
        }
        edges.push(out);
        next += 1;
    }
    // A cycle of steps that are not faults: a run that could go on forever without one.
    let mut colour = vec![0u8; states.len()];
    for root in 0..states.len() {
        if colour[root] != 0 {
            continue;
        }
        let mut stack = vec![(root as u32, 0usize)];
        colour[root] = 1;
        while let Some(&mut (v, ref mut e)) = stack.last_mut() {
            if let Some(&w) = edges[v as usize].get(*e) {
                *e += 1;
                match colour[w as usize] {
                    0 => {
                        colour[w as usize] = 1;
                        stack.push((w, 0));
                    }
                    1 => panic!(
                        "a cycle without faults, through:\n{}",
                        trace(gate, path_to(&states, &parent, w))
                    ),
                    _ => {}
                }
            } else {
                colour[v as usize] = 2;
                stack.pop();
            }
        }
    }
    states.len()
}

// ---------------------------------------------------------------------------------------------
// The model is not vacuous: without each rule, the checker finds a counterexample. Each runs
// the smallest configuration that needs the rule (the route where it matters, the faults
// that break it) and stops at the first counterexample, which is a shortest one (BFS).

/// Removes rules from a model.
type Remove = fn(&mut Rules);

fn without(route: Route, replicas: u8, faults: Faults, remove: Remove) -> Gate {
    let mut gate = Gate::new(replicas, route);
    gate.faults = faults;
    remove(&mut gate.rules);
    gate
}

fn finds(name: &str, gate: Gate, property: &'static str) -> String {
    let run = check(name, gate, Some(property));
    run.counterexample(&gate, property)
}

/// A lock lost just before `begin`: the witness still writes, so without the proof the
/// attempt begins beside the next holder's (behind a pooler; on a direct route the ledger
/// is written on the lock session, which is gone with the lock).
#[test]
fn without_proof_on_begin_finds_a_counterexample() {
    let faults = Faults::with(1, |f| f.lose_lock = LoseLock::Anywhere);
    let gate = without(Route::Pooler, 2, faults, |r| r.proof_on_begin = false);
    finds("without proof on begin", gate, ONE_AT_A_TIME);
}

/// A taker-over that lost its lock marks the new holder's running attempt abandoned while
/// that attempt's sessions run.
#[test]
fn without_proof_on_abandon_finds_a_counterexample() {
    let faults = Faults::with(2, |f| {
        f.crash_gate = true;
        f.lose_lock = LoseLock::Anywhere;
    });
    let gate = without(Route::Pooler, 3, faults, |r| r.proof_on_abandon = false);
    finds("without proof on abandon", gate, SESSIONS_FIRST);
}

/// "Act only on what the lock proves now", removed whole (the code of 2026-12-04): the
/// fencing-wait bug that `tests/chaos.rs` found, a taker-over that lost its lock while it
/// waited out a vanished holder's fencing time and went on beside the replica that took the
/// lock meanwhile. The faults are the chaos schedule's: a holder killed, then the lock
/// session of a taker-over ended during its wait. Its trace is in docs/design.md.
#[test]
fn without_lock_proofs_finds_a_counterexample() {
    let faults = Faults::with(2, |f| {
        f.crash_gate = true;
        f.lose_lock = LoseLock::InFenceWait;
    });
    let gate = without(Route::Pooler, 3, faults, |r| {
        r.proof_on_begin = false;
        r.proof_in_fence_wait = false;
        r.proof_on_end_sessions = false;
        r.proof_on_abandon = false;
    });
    let trace = finds("without lock proofs", gate, ONE_AT_A_TIME);
    assert!(trace.contains("FAULT: the server ends"), "{trace}");
}

/// The re-read under the lock (`done_under_lock`, and `begin`'s own read of the release):
/// a replica that read "not done" just before the holder finished migrates again.
#[test]
fn without_reread_under_lock_finds_a_counterexample() {
    let gate = without(Route::Direct, 2, Faults::NONE, |r| {
        r.reread_under_lock = false;
        r.begin_reads_done = false;
    });
    finds("without re-read under the lock", gate, DONE_IS_FINAL);
}

/// The holder frees the lock before its `done` row commits: the next replica takes the lock,
/// reads "not done" and migrates again. `begin`'s own read of the release backs this rule up
/// (the next holder's `abandon_stale` waits for the row, and `begin` then sees it done), so
/// the test removes both; `rules_that_back_each_other_up` shows either alone holds.
#[test]
fn without_commit_before_unlock_finds_a_counterexample() {
    let gate = without(Route::Direct, 2, Faults::NONE, |r| {
        r.commit_before_unlock = false;
        r.begin_reads_done = false;
    });
    finds("without commit before unlock", gate, DONE_IS_FINAL);
}

/// A holder that lost its session but still runs: without the wait, the taker-over ends its
/// sessions and begins while the old migration is alive, and that migration connects again.
#[test]
fn without_fencing_wait_finds_a_counterexample() {
    let faults = Faults::with(1, |f| f.lose_lock = LoseLock::Anywhere);
    let gate = without(Route::Direct, 2, faults, |r| r.fencing_wait = false);
    finds("without fencing wait", gate, ONE_AT_A_TIME);
}

/// A holder killed while its migration's statement runs: the backend runs it on, and the
/// taker-over's migration starts beside it.
#[test]
fn without_ending_earlier_sessions_finds_a_counterexample() {
    let faults = Faults::with(1, |f| f.crash_gate = true);
    let gate = without(Route::Direct, 2, faults, |r| r.end_earlier_sessions = false);
    finds("without ending earlier sessions", gate, ONE_AT_A_TIME);
}

/// A migration killed mid-statement: its attempt is recorded failed while the statement runs.
#[test]
fn without_ending_own_sessions_finds_a_counterexample() {
    let faults = Faults::with(1, |f| f.kill_child = true);
    let gate = without(Route::Direct, 2, faults, |r| r.end_own_sessions = false);
    finds("without ending own sessions", gate, SESSIONS_FIRST);
}

/// A holder whose heartbeat fails but who lets its migration run.
#[test]
fn without_fencing_finds_a_counterexample() {
    let faults = Faults::with(1, |f| f.lose_lock = LoseLock::Anywhere);
    let gate = without(Route::Direct, 2, faults, |r| r.fencing = false);
    finds("without fencing", gate, ONE_AT_A_TIME);
}

/// A frozen holder, taken over, thaws: without the pause its migration runs during the
/// heartbeat's round trip, connects again and works beside the new holder's, on a direct
/// route too.
#[test]
fn without_pause_on_thaw_finds_a_counterexample() {
    let faults = Faults::with(2, |f| {
        f.lose_lock = LoseLock::Anywhere;
        f.freeze = true;
    });
    let gate = without(Route::Direct, 2, faults, |r| r.pause_on_thaw = false);
    finds("without pause on thaw", gate, ONE_AT_A_TIME);
}

/// A holder killed with `kill -9` and no guard: its migration lives on, unsupervised.
#[test]
fn without_guard_finds_a_counterexample() {
    let faults = Faults::with(1, |f| f.crash_gate = true);
    let gate = without(Route::Direct, 2, faults, |r| r.guard = false);
    finds("without the guard", gate, ONE_AT_A_TIME);
}

/// Behind a pooler without the witness, the attempt row lives in the lock transaction and
/// rolls back with it: a taker-over sees no running attempt and does not wait.
#[test]
fn without_witness_finds_a_counterexample() {
    let faults = Faults::with(1, |f| f.lose_lock = LoseLock::Anywhere);
    let gate = without(Route::Pooler, 2, faults, |r| r.witness = false);
    finds("without the witness", gate, ONE_AT_A_TIME);
}

/// A waiter that goes on because the lock became free: the holder's migration failed.
#[test]
fn without_positive_signal_finds_a_counterexample() {
    let faults = Faults::with(1, |f| f.kill_child = true);
    let gate = without(Route::Direct, 2, faults, |r| r.positive_signal = false);
    finds("without the positive signal", gate, NO_EARLY_START);
}

/// Defence in depth, shown rather than claimed: each of these removed alone leaves every
/// property holding, because another rule covers the same case. The proofs in the fencing
/// wait and on ending earlier sessions are backed by the proof on `begin` (a turn taken
/// without the lock cannot begin); `done_under_lock` and `begin`'s read of the release back
/// each other; commit-before-unlock is backed by `begin`'s read (see above). On a direct
/// route no proof matters: the lock is lost only with its session, and every statement on
/// it fails.
#[test]
fn rules_that_back_each_other_up() {
    let removals: [(&str, Remove); 5] = [
        ("proof in the fencing wait", |r| {
            r.proof_in_fence_wait = false
        }),
        ("proof on ending sessions", |r| {
            r.proof_on_end_sessions = false
        }),
        ("re-read under the lock", |r| r.reread_under_lock = false),
        ("begin's read of the release", |r| {
            r.begin_reads_done = false
        }),
        ("commit before unlock", |r| r.commit_before_unlock = false),
    ];
    for (what, remove) in removals {
        for route in [Route::Direct, Route::Pooler] {
            let mut gate = Gate::new(3, route);
            gate.faults.freeze = route == Route::Direct;
            remove(&mut gate.rules);
            let run = check(&format!("backed up: {what}"), gate, None);
            for p in SAFETY.into_iter().chain([ONE_AT_A_TIME]) {
                run.holds(&gate, p);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Bound to the code. The model cites functions of `src/`; these two checks fail when the code
// moves away from it, so that a change to the protocol's steps shows up here, where the model
// must follow it (or say why not).

/// The functions the model's actions and steps stand for, as (module, function): the function
/// must be defined in `src/<module>.rs` or under `src/<module>/`.
const CITED: &[(&str, &str)] = &[
    ("protocol", "round"),
    ("protocol", "read_release"),
    ("protocol", "take_over"),
    ("protocol", "configure_lock_session"),
    ("protocol", "done_under_lock"),
    ("protocol", "open_witness"),
    ("protocol", "wait_out_vanished_holder"),
    ("protocol", "terminate_earlier_sessions"),
    ("protocol", "lost"),
    ("lock", "try_acquire"),
    ("lock", "unlock"),
    ("lock", "held_by_us"),
    ("ledger", "is_done"),
    ("ledger", "stale"),
    ("ledger", "abandon_stale"),
    ("ledger", "begin"),
    ("ledger", "heartbeat"),
    ("ledger", "finish"),
    ("ledger", "record_fenced"),
    ("holding", "new_attempt"),
    ("holding", "wait_out_fence"),
    ("holding", "terminate_sessions"),
    ("holding", "migrate"),
    ("holding", "supervise"),
    ("holding", "beat"),
    ("holding", "heartbeat"),
    ("holding", "fence"),
    ("holding", "end"),
    ("holding", "end_own_sessions"),
    ("holding", "record_and_unlock"),
    ("holding", "record_fenced"),
    ("sessions", "terminate"),
    ("sessions", "while_holding"),
    ("child", "spawn"),
];

/// Every call in the protocol's step functions, with what the model makes of it: an action or
/// step of the model, or why it is left out. A call that is not listed (a new step), or a
/// listed one that is gone, fails `the_protocols_steps_are_all_in_the_model`.
const STEPS: &[(&str, &str, Calls)] = &[
    (
        "protocol",
        "round",
        &[
            ("read_release", "Action::Read"),
            ("same_application", "left out: one application"),
            ("follower", "Step::Followed"),
            ("keep_or_drop", "left out: waiting slots, LISTEN"),
            ("ensure_ledger", "left out: DDL, before any lock"),
            ("app_column", "left out: one application"),
            ("route", "Route"),
            ("try_acquire", "Action::TryLock"),
            ("take_over", "Action::Reread and what follows"),
        ],
    ),
    (
        "protocol",
        "take_over",
        &[
            (
                "configure_lock_session",
                "Action::TryLock (the proof is `held`)",
            ),
            ("done_under_lock", "Action::Reread"),
            ("same_application", "left out: one application"),
            ("refuse_failing_release", "left out: --max-failures"),
            ("open_witness", "Action::Reread (Replica::witness)"),
            (
                "wait_out_vanished_holder",
                "Action::Stale, Action::FenceLook",
            ),
            (
                "terminate_earlier_sessions",
                "Action::EndEarlier, Action::Abandon",
            ),
            ("attempts", "left out: a read for the log"),
            ("new_attempt", "Action::Begin"),
            ("begin", "Action::Begin"),
            ("lost", "Gate::retry"),
            ("tool_state", "left out: the tool's lock rows and markers"),
        ],
    ),
    (
        "protocol",
        "wait_out_vanished_holder",
        &[
            ("stale", "Action::Stale"),
            ("lost", "Gate::retry"),
            ("wait_out_fence", "Action::FenceLook"),
        ],
    ),
    (
        "protocol",
        "terminate_earlier_sessions",
        &[
            (
                "unfinished",
                "Action::EndEarlier: rows running, failed, abandoned",
            ),
            ("while_holding", "Rules::proof_on_end_sessions"),
            ("terminate_sessions", "Action::EndEarlier"),
            ("lost", "Gate::retry"),
            ("abandon_stale", "Action::Abandon"),
        ],
    ),
    (
        "holding",
        "wait_out_fence",
        &[
            ("stale", "Action::FenceLook (Gate::fence_time_over)"),
            ("sleep", "time is an ordering"),
        ],
    ),
    (
        "holding",
        "beat",
        &[
            ("pause", "Action::Beat after a thaw"),
            ("heartbeat", "Action::Beat"),
            ("resume", "Action::Beat"),
            (
                "remember_sessions",
                "left out: sessions are the attempt's by construction",
            ),
        ],
    ),
    (
        "holding",
        "fence",
        &[
            ("stop", "Gate::fence (SIGKILL)"),
            ("record_fenced", "Action::RecordFenced"),
        ],
    ),
    (
        "holding",
        "end",
        &[
            ("end_own_sessions", "Action::EndOwn"),
            ("close", "Gate::free_lock"),
            ("record_and_unlock", "Action::Record, Action::Unlock"),
        ],
    ),
    (
        "holding",
        "record_and_unlock",
        &[("finish", "Action::Record"), ("unlock", "Action::Unlock")],
    ),
];

/// Each call of a step function, and what the model makes of it.
type Calls = &'static [(&'static str, &'static str)];

/// Calls that are plumbing in any step function: accessors, error mapping, logging, time.
const PLUMBING: &[&str] = &[
    "replica",
    "classify",
    "slots",
    "map",
    "map_err",
    "pg",
    "lock",
    "as_mut",
    "release",
    "new",
    "ok",
    "with_history",
    "with_tool_notes",
    "Attempt",
    "Hold",
    "identity",
    "tables",
    "ledger",
    "username",
    "to_string",
    "clone",
    "elapsed",
    "as_millis",
    "Unavailable",
    "ended",
    "short",
    "pgid",
    "now",
    "from_secs_f64",
    "min",
    "saturating_duration_since",
    "deadline",
    "is_zero",
    "drop",
    "finish",
    "prefix",
    "Box",
    "format",
    "unwrap_or",
    "unwrap_or_default",
    "into",
    "as_ref",
    "is_some",
];

/// The Rust sources of `src/<module>.rs` and `src/<module>/`.
fn module_sources(module: &str) -> Vec<(std::path::PathBuf, String)> {
    fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = vec![src.join(format!("{module}.rs"))];
    walk(&src.join(module), &mut files);
    files
        .into_iter()
        .filter_map(|p| std::fs::read_to_string(&p).ok().map(|text| (p, text)))
        .collect()
}

/// `text` with string literals emptied and line comments removed, so that braces and
/// parentheses in them do not count.
fn code_only(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                out.push('"');
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => {
                            chars.next();
                        }
                        '"' => break,
                        _ => {}
                    }
                }
                out.push('"');
            }
            '/' if chars.peek() == Some(&'/') => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        out.push('\n');
                        break;
                    }
                }
            }
            _ => out.push(c),
        }
    }
    out
}

/// The body of `fn name` in `code`, braces included.
fn fn_body<'a>(code: &'a str, name: &str) -> Option<&'a str> {
    let mut from = 0;
    while let Some(at) = code[from..].find(&format!("fn {name}")) {
        let start = from + at;
        from = start + 3;
        let rest = &code[start + 3 + name.len()..];
        if !rest.starts_with(['(', '<']) {
            continue;
        }
        let open = start + code[start..].find('{')?;
        let mut depth = 0;
        for (k, c) in code[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        return Some(&code[open..=open + k]);
                    }
                }
                _ => {}
            }
        }
    }
    None
}

/// The names called in `body` (`name(`, `.name(`, `Path::name(`), first call first, once each.
fn calls(body: &str) -> Vec<String> {
    const KEYWORDS: &[&str] = &[
        "if", "match", "while", "for", "return", "in", "move", "Some", "Ok", "Err", "let",
    ];
    let mut found: Vec<String> = Vec::new();
    let bytes = body.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut k = 0;
    while k < bytes.len() {
        if ident(bytes[k]) && (k == 0 || !ident(bytes[k - 1])) {
            let start = k;
            while k < bytes.len() && ident(bytes[k]) {
                k += 1;
            }
            let word = &body[start..k];
            let mut j = k;
            while j < bytes.len() && bytes[j] == b' ' {
                j += 1;
            }
            let is_call = j < bytes.len() && bytes[j] == b'(';
            let numeric = bytes[start].is_ascii_digit();
            if is_call && !numeric && !KEYWORDS.contains(&word) && !found.iter().any(|f| f == word)
            {
                found.push(word.to_string());
            }
        } else {
            k += 1;
        }
    }
    found
}

#[test]
fn the_model_cites_functions_that_exist() {
    let mut missing = Vec::new();
    for &(module, name) in CITED {
        let defined = module_sources(module)
            .iter()
            .any(|(_, text)| fn_body(&code_only(text), name).is_some());
        if !defined {
            missing.push(format!("{module}::{name}"));
        }
    }
    assert!(
        missing.is_empty(),
        "the model cites functions that src/ no longer defines: {missing:?}; update the model \
         (tests/model.rs: the actions' docs, CITED, STEPS) to the code"
    );
}

#[test]
fn the_protocols_steps_are_all_in_the_model() {
    let mut problems = Vec::new();
    for &(module, name, modelled) in STEPS {
        let sources = module_sources(module);
        let Some(found) = sources.iter().find_map(|(_, text)| {
            let code = code_only(text);
            fn_body(&code, name).map(calls)
        }) else {
            problems.push(format!("{module}::{name} is gone"));
            continue;
        };
        for call in &found {
            let known =
                modelled.iter().any(|(c, _)| c == call) || PLUMBING.contains(&call.as_str());
            if !known {
                problems.push(format!(
                    "{module}::{name} calls `{call}`, which the model does not account for"
                ));
            }
        }
        for (call, model) in modelled {
            if !found.iter().any(|f| f == call) {
                problems.push(format!(
                    "{module}::{name} no longer calls `{call}` (the model's {model})"
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "the protocol's steps and the model differ; model each new step (an action, or a rule \
         to remove) or list it in STEPS with why it is left out:\n{}",
        problems.join("\n")
    );
}
