"""Per-rank training streams: deterministic epoch plans, mixing by weight, equal batches per rank,
and exact resume (no sample read twice or dropped within an epoch)."""

from __future__ import annotations

import os
from collections import Counter

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from biomedgpt.data.stream import ShardInfo, ShardStream, batches_per_epoch, list_shards, plan_epoch, rank_shards  # noqa: E402

COLUMNS = ("input_ids", "labels", "sample_id")


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory):
    from biomedgpt.data.build import build_shards
    from tests_paths import REPO

    out = tmp_path_factory.mktemp("small-shards")
    build_shards("vqa_rad", str(REPO / "datasets_spec" / "samples" / "vqa_rad"), str(out), shard_max_samples=20,
                 progress=False)
    return str(out)


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


def fake(name: str, n: int, samples: int = 10) -> list[ShardInfo]:
    return [ShardInfo(f"/x/{name}-{i}.tar", name, "train", samples) for i in range(n)]


def test_plan_is_deterministic_and_mixes_by_weight():
    a, b = fake("a", 4), fake("b", 6)
    plan0 = plan_epoch([(a, 1.0), (b, 0.5)], epoch=0, seed=7)
    assert plan0 == plan_epoch([(a, 1.0), (b, 0.5)], epoch=0, seed=7)
    assert plan0 != plan_epoch([(a, 1.0), (b, 0.5)], epoch=1, seed=7), "shard order must change per epoch"
    counts = Counter(s.dataset for s in plan0)
    assert counts == {"a": 4, "b": 3}
    # the fractional weight rotates through b's shards over epochs
    used = set()
    for epoch in range(2):
        used |= {s.url for s in plan_epoch([(a, 1.0), (b, 0.5)], epoch=epoch, seed=7) if s.dataset == "b"}
    assert len(used) == 6
    assert Counter(s.dataset for s in plan_epoch([(a, 2.0)], 0, 1)) == {"a": 8}


def test_every_rank_gets_the_same_number_of_batches():
    plan = plan_epoch([(fake("a", 5, samples=13), 1.0)], 0, 0)
    assert [len(rank_shards(plan, r, 2)) for r in range(2)] == [3, 2]
    assert batches_per_epoch(plan, 2, 4) == (2 * 13) // 4  # the smaller rank decides


def make_stream(small_shards, tokenizer_dir, rank=0, world=2, batch=8, min_rows=4096):
    shards = list_shards(small_shards, "vqa_rad", "train")
    pre = dict(task_name="vqa", tokenizer_dir=tokenizer_dir, image_size=16, max_source_length=24,
               max_target_length=8)
    return ShardStream([(shards, 1.0)], rank=rank, world=world, batch_size=batch, seed=3, preprocess=pre,
                       columns=COLUMNS, shuffle_buffer=32, as_torch=False, min_rows_per_read=min_rows)


def epoch_ids(stream, n_batches):
    it = iter(stream)
    return [int(x) for _ in range(n_batches) for x in next(it)["sample_id"]]


def test_one_epoch_reads_each_sample_once_across_ranks(small_shards, demo_tokenizer_dir, ray_local):
    streams = [make_stream(small_shards, demo_tokenizer_dir, rank=r) for r in range(2)]
    plan = plan_epoch(streams[0].groups, 0, 3)
    per_epoch = batches_per_epoch(plan, 2, 8)
    ids = [epoch_ids(s, per_epoch) for s in streams]
    assert all(s.position == {"epoch": 0, "batches": per_epoch} for s in streams)
    every = ids[0] + ids[1]
    assert len(every) == len(set(every)) == 2 * per_epoch * 8
    # next epoch starts, with another order
    nxt = next(iter(streams[0]))["sample_id"].tolist()
    assert streams[0].position == {"epoch": 1, "batches": 1} and nxt != ids[0][:8]


@pytest.mark.parametrize("min_rows", [1, 4096], ids=["epoch-per-read", "epochs-grouped"])
def test_resume_continues_exactly_where_the_stream_stopped(small_shards, demo_tokenizer_dir, ray_local, min_rows):
    full = make_stream(small_shards, demo_tokenizer_dir, min_rows=min_rows)
    per_epoch = batches_per_epoch(plan_epoch(full.groups, 0, 3), 2, 8)
    reference = epoch_ids(full, per_epoch + 3)  # into the second epoch
    for stop in (5, per_epoch + 1):  # inside a shuffle window / inside the next epoch
        first = make_stream(small_shards, demo_tokenizer_dir, min_rows=min_rows)
        head = epoch_ids(first, stop)
        position = first.position
        resumed = make_stream(small_shards, demo_tokenizer_dir, min_rows=min_rows)
        resumed.seek(position)
        tail = epoch_ids(resumed, per_epoch + 3 - stop)
        assert head + tail == reference


def test_each_shard_read_is_its_own_ray_data_task(small_shards, demo_tokenizer_dir, ray_local):
    """Reads spread over the CPUs and streaming holds: a map_batches chain fused into one operator once put
    every shard read of an execution into a single task (one core busy, all its rows in the object store)."""
    stream = make_stream(small_shards, demo_tokenizer_dir, rank=0, world=1, min_rows=1)
    shards = plan_epoch(stream.groups, 0, 3)
    epoch_ids(stream, batches_per_epoch(shards, 1, 8))
    stats = stream.last_dataset.stats()
    assert f"MapBatches(read_and_preprocess): {len(shards)} tasks executed" in stats, stats


