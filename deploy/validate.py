#!/usr/bin/env python3
"""Renders and checks the Kubernetes deployment in deploy/ (CI runs it).

There is no kubectl, kustomize or helm on the development machines or in
CI, so this renders every kustomization under deploy/kubernetes/ itself,
with the small subset of kustomize the manifests use:

  - `resources`: files (one or more YAML documents) and directories
    holding a kustomization.yaml;
  - `namespace`: set on every namespaced object;
  - `patches` with only `path`: strategic-merge patches, matched to an
    object by apiVersion group, kind and name. Maps merge; a null value
    removes the key; lists merge by the Kubernetes merge key where the
    API has one (containers, env, volumes by `name`, volumeMounts by
    `mountPath`, container ports by `containerPort`, Service ports by
    `port`, topologySpreadConstraints by `topologyKey`), other lists are
    replaced.

Anything else in a kustomization is refused, so the manifests stay within
what is checked here. Then every rendered object, and every Secret
template in deploy/kubernetes/secrets/, is validated against the
Kubernetes API schemas with `kubernetes-validate` (strict: unknown fields
are errors) for the oldest and newest Kubernetes versions we claim, and
the invariants the node depends on are checked (see `check_rendered`):
the grace period outlasts the drain, probes hit the HTTP listener, every
listener binds beyond loopback and is a containerPort, every file the
args and node.toml name is mounted (and in the Secret templates), the
peer Service is headless and publishes not-ready addresses, the PDB and
Services select the pods, the join list starts at the bootstrapping pod.
The Grafana dashboard may use only the metrics the node exports, and
must use all of them; the Dockerfile must expose every containerPort and
run as the pods' user.

Before all that it runs a self-test: deliberately broken inputs that each
check must refuse, so a check that stopped working fails CI too.

Exit status 0 when everything holds, 1 with one line per problem
(`file: Kind/name: what is wrong`) otherwise.

    python3 deploy/validate.py            # self-test, then the real files
    python3 deploy/validate.py --no-self-test
    python3 deploy/validate.py --print deploy/kubernetes/overlays/production
"""

import argparse
import copy
import ipaddress
import json
import re
import sys
import tempfile
import tomllib
from pathlib import Path

import yaml

try:
    from kubernetes_validate import utils as kv
except ImportError:  # pragma: no cover - reported, not tested
    sys.exit("deploy/validate.py needs the PyPI package kubernetes-validate (see .ci/run)")

DEPLOY = Path(__file__).resolve().parent
REPO = DEPLOY.parent
KUBERNETES = DEPLOY / "kubernetes"
SECRETS = KUBERNETES / "secrets"
DASHBOARD = DEPLOY / "grafana-dashboard.json"
DOCKERFILE = DEPLOY / "Dockerfile"

# The oldest Kubernetes we claim to run on, and the newest the installed
# kubernetes-validate knows.
OLDEST_KUBERNETES = "1.31.0"

# What /metrics exports (README, "Operating"): the dashboard uses exactly these.
METRICS = {
    "xmpp_connections", "xmpp_logins_total", "xmpp_auth_failures_total",
    "xmpp_stanzas_in_total", "xmpp_stanzas_out_total", "xmpp_routed_total",
    "xmpp_session_queue_depth", "xmpp_raft_term", "xmpp_raft_commit_index",
    "xmpp_raft_applied_index", "xmpp_raft_leader_changes_total",
    "xmpp_raft_replication_lag", "xmpp_raft_snapshots_total", "xmpp_s2s_streams",
    "process_resident_memory_bytes", "process_open_fds",
}

# The node's embedded defaults for what the checks read (node/src/config.rs).
DEFAULT_LISTEN = {
    "c2s": "0.0.0.0:5222", "c2s_tls": "0.0.0.0:5223", "s2s": "0.0.0.0:5269",
    "http": "0.0.0.0:5280", "https": "0.0.0.0:5281", "grpc": "127.0.0.1:5290",
}
DEFAULT_CLUSTER_ADDR = "127.0.0.1:5291"
DEFAULT_SHUTDOWN_DRAIN_SECS = 25
# Flags that override a listener (xmpp-node --help).
LISTEN_FLAGS = {
    "c2s": "--c2s-addr", "c2s_tls": "--c2s-tls-addr", "s2s": "--s2s-addr",
    "http": "--http-addr", "https": "--https-addr", "grpc": "--grpc-addr",
}

CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume",
                  "StorageClass", "CustomResourceDefinition", "PriorityClass"}
KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "namespace", "patches"}
# Strategic-merge keys of the lists the manifests patch (the Kubernetes API's
# patchMergeKey); `ports` depends on where it is, see merge_key().
MERGE_KEYS = {
    "containers": "name", "initContainers": "name", "ephemeralContainers": "name",
    "env": "name", "volumes": "name", "imagePullSecrets": "name",
    "volumeMounts": "mountPath", "topologySpreadConstraints": "topologyKey",
}


class RenderError(Exception):
    pass


