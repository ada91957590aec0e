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
    keys = {}
    for inst, dept in (("stanford-like", "radiology"), ("mayo-like", "radiology"), ("charite-like", "dermatology")):
        key = new_api_key()
        d = data["institutions"][inst]["departments"][dept]
        d.setdefault("apiKeys", []).append({"id": "test-client", "hash": hash_api_key(key)})
        keys[f"{inst}-{dept}"] = key
    path = tmp_path_factory.mktemp("tenants") / "tenants.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path, keys


@pytest.fixture(scope="module")
def moto_endpoint():
    """moto's S3 server on 127.0.0.1 (a free port)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(moto_endpoint, monkeypatch) -> str:
    """A fresh bucket on the moto server with the AWS variables set for the test; yields its URL."""
    import uuid

    import boto3

    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION", "AWS_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    bucket = f"registry-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    yield f"s3://{bucket}"


