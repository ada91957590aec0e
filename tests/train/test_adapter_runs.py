"""A LoRA fine-tuning job run as a user runs it (`biomedgpt run`, its own local Ray, 2 FSDP2 workers over gloo;
and DDP): the base from `model.init` frozen, step checkpoints holding the adapter state only and naming the
base, a worker lost mid-checkpoint recovered from the last checkpoint, an adapter directory exported at the end,
evaluated on the adapter merged into its base, and published to the registry as an adapter of that base."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import yaml

from job_runs import registered, run_dir, spec_file, start, steps_logged


@pytest.fixture(scope="module")
def base(tmp_path_factory, demo_tokenizer_dir) -> Path:
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1] / "serve"))
    from serve_helpers import make_model_dir

    return make_model_dir(tmp_path_factory.mktemp("lora-base"), demo_tokenizer_dir, seed=4, image_size=16)


def lora_spec(tmp_path: Path, base: Path, name: str, **trainer) -> Path:
    path = spec_file(tmp_path, tmp_path / "shards", name, **trainer)
    spec = yaml.safe_load(path.read_text())
    spec["model"]["init"] = str(base)
    spec["model"]["tokenizer"] = {"path": str(base)}
    spec["finetune"] = {"method": "lora", "rank": 4, "alpha": 8, "dropout": 0.0}
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.slow(seconds=65)
@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_a_lora_job_trains_recovers_exports_and_publishes(strategy, tmp_path, base):
    from biomedgpt.model.adapters import sha256_file
    from biomedgpt.modeldir import checkpoint_model_state
    from biomedgpt.serve.registry import Registry

    name = f"lora-{strategy}"
    evaluate = strategy == "ddp"  # one of the two also evaluates (the adapter merged into its base)
    spec = lora_spec(tmp_path, base, name, max_steps=20, checkpoint_every=10, max_failures=1, strategy=strategy,
                     workers=2, checkpoint_format="sharded" if strategy == "fsdp" else "full")
    if evaluate:
        data = yaml.safe_load(spec.read_text())
        data["evaluate"].update(enabled=True, splits=["test"], max_samples=8, concurrency=1, meteor=False)
        spec.write_text(yaml.safe_dump(data))
    run = run_dir(tmp_path, name)
    log = tmp_path / "log.txt"
    # rank 1 dies once after writing its shard of checkpoint 10 and before reporting it
    proc = start(spec, log, BIOMEDGPT_FAULTS="crash-before-report@10:1", BIOMEDGPT_FAULTS_ONCE=str(tmp_path / "once"))
    try:
        assert proc.wait(timeout=900) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert "adapters: LoRA rank 4" in text and (tmp_path / "once").is_file()
    assert max(steps_logged(text)) == 20 and registered(run)[-1] == "00000020"
    last = run / "checkpoint-00000020"
    meta = json.loads((last / "biomedgpt.json").read_text())
    assert meta["base"]["sha256"] == sha256_file(base / "model.safetensors") and meta["adapter"]["rank"] == 4
    state = checkpoint_model_state(last)
    assert state and all(".lora_A." in k or ".lora_B." in k for k in state), sorted(state)[:4]
    size = sum(f.stat().st_size for f in last.rglob("*") if f.is_file() and "assets" not in f.parts)
    assert size < (base / "model.safetensors").stat().st_size / 2
    export = run / "export"
    assert (export / "adapter_model.safetensors").is_file() and not (export / "model.safetensors").exists()
    if evaluate:
        assert (run / "eval" / "metrics.json").is_file() and (run / "eval-model" / "model.safetensors").is_file()
    entry = Registry(str(tmp_path / "registry")).export(last, "stanford-like-radiology", "vqa-lora")
    assert entry.kind == "adapter" and entry.base == str(base)
