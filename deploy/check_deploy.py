"""Deployment checks run by deploy/check.sh (needs helm-sdkpy, jsonschema, PyYAML).

1. The chart: values files against values.schema.json (draft-07); `helm lint` through helm-sdkpy with the default
   values, with values-all-on.yaml and with its alternative choices (ALT_CHOICES) (any warning or error fails); a real Helm install of both against a throwaway
   in-process stand-in for the Kubernetes API (helm-sdkpy has no client-only `template`), whose manifest is then
   checked: worker.yaml and coordinator.yaml against the services' config structs (services/{worker,coordinator}/
   src/config.rs, the shared limits in services/admission/src/limits.rs), every `--flag` of the containers (and of compose) against the clap args of `mip serve SUB`
   (services/cli/src/serve.rs, main.rs), config file paths against volumeMounts, ports against listen addresses,
   workers_dns against the headless Service, worker TLS against the coordinator's worker_tls, the ServiceMonitor
   against the metrics Services.
2. The images: COPY sources exist, every workspace member is copied, `-p mip-cli` and its `mip` binary match services/cli/Cargo.toml, compose commands.
Set MIP_DEPLOY_DUMP=DIR to keep the rendered manifests. Prints nothing and exits 0 when everything holds; otherwise prints each problem and exits 1.
"""

import asyncio
import copy
import json
import os
import re
import shutil
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
# `mip` subcommand paths the chart and compose may run (each is checked to exist in services/cli/src/serve.rs).
ALLOWED_COMMANDS = {("serve", "worker"), ("serve", "coordinator")}
# A third case: values-all-on.yaml with the other choices (KEDA, bundled Redis with persistence, a model PVC,
# one-way TLS both to the workers and on the public API, no tokens).
ALT_CHOICES = {
    "worker": {"autoscaling": {"kind": "keda"},
               "modelVolume": {"type": "pvc", "claimName": "mip-models", "hostPath": ""}},
    "redis": {"bundled": {"enabled": True, "persistence": {"enabled": True, "storageClassName": "fast"}},
              "externalUrl": ""},
    "tls": {"mutualTls": False, "workerDomain": ""},
    "coordinator": {"tls": {"clientCa": False}, "auth": {"existingSecret": ""}, "config": {"telemetry": None}},
}
LINT_SEVERITY = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}

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
            config = helm.Configuration(namespace="mip", kubeconfig=kubeconfig)
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


# --- the services' config schemas, read from their serde structs ------------------------------------------------

LIST = "list"  # a leaf that takes a sequence (Vec<_>)


def config_schema(files: tuple[str, ...], root: str) -> dict:
    """Field tree of struct `root` from the given sources: {field: subtree, LIST, or None for a scalar}."""
    structs: dict[str, dict[str, str]] = {}
    for rel in files:
        text = (ROOT / rel).read_text()
        for m in re.finditer(r"pub struct (\w+) \{(.*?)\n\}", text, re.S):
            structs[m.group(1)] = dict(re.findall(r"^\s*pub (\w+): ([\w:<>]+),", m.group(2), re.M))
    # `pub use other::Struct as Alias;` re-exports a struct of another file (e.g. the shared telemetry section).
    for rel in files:
        text = (ROOT / rel).read_text()
        for src, alias in re.findall(r"^pub use [\w:]*::(\w+) as (\w+);", text, re.M):
            if src in structs:
                structs[alias] = structs[src]

    def tree(name: str) -> dict:
        return {f: (tree(t) if t in structs else LIST if t.startswith("Vec<") else None)
                for f, t in structs[name].items()}

    if root not in structs:
        problem(f"{', '.join(files)}: struct {root} not found")
        return {}
    return tree(root)


def worker_config_schema() -> dict:
    return config_schema(("services/common/src/telemetry.rs", "services/admission/src/limits.rs",
                          "services/worker/src/config.rs"), "WorkerConfig")


def coordinator_config_schema() -> dict:
    return config_schema(("services/common/src/telemetry.rs", "services/admission/src/limits.rs",
                          "services/coordinator/src/config.rs"), "CoordinatorConfig")


EXPECTED_SECTIONS = {"server", "limits", "redis", "cache", "model", "executor", "telemetry"}
COORDINATOR_SECTIONS = {"server", "limits", "redis", "coordinator", "worker_tls", "auth", "telemetry"}


def check_keys(cfg, schema: dict, where: str, service: str = "worker") -> None:
    if not isinstance(cfg, dict):
        problem(f"{where}: expected a mapping, got {cfg!r}")
        return
    for k, v in cfg.items():
        if k not in schema:
            problem(f"{where}.{k}: unknown field (the {service} rejects unknown fields)")
        elif schema[k] == LIST:
            if not isinstance(v, list) or any(isinstance(x, (dict, list)) for x in v):
                problem(f"{where}.{k}: expected a list of scalars, got {v!r}")
        elif schema[k] is not None:
            check_keys(v, schema[k], f"{where}.{k}", service)
        elif isinstance(v, (dict, list)):
            problem(f"{where}.{k}: expected a scalar, got {v!r}")


# --- the CLI's flags, read from its clap structs ----------------------------------------------------------------

