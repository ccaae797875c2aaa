"""Gate-specific rules for migrations-gate's deployment files, run by ci/validate-manifests.

    validate_manifests.py compose FILE RENDERED.json     a Compose/stack file (`compose config` JSON)
    validate_manifests.py k8s DIR RENDERED.yaml          a kustomization's rendered output
    validate_manifests.py kustomization FILE             its resources list against the directory
    validate_manifests.py dockerfile FILE                the gate image's contract
    validate_manifests.py helm-values FILE KEYS VERSION...
                                                         Helm values for a chart: every key exists
                                                         in KEYS (the chart's values.yaml key
                                                         structure), added objects validate against
                                                         the Kubernetes JSON schemas of VERSIONs

Prints one line per problem and exits 1 if there is any. Runs in the validate-manifests venv
(PyYAML, and kubernetes-validate's schemas and jsonschema for helm-values).
"""
import json
import os
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
    if mode not in ("run", "migrate"):
        err(f"{where}: gate mode {mode!r}, expected run or migrate")
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


# --------------------------------------------------------------------------------- compose
def compose(path, rendered):
    with open(rendered) as f:
        project = json.load(f)
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
        if "open-webui" in image:
            check_open_webui(where, ep, svc, "working_dir", env)
        replicas = (svc.get("deploy") or {}).get("replicas")
        if not replicas or int(replicas) < 2:
            err(f"{where}: expected several replicas (deploy.replicas)")
    if not gated:
        err(f"{path}: no service uses the gate as its entrypoint")


def check_open_webui(where, argv, spec, workdir_key, env):
    """The Open WebUI recipe, in a compose service or a Kubernetes container alike:
    `workdir_key` is how each spells the working directory."""
    if "--ready-http" not in argv or "--migrate" not in argv:
        err(f"{where}: the Open WebUI recipe needs --migrate and --ready-http")
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
        for section, idx, c in all_cs:
            where = f"{where_pod} {section}[{c['name']}]"
            hardening_rules(where, c, pod)
            termination_rules(where, c)
            cmd = c.get("command") or []
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
            if gate_mode(cmd) == "migrate":
                if section != "initContainers":
                    err(f"{where}: `migrate` belongs in an init container")
                has_migrate_init = True
            if section == "containers":
                gated_app.add(c["name"])
            if "open-webui" in c.get("image", ""):
                check_open_webui(where, argv, c, "workingDir", env)
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


def main():
    what, path = sys.argv[1], sys.argv[2]
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
