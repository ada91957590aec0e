"""`biomedgpt cluster render`: cluster/tenants.yaml -> the rendered part of k8s/ (kustomize).

    k8s/kustomization.yaml                 the admin's one `kubectl apply -k k8s/`: kueue/ + tenants/
    k8s/kueue/                             cluster-scoped: ResourceFlavors (one per GPU type + CPU),
                                           ClusterQueues (one per institution, one cohort),
                                           WorkloadPriorityClasses
    k8s/tenants/<institution>/             Namespace, ResourceQuota, LimitRange, ServiceAccount, RBAC,
                                           LocalQueues (one per department)
    k8s/overlays/<team>/                   the base RayCluster (and RayService when the department
                                           has `serving`) in the team's namespace and queue
    k8s/base/                              static, written by hand: the RayCluster and RayService templates

A department's RayService runs the serving application (`biomedgpt.serve.app:app_builder`): its
serveConfigV2 is `deploy_config` of the tenants file's `servingSpec` (jobs/serve/cluster.yaml) with the
department's registry and replica bounds (`rayservice_serve_spec`).

Rendering is deterministic: the same tenants.yaml gives byte-identical files, so `cluster validate`
and the tests can tell when k8s/ is stale.
"""

from __future__ import annotations

import json
import shutil
from fractions import Fraction
from pathlib import Path
from typing import Any

import yaml

from ..serve.spec import deploy_config
from ..spec import ServeAppSpec, load_serve_spec, serve_spec_from_dict
from ..tenancy import Institution, Limit, Tenants
from ..tenancy.quantity import format_quantity, parse_quantity
from ..tenancy.schema import SCHEMA

KUEUE = "kueue.x-k8s.io/v1beta2"
GPU_RESOURCE = "nvidia.com/gpu"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
ELASTIC_ANNOTATION = "kueue.x-k8s.io/elastic-job"
TEAM_LABEL = "biomedgpt.io/team"
INSTITUTION_LABEL = "biomedgpt.io/institution"
RAY_SERVICE_ACCOUNT = "biomedgpt-ray"
SUBMITTER_ROLE = "biomedgpt-submitter"
GPU_TAINT_KEY = "nvidia.com/gpu"
HEADER = ("# Rendered by `biomedgpt cluster render` from {tenants}; do not edit by hand:\n"
          "# change the tenants file and render again (`biomedgpt cluster validate` checks they agree).\n")
RENDERED = ("kustomization.yaml", "kueue", "tenants", "overlays")
#: WORKDIR of the image cluster/Dockerfile builds: the repository lives there.
WORKDIR = "/home/ray/biomedgpt"
#: Serve's HTTP port: the `serve` containerPort of k8s/base/rayservice/ and of KubeRay's Serve service.
SERVE_PORT = 8000
SERVE_WORKER_GROUP = "gpu-serve"


def _managed(extra: dict[str, str] | None = None) -> dict[str, str]:
    labels = {"app.kubernetes.io/part-of": "biomedgpt", "app.kubernetes.io/managed-by": "biomedgpt-cluster-render"}
    labels.update(extra or {})
    return labels


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (embedded patches, Serve configs) as literal blocks, readable in review."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump_one(value: Any) -> str:
    """YAML text of one value (a patch list, a Serve config)."""
    return yaml.dump(value, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)


def dump_yaml(docs: list[dict[str, Any]] | dict[str, Any], header: str = "") -> str:
    """YAML text of one document or a `---`-separated stream, keys in insertion order."""
    docs = docs if isinstance(docs, list) else [docs]
    body = "---\n".join(yaml.dump(d, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)
                         for d in docs)
    return header + body


# ----------------------------------------------------------------------------------------------
# Quota arithmetic
# ----------------------------------------------------------------------------------------------


def _lendable(lim: Limit | None) -> Fraction:
    if lim is None:
        return Fraction(0)
    return lim.nominal if lim.lending is None else lim.lending


