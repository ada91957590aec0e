"""Elastic resume (real `biomedgpt run` jobs on local Ray): a run stopped at step K with N workers and
continued on M != N workers keeps the data plan and the global batch of its N workers. Each worker
records the keys of the samples it trains on (BIOMEDGPT_RECORD_SAMPLES); before and after the change,
together they must be, step by step, the global batches of an uninterrupted N-worker run, and over
every epoch cover its plan exactly once (none twice, none skipped but the tail every epoch drops);
the resumed run says how it shares the batch, starts at step K + 1 and follows the same schedule.

- 2 -> 1 workers (FSDP2, sharded checkpoints resharded by torch's distributed checkpoint), the job
  stopped and started again with `trainer.workers: 1`;
- 1 -> 2 workers (FSDP2, full checkpoints), each worker taking half of the one plan rank's batches;
- a retry after a lost worker (`max_failures`) that Ray Train restarts smaller: an elastic group
  (`trainer.min_workers: 1`, Ray Train's ScalingConfig(num_workers=(1, 2))) on a two-node local cluster
  (ray.cluster_utils), one node removed while the run is held at checkpoint K (DDP, full checkpoints).

The run is held at checkpoint K by the fault `hold-after-report@K:0` (train/faults.py), so where it
stops is known."""

from __future__ import annotations

import json
import math
import os
import signal
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from biomedgpt.data.error_budget import ErrorBudget
from biomedgpt.data.stream import (ElasticStream, ShardInfo, ShardStream, elastic_layout, merge_data_errors,
                                   merge_positions)

from job_runs import read_stream_batches, registered, run_dir, spec_file, start, steps_logged, stream_of, wait_until
from stream_positions import StreamOf

K, MAX = 10, 18  # the checkpoint the first start stops at; the run's steps (crossing into a second epoch)
DATA = {"shuffle_buffer": 32}  # windows of a few batches: K falls inside one


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("elastic-shards")


# -- the stream alone (in-process, shards faked in memory: no Ray) ---------------------------------------

TOY = [ShardInfo(f"mem://toy-{i}", "toy", "train", 10 + 3 * i) for i in range(7)]  # 133 samples
BAD = {"mem://toy-2#4", "mem://toy-5#0", "mem://toy-6#20"}  # rows preprocessing fails on


def fake_read(self, shards, epochs):
    """ShardStream._read without Ray: each shard's rows tagged as read_and_preprocess tags them, the BAD
    ones flagged with an error."""
    for i, sh in enumerate(shards):
        keys = np.array([f"{sh.url}#{j}" for j in range(sh.samples)], dtype=object)
        yield {"__read__": np.full(sh.samples, i, dtype=np.int64), "__row__": np.arange(sh.samples),
               "__key__": keys, "error": np.array(["ValueError: bad" if k in BAD else "" for k in keys], dtype=object)}


def toy(cls, **kw):
    return cls([(TOY, 1.0)], batch_size=4, seed=5, preprocess={}, columns=["__key__"], as_torch=False,
               shuffle_buffer=12, min_rows_per_read=1, error_budget=ErrorBudget(max_bad_samples=3), **kw)


def take(streams, steps: int) -> list[list[str]]:
    """The global batches of `steps` steps of a group of streams (ranks in order), as Lightning takes them:
    one batch fetched ahead."""
    its = [iter(s) for s in streams]
    out = [[str(k) for it in its for k in next(it)["__key__"]] for _ in range(steps)]
    for it in its:
        next(it)
    return out


