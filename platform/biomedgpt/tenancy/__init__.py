"""Who may use which data, storage prefix, queue and model: `cluster/tenants.yaml`.

One file describes everyone who shares the cluster. Institutions hold GPU quotas (per GPU type,
nominal / borrowable / lendable) and a Kubernetes namespace; their departments are the *teams* a job
spec names, spelled `<institution>-<department>` (`stanford-like-radiology`). A team has storage
prefixes (the only places it may write, and where it reads its own shards and models), dataset grants
(open datasets; credentialed ones only with a credential the team holds, such as `physionet`) and the
salted hashes of its serving API keys. Teams under `local.teams` (the demo's `demo`) exist only for
runs outside the cluster.

    tenants = load_tenants()                    # $BIOMEDGPT_TENANTS, ./cluster/tenants.yaml, or the repo's
    admit(load_spec("jobs/x.yaml"), tenants)    # raises AdmissionError naming file, team, subject, rule
    verify_api_key("stanford-like-radiology", key, tenants)

Admission is a policy check at the doors (`biomedgpt run`, `submit`, `k8s rayjob`): the hard
boundaries on the cluster are the namespace's RBAC, ResourceQuota and the storage credentials of the
namespace's ServiceAccount, all rendered from this same file.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import posixpath
import re
import secrets
import threading
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

import jsonschema
import yaml

from .quantity import parse_quantity
from .schema import SCHEMA

TENANTS_ENV = "BIOMEDGPT_TENANTS"
#: Set to 1 in every Ray pod the manifests describe: admission then refuses undeclared local paths.
ON_CLUSTER_ENV = "BIOMEDGPT_ON_CLUSTER"
JOB_KINDS = ("serve", "finetune", "evaluate", "pretrain")
REPO = Path(__file__).resolve().parents[3]


class TenancyError(ValueError):
    """tenants.yaml is malformed or inconsistent; the message names the file and the field path."""


class AdmissionError(ValueError):
    """A job spec asks for something its team may not use. The message names the spec file, the spec's
    field, the team, the dataset or storage location, and the rule."""

    def __init__(self, spec_file: str, team: str, subject: str, rule: str, tenants_file: str = "",
                 field: str = "") -> None:
        self.spec_file, self.team, self.subject, self.rule, self.field = spec_file, team, subject, rule, field
        where = f" (policy: {tenants_file})" if tenants_file else ""
        at = f"{field}: " if field else ""
        super().__init__(f"{spec_file}: {at}team {team!r} may not {subject}: {rule}{where}")


# ----------------------------------------------------------------------------------------------
# The model of the file
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limit:
    """Kueue quota of one resource: nominal, and how much may be borrowed / lent (None: unlimited)."""

    nominal: Fraction
    borrowing: Fraction | None = None
    lending: Fraction | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class GpuType:
    name: str
    gpus: int
    gpus_per_node: int
    node_labels: Mapping[str, str]
    cpus_per_gpu: int
    memory_per_gpu: str
    description: str = ""


@dataclass(frozen=True)
class Credential:
    name: str
    description: str
    datasets: tuple[str, ...]
    read_prefixes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Priority:
    name: str
    value: int
    kinds: tuple[str, ...]
    description: str = ""


@dataclass(frozen=True)
class ApiKey:
    id: str
    hash: str
    description: str = ""


@dataclass(frozen=True)
class Serving:
    """A department's RayService: the model registry it serves (the department's models in it,
    `<registry>/<team>/<name>/<version>/`), the GPU type of its model replicas and their bounds."""

    registry: str
    gpu_type: str
    min_replicas: int = 1
    max_replicas: int = 1


@dataclass(frozen=True)
class Team:
    """A department (or a local-only team): the `team` of a job spec."""

    name: str
    institution: str | None
    department: str
    storage: tuple[str, ...] = ()
    credentials: tuple[str, ...] = ()
    open_datasets: Literal["all"] | tuple[str, ...] = ()
    credentialed_datasets: tuple[str, ...] = ()
    serving: Serving | None = None
    api_keys: tuple[ApiKey, ...] = ()
    description: str = ""
    where: str = ""
    service_account_annotations: Mapping[str, str] = field(default_factory=dict)

    @property
    def local_only(self) -> bool:
        return self.institution is None

    @property
    def namespace(self) -> str | None:
        """The Kubernetes namespace of the team's institution (None for local-only teams)."""
        return self.institution

    @property
    def queue(self) -> str:
        """The team's Kueue LocalQueue (in the institution's namespace)."""
        return self.department

    @property
    def service_account(self) -> str:
        """The department's own ServiceAccount (in the institution's namespace): the principal its Ray pods,
        RayJobs and RayService run as, with the department's cloud identity."""
        return f"{self.department}-biomedgpt-ray"

    @property
    def api_keys_secret(self) -> str:
        """The Secret holding the department's serving key hashes, mounted into its RayService."""
        return f"{self.department}-biomedgpt-api-keys"


