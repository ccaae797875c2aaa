"""Gate-specific rules for migrations-gate's deployment files, run by ci/validate-manifests.

    validate_manifests.py compose FILE RENDERED.json     a Compose/stack file (`compose config` JSON)
    validate_manifests.py k8s DIR RENDERED.yaml          a kustomization's rendered output
    validate_manifests.py kustomization FILE             its resources list against the directory
    validate_manifests.py dockerfile FILE                the gate image's contract
    validate_manifests.py selftest FIXTURE               a negative fixture (ci/fixtures/) must be
                                                         refused with the problems it names
    validate_manifests.py helm-values FILE KEYS VERSION...
                                                         Helm values for a chart: every key exists
                                                         in KEYS (the chart's values.yaml key
                                                         structure), added objects validate against
                                                         the Kubernetes JSON schemas of VERSIONs

Besides the wiring (the binary injected, a release set, the flag left to the gate, hardened gate
containers), every gated replica is checked against the platform that runs it:

  start budget     every startupProbe / livenessProbe, healthcheck (start_period + interval ×
                   retries), progressDeadlineSeconds and `helm install|upgrade --timeout` written
                   in the docs covers the gate's bounds: --wait-timeout (twice with --other-releases
                   wait) + --migration-timeout (which must be set) + --ready-timeout (run with a
                   probe) + the app's own start (APP_START); defaults read from src/config/
  update strategy  RollingUpdate, Swarm start-first or stop-first in batches keep old replicas
                   running: --other-releases wait deadlocks and fail refuses; ignore needs the
                   words expand/contract in the file and --allow-older-release; no automatic
                   rollback (Swarm failure_action rollback, helm --atomic)
  Open WebUI       one recipe: --preset open-webui, a pinned version, the release equal to it,
                   a health check of the file's own
  admin Job        runs status with the lock, schema and database of the deployment it names
  contract step    `contract` runs once: a Kubernetes Job (activeDeadlineSeconds covering
                   --wait-timeout + --migration-timeout) with the deployment's lock, schema and
                   database; a Compose one-shot (restart no or on-failure), a Swarm job
                   (deploy.mode replicated-job, never restart condition any); --wait-timeout
                   longer than --settle; no --other-releases (the gate refuses it, exit 64)

Prints one line per problem and exits 1 if there is any. Runs in the validate-manifests venv
(PyYAML, and kubernetes-validate's schemas and jsonschema for helm-values).
"""
import os
import re
import sys

import yaml

errors = []


def err(msg):
    errors.append(msg)


GATE_BIN_NAMES = ("migrations-gate",)


def is_gate_cmd(argv):
    return bool(argv) and os.path.basename(str(argv[0])) in GATE_BIN_NAMES


def gate_mode(argv):
    return argv[1] if len(argv) > 1 else None


def check_gate_argv(where, argv, app_args):
    """argv: the gate's command line up to and including '--'; app_args: what follows."""
    mode = gate_mode(argv)
    if mode not in ("run", "migrate", "contract"):
        err(f"{where}: gate mode {mode!r}, expected run, migrate or contract")
        return
    if "--" not in argv and "--" not in app_args:
        err(f"{where}: no '--' before the app command")
    full = list(argv) + list(app_args)
    after = full[full.index("--") + 1:] if "--" in full else []
    if not after:
        err(f"{where}: nothing to run after '--'")


def release_rules(where, env):
    has_rel = "MIGRATIONS_GATE_RELEASE" in env
    has_from = "MIGRATIONS_GATE_RELEASE_FROM" in env
    if has_rel and has_from:
        err(f"{where}: MIGRATIONS_GATE_RELEASE and MIGRATIONS_GATE_RELEASE_FROM conflict")
    if not (has_rel or has_from):
        err(f"{where}: no release ID (MIGRATIONS_GATE_RELEASE or MIGRATIONS_GATE_RELEASE_FROM)")
    if not any(k in env for k in ("MIGRATIONS_GATE_DATABASE_URL", "MIGRATIONS_GATE_DATABASE_URL_FILE", "DATABASE_URL")):
        err(f"{where}: no database URL for the gate")
    if "MIGRATIONS_GATE_DATABASE_URL" in env and "MIGRATIONS_GATE_DATABASE_URL_FILE" in env:
        err(f"{where}: MIGRATIONS_GATE_DATABASE_URL and _FILE conflict")
    if "ENABLE_DB_MIGRATIONS" in env:
        err(f"{where}: ENABLE_DB_MIGRATIONS is set, but the gate switches it")


# ------------------------------------------------------------ start budgets, update strategies
# Whatever may kill a starting replica (a startupProbe or livenessProbe, a health check that
# Swarm acts on, `kubectl rollout status` through progressDeadlineSeconds, `helm --timeout`)
# must allow for the longest start the gate's own bounds permit, or the kill lands on a running
# migration. That start is, at most:
#
#   --wait-timeout                 waiting for the lock or the release (connection trouble included)
# + --wait-timeout again           only with --other-releases wait: the holder waits, bounded by
#                                  the same flag, for apps of another release to disconnect
# + --migration-timeout            the migration (no default: unbounded unless set)
# + --ready-timeout                only `run` with a --ready-* probe: the holder's app to be ready
# + the app's own start            an allowance per app (APP_START below): a follower's app start
#                                  after its wait
#
# The defaults are read from the flags' definitions in src/config/ (where they live), never copied.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The app's own start, in seconds: how long the app may take to answer its probe once the gate
# has let it start. Open WebUI imports its whole backend and may load an embedding model.
APP_START = {"open-webui": 120, "default": 60}

# What the probes default to when a field is unset (Kubernetes, Compose/Swarm healthcheck).
K8S_PROBE_DEFAULTS = {"initialDelaySeconds": 0, "periodSeconds": 10, "failureThreshold": 3}
COMPOSE_HEALTH_DEFAULTS = {"interval": "30s", "retries": 3, "start_period": "0s"}
K8S_PROGRESS_DEADLINE_DEFAULT = 600

# A file whose update strategy keeps old replicas running (RollingUpdate, start-first) may use
# --other-releases ignore only if it says, next to it, that its migrations are expand/contract.
EXPAND_CONTRACT = re.compile(r"expand\s*/\s*contract", re.I)

_UNITS = {
    "ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3,
    "s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hr": 3600, "hrs": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
}


