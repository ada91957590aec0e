"""`biomedgpt cluster render`: tenants.yaml -> k8s/, and what the rendered cluster promises."""

from __future__ import annotations

import re
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import yaml
from cluster_testing import run_cli

from biomedgpt.tenancy.quantity import parse_quantity
from biomedgpt.cluster.render import WORKDIR, max_usable, render, rayservice_serve_spec, stale_files
from biomedgpt.serve.spec import IMPORT_PATH, INGRESS_DEPLOYMENT, MODELS_DEPLOYMENT, SERVE_RAY_ENV, deploy_config
from biomedgpt.spec import load_serve_spec, serve_spec_from_dict
from biomedgpt.tenancy import load_tenants

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"


def by_kind(objs, kind):
    return [o for o in objs if o["kind"] == kind]


def test_k8s_is_what_tenants_yaml_renders(tenants):
    files = render(tenants, K8S / "base")
    assert files == render(tenants, K8S / "base")  # deterministic
    assert stale_files(files, K8S) == [], "k8s/ is stale: run `biomedgpt cluster render`"
    assert all(text.startswith("# Rendered by `biomedgpt cluster render` from cluster/tenants.yaml")
               for text in files.values())


def test_render_command_writes_the_tree_and_removes_what_is_no_longer_rendered(tmp_path, tenants_file):
    out = tmp_path / "k8s"
    (out / "base").mkdir(parents=True)
    for sub in ("raycluster", "rayservice"):
        (out / "base" / sub).mkdir()
        for f in (K8S / "base" / sub).iterdir():
            (out / "base" / sub / f.name).write_text(f.read_text())
    (out / "overlays" / "gone-team").mkdir(parents=True)
    (out / "overlays" / "gone-team" / "kustomization.yaml").write_text("resources: []\n")

    def one_more(d):  # a fourth institution that takes a GPU from charite-like
        d["institutions"]["charite-like"]["quota"]["gpus"]["a100-80gb"]["nominal"] = 7
        d["institutions"]["charite-like"]["quota"]["gpus"]["a100-80gb"]["lendingLimit"] = 4
        d["institutions"]["kyoto-like"] = {
            "displayName": "Kyoto-like University Hospital", "groups": ["oidc:kyoto-like:users"],
            "quota": {"cpu": {"nominal": 0}, "memory": {"nominal": 0}, "gpus": {"a100-80gb": {"nominal": 1}}},
            "departments": {"ophthalmology": {"storage": ["s3://biomedgpt-kyoto-like/ophthalmology/"],
                                              "datasets": {"open": ["retinamnist", "octmnist"]}}}}

    path = tenants_file(one_more)
    assert run_cli(["cluster", "render", "--tenants", str(path), "--out", str(out)]) == 0
    assert (out / "tenants" / "kyoto-like" / "namespace.yaml").is_file()
    assert (out / "overlays" / "kyoto-like-ophthalmology" / "kustomization.yaml").is_file()
    assert not (out / "overlays" / "gone-team").exists()
    assert (out / "base" / "raycluster" / "raycluster.yaml").is_file()  # static part left alone
    assert (path.parent / "tenants.schema.json").is_file()
    assert stale_files(render(load_tenants(path), out / "base"), out) == []


def test_per_institution_namespace_quota_limits_rbac_and_queues(tenants, cluster_objects):
    for inst in tenants.institutions.values():
        ns = inst.namespace
        mine = [o for o in cluster_objects if o["metadata"].get("namespace") == ns or
                (o["kind"] == "Namespace" and o["metadata"]["name"] == ns)]
        kinds = sorted({o["kind"] for o in mine})
        assert {"Namespace", "ResourceQuota", "LimitRange", "ServiceAccount", "Role", "RoleBinding",
                "LocalQueue"} <= set(kinds), (ns, kinds)
        queues = {o["metadata"]["name"]: o for o in by_kind(mine, "LocalQueue")}
        assert set(queues) == set(inst.departments)
        assert {q["spec"]["clusterQueue"] for q in queues.values()} == {inst.name}
        binding = next(o for o in by_kind(mine, "RoleBinding") if o["roleRef"]["name"] == "biomedgpt-submitter")
        assert [s["name"] for s in binding["subjects"]] == list(inst.groups)
        assert by_kind(mine, "Namespace")[0]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_cluster_queues_share_one_cohort_with_quotas_per_flavor(tenants, cluster_objects):
    flavors = {o["metadata"]["name"]: o for o in by_kind(cluster_objects, "ResourceFlavor")}
    assert set(flavors) == {tenants.cpu_flavor, *tenants.gpu_types}
    for name, g in tenants.gpu_types.items():
        assert flavors[name]["spec"]["nodeLabels"] == dict(g.node_labels)
    queues = {o["metadata"]["name"]: o for o in by_kind(cluster_objects, "ClusterQueue")}
    assert set(queues) == set(tenants.institutions)
    gpu_totals = {g: Fraction(0) for g in tenants.gpu_types}
    for name, q in queues.items():
        spec, inst = q["spec"], tenants.institutions[name]
        assert spec["cohortName"] == tenants.cohort
        assert spec["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": inst.namespace}}
        # preemption reclaims lent quota; inside an institution higher priority wins
        assert spec["preemption"]["reclaimWithinCohort"] == "Any"
        assert spec["preemption"]["withinClusterQueue"] == "LowerPriority"
        gpu_group = next(g for g in spec["resourceGroups"] if g["coveredResources"] == ["nvidia.com/gpu"])
        for flavor in gpu_group["flavors"]:
            (res,) = flavor["resources"]
            lim = inst.gpus[flavor["name"]]
            assert parse_quantity(res["nominalQuota"]) == lim.nominal
            assert parse_quantity(res["borrowingLimit"]) == lim.borrowing
            assert parse_quantity(res["lendingLimit"]) == lim.lending
            gpu_totals[flavor["name"]] += lim.nominal
    # the rendered ClusterQueues share out exactly the inventory
    assert gpu_totals == {name: g.gpus for name, g in tenants.gpu_types.items()}


