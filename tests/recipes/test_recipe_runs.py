"""Every task family trains through the real runner (`biomedgpt.runner.run_training`: shards -> Ray Data
-> Ray Train + Lightning FSDP2 -> checkpoint -> export) for a few steps on tiny shards written here in
the documented record format, each with the recipe features its official fine-tuning uses; and a run
starts from a converted official (fairseq-layout) checkpoint with `model.init` and trains from exactly
those weights. One local Ray serves the whole module."""

from __future__ import annotations

import csv
import io
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests_paths import REPO

WORDS = ("left lung right heart small large opacity normal effusion nodule chest film shows mild severe no sign of "
         "the a is there patient pain fever cough").split()


def image_bytes(seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def record(task: str, dataset: str, i: int, rng: random.Random) -> tuple[dict, bytes | None]:
    base = {"task": task, "dataset": dataset, "split": "train", "id": f"{dataset}-{i}"}
    if task == "vqa":
        closed = i % 2 == 0
        return dict(base, question=f"is there {rng.choice(WORDS)} in the {rng.choice(WORDS)}?",
                    answer=rng.choice(["yes", "no"]) if closed else rng.choice(["left lung", "heart", "chest film"]),
                    answer_type="closed" if closed else "open"), image_bytes(i)
    if task == "caption":
        return dict(base, caption=sentence(rng, 8)), image_bytes(i)
    if task == "classify":
        label = i % 2
        return dict(base, label=label, label_name=["normal", "pneumonia"][label]), image_bytes(i)
    if task == "nli":
        return dict(base, premise=sentence(rng, 9), hypothesis=sentence(rng, 5),
                    label=["entailment", "contradiction", "neutral"][i % 3]), None
    if task == "summarize":
        return dict(base, text=sentence(rng, 30), summary=sentence(rng, 6)), None
    if task == "text":
        return dict(base, text=sentence(rng, 20)), None
    raise ValueError(task)


def write_split(root: Path, dataset: str, task: str, n: int, per_shard: int, seed: int = 0) -> None:
    from biomedgpt.data.shards import Manifest, ShardSample, make_key, shard_name, split_url, write_manifest, write_shard

    rng = random.Random(f"{dataset}:{seed}")
    url = split_url(str(root), dataset, "train")
    entries = []
    for s, start in enumerate(range(0, n, per_shard)):
        samples = []
        for i in range(start, min(n, start + per_shard)):
            rec, img = record(task, dataset, i, rng)
            samples.append(ShardSample(make_key(dataset, rec["id"]), rec, img, "png" if img else None))
        entries.append(write_shard(f"{url}/{shard_name(dataset, 'train', s).split('/')[-1]}", samples))
    write_manifest(url, Manifest(dataset=dataset, split="train", task=task, source="written by the test",
                                 licence="test data", access="open", shards=entries))


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray (127.0.0.1, with its dashboard) for every run of the module."""
    import os

    import ray

    from biomedgpt.session import ensure_ray

    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        os.environ.pop(var, None)
    started = ensure_ray(num_cpus=2)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("recipe-shards")
    for dataset, task in (("vqa_rad", "vqa"), ("iu_xray", "caption"), ("pneumoniamnist", "classify"),
                          ("mednli", "nli"), ("meqsum", "summarize"), ("pubmed_abstracts", "text")):
        write_split(root, dataset, task, n=12, per_shard=6)
    return root


def spec_for(tmp: Path, shards: Path, name: str, task: str | None, datasets: list[dict], data_extra: dict | None = None,
             **trainer):
    from biomedgpt.spec import spec_from_dict

    data = {
        "kind": "finetune", "name": name, "team": "demo",
        "model": {"size": "demo", "image_size": 32, "tokenizer": {"train_vocab_size": 300}},
        "data": {"shards": str(shards), "task": task, "train": datasets, "max_source_length": 48,
                 "max_target_length": 16, "shuffle_buffer": 8, **(data_extra or {})},
        "trainer": dict({"workers": 1, "cpus_per_worker": 1, "strategy": "fsdp", "batch_size": 4, "max_steps": 2,
                         "lr": 1e-3, "warmup_ratio": 0.0, "dropout": 0.0, "log_every": 1, "checkpoint_every": 0},
                        **trainer),
        "evaluate": {"enabled": False},
        "output": {"storage": str(tmp / "runs")},
    }
    return spec_from_dict(data, f"{name}.yaml")


def losses(run_dir: Path) -> list[float]:
    rows = list(csv.DictReader(open(run_dir / "logs" / "metrics.csv")))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


def run(spec):
    from biomedgpt.runner import run_training

    res = run_training(spec, num_cpus=2)
    run_dir = Path(res.run_dir)
    assert res.checkpoint and (run_dir / "export" / "model.safetensors").is_file()
    got = losses(run_dir)
    assert got and all(np.isfinite(got)), got
    return res, run_dir


FAMILIES = {
    # family: (data.task, datasets, recipe features of its official fine-tuning)
    "vqa": ("vqa", [{"dataset": "vqa_rad"}],
            dict(label_smoothing=0.1, label_smoothing_candidates=True, freeze_token_embeddings=True,
                 ema={"enabled": True, "decay": 0.5})),
    "caption": ("caption", [{"dataset": "iu_xray"}], dict(label_smoothing=0.1, drop_worst_ratio=0.2, drop_worst_after=1)),
    "classify": ("classify", [{"dataset": "pneumoniamnist"}],
                 dict(label_smoothing=0.1, label_smoothing_candidates=True, max_steps=None, epochs=0.5)),
    "nli": ("nli", [{"dataset": "mednli"}], dict(label_smoothing_candidates=True)),
    "summarize": ("summarize", [{"dataset": "meqsum"}], dict(label_smoothing=0.1, decoder_noise=0.2)),
    "pretrain": ("pretrain", [{"dataset": "iu_xray"}, {"dataset": "vqa_rad"},
                              {"dataset": "pubmed_abstracts", "group": "text"}],
                 dict(sample_patch_num=2)),  # the official patch sampling: 2 of the 32-px image's 4 patches
}


def test_every_task_family_has_a_recipe_run():
    from biomedgpt.tasks import get_task, task_names

    # the package's own families (a test may register a toy family of its own: tests/tasks/toy_task.py)
    shipped = {n for n in task_names() if type(get_task(n)).__module__.startswith("biomedgpt.")}
    assert shipped <= set(FAMILIES), f"a family without a recipe run: {shipped - set(FAMILIES)}"


@pytest.mark.slow(seconds=23)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_trains_through_the_runner(family, ray_session, shards, tmp_path):
    from biomedgpt.tasks import task_names

    assert family in task_names()
    task, datasets, trainer = FAMILIES[family]
    extra = {"group_ratios": {"text": 0.5}} if family == "pretrain" else {}  # text rows: half the image-text rows
    spec = spec_for(tmp_path, shards, f"recipe-{family}", task, datasets, extra, **trainer)
    res, run_dir = run(spec)
    candidates = json.loads((run_dir / "export" / "candidates.json").read_text())
    meta = json.loads((run_dir / "export" / "training.json").read_text())
    if family == "vqa":
        assert set(candidates["vqa"]) <= {"yes", "no", "left lung", "heart", "chest film"} and "yes" in candidates["vqa"]
        check_ema_export(Path(res.checkpoint), run_dir / "export")
    elif family == "classify":
        assert candidates == {"classify": ["normal", "pneumonia"]}
        # 0.5 epoch of 12 rows in batches of 4 on 1 rank: 1 step, from the manifests' counts
        assert meta["step"] == 1
    elif family == "nli":
        assert candidates == {"nli": ["maybe", "no", "yes"]}
    else:
        assert candidates == {}
    if family != "classify":
        assert meta["step"] == 2


def check_ema_export(checkpoint: Path, export: Path) -> None:
    """The export holds the EMA weights kept in the checkpoint, not the last training weights."""
    from safetensors.torch import load_file

    from biomedgpt.modeldir import checkpoint_model_state

    exported = load_file(str(export / "model.safetensors"))
    ema = checkpoint_model_state(checkpoint, ema=True)
    raw = checkpoint_model_state(checkpoint)
    name = "encoder.layers.0.fc1.weight"
    torch.testing.assert_close(exported[name], ema[name])
    assert not torch.allclose(ema[name], raw[name])
    # frozen token embeddings: the EMA of a constant is the constant
    torch.testing.assert_close(ema["encoder.embed_tokens.weight"], raw["encoder.embed_tokens.weight"])


# ---------------------------------------------------------------------------------------------------
# model.init: a converted official checkpoint
# ---------------------------------------------------------------------------------------------------


@pytest.mark.slow(seconds=23)
def test_training_starts_from_a_converted_fairseq_checkpoint(ray_session, tmp_path, micro_fairseq_state_dict,
                                                             ofa_dir):
    sys.path.insert(0, str(REPO / "tests" / "model"))
    from bpe_files import write_bart_like_files

    from biomedgpt.data.pipeline import preprocess_batch
    from biomedgpt.data.shards import read_shard
    from biomedgpt.data.stream import list_shards
    from biomedgpt.model import BiomedGPTForConditionalGeneration
    from biomedgpt.model.convert import convert
    from biomedgpt.train.module import sequence_loss

    # a fairseq-layout checkpoint (state dict under `model`) -> `biomedgpt convert` -> model directory
    src = tmp_path / "official"
    src.mkdir()
    torch.save({"model": dict(micro_fairseq_state_dict)}, src / "biomedgpt_micro.pt")
    vocab, merges = write_bart_like_files(src)
    model_dir = tmp_path / "converted"
    convert(src / "biomedgpt_micro.pt", model_dir, config_path=ofa_dir / "micro_config.json",
            vocab=str(vocab), merges=str(merges))

    # one shard of exactly one batch: every step sees the same rows (in some order)
    shards = tmp_path / "shards"
    write_split(shards, "vqa_rad", "vqa", n=4, per_shard=4, seed=3)
    spec = spec_for(tmp_path, shards, "from-official", "vqa", [{"dataset": "vqa_rad"}], max_steps=2, lr=1e-4,
                    dropout=0.0)
    spec.model.init = str(model_dir)
    spec.model.tokenizer.train_vocab_size = None
    spec.model.tokenizer.path = str(model_dir)
    spec.model.validate(spec.source + ".model")
    res, run_dir = run(spec)

    # the loss of the first step is the converted model's loss on that batch (train mode, as in training)
    rows = [s for sh in list_shards(str(shards), "vqa_rad", "train") for s in read_shard(sh.url)]
    batch = preprocess_batch({"json": np.array([r["json"] for r in rows], dtype=object),
                              "png": np.array([r.get("png") for r in rows], dtype=object)},
                             task_name="vqa", tokenizer_dir=str(run_dir / "assets" / "tokenizer"), image_size=32,
                             max_source_length=48, max_target_length=16)
    t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}
    model = BiomedGPTForConditionalGeneration.from_pretrained(model_dir).train()
    with torch.no_grad():
        logits = model(input_ids=t["input_ids"], patch_images=t["patch_images"], patch_masks=t["patch_masks"].bool(),
                       decoder_input_ids=t["decoder_input_ids"], use_cache=False).logits
    expected, _ = sequence_loss(logits, t["labels"])
    first = losses(run_dir)[0]
    assert first == pytest.approx(expected.item(), rel=1e-4, abs=1e-4)
    # a random initialisation would start near ln(vocab) = ln(59457) ~ 11.0; the micro model does not
    assert json.loads((run_dir / "export" / "config.json").read_text())["d_model"] == 20