def seconds(text):
    """A duration as the gate (humantime: `30m`, `1h 30m`) or Compose (Go: `1h28m0s`) writes it,
    in seconds; a bare number is seconds. None if it cannot be read."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    s = str(text).strip()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return float(s)
    if not re.fullmatch(r"(\d+(\.\d+)?\s*[a-zµ]+\s*)+", s):
        return None
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-zµ]+)", s)
    total = 0.0
    for n, u in parts:
        if u not in _UNITS:
            return None
        total += float(n) * _UNITS[u]
    return total


def minutes(secs):
    m = secs / 60
    return f"{m:g} min" if m == int(m) else f"{m:.1f} min"


_DEFAULTS = None


def gate_defaults():
    """MIGRATIONS_GATE_* -> its default, read from the flags' definitions in src/config/."""
    global _DEFAULTS
    if _DEFAULTS is None:
        _DEFAULTS = {}
        cfg = os.path.join(ROOT, "src", "config")
        for fn in sorted(os.listdir(cfg)) if os.path.isdir(cfg) else []:
            if not fn.endswith(".rs"):
                continue
            with open(os.path.join(cfg, fn)) as f:
                for line in f:
                    m = re.search(r'env = "(MIGRATIONS_GATE_[A-Z_]+)".*?default_value = "([^"]*)"', line)
                    if m:
                        _DEFAULTS[m.group(1)] = m.group(2)
    return _DEFAULTS


def gate_setting(argv, env, flag, name):
    """A flag's value: on the command line (before `--`), else its environment twin, else None.
    `env` maps names to values (None: set but not a literal, e.g. from a Secret)."""
    args = list(argv)
    if "--" in args:
        args = args[:args.index("--")]
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a[len(flag) + 1:]
    if name in env:
        return env[name] if env[name] is not None else "(not a literal)"
    return None


def has_flag(argv, env, flag, name):
    args = list(argv)
    if "--" in args:
        args = args[:args.index("--")]
    return flag in args or any(a.startswith(flag + "=") for a in args) or name in env


def preset_of(argv, env):
    return gate_setting(argv, env, "--preset", "MIGRATIONS_GATE_PRESET")


def other_releases_policy(argv, env):
    """--other-releases as the gate decides it (src/config/plan.rs, `bounds`): the flag or its
    twin, else fail under --preset open-webui, else wait."""
    p = gate_setting(argv, env, "--other-releases", "MIGRATIONS_GATE_OTHER_RELEASES")
    if p:
        return p
    return "fail" if preset_of(argv, env) == "open-webui" else "wait"


def allows_older_release(argv, env):
    args = list(argv)
    if "--" in args:
        args = args[:args.index("--")]
    if "--allow-older-release" in args:
        return True
    return str(env.get("MIGRATIONS_GATE_ALLOW_OLDER_RELEASE") or "").lower() in ("true", "1", "yes", "on")


def needed_start(where, argv, env, app):
    """The longest start the gate's bounds permit for this replica, in seconds, with the sum
    spelled out; None (and an error) when a bound is missing or unreadable."""
    defaults = gate_defaults()
    mode = gate_mode(argv)

    def bound(flag, name):
        v = gate_setting(argv, env, flag, name)
        if v is None:
            v = defaults.get(name)
        if v is None:
            return None
        s = seconds(v)
        if s is None:
            err(f"{where}: cannot read {flag} {v!r} as a duration")
        return s

    wait = bound("--wait-timeout", "MIGRATIONS_GATE_WAIT_TIMEOUT")
    if wait is None and gate_setting(argv, env, "--wait-timeout", "MIGRATIONS_GATE_WAIT_TIMEOUT"):
        return None
    if wait is None:
        err(f"{where}: cannot find the default of --wait-timeout in src/config/")
        return None
    mig = bound("--migration-timeout", "MIGRATIONS_GATE_MIGRATION_TIMEOUT")
    if mig is None and gate_setting(argv, env, "--migration-timeout", "MIGRATIONS_GATE_MIGRATION_TIMEOUT"):
        return None
    if mig is None:
        err(f"{where}: no --migration-timeout (MIGRATIONS_GATE_MIGRATION_TIMEOUT): a migration is "
            "unbounded by default, so no start budget can cover it; the file must set one")
        return None
    parts = [("--wait-timeout", wait)]
    policy = other_releases_policy(argv, env)
    if policy == "wait":
        parts.append(("--other-releases wait (up to --wait-timeout)", wait))
    parts.append(("--migration-timeout", mig))
    probes = (("--ready-http", "MIGRATIONS_GATE_READY_HTTP"), ("--ready-tcp", "MIGRATIONS_GATE_READY_TCP"),
              ("--ready-sql", "MIGRATIONS_GATE_READY_SQL"))
    if mode == "run" and any(has_flag(argv, env, f, n) for f, n in probes):
        ready = bound("--ready-timeout", "MIGRATIONS_GATE_READY_TIMEOUT")
        if ready is None:
            err(f"{where}: cannot find the default of --ready-timeout in src/config/")
            return None
        parts.append(("--ready-timeout", ready))
    parts.append((f"the app's own start ({app})", APP_START.get(app, APP_START["default"])))
    if any(p is None for _, p in parts):
        return None
    total = sum(p for _, p in parts)
    return total, " + ".join(f"{name} {minutes(p)}" for name, p in parts) + f" = {minutes(total)}"


def budget_rule(where, what, have, need, then="the kill would land on a running migration"):
    """`what` (a probe, a health check, a deadline) allows `have` seconds; the gate may take `need`."""
    if need is None or have is None:
        return
    total, sum_text = need
    if have < total:
        err(f"{where}: {what} allows {minutes(have)}, shorter than the gate's bounds: {sum_text}; "
            f"{then}. Lengthen it, or lower the gate's timeouts")


def contract_rules(where, argv, env, deadline=None, deadline_text=None):
    """`contract` (a release's contract step, run once after the rollout): its bounds make sense,
    and what the gate would refuse is not there. `deadline`, in seconds, is what may stop it
    (a Job's activeDeadlineSeconds)."""
    if has_flag(argv, env, "--other-releases", "MIGRATIONS_GATE_OTHER_RELEASES"):
        err(f"{where}: contract with --other-releases (MIGRATIONS_GATE_OTHER_RELEASES): the gate refuses it "
            "(exit 64), the step waits for older releases' apps itself (--settle)")
    defaults = gate_defaults()

    def bound(flag, name):
        v = gate_setting(argv, env, flag, name)
        v = defaults.get(name) if v is None else v
        s = seconds(v) if v is not None else None
        if v is not None and s is None:
            err(f"{where}: cannot read {flag} {v!r} as a duration")
        return v, s

    (wait_text, wait), (settle_text, settle) = (bound("--wait-timeout", "MIGRATIONS_GATE_WAIT_TIMEOUT"),
                                                bound("--settle", "MIGRATIONS_GATE_SETTLE"))
    if wait is None or settle is None:
        if wait_text is None or settle_text is None:
            err(f"{where}: cannot find the defaults of --wait-timeout and --settle in src/config/")
        return
    if wait <= settle:
        err(f"{where}: contract --wait-timeout {wait_text} is not longer than --settle {settle_text}: "
            "--wait-timeout bounds the whole wait (the rollout, then --settle), so the step never runs "
            "(exit 75 every time); give it the rollout plus --settle")
    mig_text, mig = bound("--migration-timeout", "MIGRATIONS_GATE_MIGRATION_TIMEOUT")
    if mig_text is None:
        err(f"{where}: no --migration-timeout (MIGRATIONS_GATE_MIGRATION_TIMEOUT): the contract command is "
            "unbounded by default, so nothing that stops the step can be set to cover it; the file must set one")
        return
    if deadline is not None and mig is not None:
        need = wait + mig
        budget_rule(where, deadline_text, deadline,
                    (need, f"--wait-timeout {minutes(wait)} + --migration-timeout {minutes(mig)} = {minutes(need)}"),
                    "Kubernetes would stop the step while it waits or while its command runs")


