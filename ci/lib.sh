# shellcheck shell=bash
# ci/lib.sh: what several CI scripts repeat. Sourced, never executed:
#
#   . "$(dirname "${BASH_SOURCE[0]}")/lib.sh"        # from ci/*
#   . "$ROOT/ci/lib.sh"                              # from .ci/run
#
# It defines functions and nothing else: no `set` options, no traps, no output, no variables
# except the CI_* ones a function documents as its result or reads as its input. Every name
# starts with `ci_`.
#
# Packages
#   ci_apt_install PKG...      apt-get install (no recommends) with the packages' services kept
#                              from starting; returns 1 at once when NO_INSTALL=1
#
# PostgreSQL (a private server on loopback, for scripts that test against a real one)
#   ci_pg_bindir               print the server binaries' directory (like tests/support/mod.rs)
#   ci_as_postgres CMD...      run CMD as the postgres user when we are root (initdb, pg_ctl and
#                              postgres refuse to run as root), else as ourselves
#   ci_free_port               print a TCP port on 127.0.0.1 that nothing uses
#   ci_take_port VAR           the same into variable VAR, never one this run took already
#   ci_pg_init DIR PASSWORD LOGDIR
#                              initdb in DIR/data (no server started); sets CI_PG_BIN
#   ci_pg_start DIR PASSWORD LOGDIR [SETTING...]
#                              initdb + pg_ctl start in DIR on a free port; sets CI_PG_BIN and
#                              CI_PG_PORT
#   ci_pg_stop DIR             stop the server of ci_pg_start DIR (immediate), if it runs
#
# Checks and output (counted in CI_PASSED and CI_FAILED)
#   ci_log, ci_step, ci_pass, ci_fail, ci_expect, ci_check, ci_die, ci_show_tail, ci_wait_for,
#   ci_now_us, ci_secs, ci_finish
#
# Processes this run started (every one names the run's temp dir in its command line or
# environment; nothing else is ever signalled)
#   ci_running, ci_ours, ci_pids_naming, ci_stop_pid, ci_ppid_of, ci_stop_managed, ci_kill_rest,
#   ci_wide_listeners
#
# Failover scenarios (ci/ha-failover, ci/auto-failover): a temp dir, the binaries, replicas
# restarted like Kubernetes init containers, the run log's overlap judgement, and one scenario
# from launch to report
#   ci_fo_config, ci_fo_workdir, ci_fo_binaries, ci_fo_other, ci_fo_only_primary,
#   ci_fo_replica, ci_fo_monitor, ci_fo_overlaps, ci_fo_all_done, ci_fo_stop_gates,
#   ci_fo_scenario
#
# Environment read:
#   NO_INSTALL=1   ci_apt_install installs nothing and fails (the caller says what is missing)

# ci_apt_install PKG...
#   Installs Debian packages with apt-get (update first, --no-install-recommends, quiet). While
#   it runs, /usr/sbin/policy-rc.d says `exit 101`, so no package starts its service (postgresql,
#   docker.io, etcd-server, haproxy...): CI scripts start their own servers, on their own ports.
#   The policy file is removed afterwards, but only if this function created it. apt's output
#   is shown only when the install fails. Returns apt-get's status; 1 when NO_INSTALL=1.
ci_apt_install() {
  [[ ${NO_INSTALL:-0} == 1 ]] && return 1
  local policy=/usr/sbin/policy-rc.d made_policy=0 out rc=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod +x "$policy"
    made_policy=1
  fi
  out=$(mktemp)
  {
    DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
  } >"$out" 2>&1 || rc=$?
  [[ $made_policy == 1 ]] && rm -f "$policy"
  if [[ $rc != 0 ]]; then
    printf 'apt-get install %s failed (exit %s):\n' "$*" "$rc" >&2
    tail -n 20 "$out" | sed 's/^/  | /' >&2
  fi
  rm -f "$out"
  return "$rc"
}

# ci_pg_bindir
#   Prints the directory of the PostgreSQL server binaries: `pg_config --bindir` when it holds
#   initdb, else the newest /usr/lib/postgresql/*/bin that does. Prints nothing (and returns 1)
#   when there is none.
ci_pg_bindir() {
  local d
  d=$(pg_config --bindir 2>/dev/null)
  if [[ -n $d && -x $d/initdb ]]; then
    echo "$d"
    return 0
  fi
  d=$(compgen -G '/usr/lib/postgresql/*/bin/initdb' | sort -V | tail -n1)
  [[ -n $d ]] || return 1
  dirname "$d"
}

