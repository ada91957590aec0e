"""`biomedgpt k8s rayjob SPEC`: a job spec -> a KubeRay RayJob queued by Kueue in the team's queue.

The RayJob's cluster is the base RayCluster template (k8s/base/raycluster/raycluster.yaml) sized for
the spec and frozen, because Kueue reserves quota for a RayJob's whole cluster up front and refuses
autoscaling ones:

- head: the job driver `biomedgpt run <spec>` (no Ray tasks)
- cpu-preprocess: `--data-workers` pods for Ray Data (decode, transform, tokenize)
- gpu-<type> (trainer.use_gpu): trainer.workers GPUs, packed `min(workers, gpusPerNode)` per pod, with
  the CPU and memory that go with each GPU of that type in tenants.yaml; or cpu-train pods for CPU specs

The spec travels with the job in a ConfigMap mounted over its path in the image, so what runs is
exactly what was admitted. Before anything is printed the spec is admitted (tenancy.admit) as a
cluster run.
"""

from __future__ import annotations

import copy
import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..audit import audited_admit
from ..tenancy import ON_CLUSTER_ENV, Tenants
from ..tenancy.quantity import format_quantity, parse_quantity
from .render import INSTITUTION_LABEL, PRIORITY_LABEL, QUEUE_LABEL, TEAM_LABEL, WORKDIR, department_pod, dump_one

SPEC_VOLUME = "job-spec"
GPU = "nvidia.com/gpu"
MAX_RAYJOB_NAME = 47


@dataclass
class RayJobOptions:
    """Knobs the spec does not carry (cluster-side only)."""

    image: str | None = None          # default: cluster.image of tenants.yaml
    gpu_type: str | None = None       # default: the first GPU type the institution has quota for
    data_workers: int = 2             # cpu-preprocess pods for Ray Data
    ttl_seconds: int = 3600           # the finished RayJob (and its logs) is deleted after this
    retries: int = 1                  # backoffLimit: a retry starts a new cluster that resumes the run
    deadline_seconds: int | None = None


def rayjob_name(department: str, job_name: str) -> str:
    """`<department>-<job>` as a DNS-1035 label of at most 47 characters (KubeRay's limit)."""
    name = re.sub(r"[^a-z0-9-]+", "-", f"{department}-{job_name}".lower()).strip("-")
    name = re.sub(r"-{2,}", "-", name)
    if not name[:1].isalpha():
        name = f"j-{name}"
    if len(name) > MAX_RAYJOB_NAME:
        digest = hashlib.sha1(name.encode()).hexdigest()[:6]
        name = f"{name[:MAX_RAYJOB_NAME - 7].rstrip('-')}-{digest}"
    return name


def spec_path_in_image(spec_path: str | Path, repo: Path) -> str:
    """Where the spec sits in the image: its path in the repository, else jobs/submitted/<file>."""
    p = Path(spec_path).resolve()
    try:
        rel = p.relative_to(repo.resolve())
    except ValueError:
        rel = Path("jobs") / "submitted" / p.name
    return f"{WORKDIR}/{rel.as_posix()}"


def _set_image(pod: dict[str, Any], image: str) -> None:
    for c in pod.get("containers", []):
        c["image"] = image


def _scale(resources: dict[str, Any], cpu: str, memory: str, gpus: int | None) -> None:
    for side in ("requests", "limits"):
        r = resources.setdefault(side, {})
        r["cpu"], r["memory"] = cpu, memory
        if gpus is not None:
            r[GPU] = str(gpus)
        else:
            r.pop(GPU, None)


def _fixed(group: dict[str, Any], name: str, replicas: int) -> dict[str, Any]:
    group = copy.deepcopy(group)
    group["groupName"] = name
    group["replicas"] = group["minReplicas"] = group["maxReplicas"] = replicas
    labels = group["template"].setdefault("metadata", {}).setdefault("labels", {})
    labels["biomedgpt.io/ray-node"] = name
    return group