def test_a_run_of_few_steps_reads_only_the_epochs_it_trains_on(small_shards, demo_tokenizer_dir, ray_local):
    """With `max_batches` (a run's steps) one Ray Data execution stops at the epoch holding the last batch
    (and the one batch a consumer fetches past it) instead of grouping epochs up to `min_rows_per_read`
    rows; the batches are the same, and asked for more the stream goes on, an epoch at a time."""
    plan0 = plan_epoch(make_stream(small_shards, demo_tokenizer_dir, world=1).groups, 0, 3)
    per_epoch = batches_per_epoch(plan0, 1, 8)

    def reads_of(stream) -> list[int]:  # the shard reads of each Ray Data execution the stream starts
        reads, read = [], stream._read
        stream._read = lambda shards, epochs: (reads.append(len(shards)), read(shards, epochs))[1]
        return reads

    unlimited = make_stream(small_shards, demo_tokenizer_dir, world=1)
    grouped = reads_of(unlimited)
    reference = epoch_ids(unlimited, per_epoch + 3)
    assert grouped[0] > 2 * len(plan0)  # without a limit: many epochs in one execution

    limited = make_stream(small_shards, demo_tokenizer_dir, world=1)
    limited.max_batches = per_epoch // 2
    reads = reads_of(limited)
    it = iter(limited)
    head = [int(x) for _ in range(per_epoch // 2 + 1) for x in next(it)["sample_id"]]
    assert reads == [len(plan0)]  # the first epoch only
    tail = [int(x) for _ in range(per_epoch + 3 - (per_epoch // 2 + 1)) for x in next(it)["sample_id"]]
    assert head + tail == reference
    assert reads == [len(plan0), len(plan0)]  # past the limit: an epoch at a time
    resumed = make_stream(small_shards, demo_tokenizer_dir, world=1)
    resumed.max_batches = per_epoch // 2
    resumed.seek({"epoch": 1, "batches": 0})
    assert resumed.batches_from_start() == per_epoch


def test_the_executor_sleeps_after_steps_that_waited_on_nothing(small_shards, demo_tokenizer_dir, ray_local,
                                                               monkeypatch):
    """The streaming executor's loop spins (holding the GIL the training thread needs) when its finished reads
    are held back by the buffer limit; the stream's execution callback, called at every step of a real read,
    makes it sleep after a step that waited on nothing, and only after such a step."""
    import threading
    import time

    import ray.data

    from biomedgpt.data import stream as stream_module

    # a real read calls the callback at every scheduling step of its executor (in this process)
    callback_cls = stream_module.idle_yield_callback()
    steps: list[str] = []
    step = callback_cls.on_execution_step
    monkeypatch.setattr(callback_cls, "on_execution_step",
                        lambda self, executor: (steps.append(threading.current_thread().name), step(self, executor)))
    stream = make_stream(small_shards, demo_tokenizer_dir, rank=0, world=1, min_rows=1)
    epoch_ids(stream, 2)
    assert callback_cls in ray.data.DataContext.get_current().execution_callback_classes
    assert steps and all(name.startswith("StreamingExecutor") for name in steps), steps[:3]
    # the rule itself: a pause after a step that waited on nothing, none after one that waited
    # (the executor of the stream above may still be stepping, in its own thread: only this thread's calls count)
    slept: list[float] = []
    here = threading.current_thread()
    monkeypatch.setattr(stream_module, "_pause",
                        lambda s: slept.append(s) if threading.current_thread() is here else time.sleep(s))
    callback = callback_cls()
    callback.on_execution_step(None)  # the first step (after the execution started): it waited
    callback._last -= 1.0  # a step that spent a second in ray.wait
    callback.on_execution_step(None)
    assert slept == []
    callback.on_execution_step(None)  # right after the previous: it waited on nothing
    assert slept == [stream_module.IDLE_PAUSE_S]


def test_a_resumed_stream_augments_exactly_as_the_uninterrupted_one(small_shards, demo_tokenizer_dir, ray_local):
    """RandAugment (the classification recipes' augmentation) is a function of the epoch's seed and the
    sample's id only: a run resumed in its second epoch trains on the very same augmented pixels as a run
    never stopped (the resume's exactness within an epoch is the test above's), and the second epoch sees
    other views of the samples the first one saw."""
    import numpy as np

    aug = {"random_resized_crop": {"scale": [0.08, 1.0]}, "hflip": 0.5,
           "randaugment": {"n": 2, "m": 9, "mstd": 0.5}, "random_erasing": 0.25}

    def stream():
        shards = list_shards(small_shards, "vqa_rad", "train")
        pre = dict(task_name="vqa", tokenizer_dir=demo_tokenizer_dir, image_size=16, max_source_length=24,
                   max_target_length=8, augment=aug)
        return ShardStream([(shards, 1.0)], rank=0, world=2, batch_size=8, seed=3, preprocess=pre,
                           columns=("patch_images", "sample_id"), shuffle_buffer=32, as_torch=False,
                           min_rows_per_read=4096)

    def batches(s, n):
        it = iter(s)
        return [next(it) for _ in range(n)]

    per_epoch = batches_per_epoch(plan_epoch(stream().groups, 0, 3), 2, 8)
    reference = batches(stream(), per_epoch + 2)
    views = {}
    for b in reference:
        for sid, img in zip(b["sample_id"], b["patch_images"]):
            views.setdefault(int(sid), []).append(img)
    assert any(len(v) == 2 and not np.array_equal(*v) for v in views.values())  # epoch 1: another view
    first = stream()
    head = batches(first, per_epoch + 1)
    resumed = stream()
    resumed.seek(first.position)
    got = head + batches(resumed, 1)
    for step, (want, have) in enumerate(zip(reference, got), 1):
        assert np.array_equal(want["sample_id"], have["sample_id"]), f"step {step}"
        assert np.array_equal(want["patch_images"], have["patch_images"]), f"step {step}: other pixels"