@dataclass(frozen=True)
class Institution:
    name: str
    display_name: str
    groups: tuple[str, ...]
    cpu: Limit
    memory: Limit
    gpus: Mapping[str, Limit]
    departments: Mapping[str, Team]
    fair_share_weight: float = 1.0
    ephemeral_storage: str = "4Ti"

    @property
    def namespace(self) -> str:
        return self.name


@dataclass(frozen=True)
class Egress:
    """Destinations outside the cluster's pods a NetworkPolicy lets Ray pods reach: CIDRs (minus `except`) on ports."""

    cidrs: tuple[str, ...]
    ports: tuple[int, ...]
    except_: tuple[str, ...] = ()


PRIVATE_RANGES = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "100.64.0.0/10")


@dataclass(frozen=True)
class Network:
    """What the tenant namespaces' NetworkPolicies allow besides a namespace's own Ray pods (`cluster.network`)."""

    dns_namespace: str = "kube-system"
    dns_pod_labels: Mapping[str, str] = field(default_factory=lambda: {"k8s-app": "kube-dns"})
    ingress_namespace: str = "ingress-nginx"
    operator_namespace: str = "kuberay-system"
    operator_pod_labels: Mapping[str, str] = field(
        default_factory=lambda: {"app.kubernetes.io/name": "kuberay-operator"})
    # S3-compatible storage outside the cluster: any public address on 443 (in-cluster ranges excluded)
    object_storage: Egress = Egress(("0.0.0.0/0",), (443,), PRIVATE_RANGES)
    api_server: Egress = Egress(("10.0.0.0/8",), (443, 6443))


@dataclass
class Tenants:
    path: Path
    cluster_name: str
    cohort: str
    image: str
    ray_version: str
    cpu_flavor: str
    cpus: Fraction
    memory: Fraction
    container_defaults: Mapping[str, str]
    gpu_types: dict[str, GpuType]
    shared_read_prefixes: tuple[str, ...]
    priorities: dict[str, Priority]
    credentials: dict[str, Credential]
    institutions: dict[str, Institution]
    local_any_path: bool
    local_teams: dict[str, Team]
    dataset_access: dict[str, str]
    datasets_dir: Path | None
    serving_spec: Path | None = None    # the serving spec every department's RayService runs (servingSpec)
    network: Network = field(default_factory=Network)
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def teams(self) -> dict[str, Team]:
        """Every team by name: departments (`<institution>-<department>`) and local-only teams."""
        out = {t.name: t for inst in self.institutions.values() for t in inst.departments.values()}
        out.update(self.local_teams)
        return out

    def team(self, name: str) -> Team:
        try:
            return self.teams[name]
        except KeyError:
            raise KeyError(f"{self.path}: no team {name!r}; teams: {', '.join(sorted(self.teams))}") from None

    def priority_for(self, kind: str) -> Priority:
        """The WorkloadPriorityClass a job of this kind runs with."""
        for p in self.priorities.values():
            if kind in p.kinds:
                return p
        raise KeyError(f"{self.path}: priorities: no class for job kind {kind!r}")

    def credentials_unlocking(self, dataset: str) -> list[str]:
        return sorted(c.name for c in self.credentials.values() if dataset in c.datasets)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def default_tenants_path() -> Path:
    """$BIOMEDGPT_TENANTS, else ./cluster/tenants.yaml, else the checkout's cluster/tenants.yaml."""
    if os.environ.get(TENANTS_ENV):
        return Path(os.environ[TENANTS_ENV])
    here = Path("cluster") / "tenants.yaml"
    if here.is_file():
        return here
    return REPO / "cluster" / "tenants.yaml"


def load_tenants(path: str | Path | None = None) -> Tenants:
    """Read, schema-validate and cross-check tenants.yaml (raises TenancyError naming file and field)."""
    p = Path(path) if path is not None else default_tenants_path()
    try:
        text = p.read_text()
    except OSError as err:
        raise TenancyError(f"{p}: cannot read tenants file: {err.strerror} (set ${TENANTS_ENV} to its path)") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as err:
        raise TenancyError(f"{p}: not valid YAML: {err}") from None
    return tenants_from_dict(data, p)


def _schema_errors(data: Any) -> list[str]:
    validator = jsonschema.Draft202012Validator(SCHEMA)
    out = []
    for err in sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.absolute_path))):
        where = ".".join(str(p) for p in err.absolute_path) or "top level"
        message = err.message
        if err.validator == "additionalProperties" and err.validator_value is False:
            message = message.replace("Additional properties are not allowed", "unknown key")
        out.append(f"{where}: {message}")
    return out


