"""Offline validation of Kubernetes manifests, as strict as `kubectl apply --validate=strict`.

- Core kinds (Namespace, ResourceQuota, RBAC, ConfigMap, ...): `kubernetes-validate` with its strict
  schemas (unknown fields are errors).
- KubeRay and Kueue kinds: the `openAPIV3Schema` of their CustomResourceDefinitions (shared/schemas/crds)
  through jsonschema, made strict the way the API server's field validation is: an object that declares
  `properties` admits no other key (unless `x-kubernetes-preserve-unknown-fields`). Before that the
  schema's defaults are applied, as the API server does; then the CRDs' CEL rules
  (`x-kubernetes-validations`, creation rules only) are evaluated with cel-python, list-type map/set
  entries are checked for duplicates, and the object's metadata is checked against ObjectMeta.
- What the operators' webhooks and Kueue's integration add on top (name lengths, a Kueue-managed RayJob
  must shut down after it finishes and may not autoscale, ...).
- `check_references` then follows names between objects: queue labels to LocalQueues, LocalQueues to
  ClusterQueues, ClusterQueues to ResourceFlavors, priority labels to WorkloadPriorityClasses,
  ServiceAccounts and Roles.

Every problem is one line naming the source, the object (kind/namespace/name), the field path and
what is wrong.

This is operator tooling, not part of the runtime install: kubernetes-validate and cel-python come with
the dev extras (`pip install -e '.[dev]'`, as `make install` does; `missing_tooling()` names what is
absent), and `kubectl` with the Debian packages in .ci/apt-packages.txt.
"""

from __future__ import annotations

import copy
import importlib.resources
import importlib.util
import json
import lzma
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import jsonschema
import yaml
from referencing import Registry, Resource

#: The dev-extra packages the validation needs, by module name (see the module docstring).
TOOLING = {"kubernetes_validate": "kubernetes-validate", "celpy": "cel-python"}
KUBERNETES_VERSION = "1.32"  # Debian's kubectl 1.32; the oldest API the manifests must suit
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
ELASTIC_ANNOTATION = "kueue.x-k8s.io/elastic-job"
# KubeRay appends suffixes to derived names (ray-operator utils: MaxRayClusterNameLength and friends).
NAME_LIMITS = {"RayCluster": 53, "RayJob": 47, "RayService": 47}
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


class ManifestError(ValueError):
    """Manifests that do not validate; the message lists every problem, one per line."""


