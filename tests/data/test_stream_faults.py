"""Training streams over S3 and over bad data (real local Ray, moto's S3 server on 127.0.0.1).

Shards with planted faults (an undecodable jpg, a record missing 'question', a tar cut in half) are
streamed: every good sample arrives exactly once, every bad one is counted with its dataset, shard
and key, past the error budget the stream stops naming shard and key, ranks stay equal when one of
them skips a sample, and a resumed stream continues exactly even where bad rows moved its windows.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from biomedgpt.data import storage  # noqa: E402
from biomedgpt.data.pipeline import sample_id  # noqa: E402
from biomedgpt.data.shards import ShardSample, read_manifest, read_shard, write_manifest, write_shard  # noqa: E402
from biomedgpt.data.stream import (BadDataError, ErrorBudget, ShardStream, batches_per_epoch, list_shards,  # noqa: E402
                                   merge_data_errors, plan_epoch)
from tests_paths import REPO  # noqa: E402

COLUMNS = ("input_ids", "sample_id")
SAMPLE = REPO / "datasets_spec" / "samples" / "vqa_rad"


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from biomedgpt.session import ensure_ray

    started = ensure_ray(num_cpus=2)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    if started:
        ray.shutdown()


def _rewrite(url: str, change) -> None:
    """Rewrite one shard with `change(sample dict) -> sample dict` applied, and its manifest entry (a
    build that wrote bad data consistently: only the content is wrong)."""
    samples = []
    for s in read_shard(url):
        s = change(dict(s))
        samples.append(ShardSample(s["__key__"], s["json"], s.get("jpg"), "jpg" if s.get("jpg") else None))
    entry = write_shard(url, samples)
    split = url.rsplit("/", 1)[0]
    manifest = read_manifest(split)
    manifest.shards = [entry if e.name == entry.name else e for e in manifest.shards]
    write_manifest(split, manifest)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """VQA-RAD train shards of 20 samples with three faults, and what a reader must make of them."""
    from biomedgpt.data.build import build_shards

    root = tmp_path_factory.mktemp("planted")
    build_shards("vqa_rad", str(SAMPLE), str(root), ["train"], shard_max_samples=20, progress=False)
    shards = list_shards(str(root), "vqa_rad", "train")
    keys = {s.url: [x["__key__"] for x in read_shard(s.url)] for s in shards}
    ids = {s.url: [sample_id(json.loads(x["json"])) for x in read_shard(s.url)] for s in shards}
    bad_jpg, no_question, cut = shards[1].url, shards[4].url, shards[7].url
    jpg_key, q_key = keys[bad_jpg][3], keys[no_question][5]

    def corrupt(s):
        if s["__key__"] == jpg_key:
            s["jpg"] = b"\xff\xd8 definitely not a jpeg"
        return s

    def drop_question(s):
        if s["__key__"] == q_key:
            rec = json.loads(s["json"])
            del rec["question"]
            s["json"] = json.dumps(rec).encode()
        return s

    _rewrite(bad_jpg, corrupt)
    _rewrite(no_question, drop_question)
    data = Path(cut).read_bytes()
    Path(cut).write_bytes(data[: len(data) // 2])  # truncated: the manifest still lists every sample
    readable, failed = 0, False
    try:
        for _ in read_shard(cut):
            readable += 1
    except Exception:  # noqa: BLE001 - reading a cut tar fails part-way: that is the point
        failed = True
    assert failed and 0 < readable < len(keys[cut])
    lost = len(keys[cut]) - readable
    bad_ids = {ids[bad_jpg][3], ids[no_question][5], *ids[cut][readable:]}
    good = {i for s in shards for i in ids[s.url]} - bad_ids
    return {"root": str(root), "bad_jpg": (bad_jpg, jpg_key), "no_question": (no_question, q_key),
            "cut": (cut, keys[cut][readable - 1], lost), "good": good, "bad": 2 + lost}


def make_stream(root, tokenizer_dir, *, rank=0, world=1, batch=1, budget=None, shuffle=16, groups=None, seed=5,
                min_rows=1):
    shards = list_shards(root, "vqa_rad", "train")
    pre = dict(task_name="vqa", tokenizer_dir=tokenizer_dir, image_size=16, max_source_length=24, max_target_length=8)
    return ShardStream(groups or [(shards, 1.0)], rank=rank, world=world, batch_size=batch, seed=seed,
                       preprocess=pre, columns=COLUMNS, shuffle_buffer=shuffle, as_torch=False,
                       error_budget=budget, min_rows_per_read=min_rows)


def ids_of(stream, n):
    it = iter(stream)
    return [int(x) for _ in range(n) for x in next(it)["sample_id"]]


def check_planted_epoch(planted, root, tokenizer_dir):
    budget = ErrorBudget(max_bad_samples=planted["bad"])
    stream = make_stream(root, tokenizer_dir, budget=budget)
    per_epoch = batches_per_epoch(plan_epoch(stream.groups, 0, 5), 1, 1, budget)
    seen = ids_of(stream, per_epoch)
    # every good sample exactly once (batch 1 and a budget equal to the bad count: no tail is dropped)
    assert len(seen) == len(set(seen)) and set(seen) == planted["good"]
    report = merge_data_errors([stream.data_errors()])
    assert report["bad_samples"] == planted["bad"] and report["by_dataset"] == {"vqa_rad": planted["bad"]}
    shards = {storage.basename(s["shard"]): s for s in report["shards"]}

    def entry(url):
        return shards[storage.basename(url)]

    url, key = planted["bad_jpg"]
    assert entry(url)["count"] == 1 and entry(url)["reasons"] == {"ImageDecodeError": 1}
    assert entry(url)["examples"][0].startswith(f"{key}: ImageDecodeError: record ")
    url, key = planted["no_question"]
    assert entry(url)["reasons"] == {"MissingFieldError": 1} and key in entry(url)["examples"][0]
    assert "'question'" in entry(url)["examples"][0]
    url, last_key, lost = planted["cut"]
    assert entry(url)["count"] == lost and entry(url)["reasons"] == {"ShardReadError": lost}
    message = entry(url)["examples"][0]
    assert f"after key {last_key!r}" in message and "truncated" in message and f"remaining {lost}" in message
    return stream


def test_bad_samples_are_skipped_counted_and_named(planted, demo_tokenizer_dir, ray_local):
    check_planted_epoch(planted, planted["root"], demo_tokenizer_dir)


def test_over_the_budget_the_stream_stops_naming_shard_and_key(planted, demo_tokenizer_dir, ray_local):
    stream = make_stream(planted["root"], demo_tokenizer_dir, budget=ErrorBudget(max_bad_samples=1), batch=8)
    with pytest.raises(BadDataError) as err:
        ids_of(stream, 40)
    msg = str(err.value)
    assert "over the error budget" in msg and "max_bad_samples=1" in msg and "shard " in msg and "key " in msg
    first, second = planted["bad_jpg"][0], planted["no_question"][0]
    assert first in msg or second in msg  # the shard met second names itself and its key


def test_ranks_stay_equal_when_one_skips_a_sample(planted, demo_tokenizer_dir, ray_local):
    shards = list_shards(planted["root"], "vqa_rad", "train")
    bad = next(s for s in shards if s.url == planted["bad_jpg"][0])
    groups = [([bad] + [s for s in shards if s.url not in {planted["no_question"][0], planted["cut"][0],
                                                             bad.url}][:3], 1.0)]
    budget = ErrorBudget(max_bad_samples=1)
    streams = [make_stream(planted["root"], demo_tokenizer_dir, rank=r, world=2, batch=4, budget=budget,
                           groups=groups) for r in range(2)]
    per_epoch = batches_per_epoch(plan_epoch(streams[0].groups, 0, 5), 2, 4, budget)
    assert per_epoch == (40 - 1) // 4  # each rank plans 40 rows minus its budget of 1
    seen = [ids_of(s, per_epoch + 2) for s in streams]  # through the epoch's end into the next one
    assert [s.position["epoch"] for s in streams] == [1, 1] and [s.position["batches"] for s in streams] == [2, 2]
    first_epoch = seen[0][: per_epoch * 4] + seen[1][: per_epoch * 4]
    assert len(first_epoch) == len(set(first_epoch))
    assert not set(first_epoch) & {sample_id(json.loads(next(x for x in read_shard(bad.url)
                                                              if x["__key__"] == planted["bad_jpg"][1])["json"]))}
    assert sum(s.bad_samples for s in streams) >= 1


def test_resume_is_exact_where_bad_rows_moved_the_windows(planted, demo_tokenizer_dir, ray_local):
    budget = ErrorBudget(max_bad_samples=planted["bad"])
    full = make_stream(planted["root"], demo_tokenizer_dir, batch=4, budget=budget)
    per_epoch = batches_per_epoch(plan_epoch(full.groups, 0, 5), 1, 4, budget)
    reference = ids_of(full, per_epoch + 2)
    moved = 0
    for stop in (per_epoch // 2, per_epoch - 1):
        first = make_stream(planted["root"], demo_tokenizer_dir, batch=4, budget=budget)
        head = ids_of(first, stop)
        position = first.position
        moved += "rows" in position
        resumed = make_stream(planted["root"], demo_tokenizer_dir, batch=4, budget=budget)
        resumed.seek(position)
        resumed.restore_data_errors(merge_data_errors([first.data_errors()]), keep_counts=True)
        tail = ids_of(resumed, per_epoch + 2 - stop)
        assert head + tail == reference
        # bad rows met again after the resume are not counted twice
        assert resumed.bad_samples == full.bad_samples
    assert moved, "the test should stop after a bad row moved a window"


def test_streams_from_s3_each_sample_once_per_epoch(planted, demo_tokenizer_dir, ray_local, s3_bucket, tmp_path):
    """Clean shards built straight to S3, two ranks, two epochs: every sample once per epoch."""
    from biomedgpt.data.build import build_shards

    out = f"{s3_bucket}/shards"
    build_shards("vqa_rad", str(SAMPLE), out, ["train"], shard_max_samples=133, progress=False)  # 2 x 133
    shards = list_shards(out, "vqa_rad", "train")
    assert [s.samples for s in shards] == [133, 133] and all(s.url.startswith("s3://") for s in shards)
    streams = [make_stream(out, demo_tokenizer_dir, rank=r, world=2, batch=7, shuffle=28, min_rows=266)
               for r in range(2)]
    per_epoch = batches_per_epoch(plan_epoch(streams[0].groups, 0, 5), 2, 7)
    assert per_epoch == 19
    seen = [ids_of(s, 2 * per_epoch) for s in streams]
    every = Counter()
    for epoch in range(2):
        ids = [i for rank in seen for i in rank[epoch * 133:(epoch + 1) * 133]]
        assert len(ids) == len(set(ids)) == 266
        every.update(ids)
    assert set(every.values()) == {2}

    # the planted faults, uploaded to S3, are found and named there too (truncated tar included)
    local = tmp_path / "planted"
    shutil.copytree(planted["root"], local)
    storage.upload_dir(local, f"{s3_bucket}/planted")
    stream = check_planted_epoch(planted, f"{s3_bucket}/planted", demo_tokenizer_dir)
    assert all(s["shard"].startswith(f"{s3_bucket}/planted/") for s in stream.data_errors()["shards"])