@pytest.mark.parametrize("n,m,m2", [(2, 1, 2), (1, 2, 1), (4, 2, 1), (2, 4, 2), (3, 2, 3), (3, 1, 2), (2, 2, 2)])
def test_elastic_stream_steps_are_the_plan_ranks_batches(monkeypatch, n, m, m2):
    """A plan of n ranks read by m workers for 7 steps, stopped, and continued by m2 workers from the
    checkpoint's position (bad rows moved windows): each step's global batch is, row for row, the
    uninterrupted n-rank run's; bad samples are counted once for the run."""
    monkeypatch.setattr(ShardStream, "_read", fake_read)
    steps, k = 20, 7
    plan = [toy(ShardStream, rank=r, world=n) for r in range(n)]
    expected = take(plan, steps)
    first = [toy(ElasticStream, rank=j, world=m, data_world=n) for j in range(m)]
    got = take(first, k)
    position = merge_positions([s.position_after(k) for s in first])
    assert position["world"] == n
    errors = merge_data_errors([s.data_errors(since_epoch=position["epoch"]) for s in first])  # as DataPosition
    resumed = [toy(ElasticStream, rank=j, world=m2, data_world=n) for j in range(m2)]
    for j, s in enumerate(resumed):
        s.seek(position)
        s.restore_data_errors(errors, keep_counts=j == 0)
    got += take(resumed, steps - k)
    assert got == expected
    assert all(len(set(batch)) == 4 * n for batch in got)
    assert {s.batch_size for s in resumed} == {4 * n // m2}
    assert sum(s.bad_samples for s in resumed) == sum(s.bad_samples for s in plan) > 0


def test_elastic_stream_on_its_own_world_is_the_shard_stream(monkeypatch):
    monkeypatch.setattr(ShardStream, "_read", fake_read)
    plain, elastic = toy(ShardStream, rank=1, world=2), toy(ElasticStream, rank=1, world=2)
    assert take([plain], 9) == take([elastic], 9)
    pos = plain.position_after(9)
    assert elastic.position_after(9) == {"epoch": pos["epoch"], "batches": pos["batches"], "world": 2,
                                         "rows": {1: pos["rows"]} if "rows" in pos else {}}
    assert elastic.data_errors() == plain.data_errors()


def test_elastic_refuses_a_worker_count_that_cannot_share_the_global_batch():
    from biomedgpt.spec import SpecError, TrainerSpec

    assert elastic_layout(3, 2, 8) == [[(0, 0, 8), (1, 0, 4)], [(1, 4, 8), (2, 0, 8)]]
    assert elastic_layout(1, 2, 16) == [[(0, 0, 8)], [(0, 8, 16)]]
    with pytest.raises(ValueError, match=r"trainer.workers: .* 3 rank\(s\) x trainer.batch_size 5 = a global batch of 15 .* 2 "
                                         r"workers cannot share equally.*trainer.batch_size"):
        elastic_layout(3, 2, 5)
    with pytest.raises(SpecError, match=r"t.min_workers: a group of 3 worker\(s\) cannot share the global batch of 32"):
        TrainerSpec(workers=4, min_workers=2, batch_size=8).validate("t")
    TrainerSpec(workers=4, min_workers=2, batch_size=6).validate("t")  # 24 samples: 2, 3 and 4 workers


def test_elastic_plan_keeps_the_runs_data_world(tmp_path):
    """The driver's plan takes the data world its checkpoints record (a fresh run's: trainer.workers) and
    refuses, before any worker starts, a worker count that cannot share the run's global batch."""
    from types import SimpleNamespace

    from biomedgpt.spec import TrainerSpec
    from biomedgpt.train.plan import data_world_for, previous_checkpoint_meta

    run = tmp_path / "run"
    assert previous_checkpoint_meta(str(run)) is None
    for step, world in ((10, 2), (20, 2)):
        (run / f"checkpoint-{step:08d}").mkdir(parents=True)
        (run / f"checkpoint-{step:08d}" / "biomedgpt.json").write_text(json.dumps({"step": step, "data_world": world}))
    (run / "checkpoint-00000030").mkdir()  # being written: no metadata yet
    assert previous_checkpoint_meta(str(run))["step"] == 20

    def spec(**t):
        return SimpleNamespace(source="job.yaml", trainer=TrainerSpec(**t))

    assert data_world_for(spec(workers=4, batch_size=8), None) == 4
    assert data_world_for(spec(workers=1, batch_size=8), {"data_world": 2}) == 2
    assert data_world_for(spec(workers=1, batch_size=8), {"step": 20}) == 1  # a checkpoint from before: as written
    with pytest.raises(ValueError, match=r"job.yaml: trainer.workers: .* 2 rank\(s\) x trainer.batch_size 8 .* 3 workers"):
        data_world_for(spec(workers=3, batch_size=8), {"data_world": 2})


# -- real jobs -----------------------------------------------------------------------------------------


def recorded(folder: Path, world: int, steps: range) -> dict[int, list[str]]:
    """The global batch of each step in `steps` the workers of a `world`-worker group trained on: its
    workers' keys in rank order."""
    by_step: dict[int, list[tuple[int, list[str]]]] = {}
    for path in sorted(folder.glob("rank*.jsonl")):
        rank = int(path.stem[4:])
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if rec["world"] == world and rec["step"] in steps:
                by_step.setdefault(rec["step"], []).append((rank, rec["keys"]))
    for step, parts in by_step.items():
        ranks = [r for r, _ in parts]
        assert sorted(ranks) == list(range(world)), f"step {step}: records of ranks {ranks} of {world}"
    return {s: [k for _, keys in sorted(parts) for k in keys] for s, parts in sorted(by_step.items())}


def reference(plan: StreamOf, spec: Path, tokenizer_dir: str, out: Path) -> dict[int, list[str]]:
    """The global batches of an uninterrupted run of the plan's workers: each plan rank's batches, read by
    the stream the workers use (in a process of its own: stream_reader.py), rank after rank."""
    reads = [{"rank": r, "batches": MAX} for r in range(plan.world)]
    per_rank = read_stream_batches(plan.shards, yaml.safe_load(spec.read_text()), tokenizer_dir, reads, out)
    return {s + 1: [k for r in range(plan.world) for k in per_rank[r][s]] for s in range(MAX)}


def check_continues_exactly(plan: StreamOf, seen: dict[int, list[str]], expected: dict[int, list[str]]) -> None:
    """`seen`: the global batch of every step 1..MAX, before and after the change of workers."""
    assert sorted(seen) == list(range(1, MAX + 1)), f"steps trained: {sorted(seen)}"
    for step in seen:  # every step trains the samples of the uninterrupted run's step, once each
        assert Counter(seen[step]) == Counter(expected[step]), f"step {step}"
    global_batch = plan.world * plan.batch_size
    done, epoch = 0, 0
    while done < MAX:
        n = min(plan.epoch_batches(epoch), MAX - done)
        keys = [k for s in range(done + 1, done + n + 1) for k in seen[s]]
        twice = [k for k, c in Counter(keys).items() if c > 1]
        assert not twice, f"epoch {epoch}: read twice: {twice[:5]}"
        planned = Counter(plan.planned_keys(epoch))
        assert set(keys) <= set(planned), f"epoch {epoch}: samples outside its plan"
        assert len(keys) == n * global_batch
        if n == plan.epoch_batches(epoch):  # a whole epoch: all its plan but the tail each rank drops
            tails = [rows - n * plan.batch_size for rows in plan.planned_rows(epoch)]
            assert sum(planned.values()) - len(keys) == sum(tails), f"epoch {epoch}: samples skipped"
        done, epoch = done + n, epoch + 1
    assert plan.epoch_batches(0) < MAX, "the run must cross an epoch boundary"
    assert K < plan.epoch_batches(0), "the change of workers must fall inside an epoch"


def check_schedule(run: Path, spec: dict) -> None:
    """The learning rate of every step, in both starts, is the one schedule of MAX steps (warmup, then
    linear decay): the resumed start continues it at step K + 1."""
    from biomedgpt.train.report import attempt_logs, read_metrics
    from biomedgpt.train.schedule import warmup_linear_decay

    t = spec["trainer"]
    warmup = math.ceil(t["warmup_ratio"] * MAX)
    attempts = [dict(read_metrics(p)["train/lr"]) for p in attempt_logs(run / "logs")]
    assert len(attempts) == 2, attempts
    first, resumed = attempts
    # (the held first start stops before Lightning logs step K; the resumed one logs from step K + 1)
    assert max(first) <= K and min(resumed) == K + 1 and max(resumed) == MAX, (sorted(first), sorted(resumed))
    for lrs in attempts:
        for step, lr in lrs.items():  # the CSV's step counts from 1: the lr of 0-based optimizer step `step - 1`
            assert lr == pytest.approx(t["lr"] * warmup_linear_decay(step - 1, warmup, MAX), rel=1e-6), step


def stop_at_k(spec: Path, run: Path, log: Path, samples: Path) -> None:
    """Start the job, let it reach checkpoint K (held there), and stop it (Ctrl-C)."""
    first = start(spec, log, BIOMEDGPT_FAULTS=f"hold-after-report@{K}:0", BIOMEDGPT_RECORD_SAMPLES=str(samples))
    try:
        wait_until(lambda: f"{K:08d}" in registered(run), 600, f"checkpoint {K} recorded", first)
        os.killpg(first.pid, signal.SIGINT)
        first.wait(timeout=180)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert registered(run)[-1] == f"{K:08d}", registered(run)


def stopped_and_resumed(tmp_path: Path, shards: Path, tokenizer_dir: str, name: str, before: dict, after: dict
                        ) -> None:
    spec = spec_file(tmp_path, shards, name, data=DATA, max_steps=MAX, checkpoint_every=K, log_every=1, **before)
    settings = yaml.safe_load(spec.read_text())
    run = run_dir(tmp_path, name)
    stop_at_k(spec, run, tmp_path / "first.txt", tmp_path / "before")
    plan = stream_of(shards, spec)  # the plan of the run's first worker count
    expected = reference(plan, spec, tokenizer_dir, tmp_path / "reference.json")

    spec_file(tmp_path, shards, name, data=DATA, max_steps=MAX, checkpoint_every=K, log_every=1, **after)
    second = start(spec, tmp_path / "second.txt", BIOMEDGPT_RECORD_SAMPLES=str(tmp_path / "after"))
    assert second.wait(timeout=600) == 0, (tmp_path / "second.txt").read_text()[-4000:]
    log = (tmp_path / "second.txt").read_text()
    assert f"[train] resuming from {run}/checkpoint-{K:08d}" in log
    n, m, b = before["workers"], after["workers"], before["batch_size"]
    assert log.count("[train] elastic: ") == 1, log[-4000:]
    line = log.split("[train] elastic: ")[1].splitlines()[0]
    assert f"data plan has {n} rank(s) of batch {b}" in line and f"on {m} worker(s)" in line
    assert f"trainer.batch_size {b} -> {n * b // m}" in line and f"global batch stays {n * b}" in line
    assert min(steps_logged(log)) == K + 1 and max(steps_logged(log)) == MAX
    assert registered(run)[-1] == f"{MAX:08d}"
    meta = json.loads((run / f"checkpoint-{MAX:08d}" / "biomedgpt.json").read_text())
    assert (meta["data_world"], meta["workers"], meta["step"]) == (n, m, MAX)

    seen = recorded(tmp_path / "before", n, range(1, K + 1))
    seen.update(recorded(tmp_path / "after", m, range(K + 1, MAX + 1)))
    check_continues_exactly(plan, seen, expected)
    check_schedule(run, settings)


@pytest.mark.slow(seconds=115)
def test_elastic_2_to_1_workers_continues_the_epoch_exactly(tmp_path, shards, demo_tokenizer_dir):
    stopped_and_resumed(tmp_path, shards, demo_tokenizer_dir, "two-to-one",
                        before=dict(workers=2, batch_size=8, strategy="fsdp", checkpoint_format="sharded"),
                        after=dict(workers=1, batch_size=8, strategy="fsdp", checkpoint_format="sharded"))


@pytest.mark.slow(seconds=121)
def test_elastic_1_to_2_workers_continues_the_epoch_exactly(tmp_path, shards, demo_tokenizer_dir):
    stopped_and_resumed(tmp_path, shards, demo_tokenizer_dir, "one-to-two",
                        before=dict(workers=1, batch_size=16, strategy="fsdp", checkpoint_format="full"),
                        after=dict(workers=2, batch_size=16, strategy="fsdp", checkpoint_format="full"))


@pytest.mark.slow(seconds=143)
def test_elastic_retry_with_fewer_workers_after_node_loss(tmp_path, shards, demo_tokenizer_dir, monkeypatch):
    """Node loss mid-run, the run continuing smaller: a head (1 CPU, for Ray Data's reads and the driver's
    actors) and two worker nodes of 2 CPUs, workers of 2 CPUs spread one per node. Removing a worker node
    (its raylet, its worker, its objects) fails the group; Ray Train's elastic policy restarts it (the
    retry of `max_failures: 1`) with the one worker the remaining node holds, from the latest checkpoint,
    and every step after it trains the global batch of an uninterrupted run."""
    from ray.cluster_utils import Cluster

    from biomedgpt.session import free_port

    name = "retry-smaller"
    spec = spec_file(tmp_path, shards, name, data=DATA, max_steps=MAX, checkpoint_every=K, log_every=1, workers=2,
                     min_workers=1, cpus_per_worker=2, torch_threads=1, batch_size=8, strategy="ddp",
                     placement="spread", max_failures=1)
    run = run_dir(tmp_path, name)
    log = tmp_path / "log.txt"
    port = free_port()
    # the Ray processes the cluster starts inherit these (the job's driver only connects to it)
    for var, value in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}",
                       "BIOMEDGPT_FAULTS": f"hold-after-report@{K}:0", "BIOMEDGPT_FAULTS_ONCE": str(tmp_path / "held"),
                       "BIOMEDGPT_RECORD_SAMPLES": str(tmp_path / "samples")}.items():
        monkeypatch.setenv(var, value)
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 1, "include_dashboard": True, "dashboard_host": "127.0.0.1",
                                      "dashboard_port": port})
    proc = None
    try:
        cluster.add_node(num_cpus=2)
        second = cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        proc = start(spec, log, RAY_ADDRESS=cluster.address)
        wait_until(lambda: f"{K:08d}" in registered(run) and "[fault] hold-after-report" in log.read_text(), 600,
                   f"checkpoint {K} recorded, the run held there", proc)
        cluster.remove_node(second, allow_graceful=False)  # a node lost, with its worker
        assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        cluster.shutdown()
    text = log.read_text()
    assert f"[train] resuming from {run}/checkpoint-{K:08d}" in text, text[-4000:]
    line = text.split("[train] elastic: ")[1].splitlines()[0]
    assert "data plan has 2 rank(s) of batch 8" in line and "on 1 worker(s)" in line
    after = steps_logged(text.split("[train] resuming from")[1])
    assert min(after) == K + 1 and max(after) == MAX
    meta = json.loads((run / f"checkpoint-{MAX:08d}" / "biomedgpt.json").read_text())
    assert (meta["data_world"], meta["workers"]) == (2, 1)

    plan = stream_of(shards, spec)
    seen = recorded(tmp_path / "samples", 2, range(1, K + 1))
    seen.update(recorded(tmp_path / "samples", 1, range(K + 1, MAX + 1)))
    check_continues_exactly(plan, seen, reference(plan, spec, demo_tokenizer_dir, tmp_path / "reference.json"))
