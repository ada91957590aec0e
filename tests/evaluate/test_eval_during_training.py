"""Evaluation during training: a short real run (local Ray, 2 Ray Train workers, FSDP2 over gloo)
evaluates every 2 steps on capped VQA-RAD and PneumoniaMNIST samples; the metrics land in the run's
logs/metrics.csv as eval/<dataset>/<metric>, and those of the last step equal an evaluation of the
exported final model (the full weights were gathered from the shards correctly)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.mark.slow(seconds=59)
def test_eval_every_n_steps_logs_metrics(tmp_path, dev_data):
    from biomedgpt.data.build import build_shards

    shards = tmp_path / "shards"
    build_shards("pneumoniamnist", str(dev_data / "medmnist"), str(shards), ["val"], files={"npz": "dev.npz"},
                 shard_max_samples=100, progress=False)
    data = yaml.safe_load((REPO / "jobs" / "demo" / "vqa_rad.yaml").read_text())
    data["name"] = "eval-during-training"
    data["model"]["image_size"] = 32
    data["model"]["tokenizer"]["train_vocab_size"] = 300
    data["data"].update(shards=str(shards), build={"vqa_rad": str(REPO / "datasets_spec" / "samples" / "vqa_rad")},
                        eval=[{"dataset": "vqa_rad", "split": "test"}, {"dataset": "pneumoniamnist", "split": "val"}])
    data["trainer"].update(max_steps=4, checkpoint_every=4, log_every=2, batch_size=4)
    data["evaluate"] = {"enabled": False, "splits": ["test", "val"], "every_n_steps": 2,
                        "max_samples_during_training": 4, "batch_size": 4}
    data["output"]["storage"] = str(tmp_path / "runs")
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(data))

    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", PYTHONUNBUFFERED="1")
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, "-m", "biomedgpt.cli", "run", str(spec_path)], capture_output=True,
                          text=True, timeout=600, env=env, cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert "[eval] step 2:" in log and "[eval] step 4:" in log

    run = tmp_path / "runs" / "demo" / "eval-during-training"
    with open(run / "logs" / "metrics.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("eval/vqa_rad/accuracy")]
    assert [int(r["step"]) for r in rows] == [2, 4]
    for key in ("eval/vqa_rad/accuracy", "eval/vqa_rad/closed_accuracy", "eval/vqa_rad/open_accuracy",
                "eval/vqa_rad/count", "eval/pneumoniamnist/accuracy", "eval/pneumoniamnist/macro_f1"):
        assert all(r[key] != "" for r in rows), key
    assert float(rows[0]["eval/vqa_rad/count"]) == 4 and float(rows[0]["eval/pneumoniamnist/count"]) == 4
    assert list((run / "logs" / "tensorboard").glob("events.out.tfevents.*"))

    # an evaluation takes the run directory (its export/) or a run checkpoint (exported on the fly)
    from biomedgpt.evaluate.job import resolve_model_dir

    assert resolve_model_dir(str(run), tmp_path) == run / "export"
    exported = resolve_model_dir(str(run / "checkpoint-00000004"), tmp_path / "from-checkpoint")
    assert (exported / "config.json").is_file() and (exported / "model.safetensors").is_file()

    # the step-4 metrics are those of the exported step-4 model on the same samples, evaluated unsharded
    from biomedgpt.evaluate.job import training_eval_config
    from biomedgpt.evaluate.score import score_predictions
    from biomedgpt.inference import Predictor
    from biomedgpt.spec import load_spec
    from biomedgpt.train.eval_callback import EvalDuringTraining

    spec = load_spec(spec_path)
    spec.data.shards = str(shards)
    config = training_eval_config(spec, model_answers=[])
    predictor = Predictor.from_model_dir(run / "export", image_size=32, max_source_length=spec.data.max_source_length,
                                         batch_size=4, device="cpu")
    for entry in config["entries"]:
        preds = predictor.predict(entry["plan"], EvalDuringTraining.read(entry["units"]))
        m = score_predictions(entry["task"], preds, tmp_path / "p.jsonl", tmp_path / "r.jsonl")
        for key in ("accuracy", "macro_f1", "closed_accuracy"):
            if m.get(key) is not None:
                assert float(rows[-1][f"eval/{entry['dataset']}/{key}"]) == pytest.approx(m[key]), (entry["dataset"], key)