def k8s_probe_budget(probe):
    p = {**K8S_PROBE_DEFAULTS, **(probe or {})}
    return p["initialDelaySeconds"] + p["failureThreshold"] * p["periodSeconds"]


def compose_health_budget(hc):
    """start_period + interval × retries, or None when there is no health check."""
    if not hc or hc.get("disable") or (hc.get("test") or [None])[0] == "NONE":
        return None
    h = {**COMPOSE_HEALTH_DEFAULTS, **{k: v for k, v in hc.items() if v is not None}}
    sp, iv = seconds(h["start_period"]), seconds(h["interval"])
    if sp is None or iv is None:
        return None
    return sp + iv * int(h["retries"])


def says_expand_contract(paths):
    """Whether one of these files states the expand/contract rule (a comment next to the policy)."""
    for p in paths:
        with open(p) as f:
            if EXPAND_CONTRACT.search(f.read()):
                return True
    return False


def strategy_rule(where, keeps_old, strategy_text, policy, allow_older, files, fix):
    """An update strategy that keeps old replicas serving while new ones start (`keeps_old`)
    against the holder's --other-releases policy."""
    if not keeps_old:
        return
    if policy == "wait":
        err(f"{where}: {strategy_text} keeps old replicas running until new ones are ready, while the new "
            "holder's --other-releases wait waits for them to disconnect: a deadlock until --wait-timeout "
            f"(exit 75). {fix}")
    elif policy == "fail":
        err(f"{where}: {strategy_text} keeps old replicas running while new ones start, so the new holder's "
            f"--other-releases fail refuses (exit 78) on every try. {fix}")
    elif policy == "ignore":
        if not says_expand_contract(files):
            err(f"{where}: {strategy_text} with --other-releases ignore runs old code on the new schema "
                "while it migrates: say in a comment next to it that the migrations are expand/contract "
                f"(the phrase 'expand/contract' in {', '.join(files)}), or stop old replicas first")
        if not allow_older:
            err(f"{where}: {strategy_text} with expand/contract migrations: an old replica that restarts "
                "mid-rollout finds a newer release done and exits 78; set MIGRATIONS_GATE_ALLOW_OLDER_RELEASE=true "
                "(old code may run on the new schema, which is what expand/contract promises)")
    else:
        err(f"{where}: unknown --other-releases policy {policy!r}")


K8S_FIX = ("Use strategy Recreate (all old pods stop first), or --other-releases ignore with "
           "expand/contract migrations said in a comment")
SWARM_FIX = ("Use update_config order stop-first with parallelism 0 (every task at once), or "
             "--other-releases ignore with expand/contract migrations said in a comment")


# ------------------------------------------------------------------ Open WebUI: one recipe
MOVING_TAGS = {"", "main", "latest", "dev", "cuda", "ollama", "slim"}


def image_tag(image):
    """The tag of an image reference (after the last ':' of its last path part), '' if none."""
    last = image.rsplit("/", 1)[-1]
    return last.split("@", 1)[0].split(":", 1)[1] if ":" in last.split("@", 1)[0] else ""


def open_webui_version_rules(where, image, release):
    """A pinned Open WebUI version, and the release derived from it."""
    tag = image_tag(image)
    if tag in MOVING_TAGS or not re.match(r"v?\d+\.\d+", tag):
        err(f"{where}: Open WebUI image {image!r} is not pinned to a version: nodes may run different "
            "builds under one release; pin the tested version (e.g. 0.11.0)")
        return
    if release is None:
        err(f"{where}: MIGRATIONS_GATE_RELEASE must be the Open WebUI version ({tag})")
    elif release != tag and release != tag.lstrip("v"):
        err(f"{where}: MIGRATIONS_GATE_RELEASE {release!r} is not the image's version {tag!r}: derive it "
            "from the tag, in one place")


# --------------------------------------------------------------------------------- compose
def is_stack_file(path):
    fn = os.path.basename(path)
    return fn in ("stack.yaml", "stack.yml") or fn.endswith((".stack.yaml", ".stack.yml"))


def compose(path, rendered):
    """A Compose or Swarm stack file, as `compose config` renders it (JSON; a fixture may be YAML
    in the same shape). Stack files (stack.yaml, *.stack.yaml) also get the Swarm update rules."""
    with open(rendered) as f:
        project = yaml.safe_load(f)
    stack = is_stack_file(path)
    services = project.get("services", {})
    installers = {}  # volume name -> service name, for services running `install DIR`
    for name, svc in services.items():
        cmd = svc.get("command") or []
        if cmd[:1] == ["install"] and len(cmd) == 2:
            for v in svc.get("volumes", []):
                if v.get("type") == "volume" and v.get("target") == cmd[1]:
                    installers[v.get("source")] = name
    gated = 0
    for name, svc in services.items():
        ep = svc.get("entrypoint") or []
        if not is_gate_cmd(ep):
            continue
        gated += 1
        where = f"service {name}"
        check_gate_argv(where, ep, svc.get("command") or [])
        if ep[-1:] != ["--"]:
            err(f"{where}: entrypoint should end with '--' so that `command` is the app")
        env = svc.get("environment") or {}
        release_rules(where, env)
        image = svc.get("image", "")
        if ep[0].startswith("/gate/"):
            mounts = [v for v in svc.get("volumes", []) if v.get("target") == "/gate"]
            if not mounts:
                err(f"{where}: runs {ep[0]} but mounts nothing at /gate")
                continue
            m = mounts[0]
            if not m.get("read_only"):
                err(f"{where}: /gate should be mounted read-only")
            inst = installers.get(m.get("source"))
            if not inst:
                err(f"{where}: no service runs `install /gate` into volume {m.get('source')}")
            else:
                dep = (svc.get("depends_on") or {}).get(inst)
                if not dep or dep.get("condition") != "service_completed_successfully":
                    err(f"{where}: must depend_on {inst} with condition service_completed_successfully")
        if gate_mode(ep) == "contract":
            compose_contract_rules(where, svc, ep, env, stack)
            continue
        app = "open-webui" if "open-webui" in image else "default"
        if app == "open-webui":
            check_open_webui(where, ep, svc, "working_dir", env)
            open_webui_version_rules(where, image, env.get("MIGRATIONS_GATE_RELEASE"))
        deploy = svc.get("deploy") or {}
        replicas = deploy.get("replicas")
        if not replicas or int(replicas) < 2:
            err(f"{where}: expected several replicas (deploy.replicas)")
        need = needed_start(where, ep, env, app)
        have = compose_health_budget(svc.get("healthcheck"))
        if have is None and app == "open-webui":
            err(f"{where}: set a healthcheck: the Open WebUI image's own HEALTHCHECK (every 30s, 3 retries, "
                "no start period) calls a replica that waits for the holder unhealthy after 90s")
        budget_rule(where, "healthcheck start_period + interval × retries", have, need,
                    "Swarm replaces an unhealthy task, and the kill would land on a running migration" if stack
                    else "a replica still waiting or migrating is reported unhealthy (and replaced under Swarm)")
        if stack:
            uc = deploy.get("update_config") or {}
            order = uc.get("order") or "stop-first"
            par = int(uc.get("parallelism", 1))
            all_at_once = par == 0 or (replicas and par >= int(replicas))
            keeps_old = order == "start-first" or not all_at_once
            text = (f"update_config order {order}" if order == "start-first"
                    else f"update_config order stop-first with parallelism {par} of {replicas} replicas")
            strategy_rule(where, keeps_old, text, other_releases_policy(ep, env), allows_older_release(ep, env),
                          [path], SWARM_FIX)
            if uc.get("failure_action") == "rollback":
                err(f"{where}: update_config failure_action rollback starts the old release again after the new "
                    "one may have migrated: the gate refuses it (exit 78, an older release), and the schema is "
                    "not rolled back; use pause (the Swarm twin of never `helm --atomic`)")
    if not gated:
        err(f"{path}: no service uses the gate as its entrypoint")


