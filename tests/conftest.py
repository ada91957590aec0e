"""Fixtures every test folder uses: the repository's own fixture files (tests/fixtures/), the OFA reference
model, the VQA-RAD demo shards and tokenizer, an S3 endpoint."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

# Before anything imports Ray: local Ray registers and dials 127.0.0.1 only (FIELD_NOTES). Test modules
# that import ray at collection time would otherwise make in-process Ray use the machine's address.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# The audit trail (biomedgpt.audit) of the runs, submissions and served requests tests make goes to a folder of
# the session's, not to ./registry/_audit of the checkout; tests of the trail itself set their own.
if "BIOMEDGPT_AUDIT" not in os.environ:
    import tempfile  # noqa: E402

    import atexit  # noqa: E402

    os.environ["BIOMEDGPT_AUDIT"] = tempfile.mkdtemp(prefix="biomedgpt-test-audit-")
    atexit.register(shutil.rmtree, os.environ["BIOMEDGPT_AUDIT"], True)

import pytest  # noqa: E402
import torch  # noqa: E402

from fixture_files import fixture  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
#: The image-code token ids (<code_0> .. <code_8191>) of the OFA vocabulary.
CODE_START, CODE_END = 50265, 58457


def pytest_collection_modifyitems(config, items):
    """Modules with slow tests first, the longest first (the seconds of their `slow` marks), the rest in
    collection order: `make test` runs two pytest-xdist workers that take whole modules, and a long module
    started last would leave one worker alone at the end."""
    weight: dict[str, float] = {}
    for item in items:
        module = item.nodeid.split("::")[0]
        for mark in item.iter_markers("slow"):
            weight[module] = weight.get(module, 0.0) + float(mark.kwargs.get("seconds", 60))
    order = {m: i for i, m in enumerate(dict.fromkeys(item.nodeid.split("::")[0] for item in items))}
    items.sort(key=lambda item: (-weight.get(item.nodeid.split("::")[0], 0.0), order[item.nodeid.split("::")[0]]))


@pytest.fixture(autouse=True)
def _verbose_switch_off(monkeypatch):
    """Every test starts with `--verbose` off, and whatever it sets is undone after it:
    biomedgpt.console.set_verbose writes os.environ for the process and its children, and a switch left
    on would make later tests' subprocesses stream their Ray workers' output to the console they read."""
    from biomedgpt.console import VERBOSE_ENV

    monkeypatch.setenv(VERBOSE_ENV, "")  # off (console.verbose); recorded, so undone even if a test sets it


@pytest.fixture(scope="session")
def dev_data() -> Path:
    """tests/fixtures/data: small subsets of public biomedical datasets in their release formats."""
    return fixture("data")


@pytest.fixture(scope="session")
def vqa_rad_release(tmp_path_factory) -> Path:
    """The VQA-RAD subset laid out as the release ships it: the OSF files, and data_RAD/ (the MEVF split
    many Med-VQA codebases read) with its images/ holding the same image files (the release has each
    image in both folders; the repository stores them once)."""
    source = fixture("data/vqa_rad")
    root = tmp_path_factory.mktemp("vqa_rad-release") / "vqa_rad"
    shutil.copytree(source, root)
    shutil.copytree(root / "VQA_RAD Image Folder", root / "data_RAD" / "images")
    return root


@pytest.fixture(scope="session")
def ofa_dir() -> Path:
    """The OFA reference fixtures (tests/fixtures/ofa, unpacked): micro model config and weights, cases."""
    return fixture("ofa")


@pytest.fixture(scope="session")
def micro_config(ofa_dir: Path):
    from biomedgpt.model import BiomedGPTConfig

    return BiomedGPTConfig.from_ofa_config(json.loads((ofa_dir / "micro_config.json").read_text()))


def _float32(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


@pytest.fixture(scope="session")
def micro_hf_state_dict(ofa_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return _float32(load_file(str(ofa_dir / "micro_state_dict.safetensors")))


@pytest.fixture(scope="session")
def micro_fairseq_state_dict(ofa_dir: Path, micro_hf_state_dict) -> dict[str, torch.Tensor]:
    """The full fairseq-named state dict. The reference's fairseq file holds the same tensors as the
    Hugging Face-named one under other names (the ResNet keys are named alike in both and were stored only
    there): the fixture keeps its key map and the three tensors only fairseq has."""
    from safetensors.torch import load_file

    key_map = json.loads((ofa_dir / "micro_state_dict_fairseq.keys.json").read_text())
    sd = {fairseq_key: micro_hf_state_dict[hf_key] for fairseq_key, hf_key in key_map.items()}
    sd.update(_float32(load_file(str(ofa_dir / "micro_state_dict_fairseq.extra.safetensors"))))
    sd.update({k: v for k, v in micro_hf_state_dict.items() if k.startswith("encoder.embed_images.")})
    return sd


@pytest.fixture(scope="session")
def ofa_case(ofa_dir: Path, micro_hf_state_dict) -> Callable[[str], dict[str, torch.Tensor]]:
    """ofa_case(name) -> the tensors of a reference case (a_image_text, b_text_only, c_code,
    d_incremental) as the reference wrote them. The fixture leaves out what follows from other tensors,
    restored here: the patch images of c and d (case a's), and the full-vocabulary logits of a and the
    code-region logits of c, which are `decoder_final_hidden @ embed_tokens.T` (the reference's own
    definition; equal to the stored values bit for bit when the fixture was made)."""
    from safetensors.torch import load_file

    embed = micro_hf_state_dict["encoder.embed_tokens.weight"]
    cache: dict[str, dict[str, torch.Tensor]] = {}

    def load(name: str) -> dict[str, torch.Tensor]:
        if name not in cache:
            case = load_file(str(ofa_dir / f"{name}.safetensors"))
            if name in ("c_code", "d_incremental"):
                case["patch_images"] = load("a_image_text")["patch_images"]
            if name == "a_image_text":
                case["logits"] = case["decoder_final_hidden"] @ embed.T
            if name == "c_code":
                case["all_code.logits_code_region"] = case["all_code.decoder_final_hidden"] @ embed[CODE_START:CODE_END].T
            cache[name] = case
        return cache[name]

    return load


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