class Item:
    """One rendered object and where it came from."""

    def __init__(self, obj, source):
        self.obj = obj
        self.source = source
        self.patched_by = []

    @property
    def kind(self):
        return self.obj.get("kind", "?")

    @property
    def name(self):
        return (self.obj.get("metadata") or {}).get("name", "?")

    def where(self):
        s = self.source
        if self.patched_by:
            s += " (patched by " + ", ".join(self.patched_by) + ")"
        return f"{s}: {self.kind}/{self.name}"


def rel(p):
    try:
        return str(Path(p).resolve().relative_to(REPO))
    except ValueError:
        return str(p)


def load_docs(path):
    try:
        with open(path) as f:
            return [d for d in yaml.safe_load_all(f) if d is not None]
    except (OSError, yaml.YAMLError) as e:
        raise RenderError(f"{rel(path)}: cannot read YAML: {e}")


def dig(obj, *keys, default=None):
    for k in keys:
        if isinstance(obj, dict) and k in obj:
            obj = obj[k]
        elif isinstance(obj, list) and isinstance(k, int) and -len(obj) <= k < len(obj):
            obj = obj[k]
        else:
            return default
    return obj


# ---------------------------------------------------------------- rendering

def merge_key(field, base, patch):
    if field == "ports":
        items = [i for i in base + patch if isinstance(i, dict)]
        return "containerPort" if any("containerPort" in i for i in items) else "port"
    return MERGE_KEYS.get(field)


def without_nulls(v):
    if isinstance(v, dict):
        return {k: without_nulls(x) for k, x in v.items() if x is not None}
    if isinstance(v, list):
        return [without_nulls(x) for x in v]
    return v


def strategic_merge(base, patch):
    """A strategic-merge patch of `patch` onto the map `base` (a new map)."""
    out = dict(base)
    for k, v in patch.items():
        if k.startswith("$"):
            raise RenderError(f"`{k}` directives are outside the subset deploy/validate.py renders")
        if v is None:
            out.pop(k, None)
        elif k not in out:
            out[k] = without_nulls(v)
        else:
            out[k] = merge_value(k, out[k], v)
    return out


def merge_value(field, base, patch):
    if isinstance(base, dict) and isinstance(patch, dict):
        return strategic_merge(base, patch)
    if isinstance(base, list) and isinstance(patch, list):
        key = merge_key(field, base, patch)
        if key is None:
            return without_nulls(patch)
        out = list(base)
        for item in patch:
            if not isinstance(item, dict) or key not in item:
                raise RenderError(f"a patch item of `{field}` has no merge key `{key}`")
            for i, b in enumerate(out):
                if isinstance(b, dict) and b.get(key) == item[key]:
                    out[i] = strategic_merge(b, item)
                    break
            else:
                out.append(without_nulls(item))
        return out
    return without_nulls(patch)


def api_group(api_version):
    return api_version.split("/")[0] if "/" in api_version else ""


def render(directory):
    """Renders the kustomization in `directory` into a list of Items."""
    directory = Path(directory)
    kfile = directory / "kustomization.yaml"
    if not kfile.is_file():
        raise RenderError(f"{rel(directory)}: no kustomization.yaml")
    docs = load_docs(kfile)
    if len(docs) != 1 or not isinstance(docs[0], dict):
        raise RenderError(f"{rel(kfile)}: must hold one YAML map")
    k = docs[0]
    unknown = sorted(set(k) - KUSTOMIZATION_KEYS)
    if unknown:
        raise RenderError(f"{rel(kfile)}: {', '.join(unknown)}: outside the kustomize subset "
                          f"deploy/validate.py renders ({', '.join(sorted(KUSTOMIZATION_KEYS))})")
    items = []
    for r in k.get("resources") or []:
        p = directory / r
        if p.is_dir():
            items += render(p)
        elif p.is_file():
            for d in load_docs(p):
                if not isinstance(d, dict) or "kind" not in d or "apiVersion" not in d:
                    raise RenderError(f"{rel(p)}: a document without kind and apiVersion")
                items.append(Item(d, rel(p)))
        else:
            raise RenderError(f"{rel(kfile)}: resource {r} does not exist")
    for patch in k.get("patches") or []:
        if not isinstance(patch, dict) or set(patch) != {"path"}:
            raise RenderError(f"{rel(kfile)}: patches: only `- path: FILE` entries are rendered here")
        p = directory / patch["path"]
        for d in load_docs(p):
            name = dig(d, "metadata", "name")
            targets = [i for i in items if i.kind == d.get("kind") and i.name == name
                       and api_group(i.obj["apiVersion"]) == api_group(d.get("apiVersion", ""))]
            if len(targets) != 1:
                raise RenderError(f"{rel(p)}: patch for {d.get('kind')}/{name} matches "
                                  f"{len(targets)} objects, not one")
            t = targets[0]
            t.obj = strategic_merge(t.obj, d)
            t.patched_by.append(rel(p))
    ns = k.get("namespace")
    if ns:
        for i in items:
            if i.kind not in CLUSTER_SCOPED:
                i.obj.setdefault("metadata", {})["namespace"] = ns
    return items