def compose_contract_rules(where, svc, ep, env, stack):
    """A service that runs `contract`: a one-shot, never started again after it exits 0 (a runner
    started after the step is done exits 0 at once, so a restart policy of `always` loops)."""
    restart = str(svc.get("restart") or "no")
    if restart in ("always", "unless-stopped"):
        err(f"{where}: restart {restart} starts the contract step's runner again after every exit 0; "
            "it is a one-shot: restart \"no\" or on-failure")
    if stack:
        deploy = svc.get("deploy") or {}
        mode = deploy.get("mode") or "replicated"
        if mode not in ("replicated-job", "global-job"):
            err(f"{where}: deploy.mode {mode}: Swarm restarts a service's task after it exits 0, so the contract "
                "step's runner would start again and again; use deploy.mode: replicated-job")
        cond = (deploy.get("restart_policy") or {}).get("condition") or "any"
        if cond == "any":
            err(f"{where}: restart_policy condition any restarts the contract step's runner after it exits 0; "
                "use on-failure")
    contract_rules(where, ep, env)


def check_open_webui(where, argv, spec, workdir_key, env):
    """The Open WebUI recipe, in a compose service or a Kubernetes container alike:
    `workdir_key` is how each spells the working directory."""
    if "--ready-http" not in argv or "--migrate" not in argv:
        err(f"{where}: the Open WebUI recipe needs --migrate and --ready-http")
    if preset_of(argv, env) != "open-webui":
        err(f"{where}: the Open WebUI recipe needs --preset open-webui (or MIGRATIONS_GATE_PRESET=open-webui)")
    if spec.get(workdir_key) != "/app/backend":
        err(f"{where}: Open WebUI's start.sh needs {workdir_key} /app/backend")
    for k in ("WEBUI_SECRET_KEY", "REDIS_URL", "WEBSOCKET_MANAGER", "VECTOR_DB"):
        if k not in env:
            err(f"{where}: {k} is required for several Open WebUI replicas")


