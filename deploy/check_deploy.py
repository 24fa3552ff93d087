"""Deployment checks run by deploy/check.sh (needs helm-sdkpy, jsonschema, PyYAML).

1. The chart: values files against values.schema.json (draft-07); `helm lint` through helm-sdkpy with the default
   values, with values-all-on.yaml and with its alternative choices (ALT_CHOICES) (any warning or error fails); a real Helm install of both against a throwaway
   in-process stand-in for the Kubernetes API (helm-sdkpy has no client-only `template`), whose manifest is then
   checked: worker.yaml and coordinator.yaml against the JSON Schemas `mip config schema worker|coordinator`
   generates from the services' config structs (unknown fields, types, enum values), values.schema.json's
   worker.config and coordinator.config against the same schemas (field names, leaf types), every `--flag` of the
   containers (and of compose) against those `mip serve SUB --help` lists (a failing --help: no such subcommand),
   config file paths against volumeMounts, ports against listen addresses, workers_dns against the headless Service,
   worker TLS against the coordinator's worker_tls, the ServiceMonitor against the metrics Services.
2. The Grafana dashboard (dashboards/mip-cluster.json): its ConfigMap renders exactly when grafana.dashboard.enabled,
   with the configured labels, annotations and namespace and the file as its data; the JSON parses; every panel has
   a unique id and a title; every metric, label and template variable its PromQL names exists. The metrics and
   their labels come from dashboards/metrics.txt (a Rust test keeps it equal to the services' registries), not from
   the Rust sources.
3. The images: COPY sources exist, every workspace member is copied, `-p mip-cli` and its `mip` binary match services/cli/Cargo.toml, compose commands.
No Rust source (.rs) is read: the config schemas and flags come from the `mip` binary named by MIP_BIN (deploy/check.sh
builds it with cargo unless MIP_BIN is set; without it that is a problem). Set MIP_DEPLOY_DUMP=DIR to keep the
rendered manifests. Prints nothing and exits 0 when everything holds; otherwise prints each problem and exits 1.
"""

import asyncio
import copy
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import tomllib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import helm_sdkpy as helm
import jsonschema
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy/helm/mip-cluster"
VALUE_FILES = {"defaults": None, "all-on": ROOT / "deploy/values-all-on.yaml"}
# `mip` subcommand paths the chart and compose may run (each is checked to exist: `mip SUB... --help` succeeds).
ALLOWED_COMMANDS = {("serve", "worker"), ("serve", "coordinator")}
# A third case: values-all-on.yaml with the other choices (KEDA, bundled Redis with persistence, a model PVC,
# one-way TLS both to the workers and on the public API, no tokens, the dashboard in the release namespace with
# the sidecar's default label only).
ALT_CHOICES = {
    "worker": {"autoscaling": {"kind": "keda"},
               "modelVolume": {"type": "pvc", "claimName": "mip-models", "hostPath": ""}},
    "redis": {"bundled": {"enabled": True, "persistence": {"enabled": True, "storageClassName": "fast"}},
              "externalUrl": ""},
    "tls": {"mutualTls": False, "workerDomain": ""},
    "coordinator": {"tls": {"clientCa": False}, "auth": {"existingSecret": ""}, "config": {"telemetry": None}},
    "grafana": {"dashboard": {"namespace": "", "labels": {"release": None}}},
}
LINT_SEVERITY = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}
RELEASE_NAMESPACE = "mip"
DASHBOARD = CHART / "dashboards/mip-cluster.json"
DASHBOARD_KEY = "mip-cluster.json"  # the ConfigMap's data key
METRICS_LIST = CHART / "dashboards/metrics.txt"

problems: list[str] = []


def problem(msg: str) -> None:
    problems.append(msg)


def merge(base, over):
    """Helm's value coalescing: maps merge key by key, null deletes, anything else replaces."""
    if not isinstance(base, dict) or not isinstance(over, dict):
        return copy.deepcopy(over)
    out = copy.deepcopy(base)
    for k, v in over.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge(out.get(k), v)
    return out


def load_values() -> dict[str, dict]:
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    out = {}
    for name, path in VALUE_FILES.items():
        out[name] = defaults if path is None else merge(defaults, yaml.safe_load(path.read_text()) or {})
    out["all-on-alt"] = merge(out["all-on"], ALT_CHOICES)
    return out


def check_schema(values: dict[str, dict]) -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema)
    for name, vals in values.items():
        for err in sorted(validator.iter_errors(vals), key=lambda e: list(e.path)):
            path = ".".join(str(p) for p in err.path) or "(root)"
            problem(f"values.schema.json [{name}]: {path}: {err.message}")


