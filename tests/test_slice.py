"""The end-to-end slice at minimal size, with real local Ray:
raw VQA-RAD sample -> shards -> Ray Data -> 2 Ray Train workers (Lightning, FSDP2 over gloo) ->
step checkpoints -> export -> evaluation -> Ray Serve -> HTTP answer; and what `biomedgpt submit` refuses
before it contacts a cluster. The README's `ray start --head` + `ray job submit` and `biomedgpt submit`
lines, with the shipped demo spec, are run as written by test_submit_readme.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def mini_spec(tmp: Path, name: str = "mini-vqa-rad") -> Path:
    """The demo spec cut down to a few steps and tiny images, writing under tmp."""
    data = yaml.safe_load((REPO / "jobs" / "demo" / "vqa_rad.yaml").read_text())
    data["name"] = name
    data["model"]["image_size"] = 32
    data["model"]["tokenizer"]["train_vocab_size"] = 300
    data["data"]["shards"] = str(tmp / "shards")
    data["data"]["build"] = {"vqa_rad": str(REPO / "datasets_spec" / "samples" / "vqa_rad")}
    data["trainer"].update(max_steps=4, checkpoint_every=2, log_every=2, batch_size=4)
    data["evaluate"].update(max_samples=8, splits=["test"])
    data["output"]["storage"] = str(tmp / "runs")
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def env() -> dict[str, str]:
    e = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", PYTHONUNBUFFERED="1")
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):  # a Ray of an earlier test is not this one
        e.pop(var, None)
    return e


@pytest.mark.slow(seconds=88)
def test_demo_command_runs_the_whole_slice(tmp_path):
    spec = mini_spec(tmp_path)
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "biomedgpt.cli", "demo", "--spec", str(spec), "--out", str(out)],
                          capture_output=True, text=True, timeout=900, env=env(), cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    run_dir = out / "runs" / "demo" / "mini-vqa-rad"
    # step checkpoints at 2 and 4 were recorded by Ray Train
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-00000002", "checkpoint-00000004"]
    for ckpt in run_dir.glob("checkpoint-*"):
        assert (ckpt / "lightning" / ".metadata").is_file() and len(list((ckpt / "lightning").glob("*.distcp"))) == 2
    summary = json.loads((out / "demo_summary.json").read_text())
    answers = json.loads((run_dir / "export" / "answers.json").read_text())
    assert summary["answer"] in answers  # trie decoding: only a training answer can come out
    assert set(summary["evaluation"]["vqa_rad/test"]) >= {"accuracy", "closed_accuracy", "open_accuracy",
                                                          "majority_baseline"}
    assert "[train] step 4/4" in log and "A: " in log and "serving " in log
    assert (run_dir / "logs" / "metrics.csv").is_file() and (run_dir / "loss.png").is_file()
    assert json.loads((run_dir / "report.json").read_text())["steps"] == 4
    assert list((run_dir / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    # the console speaks of phases and progress; the libraries' own logs are in the run's logs/
    for noise in ("RayTrainWorker", "Reporting training result", "weights_only", "Tip:", "Started Serve in namespace", "(raylet)",
                  "Writing model shards"):
        assert noise not in log, f"{noise!r} on the console:\n{log[-5000:]}"
    assert f"logs: Ray's, Lightning's and torch's own logs go to {run_dir / 'logs'}" in log
    assert "[biomedgpt] evaluate: 8/8 samples" in log
    assert "GPU available" in (run_dir / "logs" / "workers" / "rank0.log").read_text()  # Lightning, in the file
    assert (run_dir / "logs" / "driver.log").is_file()
    assert list((run_dir / "logs" / "ray").glob("worker-*.out")) and list((run_dir / "logs" / "serve" / "ray").iterdir())


def test_submit_refuses_a_spec_that_would_not_be_uploaded():
    ignored = REPO / "runs" / "ignored-spec.yaml"  # runs/ is git-ignored
    ignored.parent.mkdir(exist_ok=True)
    ignored.write_text((REPO / "jobs" / "demo" / "vqa_rad.yaml").read_text())
    try:
        proc = subprocess.run([sys.executable, "-m", "biomedgpt.cli", "submit", "runs/ignored-spec.yaml", "--address",
                               "http://127.0.0.1:9"], capture_output=True, text=True, timeout=120, env=env(), cwd=REPO)
    finally:
        ignored.unlink()
    assert proc.returncode == 2 and "ignored by .gitignore" in proc.stderr


def test_submit_refuses_a_bad_spec_before_contacting_the_cluster(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "jobs" / "demo" / "vqa_rad.yaml").read_text().replace("workers: 2", "wrokers: 2"))
    proc = subprocess.run([sys.executable, "-m", "biomedgpt.cli", "submit", str(bad), "--address", "http://127.0.0.1:9"],
                          capture_output=True, text=True, timeout=120, env=env())
    assert proc.returncode == 2 and "trainer.wrokers: unknown field (did you mean 'workers'?)" in proc.stderr