def kustomizations():
    return sorted(p.parent for p in KUBERNETES.rglob("kustomization.yaml"))


# ---------------------------------------------------------------- schemas

def kubernetes_versions():
    return [OLDEST_KUBERNETES, kv.latest_version()]


def schema_problems(obj, where):
    out = []
    for version in kubernetes_versions():
        try:
            kv.validate(obj, version, strict=True)
        except kv.ValidationError as e:
            path = ".".join(str(p) for p in e.path) or "(top)"
            out.append(f"{where}: Kubernetes {e.version} schema: {path}: {e.message}")
        except kv.SchemaNotFoundError as e:
            out.append(f"{where}: {e.message} (only core API kinds can be checked here)")
    return out


# ---------------------------------------------------------------- invariants

def parse_args(args):
    """`--flag value` pairs (every flag xmpp-node gets in a pod takes a value)."""
    flags, problems = {}, []
    i = 0
    while i < len(args):
        a = str(args[i])
        if not a.startswith("--") or i + 1 >= len(args) or str(args[i + 1]).startswith("--"):
            problems.append(f"args: `{a}` is not a `--flag value` pair")
            i += 1
            continue
        name, _, inline = a.partition("=")
        if inline:
            flags.setdefault(name, []).append(inline)
            i += 1
        else:
            flags.setdefault(name, []).append(str(args[i + 1]))
            i += 2
    return flags, problems


def split_addr(addr):
    host, _, port = str(addr).rpartition(":")
    return host.strip("[]"), int(port) if port.isdigit() else None


def is_loopback(host):
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def is_wildcard(host):
    return host in ("0.0.0.0", "::")


def selects(selector, labels):
    """A label selector map (matchLabels or a Service's selector) selects `labels`."""
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def secret_templates():
    out = {}
    for p in sorted(SECRETS.glob("*.yaml")):
        for d in load_docs(p):
            if d.get("kind") == "Secret":
                keys = set((d.get("data") or {}).keys()) | set((d.get("stringData") or {}).keys())
                out[dig(d, "metadata", "name")] = (rel(p), keys)
    return out


def check_rendered(items, secrets, label):
    """The invariants of one rendered kustomization; a list of problems."""
    problems = []
    by_kind = {}
    for i in items:
        by_kind.setdefault(i.kind, []).append(i)
    statefulsets = by_kind.get("StatefulSet", [])
    if not statefulsets:
        return [f"{label}: renders no StatefulSet"]
    for sts in statefulsets:
        problems += check_statefulset(sts, items, by_kind, secrets)
    return problems


