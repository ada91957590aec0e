"""Training survives the failures of a shared cluster (real local Ray, 2 FSDP2 workers over gloo):
(a) a training worker killed mid-run: the job recovers from the last checkpoint and finishes;
(b) a worker lost while a checkpoint is being written: that partial checkpoint, on disk, never becomes
    the latest;
(c) 2-worker FSDP2, DDP and FSDP2 with gradient accumulation agree with a single process on the same data.
Every checkpoint's data position must stand for exactly the steps it was taken at.

The whole job stopped (Ctrl-C) and started again is test_elastic.py's: it stops at a checkpoint and resumes,
checking weights, schedule and every sample of the epoch before and after (with another worker count, the
harder case); test_s3_runs.py resumes with the same worker count and checks the samples cover the epoch once."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch

from job_runs import (data_position, registered, run_dir, spec_file, start, steps_logged, stream_of, train_workers,
                      wait_until)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("recovery-shards")


@pytest.mark.slow(seconds=81)
def test_killed_worker_recovers_from_last_checkpoint(tmp_path, shards):
    spec = spec_file(tmp_path, shards, "killed", max_steps=60, checkpoint_every=10, max_failures=1)
    run = run_dir(tmp_path, "killed")
    proc = start(spec, tmp_path / "log.txt")
    try:
        wait_until(lambda: "00000010" in registered(run), 600, "first checkpoint recorded", proc)
        victims = train_workers(proc)
        assert len(victims) == 2, victims
        recorded_before_kill = registered(run)[-1]
        victims[1].kill()  # SIGKILL one training worker mid-run
        assert proc.wait(timeout=900) == 0, (tmp_path / "log.txt").read_text()[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = (tmp_path / "log.txt").read_text()
    # the retry resumed from the checkpoint recorded when the worker died (or one recorded while the
    # group was going down), not from scratch, and trained on from the step after it
    assert log.count("[train] resuming from") == 1, log[-4000:]
    resumed = log.split("[train] resuming from ")[1].split()[0]
    assert resumed.startswith(f"{run}/checkpoint-")
    resumed_step = int(resumed.rsplit("-", 1)[1])
    assert int(recorded_before_kill) <= resumed_step < 60
    after = steps_logged(log.split("[train] resuming from")[1])
    assert after and min(after) > resumed_step and max(after) == 60
    assert registered(run)[-1] == "00000060"
    result = json.loads((run / "result.json").read_text())
    assert result["metrics"]["step"] == 60.0
    # the data position restored after the crash is the right one: the last checkpoint's stands for 60 steps
    stream = stream_of(shards, spec)
    for step in (50, 60):
        assert stream.batches_before(data_position(run / f"checkpoint-{step:08d}")) == step


def plant_partial_checkpoint(done: Path, partial: Path, step: int) -> None:
    """What rank 0 alone leaves of a sharded checkpoint when rank 1 dies before reporting: its metadata
    (biomedgpt.json, saying `step`), the assets, the distributed-checkpoint index and rank 0's shard, but
    not rank 1's shard. Made from the real files of the complete checkpoint `done`."""
    shutil.copytree(done, partial, ignore=shutil.ignore_patterns("__1_*.distcp"), dirs_exist_ok=True)
    meta = json.loads((partial / "biomedgpt.json").read_text())
    (partial / "biomedgpt.json").write_text(json.dumps(dict(meta, step=step)))
    assert list((done / "lightning").glob("__1_*.distcp")) and not list((partial / "lightning").glob("__1_*.distcp"))