# -------------------------------------------------------------------------------- kubernetes
RBAC_KINDS = {"ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}
POD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"}


def env_map(c):
    return {e["name"]: e for e in c.get("env") or []}


def env_values(c):
    """Name -> literal value (None for valueFrom: a Secret, a field) of a container's env."""
    return {e["name"]: (str(e["value"]) if "value" in e else None) for e in c.get("env") or []}


def source_files(path):
    """The files a rendered object came from: a kustomization's directory, or one file."""
    if os.path.isdir(path):
        return [os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith((".yaml", ".yml"))]
    return [path]


# An admin Job (k8s/admin) runs `status` with the settings of one gated deployment, named by this
# annotation (a path from the repository root): the same lock, schema and database.
ADMIN_SOURCE = "migrations-gate/settings-from"
ADMIN_COMMANDS = ("status", "check", "reset")
SAME_SETTINGS = ("MIGRATIONS_GATE_LOCK", "MIGRATIONS_GATE_LOCK_ID", "MIGRATIONS_GATE_SCHEMA",
                 "MIGRATIONS_GATE_DATABASE_URL", "MIGRATIONS_GATE_DATABASE_URL_FILE", "DATABASE_URL")


def admin_rules(where, job, c):
    args = c.get("args") or []
    if args[:1] == ["reset"]:
        err(f"{where}: a shipped admin Job runs status; reset is the documented second step, never applied as is")
    settings_from_rules(where, job, c, "status and reset must see the deployment's own lock, schema and database")


def settings_from_rules(where, job, c, why):
    """A Job that works on a gated deployment's ledger (the admin Job, a contract step) has the
    lock, schema and database of the deployment its annotation names."""
    src = ((job.get("metadata") or {}).get("annotations") or {}).get(ADMIN_SOURCE)
    if not src:
        err(f"{where}: annotate the Job with {ADMIN_SOURCE}: <the deployment file whose gate settings it uses>")
        return
    path = os.path.join(ROOT, src)
    if not os.path.isfile(path):
        err(f"{where}: {ADMIN_SOURCE} names {src}, which does not exist")
        return
    with open(path) as f:
        docs = [x for x in yaml.safe_load_all(f) if x]
    gate = None
    for d in docs:
        pod = (((d.get("spec") or {}).get("template") or {}).get("spec") or {})
        for cc in (pod.get("initContainers") or []) + (pod.get("containers") or []):
            cmd = cc.get("command") or []
            if is_gate_cmd(cmd) and gate_mode(cmd) in ("run", "migrate"):
                gate = gate or cc
    if gate is None:
        err(f"{where}: {src} has no container that runs the gate")
        return
    mine, theirs = env_map(c), env_map(gate)

    def said(e):
        if e is None:
            return "unset"
        if "value" in e:
            return repr(e["value"])
        ref = (e.get("valueFrom") or {}).get("secretKeyRef")
        return f"Secret {ref.get('name')} key {ref.get('key')}" if ref else "from a field"

    for n in SAME_SETTINGS:
        if mine.get(n) != theirs.get(n):
            err(f"{where}: {n} is {said(mine.get(n))} here and {said(theirs.get(n))} in {src}: {why}")


def sc_get(c, pod, key):
    v = (c.get("securityContext") or {}).get(key)
    return v if v is not None else (pod.get("securityContext") or {}).get(key)


GATE_TERMINATION_POLICY = "FallbackToLogsOnError"


def hardening_rules(where, c, pod):
    """Every container: no privilege escalation, no capabilities, seccomp, requests. Containers
    of the gate image also: non-root 65532, read-only root, the gate's small requests."""
    if sc_get(c, pod, "allowPrivilegeEscalation") is not False:
        err(f"{where}: allowPrivilegeEscalation must be false")
    drops = ((c.get("securityContext") or {}).get("capabilities") or {}).get("drop") or []
    if "ALL" not in drops:
        err(f"{where}: capabilities.drop must include ALL")
    if (sc_get(c, pod, "seccompProfile") or {}).get("type") != "RuntimeDefault":
        err(f"{where}: seccompProfile RuntimeDefault missing")
    if "resources" not in c or not (c["resources"].get("requests")):
        err(f"{where}: resource requests missing")
    if "migrations-gate" in c.get("image", ""):
        if sc_get(c, pod, "runAsNonRoot") is not True or sc_get(c, pod, "runAsUser") != 65532:
            err(f"{where}: gate container must run as non-root user 65532")
        if sc_get(c, pod, "readOnlyRootFilesystem") is not True:
            err(f"{where}: gate container needs readOnlyRootFilesystem")
        req = (c.get("resources") or {}).get("requests") or {}
        if str(req.get("cpu")) != "10m" or str(req.get("memory")) != "16Mi":
            err(f"{where}: gate container requests should be cpu 10m, memory 16Mi")


def termination_rules(where, c):
    """A container that runs the gate (its image, or the gate as command) shows the gate's last
    line in `kubectl describe pod`: the gate writes it to /dev/termination-log."""
    if "migrations-gate" in c.get("image", "") or is_gate_cmd(c.get("command") or []):
        if c.get("terminationMessagePolicy") != GATE_TERMINATION_POLICY:
            err(f"{where}: gate container needs terminationMessagePolicy: {GATE_TERMINATION_POLICY}")


def k8s(path, rendered):
    with open(rendered) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    if not docs:
        err(f"{path}: kustomize rendered nothing")
    for d in docs:
        kind, name = d.get("kind"), (d.get("metadata") or {}).get("name")
        if kind in RBAC_KINDS:
            err(f"{kind}/{name}: no RBAC objects are needed for the gate")
        if kind == "Secret":
            err(f"Secret/{name}: secrets are examples only and must not be rendered")
        if kind not in POD_KINDS:
            continue
        tmpl = d["spec"]["template"]
        pod = tmpl["spec"]
        labels = (tmpl.get("metadata") or {}).get("labels") or {}
        where_pod = f"{kind}/{name}"
        if pod.get("automountServiceAccountToken") is not False:
            err(f"{where_pod}: automountServiceAccountToken should be false (the gate needs no API access)")
        vols = {v["name"]: v for v in pod.get("volumes") or []}
        inits = pod.get("initContainers") or []
        installers = {}  # volume -> index of init container running `install /gate`
        for i, c in enumerate(inits):
            argv = (c.get("command") or []) + (c.get("args") or [])
            if "migrations-gate" in c.get("image", "") and argv[:1] == ["install"] and len(argv) == 2:
                for m in c.get("volumeMounts") or []:
                    if m["mountPath"] == argv[1]:
                        installers[m["name"]] = i
        all_cs = [("initContainers", i, c) for i, c in enumerate(inits)] + \
                 [("containers", i, c) for i, c in enumerate(pod.get("containers") or [])]
        has_migrate_init = False
        gated_app = set()
        if kind == "Deployment":
            stext = f"strategy {(d['spec'].get('strategy') or {}).get('type') or 'RollingUpdate'}"
        elif kind in ("StatefulSet", "DaemonSet"):
            stext = f"updateStrategy {(d['spec'].get('updateStrategy') or {}).get('type') or 'RollingUpdate'}"
        else:
            stext = ""
        keeps_old = stext.endswith(" RollingUpdate")
        for section, idx, c in all_cs:
            where = f"{where_pod} {section}[{c['name']}]"
            hardening_rules(where, c, pod)
            termination_rules(where, c)
            cmd = c.get("command") or []
            if kind == "Job" and "migrations-gate" in c.get("image", "") and not cmd \
                    and (c.get("args") or [None])[0] in ADMIN_COMMANDS:
                admin_rules(where, d, c)
            if not is_gate_cmd(cmd):
                continue
            argv = cmd + (c.get("args") or [])
            check_gate_argv(where, cmd, c.get("args") or [])
            env = env_map(c)
            release_rules(where, env)
            rel = env.get("MIGRATIONS_GATE_RELEASE")
            fp = ((rel or {}).get("valueFrom") or {}).get("fieldRef", {}).get("fieldPath", "")
            if fp.startswith("metadata.labels['"):
                label = fp[len("metadata.labels['"):-2]
                if label not in labels:
                    err(f"{where}: release comes from label {label}, which the pod template lacks")
            if cmd[0].startswith("/gate/"):
                mounts = [m for m in c.get("volumeMounts") or [] if m["mountPath"] == "/gate"]
                if not mounts:
                    err(f"{where}: runs {cmd[0]} but mounts nothing at /gate")
                else:
                    vol = mounts[0]["name"]
                    if not mounts[0].get("readOnly"):
                        err(f"{where}: /gate should be mounted readOnly")
                    if "emptyDir" not in vols.get(vol, {}):
                        err(f"{where}: volume {vol} should be an emptyDir")
                    inst = installers.get(vol)
                    if inst is None or (section == "initContainers" and inst >= idx):
                        err(f"{where}: no earlier init container runs `install /gate` into {vol}")
            if gate_mode(cmd) == "contract":
                if kind != "Job":
                    err(f"{where}: `contract` belongs in a Job (it runs once, after the rollout, and exits 0); "
                        f"in a {kind} it would start again after every exit")
                    continue
                contract_rules(where, argv, env_values(c), d["spec"].get("activeDeadlineSeconds"),
                               "activeDeadlineSeconds")
                settings_from_rules(where, d, c, "the contract step must see the deployment's own lock, schema, "
                                    "database and apps")
                continue
            if gate_mode(cmd) == "migrate":
                if section != "initContainers":
                    err(f"{where}: `migrate` belongs in an init container")
                has_migrate_init = True
            if section == "containers":
                gated_app.add(c["name"])
            app = "open-webui" if "open-webui" in c.get("image", "") else "default"
            vals = env_values(c)
            need = needed_start(where, argv, vals, app)
            killed = "the kubelet restarts the container, and the kill would land on a running migration"
            if section == "containers" and c.get("startupProbe"):
                budget_rule(where, "startupProbe (initialDelaySeconds + failureThreshold × periodSeconds)",
                            k8s_probe_budget(c["startupProbe"]), need, killed)
            elif section == "containers" and c.get("livenessProbe"):
                budget_rule(where, "livenessProbe, with no startupProbe,", k8s_probe_budget(c["livenessProbe"]),
                            need, killed)
            if kind == "Deployment":
                budget_rule(where, "progressDeadlineSeconds",
                            d["spec"].get("progressDeadlineSeconds", K8S_PROGRESS_DEADLINE_DEFAULT), need,
                            "`kubectl rollout status` reports the rollout failed while the migration still runs")
            strategy_rule(where_pod, keeps_old, stext, other_releases_policy(argv, vals),
                          allows_older_release(argv, vals), source_files(path), K8S_FIX)
            if app == "open-webui":
                check_open_webui(where, argv, c, "workingDir", vals)
                open_webui_version_rules(where, c.get("image", ""), vals.get("MIGRATIONS_GATE_RELEASE"))
                if kind == "Deployment" and (d["spec"].get("strategy") or {}).get("type") != "Recreate":
                    err(f"{where_pod}: Open WebUI needs strategy Recreate (no two versions on one schema)")
        if has_migrate_init:
            for c in pod.get("containers") or []:
                if c["name"] in gated_app:
                    continue
                v = env_map(c).get("ENABLE_DB_MIGRATIONS", {}).get("value")
                if v != "False":
                    err(f"{where_pod} containers[{c['name']}]: set ENABLE_DB_MIGRATIONS=False "
                        "(the migrate init container did the migrations)")


def kustomize_files(path):
    """Every non-example YAML next to kustomization.yaml is a resource; no example is."""
    d = os.path.dirname(path)
    with open(path) as f:
        k = yaml.safe_load(f) or {}
    res = set(k.get("resources") or [])
    for r in res:
        if r.endswith(".example.yaml"):
            err(f"{path}: example file {r} must not be a resource")
        if not r.endswith("/") and "://" not in r and not os.path.exists(os.path.join(d, r)):
            err(f"{path}: resource {r} does not exist")
    for fn in sorted(os.listdir(d)):
        if not fn.endswith((".yaml", ".yml")) or fn in ("kustomization.yaml", "kustomization.yml"):
            continue
        if fn.endswith(".example.yaml") or is_helm_values(fn):
            continue
        if fn not in res:
            err(f"{path}: {fn} is not listed under resources (rename it *.example.yaml if it is a sample)")


# ------------------------------------------------------------------------------- helm values
def is_helm_values(fn):
    """Helm values files (helm-values.yaml, *.helm-values.yaml) are input to a chart, not objects."""
    return fn in ("helm-values.yaml", "helm-values.yml") or fn.endswith((".helm-values.yaml", ".helm-values.yml"))


def shape(v):
    if isinstance(v, dict):
        return "a map"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if v is None:
        return "null"
    return "a string"


def check_keys(values, chart, path=""):
    """Every key path in VALUES exists in CHART, with the same shape. An empty map or list in
    CHART is free-form (what goes in is the chart user's, e.g. a container or a probe)."""
    for k, v in values.items():
        p = f"{path}.{k}" if path else str(k)
        if k not in chart:
            near = [c for c in chart if str(c).lower() == str(k).lower()]
            hint = f" (did you mean {near[0]}?)" if near else ""
            err(f"{p}: no such key in the chart's values.yaml{hint}; Helm would ignore it")
            continue
        want = chart[k]
        if v is None or want is None:
            continue
        if shape(v) != shape(want) and not (isinstance(want, str) and want == ""):
            err(f"{p}: is {shape(v)}, the chart expects {shape(want)}")
            continue
        if isinstance(v, dict) and want:
            check_keys(v, want, p)


def merged(chart, values):
    """The effective values: the chart's defaults, overridden by VALUES (maps merge, as Helm's)."""
    out = dict(chart)
    for k, v in values.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merged(out[k], v)
        else:
            out[k] = v
    return out


def k8s_schema_validator(version, filename):
    """A validator for FILENAME (e.g. container-v1.json, strict: unknown fields are errors) from
    the schemas kubernetes-validate ships for Kubernetes VERSION; offline."""
    import jsonschema
    from kubernetes_validate import utils
    from referencing import Registry, Resource

    mm = utils.major_minor(version)
    have = [v for v in utils.all_versions() if utils.major_minor(v) <= mm]
    if not have:
        raise SystemExit(f"kubernetes-validate has no schemas for Kubernetes {version}")
    d = f"kubernetes-json-schema/v{have[-1]}-local-strict"
    schema = utils.schema_contents(f"{d}/{filename}", version)
    defs = utils.schema_contents(f"{d}/_definitions.json", version)
    registry = Resource.from_contents(defs) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.validators.Draft202012Validator(schema, registry=registry)


SCHEMA_ERRORS = {}  # message -> Kubernetes versions whose schema reported it


def schema_errors(where, obj, validator, version):
    for e in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path)):
        at = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e.absolute_path)
        SCHEMA_ERRORS.setdefault(f"{where}{at}: {e.message}", []).append(version)