def submitter_pod(cluster: dict[str, Any], image: str, team: str) -> dict[str, Any]:
    """The pod KubeRay runs `ray job submit` in (K8sJobMode): the head's pod security settings and Ray token (the
    namespace enforces the restricted Pod Security level, which KubeRay's default submitter pod would fail), no
    API token, the department's ServiceAccount; KubeRay fills in the command."""
    head = cluster["headGroupSpec"]["template"]["spec"]
    ray = head["containers"][0]
    env = [e for e in ray.get("env", []) if e["name"] in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")]
    mounts = [m for m in ray.get("volumeMounts", []) if m["name"] == "tmp"]
    return {
        "metadata": {"labels": {TEAM_LABEL: team, "biomedgpt.io/ray-node": "submitter"}},
        "spec": {
            "serviceAccountName": head["serviceAccountName"],
            "automountServiceAccountToken": False,
            "restartPolicy": "Never",
            "securityContext": copy.deepcopy(head.get("securityContext", {})),
            "containers": [{
                "name": "ray-job-submitter", "image": image, "imagePullPolicy": ray.get("imagePullPolicy", "IfNotPresent"),
                "env": copy.deepcopy(env),
                "securityContext": copy.deepcopy(ray.get("securityContext", {})),
                "resources": {side: {"cpu": "500m", "memory": "1Gi", "ephemeral-storage": "1Gi"}
                              for side in ("requests", "limits")},
                "volumeMounts": copy.deepcopy(mounts),
            }],
            "volumes": [copy.deepcopy(v) for v in head.get("volumes", []) if v["name"] == "tmp"],
        },
    }


def choose_gpu_type(spec: Any, tenants: Tenants, requested: str | None) -> str:
    team = tenants.team(spec.team)
    inst = tenants.institutions[team.institution]
    if requested:
        if requested not in tenants.gpu_types:
            raise ValueError(f"--gpu-type {requested!r}: not a GPU type of {tenants.path} "
                             f"({', '.join(tenants.gpu_types)})")
        if requested not in inst.gpus:
            raise ValueError(f"--gpu-type {requested!r}: institution {inst.name!r} has no quota for it "
                             f"({', '.join(inst.gpus) or 'no GPU quota'})")
        return requested
    for name in tenants.gpu_types:
        lim = inst.gpus.get(name)
        if lim is not None and lim.nominal + (lim.borrowing or 0) >= spec.trainer.workers:
            return name
    raise ValueError(f"{spec.source}: trainer.workers {spec.trainer.workers}: institution {inst.name!r} cannot get "
                     f"that many GPUs of one type (quota: { {k: str(v.nominal) for k, v in inst.gpus.items()} })")


def rayjob_manifests(spec: Any, spec_path: str | Path, tenants: Tenants, options: RayJobOptions | None = None,
                     *, base: Path | None = None) -> list[dict[str, Any]]:
    """[ConfigMap with the spec, RayJob] for a job spec (admitted first; AdmissionError otherwise)."""
    options = options or RayJobOptions()
    if spec.kind == "serve":
        raise ValueError(f"{spec.source}: kind 'serve' runs as a RayService: declare `serving` for the department "
                         f"in {tenants.path}, render, and apply k8s/overlays/{spec.team}/")
    audited_admit("k8s rayjob", spec, tenants, on_cluster=True)
    team = tenants.team(spec.team)
    repo = tenants.path.resolve().parent.parent
    base = base or repo / "k8s" / "base" / "raycluster" / "raycluster.yaml"
    template = yaml.safe_load(Path(base).read_text())
    cluster = copy.deepcopy(template["spec"])
    image = options.image or tenants.image
    t = spec.trainer

    # Kueue reserves the whole cluster at admission: fixed sizes, no autoscaler.
    cluster["enableInTreeAutoscaling"] = False
    cluster.pop("autoscalerOptions", None)
    by_name = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    groups = []
    if options.data_workers > 0:
        groups.append(_fixed(by_name["cpu-preprocess"], "cpu-preprocess", options.data_workers))
    if t.use_gpu:
        gpu_type = choose_gpu_type(spec, tenants, options.gpu_type)
        g = tenants.gpu_types[gpu_type]
        per_pod = min(t.workers, g.gpus_per_node)
        if t.workers % per_pod:
            raise ValueError(f"{spec.source}: trainer.workers {t.workers} does not fill {g.name} nodes of "
                             f"{g.gpus_per_node} GPUs evenly; use a divisor or a multiple of {g.gpus_per_node}")
        group = _fixed(by_name[f"gpu-{gpu_type}"], f"gpu-{gpu_type}", t.workers // per_pod)
        memory = format_quantity(parse_quantity(g.memory_per_gpu) * per_pod, binary=True)
        _scale(group["template"]["spec"]["containers"][0]["resources"], str(g.cpus_per_gpu * per_pod), memory, per_pod)
        groups.append(group)
    else:
        cpus = max(1, math.ceil(t.cpus_per_worker))
        group = _fixed(by_name["cpu-preprocess"], "cpu-train", t.workers)
        _scale(group["template"]["spec"]["containers"][0]["resources"], str(cpus), f"{4 * cpus}Gi", None)
        groups.append(group)
    cluster["workerGroupSpecs"] = groups

    name = rayjob_name(team.department, spec.name)
    spec_file = spec_path_in_image(spec_path, repo)
    head = cluster["headGroupSpec"]["template"]["spec"]
    head.setdefault("volumes", []).append({"name": SPEC_VOLUME, "configMap": {"name": f"{name}-spec"}})
    head["containers"][0].setdefault("volumeMounts", []).append(
        {"name": SPEC_VOLUME, "mountPath": spec_file, "subPath": "spec.yaml", "readOnly": True})
    for pod in [head] + [grp["template"]["spec"] for grp in groups]:
        _set_image(pod, image)
        department_pod(pod, team)  # the department's own ServiceAccount and storage settings
        pod["automountServiceAccountToken"] = False  # no autoscaler: no pod of a RayJob talks to the API server
    for template in [cluster["headGroupSpec"]["template"]] + [grp["template"] for grp in groups]:
        template.setdefault("metadata", {}).setdefault("labels", {})[TEAM_LABEL] = team.name

    text = Path(spec_path).read_text()
    labels = {TEAM_LABEL: team.name, INSTITUTION_LABEL: team.institution, "biomedgpt.io/job-kind": spec.kind,
              "biomedgpt.io/job-name": spec.name, "app.kubernetes.io/part-of": "biomedgpt"}
    configmap = {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": f"{name}-spec", "namespace": team.namespace, "labels": dict(labels),
                     "annotations": {"biomedgpt.io/spec-sha256": hashlib.sha256(text.encode()).hexdigest(),
                                     "biomedgpt.io/spec-path": spec_file}},
        "data": {"spec.yaml": text},
    }
    runtime_env = {"env_vars": {ON_CLUSTER_ENV: "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
                                "BIOMEDGPT_TEAM": team.name}}
    job_spec: dict[str, Any] = {
        "entrypoint": f"biomedgpt run {spec_file}",
        "runtimeEnvYAML": dump_one(runtime_env),
        "submissionMode": "K8sJobMode",
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": options.ttl_seconds,
        "backoffLimit": options.retries,
    }
    if options.deadline_seconds:
        job_spec["activeDeadlineSeconds"] = options.deadline_seconds
    job_spec["submitterPodTemplate"] = submitter_pod(cluster, image, team.name)
    job_spec["rayClusterSpec"] = cluster
    rayjob = {
        "apiVersion": "ray.io/v1", "kind": "RayJob",
        "metadata": {"name": name, "namespace": team.namespace,
                     "labels": {**labels, QUEUE_LABEL: team.queue,
                                PRIORITY_LABEL: tenants.priority_for(spec.kind).name}},
        "spec": job_spec,
    }
    return [configmap, rayjob]