def lint(values: dict[str, dict], work: Path) -> None:
    """helm-sdkpy's Lint takes no values, so each case lints a copy of the chart whose values.yaml is the merge."""
    config = helm.Configuration()
    for name, vals in values.items():
        chart = work / f"lint-{name}" / CHART.name
        shutil.copytree(CHART, chart)
        (chart / "values.yaml").write_text(yaml.safe_dump(vals, sort_keys=False))
        try:
            result = asyncio.run(helm.Lint(config).run(str(chart)))
        except helm.HelmError as e:
            problem(f"helm lint [{name}]: {e}")
            continue
        for m in result.get("Messages") or []:
            if m.get("Severity", 0) >= 2:
                sev = LINT_SEVERITY.get(m["Severity"], m["Severity"])
                # helm-sdkpy serialises Go errors as {}: the path and severity are all it gives; the render step
                # below reports the same template and values errors with Helm's own text.
                detail = m.get("Err") or "(no text from helm-sdkpy)"
                problem(f"helm lint [{name}]: {sev} in {m.get('Path')}: {detail}")
        if result.get("Errors") and not problems:
            problem(f"helm lint [{name}]: {len(result['Errors'])} error(s)")


# --- a stand-in Kubernetes API: discovery for the kinds the chart uses; creates are echoed, reads are 404 ---------

API_RESOURCES = {
    "v1": [("configmaps", "ConfigMap"), ("services", "Service"), ("serviceaccounts", "ServiceAccount"),
           ("pods", "Pod"), ("secrets", "Secret"), ("namespaces", "Namespace")],
    "apps/v1": [("deployments", "Deployment"), ("statefulsets", "StatefulSet")],
    "policy/v1": [("poddisruptionbudgets", "PodDisruptionBudget")],
    "autoscaling/v2": [("horizontalpodautoscalers", "HorizontalPodAutoscaler")],
    "monitoring.coreos.com/v1": [("servicemonitors", "ServiceMonitor")],
    "keda.sh/v1alpha1": [("scaledobjects", "ScaledObject")],
}


class FakeApi(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def reply(self, code: int, obj: dict) -> None:
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        path = self.path.split("?")[0].rstrip("/")
        groups = [gv for gv in API_RESOURCES if "/" in gv]
        if path == "/version":
            return self.reply(200, {"major": "1", "minor": "31", "gitVersion": "v1.31.0"})
        if path == "/api":
            return self.reply(200, {"kind": "APIVersions", "versions": ["v1"]})
        if path == "/apis":
            return self.reply(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                {"name": gv.split("/")[0], "versions": [{"groupVersion": gv, "version": gv.split("/")[1]}],
                 "preferredVersion": {"groupVersion": gv, "version": gv.split("/")[1]}} for gv in groups]})
        for gv, resources in API_RESOURCES.items():
            if path == ("/api/v1" if gv == "v1" else f"/apis/{gv}"):
                return self.reply(200, {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv,
                                        "resources": [{"name": r, "singularName": "", "kind": k, "namespaced": True,
                                                       "verbs": ["create", "get", "list", "delete", "patch"]}
                                                      for r, k in resources]})
        self.reply(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
                         "code": 404})

    def do_POST(self):
        # Echo the object as created, in the encoding it came in (JSON or protobuf).
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(201)
        self.send_header("Content-Type", self.headers.get("Content-Type", "application/json"))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def render(values: dict[str, dict]) -> dict[str, list[dict]]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    kubeconfig = yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "ci",
        "clusters": [{"name": "ci", "cluster": {"server": f"http://127.0.0.1:{server.server_address[1]}"}}],
        "contexts": [{"name": "ci", "context": {"cluster": "ci", "user": "ci"}}],
        "users": [{"name": "ci", "user": {}}]})
    out = {}
    try:
        for name, vals in values.items():
            config = helm.Configuration(namespace=RELEASE_NAMESPACE, kubeconfig=kubeconfig)
            try:
                release = asyncio.run(helm.Install(config).run("ci", str(CHART), values=vals, wait=False))
            except helm.HelmError as e:
                problem(f"helm install (render) [{name}]: {e}")
                continue
            docs = [d for d in yaml.safe_load_all(release.get("manifest", "")) if d]
            if not docs:
                problem(f"helm install (render) [{name}]: empty manifest")
            out[name] = docs
    finally:
        server.shutdown()
    return out


# --- facts from the `mip` binary: its config schemas and its flags ---------------------------------------------

MIP_TIMEOUT = 60  # seconds one `mip` query may take
# A flag line of clap's help: `  -l, --listen <LISTEN>`, `      --config <CONFIG>`, `  -v, --verbose...`, `  -h`.
# Descriptions (wrapped, or on their own lines in the long help) are indented further and match with no groups.
HELP_FLAG = re.compile(r"^ {2,6}(-[A-Za-z0-9])?(?:, )?(--[A-Za-z0-9][\w-]*)?")
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


@functools.cache
def mip_bin() -> str | None:
    """The `mip` binary in MIP_BIN (deploy/check.sh builds it); None, with a problem, when there is none."""
    exe = os.environ.get("MIP_BIN")
    if not exe:
        problem("MIP_BIN is not set: run deploy/check.sh (it builds `mip`) or set MIP_BIN to a `mip` binary")
        return None
    found = shutil.which(exe)
    if found is None:
        problem(f"MIP_BIN={exe} is not an executable file")
    return found