def flush_schema_errors():
    for msg, versions in SCHEMA_ERRORS.items():
        err(f"{msg} (Kubernetes {', '.join(versions)} schema)")
    SCHEMA_ERRORS.clear()


# The environment the chart itself renders into the Open WebUI container from websocket.*.
CHART_WEBSOCKET_ENV = ("ENABLE_WEBSOCKET_SUPPORT", "WEBSOCKET_MANAGER", "REDIS_URL", "WEBSOCKET_REDIS_URL")


def env_list(extra):
    """extraEnvVars in list form, or map form (NAME: value | {valueFrom: ...}) as the chart's
    open-webui.env helper renders it."""
    if isinstance(extra, dict):
        return [{"name": k, **v} if isinstance(v, dict) else {"name": k, "value": str(v)}
                for k, v in extra.items()]
    return list(extra or [])


def helm_values(path, keys_path, versions):
    """Helm values for Open WebUI's chart: keys exist in the chart, added objects are valid
    Kubernetes objects, and the gate is wired up as in k8s/open-webui."""
    with open(path) as f:
        values = yaml.safe_load(f) or {}
    with open(keys_path) as f:
        chart = yaml.safe_load(f) or {}
    check_keys(values, chart)
    v = merged(chart, values)
    name = "open-webui"  # the chart's container name ({{ .Chart.Name }})
    tag = (v.get("image") or {}).get("tag") or "chart-appVersion"

    # The Open WebUI container as templates/workload-manager.yaml renders it from these values.
    env = env_list(v.get("extraEnvVars"))
    app = {"name": name, "image": f"ghcr.io/open-webui/open-webui:{tag}",
           "ports": [{"name": "http", "containerPort": 8080}],
           "volumeMounts": [{"name": "data", "mountPath": "/app/backend/data"}]
           + list((v.get("volumeMounts") or {}).get("container") or []),
           "env": env, "tty": True}
    for k in ("command", "args"):
        if v.get(k):
            app[k] = v[k]
    for k in ("livenessProbe", "readinessProbe", "startupProbe", "resources"):
        if v.get(k):
            app[k] = v[k]
    inits = list(v.get("extraInitContainers") or [])
    volumes = list(v.get("volumes") or [])

    for version in versions:
        cv = k8s_schema_validator(version, "container-v1.json")
        vv = k8s_schema_validator(version, "volume-v1.json")
        mv = k8s_schema_validator(version, "volumemount-v1.json")
        for i, c in enumerate(inits):
            schema_errors(f"extraInitContainers[{i}]", c, cv, version)
        for i, vol in enumerate(volumes):
            schema_errors(f"volumes[{i}]", vol, vv, version)
        for section in ("container", "initContainer"):
            for i, m in enumerate((v.get("volumeMounts") or {}).get(section) or []):
                schema_errors(f"volumeMounts.{section}[{i}]", m, mv, version)
        schema_errors(f"the {name} container as the chart renders it", app, cv, version)
        if v.get("strategy"):
            schema_errors("strategy", v["strategy"], k8s_schema_validator(version, "deploymentstrategy-apps-v1.json"), version)
    flush_schema_errors()

    # Wiring: the same rules as the rendered kustomizations, on what the chart will render.
    pod = v.get("podSecurityContext") or {}
    vols = {vol.get("name"): vol for vol in volumes}
    vols["data"] = {"chart": True}
    installers = {}
    for i, c in enumerate(inits):
        where = f"extraInitContainers[{c.get('name', i)}]"
        hardening_rules(where, c, pod)
        termination_rules(where, c)
        argv = (c.get("command") or []) + (c.get("args") or [])
        if "migrations-gate" in c.get("image", "") and argv[:1] == ["install"] and len(argv) == 2:
            for m in c.get("volumeMounts") or []:
                if m.get("mountPath") == argv[1]:
                    installers[m.get("name")] = i
        for m in c.get("volumeMounts") or []:
            if m.get("name") not in vols:
                err(f"{where}: mounts volume {m.get('name')}, which `volumes` lacks")
    where = f"the {name} container"
    cmd, args = list(v.get("command") or []), list(v.get("args") or [])
    if not is_gate_cmd(cmd):
        err(f"{where}: command should start with the gate (/gate/migrations-gate), is {cmd[:1]}")
        return
    check_gate_argv(where, cmd, args)
    envm = {e.get("name"): e for e in env}
    vals = {e.get("name"): (str(e["value"]) if "value" in e else None) for e in env}
    names = [e.get("name") for e in env]
    for n in sorted({n for n in names if names.count(n) > 1}):
        err(f"extraEnvVars: {n} is set twice")
    ws = v.get("websocket") or {}
    chart_env = set(CHART_WEBSOCKET_ENV) if ws.get("enabled") else set()
    if v.get("databaseUrl"):
        chart_env.add("DATABASE_URL")
    for n in sorted(chart_env & set(envm)):
        err(f"extraEnvVars: {n} is already set by the chart (websocket.*, databaseUrl); a second entry is a duplicate key")
    release_rules(where, {**{n: {} for n in chart_env}, **envm})
    mounts = [m for m in app["volumeMounts"] if m.get("mountPath") == "/gate"]
    if cmd[0].startswith("/gate/"):
        if not mounts:
            err(f"{where}: runs {cmd[0]} but volumeMounts.container mounts nothing at /gate")
        else:
            vol = mounts[0].get("name")
            if not mounts[0].get("readOnly"):
                err(f"{where}: /gate should be mounted readOnly")
            if "emptyDir" not in vols.get(vol, {}):
                err(f"{where}: volume {vol} should be an emptyDir in `volumes`")
            if vol not in installers:
                err(f"{where}: no extraInitContainer runs `install /gate` into {vol}")
    # Open WebUI with several replicas
    if "--migrate" not in cmd or "--ready-http" not in cmd:
        err(f"{where}: the Open WebUI recipe needs --migrate and --ready-http")
    if args != ["bash", "start.sh"]:
        err(f"{where}: args should be the image's own command, bash start.sh")
    if not isinstance(v.get("replicaCount"), int) or v["replicaCount"] < 2:
        err("replicaCount: expected several replicas")
    if (v.get("workload") or {}).get("kind") != "Deployment":
        err("workload.kind: must be Deployment (a StatefulSet cannot use strategy Recreate)")
    if (v.get("strategy") or {}).get("type") != "Recreate":
        err("strategy.type: must be Recreate (Open WebUI: no two versions on one schema)")
    for n in ("DATABASE_URL", "WEBUI_SECRET_KEY"):
        if "secretKeyRef" not in (envm.get(n, {}).get("valueFrom") or {}):
            err(f"extraEnvVars: {n} should come from a Secret (valueFrom.secretKeyRef)")
    if envm.get("VECTOR_DB", {}).get("value") not in ("pgvector", "qdrant"):
        err("extraEnvVars: VECTOR_DB must be pgvector or qdrant (a vector DB shared by the replicas)")
    if not ws.get("enabled") or ws.get("manager") != "redis":
        err("websocket: enabled: true and manager: redis are needed for several replicas")
    if "MIGRATIONS_GATE_RELEASE" not in envm:
        err("extraEnvVars: MIGRATIONS_GATE_RELEASE missing")
    if preset_of(cmd, vals) != "open-webui":
        err(f"{where}: the Open WebUI recipe needs --preset open-webui (or MIGRATIONS_GATE_PRESET=open-webui)")

    # The pinned version, and the release derived from it: the chart's own tag helper renders
    # image.tag, so MIGRATIONS_GATE_RELEASE is that helper (or the same literal).
    rel = vals.get("MIGRATIONS_GATE_RELEASE")
    if rel is not None and re.fullmatch(r"\{\{-?\s*include \"open-webui\.tag\" \.\s*-?\}\}", rel.strip()):
        rel = tag
    if (v.get("image") or {}).get("useSlim"):
        err("image.useSlim: the chart then renders TAG-slim, which is not the release")
    open_webui_version_rules(where, app["image"], rel)

    # Start budget, update strategy, and the helm commands the docs give for this file.
    need = needed_start(where, cmd, vals, "open-webui")
    killed = "the kubelet restarts the container, and the kill would land on a running migration"
    if v.get("startupProbe"):
        budget_rule("startupProbe", "initialDelaySeconds + failureThreshold × periodSeconds",
                    k8s_probe_budget(v["startupProbe"]), need, killed)
    elif v.get("livenessProbe"):
        budget_rule("livenessProbe", "with no startupProbe, it", k8s_probe_budget(v["livenessProbe"]), need, killed)
    stype = (v.get("strategy") or {}).get("type") or "RollingUpdate"
    strategy_rule("strategy", stype == "RollingUpdate", f"strategy {stype}", other_releases_policy(cmd, vals),
                  allows_older_release(cmd, vals), [path], K8S_FIX)
    for doc in [path] + [os.path.join(ROOT, d) for d in HELM_DOCS]:
        if os.path.isfile(doc):
            with open(doc) as f:
                helm_command_rules(os.path.relpath(doc, ROOT), f.read(), os.path.relpath(path, ROOT), need)