def kebab(name: str) -> str:
    return name.replace("_", "-")


def clap_flags(body: str, where: str) -> set[str]:
    """`--long` / `-s` flags of the fields of one clap struct body."""
    flags: set[str] = set()
    for m in re.finditer(r"#\[(arg|command)\((.*?)\)\]\s*(?:pub(?:\([^)]*\))?\s+)?(\w+)\s*:", body, re.S):
        kind, attrs, field = m.groups()
        if kind == "command" and "flatten" in attrs:
            problem(f"{where}: #[command(flatten)] {field}: flattened flags are not parsed by this check")
            continue
        long = re.search(r'\blong\s*(?:=\s*"([^"]+)")?', attrs)
        if long:
            flags.add("--" + (long.group(1) or kebab(field)))
        short = re.search(r"\bshort\s*(?:=\s*'(.)')?", attrs)
        if short:
            flags.add("-" + (short.group(1) or field[0]))
    return flags


def struct_body(text: str, name: str) -> str | None:
    m = re.search(rf"pub struct {name} \{{(.*?)\n\}}", text, re.S)
    return m.group(1) if m else None


def cli_flags() -> dict[tuple[str, str], set[str]]:
    """Flags accepted by each `mip serve SUB` (its own plus the global ones of the top-level `Cli`)."""
    serve_rs = (ROOT / "services/cli/src/serve.rs").read_text()
    # The global flags: the top-level `Cli`'s own and those of the `Verbosity` it flattens.
    global_flags = set()
    for path, struct in (("services/cli/src/main.rs", "Cli"), ("services/cli/src/verbosity.rs", "Verbosity")):
        body = re.search(rf"struct {struct} \{{(.*?)\n\}}", (ROOT / path).read_text(), re.S)
        if body is None:
            problem(f"{path}: struct {struct} not found")
            continue
        for m in re.finditer(r"#\[arg\(([^\]]*global\s*=\s*true[^\]]*)\)\]\s*(\w+)\s*:", body.group(1)):
            global_flags |= clap_flags(m.group(0), path)
    global_flags |= {"--help", "-h"}
    out = {}
    enum = re.search(r"pub enum Command \{(.*?)\n\}", serve_rs, re.S)
    variants = dict(re.findall(r"^\s*(\w+)\((\w+)\),", enum.group(1), re.M)) if enum else {}
    for sub in ("Worker", "Coordinator"):
        struct = variants.get(sub)
        body = struct_body(serve_rs, struct) if struct else None
        if body is None:
            problem(f"services/cli/src/serve.rs: no args struct for `serve {sub.lower()}`")
            continue
        out[("serve", sub.lower())] = clap_flags(body, f"services/cli/src/serve.rs {struct}") | global_flags
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
    check_keys(cfg, schema, f"[{name}] coordinator.yaml", "coordinator")
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
    schema = worker_config_schema()
    if schema and set(schema) != EXPECTED_SECTIONS:
        problem(f"worker config sections changed: {sorted(schema)} (chart expects {sorted(EXPECTED_SECTIONS)})")
    cschema = coordinator_config_schema()
    if cschema and set(cschema) != COORDINATOR_SECTIONS:
        problem(f"coordinator config sections changed: {sorted(cschema)} (chart expects {sorted(COORDINATOR_SECTIONS)})")
    check_values_schema_config(cschema)
    flags = cli_flags()
    serve_rs = (ROOT / "services/cli/src/serve.rs").read_text()
    for variant, command in (("Worker", "serve worker"), ("Coordinator", "serve coordinator")):
        if not re.search(rf"^\s*{variant}\(", serve_rs, re.M):
            problem(f"services/cli/src/serve.rs: no `{command}` subcommand")
    for name, docs in rendered.items():
        kinds = {(d["kind"], d["metadata"]["name"]): d for d in docs}
        cms = [d for d in docs if d["kind"] == "ConfigMap" and "worker.yaml" in d.get("data", {})]
        if len(cms) != 1:
            problem(f"[{name}]: expected one worker ConfigMap with worker.yaml, found {len(cms)}")
        for cm in cms:
            cfg = yaml.safe_load(cm["data"]["worker.yaml"])
            check_keys(cfg, schema, f"[{name}] worker.yaml")
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


def check_values_schema_config(cschema: dict) -> None:
    """values.schema.json's coordinator.config names only fields of CoordinatorConfig."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    node = schema["properties"]["coordinator"]["properties"]["config"]

    def walk(node: dict, tree, where: str) -> None:
        for k, sub in (node.get("properties") or {}).items():
            if not isinstance(tree, dict) or k not in tree:
                problem(f"values.schema.json {where}.{k}: not a field of the coordinator config")
            elif isinstance(tree[k], dict):
                walk(sub, tree[k], f"{where}.{k}")

    walk(node, cschema, "coordinator.config")


def check_test_hook(values: dict) -> None:
    hook = CHART / "templates/tests"
    if not any(hook.glob("*.yaml")):
        problem("chart has no `helm test` pod under templates/tests")


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
    check_docker()
    for p in problems:
        print(f"deploy/check.sh: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
