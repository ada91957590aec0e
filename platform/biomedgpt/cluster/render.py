"""`biomedgpt cluster render`: cluster/tenants.yaml -> the rendered part of k8s/ (kustomize).

    k8s/kustomization.yaml                 the admin's one `kubectl apply -k k8s/`: kueue/ + tenants/
    k8s/kueue/                             cluster-scoped: ResourceFlavors (one per GPU type + CPU),
                                           ClusterQueues (one per institution, one cohort),
                                           WorkloadPriorityClasses
    k8s/tenants/<institution>/             Namespace (Pod Security `restricted` enforced), ResourceQuota (with
                                           ephemeral storage), LimitRange, one ServiceAccount per department
                                           (its own principal: its cloud identity), RBAC, NetworkPolicies
                                           (default deny), LocalQueues (one per department), the API-key
                                           Secret of every serving department
    k8s/overlays/<team>/                   the base RayCluster (and RayService when the department
                                           has `serving`) in the team's namespace and queue, every pod
                                           running as the department's ServiceAccount
    k8s/base/                              static, written by hand: the RayCluster and RayService templates

A department's RayService runs the serving application (`biomedgpt.serve.app:app_builder`): its
serveConfigV2 is `deploy_config` of the tenants file's `servingSpec` (jobs/serve/cluster.yaml) with the
department's registry and replica bounds (`rayservice_serve_spec`), for the department only (`team`), with
its keys from its mounted Secret (`api_keys`).

Rendering is deterministic: the same tenants.yaml gives byte-identical files, so `cluster validate`
and the tests can tell when k8s/ is stale.
"""

from __future__ import annotations

import copy
import json
import shutil
from fractions import Fraction
from pathlib import Path
from typing import Any

import yaml

from ..serve.spec import deploy_config
from ..spec import ServeAppSpec, load_serve_spec, serve_spec_from_dict
from ..tenancy import Institution, Limit, Team, Tenants
from ..tenancy.keys import KEY_FILE_NAME, key_file_text
from ..tenancy.quantity import format_quantity, parse_quantity
from ..tenancy.schema import SCHEMA

KUEUE = "kueue.x-k8s.io/v1beta2"
GPU_RESOURCE = "nvidia.com/gpu"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
ELASTIC_ANNOTATION = "kueue.x-k8s.io/elastic-job"
TEAM_LABEL = "biomedgpt.io/team"
INSTITUTION_LABEL = "biomedgpt.io/institution"
SUBMITTER_ROLE = "biomedgpt-submitter"
AUTOSCALER_ROLE = "biomedgpt-ray-autoscaler"
#: The namespace's Ray token Secret (key `auth_token`), created by the cluster admin (never rendered: it is random).
RAY_TOKEN_SECRET = "biomedgpt-ray-token"
STORAGE_CONFIG = "biomedgpt-storage"    # the base templates' placeholder; overlays name `<department>-biomedgpt-storage`
API_KEYS_VOLUME = "api-keys"
API_KEYS_DIR = "/etc/biomedgpt/api-keys"
SERVING_LABEL = "biomedgpt.io/serving"
RAY_NODE_LABEL = "biomedgpt.io/ray-node"
#: Ray's ports on a head: GCS, dashboard and job API, Ray client.
GCS_PORT, DASHBOARD_PORT, CLIENT_PORT = 6379, 8265, 10001
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
        "requests.ephemeral-storage": inst.ephemeral_storage,
        "limits.ephemeral-storage": inst.ephemeral_storage,
        "services.loadbalancers": "0",
        "services.nodeports": "0",
    }
    ephemeral = tenants.container_defaults.get("ephemeralStorage", "2Gi")
    max_gpus_per_pod = max(tenants.gpu_types[g].gpus_per_node for g in inst.gpus) if inst.gpus else 0
    files: dict[str, list[dict[str, Any]]] = {}
    files["namespace.yaml"] = [{
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": ns, "labels": {**labels, "pod-security.kubernetes.io/enforce": "restricted",
                                            "pod-security.kubernetes.io/enforce-version": "latest",
                                            "pod-security.kubernetes.io/audit": "restricted",
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
            "defaultRequest": {"cpu": tenants.container_defaults["cpu"], "memory": tenants.container_defaults["memory"],
                               "ephemeral-storage": ephemeral},
            "default": {"memory": tenants.container_defaults["memory"], "ephemeral-storage": ephemeral},
            "max": {GPU_RESOURCE: str(max_gpus_per_pod)},
        }]}}]
    # Each department is its own principal: its own ServiceAccount with its own cloud identity. No pod gets its
    # API token unless the pod template asks (only autoscaling heads do: the autoscaler patches the RayCluster).
    accounts = []
    for team in inst.departments.values():
        sa_meta = {**meta(team.service_account), "labels": {**labels, TEAM_LABEL: team.name}}
        if team.service_account_annotations:
            sa_meta["annotations"] = dict(team.service_account_annotations)
        accounts.append({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": sa_meta,
                         "automountServiceAccountToken": False})
    files["service-account.yaml"] = accounts
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
        # The Ray autoscaler sidecar runs as the department's ServiceAccount and scales the RayCluster.
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta(AUTOSCALER_ROLE),
         "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "patch"]},
                   {"apiGroups": ["ray.io"], "resources": ["rayclusters"], "verbs": ["get", "list", "watch", "patch"]}]},
    ]
    for team in inst.departments.values():
        name = f"{team.department}-{AUTOSCALER_ROLE}"
        files["rbac.yaml"].append(
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
             "metadata": {**meta(name), "labels": {**labels, TEAM_LABEL: team.name}},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": AUTOSCALER_ROLE},
             "subjects": [{"kind": "ServiceAccount", "name": team.service_account, "namespace": ns}]})
    files["network-policies.yaml"] = network_policies(tenants, inst)
    keys = [api_keys_secret(tenants, team) for team in inst.departments.values() if team.serving]
    if keys:
        files["api-keys.yaml"] = keys
    files["local-queues.yaml"] = [
        {"apiVersion": KUEUE, "kind": "LocalQueue",
         "metadata": {**meta(team.queue), "labels": {**labels, TEAM_LABEL: team.name}},
         "spec": {"clusterQueue": inst.name}}
        for team in inst.departments.values()]
    return files