def test_priorities_serving_over_fine_tuning_over_pretraining(cluster_objects, tenants):
    value = {o["metadata"]["name"]: o["value"] for o in by_kind(cluster_objects, "WorkloadPriorityClass")}
    assert value["serving"] > value["fine-tuning"] > value["pretraining"]
    assert tenants.priority_for("serve").name == "serving"
    assert tenants.priority_for("finetune").name == "fine-tuning"
    assert tenants.priority_for("pretrain").name == "pretraining"


def test_resource_quota_is_nominal_plus_what_can_be_borrowed(tenants, cluster_objects):
    stanford = tenants.institutions["stanford-like"]
    # a100: own 12, may borrow 8 (others lend 8 + 4 = 12 >= 8); h100: own 8, borrow 8 capped by 2 + 2 lent
    assert max_usable(tenants, stanford, "gpu", "a100-80gb") == 20
    assert max_usable(tenants, stanford, "gpu", "h100-80gb") == 12
    quota = next(o for o in by_kind(cluster_objects, "ResourceQuota") if o["metadata"]["namespace"] == "stanford-like")
    assert quota["spec"]["hard"]["requests.nvidia.com/gpu"] == "32"
    assert parse_quantity(quota["spec"]["hard"]["requests.cpu"]) == 320 + 128


def test_overlays_put_the_base_in_the_team_queue_with_its_priority(tenants, builds):
    for team in (t for t in tenants.teams.values() if not t.local_only):
        objs = builds[K8S / "overlays" / team.name]
        kinds = sorted(o["kind"] for o in objs)
        assert kinds == (["RayCluster", "RayService"] if team.serving else ["RayCluster"]), team.name
        for o in objs:
            labels = o["metadata"]["labels"]
            assert o["metadata"]["namespace"] == team.namespace
            assert labels["kueue.x-k8s.io/queue-name"] == team.queue
            assert labels["biomedgpt.io/team"] == team.name
            want = "serving" if o["kind"] == "RayService" else "fine-tuning"
            assert labels["kueue.x-k8s.io/priority-class"] == want
            assert o["metadata"]["annotations"]["kueue.x-k8s.io/elastic-job"] == "true"
        if team.serving:
            service = by_kind(objs, "RayService")[0]
            config = yaml.safe_load(service["spec"]["serveConfigV2"])
            assert config == deploy_config(rayservice_serve_spec(tenants, team.name))
            (group,) = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
            assert group["template"]["spec"]["nodeSelector"] == dict(tenants.gpu_types[team.serving.gpu_type].node_labels)
            assert (group["minReplicas"], group["maxReplicas"]) == (team.serving.min_replicas, team.serving.max_replicas)


