"""Ray cluster-launcher configs (cluster/launcher/): valid for the Ray we pin, offline."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from biomedgpt.cluster.launcher import launcher_problems, ray_schema_path

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "cluster" / "launcher").glob("*.yaml"))


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_on_prem_and_cloud_configs_exist():
    providers = {load(p)["provider"]["type"] for p in CONFIGS}
    assert "local" in providers and providers - {"local"}, providers


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates_against_the_schema_shipped_in_ray(path, tenants):
    schema = json.loads(ray_schema_path().read_text())
    assert ray_schema_path().parts[-3:] == ("ray", "autoscaler", "ray-schema.json")
    config = load(path)
    jsonschema.Draft7Validator(schema).validate(config)   # the raw file, as written
    assert launcher_problems(config, str(path)) == []      # and after Ray's own preparation
    assert config["docker"]["image"] == tenants.image
    assert "-e BIOMEDGPT_ON_CLUSTER=1" in config["docker"]["run_options"]
    assert "-e RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1" in config["docker"]["run_options"]


def test_problems_are_reported():
    onprem = load(REPO / "cluster" / "launcher" / "onprem-gpu-servers.yaml")
    bad = copy.deepcopy(onprem)
    bad["min_worker"] = 1
    assert any("min_worker" in p for p in launcher_problems(bad, "x.yaml"))
    bad = copy.deepcopy(onprem)
    del bad["provider"]["worker_ips"]
    assert any("Ray refuses it" in p for p in launcher_problems(bad, "x.yaml"))
    bad = copy.deepcopy(onprem)
    bad["docker"]["run_options"].append("-e RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0")
    assert any("pins Ray to one machine" in p for p in launcher_problems(bad, "x.yaml"))