def run_mip(*args: str) -> subprocess.CompletedProcess | None:
    """`mip ARGS...` run to completion (None, with a problem, when it cannot be run at all)."""
    exe = mip_bin()
    if exe is None:
        return None
    try:
        return subprocess.run([exe, *args], capture_output=True, text=True, timeout=MIP_TIMEOUT,
                              stdin=subprocess.DEVNULL, env={**os.environ, "NO_COLOR": "1"})
    except (OSError, subprocess.TimeoutExpired) as e:
        problem(f"`mip {' '.join(args)}`: {e}")
        return None


def failure(res: subprocess.CompletedProcess) -> str:
    lines = (res.stderr or res.stdout).strip().splitlines()
    return f"exit status {res.returncode}" + (f": {lines[-1].strip()}" if lines else "")


@functools.cache
def config_schema(service: str) -> dict:
    """The JSON Schema of the service's config file, generated from its serde structs by `mip config schema SERVICE`
    ({}, with a problem, when it cannot be had)."""
    cmd = f"mip config schema {service}"
    res = run_mip("config", "schema", service)
    if res is None:
        return {}
    if res.returncode != 0:
        problem(f"`{cmd}`: {failure(res)}")
        return {}
    try:
        schema = json.loads(res.stdout)
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except ValueError as e:
        problem(f"`{cmd}`: not JSON: {e}")
        return {}
    except jsonschema.SchemaError as e:
        problem(f"`{cmd}`: not a valid JSON Schema: {e.message}")
        return {}
    if not isinstance(schema, dict):
        problem(f"`{cmd}`: expected a JSON Schema object, got {schema!r}")
        return {}
    return schema


# The sections the chart renders (a new or renamed one needs the chart's attention).
EXPECTED_SECTIONS = {"server", "limits", "redis", "cache", "model", "executor", "telemetry"}
COORDINATOR_SECTIONS = {"server", "limits", "redis", "coordinator", "worker_tls", "auth", "telemetry"}


def check_config(cfg, schema: dict, where: str, service: str = "worker") -> None:
    """A rendered config file against the service's generated schema (its draft as declared by `$schema`): unknown
    fields (the structs deny them), wrong types, values outside an enum."""
    if not schema:
        return  # reported by config_schema
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [e for err in validator.iter_errors(cfg) for e in branch_errors(err)]
    for err in sorted(errors, key=lambda e: [str(p) for p in e.absolute_path]):
        problem(f"{where}: {err.json_path}: {err.message} (`mip config schema {service}`)")


def branch_errors(err: jsonschema.ValidationError) -> list[jsonschema.ValidationError]:
    """An anyOf / oneOf error (schemars wraps `Option<Section>` as anyOf [$ref, null]) as the errors of the branch
    the value was meant for: the one that fails deeper than on the value's own type; else the error itself."""
    branches: dict = {}
    for e in err.context or []:
        branches.setdefault(e.relative_schema_path[0], []).append(e)
    meant = [errs for errs in branches.values()
             if any(e.relative_path or e.validator not in ("type", "const", "enum") for e in errs)]
    if len(meant) != 1:
        if branches and all(e.validator == "const" for errs in branches.values() for e in errs):
            err.message = f"{err.instance!r} is not one of {[e.validator_value for e in err.context]}"
        return [err]
    return [sub for e in meant[0] for sub in branch_errors(e)]


def pointer(root: dict, ref: str):
    """The schema a local `$ref` (`#/$defs/Name`, a JSON pointer into ROOT) names; None when it names none."""
    if not ref.startswith("#"):
        return None
    node = root
    for part in filter(None, ref[1:].split("/")):
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return None
    return node


def subschemas(node, root: dict, where: str, seen: tuple[str, ...] = ()) -> list[dict]:
    """NODE and every schema it defers to: its `$ref` (into `$defs` / `definitions`) and its allOf / anyOf / oneOf
    branches (schemars wraps a `$ref` in them, e.g. an `Option<Struct>` as anyOf [$ref, null]), recursively."""
    if not isinstance(node, dict):
        return []  # a boolean schema
    out = [node]
    ref = node.get("$ref")
    if isinstance(ref, str) and ref not in seen:
        target = pointer(root, ref)
        if target is None:
            problem(f"{where}: $ref {ref} does not resolve")
        else:
            out += subschemas(target, root, where, seen + (ref,))
    for key in ("allOf", "anyOf", "oneOf"):
        for sub in node.get(key) or []:
            out += subschemas(sub, root, where, seen)
    return out


JSON_TYPES = ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"), (list, "array"),
              (dict, "object"), (type(None), "null"))


def schema_types(subs: list[dict]) -> set[str]:
    """The JSON types the schemas declare: their `type`s, else those of their `enum` / `const` values."""
    types: set[str] = set()
    for s in subs:
        t = s.get("type")
        if isinstance(t, str):
            types.add(t)
        elif isinstance(t, list):
            types.update(t)
        else:
            for v in [*(s.get("enum") or []), *([s["const"]] if "const" in s else [])]:
                types.add(next(name for cls, name in JSON_TYPES if isinstance(v, cls)))
    return types


