"""A training run whose storage is S3 (moto's server on 127.0.0.1), with real local Ray and 2 FSDP2
workers writing full (gathered) checkpoints: checkpoints, assets, logs, report, export and evaluation
land under s3://.../<team>/<name>/, num_to_keep prunes old checkpoints there, and running the job
again with more steps resumes from the checkpoint on S3 with its optimiser state and data position
(the right one: the samples read before and after the restart are each read once)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from job_runs import read_stream_batches
from stream_positions import StreamOf

from tests_paths import REPO


@pytest.fixture
def s3_spec(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("BIOMEDGPT_STAGING", str(tmp_path / "staging"))
    data = yaml.safe_load((REPO / "jobs" / "demo" / "vqa_rad.yaml").read_text())
    data["name"] = "s3-run"
    data["model"]["image_size"] = 16
    data["model"]["tokenizer"]["train_vocab_size"] = 300
    data["data"]["shards"] = f"{s3_bucket}/shards"
    data["data"]["shard_max_samples"] = 16
    data["trainer"].update(batch_size=4, log_every=5, checkpoint_every=5, num_to_keep=2, max_steps=10,
                           checkpoint_format="full")
    data["evaluate"].update(max_samples=8, splits=["test"], concurrency=1)
    data["output"]["storage"] = f"{s3_bucket}/runs"
    return data


@pytest.mark.slow(seconds=115)
def test_run_on_s3_storage_checkpoints_reports_and_resumes(s3_spec, s3_bucket, tmp_path, demo_tokenizer_dir):
    from biomedgpt.data import storage
    from biomedgpt.runner import run_training
    from biomedgpt.spec import spec_from_dict
    from biomedgpt.modeldir import read_checkpoint_meta
    from biomedgpt.train.report import read_run_metrics

    run_url = f"{s3_bucket}/runs/demo/s3-run"
    first = run_training(spec_from_dict(s3_spec, "s3.yaml"), num_cpus=2)
    assert first.run_dir == run_url and first.checkpoint == f"{run_url}/checkpoint-00000010"
    storage.download_dir(f"{run_url}/checkpoint-00000010", tmp_path / "ckpt10")
    position10 = data_position(tmp_path / "ckpt10")
    files = storage.list_files(run_url)
    for name in ("spec.json", "assets/answers.json", "logs/metrics.csv", "report.md", "report.json", "loss.png",
                 "lr.png", "export/config.json", "export/model.safetensors", "eval/metrics.json", "eval/report.html", "result.json",
                 "checkpoint-00000010/lightning.ckpt", "checkpoint-00000005/lightning.ckpt"):
        assert name in files, f"{name} missing from {run_url}: {sorted(files)}"
    report = json.loads(storage.read_text(f"{run_url}/report.json"))
    assert report["steps"] == 10

    # the same job with a larger budget: resumes from step 10 on S3, keeps 2 checkpoints
    s3_spec["trainer"]["max_steps"] = 15
    s3_spec["evaluate"]["enabled"] = False
    second = run_training(spec_from_dict(s3_spec, "s3.yaml"), num_cpus=2)
    assert second.checkpoint == f"{run_url}/checkpoint-00000015"
    files = storage.list_files(run_url)
    checkpoints = sorted({name.split("/")[0] for name in files if name.startswith("checkpoint-")})
    assert checkpoints == ["checkpoint-00000010", "checkpoint-00000015"]
    # the logs of both attempts (Lightning restarts metrics.csv; the first attempt's is kept beside it)
    storage.download_dir(f"{run_url}/logs", tmp_path / "logs")
    steps = [step for step, _ in read_run_metrics(tmp_path / "logs")["train/loss"]]
    assert steps == [5, 10, 15], steps
    assert json.loads(storage.read_text(f"{run_url}/report.json"))["steps"] == 15

    # the full-format checkpoint is one gathered file holding the optimiser state and the data position
    local = tmp_path / "ckpt15"
    storage.download_dir(f"{run_url}/checkpoint-00000015", local)
    meta = read_checkpoint_meta(local)
    assert meta["format"] == "full" and meta["step"] == 15
    state = torch.load(local / "lightning.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 15 and state["optimizer_states"]
    # the positions are the right ones: each stands for the batches of the steps taken
    stream = StreamOf(s3_spec["data"]["shards"], "vqa_rad", s3_spec)
    assert stream.batches_before(position10) == 10 and stream.batches_before(data_position(local)) == 15
    # and the samples each rank reads before the restart and from the step-10 position on are each read once
    # (the same stream on a local copy of the shards: the order depends on the manifests, not on where they are)
    storage.download_dir(s3_spec["data"]["shards"], tmp_path / "shards")
    local_stream = StreamOf(str(tmp_path / "shards"), "vqa_rad", s3_spec)
    reads = [read for rank in range(local_stream.world)
             for read in ({"rank": rank, "batches": 10, "column": "sample_id"},
                          {"rank": rank, "batches": 5, "column": "sample_id", "position": position10})]
    got = read_stream_batches(tmp_path / "shards", s3_spec, demo_tokenizer_dir, reads, tmp_path / "reads.json")
    per_rank = [got[2 * rank] + got[2 * rank + 1] for rank in range(local_stream.world)]
    local_stream.check_epochs_covered_once(per_rank, whole_epoch=False)


def data_position(checkpoint) -> dict:
    """The training stream's position saved in a full-format checkpoint (lightning.ckpt)."""
    state = torch.load(checkpoint / "lightning.ckpt", map_location="cpu", weights_only=False)
    return next(v["position"] for k, v in state["callbacks"].items() if "DataPosition" in k)