# Where the helm commands for a values file are written down (besides the file's own comments).
HELM_DOCS = ("README.md", "docs/guide.md")


def helm_commands(text):
    """(line number, argv) of each `helm install|upgrade` command in TEXT: in a shell block, or in
    a YAML comment; backslash continuations joined."""
    import shlex
    lines = text.splitlines()
    out, i = [], 0
    while i < len(lines):
        line = re.sub(r"^\s*(#\s*)?(\$\s+)?", "", lines[i])
        start = i
        if re.match(r"helm\s+(install|upgrade)\b", line):
            cmd = line
            while cmd.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                cmd = cmd.rstrip()[:-1] + " " + re.sub(r"^\s*(#\s*)?", "", lines[i])
            try:
                out.append((start + 1, shlex.split(cmd, comments=True)))
            except ValueError:
                out.append((start + 1, cmd.split()))
        i += 1
    return out


def helm_command_rules(doc, text, values_file, need):
    """Every helm install/upgrade of VALUES_FILE written in DOC: --wait with a --timeout that covers
    the gate's bounds, and never --atomic (or Helm 4's --rollback-on-failure): its rollback kills a
    migration that is still running and starts the old release on a schema that may have moved on."""
    for lineno, argv in helm_commands(text):
        if values_file not in argv and os.path.basename(values_file) not in " ".join(argv):
            continue
        where = f"{doc}:{lineno}: `helm {argv[1]}`"
        if "--atomic" in argv or "--rollback-on-failure" in argv:
            err(f"{where}: never --atomic (--rollback-on-failure): its rollback kills a running migration")
        t = gate_setting(argv, {}, "--timeout", "")
        if t is None:
            err(f"{where}: no --timeout (Helm waits 5 min by default): give it at least the gate's bounds"
                + (f" ({minutes(need[0])})" if need else ""))
        elif "--wait" not in argv and not any(a.startswith("--wait=") for a in argv):
            err(f"{where}: --timeout without --wait bounds only hooks; add --wait")
        elif need is not None:
            budget_rule(where, f"--timeout {t}", seconds(t), need,
                        "Helm calls the release failed while the migration still runs")