def tenants_from_dict(data: Any, path: str | Path = "<tenants>") -> Tenants:
    """Validate an already-parsed tenants document (see load_tenants)."""
    p = Path(path)
    errors = _schema_errors(data)
    if errors:
        raise TenancyError(f"{p}: {errors[0]}" + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""))

    def fail(where: str, message: str) -> TenancyError:
        return TenancyError(f"{p}: {where}: {message}")

    def limit(d: Mapping[str, Any], where: str) -> Limit:
        lim = Limit(parse_quantity(d["nominal"]),
                    parse_quantity(d["borrowingLimit"]) if "borrowingLimit" in d else None,
                    parse_quantity(d["lendingLimit"]) if "lendingLimit" in d else None, raw=d)
        if lim.lending is not None and lim.lending > lim.nominal:
            raise fail(f"{where}.lendingLimit", f"{d['lendingLimit']} exceeds the nominal quota {d['nominal']}")
        return lim

    c = data["cluster"]
    gpu_types = {name: GpuType(name, g["gpus"], g["gpusPerNode"], dict(g["nodeLabels"]), g["cpusPerGpu"],
                               str(g["memoryPerGpu"]), g.get("description", ""))
                 for name, g in c["gpuTypes"].items()}
    for g in gpu_types.values():
        parse_quantity(g.memory_per_gpu)
    credentials = {name: Credential(name, cr["description"], tuple(cr["datasets"]), tuple(cr.get("readPrefixes", ())))
                   for name, cr in data["credentials"].items()}
    datasets_dir = (p.parent / data["datasetSpecs"]).resolve() if "datasetSpecs" in data else None
    access = _dataset_access(datasets_dir) if datasets_dir else {}
    for name, cls in access.items():
        unlocking = [cr.name for cr in credentials.values() if name in cr.datasets]
        if cls == "open" and unlocking:
            raise fail(f"credentials.{unlocking[0]}.datasets", f"{name!r} is open in {datasets_dir}/{name}.yaml")

    priorities = {name: Priority(name, pr["value"], tuple(pr["kinds"]), pr.get("description", ""))
                  for name, pr in data["priorities"].items()}
    for kind in JOB_KINDS:
        holders = [pr.name for pr in priorities.values() if kind in pr.kinds]
        if len(holders) != 1:
            raise fail("priorities", f"job kind {kind!r} must map to exactly one class, got {holders or 'none'}")
    values = [pr.value for pr in priorities.values()]
    if len(set(values)) != len(values):
        raise fail("priorities", f"values must differ (Kueue orders by them), got {values}")

    def grants(d: Mapping[str, Any], where: str, held: tuple[str, ...]) -> tuple[Any, tuple[str, ...]]:
        open_ = d["open"] if d["open"] == "all" else tuple(d["open"])
        for name in () if open_ == "all" else open_:
            if any(name in cr.datasets for cr in credentials.values()):
                raise fail(f"{where}.open", f"{name!r} is credentialed (listed under credential "
                                            f"{[cr.name for cr in credentials.values() if name in cr.datasets]}); "
                                            "grant it under `credentialed`")
        cred = tuple(d.get("credentialed", ()))
        for name in cred:
            unlocking = [cr.name for cr in credentials.values() if name in cr.datasets]
            if not unlocking:
                raise fail(f"{where}.credentialed", f"{name!r} is listed under no credential in `credentials`")
            if not set(unlocking) & set(held):
                raise fail(f"{where}.credentialed", f"{name!r} needs credential {' or '.join(unlocking)!s}, "
                                                    f"which this team does not hold (credentials: {list(held)})")
        return open_, cred

    institutions: dict[str, Institution] = {}
    team_names: dict[str, str] = {}
    key_ids: dict[str, str] = {}
    identities: dict[tuple[str, str], str] = {}
    for iname, inst in data["institutions"].items():
        iwhere = f"institutions.{iname}"
        q = inst["quota"]
        gpus = {}
        for gname, gl in q["gpus"].items():
            if gname not in gpu_types:
                raise fail(f"{iwhere}.quota.gpus.{gname}", f"unknown GPU type; cluster.gpuTypes: {sorted(gpu_types)}")
            gpus[gname] = limit(gl, f"{iwhere}.quota.gpus.{gname}")
        departments = {}
        for dname, dep in inst["departments"].items():
            dwhere = f"{iwhere}.departments.{dname}"
            team = f"{iname}-{dname}"
            if len(team) > 63:
                raise fail(dwhere, f"team name {team!r} is longer than 63 characters")
            held = tuple(dep.get("credentials", ()))
            for cname in held:
                if cname not in credentials:
                    raise fail(f"{dwhere}.credentials", f"unknown credential {cname!r}; known: {sorted(credentials)}")
            open_, cred = grants(dep["datasets"], f"{dwhere}.datasets", held)
            serving = None
            if "serving" in dep:
                s = dep["serving"]
                serving = Serving(s["registry"], s["gpuType"], s.get("minReplicas", 1), s.get("maxReplicas", 1))
                if serving.gpu_type not in gpus:
                    raise fail(f"{dwhere}.serving.gpuType", f"{serving.gpu_type!r}: the institution has no quota "
                                                           f"for it (quota.gpus: {sorted(gpus)})")
                if serving.min_replicas > serving.max_replicas:
                    raise fail(f"{dwhere}.serving", "minReplicas exceeds maxReplicas")
                readable = list(dep["storage"]) + list(c.get("sharedReadPrefixes", ()))
                if not under(serving.registry, readable):
                    raise fail(f"{dwhere}.serving.registry", f"{serving.registry} is under none of the department's "
                                                            f"storage prefixes nor the shared read prefixes")
            keys = tuple(ApiKey(k["id"], k["hash"], k.get("description", "")) for k in dep.get("apiKeys", ()))
            for i, k in enumerate(keys):
                # a key names its id (`<key-id>.<secret>`): one id, one hash, whichever department it belongs to
                if k.id in key_ids:
                    raise fail(f"{dwhere}.apiKeys[{i}].id", f"{k.id!r} is also {key_ids[k.id]}: key ids must be "
                                                            "unique in the whole file")
                key_ids[k.id] = f"{dwhere}.apiKeys[{i}]"
            annotations = dict(dep.get("serviceAccountAnnotations", {}))
            for name, value in annotations.items():
                if (name, value) in identities:
                    raise fail(f"{dwhere}.serviceAccountAnnotations.{name}", f"{value!r} is also the identity of "
                               f"{identities[(name, value)]}: each department is its own principal")
                identities[(name, value)] = dwhere
            departments[dname] = Team(team, iname, dname, tuple(dep["storage"]), held, open_, cred, serving, keys,
                                      dep.get("description", ""), dwhere, annotations)
            if team in team_names:
                raise fail(dwhere, f"team name {team!r} is also {team_names[team]}")
            team_names[team] = dwhere
        institutions[iname] = Institution(iname, inst["displayName"], tuple(inst["groups"]),
                                          limit(q["cpu"], f"{iwhere}.quota.cpu"),
                                          limit(q["memory"], f"{iwhere}.quota.memory"), gpus, departments,
                                          float(inst.get("fairShareWeight", 1)),
                                          str(q.get("ephemeralStorage", "4Ti")))

    # The quota arithmetic: the nominal quotas share out exactly the cluster's inventory.
    cpus, memory = parse_quantity(c["cpu"]["cpus"]), parse_quantity(c["cpu"]["memory"])
    for what, total, got in (("cpus", cpus, sum((i.cpu.nominal for i in institutions.values()), Fraction(0))),
                             ("memory", memory, sum((i.memory.nominal for i in institutions.values()), Fraction(0)))):
        if got != total:
            raise fail(f"cluster.cpu.{what}", f"the institutions' nominal quotas add up to {_num(got)}, "
                                              f"not the inventory {c['cpu'][what]}")
    for g in gpu_types.values():
        got = sum((i.gpus[g.name].nominal for i in institutions.values() if g.name in i.gpus), Fraction(0))
        if got != g.gpus:
            raise fail(f"cluster.gpuTypes.{g.name}.gpus", f"the institutions' nominal quotas add up to {_num(got)} "
                                                          f"GPUs, not the inventory {g.gpus}")

    local = data.get("local", {"anyLocalPath": False})
    local_teams = {}
    for tname, t in local.get("teams", {}).items():
        where = f"local.teams.{tname}"
        if tname in team_names:
            raise fail(where, f"team name {tname!r} is also {team_names[tname]}")
        open_, cred = grants(t["datasets"], f"{where}.datasets", ())
        local_teams[tname] = Team(tname, None, tname, (), (), open_, cred, description=t.get("description", ""),
                                  where=where)

    # Prefixes are written plainly: admission refuses `..`, `.` and empty segments in locations, so a
    # prefix spelled with them would match nothing, or not what it says.
    declared = [("cluster.sharedReadPrefixes", pre) for pre in c.get("sharedReadPrefixes", ())]
    declared += [(f"credentials.{cr.name}.readPrefixes", pre) for cr in credentials.values() for pre in cr.read_prefixes]
    declared += [(f"{t.where}.storage", pre) for inst in institutions.values() for t in inst.departments.values()
                 for pre in t.storage]
    for where, pre in declared:
        problem = location_problem(pre)
        if problem:
            raise fail(where, f"{pre}: {problem}")

    # Prefixes of different teams must not nest, or one team could write into another's area.
    owners = [(pre, t.name) for inst in institutions.values() for t in inst.departments.values() for pre in t.storage]
    for i, (a, ta) in enumerate(owners):
        for b, tb in owners[i + 1:]:
            if ta != tb and (_norm(a).startswith(_norm(b)) or _norm(b).startswith(_norm(a))):
                raise fail("institutions", f"storage prefixes overlap: {a} ({ta}) and {b} ({tb})")

    serving_spec = (p.parent / data["servingSpec"]).resolve() if "servingSpec" in data else None
    serving_teams = [t.name for inst in institutions.values() for t in inst.departments.values() if t.serving]
    if serving_teams and serving_spec is None:
        raise fail("servingSpec", f"required when departments serve ({', '.join(serving_teams)}): the serving spec "
                                  "(jobs/serve/*.yaml) their RayServices run, relative to this file")

    net = c.get("network", {})
    default = Network()

    def egress(d: Mapping[str, Any] | None, fallback: Egress) -> Egress:
        if d is None:
            return fallback
        return Egress(tuple(d["cidrs"]), tuple(d["ports"]), tuple(d.get("except", ())))

    network = Network(net.get("dnsNamespace", default.dns_namespace),
                      dict(net.get("dnsPodLabels", default.dns_pod_labels)),
                      net.get("ingressNamespace", default.ingress_namespace),
                      net.get("operatorNamespace", default.operator_namespace),
                      dict(net.get("operatorPodLabels", default.operator_pod_labels)),
                      egress(net.get("objectStorage"), default.object_storage),
                      egress(net.get("apiServer"), default.api_server))
    for iname in institutions:
        if iname in (network.ingress_namespace, network.operator_namespace, network.dns_namespace):
            raise fail(f"institutions.{iname}", "an institution's namespace may not be the ingress, operator or DNS "
                                                "namespace of cluster.network")

    return Tenants(
        path=p, cluster_name=c["name"], cohort=c["cohort"], image=c["image"], ray_version=c["rayVersion"],
        cpu_flavor=c["cpu"]["flavor"], cpus=cpus, memory=memory,
        container_defaults={k: str(v) for k, v in c.get("containerDefaults", {"cpu": "500m", "memory": "1Gi"}).items()},
        gpu_types=gpu_types, shared_read_prefixes=tuple(c.get("sharedReadPrefixes", ())), priorities=priorities,
        credentials=credentials, institutions=institutions, local_any_path=bool(local["anyLocalPath"]),
        local_teams=local_teams, dataset_access=access, datasets_dir=datasets_dir,
        serving_spec=serving_spec, network=network, raw=data)