def schema_fields(subs: list[dict]) -> tuple[dict[str, list], list, bool]:
    """({field: [its schemas]}, [the schemas of other keys (a map's values)], whether other keys are refused)."""
    fields: dict[str, list] = {}
    for s in subs:
        for k, v in (s.get("properties") or {}).items():
            fields.setdefault(k, []).append(v)
    extra = [s["additionalProperties"] for s in subs if isinstance(s.get("additionalProperties"), dict)]
    closed = any(s.get("additionalProperties") is False for s in subs)
    return fields, extra, closed


def config_sections(schema: dict) -> set[str]:
    """The top-level sections of a generated config schema."""
    return set(schema_fields(subschemas(schema, schema, "config schema"))[0]) if schema else set()


def check_values_schema_config() -> None:
    """values.schema.json's worker.config and coordinator.config name only fields of the services' configs (as
    `mip config schema` generates them) and, where both give a type, one the service accepts."""
    schema = json.loads((CHART / "values.schema.json").read_text())

    def walk(vnodes: list, gnodes: list, groot: dict, where: str, service: str) -> None:
        vsubs = [s for n in vnodes for s in subschemas(n, schema, f"values.schema.json {where}")]
        gsubs = [s for n in gnodes for s in subschemas(n, groot, f"`mip config schema {service}`")]
        # A null in the values deletes the key (Helm coalescing): it never reaches the config file.
        vtypes, gtypes = schema_types(vsubs) - {"null"}, schema_types(gsubs)
        if vtypes and gtypes and any(t not in gtypes and not (t == "integer" and "number" in gtypes)
                                     for t in vtypes):
            problem(f"values.schema.json {where}: type {'/'.join(sorted(vtypes))}, but the {service} config's is "
                    f"{'/'.join(sorted(gtypes))}")
        vfields = schema_fields(vsubs)[0]
        gfields, gextra, gclosed = schema_fields(gsubs)
        for k, sub in vfields.items():
            if k in gfields:
                walk(sub, gfields[k], groot, f"{where}.{k}", service)
            elif gextra:
                walk(sub, gextra, groot, f"{where}.{k}", service)
            elif gclosed or gfields:
                problem(f"values.schema.json {where}.{k}: not a field of the {service} config")
        vitems = [s["items"] for s in vsubs if isinstance(s.get("items"), dict)]
        gitems = [s["items"] for s in gsubs if isinstance(s.get("items"), dict)]
        if vitems and gitems:
            walk(vitems, gitems, groot, f"{where}[]", service)

    for service in ("worker", "coordinator"):
        node = ((schema["properties"].get(service) or {}).get("properties") or {}).get("config")
        generated = config_schema(service)
        if node is not None and generated:
            walk([node], [generated], generated, f"{service}.config", service)


@functools.cache
def cli_flags() -> dict[tuple[str, ...], set[str]]:
    """The flags of each allowed `mip serve SUB`, read from its clap help (`mip serve SUB --help`, which lists the
    global flags too); a subcommand whose --help fails does not exist."""
    out = {}
    for cmd in sorted(ALLOWED_COMMANDS):
        res = run_mip(*cmd, "--help")
        if res is None:
            continue
        if res.returncode != 0:
            problem(f"`mip {' '.join(cmd)} --help`: {failure(res)} (no `mip {' '.join(cmd)}` subcommand?)")
            continue
        flags = set()
        for line in ANSI_ESCAPE.sub("", res.stdout).splitlines():
            m = HELP_FLAG.match(line)
            if m:
                flags.update(f for f in m.groups() if f)
        if "--help" not in flags:
            problem(f"`mip {' '.join(cmd)} --help`: found no --help among its flags (not clap's help layout?)")
        out[cmd] = flags
    return out


def check_flags(args: list, flags: dict[tuple[str, str], set[str]], where: str) -> None:
    known = flags.get(tuple(map(str, args[:2])))
    if known is None:
        return
    for a in map(str, args[2:]):
        if a.startswith("-") and a.split("=", 1)[0] not in known:
            problem(f"{where}: `mip {args[0]} {args[1]}` has no flag {a.split('=', 1)[0]} (has {sorted(known)})")


# --- the rendered manifests -------------------------------------------------------------------------------------

def containers(docs: list[dict], name: str) -> list[tuple[dict, dict]]:
    """(pod spec, container) of every Deployment/StatefulSet container called `name`."""
    return [(d["spec"]["template"]["spec"], c) for d in docs if d["kind"] in ("Deployment", "StatefulSet")
            for c in d["spec"]["template"]["spec"]["containers"] if c["name"] == name]


def check_paths_mounted(paths: dict[str, str], container: dict, where: str) -> None:
    """Every non-empty file path of the config lies under one of the container's volumeMounts."""
    mounts = [m["mountPath"].rstrip("/") for m in container.get("volumeMounts", [])]
    for field, path in paths.items():
        if path and not any(path == m or path.startswith(m + "/") for m in mounts):
            problem(f"{where}: {field} {path} is not under any volumeMount ({mounts})")


def port_of(listen: str) -> int | None:
    return int(listen.rsplit(":", 1)[1]) if listen and ":" in listen else None