@pytest.mark.slow(seconds=69)
def test_checkpoint_interrupted_while_written_never_becomes_latest(tmp_path, shards):
    spec = spec_file(tmp_path, shards, "interrupted", max_steps=30, checkpoint_every=10, max_failures=1)
    run = run_dir(tmp_path, "interrupted")
    proc = start(spec, tmp_path / "log.txt", BIOMEDGPT_FAULTS="crash-before-report@20:1",
                 BIOMEDGPT_FAULTS_ONCE=str(tmp_path / "fault-fired"))
    try:
        wait_until(lambda: "00000010" in registered(run), 600, "checkpoint 10 recorded", proc)
        # checkpoint 20 is the one rank 1 dies in: its partial upload is on disk before the crash, and
        # still there when the run resumes (the retry writes checkpoint 20 again only 10 steps later)
        plant_partial_checkpoint(run / "checkpoint-00000010", run / "checkpoint-00000020", 20)
        assert "[train] resuming from" not in (tmp_path / "log.txt").read_text(), "planted after the resume"
        wait_until(lambda: (tmp_path / "fault-fired").is_file(), 600, "the fault fired", proc)
        assert (run / "checkpoint-00000020" / "biomedgpt.json").is_file()
        assert not list((run / "checkpoint-00000020" / "lightning").glob("__1_*.distcp"))
        assert proc.wait(timeout=900) == 0, (tmp_path / "log.txt").read_text()[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = (tmp_path / "log.txt").read_text()
    assert "[fault] crash-before-report at step 20 on rank 1" in log
    # the newest checkpoint-* on disk was the partial 20; the retry resumed from the last complete one
    assert f"[train] resuming from {run}/checkpoint-00000010" in log
    assert "checkpoint-00000020" not in log.split("[train] resuming from")[1].splitlines()[0]
    assert registered(run)[-1] == "00000030"
    # the checkpoint 20 written by the retry is whole, and both positions stand for their steps
    assert list((run / "checkpoint-00000020" / "lightning").glob("__1_*.distcp"))
    stream = stream_of(shards, spec)
    for step in (20, 30):
        assert stream.batches_before(data_position(run / f"checkpoint-{step:08d}")) == step


@pytest.mark.slow(seconds=96)
def test_fsdp_ddp_and_accumulation_match_a_single_process(tmp_path):
    """The same tiny model and the same global batches: 2 Ray Train workers with FSDP2 (each takes half
    of every batch), 2 with DDP, and 2 with FSDP2 accumulating two micro-batches per step, against 1
    worker taking whole batches. Equal-length targets make the mean of the ranks' (and micro-batches')
    mean losses equal to the mean over the whole batch, so the runs must agree step by step."""
    from biomedgpt.session import ensure_ray

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    runs = {"single": (1, "ddp", 1), "fsdp": (2, "fsdp", 1), "ddp": (2, "ddp", 1), "fsdp-accum": (2, "fsdp", 2)}
    started = ensure_ray(num_cpus=2)
    try:
        losses = {}
        for label, (workers, strategy, accum) in runs.items():
            out = tmp_path / f"losses-{label}"
            trainer = TorchTrainer(
                equivalence_loop, train_loop_config={"out": str(out), "steps": 6, "global_batch": 8,
                                                     "strategy": strategy, "accumulate": accum},
                scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 0.5}),
                torch_config=TorchConfig(backend="gloo"),
                run_config=RunConfig(name=f"equiv-{label}", storage_path=str(tmp_path / "ray")),
            )
            trainer.fit()
            per_rank = [json.loads((out / f"rank{r}.json").read_text()) for r in range(workers)]
            # Lightning reports each micro-batch's loss divided by the accumulation count: their sum is
            # the step's mean; ranks are averaged
            steps = [[sum(rank[i * accum:(i + 1) * accum]) for i in range(len(rank) // accum)] for rank in per_rank]
            losses[label] = [sum(step) / workers for step in zip(*steps)]
    finally:
        if started:
            ray.shutdown()
    assert len(losses["fsdp"]) == 6 and losses["fsdp"][0] > losses["fsdp"][-1]
    for label in ("fsdp", "ddp", "fsdp-accum"):
        torch.testing.assert_close(torch.tensor(losses[label]), torch.tensor(losses["single"]), atol=1e-4, rtol=0,
                                   msg=lambda m, label=label: f"{label}: {m}")


def equivalence_loop(config: dict) -> None:
    """Ray Train worker: our LightningModule and Lightning trainer (FSDP2 on 2 ranks, DDP on 1) on fixed
    synthetic global batches, each rank taking its slice; writes the per-step local losses."""
    import lightning as L
    import ray.train

    from biomedgpt.model import BiomedGPTConfig
    from biomedgpt.spec import TrainerSpec
    from biomedgpt.train.ray_trainer import make_lightning_trainer, make_module

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = BiomedGPTConfig(vocab_size=200, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                          decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, resnet_type="resnet18",
                          dropout=0.0, encoder_drop_path_rate=0.0, decoder_drop_path_rate=0.0)
    accum = config["accumulate"]
    t = TrainerSpec(strategy=config["strategy"], use_gpu=False, precision="32-true", max_steps=config["steps"],
                    grad_accumulation=accum, lr=2e-3, weight_decay=0.01, adam_betas=[0.9, 0.999], adam_eps=1e-8,
                    warmup_ratio=0.0, clip_grad_norm=1.0, label_smoothing=0.0, seed=0, log_every=1)
    module = make_module(t, json.loads(cfg.to_json_string(use_diff=False)), None)
    g = torch.Generator().manual_seed(123)
    n, per = config["global_batch"], config["global_batch"] // world
    batches = []
    for step in range(config["steps"]):
        if step % 2 == 0:  # a cycle of four global batches, so the loss can fall in a few steps
            g.manual_seed(123 + step % 4)
        full = {"input_ids": torch.randint(4, 200, (n, 10), generator=g),
                "labels": torch.randint(4, 200, (n, 5), generator=g)}
        full["decoder_input_ids"] = torch.cat([torch.zeros(n, 1, dtype=torch.long), full["labels"][:, :-1]], 1)
        full["patch_images"] = torch.zeros(n, 3, 32, 32)  # masked out: BatchNorm sees the same zeros anywhere
        full["patch_masks"] = torch.zeros(n, dtype=torch.bool)
        mine = {k: v[rank * per:(rank + 1) * per] for k, v in full.items()}
        micro = per // accum  # consecutive micro-batches of this rank's slice
        batches += [{k: v[i * micro:(i + 1) * micro] for k, v in mine.items()} for i in range(accum)]
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    class Batches:
        def __iter__(self):
            return iter(batches)

    trainer = make_lightning_trainer(t, [Record()])
    trainer.fit(module, train_dataloaders=Batches())
    out = Path(config["out"])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(losses))


# Ray workers cannot import this test module: ship the loop by value.
import ray.cloudpickle  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