def _num(x: Fraction) -> str:
    return str(x.numerator) if x.denominator == 1 else str(float(x))


def _dataset_access(directory: Path) -> dict[str, str]:
    """Access class (open | credentialed) of every datasets_spec/*.yaml, read from the `access` key only."""
    out = {}
    for f in sorted(directory.glob("*.yaml")):
        try:
            d = yaml.safe_load(f.read_text())
        except (OSError, yaml.YAMLError) as err:
            raise TenancyError(f"{f}: cannot read the dataset's access class: {err}") from None
        if isinstance(d, dict) and d.get("access") in ("open", "credentialed"):
            out[str(d.get("name", f.stem))] = d["access"]
    return out


# ----------------------------------------------------------------------------------------------
# Storage locations
# ----------------------------------------------------------------------------------------------

_SCHEME = re.compile(r"^([a-z][a-z0-9+.-]*)://(.*)$", re.I)
#: A dataset or split name: one path segment (it becomes `<shards>/<dataset>/<split>`), never `.` or `..`.
PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def location_problem(location: str) -> str | None:
    """Why `location` cannot be admitted wherever it points, or None.

    Path segments `..` and `.` and empty segments (`a//b`) are refused outright, not normalised: an
    object store keeps them as literal parts of a key while a local filesystem resolves them, so no
    normal form means the same place to both (`s3://bucket/pathology/../radiology` is a key under
    `pathology/` to s3fs, and `radiology/` to a path resolver). One trailing `/` is fine. A `file://` URL
    names an absolute path of this machine (`file:///abs/path`): a host part is refused, because the
    storage layer would drop it."""
    if not location:
        return "the location is empty"
    m = _SCHEME.match(location)
    if m:
        scheme, rest = m.group(1).lower(), m.group(2)
        if scheme == "file":
            if not rest.startswith("/"):
                return ("a file:// URL names an absolute path on this machine and has no host: write "
                        f"file:///{rest.lstrip('/')} or the plain path")
            path = rest[1:]
        else:
            bucket, _, path = rest.partition("/")
            if not bucket:
                return f"a {scheme}:// URL names its bucket first ({scheme}://BUCKET/key); this one names none"
    else:
        path = location[1:] if location.startswith("/") else location
    if not path:
        return None
    segments = path.split("/")
    if segments[-1] == "":
        segments = segments[:-1]  # one trailing slash
    for seg in segments:
        if seg in ("", ".", ".."):
            shown = "an empty segment ('//')" if seg == "" else f"the segment {seg!r}"
            return (f"{shown} is refused in storage locations: object storage keeps '..', '.' and empty segments "
                    "as part of the key while local paths resolve them, so the location names no single place; "
                    "write the path without them")
    return None