# ci_as_postgres CMD...
#   Runs CMD as the postgres user (runuser) when we are root, else as ourselves.
ci_as_postgres() {
  if [[ $(id -u) -eq 0 ]]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

# ci_free_port
#   Prints a random TCP port in 20000..49999 that no socket on this machine uses (per `ss`).
ci_free_port() {
  local p
  for _ in $(seq 200); do
    p=$((20000 + RANDOM % 30000))
    if [[ -z "$(ss -Htan "( sport = :$p )" 2>/dev/null)" ]]; then
      echo "$p"
      return 0
    fi
  done
  return 1
}

# ci_take_port VAR
#   Like ci_free_port, into the variable named VAR (an array element such as PORT[pg1] is fine),
#   and never a port that an earlier ci_take_port of this shell took (CI_PORTS_TAKEN), so the
#   servers of one run that start later cannot collide. Run it in the script's own shell, not in
#   $(...). Returns 1 when no port is found.
ci_take_port() {
  local p
  for _ in $(seq 50); do
    p=$(ci_free_port) || return 1
    [[ " ${CI_PORTS_TAKEN:-} " == *" $p "* ]] && continue
    CI_PORTS_TAKEN="${CI_PORTS_TAKEN:-} $p"
    printf -v "$1" '%s' "$p"
    return 0
  done
  return 1
}

# ci_pg_init DIR PASSWORD LOGDIR
#   initdb in DIR/data: superuser `postgres` with PASSWORD, scram-sha-256 on TCP, trust on the
#   Unix socket, UTF8, no fsync of the new files. initdb's output goes to LOGDIR/initdb.log. DIR
#   is created if missing and, when we are root, handed to the postgres user. Starts nothing.
#   Sets CI_PG_BIN (server binaries); on failure returns 1 and the log says why.
ci_pg_init() {
  local dir=$1 pw=$2 logdir=$3
  mkdir -p "$dir" "$logdir"
  CI_PG_BIN=$(ci_pg_bindir) || { echo "ci_pg_init: PostgreSQL server binaries not found" >"$logdir/initdb.log"; return 1; }
  printf '%s' "$pw" >"$dir/pw"
  if [[ $(id -u) -eq 0 ]]; then chown -R postgres:postgres "$dir"; fi
  ci_as_postgres "$CI_PG_BIN/initdb" -D "$dir/data" -U postgres --auth-local=trust \
    --auth-host=scram-sha-256 -E UTF8 --no-sync --pwfile="$dir/pw" >"$logdir/initdb.log" 2>&1
}

# ci_pg_start DIR PASSWORD LOGDIR [SETTING...]
#   A private PostgreSQL server for one CI run: ci_pg_init DIR PASSWORD LOGDIR, then pg_ctl start
#   on a free port, listening on 127.0.0.1 only (Unix socket in DIR), with fsync,
#   synchronous_commit and full_page_writes off (throwaway data) and max_connections=100. Each
#   SETTING (name=value) is one more `-c` server setting and may override those. The server log
#   is DIR/log; pg_ctl's output goes to LOGDIR/pg_ctl.log. On success sets CI_PG_BIN (server
#   binaries) and CI_PG_PORT; on failure returns 1 and the logs say why. Stop it with
#   ci_pg_stop DIR.
ci_pg_start() {
  local dir=$1 pw=$2 logdir=$3
  shift 3
  local opts s
  ci_pg_init "$dir" "$pw" "$logdir" || return 1
  CI_PG_PORT=$(ci_free_port) || return 1
  opts="-p $CI_PG_PORT -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off"
  opts+=" -c full_page_writes=off -c max_connections=100"
  for s in "$@"; do opts+=" -c $s"; done
  ci_as_postgres "$CI_PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/log" -w -t 60 -o "$opts" start \
    >"$logdir/pg_ctl.log" 2>&1
}

# ci_pg_stop DIR
#   Stops the server that ci_pg_start DIR started (pg_ctl stop -m immediate, SIGKILL if that
#   fails); does nothing when it does not run. Safe on a directory left by a killed run.
ci_pg_stop() {
  local dir=$1 pid bin
  [[ -f $dir/data/postmaster.pid ]] || return 0
  pid=$(head -n1 "$dir/data/postmaster.pid")
  if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
    bin=${CI_PG_BIN:-$(ci_pg_bindir)}
    ci_as_postgres "$bin/pg_ctl" -D "$dir/data" -m immediate -w -t 20 stop >/dev/null 2>&1 ||
      kill -KILL "$pid" 2>/dev/null
  fi
  return 0
}

# ----------------------------------------------------------------------------------------------
# Checks and output. A script counts its checks in CI_PASSED and CI_FAILED and ends with
# ci_finish, whose last line is `NAME: N passed, M failed`. Read: CI_T0 (the script's start, in
# $SECONDS; default 0) and CI_WORK (the run's temp dir, left out of the file names it prints).

# ci_log MSG...: one line. ci_step MSG...: "== [  Ns] MSG", N seconds since CI_T0.
ci_log() { printf '%s\n' "$*"; }
ci_step() { printf '== [%3ss] %s\n' "$((SECONDS - ${CI_T0:-0}))" "$*"; }
# ci_pass NAME, ci_fail NAME [WHY]: a check's outcome, counted and printed.
ci_pass() { CI_PASSED=$((${CI_PASSED:-0} + 1)); printf 'ok   %s\n' "$1"; }
ci_fail() { CI_FAILED=$((${CI_FAILED:-0} + 1)); printf 'FAIL %s%s\n' "$1" "${2:+: $2}"; }
# ci_expect NAME WANT GOT: passes when GOT is WANT.
ci_expect() { if [[ "$3" == "$2" ]]; then ci_pass "$1"; else ci_fail "$1" "want '$2', got '$3'"; fi; }
# ci_check NAME CMD...: passes when CMD succeeds.
ci_check() {
  local name=$1
  shift
  if "$@"; then ci_pass "$name"; else ci_fail "$name" "command failed: $*"; fi
}
# ci_die NAME [WHY]: a failed check that ends the script (its EXIT trap cleans up).
ci_die() { ci_fail "$1" "${2:-}"; exit 1; }
# ci_show_tail FILE [LINES]: a log's last LINES (20) lines, indented, for a failure.
ci_show_tail() {
  [[ -s "$1" ]] && { ci_log "   --- ${1#"${CI_WORK:-}"/} (last ${2:-20} lines)"; tail -n "${2:-20}" "$1" | sed 's/^/   | /'; }
  return 0
}
# ci_wait_for SECONDS CMD...: runs CMD every 250 ms until it succeeds; 1 after SECONDS.
ci_wait_for() {
  local limit=$1 start=$SECONDS
  shift
  until "$@"; do
    ((SECONDS - start >= limit)) && return 1
    sleep 0.25
  done
}
# ci_now_us: microseconds since the epoch. ci_secs FROM_US TO_US: the difference in seconds,
# one decimal.
ci_now_us() { local t=$EPOCHREALTIME; echo "${t/./}"; }
ci_secs() { local d=$(($2 - $1)); printf '%d.%d' $((d / 1000000)) $(((d % 1000000) / 100000)); }

# ci_finish NAME RC TEARDOWN [KEEP]: a script's EXIT trap, called with its status RC. Copies
#   CI_WORK/logs to KEEP when KEEP is set, runs `TEARDOWN CI_WORK` (which must remove the dir
#   and stop every process of the run), checks that nothing of the run is left, then prints the
#   time taken and `NAME: N passed, M failed` and exits 0 when no check failed, else 1.
ci_finish() {
  local name=$1 rc=$2 teardown=$3 keep=${4:-} dir=${CI_WORK:-}
  trap - EXIT INT TERM
  trap '' PIPE
  set +e
  if [[ -n $dir && -d $dir ]]; then
    if [[ -n $keep ]]; then
      mkdir -p "$keep" && cp -r "$dir/logs/." "$keep/" && ci_log "   logs kept in $keep"
    fi
    ci_step "cleaning up $dir"
    "$teardown" "$dir"
    ci_expect "cleanup: no process of this run left" "" "$(ci_pids_naming "$dir" | tr '\n' ' ')"
    ci_expect "cleanup: temp dir removed" "" "$([[ -e $dir ]] && echo "$dir")"
  fi
  [[ $rc -ne 0 && ${CI_FAILED:-0} -eq 0 ]] && ci_fail "script" "exited with status $rc"
  ci_log "== done in $((SECONDS - ${CI_T0:-0}))s"
  ci_log "$name: ${CI_PASSED:-0} passed, ${CI_FAILED:-0} failed"
  [[ ${CI_FAILED:-0} -eq 0 ]] && exit 0 || exit 1
}

# ----------------------------------------------------------------------------------------------
# Processes. A script records the PID of everything it starts under its temp dir, and each of
# those names the temp dir in its command line or environment; that is checked before any
# signal is sent, so a reused PID is never signalled.

# ci_running PID: it exists and is not a zombie.
ci_running() {
  local s
  [[ -n ${1:-} ]] && read -r s 2>/dev/null <"/proc/$1/stat" || return 1
  s=${s##*) }
  [[ ${s:0:1} != Z ]]
}
# ci_ours PID DIR: the process (not this script) names DIR/ in its command line or environment.
ci_ours() {
  [[ -n ${1:-} && $1 != "$$" ]] || return 1
  grep -qsF "$2/" "/proc/$1/cmdline" 2>/dev/null || grep -qsF "$2/" "/proc/$1/environ" 2>/dev/null
}
# ci_pids_naming DIR: every running process that names DIR/ (but this script), one a line. One
# grep reads every command line and environment (one grep a process is slow on a busy machine).
ci_pids_naming() {
  local f p
  local -A seen=()
  while read -r f; do
    p=${f#/proc/}
    p=${p%%/*}
    [[ $p == "$$" || -n ${seen[$p]:-} ]] && continue
    seen[$p]=1
    ci_running "$p" && echo "$p"
  done < <(grep -lsF -- "$1/" /proc/[0-9]*/cmdline /proc/[0-9]*/environ 2>/dev/null)
  return 0
}
# ci_stop_pid PID DIR [SECONDS]: SIGTERM, then SIGKILL after SECONDS (10), if it is ours.
ci_stop_pid() {
  local pid=$1 dir=$2 limit=${3:-10} i
  ci_running "$pid" && ci_ours "$pid" "$dir" || return 0
  kill -TERM "$pid" 2>/dev/null
  for ((i = 0; i < limit * 10; i++)); do
    ci_running "$pid" || return 0
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null
  return 0
}
# ci_ppid_of PID: its parent's PID.
ci_ppid_of() {
  local s
  read -r s 2>/dev/null <"/proc/$1/stat" || return 1
  s=${s##*) }
  # shellcheck disable=SC2086
  set -- $s
  echo "$2"
}
# ci_stop_managed DIR PIDFILE... -- DATADIR...: stops PostgreSQL servers run by a manager
#   (Patroni, pg_autoctl): SIGTERM to every manager in a PIDFILE at once (each stops its own
#   PostgreSQL, fast), SIGKILL to those still running 20 s later; then a server still running
#   in a DATADIR is stopped with pg_ctl -m immediate, or SIGKILL. Only processes that name DIR.
ci_stop_managed() {
  local d=$1 f pid bin pidfiles=()
  shift
  while (($#)) && [[ $1 != -- ]]; do pidfiles+=("$1"); shift; done
  (($#)) && shift
  for f in "${pidfiles[@]}"; do
    [[ -f $f ]] && pid=$(cat "$f") && ci_running "$pid" && ci_ours "$pid" "$d" && kill -TERM "$pid" 2>/dev/null
  done
  for f in "${pidfiles[@]}"; do
    [[ -f $f ]] && ci_stop_pid "$(cat "$f")" "$d" 20
  done
  for f in "$@"; do
    [[ -f $f/postmaster.pid ]] || continue
    pid=$(head -n1 "$f/postmaster.pid")
    if ! ci_running "$pid" || ! ci_ours "$pid" "$d"; then continue; fi
    bin=${CI_PG_BIN:-$(ci_pg_bindir)}
    [[ -n $bin ]] && ci_as_postgres "$bin/pg_ctl" -D "$f" -m immediate -w -t 20 stop >/dev/null 2>&1
    ci_running "$pid" && kill -KILL "$pid" 2>/dev/null
  done
  return 0
}
# ci_kill_rest DIR: SIGKILL whatever still names DIR (servers' children that outlived their
# parent, runuser), up to three rounds.
ci_kill_rest() {
  local pids
  for _ in 1 2 3; do
    pids=$(ci_pids_naming "$1")
    [[ -z $pids ]] && break
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null
    sleep 0.5
  done
}
# ci_wide_listeners PID...: prints "ADDRESS(pid P) " for each TCP or UDP listener of these
# processes that is not on 127.0.0.1 (nothing when all are on loopback).
ci_wide_listeners() {
  local pids=" $* " line p addr
  while read -r line; do
    addr=$(awk '{print $5}' <<<"$line")
    [[ $addr == 127.0.0.1:* ]] && continue
    while read -r p; do
      [[ $pids == *" $p "* ]] && printf '%s(pid %s) ' "$addr" "$p"
    done < <(grep -o 'pid=[0-9]*' <<<"$line" | cut -d= -f2)
  done < <(ss -Hltunp 2>/dev/null)
  return 0
}

# ----------------------------------------------------------------------------------------------
# Failover scenarios: ci/ha-failover and ci/auto-failover. Gates (`migrations-gate migrate
# --release R -- MIGRATION`) start at once while a failover is made mid-migration; each is
# restarted like a Kubernetes init container; the stand-in app's run log (STANDIN_RUN_LOG, which
# survives the failover) says whether two migrations overlapped.
#
# Read (set by the script; ci_fo_config sets the numbers):
#   CI_WORK                the run's temp dir; scenario SCEN logs to CI_WORK/logs/SCEN, the
#                          supervisors' PIDs go to CI_WORK/pids/supervisor.*
#   CI_FO_GATE, CI_FO_STANDIN   the binaries (ci_fo_binaries sets them)
#   CI_FO_MIGRATE          array: the migration command after `--` (e.g. standin-app migrate)
#   CI_FO_NODES            array: the two database nodes' names
#   CI_FO_GATES            gates per scenario
#   CI_FO_STEP_MS          the stand-in migration's step (STANDIN_STEP_MS; 5 steps)
#   CI_FO_KILL_AT_MS       the failover's start, after the holder's migration began
#   CI_FO_RESTART_DELAY    seconds before a failed gate is restarted
#   CI_FO_MAX_RESTARTS     restarts of a replica's gate at most
#   CI_FO_WAIT_TIMEOUT_S, CI_FO_CONNECT_TIMEOUT_S   the gates' --wait-timeout, --connect-timeout
#   CI_FO_LIMIT_S          a scenario's gates must all be done by then
#   CI_FO_LOCK_SCOPE       the gates' --lock-scope (empty: theirs)
#   CI_FO_PRIMARY_BY       how fo_primary knows (for the timings: "Patroni REST")
# Functions the script defines:
#   fo_url WHO DB          print the database URL (with password) for WHO: `setup` (the
#                          stand-in's setup) or `gate-N` (called at every start of replica N)
#   fo_primary             print the node(s) that are the writable primary now, one a line
#   fo_q NODE DB SQL       one value, as the superuser, on NODE itself
#   and the ACTION given to ci_fo_scenario.

# ci_fo_config PREFIX STEP_MS: sets the knobs above from the script's environment: CI_FO_GATES
#   from PREFIX_GATES (default 6), CI_FO_STEP_MS from PREFIX_STEP_MS (default STEP_MS),
#   CI_FO_KILL_AT_MS from PREFIX_KILL_AT_MS (1000), CI_FO_RESTART_DELAY from
#   PREFIX_RESTART_DELAY (1), CI_FO_LOCK_SCOPE from PREFIX_LOCK_SCOPE (empty); and the fixed
#   ones: 3 restarts, --wait-timeout 180s, --connect-timeout 90s, CI_FO_LIMIT_S 230 (one
#   --wait-timeout plus restarts and fencing).
ci_fo_config() {
  local p=$1 v
  v=${p}_GATES CI_FO_GATES=${!v:-6}
  v=${p}_STEP_MS CI_FO_STEP_MS=${!v:-$2}
  v=${p}_KILL_AT_MS CI_FO_KILL_AT_MS=${!v:-1000}
  v=${p}_RESTART_DELAY CI_FO_RESTART_DELAY=${!v:-1}
  v=${p}_LOCK_SCOPE CI_FO_LOCK_SCOPE=${!v:-}
  CI_FO_MAX_RESTARTS=3 CI_FO_WAIT_TIMEOUT_S=180 CI_FO_CONNECT_TIMEOUT_S=90 CI_FO_LIMIT_S=230
}

# ci_fo_workdir PARENT PREFIX TEARDOWN: tears down the runs that a killed run of the same script
#   left in PARENT/PREFIX.* (their owner.pid is gone), then makes this run's temp dir
#   PARENT/PREFIX.XXXXXX with logs/ and pids/ in it and sets CI_WORK.
ci_fo_workdir() {
  local parent=$1 prefix=$2 teardown=$3 stale
  for stale in "$parent/$prefix".*; do
    [[ -d $stale && -f $stale/owner.pid ]] || continue
    kill -0 "$(cat "$stale/owner.pid")" 2>/dev/null && continue
    ci_step "removing what a killed run left in $stale"
    "$teardown" "$stale"
  done
  CI_WORK=$(mktemp -d "$parent/$prefix.XXXXXX") || return 1
  echo $$ >"$CI_WORK/owner.pid"
  chmod 711 "$CI_WORK"
  mkdir -p "$CI_WORK/logs" "$CI_WORK/pids"
}

# ci_fo_binaries ROOT BIN_DIR VARNAME: the gate and the stand-in from BIN_DIR when it is set
#   (VARNAME names the variable that set it, for the messages), else from
#   `cargo build --release --bins --example standin-app` in ROOT. Sets CI_FO_GATE and CI_FO_STANDIN; ends the script
#   (ci_die) when they cannot be had.
ci_fo_binaries() {
  local root=$1 bin_dir=$2 var=$3 b0
  if [[ -n $bin_dir ]]; then
    ci_step "binaries from $bin_dir ($var, no build)"
  else
    bin_dir=$root/target/release
    ci_step "cargo build --release --bins --example standin-app"
    b0=$SECONDS
    if ! (cd "$root" && cargo build --release --bins --example standin-app) >"$CI_WORK/logs/build.log" 2>&1; then
      ci_show_tail "$CI_WORK/logs/build.log" 40
      ci_die "setup: cargo build --release --bins --example standin-app" "failed ($var=dir uses binaries built elsewhere)"
    fi
    ci_log "   built (or up to date) in $((SECONDS - b0))s"
  fi
  CI_FO_GATE=$bin_dir/migrations-gate
  # The stand-in is an example (never installed): target/release/examples when built here.
  CI_FO_STANDIN=$bin_dir/standin-app
  [[ -x $CI_FO_STANDIN ]] || CI_FO_STANDIN=$bin_dir/examples/standin-app
  [[ -x $CI_FO_GATE && -x $CI_FO_STANDIN ]] || ci_die "setup: binaries" "$CI_FO_GATE or $CI_FO_STANDIN missing"
  grep -qa STANDIN_RUN_LOG "$CI_FO_STANDIN" || ci_die "setup: standin-app" "$CI_FO_STANDIN has no STANDIN_RUN_LOG knob (stale build?)"
}

# ci_fo_other NODE: the other of the two CI_FO_NODES.
ci_fo_other() { [[ $1 == "${CI_FO_NODES[0]}" ]] && echo "${CI_FO_NODES[1]}" || echo "${CI_FO_NODES[0]}"; }
# ci_fo_only_primary NODE: NODE is the one and only primary (fo_primary).
ci_fo_only_primary() { [[ "$(fo_primary | tr '\n' ' ')" == "$1 " ]]; }

# ci_fo_replica SCEN N RELEASE DB: one replica's init container: the gate, restarted after a
#   non-zero exit (at most CI_FO_MAX_RESTARTS times), with the URL `fo_url gate-N DB` of that
#   moment. Writes DIR/replica-N.exits ("ATTEMPT RC END_US" lines) and, when it is done,
#   DIR/replica-N.result ("RC ATTEMPTS START_US END_US"), DIR being CI_WORK/logs/SCEN.
ci_fo_replica() {
  local scen=$1 n=$2 release=$3 db=$4 dir=$CI_WORK/logs/$1 k rc gp t0 t1 url
  t0=$(ci_now_us)
  for ((k = 1; k <= CI_FO_MAX_RESTARTS + 1; k++)); do
    # ($$ is the script: a supervisor outliving a killed run stops restarting gates)
    if [[ -e $CI_WORK/stop || -e $dir/stop ]] || ! kill -0 $$ 2>/dev/null; then return; fi
    url=$(fo_url "gate-$n" "$db")
    env ${CI_FO_LOCK_SCOPE:+"MIGRATIONS_GATE_LOCK_SCOPE=$CI_FO_LOCK_SCOPE"} DATABASE_URL="$url" \
      MIGRATIONS_GATE_DATABASE_URL="$url" STANDIN_STEP_MS="$CI_FO_STEP_MS" STANDIN_RUN_LOG="$dir/runs.log" \
      "$CI_FO_GATE" migrate --release "$release" --wait-timeout "${CI_FO_WAIT_TIMEOUT_S}s" \
      --connect-timeout "${CI_FO_CONNECT_TIMEOUT_S}s" --application-name "gate-$n" -- "${CI_FO_MIGRATE[@]}" \
      >"$dir/gate-$n.$k.log" 2>&1 &
    gp=$!
    echo "$n $k $gp" >>"$dir/gates.pids"
    wait "$gp"
    rc=$?
    t1=$(ci_now_us)
    echo "$k $rc $t1" >>"$dir/replica-$n.exits"
    [[ $rc == 0 ]] && break
    ((k <= CI_FO_MAX_RESTARTS)) && sleep "$CI_FO_RESTART_DELAY"
  done
  echo "$rc $((k > CI_FO_MAX_RESTARTS + 1 ? CI_FO_MAX_RESTARTS + 1 : k)) $t0 $t1" >"$dir/replica-$n.result"
}

# ci_fo_monitor DIR: for every migration in DIR/runs.log that has not written "end", records in
#   DIR/gone.log when its process is no longer running ("gone PID US"), polling every 100 ms,
#   until DIR/stop or CI_WORK/stop exists.
ci_fo_monitor() {
  local dir=$1 ev pid ns line
  declare -A state
  while [[ ! -e $dir/stop && ! -e $CI_WORK/stop ]] && kill -0 $$ 2>/dev/null; do
    if [[ -s $dir/runs.log ]]; then
      while read -r ev pid ns; do
        case $ev in
          start) [[ -z ${state[$pid]:-} ]] && state[$pid]=run ;;
          end) state[$pid]=end ;;
        esac
      done <"$dir/runs.log"
      for pid in "${!state[@]}"; do
        [[ ${state[$pid]} == run ]] || continue
        read -r line 2>/dev/null <"/proc/$pid/stat"
        if [[ $line != *"(standin-app)"* ]] || ! ci_running "$pid"; then
          echo "gone $pid $(ci_now_us)" >>"$dir/gone.log"
          state[$pid]=gone
        fi
      done
    fi
    sleep 0.1
  done
}

# ci_fo_overlaps DIR: prints every pair of migrations whose intervals intersect (none: prints
#   nothing). A migration's interval is [start, end], or [start, seen gone] when it wrote no
#   "end", or [start, now] when it is still running.
ci_fo_overlaps() {
  local dir=$1 ev pid ns us now
  declare -A st en
  now=$(ci_now_us)
  while read -r ev pid ns; do
    case $ev in
      start) st[$pid]=$((ns / 1000)) ;;
      end) en[$pid]=$((ns / 1000)) ;;
    esac
  done <"$dir/runs.log"
  if [[ -f $dir/gone.log ]]; then
    while read -r ev pid us; do [[ -z ${en[$pid]:-} ]] && en[$pid]=$us; done <"$dir/gone.log"
  fi
  for pid in "${!st[@]}"; do echo "${st[$pid]} ${en[$pid]:-$now} $pid"; done | sort -n |
    awk '{ if (NR > 1 && $1 < maxend) printf "pid %s started %.3fs before pid %s ended; ", $3, (maxend - $1) / 1e6, maxpid;
           if (NR == 1 || $2 > maxend) { maxend = $2; maxpid = $3 } }'
}

# ci_fo_all_done DIR: every replica has its result.
ci_fo_all_done() {
  local n
  # shellcheck disable=SC2153 # CI_FO_GATES is the script's
  for ((n = 1; n <= CI_FO_GATES; n++)); do [[ -f $1/replica-$n.result ]] || return 1; done
}

# ci_fo_stop_gates DIR SCRIPT: ends a run's replicas: writes DIR/stop, SIGKILLs the replica
#   supervisors recorded in DIR/pids/supervisor.* (subshells of SCRIPT, checked by their command
#   line) and every gate and stand-in that names DIR.
ci_fo_stop_gates() {
  local d=$1 script=$2 f pid cmd
  : >"$d/stop" 2>/dev/null
  for f in "$d"/pids/supervisor.*; do
    [[ -f $f ]] || continue
    pid=$(cat "$f")
    ci_running "$pid" && [[ $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) == *"$script"* ]] &&
      kill -KILL "$pid" 2>/dev/null
  done
  for pid in $(ci_pids_naming "$d"); do
    cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)
    [[ $cmd == *migrations-gate* || $cmd == *standin-app* ]] && kill -KILL "$pid" 2>/dev/null
  done
  return 0
}

# ci_fo_scenario SCEN RELEASE DB ACTION: one scenario. `standin-app setup` on DB, then
#   CI_FO_GATES replicas of `migrate --release RELEASE`; once the first migration has run for
#   CI_FO_KILL_AT_MS, `ACTION OLD NEW DIR T_START` makes the failover from node OLD (the
#   primary) to NEW (DIR: the scenario's logs; T_START: when the migration began, in µs).
#   ACTION sets CI_FO_T_ACT (when it acted, ci_now_us), CI_FO_ACT_WHAT (what it did, for the
#   check that it was mid-migration: "the leader was killed") and CI_FO_ACT_FROM (for the
#   timings: "the leader kill"), and may run checks of its own. Then, once every replica is done
#   (or after CI_FO_LIMIT_S), it prints each replica's exit codes and checks: NEW is the only
#   primary; the first holder exits 69 and its migration is gone; RELEASE is done exactly once
#   in the ledger on NEW; every replica's last gate exits 0, within its --wait-timeout; no two
#   migrations overlapped (run log); exactly one ran to its end; mg_runs records no overlap.
#   Last, the recovery timings from CI_FO_T_ACT.
ci_fo_scenario() {
  local scen=$1 release=$2 db=$3 action=$4 dir=$CI_WORK/logs/$1
  local n old new holder_pid holder_gate holder_n holder_k p t_launch t_start t_new="" t_gone="" t_done pid
  mkdir -p "$dir"
  : >"$dir/runs.log"
  chmod 666 "$dir/runs.log"

  old=$(fo_primary)
  [[ $old == "${CI_FO_NODES[0]}" || $old == "${CI_FO_NODES[1]}" ]] || { ci_fail "$scen: one primary before the scenario" "got '$old'"; return; }
  new=$(ci_fo_other "$old")
  if ! DATABASE_URL="$(fo_url setup "$db")" "$CI_FO_STANDIN" setup >"$dir/setup.log" 2>&1; then
    ci_show_tail "$dir/setup.log"
    ci_fail "$scen: standin-app setup"
    return
  fi

  ci_fo_monitor "$dir" &
  echo $! >"$CI_WORK/pids/supervisor.$scen-monitor"
  t_launch=$(ci_now_us)
  for ((n = 1; n <= CI_FO_GATES; n++)); do
    ci_fo_replica "$scen" "$n" "$release" "$db" &
    echo $! >"$CI_WORK/pids/supervisor.$scen-$n"
  done
  ci_log "   $CI_FO_GATES gates started: migrate --release $release --wait-timeout ${CI_FO_WAIT_TIMEOUT_S}s --connect-timeout ${CI_FO_CONNECT_TIMEOUT_S}s -- ${CI_FO_MIGRATE[*]##*/} (STANDIN_STEP_MS=$CI_FO_STEP_MS)"

  # The first migration to begin, and the gate that runs it.
  if ! ci_wait_for 60 test -s "$dir/runs.log"; then
    for ((n = 1; n <= CI_FO_GATES; n++)); do ci_show_tail "$dir/gate-$n.1.log" 5; done
    ci_fail "$scen: a migration starts" "no 'start' in the run log within 60 s"
    : >"$dir/stop"
    return
  fi
  read -r _ holder_pid t_start <"$dir/runs.log"
  t_start=$((t_start / 1000))
  p=$holder_pid holder_gate=""
  for _ in 1 2 3; do
    p=$(ci_ppid_of "$p") || break
    if grep -q " $p\$" "$dir/gates.pids"; then holder_gate=$p; break; fi
  done
  read -r holder_n holder_k _ < <(grep " $holder_gate\$" "$dir/gates.pids")
  ci_log "   holder: gate-${holder_n:-?} (attempt ${holder_k:-?}, pid ${holder_gate:-?}) runs migration pid $holder_pid, $(ci_secs "$t_launch" "$t_start") s after launch"

  # Fail over while it migrates.
  while (($(ci_now_us) < t_start + CI_FO_KILL_AT_MS * 1000)); do sleep 0.05; done
  local mid=1
  ci_running "$holder_pid" || mid=0
  grep -q "^end $holder_pid " "$dir/runs.log" && mid=0
  CI_FO_T_ACT=$(ci_now_us) CI_FO_ACT_WHAT="the failover began" CI_FO_ACT_FROM="the failover"
  "$action" "$old" "$new" "$dir" "$t_start"
  ci_expect "$scen: $CI_FO_ACT_WHAT mid-migration (holder still migrating)" 1 "$mid"
  local t_act=$CI_FO_T_ACT

  # Until every replica is done: note when the other node becomes the (only) primary.
  local limit=$((SECONDS + CI_FO_LIMIT_S))
  until ci_fo_all_done "$dir"; do
    if [[ -z $t_new ]] && ci_fo_only_primary "$new"; then t_new=$(ci_now_us); fi
    if ((SECONDS >= limit)); then
      ci_fail "$scen: every replica's gates finish within ${CI_FO_LIMIT_S}s" \
        "unfinished: $(for ((n = 1; n <= CI_FO_GATES; n++)); do [[ -f $dir/replica-$n.result ]] || printf 'gate-%s ' "$n"; done)"
      break
    fi
    sleep 0.25
  done
  if [[ -z $t_new ]] && ci_wait_for 30 ci_fo_only_primary "$new"; then t_new=$(ci_now_us); fi
  : >"$dir/stop"
  # the supervisors of unfinished replicas end at $dir/stop; their gates are killed now
  while read -r _ _ pid; do
    ci_running "$pid" && ci_ours "$pid" "$CI_WORK" && kill -KILL "$pid" 2>/dev/null
  done <"$dir/gates.pids"
  sleep 0.3

  # ---- what happened
  ci_log "   replicas (exit codes of each attempt, total time):"
  local rc k t0 t1 ok_all=1 in_time=1 codes total last0=0 new_now
  for ((n = 1; n <= CI_FO_GATES; n++)); do
    codes=$(awk '{printf "%s%s", sep, $2; sep=" -> "}' "$dir/replica-$n.exits" 2>/dev/null)
    if [[ -f $dir/replica-$n.result ]]; then
      read -r rc k t0 t1 <"$dir/replica-$n.result"
      total=$(ci_secs "$t0" "$t1")
      [[ $rc == 0 ]] || ok_all=0
      (((t1 - t0) <= CI_FO_WAIT_TIMEOUT_S * 1000000)) || in_time=0
      [[ $rc == 0 ]] && ((t1 > last0)) && last0=$t1
    else
      rc="?" total="unfinished" ok_all=0 in_time=0
    fi
    ci_log "     gate-$n: ${codes:-none}   ${total}s$([[ $n == "$holder_n" ]] && echo "   (first holder)")"
  done
  # Gates that failed and were restarted, besides the holder: their last words.
  for ((n = 1; n <= CI_FO_GATES; n++)); do
    while read -r k rc _; do
      [[ $rc == 0 || ($n == "$holder_n" && $k == "$holder_k") ]] && continue
      ci_log "   note: gate-$n attempt $k exited $rc: $(grep -E 'ERROR' "$dir/gate-$n.$k.log" | tail -n1 | cut -c1-300)"
    done <"$dir/replica-$n.exits"
  done
  ci_log "   lock scope of the gates: $(sed -n 's/.* scope=\([A-Za-z]*\).*/\1/p' "$dir"/gate-*.log | sort | uniq -c | awk '{printf "%s%s x%s", sep, $2, $1; sep=", "}')"
  new_now=$(fo_primary | tr '\n' ' ')
  ci_expect "$scen: $new is the only primary afterwards" "$new " "$new_now"
  local first_code
  first_code=$(awk -v k="$holder_k" '$1 == k {print $2}' "$dir/replica-$holder_n.exits" 2>/dev/null)
  ci_expect "$scen: the first holder (gate-$holder_n) exits 69 (fenced: lost its lock session)" 69 "$first_code"
  if [[ $first_code != 69 ]]; then
    ci_show_tail "$dir/gate-$holder_n.$holder_k.log" 25
  fi
  t_gone=$(awk -v p="$holder_pid" '$2 == p {print $3; exit}' "$dir/gone.log" 2>/dev/null)
  ci_check "$scen: the first holder's migration process (pid $holder_pid) is gone" \
    bash -c "[[ -n '$t_gone' ]] && ! grep -qs '(standin-app)' /proc/$holder_pid/stat"
  local done_count
  done_count=$(fo_q "$new" "$db" "SELECT count(*) FROM migrations_gate.ledger WHERE release = '$release' AND outcome = 'done'")
  ci_expect "$scen: release $release is done exactly once in the ledger on the new primary $new" 1 "$done_count"
  ci_log "   ledger on $new:"
  fo_q "$new" "$db" "SELECT '     ' || id || '  ' || outcome || '  ' || coalesce(holder, '?') || '  pid ' || coalesce(pid::text, '?') || '  exit ' || coalesce(exit_code::text, '-') || '  ' || coalesce(left(detail, 110), '') FROM migrations_gate.ledger WHERE release = '$release' ORDER BY id" 2>&1 | sed 's/^/ /'
  if [[ $ok_all == 1 ]]; then
    ci_pass "$scen: every replica's last gate exits 0"
  else
    ci_fail "$scen: every replica's last gate exits 0"
    for ((n = 1; n <= CI_FO_GATES; n++)); do
      k=1 rc=""
      read -r k rc _ < <(tail -n1 "$dir/replica-$n.exits" 2>/dev/null)
      [[ $rc == 0 ]] || ci_show_tail "$dir/gate-$n.${k:-1}.log" 12
    done
  fi
  if [[ $in_time == 1 ]]; then ci_pass "$scen: every replica finished within its --wait-timeout (${CI_FO_WAIT_TIMEOUT_S}s)"; else ci_fail "$scen: every replica finished within its --wait-timeout (${CI_FO_WAIT_TIMEOUT_S}s)"; fi
  local ov
  ov=$(ci_fo_overlaps "$dir")
  ci_expect "$scen: no two migrations overlapped (run log: $(grep -c '^start' "$dir/runs.log") started, $(grep -c '^end' "$dir/runs.log") ended)" "" "$ov"
  ci_expect "$scen: exactly one migration ran to its end" 1 "$(grep -c '^end' "$dir/runs.log")"
  ci_expect "$scen: mg_runs on $new records no overlap (database-side probe)" 0 \
    "$(fo_q "$new" "$db" "SELECT count(*) FROM mg_runs WHERE overlapped")"

  t_done=$(fo_q "$new" "$db" "SELECT (extract(epoch FROM finished_at) * 1000000)::bigint FROM migrations_gate.ledger WHERE release = '$release' AND outcome = 'done'")
  ci_log "   timings (from $CI_FO_ACT_FROM):"
  [[ -n $t_new ]] && ci_log "     $(printf '%-41s' "$new is the only primary ($CI_FO_PRIMARY_BY):") $(ci_secs "$t_act" "$t_new") s"
  [[ -n $t_gone ]] && ci_log "     holder's migration gone:                  $(ci_secs "$t_act" "$t_gone") s"
  local t_next
  t_next=$(awk -v p="$holder_pid" '$1 == "start" && $2 != p {print substr($3, 1, length($3) - 3); exit}' "$dir/runs.log")
  [[ -n $t_next ]] && ci_log "     next migration started (takeover):        $(ci_secs "$t_act" "$t_next") s"
  [[ $t_done =~ ^[0-9]+$ ]] && ci_log "     release $release done (ledger finished_at):     $(ci_secs "$t_act" "$t_done") s"
  ((last0 > 0)) && ci_log "     last replica exit 0:                      $(ci_secs "$t_act" "$last0") s"
  return 0
}