def max_usable(tenants: Tenants, inst: Institution, resource: str, gpu_type: str | None = None) -> Fraction:
    """The most Kueue can ever admit for an institution: its nominal quota plus what it may borrow
    (its borrowingLimit, capped by what the others lend)."""

    def pick(i: Institution) -> Limit | None:
        if resource == "gpu":
            return i.gpus.get(gpu_type)
        return i.cpu if resource == "cpu" else i.memory

    own = pick(inst)
    if own is None:
        return Fraction(0)
    others = sum((_lendable(pick(i)) for i in tenants.institutions.values() if i.name != inst.name), Fraction(0))
    borrow = others if own.borrowing is None else min(own.borrowing, others)
    return own.nominal + borrow


def _kueue_resource(name: str, lim: Limit) -> dict[str, Any]:
    # Quantities as written in tenants.yaml (validated there): integers stay integers.
    out: dict[str, Any] = {"name": name, "nominalQuota": lim.raw["nominal"]}
    for ours, theirs in (("borrowingLimit", "borrowingLimit"), ("lendingLimit", "lendingLimit")):
        if ours in lim.raw:
            out[theirs] = lim.raw[ours]
    return out


# ----------------------------------------------------------------------------------------------
# Objects
# ----------------------------------------------------------------------------------------------


def resource_flavors(tenants: Tenants) -> list[dict[str, Any]]:
    out = [{"apiVersion": KUEUE, "kind": "ResourceFlavor",
            "metadata": {"name": tenants.cpu_flavor, "labels": _managed()},
            # No node labels: CPU and memory of every node. GPU nodes carry the nvidia.com/gpu taint, so
            # pods without a GPU flavor's toleration stay on CPU nodes.
            "spec": {}}]
    for g in tenants.gpu_types.values():
        out.append({"apiVersion": KUEUE, "kind": "ResourceFlavor",
                    "metadata": {"name": g.name, "labels": _managed()},
                    "spec": {"nodeLabels": dict(g.node_labels),
                             "tolerations": [{"key": GPU_TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}]}})
    return out


def cluster_queue(tenants: Tenants, inst: Institution) -> dict[str, Any]:
    gpu_flavors = [{"name": g, "resources": [_kueue_resource(GPU_RESOURCE, inst.gpus[g])]}
                   for g in tenants.gpu_types if g in inst.gpus]
    groups = [{"coveredResources": ["cpu", "memory"],
               "flavors": [{"name": tenants.cpu_flavor,
                            "resources": [_kueue_resource("cpu", inst.cpu),
                                          _kueue_resource("memory", inst.memory)]}]}]
    if gpu_flavors:
        groups.append({"coveredResources": [GPU_RESOURCE], "flavors": gpu_flavors})
    fine_tuning = tenants.priority_for("finetune").value
    spec: dict[str, Any] = {
        "cohortName": tenants.cohort,
        # Only this institution's namespace may point LocalQueues at its ClusterQueue.
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": inst.namespace}},
        "queueingStrategy": "BestEffortFIFO",
        "resourceGroups": groups,
        "preemption": {
            # Take back lent quota from any borrower when this institution needs its nominal share.
            "reclaimWithinCohort": "Any",
            # While borrowing, preempt only lower-priority borrowers below fine-tuning (i.e. pretraining).
            "borrowWithinCohort": {"policy": "LowerPriority", "maxPriorityThreshold": fine_tuning - 1},
            # Inside the institution: serving > fine-tuning > pretraining.
            "withinClusterQueue": "LowerPriority",
        },
        "flavorFungibility": {"whenCanBorrow": "TryNextFlavor", "whenCanPreempt": "TryNextFlavor"},
    }
    if inst.fair_share_weight != 1:
        spec["fairSharing"] = {"weight": _weight(inst.fair_share_weight)}
    return {"apiVersion": KUEUE, "kind": "ClusterQueue",
            "metadata": {"name": inst.name, "labels": _managed({INSTITUTION_LABEL: inst.name})},
            "spec": spec}


def _weight(w: float) -> int | str:
    return int(w) if float(w).is_integer() else format_quantity(Fraction(w).limit_denominator(1000))


def priority_classes(tenants: Tenants) -> list[dict[str, Any]]:
    ordered = sorted(tenants.priorities.values(), key=lambda p: -p.value)
    return [{"apiVersion": KUEUE, "kind": "WorkloadPriorityClass",
             "metadata": {"name": p.name, "labels": _managed()},
             "value": p.value,
             "description": (p.description or p.name) + f" (job kinds: {', '.join(p.kinds)})"} for p in ordered]


