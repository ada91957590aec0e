"""Every manifest under k8s/, static and rendered, validates strictly; every overlay builds with
`kubectl kustomize`; names between objects resolve; and the validator catches what the API server
(and the operators) would refuse."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from biomedgpt.cluster.validate import (QUEUE_LABEL, check_references, kustomize_build, kustomize_dirs,
                                        load_documents)

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
FILES = sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")
DIRS = kustomize_dirs(K8S)


def test_there_is_something_to_validate():
    assert len(FILES) >= 20 and len(DIRS) >= 10
    assert (K8S / "kustomization.yaml").is_file() and (K8S / "base" / "raycluster" / "kustomization.yaml").is_file()


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_file_validates_strictly(path, validator):
    objs = load_documents(path.read_text())
    assert objs
    assert validator.validate(objs, str(path)) == []


@pytest.mark.parametrize("directory", DIRS, ids=lambda p: str(p.relative_to(REPO)))
def test_kustomize_builds_and_the_result_validates(directory, builds, validator):
    objs = builds[directory]
    assert objs, directory
    assert validator.validate(objs, f"kubectl kustomize {directory}") == []


def test_the_top_level_build_is_the_whole_tenancy(builds, tenants):
    kinds = sorted({o["kind"] for o in builds[K8S]})
    assert kinds == ["ClusterQueue", "LimitRange", "LocalQueue", "Namespace", "NetworkPolicy", "ResourceFlavor",
                     "ResourceQuota", "Role", "RoleBinding", "Secret", "ServiceAccount", "WorkloadPriorityClass"]
    assert len([o for o in builds[K8S] if o["kind"] == "Namespace"]) == len(tenants.institutions)


def test_names_between_objects_resolve(cluster_objects):
    assert check_references(cluster_objects) == []


def test_kustomize_failure_is_reported(tmp_path):
    from biomedgpt.cluster.validate import ManifestError

    (tmp_path / "kustomization.yaml").write_text("resources: [missing.yaml]\n")
    with pytest.raises(ManifestError, match="kubectl kustomize failed"):
        kustomize_build(tmp_path)


# ----------------------------------------------------------------------------------------------
# The validator catches what the cluster would refuse
# ----------------------------------------------------------------------------------------------


def base(kind: str) -> dict:
    name = {"RayCluster": "raycluster", "RayService": "rayservice"}[kind]
    return yaml.safe_load((K8S / "base" / name / f"{name}.yaml").read_text())


def rendered(rel: str, index: int = 0) -> dict:
    return load_documents((K8S / rel).read_text())[index]


def problems_after(validator, obj: dict, mutate) -> list[str]:
    obj = copy.deepcopy(obj)
    mutate(obj)
    return validator.problems(obj)


def head(o):
    return o["spec"]["headGroupSpec"]["template"]["spec"]


@pytest.mark.parametrize("what, obj, mutate, expected", [
    # CRD schema, strict: a field the schema does not declare is an error (kubectl --validate=strict)
    ("misspelt RayCluster field", lambda: base("RayCluster"),
     lambda o: o["spec"].__setitem__("enableInTreeAutoscalling", True),
     "spec: unknown field ('enableInTreeAutoscalling' was unexpected)"),
    ("misspelt container field in a pod template", lambda: base("RayCluster"),
     lambda o: head(o)["containers"][0].__setitem__("resource", {}),
     "spec.headGroupSpec.template.spec.containers[0]: unknown field ('resource' was unexpected)"),
    ("rayStartParams values are strings", lambda: base("RayCluster"),
     lambda o: o["spec"]["headGroupSpec"]["rayStartParams"].__setitem__("num-cpus", 0),
     "spec.headGroupSpec.rayStartParams.num-cpus: 0 is not of type 'string'"),
    ("quantities are integers or strings", lambda: base("RayCluster"),
     lambda o: head(o)["containers"][0]["resources"]["requests"].__setitem__("cpu", 0.5),
     "resources.requests.cpu: 0.5 is not valid under any of the given schemas"),
    ("enum", lambda: rendered("kueue/cluster-queues.yaml"),
     lambda o: o["spec"].__setitem__("queueingStrategy", "FIFO"), "spec.queueingStrategy: 'FIFO' is not one of"),
    ("unknown metadata field", lambda: rendered("kueue/resource-flavors.yaml"),
     lambda o: o["metadata"].__setitem__("label", {}), "metadata: unknown field ('label' was unexpected)"),
    # CEL rules of the CRDs (x-kubernetes-validations), after the API server's defaulting
    ("borrowing without a cohort", lambda: rendered("kueue/cluster-queues.yaml"),
     lambda o: o["spec"].pop("cohortName"), "spec: borrowingLimit must be nil when cohort is empty"),
    ("borrowWithinCohort needs reclaimWithinCohort (defaulted to Never)", lambda: rendered("kueue/cluster-queues.yaml"),
     lambda o: o["spec"]["preemption"].pop("reclaimWithinCohort"),
     "spec.preemption: reclaimWithinCohort=Never and borrowWithinCohort.Policy!=Never"),
    ("every flavor covers every resource of its group", lambda: rendered("kueue/cluster-queues.yaml"),
     lambda o: o["spec"]["resourceGroups"][0]["flavors"][0]["resources"].pop(),
     "spec.resourceGroups[0]: flavors must have the same number of resources as the coveredResources"),
    ("toleration value with operator Exists", lambda: rendered("kueue/resource-flavors.yaml", 1),
     lambda o: o["spec"]["tolerations"][0].__setitem__("value", "x"), "spec.tolerations"),
    # list-type map keys
    ("duplicate container names", lambda: base("RayCluster"),
     lambda o: head(o)["containers"].append(copy.deepcopy(head(o)["containers"][0])),
     "spec.headGroupSpec.template.spec.containers: duplicate entry with {'name': 'ray-head'}"),
    # KubeRay and Kueue rules
    ("autoscaler v2 and restartPolicy", lambda: base("RayCluster"),
     lambda o: o["spec"]["workerGroupSpecs"][0]["template"]["spec"].__setitem__("restartPolicy", "Always"),
     "restartPolicy: must be Never or unset with autoscaler v2"),
    ("Kueue and an autoscaling cluster that is not elastic", lambda: base("RayCluster"),
     lambda o: (o["metadata"]["labels"].__setitem__(QUEUE_LABEL, "radiology"), o["metadata"].pop("annotations")),
     "Kueue admits an autoscaling Ray cluster only as an elastic job"),
    ("KubeRay name length", lambda: base("RayService"),
     lambda o: o["metadata"].__setitem__("name", "s" * 48), "RayService names may have at most 47 characters"),
    ("serve config without applications", lambda: base("RayService"),
     lambda o: o["spec"].__setitem__("serveConfigV2", "proxy_location: EveryNode\n"), "spec.serveConfigV2: needs"),
    ("label values", lambda: base("RayCluster"),
     lambda o: o["metadata"]["labels"].__setitem__("biomedgpt.io/team", "not valid!"), "is not a valid label value"),
    # core kinds through kubernetes-validate's strict schemas
    ("misspelt ResourceQuota field", lambda: rendered("tenants/mayo-like/resource-quota.yaml"),
     lambda o: o["spec"].__setitem__("hardd", {}), "spec: unknown field ('hardd' was unexpected)"),
    ("RoleBinding without roleRef", lambda: rendered("tenants/mayo-like/rbac.yaml", 1),
     lambda o: o.pop("roleRef"), "'roleRef' is a required property"),
    ("a kind nobody knows", lambda: rendered("tenants/mayo-like/namespace.yaml"),
     lambda o: o.__setitem__("kind", "Namespaces"), "has no schema for v1 Namespaces"),
    ("a KubeRay version the CRDs do not serve", lambda: base("RayCluster"),
     lambda o: o.__setitem__("apiVersion", "ray.io/v2"), "no CRD in the schema folder serves ray.io/v2 RayCluster"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_validator_catches(validator, what, obj, mutate, expected):
    original = obj()
    assert validator.problems(original) == []
    found = problems_after(validator, original, mutate)
    assert any(expected in p for p in found), (what, found)


def test_references_that_point_nowhere(cluster_objects):
    objs = copy.deepcopy(cluster_objects)
    lq = next(o for o in objs if o["kind"] == "LocalQueue")
    lq["spec"]["clusterQueue"] = "nowhere"
    rc = next(o for o in objs if o["kind"] == "RayCluster" and o["metadata"].get("namespace"))
    rc["metadata"]["labels"][QUEUE_LABEL] = "no-queue"
    rc["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] = "urgent"
    rc["spec"]["headGroupSpec"]["template"]["spec"]["serviceAccountName"] = "default-sa"
    found = check_references(objs)
    assert any("spec.clusterQueue 'nowhere' names no ClusterQueue" in p for p in found)
    assert any("queue-name=no-queue names no LocalQueue" in p for p in found)
    assert any("priority-class=urgent names no WorkloadPriorityClass" in p for p in found)
    assert any("serviceAccountName 'default-sa' names no ServiceAccount" in p for p in found)


def test_core_validation_agrees_with_kubernetes_validate(validator, builds):
    """Our compiled-once use of kubernetes-validate's strict schemas gives its verdicts."""
    import kubernetes_validate

    core = [o for o in builds[K8S] if "x-k8s.io" not in o["apiVersion"]]
    assert len(core) >= 15
    for obj in core:
        for broken in (obj, {**obj, "spek": {}}, {**obj, "metadata": {**obj["metadata"], "lables": {}}}):
            ours = validator.problems(broken)
            try:
                kubernetes_validate.validate(broken, validator.kubernetes_version, strict=True)
                theirs = []
            except kubernetes_validate.ValidationError as err:
                theirs = [err.message]
            assert bool(ours) == bool(theirs), (obj["kind"], ours, theirs)


def test_cluster_validate_finds_the_repository_crds_without_anything_beside_the_checkout(monkeypatch):
    """A clone alone validates: the default CRD folder is the repository's, read compressed as it is stored."""
    from biomedgpt.cluster.check import default_crd_dir
    from biomedgpt.cluster.validate import load_crds

    monkeypatch.delenv("BIOMEDGPT_CRDS", raising=False)
    crds = load_crds(default_crd_dir())
    kinds = {kind for _, kind in crds}
    assert {"RayJob", "RayService", "RayCluster", "ClusterQueue", "LocalQueue", "ResourceFlavor"} <= kinds