def dockerfile(path):
    import dockerfile as df

    cmds = df.parse_file(path)
    known = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
             "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL", "MAINTAINER"}
    for c in cmds:
        if c.cmd not in known:
            err(f"{path}:{c.start_line}: unknown instruction {c.cmd}")
    froms = [i for i, c in enumerate(cmds) if c.cmd == "FROM"]
    if not froms:
        err(f"{path}: no FROM")
        return
    final = cmds[froms[-1]:]
    if final[0].value[0] != "scratch":
        err(f"{path}: final stage must be FROM scratch, is {final[0].value[0]}")
    dests = []
    for c in final:
        if c.cmd == "COPY":
            dests.append(c.value[-1])
    for want in ("/migrations-gate", "/etc/ssl/certs/ca-certificates.crt"):
        if want not in dests:
            err(f"{path}: final stage does not COPY to {want}")
    users = [c.value[0] for c in final if c.cmd == "USER"]
    if users[-1:] != ["65532:65532"]:
        err(f"{path}: final USER must be 65532:65532, is {users[-1:] or None}")
    eps = [c for c in final if c.cmd == "ENTRYPOINT"]
    if not eps or not eps[-1].json or list(eps[-1].value) != ["/migrations-gate"]:
        err(f'{path}: ENTRYPOINT must be ["/migrations-gate"] (exec form)')
    if any(c.cmd in ("CMD", "RUN", "SHELL") for c in final):
        err(f"{path}: the scratch stage cannot RUN, and must not set CMD/SHELL")
    if len(froms) > 1:
        text = " ".join(c.original for c in cmds)
        for want in ("cargo build", "--release", "--locked", "--target x86_64-unknown-linux-gnu",
                     "--bin migrations-gate", "+crt-static"):
            if want not in text:
                err(f"{path}: the build stage should run cargo build with {want}")


def selftest(path):
    """A negative fixture (ci/fixtures/): the checks must report each problem its `# expect:`
    lines name. k8s-*.yaml is read as a kustomization's rendered output, compose-*.yaml and
    *.stack.yaml as `compose config` output, helm-*.md as docs holding helm commands for the Open
    WebUI values file (its `# need: DURATION` line stands for the gate's bounds)."""
    with open(path) as f:
        text = f.read()
    expected = re.findall(r"^#\s*expect:\s*(.+?)\s*$", text, re.M)
    if not expected:
        return [f"{path}: no '# expect: ...' line, so it proves nothing"]
    fn = os.path.basename(path)
    if fn.startswith("k8s-"):
        k8s(path, path)
    elif fn.startswith("compose-") or is_stack_file(fn):
        compose(path, path)
    elif fn.startswith("helm-"):
        need = re.search(r"^#\s*need:\s*(\S+)", text, re.M)
        total = seconds(need.group(1)) if need else None
        helm_command_rules(fn, text, "k8s/open-webui/helm-values.yaml",
                           (total, f"the fixture's {need.group(1)}") if total else None)
    else:
        return [f"{path}: name it k8s-*.yaml, compose-*.yaml, *.stack.yaml or helm-*.md"]
    got = list(errors)
    errors.clear()
    missing = [e for e in expected if not any(e in g for g in got)]
    if missing:
        return [f"{path}: the checks did not report: {e}" for e in missing] + [f"  reported: {g}" for g in got]
    for e in expected:
        print(f"caught as expected: {next(g for g in got if e in g)}")
    return []


def main():
    what, path = sys.argv[1], sys.argv[2]
    if what == "selftest":
        problems = selftest(path)
        for p in problems:
            print(p)
        sys.exit(1 if problems else 0)
    if what == "compose":
        compose(path, sys.argv[3])
    elif what == "k8s":
        k8s(path, sys.argv[3])
    elif what == "kustomization":
        kustomize_files(path)
    elif what == "dockerfile":
        dockerfile(path)
    elif what == "helm-values":
        helm_values(path, sys.argv[3], sys.argv[4:])
    else:
        raise SystemExit(f"unknown check {what}")
    for e in errors:
        print(e)
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