def _norm(location: str) -> str:
    """A comparable form of a location, ending with "/": `s3://bucket/a/b/`, `/abs/path/`. A local path is
    made absolute and resolved with realpath (symlinks followed), so where it really leads is compared."""
    m = _SCHEME.match(location)
    if m and m.group(1).lower() != "file":
        scheme, rest = m.group(1).lower(), m.group(2)
        bucket, _, key = rest.partition("/")
        key = posixpath.normpath("/" + key).lstrip("/")
        return f"{scheme}://{bucket}/{key + '/' if key else ''}"
    path = m.group(2) if m else location
    path = os.path.realpath(os.path.expanduser(path))
    return path.rstrip("/") + "/"


def is_local_location(location: str) -> bool:
    m = _SCHEME.match(location)
    return m is None or m.group(1).lower() == "file"


def under(location: str, prefixes: Iterable[str]) -> str | None:
    """The first prefix that contains location, or None."""
    loc = _norm(location)
    for pre in prefixes:
        if loc.startswith(_norm(pre)):
            return pre
    return None


# ----------------------------------------------------------------------------------------------
# Admission
# ----------------------------------------------------------------------------------------------


def on_cluster_from_env() -> bool:
    return os.environ.get(ON_CLUSTER_ENV, "").strip().lower() in ("1", "true", "yes")


