//! Child processes: starting the migration or the app, making sure they die with the gate,
//! forwarding signals, reaping, and replacing the gate by the app with `exec`.
//!
//! The life of a supervised child, in order: [`spawn`] (own process group, guarded) →
//! [`Supervisor::wait`] (forward signals, reap) → [`Supervisor::stop`] if the gate must end it →
//! [`Supervisor::finish`]; exit codes are 128+signal when killed, as shells report them.
//!
//! # Why a guard process
//! While the gate holds the lock its child must not outlive it: if the gate is killed, PostgreSQL
//! frees the lock, and a migration still running would overlap with the next holder's.
//! `PR_SET_PDEATHSIG` reaches only the direct child, so a shell script that runs `alembic`
//! without `exec` would leave alembic running. The child therefore starts in its own process
//! group, and a tiny forked guard (which does nothing but wait) kills that whole group with
//! SIGKILL when the gate dies.

use std::io;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::Command;
use std::time::Duration;

use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing::{debug, info, warn};

use crate::error::{Error, Result};

/// Signals the gate passes on to its child, like tini.
pub(crate) const FORWARDED: [libc::c_int; 6] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// The forwarded signals that ask a process to stop: what a platform sends (a pod deleted, a
/// rollout, a drain, `docker stop`, Ctrl-C).
const STOPPING: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGQUIT];

/// A program and the environment variables it gets.
#[derive(Debug, Clone)]
pub(crate) struct Program<'a> {
    /// argv, program first.
    pub(crate) argv: &'a [String],
    /// `(name, value)` set in the child's environment.
    pub(crate) flag: (&'a str, &'a str),
    /// More `(name, value)` pairs for its environment: the session tag (`PGAPPNAME`) and
    /// `PGOPTIONS` ([`crate::sessions`]).
    pub(crate) env: Vec<(String, String)>,
}

impl<'a> Program<'a> {
    /// `argv` with `flag` set.
    pub(crate) fn new(argv: &'a [String], flag: (&'a str, &'a str)) -> Program<'a> {
        Program {
            argv,
            flag,
            env: Vec::new(),
        }
    }

    /// The same program with `env` added to its environment.
    pub(crate) fn with_env(&self, env: Vec<(String, String)>) -> Program<'a> {
        let mut p = self.clone();
        p.env.extend(env);
        p
    }

    fn command(&self) -> Result<Command> {
        let (program, args) = self
            .argv
            .split_first()
            .ok_or_else(|| Error::Usage("no command given after `--`".into()))?;
        let mut cmd = Command::new(program);
        cmd.args(args).env(self.flag.0, self.flag.1);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        Ok(cmd)
    }

    /// The program name, for messages.
    pub(crate) fn name(&self) -> &str {
        self.argv.first().map(String::as_str).unwrap_or("")
    }

    /// The command line, for logs.
    pub(crate) fn display(&self) -> String {
        shell_words::join(self.argv)
    }
}

/// Maps a failure to start `program` to the shell's codes: 127 not found, 126 not executable.
fn spawn_error(program: &str, e: io::Error) -> Error {
    match e.kind() {
        io::ErrorKind::NotFound => Error::CommandNotFound {
            program: program.to_string(),
        },
        _ => Error::CommandNotExecutable {
            program: program.to_string(),
            source: e,
        },
    }
}

/// Replaces the gate by `program`: same PID, the program gets our signals and our exit.
/// Returns only on failure.
pub(crate) fn exec(program: &Program<'_>) -> Error {
    let mut cmd = match program.command() {
        Ok(cmd) => cmd,
        Err(e) => return e,
    };
    let e = cmd.exec();
    spawn_error(program.name(), e)
}

/// A running child, its guard, and the signal streams the gate listens to while it runs.
pub(crate) struct Supervisor {
    pid: i32,
    guard: i32,
    sigchld: Signal,
    forwarded: Vec<(libc::c_int, Signal)>,
    /// Whether `reap` collected the guard (orphans re-parented to us when we are PID 1 are
    /// reaped and forgotten).
    guard_reaped: bool,
    status: Option<i32>,
    /// The first stopping signal (SIGTERM, SIGINT, SIGQUIT) the gate received and passed on.
    stopped_by: Option<libc::c_int>,
}