def check_coordinator(docs: list[dict], schema: dict, name: str) -> None:
    cms = [d for d in docs if d["kind"] == "ConfigMap" and "coordinator.yaml" in d.get("data", {})]
    if len(cms) != 1:
        problem(f"[{name}]: expected one coordinator ConfigMap with coordinator.yaml, found {len(cms)}")
        return
    cfg = yaml.safe_load(cms[0]["data"]["coordinator.yaml"]) or {}
    check_config(cfg, schema, f"[{name}] coordinator.yaml", "coordinator")
    if not isinstance(cfg, dict):
        return
    where = f"[{name}] coordinator"
    sched = cfg.get("coordinator", {})
    dns = sched.get("workers_dns", "")
    if not dns and not sched.get("workers"):
        problem(f"{where}: coordinator.yaml names no workers (coordinator.workers / workers_dns)")
    if dns:
        host, _, port = dns.rpartition(":")
        svc = next((d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == host), None)
        if svc is None or svc["spec"].get("clusterIP") != "None":
            problem(f"{where}: workers_dns {dns}: {host} is not a headless Service of the chart")
        elif int(port) not in [p["port"] for p in svc["spec"]["ports"]]:
            problem(f"{where}: workers_dns {dns}: Service {host} has no port {port}")
    worker_cm = next((d for d in docs if d["kind"] == "ConfigMap" and "worker.yaml" in d.get("data", {})), None)
    wserver = (yaml.safe_load(worker_cm["data"]["worker.yaml"]) or {}).get("server", {}) if worker_cm else {}
    wtls, ctls = wserver.get("tls") or {}, cfg.get("worker_tls") or {}
    if bool(wtls.get("cert")) != bool(ctls.get("ca")):
        problem(f"{where}: workers serve TLS {bool(wtls.get('cert'))} but worker_tls.ca is {ctls.get('ca')!r}")
    if wtls.get("client_ca") and not (ctls.get("cert") and ctls.get("key")):
        problem(f"{where}: workers require client certificates but worker_tls has no cert/key")
    drain = cfg.get("server", {}).get("drain_seconds", 30)
    for spec, c in containers(docs, "coordinator"):
        if spec.get("terminationGracePeriodSeconds", 30) <= drain:
            problem(f"{where}: terminationGracePeriodSeconds <= server.drain_seconds {drain}")
        args = [str(a) for a in c.get("args") or []]
        if "--config" not in args or args[args.index("--config") + 1:][:1] != ["/etc/mip/coordinator.yaml"]:
            problem(f"{where}: args {args} do not pass --config /etc/mip/coordinator.yaml")
        paths = {"--config": "/etc/mip/coordinator.yaml", "auth.tokens_file": cfg.get("auth", {}).get("tokens_file")}
        for section, keys in (("server.tls", cfg.get("server", {}).get("tls") or {}), ("worker_tls", ctls)):
            paths.update({f"{section}.{k}": v for k, v in keys.items() if k != "domain"})
        check_paths_mounted(paths, c, where)
        metrics = port_of(cfg.get("telemetry", {}).get("metrics_listen", ""))
        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        if ports.get("metrics") != metrics:
            problem(f"{where}: metrics containerPort {ports.get('metrics')} != telemetry.metrics_listen port {metrics}")
        if ports.get("grpc") != port_of(cfg.get("server", {}).get("listen", "")):
            problem(f"{where}: grpc containerPort {ports.get('grpc')} != server.listen {cfg.get('server')}")