#: Variables that change what admission decides: the policy file, and whether local paths are judged as
#: the cluster's. The cluster sets its own; `biomedgpt submit` refuses to forward them (biomedgpt.submit),
#: so a job is admitted where it runs by the cluster's policy only.
ADMISSION_ENV = (TENANTS_ENV, ON_CLUSTER_ENV)


def admit(spec: Any, tenants: Tenants, *, on_cluster: bool | None = None) -> None:
    """Refuse (AdmissionError) a job spec whose team may not read one of its datasets, or may not read or
    write one of the locations the job opens (`spec.locations()`: the run directory under
    `output.storage`, `model.init`, the tokenizer's files, `data.shards`, every split's folder, every
    `data.build` source and the shards it writes). Datasets the spec builds (`data.build`) are admitted
    like the ones it trains on: a team cannot copy a dataset it may not read into its own prefix.

    Every location is refused outright when it has `..`, `.` or empty path segments (location_problem);
    a local one is compared after realpath, so a symlink cannot lead out of a prefix. Split names are
    single path segments.

    `on_cluster` (default: $BIOMEDGPT_ON_CLUSTER, which the cluster's Ray pods set): on the cluster,
    local paths are allowed only under a team's declared prefixes; outside it, any local path is
    allowed when tenants.yaml says `local.anyLocalPath: true`.
    """
    on_cluster = on_cluster_from_env() if on_cluster is None else on_cluster
    src, policy = getattr(spec, "source", "<spec>"), str(tenants.path)

    def refuse(field: str, subject: str, rule: str) -> AdmissionError:
        return AdmissionError(src, spec.team, subject, rule, policy, field)

    team = tenants.teams.get(spec.team)
    if team is None:
        raise refuse("team", "run jobs", "the team is not a department in tenants.yaml (teams are named "
                                         f"<institution>-<department>: {', '.join(sorted(tenants.teams))})")
    if team.local_only and on_cluster:
        raise refuse("team", "run on the cluster", f"{team.name!r} is a local-only team ({team.where}); name a "
                                                   "department")

    data = getattr(spec, "data", None)
    if data is not None:
        seen = set()
        refs = [(f"data.{side}[{i}]", ref) for side in ("train", "eval") for i, ref in enumerate(getattr(data, side))]
        named = [(f"{where}.dataset", ref.dataset) for where, ref in refs]
        named += [(f"data.build.{name}", name) for name in data.build]
        for field_, dataset in named:
            if not PLAIN_NAME.match(dataset):
                raise refuse(field_, f"read dataset {dataset!r}", "a dataset is named by one path segment "
                                                                  "(letters, digits, '_', '.', '-'), not a path")
            if dataset not in seen:
                seen.add(dataset)
                _admit_dataset(team, dataset, tenants, lambda subject, rule, f=field_: refuse(f, subject, rule))
        for where, ref in refs:
            if not PLAIN_NAME.match(ref.split):
                raise refuse(f"{where}.split", f"read split {ref.split!r} of {ref.dataset}",
                             "a split is named by one path segment (letters, digits, '_', '.', '-'; e.g. train, "
                             "val, test), not a path: its shards are <data.shards>/<dataset>/<split>/")
    for loc in spec.locations():
        _admit_location(team, loc, tenants, on_cluster, refuse)