def tenant_objects(tenants: Tenants, inst: Institution) -> dict[str, list[dict[str, Any]]]:
    """The namespaced objects of one institution, by file name."""
    ns = inst.namespace
    labels = _managed({INSTITUTION_LABEL: inst.name})
    meta = lambda name: {"name": name, "namespace": ns, "labels": dict(labels)}  # noqa: E731
    gpus = sum((max_usable(tenants, inst, "gpu", g) for g in inst.gpus), Fraction(0))
    hard = {
        "requests.cpu": format_quantity(max_usable(tenants, inst, "cpu")),
        "requests.memory": format_quantity(max_usable(tenants, inst, "memory"), binary=True),
        f"requests.{GPU_RESOURCE}": format_quantity(gpus),
        "services.loadbalancers": "0",
        "services.nodeports": "0",
    }
    max_gpus_per_pod = max(tenants.gpu_types[g].gpus_per_node for g in inst.gpus) if inst.gpus else 0
    files: dict[str, list[dict[str, Any]]] = {}
    files["namespace.yaml"] = [{
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": ns, "labels": {**labels, "pod-security.kubernetes.io/enforce": "baseline",
                                            "pod-security.kubernetes.io/warn": "restricted"},
                     "annotations": {"biomedgpt.io/display-name": inst.display_name}}}]
    files["resource-quota.yaml"] = [{
        "apiVersion": "v1", "kind": "ResourceQuota", "metadata": meta("biomedgpt-quota"),
        # A backstop under Kueue: at most what the ClusterQueue could ever admit (nominal + borrowable).
        "spec": {"hard": hard}}]
    files["limit-range.yaml"] = [{
        "apiVersion": "v1", "kind": "LimitRange", "metadata": meta("biomedgpt-defaults"),
        "spec": {"limits": [{
            "type": "Container",
            "defaultRequest": {"cpu": tenants.container_defaults["cpu"], "memory": tenants.container_defaults["memory"]},
            "default": {"memory": tenants.container_defaults["memory"]},
            "max": {GPU_RESOURCE: str(max_gpus_per_pod)},
        }]}}]
    sa_meta = meta(RAY_SERVICE_ACCOUNT)
    if inst.service_account_annotations:
        sa_meta["annotations"] = dict(inst.service_account_annotations)
    files["service-account.yaml"] = [{"apiVersion": "v1", "kind": "ServiceAccount", "metadata": sa_meta}]
    files["rbac.yaml"] = [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta(SUBMITTER_ROLE),
         "rules": [
             {"apiGroups": ["ray.io"], "resources": ["rayjobs", "rayclusters", "rayservices"],
              "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]},
             {"apiGroups": [""], "resources": ["configmaps"],
              "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]},
             {"apiGroups": [""], "resources": ["pods", "pods/log", "services", "events"],
              "verbs": ["get", "list", "watch"]},
             {"apiGroups": [""], "resources": ["pods/portforward"], "verbs": ["create"]},
             # the RayJob's submitter Job (`kubectl logs job/<rayjob>`)
             {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list", "watch"]},
             {"apiGroups": ["kueue.x-k8s.io"], "resources": ["workloads", "localqueues"],
              "verbs": ["get", "list", "watch"]},
         ]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": meta(SUBMITTER_ROLE),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": SUBMITTER_ROLE},
         "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": g} for g in inst.groups]},
        # The Ray autoscaler sidecar runs as the Ray pods' ServiceAccount and scales the RayCluster.
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta("biomedgpt-ray-autoscaler"),
         "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "patch"]},
                   {"apiGroups": ["ray.io"], "resources": ["rayclusters"], "verbs": ["get", "list", "watch", "patch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": meta("biomedgpt-ray-autoscaler"),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "biomedgpt-ray-autoscaler"},
         "subjects": [{"kind": "ServiceAccount", "name": RAY_SERVICE_ACCOUNT, "namespace": ns}]},
    ]
    files["local-queues.yaml"] = [
        {"apiVersion": KUEUE, "kind": "LocalQueue",
         "metadata": {**meta(team.queue), "labels": {**labels, TEAM_LABEL: team.name}},
         "spec": {"clusterQueue": inst.name}}
        for team in inst.departments.values()]
    return files