def ident(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    ns = f"{meta['namespace']}/" if meta.get("namespace") else ""
    return f"{obj.get('kind', '?')} {ns}{meta.get('name', '?')}"


def _path(parts: Iterable[Any]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def load_documents(text: str) -> list[dict[str, Any]]:
    """The non-empty documents of a YAML stream (libyaml's parser when present: the CRDs are megabytes)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return [d for d in yaml.load_all(text, Loader=loader) if d]


# ----------------------------------------------------------------------------------------------
# CRD schemas
# ----------------------------------------------------------------------------------------------


def strict_schema(schema: Any, *, root: bool = True) -> Any:
    """A copy of a structural schema in which every object that declares properties is closed, and
    `nullable` becomes a null type. The root `metadata` is left open (checked against ObjectMeta)."""
    if isinstance(schema, list):
        return [strict_schema(s, root=False) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict_schema(v, root=False) if k not in ("properties", "default", "enum", "example") else v
           for k, v in schema.items()}
    if "properties" in schema:
        out["properties"] = {k: strict_schema(v, root=False) for k, v in schema["properties"].items()}
        if root and "metadata" in out["properties"]:
            out["properties"]["metadata"] = {"type": "object"}
    open_ = schema.get("x-kubernetes-preserve-unknown-fields") or schema.get("x-kubernetes-embedded-resource")
    if schema.get("type") == "object" and "additionalProperties" not in schema and not open_:
        if "properties" in schema or not root:
            out["additionalProperties"] = False
    if schema.get("nullable") and isinstance(schema.get("type"), str):
        out["type"] = [schema["type"], "null"]
    return out


def apply_defaults(value: Any, schema: dict[str, Any]) -> Any:
    """Fill in the schema's `default`s the way the API server does before validation (in place)."""
    if isinstance(value, dict) and isinstance(schema, dict):
        for key, sub in schema.get("properties", {}).items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                apply_defaults(value[key], sub)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key in value:
                if key not in schema.get("properties", {}):
                    apply_defaults(value[key], extra)
    elif isinstance(value, list) and isinstance(schema, dict) and isinstance(schema.get("items"), dict):
        for item in value:
            apply_defaults(item, schema["items"])
    return value


def walk(value: Any, schema: dict[str, Any], path: tuple, visit: Callable[[Any, dict, tuple], None]) -> None:
    """Call visit(value, schema, path) on every instance node together with its schema node."""
    if not isinstance(schema, dict):
        return
    visit(value, schema, path)
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, sub in value.items():
            if key in props:
                walk(sub, props[key], path + (key,), visit)
            elif isinstance(extra, dict):
                walk(sub, extra, path + (key,), visit)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            walk(item, schema["items"], path + (i,), visit)


@dataclass
class CrdVersion:
    group: str
    version: str
    kind: str
    scope: str
    schema: dict[str, Any]
    validator: Any


_crd_cache: dict[tuple, dict[tuple[str, str], CrdVersion]] = {}


def load_crds(crd_dir: Path) -> dict[tuple[str, str], CrdVersion]:
    """Every served version of every CRD in crd_dir, by (apiVersion, kind). Parsed once per process
    while the files are unchanged (the KubeRay CRDs are 3 MB of YAML)."""
    out: dict[tuple[str, str], CrdVersion] = {}
    files = sorted([*Path(crd_dir).glob("*.yaml"), *Path(crd_dir).glob("*.yaml.xz")])
    if not files:
        raise FileNotFoundError(f"{crd_dir}: no CustomResourceDefinition files (*.yaml, *.yaml.xz)")
    key = tuple((str(f.resolve()), f.stat().st_mtime_ns, f.stat().st_size) for f in files)
    if key in _crd_cache:
        return _crd_cache[key]
    _crd_cache[key] = out
    for f in files:
        text = lzma.decompress(f.read_bytes()).decode() if f.suffix == ".xz" else f.read_text()
        for crd in load_documents(text):
            if crd.get("kind") != "CustomResourceDefinition":
                continue
            spec = crd["spec"]
            for v in spec["versions"]:
                if not v.get("served", True):
                    continue
                schema = v["schema"]["openAPIV3Schema"]
                strict = strict_schema(schema)
                out[(f"{spec['group']}/{v['name']}", spec["names"]["kind"])] = CrdVersion(
                    spec["group"], v["name"], spec["names"]["kind"], spec.get("scope", "Namespaced"), schema,
                    jsonschema.Draft202012Validator(strict))
    return out


# ----------------------------------------------------------------------------------------------
# CEL rules
# ----------------------------------------------------------------------------------------------

_cel_env = None
_cel_programs: dict[str, Any] = {}


def _cel_program(rule: str):
    global _cel_env
    import celpy  # a dev extra (see the module docstring): only validation needs it

    if _cel_env is None:
        _cel_env = celpy.Environment()
    if rule not in _cel_programs:
        _cel_programs[rule] = _cel_env.program(_cel_env.compile(rule))
    return _cel_programs[rule]


def cel_problems(obj: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    """Evaluate the creation-time CEL rules of the schema on obj (transition rules need an old object)."""
    import celpy  # a dev extra (see the module docstring): only validation needs it

    problems: list[str] = []

    def visit(value: Any, node: dict, path: tuple) -> None:
        for rule in node.get("x-kubernetes-validations", ()):
            expr = rule["rule"]
            if re.search(r"\boldSelf\b", expr):
                continue
            try:
                ok = _cel_program(expr).evaluate({"self": celpy.json_to_cel(value)})
            except Exception as err:  # noqa: BLE001 (an evaluation error fails the rule, as in the API server)
                problems.append(f"{_path(path)}: rule {expr!r} could not be evaluated: {err}")
                continue
            if isinstance(ok, Exception) or not bool(ok):
                message = rule.get("message") or f"failed rule: {expr}"
                problems.append(f"{_path(path)}: {message}")

    walk(obj, schema, (), visit)
    return problems


def list_type_problems(obj: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    """Duplicate entries in `x-kubernetes-list-type: map` (by key) and `set` lists, which the API server refuses."""
    problems: list[str] = []

    def visit(value: Any, node: dict, path: tuple) -> None:
        if not isinstance(value, list):
            return
        kind = node.get("x-kubernetes-list-type")
        if kind == "map":
            keys = node.get("x-kubernetes-list-map-keys", [])
            seen = set()
            for item in value:
                k = tuple(item.get(x) for x in keys) if isinstance(item, dict) else (item,)
                if k in seen:
                    problems.append(f"{_path(path)}: duplicate entry with {dict(zip(keys, k))}")
                seen.add(k)
        elif kind == "set":
            seen_items = []
            for item in value:
                if item in seen_items:
                    problems.append(f"{_path(path)}: duplicate entry {item!r} in a set")
                seen_items.append(item)

    walk(obj, schema, (), visit)
    return problems


# ----------------------------------------------------------------------------------------------
# What the operators add
# ----------------------------------------------------------------------------------------------


def _ray_cluster_spec_problems(spec: dict[str, Any], where: str, *, kueue: bool, elastic: bool,
                               max_groups: int = 7) -> list[str]:
    out = []
    head = (spec.get("headGroupSpec") or {}).get("template", {}).get("spec", {})
    if not head.get("containers"):
        out.append(f"{where}.headGroupSpec.template.spec.containers: at least one container")
    autoscaling = bool(spec.get("enableInTreeAutoscaling"))
    v2 = autoscaling and (spec.get("autoscalerOptions") or {}).get("version") == "v2"
    if v2 and head.get("restartPolicy") not in (None, "", "Never"):
        out.append(f"{where}.headGroupSpec.template.spec.restartPolicy: must be Never or unset with autoscaler v2")
    names = set()
    groups = spec.get("workerGroupSpecs") or []
    for i, g in enumerate(groups):
        gw = f"{where}.workerGroupSpecs[{i}]"
        gspec = (g.get("template") or {}).get("spec", {})
        if not gspec.get("containers"):
            out.append(f"{gw}.template.spec.containers: at least one container")
        if g.get("groupName") in names:
            out.append(f"{gw}.groupName: {g.get('groupName')!r} used twice")
        names.add(g.get("groupName"))
        lo, hi = g.get("minReplicas", 0), g.get("maxReplicas", 2**31 - 1)
        if lo > hi:
            out.append(f"{gw}: minReplicas {lo} exceeds maxReplicas {hi}")
        if "replicas" in g and not lo <= g["replicas"] <= hi:
            out.append(f"{gw}.replicas: {g['replicas']} is outside [minReplicas {lo}, maxReplicas {hi}]")
        if v2 and gspec.get("restartPolicy") not in (None, "", "Never"):
            out.append(f"{gw}.template.spec.restartPolicy: must be Never or unset with autoscaler v2")
    if kueue:
        if len(groups) > max_groups:
            out.append(f"{where}.workerGroupSpecs: Kueue admits at most 8 pod sets, so at most {max_groups} worker groups")
        if autoscaling and not elastic:
            out.append(f"{where}.enableInTreeAutoscaling: Kueue admits an autoscaling Ray cluster only as an elastic "
                       f"job (annotation {ELASTIC_ANNOTATION}: \"true\")")
    return out


def operator_problems(obj: dict[str, Any]) -> list[str]:
    """Rules of the KubeRay operator's validation and of Kueue's Ray integration."""
    kind = obj.get("kind")
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    name = meta.get("name", "")
    kueue = QUEUE_LABEL in (meta.get("labels") or {})
    elastic = (meta.get("annotations") or {}).get(ELASTIC_ANNOTATION) == "true"
    out = []
    if kind in NAME_LIMITS:
        if len(name) > NAME_LIMITS[kind]:
            out.append(f"metadata.name: {kind} names may have at most {NAME_LIMITS[kind]} characters "
                       f"(KubeRay appends suffixes), got {len(name)}")
        if not DNS1035_LABEL.match(name):
            out.append(f"metadata.name: {name!r} is not a DNS-1035 label (lower-case letters, digits, '-', "
                       "starting with a letter)")
    if kind == "RayCluster":
        out += _ray_cluster_spec_problems(spec, "spec", kueue=kueue, elastic=elastic)
    elif kind == "RayService":
        cluster = spec.get("rayClusterConfig") or {}
        out += _ray_cluster_spec_problems(cluster, "spec.rayClusterConfig", kueue=kueue, elastic=elastic)
        if ((cluster.get("headGroupSpec") or {}).get("headService") or {}).get("metadata", {}).get("name"):
            out.append("spec.rayClusterConfig.headGroupSpec.headService.metadata.name: must not be set")
        try:
            serve = yaml.safe_load(spec.get("serveConfigV2") or "")
        except yaml.YAMLError as err:
            serve = None
            out.append(f"spec.serveConfigV2: not valid YAML: {err}")
        if serve is not None:
            apps = serve.get("applications") if isinstance(serve, dict) else None
            if not apps or not all(isinstance(a, dict) and a.get("import_path") for a in apps):
                out.append("spec.serveConfigV2: needs `applications`, each with an import_path")
    elif kind == "RayJob":
        shutdown = bool(spec.get("shutdownAfterJobFinishes"))
        if spec.get("suspend") and not shutdown:
            out.append("spec.suspend: a RayJob that does not shut down after it finishes cannot be suspended")
        if spec.get("ttlSecondsAfterFinished", 0) > 0 and not shutdown:
            out.append("spec.ttlSecondsAfterFinished: needs shutdownAfterJobFinishes: true")
        if not spec.get("rayClusterSpec") and not spec.get("clusterSelector"):
            out.append("spec: one of rayClusterSpec or clusterSelector must be set")
        if "activeDeadlineSeconds" in spec and spec["activeDeadlineSeconds"] <= 0:
            out.append("spec.activeDeadlineSeconds: must be positive")
        if spec.get("backoffLimit", 0) < 0:
            out.append("spec.backoffLimit: must not be negative")
        try:
            env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}")
            if not isinstance(env, dict):
                out.append("spec.runtimeEnvYAML: must be a YAML mapping")
        except yaml.YAMLError as err:
            out.append(f"spec.runtimeEnvYAML: not valid YAML: {err}")
        if spec.get("rayClusterSpec"):
            out += _ray_cluster_spec_problems(spec["rayClusterSpec"], "spec.rayClusterSpec", kueue=kueue,
                                              elastic=False)
        if kueue:
            if not shutdown:
                out.append("spec.shutdownAfterJobFinishes: Kueue manages only RayJobs that delete their cluster "
                           "when they finish (set it to true)")
            if spec.get("clusterSelector"):
                out.append("spec.clusterSelector: a Kueue-managed RayJob cannot use an existing RayCluster")
    return out


def metadata_problems(obj: dict[str, Any], crd: CrdVersion | None) -> list[str]:
    meta = obj.get("metadata")
    if not isinstance(meta, dict) or not meta.get("name"):
        return ["metadata.name: required"]
    out = []
    name = meta["name"]
    if not DNS1123_SUBDOMAIN.match(name) or len(name) > 253:
        out.append(f"metadata.name: {name!r} is not a DNS-1123 subdomain")
    if obj.get("kind") == "Namespace" and (not DNS1123_LABEL.match(name) or len(name) > 63):
        out.append(f"metadata.name: namespace {name!r} is not a DNS-1123 label")
    for key, value in (meta.get("labels") or {}).items():
        prefix, _, lname = str(key).rpartition("/")
        if (prefix and (not DNS1123_SUBDOMAIN.match(prefix) or len(prefix) > 253)) or not LABEL_NAME.match(lname) \
                or len(lname) > 63:
            out.append(f"metadata.labels: {key!r} is not a valid label key")
        if not isinstance(value, str) or not LABEL_VALUE.match(value) or len(value) > 63:
            out.append(f"metadata.labels.{key}: {value!r} is not a valid label value")
    if crd is not None:
        if crd.scope == "Cluster" and meta.get("namespace"):
            out.append(f"metadata.namespace: {obj['kind']} is cluster-scoped")
    return out


# ----------------------------------------------------------------------------------------------
# The validator
# ----------------------------------------------------------------------------------------------


class ManifestValidator:
    """Validates objects against core schemas (kubernetes-validate) and CRDs (a folder of CRD YAML)."""

    def __init__(self, crd_dir: str | Path, kubernetes_version: str = KUBERNETES_VERSION) -> None:
        self.crds = load_crds(Path(crd_dir))
        self.kubernetes_version = kubernetes_version
        self._object_meta = None
        self._defs = None
        self._core: dict[tuple[str, str], Any] = {}

    def _strict_folder(self):
        return importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema" / \
            f"v{self.kubernetes_version}.0-local-strict"

    def _registry(self):
        if self._defs is None:
            defs = json.loads((self._strict_folder() / "_definitions.json").read_text())
            self._defs = (defs["$id"], Resource.from_contents(defs) @ Registry())
        return self._defs

    def _meta_validator(self):
        if self._object_meta is None:
            base, registry = self._registry()
            self._object_meta = jsonschema.Draft202012Validator(
                {"$ref": f"{base}#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}, registry=registry)
        return self._object_meta

    def _core_validator(self, api_version: str, kind: str):
        """kubernetes-validate's strict schema for a core kind, compiled once per kind (its own validate()
        re-reads 1.3 MB of definitions for every object). None when it has no schema for the kind."""
        key = (api_version, kind)
        if key not in self._core:
            # kubernetes-validate's file naming: rbac.authorization.k8s.io/v1 Role -> role-rbac-v1.json
            api = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
            f = self._strict_folder() / f"{kind.lower()}-{api}.json"
            if not f.is_file():
                self._core[key] = None
            else:
                schema = json.loads(f.read_text())
                _, registry = self._registry()
                registry = Resource.from_contents(schema) @ registry
                self._core[key] = jsonschema.Draft202012Validator(schema, registry=registry)
        return self._core[key]

    def problems(self, obj: Any) -> list[str]:
        """Problems of one object ([] when it validates)."""
        if not isinstance(obj, dict) or not obj.get("apiVersion") or not obj.get("kind"):
            return ["(top level): apiVersion and kind are required"]
        crd = self.crds.get((obj["apiVersion"], obj["kind"]))
        out = metadata_problems(obj, crd)
        if crd is not None:
            for err in self._meta_validator().iter_errors(obj.get("metadata") or {}):
                msg = err.message.replace("Additional properties are not allowed", "unknown field")
                out.append(f"{_path(('metadata',) + tuple(err.absolute_path))}: {msg}")
            defaulted = apply_defaults(copy.deepcopy(obj), crd.schema)
            for err in sorted(crd.validator.iter_errors(defaulted), key=lambda e: list(map(str, e.absolute_path))):
                msg = err.message
                if err.validator == "additionalProperties":
                    msg = msg.replace("Additional properties are not allowed", "unknown field")
                out.append(f"{_path(err.absolute_path)}: {msg}")
            if not out:  # rules assume a structurally valid object
                out += cel_problems(defaulted, crd.schema) + list_type_problems(defaulted, crd.schema)
            out += operator_problems(defaulted)
            return out
        group = obj["apiVersion"].split("/")[0] if "/" in obj["apiVersion"] else ""
        if group.endswith("ray.io") or group.endswith("x-k8s.io"):
            return out + [f"apiVersion: no CRD in the schema folder serves {obj['apiVersion']} {obj['kind']}"]
        core = self._core_validator(obj["apiVersion"], obj["kind"])
        if core is None:
            return out + [f"kind: kubernetes-validate {self.kubernetes_version} has no schema for "
                          f"{obj['apiVersion']} {obj['kind']}"]
        for err in sorted(core.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path))):
            msg = err.message.replace("Additional properties are not allowed", "unknown field")
            out.append(f"{_path(err.absolute_path)}: {msg}")
        return out

    def validate(self, objs: Iterable[dict[str, Any]], source: str) -> list[str]:
        return [f"{source}: {ident(o)}: {p}" for o in objs for p in self.problems(o)]


# ----------------------------------------------------------------------------------------------
# Names between objects
# ----------------------------------------------------------------------------------------------


def _pod_specs(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    spec = obj.get("spec") or {}
    clusters = {"RayCluster": ("spec", spec), "RayJob": ("spec.rayClusterSpec", spec.get("rayClusterSpec")),
                "RayService": ("spec.rayClusterConfig", spec.get("rayClusterConfig"))}.get(obj.get("kind"))
    if not clusters or not clusters[1]:
        return
    where, cluster = clusters
    yield f"{where}.headGroupSpec", (cluster.get("headGroupSpec") or {}).get("template", {}).get("spec", {})
    for i, g in enumerate(cluster.get("workerGroupSpecs") or []):
        yield f"{where}.workerGroupSpecs[{i}]", (g.get("template") or {}).get("spec", {})


def check_references(objs: list[dict[str, Any]], *, known: Iterable[dict[str, Any]] = ()) -> list[str]:
    """Names that point nowhere. `known` adds objects that exist but are not being checked (e.g. the
    tenants' namespaces when checking a RayJob)."""
    every = list(objs) + list(known)
    by_kind: dict[str, set[tuple[str, str]]] = {}
    for o in every:
        m = o.get("metadata") or {}
        by_kind.setdefault(o.get("kind", ""), set()).add((m.get("namespace", ""), m.get("name", "")))
    names = lambda kind: {n for _, n in by_kind.get(kind, set())}  # noqa: E731
    has = lambda kind, ns, name: (ns, name) in by_kind.get(kind, set())  # noqa: E731
    out = []
    for o in objs:
        m = o.get("metadata") or {}
        ns, labels, who = m.get("namespace", ""), m.get("labels") or {}, ident(o)
        kind, spec = o.get("kind"), o.get("spec") or {}
        if ns and "Namespace" in by_kind and ns not in names("Namespace"):
            out.append(f"{who}: namespace {ns!r} is not among the manifests")
        if kind == "LocalQueue" and spec.get("clusterQueue") not in names("ClusterQueue"):
            out.append(f"{who}: spec.clusterQueue {spec.get('clusterQueue')!r} names no ClusterQueue")
        if kind == "ClusterQueue":
            for g in spec.get("resourceGroups", []):
                for f in g.get("flavors", []):
                    if f["name"] not in names("ResourceFlavor"):
                        out.append(f"{who}: flavor {f['name']!r} names no ResourceFlavor")
        if kind in ("RoleBinding",) and o.get("roleRef", {}).get("kind") == "Role" \
                and not has("Role", ns, o["roleRef"]["name"]):
            out.append(f"{who}: roleRef names no Role {o['roleRef']['name']!r} in {ns!r}")
        if kind in ("RayCluster", "RayJob", "RayService"):
            if QUEUE_LABEL in labels and not has("LocalQueue", ns, labels[QUEUE_LABEL]):
                out.append(f"{who}: label {QUEUE_LABEL}={labels[QUEUE_LABEL]} names no LocalQueue in {ns!r}")
            if PRIORITY_LABEL in labels and labels[PRIORITY_LABEL] not in names("WorkloadPriorityClass"):
                out.append(f"{who}: label {PRIORITY_LABEL}={labels[PRIORITY_LABEL]} names no WorkloadPriorityClass")
            for where, pod in _pod_specs(o):
                sa = pod.get("serviceAccountName")
                if sa and ns and not has("ServiceAccount", ns, sa):
                    out.append(f"{who}: {where}.template.spec.serviceAccountName {sa!r} names no ServiceAccount "
                               f"in {ns!r}")
                for v in pod.get("volumes", []):
                    cm = (v.get("configMap") or {}).get("name")
                    if cm and not has("ConfigMap", ns, cm):
                        out.append(f"{who}: {where} volume {v.get('name')!r} names no ConfigMap {cm!r}")
    return out


# ----------------------------------------------------------------------------------------------
# kustomize
# ----------------------------------------------------------------------------------------------


def missing_tooling() -> list[str]:
    """The dev-extra packages (pip names) the validation needs and this environment lacks."""
    return [package for module, package in TOOLING.items() if importlib.util.find_spec(module) is None]


def kustomize_dirs(root: Path) -> list[Path]:
    """Every folder under root with a kustomization.yaml (root first)."""
    return sorted({p.parent for p in Path(root).rglob("kustomization.yaml")}, key=lambda p: (len(p.parts), str(p)))


def kustomize_build(directory: Path, kubectl: str | None = None) -> str:
    """`kubectl kustomize DIR` (offline); raises ManifestError with kubectl's message."""
    kubectl = kubectl or shutil.which("kubectl")
    if not kubectl:
        raise ManifestError("kubectl not found: install it (Debian package `kubectl`, listed in .ci/apt-packages.txt)")
    proc = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise ManifestError(f"{directory}: kubectl kustomize failed: {proc.stderr.strip()}")
    return proc.stdout
