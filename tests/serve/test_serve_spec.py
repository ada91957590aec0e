"""Serving specs (jobs/serve/*.yaml): strict loading, and the Ray Serve config generated from them is accepted by
Ray's own schema (the app built from it is deployed and exercised in test_api.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from biomedgpt.serve.spec import IMPORT_PATH, MODELS_DEPLOYMENT, deploy_config
from biomedgpt.spec import SpecError, load_serve_spec, serve_spec_from_dict
from tests_paths import REPO

SPECS = sorted((REPO / "jobs" / "serve").glob("*.yaml"))


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_every_serving_spec_gives_a_config_ray_accepts(path):
    from ray.serve.schema import ServeDeploySchema

    spec = load_serve_spec(path)
    config = deploy_config(spec)
    parsed = ServeDeploySchema.model_validate(config)
    (app,) = parsed.applications
    assert app.import_path == IMPORT_PATH and app.args["spec"]["name"] == spec.name
    models = next(d for d in app.deployments if d.name == MODELS_DEPLOYMENT)
    a = spec.models.autoscaling
    assert models.autoscaling_config["min_replicas"] == a.min_replicas
    assert models.autoscaling_config["max_replicas"] == a.max_replicas
    assert models.ray_actor_options.num_cpus == spec.models.num_cpus
    # the builder named by the config rebuilds the same spec from its args
    assert serve_spec_from_dict(app.args["spec"], app.args["source"]).to_dict() == spec.to_dict()


def test_serve_config_command(tmp_path):
    out = tmp_path / "serve_config.yaml"
    proc = subprocess.run([sys.executable, "-m", "biomedgpt.cli", "serve-config", "jobs/serve/cluster.yaml", "-o", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    config = yaml.safe_load(out.read_text())
    assert config["applications"][0]["deployments"][1]["autoscaling_config"]["max_replicas"] == 4
    assert config["applications"][0]["deployments"][1]["ray_actor_options"] == {"num_cpus": 8.0, "num_gpus": 1.0}


def _spec(**changes):
    data = yaml.safe_load((REPO / "jobs" / "serve" / "local.yaml").read_text())
    for dotted, value in changes.items():
        node = data
        *parents, last = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return data


@pytest.mark.parametrize("changes, message", [
    ({"models__batch__max_batch_sise": 4}, "x.yaml: models.batch.max_batch_sise: unknown field (did you mean "
                                          "'max_batch_size'?)"),
    ({"models__autoscaling__max_replicas": 0}, "x.yaml: models.autoscaling.max_replicas: must be >= 1"),
    ({"models__max_models_per_replica": "two"}, "x.yaml: models.max_models_per_replica: expected an integer"),
    ({"limits__max_image_pixels": 0}, "x.yaml: limits.max_image_pixels: must be >= 1"),
    ({"kind": "finetune"}, "x.yaml: kind: expected one of 'serve'"),
    ({"auth": False}, "x.yaml: auth: a registry app serves several departments"),
    ({"registry": "s3://b/r", "model_dir": "/m"}, "x.yaml: registry, model_dir: give one of them"),
    ({"http__port": 70000}, "x.yaml: http.port: must be in 1..65535"),
])
def test_bad_serving_specs_name_the_file_and_field(changes, message):
    with pytest.raises(SpecError) as err:
        serve_spec_from_dict(_spec(**changes), "x.yaml")
    assert str(err.value).startswith(message), str(err.value)