/// Starts `program` in its own process group, guarded so that the group dies with the gate.
pub(crate) fn spawn(program: &Program<'_>) -> Result<Supervisor> {
    // Listen before spawning so no SIGCHLD or forwarded signal can slip between.
    let sigchld = signal(SignalKind::child())
        .map_err(|e| Error::Internal(format!("cannot listen for SIGCHLD: {e}")))?;
    let mut forwarded = Vec::with_capacity(FORWARDED.len());
    for sig in FORWARDED {
        let stream = signal(SignalKind::from_raw(sig))
            .map_err(|e| Error::Internal(format!("cannot listen for signal {sig}: {e}")))?;
        forwarded.push((sig, stream));
    }

    let mut cmd = program.command()?;
    cmd.process_group(0);
    // SAFETY: prctl is async-signal-safe; this only sets a process attribute before exec.
    unsafe {
        cmd.pre_exec(|| {
            // Covers the instant before the guard exists. Also ties the direct child to the
            // gate's main thread, which lives as long as the gate.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| spawn_error(program.name(), e))?;
    let pid = child.id() as i32;
    // The std handle is not needed: we reap by PID ourselves (see `reap`).
    drop(child);
    let guard = spawn_guard(pid).map_err(|e| {
        // Without a guard the child must not run at all.
        kill_group(pid, libc::SIGKILL);
        Error::Internal(format!("cannot start the guard process: {e}"))
    })?;
    debug!(pid, guard, "started {}", program.display());
    Ok(Supervisor {
        pid,
        guard,
        sigchld,
        forwarded,
        guard_reaped: false,
        status: None,
        stopped_by: None,
    })
}

/// Forks the guard: it waits for the gate to die (parent-death signal, or a changed parent PID)
/// and then SIGKILLs process group `pgid`. The gate stops it with SIGKILL when no longer needed.
fn spawn_guard(pgid: i32) -> io::Result<i32> {
    // SAFETY: everything after fork in the child is a raw system call (async-signal-safe); no
    // allocation, no locks, and the child ends in `_exit`.
    unsafe {
        let gate = libc::getpid();
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        let mut term: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut term);
        libc::sigaddset(&mut term, libc::SIGTERM);
        let pid = libc::fork();
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            // Block everything: inherited handlers belong to the gate, and terminal signals
            // must not end the guard. SIGKILL still reaches it.
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, std::ptr::null_mut());
            libc::setpgid(0, 0);
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong);
            let tick = libc::timespec {
                tv_sec: 1,
                tv_nsec: 0,
            };
            while libc::getppid() == gate {
                if libc::sigtimedwait(&term, std::ptr::null_mut(), &tick) == libc::SIGTERM {
                    break;
                }
            }
            libc::kill(-pgid, libc::SIGKILL);
            libc::_exit(0);
        }
        Ok(pid)
    }
}

/// Sends `sig` to every process of group `pgid`.
fn kill_group(pgid: i32, sig: libc::c_int) {
    // SAFETY: plain system call.
    unsafe {
        libc::kill(-pgid, sig);
    }
}

impl Supervisor {
    /// The child's process group (its own PID): the child and what it started.
    pub(crate) fn pgid(&self) -> i32 {
        self.pid
    }

    /// Reaps every exited child without blocking; records our child's code.
    fn reap(&mut self) {
        loop {
            let mut status: libc::c_int = 0;
            // SAFETY: plain system call with a valid pointer.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                return;
            }
            let code = exit_code_of(status);
            if pid == self.pid {
                self.status = Some(code);
            } else if pid == self.guard {
                self.guard_reaped = true;
            }
        }
    }

    /// Waits until the child exits, forwarding signals to it meanwhile. Cancel-safe: use it in
    /// `select!` beside other work (probes, heartbeats).
    pub(crate) async fn wait(&mut self) -> i32 {
        loop {
            self.reap();
            if let Some(code) = self.status {
                return code;
            }
            let pid = self.pid;
            let forwarded = &mut self.forwarded;
            let sigchld = &mut self.sigchld;
            tokio::select! {
                _ = sigchld.recv() => {}
                sig = next_signal(forwarded) => {
                    debug!(sig, pid, "forwarding signal to the child");
                    if self.stopped_by.is_none() && STOPPING.contains(&sig) {
                        self.stopped_by = Some(sig);
                    }
                    // SAFETY: plain system call.
                    unsafe { libc::kill(pid, sig); }
                }
            }
        }
    }

    /// The first stopping signal (SIGTERM, SIGINT, SIGQUIT) the gate received and passed on to
    /// the child, if any, by its name (`SIGTERM`): the child's exit then says nothing about it.
    pub(crate) fn stopped_by(&self) -> Option<&'static str> {
        self.stopped_by.map(|sig| match sig {
            libc::SIGTERM => "SIGTERM",
            libc::SIGINT => "SIGINT",
            _ => "SIGQUIT",
        })
    }

    /// Pauses the child's whole process group (SIGSTOP): it runs no further instruction, so
    /// sends no further statement, until [`Supervisor::resume`] or a kill.
    pub(crate) fn pause(&self) {
        kill_group(self.pid, libc::SIGSTOP);
    }

    /// Lets a paused process group go on (SIGCONT).
    pub(crate) fn resume(&self) {
        kill_group(self.pid, libc::SIGCONT);
    }

    /// Stops the child's whole process group: SIGTERM, then SIGKILL after `grace`; a zero
    /// `grace` is SIGKILL at once (a paused group must not run again, even to clean up).
    pub(crate) async fn stop(&mut self, grace: Duration) -> i32 {
        if let Some(code) = self.status {
            kill_group(self.pid, libc::SIGKILL);
            return code;
        }
        if grace.is_zero() {
            info!(
                pid = self.pid,
                "killing the child's process group (SIGKILL)"
            );
            kill_group(self.pid, libc::SIGKILL);
            return self.wait().await;
        }
        info!(pid = self.pid, grace = %crate::duration::short(grace), grace_ms = grace.as_millis() as u64, "stopping the child (SIGTERM, then SIGKILL)");
        kill_group(self.pid, libc::SIGTERM);
        if let Ok(code) = tokio::time::timeout(grace, self.wait()).await {
            kill_group(self.pid, libc::SIGKILL);
            return code;
        }
        warn!(
            pid = self.pid,
            "the child ignored SIGTERM; sending SIGKILL to its process group"
        );
        kill_group(self.pid, libc::SIGKILL);
        self.wait().await
    }

    /// Ends the guard (and any process the child left behind in its group) once the child is
    /// done. Call after the child exited.
    pub(crate) fn finish(&mut self) {
        // A migration that left background processes behind must not keep running unguarded.
        kill_group(self.pid, libc::SIGKILL);
        if self.guard_reaped {
            return;
        }
        // SAFETY: plain system calls; the guard is our child and not reaped yet.
        unsafe {
            libc::kill(self.guard, libc::SIGKILL);
            let mut status = 0;
            libc::waitpid(self.guard, &mut status, 0);
        }
        self.guard_reaped = true;
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        if self.status.is_none() {
            kill_group(self.pid, libc::SIGKILL);
        }
        // SAFETY: plain system call. Killing an already reaped PID is harmless here because we
        // never reap the guard anywhere but in `finish` and `reap` (which records it).
        unsafe {
            if !self.guard_reaped {
                libc::kill(self.guard, libc::SIGKILL);
            }
        }
    }
}

