"""Fixtures of the serving tests: small model directories, API keys, an S3 endpoint (moto on 127.0.0.1)."""

from __future__ import annotations

from pathlib import Path

import pytest
from serve_helpers import VQA_ANSWERS, make_model_dir

from tests_paths import REPO


@pytest.fixture(scope="session")
def vqa_model_dir(tmp_path_factory, demo_tokenizer_dir) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("vqa-model"), demo_tokenizer_dir, answers=VQA_ANSWERS)


@pytest.fixture(scope="session")
def api_keys(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A copy of cluster/tenants.yaml with a fresh API key for three departments: (path, {team: key})."""
    import yaml

    from biomedgpt.tenancy import hash_api_key, new_api_key

    data = yaml.safe_load((REPO / "cluster" / "tenants.yaml").read_text())
    data["datasetSpecs"] = str(REPO / "datasets_spec")  # the copy lives elsewhere: access classes from the repo
    keys = {}
    for inst, dept in (("stanford-like", "radiology"), ("mayo-like", "radiology"), ("charite-like", "dermatology")):
        key = new_api_key(f"test-{inst}-{dept}")  # key ids are unique in the whole file
        d = data["institutions"][inst]["departments"][dept]
        d.setdefault("apiKeys", []).append({"id": f"test-{inst}-{dept}", "hash": hash_api_key(key)})
        keys[f"{inst}-{dept}"] = key
    path = tmp_path_factory.mktemp("tenants") / "tenants.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path, keys
