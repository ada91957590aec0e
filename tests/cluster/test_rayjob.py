"""`biomedgpt k8s rayjob SPEC`: admitted, sized from the spec, queued in the team's LocalQueue,
valid against the CRDs, and printed so that `| kubectl apply -f -` works; and the other commands."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from cluster_testing import cluster_parser, run_cli

from biomedgpt.cluster.rayjob import WORKDIR, RayJobOptions, rayjob_manifests, rayjob_name
from biomedgpt.cluster.validate import check_references, load_documents
from biomedgpt.spec import load_spec, spec_from_dict
from biomedgpt.tenancy import AdmissionError

REPO = Path(__file__).resolve().parents[2]
JOBS = sorted((REPO / "cluster" / "jobs").glob("*.yaml"))


def groups(rayjob) -> dict:
    return {g["groupName"]: g for g in rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]}


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_example_job_specs_become_valid_kueue_rayjobs(path, tenants, validator, cluster_objects):
    spec = load_spec(path)
    configmap, rayjob = rayjob_manifests(spec, path, tenants)
    assert validator.validate([configmap, rayjob], str(path)) == []
    assert check_references([configmap, rayjob], known=cluster_objects) == []
    team = tenants.team(spec.team)
    meta, js = rayjob["metadata"], rayjob["spec"]
    assert meta["namespace"] == team.namespace
    assert meta["labels"]["kueue.x-k8s.io/queue-name"] == team.queue
    assert meta["labels"]["kueue.x-k8s.io/priority-class"] == "fine-tuning"
    # the spec travels with the job and is what `biomedgpt run` runs
    in_image = f"{WORKDIR}/{path.relative_to(REPO).as_posix()}"
    assert js["entrypoint"] == f"biomedgpt run {in_image}"
    assert configmap["data"]["spec.yaml"] == path.read_text()
    mount = next(m for m in js["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMounts"]
                 if m["name"] == "job-spec")
    assert (mount["mountPath"], mount["subPath"]) == (in_image, "spec.yaml")
    env = yaml.safe_load(js["runtimeEnvYAML"])["env_vars"]
    assert env["BIOMEDGPT_ON_CLUSTER"] == "1" and env["BIOMEDGPT_TEAM"] == team.name
    # Kueue reserves the cluster up front: fixed sizes, no autoscaler, cleaned up after the job
    assert js["shutdownAfterJobFinishes"] is True and js["ttlSecondsAfterFinished"] == 3600
    assert js["rayClusterSpec"]["enableInTreeAutoscaling"] is False
    for g in groups(rayjob).values():
        assert g["replicas"] == g["minReplicas"] == g["maxReplicas"]
    gpu = [g for n, g in groups(rayjob).items() if n.startswith("gpu-")]
    (group,) = gpu
    per_pod = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert per_pod * group["replicas"] == spec.trainer.workers
    assert groups(rayjob)["cpu-preprocess"]["replicas"] == 2


def test_gpu_packing_and_choice(tenants):
    spec = load_spec(JOBS[-1])  # stanford-like radiology, 8 workers
    _, rj = rayjob_manifests(spec, JOBS[-1], tenants)
    g = groups(rj)["gpu-a100-80gb"]
    limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert (g["replicas"], limits["nvidia.com/gpu"], limits["cpu"], limits["memory"]) == (1, "8", "80", "800Gi")
    spec.trainer.workers = 16
    _, rj = rayjob_manifests(spec, JOBS[-1], tenants, RayJobOptions(gpu_type="a100-80gb", data_workers=0))
    assert groups(rj)["gpu-a100-80gb"]["replicas"] == 2 and "cpu-preprocess" not in groups(rj)
    _, rj = rayjob_manifests(spec, JOBS[-1], tenants, RayJobOptions(gpu_type="h100-80gb"))
    assert groups(rj)["gpu-h100-80gb"]["template"]["spec"]["nodeSelector"] == \
        {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    spec.trainer.workers = 12
    with pytest.raises(ValueError, match="does not fill a100-80gb nodes of 8 GPUs evenly"):
        rayjob_manifests(spec, JOBS[-1], tenants)
    spec.trainer.workers = 40
    with pytest.raises(ValueError, match="cannot get that many GPUs of one type"):
        rayjob_manifests(spec, JOBS[-1], tenants)
    with pytest.raises(ValueError, match="--gpu-type 'v100'"):
        rayjob_manifests(spec, JOBS[-1], tenants, RayJobOptions(gpu_type="v100"))


def test_cpu_spec_gets_cpu_training_pods(tenants, validator):
    data = yaml.safe_load(JOBS[0].read_text())
    data["trainer"].update(use_gpu=False, workers=3, cpus_per_worker=2, precision="32-true")
    spec = spec_from_dict(data, "cpu.yaml")
    cm, rj = rayjob_manifests(spec, JOBS[0], tenants)
    g = groups(rj)["cpu-train"]
    assert g["replicas"] == 3
    assert g["template"]["spec"]["containers"][0]["resources"]["limits"] == {"cpu": "2", "memory": "8Gi",
                                                                              "ephemeral-storage": "80Gi"}
    assert not any(n.startswith("gpu-") for n in groups(rj))
    assert validator.validate([cm, rj], "cpu.yaml") == []


def test_rayjob_refuses_what_admission_refuses(tenants):
    with pytest.raises(AdmissionError, match="'demo' is a local-only team"):
        rayjob_manifests(load_spec(REPO / "jobs" / "demo" / "vqa_rad.yaml"), REPO / "jobs" / "demo" / "vqa_rad.yaml",
                         tenants)
    data = yaml.safe_load(JOBS[0].read_text())
    data["output"]["storage"] = "s3://biomedgpt-stanford-like/radiology"  # not mayo-like's
    with pytest.raises(AdmissionError, match="may not write s3://biomedgpt-stanford-like/radiology/"):
        rayjob_manifests(spec_from_dict(data, "x.yaml"), JOBS[0], tenants)
    serving = REPO / "jobs" / "serve" / "cluster.yaml"
    with pytest.raises(ValueError, match="kind 'serve' runs as a RayService"):
        rayjob_manifests(load_spec(serving), serving, tenants)


def test_rayjob_names_are_short_dns_labels():
    assert rayjob_name("radiology", "vqa-rad-ft") == "radiology-vqa-rad-ft"
    assert rayjob_name("radiology", "VQA_rad.v2") == "radiology-vqa-rad-v2"
    long = rayjob_name("ophthalmology", "a-very-long-fine-tuning-run-name-for-retinal-oct-images")
    assert len(long) <= 47 and long[0].isalpha() and long[-1].isalnum()
    assert long != rayjob_name("ophthalmology", "a-very-long-fine-tuning-run-name-for-retinal-oct-imagez")
    assert rayjob_name("3d", "x").startswith("j-")


def test_spec_outside_the_repository_is_mounted_under_jobs_submitted(tenants, tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(JOBS[0].read_text())
    cm, rj = rayjob_manifests(load_spec(path), path, tenants)
    assert rj["spec"]["entrypoint"] == f"biomedgpt run {WORKDIR}/jobs/submitted/mine.yaml"


# ----------------------------------------------------------------------------------------------
# The commands
# ----------------------------------------------------------------------------------------------


def test_k8s_rayjob_command_prints_a_stream_for_kubectl_apply(capsys, validator):
    rel = JOBS[0].relative_to(REPO)
    assert run_cli(["k8s", "rayjob", str(JOBS[0]), "--image", "registry.example/biomedgpt:test", "--ttl", "600"]) == 0
    out = capsys.readouterr().out
    docs = load_documents(out)
    assert [d["kind"] for d in docs] == ["ConfigMap", "RayJob"]
    assert docs[1]["spec"]["ttlSecondsAfterFinished"] == 600
    images = {c["image"] for g in [docs[1]["spec"]["rayClusterSpec"]["headGroupSpec"], *groups(docs[1]).values()]
              for c in g["template"]["spec"]["containers"]}
    assert images == {"registry.example/biomedgpt:test"}
    assert validator.validate(docs, str(rel)) == []


@pytest.mark.parametrize("argv", [["cluster", "--help"], ["cluster", "render", "--help"],
                                  ["cluster", "validate", "--help"], ["tenants", "add-key", "--help"],
                                  ["tenants", "revoke-key", "--help"],
                                  ["k8s", "--help"], ["k8s", "rayjob", "--help"]])
def test_every_command_has_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        cluster_parser().parse_args(argv)
    assert exit_.value.code == 0
    assert "usage: biomedgpt" in capsys.readouterr().out


def test_cluster_validate_passes_on_the_repository(capsys, crd_dir):
    assert run_cli(["cluster", "validate", "--crds", str(crd_dir)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("cluster validate: OK: ") and "2 RayJobs from cluster/jobs/" in out


def test_cluster_validate_reports_stale_k8s(tmp_path, capsys, crd_dir, tenants_file):
    def renamed(d):
        d["cluster"]["cohort"] = "renamed-cohort"

    path = tenants_file(renamed)
    code = run_cli(["cluster", "validate", "--tenants", str(path), "--k8s", str(REPO / "k8s"), "--crds", str(crd_dir)])
    err = capsys.readouterr().err
    assert code == 1
    assert "kueue/cluster-queues.yaml: differs from what" in err and "run `biomedgpt cluster render`" in err


def test_api_key_command_prints_a_key_and_a_hash_that_verifies(capsys, tenants_file):
    from biomedgpt.tenancy import load_tenants, verify_api_key

    path = tenants_file()
    assert run_cli(["tenants", "add-key", "charite-like-dermatology", "--tenants", str(path), "--id", "t1"]) == 0
    out = capsys.readouterr().out
    key = out.splitlines()[1].strip()
    assert key.startswith("t1.")
    entry = out.split("apiKeys:\n", 1)[1].splitlines()
    snippet = yaml.safe_load("\n".join(line for line in entry[:3] if line.startswith("  ")))
    data = yaml.safe_load(path.read_text())
    data["institutions"]["charite-like"]["departments"]["dermatology"]["apiKeys"] = snippet
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    assert verify_api_key("charite-like-dermatology", key, load_tenants(path))