def network_policies(tenants: Tenants, inst: Institution) -> list[dict[str, Any]]:
    """Default deny in and out; then: pods talk to pods of their own namespace, DNS, object storage; heads reach
    the API server (the autoscaler); the KubeRay operator reaches a head's dashboard/job API only (the GCS and Ray
    client ports are reachable from no other namespace); the ingress namespace reaches the serve port of
    serving pods only. Enforced by the cluster's CNI (the manifests alone prove nothing about enforcement)."""
    net, ns = tenants.network, inst.namespace
    labels = _managed({INSTITUTION_LABEL: inst.name})

    def policy(name: str, selector: dict[str, Any], types: list[str], **rules: Any) -> dict[str, Any]:
        return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": name, "namespace": ns, "labels": dict(labels)},
                "spec": {"podSelector": selector, "policyTypes": types, **rules}}

    def namespace(name: str) -> dict[str, Any]:
        return {"matchLabels": {"kubernetes.io/metadata.name": name}}

    def tcp(*ports: int) -> list[dict[str, Any]]:
        return [{"protocol": "TCP", "port": p} for p in ports]

    def blocks(e) -> list[dict[str, Any]]:
        return [{"ipBlock": {"cidr": c, **({"except": list(e.except_)} if e.except_ else {})}} for c in e.cidrs]

    head = {"matchLabels": {RAY_NODE_LABEL: "head"}}
    return [
        policy("biomedgpt-default-deny", {}, ["Ingress", "Egress"]),
        policy("biomedgpt-same-namespace", {}, ["Ingress", "Egress"],
               ingress=[{"from": [{"podSelector": {}}]}], egress=[{"to": [{"podSelector": {}}]}]),
        policy("biomedgpt-dns", {}, ["Egress"],
               egress=[{"to": [{"namespaceSelector": namespace(net.dns_namespace),
                                "podSelector": {"matchLabels": dict(net.dns_pod_labels)}}],
                        "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}]),
        policy("biomedgpt-object-storage", {}, ["Egress"],
               egress=[{"to": blocks(net.object_storage), "ports": tcp(*net.object_storage.ports)}]),
        policy("biomedgpt-api-server", head, ["Egress"],
               egress=[{"to": blocks(net.api_server), "ports": tcp(*net.api_server.ports)}]),
        policy("biomedgpt-kuberay-operator", head, ["Ingress"],
               ingress=[{"from": [{"namespaceSelector": namespace(net.operator_namespace),
                                   "podSelector": {"matchLabels": dict(net.operator_pod_labels)}}],
                         "ports": tcp(DASHBOARD_PORT)}]),
        policy("biomedgpt-serve-ingress", {"matchLabels": {SERVING_LABEL: "true"}}, ["Ingress"],
               ingress=[{"from": [{"namespaceSelector": namespace(net.ingress_namespace)}], "ports": tcp(SERVE_PORT)}]),
    ]


def api_keys_secret(tenants: Tenants, team: Team) -> dict[str, Any]:
    """The Secret of a serving department's key hashes (the key file `biomedgpt.tenancy.keys` reads), mounted into
    its RayService at API_KEYS_DIR: applying a changed Secret rotates or revokes keys without a rebuild."""
    header = (f"# {team.name}'s serving API keys from {_in_checkout(tenants, tenants.path)} "
              f"({team.where}.apiKeys): only scrypt hashes\n")
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": team.api_keys_secret, "namespace": team.namespace,
                         "labels": _managed({INSTITUTION_LABEL: team.institution, TEAM_LABEL: team.name})},
            "stringData": {KEY_FILE_NAME: key_file_text(team.name, team.api_keys, header)}}


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
    data.update(registry=team.serving.registry, model_dir=None, team=team.name, auth=True,
                api_keys=f"{API_KEYS_DIR}/{KEY_FILE_NAME}",
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


def storage_config(team: Team) -> str:
    """The department's optional ConfigMap and Secret of storage settings (S3 endpoint, keys), read by its pods."""
    return f"{team.department}-{STORAGE_CONFIG}"


def department_pod(pod: dict[str, Any], team: Team) -> None:
    """Make a pod template (its `spec`) run as the department: its ServiceAccount, its storage settings."""
    pod["serviceAccountName"] = team.service_account
    for c in pod.get("containers", []):
        c["envFrom"] = [{"configMapRef": {"name": storage_config(team), "optional": True}},
                        {"secretRef": {"name": storage_config(team), "optional": True}}]


def _department_ops(cluster: dict[str, Any], path: str, team: Team) -> list[dict[str, Any]]:
    """JSON-patch ops that make every pod template of a base Ray cluster spec (at `path`) the department's: its
    ServiceAccount, its storage settings, its team label, its API-key Secret where a volume mounts one."""
    ops: list[dict[str, Any]] = []
    templates = [(f"{path}/headGroupSpec/template", cluster["headGroupSpec"]["template"])]
    templates += [(f"{path}/workerGroupSpecs/{i}/template", g["template"])
                  for i, g in enumerate(cluster["workerGroupSpecs"])]
    for where, template in templates:
        pod = copy.deepcopy(template["spec"])
        department_pod(pod, team)
        ops.append({"op": "add", "path": f"{where}/metadata/labels/{TEAM_LABEL.replace('/', '~1')}", "value": team.name})
        ops.append({"op": "replace", "path": f"{where}/spec/serviceAccountName", "value": pod["serviceAccountName"]})
        for j, c in enumerate(pod["containers"]):
            ops.append({"op": "replace", "path": f"{where}/spec/containers/{j}/envFrom", "value": c["envFrom"]})
        for j, v in enumerate(pod.get("volumes", [])):
            if v["name"] == API_KEYS_VOLUME:
                ops.append({"op": "replace", "path": f"{where}/spec/volumes/{j}/secret/secretName",
                            "value": team.api_keys_secret})
    return ops


def overlay(tenants: Tenants, team_name: str, base_dir: Path) -> dict[str, Any]:
    """kustomization.yaml of one team's overlay: the base RayCluster (elastic, autoscaling) in the team's
    namespace and queue, plus the base RayService running the department's serving spec when it has `serving`."""
    team = tenants.team(team_name)
    image, tag = _image_parts(tenants.image)
    resources = ["../../base/raycluster"] + (["../../base/rayservice"] if team.serving else [])
    base_cluster = yaml.safe_load((base_dir / "raycluster" / "raycluster.yaml").read_text())
    patches: list[dict[str, Any]] = [{
        "target": {"group": "ray.io", "version": "v1", "kind": "RayCluster"},
        "patch": dump_one([{"op": "add", "path": "/metadata/labels/kueue.x-k8s.io~1priority-class",
                               "value": tenants.priority_for("finetune").name}]
                          + _department_ops(base_cluster["spec"], "/spec", team)),
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
        ] + _department_ops(service["spec"]["rayClusterConfig"], "/spec/rayClusterConfig", team)
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