def check_statefulset(sts, items, by_kind, secrets):
    p = []
    w = sts.where()

    def bad(msg):
        p.append(f"{w}: {msg}")

    spec = sts.obj.get("spec") or {}
    pod = dig(spec, "template", "spec") or {}
    labels = dig(spec, "template", "metadata", "labels") or {}
    replicas = spec.get("replicas", 1)
    if not selects(dig(spec, "selector", "matchLabels"), labels):
        bad("spec.selector.matchLabels does not select the pod template's labels")
    if replicas < 3 or replicas % 2 == 0:
        bad(f"replicas {replicas}: a Raft cluster wants an odd number, at least 3 "
            "(an even one tolerates no more failures than one fewer)")
    if spec.get("podManagementPolicy") != "Parallel":
        bad("podManagementPolicy must be Parallel: with OrderedReady, after a full restart "
            "xmpp-0 waits alone for a quorum (to be ready) before xmpp-1 may start")
    if pod.get("enableServiceLinks") is not False:
        bad("enableServiceLinks must be false: the node reads XMPP_* variables as flags "
            "and Service links inject XMPP_C2S_PORT and the like")

    containers = [c for c in pod.get("containers") or [] if (c.get("command") or [None])[0] == "xmpp-node"]
    if len(containers) != 1:
        bad("needs exactly one container whose command is xmpp-node")
        return p
    c = containers[0]

    # Environment: $(VAR) in args must be defined, or Kubernetes passes it literally.
    env = {}
    for e in c.get("env") or []:
        env[e["name"]] = e.get("value") if "value" in e else dig(e, "valueFrom", "fieldRef", "fieldPath")
    flags, arg_problems = parse_args(c.get("args") or [])
    for a in arg_problems:
        bad(a)
    for a in c.get("args") or []:
        for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", str(a)):
            if var not in env:
                bad(f"args use $({var}) but the container defines no env {var}")
    for var, field in (("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace")):
        if var in env and env[var] != field:
            bad(f"env {var} must come from the downward API fieldRef {field}")

    def flag(name, env_name=None):
        if name in flags:
            return flags[name][-1]
        if env_name and env.get(env_name) is not None:
            return env[env_name]
        return None

    # Mounts and the files behind them.
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    claims = {dig(t, "metadata", "name") for t in spec.get("volumeClaimTemplates") or []}
    mounts = c.get("volumeMounts") or []
    for m in mounts:
        if m["name"] not in volumes and m["name"] not in claims:
            bad(f"volumeMount {m['mountPath']} names no volume or volumeClaimTemplate `{m['name']}`")

    def mount_of(path):
        best = None
        for m in mounts:
            mp = m["mountPath"].rstrip("/")
            if path == mp or path.startswith(mp + "/"):
                if best is None or len(mp) > len(best["mountPath"].rstrip("/")):
                    best = m
        return best

    def file_content_key(path):
        """(volume, key in its ConfigMap/Secret) of a file path, or a problem."""
        m = mount_of(path)
        if m is None:
            return None, None, f"{path} is on no volume mount (the root filesystem is read-only and empty there)"
        vol = volumes.get(m["name"])
        if vol is None:
            return None, None, f"{path} is on the data volume, not a ConfigMap or Secret"
        rest = path[len(m["mountPath"].rstrip("/")):].lstrip("/")
        key = m.get("subPath") if not rest else rest
        if not key:
            return None, None, f"{path} is the mount point {m['mountPath']} itself, not a file in it"
        src = vol.get("secret") or vol.get("configMap")
        if src is None:
            return None, None, f"{path} is on volume `{m['name']}`, neither a ConfigMap nor a Secret"
        items_map = {it["path"]: it["key"] for it in src.get("items") or []}
        if items_map:
            if key not in items_map:
                return None, None, f"{path}: volume `{m['name']}` projects no item {key}"
            key = items_map[key]
        return vol, key, None

    def require_file(what, path):
        vol, key, err = file_content_key(path)
        if err:
            bad(f"{what}: {err}")
            return None
        if "secret" in vol:
            name = vol["secret"].get("secretName")
            if name not in secrets:
                bad(f"{what}: Secret {name} has no template in {rel(SECRETS)}")
            elif key not in secrets[name][1]:
                bad(f"{what}: {path} is key `{key}` of Secret {name}, which its template "
                    f"{secrets[name][0]} does not have")
        else:
            name = vol["configMap"].get("name")
            cms = [i for i in by_kind.get("ConfigMap", []) if i.name == name]
            if not cms:
                bad(f"{what}: ConfigMap {name} is not in the rendered objects")
            elif key not in (cms[0].obj.get("data") or {}):
                bad(f"{what}: ConfigMap {name} has no key `{key}`")
            else:
                return cms[0].obj["data"][key]
        return None

    for v in volumes.values():
        if "configMap" in v and not any(i.name == v["configMap"].get("name") for i in by_kind.get("ConfigMap", [])):
            bad(f"volume `{v['name']}`: ConfigMap {v['configMap'].get('name')} is not in the rendered objects")
        if "secret" in v and v["secret"].get("secretName") not in secrets:
            bad(f"volume `{v['name']}`: Secret {v['secret'].get('secretName')} has no template in {rel(SECRETS)}")

    config_path = flag("--config", "XMPP_CONFIG")
    config = {}
    if config_path is None:
        bad("args give no --config")
    else:
        text = require_file("--config", config_path)
        if text is not None:
            try:
                config = tomllib.loads(text)
            except tomllib.TOMLDecodeError as e:
                bad(f"node.toml ({config_path}) does not parse: {e}")

    # The data dir: persistent, and a directory the node makes itself.
    data_dir = flag("--data-dir", "XMPP_DATA_DIR") or config.get("data_dir") or "./data"
    dm = mount_of(data_dir) if data_dir.startswith("/") else None
    if dm is None or dm["name"] not in claims:
        bad(f"data dir {data_dir} is not on a volumeClaimTemplate's volume: it would not survive a restart")
    elif data_dir.rstrip("/") == dm["mountPath"].rstrip("/"):
        bad(f"data dir {data_dir} is the volume's root: the node keeps its data dir 0700 and "
            "owned by itself, which it cannot make of a root-owned mount point; use a subdirectory")

    # Files named by the config and the args.
    for vh in config.get("vhosts") or []:
        for k in ("tls_cert", "tls_key"):
            if vh.get(k):
                require_file(f"[[vhosts]] {vh.get('name')} {k}", vh[k])
    cluster = config.get("cluster") or {}
    tls = {}
    for k, fl, ev in (("ca", "--cluster-ca", "XMPP_CLUSTER_CA"), ("cert", "--cluster-cert", "XMPP_CLUSTER_CERT"),
                      ("key", "--cluster-key", "XMPP_CLUSTER_KEY")):
        tls[k] = flag(fl, ev) or cluster.get(k)
        if tls[k]:
            require_file(f"cluster {k}", tls[k])
    token = flag("--admin-token-file") or env.get("XMPP_ADMIN_TOKEN_FILE") or dig(config, "admin", "token_file")
    if token:
        require_file("admin token file", token)
    if "--admin-token-file" in flags and "XMPP_ADMIN_TOKEN_FILE" in env \
            and flags["--admin-token-file"][-1] != env["XMPP_ADMIN_TOKEN_FILE"]:
        bad("env XMPP_ADMIN_TOKEN_FILE (for clusterctl) differs from --admin-token-file")

    # Listeners: bound beyond loopback, and each a containerPort.
    ports = {}  # containerPort number -> name
    for cp in c.get("ports") or []:
        ports[cp["containerPort"]] = cp.get("name")
    by_name = {n: num for num, n in ports.items() if n}
    listen = dict(DEFAULT_LISTEN)
    listen.update({k: v for k, v in (config.get("listen") or {}).items() if k in DEFAULT_LISTEN})
    for k, fl in LISTEN_FLAGS.items():
        if fl in flags:
            listen[k] = flags[fl][-1]
    listen["cluster"] = flag("--cluster-addr", "XMPP_CLUSTER_ADDR") or cluster.get("addr") or DEFAULT_CLUSTER_ADDR
    bound = set()
    for k, addr in listen.items():
        if addr == "off":
            continue
        host, port = split_addr(addr)
        if port is None:
            bad(f"listener {k} = {addr!r} has no port")
            continue
        if k == "grpc":
            if is_loopback(host):
                continue  # reached through `kubectl exec`, not the network
            if not token:
                bad(f"listen.grpc {addr} is beyond loopback without an admin token file (the node refuses to start)")
        elif not is_wildcard(host):
            bad(f"listener {k} = {addr}: in a pod it must bind 0.0.0.0 (or ::) to be reachable")
        bound.add(port)
        if port not in ports:
            bad(f"listener {k} binds port {port}, which the container does not declare in ports")
    for num, n in ports.items():
        if num not in bound:
            bad(f"containerPort {num} ({n}) is bound by no listener in node.toml or the args")
    cluster_host, cluster_port = split_addr(listen["cluster"])
    if not is_loopback(cluster_host) and not all(tls.values()):
        bad("the cluster listener is beyond loopback without --cluster-ca/--cluster-cert/--cluster-key "
            "(the node refuses to start)")
    http_port = split_addr(listen["http"])[1]

    # Peer discovery: advertise and join through the headless Service.
    svc_name = spec.get("serviceName")
    sts_name = sts.name
    suffix = rf"\.{re.escape(str(svc_name))}\.\$\(POD_NAMESPACE\)\.svc\.cluster\.local:{cluster_port}"
    adv = flag("--advertise-addr", "XMPP_ADVERTISE_ADDR")
    if adv is None or not re.fullmatch(r"\$\(POD_NAME\)" + suffix, adv):
        bad(f"--advertise-addr must be $(POD_NAME).{svc_name}.$(POD_NAMESPACE).svc.cluster.local:{cluster_port}, "
            f"not {adv}")
    joins = flags.get("--join") or []
    if not joins:
        bad("no --join: every pod must know the peers (the first one bootstraps)")
    for n, j in enumerate(joins):
        m = re.fullmatch(re.escape(sts_name) + r"-(\d+)" + suffix, j)
        if not m:
            bad(f"--join {j} is not {sts_name}-N.{svc_name}.$(POD_NAMESPACE).svc.cluster.local:{cluster_port}")
        elif n == 0 and m.group(1) != "0":
            bad(f"the first --join must be {sts_name}-0, the pod that bootstraps and exists at every scale")
        elif int(m.group(1)) >= replicas:
            bad(f"--join {j}: ordinal {m.group(1)} does not exist with {replicas} replicas")
    peers = [i for i in by_kind.get("Service", []) if i.name == svc_name]
    if not peers:
        bad(f"serviceName {svc_name}: no such Service")
    else:
        ps = peers[0].obj.get("spec") or {}
        pw = peers[0].where()
        if ps.get("clusterIP") != "None":
            p.append(f"{pw}: the peer Service must be headless (clusterIP: None): pods dial each other by name")
        if ps.get("publishNotReadyAddresses") is not True:
            p.append(f"{pw}: publishNotReadyAddresses must be true: a joining pod is not ready until "
                     "its peers reach it, and the leader removes members whose names stop resolving")
        if not any(sp.get("port") == cluster_port for sp in ps.get("ports") or []):
            p.append(f"{pw}: no port {cluster_port} (the cluster listener)")

    # Probes.
    def probe_port(pr):
        port = dig(pr, "httpGet", "port")
        return by_name.get(port) if isinstance(port, str) else port

    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")):
        pr = c.get(probe)
        if pr is None:
            if probe != "startupProbe":
                bad(f"no {probe}")
            continue
        if dig(pr, "httpGet", "path") != path:
            bad(f"{probe} must GET {path}, not {dig(pr, 'httpGet', 'path')}")
        if probe_port(pr) != http_port:
            bad(f"{probe} port {dig(pr, 'httpGet', 'port')} is not the HTTP listener's port {http_port}")

    # The drain fits in the grace period.
    drain = flag("--shutdown-drain-secs", "XMPP_SHUTDOWN_DRAIN_SECS")
    drain = int(drain) if drain is not None else dig(config, "limits", "shutdown_drain_secs",
                                                       default=DEFAULT_SHUTDOWN_DRAIN_SECS)
    grace = pod.get("terminationGracePeriodSeconds", 30)
    if grace <= drain:
        bad(f"terminationGracePeriodSeconds {grace} must exceed [limits] shutdown_drain_secs {drain}: "
            "the kubelet would kill the node mid-drain")

    # Hardening and resources.
    psc, csc = pod.get("securityContext") or {}, c.get("securityContext") or {}
    if not (psc.get("runAsNonRoot") or csc.get("runAsNonRoot")):
        bad("securityContext: runAsNonRoot must be true")
    if csc.get("readOnlyRootFilesystem") is not True:
        bad("container securityContext: readOnlyRootFilesystem must be true")
    if csc.get("allowPrivilegeEscalation") is not False:
        bad("container securityContext: allowPrivilegeEscalation must be false")
    if "ALL" not in (dig(csc, "capabilities", "drop") or []):
        bad("container securityContext: capabilities must drop ALL")
    if (dig(csc, "seccompProfile", "type") or dig(psc, "seccompProfile", "type")) != "RuntimeDefault":
        bad("securityContext: seccompProfile must be RuntimeDefault")
    for k in ("requests", "limits"):
        for r in ("cpu", "memory"):
            if dig(c, "resources", k, r) is None:
                bad(f"resources.{k}.{r} is not set")

    # Spread over zones and machines.
    keys = {t.get("topologyKey"): t for t in pod.get("topologySpreadConstraints") or []}
    for key in ("topology.kubernetes.io/zone", "kubernetes.io/hostname"):
        if key not in keys:
            bad(f"no topologySpreadConstraint on {key}")
        elif not selects(dig(keys[key], "labelSelector", "matchLabels"), labels):
            bad(f"the topologySpreadConstraint on {key} does not select the pods")

    # Services and the PDB select these pods, and their ports exist.
    for s in by_kind.get("Service", []):
        ss = s.obj.get("spec") or {}
        if not selects(ss.get("selector"), labels):
            p.append(f"{s.where()}: its selector does not select the pods of StatefulSet {sts_name}")
        if "externalTrafficPolicy" in ss and ss.get("type") not in ("NodePort", "LoadBalancer"):
            p.append(f"{s.where()}: externalTrafficPolicy needs type NodePort or LoadBalancer, not "
                     f"{ss.get('type', 'ClusterIP')} (the API server refuses it)")
        for sp in ss.get("ports") or []:
            t = sp.get("targetPort", sp.get("port"))
            num = by_name.get(t) if isinstance(t, str) else t
            if num not in ports:
                p.append(f"{s.where()}: port {sp.get('port')} targets {t}, which is no containerPort")
    pdbs = by_kind.get("PodDisruptionBudget", [])
    if not pdbs:
        bad("no PodDisruptionBudget selects its pods")
    for b in pdbs:
        bs = b.obj.get("spec") or {}
        if not selects(dig(bs, "selector", "matchLabels"), labels):
            p.append(f"{b.where()}: its selector does not select the pods of StatefulSet {sts_name}")
        quorum_spare = replicas - (replicas // 2 + 1)
        mu = bs.get("maxUnavailable")
        if not isinstance(mu, int) or not 1 <= mu <= quorum_spare:
            p.append(f"{b.where()}: maxUnavailable must be a number from 1 to {quorum_spare} "
                     f"(more loses the quorum of {replicas})")

    # NetworkPolicies that select the pods let every declared port in.
    for n in by_kind.get("NetworkPolicy", []):
        ns_ = n.obj.get("spec") or {}
        if not selects(dig(ns_, "podSelector", "matchLabels"), labels):
            continue
        allowed = set()
        for rule in ns_.get("ingress") or []:
            for rp in rule.get("ports") or []:
                v = rp.get("port")
                allowed.add(by_name.get(v) if isinstance(v, str) else v)
        for num in ports:
            if num not in allowed:
                p.append(f"{n.where()}: containerPort {num} ({ports[num]}) is let in by no ingress rule")
    return p


def dashboard_problems(text, where):
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        return [f"{where}: not JSON: {e}"]
    out, used, ids = [], set(), set()
    panels = list(d.get("panels") or [])
    for pnl in list(panels):
        panels += pnl.get("panels") or []
    for pnl in panels:
        if pnl.get("id") in ids:
            out.append(f"{where}: panel id {pnl.get('id')} twice")
        ids.add(pnl.get("id"))
        for t in pnl.get("targets") or []:
            expr = t.get("expr", "")
            # Identifiers that are metric names: ours all start with xmpp_ or process_.
            for name in re.findall(r"\b((?:xmpp|process)_[a-z0-9_]+)\b", expr):
                if name not in METRICS:
                    out.append(f"{where}: panel {pnl.get('title')!r} uses {name}, which the node does not export")
                used.add(name)
            if pnl.get("type") != "row" and not expr:
                out.append(f"{where}: panel {pnl.get('title')!r} has a target without expr")
    for m in sorted(METRICS - used):
        out.append(f"{where}: no panel shows {m}")
    return out


def dockerfile_problems(text, ports, uid, where):
    out = []
    stages = re.split(r"(?im)^FROM\s", text)
    final = stages[-1] if len(stages) > 1 else ""
    exposed = {int(x) for line in re.findall(r"(?im)^EXPOSE\s+(.*)$", final) for x in re.findall(r"\d+", line)}
    for port in sorted(ports - exposed):
        out.append(f"{where}: the runtime stage does not EXPOSE {port}, a containerPort of the pods")
    users = re.findall(r"(?im)^USER\s+(\S+)", final)
    if not users or users[-1].split(":")[0] != str(uid):
        out.append(f"{where}: the runtime stage must run as USER {uid}, the pods' runAsUser")
    if re.search(r"(?im)^RUN\s", final):
        out.append(f"{where}: the runtime stage has a RUN step: it must need no shell")
    return out


# ---------------------------------------------------------------- the run

def check_everything():
    problems = []
    secrets = {}
    try:
        secrets = secret_templates()
    except RenderError as e:
        problems.append(str(e))
    for p in sorted(SECRETS.glob("*.yaml")):
        try:
            for d in load_docs(p):
                problems += schema_problems(d, f"{rel(p)}: {d.get('kind')}/{dig(d, 'metadata', 'name')}")
        except RenderError as e:
            problems.append(str(e))
    container_ports, uids = set(), set()
    dirs = kustomizations()
    for k in dirs:
        try:
            items = render(k)
        except RenderError as e:
            problems.append(str(e))
            continue
        for i in items:
            problems += schema_problems(i.obj, i.where())
        problems += check_rendered(items, secrets, rel(k))
        for i in items:
            if i.kind == "StatefulSet":
                pod = dig(i.obj, "spec", "template", "spec") or {}
                uids.add(dig(pod, "securityContext", "runAsUser"))
                for c in pod.get("containers") or []:
                    container_ports |= {cp["containerPort"] for cp in c.get("ports") or []}
        print(f"rendered {rel(k)}: {len(items)} objects")
    try:
        problems += dashboard_problems(DASHBOARD.read_text(), rel(DASHBOARD))
    except OSError as e:
        problems.append(f"{rel(DASHBOARD)}: {e}")
    try:
        for uid in sorted(uids, key=str):
            problems += dockerfile_problems(DOCKERFILE.read_text(), container_ports, uid, rel(DOCKERFILE))
    except OSError as e:
        problems.append(f"{rel(DOCKERFILE)}: {e}")
    return problems, len(dirs)


BROKEN_SCHEMA = """
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: broken}
spec:
  replica: 3
  serviceName: x
  selector: {matchLabels: {a: b}}
  template:
    metadata: {labels: {a: b}}
    spec:
      containers:
        - name: c
          image: i
          ports: [{containerPort: 5222}]
"""


def self_test():
    """Each check must refuse an input broken on purpose; a list of checks that did not."""
    failures = []

    def expect(what, problems, needle):
        if not any(needle in x for x in problems):
            failures.append(f"self-test: {what}: expected a problem mentioning {needle!r}, got {problems!r}")

    # The schemas refuse an unknown field and a wrong type.
    broken = yaml.safe_load(BROKEN_SCHEMA)
    expect("unknown field", schema_problems(broken, "self-test"), "replica")
    del broken["spec"]["replica"]
    if schema_problems(broken, "self-test"):
        failures.append(f"self-test: the valid StatefulSet is refused: {schema_problems(broken, 'self-test')}")
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "http"
    expect("containerPort as a string", schema_problems(broken, "self-test"), "containerPort")
    expect("a kind outside the core schemas", schema_problems(
        {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor", "metadata": {"name": "x"}},
        "self-test"), "ServiceMonitor")

    # Strategic merge as kustomize does it.
    base = {"spec": {"containers": [{"name": "a", "image": "1", "args": ["x"], "ports": [{"containerPort": 1, "name": "p"}]},
                                    {"name": "b", "image": "2"}],
                     "type": "LoadBalancer", "externalTrafficPolicy": "Local"}}
    merged = strategic_merge(base, {"spec": {"containers": [{"name": "a", "image": "9", "ports": [{"containerPort": 1, "name": "q"}]}],
                                             "externalTrafficPolicy": None}})
    if merged["spec"]["containers"] != [{"name": "a", "image": "9", "args": ["x"], "ports": [{"containerPort": 1, "name": "q"}]},
                                        {"name": "b", "image": "2"}] or "externalTrafficPolicy" in merged["spec"]:
        failures.append(f"self-test: strategic merge by name/containerPort and null removal gave {merged!r}")

    # The renderer refuses what it does not implement.
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "kustomization.yaml").write_text("resources: []\ncommonLabels: {a: b}\n")
        try:
            render(tmp)
            failures.append("self-test: a kustomization with commonLabels rendered")
        except RenderError as e:
            expect("kustomize outside the subset", [str(e)], "commonLabels")

    # The invariants, each broken once on the rendered base.
    secrets = secret_templates()
    good = render(KUBERNETES / "base")
    base_problems = check_rendered(good, secrets, "base")
    if base_problems:
        failures.append(f"self-test: the base itself has problems: {base_problems}")

    def broken_base(mutate):
        items = copy.deepcopy(good)
        objs = {(i.kind, i.name): i.obj for i in items}
        mutate(objs)
        return check_rendered(items, secrets, "self-test")

    def container(o):
        return o[("StatefulSet", "xmpp")]["spec"]["template"]["spec"]["containers"][0]

    def set_toml(o, old, new):
        cm = o[("ConfigMap", "xmpp-config")]["data"]
        assert old in cm["node.toml"], old
        cm["node.toml"] = cm["node.toml"].replace(old, new)

    cases = [
        ("grace period shorter than the drain", "terminationGracePeriodSeconds",
         lambda o: o[("StatefulSet", "xmpp")]["spec"]["template"]["spec"].update(terminationGracePeriodSeconds=20)),
        ("drain raised above the grace period", "shutdown_drain_secs 45",
         lambda o: set_toml(o, "shutdown_drain_secs = 25", "shutdown_drain_secs = 45")),
        ("peer Service hiding unready pods", "publishNotReadyAddresses",
         lambda o: o[("Service", "xmpp-peers")]["spec"].update(publishNotReadyAddresses=False)),
        ("readiness on /healthz", "readinessProbe must GET /readyz",
         lambda o: container(o)["readinessProbe"]["httpGet"].update(path="/healthz")),
        ("liveness on another port", "livenessProbe port",
         lambda o: container(o)["livenessProbe"]["httpGet"].update(port="https")),
        ("cluster port not declared", "binds port 5291",
         lambda o: container(o).update(ports=[p for p in container(o)["ports"] if p["containerPort"] != 5291])),
        ("c2s on loopback", "listener c2s",
         lambda o: set_toml(o, 'c2s = "0.0.0.0:5222"', 'c2s = "127.0.0.1:5222"')),
        ("POD_NAMESPACE not defined", "$(POD_NAMESPACE)",
         lambda o: container(o).update(env=[e for e in container(o)["env"] if e["name"] != "POD_NAMESPACE"])),
        ("PDB selecting other pods", "PodDisruptionBudget/xmpp: its selector",
         lambda o: o[("PodDisruptionBudget", "xmpp")]["spec"]["selector"].update(matchLabels={"app": "other"})),
        ("OrderedReady", "Parallel",
         lambda o: o[("StatefulSet", "xmpp")]["spec"].update(podManagementPolicy="OrderedReady")),
        ("data dir on the volume root", "volume's root",
         lambda o: container(o)["args"].__setitem__(container(o)["args"].index("/var/lib/xmpp/data"), "/var/lib/xmpp")),
        ("cluster key not in the Secret", "does not have",
         lambda o: container(o)["args"].__setitem__(container(o)["args"].index("/etc/xmpp/cluster-tls/tls.key"),
                                                    "/etc/xmpp/cluster-tls/node.key")),
        ("join list not starting at xmpp-0", "first --join",
         lambda o: container(o)["args"].__setitem__(container(o)["args"].index("--join") + 1,
                                                    "xmpp-1.xmpp-peers.$(POD_NAMESPACE).svc.cluster.local:5291")),
        ("externalTrafficPolicy on a ClusterIP Service", "externalTrafficPolicy",
         lambda o: o[("Service", "xmpp-c2s")]["spec"].update(type="ClusterIP")),
    ]
    for what, needle, mutate in cases:
        expect(what, broken_base(mutate), needle)

    dash = json.dumps({"panels": [{"id": 1, "title": "t", "type": "timeseries",
                                   "targets": [{"expr": "rate(xmpp_logins_totl[5m])"}]}]})
    expect("dashboard with a misspelt metric", dashboard_problems(dash, "self-test"), "xmpp_logins_totl")
    expect("Dockerfile running a shell", dockerfile_problems(
        "FROM a AS b\nFROM c\nRUN mkdir x\nUSER 10001\nEXPOSE 5222\n", {5222}, 10001, "self-test"), "RUN")
    return failures, 7 + len(cases) + 2


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--no-self-test", action="store_true", help="skip the checks of the checks")
    ap.add_argument("--print", metavar="DIR", help="print the rendered kustomization in DIR as YAML and stop")
    a = ap.parse_args()
    if a.print:
        try:
            items = render(a.print)
        except RenderError as e:
            print(e, file=sys.stderr)
            return 1
        print(yaml.safe_dump_all([i.obj for i in items], sort_keys=False), end="")
        return 0
    if not a.no_self_test:
        failures, n = self_test()
        if failures:
            print("\n".join(failures), file=sys.stderr)
            print(f"deploy/validate.py: its self-test failed ({len(failures)} of {n} broken inputs "
                  "were not refused)", file=sys.stderr)
            return 1
        print(f"self-test: {n} broken inputs, each refused")
    problems, n = check_everything()
    if problems:
        print("\n".join(problems), file=sys.stderr)
        print(f"deploy/validate.py: {len(problems)} problems", file=sys.stderr)
        return 1
    print(f"deploy/: {n} kustomizations rendered, every object valid for Kubernetes "
          f"{' and '.join(v.rsplit('.', 1)[0] for v in kubernetes_versions())}, invariants hold")
    return 0


if __name__ == "__main__":
    sys.exit(main())
