# shellcheck shell=bash
# ci/lib.sh: what several CI scripts repeat. Sourced, never executed:
#
#   . "$(dirname "${BASH_SOURCE[0]}")/lib.sh"        # from ci/*
#   . "$ROOT/ci/lib.sh"                              # from .ci/run
#
# It defines functions and nothing else: no `set` options, no traps, no output, no variables
# except the CI_* ones a function documents as its result. Every name starts with `ci_`.
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
#   ci_pg_start DIR PASSWORD LOGDIR [SETTING...]
#                              initdb + pg_ctl start in DIR on a free port; sets CI_PG_BIN and
#                              CI_PG_PORT
#   ci_pg_stop DIR             stop the server of ci_pg_start DIR (immediate), if it runs
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

# ci_pg_start DIR PASSWORD LOGDIR [SETTING...]
#   A private PostgreSQL server for one CI run: initdb in DIR/data (superuser `postgres` with
#   PASSWORD, scram-sha-256 on TCP, trust on the Unix socket in DIR), then pg_ctl start on a free
#   port, listening on 127.0.0.1 only, with fsync, synchronous_commit and full_page_writes off
#   (throwaway data) and max_connections=100. Each SETTING (name=value) is one more `-c` server
#   setting and may override those. The server log is DIR/log; initdb's and pg_ctl's output go
#   to LOGDIR/initdb.log and LOGDIR/pg_ctl.log. DIR is created if missing and, when we are root,
#   handed to the postgres user. On success sets CI_PG_BIN (server binaries) and CI_PG_PORT; on
#   failure returns 1 and the logs say why. Stop it with ci_pg_stop DIR.
ci_pg_start() {
  local dir=$1 pw=$2 logdir=$3
  shift 3
  local opts s
  mkdir -p "$dir" "$logdir"
  CI_PG_BIN=$(ci_pg_bindir) || { echo "ci_pg_start: PostgreSQL server binaries not found" >"$logdir/initdb.log"; return 1; }
  printf '%s' "$pw" >"$dir/pw"
  if [[ $(id -u) -eq 0 ]]; then chown -R postgres:postgres "$dir"; fi
  ci_as_postgres "$CI_PG_BIN/initdb" -D "$dir/data" -U postgres --auth-local=trust \
    --auth-host=scram-sha-256 -E UTF8 --no-sync --pwfile="$dir/pw" >"$logdir/initdb.log" 2>&1 || return 1
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