def test_base_raycluster_has_cpu_preprocessing_and_one_gpu_group_per_gpu_type(tenants):
    rc = yaml.safe_load((K8S / "base" / "raycluster" / "raycluster.yaml").read_text())
    spec = rc["spec"]
    assert spec["enableInTreeAutoscaling"] is True and spec["rayVersion"] == tenants.ray_version
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert "cpu-preprocess" in groups
    assert "nvidia.com/gpu" not in groups["cpu-preprocess"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert {n for n in groups if n.startswith("gpu-")} == {f"gpu-{g}" for g in tenants.gpu_types}
    for name, g in tenants.gpu_types.items():
        pod = groups[f"gpu-{name}"]["template"]["spec"]
        assert pod["nodeSelector"] == dict(g.node_labels)
        limits = pod["containers"][0]["resources"]["limits"]
        assert (limits["nvidia.com/gpu"], parse_quantity(limits["cpu"]), limits["memory"]) == \
            ("1", g.cpus_per_gpu, g.memory_per_gpu)
        assert groups[f"gpu-{name}"]["maxReplicas"] == g.gpus


def ray_containers(obj):
    from biomedgpt.cluster.validate import _pod_specs

    for _, pod in _pod_specs(obj):
        yield from pod.get("containers", [])


def test_every_ray_container_uses_the_image_and_cluster_environment(tenants, cluster_objects, builds):
    objs = [o for objs in builds.values() for o in objs if o["kind"] in ("RayCluster", "RayService", "RayJob")]
    assert objs
    for o in objs:
        for c in ray_containers(o):
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            assert env.get("BIOMEDGPT_ON_CLUSTER") == "1", o["metadata"]["name"]
            assert env.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "1", o["metadata"]["name"]
            assert c["image"] == tenants.image
    rs = yaml.safe_load((K8S / "base" / "rayservice" / "rayservice.yaml").read_text())
    assert rs["spec"]["rayClusterConfig"]["rayVersion"] == tenants.ray_version


def test_dockerfile_builds_from_rays_official_image_matching_the_project(tenants):
    import ray

    from biomedgpt.cluster.rayjob import WORKDIR

    text = (REPO / "cluster" / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, flags=re.M))
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-\$\{PYTHON_TAG\}-gpu$", text, flags=re.M)
    assert args["RAY_VERSION"] == ray.__version__ == tenants.ray_version
    assert args["PYTHON_TAG"] == f"py{sys.version_info.major}{sys.version_info.minor}"
    makefile = (REPO / "Makefile").read_text()
    assert f"TORCH_VERSION := {args['TORCH_VERSION']}" in makefile
    assert re.search(rf"^WORKDIR {re.escape(WORKDIR)}$", text, flags=re.M)
    assert f"ray{tenants.ray_version}" in tenants.image.rsplit(":", 1)[1]
    assert "-c constraints.txt" in text
    for copied in re.findall(r"^COPY \S+ (.+) \S+$", text, flags=re.M):
        for path in copied.split():
            assert (REPO / path).exists(), path


# ----------------------------------------------------------------------------------------------
# The RayService runs the serving application (biomedgpt.serve.app) over the department's registry
# ----------------------------------------------------------------------------------------------

# Ray Serve's high-throughput mode (Ray >= 2.55), without its direct ingress (meant for HAProxy in front of
# each pod; without it Serve's proxy would run on the head only)
THROUGHPUT_ENV = SERVE_RAY_ENV


def served(tenants, builds):
    """(team, the RayService its overlay builds) for every serving department."""
    out = [(t, by_kind(builds[K8S / "overlays" / t.name], "RayService")[0])
           for t in tenants.teams.values() if t.serving]
    assert len(out) >= 2
    return out


def serve_app(service) -> dict:
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config)  # what Ray Serve accepts as a config file
    (app,) = config["applications"]
    return app


def config_proxy(service) -> dict:
    return yaml.safe_load(service["spec"]["serveConfigV2"])["http_options"]


def test_rayservice_serves_the_department_registry_with_its_replica_bounds(tenants, builds):
    base = load_serve_spec(REPO / "jobs" / "serve" / "cluster.yaml")
    assert tenants.serving_spec == REPO / "jobs" / "serve" / "cluster.yaml"
    dockerfile = (REPO / "cluster" / "Dockerfile").read_text()
    for team, service in served(tenants, builds):
        app = serve_app(service)
        assert app["import_path"] == IMPORT_PATH == "biomedgpt.serve.app:app_builder"
        spec = serve_spec_from_dict(app["args"]["spec"], app["args"]["source"])
        assert spec.registry == team.serving.registry and spec.model_dir is None and spec.auth
        # the tenants file (every department's API keys) where the image has it
        assert spec.tenants == f"{WORKDIR}/cluster/tenants.yaml"
        assert f"BIOMEDGPT_TENANTS={spec.tenants}" in dockerfile
        assert (spec.http.host, spec.http.port) == ("0.0.0.0", 8000)
        assert config_proxy(service) == {"host": "0.0.0.0", "port": 8000, "request_timeout_s": 65.0}  # ingress 60 s + margin
        a = spec.models.autoscaling
        assert (a.min_replicas, a.max_replicas) == (team.serving.min_replicas, team.serving.max_replicas)
        assert spec.models.num_gpus == 1
        # everything else as jobs/serve/cluster.yaml says
        assert (spec.ingress, spec.limits, spec.models.batch) == (base.ingress, base.limits, base.models.batch)
        b = base.models
        assert (spec.models.num_cpus, spec.models.max_models_per_replica, a.target_ongoing_requests) == \
            (b.num_cpus, b.max_models_per_replica, b.autoscaling.target_ongoing_requests)
        deployments = {d["name"]: d for d in app["deployments"]}
        assert list(deployments) == [INGRESS_DEPLOYMENT, MODELS_DEPLOYMENT]
        assert list(deployments) == ["BiomedGPTIngress", "BiomedGPTModels"]
        models = deployments["BiomedGPTModels"]
        assert (models["autoscaling_config"]["min_replicas"], models["autoscaling_config"]["max_replicas"]) == \
            (team.serving.min_replicas, team.serving.max_replicas)
        assert models["ray_actor_options"]["num_gpus"] == 1
        # one model replica per GPU worker
        (group,) = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
        assert (group["minReplicas"], group["maxReplicas"]) == (a.min_replicas, a.max_replicas)