def _admit_dataset(team: Team, dataset: str, tenants: Tenants, refuse) -> None:
    access = tenants.dataset_access.get(dataset)
    unlocking = tenants.credentials_unlocking(dataset)
    subject = f"read dataset {dataset!r}"
    if access is None and not unlocking:
        raise refuse(subject, "it is not described in datasets_spec/ nor listed under a credential, so its access "
                              "class is unknown")
    if access == "credentialed" or unlocking:
        if not unlocking:
            raise refuse(subject, "it is credentialed and no credential in tenants.yaml unlocks it")
        if not set(unlocking) & set(team.credentials):
            raise refuse(subject, f"credentialed datasets need a credential the team holds: {dataset} needs "
                                  f"{' or '.join(unlocking)}, the team holds {list(team.credentials) or 'none'}")
        if dataset not in team.credentialed_datasets:
            raise refuse(subject, f"credentialed dataset not granted to the team ({team.where}.datasets.credentialed: "
                                  f"{list(team.credentialed_datasets)})")
        return
    if team.open_datasets != "all" and dataset not in team.open_datasets:
        raise refuse(subject, f"open dataset not granted to the team ({team.where}.datasets.open: "
                              f"{list(team.open_datasets)})")


def _admit_location(team: Team, loc: Any, tenants: Tenants, on_cluster: bool, refuse) -> None:
    """`loc`: a spec's Location (`field`, `url`, `mode` read | write, `what`)."""
    location, mode = loc.url, loc.mode
    subject = f"{mode} {location} ({loc.what})"
    problem = location_problem(location)
    if problem:
        raise refuse(loc.field, subject, problem)
    prefixes = list(team.storage)
    if mode == "read":
        prefixes += list(tenants.shared_read_prefixes)
        for cname in team.credentials:
            prefixes += list(tenants.credentials[cname].read_prefixes)
    if under(location, prefixes):
        return
    local = is_local_location(location)
    if local:
        real = _norm(location).rstrip("/") or "/"
        plain = os.path.normpath(os.path.abspath(os.path.expanduser(_SCHEME.sub(r"\2", location))))
        if real != plain:
            subject = f"{mode} {location} ({loc.what}; it resolves to {real})"
        if on_cluster:
            raise refuse(loc.field, subject, "on the cluster a local path is allowed only under one of the team's "
                                             f"storage prefixes ({', '.join(prefixes) or 'none'}), compared after "
                                             "symlinks are resolved")
        if tenants.local_any_path:
            return
        raise refuse(loc.field, subject, "tenants.yaml does not allow local paths (local.anyLocalPath is false) and "
                                         f"the path is under none of the team's prefixes ({', '.join(prefixes) or 'none'})")
    rule = (f"a team may {mode} only under its storage prefixes" + (", the shared read prefixes and its "
            "credentials' prefixes" if mode == "read" else "") + f": {', '.join(prefixes) or 'none'}")
    raise refuse(loc.field, subject, rule)


# ----------------------------------------------------------------------------------------------
# Serving API keys
# ----------------------------------------------------------------------------------------------

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
MIN_SECRET_CHARS = 20
KEY_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_HASH = re.compile(r"^scrypt\$n=(\d+),r=(\d+),p=(\d+)\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)$")
#: Keys whose secret matched: (stored hash, sha256 of the presented secret). Only successes are kept, so the
#: cache holds at most one entry per stored key and wrong guesses can never push a valid key out of it.
_valid: set[tuple[str, bytes]] = set()
_valid_lock = threading.Lock()


def new_api_key(key_id: str) -> str:
    """A fresh API key `<key-id>.<secret>` (the secret: 43 URL-safe characters, 256 bits, never a dot)."""
    if not KEY_ID_PATTERN.match(key_id or ""):
        raise ValueError(f"key id {key_id!r}: lower-case letters, digits, '-' or '_' (at most 63, no dot)")
    return f"{key_id}.{secrets.token_urlsafe(32)}"


