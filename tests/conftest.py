"""Shared test fixtures: where ../shared lives, and the OFA reference model."""

from __future__ import annotations

import json
import os
from pathlib import Path

# Before anything imports Ray: local Ray registers and dials 127.0.0.1 only (FIELD_NOTES). Test modules
# that import ray at collection time would otherwise make in-process Ray use the machine's address.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """The shared/ folder beside the checkout (override with BIOMEDGPT_SHARED)."""
    path = Path(os.environ.get("BIOMEDGPT_SHARED", REPO.parent / "shared"))
    if not (path / "reference" / "ofa_fixtures").is_dir():
        raise RuntimeError(f"{path}: shared/ with reference/ofa_fixtures not found; set BIOMEDGPT_SHARED")
    return path


@pytest.fixture(scope="session")
def shared() -> Path:
    return shared_dir()


@pytest.fixture(scope="session")
def fixtures_dir(shared: Path) -> Path:
    return shared / "reference" / "ofa_fixtures"


@pytest.fixture(scope="session")
def micro_config(fixtures_dir: Path):
    from biomedgpt.model import BiomedGPTConfig

    return BiomedGPTConfig.from_ofa_config(json.loads((fixtures_dir / "micro_config.json").read_text()))


def _float32(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


@pytest.fixture(scope="session")
def micro_hf_state_dict(fixtures_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return _float32(load_file(str(fixtures_dir / "micro_state_dict.safetensors")))


@pytest.fixture(scope="session")
def micro_fairseq_state_dict(fixtures_dir: Path, micro_hf_state_dict) -> dict[str, torch.Tensor]:
    """The full fairseq-named state dict: the fairseq file plus the ResNet keys (same names in both)."""
    from safetensors.torch import load_file

    sd = _float32(load_file(str(fixtures_dir / "micro_state_dict_fairseq.safetensors")))
    sd.update({k: v for k, v in micro_hf_state_dict.items() if k.startswith("encoder.embed_images.")})
    return sd


@pytest.fixture(scope="session")
def micro_model(micro_config, micro_hf_state_dict):
    from biomedgpt.model.convert import build_model

    return build_model(micro_config, micro_hf_state_dict, "micro_state_dict.safetensors")


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> str:
    """Shards of the VQA-RAD sample shipped in datasets_spec/samples (train 266, test 69 questions)."""
    from biomedgpt.data.build import build_shards

    out = tmp_path_factory.mktemp("demo-shards")
    build_shards("vqa_rad", str(REPO / "datasets_spec" / "samples" / "vqa_rad"), str(out), progress=False)
    return str(out)


@pytest.fixture(scope="session")
def demo_tokenizer_dir(demo_shards, tmp_path_factory) -> str:
    """A byte-level BPE trained on the sample's questions and answers, saved to a directory."""
    import json as _json

    from biomedgpt.data.stream import list_shards
    from biomedgpt.data.shards import read_shard
    from biomedgpt.model.tokenizer import BiomedGPTTokenizer
    from biomedgpt.tasks import get_task

    task = get_task("vqa")
    texts = []
    for shard in list_shards(demo_shards, "vqa_rad", "train"):
        for sample in read_shard(shard.url):
            ex = task.example(_json.loads(sample["json"]))
            texts += [ex.instruction, ex.target]
    tok = BiomedGPTTokenizer.train(texts, vocab_size=400)
    out = tmp_path_factory.mktemp("demo-tokenizer")
    tok.save_pretrained(out)
    return str(out)


# --- S3: moto's server on 127.0.0.1 ------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto_endpoint():
    """moto's S3 server on 127.0.0.1 (a free port), stopped when the module's tests are done."""
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
    """A fresh bucket on the moto server, with the AWS variables set for this test; yields its URL."""
    import uuid

    import boto3

    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION", "AWS_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    bucket = f"test-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    yield f"s3://{bucket}"