def test_rayservice_containers_run_serve_in_throughput_mode_on_port_8000(tenants, builds):
    base = yaml.safe_load((K8S / "base" / "rayservice" / "rayservice.yaml").read_text())
    for name, service in [("base", base), *((t.name, s) for t, s in served(tenants, builds))]:
        cluster = service["spec"]["rayClusterConfig"]
        pods = [cluster["headGroupSpec"]["template"]["spec"]]
        pods += [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
        assert len(pods) == 2, name  # head and gpu-serve
        for pod in pods:
            for c in pod["containers"]:
                env = {e["name"]: e.get("value") for e in c.get("env", [])}
                assert THROUGHPUT_ENV.items() <= env.items(), (name, c["name"])
                assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
                assert {"name": "serve", "containerPort": 8000} in c["ports"], (name, c["name"])


def test_one_gpu_worker_holds_a_model_replica_and_the_ingress(tenants, builds):
    """The head runs no Serve replicas (num-cpus 0): unless a gpu-serve worker fits a model replica and every
    ingress replica, Ray's autoscaler would start GPU workers for the ingress alone."""
    for team, service in served(tenants, builds):
        cluster = service["spec"]["rayClusterConfig"]
        assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
        (group,) = cluster["workerGroupSpecs"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        spec = serve_spec_from_dict(serve_app(service)["args"]["spec"])
        need = spec.models.num_cpus + spec.ingress.replicas * spec.ingress.num_cpus
        assert need <= parse_quantity(limits["cpu"]) <= tenants.gpu_types[team.serving.gpu_type].cpus_per_gpu
        assert spec.models.num_gpus == parse_quantity(limits["nvidia.com/gpu"]) == 1


def test_render_refuses_a_serving_spec_that_does_not_fit_a_gpu_worker(tenants_file, tmp_path):
    text = (REPO / "jobs" / "serve" / "cluster.yaml").read_text()
    (tmp_path / "serve.yaml").write_text(text.replace("  num_cpus: 8\n", "  num_cpus: 9\n"))
    tenants = load_tenants(tenants_file(lambda d: d.__setitem__("servingSpec", str(tmp_path / "serve.yaml"))))
    with pytest.raises(ValueError, match=r"serve\.yaml for stanford-like-radiology .*models\.num_cpus 9\.0 \+ "
                                         r"ingress\.replicas 2 x ingress\.num_cpus 1\.0 CPUs .* do not fit "
                                         r"the 10 CPUs"):
        render(tenants, K8S / "base")


def test_the_serve_config_builds_the_application_without_ray(tenants, builds):
    """What KubeRay hands to Serve: the import path's builder makes the application from the args (binding
    deployments starts nothing; the replicas load the registry and the tenants file when they start)."""
    import importlib

    import ray

    base = yaml.safe_load((K8S / "base" / "rayservice" / "rayservice.yaml").read_text())
    for name, service in [("base", base), *((t.name, s) for t, s in served(tenants, builds))]:
        app = serve_app(service)
        module, attr = app["import_path"].split(":")
        built = getattr(importlib.import_module(module), attr)(app["args"])
        assert type(built).__name__ == "Application", name
        ingress = built._bound_deployment
        (models,) = [a._bound_deployment for a in ingress.init_args if type(a).__name__ == "Application"]
        assert (ingress.name, models.name) == ("BiomedGPTIngress", "BiomedGPTModels"), name
        assert models.ray_actor_options["num_gpus"] == 1, name
    assert not ray.is_initialized()