def check_manifests(rendered: dict[str, list[dict]], values: dict[str, dict]) -> None:
    schema = config_schema("worker")
    if schema and config_sections(schema) != EXPECTED_SECTIONS:
        problem(f"worker config sections changed: {sorted(config_sections(schema))} "
                f"(chart expects {sorted(EXPECTED_SECTIONS)})")
    cschema = config_schema("coordinator")
    if cschema and config_sections(cschema) != COORDINATOR_SECTIONS:
        problem(f"coordinator config sections changed: {sorted(config_sections(cschema))} "
                f"(chart expects {sorted(COORDINATOR_SECTIONS)})")
    check_values_schema_config()
    flags = cli_flags()  # also reports a subcommand of ALLOWED_COMMANDS that does not exist
    for name, docs in rendered.items():
        kinds = {(d["kind"], d["metadata"]["name"]): d for d in docs}
        cms = [d for d in docs if d["kind"] == "ConfigMap" and "worker.yaml" in d.get("data", {})]
        if len(cms) != 1:
            problem(f"[{name}]: expected one worker ConfigMap with worker.yaml, found {len(cms)}")
        for cm in cms:
            cfg = yaml.safe_load(cm["data"]["worker.yaml"])
            check_config(cfg, schema, f"[{name}] worker.yaml")
            drain = cfg.get("server", {}).get("drain_seconds", 30)
            for d in docs:
                if d["kind"] == "StatefulSet" and d["metadata"]["name"].endswith("-worker"):
                    spec = d["spec"]["template"]["spec"]
                    if spec.get("terminationGracePeriodSeconds", 30) <= drain:
                        problem(f"[{name}]: terminationGracePeriodSeconds <= server.drain_seconds {drain}")
                    mounts = {m["mountPath"] for c in spec["containers"] for m in c.get("volumeMounts", [])}
                    if any(v.get("name") == "model" for v in spec.get("volumes", [])) and \
                            cfg["model"]["path"] not in mounts:
                        problem(f"[{name}]: model volume not mounted at model.path {cfg['model']['path']}")
            for _, c in containers(docs, "worker"):
                tls = cfg.get("server", {}).get("tls") or {}
                check_paths_mounted({f"server.tls.{k}": v for k, v in tls.items()}, c, f"[{name}] worker")
        check_coordinator(docs, cschema, name)
        for d in docs:
            if d["kind"] not in ("Deployment", "StatefulSet"):
                continue
            for c in d["spec"]["template"]["spec"]["containers"]:
                args = c.get("args") or []
                if c["name"] in ("worker", "coordinator") and tuple(args[:2]) not in ALLOWED_COMMANDS:
                    problem(f"[{name}] {d['kind']}/{d['metadata']['name']}: `mip {' '.join(args[:2])}` "
                            f"is not one of {sorted(ALLOWED_COMMANDS)}")
                if c["name"] in ("worker", "coordinator"):
                    check_flags(args, flags, f"[{name}] {d['kind']}/{d['metadata']['name']}")
        check_service_monitor(docs, name)
        if not any(d["kind"] == "Pod" for d in docs) and not kinds:
            problem(f"[{name}]: nothing rendered")


def check_service_monitor(docs: list[dict], name: str) -> None:
    """The ServiceMonitor selects a Service with a `metrics` port for both the workers and the coordinators."""
    for sm in (d for d in docs if d["kind"] == "ServiceMonitor"):
        sel = sm["spec"]["selector"]
        ports = {e["port"] for e in sm["spec"]["endpoints"]}

        def matches(labels: dict) -> bool:
            if any(labels.get(k) != v for k, v in sel.get("matchLabels", {}).items()):
                return False
            return all(labels.get(e["key"]) in e["values"] for e in sel.get("matchExpressions", [])
                       if e["operator"] == "In")

        scraped = {s["metadata"]["labels"].get("app.kubernetes.io/component") for s in docs
                   if s["kind"] == "Service" and matches(s["metadata"].get("labels", {}))
                   and ports & {p.get("name") for p in s["spec"]["ports"]}}
        for component in ("worker", "coordinator"):
            if component not in scraped:
                problem(f"[{name}] ServiceMonitor/{sm['metadata']['name']}: scrapes no {component} metrics Service")


def check_test_hook(values: dict) -> None:
    hook = CHART / "templates/tests"
    if not any(hook.glob("*.yaml")):
        problem("chart has no `helm test` pod under templates/tests")


# --- the Grafana dashboard -------------------------------------------------------------------------------------

# Labels Prometheus puts on every series it scrapes through the ServiceMonitor (target labels), and the series a
# histogram family exposes.
TARGET_LABELS = {"namespace", "job", "instance", "pod", "service", "container", "endpoint"}
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                "offset", "inf", "nan"}
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__interval_ms", "__range", "__range_s", "__range_ms"}


def exported_series() -> dict[str, set[str]]:
    """{series name: its labels} from dashboards/metrics.txt (`NAME TYPE LABEL...` a line)."""
    series: dict[str, set[str]] = {}
    rel = METRICS_LIST.relative_to(ROOT)
    for n, line in enumerate(METRICS_LIST.read_text().splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) < 2 or words[1] not in ("counter", "gauge", "histogram") or \
                not all(re.fullmatch(r"[a-zA-Z_:][\w:]*", w) for w in [words[0], *words[2:]]):
            problem(f"{rel}:{n}: expected `NAME counter|gauge|histogram LABEL...`, got {line!r}")
            continue
        name, kind, labels = words[0], words[1], set(words[2:])
        if name in series:
            problem(f"{rel}:{n}: {name} listed twice")
        if kind == "histogram":
            series.update({name + s: labels | ({"le"} if s == "_bucket" else set()) for s in HISTOGRAM_SERIES})
        else:
            series[name] = labels
    if not series:
        problem(f"{rel}: lists no metrics")
    return series