def parse_api_key(key: Any) -> tuple[str, str] | None:
    """(key id, secret) of `<key-id>.<secret>`, or None when the key does not have that form."""
    if not isinstance(key, str):
        return None
    key_id, dot, secret = key.partition(".")
    if not dot or not KEY_ID_PATTERN.match(key_id) or len(secret) < MIN_SECRET_CHARS or len(secret) > 256:
        return None
    return key_id, secret


def hash_api_key(key: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P, salt: bytes | None = None) -> str:
    """`scrypt$n=..,r=..,p=..$<salt>$<digest>` (base64) of an API key's secret, with a fresh 16-byte salt: the
    form tenants.yaml stores under the key's id. `key` is `<key-id>.<secret>` (or the secret alone); secrets
    shorter than 20 characters are refused."""
    parsed = parse_api_key(key)
    secret = parsed[1] if parsed else key
    if len(secret) < MIN_SECRET_CHARS or "." in secret:
        raise ValueError(f"API keys are <key-id>.<secret> with a secret of at least {MIN_SECRET_CHARS} characters "
                         "(use new_api_key(key_id))")
    salt = os.urandom(16) if salt is None else salt
    digest = hashlib.scrypt(secret.encode(), salt=salt, n=n, r=r, p=p, dklen=32, maxmem=128 * r * (n + p + 2))
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return f"scrypt$n={n},r={r},p={p}${b64(salt)}${b64(digest)}"


def secret_matches(stored: str, secret: str) -> bool:
    """One scrypt of `secret` against a stored hash (none when this very secret matched it before)."""
    m = _HASH.match(stored)
    if not m:
        return False
    fingerprint = hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()
    with _valid_lock:
        if (stored, fingerprint) in _valid:
            return True
    n, r, p = (int(m.group(i)) for i in (1, 2, 3))
    salt, digest = base64.b64decode(m.group(4)), base64.b64decode(m.group(5))
    got = hashlib.scrypt(secret.encode("utf-8", "surrogatepass"), salt=salt, n=n, r=r, p=p, dklen=len(digest),
                         maxmem=128 * r * (n + p + 2))
    ok = hmac.compare_digest(got, digest)
    if ok:
        with _valid_lock:
            _valid.add((stored, fingerprint))
    return ok


def verify_api_key(department: str, key: str, tenants: Tenants) -> bool:
    """True when `key` (`<key-id>.<secret>`) is one of the team's serving API keys (team named as in job specs,
    `<institution>-<department>`): the key's id picks the one stored hash to check, so this costs one scrypt
    at most. Unknown teams, unknown ids and malformed keys are simply False, without any scrypt."""
    team = tenants.teams.get(department)
    parsed = parse_api_key(key)
    if team is None or parsed is None:
        return False
    key_id, secret = parsed
    stored = next((k.hash for k in team.api_keys if k.id == key_id), None)
    return stored is not None and secret_matches(stored, secret)


# ----------------------------------------------------------------------------------------------
# Who may be served a model: its training data
# ----------------------------------------------------------------------------------------------


def model_data_refusal(department: str | None, train_data: Iterable[str], tenants: Tenants) -> str | None:
    """Why `department` may not be served a model trained on `train_data` (`training.json`'s `train_data`,
    `<dataset>/<split>` entries), or None when it may. A model trained on a credentialed dataset carries
    that data's agreement: it is served only to a department granted the dataset and holding a credential
    that unlocks it (the rule admission applies to reading the data). A dataset whose access class
    tenants.yaml and datasets_spec/ do not know is refused too; `department` None is a caller without a
    department (serving without API keys), who may be served models of open data only."""
    team = tenants.teams.get(department) if department else None
    for item in dict.fromkeys(str(d).partition("/")[0] for d in train_data):
        unlocking = tenants.credentials_unlocking(item)
        access = tenants.dataset_access.get(item)
        if access is None and not unlocking:
            return (f"it was trained on {item!r}, whose access class neither datasets_spec/ nor the credentials of "
                    f"{tenants.path} know")
        if access == "credentialed" or unlocking:
            if team is None:
                return (f"it was trained on the credentialed dataset {item!r} ({' or '.join(unlocking) or 'no'} "
                        "credential), served only to departments granted it; this caller has no department")
            if item not in team.credentialed_datasets or not set(unlocking) & set(team.credentials):
                return (f"it was trained on the credentialed dataset {item!r}, and department {team.name!r} is not "
                        f"granted it ({team.where}.datasets.credentialed: {list(team.credentialed_datasets)}, "
                        f"credentials: {list(team.credentials)})")
    return None
