"""Shared test fixtures: where ../shared lives, and the OFA reference model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

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