def promql_names(expr: str) -> tuple[list[tuple[str, set[str]]], set[str]]:
    """The selectors of a PromQL expression ((metric, labels in its matchers), ...) and the labels of its
    by/without/on/ignoring/group_left/group_right lists."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges, subqueries
    grouped: set[str] = set()

    def group(m: re.Match) -> str:
        grouped.update(re.findall(r"[a-zA-Z_]\w*", m.group(2)))
        return " "  # `sum by (x) (...)` reads as the call `sum (...)`

    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", group, expr)
    selectors: list[tuple[str, set[str]]] = []

    def selector(m: re.Match) -> str:
        selectors.append((m.group(1) or "", set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", m.group(2)))))
        return " "

    expr = re.sub(r"([a-zA-Z_:][\w:]*)?\s*\{([^}]*)\}", selector, expr)
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][\w:]*)(\s*\()?", expr):
        if not m.group(2) and m.group(1).lower() not in PROMQL_WORDS:
            selectors.append((m.group(1), set()))
    return selectors, grouped


def check_promql(expr: str, legend: str, series: dict[str, set[str]], variables: set[str], where: str) -> None:
    for v in re.findall(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))", expr + " " + legend):
        name = v[0] or v[1]
        if name not in variables and name not in GRAFANA_BUILTINS:
            problem(f"{where}: ${name} is not a template variable of the dashboard")
    selectors, grouped = promql_names(re.sub(r"\$\{\w+(?::\w+)?\}|\$\w+", "x", expr))
    known = set(TARGET_LABELS)
    for metric, labels in selectors:
        if not metric:
            problem(f"{where}: a selector without a metric name in {expr!r}")
        elif metric not in series:
            problem(f"{where}: {metric} is not a series the services export ({METRICS_LIST.relative_to(ROOT)})")
        else:
            known |= series[metric]
            for label in sorted(labels - series[metric] - TARGET_LABELS):
                problem(f"{where}: {metric} has no label {label}")
    for label in sorted((grouped | set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))) - known):
        problem(f"{where}: label {label} is on none of the metrics of {expr!r}")


def dashboard_panels(panels: list) -> list[dict]:
    """Every panel, those inside (collapsed) rows included."""
    out = []
    for p in panels:
        out.append(p)
        out += dashboard_panels(p.get("panels") or [])
    return out


def check_dashboard_json() -> None:
    rel = DASHBOARD.relative_to(ROOT)
    try:
        dash = json.loads(DASHBOARD.read_text())
    except (OSError, ValueError) as e:
        problem(f"{rel}: {e}")
        return
    if not dash.get("uid") or not dash.get("title"):
        problem(f"{rel}: the dashboard needs a uid and a title")
    series = exported_series()
    templating = (dash.get("templating") or {}).get("list") or []
    variables = {v.get("name") for v in templating}
    if not any(v.get("type") == "datasource" and v.get("query") == "prometheus" for v in templating):
        problem(f"{rel}: no template variable of type datasource (prometheus)")
    ds_vars = {v["name"] for v in templating if v.get("type") == "datasource"}
    ds_refs = {f"${n}" for n in ds_vars} | {f"${{{n}}}" for n in ds_vars}
    for v in templating:
        if v.get("type") != "query":
            continue
        query = v.get("query")
        query = query.get("query", "") if isinstance(query, dict) else query or ""
        where = f"{rel} variable {v.get('name')}"
        m = re.fullmatch(r"\s*label_values\((?:(.*),)?\s*(\w+)\s*\)\s*", query)
        if m:
            check_promql(m.group(1) or "", "{{%s}}" % m.group(2), series, variables, where)
        else:
            check_promql(query, "", series, variables, where)
        if (v.get("datasource") or {}).get("uid") not in ds_refs:
            problem(f"{where}: datasource is not the datasource variable")
    ids: dict = {}
    for p in dashboard_panels(dash.get("panels") or []):
        title = p.get("title")
        where = f"{rel} panel {p.get('id')} {title!r}"
        if not isinstance(p.get("id"), int) or isinstance(p.get("id"), bool):
            problem(f"{where}: id must be an integer")
        elif p["id"] in ids:
            problem(f"{where}: id {p['id']} is also the id of panel {ids[p['id']]!r}")
        else:
            ids[p["id"]] = title
        if not isinstance(title, str) or not title.strip():
            problem(f"{where}: no title")
        if p.get("type") == "row":
            continue
        targets = p.get("targets") or []
        if not targets:
            problem(f"{where}: no queries")
        for t in [p, *targets]:
            if (t.get("datasource") or {}).get("uid") not in ds_refs:
                problem(f"{where}: datasource is not the datasource variable")
        if len({t.get("refId") for t in targets}) != len(targets):
            problem(f"{where}: refIds are not unique")
        for t in targets:
            if not (t.get("expr") or "").strip():
                problem(f"{where}: query {t.get('refId')} has no expr")
                continue
            check_promql(t["expr"], t.get("legendFormat") or "", series, variables, f"{where} {t.get('refId')}")


def check_dashboard(rendered: dict[str, list[dict]], values: dict[str, dict]) -> None:
    """The dashboard ConfigMap renders exactly when enabled, with the configured metadata and the file as data."""
    try:
        text = DASHBOARD.read_text().strip()
    except OSError:
        text = None  # reported by check_dashboard_json
    for name, docs in rendered.items():
        conf = (values[name].get("grafana") or {}).get("dashboard") or {}
        cms = [d for d in docs if d["kind"] == "ConfigMap" and DASHBOARD_KEY in (d.get("data") or {})]
        if not conf.get("enabled"):
            if cms:
                problem(f"[{name}]: grafana.dashboard.enabled is false but the dashboard ConfigMap rendered")
            continue
        if len(cms) != 1:
            problem(f"[{name}]: expected one ConfigMap with {DASHBOARD_KEY}, found {len(cms)}")
            continue
        meta, data = cms[0]["metadata"], cms[0]["data"][DASHBOARD_KEY]
        where = f"[{name}] ConfigMap/{meta['name']}"
        if data.strip() != text:
            problem(f"{where}: {DASHBOARD_KEY} is not {DASHBOARD.relative_to(ROOT)}")
        try:
            json.loads(data)
        except ValueError as e:
            problem(f"{where}: {DASHBOARD_KEY} does not parse: {e}")
        if len(data.encode()) > 1 << 20:
            problem(f"{where}: {DASHBOARD_KEY} exceeds the 1 MiB a ConfigMap holds")
        for field in ("labels", "annotations"):
            want = conf.get(field) or {}
            got = meta.get(field) or {}
            for k, v in want.items():
                if got.get(k) != v:
                    problem(f"{where}: {field}.{k} is {got.get(k)!r}, grafana.dashboard.{field} says {v!r}")
        namespace = conf.get("namespace") or RELEASE_NAMESPACE
        if meta.get("namespace") != namespace:
            problem(f"{where}: namespace {meta.get('namespace')!r}, expected {namespace!r}")


# --- images ---------------------------------------------------------------------------------------------------

def check_docker() -> None:
    cli = tomllib.loads((ROOT / "services/cli/Cargo.toml").read_text())
    package = cli.get("package", {}).get("name")
    bins = [b.get("name") for b in cli.get("bin", [])]
    members = tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]["members"]
    for df in sorted((ROOT / "deploy/docker").glob("Dockerfile.*")):
        text = re.sub(r"\\\n", " ", df.read_text())
        rel = df.relative_to(ROOT)
        copied = []
        for line in text.splitlines():
            words = line.split()
            if not words or words[0].upper() not in ("COPY", "ADD"):
                continue
            if any(w.startswith("--from") for w in words[1:]):
                continue
            sources = [w for w in words[1:-1] if not w.startswith("--")]
            for src in sources:
                if not (ROOT / src).exists():
                    problem(f"{rel}: COPY source {src} does not exist in the repository")
            copied += [src.rstrip("/") for src in sources]
        # cargo loads every workspace member's manifest (and needs a target in it), whichever package it builds.
        for member in members:
            if not any(member == c or member.startswith(c + "/") or c == f"{member}/Cargo.toml" for c in copied):
                problem(f"{rel}: workspace member {member} is not copied into the build context")
        m = re.search(r"cargo build [^\n&]*?-p (\S+)", text)
        if not m:
            problem(f"{rel}: no `cargo build ... -p PACKAGE`")
        elif m.group(1) != package:
            problem(f"{rel}: builds -p {m.group(1)}, services/cli/Cargo.toml is {package}")
        if "--release --locked" not in text:
            problem(f"{rel}: cargo build must use --release --locked")
        if df.name.endswith(".cuda") and "--features cuda" not in text:
            problem(f"{rel}: the CUDA image must build --features cuda")
        if "mip" not in bins:
            problem(f"services/cli/Cargo.toml: no [[bin]] named mip (found {bins})")
        if "target/release/mip " not in text or "/usr/local/bin/mip" not in text:
            problem(f"{rel}: must install target/release/mip as /usr/local/bin/mip")
        if 'ENTRYPOINT ["mip"]' not in text:
            problem(f'{rel}: ENTRYPOINT must be ["mip"]')
        if not re.search(r"^USER (?!root|0\b)", text, re.M):
            problem(f"{rel}: the runtime stage must run as a non-root USER")
    compose = yaml.safe_load((ROOT / "deploy/docker/compose.yaml").read_text())
    flags = cli_flags()
    for svc, spec in compose.get("services", {}).items():
        if str(spec.get("image", "")).startswith("mip"):
            cmd = spec.get("command") or []
            if tuple(cmd[:2]) not in ALLOWED_COMMANDS:
                problem(f"compose.yaml {svc}: `mip {' '.join(map(str, cmd[:2]))}` is not an allowed subcommand")
            check_flags(cmd, flags, f"compose.yaml {svc}")
            cmd = list(map(str, cmd))
            if "--workers-dns" in cmd:
                host = cmd[cmd.index("--workers-dns") + 1].rpartition(":")[0]
                if host not in compose["services"]:
                    problem(f"compose.yaml {svc}: --workers-dns {host} is not a compose service")


def main() -> int:
    values = load_values()
    check_schema(values)
    with tempfile.TemporaryDirectory(prefix="mip-deploy-check-") as work:
        lint(values, Path(work))
    rendered = render(values)
    dump = os.environ.get("MIP_DEPLOY_DUMP")
    if dump:  # for debugging: the rendered manifests, one file per values case
        Path(dump).mkdir(parents=True, exist_ok=True)
        for name, docs in rendered.items():
            (Path(dump) / f"{name}.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    check_manifests(rendered, values)
    check_test_hook(values)
    check_dashboard_json()
    check_dashboard(rendered, values)
    check_docker()
    for p in problems:
        print(f"deploy/check.sh: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