def _kustomization(resources: list[str], **extra: Any) -> dict[str, Any]:
    return {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", **extra, "resources": resources}


def _image_parts(image: str) -> tuple[str, str]:
    name, sep, tag = image.rpartition(":")
    if not sep or "/" in tag:
        return image, ""
    return name, tag


def _in_checkout(tenants: Tenants, path: Path) -> str:
    """`path` relative to the checkout of the tenants file (the folder above cluster/), else as it is."""
    try:
        return path.resolve().relative_to(tenants.path.resolve().parents[1]).as_posix()
    except ValueError:
        return str(path)


def rayservice_serve_spec(tenants: Tenants, team_name: str) -> ServeAppSpec:
    """The serving spec of a department's RayService: the tenants file's `servingSpec` (jobs/serve/cluster.yaml)
    with the department's `serving.registry` and replica bounds (`minReplicas`..`maxReplicas` model replicas,
    one GPU each), the tenants file where the image holds it (its API keys) and Serve's HTTP proxy on
    0.0.0.0:8000, the pods' `serve` port."""
    team = tenants.team(team_name)
    if team.serving is None or tenants.serving_spec is None:
        raise ValueError(f"{tenants.path}: {team.where}: no `serving` entry (or no servingSpec) to serve with")
    spec_file = _in_checkout(tenants, tenants.serving_spec)
    data = load_serve_spec(tenants.serving_spec).to_dict()
    data.update(registry=team.serving.registry, model_dir=None,
                tenants=f"{WORKDIR}/{_in_checkout(tenants, tenants.path)}",
                http={"host": "0.0.0.0", "port": SERVE_PORT},
                description=f"the registered models of {team.name}, on {team.serving.gpu_type} GPUs")
    data["models"]["num_gpus"] = 1
    data["models"]["autoscaling"].update(min_replicas=team.serving.min_replicas,
                                         max_replicas=team.serving.max_replicas)
    return serve_spec_from_dict(data, f"{spec_file} for {team.name} ({team.where}.serving)")


def _check_serve_fits(spec: ServeAppSpec, container: dict[str, Any], where: str) -> None:
    """One gpu-serve worker must hold a model replica and every ingress replica (the head has num-cpus 0), or
    the Ray autoscaler would start GPU workers for the ingress alone."""
    limits = container["resources"]["limits"]
    cpus, gpus = parse_quantity(limits["cpu"]), parse_quantity(limits.get(GPU_RESOURCE, 0))
    m, i = spec.models, spec.ingress
    need = Fraction(str(m.num_cpus)) + i.replicas * Fraction(str(i.num_cpus))
    if need > cpus or Fraction(str(m.num_gpus)) > gpus:
        raise ValueError(f"{spec.source}: models.num_cpus {m.num_cpus} + ingress.replicas {i.replicas} x "
                         f"ingress.num_cpus {i.num_cpus} CPUs and models.num_gpus {m.num_gpus} do not fit the "
                         f"{format_quantity(cpus)} CPUs and {format_quantity(gpus)} GPUs of a {SERVE_WORKER_GROUP} "
                         f"worker ({where})")


def overlay(tenants: Tenants, team_name: str, base_dir: Path) -> dict[str, Any]:
    """kustomization.yaml of one team's overlay: the base RayCluster (elastic, autoscaling) in the team's
    namespace and queue, plus the base RayService running the department's serving spec when it has `serving`."""
    team = tenants.team(team_name)
    image, tag = _image_parts(tenants.image)
    resources = ["../../base/raycluster"] + (["../../base/rayservice"] if team.serving else [])
    patches: list[dict[str, Any]] = [{
        "target": {"group": "ray.io", "version": "v1", "kind": "RayCluster"},
        "patch": dump_one([{"op": "add", "path": "/metadata/labels/kueue.x-k8s.io~1priority-class",
                               "value": tenants.priority_for("finetune").name}]),
    }]
    if team.serving:
        base_file = base_dir / "rayservice" / "rayservice.yaml"
        service = yaml.safe_load(base_file.read_text())
        groups = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
        index = next(i for i, g in enumerate(groups) if g["groupName"] == SERVE_WORKER_GROUP)
        gpu = tenants.gpu_types[team.serving.gpu_type]
        spec = rayservice_serve_spec(tenants, team.name)
        _check_serve_fits(spec, groups[index]["template"]["spec"]["containers"][0], str(base_file))
        ops = [
            {"op": "add", "path": "/metadata/labels/kueue.x-k8s.io~1priority-class",
             "value": tenants.priority_for("serve").name},
            {"op": "replace", "path": "/spec/serveConfigV2",
             "value": dump_one(deploy_config(spec))},
            {"op": "replace", "path": f"/spec/rayClusterConfig/workerGroupSpecs/{index}/template/spec/nodeSelector",
             "value": dict(gpu.node_labels)},
            {"op": "replace", "path": f"/spec/rayClusterConfig/workerGroupSpecs/{index}/minReplicas",
             "value": team.serving.min_replicas},
            {"op": "replace", "path": f"/spec/rayClusterConfig/workerGroupSpecs/{index}/replicas",
             "value": team.serving.min_replicas},
            {"op": "replace", "path": f"/spec/rayClusterConfig/workerGroupSpecs/{index}/maxReplicas",
             "value": team.serving.max_replicas},
        ]
        patches.append({"target": {"group": "ray.io", "version": "v1", "kind": "RayService"},
                        "patch": dump_one(ops)})
    return _kustomization(
        resources,
        namespace=team.namespace,
        namePrefix=f"{team.department}-",
        labels=[{"pairs": {TEAM_LABEL: team.name, INSTITUTION_LABEL: team.institution, QUEUE_LABEL: team.queue},
                 "includeSelectors": False, "includeTemplates": False}],
        images=[{"name": image, "newName": image, "newTag": tag}] if tag else [{"name": image, "newName": image}],
        patches=patches,
    )


def render(tenants: Tenants, base_dir: Path | None = None) -> dict[str, str]:
    """Every rendered file of k8s/, as {relative path: text}."""
    base_dir = base_dir or (tenants.path.resolve().parent.parent / "k8s" / "base")
    header = HEADER.format(tenants=_in_checkout(tenants, tenants.path))
    files: dict[str, Any] = {}
    files["kueue/resource-flavors.yaml"] = resource_flavors(tenants)
    files["kueue/cluster-queues.yaml"] = [cluster_queue(tenants, i) for i in tenants.institutions.values()]
    files["kueue/workload-priority-classes.yaml"] = priority_classes(tenants)
    files["kueue/kustomization.yaml"] = _kustomization(
        ["resource-flavors.yaml", "workload-priority-classes.yaml", "cluster-queues.yaml"])
    for inst in tenants.institutions.values():
        objs = tenant_objects(tenants, inst)
        for name, docs in objs.items():
            files[f"tenants/{inst.name}/{name}"] = docs
        files[f"tenants/{inst.name}/kustomization.yaml"] = _kustomization(list(objs))
        for team in inst.departments.values():
            files[f"overlays/{team.name}/kustomization.yaml"] = overlay(tenants, team.name, base_dir)
    files["tenants/kustomization.yaml"] = _kustomization(list(tenants.institutions))
    files["kustomization.yaml"] = _kustomization(["kueue", "tenants"])
    return {path: dump_yaml(docs, header) for path, docs in sorted(files.items())}


def write_rendered(files: dict[str, str], out: Path) -> list[Path]:
    """Replace the rendered part of `out` (kustomization.yaml, kueue/, tenants/, overlays/) with `files`;
    base/ and anything else there is left alone."""
    out.mkdir(parents=True, exist_ok=True)
    for name in RENDERED:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    written = []
    for rel, text in files.items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


def stale_files(files: dict[str, str], out: Path) -> list[str]:
    """Rendered paths whose content in `out` differs from `files` (missing, changed or left over)."""
    problems = [rel for rel, text in files.items() if not (out / rel).is_file() or (out / rel).read_text() != text]
    for name in RENDERED:
        root = out / name
        existing = [root] if root.is_file() else list(root.rglob("*")) if root.is_dir() else []
        for p in existing:
            if p.is_file() and str(p.relative_to(out)) not in files:
                problems.append(f"{p.relative_to(out)} (not rendered any more)")
    return sorted(problems)


def write_schema(tenants_path: Path) -> Path:
    """tenants.schema.json beside the tenants file (for editors; the loader uses the Python schema)."""
    path = tenants_path.parent / "tenants.schema.json"
    path.write_text(json.dumps(SCHEMA, indent=2) + "\n")
    return path