/// The next forwarded signal that arrives, whichever it is.
async fn next_signal(streams: &mut [(libc::c_int, Signal)]) -> libc::c_int {
    std::future::poll_fn(|cx| {
        for (sig, stream) in streams.iter_mut() {
            if stream.poll_recv(cx).is_ready() {
                return std::task::Poll::Ready(*sig);
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// A wait status as a shell reports it: the exit code, or 128+N when killed by signal N.
pub(crate) fn exit_code_of(status: libc::c_int) -> i32 {
    let status = std::process::ExitStatus::from_raw(status);
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(sig)) => 128 + sig,
        _ => 1,
    }
}

/// Stops with 127/126 before taking any lock if `argv[0]` cannot be found or executed.
pub(crate) fn check_program(argv: &[String]) -> Result<()> {
    let Some(program) = argv.first() else {
        return Err(Error::Usage("no command given after `--`".into()));
    };
    let path = if program.contains('/') {
        let path = std::path::PathBuf::from(program);
        if std::fs::symlink_metadata(&path).is_err() {
            return Err(Error::CommandNotFound {
                program: program.clone(),
            });
        }
        path
    } else {
        let search = std::env::var_os("PATH").unwrap_or_default();
        // As execvp(3): the first file of that name on PATH that may be executed.
        let found = std::env::split_paths(&search)
            .map(|dir| dir.join(program))
            .find(|p| runnable(p).is_ok());
        match found {
            Some(p) => p,
            None => {
                return Err(Error::CommandNotFound {
                    program: program.clone(),
                });
            }
        }
    };
    runnable(&path).map_err(|why| Error::CommandNotExecutable {
        program: program.clone(),
        source: std::io::Error::other(why),
    })
}

/// Why `path` cannot be executed as the kernel would run it, if it cannot: a directory, no
/// execute bit, a `#!` interpreter that is missing, or neither a binary (ELF) nor a script (a
/// file execve(2) refuses with ENOEXEC, which execvp(3) would hand to /bin/sh instead).
fn runnable(path: &std::path::Path) -> std::result::Result<(), String> {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if meta.is_dir() {
        return Err("it is a directory".into());
    }
    if !meta.is_file() {
        return Err("it is not a regular file".into());
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err("permission denied: the file has no execute bit (chmod +x)".into());
    }
    let mut head = [0u8; 256];
    let n = std::fs::File::open(path)
        .and_then(|mut f| f.read(&mut head))
        .map_err(|e| e.to_string())?;
    let head = &head[..n];
    if head.starts_with(b"\x7fELF") {
        return Ok(());
    }
    let Some(line) = head.strip_prefix(b"#!") else {
        return Err("it is neither a program (ELF) nor a script with a #! line".into());
    };
    let line = String::from_utf8_lossy(line.split(|b| *b == b'\n').next().unwrap_or_default());
    let interpreter = line
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    let ok = std::fs::metadata(&interpreter)
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if ok {
        Ok(())
    } else {
        Err(format!(
            "its #! interpreter {interpreter:?} is missing or not executable"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_code_of_reports_codes_and_signals_like_a_shell() {
        // Wait statuses as the kernel encodes them: code << 8, or the signal number.
        assert_eq!(exit_code_of(0), 0);
        assert_eq!(exit_code_of(3 << 8), 3);
        assert_eq!(exit_code_of(libc::SIGKILL), 128 + 9);
        assert_eq!(exit_code_of(libc::SIGTERM), 128 + 15);
    }

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
